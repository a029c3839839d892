//! ONNX graph inspection (onnx-protobuf): IO names, dtypes, symbolic dims, external data, precision;
//! and TensorRT optimization profiles (min/opt/max per dynamic dim) derived from a bundle's settings.

use onnx_protobuf::{
    attribute_proto::AttributeType, tensor_proto::DataLocation, tensor_shape_proto::dimension, type_proto, GraphProto, Message,
    ModelProto, TensorProto, ValueInfoProto,
};
use serde::Serialize;
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use crate::bundle::{Manifest, Variant};
use crate::runtime::{DType, Dim, TensorInfo};

/// Errors of ONNX inspection and profile derivation.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot read {path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{path} is not a valid ONNX model: {reason}")]
    Parse { path: PathBuf, reason: String },
    #[error("{path}: {reason}")]
    Unsupported { path: PathBuf, reason: String },
    #[error("cannot derive optimization profiles for {component}: {reason}")]
    Profile { component: String, reason: String },
}

/// Name used for a dynamic dim that has no symbolic name in the graph.
pub const UNNAMED_DIM: &str = "?";

/// What an ONNX file declares, read without touching its weights.
#[derive(Clone, Debug, Serialize)]
pub struct OnnxInfo {
    pub ir_version: i64,
    pub producer: String,
    /// (domain, version); the default domain is "".
    pub opsets: Vec<(String, i64)>,
    pub inputs: Vec<TensorInfo>,
    pub outputs: Vec<TensorInfo>,
    /// External data files the initializers point at (relative to the model's directory), sorted.
    pub external_data: Vec<String>,
    pub nodes: usize,
    pub initializers: usize,
    pub precision: Precision,
    /// Sizes of the weights, read from the initializers' shapes (external data is never read).
    pub weights: WeightSummary,
}

/// The weights of a graph: bytes and the widths the activation estimate needs (`builder::memory`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct WeightSummary {
    pub bytes: u64,
    /// Most frequent dim of the 2-D weights (the model width; ties: the larger).
    pub model_width: usize,
    /// Largest dim of the 2-D weights up to 8 x the model width (an MLP's hidden width; vocabularies excluded).
    pub max_width: usize,
    /// Channels of the convolution that meets the 3 image channels (a VAE's full-resolution width), 0 if none.
    pub image_channels: usize,
}

/// The numeric precision an ONNX graph carries (TensorRT builds it strongly typed, as is).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Precision {
    /// Float element types of the initializers (weights), e.g. ["bf16"].
    pub weight_types: Vec<String>,
    /// QuantizeLinear/DequantizeLinear nodes are present.
    pub qdq: bool,
    /// FP8 (float8e4m3/e5m2) tensors are present: an FP8-quantized graph.
    pub fp8: bool,
}

impl Precision {
    /// One word for reports: fp8, int8, bf16, fp16, fp32 or mixed.
    pub fn summary(&self) -> String {
        if self.fp8 {
            return "fp8".into();
        }
        if self.qdq {
            return "int8".into();
        }
        match self.weight_types.as_slice() {
            [] => "fp32".into(),
            [one] => one.clone(),
            _ => "mixed".into(),
        }
    }
}

// ONNX TensorProto.DataType values.
const ONNX_FLOAT: i32 = 1;
const ONNX_INT32: i32 = 6;
const ONNX_INT64: i32 = 7;
const ONNX_BOOL: i32 = 9;
const ONNX_FLOAT16: i32 = 10;
const ONNX_DOUBLE: i32 = 11;
const ONNX_BFLOAT16: i32 = 16;
const ONNX_FLOAT8: std::ops::RangeInclusive<i32> = 17..=20;

fn onnx_dtype_name(t: i32) -> &'static str {
    match t {
        ONNX_FLOAT => "fp32",
        2 => "u8",
        3 => "i8",
        ONNX_INT32 => "i32",
        ONNX_INT64 => "i64",
        ONNX_BOOL => "bool",
        ONNX_FLOAT16 => "fp16",
        ONNX_DOUBLE => "fp64",
        ONNX_BFLOAT16 => "bf16",
        17 => "fp8e4m3fn",
        18 => "fp8e4m3fnuz",
        19 => "fp8e5m2",
        20 => "fp8e5m2fnuz",
        _ => "other",
    }
}

fn to_dtype(t: i32) -> Option<DType> {
    Some(match t {
        ONNX_FLOAT => DType::F32,
        ONNX_FLOAT16 => DType::F16,
        ONNX_BFLOAT16 => DType::BF16,
        ONNX_INT64 => DType::I64,
        ONNX_INT32 => DType::I32,
        ONNX_BOOL => DType::Bool,
        _ => return None,
    })
}

/// Reads and inspects the ONNX file at `path` (external weights are never read).
pub fn inspect(path: &Path) -> Result<OnnxInfo, Error> {
    let bytes = std::fs::read(path).map_err(|source| Error::Io { path: path.to_path_buf(), source })?;
    inspect_bytes(&bytes, path)
}

/// Inspects an ONNX model held in memory; `path` names it in errors.
pub fn inspect_bytes(bytes: &[u8], path: &Path) -> Result<OnnxInfo, Error> {
    let model =
        ModelProto::parse_from_bytes(bytes).map_err(|e| Error::Parse { path: path.to_path_buf(), reason: e.to_string() })?;
    let Some(graph) = model.graph.as_ref() else {
        return Err(Error::Parse { path: path.to_path_buf(), reason: "the model has no graph".into() });
    };
    let initializer_names: BTreeSet<&str> = graph.initializer.iter().map(|t| t.name.as_str()).collect();
    let io = |v: &ValueInfoProto| value_info(v).map_err(|reason| Error::Unsupported { path: path.to_path_buf(), reason });
    // Old IR versions list initializers among the graph inputs: those are weights, not inputs.
    let inputs =
        graph.input.iter().filter(|v| !initializer_names.contains(v.name.as_str())).map(io).collect::<Result<Vec<_>, _>>()?;
    let outputs = graph.output.iter().map(io).collect::<Result<Vec<_>, _>>()?;

    let mut scan = Scan::default();
    scan.graph(graph);
    let weights = scan.weight_summary();
    Ok(OnnxInfo {
        ir_version: model.ir_version,
        producer: format!("{} {}", model.producer_name, model.producer_version).trim().to_string(),
        opsets: model.opset_import.iter().map(|o| (o.domain.clone(), o.version)).collect(),
        inputs,
        outputs,
        external_data: scan.external.into_iter().collect(),
        nodes: scan.nodes,
        initializers: scan.initializers,
        precision: Precision { weight_types: scan.weight_types.into_iter().collect(), qdq: scan.qdq, fp8: scan.fp8 },
        weights,
    })
}

/// Walks a graph and its subgraphs (If/Loop bodies) for weights, external data and quantization.
#[derive(Default)]
struct Scan {
    external: BTreeSet<String>,
    weight_types: BTreeSet<String>,
    qdq: bool,
    fp8: bool,
    nodes: usize,
    initializers: usize,
    weight_bytes: u64,
    /// dim -> how many 2-D float weights have it.
    matrix_dims: BTreeMap<usize, usize>,
    image_channels: usize,
}

/// Bytes per element of an ONNX data type (0 for strings and unknown types).
fn element_bytes(t: i32) -> u64 {
    match t {
        ONNX_DOUBLE | ONNX_INT64 | 13 => 8,
        ONNX_FLOAT | ONNX_INT32 | 12 => 4,
        ONNX_FLOAT16 | ONNX_BFLOAT16 | 4 | 5 => 2,
        2 | 3 | ONNX_BOOL => 1,
        t if ONNX_FLOAT8.contains(&t) => 1,
        _ => 0,
    }
}

impl Scan {
    fn weight_summary(&self) -> WeightSummary {
        let model_width = self.matrix_dims.iter().max_by_key(|(d, n)| (**n, **d)).map_or(0, |(d, _)| *d);
        let max_width = self.matrix_dims.keys().filter(|d| **d <= 8 * model_width).max().copied().unwrap_or(0);
        WeightSummary { bytes: self.weight_bytes, model_width, max_width, image_channels: self.image_channels }
    }

    fn tensor(&mut self, t: &TensorProto) {
        self.initializers += 1;
        let dims: Vec<usize> = t.dims.iter().map(|d| (*d).max(0) as usize).collect();
        self.weight_bytes += dims.iter().product::<usize>() as u64 * element_bytes(t.data_type);
        let float = matches!(t.data_type, ONNX_FLOAT | ONNX_FLOAT16 | ONNX_BFLOAT16) || ONNX_FLOAT8.contains(&t.data_type);
        if float && dims.len() == 2 && dims.iter().all(|d| *d > 1) {
            for d in &dims {
                *self.matrix_dims.entry(*d).or_default() += 1;
            }
        }
        if float && dims.len() >= 4 {
            match (dims[0], dims[1]) {
                (3, c) | (c, 3) if c > 3 => self.image_channels = self.image_channels.max(c),
                _ => {}
            }
        }
        if matches!(t.data_type, ONNX_FLOAT | ONNX_FLOAT16 | ONNX_BFLOAT16 | ONNX_DOUBLE) && t.dims.iter().product::<i64>() > 1 {
            self.weight_types.insert(onnx_dtype_name(t.data_type).to_string());
        }
        if ONNX_FLOAT8.contains(&t.data_type) {
            self.fp8 = true;
        }
        if t.data_location.enum_value_or_default() == DataLocation::EXTERNAL {
            if let Some(loc) = t.external_data.iter().find(|e| e.key == "location") {
                self.external.insert(loc.value.clone());
            }
        }
    }

    fn graph(&mut self, g: &GraphProto) {
        for t in &g.initializer {
            self.tensor(t);
        }
        for v in g.value_info.iter().chain(&g.input).chain(&g.output) {
            if let Some(type_proto::Value::TensorType(t)) = v.type_.as_ref().and_then(|t| t.value.as_ref()) {
                if ONNX_FLOAT8.contains(&t.elem_type) {
                    self.fp8 = true;
                }
            }
        }
        for n in &g.node {
            self.nodes += 1;
            if matches!(n.op_type.as_str(), "QuantizeLinear" | "DequantizeLinear") {
                self.qdq = true;
            }
            for a in &n.attribute {
                // Cast(to=FLOAT8*), QuantizeLinear(output_dtype=FLOAT8*)
                if matches!(a.name.as_str(), "to" | "output_dtype") && ONNX_FLOAT8.contains(&(a.i as i32)) {
                    self.fp8 = true;
                }
                if let Some(t) = a.t.as_ref() {
                    self.tensor(t);
                }
                match a.type_.enum_value_or_default() {
                    AttributeType::GRAPH => {
                        if let Some(sub) = a.g.as_ref() {
                            self.graph(sub);
                        }
                    }
                    AttributeType::GRAPHS => a.graphs.iter().for_each(|sub| self.graph(sub)),
                    _ => {}
                }
            }
        }
    }
}

fn value_info(v: &ValueInfoProto) -> Result<TensorInfo, String> {
    let Some(type_proto::Value::TensorType(t)) = v.type_.as_ref().and_then(|t| t.value.as_ref()) else {
        return Err(format!("`{}` is not a tensor (sequences, maps and optionals are not supported)", v.name));
    };
    let dtype = to_dtype(t.elem_type).ok_or_else(|| {
        format!("`{}` has element type {} which the engines do not support", v.name, onnx_dtype_name(t.elem_type))
    })?;
    let Some(shape) = t.shape.as_ref() else {
        return Err(format!("`{}` has no declared shape (rank unknown)", v.name));
    };
    let dims = shape
        .dim
        .iter()
        .map(|d| match &d.value {
            Some(dimension::Value::DimValue(n)) if *n >= 0 => Dim::Fixed(*n as usize),
            Some(dimension::Value::DimParam(p)) if !p.is_empty() => Dim::Dynamic(p.clone()),
            _ => Dim::Dynamic(UNNAMED_DIM.to_string()),
        })
        .collect();
    Ok(TensorInfo { name: v.name.clone(), dtype, shape: dims })
}

// ---------------------------------------------------------------------------------------------
// Optimization profiles

/// Geometry and limits that bound every dynamic dim of the bundle's graphs.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ProfileSettings {
    pub variant: Variant,
    /// Requests per batch the server may form (BATCH_SIZE values); min/opt/max come from it.
    pub batch_sizes: Vec<usize>,
    /// `[width, height]` output sizes to support (multiples of 16).
    pub resolutions: Vec<[u32; 2]>,
    /// Longest text-encoder output after the system-prompt drop (= transformer `txt_seq`).
    pub max_text_tokens: usize,
    /// System-prompt tokens dropped after the text encoder (`seq = drop_tokens + txt_seq`).
    pub drop_tokens: usize,
    /// Pixel area of the VAE (condition) image.
    pub vae_image_area: u64,
    pub vae_scale: usize,
    /// Transformer patch size (2): packed tokens = (lh/2)*(lw/2).
    pub latent_patch: usize,
    pub vision_patch: usize,
    pub vision_merge: usize,
    pub vision_min_pixels: u64,
    pub vision_max_pixels: u64,
    /// Edit-plus: pixel area of the VL copy of each image (v1 feeds the VAE-sized image).
    pub condition_area: Option<u64>,
    /// Images per request (1 for v1; edit-plus accepts several).
    pub max_images: usize,
    /// Whether true CFG may run (cond + uncond as one batch of 2B through text encoder and transformer).
    pub cfg: bool,
}

/// Edit-plus requests take up to this many images by default (the reference pipeline's examples use 1-3).
pub const DEFAULT_MAX_IMAGES_PLUS: usize = 3;

impl ProfileSettings {
    pub fn from_manifest(m: &Manifest) -> ProfileSettings {
        ProfileSettings {
            variant: m.variant,
            batch_sizes: m.profiles.batch_sizes.clone(),
            resolutions: m.profiles.resolutions.clone(),
            max_text_tokens: m.profiles.max_text_tokens,
            drop_tokens: m.prompt.drop_tokens,
            vae_image_area: m.vae.image_area,
            vae_scale: m.vae.scale_factor,
            latent_patch: m.transformer.patch_size,
            vision_patch: m.vision.patch_size,
            vision_merge: m.vision.merge_size,
            vision_min_pixels: m.vision.min_pixels,
            vision_max_pixels: m.vision.max_pixels,
            condition_area: m.vision.condition_area,
            max_images: match m.variant {
                Variant::Edit => 1,
                Variant::EditPlus => DEFAULT_MAX_IMAGES_PLUS,
            },
            cfg: true,
        }
    }
}

/// min/opt/max of one dim.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct DimRange {
    pub min: usize,
    pub opt: usize,
    pub max: usize,
}

impl DimRange {
    fn new(min: usize, opt: usize, max: usize) -> DimRange {
        DimRange { min, opt: opt.clamp(min, max.max(min)), max: max.max(min) }
    }
    fn fixed(n: usize) -> DimRange {
        DimRange { min: n, opt: n, max: n }
    }
}

/// Shapes of one input within one optimization profile.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct InputProfile {
    pub name: String,
    pub min: Vec<usize>,
    pub opt: Vec<usize>,
    pub max: Vec<usize>,
}

/// One optimization profile: shapes of every input.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Profile {
    pub inputs: Vec<InputProfile>,
}

/// `calculate_dimensions(target_area, ratio)` of the reference pipeline: (width, height), multiples of 32.
pub fn calculate_dimensions(target_area: u64, ratio: f64) -> (u32, u32) {
    let (w, h) = crate::pipeline::latents::calculate_dimensions(target_area, ratio);
    (u32::try_from(w).unwrap_or(u32::MAX), u32::try_from(h).unwrap_or(u32::MAX))
}

/// transformers' `smart_resize` (the pipeline's, [`crate::pipeline::vision::smart_resize`]) with
/// its error as text.
fn smart_resize(height: u64, width: u64, factor: u64, min_pixels: u64, max_pixels: u64) -> Result<(u64, u64), String> {
    if factor == 0 {
        return Err("smart_resize factor 0".into());
    }
    crate::pipeline::vision::smart_resize(height, width, factor, min_pixels, max_pixels).map_err(|e| e.to_string())
}

/// Rejects settings no profile can be derived from; else the pixels per packed token side (16).
fn check_settings(s: &ProfileSettings) -> Result<usize, String> {
    if s.batch_sizes.is_empty() || s.batch_sizes.contains(&0) {
        return Err(format!("profiles.batch_sizes must be positive, got {:?}", s.batch_sizes));
    }
    if s.resolutions.is_empty() {
        return Err("profiles.resolutions is empty".into());
    }
    if s.max_text_tokens == 0
        || s.max_images == 0
        || s.vae_scale == 0
        || s.latent_patch == 0
        || s.vision_patch == 0
        || s.vision_merge == 0
    {
        return Err("max_text_tokens, max_images and the patch/scale factors must be positive".into());
    }
    let cell = s.vae_scale * s.latent_patch; // pixels per packed token side (16)
    for &[w, h] in &s.resolutions {
        if w == 0 || h == 0 || w as usize % cell != 0 || h as usize % cell != 0 {
            return Err(format!("resolution {w}x{h} is not a positive multiple of {cell}"));
        }
    }
    Ok(cell)
}

/// The sizes one output resolution gives the graphs.
struct Geometry {
    target_tokens: usize,
    cond: (usize, usize), // (w, h) pixels of the VAE condition image
    cond_tokens: usize,
    latent: (usize, usize), // (lw, lh) of the output
    vl_tokens: usize,       // merged vision tokens of one image
    vl_patches: usize,
}

impl Geometry {
    /// The geometry of a `w`x`h` output (`cell`: pixels per packed token side, from [`check_settings`]).
    fn of(&[w, h]: &[u32; 2], s: &ProfileSettings, cell: usize) -> Result<Geometry, String> {
        let factor = (s.vision_patch * s.vision_merge) as u64;
        let ratio = w as f64 / h as f64;
        let (cw, ch) = calculate_dimensions(s.vae_image_area, ratio);
        let (lw, lh) = (w as usize / s.vae_scale, h as usize / s.vae_scale);
        let cond_tokens = (ch as usize / cell) * (cw as usize / cell);
        let (vw, vh) = match (s.variant, s.condition_area) {
            (Variant::EditPlus, Some(area)) => calculate_dimensions(area, ratio),
            _ => (cw, ch),
        };
        let (rh, rw) = smart_resize(vh as u64, vw as u64, factor, s.vision_min_pixels, s.vision_max_pixels)
            .map_err(|e| format!("vision size of a {w}x{h} output: {e}"))?;
        let patches = (rh / s.vision_patch as u64) as usize * (rw / s.vision_patch as u64) as usize;
        Ok(Geometry {
            target_tokens: (lh / s.latent_patch) * (lw / s.latent_patch),
            cond: (cw as usize, ch as usize),
            cond_tokens,
            latent: (lw, lh),
            vl_tokens: patches / (s.vision_merge * s.vision_merge),
            vl_patches: patches,
        })
    }
}

/// Sizes every dynamic dim of the bundle can take for one component (batches up to the largest batch size).
pub fn dim_ranges(component: &str, s: &ProfileSettings) -> Result<BTreeMap<String, DimRange>, Error> {
    let largest = s.batch_sizes.iter().copied().max().unwrap_or(1);
    dim_ranges_for(component, s, largest)
}

/// The batch-size groups of the profiles: one per configured batch size (`profiles.batch_sizes`, the
/// BATCH_SIZE values) and always one of 1, smallest first; a batch runs on the smallest group that holds it.
/// The group of 1 is there even when the list leaves 1 out (`[4]`, `build --batch-sizes 2,4`): a lone
/// request, the common case at low load, then still runs on tactics tuned for one request, not for a full batch.
pub fn batch_groups(s: &ProfileSettings) -> Vec<usize> {
    let mut g = s.batch_sizes.clone();
    g.push(1);
    g.sort_unstable();
    g.dedup();
    g
}

/// [`dim_ranges`] for batches of up to `requests` requests, tuned (opt) for exactly `requests`.
pub fn dim_ranges_for(component: &str, s: &ProfileSettings, requests: usize) -> Result<BTreeMap<String, DimRange>, Error> {
    let err = |reason: String| Error::Profile { component: component.to_string(), reason };
    let cell = check_settings(s).map_err(err)?;
    let geo: Vec<Geometry> = s.resolutions.iter().map(|r| Geometry::of(r, s, cell)).collect::<Result<_, _>>().map_err(err)?;
    // The resolution tuned for: the one whose area is closest to the VAE image area (the default output).
    let opt_i = s
        .resolutions
        .iter()
        .enumerate()
        .min_by_key(|(_, [w, h])| (*w as u64 * *h as u64).abs_diff(s.vae_image_area))
        .map(|(i, _)| i)
        .unwrap_or(0);
    let g_opt = &geo[opt_i];
    let mn = |f: &dyn Fn(&Geometry) -> usize| geo.iter().map(f).min().unwrap_or(0);
    let mx = |f: &dyn Fn(&Geometry) -> usize| geo.iter().map(f).max().unwrap_or(0);

    let bs_max = requests.max(1);
    let cfg = if s.cfg { 2 } else { 1 };
    // Rows per request in each graph's batch: prompts (x2 with CFG) or images.
    let per_request = match component {
        "text_encoder" | "transformer" => cfg,
        "vae_encoder" => s.max_images,
        _ => 1,
    };
    // From one row (a lone request without true CFG, one image) whatever the smallest configured batch size:
    // the server forms batches of up to BATCH_SIZE requests, so any batch may hold a single request.
    let batch = DimRange::new(1, bs_max * per_request, bs_max * per_request);

    let txt_opt = (g_opt.vl_tokens + 64).min(s.max_text_tokens);
    let txt = DimRange::new(1, txt_opt, s.max_text_tokens);
    let seq = DimRange::new(1, s.drop_tokens + txt_opt, s.drop_tokens + s.max_text_tokens);
    // Vision patches of every image of every prompt in the batch.
    let te_rows_max = bs_max * cfg;
    let patches =
        DimRange::new(mn(&|g| g.vl_patches), g_opt.vl_patches * te_rows_max, mx(&|g| g.vl_patches) * te_rows_max * s.max_images);
    let merge = s.vision_merge * s.vision_merge;
    let units = DimRange::new(patches.min / merge, patches.opt / merge, patches.max / merge);
    let img_seq = DimRange::new(
        mn(&|g| g.target_tokens + g.cond_tokens),
        g_opt.target_tokens + g_opt.cond_tokens,
        mx(&|g| g.target_tokens) + s.max_images * mx(&|g| g.cond_tokens),
    );

    let mut r = BTreeMap::new();
    r.insert("batch".to_string(), batch);
    r.insert("seq".to_string(), seq);
    r.insert("txt_seq".to_string(), txt);
    r.insert("patches".to_string(), patches);
    r.insert("units".to_string(), units);
    r.insert("img_seq".to_string(), img_seq);
    // VAE encoder input: the condition images; decoder input: output latents.
    r.insert("height".to_string(), DimRange::new(mn(&|g| g.cond.1), g_opt.cond.1, mx(&|g| g.cond.1)));
    r.insert("width".to_string(), DimRange::new(mn(&|g| g.cond.0), g_opt.cond.0, mx(&|g| g.cond.0)));
    r.insert("lh".to_string(), DimRange::new(mn(&|g| g.latent.1), g_opt.latent.1, mx(&|g| g.latent.1)));
    r.insert("lw".to_string(), DimRange::new(mn(&|g| g.latent.0), g_opt.latent.0, mx(&|g| g.latent.0)));
    Ok(r)
}

/// Optimization profiles for a component's inputs, one per batch-size group ([`batch_groups`]): profile k
/// holds batches of 1 up to group k's requests and is tuned (opt) for a full batch of that group, so a
/// batch of one runs on tactics chosen for one, a full batch on tactics chosen for it; every profile covers
/// every resolution (fixed dims are exact; every dynamic dim must have a rule in `dim_ranges`). At run time
/// the smallest profile that holds a batch's shapes is chosen (runtime::tensorrt::plan_run).
pub fn derive_profiles(component: &str, inputs: &[TensorInfo], s: &ProfileSettings) -> Result<Vec<Profile>, Error> {
    check_settings(s).map_err(|reason| Error::Profile { component: component.to_string(), reason })?;
    batch_groups(s).into_iter().map(|g| profile_for(component, inputs, &dim_ranges_for(component, s, g)?)).collect()
}

/// One profile of `inputs` from the ranges of their dims.
fn profile_for(component: &str, inputs: &[TensorInfo], ranges: &BTreeMap<String, DimRange>) -> Result<Profile, Error> {
    let err = |reason: String| Error::Profile { component: component.to_string(), reason };
    let mut profile = Profile { inputs: Vec::new() };
    for input in inputs {
        let mut p = InputProfile { name: input.name.clone(), min: vec![], opt: vec![], max: vec![] };
        for (axis, d) in input.shape.iter().enumerate() {
            let r = match d {
                Dim::Fixed(n) => DimRange::fixed(*n),
                Dim::Dynamic(name) if name == UNNAMED_DIM => {
                    return Err(err(format!(
                        "input `{}` axis {axis} is dynamic without a name: export it with a symbolic dim",
                        input.name
                    )))
                }
                Dim::Dynamic(name) => *ranges.get(name).ok_or_else(|| {
                    err(format!(
                        "input `{}` axis {axis} has dynamic dim `{name}` with no profile rule (known: {})",
                        input.name,
                        ranges.keys().cloned().collect::<Vec<_>>().join(", ")
                    ))
                })?,
            };
            p.min.push(r.min);
            p.opt.push(r.opt);
            p.max.push(r.max);
        }
        profile.inputs.push(p);
    }
    Ok(profile)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    fn fixture(name: &str) -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/onnx").join(name)
    }

    /// Profile settings at the real models' defaults (1 MP, batch 1/2/4, CFG); other modules' tests start from them.
    pub(crate) fn settings(variant: Variant) -> ProfileSettings {
        ProfileSettings {
            variant,
            batch_sizes: vec![1, 2, 4],
            resolutions: vec![[1024, 1024], [1184, 880], [880, 1184]],
            max_text_tokens: 1536,
            drop_tokens: 64,
            vae_image_area: 1024 * 1024,
            vae_scale: 8,
            latent_patch: 2,
            vision_patch: 14,
            vision_merge: 2,
            vision_min_pixels: 56 * 56,
            vision_max_pixels: 12845056,
            condition_area: match variant {
                Variant::Edit => None,
                Variant::EditPlus => Some(384 * 384),
            },
            max_images: match variant {
                Variant::Edit => 1,
                Variant::EditPlus => 3,
            },
            cfg: true,
        }
    }

    fn dynamic(n: &str) -> Dim {
        Dim::Dynamic(n.into())
    }

    #[test]
    fn calculate_dimensions_matches_the_reference() {
        // Values of diffusers' calculate_dimensions(1024*1024, w/h).
        assert_eq!(calculate_dimensions(1024 * 1024, 1.0), (1024, 1024));
        assert_eq!(calculate_dimensions(1024 * 1024, 16.0 / 9.0), (1376, 768));
        assert_eq!(calculate_dimensions(384 * 384, 1.0), (384, 384));
        assert_eq!(calculate_dimensions(1024 * 1024, 0.75), (896, 1184));
    }

    #[test]
    fn inspects_io_with_symbolic_dims() {
        let info = inspect(&fixture("transformer_io.onnx")).unwrap();
        let names: Vec<&str> = info.inputs.iter().map(|i| i.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "hidden_states",
                "encoder_hidden_states",
                "encoder_hidden_states_mask",
                "timestep",
                "img_cos",
                "img_sin",
                "txt_cos",
                "txt_sin"
            ]
        );
        let ehs = &info.inputs[1];
        assert_eq!(ehs.dtype, DType::F32);
        assert_eq!(ehs.shape, vec![dynamic("batch"), dynamic("txt_seq"), Dim::Fixed(32)]);
        assert_eq!(info.inputs[2].dtype, DType::I64);
        assert_eq!(info.outputs[0].name, "sample");
        assert_eq!(info.outputs[0].shape, vec![dynamic("batch"), dynamic("img_seq"), Dim::Fixed(64)]);
        assert!(info.external_data.is_empty());
        assert_eq!(info.precision.summary(), "fp32");
    }

    #[test]
    fn initializers_listed_as_inputs_are_not_inputs() {
        let info = inspect(&fixture("old_ir_weights.onnx")).unwrap();
        assert_eq!(info.inputs.iter().map(|i| i.name.as_str()).collect::<Vec<_>>(), ["x"]);
        assert_eq!(info.initializers, 1);
    }

    #[test]
    fn external_data_is_listed_not_loaded() {
        let path = fixture("external.onnx");
        let info = inspect(&path).unwrap();
        assert_eq!(info.external_data, vec!["external.onnx.data".to_string()]);
        // The .onnx itself holds no weight bytes: it is much smaller than its data file.
        let onnx_len = std::fs::metadata(&path).unwrap().len();
        let data_len = std::fs::metadata(fixture("external.onnx.data")).unwrap().len();
        assert!(onnx_len < data_len, "{onnx_len} vs {data_len}");
        assert_eq!(info.precision.summary(), "fp16");
    }

    #[test]
    fn detects_fp8_qdq_and_bf16() {
        let q = inspect(&fixture("fp8_qdq.onnx")).unwrap();
        assert!(q.precision.qdq && q.precision.fp8, "{:?}", q.precision);
        assert_eq!(q.precision.summary(), "fp8");
        let b = inspect(&fixture("vae_decoder_bf16.onnx")).unwrap();
        assert_eq!(b.precision.summary(), "bf16");
        assert_eq!(b.inputs[0].dtype, DType::BF16);
        assert_eq!(b.inputs[0].shape, vec![dynamic("batch"), Dim::Fixed(16), dynamic("lh"), dynamic("lw")]);
    }

    #[test]
    fn bad_files_are_clean_errors() {
        let dir = tempfile::tempdir().unwrap();
        let junk = dir.path().join("junk.onnx");
        std::fs::write(&junk, b"\xff\xff\xff not protobuf").unwrap();
        assert!(matches!(inspect(&junk), Err(Error::Parse { .. })));
        assert!(matches!(inspect(&dir.path().join("missing.onnx")), Err(Error::Io { .. })));
        let e = inspect(&fixture("unsupported_dtype.onnx")).unwrap_err().to_string();
        assert!(e.contains("fp64"), "{e}");
    }

    #[test]
    fn profile_ranges_follow_the_geometry() {
        let s = settings(Variant::Edit);
        let r = dim_ranges("transformer", &s).unwrap();
        // batch: 1 request .. 4 requests x 2 (CFG), tuned for full batches.
        assert_eq!(r["batch"], DimRange { min: 1, opt: 8, max: 8 });
        // 1024x1024: 64x64 packed target tokens + the 1024x1024 condition image.
        assert_eq!(r["img_seq"].opt, 4096 + 4096);
        // 1184x880: 55x74 packed target tokens, its condition image is 1184x896 (56x74 tokens).
        assert_eq!(r["img_seq"].min, 4096 + 4096);
        assert_eq!(r["img_seq"].max, 4096 + 56 * 74);
        assert_eq!(r["txt_seq"].max, 1536);
        assert_eq!(r["seq"].max, 64 + 1536);
        assert_eq!(r["lh"], DimRange { min: 110, opt: 128, max: 148 });
        // v1 feeds the ~1MP image to the vision tower: 1024x1024 -> smart_resize 1036x1036 (37x37 units of 28).
        assert_eq!(r["patches"].opt, 74 * 74 * 8);
        assert_eq!(r["units"].opt, r["patches"].opt / 4);
        let vae = dim_ranges("vae_encoder", &s).unwrap();
        assert_eq!(vae["batch"], DimRange { min: 1, opt: 4, max: 4 });
        assert_eq!(vae["height"], DimRange { min: 896, opt: 1024, max: 1184 });
    }

    #[test]
    fn edit_plus_uses_the_small_vision_copy_and_several_images() {
        let s = settings(Variant::EditPlus);
        let r = dim_ranges("transformer", &s).unwrap();
        assert_eq!(r["img_seq"].max, 4096 + 3 * 56 * 74);
        // 384x384 -> smart_resize 392x392 = 28x28 patches; the 1184x880 aspect -> 448x320 -> 448x308 = 32x22.
        assert_eq!(r["patches"].min, 32 * 22);
        assert_eq!(r["patches"].max, 28 * 28 * 8 * 3);
        assert_eq!(dim_ranges("vae_encoder", &s).unwrap()["batch"].max, 12);
    }

    #[test]
    fn derived_profiles_cover_every_input() {
        let info = inspect(&fixture("transformer_io.onnx")).unwrap();
        let p = derive_profiles("transformer", &info.inputs, &settings(Variant::Edit)).unwrap();
        assert_eq!(p.len(), 3, "one profile per batch size 1, 2, 4");
        let hs = &p[2].inputs[0];
        assert_eq!(hs.name, "hidden_states");
        assert_eq!((hs.min.clone(), hs.max.clone()), (vec![1, 8192, 64], vec![8, 4096 + 56 * 74, 64]));
        for profile in &p {
            for i in &profile.inputs {
                for k in 0..i.min.len() {
                    assert!(i.min[k] <= i.opt[k] && i.opt[k] <= i.max[k], "{i:?}");
                }
            }
        }
        let ts = |k: usize| p[k].inputs.iter().find(|i| i.name == "timestep").unwrap().clone();
        // Tuned for one request (2 rows with CFG), for two, for a full batch of four.
        assert_eq!((ts(0).opt.clone(), ts(0).max.clone()), (vec![2], vec![2]));
        assert_eq!((ts(1).opt.clone(), ts(1).max.clone()), (vec![4], vec![4]));
        assert_eq!((ts(2).opt.clone(), ts(2).max.clone(), ts(2).min.clone()), (vec![8], vec![8], vec![1]));
        // Everything but the batch is the same in every profile.
        assert_eq!(p[0].inputs[0].max[1..], p[2].inputs[0].max[1..]);
    }

    /// The profile `plan_run` picks for a batch of `rows` rows at profile 0's tuned shapes.
    fn profile_for_rows(inputs: &[TensorInfo], profiles: &[Profile], rows: usize) -> Result<usize, String> {
        use crate::runtime::tensorrt::{plan_run, ProfileShapes};
        let shapes: Vec<ProfileShapes> = profiles
            .iter()
            .map(|p| ProfileShapes {
                min: p.inputs.iter().map(|i| i.min.clone()).collect(),
                max: p.inputs.iter().map(|i| i.max.clone()).collect(),
            })
            .collect();
        let concrete: Vec<Vec<usize>> = profiles[0]
            .inputs
            .iter()
            .zip(inputs)
            .map(|(p, t)| {
                let mut s = p.opt.clone();
                if matches!(t.shape.first(), Some(Dim::Dynamic(n)) if n == "batch") {
                    s[0] = rows;
                }
                s
            })
            .collect();
        plan_run(inputs, &concrete, &shapes, &[]).map(|p| p.profile)
    }

    #[test]
    fn each_run_takes_the_smallest_batch_group_that_holds_it() {
        let info = inspect(&fixture("transformer_io.onnx")).unwrap();
        let profiles = derive_profiles("transformer", &info.inputs, &settings(Variant::Edit)).unwrap();
        let run = |rows: usize| profile_for_rows(&info.inputs, &profiles, rows);
        // 1 request (1 row, 2 with CFG) -> the batch-1 profile; 2 requests with CFG -> batch 2; 3-4 -> batch 4.
        assert_eq!((run(1), run(2), run(3), run(4), run(5), run(8)), (Ok(0), Ok(0), Ok(1), Ok(1), Ok(2), Ok(2)));
        assert!(run(9).is_err());
    }

    /// Issue 14 item 3: batch sizes that leave out 1 (`profiles.batch_sizes: [4]`, `build --batch-sizes 2,4`) still
    /// give a profile tuned (opt) for one request, which a lone request runs on; and every profile holds one row.
    #[test]
    fn a_lone_request_has_a_batch_one_profile_even_when_the_batch_sizes_leave_out_one() {
        let info = inspect(&fixture("transformer_io.onnx")).unwrap();
        for (sizes, cfg, groups) in [
            (vec![4], true, vec![1, 4]),
            (vec![4, 2, 4], true, vec![1, 2, 4]),
            (vec![2, 4], false, vec![1, 2, 4]),
            (vec![1, 4], true, vec![1, 4]),
        ] {
            let s = ProfileSettings { batch_sizes: sizes.clone(), cfg, ..settings(Variant::Edit) };
            assert_eq!(batch_groups(&s), groups, "{sizes:?}");
            let p = derive_profiles("transformer", &info.inputs, &s).unwrap();
            assert_eq!(p.len(), groups.len(), "{sizes:?}");
            let rows = if cfg { 2 } else { 1 };
            let ts = |k: usize| p[k].inputs.iter().find(|i| i.name == "timestep").unwrap().clone();
            // Profile 0 is tuned for exactly one request; every profile takes a single row; the last a full batch.
            assert_eq!((ts(0).opt.clone(), ts(0).max.clone()), (vec![rows], vec![rows]), "{sizes:?}");
            assert!((0..p.len()).all(|k| ts(k).min == vec![1]), "{sizes:?}: {p:?}");
            assert_eq!(ts(p.len() - 1).max, vec![4 * rows], "{sizes:?}");
            // A lone request (one row; two with CFG) runs on that profile, not on one tuned for a full batch.
            for lone in 1..=rows {
                assert_eq!(profile_for_rows(&info.inputs, &p, lone), Ok(0), "{sizes:?}, {lone} row(s)");
            }
        }
    }

    #[test]
    fn profile_errors_name_the_dim() {
        let s = settings(Variant::Edit);
        let odd = [TensorInfo { name: "x".into(), dtype: DType::F32, shape: vec![dynamic("frames")] }];
        let e = derive_profiles("transformer", &odd, &s).unwrap_err().to_string();
        assert!(e.contains("`frames`") && e.contains("img_seq"), "{e}");
        let unnamed = [TensorInfo { name: "x".into(), dtype: DType::F32, shape: vec![dynamic(UNNAMED_DIM)] }];
        assert!(derive_profiles("t", &unnamed, &s).unwrap_err().to_string().contains("without a name"));
        let mut bad = s.clone();
        bad.resolutions = vec![[1000, 1000]];
        assert!(dim_ranges("t", &bad).unwrap_err().to_string().contains("multiple of 16"));
        bad.resolutions = vec![];
        assert!(dim_ranges("t", &bad).is_err());
        let mut zero = s;
        zero.batch_sizes = vec![0];
        assert!(dim_ranges("t", &zero).is_err());
    }
}
