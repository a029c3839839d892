//! NVRTC, CUDA's run-time compiler, loaded with dlopen: turns the denoising step (runtime::step) into
//! PTX for the worker's GPU. It needs no GPU, so tests compile the real kernel here.

use std::ffi::{c_char, c_int, c_void, CStr, CString};

use super::Error;

type Program = *mut c_void;
type CreateFn =
    unsafe extern "C" fn(*mut Program, *const c_char, *const c_char, c_int, *const *const c_char, *const *const c_char) -> c_int;
type CompileFn = unsafe extern "C" fn(Program, c_int, *const *const c_char) -> c_int;
type SizeFn = unsafe extern "C" fn(Program, *mut usize) -> c_int;
type GetFn = unsafe extern "C" fn(Program, *mut c_char) -> c_int;
type DestroyFn = unsafe extern "C" fn(*mut Program) -> c_int;
type VersionFn = unsafe extern "C" fn(*mut c_int, *mut c_int) -> c_int;
type ErrorStringFn = unsafe extern "C" fn(c_int) -> *const c_char;

/// libnvrtc candidates: `QWEN_EDIT_NVRTC_LIB`, then the sonames of CUDA 13 and 12 and the dev link.
pub fn candidates() -> Vec<String> {
    let mut c: Vec<String> = std::env::var("QWEN_EDIT_NVRTC_LIB").ok().filter(|v| !v.trim().is_empty()).into_iter().collect();
    c.extend(["libnvrtc.so.13", "libnvrtc.so.12", "libnvrtc.so"].map(String::from));
    c
}

/// Tries each NVRTC candidate in turn until one gives a kernel the driver loads: `open` loads the library,
/// `build` compiles and loads the kernel with it. A newer NVRTC may compile PTX that an older driver cannot
/// load (NVRTC 13 on a driver before r580), so a load failure moves on to the next candidate (NVRTC 12)
/// instead of giving up. Returns the kernel and the candidate that made it, or every candidate's failure.
pub fn first_loadable<N, K>(
    candidates: &[String],
    mut open: impl FnMut(&str) -> Result<N, Error>,
    mut build: impl FnMut(&N) -> Result<K, Error>,
) -> Result<(K, String), String> {
    let mut tried = Vec::new();
    for c in candidates {
        match open(c).and_then(|n| build(&n)) {
            Ok(k) => {
                if !tried.is_empty() {
                    tracing::info!(nvrtc = %c, passed_over = %tried.join("; "), "step kernel built with a fallback NVRTC");
                }
                return Ok((k, c.clone()));
            }
            Err(e) => tried.push(format!("{c}: {e}")),
        }
    }
    Err(format!("no NVRTC candidate gave a loadable step kernel ({})", tried.join("; ")))
}

/// The PTX ISA version a PTX text declares (`.version 9.0`): what the driver must support to load it.
pub fn ptx_isa(ptx: &str) -> Option<(u32, u32)> {
    let line = ptx.lines().map(str::trim).find(|l| l.starts_with(".version "))?;
    let (major, minor) = line.trim_start_matches(".version ").trim().split_once('.')?;
    Some((major.parse().ok()?, minor.parse().ok()?))
}

/// Compiler options for the step kernel: IEEE float32 exactly as the host computes it (no fused
/// multiply-add, no flush to zero, correctly rounded division and sqrt), for `arch` (`compute_XY`).
pub fn step_options(compute_capability: Option<(i32, i32)>) -> Vec<String> {
    let mut o: Vec<String> = ["--fmad=false", "--ftz=false", "--prec-div=true", "--prec-sqrt=true"].map(String::from).to_vec();
    if let Some((major, minor)) = compute_capability {
        o.push(format!("--gpu-architecture=compute_{major}{minor}"));
    }
    o
}

/// A loaded libnvrtc.
pub struct Nvrtc {
    lib: libloading::Library,
    path: String,
}

fn missing(reason: String) -> Error {
    Error::LibraryMissing { library: "NVRTC (libnvrtc)".into(), reason }
}

impl Nvrtc {
    /// Loads the first candidate that opens and has the entry points used here.
    pub fn load(candidates: &[String]) -> Result<Nvrtc, Error> {
        let mut tried = Vec::new();
        for c in candidates {
            // SAFETY: loading libnvrtc runs no initialisation that depends on us.
            match unsafe { libloading::Library::new(c) } {
                Ok(lib) => {
                    let n = Nvrtc { lib, path: c.clone() };
                    // Resolve everything now so that a wrong library fails here, not mid-compile.
                    n.symbols().map_err(|e| missing(format!("{c}: {e}")))?;
                    return Ok(n);
                }
                Err(e) => tried.push(format!("{c}: {e}")),
            }
        }
        Err(missing(format!("none of the candidates loads ({})", tried.join("; "))))
    }

    pub fn path(&self) -> &str {
        &self.path
    }

    fn sym<T: Copy>(&self, name: &str) -> Result<T, String> {
        // SAFETY: every use names an NVRTC C API function with its nvrtc.h signature (stable since CUDA 7).
        unsafe { self.lib.get::<T>(name.as_bytes()) }.map(|s| *s).map_err(|e| format!("no `{name}` ({e})"))
    }

    // One tuple of the nine NVRTC entry points, each already a named fn-pointer type.
    #[allow(clippy::type_complexity)]
    fn symbols(
        &self,
    ) -> Result<(CreateFn, CompileFn, SizeFn, GetFn, SizeFn, GetFn, DestroyFn, VersionFn, ErrorStringFn), String> {
        Ok((
            self.sym("nvrtcCreateProgram")?,
            self.sym("nvrtcCompileProgram")?,
            self.sym("nvrtcGetPTXSize")?,
            self.sym("nvrtcGetPTX")?,
            self.sym("nvrtcGetProgramLogSize")?,
            self.sym("nvrtcGetProgramLog")?,
            self.sym("nvrtcDestroyProgram")?,
            self.sym("nvrtcVersion")?,
            self.sym("nvrtcGetErrorString")?,
        ))
    }

    /// NVRTC's (major, minor) version.
    pub fn version(&self) -> Result<(i32, i32), Error> {
        let s = self.symbols().map_err(missing)?;
        let (mut major, mut minor) = (0, 0);
        // SAFETY: two out-parameters.
        let r = unsafe { (s.7)(&mut major, &mut minor) };
        if r != 0 {
            return Err(missing(format!("nvrtcVersion returned {r}")));
        }
        Ok((major, minor))
    }

    /// Compiles CUDA C++ `source` (named `name` in messages) to PTX. A compile error carries NVRTC's log.
    pub fn compile(&self, source: &str, name: &str, options: &[String]) -> Result<String, Error> {
        let (create, compile, ptx_size, get_ptx, log_size, get_log, destroy, _, error_string) =
            self.symbols().map_err(missing)?;
        let fail = |reason: String| Error::Run { component: format!("NVRTC ({name})"), reason };
        let src = CString::new(source).map_err(|_| fail("source contains a NUL byte".into()))?;
        let cname = CString::new(name).map_err(|_| fail("name contains a NUL byte".into()))?;
        let opts: Vec<CString> = options
            .iter()
            .map(|o| CString::new(o.as_str()))
            .collect::<Result<_, _>>()
            .map_err(|_| fail("option with a NUL byte".into()))?;
        let opt_ptrs: Vec<*const c_char> = opts.iter().map(|o| o.as_ptr()).collect();
        let describe = |r: c_int| -> String {
            // SAFETY: nvrtcGetErrorString returns a static string for any code.
            let p = unsafe { error_string(r) };
            if p.is_null() {
                format!("NVRTC error {r}")
            } else {
                // SAFETY: non-null static NUL-terminated string.
                unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned()
            }
        };
        let mut prog: Program = std::ptr::null_mut();
        // SAFETY: valid NUL-terminated strings that outlive the call; no headers.
        let r = unsafe { create(&mut prog, src.as_ptr(), cname.as_ptr(), 0, std::ptr::null(), std::ptr::null()) };
        if r != 0 || prog.is_null() {
            return Err(fail(format!("nvrtcCreateProgram: {}", describe(r))));
        }
        let read = |size: SizeFn, get: GetFn| -> Result<String, c_int> {
            let mut n = 0usize;
            // SAFETY: prog is a live program; the buffer has the size NVRTC reported.
            let r = unsafe { size(prog, &mut n) };
            if r != 0 {
                return Err(r);
            }
            let mut buf = vec![0u8; n.max(1)];
            let r = unsafe { get(prog, buf.as_mut_ptr() as *mut c_char) };
            if r != 0 {
                return Err(r);
            }
            let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
            Ok(String::from_utf8_lossy(&buf[..end]).into_owned())
        };
        // SAFETY: prog is live; the option pointers outlive the call.
        let r = unsafe { compile(prog, opt_ptrs.len() as c_int, opt_ptrs.as_ptr()) };
        let result = if r != 0 {
            let log = read(log_size, get_log).unwrap_or_default();
            Err(fail(format!("compile failed ({}): {}", describe(r), log.trim())))
        } else {
            read(ptx_size, get_ptx).map_err(|r| fail(format!("nvrtcGetPTX: {}", describe(r))))
        };
        // SAFETY: destroys the program created above, once.
        unsafe { destroy(&mut prog) };
        result
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The NVRTC from the PyPI wheel (scripts/fetch-gpu-headers.sh), required where CI requires the shim.
    fn test_nvrtc() -> Option<Nvrtc> {
        let required = std::env::var("QWEN_EDIT_REQUIRE_TRT_SHIM").is_ok_and(|v| v == "1");
        match std::env::var("QWEN_EDIT_TEST_NVRTC_LIB").ok().filter(|p| std::path::Path::new(p).is_file()) {
            Some(p) => Some(Nvrtc::load(&[p]).expect("the NVRTC wheel's library loads")),
            None => {
                assert!(!required, "QWEN_EDIT_REQUIRE_TRT_SHIM=1 but QWEN_EDIT_TEST_NVRTC_LIB is not set: source .deps/env");
                eprintln!("skipped: QWEN_EDIT_TEST_NVRTC_LIB not set (scripts/fetch-gpu-headers.sh)");
                None
            }
        }
    }

    #[test]
    fn the_step_kernel_compiles_to_ptx() {
        let Some(nvrtc) = test_nvrtc() else { return };
        let (major, _) = nvrtc.version().unwrap();
        assert!(major >= 12, "NVRTC {major}");
        for cc in [None, Some((8, 0)), Some((9, 0))] {
            let ptx = nvrtc.compile(crate::runtime::step::SOURCE, "denoise_step.cu", &step_options(cc)).unwrap();
            assert!(ptx.contains(".entry qe_cfg_euler("), "no kernel entry in the PTX:\n{}", &ptx[..ptx.len().min(800)]);
            if let Some((ma, mi)) = cc {
                assert!(ptx.contains(&format!(".target sm_{ma}{mi}")), "PTX not for sm_{ma}{mi}");
            }
            // --fmad=false: the device rounds each product like the host does.
            assert!(!ptx.contains("fma.rn.f32"), "the step kernel must not fuse multiply-adds");
        }
    }

    #[test]
    fn a_kernel_the_driver_cannot_load_falls_back_to_the_next_nvrtc() {
        // An EMULATED driver (no GPU here): it loads PTX up to ISA 8.7 (CUDA 12.8), as an r570 driver does.
        let driver_loads = |isa: (u32, u32)| -> Result<(u32, u32), Error> {
            if isa <= (8, 7) {
                Ok(isa)
            } else {
                Err(Error::Run { component: "cuda".into(), reason: "CUDA_ERROR_UNSUPPORTED_PTX_VERSION".into() })
            }
        };
        let isa_of = |c: &str| -> Result<(u32, u32), Error> {
            match c {
                "libnvrtc.so.13" => Ok((9, 0)),
                "libnvrtc.so.12" => Ok((8, 7)),
                other => Err(missing(format!("{other}: cannot open shared object file"))),
            }
        };
        let c: Vec<String> = ["libnvrtc.so.13", "libnvrtc.so.12", "libnvrtc.so"].map(String::from).to_vec();
        let (isa, used) = first_loadable(&c, isa_of, |&isa| driver_loads(isa)).unwrap();
        assert_eq!((isa, used.as_str()), ((8, 7), "libnvrtc.so.12"));
        // Nothing loadable: every attempt is in the error.
        let e = first_loadable(&c[..1], isa_of, |&isa| driver_loads(isa)).unwrap_err();
        assert!(e.contains("libnvrtc.so.13") && e.contains("UNSUPPORTED_PTX_VERSION"), "{e}");
        let e = first_loadable(&c[2..], isa_of, |&isa| driver_loads(isa)).unwrap_err();
        assert!(e.contains("cannot open"), "{e}");
    }

    #[test]
    fn the_real_kernel_declares_its_ptx_isa() {
        let Some(nvrtc) = test_nvrtc() else { return };
        let ptx = nvrtc.compile(crate::runtime::step::SOURCE, "denoise_step.cu", &step_options(Some((8, 0)))).unwrap();
        let (major, _) = ptx_isa(&ptx).expect("PTX has a .version line");
        let (nv_major, _) = nvrtc.version().unwrap();
        // NVRTC 13 emits PTX ISA 9.x, NVRTC 12 8.x: what decides which drivers can load it.
        assert_eq!(major as i32, nv_major - 4, "NVRTC {nv_major} emitted PTX ISA {major}");
        assert_eq!(ptx_isa(".version 8.5\n.target sm_80"), Some((8, 5)));
        assert_eq!(ptx_isa("no header"), None);
    }

    #[test]
    fn compile_errors_carry_the_log() {
        let Some(nvrtc) = test_nvrtc() else { return };
        let e = nvrtc.compile("extern \"C\" __global__ void k() { undeclared_thing(); }", "bad.cu", &[]).unwrap_err().to_string();
        assert!(e.contains("bad.cu") && e.contains("undeclared_thing"), "{e}");
    }

    #[test]
    fn a_missing_library_is_a_clean_error() {
        let e = Nvrtc::load(&["/nonexistent/libnvrtc.so.13".into()]).err().expect("cannot load").to_string();
        assert!(e.contains("NVRTC (libnvrtc) is not available") && e.contains("/nonexistent/libnvrtc.so.13"), "{e}");
        let not_nvrtc = Nvrtc::load(&["libc.so.6".into()]).err().expect("libc is not NVRTC").to_string();
        assert!(not_nvrtc.contains("nvrtcCreateProgram"), "{not_nvrtc}");
    }
}
