//! Sizing a load before it starts: what the weights, the first KV cache and
//! the RoPE table will take, against what the adapter or the machine holds.

use super::engine::{Backend, Options};
use crate::error::{Error, Result};
use crate::model::{ModelConfig, TensorSource};

/// The longest context an engine takes (the largest `max_position_embeddings`
/// a config may claim, too).
pub(super) const MAX_CONTEXT: usize = 1 << 24;

/// What a load will take in the executor's memory, estimated from the
/// tensors' stored types before anything is allocated.
pub(super) struct Footprint {
    weights: u64,
    /// KV cache bytes per token.
    per_token: u64,
    /// RoPE table bytes for the largest context.
    rope: u64,
    page: usize,
}

impl Footprint {
    pub(super) fn of(src: &dyn TensorSource, cfg: &ModelConfig, opts: &Options) -> Self {
        // The GPU keeps floats and its KV cache in f16, the reference in f32;
        // quantized tensors stay in their blocks on both.
        let float: u64 = if opts.backend == Backend::Gpu { 2 } else { 4 };
        let weights = src
            .stored()
            .iter()
            .map(|&(dtype, n)| match opts.quantize {
                _ if dtype.is_quantized() => dtype.bytes_for(n).unwrap_or(n * float),
                Some(q) => q.bytes_for(n).unwrap_or(n * float),
                None => n * float,
            })
            .fold(0u64, u64::saturating_add);
        let rope = cfg.rope(MAX_CONTEXT).table_rows() as u64 * cfg.head_dim as u64 * 4;
        Self {
            weights,
            per_token: 2 * (cfg.layers * cfg.kv_heads * cfg.head_dim) as u64 * float,
            rope,
            page: opts.page_size.max(1),
        }
    }

    /// KV bytes of `tokens` tokens (whole pages).
    fn kv(&self, tokens: usize) -> u64 {
        (tokens.div_ceil(self.page) * self.page) as u64 * self.per_token
    }

    /// An error naming both sizes when the weights and a first KV cache of
    /// `tokens` tokens would not fit `available` bytes (where the adapter or
    /// system reports them); otherwise the tokens whose KV cache fits beside
    /// the weights (unbounded when the memory is not reported).
    pub(super) fn fits(&self, tokens: usize, available: Option<u64>, on: &str) -> Result<usize> {
        let fixed = self.weights.saturating_add(self.rope);
        let need = fixed.saturating_add(self.kv(tokens));
        match available {
            Some(have) if need > have => {
                let mib = |b: u64| b >> 20;
                Err(Error::OutOfMemory(format!(
                    "the model needs about {} MiB ({} MiB of weights, {} MiB of KV cache for its \
                     first {tokens} tokens, {} MiB of RoPE table) and {on} has {} MiB; a smaller \
                     or quantized model may fit",
                    mib(need),
                    mib(self.weights),
                    mib(self.kv(tokens)),
                    mib(self.rope),
                    mib(have)
                )))
            }
            Some(have) => Ok(((have - fixed) / self.per_token.max(1)) as usize),
            None => Ok(usize::MAX),
        }
    }
}

/// Physical memory of this machine, where the system reports it.
pub(super) fn host_memory() -> Option<u64> {
    let info = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = info.lines().find(|l| l.starts_with("MemTotal:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}
