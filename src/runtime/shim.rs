//! Safe Rust face of the C++ TensorRT shim: library loading, CUDA probing, engines, contexts, graphs.
//! Compiles with or without the shim (`cfg(qe_trt)`); without it every entry point says so in its error.

use serde::Serialize;
use std::fmt;

#[cfg(qe_trt)]
use super::shim_ffi::ffi;

/// Stand-ins for the bridge when the shim is not compiled: the same surface, never constructed.
#[cfg(not(qe_trt))]
#[allow(dead_code)] // the stand-ins exist only so the same code compiles without the shim
mod ffi {
    pub struct NotCompiled;
    pub type Result<T> = std::result::Result<T, NotCompiled>;
    pub struct UniquePtr<T>(T);
    impl<T> UniquePtr<T> {
        pub fn pin_mut(&mut self) -> &mut T {
            &mut self.0
        }
    }
    impl<T> std::ops::Deref for UniquePtr<T> {
        type Target = T;
        fn deref(&self) -> &T {
            &self.0
        }
    }
    #[derive(Debug, Clone)]
    pub struct CudaInfo {
        pub runtime_version: i32,
        pub driver_version: i32,
        pub device_count: i32,
        pub error_code: i32,
        pub error_name: String,
        pub error_string: String,
    }
    #[derive(Debug, Clone)]
    pub struct DeviceInfo {
        pub ordinal: i32,
        pub cc_major: i32,
        pub cc_minor: i32,
        pub free_bytes: usize,
        pub total_bytes: usize,
    }
    #[derive(Debug, Clone)]
    pub struct IoTensor {
        pub name: String,
        pub is_input: bool,
        pub dtype: i32,
        pub shape: Vec<i64>,
        pub linear: bool,
        pub on_device: bool,
        pub shape_tensor: bool,
    }
    #[derive(Debug, Clone)]
    pub struct ProfileRange {
        pub min: Vec<i64>,
        pub opt: Vec<i64>,
        pub max: Vec<i64>,
    }
    #[derive(Debug, Clone)]
    pub struct ProfileInput {
        pub name: String,
        pub min: Vec<i64>,
        pub opt: Vec<i64>,
        pub max: Vec<i64>,
    }
    #[derive(Debug, Clone)]
    pub struct BuildProfile {
        pub inputs: Vec<ProfileInput>,
    }
    #[derive(Debug, Clone)]
    pub struct BuildSettings {
        pub workspace_bytes: u64,
        pub optimization_level: i32,
    }
    #[derive(Debug, Clone)]
    pub struct BuildOutput {
        pub plan_bytes: u64,
        pub timing_cache: Vec<u8>,
        pub timing_cache_reused: bool,
        pub inputs: Vec<IoTensor>,
        pub warnings: Vec<String>,
    }
    pub enum CudaRt {}
    pub enum TrtLib {}
    pub enum Runtime {}
    pub enum Engine {}
    pub enum Context {}
    pub enum Graph {}
    pub enum BuilderLib {}
    pub fn header_version() -> i32 {
        0
    }
    pub fn cuda_load(_: &[String]) -> Result<UniquePtr<CudaRt>> {
        Err(NotCompiled)
    }
    pub fn trt_load(_: &[String]) -> Result<UniquePtr<TrtLib>> {
        Err(NotCompiled)
    }
    pub fn builder_load(_: &[String], _: &[String]) -> Result<UniquePtr<BuilderLib>> {
        Err(NotCompiled)
    }
    pub fn runtime_new(t: &TrtLib, _: &CudaRt, _: i32) -> Result<UniquePtr<Runtime>> {
        match *t {}
    }
    #[allow(clippy::too_many_arguments)] // the stand-in of the bridge function above
    pub fn build_engine(
        l: &BuilderLib,
        _: &CudaRt,
        _: i32,
        _: &str,
        _: &str,
        _: &[BuildProfile],
        _: &BuildSettings,
        _: &[u8],
    ) -> Result<BuildOutput> {
        match *l {}
    }
    impl CudaRt {
        pub fn path(&self) -> String {
            match *self {}
        }
        pub fn probe(&self) -> CudaInfo {
            match *self {}
        }
        pub fn device(&self, _: i32) -> Result<DeviceInfo> {
            match *self {}
        }
        pub fn synchronize(&self, _: usize) -> Result<()> {
            match *self {}
        }
    }
    impl TrtLib {
        pub fn path(&self) -> String {
            match *self {}
        }
        pub fn version(&self) -> i32 {
            match *self {}
        }
    }
    impl BuilderLib {
        pub fn path(&self) -> String {
            match *self {}
        }
        pub fn parser_path(&self) -> String {
            match *self {}
        }
        pub fn version(&self) -> i32 {
            match *self {}
        }
    }
    impl Runtime {
        pub fn deserialize(&self, _: &[u8]) -> Result<UniquePtr<Engine>> {
            match *self {}
        }
    }
    impl Engine {
        pub fn io_tensors(&self) -> Result<Vec<IoTensor>> {
            match *self {}
        }
        pub fn num_profiles(&self) -> i32 {
            match *self {}
        }
        pub fn profile(&self, _: &str, _: i32) -> Result<ProfileRange> {
            match *self {}
        }
        pub fn device_memory_size(&self) -> i64 {
            match *self {}
        }
        pub fn create_context(&self, _: i32, _: usize, _: usize, _: i64) -> Result<UniquePtr<Context>> {
            match *self {}
        }
    }
    impl Context {
        pub fn set_input_shape(&mut self, _: &str, _: &[i64]) -> Result<()> {
            match *self {}
        }
        pub fn tensor_shape(&self, _: &str) -> Result<Vec<i64>> {
            match *self {}
        }
        pub fn set_tensor_address(&mut self, _: &str, _: usize) -> Result<()> {
            match *self {}
        }
        pub fn enqueue(&mut self, _: usize) -> Result<()> {
            match *self {}
        }
        pub fn capture(&mut self, _: usize) -> Result<UniquePtr<Graph>> {
            match *self {}
        }
    }
    impl Graph {
        pub fn launch(&self, _: usize) -> Result<()> {
            match *self {}
        }
    }
}

#[cfg(qe_trt)]
type Ptr<T> = cxx::UniquePtr<T>;
#[cfg(not(qe_trt))]
type Ptr<T> = ffi::UniquePtr<T>;

pub use ffi::{BuildOutput, BuildProfile, BuildSettings, CudaInfo, DeviceInfo, IoTensor, ProfileInput, ProfileRange};

/// Whether this binary contains the compiled C++ shim.
pub const COMPILED: bool = cfg!(qe_trt);

/// Why the shim could not do something.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ShimError {
    #[error(
        "this qwen-edit was built without the TensorRT shim (no TensorRT/CUDA headers at build time): \
         run scripts/fetch-gpu-headers.sh, or set TENSORRT_INCLUDE_DIR and CUDA_INCLUDE_DIR, and rebuild"
    )]
    NotCompiled,
    /// An error raised by TensorRT, CUDA or the shim, with its message.
    #[error("{0}")]
    Native(String),
}

trait IntoShimError {
    fn into_shim(self) -> ShimError;
}
#[cfg(qe_trt)]
impl IntoShimError for cxx::Exception {
    fn into_shim(self) -> ShimError {
        ShimError::Native(self.what().to_string())
    }
}
#[cfg(not(qe_trt))]
impl IntoShimError for ffi::NotCompiled {
    fn into_shim(self) -> ShimError {
        ShimError::NotCompiled
    }
}

fn lift<T, E: IntoShimError>(r: Result<T, E>) -> Result<T, ShimError> {
    r.map_err(IntoShimError::into_shim)
}

/// A TensorRT version (`getInferLibVersion` / `NV_TENSORRT_VERSION`: major*10000 + minor*100 + patch).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct TrtVersion {
    pub major: u32,
    pub minor: u32,
    pub patch: u32,
}

impl TrtVersion {
    pub fn from_int(v: i32) -> Option<TrtVersion> {
        let v = u32::try_from(v).ok().filter(|&v| v > 0)?;
        Some(TrtVersion { major: v / 10000, minor: (v / 100) % 100, patch: v % 100 })
    }
}

impl fmt::Display for TrtVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}.{}", self.major, self.minor, self.patch)
    }
}

/// The TensorRT version of the headers the shim was compiled against (None without the shim).
pub fn header_version() -> Option<TrtVersion> {
    TrtVersion::from_int(ffi::header_version())
}

/// Hooks into the shim's error path for tests (no GPU needed): its logger's per-thread error buffer and the
/// UTF-8 check of the tensor names TensorRT gives.
#[cfg(qe_trt)]
pub mod test_hooks {
    use super::{ffi, lift, ShimError};

    /// Logs `msg` at `severity` through the shim's TensorRT logger, on this thread.
    pub fn log(severity: i32, msg: &str) {
        ffi::logger_log_for_test(severity, msg);
    }
    /// The errors this thread logged since the last take, as a thrown message would carry them.
    pub fn take() -> String {
        ffi::logger_take_for_test()
    }
    /// A name as the shim turns TensorRT's names into Rust strings.
    pub fn utf8_name(bytes: &[u8]) -> Result<String, ShimError> {
        lift(ffi::utf8_name_for_test(bytes))
    }
}

/// A few TensorRT/CUDA values as the compiled C++ sees them (for the check of the generated facts).
#[cfg(qe_trt)]
pub fn compiled_facts() -> ffi::CompiledFacts {
    ffi::compiled_facts()
}

fn env_first(var: &str) -> Vec<String> {
    std::env::var(var).ok().filter(|v| !v.trim().is_empty()).into_iter().collect()
}

/// libcudart candidates: `QWEN_EDIT_CUDART_LIB`, then the sonames of CUDA 13, 12 and the dev link.
pub fn cudart_candidates() -> Vec<String> {
    let mut c = env_first("QWEN_EDIT_CUDART_LIB");
    c.extend(["libcudart.so.13", "libcudart.so.12", "libcudart.so"].map(String::from));
    c
}

/// Majors to try for libnvinfer / libnvonnxparser: the compiled-against one first, then 11, 10.
fn trt_majors() -> Vec<u32> {
    let mut m: Vec<u32> = header_version().map(|v| vec![v.major]).unwrap_or_default();
    for v in [11, 10] {
        if !m.contains(&v) {
            m.push(v);
        }
    }
    m
}

/// libnvinfer candidates: `QWEN_EDIT_TRT_LIB`, then `libnvinfer.so.<major>` for 11 and 10.
pub fn nvinfer_candidates() -> Vec<String> {
    let mut c = env_first("QWEN_EDIT_TRT_LIB");
    c.extend(trt_majors().iter().map(|m| format!("libnvinfer.so.{m}")));
    c
}

/// libnvonnxparser candidates: `QWEN_EDIT_TRT_PARSER_LIB`, then `libnvonnxparser.so.<major>`.
pub fn parser_candidates() -> Vec<String> {
    let mut c = env_first("QWEN_EDIT_TRT_PARSER_LIB");
    c.extend(trt_majors().iter().map(|m| format!("libnvonnxparser.so.{m}")));
    c
}

/// What the CUDA runtime found, classified.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(tag = "status", rename_all = "snake_case")]
pub enum CudaStatus {
    Ready { devices: u32, driver_version: i32, runtime_version: i32 },
    NoDriver { reason: String },
    NoDevice { reason: String },
    Error { reason: String },
}

// cudaError_t values used to classify, from the CUDA headers (runtime::trt_facts).
const CUDA_ERROR_INSUFFICIENT_DRIVER: i32 = super::trt_facts::FACTS.cuda_insufficient_driver;
const CUDA_ERROR_STUB_LIBRARY: i32 = super::trt_facts::FACTS.cuda_stub_library;
const CUDA_ERROR_NO_DEVICE: i32 = super::trt_facts::FACTS.cuda_no_device;

/// Classifies a probe: no driver / no device / error / ready, with a reason a person can act on.
pub fn classify_cuda(info: &CudaInfo, library: &str) -> CudaStatus {
    let said = || format!("cudaGetDeviceCount: {} ({})", info.error_name, info.error_string);
    if info.driver_version == 0 || info.error_code == CUDA_ERROR_STUB_LIBRARY {
        return CudaStatus::NoDriver {
            reason: format!("no NVIDIA driver (libcuda.so.1) is installed or visible to {library}; {}", said()),
        };
    }
    match info.error_code {
        0 if info.device_count > 0 => CudaStatus::Ready {
            devices: info.device_count as u32,
            driver_version: info.driver_version,
            runtime_version: info.runtime_version,
        },
        0 | CUDA_ERROR_NO_DEVICE => CudaStatus::NoDevice {
            reason: format!("the NVIDIA driver sees no CUDA device (check CUDA_VISIBLE_DEVICES and --gpus); {}", said()),
        },
        CUDA_ERROR_INSUFFICIENT_DRIVER => CudaStatus::NoDriver {
            reason: format!(
                "the NVIDIA driver supports CUDA {} but {library} is CUDA {}: update the driver; {}",
                cuda_version_string(info.driver_version),
                cuda_version_string(info.runtime_version),
                said()
            ),
        },
        _ => CudaStatus::Error { reason: said() },
    }
}

fn cuda_version_string(v: i32) -> String {
    format!("{}.{}", v / 1000, (v % 1000) / 10)
}

/// The dlopen'ed CUDA runtime (libcudart).
pub struct CudaRuntime {
    inner: Ptr<ffi::CudaRt>,
}

impl CudaRuntime {
    pub fn load(candidates: &[String]) -> Result<CudaRuntime, ShimError> {
        Ok(CudaRuntime { inner: lift(ffi::cuda_load(candidates))? })
    }
    pub fn path(&self) -> String {
        self.inner.path()
    }
    pub fn probe(&self) -> CudaInfo {
        self.inner.probe()
    }
    pub fn status(&self) -> CudaStatus {
        classify_cuda(&self.probe(), &self.path())
    }
    pub fn device(&self, ordinal: i32) -> Result<DeviceInfo, ShimError> {
        lift(self.inner.device(ordinal))
    }
    pub fn synchronize(&self, stream: usize) -> Result<(), ShimError> {
        lift(self.inner.synchronize(stream))
    }
}

/// The dlopen'ed TensorRT runtime library (libnvinfer).
pub struct TrtLibrary {
    inner: Ptr<ffi::TrtLib>,
}

impl TrtLibrary {
    pub fn load(candidates: &[String]) -> Result<TrtLibrary, ShimError> {
        Ok(TrtLibrary { inner: lift(ffi::trt_load(candidates))? })
    }
    pub fn path(&self) -> String {
        self.inner.path()
    }
    pub fn version(&self) -> Option<TrtVersion> {
        TrtVersion::from_int(self.inner.version())
    }
}

/// A TensorRT runtime bound to one CUDA device.
pub struct Runtime {
    inner: Ptr<ffi::Runtime>,
}

impl Runtime {
    /// Checks the CUDA driver and device first, then creates the TensorRT runtime.
    pub fn new(trt: &TrtLibrary, cuda: &CudaRuntime, ordinal: i32) -> Result<Runtime, ShimError> {
        Ok(Runtime { inner: lift(ffi::runtime_new(&trt.inner, &cuda.inner, ordinal))? })
    }
    pub fn deserialize(&self, plan: &[u8]) -> Result<EngineHandle, ShimError> {
        Ok(EngineHandle { inner: lift(self.inner.deserialize(plan))? })
    }
}

/// A deserialized engine.
pub struct EngineHandle {
    inner: Ptr<ffi::Engine>,
}

impl EngineHandle {
    /// The engine's IO tensors; a name TensorRT gives that is not UTF-8 is an error, not an abort.
    pub fn io_tensors(&self) -> Result<Vec<IoTensor>, ShimError> {
        lift(self.inner.io_tensors())
    }
    pub fn num_profiles(&self) -> usize {
        usize::try_from(self.inner.num_profiles()).unwrap_or(0)
    }
    pub fn profile(&self, input: &str, profile: usize) -> Result<ProfileRange, ShimError> {
        lift(self.inner.profile(input, profile as i32))
    }
    pub fn device_memory_size(&self) -> usize {
        usize::try_from(self.inner.device_memory_size()).unwrap_or(0)
    }
    /// A new execution context on `profile`, using caller-owned activation memory.
    pub fn create_context(
        &self,
        profile: usize,
        stream: usize,
        memory: usize,
        memory_size: usize,
    ) -> Result<ContextHandle, ShimError> {
        let inner = lift(self.inner.create_context(profile as i32, stream, memory, memory_size as i64))?;
        Ok(ContextHandle { inner })
    }
}

/// One execution context.
pub struct ContextHandle {
    inner: Ptr<ffi::Context>,
}

fn to_i64(dims: &[usize]) -> Vec<i64> {
    dims.iter().map(|&d| d as i64).collect()
}

impl ContextHandle {
    pub fn set_input_shape(&mut self, name: &str, dims: &[usize]) -> Result<(), ShimError> {
        lift(self.inner.pin_mut().set_input_shape(name, &to_i64(dims)))
    }
    /// The resolved shape of a tensor once every input shape is set.
    pub fn tensor_shape(&self, name: &str) -> Result<Vec<usize>, ShimError> {
        let dims = lift(self.inner.tensor_shape(name))?;
        dims.iter()
            .map(|&d| usize::try_from(d).map_err(|_| ShimError::Native(format!("`{name}` has a data-dependent shape {dims:?}"))))
            .collect()
    }
    pub fn set_tensor_address(&mut self, name: &str, ptr: u64) -> Result<(), ShimError> {
        lift(self.inner.pin_mut().set_tensor_address(name, ptr as usize))
    }
    pub fn enqueue(&mut self, stream: usize) -> Result<(), ShimError> {
        lift(self.inner.pin_mut().enqueue(stream))
    }
    pub fn capture(&mut self, stream: usize) -> Result<GraphHandle, ShimError> {
        Ok(GraphHandle { inner: lift(self.inner.pin_mut().capture(stream))? })
    }
}

/// An instantiated CUDA graph of one enqueue.
pub struct GraphHandle {
    inner: Ptr<ffi::Graph>,
}

impl GraphHandle {
    pub fn launch(&self, stream: usize) -> Result<(), ShimError> {
        lift(self.inner.launch(stream))
    }
}

/// The TensorRT builder library plus the ONNX parser.
pub struct BuilderLibrary {
    inner: Ptr<ffi::BuilderLib>,
}

impl BuilderLibrary {
    pub fn load(nvinfer: &[String], parser: &[String]) -> Result<BuilderLibrary, ShimError> {
        Ok(BuilderLibrary { inner: lift(ffi::builder_load(nvinfer, parser))? })
    }
    pub fn path(&self) -> String {
        self.inner.path()
    }
    pub fn parser_path(&self) -> String {
        self.inner.parser_path()
    }
    pub fn version(&self) -> Option<TrtVersion> {
        TrtVersion::from_int(self.inner.version())
    }
    /// Builds `onnx_path` into `plan_path` on device `ordinal`.
    #[allow(clippy::too_many_arguments)] // forwards the bridge function's arguments one to one
    pub fn build(
        &self,
        cuda: &CudaRuntime,
        ordinal: i32,
        onnx_path: &str,
        plan_path: &str,
        profiles: &[BuildProfile],
        settings: &BuildSettings,
        timing_cache: &[u8],
    ) -> Result<BuildOutput, ShimError> {
        lift(ffi::build_engine(&self.inner, &cuda.inner, ordinal, onnx_path, plan_path, profiles, settings, timing_cache))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(driver: i32, code: i32, count: i32) -> CudaInfo {
        CudaInfo {
            runtime_version: 13020,
            driver_version: driver,
            device_count: count,
            error_code: code,
            error_name: if code == 0 { String::new() } else { format!("cudaError{code}") },
            error_string: "text".into(),
        }
    }

    #[test]
    fn cuda_probe_classification_names_the_cause() {
        assert!(matches!(classify_cuda(&info(0, 35, 0), "libcudart.so.13"), CudaStatus::NoDriver { .. }));
        assert!(matches!(classify_cuda(&info(12080, 34, 0), "x"), CudaStatus::NoDriver { .. }));
        match classify_cuda(&info(12080, 35, 0), "libcudart.so.13") {
            CudaStatus::NoDriver { reason } => {
                assert!(reason.contains("supports CUDA 12.8") && reason.contains("CUDA 13.2"), "{reason}")
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(classify_cuda(&info(13000, 100, 0), "x"), CudaStatus::NoDevice { .. }));
        assert!(matches!(classify_cuda(&info(13000, 0, 0), "x"), CudaStatus::NoDevice { .. }));
        assert!(matches!(classify_cuda(&info(13000, 999, 0), "x"), CudaStatus::Error { .. }));
        assert_eq!(
            classify_cuda(&info(13000, 0, 2), "x"),
            CudaStatus::Ready { devices: 2, driver_version: 13000, runtime_version: 13020 }
        );
    }

    #[test]
    fn versions_decode() {
        let v = TrtVersion::from_int(110400).unwrap();
        assert_eq!((v.major, v.minor, v.patch), (11, 4, 0));
        assert_eq!(TrtVersion::from_int(100803).unwrap().to_string(), "10.8.3");
        assert!(TrtVersion::from_int(0).is_none());
        assert!(TrtVersion::from_int(-1).is_none());
        assert_eq!(header_version().is_some(), COMPILED);
    }

    #[test]
    fn library_candidates_prefer_the_compiled_major() {
        let c = nvinfer_candidates();
        assert!(c.iter().any(|s| s == "libnvinfer.so.11") && c.iter().any(|s| s == "libnvinfer.so.10"));
        if let Some(v) = header_version() {
            let first_soname = c.iter().find(|s| s.starts_with("libnvinfer.so.")).unwrap();
            assert_eq!(first_soname, &format!("libnvinfer.so.{}", v.major));
        }
        assert!(parser_candidates().iter().any(|s| s.starts_with("libnvonnxparser.so.")));
        assert!(cudart_candidates().iter().any(|s| s == "libcudart.so.12"));
    }

    #[cfg(qe_trt)]
    #[test]
    fn the_logger_keeps_each_threads_errors_apart() {
        // Two threads fail at once: each one's message holds its own errors only.
        let run = |tag: &'static str| {
            std::thread::spawn(move || {
                test_hooks::take();
                for k in 0..3 {
                    test_hooks::log(1, &format!("{tag} error {k}"));
                    std::thread::yield_now();
                }
                test_hooks::log(2, &format!("{tag} warning")); // warnings are logged, not kept
                test_hooks::take()
            })
        };
        let (a, b) = (run("a"), run("b"));
        let (a, b) = (a.join().unwrap(), b.join().unwrap());
        assert_eq!(a, "a error 0; a error 1; a error 2");
        assert_eq!(b, "b error 0; b error 1; b error 2");
        assert_eq!(test_hooks::take(), "", "taking clears; this thread logged nothing");
    }

    #[cfg(qe_trt)]
    #[test]
    fn a_name_that_is_not_utf8_is_an_error_not_an_abort() {
        assert_eq!(test_hooks::utf8_name("latent".as_bytes()).unwrap(), "latent");
        let e = test_hooks::utf8_name(&[b'x', 0xff, 0xfe]).unwrap_err().to_string();
        assert!(e.contains("not UTF-8") && e.contains("78fffe"), "{e}");
    }

    #[test]
    fn missing_libraries_are_clean_errors() {
        let none = vec!["/nonexistent/libcudart.so.99".to_string()];
        let e = CudaRuntime::load(&none).err().expect("must fail");
        if COMPILED {
            assert!(e.to_string().contains("/nonexistent/libcudart.so.99"), "{e}");
        } else {
            assert_eq!(e, ShimError::NotCompiled);
        }
        let e = TrtLibrary::load(&["/nonexistent/libnvinfer.so.11".to_string()]).err().expect("must fail");
        assert!(e.to_string().contains(if COMPILED { "libnvinfer.so.11" } else { "built without" }), "{e}");
        let e = BuilderLibrary::load(&none, &none).err().expect("must fail");
        assert!(!e.to_string().is_empty());
    }
}
