//! TokenSelect on the CPU: scoring, soft vote, top-k and attention over a key list.

use super::{dot, rotate, RefKv, RefRope, RefTensor};
use crate::attention::PageTable;
use crate::ops::KeyList;
use rayon::prelude::*;

pub(super) fn score(
    q: &RefTensor,
    kv: &RefKv,
    layer: usize,
    table: &PageTable,
    begin: usize,
    n: usize,
    scores: &mut [f32],
) {
    let d = kv.layout.head_dim;
    let qh = q.cols / d;
    let group = qh / kv.layout.kv_heads;
    scores[..qh * n]
        .par_chunks_mut(n)
        .enumerate()
        .for_each(|(h, row)| {
            let qv = &q.data[h * d..(h + 1) * d];
            let g = h / group;
            for (j, s) in row.iter_mut().enumerate() {
                let off = kv.offset(table, begin + j, g);
                *s = dot(qv, &kv.k[layer][off..off + d]);
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
        *v = (0..qh)
            .map(|h| (scores[h * n + j] - stats[h].0).exp() / stats[h].1)
            .sum();
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

/// Logical index and RoPE position of each rank of `list`.
pub fn list_keys(list: &KeyList<'_, Vec<u32>>) -> Vec<(usize, usize)> {
    let mut keys = Vec::with_capacity(list.len());
    for r in 0..list.len() {
        let logical = if r < list.n_init {
            r
        } else if r < list.n_init + list.n_selected {
            list.selected[r - list.n_init] as usize
        } else {
            list.tail_start + (r - list.n_init - list.n_selected)
        };
        keys.push((logical, if list.compact { r } else { logical }));
    }
    keys
}

pub(super) fn attention_list(
    q: &RefTensor,
    kv: &RefKv,
    layer: usize,
    table: &PageTable,
    list: &KeyList<'_, Vec<u32>>,
    rope: &RefRope,
    out: &mut RefTensor,
) {
    let d = kv.layout.head_dim;
    let qh = q.cols / d;
    let group = qh / kv.layout.kv_heads;
    let scale = 1.0 / (d as f32).sqrt();
    let keys = list_keys(list);
    out.data.par_chunks_mut(d).enumerate().for_each(|(h, o)| {
        let g = h / group;
        let qv = &q.data[h * d..(h + 1) * d];
        let mut s: Vec<f32> = keys
            .iter()
            .map(|&(t, pos)| {
                let off = kv.offset(table, t, g);
                let mut k = kv.k[layer][off..off + d].to_vec();
                let p = pos.min(rope.max_pos - 1);
                rotate(&mut k, &rope.cs[p * rope.half..(p + 1) * rope.half]);
                dot(qv, &k) * scale
            })
            .collect();
        let m = s.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
        let mut l = 0.0;
        for x in s.iter_mut() {
            *x = (*x - m).exp();
            l += *x;
        }
        o.iter_mut().for_each(|x| *x = 0.0);
        for (&(t, _), p) in keys.iter().zip(&s) {
            let off = kv.offset(table, t, g);
            for (oi, vi) in o.iter_mut().zip(&kv.v[layer][off..off + d]) {
                *oi += p / l * vi;
            }
        }
    });
}
