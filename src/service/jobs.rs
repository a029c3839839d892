//! Jobs that outlive one HTTP exchange: the async jobs of RunPod's hosted API (`/v2/.../run`,
//! `status`, `cancel`, ...) and the RunPod worker's jobs. Both reach `EditService` here, nowhere else.
//!
//! - [`run_job`]: one job body (`{"input": {...}}`, other keys ignored) to its response, waiting for
//!   room while the server is full (the worker and its local test mode).
//! - [`JobStore`]: async jobs. A submitted job is `IN_QUEUE` in a FIFO until the dispatcher gets it
//!   admitted (`admit`: room in the queue, the body readers and REQUEST_MEMORY); at most
//!   `2 * BATCH_SIZE` async jobs run at once (one batch computes while the next forms, and
//!   synchronous `/run` clients keep their share of `MAX_QUEUE`). It is then `IN_PROGRESS` until
//!   `COMPLETED`, `FAILED`, `TIMED_OUT` (`REQUEST_TIMEOUT`) or `CANCELLED`. Cancelling a running job
//!   drops its edit future, which cancels it in the service (its queued job is removed; a batch whose
//!   every job is gone stops at its next stage or step; its memory and queue place are released).
//! - Finished jobs are kept `RESULT_TTL` (runsync ones at most 60 s, as RunPod does) within
//!   `RESULT_MEMORY_BYTES`, which counts every record, queued inputs and kept results: past the TTL
//!   a record goes; past the budget the oldest finished records go first, and a new job that would
//!   not fit even then is refused (503). A record that is gone answers 404.
//! - A job's `webhook` gets its final record (the `status` body) POSTed through the `image_url`
//!   SSRF guard, with its retries; never for a cancelled job.

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::StatusCode;
use tokio::sync::{watch, Notify};
use tracing::Instrument;

use super::fetch::{FetchError, FetchPolicy, Fetcher};
pub use super::records::{failure_text, new_id, JobStatus, JobView, Kind, StoreHealth, StoreLimits};
use super::records::{End, Records};
use super::schema::EditResponse;
use super::Admission;
use super::{ApiError, EditService, Phase};

/// One job through the service: its admission (waiting while the server is full or the model
/// loads, up to `REQUEST_TIMEOUT`), then the edit. Dropping the future abandons the job.
pub async fn run_job(service: &EditService, body: Bytes) -> Result<EditResponse, ApiError> {
    let started = Instant::now();
    let admission = loop {
        match service.admit() {
            Ok(admission) => break admission,
            Err(e) if e.error_type == "overloaded" || service.phase() == Phase::Loading => {
                wait_for_room(service, started).await?;
            }
            Err(e) => return Err(e),
        }
    };
    execute(service, admission, body, started).await
}

/// Sleeps briefly before another try, or fails with 504 when `REQUEST_TIMEOUT` has passed.
async fn wait_for_room(service: &EditService, started: Instant) -> Result<(), ApiError> {
    if started.elapsed() >= service.settings().request_timeout {
        return Err(ApiError::new(
            StatusCode::GATEWAY_TIMEOUT,
            "timeout",
            "no queue place became free within REQUEST_TIMEOUT; retry later",
        ));
    }
    tokio::time::sleep(Duration::from_millis(25)).await;
    Ok(())
}

/// The edit of an admitted job; `REQUEST_TIMEOUT` counts from `started`. A job is not a client that
/// can retry: when the service answers `overloaded` (the queue or REQUEST_MEMORY filled up after the
/// admission) it is admitted and edited again, until `REQUEST_TIMEOUT`.
async fn execute(service: &EditService, admission: Admission, body: Bytes, started: Instant) -> Result<EditResponse, ApiError> {
    let mut admission = Some(admission);
    loop {
        let next = match admission.take() {
            Some(a) => a,
            None => match service.admit() {
                Ok(a) => a,
                Err(e) if e.error_type == "overloaded" => {
                    wait_for_room(service, started).await?;
                    continue;
                }
                Err(e) => return Err(e),
            },
        };
        match service.edit(next, body.clone(), started).await {
            Err(e) if e.error_type == "overloaded" => wait_for_room(service, started).await?,
            result => return result,
        }
    }
}

/// What the body of a submission must have: an `input`, and optionally a `webhook` URL.
#[derive(serde::Deserialize)]
struct Submission {
    input: Option<serde::de::IgnoredAny>,
    webhook: Option<String>,
}

fn peek(body: &[u8]) -> Result<Option<String>, ApiError> {
    if body.iter().find(|b| !b.is_ascii_whitespace()) != Some(&b'{') {
        return Err(ApiError::invalid_json("the body must be a JSON object {\"input\": {...}}"));
    }
    let s: Submission = serde_json::from_slice(body).map_err(|e| match e.classify() {
        serde_json::error::Category::Data => ApiError::validation(format!("webhook must be a string URL: {e}")),
        _ => ApiError::invalid_json(format!("the body is not valid JSON: {e}")),
    })?;
    if s.input.is_none() {
        return Err(ApiError::invalid_json(
            "the body has no \"input\"; send {\"input\": {\"prompt\": ..., \"image_base64\": ...}}",
        ));
    }
    Ok(s.webhook.filter(|w| !w.trim().is_empty()))
}

fn webhook_error(e: FetchError) -> ApiError {
    match e {
        FetchError::Blocked(m) => {
            ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, "url_not_allowed", format!("webhook is not allowed: {m}"))
        }
        other => ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, "invalid_url", format!("webhook: {other}")),
    }
}

/// Decrements the busy count when a job task or a webhook delivery ends (or is aborted).
struct Busy(watch::Sender<usize>);

impl Busy {
    fn new(count: &watch::Sender<usize>) -> Busy {
        count.send_modify(|n| *n += 1);
        Busy(count.clone())
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        self.0.send_modify(|n| *n = n.saturating_sub(1));
    }
}

/// The async jobs of one server (see the module doc).
pub struct JobStore {
    service: Arc<EditService>,
    inner: Mutex<Records>,
    wake: Notify,
    webhooks: Fetcher,
    busy: watch::Sender<usize>,
}

impl JobStore {
    /// A store under the settings' limits, with its dispatcher running.
    pub fn start(service: Arc<EditService>) -> Result<Arc<JobStore>, String> {
        let limits = StoreLimits::from_settings(service.settings());
        let webhooks = Fetcher::new(FetchPolicy::from_settings(service.settings()))?;
        let store = Arc::new(JobStore {
            service,
            inner: Mutex::new(Records::new(limits)),
            wake: Notify::new(),
            webhooks,
            busy: watch::channel(0).0,
        });
        tokio::spawn(dispatch(Arc::downgrade(&store)));
        Ok(store)
    }

    fn lock(&self) -> MutexGuard<'_, Records> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Queues a job body (`{"input": ..., "webhook"?: ...}`); returns its id at once. Refused with 400
    /// (no JSON object, no `input`), 422 (a webhook that is not an allowed http(s) URL) or 503 (the
    /// server drains or failed, or the store's budget is full of queued inputs). A loading model is
    /// no refusal: the job waits in the queue.
    pub async fn submit(&self, body: Bytes, kind: Kind, request_id: &str) -> Result<String, ApiError> {
        let webhook = if body.len() > 1 << 20 {
            let b = body.clone();
            tokio::task::spawn_blocking(move || peek(&b)).await.map_err(|e| ApiError::internal(e.to_string()))??
        } else {
            peek(&body)?
        };
        if let Some(w) = &webhook {
            self.webhooks.vet(w).map_err(webhook_error)?;
        }
        self.accepting()?;
        let id = new_id(kind);
        self.lock().insert(id.clone(), kind, body, webhook, request_id.to_string(), Instant::now())?;
        tracing::info!(job = %id, "job queued");
        self.wake.notify_one();
        Ok(id)
    }

    /// Whether jobs are taken now (503 `not_ready` while draining or after the model failed; a
    /// loading model is no refusal). Front ends ask before they read a body.
    pub fn accepting(&self) -> Result<(), ApiError> {
        match self.service.phase() {
            Phase::Draining | Phase::Failed(_) => {
                Err(ApiError::not_ready("the server is not taking jobs (shutting down or failed)", Duration::from_secs(5)))
            }
            _ => Ok(()),
        }
    }

    /// The job's current view; `None` if it never existed or is gone (TTL or budget).
    pub fn status(&self, id: &str) -> Option<JobView> {
        self.lock().view(id, Instant::now())
    }

    /// Waits up to `wait` for the job to end; then its view as it is.
    pub async fn wait(&self, id: &str, wait: Duration) -> Option<JobView> {
        let mut rx = { self.lock().subscribe(id)? };
        if let Ok(Ok(v)) = tokio::time::timeout(wait, rx.wait_for(Option::is_some)).await {
            return v.clone();
        }
        self.status(id)
    }

    /// Cancels a queued or running job (a running job's edit future is dropped); a finished job is
    /// left as it is. Returns the job's view; `None` if it is unknown or gone.
    pub fn cancel(&self, id: &str) -> Option<JobView> {
        let now = Instant::now();
        let view = {
            let mut g = self.lock();
            g.sweep(now);
            match g.end(id, End::Cancelled, now) {
                Some((v, _)) => Some(v),
                None => g.view(id, now),
            }
        };
        self.wake.notify_one();
        view
    }

    /// Cancels every queued job (running ones go on); returns how many.
    pub fn purge(&self) -> usize {
        let now = Instant::now();
        let mut g = self.lock();
        let ids = g.queued();
        ids.iter().filter(|id| g.end(id, End::Cancelled, now).is_some()).count()
    }

    pub fn health(&self) -> StoreHealth {
        let mut g = self.lock();
        g.sweep(Instant::now());
        g.health()
    }

    /// Stops taking jobs: every queued job fails with 503 `not_ready` (its webhook is told), the
    /// running ones go on. Then [`JobStore::drained`] waits for them and their webhooks.
    pub fn close(&self) {
        let now = Instant::now();
        let e = ApiError::not_ready("the server shut down before this job started; submit it again", Duration::from_secs(5));
        let ended: Vec<_> = {
            let mut g = self.lock();
            g.close();
            let ids = g.queued();
            ids.iter().filter_map(|id| g.end(id, End::Error(JobStatus::Failed, failure_text(&e)), now)).collect()
        };
        for (view, webhook) in ended {
            self.notify_webhook(&view, webhook);
        }
        self.wake.notify_one();
    }

    /// Completes when no job runs and no webhook is being delivered.
    pub async fn drained(&self) {
        let mut rx = self.busy.subscribe();
        let _ = rx.wait_for(|n| *n == 0).await;
    }

    /// One dispatcher step: start the next queued job if the service admits it.
    fn dispatch_one(self: &Arc<Self>) -> Step {
        let mut g = self.lock();
        if g.is_closed() {
            return Step::Stop;
        }
        if !g.can_start() {
            return Step::Idle;
        }
        let admission = match self.service.admit() {
            Ok(a) => a,
            Err(e) => {
                return match self.service.phase() {
                    Phase::Loading => Step::Retry(Duration::from_millis(50)),
                    Phase::Ready => Step::Retry(Duration::from_millis(20)),
                    Phase::Draining | Phase::Failed(_) => {
                        drop(g);
                        self.fail_queued(&e);
                        Step::Idle
                    }
                };
            }
        };
        let Some((id, body, request_id)) = g.start_next(Instant::now()) else { return Step::Idle };
        let store = self.clone();
        let busy = Busy::new(&self.busy);
        let task_id = id.clone();
        let span = tracing::info_span!("job", request_id = %request_id, job = %id);
        let handle = tokio::spawn(
            async move {
                let _busy = busy;
                let result = execute(&store.service, admission, body, Instant::now()).await;
                store.finish(&task_id, result);
            }
            .instrument(span),
        );
        g.set_abort(&id, handle.abort_handle());
        Step::Started
    }

    fn fail_queued(&self, e: &ApiError) {
        let now = Instant::now();
        let ended: Vec<_> = {
            let mut g = self.lock();
            let ids = g.queued();
            ids.iter().filter_map(|id| g.end(id, End::Error(JobStatus::Failed, failure_text(e)), now)).collect()
        };
        for (view, webhook) in ended {
            self.notify_webhook(&view, webhook);
        }
    }

    fn finish(&self, id: &str, result: Result<EditResponse, ApiError>) {
        let end = match result {
            Ok(r) => End::Output(Bytes::from(r.to_json())),
            Err(e) if e.error_type == "timeout" => End::Error(JobStatus::TimedOut, failure_text(&e)),
            Err(e) => End::Error(JobStatus::Failed, failure_text(&e)),
        };
        let ended = self.lock().end(id, end, Instant::now());
        self.wake.notify_one();
        if let Some((view, webhook)) = ended {
            self.notify_webhook(&view, webhook);
        }
    }

    /// POSTs the final record to the job's webhook in the background (failures are logged).
    fn notify_webhook(&self, view: &JobView, webhook: Option<String>) {
        let Some(url) = webhook else { return };
        let body = Bytes::from(view.to_json());
        let fetcher = self.webhooks.clone();
        let busy = Busy::new(&self.busy);
        let id = view.id.clone();
        tokio::spawn(async move {
            let _busy = busy;
            match fetcher.post_json(&url, body).await {
                Ok(status) => tracing::debug!(job = %id, status, "webhook delivered"),
                Err(e) => tracing::warn!(job = %id, "webhook not delivered: {e}"),
            }
        });
    }
}

enum Step {
    Started,
    Idle,
    Retry(Duration),
    Stop,
}

/// Feeds queued jobs to the service while there is room; ends with the store or after `close`.
async fn dispatch(store: std::sync::Weak<JobStore>) {
    loop {
        let Some(s) = store.upgrade() else { return };
        let notified = s.wake.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        match s.dispatch_one() {
            Step::Started => continue,
            Step::Stop => return,
            // Wake up now and then, so that a dropped store ends its dispatcher.
            Step::Idle => {
                let _ = tokio::time::timeout(Duration::from_secs(1), notified).await;
            }
            Step::Retry(after) => {
                let _ = tokio::time::timeout(after, notified).await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn submissions_need_an_object_with_input() {
        assert_eq!(peek(br#"{"input": {"prompt": "x"}, "webhook": "https://h/x"}"#).unwrap().as_deref(), Some("https://h/x"));
        assert_eq!(peek(br#"{"input": "anything", "webhook": " "}"#).unwrap(), None);
        for (body, t) in [
            (&b"[1]"[..], "invalid_json"),
            (b"{", "invalid_json"),
            (b"{}", "invalid_json"),
            (br#"{"input": null}"#, "invalid_json"),
            (br#"{"input": {}, "webhook": 5}"#, "validation_error"),
        ] {
            assert_eq!(peek(body).unwrap_err().error_type, t, "{}", String::from_utf8_lossy(body));
        }
    }
}
