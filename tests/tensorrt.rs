//! TensorRT side without a GPU: the shim is compiled where CI requires it, every entry point ends in a
//! clean error naming what is missing (library, driver, device), and `build --dry-run` / `inspect` work.

use std::path::{Path, PathBuf};
use std::process::Command;

use qwen_edit::builder::{self, exit, BuildArgs};
use qwen_edit::runtime::backend::{choose, BackendKind, BackendRequest, GpuProbe};
use qwen_edit::runtime::shim::{self, CudaRuntime, CudaStatus, TrtLibrary};
use qwen_edit::runtime::tensorrt::{TrtOptions, TrtWorker};
use serde_json::{json, Value};

fn required() -> bool {
    std::env::var("QWEN_EDIT_REQUIRE_TRT_SHIM").is_ok_and(|v| v == "1")
}

/// A test library path from .deps/env (scripts/fetch-gpu-headers.sh); required when the shim is.
fn test_lib(var: &str) -> Option<PathBuf> {
    match std::env::var(var).ok().filter(|v| !v.is_empty()).map(PathBuf::from) {
        Some(p) if p.is_file() => Some(p),
        other => {
            assert!(!required(), "QWEN_EDIT_REQUIRE_TRT_SHIM=1 but {var} is {other:?}: source .deps/env after scripts/setup.sh");
            eprintln!("skipped: {var} not set (run scripts/fetch-gpu-headers.sh and source .deps/env)");
            None
        }
    }
}

fn has_gpu_driver() -> bool {
    qwen_edit::runtime::cuda::driver_present()
}

#[test]
fn shim_is_compiled_when_ci_requires_it() {
    if required() {
        let compiled = shim::COMPILED;
        assert!(compiled, "QWEN_EDIT_REQUIRE_TRT_SHIM=1 but the TensorRT shim was not compiled (see the build warning)");
        let v = shim::header_version().expect("compiled shim knows its headers");
        assert!(v.major >= 10, "{v}");
    }
    assert_eq!(shim::header_version().is_some(), shim::COMPILED);
}

#[test]
fn a_real_libcudart_without_a_driver_says_no_driver() {
    let Some(lib) = test_lib("QWEN_EDIT_TEST_CUDART_LIB") else { return };
    if !shim::COMPILED || has_gpu_driver() {
        return;
    }
    let cuda = CudaRuntime::load(&[lib.display().to_string()]).expect("libcudart from the wheel loads");
    assert_eq!(cuda.path(), lib.display().to_string());
    match cuda.status() {
        CudaStatus::NoDriver { reason } => assert!(reason.contains("libcuda.so.1"), "{reason}"),
        other => panic!("expected no driver, got {other:?}"),
    }
    match cuda.device(0) {
        Ok(d) => panic!("a device without a driver: {d:?}"),
        Err(e) => assert!(!e.to_string().is_empty()),
    }
}

#[test]
fn a_real_tensorrt_library_without_a_driver_never_creates_a_runtime() {
    let (Some(cudart), Some(lean)) = (test_lib("QWEN_EDIT_TEST_CUDART_LIB"), test_lib("QWEN_EDIT_TEST_TRT_LEAN_LIB")) else {
        return;
    };
    if !shim::COMPILED || has_gpu_driver() {
        return;
    }
    let trt = TrtLibrary::load(&[lean.display().to_string()]).expect("libnvinfer_lean 11.4 loads");
    let v = trt.version().expect("a version");
    assert_eq!((v.major, v.minor), (11, 4), "{v}");
    let cuda = CudaRuntime::load(&[cudart.display().to_string()]).unwrap();
    // TensorRT 11.4 hands out a bogus runtime without a driver: the shim must refuse before asking.
    let e = shim::Runtime::new(&trt, &cuda, 0).err().expect("no runtime without a driver").to_string();
    assert!(e.contains("no usable NVIDIA driver"), "{e}");
    // The lean library has no builder: loading it as one is a clean error too.
    let e =
        shim::BuilderLibrary::load(&[lean.display().to_string()], &["libnvonnxparser.so.11".into()]).err().unwrap().to_string();
    assert!(e.contains("createInferBuilder_INTERNAL"), "{e}");
}

#[test]
fn a_library_of_the_wrong_kind_is_refused_cleanly() {
    if !shim::COMPILED {
        return;
    }
    let Some(cudart) = test_lib("QWEN_EDIT_TEST_CUDART_LIB") else { return };
    // libcudart is a real shared library but not TensorRT.
    let e = TrtLibrary::load(&[cudart.display().to_string()]).err().unwrap().to_string();
    assert!(e.contains("getInferLibVersion"), "{e}");
}

#[test]
fn opening_the_gpu_backend_fails_cleanly_and_auto_falls_back() {
    if has_gpu_driver() {
        return; // a GPU host: scripts/gpu-smoke.sh
    }
    let e = TrtWorker::open(TrtOptions::default()).err().expect("no GPU here").to_string();
    assert!(["built without the TensorRT shim", "libcudart", "NVIDIA driver", "libnvinfer"].iter().any(|w| e.contains(w)), "{e}");
    let probe = GpuProbe::detect();
    let c = choose(BackendRequest::Auto, &probe, &Ok(vec![PathBuf::from("x.plan")])).unwrap();
    assert_eq!(c.backend, BackendKind::Ort);
    assert!(!c.gpu_available);
    assert!(c.reason.starts_with("ONNX Runtime on CPU: no GPU backend"), "{}", c.reason);
    let e = choose(BackendRequest::TensorRt, &probe, &Ok(vec![])).unwrap_err().to_string();
    assert!(e.contains("TensorRT backend unavailable"), "{e}");
}

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/onnx").join(name)
}

fn io(name: &str, dtype: &str, shape: Value) -> Value {
    json!({"name": name, "dtype": dtype, "shape": shape})
}

fn component(file: &str, inputs: Value, outputs: Value) -> Value {
    json!({"file": file, "sha256": "0".repeat(64), "external_data": [], "inputs": inputs, "outputs": outputs})
}

fn scheduler() -> Value {
    json!({"base_image_seq_len": 256, "max_image_seq_len": 8192, "base_shift": 0.5, "max_shift": 0.9,
           "shift_terminal": null, "time_shift_type": "exponential", "use_dynamic_shifting": true,
           "num_train_timesteps": 1000, "shift": 1.0})
}

/// A bundle whose four components are the IO-contract fixtures (tiny sizes: image area 64x64).
fn bundle() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let files = [
        ("text_encoder", "text_encoder_io.onnx"),
        ("transformer", "transformer_io.onnx"),
        ("vae_encoder", "vae_encoder_io.onnx"),
        ("vae_decoder", "vae_decoder_bf16.onnx"),
    ];
    for (c, f) in files {
        std::fs::copy(fixture(f), dir.path().join(format!("{c}.onnx"))).unwrap();
    }
    std::fs::write(dir.path().join("tokenizer.json"), "{}").unwrap();
    let m = json!({
        "format": "qwen-edit-bundle", "format_version": 1, "name": "contract-fixtures", "variant": "edit",
        "dtype": "float32", "source": {"checkpoint": "fixtures", "tiny": true, "seed": 0}, "lightning": null,
        "components": {
            "text_encoder": component("text_encoder.onnx",
                json!([io("input_ids", "int64", json!(["batch", "seq"]))]),
                json!([io("hidden_states", "float32", json!(["batch", "seq", 16]))])),
            "transformer": component("transformer.onnx",
                json!([io("hidden_states", "float32", json!(["batch", "img_seq", 64]))]),
                json!([io("sample", "float32", json!(["batch", "img_seq", 64]))])),
            "vae_encoder": component("vae_encoder.onnx",
                json!([io("image", "float32", json!(["batch", 3, "height", "width"]))]),
                json!([io("latent", "float32", json!(["batch", 16, "lh", "lw"]))])),
            "vae_decoder": component("vae_decoder.onnx",
                json!([io("latent", "bfloat16", json!(["batch", 16, "lh", "lw"]))]),
                json!([io("image", "bfloat16", json!(["batch", 3, "lh", "lw"]))])),
        },
        "tokenizer": "tokenizer.json",
        "prompt": {"template": "<|im_start|>{}<|im_end|>", "image_template": null, "drop_tokens": 64, "max_text_tokens": 256},
        "vision": {"patch_size": 14, "temporal_patch_size": 2, "merge_size": 2, "min_pixels": 3136, "max_pixels": 50176,
                   "resample": "bicubic", "rescale_factor": 0.00392156862745098,
                   "image_mean": [0.48145466, 0.4578275, 0.40821073], "image_std": [0.26862954, 0.26130258, 0.27577711],
                   "window_size": 112, "image_token_id": 151655, "video_token_id": 151656, "vision_start_token_id": 151652,
                   "condition_area": null},
        "vae": {"scale_factor": 8, "z_dim": 16, "latents_mean": vec![0.0; 16], "latents_std": vec![1.0; 16],
                "image_area": 4096, "resample": "lanczos"},
        "transformer": {"patch_size": 2, "in_channels": 64, "out_channels": 16, "axes_dims_rope": [16, 56, 56],
                        "rope_theta": 10000.0, "rope_positions": 4096, "zero_cond_t": false, "joint_attention_dim": 32},
        "scheduler": {"base": scheduler(), "lightning": scheduler()},
        "defaults": {"num_inference_steps": 50, "true_cfg_scale": 4.0, "lightning_steps": 8},
        "profiles": {"batch_sizes": [1, 2], "resolutions": [[64, 64], [80, 48]], "max_text_tokens": 256},
    });
    std::fs::write(dir.path().join("manifest.json"), serde_json::to_string_pretty(&m).unwrap()).unwrap();
    dir
}

#[test]
fn dry_run_plans_every_component_without_a_gpu() {
    let dir = bundle();
    let args = BuildArgs { bundle: dir.path().to_path_buf(), dry_run: true, ..BuildArgs::default() };
    let mut lines = Vec::new();
    let report = builder::build(&args, &mut |l| lines.push(l.to_string()));
    assert_eq!(report.exit_code, exit::OK, "{:?}", report.error);
    assert_eq!(report.components.len(), 4);
    let te = report.components.iter().find(|c| c.component == "text_encoder").unwrap();
    assert_eq!(te.status, "planned");
    assert_eq!(te.onnx_sha256.len(), 64);
    // One profile per batch-size group (profiles.batch_sizes = [1, 2]), tuned for 1 and for 2 requests.
    assert_eq!(te.profiles.len(), 2);
    let ids = |k: usize| te.profiles[k].inputs.iter().find(|i| i.name == "input_ids").unwrap().clone();
    // seq: 1 .. drop_tokens + max_text_tokens; batch: 1 .. 2 requests x 2 (CFG)
    assert_eq!((ids(1).min, ids(1).max), (vec![1, 1], vec![4, 64 + 256]));
    assert_eq!((ids(0).opt[0], ids(0).max[0], ids(1).opt[0]), (2, 2, 4));
    let tr = report.components.iter().find(|c| c.component == "transformer").unwrap();
    let hs = tr.profiles[0].inputs.iter().find(|i| i.name == "hidden_states").unwrap();
    // 64x64 output: 4x4 packed tokens + the 64x64 condition image (4x4); 80x48: 5x3 tokens + its
    // condition image calculate_dimensions(4096, 80/48) = 96x64 (6x4). Max = largest target + largest condition.
    assert_eq!((hs.min[1], hs.opt[1], hs.max[1]), (16 + 16, 16 + 16, 16 + 24));
    let dec = report.components.iter().find(|c| c.component == "vae_decoder").unwrap();
    assert_eq!(dec.precision, "bf16");
    assert!(lines.iter().any(|l| l.contains("dry run")), "{lines:?}");
    // The report is JSON.
    let v = serde_json::to_value(&report).unwrap();
    assert_eq!(v["components"][0]["status"], "planned");
}

#[test]
fn the_fp8_bundle_plans_an_fp8_transformer_with_the_fp8_tolerance() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("engines/tiny-fp8");
    let args = BuildArgs { bundle: dir.clone(), dry_run: true, ..BuildArgs::default() };
    let report = builder::build(&args, &mut |_| {});
    assert_eq!(report.exit_code, exit::OK, "{:?}", report.error);
    for c in &report.components {
        assert_eq!(c.precision, if c.component == "transformer" { "fp8" } else { "fp32" }, "{}", c.component);
    }
    assert_eq!(builder::default_tolerance("fp8"), (0.1, 0.1));
    assert!(!dir.join("transformer.plan").exists() && !dir.join("tensorrt.timing.cache").exists());
}

#[test]
fn build_without_a_gpu_exits_with_the_unavailable_code() {
    if has_gpu_driver() {
        return;
    }
    let dir = bundle();
    let args = BuildArgs { bundle: dir.path().to_path_buf(), components: vec!["vae_encoder".into()], ..BuildArgs::default() };
    let report = builder::build(&args, &mut |_| {});
    assert_eq!(report.exit_code, exit::UNAVAILABLE, "{:?}", report.error);
    let e = report.error.unwrap();
    assert!(e.starts_with("no GPU build environment:"), "{e}");
    assert!(!dir.path().join("vae_encoder.plan").exists());
}

#[test]
fn build_input_errors_exit_with_the_input_code() {
    let missing = BuildArgs { bundle: PathBuf::from("/nonexistent/bundle"), dry_run: true, ..BuildArgs::default() };
    assert_eq!(builder::build(&missing, &mut |_| {}).exit_code, exit::INPUT);
    let dir = bundle();
    let unknown =
        BuildArgs { bundle: dir.path().to_path_buf(), components: vec!["unet".into()], dry_run: true, ..BuildArgs::default() };
    let r = builder::build(&unknown, &mut |_| {});
    assert_eq!(r.exit_code, exit::INPUT);
    assert!(r.error.unwrap().contains("unet"));
    let bad_res = BuildArgs { bundle: dir.path().to_path_buf(), batch_sizes: vec![0], dry_run: true, ..BuildArgs::default() };
    assert_eq!(builder::build(&bad_res, &mut |_| {}).exit_code, exit::INPUT);
    std::fs::write(dir.path().join("transformer.onnx"), b"garbage").unwrap();
    let corrupt = BuildArgs { bundle: dir.path().to_path_buf(), dry_run: true, ..BuildArgs::default() };
    let r = builder::build(&corrupt, &mut |_| {});
    assert_eq!(r.exit_code, exit::INPUT);
    assert!(r.error.unwrap().contains("not a valid ONNX model"));
}

fn cli() -> Command {
    Command::new(env!("CARGO_BIN_EXE_qwen-edit"))
}

#[test]
fn cli_inspect_and_build_exit_codes() {
    let out = cli().arg("inspect").arg(fixture("transformer_io.onnx")).output().unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("sample: f32[batch, img_seq, 64]"), "{text}");

    let out = cli().args(["inspect", "--json"]).arg(fixture("external.onnx")).output().unwrap();
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["info"]["external_data"][0], "external.onnx.data");

    let dir = tempfile::tempdir().unwrap();
    let plan = dir.path().join("corrupt.plan");
    std::fs::write(&plan, b"\0\0not a plan").unwrap();
    let out = cli().arg("inspect").arg(&plan).output().unwrap();
    let code = out.status.code();
    if has_gpu_driver() {
        assert!(code == Some(exit::INPUT as i32) || code == Some(exit::UNAVAILABLE as i32), "{code:?}");
    } else {
        assert_eq!(code, Some(exit::UNAVAILABLE as i32), "{}", String::from_utf8_lossy(&out.stderr));
    }

    let b = bundle();
    let report = dir.path().join("report.json");
    let out = cli().args(["build", "--dry-run", "--bundle"]).arg(b.path()).arg("--report").arg(&report).output().unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stderr).contains("[build]"), "progress goes to stderr");
    let v: Value = serde_json::from_slice(&std::fs::read(&report).unwrap()).unwrap();
    assert_eq!(v["exit_code"], 0);
    assert_eq!(v["components"].as_array().unwrap().len(), 4);
}
