//! ONNX Runtime backend (CPU reference): runs a bundle's `.onnx` graphs through `ort`.
//! The shared library is loaded at run time from the path the project's setup provides.
