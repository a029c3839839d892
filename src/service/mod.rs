//! The one edit service under every front end (HTTP routes, the RunPod worker, ...): a request's
//! `{"input": {...}}` to the response object or an [`ApiError`], through the same steps for all.
//!
//! Steps: admission (`admit`: loading / draining / a full queue answer 503 at once), parsing and
//! validation (`schema`), image loading (`images`: base64, data URIs, SSRF-guarded `image_url`
//! fetches, `image_path` files under `IMAGE_PATH_ROOT`), preparation (the pipeline's `Preprocessor`, on the blocking pool), submission to the
//! batcher (the engine worker runs the batch), encoding of the result. The service knows JSON,
//! images and jobs; it knows no HTTP transport and no tensors.

pub mod error;
pub mod fetch;
pub mod images;
pub mod jobs;
pub mod model;
mod records;
pub mod schema;

use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::StatusCode;
use tokio::sync::{watch, Semaphore};

use crate::batcher::{BatchPolicy, Batcher, Finished, Ticket};
use crate::config::Settings;
use crate::imaging;
use crate::metrics::Metrics;
use crate::pipeline::{BatchKey, EditError, EditOutput, EditRequest, Prepared, Preprocessor};
pub use error::ApiError;
use fetch::{FetchPolicy, Fetcher};
use images::PathPolicy;
pub use model::ModelInfo;
use schema::{EditParams, EditResponse, RawInput, Timings};

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
}

/// The edit service: the batcher and its engine worker, the loaded model, and what every request
/// shares (image fetcher, CPU permits, limits). Cheap to share (`Arc`).
pub struct EditService {
    settings: Settings,
    phase: watch::Sender<Phase>,
    model: OnceLock<LoadedModel>,
    batcher: Batcher<BatchKey, Prepared, EditOutput, EditError>,
    metrics: Arc<Metrics>,
    fetcher: Fetcher,
    /// Where `image_path` may read.
    paths: PathPolicy,
    /// Bounds concurrent CPU work (JSON parse, base64, decode, prepare, encode) to the core count.
    cpu: Semaphore,
    image_limits: imaging::Limits,
    gpu_available: bool,
    gpu_reason: String,
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
}

impl EditService {
    /// Starts the engine worker, which opens the bundle in the background (`phase` is `Loading`
    /// until it is `Ready` or `Failed`), and the batcher. `Finished` completes after [`EditService::close`]
    /// once every queued job has run.
    pub async fn start(settings: Settings, metrics: Arc<Metrics>) -> Result<(Arc<EditService>, Finished), StartError> {
        let probe = tokio::task::spawn_blocking(crate::runtime::backend::GpuProbe::detect)
            .await
            .map_err(|e| StartError::Setup(format!("GPU probe: {e}")))?;
        let (gpu_available, gpu_reason) = match probe.gpu_ready() {
            Ok(what) => (true, format!("loading the model; GPU: {what}")),
            Err(why) => (false, format!("loading the model; no GPU backend: {why}")),
        };
        metrics.set_ready(false);
        let policy =
            BatchPolicy { batch_size: settings.batch_size, batch_timeout: settings.batch_timeout, max_queue: settings.max_queue };
        let open_settings = settings.clone();
        let (batcher, loaded, finished) =
            Batcher::start(policy, metrics.clone(), move || model::open(&open_settings)).map_err(StartError::Worker)?;
        let fetcher = Fetcher::new(FetchPolicy::from_settings(&settings)).map_err(StartError::Setup)?;
        let paths = PathPolicy { root: settings.image_path_root.clone(), max_bytes: settings.url_max_bytes };
        let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
        let image_limits = imaging::Limits {
            max_width: settings.max_image_side,
            max_height: settings.max_image_side,
            max_pixels: settings.max_image_pixels,
        };
        let service = Arc::new(EditService {
            phase: watch::channel(Phase::Loading).0,
            model: OnceLock::new(),
            batcher,
            metrics,
            fetcher,
            paths,
            cpu: Semaphore::new(cores),
            image_limits,
            gpu_available,
            gpu_reason,
            settings,
        });
        let s = service.clone();
        tokio::spawn(async move {
            match loaded.await {
                Ok(Ok(l)) => s.model_loaded(l),
                Ok(Err(e)) => s.model_failed(e),
                Err(_) => s.model_failed("the engine worker ended while loading the model".into()),
            }
        });
        Ok((service, finished))
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
        };
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
        let _ = self.model.set(LoadedModel { info, preprocessor: l.preprocessor, limits });
        if self.phase() == Phase::Loading {
            self.phase.send_replace(Phase::Ready);
            self.metrics.set_ready(true);
        }
    }

    fn model_failed(&self, e: String) {
        tracing::error!("{e}");
        self.phase.send_replace(Phase::Failed(e));
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

    /// Jobs admitted and not yet running.
    pub fn queue_depth(&self) -> usize {
        self.batcher.depth()
    }

    pub fn model(&self) -> Option<&ModelInfo> {
        self.model.get().map(|m| &m.info)
    }

    pub fn status(&self) -> Status {
        let model = self.model().cloned();
        Status {
            phase: self.phase(),
            gpu_available: model.as_ref().map_or(self.gpu_available, |m| m.gpu_available),
            backend_reason: model.as_ref().map_or_else(|| self.gpu_reason.clone(), |m| m.backend_reason.clone()),
            model,
            queue_depth: self.batcher.depth(),
        }
    }

    /// A queue place for a new request, or why there is none: the model is loading, the service is
    /// draining or failed (503 `not_ready`), or `MAX_QUEUE` jobs wait (503 `overloaded`). Answered at
    /// once, before the request's body is read.
    pub fn admit(&self) -> Result<Ticket, ApiError> {
        self.loaded()?;
        self.batcher.try_admit().ok_or_else(|| {
            ApiError::overloaded(
                format!(
                    "the queue is full ({} requests waiting, MAX_QUEUE); retry after the Retry-After seconds",
                    self.settings.max_queue
                ),
                self.batcher.retry_after(),
            )
        })
    }

    /// `n` more queue places at once, all or none, for the further images of a request that already
    /// holds one ([`EditService::edit_fields`]); 503 `overloaded` when fewer are free.
    pub fn admit_n(&self, n: usize) -> Result<Vec<Ticket>, ApiError> {
        self.loaded()?;
        self.batcher.try_admit_many(n).ok_or_else(|| {
            ApiError::overloaded(
                format!(
                    "the queue has no room for {n} more images (MAX_QUEUE {}); retry after the Retry-After seconds or ask for fewer",
                    self.settings.max_queue
                ),
                self.batcher.retry_after(),
            )
        })
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

    /// One edit from its request body `{"input": {...}}` (keys beside `input`, like RunPod's `id`,
    /// are ignored), holding the queue place `ticket`. Fails with 504 `timeout` when `REQUEST_TIMEOUT`
    /// has passed since `started`.
    pub async fn edit(&self, ticket: Ticket, body: Bytes, started: Instant) -> Result<EditResponse, ApiError> {
        self.timed(started, self.edit_untimed(ticket, body, started)).await
    }

    /// Edits of an input whose fields a front end parsed itself (a form): validated by the same
    /// rules as `edit`'s JSON ([`schema::validate`], fields named without `input.`), one result per
    /// ticket. The `n = tickets.len()` images use seeds `seed..seed+n-1` and are submitted as one
    /// group: they run in one batch when `n <= BATCH_SIZE`, else in consecutive full batches.
    pub async fn edit_fields(
        &self,
        tickets: Vec<Ticket>,
        input: RawInput,
        started: Instant,
    ) -> Result<Vec<EditResponse>, ApiError> {
        self.timed(started, async move {
            let model = self.loaded()?;
            let limits = model.limits.clone();
            let params = images::blocking(&self.cpu, move || {
                schema::validate(input, &limits, schema::Names::FORM, || u64::from(rand::random::<u32>()))
            })
            .await?;
            self.run(tickets, model, params, started).await
        })
        .await
    }

    /// Runs `work` within `REQUEST_TIMEOUT` from `started` (504 `timeout` after it).
    async fn timed<T>(
        &self,
        started: Instant,
        work: impl std::future::Future<Output = Result<T, ApiError>>,
    ) -> Result<T, ApiError> {
        let timeout = self.settings.request_timeout;
        match tokio::time::timeout_at((started + timeout).into(), work).await {
            Ok(r) => r,
            Err(_) => Err(ApiError::new(
                StatusCode::GATEWAY_TIMEOUT,
                "timeout",
                format!(
                    "the request took longer than {:.0} s (REQUEST_TIMEOUT); retry later or with fewer steps",
                    timeout.as_secs_f64()
                ),
            )),
        }
    }

    async fn edit_untimed(&self, ticket: Ticket, body: Bytes, started: Instant) -> Result<EditResponse, ApiError> {
        let model = self.loaded()?;
        let limits = model.limits.clone();
        let params =
            images::blocking(&self.cpu, move || schema::parse(&body, &limits, || u64::from(rand::random::<u32>()))).await?;
        let mut one = self.run(vec![ticket], model, params, started).await?;
        one.pop().ok_or_else(|| ApiError::internal("no result"))
    }

    /// Loads the images of `params`, prepares one job per ticket (seeds `seed`, `seed + 1`, ...),
    /// runs them as one group in the batcher and encodes the results, in order.
    async fn run(
        &self,
        tickets: Vec<Ticket>,
        model: &LoadedModel,
        params: EditParams,
        started: Instant,
    ) -> Result<Vec<EditResponse>, ApiError> {
        let EditParams {
            prompt,
            negative_prompt,
            images,
            num_inference_steps,
            true_cfg_scale,
            seed,
            width,
            height,
            output_format,
        } = params;
        let n = tickets.len() as u64;
        if seed.checked_add(n.saturating_sub(1)).is_none() {
            return Err(ApiError::validation(format!("seed {seed} + {} does not fit in 64 bits; use a smaller seed", n - 1)));
        }
        let images = images::load_images(images, &self.fetcher, &self.paths, self.image_limits, &self.cpu).await?;
        let mut jobs = Vec::with_capacity(tickets.len());
        for i in 0..n {
            let request = EditRequest {
                images: images.clone(),
                prompt: prompt.clone(),
                negative_prompt: negative_prompt.clone(),
                num_inference_steps,
                true_cfg_scale,
                seed: seed + i,
                width,
                height,
                lightning: self.settings.lightning,
                noise: None,
            };
            let pre = model.preprocessor.clone();
            jobs.push(images::blocking(&self.cpu, move || pre.prepare(request).map_err(ApiError::from)).await?);
        }
        let preprocess = started.elapsed();

        let key = jobs.first().ok_or_else(|| ApiError::internal("an edit without a job"))?.key().clone();
        let mut responses = Vec::with_capacity(jobs.len());
        for rx in self.batcher.submit_group(tickets, key, jobs) {
            let done = rx
                .await
                .map_err(|_| ApiError::internal("the batcher stopped before this job ran; retry the request"))?
                .map_err(ApiError::from)?;
            let encode_start = Instant::now();
            let out = done.output;
            let (image, width, height) = (out.image, out.width, out.height);
            let encoded =
                images::blocking(&self.cpu, move || Ok(images::encode_base64(&imaging::encode(&image, output_format)?))).await?;
            responses.push(EditResponse {
                image: encoded,
                prompt: prompt.clone(),
                num_inference_steps: out.steps,
                lightning_enabled: out.lightning,
                seed: out.seed,
                width,
                height,
                true_cfg_scale,
                output_format: schema::format_name(output_format),
                timings: Timings {
                    preprocess_ms: ms(preprocess),
                    queue_ms: ms(done.queue_time),
                    compute_ms: ms(done.compute_time),
                    encode_ms: ms(encode_start.elapsed()),
                    batch_size: done.batch_size,
                },
            });
        }
        Ok(responses)
    }
}

fn ms(d: Duration) -> f64 {
    (d.as_secs_f64() * 1e6).round() / 1e3
}

/// A service whose model is opened by `open` on the engine worker thread, as in production (for
/// unit tests of the front ends).
#[cfg(test)]
pub(crate) fn test_service(
    settings: Settings,
    open: impl FnOnce() -> Result<(model::BatchFn, model::Loaded), String> + Send + 'static,
) -> Arc<EditService> {
    let metrics = Arc::new(Metrics::new(settings.batch_size));
    let policy =
        BatchPolicy { batch_size: settings.batch_size, batch_timeout: settings.batch_timeout, max_queue: settings.max_queue };
    let (batcher, _loaded, _finished) = Batcher::start(policy, metrics.clone(), open).expect("worker thread");
    Arc::new(EditService {
        phase: watch::channel(Phase::Loading).0,
        model: OnceLock::new(),
        batcher,
        metrics,
        fetcher: Fetcher::new(FetchPolicy::default()).expect("tls"),
        paths: PathPolicy::default(),
        cpu: Semaphore::new(2),
        image_limits: imaging::Limits::default(),
        gpu_available: false,
        gpu_reason: "test".into(),
        settings,
    })
}

/// Sets the phase (route unit tests walk a service through its phases).
#[cfg(test)]
pub(crate) fn set_phase(service: &EditService, phase: Phase) {
    service.phase.send_replace(phase);
}
