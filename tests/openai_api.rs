//! `POST /v1/images/edits` and `GET /openapi.json` over real loopback against the real tiny pipeline:
//! multipart abuse (too many parts, a part over the limit, no boundary, truncated bodies, a body over
//! the limit) gets a clear 4xx in OpenAI's error shape while a concurrent good request succeeds; the
//! n images of a request run in one batch (/metrics); the OpenAPI document is valid OpenAPI 3.1
//! (openapi-spec-validator, pinned in export/requirements.txt), names exactly the routes the server
//! answers, and every answer of the server matches the document's schema for it.

mod server_support;

use std::net::SocketAddr;
use std::time::Duration;

use qwen_edit::config::Settings;
use serde_json::Value;
use server_support::*;

const BOUNDARY: &str = "0123456789abcdef0123456789abcdef";

/// A multipart body as the OpenAI SDK writes it: text fields, then files.
fn form(fields: &[(&str, &str)], files: &[(&str, &[u8])]) -> Vec<u8> {
    let mut out = Vec::new();
    for (name, value) in fields {
        out.extend_from_slice(
            format!("--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"{name}\"\r\n\r\n{value}\r\n").as_bytes(),
        );
    }
    for (name, data) in files {
        out.extend_from_slice(
            format!(
                "--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"{name}\"; filename=\"a.png\"\r\nContent-Type: image/png\r\n\r\n"
            )
            .as_bytes(),
        );
        out.extend_from_slice(data);
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(format!("--{BOUNDARY}--\r\n").as_bytes());
    out
}

async fn post_form(addr: SocketAddr, content_type: &str, body: Vec<u8>) -> Reply {
    request(addr, "POST", "/v1/images/edits", &[("content-type", content_type)], body).await
}

fn multipart() -> String {
    format!("multipart/form-data; boundary={BOUNDARY}")
}

/// The OpenAI error of a reply: (status, code, param).
fn openai_error(r: &Reply) -> (u16, String, Option<String>) {
    let v = r.json();
    let e = &v["error"];
    assert!(e["message"].as_str().is_some_and(|m| !m.is_empty()), "{v}");
    assert!(e["type"].is_string() && e.get("param").is_some(), "{v}");
    (r.status, e["code"].as_str().unwrap_or("").to_string(), e["param"].as_str().map(str::to_string))
}

fn good_form(seed: &str, n: &str) -> Vec<u8> {
    let image = png(&picture(64, 48, 1));
    form(
        &[("prompt", "make it blue"), ("n", n), ("size", "64x48"), ("seed", seed), ("num_inference_steps", "2")],
        &[("image", &image)],
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn multipart_abuse_gets_a_clear_4xx_and_harms_nothing_else() {
    let settings = Settings {
        multipart_max_parts: 8,
        multipart_max_part_bytes: 64 * 1024,
        max_body_bytes: 256 * 1024,
        batch_timeout: Duration::from_millis(200),
        ..settings()
    };
    let server = start(settings).await;
    let addr = server.addr();
    // A good request runs while the abuse goes on.
    let good = tokio::spawn(async move { post_form(addr, &multipart(), good_form("9", "2")).await });

    let parts: Vec<(String, String)> = (0..9).map(|i| (format!("x{i}"), "v".to_string())).collect();
    let parts: Vec<(&str, &str)> = parts.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let r = post_form(addr, &multipart(), form(&parts, &[])).await;
    let (status, code, _) = openai_error(&r);
    assert_eq!((status, code.as_str()), (400, "invalid_multipart"), "too many parts: {}", r.text());
    assert!(r.text().contains("MULTIPART_MAX_PARTS"), "{}", r.text());

    let big = vec![7u8; 100 * 1024];
    let r = post_form(addr, &multipart(), form(&[("prompt", "p")], &[("image", &big)])).await;
    assert_eq!(openai_error(&r), (413, "payload_too_large".into(), Some("image".into())), "a part over the limit: {}", r.text());

    let r = post_form(addr, "multipart/form-data", good_form("1", "1")).await;
    assert_eq!(openai_error(&r).0, 400, "no boundary: {}", r.text());
    assert!(r.text().contains("boundary"), "{}", r.text());
    let r = post_form(addr, "application/json", br#"{"prompt": "p"}"#.to_vec()).await;
    assert_eq!(openai_error(&r).1, "invalid_multipart", "not multipart: {}", r.text());

    // Truncated inside the body (the closing boundary never comes), with a matching Content-Length.
    let whole = good_form("1", "1");
    let r = post_form(addr, &multipart(), whole[..whole.len() / 2].to_vec()).await;
    assert_eq!(openai_error(&r).0, 400, "truncated body: {}", r.text());
    // Truncated on the wire: Content-Length promises more than comes, then the client half-closes.
    // The server keeps the half-close from hyper (src/server/conn.rs: a half-closed client still gets
    // its answer; only a reset means it is gone), so the missing rest is a body that stopped arriving:
    // read_body cuts it off at BODY_MIN_RATE's deadline (the grace, then the rate for the bytes that
    // came) with 408 `body_timeout` in OpenAI's shape, writes it, and closes the connection. Never
    // before the grace, never an empty answer; the read waits for the close, bounded far above it.
    let head = format!(
        "POST /v1/images/edits HTTP/1.1\r\nhost: x\r\ncontent-type: {}\r\ncontent-length: {}\r\n\r\n",
        multipart(),
        whole.len() + 1000
    );
    let mut wire = head.into_bytes();
    wire.extend_from_slice(&whole[..whole.len() / 2]);
    let sent = std::time::Instant::now();
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    tokio::io::AsyncWriteExt::write_all(&mut s, &wire).await.unwrap();
    tokio::io::AsyncWriteExt::shutdown(&mut s).await.unwrap();
    let mut answer = Vec::new();
    tokio::time::timeout(Duration::from_secs(120), tokio::io::AsyncReadExt::read_to_end(&mut s, &mut answer))
        .await
        .expect("the server answers a body cut on the wire and closes the connection")
        .expect("read the answer");
    let waited = sent.elapsed();
    let answer = String::from_utf8_lossy(&answer);
    let (head, body) = answer.split_once("\r\n\r\n").unwrap_or_else(|| panic!("a body cut on the wire: no answer: {answer:?}"));
    assert!(head.starts_with("HTTP/1.1 408 "), "a body cut on the wire: {answer}");
    let v: Value = serde_json::from_str(body).unwrap_or_else(|e| panic!("{e}: {answer}"));
    assert_eq!(
        (v["error"]["code"].as_str(), v["error"]["type"].as_str(), v["error"]["param"].is_null()),
        (Some("body_timeout"), Some("invalid_request_error"), true),
        "{v}"
    );
    assert!(v["error"]["message"].as_str().is_some_and(|m| m.contains("BODY_MIN_RATE")), "{v}");
    assert!(waited >= qwen_edit::config::BODY_RATE_GRACE, "answered after {waited:?}, before the grace: {answer}");

    // Over MAX_BODY_BYTES, declared: refused before it is read.
    let chunk = vec![1u8; 60 * 1024];
    let huge = form(&[("prompt", "p")], &[("image", chunk.as_slice()); 5]);
    let r = post_form(addr, &multipart(), huge).await;
    assert_eq!(openai_error(&r).0, 413, "body over MAX_BODY_BYTES: {}", r.text());

    let r = good.await.unwrap();
    assert_eq!(r.status, 200, "the concurrent good request: {}", r.text());
    let v = r.json();
    assert_eq!(v["data"].as_array().map(Vec::len), Some(2), "{v}");
    assert_eq!((v["size"].as_str(), v["output_format"].as_str()), (Some("64x48"), Some("png")));
    assert_eq!(v["data"][0]["timings"]["batch_size"], 2, "n=2: one batch of two: {v}");
    assert_eq!((v["data"][0]["seed"].as_u64(), v["data"][1]["seed"].as_u64()), (Some(9), Some(10)));
    assert_ne!(v["data"][0]["b64_json"], v["data"][1]["b64_json"], "different seeds, different images");

    // Nothing was lost: the queue is empty, and a request after the abuse succeeds.
    let h = get(addr, "/health").await.json();
    assert_eq!(h["queue_depth"], 0, "every queue place came back: {h}");
    let r = post_form(addr, &multipart(), good_form("3", "1")).await;
    assert_eq!(r.status, 200, "{}", r.text());
    stop(server).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn n_images_run_as_one_batch_and_more_than_batch_size_in_full_batches() {
    let settings = Settings { batch_size: 3, batch_timeout: Duration::from_millis(50), max_n: 7, ..settings() };
    let server = start(settings).await;
    let addr = server.addr();
    let batches = |text: &str| metric(text, "qwen_edit_batch_size_count");
    let before = batches(&get(addr, "/metrics").await.text());
    let r = post_form(addr, &multipart(), good_form("100", "3")).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let after = batches(&get(addr, "/metrics").await.text());
    assert_eq!(after - before, 1.0, "n=3 with BATCH_SIZE 3: one batch");
    let v = r.json();
    assert!(v["data"].as_array().unwrap().iter().all(|d| d["timings"]["batch_size"] == 3), "{v}");

    // n=7 > BATCH_SIZE: consecutive batches of 3, 3 and 1.
    let r = post_form(addr, &multipart(), good_form("200", "7")).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let v = r.json();
    let sizes: Vec<u64> = v["data"].as_array().unwrap().iter().map(|d| d["timings"]["batch_size"].as_u64().unwrap()).collect();
    assert_eq!(sizes, vec![3, 3, 3, 3, 3, 3, 1], "{v}");
    let seeds: Vec<u64> = v["data"].as_array().unwrap().iter().map(|d| d["seed"].as_u64().unwrap()).collect();
    assert_eq!(seeds, (200..207).collect::<Vec<_>>());
    assert_eq!(batches(&get(addr, "/metrics").await.text()) - after, 3.0);

    let r = post_form(addr, &multipart(), good_form("1", "8")).await;
    assert_eq!(openai_error(&r), (400, "invalid_request".into(), Some("n".into())), "n over MAX_N: {}", r.text());
    stop(server).await;
}

/// `{"$ref": <pointer>}` against the whole document (its components resolve inside it).
fn validate(doc: &Value, schema: &Value, instance: &Value, what: &str) {
    let errors = schema_errors(doc, schema, instance);
    assert!(errors.is_empty(), "{what}: the answer does not match the document: {errors:?}\n{instance}");
}

fn schema_errors(doc: &Value, schema: &Value, instance: &Value) -> Vec<String> {
    let mut root = doc.clone();
    root["$schema"] = "https://json-schema.org/draft/2020-12/schema".into();
    let obj = root.as_object_mut().unwrap();
    obj.remove("paths");
    for (k, v) in schema.as_object().unwrap() {
        obj.insert(k.clone(), v.clone());
    }
    let validator = jsonschema::validator_for(&root).unwrap_or_else(|e| panic!("schema {schema}: {e}"));
    validator.iter_errors(instance).map(|e| format!("{}: {e}", e.instance_path())).collect()
}

/// The document's schema for `method path` answering `status` (or its `default`).
fn response_schema(doc: &Value, method: &str, path: &str, status: u16) -> Value {
    let responses = &doc["paths"][path][method.to_ascii_lowercase()]["responses"];
    let r = responses.get(status.to_string()).or_else(|| responses.get("default"));
    let r = r.unwrap_or_else(|| panic!("{method} {path}: no response {status} in the document"));
    let content = r["content"].as_object().unwrap_or_else(|| panic!("{method} {path} {status}: no content"));
    content.values().next().unwrap()["schema"].clone()
}

async fn call(addr: SocketAddr, method: &str, path: &str, body: Vec<u8>, content_type: &str) -> Reply {
    request(addr, method, path, &[("content-type", content_type), ("authorization", "Bearer k")], body).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_openapi_document_is_valid_and_matches_the_server() {
    let server = start(Settings { api_key: Some("k".into()), ..settings() }).await;
    let addr = server.addr();
    let r = get(addr, "/openapi.json").await;
    assert_eq!(r.status, 200);
    assert_eq!(r.headers["content-type"], "application/json");
    let doc = r.json();
    assert_eq!(doc, *qwen_edit::server::openapi::document());

    // Valid OpenAPI 3.1, by the reference validator.
    let root = env!("CARGO_MANIFEST_DIR");
    let python = std::env::var("QWEN_EDIT_TEST_PYTHON").unwrap_or_else(|_| format!("{root}/.venv/bin/python"));
    let file = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(file.path(), r.text()).unwrap();
    let code = "import json, sys; from openapi_spec_validator import validate; \
                d = json.load(open(sys.argv[1])); \
                validate(d); print('valid', d['openapi'])";
    let out = std::process::Command::new(&python).args(["-c", code]).arg(file.path()).output().expect("run python");
    assert!(
        out.status.success(),
        "openapi-spec-validator (export/requirements.txt) refused the document:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );

    // Every documented route is answered (not a routing 404/405), with the documented shapes.
    let image = b64(&png(&picture(48, 32, 2)));
    let run_body =
        serde_json::json!({"input": {"prompt": "p", "image_base64": image, "seed": 1, "num_inference_steps": 2}}).to_string();
    let routes = qwen_edit::server::openapi::routes();
    assert_eq!(routes.len(), 15, "{routes:?}");
    let v2_job = call(addr, "POST", "/v2/ep/runsync", run_body.clone().into_bytes(), "application/json").await.json();
    let job_id = v2_job["id"].as_str().unwrap().to_string();
    for (method, template) in &routes {
        let path = template.replace("{endpoint_id}", "ep").replace("{id}", &job_id);
        let (body, ct) = match template.as_str() {
            "/v1/images/edits" => (good_form("4", "1"), multipart()),
            "/run" | "/runsync" | "/v2/{endpoint_id}/run" | "/v2/{endpoint_id}/runsync" => {
                (run_body.clone().into_bytes(), "application/json".to_string())
            }
            _ => (Vec::new(), "application/json".to_string()),
        };
        let r = call(addr, method, &path, body, &ct).await;
        let routed = !(r.status == 405 || (r.status == 404 && r.text().contains("no route")));
        assert!(routed, "{method} {template} is documented but not answered: {} {}", r.status, r.text());
        if r.status == 204 || template == "/metrics" {
            continue;
        }
        let schema = response_schema(&doc, method, template, r.status);
        validate(&doc, &schema, &r.json(), &format!("{method} {template} {}", r.status));
    }
    // Error answers match too.
    for (method, template, body, ct) in [
        ("POST", "/run", b"{}".to_vec(), "application/json".to_string()),
        ("POST", "/v1/images/edits", form(&[("prompt", "p")], &[]), multipart()),
        ("GET", "/v2/{endpoint_id}/status/{id}", Vec::new(), "application/json".to_string()),
    ] {
        let path = template.replace("{endpoint_id}", "ep").replace("{id}", "missing");
        let r = call(addr, method, &path, body, &ct).await;
        assert!(r.status >= 400, "{method} {template}: {}", r.text());
        validate(&doc, &response_schema(&doc, method, template, r.status), &r.json(), &format!("{method} {template} error"));
    }
    let h = get(addr, "/health").await;
    validate(&doc, &response_schema(&doc, "GET", "/health", h.status), &h.json(), "health");
    // The check can fail: answers that drifted from the document are caught.
    let mut drifted = h.json();
    drifted["queue_depth"] = "0".into();
    assert!(!schema_errors(&doc, &response_schema(&doc, "GET", "/health", 200), &drifted).is_empty());
    let mut drifted = call(addr, "POST", "/run", run_body.clone().into_bytes(), "application/json").await.json();
    assert!(drifted["image"].is_string(), "{drifted}");
    drifted.as_object_mut().unwrap().remove("image");
    assert!(!schema_errors(&doc, &response_schema(&doc, "POST", "/run", 200), &drifted).is_empty());

    // ... and nothing else is: other methods on documented paths are 405, other paths 404.
    let documented = |m: &str, t: &str| routes.iter().any(|(rm, rt)| rm == m && rt == t);
    for (_, template) in &routes {
        let path = template.replace("{endpoint_id}", "ep").replace("{id}", "x");
        for method in ["GET", "POST", "PUT", "DELETE", "PATCH"] {
            if !documented(method, template) {
                let r = call(addr, method, &path, Vec::new(), "application/json").await;
                assert_eq!(r.status, 405, "{method} {template} is not documented but answered {}: {}", r.status, r.text());
            }
        }
    }
    for path in [
        "/",
        "/v1/images/generations",
        "/v1/images/variations",
        "/v1/models",
        "/docs",
        "/openapi.yaml",
        "/v2/ep/stream/x",
        "/v2/ep/retry/x",
        "/v2/ep",
        "/v1/images/edits/x",
    ] {
        for method in ["GET", "POST"] {
            let r = call(addr, method, path, Vec::new(), "application/json").await;
            assert_eq!(r.status, 404, "{method} {path} is not documented but answered {}: {}", r.status, r.text());
        }
    }
    stop(server).await;
}
