//! Images in and out of the pipeline: header probe, decode, Pillow-exact resize, tensor
//! normalisation (diffusers `VaeImageProcessor`), and response encoding.
//!
//! Everything here is a pure function on byte slices / images / caller-owned buffers, so each step
//! can be benchmarked alone. The reference for every result is the Python server's stack:
//! Pillow 13 (decode, `convert("RGB")`, `resize`) and diffusers 0.42 (`preprocess`/`postprocess`);
//! `tests/imaging.rs` checks them against goldens from `export/goldens/imaging.py`.

mod decode;
mod encode;
mod normalize;
mod probe;
mod resize;
pub mod torch_resize;

pub use decode::{decode, decode_memory, Limits};
pub use encode::{encode, OutputFormat};
pub use normalize::{postprocess, postprocess_value, preprocess_into, preprocess_into_bf16, preprocess_into_f16};
pub use probe::{probe, ImageFormat, ImageInfo};
pub use resize::{resize, Filter};

/// Re-exported so callers need not depend on `image` for the pixel type.
pub use image::RgbImage;

/// Why an image could not be read or written. Messages are user-facing.
///
/// Suggested HTTP mapping: `Unsupported` 415, `Corrupt` 400 (or 422), `TooLarge` 413 (or 422),
/// `Encode` and `Invalid` 500 (they mean a server-side bug, not bad input).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Not JPEG, PNG or WebP, or a variant of them that the decoders cannot read.
    #[error("unsupported image: {0}; send a JPEG, PNG or WebP image")]
    Unsupported(String),
    /// The data claims to be an image of a supported format but cannot be decoded.
    #[error("the {format} image is corrupt or truncated: {reason}")]
    Corrupt { format: &'static str, reason: String },
    /// The header's size is over the configured limits; nothing was decoded.
    #[error(
        "the image is {width}x{height} ({} megapixels); the limit is {max_width}x{max_height} and {} megapixels: send a smaller image",
        megapixels(u64::from(*width) * u64::from(*height)),
        megapixels(*max_pixels)
    )]
    TooLarge { width: u32, height: u32, max_width: u32, max_height: u32, max_pixels: u64 },
    /// The encoder failed (or was given an empty image / invalid quality).
    #[error("could not encode the result as {format}: {reason}")]
    Encode { format: &'static str, reason: String },
    /// A caller passed inconsistent arguments (zero sizes, buffer of the wrong length).
    #[error("invalid image operation: {0}")]
    Invalid(String),
}

fn megapixels(p: u64) -> String {
    format!("{:.1}", p as f64 / 1e6)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn too_large_message_names_sizes() {
        let e = Limits { max_width: 4096, max_height: 4096, max_pixels: 16_000_000 }.check(50000, 50000);
        let msg = e.expect_err("must fail").to_string();
        assert!(msg.contains("50000x50000") && msg.contains("4096x4096") && msg.contains("2500.0"), "{msg}");
    }
}
