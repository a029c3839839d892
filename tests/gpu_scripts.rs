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

fn serve(port: u16) -> Served {
    let child = Command::new(env!("CARGO_BIN_EXE_qwen-edit"))
        .arg("serve")
        .env("QWEN_EDIT_BACKEND", "ort")
        .env("API_HOST", "127.0.0.1")
        .env("API_PORT", port.to_string())
        .env("QWEN_EDIT_BUNDLE", Path::new(env!("CARGO_MANIFEST_DIR")).join("engines/tiny"))
        .env("BATCH_SIZE", "4")
        .env("BATCH_TIMEOUT_MS", "1000")
        .env("BATCH_POLICY", "fixed") // the smoke client checks that four concurrent requests form one batch
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("the server starts");
    Served(child)
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
/// Runtime servers, the same requests (true CFG, a batch of four, a second text bucket), the report.
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
    let _servers = (serve(a), serve(b));
    let started = std::time::Instant::now();
    while !(ready(a) && ready(b)) {
        assert!(started.elapsed().as_secs() < 120, "the servers did not become ready");
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    let out = Command::new(&python)
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/gpu_smoke.py"))
        .args(["--cpu", "--port", &a.to_string(), "--reference-port", &b.to_string(), "--bundle", "tiny"])
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
}
