//! The edit algorithm above the engine seam: prompt and vision preparation, schedule, latents, loop.
//! Each module mirrors one part of the reference diffusers pipeline and is tested against its goldens.

pub mod edit;
pub mod latents;
pub mod prompt;
pub mod rope;
pub mod schedule;
pub mod torch_cpu;
pub mod vision;
