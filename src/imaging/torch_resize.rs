//! Antialiased bicubic resize of RGB8 images, bit-identical to torch's uint8 kernel
//! (`F.interpolate(x, mode="bicubic", antialias=True)`, what torchvision's `resize` runs on CPU).
//!
//! This is the Qwen2-VL image processor's resize in transformers 5 (its torchvision backend, which
//! `Qwen2VLProcessor` requires). torch's uint8 path (`UpSampleKernel.cpp`
//! `_compute_index_ranges_int16_weights`, `UpSampleKernelAVXAntialias.h`) is Pillow-SIMD's:
//! 1. Per axis and output index `i`: `scale = in / out`, `center = scale * (i + 0.5)`, support
//!    `2 * max(scale, 1)`, window `[trunc(center - support + 0.5), trunc(center + support + 0.5))`
//!    clipped to the input, weights `cubic((j - center + 0.5) / max(scale, 1))` with a = -0.5, all in
//!    f64, normalised by their sum.
//! 2. Weights become i16 with `precision` fraction bits, the largest (< 22) for which the axis'
//!    largest weight still fits (`round(w_max * 2^(p+1)) < 2^15`); rounding half away from zero.
//! 3. Horizontal pass (when the width changes), then vertical (when the height does), each sample
//!    `((1 << (p - 1)) + sum(pixel * weight)) >> p` in i32, clamped to 0..=255, stored as u8.
//!
//! Unlike Pillow's own Resample.c (22-bit i32 weights, its own pass order), so results differ.

use image::RgbImage;

use super::Error;

/// Keys' cubic convolution kernel with a = -0.5, as torch's `aa_filter` for bicubic.
fn cubic(x: f64) -> f64 {
    const A: f64 = -0.5;
    let x = x.abs();
    if x < 1.0 {
        ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0
    } else if x < 2.0 {
        ((A * x - 5.0 * A) * x + 8.0 * A) * x - 4.0 * A
    } else {
        0.0
    }
}

/// Fixed-point weights of one axis.
struct Coeffs {
    /// First input index of each output index's window.
    start: Vec<usize>,
    /// Window length of each output index.
    len: Vec<usize>,
    /// `ksize` weights per output index (zero beyond `len`).
    weights: Vec<i32>,
    ksize: usize,
    precision: u32,
}

impl Coeffs {
    fn new(in_size: usize, out_size: usize) -> Coeffs {
        const INTERP_SIZE: f64 = 4.0; // bicubic
        let scale = in_size as f64 / out_size as f64;
        let support = if scale >= 1.0 { INTERP_SIZE * 0.5 * scale } else { INTERP_SIZE * 0.5 };
        let ksize = support.ceil() as usize * 2 + 1;
        let invscale = if scale >= 1.0 { 1.0 / scale } else { 1.0 };
        let mut start = Vec::with_capacity(out_size);
        let mut len = Vec::with_capacity(out_size);
        let mut wf = vec![0f64; out_size * ksize];
        let mut w_max = 0f64;
        for i in 0..out_size {
            let center = scale * (i as f64 + 0.5);
            // C++ `static_cast<int64_t>` truncates toward zero.
            let xmin = ((center - support + 0.5) as i64).max(0);
            let xend = ((center + support + 0.5) as i64).min(in_size as i64);
            let xsize = (xend - xmin).clamp(0, ksize as i64) as usize;
            let w = &mut wf[i * ksize..(i + 1) * ksize];
            let mut total = 0f64;
            for (j, wj) in w.iter_mut().enumerate().take(xsize) {
                *wj = cubic((j as f64 + xmin as f64 - center + 0.5) * invscale);
                total += *wj;
            }
            if total != 0.0 {
                for wj in w.iter_mut().take(xsize) {
                    *wj /= total;
                    w_max = w_max.max(*wj);
                }
            }
            start.push(xmin as usize);
            len.push(xsize);
        }
        let mut precision = 0u32;
        while precision < 22 {
            let next = (0.5 + w_max * (1u64 << (precision + 1)) as f64) as i32;
            if next >= 1 << 15 {
                break;
            }
            precision += 1;
        }
        let one = (1u64 << precision) as f64;
        let weights = wf
            .iter()
            .map(|&w| {
                let v = w * one;
                // `(int)(v ± 0.5)` then stored as int16.
                (if v < 0.0 { (-0.5 + v) as i32 } else { (0.5 + v) as i32 }) as i16 as i32
            })
            .collect();
        Coeffs { start, len, weights, ksize, precision }
    }

    #[inline]
    fn finish(&self, acc: i32) -> u8 {
        (acc >> self.precision).clamp(0, 255) as u8
    }

    fn rounding(&self) -> i32 {
        if self.precision == 0 {
            0
        } else {
            1 << (self.precision - 1)
        }
    }
}

/// Compiles `$body` twice, for the baseline and for AVX2 (picked at run time): the i32 products of
/// both passes vectorise far better with AVX2. Integer arithmetic, so the results are identical.
macro_rules! with_avx2 {
    ($name:ident, $imp:ident, ($($arg:ident: $ty:ty),*) -> $ret:ty) => {
        fn $name($($arg: $ty),*) -> $ret {
            #[cfg(target_arch = "x86_64")]
            if std::arch::is_x86_feature_detected!("avx2") {
                #[target_feature(enable = "avx2")]
                unsafe fn avx2($($arg: $ty),*) -> $ret {
                    $imp($($arg),*)
                }
                // SAFETY: the CPU supports AVX2 (checked just above).
                return unsafe { avx2($($arg),*) };
            }
            $imp($($arg),*)
        }
    };
}

with_avx2!(horizontal, horizontal_impl, (src: &[u8], in_w: usize, rows: usize, c: &Coeffs, out_w: usize) -> Vec<u8>);
with_avx2!(vertical, vertical_impl, (src: &[u8], width: usize, c: &Coeffs, out_h: usize) -> Vec<u8>);

/// Horizontal pass over `rows` rows of an RGB image `in_w` wide.
#[inline(always)]
fn horizontal_impl(src: &[u8], in_w: usize, rows: usize, c: &Coeffs, out_w: usize) -> Vec<u8> {
    match c.ksize {
        5 => horizontal_k::<5>(src, in_w, rows, c, out_w),
        7 => horizontal_k::<7>(src, in_w, rows, c, out_w),
        9 => horizontal_k::<9>(src, in_w, rows, c, out_w),
        _ => horizontal_k::<0>(src, in_w, rows, c, out_w),
    }
}

/// Every window is read as `ksize` taps (`K`, or `c.ksize` when `K` is 0, then not unrolled): the
/// weights past a window's length are zero and each line is copied into a zero-padded buffer, so
/// the extra taps add exact zeros.
#[inline(always)]
fn horizontal_k<const K: usize>(src: &[u8], in_w: usize, rows: usize, c: &Coeffs, out_w: usize) -> Vec<u8> {
    let k = if K == 0 { c.ksize } else { K };
    let mut out = vec![0u8; rows * out_w * 3];
    let mut line = vec![0u8; (in_w + k) * 3];
    let init = c.rounding();
    for y in 0..rows {
        line[..in_w * 3].copy_from_slice(&src[y * in_w * 3..(y + 1) * in_w * 3]);
        let dst = &mut out[y * out_w * 3..(y + 1) * out_w * 3];
        for ((px, weights), &start) in dst.chunks_exact_mut(3).zip(c.weights.chunks_exact(k)).zip(&c.start) {
            let window = &line[start * 3..(start + k) * 3];
            let (mut r, mut g, mut b) = (init, init, init);
            for (p, &w) in window.chunks_exact(3).zip(weights) {
                r += p[0] as i32 * w;
                g += p[1] as i32 * w;
                b += p[2] as i32 * w;
            }
            px[0] = c.finish(r);
            px[1] = c.finish(g);
            px[2] = c.finish(b);
        }
    }
    out
}

/// Vertical pass of an RGB image `width` wide.
#[inline(always)]
fn vertical_impl(src: &[u8], width: usize, c: &Coeffs, out_h: usize) -> Vec<u8> {
    let stride = width * 3;
    let mut out = vec![0u8; out_h * stride];
    let init = c.rounding();
    let mut acc = vec![0i32; stride];
    for y in 0..out_h {
        acc.iter_mut().for_each(|a| *a = init);
        let k = &c.weights[y * c.ksize..y * c.ksize + c.len[y]];
        for (j, &w) in k.iter().enumerate() {
            let row = &src[(c.start[y] + j) * stride..(c.start[y] + j + 1) * stride];
            for (a, &p) in acc.iter_mut().zip(row) {
                *a += p as i32 * w;
            }
        }
        for (o, &a) in out[y * stride..(y + 1) * stride].iter_mut().zip(&acc) {
            *o = c.finish(a);
        }
    }
    out
}

/// Resizes `src` to `width x height` exactly as torch 2.15 on CPU resizes the uint8 CHW tensor of
/// the image with `mode="bicubic", antialias=True, align_corners=False`.
pub fn resize_bicubic_aa(src: &RgbImage, width: u32, height: u32) -> Result<RgbImage, Error> {
    let (in_w, in_h) = src.dimensions();
    if in_w == 0 || in_h == 0 || width == 0 || height == 0 {
        return Err(Error::Invalid(format!(
            "cannot resize a {in_w}x{in_h} image to {width}x{height}: both sizes must be at least 1x1"
        )));
    }
    if (in_w, in_h) == (width, height) {
        return Ok(src.clone()); // torchvision returns the tensor unchanged
    }
    let (in_w, in_h, out_w, out_h) = (in_w as usize, in_h as usize, width as usize, height as usize);
    let mut pixels = src.as_raw().clone();
    let mut cur_w = in_w;
    if out_w != in_w {
        pixels = horizontal(&pixels, in_w, in_h, &Coeffs::new(in_w, out_w), out_w);
        cur_w = out_w;
    }
    if out_h != in_h {
        pixels = vertical(&pixels, cur_w, &Coeffs::new(in_h, out_h), out_h);
    }
    RgbImage::from_raw(width, height, pixels).ok_or_else(|| Error::Invalid("resize produced a wrong buffer".into()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn weights_sum_to_one_in_fixed_point() {
        for (i, o) in [(100, 37), (37, 100), (1024, 1036), (7, 1), (1, 5)] {
            let c = Coeffs::new(i, o);
            for x in 0..o {
                let s: i32 = c.weights[x * c.ksize..x * c.ksize + c.len[x]].iter().sum();
                let one = 1i32 << c.precision;
                assert!((s - one).abs() <= c.len[x] as i32, "{i}->{o} at {x}: {s} vs {one}");
                assert!(c.start[x] + c.len[x] <= i);
            }
        }
    }

    #[test]
    fn flat_image_stays_flat_and_identity_is_a_copy() {
        let img = RgbImage::from_pixel(13, 9, image::Rgb([10, 128, 250]));
        let out = resize_bicubic_aa(&img, 31, 4).unwrap();
        assert!(out.pixels().all(|p| p.0 == [10, 128, 250]));
        assert_eq!(resize_bicubic_aa(&img, 13, 9).unwrap(), img);
        assert!(resize_bicubic_aa(&img, 0, 4).is_err());
    }
}
