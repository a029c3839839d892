//! Verification of an engine against ONNX Runtime (polygraphy style): deterministic random inputs valid for
//! the IO contract, run through both, every output compared element-wise within atol/rtol.

use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};

use super::{BuildArgs, Error, Planned, VerifyShapes};
use crate::bundle::Bundle;
use crate::onnx::Profile;
use crate::runtime::ort::{OrtBackend, OrtSettings};
use crate::runtime::tensorrt::{TrtOptions, TrtWorker};
use crate::runtime::{self, DType, Dim, Engine, Tensor, TensorInfo};

/// The engine-vs-ONNX-Runtime comparison (polygraphy style).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Verification {
    pub shapes: VerifyShapes,
    pub seed: u64,
    pub atol: f64,
    pub rtol: f64,
    pub outputs: Vec<OutputError>,
    pub passed: bool,
}

/// Error statistics of one output: `mismatches` counts elements with |a - b| > atol + rtol * |b|.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct OutputError {
    pub name: String,
    pub elements: usize,
    pub max_abs: f64,
    pub max_rel: f64,
    pub mean_abs: f64,
    pub mismatches: usize,
    pub error: Option<String>,
}

impl Verification {
    /// One line per output: its largest errors and how many elements are beyond tolerance.
    pub(super) fn summary(&self) -> String {
        let lines: Vec<String> = self
            .outputs
            .iter()
            .map(|o| format!("{} max abs {:.3e} max rel {:.3e} ({} mismatches)", o.name, o.max_abs, o.max_rel, o.mismatches))
            .collect();
        lines.join("; ")
    }
}

/// Default tolerances for a graph's precision (see `Precision::summary`).
pub fn default_tolerance(precision: &str) -> (f64, f64) {
    match precision {
        "fp32" => (1e-2, 1e-2), // TensorRT uses TF32 for fp32 matmuls by default
        "fp16" => (2e-2, 2e-2),
        "bf16" | "mixed" => (5e-2, 5e-2),
        _ => (1e-1, 1e-1), // fp8 / int8
    }
}

/// Deterministic random inputs at `shapes`, valid for the IO contract of engines/README.md:
/// masks 1, `position_ids` 0..seq, `window_index` a permutation (identity), segment ids 0,
/// `image_embed_index` -1, token ids small, `timestep` in [0, 1), RoPE tables cos/sin of angles,
/// other floats ~ N(0, 1).
pub fn random_inputs(infos: &[TensorInfo], shapes: &[Vec<usize>], seed: u64) -> Result<Vec<(String, Tensor)>, String> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut out = Vec::new();
    for (info, shape) in infos.iter().zip(shapes) {
        let n: usize = shape.iter().product();
        let name = info.name.as_str();
        let t = if info.dtype.is_float() {
            let v: Vec<f32> = if name == "timestep" {
                (0..n).map(|_| rng.random::<f32>()).collect()
            } else if name.ends_with("_cos") || name.ends_with("_sin") {
                let cos = name.ends_with("_cos");
                (0..n)
                    .map(|_| {
                        let a = rng.random::<f32>() * std::f32::consts::TAU;
                        if cos {
                            a.cos()
                        } else {
                            a.sin()
                        }
                    })
                    .collect()
            } else {
                (0..n)
                    .map(|_| {
                        // Box-Muller
                        let u1 = rng.random::<f32>().max(f32::MIN_POSITIVE);
                        let u2 = rng.random::<f32>();
                        (-2.0 * u1.ln()).sqrt() * (std::f32::consts::TAU * u2).cos()
                    })
                    .collect()
            };
            Tensor::f32(shape, v).to_dtype(info.dtype)?
        } else {
            let last = shape.last().copied().unwrap_or(1).max(1);
            let v: Vec<i64> = match name {
                _ if name.ends_with("mask") => vec![1; n],
                "position_ids" => (0..n).map(|i| (i % last) as i64).collect(),
                "window_index" => (0..n as i64).collect(),
                "image_embed_index" => vec![-1; n],
                "input_ids" => (0..n).map(|_| rng.random_range(0..100)).collect(),
                "vision_pos_ids" => {
                    let side = ((shape.first().copied().unwrap_or(1) as f64).sqrt().ceil() as usize).max(1);
                    (0..n).map(|i| if i % 2 == 0 { ((i / 2) / side) as i64 } else { ((i / 2) % side) as i64 }).collect()
                }
                "modulate_index" => (0..n).map(|i| i64::from(i % last >= last / 2)).collect(),
                _ => vec![0; n],
            };
            Tensor::i64(shape, v).to_dtype(info.dtype)?
        };
        out.push((info.name.clone(), t));
    }
    Ok(out)
}

/// Compares `candidate` against `reference` element-wise (allclose: |a - b| <= atol + rtol * |b|).
pub fn compare(name: &str, reference: &Tensor, candidate: &Tensor, atol: f64, rtol: f64) -> OutputError {
    let mut e = OutputError {
        name: name.into(),
        elements: reference.len(),
        max_abs: 0.0,
        max_rel: 0.0,
        mean_abs: 0.0,
        mismatches: 0,
        error: None,
    };
    if reference.shape() != candidate.shape() {
        e.error = Some(format!("shape {:?} vs reference {:?}", candidate.shape(), reference.shape()));
        e.mismatches = reference.len().max(1);
        return e;
    }
    let as_f64 = |t: &Tensor| -> Vec<f64> {
        match t.to_dtype(DType::F32).or_else(|_| t.to_dtype(DType::I64)) {
            Ok(Tensor::F32(a)) => a.iter().map(|&x| x as f64).collect(),
            Ok(Tensor::I64(a)) => a.iter().map(|&x| x as f64).collect(),
            _ => Vec::new(),
        }
    };
    let (r, c) = (as_f64(reference), as_f64(candidate));
    let mut sum = 0.0;
    for (&b, &a) in r.iter().zip(&c) {
        let d = (a - b).abs();
        let d = if d.is_nan() { f64::INFINITY } else { d };
        sum += d;
        e.max_abs = e.max_abs.max(d);
        e.max_rel = e.max_rel.max(d / b.abs().max(1e-12));
        if d > atol + rtol * b.abs() {
            e.mismatches += 1;
        }
    }
    e.mean_abs = if r.is_empty() { 0.0 } else { sum / r.len() as f64 };
    e
}

/// Runs both engines on the same random inputs and compares every output of the reference.
pub fn verify(
    reference: &mut dyn Engine,
    candidate: &mut dyn Engine,
    shapes: &[Vec<usize>],
    shape_kind: VerifyShapes,
    seed: u64,
    (atol, rtol): (f64, f64),
) -> Result<Verification, runtime::Error> {
    let component = reference.component().to_string();
    let infos = reference.inputs().to_vec();
    let inputs = random_inputs(&infos, shapes, seed)
        .map_err(|reason| runtime::Error::Contract { component: component.clone(), reason })?;
    let named: Vec<(&str, &Tensor)> = inputs.iter().map(|(n, t)| (n.as_str(), t)).collect();
    let mut want = reference.run(&named)?;
    let mut got = candidate.run(&named)?;
    let mut outputs = Vec::new();
    for info in reference.outputs() {
        let Some(r) = want.take(&info.name) else { continue };
        outputs.push(match got.take(&info.name) {
            Some(c) => compare(&info.name, &r, &c, atol, rtol),
            None => OutputError {
                name: info.name.clone(),
                elements: r.len(),
                max_abs: f64::INFINITY,
                max_rel: f64::INFINITY,
                mean_abs: f64::INFINITY,
                mismatches: r.len().max(1),
                error: Some("missing from the engine's outputs".into()),
            },
        });
    }
    let passed = outputs.iter().all(|o| o.mismatches == 0 && o.error.is_none());
    Ok(Verification { shapes: shape_kind, seed, atol, rtol, outputs, passed })
}

/// The comparison shapes of `inputs` from the first profile.
fn shapes_of(profiles: &[Profile], inputs: &[TensorInfo], kind: VerifyShapes) -> Vec<Vec<usize>> {
    inputs
        .iter()
        .map(|info| {
            let p = profiles.first().and_then(|p| p.inputs.iter().find(|i| i.name == info.name));
            match (p, kind) {
                (Some(p), VerifyShapes::Min) => p.min.clone(),
                (Some(p), VerifyShapes::Opt) => p.opt.clone(),
                (None, _) => info.shape.iter().map(|d| if let Dim::Fixed(n) = d { *n } else { 1 }).collect(),
            }
        })
        .collect()
}

/// The two sides of the comparison of freshly built engines: TensorRT on the build device and ONNX Runtime
/// (the reference) on the CPU, opened for the first engine and kept for the next ones. A bfloat16 graph's
/// reference is its float32 twin (`OrtSettings::bf16_as_f32`), fed the same bfloat16-rounded inputs.
pub(super) struct Backends {
    device: usize,
    ort: Option<OrtBackend>,
    worker: Option<TrtWorker>,
}

impl Backends {
    pub(super) fn new(device: usize) -> Backends {
        Backends { device, ort: None, worker: None }
    }

    fn open(&mut self) -> Result<(&TrtWorker, &OrtBackend), Error> {
        if self.worker.is_none() {
            let w = TrtWorker::open(TrtOptions { device: self.device, ..TrtOptions::default() })
                .map_err(|e| Error::Unavailable(e.to_string()))?;
            self.worker = Some(w);
        }
        if self.ort.is_none() {
            self.ort = Some(
                // bfloat16 graphs as their float32 twins: the CPU provider has no bfloat16 kernels.
                OrtBackend::new(OrtSettings { bf16_as_f32: true, ..Default::default() })
                    .map_err(|e| Error::Unavailable(format!("ONNX Runtime (the reference): {e}")))?,
            );
        }
        let (Some(w), Some(o)) = (self.worker.as_ref(), self.ort.as_ref()) else {
            return Err(Error::Unavailable("verification backends missing".into()));
        };
        Ok((w, o))
    }

    /// Runs the new engine of `p` and its ONNX graph on the same random inputs (shapes, seed and tolerances
    /// of `args`; the tolerances default by precision) and compares them.
    pub(super) fn check_engine(&mut self, bundle: &Bundle, p: &Planned, args: &BuildArgs) -> Result<Verification, Error> {
        let (w, o) = self.open()?;
        let component = bundle.component(&p.name)?;
        let mut reference = o.load(&p.name, &p.onnx).map_err(|e| Error::Unavailable(format!("ONNX Runtime: {e}")))?;
        let mut candidate = w
            .load(&p.name, &p.plan, Some((&component.inputs, &component.outputs)))
            .map_err(|e| Error::Build { component: p.name.clone(), reason: format!("the new engine does not load: {e}") })?;
        let shapes = shapes_of(&p.profiles, reference.inputs(), args.verify_shapes);
        let (da, dr) = default_tolerance(&p.info.precision.summary());
        verify(
            &mut reference,
            &mut candidate,
            &shapes,
            args.verify_shapes,
            args.seed,
            (args.atol.unwrap_or(da), args.rtol.unwrap_or(dr)),
        )
        .map_err(|e| Error::Verify { component: p.name.clone(), reason: format!("the engine failed to run: {e}") })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::runtime::Outputs;

    fn ti(name: &str, dtype: DType, shape: Vec<Dim>) -> TensorInfo {
        TensorInfo { name: name.into(), dtype, shape }
    }

    #[test]
    fn random_inputs_respect_the_contract() {
        let infos = vec![
            ti("attention_mask", DType::I64, vec![Dim::Dynamic("batch".into()), Dim::Dynamic("seq".into())]),
            ti("position_ids", DType::I64, vec![Dim::Fixed(3), Dim::Dynamic("batch".into()), Dim::Dynamic("seq".into())]),
            ti("window_index", DType::I64, vec![Dim::Dynamic("units".into())]),
            ti("image_embed_index", DType::I64, vec![Dim::Dynamic("batch".into()), Dim::Dynamic("seq".into())]),
            ti("timestep", DType::F32, vec![Dim::Dynamic("batch".into())]),
            ti("img_cos", DType::BF16, vec![Dim::Dynamic("img_seq".into()), Dim::Fixed(4)]),
            ti("hidden_states", DType::F16, vec![Dim::Fixed(2), Dim::Fixed(3)]),
        ];
        let shapes = vec![vec![2, 5], vec![3, 2, 5], vec![6], vec![2, 5], vec![2], vec![3, 4], vec![2, 3]];
        let a = random_inputs(&infos, &shapes, 7).unwrap();
        assert_eq!(a, random_inputs(&infos, &shapes, 7).unwrap(), "deterministic per seed");
        assert_ne!(a, random_inputs(&infos, &shapes, 8).unwrap());
        let get = |n: &str| a.iter().find(|(k, _)| k == n).map(|(_, t)| t.clone()).unwrap();
        assert_eq!(get("attention_mask"), Tensor::i64(&[2, 5], vec![1; 10]));
        assert_eq!(get("window_index"), Tensor::i64(&[6], (0..6).collect()));
        assert_eq!(get("image_embed_index"), Tensor::i64(&[2, 5], vec![-1; 10]));
        match get("position_ids") {
            Tensor::I64(p) => assert_eq!(p.iter().take(5).copied().collect::<Vec<_>>(), vec![0, 1, 2, 3, 4]),
            t => panic!("{t:?}"),
        }
        let ts = get("timestep").into_f32().unwrap();
        assert!(ts.iter().all(|&t| (0.0..1.0).contains(&t)));
        assert_eq!(get("img_cos").dtype(), DType::BF16);
        assert!(get("img_cos").into_f32().unwrap().iter().all(|&c| c.abs() <= 1.0));
        assert_eq!(get("hidden_states").dtype(), DType::F16);
    }

    #[test]
    fn comparison_statistics() {
        let r = Tensor::f32(&[4], vec![1.0, -2.0, 0.5, 10.0]);
        let same = compare("y", &r, &r, 0.0, 0.0);
        assert_eq!((same.mismatches, same.max_abs), (0, 0.0));
        let c = Tensor::f32(&[4], vec![1.01, -2.0, 0.501, 10.5]);
        let e = compare("y", &r, &c, 1e-2, 1e-2);
        assert!((e.max_abs - 0.5).abs() < 1e-6 && (e.max_rel - 0.05).abs() < 1e-6, "{e:?}");
        assert_eq!(e.mismatches, 1, "only 10.5 vs 10 is beyond 0.01 + 0.01*10");
        let nan = compare("y", &r, &Tensor::f32(&[4], vec![f32::NAN, -2.0, 0.5, 10.0]), 1.0, 1.0);
        assert_eq!(nan.mismatches, 1);
        let bad = compare("y", &r, &Tensor::f32(&[2, 2], vec![0.0; 4]), 1.0, 1.0);
        assert!(bad.error.unwrap().contains("shape"));
        let ints = compare("i", &Tensor::i64(&[2], vec![1, 2]), &Tensor::i64(&[2], vec![1, 3]), 0.0, 0.0);
        assert_eq!(ints.mismatches, 1);
    }

    /// A CPU engine computing y = scale * x (+ noise), to test `verify` without a GPU.
    struct Scale {
        scale: f32,
        noise: f32,
        inputs: Vec<TensorInfo>,
        outputs: Vec<TensorInfo>,
    }
    impl Scale {
        fn new(scale: f32, noise: f32) -> Scale {
            let shape = vec![Dim::Dynamic("batch".into()), Dim::Fixed(3)];
            Scale { scale, noise, inputs: vec![ti("x", DType::F32, shape.clone())], outputs: vec![ti("y", DType::F32, shape)] }
        }
    }
    impl Engine for Scale {
        fn component(&self) -> &str {
            "scale"
        }
        fn inputs(&self) -> &[TensorInfo] {
            &self.inputs
        }
        fn outputs(&self) -> &[TensorInfo] {
            &self.outputs
        }
        fn run(&mut self, inputs: &[(&str, &Tensor)]) -> Result<Outputs, runtime::Error> {
            runtime::check_inputs("scale", &self.inputs, inputs)?;
            let x = inputs[0].1.clone().into_f32().map_err(|reason| runtime::Error::Run { component: "scale".into(), reason })?;
            let y = x.mapv(|v| v * self.scale + self.noise);
            Ok(Outputs(vec![("y".into(), Tensor::F32(y))]))
        }
    }

    #[test]
    fn verify_flags_an_engine_that_differs() {
        let shapes = vec![vec![2, 3]];
        let ok =
            verify(&mut Scale::new(2.0, 0.0), &mut Scale::new(2.0, 1e-4), &shapes, VerifyShapes::Min, 1, (1e-3, 1e-3)).unwrap();
        assert!(ok.passed, "{ok:?}");
        assert_eq!(ok.outputs[0].elements, 6);
        let bad =
            verify(&mut Scale::new(2.0, 0.0), &mut Scale::new(2.1, 0.0), &shapes, VerifyShapes::Min, 1, (1e-3, 1e-3)).unwrap();
        assert!(!bad.passed && bad.outputs[0].mismatches > 0, "{bad:?}");
        let e = verify(&mut Scale::new(2.0, 0.0), &mut Scale::new(2.0, 0.0), &[vec![2, 4]], VerifyShapes::Min, 1, (1e-3, 1e-3));
        assert!(e.is_err(), "a shape outside the contract is an error, not a pass");
    }

    /// What `Backends` does for a bfloat16 graph: its reference is the float32 twin. Against a stand-in for the
    /// TensorRT engine (no GPU here: the float32 export of the same checkpoint, fed the same inputs) it passes at
    /// the default bfloat16 tolerance, and not at a float32 one: the reference holds the bfloat16 weights.
    #[test]
    fn a_bf16_graph_is_checked_against_its_float32_twin() {
        let engines = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("engines");
        let settings = |bf16_as_f32| OrtSettings { intra_threads: Some(1), bf16_as_f32, ..Default::default() };
        let mut reference =
            OrtBackend::new(settings(true)).unwrap().load("vae_decoder", &engines.join("tiny-bf16/vae_decoder.onnx")).unwrap();
        let ort = OrtBackend::new(settings(false)).unwrap();
        let mut stand_in = ort.load("vae_decoder", &engines.join("tiny/vae_decoder.onnx")).unwrap();
        let shapes = [vec![1, 16, 4, 5]];
        let tolerance = default_tolerance("bf16");
        let v = verify(&mut reference, &mut stand_in, &shapes, VerifyShapes::Min, 3, tolerance).unwrap();
        assert!(v.passed && v.outputs[0].max_abs > 0.0, "{v:?}");
        let v = verify(&mut reference, &mut stand_in, &shapes, VerifyShapes::Min, 3, (1e-5, 1e-5)).unwrap();
        assert!(!v.passed, "bfloat16 weights against float32 ones at a float32 tolerance: {v:?}");
    }

    #[test]
    fn tolerances_follow_precision() {
        assert!(default_tolerance("fp32").0 < default_tolerance("fp16").0);
        assert!(default_tolerance("fp16").0 < default_tolerance("bf16").0);
        assert!(default_tolerance("bf16").0 < default_tolerance("fp8").0);
    }
}
