//! The TensorRT path without a GPU: its programs (runtime::tensorrt::loop_program and run_program, the exact
//! op lists the GPU executes) run on an EMULATED device. This is a mock of the GPU only, because none exists
//! here: buffers are host memory, "execute" runs the real network on ONNX Runtime, "step" runs the kernel's
//! own source compiled for the host, pinned staging is host memory marked pinned. The pipeline, the programs
//! and the kernel code are the real ones, and the result must equal the CPU path bit for bit; the 16-bit
//! bundles run the same way on their declared float16 / bfloat16 IO.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use image::{Rgb, RgbImage};
use qwen_edit::pipeline::{EditRequest, Pipeline, PipelineOptions};
use qwen_edit::runtime::ort::OrtSettings;

use qwen_edit::runtime::staging::{Block, DeviceMemory};
use qwen_edit::runtime::step::{self, StepShape};
use qwen_edit::runtime::tensorrt::{loop_program, run_program, LoopBuf, LoopOp, ProfileShapes, RunPlan, TrtOptions};
use qwen_edit::runtime::{
    DenoiseLoop, DeviceLoop, Dim, Engine, Error, Input, Kept, Outputs, Place, StagingAlloc, Tensor, TensorInfo,
};

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
    /// Inputs uploaded from host bytes the host built (converted, padded), by input name.
    host_uploads: Vec<String>,
    /// Inputs uploaded straight from staged rows (one DMA copy per run of adjacent rows), by input name.
    row_uploads: Vec<String>,
    /// Inputs gathered on the device from another engine's kept output, by input name.
    gathers: Vec<String>,
    /// Outputs downloaded to the host / kept on the device, by output name.
    output_downloads: Vec<String>,
    kept: Vec<String>,
}

/// Emulated device memory of a kept output: host bytes whose address stands for the device pointer.
struct EmulatedMemory(Vec<u64>, usize);

impl DeviceMemory for EmulatedMemory {
    fn device_ptr(&self) -> u64 {
        self.0.as_ptr() as u64
    }
    fn bytes(&self) -> usize {
        self.1
    }
}

/// Emulated pinned memory (host memory marked pinned: the emulated DMA reads it as it is).
struct EmulatedPinned;

impl StagingAlloc for EmulatedPinned {
    fn alloc(&self, bytes: usize) -> Result<Block, Error> {
        let mut words = vec![0u64; bytes.div_ceil(8) + 32];
        let base = words.as_mut_ptr() as *mut u8;
        let pad = base.align_offset(256);
        // SAFETY: `pad + bytes` lies inside `words`, which the block owns and never moves.
        Ok(unsafe { Block::new(base.add(pad), bytes, true, Box::new(words)) })
    }
}

/// An engine on an EMULATED device (see the file docs: a GPU mock). It runs the TensorRT backend's own
/// programs (`run_program`, `loop_program`): buffers are host memory, "execute" is the wrapped ONNX Runtime
/// engine, "step" the kernel's host build, staged rows are read where preprocessing wrote them, kept outputs
/// stay in emulated device memory and are gathered from there.
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

    /// Executes a program on emulated memory; returns the memory, the output shapes and what was kept.
    fn exec(
        &mut self,
        plan: &RunPlan,
        ops: Vec<LoopOp>,
        time_input: Option<&str>,
        proceed: Option<&dyn Fn(usize) -> bool>,
    ) -> Result<Executed, Error> {
        let inputs = self.inner.inputs().to_vec();
        let outputs = self.inner.outputs().to_vec();
        let mut c = self.counters.lock().unwrap();
        let mut done = Executed::default();
        let mem = &mut done.mem;
        for op in ops {
            match op {
                LoopOp::Upload { dst, bytes } => {
                    c.uploads += 1;
                    if let LoopBuf::Input(i) = dst {
                        c.host_uploads.push(inputs[i].name.clone());
                    }
                    let buf = mem.entry(dst).or_insert_with(|| Buf::new(bytes.len()));
                    assert!(buf.len >= bytes.len(), "upload of {} bytes into a {} byte {dst:?}", bytes.len(), buf.len);
                    buf.bytes_mut()[..bytes.len()].copy_from_slice(&bytes);
                }
                LoopOp::UploadRows { dst, dst_offset, rows } => {
                    let LoopBuf::Input(i) = dst else { panic!("rows into {dst:?}") };
                    c.row_uploads.push(inputs[i].name.clone());
                    let need = plan.shapes[i].iter().product::<usize>() * inputs[i].dtype.size();
                    let buf = mem.entry(dst).or_insert_with(|| Buf::new(need));
                    let mut off = dst_offset;
                    for r in &rows {
                        assert!(r.pinned(), "the staged path uploads pinned rows");
                        buf.bytes_mut()[off..off + r.bytes()].copy_from_slice(r.as_bytes());
                        off += r.bytes();
                    }
                }
                LoopOp::Gather { dst, bytes, src, copies, elem } => {
                    let LoopBuf::Input(i) = dst else { panic!("gather into {dst:?}") };
                    c.gathers.push(inputs[i].name.clone());
                    let Place::Device(m) = &src.place else { panic!("a device gather from host memory") };
                    // SAFETY: emulated device memory is host memory, alive while `src` holds it.
                    let from = unsafe { std::slice::from_raw_parts(m.device_ptr() as *const u8, m.bytes()) };
                    let mut buf = Buf::new(bytes);
                    for k in copies {
                        buf.bytes_mut()[k.dst * elem..(k.dst + k.elems) * elem]
                            .copy_from_slice(&from[k.src * elem..(k.src + k.elems) * elem]);
                    }
                    mem.insert(dst, buf);
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
                    if let Some(ti) = time_input.and_then(|n| inputs.iter().position(|t| t.name == n)) {
                        c.times.push(tensors[ti].clone().into_f32().unwrap().iter().copied().next().unwrap());
                    }
                    let named: Vec<(&str, &Tensor)> = inputs.iter().map(|t| t.name.as_str()).zip(&tensors).collect();
                    let out = self.inner.run(&named)?;
                    let mut shapes = vec![vec![]; outputs.len()];
                    for (name, t) in out.0 {
                        let i = outputs.iter().position(|o| o.name == name).unwrap();
                        shapes[i] = t.shape().to_vec();
                        let bytes = t.to_dtype(outputs[i].dtype).unwrap().to_bytes();
                        let buf = mem.entry(LoopBuf::Output(i)).or_insert_with(|| Buf::new(bytes.len()));
                        buf.bytes_mut()[..bytes.len()].copy_from_slice(&bytes);
                    }
                    done.out_shapes = shapes;
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
                    done.result = Some(bytemuck::pod_collect_to_vec(&mem[&src].bytes()[..bytes]));
                }
                LoopOp::DownloadOutput(i) => {
                    c.downloads += 1;
                    c.output_downloads.push(outputs[i].name.clone());
                    done.downloaded.push(i);
                }
                LoopOp::KeepOutput(i) => {
                    c.kept.push(outputs[i].name.clone());
                    let bytes = mem[&LoopBuf::Output(i)].bytes().to_vec();
                    let mut words = vec![0u64; bytes.len().div_ceil(8)];
                    bytemuck::cast_slice_mut::<u64, u8>(&mut words)[..bytes.len()].copy_from_slice(&bytes);
                    let shape = done.out_shapes[i].clone();
                    let memory = Arc::new(EmulatedMemory(words, bytes.len()));
                    done.kept =
                        Some(Kept { dtype: outputs[i].dtype, shape: shape.clone(), layout: shape, place: Place::Device(memory) });
                }
                LoopOp::Checkpoint { step } => {
                    // The device would synchronize its stream here; the emulator runs in order already.
                    c.checkpoints.push(step);
                    if proceed.is_some_and(|go_on| !go_on(step)) {
                        return Err(Error::Cancelled { step });
                    }
                }
            }
        }
        Ok(done)
    }

    fn run_given(&mut self, given: &[(&str, Input<'_>)], keep: Option<&str>) -> Result<(Outputs, Option<Kept>), Error> {
        let io = (self.inner.inputs().to_vec(), self.inner.outputs().to_vec());
        let (plan, ops) = run_program(self.inner.component(), (&io.0, &io.1), &self.profiles, &self.bucketed, given, keep)?;
        let done = self.exec(&plan, ops, None, None)?;
        let mut out = Vec::new();
        for i in done.downloaded {
            let bytes = done.mem[&LoopBuf::Output(i)].bytes();
            let n = done.out_shapes[i].iter().product::<usize>() * io.1[i].dtype.size();
            let t = Tensor::from_bytes(io.1[i].dtype, &done.out_shapes[i], &bytes[..n]).unwrap();
            out.push((io.1[i].name.clone(), Tensor::F32(t.into_f32().unwrap())));
        }
        Ok((Outputs(out), done.kept))
    }
}

/// Buffers and results of one emulated program.
#[derive(Default)]
struct Executed {
    mem: HashMap<LoopBuf, Buf>,
    out_shapes: Vec<Vec<usize>>,
    downloaded: Vec<usize>,
    kept: Option<Kept>,
    result: Option<Vec<f32>>,
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
        let given: Vec<(&str, Input<'_>)> = inputs.iter().map(|(n, t)| (*n, Input::Host(t))).collect();
        Ok(self.run_given(&given, None)?.0)
    }
    fn run_inputs(&mut self, inputs: &[(&str, Input<'_>)]) -> Result<Outputs, Error> {
        Ok(self.run_given(inputs, None)?.0)
    }
    fn run_keep(&mut self, inputs: &[(&str, Input<'_>)], keep: &str) -> Result<(Outputs, Kept), Error> {
        let (out, kept) = self.run_given(inputs, Some(keep))?;
        Ok((out, kept.expect("kept")))
    }
    fn staging(&self) -> Option<Arc<dyn StagingAlloc>> {
        Some(Arc::new(EmulatedPinned))
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
        self.counters.lock().unwrap().loops += 1;
        let done = self.exec(&plan, ops, Some(job.time_input), job.proceed)?;
        Ok(done.result.expect("the program downloads the latents"))
    }
}

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn open(bundle: &str) -> Pipeline {
    // Staging blocks of 4 rows (the server's BATCH_SIZE), so a batch's staged rows are adjacent.
    let opts = PipelineOptions { backend: "ort".parse().unwrap(), staging_rows: 4, ..Default::default() };
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

/// The pipeline with its text encoder, VAE encoder and transformer on the emulated device (one log each).
fn on_device(p: Pipeline) -> (Pipeline, [Arc<Mutex<Counters>>; 3]) {
    let logs: [Arc<Mutex<Counters>>; 3] = Default::default();
    let [te, ve, tr] = logs.clone();
    let p = p
        .wrap_engine("text_encoder", move |e| Box::new(EmulatedDevice::new(e, te)))
        .wrap_engine("vae_encoder", move |e| Box::new(EmulatedDevice::new(e, ve)))
        .wrap_transformer(move |t| Box::new(EmulatedDevice::new(t, tr)));
    (p, logs)
}

/// Runs `requests` as one batch on the CPU path and on the emulated device; both must agree bit for bit.
/// On the device: the loop runs as one program; the pixels of each request are written once, in the
/// engines' dtypes, into pinned staging and uploaded from there (no host copy); the text embeddings never
/// leave the device. Returns the transformer's log.
fn same_as_cpu(bundle: &str, requests: Vec<EditRequest>) -> Counters {
    same_as_cpu_on(&|| open(bundle), requests)
}

/// [`same_as_cpu`] on the pipelines `open` gives.
fn same_as_cpu_on(open: &dyn Fn() -> Pipeline, requests: Vec<EditRequest>) -> Counters {
    let steps = requests[0].num_inference_steps as usize;
    let images: usize = requests.iter().map(|r| r.images.len()).sum();
    let mut cpu = open();
    let pre = cpu.preprocessor();
    let jobs = requests.clone().into_iter().map(|r| pre.prepare(r).unwrap()).collect();
    let want: Vec<RgbImage> = cpu.run_batch(jobs).into_iter().map(|r| r.unwrap().image).collect();
    assert_eq!(cpu.info().denoise_loop, "host");
    // ONNX Runtime reads host tensors: each staged image is copied once on the host for the VL and VAE encoders.
    let host = cpu.counters().snapshot();
    assert_eq!((host.staged_host_copies, host.host_loop_steps), (2 * images as u64, steps as u64));

    let (mut dev, [te, ve, tr]) = on_device(open());
    assert_eq!(dev.info().denoise_loop, "device", "/health reports where the loop runs");
    let pre = dev.preprocessor();
    let jobs = requests.into_iter().map(|r| pre.prepare(r).unwrap()).collect();
    let got: Vec<RgbImage> = dev.run_batch(jobs).into_iter().map(|r| r.unwrap().image).collect();
    assert_eq!(got.len(), want.len());
    for (i, (g, w)) in got.iter().zip(&want).enumerate() {
        assert_eq!(g.dimensions(), w.dimensions());
        assert!(g.as_raw() == w.as_raw(), "job {i}: the device path's image differs from the CPU path's");
    }
    // Host copies per request on the staged path: none (the upload from pinned staging is the only copy).
    let counted = dev.counters().snapshot();
    assert_eq!((counted.staged_host_copies, counted.host_loop_steps), (0, 0), "{counted:?}");
    let (te, ve, c) = (te.lock().unwrap().clone(), ve.lock().unwrap().clone(), tr.lock().unwrap().clone());
    // One copy per run of adjacent rows of one block: the VL patches of the batch's images, which share a size.
    assert_eq!(te.row_uploads, ["pixel_values"], "the VL patches go up from their staged rows in one copy: {te:?}");
    assert!(!te.host_uploads.contains(&"pixel_values".to_string()));
    assert_eq!((te.kept, te.output_downloads.len()), (vec!["hidden_states".to_string()], 0), "text stays on the device");
    let conditions = images / got.len();
    assert_eq!(ve.row_uploads, vec!["image".to_string(); conditions], "one copy per condition image of the batch: {ve:?}");
    assert!(!ve.host_uploads.contains(&"image".to_string()));
    assert_eq!(c.gathers, ["encoder_hidden_states"], "gathered on the device from the kept text encoder output");
    assert!(!c.host_uploads.contains(&"encoder_hidden_states".to_string()));
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

/// The float16 bundle: its graphs run on ONNX Runtime with their float16 IO, so the staging rows, the
/// transformer's inputs and the velocity are float16 and the step kernel reads and writes float16.
#[test]
fn device_path_on_the_float16_bundle_equals_its_cpu_path() {
    let requests = vec![
        request(vec![picture(64, 64, 6)], "add a hat", Some("blurry"), 3, 21),
        request(vec![picture(64, 64, 4)], "make it night", Some("noise"), 3, 22),
    ];
    same_as_cpu("tiny-fp16", requests);
}

/// The bfloat16 bundle: float32 twins of its graphs behind its bfloat16 IO (`OrtSettings::bf16_as_f32`, since
/// ONNX Runtime's CPU provider cannot run bfloat16 graphs); staging rows, kernel loads and stores are bfloat16.
#[test]
fn device_path_on_the_bfloat16_bundle_equals_its_cpu_path() {
    let open_bf16 = || {
        let opts = PipelineOptions {
            backend: "ort".parse().unwrap(),
            staging_rows: 4,
            ort: OrtSettings { bf16_as_f32: true, ..Default::default() },
            ..Default::default()
        };
        Pipeline::open(&root().join("engines/tiny-bf16"), &opts).expect("open the bf16 bundle as float32 twins")
    };
    same_as_cpu_on(&open_bf16, vec![request(vec![picture(80, 64, 3)], "paint it red", Some("dark"), 3, 31)]);
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

/// The host loop tells the transformer which runs repeat at the same sizes (ONNX Runtime then keeps its arena
/// between steps instead of returning it and faulting it back in): every step but the last, and nothing after a
/// loop, finished or stopped.
#[test]
fn the_host_loop_marks_the_steps_that_repeat() {
    use qwen_edit::pipeline::Checkpoint;
    struct Recorder {
        inner: Box<dyn Engine>,
        repeat: bool,
        log: Arc<Mutex<(Vec<bool>, bool)>>,
    }
    impl Engine for Recorder {
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
            self.log.lock().unwrap().0.push(self.repeat);
            self.inner.run(inputs)
        }
        fn repeat_runs(&mut self, repeat: bool) {
            self.repeat = repeat;
            self.log.lock().unwrap().1 = repeat;
            self.inner.repeat_runs(repeat);
        }
    }
    let log = Arc::new(Mutex::new((Vec::new(), false)));
    let l2 = log.clone();
    let mut p = open("tiny").wrap_transformer(move |inner| Box::new(Recorder { inner, repeat: false, log: l2 }));
    let pre = p.preprocessor();
    let job = pre.prepare(request(vec![picture(64, 64, 2)], "x", None, 3, 5)).unwrap();
    assert!(p.run_batch(vec![job]).pop().unwrap().is_ok());
    assert_eq!(*log.lock().unwrap(), (vec![true, true, false], false));
    // Stopped after two of four steps: the hint is off again.
    *log.lock().unwrap() = (Vec::new(), false);
    let job = pre.prepare(request(vec![picture(64, 64, 2)], "x", None, 4, 5)).unwrap();
    let r = p.run_batch_with(&[&job], &|at| !matches!(at, Checkpoint::Step(k) if k >= 2)).pop().unwrap();
    assert!(r.is_err());
    assert_eq!(*log.lock().unwrap(), (vec![true, true], false));
}
