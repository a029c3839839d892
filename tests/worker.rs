//! `qwen-edit worker` as a process (the built binary, the real tiny bundle) against a loopback
//! RunPod control plane that follows the `runpod` library's protocol (job-take and job-take-batch
//! long polls with 204 / 400 / 429, job-done with a 5xx once, job-stop, ping); and its local test
//! mode, and the Docker entrypoint's choice of mode.

mod server_support;

use std::collections::{HashMap, HashSet, VecDeque};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use qwen_edit::server::Server;
use server_support::*;
use tokio::sync::Notify;

const KEY: &str = "test-key";

/// One call the control plane saw.
#[derive(Clone, Debug)]
struct Call {
    at: Instant,
    path: String,
    query: String,
    authorization: Option<String>,
}

/// A posted result.
#[derive(Clone, Debug)]
struct Posted {
    at: Instant,
    body: serde_json::Value,
    request_id: Option<String>,
    query: String,
}

#[derive(Default)]
struct PlaneState {
    /// Status codes answered to the next takes before any job is handed out.
    script: VecDeque<u16>,
    queue: VecDeque<serde_json::Value>,
    /// When each job was handed out.
    handed: HashMap<String, Instant>,
    calls: Vec<Call>,
    results: HashMap<String, Posted>,
    attempts: HashMap<String, usize>,
    /// Jobs whose first result POST gets a 503.
    fail_once: HashSet<String>,
    /// Jobs to name in the next job-stop reply.
    stop_now: Vec<String>,
    pings: Vec<(Instant, Vec<String>)>,
}

/// The loopback control plane.
struct Plane {
    addr: SocketAddr,
    state: Mutex<PlaneState>,
    changed: Notify,
}

impl Plane {
    async fn start() -> Arc<Plane> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let plane = Arc::new(Plane { addr: listener.local_addr().unwrap(), state: Mutex::default(), changed: Notify::new() });
        let p = plane.clone();
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else { return };
                let p = p.clone();
                tokio::spawn(async move {
                    let svc = service_fn(move |req| {
                        let p = p.clone();
                        async move { Ok::<_, Infallible>(p.handle(req).await) }
                    });
                    let _ = http1::Builder::new().serve_connection(TokioIo::new(stream), svc).await;
                });
            }
        });
        plane
    }

    fn st(&self) -> std::sync::MutexGuard<'_, PlaneState> {
        self.state.lock().unwrap()
    }

    fn push_jobs(&self, jobs: impl IntoIterator<Item = serde_json::Value>) {
        self.st().queue.extend(jobs);
        self.changed.notify_waiters();
    }

    fn env(&self) -> Vec<(String, String)> {
        let base = format!("http://{}/v2/ep", self.addr);
        vec![
            ("RUNPOD_WEBHOOK_GET_JOB".into(), format!("{base}/job-take/$ID?gpu=test")),
            ("RUNPOD_WEBHOOK_POST_OUTPUT".into(), format!("{base}/job-done/$RUNPOD_POD_ID/$ID?gpu=test")),
            ("RUNPOD_WEBHOOK_PING".into(), format!("{base}/ping/$RUNPOD_POD_ID?gpu=test")),
            ("RUNPOD_POD_ID".into(), "w1".into()),
            ("RUNPOD_AI_API_KEY".into(), KEY.into()),
            ("RUNPOD_PING_INTERVAL".into(), "200".into()),
        ]
    }

    /// Waits (a long poll of at most `wait`) until `ready` says there is something to answer.
    async fn long_poll(&self, wait: Duration, ready: impl Fn(&PlaneState) -> bool) {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            let changed = self.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            if ready(&self.st()) {
                return;
            }
            if tokio::time::timeout_at(deadline, changed).await.is_err() {
                return;
            }
        }
    }

    async fn handle(self: Arc<Self>, req: http::Request<hyper::body::Incoming>) -> http::Response<Full<Bytes>> {
        let path = req.uri().path().to_string();
        let query = req.uri().query().unwrap_or("").to_string();
        let authorization = req.headers().get("authorization").and_then(|v| v.to_str().ok()).map(str::to_string);
        let request_id = req.headers().get("x-request-id").and_then(|v| v.to_str().ok()).map(str::to_string);
        self.st().calls.push(Call { at: Instant::now(), path: path.clone(), query: query.clone(), authorization });
        let body = req.into_body().collect().await.map(|c| c.to_bytes()).unwrap_or_default();
        let parts: Vec<&str> = path.trim_start_matches("/v2/ep/").split('/').collect();
        let (status, reply) = match parts.as_slice() {
            ["job-take", _] | ["job-take-batch", _] => self.take(parts[0] == "job-take-batch", &query).await,
            ["job-stop", _] => self.stop().await,
            ["job-done", _, id] => self.done(id, body, request_id, query),
            ["ping", _] => {
                let ids = param(&query, "job_id").map(|v| v.split(',').map(str::to_string).collect()).unwrap_or_default();
                self.st().pings.push((Instant::now(), ids));
                (200, None)
            }
            _ => (404, None),
        };
        let mut r = http::Response::new(Full::new(reply.map(|v| Bytes::from(v.to_string())).unwrap_or_default()));
        *r.status_mut() = http::StatusCode::from_u16(status).unwrap();
        r.headers_mut().insert("content-type", http::HeaderValue::from_static("application/json"));
        r
    }

    async fn take(&self, batch: bool, query: &str) -> (u16, Option<serde_json::Value>) {
        if let Some(code) = self.st().script.pop_front() {
            return (code, None);
        }
        self.long_poll(Duration::from_millis(300), |s| !s.queue.is_empty()).await;
        let n = if batch { param(query, "batch_size").and_then(|v| v.parse().ok()).unwrap_or(1) } else { 1 };
        let mut st = self.st();
        let mut jobs = Vec::new();
        while jobs.len() < n {
            let Some(job) = st.queue.pop_front() else { break };
            let id = job["id"].as_str().unwrap().to_string();
            st.handed.insert(id, Instant::now());
            jobs.push(job);
        }
        drop(st);
        self.changed.notify_waiters();
        match (jobs.len(), batch) {
            (0, _) => (204, None),
            (_, false) => (200, jobs.pop()),
            (_, true) => (200, Some(serde_json::Value::Array(jobs))),
        }
    }

    /// Job-stop: held open until there is a job to stop (as RunPod's long poll), so a stop is
    /// delivered at once rather than after the worker's pause between empty polls.
    async fn stop(&self) -> (u16, Option<serde_json::Value>) {
        self.long_poll(Duration::from_secs(60), |s| !s.stop_now.is_empty()).await;
        let ids: Vec<String> = std::mem::take(&mut self.st().stop_now);
        if ids.is_empty() {
            (204, None)
        } else {
            (200, Some(serde_json::json!({"jobsToStop": ids})))
        }
    }

    fn done(&self, id: &str, body: Bytes, request_id: Option<String>, query: String) -> (u16, Option<serde_json::Value>) {
        let mut st = self.st();
        let attempt = {
            let a = st.attempts.entry(id.to_string()).or_default();
            *a += 1;
            *a
        };
        if attempt == 1 && st.fail_once.contains(id) {
            return (503, None);
        }
        // The library sends its JSON as application/x-www-form-urlencoded: read it as JSON regardless.
        let body: serde_json::Value = serde_json::from_slice(&body).expect("a result body is JSON");
        st.results.insert(id.to_string(), Posted { at: Instant::now(), body, request_id, query });
        drop(st);
        self.changed.notify_waiters();
        (200, None)
    }

    async fn wait_for(&self, what: &str, timeout: Duration, done: impl Fn(&PlaneState) -> bool) {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let changed = self.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            if done(&self.st()) {
                return;
            }
            if tokio::time::timeout_at(deadline, changed).await.is_err() {
                panic!("timed out waiting for {what}");
            }
        }
    }
}

fn param(query: &str, name: &str) -> Option<String> {
    url::form_urlencoded::parse(query.as_bytes()).find(|(k, _)| k == name).map(|(_, v)| v.into_owned())
}

/// `qwen-edit worker` as a child process (killed on drop) with its stderr collected, each line with
/// the time it arrived.
struct WorkerProc {
    child: Child,
    log: Arc<Mutex<Vec<(Instant, String)>>>,
}

impl WorkerProc {
    fn spawn(env: &[(String, String)], args: &[&str], cwd: &std::path::Path) -> WorkerProc {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_qwen-edit"));
        cmd.arg("worker")
            .args(args)
            .current_dir(cwd)
            .env("QWEN_EDIT_BUNDLE", BUNDLE)
            .env("QWEN_EDIT_BACKEND", "ort")
            .env("RUST_LOG", "info")
            .env_remove("RUNPOD_WEBHOOK_GET_JOB")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().expect("spawn qwen-edit worker");
        let stderr = child.stderr.take().unwrap();
        let log = Arc::new(Mutex::new(Vec::new()));
        let l = log.clone();
        std::thread::spawn(move || {
            use std::io::BufRead;
            for line in std::io::BufReader::new(stderr).lines().map_while(Result::ok) {
                l.lock().unwrap().push((Instant::now(), line));
            }
        });
        WorkerProc { child, log }
    }

    fn log(&self) -> String {
        self.log.lock().unwrap().iter().map(|(_, l)| l.as_str()).collect::<Vec<_>>().join("\n")
    }

    /// The first line containing `what`, and when it arrived.
    fn line(&self, what: &str) -> Option<(Instant, String)> {
        self.log.lock().unwrap().iter().find(|(_, l)| l.contains(what)).cloned()
    }

    /// Waits for the first line containing `what`.
    async fn wait_line(&self, what: &str, timeout: Duration) -> (Instant, String) {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(found) = self.line(what) {
                return found;
            }
            assert!(Instant::now() < deadline, "no log line with `{what}`:\n{}", self.log());
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    fn signal(&self, sig: &str) {
        let ok = Command::new("kill").args([sig, &self.child.id().to_string()]).status().map(|s| s.success()).unwrap_or(false);
        assert!(ok, "kill {sig} failed");
    }

    async fn exit_code(&mut self, timeout: Duration) -> i32 {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                return s.code().unwrap_or(-1);
            }
            assert!(Instant::now() < deadline, "the worker did not exit:\n{}", self.log());
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for WorkerProc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn input(i: u64, steps: u32, side: u32) -> serde_json::Value {
    serde_json::json!({"prompt": format!("job {i}: make it {}", ["red", "green", "blue"][i as usize % 3]),
                       "image_base64": b64(&png(&picture(side, side, i as u32))), "seed": 100 + i,
                       "num_inference_steps": steps})
}

fn env_with(plane: &Plane, extra: &[(&str, &str)]) -> Vec<(String, String)> {
    let mut env = plane.env();
    env.extend(extra.iter().map(|(k, v)| (k.to_string(), v.to_string())));
    env
}

/// What `/run` answers for these inputs (an in-process server with the same bundle).
async fn run_images(inputs: &[serde_json::Value]) -> Vec<String> {
    let server = Server::start(settings()).await.unwrap();
    server.ready().await.unwrap();
    let mut images = Vec::new();
    for i in inputs {
        let r = request(server.addr(), "POST", "/run", &[], serde_json::json!({"input": i}).to_string()).await;
        assert_eq!(r.status, 200, "{}", r.text());
        images.push(r.json()["image"].as_str().unwrap().to_string());
    }
    server.shutdown();
    server.wait().await.unwrap();
    images
}

/// 20 jobs give 20 results equal to /run's; batches are taken; a bad job gets an error result and
/// the next one is fine; 204, 400 and 429 are survived; a failed result POST is retried; every call
/// carries the key; the heartbeat lists the jobs in progress.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn twenty_jobs_in_batches_with_a_bad_one_and_a_failed_post() {
    let plane = Plane::start().await;
    let inputs: Vec<_> = (0..20u64).map(|i| input(i, 2, 32)).collect();
    let mut jobs: Vec<_> =
        inputs.iter().enumerate().map(|(i, inp)| serde_json::json!({"id": format!("job-{i:02}"), "input": inp})).collect();
    // A bad job in the middle (no prompt), with the good job-05 right after it.
    jobs.insert(5, serde_json::json!({"id": "bad-1", "input": {"image_base64": b64(&png(&picture(32, 32, 0)))}}));
    {
        let mut st = plane.st();
        st.script.extend([204, 400, 429]);
        st.fail_once.insert("job-03".into());
    }
    plane.push_jobs(jobs);
    let dir = tempfile::tempdir().unwrap();
    let mut worker = WorkerProc::spawn(&env_with(&plane, &[("BATCH_SIZE", "4"), ("BATCH_TIMEOUT_MS", "100")]), &[], dir.path());
    plane.wait_for("21 results", Duration::from_secs(240), |s| s.results.len() == 21).await;
    // With every job posted, the heartbeat goes on without ids.
    let quiet_since = Instant::now();
    plane
        .wait_for("an empty heartbeat", Duration::from_secs(10), |s| {
            s.pings.iter().any(|(at, ids)| *at > quiet_since && ids.is_empty())
        })
        .await;
    worker.signal("-TERM");
    assert_eq!(worker.exit_code(Duration::from_secs(60)).await, 0, "{}", worker.log());

    let expected = run_images(&inputs).await;
    let st = plane.st();
    let mut batch_sizes = Vec::new();
    for (i, want) in expected.iter().enumerate() {
        let id = format!("job-{i:02}");
        let posted = &st.results[&id];
        let out = &posted.body["output"];
        assert_eq!(out["image"].as_str(), Some(want.as_str()), "{id}: the worker's image differs from /run's");
        assert_eq!(out["seed"], 100 + i as u64);
        assert_eq!(posted.request_id.as_deref(), Some(id.as_str()), "X-Request-ID");
        assert!(posted.query.contains("isStream=false") && posted.query.contains("gpu=test"), "{}", posted.query);
        batch_sizes.push(out["timings"]["batch_size"].as_u64().unwrap());
    }
    // The bad job: an error result carrying the error type and message; the job after it was fine.
    let bad = &st.results["bad-1"].body;
    assert!(bad.get("output").is_none(), "{bad}");
    let err: serde_json::Value = serde_json::from_str(bad["error"].as_str().expect("error is a string")).unwrap();
    assert_eq!(err["error_type"], "validation_error", "{err}");
    assert!(err["error_message"].as_str().unwrap().contains("input.prompt is required"), "{err}");
    assert!(st.results["job-05"].body["output"]["image"].is_string());
    // The result POST that failed once was retried.
    assert_eq!(st.attempts["job-03"], 2);
    // Batches were taken (job-take-batch with batch_size > 1) and ran as batches.
    let takes: Vec<&Call> = st.calls.iter().filter(|c| c.path.contains("/job-take")).collect();
    assert!(
        takes.iter().any(|c| c.path.contains("/job-take-batch/w1") && param(&c.query, "batch_size").is_some_and(|n| n != "1")),
        "no batch take: {takes:?}"
    );
    assert!(takes.iter().all(|c| c.query.starts_with("gpu=test&") && c.query.contains("job_in_progress=")), "{takes:?}");
    assert!(takes.iter().any(|c| c.query.contains("job_in_progress=1")), "jobs in progress while taking more");
    assert!(batch_sizes.iter().any(|b| *b > 1), "no job ran in a batch: {batch_sizes:?}");
    // 204, 400 and 429 were survived; after the 429 the worker waited ~5 s before asking again.
    let t429 = takes[2].at;
    assert!(takes[3].at.duration_since(t429) >= Duration::from_millis(4500), "no back-off after 429");
    // Every call carried the raw key; job-stop was polled.
    assert!(st.calls.iter().all(|c| c.authorization.as_deref() == Some(KEY)), "a call without the key");
    assert!(st.calls.iter().any(|c| c.path.contains("/job-stop/w1")));
    // The heartbeat listed jobs in progress: only ids handed out before the ping, and some of them.
    let mut listed = 0;
    for (at, ids) in &st.pings {
        for id in ids {
            assert!(st.handed.get(id).is_some_and(|h| h <= at), "ping lists {id}, not handed out yet");
            listed += 1;
        }
    }
    assert!(listed > 0, "no heartbeat listed a job in progress");
    assert!(st.calls.iter().filter(|c| c.path.contains("/ping/w1")).all(|c| c.query.contains("runpod_version=")));
    eprintln!("batch sizes {batch_sizes:?}; {} takes, {} pings", takes.len(), st.pings.len());
}

/// A stopped job is dropped (no result); SIGTERM while jobs run: no new take, every taken job is
/// posted, exit 0.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn job_stop_drops_a_job_and_sigterm_posts_every_taken_job() {
    let plane = Plane::start().await;
    // A job alone in its bucket waits BATCH_TIMEOUT_MS (5 s) for company under BATCH_POLICY=fixed:
    // stopped meanwhile (once the heartbeat says the worker has it), it is dropped before it is computed.
    plane.push_jobs([serde_json::json!({"id": "stopped", "input": input(1, 2, 48)})]);
    let dir = tempfile::tempdir().unwrap();
    let env = env_with(&plane, &[("BATCH_SIZE", "2"), ("BATCH_TIMEOUT_MS", "5000"), ("BATCH_POLICY", "fixed")]);
    let mut worker = WorkerProc::spawn(&env, &[], dir.path());
    plane
        .wait_for("a heartbeat with the job", Duration::from_secs(120), |s| s.pings.iter().any(|(_, ids)| ids == &["stopped"]))
        .await;
    plane.st().stop_now.push("stopped".into());
    plane.changed.notify_waiters();
    plane.wait_for("the stop to be sent", Duration::from_secs(10), |s| s.stop_now.is_empty()).await;
    let stopped_at = Instant::now();
    let deadline = Instant::now() + Duration::from_secs(20);
    while !worker.log().contains("job stopped by the control plane") {
        assert!(Instant::now() < deadline, "the stopped job was not dropped:\n{}", worker.log());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Once stopped, the heartbeat no longer lists it.
    plane
        .wait_for("a heartbeat without the stopped job", Duration::from_secs(10), |s| {
            s.pings.iter().any(|(at, ids)| *at > stopped_at && ids.is_empty())
        })
        .await;

    // Four jobs of 30 steps; two places: two are taken and run when SIGTERM comes.
    plane.push_jobs((0..4u64).map(|i| serde_json::json!({"id": format!("long-{i}"), "input": input(10 + i, 30, 32)})));
    plane.wait_for("two jobs taken", Duration::from_secs(60), |s| s.handed.len() >= 3).await;
    assert!(plane.st().results.is_empty(), "a result came before SIGTERM; the jobs are too short for this test");
    worker.signal("-TERM");
    let signalled = Instant::now();
    assert_eq!(worker.exit_code(Duration::from_secs(120)).await, 0, "{}", worker.log());
    let st = plane.st();
    let taken: Vec<&String> = st.handed.keys().filter(|k| k.starts_with("long-")).collect();
    assert_eq!(taken.len(), 2, "{taken:?}");
    for id in &taken {
        let out = &st.results[*id].body["output"];
        assert!(out["image"].is_string(), "{id} was taken but its result is {out}");
    }
    assert!(!st.results.contains_key("stopped"), "nothing is posted for a stopped job");
    assert_eq!(st.queue.len(), 2, "the jobs not taken stay with the control plane");
    // At most the take that was already waiting when the signal came; no take started after it.
    let late = st.calls.iter().filter(|c| c.path.contains("/job-take") && c.at > signalled + Duration::from_millis(200)).count();
    assert_eq!(late, 0, "takes after SIGTERM:\n{}", worker.log());
    assert!(worker.log().contains("every taken job is posted"), "{}", worker.log());
}

/// Job-stop while the job's batch runs: the running batch stops at its next denoising step (the
/// pipeline's "batch stopped" line, which is also what `qwen_edit_batches_stopped_total` counts; the
/// worker serves no /metrics), nothing is posted for the job, the heartbeat drops it, and the next
/// job takes its place at once and waits for the engine about one step, not for the stopped job's
/// remaining steps. Every bound is in steps measured here, on this machine, at the long job's shape.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn job_stop_during_a_running_batch_stops_it_at_the_next_step_and_the_next_job_runs() {
    /// The long job: MAX_STEPS steps, with true CFG (two transformer rows a step) at an output large
    /// enough that the steps outweigh the other stages (here ~85 ms a step, ~0.4 s for the decoder).
    const STEPS: u32 = 100;
    const SIDE: u32 = 512;
    let sized = |i: u64, steps: u32| {
        let mut v = input(i, steps, 32);
        v["width"] = SIDE.into();
        v["height"] = SIDE.into();
        v["negative_prompt"] = "".into();
        v["true_cfg_scale"] = 4.0.into();
        v
    };
    let plane = Plane::start().await;
    let dir = tempfile::tempdir().unwrap();
    // One place: a job is taken only once the job before it is posted or stopped.
    let mut worker = WorkerProc::spawn(&env_with(&plane, &[("BATCH_SIZE", "1")]), &[], dir.path());

    // Calibration at the long job's shape, once it is warm: 2 and 22 steps give one step's time; the
    // 2-step job's whole turnaround (take, prepare, encoders, 2 steps, decoder, post) bounds the time
    // a job of this shape needs before its denoising starts.
    plane.push_jobs([
        serde_json::json!({"id": "warm", "input": sized(20, 2)}),
        serde_json::json!({"id": "calib-2", "input": sized(21, 2)}),
        serde_json::json!({"id": "calib-22", "input": sized(22, 22)}),
    ]);
    plane.wait_for("the calibration results", Duration::from_secs(300), |s| s.results.len() == 3).await;
    let (step, before_denoise) = {
        let st = plane.st();
        let compute = |id: &str| {
            let r = &st.results[id].body;
            r["output"]["timings"]["compute_ms"].as_f64().unwrap_or_else(|| panic!("{id} failed: {}", r["error"]))
        };
        let step = Duration::from_secs_f64((compute("calib-22") - compute("calib-2")) / 20.0 / 1000.0);
        (step, st.results["calib-2"].at - st.handed["calib-2"])
    };
    // The stop comes when the long job is surely denoising (three times what a 2-step job needs in
    // all), with most of its steps still to run (the plane's job-stop poll is open: it goes at once).
    let stop_after = before_denoise * 3;
    eprintln!("one step {step:?}; a 2-step job {before_denoise:?}; the stop after {stop_after:?}");
    assert!(
        stop_after + step * 30 < step * STEPS,
        "the long job ({STEPS} steps of {step:?}) is too short for this test: the stop comes after {stop_after:?}"
    );

    plane.push_jobs([
        serde_json::json!({"id": "long", "input": sized(23, STEPS)}),
        serde_json::json!({"id": "next", "input": input(24, 2, 32)}),
    ]);
    plane.wait_for("the long job taken", Duration::from_secs(60), |s| s.handed.contains_key("long")).await;
    let handed = plane.st().handed["long"];
    tokio::time::sleep_until((handed + stop_after).into()).await;
    plane.st().stop_now.push("long".into());
    plane.changed.notify_waiters();
    plane.wait_for("the stop to be sent", Duration::from_secs(10), |s| s.stop_now.is_empty()).await;
    // The next job comes after the long one, whether that was stopped or (too short) ran to its end.
    plane.wait_for("the next job's result", Duration::from_secs(300), |s| s.results.contains_key("next")).await;
    assert!(!plane.st().results.contains_key("long"), "the long job ran to its end before the stop: too short for this test");
    let (aborted, _) = worker.wait_line("job-stop: aborting the job", Duration::from_secs(10)).await;
    let (stopped, line) = worker.wait_line("batch stopped: nobody waits for it", Duration::from_secs(10)).await;

    // The running batch (not a queued job) stopped within a few steps of the abort.
    assert!(line.contains("batch=1"), "{line}");
    let latency = stopped.saturating_duration_since(aborted);
    assert!(latency <= step * 5, "the batch stopped {latency:?} after the abort, more than 5 steps of {step:?}: {line}");
    let (queue, next_posted) = {
        let st = plane.st();
        assert!(!st.results.contains_key("long") && !st.attempts.contains_key("long"), "nothing is posted for a stopped job");
        let next = &st.results["next"];
        (Duration::from_secs_f64(next.body["output"]["timings"]["queue_ms"].as_f64().expect("queue_ms") / 1000.0), next.at)
    };
    // The next job took the freed place and waited for the engine at most a few steps, not for the
    // tens of steps the stopped job had left.
    assert!(queue <= step * 5, "the next job waited {queue:?} for the engine, more than 5 steps of {step:?}");
    // Once stopped, the heartbeat no longer lists it.
    plane
        .wait_for("an empty heartbeat after the next job", Duration::from_secs(10), |s| {
            s.pings.iter().any(|(at, ids)| *at > next_posted && ids.is_empty())
        })
        .await;
    let expected = run_images(&[input(24, 2, 32)]).await;
    assert_eq!(plane.st().results["next"].body["output"]["image"].as_str(), Some(expected[0].as_str()), "the next job's image");
    eprintln!("the batch stopped {latency:?} after the abort ({line}); the next job waited {queue:?}");
    worker.signal("-TERM");
    assert_eq!(worker.exit_code(Duration::from_secs(60)).await, 0, "{}", worker.log());
}

/// `--test-input` and ./test_input.json run one job and print its result body (the image equals
/// /run's, from either); without either, or with a bad job, the exit code is 1.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn local_test_mode_runs_one_job() {
    let dir = tempfile::tempdir().unwrap();
    let job = serde_json::json!({"input": input(7, 2, 32)});
    let expected = run_images(&[job["input"].clone()]).await;

    let mut w = WorkerProc::spawn(&[], &["--test-input", &job.to_string()], dir.path());
    assert_eq!(w.exit_code(Duration::from_secs(120)).await, 0, "{}", w.log());
    let mut stdout = String::new();
    std::io::Read::read_to_string(w.child.stdout.as_mut().unwrap(), &mut stdout).unwrap();
    let v: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap_or_else(|e| panic!("{e}: {stdout}"));
    assert_eq!(v["output"]["image"].as_str(), Some(expected[0].as_str()));

    // No RunPod variables, no flag: ./test_input.json. Missing: exit 1; a good job runs; a bad one fails with its error.
    let mut missing = WorkerProc::spawn(&[], &[], dir.path());
    assert_eq!(missing.exit_code(Duration::from_secs(120)).await, 1);
    assert!(missing.log().contains("test_input.json not found"), "{}", missing.log());
    // A good job there runs as --test-input's does: the same image.
    std::fs::write(dir.path().join("test_input.json"), serde_json::json!({"id": "t0", "input": job["input"]}).to_string())
        .unwrap();
    let mut file = WorkerProc::spawn(&[], &[], dir.path());
    assert_eq!(file.exit_code(Duration::from_secs(120)).await, 0, "{}", file.log());
    assert!(file.log().contains("test_input.json as job input"), "{}", file.log());
    let mut stdout = String::new();
    std::io::Read::read_to_string(file.child.stdout.as_mut().unwrap(), &mut stdout).unwrap();
    let v: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap_or_else(|e| panic!("{e}: {stdout}"));
    assert_eq!(v["output"]["image"].as_str(), Some(expected[0].as_str()), "test_input.json: the image differs from /run's");
    std::fs::write(dir.path().join("test_input.json"), serde_json::json!({"id": "t1", "input": {"prompt": "x"}}).to_string())
        .unwrap();
    let mut bad = WorkerProc::spawn(&[], &[], dir.path());
    assert_eq!(bad.exit_code(Duration::from_secs(120)).await, 1, "{}", bad.log());
    let mut stdout = String::new();
    std::io::Read::read_to_string(bad.child.stdout.as_mut().unwrap(), &mut stdout).unwrap();
    let v: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap();
    assert!(v["error"].as_str().unwrap().contains("validation_error"), "{v}");
}

/// The Docker image's entrypoint: the worker by default, the HTTP server with STANDALONE_MODE=1,
/// any other command as given.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn docker_entrypoint_chooses_worker_or_server() {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/docker-entrypoint.sh");
    let bin_dir = std::path::Path::new(env!("CARGO_BIN_EXE_qwen-edit")).parent().unwrap().to_path_buf();
    let path = format!("{}:{}", bin_dir.display(), std::env::var("PATH").unwrap_or_default());
    let dir = tempfile::tempdir().unwrap();
    let run = |env: &[(&str, &str)], args: &[&str]| {
        let mut cmd = Command::new("sh");
        cmd.arg(script).args(args).current_dir(dir.path()).env("PATH", &path).env("QWEN_EDIT_BUNDLE", BUNDLE);
        cmd.env("QWEN_EDIT_BACKEND", "ort")
            .env("API_HOST", "127.0.0.1")
            .env("API_PORT", "0")
            .env_remove("RUNPOD_WEBHOOK_GET_JOB");
        for (k, v) in env {
            cmd.env(k, v);
        }
        cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
        cmd
    };
    // Default: the worker, here in local mode without a test_input.json: it says so and exits 1.
    let out = run(&[("STANDALONE_MODE", "0")], &[]).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("test_input.json not found"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // STANDALONE_MODE=1: the HTTP server.
    let mut child = run(&[("STANDALONE_MODE", "1")], &[]).spawn().unwrap();
    let stderr = child.stderr.take().unwrap();
    let line = tokio::task::spawn_blocking(move || {
        use std::io::BufRead;
        std::io::BufReader::new(stderr).lines().map_while(Result::ok).find(|l| l.contains("listening on http://"))
    });
    let found = tokio::time::timeout(Duration::from_secs(60), line).await.expect("serve starts").unwrap();
    let _ = child.kill();
    let _ = child.wait();
    assert!(found.is_some(), "STANDALONE_MODE=1 did not start the server");
    // Arguments: that command.
    let out = run(&[], &["--version"]).output().unwrap();
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("qwen-edit "), "{out:?}");
}
