//! 8-bit mode end to end on ONNX Runtime CPU: the committed FP8 tiny bundle edits through `qwen-edit edit`
//! and `serve` (PRECISION_MODE=8bit), close to but not equal to its fp32 twin; `/health` reports the
//! precision in use; a PRECISION_MODE the bundle does not carry is a start-up error naming the fix.

mod server_support;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use server_support::*;

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn bundle(name: &str) -> String {
    root().join("engines").join(name).display().to_string()
}

const PROMPT: &str = "make the sky a sunset";
const SEED: u64 = 7;
const STEPS: u32 = 3;

fn image_path() -> PathBuf {
    root().join("engines/tiny/reference/images/square.png")
}

/// `qwen-edit edit` with `args`; (exit code, stderr).
fn edit(args: &[&str]) -> (i32, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_qwen-edit"))
        .current_dir(root())
        .arg("edit")
        .args(args)
        .env_remove("PRECISION_MODE")
        .output()
        .expect("run qwen-edit edit");
    (out.status.code().unwrap_or(-1), String::from_utf8_lossy(&out.stderr).into_owned())
}

fn cli_image(bundle_dir: &str, precision: &str, out: &Path) -> image::RgbImage {
    let img = image_path().display().to_string();
    let (seed, steps) = (SEED.to_string(), STEPS.to_string());
    let args = ["--bundle", bundle_dir, "--precision", precision, "--backend", "ort", "--image", &img, "--prompt", PROMPT];
    let out_s = out.display().to_string();
    let (code, err) = edit(&[&args[..], &["--seed", &seed, "--steps", &steps, "--out", &out_s]].concat());
    assert_eq!(code, 0, "{err}");
    image::open(out).unwrap().to_rgb8()
}

fn psnr(a: &image::RgbImage, b: &image::RgbImage) -> f64 {
    assert_eq!(a.dimensions(), b.dimensions());
    let n = a.as_raw().len() as f64;
    let mse = a.as_raw().iter().zip(b.as_raw()).map(|(&x, &y)| (f64::from(x) - f64::from(y)).powi(2)).sum::<f64>() / n;
    10.0 * (255.0f64.powi(2) / mse).log10()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fp8_bundle_edits_on_the_cli_and_the_server_close_to_its_fp32_twin() {
    let tmp = tempfile::tempdir().unwrap();
    let fp8 = cli_image(&bundle("tiny-fp8"), "8bit", &tmp.path().join("fp8.png"));
    let fp32 = cli_image(&bundle("tiny"), "fp32", &tmp.path().join("fp32.png"));
    let p = psnr(&fp8, &fp32);
    // The FP8 transformer is in use (the images differ) and close to fp32 (benches/fp8_quality.py: all cases).
    assert!(fp8 != fp32, "the FP8 bundle gave the fp32 image: its Q/DQ did not run");
    assert!(p > 30.0, "FP8 vs fp32 PSNR {p:.1} dB");

    let fp8_dir = bundle("tiny-fp8");
    let server = spawn(&[("QWEN_EDIT_BUNDLE", fp8_dir.as_str()), ("PRECISION_MODE", "8bit")]).await;
    let health = get(server.addr, "/health").await.json();
    assert_eq!(health["precision"], "fp8", "{health}");
    assert_eq!(health["precision_mode"], "fp8", "{health}");
    assert_eq!(health["model"]["dtype"], "float32", "{health}");
    let body = edit_body(PROMPT, SEED, STEPS, &b64(&std::fs::read(image_path()).unwrap()));
    let r = post_json(server.addr, body).await;
    assert_eq!(r.status, 200, "{}\n{}", r.text(), server.log());
    assert!(r.image() == fp8, "the server's FP8 image differs from `qwen-edit edit`'s");
    drop(server);

    // The fp32 bundle under the default mode reports fp32.
    let server = spawn(&[("PRECISION_MODE", "auto")]).await;
    let health = get(server.addr, "/health").await.json();
    assert_eq!((health["precision"].as_str(), health["precision_mode"].as_str()), (Some("fp32"), Some("auto")), "{health}");
}

/// `qwen-edit serve` that must fail to start: its exit code and log.
fn serve_failing(env: &[(&str, &str)]) -> (i32, String) {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_qwen-edit"));
    cmd.arg("serve")
        .current_dir(root())
        .env("API_HOST", "127.0.0.1")
        .env("API_PORT", "0")
        .env("QWEN_EDIT_BACKEND", "ort")
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut child = cmd.spawn().unwrap();
    let deadline = Instant::now() + Duration::from_secs(120);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("qwen-edit serve did not exit for {env:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let mut log = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut log).unwrap();
    (status.code().unwrap_or(-1), log)
}

#[test]
fn a_precision_the_bundle_does_not_carry_is_a_start_up_error_naming_the_fix() {
    let tiny = bundle("tiny");
    let (code, log) = serve_failing(&[("QWEN_EDIT_BUNDLE", tiny.as_str()), ("PRECISION_MODE", "fp8")]);
    assert_eq!(code, 1, "{log}");
    assert!(log.contains("PRECISION_MODE=fp8") && log.contains("--precision fp8") && log.contains("QWEN_EDIT_BUNDLE"), "{log}");

    let fp8 = bundle("tiny-fp8");
    let (code, log) = serve_failing(&[("QWEN_EDIT_BUNDLE", fp8.as_str()), ("PRECISION_MODE", "bf16")]);
    assert_eq!(code, 1, "{log}");
    assert!(log.contains("quantized to FP8") && log.contains("PRECISION_MODE=fp8"), "{log}");

    let (code, log) = serve_failing(&[("PRECISION_MODE", "4bit")]);
    assert_eq!(code, 2, "an unknown mode is a bad setting: {log}");
    assert!(log.contains("PRECISION_MODE") && log.contains("8bit"), "{log}");

    // `edit`: a bad-use exit code (2) and the same message.
    let img = image_path().display().to_string();
    let out = std::env::temp_dir().join("qwen-edit-fp8-mismatch.png").display().to_string();
    let (code, err) = edit(&["--bundle", &fp8, "--precision", "fp32", "--image", &img, "--prompt", "x", "--out", &out]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("quantized to FP8") && err.contains("--dtype float32"), "{err}");
}
