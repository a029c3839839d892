//! Turns the request's image sources into decoded, upright RGB images in two phases: first every
//! source to its encoded bytes (base64, raw or a `data:image/...;base64,` URI; an SSRF-guarded
//! `image_url` fetch; an `image_path` file under `IMAGE_PATH_ROOT`; a front end's upload) with its
//! header probed and checked against the size limits; then, once the caller has reserved the memory
//! the headers say the pixels need, `imaging::decode`. CPU and file work runs on the request's
//! [`CpuPool`], holding its [`Reservation`].

use std::sync::Arc;

use base64::engine::general_purpose::{GeneralPurpose, GeneralPurposeConfig};
use base64::engine::DecodePaddingMode;
use base64::Engine as _;
use http::StatusCode;
use std::io::Read as _;
use std::path::{Path, PathBuf};

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

/// Where `image_path` may read: the canonical `IMAGE_PATH_ROOT` (`None`: image_path is off) and the
/// largest file (`URL_MAX_BYTES`, the same cap as an `image_url` download).
#[derive(Clone, Debug, Default)]
pub struct PathPolicy {
    pub root: Option<PathBuf>,
    pub max_bytes: usize,
}

/// Reads an `image_path` file (blocking: call off the reactor). Only a regular file under the root
/// after resolving symlinks and `..` is read; anything else (outside the root, absent, a directory,
/// a device, a FIFO, a socket, unreadable) gets the same 422, so that a client cannot learn what
/// exists outside the root. The opened file itself is checked again (its type, and on Linux the path
/// the kernel gives for it), so a symlink swapped in after the path was resolved does not escape.
pub fn read_path(policy: &PathPolicy, requested: &str) -> Result<Vec<u8>, ApiError> {
    let Some(root) = &policy.root else {
        return Err(ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "path_not_allowed",
            "image_path is off on this server: set IMAGE_PATH_ROOT to a directory to read image files under it",
        ));
    };
    let refused = || {
        ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "path_not_allowed",
            format!("image_path `{}` is not a readable regular file under IMAGE_PATH_ROOT", clip(requested)),
        )
    };
    if requested.contains('\0') {
        return Err(refused());
    }
    let asked = Path::new(requested);
    let joined = if asked.is_absolute() { asked.to_path_buf() } else { root.join(asked) };
    let canonical = joined.canonicalize().map_err(|_| refused())?;
    if !canonical.starts_with(root) {
        return Err(refused());
    }
    let file = open_no_follow(&canonical).map_err(|_| refused())?;
    let meta = file.metadata().map_err(|_| refused())?;
    if !meta.is_file() || !opened_under(&file, root) {
        return Err(refused());
    }
    let max = policy.max_bytes;
    let too_large = || ApiError::too_large(format!("the file at image_path is larger than the {max} byte limit (URL_MAX_BYTES)"));
    if meta.len() > max as u64 {
        return Err(too_large());
    }
    let mut bytes = Vec::with_capacity(meta.len() as usize);
    file.take(max as u64 + 1).read_to_end(&mut bytes).map_err(|_| refused())?;
    if bytes.len() > max {
        return Err(too_large());
    }
    Ok(bytes)
}

/// Opens for reading without following a final symlink, and without blocking on a FIFO.
fn open_no_follow(path: &Path) -> std::io::Result<std::fs::File> {
    let mut options = std::fs::OpenOptions::new();
    options.read(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_CLOEXEC);
    }
    options.open(path)
}

/// Whether the opened file is under `root` by the kernel's account of it (Linux `/proc/self/fd`);
/// true where the kernel gives no account (the resolved path was checked already).
fn opened_under(file: &std::fs::File, root: &Path) -> bool {
    #[cfg(target_os = "linux")]
    {
        use std::os::fd::AsRawFd;
        if let Ok(actual) = std::fs::read_link(format!("/proc/self/fd/{}", file.as_raw_fd())) {
            return actual.starts_with(root);
        }
    }
    let _ = (file, root);
    true
}

fn clip(s: &str) -> String {
    const MAX: usize = 200;
    let mut end = s.len().min(MAX);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    if end < s.len() {
        format!("{}...", &s[..end])
    } else {
        s.to_string()
    }
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
    pub paths: &'a PathPolicy,
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
    /// base64-decoded sizes, the uploads' sizes and `URL_MAX_BYTES` per URL or file.
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
                ImageSource::Bytes(b) => self.pool.run(self.cancel, Some(self.memory), move || probe(b.to_vec())).await,
                ImageSource::Path(p) => {
                    let policy = self.paths.clone();
                    self.pool.run(self.cancel, Some(self.memory), move || probe(read_path(&policy, &p)?)).await
                }
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
            let working_set = e.decode_memory();
            let image =
                self.pool.run_sized(self.cancel, Some(self.memory), working_set, move || decode_image(&e.bytes, &limits)).await;
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

    /// A root with `a.png`, a subdirectory, a FIFO and symlinks (inside and out), beside a file outside.
    fn path_fixture() -> (tempfile::TempDir, PathPolicy, Vec<u8>) {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("root");
        std::fs::create_dir_all(root.join("sub")).unwrap();
        let png = png_1x1();
        std::fs::write(root.join("sub/a.png"), &png).unwrap();
        std::fs::write(dir.path().join("secret.png"), &png).unwrap();
        std::os::unix::fs::symlink(root.join("sub/a.png"), root.join("inside-link.png")).unwrap();
        std::os::unix::fs::symlink(dir.path().join("secret.png"), root.join("outside-link.png")).unwrap();
        std::os::unix::fs::symlink("/dev/zero", root.join("zero")).unwrap();
        let fifo = std::ffi::CString::new(root.join("fifo").to_str().unwrap()).unwrap();
        assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o600) }, 0, "mkfifo");
        let policy = PathPolicy { root: Some(root.canonicalize().unwrap()), max_bytes: 1 << 20 };
        (dir, policy, png)
    }

    #[test]
    fn image_path_reads_regular_files_under_the_root_only() {
        let (dir, policy, png) = path_fixture();
        let root = policy.root.clone().unwrap();
        assert_eq!(read_path(&policy, "sub/a.png").unwrap(), png);
        assert_eq!(read_path(&policy, "./sub/../sub/a.png").unwrap(), png, "`..` that stays inside is fine");
        assert_eq!(read_path(&policy, root.join("sub/a.png").to_str().unwrap()).unwrap(), png, "absolute, under the root");
        assert_eq!(read_path(&policy, "inside-link.png").unwrap(), png, "a symlink that stays inside");

        // Everything else gets the same 422, whether or not the target exists.
        let secret = dir.path().join("secret.png");
        let refused = [
            "../secret.png",               // `..` out of the root (exists)
            "../missing.png",              // `..` out of the root (does not exist)
            "sub/../../secret.png",        // `..` in the middle
            secret.to_str().unwrap(),      // an absolute path elsewhere (exists)
            "/etc/passwd",                 // an absolute path elsewhere (exists)
            "/no/such/file.png",           // an absolute path elsewhere (does not exist)
            "outside-link.png",            // a symlink out of the root
            "zero",                        // a symlink to a device
            "fifo",                        // a FIFO under the root
            "sub",                         // a directory
            "missing.png",                 // absent under the root
            "sub/a.png\0../../secret.png", // an embedded NUL
        ];
        let mut messages = Vec::new();
        for p in refused {
            let e = read_path(&policy, p).expect_err(p);
            assert_eq!((e.status.as_u16(), e.error_type), (422, "path_not_allowed"), "{p}: {}", e.message);
            messages.push(e.message.replace(&clip(p), "<path>"));
        }
        assert!(messages.iter().all(|m| *m == messages[0]), "one message for every refusal: {messages:?}");
        assert!(!messages[0].contains("exist"), "{}", messages[0]);

        // A device node under the root (here the root is /dev itself) is refused too.
        let dev = PathPolicy { root: Some(PathBuf::from("/dev").canonicalize().unwrap()), max_bytes: 1024 };
        let e = read_path(&dev, "null").unwrap_err();
        assert_eq!((e.status.as_u16(), e.error_type), (422, "path_not_allowed"));

        // Over the size cap: 413, like a download over URL_MAX_BYTES.
        let small = PathPolicy { max_bytes: 10, ..policy.clone() };
        assert_eq!(read_path(&small, "sub/a.png").unwrap_err().error_type, "payload_too_large");
    }

    #[test]
    fn image_path_is_off_without_a_root() {
        let e = read_path(&PathPolicy::default(), "a.png").unwrap_err();
        assert_eq!((e.status.as_u16(), e.error_type), (422, "path_not_allowed"));
        assert!(e.message.contains("IMAGE_PATH_ROOT"), "{}", e.message);
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
