//! The routes: `POST /run` and `/runsync` (one edit), `GET /health`, `GET /ping`, `GET /metrics`,
//! `GET /queue/status`, RunPod's `/v2/...` layout (`v2.rs`), OpenAI's `POST /v1/images/edits`
//! (`openai.rs`) and `GET /openapi.json` (`openapi.rs`). Every request runs in a tracing span with
//! its `X-Request-ID` (the client's, when it sends a usable one; else a new one), and every response
//! gets `X-Request-ID`, `X-Process-Time` (milliseconds) and a log line, slow ones a warning.

use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use http::{header, HeaderMap, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::Full;
use tracing::Instrument;

use super::wire::{authorize, error_response, json_response, method_not_allowed, read_body, Body, BodyLimits, BoxError};
use super::AppState;
use crate::metrics::Metrics;
use crate::service::{ApiError, Phase};

/// The longest client-sent `X-Request-ID` that is kept (a longer one is replaced by a new id).
pub const MAX_REQUEST_ID: usize = 128;

/// The request's id: the client's `X-Request-ID` when it has 1..=128 printable ASCII characters
/// (after trimming), else a new UUID.
pub fn request_id(headers: &HeaderMap) -> String {
    headers
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .map(str::trim)
        .filter(|s| !s.is_empty() && s.len() <= MAX_REQUEST_ID && s.bytes().all(|b| (0x20..=0x7e).contains(&b)))
        .map_or_else(|| crate::service::jobs::new_id(crate::service::jobs::Kind::Async), str::to_string)
}

/// Serves one request.
pub async fn handle<B>(state: Arc<AppState>, req: Request<B>) -> Response<Body>
where
    B: hyper::body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    let started = Instant::now();
    let id = request_id(req.headers());
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    let span = tracing::info_span!("request", request_id = %id);
    let mut response = route(&state, req, started, &id, &method, &path).instrument(span.clone()).await;
    let _in_span = span.enter();
    let elapsed = started.elapsed();
    let ms = elapsed.as_secs_f64() * 1000.0;
    if let Ok(v) = HeaderValue::from_str(&format!("{ms:.3}")) {
        response.headers_mut().insert("x-process-time", v);
    }
    if let Ok(v) = HeaderValue::from_str(&id) {
        response.headers_mut().insert("x-request-id", v);
    }
    let status = response.status().as_u16();
    let poll = matches!(path.as_str(), "/health" | "/metrics" | "/ping" | "/queue/status") || super::v2::is_poll(&path);
    if elapsed >= state.settings().slow_request && !poll {
        tracing::warn!(%method, path, status, ms, "slow request");
    } else if poll {
        tracing::debug!(%method, path, status, ms, "request");
    } else {
        tracing::info!(%method, path, status, ms, "request");
    }
    response
}

/// The route's answer.
async fn route<B>(
    state: &Arc<AppState>,
    req: Request<B>,
    started: Instant,
    id: &str,
    method: &Method,
    path: &str,
) -> Response<Body>
where
    B: hyper::body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    let state = state.clone();
    match (method, path) {
        (&Method::GET, "/health") => health(&state),
        (&Method::GET, "/ping") => ping(&state),
        (&Method::GET, "/metrics") => metrics(&state),
        (&Method::GET, "/queue/status") => queue_status(&state),
        (&Method::GET, "/openapi.json") => super::openapi::response(),
        (&Method::POST, "/run" | "/runsync") => counted(&state, started, edit(&state, req, started), error_response).await,
        (&Method::POST, "/v1/images/edits") => {
            counted(&state, started, super::openai::edits(&state, req, started), super::openai::openai_error).await
        }
        (_, "/health" | "/metrics" | "/ping" | "/openapi.json" | "/queue/status") => method_not_allowed("GET"),
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
        (_, p) if p.starts_with("/v2/") => super::v2::handle(&state, req, path, id).await,
        _ => error_response(&ApiError::new(
            StatusCode::NOT_FOUND,
            "not_found",
            format!(
                "no route {path}; the API is POST /run, POST /runsync, POST /v1/images/edits, GET /health, GET /ping, \
                 GET /metrics, GET /queue/status, GET /openapi.json and RunPod's /v2/{{endpoint_id}}/... (run, runsync, \
                 status, cancel, health, purge-queue)"
            ),
        )),
    }
}

fn health(state: &AppState) -> Response<Body> {
    let st = state.service.status();
    let (code, status) = match &st.phase {
        Phase::Ready if st.stall.is_some() => (StatusCode::SERVICE_UNAVAILABLE, "stalled"),
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
        "memory": st.memory,
        "cpu": st.cpu,
        "device": st.device,
        "connections": state.connections(),
    });
    if let (Some(s), Some(obj)) = (st.stall, body.as_object_mut()) {
        obj.insert(
            "stall".into(),
            serde_json::json!({"jobs": s.jobs, "running_seconds": s.running.as_secs_f64(), "expected_seconds": s.expected.as_secs_f64()}),
        );
    }
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
/// when draining, failed or stalled (the watchdog: no more work for a hung engine).
fn ping(state: &AppState) -> Response<Body> {
    match state.service.phase() {
        Phase::Ready if state.service.stalled() => {
            json_response(StatusCode::SERVICE_UNAVAILABLE, br#"{"status":"stalled"}"#.to_vec())
        }
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

/// `GET /queue/status`: the queue, the running batch, the requests so far by outcome (the sync routes)
/// and the /v2 jobs by state, whether a new request would be admitted, and the batch policy.
fn queue_status(state: &AppState) -> Response<Body> {
    let q = state.service.queue_status();
    let outcomes: serde_json::Map<String, serde_json::Value> =
        state.service.metrics().outcomes().into_iter().map(|(o, n)| (o.to_string(), n.into())).collect();
    let h = state.jobs.health();
    let mut body = serde_json::to_value(&q).unwrap_or_default();
    if let Some(obj) = body.as_object_mut() {
        obj.insert("requests".into(), outcomes.into());
        obj.insert(
            "jobs".into(),
            serde_json::json!({
                "in_queue": h.in_queue,
                "in_progress": h.in_progress,
                "completed": h.completed,
                "failed": h.failed,
                "cancelled": h.cancelled,
                "timed_out": h.timed_out,
            }),
        );
    }
    json_response(StatusCode::OK, body.to_string().into_bytes())
}

fn metrics(state: &AppState) -> Response<Body> {
    let m = state.service.metrics();
    let (running, peak, skipped) = state.service.cpu_counts();
    let status = state.service.status();
    let memory = status.memory;
    for (name, v) in [
        ("qwen_edit_process_resident_bytes", memory.resident_bytes),
        ("qwen_edit_process_resident_peak_bytes", memory.resident_peak_bytes),
        ("qwen_edit_process_heap_in_use_bytes", memory.heap_in_use_bytes),
        ("qwen_edit_host_memory_available_bytes", memory.host_available_bytes),
    ] {
        if let Some(v) = v {
            m.gauge(name, v as f64); // not on a system without /proc
        }
    }
    if let Some(d) = &status.device {
        m.gauge("qwen_edit_device_memory_total_bytes", d.total_bytes as f64);
        m.gauge("qwen_edit_device_memory_used_bytes", d.used_bytes as f64);
        for e in &d.engines {
            for (kind, v) in [("weights", e.weights_bytes), ("activation", e.activation_bytes), ("io", e.io_bytes)] {
                m.labelled_gauge(
                    "qwen_edit_engine_memory_bytes",
                    &[("component", e.component.clone()), ("kind", kind.into())],
                    v as f64,
                );
            }
        }
    }
    let policy = state.service.queue_status().batch_policy;
    m.labelled_gauge("qwen_edit_batch_policy", &[("policy", policy.policy.into())], 1.0);
    m.gauge("qwen_edit_arrival_rate", policy.learned.arrival_rate);
    m.gauge("qwen_edit_batch_wait_success", policy.learned.wait_success);
    for c in &policy.learned.costs {
        m.labelled_gauge(
            "qwen_edit_batch_cost_per_image_seconds",
            &[("batch_size", c.batch_size.to_string())],
            c.seconds_per_image,
        );
    }
    m.gauge("qwen_edit_cpu_tasks_running", running as f64);
    m.gauge("qwen_edit_cpu_tasks_peak", peak as f64);
    m.gauge("qwen_edit_cpu_tasks_skipped_total", skipped as f64);
    m.gauge("qwen_edit_request_memory_bytes", memory.request_bytes_in_use as f64);
    m.gauge("qwen_edit_request_memory_peak_bytes", state.service.request_memory_peak() as f64);
    m.gauge("qwen_edit_connections", state.connections() as f64);
    let text = m.render(state.service.queue_depth());
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

/// `POST /run`: auth, admission (503 at once when there is no room), the body, then the service.
async fn edit<B>(state: &Arc<AppState>, req: Request<B>, started: Instant) -> Result<Response<Body>, ApiError>
where
    B: hyper::body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    authorize(state, req.headers(), false)?;
    let admission = state.service.admit()?;
    let body = read_body(req, BodyLimits::of(state.settings()), Some(&admission)).await?;
    let response = state.service.edit(admission, body, started).await?;
    Ok(json_response(StatusCode::OK, response.to_json()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Settings;
    use http_body_util::BodyExt;
    use std::future::Future;
    use std::time::Duration;

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

    #[test]
    fn request_ids_are_kept_when_usable_and_made_otherwise() {
        let with = |v: &[u8]| {
            let mut h = HeaderMap::new();
            h.insert("x-request-id", HeaderValue::from_bytes(v).unwrap());
            request_id(&h)
        };
        assert_eq!(with(b"lb-7f3a/42"), "lb-7f3a/42");
        assert_eq!(with(b"  spaced id  "), "spaced id", "trimmed");
        assert_eq!(with(&[b'a'; MAX_REQUEST_ID]).len(), MAX_REQUEST_ID);
        for bad in [&b""[..], b"   ", &[b'a'; MAX_REQUEST_ID + 1], b"tab\there", "caf\u{e9}".as_bytes()] {
            let id = with(bad);
            assert_eq!(id.len(), 36, "{bad:?} gives a new UUID, got {id}");
        }
        let fresh = request_id(&HeaderMap::new());
        assert_ne!(fresh, request_id(&HeaderMap::new()));
    }

    #[tokio::test]
    async fn queue_status_while_loading() {
        let (st, _hold) = state(Settings { batch_size: 3, max_queue: 9, ..Settings::builtin() });
        let r = handle(st.clone(), req(Method::GET, "/queue/status", "")).await;
        assert_eq!(r.status(), StatusCode::OK);
        let v = json(r).await;
        assert_eq!((v["queue_depth"].as_u64(), v["max_queue"].as_u64(), v["running"].as_u64()), (Some(0), Some(9), Some(0)));
        assert_eq!(v["accepting"], false, "{v}");
        assert!(v["reason"].as_str().unwrap().contains("loading"), "{v}");
        assert_eq!((v["batch_policy"]["policy"].as_str(), v["batch_policy"]["batch_size"].as_u64()), (Some("adaptive"), Some(3)));
        assert_eq!(v["requests"]["success"], 0);
        assert_eq!(v["jobs"]["in_queue"], 0);
        assert_eq!(handle(st.clone(), req(Method::POST, "/queue/status", "")).await.status(), StatusCode::METHOD_NOT_ALLOWED);
    }

    #[tokio::test]
    async fn health_and_run_follow_the_phase() {
        let (st, _hold) = state(Settings::builtin());
        let mut asked = req(Method::GET, "/health", "");
        asked.headers_mut().insert("x-request-id", HeaderValue::from_static("probe-1"));
        assert_eq!(handle(st.clone(), asked).await.headers()["x-request-id"], "probe-1");
        let r = handle(st.clone(), req(Method::GET, "/health", "")).await;
        assert_eq!(r.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert!(r.headers().contains_key("x-process-time"));
        assert_eq!(r.headers()["x-request-id"].len(), 36, "a new id");
        let p = handle(st.clone(), req(Method::GET, "/ping", "")).await;
        assert_eq!(p.status(), StatusCode::NO_CONTENT, "/ping: 204 while loading");
        assert!(p.into_body().collect().await.unwrap().to_bytes().is_empty());
        let v = json(r).await;
        assert_eq!(v["status"], "loading");
        assert_eq!(v["queue_depth"], 0);
        assert!(v["gpu_available"].is_boolean() && v["backend"].is_string() && v["backend_reason"].is_string(), "{v}");
        assert!(v["engine"].is_null(), "no engine counters before a model loads: {v}");
        assert!(v["device"].is_null(), "no device on the CPU backend: {v}");
        assert!(v["cpu"]["count"].as_u64().unwrap() >= 1, "{v}");
        assert!(v["memory"]["resident_bytes"].as_u64().unwrap() > 0 && v["memory"]["host_available_bytes"].as_u64().unwrap() > 0);

        let r = handle(st.clone(), req(Method::POST, "/run", "{}")).await;
        assert_eq!(r.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert!(r.headers().contains_key(header::RETRY_AFTER));
        assert!(r.headers().contains_key("x-request-id"), "errors carry the id too");
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

    /// The device gauges of /metrics and the `device` block of /health, from a device status as the TensorRT
    /// worker reports it (`TrtWorker::with_counters` registers the device probe, `TrtWorker::load` each engine's
    /// memory). The device is EMULATED: no GPU exists here, so the probe is a closure standing in for
    /// `cuDeviceGetName` / `cuMemGetInfo`, and its free memory changes between scrapes as a real device's does.
    #[tokio::test]
    async fn metrics_and_health_show_the_device_the_tensorrt_worker_reports() {
        use crate::runtime::counters::{EngineMemory, RunCounters};
        use std::sync::atomic::{AtomicU64, Ordering};
        const GIB: u64 = 1 << 30;
        let (st, _hold) = state(Settings::builtin());
        let scrape = |st: Arc<AppState>| async move {
            let m = handle(st, req(Method::GET, "/metrics", "")).await;
            String::from_utf8(m.into_body().collect().await.unwrap().to_bytes().to_vec()).unwrap()
        };
        let text = scrape(st.clone()).await;
        assert!(!text.contains("qwen_edit_device_memory") && !text.contains("qwen_edit_engine_memory"), "no device yet: {text}");

        let counters = Arc::new(RunCounters::default());
        let free = Arc::new(AtomicU64::new(30 * GIB));
        let probe_free = free.clone();
        counters.device.set_probe(Arc::new(move || {
            Some(("NVIDIA L40S (emulated)".to_string(), probe_free.load(Ordering::Relaxed), 48 * GIB))
        }));
        let engine = |component: &str, weights_bytes, activation_bytes, io_bytes| EngineMemory {
            component: component.into(),
            weights_bytes,
            activation_bytes,
            io_bytes,
        };
        counters.device.add_engine(engine("text_encoder", 9 * GIB, GIB, 3 << 20));
        counters.device.add_engine(engine("transformer", 12 * GIB, 2 * GIB, 5 << 20));
        st.service.metrics().set_engine_counters(counters.clone());

        let text = scrape(st.clone()).await;
        let sample = |text: &str, series: &str| crate::metrics::sample(text, series);
        assert_eq!(sample(&text, "qwen_edit_device_memory_total_bytes"), Some((48 * GIB) as f64), "{text}");
        assert_eq!(sample(&text, "qwen_edit_device_memory_used_bytes"), Some((18 * GIB) as f64), "total - free: {text}");
        for (component, kind, v) in [
            ("text_encoder", "weights", 9 * GIB),
            ("text_encoder", "activation", GIB),
            ("text_encoder", "io", 3 << 20),
            ("transformer", "weights", 12 * GIB),
            ("transformer", "activation", 2 * GIB),
            ("transformer", "io", 5 << 20),
        ] {
            let series = format!("qwen_edit_engine_memory_bytes{{component=\"{component}\",kind=\"{kind}\"}}");
            assert_eq!(sample(&text, &series), Some(v as f64), "{series}:\n{text}");
        }
        assert!(text.contains("# HELP qwen_edit_device_memory_used_bytes Memory used on the GPU"), "{text}");

        // Read at every scrape: the device's memory now, not at load.
        free.store(20 * GIB, Ordering::Relaxed);
        let text = scrape(st.clone()).await;
        assert_eq!(sample(&text, "qwen_edit_device_memory_used_bytes"), Some((28 * GIB) as f64), "{text}");

        let v = json(handle(st.clone(), req(Method::GET, "/health", "")).await).await;
        let d = &v["device"];
        assert_eq!(d["name"], "NVIDIA L40S (emulated)", "{v}");
        assert_eq!((d["total_bytes"].as_u64(), d["used_bytes"].as_u64()), (Some(48 * GIB), Some(28 * GIB)), "{d}");
        let engines = d["engines"].as_array().unwrap();
        assert_eq!(engines.len(), 2, "{d}");
        assert_eq!(
            (engines[1]["component"].as_str(), engines[1]["weights_bytes"].as_u64(), engines[1]["activation_bytes"].as_u64()),
            (Some("transformer"), Some(12 * GIB), Some(2 * GIB)),
            "{d}"
        );
        assert_eq!(engines[0]["io_bytes"].as_u64(), Some(3 << 20), "{d}");
        assert_eq!(v["engine"]["graph_replays"], 0, "the engine counters come with the device: {v}");
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

    fn limits(max: usize) -> BodyLimits {
        BodyLimits { max, timeout: Duration::from_secs(60), min_rate: 1000, grace: Duration::from_millis(200) }
    }

    #[tokio::test]
    async fn body_limit() {
        let ok = read_body(req(Method::POST, "/run", "12345"), limits(5), None).await.unwrap();
        assert_eq!(&ok[..], b"12345");
        let e = read_body(req(Method::POST, "/run", "123456"), limits(5), None).await.unwrap_err();
        assert_eq!((e.status.as_u16(), e.error_type), (413, "payload_too_large"));
        let mut r = req(Method::POST, "/run", "1");
        r.headers_mut().insert(header::CONTENT_LENGTH, HeaderValue::from_static("999999999"));
        let e = read_body(r, limits(5), None).await.unwrap_err();
        assert_eq!(e.status.as_u16(), 413);
    }

    #[test]
    fn the_body_deadline_follows_the_minimum_rate_up_to_the_timeout() {
        let l = BodyLimits { max: 1 << 20, timeout: Duration::from_secs(60), min_rate: 1000, grace: Duration::from_secs(5) };
        let t0 = Instant::now();
        assert_eq!(l.deadline(t0, 0), (t0 + Duration::from_secs(5), true), "the grace");
        assert_eq!(l.deadline(t0, 10_000), (t0 + Duration::from_secs(15), true), "10 KB earn 10 s at 1 KB/s");
        assert_eq!(l.deadline(t0, 1_000_000), (t0 + Duration::from_secs(60), false), "never past BODY_READ_TIMEOUT");
    }

    /// A body that sends one byte every `every` (a trickling client).
    struct Trickle {
        every: Duration,
        sleep: std::pin::Pin<Box<tokio::time::Sleep>>,
        left: usize,
    }
    impl hyper::body::Body for Trickle {
        type Data = Bytes;
        type Error = std::io::Error;
        fn poll_frame(
            mut self: std::pin::Pin<&mut Self>,
            cx: &mut std::task::Context<'_>,
        ) -> std::task::Poll<Option<Result<hyper::body::Frame<Bytes>, Self::Error>>> {
            if self.left == 0 {
                return std::task::Poll::Ready(None);
            }
            std::task::ready!(self.sleep.as_mut().poll(cx));
            let next = tokio::time::Instant::now() + self.every;
            self.sleep.as_mut().reset(next);
            self.left -= 1;
            std::task::Poll::Ready(Some(Ok(hyper::body::Frame::data(Bytes::from_static(b"x")))))
        }
    }

    #[tokio::test]
    async fn a_trickling_body_is_cut_off_by_the_minimum_rate() {
        let every = Duration::from_millis(50);
        let body = Trickle { every, sleep: Box::pin(tokio::time::sleep(every)), left: 1000 };
        let r = Request::builder().method(Method::POST).uri("/run").body(body).unwrap();
        let t = Instant::now();
        let e = read_body(r, limits(1 << 20), None).await.unwrap_err();
        assert_eq!((e.status.as_u16(), e.error_type), (408, "body_timeout"));
        assert!(e.message.contains("BODY_MIN_RATE"), "{}", e.message);
        assert!(t.elapsed() < Duration::from_secs(2), "cut off after the grace: {:?}", t.elapsed());
    }
}
