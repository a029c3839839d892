//! One TensorRT engine on a worker's device and stream: IO buffers sized once from the profiles, pinned
//! staging, CUDA graph capture and replay, and the execution of the device loop's program.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use super::plan::TrtOptions;
use super::plan::{
    buffer_sizes, crop_tensor, engine_io, loop_program, order_inputs, plan_run, staged_inputs, GraphKey, LoopBuf, LoopOp,
    LruCache, ProfileShapes, RunPlan,
};
use crate::runtime::cuda::{Device, DeviceBuffer, PinnedBuffer, StepKernel};
use crate::runtime::shim::{self, ContextHandle, EngineHandle, GraphHandle};
use crate::runtime::{DType, DenoiseLoop, DeviceLoop, Dim, Engine, Error, Outputs, Tensor, TensorInfo};

struct GraphEntry {
    // Field order = drop order: the graph before the context it was captured from.
    graph: GraphHandle,
    _context: ContextHandle,
    out_shapes: Vec<Vec<usize>>,
}

/// Counters for logs and /health.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct TrtStats {
    pub runs: u64,
    pub graph_replays: u64,
    pub graph_captures: u64,
    pub capture_failures: u64,
    pub plain_enqueues: u64,
    pub graphs_cached: usize,
    /// Whole denoising loops run on the device (each counts its steps in `runs` too).
    pub device_loops: u64,
}

/// One TensorRT engine on one worker's device and stream.
pub struct TrtEngine {
    component: String,
    inputs: Vec<TensorInfo>,
    outputs: Vec<TensorInfo>,
    profiles: Vec<ProfileShapes>,
    bucketed: Vec<String>,
    // Drop order matters: graphs and contexts before the engine, everything before the buffers.
    graphs: LruCache<GraphKey, GraphEntry>,
    uncapturable: HashSet<GraphKey>,
    base: Vec<Option<ContextHandle>>,
    engine: EngineHandle,
    in_bufs: Vec<(DeviceBuffer, PinnedBuffer)>,
    out_bufs: Vec<(DeviceBuffer, PinnedBuffer)>,
    activation: DeviceBuffer,
    /// The device loop's own buffers (latents, time table, CFG scales), grown on demand.
    scratch: HashMap<LoopBuf, (DeviceBuffer, PinnedBuffer)>,
    step_kernel: Option<Arc<StepKernel>>,
    device: Arc<Device>,
    stats: TrtStats,
}

impl TrtEngine {
    pub(super) fn new(
        component: &str,
        engine: EngineHandle,
        device: Arc<Device>,
        contract: Option<(&[TensorInfo], &[TensorInfo])>,
        options: &TrtOptions,
        step_kernel: Option<Arc<StepKernel>>,
    ) -> Result<TrtEngine, Error> {
        let load_err = |reason: String| Error::Load { component: component.into(), path: String::new(), reason };
        let (inputs, outputs) = engine_io(&engine.io_tensors(), contract).map_err(load_err)?;
        let profiles = read_profiles(&engine, &inputs).map_err(load_err)?;

        device.bind()?;
        let activation = device.alloc(engine.device_memory_size())?;
        // One base context per profile; set to the profile's largest inputs it tells the largest outputs.
        let (mut base, out_max) =
            base_contexts(&engine, &device, &activation, &profiles, (&inputs, &outputs)).map_err(load_err)?;
        let in_max: Vec<Shapes> = profiles.iter().map(|p| p.max.clone()).collect();
        let in_sizes = buffer_sizes(&inputs.iter().map(|t| t.dtype).collect::<Vec<_>>(), &in_max).map_err(load_err)?;
        let out_sizes = buffer_sizes(&outputs.iter().map(|t| t.dtype).collect::<Vec<_>>(), &out_max).map_err(load_err)?;
        let in_bufs = io_buffers(&device, &in_sizes, false)?;
        let out_bufs = io_buffers(&device, &out_sizes, true)?;
        // Addresses never change: set them once on every base context.
        for ctx in base.iter_mut().flatten() {
            bind_addresses(ctx, &inputs, &outputs, &in_bufs, &out_bufs).map_err(|e| load_err(e.to_string()))?;
        }
        tracing::info!(
            component,
            profiles = profiles.len(),
            activation_bytes = activation.bytes(),
            io_bytes = in_sizes.iter().chain(&out_sizes).sum::<usize>(),
            "TensorRT engine loaded"
        );
        Ok(TrtEngine {
            component: component.into(),
            inputs,
            outputs,
            profiles,
            bucketed: options.bucketed_dims.clone(),
            graphs: LruCache::new(options.graph_cache),
            uncapturable: HashSet::new(),
            base,
            engine,
            in_bufs,
            out_bufs,
            activation,
            scratch: HashMap::new(),
            step_kernel,
            device,
            stats: TrtStats::default(),
        })
    }

    pub fn stats(&self) -> TrtStats {
        TrtStats { graphs_cached: self.graphs.len(), ..self.stats }
    }

    /// Optimization profiles of the engine (min/max input shapes).
    pub fn profiles(&self) -> &[ProfileShapes] {
        &self.profiles
    }

    fn run_err(&self, reason: impl std::fmt::Display) -> Error {
        Error::Run { component: self.component.clone(), reason: reason.to_string() }
    }

    fn execute(&mut self, plan: &RunPlan) -> Result<Vec<Vec<usize>>, Error> {
        let stream = self.device.stream_handle();
        let key = GraphKey { profile: plan.profile, shapes: plan.shapes.clone() };
        if let Some(entry) = self.graphs.get(&key) {
            entry.graph.launch(stream).map_err(|e| Error::Run { component: self.component.clone(), reason: e.to_string() })?;
            self.stats.graph_replays += 1;
            return Ok(entry.out_shapes.clone());
        }
        let capture = self.graphs.capacity > 0 && !self.uncapturable.contains(&key);
        if capture {
            // A dedicated context per graph: a captured graph keeps referring to its context's state.
            let mut ctx = self
                .engine
                .create_context(plan.profile, stream, self.activation.ptr() as usize, self.activation.bytes().max(1))
                .map_err(|e| self.run_err(e))?;
            bind_addresses(&mut ctx, &self.inputs, &self.outputs, &self.in_bufs, &self.out_bufs).map_err(|e| self.run_err(e))?;
            for (t, s) in self.inputs.iter().zip(&plan.shapes) {
                ctx.set_input_shape(&t.name, s).map_err(|e| self.run_err(e))?;
            }
            // The warm-up enqueue computes this run's result; the capture records the next ones.
            ctx.enqueue(stream).map_err(|e| self.run_err(e))?;
            self.stats.plain_enqueues += 1;
            let out_shapes = self
                .outputs
                .iter()
                .map(|t| ctx.tensor_shape(&t.name))
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| self.run_err(e))?;
            match ctx.capture(stream) {
                Ok(graph) => {
                    self.stats.graph_captures += 1;
                    // Evicted graphs are idle: each run synchronises before it returns.
                    let evicted = self.graphs.insert(key, GraphEntry { graph, _context: ctx, out_shapes: out_shapes.clone() });
                    drop(evicted);
                }
                Err(e) => {
                    self.stats.capture_failures += 1;
                    tracing::warn!(component = %self.component, error = %e, "CUDA graph capture failed; this shape runs without a graph");
                    self.uncapturable.insert(key);
                }
            }
            return Ok(out_shapes);
        }
        let component = self.component.clone();
        let run_err = |e: shim::ShimError| Error::Run { component: component.clone(), reason: e.to_string() };
        let ctx = self.base.get_mut(plan.profile).and_then(Option::as_mut).ok_or_else(|| Error::Run {
            component: component.clone(),
            reason: format!("no context for profile {}", plan.profile),
        })?;
        for (t, s) in self.inputs.iter().zip(&plan.shapes) {
            ctx.set_input_shape(&t.name, s).map_err(run_err)?;
        }
        ctx.enqueue(stream).map_err(run_err)?;
        self.stats.plain_enqueues += 1;
        self.outputs.iter().map(|t| ctx.tensor_shape(&t.name)).collect::<Result<Vec<_>, _>>().map_err(run_err)
    }
}

impl TrtEngine {
    /// The loop's own buffer `which`, at least `bytes` long (reallocated when too small).
    fn scratch_at_least(&mut self, which: LoopBuf, bytes: usize) -> Result<(), Error> {
        if self.scratch.get(&which).is_none_or(|(d, _)| d.bytes() < bytes) {
            self.scratch.remove(&which); // free the old one first
            let bufs = (self.device.alloc(bytes)?, self.device.pinned(bytes, true)?);
            self.scratch.insert(which, bufs);
        }
        Ok(())
    }

    fn buffer(&self, b: LoopBuf) -> Result<&DeviceBuffer, Error> {
        match b {
            LoopBuf::Input(i) => self.in_bufs.get(i).map(|x| &x.0),
            LoopBuf::Output(i) => self.out_bufs.get(i).map(|x| &x.0),
            other => self.scratch.get(&other).map(|x| &x.0),
        }
        .ok_or_else(|| self.run_err(format!("the loop addresses {b:?}, which does not exist")))
    }

    /// Executes a loop program on the stream; one synchronisation at the end, and one at each
    /// checkpoint (a loop that can be stopped: the host waits for the step, then asks `proceed`).
    fn run_ops(
        &mut self,
        plan: &RunPlan,
        ops: Vec<LoopOp>,
        kernel: &StepKernel,
        proceed: Option<&dyn Fn(usize) -> bool>,
    ) -> Result<Vec<u8>, Error> {
        let mut out_shapes: Option<Vec<Vec<usize>>> = None;
        let mut result = None;
        for op in ops {
            match op {
                LoopOp::Upload { dst, bytes } => {
                    if !matches!(dst, LoopBuf::Input(_) | LoopBuf::Output(_)) {
                        self.scratch_at_least(dst, bytes.len())?;
                    }
                    let bufs = match dst {
                        LoopBuf::Input(i) => self.in_bufs.get_mut(i),
                        LoopBuf::Output(i) => self.out_bufs.get_mut(i),
                        other => self.scratch.get_mut(&other),
                    };
                    let Some((dev, pinned)) = bufs else {
                        return Err(Error::Run { component: self.component.clone(), reason: format!("no buffer {dst:?}") });
                    };
                    self.device.upload(&bytes, pinned, dev)?;
                }
                LoopOp::Copy { src, src_offset, dst, bytes } => {
                    self.device.copy(self.buffer(src)?, src_offset, self.buffer(dst)?, bytes)?;
                }
                LoopOp::Execute => {
                    out_shapes = Some(self.execute(plan)?);
                    self.stats.runs += 1;
                }
                LoopOp::Step { velocity, v_dtype, hidden, h_dtype, shape, dt } => {
                    let want = [shape.rows(), shape.img_seq, shape.channels];
                    let got = out_shapes.as_ref().and_then(|s| s.get(velocity));
                    if got.map(Vec::as_slice) != Some(&want[..]) {
                        return Err(self.run_err(format!("the velocity has shape {got:?}, the step needs {want:?}")));
                    }
                    let scales = if shape.cfg { Some(self.buffer(LoopBuf::Scales)?) } else { None };
                    let v = (self.buffer(LoopBuf::Output(velocity))?, v_dtype);
                    let h = (self.buffer(LoopBuf::Input(hidden))?, h_dtype);
                    self.device.launch_step(kernel, shape, v, self.buffer(LoopBuf::Latents)?, h, scales, dt)?;
                }
                LoopOp::Download { src, bytes } => {
                    let Some((dev, pinned)) = self.scratch.get_mut(&src) else {
                        return Err(Error::Run { component: self.component.clone(), reason: format!("cannot download {src:?}") });
                    };
                    self.device.download(dev, bytes, pinned)?;
                    result = Some((src, bytes));
                }
                LoopOp::Checkpoint { step } => {
                    self.device.synchronize()?;
                    if proceed.is_some_and(|go_on| !go_on(step)) {
                        return Err(Error::Cancelled { step });
                    }
                }
            }
        }
        self.device.synchronize()?;
        let (src, bytes) = result.ok_or_else(|| self.run_err("the loop program downloads nothing"))?;
        let (_, pinned) = self.scratch.get(&src).ok_or_else(|| self.run_err("the result buffer went missing"))?;
        Ok(pinned.read(bytes)?.to_vec())
    }
}

impl DeviceLoop for TrtEngine {
    fn run_loop(&mut self, job: &DenoiseLoop<'_>) -> Result<Vec<f32>, Error> {
        let kernel = self.step_kernel.clone().ok_or_else(|| self.run_err("no step kernel on this worker (NVRTC missing)"))?;
        let (plan, ops) = loop_program(&self.component, &self.inputs, &self.outputs, &self.profiles, &self.bucketed, job)?;
        self.device.bind()?;
        match self.run_ops(&plan, ops, &kernel, job.proceed) {
            Ok(bytes) => {
                self.stats.device_loops += 1;
                Ok(bytemuck::pod_collect_to_vec(&bytes))
            }
            Err(e) => {
                let _ = self.device.synchronize(); // leave the stream idle for the next run
                Err(e)
            }
        }
    }
}

/// Min and max shapes of every input in each optimization profile of `engine`.
fn read_profiles(engine: &EngineHandle, inputs: &[TensorInfo]) -> Result<Vec<ProfileShapes>, String> {
    let n_profiles = engine.num_profiles();
    if n_profiles == 0 {
        return Err("the engine has no optimization profile".into());
    }
    let mut profiles = Vec::with_capacity(n_profiles);
    for p in 0..n_profiles {
        let mut shapes = ProfileShapes { min: vec![], max: vec![] };
        for t in inputs {
            let r = engine.profile(&t.name, p).map_err(|e| e.to_string())?;
            let conv = |v: &[i64]| -> Result<Vec<usize>, String> {
                v.iter()
                    .map(|&d| usize::try_from(d).map_err(|_| format!("profile {p} of `{}` has a negative dim", t.name)))
                    .collect()
            };
            shapes.min.push(conv(&r.min)?);
            shapes.max.push(conv(&r.max)?);
        }
        profiles.push(shapes);
    }
    Ok(profiles)
}

/// One shape per tensor, in the engine's order.
type Shapes = Vec<Vec<usize>>;

/// One context per profile on the worker's stream and `activation` memory, set to the profile's largest
/// inputs; with the output shapes those give (the largest outputs, which size the output buffers).
fn base_contexts(
    engine: &EngineHandle,
    device: &Device,
    activation: &DeviceBuffer,
    profiles: &[ProfileShapes],
    (inputs, outputs): (&[TensorInfo], &[TensorInfo]),
) -> Result<(Vec<Option<ContextHandle>>, Vec<Shapes>), String> {
    let stream = device.stream_handle();
    let mut base = Vec::with_capacity(profiles.len());
    let mut out_max = Vec::with_capacity(profiles.len());
    for (p, shapes) in profiles.iter().enumerate() {
        let mut ctx =
            engine.create_context(p, stream, activation.ptr() as usize, activation.bytes().max(1)).map_err(|e| e.to_string())?;
        for (t, s) in inputs.iter().zip(&shapes.max) {
            ctx.set_input_shape(&t.name, s).map_err(|e| e.to_string())?;
        }
        let outs = outputs.iter().map(|t| ctx.tensor_shape(&t.name)).collect::<Result<Vec<_>, _>>().map_err(|e| e.to_string())?;
        out_max.push(outs);
        base.push(Some(ctx));
    }
    Ok((base, out_max))
}

/// A device buffer of each size with its pinned staging (`download`: read by the host, else written by it).
fn io_buffers(device: &Device, sizes: &[usize], download: bool) -> Result<Vec<(DeviceBuffer, PinnedBuffer)>, Error> {
    sizes.iter().map(|&b| Ok((device.alloc(b)?, device.pinned(b, download)?))).collect()
}

fn bind_addresses(
    ctx: &mut ContextHandle,
    inputs: &[TensorInfo],
    outputs: &[TensorInfo],
    in_bufs: &[(DeviceBuffer, PinnedBuffer)],
    out_bufs: &[(DeviceBuffer, PinnedBuffer)],
) -> Result<(), shim::ShimError> {
    for (t, (d, _)) in inputs.iter().zip(in_bufs).chain(outputs.iter().zip(out_bufs)) {
        ctx.set_tensor_address(&t.name, d.ptr())?;
    }
    Ok(())
}

impl Engine for TrtEngine {
    fn component(&self) -> &str {
        &self.component
    }
    fn inputs(&self) -> &[TensorInfo] {
        &self.inputs
    }
    fn outputs(&self) -> &[TensorInfo] {
        &self.outputs
    }

    fn device_loop(&mut self) -> Option<&mut dyn DeviceLoop> {
        if self.step_kernel.is_some() {
            Some(self)
        } else {
            None
        }
    }

    fn run(&mut self, inputs: &[(&str, &Tensor)]) -> Result<Outputs, Error> {
        let ordered = order_inputs(&self.component, &self.inputs, inputs)?;
        let shapes: Vec<Vec<usize>> = ordered.iter().map(|t| t.shape().to_vec()).collect();
        let plan = plan_run(&self.inputs, &shapes, &self.profiles, &self.bucketed)
            .map_err(|reason| Error::Contract { component: self.component.clone(), reason })?;
        self.stats.runs += 1;
        self.device.bind()?;

        // Host -> device: converted at the seam, padded to the bucket, staged in pinned memory.
        let staged = staged_inputs(&self.inputs, &ordered, &plan)
            .map_err(|reason| Error::Contract { component: self.component.clone(), reason })?;
        for (bytes, (dev, pinned)) in staged.iter().zip(&mut self.in_bufs) {
            self.device.upload(bytes, pinned, dev)?;
        }

        let out_shapes = match self.execute(&plan) {
            Ok(s) => s,
            Err(e) => {
                let _ = self.device.synchronize(); // leave the stream idle for the next run
                return Err(e);
            }
        };

        // Device -> host.
        let mut sizes = Vec::with_capacity(out_shapes.len());
        for (i, (info, shape)) in self.outputs.iter().zip(&out_shapes).enumerate() {
            let n = shape.iter().product::<usize>() * info.dtype.size();
            let (dev, pinned) = &mut self.out_bufs[i];
            if n > dev.bytes() {
                let _ = self.device.synchronize();
                return Err(Error::Run {
                    component: self.component.clone(),
                    reason: format!("output `{}` of shape {shape:?} exceeds its {} byte buffer", info.name, dev.bytes()),
                });
            }
            self.device.download(dev, n, pinned)?;
            sizes.push(n);
        }
        self.device.synchronize()?;

        let mut out = Vec::with_capacity(self.outputs.len());
        for (i, (info, shape)) in self.outputs.iter().zip(&out_shapes).enumerate() {
            let bytes = self.out_bufs[i].1.read(sizes[i])?;
            let mut t = Tensor::from_bytes(info.dtype, shape, bytes).map_err(|e| self.run_err(e))?;
            // Crop bucketed dims back to the real lengths.
            let real: Vec<usize> = info
                .shape
                .iter()
                .zip(shape)
                .map(|(d, &n)| match d {
                    Dim::Dynamic(name) => plan.padded.get(name).map(|&(r, _)| r).unwrap_or(n),
                    Dim::Fixed(_) => n,
                })
                .collect();
            if real != *shape {
                t = crop_tensor(&t, &real).map_err(|e| self.run_err(e))?;
            }
            if t.dtype().is_float() && t.dtype() != DType::F32 {
                t = t.to_dtype(DType::F32).map_err(|e| self.run_err(e))?;
            }
            out.push((info.name.clone(), t));
        }
        Ok(Outputs(out))
    }
}
