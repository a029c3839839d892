//! `qwen-edit build` and `inspect`: compile a bundle's ONNX graphs into TensorRT engines (profiles from the
//! manifest, timing cache, content key, JSON report, CI exit codes), check each against ONNX Runtime.

use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Instant;

use crate::bundle::{self, Bundle};
use crate::onnx::{self, Profile, ProfileSettings};
use crate::runtime::shim::{
    self, BuildProfile, BuildSettings, BuilderLibrary, CudaRuntime, CudaStatus, ProfileInput, TrtVersion,
};
use crate::runtime::tensorrt::{TrtOptions, TrtWorker};
use crate::runtime::{self, DType, Dim, Engine, Tensor, TensorInfo};

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

/// The JSON report of one `build` run.
#[derive(Clone, Debug, Serialize)]
pub struct BuildReport {
    pub qwen_edit: String,
    pub bundle: String,
    pub dry_run: bool,
    pub tensorrt: Option<String>,
    pub tensorrt_headers: Option<String>,
    pub device: Option<DeviceReport>,
    pub timing_cache: Option<String>,
    pub components: Vec<ComponentReport>,
    pub exit_code: u8,
    pub error: Option<String>,
}

#[derive(Clone, Debug, Serialize)]
pub struct DeviceReport {
    pub ordinal: i32,
    pub compute_capability: String,
    pub total_bytes: usize,
}

#[derive(Clone, Debug, Serialize)]
pub struct ComponentReport {
    pub component: String,
    pub onnx: String,
    pub plan: String,
    /// planned | built | up_to_date | failed
    pub status: String,
    pub precision: String,
    pub onnx_sha256: String,
    pub cache_key: Option<String>,
    pub profiles: Vec<Profile>,
    pub seconds: f64,
    pub plan_bytes: Option<u64>,
    pub timing_cache_reused: Option<bool>,
    pub verification: Option<Verification>,
    pub warnings: Vec<String>,
    pub error: Option<String>,
}

/// The engine-vs-ONNX-Runtime comparison (polygraphy style).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Verification {
    pub shapes: VerifyShapes,
    pub seed: u64,
    pub atol: f64,
    pub rtol: f64,
    pub outputs: Vec<OutputError>,
    pub passed: bool,
}

/// Error statistics of one output: `mismatches` counts elements with |a - b| > atol + rtol * |b|.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct OutputError {
    pub name: String,
    pub elements: usize,
    pub max_abs: f64,
    pub max_rel: f64,
    pub mean_abs: f64,
    pub mismatches: usize,
    pub error: Option<String>,
}

/// Recorded beside each plan (`<plan>.json`): what it was built from, to skip unchanged rebuilds.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct EngineRecord {
    pub cache_key: String,
    pub component: String,
    pub tensorrt: String,
    pub compute_capability: String,
    pub precision: String,
    pub verified: Option<bool>,
}

/// Everything the content key covers. Same key = same engine: rebuild is skipped.
#[derive(Clone, Debug, Serialize)]
pub struct KeyInput<'a> {
    /// sha256 of the ONNX file and every external data file (names, sizes and bytes).
    pub onnx_sha256: &'a str,
    pub tensorrt: String,
    pub compute_capability: String,
    pub profiles: &'a [Profile],
    pub workspace_bytes: u64,
    pub optimization_level: i32,
}

/// The content key: sha256 over a canonical JSON of `k`.
pub fn cache_key(k: &KeyInput) -> String {
    let mut h = Sha256::new();
    h.update(b"qwen-edit engine key v1\n");
    h.update(serde_json::to_vec(k).unwrap_or_default());
    hex(&h.finalize())
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// sha256 over the ONNX file and its external data files, in that order: for each its file name,
/// byte length and bytes (streamed, never held in memory at once).
pub fn content_hash(onnx: &Path, external: &[PathBuf]) -> Result<String, Error> {
    let mut h = Sha256::new();
    for p in std::iter::once(&onnx.to_path_buf()).chain(external) {
        let io = |source| Error::Onnx(onnx::Error::Io { path: p.clone(), source });
        let mut f = std::fs::File::open(p).map_err(io)?;
        let len = f.metadata().map_err(io)?.len();
        h.update(p.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default().as_bytes());
        h.update([0u8]);
        h.update(len.to_le_bytes());
        std::io::copy(&mut f, &mut h).map_err(io)?;
    }
    Ok(hex(&h.finalize()))
}

/// Default tolerances for a graph's precision (see `Precision::summary`).
pub fn default_tolerance(precision: &str) -> (f64, f64) {
    match precision {
        "fp32" => (1e-2, 1e-2), // TensorRT uses TF32 for fp32 matmuls by default
        "fp16" => (2e-2, 2e-2),
        "bf16" | "mixed" => (5e-2, 5e-2),
        _ => (1e-1, 1e-1), // fp8 / int8
    }
}

/// Deterministic random inputs at `shapes`, valid for the IO contract of engines/README.md:
/// masks 1, `position_ids` 0..seq, `window_index` a permutation (identity), segment ids 0,
/// `image_embed_index` -1, token ids small, `timestep` in [0, 1), RoPE tables cos/sin of angles,
/// other floats ~ N(0, 1).
pub fn random_inputs(infos: &[TensorInfo], shapes: &[Vec<usize>], seed: u64) -> Result<Vec<(String, Tensor)>, String> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut out = Vec::new();
    for (info, shape) in infos.iter().zip(shapes) {
        let n: usize = shape.iter().product();
        let name = info.name.as_str();
        let t = if info.dtype.is_float() {
            let v: Vec<f32> = if name == "timestep" {
                (0..n).map(|_| rng.random::<f32>()).collect()
            } else if name.ends_with("_cos") || name.ends_with("_sin") {
                let cos = name.ends_with("_cos");
                (0..n)
                    .map(|_| {
                        let a = rng.random::<f32>() * std::f32::consts::TAU;
                        if cos {
                            a.cos()
                        } else {
                            a.sin()
                        }
                    })
                    .collect()
            } else {
                (0..n)
                    .map(|_| {
                        // Box-Muller
                        let u1 = rng.random::<f32>().max(f32::MIN_POSITIVE);
                        let u2 = rng.random::<f32>();
                        (-2.0 * u1.ln()).sqrt() * (std::f32::consts::TAU * u2).cos()
                    })
                    .collect()
            };
            Tensor::f32(shape, v).to_dtype(info.dtype)?
        } else {
            let last = shape.last().copied().unwrap_or(1).max(1);
            let v: Vec<i64> = match name {
                _ if name.ends_with("mask") => vec![1; n],
                "position_ids" => (0..n).map(|i| (i % last) as i64).collect(),
                "window_index" => (0..n as i64).collect(),
                "image_embed_index" => vec![-1; n],
                "input_ids" => (0..n).map(|_| rng.random_range(0..100)).collect(),
                "vision_pos_ids" => {
                    let side = ((shape.first().copied().unwrap_or(1) as f64).sqrt().ceil() as usize).max(1);
                    (0..n).map(|i| if i % 2 == 0 { ((i / 2) / side) as i64 } else { ((i / 2) % side) as i64 }).collect()
                }
                "modulate_index" => (0..n).map(|i| i64::from(i % last >= last / 2)).collect(),
                _ => vec![0; n],
            };
            Tensor::i64(shape, v).to_dtype(info.dtype)?
        };
        out.push((info.name.clone(), t));
    }
    Ok(out)
}

/// Compares `candidate` against `reference` element-wise (allclose: |a - b| <= atol + rtol * |b|).
pub fn compare(name: &str, reference: &Tensor, candidate: &Tensor, atol: f64, rtol: f64) -> OutputError {
    let mut e = OutputError {
        name: name.into(),
        elements: reference.len(),
        max_abs: 0.0,
        max_rel: 0.0,
        mean_abs: 0.0,
        mismatches: 0,
        error: None,
    };
    if reference.shape() != candidate.shape() {
        e.error = Some(format!("shape {:?} vs reference {:?}", candidate.shape(), reference.shape()));
        e.mismatches = reference.len().max(1);
        return e;
    }
    let as_f64 = |t: &Tensor| -> Vec<f64> {
        match t.to_dtype(DType::F32).or_else(|_| t.to_dtype(DType::I64)) {
            Ok(Tensor::F32(a)) => a.iter().map(|&x| x as f64).collect(),
            Ok(Tensor::I64(a)) => a.iter().map(|&x| x as f64).collect(),
            _ => Vec::new(),
        }
    };
    let (r, c) = (as_f64(reference), as_f64(candidate));
    let mut sum = 0.0;
    for (&b, &a) in r.iter().zip(&c) {
        let d = (a - b).abs();
        let d = if d.is_nan() { f64::INFINITY } else { d };
        sum += d;
        e.max_abs = e.max_abs.max(d);
        e.max_rel = e.max_rel.max(d / b.abs().max(1e-12));
        if d > atol + rtol * b.abs() {
            e.mismatches += 1;
        }
    }
    e.mean_abs = if r.is_empty() { 0.0 } else { sum / r.len() as f64 };
    e
}

/// Runs both engines on the same random inputs and compares every output of the reference.
pub fn verify(
    reference: &mut dyn Engine,
    candidate: &mut dyn Engine,
    shapes: &[Vec<usize>],
    shape_kind: VerifyShapes,
    seed: u64,
    (atol, rtol): (f64, f64),
) -> Result<Verification, runtime::Error> {
    let component = reference.component().to_string();
    let infos = reference.inputs().to_vec();
    let inputs = random_inputs(&infos, shapes, seed)
        .map_err(|reason| runtime::Error::Contract { component: component.clone(), reason })?;
    let named: Vec<(&str, &Tensor)> = inputs.iter().map(|(n, t)| (n.as_str(), t)).collect();
    let mut want = reference.run(&named)?;
    let mut got = candidate.run(&named)?;
    let mut outputs = Vec::new();
    for info in reference.outputs() {
        let Some(r) = want.take(&info.name) else { continue };
        outputs.push(match got.take(&info.name) {
            Some(c) => compare(&info.name, &r, &c, atol, rtol),
            None => OutputError {
                name: info.name.clone(),
                elements: r.len(),
                max_abs: f64::INFINITY,
                max_rel: f64::INFINITY,
                mean_abs: f64::INFINITY,
                mismatches: r.len().max(1),
                error: Some("missing from the engine's outputs".into()),
            },
        });
    }
    let passed = outputs.iter().all(|o| o.mismatches == 0 && o.error.is_none());
    Ok(Verification { shapes: shape_kind, seed, atol, rtol, outputs, passed })
}

fn io_err(path: &Path) -> impl Fn(std::io::Error) -> Error + '_ {
    move |source| Error::Io { path: path.to_path_buf(), source }
}

/// Writes `bytes` to `path` through a temporary file and a rename (no half-written files).
fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), Error> {
    let tmp = path.with_extension(format!("{}.tmp", path.extension().and_then(|e| e.to_str()).unwrap_or("")));
    std::fs::write(&tmp, bytes).map_err(io_err(&tmp))?;
    std::fs::rename(&tmp, path).map_err(io_err(path))
}

fn record_path(plan: &Path) -> PathBuf {
    let mut s = plan.as_os_str().to_owned();
    s.push(".json");
    PathBuf::from(s)
}

/// One component of a build, planned (inspected, profiled, hashed) before any GPU work.
struct Planned {
    name: String,
    onnx: PathBuf,
    plan: PathBuf,
    info: onnx::OnnxInfo,
    profiles: Vec<Profile>,
    hash: String,
}

/// The GPU side of a build, opened once: builder + parser, CUDA, the device.
struct GpuEnv {
    builder: BuilderLibrary,
    cuda: CudaRuntime,
    ordinal: i32,
    version: TrtVersion,
    cc: String,
    device: DeviceReport,
}

fn open_gpu(device: usize) -> Result<GpuEnv, Error> {
    let unavailable = |e: String| Error::Unavailable(e);
    if !shim::COMPILED {
        return Err(unavailable(shim::ShimError::NotCompiled.to_string()));
    }
    let cuda = CudaRuntime::load(&shim::cudart_candidates()).map_err(|e| unavailable(e.to_string()))?;
    match cuda.status() {
        CudaStatus::Ready { .. } => {}
        CudaStatus::NoDriver { reason } | CudaStatus::NoDevice { reason } | CudaStatus::Error { reason } => {
            return Err(unavailable(reason))
        }
    }
    let ordinal = i32::try_from(device).map_err(|_| Error::Usage(format!("device {device} out of range")))?;
    let info = cuda.device(ordinal).map_err(|e| unavailable(e.to_string()))?;
    let builder =
        BuilderLibrary::load(&shim::nvinfer_candidates(), &shim::parser_candidates()).map_err(|e| unavailable(e.to_string()))?;
    let version = builder.version().ok_or_else(|| unavailable("the TensorRT library reports no version".into()))?;
    let cc = format!("{}.{}", info.cc_major, info.cc_minor);
    Ok(GpuEnv {
        builder,
        cuda,
        ordinal,
        version,
        device: DeviceReport { ordinal, compute_capability: cc.clone(), total_bytes: info.total_bytes },
        cc,
    })
}

/// Runs `build`: never panics; the report carries the exit code and the first error.
pub fn build(args: &BuildArgs, progress: &mut dyn FnMut(&str)) -> BuildReport {
    let mut report = BuildReport {
        qwen_edit: env!("CARGO_PKG_VERSION").into(),
        bundle: args.bundle.display().to_string(),
        dry_run: args.dry_run,
        tensorrt: None,
        tensorrt_headers: shim::header_version().map(|v| v.to_string()),
        device: None,
        timing_cache: None,
        components: vec![],
        exit_code: exit::OK,
        error: None,
    };
    if let Err(e) = build_into(args, &mut report, progress) {
        progress(&format!("error: {e}"));
        report.exit_code = e.exit_code();
        report.error = Some(e.to_string());
    }
    report
}

fn build_into(args: &BuildArgs, report: &mut BuildReport, progress: &mut dyn FnMut(&str)) -> Result<(), Error> {
    if let Some(l) = args.optimization_level {
        if !(0..=5).contains(&l) {
            return Err(Error::Usage(format!("--optimization-level must be 0..5, got {l}")));
        }
    }
    let bundle = Bundle::open(&args.bundle)?;
    let manifest = bundle.manifest();
    let mut settings = ProfileSettings::from_manifest(manifest);
    if !args.batch_sizes.is_empty() {
        settings.batch_sizes = args.batch_sizes.clone();
    }
    settings.cfg = !args.no_cfg;
    let components: Vec<String> = if args.components.is_empty() {
        manifest.components.keys().cloned().collect()
    } else {
        for c in &args.components {
            bundle.component(c)?;
        }
        args.components.clone()
    };
    let timing_path = args.timing_cache.clone().unwrap_or_else(|| bundle.dir().join("tensorrt.timing.cache"));
    report.timing_cache = Some(timing_path.display().to_string());

    // Plan every component first: input errors surface before any GPU work.
    let mut planned = Vec::new();
    for name in &components {
        let onnx_path = bundle.onnx_path(name)?;
        progress(&format!("{name}: inspecting {}", onnx_path.display()));
        let info = onnx::inspect(&onnx_path)?;
        let profiles = onnx::derive_profiles(name, &info.inputs, &settings)?;
        let mut external = bundle.external_data_paths(name)?;
        for f in &info.external_data {
            let p = onnx_path.parent().unwrap_or(Path::new(".")).join(f);
            if !external.contains(&p) {
                external.push(p);
            }
        }
        let hash = content_hash(&onnx_path, &external)?;
        let plan = bundle.plan_path(name)?;
        report.components.push(ComponentReport {
            component: name.clone(),
            onnx: onnx_path.display().to_string(),
            plan: plan.display().to_string(),
            status: "planned".into(),
            precision: info.precision.summary(),
            onnx_sha256: hash.clone(),
            cache_key: None,
            profiles: profiles.clone(),
            seconds: 0.0,
            plan_bytes: None,
            timing_cache_reused: None,
            verification: None,
            warnings: vec![],
            error: None,
        });
        planned.push(Planned { name: name.clone(), onnx: onnx_path, plan, info, profiles, hash });
    }
    if args.dry_run {
        progress("dry run: nothing built");
        return Ok(());
    }

    let gpu = open_gpu(args.device)?;
    report.tensorrt = Some(gpu.version.to_string());
    report.device = Some(gpu.device.clone());
    progress(&format!("TensorRT {} ({}) on device {} (sm {})", gpu.version, gpu.builder.path(), gpu.ordinal, gpu.cc));
    let mut worker: Option<TrtWorker> = None;
    let mut ort: Option<runtime::ort::OrtBackend> = None;
    let mut first_error: Option<Error> = None;

    for (i, p) in planned.iter().enumerate() {
        let started = Instant::now();
        let settings_ffi = BuildSettings {
            workspace_bytes: args.workspace_mib.unwrap_or(0).saturating_mul(1 << 20),
            optimization_level: args.optimization_level.unwrap_or(-1),
        };
        let key = cache_key(&KeyInput {
            onnx_sha256: &p.hash,
            tensorrt: gpu.version.to_string(),
            compute_capability: gpu.cc.clone(),
            profiles: &p.profiles,
            workspace_bytes: settings_ffi.workspace_bytes,
            optimization_level: settings_ffi.optimization_level,
        });
        report.components[i].cache_key = Some(key.clone());
        let record_file = record_path(&p.plan);
        let previous: Option<EngineRecord> = std::fs::read(&record_file).ok().and_then(|b| serde_json::from_slice(&b).ok());
        let want_verify = !args.no_verify;
        let up_to_date = !args.force
            && p.plan.is_file()
            && previous.as_ref().is_some_and(|r| r.cache_key == key && (!want_verify || r.verified == Some(true)));
        if up_to_date {
            progress(&format!("{}: up to date ({})", p.name, p.plan.display()));
            report.components[i].status = "up_to_date".into();
            continue;
        }

        let result = (|| -> Result<(), Error> {
            progress(&format!("{}: building {} ({} precision)", p.name, p.plan.display(), p.info.precision.summary()));
            let cache_in = std::fs::read(&timing_path).unwrap_or_default();
            let tmp_plan = p.plan.with_extension("plan.tmp");
            let onnx_str = p.onnx.to_str().ok_or_else(|| Error::Usage(format!("{} is not UTF-8", p.onnx.display())))?;
            let tmp_str = tmp_plan.to_str().ok_or_else(|| Error::Usage(format!("{} is not UTF-8", tmp_plan.display())))?;
            let profiles_ffi: Vec<BuildProfile> = p.profiles.iter().map(to_ffi_profile).collect();
            let out = gpu
                .builder
                .build(&gpu.cuda, gpu.ordinal, onnx_str, tmp_str, &profiles_ffi, &settings_ffi, &cache_in)
                .map_err(|e| Error::Build { component: p.name.clone(), reason: e.to_string() })?;
            std::fs::rename(&tmp_plan, &p.plan).map_err(io_err(&p.plan))?;
            if !out.timing_cache.is_empty() {
                write_atomic(&timing_path, &out.timing_cache)?;
            }
            let r = &mut report.components[i];
            r.plan_bytes = Some(out.plan_bytes);
            r.timing_cache_reused = Some(out.timing_cache_reused);
            r.warnings = out.warnings.clone();
            r.status = "built".into();
            progress(&format!("{}: built {} bytes in {:.1}s", p.name, out.plan_bytes, started.elapsed().as_secs_f64()));

            let mut verified = None;
            if want_verify {
                progress(&format!("{}: comparing with ONNX Runtime on random inputs", p.name));
                if worker.is_none() {
                    let w = TrtWorker::open(TrtOptions { device: args.device, ..TrtOptions::default() })
                        .map_err(|e| Error::Unavailable(e.to_string()))?;
                    worker = Some(w);
                }
                if ort.is_none() {
                    ort = Some(
                        runtime::ort::OrtBackend::new(Default::default())
                            .map_err(|e| Error::Unavailable(format!("ONNX Runtime (the reference): {e}")))?,
                    );
                }
                let (Some(w), Some(o)) = (worker.as_ref(), ort.as_ref()) else {
                    return Err(Error::Unavailable("verification backends missing".into()));
                };
                let component = bundle.component(&p.name)?;
                let mut reference = o.load(&p.name, &p.onnx).map_err(|e| Error::Unavailable(format!("ONNX Runtime: {e}")))?;
                let mut candidate = w.load(&p.name, &p.plan, Some((&component.inputs, &component.outputs))).map_err(|e| {
                    Error::Build { component: p.name.clone(), reason: format!("the new engine does not load: {e}") }
                })?;
                let shapes = shapes_of(&p.profiles, reference.inputs(), args.verify_shapes);
                let (da, dr) = default_tolerance(&p.info.precision.summary());
                let v = verify(
                    &mut reference,
                    &mut candidate,
                    &shapes,
                    args.verify_shapes,
                    args.seed,
                    (args.atol.unwrap_or(da), args.rtol.unwrap_or(dr)),
                )
                .map_err(|e| Error::Verify { component: p.name.clone(), reason: format!("the engine failed to run: {e}") })?;
                let passed = v.passed;
                let summary: Vec<String> = v
                    .outputs
                    .iter()
                    .map(|o| {
                        format!("{} max abs {:.3e} max rel {:.3e} ({} mismatches)", o.name, o.max_abs, o.max_rel, o.mismatches)
                    })
                    .collect();
                progress(&format!(
                    "{}: {} ({})",
                    p.name,
                    if passed { "matches ONNX Runtime" } else { "DIFFERS from ONNX Runtime" },
                    summary.join("; ")
                ));
                report.components[i].verification = Some(v);
                verified = Some(passed);
                if !passed {
                    write_record(&record_file, &key, p, &gpu, verified)?;
                    return Err(Error::Verify {
                        component: p.name.clone(),
                        reason: format!("the engine differs from ONNX Runtime beyond atol/rtol: {}", summary.join("; ")),
                    });
                }
            }
            write_record(&record_file, &key, p, &gpu, verified)
        })();
        let r = &mut report.components[i];
        r.seconds = started.elapsed().as_secs_f64();
        if let Err(e) = result {
            progress(&format!("{}: {e}", p.name));
            r.status = "failed".into();
            r.error = Some(e.to_string());
            if matches!(e, Error::Unavailable(_)) {
                return Err(e); // nothing else can work either
            }
            first_error.get_or_insert(e);
        }
    }
    match first_error {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

fn write_record(path: &Path, key: &str, p: &Planned, gpu: &GpuEnv, verified: Option<bool>) -> Result<(), Error> {
    let record = EngineRecord {
        cache_key: key.into(),
        component: p.name.clone(),
        tensorrt: gpu.version.to_string(),
        compute_capability: gpu.cc.clone(),
        precision: p.info.precision.summary(),
        verified,
    };
    let bytes = serde_json::to_vec_pretty(&record)
        .map_err(|e| Error::Io { path: path.to_path_buf(), source: std::io::Error::other(e) })?;
    write_atomic(path, &bytes)
}

fn to_ffi_profile(p: &Profile) -> BuildProfile {
    let dims = |v: &[usize]| v.iter().map(|&d| d as i64).collect::<Vec<i64>>();
    BuildProfile {
        inputs: p
            .inputs
            .iter()
            .map(|i| ProfileInput { name: i.name.clone(), min: dims(&i.min), opt: dims(&i.opt), max: dims(&i.max) })
            .collect(),
    }
}

/// The comparison shapes of `inputs` from the first profile.
fn shapes_of(profiles: &[Profile], inputs: &[TensorInfo], kind: VerifyShapes) -> Vec<Vec<usize>> {
    inputs
        .iter()
        .map(|info| {
            let p = profiles.first().and_then(|p| p.inputs.iter().find(|i| i.name == info.name));
            match (p, kind) {
                (Some(p), VerifyShapes::Min) => p.min.clone(),
                (Some(p), VerifyShapes::Opt) => p.opt.clone(),
                (None, _) => info.shape.iter().map(|d| if let Dim::Fixed(n) = d { *n } else { 1 }).collect(),
            }
        })
        .collect()
}

// ---------------------------------------------------------------------------------------------
// inspect

/// What `inspect` found in a file.
#[derive(Clone, Debug, Serialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum Inspection {
    Onnx { path: String, info: onnx::OnnxInfo },
    Engine { path: String, tensorrt: Option<String>, inputs: Vec<TensorInfo>, outputs: Vec<TensorInfo>, profiles: Vec<String> },
}

impl fmt::Display for Inspection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let list = |f: &mut fmt::Formatter<'_>, title: &str, v: &[TensorInfo]| -> fmt::Result {
            writeln!(f, "{title}:")?;
            for t in v {
                writeln!(f, "  {t}")?;
            }
            Ok(())
        };
        match self {
            Inspection::Onnx { path, info } => {
                let opsets: Vec<String> =
                    info.opsets.iter().map(|(d, v)| format!("{}:{v}", if d.is_empty() { "ai.onnx" } else { d })).collect();
                writeln!(f, "ONNX model {path}")?;
                writeln!(
                    f,
                    "  ir {}, opsets {}, producer {:?}, {} nodes, {} initializers, precision {}",
                    info.ir_version,
                    opsets.join(" "),
                    info.producer,
                    info.nodes,
                    info.initializers,
                    info.precision.summary()
                )?;
                list(f, "inputs", &info.inputs)?;
                list(f, "outputs", &info.outputs)?;
                if info.external_data.is_empty() {
                    writeln!(f, "external data: none")
                } else {
                    writeln!(f, "external data: {}", info.external_data.join(", "))
                }
            }
            Inspection::Engine { path, tensorrt, inputs, outputs, profiles } => {
                writeln!(f, "TensorRT engine {path} (TensorRT {})", tensorrt.as_deref().unwrap_or("?"))?;
                list(f, "inputs", inputs)?;
                list(f, "outputs", outputs)?;
                writeln!(f, "profiles:")?;
                for p in profiles {
                    writeln!(f, "  {p}")?;
                }
                Ok(())
            }
        }
    }
}

/// Inspects an `.onnx` graph (no GPU needed) or a TensorRT engine (`.plan`/`.engine`, needs the GPU stack).
pub fn inspect(path: &Path, device: usize) -> Result<Inspection, Error> {
    let ext = path.extension().and_then(|e| e.to_str()).unwrap_or("").to_ascii_lowercase();
    match ext.as_str() {
        "onnx" => Ok(Inspection::Onnx { path: path.display().to_string(), info: onnx::inspect(path)? }),
        "plan" | "engine" | "trt" => {
            if !path.is_file() {
                return Err(Error::Usage(format!("{} does not exist", path.display())));
            }
            let worker = TrtWorker::open(TrtOptions { device, graph_cache: 0, ..TrtOptions::default() })
                .map_err(|e| Error::Unavailable(format!("cannot inspect a TensorRT engine here: {e}")))?;
            let engine = worker.load("engine", path, None).map_err(|e| Error::Usage(e.to_string()))?;
            let profiles = engine
                .profiles()
                .iter()
                .enumerate()
                .map(|(k, p)| {
                    let parts: Vec<String> = engine
                        .inputs()
                        .iter()
                        .enumerate()
                        .map(|(i, t)| format!("{} {:?}..{:?}", t.name, p.min[i], p.max[i]))
                        .collect();
                    format!("{k}: {}", parts.join(", "))
                })
                .collect();
            Ok(Inspection::Engine {
                path: path.display().to_string(),
                tensorrt: worker.tensorrt_version().map(|v| v.to_string()),
                inputs: engine.inputs().to_vec(),
                outputs: engine.outputs().to_vec(),
                profiles,
            })
        }
        _ => Err(Error::Usage(format!("{}: expected a .onnx graph or a .plan/.engine TensorRT engine", path.display()))),
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
    use crate::runtime::Outputs;

    fn profile() -> Vec<Profile> {
        vec![Profile {
            inputs: vec![onnx::InputProfile { name: "x".into(), min: vec![1, 16], opt: vec![4, 16], max: vec![8, 16] }],
        }]
    }

    fn key(onnx: &str, trt: &str, cc: &str, profiles: &[Profile], ws: u64) -> String {
        cache_key(&KeyInput {
            onnx_sha256: onnx,
            tensorrt: trt.into(),
            compute_capability: cc.into(),
            profiles,
            workspace_bytes: ws,
            optimization_level: -1,
        })
    }

    #[test]
    fn cache_key_changes_with_every_input() {
        let p = profile();
        let base = key("aa", "11.4.0", "8.9", &p, 0);
        assert_eq!(base, key("aa", "11.4.0", "8.9", &p, 0), "deterministic");
        assert_eq!(base.len(), 64);
        assert_ne!(base, key("ab", "11.4.0", "8.9", &p, 0), "ONNX content");
        assert_ne!(base, key("aa", "11.4.1", "8.9", &p, 0), "TensorRT version");
        assert_ne!(base, key("aa", "11.4.0", "9.0", &p, 0), "GPU");
        assert_ne!(base, key("aa", "11.4.0", "8.9", &p, 1 << 30), "flags");
        let mut p2 = profile();
        p2[0].inputs[0].max = vec![16, 16];
        assert_ne!(base, key("aa", "11.4.0", "8.9", &p2, 0), "profiles");
    }

    #[test]
    fn content_hash_covers_external_data() {
        let dir = tempfile::tempdir().unwrap();
        let onnx = dir.path().join("m.onnx");
        let data = dir.path().join("m.onnx.data");
        std::fs::write(&onnx, b"graph").unwrap();
        std::fs::write(&data, b"weights-1").unwrap();
        let a = content_hash(&onnx, std::slice::from_ref(&data)).unwrap();
        assert_eq!(a, content_hash(&onnx, std::slice::from_ref(&data)).unwrap());
        std::fs::write(&data, b"weights-2").unwrap();
        assert_ne!(a, content_hash(&onnx, std::slice::from_ref(&data)).unwrap(), "a weight change changes the key");
        assert_ne!(content_hash(&onnx, &[]).unwrap(), content_hash(&onnx, std::slice::from_ref(&data)).unwrap());
        // Moving bytes between the two files changes it too (lengths are hashed).
        std::fs::write(&onnx, b"graphw").unwrap();
        std::fs::write(&data, b"eights-2").unwrap();
        assert_ne!(a, content_hash(&onnx, &[data]).unwrap());
        assert!(matches!(content_hash(&dir.path().join("none.onnx"), &[]), Err(Error::Onnx(_))));
    }

    fn ti(name: &str, dtype: DType, shape: Vec<Dim>) -> TensorInfo {
        TensorInfo { name: name.into(), dtype, shape }
    }

    #[test]
    fn random_inputs_respect_the_contract() {
        let infos = vec![
            ti("attention_mask", DType::I64, vec![Dim::Dynamic("batch".into()), Dim::Dynamic("seq".into())]),
            ti("position_ids", DType::I64, vec![Dim::Fixed(3), Dim::Dynamic("batch".into()), Dim::Dynamic("seq".into())]),
            ti("window_index", DType::I64, vec![Dim::Dynamic("units".into())]),
            ti("image_embed_index", DType::I64, vec![Dim::Dynamic("batch".into()), Dim::Dynamic("seq".into())]),
            ti("timestep", DType::F32, vec![Dim::Dynamic("batch".into())]),
            ti("img_cos", DType::BF16, vec![Dim::Dynamic("img_seq".into()), Dim::Fixed(4)]),
            ti("hidden_states", DType::F16, vec![Dim::Fixed(2), Dim::Fixed(3)]),
        ];
        let shapes = vec![vec![2, 5], vec![3, 2, 5], vec![6], vec![2, 5], vec![2], vec![3, 4], vec![2, 3]];
        let a = random_inputs(&infos, &shapes, 7).unwrap();
        assert_eq!(a, random_inputs(&infos, &shapes, 7).unwrap(), "deterministic per seed");
        assert_ne!(a, random_inputs(&infos, &shapes, 8).unwrap());
        let get = |n: &str| a.iter().find(|(k, _)| k == n).map(|(_, t)| t.clone()).unwrap();
        assert_eq!(get("attention_mask"), Tensor::i64(&[2, 5], vec![1; 10]));
        assert_eq!(get("window_index"), Tensor::i64(&[6], (0..6).collect()));
        assert_eq!(get("image_embed_index"), Tensor::i64(&[2, 5], vec![-1; 10]));
        match get("position_ids") {
            Tensor::I64(p) => assert_eq!(p.iter().take(5).copied().collect::<Vec<_>>(), vec![0, 1, 2, 3, 4]),
            t => panic!("{t:?}"),
        }
        let ts = get("timestep").into_f32().unwrap();
        assert!(ts.iter().all(|&t| (0.0..1.0).contains(&t)));
        assert_eq!(get("img_cos").dtype(), DType::BF16);
        assert!(get("img_cos").into_f32().unwrap().iter().all(|&c| c.abs() <= 1.0));
        assert_eq!(get("hidden_states").dtype(), DType::F16);
    }

    #[test]
    fn comparison_statistics() {
        let r = Tensor::f32(&[4], vec![1.0, -2.0, 0.5, 10.0]);
        let same = compare("y", &r, &r, 0.0, 0.0);
        assert_eq!((same.mismatches, same.max_abs), (0, 0.0));
        let c = Tensor::f32(&[4], vec![1.01, -2.0, 0.501, 10.5]);
        let e = compare("y", &r, &c, 1e-2, 1e-2);
        assert!((e.max_abs - 0.5).abs() < 1e-6 && (e.max_rel - 0.05).abs() < 1e-6, "{e:?}");
        assert_eq!(e.mismatches, 1, "only 10.5 vs 10 is beyond 0.01 + 0.01*10");
        let nan = compare("y", &r, &Tensor::f32(&[4], vec![f32::NAN, -2.0, 0.5, 10.0]), 1.0, 1.0);
        assert_eq!(nan.mismatches, 1);
        let bad = compare("y", &r, &Tensor::f32(&[2, 2], vec![0.0; 4]), 1.0, 1.0);
        assert!(bad.error.unwrap().contains("shape"));
        let ints = compare("i", &Tensor::i64(&[2], vec![1, 2]), &Tensor::i64(&[2], vec![1, 3]), 0.0, 0.0);
        assert_eq!(ints.mismatches, 1);
    }

    /// A CPU engine computing y = scale * x (+ noise), to test `verify` without a GPU.
    struct Scale {
        scale: f32,
        noise: f32,
        inputs: Vec<TensorInfo>,
        outputs: Vec<TensorInfo>,
    }
    impl Scale {
        fn new(scale: f32, noise: f32) -> Scale {
            let shape = vec![Dim::Dynamic("batch".into()), Dim::Fixed(3)];
            Scale { scale, noise, inputs: vec![ti("x", DType::F32, shape.clone())], outputs: vec![ti("y", DType::F32, shape)] }
        }
    }
    impl Engine for Scale {
        fn component(&self) -> &str {
            "scale"
        }
        fn inputs(&self) -> &[TensorInfo] {
            &self.inputs
        }
        fn outputs(&self) -> &[TensorInfo] {
            &self.outputs
        }
        fn run(&mut self, inputs: &[(&str, &Tensor)]) -> Result<Outputs, runtime::Error> {
            runtime::check_inputs("scale", &self.inputs, inputs)?;
            let x = inputs[0].1.clone().into_f32().map_err(|reason| runtime::Error::Run { component: "scale".into(), reason })?;
            let y = x.mapv(|v| v * self.scale + self.noise);
            Ok(Outputs(vec![("y".into(), Tensor::F32(y))]))
        }
    }

    #[test]
    fn verify_flags_an_engine_that_differs() {
        let shapes = vec![vec![2, 3]];
        let ok =
            verify(&mut Scale::new(2.0, 0.0), &mut Scale::new(2.0, 1e-4), &shapes, VerifyShapes::Min, 1, (1e-3, 1e-3)).unwrap();
        assert!(ok.passed, "{ok:?}");
        assert_eq!(ok.outputs[0].elements, 6);
        let bad =
            verify(&mut Scale::new(2.0, 0.0), &mut Scale::new(2.1, 0.0), &shapes, VerifyShapes::Min, 1, (1e-3, 1e-3)).unwrap();
        assert!(!bad.passed && bad.outputs[0].mismatches > 0, "{bad:?}");
        let e = verify(&mut Scale::new(2.0, 0.0), &mut Scale::new(2.0, 0.0), &[vec![2, 4]], VerifyShapes::Min, 1, (1e-3, 1e-3));
        assert!(e.is_err(), "a shape outside the contract is an error, not a pass");
    }

    #[test]
    fn tolerances_follow_precision() {
        assert!(default_tolerance("fp32").0 < default_tolerance("fp16").0);
        assert!(default_tolerance("fp16").0 < default_tolerance("bf16").0);
        assert!(default_tolerance("bf16").0 < default_tolerance("fp8").0);
    }

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

    #[test]
    fn inspect_onnx_and_engine_files() {
        let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/onnx/transformer_io.onnx");
        let i = inspect(&fixture, 0).unwrap();
        let text = i.to_string();
        assert!(
            text.contains("encoder_hidden_states: f32[batch, txt_seq, 32]") && text.contains("external data: none"),
            "{text}"
        );
        let json = serde_json::to_value(&i).unwrap();
        assert_eq!(json["kind"], "onnx");
        // An engine file needs the GPU stack: here a clean "unavailable" error, even for garbage bytes.
        let dir = tempfile::tempdir().unwrap();
        let plan = dir.path().join("x.plan");
        std::fs::write(&plan, b"not an engine").unwrap();
        match inspect(&plan, 0) {
            Err(e @ Error::Unavailable(_)) => assert!(e.to_string().contains("cannot inspect a TensorRT engine here"), "{e}"),
            Err(e) => assert_eq!(e.exit_code(), exit::INPUT, "{e}"), // a GPU host: corrupt plan rejected
            Ok(_) => panic!("garbage is not an engine"),
        }
        assert_eq!(inspect(&dir.path().join("missing.plan"), 0).unwrap_err().exit_code(), exit::INPUT);
        assert_eq!(inspect(&dir.path().join("notes.txt"), 0).unwrap_err().exit_code(), exit::INPUT);
    }
}
