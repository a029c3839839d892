//! Staging memory: preprocessing writes a job's pixel tensors once, in the engine's input dtype, into a row of a
//! staging block; the engine reads the row as it is (the TensorRT backend: pinned memory, one DMA copy each).
//!
//! A [`StagingPool`] hands out rows ([`StagedRow`]) of blocks of `rows_per_block` rows (the batch size), one
//! block per batch in flight: jobs prepared one after another take consecutive rows of the open block of their
//! row size, so a batch's rows are usually adjacent and upload in one copy ([`upload_runs`]). A row goes back
//! when its job is dropped; a block whose rows are all back is kept for reuse (pinned memory is slow to get).
//! The memory comes from a [`StagingAlloc`]: the GPU backend's page-locked memory, or [`HeapAlloc`] (ONNX
//! Runtime, which reads host memory). Also here: what an engine's output kept on its device looks like
//! ([`Kept`]) and the inputs of [`super::Engine::run_inputs`] ([`Input`]).

use std::any::Any;
use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, Mutex, Weak};

use super::counters::{Counter, RunCounters};
use super::{DType, Error, Tensor};

/// Blocks start at a multiple of this (TensorRT's and DMA's alignment).
pub const ROW_ALIGN: usize = 256;
/// Pinned memory a pool holds at most by default; blocks beyond it come from the heap (the driver then copies
/// them through its own buffer: counted as host copies). The queue bounds the rows in flight, this the RAM
/// that cannot be paged out.
pub const PINNED_BUDGET: usize = 1 << 30;

/// Rows inside a block start at multiples of this: rows whose size is a multiple of it (every pixel tensor
/// of the models) follow each other without a gap, so adjacent rows upload in one copy.
pub const ROW_STRIDE: usize = 16;

/// One allocation of staging memory. `pinned`: page-locked, so a device copies it directly (DMA).
pub struct Block {
    ptr: *mut u8,
    len: usize,
    pinned: bool,
    _owner: Box<dyn Any + Send + Sync>,
}

// SAFETY: the memory is owned by `_owner` for the block's life; rows handed out are disjoint, and each is
// written by the one job that holds it, before any reader (the engine) sees it.
unsafe impl Send for Block {}
unsafe impl Sync for Block {}

impl Block {
    /// A block over memory owned by `owner` (which must keep `ptr..ptr+len` valid and unmoved).
    ///
    /// # Safety
    /// `ptr` must point to `len` writable bytes that live as long as `owner`, aligned to [`ROW_ALIGN`].
    pub unsafe fn new(ptr: *mut u8, len: usize, pinned: bool, owner: Box<dyn Any + Send + Sync>) -> Block {
        Block { ptr, len, pinned, _owner: owner }
    }
    pub fn len(&self) -> usize {
        self.len
    }
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
    pub fn pinned(&self) -> bool {
        self.pinned
    }
}

/// Where staging blocks come from.
pub trait StagingAlloc: Send + Sync {
    fn alloc(&self, bytes: usize) -> Result<Block, Error>;
}

/// Plain heap memory (for a backend that reads host memory, and the fallback when pinned memory runs out).
pub struct HeapAlloc;

impl StagingAlloc for HeapAlloc {
    fn alloc(&self, bytes: usize) -> Result<Block, Error> {
        let mut words = vec![0u64; bytes.div_ceil(8).max(1) + ROW_ALIGN / 8];
        let base = words.as_mut_ptr() as *mut u8;
        let pad = base.align_offset(ROW_ALIGN);
        // SAFETY: `pad + bytes` lies inside `words` (ROW_ALIGN spare bytes), which the block owns and never moves.
        Ok(unsafe { Block::new(base.add(pad), bytes, false, Box::new(words)) })
    }
}

struct Slot {
    block: Arc<Block>,
    row_bytes: usize,
    stride: usize,
    taken: Vec<bool>,
}

#[derive(Default)]
struct PoolState {
    slots: Vec<Option<Slot>>,
    /// The block that new rows of a size go to.
    open: HashMap<usize, usize>,
    /// Blocks with every row free, by row size, for reuse.
    idle: HashMap<usize, Vec<usize>>,
    /// Bytes of the blocks that came from the allocator (not the heap fallback).
    allocated: usize,
}

/// Rows of staging memory for preprocessed inputs (see the module docs).
pub struct StagingPool {
    alloc: Arc<dyn StagingAlloc>,
    rows_per_block: usize,
    max_idle: usize,
    budget: usize,
    counters: Arc<RunCounters>,
    state: Mutex<PoolState>,
    me: Weak<StagingPool>,
}

impl fmt::Debug for StagingPool {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StagingPool").field("rows_per_block", &self.rows_per_block).finish_non_exhaustive()
    }
}

impl StagingPool {
    /// A pool of blocks of `rows_per_block` rows (the batch size) from `alloc`, counting host copies in `counters`.
    pub fn new(alloc: Arc<dyn StagingAlloc>, rows_per_block: usize, counters: Arc<RunCounters>) -> Arc<StagingPool> {
        Self::with_budget(alloc, rows_per_block, counters, PINNED_BUDGET)
    }

    /// [`StagingPool::new`] that takes at most `budget` bytes from `alloc` (the rest from the heap).
    pub fn with_budget(
        alloc: Arc<dyn StagingAlloc>,
        rows_per_block: usize,
        counters: Arc<RunCounters>,
        budget: usize,
    ) -> Arc<StagingPool> {
        Arc::new_cyclic(|me| StagingPool {
            alloc,
            rows_per_block: rows_per_block.max(1),
            max_idle: 4,
            budget,
            counters,
            state: Mutex::new(PoolState::default()),
            me: me.clone(),
        })
    }

    pub fn counters(&self) -> &Arc<RunCounters> {
        &self.counters
    }

    pub fn rows_per_block(&self) -> usize {
        self.rows_per_block
    }

    /// A zeroed row of `elems` values of `dtype` (written once by the caller).
    pub fn row(&self, dtype: DType, elems: usize) -> Result<StagedRow, Error> {
        let row_bytes = elems * dtype.size();
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let open = st.open.get(&row_bytes).copied().filter(|&b| st.slots[b].as_ref().is_some_and(|s| s.taken.contains(&false)));
        let block_id = match open {
            Some(b) => b,
            None => {
                let b = match st.idle.get_mut(&row_bytes).and_then(Vec::pop) {
                    Some(b) => b,
                    None => self.new_block(&mut st, row_bytes)?,
                };
                st.open.insert(row_bytes, b);
                b
            }
        };
        let slot = st.slots[block_id].as_mut().ok_or_else(|| internal("an open staging block went missing"))?;
        let index = slot.taken.iter().position(|t| !t).ok_or_else(|| internal("no free row in an open staging block"))?;
        slot.taken[index] = true;
        let offset = index * slot.stride;
        let block = slot.block.clone();
        drop(st);
        // SAFETY: the row is inside the block and free (no other holder); zeroing makes every byte defined.
        unsafe { std::ptr::write_bytes(block.ptr.add(offset), 0, row_bytes) };
        Ok(StagedRow { inner: Arc::new(RowInner { pool: self.me.clone(), block, block_id, index, offset, dtype, elems }) })
    }

    fn new_block(&self, st: &mut PoolState, row_bytes: usize) -> Result<usize, Error> {
        let stride = row_bytes.max(1).div_ceil(ROW_STRIDE) * ROW_STRIDE;
        let bytes = stride * self.rows_per_block;
        // Over the budget or out of pinned memory: plain memory still works (the driver copies it through its
        // own buffer).
        let block = if st.allocated + bytes > self.budget {
            HeapAlloc.alloc(bytes)?
        } else {
            match self.alloc.alloc(bytes) {
                Ok(b) => {
                    st.allocated += bytes;
                    b
                }
                Err(e) => {
                    tracing::warn!(error = %e, bytes, "pinned staging memory unavailable; using heap memory");
                    HeapAlloc.alloc(bytes)?
                }
            }
        };
        let slot = Slot { block: Arc::new(block), row_bytes, stride, taken: vec![false; self.rows_per_block] };
        match st.slots.iter().position(Option::is_none) {
            Some(i) => {
                st.slots[i] = Some(slot);
                Ok(i)
            }
            None => {
                st.slots.push(Some(slot));
                Ok(st.slots.len() - 1)
            }
        }
    }

    fn release(&self, block_id: usize, index: usize) {
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let Some(slot) = st.slots.get_mut(block_id).and_then(Option::as_mut) else { return };
        slot.taken[index] = false;
        if slot.taken.contains(&true) {
            return;
        }
        let row_bytes = slot.row_bytes;
        if st.open.get(&row_bytes) == Some(&block_id) {
            st.open.remove(&row_bytes);
        }
        let idle = st.idle.entry(row_bytes).or_default();
        if idle.len() < self.max_idle {
            idle.push(block_id);
        } else if let Some(freed) = st.slots[block_id].take() {
            if freed.block.pinned() {
                st.allocated -= freed.stride * self.rows_per_block;
            }
        }
    }

    /// Blocks allocated now (in use or idle).
    pub fn blocks(&self) -> usize {
        self.state.lock().unwrap_or_else(|p| p.into_inner()).slots.iter().flatten().count()
    }
}

fn internal(reason: &str) -> Error {
    Error::Run { component: "staging".into(), reason: reason.into() }
}

struct RowInner {
    pool: Weak<StagingPool>,
    block: Arc<Block>,
    block_id: usize,
    index: usize,
    offset: usize,
    dtype: DType,
    elems: usize,
}

impl Drop for RowInner {
    fn drop(&mut self) {
        if let Some(pool) = self.pool.upgrade() {
            pool.release(self.block_id, self.index);
        }
    }
}

/// One job's preprocessed tensor in staging memory: `elems` values of `dtype` at a row of a block.
/// Cheap to clone (shared); the row returns to its pool when the last clone is dropped.
#[derive(Clone)]
pub struct StagedRow {
    inner: Arc<RowInner>,
}

impl fmt::Debug for StagedRow {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let r = &self.inner;
        write!(f, "StagedRow(block {} row {}, {} x {})", r.block_id, r.index, r.elems, r.dtype)
    }
}

impl PartialEq for StagedRow {
    fn eq(&self, other: &StagedRow) -> bool {
        Arc::ptr_eq(&self.inner, &other.inner)
    }
}

/// A row's values, typed, for the one write after preprocessing.
pub enum RowMut<'a> {
    F32(&'a mut [f32]),
    F16(&'a mut [half::f16]),
    BF16(&'a mut [half::bf16]),
}

impl StagedRow {
    pub fn dtype(&self) -> DType {
        self.inner.dtype
    }
    pub fn elems(&self) -> usize {
        self.inner.elems
    }
    pub fn bytes(&self) -> usize {
        self.inner.elems * self.inner.dtype.size()
    }
    pub fn pinned(&self) -> bool {
        self.inner.block.pinned
    }
    /// (block, row index): rows of one block with consecutive indices are adjacent in memory.
    pub fn position(&self) -> (usize, usize) {
        (self.inner.block_id, self.inner.index)
    }
    /// The row's memory (valid while the row is held).
    pub fn as_bytes(&self) -> &[u8] {
        // SAFETY: the row lies inside the block, which this row keeps alive.
        unsafe { std::slice::from_raw_parts(self.inner.block.ptr.add(self.inner.offset), self.bytes()) }
    }
    /// The row as typed values to write, when this is its only holder (a freshly taken row).
    pub fn write(&mut self) -> Result<RowMut<'_>, Error> {
        let inner = Arc::get_mut(&mut self.inner).ok_or_else(|| internal("a staged row is written while shared"))?;
        let n = inner.elems;
        // SAFETY: exclusive (Arc::get_mut) access to a row inside the live block, aligned to ROW_ALIGN.
        let bytes = unsafe { std::slice::from_raw_parts_mut(inner.block.ptr.add(inner.offset), n * inner.dtype.size()) };
        Ok(match inner.dtype {
            DType::F32 => RowMut::F32(bytemuck::cast_slice_mut(bytes)),
            DType::F16 => RowMut::F16(bytemuck::cast_slice_mut(bytes)),
            DType::BF16 => RowMut::BF16(bytemuck::cast_slice_mut(bytes)),
            other => return Err(internal(&format!("staged rows hold floats, not {other}"))),
        })
    }
    /// The row's bytes appended to `out` on the host: a host copy, counted (the staged path has none).
    pub fn copy_to_host(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(self.as_bytes());
        if let Some(pool) = self.inner.pool.upgrade() {
            pool.counters.add(Counter::StagedHostCopies, 1);
        }
    }
    /// Counts a host copy the device driver makes of a row that is not pinned.
    pub fn count_driver_copy(&self) {
        if let Some(pool) = self.inner.pool.upgrade() {
            pool.counters.add(Counter::StagedHostCopies, 1);
        }
    }
    /// The row as f32 values (for traces), whatever its dtype.
    pub fn to_f32(&self) -> Vec<f32> {
        let b = self.as_bytes();
        match self.inner.dtype {
            DType::F16 => b.chunks_exact(2).map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32()).collect(),
            DType::BF16 => b.chunks_exact(2).map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32()).collect(),
            _ => b.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect(),
        }
    }
}

/// Uploads of stacked `rows`: `(first row, row count)` runs of rows adjacent in one block (one copy each).
pub fn upload_runs(rows: &[&StagedRow]) -> Vec<(usize, usize)> {
    let mut runs: Vec<(usize, usize)> = Vec::new();
    for (i, r) in rows.iter().enumerate() {
        let extend = i > 0 && {
            let (pb, pi) = rows[i - 1].position();
            let (b, ri) = r.position();
            b == pb && ri == pi + 1 && rows[i - 1].bytes() % ROW_STRIDE == 0
        };
        match runs.last_mut() {
            Some((_, n)) if extend => *n += 1,
            _ => runs.push((i, 1)),
        }
    }
    runs
}

/// Stacked `rows` as one host tensor of `shape` (each row copied once on the host, counted).
pub fn rows_to_tensor(rows: &[&StagedRow], shape: &[usize]) -> Result<Tensor, String> {
    let dtype = rows.first().map(|r| r.dtype()).ok_or("no staged rows")?;
    if rows.iter().any(|r| r.dtype() != dtype) {
        return Err("staged rows of different dtypes".into());
    }
    let mut bytes = Vec::with_capacity(rows.iter().map(|r| r.bytes()).sum());
    for r in rows {
        r.copy_to_host(&mut bytes);
    }
    Tensor::from_bytes(dtype, shape, &bytes)
}

/// Device memory an engine keeps an output in (the GPU backend's device buffer).
pub trait DeviceMemory: Send + Sync {
    fn device_ptr(&self) -> u64;
    fn bytes(&self) -> usize;
}

/// Where a kept output lives.
#[derive(Clone)]
pub enum Place {
    /// On the host (a backend without a device, or an engine that returns everything).
    Host(Arc<Tensor>),
    /// In device memory of the engine's worker: never copied to the host.
    Device(Arc<dyn DeviceMemory>),
}

/// An engine output kept where it was computed (see [`super::Engine::run_keep`]).
#[derive(Clone)]
pub struct Kept {
    pub dtype: DType,
    /// The output's shape (what gathers address).
    pub shape: Vec<usize>,
    /// The shape it has in memory: `shape` with bucketed dims still padded (equal to `shape` on the host).
    pub layout: Vec<usize>,
    pub place: Place,
}

impl fmt::Debug for Kept {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let on = if matches!(self.place, Place::Host(_)) { "host" } else { "device" };
        write!(f, "Kept({} {:?} on the {on})", self.dtype, self.shape)
    }
}

impl PartialEq for Kept {
    fn eq(&self, other: &Kept) -> bool {
        let same = match (&self.place, &other.place) {
            (Place::Host(a), Place::Host(b)) => Arc::ptr_eq(a, b),
            (Place::Device(a), Place::Device(b)) => a.device_ptr() == b.device_ptr(),
            _ => false,
        };
        same && self.dtype == other.dtype && self.shape == other.shape
    }
}

/// One contiguous run of a gather: `elems` values from `src` (element offset) to `dst` (element offset).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RowCopy {
    pub src: usize,
    pub dst: usize,
    pub elems: usize,
}

/// An input given to [`super::Engine::run_inputs`].
#[derive(Clone, Copy, Debug)]
pub enum Input<'a> {
    /// A host tensor (converted to the engine's dtype at the seam, as [`super::Engine::run`] does).
    Host(&'a Tensor),
    /// Staged rows, stacked along the first axis into `shape`, in the engine's dtype already.
    Staged { shape: &'a [usize], rows: &'a [&'a StagedRow] },
    /// `shape` zeros, with `copies` of a kept output's values written in (device to device on a GPU).
    Gather { shape: &'a [usize], src: &'a Kept, copies: &'a [RowCopy] },
}

impl Input<'_> {
    pub fn shape(&self) -> &[usize] {
        match self {
            Input::Host(t) => t.shape(),
            Input::Staged { shape, .. } | Input::Gather { shape, .. } => shape,
        }
    }
    pub fn dtype(&self) -> DType {
        match self {
            Input::Host(t) => t.dtype(),
            Input::Staged { rows, .. } => rows.first().map_or(DType::F32, |r| r.dtype()),
            Input::Gather { src, .. } => src.dtype,
        }
    }
}

/// Checks a gather against its source and destination sizes.
pub fn check_gather(shape: &[usize], src: &Kept, copies: &[RowCopy]) -> Result<(), String> {
    let (n_dst, n_src) = (shape.iter().product::<usize>(), src.shape.iter().product::<usize>());
    for c in copies {
        if c.src.checked_add(c.elems).is_none_or(|e| e > n_src) || c.dst.checked_add(c.elems).is_none_or(|e| e > n_dst) {
            return Err(format!("gather of {c:?} outside {:?} -> {shape:?}", src.shape));
        }
    }
    Ok(())
}

/// An input as a host tensor: staged rows stacked (a counted host copy each), a gather done on the host.
pub fn host_tensor(input: &Input<'_>) -> Result<Tensor, String> {
    match input {
        Input::Host(t) => Ok((*t).clone()),
        Input::Staged { shape, rows } => rows_to_tensor(rows, shape),
        Input::Gather { shape, src, copies } => {
            check_gather(shape, src, copies)?;
            let Place::Host(t) = &src.place else {
                return Err("a gather from device memory given to an engine without a device".into());
            };
            let size = src.dtype.size();
            let from = t.to_bytes();
            let mut out = vec![0u8; shape.iter().product::<usize>() * size];
            for c in *copies {
                out[c.dst * size..(c.dst + c.elems) * size].copy_from_slice(&from[c.src * size..(c.src + c.elems) * size]);
            }
            Tensor::from_bytes(src.dtype, shape, &out)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pool(rows: usize) -> (Arc<StagingPool>, Arc<RunCounters>) {
        let c = Arc::new(RunCounters::default());
        (StagingPool::new(Arc::new(HeapAlloc), rows, c.clone()), c)
    }

    fn fill(r: &mut StagedRow, v: f32) {
        match r.write().unwrap() {
            RowMut::F32(x) => x.fill(v),
            RowMut::F16(x) => x.fill(half::f16::from_f32(v)),
            RowMut::BF16(x) => x.fill(half::bf16::from_f32(v)),
        }
    }

    #[test]
    fn consecutive_jobs_fill_one_block_per_batch_and_upload_in_one_copy() {
        let (p, counters) = pool(4);
        let mut rows: Vec<StagedRow> = (0..4).map(|_| p.row(DType::F16, 104).unwrap()).collect();
        for (k, r) in rows.iter_mut().enumerate() {
            fill(r, k as f32);
        }
        assert_eq!(p.blocks(), 1, "four rows, one block");
        let refs: Vec<&StagedRow> = rows.iter().collect();
        // 104 f16 values = 208 bytes, a multiple of the 16-byte stride: the four rows are one run, one copy.
        assert_eq!(upload_runs(&refs), vec![(0, 4)]);
        let odd: Vec<StagedRow> = (0..2).map(|_| p.row(DType::F16, 3).unwrap()).collect();
        let o: Vec<&StagedRow> = odd.iter().collect();
        assert_eq!(upload_runs(&o), vec![(0, 1), (1, 1)], "6-byte rows are padded to 16: not contiguous, a copy each");
        let wide: Vec<StagedRow> = (0..2).map(|_| p.row(DType::F32, 64).unwrap()).collect();
        let w: Vec<&StagedRow> = wide.iter().collect();
        assert_eq!(upload_runs(&w), vec![(0, 2)]);
        // Out of order (another batch's row between): separate copies.
        let mixed = [&wide[1], &wide[0]];
        assert_eq!(upload_runs(&mixed), vec![(0, 1), (1, 1)]);
        // The stacked tensor is the rows in order; building it on the host is a counted copy per row.
        let t = rows_to_tensor(&refs, &[4, 104]).unwrap().into_f32().unwrap();
        assert_eq!((t[[0, 0]], t[[3, 103]]), (0.0, 3.0));
        assert_eq!(counters.snapshot().staged_host_copies, 4);
    }

    #[test]
    fn rows_return_to_the_pool_and_blocks_are_reused() {
        let (p, _) = pool(2);
        let a = p.row(DType::F32, 10).unwrap();
        let b = p.row(DType::F32, 10).unwrap();
        let c = p.row(DType::F32, 10).unwrap(); // the first block is full: a second one
        assert_eq!((a.position().0, b.position().0), (0, 0));
        assert_eq!(c.position().0, 1);
        let other = p.row(DType::F32, 12).unwrap(); // another row size: its own block
        assert_eq!(other.position().0, 2);
        drop((a, b));
        assert_eq!(p.blocks(), 3, "an idle block is kept");
        let d = p.row(DType::F32, 10).unwrap();
        assert_eq!(d.position(), (1, 1), "the open block first");
        let e = p.row(DType::F32, 10).unwrap();
        assert_eq!(e.position().0, 0, "then the idle one, reused");
        assert_eq!(p.blocks(), 3);
        // A clone shares the row; it returns when the last clone goes.
        let e2 = e.clone();
        drop(e);
        assert_eq!(e2.position().0, 0);
        let mut shared = e2.clone();
        assert!(shared.write().is_err(), "a shared row is not written");
    }

    #[test]
    fn pinned_memory_is_bounded_and_the_rest_comes_from_the_heap() {
        struct Pinned;
        impl StagingAlloc for Pinned {
            fn alloc(&self, bytes: usize) -> Result<Block, Error> {
                let b = HeapAlloc.alloc(bytes)?;
                // SAFETY: the same memory, owned by the heap block kept inside (a "pinned" stand-in for the test).
                Ok(unsafe { Block::new(b.ptr, b.len, true, Box::new(b)) })
            }
        }
        let counters = Arc::new(RunCounters::default());
        // Blocks of 2 rows of 64 bytes = 128 bytes; a budget of 256 bytes holds two.
        let p = StagingPool::with_budget(Arc::new(Pinned), 2, counters.clone(), 256);
        let rows: Vec<StagedRow> = (0..6).map(|_| p.row(DType::F32, 16).unwrap()).collect();
        let pinned: Vec<bool> = rows.iter().map(StagedRow::pinned).collect();
        assert_eq!(pinned, [true, true, true, true, false, false]);
        // A row that is not pinned reaches a device through the driver's buffer: a counted host copy.
        rows[4].count_driver_copy();
        assert_eq!(counters.snapshot().staged_host_copies, 1);
    }

    #[test]
    fn rows_are_zeroed_typed_and_aligned() {
        let (p, _) = pool(3);
        let mut r = p.row(DType::BF16, 7).unwrap();
        assert!(r.as_bytes().iter().all(|&b| b == 0));
        fill(&mut r, 1.5);
        assert_eq!(r.to_f32(), vec![1.5; 7]);
        assert_eq!(r.as_bytes().as_ptr() as usize % ROW_STRIDE, 0);
        drop(r);
        let r2 = p.row(DType::BF16, 7).unwrap();
        assert!(r2.as_bytes().iter().all(|&b| b == 0), "a reused row is zeroed again");
        let mut ints = p.row(DType::I64, 3).unwrap();
        assert!(ints.write().is_err(), "staged rows hold floats");
    }

    #[test]
    fn gathers_on_the_host_copy_rows_and_zero_the_rest() {
        let t = Tensor::f32(&[2, 4], (0..8).map(|v| v as f32).collect());
        let src = Kept { dtype: DType::F32, shape: vec![2, 4], layout: vec![2, 4], place: Place::Host(Arc::new(t)) };
        let copies = [RowCopy { src: 1, dst: 0, elems: 2 }, RowCopy { src: 5, dst: 3, elems: 3 }];
        let t = host_tensor(&Input::Gather { shape: &[2, 3], src: &src, copies: &copies }).unwrap();
        assert_eq!(t, Tensor::f32(&[2, 3], vec![1.0, 2.0, 0.0, 5.0, 6.0, 7.0]));
        let bad = [RowCopy { src: 7, dst: 0, elems: 2 }];
        assert!(host_tensor(&Input::Gather { shape: &[2, 3], src: &src, copies: &bad }).is_err());
    }
}
