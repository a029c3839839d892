// The TensorRT shim: engine deserialization, IO listing, execution contexts, CUDA graphs, builder.
// Every TensorRT/CUDA entry point is resolved with dlopen/dlsym; errors are thrown and become Rust Results.
#include "qwen-edit/cpp/trt_shim.h"

#include <NvInfer.h>
#include <NvOnnxParser.h>
#include <cuda_runtime_api.h>
#include <dlfcn.h>

#include <cstring>
#include <deque>
#include <fstream>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

#include "qwen-edit/src/runtime/shim_ffi.rs.h"

namespace qe {

namespace {

[[noreturn]] void fail(const std::string& msg) { throw std::runtime_error(msg); }

// ---- logger: forwards to Rust `tracing`, keeps the calling thread's last errors for its next thrown message ----
class Logger final : public nvinfer1::ILogger {
 public:
  void log(Severity severity, const char* msg) noexcept override {
    try {
      static const uint8_t empty = 0;
      const std::size_t n = msg ? std::strlen(msg) : 0;
      const uint8_t* p = msg ? reinterpret_cast<const uint8_t*>(msg) : &empty;
      trt_log(static_cast<int32_t>(severity), rust::Slice<const uint8_t>(p, n));
      if (severity <= Severity::kERROR && msg) {
        auto& e = errors();
        e.emplace_back(msg, n);
        while (e.size() > 8) e.pop_front();
      }
    } catch (...) {
      // A logger must never throw into TensorRT.
    }
  }
  void clear() { errors().clear(); }
  std::string take() {
    std::string out;
    for (const auto& e : errors()) {
      if (!out.empty()) out += "; ";
      out += e;
    }
    errors().clear();
    return out;
  }

 private:
  // Per thread: TensorRT logs a call's errors on the thread that made the call, so one thread's failure
  // never lands in (or is cleared from) another thread's error message. Errors TensorRT logs from its own
  // worker threads still reach `tracing`, just not a thrown message.
  static std::deque<std::string>& errors() {
    thread_local std::deque<std::string> e;
    return e;
  }
};

// TensorRT keeps a pointer to the logger for the life of every object: never destroyed.
Logger& logger() {
  static Logger* l = new Logger();
  return *l;
}

// "what: <TensorRT's own error messages>"
std::string trt_error(const std::string& what) {
  std::string said = logger().take();
  return said.empty() ? what : what + ": TensorRT said: " + said;
}

std::string to_string(rust::Str s) { return std::string(s.data(), s.size()); }

// A name from TensorRT as a Rust string; a name that is not UTF-8 is an error naming it (in hex), never
// the std::terminate an escaping exception from rust::String would be.
rust::String utf8_name(const char* name, const std::string& what) {
  if (!name) fail(what + " has no name");
  try {
    return rust::String(name);
  } catch (const std::exception&) {
    std::ostringstream hex;
    for (const char* c = name; *c; ++c) hex << std::hex << (static_cast<unsigned>(static_cast<unsigned char>(*c)));
    fail(what + " has a name that is not UTF-8 (bytes " + hex.str() + "); rename it in the ONNX graph and rebuild");
  }
}

std::string dims_string(const nvinfer1::Dims& d) {
  std::ostringstream o;
  o << "[";
  for (int32_t i = 0; i < d.nbDims; ++i) o << (i ? ", " : "") << d.d[i];
  o << "]";
  return o.str();
}

nvinfer1::Dims to_dims(rust::Slice<const int64_t> v, const std::string& name) {
  nvinfer1::Dims d{};
  if (v.size() > static_cast<std::size_t>(nvinfer1::Dims::MAX_DIMS)) {
    fail("tensor `" + name + "` has rank " + std::to_string(v.size()) + ", TensorRT allows at most " +
         std::to_string(nvinfer1::Dims::MAX_DIMS));
  }
  d.nbDims = static_cast<int32_t>(v.size());
  for (std::size_t i = 0; i < v.size(); ++i) d.d[i] = v[i];
  return d;
}

rust::Vec<int64_t> from_dims(const nvinfer1::Dims& d) {
  rust::Vec<int64_t> v;
  for (int32_t i = 0; i < d.nbDims; ++i) v.push_back(d.d[i]);
  return v;
}

// ---- dlopen helpers ----
struct Opened {
  void* handle = nullptr;
  std::string path;
};

// Opens `path`; on failure appends "path: dlerror" to `why`.
void* open_lib(const std::string& path, std::string& why) {
  dlerror();
  // RTLD_NODELETE: libraries are never unloaded (TensorRT/CUDA do not support it).
  void* h = dlopen(path.c_str(), RTLD_NOW | RTLD_LOCAL | RTLD_NODELETE);
  if (!h) {
    const char* e = dlerror();
    if (!why.empty()) why += "; ";
    why += e ? std::string(e) : path + ": cannot open";
  }
  return h;
}

template <class F>
F symbol(void* h, const char* name, const std::string& path, bool required = true) {
  dlerror();
  void* p = dlsym(h, name);
  if (!p && required) fail(path + " does not export " + name);
  return reinterpret_cast<F>(p);
}

std::string list_candidates(rust::Slice<const rust::String> c) {
  std::string s;
  for (const auto& x : c) s += (s.empty() ? "" : ", ") + std::string(x);
  return s;
}

int32_t version_major(int32_t v) { return v / 10000; }
std::string version_string(int32_t v) {
  return std::to_string(v / 10000) + "." + std::to_string((v / 100) % 100) + "." + std::to_string(v % 100);
}

}  // namespace

// ---- function tables ----
struct CudaFns {
  std::string path;
  decltype(&::cudaGetDeviceCount) getDeviceCount = nullptr;
  decltype(&::cudaDriverGetVersion) driverGetVersion = nullptr;
  decltype(&::cudaRuntimeGetVersion) runtimeGetVersion = nullptr;
  decltype(&::cudaGetErrorName) getErrorName = nullptr;
  decltype(&::cudaGetErrorString) getErrorString = nullptr;
  decltype(&::cudaGetLastError) getLastError = nullptr;
  decltype(&::cudaSetDevice) setDevice = nullptr;
  decltype(&::cudaDeviceGetAttribute) deviceGetAttribute = nullptr;
  decltype(&::cudaMemGetInfo) memGetInfo = nullptr;
  decltype(&::cudaStreamSynchronize) streamSynchronize = nullptr;
  decltype(&::cudaStreamBeginCapture) streamBeginCapture = nullptr;
  decltype(&::cudaStreamEndCapture) streamEndCapture = nullptr;
  decltype(&::cudaGraphInstantiateWithFlags) graphInstantiateWithFlags = nullptr;
  decltype(&::cudaGraphLaunch) graphLaunch = nullptr;
  decltype(&::cudaGraphExecDestroy) graphExecDestroy = nullptr;
  decltype(&::cudaGraphDestroy) graphDestroy = nullptr;

  std::string describe(cudaError_t e) const {
    return std::string(getErrorName(e)) + " (" + getErrorString(e) + ")";
  }
  void check(cudaError_t e, const std::string& what) const {
    if (e != cudaSuccess) {
      getLastError();  // clear the sticky-free error state
      fail(what + " failed: " + describe(e));
    }
  }
};

struct TrtFns {
  std::string path;
  void* (*createInferRuntime)(void*, int32_t) = nullptr;
  void* (*createInferBuilder)(void*, int32_t) = nullptr;  // absent in the lean runtime
  int32_t (*getInferLibVersion)() = nullptr;
};

struct OnnxFns {
  std::string path;
  void* (*createParser)(void*, void*, int) = nullptr;
  int (*getParserVersion)() = nullptr;
};

int32_t header_version() { return static_cast<int32_t>(NV_TENSORRT_VERSION); }

void logger_log_for_test(int32_t severity, rust::Str msg) {
  const std::string m = to_string(msg);
  logger().log(static_cast<nvinfer1::ILogger::Severity>(severity), m.c_str());
}

rust::String logger_take_for_test() { return rust::String(logger().take()); }

CompiledFacts compiled_facts() {
  CompiledFacts f{};
  f.half = static_cast<int32_t>(nvinfer1::DataType::kHALF);
  f.bf16 = static_cast<int32_t>(nvinfer1::DataType::kBF16);
  f.int64 = static_cast<int32_t>(nvinfer1::DataType::kINT64);
  f.severity_error = static_cast<int32_t>(nvinfer1::ILogger::Severity::kERROR);
  f.cuda_insufficient_driver = static_cast<int32_t>(cudaErrorInsufficientDriver);
  f.cuda_no_device = static_cast<int32_t>(cudaErrorNoDevice);
  return f;
}

rust::String utf8_name_for_test(rust::Slice<const uint8_t> bytes) {
  const std::string s(reinterpret_cast<const char*>(bytes.data()), bytes.size());
  return utf8_name(s.c_str(), "test tensor");
}

// ---- CUDA runtime ----
CudaRt::CudaRt(std::shared_ptr<CudaFns> f) : fns(std::move(f)) {}

rust::String CudaRt::path() const { return rust::String(fns->path); }

CudaInfo CudaRt::probe() const {
  CudaInfo info{};
  int v = 0;
  if (fns->driverGetVersion(&v) == cudaSuccess) info.driver_version = v;
  v = 0;
  if (fns->runtimeGetVersion(&v) == cudaSuccess) info.runtime_version = v;
  int n = 0;
  cudaError_t e = fns->getDeviceCount(&n);
  info.error_code = static_cast<int32_t>(e);
  if (e != cudaSuccess) {
    info.error_name = rust::String(fns->getErrorName(e));
    info.error_string = rust::String(fns->getErrorString(e));
    fns->getLastError();
    n = 0;
  }
  info.device_count = n;
  return info;
}

DeviceInfo CudaRt::device(int32_t ordinal) const {
  CudaInfo info = probe();
  if (info.error_code != 0) fail("cudaGetDeviceCount failed: " + std::string(info.error_name) + " (" + std::string(info.error_string) + ")");
  if (ordinal < 0 || ordinal >= info.device_count) {
    fail("CUDA device " + std::to_string(ordinal) + " does not exist (" + std::to_string(info.device_count) + " device(s))");
  }
  fns->check(fns->setDevice(ordinal), "cudaSetDevice(" + std::to_string(ordinal) + ")");
  DeviceInfo d{};
  d.ordinal = ordinal;
  fns->check(fns->deviceGetAttribute(&d.cc_major, cudaDevAttrComputeCapabilityMajor, ordinal), "cudaDeviceGetAttribute");
  fns->check(fns->deviceGetAttribute(&d.cc_minor, cudaDevAttrComputeCapabilityMinor, ordinal), "cudaDeviceGetAttribute");
  std::size_t free_b = 0, total_b = 0;
  fns->check(fns->memGetInfo(&free_b, &total_b), "cudaMemGetInfo");
  d.free_bytes = free_b;
  d.total_bytes = total_b;
  return d;
}

void CudaRt::synchronize(std::size_t stream) const {
  fns->check(fns->streamSynchronize(reinterpret_cast<cudaStream_t>(stream)), "cudaStreamSynchronize");
}

std::unique_ptr<CudaRt> cuda_load(rust::Slice<const rust::String> candidates) {
  std::string why;
  std::unique_ptr<CudaRt> fallback;
  for (const auto& c : candidates) {
    std::string path(c);
    void* h = open_lib(path, why);
    if (!h) continue;
    auto f = std::make_shared<CudaFns>();
    f->path = path;
    try {
      f->getDeviceCount = symbol<decltype(f->getDeviceCount)>(h, "cudaGetDeviceCount", path);
      f->driverGetVersion = symbol<decltype(f->driverGetVersion)>(h, "cudaDriverGetVersion", path);
      f->runtimeGetVersion = symbol<decltype(f->runtimeGetVersion)>(h, "cudaRuntimeGetVersion", path);
      f->getErrorName = symbol<decltype(f->getErrorName)>(h, "cudaGetErrorName", path);
      f->getErrorString = symbol<decltype(f->getErrorString)>(h, "cudaGetErrorString", path);
      f->getLastError = symbol<decltype(f->getLastError)>(h, "cudaGetLastError", path);
      f->setDevice = symbol<decltype(f->setDevice)>(h, "cudaSetDevice", path);
      f->deviceGetAttribute = symbol<decltype(f->deviceGetAttribute)>(h, "cudaDeviceGetAttribute", path);
      f->memGetInfo = symbol<decltype(f->memGetInfo)>(h, "cudaMemGetInfo", path);
      f->streamSynchronize = symbol<decltype(f->streamSynchronize)>(h, "cudaStreamSynchronize", path);
      f->streamBeginCapture = symbol<decltype(f->streamBeginCapture)>(h, "cudaStreamBeginCapture", path);
      f->streamEndCapture = symbol<decltype(f->streamEndCapture)>(h, "cudaStreamEndCapture", path);
      f->graphInstantiateWithFlags =
          symbol<decltype(f->graphInstantiateWithFlags)>(h, "cudaGraphInstantiateWithFlags", path);
      f->graphLaunch = symbol<decltype(f->graphLaunch)>(h, "cudaGraphLaunch", path);
      f->graphExecDestroy = symbol<decltype(f->graphExecDestroy)>(h, "cudaGraphExecDestroy", path);
      f->graphDestroy = symbol<decltype(f->graphDestroy)>(h, "cudaGraphDestroy", path);
    } catch (const std::exception& e) {
      why += (why.empty() ? "" : "; ") + std::string(e.what());
      continue;
    }
    auto rt = std::make_unique<CudaRt>(f);
    int n = 0;
    if (f->getDeviceCount(&n) == cudaErrorInsufficientDriver) {
      f->getLastError();
      // A newer runtime than the driver supports: an older candidate may still work.
      if (!fallback) fallback = std::move(rt);
      continue;
    }
    return rt;
  }
  if (fallback) return fallback;
  fail("no CUDA runtime library could be loaded (tried " + list_candidates(candidates) + "): " + why);
}

// ---- TensorRT runtime ----
TrtLib::TrtLib(std::shared_ptr<TrtFns> f) : fns(std::move(f)) {}
rust::String TrtLib::path() const { return rust::String(fns->path); }
int32_t TrtLib::version() const { return fns->getInferLibVersion(); }

namespace {
// Loads libnvinfer candidates until one has the compiled-against major version and is not older
// than the headers (its interfaces are then a superset of what this shim calls).
std::shared_ptr<TrtFns> load_nvinfer(rust::Slice<const rust::String> candidates, bool need_builder) {
  std::string why;
  for (const auto& c : candidates) {
    std::string path(c);
    void* h = open_lib(path, why);
    if (!h) continue;
    auto f = std::make_shared<TrtFns>();
    f->path = path;
    try {
      f->getInferLibVersion = symbol<decltype(f->getInferLibVersion)>(h, "getInferLibVersion", path);
      f->createInferRuntime = symbol<decltype(f->createInferRuntime)>(h, "createInferRuntime_INTERNAL", path);
      f->createInferBuilder =
          symbol<decltype(f->createInferBuilder)>(h, "createInferBuilder_INTERNAL", path, need_builder);
    } catch (const std::exception& e) {
      why += (why.empty() ? "" : "; ") + std::string(e.what());
      continue;
    }
    const int32_t v = f->getInferLibVersion();
    const int32_t want = static_cast<int32_t>(NV_TENSORRT_VERSION);
    if (version_major(v) != version_major(want) || v < want) {
      why += (why.empty() ? "" : "; ") + path + " is TensorRT " + version_string(v) +
             " but this binary was compiled with TensorRT " + version_string(want) +
             " headers (needs the same major version, not older): install TensorRT " +
             std::to_string(version_major(want)) + ".x >= " + version_string(want) +
             " or rebuild with TENSORRT_INCLUDE_DIR pointing at the installed TensorRT's headers";
      continue;
    }
    return f;
  }
  fail("TensorRT library not found or not usable (tried " + list_candidates(candidates) + "): " + why);
}
}  // namespace

std::unique_ptr<TrtLib> trt_load(rust::Slice<const rust::String> candidates) {
  return std::make_unique<TrtLib>(load_nvinfer(candidates, false));
}

namespace {
// Fails unless CUDA has a driver and device `ordinal`; makes `ordinal` current.
void require_device(const CudaRt& cuda, int32_t ordinal) {
  CudaInfo info = cuda.probe();
  if (info.driver_version == 0 || info.error_code == static_cast<int32_t>(cudaErrorInsufficientDriver)) {
    fail("no usable NVIDIA driver (libcuda.so.1): cudaGetDeviceCount says " + std::string(info.error_name) +
         " (" + std::string(info.error_string) + ")");
  }
  if (info.error_code != 0) {
    fail("CUDA is unavailable: cudaGetDeviceCount says " + std::string(info.error_name) + " (" +
         std::string(info.error_string) + ")");
  }
  if (ordinal < 0 || ordinal >= info.device_count) {
    fail("CUDA device " + std::to_string(ordinal) + " does not exist (" + std::to_string(info.device_count) +
         " device(s) visible)");
  }
  cuda.fns->check(cuda.fns->setDevice(ordinal), "cudaSetDevice(" + std::to_string(ordinal) + ")");
}
}  // namespace

Runtime::Runtime(std::shared_ptr<TrtFns> trt, std::shared_ptr<CudaFns> cuda, std::shared_ptr<nvinfer1::IRuntime> rt)
    : trt_(std::move(trt)), cuda_(std::move(cuda)), rt_(std::move(rt)) {}

std::unique_ptr<Runtime> runtime_new(const TrtLib& trt, const CudaRt& cuda, int32_t ordinal) {
  require_device(cuda, ordinal);
  logger().clear();
  void* p = trt.fns->createInferRuntime(&logger(), static_cast<int32_t>(NV_TENSORRT_VERSION));
  if (!p) fail(trt_error("createInferRuntime failed"));
  std::shared_ptr<nvinfer1::IRuntime> rt(static_cast<nvinfer1::IRuntime*>(p));
  return std::make_unique<Runtime>(trt.fns, cuda.fns, std::move(rt));
}

std::unique_ptr<Engine> Runtime::deserialize(rust::Slice<const uint8_t> plan) const {
  if (plan.size() == 0) fail("the engine plan is empty");
  logger().clear();
  nvinfer1::ICudaEngine* e = rt_->deserializeCudaEngine(plan.data(), plan.size());
  if (!e) {
    fail(trt_error("cannot deserialize the engine plan (corrupt file, or built by another TensorRT version or for "
                   "another GPU)"));
  }
  // The engine's owner keeps the runtime alive: whoever holds the engine (Engine, every Context) holds the
  // runtime, which TensorRT requires to outlive its engines, whatever order the Rust side drops them in.
  std::shared_ptr<nvinfer1::IRuntime> rt = rt_;
  std::shared_ptr<nvinfer1::ICudaEngine> engine(e, [rt](nvinfer1::ICudaEngine* p) { delete p; });
  return std::make_unique<Engine>(cuda_, rt_, std::move(engine));
}

// ---- engine ----
Engine::Engine(std::shared_ptr<CudaFns> cuda, std::shared_ptr<nvinfer1::IRuntime> rt,
               std::shared_ptr<nvinfer1::ICudaEngine> engine)
    : cuda_(std::move(cuda)), rt_(std::move(rt)), engine_(std::move(engine)) {}

rust::Vec<IoTensor> Engine::io_tensors() const {
  rust::Vec<IoTensor> out;
  const int32_t n = engine_->getNbIOTensors();
  for (int32_t i = 0; i < n; ++i) {
    const char* name = engine_->getIOTensorName(i);
    if (!name) continue;
    IoTensor t{};
    t.name = utf8_name(name, "IO tensor " + std::to_string(i) + " of the engine");
    t.is_input = engine_->getTensorIOMode(name) == nvinfer1::TensorIOMode::kINPUT;
    t.dtype = static_cast<int32_t>(engine_->getTensorDataType(name));
    t.shape = from_dims(engine_->getTensorShape(name));
    t.linear = engine_->getTensorFormat(name) == nvinfer1::TensorFormat::kLINEAR;
    t.on_device = engine_->getTensorLocation(name) == nvinfer1::TensorLocation::kDEVICE;
    t.shape_tensor = engine_->isShapeInferenceIO(name);
    out.push_back(std::move(t));
  }
  return out;
}

int32_t Engine::num_profiles() const { return engine_->getNbOptimizationProfiles(); }

ProfileRange Engine::profile(rust::Str name, int32_t profile) const {
  const std::string n = to_string(name);
  if (profile < 0 || profile >= engine_->getNbOptimizationProfiles()) {
    fail("optimization profile " + std::to_string(profile) + " does not exist");
  }
  ProfileRange r{};
  const nvinfer1::Dims mn = engine_->getProfileShape(n.c_str(), profile, nvinfer1::OptProfileSelector::kMIN);
  const nvinfer1::Dims op = engine_->getProfileShape(n.c_str(), profile, nvinfer1::OptProfileSelector::kOPT);
  const nvinfer1::Dims mx = engine_->getProfileShape(n.c_str(), profile, nvinfer1::OptProfileSelector::kMAX);
  if (mn.nbDims < 0 || op.nbDims < 0 || mx.nbDims < 0) fail("`" + n + "` is not an input of the engine");
  r.min = from_dims(mn);
  r.opt = from_dims(op);
  r.max = from_dims(mx);
  return r;
}

int64_t Engine::device_memory_size() const {
#if NV_TENSORRT_VERSION >= 100100
  return engine_->getDeviceMemorySizeV2();
#else
  return static_cast<int64_t>(engine_->getDeviceMemorySize());
#endif
}

std::unique_ptr<Context> Engine::create_context(int32_t profile, std::size_t stream, std::size_t memory,
                                                int64_t memory_size) const {
  const int64_t need = device_memory_size();
  if (memory_size < need) {
    fail("activation memory of " + std::to_string(memory_size) + " bytes is smaller than the engine's " +
         std::to_string(need));
  }
  logger().clear();
  nvinfer1::IExecutionContext* c =
      engine_->createExecutionContext(nvinfer1::ExecutionContextAllocationStrategy::kUSER_MANAGED);
  if (!c) fail(trt_error("createExecutionContext failed"));
  std::unique_ptr<nvinfer1::IExecutionContext> ctx(c);
  if (need > 0) {
#if NV_TENSORRT_VERSION >= 100100
    ctx->setDeviceMemoryV2(reinterpret_cast<void*>(memory), memory_size);
#else
    ctx->setDeviceMemory(reinterpret_cast<void*>(memory));
#endif
  }
  auto s = reinterpret_cast<cudaStream_t>(stream);
  if (!ctx->setOptimizationProfileAsync(profile, s)) {
    fail(trt_error("setOptimizationProfileAsync(" + std::to_string(profile) + ") failed"));
  }
  cuda_->check(cuda_->streamSynchronize(s), "cudaStreamSynchronize after selecting a profile");
  return std::make_unique<Context>(cuda_, engine_, std::move(ctx));
}

// ---- execution context ----
Context::Context(std::shared_ptr<CudaFns> cuda, std::shared_ptr<nvinfer1::ICudaEngine> engine,
                 std::unique_ptr<nvinfer1::IExecutionContext> ctx)
    : cuda_(std::move(cuda)), engine_(std::move(engine)), ctx_(std::move(ctx)) {}

Context::~Context() = default;

void Context::set_input_shape(rust::Str name, rust::Slice<const int64_t> dims) {
  const std::string n = to_string(name);
  const nvinfer1::Dims d = to_dims(dims, n);
  logger().clear();
  if (!ctx_->setInputShape(n.c_str(), d)) {
    fail(trt_error("setInputShape(`" + n + "`, " + dims_string(d) + ") was rejected"));
  }
}

rust::Vec<int64_t> Context::tensor_shape(rust::Str name) const {
  const std::string n = to_string(name);
  const nvinfer1::Dims d = ctx_->getTensorShape(n.c_str());
  if (d.nbDims < 0) fail("the shape of `" + n + "` is unknown (not an IO tensor, or inputs not all set)");
  return from_dims(d);
}

void Context::set_tensor_address(rust::Str name, std::size_t ptr) {
  const std::string n = to_string(name);
  logger().clear();
  if (!ctx_->setTensorAddress(n.c_str(), reinterpret_cast<void*>(ptr))) {
    fail(trt_error("setTensorAddress(`" + n + "`) was rejected"));
  }
}

void Context::enqueue(std::size_t stream) {
  if (!ctx_->allInputDimensionsSpecified()) fail("enqueue before every input shape was set");
  logger().clear();
  if (!ctx_->enqueueV3(reinterpret_cast<cudaStream_t>(stream))) fail(trt_error("enqueueV3 failed"));
}

std::unique_ptr<Graph> Context::capture(std::size_t stream) {
  auto s = reinterpret_cast<cudaStream_t>(stream);
  // Thread-local mode: work other threads submit meanwhile (other devices' workers) cannot
  // invalidate this capture.
  cuda_->check(cuda_->streamBeginCapture(s, cudaStreamCaptureModeThreadLocal), "cudaStreamBeginCapture");
  logger().clear();
  const bool enqueued = ctx_->enqueueV3(s);
  cudaGraph_t graph = nullptr;
  const cudaError_t ended = cuda_->streamEndCapture(s, &graph);  // always end, even after a failure
  if (!enqueued || ended != cudaSuccess || !graph) {
    if (graph) cuda_->graphDestroy(graph);
    cuda_->getLastError();
    std::string why = !enqueued ? trt_error("enqueueV3 during capture failed")
                                : "cudaStreamEndCapture failed: " + cuda_->describe(ended);
    fail("CUDA graph capture failed: " + why);
  }
  cudaGraphExec_t exec = nullptr;
  const cudaError_t inst = cuda_->graphInstantiateWithFlags(&exec, graph, 0);
  cuda_->graphDestroy(graph);
  if (inst != cudaSuccess || !exec) {
    cuda_->getLastError();
    fail("cudaGraphInstantiate failed: " + cuda_->describe(inst));
  }
  return std::make_unique<Graph>(cuda_, static_cast<void*>(exec));
}

// ---- CUDA graph ----
Graph::Graph(std::shared_ptr<CudaFns> cuda, void* exec) : cuda_(std::move(cuda)), exec_(exec) {}

Graph::~Graph() {
  if (exec_) cuda_->graphExecDestroy(static_cast<cudaGraphExec_t>(exec_));
}

void Graph::launch(std::size_t stream) const {
  cuda_->check(cuda_->graphLaunch(static_cast<cudaGraphExec_t>(exec_), reinterpret_cast<cudaStream_t>(stream)),
               "cudaGraphLaunch");
}

// ---- builder ----
BuilderLib::BuilderLib(std::shared_ptr<TrtFns> t, std::shared_ptr<OnnxFns> o) : trt(std::move(t)), onnx(std::move(o)) {}
rust::String BuilderLib::path() const { return rust::String(trt->path); }
rust::String BuilderLib::parser_path() const { return rust::String(onnx->path); }
int32_t BuilderLib::version() const { return trt->getInferLibVersion(); }

std::unique_ptr<BuilderLib> builder_load(rust::Slice<const rust::String> nvinfer, rust::Slice<const rust::String> parser) {
  auto trt = load_nvinfer(nvinfer, true);
  std::string why;
  for (const auto& c : parser) {
    std::string path(c);
    void* h = open_lib(path, why);
    if (!h) continue;
    auto f = std::make_shared<OnnxFns>();
    f->path = path;
    try {
      f->createParser = symbol<decltype(f->createParser)>(h, "createNvOnnxParser_INTERNAL", path);
      f->getParserVersion = symbol<decltype(f->getParserVersion)>(h, "getNvOnnxParserVersion", path, false);
    } catch (const std::exception& e) {
      why += (why.empty() ? "" : "; ") + std::string(e.what());
      continue;
    }
    return std::make_unique<BuilderLib>(trt, f);
  }
  fail("TensorRT ONNX parser not found (tried " + list_candidates(parser) + "): " + why);
}

BuildOutput build_engine(const BuilderLib& lib, const CudaRt& cuda, int32_t ordinal, rust::Str onnx_path,
                         rust::Str plan_path, rust::Slice<const BuildProfile> profiles,
                         const BuildSettings& settings, rust::Slice<const uint8_t> timing_cache) {
  require_device(cuda, ordinal);
  logger().clear();
  BuildOutput out{};
  void* b = lib.trt->createInferBuilder(&logger(), static_cast<int32_t>(NV_TENSORRT_VERSION));
  if (!b) fail(trt_error("createInferBuilder failed"));
  std::unique_ptr<nvinfer1::IBuilder> builder(static_cast<nvinfer1::IBuilder*>(b));

  uint32_t flags = 0;
#if NV_TENSORRT_MAJOR < 11
  // TensorRT 10: keep the ONNX graph's own precisions (bf16/fp16 exports, FP8 Q/DQ).
  // TensorRT 11 networks are always strongly typed.
  flags |= 1U << static_cast<uint32_t>(nvinfer1::NetworkDefinitionCreationFlag::kSTRONGLY_TYPED);
#endif
  std::unique_ptr<nvinfer1::INetworkDefinition> network(builder->createNetworkV2(flags));
  if (!network) fail(trt_error("createNetworkV2 failed"));

  void* p = lib.onnx->createParser(network.get(), &logger(), NV_ONNX_PARSER_VERSION);
  if (!p) fail(trt_error("createNvOnnxParser failed"));
  std::unique_ptr<nvonnxparser::IParser> parser(static_cast<nvonnxparser::IParser*>(p));
  const std::string onnx = to_string(onnx_path);
  if (!parser->parseFromFile(onnx.c_str(), static_cast<int>(nvinfer1::ILogger::Severity::kWARNING))) {
    std::string errs;
    for (int i = 0; i < parser->getNbErrors(); ++i) {
      const auto* e = parser->getError(i);
      if (!e) continue;
      errs += (errs.empty() ? "" : "; ") + std::string(e->desc());
      if (e->nodeName() && *e->nodeName()) errs += std::string(" (node ") + e->nodeName() + ")";
    }
    fail("the ONNX parser rejected " + onnx + ": " + (errs.empty() ? trt_error("no parser error given") : errs));
  }

  // Every dynamic network input must be covered by every profile.
  for (int32_t i = 0; i < network->getNbInputs(); ++i) {
    nvinfer1::ITensor* t = network->getInput(i);
    const std::string name = t->getName();
    const nvinfer1::Dims d = t->getDimensions();
    IoTensor io{};
    io.name = utf8_name(name.c_str(), "network input " + std::to_string(i));
    io.is_input = true;
    io.dtype = static_cast<int32_t>(t->getType());
    io.shape = from_dims(d);
    io.linear = true;
    io.on_device = true;
    io.shape_tensor = t->isShapeTensor();
    out.inputs.push_back(std::move(io));
    bool dynamic = false;
    for (int32_t k = 0; k < d.nbDims; ++k) dynamic = dynamic || d.d[k] < 0;
    if (!dynamic) continue;
    for (std::size_t pi = 0; pi < profiles.size(); ++pi) {
      bool found = false;
      for (const auto& in : profiles[pi].inputs) found = found || std::string(in.name) == name;
      if (!found) {
        fail("profile " + std::to_string(pi) + " has no shapes for dynamic input `" + name + "` " + dims_string(d));
      }
    }
  }

  // Declared before the config that refers to it, so that it is destroyed after the config on every path
  // (an exception unwinds locals in reverse order of declaration).
  std::unique_ptr<nvinfer1::ITimingCache> cache;
  std::unique_ptr<nvinfer1::IBuilderConfig> config(builder->createBuilderConfig());
  if (!config) fail(trt_error("createBuilderConfig failed"));
  if (settings.workspace_bytes > 0) {
    config->setMemoryPoolLimit(nvinfer1::MemoryPoolType::kWORKSPACE, static_cast<std::size_t>(settings.workspace_bytes));
  }
  if (settings.optimization_level >= 0) config->setBuilderOptimizationLevel(settings.optimization_level);

  cache.reset(config->createTimingCache(timing_cache.data(), timing_cache.size()));
  if (!cache || !config->setTimingCache(*cache, false)) {
    // A cache from another TensorRT version or GPU: start a fresh one rather than fail the build.
    out.warnings.push_back(rust::String(trt_error("the timing cache was not accepted, starting an empty one")));
    cache.reset(config->createTimingCache(nullptr, 0));
    if (!cache || !config->setTimingCache(*cache, false)) fail(trt_error("cannot create a timing cache"));
    out.timing_cache_reused = false;
  } else {
    out.timing_cache_reused = timing_cache.size() > 0;
  }

  for (std::size_t pi = 0; pi < profiles.size(); ++pi) {
    nvinfer1::IOptimizationProfile* prof = builder->createOptimizationProfile();
    if (!prof) fail(trt_error("createOptimizationProfile failed"));
    for (const auto& in : profiles[pi].inputs) {
      const std::string name(in.name);
      const nvinfer1::Dims mn = to_dims(rust::Slice<const int64_t>(in.min.data(), in.min.size()), name);
      const nvinfer1::Dims op = to_dims(rust::Slice<const int64_t>(in.opt.data(), in.opt.size()), name);
      const nvinfer1::Dims mx = to_dims(rust::Slice<const int64_t>(in.max.data(), in.max.size()), name);
      if (!prof->setDimensions(name.c_str(), nvinfer1::OptProfileSelector::kMIN, mn) ||
          !prof->setDimensions(name.c_str(), nvinfer1::OptProfileSelector::kOPT, op) ||
          !prof->setDimensions(name.c_str(), nvinfer1::OptProfileSelector::kMAX, mx)) {
        fail(trt_error("profile " + std::to_string(pi) + ": shapes of `" + name + "` rejected: min " +
                       dims_string(mn) + ", opt " + dims_string(op) + ", max " + dims_string(mx)));
      }
    }
    if (!prof->isValid()) fail(trt_error("profile " + std::to_string(pi) + " is not valid"));
    if (config->addOptimizationProfile(prof) < 0) fail(trt_error("addOptimizationProfile failed"));
  }

  logger().clear();
  std::unique_ptr<nvinfer1::IHostMemory> plan(builder->buildSerializedNetwork(*network, *config));
  if (!plan || plan->size() == 0) fail(trt_error("the TensorRT build failed"));

  const std::string path = to_string(plan_path);
  {
    std::ofstream f(path, std::ios::binary | std::ios::trunc);
    if (!f) fail("cannot write " + path);
    f.write(static_cast<const char*>(plan->data()), static_cast<std::streamsize>(plan->size()));
    f.flush();
    if (!f) fail("writing " + path + " failed (disk full?)");
  }
  out.plan_bytes = static_cast<uint64_t>(plan->size());

  const nvinfer1::ITimingCache* used = config->getTimingCache();
  if (used) {
    std::unique_ptr<nvinfer1::IHostMemory> blob(used->serialize());
    if (blob) {
      const auto* bytes = static_cast<const uint8_t*>(blob->data());
      out.timing_cache.reserve(blob->size());
      for (std::size_t i = 0; i < blob->size(); ++i) out.timing_cache.push_back(bytes[i]);
    }
  }
  // The same order as unwinding after an exception (reverse declaration): the config before the timing
  // cache it uses, the parser (which owns weights the network refers to) before the network, the builder last.
  plan.reset();
  config.reset();
  cache.reset();
  parser.reset();
  network.reset();
  builder.reset();
  return out;
}

}  // namespace qe
