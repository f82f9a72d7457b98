//! Dense causal attention on the CPU: keys rotated at their positions, f32 softmax.

use super::{dot, rotate, RefKv, RefRope, RefTensor};
use crate::attention::PageTable;
use rayon::prelude::*;

/// Rotated keys `[kv_len, D]` and values of one KV head.
fn gather_head(
    kv: &RefKv,
    layer: usize,
    table: &PageTable,
    kvh: usize,
    kv_len: usize,
    rope: &RefRope,
) -> (Vec<f32>, Vec<f32>) {
    let d = kv.layout.head_dim;
    let mut k = vec![0.0; kv_len * d];
    let mut v = vec![0.0; kv_len * d];
    for j in 0..kv_len {
        let off = kv.offset(table, j, kvh);
        k[j * d..(j + 1) * d].copy_from_slice(&kv.k[layer][off..off + d]);
        v[j * d..(j + 1) * d].copy_from_slice(&kv.v[layer][off..off + d]);
        let p = j.min(rope.max_pos - 1);
        rotate(
            &mut k[j * d..(j + 1) * d],
            &rope.cs[p * rope.half..(p + 1) * rope.half],
        );
    }
    (k, v)
}

#[allow(clippy::too_many_arguments)]
pub(super) fn dense(
    q: &RefTensor,
    kv: &RefKv,
    layer: usize,
    table: &PageTable,
    q_start: usize,
    kv_len: usize,
    rope: &RefRope,
    out: &mut RefTensor,
) {
    let d = kv.layout.head_dim;
    let hk = kv.layout.kv_heads;
    let qh = q.cols / d;
    let group = qh / hk;
    let scale = 1.0 / (d as f32).sqrt();
    let heads: Vec<(Vec<f32>, Vec<f32>)> = (0..hk)
        .into_par_iter()
        .map(|h| gather_head(kv, layer, table, h, kv_len, rope))
        .collect();
    out.data
        .par_chunks_mut(q.cols)
        .enumerate()
        .for_each(|(i, orow)| {
            let visible = (q_start + i + 1).min(kv_len);
            let mut s = vec![0.0f32; visible];
            for h in 0..qh {
                let (k, v) = &heads[h / group];
                let qv = &q.data[i * q.cols + h * d..i * q.cols + (h + 1) * d];
                let mut m = f32::NEG_INFINITY;
                for j in 0..visible {
                    s[j] = dot(qv, &k[j * d..(j + 1) * d]) * scale;
                    m = m.max(s[j]);
                }
                let mut l = 0.0;
                for x in s.iter_mut() {
                    *x = (*x - m).exp();
                    l += *x;
                }
                let o = &mut orow[h * d..(h + 1) * d];
                o.iter_mut().for_each(|x| *x = 0.0);
                for j in 0..visible {
                    let p = s[j] / l;
                    for (oi, &vi) in o.iter_mut().zip(&v[j * d..(j + 1) * d]) {
                        *oi += p * vi;
                    }
                }
            }
        });
}
