//! The cxx bridge to the C++ TensorRT shim (cpp/trt_shim.h); compiled only with `cfg(qe_trt)`.
//! Use it through `runtime::shim`, which wraps it in safe types and works without it too.

#[cxx::bridge(namespace = "qe")]
pub(crate) mod ffi {
    /// What the CUDA runtime says about the machine; a failed cudaGetDeviceCount is in `error_*`.
    #[derive(Debug, Clone)]
    struct CudaInfo {
        runtime_version: i32,
        driver_version: i32,
        device_count: i32,
        error_code: i32,
        error_name: String,
        error_string: String,
    }

    #[derive(Debug, Clone)]
    struct DeviceInfo {
        ordinal: i32,
        cc_major: i32,
        cc_minor: i32,
        free_bytes: usize,
        total_bytes: usize,
    }

    /// Values as the compiled C++ sees them (runtime::trt_facts checks bindgen's against them).
    #[derive(Debug, Clone)]
    struct CompiledFacts {
        half: i32,
        bf16: i32,
        int64: i32,
        severity_error: i32,
        cuda_insufficient_driver: i32,
        cuda_no_device: i32,
    }

    /// One IO tensor of an engine (shape has -1 for dynamic dims; dtype: TensorRT's DataType code).
    #[derive(Debug, Clone)]
    struct IoTensor {
        name: String,
        is_input: bool,
        dtype: i32,
        shape: Vec<i64>,
        linear: bool,
        on_device: bool,
        shape_tensor: bool,
    }

    #[derive(Debug, Clone)]
    struct ProfileRange {
        min: Vec<i64>,
        opt: Vec<i64>,
        max: Vec<i64>,
    }

    #[derive(Debug, Clone)]
    struct ProfileInput {
        name: String,
        min: Vec<i64>,
        opt: Vec<i64>,
        max: Vec<i64>,
    }

    #[derive(Debug, Clone)]
    struct BuildProfile {
        inputs: Vec<ProfileInput>,
    }

    #[derive(Debug, Clone)]
    struct BuildSettings {
        /// 0 = TensorRT's default (all device memory).
        workspace_bytes: u64,
        /// -1 = TensorRT's default (3).
        optimization_level: i32,
    }

    #[derive(Debug, Clone)]
    struct BuildOutput {
        plan_bytes: u64,
        timing_cache: Vec<u8>,
        timing_cache_reused: bool,
        inputs: Vec<IoTensor>,
        warnings: Vec<String>,
    }

    unsafe extern "C++" {
        include!("qwen-edit/cpp/trt_shim.h");

        type CudaRt;
        type TrtLib;
        type Runtime;
        type Engine;
        type Context;
        type Graph;
        type BuilderLib;

        fn header_version() -> i32;
        fn logger_log_for_test(severity: i32, msg: &str);
        fn logger_take_for_test() -> String;
        fn compiled_facts() -> CompiledFacts;
        fn utf8_name_for_test(bytes: &[u8]) -> Result<String>;

        fn cuda_load(candidates: &[String]) -> Result<UniquePtr<CudaRt>>;
        fn path(self: &CudaRt) -> String;
        fn probe(self: &CudaRt) -> CudaInfo;
        fn device(self: &CudaRt, ordinal: i32) -> Result<DeviceInfo>;
        fn synchronize(self: &CudaRt, stream: usize) -> Result<()>;

        fn trt_load(candidates: &[String]) -> Result<UniquePtr<TrtLib>>;
        fn path(self: &TrtLib) -> String;
        fn version(self: &TrtLib) -> i32;

        fn runtime_new(trt: &TrtLib, cuda: &CudaRt, ordinal: i32) -> Result<UniquePtr<Runtime>>;
        fn deserialize(self: &Runtime, plan: &[u8]) -> Result<UniquePtr<Engine>>;

        fn io_tensors(self: &Engine) -> Result<Vec<IoTensor>>;
        fn num_profiles(self: &Engine) -> i32;
        fn profile(self: &Engine, name: &str, profile: i32) -> Result<ProfileRange>;
        fn device_memory_size(self: &Engine) -> i64;
        fn create_context(
            self: &Engine,
            profile: i32,
            stream: usize,
            memory: usize,
            memory_size: i64,
        ) -> Result<UniquePtr<Context>>;

        fn set_input_shape(self: Pin<&mut Context>, name: &str, dims: &[i64]) -> Result<()>;
        fn tensor_shape(self: &Context, name: &str) -> Result<Vec<i64>>;
        fn set_tensor_address(self: Pin<&mut Context>, name: &str, ptr: usize) -> Result<()>;
        fn enqueue(self: Pin<&mut Context>, stream: usize) -> Result<()>;
        fn capture(self: Pin<&mut Context>, stream: usize) -> Result<UniquePtr<Graph>>;

        fn launch(self: &Graph, stream: usize) -> Result<()>;

        fn builder_load(nvinfer: &[String], parser: &[String]) -> Result<UniquePtr<BuilderLib>>;
        fn path(self: &BuilderLib) -> String;
        fn parser_path(self: &BuilderLib) -> String;
        fn version(self: &BuilderLib) -> i32;
        // Mirrors the C++ function of the bridge; a struct would need a shared cxx type for little gain.
        #[allow(clippy::too_many_arguments)]
        fn build_engine(
            lib: &BuilderLib,
            cuda: &CudaRt,
            ordinal: i32,
            onnx_path: &str,
            plan_path: &str,
            profiles: &[BuildProfile],
            settings: &BuildSettings,
            timing_cache: &[u8],
        ) -> Result<BuildOutput>;
    }

    extern "Rust" {
        fn trt_log(severity: i32, msg: &[u8]);
    }
}

// The C++ objects own their TensorRT/CUDA handles and are used by one thread at a time.
unsafe impl Send for ffi::CudaRt {}
unsafe impl Sync for ffi::CudaRt {}
unsafe impl Send for ffi::TrtLib {}
unsafe impl Sync for ffi::TrtLib {}
unsafe impl Send for ffi::Runtime {}
unsafe impl Send for ffi::Engine {}
unsafe impl Send for ffi::Context {}
unsafe impl Send for ffi::Graph {}
unsafe impl Send for ffi::BuilderLib {}

/// TensorRT's logger, forwarded to `tracing` (severity: `ILogger::Severity`, from the headers).
fn trt_log(severity: i32, msg: &[u8]) {
    let msg = String::from_utf8_lossy(msg);
    let s = super::trt_facts::FACTS.severity;
    match severity {
        v if v == s.internal_error || v == s.error => tracing::error!(target: "tensorrt", "{msg}"),
        v if v == s.warning => tracing::warn!(target: "tensorrt", "{msg}"),
        v if v == s.info => tracing::info!(target: "tensorrt", "{msg}"),
        _ => tracing::debug!(target: "tensorrt", "{msg}"),
    }
}
