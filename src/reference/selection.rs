//! The reference's selection ops: TokenSelect, block bounds and scores, the
//! Selection Cache gate.

use super::{block_sparse, skipped, tokenselect, RefExecutor, RefGate, RefTensor, RefView};
use crate::error::Result;
use crate::kv::{KvLayout, PageTable};
use crate::ops::{GqaMap, Prefilter, SelectPlan, SelectionOps};
use std::ops::Range;

impl SelectionOps for RefExecutor {
    fn run_ts_gate(&mut self) -> Result<RefGate> {
        Ok(RefGate::default())
    }

    fn run_ts_cache_check(
        &mut self,
        fp: &RefTensor,
        cached: &mut RefTensor,
        threshold: f32,
        _plan: &SelectPlan,
        _cache: &RefView<'_>,
        gate: &mut RefGate,
    ) -> Result<()> {
        let len = fp.data.len();
        // Same arithmetic as the kernel: f32 sums of products, cosine with a floor.
        let (mut ab, mut aa, mut bb) = (0.0f32, 0.0f32, 0.0f32);
        for (a, b) in fp.data.iter().zip(&cached.data) {
            ab += a * b;
            aa += a * a;
            bb += b * b;
        }
        let cos = ab / (aa * bb).sqrt().max(1e-30);
        gate.hit = cached.data[len] == 1.0 && cos >= threshold;
        if gate.hit {
            gate.hits += 1;
        } else {
            gate.misses += 1;
            cached.data[..len].copy_from_slice(&fp.data);
            cached.data[len] = 1.0;
        }
        Ok(())
    }

    fn run_ts_gate_counts(&mut self, gate: &RefGate) -> Result<(u64, u64)> {
        Ok((gate.hits, gate.misses))
    }

    fn run_ts_score(
        &mut self,
        q: &RefTensor,
        cache: &RefView<'_>,
        begin: usize,
        n: usize,
        gqa: GqaMap,
        scores: &mut RefTensor,
        gate: Option<&RefGate>,
        prefilter: Option<&Prefilter<'_, Vec<u32>>>,
    ) -> Result<()> {
        let (kv, layer, table) = (cache.kv, cache.layer, cache.table);
        if skipped(gate) {
            return Ok(());
        }
        let tokens = tokenselect::slot_tokens(begin, n, prefilter);
        tokenselect::score(q, kv, layer, table, &tokens, gqa, &mut scores.data);
        Ok(())
    }

    fn run_ts_vote(
        &mut self,
        scores: &RefTensor,
        q_heads: usize,
        n: usize,
        votes: &mut RefTensor,
        gate: Option<&RefGate>,
    ) -> Result<()> {
        if skipped(gate) {
            return Ok(());
        }
        tokenselect::vote(&scores.data, q_heads, n, &mut votes.data);
        Ok(())
    }

    fn run_ts_top_k(
        &mut self,
        votes: &RefTensor,
        n: usize,
        k: usize,
        begin: usize,
        out: &mut Vec<u32>,
        gate: Option<&RefGate>,
        prefilter: Option<&Prefilter<'_, Vec<u32>>>,
    ) -> Result<()> {
        if skipped(gate) {
            return Ok(());
        }
        let sel = tokenselect::top_k(&votes.data[..n], k, 0);
        for (o, j) in out[..k].iter_mut().zip(sel) {
            *o = match prefilter {
                Some(pf) => tokenselect::slot_token(pf, j as usize) as u32,
                None => begin as u32 + j,
            };
        }
        Ok(())
    }

    fn run_block_bounds(
        &mut self,
        layout: &KvLayout,
        block: usize,
        rotated: bool,
    ) -> Result<Self::Bounds> {
        Ok(block_sparse::RefBounds::new(layout, block, rotated))
    }

    fn run_bounds_grow(&mut self, b: &mut block_sparse::RefBounds, num_pages: usize) -> Result<()> {
        let l = &b.layout;
        let n = num_pages * l.kv_heads * (l.page_size / b.block) * 2 * l.head_dim;
        for d in b.data.iter_mut() {
            d.resize(n, 0.0);
        }
        b.layout.num_pages = num_pages;
        Ok(())
    }

    fn run_kv_bounds(
        &mut self,
        cache: &RefView<'_>,
        bounds: &mut Self::Bounds,
        tokens: Range<usize>,
    ) -> Result<()> {
        let (kv, layer, table, rope) = (cache.kv, cache.layer, cache.table, cache.rope);
        block_sparse::bounds(kv, bounds, layer, table, tokens, rope);
        Ok(())
    }

    fn run_block_scores(
        &mut self,
        q: &RefTensor,
        bounds: &Self::Bounds,
        layer: usize,
        table: &PageTable,
        blocks: Range<usize>,
        spread: f32,
        out: &mut RefTensor,
        gate: Option<&RefGate>,
    ) -> Result<()> {
        if skipped(gate) {
            return Ok(());
        }
        block_sparse::scores(q, bounds, layer, table, blocks, spread, out);
        Ok(())
    }

    fn run_block_group_scores(
        &mut self,
        q: &RefTensor,
        bounds: &Self::Bounds,
        layer: usize,
        table: &PageTable,
        blocks: Range<usize>,
        out: &mut RefTensor,
    ) -> Result<()> {
        block_sparse::group_scores(q, bounds, layer, table, blocks, out);
        Ok(())
    }

    fn run_token_scores(
        &mut self,
        q: &RefTensor,
        cache: &RefView<'_>,
        n: usize,
        out: &mut RefTensor,
    ) -> Result<()> {
        let (kv, layer, table, rope) = (cache.kv, cache.layer, cache.table, cache.rope);
        block_sparse::token_scores(q, kv, layer, table, n, rope, out);
        Ok(())
    }

    fn run_block_top_k(
        &mut self,
        scores: &RefTensor,
        kv_heads: usize,
        n: usize,
        k: usize,
        out: &mut Vec<u32>,
    ) -> Result<()> {
        block_sparse::top_k(scores, kv_heads, n, k, out);
        Ok(())
    }
}
