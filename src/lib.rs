//! kvsieve: a portable attention engine for language models on any GPU through wgpu.
//!
//! Most applications need only the items at the crate root: load an
//! [`Engine`] with [`Options`] (executor, context, [`AttentionPolicy`]), then
//! stream [`Token`]s from [`Engine::chat`] over [`Message`]s or from
//! [`Engine::generate`], with [`GenerateParams`] (sampling, [`Speculate`]).
//! [`Stats`] and [`Engine::selection_stats`] report what happened; every
//! failure is an [`Error`].
//!
//! ```no_run
//! use kvsieve::{AttentionPolicy, Engine, GenerateParams, Message, Options, TokenSelectConfig};
//! let dir = kvsieve::convert::default_model_dir()?;
//! let opts = Options {
//!     policy: AttentionPolicy::TokenSelect(TokenSelectConfig::default()),
//!     ..Options::default()
//! };
//! let mut engine = Engine::load(&dir, opts)?;
//! for tok in engine.chat(&[Message::new("user", "Hi!")], &GenerateParams::default())? {
//!     print!("{}", tok?.text);
//! }
//! eprintln!("{:.1} tok/s", engine.stats.decode_tps());
//! # Ok::<(), kvsieve::Error>(())
//! ```
//!
//! # Modules for advanced use
//!
//! The layers underneath (docs/ARCHITECTURE.md) stay public for tools, tests
//! and benchmarks; their APIs change more freely than the crate root's:
//! - [`generate`]: sessions, the sampler, the tokenizer and chat template;
//! - [`model`]: the transformer written on the ops interface;
//! - [`attention`]: the policies, one file each, and their per-session state;
//! - [`speculative`]: draft trees and drafters;
//! - [`ops`]: the operations interface both executors implement, with its
//!   shape checks; [`kv`]: the paged KV cache; [`sampling`]: the sampling rule;
//! - executors: [`kernels`] (WGSL kernels through wgpu, the product) and
//!   [`reference`](mod@reference) (CPU f32, the oracle and long-context harness);
//! - [`gpu`]: device, buffers, pipeline cache and recorder; [`shaders`]: the
//!   WGSL sources;
//! - [`convert`]: the default model's fetch and GGUF conversion; [`eval`]:
//!   agreement and passkey helpers.

// `!(x >= 0.0)` is how option checks reject NaN along with negatives.
#![allow(clippy::neg_cmp_op_on_partial_ord)]

pub mod attention;
pub mod convert;
pub mod error;
pub mod eval;
pub mod generate;
pub mod gpu;
pub mod kernels;
pub mod kv;
pub mod model;
pub mod ops;
mod progress;
pub mod quant;
pub mod reference;
pub mod sampling;
pub mod shaders;
pub mod speculative;

pub use attention::{
    AttentionPolicy, Positions, QuestConfig, SelectionStats, TidalConfig, TokenSelectConfig,
};
pub use error::{Error, Result};
pub use generate::{
    Backend, Engine, GenerateParams, Generation, Message, Options, Overflow, Stats, StopReason,
    Token,
};
pub use model::ModelConfig;
pub use sampling::SamplingParams;
pub use speculative::{Speculate, TreeSize};
