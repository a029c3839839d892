//! Groups compatible jobs into batches for the one engine worker thread that owns the engines.
//! Generic over the key, job, output and error types (a leaf: it imports nothing from the crate).
//!
//! Flow: a prepared job takes a queue [`Ticket`] (`try_admit`; none left = the queue is full, the
//! caller answers 503) and is handed in with it (`submit`), which returns the job's own result
//! channel. A scheduler task keeps one bucket per [`BatchKey`]; whenever the worker is idle it picks:
//!
//! - ready buckets: those with `batch_size` jobs, or whose oldest job has waited `batch_timeout`;
//! - among them, the bucket whose **oldest job is oldest** (so no bucket starves: a waiting job's age
//!   only grows, and once it is ready at most one batch per older-headed bucket runs before it);
//! - up to `batch_size` jobs from its front (FIFO inside a bucket), and never more than the
//!   [`Sizing`] says fit in memory: the rest stay queued for the next batch. A single job that does
//!   not fit is failed ([`Failure::TooLarge`]), never started (admission refuses those first).
//!
//! A group of jobs submitted together (`submit_group`: the n images of one request) is one unit in its
//! bucket: a batch takes whole units from the bucket's front, so the group runs in one batch. A group
//! larger than `batch_size` is cut into units of `batch_size` that queue back to back (so it runs as
//! consecutive full batches); a unit that does not fit in memory whole runs as consecutive batches of
//! the most that fit.
//!
//! A batch is handed to the worker only when the worker is idle, so jobs that arrive while a batch
//! runs still join their bucket. Jobs whose client went away (result receiver dropped) are removed
//! before they are computed; a running batch asks between its stages and steps whether anyone still
//! waits (the runner's `proceed`) and stops when nobody does. Tickets are released when a job's batch
//! starts, so `max_queue` bounds the jobs waiting (and the memory they hold), not the ones running.
//! The worker catches panics; when a batch of several jobs fails as a whole (every job failed, the
//! batch was not stopped), each job that still has a client is run again alone, so only the job
//! that breaks the batch fails. A watchdog compares the running batch's time with what its work
//! should take at the recent speed ([`Batcher::stall`]).
//!
//! Whether a partial bucket waits for company at all is the [`WaitMode`] (`wait.rs`): `fixed` waits
//! `batch_timeout`, `adaptive` only when the arrival rate and the measured cost per batch size say
//! it pays; the figures it learns are [`Batcher::learned`].

mod wait;

use std::collections::{HashMap, VecDeque};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use tokio::sync::{mpsc, oneshot, OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;

use wait::WaitPolicy;
pub use wait::{Learned, SizeCost, WaitMode};

/// What the engine worker runs: one batch of jobs to one result per job, in order (a closure over
/// the pipeline in production; test doubles in the unit tests). `proceed` says whether anyone
/// still waits for the batch: a runner asks it between its stages and stops when it says no.
pub trait Runner<J, O, E>: 'static {
    fn run_batch(&mut self, jobs: &[J], proceed: &dyn Fn() -> bool) -> Vec<Result<O, E>>;
}

impl<J, O, E, F: FnMut(&[J], &dyn Fn() -> bool) -> Vec<Result<O, E>> + 'static> Runner<J, O, E> for F {
    fn run_batch(&mut self, jobs: &[J], proceed: &dyn Fn() -> bool) -> Vec<Result<O, E>> {
        self(jobs, proceed)
    }
}

/// What a batch key must be: jobs with equal keys may share a batch.
pub trait BatchKey: Clone + Eq + std::hash::Hash + std::fmt::Debug + Send + 'static {}
impl<K: Clone + Eq + std::hash::Hash + std::fmt::Debug + Send + 'static> BatchKey for K {}

/// What batches of a key cost: whether `n` jobs fit in memory, and their work (any unit that time
/// is proportional to, e.g. rows x steps x tokens) for the watchdog. Given once the model is known.
pub trait Sizing<K>: Send + Sync + 'static {
    fn fits(&self, key: &K, n: usize) -> bool;
    fn work(&self, key: &K, n: usize) -> f64;
}

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
    /// Even one job of this kind does not fit in the memory budget.
    #[error("this job alone does not fit in the memory the server has for a batch")]
    TooLarge,
}

/// Batching and queueing limits.
#[derive(Clone, Copy, Debug)]
pub struct BatchPolicy {
    pub batch_size: usize,
    pub batch_timeout: Duration,
    pub max_queue: usize,
    /// Whether a partial batch waits `batch_timeout` always, or only when it pays.
    pub wait: WaitMode,
    /// A batch is stalled when it has run longer than `factor` times its expected time plus `grace`.
    pub watchdog: Watchdog,
}

/// The watchdog's tolerance (see [`Batcher::stall`]).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Watchdog {
    /// 0 turns the watchdog off.
    pub factor: f64,
    pub grace: Duration,
}

impl Default for Watchdog {
    fn default() -> Self {
        Watchdog { factor: 4.0, grace: Duration::from_secs(30) }
    }
}

/// A batch running far longer than expected.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Stall {
    pub jobs: usize,
    pub running: Duration,
    pub expected: Duration,
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
    /// A running batch stopped because nobody waited for it any more.
    fn batch_stopped(&self, _size: usize) {}
    /// A failed batch's jobs were run again one by one.
    fn batch_retried(&self, _size: usize) {}
}

/// No-op observer.
pub struct NoObserver;
impl Observer for NoObserver {}

/// A place in the queue: held from the moment a prepared job is queued until its batch starts.
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

type SharedSizing<K> = Arc<RwLock<Option<Arc<dyn Sizing<K>>>>>;

/// What the worker shares with the handles: the recent speed and the batch it runs.
struct Shared<K> {
    /// Exponential moving average of batch compute time, microseconds (0 = none yet).
    batch_ewma_us: AtomicU64,
    /// Exponential moving average of seconds per unit of work (f64 bits; 0 = none yet).
    per_work: AtomicU64,
    /// The running batch: when it started, its jobs and its work.
    running: Mutex<Option<(Instant, usize, f64)>>,
    sizing: SharedSizing<K>,
    /// Arrivals (fed by the scheduler) and batch costs (fed by the worker) for the wait decision.
    wait: Mutex<WaitPolicy<K>>,
}

impl<K> Shared<K> {
    fn sizing(&self) -> Option<Arc<dyn Sizing<K>>> {
        self.sizing.read().map(|s| s.clone()).unwrap_or(None)
    }

    fn wait(&self) -> std::sync::MutexGuard<'_, WaitPolicy<K>> {
        self.wait.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Handle to the batcher (cheap to clone).
pub struct Batcher<K, J, O, E> {
    tx: mpsc::UnboundedSender<Msg<K, J, O, E>>,
    permits: Arc<Semaphore>,
    policy: BatchPolicy,
    shared: Arc<Shared<K>>,
}

impl<K, J, O, E> Clone for Batcher<K, J, O, E> {
    fn clone(&self) -> Self {
        Batcher { tx: self.tx.clone(), permits: self.permits.clone(), policy: self.policy, shared: self.shared.clone() }
    }
}

/// Completes when the scheduler and the worker have stopped (after `close` and an empty queue).
pub type Finished = tokio::task::JoinHandle<()>;

/// What the worker reports once `open` ran: its extra value, or why the runner could not be built.
pub type Opened<T> = oneshot::Receiver<Result<T, String>>;

/// A started batcher: its handle, the worker's report of `open`, and its end.
pub type Started<K, J, O, E, T> = (Batcher<K, J, O, E>, Opened<T>, Finished);

impl<K: BatchKey + Sync, J: Send + 'static, O: Send + 'static, E: From<Failure> + Send + 'static> Batcher<K, J, O, E> {
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
        let shared = Arc::new(Shared {
            batch_ewma_us: AtomicU64::new(0),
            per_work: AtomicU64::new(0),
            running: Mutex::new(None),
            sizing: Arc::new(RwLock::new(None)),
            wait: Mutex::new(WaitPolicy::new(policy.wait, policy.batch_timeout, policy.batch_size)),
        });
        let (obs, worker_shared) = (observer.clone(), shared.clone());
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
            Worker { runner, observer: obs, shared: worker_shared }.serve(batch_rx, idle_tx);
        })?;
        let finished = tokio::spawn(schedule(rx, batch_tx, idle_rx, policy, observer, shared.clone()));
        let batcher = Batcher { tx, permits: Arc::new(Semaphore::new(policy.max_queue)), policy, shared };
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

    /// Whether a queue place is free now (a cheap check before any work for a new request).
    pub fn has_room(&self) -> bool {
        self.permits.available_permits() > 0
    }

    /// Sets what batches cost (memory fit, work); until then every batch fits and work = jobs.
    pub fn set_sizing(&self, sizing: Arc<dyn Sizing<K>>) {
        if let Ok(mut s) = self.shared.sizing.write() {
            *s = Some(sizing);
        }
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

    /// Jobs queued and not yet running.
    pub fn depth(&self) -> usize {
        self.policy.max_queue - self.permits.available_permits()
    }

    pub fn policy(&self) -> BatchPolicy {
        self.policy
    }

    /// What the wait policy has learned: the arrival rate and the cost per batch size.
    pub fn learned(&self) -> Learned {
        self.shared.wait().learned(Instant::now())
    }

    /// Jobs in the batch the engine worker runs now (0 when idle).
    pub fn running_jobs(&self) -> usize {
        self.shared.running.lock().ok().and_then(|r| r.map(|(_, n, _)| n)).unwrap_or(0)
    }

    /// A `Retry-After` for an overloaded queue: the time to work off the queue at the recent batch
    /// speed, 1..=60 seconds.
    pub fn retry_after(&self) -> Duration {
        let per_batch = Duration::from_micros(self.shared.batch_ewma_us.load(Ordering::Relaxed).max(1_000_000));
        let batches = self.depth().div_ceil(self.policy.batch_size).max(1) as u32;
        per_batch.saturating_mul(batches).clamp(Duration::from_secs(1), Duration::from_secs(60))
    }

    /// The running batch, when it has run longer than `watchdog.factor` times what its work takes at
    /// the recent speed, plus `watchdog.grace` (a hung engine). `None` before any batch finished.
    pub fn stall(&self) -> Option<Stall> {
        let w = self.policy.watchdog;
        let (started, jobs, work) = (*self.shared.running.lock().ok()?)?;
        let per_work = f64::from_bits(self.shared.per_work.load(Ordering::Relaxed));
        if w.factor <= 0.0 || per_work <= 0.0 {
            return None;
        }
        let expected = Duration::from_secs_f64((work * per_work).min(1e9));
        let running = started.elapsed();
        (running > expected.mul_f64(w.factor) + w.grace).then_some(Stall { jobs, running, expected })
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

/// The engine worker: runs batches on its thread.
struct Worker<K, R> {
    runner: R,
    observer: Arc<dyn Observer>,
    shared: Arc<Shared<K>>,
}

impl<K: BatchKey, R> Worker<K, R> {
    fn serve<J, O, E: From<Failure>>(
        mut self,
        batches: std::sync::mpsc::Receiver<Vec<Pending<K, J, O, E>>>,
        idle: mpsc::UnboundedSender<()>,
    ) where
        R: Runner<J, O, E>,
    {
        if idle.send(()).is_err() {
            return;
        }
        while let Ok(batch) = batches.recv() {
            self.batch(batch);
            if idle.send(()).is_err() {
                return;
            }
        }
    }

    fn batch<J, O, E: From<Failure>>(&mut self, batch: Vec<Pending<K, J, O, E>>)
    where
        R: Runner<J, O, E>,
    {
        let n = batch.len();
        let now = Instant::now();
        let key = match batch.first() {
            Some(p) => p.key.clone(),
            None => return,
        };
        let mut jobs = Vec::with_capacity(n);
        let mut waiters = Vec::with_capacity(n);
        let mut queue_times = Vec::with_capacity(n);
        for p in batch {
            queue_times.push(now.duration_since(p.enqueued));
            jobs.push(p.job);
            waiters.push(p.tx);
            // p._ticket drops here: the job has left the queue.
        }
        let work = self.shared.sizing().map_or(n as f64, |s| s.work(&key, n));
        if let Ok(mut r) = self.shared.running.lock() {
            *r = Some((now, n, work));
        }
        self.observer.batch_started(n, &queue_times);
        let started = std::time::Instant::now();
        let (results, whole) = self.run_with_retry(&jobs, &waiters);
        let compute = started.elapsed();
        if let Ok(mut r) = self.shared.running.lock() {
            *r = None;
        }
        if whole {
            self.learn_speed(compute, work); // a stopped or retried batch says nothing of the speed
            self.shared.wait().ran(n, compute, work);
        }
        let failed = results.iter().filter(|r| r.is_err()).count();
        self.observer.batch_finished(n, compute, failed);
        drop(jobs); // what the jobs hold (their requests' memory) is free before anyone hears back
        for ((tx, result), queue_time) in waiters.into_iter().zip(results).zip(queue_times) {
            let _ = tx.send(result.map(|output| Done { output, queue_time, compute_time: compute, batch_size: n }));
        }
    }

    fn learn_speed(&self, compute: Duration, work: f64) {
        let ewma = |cell: &AtomicU64, value: f64, bits: bool| {
            let old = cell.load(Ordering::Relaxed);
            let old_v = if bits { f64::from_bits(old) } else { old as f64 };
            let new_v = if old == 0 { value } else { (old_v * 4.0 + value) / 5.0 };
            cell.store(if bits { new_v.to_bits() } else { new_v as u64 }, Ordering::Relaxed);
        };
        ewma(&self.shared.batch_ewma_us, compute.as_micros().min(u128::from(u64::MAX)) as f64, false);
        if work > 0.0 {
            ewma(&self.shared.per_work, compute.as_secs_f64() / work, true);
        }
    }

    /// Runs the batch; when several jobs failed together (not stopped), runs each one still waited
    /// for again alone, so that only the job that breaks the batch fails. Also says whether the
    /// batch ran whole (neither stopped nor retried).
    fn run_with_retry<J, O, E: From<Failure>>(
        &mut self,
        jobs: &[J],
        waiters: &[oneshot::Sender<Result<Done<O>, E>>],
    ) -> (Vec<Result<O, E>>, bool)
    where
        R: Runner<J, O, E>,
    {
        let n = jobs.len();
        let stopped = std::cell::Cell::new(false);
        let proceed = || {
            let go_on = waiters.iter().any(|w| !w.is_closed());
            if !go_on {
                stopped.set(true);
            }
            go_on
        };
        let mut results = self.run_caught(jobs, &proceed);
        if stopped.get() {
            self.observer.batch_stopped(n);
        }
        let retry = n > 1 && !stopped.get() && results.iter().all(Result::is_err);
        if retry {
            tracing::warn!(batch = n, "the batch failed as a whole; running its jobs one by one");
            self.observer.batch_retried(n);
            for (i, waiter) in waiters.iter().enumerate() {
                if waiter.is_closed() {
                    continue;
                }
                let alone = || !waiter.is_closed();
                if let Some(r) = self.run_caught(std::slice::from_ref(&jobs[i]), &alone).pop() {
                    results[i] = r;
                }
            }
        }
        let whole = !stopped.get() && !retry;
        (results, whole)
    }

    /// One runner call with its panics and miscounts turned into per-job failures.
    fn run_caught<J, O, E: From<Failure>>(&mut self, jobs: &[J], proceed: &dyn Fn() -> bool) -> Vec<Result<O, E>>
    where
        R: Runner<J, O, E>,
    {
        let n = jobs.len();
        match catch_unwind(AssertUnwindSafe(|| self.runner.run_batch(jobs, proceed))) {
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

/// For a bucket's key, its jobs and its oldest job's arrival: until when it waits (`None`: start now).
type Waits<'a, K> = dyn Fn(&K, usize, Instant) -> Option<Instant> + 'a;

/// What the scheduling policy takes from a bucket.
enum Pick<P> {
    Batch(Vec<P>),
    /// A job that does not fit in memory even alone: fail it, never start it.
    TooLarge(P),
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

    /// When the next partial bucket becomes ready under the fixed wait.
    #[cfg(test)]
    fn next_deadline(&self) -> Option<Instant> {
        let timeout = self.timeout;
        self.next_wake(Instant::now(), &|_, _, head| Some(head + timeout))
    }

    /// When a partial bucket should be looked at again: the earliest time `wait` gives (`wait` says,
    /// for a bucket's key, jobs and oldest job, until when it waits; `None`: ready now).
    fn next_wake(&self, now: Instant, wait: &Waits<'_, P::Key>) -> Option<Instant> {
        self.buckets
            .iter()
            .filter_map(|(k, q)| {
                let head = q.front()?.first()?.enqueued();
                let jobs: usize = q.iter().map(Vec::len).sum();
                if jobs >= self.batch_size {
                    return Some(now);
                }
                // Never past the timeout, whatever `wait` says: BATCH_TIMEOUT_MS is the longest wait.
                Some(wait(k, jobs, head).unwrap_or(now).min(head + self.timeout))
            })
            .min()
    }

    /// [`Buckets::pick_with`] under the fixed wait (`timeout` for every partial bucket).
    #[cfg(test)]
    fn pick(&mut self, now: Instant, flush: bool, fits: &dyn Fn(&P::Key, usize) -> bool) -> Option<Pick<P>> {
        let timeout = self.timeout;
        self.pick_with(now, flush, fits, &|_, _, head| (now < head + timeout).then_some(head + timeout))
    }

    /// The next batch to run at `now` (`flush`: don't wait for partial buckets; `wait`: see
    /// [`Buckets::next_wake`]): whole units from the bucket's front, at most `batch_size` jobs and at
    /// most as many as `fits` allows. When the front unit does not fit whole, as many of its jobs as
    /// fit run and the rest stay at the front.
    fn pick_with(
        &mut self,
        now: Instant,
        flush: bool,
        fits: &dyn Fn(&P::Key, usize) -> bool,
        wait: &Waits<'_, P::Key>,
    ) -> Option<Pick<P>> {
        let key = self
            .buckets
            .iter()
            .filter_map(|(k, q)| {
                let head = q.front()?.first()?.enqueued();
                let jobs: usize = q.iter().map(Vec::len).sum();
                let timed_out = now >= head + self.timeout;
                let ready = flush || jobs >= self.batch_size || timed_out || wait(k, jobs, head).is_none_or(|t| t <= now);
                ready.then_some((head, k))
            })
            .min_by_key(|(head, _)| *head)
            .map(|(_, k)| k.clone())?;
        let q = self.buckets.get_mut(&key)?;
        let pick = Self::take(q, self.batch_size, |n| fits(&key, n))?;
        if q.is_empty() {
            self.buckets.remove(&key);
        }
        Some(pick)
    }

    /// Takes a batch from the front of one bucket (see [`Buckets::pick`]).
    fn take(q: &mut VecDeque<Vec<P>>, batch_size: usize, fits: impl Fn(usize) -> bool) -> Option<Pick<P>> {
        let front = q.front_mut()?;
        let mut n = front.len().min(batch_size);
        while n > 1 && !fits(n) {
            n -= 1;
        }
        if !fits(n) {
            let p = front.remove(0);
            if front.is_empty() {
                q.pop_front();
            }
            return Some(Pick::TooLarge(p));
        }
        if n < front.len() {
            return Some(Pick::Batch(front.drain(..n).collect()));
        }
        let mut batch: Vec<P> = q.pop_front()?;
        while q.front().is_some_and(|u| batch.len() + u.len() <= batch_size && fits(batch.len() + u.len())) {
            batch.extend(q.pop_front().into_iter().flatten());
        }
        Some(Pick::Batch(batch))
    }
}

async fn schedule<K: BatchKey + Sync, J: Send + 'static, O: Send + 'static, E: From<Failure> + Send + 'static>(
    mut rx: mpsc::UnboundedReceiver<Msg<K, J, O, E>>,
    batch_tx: std::sync::mpsc::Sender<Vec<Pending<K, J, O, E>>>,
    mut idle_rx: mpsc::UnboundedReceiver<()>,
    policy: BatchPolicy,
    observer: Arc<dyn Observer>,
    shared: Arc<Shared<K>>,
) {
    let sizing = shared.sizing.clone();
    let mut buckets: Buckets<Pending<K, J, O, E>> = Buckets::new(policy.batch_size, policy.batch_timeout);
    let mut idle = false; // the worker says when it is ready (after opening the pipeline)
    let mut closing = false;
    let mut worker_alive = true;
    // Notices clients that went away while their job waits behind a long batch.
    let mut sweep = tokio::time::interval(Duration::from_millis(100));
    sweep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let deadline = if idle { next_wake(&buckets, &shared) } else { None };
        tokio::select! {
            m = rx.recv(), if !closing => match m {
                Some(Msg::Jobs(unit)) => {
                    if let Some(p) = unit.first() {
                        shared.wait().arrived(&p.key, unit.len(), Instant::now());
                    }
                    buckets.push_unit(unit)
                }
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
            let current = sizing.read().map(|s| s.clone()).unwrap_or(None);
            let fits = |k: &K, n: usize| current.as_ref().is_none_or(|s| s.fits(k, n));
            let now = Instant::now();
            let waits = wait_rule(&shared, current.clone(), now);
            while let Some(pick) = buckets.pick_with(now, false, &fits, &waits) {
                match pick {
                    Pick::TooLarge(p) => {
                        tracing::warn!(key = ?p.key, "a queued job does not fit in the batch memory budget alone; failed");
                        let _ = p.tx.send(Err(Failure::TooLarge.into()));
                    }
                    Pick::Batch(batch) => {
                        idle = false;
                        if let Err(std::sync::mpsc::SendError(batch)) = batch_tx.send(batch) {
                            for p in batch {
                                let _ = p.tx.send(Err(Failure::WorkerGone.into()));
                            }
                        }
                        break;
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

/// The wait decision of every bucket at `now`, from the shared policy (one lock per bucket asked).
fn wait_rule<K: BatchKey>(
    shared: &Arc<Shared<K>>,
    sizing: Option<Arc<dyn Sizing<K>>>,
    now: Instant,
) -> impl Fn(&K, usize, Instant) -> Option<Instant> + '_ {
    move |key: &K, jobs: usize, head: Instant| {
        let unit = sizing.as_ref().map_or(1.0, |s| s.work(key, 1));
        shared.wait().decide(key, jobs, head, now, unit)
    }
}

fn next_wake<K: BatchKey, P: Queued<Key = K>>(buckets: &Buckets<P>, shared: &Arc<Shared<K>>) -> Option<Instant> {
    let now = Instant::now();
    let waits = wait_rule(shared, shared.sizing(), now);
    buckets.next_wake(now, &waits)
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

    fn ids(b: Option<Pick<Item>>) -> Vec<usize> {
        match b {
            Some(Pick::Batch(v)) => v.into_iter().map(|i| i.id).collect(),
            Some(Pick::TooLarge(i)) => panic!("job {} picked as too large", i.id),
            None => Vec::new(),
        }
    }

    /// Every batch fits.
    fn all(_: &Key, _: usize) -> bool {
        true
    }

    #[test]
    fn full_buckets_run_at_once_partial_ones_after_the_timeout() {
        let t0 = Instant::now();
        let ms = |m| t0 + Duration::from_millis(m);
        let mut b = Buckets::new(2, Duration::from_millis(40));
        b.push(Item { key: key(1), at: ms(0), id: 1, gone: false });
        assert!(b.pick(ms(10), false, &all).is_none(), "partial and young");
        assert_eq!(b.next_deadline(), Some(ms(40)));
        b.push(Item { key: key(1), at: ms(5), id: 2, gone: false });
        b.push(Item { key: key(1), at: ms(6), id: 3, gone: false });
        assert_eq!(ids(b.pick(ms(10), false, &all)), vec![1, 2], "full: FIFO, at most batch_size");
        assert!(b.pick(ms(10), false, &all).is_none());
        assert_eq!(ids(b.pick(ms(46), false, &all)), vec![3], "timed out");
        assert!(b.is_empty());
        b.push(Item { key: key(1), at: ms(50), id: 4, gone: false });
        assert_eq!(ids(b.pick(ms(51), true, &all)), vec![4], "flush takes partial buckets");
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
            order.push(ids(b.pick(ms(1 + round * 10), false, &all)));
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
        assert_eq!(ids(b.pick(ms(5), false, &all)), vec![10, 11]);
        assert_eq!(ids(b.pick(ms(5), false, &all)), vec![20, 21]);
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
        assert_eq!(ids(b.pick(t0, false, &all)), vec![2]);
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
        assert_eq!(ids(b.pick(ms(5), false, &all)), vec![1, 2]);
        assert_eq!(ids(b.pick(ms(5), false, &all)), vec![10, 11, 12, 3], "the group, then the job behind it");
        b.push_unit(vec![item(20, 6), item(21, 6)]);
        b.push_unit(vec![item(30, 7), item(31, 7)]);
        assert_eq!(ids(b.pick(ms(7), false, &all)), vec![20, 21, 30, 31], "two groups fill one batch");
        // A cancelled member leaves its group; the rest still runs together.
        b.push_unit(vec![item(40, 8), Item { gone: true, ..item(41, 8) }, item(42, 8)]);
        assert_eq!(b.sweep().len(), 1);
        assert_eq!(ids(b.pick(ms(100), false, &all)), vec![40, 42]);
        assert!(b.is_empty());
    }

    #[test]
    fn a_group_over_the_memory_fit_runs_as_batches_of_what_fits() {
        let t0 = Instant::now();
        let item = |id| Item { key: key(1), at: t0, id, gone: false };
        let two = |_: &Key, n: usize| n <= 2;
        let mut b = Buckets::new(4, Duration::ZERO);
        b.push_unit(vec![item(1), item(2), item(3)]);
        b.push(item(4));
        assert_eq!(ids(b.pick(t0, false, &two)), vec![1, 2], "as many of the group as fit");
        assert_eq!(ids(b.pick(t0, false, &two)), vec![3, 4], "the group's rest first, then what fits behind it");
        assert!(b.is_empty());
        b.push_unit(vec![item(5), item(6)]);
        let none = |_: &Key, _: usize| false;
        assert!(matches!(b.pick(t0, false, &none), Some(Pick::TooLarge(Item { id: 5, .. }))));
        assert!(matches!(b.pick(t0, false, &none), Some(Pick::TooLarge(Item { id: 6, .. }))));
        assert!(b.is_empty());
    }

    /// Test double of the pipeline (unit tests of the scheduling only): returns each job's own
    /// number times 10, records batch sizes, fails jobs numbered 13, panics on job 666.
    struct Echo {
        batches: Log,
        delay: Duration,
    }
    impl Runner<u32, u32, TestError> for Echo {
        fn run_batch(&mut self, jobs: &[u32], proceed: &dyn Fn() -> bool) -> Vec<Result<u32, TestError>> {
            self.batches.lock().unwrap().push(jobs.to_vec());
            if jobs.contains(&666) {
                panic!("boom");
            }
            if jobs.contains(&777) && jobs.len() > 1 {
                // A job that breaks any batch it is in, but runs alone.
                return jobs.iter().map(|_| Err(TestError::Job("the batch broke".into()))).collect();
            }
            // The delay in ten "steps", asking between them whether anyone still waits.
            for _ in 0..10 {
                if !proceed() {
                    return jobs.iter().map(|_| Err(TestError::Job("stopped".into()))).collect();
                }
                std::thread::sleep(self.delay / 10);
            }
            jobs.iter().map(|&j| if j == 13 { Err(TestError::Job("thirteen".into())) } else { Ok(j * 10) }).collect()
        }
    }

    type Log = Arc<Mutex<Vec<Vec<u32>>>>;

    fn start(
        batch_size: usize,
        timeout_ms: u64,
        max_queue: usize,
        delay_ms: u64,
    ) -> (Batcher<Key, u32, u32, TestError>, Log, Finished) {
        start_with(WaitMode::Fixed, batch_size, timeout_ms, max_queue, delay_ms)
    }

    fn start_with(
        wait: WaitMode,
        batch_size: usize,
        timeout_ms: u64,
        max_queue: usize,
        delay_ms: u64,
    ) -> (Batcher<Key, u32, u32, TestError>, Log, Finished) {
        let log = Arc::new(Mutex::new(Vec::new()));
        let l = log.clone();
        let policy = BatchPolicy {
            batch_size,
            batch_timeout: Duration::from_millis(timeout_ms),
            max_queue,
            wait,
            watchdog: Watchdog::default(),
        };
        let (b, ready, fin) = Batcher::start(policy, Arc::new(NoObserver), move || {
            Ok((Echo { batches: l, delay: Duration::from_millis(delay_ms) }, 42u8))
        })
        .unwrap();
        drop(ready);
        (b, log, fin)
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

    #[tokio::test]
    async fn adaptive_wait_starts_a_lone_job_at_once_and_waits_in_a_burst() {
        let (b, log, fin) = start_with(WaitMode::Adaptive, 4, 2000, 16, 20);
        let t = std::time::Instant::now();
        assert_eq!(b.submit(b.try_admit().unwrap(), key(1), 1).await.unwrap().unwrap().batch_size, 1);
        assert!(t.elapsed() < Duration::from_secs(1), "a lone job does not wait the 2 s timeout: {:?}", t.elapsed());
        // A burst (a job every 2 ms): the first waits for company and the four run together.
        let mut rxs = Vec::new();
        for j in 2..6 {
            rxs.push(b.submit(b.try_admit().unwrap(), key(1), j));
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        for rx in rxs {
            assert_eq!(rx.await.unwrap().unwrap().batch_size, 4);
        }
        assert!(t.elapsed() < Duration::from_secs(1), "a full batch starts at once: {:?}", t.elapsed());
        assert_eq!(log.lock().unwrap().clone(), vec![vec![1], vec![2, 3, 4, 5]]);
        let learned = b.learned();
        assert_eq!(learned.costs.iter().map(|c| c.batch_size).collect::<Vec<_>>(), vec![1, 4], "{learned:?}");
        assert!(learned.arrival_rate > 0.0);
        b.close();
        fin.await.unwrap();
    }

    #[tokio::test]
    async fn adaptive_wait_stops_waiting_for_a_client_that_sends_one_job_after_another() {
        // One client, its next job once the last is answered: the arrival rate alone makes company
        // look likely within a 2 s timeout, but it never comes; after fruitless waits, jobs start at once.
        let (b, _log, fin) = start_with(WaitMode::Adaptive, 4, 2000, 16, 20);
        let mut slow = Vec::new();
        for j in 0..12 {
            let t = std::time::Instant::now();
            assert_eq!(b.submit(b.try_admit().unwrap(), key(1), j).await.unwrap().unwrap().batch_size, 1);
            if t.elapsed() > Duration::from_millis(300) {
                slow.push(j);
            }
        }
        assert!(slow.len() <= 3 && slow.iter().all(|&j| j < 4), "jobs that waited: {slow:?}");
        assert!(b.learned().wait_success < 0.6, "{:?}", b.learned());
        b.close();
        fin.await.unwrap();
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
        let policy = BatchPolicy {
            batch_size: 2,
            batch_timeout: Duration::ZERO,
            max_queue: 4,
            wait: WaitMode::Fixed,
            watchdog: Watchdog::default(),
        };
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

    #[test]
    fn the_memory_cap_takes_fewer_jobs_and_leaves_the_rest_queued() {
        let t0 = Instant::now();
        let mut b = Buckets::new(4, Duration::ZERO);
        for id in 0..5 {
            b.push(Item { key: key(1), at: t0, id, gone: false });
        }
        let two = |_: &Key, n: usize| n <= 2;
        assert_eq!(ids(b.pick(t0, false, &two)), vec![0, 1], "at most what fits");
        assert_eq!(ids(b.pick(t0, false, &two)), vec![2, 3]);
        assert_eq!(ids(b.pick(t0, false, &all)), vec![4]);
        // Even one job does not fit: it is given back as too large, never as a batch.
        b.push(Item { key: key(9), at: t0, id: 90, gone: false });
        b.push(Item { key: key(9), at: t0, id: 91, gone: false });
        let none = |_: &Key, _: usize| false;
        match b.pick(t0, false, &none) {
            Some(Pick::TooLarge(i)) => assert_eq!(i.id, 90),
            _ => panic!("expected the head as too large"),
        }
        assert_eq!(b.buckets[&key(9)].len(), 1, "the rest stays queued");
    }

    /// Sizing of the tests: batches of at most `cap` fit; work = jobs.
    struct Cap(usize);
    impl Sizing<Key> for Cap {
        fn fits(&self, _: &Key, n: usize) -> bool {
            n <= self.cap()
        }
        fn work(&self, _: &Key, n: usize) -> f64 {
            n as f64
        }
    }
    impl Cap {
        fn cap(&self) -> usize {
            self.0
        }
    }

    #[tokio::test]
    async fn batches_are_capped_by_the_sizing_and_every_job_completes() {
        let (b, log, fin) = start(4, 50, 16, 20);
        b.set_sizing(Arc::new(Cap(2)));
        let rxs: Vec<_> = (0..7u32).map(|j| (j, b.submit(b.try_admit().unwrap(), key(1), j))).collect();
        for (j, rx) in rxs {
            let d = rx.await.unwrap().unwrap();
            assert_eq!(d.output, j * 10);
            assert!(d.batch_size <= 2, "batch of {}", d.batch_size);
        }
        let sizes: Vec<usize> = log.lock().unwrap().iter().map(Vec::len).collect();
        assert!(sizes.iter().all(|&n| n <= 2) && sizes.iter().sum::<usize>() == 7, "{sizes:?}");
        // Nothing fits: the job fails with TooLarge and the worker is not called.
        b.set_sizing(Arc::new(Cap(0)));
        let before = log.lock().unwrap().len();
        let e = b.submit(b.try_admit().unwrap(), key(1), 5).await.unwrap().unwrap_err();
        assert!(matches!(e, TestError::Batcher(Failure::TooLarge)), "{e}");
        assert_eq!(log.lock().unwrap().len(), before);
        b.close();
        fin.await.unwrap();
    }

    #[tokio::test]
    async fn a_failed_batch_is_retried_alone_so_only_the_bad_job_fails() {
        let (b, log, fin) = start(3, 100, 16, 0);
        let rxs: Vec<_> = [1u32, 777, 3].iter().map(|&j| (j, b.submit(b.try_admit().unwrap(), key(1), j))).collect();
        for (j, rx) in rxs {
            let r = rx.await.unwrap();
            if j == 777 {
                // Alone, 777 runs (the test double only breaks batches of several).
                assert_eq!(r.unwrap().output, 7770);
            } else {
                assert_eq!(r.unwrap().output, j * 10, "job {j} must not fail with the batch");
            }
        }
        let batches = log.lock().unwrap().clone();
        assert_eq!(batches, vec![vec![1, 777, 3], vec![1], vec![777], vec![3]]);
        // A job that fails alone too fails alone: the others of its batch succeed.
        let rxs: Vec<_> = [4u32, 666, 6].iter().map(|&j| (j, b.submit(b.try_admit().unwrap(), key(2), j))).collect();
        for (j, rx) in rxs {
            let r = rx.await.unwrap();
            if j == 666 {
                assert!(r.unwrap_err().to_string().contains("panicked"));
            } else {
                assert_eq!(r.unwrap().output, j * 10);
            }
        }
        b.close();
        fin.await.unwrap();
    }

    #[derive(Default)]
    struct Counting {
        stopped: std::sync::atomic::AtomicUsize,
    }
    impl Observer for Counting {
        fn batch_stopped(&self, _: usize) {
            self.stopped.fetch_add(1, Ordering::SeqCst);
        }
    }

    #[tokio::test]
    async fn a_running_batch_whose_clients_all_left_stops_at_its_next_step() {
        let log = Arc::new(Mutex::new(Vec::new()));
        let l = log.clone();
        let obs = Arc::new(Counting::default());
        let policy = BatchPolicy {
            batch_size: 2,
            batch_timeout: Duration::ZERO,
            max_queue: 8,
            wait: WaitMode::Fixed,
            watchdog: Watchdog::default(),
        };
        let (b, _ready, fin) = Batcher::<Key, u32, u32, TestError>::start(policy, obs.clone(), move || {
            Ok((Echo { batches: l, delay: Duration::from_millis(3000) }, ()))
        })
        .unwrap();
        let long = b.submit(b.try_admit().unwrap(), key(1), 1);
        tokio::time::sleep(Duration::from_millis(400)).await; // it runs (10 steps of 300 ms)
        drop(long); // its client leaves
        let t = std::time::Instant::now();
        let next = b.submit(b.try_admit().unwrap(), key(2), 2).await.unwrap();
        // The next job waited at most one step of the long one (300 ms), then ran its own 3 s.
        let waited = t.elapsed();
        assert!(waited < Duration::from_millis(3000 + 300 + 700), "{waited:?}");
        assert_eq!(next.unwrap().output, 20);
        assert_eq!(obs.stopped.load(Ordering::SeqCst), 1);
        b.close();
        fin.await.unwrap();
    }

    /// Sizing whose work is the job's own number (the test double sleeps `delay` whatever the job).
    struct Work;
    impl Sizing<Key> for Work {
        fn fits(&self, _: &Key, _: usize) -> bool {
            true
        }
        fn work(&self, k: &Key, n: usize) -> f64 {
            (k.width as usize * n) as f64
        }
    }

    #[tokio::test]
    async fn the_watchdog_flags_a_batch_far_over_its_expected_time() {
        let log = Arc::new(Mutex::new(Vec::new()));
        let l = log.clone();
        let watchdog = Watchdog { factor: 2.0, grace: Duration::from_millis(100) };
        let policy = BatchPolicy { batch_size: 1, batch_timeout: Duration::ZERO, max_queue: 8, wait: WaitMode::Fixed, watchdog };
        let (b, _ready, fin) = Batcher::<Key, u32, u32, TestError>::start(policy, Arc::new(NoObserver), move || {
            Ok((Echo { batches: l, delay: Duration::from_millis(500) }, ()))
        })
        .unwrap();
        b.set_sizing(Arc::new(Work));
        assert!(b.stall().is_none(), "no speed known yet");
        // Learn the speed: width 100 takes 500 ms (5 ms per unit).
        b.submit(b.try_admit().unwrap(), key(100), 1).await.unwrap().unwrap();
        // A job whose work says 5 ms but which takes 500 ms: stalled after 2 * 5 + 100 ms.
        let rx = b.submit(b.try_admit().unwrap(), key(1), 2);
        tokio::time::sleep(Duration::from_millis(300)).await;
        let s = b.stall().expect("flagged as stalled");
        assert_eq!(s.jobs, 1);
        assert!(s.running >= Duration::from_millis(250) && s.expected < Duration::from_millis(20), "{s:?}");
        rx.await.unwrap().unwrap();
        assert!(b.stall().is_none(), "nothing runs any more");
        b.close();
        fin.await.unwrap();
    }
}
