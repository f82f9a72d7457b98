//! Models: `config.json`, safetensors loading, and the Llama-family forward.

pub mod config;
pub mod llama;
pub mod weights;

pub use config::{Arch, ModelConfig};
pub use llama::{Llama, Workspace};
pub use weights::Weights;
