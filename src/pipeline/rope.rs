//! The MMDiT's rotary position tables, exactly diffusers' `QwenEmbedRope` (scale_rope=True) as the
//! transformer's real `img_cos`/`img_sin`/`txt_cos`/`txt_sin` inputs (ONNX has no complex type).
//!
//! Each image token gets three positions: its frame (the image's index in the list: target 0, then
//! the condition images), its row and its column. Rows and columns are centred: an axis of `n`
//! patches uses positions `-(n - n/2) .. n/2 - 1` (the reference's negative table for the first
//! part). Text token `k` gets position `m + k` on all three axes, where `m` is the largest
//! `max(h/2, w/2)` over the images. Each axis contributes `dim/2` frequency pairs
//! `theta^(-2i/dim)`; a table row holds the `cos`/`sin` of `position * frequency` for the 8 + 28 + 28
//! pairs of the real model. Every float operation is torch's (float32 frequencies through
//! [`pow_scalar_base`], float32 products, libm `cosf`/`sinf` like `torch.polar`), so the tables are
//! bit-identical to the reference's.

use ndarray::Array2;
use thiserror::Error;

use super::torch_cpu::{pow_scalar_base, CpuKernels};

/// Errors of the RoPE table construction.
#[derive(Debug, Error, PartialEq)]
pub enum RopeError {
    #[error("RoPE axes {0:?} are invalid: each axis dimension must be even and non-zero (the real model uses [16, 56, 56])")]
    Axes([usize; 3]),
    #[error("RoPE theta {0} is invalid: it must be a positive finite number (the real model uses 10000)")]
    Theta(f64),
    #[error("no images given: the table needs at least the target image's latent grid")]
    NoImages,
    #[error("image {index} has an empty latent grid {grid:?}: frames, height and width must be at least 1")]
    EmptyGrid { index: usize, grid: LatentGrid },
    #[error(
        "image {index} ({grid:?}) needs RoPE positions beyond the reference's {table}-entry table; \
         use smaller or fewer images"
    )]
    ImageTooLarge { index: usize, grid: LatentGrid, table: usize },
    #[error(
        "{txt_seq} text tokens starting at position {start} exceed the reference's {table}-entry RoPE table \
         (the reference would silently truncate it); shorten the prompt to at most {} tokens",
        table.saturating_sub(*start)
    )]
    TextTooLong { txt_seq: usize, start: usize, table: usize },
}

/// One image's grid in RoPE units (latent patches: pixels / 16 for the real model), like an entry of
/// the reference's `img_shapes`: `(frame, height, width)`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct LatentGrid {
    pub frames: usize,
    pub height: usize,
    pub width: usize,
}

impl LatentGrid {
    pub fn new(frames: usize, height: usize, width: usize) -> LatentGrid {
        LatentGrid { frames, height, width }
    }

    /// Number of tokens of the image: frames * height * width.
    pub fn tokens(&self) -> usize {
        self.frames * self.height * self.width
    }
}

/// The transformer's RoPE settings (manifest `transformer.rope_theta`, `axes_dims_rope`, `rope_positions`).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RopeSpec {
    pub theta: f64,
    pub axes_dim: [usize; 3],
    /// Length of the reference's position tables (`torch.arange(4096)`).
    pub table_len: usize,
}

impl Default for RopeSpec {
    /// The real model: theta 10000, axes (16, 56, 56), 4096 positions.
    fn default() -> RopeSpec {
        RopeSpec { theta: 10_000.0, axes_dim: [16, 56, 56], table_len: 4096 }
    }
}

/// Real cos/sin tables, one row per token, `half_dim = sum(axes_dim) / 2` columns (frame pairs,
/// then height pairs, then width pairs).
#[derive(Clone, Debug, PartialEq)]
pub struct RopeTables {
    /// `[img_seq, half_dim]`: target image tokens first, then each condition image's, row-major.
    pub img_cos: Array2<f32>,
    pub img_sin: Array2<f32>,
    /// `[txt_seq, half_dim]`.
    pub txt_cos: Array2<f32>,
    pub txt_sin: Array2<f32>,
}

/// Precomputed frequencies of one [`RopeSpec`]; build once per model, call [`Rope::tables`] per shape.
#[derive(Clone, Debug)]
pub struct Rope {
    spec: RopeSpec,
    /// Per axis: the `dim/2` inverse frequencies `1 / theta^(2i/dim)` in float32.
    inv_freq: [Vec<f32>; 3],
}

impl Rope {
    /// Frequencies as `QwenEmbedRope.rope_params` computes them:
    /// `1.0 / torch.pow(theta, torch.arange(0, dim, 2).to(float32).div(dim))`.
    pub fn new(spec: RopeSpec, kernels: CpuKernels) -> Result<Rope, RopeError> {
        if spec.axes_dim.iter().any(|&d| d == 0 || d % 2 != 0) {
            return Err(RopeError::Axes(spec.axes_dim));
        }
        if !(spec.theta.is_finite() && spec.theta > 0.0) {
            return Err(RopeError::Theta(spec.theta));
        }
        let theta = spec.theta as f32;
        let inv_freq = spec.axes_dim.map(|dim| {
            let exponents: Vec<f32> = (0..dim).step_by(2).map(|k| k as f32 / dim as f32).collect();
            pow_scalar_base(theta, &exponents, kernels).into_iter().map(|p| 1.0f32 / p).collect()
        });
        Ok(Rope { spec, inv_freq })
    }

    pub fn spec(&self) -> &RopeSpec {
        &self.spec
    }

    /// Per axis, the float32 inverse frequencies (the golden tests compare them with torch's).
    pub fn inv_freq(&self) -> &[Vec<f32>; 3] {
        &self.inv_freq
    }

    /// Number of (cos, sin) pairs per row: `sum(axes_dim) / 2` (64 for the real model).
    pub fn half_dim(&self) -> usize {
        self.inv_freq.iter().map(Vec::len).sum()
    }

    /// The first text position: `max(h/2, w/2)` over the images (the reference's `max_vid_index`).
    pub fn text_start(images: &[LatentGrid]) -> usize {
        images.iter().map(|g| (g.height / 2).max(g.width / 2)).max().unwrap_or(0)
    }

    /// Whether `images` and `txt_seq` text rows fit the reference's position table, without
    /// computing the tables (a cheap check before a request's images are resized).
    pub fn check(&self, images: &[LatentGrid], txt_seq: usize) -> Result<(), RopeError> {
        if images.is_empty() {
            return Err(RopeError::NoImages);
        }
        let table = self.spec.table_len;
        for (index, &grid) in images.iter().enumerate() {
            if grid.frames == 0 || grid.height == 0 || grid.width == 0 {
                return Err(RopeError::EmptyGrid { index, grid });
            }
            // Frame rows idx..idx+frames of the positive table; height/width need n - n/2 negative
            // and n/2 positive entries.
            let fits =
                index + grid.frames <= table && grid.height - grid.height / 2 <= table && grid.width - grid.width / 2 <= table;
            if !fits {
                return Err(RopeError::ImageTooLarge { index, grid, table });
            }
        }
        let start = Self::text_start(images);
        if start + txt_seq > table {
            return Err(RopeError::TextTooLong { txt_seq, start, table });
        }
        Ok(())
    }

    /// The tables for `images` (target first, then condition images) and `txt_seq` text rows
    /// (the padded text length the transformer sees).
    pub fn tables(&self, images: &[LatentGrid], txt_seq: usize) -> Result<RopeTables, RopeError> {
        self.check(images, txt_seq)?;
        let start = Self::text_start(images);
        let half = self.half_dim();
        let [f_dim, h_dim, w_dim] = [0, 1, 2].map(|a| self.inv_freq[a].len());
        let img_seq: usize = images.iter().map(LatentGrid::tokens).sum();
        let mut img_cos = Array2::<f32>::zeros((img_seq, half));
        let mut img_sin = Array2::<f32>::zeros((img_seq, half));
        let mut row = 0;
        for (index, grid) in images.iter().enumerate() {
            let frames = self.axis_table(0, (index..index + grid.frames).map(|p| p as i64));
            let rows = self.axis_table(1, centred(grid.height));
            let cols = self.axis_table(2, centred(grid.width));
            for f in 0..grid.frames {
                for h in 0..grid.height {
                    for w in 0..grid.width {
                        let mut cos = img_cos.row_mut(row);
                        let cos = cos.as_slice_mut().expect("standard layout");
                        cos[..f_dim].copy_from_slice(&frames.0[f]);
                        cos[f_dim..f_dim + h_dim].copy_from_slice(&rows.0[h]);
                        cos[f_dim + h_dim..].copy_from_slice(&cols.0[w]);
                        let mut sin = img_sin.row_mut(row);
                        let sin = sin.as_slice_mut().expect("standard layout");
                        sin[..f_dim].copy_from_slice(&frames.1[f]);
                        sin[f_dim..f_dim + h_dim].copy_from_slice(&rows.1[h]);
                        sin[f_dim + h_dim..].copy_from_slice(&cols.1[w]);
                        row += 1;
                    }
                }
            }
        }
        debug_assert_eq!(w_dim + f_dim + h_dim, half);

        let mut txt_cos = Array2::<f32>::zeros((txt_seq, half));
        let mut txt_sin = Array2::<f32>::zeros((txt_seq, half));
        for k in 0..txt_seq {
            let pos = (start + k) as f32;
            let mut col = 0;
            for freqs in &self.inv_freq {
                for &inv in freqs {
                    let angle = pos * inv;
                    txt_cos[[k, col]] = angle.cos();
                    txt_sin[[k, col]] = angle.sin();
                    col += 1;
                }
            }
        }
        Ok(RopeTables { img_cos, img_sin, txt_cos, txt_sin })
    }

    /// cos and sin rows of one axis for the given positions.
    fn axis_table(&self, axis: usize, positions: impl Iterator<Item = i64>) -> (Vec<Vec<f32>>, Vec<Vec<f32>>) {
        let freqs = &self.inv_freq[axis];
        positions
            .map(|p| {
                // torch.outer(index, freqs): the int64 index converted to float32, one product.
                let p = p as f32;
                freqs.iter().map(|&inv| (p * inv).cos()).zip(freqs.iter().map(|&inv| (p * inv).sin())).unzip()
            })
            .unzip()
    }
}

/// `cat([neg[-(n - n//2):], pos[:n//2]])`: positions `-(n - n/2) .. n/2 - 1`.
fn centred(n: usize) -> impl Iterator<Item = i64> {
    let neg = (n - n / 2) as i64;
    (0..n as i64).map(move |i| i - neg)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rope() -> Rope {
        Rope::new(RopeSpec::default(), CpuKernels::Avx2).unwrap()
    }

    #[test]
    fn positions_are_centred_like_the_reference() {
        assert_eq!(centred(1).collect::<Vec<_>>(), vec![-1]);
        assert_eq!(centred(4).collect::<Vec<_>>(), vec![-2, -1, 0, 1]);
        assert_eq!(centred(5).collect::<Vec<_>>(), vec![-3, -2, -1, 0, 1]);
        assert_eq!(Rope::text_start(&[LatentGrid::new(1, 64, 64), LatentGrid::new(1, 40, 90)]), 45);
    }

    #[test]
    fn table_shapes_and_layout() {
        let r = rope();
        assert_eq!(r.half_dim(), 64);
        let t = r.tables(&[LatentGrid::new(1, 2, 3), LatentGrid::new(1, 3, 1)], 5).unwrap();
        assert_eq!(t.img_cos.dim(), (9, 64));
        assert_eq!(t.txt_sin.dim(), (5, 64));
        // Target image: frame 0 -> angle 0 on the frame pairs; condition image: frame 1.
        assert_eq!(t.img_cos[[0, 0]], 1.0);
        assert_eq!(t.img_sin[[0, 0]], 0.0);
        assert_eq!(t.img_cos[[6, 0]], 1.0f32.cos());
        // Row 0 of a 2x3 grid: height position -1, width position -2 (first width pair: angle -2).
        assert_eq!(t.img_sin[[0, 8]], (-1.0f32).sin());
        assert_eq!(t.img_sin[[0, 36]], (-2.0f32).sin());
        // Text starts at max(h/2, w/2) = 1 on every axis.
        assert_eq!(t.txt_cos[[0, 0]], 1.0f32.cos());
        assert_eq!(t.txt_cos[[4, 36]], 5.0f32.cos());
    }

    #[test]
    fn rejects_what_the_reference_table_cannot_hold() {
        let r = rope();
        let img = [LatentGrid::new(1, 64, 64)];
        assert!(r.tables(&img, 4096 - 32).is_ok());
        let err = r.tables(&img, 4096 - 31).unwrap_err();
        assert_eq!(err, RopeError::TextTooLong { txt_seq: 4065, start: 32, table: 4096 });
        assert!(err.to_string().contains("at most 4064 tokens"));
        assert_eq!(r.tables(&[], 4), Err(RopeError::NoImages));
        assert!(matches!(r.tables(&[LatentGrid::new(1, 0, 4)], 4), Err(RopeError::EmptyGrid { .. })));
        assert!(matches!(r.tables(&[LatentGrid::new(1, 8194, 4)], 0), Err(RopeError::ImageTooLarge { .. })));
        assert!(Rope::new(RopeSpec { axes_dim: [16, 55, 56], ..RopeSpec::default() }, CpuKernels::Avx2).is_err());
        assert!(Rope::new(RopeSpec { theta: -1.0, ..RopeSpec::default() }, CpuKernels::Avx2).is_err());
    }
}
