//! qwen-edit: a native inference server for the Qwen-Image-Edit models.
//! The pipeline runs above one seam (`runtime::Engine`): ONNX Runtime on CPU, TensorRT on GPU.

pub mod batcher;
pub mod builder;
pub mod bundle;
pub mod config;
pub mod editor;
pub mod imaging;
pub mod lifecycle;
pub mod metrics;
pub mod onnx;
pub mod pipeline;
pub mod runtime;
pub mod server;
pub mod service;
pub mod sysmem;
pub mod worker;
