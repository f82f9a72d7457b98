//! TokenSelect on the CPU: scoring, soft vote, top-k and attention over a key list.

use super::{attention, dot, RefKv, RefTensor, RefView};
use crate::kv::PageTable;
use crate::ops::{GqaMap, KeyList, Prefilter, NO_SCORE};
use rayon::prelude::*;
use std::ops::Range;

/// Token of slot `j` of a hierarchical selection.
pub(super) fn slot_token(pf: &Prefilter<'_, Vec<u32>>, j: usize) -> usize {
    pf.blocks[j / pf.block] as usize * pf.block + j % pf.block
}

/// The token of each score slot (None: outside `begin..begin + n`).
pub(super) fn slot_tokens(
    begin: usize,
    n: usize,
    pf: Option<&Prefilter<'_, Vec<u32>>>,
) -> Vec<Option<usize>> {
    match pf {
        None => (begin..begin + n).map(Some).collect(),
        Some(pf) => (0..pf.slots())
            .map(|j| Some(slot_token(pf, j)).filter(|t| (begin..begin + n).contains(t)))
            .collect(),
    }
}

/// Scores of every slot (`tokens` from [`slot_tokens`]).
pub(super) fn score(
    q: &RefTensor,
    kv: &RefKv,
    layer: usize,
    table: &PageTable,
    tokens: &[Option<usize>],
    gqa: GqaMap,
    scores: &mut [f32],
) {
    let d = kv.layout.head_dim;
    let qh = q.cols / d;
    let n = tokens.len();
    scores[..qh * n]
        .par_chunks_mut(n)
        .enumerate()
        .for_each(|(h, row)| {
            let qv = &q.data[h * d..(h + 1) * d];
            let g = gqa.kv_head(h, qh, kv.layout.kv_heads);
            for (t, s) in tokens.iter().zip(row.iter_mut()) {
                *s = match t {
                    Some(t) => {
                        let off = kv.offset(table, *t, g);
                        dot(qv, &kv.k[layer][off..off + d])
                    }
                    None => NO_SCORE,
                };
            }
        });
}

pub(super) fn vote(scores: &[f32], qh: usize, n: usize, votes: &mut [f32]) {
    let stats: Vec<(f32, f32)> = (0..qh)
        .map(|h| {
            let row = &scores[h * n..(h + 1) * n];
            let m = row.iter().cloned().fold(-3.0e38f32, f32::max);
            (m, row.iter().map(|s| (s - m).exp()).sum())
        })
        .collect();
    votes[..n].par_iter_mut().enumerate().for_each(|(j, v)| {
        let sum: f32 = (0..qh)
            .map(|h| (scores[h * n + j] - stats[h].0).exp() / stats[h].1)
            .sum();
        // As the kernel: a floor for real candidates, 0 outside the range.
        *v = if scores[j] <= NO_SCORE {
            0.0
        } else {
            sum.max(1e-30)
        };
    });
}

/// The k largest votes (by their bits; ties to the lower index), ascending indices.
pub fn top_k(votes: &[f32], k: usize, begin: usize) -> Vec<u32> {
    let mut idx: Vec<u32> = (0..votes.len() as u32).collect();
    let key = |i: &u32| votes[*i as usize].to_bits();
    let k = k.min(idx.len());
    if k < idx.len() {
        idx.select_nth_unstable_by(k, |a, b| key(b).cmp(&key(a)).then(a.cmp(b)));
    }
    idx.truncate(k);
    idx.sort_unstable();
    idx.into_iter().map(|i| i + begin as u32).collect()
}

/// Logical index and RoPE position of each rank of `list`
/// for KV head `kvh` (which matters only for per-head block lists).
pub fn list_keys(list: &KeyList<'_, Vec<u32>>, kvh: usize) -> Vec<(usize, usize)> {
    let mut keys = Vec::with_capacity(list.len());
    let per_head = list.n_selected / list.selection.block().max(1);
    for r in 0..list.len() {
        let logical = if r < list.n_init {
            r
        } else if r < list.n_init + list.n_selected {
            let i = r - list.n_init;
            match list.selection.block() {
                0 => list.selected[i] as usize,
                b => list.selected[kvh * per_head + i / b] as usize * b + i % b,
            }
        } else {
            list.tail_start + (r - list.n_init - list.n_selected)
        };
        keys.push((logical, if list.compact { r } else { logical }));
    }
    keys
}

/// Causal attention of query rows `rows` (logical `q_start..`) over `list`.
pub(super) fn attention_list(
    q: &RefTensor,
    cache: &RefView<'_>,
    rows: Range<usize>,
    q_start: usize,
    list: &KeyList<'_, Vec<u32>>,
    out: &mut RefTensor,
) {
    let keys: Vec<_> = (0..cache.kv.layout.kv_heads)
        .map(|g| list_keys(list, g))
        .collect();
    let before_tail = list.n_init + list.n_selected;
    let w = q.cols;
    let visible = |i: usize| before_tail + q_start + i + 1 - list.tail_start;
    let rows = rows.start * w..rows.end * w;
    attention::attend_keys(
        &q.data[rows.clone()],
        w,
        cache,
        &keys,
        visible,
        &mut out.data[rows],
    );
}
