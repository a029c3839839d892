//! Host tensors that cross the engine seam: a dtype tag over an `ndarray` array.
//! The pipeline computes in f32/i64; conversion to a graph's f16/bf16 happens here, at the seam.

use half::{bf16, f16};
use ndarray::{ArrayD, IxDyn};
use serde::{Deserialize, Serialize};
use std::fmt;

/// Element types a component may declare for an input or output.
/// Serialized with ONNX's names (`float32`, ...), as in `manifest.json`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, schemars::JsonSchema)]
pub enum DType {
    #[serde(rename = "float32")]
    F32,
    #[serde(rename = "float16")]
    F16,
    #[serde(rename = "bfloat16")]
    BF16,
    #[serde(rename = "int64")]
    I64,
    #[serde(rename = "int32")]
    I32,
    #[serde(rename = "bool")]
    Bool,
}

impl DType {
    /// Size of one element in bytes.
    pub fn size(self) -> usize {
        match self {
            DType::F32 | DType::I32 => 4,
            DType::F16 | DType::BF16 => 2,
            DType::I64 => 8,
            DType::Bool => 1,
        }
    }

    pub fn is_float(self) -> bool {
        matches!(self, DType::F32 | DType::F16 | DType::BF16)
    }
}

impl fmt::Display for DType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            DType::F32 => "f32",
            DType::F16 => "f16",
            DType::BF16 => "bf16",
            DType::I64 => "i64",
            DType::I32 => "i32",
            DType::Bool => "bool",
        })
    }
}

/// An owned host tensor.
#[derive(Clone, Debug, PartialEq)]
pub enum Tensor {
    F32(ArrayD<f32>),
    F16(ArrayD<f16>),
    BF16(ArrayD<bf16>),
    I64(ArrayD<i64>),
    I32(ArrayD<i32>),
    Bool(ArrayD<bool>),
}

macro_rules! each {
    ($t:expr, $a:ident => $e:expr) => {
        match $t {
            Tensor::F32($a) => $e,
            Tensor::F16($a) => $e,
            Tensor::BF16($a) => $e,
            Tensor::I64($a) => $e,
            Tensor::I32($a) => $e,
            Tensor::Bool($a) => $e,
        }
    };
}

impl Tensor {
    pub fn dtype(&self) -> DType {
        match self {
            Tensor::F32(_) => DType::F32,
            Tensor::F16(_) => DType::F16,
            Tensor::BF16(_) => DType::BF16,
            Tensor::I64(_) => DType::I64,
            Tensor::I32(_) => DType::I32,
            Tensor::Bool(_) => DType::Bool,
        }
    }

    pub fn shape(&self) -> &[usize] {
        each!(self, a => a.shape())
    }

    pub fn len(&self) -> usize {
        each!(self, a => a.len())
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// f32 tensor from a shape and data in standard (row-major) order.
    pub fn f32(shape: &[usize], data: Vec<f32>) -> Tensor {
        Tensor::F32(ArrayD::from_shape_vec(IxDyn(shape), data).expect("shape matches data"))
    }

    /// i64 tensor from a shape and data in standard (row-major) order.
    pub fn i64(shape: &[usize], data: Vec<i64>) -> Tensor {
        Tensor::I64(ArrayD::from_shape_vec(IxDyn(shape), data).expect("shape matches data"))
    }

    /// Converts to `dtype`. Float<->float conversions round to nearest; int<->int
    /// conversions are checked; float<->int is refused (never needed at the seam).
    pub fn to_dtype(&self, dtype: DType) -> Result<Tensor, String> {
        if self.dtype() == dtype {
            return Ok(self.clone());
        }
        let refuse = || Err(format!("cannot convert {} tensor to {}", self.dtype(), dtype));
        Ok(match (self, dtype) {
            (Tensor::F32(a), DType::F16) => Tensor::F16(a.mapv(f16::from_f32)),
            (Tensor::F32(a), DType::BF16) => Tensor::BF16(a.mapv(bf16::from_f32)),
            (Tensor::F16(a), DType::F32) => Tensor::F32(a.mapv(f32::from)),
            (Tensor::BF16(a), DType::F32) => Tensor::F32(a.mapv(f32::from)),
            (Tensor::F16(a), DType::BF16) => Tensor::BF16(a.mapv(|v| bf16::from_f32(v.to_f32()))),
            (Tensor::BF16(a), DType::F16) => Tensor::F16(a.mapv(|v| f16::from_f32(v.to_f32()))),
            (Tensor::I64(a), DType::I32) => {
                let mut bad = None;
                let out = a.mapv(|v| {
                    i32::try_from(v).unwrap_or_else(|_| {
                        bad = Some(v);
                        0
                    })
                });
                if let Some(v) = bad {
                    return Err(format!("value {v} does not fit in i32"));
                }
                Tensor::I32(out)
            }
            (Tensor::I32(a), DType::I64) => Tensor::I64(a.mapv(i64::from)),
            (Tensor::I64(a), DType::Bool) => Tensor::Bool(a.mapv(|v| v != 0)),
            (Tensor::I32(a), DType::Bool) => Tensor::Bool(a.mapv(|v| v != 0)),
            (Tensor::Bool(a), DType::I64) => Tensor::I64(a.mapv(i64::from)),
            (Tensor::Bool(a), DType::I32) => Tensor::I32(a.mapv(i32::from)),
            _ => return refuse(),
        })
    }

    /// The tensor as f32 (converting from f16/bf16), or an error for integer tensors.
    pub fn into_f32(self) -> Result<ArrayD<f32>, String> {
        match self {
            Tensor::F32(a) => Ok(a),
            other => match other.to_dtype(DType::F32)? {
                Tensor::F32(a) => Ok(a),
                _ => unreachable!(),
            },
        }
    }

    /// Raw little-endian bytes in standard layout (for device copies and hashing).
    pub fn to_bytes(&self) -> Vec<u8> {
        fn std<T: Clone>(a: &ArrayD<T>) -> Vec<T> {
            a.as_standard_layout().iter().cloned().collect()
        }
        match self {
            Tensor::F32(a) => std(a).iter().flat_map(|v| v.to_le_bytes()).collect(),
            Tensor::F16(a) => std(a).iter().flat_map(|v| v.to_le_bytes()).collect(),
            Tensor::BF16(a) => std(a).iter().flat_map(|v| v.to_le_bytes()).collect(),
            Tensor::I64(a) => std(a).iter().flat_map(|v| v.to_le_bytes()).collect(),
            Tensor::I32(a) => std(a).iter().flat_map(|v| v.to_le_bytes()).collect(),
            Tensor::Bool(a) => std(a).iter().map(|&v| v as u8).collect(),
        }
    }

    /// Rebuilds a tensor from little-endian bytes in standard layout.
    pub fn from_bytes(dtype: DType, shape: &[usize], bytes: &[u8]) -> Result<Tensor, String> {
        let n: usize = shape.iter().product();
        if bytes.len() != n * dtype.size() {
            return Err(format!("{} bytes do not hold a {dtype} tensor of shape {shape:?}", bytes.len()));
        }
        let sh = IxDyn(shape);
        macro_rules! le {
            ($t:ty, $w:expr) => {
                bytes.chunks_exact($w).map(|c| <$t>::from_le_bytes(c.try_into().unwrap())).collect::<Vec<$t>>()
            };
        }
        let arr = |e: ndarray::ShapeError| e.to_string();
        Ok(match dtype {
            DType::F32 => Tensor::F32(ArrayD::from_shape_vec(sh, le!(f32, 4)).map_err(arr)?),
            DType::F16 => Tensor::F16(ArrayD::from_shape_vec(sh, le!(f16, 2)).map_err(arr)?),
            DType::BF16 => Tensor::BF16(ArrayD::from_shape_vec(sh, le!(bf16, 2)).map_err(arr)?),
            DType::I64 => Tensor::I64(ArrayD::from_shape_vec(sh, le!(i64, 8)).map_err(arr)?),
            DType::I32 => Tensor::I32(ArrayD::from_shape_vec(sh, le!(i32, 4)).map_err(arr)?),
            DType::Bool => Tensor::Bool(ArrayD::from_shape_vec(sh, bytes.iter().map(|&b| b != 0).collect()).map_err(arr)?),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn float_round_trip_through_half_types() {
        let t = Tensor::f32(&[2, 2], vec![1.0, -2.5, 0.333, 1e-3]);
        let h = t.to_dtype(DType::F16).unwrap();
        assert_eq!(h.dtype(), DType::F16);
        let back = h.into_f32().unwrap();
        assert!((back[[1, 0]] - 0.333).abs() < 1e-3);
        let b = t.to_dtype(DType::BF16).unwrap().into_f32().unwrap();
        assert_eq!(b[[0, 1]], -2.5);
    }

    #[test]
    fn int_narrowing_is_checked() {
        let t = Tensor::i64(&[2], vec![1, i64::MAX]);
        assert!(t.to_dtype(DType::I32).unwrap_err().contains("does not fit"));
        let ok = Tensor::i64(&[2], vec![1, -7]).to_dtype(DType::I32).unwrap();
        assert_eq!(ok, Tensor::I32(ArrayD::from_shape_vec(IxDyn(&[2]), vec![1, -7]).unwrap()));
    }

    #[test]
    fn float_to_int_is_refused() {
        assert!(Tensor::f32(&[1], vec![1.0]).to_dtype(DType::I64).is_err());
    }

    #[test]
    fn bytes_round_trip() {
        let t = Tensor::i64(&[3, 1], vec![5, -1, 1 << 40]);
        let b = t.to_bytes();
        assert_eq!(b.len(), 24);
        assert_eq!(Tensor::from_bytes(DType::I64, &[3, 1], &b).unwrap(), t);
        assert!(Tensor::from_bytes(DType::I64, &[4], &b).is_err());
    }
}
