//! Whether an ONNX graph carries FP8 Q/DQ (QuantizeLinear/DequantizeLinear with float8 tensors), read
//! from the protobuf's node and tensor headers: weights are skipped, never read, so a multi-GB graph costs a few reads.
//!
//! ONNX Runtime needs to know before it builds a session: its QDQ selector (`QDQSelectorActionTransformer`,
//! on at the default optimization level) rewrites DequantizeLinear -> MatMul into `MatMulIntegerToFloat`,
//! which has no float8 kernel, so creating a session for an FP8 graph fails. `ort.rs` turns that one
//! transformer off for such graphs only.

use std::fs::File;
use std::io::{self, BufReader, Cursor, Read, Seek, SeekFrom};
use std::path::Path;

/// The optimizer ONNX Runtime must not run on FP8 Q/DQ graphs (`optimization.disable_specified_optimizers`).
pub const ORT_FP8_DISABLED_OPTIMIZERS: &str = "QDQSelectorActionTransformer";

/// ONNX `TensorProto.DataType` values of the float8 types.
const FLOAT8: std::ops::RangeInclusive<u64> = 17..=20;

/// What the scan found.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Quantized {
    /// QuantizeLinear or DequantizeLinear nodes are present.
    pub qdq: bool,
    /// A float8 tensor is present (initializer, constant, or a `to` / `output_dtype` attribute).
    pub fp8: bool,
}

impl Quantized {
    /// An FP8 Q/DQ graph: the session option applies.
    pub fn fp8_qdq(&self) -> bool {
        self.qdq && self.fp8
    }
}

/// Scans the ONNX file at `path`.
pub fn scan(path: &Path) -> io::Result<Quantized> {
    let file = File::open(path)?;
    let len = file.metadata()?.len();
    let mut w = Wire { r: BufReader::new(file), pos: 0 };
    let mut found = Quantized::default();
    w.model(len, &mut found)?;
    Ok(found)
}

/// Scans an ONNX model held in memory.
pub fn scan_bytes(bytes: &[u8]) -> io::Result<Quantized> {
    let mut found = Quantized::default();
    Wire { r: Cursor::new(bytes), pos: 0 }.model(bytes.len() as u64, &mut found)?;
    Ok(found)
}

fn corrupt(what: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, format!("not an ONNX model: {what}"))
}

// Protobuf wire types.
const VARINT: u8 = 0;
const FIXED64: u8 = 1;
const LEN: u8 = 2;
const FIXED32: u8 = 5;

/// A protobuf reader that knows its position, so messages can be walked field by field and skipped.
struct Wire<R> {
    r: R,
    pos: u64,
}

impl<R: Read + Seek> Wire<R> {
    fn byte(&mut self) -> io::Result<u8> {
        let mut b = [0u8; 1];
        self.r.read_exact(&mut b)?;
        self.pos += 1;
        Ok(b[0])
    }

    fn varint(&mut self) -> io::Result<u64> {
        let mut v = 0u64;
        for shift in (0..64).step_by(7) {
            let b = self.byte()?;
            v |= u64::from(b & 0x7f) << shift;
            if b & 0x80 == 0 {
                return Ok(v);
            }
        }
        Err(corrupt("varint longer than 10 bytes"))
    }

    fn skip(&mut self, n: u64) -> io::Result<()> {
        let n = i64::try_from(n).map_err(|_| corrupt("field length"))?;
        self.r.seek(SeekFrom::Current(n))?;
        self.pos += n as u64;
        Ok(())
    }

    fn bytes(&mut self, n: u64) -> io::Result<Vec<u8>> {
        let mut v = vec![0u8; usize::try_from(n).map_err(|_| corrupt("field length"))?];
        self.r.read_exact(&mut v)?;
        self.pos += n;
        Ok(v)
    }

    /// The next field of a message ending at `end`: (number, wire type), or None at its end.
    fn field(&mut self, end: u64) -> io::Result<Option<(u64, u8)>> {
        if self.pos >= end {
            return Ok(None);
        }
        let key = self.varint()?;
        Ok(Some((key >> 3, (key & 7) as u8)))
    }

    /// Skips a field's value; for a length-delimited one returns where it ends instead (not skipped).
    fn value_end(&mut self, wire: u8, end: u64) -> io::Result<u64> {
        let stop = match wire {
            VARINT => {
                self.varint()?;
                self.pos
            }
            FIXED64 => self.pos + 8,
            FIXED32 => self.pos + 4,
            LEN => {
                let n = self.varint()?;
                self.pos + n
            }
            _ => return Err(corrupt("unsupported wire type")),
        };
        if stop > end {
            return Err(corrupt("a field runs past its message"));
        }
        Ok(stop)
    }

    fn skip_value(&mut self, wire: u8, end: u64) -> io::Result<()> {
        let stop = self.value_end(wire, end)?;
        self.skip(stop - self.pos)
    }

    /// ModelProto: field 7 is the graph.
    fn model(&mut self, end: u64, out: &mut Quantized) -> io::Result<()> {
        while let Some((field, wire)) = self.field(end)? {
            match (field, wire) {
                (7, LEN) => {
                    let stop = self.value_end(wire, end)?;
                    self.graph(stop, out)?;
                }
                _ => self.skip_value(wire, end)?,
            }
        }
        Ok(())
    }

    /// GraphProto: 1 node, 5 initializer.
    fn graph(&mut self, end: u64, out: &mut Quantized) -> io::Result<()> {
        while let Some((field, wire)) = self.field(end)? {
            match (field, wire) {
                (1, LEN) => {
                    let stop = self.value_end(wire, end)?;
                    let bytes = self.bytes(stop - self.pos)?;
                    let n = bytes.len() as u64;
                    Wire { r: Cursor::new(bytes), pos: 0 }.node(n, out)?;
                }
                (5, LEN) => {
                    let stop = self.value_end(wire, end)?;
                    self.tensor(stop, out)?;
                }
                _ => self.skip_value(wire, end)?,
            }
        }
        Ok(())
    }

    /// TensorProto: field 2 is the data type; the data itself is skipped.
    fn tensor(&mut self, end: u64, out: &mut Quantized) -> io::Result<()> {
        while let Some((field, wire)) = self.field(end)? {
            if (field, wire) == (2, VARINT) {
                out.fp8 |= FLOAT8.contains(&self.varint()?);
            } else {
                self.skip_value(wire, end)?;
            }
        }
        self.skip(end - self.pos)
    }

    /// NodeProto: 4 op_type, 5 attribute.
    fn node(&mut self, end: u64, out: &mut Quantized) -> io::Result<()> {
        while let Some((field, wire)) = self.field(end)? {
            match (field, wire) {
                (4, LEN) => {
                    let stop = self.value_end(wire, end)?;
                    let op = self.bytes(stop - self.pos)?;
                    out.qdq |= op == b"QuantizeLinear" || op == b"DequantizeLinear";
                }
                (5, LEN) => {
                    let stop = self.value_end(wire, end)?;
                    self.attribute(stop, out)?;
                }
                _ => self.skip_value(wire, end)?,
            }
        }
        Ok(())
    }

    /// AttributeProto: 1 name, 3 i, 5 t (tensor), 6 g (graph), 10 tensors, 11 graphs.
    fn attribute(&mut self, end: u64, out: &mut Quantized) -> io::Result<()> {
        let (mut name, mut int) = (Vec::new(), None);
        while let Some((field, wire)) = self.field(end)? {
            match (field, wire) {
                (1, LEN) => {
                    let stop = self.value_end(wire, end)?;
                    name = self.bytes(stop - self.pos)?;
                }
                (3, VARINT) => int = Some(self.varint()?),
                (5 | 10, LEN) => {
                    let stop = self.value_end(wire, end)?;
                    self.tensor(stop, out)?;
                }
                (6 | 11, LEN) => {
                    let stop = self.value_end(wire, end)?;
                    self.graph(stop, out)?;
                }
                _ => self.skip_value(wire, end)?,
            }
        }
        // Cast(to=FLOAT8*), QuantizeLinear(output_dtype=FLOAT8*)
        if (name == b"to" || name == b"output_dtype") && int.is_some_and(|i| FLOAT8.contains(&i)) {
            out.fp8 = true;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    fn fixture(name: &str) -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/onnx_ort").join(name)
    }

    #[test]
    fn finds_fp8_qdq_and_only_there() {
        let q = scan(&fixture("matmul_fp8.onnx")).unwrap();
        assert_eq!(q, Quantized { qdq: true, fp8: true });
        for plain in ["matmul_add_f32.onnx", "matmul_add_bf16.onnx", "int64_gather.onnx", "two_outputs.onnx"] {
            assert_eq!(scan(&fixture(plain)).unwrap(), Quantized::default(), "{plain}");
        }
        // The committed tiny bundles: the FP8 twin's transformer, and nothing else.
        let engines = Path::new(env!("CARGO_MANIFEST_DIR")).join("engines");
        assert!(scan(&engines.join("tiny-fp8/transformer.onnx")).unwrap().fp8_qdq());
        for f in ["tiny/transformer.onnx", "tiny-fp8/vae_decoder.onnx", "tiny-fp8/text_encoder.onnx"] {
            assert!(!scan(&engines.join(f)).unwrap().fp8_qdq(), "{f}");
        }
    }

    #[test]
    fn agrees_on_bytes_and_files_and_refuses_garbage() {
        let bytes = std::fs::read(fixture("matmul_fp8.onnx")).unwrap();
        assert_eq!(scan_bytes(&bytes).unwrap(), scan(&fixture("matmul_fp8.onnx")).unwrap());
        // A truncated model is an error, not a silent "no FP8".
        assert!(scan_bytes(&bytes[..bytes.len() - 7]).is_err());
        assert!(scan_bytes(b"\x3a\xff\xff\xff\xff\x0f").is_err(), "a graph longer than the file");
        assert!(scan(&fixture("no-such-file.onnx")).is_err());
        assert_eq!(scan_bytes(b"").unwrap(), Quantized::default());
    }

    #[test]
    fn attributes_and_constants_count() {
        // Cast(to=FLOAT8E4M3FN) marks FP8 without an FP8 initializer; DequantizeLinear marks Q/DQ.
        // NodeProto { op_type: "Cast" (4), attribute (5): { name: "to" (1), i: 17 (3) } }
        let attr = [&[0x0a, 2][..], b"to", &[0x18, 17]].concat();
        let node = [&[0x22, 4][..], b"Cast", &[0x2a, attr.len() as u8], &attr].concat();
        let dq = [&[0x22, 16][..], b"DequantizeLinear"].concat();
        let graph = [&[0x0a, node.len() as u8][..], &node, &[0x0a, dq.len() as u8], &dq].concat();
        let model = [&[0x08, 9][..], &[0x3a, graph.len() as u8], &graph].concat();
        assert_eq!(scan_bytes(&model).unwrap(), Quantized { qdq: true, fp8: true });
    }
}
