//! Engine build: plans every component (ONNX inspection, profiles, content hash) before any GPU work, then
//! compiles the changed ones with TensorRT (timing cache, content key, a record beside each plan).

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};
use std::time::Instant;

use super::memory::MemoryEstimate;
use super::verify::{Backends, Verification};
use super::{exit, BuildArgs, Error, Planned};
use crate::bundle::{Bundle, Manifest};
use crate::onnx::{self, Profile, ProfileSettings};
use crate::runtime::loader::check_fp8_device;
use crate::runtime::shim::{
    self, BuildOutput, BuildProfile, BuildSettings, BuilderLibrary, CudaRuntime, CudaStatus, ProfileInput, TrtVersion,
};

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
    /// Weights and estimated activations per profile (`builder::memory`).
    pub memory: MemoryEstimate,
    pub seconds: f64,
    pub plan_bytes: Option<u64>,
    pub timing_cache_reused: Option<bool>,
    pub verification: Option<Verification>,
    pub warnings: Vec<String>,
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

/// The GPU side of a build, opened once: builder + parser, CUDA, the device.
struct GpuEnv {
    builder: BuilderLibrary,
    cuda: CudaRuntime,
    ordinal: i32,
    version: TrtVersion,
    cc: String,
    cc_pair: (i32, i32),
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
        cc_pair: (info.cc_major, info.cc_minor),
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
    check_flags(args)?;
    let bundle = Bundle::open(&args.bundle)?;
    let settings = profile_settings(args, bundle.manifest());
    let components = selected_components(args, &bundle)?;
    let timing_path = args.timing_cache.clone().unwrap_or_else(|| bundle.dir().join("tensorrt.timing.cache"));
    report.timing_cache = Some(timing_path.display().to_string());

    // Plan every component first: input errors surface before any GPU work.
    let mut planned = Vec::new();
    for name in &components {
        let p = plan_component(&bundle, name, &settings, progress)?;
        report.components.push(p.report());
        planned.push(p);
    }
    if args.dry_run {
        progress("dry run: nothing built");
        return Ok(());
    }

    let gpu = open_gpu(args.device)?;
    report.tensorrt = Some(gpu.version.to_string());
    report.device = Some(gpu.device.clone());
    // FP8 graphs (Q/DQ with float8 weights) build only on FP8 GPUs: say so before building anything.
    let fp8: Vec<&str> = planned.iter().filter(|p| p.info.precision.fp8).map(|p| p.name.as_str()).collect();
    check_fp8_device(&fp8, gpu.cc_pair, args.device).map_err(Error::Unavailable)?;
    progress(&format!("TensorRT {} ({}) on device {} (sm {})", gpu.version, gpu.builder.path(), gpu.ordinal, gpu.cc));
    let mut builds = Builds { args, bundle: &bundle, backends: Backends::new(args.device), gpu, timing_path };
    let mut first_error: Option<Error> = None;
    for (p, r) in planned.iter().zip(&mut report.components) {
        if let Err(e) = builds.component(p, r, progress) {
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

/// Flags checked before anything is opened.
fn check_flags(args: &BuildArgs) -> Result<(), Error> {
    if let Some(l) = args.optimization_level {
        if !(0..=5).contains(&l) {
            return Err(Error::Usage(format!("--optimization-level must be 0..5, got {l}")));
        }
    }
    Ok(())
}

/// The manifest's profile settings, with the batch sizes and CFG of the flags.
fn profile_settings(args: &BuildArgs, manifest: &Manifest) -> ProfileSettings {
    let mut settings = ProfileSettings::from_manifest(manifest);
    if !args.batch_sizes.is_empty() {
        settings.batch_sizes = args.batch_sizes.clone();
    }
    settings.cfg = !args.no_cfg;
    settings
}

/// The components to build: those named by the flags (each must be in the bundle), else all of the manifest.
fn selected_components(args: &BuildArgs, bundle: &Bundle) -> Result<Vec<String>, Error> {
    if args.components.is_empty() {
        return Ok(bundle.manifest().components.keys().cloned().collect());
    }
    for c in &args.components {
        bundle.component(c)?;
    }
    Ok(args.components.clone())
}

/// Inspects, profiles and hashes one component: everything a build decides before any GPU work.
fn plan_component(
    bundle: &Bundle,
    name: &str,
    settings: &ProfileSettings,
    progress: &mut dyn FnMut(&str),
) -> Result<Planned, Error> {
    let onnx_path = bundle.onnx_path(name)?;
    progress(&format!("{name}: inspecting {}", onnx_path.display()));
    let info = onnx::inspect(&onnx_path)?;
    let profiles = onnx::derive_profiles(name, &info.inputs, settings)?;
    let mut external = bundle.external_data_paths(name)?;
    for f in &info.external_data {
        let p = onnx_path.parent().unwrap_or(Path::new(".")).join(f);
        if !external.contains(&p) {
            external.push(p);
        }
    }
    let hash = content_hash(&onnx_path, &external)?;
    let plan = bundle.plan_path(name)?;
    let memory = MemoryEstimate::of(name, &info, &profiles);
    progress(&format!("{name}: {} ({}), {} profile(s)", memory.summary(), info.precision.summary(), profiles.len()));
    for (i, (p, act)) in profiles.iter().zip(&memory.activation_bytes).enumerate() {
        progress(&format!("{name}: profile {i} (activations {}):", super::memory::gib(*act)));
        for input in &p.inputs {
            progress(&format!("  {:<28} min {:?} opt {:?} max {:?}", input.name, input.min, input.opt, input.max));
        }
    }
    Ok(Planned { name: name.to_string(), onnx: onnx_path, plan, info, profiles, hash, memory })
}

impl Planned {
    /// The component's report as planned, before any GPU work.
    fn report(&self) -> ComponentReport {
        ComponentReport {
            component: self.name.clone(),
            onnx: self.onnx.display().to_string(),
            plan: self.plan.display().to_string(),
            status: "planned".into(),
            precision: self.info.precision.summary(),
            onnx_sha256: self.hash.clone(),
            cache_key: None,
            profiles: self.profiles.clone(),
            memory: self.memory.clone(),
            seconds: 0.0,
            plan_bytes: None,
            timing_cache_reused: None,
            verification: None,
            warnings: vec![],
            error: None,
        }
    }
}

/// What the builds of every component share: the flags, the bundle, the GPU, the timing cache and the
/// comparison backends (opened on first use).
struct Builds<'a> {
    args: &'a BuildArgs,
    bundle: &'a Bundle,
    // Field order = drop order: the comparison backends before the builder's libraries.
    backends: Backends,
    gpu: GpuEnv,
    timing_path: PathBuf,
}

impl Builds<'_> {
    fn settings(&self) -> BuildSettings {
        BuildSettings {
            workspace_bytes: self.args.workspace_mib.unwrap_or(0).saturating_mul(1 << 20),
            optimization_level: self.args.optimization_level.unwrap_or(-1),
        }
    }

    /// Builds one component unless its record says it is up to date; `r` tells how it went.
    fn component(&mut self, p: &Planned, r: &mut ComponentReport, progress: &mut dyn FnMut(&str)) -> Result<(), Error> {
        let started = Instant::now();
        let settings = self.settings();
        let key = cache_key(&KeyInput {
            onnx_sha256: &p.hash,
            tensorrt: self.gpu.version.to_string(),
            compute_capability: self.gpu.cc.clone(),
            profiles: &p.profiles,
            workspace_bytes: settings.workspace_bytes,
            optimization_level: settings.optimization_level,
        });
        r.cache_key = Some(key.clone());
        if self.up_to_date(p, &key) {
            progress(&format!("{}: up to date ({})", p.name, p.plan.display()));
            r.status = "up_to_date".into();
            return Ok(());
        }
        let result = self.build_and_verify(p, &key, started, r, progress);
        r.seconds = started.elapsed().as_secs_f64();
        if let Err(e) = &result {
            progress(&format!("{}: {e}", p.name));
            r.status = "failed".into();
            r.error = Some(e.to_string());
        }
        result
    }

    /// Whether the plan exists and its record has the same content key (and passed verification, when asked).
    fn up_to_date(&self, p: &Planned, key: &str) -> bool {
        let previous: Option<EngineRecord> =
            std::fs::read(record_path(&p.plan)).ok().and_then(|b| serde_json::from_slice(&b).ok());
        !self.args.force
            && p.plan.is_file()
            && previous.as_ref().is_some_and(|r| r.cache_key == key && (self.args.no_verify || r.verified == Some(true)))
    }

    /// Compiles the engine, compares it with ONNX Runtime (unless `--no-verify`) and records the outcome beside the plan.
    fn build_and_verify(
        &mut self,
        p: &Planned,
        key: &str,
        started: Instant,
        r: &mut ComponentReport,
        progress: &mut dyn FnMut(&str),
    ) -> Result<(), Error> {
        progress(&format!("{}: building {} ({} precision)", p.name, p.plan.display(), p.info.precision.summary()));
        let out = self.compile(p)?;
        r.plan_bytes = Some(out.plan_bytes);
        r.timing_cache_reused = Some(out.timing_cache_reused);
        r.warnings = out.warnings.clone();
        r.status = "built".into();
        progress(&format!("{}: built {} bytes in {:.1}s", p.name, out.plan_bytes, started.elapsed().as_secs_f64()));

        let record_file = record_path(&p.plan);
        let mut verified = None;
        if !self.args.no_verify {
            progress(&format!("{}: comparing with ONNX Runtime on random inputs", p.name));
            let v = self.backends.check_engine(self.bundle, p, self.args)?;
            let passed = v.passed;
            let summary = v.summary();
            progress(&format!(
                "{}: {} ({})",
                p.name,
                if passed { "matches ONNX Runtime" } else { "DIFFERS from ONNX Runtime" },
                summary
            ));
            r.verification = Some(v);
            verified = Some(passed);
            if !passed {
                write_record(&record_file, key, p, &self.gpu, verified)?;
                return Err(Error::Verify {
                    component: p.name.clone(),
                    reason: format!("the engine differs from ONNX Runtime beyond atol/rtol: {summary}"),
                });
            }
        }
        write_record(&record_file, key, p, &self.gpu, verified)
    }

    /// Runs the TensorRT builder on the component's ONNX graph into its plan (through a temporary file), then
    /// saves the timing cache it updated.
    fn compile(&self, p: &Planned) -> Result<BuildOutput, Error> {
        let cache_in = std::fs::read(&self.timing_path).unwrap_or_default();
        let tmp_plan = p.plan.with_extension("plan.tmp");
        let onnx_str = p.onnx.to_str().ok_or_else(|| Error::Usage(format!("{} is not UTF-8", p.onnx.display())))?;
        let tmp_str = tmp_plan.to_str().ok_or_else(|| Error::Usage(format!("{} is not UTF-8", tmp_plan.display())))?;
        let profiles_ffi: Vec<BuildProfile> = p.profiles.iter().map(to_ffi_profile).collect();
        let gpu = &self.gpu;
        let out = gpu
            .builder
            .build(&gpu.cuda, gpu.ordinal, onnx_str, tmp_str, &profiles_ffi, &self.settings(), &cache_in)
            .map_err(|e| Error::Build { component: p.name.clone(), reason: e.to_string() })?;
        std::fs::rename(&tmp_plan, &p.plan).map_err(io_err(&p.plan))?;
        if !out.timing_cache.is_empty() {
            write_atomic(&self.timing_path, &out.timing_cache)?;
        }
        Ok(out)
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

#[cfg(test)]
mod tests {
    use super::*;

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
}
