//! Selection ops: the scores, soft votes and top-k of the sparse policies
//! (TokenSelect, Quest, Tidal, the hierarchical prefilter), block bounds, and
//! the Selection Cache gate that lets the device skip them.

use super::{check, Executor, GqaMap, KvView, Prefilter, SelectPlan};
use crate::error::{shape_err, Result};
use crate::kv::{KvLayout, PageTable};
use std::ops::Range;

/// Selection ops. Callers use the checked methods; executors implement the
/// `run_*` methods, which may assume the checks passed. A gated op does
/// nothing when its gate says the Selection Cache hit.
pub trait SelectionOps: Executor {
    /// A Selection Cache gate (counters at zero).
    fn ts_gate(&mut self) -> Result<Self::Gate> {
        self.run_ts_gate()
    }
    /// Selection Cache check: compares `fp` `[1, len]` with `cached` `[1, len + 1]`
    /// (last value: 1 when valid). Hit (cosine >= `threshold`): the gated selection ops
    /// of this layer-step do nothing, the previous selection stays. Miss: `cached`
    /// takes `fp` and the gated ops run. `plan` is the selection they will run
    /// over `cache`.
    fn ts_cache_check(
        &mut self,
        fp: &Self::Tensor,
        cached: &mut Self::Tensor,
        threshold: f32,
        plan: &SelectPlan,
        cache: &KvView<'_, Self>,
        gate: &mut Self::Gate,
    ) -> Result<()> {
        let (f, c) = (Self::dims(fp), Self::dims(cached));
        let len = f.0 * f.1;
        if c.0 * c.1 != len + 1 {
            return shape_err(
                "ts_cache_check",
                format!("cache holds {} values for {len}", c.0 * c.1),
            );
        }
        self.run_ts_cache_check(fp, cached, threshold, plan, cache, gate)
    }
    /// (hits, misses) counted by the gate (reads back 8 bytes on the GPU).
    fn ts_gate_counts(&mut self, gate: &Self::Gate) -> Result<(u64, u64)> {
        self.run_ts_gate_counts(gate)
    }
    /// TokenSelect scoring: `scores[h * n + j] = q_h . K[begin + j, g(h)]` (g from
    /// `gqa`) with the unrotated cached keys, unscaled (`q` `[1, q_heads * head_dim]` is rotated by the
    /// caller). `scores` needs at least `q_heads * n` elements. With `prefilter`
    /// the slots are its blocks' tokens (`q_heads * prefilter.slots()` scores),
    /// those outside `begin..begin + n` scoring [`super::NO_SCORE`].
    #[allow(clippy::too_many_arguments)]
    fn ts_score(
        &mut self,
        q: &Self::Tensor,
        cache: &KvView<'_, Self>,
        begin: usize,
        n: usize,
        gqa: GqaMap,
        scores: &mut Self::Tensor,
        gate: Option<&Self::Gate>,
        prefilter: Option<&Prefilter<'_, Self::Ids>>,
    ) -> Result<()> {
        let slots = prefilter.map_or(n, |pf| pf.slots());
        let s = Self::dims(scores);
        check::ts(
            cache.layout(),
            cache.layer,
            cache.table,
            Self::dims(q),
            begin,
            n,
            slots,
            s.0 * s.1,
        )?;
        check::prefilter(prefilter.map(|pf| (pf.count, pf.block, Self::ids_len(pf.blocks))))?;
        self.run_ts_score(q, cache, begin, n, gqa, scores, gate, prefilter)
    }
    /// Soft vote: `votes[j] = sum_h softmax_j(scores[h, :n])`, at least 1e-30,
    /// and 0 for a slot scoring [`super::NO_SCORE`].
    fn ts_vote(
        &mut self,
        scores: &Self::Tensor,
        q_heads: usize,
        n: usize,
        votes: &mut Self::Tensor,
        gate: Option<&Self::Gate>,
    ) -> Result<()> {
        let (s, v) = (Self::dims(scores), Self::dims(votes));
        check::ts_vote(s.0 * s.1, v.0 * v.1, q_heads, n)?;
        self.run_ts_vote(scores, q_heads, n, votes, gate)
    }
    /// The `k` largest of `votes[..n]` (ties to the lower index) as `begin + j`,
    /// or with `prefilter` as slot j's token, ascending, into `out[..k]`.
    #[allow(clippy::too_many_arguments)]
    fn ts_top_k(
        &mut self,
        votes: &Self::Tensor,
        n: usize,
        k: usize,
        begin: usize,
        out: &mut Self::Ids,
        gate: Option<&Self::Gate>,
        prefilter: Option<&Prefilter<'_, Self::Ids>>,
    ) -> Result<()> {
        let v = Self::dims(votes);
        let pf = prefilter.map(|pf| (pf.count, pf.block, Self::ids_len(pf.blocks)));
        check::ts_top_k(v.0 * v.1, n, k, Self::ids_len(out), pf)?;
        self.run_ts_top_k(votes, n, k, begin, out, gate, prefilter)
    }
    /// Block-bound storage for caches of `layout`, blocks of `block` tokens (a
    /// divisor of the page size, at least 4), of keys rotated at their positions
    /// when `rotated` (Quest) or unrotated (hierarchical TokenSelect).
    fn block_bounds(
        &mut self,
        layout: &KvLayout,
        block: usize,
        rotated: bool,
    ) -> Result<Self::Bounds> {
        layout.validate()?;
        check::bounds_block(layout, block)?;
        self.run_block_bounds(layout, block, rotated)
    }
    /// Grows `bounds` to describe a cache grown to `num_pages` pages
    /// ([`crate::ops::KvOps::kv_grow`]), keeping what they hold.
    fn bounds_grow(&mut self, bounds: &mut Self::Bounds, num_pages: usize) -> Result<()> {
        check::grow("bounds_grow", Self::bounds_layout(bounds).0, num_pages)?;
        if num_pages == Self::bounds_layout(bounds).0.num_pages {
            return Ok(());
        }
        self.run_bounds_grow(bounds, num_pages)
    }
    /// Recomputes the bounds of the cache's layer for every block overlapping
    /// `tokens` (keys already in the cache; a block's keys at `tokens.end` and
    /// beyond are not part of it yet), keys rotated at their logical positions
    /// if the bounds are rotated ones.
    fn kv_bounds(
        &mut self,
        cache: &KvView<'_, Self>,
        bounds: &mut Self::Bounds,
        tokens: Range<usize>,
    ) -> Result<()> {
        let (l, layer, table) = (cache.layout(), cache.layer, cache.table);
        check::kv_bounds(l, layer, table, &tokens, cache.max_pos())?;
        self.run_kv_bounds(cache, bounds, tokens)
    }
    /// Block scores: `out[h * n + b - blocks.start]` (`n` = `blocks.len()`,
    /// packed like [`SelectionOps::ts_score`]'s) = q . c + spread |q| . r for query head
    /// h (`q` `[1, q_heads * D]`, rotated as the bounds' keys need) against its
    /// KV head's bounds of logical block b, for `b` in `blocks`, with c = (M + m)
    /// / 2 and r = (M - m) / 2 the centre and half-range of the block's keys per
    /// channel. `spread` 1 gives sum_i max(q_i M_i, q_i m_i), an upper bound of
    /// q . k over the block; a smaller `spread` (in 0..=1) ranks blocks by their
    /// centre plus part of their spread. Gated by the Selection Cache like the
    /// TokenSelect ops (hierarchical selection).
    #[allow(clippy::too_many_arguments)]
    fn block_scores(
        &mut self,
        q: &Self::Tensor,
        bounds: &Self::Bounds,
        layer: usize,
        table: &PageTable,
        blocks: Range<usize>,
        spread: f32,
        out: &mut Self::Tensor,
        gate: Option<&Self::Gate>,
    ) -> Result<()> {
        let (l, block) = Self::bounds_layout(bounds);
        let (qd, od) = (Self::dims(q), Self::dims(out));
        check::block_scores(l, block, layer, table, qd, &blocks, od)?;
        check::block_spread(spread)?;
        self.run_block_scores(q, bounds, layer, table, blocks, spread, out, gate)
    }
    /// Quest's block scores summed over each KV head's query heads, in one pass:
    /// `out[g * n + b - blocks.start]` = sum over g's query heads h of
    /// [`SelectionOps::block_scores`]'s `h` row, computed as sum_i (P_i M_i + N_i m_i)
    /// with P (N) the sum of the group's positive (negative) query parts (equal,
    /// since max(q M, q m) = max(q, 0) M + min(q, 0) m). A block's bounds are read
    /// once per KV head instead of once per query head; `out` has a row per KV
    /// head, the form [`SelectionOps::block_top_k`] takes with `kv_heads` rows.
    fn block_group_scores(
        &mut self,
        q: &Self::Tensor,
        bounds: &Self::Bounds,
        layer: usize,
        table: &PageTable,
        blocks: Range<usize>,
        out: &mut Self::Tensor,
    ) -> Result<()> {
        let (l, block) = Self::bounds_layout(bounds);
        let (qd, od) = (Self::dims(q), Self::dims(out));
        check::block_group_scores(l, block, layer, table, qd, &blocks, od)?;
        self.run_block_group_scores(q, bounds, layer, table, blocks, out)
    }
    /// TidalDecode scores: `out[g * n + t]` = sum over KV head g's query heads h
    /// of q_h . k_t for tokens `0..n` of the cache's layer, keys rotated at their
    /// true positions (`q` `[1, q_heads * D]`, rotated); computed as (sum_h q_h) . k_t,
    /// one pass over the keys per KV head. `out` has a row per KV head, the form
    /// [`SelectionOps::block_top_k`] takes with `kv_heads` rows.
    fn token_scores(
        &mut self,
        q: &Self::Tensor,
        cache: &KvView<'_, Self>,
        n: usize,
        out: &mut Self::Tensor,
    ) -> Result<()> {
        check::token_scores(
            cache.layout(),
            cache.layer,
            cache.table,
            Self::dims(q),
            n,
            Self::dims(out),
            cache.max_pos(),
        )?;
        self.run_token_scores(q, cache, n, out)
    }
    /// Quest block choice per KV head: the `k` blocks of `0..n` with the largest
    /// sum over the head's query heads of `scores[h * n + b]` (rows: query heads),
    /// ties to the lower index, as ascending block ids into `out[g * k..][..k]`.
    fn block_top_k(
        &mut self,
        scores: &Self::Tensor,
        kv_heads: usize,
        n: usize,
        k: usize,
        out: &mut Self::Ids,
    ) -> Result<()> {
        check::block_top_k(Self::dims(scores), kv_heads, n, k, Self::ids_len(out))?;
        self.run_block_top_k(scores, kv_heads, n, k, out)
    }

    /// [`SelectionOps::ts_gate`].
    fn run_ts_gate(&mut self) -> Result<Self::Gate>;
    /// [`SelectionOps::ts_cache_check`], checked.
    fn run_ts_cache_check(
        &mut self,
        fp: &Self::Tensor,
        cached: &mut Self::Tensor,
        threshold: f32,
        plan: &SelectPlan,
        cache: &KvView<'_, Self>,
        gate: &mut Self::Gate,
    ) -> Result<()>;
    /// [`SelectionOps::ts_gate_counts`].
    fn run_ts_gate_counts(&mut self, gate: &Self::Gate) -> Result<(u64, u64)>;
    /// [`SelectionOps::ts_score`], checked.
    #[allow(clippy::too_many_arguments)]
    fn run_ts_score(
        &mut self,
        q: &Self::Tensor,
        cache: &KvView<'_, Self>,
        begin: usize,
        n: usize,
        gqa: GqaMap,
        scores: &mut Self::Tensor,
        gate: Option<&Self::Gate>,
        prefilter: Option<&Prefilter<'_, Self::Ids>>,
    ) -> Result<()>;
    /// [`SelectionOps::ts_vote`], checked.
    fn run_ts_vote(
        &mut self,
        scores: &Self::Tensor,
        q_heads: usize,
        n: usize,
        votes: &mut Self::Tensor,
        gate: Option<&Self::Gate>,
    ) -> Result<()>;
    /// [`SelectionOps::ts_top_k`], checked.
    #[allow(clippy::too_many_arguments)]
    fn run_ts_top_k(
        &mut self,
        votes: &Self::Tensor,
        n: usize,
        k: usize,
        begin: usize,
        out: &mut Self::Ids,
        gate: Option<&Self::Gate>,
        prefilter: Option<&Prefilter<'_, Self::Ids>>,
    ) -> Result<()>;
    /// [`SelectionOps::block_bounds`], checked.
    fn run_block_bounds(
        &mut self,
        layout: &KvLayout,
        block: usize,
        rotated: bool,
    ) -> Result<Self::Bounds>;
    /// [`SelectionOps::bounds_grow`], checked (`num_pages` more than held).
    fn run_bounds_grow(&mut self, bounds: &mut Self::Bounds, num_pages: usize) -> Result<()>;
    /// [`SelectionOps::kv_bounds`], checked.
    fn run_kv_bounds(
        &mut self,
        cache: &KvView<'_, Self>,
        bounds: &mut Self::Bounds,
        tokens: Range<usize>,
    ) -> Result<()>;
    /// [`SelectionOps::block_scores`], checked.
    #[allow(clippy::too_many_arguments)]
    fn run_block_scores(
        &mut self,
        q: &Self::Tensor,
        bounds: &Self::Bounds,
        layer: usize,
        table: &PageTable,
        blocks: Range<usize>,
        spread: f32,
        out: &mut Self::Tensor,
        gate: Option<&Self::Gate>,
    ) -> Result<()>;
    /// [`SelectionOps::block_group_scores`], checked.
    fn run_block_group_scores(
        &mut self,
        q: &Self::Tensor,
        bounds: &Self::Bounds,
        layer: usize,
        table: &PageTable,
        blocks: Range<usize>,
        out: &mut Self::Tensor,
    ) -> Result<()>;
    /// [`SelectionOps::token_scores`], checked.
    fn run_token_scores(
        &mut self,
        q: &Self::Tensor,
        cache: &KvView<'_, Self>,
        n: usize,
        out: &mut Self::Tensor,
    ) -> Result<()>;
    /// [`SelectionOps::block_top_k`], checked.
    fn run_block_top_k(
        &mut self,
        scores: &Self::Tensor,
        kv_heads: usize,
        n: usize,
        k: usize,
        out: &mut Self::Ids,
    ) -> Result<()>;
}
