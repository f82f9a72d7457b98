//! Hierarchical TokenSelect (docs/ALGORITHMS.md section 1): before the token
//! stage, the candidates' blocks are scored by their (unrotated) key bounds,
//! soft-voted over the query heads, and only the tokens of the best blocks take
//! part in the token stage.

use super::{LayerInput, TokenSelectConfig};
use crate::error::Result;
use crate::kv::KvLayout;
use crate::ops::{Ops, Prefilter, PrefilterPlan};

/// Unrotated key bounds that follow the cache, and the chosen blocks.
pub struct HierarchicalPrefilter<E: Ops> {
    bounds: E::Bounds,
    /// `[top]` block ids.
    blocks: E::Ids,
    /// Leading tokens whose blocks' bounds are up to date.
    valid: usize,
    /// First token whose block this step recomputes.
    from: usize,
}

impl<E: Ops> HierarchicalPrefilter<E> {
    /// Bounds over caches of `layout` in blocks of `c.prefilter_block` tokens.
    pub fn new(ops: &mut E, c: &TokenSelectConfig, layout: &KvLayout) -> Result<Self> {
        Ok(Self {
            bounds: ops.block_bounds(layout, c.prefilter_block, false)?,
            blocks: ops.ids(&vec![0u32; c.prefilter_blocks])?,
            valid: 0,
            from: 0,
        })
    }

    /// The KV cache grew to `num_pages` pages.
    pub fn grow(&mut self, ops: &mut E, num_pages: usize) -> Result<()> {
        ops.bounds_grow(&mut self.bounds, num_pages)
    }

    /// A step of tokens `start..seq_len`: their blocks' bounds recompute.
    pub fn begin_tokens(&mut self, start: usize, seq_len: usize) {
        self.from = self.valid.min(start);
        self.valid = seq_len;
    }

    /// A draft tree from `start`: its slots are not the committed tokens, so
    /// their blocks recompute at the next step.
    pub fn begin_tree(&mut self, start: usize) {
        self.valid = self.valid.min(start);
        self.from = self.valid;
    }

    /// Brings the layer's bounds up to the step's last token (every layer,
    /// selecting or not).
    pub fn update_bounds(&mut self, ops: &mut E, a: &LayerInput<'_, E>) -> Result<()> {
        let range = self.from..a.seq_len();
        ops.kv_bounds(&a.cache, &mut self.bounds, range)
    }

    /// The block stage over `cand` candidates from `n_init`, when there are
    /// more blocks than it keeps: block scores of the fingerprint `fp`, their
    /// soft vote and the top blocks (gated by the Selection Cache when `gate`).
    /// `scores` and `votes` are the token stage's scratch.
    #[allow(clippy::too_many_arguments)]
    pub fn select_blocks(
        &mut self,
        ops: &mut E,
        c: &TokenSelectConfig,
        a: &LayerInput<'_, E>,
        fp: &E::Tensor,
        cand: usize,
        scores: &mut E::Tensor,
        votes: &mut E::Tensor,
        gate: Option<&E::Gate>,
    ) -> Result<Option<Prefilter<'_, E::Ids>>> {
        let Some(plan) = plan(c, cand) else {
            return Ok(None);
        };
        let blocks = plan.first_block..plan.first_block + plan.n_blocks;
        let spread = c.prefilter_spread;
        ops.block_scores(
            fp,
            &self.bounds,
            a.cache.layer,
            a.cache.table,
            blocks,
            spread,
            scores,
            gate,
        )?;
        ops.ts_vote(scores, a.q_heads, plan.n_blocks, votes, gate)?;
        let (n, top, first) = (plan.n_blocks, plan.top, plan.first_block);
        ops.ts_top_k(votes, n, top, first, &mut self.blocks, gate, None)?;
        Ok(Some(Prefilter {
            blocks: &self.blocks,
            count: plan.top,
            block: plan.block,
        }))
    }
}

/// The block stage runs only where it keeps at most one candidate block in
/// `PRUNE`: below that its scores and vote cost about what they save, and
/// the blocks it drops cost answers (docs/RESULTS.md: at 8K, 160 of 500
/// blocks made a layer-step 1.09x faster and agreed with dense 23 points less
/// often than exact selection).
pub const PRUNE: usize = 2;

/// The block stage of a hierarchical selection over `cand` candidates from
/// `n_init`, when it has more than [`PRUNE`] times the blocks it keeps
/// (otherwise the selection is exact).
pub fn plan(c: &TokenSelectConfig, cand: usize) -> Option<PrefilterPlan> {
    let block = c.prefilter_block;
    let first_block = c.n_init / block;
    let n_blocks = (c.n_init + cand).div_ceil(block) - first_block;
    let prunes = n_blocks > PRUNE * c.prefilter_blocks;
    (c.prefilter_blocks > 0 && prunes).then_some(PrefilterPlan {
        block,
        first_block,
        n_blocks,
        top: c.prefilter_blocks,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_block_stage_runs_where_it_keeps_at_most_half_the_blocks() {
        // 256 blocks of 16 for k 2048, sinks 128 and window 512.
        let c = TokenSelectConfig {
            prefilter_blocks: 256,
            ..Default::default()
        };
        let cand = |len: usize| len - c.n_init - c.n_local;
        // 4K and 8K contexts: 216 and 472 candidate blocks, exact selection.
        assert_eq!(plan(&c, cand(4096)), None);
        assert_eq!(plan(&c, cand(8192)), None);
        // Past 512 blocks it prunes: at 16K to 256 of 984.
        let p = plan(&c, cand(16384)).unwrap();
        assert_eq!((p.n_blocks, p.top, p.first_block), (984, 256, 8));
        assert_eq!(plan(&c, 2 * 256 * 16), None);
        assert!(plan(&c, 2 * 256 * 16 + 1).is_some());
        // Off: always exact.
        let exact = TokenSelectConfig::default();
        assert_eq!(plan(&exact, cand(1 << 20)), None);
    }
}
