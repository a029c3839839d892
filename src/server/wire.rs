//! What every route shares: reading a body within its limit, checking the API key, and writing
//! JSON and error responses (`Retry-After`, `WWW-Authenticate`, `Allow` where they belong).

use bytes::Bytes;
use http::{header, HeaderMap, HeaderValue, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use subtle::ConstantTimeEq;

use super::AppState;
use crate::service::ApiError;

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

#[cfg(test)]
mod tests {
    use super::*;
    use http::Method;

    fn req(method: Method, path: &str, body: &str) -> Request<Full<Bytes>> {
        Request::builder().method(method).uri(path).body(Full::new(Bytes::from(body.to_string()))).unwrap()
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
