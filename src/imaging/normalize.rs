//! Pixels <-> model tensors, exactly as diffusers' `VaeImageProcessor.preprocess` / `postprocess`.
//! RGB8 (HWC) to planar CHW in [-1, 1] (f32 or f16), and decoded CHW floats back to RGB8.
//!
//! The reference, op by op (diffusers 0.42 `image_processor.py`):
//! - `pil_to_numpy`: `np.array(img).astype(np.float32) / 255.0` (f32 division, correctly rounded),
//!   `numpy_to_pt` transposes to CHW, `normalize`: `2.0 * x - 1.0` in f32 (two roundings, no FMA).
//!   Every u8 value has one result, so a 256-entry table computed with those same f32 ops is exact.
//!   The f16 variant rounds that f32 to nearest-even (`tensor.to(torch.float16)`).
//! - `postprocess(output_type="pil")`: `(x * 0.5 + 0.5).clamp(0, 1)` in f32, then
//!   `numpy_to_pil`: `(x * 255).round().astype("uint8")` with numpy's round-half-to-even.
//!   NaN becomes 0 (what `astype(uint8)` gives for NaN on x86).

use half::{bf16, f16};
use image::RgbImage;

use super::Error;

/// `2 * (v / 255) - 1` in f32 for every u8 `v`, built with the reference's exact f32 ops.
fn table_f32() -> [f32; 256] {
    let mut t = [0f32; 256];
    for (v, out) in t.iter_mut().enumerate() {
        let x = v as f32 / 255.0f32;
        *out = 2.0f32 * x - 1.0f32;
    }
    t
}

fn check_len(img: &RgbImage, len: usize) -> Result<usize, Error> {
    let plane = img.width() as usize * img.height() as usize;
    if len != plane * 3 {
        return Err(Error::Invalid(format!(
            "output buffer holds {len} values but a {}x{} RGB image needs {} (3 x H x W)",
            img.width(),
            img.height(),
            plane * 3
        )));
    }
    Ok(plane)
}

/// Writes `img` as a CHW f32 tensor in [-1, 1] into `out` (length `3 * H * W`), bit-identical to
/// `VaeImageProcessor.preprocess` of an already-resized RGB image.
pub fn preprocess_into(img: &RgbImage, out: &mut [f32]) -> Result<(), Error> {
    planes(img, out, &table_f32())
}

/// As [`preprocess_into`], rounded to f16 (nearest, ties to even) for half-precision engines.
pub fn preprocess_into_f16(img: &RgbImage, out: &mut [f16]) -> Result<(), Error> {
    let t32 = table_f32();
    planes(img, out, &std::array::from_fn(|i| f16::from_f32(t32[i])))
}

/// As [`preprocess_into`], rounded to bf16 (nearest, ties to even) for bfloat16 engines.
pub fn preprocess_into_bf16(img: &RgbImage, out: &mut [bf16]) -> Result<(), Error> {
    let t32 = table_f32();
    planes(img, out, &std::array::from_fn(|i| bf16::from_f32(t32[i])))
}

/// Maps every byte of `img` through `table` into three planes (R, G, B) of `out`.
fn planes<T: Copy>(img: &RgbImage, out: &mut [T], table: &[T; 256]) -> Result<(), Error> {
    let plane = check_len(img, out.len())?;
    let (r, rest) = out.split_at_mut(plane);
    let (g, b) = rest.split_at_mut(plane);
    for (i, px) in img.as_raw().chunks_exact(3).enumerate() {
        r[i] = table[px[0] as usize];
        g[i] = table[px[1] as usize];
        b[i] = table[px[2] as usize];
    }
    Ok(())
}

/// One decoded value in [-1, 1] (nominally) to u8, as diffusers' postprocess + `numpy_to_pil`.
#[inline]
pub fn postprocess_value(x: f32) -> u8 {
    let y = (x * 0.5f32 + 0.5f32).clamp(0.0, 1.0); // NaN stays NaN
    (y * 255.0f32).round_ties_even() as u8 // NaN -> 0; in range otherwise
}

/// Turns a CHW f32 tensor (one image of the VAE decoder's output) into an RGB8 image, bit-identical
/// to `VaeImageProcessor.postprocess(x, output_type="pil")`.
pub fn postprocess(chw: &[f32], width: u32, height: u32) -> Result<RgbImage, Error> {
    let plane = width as usize * height as usize;
    if chw.len() != plane * 3 {
        return Err(Error::Invalid(format!(
            "tensor holds {} values but a {width}x{height} RGB image needs {} (3 x H x W)",
            chw.len(),
            plane * 3
        )));
    }
    let (r, rest) = chw.split_at(plane);
    let (g, b) = rest.split_at(plane);
    let mut buf = vec![0u8; plane * 3];
    for (i, px) in buf.chunks_exact_mut(3).enumerate() {
        px[0] = postprocess_value(r[i]);
        px[1] = postprocess_value(g[i]);
        px[2] = postprocess_value(b[i]);
    }
    RgbImage::from_raw(width, height, buf)
        .ok_or_else(|| Error::Invalid("internal: postprocess produced a buffer of the wrong size".into()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_endpoints_and_layout() {
        let mut img = RgbImage::new(2, 1);
        img.put_pixel(0, 0, image::Rgb([0, 255, 128]));
        img.put_pixel(1, 0, image::Rgb([255, 0, 1]));
        let mut out = vec![9f32; 6];
        preprocess_into(&img, &mut out).expect("preprocess");
        assert_eq!(out[0], -1.0);
        assert_eq!(out[1], 1.0); // R plane
        assert_eq!(out[2], 1.0);
        assert_eq!(out[3], -1.0); // G plane
        assert_eq!(out[4], 2.0 * (128f32 / 255.0) - 1.0);
        let mut half = vec![f16::ZERO; 6];
        preprocess_into_f16(&img, &mut half).expect("preprocess f16");
        assert_eq!(half[4], f16::from_f32(out[4]));
    }

    #[test]
    fn wrong_lengths_are_errors() {
        let img = RgbImage::new(3, 2);
        assert!(matches!(preprocess_into(&img, &mut [0f32; 17]), Err(Error::Invalid(_))));
        assert!(matches!(postprocess(&[0f32; 17], 3, 2), Err(Error::Invalid(_))));
    }

    #[test]
    fn postprocess_rounds_half_to_even_and_clamps() {
        assert_eq!(postprocess_value(-7.0), 0);
        assert_eq!(postprocess_value(7.0), 255);
        assert_eq!(postprocess_value(f32::NAN), 0);
        // y = 0.5 / 255 exactly representable? Use a value whose *255 is exactly 0.5: y = 1/510.
        // x = 2y - 1 is not exact in f32, so test the rounding rule directly on the last step.
        assert_eq!(2.5f32.round_ties_even(), 2.0);
        assert_eq!(postprocess_value(0.0), 128); // 0.5 * 255 = 127.5 -> 128 (even)
        assert_eq!(postprocess_value(1.0), 255);
        assert_eq!(postprocess_value(-1.0), 0);
    }
}
