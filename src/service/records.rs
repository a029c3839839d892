//! The records of async jobs and their memory accounting (pure: no tasks, no service, the clock
//! passed in): states with RunPod's names, the FIFO, TTL expiry, the budget, the rendered record.
//!
//! Every method keeps the bytes charged within the budget: a record is charged for its input while
//! it waits or runs and for its result once it ended (plus `RECORD_COST`); past the budget the
//! oldest finished records go first; a new job that would not fit even then is refused.

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::sync::watch;

use super::ApiError;
use crate::config::Settings;

/// Memory charged to every record besides its input or result (map entry, record, queue entries).
pub const RECORD_COST: usize = 512;
/// How long a runsync job's result is kept at most (RunPod keeps them a minute).
pub const SYNC_RESULT_TTL: Duration = Duration::from_secs(60);

/// A failed job's `error` as the RunPod worker library reports a handler's exception: a JSON text
/// with `error_type` and `error_message` (plus the HTTP `status` the same error gets on `/run`).
pub fn failure_text(e: &ApiError) -> String {
    serde_json::json!({"error_type": e.error_type, "error_message": e.message, "status": e.status.as_u16()}).to_string()
}

/// A job's state, with RunPod's names.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum JobStatus {
    InQueue,
    InProgress,
    Completed,
    Failed,
    Cancelled,
    TimedOut,
}

impl JobStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            JobStatus::InQueue => "IN_QUEUE",
            JobStatus::InProgress => "IN_PROGRESS",
            JobStatus::Completed => "COMPLETED",
            JobStatus::Failed => "FAILED",
            JobStatus::Cancelled => "CANCELLED",
            JobStatus::TimedOut => "TIMED_OUT",
        }
    }
    pub fn is_final(self) -> bool {
        !matches!(self, JobStatus::InQueue | JobStatus::InProgress)
    }
}

/// `/run` jobs and `/runsync` jobs differ in how long their results are kept.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Async = 0,
    Sync = 1,
}

/// What a job is now, as `status` shows it.
#[derive(Clone, Debug, PartialEq)]
pub struct JobView {
    pub id: String,
    pub status: JobStatus,
    /// The `X-Request-ID` of the request that submitted the job.
    pub request_id: String,
    /// 1 for the next job to start, while the job is `IN_QUEUE`.
    pub queue_position: Option<usize>,
    /// Milliseconds from submission to the start (or to now/the end, for a job that never started).
    pub delay_ms: Option<u64>,
    /// Milliseconds from the start to the end.
    pub execution_ms: Option<u64>,
    /// The `/run` response object (JSON), for a completed job.
    pub output: Option<Bytes>,
    /// [`failure_text`], for a failed or timed-out job.
    pub error: Option<String>,
}

impl JobView {
    /// RunPod's job record: `{"id", "status", "requestId", "queuePosition"?, "delayTime"?, "executionTime"?,
    /// "output"? | "error"?}`.
    /// The output JSON is copied in as is (it holds the multi-megabyte base64 image).
    pub fn to_json(&self) -> Vec<u8> {
        let mut head = serde_json::json!({"id": self.id, "status": self.status.as_str(), "requestId": self.request_id});
        if let Some(obj) = head.as_object_mut() {
            if let Some(p) = self.queue_position {
                obj.insert("queuePosition".into(), p.into());
            }
            if let Some(d) = self.delay_ms {
                obj.insert("delayTime".into(), d.into());
            }
            if let Some(e) = self.execution_ms {
                obj.insert("executionTime".into(), e.into());
            }
            if let Some(e) = &self.error {
                obj.insert("error".into(), e.clone().into());
            }
        }
        let mut out = serde_json::to_vec(&head).unwrap_or_else(|_| b"{}".to_vec());
        if let Some(output) = &self.output {
            out.pop(); // the closing brace
            out.reserve(output.len() + 12);
            out.extend_from_slice(b",\"output\":");
            out.extend_from_slice(output);
            out.push(b'}');
        }
        out
    }
}

/// Counts for `/v2/.../health` and the memory check.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct StoreHealth {
    pub in_queue: usize,
    pub in_progress: usize,
    pub completed: u64,
    pub failed: u64,
    pub cancelled: u64,
    pub timed_out: u64,
    /// Finished records dropped for the budget / past the TTL.
    pub evicted: u64,
    pub expired: u64,
    /// Records kept, and the bytes charged for them (never above `budget`).
    pub records: usize,
    pub bytes: usize,
    pub peak_bytes: usize,
    pub budget: usize,
}

/// The store's limits.
#[derive(Clone, Copy, Debug)]
pub struct StoreLimits {
    pub ttl: Duration,
    pub sync_ttl: Duration,
    pub budget: usize,
    /// Async jobs running in the service at once.
    pub max_running: usize,
}

impl StoreLimits {
    pub fn from_settings(s: &Settings) -> StoreLimits {
        StoreLimits {
            ttl: s.result_ttl,
            sync_ttl: s.result_ttl.min(SYNC_RESULT_TTL),
            budget: s.result_memory_bytes,
            max_running: 2 * s.batch_size.max(1),
        }
    }
}

pub(super) struct Record {
    kind: Kind,
    status: JobStatus,
    submitted: Instant,
    started: Option<Instant>,
    ended: Option<Instant>,
    /// The request body until the job ends.
    input: Option<Bytes>,
    output: Option<Bytes>,
    error: Option<String>,
    webhook: Option<String>,
    request_id: String,
    abort: Option<tokio::task::AbortHandle>,
    /// Gets the final view once (runsync waits on it).
    done: watch::Sender<Option<JobView>>,
    cost: usize,
}

fn ms(d: Duration) -> u64 {
    d.as_millis().min(u128::from(u64::MAX)) as u64
}

impl Record {
    pub(super) fn view(&self, id: &str, now: Instant) -> JobView {
        let delay = match (self.started, self.ended) {
            (Some(s), _) => Some(s - self.submitted),
            (None, Some(e)) => Some(e - self.submitted),
            (None, None) if self.status == JobStatus::InQueue => None,
            (None, None) => Some(now - self.submitted),
        };
        let execution = match (self.started, self.ended) {
            (Some(s), Some(e)) => Some(e - s),
            _ => None,
        };
        JobView {
            id: id.to_string(),
            status: self.status,
            request_id: self.request_id.clone(),
            queue_position: None,
            delay_ms: delay.map(ms),
            execution_ms: execution.map(ms),
            output: self.output.clone(),
            error: self.error.clone(),
        }
    }
}

/// The records and their accounting.
pub(super) struct Records {
    limits: StoreLimits,
    jobs: HashMap<String, Record>,
    queue: VecDeque<String>,
    /// Finished ids in the order they finished, one deque per kind (each kind has one TTL, so each
    /// deque is also in expiry order), with the sequence number that orders the two for eviction.
    finished: [VecDeque<(u64, String)>; 2],
    seq: u64,
    running: usize,
    bytes: usize,
    peak: usize,
    health: StoreHealth,
    closed: bool,
}

/// How a job ends.
pub(super) enum End {
    Output(Bytes),
    Error(JobStatus, String),
    Cancelled,
}

impl Records {
    pub(super) fn new(limits: StoreLimits) -> Records {
        Records {
            limits,
            jobs: HashMap::new(),
            queue: VecDeque::new(),
            finished: [VecDeque::new(), VecDeque::new()],
            seq: 0,
            running: 0,
            bytes: 0,
            peak: 0,
            health: StoreHealth { budget: limits.budget, ..StoreHealth::default() },
            closed: false,
        }
    }

    /// Every caller has made room first, so `bytes` stays within the budget.
    fn charge(&mut self, add: usize, remove: usize) {
        self.bytes = self.bytes + add - remove;
        self.peak = self.peak.max(self.bytes);
    }

    /// Drops the records past their TTL.
    pub(super) fn sweep(&mut self, now: Instant) {
        for kind in [Kind::Async, Kind::Sync] {
            let ttl = if kind == Kind::Sync { self.limits.sync_ttl } else { self.limits.ttl };
            while let Some((_, id)) = self.finished[kind as usize].front() {
                let expired = self.jobs.get(id).and_then(|r| r.ended).is_none_or(|e| now >= e + ttl);
                if !expired {
                    break;
                }
                let (_, id) = self.finished[kind as usize].pop_front().unwrap_or_default();
                if let Some(r) = self.jobs.remove(&id) {
                    self.charge(0, r.cost);
                    self.health.expired += 1;
                }
            }
        }
    }

    /// Drops the oldest finished record; false when there is none.
    fn evict_oldest(&mut self) -> bool {
        let front = |d: &VecDeque<(u64, String)>| d.front().map_or(u64::MAX, |(s, _)| *s);
        let (a, s) = (front(&self.finished[0]), front(&self.finished[1]));
        if a == u64::MAX && s == u64::MAX {
            return false;
        }
        let which = if a <= s { 0 } else { 1 };
        if let Some((_, id)) = self.finished[which].pop_front() {
            if let Some(r) = self.jobs.remove(&id) {
                self.charge(0, r.cost);
                self.health.evicted += 1;
            }
        }
        true
    }

    /// Evicts finished records until `extra` more bytes fit; false if they cannot.
    fn make_room(&mut self, extra: usize) -> bool {
        while self.bytes + extra > self.limits.budget {
            if !self.evict_oldest() {
                return false;
            }
        }
        true
    }

    pub(super) fn insert(
        &mut self,
        id: String,
        kind: Kind,
        body: Bytes,
        webhook: Option<String>,
        request_id: String,
        now: Instant,
    ) -> Result<(), ApiError> {
        self.sweep(now);
        if self.closed {
            return Err(ApiError::not_ready(
                "the server is shutting down; submit the job to another instance",
                Duration::from_secs(5),
            ));
        }
        let cost = RECORD_COST + id.len() + request_id.len() + body.len() + webhook.as_ref().map_or(0, String::len);
        if !self.make_room(cost) {
            return Err(ApiError::overloaded(
                format!(
                    "the job store is full: queued and running jobs hold its whole budget of {} bytes (RESULT_MEMORY_BYTES); retry later",
                    self.limits.budget
                ),
                Duration::from_secs(5),
            ));
        }
        self.charge(cost, 0);
        let record = Record {
            kind,
            status: JobStatus::InQueue,
            submitted: now,
            started: None,
            ended: None,
            input: Some(body),
            output: None,
            error: None,
            webhook,
            request_id,
            abort: None,
            done: watch::channel(None).0,
            cost,
        };
        self.queue.push_back(id.clone());
        self.jobs.insert(id, record);
        Ok(())
    }

    /// The next queued job, now in progress (when fewer than `max_running` run): its id, body and
    /// request id.
    pub(super) fn start_next(&mut self, now: Instant) -> Option<(String, Bytes, String)> {
        if self.running >= self.limits.max_running {
            return None;
        }
        while let Some(id) = self.queue.pop_front() {
            let Some(r) = self.jobs.get_mut(&id) else { continue };
            if r.status != JobStatus::InQueue {
                continue;
            }
            r.status = JobStatus::InProgress;
            r.started = Some(now);
            self.running += 1;
            let body = r.input.clone().unwrap_or_default();
            return Some((id, body, r.request_id.clone()));
        }
        None
    }

    /// Ends a queued or running job; returns its final view and, unless cancelled, its webhook.
    /// A job that already ended (or is gone) is left alone (`None`).
    pub(super) fn end(&mut self, id: &str, end: End, now: Instant) -> Option<(JobView, Option<String>)> {
        let r = self.jobs.get_mut(id)?;
        let was = r.status;
        if was.is_final() {
            return None;
        }
        let (status, output, error) = match end {
            End::Output(o) => (JobStatus::Completed, Some(o), None),
            End::Error(s, e) => (s, None, Some(e)),
            End::Cancelled => (JobStatus::Cancelled, None, None),
        };
        let cost = RECORD_COST
            + id.len()
            + r.request_id.len()
            + output.as_ref().map_or(0, Bytes::len)
            + error.as_ref().map_or(0, String::len);
        let old = r.cost;
        r.status = status;
        r.ended = Some(now);
        r.input = None;
        r.output = output;
        r.error = error;
        r.cost = cost;
        if let Some(a) = r.abort.take() {
            a.abort();
        }
        let webhook = if status == JobStatus::Cancelled { None } else { r.webhook.take() };
        let view = r.view(id, now);
        r.done.send_replace(Some(view.clone()));
        let kind = r.kind;
        if was == JobStatus::InProgress {
            self.running -= 1;
        } else if let Some(pos) = self.queue.iter().position(|q| q == id) {
            self.queue.remove(pos);
        }
        match status {
            JobStatus::Completed => self.health.completed += 1,
            JobStatus::Failed => self.health.failed += 1,
            JobStatus::TimedOut => self.health.timed_out += 1,
            _ => self.health.cancelled += 1,
        }
        // The result replaces the input; older results make room for it. One that does not fit even
        // then is not kept (a runsync waiter still gets its view from `done`).
        self.charge(0, old);
        if self.make_room(cost) {
            self.charge(cost, 0);
            self.seq += 1;
            self.finished[kind as usize].push_back((self.seq, id.to_string()));
        } else {
            self.jobs.remove(id);
            self.health.evicted += 1;
        }
        Some((view, webhook))
    }

    pub(super) fn view(&mut self, id: &str, now: Instant) -> Option<JobView> {
        self.sweep(now);
        let mut view = self.jobs.get(id).map(|r| r.view(id, now))?;
        if view.status == JobStatus::InQueue {
            let mut queued = self.queue.iter().filter(|q| self.jobs.get(*q).is_some_and(|r| r.status == JobStatus::InQueue));
            view.queue_position = queued.position(|q| q == id).map(|p| p + 1);
        }
        Some(view)
    }

    pub(super) fn health(&self) -> StoreHealth {
        StoreHealth {
            in_queue: self.queue.len(),
            in_progress: self.running,
            records: self.jobs.len(),
            bytes: self.bytes,
            peak_bytes: self.peak,
            ..self.health.clone()
        }
    }

    /// Follows the job's end (its final view arrives once).
    pub(super) fn subscribe(&self, id: &str) -> Option<watch::Receiver<Option<JobView>>> {
        self.jobs.get(id).map(|r| r.done.subscribe())
    }

    /// Keeps the handle that cancels a running job.
    pub(super) fn set_abort(&mut self, id: &str, abort: tokio::task::AbortHandle) {
        if let Some(r) = self.jobs.get_mut(id).filter(|r| r.status == JobStatus::InProgress) {
            r.abort = Some(abort);
        }
    }

    /// Whether a queued job could start now (one is queued, fewer than `max_running` run).
    pub(super) fn can_start(&self) -> bool {
        !self.queue.is_empty() && self.running < self.limits.max_running
    }

    pub(super) fn close(&mut self) {
        self.closed = true;
    }

    pub(super) fn is_closed(&self) -> bool {
        self.closed
    }

    /// Every queued job, in order.
    pub(super) fn queued(&self) -> Vec<String> {
        self.queue.iter().filter(|id| self.jobs.get(*id).is_some_and(|r| r.status == JobStatus::InQueue)).cloned().collect()
    }
}

/// A random RFC 4122 version-4 id (`sync-` in front for runsync jobs, as RunPod does).
pub fn new_id(kind: Kind) -> String {
    let mut b: [u8; 16] = rand::random();
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let h: String = b.iter().map(|x| format!("{x:02x}")).collect();
    let uuid = format!("{}-{}-{}-{}-{}", &h[0..8], &h[8..12], &h[12..16], &h[16..20], &h[20..32]);
    match kind {
        Kind::Async => uuid,
        Kind::Sync => format!("sync-{uuid}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(budget: usize) -> StoreLimits {
        StoreLimits { ttl: Duration::from_secs(1800), sync_ttl: Duration::from_secs(60), budget, max_running: 8 }
    }

    fn output(n: usize) -> Bytes {
        Bytes::from(format!("{{\"image\":\"{}\"}}", "A".repeat(n)))
    }

    #[test]
    fn ids_are_uuids() {
        let a = new_id(Kind::Async);
        assert_eq!(a.len(), 36);
        assert_eq!(a.as_bytes()[14], b'4');
        assert_ne!(a, new_id(Kind::Async));
        assert!(new_id(Kind::Sync).starts_with("sync-"));
    }

    #[test]
    fn a_job_goes_through_its_states_and_its_record_renders() {
        let mut s = Records::new(limits(1 << 20));
        let t0 = Instant::now();
        s.insert("a".into(), Kind::Async, Bytes::from_static(b"{\"input\":{}}"), Some("http://h/".into()), "rid".into(), t0)
            .unwrap();
        let v = s.view("a", t0).unwrap();
        assert_eq!((v.status, v.delay_ms, v.execution_ms), (JobStatus::InQueue, None, None));
        assert_eq!(s.health().in_queue, 1);
        let (id, body, rid) = s.start_next(t0 + Duration::from_millis(30)).unwrap();
        assert_eq!(rid, "rid");
        assert_eq!((id.as_str(), &body[..]), ("a", &b"{\"input\":{}}"[..]));
        assert_eq!(s.view("a", t0).unwrap().status, JobStatus::InProgress);
        let (view, webhook) = s.end("a", End::Output(output(4)), t0 + Duration::from_millis(100)).unwrap();
        assert_eq!(webhook.as_deref(), Some("http://h/"));
        assert_eq!((view.status, view.delay_ms, view.execution_ms), (JobStatus::Completed, Some(30), Some(70)));
        let json: serde_json::Value = serde_json::from_slice(&view.to_json()).unwrap();
        assert_eq!(
            json,
            serde_json::json!({"id": "a", "status": "COMPLETED", "requestId": "rid", "delayTime": 30, "executionTime": 70, "output": {"image": "AAAA"}})
        );
        assert!(s.end("a", End::Cancelled, t0).is_none(), "a finished job stays finished");
        let h = s.health();
        assert_eq!((h.completed, h.in_progress, h.in_queue, h.records), (1, 0, 0, 1));

        s.insert("b".into(), Kind::Async, Bytes::from_static(b"{}"), None, "rid".into(), t0).unwrap();
        s.start_next(t0).unwrap();
        let e = failure_text(&ApiError::validation("input.prompt is required"));
        let (view, _) = s.end("b", End::Error(JobStatus::Failed, e), t0).unwrap();
        let json: serde_json::Value = serde_json::from_slice(&view.to_json()).unwrap();
        assert_eq!(json["status"], "FAILED");
        let err: serde_json::Value = serde_json::from_str(json["error"].as_str().unwrap()).unwrap();
        assert_eq!(
            err,
            serde_json::json!({"error_type": "validation_error", "error_message": "input.prompt is required", "status": 422})
        );
        assert!(json.get("output").is_none());
    }

    #[test]
    fn cancel_and_purge_take_queued_jobs_out_of_the_queue() {
        let mut s = Records::new(limits(1 << 20));
        let t = Instant::now();
        for id in ["a", "b", "c", "d"] {
            s.insert(id.into(), Kind::Async, Bytes::from_static(b"{}"), Some("http://h/".into()), "rid".into(), t).unwrap();
        }
        let (view, webhook) = s.end("b", End::Cancelled, t).unwrap();
        assert_eq!((view.status, webhook), (JobStatus::Cancelled, None), "no webhook for a cancelled job");
        let position = |s: &mut Records, id: &str| s.view(id, t).unwrap().queue_position;
        assert_eq!((position(&mut s, "a"), position(&mut s, "c"), position(&mut s, "d")), (Some(1), Some(2), Some(3)));
        assert_eq!(s.start_next(t).unwrap().0, "a");
        assert_eq!((position(&mut s, "a"), position(&mut s, "c"), position(&mut s, "d")), (None, Some(1), Some(2)));
        let json: serde_json::Value = serde_json::from_slice(&s.view("d", t).unwrap().to_json()).unwrap();
        assert_eq!((json["queuePosition"].as_u64(), json["requestId"].as_str()), (Some(2), Some("rid")));
        assert_eq!(s.queued(), vec!["c".to_string(), "d".to_string()]);
        let purged: Vec<_> = s.queued().iter().filter_map(|id| s.end(id, End::Cancelled, t)).collect();
        assert_eq!(purged.len(), 2);
        assert!(s.start_next(t).is_none());
        assert_eq!(s.view("a", t).unwrap().status, JobStatus::InProgress, "running jobs are not purged");
        assert_eq!(s.health().cancelled, 3);
    }

    #[test]
    fn at_most_max_running_jobs_run() {
        let mut s = Records::new(StoreLimits { max_running: 2, ..limits(1 << 20) });
        let t = Instant::now();
        for i in 0..3 {
            s.insert(format!("{i}"), Kind::Async, Bytes::new(), None, "rid".into(), t).unwrap();
        }
        assert!(s.start_next(t).is_some() && s.start_next(t).is_some());
        assert!(s.start_next(t).is_none());
        s.end("0", End::Output(output(1)), t).unwrap();
        assert_eq!(s.start_next(t).unwrap().0, "2");
    }

    #[test]
    fn results_expire_after_their_ttl() {
        let mut s =
            Records::new(StoreLimits { ttl: Duration::from_secs(100), sync_ttl: Duration::from_secs(10), ..limits(1 << 20) });
        let t = Instant::now();
        for (id, kind) in [("async", Kind::Async), ("sync", Kind::Sync)] {
            s.insert(id.into(), kind, Bytes::new(), None, "rid".into(), t).unwrap();
            s.start_next(t).unwrap();
            s.end(id, End::Output(output(10)), t).unwrap();
        }
        assert!(s.view("sync", t + Duration::from_secs(9)).is_some());
        assert!(s.view("sync", t + Duration::from_secs(10)).is_none(), "runsync results go after a minute at most");
        assert!(s.view("async", t + Duration::from_secs(99)).is_some());
        assert!(s.view("async", t + Duration::from_secs(100)).is_none());
        assert_eq!((s.health().expired, s.bytes, s.jobs.len()), (2, 0, 0));
    }

    /// 1,000 jobs through a small budget: the bytes charged never pass it, the oldest results go
    /// first, the newest stay, and a store full of queued inputs refuses new jobs.
    #[test]
    fn the_budget_holds_over_a_thousand_jobs() {
        let budget = 64 * 1024;
        let mut s = Records::new(StoreLimits { max_running: 4, ..limits(budget) });
        let t = Instant::now();
        let body = Bytes::from(vec![b' '; 700]);
        for i in 0..1000 {
            s.insert(format!("job-{i:04}"), Kind::Async, body.clone(), None, "rid".into(), t).unwrap();
            assert!(s.bytes <= budget, "after insert {i}: {} > {budget}", s.bytes);
            if i % 3 == 2 {
                // Three finish at a time, results of different sizes, some failures.
                for _ in 0..3 {
                    let (id, _, _) = s.start_next(t).unwrap();
                    let n: usize = id[4..].parse().unwrap();
                    let end = if n % 7 == 0 {
                        End::Error(JobStatus::Failed, "x".repeat(200))
                    } else {
                        End::Output(output(300 + n % 900))
                    };
                    s.end(&id, end, t).unwrap();
                    assert!(s.bytes <= budget, "after finishing {id}: {} > {budget}", s.bytes);
                }
            }
        }
        let h = s.health();
        assert!(h.peak_bytes <= budget && h.bytes <= budget, "{h:?}");
        assert!(h.evicted > 500, "the budget forced evictions: {h:?}");
        assert!(s.view("job-0000", t).is_none(), "the oldest result went first");
        assert_eq!(s.view("job-0998", t).unwrap().status, JobStatus::Completed, "the newest result stays");
        assert_eq!(s.view("job-0999", t).unwrap().status, JobStatus::InQueue);
        // Queued inputs cannot be evicted: once they fill the budget, new jobs are refused.
        let big = Bytes::from(vec![b' '; budget / 2]);
        s.insert("big-1".into(), Kind::Async, big.clone(), None, "rid".into(), t).unwrap();
        let e = s.insert("big-2".into(), Kind::Async, big, None, "rid".into(), t).unwrap_err();
        assert_eq!((e.status.as_u16(), e.error_type), (503, "overloaded"));
        assert!(e.message.contains("RESULT_MEMORY_BYTES"), "{}", e.message);
        assert!(s.bytes <= budget);
    }

    #[test]
    fn a_result_larger_than_the_budget_is_not_kept() {
        let mut s = Records::new(limits(4096));
        let t = Instant::now();
        s.insert("small".into(), Kind::Async, Bytes::new(), None, "rid".into(), t).unwrap();
        s.start_next(t).unwrap();
        s.end("small", End::Output(output(10)), t).unwrap();
        s.insert("huge".into(), Kind::Async, Bytes::new(), None, "rid".into(), t).unwrap();
        s.start_next(t).unwrap();
        let (view, _) = s.end("huge", End::Output(output(8000)), t).unwrap();
        assert_eq!(view.output.unwrap().len(), 8012, "the view still carries it (a runsync waiter gets it)");
        assert!(s.view("huge", t).is_none() && s.view("small", t).is_none());
        assert!(s.bytes <= 4096);
    }
}
