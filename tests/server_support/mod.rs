//! Helpers of the server integration tests: settings for the real tiny bundle, a small HTTP client
//! over loopback (hyper), raw-socket requests, test images and request bodies.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use qwen_edit::config::Settings;
use qwen_edit::imaging::{self, OutputFormat, RgbImage};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

pub const BUNDLE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/engines/tiny");

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
    serde_json::json!({"input": {"prompt": prompt, "image_base64": image_b64, "seed": seed, "num_inference_steps": steps}}).to_string()
}

/// `name{labels} value` from Prometheus text.
pub fn metric(text: &str, series: &str) -> f64 {
    qwen_edit::metrics::sample(text, series).unwrap_or_else(|| panic!("no {series} in\n{text}"))
}
