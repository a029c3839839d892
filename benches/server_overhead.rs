//! Server overhead per request for a 1024x1024 JPEG, model time excluded: every CPU step the server
//! does around the engines, stage by stage and in total (README "Server overhead" has the table).
//!
//! Stages (the Qwen-Image-Edit path of a real bundle, `image_area` 1024*1024):
//! parse the request JSON -> base64-decode the image -> JPEG decode (libjpeg-turbo) -> VL processor
//! (smart_resize to multiples of 28: bicubic 1024 -> 1036, rescale/normalize, patchify) -> VAE input
//! (1024x1024 to CHW half floats in [-1, 1]) -> PNG-encode the 1024x1024 result -> base64 -> response JSON.
//! One more row: the Lanczos 1024 -> 384x384 copy that Edit Plus feeds its VL encoder.
//! Group `io_1024`: preprocessing of a JPEG and a PNG upload, and response encoding (PNG/JPEG + base64).
//! Run: `cargo bench --bench server_overhead`.

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, Criterion};
use half::f16;
use qwen_edit::imaging::{self, Filter, OutputFormat, RgbImage};
use qwen_edit::pipeline::vision::{self, Vision};
use qwen_edit::service::images::{decode_base64, encode_base64};
use qwen_edit::service::schema::{self, EditResponse, Limits, Timings};

/// A photo-like 1024x1024 picture: smooth shapes plus deterministic noise, so JPEG and PNG sizes are
/// realistic (a flat gradient would compress unrealistically well).
fn picture() -> RgbImage {
    let mut state = 0x2545_f491_4f6c_dd1du64;
    RgbImage::from_fn(1024, 1024, |x, y| {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        let n = (state % 24) as i32 - 12;
        let (fx, fy) = (x as f32 / 1024.0, y as f32 / 1024.0);
        let r = 128.0 + 100.0 * (fx * 9.0).sin() * (fy * 5.0).cos();
        let g = 120.0 + 90.0 * ((fx + fy) * 7.0).sin();
        let b = 110.0 + 80.0 * (fy * 11.0).cos();
        let c = |v: f32| (v as i32 + n).clamp(0, 255) as u8;
        image::Rgb([c(r), c(g), c(b)])
    })
}

fn limits() -> Limits {
    Limits {
        default_steps: 50,
        default_true_cfg_scale: 4.0,
        max_images: 1,
        max_prompt_chars: 4096,
        max_output_side: 2048,
        max_steps: 100,
    }
}

struct Fixture {
    body: Vec<u8>,
    b64: String,
    jpeg: Vec<u8>,
    image: RgbImage,
    result: RgbImage,
    png: Vec<u8>,
    png_b64: String,
}

fn fixture() -> Fixture {
    let image = picture();
    let jpeg = imaging::encode(&image, OutputFormat::Jpeg { quality: 90 }).unwrap();
    let b64 = encode_base64(&jpeg);
    let body = serde_json::json!({"input": {"prompt": "Change the sky to a sunset, keep everything else", "image_base64": b64,
                                            "num_inference_steps": 8, "seed": 42}})
    .to_string()
    .into_bytes();
    let result = imaging::decode(&jpeg, &imaging::Limits::default()).unwrap();
    let png = imaging::encode(&result, OutputFormat::Png).unwrap();
    let png_b64 = encode_base64(&png);
    eprintln!("1024x1024 JPEG {} bytes, request body {} bytes, result PNG {} bytes", jpeg.len(), body.len(), png.len());
    Fixture { body, b64, jpeg, image, result, png, png_b64 }
}

fn response(image: String) -> Vec<u8> {
    let r = EditResponse {
        image,
        prompt: "Change the sky to a sunset, keep everything else".into(),
        num_inference_steps: 8,
        lightning_enabled: true,
        seed: 42,
        width: 1024,
        height: 1024,
        true_cfg_scale: 4.0,
        output_format: "png",
        timings: Timings { preprocess_ms: 1.0, queue_ms: 1.0, compute_ms: 1.0, encode_ms: 1.0, batch_size: 1 },
    };
    r.to_json()
}

/// Everything but the model, in request order.
fn whole_request(f: &Fixture, vl: &Vision, vae: &mut [f16]) -> usize {
    let params = schema::parse(&f.body, &limits(), || 0).unwrap();
    let schema::ImageSource::Base64(s) = &params.images[0] else { unreachable!() };
    let bytes = decode_base64(s).unwrap();
    let img = imaging::decode(&bytes, &imaging::Limits::default()).unwrap();
    let patches = vision::preprocess(&img, vl).unwrap();
    imaging::preprocess_into_f16(&img, vae).unwrap();
    // (the model would run here; its output image is `img` again)
    let png = imaging::encode(&img, OutputFormat::Png).unwrap();
    let body = response(encode_base64(&png));
    body.len() + patches.pixel_values.len()
}

fn bench(c: &mut Criterion) {
    let f = fixture();
    let vl = Vision::qwen_image_edit();
    let mut vae = vec![f16::ZERO; 3 * 1024 * 1024];
    let mut g = c.benchmark_group("server_overhead_1024_jpeg");
    g.sample_size(20);
    g.bench_function("parse_request_json", |b| b.iter(|| schema::parse(black_box(&f.body), &limits(), || 0).unwrap()));
    g.bench_function("base64_decode", |b| b.iter(|| decode_base64(black_box(&f.b64)).unwrap()));
    g.bench_function("jpeg_decode", |b| b.iter(|| imaging::decode(black_box(&f.jpeg), &imaging::Limits::default()).unwrap()));
    g.bench_function("vl_preprocess_resize_normalize_patchify", |b| {
        b.iter(|| vision::preprocess(black_box(&f.image), &vl).unwrap())
    });
    g.bench_function("vae_normalize_f16", |b| b.iter(|| imaging::preprocess_into_f16(black_box(&f.image), &mut vae).unwrap()));
    g.bench_function("resize_lanczos_to_384_edit_plus", |b| {
        b.iter(|| imaging::resize(black_box(&f.image), 384, 384, Filter::Lanczos).unwrap())
    });
    g.bench_function("png_encode", |b| b.iter(|| imaging::encode(black_box(&f.result), OutputFormat::Png).unwrap()));
    g.bench_function("base64_encode", |b| b.iter(|| encode_base64(black_box(&f.png))));
    g.bench_function("response_json", |b| b.iter(|| response(black_box(f.png_b64.clone()))));
    g.bench_function("total_without_model", |b| b.iter(|| whole_request(black_box(&f), &vl, &mut vae)));
    g.finish();

    // Issue 6's rows: preprocessing (decode + VL resize/normalize + VAE input) of a JPEG and a PNG
    // upload, and response encoding (PNG or JPEG, then base64) of a 1024x1024 result.
    let png_upload = imaging::encode(&f.image, OutputFormat::Png).unwrap();
    let preprocess = |bytes: &[u8], vae: &mut [f16]| {
        let img = imaging::decode(bytes, &imaging::Limits::default()).unwrap();
        imaging::preprocess_into_f16(&img, vae).unwrap();
        vision::preprocess(&img, &vl).unwrap().pixel_values.len()
    };
    let mut g = c.benchmark_group("io_1024");
    g.sample_size(20);
    g.bench_function("preprocess_jpeg", |b| b.iter(|| preprocess(black_box(&f.jpeg), &mut vae)));
    g.bench_function("preprocess_png", |b| b.iter(|| preprocess(black_box(&png_upload), &mut vae)));
    for (name, format) in [("encode_png_base64", OutputFormat::Png), ("encode_jpeg_base64", OutputFormat::Jpeg { quality: 90 })] {
        g.bench_function(name, |b| b.iter(|| encode_base64(&imaging::encode(black_box(&f.result), format).unwrap()).len()));
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
