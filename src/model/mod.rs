//! Models: `config.json`, tensor sources (safetensors, GGUF), and the Llama-family forward.

pub mod config;
pub mod llama;
pub mod source;
pub mod weights;

pub use config::{Arch, ModelConfig};
pub use llama::{Llama, Workspace};
pub use source::{GgufModel, TensorData, TensorSource};
pub use weights::Weights;
