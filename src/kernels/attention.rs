//! Dense attention over the paged KV cache: split-KV flash decoding
//! (`attention_decode.wgsl`) and causal flash attention for prefill chunks
//! (`attention_prefill.wgsl`). A cache spanning several arena buffers is handled
//! with one pass per arena, the online-softmax state carried between passes.

use super::{GpuExecutor, GpuIds, GpuKv, GpuRope, GpuTensor};
use crate::error::{shape_err, Result};
use crate::gpu::Binding;
use crate::kv::PageTable;
use crate::ops::{check, KeyList};
use crate::shaders;
use std::ops::Range;

/// Loop iterations one 64-key tile of `decode_partial` costs a thread (loop
/// trip counts of its phases), and one 16-key tile of `prefill`.
fn decode_tile_iterations(head_dim: usize, group: usize) -> u64 {
    ((head_dim / 4) * (1 + group) + 2 * 64 + 8 * 65 + 16) as u64
}
fn decode_lanes_key_iterations(head_dim: usize) -> u64 {
    (head_dim / 8 + head_dim / 4 + 2) as u64
}
fn prefill_tile_iterations(head_dim: usize) -> u64 {
    (2 * 16 * (1 + head_dim / 4) + head_dim / 4 + 16 + 8) as u64
}
/// Share of the driver's loop limit the main loop may use: the estimates above
/// count trip counts, and the limiter's exact accounting is the driver's.
fn loop_budget(limit: u64) -> u64 {
    limit / 2
}

/// Split length (multiple of 64) for decoding `kv_len` tokens.
pub(crate) fn decode_split(
    ex: &GpuExecutor,
    kv_len: usize,
    kv_heads: usize,
    head_dim: usize,
    group: usize,
) -> usize {
    // Per-thread kernel: one thread per (split, query head); aim for 2 workgroups
    // of 64 threads per CPU thread. Cooperative kernel: decode_workgroups groups.
    let target = if ex.tuning.per_thread_kernels {
        (128 * ex.tuning.cpu_threads.max(1) / (kv_heads * group)).max(1)
    } else {
        (ex.tuning.decode_workgroups / kv_heads).max(1)
    };
    let min_split = if ex.tuning.per_thread_kernels {
        64
    } else {
        ex.tuning.decode_min_split
    };
    let mut split = kv_len.div_ceil(target).max(min_split).div_ceil(64) * 64;
    if let Some(limit) = ex.tuning.loop_limit {
        let budget = loop_budget(limit);
        let max_keys = if ex.tuning.per_thread_kernels {
            budget / decode_lanes_key_iterations(head_dim)
        } else {
            budget / decode_tile_iterations(head_dim, group) * 64
        };
        split = split.min((max_keys as usize / 64).max(1) * 64);
    }
    split
}

/// Keys one prefill pass may cover (unbounded where the driver has no loop limit).
pub(crate) fn prefill_keys_per_pass(ex: &GpuExecutor, head_dim: usize) -> usize {
    match ex.tuning.loop_limit {
        Some(limit) => {
            ((loop_budget(limit) / prefill_tile_iterations(head_dim)).max(1) * 16) as usize
        }
        None => usize::MAX,
    }
}

#[allow(clippy::too_many_arguments)]
pub(super) fn decode(
    ex: &mut GpuExecutor,
    q: &GpuTensor,
    kv: &GpuKv,
    layer: usize,
    table: &PageTable,
    kv_len: usize,
    rope: &GpuRope,
    out: &mut GpuTensor,
) -> Result<()> {
    if q.rows != 1 {
        return shape_err(
            "attention_decode",
            format!("{} query rows, expected 1", q.rows),
        );
    }
    let l = kv.layout;
    let q_start = kv_len.saturating_sub(1);
    let dims = ((q.rows, q.cols), (out.rows, out.cols));
    let qh = check::attention(
        "attention_decode",
        &l,
        layer,
        table,
        dims.0,
        dims.1,
        q_start,
        kv_len,
        rope.max_pos,
    )?;
    decode_impl(ex, q, kv, layer, table, qh, kv_len, kv_len, None, rope, out)
}

/// Sparse decode over a key list (TokenSelect): the same kernels in list mode.
#[allow(clippy::too_many_arguments)]
pub(super) fn decode_list(
    ex: &mut GpuExecutor,
    q: &GpuTensor,
    kv: &GpuKv,
    layer: usize,
    table: &PageTable,
    seq_len: usize,
    list: &KeyList<'_, GpuIds>,
    rope: &GpuRope,
    out: &mut GpuTensor,
) -> Result<()> {
    let qh = check::attention_decode_list(
        &kv.layout,
        layer,
        table,
        (q.rows, q.cols),
        (out.rows, out.cols),
        seq_len,
        list,
        list.selected.len,
        rope.max_pos,
    )?;
    decode_impl(
        ex,
        q,
        kv,
        layer,
        table,
        qh,
        list.len(),
        seq_len,
        Some(list),
        rope,
        out,
    )
}

#[allow(clippy::too_many_arguments)]
fn decode_impl(
    ex: &mut GpuExecutor,
    q: &GpuTensor,
    kv: &GpuKv,
    layer: usize,
    table: &PageTable,
    qh: usize,
    ranks: usize,
    seq_len: usize,
    list: Option<&KeyList<'_, GpuIds>>,
    rope: &GpuRope,
    out: &mut GpuTensor,
) -> Result<()> {
    let l = kv.layout;
    let d = l.head_dim;
    let split = decode_split(ex, ranks, l.kv_heads, d, qh / l.kv_heads);
    let n_splits = ranks.div_ceil(split);
    let part = ex.scratch("decode partials", (qh * n_splits * (d + 2) * 4) as u64)?;
    let sel = match list {
        Some(li) => li.selected.buf.clone(),
        None => ex.scratch("no selection", 16)?,
    };
    let pages = ex.page_table(table);
    let lanes = ex.tuning.per_thread_kernels;
    let entry = if lanes {
        "decode_lanes"
    } else {
        "decode_partial"
    };
    let p = ex.pipeline(shaders::ATTENTION_DECODE, entry, &[]);
    let groups = if lanes {
        ex.grid((qh * n_splits).div_ceil(64))?
    } else {
        [n_splits as u32, l.kv_heads as u32, 1]
    };
    let scale = 1.0f32 / (d as f32).sqrt();
    for (i, &a) in kv.arenas_for(table, 0..seq_len).iter().enumerate() {
        let mut params = vec![
            ranks as u32,
            qh as u32,
            l.kv_heads as u32,
            d as u32,
            l.page_size as u32,
            split as u32,
            n_splits as u32,
            (a * kv.pages_per_arena) as u32,
            kv.pages_per_arena as u32,
            u32::from(i == 0),
            scale.to_bits(),
            rope.max_pos as u32,
        ];
        params.extend(list_params(list, 1));
        let b = [
            Binding::from(&q.buf),
            Binding::from(&kv.k[layer][a]),
            Binding::from(&kv.v[layer][a]),
            Binding::from(&pages),
            Binding::from(&rope.buf),
            Binding::from(&part),
            Binding::from(&sel),
        ];
        ex.rec.dispatch(&p, &params, &b, groups);
    }
    let r = ex.pipeline(shaders::ATTENTION_DECODE, "decode_reduce", &[]);
    ex.rec.dispatch(
        &r,
        super::params::DecodeReduceParams {
            q_heads: qh as u32,
            head_dim: d as u32,
            n_splits: n_splits as u32,
            _p0: 0,
        }
        .words(),
        &[Binding::from(&part), Binding::from(&out.buf)],
        [qh as u32, 1, 1],
    );
    Ok(())
}

#[allow(clippy::too_many_arguments)]
pub(super) fn prefill(
    ex: &mut GpuExecutor,
    q: &GpuTensor,
    kv: &GpuKv,
    layer: usize,
    table: &PageTable,
    q_start: usize,
    kv_len: usize,
    rope: &GpuRope,
    out: &mut GpuTensor,
) -> Result<()> {
    let qh = check::attention(
        "attention_prefill",
        &kv.layout,
        layer,
        table,
        (q.rows, q.cols),
        (out.rows, out.cols),
        q_start,
        kv_len,
        rope.max_pos,
    )?;
    let rows = 0..q.rows;
    prefill_impl(
        ex,
        q,
        kv,
        layer,
        table,
        qh,
        rows,
        q_start,
        kv_len,
        kv_len,
        Keys::Dense,
        rope,
        out,
    )
}

/// Sparse prefill over a key list (TokenSelect sub-chunks): the same kernel in list mode.
#[allow(clippy::too_many_arguments)]
pub(super) fn prefill_list(
    ex: &mut GpuExecutor,
    q: &GpuTensor,
    kv: &GpuKv,
    layer: usize,
    table: &PageTable,
    rows: Range<usize>,
    q_start: usize,
    list: &KeyList<'_, GpuIds>,
    rope: &GpuRope,
    out: &mut GpuTensor,
) -> Result<()> {
    let qh = check::attention_list(
        "attention_prefill_list",
        &kv.layout,
        layer,
        table,
        (q.rows, q.cols),
        (out.rows, out.cols),
        &rows,
        q_start,
        list,
        list.selected.len,
        rope.max_pos,
    )?;
    let seq_len = q_start + rows.len();
    prefill_impl(
        ex,
        q,
        kv,
        layer,
        table,
        qh,
        rows,
        q_start,
        list.len(),
        seq_len,
        Keys::List(list),
        rope,
        out,
    )
}

/// Tree attention for speculative verification: the prefill kernel in tree mode.
#[allow(clippy::too_many_arguments)]
pub(super) fn tree(
    ex: &mut GpuExecutor,
    q: &GpuTensor,
    kv: &GpuKv,
    layer: usize,
    table: &PageTable,
    prefix_len: usize,
    mask: &GpuIds,
    list: Option<&KeyList<'_, GpuIds>>,
    rope: &GpuRope,
    out: &mut GpuTensor,
) -> Result<()> {
    let qh = check::attention_tree(
        &kv.layout,
        layer,
        table,
        (q.rows, q.cols),
        (out.rows, out.cols),
        prefix_len,
        mask.len,
        list.map(|li| (li, li.selected.len)),
        rope.max_pos,
    )?;
    let seq_len = prefix_len + q.rows;
    let (ranks, keys) = match list {
        Some(li) => (li.len() + q.rows, Keys::TreeList(li, mask)),
        None => (seq_len, Keys::Tree(mask)),
    };
    prefill_impl(
        ex,
        q,
        kv,
        layer,
        table,
        qh,
        0..q.rows,
        prefix_len,
        ranks,
        seq_len,
        keys,
        rope,
        out,
    )
}

/// The key-list words both attention shaders share after their own parameters:
/// mode (0 dense, 1 list, 3 list then tree), sinks, selected count, window
/// start, compact, block size and blocks per KV head (Quest lists), padding.
fn list_params(list: Option<&KeyList<'_, GpuIds>>, mode: u32) -> [u32; 8] {
    match list {
        Some(li) => [
            mode,
            li.n_init as u32,
            li.n_selected as u32,
            li.tail_start as u32,
            u32::from(li.compact),
            li.selection.block() as u32,
            (li.n_selected / li.selection.block().max(1)) as u32,
            0,
        ],
        None => [0; 8],
    }
}

/// Which keys a prefill pass attends to.
#[derive(Clone, Copy)]
enum Keys<'a> {
    /// The first tokens, causally.
    Dense,
    /// The ranks of a key list.
    List(&'a KeyList<'a, GpuIds>),
    /// A prefix plus a draft tree's ancestors (the mask buffer).
    Tree(&'a GpuIds),
    /// A key list over the prefix plus a draft tree's ancestors.
    TreeList(&'a KeyList<'a, GpuIds>, &'a GpuIds),
}

/// Passes of `attention_prefill.wgsl` over ranks `0..ranks` (the first `ranks`
/// tokens, or the ranks of `list`) for query rows `rows` at logical `q_start..`.
#[allow(clippy::too_many_arguments)]
fn prefill_impl(
    ex: &mut GpuExecutor,
    q: &GpuTensor,
    kv: &GpuKv,
    layer: usize,
    table: &PageTable,
    qh: usize,
    rows: Range<usize>,
    q_start: usize,
    ranks: usize,
    seq_len: usize,
    keys: Keys<'_>,
    rope: &GpuRope,
    out: &mut GpuTensor,
) -> Result<()> {
    let l = kv.layout;
    let d = l.head_dim;
    let n_q = rows.len();
    // Passes over (rank range, arena) pairs that hold keys of that range; a list
    // may point anywhere before the tail, so it visits every arena of the sequence.
    let per_pass = prefill_keys_per_pass(ex, d)
        .max(l.page_size)
        .min(ranks.max(1));
    let mut passes = Vec::new();
    let mut begin = 0;
    while begin < ranks {
        let stop = (begin + per_pass).min(ranks);
        let tokens = if matches!(keys, Keys::List(_) | Keys::TreeList(..)) {
            0..seq_len
        } else {
            begin..stop
        };
        let arenas = kv.arenas_for(table, tokens);
        passes.extend(arenas.into_iter().map(|a| (begin, stop, a)));
        begin = stop;
    }
    // The state buffer is only touched when several passes are needed.
    let state_bytes = if passes.len() > 1 {
        (n_q * qh * (d + 2) * 4) as u64
    } else {
        16
    };
    let state = ex.scratch("prefill state", state_bytes)?;
    let none = ex.scratch("no selection", 16)?;
    let (sel, tree) = match keys {
        Keys::List(li) => (li.selected.buf.clone(), none),
        Keys::Tree(mask) => (none, mask.buf.clone()),
        Keys::TreeList(li, mask) => (li.selected.buf.clone(), mask.buf.clone()),
        Keys::Dense => (none.clone(), none),
    };
    let pages = ex.page_table(table);
    let p = ex.pipeline(shaders::ATTENTION_PREFILL, "prefill", &[]);
    let scale = 1.0f32 / (d as f32).sqrt();
    let list_params = match keys {
        Keys::Tree(_) => [2, 0, 0, 0, 0, 0, 0, 0],
        Keys::List(li) => list_params(Some(li), 1),
        Keys::TreeList(li, _) => list_params(Some(li), 3),
        Keys::Dense => list_params(None, 0),
    };
    for (i, &(kv_begin, kv_stop, a)) in passes.iter().enumerate() {
        let mut params = vec![
            n_q as u32,
            q_start as u32,
            ranks as u32,
            qh as u32,
            l.kv_heads as u32,
            d as u32,
            l.page_size as u32,
            (a * kv.pages_per_arena) as u32,
            kv.pages_per_arena as u32,
            u32::from(i == 0),
            u32::from(i + 1 == passes.len()),
            scale.to_bits(),
            rope.max_pos as u32,
            kv_begin as u32,
            kv_stop as u32,
            rows.start as u32,
        ];
        params.extend(list_params);
        let b = [
            Binding::from(&q.buf),
            Binding::from(&kv.k[layer][a]),
            Binding::from(&kv.v[layer][a]),
            Binding::from(&pages),
            Binding::from(&rope.buf),
            Binding::from(&state),
            Binding::from(&out.buf),
            Binding::from(&sel),
            Binding::from(&tree),
        ];
        ex.rec
            .dispatch(&p, &params, &b, [n_q.div_ceil(64) as u32, qh as u32, 1]);
    }
    Ok(())
}
