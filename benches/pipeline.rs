//! Criterion benches of the edit pipeline on the tiny bundle (CPU backend): one edit at 256x256 with
//! 4 steps (the diffusers comparison of benches/edit_vs_diffusers.py), and throughput per batch size.

use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use qwen_edit::imaging::{self, Limits};
use qwen_edit::pipeline::edit::{EditRequest, Pipeline, PipelineOptions};
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

criterion_group!(pipeline_benches, benches);
criterion_main!(pipeline_benches);
