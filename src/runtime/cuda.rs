//! CUDA device memory, pinned host staging and the worker's stream, through cudarc (driver API,
//! dlopen'ed). Every entry point checks for libcuda first: cudarc panics without it.

use cudarc::driver::{
    result as cu, CudaContext, CudaFunction, CudaSlice, CudaStream, DevicePtr, LaunchConfig, PinnedHostSlice, PushKernelArg,
};
use std::sync::Arc;

use super::nvrtc::{self, Nvrtc};
use super::staging::{Block, DeviceMemory, RowCopy, StagedRow, StagingAlloc, ROW_ALIGN};
use super::step::{self, StepShape};
use super::{DType, Error};

fn unavailable(reason: impl Into<String>) -> Error {
    Error::Unavailable { backend: "TensorRT".into(), reason: reason.into() }
}

fn driver(what: &str, e: cudarc::driver::DriverError) -> Error {
    Error::Run { component: "cuda".into(), reason: format!("{what}: {e}") }
}

/// Whether the NVIDIA driver library (libcuda.so) can be loaded.
pub fn driver_present() -> bool {
    // SAFETY: only tries to dlopen the library by its usual names.
    unsafe { cudarc::driver::sys::is_culib_present() }
}

/// One worker's device: the primary context of one GPU and the worker's own stream.
/// Everything a worker runs (copies, enqueues, graph launches) goes on this one stream, in order.
pub struct Device {
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
}

impl Device {
    /// Opens GPU `ordinal` with a new stream. Fails cleanly without a driver or device.
    pub fn open(ordinal: usize) -> Result<Device, Error> {
        if !driver_present() {
            return Err(unavailable("the NVIDIA driver library (libcuda.so.1) is not installed or not visible"));
        }
        // cudarc resolves driver symbols lazily and panics on a missing one (a very old driver);
        // turn that into an error instead of taking the process down.
        let opened = std::panic::catch_unwind(|| -> Result<Device, Error> {
            let count = CudaContext::device_count().map_err(|e| unavailable(format!("cuDeviceGetCount: {e}")))?;
            if ordinal >= count.max(0) as usize {
                return Err(unavailable(format!("CUDA device {ordinal} does not exist ({count} visible)")));
            }
            let ctx = CudaContext::new(ordinal).map_err(|e| unavailable(format!("cannot open CUDA device {ordinal}: {e}")))?;
            // One stream per worker and explicit synchronisation: cudarc's per-buffer events are not needed.
            // SAFETY: no buffer exists yet on this context.
            unsafe { ctx.disable_event_tracking() };
            let stream = ctx.new_stream().map_err(|e| driver("cuStreamCreate", e))?;
            Ok(Device { ctx, stream })
        });
        opened.unwrap_or_else(|_| Err(unavailable("the CUDA driver is missing a required entry point (driver too old?)")))
    }

    pub fn ordinal(&self) -> usize {
        self.ctx.ordinal()
    }

    /// The raw `CUstream` / `cudaStream_t` handle, for the TensorRT shim.
    pub fn stream_handle(&self) -> usize {
        self.stream.cu_stream() as usize
    }

    /// Makes this device's context current on the calling thread (engines may move between threads).
    pub fn bind(&self) -> Result<(), Error> {
        self.ctx.bind_to_thread().map_err(|e| driver("cuCtxSetCurrent", e))
    }

    /// Device name and (free, total) memory, for /health.
    pub fn describe(&self) -> Result<(String, usize, usize), Error> {
        let name = self.ctx.name().map_err(|e| driver("cuDeviceGetName", e))?;
        let (free, total) = self.ctx.mem_get_info().map_err(|e| driver("cuMemGetInfo", e))?;
        Ok((name, free, total))
    }

    /// Zeroed device memory of `bytes` (at least 1 byte so the address is real).
    pub fn alloc(&self, bytes: usize) -> Result<DeviceBuffer, Error> {
        let slice = self.stream.alloc_zeros::<u8>(bytes.max(1)).map_err(|e| driver(&format!("cuMemAlloc({bytes} bytes)"), e))?;
        let ptr = {
            let (ptr, _sync) = slice.device_ptr(&self.stream);
            ptr
        };
        Ok(DeviceBuffer { ptr, bytes, _slice: slice })
    }

    /// Page-locked host memory of `bytes`. `download` buffers are plain pinned memory (flags 0, fast
    /// to read on the host); upload buffers are write-combined (fast for the host to fill, for DMA).
    pub fn pinned(&self, bytes: usize, download: bool) -> Result<PinnedBuffer, Error> {
        let flags = if download { 0 } else { cudarc::driver::sys::CU_MEMHOSTALLOC_WRITECOMBINED };
        // SAFETY: the memory is uninitialised; callers only read what a copy wrote.
        let mem = unsafe { self.ctx.alloc_pinned_with_flags::<u8>(bytes.max(1), flags) }
            .map_err(|e| driver(&format!("cuMemHostAlloc({bytes} bytes)"), e))?;
        Ok(PinnedBuffer { mem, bytes })
    }

    /// Copies `data` into `staging` and enqueues staging -> `dst` on the stream.
    pub fn upload(&self, data: &[u8], staging: &mut PinnedBuffer, dst: &DeviceBuffer) -> Result<(), Error> {
        if data.len() > staging.bytes || data.len() > dst.bytes {
            return Err(Error::Run {
                component: "cuda".into(),
                reason: format!("upload of {} bytes does not fit its buffers", data.len()),
            });
        }
        let host = staging.mem.as_mut_slice().map_err(|e| driver("pinned buffer", e))?;
        host[..data.len()].copy_from_slice(data);
        // SAFETY: dst holds at least data.len() bytes; the pinned source stays alive and unchanged
        // until the stream is synchronised at the end of the run.
        unsafe { cu::memcpy_htod_async(dst.ptr, &host[..data.len()], self.stream.cu_stream()) }
            .map_err(|e| driver("cuMemcpyHtoDAsync", e))
    }

    /// Enqueues staged `rows`, adjacent in one staging block, -> `dst` at `dst_offset`: one copy straight from
    /// the pinned rows (a row that is not pinned is copied by the driver through its own buffer: counted).
    pub fn upload_rows(&self, rows: &[StagedRow], dst: &DeviceBuffer, dst_offset: usize) -> Result<(), Error> {
        let Some(first) = rows.first() else { return Ok(()) };
        let bytes: usize = rows.iter().map(StagedRow::bytes).sum();
        if dst_offset.checked_add(bytes).is_none_or(|end| end > dst.bytes) {
            return Err(Error::Run {
                component: "cuda".into(),
                reason: format!("{bytes} staged bytes at {dst_offset} overflow a {} byte buffer", dst.bytes),
            });
        }
        if !first.pinned() {
            rows.iter().for_each(StagedRow::count_driver_copy);
        }
        // SAFETY: the rows are adjacent in one live block (runtime::staging::upload_runs), so `bytes` from the
        // first row's start lie inside it; the rows are held by the job until the run synchronises.
        let src = unsafe { std::slice::from_raw_parts(first.as_bytes().as_ptr(), bytes) };
        unsafe { cu::memcpy_htod_async(dst.ptr + dst_offset as u64, src, self.stream.cu_stream()) }
            .map_err(|e| driver("cuMemcpyHtoDAsync (staged rows)", e))
    }

    /// Enqueues: zero the first `bytes` of `dst`, then `copies` (elements of `elem` bytes) from `src`.
    pub fn gather(
        &self,
        dst: &DeviceBuffer,
        bytes: usize,
        src: (u64, usize),
        copies: &[RowCopy],
        elem: usize,
    ) -> Result<(), Error> {
        let fits = |off: usize, n: usize, len: usize| {
            off.checked_mul(elem).and_then(|o| o.checked_add(n * elem)).is_some_and(|e| e <= len)
        };
        if bytes > dst.bytes || copies.iter().any(|c| !fits(c.src, c.elems, src.1) || !fits(c.dst, c.elems, bytes)) {
            return Err(Error::Run {
                component: "cuda".into(),
                reason: format!("a gather does not fit its buffers ({} -> {bytes})", src.1),
            });
        }
        let stream = self.stream.cu_stream();
        // SAFETY: every range was checked to lie inside live device allocations; all stream-ordered.
        unsafe { cu::memset_d8_async(dst.ptr, 0, bytes, stream) }.map_err(|e| driver("cuMemsetD8Async", e))?;
        for c in copies {
            let (s, d) = (src.0 + (c.src * elem) as u64, dst.ptr + (c.dst * elem) as u64);
            unsafe { cu::memcpy_dtod_async(d, s, c.elems * elem, stream) }
                .map_err(|e| driver("cuMemcpyDtoDAsync (gather)", e))?;
        }
        Ok(())
    }

    /// Enqueues `src` -> `staging` (first `bytes`) on the stream; read it after `synchronize`.
    pub fn download(&self, src: &DeviceBuffer, bytes: usize, staging: &mut PinnedBuffer) -> Result<(), Error> {
        if bytes > staging.bytes || bytes > src.bytes {
            return Err(Error::Run {
                component: "cuda".into(),
                reason: format!("download of {} bytes does not fit its buffers", bytes),
            });
        }
        let host = staging.mem.as_mut_slice().map_err(|e| driver("pinned buffer", e))?;
        // SAFETY: src holds at least `bytes`; the staging memory outlives the copy (synchronised before use).
        unsafe { cu::memcpy_dtoh_async(&mut host[..bytes], src.ptr, self.stream.cu_stream()) }
            .map_err(|e| driver("cuMemcpyDtoHAsync", e))
    }

    /// Enqueues a device-to-device copy of `bytes` from `src` (at `src_offset`) to the start of `dst`.
    pub fn copy(&self, src: &DeviceBuffer, src_offset: usize, dst: &DeviceBuffer, bytes: usize) -> Result<(), Error> {
        if src_offset.checked_add(bytes).is_none_or(|end| end > src.bytes) || bytes > dst.bytes {
            return Err(Error::Run {
                component: "cuda".into(),
                reason: format!(
                    "copy of {bytes} bytes at {src_offset} does not fit its buffers ({} -> {})",
                    src.bytes, dst.bytes
                ),
            });
        }
        // SAFETY: both ranges were checked to lie inside live allocations; stream-ordered.
        unsafe { cu::memcpy_dtod_async(dst.ptr, src.ptr + src_offset as u64, bytes, self.stream.cu_stream()) }
            .map_err(|e| driver("cuMemcpyDtoDAsync", e))
    }

    /// Compiles the denoising step (runtime::step) with NVRTC for this device and loads it.
    pub fn load_step_kernel(&self, nvrtc: &Nvrtc) -> Result<StepKernel, Error> {
        let cc = self.ctx.compute_capability().map_err(|e| driver("compute capability", e))?;
        // PTX for this device's architecture; an NVRTC older than the device compiles generic PTX,
        // which the driver compiles for the device when loading it.
        let ptx = nvrtc
            .compile(step::SOURCE, "denoise_step.cu", &nvrtc::step_options(Some(cc)))
            .or_else(|_| nvrtc.compile(step::SOURCE, "denoise_step.cu", &nvrtc::step_options(None)))?;
        let isa = nvrtc::ptx_isa(&ptx);
        let module = self.ctx.load_module(cudarc::nvrtc::Ptx::from_src(ptx)).map_err(|e| {
            driver(&format!("cuModuleLoadData (step kernel, PTX ISA {isa:?} from {}; a driver too old for it?)", nvrtc.path()), e)
        })?;
        let func = module.load_function(step::KERNEL).map_err(|e| driver("cuModuleGetFunction (step kernel)", e))?;
        Ok(StepKernel { func, compute_capability: cc })
    }

    /// Enqueues the step kernel on `velocity` (dtype `v`), the f32 latents `x`, the hidden states
    /// (dtype `h`) and the CFG `scales` (when `shape.cfg`).
    // The kernel's own argument list (buffers with their dtypes), passed through as it is.
    #[allow(clippy::too_many_arguments)]
    pub fn launch_step(
        &self,
        kernel: &StepKernel,
        shape: StepShape,
        velocity: (&DeviceBuffer, DType),
        x: &DeviceBuffer,
        hidden: (&DeviceBuffer, DType),
        scales: Option<&DeviceBuffer>,
        dt: f32,
    ) -> Result<(), Error> {
        let args = shape.check_buffers(
            (velocity.0.bytes, velocity.1),
            x.bytes,
            Some((hidden.0.bytes, hidden.1)),
            scales.map(|s| s.bytes),
            false,
        )?;
        let [batch, seq, img_seq, channels] = args.dims;
        let (v_code, h_code) = (args.v_code, args.h_code);
        let (v_ptr, x_ptr, h_ptr, s_ptr) = (velocity.0.ptr, x.ptr, hidden.0.ptr, scales.map_or(0u64, |s| s.ptr));
        let cfg = LaunchConfig { grid_dim: (shape.blocks(), 1, 1), block_dim: (step::BLOCK, 1, 1), shared_mem_bytes: 0 };
        let mut launch = self.stream.launch_builder(&kernel.func);
        launch
            .arg(&v_ptr)
            .arg(&v_code)
            .arg(&x_ptr)
            .arg(&h_ptr)
            .arg(&h_code)
            .arg(&s_ptr)
            .arg(&batch)
            .arg(&seq)
            .arg(&img_seq)
            .arg(&channels)
            .arg(&dt);
        // SAFETY: the argument list matches qe_cfg_euler's signature (pointers as 64-bit device
        // addresses); every buffer was checked to hold what the shape addresses.
        unsafe { launch.launch(cfg) }.map(|_| ()).map_err(|e| driver("cuLaunchKernel (step kernel)", e))
    }

    pub fn synchronize(&self) -> Result<(), Error> {
        self.stream.synchronize().map_err(|e| driver("cuStreamSynchronize", e))
    }
}

/// The denoising step kernel, compiled for one device and loaded into its context.
pub struct StepKernel {
    func: CudaFunction,
    compute_capability: (i32, i32),
}

impl StepKernel {
    pub fn compute_capability(&self) -> (i32, i32) {
        self.compute_capability
    }
}

/// Page-locked staging memory of a device's context (for preprocessing on any thread).
pub struct PinnedAlloc {
    device: Arc<Device>,
}

impl PinnedAlloc {
    pub fn new(device: Arc<Device>) -> PinnedAlloc {
        PinnedAlloc { device }
    }
}

impl StagingAlloc for PinnedAlloc {
    fn alloc(&self, bytes: usize) -> Result<Block, Error> {
        // Write-combined: preprocessing only writes it, the DMA engine reads it.
        let mut mem = self.device.pinned(bytes + ROW_ALIGN, false)?;
        let base = mem.mem.as_mut_ptr().map_err(|e| driver("pinned buffer", e))?;
        let pad = base.align_offset(ROW_ALIGN);
        // SAFETY: `pad + bytes` lies inside the allocation, which the block owns and never moves.
        Ok(unsafe { Block::new(base.add(pad), bytes, true, Box::new(mem)) })
    }
}

/// Device memory allocated once (at the largest size a profile allows) and reused by every run.
pub struct DeviceBuffer {
    ptr: u64,
    bytes: usize,
    _slice: CudaSlice<u8>,
}

impl DeviceBuffer {
    pub fn ptr(&self) -> u64 {
        self.ptr
    }
    pub fn bytes(&self) -> usize {
        self.bytes
    }
}

impl DeviceMemory for DeviceBuffer {
    fn device_ptr(&self) -> u64 {
        self.ptr
    }
    fn bytes(&self) -> usize {
        self.bytes
    }
}

/// Pinned host staging for one tensor.
pub struct PinnedBuffer {
    mem: PinnedHostSlice<u8>,
    bytes: usize,
}

impl PinnedBuffer {
    pub fn bytes(&self) -> usize {
        self.bytes
    }
    /// The first `n` bytes (valid after the stream was synchronised).
    pub fn read(&self, n: usize) -> Result<&[u8], Error> {
        let s = self.mem.as_slice().map_err(|e| driver("pinned buffer", e))?;
        s.get(..n).ok_or_else(|| Error::Run {
            component: "cuda".into(),
            reason: format!("read of {n} bytes past a {} byte staging buffer", self.bytes),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn opening_a_device_without_a_driver_is_a_clean_error() {
        if driver_present() {
            return; // a real GPU host: covered by scripts/gpu-smoke.sh
        }
        let e = Device::open(0).err().expect("no driver here").to_string();
        assert!(e.contains("libcuda.so.1") && e.contains("TensorRT backend unavailable"), "{e}");
    }
}
