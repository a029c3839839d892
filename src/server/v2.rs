//! RunPod's hosted-API layout on `serve`: `/v2/{endpoint_id}/run`, `runsync`, `status/{id}`,
//! `cancel/{id}`, `health`, `purge-queue`, over the async job store (`service::jobs::JobStore`).
//!
//! So that a RunPod client only changes its base URL: the endpoint id is any one path segment (this
//! server is one endpoint), every reply is JSON (the official client parses every 2xx body), unknown
//! or expired job ids are 404 with a JSON error. With `API_KEY` set every `/v2` route needs it, as
//! `Authorization: Bearer <key>` (the official client) or the raw key (RunPod's curl examples).

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};

use super::wire::{authorize, error_response, json_response, method_not_allowed, read_body, Body, BodyLimits, BoxError};
use super::AppState;
use crate::service::jobs::{JobView, Kind};
use crate::service::ApiError;

/// How long `runsync` waits by default, and its bounds (RunPod's `?wait=` in milliseconds).
const DEFAULT_WAIT: Duration = Duration::from_secs(90);
const MIN_WAIT_MS: u64 = 1_000;
const MAX_WAIT_MS: u64 = 300_000;

/// Whether a request to `path` is a poll (`status`, `health`), logged at debug level.
pub fn is_poll(path: &str) -> bool {
    let mut parts = path.trim_start_matches("/v2/").split('/').skip(1);
    matches!(parts.next(), Some("status" | "health"))
}

/// Serves one request under `/v2/`.
pub async fn handle<B>(state: &Arc<AppState>, req: Request<B>, path: &str, request_id: &str) -> Response<Body>
where
    B: hyper::body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    let parts: Vec<&str> = path.trim_start_matches("/v2/").trim_end_matches('/').split('/').collect();
    let method = req.method().clone();
    let known = match parts.as_slice() {
        [ep, op] if !ep.is_empty() => match *op {
            "run" | "runsync" | "purge-queue" => Some("POST"),
            "health" => Some("GET"),
            _ => None,
        },
        [ep, "status", id] if !ep.is_empty() && !id.is_empty() => Some("GET, POST"),
        [ep, "cancel", id] if !ep.is_empty() && !id.is_empty() => Some("POST"),
        _ => None,
    };
    let Some(allow) = known else {
        return error_response(&ApiError::new(
            StatusCode::NOT_FOUND,
            "not_found",
            format!(
                "no route {path}; the /v2 API is POST /v2/{{endpoint_id}}/run, /runsync, /cancel/{{id}}, /purge-queue and \
                 GET /v2/{{endpoint_id}}/status/{{id}}, /health"
            ),
        ));
    };
    if !allow.split(", ").any(|m| m == method.as_str()) {
        return method_not_allowed(allow);
    }
    if let Err(e) = authorize(state, req.headers(), true) {
        return error_response(&e);
    }
    let result = match parts.as_slice() {
        [_, "run"] => run(state, req, false, request_id).await,
        [_, "runsync"] => run(state, req, true, request_id).await,
        [_, "status", id] => status(state, id),
        [_, "cancel", id] => cancel(state, id),
        [_, "health"] => Ok(health(state)),
        _ => Ok(json(StatusCode::OK, serde_json::json!({"removed": state.jobs.purge(), "status": "completed"}))),
    };
    result.unwrap_or_else(|e| error_response(&e))
}

fn json(status: StatusCode, v: serde_json::Value) -> Response<Body> {
    json_response(status, v.to_string().into_bytes())
}

fn not_found(id: &str) -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "not_found",
        format!(
            "no job `{id}`: it never existed, or its result is gone (results are kept RESULT_TTL after the job ends, \
             runsync ones at most 60 s, within RESULT_MEMORY_BYTES, oldest first out)"
        ),
    )
}

/// `run`: queue the job, answer `{"id", "status": "IN_QUEUE"}` at once. `runsync`: queue it, wait
/// up to `?wait=` ms (default 90 s) and answer its record (`COMPLETED` with `output`, `FAILED` with
/// `error`), or `{"id", "status"}` if it has not ended by then (the client polls `status`).
async fn run<B>(state: &Arc<AppState>, req: Request<B>, sync: bool, request_id: &str) -> Result<Response<Body>, ApiError>
where
    B: hyper::body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    state.jobs.accepting()?;
    let wait = wait_param(req.uri().query());
    let settings = state.settings();
    // Within MAX_BODY_BYTES, BODY_READ_TIMEOUT and BODY_MIN_RATE; the job store counts it (RESULT_MEMORY_BYTES).
    let body = read_body(req, BodyLimits::of(settings), None).await?;
    let kind = if sync { Kind::Sync } else { Kind::Async };
    let id = state.jobs.submit(body, kind, request_id).await?;
    if !sync {
        return Ok(json(StatusCode::OK, serde_json::json!({"id": id, "status": "IN_QUEUE"})));
    }
    match state.jobs.wait(&id, wait).await {
        Some(v) if v.status.is_final() => Ok(json_response(StatusCode::OK, v.to_json())),
        Some(v) => Ok(brief(&v)),
        None => Err(not_found(&id)),
    }
}

fn wait_param(query: Option<&str>) -> Duration {
    let ms = query
        .into_iter()
        .flat_map(|q| q.split('&'))
        .find_map(|kv| kv.strip_prefix("wait="))
        .and_then(|v| v.parse::<u64>().ok())
        .map(|ms| ms.clamp(MIN_WAIT_MS, MAX_WAIT_MS));
    ms.map_or(DEFAULT_WAIT, Duration::from_millis)
}

fn brief(v: &JobView) -> Response<Body> {
    json(StatusCode::OK, serde_json::json!({"id": v.id, "status": v.status.as_str()}))
}

fn status(state: &AppState, id: &str) -> Result<Response<Body>, ApiError> {
    let v = state.jobs.status(id).ok_or_else(|| not_found(id))?;
    Ok(json_response(StatusCode::OK, v.to_json()))
}

fn cancel(state: &AppState, id: &str) -> Result<Response<Body>, ApiError> {
    let v = state.jobs.cancel(id).ok_or_else(|| not_found(id))?;
    Ok(brief(&v))
}

/// RunPod's health body: job counts since start (plus what is queued and running now) and this
/// server as its one worker; `store` (an addition) shows the job store's memory against its budget.
fn health(state: &AppState) -> Response<Body> {
    let h = state.jobs.health();
    let phase = state.service.phase();
    let ready = phase == crate::service::Phase::Ready;
    let running = h.in_progress > 0 || state.service.queue_depth() > 0;
    let flag = |b: bool| u32::from(b);
    json(
        StatusCode::OK,
        serde_json::json!({
            "jobs": {
                "completed": h.completed,
                "failed": h.failed + h.timed_out,
                "inProgress": h.in_progress,
                "inQueue": h.in_queue,
                "retried": 0,
                "cancelled": h.cancelled,
                "timedOut": h.timed_out,
            },
            "workers": {
                "idle": flag(ready && !running),
                "running": flag(ready && running),
                "ready": flag(ready),
                "initializing": flag(phase == crate::service::Phase::Loading),
                "unhealthy": flag(matches!(phase, crate::service::Phase::Failed(_))),
                "throttled": 0,
            },
            "store": {
                "records": h.records,
                "bytes": h.bytes,
                "peakBytes": h.peak_bytes,
                "budgetBytes": h.budget,
                "evicted": h.evicted,
                "expired": h.expired,
            },
        }),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wait_is_clamped_to_runpods_bounds() {
        assert_eq!(wait_param(None), DEFAULT_WAIT);
        assert_eq!(wait_param(Some("x=1&wait=5000")), Duration::from_millis(5000));
        assert_eq!(wait_param(Some("wait=1")), Duration::from_millis(MIN_WAIT_MS));
        assert_eq!(wait_param(Some("wait=99999999")), Duration::from_millis(MAX_WAIT_MS));
        assert_eq!(wait_param(Some("wait=soon")), DEFAULT_WAIT);
    }

    #[test]
    fn polls_are_status_and_health() {
        assert!(is_poll("/v2/ep/status/abc"));
        assert!(is_poll("/v2/ep/health"));
        assert!(!is_poll("/v2/ep/run"));
        assert!(!is_poll("/v2/ep/cancel/abc"));
    }
}
