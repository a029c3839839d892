//! The routes: `POST /run` and `/runsync` (one edit), `GET /health`, `GET /metrics`; every response
//! gets `X-Process-Time` (milliseconds) and a log line, slow ones a warning.

use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use http::{header, HeaderMap, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use subtle::ConstantTimeEq;

use super::AppState;
use crate::metrics::Metrics;
use crate::service::{ApiError, Phase};

pub type Body = Full<Bytes>;
type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Serves one request.
pub async fn handle<B>(state: Arc<AppState>, req: Request<B>) -> Response<Body>
where
    B: hyper::body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    let started = Instant::now();
    let id = state.next_request_id();
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    let mut response = match (&method, path.as_str()) {
        (&Method::GET, "/health") => health(&state),
        (&Method::GET, "/metrics") => metrics(&state),
        (&Method::POST, "/run" | "/runsync") => run(&state, req, started).await,
        (_, "/health" | "/metrics") => method_not_allowed("GET"),
        (_, "/run" | "/runsync") => method_not_allowed("POST"),
        _ => error_response(&ApiError::new(
            StatusCode::NOT_FOUND,
            "not_found",
            format!("no route {path}; the API is POST /run, POST /runsync, GET /health and GET /metrics"),
        )),
    };
    let elapsed = started.elapsed();
    let ms = elapsed.as_secs_f64() * 1000.0;
    if let Ok(v) = HeaderValue::from_str(&format!("{ms:.3}")) {
        response.headers_mut().insert("x-process-time", v);
    }
    let status = response.status().as_u16();
    if elapsed >= state.settings().slow_request && path != "/health" && path != "/metrics" {
        tracing::warn!(request_id = id, %method, path, status, ms, "slow request");
    } else if path == "/health" || path == "/metrics" {
        tracing::debug!(request_id = id, %method, path, status, ms, "request");
    } else {
        tracing::info!(request_id = id, %method, path, status, ms, "request");
    }
    response
}

fn json_response(status: StatusCode, body: Vec<u8>) -> Response<Body> {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    r.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    r
}

/// The JSON error response, with `Retry-After` / `WWW-Authenticate` where they belong.
pub fn error_response(e: &ApiError) -> Response<Body> {
    let mut r = json_response(e.status, e.body().into_bytes());
    if let Some(after) = e.retry_after {
        let secs = after.as_secs_f64().ceil().max(1.0) as u64;
        r.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(secs));
    }
    if e.status == StatusCode::UNAUTHORIZED {
        r.headers_mut().insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
    }
    r
}

fn method_not_allowed(allow: &'static str) -> Response<Body> {
    let mut r = error_response(&ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        format!("use {allow} on this route"),
    ));
    r.headers_mut().insert(header::ALLOW, HeaderValue::from_static(allow));
    r
}

fn health(state: &AppState) -> Response<Body> {
    let st = state.service.status();
    let (code, status) = match &st.phase {
        Phase::Ready => (StatusCode::OK, "ready"),
        Phase::Loading => (StatusCode::SERVICE_UNAVAILABLE, "loading"),
        Phase::Draining => (StatusCode::SERVICE_UNAVAILABLE, "draining"),
        Phase::Failed(_) => (StatusCode::SERVICE_UNAVAILABLE, "failed"),
    };
    let s = state.settings();
    let model = st.model.as_ref();
    let mut body = serde_json::json!({
        "status": status,
        "gpu_available": st.gpu_available,
        "backend": model.map_or_else(|| format!("{:?}", s.backend).to_lowercase(), |m| m.backend.clone()),
        "backend_reason": st.backend_reason,
        "denoise_loop": model.map(|m| m.denoise_loop.clone()),
        "queue_depth": st.queue_depth,
        "max_queue": s.max_queue,
        "batch_size": s.batch_size,
        "batch_timeout_ms": s.batch_timeout.as_millis() as u64,
        "bundle": s.bundle.display().to_string(),
        "lightning_enabled": s.lightning,
        "precision": model.map(|m| m.precision.clone()),
        "precision_mode": s.precision,
        "uptime_seconds": state.started.elapsed().as_secs_f64(),
        "version": env!("CARGO_PKG_VERSION"),
    });
    if let (Some(m), Some(obj)) = (model, body.as_object_mut()) {
        obj.insert(
            "model".into(),
            serde_json::json!({
                "name": m.name,
                "variant": m.variant,
                "max_images": m.max_images,
                "default_steps": m.default_steps,
                "default_true_cfg_scale": m.default_true_cfg_scale,
                "lightning_fused": m.lightning_fused,
                "max_text_tokens": m.max_text_tokens,
                "dtype": m.dtype,
            }),
        );
    }
    if let (Phase::Failed(e), Some(obj)) = (&st.phase, body.as_object_mut()) {
        obj.insert("error".into(), e.clone().into());
    }
    json_response(code, body.to_string().into_bytes())
}

fn metrics(state: &AppState) -> Response<Body> {
    let text = state.service.metrics().render(state.service.queue_depth());
    let mut r = Response::new(Full::new(Bytes::from(text)));
    r.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"));
    r
}

/// Counts a /run request when it ends; a request dropped before that (client gone) counts as cancelled.
struct Outcome {
    metrics: Arc<Metrics>,
    started: Instant,
    done: bool,
}

impl Outcome {
    fn finish(mut self, status: StatusCode, error_type: Option<&str>) {
        self.done = true;
        let outcome = match (status.as_u16(), error_type) {
            (200..=299, _) => "success",
            (401, _) => "unauthorized",
            (503, Some("overloaded")) => "overloaded",
            (503, _) => "not_ready",
            (504, _) => "timeout",
            (500..=599, _) => "server_error",
            _ => "client_error",
        };
        self.metrics.request(outcome, self.started.elapsed());
    }
}

impl Drop for Outcome {
    fn drop(&mut self) {
        if !self.done {
            self.metrics.request("cancelled", self.started.elapsed());
        }
    }
}

async fn run<B>(state: &Arc<AppState>, req: Request<B>, started: Instant) -> Response<Body>
where
    B: hyper::body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    let outcome = Outcome { metrics: state.service.metrics().clone(), started, done: false };
    match edit(state, req, started).await {
        Ok(r) => {
            outcome.finish(r.status(), None);
            r
        }
        Err(e) => {
            if e.status.is_server_error() && e.status != StatusCode::SERVICE_UNAVAILABLE {
                tracing::error!(error_type = e.error_type, "{}", e.message);
            } else {
                tracing::debug!(status = e.status.as_u16(), error_type = e.error_type, "{}", e.message);
            }
            outcome.finish(e.status, Some(e.error_type));
            error_response(&e)
        }
    }
}

/// Checks `Authorization: Bearer <API_KEY>` in constant time (digests compared, so lengths leak nothing).
fn authorize(state: &AppState, headers: &HeaderMap) -> Result<(), ApiError> {
    let Some(want) = &state.api_key_digest else { return Ok(()) };
    let given = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split_once(' '))
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
        .map(|(_, token)| token.trim());
    let ok = given.is_some_and(|g| bool::from(super::digest(g).ct_eq(want)));
    if ok {
        Ok(())
    } else {
        Err(ApiError::new(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            if given.is_some() { "the API key is wrong" } else { "an API key is required: send Authorization: Bearer <API_KEY>" },
        ))
    }
}

/// Reads the body up to `max` bytes (413 beyond; a declared Content-Length over it is refused unread).
pub async fn read_body<B>(req: Request<B>, max: usize) -> Result<Bytes, ApiError>
where
    B: hyper::body::Body<Data = Bytes>,
    B::Error: Into<BoxError>,
{
    let too_large =
        || ApiError::too_large(format!("the request body is larger than {max} bytes (MAX_BODY_BYTES); send a smaller image"));
    let declared =
        req.headers().get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()).and_then(|v| v.trim().parse::<u64>().ok());
    if declared.is_some_and(|n| n > max as u64) {
        return Err(too_large());
    }
    match Limited::new(req.into_body(), max).collect().await {
        Ok(c) => Ok(c.to_bytes()),
        Err(e) if e.downcast_ref::<http_body_util::LengthLimitError>().is_some() => Err(too_large()),
        Err(e) => Err(ApiError::invalid_json(format!("could not read the request body: {e}"))),
    }
}

/// `POST /run`: auth, a queue place (503 at once when there is none), the body, then the service.
async fn edit<B>(state: &Arc<AppState>, req: Request<B>, started: Instant) -> Result<Response<Body>, ApiError>
where
    B: hyper::body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    authorize(state, req.headers())?;
    let ticket = state.service.admit()?;
    // The queue place is held while the body arrives: a client that trickles it is cut off.
    let body_timeout = state.settings().body_read_timeout;
    let body = tokio::time::timeout(body_timeout, read_body(req, state.settings().max_body_bytes)).await.map_err(|_| {
        ApiError::new(
            StatusCode::REQUEST_TIMEOUT,
            "body_timeout",
            format!("the request body did not arrive within {:.0} s (BODY_READ_TIMEOUT)", body_timeout.as_secs_f64()),
        )
    })??;
    let response = state.service.edit(ticket, body, started).await?;
    Ok(json_response(StatusCode::OK, response.to_json()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Settings;

    /// An AppState whose model never finishes loading (no pipeline is involved in these tests).
    fn state(settings: Settings) -> (Arc<AppState>, std::sync::mpsc::Sender<()>) {
        let (hold, wait) = std::sync::mpsc::channel::<()>();
        let service = crate::service::test_service(settings, move || {
            let _ = wait.recv();
            Err("test state: no model".to_string())
        });
        (Arc::new(AppState::new(service)), hold)
    }

    fn req(method: Method, path: &str, body: &str) -> Request<Full<Bytes>> {
        Request::builder().method(method).uri(path).body(Full::new(Bytes::from(body.to_string()))).unwrap()
    }

    async fn json(r: Response<Body>) -> serde_json::Value {
        let b = r.into_body().collect().await.unwrap().to_bytes();
        serde_json::from_slice(&b).unwrap()
    }

    #[tokio::test]
    async fn health_and_run_follow_the_phase() {
        let (st, _hold) = state(Settings::builtin());
        let r = handle(st.clone(), req(Method::GET, "/health", "")).await;
        assert_eq!(r.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert!(r.headers().contains_key("x-process-time"));
        let v = json(r).await;
        assert_eq!(v["status"], "loading");
        assert_eq!(v["queue_depth"], 0);
        assert!(v["gpu_available"].is_boolean() && v["backend"].is_string() && v["backend_reason"].is_string(), "{v}");

        let r = handle(st.clone(), req(Method::POST, "/run", "{}")).await;
        assert_eq!(r.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert!(r.headers().contains_key(header::RETRY_AFTER));
        assert_eq!(json(r).await["error_type"], "not_ready");

        crate::service::set_phase(&st.service, Phase::Draining);
        let r = handle(st.clone(), req(Method::GET, "/health", "")).await;
        assert_eq!(r.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(json(r).await["status"], "draining");
        let r = handle(st.clone(), req(Method::POST, "/runsync", "{}")).await;
        assert_eq!(json(r).await["error_type"], "not_ready");

        crate::service::set_phase(&st.service, Phase::Failed("bundle missing".into()));
        let v = json(handle(st.clone(), req(Method::GET, "/health", "")).await).await;
        assert_eq!((v["status"].as_str(), v["error"].as_str()), (Some("failed"), Some("bundle missing")));

        let m = handle(st.clone(), req(Method::GET, "/metrics", "")).await;
        assert!(m.headers()[header::CONTENT_TYPE].to_str().unwrap().starts_with("text/plain"));
        let text = String::from_utf8(m.into_body().collect().await.unwrap().to_bytes().to_vec()).unwrap();
        assert_eq!(crate::metrics::sample(&text, "qwen_edit_requests_total{outcome=\"not_ready\"}"), Some(2.0), "{text}");
    }

    #[tokio::test]
    async fn unknown_routes_and_methods() {
        let (st, _hold) = state(Settings::builtin());
        let r = handle(st.clone(), req(Method::GET, "/nope", "")).await;
        assert_eq!(r.status(), StatusCode::NOT_FOUND);
        assert_eq!(json(r).await["error_type"], "not_found");
        let r = handle(st.clone(), req(Method::GET, "/run", "")).await;
        assert_eq!(r.status(), StatusCode::METHOD_NOT_ALLOWED);
        assert_eq!(r.headers()[header::ALLOW], "POST");
        let r = handle(st.clone(), req(Method::POST, "/health", "")).await;
        assert_eq!(r.headers()[header::ALLOW], "GET");
    }

    #[tokio::test]
    async fn api_key_is_required_on_run_only() {
        let settings = Settings { api_key: Some("s3cret".into()), ..Settings::builtin() };
        let (st, _hold) = state(settings);
        let with = |auth: Option<&str>| {
            let mut r = req(Method::POST, "/run", "{}");
            if let Some(a) = auth {
                r.headers_mut().insert(header::AUTHORIZATION, HeaderValue::from_str(a).unwrap());
            }
            r
        };
        for bad in [None, Some("Bearer wrong"), Some("Bearer s3cret2"), Some("Basic s3cret"), Some("s3cret"), Some("Bearer ")] {
            let r = handle(st.clone(), with(bad)).await;
            assert_eq!(r.status(), StatusCode::UNAUTHORIZED, "{bad:?}");
            assert_eq!(r.headers()[header::WWW_AUTHENTICATE], "Bearer");
            assert_eq!(json(r).await["error_type"], "unauthorized");
        }
        // The right key passes authentication (and then meets the loading model).
        for good in ["Bearer s3cret", "bearer s3cret", "Bearer  s3cret "] {
            let r = handle(st.clone(), with(Some(good))).await;
            assert_eq!(json(r).await["error_type"], "not_ready", "{good}");
        }
        assert_eq!(
            handle(st.clone(), req(Method::GET, "/health", "")).await.status(),
            StatusCode::SERVICE_UNAVAILABLE,
            "no key on /health"
        );
    }

    #[tokio::test]
    async fn body_limit() {
        let ok = read_body(req(Method::POST, "/run", "12345"), 5).await.unwrap();
        assert_eq!(&ok[..], b"12345");
        let e = read_body(req(Method::POST, "/run", "123456"), 5).await.unwrap_err();
        assert_eq!((e.status.as_u16(), e.error_type), (413, "payload_too_large"));
        let mut r = req(Method::POST, "/run", "1");
        r.headers_mut().insert(header::CONTENT_LENGTH, HeaderValue::from_static("999999999"));
        let e = read_body(r, 5).await.unwrap_err();
        assert_eq!(e.status.as_u16(), 413);
    }
}
