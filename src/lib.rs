//! kvsieve: a portable attention engine for language models on any GPU through wgpu.
//!
//! The model and attention policies are written against [`ops::Ops`], which two
//! executors implement: [`kernels::GpuExecutor`] (WGSL kernels; the product) and
//! [`reference::RefExecutor`] (CPU f32; the oracle and long-context harness).
//!
//! ```no_run
//! use kvsieve::gpu::GpuContext;
//! let ctx = GpuContext::new().expect("a GPU adapter");
//! println!("{}", ctx.describe());
//! ```

// `!(x >= 0.0)` is how option checks reject NaN along with negatives.
#![allow(clippy::neg_cmp_op_on_partial_ord)]

pub mod attention;
pub mod convert;
pub mod error;
pub mod eval;
pub mod generate;
pub mod gpu;
pub mod kv;
pub mod kernels;
pub mod model;
pub mod ops;
mod progress;
pub mod reference;
pub mod sampling;
pub mod shaders;
pub mod speculative;

pub use error::{Error, Result};
