//! What a batch needs in host memory: a model per stage, fitted at load from a probe that runs the
//! pipeline on two synthetic jobs and reads the process's peak memory at every stage boundary.
//!
//! Why a probe and not the graphs: what a stage holds at its peak is what the backend allocates
//! (ONNX Runtime's arena, its kernels' scratch, the pipeline's own copies), which the graphs do not
//! say; measuring it on the backend that will run the batches is exact at the probed shapes.
//!
//! The model: each stage s needs `rows_s(n) * f_s(x_s)` bytes above the memory before the batch,
//! where `x_s` is the stage's size (text encoder: the text length; VAE encoder: the largest
//! condition image's pixels; denoising: the transformer's sequence, image + condition + text tokens;
//! decoder: the output's pixels) and `rows_s` the batch's rows (jobs, twice with true CFG for the
//! text encoder and the transformer; activations are per row, so batches scale linearly: measured
//! on the 1 MP bundle before the fused attention, one edit 2.39 GB, two 4.72 GB). A batch needs the
//! largest of its stages (the CPU backend gives its arena back after each stage; between the steps of
//! the denoising loop, which repeat at the same sizes, it keeps it). `f_s` comes from two probe points
//! `(x_lo, y_lo)`, `(x_hi, y_hi)`: a stage's need is `c + a x + b x^2` with a, b, c >= 0
//! (buffers, and attention's square), so the chord bounds it between the points and `y_lo` below them.
//! Beyond `x_hi` (only outputs larger than the bundle's area get there: prompts and condition images
//! are bounded by the probe's high point) the bound depends on the stage's engine ([`Growth`]):
//! - `Linear` (every attention streams its scores, as ONNX Runtime runs the transformer and the VAE
//!   after the attention rewrite): b = 0, and the bound is `y_hi x / x_hi` (the steepest line with
//!   c >= 0 through the high point; the chord's extension when that is steeper). Measured on the tiny
//!   bundle (128x128 area): a 2048x2048 output peaks at 1.18 GB of process RSS, linear in the pixels
//!   from 512x512 up; the square bound charged a 1024x1024 output 125 GiB and refused it.
//! - `Square` (a materialised attention, or an engine that does not say): the largest such curve
//!   through both points (`c + b x^2` when c >= 0).
//!
//! Beyond the probed sizes the estimate is an upper bound, not a measurement.
//!
//! The probe: one job at the bundle's default area with the longest prompt the bundle accepts (the
//! high point), one at a quarter of the area with a short prompt (the low point); one step each,
//! batch of one, no true CFG. On the 1 MP bundle on ONNX Runtime it adds about 30 s to the load on
//! 2 shared cores; on the tiny bundles a fraction of a second.

use std::time::Instant;

use image::{Rgb, RgbImage};
use serde::Serialize;

use super::job::{BatchKey, EditError, EditRequest};
use super::run::{Checkpoint, Pipeline};
pub use crate::runtime::Growth;
use crate::sysmem;

/// Packed latent tokens per pixel: one per 16x16 pixels.
const PIXELS_PER_TOKEN: u64 = 256;

/// One stage's need (bytes per row) at two measured sizes, and how it may grow beyond them.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct Curve {
    pub lo: (f64, f64),
    pub hi: (f64, f64),
    pub growth: Growth,
}

impl Curve {
    /// A curve through two points (in any order) that may grow by the square beyond them.
    pub fn new(a: (f64, f64), b: (f64, f64)) -> Curve {
        let (lo, hi) = if a.0 <= b.0 { (a, b) } else { (b, a) };
        Curve { lo, hi, growth: Growth::Square }
    }

    /// The same points, growing as `growth` beyond them.
    pub fn growing(self, growth: Growth) -> Curve {
        Curve { growth, ..self }
    }

    /// Bytes at size `x`: an upper bound of every `c + a x + b x^2` (a, b, c >= 0; b = 0 when `Linear`)
    /// through both points.
    pub fn at(&self, x: f64) -> f64 {
        let ((x0, y0), (x1, y1)) = (self.lo, self.hi);
        let (y0, y1) = (y0.max(0.0), y1.max(0.0));
        let linear = self.growth == Growth::Linear;
        if x1 <= x0 * (1.0 + 1e-9) {
            // One size measured (twice): constant below it, in proportion or by the square above it.
            let y = y0.max(y1);
            let ratio = x / x1;
            return if x <= x1 || x1 <= 0.0 { y } else { y * if linear { ratio } else { ratio * ratio } };
        }
        let y1 = y1.max(y0); // a stage's need does not shrink with its size
        if x <= x0 {
            return y0;
        }
        let chord = y0 + (y1 - y0) * (x - x0) / (x1 - x0);
        if x <= x1 {
            return chord;
        }
        if linear {
            // The proportion through the high point does not trust the low point's fixed part.
            return chord.max(y1 * x / x1);
        }
        // Beyond the points: the steepest admissible curve. With c >= 0: c + b x^2 through both;
        // else (the low point is below the square through the high one) a x + b x^2 through both.
        let b = (y1 - y0) / (x1 * x1 - x0 * x0);
        let c = y1 - b * x1 * x1;
        if c >= 0.0 {
            c + b * x * x
        } else {
            let bq = (y1 / x1 - y0 / x0) / (x1 - x0);
            let a = y0 / x0 - bq * x0;
            a.max(0.0) * x + bq.max(0.0) * x * x
        }
    }
}

/// The memory model of one loaded pipeline (see the module docs).
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct MemoryModel {
    /// Text encoder, per row, by text length.
    pub text: Curve,
    /// VAE encoder, per job, by the largest condition image's pixels.
    pub vae_encode: Curve,
    /// One denoising step, per row, by the transformer's sequence length.
    pub denoise: Curve,
    /// VAE decoder and the conversion to pictures, per job, by output pixels.
    pub decode: Curve,
    /// Resident memory before the probe (the loaded model), bytes.
    pub loaded_rss: u64,
    /// How long the probe took, seconds.
    pub probe_seconds: f64,
}

/// The sizes of a batch key that the model reads.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct StageSizes {
    pub text: f64,
    pub condition_pixels: f64,
    pub sequence: f64,
    pub output_pixels: f64,
}

impl StageSizes {
    pub fn of(key: &BatchKey) -> StageSizes {
        let tokens = |(w, h): (u32, u32)| (u64::from(w) * u64::from(h)) / PIXELS_PER_TOKEN;
        let out = (key.width, key.height);
        let cond: u64 = key.condition_sizes.iter().map(|&c| tokens(c)).sum();
        let largest = key.condition_sizes.iter().map(|&(w, h)| u64::from(w) * u64::from(h)).max().unwrap_or(0);
        StageSizes {
            text: key.text_len as f64,
            condition_pixels: largest as f64,
            sequence: (tokens(out) + cond + key.text_len as u64) as f64,
            output_pixels: (u64::from(key.width) * u64::from(key.height)) as f64,
        }
    }
}

impl MemoryModel {
    /// Bytes a batch of `n` jobs of `key` needs above the memory in use before it starts.
    pub fn batch_bytes(&self, key: &BatchKey, n: usize) -> u64 {
        let s = StageSizes::of(key);
        let jobs = n as f64;
        let rows = jobs * if key.true_cfg { 2.0 } else { 1.0 };
        let need = [
            rows * self.text.at(s.text),
            jobs * self.vae_encode.at(s.condition_pixels),
            rows * self.denoise.at(s.sequence),
            jobs * self.decode.at(s.output_pixels),
        ];
        need.into_iter().fold(0.0, f64::max).ceil() as u64
    }

    /// The largest batch of `key` (up to `max`) whose need is at most `budget` bytes (0: not one job).
    pub fn max_batch(&self, key: &BatchKey, budget: u64, max: usize) -> usize {
        (1..=max).take_while(|&n| self.batch_bytes(key, n) <= budget).last().unwrap_or(0)
    }

    /// Runs the probe (see the module docs) on `pipeline`, on the thread that owns it. Fails when
    /// this system cannot measure a peak (no `/proc`), or when a probe job fails.
    pub fn probe(pipeline: &mut Pipeline) -> Result<MemoryModel, String> {
        let started = Instant::now();
        if sysmem::peak_rss().is_none() || !sysmem::reset_peak() {
            return Err("this system does not let the process measure its peak memory (Linux /proc needed)".into());
        }
        let loaded_rss = sysmem::rss().unwrap_or(0);
        let info = pipeline.info().clone();
        let side = ((info.image_area as f64).sqrt() as u32).max(32) / 16 * 16;
        let small = (side / 2).max(16) / 16 * 16;
        let prompt = long_prompt(pipeline, side)?;
        let high = probe_one(pipeline, side, prompt)?;
        let low = probe_one(pipeline, small, "probe".into())?;
        let growth = pipeline.growth();
        let curve = |stage: usize, f: fn(&Point) -> (f64, f64)| Curve::new(f(&low), f(&high)).growing(growth[stage]);
        Ok(MemoryModel {
            text: curve(0, |p| (p.sizes.text, p.peaks[0] / p.rows)),
            vae_encode: curve(1, |p| (p.sizes.condition_pixels, p.peaks[1])),
            denoise: curve(2, |p| (p.sizes.sequence, p.peaks[2] / p.rows)),
            decode: curve(3, |p| (p.sizes.output_pixels, p.peaks[3])),
            loaded_rss,
            probe_seconds: started.elapsed().as_secs_f64(),
        })
    }
}

/// One probe run: the job's sizes and the peak of each stage above the memory before the batch.
struct Point {
    sizes: StageSizes,
    rows: f64,
    /// Text encoder, VAE encoder, denoising, decoder.
    peaks: [f64; 4],
}

fn probe_request(side: u32, prompt: String) -> EditRequest {
    EditRequest {
        images: vec![RgbImage::from_pixel(side, side, Rgb([128, 96, 64]))],
        prompt,
        negative_prompt: None,
        num_inference_steps: 1,
        true_cfg_scale: 1.0,
        seed: 0,
        width: Some(side),
        height: Some(side),
        lightning: true, // one step of the base schedule may be refused (terminal stretch)
        noise: None,
    }
}

/// The longest prompt the bundle accepts, as words (a fraction shorter on each refusal).
fn long_prompt(pipeline: &Pipeline, side: u32) -> Result<String, String> {
    let pre = pipeline.preprocessor();
    let mut words = pipeline.info().max_text_tokens.max(1);
    loop {
        let prompt = "edit ".repeat(words);
        match pre.prepare(probe_request(side, prompt.clone())) {
            Ok(_) => return Ok(prompt),
            Err(EditError::PromptTooLong { .. }) if words > 1 => words = words * 7 / 8,
            Err(e) => return Err(format!("the memory probe's job was refused: {e}")),
        }
    }
}

fn probe_one(pipeline: &mut Pipeline, side: u32, prompt: String) -> Result<Point, String> {
    let job = pipeline.preprocessor().prepare(probe_request(side, prompt)).map_err(|e| format!("memory probe: {e}"))?;
    let sizes = StageSizes::of(job.key());
    let base = sysmem::rss().unwrap_or(0) as f64;
    let peaks = std::cell::RefCell::new([0f64; 4]);
    let current = std::cell::Cell::new(None::<usize>);
    let observe = |at: Checkpoint| {
        // The peak since the last checkpoint belongs to the stage that ran in between.
        if let (Some(stage), Some(peak)) = (current.get(), sysmem::peak_rss()) {
            let p = &mut peaks.borrow_mut()[stage];
            *p = p.max(peak as f64 - base);
        }
        sysmem::reset_peak();
        current.set(match at {
            Checkpoint::TextEncoder => Some(0),
            Checkpoint::VaeEncoder => Some(1),
            Checkpoint::Step(_) => Some(2),
            Checkpoint::VaeDecoder => Some(3),
            Checkpoint::Done => None,
        });
        true
    };
    let result = pipeline.run_batch_with(&[&job], &observe).pop();
    match result {
        Some(Ok(_)) => Ok(Point { sizes, rows: 1.0, peaks: peaks.into_inner() }),
        Some(Err(e)) => Err(format!("memory probe: the probe batch failed: {e}")),
        None => Err("memory probe: no result".into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(w: u32, h: u32, text: usize, cfg: bool) -> BatchKey {
        BatchKey {
            width: w,
            height: h,
            condition_sizes: vec![(1024, 1024)],
            steps: 8,
            true_cfg: cfg,
            lightning: false,
            text_len: text,
        }
    }

    #[test]
    fn a_curve_bounds_every_admissible_need_through_its_points() {
        // Truths c + a x + b x^2 with a, b, c >= 0; the curve sees two points of each.
        let truths = [(50.0, 2.0, 0.0), (0.0, 3.0, 0.001), (10.0, 0.0, 0.01), (0.0, 0.0, 0.02), (500.0, 1.0, 0.0)];
        for (c, a, b) in truths {
            let f = |x: f64| c + a * x + b * x * x;
            let curve = Curve::new((100.0, f(100.0)), (400.0, f(400.0)));
            for x in [1.0, 50.0, 100.0, 150.0, 250.0, 399.0, 400.0, 800.0, 4000.0] {
                let est = curve.at(x);
                assert!(est + 1e-6 >= f(x), "c={c} a={a} b={b}: at {x} estimate {est} < need {}", f(x));
            }
            assert!(
                (curve.at(100.0) - f(100.0)).abs() < 1e-9 && (curve.at(400.0) - f(400.0)).abs() < 1e-6,
                "exact at the points"
            );
        }
    }

    #[test]
    fn a_linear_curve_bounds_every_linear_need_and_grows_in_proportion() {
        // Truths c + a x with a, c >= 0 (streamed attention): bounded everywhere, exact at the points.
        for (c, a) in [(50.0, 2.0), (0.0, 3.0), (500.0, 0.5), (7.0, 0.0)] {
            let f = |x: f64| c + a * x;
            let curve = Curve::new((100.0, f(100.0)), (400.0, f(400.0))).growing(Growth::Linear);
            for x in [1.0, 100.0, 250.0, 400.0, 800.0, 4000.0, 64.0 * 400.0] {
                assert!(curve.at(x) + 1e-6 >= f(x), "c={c} a={a}: at {x} estimate {} < need {}", curve.at(x), f(x));
            }
            assert!((curve.at(100.0) - f(100.0)).abs() < 1e-9 && (curve.at(400.0) - f(400.0)).abs() < 1e-9);
        }
        // The tiny bundle's decoder (128x128 area; the probe's two points, roughly): a 1024x1024 output is charged
        // 64x the high point, not 64^2 x.
        let decode = Curve::new((4096.0, 20e6), (16384.0, 24e6));
        let linear = decode.growing(Growth::Linear);
        assert_eq!(linear.at(1048576.0), 24e6 * 64.0);
        assert!(decode.at(1048576.0) > 10.0 * linear.at(1048576.0), "the square bound: over 10x more");
        // A low point below the proportion (a negative fixed part, from noise): the chord's extension, steeper.
        let steep = Curve::new((100.0, 10.0), (200.0, 100.0)).growing(Growth::Linear);
        assert_eq!(steep.at(400.0), 280.0);
        // One size measured: in proportion above it.
        let one = Curve::new((100.0, 7.0), (100.0, 9.0)).growing(Growth::Linear);
        assert_eq!((one.at(10.0), one.at(100.0), one.at(200.0)), (9.0, 9.0, 18.0));
    }

    #[test]
    fn curve_arithmetic() {
        let c = Curve::new((400.0, 2000.0), (100.0, 500.0)); // linear: 5 per unit
        assert_eq!(c.lo, (100.0, 500.0));
        assert_eq!(c.at(50.0), 500.0, "below the low point: the low point");
        assert_eq!(c.at(250.0), 1250.0, "between: the chord");
        // Beyond: c + b x^2 through both: b = 1500 / 150000 = 0.01, c = 2000 - 1600 = 400.
        assert!((c.at(800.0) - (400.0 + 0.01 * 640_000.0)).abs() < 1e-6);
        // A pure square through both points has c = 0: extrapolated exactly.
        let sq = Curve::new((100.0, 1e4), (200.0, 4e4));
        assert!((sq.at(400.0) - 16e4).abs() < 1e-6);
        // One size measured twice: the larger value, then the full square.
        let one = Curve::new((100.0, 7.0), (100.0, 9.0));
        assert_eq!((one.at(10.0), one.at(100.0), one.at(200.0)), (9.0, 9.0, 36.0));
        // A measurement that shrinks with size (noise) is treated as flat.
        let noisy = Curve::new((100.0, 10.0), (200.0, 8.0));
        assert_eq!(noisy.at(150.0), 10.0);
    }

    fn model() -> MemoryModel {
        MemoryModel {
            text: Curve::new((64.0, 1e6), (1024.0, 4e6)),
            vae_encode: Curve::new((1048576.0, 2e9), (1048576.0, 2e9)),
            denoise: Curve::new((5184.0, 6e8), (10240.0, 1.5e9)),
            decode: Curve::new((262144.0, 5e8), (1048576.0, 2.2e9)),
            loaded_rss: 3e8 as u64,
            probe_seconds: 1.0,
        }
    }

    #[test]
    fn batches_take_their_largest_stage_times_their_rows() {
        let m = model();
        let k = key(1024, 1024, 64, false);
        let s = StageSizes::of(&k);
        assert_eq!(s.sequence, (4096 + 4096 + 64) as f64);
        assert_eq!((s.output_pixels, s.condition_pixels, s.text), (1048576.0, 1048576.0, 64.0));
        let one = m.batch_bytes(&k, 1);
        assert_eq!(one, 2_200_000_000, "the decoder is the largest stage");
        assert_eq!(m.batch_bytes(&k, 4), 4 * one, "jobs scale linearly");
        // True CFG doubles the transformer's rows, not the VAE's.
        let cfg = key(1024, 1024, 64, true);
        let den = m.denoise.at(StageSizes::of(&cfg).sequence);
        assert_eq!(m.batch_bytes(&cfg, 2), (4.0 * den).max(2.0 * 2.2e9).ceil() as u64);
        // A smaller output needs less, a larger one more (the decoder's square).
        assert!(m.batch_bytes(&key(512, 512, 64, false), 1) < one);
        assert!(m.batch_bytes(&key(2048, 2048, 64, false), 1) > 4 * one);
    }

    #[test]
    fn the_largest_batch_under_a_budget() {
        let m = model();
        let k = key(1024, 1024, 64, false);
        assert_eq!(m.max_batch(&k, 10_000_000_000, 4), 4);
        assert_eq!(m.max_batch(&k, 6_600_000_000, 4), 3);
        assert_eq!(m.max_batch(&k, 4_400_000_000, 4), 2);
        assert_eq!(m.max_batch(&k, 4_399_999_999, 4), 1);
        assert_eq!(m.max_batch(&k, 1_000_000_000, 4), 0);
        assert_eq!(m.max_batch(&k, u64::MAX, 2), 2, "never above the cap given");
    }
}
