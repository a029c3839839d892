// The C++ side of the TensorRT shim, bridged to Rust with cxx (src/runtime/shim_ffi.rs).
// TensorRT and the CUDA runtime are dlopen'ed at run time: nothing here links against them.
#pragma once

#include <cstdint>
#include <memory>

#include "rust/cxx.h"

namespace nvinfer1 {
class IRuntime;
class ICudaEngine;
class IExecutionContext;
}  // namespace nvinfer1

namespace qe {

struct CudaInfo;
struct CompiledFacts;
struct DeviceInfo;
struct IoTensor;
struct ProfileRange;
struct BuildProfile;
struct BuildSettings;
struct BuildOutput;

struct CudaFns;   // cuda* entry points resolved with dlsym
struct TrtFns;    // libnvinfer entry points resolved with dlsym
struct OnnxFns;   // libnvonnxparser entry points resolved with dlsym

// TensorRT major.minor.patch the shim was compiled against, as major*10000 + minor*100 + patch.
int32_t header_version();

// Test hooks of the error path (no GPU needed): the logger's per-thread error buffer and the UTF-8 check
// of tensor names.
void logger_log_for_test(int32_t severity, rust::Str msg);
rust::String logger_take_for_test();
// A few TensorRT/CUDA values as this C++ code sees them (a test compares bindgen's against them).
CompiledFacts compiled_facts();
rust::String utf8_name_for_test(rust::Slice<const uint8_t> bytes);

// ---- CUDA runtime ----------------------------------------------------------------------
class CudaRt {
 public:
  explicit CudaRt(std::shared_ptr<CudaFns> fns);
  rust::String path() const;
  // Driver/runtime versions and device count; a failing cudaGetDeviceCount is reported in the
  // result (error fields), not thrown, so callers can say "no driver" vs "no device".
  CudaInfo probe() const;
  DeviceInfo device(int32_t ordinal) const;
  void synchronize(std::size_t stream) const;
  std::shared_ptr<CudaFns> fns;
};
// Loads the first candidate library that resolves every needed symbol. A library whose
// cudaGetDeviceCount reports an insufficient driver is passed over for a later candidate.
std::unique_ptr<CudaRt> cuda_load(rust::Slice<const rust::String> candidates);

// ---- TensorRT runtime ------------------------------------------------------------------
class TrtLib {
 public:
  explicit TrtLib(std::shared_ptr<TrtFns> fns);
  rust::String path() const;
  int32_t version() const;  // getInferLibVersion()
  std::shared_ptr<TrtFns> fns;
};
std::unique_ptr<TrtLib> trt_load(rust::Slice<const rust::String> candidates);

class Engine;
class Context;
class Graph;

class Runtime {
 public:
  Runtime(std::shared_ptr<TrtFns> trt, std::shared_ptr<CudaFns> cuda, std::shared_ptr<nvinfer1::IRuntime> rt);
  std::unique_ptr<Engine> deserialize(rust::Slice<const uint8_t> plan) const;

 private:
  std::shared_ptr<TrtFns> trt_;
  std::shared_ptr<CudaFns> cuda_;
  std::shared_ptr<nvinfer1::IRuntime> rt_;
};
// Checks CUDA (driver, device `ordinal`) before creating any TensorRT object: TensorRT 11
// returns a bogus non-null runtime when no driver is present.
std::unique_ptr<Runtime> runtime_new(const TrtLib& trt, const CudaRt& cuda, int32_t ordinal);

class Engine {
 public:
  Engine(std::shared_ptr<CudaFns> cuda, std::shared_ptr<nvinfer1::IRuntime> rt,
         std::shared_ptr<nvinfer1::ICudaEngine> engine);
  rust::Vec<IoTensor> io_tensors() const;
  int32_t num_profiles() const;
  ProfileRange profile(rust::Str name, int32_t profile) const;
  int64_t device_memory_size() const;
  // A context on `profile` that uses caller-owned activation memory (`memory`, `memory_size`
  // bytes, at least device_memory_size()).
  std::unique_ptr<Context> create_context(int32_t profile, std::size_t stream, std::size_t memory,
                                          int64_t memory_size) const;

 private:
  std::shared_ptr<CudaFns> cuda_;
  std::shared_ptr<nvinfer1::IRuntime> rt_;
  std::shared_ptr<nvinfer1::ICudaEngine> engine_;
};

class Context {
 public:
  Context(std::shared_ptr<CudaFns> cuda, std::shared_ptr<nvinfer1::ICudaEngine> engine,
          std::unique_ptr<nvinfer1::IExecutionContext> ctx);
  ~Context();
  void set_input_shape(rust::Str name, rust::Slice<const int64_t> dims);
  rust::Vec<int64_t> tensor_shape(rust::Str name) const;
  void set_tensor_address(rust::Str name, std::size_t ptr);
  void enqueue(std::size_t stream);
  // Captures one enqueueV3 into a CUDA graph (call after a warm-up enqueue with the same shapes).
  std::unique_ptr<Graph> capture(std::size_t stream);

 private:
  std::shared_ptr<CudaFns> cuda_;
  std::shared_ptr<nvinfer1::ICudaEngine> engine_;
  std::unique_ptr<nvinfer1::IExecutionContext> ctx_;
};

class Graph {
 public:
  Graph(std::shared_ptr<CudaFns> cuda, void* exec);
  ~Graph();
  void launch(std::size_t stream) const;

 private:
  std::shared_ptr<CudaFns> cuda_;
  void* exec_;  // cudaGraphExec_t
};

// ---- TensorRT builder + ONNX parser ----------------------------------------------------
class BuilderLib {
 public:
  BuilderLib(std::shared_ptr<TrtFns> trt, std::shared_ptr<OnnxFns> onnx);
  rust::String path() const;
  rust::String parser_path() const;
  int32_t version() const;
  std::shared_ptr<TrtFns> trt;
  std::shared_ptr<OnnxFns> onnx;
};
std::unique_ptr<BuilderLib> builder_load(rust::Slice<const rust::String> nvinfer,
                                         rust::Slice<const rust::String> parser);
// Parses `onnx_path` (external data next to it), builds a strongly typed engine with the given
// profiles, writes it to `plan_path`; `timing_cache` seeds the builder (may be empty) and the
// updated cache is returned.
BuildOutput build_engine(const BuilderLib& lib, const CudaRt& cuda, int32_t ordinal, rust::Str onnx_path,
                         rust::Str plan_path, rust::Slice<const BuildProfile> profiles,
                         const BuildSettings& settings, rust::Slice<const uint8_t> timing_cache);

}  // namespace qe
