//! What the long-running commands (`serve`, `worker`) share about their process: logging set-up,
//! the allocator's tuning and the shutdown signals.

use crate::config::LogFormat;

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

/// Buffers at least this large (images, tensors, bodies) are mapped on their own and go back to the
/// system when freed.
const MMAP_THRESHOLD: i32 = 128 * 1024;

/// Keeps resident memory flat under repeated bursts. glibc raises its mmap threshold each time a
/// mapped buffer is freed (up to 32 MiB), after which every request's large buffers come from the heap
/// and fragment it: resident memory then creeps up by megabytes per burst with nothing leaked.
/// Setting the threshold turns that adjustment off. `MALLOC_MMAP_THRESHOLD_` in the environment
/// (glibc's own tunable) wins.
pub fn tune_allocator() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    if std::env::var_os("MALLOC_MMAP_THRESHOLD_").is_none() {
        // SAFETY: mallopt only sets a parameter of the allocator; called before the runtime starts.
        unsafe { libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD) };
    }
}

/// Completes on the first SIGTERM or SIGINT (Ctrl-C elsewhere) and names it.
pub async fn shutdown_signal() -> &'static str {
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
