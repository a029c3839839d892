//! torch-exact antialiased bicubic resize (the Qwen2-VL processor's) against torch's own outputs,
//! and against the VL images the reference pipeline recorded.

use qwen_edit::imaging::{self, torch_resize::resize_bicubic_aa, Filter, Limits};
use qwen_edit::pipeline::vision::{target_size, Vision};
use serde_json::Value;
use sha2::{Digest, Sha256};
use std::path::PathBuf;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn load(path: PathBuf) -> image::RgbImage {
    imaging::decode(&std::fs::read(&path).unwrap(), &Limits::default()).unwrap()
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

#[test]
fn bit_identical_to_torch() {
    let dir = root().join("tests/golden/torch_resize");
    let cases: Value = serde_json::from_slice(&std::fs::read(dir.join("cases.json")).unwrap()).unwrap();
    let mut failed = Vec::new();
    let cases = cases["cases"].as_array().unwrap();
    for c in cases {
        let src = load(dir.join(format!("{}.png", c["source"].as_str().unwrap())));
        let (w, h) = (c["width"].as_u64().unwrap() as u32, c["height"].as_u64().unwrap() as u32);
        let out = resize_bicubic_aa(&src, w, h).unwrap();
        if hex(&Sha256::digest(out.as_raw())) != c["sha256"].as_str().unwrap() {
            failed.push(format!("{} {}x{} -> {w}x{h}", c["source"], src.width(), src.height()));
        }
    }
    assert!(failed.is_empty(), "{} of {} resizes differ from torch: {failed:?}", failed.len(), cases.len());
}

/// The v1 reference runs: input image -> Lanczos to the working size (diffusers) -> smart_resize and
/// this resize (transformers' processor) give exactly the VL image the reference recorded.
#[test]
fn matches_the_processor_in_the_reference_runs() {
    let bundle = root().join("engines/tiny");
    let manifest: Value = serde_json::from_slice(&std::fs::read(bundle.join("manifest.json")).unwrap()).unwrap();
    let vision: Vision = serde_json::from_value(manifest["vision"].clone()).unwrap();
    for case in ["edit_square", "edit_wide_cfg", "edit_lightning_jpeg", "edit_size_override"] {
        let meta: Value = serde_json::from_slice(&std::fs::read(bundle.join(format!("reference/{case}.json"))).unwrap()).unwrap();
        let bytes = std::fs::read(bundle.join(format!("reference/{case}.safetensors"))).unwrap();
        let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        let want = st.tensor("vl_image.0").unwrap();
        let vae = st.tensor("vae_image.0").unwrap();
        let (vh, vw) = (vae.shape()[1] as u32, vae.shape()[2] as u32);
        let img = load(bundle.join("reference/images").join(meta["images"][0].as_str().unwrap()));
        let vae_img = imaging::resize(&img, vw, vh, Filter::Lanczos).unwrap();
        assert_eq!(vae_img.as_raw().as_slice(), vae.data(), "{case}: Lanczos VAE image differs");
        let (tw, th) = target_size(vw, vh, &vision).unwrap();
        let out = resize_bicubic_aa(&vae_img, tw, th).unwrap();
        assert_eq!(&want.shape()[..2], &[th as usize, tw as usize], "{case}: VL size");
        assert_eq!(out.as_raw().as_slice(), want.data(), "{case}: VL image differs from the processor's");
    }
}
