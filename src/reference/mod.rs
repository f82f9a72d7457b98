//! The CPU reference executor: every op in f32, multi-threaded, with
//! `matrixmultiply` for GEMM. It is the oracle for the GPU kernels and the harness
//! for long-context quality. It stores KV as f16-rounded values like the GPU, and
//! rotates keys with the same table, so both take the same decisions.

mod attention;
pub mod block_sparse;
mod speculative;
pub mod tokenselect;

use crate::error::{Error, Result};
use crate::kv::{KvLayout, PageTable};
use crate::ops::{check, GqaMap, KeyList, Ops, Prefilter, RopeConfig, SelectPlan};
use half::f16;
use rayon::prelude::*;
use std::ops::Range;

/// f32 matrix `[rows, cols]`.
#[derive(Clone, Debug, PartialEq)]
pub struct RefTensor {
    /// Row-major values.
    pub data: Vec<f32>,
    /// Rows.
    pub rows: usize,
    /// Columns.
    pub cols: usize,
}

/// Weight matrix held as f32 (exact f16 values).
#[derive(Clone, Debug)]
pub struct RefWeight {
    /// Row-major values.
    pub data: Vec<f32>,
    /// Rows (`out`).
    pub rows: usize,
    /// Columns (`in`).
    pub cols: usize,
}

/// RoPE table `[max_pos, head_dim / 2]` of (cos, sin).
#[derive(Clone, Debug)]
pub struct RefRope {
    /// The table.
    pub cs: Vec<[f32; 2]>,
    /// head_dim / 2.
    pub half: usize,
    /// Positions covered.
    pub max_pos: usize,
}

/// KV storage: per layer, `[page][kv_head][slot][head_dim]` values rounded to f16.
#[derive(Clone, Debug)]
pub struct RefKv {
    /// Layout.
    pub layout: KvLayout,
    /// Keys (before RoPE) per layer.
    pub k: Vec<Vec<f32>>,
    /// Values per layer.
    pub v: Vec<Vec<f32>>,
}

impl RefKv {
    /// Offset of (logical position, kv head) in a layer's storage.
    pub fn offset(&self, table: &PageTable, pos: usize, kvh: usize) -> usize {
        let l = &self.layout;
        let page = table.pages[pos / l.page_size] as usize;
        ((page * l.kv_heads + kvh) * l.page_size + pos % l.page_size) * l.head_dim
    }
}

/// Selection Cache decision on the CPU.
#[derive(Clone, Debug, Default)]
pub struct RefGate {
    /// The last check hit: gated selection ops skip.
    pub hit: bool,
    /// Hits counted.
    pub hits: u64,
    /// Misses counted.
    pub misses: u64,
}

fn skipped(gate: Option<&RefGate>) -> bool {
    gate.is_some_and(|g| g.hit)
}

/// The CPU executor.
#[derive(Debug, Default)]
pub struct RefExecutor;

impl RefExecutor {
    /// A new executor (uses all cores through rayon and matrixmultiply).
    pub fn new() -> Self {
        Self
    }
}

fn round_f16(x: f32) -> f32 {
    f16::from_f32(x).to_f32()
}

impl Ops for RefExecutor {
    type Tensor = RefTensor;
    type Ids = Vec<u32>;
    type Weight = RefWeight;
    type Rope = RefRope;
    type Kv = RefKv;
    type Gate = RefGate;
    type Bounds = block_sparse::RefBounds;

    fn name(&self) -> String {
        "reference (CPU f32)".into()
    }

    fn dims(t: &RefTensor) -> (usize, usize) {
        (t.rows, t.cols)
    }

    fn tensor(&mut self, rows: usize, cols: usize) -> Result<RefTensor> {
        Ok(RefTensor {
            data: vec![0.0; rows * cols],
            rows,
            cols,
        })
    }

    fn upload(&mut self, data: &[f32], rows: usize, cols: usize) -> Result<RefTensor> {
        if data.len() != rows * cols {
            return crate::error::shape_err(
                "upload",
                format!("{} values for ({rows}, {cols})", data.len()),
            );
        }
        Ok(RefTensor {
            data: data.to_vec(),
            rows,
            cols,
        })
    }

    fn download(&mut self, t: &RefTensor) -> Result<Vec<f32>> {
        Ok(t.data.clone())
    }

    fn ids(&mut self, data: &[u32]) -> Result<Vec<u32>> {
        Ok(data.to_vec())
    }

    fn download_ids(&mut self, ids: &Vec<u32>) -> Result<Vec<u32>> {
        Ok(ids.clone())
    }

    fn weight(&mut self, data: &[f16], rows: usize, cols: usize) -> Result<RefWeight> {
        check::weight(data.len(), rows, cols)?;
        Ok(RefWeight {
            data: data.iter().map(|h| h.to_f32()).collect(),
            rows,
            cols,
        })
    }

    fn rope_table(&mut self, cfg: &RopeConfig) -> Result<RefRope> {
        Ok(RefRope {
            cs: cfg.table()?,
            half: cfg.head_dim / 2,
            max_pos: cfg.max_positions,
        })
    }

    fn kv_cache(&mut self, layout: &KvLayout) -> Result<RefKv> {
        layout.validate()?;
        let n = layout.num_pages * layout.page_elems();
        Ok(RefKv {
            layout: *layout,
            k: vec![vec![0.0; n]; layout.layers],
            v: vec![vec![0.0; n]; layout.layers],
        })
    }

    fn block_bounds(
        &mut self,
        layout: &KvLayout,
        block: usize,
        rotated: bool,
    ) -> Result<Self::Bounds> {
        layout.validate()?;
        check::bounds_block(layout, block)?;
        Ok(block_sparse::RefBounds::new(layout, block, rotated))
    }

    fn flush(&mut self) -> Result<()> {
        Ok(())
    }

    fn matmul(&mut self, x: &RefTensor, w: &RefWeight, y: &mut RefTensor) -> Result<()> {
        check::matmul((x.rows, x.cols), (w.rows, w.cols), (y.rows, y.cols))?;
        let (m, k, n) = (x.rows, x.cols, w.rows);
        if m == 0 || n == 0 {
            return Ok(());
        }
        if m <= SMALL_M {
            // Few rows (decode, verify trees): one pass over the weights, each
            // weight row reused from L1 for every x row. sgemm would repack the
            // whole weight matrix per call, which costs ~5x a GEMV at m = 2.
            let xs: Vec<&[f32]> = x.data.chunks(k).collect();
            let mut yt = vec![0.0f32; n * m];
            yt.par_chunks_mut(256 * m).enumerate().for_each(|(c, out)| {
                for (i, o) in out.chunks_mut(m).enumerate() {
                    let r = c * 256 + i;
                    dot_rows(&xs, &w.data[r * k..(r + 1) * k], o);
                }
            });
            if m == 1 {
                y.data.copy_from_slice(&yt);
            } else {
                for (r, row) in yt.chunks(m).enumerate() {
                    for (i, &v) in row.iter().enumerate() {
                        y.data[i * n + r] = v;
                    }
                }
            }
            return Ok(());
        }
        // SAFETY: the pointers and strides describe x [m,k], W^T [k,n] (W is [n,k]
        // row-major) and y [m,n], all within their vectors (shapes checked above).
        unsafe {
            matrixmultiply::sgemm(
                m,
                k,
                n,
                1.0,
                x.data.as_ptr(),
                k as isize,
                1,
                w.data.as_ptr(),
                1,
                k as isize,
                0.0,
                y.data.as_mut_ptr(),
                n as isize,
                1,
            );
        }
        Ok(())
    }

    fn rms_norm(
        &mut self,
        x: &RefTensor,
        w: &RefWeight,
        eps: f32,
        y: &mut RefTensor,
    ) -> Result<()> {
        check::rms_norm((x.rows, x.cols), (w.rows, w.cols), (y.rows, y.cols), eps)?;
        let c = x.cols;
        if c == 0 {
            return Ok(());
        }
        y.data
            .par_chunks_mut(c)
            .zip(x.data.par_chunks(c))
            .for_each(|(yr, xr)| {
                let ss: f32 = xr.iter().map(|v| v * v).sum();
                let inv = 1.0 / (ss / c as f32 + eps).sqrt();
                for ((o, &v), &g) in yr.iter_mut().zip(xr).zip(&w.data) {
                    *o = v * inv * g;
                }
            });
        Ok(())
    }

    fn rope(
        &mut self,
        x: &mut RefTensor,
        heads: usize,
        positions: &Vec<u32>,
        rope: &RefRope,
    ) -> Result<()> {
        let d = rope.half * 2;
        check::rope((x.rows, x.cols), heads, d, positions.len())?;
        if x.cols == 0 {
            return Ok(());
        }
        let cols = x.cols;
        x.data
            .par_chunks_mut(cols)
            .enumerate()
            .for_each(|(r, row)| {
                let p = (positions[r] as usize).min(rope.max_pos - 1);
                let cs = &rope.cs[p * rope.half..(p + 1) * rope.half];
                for h in 0..heads {
                    rotate(&mut row[h * d..(h + 1) * d], cs);
                }
            });
        Ok(())
    }

    fn swiglu(&mut self, gate: &mut RefTensor, up: &RefTensor) -> Result<()> {
        check::same("swiglu", (gate.rows, gate.cols), (up.rows, up.cols))?;
        gate.data.par_iter_mut().zip(&up.data).for_each(|(g, &u)| {
            *g = *g / (1.0 + (-*g).exp()) * u;
        });
        Ok(())
    }

    fn add(&mut self, acc: &mut RefTensor, x: &RefTensor) -> Result<()> {
        check::same("add", (acc.rows, acc.cols), (x.rows, x.cols))?;
        acc.data.iter_mut().zip(&x.data).for_each(|(a, &b)| *a += b);
        Ok(())
    }

    fn embed(&mut self, ids: &Vec<u32>, table: &RefWeight, out: &mut RefTensor) -> Result<()> {
        check::embed(ids.len(), (table.rows, table.cols), (out.rows, out.cols))?;
        check::token_ids(ids, table.rows)?;
        let c = table.cols;
        for (t, &id) in ids.iter().enumerate() {
            out.data[t * c..(t + 1) * c]
                .copy_from_slice(&table.data[id as usize * c..(id as usize + 1) * c]);
        }
        Ok(())
    }

    fn add_bias(&mut self, x: &mut RefTensor, bias: &RefWeight) -> Result<()> {
        check::add_bias((x.rows, x.cols), (bias.rows, bias.cols))?;
        if x.cols == 0 {
            return Ok(());
        }
        for row in x.data.chunks_mut(x.cols) {
            row.iter_mut().zip(&bias.data).for_each(|(a, b)| *a += b);
        }
        Ok(())
    }

    fn copy_rows(
        &mut self,
        src: &RefTensor,
        src_row: usize,
        dst: &mut RefTensor,
        dst_row: usize,
        rows: usize,
    ) -> Result<()> {
        check::copy_rows(
            (src.rows, src.cols),
            src_row,
            (dst.rows, dst.cols),
            dst_row,
            rows,
        )?;
        let c = src.cols;
        dst.data[dst_row * c..(dst_row + rows) * c]
            .copy_from_slice(&src.data[src_row * c..(src_row + rows) * c]);
        Ok(())
    }

    fn penalize(&mut self, logits: &mut RefTensor, ids: &[u32], penalty: f32) -> Result<()> {
        for &t in ids {
            if let Some(l) = logits.data[..logits.cols].get_mut(t as usize) {
                *l = if *l > 0.0 { *l / penalty } else { *l * penalty };
            }
        }
        Ok(())
    }

    fn top_k(&mut self, logits: &RefTensor, k: usize) -> Result<Vec<(u32, f32)>> {
        check::top_k((logits.rows, logits.cols), k)?;
        Ok(top_k_row(&logits.data[..logits.cols], k))
    }

    fn ts_score(
        &mut self,
        q: &RefTensor,
        kv: &RefKv,
        layer: usize,
        table: &PageTable,
        begin: usize,
        n: usize,
        gqa: GqaMap,
        scores: &mut RefTensor,
        gate: Option<&RefGate>,
        prefilter: Option<&Prefilter<'_, Vec<u32>>>,
    ) -> Result<()> {
        if skipped(gate) {
            return Ok(());
        }
        let slots = prefilter.map_or(n, |pf| pf.slots());
        check::ts(
            &kv.layout,
            layer,
            table,
            (q.rows, q.cols),
            begin,
            n,
            slots,
            scores.data.len(),
        )?;
        check::prefilter(prefilter.map(|pf| (pf.count, pf.block, pf.blocks.len())))?;
        let tokens = tokenselect::slot_tokens(begin, n, prefilter);
        tokenselect::score(q, kv, layer, table, &tokens, gqa, &mut scores.data);
        Ok(())
    }

    fn ts_vote(
        &mut self,
        scores: &RefTensor,
        q_heads: usize,
        n: usize,
        votes: &mut RefTensor,
        gate: Option<&RefGate>,
    ) -> Result<()> {
        check::ts_vote(scores.data.len(), votes.data.len(), q_heads, n)?;
        if skipped(gate) {
            return Ok(());
        }
        tokenselect::vote(&scores.data, q_heads, n, &mut votes.data);
        Ok(())
    }

    fn ts_top_k(
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
        if votes.data.len() < n || k == 0 || k > n || out.len() < k {
            return crate::error::shape_err(
                "ts_top_k",
                format!("top {k} of {n} into {} slots", out.len()),
            );
        }
        check::prefilter(prefilter.map(|pf| (pf.count, pf.block, pf.blocks.len())))?;
        if prefilter.is_some_and(|pf| pf.slots() != n) {
            return crate::error::shape_err(
                "ts_top_k",
                format!("{n} votes for the prefilter's slots"),
            );
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

    fn ts_gate(&mut self) -> Result<RefGate> {
        Ok(RefGate::default())
    }

    fn ts_cache_check(
        &mut self,
        fp: &RefTensor,
        cached: &mut RefTensor,
        threshold: f32,
        _plan: &SelectPlan,
        _kv: &RefKv,
        _table: &PageTable,
        gate: &mut RefGate,
    ) -> Result<()> {
        let len = fp.data.len();
        if cached.data.len() != len + 1 {
            return crate::error::shape_err(
                "ts_cache_check",
                format!("cache holds {} values for {len}", cached.data.len()),
            );
        }
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

    fn ts_gate_counts(&mut self, gate: &RefGate) -> Result<(u64, u64)> {
        Ok((gate.hits, gate.misses))
    }

    fn attention_decode_list(
        &mut self,
        q: &RefTensor,
        kv: &RefKv,
        layer: usize,
        table: &PageTable,
        seq_len: usize,
        list: &KeyList<'_, Vec<u32>>,
        rope: &RefRope,
        out: &mut RefTensor,
    ) -> Result<()> {
        check::attention_decode_list(
            &kv.layout,
            layer,
            table,
            (q.rows, q.cols),
            (out.rows, out.cols),
            seq_len,
            list,
            list.selected.len(),
            rope.max_pos,
        )?;
        let q_start = seq_len - 1;
        tokenselect::attention_list(q, kv, layer, table, 0..1, q_start, list, rope, out);
        Ok(())
    }

    fn attention_prefill_list(
        &mut self,
        q: &RefTensor,
        kv: &RefKv,
        layer: usize,
        table: &PageTable,
        rows: Range<usize>,
        q_start: usize,
        list: &KeyList<'_, Vec<u32>>,
        rope: &RefRope,
        out: &mut RefTensor,
    ) -> Result<()> {
        check::attention_list(
            "attention_prefill_list",
            &kv.layout,
            layer,
            table,
            (q.rows, q.cols),
            (out.rows, out.cols),
            &rows,
            q_start,
            list,
            list.selected.len(),
            rope.max_pos,
        )?;
        tokenselect::attention_list(q, kv, layer, table, rows, q_start, list, rope, out);
        Ok(())
    }

    fn attention_tree(
        &mut self,
        q: &RefTensor,
        kv: &RefKv,
        layer: usize,
        table: &PageTable,
        prefix_len: usize,
        tree: &Vec<u32>,
        list: Option<&KeyList<'_, Vec<u32>>>,
        rope: &RefRope,
        out: &mut RefTensor,
    ) -> Result<()> {
        check::attention_tree(
            &kv.layout,
            layer,
            table,
            (q.rows, q.cols),
            (out.rows, out.cols),
            prefix_len,
            tree.len(),
            list.map(|li| (li, li.selected.len())),
            rope.max_pos,
        )?;
        attention::tree(q, kv, layer, table, prefix_len, tree, list, rope, out);
        Ok(())
    }

    fn spec_draft(
        &mut self,
        adj: &Vec<u32>,
        plan: &Vec<u32>,
        n: usize,
        out: &mut Vec<u32>,
    ) -> Result<()> {
        if n == 0 || n > crate::ops::MAX_NODES || plan.len() < 3 * n || out.len() < n {
            return crate::error::shape_err(
                "spec_draft",
                format!(
                    "{n} nodes, plan of {} words, output of {}",
                    plan.len(),
                    out.len()
                ),
            );
        }
        for i in 0..n {
            let (parent, rank, token) = (plan[3 * i], plan[3 * i + 1], plan[3 * i + 2]);
            out[i] = if parent != u32::MAX && rank != u32::MAX {
                let at = out[parent as usize] as usize * 8 + rank as usize;
                adj.get(at).copied().unwrap_or(0)
            } else {
                token
            };
        }
        Ok(())
    }

    fn spec_adj_update(
        &mut self,
        adj: &mut Vec<u32>,
        logits: &RefTensor,
        tokens: &Vec<u32>,
    ) -> Result<()> {
        let (n, vocab) = (logits.rows, logits.cols);
        if adj.len() != vocab * 8 || tokens.len() < n || n > crate::ops::MAX_NODES {
            return crate::error::shape_err(
                "spec_adj_update",
                format!(
                    "adjacency of {} for a vocabulary of {vocab}, {} tokens for {n} rows",
                    adj.len(),
                    tokens.len()
                ),
            );
        }
        // The last node of a repeated token wins, so earlier duplicates skip.
        let rows: Vec<usize> = (0..n)
            .filter(|&i| !tokens[i + 1..n].contains(&tokens[i]) && (tokens[i] as usize) < vocab)
            .collect();
        let tops: Vec<Vec<(u32, f32)>> = rows
            .par_iter()
            .map(|&i| top_k_row(&logits.data[i * vocab..(i + 1) * vocab], 8))
            .collect();
        for (&i, top) in rows.iter().zip(&tops) {
            let tok = tokens[i] as usize;
            for (r, &(b, _)) in top.iter().enumerate() {
                adj[tok * 8 + r] = b;
            }
        }
        Ok(())
    }

    fn spec_accept(
        &mut self,
        logits: &RefTensor,
        tokens: &Vec<u32>,
        links: &Vec<u32>,
        params: &crate::sampling::AcceptParams,
        depth: usize,
        trials: usize,
        out: &mut Vec<u32>,
    ) -> Result<()> {
        let (n, vocab) = (logits.rows, logits.cols);
        check::spec_accept(
            (n, vocab),
            tokens.len(),
            links.len(),
            params,
            depth,
            trials,
            out.len(),
        )?;
        let stride = crate::sampling::accept_stride(depth);
        let (toks, links) = (&tokens[..n], &links[..2 * n]);
        out[..trials * stride]
            .par_chunks_mut(stride)
            .enumerate()
            .for_each(|(t, o)| {
                o.copy_from_slice(&speculative::accept_trial(
                    &logits.data,
                    vocab,
                    toks,
                    links,
                    params,
                    depth,
                    t as u32,
                ))
            });
        Ok(())
    }

    fn token_scores(
        &mut self,
        q: &RefTensor,
        kv: &RefKv,
        layer: usize,
        table: &PageTable,
        n: usize,
        rope: &RefRope,
        out: &mut RefTensor,
    ) -> Result<()> {
        check::token_scores(
            &kv.layout,
            layer,
            table,
            (q.rows, q.cols),
            n,
            (out.rows, out.cols),
            rope.max_pos,
        )?;
        block_sparse::token_scores(q, kv, layer, table, n, rope, out);
        Ok(())
    }

    fn block_top_k(
        &mut self,
        scores: &RefTensor,
        kv_heads: usize,
        n: usize,
        k: usize,
        out: &mut Vec<u32>,
    ) -> Result<()> {
        check::block_top_k((scores.rows, scores.cols), kv_heads, n, k, out.len())?;
        block_sparse::top_k(scores, kv_heads, n, k, out);
        Ok(())
    }

    fn kv_bounds(
        &mut self,
        kv: &RefKv,
        bounds: &mut Self::Bounds,
        layer: usize,
        table: &PageTable,
        tokens: Range<usize>,
        rope: &RefRope,
    ) -> Result<()> {
        check::kv_bounds(&kv.layout, layer, table, &tokens, rope.max_pos)?;
        block_sparse::bounds(kv, bounds, layer, table, tokens, rope);
        Ok(())
    }

    fn block_scores(
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
        check::block_scores(
            &bounds.layout,
            bounds.block,
            layer,
            table,
            (q.rows, q.cols),
            &blocks,
            (out.rows, out.cols),
        )?;
        check::block_spread(spread)?;
        block_sparse::scores(q, bounds, layer, table, blocks, spread, out);
        Ok(())
    }

    fn block_group_scores(
        &mut self,
        q: &RefTensor,
        bounds: &Self::Bounds,
        layer: usize,
        table: &PageTable,
        blocks: Range<usize>,
        out: &mut RefTensor,
    ) -> Result<()> {
        check::block_group_scores(
            &bounds.layout,
            bounds.block,
            layer,
            table,
            (q.rows, q.cols),
            &blocks,
            (out.rows, out.cols),
        )?;
        block_sparse::group_scores(q, bounds, layer, table, blocks, out);
        Ok(())
    }

    fn mean_rows(&mut self, x: &RefTensor, rows: Range<usize>, out: &mut RefTensor) -> Result<()> {
        check::mean_rows((x.rows, x.cols), &rows, (out.rows, out.cols))?;
        let c = x.cols;
        let o = &mut out.data[..c];
        o.iter_mut().for_each(|v| *v = 0.0);
        for r in rows.clone() {
            for (v, xv) in o.iter_mut().zip(&x.data[r * c..(r + 1) * c]) {
                *v += xv;
            }
        }
        let inv = rows.len() as f32;
        o.iter_mut().for_each(|v| *v /= inv);
        Ok(())
    }

    fn argmax(&mut self, x: &RefTensor, out: &mut Vec<u32>) -> Result<()> {
        if out.len() < x.rows {
            return crate::error::shape_err(
                "argmax",
                format!("{} outputs for {} rows", out.len(), x.rows),
            );
        }
        for (r, o) in out.iter_mut().take(x.rows).enumerate() {
            *o = argmax_row(&x.data[r * x.cols..(r + 1) * x.cols]);
        }
        Ok(())
    }

    fn kv_move(
        &mut self,
        kv: &mut RefKv,
        table: &PageTable,
        moves: &[(usize, usize)],
    ) -> Result<()> {
        check::kv_move(&kv.layout, table, moves)?;
        let (hk, d) = (kv.layout.kv_heads, kv.layout.head_dim);
        for &(src, dst) in moves {
            for h in 0..hk {
                let (a, b) = (kv.offset(table, src, h), kv.offset(table, dst, h));
                for layer in 0..kv.layout.layers {
                    kv.k[layer].copy_within(a..a + d, b);
                    kv.v[layer].copy_within(a..a + d, b);
                }
            }
        }
        Ok(())
    }

    fn kv_append(
        &mut self,
        kv: &mut RefKv,
        layer: usize,
        table: &PageTable,
        start: usize,
        k: &RefTensor,
        v: &RefTensor,
    ) -> Result<()> {
        check::kv_append(
            &kv.layout,
            layer,
            table,
            start,
            (k.rows, k.cols),
            (v.rows, v.cols),
        )?;
        let (hk, d) = (kv.layout.kv_heads, kv.layout.head_dim);
        for t in 0..k.rows {
            for h in 0..hk {
                let off = kv.offset(table, start + t, h);
                let src = (t * hk + h) * d;
                for i in 0..d {
                    kv.k[layer][off + i] = round_f16(k.data[src + i]);
                    kv.v[layer][off + i] = round_f16(v.data[src + i]);
                }
            }
        }
        Ok(())
    }

    fn attention_prefill(
        &mut self,
        q: &RefTensor,
        kv: &RefKv,
        layer: usize,
        table: &PageTable,
        q_start: usize,
        kv_len: usize,
        rope: &RefRope,
        out: &mut RefTensor,
    ) -> Result<()> {
        let dims = ((q.rows, q.cols), (out.rows, out.cols));
        check::attention(
            "attention_prefill",
            &kv.layout,
            layer,
            table,
            dims.0,
            dims.1,
            q_start,
            kv_len,
            rope.max_pos,
        )?;
        attention::dense(q, kv, layer, table, q_start, kv_len, rope, out);
        Ok(())
    }

    fn attention_decode(
        &mut self,
        q: &RefTensor,
        kv: &RefKv,
        layer: usize,
        table: &PageTable,
        kv_len: usize,
        rope: &RefRope,
        out: &mut RefTensor,
    ) -> Result<()> {
        let dims = ((q.rows, q.cols), (out.rows, out.cols));
        if q.rows != 1 {
            return crate::error::shape_err(
                "attention_decode",
                format!("{} query rows, expected 1", q.rows),
            );
        }
        let q_start = kv_len.checked_sub(1).ok_or_else(|| Error::Shape {
            op: "attention_decode",
            msg: "kv_len is 0".into(),
        })?;
        check::attention(
            "attention_decode",
            &kv.layout,
            layer,
            table,
            dims.0,
            dims.1,
            q_start,
            kv_len,
            rope.max_pos,
        )?;
        attention::dense(q, kv, layer, table, q_start, kv_len, rope, out);
        Ok(())
    }
}

/// f32 dot product with 8 independent accumulators (lets LLVM vectorise), on
/// AVX2 when the CPU has it (same summation order, so the same result).
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") {
        // SAFETY: the CPU supports AVX2 (checked just above).
        return unsafe { dot_avx2(a, b) };
    }
    dot_impl(a, b)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn dot_avx2(a: &[f32], b: &[f32]) -> f32 {
    dot_impl(a, b)
}

#[inline(always)]
fn dot_impl(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0.0f32; 8];
    let n = a.len().min(b.len());
    let chunks = n / 8;
    for c in 0..chunks {
        let r = c * 8..c * 8 + 8;
        let (x, y): (&[f32; 8], &[f32; 8]) =
            (a[r.clone()].try_into().unwrap(), b[r].try_into().unwrap());
        for l in 0..8 {
            acc[l] += x[l] * y[l];
        }
    }
    let mut s: f32 = acc.iter().sum();
    for i in chunks * 8..n {
        s += a[i] * b[i];
    }
    s
}

/// Largest row count the reference matmul serves with dot products instead of
/// sgemm (measured crossover on a 2-core AVX2 machine, SmolLM2 shapes).
const SMALL_M: usize = 16;

/// `out[i] = dot(xs[i], w)` for every row: blocks of four x rows per pass over
/// `w`, so each loaded weight lane feeds four accumulators; a short last block
/// repeats its final row (extra results dropped) instead of falling back to
/// one-row dots.
fn dot_rows(xs: &[&[f32]], w: &[f32], out: &mut [f32]) {
    if xs.len() == 1 {
        out[0] = dot(xs[0], w);
        return;
    }
    // Four rows is the measured sweet spot: eight spill registers and run 3x
    // slower per row on AVX2.
    for (block, o) in xs.chunks(4).zip(out.chunks_mut(4)) {
        dot_block::<4>(block, w, o);
    }
}

fn dot_block<const R: usize>(block: &[&[f32]], w: &[f32], out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") {
        // SAFETY: the CPU supports AVX2 (checked just above).
        return unsafe { dot_block_avx2::<R>(block, w, out) };
    }
    dot_block_impl::<R>(block, w, out)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn dot_block_avx2<const R: usize>(block: &[&[f32]], w: &[f32], out: &mut [f32]) {
    dot_block_impl::<R>(block, w, out)
}

#[inline(always)]
fn dot_block_impl<const R: usize>(block: &[&[f32]], w: &[f32], out: &mut [f32]) {
    let rows: [&[f32]; R] = std::array::from_fn(|i| block[i.min(block.len() - 1)]);
    let k = w.len();
    let chunks = k / 8;
    let mut acc = [[0.0f32; 8]; R];
    for ch in 0..chunks {
        let r = ch * 8..ch * 8 + 8;
        // Fixed-size views drop the bounds checks so the lanes vectorise.
        let wv: &[f32; 8] = w[r.clone()].try_into().unwrap();
        for (acc, x) in acc.iter_mut().zip(rows) {
            let x: &[f32; 8] = x[r.clone()].try_into().unwrap();
            for l in 0..8 {
                acc[l] += x[l] * wv[l];
            }
        }
    }
    for (j, o) in out.iter_mut().enumerate() {
        let mut s: f32 = acc[j].iter().sum();
        for t in chunks * 8..k {
            s += rows[j][t] * w[t];
        }
        *o = s;
    }
}

/// Rotate-half RoPE of one head vector with its (cos, sin) row.
pub fn rotate(x: &mut [f32], cs: &[[f32; 2]]) {
    let half = cs.len();
    for i in 0..half {
        let (x1, x2) = (x[i], x[i + half]);
        x[i] = x1 * cs[i][0] - x2 * cs[i][1];
        x[i + half] = x2 * cs[i][0] + x1 * cs[i][1];
    }
}

/// The k largest (id, value) pairs, descending, ties to the lower id, NaN skipped.
pub fn top_k_row(row: &[f32], k: usize) -> Vec<(u32, f32)> {
    let mut best: Vec<(u32, f32)> = Vec::with_capacity(k + 1);
    for (j, &v) in row.iter().enumerate() {
        if v.is_nan() || (best.len() == k && v <= best[k - 1].1) {
            continue;
        }
        let pos = best.partition_point(|&(_, bv)| bv >= v);
        best.insert(pos, (j as u32, v));
        best.truncate(k);
    }
    best
}

/// Argmax with ties to the lowest index; NaN never wins (index 0 if all NaN).
pub fn argmax_row(row: &[f32]) -> u32 {
    let mut best = f32::NEG_INFINITY;
    let mut bi: Option<usize> = None;
    for (j, &v) in row.iter().enumerate() {
        if !v.is_nan() && (bi.is_none() || v > best) {
            best = v;
            bi = Some(j);
        }
    }
    bi.unwrap_or(0) as u32
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kv::PageAllocator;

    fn lcg(seed: &mut u64) -> f32 {
        *seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((*seed >> 33) as f32 / (1u64 << 31) as f32) * 2.0 - 1.0
    }

    #[test]
    fn matmul_gemv_and_gemm_match_naive() {
        let mut ex = RefExecutor::new();
        let mut s = 1;
        for m in [1usize, 3, 6, 40] {
            // 36: a ragged tail past the 8-wide dot blocks.
            let (k, n) = (36, 70);
            let x: Vec<f32> = (0..m * k).map(|_| lcg(&mut s)).collect();
            let w: Vec<f16> = (0..n * k).map(|_| f16::from_f32(lcg(&mut s))).collect();
            let (xt, wt) = (ex.upload(&x, m, k).unwrap(), ex.weight(&w, n, k).unwrap());
            let mut y = ex.tensor(m, n).unwrap();
            ex.matmul(&xt, &wt, &mut y).unwrap();
            for i in 0..m {
                for j in 0..n {
                    let want: f32 = (0..k).map(|c| x[i * k + c] * w[j * k + c].to_f32()).sum();
                    assert!((y.data[i * n + j] - want).abs() < 1e-5);
                }
            }
        }
    }

    #[test]
    fn rope_rotates_pairs_half_apart() {
        let cfg = RopeConfig {
            head_dim: 4,
            theta: 10000.0,
            scaling: None,
            max_positions: 8,
        };
        let mut ex = RefExecutor::new();
        let rope = ex.rope_table(&cfg).unwrap();
        let mut x = ex.upload(&[1.0, 0.0, 0.0, 0.0], 1, 4).unwrap();
        ex.rope(&mut x, 1, &vec![3], &rope).unwrap();
        // Pair (0, 2) rotates by 3 * theta^0 = 3 rad.
        assert!((x.data[0] - 3f32.cos()).abs() < 1e-6);
        assert!((x.data[2] - 3f32.sin()).abs() < 1e-6);
        assert_eq!(x.data[1], 0.0);
    }

    #[test]
    fn llama3_scaling_keeps_high_and_divides_low_frequencies() {
        let base = RopeConfig {
            head_dim: 128,
            theta: 500000.0,
            scaling: None,
            max_positions: 1,
        };
        let s = crate::ops::Llama3Scaling {
            factor: 8.0,
            low_freq_factor: 1.0,
            high_freq_factor: 4.0,
            original_max_position_embeddings: 8192.0,
        };
        let plain = base.inv_freq();
        let scaled = RopeConfig {
            scaling: Some(s),
            ..base
        }
        .inv_freq();
        assert_eq!(plain[0], scaled[0]);
        assert!((scaled[63] - plain[63] / 8.0).abs() <= plain[63] * 1e-6);
    }

    /// Dense attention against a direct evaluation of softmax(q R(p) . R(j) k / sqrt(d)) v.
    #[test]
    fn attention_matches_direct_formula() {
        let (qh, kh, d, len, ps) = (4usize, 2usize, 8usize, 11usize, 4usize);
        let layout = KvLayout {
            layers: 1,
            kv_heads: kh,
            head_dim: d,
            page_size: ps,
            num_pages: 5,
        };
        let mut ex = RefExecutor::new();
        let mut alloc = PageAllocator::new(&layout);
        let mut t = alloc.new_sequence();
        alloc.reserve(&mut t, len).unwrap();
        let mut kv = ex.kv_cache(&layout).unwrap();
        let mut s = 7;
        let k: Vec<f32> = (0..len * kh * d).map(|_| lcg(&mut s)).collect();
        let v: Vec<f32> = (0..len * kh * d).map(|_| lcg(&mut s)).collect();
        let (kt, vt) = (
            ex.upload(&k, len, kh * d).unwrap(),
            ex.upload(&v, len, kh * d).unwrap(),
        );
        ex.kv_append(&mut kv, 0, &t, 0, &kt, &vt).unwrap();
        let cfg = RopeConfig {
            head_dim: d,
            theta: 100.0,
            scaling: None,
            max_positions: 64,
        };
        let rope = ex.rope_table(&cfg).unwrap();
        let n_q = 3;
        let q: Vec<f32> = (0..n_q * qh * d).map(|_| lcg(&mut s)).collect();
        let qt = ex.upload(&q, n_q, qh * d).unwrap();
        let mut out = ex.tensor(n_q, qh * d).unwrap();
        ex.attention_prefill(&qt, &kv, 0, &t, len - n_q, len, &rope, &mut out)
            .unwrap();
        for i in 0..n_q {
            for h in 0..qh {
                let g = h / (qh / kh);
                let visible = len - n_q + i + 1;
                let qv = &q[(i * qh + h) * d..(i * qh + h + 1) * d];
                let scores: Vec<f64> = (0..visible)
                    .map(|j| {
                        let mut kj: Vec<f32> =
                            (0..d).map(|c| round_f16(k[(j * kh + g) * d + c])).collect();
                        rotate(&mut kj, &rope.cs[j * d / 2..(j + 1) * d / 2]);
                        qv.iter()
                            .zip(&kj)
                            .map(|(a, b)| (*a as f64) * (*b as f64))
                            .sum::<f64>()
                            / (d as f64).sqrt()
                    })
                    .collect();
                let mx = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let z: f64 = scores.iter().map(|x| (x - mx).exp()).sum();
                for c in 0..d {
                    let want: f64 = (0..visible)
                        .map(|j| {
                            (scores[j] - mx).exp() / z * round_f16(v[(j * kh + g) * d + c]) as f64
                        })
                        .sum();
                    let got = out.data[(i * qh + h) * d + c] as f64;
                    assert!((got - want).abs() < 1e-5, "q{i} h{h} c{c}: {got} vs {want}");
                }
            }
        }
        // Decode of the last query equals the last prefill row.
        let q_last = ex.upload(&q[(n_q - 1) * qh * d..], 1, qh * d).unwrap();
        let mut o1 = ex.tensor(1, qh * d).unwrap();
        ex.attention_decode(&q_last, &kv, 0, &t, len, &rope, &mut o1)
            .unwrap();
        assert_eq!(o1.data, out.data[(n_q - 1) * qh * d..].to_vec());
    }
}
