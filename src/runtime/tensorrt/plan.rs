//! Pure planning of the TensorRT backend: text buckets, profile choice and padding, buffer sizes, graph keys and
//! their LRU cache, and the device loop's program. No CUDA or TensorRT call here: unit-tested without a GPU.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::hash::Hash;

use ndarray::{ArrayD, IxDyn, SliceInfoElem};

use crate::runtime::shim;
use crate::runtime::staging::{self, upload_runs, Input, Kept, Place, RowCopy, StagedRow};
use crate::runtime::step::{self, StepShape};
use crate::runtime::{check_given, check_inputs, DType, DenoiseLoop, Dim, Error, Tensor, TensorInfo};

/// Bucket sizes for a padded dim: 16, 24, 32, 48, 64, 96, ... (powers of two and 1.5x between),
/// so padding wastes at most a third of the length and shapes repeat across requests.
pub fn bucket_series(limit: usize) -> Vec<usize> {
    let mut out = Vec::new();
    let mut p = 16usize;
    while p <= limit {
        out.push(p);
        let mid = p + p / 2;
        if mid <= limit {
            out.push(mid);
        }
        p = match p.checked_mul(2) {
            Some(v) => v,
            None => break,
        };
    }
    out
}

/// The padded length for `len` in a profile allowing `[min, max]`: the smallest bucket >= len,
/// never beyond `max` (the max itself is always a bucket). None when len is outside the range.
pub fn bucket_len(len: usize, min: usize, max: usize) -> Option<usize> {
    if len < min || len > max {
        return None;
    }
    Some(bucket_series(max).into_iter().find(|&b| b >= len).unwrap_or(max).max(min))
}

/// Min and max shapes of every input (in the engine's input order) in one optimization profile.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProfileShapes {
    pub min: Vec<Vec<usize>>,
    pub max: Vec<Vec<usize>>,
}

impl ProfileShapes {
    fn fits(&self, shapes: &[Vec<usize>]) -> bool {
        shapes.len() == self.min.len()
            && shapes.iter().zip(self.min.iter().zip(&self.max)).all(|(s, (lo, hi))| {
                s.len() == lo.len() && s.iter().zip(lo.iter().zip(hi)).all(|(&d, (&a, &b))| a <= d && d <= b)
            })
    }
    fn volume(&self) -> u128 {
        self.max.iter().map(|s| s.iter().map(|&d| d as u128).product::<u128>()).sum()
    }
}

/// How one run executes: the profile, the padded input shapes, and each bucketed dim's (real, padded) length.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RunPlan {
    pub profile: usize,
    pub shapes: Vec<Vec<usize>>,
    pub padded: BTreeMap<String, (usize, usize)>,
}

/// Chooses the profile and padding for concrete input `shapes` (in `inputs` order): every profile
/// whose ranges hold the padded shapes qualifies; the tightest (smallest max volume) wins.
pub fn plan_run(
    inputs: &[TensorInfo],
    shapes: &[Vec<usize>],
    profiles: &[ProfileShapes],
    bucketed: &[String],
) -> Result<RunPlan, String> {
    // The length of each bucketed dim, which every input that has it must agree on.
    let mut lengths: BTreeMap<String, usize> = BTreeMap::new();
    for (info, shape) in inputs.iter().zip(shapes) {
        for (d, &n) in info.shape.iter().zip(shape) {
            if let Dim::Dynamic(name) = d {
                if bucketed.contains(name) {
                    if let Some(&prev) = lengths.get(name) {
                        if prev != n {
                            return Err(format!("inputs disagree on dim `{name}`: {prev} vs {n} (`{}`)", info.name));
                        }
                    }
                    lengths.insert(name.clone(), n);
                }
            }
        }
    }
    let mut best: Option<(u128, RunPlan)> = None;
    'profiles: for (pi, p) in profiles.iter().enumerate() {
        // The tightest range each bucketed dim has in this profile, over every input that has it.
        let mut range: BTreeMap<&str, (usize, usize)> = BTreeMap::new();
        for (i, info) in inputs.iter().enumerate() {
            for (axis, d) in info.shape.iter().enumerate() {
                if let Dim::Dynamic(name) = d {
                    if lengths.contains_key(name) {
                        let (lo, hi) = (p.min[i].get(axis).copied().unwrap_or(0), p.max[i].get(axis).copied().unwrap_or(0));
                        let e = range.entry(name.as_str()).or_insert((lo, hi));
                        *e = (e.0.max(lo), e.1.min(hi));
                    }
                }
            }
        }
        let mut padded = BTreeMap::new();
        for (name, &n) in &lengths {
            let (lo, hi) = range.get(name.as_str()).copied().unwrap_or((n, n));
            match bucket_len(n, lo, hi) {
                Some(b) => {
                    padded.insert(name.clone(), (n, b));
                }
                None => continue 'profiles,
            }
        }
        let new_shapes: Vec<Vec<usize>> = inputs
            .iter()
            .zip(shapes)
            .map(|(info, shape)| {
                info.shape
                    .iter()
                    .zip(shape)
                    .map(|(d, &n)| match d {
                        Dim::Dynamic(name) => padded.get(name).map(|&(_, b)| b).unwrap_or(n),
                        Dim::Fixed(_) => n,
                    })
                    .collect()
            })
            .collect();
        if !p.fits(&new_shapes) {
            continue;
        }
        let v = p.volume();
        if best.as_ref().is_none_or(|(bv, _)| v < *bv) {
            best = Some((v, RunPlan { profile: pi, shapes: new_shapes, padded }));
        }
    }
    best.map(|(_, p)| p).ok_or_else(|| {
        let given: Vec<String> = inputs.iter().zip(shapes).map(|(i, s)| format!("{} {:?}", i.name, s)).collect();
        let ranges: Vec<String> = profiles
            .iter()
            .enumerate()
            .map(|(k, p)| {
                let r: Vec<String> =
                    inputs.iter().enumerate().map(|(i, info)| format!("{} {:?}..{:?}", info.name, p.min[i], p.max[i])).collect();
                format!("profile {k}: {}", r.join(", "))
            })
            .collect();
        format!(
            "input shapes [{}] are outside every optimization profile of the engine ({}): add the size to the \
             manifest's profiles and rebuild the engine",
            given.join(", "),
            ranges.join("; ")
        )
    })
}

/// The value padding positions get, per input (engines/README.md): masks 0 (padding is masked),
/// `position_ids` 1 (as the reference pads), `image_embed_index` -1 (no vision token), else 0.
pub fn pad_value(input: &str) -> f64 {
    match input {
        "position_ids" => 1.0,
        "image_embed_index" => -1.0,
        _ => 0.0,
    }
}

fn pad_array<T: Clone>(a: &ArrayD<T>, shape: &[usize], fill: T) -> ArrayD<T> {
    let mut out = ArrayD::from_elem(IxDyn(shape), fill);
    let info: Vec<SliceInfoElem> =
        a.shape().iter().map(|&n| SliceInfoElem::Slice { start: 0, end: Some(n as isize), step: 1 }).collect();
    out.slice_mut(info.as_slice()).assign(a);
    out
}

fn crop_array<T: Clone>(a: &ArrayD<T>, shape: &[usize]) -> ArrayD<T> {
    let info: Vec<SliceInfoElem> =
        shape.iter().map(|&n| SliceInfoElem::Slice { start: 0, end: Some(n as isize), step: 1 }).collect();
    a.slice(info.as_slice()).to_owned()
}

/// Pads `t` (at the end of each axis) up to `shape` with `value`.
pub fn pad_tensor(t: &Tensor, shape: &[usize], value: f64) -> Result<Tensor, String> {
    if shape.len() != t.shape().len() || shape.iter().zip(t.shape()).any(|(&s, &n)| s < n) {
        return Err(format!("cannot pad a {:?} tensor to {:?}", t.shape(), shape));
    }
    Ok(match t {
        Tensor::F32(a) => Tensor::F32(pad_array(a, shape, value as f32)),
        Tensor::F16(a) => Tensor::F16(pad_array(a, shape, half::f16::from_f64(value))),
        Tensor::BF16(a) => Tensor::BF16(pad_array(a, shape, half::bf16::from_f64(value))),
        Tensor::I64(a) => Tensor::I64(pad_array(a, shape, value as i64)),
        Tensor::I32(a) => Tensor::I32(pad_array(a, shape, value as i32)),
        Tensor::Bool(a) => Tensor::Bool(pad_array(a, shape, value != 0.0)),
    })
}

/// Keeps the leading `shape` part of `t`.
pub fn crop_tensor(t: &Tensor, shape: &[usize]) -> Result<Tensor, String> {
    if shape.len() != t.shape().len() || shape.iter().zip(t.shape()).any(|(&s, &n)| s > n) {
        return Err(format!("cannot crop a {:?} tensor to {:?}", t.shape(), shape));
    }
    Ok(match t {
        Tensor::F32(a) => Tensor::F32(crop_array(a, shape)),
        Tensor::F16(a) => Tensor::F16(crop_array(a, shape)),
        Tensor::BF16(a) => Tensor::BF16(crop_array(a, shape)),
        Tensor::I64(a) => Tensor::I64(crop_array(a, shape)),
        Tensor::I32(a) => Tensor::I32(crop_array(a, shape)),
        Tensor::Bool(a) => Tensor::Bool(crop_array(a, shape)),
    })
}

/// Bytes of every IO buffer: the largest tensor any profile allows, rounded up to 256 bytes
/// (TensorRT's alignment). `shapes[p][i]` is tensor i's largest shape in profile p.
pub fn buffer_sizes(dtypes: &[DType], shapes: &[Vec<Vec<usize>>]) -> Result<Vec<usize>, String> {
    let mut out = vec![0usize; dtypes.len()];
    for per_profile in shapes {
        if per_profile.len() != dtypes.len() {
            return Err(format!("{} shapes for {} tensors", per_profile.len(), dtypes.len()));
        }
        for (i, (shape, dtype)) in per_profile.iter().zip(dtypes).enumerate() {
            let bytes = shape
                .iter()
                .try_fold(dtype.size(), |acc, &d| acc.checked_mul(d))
                .ok_or_else(|| format!("tensor {i} of shape {shape:?} overflows the address space"))?;
            out[i] = out[i].max(bytes);
        }
    }
    Ok(out.into_iter().map(|b| b.max(1).div_ceil(256) * 256).collect())
}

/// Whether outputs of `shapes` fit their buffers of `bytes` (in `outputs` order): checked before the
/// engine is enqueued, so an output larger than its buffer is an error and never a write past it.
pub fn check_outputs_fit(outputs: &[TensorInfo], shapes: &[Vec<usize>], bytes: &[usize]) -> Result<(), String> {
    if shapes.len() != outputs.len() || bytes.len() != outputs.len() {
        return Err(format!("{} output shapes and {} buffers for {} outputs", shapes.len(), bytes.len(), outputs.len()));
    }
    for ((info, shape), &have) in outputs.iter().zip(shapes).zip(bytes) {
        let need = shape.iter().try_fold(info.dtype.size(), |acc, &d| acc.checked_mul(d));
        if need.is_none_or(|n| n > have) {
            return Err(format!("output `{}` of shape {shape:?} exceeds its {have} byte buffer", info.name));
        }
    }
    Ok(())
}

/// Identifies one captured CUDA graph: the profile and the exact (padded) input shapes.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct GraphKey {
    pub profile: usize,
    pub shapes: Vec<Vec<usize>>,
}

/// A small least-recently-used map with a fixed capacity (capacity 0 stores nothing).
pub struct LruCache<K, V> {
    pub(super) capacity: usize,
    map: HashMap<K, V>,
    order: VecDeque<K>,
}

impl<K: Clone + Eq + Hash, V> LruCache<K, V> {
    pub fn new(capacity: usize) -> Self {
        LruCache { capacity, map: HashMap::new(), order: VecDeque::new() }
    }
    pub fn len(&self) -> usize {
        self.map.len()
    }
    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }
    pub fn contains(&self, k: &K) -> bool {
        self.map.contains_key(k)
    }
    fn touch(&mut self, k: &K) {
        if let Some(i) = self.order.iter().position(|x| x == k) {
            if let Some(x) = self.order.remove(i) {
                self.order.push_back(x);
            }
        }
    }
    /// The value for `k`, marked most recently used.
    pub fn get(&mut self, k: &K) -> Option<&mut V> {
        if self.map.contains_key(k) {
            self.touch(k);
        }
        self.map.get_mut(k)
    }
    /// Inserts (or replaces) `k`; returns what was evicted to make room.
    pub fn insert(&mut self, k: K, v: V) -> Vec<(K, V)> {
        let mut evicted = Vec::new();
        if self.capacity == 0 {
            evicted.push((k, v));
            return evicted;
        }
        if self.map.insert(k.clone(), v).is_some() {
            self.touch(&k);
            return evicted;
        }
        self.order.push_back(k);
        while self.map.len() > self.capacity {
            let Some(old) = self.order.pop_front() else { break };
            if let Some(v) = self.map.remove(&old) {
                evicted.push((old, v));
            }
        }
        evicted
    }
}

// ---------------------------------------------------------------------------------------------
// The device loop as a program: built here (pure, unit-tested), executed on the GPU by TrtEngine
// and, in tests/device_loop.rs, by a host emulator of the device (no GPU exists here).

/// A buffer the device loop addresses: an engine IO buffer, or one of the loop's own.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum LoopBuf {
    /// Engine input / output `i` (in the engine's order).
    Input(usize),
    Output(usize),
    /// The float32 latents [batch, seq, channels], updated in place by every step.
    Latents,
    /// The time input of every step [steps, rows], in the time input's dtype.
    Timesteps,
    /// The true CFG scale of each job, float32.
    Scales,
}

/// One stream-ordered device operation of a run or of the loop.
#[derive(Clone, Debug, PartialEq)]
pub enum LoopOp {
    /// Host bytes into a buffer (through pinned staging), from its start.
    Upload { dst: LoopBuf, bytes: Vec<u8> },
    /// Staged rows (preprocessed pixels, in the engine's dtype, in pinned memory) into a buffer at `dst_offset`
    /// bytes, adjacent rows of one block in one copy: the only copy these values make.
    UploadRows { dst: LoopBuf, dst_offset: usize, rows: Vec<StagedRow> },
    /// Zeroes the first `bytes` of `dst`, then copies `copies` (elements of `elem` bytes) from a kept output
    /// on the device (the text embeddings, gathered without leaving the GPU).
    Gather { dst: LoopBuf, bytes: usize, src: Kept, copies: Vec<RowCopy>, elem: usize },
    /// Device-to-device copy into the start of `dst`.
    Copy { src: LoopBuf, src_offset: usize, dst: LoopBuf, bytes: usize },
    /// The engine on what its input buffers hold (a CUDA graph replay once captured).
    Execute,
    /// The step kernel: velocity = output `velocity`, hidden states = input `hidden`.
    Step { velocity: usize, v_dtype: DType, hidden: usize, h_dtype: DType, shape: StepShape, dt: f32 },
    /// The first `bytes` of a buffer back to the host (the loop's result).
    Download { src: LoopBuf, bytes: usize },
    /// Wait for the stream (every launch so far has finished), then ask the loop whether to go on
    /// with step `step` ([`DenoiseLoop::proceed`]). Only in programs of loops that can be stopped.
    Checkpoint { step: usize },
    /// Output `i` (its executed size) back to the host.
    DownloadOutput(usize),
    /// Output `i` (its executed size) copied into device memory of its own, which outlives the run: the kept
    /// output, for a later engine's gather.
    KeepOutput(usize),
}

/// The engine's inputs in its own order, from named tensors (checked against the declarations).
pub fn order_inputs<'a>(
    component: &str,
    declared: &[TensorInfo],
    inputs: &[(&str, &'a Tensor)],
) -> Result<Vec<&'a Tensor>, Error> {
    check_inputs(component, declared, inputs)?;
    declared.iter().map(|info| inputs.iter().find(|(n, _)| *n == info.name).map(|(_, t)| *t)).collect::<Option<_>>().ok_or_else(
        || Error::Contract { component: component.into(), reason: "an input went missing after the contract check".into() },
    )
}

/// The engine's inputs in its own order, from named [`Input`]s (checked against the declarations).
pub fn order_given<'a>(component: &str, declared: &[TensorInfo], inputs: &[(&str, Input<'a>)]) -> Result<Vec<Input<'a>>, Error> {
    check_given(component, declared, inputs)?;
    declared.iter().map(|info| inputs.iter().find(|(n, _)| *n == info.name).map(|(_, t)| *t)).collect::<Option<_>>().ok_or_else(
        || Error::Contract { component: component.into(), reason: "an input went missing after the contract check".into() },
    )
}

/// `offset` (an element of a tensor of shape `logical`) in the same tensor laid out as `layout` (each dim
/// at least as large: bucketed dims padded at their end).
fn relayout(mut offset: usize, logical: &[usize], layout: &[usize]) -> usize {
    let (mut stride_l, mut stride_m): (usize, usize) = (logical.iter().product(), layout.iter().product());
    let mut out = 0;
    for (&l, &m) in logical.iter().zip(layout) {
        stride_l /= l.max(1);
        stride_m /= m.max(1);
        out += (offset / stride_l.max(1)) * stride_m;
        offset %= stride_l.max(1);
    }
    out
}

/// Elements that stay contiguous in both layouts: from the last dim that differs on.
fn contiguous_block(logical: &[usize], layout: &[usize]) -> usize {
    match (0..logical.len()).rev().find(|&k| logical[k] != layout[k]) {
        Some(j) => logical[j..].iter().product::<usize>().max(1),
        None => usize::MAX,
    }
}

/// `copy` (element offsets in a source of shape `src.0` and a destination of shape `dst.0`) as copies between
/// the same tensors laid out as `src.1` and `dst.1` (bucketed dims padded): split where padding breaks
/// contiguity, each piece moved to the padded layouts.
pub fn remap_copy(copy: RowCopy, src: (&[usize], &[usize]), dst: (&[usize], &[usize])) -> Vec<RowCopy> {
    let (bs, bd) = (contiguous_block(src.0, src.1), contiguous_block(dst.0, dst.1));
    let mut out = Vec::new();
    let (mut s, mut d, mut left) = (copy.src, copy.dst, copy.elems);
    while left > 0 {
        let n = left.min(bs - s % bs).min(bd - d % bd);
        out.push(RowCopy { src: relayout(s, src.0, src.1), dst: relayout(d, dst.0, dst.1), elems: n });
        (s, d, left) = (s + n, d + n, left - n);
    }
    out
}

/// The upload of each input (in the engine's order) for `plan`: host tensors converted, padded and uploaded;
/// staged rows in the engine's dtype uploaded as they are; gathers of a kept device output done on the
/// device. Anything else (a staged row of another dtype, a kept output on the host) goes through the host.
pub fn input_ops(inputs: &[TensorInfo], given: &[Input<'_>], plan: &RunPlan) -> Result<Vec<LoopOp>, String> {
    let mut ops = Vec::with_capacity(given.len());
    for (i, ((info, input), shape)) in inputs.iter().zip(given).zip(&plan.shapes).enumerate() {
        let dst = LoopBuf::Input(i);
        match input {
            Input::Staged { shape: s, rows } if *s == shape.as_slice() && rows.iter().all(|r| r.dtype() == info.dtype) => {
                let row_bytes: Vec<usize> = rows.iter().map(|r| r.bytes()).collect();
                for (first, n) in upload_runs(rows) {
                    let dst_offset = row_bytes[..first].iter().sum();
                    ops.push(LoopOp::UploadRows {
                        dst,
                        dst_offset,
                        rows: rows[first..first + n].iter().map(|r| (*r).clone()).collect(),
                    });
                }
            }
            Input::Gather { shape: s, src, copies }
                if src.dtype == info.dtype && matches!(src.place, Place::Device(_)) && s.len() == shape.len() =>
            {
                staging::check_gather(s, src, copies)?;
                let copies =
                    copies.iter().flat_map(|c| remap_copy(*c, (&src.shape, &src.layout), (s, shape.as_slice()))).collect();
                let bytes = shape.iter().product::<usize>() * info.dtype.size();
                ops.push(LoopOp::Gather { dst, bytes, src: (*src).clone(), copies, elem: info.dtype.size() });
            }
            Input::Host(t) => ops.push(LoopOp::Upload { dst, bytes: upload_bytes(info, t, shape)? }),
            other => {
                let t = staging::host_tensor(other).map_err(|e| format!("`{}`: {e}", info.name))?;
                ops.push(LoopOp::Upload { dst, bytes: upload_bytes(info, &t, shape)? });
            }
        }
    }
    Ok(ops)
}

/// A host tensor as the bytes of its input buffer: converted to the engine's dtype, padded to `shape`.
fn upload_bytes(info: &TensorInfo, t: &Tensor, shape: &[usize]) -> Result<Vec<u8>, String> {
    let mut t = t.to_dtype(info.dtype).map_err(|e| format!("`{}`: {e}", info.name))?;
    if t.shape() != shape {
        t = pad_tensor(&t, shape, pad_value(&info.name))?;
    }
    Ok(t.to_bytes())
}

/// One run of an engine as a program: the plan (profile, padding), the uploads of `given`, the execution, and
/// every output downloaded except `keep`, which stays on the device ([`LoopOp::KeepOutput`]).
pub fn run_program(
    component: &str,
    (inputs, outputs): (&[TensorInfo], &[TensorInfo]),
    profiles: &[ProfileShapes],
    bucketed: &[String],
    given: &[(&str, Input<'_>)],
    keep: Option<&str>,
) -> Result<(RunPlan, Vec<LoopOp>), Error> {
    let err = |reason: String| Error::Contract { component: component.into(), reason };
    let ordered = order_given(component, inputs, given)?;
    let shapes: Vec<Vec<usize>> = ordered.iter().map(|t| t.shape().to_vec()).collect();
    let plan = plan_run(inputs, &shapes, profiles, bucketed).map_err(err)?;
    let mut ops = input_ops(inputs, &ordered, &plan).map_err(err)?;
    ops.push(LoopOp::Execute);
    if let Some(k) = keep.filter(|k| !outputs.iter().any(|o| o.name == *k)) {
        return Err(err(format!("no output `{k}` to keep")));
    }
    for (i, o) in outputs.iter().enumerate() {
        ops.push(if keep == Some(o.name.as_str()) { LoopOp::KeepOutput(i) } else { LoopOp::DownloadOutput(i) });
    }
    Ok((plan, ops))
}

/// The whole denoising loop for an engine with `inputs`/`outputs` and `profiles`: the run plan
/// (profile, padding) and the operations, in stream order. Everything stays on the device between
/// steps: each step copies its time row into the time input, runs the engine, and runs the step
/// kernel, which updates the latents and rewrites the state input for the next step.
pub fn loop_program(
    component: &str,
    inputs: &[TensorInfo],
    outputs: &[TensorInfo],
    profiles: &[ProfileShapes],
    bucketed: &[String],
    job: &DenoiseLoop<'_>,
) -> Result<(RunPlan, Vec<LoopOp>), Error> {
    let err = |reason: String| Error::Contract { component: component.into(), reason };
    job.validate()?;
    let s = job.shape;
    let rows = s.rows();
    let find = |list: &[TensorInfo], name: &str, what: &str| {
        list.iter().position(|t| t.name == name).ok_or_else(|| err(format!("the engine has no {what} `{name}`")))
    };
    let si = find(inputs, job.state_input, "input")?;
    let ti = find(inputs, job.time_input, "input")?;
    let oi = find(outputs, job.output, "output")?;
    let (h_dtype, t_dtype, v_dtype) = (inputs[si].dtype, inputs[ti].dtype, outputs[oi].dtype);
    for (name, d) in [(job.state_input, h_dtype), (job.time_input, t_dtype), (job.output, v_dtype)] {
        if step::dtype_code(d).is_none() {
            return Err(err(format!("`{name}` is {d}: the device loop needs float tensors")));
        }
    }
    let t0 = Tensor::f32(&[rows], vec![job.timesteps[0]; rows]);
    let mut named: Vec<(&str, Input<'_>)> = job.fixed.to_vec();
    named.push((job.state_input, Input::Host(job.state)));
    named.push((job.time_input, Input::Host(&t0)));
    let ordered = order_given(component, inputs, &named)?;
    let shapes: Vec<Vec<usize>> = ordered.iter().map(|t| t.shape().to_vec()).collect();
    let plan = plan_run(inputs, &shapes, profiles, bucketed).map_err(err)?;
    // The kernel addresses the state and the velocity as [rows, img_seq, channels]: never padded.
    let state_shape = [rows, s.img_seq, s.channels];
    if plan.shapes[si] != state_shape || plan.shapes[ti] != [rows] {
        return Err(err(format!(
            "the plan pads `{}` to {:?} or `{}` to {:?}: the device loop needs them unpadded",
            job.state_input, plan.shapes[si], job.time_input, plan.shapes[ti]
        )));
    }
    let mut ops = input_ops(inputs, &ordered, &plan).map_err(err)?;
    ops.push(LoopOp::Upload { dst: LoopBuf::Latents, bytes: bytemuck::cast_slice(job.latents).to_vec() });
    let steps = job.timesteps.len();
    let row_bytes = rows * t_dtype.size();
    if steps > 1 {
        let table: Vec<f32> = job.timesteps.iter().flat_map(|&t| std::iter::repeat_n(t, rows)).collect();
        let table = Tensor::f32(&[steps, rows], table).to_dtype(t_dtype).map_err(err)?;
        ops.push(LoopOp::Upload { dst: LoopBuf::Timesteps, bytes: table.to_bytes() });
    }
    if let Some(scales) = job.scales {
        ops.push(LoopOp::Upload { dst: LoopBuf::Scales, bytes: bytemuck::cast_slice(scales).to_vec() });
    }
    for (k, &dt) in job.dts.iter().enumerate() {
        if k > 0 && job.proceed.is_some() {
            ops.push(LoopOp::Checkpoint { step: k });
        }
        if k > 0 {
            ops.push(LoopOp::Copy {
                src: LoopBuf::Timesteps,
                src_offset: k * row_bytes,
                dst: LoopBuf::Input(ti),
                bytes: row_bytes,
            });
        }
        ops.push(LoopOp::Execute);
        ops.push(LoopOp::Step { velocity: oi, v_dtype, hidden: si, h_dtype, shape: s, dt });
    }
    ops.push(LoopOp::Download { src: LoopBuf::Latents, bytes: s.latents() * 4 });
    Ok((plan, ops))
}

/// TensorInfo of an engine tensor: dtype from the engine; dynamic dims named after the contract
/// (when it has the tensor with the same rank), else `d<axis>`.
fn engine_info(io: &shim::IoTensor, contract: Option<&[TensorInfo]>) -> Result<TensorInfo, String> {
    let dtype = crate::runtime::trt_facts::dtype(io.dtype)
        .map_err(|name| format!("`{}` has element type {name} which the seam does not carry", io.name))?;
    let named = contract.and_then(|c| c.iter().find(|t| t.name == io.name && t.shape.len() == io.shape.len()));
    let shape = io
        .shape
        .iter()
        .enumerate()
        .map(|(axis, &d)| match usize::try_from(d) {
            Ok(n) => Dim::Fixed(n),
            Err(_) => match named.map(|t| &t.shape[axis]) {
                Some(Dim::Dynamic(name)) => Dim::Dynamic(name.clone()),
                _ => Dim::Dynamic(format!("d{axis}")),
            },
        })
        .collect();
    Ok(TensorInfo { name: io.name.clone(), dtype, shape })
}

/// The engine's inputs and outputs as the seam declares them (see [`engine_info`]; `contract`: the manifest's
/// inputs and outputs). Every IO tensor must be a plain linear device tensor.
pub(super) fn engine_io(
    io: &[shim::IoTensor],
    contract: Option<(&[TensorInfo], &[TensorInfo])>,
) -> Result<(Vec<TensorInfo>, Vec<TensorInfo>), String> {
    for t in io {
        if !t.linear || !t.on_device || t.shape_tensor {
            return Err(format!(
                "IO tensor `{}` is not a plain linear device tensor (vectorized format, host location or shape tensor)",
                t.name
            ));
        }
    }
    let (ci, co) = match contract {
        Some((i, o)) => (Some(i), Some(o)),
        None => (None, None),
    };
    let inputs = io.iter().filter(|t| t.is_input).map(|t| engine_info(t, ci)).collect::<Result<_, _>>()?;
    let outputs = io.iter().filter(|t| !t.is_input).map(|t| engine_info(t, co)).collect::<Result<_, _>>()?;
    Ok((inputs, outputs))
}

/// Settings of the TensorRT backend.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TrtOptions {
    /// CUDA device ordinal of this worker.
    pub device: usize,
    /// CUDA graphs kept per engine (least recently used evicted); 0 runs plain enqueues.
    pub graph_cache: usize,
    /// Symbolic dims padded up to a bucket so that graph shapes repeat (text lengths).
    pub bucketed_dims: Vec<String>,
}

impl Default for TrtOptions {
    fn default() -> TrtOptions {
        TrtOptions { device: 0, graph_cache: 32, bucketed_dims: vec!["seq".into(), "txt_seq".into()] }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(name: &str, shape: Vec<Dim>) -> TensorInfo {
        TensorInfo { name: name.into(), dtype: DType::F32, shape }
    }
    fn dynamic(n: &str) -> Dim {
        Dim::Dynamic(n.into())
    }

    #[test]
    fn bucket_series_and_lengths() {
        assert_eq!(bucket_series(200), vec![16, 24, 32, 48, 64, 96, 128, 192]);
        assert_eq!(bucket_len(1, 1, 1600), Some(16));
        assert_eq!(bucket_len(17, 1, 1600), Some(24));
        assert_eq!(bucket_len(100, 1, 1600), Some(128));
        assert_eq!(bucket_len(1537, 1, 1600), Some(1600)); // past the last bucket: the profile max
        assert_eq!(bucket_len(1600, 1, 1600), Some(1600));
        assert_eq!(bucket_len(1601, 1, 1600), None);
        assert_eq!(bucket_len(5, 8, 64), None);
        assert_eq!(bucket_len(10, 10, 12), Some(12));
        // Waste is bounded: the bucket is less than 1.5x the length above 16.
        for len in 16..5000 {
            let b = bucket_len(len, 1, 8192).unwrap();
            assert!(b >= len && (b as f64) <= len as f64 * 1.5 + 1.0, "{len} -> {b}");
        }
    }

    fn transformer() -> (Vec<TensorInfo>, Vec<ProfileShapes>) {
        let inputs = vec![
            info("hidden_states", vec![dynamic("batch"), dynamic("img_seq"), Dim::Fixed(64)]),
            info("encoder_hidden_states", vec![dynamic("batch"), dynamic("txt_seq"), Dim::Fixed(32)]),
            info("encoder_hidden_states_mask", vec![dynamic("batch"), dynamic("txt_seq")]),
            info("txt_cos", vec![dynamic("txt_seq"), Dim::Fixed(64)]),
        ];
        let p0 = ProfileShapes {
            min: vec![vec![1, 8, 64], vec![1, 1, 32], vec![1, 1], vec![1, 64]],
            max: vec![vec![8, 8192, 64], vec![8, 1000, 32], vec![8, 1000], vec![1000, 64]],
        };
        let p1 = ProfileShapes {
            min: vec![vec![1, 8, 64], vec![1, 1, 32], vec![1, 1], vec![1, 64]],
            max: vec![vec![2, 8192, 64], vec![2, 1000, 32], vec![2, 1000], vec![1000, 64]],
        };
        (inputs, vec![p0, p1])
    }

    #[test]
    fn plans_pad_text_and_pick_the_tightest_profile() {
        let (inputs, profiles) = transformer();
        let bucketed = vec!["txt_seq".to_string()];
        let shapes = vec![vec![2, 4096, 64], vec![2, 77, 32], vec![2, 77], vec![77, 64]];
        let plan = plan_run(&inputs, &shapes, &profiles, &bucketed).unwrap();
        assert_eq!(plan.profile, 1, "batch 2 fits the smaller profile");
        assert_eq!(plan.shapes, vec![vec![2, 4096, 64], vec![2, 96, 32], vec![2, 96], vec![96, 64]]);
        assert_eq!(plan.padded["txt_seq"], (77, 96));
        // Batch 4 only fits profile 0; a text of 999 pads to the profile max 1000.
        let shapes = vec![vec![4, 4096, 64], vec![4, 999, 32], vec![4, 999], vec![999, 64]];
        let plan = plan_run(&inputs, &shapes, &profiles, &bucketed).unwrap();
        assert_eq!((plan.profile, plan.padded["txt_seq"]), (0, (999, 1000)));
        // Same bucket -> same graph key.
        let a = plan_run(&inputs, &[vec![1, 64, 64], vec![1, 70, 32], vec![1, 70], vec![70, 64]], &profiles, &bucketed).unwrap();
        let b = plan_run(&inputs, &[vec![1, 64, 64], vec![1, 90, 32], vec![1, 90], vec![90, 64]], &profiles, &bucketed).unwrap();
        assert_eq!(GraphKey { profile: a.profile, shapes: a.shapes }, GraphKey { profile: b.profile, shapes: b.shapes });
        // Without bucketing the shapes stay exact.
        let c = plan_run(&inputs, &[vec![1, 64, 64], vec![1, 70, 32], vec![1, 70], vec![70, 64]], &profiles, &[]).unwrap();
        assert_eq!(c.shapes[1], vec![1, 70, 32]);
    }

    #[test]
    fn plans_reject_what_no_profile_holds() {
        let (inputs, profiles) = transformer();
        let bucketed = vec!["txt_seq".to_string()];
        let e = plan_run(&inputs, &[vec![9, 64, 64], vec![9, 7, 32], vec![9, 7], vec![7, 64]], &profiles, &bucketed).unwrap_err();
        assert!(e.contains("outside every optimization profile") && e.contains("rebuild"), "{e}");
        let e = plan_run(&inputs, &[vec![1, 64, 64], vec![1, 7, 32], vec![1, 8], vec![7, 64]], &profiles, &bucketed).unwrap_err();
        assert!(e.contains("disagree on dim `txt_seq`"), "{e}");
        let e = plan_run(&inputs, &[vec![1, 64, 64], vec![1, 1001, 32], vec![1, 1001], vec![1001, 64]], &profiles, &bucketed)
            .unwrap_err();
        assert!(e.contains("outside"), "{e}");
    }

    #[test]
    fn padding_and_cropping_round_trip() {
        let t = Tensor::i64(&[2, 3], vec![1, 2, 3, 4, 5, 6]);
        let p = pad_tensor(&t, &[2, 5], pad_value("position_ids")).unwrap();
        assert_eq!(p, Tensor::i64(&[2, 5], vec![1, 2, 3, 1, 1, 4, 5, 6, 1, 1]));
        assert_eq!(crop_tensor(&p, &[2, 3]).unwrap(), t);
        let m = pad_tensor(&Tensor::i64(&[1, 2], vec![1, 1]), &[1, 4], pad_value("attention_mask")).unwrap();
        assert_eq!(m, Tensor::i64(&[1, 4], vec![1, 1, 0, 0]));
        let idx = pad_tensor(&Tensor::i64(&[1, 1], vec![3]), &[1, 2], pad_value("image_embed_index")).unwrap();
        assert_eq!(idx, Tensor::i64(&[1, 2], vec![3, -1]));
        let h = Tensor::f32(&[1, 1], vec![2.5]).to_dtype(DType::BF16).unwrap();
        let hp = pad_tensor(&h, &[2, 1], 0.0).unwrap();
        assert_eq!(hp.into_f32().unwrap().into_raw_vec_and_offset().0, vec![2.5, 0.0]);
        assert!(pad_tensor(&t, &[1, 3], 0.0).is_err());
        assert!(crop_tensor(&t, &[2, 4]).is_err());
    }

    #[test]
    fn buffers_hold_the_largest_profile_shape() {
        let dtypes = [DType::F16, DType::I64];
        let shapes = vec![vec![vec![8, 100, 64], vec![8, 10]], vec![vec![2, 1000, 64], vec![2, 3]]];
        let s = buffer_sizes(&dtypes, &shapes).unwrap();
        assert_eq!(s, vec![(2 * 1000 * 64 * 2usize).div_ceil(256) * 256, 768]);
        assert!(s.iter().all(|b| b % 256 == 0));
        assert_eq!(buffer_sizes(&[DType::Bool], &[vec![vec![0]]]).unwrap(), vec![256]);
        assert!(buffer_sizes(&dtypes, &[vec![vec![1]]]).is_err());
        assert!(buffer_sizes(&[DType::F32], &[vec![vec![usize::MAX, 2]]]).is_err());
    }

    #[test]
    fn gathers_follow_the_padding_of_both_sides() {
        let rc = |src, dst, elems| RowCopy { src, dst, elems };
        // Source [2, 3, 2] kept padded to [2, 4, 2]; destination unpadded: rows move, tokens stay contiguous.
        let src = (&[2, 3, 2][..], &[2, 4, 2][..]);
        let same = (&[2, 3, 2][..], &[2, 3, 2][..]);
        assert_eq!(remap_copy(rc(6, 0, 6), src, same), [rc(8, 0, 6)]);
        // A copy across the row boundary splits where the padding is.
        assert_eq!(remap_copy(rc(4, 4, 4), src, same), [rc(4, 4, 2), rc(8, 6, 2)]);
        // Both sides padded differently: [2, 2, 2] into [2, 3, 2] (text bucket of the transformer).
        let dst = (&[2, 2, 2][..], &[2, 3, 2][..]);
        assert_eq!(remap_copy(rc(2, 2, 4), src, dst), [rc(2, 2, 2), rc(4, 6, 2)]);
        // No padding: the copy as it is.
        assert_eq!(remap_copy(rc(1, 2, 5), same, same), [rc(1, 2, 5)]);
    }

    #[test]
    fn a_run_keeps_one_output_on_the_device_and_downloads_the_rest() {
        let inputs = [info("x", vec![dynamic("batch"), Dim::Fixed(2)])];
        let outputs = [info("a", vec![dynamic("batch"), Dim::Fixed(2)]), info("b", vec![dynamic("batch")])];
        let profiles = vec![ProfileShapes { min: vec![vec![1, 2]], max: vec![vec![8, 2]] }];
        let x = Tensor::f32(&[1, 2], vec![1.0, 2.0]);
        let io = (&inputs[..], &outputs[..]);
        let (_, ops) = run_program("c", io, &profiles, &[], &[("x", Input::Host(&x))], Some("a")).unwrap();
        assert_eq!(ops[1..], [LoopOp::Execute, LoopOp::KeepOutput(0), LoopOp::DownloadOutput(1)]);
        assert!(run_program("c", io, &profiles, &[], &[("x", Input::Host(&x))], Some("z")).is_err());
        // A gather from a kept output on the host (another backend's) goes up through the host.
        let host = Kept {
            dtype: DType::F32,
            shape: vec![1, 4],
            layout: vec![1, 4],
            place: Place::Host(std::sync::Arc::new(Tensor::f32(&[1, 4], vec![5.0, 6.0, 7.0, 8.0]))),
        };
        let copies = [RowCopy { src: 2, dst: 0, elems: 2 }];
        let g = Input::Gather { shape: &[1, 2], src: &host, copies: &copies };
        let (_, ops) = run_program("c", io, &profiles, &[], &[("x", g)], None).unwrap();
        assert_eq!(ops[0], LoopOp::Upload { dst: LoopBuf::Input(0), bytes: bytemuck::cast_slice(&[7.0f32, 8.0]).to_vec() });
    }

    #[test]
    fn outputs_are_checked_against_their_buffers() {
        let outs = [info("sample", vec![dynamic("batch"), Dim::Fixed(4)])];
        assert!(check_outputs_fit(&outs, &[vec![2, 4]], &[32]).is_ok());
        let e = check_outputs_fit(&outs, &[vec![3, 4]], &[32]).unwrap_err();
        assert!(e.contains("`sample`") && e.contains("32 byte buffer"), "{e}");
        assert!(check_outputs_fit(&outs, &[vec![usize::MAX, 4]], &[32]).is_err(), "overflow is an error");
        assert!(check_outputs_fit(&outs, &[], &[32]).is_err());
    }

    #[test]
    fn graph_cache_evicts_least_recently_used() {
        let key = |b: usize| GraphKey { profile: 0, shapes: vec![vec![b, 16]] };
        let mut c: LruCache<GraphKey, &str> = LruCache::new(2);
        assert!(c.insert(key(1), "one").is_empty());
        assert!(c.insert(key(2), "two").is_empty());
        assert_eq!(c.get(&key(1)).map(|v| *v), Some("one")); // 1 is now the most recent
        let evicted = c.insert(key(3), "three");
        assert_eq!(evicted.len(), 1);
        assert_eq!(evicted[0].0, key(2));
        assert!(c.contains(&key(1)) && c.contains(&key(3)) && !c.contains(&key(2)));
        assert!(c.insert(key(3), "again").is_empty(), "replacing does not evict");
        assert_eq!(c.len(), 2);
        let mut off: LruCache<GraphKey, u8> = LruCache::new(0);
        assert_eq!(off.insert(key(1), 1).len(), 1);
        assert!(off.is_empty());
        // Keys differ by profile and by every dim.
        assert_ne!(GraphKey { profile: 1, shapes: vec![vec![1, 16]] }, key(1));
    }

    #[test]
    fn engine_io_takes_dim_names_from_the_contract() {
        let io = shim::IoTensor {
            name: "encoder_hidden_states".into(),
            is_input: true,
            dtype: crate::runtime::trt_facts::dtype_code(DType::BF16),
            shape: vec![-1, -1, 32],
            linear: true,
            on_device: true,
            shape_tensor: false,
        };
        let contract = [info("encoder_hidden_states", vec![dynamic("batch"), dynamic("txt_seq"), Dim::Fixed(32)])];
        let t = engine_info(&io, Some(&contract)).unwrap();
        assert_eq!(t.dtype, DType::BF16);
        assert_eq!(t.shape, vec![dynamic("batch"), dynamic("txt_seq"), Dim::Fixed(32)]);
        assert_eq!(engine_info(&io, None).unwrap().shape[1], dynamic("d1"));
        let fp8 = shim::IoTensor { dtype: crate::runtime::trt_facts::FACTS.dtype.fp8, ..io };
        assert!(engine_info(&fp8, None).unwrap_err().contains("fp8"));
    }

    #[test]
    fn loop_program_keeps_the_loop_on_the_device() {
        let typed = |name: &str, dtype: DType, shape: Vec<Dim>| TensorInfo { name: name.into(), dtype, shape };
        let inputs = vec![
            typed("hidden_states", DType::F16, vec![dynamic("batch"), dynamic("img_seq"), Dim::Fixed(64)]),
            typed("encoder_hidden_states", DType::BF16, vec![dynamic("batch"), dynamic("txt_seq"), Dim::Fixed(32)]),
            typed("timestep", DType::F16, vec![dynamic("batch")]),
        ];
        let outputs = vec![typed("sample", DType::BF16, vec![dynamic("batch"), dynamic("img_seq"), Dim::Fixed(64)])];
        let wide = |v: usize| vec![vec![v, v, 64], vec![v, v, 32], vec![v]];
        let profiles = vec![ProfileShapes { min: wide(1), max: wide(4096) }];
        let shape = StepShape { batch: 2, seq: 5, img_seq: 8, channels: 64, cfg: true };
        let state = Tensor::f32(&[4, 8, 64], vec![0.25; 4 * 8 * 64]);
        let text = Tensor::f32(&[4, 70, 32], vec![1.0; 4 * 70 * 32]);
        let latents = vec![0.5f32; shape.latents()];
        let fixed = [("encoder_hidden_states", Input::Host(&text))];
        let job = DenoiseLoop {
            fixed: &fixed,
            state_input: "hidden_states",
            state: &state,
            time_input: "timestep",
            timesteps: &[0.875, 0.5, 0.125],
            output: "sample",
            latents: &latents,
            shape,
            dts: &[-0.25, -0.375, -0.125],
            scales: Some(&[4.0, 2.5]),
            proceed: None,
        };
        let bucketed = vec!["txt_seq".to_string()];
        let (plan, ops) = loop_program("transformer", &inputs, &outputs, &profiles, &bucketed, &job).unwrap();
        assert_eq!(plan.padded["txt_seq"], (70, 96), "fixed inputs are padded to the text bucket");
        let f16 = |v: f32| half::f16::from_f32(v).to_bits().to_le_bytes();
        let times = |t: f32| [f16(t); 4].concat();
        // Everything goes up once: inputs in the engine's dtypes (padded), latents, time table, scales.
        let up = |dst: LoopBuf| {
            ops.iter().find_map(|o| match o {
                LoopOp::Upload { dst: d, bytes } if *d == dst => Some(bytes.clone()),
                _ => None,
            })
        };
        assert_eq!(up(LoopBuf::Input(0)).unwrap().len(), 4 * 8 * 64 * 2);
        assert_eq!(up(LoopBuf::Input(0)).unwrap()[..2], f16(0.25));
        assert_eq!(up(LoopBuf::Input(1)).unwrap().len(), 4 * 96 * 32 * 2);
        assert_eq!(up(LoopBuf::Input(2)).unwrap(), times(0.875));
        assert_eq!(up(LoopBuf::Latents).unwrap(), bytemuck::cast_slice::<f32, u8>(&latents));
        assert_eq!(up(LoopBuf::Timesteps).unwrap(), [times(0.875), times(0.5), times(0.125)].concat());
        assert_eq!(up(LoopBuf::Scales).unwrap(), bytemuck::cast_slice::<f32, u8>(&[4.0f32, 2.5]));
        // Then only device work per step, and one download at the end.
        let step = |dt: f32| LoopOp::Step { velocity: 0, v_dtype: DType::BF16, hidden: 0, h_dtype: DType::F16, shape, dt };
        let time_row = |k: usize| LoopOp::Copy { src: LoopBuf::Timesteps, src_offset: k * 8, dst: LoopBuf::Input(2), bytes: 8 };
        let tail = vec![
            LoopOp::Execute,
            step(-0.25),
            time_row(1),
            LoopOp::Execute,
            step(-0.375),
            time_row(2),
            LoopOp::Execute,
            step(-0.125),
            LoopOp::Download { src: LoopBuf::Latents, bytes: 2 * 5 * 64 * 4 },
        ];
        assert_eq!(ops.len(), 6 + tail.len());
        assert_eq!(ops[6..], tail[..]);

        // What the kernel cannot address is refused before anything runs.
        let err = |inputs: &[TensorInfo], outputs: &[TensorInfo], bucketed: &[String]| {
            loop_program("transformer", inputs, outputs, &profiles, bucketed, &job).unwrap_err().to_string()
        };
        let mut int_time = inputs.clone();
        int_time[2].dtype = DType::I64;
        assert!(err(&int_time, &outputs, &bucketed).contains("needs float tensors"));
        let renamed = vec![typed("velocity", DType::BF16, outputs[0].shape.clone())];
        assert!(err(&inputs, &renamed, &bucketed).contains("no output `sample`"));
        let e = err(&inputs, &outputs, &["img_seq".to_string()]);
        assert!(e.contains("needs them unpadded"), "{e}");
        let single = DenoiseLoop { timesteps: &[0.875], dts: &[-0.25], ..job };
        let (_, ops) = loop_program("transformer", &inputs, &outputs, &profiles, &bucketed, &single).unwrap();
        assert!(!ops.iter().any(|o| matches!(o, LoopOp::Copy { .. } | LoopOp::Upload { dst: LoopBuf::Timesteps, .. })));

        // A loop that can be stopped waits and asks before every step after the first.
        let go_on = |_: usize| true;
        let stoppable = DenoiseLoop { proceed: Some(&go_on), ..job };
        let (_, ops) = loop_program("transformer", &inputs, &outputs, &profiles, &bucketed, &stoppable).unwrap();
        let checkpoints: Vec<usize> =
            ops.iter().enumerate().filter_map(|(i, o)| matches!(o, LoopOp::Checkpoint { .. }).then_some(i)).collect();
        assert_eq!(checkpoints.len(), 2);
        for (k, &i) in checkpoints.iter().enumerate() {
            assert_eq!(ops[i], LoopOp::Checkpoint { step: k + 1 });
            assert!(matches!(ops[i - 1], LoopOp::Step { .. }), "after the previous step's kernel");
            assert_eq!(ops[i + 1], time_row(k + 1), "before the next step's first launch");
        }
    }
}
