//! The one edit service under every front end (HTTP routes, the RunPod worker, ...): a request's
//! `{"input": {...}}` to the response object or an [`ApiError`], through the same steps for all.
//!
//! # The front-end contract
//!
//! ```text
//! let admission = service.admit()?;          // cheap, before the body: 503 at once when not ready,
//!                                            // the queue is full, MAX_BODY_READERS bodies are being
//!                                            // read, or REQUEST_MEMORY is full
//! admission.receiving(bytes_so_far)?;        // optional, while a streamed body arrives: counts it
//!                                            // against REQUEST_MEMORY (503/413 when it cannot)
//! let response = service.edit(admission, body, started).await?;
//! // or, for a front end that parsed the fields itself (a form) and wants `n` images:
//! let responses = service.edit_fields(admission, n, input, started).await?;
//! ```
//!
//! The [`Admission`] holds a body-reading slot (released when `edit` starts) and the request's
//! memory reservation (released when the request ends). A queue place is taken only by a received,
//! decoded and prepared job, inside `edit`; `n` images of one request take `n` places at once (all or
//! none) and run as one group, in one batch when `n <= BATCH_SIZE` (else consecutive full batches). Dropping the `edit` future (client gone, a front end's
//! cancel, a worker's job stop) cancels the request: its blocking work not yet started is skipped,
//! work that runs finishes its step and goes no further, its queued job is removed, a batch whose
//! every job is gone stops at its next stage or denoising step, and its CPU permits, queue place and
//! memory are released as the pieces finish. `edit` enforces `REQUEST_TIMEOUT` (504) itself, with
//! the same effect on the work.
//!
//! Steps inside `edit`: parsing and validation (`schema`; arrays capped while parsed), the images'
//! bytes (`images`: base64, SSRF-guarded `image_url` fetches, `image_path` files under
//! `IMAGE_PATH_ROOT`, uploads) with their headers probed, the memory admission (the job's batch
//! memory against the batch budget: 413 `over_memory_limit` when even one such job cannot run; its
//! pixels, and the prepared tensors and result of each of its `n` jobs, against REQUEST_MEMORY: 503),
//! decoding, preparation (the pipeline's `Preprocessor`), a queue place (503 when `MAX_QUEUE` jobs
//! wait), the batch, and the encoding of the result. CPU work runs on the [`work::CpuPool`] (one
//! task per core). The service knows JSON, images and jobs; it knows no HTTP transport and no tensors.

pub mod error;
pub mod fetch;
pub mod images;
pub mod jobs;
pub mod model;
pub mod plan;
mod records;
pub mod schema;
pub mod work;

mod edit;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use tokio::sync::{watch, OwnedSemaphorePermit, Semaphore};

use crate::batcher::{BatchPolicy, Batcher, Finished, Learned, Stall, Watchdog};
use crate::config::Settings;
use crate::imaging;
use crate::metrics::Metrics;
use crate::pipeline::{BatchKey, EditError, EditOutput, Preprocessor};
pub use crate::runtime::counters::DeviceStatus;
use crate::sysmem::{self, human};
pub use error::ApiError;
use fetch::{FetchPolicy, Fetcher};
use images::PathPolicy;
pub use model::ModelInfo;
use plan::{MemoryPlan, ResolutionFit};
pub use schema::{EditResponse, RawInput};
use work::{CpuPool, MemoryBudget, Reservation};

/// Where the service is in its life.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Phase {
    Loading,
    Ready,
    Draining,
    Failed(String),
}

/// Errors of starting the service.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("cannot start the engine worker thread: {0}")]
    Worker(std::io::Error),
    #[error("{0}")]
    Setup(String),
}

struct LoadedModel {
    info: ModelInfo,
    preprocessor: Preprocessor,
    limits: schema::Limits,
    plan: MemoryPlan,
    fits: Vec<ResolutionFit>,
}

/// A request's admission: a body-reading slot and its memory reservation (see the module docs).
#[derive(Debug)]
pub struct Admission {
    body_slot: OwnedSemaphorePermit,
    memory: Reservation,
}

/// The smallest reservation of a new request (JSON, bookkeeping).
const MIN_REQUEST_BYTES: u64 = 64 << 10;

impl Admission {
    /// Counts `bytes` of a body being received against REQUEST_MEMORY (call with the total so far,
    /// as chunks arrive). Fails with 503 `overloaded` when there is no room, 413 when a body that
    /// large can never fit.
    pub fn receiving(&self, bytes: usize) -> Result<(), ApiError> {
        self.memory.at_least(bytes as u64 + MIN_REQUEST_BYTES).map_err(|r| r.to_api("this request's body"))
    }
}

/// The edit service: the batcher and its engine worker, the loaded model, and what every request
/// shares (image fetcher, CPU pool, body slots, memory budget, limits). Cheap to share (`Arc`).
pub struct EditService {
    settings: Settings,
    phase: watch::Sender<Phase>,
    model: OnceLock<LoadedModel>,
    batcher: Batcher<BatchKey, model::Job, EditOutput, EditError>,
    metrics: Arc<Metrics>,
    fetcher: Fetcher,
    pool: Arc<CpuPool>,
    body_slots: Arc<Semaphore>,
    budget: Arc<MemoryBudget>,
    memory_limit: u64,
    /// Where `image_path` may read.
    paths: PathPolicy,
    image_limits: imaging::Limits,
    gpu_available: bool,
    gpu_reason: String,
    stalled: AtomicBool,
}

/// What /health shows of the service.
#[derive(Clone, Debug)]
pub struct Status {
    pub phase: Phase,
    pub model: Option<ModelInfo>,
    pub gpu_available: bool,
    /// Why the backend is what it is (before the model loads: what the GPU probe found).
    pub backend_reason: String,
    pub queue_depth: usize,
    /// The running batch, when the watchdog finds it far over its expected time.
    pub stall: Option<Stall>,
    pub memory: MemoryStatus,
    pub cpu: CpuStatus,
    /// The GPU and the engines' memory on it (TensorRT only; `None` on the CPU backend).
    pub device: Option<DeviceStatus>,
}

/// The CPU part of /health.
#[derive(Clone, Debug, serde::Serialize)]
pub struct CpuStatus {
    /// CPUs this process may use.
    pub count: usize,
    /// CPU time this process has used since it started (user + system), seconds.
    pub process_seconds: Option<f64>,
    /// CPU-heavy tasks (parse, decode, prepare, encode) running now, and the most at once.
    pub tasks_running: usize,
    pub tasks_peak: usize,
}

/// What `GET /queue/status` shows.
#[derive(Clone, Debug, serde::Serialize)]
pub struct QueueStatus {
    /// Jobs admitted and waiting for their batch, and the most that may (`MAX_QUEUE`).
    pub queue_depth: usize,
    pub max_queue: usize,
    /// Jobs in the batch the engine runs now.
    pub running: usize,
    /// Whether a new request would be admitted now, and why not.
    pub accepting: bool,
    pub reason: Option<String>,
    pub batch_policy: PolicyStatus,
}

/// The batch policy in force and what it has learned.
#[derive(Clone, Debug, serde::Serialize)]
pub struct PolicyStatus {
    /// `adaptive` or `fixed` (`BATCH_POLICY`).
    pub policy: &'static str,
    pub batch_size: usize,
    pub batch_timeout_ms: u64,
    #[serde(flatten)]
    pub learned: Learned,
}

/// The memory part of /health.
#[derive(Clone, Debug, serde::Serialize)]
pub struct MemoryStatus {
    pub limit_bytes: u64,
    pub request_budget_bytes: u64,
    pub request_bytes_in_use: u64,
    pub resident_bytes: Option<u64>,
    /// The most resident memory since the model was loaded (the memory probe resets the mark).
    pub resident_peak_bytes: Option<u64>,
    /// What the allocator has handed out and not had back (glibc; `None` elsewhere): a leak grows
    /// this, while resident memory also holds freed memory the allocator keeps for reuse.
    pub heap_in_use_bytes: Option<u64>,
    /// What the host (or the container's cgroup) still has available.
    pub host_available_bytes: Option<u64>,
    /// Present once the model is loaded.
    pub plan: Option<MemoryPlan>,
    /// Per output size of the bundle: one job's batch memory and the largest batch that fits.
    pub resolutions: Vec<ResolutionFit>,
}

impl EditService {
    /// Starts the engine worker, which opens the bundle and probes its memory in the background
    /// (`phase` is `Loading` until it is `Ready` or `Failed`), and the batcher. `Finished` completes
    /// after [`EditService::close`] once every queued job has run.
    pub async fn start(settings: Settings, metrics: Arc<Metrics>) -> Result<(Arc<EditService>, Finished), StartError> {
        let probe = tokio::task::spawn_blocking(crate::runtime::backend::GpuProbe::detect)
            .await
            .map_err(|e| StartError::Setup(format!("GPU probe: {e}")))?;
        let (gpu_available, gpu_reason) = match probe.gpu_ready() {
            Ok(what) => (true, format!("loading the model; GPU: {what}")),
            Err(why) => (false, format!("loading the model; no GPU backend: {why}")),
        };
        metrics.set_ready(false);
        let (open_settings, stage_metrics) = (settings.clone(), metrics.clone());
        let (batcher, loaded, finished) =
            Batcher::start(policy(&settings), metrics.clone(), move || model::open(&open_settings, stage_metrics))
                .map_err(StartError::Worker)?;
        let fetcher = Fetcher::new(FetchPolicy::from_settings(&settings)).map_err(StartError::Setup)?;
        let service = Arc::new(EditService::new(settings, metrics, batcher, fetcher, gpu_available, gpu_reason));
        let s = service.clone();
        tokio::spawn(async move {
            match loaded.await {
                Ok(Ok(l)) => s.model_loaded(l),
                Ok(Err(e)) => s.model_failed(e),
                Err(_) => s.model_failed("the engine worker ended while loading the model".into()),
            }
        });
        let watched = Arc::downgrade(&service);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            loop {
                tick.tick().await;
                match watched.upgrade() {
                    Some(s) => s.watch_stall(),
                    None => return,
                }
            }
        });
        Ok((service, finished))
    }

    fn new(
        settings: Settings,
        metrics: Arc<Metrics>,
        batcher: Batcher<BatchKey, model::Job, EditOutput, EditError>,
        fetcher: Fetcher,
        gpu_available: bool,
        gpu_reason: String,
    ) -> EditService {
        let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
        let memory_limit = settings.memory_limit.or_else(sysmem::default_limit).unwrap_or(u64::MAX / 4);
        let requests = settings.request_memory.unwrap_or(memory_limit / 4);
        EditService {
            phase: watch::channel(Phase::Loading).0,
            model: OnceLock::new(),
            batcher,
            metrics,
            fetcher,
            paths: PathPolicy { root: settings.image_path_root.clone(), max_bytes: settings.url_max_bytes },
            pool: Arc::new(CpuPool::new(cores)),
            body_slots: Arc::new(Semaphore::new(settings.max_body_readers)),
            budget: MemoryBudget::new(requests),
            memory_limit,
            image_limits: imaging::Limits {
                max_width: settings.max_image_side,
                max_height: settings.max_image_side,
                max_pixels: settings.max_image_pixels,
            },
            gpu_available,
            gpu_reason,
            stalled: AtomicBool::new(false),
            settings,
        }
    }

    fn model_loaded(&self, l: model::Loaded) {
        self.metrics.set_engine_counters(l.counters);
        let info = l.info;
        let limits = schema::Limits {
            default_steps: info.default_steps,
            default_true_cfg_scale: info.default_true_cfg_scale,
            max_images: info.max_images,
            max_prompt_chars: self.settings.max_prompt_chars,
            max_output_side: self.settings.max_output_side,
            max_steps: self.settings.max_steps,
        };
        let estimator = l.memory.map_err(|e| tracing::warn!("no memory model, batches are capped by BATCH_SIZE only: {e}")).ok();
        let resident = sysmem::rss().unwrap_or(0);
        let plan = MemoryPlan::new(self.memory_limit, resident, self.budget.limit(), self.settings.batch_size, estimator);
        let fits = plan.resolutions(&l.preprocessor, &l.resolutions, self.settings.lightning);
        tracing::info!("memory: {}", plan.describe());
        for f in &fits {
            tracing::info!(
                width = f.width,
                height = f.height,
                job = %human(f.job_bytes),
                max_batch = f.max_batch,
                max_batch_true_cfg = f.max_batch_true_cfg,
                "largest batch that fits"
            );
        }
        if plan.estimator.is_some() && fits.iter().all(|f| f.max_batch == 0) {
            let need = fits.iter().map(|f| f.job_bytes).min().unwrap_or(0);
            return self.model_failed(format!(
                "not even one edit fits in memory: {}; one edit at the bundle's sizes needs {} (raise MEMORY_LIMIT or lower REQUEST_MEMORY)",
                plan.describe(),
                human(need)
            ));
        }
        self.batcher.set_sizing(Arc::new(plan.clone()));
        self.metrics.set_info(&[
            ("bundle", info.bundle.clone()),
            ("variant", info.variant.clone()),
            ("backend", info.backend.clone()),
        ]);
        tracing::info!(bundle = %info.bundle, variant = %info.variant, backend = %info.backend, reason = %info.backend_reason, "model ready");
        if self.settings.lightning && !info.lightning_fused {
            tracing::warn!(
                "USE_LIGHTNING_LORA is on but the bundle has no Lightning LoRA fused: the Lightning schedule runs with the base weights"
            );
        }
        if info.default_steps > self.settings.max_steps {
            tracing::warn!(
                default_steps = info.default_steps,
                max_steps = self.settings.max_steps,
                "the default steps are above MAX_STEPS: requests must give num_inference_steps"
            );
        }
        let _ = self.model.set(LoadedModel { info, preprocessor: l.preprocessor, limits, plan, fits });
        if self.phase() == Phase::Loading {
            self.phase.send_replace(Phase::Ready);
            self.metrics.set_ready(true);
        }
    }

    fn model_failed(&self, e: String) {
        tracing::error!("{e}");
        self.phase.send_replace(Phase::Failed(e));
    }

    /// The watchdog's tick: logs when the running batch turns stalled and when it recovers.
    fn watch_stall(&self) {
        let stall = self.batcher.stall();
        let was = self.stalled.swap(stall.is_some(), Ordering::Relaxed);
        match (was, stall) {
            (false, Some(s)) => {
                tracing::error!(
                    jobs = s.jobs,
                    running_s = s.running.as_secs_f64(),
                    expected_s = s.expected.as_secs_f64(),
                    "a batch runs far longer than the recent speed predicts (WATCHDOG_FACTOR): the engine may be hung; /health says stalled"
                );
                self.metrics.set_ready(false);
            }
            (true, None) => {
                tracing::info!("the stalled batch ended; /health is back to its phase");
                self.metrics.set_ready(self.phase() == Phase::Ready);
            }
            _ => {}
        }
    }

    pub fn settings(&self) -> &Settings {
        &self.settings
    }

    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    pub fn phase(&self) -> Phase {
        self.phase.borrow().clone()
    }

    /// Whether the running batch is far over its expected time (the watchdog; `/health` says `stalled`).
    pub fn stalled(&self) -> bool {
        self.batcher.stall().is_some()
    }

    /// Follows the phase (a front end stops when the model fails to load).
    pub fn subscribe(&self) -> watch::Receiver<Phase> {
        self.phase.subscribe()
    }

    /// Waits until the model is loaded (Ok) or failed to load (Err with the reason).
    pub async fn ready(&self) -> Result<(), String> {
        let mut rx = self.phase.subscribe();
        let p = rx.wait_for(|p| !matches!(p, Phase::Loading)).await.map(|p| p.clone()).map_err(|e| e.to_string())?;
        match p {
            Phase::Failed(e) => Err(e),
            _ => Ok(()),
        }
    }

    /// Stops admitting work (`Draining`); queued and running jobs go on.
    pub fn drain(&self) {
        if !matches!(self.phase(), Phase::Failed(_)) {
            self.phase.send_replace(Phase::Draining);
            self.metrics.set_ready(false);
        }
    }

    /// After the front ends stopped submitting: finish every queued job, then stop the engine worker.
    pub fn close(&self) {
        self.batcher.close();
    }

    /// Jobs queued and not yet running.
    pub fn queue_depth(&self) -> usize {
        self.batcher.depth()
    }

    pub fn model(&self) -> Option<&ModelInfo> {
        self.model.get().map(|m| &m.info)
    }

    /// CPU tasks running, the most ever at once, and tasks skipped because their request was gone.
    pub fn cpu_counts(&self) -> (usize, usize, u64) {
        self.pool.counts()
    }

    /// The most memory requests in flight ever reserved at once.
    pub fn request_memory_peak(&self) -> u64 {
        self.budget.used().1
    }

    pub fn status(&self) -> Status {
        let model = self.model().cloned();
        let loaded = self.model.get();
        let (in_use, _) = self.budget.used();
        let (tasks_running, tasks_peak, _) = self.pool.counts();
        Status {
            cpu: CpuStatus {
                count: std::thread::available_parallelism().map_or(1, |n| n.get()),
                process_seconds: sysmem::cpu_seconds(),
                tasks_running,
                tasks_peak,
            },
            device: self.metrics.device_status(),
            phase: self.phase(),
            gpu_available: model.as_ref().map_or(self.gpu_available, |m| m.gpu_available),
            backend_reason: model.as_ref().map_or_else(|| self.gpu_reason.clone(), |m| m.backend_reason.clone()),
            model,
            queue_depth: self.batcher.depth(),
            stall: self.batcher.stall(),
            memory: MemoryStatus {
                limit_bytes: self.memory_limit,
                request_budget_bytes: self.budget.limit(),
                request_bytes_in_use: in_use,
                resident_bytes: sysmem::rss(),
                resident_peak_bytes: sysmem::peak_rss(),
                heap_in_use_bytes: sysmem::heap_in_use(),
                host_available_bytes: sysmem::host_available(),
                plan: loaded.map(|m| m.plan.clone()),
                resolutions: loaded.map(|m| m.fits.clone()).unwrap_or_default(),
            },
        }
    }

    /// Admission of a new request, answered at once and before its body is read: the model is
    /// loading, the service is draining or failed (503 `not_ready`), or `MAX_QUEUE` jobs wait,
    /// `MAX_BODY_READERS` bodies are being received, or REQUEST_MEMORY is full (503 `overloaded`).
    pub fn admit(&self) -> Result<Admission, ApiError> {
        self.loaded()?;
        if !self.batcher.has_room() {
            return Err(self.queue_full());
        }
        let body_slot = self.body_slots.clone().try_acquire_owned().map_err(|_| {
            ApiError::overloaded(
                format!(
                    "{} request bodies are being received (MAX_BODY_READERS); retry after the Retry-After seconds",
                    self.settings.max_body_readers
                ),
                Duration::from_secs(2),
            )
        })?;
        let memory = Reservation::new(&self.budget);
        memory.at_least(MIN_REQUEST_BYTES).map_err(|r| r.to_api("a new request"))?;
        Ok(Admission { body_slot, memory })
    }

    /// Whether [`EditService::admit`] would admit a request now (without taking anything).
    pub fn would_admit(&self) -> Result<(), ApiError> {
        self.loaded()?;
        if !self.batcher.has_room() {
            return Err(self.queue_full());
        }
        if self.body_slots.available_permits() == 0 {
            return Err(ApiError::overloaded("MAX_BODY_READERS request bodies are being received", Duration::from_secs(2)));
        }
        let (used, _) = self.budget.used();
        if used + MIN_REQUEST_BYTES > self.budget.limit() {
            return Err(ApiError::overloaded("REQUEST_MEMORY is full", Duration::from_secs(2)));
        }
        Ok(())
    }

    /// The queue, the running batch, admission and the batch policy (`GET /queue/status`).
    pub fn queue_status(&self) -> QueueStatus {
        let admit = self.would_admit();
        let policy = self.batcher.policy();
        QueueStatus {
            queue_depth: self.batcher.depth(),
            max_queue: self.settings.max_queue,
            running: self.batcher.running_jobs(),
            accepting: admit.is_ok(),
            reason: admit.err().map(|e| e.message),
            batch_policy: PolicyStatus {
                policy: policy.wait.as_str(),
                batch_size: policy.batch_size,
                batch_timeout_ms: policy.batch_timeout.as_millis() as u64,
                learned: self.batcher.learned(),
            },
        }
    }

    fn queue_full(&self) -> ApiError {
        ApiError::overloaded(
            format!(
                "the queue is full ({} jobs waiting, MAX_QUEUE); retry after the Retry-After seconds",
                self.settings.max_queue
            ),
            self.batcher.retry_after(),
        )
    }

    fn loaded(&self) -> Result<&LoadedModel, ApiError> {
        match self.phase() {
            Phase::Ready => self.model.get().ok_or_else(|| ApiError::internal("ready without a model")),
            Phase::Loading => Err(ApiError::not_ready("the model is still loading; retry shortly", Duration::from_secs(5))),
            Phase::Draining => {
                Err(ApiError::not_ready("the server is shutting down; retry on another instance", Duration::from_secs(5)))
            }
            Phase::Failed(e) => Err(ApiError::not_ready(format!("the model failed to load: {e}"), Duration::from_secs(30))),
        }
    }
}

fn policy(settings: &Settings) -> BatchPolicy {
    BatchPolicy {
        batch_size: settings.batch_size,
        batch_timeout: settings.batch_timeout,
        max_queue: settings.max_queue,
        wait: settings.batch_policy,
        watchdog: Watchdog { factor: settings.watchdog_factor, ..Watchdog::default() },
    }
}

/// A service whose model is opened by `open` on the engine worker thread, as in production (for
/// unit tests of the front ends).
#[cfg(test)]
pub(crate) fn test_service(
    settings: Settings,
    open: impl FnOnce() -> Result<(model::BatchFn, model::Loaded), String> + Send + 'static,
) -> Arc<EditService> {
    let metrics = Arc::new(Metrics::new(settings.batch_size));
    let (batcher, _loaded, _finished) = Batcher::start(policy(&settings), metrics.clone(), open).expect("worker thread");
    let fetcher = Fetcher::new(FetchPolicy::default()).expect("tls");
    Arc::new(EditService::new(settings, metrics, batcher, fetcher, false, "test".into()))
}

/// Sets the phase (route unit tests walk a service through its phases).
#[cfg(test)]
pub(crate) fn set_phase(service: &EditService, phase: Phase) {
    service.phase.send_replace(phase);
}
