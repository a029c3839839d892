//! The `edit` subcommand: edits images from the command line with a bundle, several
//! `--image`/`--prompt` pairs running as one batch; exit code 0 ok, 1 failure, 2 bad input.

use crate::bundle::PrecisionMode;
use crate::imaging::{self, Limits, OutputFormat};
use crate::pipeline::{EditError, EditRequest, Pipeline, PipelineOptions, Prepared};
use crate::runtime::backend::BackendRequest;
use crate::runtime::ort::OrtSettings;
use clap::Args;
use ndarray::Array3;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

/// Flags of `qwen-edit edit`.
#[derive(Args, Debug, Clone)]
pub struct EditArgs {
    /// Input image (JPEG, PNG, WebP). Repeat for a batch: the i-th image goes with the i-th prompt.
    /// Edit Plus bundles: several images of one job are separated by commas (`a.png,b.png`).
    #[arg(long = "image", required = true)]
    pub images: Vec<String>,
    /// Edit instruction. Repeat for a batch (one per --image).
    #[arg(long = "prompt", required = true)]
    pub prompts: Vec<String>,
    /// Output file (.png, .jpg or .webp). One per prompt, or one name that gets `_<i>` per job.
    #[arg(long = "out", required = true)]
    pub outs: Vec<PathBuf>,
    /// Negative prompt; true CFG runs when it is given and --true-cfg-scale > 1.
    #[arg(long)]
    pub negative_prompt: Option<String>,
    /// Seed of the initial noise (torch CPU generator compatible). Repeat for one per job.
    #[arg(long = "seed")]
    pub seeds: Vec<u64>,
    /// Denoising steps (default: the bundle's, or its Lightning steps with --lightning).
    #[arg(long)]
    pub steps: Option<u32>,
    /// True CFG scale (default: the bundle's).
    #[arg(long)]
    pub true_cfg_scale: Option<f32>,
    /// Use the Lightning schedule (constant shift 3).
    #[arg(long)]
    pub lightning: bool,
    /// Output width (default: from the input image, like the reference).
    #[arg(long)]
    pub width: Option<u32>,
    /// Output height (default: from the input image).
    #[arg(long)]
    pub height: Option<u32>,
    /// Model bundle directory.
    #[arg(long, env = "QWEN_EDIT_BUNDLE", default_value = "engines/tiny")]
    pub bundle: PathBuf,
    /// Initial packed noise [jobs or 1, seq, 64] as .npy (float32), instead of the seeds' noise.
    #[arg(long)]
    pub latents: Option<PathBuf>,
    /// Backend: auto, ort or tensorrt.
    #[arg(long, env = "QWEN_EDIT_BACKEND", default_value = "auto")]
    pub backend: BackendRequest,
    /// libonnxruntime.so to load (default: QWEN_EDIT_ORT_LIB, ORT_DYLIB_PATH or the project's .venv).
    #[arg(long, env = "QWEN_EDIT_ORT_LIB")]
    pub ort_lib: Option<PathBuf>,
    /// ONNX Runtime intra-op threads (default: all cores).
    #[arg(long)]
    pub threads: Option<usize>,
    /// Precision: auto (what the bundle has) or one it must have: fp32, fp16, bf16, fp8 (alias 8bit).
    #[arg(long, env = "PRECISION_MODE", default_value = "auto")]
    pub precision: PrecisionMode,
}

/// Why `edit` failed: bad input (exit 2) or a failure of the model (exit 1).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{0}")]
    Usage(String),
    #[error("{0}")]
    Failed(String),
}

impl Error {
    pub fn exit_code(&self) -> u8 {
        match self {
            Error::Usage(_) => 2,
            Error::Failed(_) => 1,
        }
    }
}

fn usage(msg: impl Into<String>) -> Error {
    Error::Usage(msg.into())
}

fn read_image(path: &str) -> Result<image::RgbImage, Error> {
    let bytes = std::fs::read(path).map_err(|e| usage(format!("cannot read image {path}: {e}")))?;
    imaging::decode(&bytes, &Limits::default()).map_err(|e| usage(format!("{path}: {e}")))
}

fn output_format(path: &Path) -> Result<OutputFormat, Error> {
    let ext = path.extension().and_then(|e| e.to_str()).unwrap_or("").to_ascii_lowercase();
    match ext.as_str() {
        "png" => Ok(OutputFormat::Png),
        "jpg" | "jpeg" => Ok(OutputFormat::Jpeg { quality: 95 }),
        "webp" => Ok(OutputFormat::Webp),
        _ => Err(usage(format!("{}: output must end in .png, .jpg or .webp", path.display()))),
    }
}

/// Output path of job `i` of `n`.
fn out_path(outs: &[PathBuf], i: usize, n: usize) -> PathBuf {
    if outs.len() == n {
        return outs[i].clone();
    }
    let base = &outs[0];
    let stem = base.file_stem().and_then(|s| s.to_str()).unwrap_or("out");
    let ext = base.extension().and_then(|s| s.to_str()).unwrap_or("png");
    base.with_file_name(format!("{stem}_{i}.{ext}"))
}

fn read_latents(path: &Path, jobs: usize) -> Result<Vec<Array3<f32>>, Error> {
    let arr: Array3<f32> = ndarray_npy::read_npy(path)
        .map_err(|e| usage(format!("{}: not a float32 .npy of shape [jobs, seq, 64]: {e}", path.display())))?;
    let n = arr.shape()[0];
    if n != jobs && n != 1 {
        return Err(usage(format!("{}: holds {n} latents for {jobs} jobs", path.display())));
    }
    Ok((0..jobs)
        .map(|i| arr.slice(ndarray::s![(if n == 1 { 0 } else { i })..=(if n == 1 { 0 } else { i }), .., ..]).to_owned())
        .collect())
}

/// Runs the command; prints what it wrote.
pub fn run(args: &EditArgs) -> Result<(), Error> {
    let n = args.prompts.len();
    if args.images.len() != n {
        return Err(usage(format!("{} --image for {n} --prompt: give one image (list) per prompt", args.images.len())));
    }
    if args.outs.len() != n && args.outs.len() != 1 {
        return Err(usage(format!("{} --out for {n} prompts: give one per prompt, or one name", args.outs.len())));
    }
    if args.seeds.len() > 1 && args.seeds.len() != n {
        return Err(usage(format!("{} --seed for {n} prompts: give one, or one per prompt", args.seeds.len())));
    }
    if args.steps == Some(0) {
        return Err(usage("--steps must be at least 1"));
    }
    let formats = (0..n).map(|i| output_format(&out_path(&args.outs, i, n))).collect::<Result<Vec<_>, _>>()?;
    let images = args
        .images
        .iter()
        .map(|list| list.split(',').map(read_image).collect::<Result<Vec<_>, _>>())
        .collect::<Result<Vec<_>, _>>()?;
    let noise = args.latents.as_deref().map(|p| read_latents(p, n)).transpose()?;

    let options = PipelineOptions {
        backend: args.backend,
        ort: OrtSettings { library: args.ort_lib.clone(), intra_threads: args.threads, ..Default::default() },
        precision: args.precision,
        ..Default::default()
    };
    let started = Instant::now();
    let mut pipeline = Pipeline::open(&args.bundle, &options).map_err(|e| match e {
        crate::pipeline::LoadError::Bundle(b) => usage(b.to_string()),
        other => Error::Failed(other.to_string()),
    })?;
    let info = pipeline.info().clone();
    eprintln!(
        "loaded {} ({}, {}) on {} in {:.1} s",
        info.bundle,
        info.variant,
        info.precision,
        info.backend,
        started.elapsed().as_secs_f32()
    );
    let pre = pipeline.preprocessor();
    let steps = args.steps.unwrap_or(if args.lightning { info.lightning_steps } else { info.default_steps });
    let cfg = args.true_cfg_scale.unwrap_or(info.default_true_cfg_scale);

    let mut prepared: Vec<(usize, Prepared)> = Vec::with_capacity(n);
    for (i, imgs) in images.into_iter().enumerate() {
        let seed = match args.seeds.len() {
            0 => rand::random::<u32>() as u64,
            1 => args.seeds[0],
            _ => args.seeds[i],
        };
        let req = EditRequest {
            images: imgs,
            prompt: args.prompts[i].clone(),
            negative_prompt: args.negative_prompt.clone(),
            num_inference_steps: steps,
            true_cfg_scale: cfg,
            seed,
            width: args.width,
            height: args.height,
            lightning: args.lightning,
            noise: noise.as_ref().map(|v| v[i].clone()),
        };
        let p = pre.prepare(req).map_err(|e| edit_error(i, e))?;
        prepared.push((i, p));
    }
    // Jobs that can share a batch run together; the rest in their own batches.
    let mut groups: BTreeMap<String, Vec<(usize, Prepared)>> = BTreeMap::new();
    for (i, p) in prepared {
        groups.entry(format!("{:?}", p.key())).or_default().push((i, p));
    }
    for (_, group) in groups {
        let (idx, jobs): (Vec<usize>, Vec<Prepared>) = group.into_iter().unzip();
        let t = Instant::now();
        let size = jobs.len();
        let results = pipeline.run_batch(jobs);
        let total = t.elapsed().as_secs_f32();
        match pipeline.last_stages() {
            Some(st) => eprintln!(
                "batch of {size} in {total:.2} s (text encoder {:.2} s, vae encode {:.2} s, denoise {:.2} s, decode {:.2} s)",
                st.text.as_secs_f32(),
                st.vae_encode.as_secs_f32(),
                st.denoise.as_secs_f32(),
                st.decode.as_secs_f32()
            ),
            None => eprintln!("batch of {size} in {total:.2} s"),
        }
        for (i, r) in idx.into_iter().zip(results) {
            let out = r.map_err(|e| edit_error(i, e))?;
            let path = out_path(&args.outs, i, n);
            let bytes = imaging::encode(&out.image, formats[i]).map_err(|e| Error::Failed(e.to_string()))?;
            std::fs::write(&path, bytes).map_err(|e| usage(format!("cannot write {}: {e}", path.display())))?;
            println!("{} {}x{} seed {} steps {}", path.display(), out.width, out.height, out.seed, out.steps);
        }
    }
    Ok(())
}

fn edit_error(job: usize, e: EditError) -> Error {
    if e.is_client_error() {
        usage(format!("job {job}: {e}"))
    } else {
        Error::Failed(format!("job {job}: {e}"))
    }
}

/// Entry point of the subcommand: runs and maps errors to exit codes.
pub fn main_edit(args: &EditArgs) -> u8 {
    match run(args) {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("error: {e}");
            e.exit_code()
        }
    }
}
