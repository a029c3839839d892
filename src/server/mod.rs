//! `qwen-edit serve`: the hyper 1 HTTP server (RunPod-style API), its state, start-up and shutdown.
//! Knows HTTP, JSON and images; hands prepared jobs to the `batcher`, never touches tensors.
//!
//! Lifecycle: `Server::start` binds the port and answers at once (`/health` says `loading`, `/run`
//! 503) while the engine worker thread opens the bundle; then `ready`. `Server::shutdown` (the CLI
//! calls it on SIGTERM/SIGINT) closes the listener (new connections are refused), turns `/health`
//! to `draining`, lets in-flight requests and every queued job finish (keep-alive connections close
//! after their current response), stops the engine worker, and `Server::wait` reports whether all
//! of that happened within `SHUTDOWN_TIMEOUT`.

pub mod error;
pub mod fetch;
pub mod input;
mod model;
mod routes;
pub mod schema;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Instant;

use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use sha2::{Digest, Sha256};
use tokio::net::TcpListener;
use tokio::sync::{watch, Semaphore};

use crate::batcher::{BatchPolicy, Batcher};
use crate::config::{LogFormat, ServeArgs, Settings};
use crate::imaging;
use crate::metrics::Metrics;
use crate::pipeline::edit::{EditOutput, Prepared, Preprocessor};
use fetch::{FetchPolicy, Fetcher};
pub use model::ModelInfo;

/// Where the server is in its life.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Phase {
    Loading,
    Ready,
    Draining,
    Failed(String),
}

/// Errors of starting or running the server.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("cannot listen on {addr}: {source} (is another server on that port? set API_PORT)")]
    Bind { addr: SocketAddr, source: std::io::Error },
    #[error("cannot start the engine worker thread: {0}")]
    Worker(std::io::Error),
    #[error("{0}")]
    Load(String),
    #[error("{0}")]
    Setup(String),
}

/// How a shutdown went.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Drain {
    /// Every in-flight request and queued job finished.
    Clean,
    /// `SHUTDOWN_TIMEOUT` passed first; what was left was abandoned.
    TimedOut,
}

pub(crate) struct LoadedModel {
    info: ModelInfo,
    preprocessor: Preprocessor,
    limits: schema::Limits,
}

/// Shared by every connection.
pub struct AppState {
    settings: Settings,
    phase: watch::Sender<Phase>,
    model: OnceLock<LoadedModel>,
    batcher: Batcher<Prepared, EditOutput>,
    metrics: Arc<Metrics>,
    fetcher: Fetcher,
    /// Bounds concurrent CPU work (JSON parse, base64, decode, prepare, encode) to the core count.
    cpu: Semaphore,
    image_limits: imaging::Limits,
    api_key_digest: Option<[u8; 32]>,
    gpu_available: bool,
    gpu_reason: String,
    started: Instant,
    ids: AtomicU64,
}

impl AppState {
    pub fn phase(&self) -> Phase {
        self.phase.borrow().clone()
    }
    fn set_phase(&self, p: Phase) {
        self.phase.send_replace(p);
    }
    fn next_request_id(&self) -> u64 {
        self.ids.fetch_add(1, Ordering::Relaxed)
    }
}

pub(crate) fn digest(s: &str) -> [u8; 32] {
    Sha256::digest(s.as_bytes()).into()
}

/// A running server.
pub struct Server {
    addr: SocketAddr,
    state: Arc<AppState>,
    stop: watch::Sender<bool>,
    task: tokio::task::JoinHandle<Result<Drain, ServeError>>,
}

impl Server {
    /// Binds `settings.addr` and starts serving; the model loads in the background.
    pub async fn start(settings: Settings) -> Result<Server, ServeError> {
        let listener =
            TcpListener::bind(settings.addr).await.map_err(|source| ServeError::Bind { addr: settings.addr, source })?;
        let addr = listener.local_addr().map_err(|source| ServeError::Bind { addr: settings.addr, source })?;

        let probe = tokio::task::spawn_blocking(crate::runtime::backend::GpuProbe::detect)
            .await
            .map_err(|e| ServeError::Setup(format!("GPU probe: {e}")))?;
        let (gpu_available, gpu_reason) = match probe.gpu_ready() {
            Ok(what) => (true, format!("loading the model; GPU: {what}")),
            Err(why) => (false, format!("loading the model; no GPU backend: {why}")),
        };

        let metrics = Arc::new(Metrics::new(settings.batch_size));
        metrics.set_ready(false);
        let policy =
            BatchPolicy { batch_size: settings.batch_size, batch_timeout: settings.batch_timeout, max_queue: settings.max_queue };
        let open_settings = settings.clone();
        let (batcher, loaded, finished) =
            Batcher::start(policy, metrics.clone(), move || model::open(&open_settings)).map_err(ServeError::Worker)?;
        let fetcher = Fetcher::new(FetchPolicy {
            private: settings.private_urls.clone(),
            max_bytes: settings.url_max_bytes,
            total_timeout: settings.url_timeout,
            connect_timeout: settings.url_connect_timeout,
            retries: settings.url_retries,
            ..FetchPolicy::default()
        })
        .map_err(ServeError::Setup)?;
        let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
        let image_limits = imaging::Limits {
            max_width: settings.max_image_side,
            max_height: settings.max_image_side,
            max_pixels: settings.max_image_pixels,
        };
        let state = Arc::new(AppState {
            phase: watch::channel(Phase::Loading).0,
            model: OnceLock::new(),
            batcher,
            metrics: metrics.clone(),
            fetcher,
            cpu: Semaphore::new(cores),
            image_limits,
            api_key_digest: settings.api_key.as_deref().map(digest),
            gpu_available,
            gpu_reason,
            started: Instant::now(),
            ids: AtomicU64::new(1),
            settings,
        });
        let (stop, stop_rx) = watch::channel(false);

        // Model loading finishes in the background.
        let st = state.clone();
        let stop_on_failure = stop.clone();
        tokio::spawn(async move {
            match loaded.await {
                Ok(Ok(l)) => {
                    let info = l.info;
                    let limits = schema::Limits {
                        default_steps: info.default_steps,
                        default_true_cfg_scale: info.default_true_cfg_scale,
                        max_images: info.max_images,
                        max_prompt_chars: st.settings.max_prompt_chars,
                        max_output_side: st.settings.max_output_side,
                    };
                    st.metrics.set_info(&[
                        ("bundle", info.bundle.clone()),
                        ("variant", info.variant.clone()),
                        ("backend", info.backend.clone()),
                    ]);
                    tracing::info!(bundle = %info.bundle, variant = %info.variant, backend = %info.backend, reason = %info.backend_reason, "model ready");
                    if st.settings.lightning && !info.lightning_fused {
                        tracing::warn!("USE_LIGHTNING_LORA is on but the bundle has no Lightning LoRA fused: the Lightning schedule runs with the base weights");
                    }
                    let _ = st.model.set(LoadedModel { info, preprocessor: l.preprocessor, limits });
                    if st.phase() == Phase::Loading {
                        st.set_phase(Phase::Ready);
                        st.metrics.set_ready(true);
                    }
                }
                Ok(Err(e)) => {
                    tracing::error!("{e}");
                    st.set_phase(Phase::Failed(e));
                    stop_on_failure.send_replace(true);
                }
                Err(_) => {
                    let e = "the engine worker ended while loading the model".to_string();
                    tracing::error!("{e}");
                    st.set_phase(Phase::Failed(e));
                    stop_on_failure.send_replace(true);
                }
            }
        });

        // Histogram samples are drained into buckets even when nobody scrapes.
        let m = metrics.clone();
        let mut upkeep_stop = stop_rx.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(std::time::Duration::from_secs(5));
            loop {
                tokio::select! {
                    _ = tick.tick() => m.upkeep(),
                    _ = upkeep_stop.changed() => return,
                }
            }
        });

        tracing::info!("listening on http://{addr}");
        let task = tokio::spawn(serve(listener, state.clone(), stop_rx, finished));
        Ok(Server { addr, state, stop, task })
    }

    /// The bound address (the real port when `API_PORT` was 0).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn phase(&self) -> Phase {
        self.state.phase()
    }

    /// Waits until the model is loaded (Ok) or failed to load (Err).
    pub async fn ready(&self) -> Result<(), ServeError> {
        let mut rx = self.state.phase.subscribe();
        let p = rx
            .wait_for(|p| !matches!(p, Phase::Loading))
            .await
            .map(|p| p.clone())
            .map_err(|_| ServeError::Load("the server stopped while loading".into()))?;
        match p {
            Phase::Failed(e) => Err(ServeError::Load(e)),
            _ => Ok(()),
        }
    }

    /// Begins a graceful shutdown (idempotent).
    pub fn shutdown(&self) {
        self.stop.send_replace(true);
    }

    /// Waits for the server to stop (after `shutdown`, or by itself when the model failed to load).
    pub async fn wait(self) -> Result<Drain, ServeError> {
        match self.task.await {
            Ok(r) => r,
            Err(e) => Err(ServeError::Setup(format!("the server task failed: {e}"))),
        }
    }

    /// `wait` as a borrowed future that can be raced against signals.
    pub fn task(&mut self) -> &mut tokio::task::JoinHandle<Result<Drain, ServeError>> {
        &mut self.task
    }
}

async fn serve(
    listener: TcpListener,
    state: Arc<AppState>,
    mut stop: watch::Receiver<bool>,
    finished: crate::batcher::Finished,
) -> Result<Drain, ServeError> {
    let graceful = GracefulShutdown::new();
    let mut builder = http1::Builder::new();
    builder.timer(TokioTimer::new()).header_read_timeout(state.settings.header_read_timeout).keep_alive(true);
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let (stream, peer) = match accepted {
                    Ok(c) => c,
                    Err(e) => {
                        // EMFILE and friends: back off briefly instead of spinning.
                        tracing::warn!("accept failed: {e}");
                        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let _ = stream.set_nodelay(true);
                let st = state.clone();
                let svc = service_fn(move |req| {
                    let st = st.clone();
                    async move { Ok::<_, Infallible>(routes::handle(st, req).await) }
                });
                let conn = graceful.watch(builder.serve_connection(TokioIo::new(stream), svc));
                tokio::spawn(async move {
                    if let Err(e) = conn.await {
                        tracing::debug!(%peer, "connection ended: {e}");
                    }
                });
            }
            changed = stop.changed() => {
                if changed.is_err() || *stop.borrow() {
                    break;
                }
            }
        }
    }
    drop(listener); // from here on, new connections are refused
    let failed = match state.phase() {
        Phase::Failed(e) => Some(e),
        _ => None,
    };
    if failed.is_none() {
        state.set_phase(Phase::Draining);
        state.metrics.set_ready(false);
        tracing::info!(queued = state.batcher.depth(), "shutting down: finishing in-flight requests and queued jobs");
    }
    let deadline = tokio::time::Instant::now() + state.settings.shutdown_timeout;
    let connections_done = tokio::time::timeout_at(deadline, graceful.shutdown()).await.is_ok();
    state.batcher.close();
    let jobs_done = tokio::time::timeout_at(deadline, finished).await.is_ok();
    if let Some(e) = failed {
        return Err(ServeError::Load(e));
    }
    if connections_done && jobs_done {
        tracing::info!("shutdown complete");
        Ok(Drain::Clean)
    } else {
        tracing::warn!(
            timeout_s = state.settings.shutdown_timeout.as_secs_f64(),
            "shutdown timed out (SHUTDOWN_TIMEOUT) with requests still running; exiting anyway"
        );
        Ok(Drain::TimedOut)
    }
}

/// Sets up `tracing` (RUST_LOG filter, default `info`) in text or JSON, on stderr.
pub fn init_logging(format: LogFormat) {
    let filter =
        tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_ansi(ansi);
    let _ = match format {
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
        LogFormat::Text => builder.try_init(),
    };
}

async fn shutdown_signal() -> &'static str {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match (signal(SignalKind::terminate()), signal(SignalKind::interrupt())) {
            (Ok(mut term), Ok(mut int)) => tokio::select! {
                _ = term.recv() => "SIGTERM",
                _ = int.recv() => "SIGINT",
            },
            _ => {
                let _ = tokio::signal::ctrl_c().await;
                "Ctrl-C"
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
        "Ctrl-C"
    }
}

/// `qwen-edit serve`: exit code 0 after a clean shutdown, 1 on a load/bind failure or a shutdown
/// that timed out, 2 for invalid settings. A second signal during the drain exits at once (130).
pub fn main_serve(args: &ServeArgs) -> u8 {
    let settings = match Settings::from_args(args) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("qwen-edit serve: {e}");
            return 2;
        }
    };
    init_logging(settings.log_format);
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().thread_name("qwen-edit-http").build() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("qwen-edit serve: cannot start the async runtime: {e}");
            return 1;
        }
    };
    let code = runtime.block_on(async move {
        let mut server = match Server::start(settings).await {
            Ok(s) => s,
            Err(e) => {
                tracing::error!("{e}");
                return 1;
            }
        };
        let result = tokio::select! {
            r = server.task() => r.unwrap_or_else(|e| Err(ServeError::Setup(e.to_string()))),
            sig = shutdown_signal() => {
                tracing::info!("{sig} received");
                server.shutdown();
                tokio::select! {
                    r = server.task() => r.unwrap_or_else(|e| Err(ServeError::Setup(e.to_string()))),
                    sig = shutdown_signal() => {
                        tracing::warn!("{sig} received again: exiting without waiting");
                        return 130;
                    }
                }
            }
        };
        match result {
            Ok(Drain::Clean) => 0,
            Ok(Drain::TimedOut) => 1,
            Err(ServeError::Load(_)) => 1, // already logged by the loader
            Err(e) => {
                tracing::error!("{e}");
                1
            }
        }
    });
    // Blocking-pool threads that still decode for abandoned requests must not hold the exit.
    runtime.shutdown_timeout(std::time::Duration::from_secs(1));
    code
}

/// An AppState for route unit tests: `open` runs on the engine worker thread as in production.
#[cfg(test)]
pub(crate) fn test_state(
    settings: Settings,
    open: impl FnOnce() -> Result<(model::PipelineRunner, model::Loaded), String> + Send + 'static,
) -> Arc<AppState> {
    let metrics = Arc::new(Metrics::new(settings.batch_size));
    let policy =
        BatchPolicy { batch_size: settings.batch_size, batch_timeout: settings.batch_timeout, max_queue: settings.max_queue };
    let (batcher, _loaded, _finished) = Batcher::start(policy, metrics.clone(), open).expect("worker thread");
    Arc::new(AppState {
        phase: watch::channel(Phase::Loading).0,
        model: OnceLock::new(),
        batcher,
        metrics,
        fetcher: Fetcher::new(FetchPolicy::default()).expect("tls"),
        cpu: Semaphore::new(2),
        image_limits: imaging::Limits::default(),
        api_key_digest: settings.api_key.as_deref().map(digest),
        gpu_available: false,
        gpu_reason: "test".into(),
        started: Instant::now(),
        ids: AtomicU64::new(1),
        settings,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_digest_is_fixed_length_and_distinct() {
        assert_ne!(digest("a"), digest("b"));
        assert_eq!(digest("secret"), digest("secret"));
    }
}
