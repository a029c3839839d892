//! Criterion benches of the edit pipeline on the tiny bundle (CPU backend): one edit at 256x256 with
//! 4 steps (the diffusers comparison of benches/edit_vs_diffusers.py), and throughput per batch size;
//! then a table of where the time of a batch goes, per stage and batch size (target/bench-tables/stages.md).

use criterion::{criterion_group, BatchSize, Criterion, Throughput};
use qwen_edit::imaging::{self, Limits};
use qwen_edit::pipeline::{EditRequest, Pipeline, PipelineOptions};
use std::fmt::Write as _;
use std::path::PathBuf;
use std::time::Duration;

fn bundle() -> PathBuf {
    std::env::var_os("QWEN_EDIT_BENCH_BUNDLE")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("engines/tiny"))
}

fn request(seed: u64, size: u32, steps: u32) -> EditRequest {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("engines/tiny/reference/images/square.png");
    let image = imaging::decode(&std::fs::read(path).unwrap(), &Limits::default()).unwrap();
    let image = imaging::resize(&image, size, size, imaging::Filter::Lanczos).unwrap();
    EditRequest {
        images: vec![image],
        prompt: format!("make the sky blue, variant {seed}"),
        negative_prompt: None,
        num_inference_steps: steps,
        true_cfg_scale: 1.0,
        seed,
        width: Some(size),
        height: Some(size),
        lightning: false,
        noise: None,
    }
}

fn benches(c: &mut Criterion) {
    let backend = std::env::var("QWEN_EDIT_BACKEND").unwrap_or_else(|_| "ort".into());
    let opts = PipelineOptions { backend: backend.parse().unwrap(), ..Default::default() };
    let mut pipeline = Pipeline::open(&bundle(), &opts).expect("open the bundle (run scripts/setup.sh first)");
    let pre = pipeline.preprocessor();

    let mut g = c.benchmark_group("edit");
    g.sample_size(20).measurement_time(Duration::from_secs(10));
    g.bench_function("256x256_4steps", |b| {
        b.iter(|| {
            let job = pre.prepare(request(1, 256, 4)).unwrap();
            pipeline.run_batch(vec![job]).pop().unwrap().unwrap()
        })
    });
    g.finish();

    let mut g = c.benchmark_group("batch");
    g.sample_size(10).measurement_time(Duration::from_secs(10));
    for n in [1usize, 2, 4, 8] {
        g.throughput(Throughput::Elements(n as u64));
        g.bench_function(format!("size_{n}"), |b| {
            b.iter_batched(
                || (0..n).map(|i| request(i as u64, 256, 4)).collect::<Vec<_>>(),
                |reqs| {
                    let jobs = reqs.into_iter().map(|r| pre.prepare(r).unwrap()).collect();
                    pipeline.run_batch(jobs)
                },
                BatchSize::SmallInput,
            )
        });
    }
    g.finish();
}

/// Median stage times per image of `runs` batches of each size (after one warm-up batch).
fn stage_table(runs: usize) -> String {
    let mut pipeline = Pipeline::open(&bundle(), &PipelineOptions::default()).expect("open the bundle");
    let pre = pipeline.preprocessor();
    let mut table = String::from(
        "| batch size | text encoder | VAE encoder | denoise (4 steps) | VAE decoder | total per image |\n\
         | ---: | ---: | ---: | ---: | ---: | ---: |\n",
    );
    for n in [1usize, 2, 4, 8] {
        let mut samples: Vec<[f64; 4]> = Vec::new();
        for run in 0..=runs {
            let jobs = (0..n).map(|i| pre.prepare(request((run * n + i) as u64, 256, 4)).unwrap()).collect();
            assert!(pipeline.run_batch(jobs).iter().all(Result::is_ok));
            let s = pipeline.last_stages().expect("stage times of the batch");
            assert_eq!(s.batch, n);
            if run > 0 {
                let per = |d: Duration| d.as_secs_f64() * 1e3 / n as f64;
                samples.push([per(s.text), per(s.vae_encode), per(s.denoise), per(s.decode)]);
            }
        }
        let median = |k: usize| {
            let mut v: Vec<f64> = samples.iter().map(|s| s[k]).collect();
            v.sort_by(f64::total_cmp);
            v[v.len() / 2]
        };
        let m = [median(0), median(1), median(2), median(3)];
        writeln!(table, "| {n} | {:.1} | {:.1} | {:.1} | {:.1} | {:.1} |", m[0], m[1], m[2], m[3], m.iter().sum::<f64>())
            .unwrap();
    }
    table
}

criterion_group!(pipeline_benches, benches);

fn main() {
    pipeline_benches();
    Criterion::default().configure_from_args().final_summary();
    let bench = std::env::args().any(|a| a == "--bench");
    let runs = if bench { 10 } else { 1 };
    let table = stage_table(runs);
    println!("\nMilliseconds per image by stage (median of {runs} batches per size):\n\n{table}");
    if bench {
        let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/bench-tables");
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("stages.md"), table).unwrap();
    }
}
