//! Command-line options shared by the generate and chat examples.
#![allow(dead_code)]

use clap::Args;
use kvsieve::attention::{AttentionPolicy, QuestConfig, TidalConfig, TokenSelectConfig};
use kvsieve::generate::{Backend, Engine, GenerateParams, Options, SamplingParams};
use std::path::PathBuf;

/// Model, executor and sampling options.
#[derive(Args, Debug, Clone)]
pub struct ModelArgs {
    /// Hugging Face model directory (default: SmolLM2-135M-Instruct, fetched on first use).
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// gpu or reference.
    #[arg(long, default_value = "gpu")]
    pub backend: String,
    /// Attention policy: dense, tokenselect, quest or tidal.
    #[arg(long, default_value = "dense")]
    pub policy: String,
    /// Quest and Tidal: tokens attended per decode step (Quest: the last block
    /// plus the best blocks of each KV head; Tidal: the chosen tokens per KV
    /// head plus the current one).
    #[arg(long, default_value_t = 2048)]
    pub budget: usize,
    /// Tidal: the layer that selects (earlier layers are dense).
    #[arg(long, default_value_t = 2)]
    pub selection_layer: usize,
    /// Tidal: the layer that selects again, or "auto": measured on the model
    /// once (a built-in needle text) and cached.
    #[arg(long, default_value = "auto")]
    pub reselection_layer: String,
    /// Quest, and TokenSelect with --prefilter-blocks: tokens per block.
    #[arg(long, default_value_t = 16)]
    pub block: usize,
    /// TokenSelect: hierarchical selection; keep this many blocks (by their
    /// key-bound soft vote) and vote only over their tokens (0 = exact).
    #[arg(long, default_value_t = 0)]
    pub prefilter_blocks: usize,
    /// TokenSelect with --prefilter-blocks: how much of a block's key spread
    /// its score counts (0..=1; 1 = Quest's upper bound).
    #[arg(long, default_value_t = 0.25)]
    pub prefilter_spread: f32,
    /// Quest: leading layers that stay dense.
    #[arg(long, default_value_t = 2)]
    pub dense_layers: usize,
    /// Quest: block-sparse prefill, one block choice per this many prompt
    /// tokens (scored with their mean query); 0 keeps prefill dense.
    #[arg(long, default_value_t = 0)]
    pub quest_prefill_subchunk: usize,
    /// TokenSelect: tokens selected per step.
    #[arg(long, default_value_t = 2048)]
    pub k: usize,
    /// TokenSelect: attention sinks kept.
    #[arg(long, default_value_t = 128)]
    pub n_init: usize,
    /// TokenSelect: local window kept.
    #[arg(long, default_value_t = 512)]
    pub n_local: usize,
    /// TokenSelect: Selection Cache cosine threshold.
    #[arg(long, default_value_t = 0.9)]
    pub cache_threshold: f32,
    /// TokenSelect: RoPE positions of the attended keys: auto (original within
    /// the model's trained context, compact past it), compact or original.
    #[arg(long, default_value = "auto")]
    pub positions: String,
    /// TokenSelect: prefill queries sharing one selection (their mean is the fingerprint).
    #[arg(long, default_value_t = 512)]
    pub subchunk: usize,
    /// TokenSelect: a prompt's last this many tokens select one by one.
    #[arg(long, default_value_t = 16)]
    pub prompt_tail: usize,
    /// TokenSelect: KV head each query head scores against: grouped (h / group)
    /// or modulo (h mod kv_heads, the paper's code).
    #[arg(long, default_value = "grouped")]
    pub gqa_map: String,
    /// Speculative decoding: off, lookup (prompt lookup chains), recycling (Token
    /// Recycling trees) or both (greedy or sampled; lossless).
    #[arg(long, default_value = "off")]
    pub speculate: String,
    /// Draft tree nodes, root included (1..=128), or auto: chosen from this
    /// adapter's measured verify cost, off when no size pays.
    #[arg(long, default_value = "auto")]
    pub tree: String,
    /// A chat past the context: drop-oldest (turns after the system prompt) or error.
    #[arg(long, default_value = "drop-oldest")]
    pub overflow: String,
    /// Largest context in tokens; the KV cache grows to it as needed (0 = as far
    /// as memory allows; dense chats then keep to the model's trained context).
    #[arg(long, default_value_t = 0)]
    pub max_context: usize,
    /// Tokens to generate at most.
    #[arg(long, default_value_t = 256)]
    pub max_tokens: usize,
    /// 0 = greedy.
    #[arg(long, default_value_t = 0.0)]
    pub temperature: f32,
    /// Candidates considered when sampling (1..=64).
    #[arg(long, default_value_t = 40)]
    pub top_k: usize,
    /// Nucleus threshold.
    #[arg(long, default_value_t = 1.0)]
    pub top_p: f32,
    /// Repetition penalty (1 = off).
    #[arg(long, default_value_t = 1.0)]
    pub repetition_penalty: f32,
    /// Sampler seed.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Quantize float weight matrices at load: off, q8_0, q4_0 or q4_1.
    #[arg(long, default_value = "off")]
    pub quantize: String,
    /// Where state learned at run time is kept per model (Tidal's layer, the
    /// Token Recycling matrix, verify costs); default: state/ in the cache.
    #[arg(long)]
    pub state_dir: Option<PathBuf>,
    /// Decode steps kept in flight (1: read each token before
    /// recording the next step; 0: 2 on a GPU, 1 on a CPU adapter).
    #[arg(long, default_value_t = 0)]
    pub decode_ahead: usize,
}

/// `--quantize`: off, or a weight type.
pub fn quantize_arg(s: &str) -> kvsieve::Result<Option<kvsieve::quant::DType>> {
    if s == "off" {
        return Ok(None);
    }
    kvsieve::quant::DType::parse(s).map(Some).ok_or_else(|| {
        kvsieve::Error::InvalidOption(format!("--quantize {s:?}: off, q8_0, q4_0 or q4_1"))
    })
}

impl ModelArgs {
    /// Loads the engine these options describe.
    pub fn engine(&self) -> kvsieve::Result<Engine> {
        let policy = match self.policy.as_str() {
            "dense" => AttentionPolicy::Dense,
            "tokenselect" => AttentionPolicy::TokenSelect(TokenSelectConfig {
                k: self.k,
                n_init: self.n_init,
                n_local: self.n_local,
                cache_threshold: self.cache_threshold,
                positions: self.positions.parse()?,
                subchunk: self.subchunk,
                prompt_tail: self.prompt_tail,
                gqa_map: self.gqa_map.parse()?,
                prefilter_blocks: self.prefilter_blocks,
                prefilter_block: self.block,
                prefilter_spread: self.prefilter_spread,
            }),
            "quest" => AttentionPolicy::Quest(QuestConfig {
                block: self.block,
                budget: self.budget,
                dense_layers: self.dense_layers,
                prefill_subchunk: self.quest_prefill_subchunk,
            }),
            "tidal" => AttentionPolicy::Tidal(TidalConfig {
                selection_layer: self.selection_layer,
                // "auto" loads with the next layer and calibrates after loading.
                reselection_layer: match self.reselection_layer.as_str() {
                    "auto" => self.selection_layer + 1,
                    n => n.parse().map_err(|_| {
                        kvsieve::Error::InvalidOption(format!(
                            "--reselection-layer {n:?}: a layer number or auto"
                        ))
                    })?,
                },
                budget: self.budget,
            }),
            other => {
                return Err(kvsieve::Error::InvalidOption(format!(
                    "policy {other:?}: expected dense, tokenselect, quest or tidal"
                )))
            }
        };
        let opts = Options {
            policy,
            backend: self.backend.parse::<Backend>()?,
            max_context: self.max_context,
            progress: true,
            quantize: quantize_arg(&self.quantize)?,
            state_dir: self.state_dir.clone(),
            decode_ahead: self.decode_ahead,
            ..Options::default()
        };
        let mut engine = match &self.model {
            Some(dir) => Engine::load(dir, opts)?,
            None => Engine::load_default(opts)?,
        };
        if let AttentionPolicy::Tidal(c) = policy {
            if self.reselection_layer == "auto" {
                let cal = engine.calibrate_tidal(c.selection_layer, c.budget)?;
                eprintln!(
                    "Tidal: re-selection layer {} ({}; --reselection-layer N overrides)",
                    cal.config.reselection_layer,
                    if cal.cached {
                        "calibrated earlier, cached"
                    } else {
                        "calibrated"
                    }
                );
                engine.set_policy(AttentionPolicy::Tidal(cal.config))?;
            }
        }
        Ok(engine)
    }

    /// Generation parameters (validated).
    pub fn params(&self) -> kvsieve::Result<GenerateParams> {
        let sampling = SamplingParams {
            temperature: self.temperature,
            top_k: self.top_k,
            top_p: self.top_p,
            repetition_penalty: self.repetition_penalty,
            seed: self.seed,
        };
        sampling.validate()?;
        Ok(GenerateParams {
            sampling,
            max_tokens: self.max_tokens,
            stop_at_eos: true,
            speculate: self.speculate.parse()?,
            tree_size: self.tree.parse()?,
            overflow: self.overflow.parse()?,
        })
    }
}

/// Keeps stderr for diagnostics that matter: Mesa's implicit Vulkan
/// device-select layer connects to a Wayland display to rank GPUs (kvsieve
/// ranks adapters itself) and prints "XDG_RUNTIME_DIR is invalid" twice where
/// there is none. Call first thing in `main`, before any thread starts; a
/// user's own `NODEVICE_SELECT` is left alone.
pub fn quiet_backend_probes() {
    if std::env::var_os("NODEVICE_SELECT").is_none() {
        std::env::set_var("NODEVICE_SELECT", "1");
    }
}

/// Prints an error and exits with status 1.
pub fn fail(e: impl std::fmt::Display) -> ! {
    eprintln!("error: {e}");
    std::process::exit(1)
}
