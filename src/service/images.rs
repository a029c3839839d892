//! Turns the request's image sources into decoded, upright RGB images: base64 (raw or a
//! `data:image/...;base64,` URI) or an SSRF-guarded `image_url` fetch, then `imaging::decode`
//! (header size check before any pixel is decoded). CPU work runs on the blocking pool.

use base64::engine::general_purpose::{GeneralPurpose, GeneralPurposeConfig};
use base64::engine::DecodePaddingMode;
use base64::Engine as _;
use http::StatusCode;

use super::error::ApiError;
use super::fetch::{FetchError, Fetcher};
use super::schema::ImageSource;
use crate::imaging::{self, RgbImage};

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

/// Runs blocking CPU work on the blocking pool, at most as many at once as `cpu` has permits.
pub async fn blocking<T, F>(cpu: &tokio::sync::Semaphore, f: F) -> Result<T, ApiError>
where
    F: FnOnce() -> Result<T, ApiError> + Send + 'static,
    T: Send + 'static,
{
    let _permit = cpu.acquire().await.map_err(|_| ApiError::internal("the server is shutting down"))?;
    tokio::task::spawn_blocking(f).await.map_err(|e| ApiError::internal(format!("a preprocessing task failed: {e}")))?
}

/// Loads every image of a request, in order.
pub async fn load_images(
    sources: Vec<ImageSource>,
    fetcher: &Fetcher,
    limits: imaging::Limits,
    cpu: &tokio::sync::Semaphore,
) -> Result<Vec<RgbImage>, ApiError> {
    let mut images = Vec::with_capacity(sources.len());
    for (i, source) in sources.into_iter().enumerate() {
        let label = |e: ApiError| if i == 0 { e } else { ApiError { message: format!("image {}: {}", i + 1, e.message), ..e } };
        let image = match source {
            ImageSource::Base64(s) => blocking(cpu, move || decode_image(&decode_base64(&s)?, &limits)).await,
            ImageSource::Url(u) => match fetcher.fetch(&u).await {
                Ok(bytes) => blocking(cpu, move || decode_image(&bytes, &limits)).await,
                Err(e) => Err(e.into()),
            },
        };
        images.push(image.map_err(label)?);
    }
    Ok(images)
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
