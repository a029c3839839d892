//! The HTTP error of the API: a status, a stable machine-readable `error_type` and a message that
//! names the cause and the fix, rendered as `{"error": ..., "error_type": ...}`.

use std::time::Duration;

use http::StatusCode;

use crate::imaging;
use crate::pipeline::EditError;

/// An error response. `error_type` values are part of the API (clients switch on them):
///
/// | status | error_type | when |
/// | --- | --- | --- |
/// | 400 | `invalid_json` | the body is not JSON, not an object, or has no `input` object |
/// | 400 | `invalid_base64` | `image_base64` is not base64 (or a data URI that is not base64) |
/// | 400 | `invalid_image` | the image is corrupt or truncated |
/// | 400 | `invalid_multipart` / `invalid_request` | `/v1/images/edits`: a malformed multipart body / a refused form field |
/// | 401 | `unauthorized` | `API_KEY` is set and the bearer token is missing or wrong |
/// | 404 / 405 | `not_found` / `method_not_allowed` | unknown route or method |
/// | 408 | `body_timeout` | the body did not arrive within `BODY_READ_TIMEOUT`, or slower than `BODY_MIN_RATE` |
/// | 413 | `payload_too_large` | body over `MAX_BODY_BYTES`, download over `URL_MAX_BYTES` |
/// | 413 | `image_too_large` | image dimensions over the limits (checked before decoding) |
/// | 413 | `over_memory_limit` | even one job of this size does not fit in the memory a batch may use (MEMORY_LIMIT) |
/// | 415 | `unsupported_image_format` | not JPEG, PNG or WebP |
/// | 422 | `validation_error` | a field is missing, of the wrong type or out of range |
/// | 422 | `prompt_too_long` | the prompt has more tokens than the bundle accepts |
/// | 422 | `invalid_url` / `url_not_allowed` / `image_fetch_failed` | `image_url` problems |
/// | 503 | `overloaded` (with `Retry-After`) / `not_ready` | queue, body slots or REQUEST_MEMORY full / loading or draining |
/// | 504 | `timeout` | the request took longer than `REQUEST_TIMEOUT` |
/// | 500 | `engine_error` / `internal_error` | the engine failed this batch / a server bug |
#[derive(Debug, Clone, PartialEq)]
pub struct ApiError {
    pub status: StatusCode,
    pub error_type: &'static str,
    pub message: String,
    /// `Retry-After` seconds (503 only).
    pub retry_after: Option<Duration>,
}

impl ApiError {
    pub fn new(status: StatusCode, error_type: &'static str, message: impl Into<String>) -> ApiError {
        ApiError { status, error_type, message: message.into(), retry_after: None }
    }
    pub fn invalid_json(m: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::BAD_REQUEST, "invalid_json", m)
    }
    pub fn validation(m: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, "validation_error", m)
    }
    pub fn too_large(m: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large", m)
    }
    pub fn internal(m: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal_error", m)
    }
    pub fn overloaded(m: impl Into<String>, retry_after: Duration) -> ApiError {
        ApiError { retry_after: Some(retry_after), ..ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "overloaded", m) }
    }
    pub fn not_ready(m: impl Into<String>, retry_after: Duration) -> ApiError {
        ApiError { retry_after: Some(retry_after), ..ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "not_ready", m) }
    }

    /// The JSON body.
    pub fn body(&self) -> String {
        serde_json::json!({ "error": self.message, "error_type": self.error_type }).to_string()
    }
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}: {}", self.status.as_u16(), self.error_type, self.message)
    }
}

impl From<imaging::Error> for ApiError {
    fn from(e: imaging::Error) -> ApiError {
        let m = e.to_string();
        match e {
            imaging::Error::Unsupported(_) => ApiError::new(StatusCode::UNSUPPORTED_MEDIA_TYPE, "unsupported_image_format", m),
            imaging::Error::Corrupt { .. } => ApiError::new(StatusCode::BAD_REQUEST, "invalid_image", m),
            imaging::Error::TooLarge { .. } => ApiError::new(StatusCode::PAYLOAD_TOO_LARGE, "image_too_large", m),
            imaging::Error::Encode { .. } | imaging::Error::Invalid(_) => ApiError::internal(m),
        }
    }
}

impl From<EditError> for ApiError {
    fn from(e: EditError) -> ApiError {
        let m = e.to_string();
        match e {
            EditError::Invalid(_) => ApiError::validation(m),
            EditError::PromptTooLong { .. } => ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, "prompt_too_long", m),
            EditError::Engine(_) => ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "engine_error",
                format!("the engine failed while running this request's batch: {m}; the server keeps serving, retry the request"),
            ),
            EditError::Internal(_) => ApiError::internal(m),
            // Only a request that nobody waits for gets it; answered as a retryable 503 anyway.
            EditError::Cancelled => ApiError::not_ready(m, Duration::from_secs(1)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn imaging_errors_map_to_statuses() {
        let e: ApiError = imaging::Error::Unsupported("GIF".into()).into();
        assert_eq!((e.status.as_u16(), e.error_type), (415, "unsupported_image_format"));
        let e: ApiError = imaging::Error::Corrupt { format: "PNG", reason: "eof".into() }.into();
        assert_eq!((e.status.as_u16(), e.error_type), (400, "invalid_image"));
        let e: ApiError =
            imaging::Limits { max_width: 10, max_height: 10, max_pixels: 100 }.check(50000, 50000).unwrap_err().into();
        assert_eq!((e.status.as_u16(), e.error_type), (413, "image_too_large"));
        assert!(e.message.contains("50000x50000"), "{}", e.message);
    }

    #[test]
    fn edit_errors_map_to_statuses() {
        let e: ApiError = EditError::PromptTooLong { tokens: 2000, max: 1024 }.into();
        assert_eq!((e.status.as_u16(), e.error_type), (422, "prompt_too_long"));
        let e: ApiError = EditError::Invalid("width too small".into()).into();
        assert_eq!((e.status.as_u16(), e.error_type), (422, "validation_error"));
        let e: ApiError = EditError::Internal("x".into()).into();
        assert_eq!(e.status.as_u16(), 500);
    }

    #[test]
    fn body_is_the_documented_json() {
        let e = ApiError::overloaded("queue full", Duration::from_secs(2));
        let v: serde_json::Value = serde_json::from_str(&e.body()).unwrap();
        assert_eq!(v["error"], "queue full");
        assert_eq!(v["error_type"], "overloaded");
        assert_eq!(e.status.as_u16(), 503);
        assert_eq!(e.retry_after, Some(Duration::from_secs(2)));
    }
}
