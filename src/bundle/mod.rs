//! A model bundle on disk: `manifest.json` (format in `engines/README.md`), tokenizer, component files.
//! `Bundle::open` parses and validates it; `check_engine` compares a loaded engine's IO with the manifest.
//!
//! Strictness: the manifest's `format` and `format_version` are checked first (a newer bundle says
//! so, instead of failing on some key); every key of the README is required (nullable ones must be
//! present as `null`) and errors name the key with its line and column; unknown keys are ignored so
//! an exporter may add information. Component and external-data file names must be plain relative
//! names inside the bundle directory. Hash verification is opt-in (`verify_hashes`): real bundles
//! are tens of GB.

mod manifest;
mod precision;

pub use manifest::*;
pub use precision::{Precision, PrecisionMode};

use crate::runtime::{Dim, Engine, TensorInfo};
use sha2::{Digest, Sha256};
use std::io::Read;
use std::path::{Path, PathBuf};

/// The only `format` this build reads.
pub const FORMAT: &str = "qwen-edit-bundle";
/// The only `format_version` this build reads.
pub const FORMAT_VERSION: u64 = 1;
/// File name of the manifest inside a bundle directory.
pub const MANIFEST: &str = "manifest.json";
/// Components every bundle has, in run order.
pub const COMPONENTS: [&str; 4] = ["text_encoder", "vae_encoder", "transformer", "vae_decoder"];

/// Errors of opening and checking a bundle.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("model bundle directory {0} does not exist (point the bundle path at a directory made by the export tool)")]
    MissingDir(PathBuf),
    #[error("bundle {dir} is incomplete, missing: {}", .missing.join("; "))]
    MissingFiles { dir: PathBuf, missing: Vec<String> },
    #[error("cannot read {path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{path}: corrupt manifest at line {line}, column {column}{}: {message}", key_suffix(.key))]
    CorruptManifest { path: PathBuf, key: String, line: usize, column: usize, message: String },
    #[error("{path}: `format` is {found}, expected \"{FORMAT}\"; this is not a qwen-edit model bundle")]
    UnsupportedFormat { path: PathBuf, found: String },
    #[error(
        "{path}: bundle format_version {found} is not supported (this build reads version {FORMAT_VERSION}); \
         re-export the bundle with the export tool of this release"
    )]
    UnsupportedVersion { path: PathBuf, found: String },
    #[error("{path}: invalid manifest: {}", .problems.join("; "))]
    Invalid { path: PathBuf, problems: Vec<String> },
    #[error("bundle has no component `{name}` (it has: {})", .known.join(", "))]
    UnknownComponent { name: String, known: Vec<String> },
    #[error("sha256 mismatch (corrupt or replaced files; re-copy or re-export the bundle): {}", .mismatches.join("; "))]
    HashMismatch { mismatches: Vec<String> },
    #[error("component `{component}` does not match the manifest's IO contract (was the engine built from another export?):\n  {}", .differences.join("\n  "))]
    ContractMismatch { component: String, differences: Vec<String> },
    #[error("PRECISION_MODE={requested}, but bundle {dir} computes in {found}: {fix}")]
    PrecisionMismatch { dir: PathBuf, requested: Precision, found: Precision, fix: String },
}

fn key_suffix(key: &str) -> String {
    if key.is_empty() || key == "." {
        String::new()
    } else {
        format!(" (in `{key}`)")
    }
}

// ---------------------------------------------------------------------------------------------
// Bundle

/// An opened, validated bundle directory.
#[derive(Clone, Debug)]
pub struct Bundle {
    dir: PathBuf,
    manifest: Manifest,
}

impl Bundle {
    /// Opens `dir`: the manifest parses, has our format and version, passes the semantic checks, and
    /// every file it names (components, external data, tokenizer) exists. Hashes are not read; see
    /// `verify_hashes`.
    pub fn open(dir: impl AsRef<Path>) -> Result<Bundle, Error> {
        let dir = dir.as_ref().to_path_buf();
        if !dir.is_dir() {
            return Err(Error::MissingDir(dir));
        }
        let path = dir.join(MANIFEST);
        if !path.is_file() {
            return Err(Error::MissingFiles { dir: dir.clone(), missing: vec![format!("manifest {MANIFEST}")] });
        }
        let text = std::fs::read_to_string(&path).map_err(|source| Error::Io { path: path.clone(), source })?;
        let manifest = Manifest::parse(&text, &path)?;
        let problems = manifest.problems();
        if !problems.is_empty() {
            return Err(Error::Invalid { path, problems });
        }
        let bundle = Bundle { dir, manifest };
        let missing: Vec<String> =
            bundle.files().into_iter().filter(|(_, p)| !p.is_file()).map(|(what, p)| format!("{what} {}", p.display())).collect();
        if !missing.is_empty() {
            return Err(Error::MissingFiles { dir: bundle.dir.clone(), missing });
        }
        Ok(bundle)
    }

    /// `open`, then `verify_hashes`.
    pub fn open_verified(dir: impl AsRef<Path>) -> Result<Bundle, Error> {
        let b = Bundle::open(dir)?;
        b.verify_hashes()?;
        Ok(b)
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn manifest(&self) -> &Manifest {
        &self.manifest
    }

    /// Every file the manifest names, with what it is for (for messages).
    fn files(&self) -> Vec<(String, PathBuf)> {
        let mut v = vec![("tokenizer".to_string(), self.dir.join(&self.manifest.tokenizer))];
        for (name, c) in &self.manifest.components {
            v.push((format!("component `{name}`"), self.dir.join(&c.file)));
            for x in &c.external_data {
                v.push((format!("external data of `{name}`"), self.dir.join(&x.file)));
            }
        }
        v
    }

    /// The manifest entry of component `name`.
    pub fn component(&self, name: &str) -> Result<&Component, Error> {
        self.manifest.components.get(name).ok_or_else(|| Error::UnknownComponent {
            name: name.to_string(),
            known: self.manifest.components.keys().cloned().collect(),
        })
    }

    /// Path of the `.onnx` graph of component `name`.
    pub fn onnx_path(&self, name: &str) -> Result<PathBuf, Error> {
        Ok(self.dir.join(&self.component(name)?.file))
    }

    /// Path of the TensorRT engine of component `name`: its graph file with the extension `.plan`
    /// (`transformer.onnx` -> `transformer.plan`), beside it in the bundle. It may not exist yet.
    pub fn plan_path(&self, name: &str) -> Result<PathBuf, Error> {
        Ok(self.onnx_path(name)?.with_extension("plan"))
    }

    /// Paths of the external-data files of component `name`.
    pub fn external_data_paths(&self, name: &str) -> Result<Vec<PathBuf>, Error> {
        Ok(self.component(name)?.external_data.iter().map(|x| self.dir.join(&x.file)).collect())
    }

    pub fn tokenizer_path(&self) -> PathBuf {
        self.dir.join(&self.manifest.tokenizer)
    }

    /// Reads every component file (and every external-data file with a recorded hash) and compares
    /// its sha256 with the manifest; all mismatches in one error.
    pub fn verify_hashes(&self) -> Result<(), Error> {
        let mut mismatches = Vec::new();
        for (name, c) in &self.manifest.components {
            let mut todo = vec![(c.file.as_str(), c.sha256.as_str())];
            todo.extend(c.external_data.iter().filter_map(|x| Some((x.file.as_str(), x.sha256.as_deref()?))));
            for (file, expected) in todo {
                let path = self.dir.join(file);
                let actual = sha256_file(&path)?;
                if !actual.eq_ignore_ascii_case(expected) {
                    mismatches.push(format!("`{name}` {file}: manifest {expected}, file {actual}"));
                }
            }
        }
        if mismatches.is_empty() {
            Ok(())
        } else {
            Err(Error::HashMismatch { mismatches })
        }
    }

    /// Checks a loaded engine's IO against the manifest entry of its component.
    pub fn check_engine(&self, engine: &dyn Engine) -> Result<(), Error> {
        let c = self.component(engine.component())?;
        check_io(engine.component(), c, engine.inputs(), engine.outputs())
    }
}

/// sha256 of a file, lowercase hex, read in 1 MiB blocks.
pub fn sha256_file(path: &Path) -> Result<String, Error> {
    let io = |source| Error::Io { path: path.to_path_buf(), source };
    let mut f = std::fs::File::open(path).map_err(io)?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).map_err(io)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(h.finalize().iter().map(|b| format!("{b:02x}")).collect())
}

/// Compares an engine's actual IO with a component's declared IO: names (both ways), dtypes, ranks
/// and dims. Symbolic names may differ (backends rename them). A dim the manifest fixes may be
/// dynamic in the engine (it accepts more); an input dim the manifest declares dynamic must not be
/// fixed in the engine (it would refuse sizes the pipeline sends). Fixed dims must be equal.
pub fn check_io(component: &str, declared: &Component, inputs: &[TensorInfo], outputs: &[TensorInfo]) -> Result<(), Error> {
    let mut diffs = Vec::new();
    compare("input", &declared.inputs, inputs, true, &mut diffs);
    compare("output", &declared.outputs, outputs, false, &mut diffs);
    if diffs.is_empty() {
        Ok(())
    } else {
        Err(Error::ContractMismatch { component: component.to_string(), differences: diffs })
    }
}

fn compare(kind: &str, declared: &[TensorInfo], actual: &[TensorInfo], input: bool, diffs: &mut Vec<String>) {
    for d in declared {
        let Some(a) = actual.iter().find(|a| a.name == d.name) else {
            diffs.push(format!("{kind} `{}`: in the manifest ({d}), not in the engine", d.name));
            continue;
        };
        if d.dtype != a.dtype {
            diffs.push(format!("{kind} `{}`: dtype {} in the manifest, {} in the engine", d.name, d.dtype, a.dtype));
        }
        if d.shape.len() != a.shape.len() {
            diffs.push(format!(
                "{kind} `{}`: rank {} in the manifest ({d}), {} in the engine ({a})",
                d.name,
                d.shape.len(),
                a.shape.len()
            ));
            continue;
        }
        for (i, (dd, ad)) in d.shape.iter().zip(&a.shape).enumerate() {
            match (dd, ad) {
                (Dim::Fixed(x), Dim::Fixed(y)) if x != y => {
                    diffs.push(format!("{kind} `{}`: dim {i} is {x} in the manifest, {y} in the engine", d.name))
                }
                (Dim::Dynamic(s), Dim::Fixed(y)) if input => diffs.push(format!(
                    "{kind} `{}`: dim {i} is dynamic (`{s}`) in the manifest but fixed to {y} in the engine",
                    d.name
                )),
                _ => {}
            }
        }
    }
    for a in actual {
        if !declared.iter().any(|d| d.name == a.name) {
            diffs.push(format!("{kind} `{}`: in the engine ({a}), not in the manifest", a.name));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::runtime::DType;
    use serde_json::{json, Value};

    const H: &str = "0000000000000000000000000000000000000000000000000000000000000000";

    fn io(name: &str, dtype: &str, shape: Value) -> Value {
        json!({"name": name, "dtype": dtype, "shape": shape})
    }

    fn component(file: &str) -> Value {
        json!({
            "file": file, "sha256": H, "external_data": [],
            "inputs": [io("x", "float32", json!(["batch", 4]))],
            "outputs": [io("y", "float32", json!(["batch", 3]))],
        })
    }

    fn scheduler(terminal: Value) -> Value {
        json!({
            "base_image_seq_len": 256, "max_image_seq_len": 8192, "base_shift": 0.5, "max_shift": 0.9,
            "shift_terminal": terminal, "time_shift_type": "exponential", "use_dynamic_shifting": true,
            "num_train_timesteps": 1000, "shift": 1.0, "use_karras_sigmas": false, "invert_sigmas": false
        })
    }

    /// A complete v1 (`edit`) manifest per engines/README.md.
    fn manifest() -> Value {
        json!({
            "format": "qwen-edit-bundle",
            "format_version": 1,
            "name": "test",
            "variant": "edit",
            "dtype": "float32",
            "source": {"checkpoint": "engines/tiny-checkpoint", "tiny": true, "seed": 0},
            "lightning": null,
            "components": {
                "text_encoder": component("text_encoder.onnx"),
                "transformer": component("transformer.onnx"),
                "vae_encoder": component("vae_encoder.onnx"),
                "vae_decoder": component("vae_decoder.onnx"),
            },
            "tokenizer": "tokenizer.json",
            "prompt": {"template": "<|im_start|>system\n...{}<|im_end|>", "image_template": null,
                       "drop_tokens": 64, "max_text_tokens": 512},
            "vision": {"patch_size": 14, "temporal_patch_size": 2, "merge_size": 2, "min_pixels": 3136,
                       "max_pixels": 50176, "resample": "bicubic", "rescale_factor": 0.00392156862745098,
                       "image_mean": [0.48145466, 0.4578275, 0.40821073],
                       "image_std": [0.26862954, 0.26130258, 0.27577711], "window_size": 112,
                       "image_token_id": 151655, "video_token_id": 151656, "vision_start_token_id": 151652,
                       "condition_area": null},
            "vae": {"scale_factor": 8, "z_dim": 16, "latents_mean": vec![0.1; 16], "latents_std": vec![2.0; 16],
                    "image_area": 16384, "resample": "lanczos"},
            "transformer": {"patch_size": 2, "in_channels": 64, "out_channels": 16, "axes_dims_rope": [16, 56, 56],
                            "rope_theta": 10000.0, "rope_positions": 4096, "zero_cond_t": false,
                            "joint_attention_dim": 64},
            "scheduler": {"base": scheduler(json!(0.02)), "lightning": scheduler(Value::Null)},
            "defaults": {"num_inference_steps": 50, "true_cfg_scale": 4.0, "lightning_steps": 8},
            "profiles": {"batch_sizes": [1, 2, 4], "resolutions": [[1024, 1024], [832, 1248]], "max_text_tokens": 512},
        })
    }

    fn fixture(name: &str) -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/onnx_ort").join(name)
    }

    /// Writes a bundle directory: the manifest, a tokenizer, and the matmul fixture as every component.
    fn write_bundle(m: &Value) -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("manifest.json"), serde_json::to_string_pretty(m).unwrap()).unwrap();
        std::fs::write(dir.path().join("tokenizer.json"), "{}").unwrap();
        for c in COMPONENTS {
            std::fs::copy(fixture("matmul_add_f32.onnx"), dir.path().join(format!("{c}.onnx"))).unwrap();
        }
        dir
    }

    fn open_err(m: &Value) -> Error {
        let dir = write_bundle(m);
        Bundle::open(dir.path()).unwrap_err()
    }

    #[test]
    fn opens_a_complete_bundle_and_reads_every_section() {
        let dir = write_bundle(&manifest());
        let b = Bundle::open(dir.path()).unwrap();
        let m = b.manifest();
        assert_eq!(m.variant, Variant::Edit);
        assert_eq!(m.dtype, DType::F32);
        assert_eq!(m.source.seed, Some(0));
        assert!(m.lightning.is_none());
        assert_eq!(m.vision.resample, Resample::Bicubic);
        assert_eq!(m.vae.resample, Resample::Lanczos);
        assert_eq!(m.vae.latents_std.len(), 16);
        assert_eq!(m.transformer.axes_dims_rope, [16, 56, 56]);
        assert_eq!(m.scheduler.base.shift_terminal, Some(0.02));
        assert_eq!(m.scheduler.lightning.shift_terminal, None);
        assert_eq!(m.scheduler.base.time_shift_type, TimeShiftType::Exponential);
        assert!(!m.scheduler.base.use_beta_sigmas);
        assert_eq!(m.profiles.resolutions[1], [832, 1248]);
        let t = b.component("transformer").unwrap();
        assert_eq!(t.inputs[0].shape, vec![Dim::Dynamic("batch".into()), Dim::Fixed(4)]);
        assert_eq!(b.onnx_path("vae_decoder").unwrap(), dir.path().join("vae_decoder.onnx"));
        assert_eq!(b.plan_path("transformer").unwrap(), dir.path().join("transformer.plan"));
        assert_eq!(b.tokenizer_path(), dir.path().join("tokenizer.json"));
        let e = b.plan_path("unet").unwrap_err().to_string();
        assert!(e.contains("no component `unet`") && e.contains("text_encoder"), "{e}");
    }

    #[test]
    fn manifest_round_trips_through_serde() {
        let m = Manifest::parse(&manifest().to_string(), Path::new("m.json")).unwrap();
        let again = Manifest::parse(&serde_json::to_string(&m).unwrap(), Path::new("m.json")).unwrap();
        assert_eq!(m, again);
    }

    #[test]
    fn plus_variant_with_lightning_and_hashed_external_data() {
        let mut m = manifest();
        m["variant"] = json!("edit-plus");
        m["prompt"]["image_template"] = json!("Picture {}: <|vision_start|><|image_pad|><|vision_end|>");
        m["vision"]["condition_area"] = json!(147456);
        m["lightning"] = json!({"lora": "lightning.safetensors", "sha256": null, "modules": 840, "rank": 32, "scale": 1.0});
        m["transformer"]["zero_cond_t"] = json!(true);
        m["components"]["transformer"]["inputs"].as_array_mut().unwrap().push(io(
            "modulate_index",
            "int64",
            json!(["batch", "img_seq"]),
        ));
        m["components"]["transformer"]["external_data"] = json!(["transformer.onnx.data", {"file": "b.data", "sha256": H}]);
        let dir = write_bundle(&m);
        std::fs::write(dir.path().join("transformer.onnx.data"), b"w").unwrap();
        std::fs::write(dir.path().join("b.data"), b"w").unwrap();
        let b = Bundle::open(dir.path()).unwrap();
        assert_eq!(b.manifest().variant, Variant::EditPlus);
        assert_eq!(b.manifest().lightning.as_ref().unwrap().rank, 32);
        let x = &b.component("transformer").unwrap().external_data;
        assert_eq!(x[0], ExternalData { file: "transformer.onnx.data".into(), sha256: None });
        assert_eq!(x[1].sha256.as_deref(), Some(H));
        assert_eq!(
            b.external_data_paths("transformer").unwrap(),
            vec![dir.path().join("transformer.onnx.data"), dir.path().join("b.data")]
        );
        // Serialized back: the plain name stays a string, the hashed one an object.
        let back = serde_json::to_value(x).unwrap();
        assert_eq!(back, json!(["transformer.onnx.data", {"file": "b.data", "sha256": H}]));
    }

    #[test]
    fn format_and_version_are_checked_first() {
        let mut m = manifest();
        m["format_version"] = json!(2);
        m.as_object_mut().unwrap().remove("vae"); // a v2 manifest may lack v1 keys: the version is reported
        let e = open_err(&m);
        assert!(matches!(e, Error::UnsupportedVersion { ref found, .. } if found == "2"), "{e}");
        assert!(e.to_string().contains("re-export"), "{e}");
        let mut m = manifest();
        m["format"] = json!("diffusers");
        assert!(matches!(open_err(&m), Error::UnsupportedFormat { .. }));
        let mut m = manifest();
        m.as_object_mut().unwrap().remove("format_version");
        let e = open_err(&m).to_string();
        assert!(e.contains("missing field `format_version`"), "{e}");
    }

    #[test]
    fn missing_keys_are_named_with_their_section() {
        let mut m = manifest();
        m["vision"].as_object_mut().unwrap().remove("patch_size");
        let e = open_err(&m);
        match &e {
            Error::CorruptManifest { key, message, line, .. } => {
                assert_eq!(key, "vision");
                assert_eq!(message, "missing field `patch_size`");
                assert!(*line > 1);
            }
            other => panic!("{other}"),
        }
        // A nullable key must still be present.
        let mut m = manifest();
        m.as_object_mut().unwrap().remove("lightning");
        let e = open_err(&m).to_string();
        assert!(e.contains("missing field `lightning`"), "{e}");
        let mut m = manifest();
        m["scheduler"]["lightning"].as_object_mut().unwrap().remove("shift_terminal");
        let e = open_err(&m).to_string();
        assert!(e.contains("scheduler.lightning") && e.contains("`shift_terminal`"), "{e}");
        // Wrong types name the key path.
        let mut m = manifest();
        m["components"]["transformer"]["inputs"][0]["dtype"] = json!("float64");
        let e = open_err(&m).to_string();
        assert!(e.contains("components.transformer.inputs[0].dtype"), "{e}");
        let mut m = manifest();
        m["vision"]["image_mean"] = json!([0.5, 0.5]);
        let e = open_err(&m).to_string();
        assert!(e.contains("vision.image_mean"), "{e}");
    }

    #[test]
    fn syntax_errors_give_line_and_column() {
        let dir = write_bundle(&manifest());
        std::fs::write(dir.path().join("manifest.json"), "{\n  \"format\": \"qwen-edit-bundle\",\n  oops\n}").unwrap();
        match Bundle::open(dir.path()).unwrap_err() {
            Error::CorruptManifest { line, column, .. } => assert_eq!((line, column), (3, 3)),
            other => panic!("{other}"),
        }
        std::fs::write(dir.path().join("manifest.json"), format!("{} x", manifest())).unwrap();
        assert!(matches!(Bundle::open(dir.path()).unwrap_err(), Error::CorruptManifest { .. }));
    }

    #[test]
    fn semantic_problems_are_listed_together() {
        let mut m = manifest();
        m["variant"] = json!("edit-plus"); // without image_template / condition_area
        m["vae"]["latents_mean"] = json!([0.0, 0.0, 0.0]);
        m["components"].as_object_mut().unwrap().remove("vae_encoder");
        m["components"]["transformer"]["file"] = json!("../transformer.onnx");
        m["components"]["transformer"]["sha256"] = json!("abc");
        m["transformer"]["zero_cond_t"] = json!(true);
        m["dtype"] = json!("int64");
        match open_err(&m) {
            Error::Invalid { problems, .. } => {
                let all = problems.join("\n");
                for needle in [
                    "`dtype` is i64",
                    "no `vae_encoder`",
                    "components.transformer.file",
                    "components.transformer.sha256",
                    "variant `edit-plus` needs",
                    "3/16 values",
                    "lacks a `modulate_index`",
                ] {
                    assert!(all.contains(needle), "missing {needle:?} in:\n{all}");
                }
            }
            other => panic!("{other}"),
        }
    }

    #[test]
    fn missing_dir_and_files() {
        let dir = tempfile::tempdir().unwrap();
        let e = Bundle::open(dir.path().join("nope")).unwrap_err();
        assert!(matches!(e, Error::MissingDir(_)), "{e}");
        let e = Bundle::open(dir.path()).unwrap_err().to_string();
        assert!(e.contains("manifest.json"), "{e}");

        let mut m = manifest();
        m["components"]["text_encoder"]["external_data"] = json!(["text_encoder.onnx.data"]);
        let dir = write_bundle(&m);
        std::fs::remove_file(dir.path().join("tokenizer.json")).unwrap();
        std::fs::remove_file(dir.path().join("vae_decoder.onnx")).unwrap();
        match Bundle::open(dir.path()).unwrap_err() {
            Error::MissingFiles { missing, .. } => {
                let all = missing.join("\n");
                assert_eq!(missing.len(), 3, "{all}");
                assert!(all.contains("tokenizer") && all.contains("tokenizer.json"), "{all}");
                assert!(all.contains("component `vae_decoder`"), "{all}");
                assert!(all.contains("external data of `text_encoder`"), "{all}");
            }
            other => panic!("{other}"),
        }
    }

    #[test]
    fn hashes_are_verified_on_request() {
        let onnx = sha256_file(&fixture("matmul_add_f32.onnx")).unwrap();
        let data_hash = format!("{:x}", Sha256::digest(b"weights"));
        let mut m = manifest();
        for c in COMPONENTS {
            m["components"][c]["sha256"] = json!(onnx.to_uppercase());
        }
        m["components"]["transformer"]["external_data"] = json!([{"file": "t.data", "sha256": data_hash}, "u.data"]);
        let dir = write_bundle(&m);
        std::fs::write(dir.path().join("t.data"), b"weights").unwrap();
        std::fs::write(dir.path().join("u.data"), b"not hashed").unwrap();
        Bundle::open_verified(dir.path()).unwrap();

        // Corrupting a file: open still works (no hashing), verification names file and both hashes.
        std::fs::write(dir.path().join("t.data"), b"weightz").unwrap();
        std::fs::write(dir.path().join("vae_encoder.onnx"), b"garbage").unwrap();
        let b = Bundle::open(dir.path()).unwrap();
        match b.verify_hashes().unwrap_err() {
            Error::HashMismatch { mismatches } => {
                let all = mismatches.join("\n");
                assert_eq!(mismatches.len(), 2, "{all}");
                assert!(all.contains("`vae_encoder` vae_encoder.onnx") && all.contains(&onnx.to_uppercase()), "{all}");
                assert!(all.contains("t.data"), "{all}");
            }
            other => panic!("{other}"),
        }
    }

    #[test]
    fn sha256_of_a_known_input() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("abc");
        std::fs::write(&p, b"abc").unwrap();
        assert_eq!(sha256_file(&p).unwrap(), "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
    }

    fn info(name: &str, dtype: DType, shape: &[Dim]) -> TensorInfo {
        TensorInfo { name: name.into(), dtype, shape: shape.to_vec() }
    }

    #[test]
    fn io_contract_differences_are_all_listed() {
        let d = |s: &str| Dim::Dynamic(s.into());
        let f = Dim::Fixed;
        let declared = Component {
            file: "t.onnx".into(),
            sha256: H.into(),
            external_data: vec![],
            inputs: vec![
                info("a", DType::F32, &[d("batch"), f(4)]),
                info("b", DType::I64, &[d("batch"), d("seq")]),
                info("c", DType::F32, &[f(3)]),
                info("gone", DType::F32, &[f(1)]),
            ],
            outputs: vec![info("y", DType::F32, &[d("batch"), d("hidden")])],
        };
        // Same contract, other symbol names, a manifest-fixed dim left dynamic: fine.
        let same_in = vec![
            info("a", DType::F32, &[d("s0"), d("?")]),
            info("b", DType::I64, &[d("batch"), d("seq")]),
            info("c", DType::F32, &[f(3)]),
            info("gone", DType::F32, &[f(1)]),
        ];
        // An output more specific than declared is fine.
        let same_out = vec![info("y", DType::F32, &[d("batch"), f(64)])];
        check_io("t", &declared, &same_in, &same_out).unwrap();

        let bad_in = vec![
            info("a", DType::F16, &[f(1), f(5)]),
            info("b", DType::I64, &[d("batch")]),
            info("c", DType::F32, &[f(3)]),
            info("extra", DType::F32, &[f(1)]),
        ];
        let bad_out = vec![info("z", DType::F32, &[d("batch"), f(64)])];
        let e = check_io("transformer", &declared, &bad_in, &bad_out).unwrap_err();
        let Error::ContractMismatch { component, differences } = &e else { panic!("{e}") };
        assert_eq!(component, "transformer");
        let want = [
            "input `a`: dtype f32 in the manifest, f16 in the engine",
            "input `a`: dim 0 is dynamic (`batch`) in the manifest but fixed to 1 in the engine",
            "input `a`: dim 1 is 4 in the manifest, 5 in the engine",
            "input `b`: rank 2 in the manifest (b: i64[batch, seq]), 1 in the engine (b: i64[batch])",
            "input `gone`: in the manifest (gone: f32[1]), not in the engine",
            "input `extra`: in the engine (extra: f32[1]), not in the manifest",
            "output `y`: in the manifest (y: f32[batch, hidden]), not in the engine",
            "output `z`: in the engine (z: f32[batch, 64]), not in the manifest",
        ];
        assert_eq!(differences, &want);
        assert!(e.to_string().contains("does not match the manifest's IO contract"));
    }

    #[test]
    fn checks_a_real_ort_engine_against_the_manifest() {
        use crate::runtime::ort::{OrtBackend, OrtSettings};
        let mut m = manifest();
        let dir = write_bundle(&m);
        let b = Bundle::open(dir.path()).unwrap();
        let ort = OrtBackend::new(OrtSettings { intra_threads: Some(1), ..Default::default() })
            .unwrap_or_else(|e| panic!("ONNX Runtime is needed for this test: {e}"));
        let engine = ort.load("transformer", &b.onnx_path("transformer").unwrap()).unwrap();
        b.check_engine(&engine).unwrap();

        // The same graph against a manifest declaring f16 and a 5-wide input.
        m["components"]["transformer"]["inputs"] = json!([io("x", "float16", json!(["batch", 5]))]);
        std::fs::write(dir.path().join("manifest.json"), m.to_string()).unwrap();
        let b = Bundle::open(dir.path()).unwrap();
        let e = b.check_engine(&engine).unwrap_err().to_string();
        assert!(e.contains("input `x`: dtype f16 in the manifest, f32 in the engine"), "{e}");
        assert!(e.contains("input `x`: dim 1 is 5 in the manifest, 4 in the engine"), "{e}");
    }
}
