//! The HTTP API over real loopback against the real tiny pipeline (engines/tiny on ONNX Runtime):
//! round trips, batching isolation, the bad-input table, the SSRF table, auth, cancellation,
//! slow clients. Each test starts its own in-process server on an ephemeral port.

mod server_support;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use qwen_edit::config::{PrivateUrls, Settings};
use qwen_edit::server::Server;
use server_support::*;
use tokio::io::AsyncWriteExt;

const STEPS: u32 = 2;

fn image_b64(variant: u32) -> String {
    b64(&png(&picture(64, 48, variant)))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn health_metrics_and_a_round_trip() {
    let server = start(settings()).await;
    let addr = server.addr();

    let h = get(addr, "/health").await;
    assert_eq!(h.status, 200, "{}", h.text());
    let v = h.json();
    assert_eq!(v["status"], "ready");
    assert_eq!(v["gpu_available"], false, "no GPU on this machine");
    assert_eq!(v["backend"], "onnxruntime");
    assert!(v["backend_reason"].as_str().unwrap().contains("ONNX Runtime"), "{v}");
    assert_eq!(v["denoise_loop"], "host", "ONNX Runtime steps the denoising loop on the host: {v}");
    assert_eq!(v["queue_depth"], 0);
    assert!(v["bundle"].as_str().unwrap().ends_with("engines/tiny"));
    assert!(h.headers.contains_key("x-process-time"));

    // Defaults: seed drawn and returned, the bundle's size, PNG.
    let body = serde_json::json!({"input": {"prompt": "make the sky purple", "image_base64": image_b64(1), "num_inference_steps": STEPS}}).to_string();
    let r = post_json(addr, body).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let ms: f64 = r.headers["x-process-time"].to_str().unwrap().parse().unwrap();
    assert!(ms > 0.0);
    let v = r.json();
    assert_eq!(v["prompt"], "make the sky purple");
    assert_eq!(v["num_inference_steps"], STEPS);
    assert_eq!(v["lightning_enabled"], false);
    assert_eq!(v["output_format"], "png");
    let seed = v["seed"].as_u64().expect("seed returned");
    let img = r.image();
    assert_eq!((img.width() as u64, img.height() as u64), (v["width"].as_u64().unwrap(), v["height"].as_u64().unwrap()));
    assert!(v["timings"]["compute_ms"].as_f64().unwrap() > 0.0);

    // The returned seed reproduces the image exactly; /run and /runsync are the same.
    let again = serde_json::json!({"input": {"prompt": "make the sky purple", "image_base64": image_b64(1), "num_inference_steps": STEPS, "seed": seed}}).to_string();
    let r2 = request(addr, "POST", "/run", &[], again).await;
    assert_eq!(r2.status, 200, "{}", r2.text());
    assert_eq!(r2.image(), img, "same seed, same image");

    // Explicit size (floored to 16), JPEG and WebP output, a data URI and a JPEG input.
    let data_uri = format!("data:image/jpeg;base64,{}", b64(&jpeg(&picture(80, 64, 2))));
    for (fmt, magic) in [("jpeg", &[0xFFu8, 0xD8][..]), ("webp", b"RIFF")] {
        let body = serde_json::json!({"input": {"prompt": "x", "image_base64": data_uri, "num_inference_steps": STEPS, "seed": 3,
                                               "width": 100, "height": 64, "output_format": fmt}})
        .to_string();
        let r = post_json(addr, body).await;
        assert_eq!(r.status, 200, "{fmt}: {}", r.text());
        let v = r.json();
        assert_eq!((v["width"].as_u64(), v["height"].as_u64()), (Some(96), Some(64)), "{v}");
        assert_eq!(v["output_format"], fmt);
        let bytes = b64_decode(v["image"].as_str().unwrap());
        assert!(bytes.starts_with(magic), "{fmt}");
        assert_eq!(r.image().dimensions(), (96, 64));
    }

    let m = get(addr, "/metrics").await;
    assert_eq!(m.status, 200);
    let t = m.text();
    assert_eq!(metric(&t, "qwen_edit_requests_total{outcome=\"success\"}"), 4.0);
    assert!(metric(&t, "qwen_edit_batch_size_count") >= 1.0);
    assert!(metric(&t, "qwen_edit_batch_inference_duration_seconds_count") >= 1.0);
    assert_eq!(metric(&t, "qwen_edit_queue_size"), 0.0);
    // The engines' counters: ONNX Runtime steps on the host, captures no graph, copies staged pixels once.
    assert_eq!(metric(&t, "qwen_edit_host_loop_steps_total"), 4.0 * STEPS as f64, "{t}");
    assert_eq!(metric(&t, "qwen_edit_graph_captures_total"), 0.0);
    assert_eq!(metric(&t, "qwen_edit_uncaptured_runs_total"), 0.0);
    assert_eq!(metric(&t, "qwen_edit_staged_host_copies_total"), 8.0, "two staged tensors per one-image request");
    let e = get(addr, "/health").await.json()["engine"].clone();
    assert_eq!((e["host_loop_steps"].as_u64(), e["graph_replays"].as_u64()), (Some(4 * STEPS as u64), Some(0)), "{e}");
    stop(server).await;
}

/// 16 clients with different prompts and seeds at once each get exactly the image they get alone,
/// and batches really form.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_clients_get_exactly_their_own_images_and_batches_form() {
    let server = start(Settings { batch_size: 4, batch_timeout: Duration::from_millis(150), ..settings() }).await;
    let addr = server.addr();
    let img = image_b64(5);
    let jobs: Vec<(String, u64)> =
        (0..16u64).map(|i| (format!("edit number {i}: {}", "more ".repeat(i as usize % 5)), 1000 + i * 7919)).collect();

    // Alone, one after another.
    let mut alone = Vec::new();
    for (prompt, seed) in &jobs {
        let r = post_json(addr, edit_body(prompt, *seed, STEPS, &img)).await;
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(r.json()["timings"]["batch_size"], 1);
        alone.push(r.image());
    }
    let before = get(addr, "/metrics").await.text();
    let (sum0, count0) = (metric(&before, "qwen_edit_batch_size_sum"), metric(&before, "qwen_edit_batch_size_count"));

    // All at once.
    let tasks: Vec<_> = jobs
        .iter()
        .map(|(prompt, seed)| {
            let body = edit_body(prompt, *seed, STEPS, &img);
            tokio::spawn(async move { post_json(addr, body).await })
        })
        .collect();
    let mut batch_sizes = Vec::new();
    let mut batched = Vec::new();
    for (i, t) in tasks.into_iter().enumerate() {
        let r = t.await.unwrap();
        assert_eq!(r.status, 200, "{}", r.text());
        let v = r.json();
        assert_eq!(v["seed"].as_u64(), Some(jobs[i].1));
        assert_eq!(v["prompt"].as_str(), Some(jobs[i].0.as_str()));
        batch_sizes.push(v["timings"]["batch_size"].as_u64().unwrap());
        batched.push(r.image());
    }
    // Each client's image is its own: byte-identical to its solo image (jobs batch only with jobs of
    // the same shapes, text bucket included, so every row computes exactly as alone), and far from
    // every other client's.
    for (i, got) in batched.iter().enumerate() {
        let own = differing(got, &alone[i]);
        assert_eq!(
            own.count, 0,
            "client {i} (batch of {}): {} of {} values differ from its solo image, by up to {}",
            batch_sizes[i], own.count, own.total, own.max
        );
        for (j, other) in alone.iter().enumerate() {
            if j != i {
                let d = differing(got, other);
                assert!(d.count * 10 > d.total, "client {i}'s image is close to client {j}'s solo image ({d:?}): cross-talk");
            }
        }
    }
    // No cross-talk: different seeds/prompts gave different images.
    for i in 1..alone.len() {
        assert_ne!(alone[i], alone[0], "job {i} equals job 0: the inputs did not matter");
    }
    let after = get(addr, "/metrics").await.text();
    let sum = metric(&after, "qwen_edit_batch_size_sum") - sum0;
    let count = metric(&after, "qwen_edit_batch_size_count") - count0;
    let average = sum / count;
    assert_eq!(sum, 16.0);
    assert!(average > 1.0, "average batch size {average} (sizes seen {batch_sizes:?})");
    eprintln!("16 concurrent clients: {count} batches, average size {average:.2}, sizes {batch_sizes:?}");
    stop(server).await;
}

#[derive(Debug)]
struct Diff {
    max: u8,
    count: usize,
    total: usize,
}

fn differing(a: &qwen_edit::imaging::RgbImage, b: &qwen_edit::imaging::RgbImage) -> Diff {
    assert_eq!(a.dimensions(), b.dimensions());
    let d: Vec<u8> = a.as_raw().iter().zip(b.as_raw()).map(|(x, y)| x.abs_diff(*y)).collect();
    Diff { max: d.iter().copied().max().unwrap_or(0), count: d.iter().filter(|v| **v > 0).count(), total: d.len() }
}

/// Bytes of a PNG with only a signature and an IHDR chunk claiming `w` x `h` (valid CRC).
fn png_header_only(w: u32, h: u32) -> Vec<u8> {
    let mut ihdr = Vec::new();
    ihdr.extend_from_slice(&w.to_be_bytes());
    ihdr.extend_from_slice(&h.to_be_bytes());
    ihdr.extend_from_slice(&[8, 2, 0, 0, 0]);
    let mut chunk = b"IHDR".to_vec();
    chunk.extend_from_slice(&ihdr);
    let crc = crc32(&chunk);
    let mut out = b"\x89PNG\r\n\x1a\n".to_vec();
    out.extend_from_slice(&13u32.to_be_bytes());
    out.extend_from_slice(&chunk);
    out.extend_from_slice(&crc.to_be_bytes());
    // An IDAT that is far too short for the claimed size (never decoded: the size check comes first).
    out.extend_from_slice(&[0, 0, 0, 0, b'I', b'D', b'A', b'T', 0x35, 0xaf, 0x06, 0x1e]);
    out
}

fn crc32(data: &[u8]) -> u32 {
    let mut crc = 0xFFFF_FFFFu32;
    for &b in data {
        crc ^= u32::from(b);
        for _ in 0..8 {
            crc = if crc & 1 != 0 { (crc >> 1) ^ 0xEDB8_8320 } else { crc >> 1 };
        }
    }
    !crc
}

enum Bad {
    Body(String),
    Bytes(Vec<u8>),
    /// Raw request bytes (headers and all).
    Raw(Vec<u8>),
    Method(&'static str, &'static str),
}

/// >= 30 bad inputs, each with its status and error_type, sent while good requests run; the good
/// ones must all succeed with exactly their expected image.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn bad_inputs_get_their_status_and_do_not_harm_good_requests() {
    let max_body = 2 * 1024 * 1024;
    let server = start(Settings { max_body_bytes: max_body, max_prompt_chars: 2000, ..settings() }).await;
    let addr = server.addr();

    let good_body = edit_body("a good request", 77, STEPS, &image_b64(9));
    let reference = post_json(addr, good_body.clone()).await;
    assert_eq!(reference.status, 200, "{}", reference.text());
    let reference = Arc::new(reference.image());

    // Good requests keep running during the whole table.
    let stop_flag = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut good = Vec::new();
    for _ in 0..2 {
        let (flag, body, reference) = (stop_flag.clone(), good_body.clone(), reference.clone());
        good.push(tokio::spawn(async move {
            let mut n = 0;
            while !flag.load(std::sync::atomic::Ordering::Relaxed) || n == 0 {
                let r = post_json(addr, body.clone()).await;
                assert_eq!(r.status, 200, "a good request failed during the bad-input table: {}", r.text());
                assert!(r.image() == *reference, "a good request got a different image during the bad-input table");
                n += 1;
            }
            n
        }));
    }

    let img = image_b64(1);
    let with = |extra: serde_json::Value| {
        let mut input = serde_json::json!({"prompt": "edit", "image_base64": img, "num_inference_steps": STEPS});
        for (k, v) in extra.as_object().unwrap() {
            if v.is_null() && k.starts_with('-') {
                input.as_object_mut().unwrap().remove(&k[1..]);
            } else {
                input[k] = v.clone();
            }
        }
        Bad::Body(serde_json::json!({ "input": input }).to_string())
    };
    let image_case = |bytes: &[u8]| with(serde_json::json!({"image_base64": b64(bytes)}));
    let jpeg_bytes = jpeg(&picture(64, 64, 3));
    let png_bytes = png(&picture(64, 64, 4));
    let mut corrupt_png = png_bytes.clone();
    let mid = corrupt_png.len() / 2;
    for b in &mut corrupt_png[mid..mid + 16] {
        *b ^= 0x5a;
    }
    let mut nested = String::from("{\"input\": {\"image_base64\": \"AA\", \"prompt\": ");
    nested.push_str(&"[".repeat(5000));
    nested.push_str(&"]".repeat(5000));
    nested.push_str("}}");
    let oversized = format!(
        "POST /runsync HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n",
        max_body + 1
    );

    let cases: Vec<(&str, Bad, u16, &str)> = vec![
        ("malformed JSON", Bad::Body("{\"input\": {\"prompt\": ".into()), 400, "invalid_json"),
        ("empty body", Bad::Body(String::new()), 400, "invalid_json"),
        ("not UTF-8", Bad::Bytes(vec![0xff, 0xfe, b'{', 0x80]), 400, "invalid_json"),
        ("a JSON array", Bad::Body("[1, 2, 3]".into()), 400, "invalid_json"),
        ("no input object", Bad::Body("{\"prompt\": \"x\"}".into()), 400, "invalid_json"),
        ("trailing garbage", Bad::Body("{\"input\": {}} xyz".into()), 400, "invalid_json"),
        ("nesting bomb as the prompt", Bad::Body(nested), 422, "validation_error"),
        ("input is a string", Bad::Body("{\"input\": \"make it blue\"}".into()), 422, "validation_error"),
        ("missing prompt", with(serde_json::json!({"-prompt": null})), 422, "validation_error"),
        ("prompt is a number", with(serde_json::json!({"prompt": 42})), 422, "validation_error"),
        ("prompt is blank", with(serde_json::json!({"prompt": "   "})), 422, "validation_error"),
        ("prompt over MAX_PROMPT_CHARS", with(serde_json::json!({"prompt": "x".repeat(2001)})), 422, "validation_error"),
        ("neither image field", with(serde_json::json!({"-image_base64": null})), 422, "validation_error"),
        ("both image fields", with(serde_json::json!({"image_url": "https://example.com/a.png"})), 422, "validation_error"),
        ("empty image_base64", with(serde_json::json!({"image_base64": ""})), 422, "validation_error"),
        ("two images for a one-image bundle", with(serde_json::json!({"-image_base64": null, "images": [{"image_base64": img}, {"image_base64": img}]})), 422, "validation_error"),
        ("steps 0", with(serde_json::json!({"num_inference_steps": 0})), 422, "validation_error"),
        ("steps 1000", with(serde_json::json!({"num_inference_steps": 1000})), 422, "validation_error"),
        ("steps as a string", with(serde_json::json!({"num_inference_steps": "eight"})), 422, "validation_error"),
        ("steps fractional", with(serde_json::json!({"num_inference_steps": 2.5})), 422, "validation_error"),
        ("cfg 0.5", with(serde_json::json!({"true_cfg_scale": 0.5})), 422, "validation_error"),
        ("cfg 100", with(serde_json::json!({"true_cfg_scale": 100})), 422, "validation_error"),
        ("negative seed", with(serde_json::json!({"seed": -1})), 422, "validation_error"),
        ("seed as a string", with(serde_json::json!({"seed": "lucky"})), 422, "validation_error"),
        ("negative width", with(serde_json::json!({"width": -512})), 422, "validation_error"),
        ("height under 16", with(serde_json::json!({"height": 8})), 422, "validation_error"),
        ("width over MAX_OUTPUT_SIDE", with(serde_json::json!({"width": 100000})), 422, "validation_error"),
        ("output format bmp", with(serde_json::json!({"output_format": "bmp"})), 422, "validation_error"),
        ("bad base64", with(serde_json::json!({"image_base64": "this is *not* base64!"})), 400, "invalid_base64"),
        ("data URI without base64", with(serde_json::json!({"image_base64": "data:image/png,abc"})), 400, "invalid_base64"),
        ("data URI of text", with(serde_json::json!({"image_base64": format!("data:text/plain;base64,{}", b64(b"hello"))})), 415, "unsupported_image_format"),
        ("a GIF", image_case(b"GIF89a\x01\x00\x01\x00\x80\x00\x00\xff\xff\xff\x00\x00\x00!\xf9\x04\x00\x00\x00\x00\x00,\x00\x00\x00\x00\x01\x00\x01\x00\x00\x02\x02D\x01\x00;"), 415, "unsupported_image_format"),
        ("plain text as an image", image_case(b"hello, world: not an image"), 415, "unsupported_image_format"),
        ("truncated JPEG", image_case(&jpeg_bytes[..jpeg_bytes.len() / 2]), 400, "invalid_image"),
        ("JPEG header only", image_case(&jpeg_bytes[..40]), 400, "invalid_image"),
        ("truncated PNG", image_case(&png_bytes[..png_bytes.len() / 2]), 400, "invalid_image"),
        ("corrupt PNG data", image_case(&corrupt_png), 400, "invalid_image"),
        ("50k x 50k PNG header", image_case(&png_header_only(50_000, 50_000)), 413, "image_too_large"),
        ("body over MAX_BODY_BYTES", Bad::Raw(oversized.into_bytes()), 413, "payload_too_large"),
        ("image_url with ftp", with(serde_json::json!({"-image_base64": null, "image_url": "ftp://example.com/a.png"})), 422, "invalid_url"),
        ("image_url not a URL", with(serde_json::json!({"-image_base64": null, "image_url": "::not a url::"})), 422, "invalid_url"),
        ("image_url to loopback", with(serde_json::json!({"-image_base64": null, "image_url": "http://127.0.0.1:1/a.png"})), 422, "url_not_allowed"),
        ("GET on /run", Bad::Method("GET", "/run"), 405, "method_not_allowed"),
        ("unknown route", Bad::Method("POST", "/v1/edit"), 404, "not_found"),
    ];
    assert!(cases.len() >= 30);
    let mut failures = Vec::new();
    for (name, bad, status, error_type) in cases {
        let (got_status, got_type, text, has_time) = match bad {
            Bad::Body(b) => {
                let r = post_json(addr, b).await;
                (r.status, r.error_type(), r.text(), r.headers.contains_key("x-process-time"))
            }
            Bad::Bytes(b) => {
                let r = post_json(addr, b).await;
                (r.status, r.error_type(), r.text(), r.headers.contains_key("x-process-time"))
            }
            Bad::Method(m, p) => {
                let r = request(addr, m, p, &[], "{}").await;
                (r.status, r.error_type(), r.text(), r.headers.contains_key("x-process-time"))
            }
            Bad::Raw(bytes) => {
                let out = String::from_utf8_lossy(&raw(addr, &bytes, Duration::from_secs(10)).await).into_owned();
                let status = out.split(' ').nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
                let body = out.split("\r\n\r\n").nth(1).unwrap_or("").to_string();
                let et = serde_json::from_str::<serde_json::Value>(&body)
                    .ok()
                    .and_then(|v| v["error_type"].as_str().map(String::from))
                    .unwrap_or_default();
                (status, et, out.clone(), out.to_ascii_lowercase().contains("x-process-time"))
            }
        };
        if got_status != status || got_type != error_type || !has_time {
            failures.push(format!("{name}: want {status} {error_type}, got {got_status} {got_type}: {text}"));
        } else if !text.contains("\"error\"") {
            failures.push(format!("{name}: no error message: {text}"));
        }
    }
    stop_flag.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut good_done = 0;
    for g in good {
        good_done += g.await.expect("good-request task");
    }
    assert!(failures.is_empty(), "{} bad-input cases wrong:\n{}", failures.len(), failures.join("\n"));
    assert!(good_done >= 2);
    let h = get(addr, "/health").await;
    assert_eq!(h.json()["status"], "ready");
    let t = get(addr, "/metrics").await.text();
    assert!(metric(&t, "qwen_edit_requests_total{outcome=\"client_error\"}") >= 30.0);
    assert_eq!(metric(&t, "qwen_edit_requests_total{outcome=\"server_error\"}"), 0.0);
    stop(server).await;
}

/// A loopback fixture for image_url: serves a PNG at /image.png and redirects elsewhere.
async fn url_fixture(png_bytes: Vec<u8>) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = listener.accept().await else { return };
            let png_bytes = png_bytes.clone();
            tokio::spawn(async move {
                use tokio::io::AsyncReadExt;
                let mut buf = vec![0u8; 8192];
                let mut req = Vec::new();
                while !req.windows(4).any(|w| w == b"\r\n\r\n") {
                    match s.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => req.extend_from_slice(&buf[..n]),
                    }
                }
                let req = String::from_utf8_lossy(&req);
                let path = req.split(' ').nth(1).unwrap_or("/").to_string();
                let redirect = |to: &str| {
                    format!("HTTP/1.1 302 Found\r\nLocation: {to}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n").into_bytes()
                };
                let reply = match path.as_str() {
                    "/image.png" => {
                        let mut v = format!(
                            "HTTP/1.1 200 OK\r\nContent-Type: image/png\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                            png_bytes.len()
                        )
                        .into_bytes();
                        v.extend_from_slice(&png_bytes);
                        v
                    }
                    "/hop" => redirect("/image.png"),
                    "/to-private" => redirect("http://10.0.0.1/image.png"),
                    "/to-loopback-2" => redirect(&format!("http://127.0.0.2:{}/image.png", addr.port())),
                    "/to-metadata" => redirect("http://169.254.169.254/latest/meta-data/iam/security-credentials/"),
                    "/to-mapped" => redirect(&format!("http://[::ffff:127.0.0.1]:{}/image.png", addr.port())),
                    _ => b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n".to_vec(),
                };
                let _ = s.write_all(&reply).await;
                let _ = s.shutdown().await;
            });
        }
    });
    addr
}

fn url_body(url: &str) -> String {
    serde_json::json!({"input": {"prompt": "edit", "image_url": url, "num_inference_steps": STEPS, "seed": 1}}).to_string()
}

/// Non-public targets are refused with the default settings; with the loopback fixture opened
/// (127.0.0.1 only), fetching works, and redirects to other non-public addresses are still refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn ssrf_guard_blocks_non_public_targets_and_rechecks_redirects() {
    let fixture = url_fixture(png(&picture(64, 48, 6))).await;

    let strict = start(settings()).await;
    let blocked = [
        format!("http://127.0.0.1:{}/image.png", fixture.port()),
        format!("http://localhost:{}/image.png", fixture.port()),
        "http://[::1]/image.png".to_string(),
        "http://10.0.0.1/image.png".to_string(),
        "http://192.168.0.10/image.png".to_string(),
        "http://172.16.5.4/image.png".to_string(),
        "http://169.254.169.254/latest/meta-data/".to_string(),
        "http://100.64.0.1/image.png".to_string(),
        "http://[::ffff:127.0.0.1]/image.png".to_string(),
        "http://[fe80::1]/image.png".to_string(),
        "http://0.0.0.0/image.png".to_string(),
        "http://2130706433/image.png".to_string(), // 127.0.0.1 as one decimal number
        "http://0x7f.0.0.1/image.png".to_string(),
    ];
    for url in &blocked {
        let r = post_json(strict.addr(), url_body(url)).await;
        assert_eq!((r.status, r.error_type().as_str()), (422, "url_not_allowed"), "{url}: {}", r.text());
    }
    stop(strict).await;

    // The opt-out, narrowed to the fixture's address only.
    let open = start(Settings { private_urls: PrivateUrls::Allow(vec!["127.0.0.1/32".parse().unwrap()]), ..settings() }).await;
    let ok = post_json(open.addr(), url_body(&format!("http://{fixture}/image.png"))).await;
    assert_eq!(ok.status, 200, "{}", ok.text());
    let via_redirect = post_json(open.addr(), url_body(&format!("http://{fixture}/hop"))).await;
    assert_eq!(via_redirect.status, 200, "{}", via_redirect.text());
    assert!(via_redirect.image() == ok.image());
    for path in ["/to-private", "/to-loopback-2", "/to-metadata", "/to-mapped"] {
        let r = post_json(open.addr(), url_body(&format!("http://{fixture}{path}"))).await;
        assert_eq!((r.status, r.error_type().as_str()), (422, "url_not_allowed"), "{path}: {}", r.text());
    }
    let r = post_json(open.addr(), url_body(&format!("http://{fixture}/missing.png"))).await;
    assert_eq!((r.status, r.error_type().as_str()), (422, "image_fetch_failed"), "{}", r.text());
    stop(open).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn api_key_guards_run_but_not_health() {
    let server = start(Settings { api_key: Some("k3y".into()), ..settings() }).await;
    let addr = server.addr();
    let body = edit_body("x", 1, STEPS, &image_b64(1));
    let r = request(addr, "POST", "/runsync", &[], body.clone()).await;
    assert_eq!((r.status, r.error_type().as_str()), (401, "unauthorized"));
    let r = request(addr, "POST", "/runsync", &[("authorization", "Bearer nope")], body.clone()).await;
    assert_eq!(r.status, 401);
    let r = request(addr, "POST", "/runsync", &[("authorization", "Bearer k3y")], body).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(get(addr, "/health").await.status, 200);
    stop(server).await;
}

/// A queued job whose client disconnects (a reset: a half-closed client still waits for its
/// answer) is dropped before compute.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_disconnected_clients_queued_job_is_not_computed() {
    let server = start(Settings { batch_size: 1, batch_timeout: Duration::ZERO, ..settings() }).await;
    let addr = server.addr();
    // Occupy the worker with a long job.
    let long_body = serde_json::json!({"input": {"prompt": "long", "image_base64": image_b64(1), "num_inference_steps": 100,
                                                "width": 320, "height": 320, "seed": 1}});
    let long = tokio::spawn(post_json(addr, long_body.to_string()));
    tokio::time::sleep(Duration::from_millis(200)).await;
    // Send a job and hang up while it waits.
    let body = edit_body("abandoned", 2, STEPS, &image_b64(2));
    let req = format!("POST /runsync HTTP/1.1\r\nhost: x\r\ncontent-length: {}\r\n\r\n{body}", body.len());
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(req.as_bytes()).await.unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    server_support::reset(s);
    let long = long.await.unwrap();
    assert_eq!(long.status, 200);
    eprintln!("the long job: {}", long.json()["timings"]);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let t = get(addr, "/metrics").await.text();
        if metric(&t, "qwen_edit_jobs_cancelled_total") >= 1.0 {
            assert_eq!(metric(&t, "qwen_edit_batch_size_count"), 1.0, "only the long job ran:\n{t}");
            assert!(metric(&t, "qwen_edit_requests_total{outcome=\"cancelled\"}") >= 1.0);
            break;
        }
        assert!(Instant::now() < deadline, "the abandoned job was not dropped:\n{t}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    stop(server).await;
}

/// A client that never finishes its headers is disconnected after HEADER_READ_TIMEOUT.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn slow_header_clients_are_cut_off() {
    let server = start(Settings { header_read_timeout: Duration::from_millis(500), ..settings() }).await;
    let started = Instant::now();
    let out = raw(server.addr(), b"POST /runsync HTTP/1.1\r\nhost: x\r\nx-slow: ", Duration::from_secs(10)).await;
    let waited = started.elapsed();
    assert!(waited < Duration::from_secs(5), "the connection stayed open {waited:?}");
    let text = String::from_utf8_lossy(&out);
    assert!(text.is_empty() || text.starts_with("HTTP/1.1 408"), "{text}");
    assert_eq!(get(server.addr(), "/health").await.status, 200);
    stop(server).await;
}

/// A bundle that cannot be opened: /health says why (503 failed), the server stops with the reason.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bundle_that_cannot_be_opened_stops_the_server_with_the_reason() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("no-such-bundle");
    let server = Server::start(Settings { bundle: missing.clone(), ..settings() }).await.expect("binds");
    let e = server.ready().await.expect_err("must not become ready").to_string();
    assert!(e.contains("no-such-bundle"), "{e}");
    let e = server.wait().await.expect_err("stops with an error").to_string();
    assert!(e.contains("no-such-bundle"), "{e}");
}

/// An Edit Plus bundle takes an `images` list; with USE_LIGHTNING_LORA the default steps are
/// LIGHTNING_STEPS and the response says Lightning ran.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn edit_plus_takes_several_images_and_lightning_sets_the_default_steps() {
    let bundle = concat!(env!("CARGO_MANIFEST_DIR"), "/engines/tiny-2509");
    let server = start(Settings { bundle: bundle.into(), lightning: true, lightning_steps: 3, ..settings() }).await;
    let addr = server.addr();
    let v = get(addr, "/health").await.json();
    assert_eq!(v["model"]["variant"], "edit-plus");
    assert_eq!(v["lightning_enabled"], true);
    let body = serde_json::json!({"input": {"prompt": "put the cat from picture 2 into picture 1", "seed": 5,
        "images": [{"image_base64": image_b64(1)}, {"image_base64": b64(&jpeg(&picture(48, 64, 2)))}]}});
    let r = post_json(addr, body.to_string()).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let v = r.json();
    assert_eq!(v["num_inference_steps"], 3);
    assert_eq!(v["lightning_enabled"], true);
    // The output follows the last image's aspect (portrait here), as the reference does.
    assert!(v["height"].as_u64() > v["width"].as_u64(), "{v}");
    let five =
        serde_json::json!({"input": {"prompt": "x", "images": vec![serde_json::json!({"image_base64": image_b64(1)}); 5]}});
    let r = post_json(addr, five.to_string()).await;
    assert_eq!((r.status, r.error_type().as_str()), (422, "validation_error"), "{}", r.text());
    stop(server).await;
}

/// A client that trickles its body loses its queue place after BODY_READ_TIMEOUT (408), and the
/// place is free again for the next request.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_stalled_body_times_out_and_frees_its_queue_place() {
    let server = start(Settings { body_read_timeout: Duration::from_millis(300), max_queue: 1, ..settings() }).await;
    let addr = server.addr();
    let started = Instant::now();
    let out =
        raw(addr, b"POST /runsync HTTP/1.1\r\nhost: x\r\ncontent-length: 1000\r\n\r\n{\"input\": ", Duration::from_secs(10))
            .await;
    let text = String::from_utf8_lossy(&out);
    assert!(text.starts_with("HTTP/1.1 408"), "{text}");
    assert!(text.contains("\"error_type\":\"body_timeout\""), "{text}");
    assert!(started.elapsed() < Duration::from_secs(5));
    let r = post_json(addr, edit_body("after the stall", 3, STEPS, &image_b64(3))).await;
    assert_eq!(r.status, 200, "{}", r.text());
    stop(server).await;
}
