//! Decodes JPEG (libjpeg-turbo via `turbojpeg`), PNG and WebP (`image`) to RGB8 like PIL's
//! `ImageOps.exif_transpose(Image.open(f)).convert("RGB")`, after checking the header size limits.
//!
//! Conversions (PIL `convert("RGB")` for the common modes): gray is replicated, alpha is dropped
//! (not composited), palettes are expanded. CMYK JPEGs use PIL's Adobe convention (`CMYK;I`) and
//! its `cmyk2rgb` formula. 16-bit PNGs keep the high byte (`v >> 8`): this is exactly what PIL does
//! for 16-bit RGB(A) PNGs; for 16-bit grayscale PIL instead clips the 16-bit value to 255 (mode
//! `I;16`), which turns almost every pixel white, so there we deliberately scale instead.
//! JPEG decoding uses libjpeg-turbo with its defaults (accurate integer IDCT, smooth chroma
//! upsampling), the same library and settings as Pillow, so its pixels are identical.

use std::io::Cursor;

use image::metadata::Orientation;
use image::{DynamicImage, ImageDecoder, ImageReader, RgbImage};

use super::probe::{probe, ImageFormat, ImageInfo};
use super::Error;

/// Size limits checked against the header before any pixel is decoded.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct Limits {
    pub max_width: u32,
    pub max_height: u32,
    /// Maximum `width * height`.
    pub max_pixels: u64,
}

impl Default for Limits {
    /// 16384 x 16384 at most, and at most 64 megapixels (192 MB as RGB8).
    fn default() -> Self {
        Limits { max_width: 16384, max_height: 16384, max_pixels: 64 * 1024 * 1024 }
    }
}

impl Limits {
    /// Errors with [`Error::TooLarge`] unless `width x height` fits.
    pub fn check(&self, width: u32, height: u32) -> Result<(), Error> {
        let pixels = u64::from(width) * u64::from(height);
        if width > self.max_width || height > self.max_height || pixels > self.max_pixels {
            return Err(Error::TooLarge {
                width,
                height,
                max_width: self.max_width,
                max_height: self.max_height,
                max_pixels: self.max_pixels,
            });
        }
        Ok(())
    }
}

/// Decodes an encoded JPEG, PNG or WebP image to RGB8, upright (EXIF orientation applied).
/// The header size is checked against `limits` first; nothing larger is ever allocated.
pub fn decode(bytes: &[u8], limits: &Limits) -> Result<RgbImage, Error> {
    let info = probe(bytes)?;
    limits.check(info.width, info.height)?;
    let (img, orientation) = match info.format {
        ImageFormat::Jpeg => decode_jpeg(bytes, &info)?,
        ImageFormat::Png => decode_with_image(bytes, &info, image::ImageFormat::Png)?,
        ImageFormat::WebP => decode_with_image(bytes, &info, image::ImageFormat::WebP)?,
    };
    let img = orient(img, orientation);
    limits.check(img.width(), img.height())?; // a rotation swaps width and height
    Ok(img)
}

/// An upper bound of the memory decoding an image (probed as `info`) takes at its peak, from its
/// header alone: the decoder's pixel buffer (PNG: channels and bit depth from IHDR; JPEG: CMYK at
/// most; WebP: RGBA), the RGB8 result, and a rotated copy when an EXIF orientation applies.
pub fn decode_memory(bytes: &[u8], info: &ImageInfo) -> u64 {
    let pixels = u64::from(info.width) * u64::from(info.height);
    let source = match info.format {
        ImageFormat::Png => png_bytes_per_pixel(bytes).unwrap_or(8),
        ImageFormat::Jpeg | ImageFormat::WebP => 4,
    };
    // Saturating: a header may claim up to 2^32 x 2^32 pixels (the size limits refuse it after).
    pixels.saturating_mul(source + 3 + 3).saturating_add(1 << 20)
}

/// Bytes per pixel of a PNG as the decoder outputs it (palettes expand to RGBA, depths under 8 to 8).
fn png_bytes_per_pixel(b: &[u8]) -> Option<u64> {
    let (depth, color) = (*b.get(24)?, *b.get(25)?);
    let channels = match color {
        0 => 1,
        2 => 3,
        3 => return Some(4),
        4 => 2,
        6 => 4,
        _ => return None,
    };
    Some(if depth == 16 { channels * 2 } else { channels })
}

fn corrupt(format: ImageFormat, reason: impl std::fmt::Display) -> Error {
    Error::Corrupt { format: format.name(), reason: reason.to_string() }
}

fn orient(img: RgbImage, orientation: Orientation) -> RgbImage {
    if orientation == Orientation::NoTransforms {
        return img;
    }
    let mut d = DynamicImage::ImageRgb8(img);
    d.apply_orientation(orientation);
    match d {
        DynamicImage::ImageRgb8(i) => i,
        other => other.to_rgb8(),
    }
}

// ------------------------------------------------------------------------------------------ PNG / WebP

fn decode_with_image(bytes: &[u8], info: &ImageInfo, fmt: image::ImageFormat) -> Result<(RgbImage, Orientation), Error> {
    let f = info.format;
    let mut reader = ImageReader::with_format(Cursor::new(bytes), fmt);
    let mut lim = image::Limits::default();
    lim.max_image_width = Some(info.width);
    lim.max_image_height = Some(info.height);
    // Room for the largest intermediate: RGBA16 of the probed size, plus slack for metadata.
    lim.max_alloc = Some(u64::from(info.width) * u64::from(info.height) * 8 + (16 << 20));
    reader.limits(lim);
    let mut decoder = reader.into_decoder().map_err(|e| image_error(f, e))?;
    let (w, h) = decoder.dimensions();
    if (w, h) != (info.width, info.height) {
        return Err(corrupt(f, format!("the header says {}x{} but the image is {w}x{h}", info.width, info.height)));
    }
    let orientation = decoder.orientation().unwrap_or(Orientation::NoTransforms);
    let img = DynamicImage::from_decoder(decoder).map_err(|e| image_error(f, e))?;
    Ok((to_rgb8(img), orientation))
}

fn image_error(f: ImageFormat, e: image::ImageError) -> Error {
    match e {
        image::ImageError::Limits(l) => corrupt(f, format!("the image needs more memory than its size allows ({l})")),
        image::ImageError::Unsupported(u) => Error::Unsupported(format!("this {} variant is not supported: {u}", f.name())),
        image::ImageError::IoError(io) if io.kind() == std::io::ErrorKind::UnexpectedEof => {
            corrupt(f, "the data ends before the image does (truncated file)")
        }
        other => corrupt(f, other),
    }
}

/// PIL's `convert("RGB")` for the modes PNG and WebP decode to (see the module doc for 16-bit).
fn to_rgb8(img: DynamicImage) -> RgbImage {
    let (w, h) = (img.width(), img.height());
    let build = |buf: Vec<u8>| RgbImage::from_raw(w, h, buf);
    let converted = match &img {
        DynamicImage::ImageRgb8(_) => None,
        DynamicImage::ImageLuma8(g) => build(g.as_raw().iter().flat_map(|&v| [v, v, v]).collect()),
        DynamicImage::ImageLumaA8(g) => build(g.as_raw().chunks_exact(2).flat_map(|p| [p[0], p[0], p[0]]).collect()),
        DynamicImage::ImageRgba8(c) => build(c.as_raw().chunks_exact(4).flat_map(|p| [p[0], p[1], p[2]]).collect()),
        DynamicImage::ImageLuma16(g) => build(g.as_raw().iter().flat_map(|&v| [hi(v), hi(v), hi(v)]).collect()),
        DynamicImage::ImageLumaA16(g) => build(g.as_raw().chunks_exact(2).flat_map(|p| [hi(p[0]), hi(p[0]), hi(p[0])]).collect()),
        DynamicImage::ImageRgb16(c) => build(c.as_raw().iter().map(|&v| hi(v)).collect()),
        DynamicImage::ImageRgba16(c) => build(c.as_raw().chunks_exact(4).flat_map(|p| [hi(p[0]), hi(p[1]), hi(p[2])]).collect()),
        _ => None,
    };
    match (converted, img) {
        (Some(c), _) => c,
        (None, DynamicImage::ImageRgb8(i)) => i,
        (None, other) => other.to_rgb8(),
    }
}

#[inline]
fn hi(v: u16) -> u8 {
    (v >> 8) as u8
}

// ------------------------------------------------------------------------------------------ JPEG

fn decode_jpeg(bytes: &[u8], info: &ImageInfo) -> Result<(RgbImage, Orientation), Error> {
    use turbojpeg::{Colorspace, Decompressor, Image, PixelFormat};
    const F: ImageFormat = ImageFormat::Jpeg;
    let mut d = Decompressor::new().map_err(|e| corrupt(F, format!("cannot start the JPEG decoder: {e}")))?;
    // A progressive JPEG can carry thousands of tiny scans that each cost a full pass (CVE-style DoS);
    // libjpeg-turbo's own tools cap them at 500.
    d.set_scan_limit(500).map_err(|e| corrupt(F, e))?;
    let header = d.read_header(bytes).map_err(jpeg_error)?;
    if (header.width, header.height) != (info.width as usize, info.height as usize) {
        return Err(corrupt(F, "the frame header and the decoder disagree on the size"));
    }
    let (w, h) = (header.width, header.height);
    let cmyk = matches!(header.colorspace, Colorspace::CMYK | Colorspace::YCCK);
    let (format, bpp) = if cmyk { (PixelFormat::CMYK, 4) } else { (PixelFormat::RGB, 3) };
    let mut pixels = vec![0u8; w * h * bpp];
    let out = Image { pixels: pixels.as_mut_slice(), width: w, pitch: w * bpp, height: h, format };
    d.decompress(bytes, out).map_err(jpeg_error)?;
    if cmyk {
        pixels = cmyk_to_rgb(&pixels);
    }
    let img =
        RgbImage::from_raw(info.width, info.height, pixels).ok_or_else(|| corrupt(F, "decoded buffer has the wrong size"))?;
    Ok((img, jpeg_orientation(bytes)))
}

/// libjpeg reports truncation and bad entropy data as warnings (and then pads the image with gray);
/// Pillow refuses truncated files, and we refuse every warning except extraneous bytes between
/// markers, which is harmless and common in camera files.
fn jpeg_error(e: turbojpeg::Error) -> Error {
    let msg = e.to_string();
    let msg = msg.strip_prefix("TurboJPEG error: ").unwrap_or(&msg).to_string();
    if msg.contains("Premature end of JPEG file") {
        corrupt(ImageFormat::Jpeg, "the data ends before the image does (truncated file)")
    } else if msg.contains("Unsupported color conversion") || msg.contains("Unsupported JPEG process") {
        Error::Unsupported(format!("this JPEG variant is not supported ({msg})"))
    } else {
        corrupt(ImageFormat::Jpeg, msg)
    }
}

/// PIL reads CMYK JPEGs as Adobe-inverted (`CMYK;I`), then `cmyk2rgb`:
/// `out = nk - nk * c / 255` with `nk = 255 - k` and its rounding `MULDIV255`.
fn cmyk_to_rgb(stored: &[u8]) -> Vec<u8> {
    #[inline]
    fn muldiv255(a: i32, b: i32) -> i32 {
        let t = a * b + 128;
        ((t >> 8) + t) >> 8
    }
    let mut out = Vec::with_capacity(stored.len() / 4 * 3);
    for p in stored.chunks_exact(4) {
        let nk = i32::from(p[3]); // 255 - (255 - stored k)
        for &s in &p[..3] {
            let c = 255 - i32::from(s);
            out.push((nk - muldiv255(c, nk)).clamp(0, 255) as u8);
        }
    }
    out
}

/// EXIF orientation from the first APP1 "Exif\0\0" segment before the scan data.
fn jpeg_orientation(b: &[u8]) -> Orientation {
    let mut i = 2;
    while i + 4 <= b.len() {
        if b[i] != 0xFF {
            break;
        }
        let m = b[i + 1];
        if m == 0xFF {
            i += 1;
            continue;
        }
        if matches!(m, 0xD0..=0xD7 | 0x01) {
            i += 2;
            continue;
        }
        if m == 0xDA || m == 0xD9 {
            break;
        }
        let len = usize::from(u16::from_be_bytes([b[i + 2], b[i + 3]]));
        if len < 2 {
            break;
        }
        let seg = b.get(i + 4..(i + 2 + len).min(b.len())).unwrap_or(&[]);
        if m == 0xE1 && seg.starts_with(b"Exif\0\0") {
            return Orientation::from_exif_chunk(&seg[6..]).unwrap_or(Orientation::NoTransforms);
        }
        i += 2 + len;
    }
    Orientation::NoTransforms
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_check_each_bound() {
        let l = Limits { max_width: 100, max_height: 50, max_pixels: 4000 };
        assert!(l.check(100, 40).is_ok());
        assert!(matches!(l.check(101, 1), Err(Error::TooLarge { width: 101, .. })));
        assert!(matches!(l.check(1, 51), Err(Error::TooLarge { .. })));
        assert!(matches!(l.check(100, 41), Err(Error::TooLarge { .. })));
    }

    #[test]
    fn decode_memory_bounds_what_the_decoders_allocate() {
        let png = |w: u32, h: u32, depth: u8, color: u8| {
            let mut v = b"\x89PNG\r\n\x1a\n\0\0\0\x0dIHDR".to_vec();
            v.extend_from_slice(&w.to_be_bytes());
            v.extend_from_slice(&h.to_be_bytes());
            v.extend_from_slice(&[depth, color, 0, 0, 0]);
            v
        };
        let info = |f, w, h| ImageInfo { format: f, width: w, height: h };
        let rgba16 = png(1000, 1000, 16, 6);
        assert_eq!(decode_memory(&rgba16, &info(ImageFormat::Png, 1000, 1000)), 1_000_000 * 14 + (1 << 20));
        let gray8 = png(1000, 1000, 8, 0);
        assert_eq!(decode_memory(&gray8, &info(ImageFormat::Png, 1000, 1000)), 1_000_000 * 7 + (1 << 20));
        assert_eq!(decode_memory(b"", &info(ImageFormat::Png, 10, 10)), 100 * 14 + (1 << 20), "unknown: the worst");
        assert_eq!(decode_memory(b"", &info(ImageFormat::Jpeg, 10, 10)), 100 * 10 + (1 << 20));
    }

    #[test]
    fn cmyk_formula_matches_pil_points() {
        // stored (Adobe-inverted) white paper, no ink: c=m=y=k=0 -> stored 255s -> white
        assert_eq!(cmyk_to_rgb(&[255, 255, 255, 255]), vec![255, 255, 255]);
        // full black ink: stored k = 0 -> black
        assert_eq!(cmyk_to_rgb(&[255, 255, 255, 0]), vec![0, 0, 0]);
        // full cyan: stored c = 0 -> (0, 255, 255)
        assert_eq!(cmyk_to_rgb(&[0, 255, 255, 255]), vec![0, 255, 255]);
    }

    #[test]
    fn gray16_and_rgb16_keep_the_high_byte() {
        let g = image::ImageBuffer::<image::Luma<u16>, _>::from_raw(2, 1, vec![0x12FF, 0xFF00]).expect("buf");
        assert_eq!(to_rgb8(DynamicImage::ImageLuma16(g)).into_raw(), vec![0x12, 0x12, 0x12, 0xFF, 0xFF, 0xFF]);
        let la = image::ImageBuffer::<image::LumaA<u8>, _>::from_raw(1, 1, vec![7, 0]).expect("buf");
        assert_eq!(to_rgb8(DynamicImage::ImageLumaA8(la)).into_raw(), vec![7, 7, 7]);
    }
}
