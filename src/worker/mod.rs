//! `qwen-edit worker`: a RunPod serverless worker (the official `runpod` library's protocol, see
//! `protocol.rs`): takes jobs from RunPod's queue, runs them through the edit service, posts results.
//!
//! - Take: while fewer than `BATCH_SIZE` jobs are in progress, one long-polled take asks for the
//!   free places (a batch take when more than one), so the batcher gets a full batch to group.
//!   204/400: no job (asked again at once, at most every 100 ms); 429: 5 s pause; errors: 1 s.
//! - Each job runs as an HTTP request does (`service::jobs::run_job`: same validation, limits,
//!   batcher, errors); its result is POSTed with `X-Request-ID`, retried with backoff (1, 2, 4, 8 s)
//!   on connection errors, 408, 429 and 5xx. A bad job gets an error result; the worker goes on.
//! - Heartbeat every `RUNPOD_PING_INTERVAL` with the ids of the jobs in progress (taken, not yet
//!   posted). The job-stop long poll aborts a stopped job's edit, which cancels it in the service
//!   (dropped from its batch's queue, or its batch stops at the next stage or step when no other
//!   job waits for it); nothing is posted for it.
//! - SIGTERM/SIGINT: no new take starts (one already waiting completes, and its jobs run); every
//!   taken job finishes and is posted; exit 0 (1 past `SHUTDOWN_TIMEOUT`). A second signal: exit 130.
//! - Without `RUNPOD_WEBHOOK_GET_JOB`, or with `--test-input`: one local job (`local.rs`).

mod client;
mod local;
pub mod protocol;

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::sync::{watch, Notify};
use tokio::task::{AbortHandle, JoinHandle};
use tracing::Instrument;

use crate::config::{RunPodSettings, Settings, WorkerArgs, WorkerMode};
use crate::lifecycle::{init_logging, shutdown_signal};
use crate::metrics::Metrics;
use crate::service::jobs::{new_id, run_job, Kind};
use crate::service::schema::EditResponse;
use crate::service::{ApiError, EditService};
use client::{CallError, Client};
use protocol::{Job, Stop, Take, Urls};

/// How long a take or a job-stop poll may wait for the control plane (the library's bound).
const LONG_POLL: Duration = Duration::from_secs(90);
/// A take that found no job is repeated at most this often.
const MIN_TAKE_INTERVAL: Duration = Duration::from_millis(100);
/// Attempts to post one result, and the first pause between them (doubled each time).
const RESULT_ATTEMPTS: u32 = 5;
const RESULT_BACKOFF: Duration = Duration::from_secs(1);
const RESULT_TIMEOUT: Duration = Duration::from_secs(60);

/// `qwen-edit worker`: 0 after a clean end, 1 if the model cannot load, a local job fails or the
/// drain timed out, 2 for invalid settings, 130 on a second signal.
pub fn main_worker(args: &WorkerArgs) -> u8 {
    let (settings, mode) = match Settings::from_service_args(&args.service).and_then(|s| Ok((s, WorkerMode::from_args(args)?))) {
        Ok(x) => x,
        Err(e) => {
            eprintln!("qwen-edit worker: {e}");
            return 2;
        }
    };
    init_logging(settings.log_format);
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().thread_name("qwen-edit-worker").build() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("qwen-edit worker: cannot start the async runtime: {e}");
            return 1;
        }
    };
    let code = runtime.block_on(run(settings, mode));
    runtime.shutdown_timeout(Duration::from_secs(1));
    code
}

/// Follows SIGTERM/SIGINT: the first sets the returned flag, the second exits at once (130).
fn watch_signals() -> watch::Receiver<bool> {
    let (tx, rx) = watch::channel(false);
    tokio::spawn(async move {
        let sig = shutdown_signal().await;
        tracing::info!("{sig} received: taking no more jobs, finishing the ones taken");
        tx.send_replace(true);
        let sig = shutdown_signal().await;
        tracing::warn!("{sig} received again: exiting without waiting");
        std::process::exit(130);
    });
    rx
}

async fn run(settings: Settings, mode: WorkerMode) -> u8 {
    let mut stop = watch_signals();
    // A local job is read and checked before the model loads.
    let local_job = match &mode {
        WorkerMode::Local { test_input } => match local::job(test_input.clone()) {
            Ok(job) => Some(job),
            Err(e) => {
                tracing::error!("{e}");
                return 1;
            }
        },
        WorkerMode::RunPod(_) => None,
    };
    let shutdown_timeout = settings.shutdown_timeout;
    let metrics = Arc::new(Metrics::new(settings.batch_size));
    let (service, finished) = match EditService::start(settings, metrics).await {
        Ok(s) => s,
        Err(e) => {
            tracing::error!("{e}");
            return 1;
        }
    };
    let loaded = tokio::select! {
        r = service.ready() => r,
        _ = stop.wait_for(|s| *s) => return 0,
    };
    let code = match (loaded, mode) {
        (Err(e), WorkerMode::RunPod(rp)) => {
            report_unhealthy(&rp, &e).await;
            1
        }
        (Err(_), WorkerMode::Local { .. }) => 1, // the loader logged why
        (Ok(()), WorkerMode::Local { .. }) => match local_job {
            Some((text, id)) => local::run(&service, text, id).await,
            None => 1,
        },
        (Ok(()), WorkerMode::RunPod(rp)) => match Worker::new(service.clone(), &rp) {
            Ok(w) => Arc::new(w).run(stop, shutdown_timeout).await,
            Err(e) => {
                tracing::error!("{e}");
                1
            }
        },
    };
    service.drain();
    service.close();
    let _ = tokio::time::timeout(shutdown_timeout, finished).await;
    code
}

/// The library's one "unhealthy" ping before it exits when the worker cannot start.
async fn report_unhealthy(rp: &RunPodSettings, reason: &str) {
    let (Some(pod), Ok(client)) = (rp.pod_id.as_deref(), Client::new(&rp.api_key)) else { return };
    if let Some(url) = Urls::new(rp, pod).unhealthy("model", reason) {
        let _ = client.get(&url, Duration::from_secs(2), 4096).await;
    }
}

/// A running worker: the jobs it holds (taken, not yet posted) and how to reach the control plane.
struct Worker {
    service: Arc<EditService>,
    client: Client,
    urls: Urls,
    pod_id: String,
    capacity: usize,
    max_body: usize,
    heartbeat: Option<Duration>,
    /// Each job in progress, with the abort handle of its edit.
    jobs: Mutex<HashMap<String, AbortHandle>>,
    /// A job was posted (or dropped): a place is free.
    freed: Notify,
}

impl Worker {
    fn new(service: Arc<EditService>, rp: &RunPodSettings) -> Result<Worker, String> {
        let pod_id = rp.pod_id.clone().unwrap_or_else(|| new_id(Kind::Async));
        // The library pings only with a pod id, a key and a URL.
        let heartbeat = (rp.pod_id.is_some() && !rp.api_key.is_empty() && rp.ping_url.is_some()).then_some(rp.ping_interval);
        let settings = service.settings();
        Ok(Worker {
            client: Client::new(&rp.api_key)?,
            urls: Urls::new(rp, &pod_id),
            pod_id,
            capacity: settings.batch_size.min(settings.max_queue),
            max_body: settings.max_body_bytes,
            heartbeat,
            jobs: Mutex::new(HashMap::new()),
            freed: Notify::new(),
            service,
        })
    }

    fn jobs(&self) -> MutexGuard<'_, HashMap<String, AbortHandle>> {
        self.jobs.lock().unwrap_or_else(|p| p.into_inner())
    }

    async fn run(self: Arc<Self>, mut stop: watch::Receiver<bool>, shutdown_timeout: Duration) -> u8 {
        tracing::info!(
            pod = %self.pod_id,
            places = self.capacity,
            heartbeat = self.heartbeat.is_some(),
            "--- Starting Serverless Worker | qwen-edit {} (runpod protocol {}) ---",
            env!("CARGO_PKG_VERSION"),
            protocol::PROTOCOL_VERSION
        );
        let (done_tx, done) = watch::channel(false);
        let heartbeat = tokio::spawn(self.clone().heartbeat(done.clone()));
        tokio::spawn(self.clone().stop_polls(done));
        self.take_jobs(&mut stop).await;
        let left = self.jobs().len();
        tracing::info!(jobs = left, "no more takes; finishing and posting the jobs taken");
        let drained = tokio::time::timeout(shutdown_timeout, self.idle()).await.is_ok();
        done_tx.send_replace(true);
        let _ = heartbeat.await;
        if drained {
            tracing::info!("every taken job is posted; exiting");
            0
        } else {
            tracing::warn!(jobs = self.jobs().len(), "SHUTDOWN_TIMEOUT passed with jobs unposted; exiting anyway");
            1
        }
    }

    /// Takes jobs while places are free, until the stop flag is set.
    async fn take_jobs(self: &Arc<Self>, stop: &mut watch::Receiver<bool>) {
        while !*stop.borrow() {
            let freed = self.freed.notified();
            tokio::pin!(freed);
            freed.as_mut().enable();
            let busy = self.jobs().len();
            let free = self.capacity.saturating_sub(busy);
            if free == 0 {
                tokio::select! {
                    _ = freed => {}
                    _ = stop.changed() => {}
                }
                continue;
            }
            let asked = Instant::now();
            let url = self.urls.take(free, busy > 0);
            let reply = self.client.get(&url, LONG_POLL, self.max_body.saturating_mul(free + 1)).await;
            let pause = match reply {
                Ok(r) => match protocol::parse_take(r.status, &r.content_type, &r.body) {
                    Take::Jobs(jobs, problems) => {
                        for p in problems {
                            tracing::error!("job take: skipped {p}");
                        }
                        for job in jobs {
                            self.start(job);
                        }
                        Duration::ZERO
                    }
                    Take::NoJob => MIN_TAKE_INTERVAL.saturating_sub(asked.elapsed()),
                    Take::Throttled => Duration::from_secs(5),
                    Take::Failed(m) => {
                        tracing::warn!("job take failed: {m}");
                        Duration::from_secs(1)
                    }
                },
                Err(CallError::Timeout) => Duration::ZERO,
                Err(e) => {
                    tracing::warn!("job take failed: {e}");
                    Duration::from_secs(1)
                }
            };
            if !pause.is_zero() {
                tokio::select! {
                    _ = tokio::time::sleep(pause) => {}
                    _ = stop.changed() => {}
                }
            }
        }
    }

    /// Starts a taken job: its edit in a task of its own (what job-stop aborts), and a task that
    /// posts the result.
    fn start(self: &Arc<Self>, job: Job) {
        let mut jobs = self.jobs();
        if jobs.contains_key(&job.id) {
            tracing::warn!(job = %job.id, "taken again while in progress; the second copy is ignored");
            return;
        }
        let (service, body, max) = (self.service.clone(), job.body, self.max_body);
        // The job's id is its request id: every log line about it carries it, and so does its result (X-Request-ID).
        let span = tracing::info_span!("job", request_id = %job.id);
        let edit: JoinHandle<Result<EditResponse, ApiError>> = tokio::spawn(
            async move {
                if body.len() > max {
                    return Err(ApiError::too_large(format!(
                        "the job is {} bytes, more than MAX_BODY_BYTES ({max})",
                        body.len()
                    )));
                }
                run_job(&service, body).await
            }
            .instrument(span.clone()),
        );
        jobs.insert(job.id.clone(), edit.abort_handle());
        span.in_scope(|| tracing::info!("job taken"));
        tokio::spawn(self.clone().finish(job.id, edit).instrument(span));
    }

    async fn finish(self: Arc<Self>, id: String, edit: JoinHandle<Result<EditResponse, ApiError>>) {
        let result = match edit.await {
            Ok(r) => Some(r),
            Err(e) if e.is_cancelled() => None,
            Err(e) => Some(Err(ApiError::internal(format!("the job's task failed: {e}")))),
        };
        match &result {
            Some(Ok(r)) => tracing::info!(job = %id, batch_size = r.timings.batch_size, "job done"),
            Some(Err(e)) => tracing::warn!(job = %id, error_type = e.error_type, "job failed: {}", e.message),
            None => tracing::info!(job = %id, "job stopped by the control plane: dropped, nothing posted"),
        }
        if let Some(r) = result {
            self.post(&id, protocol::result_body(&r)).await;
        }
        self.jobs().remove(&id);
        self.freed.notify_waiters();
    }

    /// POSTs a result, retrying what may pass on a later attempt.
    async fn post(&self, id: &str, body: Bytes) {
        let url = self.urls.output(id);
        // The library sends its JSON under this content type (with a `charset` header); the control
        // plane reads the body as JSON whatever it says, and this is the form it is known to accept.
        let headers = [("content-type", "application/x-www-form-urlencoded"), ("charset", "utf-8"), ("x-request-id", id)];
        let mut pause = RESULT_BACKOFF;
        for attempt in 1..=RESULT_ATTEMPTS {
            let why = match self.client.post(&url, &headers, body.clone(), RESULT_TIMEOUT).await {
                Ok(r) if (200..300).contains(&r.status) => {
                    tracing::debug!(job = %id, attempt, "result posted");
                    return;
                }
                Ok(r) if r.status >= 500 || r.status == 408 || r.status == 429 => format!("answered {}", r.status),
                Ok(r) => {
                    tracing::error!(job = %id, status = r.status, "the control plane refused the result; not retried");
                    return;
                }
                Err(e) => e.to_string(),
            };
            if attempt == RESULT_ATTEMPTS {
                tracing::error!(job = %id, "failed to return the job's result after {attempt} attempts: {why}");
                return;
            }
            tracing::warn!(job = %id, attempt, "posting the result failed ({why}); retrying in {} s", pause.as_secs());
            tokio::time::sleep(pause).await;
            pause *= 2;
        }
    }

    /// Completes when no job is in progress.
    async fn idle(&self) {
        loop {
            let freed = self.freed.notified();
            tokio::pin!(freed);
            freed.as_mut().enable();
            if self.jobs().is_empty() {
                return;
            }
            freed.await;
        }
    }

    /// Pings with the ids in progress until `done`.
    async fn heartbeat(self: Arc<Self>, mut done: watch::Receiver<bool>) {
        let Some(interval) = self.heartbeat else { return };
        loop {
            let mut ids: Vec<String> = self.jobs().keys().cloned().collect();
            ids.sort();
            if let Some(url) = self.urls.ping(&ids) {
                match self.client.get(&url, interval * 2, 64 * 1024).await {
                    Ok(r) if r.status < 400 => {}
                    Ok(r) => tracing::debug!(status = r.status, "heartbeat answered"),
                    Err(e) => tracing::debug!("heartbeat failed: {e}"),
                }
            }
            tokio::select! {
                _ = tokio::time::sleep(interval) => {}
                _ = done.wait_for(|d| *d) => return,
            }
        }
    }

    /// Long-polls job-stop and aborts the stopped jobs' edits, until `done`.
    async fn stop_polls(self: Arc<Self>, mut done: watch::Receiver<bool>) {
        let Some(url) = self.urls.stop() else {
            tracing::warn!("RUNPOD_WEBHOOK_GET_JOB has no /job-take/ in it: job-stop is off");
            return;
        };
        loop {
            let reply = tokio::select! {
                r = self.client.get(&url, LONG_POLL, 64 * 1024) => r,
                _ = done.wait_for(|d| *d) => return,
            };
            let pause = match reply {
                Ok(r) => match protocol::parse_stop(r.status, &r.content_type, &r.body) {
                    Stop::Ids(ids) if !ids.is_empty() => {
                        let jobs = self.jobs();
                        for id in ids {
                            match jobs.get(&id) {
                                Some(edit) => {
                                    tracing::info!(job = %id, "job-stop: aborting the job");
                                    edit.abort();
                                }
                                None => tracing::debug!(job = %id, "job-stop for a job not in progress"),
                            }
                        }
                        Duration::ZERO
                    }
                    Stop::Ids(_) => Duration::from_secs(1),
                    Stop::Throttled => Duration::from_secs(5),
                    Stop::Failed(m) => {
                        tracing::debug!("job stop: {m}");
                        Duration::from_secs(1)
                    }
                },
                Err(CallError::Timeout) => Duration::ZERO,
                Err(e) => {
                    tracing::debug!("job stop failed: {e}");
                    Duration::from_secs(1)
                }
            };
            tokio::select! {
                _ = tokio::time::sleep(pause) => {}
                _ = done.wait_for(|d| *d) => return,
            }
        }
    }
}
