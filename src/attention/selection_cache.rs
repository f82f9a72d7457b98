//! The Selection Cache (TokenSelect, docs/ALGORITHMS.md section 1): a layer
//! reuses its previous selection while the cosine of the new query fingerprint
//! with the cached one stays at or above the threshold. The decision is made on
//! the device; on a hit the gated selection ops run zero workgroups.

use crate::error::Result;

use crate::ops::{KvView, Ops, SelectPlan};

/// Per-layer cached fingerprints and the device-side gate.
pub struct SelectionCache<E: Ops> {
    /// Per layer: the fingerprint of the cached selection `[1, q_dim + 1]`
    /// (the last word marks it valid).
    cached: Vec<E::Tensor>,
    /// Zeros `[1, q_dim + 1]`: copied over `cached` to invalidate it.
    empty: E::Tensor,
    /// The gate the selection ops read, with its hit and miss counters.
    pub gate: E::Gate,
}

impl<E: Ops> SelectionCache<E> {
    /// An empty cache for `layers` layers of `q_dim`-wide fingerprints.
    pub fn new(ops: &mut E, layers: usize, q_dim: usize) -> Result<Self> {
        let cached = (0..layers)
            .map(|_| ops.tensor(1, q_dim + 1))
            .collect::<Result<_>>()?;
        Ok(Self {
            cached,
            empty: ops.tensor(1, q_dim + 1)?,
            gate: ops.ts_gate()?,
        })
    }

    /// Forgets every layer's selection (new tokens make its decisions stale).
    pub fn invalidate(&mut self, ops: &mut E) -> Result<()> {
        for cached in self.cached.iter_mut() {
            ops.copy_rows(&self.empty, 0, cached, 0, 1)?;
        }
        Ok(())
    }

    /// Decides on the device whether `plan`'s selection runs for fingerprint
    /// `fp`, updating the layer's cached fingerprint on a miss.
    pub fn check(
        &mut self,
        ops: &mut E,
        fp: &E::Tensor,
        threshold: f32,
        plan: &SelectPlan,
        cache: &KvView<'_, E>,
    ) -> Result<()> {
        let cached = &mut self.cached[plan.layer];
        ops.ts_cache_check(fp, cached, threshold, plan, cache, &mut self.gate)
    }

    /// Hits and misses counted on the device so far.
    pub fn counts(&self, ops: &mut E) -> Result<(u64, u64)> {
        ops.ts_gate_counts(&self.gate)
    }
}
