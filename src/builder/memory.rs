//! Memory of an engine as planned: its weights (from the ONNX initializers) and an estimate of its activations at
//! each optimization profile's largest shapes; what `build --dry-run` reports before any GPU is involved.
//!
//! The activation estimate counts what is live at once inside the widest layer, at the profile's max shapes, in the
//! graph's activation dtype (an estimate, not TensorRT's allocation, which also depends on tactics and fusion):
//! - transformer: per sample the image and text hidden states, q, k, v and the attention output
//!   (6 x tokens x width) plus the image MLP hidden (image tokens x MLP width); attention fused (no score matrix).
//! - text_encoder: the larger of the language model (6 x tokens x width + tokens x MLP width per sample) and the
//!   vision tower (9 x patches x patch width, plus the masked attention's score matrices, one per vision head, and
//!   its two boolean segment masks: patches^2 each).
//! - vae_encoder / vae_decoder: six full-resolution tensors of the image-side channel width (a residual block) plus
//!   the mid block's single-head attention scores over the latent positions.

use serde::Serialize;

use crate::onnx::{OnnxInfo, Profile};
use crate::runtime::DType;

/// Heads of Qwen2.5-VL's vision tower (16 at every published size); the graph's weights do not say it.
pub const VISION_HEADS: u64 = 16;

/// Planned memory of one engine.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct MemoryEstimate {
    pub weight_bytes: u64,
    /// Per profile (same order as `profiles`): estimated peak activations at its max shapes.
    pub activation_bytes: Vec<u64>,
}

impl MemoryEstimate {
    pub fn of(component: &str, info: &OnnxInfo, profiles: &[Profile]) -> MemoryEstimate {
        MemoryEstimate {
            weight_bytes: info.weights.bytes,
            activation_bytes: profiles.iter().map(|p| activation_bytes(component, info, p)).collect(),
        }
    }

    /// One line for the build's progress output.
    pub fn summary(&self) -> String {
        let act = self.activation_bytes.iter().max().copied().unwrap_or(0);
        format!("weights {}, activations up to {} (estimate)", gib(self.weight_bytes), gib(act))
    }
}

pub fn gib(bytes: u64) -> String {
    format!("{:.2} GiB", bytes as f64 / (1u64 << 30) as f64)
}

fn max_shape<'a>(p: &'a Profile, input: &str) -> Option<&'a [usize]> {
    p.inputs.iter().find(|i| i.name == input).map(|i| i.max.as_slice())
}

fn dim(p: &Profile, input: &str, axis: usize) -> u64 {
    max_shape(p, input).and_then(|s| s.get(axis)).copied().unwrap_or(0) as u64
}

/// Bytes per activation value: the dtype of the graph's first float output.
fn activation_element(info: &OnnxInfo) -> u64 {
    match info.outputs.iter().map(|o| o.dtype).find(|d| matches!(d, DType::F32 | DType::F16 | DType::BF16)) {
        Some(DType::F16) | Some(DType::BF16) => 2,
        _ => 4,
    }
}

/// Estimated peak activation bytes of `component` at the max shapes of `p` (see the module docs).
pub fn activation_bytes(component: &str, info: &OnnxInfo, p: &Profile) -> u64 {
    let e = activation_element(info);
    let w = info.weights.model_width as u64;
    let mlp = info.weights.max_width as u64;
    match component {
        "transformer" => {
            let (b, img, txt) = (dim(p, "hidden_states", 0), dim(p, "hidden_states", 1), dim(p, "encoder_hidden_states", 1));
            b * ((img + txt) * 6 * w + img * mlp) * e
        }
        "text_encoder" => {
            let (b, seq) = (dim(p, "input_ids", 0), dim(p, "input_ids", 1));
            let (patches, patch_width) = (dim(p, "pixel_values", 0), dim(p, "pixel_values", 1));
            let language = b * seq * (6 * w + mlp) * e;
            let vision = patches * 9 * patch_width * e + patches * patches * (VISION_HEADS * e + 2);
            language.max(vision)
        }
        "vae_encoder" | "vae_decoder" => {
            let (b, h, wd) = if component == "vae_encoder" {
                (dim(p, "image", 0), dim(p, "image", 2), dim(p, "image", 3))
            } else {
                (dim(p, "latent", 0), 8 * dim(p, "latent", 2), 8 * dim(p, "latent", 3))
            };
            let c = info.weights.image_channels as u64;
            let latent_positions = (h / 8) * (wd / 8);
            b * (h * wd * c * 6 + latent_positions * latent_positions) * e
        }
        // Unknown graphs: their inputs and outputs at the max shapes, times four.
        _ => 4 * p.inputs.iter().map(|i| i.max.iter().product::<usize>() as u64).sum::<u64>() * e,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::onnx::{InputProfile, Precision, WeightSummary};
    use crate::runtime::{Dim, TensorInfo};

    fn info(weights: WeightSummary, out: DType) -> OnnxInfo {
        OnnxInfo {
            ir_version: 10,
            producer: String::new(),
            opsets: vec![],
            inputs: vec![],
            outputs: vec![TensorInfo { name: "o".into(), dtype: out, shape: vec![Dim::Fixed(1)] }],
            external_data: vec![],
            nodes: 0,
            initializers: 0,
            precision: Precision::default(),
            weights,
        }
    }

    fn profile(inputs: &[(&str, &[usize])]) -> Profile {
        Profile {
            inputs: inputs
                .iter()
                .map(|(n, max)| InputProfile {
                    name: n.to_string(),
                    min: vec![1; max.len()],
                    opt: max.to_vec(),
                    max: max.to_vec(),
                })
                .collect(),
        }
    }

    /// The real transformer (inner 3072, MLP 12288) at 1024x1024 with one condition image, true CFG (batch 2),
    /// 1024 text tokens, bf16: 2 x ((8192 + 1024) x 6 x 3072 + 8192 x 12288) x 2 bytes.
    #[test]
    fn transformer_at_the_real_width() {
        let i =
            info(WeightSummary { bytes: 40_900_000_000, model_width: 3072, max_width: 12288, image_channels: 0 }, DType::BF16);
        let p = profile(&[("hidden_states", &[2, 8192, 64]), ("encoder_hidden_states", &[2, 1024, 3584])]);
        let expect = 2 * ((8192 + 1024) * 6 * 3072 + 8192 * 12288) * 2;
        assert_eq!(activation_bytes("transformer", &i, &p), expect);
        assert!((1.0..1.5).contains(&(expect as f64 / (1u64 << 30) as f64)), "about 1.2 GiB");
        let m = MemoryEstimate::of("transformer", &i, &[p.clone(), p]);
        assert_eq!(m.activation_bytes, vec![expect, expect]);
        assert!(m.summary().starts_with("weights 38.09 GiB"), "{}", m.summary());
    }

    /// Qwen2.5-VL-7B: the language model at 3584 (MLP 18944) dominates at batch 4 x 2048 tokens; the vision tower's
    /// masked attention over 16384 patches (4 condition images at their max pixels) dominates over that.
    #[test]
    fn text_encoder_language_and_vision() {
        let i = info(WeightSummary { bytes: 1, model_width: 3584, max_width: 18944, image_channels: 1280 }, DType::F32);
        let p = profile(&[("input_ids", &[4, 2048]), ("pixel_values", &[3136, 1176])]);
        let lang = 4 * 2048 * (6 * 3584 + 18944) * 4;
        let vision = 3136 * 9 * 1176 * 4 + 3136 * 3136 * (16 * 4 + 2);
        assert!(lang > vision);
        assert_eq!(activation_bytes("text_encoder", &i, &p), lang);
        let p = profile(&[("input_ids", &[1, 64]), ("pixel_values", &[16384, 1176])]);
        assert_eq!(activation_bytes("text_encoder", &i, &p), 16384 * 9 * 1176 * 4 + 16384 * 16384 * 66);
    }

    /// The QwenImage VAE decoder (96 channels at full resolution) at 1024x1024, batch 1, fp32.
    #[test]
    fn vae_at_the_real_width() {
        let i = info(WeightSummary { bytes: 1, model_width: 384, max_width: 384, image_channels: 96 }, DType::F32);
        let dec = profile(&[("latent", &[1, 16, 128, 128])]);
        let enc = profile(&[("image", &[1, 3, 1024, 1024])]);
        let expect = (1024 * 1024 * 96 * 6 + 16384 * 16384) * 4;
        assert_eq!(activation_bytes("vae_decoder", &i, &dec), expect);
        assert_eq!(activation_bytes("vae_encoder", &i, &enc), expect);
    }

    fn real_settings() -> crate::onnx::ProfileSettings {
        let plus = crate::onnx::tests::settings(crate::bundle::Variant::EditPlus);
        crate::onnx::ProfileSettings { max_text_tokens: 2048, max_images: 4, ..plus }
    }

    /// The profiles `build` derives for the real transformer's inputs (Edit Plus, 1 MP, batch 1/2/4 with CFG) and
    /// their activation estimates: the largest profile (4 requests with CFG = 8 rows) stays within one GPU's memory
    /// next to the bf16 weights only at batch 1-2; the estimate grows with the profile's max shapes.
    #[test]
    fn real_transformer_profiles_and_memory() {
        let inputs = vec![
            TensorInfo {
                name: "hidden_states".into(),
                dtype: DType::BF16,
                shape: vec![Dim::Dynamic("batch".into()), Dim::Dynamic("img_seq".into()), Dim::Fixed(64)],
            },
            TensorInfo {
                name: "encoder_hidden_states".into(),
                dtype: DType::BF16,
                shape: vec![Dim::Dynamic("batch".into()), Dim::Dynamic("txt_seq".into()), Dim::Fixed(3584)],
            },
        ];
        let profiles = crate::onnx::derive_profiles("transformer", &inputs, &real_settings()).unwrap();
        assert!(profiles.len() >= 2);
        let i =
            info(WeightSummary { bytes: 40_860_733_568, model_width: 3072, max_width: 12288, image_channels: 0 }, DType::BF16);
        let m = MemoryEstimate::of("transformer", &i, &profiles);
        for (p, act) in profiles.iter().zip(&m.activation_bytes) {
            let hs = &p.inputs[0].max;
            assert_eq!(hs[2], 64);
            let txt = p.inputs[1].max[1] as u64;
            let expect = hs[0] as u64 * ((hs[1] as u64 + txt) * 6 * 3072 + hs[1] as u64 * 12288) * 2;
            assert_eq!(*act, expect);
            // Every profile covers a 1024x1024 target plus at least one 1024x1024 condition image: 8,192 tokens.
            assert!(hs[1] >= 8192, "{hs:?}");
        }
        assert!(m.activation_bytes.windows(2).all(|w| w[0] <= w[1]), "larger batch groups need more: {:?}", m.activation_bytes);
    }
}
