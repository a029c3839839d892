//! Build script: compiles the denoising step (cpp/denoise_step.h) for the host, always; and the C++
//! TensorRT shim (cpp/) with cxx-build where the TensorRT and CUDA headers are found, setting `cfg(qe_trt)`,
//! with the TensorRT/CUDA facts the Rust side needs generated from those headers by bindgen (cpp/trt_facts.h).

use std::env;
use std::path::{Path, PathBuf};

fn main() {
    println!("cargo::rustc-check-cfg=cfg(qe_trt)");
    println!("cargo::rerun-if-env-changed=TENSORRT_INCLUDE_DIR");
    println!("cargo::rerun-if-env-changed=CUDA_INCLUDE_DIR");
    println!("cargo::rerun-if-env-changed=QWEN_EDIT_NO_TRT_SHIM");
    println!("cargo::rerun-if-env-changed=QWEN_EDIT_REQUIRE_TRT_SHIM");
    println!("cargo::rerun-if-env-changed=LIBCLANG_PATH");
    let required = env::var_os("QWEN_EDIT_REQUIRE_TRT_SHIM").is_some_and(|v| v == "1");
    println!("cargo::rerun-if-changed=build.rs");

    // The CPU side of the step the GPU kernel runs: no fused multiply-add, so both round alike.
    for f in ["cpp/denoise_step.h", "cpp/denoise_host.cpp"] {
        println!("cargo::rerun-if-changed={f}");
    }
    cc::Build::new()
        .cpp(true)
        .file("cpp/denoise_host.cpp")
        .opt_level(2)
        .flag_if_supported("-ffp-contract=off")
        .flag_if_supported("-fno-fast-math")
        .compile("qwen_edit_denoise_step");

    let root = PathBuf::from(env::var("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR"));
    let dir = |var: &str, default: &str| -> PathBuf {
        env::var_os(var).filter(|v| !v.is_empty()).map(PathBuf::from).unwrap_or_else(|| root.join(default))
    };
    let trt = dir("TENSORRT_INCLUDE_DIR", ".deps/tensorrt/include");
    let cuda = dir("CUDA_INCLUDE_DIR", ".deps/cuda/include");
    // Re-run when the headers appear or change (a missing path makes cargo re-run every build,
    // which is cheap here: nothing is compiled then).
    println!("cargo::rerun-if-changed={}", trt.join("NvInferVersion.h").display());
    println!("cargo::rerun-if-changed={}", cuda.join("cuda_runtime_api.h").display());

    if env::var_os("QWEN_EDIT_NO_TRT_SHIM").is_some_and(|v| v == "1") && !required {
        println!("cargo::warning=QWEN_EDIT_NO_TRT_SHIM=1: building without the TensorRT shim");
        return;
    }
    let missing: Vec<String> =
        [(&trt, "NvInferRuntime.h"), (&trt, "NvOnnxParser.h"), (&cuda, "cuda_runtime_api.h"), (&cuda, "crt/host_defines.h")]
            .iter()
            .filter(|(d, f)| !Path::new(d).join(f).is_file())
            .map(|(d, f)| d.join(f).display().to_string())
            .collect();
    if !missing.is_empty() {
        if required {
            panic!(
                "QWEN_EDIT_REQUIRE_TRT_SHIM=1 but the TensorRT shim cannot be compiled: missing {}. Run \
                 scripts/fetch-gpu-headers.sh (CI: scripts/setup.sh) or set TENSORRT_INCLUDE_DIR / CUDA_INCLUDE_DIR",
                missing.join(", ")
            );
        }
        println!(
            "cargo::warning=TensorRT shim not compiled (missing {}): run scripts/fetch-gpu-headers.sh \
             or set TENSORRT_INCLUDE_DIR / CUDA_INCLUDE_DIR",
            missing.join(", ")
        );
        return;
    }

    for f in ["cpp/trt_shim.cpp", "cpp/trt_shim.h", "cpp/trt_facts.h", "src/runtime/shim_ffi.rs"] {
        println!("cargo::rerun-if-changed={f}");
    }
    if let Err(e) = generate_facts(&trt, &cuda) {
        if required {
            panic!("QWEN_EDIT_REQUIRE_TRT_SHIM=1 but bindgen cannot read the TensorRT headers: {e}");
        }
        println!("cargo::warning=TensorRT shim not compiled: bindgen cannot read the TensorRT headers ({e})");
        return;
    }
    cxx_build::bridge("src/runtime/shim_ffi.rs")
        .file("cpp/trt_shim.cpp")
        .include(&trt)
        .include(&cuda)
        .std("c++17")
        .flag_if_supported("-Wno-deprecated-declarations")
        .flag_if_supported("-Wno-unused-parameter")
        .compile("qwen_edit_trt_shim");
    println!("cargo::rustc-link-lib=dylib=dl");
    println!("cargo::rustc-cfg=qe_trt");
}

/// Generates `$OUT_DIR/trt_facts.rs` from cpp/trt_facts.h: TensorRT's version and enums and the CUDA error
/// codes, as the headers define them (libclang: `LIBCLANG_PATH`, set by scripts/fetch-gpu-headers.sh).
fn generate_facts(trt: &Path, cuda: &Path) -> Result<(), String> {
    let out = PathBuf::from(env::var("OUT_DIR").map_err(|e| e.to_string())?).join("trt_facts.rs");
    // A libclang without its resource headers (the PyPI wheel's) takes the C compiler's (stddef.h, ...).
    let builtin = std::process::Command::new(env::var("CC").unwrap_or_else(|_| "cc".into()))
        .arg("-print-file-name=include")
        .output()
        .ok()
        .map(|o| PathBuf::from(String::from_utf8_lossy(&o.stdout).trim()))
        .filter(|p| p.join("stddef.h").is_file());
    let bindings = bindgen::Builder::default()
        .header("cpp/trt_facts.h")
        .clang_args(["-x", "c++", "-std=c++17"])
        .clang_args(builtin.map(|p| format!("-idirafter{}", p.display())))
        .clang_arg(format!("-I{}", trt.display()))
        .clang_arg(format!("-I{}", cuda.display()))
        .allowlist_var("qe_facts::.*")
        .allowlist_type("nvinfer1::DataType")
        .allowlist_type("nvinfer1::TensorIOMode")
        .allowlist_type("nvinfer1::TensorFormat")
        .allowlist_type("nvinfer1::TensorLocation")
        .allowlist_type("cudaError")
        .constified_enum_module(".*")
        .enable_cxx_namespaces()
        .layout_tests(false)
        .generate_comments(false)
        .generate()
        .map_err(|e| format!("{e} (is libclang installed? set LIBCLANG_PATH; scripts/fetch-gpu-headers.sh fetches it)"))?;
    bindings.write_to_file(&out).map_err(|e| format!("cannot write {}: {e}", out.display()))
}
