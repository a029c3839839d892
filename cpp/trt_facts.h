// The TensorRT and CUDA facts the Rust side needs, read by bindgen from the headers the shim is compiled
// against (build.rs -> src/runtime/trt_facts.rs), so no number is copied by hand: TensorRT's version, its
// element types, IO modes, formats, locations and log severities, and the CUDA errors the probe classifies.
#include <NvInferRuntime.h>
#include <NvInferVersion.h>
#include <driver_types.h>

namespace qe_facts {
// The version macros are expressions of other macros; constants let bindgen evaluate them.
constexpr int trt_major = NV_TENSORRT_MAJOR;
constexpr int trt_minor = NV_TENSORRT_MINOR;
constexpr int trt_patch = NV_TENSORRT_PATCH;
// ILogger lives in a versioned inline namespace in some releases: its severities by their stable path.
constexpr int severity_internal_error = static_cast<int>(nvinfer1::ILogger::Severity::kINTERNAL_ERROR);
constexpr int severity_error = static_cast<int>(nvinfer1::ILogger::Severity::kERROR);
constexpr int severity_warning = static_cast<int>(nvinfer1::ILogger::Severity::kWARNING);
constexpr int severity_info = static_cast<int>(nvinfer1::ILogger::Severity::kINFO);
constexpr int severity_verbose = static_cast<int>(nvinfer1::ILogger::Severity::kVERBOSE);
}  // namespace qe_facts
