//! ONNX Runtime backend (CPU reference): runs a bundle's `.onnx` graphs through `ort`.
//! The shared library is loaded at run time from the path the project's setup provides.
//!
//! Library discovery (first hit wins): an explicit path from the config, `QWEN_EDIT_ORT_LIB`,
//! `ORT_DYLIB_PATH`, then `.venv/lib/python3*/site-packages/onnxruntime/capi/libonnxruntime.so.*`
//! under the current directory and under every ancestor of the executable (what
//! `scripts/setup.sh runtime` installs). A path given explicitly (config or env) that does not exist
//! is an error, never silently replaced by a search hit.
//!
//! The library is loaded once per process (`ort::init_from`, never ort's own env-var loader, which
//! panics); a failed load leaves the process clean so a later call with a good path still works.
//! Sessions are configured like Python onnxruntime's defaults (`ORT_ENABLE_ALL`, default thread
//! count), so results match the export's onnxruntime checks. Before a session is built, each attention
//! of the graph becomes one `com.microsoft.MultiHeadAttention` (runtime::attention: flash attention
//! where ONNX Runtime has it) and each RMSNorm, tanh GELU and RoPE one node (runtime::fuse), unless
//! `OrtSettings::plain_graph` asks for the graph as it is.
//! A graph with FP8 Q/DQ (found by `qdq::scan`) gets `QDQSelectorActionTransformer` disabled, which
//! would otherwise fuse its DequantizeLinear -> MatMul into an operator without float8 kernels (the
//! export does the same).
//!
//! Thread safety: an `OrtEngine` is `Send` and is owned by the engine worker; `run` takes `&mut self`
//! (ORT sessions are not run concurrently here), so no locks are needed on the hot path.

use super::attention::{self, Summary};
use super::fuse::{self, Fused};
use super::widen::{self, Bf16Io, Twin};
use super::{check_inputs, Dim, Engine, Error, Growth, Outputs, Tensor, TensorInfo};
use crate::runtime::DType;
use half::{bf16, f16};
use ndarray::CowArray;
use ort::logging::LogLevel;
use ort::session::builder::{AutoDevicePolicy, GraphOptimizationLevel, SessionBuilder};
use ort::session::{RunOptions, Session, SessionInputValue};
use ort::value::{DynValue, TensorElementType, TensorRef, ValueType};
use serde::{Deserialize, Serialize};
use std::borrow::Cow;
use std::ffi::OsString;
use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Mutex;

/// Name used in errors for the ONNX Runtime library.
const LIBRARY: &str = "ONNX Runtime (libonnxruntime)";
/// The environment variable of this project naming the library.
pub const ENV_LIB: &str = "QWEN_EDIT_ORT_LIB";
/// The `ort` crate's conventional variable, honoured second.
pub const ENV_ORT_DYLIB: &str = "ORT_DYLIB_PATH";
/// Session option naming the directory of a model's external data when the model comes from memory.
const EXTERNAL_DATA_FOLDER: &str = "session.model_external_initializers_file_folder_path";
/// How to get the library, appended to every "library missing" error.
const FIX: &str = "run `scripts/setup.sh runtime` (installs the onnxruntime wheel into .venv), \
                   or set QWEN_EDIT_ORT_LIB to the path of libonnxruntime.so";

/// Graph optimization level of ONNX Runtime sessions.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Optimization {
    /// `ORT_DISABLE_ALL`.
    Disable,
    /// `ORT_ENABLE_BASIC`.
    Basic,
    /// `ORT_ENABLE_EXTENDED`.
    Extended,
    /// `ORT_ENABLE_LAYOUT`.
    Layout,
    /// `ORT_ENABLE_ALL`: Python onnxruntime's default, and ours.
    #[default]
    All,
}

impl Optimization {
    fn level(self) -> GraphOptimizationLevel {
        match self {
            Optimization::Disable => GraphOptimizationLevel::Disable,
            Optimization::Basic => GraphOptimizationLevel::Level1,
            Optimization::Extended => GraphOptimizationLevel::Level2,
            Optimization::Layout => GraphOptimizationLevel::Level3,
            Optimization::All => GraphOptimizationLevel::All,
        }
    }
}

impl fmt::Display for Optimization {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Optimization::Disable => "disable",
            Optimization::Basic => "basic",
            Optimization::Extended => "extended",
            Optimization::Layout => "layout",
            Optimization::All => "all",
        })
    }
}

impl FromStr for Optimization {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Ok(match s.to_ascii_lowercase().as_str() {
            "disable" | "none" | "0" => Optimization::Disable,
            "basic" | "1" => Optimization::Basic,
            "extended" | "2" => Optimization::Extended,
            "layout" | "3" => Optimization::Layout,
            "all" | "99" => Optimization::All,
            other => {
                return Err(format!("unknown graph optimization level `{other}`; use disable, basic, extended, layout or all"))
            }
        })
    }
}

/// Settings of the ONNX Runtime backend.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct OrtSettings {
    /// Path of `libonnxruntime.so`; `None` = discover it (see the module docs).
    pub library: Option<PathBuf>,
    /// Intra-op threads per session; `None` = ONNX Runtime's default (one per physical core).
    pub intra_threads: Option<usize>,
    /// Graph optimization level; the default matches Python onnxruntime (`all`).
    pub optimization: Optimization,
    /// Keep the CPU memory arena (shared, or each session's) at its high-water mark between runs (ONNX Runtime's own
    /// default). Off (the default here), every run ends by returning the arena's free memory (but the steps of a
    /// denoising loop, which repeat at the same sizes: [`Engine::repeat_runs`]), so a
    /// batch's memory is that of its largest stage, not the sum of every component's largest run
    /// ever (1 MP bundle, one edit: 2.4 GB peak instead of 6.5 GB, no slower; `pipeline::memory`).
    pub keep_arena: bool,
    /// Run the exported graph as it is: no MultiHeadAttention rewrite (runtime::attention), no fused RMSNorm,
    /// GELU or RoPE (runtime::fuse); for comparisons.
    pub plain_graph: bool,
    /// Run a bfloat16 graph as its float32 twin (runtime::widen: the weights widened, which is exact), behind its
    /// declared bfloat16 inputs and outputs (rounded to bfloat16 as a bfloat16 engine's buffers hold them). The
    /// reference side of `qwen-edit build`'s engine checks and of gpu-smoke's ONNX Runtime server; costs twice the
    /// bfloat16 weights in memory. Off, a bfloat16 graph fails to load (the CPU provider has no bfloat16 kernels).
    pub bf16_as_f32: bool,
}

/// Finds the ONNX Runtime library: `explicit`, else `QWEN_EDIT_ORT_LIB`, else `ORT_DYLIB_PATH`, else
/// a `.venv` under the current directory or an ancestor of the executable.
pub fn find_library(explicit: Option<&Path>) -> Result<PathBuf, Error> {
    let mut roots = Vec::new();
    if let Ok(cwd) = std::env::current_dir() {
        roots.push(cwd);
    }
    if let Ok(exe) = std::env::current_exe() {
        roots.extend(exe.ancestors().skip(1).map(Path::to_path_buf));
    }
    find_library_in(explicit, std::env::var_os(ENV_LIB), std::env::var_os(ENV_ORT_DYLIB), &roots)
}

/// `find_library` with its inputs made explicit (environment values and search roots).
pub fn find_library_in(
    explicit: Option<&Path>,
    env_lib: Option<OsString>,
    env_ort: Option<OsString>,
    roots: &[PathBuf],
) -> Result<PathBuf, Error> {
    let given = |path: PathBuf, origin: &str| -> Result<PathBuf, Error> {
        if path.is_file() {
            Ok(path)
        } else {
            Err(missing(format!("{origin} names {}, which does not exist; {FIX}", path.display())))
        }
    };
    if let Some(p) = explicit {
        return given(p.to_path_buf(), "the configured library path");
    }
    for (var, value) in [(ENV_LIB, env_lib), (ENV_ORT_DYLIB, env_ort)] {
        if let Some(v) = value.filter(|v| !v.is_empty()) {
            return given(PathBuf::from(v), var);
        }
    }
    for root in roots {
        if let Some(p) = search_venv(root) {
            return Ok(p);
        }
    }
    Err(missing(format!(
        "no library given ({ENV_LIB} and {ENV_ORT_DYLIB} unset) and none found in a .venv under {}; {FIX}",
        roots.first().map_or_else(|| "the current directory".to_string(), |r| r.display().to_string())
    )))
}

/// `root/.venv/lib/python3*/site-packages/onnxruntime/capi/libonnxruntime.so.*`, newest version first.
fn search_venv(root: &Path) -> Option<PathBuf> {
    let lib = root.join(".venv").join("lib");
    let mut found: Vec<(Vec<u64>, PathBuf)> = Vec::new();
    for py in std::fs::read_dir(&lib).ok()?.flatten() {
        if !py.file_name().to_string_lossy().starts_with("python3") {
            continue;
        }
        let capi = py.path().join("site-packages").join("onnxruntime").join("capi");
        let Ok(entries) = std::fs::read_dir(&capi) else { continue };
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if let Some(ver) = name.strip_prefix("libonnxruntime.so.") {
                let key = ver.split('.').map(|p| p.parse().unwrap_or(0)).collect();
                if e.path().is_file() {
                    found.push((key, e.path()));
                }
            }
        }
    }
    found.sort();
    found.pop().map(|(_, p)| p)
}

fn missing(reason: String) -> Error {
    Error::LibraryMissing { library: LIBRARY.to_string(), reason }
}

/// The process-wide ONNX Runtime environment, the library it was loaded from, and whether the shared
/// CPU arena is registered in it.
static ENVIRONMENT: Mutex<Option<(PathBuf, ort::environment::Environment, bool)>> = Mutex::new(None);

/// Loads the library at `path` once per process and returns the shared environment. Asking again
/// for the same library is free; asking for another one after a successful load is an error. A
/// failed load changes nothing, so a later call with a good path still succeeds.
/// Also returns whether the shared CPU arena is registered (see [`register_shared_arena`]).
fn environment(path: &Path) -> Result<(ort::environment::Environment, bool), Error> {
    let path = std::fs::canonicalize(path).map_err(|e| missing(format!("cannot open {}: {e}; {FIX}", path.display())))?;
    let mut guard = ENVIRONMENT.lock().unwrap_or_else(|p| p.into_inner());
    if let Some((loaded, env, arena)) = guard.as_ref() {
        if *loaded == path {
            return Ok((env.clone(), *arena));
        }
        return Err(Error::Unavailable {
            backend: "onnxruntime".into(),
            reason: format!(
                "this process already loaded ONNX Runtime from {}; it cannot also load {}",
                loaded.display(),
                path.display()
            ),
        });
    }
    let builder = ort::init_from(&path).map_err(|e| missing(format!("{e}; {FIX}")))?;
    let env = builder
        .with_name("qwen-edit")
        .with_telemetry(false)
        .with_logger(std::sync::Arc::new(log_to_tracing))
        .build()
        .map_err(|e| missing(format!("{} loaded but its environment failed: {e}", path.display())))?;
    // A custom logger starts at VERBOSE; keep ONNX Runtime's own default (warnings and worse).
    env.set_log_level(LogLevel::Warning);
    tracing::info!(library = %path.display(), "loaded ONNX Runtime");
    let arena = match register_shared_arena(&env) {
        Ok(()) => true,
        Err(e) => {
            tracing::warn!("ONNX Runtime sessions keep one arena each: the shared CPU arena could not be registered: {e}");
            false
        }
    };
    *guard = Some((path, env.clone(), arena));
    Ok((env, arena))
}

/// Registers one CPU arena allocator in the environment, which every session uses (sessions are
/// built with `session.use_env_allocators`). With an arena per session, the process held the sum of
/// the components' working sets and faulted in fresh pages for each; one arena holds the largest and
/// reuses its pages from component to component and from edit to edit.
fn register_shared_arena(env: &ort::environment::Environment) -> Result<(), String> {
    use ort::memory::{AllocationDevice, AllocatorType, MemoryInfo, MemoryType};
    use ort::AsPointer;
    let info = MemoryInfo::new(AllocationDevice::CPU, 0, AllocatorType::Arena, MemoryType::Default).map_err(|e| e.to_string())?;
    let api = ort::api();
    // SAFETY: `env` and `info` are live ONNX Runtime objects for the whole call; a null arena config
    // selects ONNX Runtime's default arena settings; ONNX Runtime copies what it keeps.
    let status = unsafe { (api.CreateAndRegisterAllocator)(env.ptr().cast_mut(), info.ptr(), std::ptr::null()) };
    if status.0.is_null() {
        return Ok(());
    }
    // SAFETY: a non-null status is a valid OrtStatus owned by us: read its message, then release it once.
    let message = unsafe { std::ffi::CStr::from_ptr((api.GetErrorMessage)(status.0)).to_string_lossy().into_owned() };
    unsafe { (api.ReleaseStatus)(status.0) };
    Err(message)
}

/// Forwards ONNX Runtime's log messages to `tracing` (so they follow the server's log format).
fn log_to_tracing(level: LogLevel, category: &str, id: &str, location: &str, message: &str) {
    match level {
        LogLevel::Verbose => tracing::trace!(target: "onnxruntime", category, id, location, "{message}"),
        LogLevel::Info => tracing::debug!(target: "onnxruntime", category, id, location, "{message}"),
        LogLevel::Warning => tracing::warn!(target: "onnxruntime", category, id, location, "{message}"),
        LogLevel::Error | LogLevel::Fatal => {
            tracing::error!(target: "onnxruntime", category, id, location, "{message}")
        }
    }
}

/// The ONNX Runtime backend: loads components as `OrtEngine`s with one set of settings.
pub struct OrtBackend {
    env: ort::environment::Environment,
    /// Sessions allocate from the environment's shared CPU arena.
    shared_arena: bool,
    library: PathBuf,
    settings: OrtSettings,
}

impl fmt::Debug for OrtBackend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("OrtBackend").field("library", &self.library).field("settings", &self.settings).finish()
    }
}

impl OrtBackend {
    /// Finds and loads the ONNX Runtime library (once per process) with these settings.
    pub fn new(settings: OrtSettings) -> Result<OrtBackend, Error> {
        if settings.intra_threads == Some(0) {
            return Err(Error::Unavailable {
                backend: "onnxruntime".into(),
                reason: "intra-op threads must be at least 1 (leave unset for the default)".into(),
            });
        }
        let library = find_library(settings.library.as_deref())?;
        let (env, shared_arena) = environment(&library)?;
        Ok(OrtBackend { env, shared_arena, library, settings })
    }

    /// The library this backend runs on.
    pub fn library(&self) -> &Path {
        &self.library
    }

    pub fn settings(&self) -> &OrtSettings {
        &self.settings
    }

    /// Loads the ONNX graph at `path` as component `component`.
    pub fn load(&self, component: &str, path: &Path) -> Result<OrtEngine, Error> {
        let load_err =
            |reason: String| Error::Load { component: component.to_string(), path: path.display().to_string(), reason };
        if !path.is_file() {
            return Err(load_err("file not found".into()));
        }
        let mut builder = Session::builder(&self.env)
            .map_err(|e| load_err(e.to_string()))?
            // Plain CPU execution provider, like Python's `providers=["CPUExecutionProvider"]`.
            .with_auto_device(AutoDevicePolicy::PreferCPU)
            .map_err(|e| load_err(e.to_string()))?
            .with_optimization_level(self.settings.optimization.level())
            .map_err(|e| load_err(e.to_string()))?
            // Within a run the pool's threads spin between operators (as torch's OpenMP threads do) instead of
            // sleeping and being woken for each: the 256x256 tiny edit 11% faster, a 512x512 edit's transformer
            // steps 3%. Every component has its own pool, and one still spinning after its run would steal the
            // cores from the next component (measured: the tiny edit took twice as long), so spinning stops
            // with each run.
            .with_intra_op_spinning(true)
            .map_err(|e| load_err(e.to_string()))?
            .with_config_entry("session.force_spinning_stop", "1")
            .map_err(|e| load_err(e.to_string()))?;
        if let Some(n) = self.settings.intra_threads {
            builder = builder.with_intra_threads(n).map_err(|e| load_err(e.to_string()))?;
        }
        if self.shared_arena {
            builder = builder.with_env_allocators().map_err(|e| load_err(e.to_string()))?;
        }
        let fp8_qdq = super::qdq::scan(path).map_err(|e| load_err(e.to_string()))?.fp8_qdq();
        if fp8_qdq {
            builder =
                builder.with_disabled_optimizers(super::qdq::ORT_FP8_DISABLED_OPTIMIZERS).map_err(|e| load_err(e.to_string()))?;
        }
        let Committed { session, attention, fused, twin } =
            self.commit(builder, component, path).map_err(|e| load_err(explain_session_error(e)))?;
        // A twin declares the bfloat16 IO of its graph (its session takes and gives float32).
        let bf16 = twin.as_ref().map(|t| &t.1);
        let io = |outlets: &[ort::value::Outlet], declared: Option<&Vec<String>>| -> Result<Vec<TensorInfo>, Error> {
            outlets
                .iter()
                .map(|o| {
                    let mut info = tensor_info(o.name(), o.dtype()).map_err(&load_err)?;
                    if declared.is_some_and(|d| d.contains(&info.name)) {
                        info.dtype = DType::BF16;
                    }
                    Ok(info)
                })
                .collect()
        };
        let inputs = io(session.inputs(), bf16.map(|b| &b.inputs))?;
        let outputs = io(session.outputs(), bf16.map(|b| &b.outputs))?;
        let run_options = if self.settings.keep_arena {
            None
        } else {
            let mut o = RunOptions::new().map_err(|e| load_err(e.to_string()))?;
            o.set("memory.enable_memory_arena_shrinkage", "cpu:0").map_err(|e| load_err(e.to_string()))?;
            Some(o)
        };
        // Flash and per-row attentions stream their scores; a masked one materialises its probabilities, a skipped
        // or un-rewritten (plain) one its whole chain.
        let streams = !self.settings.plain_graph && attention.masked == 0 && attention.skipped.is_empty();
        let growth = if streams { Growth::Linear } else { Growth::Square };
        let twin = twin.map(|t| t.0);
        Ok(OrtEngine {
            component: component.to_string(),
            session,
            inputs,
            outputs,
            run_options,
            repeating: false,
            attention,
            fused,
            growth,
            fp8_qdq,
            twin,
        })
    }
}

/// A session as [`OrtBackend::commit`] built it: what the attention and fusion rewrites did, and for a float32 twin its scratch
/// directory and the names of the inputs and outputs its graph declared bfloat16.
struct Committed {
    session: Session,
    attention: Summary,
    fused: Fused,
    twin: Option<(Twin, Bf16Io)>,
}

impl OrtBackend {
    /// Builds the session of the graph at `path`: a bfloat16 graph made its float32 twin first under
    /// `bf16_as_f32`, then its attentions, RMSNorms, GELUs and RoPEs rewritten unless `plain_graph`.
    fn commit(&self, mut builder: SessionBuilder, component: &str, path: &Path) -> Result<Committed, String> {
        use onnx_protobuf::Message;
        let from_file = |mut b: SessionBuilder| b.commit_from_file(path).map_err(|e| e.to_string());
        if self.settings.plain_graph && !self.settings.bf16_as_f32 {
            return Ok(Committed {
                session: from_file(builder)?,
                attention: Summary::default(),
                fused: Fused::default(),
                twin: None,
            });
        }
        let bytes = std::fs::read(path).map_err(|e| format!("cannot read: {e}"))?;
        let mut model =
            onnx_protobuf::ModelProto::parse_from_bytes(&bytes).map_err(|e| format!("not a valid ONNX model: {e}"))?;
        drop(bytes);
        let dir = path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
        let twin = if self.settings.bf16_as_f32 && widen::has_bf16(&model) {
            let io = widen::bf16_io(&model);
            tracing::info!(component, "bfloat16 graph: running its float32 twin (bf16_as_f32)");
            Some((widen::widen(&mut model, dir)?, io))
        } else {
            None
        };
        // The norms, GELUs and RoPEs of the transformer only: fused in the text encoder too, a job's image was no
        // longer bitwise the same alone and batched (tests/openai_client.rs, n=2 against /run), and the text
        // encoder is about 0.5% of a 1 MP edit.
        let (attention, fused) = match (self.settings.plain_graph, component) {
            (true, _) => (Summary::default(), Fused::default()),
            (false, "transformer") => (attention::rewrite(&mut model), fuse::rewrite(&mut model)),
            (false, _) => (attention::rewrite(&mut model), Fused::default()),
        };
        for s in &attention.skipped {
            tracing::warn!(component, "attention left unfused: {s}");
        }
        tracing::debug!(
            component,
            flash = attention.flash,
            per_row = attention.per_row,
            masked = attention.masked,
            rms_norms = fused.rms_norms,
            gelus = fused.gelus,
            ropes = fused.ropes,
            "fused"
        );
        if attention.rewritten() == 0 && fused == Fused::default() && twin.is_none() {
            return Ok(Committed { session: from_file(builder)?, attention, fused, twin });
        }
        // The model comes from memory: its external weights are beside the file, or in the twin's scratch directory.
        let folder = match &twin {
            Some((t, _)) => t.external_data_folder(),
            None => has_external_data(&model).then_some(dir),
        };
        if let Some(f) = folder {
            builder = builder.with_config_entry(EXTERNAL_DATA_FOLDER, f.to_string_lossy()).map_err(|e| e.to_string())?;
        }
        let bytes = model.write_to_bytes().map_err(|e| format!("cannot serialize the rewritten model: {e}"))?;
        let session = builder.commit_from_memory(&bytes).map_err(|e| e.to_string())?;
        Ok(Committed { session, attention, fused, twin })
    }
}

/// Whether some initializer keeps its data in an external file.
fn has_external_data(model: &onnx_protobuf::ModelProto) -> bool {
    use onnx_protobuf::tensor_proto::DataLocation;
    model
        .graph
        .as_ref()
        .is_some_and(|g| g.initializer.iter().any(|t| t.data_location.enum_value_or_default() == DataLocation::EXTERNAL))
}

/// What ONNX Runtime says when it cannot build a session, plus the fix where we know it: its CPU provider has no
/// bfloat16 kernels for most operators (Conv, LayerNorm, ...), so a bfloat16 bundle fails here, at start-up, never in
/// a request.
pub fn explain_session_error(msg: String) -> String {
    if msg.contains("bfloat16") {
        format!(
            "{msg}. This is a bfloat16 graph, which ONNX Runtime's CPU provider cannot run: on a machine without a GPU \
             use a float32 bundle (`python -m export bundle --dtype float32`); bfloat16 bundles are for TensorRT \
             (`qwen-edit build`, then --backend tensorrt on a GPU). To run one here anyway, as a reference, set \
             ORT_BF16_AS_F32=1 (float32 twins of the graphs: twice the weights' memory)"
        )
    } else {
        msg
    }
}

/// Our declaration of one ORT session input/output.
fn tensor_info(name: &str, ty: &ValueType) -> Result<TensorInfo, String> {
    let ValueType::Tensor { ty, shape, dimension_symbols } = ty else {
        return Err(format!("`{name}` is a {ty}, not a tensor; only tensor IO is supported"));
    };
    let dtype = dtype_of(*ty).ok_or_else(|| format!("`{name}` has element type {ty}, which the engine seam does not carry"))?;
    let shape = shape
        .iter()
        .enumerate()
        .map(|(i, &d)| match usize::try_from(d) {
            Ok(n) => Dim::Fixed(n),
            Err(_) => match dimension_symbols.get(i).filter(|s| !s.is_empty()) {
                Some(s) => Dim::Dynamic(s.clone()),
                None => Dim::Dynamic("?".into()),
            },
        })
        .collect();
    Ok(TensorInfo { name: name.to_string(), dtype, shape })
}

fn dtype_of(t: TensorElementType) -> Option<DType> {
    Some(match t {
        TensorElementType::Float32 => DType::F32,
        TensorElementType::Float16 => DType::F16,
        TensorElementType::Bfloat16 => DType::BF16,
        TensorElementType::Int64 => DType::I64,
        TensorElementType::Int32 => DType::I32,
        TensorElementType::Bool => DType::Bool,
        _ => return None,
    })
}

/// A component loaded into an ONNX Runtime session.
pub struct OrtEngine {
    component: String,
    session: Session,
    inputs: Vec<TensorInfo>,
    outputs: Vec<TensorInfo>,
    /// Run options of every run (the arena shrinkage; see [`OrtSettings::keep_arena`]).
    run_options: Option<RunOptions>,
    /// Set by [`Engine::repeat_runs`]: runs keep the arena's memory for the next one.
    repeating: bool,
    attention: Summary,
    fused: Fused,
    /// Linear when every attention of the graph streams its scores.
    growth: Growth,
    /// The graph carries FP8 Q/DQ (its session runs without the QDQ selector).
    fp8_qdq: bool,
    /// A bfloat16 graph run as its float32 twin (`OrtSettings::bf16_as_f32`): its bfloat16 IO is rounded at the
    /// session's float32 boundary. Holds the twin's scratch directory while the session lives.
    twin: Option<Twin>,
}

impl OrtEngine {
    /// What the attention rewrite did to this component's graph.
    pub fn attention(&self) -> &Summary {
        &self.attention
    }

    /// What the RMSNorm, GELU and RoPE rewrite did to this component's graph.
    pub fn fused(&self) -> Fused {
        self.fused
    }

    /// Whether the graph carries FP8 Q/DQ (and its session was built for it).
    pub fn fp8_qdq(&self) -> bool {
        self.fp8_qdq
    }
}

impl fmt::Debug for OrtEngine {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("OrtEngine")
            .field("component", &self.component)
            .field("inputs", &self.inputs)
            .field("outputs", &self.outputs)
            .finish()
    }
}

/// An input in standard layout: borrowed from the caller's tensor when it already is, else copied.
enum Contiguous<'a> {
    F32(CowArray<'a, f32, ndarray::IxDyn>),
    F16(CowArray<'a, f16, ndarray::IxDyn>),
    BF16(CowArray<'a, bf16, ndarray::IxDyn>),
    I64(CowArray<'a, i64, ndarray::IxDyn>),
    I32(CowArray<'a, i32, ndarray::IxDyn>),
    Bool(CowArray<'a, bool, ndarray::IxDyn>),
}

impl<'a> Contiguous<'a> {
    fn of(t: &'a Tensor) -> Contiguous<'a> {
        match t {
            Tensor::F32(a) => Contiguous::F32(a.as_standard_layout()),
            Tensor::F16(a) => Contiguous::F16(a.as_standard_layout()),
            Tensor::BF16(a) => Contiguous::BF16(a.as_standard_layout()),
            Tensor::I64(a) => Contiguous::I64(a.as_standard_layout()),
            Tensor::I32(a) => Contiguous::I32(a.as_standard_layout()),
            Tensor::Bool(a) => Contiguous::Bool(a.as_standard_layout()),
        }
    }

    fn value(&self) -> ort::Result<SessionInputValue<'_>> {
        Ok(match self {
            Contiguous::F32(a) => TensorRef::from_array_view(a)?.into(),
            Contiguous::F16(a) => TensorRef::from_array_view(a)?.into(),
            Contiguous::BF16(a) => TensorRef::from_array_view(a)?.into(),
            Contiguous::I64(a) => TensorRef::from_array_view(a)?.into(),
            Contiguous::I32(a) => TensorRef::from_array_view(a)?.into(),
            Contiguous::Bool(a) => TensorRef::from_array_view(a)?.into(),
        })
    }
}

/// Copies an ORT output into a host tensor, f16/bf16 widened to f32.
fn output_tensor(v: &DynValue) -> Result<Tensor, String> {
    let e = |e: ort::Error| e.to_string();
    let ty = v.dtype().tensor_type().ok_or_else(|| format!("output is a {}, not a tensor", v.dtype()))?;
    Ok(match ty {
        TensorElementType::Float32 => Tensor::F32(v.try_extract_array::<f32>().map_err(e)?.to_owned()),
        TensorElementType::Float16 => Tensor::F32(v.try_extract_array::<f16>().map_err(e)?.mapv(f32::from)),
        TensorElementType::Bfloat16 => Tensor::F32(v.try_extract_array::<bf16>().map_err(e)?.mapv(f32::from)),
        TensorElementType::Int64 => Tensor::I64(v.try_extract_array::<i64>().map_err(e)?.to_owned()),
        TensorElementType::Int32 => Tensor::I32(v.try_extract_array::<i32>().map_err(e)?.to_owned()),
        TensorElementType::Bool => Tensor::Bool(v.try_extract_array::<bool>().map_err(e)?.to_owned()),
        other => return Err(format!("output element type {other} is not supported")),
    })
}

impl Engine for OrtEngine {
    fn component(&self) -> &str {
        &self.component
    }

    fn inputs(&self) -> &[TensorInfo] {
        &self.inputs
    }

    fn outputs(&self) -> &[TensorInfo] {
        &self.outputs
    }

    fn growth(&self) -> Growth {
        self.growth
    }

    fn repeat_runs(&mut self, repeat: bool) {
        self.repeating = repeat;
    }

    fn run(&mut self, inputs: &[(&str, &Tensor)]) -> Result<Outputs, Error> {
        check_inputs(&self.component, &self.inputs, inputs)?;
        let component = self.component.clone();
        let run_err = |reason: String| Error::Run { component: component.clone(), reason };

        // Floats the graph takes in another precision are converted; everything else is borrowed. A twin's
        // bfloat16 inputs are rounded to bfloat16 and given to its session as float32.
        let mut converted: Vec<Option<Tensor>> = Vec::with_capacity(inputs.len());
        for (name, t) in inputs {
            let want = self.inputs.iter().find(|i| i.name == *name).map(|i| i.dtype).unwrap_or(t.dtype());
            let to = |t: &Tensor, d: DType| {
                t.to_dtype(d)
                    .map_err(|e| Error::Contract { component: component.clone(), reason: format!("input `{name}`: {e}") })
            };
            converted.push(match (self.twin.is_some() && want == DType::BF16, t.dtype() == want) {
                (true, _) => Some(to(&to(t, DType::BF16)?, DType::F32)?),
                (false, true) => None,
                (false, false) => Some(to(t, want)?),
            });
        }
        let arrays: Vec<Contiguous<'_>> =
            inputs.iter().zip(&converted).map(|((_, t), c)| Contiguous::of(c.as_ref().unwrap_or(t))).collect();
        let mut values: Vec<(Cow<'_, str>, SessionInputValue<'_>)> = Vec::with_capacity(inputs.len());
        for ((name, _), a) in inputs.iter().zip(&arrays) {
            let v = a.value().map_err(|e| run_err(format!("input `{name}`: {e}")))?;
            values.push((Cow::Borrowed(*name), v));
        }

        let outs = match &self.run_options {
            Some(o) if !self.repeating => self.session.run_with_options(values, o),
            _ => self.session.run(values),
        }
        .map_err(|e| run_err(e.to_string()))?;
        let mut result = Vec::with_capacity(self.outputs.len());
        for info in &self.outputs {
            let v = outs.get(&info.name).ok_or_else(|| run_err(format!("output `{}` was not produced", info.name)))?;
            let mut t = output_tensor(v).map_err(|e| run_err(format!("output `{}`: {e}", info.name)))?;
            if self.twin.is_some() && info.dtype == DType::BF16 {
                // As a bfloat16 engine returns it (widened to float32 like every 16-bit output here).
                let round = |t: &Tensor, d: DType| t.to_dtype(d).map_err(|e| run_err(format!("output `{}`: {e}", info.name)));
                t = round(&round(&t, DType::BF16)?, DType::F32)?;
            }
            result.push((info.name.clone(), t));
        }
        Ok(Outputs(result))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixture(name: &str) -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/onnx_ort").join(name)
    }

    /// A backend on the library the project's setup provides (the tests need it).
    fn backend() -> OrtBackend {
        OrtBackend::new(OrtSettings { intra_threads: Some(1), ..Default::default() })
            .unwrap_or_else(|e| panic!("ONNX Runtime is needed for these tests: {e}"))
    }

    fn load(name: &str) -> OrtEngine {
        let b = backend();
        b.load(name, &fixture(&format!("{name}.onnx"))).unwrap_or_else(|e| panic!("{e}"))
    }

    fn dyn_(s: &str) -> Dim {
        Dim::Dynamic(s.into())
    }

    /// The fixture's y = x @ W + b, computed here from the definition of W and b.
    fn matmul_add_expected(x: &[f32]) -> Vec<f32> {
        let w = |i: usize, j: usize| (3.0 * i as f32 + j as f32 - 5.0) / 4.0;
        let b = [0.5, -1.0, 0.25];
        x.chunks(4).flat_map(|row| (0..3).map(move |j| (0..4).map(|i| row[i] * w(i, j)).sum::<f32>() + b[j])).collect()
    }

    const X: [f32; 8] = [1.0, 0.5, -2.0, 3.0, 0.0, 1.0, 0.25, -1.0];

    #[test]
    fn engine_is_send() {
        fn send<T: Send>() {}
        send::<OrtEngine>();
        send::<OrtBackend>();
    }

    #[test]
    fn lists_io_with_dtypes_and_symbolic_dims() {
        let e = load("matmul_add_f16");
        assert_eq!(e.component(), "matmul_add_f16");
        assert_eq!(e.inputs(), &[TensorInfo { name: "x".into(), dtype: DType::F16, shape: vec![dyn_("batch"), Dim::Fixed(4)] }]);
        assert_eq!(e.outputs()[0].to_string(), "y: f16[batch, 3]");

        let e = load("symbolic");
        assert_eq!(e.inputs()[0].shape, vec![dyn_("batch"), dyn_("?"), Dim::Fixed(8)]);
        let e = load("two_outputs");
        let outs: Vec<String> = e.outputs().iter().map(|o| o.to_string()).collect();
        assert_eq!(outs, ["neg: f32[n]", "total: f32[]", "len: i64[1]"]);
        let e = load("int64_gather");
        assert_eq!(e.inputs()[0].dtype, DType::I64);
        assert_eq!(e.inputs()[1].dtype, DType::Bool);
    }

    #[test]
    fn matmul_add_matches_the_definition_in_every_precision() {
        let want = matmul_add_expected(&X);
        for name in ["matmul_add_f32", "matmul_add_f16", "matmul_add_bf16"] {
            let mut e = load(name);
            // f32 in, whatever the graph takes; f32 out.
            let x = Tensor::f32(&[2, 4], X.to_vec());
            let mut out = e.run(&[("x", &x)]).unwrap_or_else(|err| panic!("{name}: {err}"));
            let y = out.take("y").expect("output y");
            assert_eq!(y.dtype(), DType::F32, "{name}");
            assert_eq!(y.shape(), &[2, 3], "{name}");
            let y = y.into_f32().unwrap();
            // The values are exact in f16 and bf16 by construction.
            assert_eq!(y.iter().copied().collect::<Vec<_>>(), want, "{name}");
        }
    }

    #[test]
    fn takes_half_inputs_as_given_and_converts_f16_to_bf16() {
        let mut e = load("matmul_add_bf16");
        let x = Tensor::f32(&[2, 4], X.to_vec()).to_dtype(DType::F16).unwrap();
        let y = e.run(&[("x", &x)]).unwrap().take("y").unwrap().into_f32().unwrap();
        assert_eq!(y.iter().copied().collect::<Vec<_>>(), matmul_add_expected(&X));
    }

    #[test]
    fn dynamic_batch_and_non_contiguous_inputs() {
        let mut e = load("matmul_add_f32");
        // Batch 1, then a transposed (non-standard layout) view of a [4, 3] array as a [3, 4] input.
        let x1 = Tensor::f32(&[1, 4], X[..4].to_vec());
        let y1 = e.run(&[("x", &x1)]).unwrap().take("y").unwrap().into_f32().unwrap();
        assert_eq!(y1.shape(), &[1, 3]);
        assert_eq!(y1.iter().copied().collect::<Vec<_>>(), matmul_add_expected(&X[..4]));

        let data: Vec<f32> = (0..12).map(|v| v as f32 * 0.5 - 2.0).collect();
        let base = ndarray::ArrayD::from_shape_vec(ndarray::IxDyn(&[4, 3]), data).unwrap();
        let t = Tensor::F32(base.clone().reversed_axes());
        assert!(!matches!(&t, Tensor::F32(a) if a.is_standard_layout()));
        let rows: Vec<f32> = base.t().iter().copied().collect();
        let y = e.run(&[("x", &t)]).unwrap().take("y").unwrap().into_f32().unwrap();
        assert_eq!(y.iter().copied().collect::<Vec<_>>(), matmul_add_expected(&rows));
    }

    #[test]
    fn int64_and_bool_inputs() {
        let mut e = load("int64_gather");
        let ids = Tensor::i64(&[2, 3], vec![0, 4, 2, 1, 1, 3]);
        let mask_data = vec![true, true, false, true, false, true];
        let mask = Tensor::Bool(ndarray::ArrayD::from_shape_vec(ndarray::IxDyn(&[2, 3]), mask_data.clone()).unwrap());
        let emb = e.run(&[("mask", &mask), ("ids", &ids)]).unwrap().take("emb").unwrap().into_f32().unwrap();
        assert_eq!(emb.shape(), &[2, 3, 2]);
        let want: Vec<f32> = [0i64, 4, 2, 1, 1, 3]
            .iter()
            .zip(&mask_data)
            .flat_map(|(&i, &m)| if m { [i as f32, -(i as f32) / 2.0] } else { [0.0, 0.0] })
            .collect();
        assert_eq!(emb.iter().copied().collect::<Vec<_>>(), want);
    }

    #[test]
    fn returns_every_output_with_its_dtype() {
        let mut e = load("two_outputs");
        let x = Tensor::f32(&[5], vec![1.0, -2.0, 3.5, 0.25, 4.0]);
        let mut out = e.run(&[("x", &x)]).unwrap();
        assert_eq!(out.0.len(), 3);
        assert_eq!(out.take("len").unwrap(), Tensor::i64(&[1], vec![5]));
        assert_eq!(out.take("total").unwrap(), Tensor::f32(&[], vec![6.75]));
        assert_eq!(out.take("neg").unwrap(), Tensor::f32(&[5], vec![-1.0, 2.0, -3.5, -0.25, -4.0]));
    }

    /// Outputs equal those of Python onnxruntime (default session options) stored by the fixture script.
    #[test]
    fn matches_python_onnxruntime() {
        let text = std::fs::read_to_string(fixture("expected.json")).unwrap();
        let cases: serde_json::Value = serde_json::from_str(&text).unwrap();
        let cases = cases.as_object().unwrap();
        assert_eq!(cases.len(), 7);
        for (name, case) in cases {
            let mut e = load(name);
            let mut inputs = Vec::new();
            for (iname, spec) in case["inputs"].as_object().unwrap() {
                let shape: Vec<usize> = spec["shape"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as usize).collect();
                let data: Vec<f64> = spec["data"].as_array().unwrap().iter().map(|v| v.as_f64().unwrap()).collect();
                let t = match spec["dtype"].as_str().unwrap() {
                    "int64" => Tensor::i64(&shape, data.iter().map(|&v| v as i64).collect()),
                    "bool" => Tensor::i64(&shape, data.iter().map(|&v| v as i64).collect()).to_dtype(DType::Bool).unwrap(),
                    _ => Tensor::f32(&shape, data.iter().map(|&v| v as f32).collect()),
                };
                inputs.push((iname.clone(), t));
            }
            let refs: Vec<(&str, &Tensor)> = inputs.iter().map(|(n, t)| (n.as_str(), t)).collect();
            let mut out = e.run(&refs).unwrap_or_else(|err| panic!("{name}: {err}"));
            for (oname, spec) in case["outputs"].as_object().unwrap() {
                let got = out.take(oname).unwrap_or_else(|| panic!("{name}: no output {oname}"));
                let shape: Vec<usize> = spec["shape"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as usize).collect();
                assert_eq!(got.shape(), shape.as_slice(), "{name}.{oname}");
                let got: Vec<f64> = match got {
                    Tensor::I64(a) => a.iter().map(|&v| v as f64).collect(),
                    other => other.into_f32().unwrap().iter().map(|&v| v as f64).collect(),
                };
                let want: Vec<f64> = spec["data"].as_array().unwrap().iter().map(|v| v.as_f64().unwrap()).collect();
                assert_eq!(got, want, "{name}.{oname}");
            }
        }
    }

    /// An FP8 Q/DQ graph runs at the default optimization level (its session without the QDQ selector);
    /// other graphs keep every optimizer. Without the option ONNX Runtime cannot build the session at all.
    #[test]
    fn fp8_qdq_graphs_get_their_own_session_option() {
        let mut e = load("matmul_fp8");
        assert!(e.fp8_qdq());
        assert!(!load("matmul_add_f32").fp8_qdq() && !load("matmul_add_bf16").fp8_qdq());
        // 1.1 / 2^-5 = 35.2 rounds to 36 (3 mantissa bits); 20 saturates at 448 * 2^-5 = 14 (see ort_fixtures.py).
        let x = Tensor::f32(&[2, 4], vec![1.1, -0.3, 2.7, 0.05, 20.0, -0.9, 0.33, -3.3]);
        let y = e.run(&[("x", &x)]).unwrap().take("y").unwrap().into_f32().unwrap();
        // Exact in f32 (sums of a few powers of two); compared as f64 so the literals can be written out in full.
        let y: Vec<f64> = y.iter().map(|&v| f64::from(v)).collect();
        assert_eq!(y, vec![-0.505859375, 2.5390625, 9.00634765625, 10.49609375, -0.7265625, 5.4375]);

        let b = backend();
        let plain = Session::builder(&b.env)
            .map_err(|e| e.to_string())
            .and_then(|s| s.with_optimization_level(GraphOptimizationLevel::All).map_err(|e| e.to_string()))
            .and_then(|mut s| s.commit_from_file(fixture("matmul_fp8.onnx")).map_err(|e| e.to_string()));
        let err = plain.err().unwrap_or_default();
        assert!(err.contains("float8") || err.contains("MatMulIntegerToFloat"), "the trap this option avoids is gone? {err}");
    }

    #[test]
    fn contract_errors_name_the_input() {
        let mut e = load("matmul_add_f32");
        let bad = Tensor::f32(&[2, 5], vec![0.0; 10]);
        let err = e.run(&[("x", &bad)]).unwrap_err();
        assert!(matches!(err, Error::Contract { .. }), "{err}");
        assert!(err.to_string().contains("shape [2, 5]"), "{err}");
        let ids = Tensor::i64(&[2, 4], vec![0; 8]);
        let err = e.run(&[("x", &ids)]).unwrap_err().to_string();
        assert!(err.contains("is i64 but the graph takes f32"), "{err}");
        let err = e.run(&[]).unwrap_err().to_string();
        assert!(err.contains("missing input `x`"), "{err}");
        // A float given for an int64 input is refused before ORT sees it.
        let mut g = load("int64_gather");
        let f = Tensor::f32(&[1, 1], vec![0.0]);
        let err = g.run(&[("ids", &f), ("mask", &f)]).unwrap_err().to_string();
        assert!(err.contains("graph takes i64"), "{err}");
    }

    #[test]
    fn ort_failures_become_run_errors() {
        // Index 7 is out of the 5-row table: ORT's Gather rejects it at run time.
        let mut g = load("int64_gather");
        let ids = Tensor::i64(&[1, 1], vec![7]);
        let mask = Tensor::i64(&[1, 1], vec![1]).to_dtype(DType::Bool).unwrap();
        let err = g.run(&[("ids", &ids), ("mask", &mask)]).unwrap_err();
        match &err {
            Error::Run { component, reason } => {
                assert_eq!(component, "int64_gather");
                assert!(reason.to_lowercase().contains("indices"), "{reason}");
            }
            other => panic!("expected a run error, got {other}"),
        }
        // The engine keeps working after a failed run.
        let ok = Tensor::i64(&[1, 1], vec![4]);
        let emb = g.run(&[("ids", &ok), ("mask", &mask)]).unwrap().take("emb").unwrap();
        assert_eq!(emb, Tensor::f32(&[1, 1, 2], vec![4.0, -2.0]));
    }

    #[test]
    fn missing_and_corrupt_files_are_load_errors() {
        let b = backend();
        let dir = tempfile::tempdir().unwrap();
        let err = b.load("vae_decoder", &dir.path().join("nope.onnx")).unwrap_err();
        assert!(
            matches!(&err, Error::Load { component, reason, .. } if component == "vae_decoder" && reason == "file not found"),
            "{err}"
        );
        let corrupt = dir.path().join("corrupt.onnx");
        std::fs::write(&corrupt, b"this is not a protobuf \x00\x01\x02").unwrap();
        let err = b.load("transformer", &corrupt).unwrap_err();
        assert!(matches!(err, Error::Load { .. }), "{err}");
        assert!(err.to_string().contains("corrupt.onnx"), "{err}");
        // A truncated real graph.
        let bytes = std::fs::read(fixture("matmul_add_f32.onnx")).unwrap();
        let cut = dir.path().join("cut.onnx");
        std::fs::write(&cut, &bytes[..bytes.len() / 2]).unwrap();
        assert!(matches!(b.load("t", &cut), Err(Error::Load { .. })));
    }

    #[test]
    fn discovery_order_and_errors() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        let capi = root.join(".venv/lib/python3.11/site-packages/onnxruntime/capi");
        std::fs::create_dir_all(&capi).unwrap();
        for v in ["1.9.0", "1.31.1", "1.20.0"] {
            std::fs::write(capi.join(format!("libonnxruntime.so.{v}")), b"").unwrap();
        }
        std::fs::write(capi.join("libonnxruntime_providers_shared.so"), b"").unwrap();
        let explicit = capi.join("libonnxruntime.so.1.9.0");
        let roots = vec![root.join("elsewhere"), root.to_path_buf()];

        // The .venv search takes the newest version.
        let found = find_library_in(None, None, None, &roots).unwrap();
        assert_eq!(found, capi.join("libonnxruntime.so.1.31.1"));
        // Empty variables count as unset.
        assert_eq!(find_library_in(None, Some("".into()), Some("".into()), &roots).unwrap(), found);
        // Explicit beats both variables; QWEN_EDIT_ORT_LIB beats ORT_DYLIB_PATH beats the search.
        let a = capi.join("libonnxruntime.so.1.20.0");
        assert_eq!(find_library_in(Some(&explicit), Some(a.clone().into()), None, &roots).unwrap(), explicit);
        assert_eq!(find_library_in(None, Some(a.clone().into()), Some(explicit.clone().into()), &roots).unwrap(), a);
        assert_eq!(find_library_in(None, None, Some(explicit.clone().into()), &roots).unwrap(), explicit);

        // A bogus explicit path or variable is an error naming it and the fix, not a fallback.
        let bogus = root.join("no/libonnxruntime.so");
        let err = find_library_in(Some(&bogus), None, None, &roots).unwrap_err();
        assert!(matches!(err, Error::LibraryMissing { .. }));
        let msg = err.to_string();
        assert!(msg.contains("no/libonnxruntime.so") && msg.contains("scripts/setup.sh runtime"), "{msg}");
        let msg = find_library_in(None, Some(bogus.clone().into()), None, &roots).unwrap_err().to_string();
        assert!(msg.contains(ENV_LIB) && msg.contains("QWEN_EDIT_ORT_LIB to the path"), "{msg}");
        // Nothing anywhere.
        let msg = find_library_in(None, None, None, &[root.join("elsewhere")]).unwrap_err().to_string();
        assert!(msg.contains("none found in a .venv") && msg.contains("scripts/setup.sh runtime"), "{msg}");
    }

    #[test]
    fn a_bogus_library_does_not_poison_the_process() {
        let dir = tempfile::tempdir().unwrap();
        let fake = dir.path().join("libonnxruntime.so.1.31.1");
        std::fs::write(&fake, b"not an ELF file").unwrap();
        let err = OrtBackend::new(OrtSettings { library: Some(fake), ..Default::default() }).unwrap_err();
        // Before a successful load: the dlopen failure. After one (tests share the process): a refusal
        // to load a second library. Either way a clean error, and the real library still works.
        assert!(matches!(err, Error::LibraryMissing { .. } | Error::Unavailable { .. }), "{err}");
        let mut e = load("two_outputs");
        assert!(e.run(&[("x", &Tensor::f32(&[1], vec![2.0]))]).is_ok());
    }

    #[test]
    fn settings_parse() {
        assert_eq!("ALL".parse::<Optimization>().unwrap(), Optimization::All);
        assert_eq!("disable".parse::<Optimization>().unwrap(), Optimization::Disable);
        assert!("fast".parse::<Optimization>().unwrap_err().contains("disable, basic"));
        assert_eq!(OrtSettings::default().optimization, Optimization::All);
        let err = OrtBackend::new(OrtSettings { intra_threads: Some(0), ..Default::default() }).unwrap_err();
        assert!(err.to_string().contains("at least 1"), "{err}");
    }

    /// A bfloat16 graph: refused without `bf16_as_f32` (naming it); with it, its float32 twin declares the graph's
    /// bfloat16 IO, returns bfloat16 values, and computes what the float32 export of the same checkpoint computes,
    /// within bfloat16's precision.
    #[test]
    fn a_bf16_graph_runs_as_its_float32_twin() {
        let engines = Path::new(env!("CARGO_MANIFEST_DIR")).join("engines");
        let path = engines.join("tiny-bf16/vae_decoder.onnx");
        let e = backend().load("vae_decoder", &path).unwrap_err().to_string();
        assert!(e.contains("bfloat16") && e.contains("ORT_BF16_AS_F32"), "{e}");
        let widening = OrtBackend::new(OrtSettings { intra_threads: Some(1), bf16_as_f32: true, ..Default::default() }).unwrap();
        let mut twin = widening.load("vae_decoder", &path).unwrap();
        let mut reference = backend().load("vae_decoder", &engines.join("tiny/vae_decoder.onnx")).unwrap();
        assert_eq!((twin.inputs()[0].dtype, twin.outputs()[0].dtype), (DType::BF16, DType::BF16));
        assert_eq!(reference.inputs()[0].dtype, DType::F32);
        assert!(twin.attention().rewritten() > 0, "the twin's attentions are float32, so fused");

        let shape = [1, 16, 6, 5];
        let x: Vec<f32> = (0..shape.iter().product::<usize>()).map(|i| ((i * 37 % 101) as f32 / 50.0 - 1.0) * 1.3).collect();
        let x = Tensor::f32(&shape, x);
        let out = |e: &mut OrtEngine| e.run(&[("latent", &x)]).unwrap().0.remove(0).1.into_f32().unwrap();
        let (got, want) = (out(&mut twin), out(&mut reference));
        assert_eq!(got.shape(), want.shape());
        assert!(got.iter().all(|&v| bf16::from_f32(v).to_f32() == v), "outputs are bfloat16 values");
        let (num, den) =
            got.iter().zip(&want).fold((0f64, 0f64), |(n, d), (&g, &w)| (n + f64::from(g - w).powi(2), d + f64::from(w).powi(2)));
        let rel = (num / den).sqrt();
        assert!(rel < 0.03 && rel > 0.0, "relative L2 error against the float32 export: {rel}");
    }
}
