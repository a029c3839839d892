//! Encodes result images for responses: PNG (`image`, fast deflate), JPEG (libjpeg-turbo), WebP
//! lossless (`image`). Pure functions from an `RgbImage` to bytes.

use image::codecs::png::{CompressionType, FilterType, PngEncoder};
use image::codecs::webp::WebPEncoder;
use image::{ExtendedColorType, ImageEncoder, RgbImage};

use super::Error;

/// The response encodings.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash)]
pub enum OutputFormat {
    /// Lossless PNG, fast deflate with adaptive row filters.
    Png,
    /// Baseline JPEG, 4:2:0 chroma subsampling (Pillow's default); quality 1..=100.
    Jpeg { quality: u8 },
    /// Lossless WebP.
    Webp,
}

impl OutputFormat {
    /// MIME type for a `Content-Type` or data URI.
    pub fn mime(self) -> &'static str {
        match self {
            OutputFormat::Png => "image/png",
            OutputFormat::Jpeg { .. } => "image/jpeg",
            OutputFormat::Webp => "image/webp",
        }
    }

    fn name(self) -> &'static str {
        match self {
            OutputFormat::Png => "PNG",
            OutputFormat::Jpeg { .. } => "JPEG",
            OutputFormat::Webp => "WebP",
        }
    }
}

/// Encodes `img` in `format`.
pub fn encode(img: &RgbImage, format: OutputFormat) -> Result<Vec<u8>, Error> {
    let (w, h) = img.dimensions();
    let fail = |reason: String| Error::Encode { format: format.name(), reason };
    if w == 0 || h == 0 {
        return Err(fail(format!("cannot encode an empty {w}x{h} image")));
    }
    match format {
        OutputFormat::Png => {
            let mut out = Vec::with_capacity(img.as_raw().len() / 2);
            PngEncoder::new_with_quality(&mut out, CompressionType::Fast, FilterType::Adaptive)
                .write_image(img.as_raw(), w, h, ExtendedColorType::Rgb8)
                .map_err(|e| fail(e.to_string()))?;
            Ok(out)
        }
        OutputFormat::Webp => {
            let mut out = Vec::new();
            WebPEncoder::new_lossless(&mut out)
                .write_image(img.as_raw(), w, h, ExtendedColorType::Rgb8)
                .map_err(|e| fail(e.to_string()))?;
            Ok(out)
        }
        OutputFormat::Jpeg { quality } => {
            if !(1..=100).contains(&quality) {
                return Err(fail(format!("JPEG quality must be 1 to 100, got {quality}")));
            }
            let mut c = turbojpeg::Compressor::new().map_err(|e| fail(e.to_string()))?;
            c.set_quality(i32::from(quality)).map_err(|e| fail(e.to_string()))?;
            c.set_subsamp(turbojpeg::Subsamp::Sub2x2).map_err(|e| fail(e.to_string()))?;
            let image = turbojpeg::Image {
                pixels: img.as_raw().as_slice(),
                width: w as usize,
                pitch: w as usize * 3,
                height: h as usize,
                format: turbojpeg::PixelFormat::RGB,
            };
            c.compress_to_vec(image).map_err(|e| fail(e.to_string()))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> RgbImage {
        RgbImage::from_fn(37, 21, |x, y| image::Rgb([(x * 7) as u8, (y * 11) as u8, ((x * y) % 256) as u8]))
    }

    #[test]
    fn png_and_webp_round_trip_losslessly() {
        let img = sample();
        for fmt in [OutputFormat::Png, OutputFormat::Webp] {
            let bytes = encode(&img, fmt).expect("encode");
            let back = super::super::decode(&bytes, &Default::default()).expect("decode");
            assert_eq!(back, img, "{fmt:?}");
        }
    }

    #[test]
    fn jpeg_is_close_and_quality_is_checked() {
        let img = sample();
        let bytes = encode(&img, OutputFormat::Jpeg { quality: 95 }).expect("encode");
        assert_eq!(&bytes[..3], &[0xFF, 0xD8, 0xFF]);
        let back = super::super::decode(&bytes, &Default::default()).expect("decode");
        assert_eq!(back.dimensions(), img.dimensions());
        let mad: f64 = back.as_raw().iter().zip(img.as_raw()).map(|(a, b)| f64::from(a.abs_diff(*b))).sum::<f64>()
            / img.as_raw().len() as f64;
        assert!(mad < 6.0, "mean abs diff {mad}");
        assert!(matches!(encode(&img, OutputFormat::Jpeg { quality: 0 }), Err(Error::Encode { .. })));
        assert!(matches!(encode(&RgbImage::new(0, 0), OutputFormat::Png), Err(Error::Encode { .. })));
    }
}
