//! Preparing a job on any thread, before it is queued: sizes, resized images, VL patches, VAE input,
//! tokens, schedule, RoPE tables and noise, each computed once; a bad request is refused here.

use std::sync::Arc;

use image::RgbImage;
use ndarray::Array3;

use super::job::{internal, invalid, BatchKey, EditError, EditRequest};
use super::latents::{self, EditSizes};
use super::model::{Model, PipelineInfo};
use super::prompt::PromptRow;
use super::rope::RopeTables;
use super::schedule::Schedule;
use super::vision::{self, ImageGrid};
use crate::imaging::{self, Filter};
use crate::runtime::staging::RowMut;
use crate::runtime::StagedRow;

/// A request after all per-job CPU work. Everything the engine worker needs that depends only on
/// this job is here; the batch only stacks it.
pub struct Prepared {
    pub(crate) key: BatchKey,
    pub(crate) seed: u64,
    pub(crate) true_cfg_scale: f32,
    pub(crate) sizes: EditSizes,
    /// Per input image: the VL processor's patches ([patches, patch_dim]) in a staging row, in the text
    /// encoder's dtype, and their grid.
    pub(crate) vl: Vec<(ImageGrid, StagedRow)>,
    /// Per input image: the VAE input, CHW in [-1, 1], at `sizes.vae[i]`, in a staging row in the VAE encoder's dtype.
    pub(crate) vae: Vec<StagedRow>,
    /// Token ids of the prompt row, then of the negative row when true CFG runs.
    pub(crate) tokens: Vec<Vec<u32>>,
    /// The job's schedule (equal for every job of a batch: same steps, size and schedule type).
    pub(crate) schedule: Schedule,
    /// RoPE tables for the key's sizes and text length (equal for every job of a batch).
    pub(crate) rope: Arc<RopeTables>,
    /// Packed initial noise [1, seq, 64].
    pub(crate) noise: Array3<f32>,
}

impl Prepared {
    pub fn key(&self) -> &BatchKey {
        &self.key
    }

    pub fn seed(&self) -> u64 {
        self.seed
    }
}

impl std::fmt::Debug for Prepared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Prepared").field("key", &self.key).field("seed", &self.seed).finish_non_exhaustive()
    }
}

/// The CPU half: turns requests into prepared jobs. Cheap to clone; use from any thread.
#[derive(Clone)]
pub struct Preprocessor {
    pub(crate) model: Arc<Model>,
}

impl Preprocessor {
    pub fn info(&self) -> &PipelineInfo {
        &self.model.info
    }

    /// Validates `req` and does its CPU work. Errors are the client's (`is_client_error`) unless
    /// something inside the pipeline is broken.
    pub fn prepare(&self, mut req: EditRequest) -> Result<Prepared, EditError> {
        let m = &*self.model;
        check_request(&req, &m.info)?;
        let dims: Vec<(u32, u32)> = req.images.iter().map(|i| i.dimensions()).collect();
        let sizes = latents::edit_sizes(&dims, (req.width, req.height), m.info.image_area, m.condition_area).map_err(invalid)?;
        // The schedule must be valid for this request (e.g. 1 step with a terminal stretch is not).
        let schedule = Schedule::new(m.scheduler(req.lightning), req.num_inference_steps as usize, sizes.image_seq_len())
            .map_err(invalid)?;
        // RoPE positions must fit the reference's table (checked before the images are resized).
        m.rope.check(&sizes.img_shapes, 1).map_err(invalid)?;
        let (vl, vae) = resize_images(&req.images, &sizes, m)?;

        let true_cfg = req.true_cfg_scale > 1.0 && req.negative_prompt.is_some();
        // Tokenize now, once: a prompt that is too long (or holds reserved tokens) is refused before queueing.
        let slots: Vec<usize> = (0..req.images.len()).collect();
        let grids: Vec<_> = vl.iter().map(|v| v.0).collect();
        let mut rows = vec![PromptRow { text: &req.prompt, images: &slots }];
        if true_cfg {
            rows.push(PromptRow { text: req.negative_prompt.as_deref().unwrap_or(""), images: &slots });
        }
        let tokens =
            rows.iter().enumerate().map(|(r, row)| m.prompt.tokenize_row(r, *row, &grids)).collect::<Result<Vec<_>, _>>()?;
        let text_len = m.prompt.kept_len(&tokens, m.text_bucket)?;
        let rope = Arc::new(m.rope.tables(&sizes.img_shapes, text_len).map_err(invalid)?);
        let noise = initial_noise(req.noise.take(), req.seed, &sizes, m)?;
        let key = BatchKey {
            width: sizes.output.0,
            height: sizes.output.1,
            condition_sizes: sizes.vae.clone(),
            steps: req.num_inference_steps,
            true_cfg,
            lightning: req.lightning,
            text_len,
        };
        Ok(Prepared { key, seed: req.seed, true_cfg_scale: req.true_cfg_scale, sizes, vl, vae, tokens, schedule, rope, noise })
    }
}

impl Preprocessor {
    /// The batch key a request will get, from its images' sizes alone (before any pixel is decoded)
    /// and the longest text the bundle accepts: the real key, known once the prompt is tokenized, is
    /// never longer. Admission sizes a job's memory with it; bad sizes are refused here already.
    pub fn provisional_key(
        &self,
        dims: &[(u32, u32)],
        output: (Option<u32>, Option<u32>),
        steps: u32,
        true_cfg: bool,
        lightning: bool,
    ) -> Result<BatchKey, EditError> {
        let m = &*self.model;
        let sizes = latents::edit_sizes(dims, output, m.info.image_area, m.condition_area).map_err(invalid)?;
        Ok(BatchKey {
            width: sizes.output.0,
            height: sizes.output.1,
            condition_sizes: sizes.vae,
            steps,
            true_cfg,
            lightning,
            text_len: m.info.max_text_tokens,
        })
    }

    /// An upper bound of the bytes a prepared job of `key` holds until its batch runs: VAE inputs
    /// (f32), VL patches (24 bytes per pixel of the VL copy: the VAE copy for Edit, the condition
    /// area for Plus, 10% for the processor's rounding, at most its `max_pixels`), noise, RoPE tables.
    pub fn prepared_bytes(&self, key: &BatchKey) -> u64 {
        let m = &*self.model;
        let px = |(w, h): (u32, u32)| u64::from(w) * u64::from(h);
        let vae: u64 = key.condition_sizes.iter().map(|&c| 12 * px(c)).sum();
        let vl: u64 = key
            .condition_sizes
            .iter()
            .map(|&c| 24 * (m.condition_area.unwrap_or(px(c)) * 11 / 10).min(m.vision.max_pixels))
            .sum();
        let tokens = (px((key.width, key.height)) + key.condition_sizes.iter().map(|&c| px(c)).sum::<u64>()) / 256;
        let seq = tokens + key.text_len as u64;
        vae + vl + tokens * 256 + seq * 1024 + (64 << 10)
    }
}

/// What can be refused from the request alone.
fn check_request(req: &EditRequest, info: &PipelineInfo) -> Result<(), EditError> {
    let n = req.images.len();
    if n == 0 {
        return Err(invalid("no input image"));
    }
    if n > info.max_images {
        return Err(invalid(if info.max_images == 1 {
            format!("this model ({}) edits one image per request, {n} were given", info.variant)
        } else {
            format!("at most {} input images per request, {n} were given", info.max_images)
        }));
    }
    if req.num_inference_steps == 0 {
        return Err(invalid("num_inference_steps must be at least 1"));
    }
    if !req.true_cfg_scale.is_finite() || req.true_cfg_scale < 0.0 {
        return Err(invalid(format!("true_cfg_scale must be a finite number >= 0, got {}", req.true_cfg_scale)));
    }
    Ok(())
}

/// Per input image: the VL processor's patches and the VAE input (Lanczos, like the reference), each written
/// once into a staging row in its engine's dtype (pinned memory on a GPU: the upload is then the only copy).
type Staged = (Vec<(ImageGrid, StagedRow)>, Vec<StagedRow>);

fn resize_images(images: &[RgbImage], sizes: &EditSizes, m: &Model) -> Result<Staged, EditError> {
    let plus = m.condition_area.is_some();
    let mut vl = Vec::with_capacity(images.len());
    let mut vae = Vec::with_capacity(images.len());
    for (i, image) in images.iter().enumerate() {
        let (vw, vh) = sizes.vae[i];
        let vae_img = lanczos(image, vw, vh)?;
        let vl_img = if plus { lanczos(image, sizes.vl[i].0, sizes.vl[i].1)? } else { vae_img.clone() };
        vl.push(vl_patches(&vl_img, m)?);
        let mut row = m.staging.row(m.vae_dtype, 3 * vw as usize * vh as usize)?;
        match row.write()? {
            RowMut::F32(out) => imaging::preprocess_into(&vae_img, out),
            RowMut::F16(out) => imaging::preprocess_into_f16(&vae_img, out),
            RowMut::BF16(out) => imaging::preprocess_into_bf16(&vae_img, out),
        }
        .map_err(internal)?;
        vae.push(row);
    }
    Ok((vl, vae))
}

/// The job's packed initial noise: the seed's (torch's CPU generator), or the request's own.
fn initial_noise(given: Option<Array3<f32>>, seed: u64, sizes: &EditSizes, m: &Model) -> Result<Array3<f32>, EditError> {
    let (lh, lw) = sizes.latent_size();
    match given {
        Some(noise) => {
            let want = [1, (lh / 2) * (lw / 2), 4 * m.z_dim];
            if noise.shape() != want {
                return Err(invalid(format!(
                    "initial latents have shape {:?}, this edit needs {want:?} (packed [1, seq, 64])",
                    noise.shape()
                )));
            }
            Ok(noise)
        }
        None => latents::initial_noise(seed, m.z_dim, lh, lw, m.kernels).map_err(internal),
    }
}

/// The VL processor's resize: smart_resize to multiples of 28, then the reference's resampling; the patches
/// go straight into a staging row in the text encoder's dtype.
fn vl_patches(image: &RgbImage, m: &Model) -> Result<(ImageGrid, StagedRow), EditError> {
    let s = &m.vision;
    let (w, h) = image.dimensions();
    let (tw, th) = vision::target_size(w, h, s).map_err(invalid)?;
    let resized;
    let img = if (tw, th) == (w, h) {
        image
    } else {
        resized = vision::resize(image, tw, th, s).map_err(internal)?;
        &resized
    };
    let grid = vision::patch_grid(img.as_raw(), tw, th, s).map_err(internal)?;
    let mut row = m.staging.row(m.vl_dtype, grid.patches() * s.patch_dim())?;
    let rgb = img.as_raw();
    match row.write()? {
        RowMut::F32(out) => vision::patchify_into(rgb, tw, th, s, out, |v| v),
        RowMut::F16(out) => vision::patchify_into(rgb, tw, th, s, out, half::f16::from_f32),
        RowMut::BF16(out) => vision::patchify_into(rgb, tw, th, s, out, half::bf16::from_f32),
    }
    .map_err(internal)?;
    Ok((grid, row))
}

fn lanczos(image: &RgbImage, w: u32, h: u32) -> Result<RgbImage, EditError> {
    if image.dimensions() == (w, h) {
        return Ok(image.clone());
    }
    imaging::resize(image, w, h, Filter::Lanczos).map_err(internal)
}
