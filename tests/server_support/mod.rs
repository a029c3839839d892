//! Helpers of the server integration tests: settings for the real tiny bundle, a small HTTP client
//! over loopback (hyper), raw-socket requests, test images and request bodies, and the built binary
//! as a child process (also used by benches/load.rs).
#![allow(dead_code)] // shared by several test binaries, each using a part

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use qwen_edit::config::Settings;
use qwen_edit::imaging::{self, OutputFormat, RgbImage};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

pub const BUNDLE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/engines/tiny");

/// An in-process server on `settings`, once its model is loaded.
pub async fn start(settings: Settings) -> qwen_edit::server::Server {
    let server = qwen_edit::server::Server::start(settings).await.expect("server starts");
    tokio::time::timeout(Duration::from_secs(120), server.ready()).await.expect("loads in time").expect("the tiny bundle loads");
    server
}

/// Shuts `server` down and checks that every request in flight was drained.
pub async fn stop(server: qwen_edit::server::Server) {
    server.shutdown();
    assert_eq!(server.wait().await.expect("clean stop"), qwen_edit::server::Drain::Clean);
}

/// Settings for an in-process test server: the tiny bundle on CPU, an ephemeral loopback port.
pub fn settings() -> Settings {
    Settings {
        addr: "127.0.0.1:0".parse().unwrap(),
        bundle: BUNDLE.into(),
        backend: qwen_edit::runtime::backend::BackendRequest::Ort,
        batch_size: 4,
        batch_timeout: Duration::from_millis(40),
        request_timeout: Duration::from_secs(120),
        shutdown_timeout: Duration::from_secs(60),
        ..Settings::builtin()
    }
}

/// A response as the tests see it.
#[derive(Debug)]
pub struct Reply {
    pub status: u16,
    pub headers: http::HeaderMap,
    pub body: Bytes,
}

impl Reply {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&self.body)))
    }
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
    pub fn error_type(&self) -> String {
        self.json()["error_type"].as_str().unwrap_or("").to_string()
    }
    /// The result image, decoded.
    pub fn image(&self) -> RgbImage {
        let v = self.json();
        let b64 = v["image"].as_str().unwrap_or_else(|| panic!("no image in {}", self.text()));
        let bytes = b64_decode(b64);
        imaging::decode(&bytes, &imaging::Limits::default()).expect("the result image decodes")
    }
}

pub fn b64(bytes: &[u8]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

pub fn b64_decode(s: &str) -> Vec<u8> {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.decode(s).expect("base64")
}

/// One HTTP/1.1 request on a new connection.
pub async fn request(addr: SocketAddr, method: &str, path: &str, headers: &[(&str, &str)], body: impl Into<Bytes>) -> Reply {
    let stream = TcpStream::connect(addr).await.expect("connect");
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await.expect("handshake");
    tokio::spawn(conn);
    let mut req = http::Request::builder().method(method).uri(path).header("host", addr.to_string());
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let req = req.body(Full::new(body.into())).unwrap();
    let res = sender.send_request(req).await.expect("response");
    let status = res.status().as_u16();
    let headers = res.headers().clone();
    let body = res.into_body().collect().await.expect("body").to_bytes();
    Reply { status, headers, body }
}

pub async fn post_json(addr: SocketAddr, body: impl Into<Bytes>) -> Reply {
    request(addr, "POST", "/runsync", &[("content-type", "application/json")], body).await
}

pub async fn get(addr: SocketAddr, path: &str) -> Reply {
    request(addr, "GET", path, &[], Bytes::new()).await
}

/// Writes raw bytes, then reads until the server closes (or `timeout`).
pub async fn raw(addr: SocketAddr, bytes: &[u8], timeout: Duration) -> Vec<u8> {
    let mut s = TcpStream::connect(addr).await.expect("connect");
    let _ = s.write_all(bytes).await;
    let mut out = Vec::new();
    let _ = tokio::time::timeout(timeout, s.read_to_end(&mut out)).await;
    out
}

/// A deterministic test picture that differs with `variant`.
pub fn picture(width: u32, height: u32, variant: u32) -> RgbImage {
    RgbImage::from_fn(width, height, |x, y| {
        image::Rgb([
            ((x * 4 + variant * 37) % 256) as u8,
            ((y * 4 + variant * 91) % 256) as u8,
            (((x + y) * 2 + variant * 53) % 256) as u8,
        ])
    })
}

pub fn png(img: &RgbImage) -> Vec<u8> {
    imaging::encode(img, OutputFormat::Png).unwrap()
}

pub fn jpeg(img: &RgbImage) -> Vec<u8> {
    imaging::encode(img, OutputFormat::Jpeg { quality: 90 }).unwrap()
}

/// A request body for one edit.
pub fn edit_body(prompt: &str, seed: u64, steps: u32, image_b64: &str) -> String {
    serde_json::json!({"input": {"prompt": prompt, "image_base64": image_b64, "seed": seed, "num_inference_steps": steps}})
        .to_string()
}

/// `name{labels} value` from Prometheus text.
pub fn metric(text: &str, series: &str) -> f64 {
    qwen_edit::metrics::sample(text, series).unwrap_or_else(|| panic!("no {series} in\n{text}"))
}

/// `qwen-edit serve` as a child process (killed on drop), with its stderr collected.
pub struct Proc {
    pub child: Child,
    pub addr: SocketAddr,
    log: Arc<Mutex<Vec<String>>>,
}

impl Proc {
    pub fn pid(&self) -> u32 {
        self.child.id()
    }
    pub fn log(&self) -> String {
        self.log.lock().unwrap().join("\n")
    }
    /// Resident memory in KiB.
    pub fn rss_kib(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid())).unwrap_or_default();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or(0)
    }
    /// Peak resident memory in KiB since the start or the last `reset_peak`.
    pub fn peak_rss_kib(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid())).unwrap_or_default();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmHWM:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or(0)
    }
    /// Resets the peak to the current resident memory (Linux `clear_refs`).
    pub fn reset_peak(&self) {
        std::fs::write(format!("/proc/{}/clear_refs", self.pid()), "5").expect("reset the peak RSS");
    }
    /// Waits for the process to exit (at most `limit`) and returns its exit code and how long it took.
    pub fn wait_exit(&mut self, limit: Duration) -> (Option<i32>, Duration) {
        let start = Instant::now();
        loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                return (s.code(), start.elapsed());
            }
            assert!(start.elapsed() < limit, "did not exit within {limit:?}:\n{}", self.log());
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    pub fn signal(&self, sig: &str) {
        let ok = Command::new("kill").args([sig, &self.pid().to_string()]).status().map(|s| s.success()).unwrap_or(false);
        assert!(ok, "kill {sig} failed");
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts the binary on an ephemeral port with `env`, waits for `ready`.
pub async fn spawn(env: &[(&str, &str)]) -> Proc {
    spawn_within(env, Duration::from_secs(120)).await
}

/// [`spawn`], waiting at most `limit` for the model to load.
pub async fn spawn_within(env: &[(&str, &str)], limit: Duration) -> Proc {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_qwen-edit"));
    cmd.arg("serve")
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .env("API_HOST", "127.0.0.1")
        .env("API_PORT", "0")
        .env("QWEN_EDIT_BUNDLE", BUNDLE)
        .env("QWEN_EDIT_BACKEND", "ort")
        .env("RUST_LOG", "info")
        .env_remove("API_KEY")
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut child = cmd.spawn().expect("spawn qwen-edit serve");
    let stderr = child.stderr.take().unwrap();
    let log = Arc::new(Mutex::new(Vec::new()));
    let (tx, rx) = std::sync::mpsc::channel();
    let l = log.clone();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if let Some(rest) = line.split("listening on http://").nth(1) {
                let _ = tx.send(rest.chars().take_while(|c| c.is_ascii_digit() || *c == '.' || *c == ':').collect::<String>());
            }
            l.lock().unwrap().push(line);
        }
    });
    let addr: SocketAddr = match rx.recv_timeout(Duration::from_secs(60)) {
        Ok(a) => a.parse().expect("address in the log"),
        Err(_) => panic!("the server did not say where it listens:\n{}", log.lock().unwrap().join("\n")),
    };
    let mut p = Proc { child, addr, log };
    let deadline = Instant::now() + limit;
    loop {
        if let Some(status) = p.child.try_wait().unwrap() {
            panic!("qwen-edit serve exited with {status} before it was ready:\n{}", p.log());
        }
        // One connection per try, read raw: under load a server capped by MAX_CONNECTIONS may still count
        // the last tries' connections and answer this one 503 at once, which only means "not yet".
        if let Ok(mut s) = TcpStream::connect(p.addr).await {
            let ask = format!("GET /health HTTP/1.1\r\nhost: {}\r\nconnection: close\r\n\r\n", p.addr);
            let _ = s.write_all(ask.as_bytes()).await;
            let mut out = Vec::new();
            let _ = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut out)).await;
            let text = String::from_utf8_lossy(&out);
            if text.starts_with("HTTP/1.1 200") {
                break;
            }
            assert!(!text.contains(r#""status":"failed""#), "the server failed to load:\n{text}\n{}", p.log());
        }
        assert!(Instant::now() < deadline, "not ready in time:\n{}", p.log());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    p
}

/// Closes `s` with a reset (SO_LINGER 0), as a client that hangs up does; a plain close would be a
/// half-close, which the server answers.
pub fn reset(s: tokio::net::TcpStream) {
    #[allow(deprecated)] // tokio deprecates SO_LINGER because a non-zero linger blocks the drop; 0 never blocks
    let _ = s.set_linger(Some(Duration::ZERO));
    drop(s);
}
