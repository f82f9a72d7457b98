//! `config.json` of Llama-family checkpoints (Llama, Mistral, Qwen2, Qwen3).

use crate::error::{Error, Result};
use crate::ops::{Llama3Scaling, RopeConfig};
use serde::Deserialize;
use std::path::Path;

/// Supported architectures.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Arch {
    /// `LlamaForCausalLM` (Llama 2/3, SmolLM2).
    Llama,
    /// `MistralForCausalLM`.
    Mistral,
    /// `Qwen2ForCausalLM` (biases on q, k, v).
    Qwen2,
    /// `Qwen3ForCausalLM` (per-head RMSNorm on q and k before RoPE, no biases).
    Qwen3,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum IdOrList {
    One(u32),
    Many(Vec<u32>),
}

#[derive(Deserialize)]
struct Raw {
    architectures: Option<Vec<String>>,
    hidden_size: usize,
    intermediate_size: usize,
    num_hidden_layers: usize,
    num_attention_heads: usize,
    num_key_value_heads: Option<usize>,
    head_dim: Option<usize>,
    vocab_size: usize,
    rms_norm_eps: Option<f64>,
    rope_theta: Option<f64>,
    rope_scaling: Option<serde_json::Value>,
    tie_word_embeddings: Option<bool>,
    max_position_embeddings: Option<usize>,
    bos_token_id: Option<IdOrList>,
    eos_token_id: Option<IdOrList>,
    attention_bias: Option<bool>,
}

/// The model hyper-parameters kvsieve uses, read from a Hugging Face
/// `config.json` ([`ModelConfig::from_json`]) or from GGUF metadata.
///
/// ```no_run
/// let dir = kvsieve::convert::default_model_dir()?;
/// let text = std::fs::read_to_string(dir.join("config.json")).unwrap();
/// let cfg = kvsieve::ModelConfig::from_json(&text)?;
/// println!("{} layers, {} heads", cfg.layers, cfg.heads);
/// # Ok::<(), kvsieve::Error>(())
/// ```
#[derive(Clone, Debug, PartialEq)]
pub struct ModelConfig {
    /// Architecture.
    pub arch: Arch,
    /// Hidden size.
    pub hidden: usize,
    /// MLP inner size.
    pub intermediate: usize,
    /// Layers.
    pub layers: usize,
    /// Query heads.
    pub heads: usize,
    /// Key/value heads.
    pub kv_heads: usize,
    /// Head dimension.
    pub head_dim: usize,
    /// Vocabulary size.
    pub vocab: usize,
    /// RMSNorm epsilon.
    pub eps: f32,
    /// RoPE theta.
    pub rope_theta: f64,
    /// llama3 RoPE scaling.
    pub rope_scaling: Option<Llama3Scaling>,
    /// LM head shares the embedding.
    pub tied_embeddings: bool,
    /// Trained context.
    pub max_positions: usize,
    /// BOS id.
    pub bos: Option<u32>,
    /// EOS ids (generation stops on any).
    pub eos: Vec<u32>,
    /// Biases on q, k, v projections.
    pub qkv_bias: bool,
    /// RMSNorm of each head of q and k before RoPE (Qwen3).
    pub qk_norm: bool,
}

impl ModelConfig {
    /// Reads and validates `config.json`.
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        Self::from_json(&text).map_err(|e| e.in_file(path))
    }

    /// Parses and validates config JSON text.
    pub fn from_json(text: &str) -> Result<Self> {
        let raw: Raw = serde_json::from_str(text)
            .map_err(|e| Error::malformed(format!("malformed config: {e}")))?;
        let archs = raw.architectures.unwrap_or_default();
        let arch = match archs.first().map(String::as_str) {
            Some("LlamaForCausalLM") => Arch::Llama,
            Some("MistralForCausalLM") => Arch::Mistral,
            Some("Qwen2ForCausalLM") => Arch::Qwen2,
            Some("Qwen3ForCausalLM") => Arch::Qwen3,
            Some(other) => {
                return Err(Error::Unsupported(format!(
                    "architecture {other} is not supported (LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM)"
                )))
            }
            None => return Err(Error::malformed("config has no \"architectures\"")),
        };
        let heads = raw.num_attention_heads;
        let kv_heads = raw.num_key_value_heads.unwrap_or(heads);
        if heads == 0
            || raw.hidden_size == 0
            || raw.intermediate_size == 0
            || raw.num_hidden_layers == 0
            || raw.vocab_size == 0
        {
            return Err(Error::malformed("a size in config is zero"));
        }
        // Sizes past any released model are a hostile or broken file: refused
        // here, before anything is allocated from them.
        for (name, value, max) in [
            ("hidden_size", Some(raw.hidden_size), 1 << 16),
            ("intermediate_size", Some(raw.intermediate_size), 1 << 20),
            ("num_hidden_layers", Some(raw.num_hidden_layers), 1 << 10),
            ("num_attention_heads", Some(heads), 1 << 10),
            ("head_dim", raw.head_dim, 1 << 10),
            ("vocab_size", Some(raw.vocab_size), 1 << 22),
            (
                "max_position_embeddings",
                raw.max_position_embeddings,
                1 << 24,
            ),
        ] {
            if value.is_some_and(|v| v > max) {
                return Err(Error::malformed(format!(
                    "{name} {} is larger than any model kvsieve can run (at most {max})",
                    value.unwrap_or(0)
                )));
            }
        }
        let head_dim = raw.head_dim.unwrap_or(raw.hidden_size / heads);
        if head_dim == 0 {
            return Err(Error::malformed("head_dim is zero"));
        }
        if kv_heads == 0 || !heads.is_multiple_of(kv_heads) {
            return Err(Error::malformed(format!(
                "num_attention_heads {heads} is not a multiple of num_key_value_heads {kv_heads}"
            )));
        }
        let rope_scaling = match &raw.rope_scaling {
            None | Some(serde_json::Value::Null) => None,
            Some(v) => {
                let ty = v
                    .get("rope_type")
                    .or_else(|| v.get("type"))
                    .and_then(|t| t.as_str())
                    .unwrap_or("");
                if ty != "llama3" {
                    return Err(Error::Unsupported(format!(
                        "rope_scaling type {ty:?} (only llama3)"
                    )));
                }
                let f = |k: &str| {
                    v.get(k)
                        .and_then(|x| x.as_f64())
                        .ok_or_else(|| Error::malformed(format!("rope_scaling.{k} missing")))
                };
                Some(Llama3Scaling {
                    factor: f("factor")?,
                    low_freq_factor: f("low_freq_factor")?,
                    high_freq_factor: f("high_freq_factor")?,
                    original_max_position_embeddings: f("original_max_position_embeddings")?,
                })
            }
        };
        let ids = |v: Option<IdOrList>| match v {
            None => vec![],
            Some(IdOrList::One(i)) => vec![i],
            Some(IdOrList::Many(l)) => l,
        };
        Ok(Self {
            arch,
            hidden: raw.hidden_size,
            intermediate: raw.intermediate_size,
            layers: raw.num_hidden_layers,
            heads,
            kv_heads,
            head_dim,
            vocab: raw.vocab_size,
            eps: raw.rms_norm_eps.unwrap_or(1e-6) as f32,
            rope_theta: raw.rope_theta.unwrap_or(10000.0),
            rope_scaling,
            tied_embeddings: raw.tie_word_embeddings.unwrap_or(false),
            max_positions: raw.max_position_embeddings.unwrap_or(4096),
            bos: ids(raw.bos_token_id).first().copied(),
            eos: ids(raw.eos_token_id),
            qkv_bias: arch == Arch::Qwen2 || raw.attention_bias.unwrap_or(false),
            qk_norm: arch == Arch::Qwen3,
        })
    }

    /// The `architectures` name.
    pub fn arch_name(&self) -> &'static str {
        match self.arch {
            Arch::Llama => "LlamaForCausalLM",
            Arch::Mistral => "MistralForCausalLM",
            Arch::Qwen2 => "Qwen2ForCausalLM",
            Arch::Qwen3 => "Qwen3ForCausalLM",
        }
    }

    /// RoPE table configuration covering `positions` positions.
    pub fn rope(&self, positions: usize) -> RopeConfig {
        RopeConfig {
            head_dim: self.head_dim,
            theta: self.rope_theta,
            scaling: self.rope_scaling,
            max_positions: positions,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_llama3_scaling_and_eos_lists() {
        let c = ModelConfig::from_json(
            r#"{"architectures":["LlamaForCausalLM"],"hidden_size":64,"intermediate_size":128,
            "num_hidden_layers":2,"num_attention_heads":4,"num_key_value_heads":2,"vocab_size":100,
            "rope_scaling":{"rope_type":"llama3","factor":8.0,"low_freq_factor":1.0,"high_freq_factor":4.0,
            "original_max_position_embeddings":8192},"eos_token_id":[1,2],"bos_token_id":0}"#,
        )
        .unwrap();
        assert_eq!(c.eos, vec![1, 2]);
        assert_eq!(c.head_dim, 16);
        assert!(c.rope_scaling.is_some());
    }

    #[test]
    fn errors_name_the_problem() {
        let e = ModelConfig::from_json("{").unwrap_err().to_string();
        assert!(e.contains("malformed config"), "{e}");
        let e = ModelConfig::from_json(
            r#"{"architectures":["GPTNeoXForCausalLM"],"hidden_size":64,"intermediate_size":128,
            "num_hidden_layers":2,"num_attention_heads":4,"vocab_size":100}"#,
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("GPTNeoXForCausalLM"), "{e}");
        let e = ModelConfig::from_json(
            r#"{"architectures":["Qwen2ForCausalLM"],"hidden_size":64,"intermediate_size":128,
            "num_hidden_layers":2,"num_attention_heads":4,"num_key_value_heads":3,"vocab_size":100}"#,
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("num_key_value_heads 3"), "{e}");
    }
}
