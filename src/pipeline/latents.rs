//! Latent-space helpers of the edit pipelines: the image sizes (`calculate_dimensions` and the v1 /
//! Plus size logic), 2x2 packing, per-channel normalisation and the seeded initial noise.
//!
//! Sizes follow `QwenImageEditPipeline.__call__` (v1: one image; its ~1 MP copy feeds both the VL
//! encoder and the VAE) and `QwenImageEditPlusPipeline.__call__` (Plus: output size from the *last*
//! image; every image gets a VAE copy at the image area and a VL copy at the condition area).
//! Initial noise is `torch.randn((1, 1, C, h, w), generator=torch.Generator("cpu").manual_seed(seed))`
//! packed, so a job's noise depends only on its own seed (see [`super::torch_cpu`] for the kernels).

use ndarray::{Array3, Array4, ArrayView3, ArrayView4, ArrayViewMut4, Axis};
use thiserror::Error;

use super::rope::LatentGrid;
use super::torch_cpu::{randn, CpuKernels};

/// VAE spatial compression (`vae_scale_factor`); sizes are multiples of twice that (packing).
pub const VAE_SCALE_FACTOR: u32 = 8;
/// Output sizes are floored to multiples of this (`vae_scale_factor * 2`).
pub const SIZE_MULTIPLE: u32 = VAE_SCALE_FACTOR * 2;

/// Errors of the size logic, packing and normalisation.
#[derive(Debug, Error, PartialEq)]
pub enum LatentsError {
    #[error("no input images: the edit pipelines need at least one image")]
    NoImages,
    #[error("the edit (v1) pipeline takes exactly one image, got {0}; multi-image editing needs an edit-plus bundle")]
    TooManyImages(usize),
    #[error("image {index} has an empty size {width}x{height}")]
    EmptyImage { index: usize, width: u32, height: u32 },
    #[error(
        "image {index} ({width}x{height}) has an aspect ratio too extreme for a {area}-pixel area: \
         its resized {what} size would be {new_width}x{new_height}; crop the image"
    )]
    DegenerateSize { index: usize, width: u32, height: u32, area: u64, what: &'static str, new_width: u64, new_height: u64 },
    #[error("output size {width}x{height} is too small: after flooring to multiples of 16 a side is 0; ask for at least 16x16")]
    OutputTooSmall { width: u64, height: u64 },
    #[error("latent shape {shape:?} cannot be packed: {reason}")]
    Pack { shape: Vec<usize>, reason: String },
    #[error("latent statistics are invalid: {0}")]
    Stats(String),
    #[error("latents have {got} channels but the statistics have {want}")]
    Channels { got: usize, want: usize },
}

/// The pipelines' `calculate_dimensions(target_area, ratio)`: `w = sqrt(area * ratio)`, `h = w / ratio`,
/// each `round(x / 32) * 32` with Python's round-half-to-even. Returns `(width, height)`; either may be
/// 0 for extreme ratios (the callers below refuse that).
pub fn calculate_dimensions(target_area: u64, ratio: f64) -> (u64, u64) {
    let width = (target_area as f64 * ratio).sqrt();
    let height = width / ratio;
    let round32 = |v: f64| ((v / 32.0).round_ties_even() * 32.0) as u64;
    (round32(width), round32(height))
}

/// `image.size[0] / image.size[1]` (Python true division of ints, correctly rounded).
pub fn aspect_ratio(width: u32, height: u32) -> f64 {
    width as f64 / height as f64
}

/// Every size one edit request needs, in pixels as `(width, height)`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EditSizes {
    /// The generated image (multiples of 16).
    pub output: (u32, u32),
    /// Per input image: the size its VAE copy is resized to (Lanczos) before encoding.
    pub vae: Vec<(u32, u32)>,
    /// Per input image: the size of the copy given to the VL image processor (which then applies
    /// its own `smart_resize`). v1: the VAE copy itself.
    pub vl: Vec<(u32, u32)>,
    /// The transformer's `img_shapes`: the target's latent-patch grid, then each condition image's.
    pub img_shapes: Vec<LatentGrid>,
}

impl EditSizes {
    /// The packed target sequence length (`image_seq_len` of the schedule): `(h/16) * (w/16)`.
    pub fn image_seq_len(&self) -> u64 {
        self.img_shapes.first().map_or(0, |g| g.tokens() as u64)
    }

    /// The target latent size `(height, width)` of the noise: `2 * (px // 16)` per side.
    pub fn latent_size(&self) -> (usize, usize) {
        (latent_side(self.output.1), latent_side(self.output.0))
    }
}

/// Latent side of a pixel side, as `prepare_latents` computes it: `2 * (px // 16)`.
pub fn latent_side(pixels: u32) -> usize {
    2 * (pixels / SIZE_MULTIPLE) as usize
}

fn grid(width: u64, height: u64) -> LatentGrid {
    LatentGrid::new(1, (height / SIZE_MULTIPLE as u64) as usize, (width / SIZE_MULTIPLE as u64) as usize)
}

fn to_u32(v: u64) -> u32 {
    u32::try_from(v).unwrap_or(u32::MAX)
}

/// The sizes of one request.
///
/// * `images`: `(width, height)` of each input image, in request order.
/// * `request`: the requested `(width, height)`; `None` (or 0, as Python's `or` treats it) means
///   "derived from the image".
/// * `image_area`: manifest `vae.image_area` (1024*1024 for real models): area of the default output
///   and of the VAE copies.
/// * `condition_area`: manifest `vision.condition_area`: `None` for v1 (one image, VL copy = VAE copy),
///   `Some(384*384)` for Plus.
pub fn edit_sizes(
    images: &[(u32, u32)],
    request: (Option<u32>, Option<u32>),
    image_area: u64,
    condition_area: Option<u64>,
) -> Result<EditSizes, LatentsError> {
    if images.is_empty() {
        return Err(LatentsError::NoImages);
    }
    if condition_area.is_none() && images.len() != 1 {
        return Err(LatentsError::TooManyImages(images.len()));
    }
    for (index, &(width, height)) in images.iter().enumerate() {
        if width == 0 || height == 0 {
            return Err(LatentsError::EmptyImage { index, width, height });
        }
    }
    let sized = |index: usize, area: u64, what: &'static str| -> Result<(u64, u64), LatentsError> {
        let (width, height) = images[index];
        let (w, h) = calculate_dimensions(area, aspect_ratio(width, height));
        if w == 0 || h == 0 {
            return Err(LatentsError::DegenerateSize { index, width, height, area, what, new_width: w, new_height: h });
        }
        Ok((w, h))
    };

    // v1 reads image[0].size, Plus image[-1].size; with one image both are the same.
    let last = images.len() - 1;
    let (calc_w, calc_h) = sized(last, image_area, "output")?;
    let pick = |req: Option<u32>, calc: u64| req.filter(|&v| v != 0).map_or(calc, u64::from);
    let width = pick(request.0, calc_w) / SIZE_MULTIPLE as u64 * SIZE_MULTIPLE as u64;
    let height = pick(request.1, calc_h) / SIZE_MULTIPLE as u64 * SIZE_MULTIPLE as u64;
    if width == 0 || height == 0 {
        return Err(LatentsError::OutputTooSmall { width: pick(request.0, calc_w), height: pick(request.1, calc_h) });
    }

    let mut vae = Vec::with_capacity(images.len());
    let mut vl = Vec::with_capacity(images.len());
    let mut img_shapes = vec![grid(width, height)];
    match condition_area {
        None => {
            // v1: the image is resized once to the calculated size, for the VL encoder and the VAE.
            vae.push((to_u32(calc_w), to_u32(calc_h)));
            vl.push((to_u32(calc_w), to_u32(calc_h)));
            img_shapes.push(grid(calc_w, calc_h));
        }
        Some(cond_area) => {
            for index in 0..images.len() {
                let (cw, ch) = sized(index, cond_area, "condition")?;
                let (vw, vh) = sized(index, image_area, "VAE")?;
                vl.push((to_u32(cw), to_u32(ch)));
                vae.push((to_u32(vw), to_u32(vh)));
                img_shapes.push(grid(vw, vh));
            }
        }
    }
    Ok(EditSizes { output: (to_u32(width), to_u32(height)), vae, vl, img_shapes })
}

/// `_pack_latents`: `(B, C, h, w) -> (B, (h/2)(w/2), 4C)`; token `i*(w/2) + j` holds, for each channel
/// `c`, the 2x2 patch `x[b, c, 2i..2i+2, 2j..2j+2]` at `4c + 2di + dj`.
pub fn pack_latents(x: ArrayView4<f32>) -> Result<Array3<f32>, LatentsError> {
    let (b, c, h, w) = x.dim();
    if h % 2 != 0 || w % 2 != 0 {
        return Err(LatentsError::Pack { shape: x.shape().to_vec(), reason: "height and width must be even".into() });
    }
    let (hp, wp) = (h / 2, w / 2);
    let mut out = Array3::<f32>::zeros((b, hp * wp, c * 4));
    for bi in 0..b {
        for i in 0..hp {
            for j in 0..wp {
                let token = i * wp + j;
                for ci in 0..c {
                    for di in 0..2 {
                        for dj in 0..2 {
                            out[[bi, token, ci * 4 + di * 2 + dj]] = x[[bi, ci, 2 * i + di, 2 * j + dj]];
                        }
                    }
                }
            }
        }
    }
    Ok(out)
}

/// `_unpack_latents`, the inverse of [`pack_latents`]: `(B, (h/2)(w/2), 4C) -> (B, C, h, w)` for the
/// latent size `(height, width)` (the reference adds a frame axis of 1, which the VAE decoder graph
/// does not take).
pub fn unpack_latents(x: ArrayView3<f32>, height: usize, width: usize) -> Result<Array4<f32>, LatentsError> {
    let (b, seq, ch4) = x.dim();
    let bad = |reason: String| LatentsError::Pack { shape: x.shape().to_vec(), reason };
    if height % 2 != 0 || width % 2 != 0 {
        return Err(bad(format!("latent size {height}x{width} must be even")));
    }
    let (hp, wp) = (height / 2, width / 2);
    if seq != hp * wp || ch4 % 4 != 0 {
        return Err(bad(format!("expected {} tokens of 4*C values for a {height}x{width} latent", hp * wp)));
    }
    let c = ch4 / 4;
    let mut out = Array4::<f32>::zeros((b, c, height, width));
    for bi in 0..b {
        for i in 0..hp {
            for j in 0..wp {
                let token = i * wp + j;
                for ci in 0..c {
                    for di in 0..2 {
                        for dj in 0..2 {
                            out[[bi, ci, 2 * i + di, 2 * j + dj]] = x[[bi, token, ci * 4 + di * 2 + dj]];
                        }
                    }
                }
            }
        }
    }
    Ok(out)
}

/// The VAE's per-channel latent statistics as float32 (`torch.tensor(config.latents_mean)`).
#[derive(Clone, Debug, PartialEq)]
pub struct LatentStats {
    mean: Vec<f32>,
    std: Vec<f32>,
    inv_std: Vec<f32>,
}

impl LatentStats {
    /// From the manifest's `vae.latents_mean` / `latents_std` (one value per channel).
    pub fn new(mean: &[f64], std: &[f64]) -> Result<LatentStats, LatentsError> {
        if mean.is_empty() || mean.len() != std.len() {
            return Err(LatentsError::Stats(format!(
                "{} means and {} stds; need one of each per channel",
                mean.len(),
                std.len()
            )));
        }
        let mean: Vec<f32> = mean.iter().map(|&v| v as f32).collect();
        let std: Vec<f32> = std.iter().map(|&v| v as f32).collect();
        if mean.iter().any(|v| !v.is_finite()) || std.iter().any(|&v| !(v.is_finite() && v > 0.0)) {
            return Err(LatentsError::Stats("means must be finite and stds finite and positive".into()));
        }
        // The decode path's `1.0 / torch.tensor(latents_std)`, in float32.
        let inv_std = std.iter().map(|&s| 1.0f32 / s).collect();
        Ok(LatentStats { mean, std, inv_std })
    }

    pub fn channels(&self) -> usize {
        self.mean.len()
    }

    fn check(&self, x: &ArrayViewMut4<f32>) -> Result<(), LatentsError> {
        let got = x.len_of(Axis(1));
        if got != self.channels() {
            return Err(LatentsError::Channels { got, want: self.channels() });
        }
        Ok(())
    }

    /// `_encode_vae_image`'s `(z - mean) / std` on `(B, C, h, w)`, in place.
    pub fn normalize(&self, mut z: ArrayViewMut4<f32>) -> Result<(), LatentsError> {
        self.check(&z)?;
        for (c, mut plane) in z.axis_iter_mut(Axis(1)).enumerate() {
            let (m, s) = (self.mean[c], self.std[c]);
            plane.mapv_inplace(|v| (v - m) / s);
        }
        Ok(())
    }

    /// The decode path's `latents / (1 / std) + mean` on `(B, C, h, w)`, in place (float32; a
    /// bf16/fp16 VAE in the reference rounds these steps to its dtype instead).
    pub fn denormalize(&self, mut z: ArrayViewMut4<f32>) -> Result<(), LatentsError> {
        self.check(&z)?;
        for (c, mut plane) in z.axis_iter_mut(Axis(1)).enumerate() {
            let (m, inv) = (self.mean[c], self.inv_std[c]);
            plane.mapv_inplace(|v| v / inv + m);
        }
        Ok(())
    }
}

/// The packed initial noise of one job, `(1, (h/2)(w/2), 4 * channels)`: `prepare_latents`'
/// `randn_tensor((1, 1, channels, h, w), generator=torch.Generator("cpu").manual_seed(seed))` then
/// `_pack_latents`. `(latent_h, latent_w)` is [`EditSizes::latent_size`]; `channels` is 16.
pub fn initial_noise(
    seed: u64,
    channels: usize,
    latent_h: usize,
    latent_w: usize,
    kernels: CpuKernels,
) -> Result<Array3<f32>, LatentsError> {
    let values = randn(seed, channels * latent_h * latent_w, kernels);
    let noise = Array4::from_shape_vec((1, channels, latent_h, latent_w), values)
        .map_err(|e| LatentsError::Pack { shape: vec![1, channels, latent_h, latent_w], reason: e.to_string() })?;
    pack_latents(noise.view())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn calculate_dimensions_rounds_half_to_even() {
        assert_eq!(calculate_dimensions(1024 * 1024, 1.0), (1024, 1024));
        // sqrt(area) / 32 = 2.5 and 3.5: Python's round gives 2 and 4.
        assert_eq!(calculate_dimensions(80 * 80, 1.0), (64, 64));
        assert_eq!(calculate_dimensions(112 * 112, 1.0), (128, 128));
        assert_eq!(calculate_dimensions(1024 * 1024, aspect_ratio(1920, 1080)), (1376, 768));
        assert_eq!(calculate_dimensions(1024 * 1024, aspect_ratio(1, 5000)).0, 0);
    }

    #[test]
    fn v1_and_plus_sizes() {
        let v1 = edit_sizes(&[(1920, 1080)], (None, None), 1024 * 1024, None).unwrap();
        assert_eq!(v1.output, (1376, 768));
        assert_eq!(v1.vae, vec![(1376, 768)]);
        assert_eq!(v1.vl, v1.vae);
        assert_eq!(v1.img_shapes, vec![LatentGrid::new(1, 48, 86), LatentGrid::new(1, 48, 86)]);
        assert_eq!(v1.image_seq_len(), 48 * 86);
        assert_eq!(v1.latent_size(), (96, 172));
        let req = edit_sizes(&[(1920, 1080)], (Some(1000), Some(0)), 1024 * 1024, None).unwrap();
        assert_eq!(req.output, (992, 768));
        assert_eq!(req.img_shapes[1], LatentGrid::new(1, 48, 86));

        let plus = edit_sizes(&[(1000, 1000), (1080, 1920)], (None, None), 1024 * 1024, Some(384 * 384)).unwrap();
        assert_eq!(plus.output, (768, 1376));
        assert_eq!(plus.vae, vec![(1024, 1024), (768, 1376)]);
        assert_eq!(plus.vl, vec![(384, 384), (288, 512)]);
        assert_eq!(plus.img_shapes.len(), 3);

        assert_eq!(edit_sizes(&[], (None, None), 1 << 20, None), Err(LatentsError::NoImages));
        assert_eq!(edit_sizes(&[(8, 8), (8, 8)], (None, None), 1 << 20, None), Err(LatentsError::TooManyImages(2)));
        assert!(matches!(edit_sizes(&[(0, 8)], (None, None), 1 << 20, None), Err(LatentsError::EmptyImage { .. })));
        assert!(matches!(edit_sizes(&[(1, 5000)], (None, None), 1 << 20, None), Err(LatentsError::DegenerateSize { .. })));
        assert!(matches!(edit_sizes(&[(8, 8)], (Some(15), None), 1 << 20, None), Err(LatentsError::OutputTooSmall { .. })));
    }

    #[test]
    fn pack_round_trip_and_layout() {
        let x = Array4::from_shape_fn((2, 3, 4, 6), |(b, c, h, w)| (((b * 3 + c) * 4 + h) * 6 + w) as f32);
        let p = pack_latents(x.view()).unwrap();
        assert_eq!(p.dim(), (2, 6, 12));
        // Token 1 = patch (0, 1): channel 0 holds x[0, 0, 0..2, 2..4].
        assert_eq!(p.slice(ndarray::s![0, 1, 0..4]).to_vec(), vec![2.0, 3.0, 8.0, 9.0]);
        assert_eq!(unpack_latents(p.view(), 4, 6).unwrap(), x);
        assert!(pack_latents(Array4::<f32>::zeros((1, 1, 3, 2)).view()).is_err());
        assert!(unpack_latents(p.view(), 4, 4).is_err());
    }

    #[test]
    fn normalisation_inverts() {
        let stats = LatentStats::new(&[0.5, -1.0], &[2.0, 0.25]).unwrap();
        let mut z = Array4::from_shape_fn((1, 2, 2, 2), |(_, c, h, w)| (c * 4 + h * 2 + w) as f32);
        let orig = z.clone();
        stats.normalize(z.view_mut()).unwrap();
        assert_eq!(z[[0, 0, 0, 1]], (1.0 - 0.5) / 2.0);
        stats.denormalize(z.view_mut()).unwrap();
        assert_eq!(z, orig);
        assert!(stats.normalize(Array4::<f32>::zeros((1, 3, 1, 1)).view_mut()).is_err());
        assert!(LatentStats::new(&[0.0], &[0.0]).is_err());
        assert!(LatentStats::new(&[0.0], &[]).is_err());
    }

    #[test]
    fn noise_depends_only_on_the_seed() {
        let a = initial_noise(7, 16, 4, 6, CpuKernels::Avx2).unwrap();
        assert_eq!(a.dim(), (1, 6, 64));
        assert_eq!(a, initial_noise(7, 16, 4, 6, CpuKernels::Avx2).unwrap());
        assert_ne!(a, initial_noise(8, 16, 4, 6, CpuKernels::Avx2).unwrap());
    }
}
