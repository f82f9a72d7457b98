//! Quest block bounds and scores on the CPU (twin of `block_sparse.wgsl`).

use super::{RefKv, RefRope, RefTensor};
use crate::kv::{KvLayout, PageTable};

/// Bounds per layer: `[page][kv_head][block in page][max D, min D]`, values
/// rounded to f16 as the GPU stores them.
pub struct RefBounds {
    /// Tokens per block.
    pub block: usize,
    /// Keys rotated at their positions (Quest) or not (hierarchical TokenSelect).
    pub rotated: bool,
    /// Layout of the cache the bounds describe.
    pub layout: KvLayout,
    /// Per layer.
    pub data: Vec<Vec<f32>>,
}

impl RefBounds {
    /// Zeroed bounds for `layout`.
    pub fn new(layout: &KvLayout, block: usize, rotated: bool) -> Self {
        let n =
            layout.num_pages * layout.kv_heads * (layout.page_size / block) * 2 * layout.head_dim;
        Self {
            block,
            rotated,
            layout: *layout,
            data: vec![vec![0.0; n]; layout.layers],
        }
    }

    /// Offset of the bounds of logical block `b`, KV head `h`.
    pub fn offset(&self, table: &PageTable, b: usize, h: usize) -> usize {
        let l = &self.layout;
        let t0 = b * self.block;
        let page = table.pages[t0 / l.page_size] as usize;
        let per_page = l.page_size / self.block;
        ((page * l.kv_heads + h) * per_page + (t0 % l.page_size) / self.block) * 2 * l.head_dim
    }
}

/// A bound as stored (f16, as the kernel stores it): widened by 2^-9 of its
/// size plus 2^-23 in direction `dir` first, so rounding keeps it a bound.
fn widen(v: f32, dir: f32) -> f32 {
    let w = v + dir * (v.abs() * 0.001953125 + 1.192_092_9e-7);
    half::f16::from_f32(w.clamp(-65504.0, 65504.0)).to_f32()
}

pub(super) fn bounds(
    kv: &RefKv,
    b: &mut RefBounds,
    layer: usize,
    table: &PageTable,
    tokens: std::ops::Range<usize>,
    rope: &RefRope,
) {
    let (hk, d) = (kv.layout.kv_heads, kv.layout.head_dim);
    let half = d / 2;
    for blk in tokens.start / b.block..tokens.end.div_ceil(b.block) {
        let t0 = blk * b.block;
        let t1 = (t0 + b.block).min(tokens.end);
        for h in 0..hk {
            let mut mx = vec![-3.0e38f32; d];
            let mut mn = vec![3.0e38f32; d];
            for t in t0..t1 {
                let off = kv.offset(table, t, h);
                let k = &kv.k[layer][off..off + d];
                let cs = rope.row(t);
                for i in 0..half {
                    let (lo, hi) = (k[i], k[i + half]);
                    let r = if b.rotated {
                        [lo * cs[i][0] - hi * cs[i][1], hi * cs[i][0] + lo * cs[i][1]]
                    } else {
                        [lo, hi]
                    };
                    for (c, v) in [(i, r[0]), (i + half, r[1])] {
                        mx[c] = mx[c].max(v);
                        mn[c] = mn[c].min(v);
                    }
                }
            }
            let o = b.offset(table, blk, h);
            for (dst, (v, dir)) in b.data[layer][o..o + 2 * d].iter_mut().zip(
                mx.iter()
                    .map(|v| (v, 1.0))
                    .chain(mn.iter().map(|v| (v, -1.0))),
            ) {
                *dst = widen(*v, dir);
            }
        }
    }
}

pub(super) fn scores(
    q: &RefTensor,
    b: &RefBounds,
    layer: usize,
    table: &PageTable,
    blocks: std::ops::Range<usize>,
    spread: f32,
    out: &mut RefTensor,
) {
    let d = b.layout.head_dim;
    let qh = q.cols / d;
    part_scores(q, b, layer, table, blocks, qh, spread, out);
}

/// As the GPU's `group_query` and `group_scores`: a row per KV head, the
/// group's summed query parts against each block's maxima and minima (Quest's
/// bound, summed).
pub(super) fn group_scores(
    q: &RefTensor,
    b: &RefBounds,
    layer: usize,
    table: &PageTable,
    blocks: std::ops::Range<usize>,
    out: &mut RefTensor,
) {
    part_scores(q, b, layer, table, blocks, b.layout.kv_heads, 1.0, out);
}

/// `out[r][b]` = sum_i (P_i M_i + N_i m_i), P = (q + a |q|) / 2 and
/// N = (q - a |q|) / 2 summed over row r's query heads (`rows` rows, each a
/// run of consecutive heads of one KV head).
#[allow(clippy::too_many_arguments)]
fn part_scores(
    q: &RefTensor,
    b: &RefBounds,
    layer: usize,
    table: &PageTable,
    blocks: std::ops::Range<usize>,
    rows: usize,
    alpha: f32,
    out: &mut RefTensor,
) {
    let d = b.layout.head_dim;
    let span = q.cols / d / rows;
    let per_kv = rows / b.layout.kv_heads;
    for r in 0..rows {
        let mut pos = vec![0.0f32; d];
        let mut neg = vec![0.0f32; d];
        for h in r * span..(r + 1) * span {
            for (i, &v) in q.data[h * d..(h + 1) * d].iter().enumerate() {
                pos[i] += 0.5 * (v + alpha * v.abs());
                neg[i] += 0.5 * (v - alpha * v.abs());
            }
        }
        for blk in blocks.clone() {
            let o = b.offset(table, blk, r / per_kv);
            let m = &b.data[layer][o..o + 2 * d];
            out.data[r * blocks.len() + blk - blocks.start] =
                (0..d).map(|i| pos[i] * m[i] + neg[i] * m[d + i]).sum();
        }
    }
}

/// The order-preserving u32 key of a float (as `group_keys` writes it).
fn ordered_key(v: f32) -> u32 {
    let b = v.to_bits();
    if b & 0x8000_0000 != 0 {
        !b
    } else {
        b | 0x8000_0000
    }
}

pub(super) fn top_k(scores: &RefTensor, kv_heads: usize, n: usize, k: usize, out: &mut [u32]) {
    let group = scores.rows / kv_heads;
    for g in 0..kv_heads {
        let keys: Vec<u32> = (0..n)
            .map(|b| {
                ordered_key(
                    (g * group..(g + 1) * group)
                        .map(|h| scores.data[h * n + b])
                        .fold(0.0f32, |a, v| a + v),
                )
            })
            .collect();
        let mut idx: Vec<u32> = (0..n as u32).collect();
        idx.sort_by(|&a, &b| keys[b as usize].cmp(&keys[a as usize]).then(a.cmp(&b)));
        idx.truncate(k);
        idx.sort_unstable();
        out[g * k..(g + 1) * k].copy_from_slice(&idx);
    }
}

pub(super) fn token_scores(
    q: &RefTensor,
    kv: &RefKv,
    layer: usize,
    table: &PageTable,
    n: usize,
    rope: &RefRope,
    out: &mut RefTensor,
) {
    let d = kv.layout.head_dim;
    let half = d / 2;
    let kvh = kv.layout.kv_heads;
    let group = q.cols / d / kvh;
    for g in 0..kvh {
        // The group's summed query: (sum_h q_h) . k = sum_h q_h . k.
        let mut qv = vec![0.0f32; d];
        for h in g * group..(g + 1) * group {
            for (a, b) in qv.iter_mut().zip(&q.data[h * d..(h + 1) * d]) {
                *a += b;
            }
        }
        for t in 0..n {
            let off = kv.offset(table, t, g);
            let k = &kv.k[layer][off..off + d];
            let cs = rope.row(t);
            let mut s = 0.0f32;
            for i in 0..half {
                let (lo, hi) = (k[i], k[i + half]);
                s += qv[i] * (lo * cs[i][0] - hi * cs[i][1])
                    + qv[i + half] * (hi * cs[i][0] + lo * cs[i][1]);
            }
            out.data[g * n + t] = s;
        }
    }
}
