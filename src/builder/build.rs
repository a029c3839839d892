//! Engine build: plans every component (ONNX inspection, profiles, content hash) before any GPU work, then
//! compiles the changed ones with TensorRT (timing cache, content key, a record beside each plan).

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};
use std::time::Instant;

use super::verify::{default_tolerance, shapes_of, verify, Verification};
use super::{exit, BuildArgs, Error};
use crate::bundle::Bundle;
use crate::onnx::{self, Profile, ProfileSettings};
use crate::runtime::shim::{
    self, BuildProfile, BuildSettings, BuilderLibrary, CudaRuntime, CudaStatus, ProfileInput, TrtVersion,
};
use crate::runtime::tensorrt::{TrtOptions, TrtWorker};
use crate::runtime::{self, Engine};

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
