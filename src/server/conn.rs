//! One HTTP connection: hyper over a socket whose writes time out (`RESPONSE_WRITE_TIMEOUT`), the
//! count of requests in flight on it, and its part in the drain: on shutdown it finishes a request
//! in flight and writes its response, and is closed at once when it has none (idle, a half-sent
//! request head, a client that does not read its response).
//!
//! Half-closed clients (`shutdown(SHUT_WR)` after a complete request) still get their response:
//! only a reset or a failed write means the client is gone. hyper's own `half_close` cannot do that
//! (with it on, hyper stops reading while a request runs and so never sees a reset either; with it
//! off, an end of stream drops the request), so the socket wrapper here keeps the end of stream from
//! hyper: after it, reads wait while the socket is checked for a reset every
//! [`RESET_POLL`] (a reset fails the read: hyper drops the request, which cancels its work), and the
//! connection is closed once no request is in flight and its last response is written. A client
//! that closes its socket entirely (FIN, no reset) looks the same as one that half-closes until the
//! server writes to it; its request runs to the end and the write fails.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::{watch, OwnedSemaphorePermit};
use tokio::time::Sleep;

use super::{routes, AppState};

/// A connection whose writes make no progress this long after the drain began, with no request
/// in flight, is closed.
const QUIET: Duration = Duration::from_millis(500);

/// How often a half-closed connection's socket is checked for a reset.
const RESET_POLL: Duration = Duration::from_millis(200);

/// What a connection is doing, for the drain.
struct Activity {
    born: Instant,
    in_flight: AtomicUsize,
    /// Milliseconds after `born` of the last write that made progress, plus one (0: none yet).
    last_write_ms: AtomicU64,
    /// The client has half-closed (end of stream read, kept from hyper).
    eof: AtomicBool,
    /// The last write or flush could not proceed (the client is not reading).
    write_blocked: AtomicBool,
}

impl Activity {
    fn wrote(&self) {
        self.last_write_ms.store(self.born.elapsed().as_millis() as u64 + 1, Ordering::Relaxed);
    }

    /// Since the last write that made progress (since the connection opened if none did).
    fn since_write(&self) -> Duration {
        let at = self.last_write_ms.load(Ordering::Relaxed).saturating_sub(1);
        self.born.elapsed().saturating_sub(Duration::from_millis(at))
    }

    /// A request is in flight or its response is being written (a write is blocked, or one made
    /// progress within `RESET_POLL`): an end of stream now is a half-close to be answered.
    fn busy(&self) -> bool {
        self.in_flight.load(Ordering::Acquire) > 0
            || self.write_blocked.load(Ordering::Acquire)
            || (self.last_write_ms.load(Ordering::Relaxed) != 0 && self.since_write() < RESET_POLL)
    }

    /// No request in flight and no write progress for `QUIET`.
    fn quiet(&self) -> bool {
        self.in_flight.load(Ordering::Acquire) == 0 && self.since_write() >= QUIET
    }

    /// A half-closed client whose every response is written: nothing more can happen.
    fn finished(&self) -> bool {
        self.eof.load(Ordering::Acquire) && !self.busy()
    }
}

/// Counts a request in flight while it lives (its handler runs).
struct InFlight(Arc<Activity>);

impl InFlight {
    fn new(a: &Arc<Activity>) -> InFlight {
        a.in_flight.fetch_add(1, Ordering::AcqRel);
        InFlight(a.clone())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.wrote(); // the response is about to be written: give it QUIET to start
        self.0.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

/// A socket whose writes fail with `TimedOut` after `timeout` without progress, and whose end of
/// stream is kept from hyper (see the module docs).
struct TimedIo {
    inner: TcpStream,
    timeout: Duration,
    stalled: Option<Pin<Box<Sleep>>>,
    /// After the end of stream: when to look for a reset next.
    reset_check: Option<Pin<Box<Sleep>>>,
    activity: Arc<Activity>,
}

impl TimedIo {
    fn progress<T>(&mut self, r: Poll<io::Result<T>>, cx: &mut Context<'_>, wrote: bool) -> Poll<io::Result<T>> {
        match r {
            Poll::Ready(r) => {
                self.stalled = None;
                self.activity.write_blocked.store(false, Ordering::Release);
                if wrote && r.is_ok() {
                    self.activity.wrote();
                }
                Poll::Ready(r)
            }
            Poll::Pending => {
                self.activity.write_blocked.store(true, Ordering::Release);
                let timeout = self.timeout;
                let sleep = self.stalled.get_or_insert_with(|| Box::pin(tokio::time::sleep(timeout)));
                match sleep.as_mut().poll(cx) {
                    Poll::Ready(()) => Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        "the client read nothing for RESPONSE_WRITE_TIMEOUT",
                    ))),
                    Poll::Pending => Poll::Pending,
                }
            }
        }
    }
}

impl TimedIo {
    /// A read after the end of stream: waits, looking for a reset every `RESET_POLL`.
    fn poll_half_closed(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        loop {
            let check = self.reset_check.get_or_insert_with(|| Box::pin(tokio::time::sleep(RESET_POLL)));
            if check.as_mut().poll(cx).is_pending() {
                return Poll::Pending;
            }
            self.reset_check = None;
            match self.inner.take_error() {
                Ok(None) => continue, // re-arm the timer
                Ok(Some(e)) | Err(e) => return Poll::Ready(Err(e)),
            }
        }
    }
}

impl AsyncRead for TimedIo {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        if self.activity.eof.load(Ordering::Acquire) {
            return self.poll_half_closed(cx);
        }
        let before = buf.filled().len();
        match Pin::new(&mut self.inner).poll_read(cx, buf) {
            Poll::Ready(Ok(())) if buf.filled().len() == before && buf.remaining() > 0 && self.activity.busy() => {
                // The end of stream while a request runs: a half-close (or a close, not to be told
                // apart before a write). Idle connections see theirs and close at once.
                self.activity.eof.store(true, Ordering::Release);
                self.poll_half_closed(cx)
            }
            r => r,
        }
    }
}

impl AsyncWrite for TimedIo {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write(cx, buf);
        self.progress(r, cx, true)
    }

    fn poll_write_vectored(mut self: Pin<&mut Self>, cx: &mut Context<'_>, bufs: &[io::IoSlice<'_>]) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        self.progress(r, cx, true)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let r = Pin::new(&mut self.inner).poll_flush(cx);
        self.progress(r, cx, false)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let r = Pin::new(&mut self.inner).poll_shutdown(cx);
        self.progress(r, cx, false)
    }
}

/// Counts an open connection in `AppState` while it lives.
struct Open(Arc<AppState>);

impl Drop for Open {
    fn drop(&mut self) {
        self.0.open_connections.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Serves one accepted connection until it ends, or until the drain closes it (see the module docs).
/// `slot` is its place under `MAX_CONNECTIONS`.
pub(super) async fn serve(
    stream: TcpStream,
    peer: std::net::SocketAddr,
    slot: OwnedSemaphorePermit,
    state: Arc<AppState>,
    builder: http1::Builder,
    mut drain: watch::Receiver<bool>,
) {
    let _slot = slot;
    state.open_connections.fetch_add(1, Ordering::Relaxed);
    let _open = Open(state.clone());
    let activity = Arc::new(Activity {
        born: Instant::now(),
        in_flight: AtomicUsize::new(0),
        last_write_ms: AtomicU64::new(0),
        eof: AtomicBool::new(false),
        write_blocked: AtomicBool::new(false),
    });
    let io = TimedIo {
        inner: stream,
        timeout: state.settings().response_write_timeout,
        stalled: None,
        reset_check: None,
        activity: activity.clone(),
    };
    let (st, act) = (state.clone(), activity.clone());
    let svc = service_fn(move |req| {
        let (st, guard) = (st.clone(), InFlight::new(&act));
        async move {
            let response = routes::handle(st, req).await;
            drop(guard);
            Ok::<_, std::convert::Infallible>(response)
        }
    });
    let conn = builder.serve_connection(TokioIo::new(io), svc);
    let mut conn = std::pin::pin!(conn);
    let mut tick = tokio::time::interval(RESET_POLL);
    loop {
        tokio::select! {
            r = conn.as_mut() => {
                if let Err(e) = r {
                    tracing::debug!(%peer, "connection ended: {e}");
                }
                return;
            }
            _ = drain.wait_for(|d| *d) => break,
            _ = tick.tick() => {
                if activity.finished() {
                    tracing::debug!(%peer, "the half-closed client has its responses: closing");
                    return;
                }
            }
        }
    }
    conn.as_mut().graceful_shutdown();
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    loop {
        tokio::select! {
            _ = conn.as_mut() => return,
            _ = tick.tick() => {
                if activity.quiet() {
                    tracing::debug!(%peer, "closing a connection with no request in flight for the shutdown");
                    return;
                }
            }
        }
    }
}

/// The answer to a connection over `MAX_CONNECTIONS`, written without waiting (no request is read,
/// so its `X-Request-ID` is a new one), then closed.
pub(super) fn refuse(stream: TcpStream) {
    const BODY: &str = r#"{"error":"too many open connections (MAX_CONNECTIONS); retry shortly","error_type":"overloaded"}"#;
    let id = crate::service::jobs::new_id(crate::service::jobs::Kind::Async);
    let response = format!(
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\nretry-after: 1\r\nx-request-id: {id}\r\nconnection: close\r\ncontent-length: {}\r\n\r\n{BODY}",
        BODY.len()
    );
    let _ = stream.try_write(response.as_bytes());
}
