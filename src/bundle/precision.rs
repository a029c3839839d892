//! The precision a bundle computes in, and `PRECISION_MODE`: what the operator asks for, checked against
//! the bundle when it opens. A bundle carries one precision (TensorRT builds its graphs strongly typed).
//!
//! `auto` runs what the bundle has. Any other mode must be what it has, else opening fails with the fix:
//! `fp8` (alias `8bit`, the Python server's name) needs a bundle whose transformer carries FP8 Q/DQ
//! (`manifest.quantization.transformer`, made by `python -m export bundle --precision fp8`); `fp32`,
//! `fp16`, `bf16` need a bundle exported in that dtype and not quantized.

use serde::Serialize;
use std::fmt;
use std::str::FromStr;

use super::{Bundle, Error, Manifest, QuantFormat};
use crate::runtime::DType;

/// What a bundle's transformer computes in (its other graphs compute in the bundle's dtype).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    Fp32,
    Fp16,
    Bf16,
    /// The transformer's linear layers in float8e4m3fn (Q/DQ), everything else in the bundle's dtype.
    Fp8,
}

impl Precision {
    pub fn as_str(self) -> &'static str {
        match self {
            Precision::Fp32 => "fp32",
            Precision::Fp16 => "fp16",
            Precision::Bf16 => "bf16",
            Precision::Fp8 => "fp8",
        }
    }

    /// The precision of graphs exported in `dtype` (None for a non-float type).
    pub fn of_dtype(dtype: DType) -> Option<Precision> {
        match dtype {
            DType::F32 => Some(Precision::Fp32),
            DType::F16 => Some(Precision::Fp16),
            DType::BF16 => Some(Precision::Bf16),
            _ => None,
        }
    }

    /// The exporter's `--dtype` value for a 16/32-bit precision.
    fn export_dtype(self) -> &'static str {
        match self {
            Precision::Fp32 => "float32",
            Precision::Fp16 => "float16",
            Precision::Bf16 | Precision::Fp8 => "bfloat16",
        }
    }
}

impl fmt::Display for Precision {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// `PRECISION_MODE` / `--precision`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
#[serde(into = "String")]
pub enum PrecisionMode {
    /// Whatever the bundle has.
    #[default]
    Auto,
    /// Exactly this precision; another bundle is a start-up error.
    Exactly(Precision),
}

impl FromStr for PrecisionMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Ok(match s.trim().to_ascii_lowercase().as_str() {
            "auto" => PrecisionMode::Auto,
            "fp32" | "float32" => PrecisionMode::Exactly(Precision::Fp32),
            "fp16" | "float16" => PrecisionMode::Exactly(Precision::Fp16),
            "bf16" | "bfloat16" => PrecisionMode::Exactly(Precision::Bf16),
            "fp8" | "8bit" | "float8" => PrecisionMode::Exactly(Precision::Fp8),
            _ => return Err(format!("`{}` is not one of auto, fp32, fp16, bf16, fp8 (or 8bit)", s.trim())),
        })
    }
}

impl fmt::Display for PrecisionMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PrecisionMode::Auto => f.write_str("auto"),
            PrecisionMode::Exactly(p) => f.write_str(p.as_str()),
        }
    }
}

impl From<PrecisionMode> for String {
    fn from(m: PrecisionMode) -> String {
        m.to_string()
    }
}

impl Manifest {
    /// Whether component `name`'s graph carries FP8 Q/DQ (declared under `quantization`).
    pub fn is_fp8(&self, name: &str) -> bool {
        self.quantization.as_ref().and_then(|q| q.get(name)).is_some_and(|q| q.format == QuantFormat::Float8E4m3fn)
    }

    /// The precision the transformer computes in: `fp8` when its graph is FP8-quantized, else the dtype's.
    pub fn precision(&self) -> Precision {
        if self.is_fp8("transformer") {
            Precision::Fp8
        } else {
            Precision::of_dtype(self.dtype).unwrap_or(Precision::Fp32)
        }
    }
}

impl Bundle {
    /// The precision this bundle runs in under `mode`, or why `mode` cannot run it and what to do.
    pub fn check_precision(&self, mode: PrecisionMode) -> Result<Precision, Error> {
        let found = self.manifest().precision();
        let PrecisionMode::Exactly(wanted) = mode else { return Ok(found) };
        if wanted == found {
            return Ok(found);
        }
        let fix = match (wanted, found) {
            (Precision::Fp8, _) => "it has no FP8 transformer: export one with `python -m export bundle --checkpoint <dir> \
                                    --out <dir> --precision fp8` (engines/README.md) and point the bundle path \
                                    (QWEN_EDIT_BUNDLE / --bundle) at it, or set PRECISION_MODE=auto to run this bundle as it is"
                .to_string(),
            (_, Precision::Fp8) => format!(
                "its transformer is quantized to FP8 (float8e4m3fn): set PRECISION_MODE=fp8 (or auto), or use a bundle \
                 exported with `--dtype {}` and without `--precision fp8`",
                wanted.export_dtype()
            ),
            _ => format!(
                "engines compute in the graphs' own types (TensorRT builds them strongly typed): use a bundle exported with \
                 `--dtype {}`, or set PRECISION_MODE=auto to run this one",
                wanted.export_dtype()
            ),
        };
        Err(Error::PrecisionMismatch { dir: self.dir().to_path_buf(), requested: wanted, found, fix })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    fn tiny() -> Bundle {
        Bundle::open(Path::new(env!("CARGO_MANIFEST_DIR")).join("engines/tiny")).unwrap()
    }

    fn with(dtype: DType, fp8: bool) -> Manifest {
        let mut m = tiny().manifest().clone();
        m.dtype = dtype;
        if fp8 {
            let text = r#"{"transformer": {"format": "float8e4m3fn", "weights": "per-channel", "activations": "per-tensor",
                "layers": 21, "kept": [], "calibration": {"method": "max", "runs": 4, "steps": 4, "calls": 32}}}"#;
            m.quantization = Some(serde_json::from_str(text).unwrap());
        }
        m
    }

    #[test]
    fn modes_parse_with_the_python_servers_names() {
        assert_eq!("auto".parse::<PrecisionMode>().unwrap(), PrecisionMode::Auto);
        assert_eq!("8bit".parse::<PrecisionMode>().unwrap(), PrecisionMode::Exactly(Precision::Fp8));
        assert_eq!(" FP8 ".parse::<PrecisionMode>().unwrap(), PrecisionMode::Exactly(Precision::Fp8));
        assert_eq!("bfloat16".parse::<PrecisionMode>().unwrap(), PrecisionMode::Exactly(Precision::Bf16));
        assert_eq!("fp16".parse::<PrecisionMode>().unwrap().to_string(), "fp16");
        let e = "4bit".parse::<PrecisionMode>().unwrap_err();
        assert!(e.contains("`4bit`") && e.contains("8bit"), "{e}");
    }

    #[test]
    fn a_bundles_precision_is_its_transformers() {
        assert_eq!(with(DType::F32, false).precision(), Precision::Fp32);
        assert_eq!(with(DType::BF16, false).precision(), Precision::Bf16);
        assert_eq!(with(DType::BF16, true).precision(), Precision::Fp8);
        assert!(with(DType::F32, true).is_fp8("transformer") && !with(DType::F32, true).is_fp8("vae_decoder"));
    }

    #[test]
    fn explicit_modes_must_match_the_bundle_and_say_how() {
        let b = tiny();
        assert_eq!(b.check_precision(PrecisionMode::Auto).unwrap(), Precision::Fp32);
        assert_eq!(b.check_precision(PrecisionMode::Exactly(Precision::Fp32)).unwrap(), Precision::Fp32);
        let e = b.check_precision(PrecisionMode::Exactly(Precision::Fp8)).unwrap_err().to_string();
        assert!(e.contains("PRECISION_MODE=fp8") && e.contains("--precision fp8") && e.contains("engines/tiny"), "{e}");
        let e = b.check_precision(PrecisionMode::Exactly(Precision::Bf16)).unwrap_err().to_string();
        assert!(e.contains("--dtype bfloat16") && e.contains("fp32"), "{e}");

        let mut q = b.clone();
        q.manifest = with(DType::F32, true);
        assert_eq!(q.check_precision(PrecisionMode::Auto).unwrap(), Precision::Fp8);
        assert_eq!(q.check_precision(PrecisionMode::Exactly(Precision::Fp8)).unwrap(), Precision::Fp8);
        let e = q.check_precision(PrecisionMode::Exactly(Precision::Fp32)).unwrap_err().to_string();
        assert!(e.contains("quantized to FP8") && e.contains("PRECISION_MODE=fp8"), "{e}");
    }
}
