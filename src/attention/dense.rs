//! `Dense`: the reference policy every sparse policy is measured against.

use super::PageTable;
use crate::error::Result;
use crate::ops::Ops;

/// Causal dense attention of `q` (rows = queries starting at logical position
/// `q_start`) over the first `kv_len` cached tokens: split-KV flash decoding for a
/// single query, flash attention for a chunk.
#[allow(clippy::too_many_arguments)]
pub fn dense_attention<E: Ops>(
    ops: &mut E,
    q: &E::Tensor,
    kv: &E::Kv,
    layer: usize,
    table: &PageTable,
    q_start: usize,
    kv_len: usize,
    rope: &E::Rope,
    out: &mut E::Tensor,
) -> Result<()> {
    if E::rows(q) == 1 && q_start + 1 == kv_len {
        ops.attention_decode(q, kv, layer, table, kv_len, rope, out)
    } else {
        ops.attention_prefill(q, kv, layer, table, q_start, kv_len, rope, out)
    }
}
