//! The TensorRT device loop without a GPU: its program (runtime::tensorrt::loop_program, the exact
//! op list the GPU executes) runs on an EMULATED device. This is a mock of the GPU only, because
//! none exists here: buffers are host memory, "execute" runs the real transformer on ONNX Runtime,
//! "step" runs the kernel's own source compiled for the host. The pipeline's loop description, the
//! program and the kernel code are the real ones, and the result must equal the CPU loop bit for bit.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use image::{Rgb, RgbImage};
use qwen_edit::pipeline::{EditRequest, Pipeline, PipelineOptions};
use qwen_edit::runtime::step::{self, StepShape};
use qwen_edit::runtime::tensorrt::{loop_program, LoopBuf, LoopOp, ProfileShapes, TrtOptions};
use qwen_edit::runtime::{DenoiseLoop, DeviceLoop, Dim, Engine, Error, Outputs, Tensor, TensorInfo};

/// Device memory stand-in: 8-byte aligned storage (like cudaMalloc's 256) viewed as bytes.
#[derive(Clone, Default)]
struct Buf {
    words: Vec<u64>,
    len: usize,
}

impl Buf {
    fn new(len: usize) -> Buf {
        Buf { words: vec![0; len.div_ceil(8)], len }
    }
    fn bytes(&self) -> &[u8] {
        &bytemuck::cast_slice(&self.words)[..self.len]
    }
    fn bytes_mut(&mut self) -> &mut [u8] {
        &mut bytemuck::cast_slice_mut(&mut self.words)[..self.len]
    }
}

/// What the emulated device did, for the assertions.
#[derive(Clone, Debug, Default, PartialEq)]
struct Counters {
    loops: usize,
    uploads: usize,
    copies: usize,
    executes: usize,
    steps: usize,
    downloads: usize,
    /// Checkpoints the program asked at (a loop that can be stopped), by step.
    checkpoints: Vec<usize>,
    dts: Vec<f32>,
    /// The time input each execute saw (first row).
    times: Vec<f32>,
}

/// The transformer with an emulated device loop (see the file docs: a GPU mock).
struct EmulatedDevice {
    inner: Box<dyn Engine>,
    profiles: Vec<ProfileShapes>,
    bucketed: Vec<String>,
    counters: Arc<Mutex<Counters>>,
}

impl EmulatedDevice {
    fn new(inner: Box<dyn Engine>, counters: Arc<Mutex<Counters>>) -> EmulatedDevice {
        // One profile as wide as the contract allows, so every request of the tests fits.
        let range = |fixed: fn(usize) -> usize, dynamic: usize| -> Vec<Vec<usize>> {
            inner
                .inputs()
                .iter()
                .map(|t| t.shape.iter().map(|d| if let Dim::Fixed(n) = d { fixed(*n) } else { dynamic }).collect())
                .collect()
        };
        let profiles = vec![ProfileShapes { min: range(|n| n, 1), max: range(|n| n, 1 << 16) }];
        EmulatedDevice { profiles, bucketed: TrtOptions::default().bucketed_dims, inner, counters }
    }
}

impl Engine for EmulatedDevice {
    fn component(&self) -> &str {
        self.inner.component()
    }
    fn inputs(&self) -> &[TensorInfo] {
        self.inner.inputs()
    }
    fn outputs(&self) -> &[TensorInfo] {
        self.inner.outputs()
    }
    fn run(&mut self, inputs: &[(&str, &Tensor)]) -> Result<Outputs, Error> {
        self.inner.run(inputs)
    }
    fn device_loop(&mut self) -> Option<&mut dyn DeviceLoop> {
        Some(self)
    }
}

impl DeviceLoop for EmulatedDevice {
    fn run_loop(&mut self, job: &DenoiseLoop<'_>) -> Result<Vec<f32>, Error> {
        let inputs = self.inner.inputs().to_vec();
        let outputs = self.inner.outputs().to_vec();
        let (plan, ops) = loop_program(self.inner.component(), &inputs, &outputs, &self.profiles, &self.bucketed, job)?;
        let mut c = self.counters.lock().unwrap();
        c.loops += 1;
        let mut mem: HashMap<LoopBuf, Buf> = HashMap::new();
        let mut result = None;
        for op in ops {
            match op {
                LoopOp::Upload { dst, bytes } => {
                    c.uploads += 1;
                    let buf = mem.entry(dst).or_insert_with(|| Buf::new(bytes.len()));
                    assert!(buf.len >= bytes.len(), "upload of {} bytes into a {} byte {dst:?}", bytes.len(), buf.len);
                    buf.bytes_mut()[..bytes.len()].copy_from_slice(&bytes);
                }
                LoopOp::Copy { src, src_offset, dst, bytes } => {
                    c.copies += 1;
                    let chunk = mem[&src].bytes()[src_offset..src_offset + bytes].to_vec();
                    mem.get_mut(&dst).expect("copy into an allocated buffer").bytes_mut()[..bytes].copy_from_slice(&chunk);
                }
                LoopOp::Execute => {
                    c.executes += 1;
                    // The engine reads its input buffers as the plan's shapes in its own dtypes.
                    let tensors: Vec<Tensor> = inputs
                        .iter()
                        .enumerate()
                        .map(|(i, t)| Tensor::from_bytes(t.dtype, &plan.shapes[i], mem[&LoopBuf::Input(i)].bytes()).unwrap())
                        .collect();
                    let ti = inputs.iter().position(|t| t.name == job.time_input).unwrap();
                    c.times.push(tensors[ti].clone().into_f32().unwrap().iter().copied().next().unwrap());
                    let named: Vec<(&str, &Tensor)> = inputs.iter().map(|t| t.name.as_str()).zip(&tensors).collect();
                    let out = self.inner.run(&named)?;
                    for (name, t) in out.0 {
                        let i = outputs.iter().position(|o| o.name == name).unwrap();
                        let bytes = t.to_dtype(outputs[i].dtype).unwrap().to_bytes();
                        let buf = mem.entry(LoopBuf::Output(i)).or_insert_with(|| Buf::new(bytes.len()));
                        buf.bytes_mut()[..bytes.len()].copy_from_slice(&bytes);
                    }
                }
                LoopOp::Step { velocity, v_dtype, hidden, h_dtype, shape, dt } => {
                    c.steps += 1;
                    c.dts.push(dt);
                    let mut x = mem.remove(&LoopBuf::Latents).expect("latents uploaded");
                    let mut h = mem.remove(&LoopBuf::Input(hidden)).expect("hidden states uploaded");
                    let scales: Option<Vec<f32>> = shape.cfg.then(|| bytemuck::pod_collect_to_vec(mem[&LoopBuf::Scales].bytes()));
                    let v = &mem[&LoopBuf::Output(velocity)];
                    let xs: &mut [f32] = bytemuck::cast_slice_mut(x.bytes_mut());
                    step::cfg_euler_raw(shape, (v.bytes(), v_dtype), xs, Some((h.bytes_mut(), h_dtype)), scales.as_deref(), dt)?;
                    mem.insert(LoopBuf::Latents, x);
                    mem.insert(LoopBuf::Input(hidden), h);
                }
                LoopOp::Download { src, bytes } => {
                    c.downloads += 1;
                    result = Some(bytemuck::pod_collect_to_vec(&mem[&src].bytes()[..bytes]));
                }
                LoopOp::Checkpoint { step } => {
                    // The device would synchronize its stream here; the emulator runs in order already.
                    c.checkpoints.push(step);
                    if job.proceed.is_some_and(|go_on| !go_on(step)) {
                        return Err(Error::Cancelled { step });
                    }
                }
            }
        }
        Ok(result.expect("the program downloads the latents"))
    }
}

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn open(bundle: &str) -> Pipeline {
    let opts = PipelineOptions { backend: "ort".parse().unwrap(), ..Default::default() };
    Pipeline::open(&root().join("engines").join(bundle), &opts).expect("open the tiny bundle")
}

/// A picture with structure (gradients and a square), `salt` varying it.
fn picture(w: u32, h: u32, salt: u32) -> RgbImage {
    RgbImage::from_fn(w, h, |x, y| {
        let inside = x > w / 4 && x < w / 2 && y > h / 3 && y < 2 * h / 3;
        Rgb([(x * 255 / w) as u8, (y * 255 / h) as u8 ^ (salt as u8 * 40), if inside { 230 } else { (salt * 60) as u8 }])
    })
}

fn request(images: Vec<RgbImage>, prompt: &str, negative: Option<&str>, steps: u32, seed: u64) -> EditRequest {
    EditRequest {
        images,
        prompt: prompt.into(),
        negative_prompt: negative.map(String::from),
        num_inference_steps: steps,
        true_cfg_scale: 4.0,
        seed,
        width: None,
        height: None,
        lightning: false,
        noise: None,
    }
}

/// Runs `requests` as one batch on the CPU loop and on the emulated device loop; both must agree
/// bit for bit, and the emulator must have run the loop as one program.
fn same_as_cpu(bundle: &str, requests: Vec<EditRequest>) -> Counters {
    let steps = requests[0].num_inference_steps as usize;
    let mut cpu = open(bundle);
    let pre = cpu.preprocessor();
    let jobs = requests.clone().into_iter().map(|r| pre.prepare(r).unwrap()).collect();
    let want: Vec<RgbImage> = cpu.run_batch(jobs).into_iter().map(|r| r.unwrap().image).collect();
    assert_eq!(cpu.info().denoise_loop, "host");

    let counters = Arc::new(Mutex::new(Counters::default()));
    let c2 = counters.clone();
    let mut dev = open(bundle).wrap_transformer(move |t| Box::new(EmulatedDevice::new(t, c2)));
    assert_eq!(dev.info().denoise_loop, "device", "/health reports where the loop runs");
    let pre = dev.preprocessor();
    let jobs = requests.into_iter().map(|r| pre.prepare(r).unwrap()).collect();
    let got: Vec<RgbImage> = dev.run_batch(jobs).into_iter().map(|r| r.unwrap().image).collect();
    assert_eq!(got.len(), want.len());
    for (i, (g, w)) in got.iter().zip(&want).enumerate() {
        assert_eq!(g.dimensions(), w.dimensions());
        assert!(g.as_raw() == w.as_raw(), "job {i}: the device loop's image differs from the CPU loop's");
    }
    let c = counters.lock().unwrap().clone();
    assert_eq!((c.loops, c.executes, c.steps, c.downloads), (1, steps, steps, 1), "{c:?}");
    assert_eq!(c.copies, steps - 1, "one time-row copy per step after the first");
    assert_eq!(c.checkpoints, (1..steps).collect::<Vec<_>>(), "asked before every step after the first");
    assert!(c.dts.iter().all(|&d| d < 0.0), "sigmas decrease: {:?}", c.dts);
    assert!(c.times.windows(2).all(|w| w[1] < w[0]), "each step sees its own, decreasing time: {:?}", c.times);
    c
}

#[test]
fn device_loop_equals_the_cpu_loop_without_cfg() {
    let c = same_as_cpu("tiny", vec![request(vec![picture(96, 80, 0)], "make it blue", None, 4, 7)]);
    assert_eq!(c.times.len(), 4);
}

#[test]
fn device_loop_equals_the_cpu_loop_with_true_cfg_in_a_batch() {
    same_as_cpu(
        "tiny",
        vec![
            request(vec![picture(64, 64, 1)], "add a hat", Some("blurry"), 3, 1),
            request(vec![picture(64, 64, 2)], "remove the square", Some("low quality, dark"), 3, 2),
        ],
    );
}

#[test]
fn device_loop_equals_the_cpu_loop_for_edit_plus_with_zero_cond_t() {
    // Two input images (condition tokens after the generated ones) and modulate_index.
    same_as_cpu(
        "tiny-2511",
        vec![request(vec![picture(64, 48, 3), picture(40, 56, 4)], "put both in one room", Some("ugly"), 2, 11)],
    );
}

#[test]
fn a_failing_device_loop_fails_only_its_batch() {
    struct Broken(Box<dyn Engine>);
    impl Engine for Broken {
        fn component(&self) -> &str {
            self.0.component()
        }
        fn inputs(&self) -> &[TensorInfo] {
            self.0.inputs()
        }
        fn outputs(&self) -> &[TensorInfo] {
            self.0.outputs()
        }
        fn run(&mut self, inputs: &[(&str, &Tensor)]) -> Result<Outputs, Error> {
            self.0.run(inputs)
        }
        fn device_loop(&mut self) -> Option<&mut dyn DeviceLoop> {
            Some(self)
        }
    }
    impl DeviceLoop for Broken {
        fn run_loop(&mut self, _: &DenoiseLoop<'_>) -> Result<Vec<f32>, Error> {
            Err(Error::Run { component: "transformer".into(), reason: "emulated device fault".into() })
        }
    }
    let mut p = open("tiny").wrap_transformer(|t| Box::new(Broken(t)));
    let pre = p.preprocessor();
    let job = pre.prepare(request(vec![picture(64, 64, 5)], "x", None, 2, 3)).unwrap();
    let r = p.run_batch(vec![job]);
    let e = r.into_iter().next().unwrap().unwrap_err();
    assert!(!e.is_client_error() && e.to_string().contains("emulated device fault"), "{e}");
    // Traced runs (parity, --dump) step on the host: they need every step's latents.
    let job = pre.prepare(request(vec![picture(64, 64, 5)], "x", None, 2, 3)).unwrap();
    let (_, trace) = p.run_batch_traced(&[job]).unwrap();
    assert_eq!(trace.latents.len(), 2);
}

/// A batch nobody waits for stops at the device loop's next checkpoint: the steps already launched
/// finish (the device waits for them), no later step is launched, and the jobs are cancelled.
#[test]
fn a_device_loop_stops_at_its_next_checkpoint() {
    use qwen_edit::pipeline::{Checkpoint, EditError};
    let counters = Arc::new(Mutex::new(Counters::default()));
    let c2 = counters.clone();
    let mut dev = open("tiny").wrap_transformer(move |t| Box::new(EmulatedDevice::new(t, c2)));
    let pre = dev.preprocessor();
    let job = pre.prepare(request(vec![picture(64, 64, 6)], "x", None, 6, 4)).unwrap();
    let asked = Mutex::new(Vec::new());
    let control = |at: Checkpoint| {
        asked.lock().unwrap().push(at);
        !matches!(at, Checkpoint::Step(k) if k >= 3)
    };
    let r = dev.run_batch_with(&[&job], &control).pop().unwrap();
    assert!(matches!(r, Err(EditError::Cancelled)), "{r:?}");
    let c = counters.lock().unwrap().clone();
    assert_eq!((c.executes, c.steps, c.downloads), (3, 3, 0), "steps 0..3 ran, nothing after: {c:?}");
    assert_eq!(c.checkpoints, vec![1, 2, 3]);
    let asked = asked.into_inner().unwrap();
    assert_eq!(&asked[..3], &[Checkpoint::TextEncoder, Checkpoint::VaeEncoder, Checkpoint::Step(0)]);
    assert!(!asked.contains(&Checkpoint::VaeDecoder), "the decoder never ran: {asked:?}");
    // The same pipeline runs the next batch to the end.
    let job = pre.prepare(request(vec![picture(64, 64, 6)], "x", None, 2, 4)).unwrap();
    assert!(dev.run_batch(vec![job]).pop().unwrap().is_ok());
}

#[test]
fn loop_description_is_checked() {
    let shape = StepShape { batch: 1, seq: 4, img_seq: 6, channels: 64, cfg: false };
    let state = Tensor::f32(&[1, 6, 64], vec![0.0; 6 * 64]);
    let latents = vec![0.0f32; shape.latents()];
    let ok = DenoiseLoop {
        fixed: &[],
        state_input: "hidden_states",
        state: &state,
        time_input: "timestep",
        timesteps: &[1.0, 0.5],
        output: "sample",
        latents: &latents,
        shape,
        dts: &[-0.5, -0.5],
        scales: None,
        proceed: None,
    };
    assert!(ok.validate().is_ok());
    assert!(DenoiseLoop { dts: &[-0.5], ..ok }.validate().is_err(), "a dt per step");
    assert!(DenoiseLoop { scales: Some(&[2.0]), ..ok }.validate().is_err(), "scales only with CFG");
    assert!(DenoiseLoop { latents: &latents[1..], ..ok }.validate().is_err());
    let wide = Tensor::f32(&[2, 6, 64], vec![0.0; 12 * 64]);
    assert!(DenoiseLoop { state: &wide, ..ok }.validate().is_err(), "state rows = jobs (x2 with CFG)");
    assert!(DenoiseLoop { shape: StepShape { cfg: true, ..shape }, ..ok }.validate().is_err(), "CFG needs 2 rows per job");
}
