//! Reads an encoded image's format and size from its header alone, before any pixel is decoded.
//! This is the decompression-bomb guard: JPEG SOF markers, PNG IHDR, WebP VP8 / VP8L / VP8X.

use super::Error;

/// The encoded formats the server accepts.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash)]
pub enum ImageFormat {
    Jpeg,
    Png,
    WebP,
}

impl ImageFormat {
    /// Short user-facing name ("JPEG", "PNG", "WebP").
    pub fn name(self) -> &'static str {
        match self {
            ImageFormat::Jpeg => "JPEG",
            ImageFormat::Png => "PNG",
            ImageFormat::WebP => "WebP",
        }
    }
}

impl std::fmt::Display for ImageFormat {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// What the header says: the format and the stored size (before any EXIF rotation).
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct ImageInfo {
    pub format: ImageFormat,
    pub width: u32,
    pub height: u32,
}

const PNG_MAGIC: &[u8] = b"\x89PNG\r\n\x1a\n";

/// Format and size of an encoded image, from its header only. Unknown magic bytes give
/// [`Error::Unsupported`]; a header that is cut short or malformed gives [`Error::Corrupt`].
pub fn probe(bytes: &[u8]) -> Result<ImageInfo, Error> {
    if bytes.starts_with(&[0xFF, 0xD8, 0xFF]) {
        return probe_jpeg(bytes);
    }
    if bytes.starts_with(PNG_MAGIC) {
        return probe_png(bytes);
    }
    if bytes.len() >= 12 && &bytes[0..4] == b"RIFF" && &bytes[8..12] == b"WEBP" {
        return probe_webp(bytes);
    }
    // A prefix of a known magic: the data was cut before the header ended.
    let prefixes: [(&[u8], ImageFormat); 3] =
        [(&[0xFF, 0xD8, 0xFF], ImageFormat::Jpeg), (PNG_MAGIC, ImageFormat::Png), (b"RIFF", ImageFormat::WebP)];
    for (magic, fmt) in prefixes {
        let n = bytes.len().min(magic.len());
        if !bytes.is_empty() && bytes[..n] == magic[..n] && bytes.len() < 12 {
            return Err(corrupt(fmt, "the data ends inside the file header"));
        }
    }
    if bytes.is_empty() {
        return Err(Error::Unsupported("the image data is empty".into()));
    }
    Err(Error::Unsupported(match sniff_other(bytes) {
        Some(name) => format!("{name} images are not supported"),
        None => "the data is not a recognised image".into(),
    }))
}

/// Names a few common formats we do not accept, for a clearer message.
fn sniff_other(b: &[u8]) -> Option<&'static str> {
    if b.starts_with(b"GIF87a") || b.starts_with(b"GIF89a") {
        Some("GIF")
    } else if b.starts_with(b"BM") {
        Some("BMP")
    } else if b.starts_with(b"II*\0") || b.starts_with(b"MM\0*") {
        Some("TIFF")
    } else if b.len() >= 12 && &b[4..8] == b"ftyp" {
        match &b[8..12] {
            b"avif" | b"avis" => Some("AVIF"),
            b"heic" | b"heix" | b"mif1" | b"msf1" | b"hevc" => Some("HEIC/HEIF"),
            _ => None,
        }
    } else if b.starts_with(b"<svg") || b.starts_with(b"<?xml") {
        Some("SVG")
    } else {
        None
    }
}

fn corrupt(format: ImageFormat, reason: &str) -> Error {
    Error::Corrupt { format: format.name(), reason: reason.to_string() }
}

fn be16(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_be_bytes([*b.get(at)?, *b.get(at + 1)?]))
}

fn le16(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_le_bytes([*b.get(at)?, *b.get(at + 1)?]))
}

fn le24(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from(*b.get(at)?) | u32::from(*b.get(at + 1)?) << 8 | u32::from(*b.get(at + 2)?) << 16)
}

fn nonzero(format: ImageFormat, width: u32, height: u32) -> Result<ImageInfo, Error> {
    if width == 0 || height == 0 {
        return Err(corrupt(format, &format!("the header gives a size of {width}x{height}")));
    }
    Ok(ImageInfo { format, width, height })
}

/// Walks the JPEG marker segments up to the first SOFn (frame header).
fn probe_jpeg(b: &[u8]) -> Result<ImageInfo, Error> {
    const F: ImageFormat = ImageFormat::Jpeg;
    let truncated = || corrupt(F, "the data ends before the frame header (SOF)");
    let mut i = 2; // after SOI
    loop {
        // A marker is 0xFF (any number of fill 0xFF) then a non-0xFF, non-zero code.
        if *b.get(i).ok_or_else(truncated)? != 0xFF {
            return Err(corrupt(F, &format!("expected a marker at byte {i}")));
        }
        while *b.get(i).ok_or_else(truncated)? == 0xFF {
            i += 1;
        }
        let m = b[i];
        i += 1;
        match m {
            0xD0..=0xD7 | 0x01 => continue, // standalone markers
            0x00 => return Err(corrupt(F, "a stuffed zero byte where a marker was expected")),
            0xD8 => return Err(corrupt(F, "a second start-of-image marker")),
            0xD9 => return Err(corrupt(F, "end of image before any frame header")),
            0xDA => return Err(corrupt(F, "scan data before any frame header")),
            _ => {}
        }
        let len = usize::from(be16(b, i).ok_or_else(truncated)?);
        if len < 2 {
            return Err(corrupt(F, "a marker segment with an invalid length"));
        }
        let is_sof = matches!(m, 0xC0..=0xCF) && !matches!(m, 0xC4 | 0xC8 | 0xCC);
        if is_sof {
            // length(2) precision(1) height(2) width(2) components(1)
            if len < 8 {
                return Err(corrupt(F, "a frame header that is too short"));
            }
            let height = be16(b, i + 3).ok_or_else(truncated)?;
            let width = be16(b, i + 5).ok_or_else(truncated)?;
            return nonzero(F, u32::from(width), u32::from(height));
        }
        i += len;
    }
}

fn probe_png(b: &[u8]) -> Result<ImageInfo, Error> {
    const F: ImageFormat = ImageFormat::Png;
    // signature(8) length(4) "IHDR"(4) width(4) height(4) ...
    if b.len() < 24 {
        return Err(corrupt(F, "the data ends inside the IHDR header"));
    }
    if &b[12..16] != b"IHDR" {
        return Err(corrupt(F, "the first chunk is not IHDR"));
    }
    let width = u32::from_be_bytes([b[16], b[17], b[18], b[19]]);
    let height = u32::from_be_bytes([b[20], b[21], b[22], b[23]]);
    if width > i32::MAX as u32 || height > i32::MAX as u32 {
        return Err(corrupt(F, "IHDR gives a size beyond the PNG limit of 2^31-1"));
    }
    nonzero(F, width, height)
}

fn probe_webp(b: &[u8]) -> Result<ImageInfo, Error> {
    const F: ImageFormat = ImageFormat::WebP;
    let truncated = || corrupt(F, "the data ends inside the header");
    let fourcc = b.get(12..16).ok_or_else(truncated)?;
    match fourcc {
        b"VP8 " => {
            // chunk header(8), frame tag(3), start code 9d 01 2a, 14-bit width, 14-bit height
            let code = b.get(23..26).ok_or_else(truncated)?;
            if code != [0x9D, 0x01, 0x2A] {
                return Err(corrupt(F, "bad VP8 start code"));
            }
            let w = le16(b, 26).ok_or_else(truncated)? & 0x3FFF;
            let h = le16(b, 28).ok_or_else(truncated)? & 0x3FFF;
            nonzero(F, u32::from(w), u32::from(h))
        }
        b"VP8L" => {
            // chunk header(8), signature 0x2f, then 14 bits width-1, 14 bits height-1 (LSB first)
            if *b.get(20).ok_or_else(truncated)? != 0x2F {
                return Err(corrupt(F, "bad VP8L signature"));
            }
            let bits = b.get(21..25).ok_or_else(truncated)?;
            let v = u32::from_le_bytes([bits[0], bits[1], bits[2], bits[3]]);
            nonzero(F, (v & 0x3FFF) + 1, ((v >> 14) & 0x3FFF) + 1)
        }
        b"VP8X" => {
            // chunk header(8), flags(1), reserved(3), canvas width-1 (24 bits), height-1 (24 bits)
            let w = le24(b, 24).ok_or_else(truncated)? + 1;
            let h = le24(b, 27).ok_or_else(truncated)? + 1;
            nonzero(F, w, h)
        }
        _ => Err(corrupt(F, "unknown first chunk (expected VP8, VP8L or VP8X)")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn png_header(w: u32, h: u32) -> Vec<u8> {
        let mut v = PNG_MAGIC.to_vec();
        v.extend_from_slice(&13u32.to_be_bytes());
        v.extend_from_slice(b"IHDR");
        v.extend_from_slice(&w.to_be_bytes());
        v.extend_from_slice(&h.to_be_bytes());
        v.extend_from_slice(&[8, 2, 0, 0, 0, 0, 0, 0, 0]);
        v
    }

    #[test]
    fn png_ihdr() {
        let info = probe(&png_header(50000, 40000)).expect("probe");
        assert_eq!(info, ImageInfo { format: ImageFormat::Png, width: 50000, height: 40000 });
        assert!(matches!(probe(&png_header(50000, 40000)[..20]), Err(Error::Corrupt { .. })));
        assert!(matches!(probe(&png_header(0, 4)), Err(Error::Corrupt { .. })));
    }

    #[test]
    fn jpeg_sof_after_other_segments() {
        // SOI, APP0 (len 4: 2 payload bytes), fill bytes, SOF2 with 300x200
        let mut v = vec![0xFF, 0xD8, 0xFF, 0xE0, 0x00, 0x04, 0xAA, 0xBB, 0xFF, 0xFF, 0xC2, 0x00, 0x0B, 8];
        v.extend_from_slice(&200u16.to_be_bytes());
        v.extend_from_slice(&300u16.to_be_bytes());
        v.extend_from_slice(&[3, 0, 0, 0]);
        let info = probe(&v).expect("probe");
        assert_eq!((info.format, info.width, info.height), (ImageFormat::Jpeg, 300, 200));
        for cut in 3..v.len() - 4 {
            assert!(matches!(probe(&v[..cut]), Err(Error::Corrupt { .. })), "cut at {cut}");
        }
        // DHT (C4) is not a frame header; scan before frame is corrupt
        let bad = [0xFF, 0xD8, 0xFF, 0xC4, 0x00, 0x02, 0xFF, 0xDA, 0x00, 0x02];
        assert!(matches!(probe(&bad), Err(Error::Corrupt { .. })));
    }

    #[test]
    fn webp_variants() {
        let mut lossy = b"RIFF\0\0\0\0WEBPVP8 \0\0\0\0".to_vec();
        lossy.extend_from_slice(&[0, 0, 0, 0x9D, 0x01, 0x2A]);
        lossy.extend_from_slice(&(640u16 | 0xC000).to_le_bytes()); // top bits are scale, ignored
        lossy.extend_from_slice(&480u16.to_le_bytes());
        assert_eq!(probe(&lossy).expect("vp8").width, 640);
        assert_eq!(probe(&lossy).expect("vp8").height, 480);

        let mut ll = b"RIFF\0\0\0\0WEBPVP8L\0\0\0\0\x2f".to_vec();
        let v: u32 = (99) | (49 << 14);
        ll.extend_from_slice(&v.to_le_bytes());
        let info = probe(&ll).expect("vp8l");
        assert_eq!((info.width, info.height), (100, 50));

        let mut x = b"RIFF\0\0\0\0WEBPVP8X\0\0\0\0\0\0\0\0".to_vec();
        x.extend_from_slice(&[0xFF, 0xFF, 0x00, 0x0F, 0x00, 0x00]);
        let info = probe(&x).expect("vp8x");
        assert_eq!((info.width, info.height), (65536, 16));
        assert!(matches!(probe(&x[..28]), Err(Error::Corrupt { .. })));
    }

    #[test]
    fn unknown_and_short() {
        assert!(matches!(probe(b"GIF89a........"), Err(Error::Unsupported(m)) if m.contains("GIF")));
        assert!(matches!(probe(b"hello world, not an image"), Err(Error::Unsupported(_))));
        assert!(matches!(probe(b""), Err(Error::Unsupported(_))));
        assert!(matches!(probe(b"\x89PN"), Err(Error::Corrupt { .. })));
        assert!(matches!(probe(&[0xFF, 0xD8]), Err(Error::Corrupt { .. })));
    }
}
