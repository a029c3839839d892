//! The README's "A real model" path end to end, on each committed tiny checkpoint: the user's
//! export command (`python -m export bundle`, with and without `--lightning-lora`), then the
//! built binary loads the result and edits with it through `qwen-edit edit` and through `serve`.
//! This is the contract test between the export tool and the server (issue: an exported bundle
//! did not load, and nothing noticed because the tiny set is written by another command).

mod server_support;

use std::path::{Path, PathBuf};
use std::process::Command;

use server_support::*;

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// The export tool's Python (made by `scripts/setup.sh all`, which `make test` runs first).
fn python() -> PathBuf {
    let p = root().join(".venv/bin/python");
    assert!(p.is_file(), "{} is missing: run `scripts/setup.sh all` (make test does)", p.display());
    p
}

fn run(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "{cmd:?} failed ({}):\n{text}", out.status);
    text
}

/// `python -m export bundle --checkpoint engines/tiny-checkpoints/<variant> --out <out> [extra...]`.
fn export(variant: &str, out: &Path, extra: &[&str]) {
    let ckpt = format!("engines/tiny-checkpoints/{variant}");
    let mut cmd = Command::new(python());
    cmd.current_dir(root()).args(["-m", "export", "bundle", "--checkpoint", &ckpt, "--out"]).arg(out).args(extra);
    run(&mut cmd);
}

/// A LoRA in the diffusers/peft layout (`transformer.<module>.lora_A/B.weight`) over every linear
/// layer of the checkpoint's transformer blocks, as a Lightning LoRA is; small random values.
fn write_lora(variant: &str, path: &Path) -> usize {
    use safetensors::{tensor::TensorView, Dtype, SafeTensors};
    let weights =
        std::fs::read(root().join(format!("engines/tiny-checkpoints/{variant}/transformer/diffusion_pytorch_model.safetensors")))
            .unwrap();
    let st = SafeTensors::deserialize(&weights).unwrap();
    let rank = 4usize;
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    let mut random = |n: usize| -> Vec<u8> {
        (0..n)
            .flat_map(|_| {
                state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                let v = ((state >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 0.2;
                v.to_le_bytes()
            })
            .collect()
    };
    let mut tensors: Vec<(String, Vec<usize>, Vec<u8>)> = Vec::new();
    let mut names: Vec<String> = st.names().into_iter().map(String::from).collect();
    names.sort();
    for name in names {
        let Some(module) = name.strip_suffix(".weight") else { continue };
        let t = st.tensor(&name).unwrap();
        if !module.starts_with("transformer_blocks.") || t.shape().len() != 2 {
            continue;
        }
        let (out_f, in_f) = (t.shape()[0], t.shape()[1]);
        tensors.push((format!("transformer.{module}.lora_A.weight"), vec![rank, in_f], random(rank * in_f)));
        tensors.push((format!("transformer.{module}.lora_B.weight"), vec![out_f, rank], random(out_f * rank)));
    }
    let views: Vec<(String, TensorView<'_>)> =
        tensors.iter().map(|(n, s, d)| (n.clone(), TensorView::new(Dtype::F32, s.clone(), d).unwrap())).collect();
    safetensors::serialize_to_file(views, None, path).unwrap();
    tensors.len() / 2
}

/// Images for one job of this variant (Edit: one; Edit Plus: two).
fn images(variant: &str) -> Vec<PathBuf> {
    let dir = root().join("engines/tiny/reference/images");
    if variant == "edit" {
        vec![dir.join("square.png")]
    } else {
        vec![dir.join("square.png"), dir.join("wide.png")]
    }
}

const PROMPT: &str = "make it blue";
const SEED: u64 = 3;
const STEPS: u32 = 2;
const SIDE: u32 = 128;

/// `qwen-edit edit` with the bundle: a small edit; returns the output image.
fn cli_edit(bundle: &Path, variant: &str, out: &Path, lightning: bool) -> image::RgbImage {
    let list: Vec<String> = images(variant).iter().map(|p| p.display().to_string()).collect();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_qwen-edit"));
    cmd.current_dir(root())
        .arg("edit")
        .arg("--bundle")
        .arg(bundle)
        .args(["--image", &list.join(","), "--prompt", PROMPT, "--seed", &SEED.to_string()])
        .args(["--steps", &STEPS.to_string(), "--width", &SIDE.to_string(), "--height", &SIDE.to_string()])
        .args(["--backend", "ort", "--out"])
        .arg(out);
    if lightning {
        cmd.arg("--lightning");
    }
    run(&mut cmd);
    let img = image::open(out).unwrap().to_rgb8();
    assert_eq!(img.dimensions(), (SIDE, SIDE));
    img
}

/// `qwen-edit serve` with the bundle: `/health` describes it, `/runsync` edits; returns the image.
async fn served_edit(bundle: &Path, variant: &str, lightning: bool) -> (image::RgbImage, serde_json::Value) {
    let bundle = bundle.display().to_string();
    let p = spawn(&[("QWEN_EDIT_BUNDLE", bundle.as_str()), ("USE_LIGHTNING_LORA", if lightning { "1" } else { "0" })]).await;
    let health = get(p.addr, "/health").await.json();
    let b64s: Vec<serde_json::Value> =
        images(variant).iter().map(|p| serde_json::json!({"image_base64": b64(&std::fs::read(p).unwrap())})).collect();
    let mut input = serde_json::json!({
        "prompt": PROMPT, "seed": SEED, "num_inference_steps": STEPS, "width": SIDE, "height": SIDE,
    });
    if variant == "edit" {
        input["image_base64"] = b64s[0]["image_base64"].clone();
    } else {
        input["images"] = serde_json::Value::Array(b64s);
    }
    let r = post_json(p.addr, serde_json::json!({ "input": input }).to_string()).await;
    assert_eq!(r.status, 200, "{}\n{}", r.text(), p.log());
    (r.image(), health)
}

async fn exported_bundles_load_and_edit(variant: &str) {
    let tmp = tempfile::tempdir().unwrap();
    // Exactly the README's command (the real working areas), and a Lightning export at a small area.
    let plain = tmp.path().join("plain");
    export(variant, &plain, &[]);
    let lora = tmp.path().join("lightning.safetensors");
    let modules = write_lora(variant, &lora);
    let fused = tmp.path().join("lightning");
    export(variant, &fused, &["--lightning-lora", lora.to_str().unwrap(), "--vae-area", "65536"]);

    let manifest: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fused.join("manifest.json")).unwrap()).unwrap();
    assert_eq!(manifest["lightning"]["modules"], modules, "{}", manifest["lightning"]);
    assert_eq!(manifest["source"]["tiny"], false);

    for (bundle, lightning) in [(&plain, false), (&fused, true)] {
        let cli = cli_edit(bundle, variant, &tmp.path().join("out.png"), lightning);
        let (served, health) = served_edit(bundle, variant, lightning).await;
        assert_eq!(health["model"]["lightning_fused"], lightning, "{health}");
        assert_eq!(health["model"]["variant"], if variant == "edit" { "edit" } else { "edit-plus" }, "{health}");
        assert!(served == cli, "{variant} {}: the server's image differs from `qwen-edit edit`'s", bundle.display());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exported_edit_bundle_loads_and_edits() {
    exported_bundles_load_and_edit("edit").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exported_edit_2509_bundle_loads_and_edits() {
    exported_bundles_load_and_edit("edit-2509").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exported_edit_2511_bundle_loads_and_edits() {
    exported_bundles_load_and_edit("edit-2511").await;
}
