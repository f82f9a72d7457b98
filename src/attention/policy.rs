//! Attention policies and the per-session state they keep. The model calls
//! [`Attention::layer`] with each layer's raw (unrotated) queries; the policy
//! rotates them and runs dense or sparse attention.

use super::{dense_attention, PageTable};
use crate::error::{Error, Result};
use crate::model::ModelConfig;
use crate::ops::{KeyList, Ops, SelectPlan};

/// RoPE positions of selected keys.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Positions {
    /// A key's position is its rank in the attended list (extrapolates past the
    /// trained context).
    #[default]
    Compact,
    /// True positions.
    Original,
}

impl std::str::FromStr for Positions {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "compact" => Ok(Self::Compact),
            "original" => Ok(Self::Original),
            o => Err(Error::InvalidOption(format!(
                "positions {o:?}: expected compact or original"
            ))),
        }
    }
}

/// TokenSelect parameters (ALGORITHMS.md section 1); defaults are the paper's.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct TokenSelectConfig {
    /// Tokens selected per step.
    pub k: usize,
    /// Attention sinks kept at the start.
    pub n_init: usize,
    /// Local window kept at the end.
    pub n_local: usize,
    /// Selection Cache: reuse the last selection while cos(q, cached q) >= this
    /// (values above 1 disable the cache).
    pub cache_threshold: f32,
    /// Position scheme.
    pub positions: Positions,
}

impl Default for TokenSelectConfig {
    fn default() -> Self {
        Self {
            k: 2048,
            n_init: 128,
            n_local: 512,
            cache_threshold: 0.9,
            positions: Positions::Compact,
        }
    }
}

/// Which attention runs.
#[derive(Clone, Copy, Debug, PartialEq, Default)]
pub enum AttentionPolicy {
    /// Full causal attention (the reference).
    #[default]
    Dense,
    /// Per-head token-level selection with soft voting (decode steps; prefill is dense).
    TokenSelect(TokenSelectConfig),
}

impl AttentionPolicy {
    /// Checks the values, naming the bad one.
    pub fn validate(&self) -> Result<()> {
        if let AttentionPolicy::TokenSelect(c) = self {
            if c.k == 0 || c.k > 65536 {
                return Err(Error::InvalidOption(format!(
                    "TokenSelect k {} must be in 1..=65536",
                    c.k
                )));
            }
            if c.n_local == 0 {
                return Err(Error::InvalidOption(
                    "TokenSelect n_local must be >= 1 (it holds the current token)".into(),
                ));
            }
            if !(c.cache_threshold >= -1.0) {
                return Err(Error::InvalidOption(format!(
                    "cache threshold {} must be >= -1",
                    c.cache_threshold
                )));
            }
        }
        Ok(())
    }
}

/// Selection counters.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct SelectionStats {
    /// Layer-steps that ran a selection.
    pub selections: u64,
    /// Layer-steps that reused the cached selection.
    pub cache_hits: u64,
}

impl SelectionStats {
    /// Share of sparse layer-steps served by the Selection Cache.
    pub fn hit_rate(&self) -> Option<f64> {
        let n = self.selections + self.cache_hits;
        (n > 0).then(|| self.cache_hits as f64 / n as f64)
    }
}

struct TsBuffers<E: Ops> {
    cap: usize,
    q_fp: E::Tensor,
    scores: E::Tensor,
    votes: E::Tensor,
    selected: Vec<E::Ids>,
    /// Per layer: the fingerprint of the cached selection `[1, len + 1]`.
    cached: Vec<E::Tensor>,
    gate: E::Gate,
}

/// A policy and its state for one session.
pub struct Attention<E: Ops> {
    /// The policy.
    pub policy: AttentionPolicy,
    ts: Option<TsBuffers<E>>,
    step_pos: Option<(E::Ids, E::Ids)>,
    /// Selections run without the Selection Cache (threshold above 1).
    uncached_selections: u64,
}

impl<E: Ops> Attention<E> {
    /// State for `policy`.
    pub fn new(policy: AttentionPolicy) -> Result<Self> {
        policy.validate()?;
        Ok(Self {
            policy,
            ts: None,
            step_pos: None,
            uncached_selections: 0,
        })
    }

    fn sparse(&self, n: usize, seq_len: usize) -> Option<TokenSelectConfig> {
        match self.policy {
            AttentionPolicy::TokenSelect(c) if n == 1 && c.n_init + c.k + c.n_local < seq_len => {
                Some(c)
            }
            _ => None,
        }
    }

    /// Prepares a step of `n` tokens ending at `seq_len` (called once per forward,
    /// before the layers).
    pub fn begin_step(
        &mut self,
        ops: &mut E,
        cfg: &ModelConfig,
        n: usize,
        seq_len: usize,
    ) -> Result<()> {
        self.step_pos = None;
        let Some(c) = self.sparse(n, seq_len) else {
            return Ok(());
        };
        let cand = seq_len - c.n_init - c.n_local;
        let need = match &self.ts {
            Some(b) => b.cap < cand,
            None => true,
        };
        if need && self.ts.is_some() {
            let Some(old) = self.ts.take() else {
                return Ok(());
            };
            // Growing keeps the selections, fingerprints and counters.
            let cap = cand.next_power_of_two();
            self.ts = Some(TsBuffers {
                cap,
                scores: ops.tensor(cfg.heads, cap)?,
                votes: ops.tensor(1, cap)?,
                ..old
            });
        } else if need {
            // Grow geometrically so decode does not reallocate every step.
            let cap = cand.next_power_of_two().max(1024);
            let qd = cfg.heads * cfg.head_dim;
            let mut selected = Vec::with_capacity(cfg.layers);
            for _ in 0..cfg.layers {
                selected.push(ops.ids(&vec![0u32; c.k])?);
            }
            let mut cached = Vec::with_capacity(cfg.layers);
            for _ in 0..cfg.layers {
                cached.push(ops.tensor(1, qd + 1)?);
            }
            self.ts = Some(TsBuffers {
                cap,
                q_fp: ops.tensor(1, qd)?,
                scores: ops.tensor(cfg.heads, cap)?,
                votes: ops.tensor(1, cap)?,
                selected,
                cached,
                gate: ops.ts_gate()?,
            });
        }
        let list_len = c.n_init + c.k + c.n_local;
        let q_pos = match c.positions {
            Positions::Compact => list_len - 1,
            Positions::Original => seq_len - 1,
        };
        // The fingerprint is rotated as if it sat n_local tokens back.
        self.step_pos = Some((ops.ids(&[c.n_local as u32])?, ops.ids(&[q_pos as u32])?));
        Ok(())
    }

    /// Attention of layer `layer` for raw queries `q` (rotated here) of the tokens at
    /// `start..start + n`, whose keys are already in the cache.
    #[allow(clippy::too_many_arguments)]
    pub fn layer(
        &mut self,
        ops: &mut E,
        cfg: &ModelConfig,
        layer: usize,
        q: &mut E::Tensor,
        positions: &E::Ids,
        kv: &E::Kv,
        table: &PageTable,
        start: usize,
        n: usize,
        rope: &E::Rope,
        out: &mut E::Tensor,
    ) -> Result<()> {
        let seq_len = start + n;
        let (Some(c), Some((fp_pos, q_pos)), Some(ts)) =
            (self.sparse(n, seq_len), &self.step_pos, &mut self.ts)
        else {
            ops.rope(q, cfg.heads, positions, rope)?;
            return dense_attention(ops, q, kv, layer, table, start, seq_len, rope, out);
        };
        // Selection: fingerprint = q rotated at n_local; scores against unrotated keys.
        let cand = seq_len - c.n_init - c.n_local;
        ops.copy_rows(q, 0, &mut ts.q_fp, 0, 1)?;
        ops.rope(&mut ts.q_fp, cfg.heads, fp_pos, rope)?;
        // Selection Cache: decided on the device; on a hit the selection ops below
        // run zero workgroups and the layer keeps its previous selection.
        let gate = if c.cache_threshold <= 1.0 {
            let plan = SelectPlan {
                layer,
                q_heads: cfg.heads,
                begin: c.n_init,
                n: cand,
                k: c.k,
            };
            ops.ts_cache_check(
                &ts.q_fp,
                &mut ts.cached[layer],
                c.cache_threshold,
                &plan,
                kv,
                table,
                &mut ts.gate,
            )?;
            Some(&ts.gate)
        } else {
            self.uncached_selections += 1;
            None
        };
        ops.ts_score(
            &ts.q_fp,
            kv,
            layer,
            table,
            c.n_init,
            cand,
            &mut ts.scores,
            gate,
        )?;
        ops.ts_vote(&ts.scores, cfg.heads, cand, &mut ts.votes, gate)?;
        ops.ts_top_k(
            &ts.votes,
            cand,
            c.k,
            c.n_init,
            &mut ts.selected[layer],
            gate,
        )?;
        ops.rope(q, cfg.heads, q_pos, rope)?;
        let list = KeyList {
            n_init: c.n_init,
            selected: &ts.selected[layer],
            n_selected: c.k,
            tail_start: seq_len - c.n_local,
            tail_len: c.n_local,
            compact: c.positions == Positions::Compact,
        };
        ops.attention_decode_list(q, kv, layer, table, seq_len, &list, rope, out)
    }

    /// Selections run and Selection Cache hits so far (reads the device counters).
    pub fn stats(&mut self, ops: &mut E) -> Result<SelectionStats> {
        let (hits, misses) = match &self.ts {
            Some(ts) => ops.ts_gate_counts(&ts.gate)?,
            None => (0, 0),
        };
        Ok(SelectionStats {
            selections: misses + self.uncached_selections,
            cache_hits: hits,
        })
    }

    /// The selection of `layer` from the last sparse step (for tests and tools).
    pub fn selected(&mut self, ops: &mut E, layer: usize) -> Result<Option<Vec<u32>>> {
        match &self.ts {
            Some(ts) if layer < ts.selected.len() => {
                Ok(Some(ops.download_ids(&ts.selected[layer])?))
            }
            _ => Ok(None),
        }
    }
}
