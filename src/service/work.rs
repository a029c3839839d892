//! What a request's work may take: CPU (the blocking pool, one task per core) and memory (the
//! in-flight budget, `REQUEST_MEMORY`), and how a request that nobody wants any more stops.
//!
//! - [`Cancel`]: set when the request's future is dropped (client gone, REQUEST_TIMEOUT, a front
//!   end's cancel). Work not yet started is skipped; work that runs finishes its step and the
//!   request goes no further.
//! - [`CpuPool`]: a task holds its core's permit for as long as it *runs* (the permit moves into the
//!   blocking closure), so abandoned work still counts against the cores: at most one CPU-heavy task
//!   per core, whatever clients do. Tasks that declare a large working set (image decodes, from the
//!   header's estimate) also share [`LARGE_TASK_MEMORY`]: two 30 MP decodes do not run at once,
//!   so a decode that nobody wants any more (it cannot be stopped once started) is the only one.
//! - [`MemoryBudget`] / [`Reservation`]: a request reserves, before it allocates, what its next
//!   phase will hold (body, decoded bytes, pixels estimated from the image headers, prepared tensors,
//!   the encoded result); clones of the reservation travel with its blocking tasks and its queued
//!   job, so the memory stays counted until the last of them is done.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;

use tokio::sync::Semaphore;

use super::error::ApiError;

/// Whether the request that owns some work still wants it.
#[derive(Clone, Debug, Default)]
pub struct Cancel(Arc<AtomicBool>);

impl Cancel {
    pub fn is_cancelled(&self) -> bool {
        self.0.load(Ordering::Acquire)
    }

    pub fn cancel(&self) {
        self.0.store(true, Ordering::Release);
    }

    /// A guard that cancels when dropped (held by the request's future).
    pub fn on_drop(&self) -> CancelOnDrop {
        CancelOnDrop(self.clone())
    }
}

/// Cancels its [`Cancel`] when dropped.
#[derive(Debug)]
pub struct CancelOnDrop(Cancel);

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        self.0.cancel();
    }
}

fn gone() -> ApiError {
    ApiError::new(
        http::StatusCode::from_u16(499).unwrap_or(http::StatusCode::BAD_REQUEST),
        "cancelled",
        "the request was cancelled",
    )
}

/// Working memory that CPU tasks declaring one may hold at once ([`CpuPool::run_sized`]); a task
/// over it runs alone among them. Decoding is memory-bound: running two very large decodes at
/// once doubles the peak for little time saved, and a decode cannot be interrupted once started.
pub const LARGE_TASK_MEMORY: u64 = 256 << 20;

/// The blocking pool under one permit per core, with counters for /metrics.
pub struct CpuPool {
    permits: Arc<Semaphore>,
    /// [`LARGE_TASK_MEMORY`] in MiB.
    large: Arc<Semaphore>,
    cores: usize,
    running: AtomicUsize,
    peak: AtomicUsize,
    skipped: AtomicU64,
}

impl CpuPool {
    pub fn new(cores: usize) -> CpuPool {
        let cores = cores.max(1);
        CpuPool {
            permits: Arc::new(Semaphore::new(cores)),
            large: Arc::new(Semaphore::new((LARGE_TASK_MEMORY >> 20) as usize)),
            cores,
            running: AtomicUsize::new(0),
            peak: AtomicUsize::new(0),
            skipped: AtomicU64::new(0),
        }
    }

    pub fn cores(&self) -> usize {
        self.cores
    }

    /// CPU tasks running now, the most that ever ran at once, and the tasks skipped because their
    /// request was gone before they started.
    pub fn counts(&self) -> (usize, usize, u64) {
        (self.running.load(Ordering::Relaxed), self.peak.load(Ordering::Relaxed), self.skipped.load(Ordering::Relaxed))
    }

    /// Runs `f` on the blocking pool once a core is free, unless `cancel` is set by then (or by the
    /// time the pool starts it) or the caller stops waiting before then: either way `f` is skipped and
    /// counted. The permit and `memory` are held until `f` returns, even when the caller stops waiting.
    pub async fn run<T, F>(self: &Arc<Self>, cancel: &Cancel, memory: Option<&Reservation>, f: F) -> Result<T, ApiError>
    where
        F: FnOnce() -> Result<T, ApiError> + Send + 'static,
        T: Send + 'static,
    {
        self.run_sized(cancel, memory, 0, f).await
    }

    /// [`run`](Self::run) for a task whose working set is about `working_set` bytes: first it waits
    /// until that much of [`LARGE_TASK_MEMORY`] is free (all of it when it is larger), then for a core.
    pub async fn run_sized<T, F>(
        self: &Arc<Self>,
        cancel: &Cancel,
        memory: Option<&Reservation>,
        working_set: u64,
        f: F,
    ) -> Result<T, ApiError>
    where
        F: FnOnce() -> Result<T, ApiError> + Send + 'static,
        T: Send + 'static,
    {
        let closed = |_| ApiError::internal("the server is shutting down");
        // A request that is gone drops this future while it waits for memory or a core: the task is
        // skipped then too, and counted (the guard is disarmed once the task is handed to the pool).
        let waiting = SkipOnDrop(Some(&self.skipped));
        let mib = working_set.div_ceil(1 << 20).min(LARGE_TASK_MEMORY >> 20) as u32;
        let acquired = async {
            let large = match mib {
                0 => None,
                n => Some(self.large.clone().acquire_many_owned(n).await.map_err(closed)?),
            };
            Ok::<_, ApiError>((large, self.permits.clone().acquire_owned().await.map_err(closed)?))
        };
        let (large, permit) = match acquired.await {
            Ok(held) => held,
            Err(e) => {
                waiting.disarm(); // shutting down, not skipped
                return Err(e);
            }
        };
        if cancel.is_cancelled() {
            return Err(gone()); // counted by the guard
        }
        waiting.disarm();
        let (pool, cancel, memory) = (self.clone(), cancel.clone(), memory.cloned());
        let span = tracing::Span::current(); // the request's, so the task's log lines carry its id
        let task = tokio::task::spawn_blocking(move || {
            let _in_span = span.enter();
            // Dropped in this order when the task ends: the memory is free before the next task starts.
            let _held = (memory, large, permit);
            if cancel.is_cancelled() {
                pool.skipped.fetch_add(1, Ordering::Relaxed);
                return Err(gone());
            }
            let now = pool.running.fetch_add(1, Ordering::Relaxed) + 1;
            pool.peak.fetch_max(now, Ordering::Relaxed);
            let r = f();
            pool.running.fetch_sub(1, Ordering::Relaxed);
            r
        });
        task.await.map_err(|e| ApiError::internal(format!("a preprocessing task failed: {e}")))?
    }
}

/// Counts a CPU task as skipped when it is dropped before it reached the pool (see [`CpuPool::run_sized`]).
struct SkipOnDrop<'a>(Option<&'a AtomicU64>);

impl SkipOnDrop<'_> {
    fn disarm(mut self) {
        self.0 = None;
    }
}

impl Drop for SkipOnDrop<'_> {
    fn drop(&mut self) {
        if let Some(skipped) = self.0 {
            skipped.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// Why a reservation could not grow.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Refused {
    /// What the request would hold in all.
    pub wanted: u64,
    /// What was free for it (its own share included).
    pub free: u64,
    pub limit: u64,
}

impl Refused {
    /// 413 when one request alone needs more than the whole budget (retrying cannot help), else
    /// 503 `overloaded` with a Retry-After.
    pub fn to_api(self, what: &str) -> ApiError {
        use crate::sysmem::human;
        if self.wanted > self.limit {
            ApiError::new(
                http::StatusCode::PAYLOAD_TOO_LARGE,
                "payload_too_large",
                format!(
                    "{what} needs an estimated {} of server memory; one request may hold at most {} (REQUEST_MEMORY): send smaller images",
                    human(self.wanted),
                    human(self.limit)
                ),
            )
        } else {
            ApiError::overloaded(
                format!(
                    "the server has no memory free for {what} (it needs {}, {} of {} is free; REQUEST_MEMORY): retry after the Retry-After seconds",
                    human(self.wanted),
                    human(self.free),
                    human(self.limit)
                ),
                std::time::Duration::from_secs(2),
            )
        }
    }
}

/// The in-flight memory budget: bytes reserved by requests, at most `limit`.
#[derive(Debug)]
pub struct MemoryBudget {
    limit: u64,
    used: AtomicU64,
    peak: AtomicU64,
}

impl MemoryBudget {
    pub fn new(limit: u64) -> Arc<MemoryBudget> {
        Arc::new(MemoryBudget { limit, used: AtomicU64::new(0), peak: AtomicU64::new(0) })
    }

    pub fn limit(&self) -> u64 {
        self.limit
    }

    /// Bytes reserved now, and the most ever reserved at once.
    pub fn used(&self) -> (u64, u64) {
        (self.used.load(Ordering::Relaxed), self.peak.load(Ordering::Relaxed))
    }

    fn take(&self, n: u64) -> Result<(), u64> {
        let mut used = self.used.load(Ordering::Relaxed);
        loop {
            let next = used.saturating_add(n);
            if next > self.limit {
                return Err(self.limit.saturating_sub(used));
            }
            match self.used.compare_exchange_weak(used, next, Ordering::AcqRel, Ordering::Relaxed) {
                Ok(_) => {
                    self.peak.fetch_max(next, Ordering::Relaxed);
                    return Ok(());
                }
                Err(now) => used = now,
            }
        }
    }

    fn give(&self, n: u64) {
        self.used.fetch_sub(n, Ordering::AcqRel);
    }
}

/// The memory one request holds in the budget; clones share it, and the last one to drop gives it
/// back.
#[derive(Clone, Debug)]
pub struct Reservation(Arc<Held>);

#[derive(Debug)]
struct Held {
    budget: Arc<MemoryBudget>,
    bytes: AtomicU64,
}

impl Drop for Held {
    fn drop(&mut self) {
        self.budget.give(self.bytes.load(Ordering::Acquire));
    }
}

impl Reservation {
    /// An empty reservation in `budget`.
    pub fn new(budget: &Arc<MemoryBudget>) -> Reservation {
        Reservation(Arc::new(Held { budget: budget.clone(), bytes: AtomicU64::new(0) }))
    }

    pub fn bytes(&self) -> u64 {
        self.0.bytes.load(Ordering::Acquire)
    }

    /// Grows the reservation to at least `total` bytes (it never shrinks).
    pub fn at_least(&self, total: u64) -> Result<(), Refused> {
        let held = self.bytes();
        if total <= held {
            return Ok(());
        }
        let budget = &self.0.budget;
        match budget.take(total - held) {
            Ok(()) => {
                self.0.bytes.fetch_add(total - held, Ordering::AcqRel);
                Ok(())
            }
            Err(free) => Err(Refused { wanted: total, free: free + held, limit: budget.limit }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn reservations_add_up_refuse_beyond_the_limit_and_give_back_on_the_last_drop() {
        let budget = MemoryBudget::new(1000);
        let a = Reservation::new(&budget);
        a.at_least(600).unwrap();
        a.at_least(400).unwrap(); // never shrinks
        assert_eq!((a.bytes(), budget.used().0), (600, 600));
        let b = Reservation::new(&budget);
        let r = b.at_least(500).unwrap_err();
        assert_eq!(r, Refused { wanted: 500, free: 400, limit: 1000 });
        assert_eq!(r.to_api("this request").status.as_u16(), 503);
        assert_eq!(b.at_least(2000).unwrap_err().to_api("it").status.as_u16(), 413, "over the whole budget: 413");
        b.at_least(400).unwrap();
        assert_eq!(budget.used(), (1000, 1000));
        let a2 = a.clone(); // a blocking task keeps the request's memory
        drop(a);
        assert_eq!(budget.used().0, 1000, "still held by the clone");
        drop(a2);
        assert_eq!(budget.used().0, 400);
        drop(b);
        assert_eq!(budget.used(), (0, 1000));
    }

    /// Runs two tasks of `working_set` bytes each at once on a two-core pool; the most that ran at once.
    async fn two_at_once(working_set: u64) -> usize {
        let pool = Arc::new(CpuPool::new(2));
        let task = |p: Arc<CpuPool>| async move {
            let slow = || {
                std::thread::sleep(Duration::from_millis(300));
                Ok(())
            };
            p.run_sized(&Cancel::default(), None, working_set, slow).await
        };
        let (a, b) = tokio::join!(tokio::spawn(task(pool.clone())), tokio::spawn(task(pool.clone())));
        a.unwrap().unwrap();
        b.unwrap().unwrap();
        pool.counts().1
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn large_working_sets_run_one_at_a_time_and_small_ones_together() {
        assert_eq!(two_at_once(0).await, 2);
        assert_eq!(two_at_once(LARGE_TASK_MEMORY / 2).await, 2, "two halves fit");
        assert_eq!(two_at_once(LARGE_TASK_MEMORY / 2 + (1 << 20)).await, 1);
        assert_eq!(two_at_once(30_000_000 * 9).await, 1, "a 30 MP decode's estimate is over the whole share");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn cpu_work_holds_its_permit_while_it_runs_and_gone_work_is_skipped() {
        let pool = Arc::new(CpuPool::new(1));
        let budget = MemoryBudget::new(100);
        let memory = Reservation::new(&budget);
        memory.at_least(100).unwrap();
        let cancel = Cancel::default();
        // A slow task whose caller stops waiting: it keeps the only core and the memory.
        let (p, c, m) = (pool.clone(), cancel.clone(), memory.clone());
        let first = tokio::spawn(async move {
            p.run(&c, Some(&m), || {
                std::thread::sleep(Duration::from_millis(300));
                Ok(())
            })
            .await
        });
        tokio::time::sleep(Duration::from_millis(50)).await;
        first.abort();
        drop(memory);
        assert_eq!(budget.used().0, 100, "the running task still holds the memory");
        // A second request's task waits for the core.
        let other = Cancel::default();
        let t = std::time::Instant::now();
        pool.run(&other, None, || Ok(())).await.unwrap();
        assert!(t.elapsed() >= Duration::from_millis(200), "it had to wait for the abandoned task: {:?}", t.elapsed());
        assert_eq!(budget.used().0, 0, "released when the task ended");
        assert_eq!(pool.counts().1, 1, "never more than one at once");
        // Work of a cancelled request is not started.
        let dead = Cancel::default();
        let guard = dead.on_drop();
        drop(guard);
        let ran = Arc::new(AtomicBool::new(false));
        let r = ran.clone();
        let e = pool
            .run(&dead, None, move || {
                r.store(true, Ordering::SeqCst);
                Ok(())
            })
            .await
            .unwrap_err();
        assert_eq!(e.error_type, "cancelled");
        assert!(!ran.load(Ordering::SeqCst));
        assert_eq!(pool.counts().2, 1);
    }

    /// A gone request drops its future while its task still waits for a core (or for the large-task
    /// memory): the task never runs and is counted as skipped, once.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn work_dropped_while_it_waits_is_skipped_and_counted() {
        let pool = Arc::new(CpuPool::new(1));
        let busy = {
            let p = pool.clone();
            tokio::spawn(async move {
                p.run_sized(&Cancel::default(), None, LARGE_TASK_MEMORY, || {
                    std::thread::sleep(Duration::from_millis(400));
                    Ok(())
                })
                .await
            })
        };
        tokio::time::sleep(Duration::from_millis(50)).await;
        let ran = Arc::new(AtomicUsize::new(0));
        let mut waiting = Vec::new();
        for working_set in [0, LARGE_TASK_MEMORY] {
            // One waits for the core, one for the large-task memory; their requests go away.
            let (p, r) = (pool.clone(), ran.clone());
            let cancel = Cancel::default();
            waiting.push(tokio::spawn(async move {
                let _gone = cancel.on_drop();
                p.run_sized(&cancel, None, working_set, move || {
                    r.fetch_add(1, Ordering::SeqCst);
                    Ok(())
                })
                .await
            }));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        for w in &waiting {
            w.abort();
        }
        for w in waiting {
            assert!(w.await.unwrap_err().is_cancelled());
        }
        busy.await.unwrap().unwrap();
        pool.run(&Cancel::default(), None, || Ok(())).await.unwrap();
        assert_eq!(ran.load(Ordering::SeqCst), 0, "the dropped tasks never ran");
        assert_eq!(pool.counts().2, 2, "both dropped tasks are counted as skipped, once each");
    }
}
