//! What every route shares: reading a body within its limit, checking the API key, and writing
//! JSON and error responses (`Retry-After`, `WWW-Authenticate`, `Allow` where they belong).

use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{header, HeaderMap, HeaderValue, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use subtle::ConstantTimeEq;

use super::AppState;
use crate::config::{Settings, BODY_RATE_GRACE};
use crate::service::{Admission, ApiError};

pub type Body = Full<Bytes>;
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

pub fn json_response(status: StatusCode, body: Vec<u8>) -> Response<Body> {
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

pub fn method_not_allowed(allow: &'static str) -> Response<Body> {
    let mut r = error_response(&ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        format!("use {allow} on this route"),
    ));
    r.headers_mut().insert(header::ALLOW, HeaderValue::from_static(allow));
    r
}

/// Checks `Authorization: Bearer <API_KEY>` (and, with `raw_ok`, the bare key as RunPod's curl
/// examples send it) in constant time (digests compared, so lengths leak nothing).
pub fn authorize(state: &AppState, headers: &HeaderMap, raw_ok: bool) -> Result<(), ApiError> {
    let Some(want) = &state.api_key_digest else { return Ok(()) };
    let value = headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()).map(str::trim);
    let given = value.and_then(|v| match v.split_once(' ') {
        Some((scheme, token)) if scheme.eq_ignore_ascii_case("bearer") => Some(token.trim()),
        None if raw_ok && !v.is_empty() => Some(v),
        _ => None,
    });
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

/// How a request body must arrive.
#[derive(Clone, Copy, Debug)]
pub struct BodyLimits {
    /// `MAX_BODY_BYTES`.
    pub max: usize,
    /// `BODY_READ_TIMEOUT`: the whole body, however fast.
    pub timeout: Duration,
    /// `BODY_MIN_RATE` (bytes per second) after `grace`.
    pub min_rate: u64,
    pub grace: Duration,
}

impl BodyLimits {
    pub fn of(s: &Settings) -> BodyLimits {
        BodyLimits { max: s.max_body_bytes, timeout: s.body_read_timeout, min_rate: s.body_min_rate, grace: BODY_RATE_GRACE }
    }

    /// When `received` bytes, begun at `start`, must have become more: after the grace, the body
    /// must keep up with `min_rate`; never later than the whole body's timeout.
    pub fn deadline(&self, start: Instant, received: usize) -> (Instant, bool) {
        let earned = Duration::from_secs_f64(received as f64 / self.min_rate.max(1) as f64);
        let by_rate = self.grace.saturating_add(earned);
        if by_rate < self.timeout {
            (start + by_rate, true)
        } else {
            (start + self.timeout, false)
        }
    }
}

/// Reads the body up to `limits.max` bytes (413 beyond; a declared Content-Length over it is
/// refused unread), counting it against the request's memory as it arrives, and cuts it off with
/// 408 `body_timeout` when it arrives slower than `BODY_MIN_RATE` or not within `BODY_READ_TIMEOUT`.
pub async fn read_body<B>(req: Request<B>, limits: BodyLimits, admission: Option<&Admission>) -> Result<Bytes, ApiError>
where
    B: hyper::body::Body<Data = Bytes>,
    B::Error: Into<BoxError>,
{
    let max = limits.max;
    let too_large =
        || ApiError::too_large(format!("the request body is larger than {max} bytes (MAX_BODY_BYTES); send a smaller image"));
    let declared =
        req.headers().get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()).and_then(|v| v.trim().parse::<u64>().ok());
    if declared.is_some_and(|n| n > max as u64) {
        return Err(too_large());
    }
    let start = Instant::now();
    let mut body = Box::pin(req.into_body());
    let mut buf: Vec<u8> = Vec::with_capacity(declared.map_or(64 << 10, |n| n as usize));
    if let Some(a) = admission {
        a.receiving(buf.capacity())?;
    }
    loop {
        let (deadline, by_rate) = limits.deadline(start, buf.len());
        let frame = match tokio::time::timeout_at(deadline.into(), body.frame()).await {
            Ok(None) => break,
            Ok(Some(Ok(frame))) => frame,
            Ok(Some(Err(e))) => return Err(ApiError::invalid_json(format!("could not read the request body: {}", e.into()))),
            Err(_) => {
                let message = if by_rate {
                    format!(
                        "the request body arrived slower than {} bytes/s (BODY_MIN_RATE; {} bytes in {:.1} s)",
                        limits.min_rate,
                        buf.len(),
                        start.elapsed().as_secs_f64()
                    )
                } else {
                    format!("the request body did not arrive within {:.0} s (BODY_READ_TIMEOUT)", limits.timeout.as_secs_f64())
                };
                return Err(ApiError::new(StatusCode::REQUEST_TIMEOUT, "body_timeout", message));
            }
        };
        if let Some(data) = frame.data_ref() {
            if buf.len() + data.len() > max {
                return Err(too_large());
            }
            if let Some(a) = admission {
                a.receiving((buf.len() + data.len()).max(buf.capacity()))?;
            }
            buf.extend_from_slice(data);
        }
    }
    Ok(Bytes::from(buf))
}
