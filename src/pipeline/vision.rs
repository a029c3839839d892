//! Qwen2-VL image preprocessing and the vision tower's host-side index tensors, as transformers does it.
//! smart_resize, resize + rescale + normalize + patchify, vision positions, window order, segments.
//!
//! Reference (transformers 5.23): `Qwen2VLImageProcessor` (torchvision backend, the default: torch's
//! uint8 antialiased bicubic, normalisation folded as torchvision does) or `Qwen2VLImageProcessorPil`
//! (PIL bicubic, `uint8 -> f64 * scale -> f32`, then `(x - mean) / std` in f32), `patchify`, `vision_utils` (`get_vision_position_ids`, `get_vision_window_index`,
//! `get_vision_cu_seqlens`) and `Qwen2_5_VisionTransformerPretrainedModel.forward`, whose
//! data-dependent parts the ONNX graph takes as inputs:
//! - `window_index` [units]: merge units reordered window by window (`permute_input_for_window_attn`);
//! - `window_seg` / `image_seg` [patches]: for each patch of that window-ordered sequence, the index of
//!   its segment in `cu_window_seqlens` (window blocks) / `cu_seqlens` (full-attention blocks, one
//!   segment per image), so attention is "same segment id".
//!
//! Several images (Plus, or several prompts of a batch) are processed as one batch, image after image,
//! with the merge-unit indices offset per image exactly as HF's batched `get_vision_window_index`.
//! The same image used by several prompt rows (true CFG) is given once; prompt rows refer to it by its
//! position (slot) in the batch (see `prompt.rs`).

use crate::bundle::Resample;
pub use crate::bundle::{ProcessorBackend, Vision};
use crate::imaging::{self, Filter, RgbImage};

/// Errors of the vision preprocessing.
#[derive(Debug, thiserror::Error)]
pub enum VisionError {
    #[error("image is {width}x{height} pixels: both sides must be at least 1")]
    EmptyImage { width: u64, height: u64 },
    #[error(
        "image is {width}x{height} pixels, an aspect ratio of {ratio:.2}: the vision encoder accepts at \
         most 200:1; crop or pad the image"
    )]
    AspectRatio { width: u64, height: u64, ratio: f64 },
    #[error("pixel buffer holds {got} bytes but a {width}x{height} RGB image needs {need}")]
    BufferSize { width: u32, height: u32, got: usize, need: usize },
    #[error(
        "image is {width}x{height} but the vision processor works on {want_width}x{want_height} \
         (smart_resize): resize it first (`vision::target_size`)"
    )]
    NotResized { width: u32, height: u32, want_width: u32, want_height: u32 },
    #[error("invalid vision settings in the bundle manifest: {0}")]
    Settings(String),
    #[error("no images to process")]
    NoImages,
    #[error("cannot resize the image for the vision encoder: {0}")]
    Resize(String),
}

/// The manifest's `vision` section, as this module uses it (the type is declared in `bundle`).
impl Vision {
    /// The settings of the real Qwen-Image-Edit models (`preprocessor_config.json`, vision config),
    /// with the Qwen2 tokenizer's token ids.
    pub fn qwen_image_edit() -> Self {
        Vision {
            patch_size: 14,
            temporal_patch_size: 2,
            merge_size: 2,
            min_pixels: 56 * 56,
            max_pixels: 28 * 28 * 16384,
            resample: Resample::Bicubic,
            rescale_factor: 1.0 / 255.0,
            image_mean: [0.48145466, 0.4578275, 0.40821073],
            image_std: [0.26862954, 0.26130258, 0.27577711],
            window_size: 112,
            image_token_id: 151655,
            video_token_id: 151656,
            vision_start_token_id: 151652,
            condition_area: None,
            processor_backend: ProcessorBackend::Torchvision,
        }
    }

    /// Checks what the computations below rely on; names the offending key.
    pub fn validate(&self) -> Result<(), VisionError> {
        let bad = |m: String| Err(VisionError::Settings(m));
        if self.patch_size == 0 || self.temporal_patch_size == 0 || self.merge_size == 0 {
            return bad(format!(
                "patch_size ({}), temporal_patch_size ({}) and merge_size ({}) must be positive",
                self.patch_size, self.temporal_patch_size, self.merge_size
            ));
        }
        if self.window_size / self.merge_size / self.patch_size == 0 {
            return bad(format!(
                "window_size {} is smaller than merge_size * patch_size = {}",
                self.window_size,
                self.merge_size * self.patch_size
            ));
        }
        if self.min_pixels == 0 || self.min_pixels > self.max_pixels {
            return bad(format!(
                "min_pixels ({}) must be positive and at most max_pixels ({})",
                self.min_pixels, self.max_pixels
            ));
        }
        if !(self.rescale_factor.is_finite() && self.rescale_factor > 0.0) {
            return bad(format!("rescale_factor {} must be a positive number", self.rescale_factor));
        }
        if self.image_std.iter().any(|s| !(s.is_finite() && *s != 0.0)) || self.image_mean.iter().any(|m| !m.is_finite()) {
            return bad(format!(
                "image_mean {:?} / image_std {:?} must be finite, std non-zero",
                self.image_mean, self.image_std
            ));
        }
        if self.resample != Resample::Bicubic {
            return bad(format!("resample `{:?}` is not supported (the reference uses `bicubic`)", self.resample));
        }
        Ok(())
    }

    /// Side multiple of the resized image: `patch_size * merge_size` (28).
    pub fn factor(&self) -> usize {
        self.patch_size * self.merge_size
    }

    /// Values per patch row of `pixel_values`: `3 * temporal_patch_size * patch_size^2` (1176).
    pub fn patch_dim(&self) -> usize {
        3 * self.temporal_patch_size * self.patch_size * self.patch_size
    }

    /// Patches per merged vision token: `merge_size^2` (4).
    pub fn merge_unit(&self) -> usize {
        self.merge_size * self.merge_size
    }
}

/// Python's `round()` on a float: to nearest, ties to even.
fn round_half_even(x: f64) -> f64 {
    x.round_ties_even()
}

/// `smart_resize(height, width, factor, min_pixels, max_pixels)` of transformers, returning
/// `(height, width)`: both multiples of `factor`, area within bounds, aspect ratio kept.
pub fn smart_resize(height: u64, width: u64, factor: u64, min_pixels: u64, max_pixels: u64) -> Result<(u64, u64), VisionError> {
    if height == 0 || width == 0 {
        return Err(VisionError::EmptyImage { width, height });
    }
    let ratio = height.max(width) as f64 / height.min(width) as f64;
    if ratio > 200.0 {
        return Err(VisionError::AspectRatio { width, height, ratio });
    }
    let (h, w, f) = (height as f64, width as f64, factor as f64);
    let mut h_bar = round_half_even(h / f) as u64 * factor;
    let mut w_bar = round_half_even(w / f) as u64 * factor;
    if h_bar * w_bar > max_pixels {
        let beta = ((height * width) as f64 / max_pixels as f64).sqrt();
        h_bar = factor.max((h / beta / f).floor() as u64 * factor);
        w_bar = factor.max((w / beta / f).floor() as u64 * factor);
    } else if h_bar * w_bar < min_pixels {
        let beta = (min_pixels as f64 / (height * width) as f64).sqrt();
        h_bar = (h * beta / f).ceil() as u64 * factor;
        w_bar = (w * beta / f).ceil() as u64 * factor;
    }
    Ok((h_bar, w_bar))
}

/// Size `(width, height)` the processor resizes a `width`x`height` image to.
pub fn target_size(width: u32, height: u32, settings: &Vision) -> Result<(u32, u32), VisionError> {
    let (h, w) = smart_resize(height as u64, width as u64, settings.factor() as u64, settings.min_pixels, settings.max_pixels)?;
    let fit = |v: u64| u32::try_from(v).map_err(|_| VisionError::Settings(format!("resized side {v} overflows")));
    Ok((fit(w)?, fit(h)?))
}

/// Grid of one image in patches (`image_grid_thw`): frames, rows, columns.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ImageGrid {
    pub t: usize,
    pub h: usize,
    pub w: usize,
}

impl ImageGrid {
    pub fn patches(&self) -> usize {
        self.t * self.h * self.w
    }

    /// Merged vision tokens (= `<|image_pad|>` tokens) of this image.
    pub fn merged_tokens(&self, merge_size: usize) -> usize {
        self.patches() / (merge_size * merge_size)
    }
}

/// One preprocessed image: its grid and `pixel_values` rows ([patches, patch_dim], row-major).
#[derive(Clone, Debug, PartialEq)]
pub struct VisionImage {
    pub grid: ImageGrid,
    pub width: u32,
    pub height: u32,
    pub pixel_values: Vec<f32>,
}

/// Per channel, the processor's value of every u8, with the backend's dtypes and operation order:
/// PIL: `f32(f64(v) * rescale_factor)`, then `(x - f32(mean)) / f32(std)` in f32; torchvision (fused
/// rescale): `(f32(v) - f32(mean) * f32(1/rescale)) / (f32(std) * f32(1/rescale))` in f32.
fn value_tables(s: &Vision) -> [[f32; 256]; 3] {
    let mut t = [[0f32; 256]; 3];
    for (c, table) in t.iter_mut().enumerate() {
        let mean = s.image_mean[c] as f32;
        let std = s.image_std[c] as f32;
        match s.processor_backend {
            ProcessorBackend::Pil => {
                for (v, out) in table.iter_mut().enumerate() {
                    let x = (v as f64 * s.rescale_factor) as f32;
                    *out = (x - mean) / std;
                }
            }
            ProcessorBackend::Torchvision => {
                let inv = (1.0 / s.rescale_factor) as f32;
                let (mean, std) = (mean * inv, std * inv);
                for (v, out) in table.iter_mut().enumerate() {
                    *out = (v as f32 - mean) / std;
                }
            }
        }
    }
    t
}

/// The processor's resize of `image` to `width x height` for the configured backend.
pub fn resize(image: &RgbImage, width: u32, height: u32, s: &Vision) -> Result<RgbImage, VisionError> {
    let r = match s.processor_backend {
        ProcessorBackend::Torchvision => imaging::torch_resize::resize_bicubic_aa(image, width, height),
        ProcessorBackend::Pil => imaging::resize(image, width, height, Filter::Bicubic),
    };
    r.map_err(|e| VisionError::Resize(e.to_string()))
}

/// Rescales, normalises and patchifies an RGB8 image (HWC, row-major) that already has the
/// processor's size (`target_size` of itself), exactly as `Qwen2VLImageProcessorPil` does after its
/// resize. Rows are in merge-block order, each row `(channel, frame, y, x)`; the frame is duplicated
/// `temporal_patch_size` times.
pub fn patchify(rgb: &[u8], width: u32, height: u32, s: &Vision) -> Result<VisionImage, VisionError> {
    let grid = patch_grid(rgb, width, height, s)?;
    let mut out = vec![0f32; grid.patches() * s.patch_dim()];
    patchify_into(rgb, width, height, s, &mut out, |v| v)?;
    Ok(VisionImage { grid, width, height, pixel_values: out })
}

/// The grid of an image [`patchify`] accepts (resized to [`target_size`], RGB8 of that size).
pub fn patch_grid(rgb: &[u8], width: u32, height: u32, s: &Vision) -> Result<ImageGrid, VisionError> {
    s.validate()?;
    let need = width as usize * height as usize * 3;
    if rgb.len() != need {
        return Err(VisionError::BufferSize { width, height, got: rgb.len(), need });
    }
    let (want_width, want_height) = target_size(width, height, s)?;
    if (want_width, want_height) != (width, height) {
        return Err(VisionError::NotResized { width, height, want_width, want_height });
    }
    let p = s.patch_size;
    Ok(ImageGrid { t: 1, h: height as usize / p, w: width as usize / p })
}

/// [`patchify`] written straight into `out` ([patches, patch_dim]) in another element type: `conv` maps each
/// f32 value (the engine's dtype, so preprocessing writes the staging row once).
pub fn patchify_into<T: Copy>(
    rgb: &[u8],
    width: u32,
    height: u32,
    s: &Vision,
    out: &mut [T],
    conv: impl Fn(f32) -> T,
) -> Result<ImageGrid, VisionError> {
    let grid = patch_grid(rgb, width, height, s)?;
    let (p, m, tp) = (s.patch_size, s.merge_size, s.temporal_patch_size);
    let w = width as usize;
    let dim = s.patch_dim();
    if out.len() != grid.patches() * dim {
        return Err(VisionError::Settings(format!("{} values for {} patches of {dim}", out.len(), grid.patches())));
    }
    let tables: Vec<Vec<T>> = value_tables(s).iter().map(|t| t.iter().map(|&v| conv(v)).collect()).collect();
    let mut r = 0;
    for bh in 0..grid.h / m {
        for bw in 0..grid.w / m {
            for mh in 0..m {
                for mw in 0..m {
                    let row = &mut out[r * dim..(r + 1) * dim];
                    r += 1;
                    let y0 = (bh * m + mh) * p;
                    let x0 = (bw * m + mw) * p;
                    // Per channel: the p x p patch once, then its copies for the other temporal
                    // slots (the processor repeats a still image `temporal_patch_size` times).
                    for (c, (table, block)) in tables.iter().zip(row.chunks_exact_mut(tp * p * p)).enumerate() {
                        let (first, copies) = block.split_at_mut(p * p);
                        for (py, dst) in first.chunks_exact_mut(p).enumerate() {
                            let start = ((y0 + py) * w + x0) * 3;
                            for (d, px) in dst.iter_mut().zip(rgb[start..start + p * 3].chunks_exact(3)) {
                                *d = table[px[c] as usize];
                            }
                        }
                        for copy in copies.chunks_exact_mut(p * p) {
                            copy.copy_from_slice(first);
                        }
                    }
                }
            }
        }
    }
    Ok(grid)
}

/// The whole processor for one RGB image: `smart_resize`, the backend's exact bicubic resize (skipped
/// when the size is kept, as both backends do), then [`patchify`]. Bit-identical to the processor of
/// the configured backend (torchvision or PIL).
pub fn preprocess(image: &RgbImage, s: &Vision) -> Result<VisionImage, VisionError> {
    s.validate()?;
    let (w, h) = image.dimensions();
    let (tw, th) = target_size(w, h, s)?;
    if (tw, th) == (w, h) {
        return patchify(image.as_raw(), w, h, s);
    }
    let resized = resize(image, tw, th, s)?;
    patchify(resized.as_raw(), tw, th, s)
}

/// `get_vision_position_ids`: (row, col) of every patch, merge-block order, image after image;
/// flattened [patches, 2].
pub fn vision_position_ids(grids: &[ImageGrid], merge_size: usize) -> Vec<i64> {
    let m = merge_size;
    let mut out = Vec::with_capacity(grids.iter().map(|g| g.patches() * 2).sum());
    for g in grids {
        for _ in 0..g.t {
            for bh in 0..g.h / m {
                for bw in 0..g.w / m {
                    for mh in 0..m {
                        for mw in 0..m {
                            out.push((bh * m + mh) as i64);
                            out.push((bw * m + mw) as i64);
                        }
                    }
                }
            }
        }
    }
    out
}

/// `get_vision_cu_seqlens`: one attention segment per frame (`h * w` patches each), cumulative.
pub fn cu_seqlens(grids: &[ImageGrid]) -> Vec<i64> {
    let mut cu = vec![0i64];
    for g in grids {
        for _ in 0..g.t {
            let last = cu[cu.len() - 1];
            cu.push(last + (g.h * g.w) as i64);
        }
    }
    cu
}

/// `get_vision_window_index`: the merge-unit order of window attention (units of all images,
/// offset per image) and the cumulative window boundaries in patches (`cu_window_seqlens`, after
/// `unique_consecutive`).
pub fn window_index(grids: &[ImageGrid], merge_size: usize, window_size: usize, patch_size: usize) -> (Vec<i64>, Vec<i64>) {
    let vws = window_size / merge_size / patch_size;
    let unit = (merge_size * merge_size) as i64;
    let mut index = Vec::with_capacity(grids.iter().map(|g| g.merged_tokens(merge_size)).sum());
    let mut cu = vec![0i64];
    let mut offset = 0i64;
    for g in grids {
        let (lh, lw) = (g.h / merge_size, g.w / merge_size);
        // HF pads by a whole window when the grid is a multiple of the window (empty windows).
        let (pad_h, pad_w) = (vws - lh % vws, vws - lw % vws);
        let (nwh, nww) = ((lh + pad_h) / vws, (lw + pad_w) / vws);
        for t in 0..g.t {
            for wy in 0..nwh {
                for wx in 0..nww {
                    let mut count = 0i64;
                    for iy in 0..vws {
                        let y = wy * vws + iy;
                        if y >= lh {
                            continue;
                        }
                        for ix in 0..vws {
                            let x = wx * vws + ix;
                            if x < lw {
                                index.push(offset + (t * lh * lw + y * lw + x) as i64);
                                count += 1;
                            }
                        }
                    }
                    let last = cu[cu.len() - 1];
                    let next = last + count * unit;
                    if next != last {
                        cu.push(next); // unique_consecutive drops empty windows
                    }
                }
            }
        }
        offset += (g.t * lh * lw) as i64;
    }
    (index, cu)
}

/// Segment id of each of `n` positions for cumulative boundaries `cu` ([0, c1, ..., n])
/// (`searchsorted(cu[1:], pos, right=True)`).
pub fn segments(cu: &[i64], n: usize) -> Vec<i64> {
    let ends = cu.get(1..).unwrap_or(&[]);
    (0..n as i64).map(|pos| ends.partition_point(|&c| c <= pos) as i64).collect()
}

/// The vision part of the text encoder's inputs for a batch of images (slots), image after image.
#[derive(Clone, Debug, PartialEq)]
pub struct VisionBatch {
    /// Grid of each slot.
    pub grids: Vec<ImageGrid>,
    /// First merged vision token of each slot in the encoder's (un-windowed) output.
    pub token_offsets: Vec<usize>,
    /// [patches, patch_dim]
    pub pixel_values: Vec<f32>,
    pub patch_dim: usize,
    /// [patches, 2]
    pub vision_pos_ids: Vec<i64>,
    /// [units]
    pub window_index: Vec<i64>,
    /// [patches], over the window-ordered sequence.
    pub window_seg: Vec<i64>,
    /// [patches], over the window-ordered sequence.
    pub image_seg: Vec<i64>,
}

impl VisionBatch {
    /// Concatenates `images` (one per slot, in order) and computes the index tensors.
    pub fn new(images: &[&VisionImage], s: &Vision) -> Result<VisionBatch, VisionError> {
        s.validate()?;
        if images.is_empty() {
            return Err(VisionError::NoImages);
        }
        let dim = s.patch_dim();
        let grids: Vec<ImageGrid> = images.iter().map(|i| i.grid).collect();
        for img in images {
            if img.pixel_values.len() != img.grid.patches() * dim {
                return Err(VisionError::Settings(format!(
                    "an image holds {} values, not {} patches x {dim}: it was made with other settings",
                    img.pixel_values.len(),
                    img.grid.patches()
                )));
            }
        }
        let mut pixel_values = Vec::with_capacity(images.iter().map(|i| i.pixel_values.len()).sum());
        for img in images {
            pixel_values.extend_from_slice(&img.pixel_values);
        }
        let mut batch = Self::from_grids(&grids, s)?;
        batch.pixel_values = pixel_values;
        Ok(batch)
    }

    /// The index tensors only (empty `pixel_values`), e.g. to fill pixels into staging memory.
    pub fn from_grids(grids: &[ImageGrid], s: &Vision) -> Result<VisionBatch, VisionError> {
        s.validate()?;
        if grids.is_empty() {
            return Err(VisionError::NoImages);
        }
        let m = s.merge_size;
        for g in grids {
            if g.t == 0 || g.h == 0 || g.w == 0 || g.h % m != 0 || g.w % m != 0 {
                return Err(VisionError::Settings(format!("image grid {g:?} is not a positive multiple of merge_size {m}")));
            }
        }
        let patches: usize = grids.iter().map(ImageGrid::patches).sum();
        let mut token_offsets = Vec::with_capacity(grids.len());
        let mut next = 0;
        for g in grids {
            token_offsets.push(next);
            next += g.merged_tokens(m);
        }
        let (window_index, cu_window) = window_index(grids, m, s.window_size, s.patch_size);
        Ok(VisionBatch {
            grids: grids.to_vec(),
            token_offsets,
            pixel_values: Vec::new(),
            patch_dim: s.patch_dim(),
            vision_pos_ids: vision_position_ids(grids, m),
            window_index,
            window_seg: segments(&cu_window, patches),
            image_seg: segments(&cu_seqlens(grids), patches),
        })
    }

    /// Patches of all images.
    pub fn patches(&self) -> usize {
        self.grids.iter().map(ImageGrid::patches).sum()
    }

    /// Merged vision tokens of all images (the encoder's vision output rows).
    pub fn units(&self) -> usize {
        self.window_index.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings() -> Vision {
        Vision { max_pixels: 28 * 28 * 64, ..Vision::qwen_image_edit() }
    }

    #[test]
    fn smart_resize_rounds_half_to_even_like_python() {
        // 70 / 28 = 2.5 -> 2 (not 3); 42 / 28 = 1.5 -> 2; 98 / 28 = 3.5 -> 4; 126 / 28 = 4.5 -> 4.
        assert_eq!(smart_resize(70, 98, 28, 1, u64::MAX).unwrap(), (56, 112));
        assert_eq!(smart_resize(42, 126, 28, 1, u64::MAX).unwrap(), (56, 112));
    }

    #[test]
    fn smart_resize_rejects_bad_shapes() {
        assert!(matches!(smart_resize(0, 10, 28, 1, 100), Err(VisionError::EmptyImage { .. })));
        assert!(matches!(smart_resize(1, 201, 28, 1, 1 << 40), Err(VisionError::AspectRatio { .. })));
        assert!(smart_resize(1, 200, 28, 1, 1 << 40).is_ok());
    }

    #[test]
    fn patchify_layout_follows_merge_blocks() {
        let s = settings();
        // 56x56: grid 4x4; pixel value encodes its coordinates so the layout is checkable.
        let (w, h) = (56u32, 56u32);
        let mut rgb = vec![0u8; 56 * 56 * 3];
        for y in 0..56 {
            for x in 0..56 {
                for c in 0..3 {
                    rgb[(y * 56 + x) * 3 + c] = ((y / 14) * 4 + (x / 14) + c * 50) as u8;
                }
            }
        }
        let img = patchify(&rgb, w, h, &s).unwrap();
        assert_eq!(img.grid, ImageGrid { t: 1, h: 4, w: 4 });
        let t = value_tables(&s);
        // Row r = ((bh * 2 + bw) * 2 + mh) * 2 + mw, patch (y, x) = (bh*2+mh, bw*2+mw).
        for r in 0..16 {
            let (bh, bw, mh, mw) = (r / 8, (r / 4) % 2, (r / 2) % 2, r % 2);
            let (py, px) = (bh * 2 + mh, bw * 2 + mw);
            let row = &img.pixel_values[r * 1176..(r + 1) * 1176];
            for c in 0..3 {
                let want = t[c][py * 4 + px + c * 50];
                assert!(row[c * 392..(c + 1) * 392].iter().all(|&v| v == want), "row {r} channel {c}");
            }
        }
        let r = patchify(&vec![0u8; 70 * 70 * 3], 70, 70, &s);
        assert!(matches!(r, Err(VisionError::NotResized { want_width: 56, want_height: 56, .. })), "{:?}", r.err());
        let r = patchify(&rgb[..10], w, h, &s);
        assert!(matches!(r, Err(VisionError::BufferSize { got: 10, need: 9408, .. })), "{:?}", r.err());
    }

    #[test]
    fn window_index_of_one_window_is_identity() {
        let g = [ImageGrid { t: 1, h: 4, w: 6 }];
        let (idx, cu) = window_index(&g, 2, 112, 14);
        assert_eq!(idx, (0..6).collect::<Vec<i64>>());
        assert_eq!(cu, vec![0, 24]);
        assert_eq!(segments(&cu, 24), vec![0; 24]);
    }

    #[test]
    fn window_index_splits_windows_and_offsets_images() {
        // llm grid 2x6 with 4x4 windows: two windows (2x4, 2x2); second image offset by 12 units.
        let g = [ImageGrid { t: 1, h: 4, w: 12 }, ImageGrid { t: 1, h: 2, w: 2 }];
        let (idx, cu) = window_index(&g, 2, 112, 14);
        assert_eq!(idx, vec![0, 1, 2, 3, 6, 7, 8, 9, 4, 5, 10, 11, 12]);
        assert_eq!(cu, vec![0, 32, 48, 52]);
        let seg = segments(&cu, 52);
        assert_eq!((seg[31], seg[32], seg[47], seg[48], seg[51]), (0, 1, 1, 2, 2));
        assert_eq!(segments(&cu_seqlens(&g), 52)[46..50], [0, 0, 1, 1]);
    }

    #[test]
    fn batch_checks_images_and_offsets_tokens() {
        let s = settings();
        let a = patchify(&vec![7u8; 56 * 56 * 3], 56, 56, &s).unwrap();
        let b = patchify(&vec![9u8; 56 * 112 * 3], 56, 112, &s).unwrap();
        let batch = VisionBatch::new(&[&a, &b], &s).unwrap();
        assert_eq!(batch.token_offsets, vec![0, 4]);
        assert_eq!(batch.units(), 12);
        assert_eq!(batch.patches(), 48);
        assert_eq!(batch.pixel_values.len(), 48 * 1176);
        assert!(matches!(VisionBatch::new(&[], &s), Err(VisionError::NoImages)));
        let bad = Vision { window_size: 14, ..s };
        assert!(bad.validate().unwrap_err().to_string().contains("window_size"));
    }

    #[test]
    fn settings_parse_from_manifest_json() {
        let j = r#"{"patch_size":14,"temporal_patch_size":2,"merge_size":2,"min_pixels":3136,
            "max_pixels":12845056,"resample":"bicubic","rescale_factor":0.00392156862745098,
            "image_mean":[0.48145466,0.4578275,0.40821073],"image_std":[0.26862954,0.26130258,0.27577711],
            "window_size":112,"image_token_id":151655,"video_token_id":151656,
            "vision_start_token_id":151652,"condition_area":null}"#;
        let s: Vision = serde_json::from_str(j).unwrap();
        // serde_json must parse Python's repr of 1/255 to the very same double.
        assert_eq!(s.rescale_factor.to_bits(), (1.0f64 / 255.0).to_bits());
        assert_eq!(s, Vision::qwen_image_edit());
    }
}
