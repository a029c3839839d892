//! `manifest.json`: the one declaration of the bundle format (every key, its type and meaning),
//! its parsing with errors that name the key, its semantic checks, and the JSON Schema generated from it.

use crate::runtime::{DType, TensorInfo};
use schemars::JsonSchema;
use serde::{Deserialize, Deserializer, Serialize};
use std::collections::BTreeMap;
use std::fmt;
use std::path::{Component as PathPart, Path};

use super::{Error, COMPONENTS, FORMAT, FORMAT_VERSION};

/// `manifest.json`, field for field as documented in `engines/README.md`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct Manifest {
    /// Always `"qwen-edit-bundle"`.
    pub format: String,
    /// Always `1`.
    pub format_version: u64,
    pub name: String,
    pub variant: Variant,
    /// Element type the graphs were exported in (`float32`, `float16`, `bfloat16`).
    pub dtype: DType,
    pub source: Source,
    /// The Lightning LoRA fused into the transformer, or `null`.
    #[serde(deserialize_with = "nullable")]
    #[schemars(with = "Nullable<Lightning>")]
    pub lightning: Option<Lightning>,
    pub components: BTreeMap<String, Component>,
    /// Tokenizer file name (`tokenizer.json`).
    pub tokenizer: String,
    pub prompt: Prompt,
    pub vision: Vision,
    pub vae: Vae,
    pub transformer: TransformerConfig,
    pub scheduler: Schedulers,
    pub defaults: Defaults,
    pub profiles: Profiles,
    /// Components whose graphs compute in 8 bits (Q/DQ nodes), by component name; absent or `null`: none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quantization: Option<BTreeMap<String, Quantization>>,
}

/// Which pipeline the bundle is: Qwen-Image-Edit or Edit Plus (2509/2511).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
pub enum Variant {
    /// Qwen-Image-Edit: one image, the same ~1 MP copy for the VL encoder and the VAE.
    #[serde(rename = "edit")]
    Edit,
    /// Qwen-Image-Edit-2509/2511: several images, a small-area copy for the VL encoder.
    #[serde(rename = "edit-plus")]
    EditPlus,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct Source {
    /// Where the weights came from (checkpoint directory or hub id).
    pub checkpoint: String,
    /// Randomly initialised tiny model.
    pub tiny: bool,
    /// Seed of the random init (tiny models); absent or `null` for real checkpoints.
    #[serde(default)]
    pub seed: Option<u64>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct Lightning {
    /// LoRA file name.
    pub lora: String,
    /// sha256 (hex) of the LoRA file.
    #[serde(default)]
    pub sha256: Option<String>,
    /// Linear layers the LoRA changed.
    pub modules: usize,
    /// The LoRA's rank (the largest, if its layers differ).
    pub rank: u32,
    /// Scale the LoRA was fused with (its alpha/rank factor is already in its weights).
    pub scale: f64,
}

/// One network of the bundle: its graph file and IO contract.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct Component {
    /// The `.onnx` file, relative to the bundle directory.
    pub file: String,
    /// sha256 (hex) of `file`.
    pub sha256: String,
    /// External weight files of the graph (graphs over 2 GB).
    #[serde(default)]
    pub external_data: Vec<ExternalData>,
    pub inputs: Vec<TensorInfo>,
    pub outputs: Vec<TensorInfo>,
}

/// An external-data file: a plain file name, or `{"file", "sha256"}` to have it verified too.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(from = "ExternalDataRepr", into = "ExternalDataRepr")]
pub struct ExternalData {
    pub file: String,
    pub sha256: Option<String>,
}

#[derive(Clone, Serialize, Deserialize, JsonSchema)]
#[serde(untagged)]
enum ExternalDataRepr {
    Name(String),
    Hashed { file: String, sha256: Option<String> },
}

impl From<ExternalDataRepr> for ExternalData {
    fn from(r: ExternalDataRepr) -> Self {
        match r {
            ExternalDataRepr::Name(file) => ExternalData { file, sha256: None },
            ExternalDataRepr::Hashed { file, sha256 } => ExternalData { file, sha256 },
        }
    }
}

impl From<ExternalData> for ExternalDataRepr {
    fn from(e: ExternalData) -> Self {
        match e.sha256 {
            None => ExternalDataRepr::Name(e.file),
            sha256 => ExternalDataRepr::Hashed { file: e.file, sha256 },
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct Prompt {
    /// Chat template with one `{}` where the user text goes.
    pub template: String,
    /// Plus: per-image prefix with `{}` = 1-based image index; `null` for v1.
    #[serde(deserialize_with = "nullable")]
    #[schemars(with = "Nullable<String>")]
    pub image_template: Option<String>,
    /// System-prompt tokens dropped from the hidden states (64).
    pub drop_tokens: usize,
    /// Longest accepted text after the drop.
    pub max_text_tokens: usize,
}

/// Resampling filter of an image resize.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Resample {
    Nearest,
    Bilinear,
    Bicubic,
    Lanczos,
}

/// The two implementations transformers 5 has of the Qwen2-VL image processor. They resize and
/// normalise with different arithmetic, so their pixel values differ in the last bits.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum ProcessorBackend {
    /// `Qwen2VLImageProcessor` (torchvision backend; what `Qwen2VLProcessor` loads whenever
    /// torchvision is installed, which it requires): torch's uint8 antialiased bicubic resize, then
    /// `(x - mean/rescale) / (std/rescale)` in f32.
    #[default]
    Torchvision,
    /// `Qwen2VLImageProcessorPil`: Pillow bicubic, then `f32(x * rescale)` and `(x - mean) / std`.
    Pil,
}

/// Qwen2-VL image processor and vision tower settings.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct Vision {
    pub patch_size: usize,
    pub temporal_patch_size: usize,
    pub merge_size: usize,
    pub min_pixels: u64,
    pub max_pixels: u64,
    pub resample: Resample,
    pub rescale_factor: f64,
    pub image_mean: [f64; 3],
    pub image_std: [f64; 3],
    pub window_size: usize,
    pub image_token_id: u32,
    pub video_token_id: u32,
    pub vision_start_token_id: u32,
    /// Plus: pixel area of the VL copy of each image; `null` for v1.
    #[serde(deserialize_with = "nullable")]
    #[schemars(with = "Nullable<u64>")]
    pub condition_area: Option<u64>,
    /// `torchvision` (the reference's, default when absent) or `pil` image processor arithmetic.
    #[serde(default)]
    pub processor_backend: ProcessorBackend,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct Vae {
    pub scale_factor: usize,
    pub z_dim: usize,
    pub latents_mean: Vec<f64>,
    pub latents_std: Vec<f64>,
    /// Pixel area of the VAE image and of the default output.
    pub image_area: u64,
    pub resample: Resample,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct TransformerConfig {
    pub patch_size: usize,
    pub in_channels: usize,
    pub out_channels: usize,
    pub axes_dims_rope: [usize; 3],
    pub rope_theta: f64,
    /// Size of the reference's position table.
    pub rope_positions: usize,
    /// Edit-2511: condition tokens use the t = 0 modulation (`modulate_index` input).
    pub zero_cond_t: bool,
    pub joint_attention_dim: usize,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct Schedulers {
    pub base: SchedulerConfig,
    pub lightning: SchedulerConfig,
}

/// diffusers `FlowMatchEulerDiscreteScheduler` config (the keys the algorithm uses).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct SchedulerConfig {
    pub base_image_seq_len: u64,
    pub max_image_seq_len: u64,
    pub base_shift: f64,
    pub max_shift: f64,
    /// `null` = no terminal stretch.
    #[serde(deserialize_with = "nullable")]
    #[schemars(with = "Nullable<f64>")]
    pub shift_terminal: Option<f64>,
    pub time_shift_type: TimeShiftType,
    pub use_dynamic_shifting: bool,
    pub num_train_timesteps: u32,
    pub shift: f64,
    // Optional diffusers keys that change the schedule when set; the pipeline refuses them.
    #[serde(default)]
    pub invert_sigmas: bool,
    #[serde(default)]
    pub use_karras_sigmas: bool,
    #[serde(default)]
    pub use_exponential_sigmas: bool,
    #[serde(default)]
    pub use_beta_sigmas: bool,
    #[serde(default)]
    pub stochastic_sampling: bool,
}

/// How `mu` shifts the sigmas when `use_dynamic_shifting` is on.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum TimeShiftType {
    /// `e^mu / (e^mu + (1/t - 1))`.
    #[default]
    Exponential,
    /// `mu / (mu + (1/t - 1))`.
    Linear,
}

/// Request defaults of the reference pipeline.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct Defaults {
    pub num_inference_steps: u32,
    pub true_cfg_scale: f64,
    pub lightning_steps: u32,
}

/// Suggested TensorRT optimization profiles.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct Profiles {
    /// Batch sizes to build for (min/opt/max come from it).
    pub batch_sizes: Vec<usize>,
    /// `[width, height]` output sizes.
    pub resolutions: Vec<[u32; 2]>,
    pub max_text_tokens: usize,
}

/// How one component's graph is quantized (`quantization.<component>`, written by `export bundle --precision fp8`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct Quantization {
    /// The 8-bit type of the quantized weights and activations.
    pub format: QuantFormat,
    /// Granularity of the weight scales.
    pub weights: ScaleGranularity,
    /// Granularity of the (static, calibrated) activation scales.
    pub activations: ScaleGranularity,
    /// Linear layers computed in 8 bits.
    pub layers: usize,
    /// Layers kept in the graph's own precision: module-name prefixes (`*` stands for any block).
    #[serde(default)]
    pub kept: Vec<String>,
    /// How the activation scales were calibrated.
    pub calibration: Calibration,
}

/// The 8-bit number format of a quantized graph.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum QuantFormat {
    /// FP8 E4M3 (no infinities, +-448): what TensorRT's FP8 GEMMs take (compute capability 8.9+).
    #[serde(rename = "float8e4m3fn")]
    Float8E4m3fn,
}

/// One scale per tensor or per output channel.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum ScaleGranularity {
    PerTensor,
    PerChannel,
}

/// Calibration of the activation scales.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct Calibration {
    /// `max`: the largest magnitude seen (the FP8 recipes' method).
    pub method: CalibrationMethod,
    /// Denoising runs of the pipeline calibrated on.
    pub runs: usize,
    /// Steps of each run.
    pub steps: u32,
    /// Forward calls of the component observed (steps x true-CFG branches x runs).
    pub calls: usize,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum CalibrationMethod {
    Max,
}

/// A required key whose value may be `null` (serde's default would also accept it missing).
fn nullable<'de, D: Deserializer<'de>, T: Deserialize<'de>>(d: D) -> Result<Option<T>, D::Error> {
    Option::<T>::deserialize(d)
}

/// The schema of a [`nullable`] key: `T` or `null`, and required (schemars makes `Option` optional).
struct Nullable<T>(std::marker::PhantomData<T>);

impl<T: JsonSchema> JsonSchema for Nullable<T> {
    fn inline_schema() -> bool {
        true
    }
    fn schema_name() -> std::borrow::Cow<'static, str> {
        format!("Nullable_{}", T::schema_name()).into()
    }
    fn json_schema(generator: &mut schemars::SchemaGenerator) -> schemars::Schema {
        Option::<T>::json_schema(generator)
    }
}

impl Manifest {
    /// Parses a manifest: format and version first, then every key (errors name the key).
    /// `path` is only used in error messages.
    pub fn parse(text: &str, path: &Path) -> Result<Manifest, Error> {
        #[derive(Deserialize)]
        struct Header {
            format: Option<serde_json::Value>,
            format_version: Option<serde_json::Value>,
        }
        let corrupt = |key: String, e: &serde_json::Error| Error::CorruptManifest {
            path: path.to_path_buf(),
            key,
            line: e.line(),
            column: e.column(),
            message: strip_position(&e.to_string()),
        };
        let header: Header = serde_json::from_str(text).map_err(|e| corrupt(String::new(), &e))?;
        let missing = |key: &str| Error::CorruptManifest {
            path: path.to_path_buf(),
            key: String::new(),
            line: 1,
            column: 1,
            message: format!("missing field `{key}`"),
        };
        match header.format {
            None => return Err(missing("format")),
            Some(serde_json::Value::String(s)) if s == FORMAT => {}
            Some(other) => return Err(Error::UnsupportedFormat { path: path.to_path_buf(), found: other.to_string() }),
        }
        match header.format_version {
            None => return Err(missing("format_version")),
            Some(v) if v.as_u64() == Some(FORMAT_VERSION) => {}
            Some(other) => return Err(Error::UnsupportedVersion { path: path.to_path_buf(), found: other.to_string() }),
        }
        let mut de = serde_json::Deserializer::from_str(text);
        let manifest: Manifest = serde_path_to_error::deserialize(&mut de).map_err(|e| {
            let key = e.path().to_string();
            corrupt(key, e.inner())
        })?;
        de.end().map_err(|e| corrupt(String::new(), &e))?;
        Ok(manifest)
    }

    /// Semantic checks beyond the types; every problem found, in one list.
    pub fn problems(&self) -> Vec<String> {
        let mut p = Vec::new();
        if !self.dtype.is_float() {
            p.push(format!("`dtype` is {}, expected float32, float16 or bfloat16", self.dtype));
        }
        for name in COMPONENTS {
            if !self.components.contains_key(name) {
                p.push(format!("`components` has no `{name}`"));
            }
        }
        for (name, c) in &self.components {
            if let Err(e) = plain_file_name(&c.file) {
                p.push(format!("`components.{name}.file`: {e}"));
            }
            if !is_sha256(&c.sha256) {
                p.push(format!("`components.{name}.sha256` is not 64 hex digits"));
            }
            for x in &c.external_data {
                if let Err(e) = plain_file_name(&x.file) {
                    p.push(format!("`components.{name}.external_data`: {e}"));
                }
                if x.sha256.as_deref().is_some_and(|h| !is_sha256(h)) {
                    p.push(format!("`components.{name}.external_data` {}: sha256 is not 64 hex digits", x.file));
                }
            }
            if c.outputs.is_empty() {
                p.push(format!("`components.{name}.outputs` is empty"));
            }
        }
        if let Err(e) = plain_file_name(&self.tokenizer) {
            p.push(format!("`tokenizer`: {e}"));
        }
        if self.prompt.template.matches("{}").count() != 1 {
            p.push("`prompt.template` must hold exactly one `{}` (the user text)".into());
        }
        match (self.variant, &self.prompt.image_template, self.vision.condition_area) {
            (Variant::Edit, None, None) => {}
            (Variant::Edit, _, _) => {
                p.push("variant `edit` takes `prompt.image_template` and `vision.condition_area` null".into())
            }
            (Variant::EditPlus, Some(t), Some(area)) => {
                if t.matches("{}").count() != 1 {
                    p.push("`prompt.image_template` must hold exactly one `{}` (the image index)".into());
                }
                if area == 0 {
                    p.push("`vision.condition_area` must be positive".into());
                }
            }
            (Variant::EditPlus, _, _) => {
                p.push("variant `edit-plus` needs `prompt.image_template` and `vision.condition_area` (not null)".into())
            }
        }
        let v = &self.vae;
        if v.latents_mean.len() != v.z_dim || v.latents_std.len() != v.z_dim {
            p.push(format!(
                "`vae.latents_mean`/`latents_std` have {}/{} values, `vae.z_dim` is {}",
                v.latents_mean.len(),
                v.latents_std.len(),
                v.z_dim
            ));
        }
        if v.latents_std.iter().any(|s| !s.is_finite() || *s <= 0.0) {
            p.push("`vae.latents_std` must be positive".into());
        }
        if self.vision.image_std.iter().any(|s| !s.is_finite() || *s <= 0.0) {
            p.push("`vision.image_std` must be positive".into());
        }
        if self.vision.min_pixels > self.vision.max_pixels {
            p.push("`vision.min_pixels` is larger than `vision.max_pixels`".into());
        }
        if let Some(t) = self.components.get("transformer") {
            let has = t.inputs.iter().any(|i| i.name == "modulate_index");
            if has != self.transformer.zero_cond_t {
                p.push(format!(
                    "`transformer.zero_cond_t` is {} but the transformer {} a `modulate_index` input",
                    self.transformer.zero_cond_t,
                    if has { "has" } else { "lacks" }
                ));
            }
        }
        if self.profiles.batch_sizes.is_empty() || self.profiles.batch_sizes.contains(&0) {
            p.push("`profiles.batch_sizes` must list batch sizes of at least 1".into());
        }
        for (name, q) in self.quantization.iter().flatten() {
            if !self.components.contains_key(name) {
                p.push(format!("`quantization.{name}`: the bundle has no component `{name}`"));
            }
            if q.layers == 0 {
                p.push(format!("`quantization.{name}.layers` is 0: a quantized graph quantizes at least one layer"));
            }
        }
        p
    }
}

/// Where the JSON Schema of `manifest.json` is committed, relative to the repository root. It is
/// generated from [`Manifest`] (the one declaration of the format) and read by the export tool,
/// which validates every manifest against it before writing; a unit test keeps the file current.
pub const SCHEMA_PATH: &str = "engines/manifest.schema.json";

/// The JSON Schema (draft 2020-12) of `manifest.json`, generated from [`Manifest`].
pub fn manifest_schema() -> serde_json::Value {
    let schema = schemars::generate::SchemaSettings::draft2020_12().into_generator().into_root_schema_for::<Manifest>();
    serde_json::to_value(schema).expect("a JSON Schema serializes")
}

/// serde_json messages end in " at line L column C"; the error variant says it already.
fn strip_position(msg: &str) -> String {
    match msg.rfind(" at line ") {
        Some(i) if msg[i..].contains(" column ") => msg[..i].to_string(),
        _ => msg.to_string(),
    }
}

fn is_sha256(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| b.is_ascii_hexdigit())
}

/// A file name must stay inside the bundle: relative, no `..`, not empty.
fn plain_file_name(name: &str) -> Result<(), String> {
    let p = Path::new(name);
    if name.is_empty() {
        return Err("empty file name".into());
    }
    if p.components().any(|c| !matches!(c, PathPart::Normal(_))) {
        return Err(format!("`{name}` must be a relative path inside the bundle (no `/` root, no `..`)"));
    }
    Ok(())
}

impl fmt::Display for Variant {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Variant::Edit => "edit",
            Variant::EditPlus => "edit-plus",
        })
    }
}

/// The manifest contract between the export tool and the server: the committed schema is the one
/// the Rust types generate, and every committed manifest satisfies it and parses.
#[cfg(test)]
mod contract {
    use super::*;
    use crate::bundle::MANIFEST;
    use std::path::PathBuf;

    fn root() -> &'static Path {
        Path::new(env!("CARGO_MANIFEST_DIR"))
    }

    /// Every committed `engines/*/manifest.json`.
    fn committed_manifests() -> Vec<PathBuf> {
        let mut v: Vec<PathBuf> = std::fs::read_dir(root().join("engines"))
            .unwrap()
            .map(|e| e.unwrap().path().join(MANIFEST))
            .filter(|p| p.is_file())
            .collect();
        v.sort();
        v
    }

    #[test]
    fn committed_schema_is_the_one_the_types_generate() {
        let path = root().join(SCHEMA_PATH);
        let generated = serde_json::to_string_pretty(&manifest_schema()).unwrap() + "\n";
        if std::env::var_os("QWEN_EDIT_BLESS").is_some() {
            std::fs::write(&path, &generated).unwrap();
        }
        let committed = std::fs::read_to_string(&path).unwrap_or_default();
        assert!(
            committed == generated,
            "{SCHEMA_PATH} is not what the manifest types generate; after changing them run \
             `QWEN_EDIT_BLESS=1 cargo test --lib bundle::manifest::contract` and commit the file (the export tool reads it)"
        );
    }

    #[test]
    fn every_committed_manifest_satisfies_the_schema_and_parses() {
        let validator = jsonschema::validator_for(&manifest_schema()).unwrap();
        let manifests = committed_manifests();
        assert!(manifests.len() >= 3, "{manifests:?}");
        for path in manifests {
            let text = std::fs::read_to_string(&path).unwrap();
            let value: serde_json::Value = serde_json::from_str(&text).unwrap();
            let errors: Vec<String> = validator.iter_errors(&value).map(|e| format!("{}: {e}", e.instance_path())).collect();
            assert!(errors.is_empty(), "{}: {errors:?}", path.display());
            let m = Manifest::parse(&text, &path).unwrap();
            assert_eq!(m.problems(), Vec::<String>::new(), "{}", path.display());
        }
    }

    fn quantization_record() -> serde_json::Value {
        serde_json::json!({"transformer": {
            "format": "float8e4m3fn", "weights": "per-channel", "activations": "per-tensor", "layers": 21,
            "kept": ["img_in", "proj_out"], "calibration": {"method": "max", "runs": 4, "steps": 4, "calls": 32}
        }})
    }

    fn quantization_with(key: &str, value: serde_json::Value) -> serde_json::Value {
        let mut q = quantization_record();
        q["transformer"][key] = value;
        q
    }

    fn quantization_without(key: &str) -> serde_json::Value {
        let mut q = quantization_record();
        q["transformer"].as_object_mut().unwrap().remove(key);
        q
    }

    /// The schema refuses what the loader refuses (and accepts what it accepts), on the key kinds
    /// that broke before: a required key missing, a nullable key absent, an optional key absent.
    #[test]
    fn schema_and_loader_agree_on_missing_and_null_keys() {
        let validator = jsonschema::validator_for(&manifest_schema()).unwrap();
        let base: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(root().join("engines/tiny/manifest.json")).unwrap()).unwrap();
        type Edit = Box<dyn Fn(&mut serde_json::Value)>;
        let edits: Vec<(&str, Edit)> = vec![
            ("source.seed absent", Box::new(|m| drop(m["source"].as_object_mut().unwrap().remove("seed")))),
            ("source.seed null", Box::new(|m| m["source"]["seed"] = serde_json::Value::Null)),
            ("lightning absent", Box::new(|m| drop(m.as_object_mut().unwrap().remove("lightning")))),
            ("prompt.image_template absent", Box::new(|m| drop(m["prompt"].as_object_mut().unwrap().remove("image_template")))),
            ("vae.z_dim absent", Box::new(|m| drop(m["vae"].as_object_mut().unwrap().remove("z_dim")))),
            (
                "vision.processor_backend absent",
                Box::new(|m| drop(m["vision"].as_object_mut().unwrap().remove("processor_backend"))),
            ),
            ("dtype short name", Box::new(|m| m["dtype"] = "f32".into())),
            ("io dtype", Box::new(|m| m["components"]["vae_decoder"]["inputs"][0]["dtype"] = "float16".into())),
            ("dtype unknown", Box::new(|m| m["dtype"] = "float8".into())),
            (
                "lightning record",
                Box::new(|m| {
                    m["lightning"] =
                        serde_json::json!({"lora": "l.safetensors", "sha256": null, "modules": 4, "rank": 4, "scale": 1.0})
                }),
            ),
            (
                "lightning without rank",
                Box::new(|m| m["lightning"] = serde_json::json!({"lora": "l.safetensors", "modules": 4, "scale": 1.0})),
            ),
            (
                "external data as objects",
                Box::new(|m| {
                    m["components"]["transformer"]["external_data"] = serde_json::json!([{"file": "t.data", "sha256": null}])
                }),
            ),
            ("unknown extra key", Box::new(|m| m["exporter_note"] = "hello".into())),
            ("quantization null", Box::new(|m| m["quantization"] = serde_json::Value::Null)),
            ("quantization record", Box::new(|m| m["quantization"] = quantization_record())),
            ("quantization format unknown", Box::new(|m| m["quantization"] = quantization_with("format", "int4".into()))),
            ("quantization without calibration", Box::new(|m| m["quantization"] = quantization_without("calibration"))),
        ];
        for (what, edit) in edits {
            let mut m = base.clone();
            edit(&mut m);
            let schema_ok = validator.is_valid(&m);
            let loader_ok = Manifest::parse(&m.to_string(), Path::new("m.json")).is_ok();
            assert_eq!(schema_ok, loader_ok, "{what}: schema says {schema_ok}, loader says {loader_ok}");
        }
    }
}
