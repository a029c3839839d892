//! Convolution resize of RGB8 images, bit-identical to Pillow's `Image.resize(size, LANCZOS|BICUBIC)`.
//! A port of the 8-bit path of Pillow's `libImaging/Resample.c` (box = whole image, no reducing gap).
//!
//! How Pillow computes it, and so how this does:
//! 1. Per axis, for every output index, the window of input indices and its weights are computed in
//!    `f64` (`precompute_coeffs`): the filter is stretched by the downscale factor (never shrunk),
//!    the window bounds are rounded by truncation, the weights normalised by their sum.
//! 2. The weights are turned into fixed point with 22 fraction bits, rounded away from zero
//!    (`normalize_coeffs_8bpc`).
//! 3. Two passes, horizontal then vertical (or vertical first when the height shrinks much more,
//!    see `resize`); horizontal-first computes only the input rows the vertical pass will read. Each sample is `(1 << 21) + sum(pixel * weight)` in `i32`, shifted right by
//!    22 and clamped to 0..=255 (`clip8`). A pass is skipped when that axis keeps its size.
//!
//! fast_image_resize 6.1 (Lanczos3 / CatmullRom) was measured on the same goldens: identical in only
//! 33 of 88 cases, off by up to 33 levels near the borders when upscaling (different window bounds
//! and fixed-point weights), hence this port.

use image::RgbImage;

use super::Error;

/// Resampling filter, named as in Pillow.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash)]
pub enum Filter {
    /// `Image.LANCZOS`: windowed sinc, support 3 (what diffusers' `VaeImageProcessor` uses).
    Lanczos,
    /// `Image.BICUBIC`: cubic convolution with a = -0.5, support 2 (the Qwen2-VL PIL processor).
    Bicubic,
}

impl Filter {
    fn support(self) -> f64 {
        match self {
            Filter::Lanczos => 3.0,
            Filter::Bicubic => 2.0,
        }
    }

    #[inline]
    fn eval(self, x: f64) -> f64 {
        match self {
            Filter::Lanczos => lanczos(x),
            Filter::Bicubic => bicubic(x),
        }
    }
}

#[inline]
fn sinc(x: f64) -> f64 {
    if x == 0.0 {
        return 1.0;
    }
    let x = x * std::f64::consts::PI;
    x.sin() / x
}

#[inline]
fn lanczos(x: f64) -> f64 {
    if (-3.0..3.0).contains(&x) {
        sinc(x) * sinc(x / 3.0)
    } else {
        0.0
    }
}

#[inline]
fn bicubic(x: f64) -> f64 {
    const A: f64 = -0.5;
    let x = x.abs();
    if x < 1.0 {
        ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0
    } else if x < 2.0 {
        (((x - 5.0) * x + 8.0) * x - 4.0) * A
    } else {
        0.0
    }
}

/// Fraction bits of the fixed-point weights: 8 bits of result, 2 bits of headroom, sign.
const PRECISION_BITS: u32 = 32 - 8 - 2;

/// The fixed-point weights of one axis: for output index `i`, input indices
/// `start[i] .. start[i] + len[i]` with weights `weights[i * ksize ..][.. len[i]]`.
#[derive(Debug, Clone)]
struct Coeffs {
    ksize: usize,
    start: Vec<usize>,
    len: Vec<usize>,
    weights: Vec<i32>,
}

impl Coeffs {
    /// Pillow's `precompute_coeffs` for the box `(0, in_size)`, then `normalize_coeffs_8bpc`.
    fn new(in_size: usize, out_size: usize, filter: Filter) -> Coeffs {
        // Pillow passes the box edges as C floats and subtracts them in float.
        let in0 = 0.0f32;
        let in1 = in_size as f32;
        let scale = f64::from(in1 - in0) / out_size as f64;
        let filterscale = scale.max(1.0);
        let support = filter.support() * filterscale;
        let ksize = support.ceil() as usize * 2 + 1;
        let inv_filterscale = 1.0 / filterscale;

        let mut start = Vec::with_capacity(out_size);
        let mut len = Vec::with_capacity(out_size);
        let mut weights = vec![0i32; out_size * ksize];
        let mut pre = vec![0f64; ksize];
        for xx in 0..out_size {
            let center = f64::from(in0) + (xx as f64 + 0.5) * scale;
            // C `(int)` casts truncate toward zero, as `as i64` does.
            let xmin = ((center - support + 0.5) as i64).max(0);
            let xmax = ((center + support + 0.5) as i64).min(in_size as i64);
            let n = (xmax - xmin).clamp(0, ksize as i64) as usize;
            let xmin = xmin as usize;
            let mut ww = 0.0f64;
            for (x, p) in pre.iter_mut().enumerate().take(n) {
                let w = filter.eval(((x + xmin) as f64 - center + 0.5) * inv_filterscale);
                *p = w;
                ww += w;
            }
            if ww != 0.0 {
                for p in pre.iter_mut().take(n) {
                    *p /= ww;
                }
            }
            let row = &mut weights[xx * ksize..(xx + 1) * ksize];
            for (dst, &p) in row.iter_mut().zip(pre.iter()).take(n) {
                let scaled = p * f64::from(1u32 << PRECISION_BITS);
                *dst = if p < 0.0 { (-0.5 + scaled) as i32 } else { (0.5 + scaled) as i32 };
            }
            start.push(xmin);
            len.push(n);
        }
        Coeffs { ksize, start, len, weights }
    }

    #[inline]
    fn taps(&self, i: usize) -> (usize, &[i32]) {
        let k = &self.weights[i * self.ksize..i * self.ksize + self.len[i]];
        (self.start[i], k)
    }
}

#[inline(always)]
fn clip8(acc: i32) -> u8 {
    (acc >> PRECISION_BITS).clamp(0, 255) as u8
}

const HALF: i32 = 1 << (PRECISION_BITS - 1);

/// Horizontal pass over input rows `row0 .. row0 + rows`, into a `out_w x rows` RGB buffer.
fn horizontal(src: &[u8], in_w: usize, row0: usize, rows: usize, c: &Coeffs, out_w: usize) -> Vec<u8> {
    let mut out = vec![0u8; out_w * rows * 3];
    for (y, line_out) in out.chunks_exact_mut(out_w * 3).enumerate() {
        let line_in = &src[(row0 + y) * in_w * 3..(row0 + y + 1) * in_w * 3];
        for (xx, px) in line_out.chunks_exact_mut(3).enumerate() {
            let (xmin, k) = c.taps(xx);
            let window = &line_in[xmin * 3..(xmin + k.len()) * 3];
            let (mut s0, mut s1, mut s2) = (HALF, HALF, HALF);
            for (p, &w) in window.chunks_exact(3).zip(k) {
                s0 = s0.wrapping_add(i32::from(p[0]).wrapping_mul(w));
                s1 = s1.wrapping_add(i32::from(p[1]).wrapping_mul(w));
                s2 = s2.wrapping_add(i32::from(p[2]).wrapping_mul(w));
            }
            px[0] = clip8(s0);
            px[1] = clip8(s1);
            px[2] = clip8(s2);
        }
    }
    out
}

/// Vertical pass: `src` is `w x (any rows)` RGB; the coefficients index its rows from 0.
/// Sums row by row into an `i32` line so the inner loop runs over contiguous bytes.
fn vertical(src: &[u8], w: usize, c: &Coeffs, out_h: usize) -> Vec<u8> {
    let stride = w * 3;
    let mut out = vec![0u8; stride * out_h];
    let mut acc = vec![0i32; stride];
    for (yy, line_out) in out.chunks_exact_mut(stride).enumerate() {
        let (ymin, k) = c.taps(yy);
        acc.fill(HALF);
        for (dy, &wt) in k.iter().enumerate() {
            let row = &src[(ymin + dy) * stride..(ymin + dy + 1) * stride];
            for (a, &p) in acc.iter_mut().zip(row) {
                *a = a.wrapping_add(i32::from(p).wrapping_mul(wt));
            }
        }
        for (o, &a) in line_out.iter_mut().zip(&acc) {
            *o = clip8(a);
        }
    }
    out
}

/// Resizes `src` to `width x height` exactly as Pillow 13 `src.resize((width, height), filter)`
/// does for an RGB image. Errors only on an empty source or target.
pub fn resize(src: &RgbImage, width: u32, height: u32, filter: Filter) -> Result<RgbImage, Error> {
    let (in_w, in_h) = src.dimensions();
    if in_w == 0 || in_h == 0 || width == 0 || height == 0 {
        return Err(Error::Invalid(format!(
            "cannot resize a {in_w}x{in_h} image to {width}x{height}: both sizes must be at least 1x1"
        )));
    }
    if (in_w, in_h) == (width, height) {
        return Ok(src.clone()); // Pillow returns a copy
    }
    let (in_w, in_h, out_w, out_h) = (in_w as usize, in_h as usize, width as usize, height as usize);
    let raw: &[u8] = src.as_raw();

    // Pillow 13 runs the vertical pass first when the height shrinks by more than twice as many
    // pixels as the width does (so also whenever the height shrinks and the width does not);
    // otherwise horizontal first, over only the rows the vertical pass will read. The order changes
    // the result (each pass rounds to u8). Pillow's C source for 13.0 was not available here: this
    // rule was measured on Pillow 13.0.0 (thousands of random sizes, and the boundary
    // dy == 2*dx / 2*dx + 1 exactly) and is pinned by the goldens.
    let (dx, dy) = (in_w as i64 - out_w as i64, in_h as i64 - out_h as i64);
    let horizontal_first = !(dy > 0 && dy > 2 * dx);
    let pixels = if horizontal_first {
        let mut vert = Coeffs::new(in_h, out_h, filter);
        // Rows of the source the vertical pass reads; the horizontal pass computes only those.
        let first = vert.start[0];
        let last = vert.start[out_h - 1] + vert.len[out_h - 1];
        if out_w != in_w {
            let horiz = Coeffs::new(in_w, out_w, filter);
            for s in vert.start.iter_mut() {
                *s -= first;
            }
            let tmp = horizontal(raw, in_w, first, last - first, &horiz, out_w);
            if out_h != in_h {
                vertical(&tmp, out_w, &vert, out_h)
            } else {
                tmp
            }
        } else {
            vertical(raw, in_w, &vert, out_h)
        }
    } else {
        // out_h < in_h here, so the vertical pass always runs.
        let tmp = vertical(raw, in_w, &Coeffs::new(in_h, out_h, filter), out_h);
        if out_w != in_w {
            horizontal(&tmp, in_w, 0, out_h, &Coeffs::new(in_w, out_w, filter), out_w)
        } else {
            tmp
        }
    };
    RgbImage::from_raw(width, height, pixels)
        .ok_or_else(|| Error::Invalid("internal: resize produced a buffer of the wrong size".into()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn weights_sum_to_one_in_fixed_point() {
        for &(i, o) in &[(100usize, 37usize), (37, 100), (7, 1), (1, 9), (640, 1184)] {
            for f in [Filter::Lanczos, Filter::Bicubic] {
                let c = Coeffs::new(i, o, f);
                for j in 0..o {
                    let (s, k) = c.taps(j);
                    assert!(s + k.len() <= i, "window past the edge for {i}->{o}");
                    let sum: i64 = k.iter().map(|&w| i64::from(w)).sum();
                    // Each weight is rounded separately: the sum is 1.0 up to a few units.
                    assert!((sum - (1 << PRECISION_BITS)).abs() <= k.len() as i64, "{i}->{o} {f:?}: {sum}");
                }
            }
        }
    }

    #[test]
    fn constant_image_stays_constant() {
        let src = RgbImage::from_pixel(13, 7, image::Rgb([200, 10, 99]));
        for f in [Filter::Lanczos, Filter::Bicubic] {
            for &(w, h) in &[(29, 3), (5, 19), (1, 1), (13, 20), (40, 7)] {
                let out = resize(&src, w, h, f).expect("resize");
                assert_eq!(out.dimensions(), (w, h));
                assert!(out.pixels().all(|p| p.0 == [200, 10, 99]), "{f:?} {w}x{h}");
            }
        }
    }

    #[test]
    fn zero_sizes_are_errors() {
        let src = RgbImage::new(4, 4);
        assert!(matches!(resize(&src, 0, 4, Filter::Lanczos), Err(Error::Invalid(_))));
        assert!(matches!(resize(&RgbImage::new(0, 3), 2, 2, Filter::Bicubic), Err(Error::Invalid(_))));
    }

    #[test]
    fn filters_match_their_definitions() {
        assert_eq!(lanczos(0.0), 1.0);
        assert_eq!(lanczos(3.0), 0.0);
        assert!(lanczos(-3.0).abs() < 1e-15);
        assert!((lanczos(1.0)).abs() < 1e-15);
        assert_eq!(bicubic(0.0), 1.0);
        assert_eq!(bicubic(1.0), 0.0);
        assert_eq!(bicubic(2.0), 0.0);
        assert_eq!(bicubic(0.5), 0.5625);
        assert_eq!(bicubic(-1.5), -0.0625);
    }
}
