//! `qwen-edit serve`: the hyper 1 HTTP server (RunPod-style API), its start-up and shutdown.
//! Knows HTTP only (routes, auth, bodies, statuses); every edit goes to the `service`.
//!
//! Lifecycle: `Server::start` binds the port and answers at once (`/health` says `loading`, `/run`
//! 503) while the engine worker thread opens the bundle; then `ready`. `Server::shutdown` (the CLI
//! calls it on SIGTERM/SIGINT) closes the listener (new connections are refused), turns `/health`
//! to `draining`, lets in-flight requests and every queued job finish (keep-alive connections close
//! after their current response; connections with no request in flight close at once, see
//! `conn`; /v2 jobs still queued fail with `not_ready`, running ones finish and their webhooks are
//! sent), stops the engine worker, and `Server::wait` reports whether all of that happened within
//! `SHUTDOWN_TIMEOUT`. At most `MAX_CONNECTIONS` connections are open at once; a response a client
//! does not read for `RESPONSE_WRITE_TIMEOUT` closes its connection.

mod conn;
mod openai;
pub mod openapi;
mod routes;
mod v2;
mod wire;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Instant;

use hyper::server::conn::http1;
use hyper_util::rt::TokioTimer;
use sha2::{Digest, Sha256};
use tokio::net::TcpListener;
use tokio::sync::{watch, Semaphore};

use crate::config::{ServeArgs, Settings};
use crate::lifecycle::{init_logging, shutdown_signal};
use crate::metrics::Metrics;
use crate::service::jobs::JobStore;
use crate::service::{EditService, Phase, StartError};

/// Errors of starting or running the server.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("cannot listen on {addr}: {source} (is another server on that port? set API_PORT)")]
    Bind { addr: SocketAddr, source: std::io::Error },
    #[error(transparent)]
    Start(#[from] StartError),
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

/// Shared by every connection: the edit service and what only HTTP needs.
pub struct AppState {
    service: Arc<EditService>,
    /// The async jobs of the /v2 layout.
    jobs: Arc<JobStore>,
    api_key_digest: Option<[u8; 32]>,
    started: Instant,
    open_connections: AtomicUsize,
}

impl AppState {
    fn new(service: Arc<EditService>) -> Result<AppState, String> {
        let api_key_digest = service.settings().api_key.as_deref().map(digest);
        let jobs = JobStore::start(service.clone())?;
        Ok(AppState { service, jobs, api_key_digest, started: Instant::now(), open_connections: AtomicUsize::new(0) })
    }
    fn connections(&self) -> usize {
        self.open_connections.load(Ordering::Relaxed)
    }
    fn settings(&self) -> &Settings {
        self.service.settings()
    }
}

fn digest(s: &str) -> [u8; 32] {
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
        let metrics = Arc::new(Metrics::new(settings.batch_size));
        let (service, finished) = EditService::start(settings, metrics.clone()).await?;
        let state = Arc::new(AppState::new(service.clone()).map_err(ServeError::Setup)?);
        let (stop, stop_rx) = watch::channel(false);

        // A model that fails to load stops the server.
        let mut phase = service.subscribe();
        let stop_on_failure = stop.clone();
        tokio::spawn(async move {
            if phase.wait_for(|p| matches!(p, Phase::Failed(_))).await.is_ok() {
                stop_on_failure.send_replace(true);
            }
        });

        // Histogram samples are drained into buckets even when nobody scrapes.
        let mut upkeep_stop = stop_rx.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(std::time::Duration::from_secs(5));
            loop {
                tokio::select! {
                    _ = tick.tick() => metrics.upkeep(),
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
        self.state.service.phase()
    }

    /// Waits until the model is loaded (Ok) or failed to load (Err).
    pub async fn ready(&self) -> Result<(), ServeError> {
        self.state.service.ready().await.map_err(ServeError::Load)
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
    let mut builder = http1::Builder::new();
    builder.timer(TokioTimer::new()).header_read_timeout(state.settings().header_read_timeout).keep_alive(true);
    let max = state.settings().max_connections;
    let slots = Arc::new(Semaphore::new(max));
    let (drain_tx, drain_rx) = watch::channel(false);
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
                match slots.clone().try_acquire_owned() {
                    Ok(slot) => {
                        tokio::spawn(conn::serve(stream, peer, slot, state.clone(), builder.clone(), drain_rx.clone()));
                    }
                    Err(_) => {
                        tracing::warn!(%peer, max, "connection refused: MAX_CONNECTIONS are open");
                        conn::refuse(stream);
                    }
                }
            }
            changed = stop.changed() => {
                if changed.is_err() || *stop.borrow() {
                    break;
                }
            }
        }
    }
    drop(listener); // from here on, new connections are refused
    let service = &state.service;
    let failed = match service.phase() {
        Phase::Failed(e) => Some(e),
        _ => None,
    };
    if failed.is_none() {
        service.drain();
        tracing::info!(queued = service.queue_depth(), "shutting down: finishing in-flight requests and queued jobs");
    }
    let _ = drain_tx.send(true);
    state.jobs.close();
    let deadline = tokio::time::Instant::now() + service.settings().shutdown_timeout;
    // Every connection gives its slot back when it ends.
    let connections_done = tokio::time::timeout_at(deadline, slots.acquire_many(max as u32)).await.is_ok();
    let jobs_drained = tokio::time::timeout_at(deadline, state.jobs.drained()).await.is_ok();
    service.close();
    let jobs_done = tokio::time::timeout_at(deadline, finished).await.is_ok();
    if let Some(e) = failed {
        return Err(ServeError::Load(e));
    }
    if connections_done && jobs_drained && jobs_done {
        tracing::info!("shutdown complete");
        Ok(Drain::Clean)
    } else {
        tracing::warn!(
            timeout_s = service.settings().shutdown_timeout.as_secs_f64(),
            "shutdown timed out (SHUTDOWN_TIMEOUT) with requests still running; exiting anyway"
        );
        Ok(Drain::TimedOut)
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_digest_is_fixed_length_and_distinct() {
        assert_ne!(digest("a"), digest("b"));
        assert_eq!(digest("secret"), digest("secret"));
    }
}
