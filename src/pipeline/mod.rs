//! The edit algorithm above the engine seam: prompt and vision preparation, schedule, latents, loop.
//! Each module mirrors one part of the reference diffusers pipeline and is tested against its goldens.
//!
//! A job's path: [`EditRequest`] -> [`Preprocessor::prepare`] (any thread: all per-job CPU work, once)
//! -> [`Prepared`] (carries its [`BatchKey`]) -> [`Pipeline::run_batch`] (the engine worker: text
//! encoder, VAE encoder, denoising loop, decoder) -> [`EditOutput`]. The engines come from
//! `runtime::loader`; nothing here names a concrete backend.

pub mod job;
pub mod latents;
pub mod memory;
pub mod model;
pub mod prepare;
pub mod prompt;
pub mod rope;
pub mod run;
pub mod schedule;
pub mod torch_cpu;
pub mod vision;

pub use job::{BatchKey, EditError, EditOutput, EditRequest};
pub use memory::MemoryModel;
pub use model::{cpu_kernels, LoadError, PipelineInfo, PipelineOptions, DEFAULT_TEXT_BUCKET, MAX_PLUS_IMAGES};
pub use prepare::{Prepared, Preprocessor};
pub use run::{Checkpoint, Pipeline, StageTimes, Trace};
