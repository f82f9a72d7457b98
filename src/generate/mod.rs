//! Generation: tokenizer and chat template, sampling, sessions and the engine.

mod calibrate;
pub mod chat;
pub mod engine;
mod footprint;
mod generation;
mod runner;
pub mod sampler;
pub mod session;
mod state;
pub mod tokenizer;

pub use calibrate::TidalCalibration;
pub use chat::{Overflow, StopReason};
pub use engine::{Backend, Engine, GenerateParams, Options, Stats};
pub use generation::{Generation, Token};
pub use sampler::{Sampler, SamplingParams};
pub use session::Session;
pub use tokenizer::{Message, Tokenizer};
