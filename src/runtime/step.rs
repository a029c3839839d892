//! The denoising step after each transformer run (true-CFG norm rescale, then the Euler update).
//! One source, cpp/denoise_step.h: compiled for the host by build.rs (used here) and by NVRTC for the GPU.

use std::ffi::c_void;

use super::{DType, Error};

/// The kernel source, as NVRTC compiles it.
pub const SOURCE: &str = include_str!("../../cpp/denoise_step.h");
/// The kernel's entry point.
pub const KERNEL: &str = "qe_cfg_euler";
/// Threads per block of the kernel (one thread per job and token).
pub const BLOCK: u32 = 256;

extern "C" {
    fn qe_cfg_euler_host(
        velocity: *const c_void,
        v_dtype: i32,
        x: *mut f32,
        hidden: *mut c_void,
        h_dtype: i32,
        scales: *const f32,
        batch: i32,
        seq: i32,
        img_seq: i32,
        channels: i32,
        dt: f32,
    );
}

#[cfg(test)]
extern "C" {
    fn qe_f32_to_f16_host(f: f32) -> u16;
    fn qe_f16_to_f32_host(h: u16) -> f32;
    fn qe_f32_to_bf16_host(f: f32) -> u16;
    fn qe_bf16_to_f32_host(h: u16) -> f32;
}

/// The kernel's code for a float element type (`QE_F32`, `QE_F16`, `QE_BF16`).
pub fn dtype_code(d: DType) -> Option<i32> {
    match d {
        DType::F32 => Some(0),
        DType::F16 => Some(1),
        DType::BF16 => Some(2),
        _ => None,
    }
}

/// The sizes of one step: `batch` jobs of `seq` generated tokens, `img_seq` transformer tokens per row
/// (generated + condition image), `channels` per token; with true CFG every job has two rows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StepShape {
    pub batch: usize,
    pub seq: usize,
    pub img_seq: usize,
    pub channels: usize,
    pub cfg: bool,
}

impl StepShape {
    pub fn rows(&self) -> usize {
        if self.cfg {
            2 * self.batch
        } else {
            self.batch
        }
    }
    /// Elements of the latents `x` [batch, seq, channels].
    pub fn latents(&self) -> usize {
        self.batch * self.seq * self.channels
    }
    /// Elements of the velocity and of the hidden states [rows, img_seq, channels].
    pub fn hidden(&self) -> usize {
        self.rows() * self.img_seq * self.channels
    }
    /// Blocks of [`BLOCK`] threads the kernel runs (one thread per job and generated token).
    pub fn blocks(&self) -> u32 {
        (self.batch * self.seq).div_ceil(BLOCK as usize) as u32
    }
    /// The kernel's int arguments, checked: every size positive, seq <= img_seq, each within i32
    /// (the kernel indexes with 64-bit integers, so only the sizes themselves must fit).
    pub fn kernel_dims(&self) -> Result<[i32; 4], Error> {
        let err = |reason: String| Error::Contract { component: "denoise step".into(), reason };
        if self.batch == 0 || self.seq == 0 || self.channels == 0 || self.seq > self.img_seq {
            return Err(err(format!("invalid step shape {self:?}")));
        }
        let elements = self.rows().checked_mul(self.img_seq).and_then(|n| n.checked_mul(self.channels));
        let dims = [self.batch, self.seq, self.img_seq, self.channels].map(|n| i32::try_from(n).ok());
        match (elements, dims) {
            (Some(_), [Some(b), Some(s), Some(i), Some(c)]) => Ok([b, s, i, c]),
            _ => Err(err(format!("step shape {self:?} exceeds the kernel's sizes"))),
        }
    }

    /// Checks the step's buffers (sizes in bytes) against this shape and returns the kernel's
    /// arguments. `exact`: host slices must have exactly the addressed size; device buffers (sized
    /// for the largest profile) may be larger. Scales are given exactly when the step has true CFG.
    pub fn check_buffers(
        &self,
        velocity: (usize, DType),
        x_bytes: usize,
        hidden: Option<(usize, DType)>,
        scales_bytes: Option<usize>,
        exact: bool,
    ) -> Result<KernelArgs, Error> {
        let err = |reason: String| Error::Contract { component: "denoise step".into(), reason };
        let dims = self.kernel_dims()?;
        let code = |d: DType| dtype_code(d).ok_or_else(|| err(format!("{d} is not a float type")));
        let v_code = code(velocity.1)?;
        let h_code = hidden.map(|(_, d)| code(d)).transpose()?.unwrap_or(0);
        let fits = |have: usize, want: usize| if exact { have == want } else { have >= want };
        let mut need =
            vec![("velocity", velocity.0, self.hidden() * velocity.1.size()), ("latents", x_bytes, self.latents() * 4)];
        if let Some((bytes, d)) = hidden {
            need.push(("hidden states", bytes, self.hidden() * d.size()));
        }
        match scales_bytes {
            Some(bytes) if self.cfg => need.push(("CFG scales", bytes, self.batch * 4)),
            Some(_) => return Err(err(format!("CFG scales given for a step without true CFG ({self:?})"))),
            None if self.cfg => return Err(err("true CFG needs one scale per job".into())),
            None => {}
        }
        if let Some((what, have, want)) = need.into_iter().find(|&(_, have, want)| !fits(have, want)) {
            return Err(err(format!("{what} buffer has {have} bytes, {self:?} needs {want}")));
        }
        Ok(KernelArgs { dims, v_code, h_code })
    }
}

/// The kernel's checked scalar arguments: [batch, seq, img_seq, channels] and the dtype codes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KernelArgs {
    pub dims: [i32; 4],
    pub v_code: i32,
    pub h_code: i32,
}

/// One step on host memory: `velocity` and `hidden` are raw buffers of the given float dtypes,
/// `x` is float32. `hidden` (when given) gets the new latents in its generated-token rows.
pub fn cfg_euler_raw(
    shape: StepShape,
    velocity: (&[u8], DType),
    x: &mut [f32],
    hidden: Option<(&mut [u8], DType)>,
    scales: Option<&[f32]>,
    dt: f32,
) -> Result<(), Error> {
    let args = shape.check_buffers(
        (velocity.0.len(), velocity.1),
        x.len() * 4,
        hidden.as_ref().map(|(h, d)| (h.len(), *d)),
        scales.map(|s| s.len() * 4),
        true,
    )?;
    let hidden_dtype = hidden.as_ref().map(|h| h.1);
    let h_ptr = hidden.map_or(std::ptr::null_mut(), |(h, _)| h.as_mut_ptr() as *mut c_void);
    // The C code reads floats and u16s through these pointers: they must be aligned for them.
    let h_align = hidden_dtype.map_or(1, DType::size);
    if velocity.0.as_ptr() as usize % velocity.1.size() != 0 || h_ptr as usize % h_align != 0 {
        return Err(Error::Contract { component: "denoise step".into(), reason: "misaligned step buffers".into() });
    }
    // SAFETY: every buffer was checked to hold exactly what the shape addresses (the C code indexes
    // only [0, rows*img_seq*channels) of velocity/hidden and [0, batch*seq*channels) of x), and
    // `scales` has `batch` entries when given; nothing else is touched.
    unsafe {
        qe_cfg_euler_host(
            velocity.0.as_ptr() as *const c_void,
            args.v_code,
            x.as_mut_ptr(),
            h_ptr,
            args.h_code,
            scales.map_or(std::ptr::null(), |s| s.as_ptr()),
            args.dims[0],
            args.dims[1],
            args.dims[2],
            args.dims[3],
            dt,
        )
    };
    Ok(())
}

/// [`cfg_euler_raw`] for float32 velocity and hidden states (the CPU pipeline).
pub fn cfg_euler(
    shape: StepShape,
    velocity: &[f32],
    x: &mut [f32],
    hidden: Option<&mut [f32]>,
    scales: Option<&[f32]>,
    dt: f32,
) -> Result<(), Error> {
    let hidden = hidden.map(|h| (bytemuck::cast_slice_mut::<f32, u8>(h), DType::F32));
    cfg_euler_raw(shape, (bytemuck::cast_slice(velocity), DType::F32), x, hidden, scales, dt)
}

#[cfg(test)]
mod tests {
    use super::*;

    // The kernel's element conversions, checked against the `half` crate (which the engines' seam uses).
    fn f32_to_f16_bits(f: f32) -> u16 {
        // SAFETY: pure function of its argument.
        unsafe { qe_f32_to_f16_host(f) }
    }
    fn f16_bits_to_f32(h: u16) -> f32 {
        // SAFETY: pure function of its argument.
        unsafe { qe_f16_to_f32_host(h) }
    }
    fn f32_to_bf16_bits(f: f32) -> u16 {
        // SAFETY: pure function of its argument.
        unsafe { qe_f32_to_bf16_host(f) }
    }
    fn bf16_bits_to_f32(h: u16) -> f32 {
        // SAFETY: pure function of its argument.
        unsafe { qe_bf16_to_f32_host(h) }
    }

    /// A small deterministic generator (xorshift) for test data.
    fn values(n: usize, seed: u64) -> Vec<f32> {
        let mut s = seed.max(1);
        (0..n)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                ((s >> 40) as f32 / (1u64 << 24) as f32) * 4.0 - 2.0
            })
            .collect()
    }

    /// The reference step written out in Rust: diffusers' true-CFG rescale and scheduler.step.
    fn reference(shape: StepShape, v: &[f32], x: &mut [f32], scales: Option<&[f32]>, dt: f32) {
        let StepShape { batch, seq, img_seq, channels: ch, .. } = shape;
        for j in 0..batch {
            for t in 0..seq {
                let c = &v[(j * img_seq + t) * ch..][..ch];
                let mut out: Vec<f32> = c.to_vec();
                if let Some(s) = scales {
                    let u = &v[((j + batch) * img_seq + t) * ch..][..ch];
                    let comb: Vec<f32> = c.iter().zip(u).map(|(&c, &u)| u + s[j] * (c - u)).collect();
                    let n = |a: &[f32]| a.iter().map(|x| x * x).sum::<f32>().sqrt();
                    let ratio = n(c) / n(&comb);
                    out = comb.iter().map(|&c| c * ratio).collect();
                }
                for (xv, o) in x[(j * seq + t) * ch..][..ch].iter_mut().zip(out) {
                    *xv += dt * o;
                }
            }
        }
    }

    #[test]
    fn step_matches_the_reference_formula_bit_for_bit() {
        for (cfg, batch) in [(false, 1), (false, 3), (true, 1), (true, 2)] {
            let shape = StepShape { batch, seq: 12, img_seq: 20, channels: 64, cfg };
            let v = values(shape.hidden(), 7 + batch as u64);
            let x0 = values(shape.latents(), 99);
            let scales: Vec<f32> = (0..batch).map(|j| 4.0 + j as f32 * 0.5).collect();
            let sc = cfg.then_some(&scales[..]);
            let dt = 0.31f32 - 0.52f32;
            let mut want = x0.clone();
            reference(shape, &v, &mut want, sc, dt);
            let mut got = x0.clone();
            let mut hidden = vec![7.0f32; shape.hidden()];
            cfg_euler(shape, &v, &mut got, Some(&mut hidden), sc, dt).unwrap();
            assert_eq!(got.iter().map(|f| f.to_bits()).collect::<Vec<_>>(), want.iter().map(|f| f.to_bits()).collect::<Vec<_>>());
            // The hidden rows: new latents in the generated tokens of every row of a job, the rest untouched.
            for r in 0..shape.rows() {
                let j = r % batch;
                for t in 0..shape.img_seq {
                    let h = &hidden[(r * shape.img_seq + t) * 64..][..64];
                    if t < shape.seq {
                        assert_eq!(h, &got[(j * shape.seq + t) * 64..][..64]);
                    } else {
                        assert!(h.iter().all(|&v| v == 7.0));
                    }
                }
            }
        }
    }

    #[test]
    fn step_writes_half_precision_hidden_states_as_the_seam_converts() {
        let shape = StepShape { batch: 2, seq: 5, img_seq: 9, channels: 16, cfg: true };
        let v = values(shape.hidden(), 3);
        let v16: Vec<u16> = v.iter().map(|&f| half::bf16::from_f32(f).to_bits()).collect();
        let v_read: Vec<f32> = v16.iter().map(|&b| half::bf16::from_bits(b).to_f32()).collect();
        let scales = [3.0f32, 5.5];
        let mut want = values(shape.latents(), 5);
        let mut got = want.clone();
        reference(shape, &v_read, &mut want, Some(&scales), -0.125);
        let mut hidden = vec![0u16; shape.hidden()];
        cfg_euler_raw(
            shape,
            (bytemuck::cast_slice(&v16), DType::BF16),
            &mut got,
            Some((bytemuck::cast_slice_mut(&mut hidden), DType::F16)),
            Some(&scales),
            -0.125,
        )
        .unwrap();
        assert_eq!(got, want);
        assert_eq!(hidden[0], half::f16::from_f32(got[0]).to_bits());
        let last_gen = ((2 + 1) * shape.img_seq + shape.seq - 1) * 16 + 15; // row b+1, last generated token
        assert_eq!(hidden[last_gen], half::f16::from_f32(got[(shape.seq * 2) * 16 - 1]).to_bits());
    }

    #[test]
    fn conversions_match_the_half_crate() {
        // Every 16-bit pattern decodes alike (NaNs stay NaN).
        for h in 0..=u16::MAX {
            let (a, b) = (f16_bits_to_f32(h), half::f16::from_bits(h).to_f32());
            assert!(a.to_bits() == b.to_bits() || (a.is_nan() && b.is_nan()), "f16 {h:#06x}: {a} vs {b}");
            let (a, b) = (bf16_bits_to_f32(h), half::bf16::from_bits(h).to_f32());
            assert!(a.to_bits() == b.to_bits() || (a.is_nan() && b.is_nan()), "bf16 {h:#06x}");
        }
        // Encoding: every f32 exponent with many mantissas, including the rounding ties and edges.
        let mut checked = 0;
        for exp in 0u32..=255 {
            for man in (0u32..(1 << 23)).step_by(4093).chain([0x1000, 0x1fff, 0x3000, 0x7fffff, 0x8000, 0x18000, 1, 2]) {
                for sign in [0u32, 1] {
                    let f = f32::from_bits(sign << 31 | exp << 23 | (man & 0x7fffff));
                    let (a, b) = (f32_to_f16_bits(f), half::f16::from_f32(f).to_bits());
                    let nan = half::f16::from_bits(a).is_nan() && half::f16::from_bits(b).is_nan();
                    assert!(a == b || nan, "f16({f:e} = {:#010x}): {a:#06x} vs {b:#06x}", f.to_bits());
                    let (a, b) = (f32_to_bf16_bits(f), half::bf16::from_f32(f).to_bits());
                    let nan = half::bf16::from_bits(a).is_nan() && half::bf16::from_bits(b).is_nan();
                    assert!(a == b || nan, "bf16({f:e}): {a:#06x} vs {b:#06x}");
                    checked += 1;
                }
            }
        }
        assert!(checked > 500_000);
    }

    #[test]
    fn bad_buffers_are_errors_not_memory_errors() {
        let shape = StepShape { batch: 1, seq: 2, img_seq: 3, channels: 4, cfg: false };
        let v = vec![0f32; shape.hidden()];
        let mut x = vec![0f32; shape.latents()];
        assert!(cfg_euler(shape, &v[1..], &mut x, None, None, 0.1).is_err());
        assert!(cfg_euler(shape, &v, &mut x[1..], None, None, 0.1).is_err());
        assert!(cfg_euler(shape, &v, &mut x, Some(&mut [0f32; 3]), None, 0.1).is_err());
        assert!(cfg_euler(shape, &v, &mut x, None, Some(&[2.0]), 0.1).is_err(), "scales without CFG");
        let cfg = StepShape { cfg: true, ..shape };
        let v2 = vec![0f32; cfg.hidden()];
        assert!(cfg_euler(cfg, &v2, &mut x, None, None, 0.1).is_err(), "CFG without scales");
        assert!(cfg_euler(StepShape { seq: 4, ..shape }, &v, &mut x, None, None, 0.1).is_err(), "seq > img_seq");
        let e = cfg_euler_raw(shape, (bytemuck::cast_slice(&v), DType::I64), &mut x, None, None, 0.1).unwrap_err();
        assert!(e.to_string().contains("not a float"), "{e}");
        assert!(cfg_euler(shape, &v, &mut x, None, None, 0.1).is_ok());
    }
}
