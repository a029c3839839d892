//! The ONNX Runtime library in a fresh process: a bogus library fails cleanly first, and does not
//! stop the real one from loading afterwards; a second, different library is refused.

use qwen_edit::runtime::ort::{OrtBackend, OrtSettings, ENV_LIB};
use qwen_edit::runtime::{Engine, Error, Tensor};
use std::path::Path;

// One test only: this binary's process must not have loaded ONNX Runtime before it starts.
#[test]
fn bogus_library_then_real_library() {
    let dir = tempfile::tempdir().unwrap();

    // A path that does not exist: found missing before anything is loaded.
    let nowhere = dir.path().join("lib/libonnxruntime.so.1.31.1");
    let err = OrtBackend::new(OrtSettings { library: Some(nowhere), ..Default::default() }).unwrap_err();
    assert!(matches!(err, Error::LibraryMissing { .. }), "{err}");
    let msg = err.to_string();
    assert!(msg.contains("does not exist") && msg.contains("scripts/setup.sh runtime"), "{msg}");

    // A file that is not a shared library: dlopen fails inside `ort::init_from`, as an error.
    let fake = dir.path().join("libonnxruntime.so.1.31.1");
    std::fs::write(&fake, b"not an ELF file").unwrap();
    let err = OrtBackend::new(OrtSettings { library: Some(fake.clone()), ..Default::default() }).unwrap_err();
    assert!(matches!(err, Error::LibraryMissing { .. }), "{err}");
    assert!(err.to_string().contains("QWEN_EDIT_ORT_LIB"), "{err}");

    // The real library (QWEN_EDIT_ORT_LIB, ORT_DYLIB_PATH or the repo's .venv) still loads.
    let backend = OrtBackend::new(OrtSettings::default())
        .unwrap_or_else(|e| panic!("ONNX Runtime is needed for this test ({ENV_LIB} or scripts/setup.sh runtime): {e}"));
    let graph = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/onnx_ort/two_outputs.onnx");
    let mut engine = backend.load("two_outputs", &graph).unwrap();
    let mut out = engine.run(&[("x", &Tensor::f32(&[2], vec![1.5, 2.0]))]).unwrap();
    assert_eq!(out.take("total").unwrap(), Tensor::f32(&[], vec![3.5]));

    // Loading again with the same library shares the environment; another library is refused.
    let again = OrtBackend::new(OrtSettings { library: Some(backend.library().to_path_buf()), ..Default::default() });
    assert!(again.is_ok());
    let err = OrtBackend::new(OrtSettings { library: Some(fake), ..Default::default() }).unwrap_err();
    assert!(matches!(err, Error::Unavailable { .. }), "{err}");
    assert!(err.to_string().contains("already loaded"), "{err}");
}
