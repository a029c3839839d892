//! Observability over real loopback against the real tiny pipeline: `X-Request-ID` (round trip, the
//! JSON log line, the /v2 job record), `/health`'s memory and CPU fields (RSS follows a large request),
//! `GET /queue/status` (counts of what the test sent, 503s included) and the stage histograms and
//! batch-policy figures of `/metrics`.

mod server_support;

use std::time::{Duration, Instant};

use qwen_edit::config::Settings;
use server_support::*;
use tokio::io::AsyncWriteExt;

const STEPS: u32 = 3;

fn small_image() -> String {
    b64(&png(&picture(64, 48, 3)))
}

/// Waits (up to 5 s) for a log line containing every one of `needles`, parsed as JSON.
async fn log_line(p: &Proc, needles: &[&str]) -> serde_json::Value {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let log = p.log();
        if let Some(line) = log.lines().find(|l| needles.iter().all(|n| l.contains(n))) {
            return serde_json::from_str(line).unwrap_or_else(|e| panic!("not a JSON log line ({e}): {line}"));
        }
        assert!(Instant::now() < deadline, "no log line with {needles:?} in\n{log}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn request_ids_round_trip_and_are_in_the_json_log_lines_and_job_records() {
    let p = spawn(&[("LOG_FORMAT", "json")]).await;
    let body = edit_body("make it blue", 7, STEPS, &small_image());
    let json = [("content-type", "application/json")];

    let r = request(p.addr, "POST", "/runsync", &[json[0], ("x-request-id", "lb-trace-4711")], body.clone()).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.headers["x-request-id"], "lb-trace-4711");
    let line = log_line(&p, &["lb-trace-4711", "\"message\":\"request\""]).await;
    assert_eq!(line["span"]["request_id"], "lb-trace-4711", "{line}");
    assert_eq!((line["status"].as_u64(), line["path"].as_str()), (Some(200), Some("/runsync")), "{line}");

    // Errors carry it too; an unusable one (too long) is replaced by a new id.
    let r = request(p.addr, "POST", "/runsync", &[json[0], ("x-request-id", "bad-json-1")], "{not json").await;
    assert_eq!((r.status, r.headers["x-request-id"].to_str().unwrap()), (400, "bad-json-1"));
    let line = log_line(&p, &["bad-json-1", "\"message\":\"request\""]).await;
    assert_eq!(line["status"], 400);
    let long = "x".repeat(129);
    let r = request(p.addr, "GET", "/nope", &[("x-request-id", &long)], "").await;
    assert_eq!(r.status, 404);
    let id = r.headers["x-request-id"].to_str().unwrap().to_string();
    assert_eq!(id.len(), 36, "a new UUID instead of the 129-character id: {id}");
    let r = get(p.addr, "/health").await;
    assert_ne!(r.headers["x-request-id"].to_str().unwrap(), id, "every request gets its own id");

    // A /v2 job keeps the id of the request that submitted it, in its record and in its log lines.
    let r = request(p.addr, "POST", "/v2/ep/runsync", &[json[0], ("x-request-id", "job-trace-9")], body).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let v = r.json();
    assert_eq!((v["status"].as_str(), v["requestId"].as_str()), (Some("COMPLETED"), Some("job-trace-9")), "{}", r.text());
    let job = v["id"].as_str().unwrap().to_string();
    let status = get(p.addr, &format!("/v2/ep/status/{job}")).await.json();
    assert_eq!(status["requestId"], "job-trace-9");
    let line = log_line(&p, &["job-trace-9", "job queued"]).await;
    assert_eq!((line["span"]["request_id"].as_str(), line["job"].as_str()), (Some("job-trace-9"), Some(job.as_str())), "{line}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn health_memory_is_plausible_and_rss_follows_a_large_request() {
    let p = spawn(&[]).await;
    let h = get(p.addr, "/health").await.json();
    let m = &h["memory"];
    let rss = m["resident_bytes"].as_u64().expect("resident_bytes");
    let measured = p.rss_kib() * 1024;
    assert!(rss > 10 << 20 && rss.abs_diff(measured) < measured / 2, "/health {rss} vs /proc {measured}");
    assert!(m["resident_peak_bytes"].as_u64().unwrap() >= rss, "{m}");
    assert!(m["host_available_bytes"].as_u64().unwrap() > 0, "{m}");
    let cpu = &h["cpu"];
    assert_eq!(cpu["count"].as_u64(), Some(std::thread::available_parallelism().unwrap().get() as u64), "{cpu}");
    assert!(cpu["process_seconds"].as_f64().unwrap() > 0.0, "the model load took CPU time: {cpu}");
    assert!(h["device"].is_null(), "no GPU device on ONNX Runtime: {h}");

    // A 4000 x 4000 input: its decoded pixels alone are 48 MB.
    let big = b64(&png(&picture(4000, 4000, 1)));
    let before = get(p.addr, "/health").await.json()["memory"]["resident_bytes"].as_u64().unwrap();
    let r = post_json(p.addr, edit_body("shrink it", 1, 2, &big)).await;
    assert_eq!(r.status, 200, "{}", r.text());
    drop(big);
    let m = get(p.addr, "/health").await.json()["memory"].clone();
    let peak = m["resident_peak_bytes"].as_u64().unwrap();
    assert!(peak > before + (40 << 20), "the peak grew by the request's pixels: {before} -> {peak}");
    let rise = peak - before;
    let mut after = m["resident_bytes"].as_u64().unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    while after > before + rise / 2 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
        after = get(p.addr, "/health").await.json()["memory"]["resident_bytes"].as_u64().unwrap();
    }
    assert!(after <= before + rise / 2, "RSS fell back after the request: before {before}, peak {peak}, after {after}");
    eprintln!("RSS around a 4000x4000 request: before {} MB, peak {} MB, after {} MB", before >> 20, peak >> 20, after >> 20);
    let text = get(p.addr, "/metrics").await.text();
    assert!(metric(&text, "qwen_edit_process_resident_peak_bytes") >= peak as f64);
    assert!(metric(&text, "qwen_edit_process_resident_bytes") > 0.0);
    assert!(metric(&text, "qwen_edit_host_memory_available_bytes") > 0.0);
}

/// `count` of one stage's histogram at one batch size.
fn stage_count(text: &str, stage: &str, batch: usize) -> f64 {
    qwen_edit::metrics::sample(
        text,
        &format!("qwen_edit_stage_duration_seconds_count{{stage=\"{stage}\",batch_size=\"{batch}\"}}"),
    )
    .unwrap_or(0.0)
}

/// Two concurrent requests under BATCH_SIZE=2 with a (fixed) batch timeout run as one batch of two: the stage
/// histograms at `batch_size="2"` count one observation per stage for that batch (one per denoising step), and
/// one `preprocess` and one `encode` per job; nothing is counted at batch size 1.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn stages_are_timed_once_per_batch_of_two() {
    let server = start(Settings {
        batch_size: 2,
        batch_timeout: Duration::from_secs(5),
        batch_policy: qwen_edit::batcher::WaitMode::Fixed,
        ..settings()
    })
    .await;
    let addr = server.addr();
    let img = small_image();
    let before = get(addr, "/metrics").await.text();
    let (a, b) = tokio::join!(
        post_json(addr, edit_body("make it red", 5, STEPS, &img)),
        post_json(addr, edit_body("make it red", 6, STEPS, &img))
    );
    for r in [&a, &b] {
        assert_eq!(r.status, 200, "{}", r.text());
        let v = r.json();
        let timings = &v["timings"];
        assert_eq!(timings["batch_size"], 2, "the two requests ran as one batch: {timings}");
    }
    let after = get(addr, "/metrics").await.text();
    let grew = |series: &str| metric(&after, series) - metric(&before, series);
    assert_eq!((grew("qwen_edit_batch_size_count"), grew("qwen_edit_batch_size_sum")), (1.0, 2.0), "one batch of two:\n{after}");
    for (stage, n) in stage_observations(2) {
        assert_eq!(stage_count(&after, stage, 2) - stage_count(&before, stage, 2), n, "{stage} at batch size 2:\n{after}");
        assert_eq!(stage_count(&after, stage, 1), stage_count(&before, stage, 1), "{stage} at batch size 1:\n{after}");
    }
    stop(server).await;
}

/// What each stage histogram gains for one batch of `jobs` jobs: one observation per stage per batch, one per
/// denoising step, one preprocess and one encode per job.
fn stage_observations(jobs: usize) -> [(&'static str, f64); 6] {
    let per_job = jobs as f64;
    [
        ("text_encoder", 1.0),
        ("vae_encoder", 1.0),
        ("denoise_step", STEPS as f64),
        ("vae_decoder", 1.0),
        ("preprocess", per_job),
        ("encode", per_job),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn queue_status_counts_what_was_sent_and_stages_are_timed_per_batch() {
    let server = start(Settings { max_body_readers: 1, max_queue: 5, ..settings() }).await;
    let addr = server.addr();
    let q = get(addr, "/queue/status").await.json();
    assert_eq!((q["queue_depth"].as_u64(), q["max_queue"].as_u64(), q["running"].as_u64()), (Some(0), Some(5), Some(0)));
    assert_eq!((q["accepting"].as_bool(), q["batch_policy"]["policy"].as_str()), (Some(true), Some("adaptive")), "{q}");

    let img = small_image();
    for seed in [1, 2] {
        let before = get(addr, "/metrics").await.text();
        let r = post_json(addr, edit_body("make it red", seed, STEPS, &img)).await;
        assert_eq!(r.status, 200, "{}", r.text());
        let batch = r.json()["timings"]["batch_size"].as_u64().unwrap() as usize;
        let after = get(addr, "/metrics").await.text();
        for (stage, n) in stage_observations(1) {
            assert_eq!(stage_count(&after, stage, batch) - stage_count(&before, stage, batch), n, "{stage}:\n{after}");
        }
    }
    let r = post_json(addr, "{not json").await;
    assert_eq!(r.status, 400, "{}", r.text());

    // A body that never finishes holds the one body slot: new requests get 503 at once.
    let mut stalled = tokio::net::TcpStream::connect(addr).await.unwrap();
    stalled
        .write_all(b"POST /runsync HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: 5000\r\n\r\n{")
        .await
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let q = get(addr, "/queue/status").await.json();
        if q["accepting"] == false {
            assert!(q["reason"].as_str().unwrap().contains("MAX_BODY_READERS"), "{q}");
            break;
        }
        assert!(Instant::now() < deadline, "the stalled body never took the slot: {q}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    for _ in 0..3 {
        let r = post_json(addr, edit_body("x", 3, STEPS, &img)).await;
        assert_eq!((r.status, r.error_type().as_str()), (503, "overloaded"), "{}", r.text());
    }
    let q = get(addr, "/queue/status").await.json();
    let counts = &q["requests"];
    assert_eq!(
        (
            counts["success"].as_u64(),
            counts["client_error"].as_u64(),
            counts["overloaded"].as_u64(),
            counts["server_error"].as_u64()
        ),
        (Some(2), Some(1), Some(3), Some(0)),
        "{q}"
    );
    assert_eq!(q["queue_depth"], 0);
    reset(stalled);

    // A /v2 job is counted in `jobs`.
    let r = request(addr, "POST", "/v2/ep/runsync", &[], edit_body("make it green", 4, STEPS, &img)).await;
    assert_eq!(r.json()["status"], "COMPLETED", "{}", r.text());
    let q = get(addr, "/queue/status").await.json();
    assert_eq!((q["jobs"]["completed"].as_u64(), q["jobs"]["in_queue"].as_u64()), (Some(1), Some(0)), "{q}");
    // The policy's learned figures: the batches above ran, at a measured cost per image.
    let learned = &q["batch_policy"];
    let costs = learned["costs"].as_array().unwrap();
    assert!(costs.iter().any(|c| c["batch_size"] == 1 && c["seconds_per_image"].as_f64().unwrap() > 0.0), "{learned}");
    assert!(learned["arrival_rate"].as_f64().unwrap() >= 0.0);
    assert!((0.0..=1.0).contains(&learned["wait_success"].as_f64().unwrap()), "{learned}");
    let text = get(addr, "/metrics").await.text();
    assert_eq!(metric(&text, "qwen_edit_batch_policy{policy=\"adaptive\"}"), 1.0);
    assert!(metric(&text, "qwen_edit_batch_cost_per_image_seconds{batch_size=\"1\"}") > 0.0);
    metric(&text, "qwen_edit_arrival_rate");
    metric(&text, "qwen_edit_batch_wait_success");
    stop(server).await;
}
