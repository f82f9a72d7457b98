//! `Dense`: the reference policy every sparse policy is measured against, and
//! the dense paths the sparse policies fall back to.

use super::{LayerInput, PolicyState, Step};
use crate::error::Result;
use crate::ops::{KvView, Ops};

/// Causal dense attention of `q` (rows = queries starting at logical position
/// `q_start`) over the first `kv_len` cached tokens: split-KV flash decoding for a
/// single query, flash attention for a chunk.
pub fn dense_attention<E: Ops>(
    ops: &mut E,
    q: &E::Tensor,
    cache: &KvView<'_, E>,
    q_start: usize,
    kv_len: usize,
    out: &mut E::Tensor,
) -> Result<()> {
    if E::rows(q) == 1 && q_start + 1 == kv_len {
        ops.attention_decode(q, cache, kv_len, out)
    } else {
        ops.attention_prefill(q, cache, q_start, kv_len, out)
    }
}

/// Rotates `q` at its true positions and attends densely to the whole cache.
pub(crate) fn rotate_and_attend<E: Ops>(
    ops: &mut E,
    a: &LayerInput<'_, E>,
    q: &mut E::Tensor,
    out: &mut E::Tensor,
) -> Result<()> {
    rotate(ops, a, q)?;
    attend(ops, a, q, out)
}

/// Rotates `q` at its true positions, unless the model did already.
pub(crate) fn rotate<E: Ops>(ops: &mut E, a: &LayerInput<'_, E>, q: &mut E::Tensor) -> Result<()> {
    if a.q_rotated {
        return Ok(());
    }
    ops.rope(q, a.q_heads, a.positions, a.cache.rope)
}

/// Dense attention of rotated queries over the whole cache.
pub(crate) fn attend<E: Ops>(
    ops: &mut E,
    a: &LayerInput<'_, E>,
    q: &E::Tensor,
    out: &mut E::Tensor,
) -> Result<()> {
    dense_attention(ops, q, &a.cache, a.start, a.seq_len(), out)
}

/// Dense tree attention of a draft tree's nodes (`mask` uploaded), rotated at
/// their true positions.
pub(crate) fn tree<E: Ops>(
    ops: &mut E,
    a: &LayerInput<'_, E>,
    mask: &E::Ids,
    q: &mut E::Tensor,
    out: &mut E::Tensor,
) -> Result<()> {
    rotate(ops, a, q)?;
    ops.attention_tree(q, &a.cache, a.start, mask, None, out)
}

/// Dense attention for every step; draft trees get tree attention.
pub struct Dense<E: Ops> {
    /// The current draft tree's mask, when the step verifies one.
    tree: Option<E::Ids>,
}

impl<E: Ops> Dense<E> {
    /// Dense state.
    pub fn new() -> Self {
        Self { tree: None }
    }
}

impl<E: Ops> Default for Dense<E> {
    fn default() -> Self {
        Self::new()
    }
}

impl<E: Ops> PolicyState<E> for Dense<E> {
    fn begin(&mut self, ops: &mut E, step: Step<'_>) -> Result<()> {
        self.tree = match step {
            Step::Tree { mask, .. } => Some(ops.ids(mask)?),
            Step::Tokens { .. } => None,
        };
        Ok(())
    }

    fn queries_at_true_positions(&self, _layer: usize) -> bool {
        true
    }

    fn layer(
        &mut self,
        ops: &mut E,
        a: &LayerInput<'_, E>,
        q: &mut E::Tensor,
        out: &mut E::Tensor,
    ) -> Result<()> {
        match &self.tree {
            Some(mask) => tree(ops, a, mask, q, out),
            None => rotate_and_attend(ops, a, q, out),
        }
    }
}
