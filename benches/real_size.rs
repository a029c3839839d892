//! One edit at a real resolution on the CPU backend, stage by stage, with the process's peak memory:
//! the qwen-edit half of benches/real_size_vs_diffusers.py (which runs it once per size, each in a
//! fresh process, and prints the table against diffusers).
//!
//! `cargo bench --bench real_size -- --bundle DIR --size 1024 [--runs 3] [--threads 2] [--json OUT]`:
//! one warm-up edit, then `--runs` timed edits of a `size`x`size` picture to a `size`x`size` output,
//! 2 steps, no true CFG. Prints (and writes to `--json`) the median stage times in seconds, the peak
//! resident memory of the process (VmHWM), the largest growth of resident memory during one
//! transformer call (the attention's share: the high-water mark is reset before each call), and the
//! user and system CPU seconds of the process.
//!
//! `cargo bench --bench real_size -- --bundle DIR --transformer-tokens N`: the transformer alone, one call
//! with N image tokens (and 64 text tokens) after a warm-up call at 64, in this fresh process; prints the
//! growth of resident memory during the call over the resident memory before it, and its seconds. With
//! `QWEN_EDIT_PLAIN_GRAPH=1` the graph runs as exported (attentions as MatMul, Softmax, MatMul; no fused RMSNorm,
//! GELU or RoPE) instead of rewritten (runtime::attention, runtime::fuse).

use qwen_edit::builder::random_inputs;
use qwen_edit::bundle::Bundle;
use qwen_edit::imaging::{self, Limits};
use qwen_edit::pipeline::{EditRequest, Pipeline, PipelineOptions};
use qwen_edit::runtime::ort::{OrtBackend, OrtSettings};
use qwen_edit::runtime::{Dim, Engine, Error, Outputs, Tensor, TensorInfo};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

/// `VmHWM` or `VmRSS` of this process, in bytes.
fn status_bytes(key: &str) -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find(|l| l.starts_with(key))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|kb| kb.parse::<u64>().ok())
        .map_or(0, |kb| kb * 1024)
}

/// The process's peak resident memory before the last reset of the kernel's high-water mark.
static PEAK: AtomicU64 = AtomicU64::new(0);

/// Resets the kernel's resident high-water mark to the current resident size (Linux >= 4.0), after
/// keeping the mark so far in [`PEAK`].
fn reset_peak() {
    PEAK.fetch_max(status_bytes("VmHWM:"), Ordering::Relaxed);
    let _ = std::fs::write("/proc/self/clear_refs", "5");
}

/// The peak resident memory of the whole process so far.
fn process_peak() -> u64 {
    PEAK.load(Ordering::Relaxed).max(status_bytes("VmHWM:"))
}

/// User and system CPU seconds of this process (`/proc/self/stat` fields 14 and 15, in clock ticks).
fn cpu_seconds() -> (f64, f64) {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let after = stat.rsplit(')').next().unwrap_or("");
    let f: Vec<f64> = after.split_whitespace().map(|v| v.parse().unwrap_or(0.0)).collect();
    let tick = 100.0; // USER_HZ, the unit of /proc/<pid>/stat times on Linux

    (f.get(11).copied().unwrap_or(0.0) / tick, f.get(12).copied().unwrap_or(0.0) / tick)
}

/// The transformer, measuring the resident-memory growth of each call.
struct Measured {
    inner: Box<dyn Engine>,
    growth: Arc<Mutex<u64>>,
}

impl Engine for Measured {
    fn component(&self) -> &str {
        self.inner.component()
    }
    fn inputs(&self) -> &[TensorInfo] {
        self.inner.inputs()
    }
    fn outputs(&self) -> &[TensorInfo] {
        self.inner.outputs()
    }
    fn repeat_runs(&mut self, repeat: bool) {
        self.inner.repeat_runs(repeat);
    }
    fn run(&mut self, inputs: &[(&str, &Tensor)]) -> Result<Outputs, Error> {
        reset_peak();
        let before = status_bytes("VmRSS:");
        let out = self.inner.run(inputs);
        let grew = status_bytes("VmHWM:").saturating_sub(before);
        let mut g = self.growth.lock().unwrap();
        *g = (*g).max(grew);
        out
    }
}

fn arg(name: &str) -> Option<String> {
    let args: Vec<String> = std::env::args().collect();
    args.iter().position(|a| a == name).and_then(|i| args.get(i + 1).cloned())
}

/// One transformer call with `tokens` image tokens, alone in this process (see the module docs).
fn transformer_only(bundle: &Path, tokens: usize, ort: OrtSettings) -> serde_json::Value {
    let path = Bundle::open(bundle).expect("open the bundle").onnx_path("transformer").expect("a transformer");
    let plain = ort.plain_graph;
    let mut engine = OrtBackend::new(ort).expect("ONNX Runtime").load("transformer", &path).expect("load the transformer");
    let infos = engine.inputs().to_vec();
    let inputs = |img: usize| {
        let dim = |d: &Dim| match d {
            Dim::Fixed(n) => *n,
            Dim::Dynamic(s) if s == "img_seq" => img,
            Dim::Dynamic(s) if s == "txt_seq" => 64,
            Dim::Dynamic(_) => 1,
        };
        let shapes: Vec<Vec<usize>> = infos.iter().map(|i| i.shape.iter().map(dim).collect()).collect();
        random_inputs(&infos, &shapes, 1).expect("inputs")
    };
    let call = |engine: &mut dyn Engine, inputs: &[(String, Tensor)]| {
        let named: Vec<(&str, &Tensor)> = inputs.iter().map(|(n, t)| (n.as_str(), t)).collect();
        engine.run(&named).expect("the transformer runs");
    };
    call(&mut engine, &inputs(64));
    let measured = inputs(tokens);
    reset_peak();
    let before = status_bytes("VmRSS:");
    let t = Instant::now();
    call(&mut engine, &measured);
    let seconds = t.elapsed().as_secs_f64();
    let growth = status_bytes("VmHWM:").saturating_sub(before);
    serde_json::json!({"image_tokens": tokens, "plain_graph": plain, "growth_bytes": growth, "seconds": seconds})
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let Some(bundle) = arg("--bundle").map(PathBuf::from) else {
        eprintln!("real_size: give --bundle DIR (benches/real_size_vs_diffusers.py exports one); nothing to do");
        return;
    };
    let size: u32 = arg("--size").map_or(1024, |s| s.parse().expect("--size"));
    let runs: usize = arg("--runs").map_or(3, |s| s.parse().expect("--runs"));
    let threads: usize = arg("--threads").map_or(2, |s| s.parse().expect("--threads"));
    let plain = std::env::var("QWEN_EDIT_PLAIN_GRAPH").is_ok_and(|v| v == "1");
    let ort = OrtSettings { intra_threads: Some(threads), plain_graph: plain, ..Default::default() };
    if let Some(tokens) = arg("--transformer-tokens") {
        return emit(&transformer_only(&bundle, tokens.parse().expect("--transformer-tokens"), ort));
    }
    let opts = PipelineOptions { backend: "ort".parse().unwrap(), ort, ..Default::default() };
    let growth = Arc::new(Mutex::new(0u64));
    let g = growth.clone();
    let mut pipeline = Pipeline::open(&bundle, &opts)
        .expect("open the bundle")
        .wrap_transformer(move |inner| Box::new(Measured { inner, growth: g }));
    let pre = pipeline.preprocessor();
    let source = std::fs::read(root.join("engines/tiny/reference/images/square.png")).unwrap();
    let image = imaging::decode(&source, &Limits::default()).unwrap();
    let image = imaging::resize(&image, size, size, imaging::Filter::Lanczos).unwrap();
    let request = |seed| EditRequest {
        images: vec![image.clone()],
        prompt: "make the sky blue".into(),
        negative_prompt: None,
        num_inference_steps: 2,
        true_cfg_scale: 1.0,
        seed,
        width: Some(size),
        height: Some(size),
        lightning: false,
        noise: None,
    };
    let mut samples: Vec<[f64; 5]> = Vec::new();
    for run in 0..=runs {
        let t = Instant::now();
        let job = pre.prepare(request(run as u64)).expect("prepare");
        let out = pipeline.run_batch(vec![job]).pop().unwrap().expect("edit");
        let whole = t.elapsed().as_secs_f64();
        assert_eq!((out.width, out.height), (size, size));
        let s = pipeline.last_stages().expect("stage times");
        if run > 0 {
            let secs = |d: std::time::Duration| d.as_secs_f64();
            samples.push([secs(s.text), secs(s.vae_encode), secs(s.denoise), secs(s.decode), whole]);
        }
    }
    let m = |k: usize| median(samples.iter().map(|s| s[k]).collect());
    let (user, sys) = cpu_seconds();
    let json = serde_json::json!({
        "size": size,
        "runs": runs,
        "threads": threads,
        "plain_graph": plain,
        "text_encoder_s": m(0),
        "vae_encode_s": m(1),
        "transformer_s": m(2),
        "vae_decode_s": m(3),
        "edit_s": m(4),
        "peak_rss_bytes": process_peak(),
        "transformer_growth_bytes": *growth.lock().unwrap(),
        "user_s": user,
        "sys_s": sys,
    });
    emit(&json);
}

/// Prints `json`, and writes it to `--json` if given.
fn emit(json: &serde_json::Value) {
    println!("{json}");
    if let Some(out) = arg("--json") {
        std::fs::write(out, json.to_string()).expect("write --json");
    }
}
