//! Running a batch of prepared jobs on the engines (the engine worker's half), one function per
//! stage: text encoder, VAE encoder, denoising loop (on the device when the engine has one), decoder.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use image::RgbImage;
use ndarray::{s, Array2, Array3, Array4, ArrayD, Axis, Ix3, Ix4, IxDyn};

use super::job::{internal, EditError, EditOutput};
use super::latents;
use super::model::{self, Engines, LoadError, Model, PipelineInfo, PipelineOptions};
use super::prepare::{Prepared, Preprocessor};
use super::prompt::{self, PromptRow};
use super::vision::VisionBatch;
use crate::imaging;
use crate::runtime::counters::{Counter, RunCounters};
use crate::runtime::step::{self, StepShape};
use crate::runtime::{DenoiseLoop, Engine, Growth, Input, Kept, RowCopy, StagedRow, Tensor};

/// The engines of one bundle. Owned by one engine worker; `run_batch` runs batches of prepared jobs.
pub struct Pipeline {
    model: Arc<Model>,
    engines: Engines,
    last_stages: Option<StageTimes>,
}

/// Wall time of each stage of one batch (for benches, logs and the server's stage metrics).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct StageTimes {
    pub batch: usize,
    /// VL processor patches to prompt embeddings (text encoder).
    pub text: Duration,
    pub vae_encode: Duration,
    /// Every transformer step with its Euler update.
    pub denoise: Duration,
    /// Each denoising step (from one step's checkpoint to the next; on a device loop, as the host
    /// sees the steps finish).
    pub steps: Vec<Duration>,
    /// VAE decoder and conversion to pictures.
    pub decode: Duration,
}

/// Intermediates of one batch, for parity tests and `edit --dump`: what the reference records.
#[derive(Clone, Debug, Default)]
pub struct Trace {
    /// Text encoder rows (cond rows, then negative rows): token ids and mask [rows, seq].
    pub input_ids: Option<ArrayD<i64>>,
    pub attention_mask: Option<ArrayD<i64>>,
    /// Per input image of every job: VL patches [patches, 1176].
    pub pixel_values: Vec<ArrayD<f32>>,
    /// Text hidden states after the drop, padded [rows, txt_seq, dim], and their mask.
    pub prompt_embeds: Option<ArrayD<f32>>,
    pub prompt_mask: Option<ArrayD<i64>>,
    /// Packed, normalised condition latents [b, cond_seq, 64].
    pub image_latents: Option<ArrayD<f32>>,
    /// Initial packed noise [b, seq, 64].
    pub noise: Option<ArrayD<f32>>,
    pub sigmas: Vec<f32>,
    /// Packed latents after each step.
    pub latents: Vec<ArrayD<f32>>,
    /// VAE decoder input (denormalised) and output float image.
    pub decode_in: Option<ArrayD<f32>>,
    pub decoded: Option<ArrayD<f32>>,
}

/// Where a running batch asks its caller whether to go on (see [`Pipeline::run_batch_with`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Checkpoint {
    /// Before the text encoder (the first stage).
    TextEncoder,
    /// Before the VAE encoder.
    VaeEncoder,
    /// Before denoising step `k` (0-based). On a device loop, steps after the first are asked from
    /// inside the loop, after the previous step finished on the device.
    Step(usize),
    /// Before the VAE decoder.
    VaeDecoder,
    /// After the decoder: the batch is complete (the answer is ignored).
    Done,
}

/// Prompt embeddings of a batch, [rows, txt_seq, dim], and the mask [rows, txt_seq] (1 = token).
struct TextEmbeds {
    embeds: Embeds,
    mask: Array2<i64>,
}

/// The embeddings on the host, or as a gather out of the text encoder's output kept where it was computed
/// (on a GPU they never leave the device).
enum Embeds {
    Host(Tensor),
    Kept { src: Kept, shape: [usize; 3], copies: Vec<RowCopy> },
}

impl TextEmbeds {
    fn input(&self) -> Input<'_> {
        match &self.embeds {
            Embeds::Host(t) => Input::Host(t),
            Embeds::Kept { src, shape, copies } => Input::Gather { shape, src, copies },
        }
    }
}

fn run_one(engine: &mut dyn Engine, inputs: &[(&str, Input<'_>)], output: &str) -> Result<ArrayD<f32>, EditError> {
    let mut out = engine.run_inputs(inputs)?;
    let t =
        out.take(output).ok_or_else(|| EditError::Internal(format!("{} returned no `{output}` output", engine.component())))?;
    t.into_f32().map_err(|e| EditError::Internal(format!("{}: {e}", engine.component())))
}

impl Pipeline {
    /// Opens the bundle in `dir`, chooses the backend (auto: TensorRT when it can run here, else ONNX
    /// Runtime) and loads the four engines, checking each against the manifest's IO contract.
    pub fn open(dir: &Path, options: &PipelineOptions) -> Result<Pipeline, LoadError> {
        let (model, engines) = model::open(dir, options)?;
        Ok(Pipeline { model: Arc::new(model), engines, last_stages: None })
    }

    pub fn info(&self) -> &PipelineInfo {
        &self.model.info
    }

    /// How each stage's memory grows beyond measured sizes (text encoder, VAE encoder, transformer, VAE decoder).
    pub fn growth(&self) -> [Growth; 4] {
        let e = &self.engines;
        [e.text_encoder.growth(), e.vae_encoder.growth(), e.transformer.growth(), e.vae_decoder.growth()]
    }

    /// Stage times of the last batch that completed.
    pub fn last_stages(&self) -> Option<StageTimes> {
        self.last_stages.clone()
    }

    /// Stage times of the last batch that completed, once (`None` again until the next one completes).
    pub fn take_stages(&mut self) -> Option<StageTimes> {
        self.last_stages.take()
    }

    /// What the engines did (graph captures, replays, ...) and the host loop's steps, shared with them.
    pub fn counters(&self) -> Arc<RunCounters> {
        self.engines.counters.clone()
    }

    /// Replaces the transformer with `wrap(transformer)`: instrumentation, and the emulated device
    /// loop of tests/device_loop.rs (which checks the GPU loop's program without a GPU).
    pub fn wrap_transformer(self, wrap: impl FnOnce(Box<dyn Engine>) -> Box<dyn Engine>) -> Pipeline {
        self.wrap_engine("transformer", wrap)
    }

    /// Replaces engine `component` with `wrap(engine)` (the emulated device of tests/device_loop.rs); the
    /// preprocessor taken after this stages pixels where the new engines read them.
    pub fn wrap_engine(self, component: &str, wrap: impl FnOnce(Box<dyn Engine>) -> Box<dyn Engine>) -> Pipeline {
        let Pipeline { model, engines, last_stages } = self;
        let Engines { mut text_encoder, mut transformer, mut vae_encoder, mut vae_decoder, counters } = engines;
        match component {
            "text_encoder" => text_encoder = wrap(text_encoder),
            "vae_encoder" => vae_encoder = wrap(vae_encoder),
            "vae_decoder" => vae_decoder = wrap(vae_decoder),
            _ => transformer = wrap(transformer),
        }
        let mut engines = Engines { text_encoder, transformer, vae_encoder, vae_decoder, counters };
        let mut model = (*model).clone();
        model.attach(&mut engines, model.staging.rows_per_block());
        Pipeline { model: Arc::new(model), engines, last_stages }
    }

    pub fn preprocessor(&self) -> Preprocessor {
        Preprocessor { model: self.model.clone() }
    }

    /// Runs jobs that share one batch key as one batch and returns their results in order. An
    /// engine failure fails every job of this batch (and nothing else).
    pub fn run_batch(&mut self, jobs: Vec<Prepared>) -> Vec<Result<EditOutput, EditError>> {
        let refs: Vec<&Prepared> = jobs.iter().collect();
        self.run_batch_with(&refs, &|_| true)
    }

    /// [`Pipeline::run_batch`] under `control`, which is asked at every [`Checkpoint`] (before each
    /// stage and each denoising step) whether to go on: `false` stops the batch there and every job
    /// gets [`EditError::Cancelled`]. The caller decides why (its clients left, their deadline
    /// passed); an observer that always says `true` can measure the stages (`pipeline::memory`).
    pub fn run_batch_with(
        &mut self,
        jobs: &[&Prepared],
        control: &dyn Fn(Checkpoint) -> bool,
    ) -> Vec<Result<EditOutput, EditError>> {
        let n = jobs.len();
        if n == 0 {
            return Vec::new();
        }
        let started = Instant::now();
        match self.run_checked(jobs, None, control) {
            Ok(images) => {
                tracing::debug!(batch = n, ms = started.elapsed().as_millis() as u64, "batch done");
                jobs.iter()
                    .zip(images)
                    .map(|(j, image)| {
                        Ok(EditOutput {
                            width: image.width(),
                            height: image.height(),
                            image,
                            seed: j.seed,
                            steps: j.key.steps,
                            true_cfg: j.key.true_cfg,
                            lightning: j.key.lightning,
                        })
                    })
                    .collect()
            }
            Err(EditError::Cancelled) => {
                tracing::info!(batch = n, ms = started.elapsed().as_millis() as u64, "batch stopped: nobody waits for it");
                (0..n).map(|_| Err(EditError::Cancelled)).collect()
            }
            Err(e) => {
                tracing::error!(batch = n, error = %e, "batch failed");
                (0..n).map(|_| Err(e.replicate())).collect()
            }
        }
    }

    /// [`Pipeline::run_batch`] that also returns the batch's intermediates (whole batch or error).
    pub fn run_batch_traced(&mut self, jobs: &[Prepared]) -> Result<(Vec<RgbImage>, Trace), EditError> {
        let mut trace = Trace::default();
        let refs: Vec<&Prepared> = jobs.iter().collect();
        let images = self.run_checked(&refs, Some(&mut trace), &|_| true)?;
        Ok((images, trace))
    }

    fn run_checked(
        &mut self,
        jobs: &[&Prepared],
        mut trace: Option<&mut Trace>,
        control: &dyn Fn(Checkpoint) -> bool,
    ) -> Result<Vec<RgbImage>, EditError> {
        if jobs.is_empty() {
            return Ok(Vec::new());
        }
        if let Some(bad) = jobs.iter().position(|j| j.key != jobs[0].key) {
            return Err(internal(format!("batch mixes incompatible jobs ({:?} vs {:?})", jobs[0].key, jobs[bad].key)));
        }
        let at = |c: Checkpoint| if control(c) { Ok(()) } else { Err(EditError::Cancelled) };
        let t0 = Instant::now();
        at(Checkpoint::TextEncoder)?;
        let text = self.encode_text(jobs, trace.as_deref_mut())?;
        let t1 = Instant::now();
        at(Checkpoint::VaeEncoder)?;
        let image_latents = self.encode_images(jobs, trace.as_deref_mut())?;
        let t2 = Instant::now();
        let marks = std::cell::RefCell::new(Vec::new());
        let timed = |c: Checkpoint| {
            if matches!(c, Checkpoint::Step(_)) {
                marks.borrow_mut().push(Instant::now());
            }
            control(c)
        };
        let x = self.denoise(jobs, text, &image_latents, trace.as_deref_mut(), &timed)?;
        let t3 = Instant::now();
        at(Checkpoint::VaeDecoder)?;
        let images = self.decode(jobs, x, trace)?;
        control(Checkpoint::Done);
        let mut marks = marks.into_inner();
        marks.push(t3);
        let steps = marks.windows(2).map(|w| w[1] - w[0]).collect();
        let (text, vae_encode, denoise, decode) = (t1 - t0, t2 - t1, t3 - t2, t3.elapsed());
        let stages = StageTimes { batch: jobs.len(), text, vae_encode, denoise, steps, decode };
        tracing::debug!(?stages, "batch stages");
        self.last_stages = Some(stages);
        Ok(images)
    }

    /// Text encoder: the prompt rows of every job, then their negative rows; each job's images are
    /// encoded once and shared by its rows. The rows were tokenized when the jobs were prepared.
    fn encode_text(&mut self, jobs: &[&Prepared], mut trace: Option<&mut Trace>) -> Result<TextEmbeds, EditError> {
        let m = self.model.clone();
        let mut vl_rows: Vec<&StagedRow> = Vec::new();
        let mut grids = Vec::new();
        let mut slots: Vec<Vec<usize>> = Vec::with_capacity(jobs.len());
        for j in jobs {
            let start = vl_rows.len();
            vl_rows.extend(j.vl.iter().map(|(_, row)| row));
            grids.extend(j.vl.iter().map(|(g, _)| *g));
            slots.push((start..vl_rows.len()).collect());
        }
        let cfg = jobs[0].key.true_cfg;
        let mut rows: Vec<PromptRow<'_>> = Vec::new();
        let mut ids: Vec<&[u32]> = Vec::new();
        for pass in 0..if cfg { 2 } else { 1 } {
            for (j, s) in jobs.iter().zip(&slots) {
                let tokens = j.tokens.get(pass).ok_or_else(|| internal("a true-CFG job without its negative row"))?;
                rows.push(PromptRow { text: "", images: s });
                ids.push(tokens);
            }
        }
        let text = m.prompt.assemble(&rows, &ids, &grids, m.text_bucket)?;
        if text.seq - text.drop_tokens != jobs[0].key.text_len {
            return Err(internal(format!("batch text length {} != key's {}", text.seq - text.drop_tokens, jobs[0].key.text_len)));
        }
        if let Some(t) = trace.as_deref_mut() {
            let dims = IxDyn(&[text.batch, text.seq]);
            t.input_ids = Some(ArrayD::from_shape_vec(dims.clone(), text.input_ids.clone()).map_err(internal)?);
            t.attention_mask = Some(ArrayD::from_shape_vec(dims, text.attention_mask.clone()).map_err(internal)?);
            for (row, g) in vl_rows.iter().zip(&grids) {
                let shape = IxDyn(&[g.patches(), m.vision.patch_dim()]);
                t.pixel_values.push(ArrayD::from_shape_vec(shape, row.to_f32()).map_err(internal)?);
            }
        }
        let vision = VisionBatch::from_grids(&grids, &m.vision).map_err(internal)?;
        let pixel_shape = [vision.patches(), m.vision.patch_dim()];
        let index = prompt::text_encoder_index_inputs(&text, vision)?;
        let mut inputs: Vec<(&str, Input<'_>)> = index.iter().map(|(n, t)| (*n, Input::Host(t))).collect();
        inputs.push(("pixel_values", Input::Staged { shape: &pixel_shape, rows: &vl_rows }));
        let encoder = self.engines.text_encoder.as_mut();
        let Some(t) = trace else {
            // The hidden states stay where the encoder computed them; the transformer gathers its rows from there.
            let (_, kept) = encoder.run_keep(&inputs, "hidden_states")?;
            let (shape, copies, mask) = text.embed_copies(kept.shape.last().copied().unwrap_or(0));
            return Ok(TextEmbeds { embeds: Embeds::Kept { src: kept, shape, copies }, mask });
        };
        let hidden = run_one(encoder, &inputs, "hidden_states")?;
        let hidden = hidden.into_dimensionality::<Ix3>().map_err(internal)?;
        let (embeds, mask) = text.prompt_embeds(hidden.view())?;
        t.prompt_embeds = Some(embeds.clone().into_dyn());
        t.prompt_mask = Some(mask.clone().into_dyn());
        Ok(TextEmbeds { embeds: Embeds::Host(Tensor::F32(embeds.into_dyn())), mask })
    }

    /// VAE encoder: the i-th condition image of every job has the same size (batch key), so each is
    /// one batched run; returns the packed, normalised condition latents [b, cond_seq, 64].
    fn encode_images(&mut self, jobs: &[&Prepared], trace: Option<&mut Trace>) -> Result<Array3<f32>, EditError> {
        let b = jobs.len();
        let mut parts = Vec::new();
        for (i, &(w, h)) in jobs[0].key.condition_sizes.iter().enumerate() {
            // Each job's row was written in the engine's dtype when it was prepared: stacked, not copied.
            let rows: Vec<&StagedRow> = jobs.iter().map(|j| &j.vae[i]).collect();
            let image = Input::Staged { shape: &[b, 3, h as usize, w as usize], rows: &rows };
            let lat = run_one(self.engines.vae_encoder.as_mut(), &[("image", image)], "latent")?;
            let mut lat = lat.into_dimensionality::<Ix4>().map_err(internal)?;
            self.model.stats.normalize(lat.view_mut()).map_err(internal)?;
            parts.push(latents::pack_latents(lat.view()).map_err(internal)?);
        }
        let views: Vec<_> = parts.iter().map(|c| c.view()).collect();
        let image_latents = ndarray::concatenate(Axis(1), &views).map_err(internal)?;
        if let Some(t) = trace {
            t.image_latents = Some(image_latents.clone().into_dyn());
        }
        Ok(image_latents)
    }

    /// Denoising loop: each step runs the transformer, then runtime::step's CFG + Euler update (which
    /// also rewrites the latent rows of hidden_states). An engine that keeps the loop on its device
    /// (TensorRT) runs all of it there; otherwise it steps here. Traces need every step's latents, so
    /// they always step here. Returns the final packed latents [b, seq, 64].
    fn denoise(
        &mut self,
        jobs: &[&Prepared],
        text: TextEmbeds,
        image_latents: &Array3<f32>,
        mut trace: Option<&mut Trace>,
        control: &dyn Fn(Checkpoint) -> bool,
    ) -> Result<Array3<f32>, EditError> {
        let b = jobs.len();
        let cfg = jobs[0].key.true_cfg;
        let noise: Vec<_> = jobs.iter().map(|j| j.noise.view()).collect();
        let mut x = ndarray::concatenate(Axis(0), &noise).map_err(internal)?; // [b, seq, 64], standard layout
        let (seq, ch) = (x.shape()[1], x.shape()[2]);
        let img_seq = seq + image_latents.shape()[1];
        let schedule = &jobs[0].schedule;
        if let Some(t) = trace.as_deref_mut() {
            t.noise = Some(x.clone().into_dyn());
            t.sigmas = schedule.sigmas.clone();
        }
        let shape = StepShape { batch: b, seq, img_seq, channels: ch, cfg };
        let rows = shape.rows();
        let mut hs = Array3::<f32>::zeros((rows, img_seq, ch));
        for r in 0..rows {
            let j = r % b; // with CFG, row b + j is job j's negative row
            hs.slice_mut(s![r, ..seq, ..]).assign(&x.slice(s![j, .., ..]));
            hs.slice_mut(s![r, seq.., ..]).assign(&image_latents.slice(s![j, .., ..]));
        }
        let steps = schedule.steps();
        let timesteps = (0..steps).map(|i| schedule.model_timestep(i)).collect::<Result<Vec<f32>, _>>().map_err(internal)?;
        let dts = (0..steps).map(|i| schedule.dt(i)).collect::<Result<Vec<f32>, _>>().map_err(internal)?;
        let scales: Vec<f32> = jobs.iter().map(|j| j.true_cfg_scale).collect();
        let scales = cfg.then_some(&scales[..]);
        let tables = self.transformer_inputs(jobs, rows, seq, img_seq);
        let mask = Tensor::I64(text.mask.clone().into_dyn());
        let mut fixed: Vec<(&str, Input<'_>)> = tables.iter().map(|(n, t)| (*n, Input::Host(t))).collect();
        fixed.extend([("encoder_hidden_states", text.input()), ("encoder_hidden_states_mask", Input::Host(&mask))]);
        let xs = x.as_slice_mut().ok_or_else(|| internal("latents not contiguous"))?;
        let state = Tensor::F32(hs.into_dyn());
        let proceed = |k: usize| control(Checkpoint::Step(k));
        match (trace, self.engines.transformer.device_loop()) {
            (None, Some(device)) => {
                if !proceed(0) {
                    return Err(EditError::Cancelled);
                }
                let job = DenoiseLoop {
                    fixed: &fixed,
                    state_input: "hidden_states",
                    state: &state,
                    time_input: "timestep",
                    timesteps: &timesteps,
                    output: "sample",
                    latents: xs,
                    shape,
                    dts: &dts,
                    scales,
                    proceed: Some(&proceed),
                };
                let out = device.run_loop(&job)?;
                if out.len() != xs.len() {
                    return Err(internal(format!("the device loop returned {} latent values, expected {}", out.len(), xs.len())));
                }
                xs.copy_from_slice(&out);
            }
            (trace, _) => {
                let host = HostLoop { fixed: &fixed, shape, timesteps: &timesteps, dts: &dts, scales, proceed: &proceed };
                let done = host.run(self.engines.transformer.as_mut(), state, xs, trace);
                // A stopped or failed loop does not leave the hint on; what its last step kept goes back at the
                // end of the next run of any component (the arena is shared).
                self.engines.transformer.repeat_runs(false);
                done?;
                self.engines.counters.add(Counter::HostLoopSteps, steps as u64);
            }
        }
        Ok(x)
    }

    /// The transformer inputs that are the same at every step besides the text: the RoPE tables (computed
    /// when the jobs were prepared), and `modulate_index` for `zero_cond_t` models.
    fn transformer_inputs(&self, jobs: &[&Prepared], rows: usize, seq: usize, img_seq: usize) -> Vec<(&'static str, Tensor)> {
        let tables = &jobs[0].rope;
        let mut fixed = vec![
            ("img_cos", Tensor::F32(tables.img_cos.clone().into_dyn())),
            ("img_sin", Tensor::F32(tables.img_sin.clone().into_dyn())),
            ("txt_cos", Tensor::F32(tables.txt_cos.clone().into_dyn())),
            ("txt_sin", Tensor::F32(tables.txt_sin.clone().into_dyn())),
        ];
        if self.model.info.zero_cond_t {
            let mut m = Array2::<i64>::zeros((rows, img_seq));
            m.slice_mut(s![.., seq..]).fill(1);
            fixed.push(("modulate_index", Tensor::I64(m.into_dyn())));
        }
        fixed
    }

    /// VAE decoder, then the conversion of each job's image to 8-bit RGB.
    fn decode(&mut self, jobs: &[&Prepared], x: Array3<f32>, trace: Option<&mut Trace>) -> Result<Vec<RgbImage>, EditError> {
        let b = jobs.len();
        let sizes = &jobs[0].sizes;
        let (lh, lw) = sizes.latent_size();
        let mut lat: Array4<f32> = latents::unpack_latents(x.view(), lh, lw).map_err(internal)?;
        self.model.stats.denormalize(lat.view_mut()).map_err(internal)?;
        let decode_in = trace.as_ref().map(|_| lat.clone().into_dyn());
        let latent = Tensor::F32(lat.into_dyn());
        let decoded = run_one(self.engines.vae_decoder.as_mut(), &[("latent", Input::Host(&latent))], "image")?;
        if let Some(t) = trace {
            t.decode_in = decode_in;
            t.decoded = Some(decoded.clone());
        }
        let (w, h) = sizes.output;
        let want = IxDyn(&[b, 3, h as usize, w as usize]);
        if decoded.raw_dim() != want {
            return Err(internal(format!(
                "vae_decoder returned {:?}, expected {:?}",
                decoded.shape(),
                [b, 3, h as usize, w as usize]
            )));
        }
        let decoded = decoded.as_standard_layout();
        let per = 3 * w as usize * h as usize;
        let flat = decoded.as_slice().ok_or_else(|| internal("decoded image not contiguous"))?;
        flat.chunks(per).map(|chw| imaging::postprocess(chw, w, h).map_err(internal)).collect()
    }
}

/// The denoising loop on the host: per step the transformer, then the shared CFG + Euler step.
struct HostLoop<'a> {
    fixed: &'a [(&'a str, Input<'a>)],
    shape: StepShape,
    timesteps: &'a [f32],
    dts: &'a [f32],
    scales: Option<&'a [f32]>,
    /// Asked before each step (its index); `false` stops the loop.
    proceed: &'a dyn Fn(usize) -> bool,
}

impl HostLoop<'_> {
    fn run(
        &self,
        transformer: &mut dyn Engine,
        state: Tensor,
        xs: &mut [f32],
        mut trace: Option<&mut Trace>,
    ) -> Result<(), EditError> {
        let rows = self.shape.rows();
        let mut hs = state;
        let steps = self.timesteps.len();
        for (k, (&t, &dt)) in self.timesteps.iter().zip(self.dts).enumerate() {
            if !(self.proceed)(k) {
                return Err(EditError::Cancelled);
            }
            transformer.repeat_runs(k + 1 < steps);
            let t = Tensor::f32(&[rows], vec![t; rows]);
            let mut inputs = self.fixed.to_vec();
            inputs.extend([("hidden_states", Input::Host(&hs)), ("timestep", Input::Host(&t))]);
            let velocity =
                transformer.run_inputs(&inputs)?.take("sample").ok_or_else(|| internal("transformer returned no `sample`"))?;
            let velocity = velocity.into_f32().map_err(internal)?;
            let velocity = velocity.as_standard_layout();
            let v = velocity.as_slice().ok_or_else(|| internal("velocity not contiguous"))?;
            let Tensor::F32(h) = &mut hs else { return Err(internal("hidden states are not float32")) };
            let h = h.as_slice_mut().ok_or_else(|| internal("hidden states not contiguous"))?;
            step::cfg_euler(self.shape, v, xs, Some(h), self.scales, dt)?;
            if let Some(t) = trace.as_deref_mut() {
                let s = self.shape;
                t.latents.push(ArrayD::from_shape_vec(IxDyn(&[s.batch, s.seq, s.channels]), xs.to_vec()).map_err(internal)?);
            }
        }
        Ok(())
    }
}
