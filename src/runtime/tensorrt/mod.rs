//! TensorRT backend: runs a bundle's `.plan` engines through the C++ shim on one CUDA stream per worker. `plan` holds
//! the pure decisions (buckets, padding, buffer sizes, graph keys, the loop program), `graphs` the capture/replay policy;
//! `worker` and `engine` call CUDA/TensorRT.

mod engine;
mod graphs;
mod plan;
mod worker;

pub use engine::TrtEngine;
pub use graphs::{GraphExec, Graphs, OutShapes};
pub use plan::{
    bucket_len, bucket_series, buffer_sizes, check_outputs_fit, crop_tensor, input_ops, loop_program, order_given, order_inputs,
    pad_tensor, pad_value, plan_run, remap_copy, run_program, GraphKey, LoopBuf, LoopOp, LruCache, ProfileShapes, RunPlan,
    TrtOptions,
};
pub use worker::TrtWorker;
