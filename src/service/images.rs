//! Turns the request's image sources into decoded, upright RGB images in two phases: first every
//! source to its encoded bytes (base64, raw or a `data:image/...;base64,` URI; or an SSRF-guarded
//! `image_url` fetch) with its header probed and checked against the size limits; then, once the
//! caller has reserved the memory the headers say the pixels need, `imaging::decode`. CPU work runs
//! on the request's [`CpuPool`], holding its [`Reservation`].

use std::sync::Arc;

use base64::engine::general_purpose::{GeneralPurpose, GeneralPurposeConfig};
use base64::engine::DecodePaddingMode;
use base64::Engine as _;
use http::StatusCode;

use super::error::ApiError;
use super::fetch::{FetchError, Fetcher};
use super::schema::ImageSource;
use super::work::{Cancel, CpuPool, Reservation};
use crate::imaging::{self, ImageInfo, RgbImage};

const LENIENT: GeneralPurposeConfig = GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent);
/// Standard alphabet, padding optional.
const STANDARD: GeneralPurpose = GeneralPurpose::new(&base64::alphabet::STANDARD, LENIENT);
/// URL-safe alphabet (`-_`), padding optional: some clients send it.
const URL_SAFE: GeneralPurpose = GeneralPurpose::new(&base64::alphabet::URL_SAFE, LENIENT);

/// Decodes `image_base64`: raw base64 (standard or URL-safe alphabet, padding optional, line breaks
/// allowed) or a `data:` URI whose media type, if given, must be `image/*`.
pub fn decode_base64(s: &str) -> Result<Vec<u8>, ApiError> {
    let mut data = s.trim();
    if data.len() >= 5 && data[..5].eq_ignore_ascii_case("data:") {
        let comma = data.find(',').ok_or_else(|| {
            ApiError::new(StatusCode::BAD_REQUEST, "invalid_base64", "image_base64 is a data URI without a comma before the data")
        })?;
        let meta = &data[5..comma];
        let mut parts = meta.split(';');
        let mime = parts.next().unwrap_or("").trim().to_ascii_lowercase();
        if !mime.is_empty() && !mime.starts_with("image/") {
            return Err(ApiError::new(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "unsupported_image_format",
                format!("image_base64 is a data URI of type `{mime}`; send an image (JPEG, PNG or WebP)"),
            ));
        }
        if !parts.any(|p| p.trim().eq_ignore_ascii_case("base64")) {
            return Err(ApiError::new(
                StatusCode::BAD_REQUEST,
                "invalid_base64",
                "image_base64 is a data URI that is not base64-encoded (`;base64,` is missing)",
            ));
        }
        data = &data[comma + 1..];
    }
    let cleaned;
    let data = if data.bytes().any(|b| b.is_ascii_whitespace()) {
        cleaned = data.bytes().filter(|b| !b.is_ascii_whitespace()).collect::<Vec<u8>>();
        &cleaned[..]
    } else {
        data.as_bytes()
    };
    if data.is_empty() {
        return Err(ApiError::new(StatusCode::BAD_REQUEST, "invalid_base64", "image_base64 holds no data"));
    }
    let url_safe = data.iter().any(|&b| b == b'-' || b == b'_');
    let engine = if url_safe { &URL_SAFE } else { &STANDARD };
    engine
        .decode(data)
        .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, "invalid_base64", format!("image_base64 is not valid base64: {e}")))
}

/// Encodes response bytes as standard base64 with padding.
pub fn encode_base64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

impl From<FetchError> for ApiError {
    fn from(e: FetchError) -> ApiError {
        let m = e.to_string();
        match e {
            FetchError::InvalidUrl(_) => ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, "invalid_url", m),
            FetchError::Blocked(_) => ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, "url_not_allowed", m),
            FetchError::TooLarge { .. } => ApiError::too_large(m),
            FetchError::Failed(_) => ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, "image_fetch_failed", m),
        }
    }
}

/// Decodes one image's bytes (blocking: call off the reactor).
pub fn decode_image(bytes: &[u8], limits: &imaging::Limits) -> Result<RgbImage, ApiError> {
    if bytes.is_empty() {
        return Err(ApiError::new(StatusCode::BAD_REQUEST, "invalid_image", "the image is empty (0 bytes)"));
    }
    Ok(imaging::decode(bytes, limits)?)
}

/// One input image before its pixels are decoded: its bytes and what its header says.
pub struct Encoded {
    pub bytes: Vec<u8>,
    pub info: ImageInfo,
}

impl Encoded {
    /// An upper bound of the memory decoding it takes (`imaging::decode_memory`).
    pub fn decode_memory(&self) -> u64 {
        imaging::decode_memory(&self.bytes, &self.info)
    }
}

/// What a request's image loading shares.
pub struct Loader<'a> {
    pub fetcher: &'a Fetcher,
    pub limits: imaging::Limits,
    pub pool: &'a Arc<CpuPool>,
    pub cancel: &'a Cancel,
    pub memory: &'a Reservation,
}

fn label(i: usize) -> impl Fn(ApiError) -> ApiError {
    move |e: ApiError| if i == 0 { e } else { ApiError { message: format!("image {}: {}", i + 1, e.message), ..e } }
}

impl Loader<'_> {
    /// Phase one: every source's bytes, in order, each probed and checked against the size limits
    /// (413 `image_too_large` before any pixel memory is reserved). The caller has reserved the
    /// base64-decoded sizes and `URL_MAX_BYTES` per URL.
    pub async fn encoded(&self, sources: Vec<ImageSource>) -> Result<Vec<Encoded>, ApiError> {
        let mut out = Vec::with_capacity(sources.len());
        for (i, source) in sources.into_iter().enumerate() {
            let limits = self.limits;
            let probe = move |bytes: Vec<u8>| -> Result<Encoded, ApiError> {
                if bytes.is_empty() {
                    return Err(ApiError::new(StatusCode::BAD_REQUEST, "invalid_image", "the image is empty (0 bytes)"));
                }
                let info = imaging::probe(&bytes)?;
                limits.check(info.width, info.height)?;
                Ok(Encoded { bytes, info })
            };
            let encoded = match source {
                ImageSource::Base64(s) => self.pool.run(self.cancel, Some(self.memory), move || probe(decode_base64(&s)?)).await,
                ImageSource::Url(u) => match self.fetcher.fetch(&u).await {
                    Ok(bytes) => probe(bytes.to_vec()),
                    Err(e) => Err(e.into()),
                },
            };
            out.push(encoded.map_err(label(i))?);
        }
        Ok(out)
    }

    /// Phase two: the pixels of every image, in order (the caller reserved their memory).
    pub async fn decode(&self, encoded: Vec<Encoded>) -> Result<Vec<RgbImage>, ApiError> {
        let mut images = Vec::with_capacity(encoded.len());
        for (i, e) in encoded.into_iter().enumerate() {
            let limits = self.limits;
            let image = self.pool.run(self.cancel, Some(self.memory), move || decode_image(&e.bytes, &limits)).await;
            images.push(image.map_err(label(i))?);
        }
        Ok(images)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn png_1x1() -> Vec<u8> {
        imaging::encode(&RgbImage::from_pixel(3, 2, image::Rgb([10, 20, 30])), imaging::OutputFormat::Png).unwrap()
    }

    #[test]
    fn base64_forms() {
        let png = png_1x1();
        let std_ = encode_base64(&png);
        assert_eq!(decode_base64(&std_).unwrap(), png);
        assert_eq!(decode_base64(std_.trim_end_matches('=')).unwrap(), png, "padding is optional");
        let wrapped: String = std_.as_bytes().chunks(10).map(|c| format!("{}\r\n", std::str::from_utf8(c).unwrap())).collect();
        assert_eq!(decode_base64(&wrapped).unwrap(), png, "line breaks are ignored");
        assert_eq!(decode_base64(&format!("data:image/png;base64,{std_}")).unwrap(), png);
        assert_eq!(decode_base64(&format!("DATA:image/png;charset=x;BASE64,{std_}")).unwrap(), png);
        assert_eq!(decode_base64(&format!("data:;base64,{std_}")).unwrap(), png, "no media type is fine");
        let url_safe = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode([0xfbu8, 0xff, 0xfe, 1, 2]);
        assert!(url_safe.contains('-') || url_safe.contains('_'));
        assert_eq!(decode_base64(&url_safe).unwrap(), vec![0xfb, 0xff, 0xfe, 1, 2]);
    }

    #[test]
    fn bad_base64() {
        let t = |s: &str| {
            let e = decode_base64(s).unwrap_err();
            (e.status.as_u16(), e.error_type)
        };
        assert_eq!(t("not base64!!"), (400, "invalid_base64"));
        assert_eq!(t("QUJD$"), (400, "invalid_base64"));
        assert_eq!(t("A"), (400, "invalid_base64"));
        assert_eq!(t("data:image/png,iVBOR"), (400, "invalid_base64"));
        assert_eq!(t("data:image/png;base64"), (400, "invalid_base64"));
        assert_eq!(t("data:image/png;base64,"), (400, "invalid_base64"));
        assert_eq!(t("data:text/plain;base64,QUJD"), (415, "unsupported_image_format"));
    }

    #[test]
    fn images_decode_and_errors_map() {
        let lim = imaging::Limits::default();
        let img = decode_image(&png_1x1(), &lim).unwrap();
        assert_eq!(img.dimensions(), (3, 2));
        let e = decode_image(b"GIF89a....", &lim).unwrap_err();
        assert_eq!((e.status.as_u16(), e.error_type), (415, "unsupported_image_format"));
        let png = png_1x1();
        let e = decode_image(&png[..png.len() - 20], &lim).unwrap_err();
        assert_eq!((e.status.as_u16(), e.error_type), (400, "invalid_image"));
        let e = decode_image(&[], &lim).unwrap_err();
        assert_eq!(e.error_type, "invalid_image");
        let small = imaging::Limits { max_width: 2, max_height: 2, max_pixels: 4 };
        let e = decode_image(&png_1x1(), &small).unwrap_err();
        assert_eq!((e.status.as_u16(), e.error_type), (413, "image_too_large"));
    }
}
