//! Groups compatible jobs into batches for the one engine worker thread that owns the engines.
//! Generic over the key, job, output and error types (a leaf: it imports nothing from the crate).
//!
//! Flow: a request first takes an admission [`Ticket`] (`try_admit`; none left = the queue is full,
//! the caller answers 503 at once). The ticket is held while the request is read, decoded and
//! prepared, then handed in with the prepared job (`submit`), which returns the job's own result
//! channel. A scheduler task keeps one bucket per [`BatchKey`]; whenever the worker is idle it picks:
//!
//! - ready buckets: those with `batch_size` jobs, or whose oldest job has waited `batch_timeout`;
//! - among them, the bucket whose **oldest job is oldest** (so no bucket starves: a waiting job's age
//!   only grows, and once it is ready at most one batch per older-headed bucket runs before it);
//! - up to `batch_size` jobs from its front (FIFO inside a bucket).
//!
//! A group of jobs submitted together (`submit_group`: the n images of one request) is one unit in its
//! bucket: a batch takes whole units from the bucket's front, so the group runs in one batch. A group
//! larger than `batch_size` is cut into units of `batch_size` that queue back to back (so it runs as
//! consecutive full batches).
//!
//! A batch is handed to the worker only when the worker is idle, so jobs that arrive while a batch
//! runs still join their bucket. Jobs whose client went away (result receiver dropped) are removed
//! before they are computed. Tickets are released when a job's batch starts, so `max_queue` bounds the
//! jobs waiting (and the memory they hold), not the ones running. The worker catches panics: a failing
//! or panicking batch fails its own jobs only, and the worker takes the next batch.

use std::collections::{HashMap, VecDeque};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, oneshot, OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;

/// What the engine worker runs: one batch of jobs to one result per job, in order (a closure over
/// the pipeline in production; test doubles in the unit tests).
pub trait Runner<J, O, E>: 'static {
    fn run_batch(&mut self, jobs: Vec<J>) -> Vec<Result<O, E>>;
}

impl<J, O, E, F: FnMut(Vec<J>) -> Vec<Result<O, E>> + 'static> Runner<J, O, E> for F {
    fn run_batch(&mut self, jobs: Vec<J>) -> Vec<Result<O, E>> {
        self(jobs)
    }
}

/// What a batch key must be: jobs with equal keys may share a batch.
pub trait BatchKey: Clone + Eq + std::hash::Hash + std::fmt::Debug + Send + 'static {}
impl<K: Clone + Eq + std::hash::Hash + std::fmt::Debug + Send + 'static> BatchKey for K {}

/// Why the batcher itself failed a job (the job's own errors come from the runner).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Failure {
    /// The engine worker is not running (it could not open its engines, or it stopped).
    #[error("the engine worker is not running")]
    WorkerGone,
    /// The runner panicked while running this job's batch.
    #[error("the engine worker panicked while running a batch of {batch}: {message}")]
    Panicked { batch: usize, message: String },
    /// The runner returned the wrong number of results.
    #[error("the pipeline returned {got} results for a batch of {batch}")]
    WrongCount { batch: usize, got: usize },
}

/// Batching and queueing limits.
#[derive(Clone, Copy, Debug)]
pub struct BatchPolicy {
    pub batch_size: usize,
    pub batch_timeout: Duration,
    pub max_queue: usize,
}

/// A finished job with how it went through the batcher.
#[derive(Debug)]
pub struct Done<O> {
    pub output: O,
    pub queue_time: Duration,
    pub compute_time: Duration,
    pub batch_size: usize,
}

/// Events for metrics and logs.
pub trait Observer: Send + Sync + 'static {
    /// A batch of `size` jobs starts; `queue_times` are how long each waited.
    fn batch_started(&self, _size: usize, _queue_times: &[Duration]) {}
    /// A batch finished in `compute` with `failed` failed jobs.
    fn batch_finished(&self, _size: usize, _compute: Duration, _failed: usize) {}
    /// Queued jobs dropped because their client went away.
    fn cancelled(&self, _n: usize) {}
}

/// No-op observer.
pub struct NoObserver;
impl Observer for NoObserver {}

/// Admission to the queue: held from the start of a request until its batch starts.
#[derive(Debug)]
pub struct Ticket {
    _permit: OwnedSemaphorePermit,
}

/// The result channel of one job.
pub type JobReceiver<O, E> = oneshot::Receiver<Result<Done<O>, E>>;

struct Pending<K, J, O, E> {
    key: K,
    job: J,
    tx: oneshot::Sender<Result<Done<O>, E>>,
    enqueued: Instant,
    _ticket: Ticket,
}

enum Msg<K, J, O, E> {
    /// One unit: a job, or a group that must share a batch (at most `batch_size` jobs, one key).
    Jobs(Vec<Pending<K, J, O, E>>),
    Close,
}

/// Handle to the batcher (cheap to clone).
pub struct Batcher<K, J, O, E> {
    tx: mpsc::UnboundedSender<Msg<K, J, O, E>>,
    permits: Arc<Semaphore>,
    policy: BatchPolicy,
    /// Exponential moving average of batch compute time, microseconds (0 = none yet).
    batch_ewma_us: Arc<AtomicU64>,
}

impl<K, J, O, E> Clone for Batcher<K, J, O, E> {
    fn clone(&self) -> Self {
        Batcher {
            tx: self.tx.clone(),
            permits: self.permits.clone(),
            policy: self.policy,
            batch_ewma_us: self.batch_ewma_us.clone(),
        }
    }
}

/// Completes when the scheduler and the worker have stopped (after `close` and an empty queue).
pub type Finished = tokio::task::JoinHandle<()>;

/// What the worker reports once `open` ran: its extra value, or why the runner could not be built.
pub type Opened<T> = oneshot::Receiver<Result<T, String>>;

/// A started batcher: its handle, the worker's report of `open`, and its end.
pub type Started<K, J, O, E, T> = (Batcher<K, J, O, E>, Opened<T>, Finished);

impl<K: BatchKey, J: Send + 'static, O: Send + 'static, E: From<Failure> + Send + 'static> Batcher<K, J, O, E> {
    /// Starts the scheduler task (on the current tokio runtime) and the engine worker thread, which
    /// first calls `open` to build its runner (the pipeline is created, used and dropped on that
    /// thread) and sends `open`'s extra value (or its error) on the returned channel.
    pub fn start<R, T, F>(policy: BatchPolicy, observer: Arc<dyn Observer>, open: F) -> std::io::Result<Started<K, J, O, E, T>>
    where
        R: Runner<J, O, E>,
        T: Send + 'static,
        F: FnOnce() -> Result<(R, T), String> + Send + 'static,
    {
        let policy = BatchPolicy { batch_size: policy.batch_size.max(1), max_queue: policy.max_queue.max(1), ..policy };
        let (tx, rx) = mpsc::unbounded_channel();
        let (ready_tx, ready_rx) = oneshot::channel();
        let (batch_tx, batch_rx) = std::sync::mpsc::channel::<Vec<Pending<K, J, O, E>>>();
        let (idle_tx, idle_rx) = mpsc::unbounded_channel::<()>();
        let batch_ewma_us = Arc::new(AtomicU64::new(0));
        let ewma = batch_ewma_us.clone();
        let obs = observer.clone();
        std::thread::Builder::new().name("engine-worker".into()).spawn(move || {
            let runner = match catch_unwind(AssertUnwindSafe(open)) {
                Ok(Ok((runner, extra))) => {
                    let _ = ready_tx.send(Ok(extra));
                    runner
                }
                Ok(Err(e)) => {
                    let _ = ready_tx.send(Err(e));
                    return;
                }
                Err(p) => {
                    let _ = ready_tx.send(Err(format!("loading the model panicked: {}", panic_message(&p))));
                    return;
                }
            };
            worker(runner, batch_rx, idle_tx, obs, ewma);
        })?;
        let finished = tokio::spawn(schedule(rx, batch_tx, idle_rx, policy, observer));
        let batcher = Batcher { tx, permits: Arc::new(Semaphore::new(policy.max_queue)), policy, batch_ewma_us };
        Ok((batcher, ready_rx, finished))
    }

    /// A queue place, or `None` when `max_queue` jobs are already waiting.
    pub fn try_admit(&self) -> Option<Ticket> {
        self.permits.clone().try_acquire_owned().ok().map(|p| Ticket { _permit: p })
    }

    /// `n` queue places at once (all or none), or `None` when fewer are free.
    pub fn try_admit_many(&self, n: usize) -> Option<Vec<Ticket>> {
        if n == 0 {
            return Some(Vec::new());
        }
        let mut all = self.permits.clone().try_acquire_many_owned(u32::try_from(n).ok()?).ok()?;
        let mut tickets: Vec<Ticket> = (1..n).filter_map(|_| all.split(1)).map(|p| Ticket { _permit: p }).collect();
        tickets.push(Ticket { _permit: all });
        Some(tickets)
    }

    /// Queues a prepared job; its result arrives on the returned channel. If the batcher has
    /// stopped, the channel closes without a result.
    pub fn submit(&self, ticket: Ticket, key: K, job: J) -> JobReceiver<O, E> {
        let (tx, rx) = oneshot::channel();
        let p = Pending { key, job, tx, enqueued: Instant::now(), _ticket: ticket };
        let _ = self.tx.send(Msg::Jobs(vec![p]));
        rx
    }

    /// Queues jobs that must run together (one key): they share one batch when there are at most
    /// `batch_size` of them; more run as consecutive batches of `batch_size`. One result channel per
    /// job, in order; one ticket per job.
    pub fn submit_group(&self, tickets: Vec<Ticket>, key: K, jobs: Vec<J>) -> Vec<JobReceiver<O, E>> {
        let now = Instant::now();
        let mut receivers = Vec::with_capacity(jobs.len());
        let mut unit = Vec::new();
        for (ticket, job) in tickets.into_iter().zip(jobs) {
            let (tx, rx) = oneshot::channel();
            receivers.push(rx);
            unit.push(Pending { key: key.clone(), job, tx, enqueued: now, _ticket: ticket });
            if unit.len() == self.policy.batch_size {
                let _ = self.tx.send(Msg::Jobs(std::mem::take(&mut unit)));
            }
        }
        if !unit.is_empty() {
            let _ = self.tx.send(Msg::Jobs(unit));
        }
        receivers
    }

    /// Finish every queued job, then stop the scheduler and the worker.
    pub fn close(&self) {
        let _ = self.tx.send(Msg::Close);
    }

    /// Jobs admitted and not yet running.
    pub fn depth(&self) -> usize {
        self.policy.max_queue - self.permits.available_permits()
    }

    pub fn policy(&self) -> BatchPolicy {
        self.policy
    }

    /// A `Retry-After` for an overloaded queue: the time to work off the queue at the recent batch
    /// speed, 1..=60 seconds.
    pub fn retry_after(&self) -> Duration {
        let per_batch = Duration::from_micros(self.batch_ewma_us.load(Ordering::Relaxed).max(1_000_000));
        let batches = self.depth().div_ceil(self.policy.batch_size).max(1) as u32;
        per_batch.saturating_mul(batches).clamp(Duration::from_secs(1), Duration::from_secs(60))
    }
}

fn panic_message(p: &Box<dyn std::any::Any + Send>) -> String {
    if let Some(s) = p.downcast_ref::<&str>() {
        s.to_string()
    } else if let Some(s) = p.downcast_ref::<String>() {
        s.clone()
    } else {
        "unknown panic".into()
    }
}

fn worker<K, J, O, E: From<Failure>, R: Runner<J, O, E>>(
    mut runner: R,
    batches: std::sync::mpsc::Receiver<Vec<Pending<K, J, O, E>>>,
    idle: mpsc::UnboundedSender<()>,
    observer: Arc<dyn Observer>,
    ewma: Arc<AtomicU64>,
) {
    if idle.send(()).is_err() {
        return;
    }
    while let Ok(batch) = batches.recv() {
        let n = batch.len();
        let now = Instant::now();
        let mut jobs = Vec::with_capacity(n);
        let mut waiters = Vec::with_capacity(n);
        let mut queue_times = Vec::with_capacity(n);
        for p in batch {
            queue_times.push(now.duration_since(p.enqueued));
            jobs.push(p.job);
            waiters.push(p.tx);
            // p._ticket drops here: the job has left the queue.
        }
        observer.batch_started(n, &queue_times);
        let started = std::time::Instant::now();
        let results = match catch_unwind(AssertUnwindSafe(|| runner.run_batch(jobs))) {
            Ok(r) if r.len() == n => r,
            Ok(r) => {
                let failure = Failure::WrongCount { batch: n, got: r.len() };
                (0..n).map(|_| Err(failure.clone().into())).collect()
            }
            Err(p) => {
                let failure = Failure::Panicked { batch: n, message: panic_message(&p) };
                tracing::error!("{failure}");
                (0..n).map(|_| Err(failure.clone().into())).collect()
            }
        };
        let compute = started.elapsed();
        let old = ewma.load(Ordering::Relaxed);
        let us = compute.as_micros().min(u128::from(u64::MAX)) as u64;
        ewma.store(if old == 0 { us } else { (old * 4 + us) / 5 }, Ordering::Relaxed);
        let failed = results.iter().filter(|r| r.is_err()).count();
        observer.batch_finished(n, compute, failed);
        for ((tx, result), queue_time) in waiters.into_iter().zip(results).zip(queue_times) {
            let _ = tx.send(result.map(|output| Done { output, queue_time, compute_time: compute, batch_size: n }));
        }
        if idle.send(()).is_err() {
            return;
        }
    }
}

/// A queued item as the scheduling policy sees it.
trait Queued {
    type Key: BatchKey;
    fn key(&self) -> &Self::Key;
    fn enqueued(&self) -> Instant;
    fn cancelled(&self) -> bool;
}

impl<K: BatchKey, J, O, E> Queued for Pending<K, J, O, E> {
    type Key = K;
    fn key(&self) -> &K {
        &self.key
    }
    fn enqueued(&self) -> Instant {
        self.enqueued
    }
    fn cancelled(&self) -> bool {
        self.tx.is_closed()
    }
}

/// The buckets and the scheduling policy (no I/O, so it is unit-tested with plain items). A bucket
/// holds units (a job, or a group that must share a batch), oldest first.
struct Buckets<P: Queued> {
    buckets: HashMap<P::Key, VecDeque<Vec<P>>>,
    batch_size: usize,
    timeout: Duration,
}

impl<P: Queued> Buckets<P> {
    fn new(batch_size: usize, timeout: Duration) -> Self {
        Buckets { buckets: HashMap::new(), batch_size, timeout }
    }

    #[cfg(test)]
    fn push(&mut self, p: P) {
        self.push_unit(vec![p]);
    }

    /// Queues a unit (its jobs share one key and at most `batch_size` of them run together).
    fn push_unit(&mut self, unit: Vec<P>) {
        let Some(first) = unit.first() else { return };
        self.buckets.entry(first.key().clone()).or_default().push_back(unit);
    }

    fn is_empty(&self) -> bool {
        self.buckets.is_empty()
    }

    /// Removes jobs whose client has gone; returns them.
    fn sweep(&mut self) -> Vec<P> {
        let mut gone = Vec::new();
        self.buckets.retain(|_, q| {
            if q.iter().flatten().any(Queued::cancelled) {
                for unit in q.iter_mut() {
                    let (keep, drop): (Vec<P>, Vec<P>) = unit.drain(..).partition(|p| !p.cancelled());
                    gone.extend(drop);
                    *unit = keep;
                }
                q.retain(|unit| !unit.is_empty());
            }
            !q.is_empty()
        });
        gone
    }

    /// When the next partial bucket becomes ready.
    fn next_deadline(&self) -> Option<Instant> {
        self.buckets.values().filter_map(|q| q.front()?.first()).map(|p| p.enqueued() + self.timeout).min()
    }

    /// The next batch to run at `now` (`flush`: don't wait for partial buckets).
    fn pick(&mut self, now: Instant, flush: bool) -> Option<Vec<P>> {
        let key = self
            .buckets
            .iter()
            .filter_map(|(k, q)| {
                let head = q.front()?.first()?.enqueued();
                let jobs: usize = q.iter().map(Vec::len).sum();
                let ready = flush || jobs >= self.batch_size || now >= head + self.timeout;
                ready.then_some((head, k))
            })
            .min_by_key(|(head, _)| *head)
            .map(|(_, k)| k.clone())?;
        let q = self.buckets.get_mut(&key)?;
        // Whole units from the front while they fit (the first always does: units are <= batch_size).
        let mut batch: Vec<P> = q.pop_front()?;
        while q.front().is_some_and(|u| batch.len() + u.len() <= self.batch_size) {
            batch.extend(q.pop_front().into_iter().flatten());
        }
        if q.is_empty() {
            self.buckets.remove(&key);
        }
        Some(batch)
    }
}

async fn schedule<K: BatchKey, J: Send + 'static, O: Send + 'static, E: From<Failure> + Send + 'static>(
    mut rx: mpsc::UnboundedReceiver<Msg<K, J, O, E>>,
    batch_tx: std::sync::mpsc::Sender<Vec<Pending<K, J, O, E>>>,
    mut idle_rx: mpsc::UnboundedReceiver<()>,
    policy: BatchPolicy,
    observer: Arc<dyn Observer>,
) {
    let mut buckets: Buckets<Pending<K, J, O, E>> = Buckets::new(policy.batch_size, policy.batch_timeout);
    let mut idle = false; // the worker says when it is ready (after opening the pipeline)
    let mut closing = false;
    let mut worker_alive = true;
    // Notices clients that went away while their job waits behind a long batch.
    let mut sweep = tokio::time::interval(Duration::from_millis(100));
    sweep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let deadline = if idle { buckets.next_deadline() } else { None };
        tokio::select! {
            m = rx.recv(), if !closing => match m {
                Some(Msg::Jobs(unit)) => buckets.push_unit(unit),
                Some(Msg::Close) | None => closing = true,
            },
            i = idle_rx.recv(), if worker_alive => match i {
                Some(()) => idle = true,
                None => worker_alive = false,
            },
            _ = tokio::time::sleep_until(deadline.unwrap_or_else(Instant::now)), if deadline.is_some() => {}
            _ = sweep.tick(), if !buckets.is_empty() => {}
        }
        let gone = buckets.sweep();
        if !gone.is_empty() {
            tracing::debug!(jobs = gone.len(), "dropped queued jobs whose client went away");
            observer.cancelled(gone.len());
        }
        if !worker_alive {
            // The worker thread ended (it could not open the pipeline): fail what waits, keep failing.
            for q in std::mem::take(&mut buckets.buckets).into_values() {
                for p in q.into_iter().flatten() {
                    let _ = p.tx.send(Err(Failure::WorkerGone.into()));
                }
            }
            if closing {
                return;
            }
            continue;
        }
        if idle {
            if let Some(batch) = buckets.pick(Instant::now(), false) {
                idle = false;
                if let Err(std::sync::mpsc::SendError(batch)) = batch_tx.send(batch) {
                    for p in batch {
                        let _ = p.tx.send(Err(Failure::WorkerGone.into()));
                    }
                }
            }
        }
        if closing && buckets.is_empty() && idle {
            break;
        }
    }
    drop(batch_tx);
    // Let the worker finish (it exits when the batch channel closes).
    while idle_rx.recv().await.is_some() {}
}

#[cfg(test)]
mod tests {
    //! The scheduling policy is tested on plain items; the scheduler and worker with a test double of
    //! the pipeline (`Echo`, which records its batches) — a unit-test double, not used anywhere else.
    //! The real pipeline is exercised over HTTP by `tests/server_*.rs`.
    use super::*;
    use std::sync::Mutex;

    /// A batch key of the shape the edit pipeline's has (sizes, steps, flags).
    #[derive(Clone, Debug, PartialEq, Eq, Hash)]
    struct Key {
        width: u32,
        height: u32,
        steps: u32,
    }

    fn key(w: u32) -> Key {
        Key { width: w, height: 16, steps: 2 }
    }

    /// A job's own error, or the batcher's.
    #[derive(Debug)]
    enum TestError {
        Job(String),
        Batcher(Failure),
    }
    impl From<Failure> for TestError {
        fn from(f: Failure) -> TestError {
            TestError::Batcher(f)
        }
    }
    impl std::fmt::Display for TestError {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            match self {
                TestError::Job(m) => f.write_str(m),
                TestError::Batcher(e) => write!(f, "{e}"),
            }
        }
    }

    struct Item {
        key: Key,
        at: Instant,
        id: usize,
        gone: bool,
    }
    impl Queued for Item {
        type Key = Key;
        fn key(&self) -> &Key {
            &self.key
        }
        fn enqueued(&self) -> Instant {
            self.at
        }
        fn cancelled(&self) -> bool {
            self.gone
        }
    }

    fn ids(b: Option<Vec<Item>>) -> Vec<usize> {
        b.map(|v| v.into_iter().map(|i| i.id).collect()).unwrap_or_default()
    }

    #[test]
    fn full_buckets_run_at_once_partial_ones_after_the_timeout() {
        let t0 = Instant::now();
        let ms = |m| t0 + Duration::from_millis(m);
        let mut b = Buckets::new(2, Duration::from_millis(40));
        b.push(Item { key: key(1), at: ms(0), id: 1, gone: false });
        assert!(b.pick(ms(10), false).is_none(), "partial and young");
        assert_eq!(b.next_deadline(), Some(ms(40)));
        b.push(Item { key: key(1), at: ms(5), id: 2, gone: false });
        b.push(Item { key: key(1), at: ms(6), id: 3, gone: false });
        assert_eq!(ids(b.pick(ms(10), false)), vec![1, 2], "full: FIFO, at most batch_size");
        assert!(b.pick(ms(10), false).is_none());
        assert_eq!(ids(b.pick(ms(46), false)), vec![3], "timed out");
        assert!(b.is_empty());
        b.push(Item { key: key(1), at: ms(50), id: 4, gone: false });
        assert_eq!(ids(b.pick(ms(51), true)), vec![4], "flush takes partial buckets");
    }

    #[test]
    fn the_oldest_waiting_job_goes_first_so_no_bucket_starves() {
        let t0 = Instant::now();
        let ms = |m| t0 + Duration::from_millis(m);
        let mut b = Buckets::new(2, Duration::from_millis(40));
        // A lone job of one shape, then a stream of another shape that always fills its bucket.
        b.push(Item { key: key(7), at: ms(0), id: 100, gone: false });
        let mut next = 0;
        let mut order = Vec::new();
        for round in 0..6u64 {
            for _ in 0..2 {
                b.push(Item { key: key(1), at: ms(1 + round * 10), id: next, gone: false });
                next += 1;
            }
            order.push(ids(b.pick(ms(1 + round * 10), false)));
        }
        // The full bucket runs while the lone job is young; once the lone job is ready (40 ms) it is
        // the oldest ready head and runs next, ahead of the full buckets that keep coming.
        let lone = order.iter().position(|b| b == &vec![100]).expect("the lone job ran");
        assert_eq!(lone, 4, "{order:?}");
    }

    #[test]
    fn between_ready_buckets_the_older_head_wins() {
        let t0 = Instant::now();
        let ms = |m| t0 + Duration::from_millis(m);
        let mut b = Buckets::new(2, Duration::from_millis(40));
        b.push(Item { key: key(2), at: ms(3), id: 20, gone: false });
        b.push(Item { key: key(2), at: ms(4), id: 21, gone: false });
        b.push(Item { key: key(1), at: ms(1), id: 10, gone: false });
        b.push(Item { key: key(1), at: ms(2), id: 11, gone: false });
        assert_eq!(ids(b.pick(ms(5), false)), vec![10, 11]);
        assert_eq!(ids(b.pick(ms(5), false)), vec![20, 21]);
    }

    #[test]
    fn cancelled_jobs_are_swept() {
        let t0 = Instant::now();
        let mut b = Buckets::new(4, Duration::ZERO);
        b.push(Item { key: key(1), at: t0, id: 1, gone: true });
        b.push(Item { key: key(1), at: t0, id: 2, gone: false });
        b.push(Item { key: key(2), at: t0, id: 3, gone: true });
        let gone: Vec<usize> = b.sweep().into_iter().map(|i| i.id).collect();
        assert_eq!(gone.len(), 2);
        assert_eq!(b.buckets.len(), 1);
        assert_eq!(ids(b.pick(t0, false)), vec![2]);
    }

    #[test]
    fn a_group_is_never_split_across_batches() {
        let t0 = Instant::now();
        let ms = |m| t0 + Duration::from_millis(m);
        let item = |id, at| Item { key: key(1), at: ms(at), id, gone: false };
        let mut b = Buckets::new(4, Duration::from_millis(40));
        b.push(item(1, 0));
        b.push(item(2, 1));
        b.push_unit(vec![item(10, 2), item(11, 2), item(12, 2)]);
        b.push(item(3, 3));
        // 1 and 2 fit with nothing else of the group: the group waits for the next batch, whole.
        assert_eq!(ids(b.pick(ms(5), false)), vec![1, 2]);
        assert_eq!(ids(b.pick(ms(5), false)), vec![10, 11, 12, 3], "the group, then the job behind it");
        b.push_unit(vec![item(20, 6), item(21, 6)]);
        b.push_unit(vec![item(30, 7), item(31, 7)]);
        assert_eq!(ids(b.pick(ms(7), false)), vec![20, 21, 30, 31], "two groups fill one batch");
        // A cancelled member leaves its group; the rest still runs together.
        b.push_unit(vec![item(40, 8), Item { gone: true, ..item(41, 8) }, item(42, 8)]);
        assert_eq!(b.sweep().len(), 1);
        assert_eq!(ids(b.pick(ms(100), false)), vec![40, 42]);
        assert!(b.is_empty());
    }

    #[tokio::test]
    async fn submit_group_runs_in_one_batch_or_in_consecutive_full_ones() {
        let (b, log, fin) = start(3, 1000, 16, 0);
        let rxs = b.submit_group(b.try_admit_many(3).unwrap(), key(1), vec![1, 2, 3]);
        let mut outs = Vec::new();
        for rx in rxs {
            let d = rx.await.unwrap().unwrap();
            assert_eq!(d.batch_size, 3);
            outs.push(d.output);
        }
        assert_eq!(outs, vec![10, 20, 30], "results in order");
        // Seven jobs with a batch size of 3: units of 3, 3 and 1, back to back (the last one waits
        // for company up to the timeout, like any partial batch).
        let rxs = b.submit_group(b.try_admit_many(7).unwrap(), key(2), (4..11).collect());
        for rx in rxs {
            rx.await.unwrap().unwrap();
        }
        let batches = log.lock().unwrap().clone();
        assert_eq!(batches, vec![vec![1, 2, 3], vec![4, 5, 6], vec![7, 8, 9], vec![10]]);
        assert!(b.try_admit_many(17).is_none(), "more places than max_queue");
        assert_eq!(b.try_admit_many(16).map(|t| t.len()), Some(16));
        assert_eq!(b.depth(), 0, "the dropped tickets are returned");
        b.close();
        fin.await.unwrap();
    }

    /// Test double of the pipeline (unit tests of the scheduling only): returns each job's own
    /// number times 10, records batch sizes, fails jobs numbered 13, panics on job 666.
    struct Echo {
        batches: Log,
        delay: Duration,
    }
    impl Runner<u32, u32, TestError> for Echo {
        fn run_batch(&mut self, jobs: Vec<u32>) -> Vec<Result<u32, TestError>> {
            self.batches.lock().unwrap().push(jobs.clone());
            if jobs.contains(&666) {
                panic!("boom");
            }
            std::thread::sleep(self.delay);
            jobs.into_iter().map(|j| if j == 13 { Err(TestError::Job("thirteen".into())) } else { Ok(j * 10) }).collect()
        }
    }

    type Log = Arc<Mutex<Vec<Vec<u32>>>>;

    fn start(
        batch_size: usize,
        timeout_ms: u64,
        max_queue: usize,
        delay_ms: u64,
    ) -> (Batcher<Key, u32, u32, TestError>, Log, Finished) {
        let log = Arc::new(Mutex::new(Vec::new()));
        let l = log.clone();
        let policy = BatchPolicy { batch_size, batch_timeout: Duration::from_millis(timeout_ms), max_queue };
        let (b, ready, fin) = Batcher::start(policy, Arc::new(NoObserver), move || {
            Ok((Echo { batches: l, delay: Duration::from_millis(delay_ms) }, 42u8))
        })
        .unwrap();
        drop(ready);
        (b, log, fin)
    }

    #[tokio::test]
    async fn each_job_gets_its_own_result_and_batches_form() {
        let (b, log, fin) = start(4, 50, 16, 20);
        let mut rxs = Vec::new();
        for j in 0..8u32 {
            let t = b.try_admit().unwrap();
            rxs.push((j, b.submit(t, key(j % 2), j)));
        }
        for (j, rx) in rxs {
            let d = rx.await.unwrap().unwrap();
            assert_eq!(d.output, j * 10);
            assert!(d.batch_size >= 1);
        }
        let batches = log.lock().unwrap().clone();
        assert_eq!(batches.len(), 2, "two keys, four jobs each: {batches:?}");
        for batch in &batches {
            assert!(batch.iter().all(|j| j % 2 == batch[0] % 2), "one key per batch: {batches:?}");
        }
        b.close();
        fin.await.unwrap();
    }

    #[tokio::test]
    async fn queue_is_bounded_and_tickets_return_when_batches_start() {
        let (b, _log, fin) = start(1, 0, 2, 100);
        let t1 = b.try_admit().unwrap();
        let t2 = b.try_admit().unwrap();
        assert!(b.try_admit().is_none(), "the third admission must be refused");
        assert_eq!(b.depth(), 2);
        assert!(b.retry_after() >= Duration::from_secs(1));
        let r1 = b.submit(t1, key(1), 1);
        let r2 = b.submit(t2, key(1), 2);
        assert_eq!(r1.await.unwrap().unwrap().output, 10);
        assert_eq!(r2.await.unwrap().unwrap().output, 20);
        assert_eq!(b.depth(), 0);
        assert!(b.try_admit().is_some());
        b.close();
        fin.await.unwrap();
    }

    #[tokio::test]
    async fn failures_and_panics_stay_inside_their_batch() {
        let (b, log, fin) = start(2, 0, 16, 0);
        let go = |j: u32| {
            let t = b.try_admit().unwrap();
            b.submit(t, key(j), j)
        };
        let e = go(13).await.unwrap().unwrap_err();
        assert!(matches!(&e, TestError::Job(m) if m == "thirteen"), "{e}");
        let e = go(666).await.unwrap().unwrap_err();
        assert!(e.to_string().contains("panicked") && e.to_string().contains("boom"), "{e}");
        assert_eq!(go(5).await.unwrap().unwrap().output, 50, "the worker survives a panic");
        assert_eq!(log.lock().unwrap().len(), 3);
        b.close();
        fin.await.unwrap();
    }

    #[tokio::test]
    async fn jobs_whose_client_left_are_not_computed() {
        let (b, log, fin) = start(1, 0, 16, 150);
        let t = b.try_admit().unwrap();
        let first = b.submit(t, key(1), 1); // occupies the worker for 150 ms
        tokio::time::sleep(Duration::from_millis(20)).await;
        let t = b.try_admit().unwrap();
        let gone = b.submit(t, key(1), 2);
        drop(gone); // the client went away while the job waited
        let t = b.try_admit().unwrap();
        let kept = b.submit(t, key(1), 3);
        assert_eq!(first.await.unwrap().unwrap().output, 10);
        assert_eq!(kept.await.unwrap().unwrap().output, 30);
        let ran: Vec<u32> = log.lock().unwrap().iter().flatten().copied().collect();
        assert_eq!(ran, vec![1, 3], "job 2 must not run");
        assert_eq!(b.depth(), 0, "its ticket is released");
        b.close();
        fin.await.unwrap();
    }

    #[tokio::test]
    async fn close_finishes_queued_jobs_first() {
        let (b, _log, fin) = start(4, 1000, 16, 10);
        let rxs: Vec<_> = (0..3u32).map(|j| (j, b.submit(b.try_admit().unwrap(), key(1), j))).collect();
        b.close();
        fin.await.unwrap();
        for (j, rx) in rxs {
            assert_eq!(rx.await.unwrap().unwrap().output, j * 10);
        }
    }

    #[tokio::test]
    async fn a_failed_open_is_reported_and_jobs_fail_cleanly() {
        let policy = BatchPolicy { batch_size: 2, batch_timeout: Duration::ZERO, max_queue: 4 };
        let (b, ready, fin) = Batcher::<Key, u32, u32, TestError>::start(policy, Arc::new(NoObserver), || {
            Err::<(Echo, ()), _>("no bundle at x".to_string())
        })
        .unwrap();
        assert_eq!(ready.await.unwrap().unwrap_err(), "no bundle at x");
        let r = b.submit(b.try_admit().unwrap(), key(1), 1).await.unwrap().unwrap_err();
        assert!(r.to_string().contains("not running"), "{r}");
        b.close();
        fin.await.unwrap();
    }
}
