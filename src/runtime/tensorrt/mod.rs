//! TensorRT backend: runs a bundle's `.plan` engines through the C++ shim on one CUDA stream per worker. `plan` holds
//! the pure decisions (buckets, padding, buffer sizes, graph keys, the loop program); `worker` and `engine` call CUDA/TensorRT.

mod engine;
mod plan;
mod worker;

pub use engine::{TrtEngine, TrtStats};
pub use plan::{
    bucket_len, bucket_series, buffer_sizes, crop_tensor, loop_program, order_inputs, pad_tensor, pad_value, plan_run,
    staged_inputs, GraphKey, LoopBuf, LoopOp, LruCache, ProfileShapes, RunPlan, TrtOptions,
};
pub use worker::TrtWorker;
