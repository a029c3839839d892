//! The routes: `POST /run` and `/runsync` (one edit), `GET /health`, `GET /ping`, `GET /metrics`,
//! RunPod's `/v2/...` layout (`v2.rs`), OpenAI's `POST /v1/images/edits` (`openai.rs`) and
//! `GET /openapi.json` (`openapi.rs`); every response gets `X-Process-Time` (milliseconds) and a log
//! line, slow ones a warning.

use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use http::{header, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::Full;

use super::wire::{authorize, error_response, json_response, method_not_allowed, read_body, Body, BoxError};
use super::AppState;
use crate::metrics::Metrics;
use crate::service::{ApiError, Phase};

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
        (&Method::GET, "/ping") => ping(&state),
        (&Method::GET, "/metrics") => metrics(&state),
        (&Method::GET, "/openapi.json") => super::openapi::response(),
        (&Method::POST, "/run" | "/runsync") => counted(&state, started, edit(&state, req, started), error_response).await,
        (&Method::POST, "/v1/images/edits") => {
            counted(&state, started, super::openai::edits(&state, req, started), super::openai::openai_error).await
        }
        (_, "/health" | "/metrics" | "/ping" | "/openapi.json") => method_not_allowed("GET"),
        (_, "/run" | "/runsync") => method_not_allowed("POST"),
        (_, "/v1/images/edits") => {
            let mut r = super::openai::openai_error(&ApiError::new(
                StatusCode::METHOD_NOT_ALLOWED,
                "method_not_allowed",
                "use POST on /v1/images/edits",
            ));
            r.headers_mut().insert(header::ALLOW, HeaderValue::from_static("POST"));
            r
        }
        (_, p) if p.starts_with("/v2/") => super::v2::handle(&state, req, &path).await,
        _ => error_response(&ApiError::new(
            StatusCode::NOT_FOUND,
            "not_found",
            format!(
                "no route {path}; the API is POST /run, POST /runsync, POST /v1/images/edits, GET /health, GET /ping, \
                 GET /metrics, GET /openapi.json and RunPod's /v2/{{endpoint_id}}/... (run, runsync, status, cancel, \
                 health, purge-queue)"
            ),
        )),
    };
    let elapsed = started.elapsed();
    let ms = elapsed.as_secs_f64() * 1000.0;
    if let Ok(v) = HeaderValue::from_str(&format!("{ms:.3}")) {
        response.headers_mut().insert("x-process-time", v);
    }
    let status = response.status().as_u16();
    let poll = matches!(path.as_str(), "/health" | "/metrics" | "/ping") || super::v2::is_poll(&path);
    if elapsed >= state.settings().slow_request && !poll {
        tracing::warn!(request_id = id, %method, path, status, ms, "slow request");
    } else if poll {
        tracing::debug!(request_id = id, %method, path, status, ms, "request");
    } else {
        tracing::info!(request_id = id, %method, path, status, ms, "request");
    }
    response
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
        "engine": state.service.metrics().engine_counters(),
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

/// `GET /ping` for RunPod load-balancing endpoints: 200 when ready, 204 while the model loads, 503
/// when draining or failed.
fn ping(state: &AppState) -> Response<Body> {
    match state.service.phase() {
        Phase::Ready => json_response(StatusCode::OK, br#"{"status":"healthy"}"#.to_vec()),
        Phase::Loading => {
            let mut r = Response::new(Full::new(Bytes::new()));
            *r.status_mut() = StatusCode::NO_CONTENT;
            r
        }
        Phase::Draining => json_response(StatusCode::SERVICE_UNAVAILABLE, br#"{"status":"draining"}"#.to_vec()),
        Phase::Failed(e) => json_response(
            StatusCode::SERVICE_UNAVAILABLE,
            serde_json::json!({"status": "failed", "error": e}).to_string().into_bytes(),
        ),
    }
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

/// An edit route's answer, counted in the metrics and logged; `render` writes the error body (the
/// RunPod-style one or OpenAI's).
async fn counted(
    state: &Arc<AppState>,
    started: Instant,
    work: impl std::future::Future<Output = Result<Response<Body>, ApiError>>,
    render: fn(&ApiError) -> Response<Body>,
) -> Response<Body> {
    let outcome = Outcome { metrics: state.service.metrics().clone(), started, done: false };
    match work.await {
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
            render(&e)
        }
    }
}

/// `POST /run`: auth, a queue place (503 at once when there is none), the body, then the service.
async fn edit<B>(state: &Arc<AppState>, req: Request<B>, started: Instant) -> Result<Response<Body>, ApiError>
where
    B: hyper::body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    authorize(state, req.headers(), false)?;
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
    use http_body_util::BodyExt;

    /// An AppState whose model never finishes loading (no pipeline is involved in these tests).
    fn state(settings: Settings) -> (Arc<AppState>, std::sync::mpsc::Sender<()>) {
        let (hold, wait) = std::sync::mpsc::channel::<()>();
        let service = crate::service::test_service(settings, move || {
            let _ = wait.recv();
            Err("test state: no model".to_string())
        });
        (Arc::new(AppState::new(service).unwrap()), hold)
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
        let p = handle(st.clone(), req(Method::GET, "/ping", "")).await;
        assert_eq!(p.status(), StatusCode::NO_CONTENT, "/ping: 204 while loading");
        assert!(p.into_body().collect().await.unwrap().to_bytes().is_empty());
        let v = json(r).await;
        assert_eq!(v["status"], "loading");
        assert_eq!(v["queue_depth"], 0);
        assert!(v["gpu_available"].is_boolean() && v["backend"].is_string() && v["backend_reason"].is_string(), "{v}");
        assert!(v["engine"].is_null(), "no engine counters before a model loads: {v}");

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
        let p = handle(st.clone(), req(Method::GET, "/ping", "")).await;
        assert_eq!((p.status(), json(p).await["status"].as_str()), (StatusCode::SERVICE_UNAVAILABLE, Some("draining")));
        let r = handle(st.clone(), req(Method::POST, "/v2/ep/run", r#"{"input": {}}"#)).await;
        assert_eq!((r.status(), json(r).await["error_type"].as_str()), (StatusCode::SERVICE_UNAVAILABLE, Some("not_ready")));

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
}
