//! Golden tests for `qwen_edit::imaging` against Pillow 13 and diffusers 0.42 outputs.
//! Goldens come from `export/goldens/imaging.py` (tests/golden/imaging, tests/fixtures/images).

use std::fs::File;
use std::path::{Path, PathBuf};

use half::f16;
use ndarray::ArrayD;
use ndarray_npy::ReadNpyExt;
use qwen_edit::imaging::{self, Error, Filter, Limits, OutputFormat, RgbImage};
use serde_json::Value;
use sha2::{Digest, Sha256};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn golden(rel: &str) -> PathBuf {
    root().join("tests/golden/imaging").join(rel)
}

fn fixture(name: &str) -> Vec<u8> {
    let p = root().join("tests/fixtures/images").join(name);
    std::fs::read(&p).unwrap_or_else(|e| panic!("read {}: {e}", p.display()))
}

fn read(p: &Path) -> Vec<u8> {
    std::fs::read(p).unwrap_or_else(|e| panic!("read {}: {e}", p.display()))
}

fn json(p: &Path) -> Value {
    serde_json::from_slice(&read(p)).unwrap_or_else(|e| panic!("parse {}: {e}", p.display()))
}

fn npy<T: ndarray_npy::ReadableElement>(rel: &str) -> ArrayD<T> {
    let p = golden(rel);
    ArrayD::<T>::read_npy(File::open(&p).unwrap_or_else(|e| panic!("open {}: {e}", p.display())))
        .unwrap_or_else(|e| panic!("npy {}: {e}", p.display()))
}

/// Mirror of `make_source` in export/goldens/imaging.py (integer-only, so exactly reproducible).
fn gen_source(w: u32, h: u32, seed: u32) -> RgbImage {
    let mut state: u64 = u64::from(seed) & 0x7FFF_FFFF;
    let denom = i64::from(w * 3 + h * 5);
    let mut buf = Vec::with_capacity((w * h * 3) as usize);
    for y in 0..i64::from(h) {
        for x in 0..i64::from(w) {
            for c in 0..3i64 {
                state = (state * 1_103_515_245 + 12345) & 0x7FFF_FFFF;
                let noise = ((state >> 16) & 0x3F) as i64 - 32;
                let g = ((x * 3 + y * 5 + c * 40) * 255).div_euclid(denom);
                let mut v = (g + noise).clamp(0, 255);
                if x > i64::from(w) / 2 && ((x / 8) + (y / 8)) % 2 == 0 {
                    v = 255 - v;
                }
                if x == y || x + 1 == y {
                    v = if c != 1 { 0 } else { 255 };
                }
                buf.push(v as u8);
            }
        }
    }
    RgbImage::from_raw(w, h, buf).expect("size")
}

fn filter(name: &str) -> Filter {
    match name {
        "lanczos" => Filter::Lanczos,
        "bicubic" => Filter::Bicubic,
        other => panic!("unknown filter {other}"),
    }
}

fn u32_of(v: &Value, k: &str) -> u32 {
    v[k].as_u64().unwrap_or_else(|| panic!("missing {k} in {v}")) as u32
}

#[test]
fn resize_is_bit_identical_to_pillow() {
    let dir = golden("resize");
    let m = json(&dir.join("manifest.json"));
    let mut sources = std::collections::HashMap::new();
    for s in m["sources"].as_array().expect("sources") {
        let (w, h) = (u32_of(s, "width"), u32_of(s, "height"));
        let img = RgbImage::from_raw(w, h, read(&dir.join(s["file"].as_str().expect("file")))).expect("source size");
        // The generator is mirrored here; the large-image hashes depend on it.
        assert_eq!(img, gen_source(w, h, u32_of(s, "seed")), "generator drifted for {}", s["name"]);
        sources.insert(s["name"].as_str().expect("name").to_string(), img);
    }
    let cases = m["cases"].as_array().expect("cases");
    assert!(cases.len() >= 60, "too few cases: {}", cases.len());
    let mut failures = Vec::new();
    for c in cases {
        let src = &sources[c["source"].as_str().expect("source")];
        let (w, h) = (u32_of(c, "width"), u32_of(c, "height"));
        let f = filter(c["filter"].as_str().expect("filter"));
        let want = read(&dir.join(c["file"].as_str().expect("file")));
        let got = imaging::resize(src, w, h, f).expect("resize");
        if got.as_raw() != &want {
            let diffs = got.as_raw().iter().zip(&want).filter(|(a, b)| a != b).count();
            failures.push(format!("{}: {diffs} bytes differ", c["file"]));
        }
    }
    assert!(failures.is_empty(), "{} of {} cases differ:\n{}", failures.len(), cases.len(), failures.join("\n"));
}

#[test]
fn resize_large_matches_pillow_hashes() {
    let cases = json(&golden("resize_large.json"));
    for c in cases.as_array().expect("list") {
        let src = gen_source(u32_of(c, "width"), u32_of(c, "height"), u32_of(c, "seed"));
        assert_eq!(hex(&Sha256::digest(src.as_raw())), c["source_sha256"].as_str().expect("hash"), "source {c}");
        let out = imaging::resize(
            &src,
            u32_of(c, "target_width"),
            u32_of(c, "target_height"),
            filter(c["filter"].as_str().expect("f")),
        )
        .expect("resize");
        assert_eq!(hex(&Sha256::digest(out.as_raw())), c["sha256"].as_str().expect("hash"), "case {c}");
    }
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

#[test]
fn preprocess_matches_diffusers_exactly() {
    let u8s = npy::<u8>("preprocess_allvalues_u8.npy");
    let shape = u8s.shape().to_vec(); // H, W, 3
    let img = RgbImage::from_raw(shape[1] as u32, shape[0] as u32, u8s.iter().copied().collect()).expect("img");
    let want = npy::<f32>("preprocess_allvalues.npy");
    assert_eq!(want.shape(), &[1, 3, shape[0], shape[1]]);
    let mut got = vec![0f32; want.len()];
    imaging::preprocess_into(&img, &mut got).expect("preprocess");
    for (i, (g, w)) in got.iter().zip(want.iter()).enumerate() {
        assert_eq!(g.to_bits(), w.to_bits(), "value {i}: {g} vs {w}");
    }
    let want16 = npy::<u16>("preprocess_allvalues_f16bits.npy");
    let mut got16 = vec![f16::ZERO; want16.len()];
    imaging::preprocess_into_f16(&img, &mut got16).expect("preprocess f16");
    for (i, (g, w)) in got16.iter().zip(want16.iter()).enumerate() {
        assert_eq!(g.to_bits(), *w, "f16 value {i}");
    }

    // Lanczos resize + normalise, as the pipeline prepares the VAE image.
    let want = npy::<f32>("preprocess_s64x64_to_80x48.npy");
    assert_eq!(want.shape(), &[1, 3, 48, 80]);
    let resized = imaging::resize(&gen_source(64, 64, 2), 80, 48, Filter::Lanczos).expect("resize");
    let mut got = vec![0f32; want.len()];
    imaging::preprocess_into(&resized, &mut got).expect("preprocess");
    assert!(got.iter().zip(want.iter()).all(|(g, w)| g.to_bits() == w.to_bits()), "resized preprocess differs");
}

#[test]
fn postprocess_matches_diffusers_exactly() {
    let x = npy::<f32>("postprocess_in.npy");
    let (h, w) = (x.shape()[2], x.shape()[3]);
    let want = npy::<u8>("postprocess_out_hwc_u8.npy");
    assert_eq!(want.shape(), &[h, w, 3]);
    let flat: Vec<f32> = x.iter().copied().collect();
    let got = imaging::postprocess(&flat, w as u32, h as u32).expect("postprocess");
    let want: Vec<u8> = want.iter().copied().collect();
    let diffs: Vec<usize> = (0..want.len()).filter(|&i| got.as_raw()[i] != want[i]).collect();
    assert!(diffs.is_empty(), "{} values differ, first at {:?}", diffs.len(), &diffs[..diffs.len().min(5)]);
}

/// Decoded fixtures against PIL's `exif_transpose(open(f)).convert("RGB")`: exact for every
/// fixture (JPEG incl. CMYK and progressive, PNG of every mode, lossy and lossless WebP) but gray16.
#[test]
fn decode_matches_pillow() {
    let expected = json(&golden("decode.json"));
    let limits = Limits::default();
    let mut checked = 0;
    for (name, e) in expected.as_object().expect("object") {
        let bytes = fixture(name);
        if e.get("pil_error").is_some() {
            assert!(imaging::decode(&bytes, &limits).is_err(), "{name}: PIL refuses it, we must too");
            continue;
        }
        let got = imaging::decode(&bytes, &limits).unwrap_or_else(|err| panic!("{name}: {err}"));
        assert_eq!(got.dimensions(), (u32_of(e, "width"), u32_of(e, "height")), "{name}");
        let want = read(&golden("decode").join(e["file"].as_str().expect("file")));
        let max_diff = got.as_raw().iter().zip(&want).map(|(a, b)| a.abs_diff(*b)).max().unwrap_or(0);
        match name.as_str() {
            // Our documented deviation: PIL clips I;16 to 255, we keep the high byte.
            "gray16.png" => {
                let src = image::load_from_memory(&bytes).expect("png").into_luma16();
                let hi: Vec<u8> = src.as_raw().iter().flat_map(|&v| [(v >> 8) as u8; 3]).collect();
                assert_eq!(got.as_raw(), &hi, "{name}");
            }
            _ => assert_eq!(max_diff, 0, "{name}: differs from PIL"),
        }
        checked += 1;
    }
    assert!(checked >= 15, "only {checked} fixtures decoded");
}

#[test]
fn decode_errors_are_typed() {
    let limits = Limits::default();
    assert!(matches!(imaging::decode(&fixture("truncated.jpg"), &limits), Err(Error::Corrupt { .. })));
    match imaging::decode(&fixture("bomb.png"), &limits) {
        Err(Error::TooLarge { width: 50000, height: 50000, .. }) => {}
        other => panic!("bomb.png: {other:?}"),
    }
    assert!(matches!(imaging::decode(b"GIF89a\x01\x00\x01\x00", &limits), Err(Error::Unsupported(_))));
    let small = Limits { max_width: 20, max_height: 100, max_pixels: 10_000 };
    // exif6.jpg is stored 24x16 (too wide), upright 16x24: refused on the stored size.
    assert!(matches!(imaging::decode(&fixture("exif6.jpg"), &small), Err(Error::TooLarge { width: 24, .. })));
}

/// Random truncations and bit flips of every fixture: an error or an image, never a panic.
#[test]
fn decode_survives_truncation_and_bit_flips() {
    let names = [
        "exif6.jpg",
        "plain420.jpg",
        "progressive.jpg",
        "gray.png",
        "rgba.png",
        "palette.png",
        "rgb16.png",
        "lossy.webp",
        "lossless.webp",
        "exif8_lossless.webp",
        "cmyk.jpg",
    ];
    let limits = Limits::default();
    let mut state: u64 = 0x9E37_79B9_7F4A_7C15;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    let mut errors = 0;
    let mut total = 0;
    for name in names {
        let orig = fixture(name);
        for i in 0..60 {
            let mut b = orig.clone();
            if i % 3 == 0 {
                b.truncate((next() % orig.len() as u64) as usize);
            } else {
                for _ in 0..(1 + next() % 4) {
                    let at = (next() % b.len() as u64) as usize;
                    b[at] ^= 1 << (next() % 8);
                }
            }
            let r = std::panic::catch_unwind(|| imaging::decode(&b, &limits));
            match r {
                Ok(Ok(img)) => assert!(img.width() > 0 && img.height() > 0),
                Ok(Err(e)) => {
                    errors += 1;
                    assert!(!e.to_string().is_empty());
                }
                Err(_) => panic!("{name}: decode panicked on mutation {i}"),
            }
            total += 1;
        }
    }
    assert!(errors > total / 10, "mutations almost never rejected ({errors}/{total}): is decode checking anything?");
}

#[test]
fn encode_round_trips() {
    let img = gen_source(100, 61, 3);
    for fmt in [OutputFormat::Png, OutputFormat::Webp] {
        let bytes = imaging::encode(&img, fmt).expect("encode");
        assert_eq!(imaging::decode(&bytes, &Limits::default()).expect("decode"), img, "{fmt:?}");
    }
    let jpeg = imaging::encode(&img, OutputFormat::Jpeg { quality: 90 }).expect("jpeg");
    assert_eq!(imaging::probe(&jpeg).expect("probe").format, imaging::ImageFormat::Jpeg);
}
