//! The denoising schedule: diffusers' `FlowMatchEulerDiscreteScheduler` as the edit pipelines drive it
//! (step 5 of `__call__` and `scheduler.step`), reproduced operation by operation in the same precision.
//!
//! Where the precision changes (diffusers 0.42.1 with NumPy 2):
//! 1. `np.linspace(1.0, 1/N, N)` is float64 (`i * step + start`, the last value exactly `1/N`);
//! 2. `set_timesteps(sigmas=...)` casts it to float32 at once (`np.array(sigmas).astype(np.float32)`);
//! 3. the time shift and the terminal stretch run on that float32 array, Python-float constants
//!    (`exp(mu)`, `1 - shift_terminal`, computed in float64) rounded to float32 first (NEP 50);
//! 4. timesteps are `sigmas * 1000` in float32, sigmas get a trailing 0;
//! 5. the transformer receives `t / 1000` (float32), and `step` computes `dt = sigma_next - sigma`
//!    and `sample + dt * velocity` in float32 (two roundings, no fused multiply-add).

pub use crate::bundle::{SchedulerConfig, TimeShiftType};
use thiserror::Error;

/// Errors of the schedule construction and the Euler step.
#[derive(Debug, Error, PartialEq)]
pub enum ScheduleError {
    #[error("num_inference_steps must be at least 1")]
    NoSteps,
    #[error(
        "1 inference step with `shift_terminal` set is undefined: the reference's terminal stretch divides 0 by 0 \
         and yields a NaN sigma; use at least 2 steps (or a scheduler without shift_terminal, like Lightning's)"
    )]
    SingleStepTerminal,
    #[error("scheduler option `{0}` is set but not supported by the edit pipeline; remove it from the scheduler config")]
    Unsupported(&'static str),
    #[error("scheduler config is invalid: {0}")]
    Config(String),
    #[error("the schedule for {steps} steps at image_seq_len {image_seq_len} has a non-finite sigma at index {index}; check the scheduler config")]
    NonFinite { steps: usize, image_seq_len: u64, index: usize },
    #[error("step {step} is past the schedule's last step ({steps} steps)")]
    StepOutOfRange { step: usize, steps: usize },
}

impl Default for SchedulerConfig {
    /// diffusers' `FlowMatchEulerDiscreteScheduler()` defaults.
    fn default() -> SchedulerConfig {
        SchedulerConfig {
            base_image_seq_len: 256,
            max_image_seq_len: 4096,
            base_shift: 0.5,
            max_shift: 1.15,
            shift_terminal: None,
            time_shift_type: TimeShiftType::Exponential,
            use_dynamic_shifting: false,
            num_train_timesteps: 1000,
            shift: 1.0,
            invert_sigmas: false,
            use_karras_sigmas: false,
            use_exponential_sigmas: false,
            use_beta_sigmas: false,
            stochastic_sampling: false,
        }
    }
}

/// The manifest's `scheduler.base` / `scheduler.lightning` (declared in `bundle`): the reference's
/// configs, and the options this implementation refuses.
impl SchedulerConfig {
    /// Qwen-Image(-Edit)'s `scheduler/scheduler_config.json`.
    pub fn qwen_image() -> SchedulerConfig {
        SchedulerConfig {
            base_image_seq_len: 256,
            max_image_seq_len: 8192,
            base_shift: 0.5,
            max_shift: 0.9,
            shift_terminal: Some(0.02),
            time_shift_type: TimeShiftType::Exponential,
            use_dynamic_shifting: true,
            ..SchedulerConfig::default()
        }
    }

    /// The scheduler Qwen-Image-Lightning uses: a constant shift of 3 (`base_shift = max_shift = ln 3`).
    pub fn lightning() -> SchedulerConfig {
        SchedulerConfig { base_shift: 3f64.ln(), max_shift: 3f64.ln(), shift_terminal: None, ..SchedulerConfig::qwen_image() }
    }

    /// Refuses the options this implementation does not reproduce and values that break the math.
    pub fn validate(&self) -> Result<(), ScheduleError> {
        for (set, name) in [
            (self.invert_sigmas, "invert_sigmas"),
            (self.use_karras_sigmas, "use_karras_sigmas"),
            (self.use_exponential_sigmas, "use_exponential_sigmas"),
            (self.use_beta_sigmas, "use_beta_sigmas"),
            (self.stochastic_sampling, "stochastic_sampling"),
        ] {
            if set {
                return Err(ScheduleError::Unsupported(name));
            }
        }
        if self.use_dynamic_shifting && self.base_image_seq_len == self.max_image_seq_len {
            return Err(ScheduleError::Config(format!(
                "base_image_seq_len and max_image_seq_len are both {} (calculate_shift divides by their difference)",
                self.base_image_seq_len
            )));
        }
        if self.num_train_timesteps == 0 {
            return Err(ScheduleError::Config("num_train_timesteps must be positive".into()));
        }
        let finite = [self.base_shift, self.max_shift, self.shift, self.shift_terminal.unwrap_or(0.0)];
        if finite.iter().any(|v| !v.is_finite()) {
            return Err(ScheduleError::Config("base_shift, max_shift, shift and shift_terminal must be finite".into()));
        }
        Ok(())
    }

    /// `mu` for an image of `image_seq_len` packed latent tokens (the target image only).
    pub fn mu(&self, image_seq_len: u64) -> f64 {
        calculate_shift(image_seq_len, self.base_image_seq_len, self.max_image_seq_len, self.base_shift, self.max_shift)
    }
}

/// The pipelines' `calculate_shift`: a line through (base_seq_len, base_shift) and
/// (max_seq_len, max_shift), evaluated at `image_seq_len`, in Python float (f64) arithmetic.
pub fn calculate_shift(image_seq_len: u64, base_seq_len: u64, max_seq_len: u64, base_shift: f64, max_shift: f64) -> f64 {
    let m = (max_shift - base_shift) / (max_seq_len as i64 - base_seq_len as i64) as f64;
    let b = base_shift - m * base_seq_len as f64;
    image_seq_len as f64 * m + b
}

/// `np.linspace(start, stop, num)` (float64, endpoint included).
fn linspace(start: f64, stop: f64, num: usize) -> Vec<f64> {
    if num == 1 {
        return vec![start];
    }
    let step = (stop - start) / (num - 1) as f64;
    (0..num).map(|i| if i == num - 1 { stop } else { i as f64 * step + start }).collect()
}

/// A ready schedule: `steps + 1` sigmas (the last 0) and `steps` timesteps.
#[derive(Clone, Debug, PartialEq)]
pub struct Schedule {
    /// `scheduler.sigmas` (float32), length `steps + 1`, ending in 0.
    pub sigmas: Vec<f32>,
    /// `scheduler.timesteps` = `sigmas * num_train_timesteps` (float32), length `steps`.
    pub timesteps: Vec<f32>,
    /// The `mu` the sigmas were shifted with.
    pub mu: f64,
}

impl Schedule {
    /// The schedule of `steps` denoising steps for a target image of `image_seq_len` packed latent
    /// tokens (`(height/16) * (width/16)`), as `retrieve_timesteps(scheduler, steps, sigmas=linspace, mu)`.
    pub fn new(config: &SchedulerConfig, steps: usize, image_seq_len: u64) -> Result<Schedule, ScheduleError> {
        config.validate()?;
        if steps == 0 {
            return Err(ScheduleError::NoSteps);
        }
        let terminal = config.shift_terminal.filter(|&v| v != 0.0);
        if steps == 1 && terminal.is_some() {
            return Err(ScheduleError::SingleStepTerminal);
        }
        let mu = config.mu(image_seq_len);
        let mut sigmas: Vec<f32> = linspace(1.0, 1.0 / steps as f64, steps).into_iter().map(|v| v as f32).collect();

        if config.use_dynamic_shifting {
            // time_shift(mu, 1.0, t): the exponent 1.0 leaves (1/t - 1) unchanged.
            let numerator = match config.time_shift_type {
                TimeShiftType::Exponential => mu.exp() as f32,
                TimeShiftType::Linear => mu as f32,
            };
            for s in &mut sigmas {
                *s = numerator / (numerator + (1.0f32 / *s - 1.0));
            }
        } else {
            let shift = config.shift as f32;
            let shift_m1 = (config.shift - 1.0) as f32;
            for s in &mut sigmas {
                *s = shift * *s / (1.0 + shift_m1 * *s);
            }
        }

        if let Some(terminal) = terminal {
            // stretch_shift_to_terminal: one_minus_z[-1] / (1 - shift_terminal), all float32.
            let last = 1.0f32 - sigmas[steps - 1];
            let scale = last / (1.0 - terminal) as f32;
            for s in &mut sigmas {
                *s = 1.0f32 - (1.0f32 - *s) / scale;
            }
        }

        if let Some(index) = sigmas.iter().position(|s| !s.is_finite()) {
            return Err(ScheduleError::NonFinite { steps, image_seq_len, index });
        }
        let train = config.num_train_timesteps as f32;
        let timesteps = sigmas.iter().map(|&s| s * train).collect();
        sigmas.push(0.0);
        Ok(Schedule { sigmas, timesteps, mu })
    }

    /// Number of denoising steps.
    pub fn steps(&self) -> usize {
        self.timesteps.len()
    }

    /// The `timestep` input of the transformer at step `i`: `t / 1000` in float32, as the pipeline
    /// passes it (`timestep / 1000`).
    pub fn model_timestep(&self, i: usize) -> Result<f32, ScheduleError> {
        self.timesteps.get(i).map(|&t| t / 1000.0).ok_or(ScheduleError::StepOutOfRange { step: i, steps: self.steps() })
    }

    /// `sigma_next - sigma` of step `i` in float32, as `scheduler.step` rounds it once before the
    /// Euler update `sample + dt * velocity` (runtime::step runs that update, on the CPU or the GPU).
    pub fn dt(&self, i: usize) -> Result<f32, ScheduleError> {
        if i >= self.steps() {
            return Err(ScheduleError::StepOutOfRange { step: i, steps: self.steps() });
        }
        Ok(self.sigmas[i + 1] - self.sigmas[i])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lightning_eight_steps() {
        let s = Schedule::new(&SchedulerConfig::lightning(), 8, 4096).unwrap();
        let want = [1.0, 0.9545, 0.9, 0.8333, 0.75, 0.6429, 0.5, 0.3, 0.0];
        assert_eq!(s.sigmas.len(), 9);
        for (got, want) in s.sigmas.iter().zip(want) {
            assert!((got - want).abs() < 1e-4, "{:?}", s.sigmas);
        }
        assert_eq!(s.timesteps[0], 1000.0);
        assert_eq!(s.model_timestep(0), Ok(1.0));
        assert!(s.model_timestep(8).is_err());
    }

    #[test]
    fn linspace_like_numpy() {
        assert_eq!(linspace(1.0, 0.25, 4), vec![1.0, 0.75, 0.5, 0.25]);
        assert_eq!(linspace(1.0, 1.0, 1), vec![1.0]);
    }

    #[test]
    fn real_schedule_ends_at_the_terminal_value() {
        let s = Schedule::new(&SchedulerConfig::qwen_image(), 50, 4096).unwrap();
        assert_eq!(s.sigmas.len(), 51);
        assert!((s.sigmas[49] - 0.02).abs() < 1e-6);
        assert!(s.sigmas.windows(2).all(|w| w[0] > w[1]));
        assert_eq!(Schedule::new(&SchedulerConfig::qwen_image(), 1, 4096), Err(ScheduleError::SingleStepTerminal));
        assert_eq!(Schedule::new(&SchedulerConfig::qwen_image(), 0, 4096), Err(ScheduleError::NoSteps));
        assert_eq!(Schedule::new(&SchedulerConfig::lightning(), 1, 4096).unwrap().sigmas, vec![1.0, 0.0]);
    }

    #[test]
    fn config_from_manifest_json() {
        let json = r#"{"base_image_seq_len": 256, "max_image_seq_len": 8192, "base_shift": 0.5, "max_shift": 0.9,
            "shift_terminal": null, "time_shift_type": "linear", "use_dynamic_shifting": true,
            "num_train_timesteps": 1000, "shift": 1.0, "_class_name": "FlowMatchEulerDiscreteScheduler"}"#;
        let c: SchedulerConfig = serde_json::from_str(json).unwrap();
        assert_eq!(c.shift_terminal, None);
        assert_eq!(c.time_shift_type, TimeShiftType::Linear);
        let c = SchedulerConfig { use_karras_sigmas: true, ..SchedulerConfig::default() };
        assert_eq!(c.validate(), Err(ScheduleError::Unsupported("use_karras_sigmas")));
        let c = SchedulerConfig { max_image_seq_len: 256, use_dynamic_shifting: true, ..SchedulerConfig::default() };
        assert!(matches!(c.validate(), Err(ScheduleError::Config(_))));
    }

    #[test]
    fn dt_is_the_rounded_sigma_difference() {
        let s = Schedule::new(&SchedulerConfig::qwen_image(), 4, 4096).unwrap();
        for i in 0..4 {
            assert_eq!(s.dt(i).unwrap().to_bits(), (s.sigmas[i + 1] - s.sigmas[i]).to_bits());
            assert!(s.dt(i).unwrap() < 0.0, "sigmas decrease");
        }
        assert!(matches!(s.dt(4), Err(ScheduleError::StepOutOfRange { step: 4, steps: 4 })));
    }
}
