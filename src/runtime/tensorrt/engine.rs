//! One TensorRT engine on a worker's device and stream: IO buffers sized once from the profiles, pinned
//! staging, CUDA graph capture and replay, and the execution of the device loop's program.

use std::collections::HashMap;
use std::sync::Arc;

use super::graphs::{GraphExec, Graphs, OutShapes};
use super::plan::TrtOptions;
use super::plan::{
    buffer_sizes, check_outputs_fit, crop_tensor, engine_io, loop_program, run_program, LoopBuf, LoopOp, ProfileShapes, RunPlan,
};
use crate::runtime::counters::{Counter, RunCounters};
use crate::runtime::cuda::{Device, DeviceBuffer, PinnedAlloc, PinnedBuffer, StepKernel};
use crate::runtime::shim::{self, ContextHandle, EngineHandle, GraphHandle};
use crate::runtime::staging::{Input, Kept, Place, StagingAlloc};
use crate::runtime::{DType, DenoiseLoop, DeviceLoop, Dim, Engine, Error, Outputs, Tensor, TensorInfo};

/// What a program left: the output shapes, the downloads (buffer, bytes) and the kept output.
#[derive(Default)]
struct Executed {
    out_shapes: Option<OutShapes>,
    downloads: Vec<(LoopBuf, usize)>,
    kept: Option<Kept>,
}

/// One TensorRT engine on one worker's device and stream.
pub struct TrtEngine {
    component: String,
    inputs: Vec<TensorInfo>,
    outputs: Vec<TensorInfo>,
    profiles: Vec<ProfileShapes>,
    bucketed: Vec<String>,
    // Drop order matters: graphs and contexts before the engine, everything before the buffers.
    graphs: Graphs<ContextHandle, GraphHandle>,
    base: Vec<Option<ContextHandle>>,
    engine: EngineHandle,
    in_bufs: Vec<(DeviceBuffer, PinnedBuffer)>,
    out_bufs: Vec<(DeviceBuffer, PinnedBuffer)>,
    activation: DeviceBuffer,
    /// The device loop's own buffers (latents, time table, CFG scales), grown on demand.
    scratch: HashMap<LoopBuf, (DeviceBuffer, PinnedBuffer)>,
    /// Device buffers of kept outputs; one no longer held elsewhere is reused.
    kept: Vec<Arc<DeviceBuffer>>,
    step_kernel: Option<Arc<StepKernel>>,
    device: Arc<Device>,
    counters: Arc<RunCounters>,
}

impl TrtEngine {
    pub(super) fn new(
        component: &str,
        engine: EngineHandle,
        device: Arc<Device>,
        contract: Option<(&[TensorInfo], &[TensorInfo])>,
        options: &TrtOptions,
        step_kernel: Option<Arc<StepKernel>>,
        counters: Arc<RunCounters>,
    ) -> Result<TrtEngine, Error> {
        let load_err = |reason: String| Error::Load { component: component.into(), path: String::new(), reason };
        let io = engine.io_tensors().map_err(|e| load_err(e.to_string()))?;
        let (inputs, outputs) = engine_io(&io, contract).map_err(load_err)?;
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
            graphs: Graphs::new(component, options.graph_cache, counters.clone()),
            base,
            engine,
            in_bufs,
            out_bufs,
            activation,
            scratch: HashMap::new(),
            kept: Vec::new(),
            step_kernel,
            device,
            counters,
        })
    }

    /// Device bytes of the engine's activation memory and of its IO buffers.
    pub fn memory(&self) -> (u64, u64) {
        let io: usize = self.in_bufs.iter().chain(&self.out_bufs).map(|(d, _)| d.bytes()).sum();
        (self.activation.bytes() as u64, io as u64)
    }

    /// Graphs captured and cached now.
    pub fn graphs_cached(&self) -> usize {
        self.graphs.len()
    }

    /// Optimization profiles of the engine (min/max input shapes).
    pub fn profiles(&self) -> &[ProfileShapes] {
        &self.profiles
    }

    fn run_err(&self, reason: impl std::fmt::Display) -> Error {
        Error::Run { component: self.component.clone(), reason: reason.to_string() }
    }

    /// One run of `plan` on the stream: a graph replay, a capture or an uncaptured enqueue ([`Graphs`]).
    fn execute(&mut self, plan: &RunPlan) -> Result<OutShapes, Error> {
        let out_bytes: Vec<usize> = self.out_bufs.iter().map(|(d, _)| d.bytes()).collect();
        let mut exec = ShimExec {
            engine: &self.engine,
            base: &mut self.base,
            io: (&self.inputs, &self.outputs),
            bufs: (&self.in_bufs, &self.out_bufs),
            out_bytes: &out_bytes,
            activation: &self.activation,
            stream: self.device.stream_handle(),
        };
        self.graphs.execute(&mut exec, plan).map_err(|reason| Error::Run { component: self.component.clone(), reason })
    }
}

/// An engine's IO buffers with their pinned staging.
type IoBufs<'a> = &'a [(DeviceBuffer, PinnedBuffer)];

/// The engine's contexts, graphs and buffers as a [`GraphExec`] (the real device, through the shim).
struct ShimExec<'a> {
    engine: &'a EngineHandle,
    base: &'a mut [Option<ContextHandle>],
    io: (&'a [TensorInfo], &'a [TensorInfo]),
    bufs: (IoBufs<'a>, IoBufs<'a>),
    out_bytes: &'a [usize],
    activation: &'a DeviceBuffer,
    stream: usize,
}

impl ShimExec<'_> {
    fn shapes_on(&self, ctx: &mut ContextHandle, shapes: &[Vec<usize>]) -> Result<OutShapes, shim::ShimError> {
        for (t, s) in self.io.0.iter().zip(shapes) {
            ctx.set_input_shape(&t.name, s)?;
        }
        self.io.1.iter().map(|t| ctx.tensor_shape(&t.name)).collect()
    }

    fn base(&mut self, profile: usize) -> Result<&mut ContextHandle, String> {
        self.base.get_mut(profile).and_then(Option::as_mut).ok_or_else(|| format!("no context for profile {profile}"))
    }
}

impl GraphExec for ShimExec<'_> {
    type Context = ContextHandle;
    type Graph = GraphHandle;

    fn new_context(&mut self, profile: usize, shapes: &[Vec<usize>]) -> Result<(ContextHandle, OutShapes), String> {
        // A dedicated context per graph: a captured graph keeps referring to its context's state.
        let mut ctx = self
            .engine
            .create_context(profile, self.stream, self.activation.ptr() as usize, self.activation.bytes().max(1))
            .map_err(|e| e.to_string())?;
        bind_addresses(&mut ctx, self.io.0, self.io.1, self.bufs.0, self.bufs.1).map_err(|e| e.to_string())?;
        let out = self.shapes_on(&mut ctx, shapes).map_err(|e| e.to_string())?;
        Ok((ctx, out))
    }

    fn set_base_shapes(&mut self, profile: usize, shapes: &[Vec<usize>]) -> Result<OutShapes, String> {
        let mut ctx =
            self.base.get_mut(profile).and_then(Option::take).ok_or_else(|| format!("no context for profile {profile}"))?;
        let out = self.shapes_on(&mut ctx, shapes).map_err(|e| e.to_string());
        self.base[profile] = Some(ctx);
        out
    }

    fn check_outputs(&self, shapes: &OutShapes) -> Result<(), String> {
        check_outputs_fit(self.io.1, shapes, self.out_bytes)
    }

    fn enqueue(&mut self, profile: usize, context: Option<&mut ContextHandle>) -> Result<(), String> {
        let stream = self.stream;
        match context {
            Some(ctx) => ctx.enqueue(stream),
            None => self.base(profile)?.enqueue(stream),
        }
        .map_err(|e| e.to_string())
    }

    fn capture(&mut self, context: &mut ContextHandle) -> Result<GraphHandle, String> {
        context.capture(self.stream).map_err(|e| e.to_string())
    }

    fn launch(&mut self, graph: &GraphHandle) -> Result<(), String> {
        graph.launch(self.stream).map_err(|e| e.to_string())
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

    /// Executes a program (a run's or the loop's) on the stream; one synchronisation at the end, and one at
    /// each checkpoint (a loop that can be stopped: the host waits for the step, then asks `proceed`).
    fn run_ops(
        &mut self,
        plan: &RunPlan,
        ops: Vec<LoopOp>,
        kernel: Option<&StepKernel>,
        proceed: Option<&dyn Fn(usize) -> bool>,
    ) -> Result<Executed, Error> {
        let mut done = Executed::default();
        for op in ops {
            if let LoopOp::Checkpoint { step } = op {
                self.device.synchronize()?;
                if proceed.is_some_and(|go_on| !go_on(step)) {
                    return Err(Error::Cancelled { step });
                }
                continue;
            }
            self.run_op(plan, op, kernel, &mut done)?;
        }
        self.device.synchronize()?;
        Ok(done)
    }

    fn run_op(&mut self, plan: &RunPlan, op: LoopOp, kernel: Option<&StepKernel>, done: &mut Executed) -> Result<(), Error> {
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
                let (dev, pinned) =
                    bufs.ok_or_else(|| Error::Run { component: self.component.clone(), reason: format!("no buffer {dst:?}") })?;
                self.device.upload(&bytes, pinned, dev)?;
            }
            LoopOp::UploadRows { dst, dst_offset, rows } => self.device.upload_rows(&rows, self.buffer(dst)?, dst_offset)?,
            LoopOp::Gather { dst, bytes, src, copies, elem } => {
                let Place::Device(mem) = &src.place else { return Err(self.run_err("a device gather from host memory")) };
                self.device.gather(self.buffer(dst)?, bytes, (mem.device_ptr(), mem.bytes()), &copies, elem)?;
            }
            LoopOp::Copy { src, src_offset, dst, bytes } => {
                self.device.copy(self.buffer(src)?, src_offset, self.buffer(dst)?, bytes)?
            }
            LoopOp::Execute => done.out_shapes = Some(self.execute(plan)?),
            LoopOp::Step { velocity, v_dtype, hidden, h_dtype, shape, dt } => {
                let kernel = kernel.ok_or_else(|| self.run_err("a step without a step kernel"))?;
                let want = [shape.rows(), shape.img_seq, shape.channels];
                let got = done.out_shapes.as_ref().and_then(|s| s.get(velocity));
                if got.map(Vec::as_slice) != Some(&want[..]) {
                    return Err(self.run_err(format!("the velocity has shape {got:?}, the step needs {want:?}")));
                }
                let scales = if shape.cfg { Some(self.buffer(LoopBuf::Scales)?) } else { None };
                let v = (self.buffer(LoopBuf::Output(velocity))?, v_dtype);
                let h = (self.buffer(LoopBuf::Input(hidden))?, h_dtype);
                self.device.launch_step(kernel, shape, v, self.buffer(LoopBuf::Latents)?, h, scales, dt)?;
            }
            LoopOp::Download { src, bytes } => {
                let (dev, pinned) = self.scratch.get_mut(&src).ok_or_else(|| Error::Run {
                    component: self.component.clone(),
                    reason: format!("cannot download {src:?}"),
                })?;
                self.device.download(dev, bytes, pinned)?;
                done.downloads.push((src, bytes));
            }
            LoopOp::DownloadOutput(i) => {
                let n = self.output_bytes(i, done)?;
                let (dev, pinned) = &mut self.out_bufs[i];
                self.device.download(dev, n, pinned)?;
                done.downloads.push((LoopBuf::Output(i), n));
            }
            LoopOp::KeepOutput(i) => done.kept = Some(self.keep_output(plan, i, done)?),
            LoopOp::Checkpoint { .. } => return Err(self.run_err("a checkpoint outside run_ops")),
        }
        Ok(())
    }

    /// Bytes of output `i` as executed.
    fn output_bytes(&self, i: usize, done: &Executed) -> Result<usize, Error> {
        let shape = done.out_shapes.as_ref().and_then(|s| s.get(i)).ok_or_else(|| self.run_err("an output before the run"))?;
        Ok(shape.iter().product::<usize>() * self.outputs[i].dtype.size())
    }

    /// Output `i` copied into a device buffer of its own (reusing one nobody holds any more).
    fn keep_output(&mut self, plan: &RunPlan, i: usize, done: &Executed) -> Result<Kept, Error> {
        let n = self.output_bytes(i, done)?;
        let layout = done.out_shapes.as_ref().map(|s| s[i].clone()).unwrap_or_default();
        let free = self.kept.iter().position(|b| Arc::strong_count(b) == 1 && b.bytes() >= n);
        let buf = match free {
            Some(k) => self.kept[k].clone(),
            None => {
                let b = Arc::new(self.device.alloc(n)?);
                self.kept.push(b.clone());
                b
            }
        };
        self.device.copy(&self.out_bufs[i].0, 0, &buf, n)?;
        let info = &self.outputs[i];
        let shape = real_shape(info, &layout, plan);
        Ok(Kept { dtype: info.dtype, shape, layout, place: Place::Device(buf) })
    }

    /// Runs `given`, keeping output `keep` on the device; the other outputs come back cropped, as f32.
    fn run_given(&mut self, given: &[(&str, Input<'_>)], keep: Option<&str>) -> Result<(Outputs, Option<Kept>), Error> {
        let io = (&self.inputs[..], &self.outputs[..]);
        let (plan, ops) = run_program(&self.component, io, &self.profiles, &self.bucketed, given, keep)?;
        self.device.bind()?;
        let done = match self.run_ops(&plan, ops, None, None) {
            Ok(d) => d,
            Err(e) => {
                let _ = self.device.synchronize(); // leave the stream idle for the next run
                return Err(e);
            }
        };
        let shapes = done.out_shapes.clone().unwrap_or_default();
        let mut out = Vec::with_capacity(done.downloads.len());
        for &(buf, n) in &done.downloads {
            let LoopBuf::Output(i) = buf else { continue };
            let info = &self.outputs[i];
            let mut t = Tensor::from_bytes(info.dtype, &shapes[i], self.out_bufs[i].1.read(n)?).map_err(|e| self.run_err(e))?;
            // Crop bucketed dims back to the real lengths.
            let real = real_shape(info, &shapes[i], &plan);
            if real != shapes[i] {
                t = crop_tensor(&t, &real).map_err(|e| self.run_err(e))?;
            }
            if t.dtype().is_float() && t.dtype() != DType::F32 {
                t = t.to_dtype(DType::F32).map_err(|e| self.run_err(e))?;
            }
            out.push((info.name.clone(), t));
        }
        Ok((Outputs(out), done.kept))
    }
}

/// An output's shape with its bucketed dims back at their real lengths.
fn real_shape(info: &TensorInfo, shape: &[usize], plan: &RunPlan) -> Vec<usize> {
    info.shape
        .iter()
        .zip(shape)
        .map(|(d, &n)| match d {
            Dim::Dynamic(name) => plan.padded.get(name).map(|&(r, _)| r).unwrap_or(n),
            Dim::Fixed(_) => n,
        })
        .collect()
}

impl DeviceLoop for TrtEngine {
    fn run_loop(&mut self, job: &DenoiseLoop<'_>) -> Result<Vec<f32>, Error> {
        let kernel = self.step_kernel.clone().ok_or_else(|| self.run_err("no step kernel on this worker (NVRTC missing)"))?;
        let (plan, ops) = loop_program(&self.component, &self.inputs, &self.outputs, &self.profiles, &self.bucketed, job)?;
        self.device.bind()?;
        let result = self.run_ops(&plan, ops, Some(&kernel), job.proceed).and_then(|done| {
            let &(src, bytes) = done.downloads.first().ok_or_else(|| self.run_err("the loop program downloads nothing"))?;
            let (_, pinned) = self.scratch.get(&src).ok_or_else(|| self.run_err("the result buffer went missing"))?;
            Ok(bytemuck::pod_collect_to_vec::<u8, f32>(pinned.read(bytes)?))
        });
        match result {
            Ok(latents) => {
                self.counters.add(Counter::DeviceLoopSteps, job.dts.len() as u64);
                Ok(latents)
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
        let given: Vec<(&str, Input<'_>)> = inputs.iter().map(|(n, t)| (*n, Input::Host(t))).collect();
        Ok(self.run_given(&given, None)?.0)
    }

    fn run_inputs(&mut self, inputs: &[(&str, Input<'_>)]) -> Result<Outputs, Error> {
        Ok(self.run_given(inputs, None)?.0)
    }

    fn run_keep(&mut self, inputs: &[(&str, Input<'_>)], keep: &str) -> Result<(Outputs, Kept), Error> {
        let (out, kept) = self.run_given(inputs, Some(keep))?;
        Ok((out, kept.ok_or_else(|| self.run_err(format!("output `{keep}` was not kept")))?))
    }

    fn staging(&self) -> Option<Arc<dyn StagingAlloc>> {
        Some(Arc::new(PinnedAlloc::new(self.device.clone())))
    }
}
