//! `qwen-edit build` and `inspect`: compile a bundle's ONNX graphs into TensorRT engines (profiles from the
//! manifest, timing cache, content key, JSON report, CI exit codes), check each against ONNX Runtime.

mod build;
mod inspect;
pub mod memory;
mod verify;

use serde::{Deserialize, Serialize};
use std::path::PathBuf;

use crate::{bundle, onnx};

pub use build::{build, cache_key, content_hash, BuildReport, ComponentReport, DeviceReport, EngineRecord, KeyInput};
pub use inspect::{inspect, Inspection};
pub use verify::{compare, default_tolerance, random_inputs, verify, OutputError, Verification};

/// One component of a build, planned (inspected, profiled, hashed) before any GPU work.
pub(super) struct Planned {
    pub(super) name: String,
    pub(super) onnx: PathBuf,
    pub(super) plan: PathBuf,
    pub(super) info: onnx::OnnxInfo,
    pub(super) profiles: Vec<onnx::Profile>,
    pub(super) hash: String,
    pub(super) memory: memory::MemoryEstimate,
}

/// Exit codes of `build` and `inspect` (documented in docs/tensorrt.md).
pub mod exit {
    /// Every engine built or already up to date (and verified when asked); `--dry-run` planned.
    pub const OK: u8 = 0;
    /// Unexpected failure (for example the report or a plan could not be written).
    pub const INTERNAL: u8 = 1;
    /// Bad input: bundle, manifest or ONNX invalid, unknown component, profiles not derivable, bad flags.
    pub const INPUT: u8 = 2;
    /// No GPU build environment: shim not compiled, TensorRT/parser/CUDA library missing, no driver or device.
    pub const UNAVAILABLE: u8 = 3;
    /// TensorRT failed to parse or build an engine.
    pub const BUILD_FAILED: u8 = 4;
    /// An engine built but differs from ONNX Runtime beyond tolerance (or failed to run).
    pub const VERIFY_FAILED: u8 = 5;
}

/// Errors of the build step; each maps to one exit code.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Bundle(#[from] bundle::Error),
    #[error(transparent)]
    Onnx(#[from] onnx::Error),
    #[error("{0}")]
    Usage(String),
    #[error("no GPU build environment: {0}")]
    Unavailable(String),
    #[error("building {component} failed: {reason}")]
    Build { component: String, reason: String },
    #[error("{component}: {reason}")]
    Verify { component: String, reason: String },
    #[error("cannot write {path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
}

impl Error {
    pub fn exit_code(&self) -> u8 {
        match self {
            Error::Bundle(_) | Error::Onnx(_) | Error::Usage(_) => exit::INPUT,
            Error::Unavailable(_) => exit::UNAVAILABLE,
            Error::Build { .. } => exit::BUILD_FAILED,
            Error::Verify { .. } => exit::VERIFY_FAILED,
            Error::Io { .. } => exit::INTERNAL,
        }
    }
}

/// Which profile shapes the ORT comparison runs at.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum VerifyShapes {
    /// The smallest shapes (cheap on CPU even for the real models).
    #[default]
    Min,
    /// The shapes TensorRT tuned for.
    Opt,
}

/// `qwen-edit build` flags.
#[derive(Clone, Debug, clap::Args)]
pub struct BuildArgs {
    /// Model bundle directory (manifest.json + .onnx files); engines are written beside the .onnx files.
    #[arg(long, env = "QWEN_EDIT_BUNDLE", default_value = "engines/tiny")]
    pub bundle: PathBuf,
    /// Components to build (default: every component of the manifest).
    #[arg(long = "component", value_name = "NAME")]
    pub components: Vec<String>,
    /// CUDA device to build on.
    #[arg(long, default_value_t = 0)]
    pub device: usize,
    /// Timing cache reused across builds (default: <bundle>/tensorrt.timing.cache).
    #[arg(long)]
    pub timing_cache: Option<PathBuf>,
    /// Rebuild even when the content key says the engine is up to date.
    #[arg(long)]
    pub force: bool,
    /// Derive profiles and content hashes, print the report, build nothing (no GPU needed).
    #[arg(long)]
    pub dry_run: bool,
    /// Skip the comparison against ONNX Runtime.
    #[arg(long)]
    pub no_verify: bool,
    /// Shapes of the comparison inputs.
    #[arg(long, value_enum, default_value_t = VerifyShapes::Min)]
    pub verify_shapes: VerifyShapes,
    /// Absolute tolerance of the comparison (default by precision: fp32 1e-2, fp16 2e-2, bf16 5e-2, fp8/int8 1e-1).
    #[arg(long)]
    pub atol: Option<f64>,
    /// Relative tolerance of the comparison (same defaults as --atol).
    #[arg(long)]
    pub rtol: Option<f64>,
    /// Seed of the random comparison inputs.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Builder workspace limit in MiB (default: TensorRT's, all device memory).
    #[arg(long)]
    pub workspace_mib: Option<u64>,
    /// Builder optimization level 0-5 (default: TensorRT's, 3).
    #[arg(long)]
    pub optimization_level: Option<i32>,
    /// Batch sizes to build for, overriding the manifest's profiles.batch_sizes (e.g. 1,2,4).
    #[arg(long, value_delimiter = ',')]
    pub batch_sizes: Vec<usize>,
    /// Engines are built for requests without true CFG only (halves the text/transformer batch range).
    #[arg(long)]
    pub no_cfg: bool,
    /// Write the JSON report here (default: stdout).
    #[arg(long)]
    pub report: Option<PathBuf>,
}

impl Default for BuildArgs {
    fn default() -> BuildArgs {
        BuildArgs {
            bundle: PathBuf::from("engines/tiny"),
            components: vec![],
            device: 0,
            timing_cache: None,
            force: false,
            dry_run: false,
            no_verify: false,
            verify_shapes: VerifyShapes::Min,
            atol: None,
            rtol: None,
            seed: 0,
            workspace_mib: None,
            optimization_level: None,
            batch_sizes: vec![],
            no_cfg: false,
            report: None,
        }
    }
}

/// `qwen-edit inspect` flags.
#[derive(Clone, Debug, clap::Args)]
pub struct InspectArgs {
    /// An .onnx graph or a .plan TensorRT engine.
    pub file: PathBuf,
    /// Print JSON instead of text.
    #[arg(long)]
    pub json: bool,
    /// CUDA device used to open an engine.
    #[arg(long, default_value_t = 0)]
    pub device: usize,
}

/// Entry point of `qwen-edit build`: progress on stderr, JSON report on stdout or `--report`.
pub fn main_build(args: &BuildArgs) -> u8 {
    let report = build(args, &mut |line| eprintln!("[build] {line}"));
    let json = serde_json::to_string_pretty(&report).unwrap_or_else(|e| format!("{{\"error\": \"report: {e}\"}}"));
    match &args.report {
        Some(path) => {
            if let Err(e) = std::fs::write(path, json + "\n") {
                eprintln!("[build] cannot write the report {}: {e}", path.display());
                return exit::INTERNAL;
            }
        }
        None => println!("{json}"),
    }
    report.exit_code
}

/// Entry point of `qwen-edit inspect`.
pub fn main_inspect(args: &InspectArgs) -> u8 {
    match inspect(&args.file, args.device) {
        Ok(i) => {
            if args.json {
                println!("{}", serde_json::to_string_pretty(&i).unwrap_or_default());
            } else {
                print!("{i}");
            }
            exit::OK
        }
        Err(e) => {
            eprintln!("qwen-edit inspect: {e}");
            e.exit_code()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_codes_are_distinct_and_mapped() {
        let codes = [exit::OK, exit::INTERNAL, exit::INPUT, exit::UNAVAILABLE, exit::BUILD_FAILED, exit::VERIFY_FAILED];
        let set: std::collections::BTreeSet<u8> = codes.iter().copied().collect();
        assert_eq!(set.len(), codes.len());
        assert_eq!(Error::Usage("x".into()).exit_code(), exit::INPUT);
        assert_eq!(Error::Unavailable("x".into()).exit_code(), exit::UNAVAILABLE);
        assert_eq!(Error::Build { component: "c".into(), reason: "r".into() }.exit_code(), exit::BUILD_FAILED);
        assert_eq!(Error::Verify { component: "c".into(), reason: "r".into() }.exit_code(), exit::VERIFY_FAILED);
    }
}
