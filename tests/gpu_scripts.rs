//! The GPU host scripts' logic without a GPU: scripts/trt-headers.sh picks the TensorRT headers that match
//! the host's TensorRT library (fake library files and header folders here), so a host with TensorRT 10
//! does not compile the shim against the 11.4 headers of the setup and then fail every engine load.

use std::path::Path;
use std::process::Command;

fn headers(version: (u32, u32, u32), style_11: bool) -> String {
    let (a, b, c) = version;
    if style_11 {
        // TensorRT 11 defines the version through other macros, as its real NvInferVersion.h does.
        format!(
            "#define TRT_MAJOR_ENTERPRISE {a}\n#define TRT_MINOR_ENTERPRISE {b}\n#define TRT_PATCH_ENTERPRISE {c}\n\
             #define NV_TENSORRT_MAJOR TRT_MAJOR_ENTERPRISE //!< major\n#define NV_TENSORRT_MINOR TRT_MINOR_ENTERPRISE\n\
             #define NV_TENSORRT_PATCH TRT_PATCH_ENTERPRISE\n"
        )
    } else {
        format!("#define NV_TENSORRT_MAJOR {a} //!< major\n#define NV_TENSORRT_MINOR {b}\n#define NV_TENSORRT_PATCH {c}\n")
    }
}

fn run(root: &Path, header_dirs: &[&str]) -> (bool, String, String) {
    let dirs: Vec<String> = header_dirs.iter().map(|d| root.join(d).display().to_string()).collect();
    let out = Command::new("bash")
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/trt-headers.sh"))
        .env("QE_TRT_LIB_DIRS", root.join("lib"))
        .env("QE_TRT_HEADER_DIRS", dirs.join(" "))
        .env_remove("TENSORRT_INCLUDE_DIR")
        .env_remove("QWEN_EDIT_TRT_LIB")
        .output()
        .expect("bash runs");
    (out.status.success(), String::from_utf8_lossy(&out.stdout).trim().to_string(), String::from_utf8_lossy(&out.stderr).into())
}

#[test]
fn trt_headers_match_the_hosts_tensorrt_library() {
    let t = tempfile::tempdir().unwrap();
    let root = t.path();
    std::fs::create_dir_all(root.join("lib")).unwrap();
    std::fs::write(root.join("lib/libnvinfer.so.10.13.2"), b"").unwrap();
    std::os::unix::fs::symlink("libnvinfer.so.10.13.2", root.join("lib/libnvinfer.so.10")).unwrap();
    for (dir, v, style) in [("h11", (11, 4, 0), true), ("h10new", (10, 16, 1), false), ("h10", (10, 8, 0), false)] {
        std::fs::create_dir_all(root.join(dir)).unwrap();
        std::fs::write(root.join(dir).join("NvInferVersion.h"), headers(v, style)).unwrap();
    }
    // TensorRT 10.13 on the host: not the setup's 11.4 headers, not 10.16 (newer than the library): 10.8.
    let (ok, dir, log) = run(root, &["h11", "h10new", "h10"]);
    assert!(ok, "{log}");
    assert_eq!(dir, root.join("h10").display().to_string());
    // Only the 11.4 headers: a clear error that names the library's version and what to install.
    let (ok, dir, log) = run(root, &["h11"]);
    assert!(!ok && dir.is_empty());
    assert!(log.contains("10.13.2") && log.contains("libnvinfer-dev") && log.contains("11.4.0"), "{log}");
    // A TensorRT 11 library takes the 11 headers.
    std::fs::remove_file(root.join("lib/libnvinfer.so.10")).unwrap();
    std::fs::write(root.join("lib/libnvinfer.so.11.4.0"), b"").unwrap();
    let (ok, dir, log) = run(root, &["h10", "h11"]);
    assert!(ok, "{log}");
    assert_eq!(dir, root.join("h11").display().to_string());
    // No library at all.
    std::fs::remove_dir_all(root.join("lib")).unwrap();
    let (ok, _, log) = run(root, &["h11"]);
    assert!(!ok && log.contains("no TensorRT library"), "{log}");
}

/// Kills the server it holds when dropped (so a failing assertion leaves no server behind).
struct Served(std::process::Child);

impl Drop for Served {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `qwen-edit serve` of the tiny bundle on ONNX Runtime; with `log`, its log goes there as JSON lines, with the
/// pipeline's debug lines (`batch stages`) that gpu-smoke.sh asks for (`RUST_LOG=info,qwen_edit::pipeline=debug`).
fn serve(port: u16, log: Option<&Path>) -> Served {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_qwen-edit"));
    cmd.arg("serve")
        .env("QWEN_EDIT_BACKEND", "ort")
        .env("API_HOST", "127.0.0.1")
        .env("API_PORT", port.to_string())
        .env("QWEN_EDIT_BUNDLE", Path::new(env!("CARGO_MANIFEST_DIR")).join("engines/tiny"))
        .env("BATCH_SIZE", "4")
        .env("BATCH_TIMEOUT_MS", "1000")
        .env("BATCH_POLICY", "fixed") // the smoke client checks that four concurrent requests form one batch
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null());
    if let Some(path) = log {
        cmd.env("LOG_FORMAT", "json")
            .env("RUST_LOG", "info,qwen_edit::pipeline=debug")
            .stderr(std::fs::File::create(path).expect("the log file"));
    }
    Served(cmd.spawn().expect("the server starts"))
}

/// The body of `GET path` (the server answers with a content length and closes).
fn get_text(port: u16, path: &str) -> String {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).expect("connect");
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes()).unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text).unwrap();
    text.split_once("\r\n\r\n").map(|(_, body)| body.to_string()).unwrap_or_default()
}

/// Sum of one histogram's `_sum` or `_count` over every `batch_size` (e.g. `suffix` "sum", `stage` "text_encoder").
fn stage_total(metrics: &str, suffix: &str, stage: &str) -> f64 {
    let prefix = format!("qwen_edit_stage_duration_seconds_{suffix}{{stage=\"{stage}\",");
    metrics.lines().filter(|l| l.starts_with(&prefix)).filter_map(|l| l.rsplit_once(' ')?.1.parse::<f64>().ok()).sum()
}

fn ready(port: u16) -> bool {
    use std::io::{Read, Write};
    let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", port)) else { return false };
    let _ = s.write_all(b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
    let mut text = String::new();
    let _ = s.read_to_string(&mut text);
    text.contains("\"ready\"")
}

/// The client half of gpu-smoke.sh (scripts/gpu_smoke.py) runs everywhere in its `--cpu` mode: two ONNX
/// Runtime servers, the same requests (true CFG, a batch of four, a second text bucket), the report. The server
/// under test writes its real JSON log, which the client reads (`--log`) for the report's per-stage ms: those
/// figures are the mean over the smoke requests' batches only (not the memory probe's batches at start-up), as
/// the server's own stage histograms in /metrics count them.
#[test]
fn the_smoke_client_runs_its_requests_and_report_against_cpu_servers() {
    let python = Path::new(env!("CARGO_MANIFEST_DIR")).join(".venv/bin/python");
    if !python.is_file() {
        let required = std::env::var("QWEN_EDIT_REQUIRE_TRT_SHIM").is_ok_and(|v| v == "1");
        assert!(!required, "CI runs scripts/setup.sh, which makes .venv");
        eprintln!("skipped: no .venv (scripts/setup.sh)");
        return;
    }
    let port = |l: std::net::TcpListener| l.local_addr().unwrap().port();
    let (a, b) =
        (port(std::net::TcpListener::bind("127.0.0.1:0").unwrap()), port(std::net::TcpListener::bind("127.0.0.1:0").unwrap()));
    let logs = tempfile::tempdir().unwrap();
    let log = logs.path().join("server.log");
    let _servers = (serve(a, Some(&log)), serve(b, None));
    let started = std::time::Instant::now();
    while !(ready(a) && ready(b)) {
        assert!(started.elapsed().as_secs() < 120, "the servers did not become ready");
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    let out = Command::new(&python)
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/gpu_smoke.py"))
        .args(["--cpu", "--port", &a.to_string(), "--reference-port", &b.to_string(), "--bundle", "tiny"])
        .arg("--log")
        .arg(&log)
        .output()
        .expect("python runs");
    let report = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{report}\n{}", String::from_utf8_lossy(&out.stderr));
    for line in [
        "### gpu-smoke: tiny",
        "true CFG: batch 1",
        "batch of 4: batch 4",
        "same bucket again",
        "host_loop_steps 16",
        "result: OK",
    ] {
        assert!(report.contains(line), "no `{line}` in the report:\n{report}");
    }

    // The per-stage line, against the server's stage histograms (the same batches, counted by another path).
    let log_text = std::fs::read_to_string(&log).unwrap();
    let metrics = get_text(a, "/metrics");
    let batches = stage_total(&metrics, "count", "text_encoder");
    let mean_ms = |stage: &str| 1000.0 * stage_total(&metrics, "sum", stage) / batches;
    assert!(batches >= 4.0, "four request groups ran: {batches} batches\n{metrics}");
    let line = report
        .lines()
        .find_map(|l| l.strip_prefix("- mean per-stage ms of the "))
        .unwrap_or_else(|| panic!("no per-stage line in the report:\n{report}\nlog:\n{log_text}"));
    let (n, figures) = line.split_once(" batches: ").unwrap_or_else(|| panic!("{line}"));
    assert_eq!(n.parse::<f64>().ok(), Some(batches), "the batches of the smoke requests only: {line}\n{metrics}");
    let figures: std::collections::BTreeMap<&str, f64> = figures
        .split(", ")
        .map(|f| {
            let (k, v) = f.split_once(' ').unwrap_or_else(|| panic!("{line}"));
            (k, v.parse().unwrap_or_else(|_| panic!("{line}")))
        })
        .collect();
    assert_eq!(figures.keys().copied().collect::<Vec<_>>(), ["decode", "denoise", "text", "vae_encode"], "{line}");
    // Printed with one decimal: within 0.05 ms of the histograms' mean.
    for (figure, stage) in [("text", "text_encoder"), ("vae_encode", "vae_encoder"), ("decode", "vae_decoder")] {
        let want = mean_ms(stage);
        assert!(want > 0.0 && (figures[figure] - want).abs() <= 0.051, "{figure}: {} vs {want:.3} ms\n{report}", figures[figure]);
    }
    // The denoising stage holds every step (the histogram's samples) and lies within the batch's time.
    let steps = mean_ms("denoise_step");
    assert!(figures["denoise"] >= steps - 0.051, "denoise {} < its steps {steps:.3} ms\n{report}", figures["denoise"]);
    let batch_ms = 1000.0 * qwen_edit::metrics::sample(&metrics, "qwen_edit_batch_inference_duration_seconds_sum").unwrap()
        / qwen_edit::metrics::sample(&metrics, "qwen_edit_batch_inference_duration_seconds_count").unwrap();
    assert!(figures.values().sum::<f64>() <= batch_ms + 0.2, "stages {figures:?} > batch {batch_ms:.3} ms\n{report}");
    // The log held more `batch stages` lines than that (the memory probe's at start-up), which the report leaves out.
    let probe = log_text.lines().filter(|l| l.contains("batch stages")).count() as f64 - batches;
    assert!(probe >= 1.0, "the start-up's batches are in the log: {probe}\n{log_text}");
    eprintln!("{report}");
}
