//! `POST /v1/images/edits`: OpenAI's image-edit API, multipart/form-data as the official SDKs send
//! it, in front of the same edit service as `/run`; OpenAI's response and error shapes.
//!
//! HTTP, multipart and OpenAI's shapes only: the form's fields become a `service::schema::RawInput`
//! (uploads as `ImageSource::Bytes`) that the service validates by the same rules as `/run`'s JSON.
//! What is OpenAI's alone is checked here: `n` (1..=`MAX_N`; the n images get seeds seed..seed+n-1 and
//! are submitted as one group, so they share a batch when `n <= BATCH_SIZE`), `size` (`auto` or `WxH`),
//! `response_format` (`b64_json`; `url` is refused, results are not stored), `mask`, `stream`,
//! `background`. Multipart is parsed by `multer` within `MULTIPART_MAX_PARTS`,
//! `MULTIPART_MAX_PART_BYTES` and `MAX_BODY_BYTES`.

use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http::{header, Request, Response, StatusCode};
use http_body_util::BodyExt;
use schemars::JsonSchema;

use super::wire::{authorize, error_response, json_response, read_body, Body, BodyLimits, BoxError};
use super::AppState;
use crate::config::Settings;
use crate::service::schema::{EditResponse, RawImage, RawInput};
use crate::service::{Admission, ApiError};

/// The form of `POST /v1/images/edits`: what the parser fills from the parts (the OpenAPI document's
/// schema of the request body is generated from it). Unknown fields are ignored, as `/run` does.
#[derive(Debug, Default, JsonSchema)]
#[schemars(rename = "ImageEditRequest")]
pub struct EditForm {
    /// The input image file(s), in order (JPEG, PNG or WebP, sniffed from the bytes): one as `image`,
    /// several as repeated `image[]` (the official SDKs' list form) or repeated `image`. Edit Plus
    /// bundles take up to their image count ("Picture 1" first); other bundles exactly one.
    #[schemars(with = "Vec<Binary>", required)]
    pub image: Vec<Bytes>,
    /// What to change; not empty, at most `MAX_PROMPT_CHARS` characters.
    #[schemars(required)]
    pub prompt: Option<String>,
    /// Refused (400): the model edits by instruction and takes no mask.
    #[schemars(with = "Option<Binary>")]
    pub mask: Option<Bytes>,
    /// Number of images, 1..=`MAX_N` (default 1); image i uses seed + i; all n run in one batch when n <= `BATCH_SIZE`.
    #[schemars(range(min = 1))]
    pub n: Option<i64>,
    /// `auto` (default: the reference's size from the last image) or `WxH`, each side floored to a
    /// multiple of 16 and then 16..=`MAX_OUTPUT_SIDE`.
    pub size: Option<String>,
    /// `b64_json` (default); `url` is refused (400): results are not stored.
    #[schemars(extend("enum" = ["b64_json", "url"]))]
    pub response_format: Option<String>,
    /// `png` (default), `jpeg` or `webp` (lossless).
    #[schemars(extend("enum" = ["png", "jpeg", "jpg", "webp"]))]
    pub output_format: Option<String>,
    /// JPEG quality 0..=100 (0 is taken as 1; default 90); ignored for png and webp.
    #[schemars(range(min = 0, max = 100))]
    pub output_compression: Option<i64>,
    /// Accepted and ignored: the server serves its one bundle, whatever the name.
    pub model: Option<String>,
    /// Accepted and ignored (neither logged nor stored).
    pub user: Option<String>,
    /// `auto` or `opaque`; `transparent` is refused (400): the output has no alpha channel.
    #[schemars(extend("enum" = ["auto", "opaque", "transparent"]))]
    pub background: Option<String>,
    /// Accepted and ignored (OpenAI's quality levels; here `num_inference_steps` sets the effort).
    pub quality: Option<String>,
    /// Accepted and ignored.
    pub input_fidelity: Option<String>,
    /// `false` only: streaming (partial images) is not provided.
    pub stream: Option<bool>,
    /// Extension (as vLLM-Omni and SGLang): true CFG runs when it is given and `true_cfg_scale > 1`.
    pub negative_prompt: Option<String>,
    /// Extension: 1..=100 (default: the bundle's, or `LIGHTNING_STEPS` with Lightning on).
    #[schemars(range(min = 1, max = 100))]
    pub num_inference_steps: Option<i64>,
    /// Extension: 1..=20 (default: the bundle's).
    #[schemars(range(min = 1.0, max = 20.0))]
    pub true_cfg_scale: Option<f64>,
    /// Extension: the first image's seed (0..=2^64-1; default random below 2^32).
    pub seed: Option<u64>,
}

/// A file part in the schema (`type: string, format: binary`).
pub struct Binary;

impl JsonSchema for Binary {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "Binary".into()
    }
    fn inline_schema() -> bool {
        true
    }
    fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
        schemars::json_schema!({"type": "string", "format": "binary"})
    }
}

/// The success body (OpenAI's `ImagesResponse`).
#[derive(serde::Serialize, JsonSchema)]
#[schemars(rename = "ImagesResponse")]
pub struct ImagesResponse {
    /// Unix seconds.
    pub created: u64,
    pub data: Vec<ImageData>,
    /// `png`, `jpeg` or `webp`.
    pub output_format: &'static str,
    /// `WxH` of the images.
    pub size: String,
    /// Always `opaque`.
    pub background: &'static str,
}

/// One image of the response.
#[derive(serde::Serialize, JsonSchema)]
pub struct ImageData {
    /// The image file, standard base64.
    pub b64_json: String,
    /// Extension: this image's seed (the request's seed + its index).
    pub seed: u64,
    /// Extension: as `/run`'s `timings`; `batch_size` is the size of the batch this image ran in.
    pub timings: crate::service::schema::Timings,
}

/// OpenAI's error body: `{"error": {"message", "type", "param", "code"}}`.
#[derive(serde::Serialize, JsonSchema)]
pub struct OpenAiErrorBody {
    pub error: OpenAiError,
}

#[derive(serde::Serialize, JsonSchema)]
pub struct OpenAiError {
    pub message: String,
    /// `invalid_request_error` (4xx) or `server_error` (5xx).
    #[serde(rename = "type")]
    pub kind: &'static str,
    /// The form field at fault, if one is.
    pub param: Option<&'static str>,
    /// The service's stable `error_type` (`/run`'s), `invalid_api_key` for a 401.
    pub code: &'static str,
}

/// Fields whose names start error messages (the service's validation and this module's checks),
/// longest first so that `n` does not shadow `negative_prompt`.
const PARAMS: [&str; 17] = [
    "num_inference_steps",
    "output_compression",
    "response_format",
    "negative_prompt",
    "true_cfg_scale",
    "output_format",
    "background",
    "prompt",
    "height",
    "markup",
    "stream",
    "width",
    "image",
    "mask",
    "seed",
    "size",
    "n",
];

/// The one place where the service's [`ApiError`] becomes OpenAI's error: 400 for every invalid
/// input (`/run`'s 415 and 422 too, as OpenAI answers them), other statuses as they are, with
/// `Retry-After` (503) and `WWW-Authenticate` (401) kept.
pub fn openai_error(e: &ApiError) -> Response<Body> {
    let status = match e.status.as_u16() {
        415 | 422 => StatusCode::BAD_REQUEST,
        _ => e.status,
    };
    let image_error = matches!(e.error_type, "invalid_image" | "unsupported_image_format" | "image_too_large");
    let named = PARAMS
        .iter()
        .copied()
        .find(|p| e.message.strip_prefix(p).is_some_and(|rest| rest.starts_with([' ', '[', ':', '.']) || rest.is_empty()));
    let param = match named {
        Some("width" | "height") => Some("size"),
        Some(p) => Some(p),
        None if image_error || e.message.starts_with("image ") => Some("image"),
        None => None,
    };
    let body = OpenAiErrorBody {
        error: OpenAiError {
            message: e.message.clone(),
            kind: if status.is_server_error() { "server_error" } else { "invalid_request_error" },
            param,
            code: if status == StatusCode::UNAUTHORIZED { "invalid_api_key" } else { e.error_type },
        },
    };
    let mut r = error_response(e);
    *r.status_mut() = status;
    *r.body_mut() = http_body_util::Full::new(Bytes::from(serde_json::to_vec(&body).unwrap_or_default()));
    r
}

fn bad(message: impl Into<String>) -> ApiError {
    ApiError::new(StatusCode::BAD_REQUEST, "invalid_request", message)
}

fn bad_multipart(message: impl Into<String>) -> ApiError {
    ApiError::new(StatusCode::BAD_REQUEST, "invalid_multipart", message)
}

/// `POST /v1/images/edits`: auth, admission (503 at once when there is no room), the body (within
/// `BODY_READ_TIMEOUT` and `BODY_MIN_RATE`, counted against REQUEST_MEMORY as it arrives), the form,
/// then the service, which takes the `n` queue places (all or none: 503 when fewer are free).
pub async fn edits<B>(state: &Arc<AppState>, req: Request<B>, started: Instant) -> Result<Response<Body>, ApiError>
where
    B: hyper::body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    authorize(state, req.headers(), false)?;
    let admission = state.service.admit()?;
    let settings = state.settings();
    let form = read_form(req, settings, Some(&admission)).await?;
    let (input, n) = form.into_input(settings.max_n)?;
    let results = state.service.edit_fields(admission, n, input, started).await?;
    Ok(json_response(StatusCode::OK, images_response(results)))
}

fn images_response(results: Vec<EditResponse>) -> Vec<u8> {
    let first = results.first();
    let size = first.map(|r| format!("{}x{}", r.width, r.height)).unwrap_or_default();
    let output_format = first.map_or("png", |r| r.output_format);
    let created = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let data = results.into_iter().map(|r| ImageData { b64_json: r.image, seed: r.seed, timings: r.timings }).collect();
    let body = ImagesResponse { created, data, output_format, size, background: "opaque" };
    serde_json::to_vec(&body).unwrap_or_default()
}

/// Reads the multipart body into an [`EditForm`] within the multipart limits.
async fn read_form<B>(req: Request<B>, s: &Settings, admission: Option<&Admission>) -> Result<EditForm, ApiError>
where
    B: hyper::body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    let content_type = req.headers().get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or("");
    if !content_type.trim_start().to_ascii_lowercase().starts_with("multipart/form-data") {
        return Err(bad_multipart(format!(
            "the body must be multipart/form-data (as the OpenAI SDKs send it), not `{content_type}`"
        )));
    }
    let boundary = multer::parse_boundary(content_type)
        .map_err(|e| bad_multipart(format!("the Content-Type has no usable boundary: {e}")))?;
    let max_body = s.max_body_bytes;
    // The whole body first, as /run reads it (size, rate, REQUEST_MEMORY); then its parts.
    let body = read_body(req, BodyLimits::of(s), admission).await?;
    let limits = multer::SizeLimit::new().whole_stream(max_body as u64).per_field(s.multipart_max_part_bytes as u64);
    let stream = http_body_util::Full::new(body).into_data_stream();
    let mut multipart = multer::Multipart::with_constraints(stream, boundary, multer::Constraints::new().size_limit(limits));
    let mut form = EditForm::default();
    let mut parts = 0;
    while let Some(field) = multipart.next_field().await.map_err(|e| multipart_error(e, s))? {
        parts += 1;
        if parts > s.multipart_max_parts {
            return Err(bad_multipart(format!("the body has more than {} parts (MULTIPART_MAX_PARTS)", s.multipart_max_parts)));
        }
        let name = field.name().unwrap_or("").to_string();
        let data = field.bytes().await.map_err(|e| multipart_error(e, s))?;
        form.add(&name, data)?;
    }
    Ok(form)
}

fn multipart_error(e: multer::Error, s: &Settings) -> ApiError {
    match e {
        multer::Error::FieldSizeExceeded { field_name, .. } => {
            let name = field_name.as_deref().map(|n| n.trim_end_matches("[]")).filter(|n| PARAMS.contains(n));
            ApiError::too_large(format!(
                "{}a part is larger than {} bytes (MULTIPART_MAX_PART_BYTES)",
                name.map(|n| format!("{n}: ")).unwrap_or_default(),
                s.multipart_max_part_bytes
            ))
        }
        multer::Error::StreamSizeExceeded { .. } => {
            ApiError::too_large(format!("the request body is larger than {} bytes (MAX_BODY_BYTES)", s.max_body_bytes))
        }
        multer::Error::StreamReadFailed(e) => bad_multipart(format!("could not read the request body: {e}")),
        other => bad_multipart(format!("the body is not valid multipart/form-data: {other}")),
    }
}

fn text(name: &'static str, data: Bytes) -> Result<String, ApiError> {
    String::from_utf8(data.to_vec()).map_err(|_| bad(format!("{name} is not UTF-8 text")))
}

fn number<T: std::str::FromStr>(name: &'static str, data: Bytes, what: &str) -> Result<T, ApiError> {
    let s = text(name, data)?;
    s.trim().parse().map_err(|_| bad(format!("{name} must be {what}, got `{}`", s.chars().take(40).collect::<String>())))
}

/// Sets a field once (a repeated field is an error, except the image list).
fn once<T>(slot: &mut Option<T>, name: &'static str, value: T) -> Result<(), ApiError> {
    if slot.is_some() {
        return Err(bad(format!("{name} is given twice")));
    }
    *slot = Some(value);
    Ok(())
}

impl EditForm {
    /// Takes one part. Text values are raw UTF-8 (as the SDKs send them); numbers as the SDKs write
    /// them (`2`, `4.0`), booleans `true`/`false`.
    fn add(&mut self, name: &str, data: Bytes) -> Result<(), ApiError> {
        match name {
            "image" | "image[]" => self.image.push(data),
            "mask" => once(&mut self.mask, "mask", data)?,
            "markup" => {
                return Err(bad("markup is not supported: the model edits by instruction; describe the change in prompt"))
            }
            "prompt" => once(&mut self.prompt, "prompt", text("prompt", data)?)?,
            "n" => once(&mut self.n, "n", number("n", data, "an integer")?)?,
            "size" => once(&mut self.size, "size", text("size", data)?)?,
            "response_format" => once(&mut self.response_format, "response_format", text("response_format", data)?)?,
            "output_format" => once(&mut self.output_format, "output_format", text("output_format", data)?)?,
            "output_compression" => {
                once(&mut self.output_compression, "output_compression", number("output_compression", data, "an integer")?)?
            }
            "model" => self.model = Some(text("model", data)?),
            "user" => self.user = Some(text("user", data)?),
            "background" => once(&mut self.background, "background", text("background", data)?)?,
            "quality" => self.quality = Some(text("quality", data)?),
            "input_fidelity" => self.input_fidelity = Some(text("input_fidelity", data)?),
            "stream" => once(&mut self.stream, "stream", number("stream", data, "true or false")?)?,
            "negative_prompt" => once(&mut self.negative_prompt, "negative_prompt", text("negative_prompt", data)?)?,
            "num_inference_steps" => {
                once(&mut self.num_inference_steps, "num_inference_steps", number("num_inference_steps", data, "an integer")?)?
            }
            "true_cfg_scale" => once(&mut self.true_cfg_scale, "true_cfg_scale", number("true_cfg_scale", data, "a number")?)?,
            "seed" => once(&mut self.seed, "seed", number("seed", data, "an integer in 0..=18446744073709551615")?)?,
            _ => {} // unknown fields are ignored, as /run ignores unknown keys
        }
        Ok(())
    }

    /// The service's raw input and `n`, after the checks that are OpenAI's alone.
    fn into_input(self, max_n: usize) -> Result<(RawInput, usize), ApiError> {
        if self.mask.is_some() {
            return Err(bad(
                "mask is not supported: Qwen-Image-Edit edits by instruction and takes no mask; describe the change (and where) in prompt",
            ));
        }
        if self.stream == Some(true) {
            return Err(bad("stream is not supported: the edit has no partial images; leave stream unset or false"));
        }
        if let Some(f) = self.response_format.as_deref().map(str::trim) {
            match f {
                "b64_json" => {}
                "url" => {
                    return Err(bad(
                        "response_format `url` is not supported: this server does not store results; use b64_json (the default)",
                    ))
                }
                other => return Err(bad(format!("response_format `{other}` is not supported: use b64_json"))),
            }
        }
        if let Some(b) = self.background.as_deref().map(|b| b.trim().to_ascii_lowercase()) {
            if !matches!(b.as_str(), "auto" | "opaque") {
                return Err(bad(format!("background `{b}` is not supported: the output is opaque (auto or opaque)")));
            }
        }
        let n = self.n.unwrap_or(1);
        if n < 1 || n > max_n as i64 {
            return Err(bad(format!("n must be in 1..={max_n} (MAX_N), got {n}")));
        }
        let (width, height) = match self.size.as_deref().map(str::trim) {
            None | Some("auto") => (None, None),
            Some(s) => parse_size(s)?,
        };
        if self.image.is_empty() {
            return Err(bad("image is required: send the image file as `image` (or several as `image[]`)"));
        }
        let images = self.image.into_iter().map(|b| RawImage { bytes: Some(b), ..RawImage::default() }).collect();
        let input = RawInput {
            prompt: self.prompt,
            images: Some(images),
            negative_prompt: self.negative_prompt,
            num_inference_steps: self.num_inference_steps,
            true_cfg_scale: self.true_cfg_scale,
            seed: self.seed,
            width,
            height,
            output_format: self.output_format,
            // OpenAI's 0..=100; JPEG's lowest quality is 1.
            output_quality: self.output_compression.map(|q| if q == 0 { 1 } else { q }),
            ..RawInput::default()
        };
        Ok((input, n as usize))
    }
}

/// `WxH` (also `W×H`, `WXH`) to the raw width and height; the service floors and range-checks them.
fn parse_size(s: &str) -> Result<(Option<i64>, Option<i64>), ApiError> {
    let lower = s.to_ascii_lowercase().replace('×', "x");
    let parsed = lower.split_once('x').and_then(|(w, h)| Some((w.trim().parse::<i64>().ok()?, h.trim().parse::<i64>().ok()?)));
    match parsed {
        Some((w, h)) => Ok((Some(w), Some(h))),
        None => Err(bad(format!(
            "size must be `auto` or `WxH` (e.g. 1024x768; each side floored to a multiple of 16), got `{}`",
            s.chars().take(40).collect::<String>()
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::Full;

    async fn body(r: Response<Body>) -> serde_json::Value {
        serde_json::from_slice(&r.into_body().collect().await.unwrap().to_bytes()).unwrap()
    }

    #[tokio::test]
    async fn errors_take_openai_shape_with_param_and_headers() {
        let cases = [
            (ApiError::validation("prompt is empty: say what"), 400, Some("prompt"), "validation_error"),
            (
                ApiError::validation("num_inference_steps must be in 1..=100, got 0"),
                400,
                Some("num_inference_steps"),
                "validation_error",
            ),
            (ApiError::validation("negative_prompt is 9 characters long"), 400, Some("negative_prompt"), "validation_error"),
            (ApiError::validation("width must be in 16..=2048 pixels"), 400, Some("size"), "validation_error"),
            (bad("n must be in 1..=10 (MAX_N), got 0"), 400, Some("n"), "invalid_request"),
            (
                ApiError::new(StatusCode::UNSUPPORTED_MEDIA_TYPE, "unsupported_image_format", "GIF"),
                400,
                Some("image"),
                "unsupported_image_format",
            ),
            (ApiError::new(StatusCode::BAD_REQUEST, "invalid_image", "image 2: corrupt"), 400, Some("image"), "invalid_image"),
            (bad_multipart("the Content-Type has no usable boundary"), 400, None, "invalid_multipart"),
            (ApiError::too_large("the request body is too large"), 413, None, "payload_too_large"),
            (ApiError::new(StatusCode::UNAUTHORIZED, "unauthorized", "the API key is wrong"), 401, None, "invalid_api_key"),
            (ApiError::internal("bug"), 500, None, "internal_error"),
        ];
        for (e, status, param, code) in cases {
            let r = openai_error(&e);
            assert_eq!(r.status().as_u16(), status, "{e}");
            let v = body(r).await;
            assert_eq!(v["error"]["message"], e.message.as_str());
            assert_eq!(v["error"]["param"].as_str(), param, "{e}");
            assert_eq!(v["error"]["code"], code);
            let kind = if status >= 500 { "server_error" } else { "invalid_request_error" };
            assert_eq!(v["error"]["type"], kind);
            assert_eq!(v.as_object().unwrap().len(), 1);
        }
        let r = openai_error(&ApiError::overloaded("full", std::time::Duration::from_secs(3)));
        assert_eq!((r.status().as_u16(), r.headers()[header::RETRY_AFTER].to_str().unwrap()), (503, "3"));
        let r = openai_error(&ApiError::new(StatusCode::UNAUTHORIZED, "unauthorized", "x"));
        assert_eq!(r.headers()[header::WWW_AUTHENTICATE], "Bearer");
        assert_eq!(r.headers()[header::CONTENT_TYPE], "application/json");
    }

    #[test]
    fn form_fields_become_the_raw_input() {
        let mut f = EditForm::default();
        for (k, v) in [
            ("prompt", "p"),
            ("n", "2"),
            ("size", "1031x40"),
            ("output_compression", "0"),
            ("true_cfg_scale", "4.0"),
            ("seed", "18446744073709551615"),
            ("stream", "false"),
            ("model", "gpt-image-1"),
            ("lst[]", "1"),
        ] {
            f.add(k, Bytes::from(v)).unwrap();
        }
        f.add("image[]", Bytes::from_static(b"a")).unwrap();
        f.add("image", Bytes::from_static(b"b")).unwrap();
        let (input, n) = f.into_input(4).unwrap();
        assert_eq!(n, 2);
        assert_eq!(
            (input.width, input.height, input.output_quality, input.seed),
            (Some(1031), Some(40), Some(1), Some(u64::MAX))
        );
        let images = input.images.unwrap();
        assert_eq!(images.iter().map(|i| i.bytes.clone().unwrap()).collect::<Vec<_>>(), vec![Bytes::from("a"), Bytes::from("b")]);

        let refuse = |fields: &[(&str, &str)], want: &str| {
            let mut f = EditForm::default();
            f.add("image", Bytes::from_static(b"x")).unwrap();
            let r = fields
                .iter()
                .try_for_each(|(k, v)| f.add(k, Bytes::from(v.to_string())))
                .and_then(|()| f.into_input(4).map(|_| ()));
            let e = r.expect_err(want);
            assert_eq!(e.status.as_u16(), 400);
            assert!(e.message.starts_with(want), "{}", e.message);
        };
        refuse(&[("mask", "m")], "mask is not supported");
        refuse(&[("n", "5")], "n must be in 1..=4");
        refuse(&[("n", "0")], "n must be in");
        refuse(&[("n", "two")], "n must be an integer");
        refuse(&[("size", "big")], "size must be `auto` or `WxH`");
        refuse(&[("response_format", "url")], "response_format `url` is not supported");
        refuse(&[("stream", "true")], "stream is not supported");
        refuse(&[("background", "transparent")], "background `transparent`");
        refuse(&[("prompt", "a"), ("prompt", "b")], "prompt is given twice");
        refuse(&[("seed", "-1")], "seed must be an integer");
        let mut f = EditForm::default();
        f.add("prompt", Bytes::from("p")).unwrap();
        assert!(f.into_input(4).unwrap_err().message.starts_with("image is required"));
    }

    #[tokio::test]
    async fn multipart_limits() {
        let s = Settings { multipart_max_parts: 3, multipart_max_part_bytes: 1024, max_body_bytes: 4096, ..Settings::builtin() };
        let req = |ct: &str, body: String| {
            Request::builder()
                .method("POST")
                .uri("/v1/images/edits")
                .header("content-type", ct)
                .body(Full::new(Bytes::from(body)))
                .unwrap()
        };
        let part = |name: &str, value: &str| format!("--B\r\nContent-Disposition: form-data; name=\"{name}\"\r\n\r\n{value}\r\n");
        let ok = format!("{}{}--B--\r\n", part("prompt", "p"), part("image", "xyz"));
        let f = read_form(req("multipart/form-data; boundary=B", ok.clone()), &s, None).await.unwrap();
        assert_eq!((f.prompt.as_deref(), f.image.len()), (Some("p"), 1));
        let e = read_form(req("multipart/form-data", ok.clone()), &s, None).await.unwrap_err();
        assert_eq!((e.status.as_u16(), e.error_type), (400, "invalid_multipart"), "{e}");
        let e = read_form(req("application/json", "{}".into()), &s, None).await.unwrap_err();
        assert_eq!(e.error_type, "invalid_multipart");
        let many = format!("{}--B--\r\n", (0..4).map(|i| part(&format!("x{i}"), "v")).collect::<String>());
        let e = read_form(req("multipart/form-data; boundary=B", many), &s, None).await.unwrap_err();
        assert!(e.message.contains("MULTIPART_MAX_PARTS"), "{e}");
        let big = format!("{}--B--\r\n", part("image", &"x".repeat(2000)));
        let e = read_form(req("multipart/form-data; boundary=B", big), &s, None).await.unwrap_err();
        assert_eq!((e.status.as_u16(), e.message.starts_with("image:")), (413, true), "{e}");
        let e = read_form(req("multipart/form-data; boundary=B", ok[..ok.len() - 12].to_string()), &s, None).await.unwrap_err();
        assert_eq!((e.status.as_u16(), e.error_type), (400, "invalid_multipart"), "truncated: {e}");
        let s = Settings { max_body_bytes: 2048, ..s };
        let huge = format!("{}--B--\r\n", (0..3).map(|_| part("image", &"x".repeat(1000))).collect::<String>());
        let e = read_form(req("multipart/form-data; boundary=B", huge), &s, None).await.unwrap_err();
        assert_eq!(e.status.as_u16(), 413, "{e}");
    }
}
