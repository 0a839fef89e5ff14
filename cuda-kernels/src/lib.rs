//! `colony-kernels`: flat tensor buffers and the hot ops on them, on CPU and CUDA.
//!
//! This crate is being built under the kernels issue; it exports nothing yet.
