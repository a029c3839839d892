//! Bit-exact ports of the torch CPU kernels the reference's math goes through: the seeded
//! `torch.Generator("cpu")` (mt19937) with `torch.randn`, and `torch.pow(scalar, tensor)` (Sleef `powf`).
//!
//! torch dispatches its CPU kernels on the host's capability, and two of the kernels used here give
//! results that differ in the last bit between capabilities:
//!
//! * `torch.randn` (float32, ≥ 16 values): on AVX2 the Box-Muller block runs on `avx_mathfun.h`'s
//!   `log256_ps` / `sincos256_ps` (compiled by GCC with FMA contraction); on the `default` capability
//!   (and AVX-512 hosts, whose build of that file takes the same generic branch) it calls libm's
//!   `logf` / `cosf` / `sinf`.
//! * `torch.pow(10000, t)` (the RoPE frequencies): on AVX2 the first `16 * floor(n / 16)` elements go
//!   through Sleef's `powf` (1-ulp, vectorised) and the rest through libm's `powf`; on `default` all
//!   elements use libm's `powf`.
//!
//! [`CpuKernels::Avx2`] reproduces what the x86-64 torch wheels compute on an AVX2 host (the default,
//! and what the goldens in `tests/golden/math` were made with); [`CpuKernels::Scalar`] reproduces the
//! `default` capability. The libm calls are the platform's (`logf`, `cosf`, `sinf`, `powf`, `log1p`,
//! `sin`, `cos` through Rust's `f32`/`f64` methods), which on glibc hosts are the very functions torch
//! calls. Nothing here depends on the CPU this code runs on.

// The polynomial and range-reduction constants are copied verbatim from the reference sources.
#![allow(clippy::excessive_precision)]

use thiserror::Error;

/// Which of torch's CPU kernel flavours to reproduce (see the module docs).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum CpuKernels {
    /// torch on an x86-64 host with AVX2 (`torch.backends.cpu.get_cpu_capability() == "AVX2"`).
    #[default]
    Avx2,
    /// torch's `default` capability (`ATEN_CPU_CAPABILITY=default`). By torch's sources its AVX-512
    /// build takes the same branches for these two kernels (not verified on such a host).
    Scalar,
}

/// A seed that torch's `Generator.manual_seed` would not accept.
#[derive(Debug, Error, PartialEq, Eq)]
#[error("seed {0} is outside torch's range -2^63..2^64-1 (manual_seed raises for it); use a seed in that range")]
pub struct SeedError(pub i128);

/// The `u64` seed torch's `Generator.manual_seed(value)` stores: non-negative values as they are,
/// negative values (down to -2^63) as their two's complement. Only the low 32 bits reach the mt19937
/// state, so seeds equal modulo 2^32 give the same numbers (as in torch).
pub fn torch_seed(value: i128) -> Result<u64, SeedError> {
    if (0..=u64::MAX as i128).contains(&value) {
        Ok(value as u64)
    } else if (i64::MIN as i128..0).contains(&value) {
        Ok(value as i64 as u64)
    } else {
        Err(SeedError(value))
    }
}

const MT_N: usize = 624;
const MT_M: usize = 397;

/// `at::mt19937`: the 32-bit Mersenne Twister as torch seeds it (`init_with_uint32` of the seed's
/// low 32 bits).
#[derive(Clone)]
pub struct Mt19937 {
    state: [u32; MT_N],
    left: usize,
    next: usize,
}

impl Mt19937 {
    pub fn new(seed: u64) -> Mt19937 {
        let mut state = [0u32; MT_N];
        state[0] = (seed & 0xffff_ffff) as u32;
        for j in 1..MT_N {
            let prev = state[j - 1];
            state[j] = 1_812_433_253u32.wrapping_mul(prev ^ (prev >> 30)).wrapping_add(j as u32);
        }
        Mt19937 { state, left: 1, next: 0 }
    }

    fn next_state(&mut self) {
        let s = &mut self.state;
        for i in 0..MT_N {
            let y = (s[i] & 0x8000_0000) | (s[(i + 1) % MT_N] & 0x7fff_ffff);
            let mag = if y & 1 == 1 { 0x9908_b0df } else { 0 };
            s[i] = s[(i + MT_M) % MT_N] ^ (y >> 1) ^ mag;
        }
        self.left = MT_N;
        self.next = 0;
    }

    /// The next 32-bit output.
    pub fn next_u32(&mut self) -> u32 {
        self.left -= 1;
        if self.left == 0 {
            self.next_state();
        }
        let mut y = self.state[self.next];
        self.next += 1;
        y ^= y >> 11;
        y ^= (y << 7) & 0x9d2c_5680;
        y ^= (y << 15) & 0xefc6_0000;
        y ^= y >> 18;
        y
    }
}

/// `at::CPUGeneratorImpl` after `manual_seed(seed)`: the engine plus the cached second Box-Muller
/// sample of the double-precision normal distribution.
#[derive(Clone)]
pub struct CpuGenerator {
    engine: Mt19937,
    next_double_normal: Option<f64>,
}

impl CpuGenerator {
    /// `torch.Generator("cpu").manual_seed(seed)`; see [`torch_seed`] for negative seeds.
    pub fn manual_seed(seed: u64) -> CpuGenerator {
        CpuGenerator { engine: Mt19937::new(seed), next_double_normal: None }
    }

    /// `random()`: one 32-bit engine output.
    pub fn random(&mut self) -> u32 {
        self.engine.next_u32()
    }

    /// `random64()`: two outputs, the first in the high half.
    pub fn random64(&mut self) -> u64 {
        let hi = self.engine.next_u32() as u64;
        let lo = self.engine.next_u32() as u64;
        (hi << 32) | lo
    }

    /// `uniform_real_distribution<float>(0, 1)`: 24 random bits times 2^-24.
    pub fn uniform_f32(&mut self) -> f32 {
        (self.random() & 0x00ff_ffff) as f32 * (1.0 / 16_777_216.0)
    }

    /// `uniform_real_distribution<double>(0, 1)`: 53 random bits times 2^-53.
    pub fn uniform_f64(&mut self) -> f64 {
        (self.random64() & ((1u64 << 53) - 1)) as f64 * (1.0 / 9_007_199_254_740_992.0)
    }

    /// `normal_distribution<double>(0, 1)`: Box-Muller, the sine sample cached for the next call.
    pub fn normal_f64(&mut self) -> f64 {
        if let Some(v) = self.next_double_normal.take() {
            return v * 1.0 + 0.0;
        }
        let u1 = self.uniform_f64();
        let u2 = self.uniform_f64();
        let r = (-2.0 * (-u2).ln_1p()).sqrt();
        let theta = 2.0 * std::f64::consts::PI * u1;
        self.next_double_normal = Some(r * theta.sin());
        // transformation::normal: x * std + mean (turns -0 into +0 like the reference).
        r * theta.cos() * 1.0 + 0.0
    }
}

/// `torch.randn(shape, generator=torch.Generator("cpu").manual_seed(seed), dtype=torch.float32)`
/// for a shape of `numel` elements, in row-major order.
pub fn randn(seed: u64, numel: usize, kernels: CpuKernels) -> Vec<f32> {
    randn_with(&mut CpuGenerator::manual_seed(seed), numel, kernels)
}

/// `torch.randn` drawing from an existing generator (consecutive calls continue its stream).
pub fn randn_with(gen: &mut CpuGenerator, numel: usize, kernels: CpuKernels) -> Vec<f32> {
    if numel < 16 {
        // normal_kernel's serial path: a double normal per element, cast to float.
        return (0..numel).map(|_| gen.normal_f64() as f32).collect();
    }
    let fill16: fn(&mut [f32]) = match kernels {
        CpuKernels::Avx2 => normal_fill_16_avx2,
        CpuKernels::Scalar => normal_fill_16_scalar,
    };
    let mut data: Vec<f32> = (0..numel).map(|_| gen.uniform_f32()).collect();
    for block in data.chunks_exact_mut(16) {
        fill16(block);
    }
    if numel % 16 != 0 {
        // The reference redraws the last 16 values and transforms them again.
        let tail = &mut data[numel - 16..];
        for v in tail.iter_mut() {
            *v = gen.uniform_f32();
        }
        fill16(tail);
    }
    data
}

/// `normal_fill_16` (generic): `data[j]`, `data[j + 8]` from the uniforms in the same places.
fn normal_fill_16_scalar(data: &mut [f32]) {
    for j in 0..8 {
        let u1 = 1.0f32 - data[j];
        let u2 = data[j + 8];
        let radius = (-2.0f32 * u1.ln()).sqrt();
        let theta = (2.0f64 * std::f64::consts::PI * u2 as f64) as f32;
        data[j] = radius * theta.cos() * 1.0 + 0.0;
        data[j + 8] = radius * theta.sin() * 1.0 + 0.0;
    }
}

/// `normal_fill_16_AVX2`, one lane at a time.
fn normal_fill_16_avx2(data: &mut [f32]) {
    let two_pi = (2.0f64 * std::f64::consts::PI) as f32;
    for j in 0..8 {
        let u1 = 1.0f32 - data[j];
        let u2 = data[j + 8];
        let radius = (-2.0f32 * log256(u1)).sqrt();
        let (sin, cos) = sincos256(two_pi * u2);
        // _mm256_fmadd_ps(n, std = 1, mean = 0): exactly n + 0.
        data[j] = radius * cos + 0.0;
        data[j + 8] = radius * sin + 0.0;
    }
}

#[inline]
fn fma(a: f32, b: f32, c: f32) -> f32 {
    a.mul_add(b, c)
}

/// avx_mathfun's `log256_ps` (Cephes logf) for one lane, with the multiply-adds GCC fuses into FMA
/// in torch's AVX2 build (`-mfma`, `-ffp-contract=fast`).
fn log256(x: f32) -> f32 {
    if x.is_nan() || x <= 0.0 {
        return f32::NAN;
    }
    let x = x.max(f32::from_bits(0x0080_0000));
    let bits = x.to_bits();
    let exponent = (bits >> 23) as i32 - 0x7f;
    let mut x = f32::from_bits((bits & !0x7f80_0000) | 0.5f32.to_bits());
    let mut e = exponent as f32 + 1.0;
    let below = x < std::f32::consts::FRAC_1_SQRT_2; // cephes_SQRTHF
    let tmp = if below { x } else { 0.0 };
    x -= 1.0;
    e -= if below { 1.0 } else { 0.0 };
    x += tmp;
    let z = x * x;
    let mut y = 7.037_683_629_2E-2f32;
    for p in [
        -1.151_461_031_0E-1f32,
        1.167_699_874_0E-1,
        -1.242_014_084_6E-1,
        1.424_932_278_7E-1,
        -1.666_805_766_5E-1,
        2.000_071_476_5E-1,
        -2.499_999_399_3E-1,
        3.333_333_117_4E-1,
    ] {
        y = fma(y, x, p);
    }
    y *= x;
    y = fma(y, z, e * -2.121_944_40e-4);
    y -= z * 0.5;
    fma(e, 0.693_359_375, x + y)
}

/// avx_mathfun's `sincos256_ps` (Cephes sinf/cosf) for one lane, FMA-contracted like torch's build.
/// Returns `(sin, cos)`.
fn sincos256(x: f32) -> (f32, f32) {
    const SIGN: u32 = 0x8000_0000;
    let mut sign_sin = x.to_bits() & SIGN;
    let mut x = x.abs();
    let scaled = x * 1.273_239_544_735_16f32;
    // _mm256_cvttps_epi32: truncation (0x80000000 when out of range).
    let mut j = if scaled < 2_147_483_648.0 { scaled as i32 } else { i32::MIN };
    j = j.wrapping_add(1) & !1;
    let y = j as f32;
    let swap_sign_sin = ((j & 4) as u32) << 29;
    let poly_mask = (j & 2) == 0;
    x = fma(y, -0.785_156_25, x);
    x = fma(y, -2.418_756_484_985_351_562_5e-4, x);
    x = fma(y, -3.774_894_977_445_941_08e-8, x);
    let sign_cos = ((!j.wrapping_sub(2) & 4) as u32) << 29;
    sign_sin ^= swap_sign_sin;

    let z = x * x;
    let mut yc = fma(2.443_315_711_809_948E-5, z, -1.388_731_625_493_765E-3);
    yc = fma(yc, z, 4.166_664_568_298_827E-2);
    yc *= z;
    yc = fma(yc, z, -(z * 0.5));
    yc += 1.0;

    let mut ys = fma(-1.951_529_589_1E-4, z, 8.332_160_873_6E-3);
    ys = fma(ys, z, -1.666_665_461_1E-1);
    ys *= z;
    ys = fma(ys, x, x);

    let (ysin2, ysin1) = if poly_mask { (ys, 0.0f32) } else { (0.0f32, yc) };
    let ys_rest = ys - ysin2;
    let yc_rest = yc - ysin1;
    let sin = ysin1 + ysin2;
    let cos = yc_rest + ys_rest;
    (f32::from_bits(sin.to_bits() ^ sign_sin), f32::from_bits(cos.to_bits() ^ sign_cos))
}

/// `torch.pow(base, exponents)` for a Python-number `base` and a contiguous float32 tensor, as the
/// CPU `pow` kernel computes it (vectorised chunks of 16 through Sleef on AVX2, the rest by libm).
pub fn pow_scalar_base(base: f32, exponents: &[f32], kernels: CpuKernels) -> Vec<f32> {
    let vectorised = match kernels {
        CpuKernels::Avx2 => exponents.len() / 16 * 16,
        CpuKernels::Scalar => 0,
    };
    exponents.iter().enumerate().map(|(i, &e)| if i < vectorised { sleef_powf_u10(base, e) } else { base.powf(e) }).collect()
}

/// A float-float pair (Sleef's `vfloat2`): value `x + y` with `|y|` below half an ulp of `x`.
#[derive(Clone, Copy)]
struct F2 {
    x: f32,
    y: f32,
}

fn f2(x: f32, y: f32) -> F2 {
    F2 { x, y }
}

// Sleef's df.h helpers in their FMA (ENABLE_FMA_SP) variants, as in its AVX2 build.
fn dfadd2_f_f(x: f32, y: f32) -> F2 {
    let s = x + y;
    let v = s - x;
    f2(s, (x - (s - v)) + (y - v))
}

fn dfadd2_f2_f(x: F2, y: f32) -> F2 {
    let s = x.x + y;
    let v = s - x.x;
    let t = (x.x - (s - v)) + (y - v);
    f2(s, t + x.y)
}

fn dfadd2_f2_f2(x: F2, y: F2) -> F2 {
    let s = x.x + y.x;
    let v = s - x.x;
    let t = (x.x - (s - v)) + (y.x - v);
    f2(s, t + (x.y + y.y))
}

fn dfadd_f2_f2(x: F2, y: F2) -> F2 {
    let s = x.x + y.x;
    f2(s, (((x.x - s) + y.x) + x.y) + y.y)
}

fn dfadd_f_f2(x: f32, y: F2) -> F2 {
    let s = x + y.x;
    f2(s, ((x - s) + y.x) + y.y)
}

fn dfnormalize(t: F2) -> F2 {
    let s = t.x + t.y;
    f2(s, (t.x - s) + t.y)
}

fn dfscale(d: F2, s: f32) -> F2 {
    f2(d.x * s, d.y * s)
}

fn dfdiv(n: F2, d: F2) -> F2 {
    let t = 1.0 / d.x;
    let s = n.x * t;
    let u = fma(t, n.x, -s);
    let v = fma(-d.y, t, fma(-d.x, t, 1.0));
    f2(s, fma(s, v, fma(n.y, t, u)))
}

fn dfsqu(x: F2) -> F2 {
    let s = x.x * x.x;
    f2(s, fma(x.x + x.x, x.y, fma(x.x, x.x, -s)))
}

fn dfmul_f2_f(x: F2, y: f32) -> F2 {
    let s = x.x * y;
    f2(s, fma(x.y, y, fma(x.x, y, -s)))
}

fn dfmul_f2_f2(x: F2, y: F2) -> F2 {
    let s = x.x * y.x;
    f2(s, fma(x.x, y.y, fma(x.y, y.x, fma(x.x, y.x, -s))))
}

/// Sleef `logkf`: log(d) as a float-float (d > 0, finite).
fn sleef_logkf(d: f32) -> F2 {
    let tiny = d < f32::MIN_POSITIVE;
    let d = if tiny { d * (4_294_967_296.0f32 * 4_294_967_296.0) } else { d };
    let mut e = (((d * (1.0 / 0.75)).to_bits() >> 23) & 0xff) as i32 - 0x7f;
    let m = f32::from_bits((d.to_bits() as i32).wrapping_add((-e).wrapping_shl(23)) as u32);
    if tiny {
        e -= 64;
    }
    let x = dfdiv(dfadd2_f_f(-1.0, m), dfadd2_f_f(1.0, m));
    let x2 = dfsqu(x);
    let mut t = 0.240_320_354_700_088_500_976_562f32;
    t = fma(t, x2.x, 0.285_112_679_004_669_189_453_125);
    t = fma(t, x2.x, 0.400_007_992_982_864_379_882_812);
    let c = f2(0.666_666_626_930_236_816_406_25, 3.691_838_612_596_143_320_843_11e-9);
    let mut s = dfmul_f2_f(f2(0.693_147_182_464_599_609_38, -1.904_654_323_148_236_017e-9), e as f32);
    s = dfadd_f2_f2(s, dfscale(x, 2.0));
    dfadd_f2_f2(s, dfmul_f2_f2(dfmul_f2_f2(x2, x), dfadd2_f2_f2(dfmul_f2_f(x2, t), c)))
}

/// Sleef `vldexp_vf_vf_vi2`: x * 2^q without intermediate overflow.
fn sleef_ldexp(x: f32, q: i32) -> f32 {
    let mut m = q >> 31;
    m = ((m.wrapping_add(q) >> 6).wrapping_sub(m)).wrapping_shl(4);
    let q = q.wrapping_sub(m.wrapping_shl(2));
    m = m.wrapping_add(0x7f).clamp(0, 0xff);
    let u = f32::from_bits((m as u32) << 23);
    let x = x * u * u * u * u;
    x * f32::from_bits((q.wrapping_add(0x7f) as u32).wrapping_shl(23))
}

/// Sleef `expkf`: exp of a float-float.
fn sleef_expkf(d: F2) -> f32 {
    const R_LN2: f32 = std::f32::consts::LOG2_E; // Sleef R_LN2f
    const L2U: f32 = 0.693_145_751_953_125;
    const L2L: f32 = 1.428_606_765_330_187_045e-6;
    let u = (d.x + d.y) * R_LN2;
    let q = u.round_ties_even() as i32;
    let mut s = dfadd2_f2_f(d, q as f32 * -L2U);
    s = dfadd2_f2_f(s, q as f32 * -L2L);
    s = dfnormalize(s);
    let mut u = 0.001_363_246_468_827_128_410_339_36f32;
    for c in [
        0.008_365_969_173_610_210_418_701_17f32,
        0.041_671_082_377_433_776_855_468_8,
        0.166_665_524_244_308_471_679_688,
        0.499_999_850_988_388_061_523_438,
    ] {
        u = fma(u, s.x, c);
    }
    let t = dfadd_f2_f2(s, dfmul_f2_f(dfsqu(s), u));
    let t = dfadd_f_f2(1.0, t);
    let u = sleef_ldexp(t.x + t.y, q);
    if d.x < -104.0 {
        0.0
    } else {
        u
    }
}

/// Sleef `xpowf` (`Sleef_powf8_u10`, AVX2 build) for a positive finite base and a finite exponent;
/// other inputs fall back to libm's `powf` (never the case for RoPE frequencies).
fn sleef_powf_u10(x: f32, y: f32) -> f32 {
    if y == 0.0 || x == 1.0 {
        return 1.0;
    }
    if !(x > 0.0 && x.is_finite() && y.is_finite()) {
        return x.powf(y);
    }
    let r = sleef_expkf(dfmul_f2_f(sleef_logkf(x), y));
    if r.is_nan() {
        f32::INFINITY
    } else {
        r
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mt19937_matches_the_reference_sequence() {
        // std::mt19937(5489)'s 10000th output is 4123659995 (C++ standard, [rand.predef]).
        let mut mt = Mt19937::new(5489);
        let mut last = 0;
        for _ in 0..10_000 {
            last = mt.next_u32();
        }
        assert_eq!(last, 4_123_659_995);
    }

    #[test]
    fn seeds_map_like_manual_seed() {
        assert_eq!(torch_seed(5), Ok(5));
        assert_eq!(torch_seed(-1), Ok(u64::MAX));
        assert_eq!(torch_seed(i64::MIN as i128), Ok(1u64 << 63));
        assert_eq!(torch_seed(u64::MAX as i128), Ok(u64::MAX));
        assert!(torch_seed(1i128 << 64).is_err());
        assert!(torch_seed(i64::MIN as i128 - 1).is_err());
        // Only the low 32 bits seed the engine.
        assert_eq!(randn(42, 20, CpuKernels::Avx2), randn(42 + (1 << 32), 20, CpuKernels::Avx2));
    }

    #[test]
    fn avx_mathfun_ports_are_accurate() {
        for i in 1..=4096 {
            let u = i as f32 / 4096.0;
            assert!((log256(u) as f64 - (u as f64).ln()).abs() < 2e-7, "log({u})");
            let t = u * std::f32::consts::TAU;
            let (s, c) = sincos256(t);
            assert!((s as f64 - (t as f64).sin()).abs() < 2e-7 && (c as f64 - (t as f64).cos()).abs() < 2e-7);
        }
    }

    #[test]
    fn sleef_powf_is_within_one_ulp() {
        for i in 0..2000 {
            let y = i as f32 / 997.0 - 1.0;
            for x in [10_000.0f32, 2.5, 0.3] {
                let got = sleef_powf_u10(x, y);
                let exact = (x as f64).powf(y as f64);
                let ulp = (exact as f32).to_bits().abs_diff(got.to_bits());
                assert!(ulp <= 1, "pow({x}, {y}) = {got}, exact {exact}");
            }
        }
        assert_eq!(sleef_powf_u10(10_000.0, 0.0), 1.0);
    }

    #[test]
    fn randn_moments_are_standard_normal() {
        for kernels in [CpuKernels::Avx2, CpuKernels::Scalar] {
            let v = randn(7, 100_003, kernels);
            let n = v.len() as f64;
            let mean = v.iter().map(|&x| x as f64).sum::<f64>() / n;
            let var = v.iter().map(|&x| (x as f64 - mean).powi(2)).sum::<f64>() / n;
            assert!(mean.abs() < 0.02 && (var - 1.0).abs() < 0.02, "{kernels:?}: mean {mean} var {var}");
        }
        assert!(randn(1, 0, CpuKernels::Avx2).is_empty());
    }
}
