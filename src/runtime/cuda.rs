//! CUDA device memory, pinned host staging and the worker's stream, through cudarc (driver API,
//! dlopen'ed). Every entry point checks for libcuda first: cudarc panics without it.

use cudarc::driver::{result as cu, CudaContext, CudaSlice, CudaStream, DevicePtr, PinnedHostSlice};
use std::sync::Arc;

use super::Error;

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

    pub fn synchronize(&self) -> Result<(), Error> {
        self.stream.synchronize().map_err(|e| driver("cuStreamSynchronize", e))
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
        s.get(..n).ok_or_else(|| Error::Run { component: "cuda".into(), reason: format!("read of {n} bytes past a {} byte staging buffer", self.bytes) })
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
