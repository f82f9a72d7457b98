//! Dense causal attention on the CPU: keys rotated at their positions, f32 softmax.

use super::{rotate, RefKv, RefRope, RefTensor, RefView};
use crate::kv::PageTable;
use crate::ops::KeyList;
use rayon::prelude::*;

/// Keys (token t rotated at its position p, for each `(t, p)` of `keys`, in
/// order) and values of one KV head, `[keys, D]` each.
pub(super) fn gather_keys(
    kv: &RefKv,
    layer: usize,
    table: &PageTable,
    kvh: usize,
    keys: &[(usize, usize)],
    rope: &RefRope,
) -> (Vec<f32>, Vec<f32>) {
    let d = kv.layout.head_dim;
    let mut k = vec![0.0; keys.len() * d];
    let mut v = vec![0.0; keys.len() * d];
    for (j, &(t, pos)) in keys.iter().enumerate() {
        let off = kv.offset(table, t, kvh);
        k[j * d..(j + 1) * d].copy_from_slice(&kv.k[layer][off..off + d]);
        v[j * d..(j + 1) * d].copy_from_slice(&kv.v[layer][off..off + d]);
        rotate(&mut k[j * d..(j + 1) * d], &rope.row(pos));
    }
    (k, v)
}

/// Rotated keys and values of every KV head g for its list `keys[g]` (one
/// list serves every head).
fn gather(
    kv: &RefKv,
    layer: usize,
    table: &PageTable,
    keys: &[Vec<(usize, usize)>],
    rope: &RefRope,
) -> Vec<(Vec<f32>, Vec<f32>)> {
    (0..kv.layout.kv_heads)
        .into_par_iter()
        .map(|h| gather_keys(kv, layer, table, h, head_keys(keys, h), rope))
        .collect()
}

/// KV head g's list of `keys` (one list serves every head).
fn head_keys(keys: &[Vec<(usize, usize)>], g: usize) -> &[(usize, usize)] {
    &keys[g.min(keys.len() - 1)]
}

/// Query rows up to which [`attend_keys`] reads keys and values where they
/// lie in the cache: decode steps and a prompt's tail rows would otherwise
/// copy and rotate the whole context per call, and the GEMMs pack it again
/// per query head, for a handful of rows.
const STREAM_ROWS: usize = 4;

/// [`attend`] over the keys `keys[g]` of each KV head g (`(token, position)`
/// in rank order; one list serves every head), read from the cache.
pub(super) fn attend_keys(
    q: &[f32],
    q_cols: usize,
    cache: &RefView<'_>,
    keys: &[Vec<(usize, usize)>],
    visible: impl Fn(usize) -> usize + Sync,
    out: &mut [f32],
) {
    let (kv, layer, table, rope) = (cache.kv, cache.layer, cache.table, cache.rope);
    let d = kv.layout.head_dim;
    let rows = q.len() / q_cols;
    if rows == 0 {
        return;
    }
    if rows > STREAM_ROWS {
        let heads = gather(kv, layer, table, keys, rope);
        return attend(q, q_cols, d, &heads, visible, None, out);
    }
    let qh = q_cols / d;
    let group = qh / kv.layout.kv_heads;
    let scale = 1.0 / (d as f32).sqrt();
    let results: Vec<Vec<f32>> = (0..qh)
        .into_par_iter()
        .map(|h| {
            let (g, ks) = (h / group, head_keys(keys, h / group));
            let len = visible(rows - 1).min(ks.len());
            let mut s = vec![0.0f32; rows * len];
            let mut kr = vec![0.0f32; d];
            for (j, &(t, pos)) in ks[..len].iter().enumerate() {
                let off = kv.offset(table, t, g);
                kr.copy_from_slice(&kv.k[layer][off..off + d]);
                rotate(&mut kr, &rope.row(pos));
                for i in 0..rows {
                    s[i * len + j] = scale * super::dot(&q[i * q_cols + h * d..][..d], &kr);
                }
            }
            let mut o = vec![0.0f32; rows * d];
            for (i, (row, orow)) in s.chunks_mut(len.max(1)).zip(o.chunks_mut(d)).enumerate() {
                let vis = visible(i).min(len);
                softmax(&mut row[..vis]);
                for (j, &p) in row[..vis].iter().enumerate() {
                    let off = kv.offset(table, ks[j].0, g);
                    for (o, &v) in orow.iter_mut().zip(&kv.v[layer][off..off + d]) {
                        *o += p * v;
                    }
                }
            }
            o
        })
        .collect();
    for (h, o) in results.iter().enumerate() {
        for (i, orow) in o.chunks(d).enumerate() {
            let at = i * q_cols + h * d;
            out[at..at + d].copy_from_slice(orow);
        }
    }
}

/// Softmax of one row of scores, in place.
fn softmax(row: &mut [f32]) {
    let m = row.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
    let mut l = 0.0;
    for x in row.iter_mut() {
        *x = (*x - m).exp();
        l += *x;
    }
    for x in row.iter_mut() {
        *x /= l;
    }
}

pub(super) fn dense(
    q: &RefTensor,
    cache: &RefView<'_>,
    q_start: usize,
    kv_len: usize,
    out: &mut RefTensor,
) {
    let keys = [(0..kv_len).map(|j| (j, j)).collect()];
    let visible = |i: usize| (q_start + i + 1).min(kv_len);
    attend_keys(&q.data, q.cols, cache, &keys, visible, &mut out.data);
}

/// Tree attention: node i sees the prefix (all `prefix_len` tokens, or the ranks
/// of `list`, whose window ends at `prefix_len`) and its ancestors (`mask` from
/// `DraftTree::mask`). Node j's key sits at slot prefix_len + j, rotated at
/// base + its depth, base being the list length (compact list) or prefix_len.
#[allow(clippy::too_many_arguments)]
pub(super) fn tree(
    q: &RefTensor,
    kv: &RefKv,
    layer: usize,
    table: &PageTable,
    prefix_len: usize,
    mask: &[u32],
    list: Option<&KeyList<'_, Vec<u32>>>,
    rope: &RefRope,
    out: &mut RefTensor,
) {
    let n = q.rows;
    let mut keys = match list {
        Some(li) => super::tokenselect::list_keys(li, 0),
        None => (0..prefix_len).map(|j| (j, j)).collect(),
    };
    let before = keys.len();
    let base = match list {
        Some(li) if li.compact => before,
        _ => prefix_len,
    };
    keys.extend((0..n).map(|j| (prefix_len + j, base + mask[4 * n + j] as usize)));
    let heads = gather(kv, layer, table, &[keys], rope);
    let sees = |i: usize, r: usize| r < before || crate::ops::tree_sees(mask, i, r - before);
    let d = kv.layout.head_dim;
    let visible = |i: usize| before + i + 1;
    attend(
        &q.data,
        q.cols,
        d,
        &heads,
        visible,
        Some(&sees),
        &mut out.data,
    );
}

/// Query rows per task of [`attend`].
const BLOCK: usize = 64;

/// Softmax attention of the query rows in `q` (`[rows, q_cols]`, heads of `d`)
/// over the rotated keys and values of each KV head (`[L, d]` each, query head h
/// using KV head h / group), row i seeing keys `0..visible(i)` (non-decreasing in
/// i) and, with `sees`, only the keys j where `sees(i, j)`, into `out` (same
/// shape). Each (head, block of rows) task is two GEMMs.
pub(super) fn attend(
    q: &[f32],
    q_cols: usize,
    d: usize,
    heads: &[(Vec<f32>, Vec<f32>)],
    visible: impl Fn(usize) -> usize + Sync,
    sees: Option<&(dyn Fn(usize, usize) -> bool + Sync)>,
    out: &mut [f32],
) {
    let rows = q.len() / q_cols;
    let qh = q_cols / d;
    let group = qh / heads.len();
    let scale = 1.0 / (d as f32).sqrt();
    let tasks: Vec<(usize, usize)> = (0..qh)
        .flat_map(|h| (0..rows).step_by(BLOCK).map(move |r| (h, r)))
        .collect();
    let results: Vec<Vec<f32>> = tasks
        .par_iter()
        .map(|&(h, r0)| {
            let b = BLOCK.min(rows - r0);
            let len = visible(r0 + b - 1);
            let (k, v) = &heads[h / group];
            let mut s = vec![0.0f32; b * len];
            let mut o = vec![0.0f32; b * d];
            // SAFETY: q rows r0..r0+b at column h*d (row stride q_cols), K^T [d, len]
            // read from K [len, d], S [b, len] and O [b, d]: all within their vectors.
            unsafe {
                matrixmultiply::sgemm(
                    b,
                    d,
                    len,
                    scale,
                    q.as_ptr().add(r0 * q_cols + h * d),
                    q_cols as isize,
                    1,
                    k.as_ptr(),
                    1,
                    d as isize,
                    0.0,
                    s.as_mut_ptr(),
                    len as isize,
                    1,
                );
            }
            for (i, row) in s.chunks_mut(len).enumerate() {
                let vis = visible(r0 + i).min(len);
                if let Some(sees) = sees {
                    for (j, x) in row[..vis].iter_mut().enumerate() {
                        if !sees(r0 + i, j) {
                            *x = f32::NEG_INFINITY;
                        }
                    }
                }
                softmax(&mut row[..vis]);
                row[vis..].iter_mut().for_each(|x| *x = 0.0);
            }
            // SAFETY: P [b, len], V [len, d], O [b, d], all within their vectors.
            unsafe {
                matrixmultiply::sgemm(
                    b,
                    len,
                    d,
                    1.0,
                    s.as_ptr(),
                    len as isize,
                    1,
                    v.as_ptr(),
                    d as isize,
                    1,
                    0.0,
                    o.as_mut_ptr(),
                    d as isize,
                    1,
                );
            }
            o
        })
        .collect();
    for (&(h, r0), o) in tasks.iter().zip(results) {
        for (i, orow) in o.chunks(d).enumerate() {
            let at = (r0 + i) * q_cols + h * d;
            out[at..at + d].copy_from_slice(orow);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kv::{KvLayout, PageAllocator};
    use crate::ops::RopeConfig;

    /// The streamed path (a few rows) computes what gathering the keys does,
    /// over a paged cache, for the whole context and for a list of keys per
    /// KV head at other positions.
    #[test]
    fn streamed_rows_match_gathered_keys() {
        let layout = KvLayout {
            layers: 1,
            kv_heads: 2,
            head_dim: 8,
            page_size: 4,
            num_pages: 8,
        };
        let mut pages = PageAllocator::new(&layout);
        let mut table = pages.new_sequence();
        pages.reserve(&mut table, 23).unwrap();
        let mut seed = 7u64;
        let mut next = || {
            seed = seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((seed >> 33) as f32 / (1u64 << 31) as f32) * 2.0 - 1.0
        };
        let size = layout.num_pages * layout.kv_heads * layout.page_size * layout.head_dim;
        let kv = RefKv {
            layout,
            k: vec![(0..size).map(|_| next()).collect()],
            v: vec![(0..size).map(|_| next()).collect()],
        };
        let cfg = RopeConfig {
            head_dim: 8,
            theta: 10000.0,
            scaling: None,
            max_positions: 64,
        };
        let rope = RefRope {
            cs: cfg.table().unwrap(),
            half: 4,
            max_pos: 64,
        };
        let q_cols = 4 * 8; // 4 query heads over 2 KV heads
        let dense = vec![(0..23).map(|t| (t, t)).collect::<Vec<_>>()];
        let lists: Vec<Vec<(usize, usize)>> = (0..2)
            .map(|g| (0..23).step_by(2 + g).map(|t| (t, t + 5)).collect())
            .collect();
        for keys in [&dense, &lists] {
            for rows in 1..=STREAM_ROWS {
                let q: Vec<f32> = (0..rows * q_cols).map(|_| next()).collect();
                let shortest = keys.iter().map(Vec::len).min().unwrap();
                let visible = |i: usize| shortest - rows + i + 1;
                let mut streamed = vec![0.0; rows * q_cols];
                let view = RefView::new(&kv, 0, &table, &rope);
                attend_keys(&q, q_cols, &view, keys, visible, &mut streamed);
                let heads = gather(&kv, 0, &table, keys, &rope);
                let mut gathered = vec![0.0; rows * q_cols];
                attend(&q, q_cols, 8, &heads, visible, None, &mut gathered);
                for (a, b) in streamed.iter().zip(&gathered) {
                    assert!((a - b).abs() < 1e-5, "{rows} rows: {a} vs {b}");
                }
            }
        }
    }
}
