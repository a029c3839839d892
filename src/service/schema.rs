//! The JSON of `POST /run` / `/runsync`: parsing and validating `{"input": {...}}` into an
//! [`EditParams`], and the response body. Knows JSON, not images or tensors.
//!
//! A front end whose fields arrive already parsed (the OpenAI route's multipart form) fills a
//! [`RawInput`] itself (images as [`ImageSource::Bytes`]) and the service runs the same [`validate`]
//! on it; only the field names in messages differ ([`Names`]).
//!
//! Field rules (the API contract; README "HTTP API" repeats them):
//! - `prompt`: required string, not empty or only whitespace, at most `MAX_PROMPT_CHARS` characters;
//!   passed on exactly as sent (not trimmed).
//! - exactly one image source: `image_base64` (raw base64 or a `data:image/...;base64,` URI),
//!   `image_url` (http/https) or `image_path` (a file under `IMAGE_PATH_ROOT`); Edit Plus bundles also
//!   take `images`: a list of `{"image_base64"|"image_url"|"image_path"}` objects (1..=`max_images`;
//!   "Picture 1" is the first). `null` counts as absent.
//! - `negative_prompt`: optional string; when present (even `""`) and `true_cfg_scale > 1`, true CFG runs
//!   (the reference's rule).
//! - `num_inference_steps`: integer 1..=100; default the bundle's (50), or `LIGHTNING_STEPS` with Lightning on.
//! - `true_cfg_scale`: number 1..=20; default the bundle's (4.0).
//! - `seed`: integer 0..=2^64-1; absent or `null` = random (below 2^32), returned in the response.
//! - `width`, `height`: optional integers, each floored to a multiple of 16 like the reference, then
//!   required in 16..=`MAX_OUTPUT_SIDE`; absent = the reference's size from the (last) input image.
//! - `output_format`: `png` (default), `jpeg`/`jpg` or `webp`; `output_quality` 1..=100 for JPEG (default 90).
//! - Unknown fields, inside `input` and beside it (RunPod's `id`, `webhook`, `policy`, ...), are ignored,
//!   as the Python handler (and RunPod's own handlers, which read the keys they know) did.

use bytes::Bytes;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::error::ApiError;
use crate::imaging::OutputFormat;

/// Where one input image comes from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ImageSource {
    /// The `image_base64` string as sent (raw base64 or a data URI), decoded later off the reactor.
    Base64(String),
    /// The `image_url` string as sent.
    Url(String),
    /// The `image_path` string as sent (resolved under `IMAGE_PATH_ROOT` when the image is loaded).
    Path(String),
    /// The image file itself (an upload), decoded later off the reactor under the same limits.
    Bytes(Bytes),
}

/// A validated edit request with every default applied.
#[derive(Clone, Debug, PartialEq)]
pub struct EditParams {
    pub prompt: String,
    pub negative_prompt: Option<String>,
    pub images: Vec<ImageSource>,
    pub num_inference_steps: u32,
    pub true_cfg_scale: f32,
    pub seed: u64,
    pub width: Option<u32>,
    pub height: Option<u32>,
    pub output_format: OutputFormat,
}

/// What validation needs to know about the server and its bundle.
#[derive(Clone, Debug)]
pub struct Limits {
    pub default_steps: u32,
    pub default_true_cfg_scale: f32,
    /// 1 for Qwen-Image-Edit; more for Edit Plus.
    pub max_images: usize,
    pub max_prompt_chars: usize,
    pub max_output_side: u32,
    /// `MAX_STEPS`.
    pub max_steps: u32,
}

pub const MIN_STEPS: i64 = 1;
/// `input.images` longer than this is refused while it is parsed, before more is allocated (the
/// bundle's own limit, at most 4, is checked after).
pub const MAX_IMAGES_PARSED: usize = 16;
pub const MIN_CFG: f64 = 1.0;
pub const MAX_CFG: f64 = 20.0;
/// Output sizes are floored to a multiple of this (`vae_scale_factor * 2` in the reference).
pub const SIZE_MULTIPLE: u32 = 16;
pub const DEFAULT_JPEG_QUALITY: u8 = 90;

/// The body of `POST /run` / `/runsync` (other top-level keys, like RunPod's `id`, are ignored).
#[derive(Deserialize, JsonSchema)]
#[schemars(rename = "RunRequest")]
pub struct Envelope {
    #[schemars(required)]
    input: Option<RawInput>,
}

/// One input image: exactly one of the three sources.
#[derive(Debug, Default, Deserialize, JsonSchema)]
#[schemars(rename = "InputImage")]
pub struct RawImage {
    /// Raw base64 (standard or URL-safe alphabet, padding optional) or a `data:image/...;base64,` URI.
    pub image_base64: Option<String>,
    /// An http(s) URL, fetched with the SSRF guard.
    pub image_url: Option<String>,
    /// A file under `IMAGE_PATH_ROOT`.
    pub image_path: Option<String>,
    /// The file itself (a front end's upload; not part of the JSON).
    #[serde(skip)]
    #[schemars(skip)]
    pub bytes: Option<Bytes>,
}

/// The `input` of an edit request, as sent: types checked, nothing else. [`validate`] applies the rules.
#[derive(Debug, Default, Deserialize, JsonSchema)]
#[schemars(rename = "EditInput")]
pub struct RawInput {
    /// What to change in the image; not empty, at most `MAX_PROMPT_CHARS` characters.
    #[schemars(required)]
    pub prompt: Option<String>,
    pub image_base64: Option<String>,
    pub image_url: Option<String>,
    pub image_path: Option<String>,
    /// Edit Plus bundles: the input images in order ("Picture 1" first), instead of the single-image fields.
    #[serde(default, deserialize_with = "capped_images")]
    pub images: Option<Vec<RawImage>>,
    /// True CFG runs when this is given (even empty) and `true_cfg_scale > 1`.
    pub negative_prompt: Option<String>,
    #[schemars(range(min = 1, max = 100))]
    pub num_inference_steps: Option<i64>,
    #[schemars(range(min = 1.0, max = 20.0))]
    pub true_cfg_scale: Option<f64>,
    /// Absent or null: random below 2^32, returned in the response.
    pub seed: Option<u64>,
    /// Floored to a multiple of 16, then 16..=`MAX_OUTPUT_SIDE`; absent: the reference's size.
    pub width: Option<i64>,
    /// As `width`.
    pub height: Option<i64>,
    /// `png` (default), `jpeg`/`jpg`, `webp` (lossless).
    pub output_format: Option<String>,
    /// JPEG quality (default 90).
    #[schemars(range(min = 1, max = 100))]
    pub output_quality: Option<i64>,
}

/// How messages name the fields: `input.prompt` in the JSON API, `prompt` in a form.
#[derive(Clone, Copy, Debug)]
pub struct Names {
    /// Before every field name (`input.` or nothing).
    pub prefix: &'static str,
    /// The image list (`input.images`, or a form's `image`).
    pub images: &'static str,
    /// The JPEG quality (`input.output_quality`, or OpenAI's `output_compression`).
    pub quality: &'static str,
    /// Its lowest accepted value: 1, or OpenAI's 0 (taken as 1, JPEG's lowest quality).
    pub quality_min: i64,
}

impl Names {
    pub const JSON: Names = Names { prefix: "input.", images: "input.images", quality: "input.output_quality", quality_min: 1 };
    pub const FORM: Names = Names { prefix: "", images: "image", quality: "output_compression", quality_min: 0 };
}

/// `input.images`, refused as soon as it has more than [`MAX_IMAGES_PARSED`] entries: a body of
/// millions of `{}` must not become millions of allocated entries first.
fn capped_images<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<Vec<RawImage>>, D::Error> {
    use serde::de::{Error, SeqAccess, Visitor};
    struct List;
    impl<'de> Visitor<'de> for List {
        type Value = Option<Vec<RawImage>>;
        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("a list of image objects")
        }
        fn visit_none<E: Error>(self) -> Result<Self::Value, E> {
            Ok(None)
        }
        fn visit_unit<E: Error>(self) -> Result<Self::Value, E> {
            Ok(None)
        }
        fn visit_some<D: serde::Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
            d.deserialize_seq(self)
        }
        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
            let mut list = Vec::new();
            while let Some(image) = seq.next_element::<RawImage>()? {
                if list.len() == MAX_IMAGES_PARSED {
                    return Err(A::Error::custom(format!("more than {MAX_IMAGES_PARSED} images")));
                }
                list.push(image);
            }
            Ok(Some(list))
        }
    }
    d.deserialize_option(List)
}

/// Parses and validates a request body. `random_seed` supplies the seed when none is given.
pub fn parse(body: &[u8], limits: &Limits, random_seed: impl FnOnce() -> u64) -> Result<EditParams, ApiError> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Err(ApiError::invalid_json(
            "the request body is empty; send {\"input\": {\"prompt\": ..., \"image_base64\": ...}}",
        ));
    }
    if body.iter().find(|b| !b.is_ascii_whitespace()) != Some(&b'{') {
        // (serde would also accept a struct written as a JSON array)
        let what = if serde_json::from_slice::<serde::de::IgnoredAny>(body).is_ok() {
            "a JSON value but not an object"
        } else {
            "not valid JSON"
        };
        return Err(ApiError::invalid_json(format!(
            "the body is {what}; send {{\"input\": {{\"prompt\": ..., \"image_base64\": ...}}}}"
        )));
    }
    let mut de = serde_json::Deserializer::from_slice(body);
    let envelope: Envelope = serde_path_to_error::deserialize(&mut de).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        match inner.classify() {
            serde_json::error::Category::Data if path != "." => {
                ApiError::validation(format!("{path}: {}", strip_position(&inner)))
            }
            serde_json::error::Category::Data => ApiError::invalid_json(format!(
                "the body must be a JSON object {{\"input\": {{...}}}}: {}",
                strip_position(&inner)
            )),
            _ => ApiError::invalid_json(format!("the body is not valid JSON: {inner}")),
        }
    })?;
    de.end().map_err(|e| ApiError::invalid_json(format!("the body is not valid JSON: {e}")))?;
    let input = envelope.input.ok_or_else(|| {
        ApiError::invalid_json("the body has no \"input\" object; send {\"input\": {\"prompt\": ..., \"image_base64\": ...}}")
    })?;
    validate(input, limits, Names::JSON, random_seed)
}

/// serde_json appends " at line 1 column 42" to data errors; the path already says where.
fn strip_position(e: &serde_json::Error) -> String {
    let s = e.to_string();
    match s.rfind(" at line ") {
        Some(i) => s[..i].to_string(),
        None => s,
    }
}

/// Validates an input against the rules above (the JSON API's and every other front end's), naming
/// fields as `names` says. `random_seed` supplies the seed when none is given.
pub fn validate(r: RawInput, l: &Limits, names: Names, random_seed: impl FnOnce() -> u64) -> Result<EditParams, ApiError> {
    let p = names.prefix;
    let prompt =
        r.prompt.ok_or_else(|| ApiError::validation(format!("{p}prompt is required: say what to change in the image")))?;
    if prompt.trim().is_empty() {
        return Err(ApiError::validation(format!("{p}prompt is empty: say what to change in the image")));
    }
    check_chars(&format!("{p}prompt"), &prompt, l.max_prompt_chars)?;
    if let Some(n) = &r.negative_prompt {
        check_chars(&format!("{p}negative_prompt"), n, l.max_prompt_chars)?;
    }

    let single = RawImage { image_base64: r.image_base64, image_url: r.image_url, image_path: r.image_path, bytes: None };
    let images = image_sources(single, r.images, l.max_images, names)?;

    let num_inference_steps = match r.num_inference_steps {
        None => l.default_steps,
        Some(s) if (MIN_STEPS..=i64::from(l.max_steps)).contains(&s) => s as u32,
        Some(s) => {
            return Err(ApiError::validation(format!(
                "{p}num_inference_steps must be in {MIN_STEPS}..={}, got {s} (MAX_STEPS)",
                l.max_steps
            )))
        }
    };
    if num_inference_steps > l.max_steps {
        return Err(ApiError::validation(format!(
            "{p}num_inference_steps is required: the default ({num_inference_steps}) is above MAX_STEPS ({})",
            l.max_steps
        )));
    }
    let true_cfg_scale = match r.true_cfg_scale {
        None => l.default_true_cfg_scale,
        Some(c) if (MIN_CFG..=MAX_CFG).contains(&c) => c as f32,
        Some(c) => return Err(ApiError::validation(format!("{p}true_cfg_scale must be in {MIN_CFG}..={MAX_CFG}, got {c:?}"))),
    };
    let seed = r.seed.unwrap_or_else(random_seed);
    let width = r.width.map(|w| output_side(&format!("{p}width"), w, l.max_output_side)).transpose()?;
    let height = r.height.map(|h| output_side(&format!("{p}height"), h, l.max_output_side)).transpose()?;
    let quality = match r.output_quality {
        None => DEFAULT_JPEG_QUALITY,
        Some(q) if (names.quality_min..=100).contains(&q) => q.max(1) as u8,
        Some(q) => {
            return Err(ApiError::validation(format!("{} must be in {}..=100, got {q}", names.quality, names.quality_min)));
        }
    };
    let output_format = match r.output_format.as_deref().map(|s| s.trim().to_ascii_lowercase()) {
        None => OutputFormat::Png,
        Some(f) => match f.as_str() {
            "png" => OutputFormat::Png,
            "jpeg" | "jpg" => OutputFormat::Jpeg { quality },
            "webp" => OutputFormat::Webp,
            _ => return Err(ApiError::validation(format!("{p}output_format `{f}` is not supported: use png, jpeg or webp"))),
        },
    };
    Ok(EditParams {
        prompt,
        negative_prompt: r.negative_prompt,
        images,
        num_inference_steps,
        true_cfg_scale,
        seed,
        width,
        height,
        output_format,
    })
}

fn check_chars(name: &str, s: &str, max: usize) -> Result<(), ApiError> {
    // Cheap bound first: a string of at most `max` chars has at most 4*max bytes.
    if s.len() > max && s.chars().count() > max {
        return Err(ApiError::validation(format!("{name} is {} characters long; at most {max} are accepted", s.chars().count())));
    }
    Ok(())
}

fn output_side(name: &str, v: i64, max: u32) -> Result<u32, ApiError> {
    let floored = if v > 0 { (v / i64::from(SIZE_MULTIPLE)) * i64::from(SIZE_MULTIPLE) } else { v };
    if floored < i64::from(SIZE_MULTIPLE) || floored > i64::from(max) {
        return Err(ApiError::validation(format!(
            "{name} must be in {SIZE_MULTIPLE}..={max} pixels (it is floored to a multiple of {SIZE_MULTIPLE}), got {v}"
        )));
    }
    Ok(floored as u32)
}

fn one_source(where_: &str, raw: RawImage) -> Result<ImageSource, ApiError> {
    if let Some(b) = raw.bytes {
        if b.is_empty() {
            return Err(ApiError::new(
                http::StatusCode::BAD_REQUEST,
                "invalid_image",
                format!("{} is an empty file", where_.trim_end_matches('.')),
            ));
        }
        return Ok(ImageSource::Bytes(b));
    }
    let given = [raw.image_base64.is_some(), raw.image_url.is_some(), raw.image_path.is_some()];
    if given.iter().filter(|g| **g).count() > 1 {
        let names: Vec<String> = ["image_base64", "image_url", "image_path"]
            .iter()
            .zip(given)
            .filter(|(_, g)| *g)
            .map(|(n, _)| format!("{where_}{n}"))
            .collect();
        let verb = if names.len() == 2 { "are both given" } else { "are all given" };
        return Err(ApiError::validation(format!("{} {verb}: send exactly one", names.join(" and "))));
    }
    if let Some(b) = raw.image_base64 {
        if b.trim().is_empty() {
            return Err(ApiError::validation(format!("{where_}image_base64 is empty")));
        }
        return Ok(ImageSource::Base64(b));
    }
    if let Some(u) = raw.image_url {
        if u.trim().is_empty() {
            return Err(ApiError::new(
                http::StatusCode::UNPROCESSABLE_ENTITY,
                "invalid_url",
                format!("{where_}image_url is empty"),
            ));
        }
        return Ok(ImageSource::Url(u));
    }
    if let Some(p) = raw.image_path {
        if p.trim().is_empty() {
            return Err(ApiError::validation(format!("{where_}image_path is empty")));
        }
        return Ok(ImageSource::Path(p));
    }
    Err(ApiError::validation(format!("{where_}image_base64, {where_}image_url or {where_}image_path is required")))
}

fn image_sources(
    single: RawImage,
    images: Option<Vec<RawImage>>,
    max_images: usize,
    names: Names,
) -> Result<Vec<ImageSource>, ApiError> {
    let (p, list_name) = (names.prefix, names.images);
    match images {
        None => Ok(vec![one_source(p, single)?]),
        Some(_) if single.image_base64.is_some() || single.image_url.is_some() || single.image_path.is_some() => {
            Err(ApiError::validation(format!(
                "{list_name} cannot be combined with {p}image_base64, {p}image_url or {p}image_path: send one of them"
            )))
        }
        Some(list) => {
            if list.is_empty() {
                return Err(ApiError::validation(format!("{list_name} is empty: send at least one image")));
            }
            if list.len() > max_images {
                return Err(ApiError::validation(if max_images == 1 {
                    format!("{list_name} has {} images; this bundle edits exactly one image (multi-image editing needs an Edit Plus (2509/2511) bundle)", list.len())
                } else {
                    format!("{list_name} has {} images; at most {max_images} are accepted", list.len())
                }));
            }
            list.into_iter().enumerate().map(|(i, im)| one_source(&format!("{list_name}[{i}]."), im)).collect()
        }
    }
}

/// Per-request timings returned with the result.
#[derive(Clone, Debug, Serialize, PartialEq, JsonSchema)]
pub struct Timings {
    /// Reading the body, base64, fetching and decoding the images, preparing the job.
    pub preprocess_ms: f64,
    /// Waiting in the batcher's queue.
    pub queue_ms: f64,
    /// Running the batch this job was part of.
    pub compute_ms: f64,
    /// Encoding the result image and base64.
    pub encode_ms: f64,
    /// How many jobs shared the batch.
    pub batch_size: usize,
}

/// The success body. `image` (base64, no data-URI prefix) is what existing clients read.
#[derive(Clone, Debug, Serialize, JsonSchema)]
pub struct EditResponse {
    /// Standard base64 (its alphabet needs no JSON escaping, which `to_json` relies on).
    #[serde(skip)]
    pub image: String,
    pub prompt: String,
    pub num_inference_steps: u32,
    pub lightning_enabled: bool,
    pub seed: u64,
    pub width: u32,
    pub height: u32,
    pub true_cfg_scale: f32,
    pub output_format: &'static str,
    pub timings: Timings,
}

impl EditResponse {
    /// The JSON body, `image` first. The multi-megabyte base64 string is copied in as is instead of
    /// going through serde_json's escaping scan (base64 has nothing to escape); ~5 ms less per 1 MP PNG.
    pub fn to_json(&self) -> Vec<u8> {
        debug_assert!(self.image.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'+' || b == b'/' || b == b'='));
        let rest = serde_json::to_vec(self).unwrap_or_else(|_| b"{}".to_vec());
        let mut out = Vec::with_capacity(self.image.len() + rest.len() + 16);
        out.extend_from_slice(b"{\"image\":\"");
        out.extend_from_slice(self.image.as_bytes());
        out.extend_from_slice(b"\"");
        if rest.len() > 2 {
            out.push(b',');
        }
        out.extend_from_slice(&rest[1..]);
        out
    }
}

/// The API name of an output format.
pub fn format_name(f: OutputFormat) -> &'static str {
    match f {
        OutputFormat::Png => "png",
        OutputFormat::Jpeg { .. } => "jpeg",
        OutputFormat::Webp => "webp",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> Limits {
        Limits {
            default_steps: 50,
            default_true_cfg_scale: 4.0,
            max_images: 1,
            max_prompt_chars: 100,
            max_output_side: 2048,
            max_steps: 100,
        }
    }

    fn p(body: &str) -> Result<EditParams, ApiError> {
        parse(body.as_bytes(), &limits(), || 7)
    }

    fn err(body: &str) -> (u16, &'static str, String) {
        let e = p(body).expect_err(body);
        (e.status.as_u16(), e.error_type, e.message)
    }

    #[test]
    fn minimal_request_gets_the_defaults() {
        let r = p(r#"{"input": {"prompt": "make it blue", "image_base64": "AAAA"}, "id": "x", "webhook": "y"}"#).unwrap();
        assert_eq!(r.prompt, "make it blue");
        assert_eq!(r.images, vec![ImageSource::Base64("AAAA".into())]);
        assert_eq!((r.num_inference_steps, r.true_cfg_scale, r.seed), (50, 4.0, 7));
        assert_eq!((r.width, r.height, r.negative_prompt), (None, None, None));
        assert_eq!(r.output_format, OutputFormat::Png);
    }

    #[test]
    fn full_request() {
        let r =
            p(r#"{"input": {"prompt": " p ", "image_url": "https://x/y.png", "negative_prompt": "", "num_inference_steps": 100,
                   "true_cfg_scale": 1, "seed": 18446744073709551615, "width": 1031, "height": 16, "output_format": "JPG",
                   "output_quality": 75, "unknown": {"nested": [1]}}}"#)
            .unwrap();
        assert_eq!(r.prompt, " p ");
        assert_eq!(r.images, vec![ImageSource::Url("https://x/y.png".into())]);
        assert_eq!(r.negative_prompt.as_deref(), Some(""));
        assert_eq!((r.num_inference_steps, r.true_cfg_scale, r.seed), (100, 1.0, u64::MAX));
        assert_eq!((r.width, r.height), (Some(1024), Some(16)));
        assert_eq!(r.output_format, OutputFormat::Jpeg { quality: 75 });
    }

    #[test]
    fn bad_bodies() {
        assert_eq!(err("").1, "invalid_json");
        assert_eq!(err("{").1, "invalid_json");
        assert_eq!(err("[1,2]").1, "invalid_json", "{}", err("[1,2]").2);
        assert_eq!(err("{}").1, "invalid_json");
        assert_eq!(err(r#"{"input": {"prompt": "x", "image_base64": "AA"}} trailing"#).1, "invalid_json");
        assert_eq!(err(r#"{"input": null}"#).1, "invalid_json");
        let (s, t, m) = err(r#"{"input": "prompt"}"#);
        assert_eq!((s, t), (422, "validation_error"), "{m}");
        let (s, t, m) = err(r#"{"input": {"prompt": 5, "image_base64": "AA"}}"#);
        assert_eq!((s, t), (422, "validation_error"));
        assert!(m.starts_with("input.prompt: invalid type: integer `5`, expected a string"), "{m}");
        let (_, t, m) = err(r#"{"input": {"prompt": "x", "image_base64": "AA", "seed": -1}}"#);
        assert_eq!(t, "validation_error");
        assert!(m.contains("input.seed"), "{m}");
        let (_, _, m) = err(r#"{"input": {"prompt": "x", "image_base64": "AA", "num_inference_steps": 2.5}}"#);
        assert!(m.contains("input.num_inference_steps"), "{m}");
    }

    #[test]
    fn field_rules() {
        let cases = [
            (r#"{"input": {"image_base64": "AA"}}"#, "input.prompt is required"),
            (r#"{"input": {"prompt": "  \n", "image_base64": "AA"}}"#, "input.prompt is empty"),
            (r#"{"input": {"prompt": "x"}}"#, "is required"),
            (r#"{"input": {"prompt": "x", "image_base64": "AA", "image_url": "http://a"}}"#, "both given"),
            (r#"{"input": {"prompt": "x", "image_base64": null, "image_url": null}}"#, "is required"),
            (r#"{"input": {"prompt": "x", "image_base64": "AA", "num_inference_steps": 0}}"#, "1..=100, got 0"),
            (r#"{"input": {"prompt": "x", "image_base64": "AA", "num_inference_steps": 1000}}"#, "got 1000"),
            (r#"{"input": {"prompt": "x", "image_base64": "AA", "true_cfg_scale": 0.5}}"#, "true_cfg_scale"),
            (r#"{"input": {"prompt": "x", "image_base64": "AA", "true_cfg_scale": 21}}"#, "true_cfg_scale"),
            // A huge number is echoed in exponent form, not as 309 digits.
            (r#"{"input": {"prompt": "x", "image_base64": "AA", "true_cfg_scale": 1e308}}"#, "1..=20, got 1e308"),
            (r#"{"input": {"prompt": "x", "image_base64": "AA", "width": -64}}"#, "input.width must be in 16..=2048"),
            (r#"{"input": {"prompt": "x", "image_base64": "AA", "height": 15}}"#, "got 15"),
            (r#"{"input": {"prompt": "x", "image_base64": "AA", "height": 4096}}"#, "got 4096"),
            (r#"{"input": {"prompt": "x", "image_base64": "AA", "output_format": "gif"}}"#, "`gif` is not supported"),
            (r#"{"input": {"prompt": "x", "image_base64": "AA", "output_quality": 0}}"#, "output_quality"),
            (r#"{"input": {"prompt": "x", "images": []}}"#, "input.images is empty"),
            (r#"{"input": {"prompt": "x", "images": [{"image_base64": "AA"}, {"image_url": "http://a"}]}}"#, "exactly one image"),
            (r#"{"input": {"prompt": "x", "image_base64": "AA", "images": [{"image_base64": "AA"}]}}"#, "cannot be combined"),
        ];
        for (body, want) in cases {
            let (s, t, m) = err(body);
            assert_eq!((s, t), (422, "validation_error"), "{body}: {m}");
            assert!(m.contains(want), "{body}: {m}");
        }
        let long = format!(r#"{{"input": {{"prompt": "{}", "image_base64": "AA"}}}}"#, "é".repeat(101));
        assert!(err(&long).2.contains("101 characters"), "{}", err(&long).2);
        assert!(p(&format!(r#"{{"input": {{"prompt": "{}", "image_base64": "AA"}}}}"#, "é".repeat(100))).is_ok());
        assert_eq!(err(r#"{"input": {"prompt": "x", "image_url": " "}}"#).1, "invalid_url");
    }

    #[test]
    fn image_path_is_a_third_source() {
        let r = p(r#"{"input": {"prompt": "x", "image_path": "in/a.png"}}"#).unwrap();
        assert_eq!(r.images, vec![ImageSource::Path("in/a.png".into())]);
        let (s, t, m) = err(r#"{"input": {"prompt": "x", "image_path": "a.png", "image_url": "http://a"}}"#);
        assert_eq!((s, t), (422, "validation_error"));
        assert!(m.contains("input.image_url and input.image_path are both given"), "{m}");
        assert!(err(r#"{"input": {"prompt": "x", "image_path": " "}}"#).2.contains("image_path is empty"));
        assert!(err(r#"{"input": {"prompt": "x", "image_path": "a", "images": [{"image_path": "b"}]}}"#)
            .2
            .contains("cannot be combined"));
        let l = Limits { max_images: 3, ..limits() };
        let body = r#"{"input": {"prompt": "x", "images": [{"image_path": "a.png"}, {"image_base64": "AA"}]}}"#;
        let r = parse(body.as_bytes(), &l, || 1).unwrap();
        assert_eq!(r.images, vec![ImageSource::Path("a.png".into()), ImageSource::Base64("AA".into())]);
    }

    #[test]
    fn response_json_has_every_key_and_the_image_verbatim() {
        let r = EditResponse {
            image: "iVBORw0KGgo+/==".into(),
            prompt: "say \"hi\"\n".into(),
            num_inference_steps: 8,
            lightning_enabled: true,
            seed: 42,
            width: 64,
            height: 32,
            true_cfg_scale: 4.0,
            output_format: "png",
            timings: Timings { preprocess_ms: 1.5, queue_ms: 0.0, compute_ms: 2.0, encode_ms: 0.5, batch_size: 3 },
        };
        let v: serde_json::Value = serde_json::from_slice(&r.to_json()).unwrap();
        assert_eq!(v["image"], "iVBORw0KGgo+/==");
        assert_eq!(v["prompt"], "say \"hi\"\n");
        assert_eq!(
            (v["num_inference_steps"].as_u64(), v["seed"].as_u64(), v["width"].as_u64(), v["height"].as_u64()),
            (Some(8), Some(42), Some(64), Some(32))
        );
        assert_eq!(v["lightning_enabled"], true);
        assert_eq!(v["timings"]["batch_size"], 3);
        assert_eq!(v.as_object().unwrap().len(), 10);
    }

    #[test]
    fn edit_plus_takes_an_image_list() {
        let l = Limits { max_images: 3, ..limits() };
        let body = r#"{"input": {"prompt": "x", "images": [{"image_base64": "AA"}, {"image_url": "http://a/b.png"}]}}"#;
        let r = parse(body.as_bytes(), &l, || 1).unwrap();
        assert_eq!(r.images, vec![ImageSource::Base64("AA".into()), ImageSource::Url("http://a/b.png".into())]);
        let body = r#"{"input": {"prompt": "x", "images": [{"image_base64": "AA"}, {}]}}"#;
        let e = parse(body.as_bytes(), &l, || 1).unwrap_err();
        assert!(
            e.message
                .contains("input.images[1].image_base64, input.images[1].image_url or input.images[1].image_path is required"),
            "{}",
            e.message
        );
        let body = r#"{"input": {"prompt": "x", "images": [{"image_base64": "A"}, {"image_base64": "A"}, {"image_base64": "A"}, {"image_base64": "A"}]}}"#;
        assert!(parse(body.as_bytes(), &l, || 1).unwrap_err().message.contains("at most 3"));
        let body = r#"{"input": {"prompt": "x", "images": null, "image_base64": "AA"}}"#;
        assert!(parse(body.as_bytes(), &l, || 1).is_ok(), "null images = absent");
    }

    #[test]
    fn image_lists_are_capped_while_they_are_parsed() {
        // ~10 million empty entries: refused after the 17th, whatever follows.
        let mut body = String::from(r#"{"input": {"prompt": "x", "images": ["#);
        body.push_str(&"{},".repeat(10_000_000));
        body.push_str("{}]}}");
        let e = parse(body.as_bytes(), &limits(), || 1).unwrap_err();
        assert_eq!((e.status.as_u16(), e.error_type), (422, "validation_error"));
        assert!(e.message.contains("input.images") && e.message.contains("more than 16 images"), "{}", e.message);
        // MAX_STEPS is the server's setting.
        let l = Limits { max_steps: 8, ..limits() };
        let e = parse(br#"{"input": {"prompt": "x", "image_base64": "AA", "num_inference_steps": 9}}"#, &l, || 1).unwrap_err();
        assert!(e.message.contains("1..=8, got 9 (MAX_STEPS)"), "{}", e.message);
        let e = parse(br#"{"input": {"prompt": "x", "image_base64": "AA"}}"#, &l, || 1).unwrap_err();
        assert!(e.message.contains("default (50) is above MAX_STEPS (8)"), "{}", e.message);
    }

    #[test]
    fn the_jpeg_quality_range_is_the_front_ends() {
        let input = |q: i64| RawInput {
            prompt: Some("x".into()),
            image_base64: Some("AA".into()),
            output_format: Some("jpeg".into()),
            output_quality: Some(q),
            ..RawInput::default()
        };
        // OpenAI's output_compression takes 0..=100, 0 as JPEG's lowest quality.
        let r = validate(input(0), &limits(), Names::FORM, || 1).unwrap();
        assert_eq!(r.output_format, OutputFormat::Jpeg { quality: 1 });
        let e = validate(input(-1), &limits(), Names::FORM, || 1).unwrap_err();
        assert_eq!(e.message, "output_compression must be in 0..=100, got -1");
        let e = validate(input(0), &limits(), Names::JSON, || 1).unwrap_err();
        assert_eq!(e.message, "input.output_quality must be in 1..=100, got 0");
    }
}
