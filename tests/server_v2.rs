//! RunPod's hosted-API layout on `serve` (`/v2/{endpoint_id}/...`) over real loopback against the
//! real tiny pipeline: async jobs give /run's images, cancel and purge, the result store's budget
//! over 1,000 jobs, webhooks through the SSRF guard, TIMED_OUT, auth, `/ping`, and `image_path`.

mod server_support;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use qwen_edit::config::{PrivateUrls, Settings};
use server_support::*;

fn input(i: u64, steps: u32, side: u32) -> serde_json::Value {
    serde_json::json!({"prompt": format!("async edit {i}"), "image_base64": b64(&png(&picture(side, side, i as u32))),
                       "seed": 500 + i, "num_inference_steps": steps})
}

async fn v2(addr: SocketAddr, method: &str, op: &str, body: impl Into<Bytes>) -> Reply {
    request(addr, method, &format!("/v2/my-endpoint/{op}"), &[], body).await
}

async fn submit(addr: SocketAddr, input: &serde_json::Value) -> String {
    let r = v2(addr, "POST", "run", serde_json::json!({"input": input}).to_string()).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let v = r.json();
    assert_eq!(v["status"], "IN_QUEUE", "{v}");
    v["id"].as_str().unwrap().to_string()
}

/// Polls `status` until the job ends; returns its record.
async fn finished(addr: SocketAddr, id: &str) -> serde_json::Value {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let r = v2(addr, "GET", &format!("status/{id}"), Bytes::new()).await;
        assert_eq!(r.status, 200, "{}", r.text());
        let v = r.json();
        match v["status"].as_str().unwrap() {
            "IN_QUEUE" | "IN_PROGRESS" => {}
            _ => return v,
        }
        assert!(Instant::now() < deadline, "job {id} did not end");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// 16 concurrent async jobs give exactly the images of 16 synchronous /runsync requests; runsync on
/// /v2 answers COMPLETED with the output; a bad input ends FAILED with its error; unknown ids are
/// 404; health counts the jobs; /ping is 200.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sixteen_async_jobs_equal_sixteen_sync_ones() {
    let server = start(Settings { batch_size: 4, batch_timeout: Duration::from_millis(100), ..settings() }).await;
    let addr = server.addr();
    let inputs: Vec<_> = (0..16u64).map(|i| input(i, 2, 48)).collect();
    let mut sync = Vec::new();
    for i in &inputs {
        let r = post_json(addr, serde_json::json!({"input": i}).to_string()).await;
        assert_eq!(r.status, 200, "{}", r.text());
        sync.push(r.json()["image"].as_str().unwrap().to_string());
    }
    let ids: Vec<String> = futures_join(inputs.clone().into_iter().map(|i| async move { submit(addr, &i).await })).await;
    let mut batch_sizes = Vec::new();
    for (k, id) in ids.iter().enumerate() {
        let v = finished(addr, id).await;
        assert_eq!(v["status"], "COMPLETED", "{v}");
        assert_eq!(v["output"]["image"].as_str(), Some(sync[k].as_str()), "async job {k} differs from its /runsync image");
        assert!(v["delayTime"].is_u64() && v["executionTime"].is_u64(), "{v}");
        batch_sizes.push(v["output"]["timings"]["batch_size"].as_u64().unwrap());
    }
    assert!(batch_sizes.iter().any(|b| *b > 1), "async jobs ran in batches: {batch_sizes:?}");

    // runsync on /v2: the record with the output at once.
    let r = v2(addr, "POST", "runsync", serde_json::json!({"input": inputs[3]}).to_string()).await;
    let v = r.json();
    assert_eq!((r.status, v["status"].as_str()), (200, Some("COMPLETED")), "{v}");
    assert!(v["id"].as_str().unwrap().starts_with("sync-"));
    assert_eq!(v["output"]["image"].as_str(), Some(sync[3].as_str()));

    // A bad input is accepted, then ends FAILED with the error /run would give.
    let id = submit(addr, &serde_json::json!({"prompt": "", "image_base64": "AAAA"})).await;
    let v = finished(addr, &id).await;
    assert_eq!(v["status"], "FAILED", "{v}");
    let err: serde_json::Value = serde_json::from_str(v["error"].as_str().unwrap()).unwrap();
    assert_eq!((err["error_type"].as_str(), err["status"].as_u64()), (Some("validation_error"), Some(422)), "{err}");

    // Unknown ids: 404 with a JSON error, for status and cancel.
    for (m, op) in [("GET", "status/no-such-job"), ("POST", "cancel/no-such-job")] {
        let r = v2(addr, m, op, Bytes::new()).await;
        assert_eq!((r.status, r.error_type().as_str()), (404, "not_found"), "{}", r.text());
    }
    // A body without input, a non-object, a bad method, an unknown operation.
    assert_eq!(v2(addr, "POST", "run", "{\"prompt\": \"x\"}").await.status, 400);
    assert_eq!(v2(addr, "POST", "run", "[1]").await.status, 400);
    assert_eq!(v2(addr, "GET", "run", Bytes::new()).await.status, 405);
    assert_eq!(v2(addr, "POST", "retry/abc", Bytes::new()).await.status, 404);

    let h = v2(addr, "GET", "health", Bytes::new()).await.json();
    assert_eq!((h["jobs"]["completed"].as_u64(), h["jobs"]["failed"].as_u64()), (Some(17), Some(1)), "{h}");
    assert_eq!((h["jobs"]["inQueue"].as_u64(), h["jobs"]["inProgress"].as_u64()), (Some(0), Some(0)), "{h}");
    assert_eq!((h["workers"]["ready"].as_u64(), h["workers"]["idle"].as_u64()), (Some(1), Some(1)), "{h}");
    let p = get(addr, "/ping").await;
    assert_eq!((p.status, p.json()["status"].as_str()), (200, Some("healthy")));
    stop(server).await;
}

async fn futures_join<F: std::future::Future<Output = T> + Send + 'static, T: Send + 'static>(
    futs: impl Iterator<Item = F>,
) -> Vec<T> {
    let handles: Vec<_> = futs.map(tokio::spawn).collect();
    let mut out = Vec::new();
    for h in handles {
        out.push(h.await.unwrap());
    }
    out
}

/// With one job computing at a time, queued jobs can be cancelled (CANCELLED, never computed) and
/// purged; a running job can be cancelled too; /v2 takes the key raw or as a bearer token.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn cancel_purge_and_auth() {
    let server = start(Settings { batch_size: 1, api_key: Some("k3y".into()), max_steps: 1000, ..settings() }).await;
    let addr = server.addr();
    let auth = |a: &str| {
        let a = a.to_string();
        async move {
            let body = serde_json::json!({"input": input(0, 2, 32)}).to_string();
            request(addr, "POST", "/v2/ep/run", &[("authorization", a.as_str())], body).await
        }
    };
    assert_eq!(auth("Bearer nope").await.status, 401);
    assert_eq!(request(addr, "GET", "/v2/ep/health", &[], Bytes::new()).await.status, 401, "health needs the key too");
    let mut ids = Vec::new();
    for a in ["Bearer k3y", "k3y"] {
        let r = auth(a).await;
        assert_eq!(r.status, 200, "{a}: {}", r.text());
        ids.push(r.json()["id"].as_str().unwrap().to_string());
    }
    assert_eq!(request(addr, "POST", "/run", &[("authorization", "k3y")], "{}").await.status, 401, "bare /run stays bearer-only");
    let key = [("authorization", "Bearer k3y")];
    let st = |id: &str| {
        let id = id.to_string();
        async move { request(addr, "GET", &format!("/v2/ep/status/{id}"), &key, Bytes::new()).await.json() }
    };
    for id in &ids {
        let deadline = Instant::now() + Duration::from_secs(120);
        while matches!(st(id).await["status"].as_str(), Some("IN_QUEUE" | "IN_PROGRESS")) {
            assert!(Instant::now() < deadline, "job {id} did not end");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    // Two slow jobs (seconds each) take the two running places (2 * BATCH_SIZE); six more wait in the queue.
    for i in 0..8u64 {
        let r = request(
            addr,
            "POST",
            "/v2/ep/run",
            &key,
            serde_json::json!({"input": input(i, if i < 2 { 1000 } else { 2 }, 64)}).to_string(),
        )
        .await;
        ids.push(r.json()["id"].as_str().unwrap().to_string());
    }
    let last = ids.last().unwrap().clone();
    assert_eq!(st(&last).await["status"], "IN_QUEUE");
    let c = request(addr, "POST", &format!("/v2/ep/cancel/{last}"), &key, Bytes::new()).await;
    assert_eq!((c.status, c.json()["status"].as_str()), (200, Some("CANCELLED")), "{}", c.text());
    assert_eq!(st(&last).await["status"], "CANCELLED");
    // Purge: the queued jobs are cancelled; the running ones go on.
    let p = request(addr, "POST", "/v2/ep/purge-queue", &key, Bytes::new()).await.json();
    let removed = p["removed"].as_u64().unwrap();
    assert!(removed >= 3, "{p}");
    assert_eq!(p["status"], "completed");
    let h = request(addr, "GET", "/v2/ep/health", &key, Bytes::new()).await.json();
    assert_eq!(h["jobs"]["inQueue"], 0, "{h}");
    assert_eq!(h["jobs"]["cancelled"].as_u64(), Some(removed + 1), "{h}");
    // runsync past its `?wait=` (1 s, the shortest) behind the slow jobs: the id and the status so far;
    // the job goes on and its record ends COMPLETED with the output.
    let body = serde_json::json!({"input": input(9, 2, 32)}).to_string();
    let r = request(addr, "POST", "/v2/ep/runsync?wait=1", &key, body).await;
    let v = r.json();
    assert_eq!(r.status, 200, "{v}");
    assert!(matches!(v["status"].as_str(), Some("IN_QUEUE" | "IN_PROGRESS")) && v.get("output").is_none(), "{v}");
    let sync_id = v["id"].as_str().unwrap().to_string();
    // Cancel a running job: it ends CANCELLED at once (its edit future is dropped).
    let running: Vec<String> = futures_join(ids.clone().into_iter().map(move |id| async move {
        let v =
            request(addr, "GET", &format!("/v2/ep/status/{id}"), &[("authorization", "Bearer k3y")], Bytes::new()).await.json();
        (id, v["status"].as_str().unwrap().to_string())
    }))
    .await
    .into_iter()
    .filter(|(_, s)| s == "IN_PROGRESS")
    .map(|(id, _)| id)
    .collect();
    let id = running.first().unwrap_or_else(|| panic!("a slow job is running: {ids:?}"));
    let c = request(addr, "POST", &format!("/v2/ep/cancel/{id}"), &key, Bytes::new()).await.json();
    assert_eq!(c["status"], "CANCELLED", "{c}");
    assert_eq!(st(id).await["status"], "CANCELLED");
    // Every job ends; none stays in the queue or in progress.
    let mut counts = std::collections::HashMap::new();
    for id in &ids {
        let deadline = Instant::now() + Duration::from_secs(120);
        let s = loop {
            let s = st(id).await["status"].as_str().unwrap().to_string();
            if s != "IN_QUEUE" && s != "IN_PROGRESS" {
                break s;
            }
            assert!(Instant::now() < deadline);
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        *counts.entry(s).or_insert(0) += 1;
    }
    assert_eq!(counts.values().sum::<i32>(), 10, "{counts:?}");
    let deadline = Instant::now() + Duration::from_secs(120);
    let v = loop {
        let v = st(&sync_id).await;
        if !matches!(v["status"].as_str(), Some("IN_QUEUE" | "IN_PROGRESS")) {
            break v;
        }
        assert!(Instant::now() < deadline, "the runsync job did not end: {v}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(v["status"] == "COMPLETED" && v["output"]["image"].is_string(), "the runsync job went on: {v}");
    assert!(counts.get("CANCELLED").copied().unwrap_or(0) as u64 > removed, "the purged jobs and the cancelled one: {counts:?}");
    stop(server).await;
}

/// 1,000 small jobs through a 512 KiB store: its bytes never pass the budget, the oldest results
/// go (404), the newest stay.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_result_store_stays_within_its_budget_over_1000_jobs() {
    let budget = 512 * 1024;
    let server = start(Settings {
        batch_size: 2,
        batch_timeout: Duration::from_millis(5),
        max_queue: 64,
        lightning: true,
        result_memory_bytes: budget,
        ..settings()
    })
    .await;
    let addr = server.addr();
    let started = Instant::now();
    let image = b64(&png(&picture(16, 16, 1)));
    let body = |i: u64| {
        serde_json::json!({"input": {"prompt": "tiny", "image_base64": image, "seed": i, "num_inference_steps": 1, "width": 16, "height": 16}})
            .to_string()
    };
    let mut ids = Vec::new();
    let mut peak = 0;
    for wave in 0..10u64 {
        let wave_ids: Vec<String> = futures_join((0..100).map(|k| {
            let b = body(wave * 100 + k);
            async move {
                let r = v2(addr, "POST", "run", b).await;
                assert_eq!(r.status, 200, "{}", r.text());
                r.json()["id"].as_str().unwrap().to_string()
            }
        }))
        .await;
        let last = wave_ids.last().unwrap().clone();
        assert_eq!(finished(addr, &last).await["status"], "COMPLETED");
        let h = v2(addr, "GET", "health", Bytes::new()).await.json();
        let store = &h["store"];
        let (bytes, peak_bytes) = (store["bytes"].as_u64().unwrap(), store["peakBytes"].as_u64().unwrap());
        assert!(bytes <= budget as u64 && peak_bytes <= budget as u64, "wave {wave}: {store}");
        peak = peak.max(peak_bytes);
        ids.extend(wave_ids);
    }
    // Let the last jobs finish.
    let deadline = Instant::now() + Duration::from_secs(60);
    let h = loop {
        let h = v2(addr, "GET", "health", Bytes::new()).await.json();
        if h["jobs"]["inQueue"] == 0 && h["jobs"]["inProgress"] == 0 {
            break h;
        }
        assert!(Instant::now() < deadline, "{h}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(h["jobs"]["completed"].as_u64(), Some(1000), "{h}");
    assert!(h["store"]["evicted"].as_u64().unwrap() > 500, "the budget forced evictions: {h}");
    assert!(h["store"]["peakBytes"].as_u64().unwrap() <= budget as u64, "{h}");
    let first = v2(addr, "GET", &format!("status/{}", ids[0]), Bytes::new()).await;
    assert_eq!(first.status, 404, "the oldest result went: {}", first.text());
    assert!(first.json()["error"].as_str().unwrap().contains("RESULT_MEMORY_BYTES"));
    let newest = v2(addr, "GET", &format!("status/{}", ids[999]), Bytes::new()).await.json();
    assert_eq!(newest["status"], "COMPLETED");
    eprintln!("last job: {} {} {}", newest["output"]["timings"], newest["delayTime"], newest["executionTime"]);
    eprintln!("1000 jobs in {:.1} s; store peak {peak} of {budget} bytes; {}", started.elapsed().as_secs_f64(), h["store"]);
    stop(server).await;
}

/// A loopback webhook receiver: the bodies it got.
async fn receiver() -> (SocketAddr, Arc<Mutex<Vec<serde_json::Value>>>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let got = Arc::new(Mutex::new(Vec::new()));
    let g = got.clone();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else { return };
            let g = g.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req: http::Request<hyper::body::Incoming>| {
                    let g = g.clone();
                    async move {
                        use http_body_util::BodyExt;
                        let b = req.into_body().collect().await.unwrap().to_bytes();
                        g.lock().unwrap().push(serde_json::from_slice(&b).unwrap());
                        Ok::<_, std::convert::Infallible>(http::Response::new(http_body_util::Full::new(Bytes::new())))
                    }
                });
                let _ =
                    hyper::server::conn::http1::Builder::new().serve_connection(hyper_util::rt::TokioIo::new(stream), svc).await;
            });
        }
    });
    (addr, got)
}

/// A webhook gets the final record (through the SSRF guard: loopback only when ALLOW_PRIVATE_URLS
/// opens it); a job past REQUEST_TIMEOUT ends TIMED_OUT.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn webhooks_and_timed_out_jobs() {
    let (hook, got) = receiver().await;
    let open = PrivateUrls::Allow(vec!["127.0.0.1/32".parse().unwrap()]);
    let server = start(Settings { private_urls: open, ..settings() }).await;
    let addr = server.addr();
    let body = serde_json::json!({"input": input(1, 2, 32), "webhook": format!("http://{hook}/done")}).to_string();
    let id = v2(addr, "POST", "run", body).await.json()["id"].as_str().unwrap().to_string();
    let record = finished(addr, &id).await;
    let deadline = Instant::now() + Duration::from_secs(30);
    while got.lock().unwrap().is_empty() {
        assert!(Instant::now() < deadline, "no webhook");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(got.lock().unwrap()[0], record, "the webhook gets the status record");
    for (url, t) in [
        ("ftp://127.0.0.1/x", "invalid_url"),
        ("http://10.0.0.1/x", "url_not_allowed"),
        ("http://169.254.169.254/", "url_not_allowed"),
    ] {
        let r = v2(addr, "POST", "run", serde_json::json!({"input": input(1, 2, 32), "webhook": url}).to_string()).await;
        assert_eq!((r.status, r.error_type().as_str()), (422, t), "{url}: {}", r.text());
    }
    stop(server).await;

    // By default a loopback webhook is refused at submission. A job past REQUEST_TIMEOUT (1 ms
    // here) ends TIMED_OUT, with the timeout error.
    let server = start(Settings { request_timeout: Duration::from_millis(1), ..settings() }).await;
    let r = v2(server.addr(), "POST", "run", serde_json::json!({"input": {}, "webhook": format!("http://{hook}/")}).to_string())
        .await;
    assert_eq!((r.status, r.error_type().as_str()), (422, "url_not_allowed"), "{}", r.text());
    let id = submit(server.addr(), &input(2, 2, 32)).await;
    let v = finished(server.addr(), &id).await;
    assert_eq!(v["status"], "TIMED_OUT", "{v}");
    assert!(v["error"].as_str().unwrap().contains("REQUEST_TIMEOUT"), "{v}");
    stop(server).await;
}

/// `image_path`: a file under IMAGE_PATH_ROOT gives the image its bytes give as base64; a path out
/// of the root, or any path with the setting off, is a 422 `path_not_allowed`.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn image_path_reads_files_under_the_root() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("volume");
    std::fs::create_dir(&root).unwrap();
    let bytes = png(&picture(40, 40, 3));
    std::fs::write(root.join("in.png"), &bytes).unwrap();
    std::fs::write(dir.path().join("outside.png"), &bytes).unwrap();
    let edit = |src: serde_json::Value| {
        let mut input = serde_json::json!({"prompt": "p", "seed": 9, "num_inference_steps": 2});
        input.as_object_mut().unwrap().extend(src.as_object().unwrap().clone());
        serde_json::json!({"input": input}).to_string()
    };
    let server = start(Settings { image_path_root: Some(root.canonicalize().unwrap()), ..settings() }).await;
    let addr = server.addr();
    let by_path = post_json(addr, edit(serde_json::json!({"image_path": "in.png"}))).await;
    assert_eq!(by_path.status, 200, "{}", by_path.text());
    let by_b64 = post_json(addr, edit(serde_json::json!({"image_base64": b64(&bytes)}))).await;
    assert_eq!(by_path.json()["image"], by_b64.json()["image"]);
    let abs = root.join("in.png");
    assert_eq!(post_json(addr, edit(serde_json::json!({"image_path": abs.to_str().unwrap()}))).await.status, 200);
    for p in ["../outside.png", dir.path().join("outside.png").to_str().unwrap(), "missing.png"] {
        let r = post_json(addr, edit(serde_json::json!({"image_path": p}))).await;
        assert_eq!((r.status, r.error_type().as_str()), (422, "path_not_allowed"), "{p}: {}", r.text());
    }
    stop(server).await;
    let server = start(settings()).await;
    let r = post_json(server.addr(), edit(serde_json::json!({"image_path": "in.png"}))).await;
    assert_eq!((r.status, r.error_type().as_str()), (422, "path_not_allowed"), "off by default: {}", r.text());
    stop(server).await;
}
