//! The committed tiny bundles open, verify their hashes, and every component loaded with ONNX
//! Runtime matches the IO contract its manifest declares.

use qwen_edit::bundle::{Bundle, Variant, COMPONENTS};
use qwen_edit::runtime::ort::{OrtBackend, OrtSettings};
use qwen_edit::runtime::{DType, Engine};
use std::path::Path;

fn bundle(name: &str) -> Bundle {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("engines").join(name);
    Bundle::open_verified(&dir).unwrap_or_else(|e| panic!("{name}: {e}"))
}

#[test]
fn tiny_bundles_open_verify_and_match_their_graphs() {
    let ort = OrtBackend::new(OrtSettings { intra_threads: Some(1), ..Default::default() })
        .unwrap_or_else(|e| panic!("ONNX Runtime is needed for this test: {e}"));
    for (name, variant, zero_cond_t) in [
        ("tiny", Variant::Edit, false),
        ("tiny-2509", Variant::EditPlus, false),
        ("tiny-2511", Variant::EditPlus, true),
        ("tiny-fp8", Variant::Edit, false),
    ] {
        let b = bundle(name);
        let m = b.manifest();
        assert_eq!(m.variant, variant, "{name}");
        assert_eq!(m.transformer.zero_cond_t, zero_cond_t, "{name}");
        assert!(b.tokenizer_path().is_file());
        for c in COMPONENTS {
            let engine = ort.load(c, &b.onnx_path(c).unwrap()).unwrap_or_else(|e| panic!("{name}: {e}"));
            b.check_engine(&engine).unwrap_or_else(|e| panic!("{name}: {e}"));
            assert_eq!(engine.inputs().len(), b.component(c).unwrap().inputs.len());
            // Only the FP8 twin's transformer carries FP8 Q/DQ, as its manifest says.
            let fp8 = name == "tiny-fp8" && c == "transformer";
            assert_eq!((engine.fp8_qdq(), m.is_fp8(c)), (fp8, fp8), "{name}/{c}");
            assert_eq!(b.plan_path(c).unwrap(), b.dir().join(format!("{c}.plan")));
        }
    }
}

#[test]
fn sixteen_bit_bundles_declare_their_precision() {
    let ort = OrtBackend::new(OrtSettings { intra_threads: Some(1), ..Default::default() }).unwrap();
    for (name, dtype) in [("tiny-fp16", DType::F16), ("tiny-bf16", DType::BF16)] {
        let b = bundle(name);
        assert_eq!((b.manifest().dtype, b.manifest().variant), (dtype, Variant::Edit), "{name}");
        let latent = &b.component("vae_decoder").unwrap().inputs[0];
        assert_eq!(latent.dtype, dtype, "{name}: the graphs' float IO is {dtype}");
        if dtype == DType::F16 {
            // ONNX Runtime's CPU provider runs float16 graphs; it has no bfloat16 kernels (`OrtSettings::bf16_as_f32` runs float32 twins).
            for c in COMPONENTS {
                let engine = ort.load(c, &b.onnx_path(c).unwrap()).unwrap();
                b.check_engine(&engine).unwrap_or_else(|e| panic!("{name}: {e}"));
            }
        }
    }
}

/// A bfloat16 bundle on a machine without a GPU: ONNX Runtime's CPU provider has no bfloat16 kernels, and opening
/// the pipeline fails at start-up (never in a request) with an error that names the fix.
#[test]
fn bf16_bundle_on_the_cpu_fails_at_start_up_naming_the_fix() {
    use qwen_edit::pipeline::{Pipeline, PipelineOptions};

    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("engines/tiny-bf16");
    let opts = PipelineOptions { backend: "ort".parse().unwrap(), ..Default::default() };
    let err = match Pipeline::open(&dir, &opts) {
        Ok(_) => panic!("a bfloat16 bundle opened on ONNX Runtime's CPU provider"),
        Err(e) => e.to_string(),
    };
    assert!(err.contains("bfloat16") && err.contains("--dtype float32") && err.contains("qwen-edit build"), "{err}");
}
