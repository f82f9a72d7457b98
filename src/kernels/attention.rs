//! Dense attention over the paged KV cache: split-KV flash decoding
//! (`attention_decode.wgsl`) and causal flash attention for prefill chunks
//! (`attention_prefill.wgsl`). A cache spanning several arena buffers is handled
//! with one pass per arena, the online-softmax state carried between passes.

use super::params::{AttentionDecodeParams, AttentionPrefillParams, DecodeReduceParams};
use super::{GpuExecutor, GpuIds, GpuTensor, GpuView};
use crate::error::Result;
use crate::gpu::Binding;
use crate::ops::KeyList;
use crate::shaders;
use std::ops::Range;

/// Loop iterations one 64-key tile of `decode_partial` costs a thread (loop
/// trip counts of its phases), and one `tk`-key tile of `prefill`.
fn decode_tile_iterations(head_dim: usize, group: usize) -> u64 {
    ((head_dim / 4) * (1 + group) + 2 * 64 + 8 * 65 + 16) as u64
}
fn decode_lanes_key_iterations(head_dim: usize) -> u64 {
    (head_dim / 8 + head_dim / 4 + 2) as u64
}
fn prefill_tile_iterations(head_dim: usize, tk: usize) -> u64 {
    (2 * tk * (1 + head_dim / 4) + head_dim / 4 + tk + 8) as u64
}
/// Share of the driver's loop limit the main loop may use: the estimates above
/// count trip counts, and the limiter's exact accounting is the driver's.
fn loop_budget(limit: u64) -> u64 {
    limit / 2
}

/// How many splits decoding aims for once the context is long enough.
fn decode_target_splits(ex: &GpuExecutor, kv_heads: usize, group: usize) -> usize {
    // Per-thread kernel: one thread per (split, query head); aim for 2 workgroups
    // of 64 threads per CPU thread. Cooperative kernel: decode_workgroups groups.
    if ex.tuning.per_thread_kernels {
        (128 * ex.tuning.cpu_threads.max(1) / (kv_heads * group)).max(1)
    } else {
        (ex.tuning.decode_workgroups / kv_heads).max(1)
    }
}

/// Split length for decoding `kv_len` tokens (a multiple of 64 for the
/// cooperative kernel, of 16 for the per-thread one).
pub(crate) fn decode_split(
    ex: &GpuExecutor,
    kv_len: usize,
    kv_heads: usize,
    head_dim: usize,
    group: usize,
) -> usize {
    let target = decode_target_splits(ex, kv_heads, group);
    // The per-thread kernel takes splits of any length: short ones at short
    // contexts fill the CPU's threads (64-token splits left one busy below
    // ~1,800 tokens); up to 32 tokens one split, which stores its output
    // itself, saves the reduce dispatch. The cooperative kernel runs 64-key
    // tiles.
    let (min_split, unit) = if ex.tuning.per_thread_kernels {
        (if kv_len <= 32 { 32 } else { 16 }, 16)
    } else {
        (ex.tuning.decode_min_split, 64)
    };
    let mut split = kv_len.div_ceil(target).max(min_split).div_ceil(unit) * unit;
    if let Some(limit) = ex.tuning.loop_limit {
        let budget = loop_budget(limit);
        let max_keys = if ex.tuning.per_thread_kernels {
            budget / decode_lanes_key_iterations(head_dim)
        } else {
            budget / decode_tile_iterations(head_dim, group) * 64
        };
        split = split.min((max_keys as usize / unit).max(1) * unit);
    }
    split
}

/// Keys per tile of `prefill` (its `TK`, at most 16): the K and V tiles (f32,
/// head_dim wide) and a flag per key must fit the adapter's workgroup memory
/// (WebGPU's default 16 KiB holds 15 keys at head_dim 128).
pub(crate) fn prefill_tile_keys(ex: &GpuExecutor, head_dim: usize) -> usize {
    let max = ex.ctx.limits.max_compute_workgroup_storage_size as usize;
    let per_key = 2 * head_dim * 4 + 4;
    (max / per_key).clamp(1, 16)
}

/// Keys one prefill pass may cover (unbounded where the driver has no loop limit).
pub(crate) fn prefill_keys_per_pass(ex: &GpuExecutor, head_dim: usize) -> usize {
    let tk = prefill_tile_keys(ex, head_dim);
    match ex.tuning.loop_limit {
        Some(limit) => {
            (loop_budget(limit) / prefill_tile_iterations(head_dim, tk)).max(1) as usize * tk
        }
        None => usize::MAX,
    }
}

pub(super) fn decode(
    ex: &mut GpuExecutor,
    q: &GpuTensor,
    cache: &GpuView<'_>,
    kv_len: usize,
    out: &mut GpuTensor,
) -> Result<()> {
    decode_impl(ex, q, cache, kv_len, kv_len, None, out)
}

/// Sparse decode over a key list (TokenSelect, Quest, Tidal): the same
/// kernels in list mode.
pub(super) fn decode_list(
    ex: &mut GpuExecutor,
    q: &GpuTensor,
    cache: &GpuView<'_>,
    seq_len: usize,
    list: &KeyList<'_, GpuIds>,
    out: &mut GpuTensor,
) -> Result<()> {
    decode_impl(ex, q, cache, list.len(), seq_len, Some(list), out)
}

/// Split-KV decoding over ranks `0..ranks` (the first tokens, or the ranks of
/// `list`) of a sequence of `seq_len` tokens.
fn decode_impl(
    ex: &mut GpuExecutor,
    q: &GpuTensor,
    cache: &GpuView<'_>,
    ranks: usize,
    seq_len: usize,
    list: Option<&KeyList<'_, GpuIds>>,
    out: &mut GpuTensor,
) -> Result<()> {
    let (kv, rope) = (cache.kv, cache.rope);
    let l = kv.layout;
    let d = l.head_dim;
    let qh = q.cols / d;
    let split = decode_split(ex, ranks, l.kv_heads, d, qh / l.kv_heads);
    let n_splits = ranks.div_ceil(split);
    // Sized for the target split count at once, so the buffer (and the bind
    // groups that hold it) stays the same while a short context grows.
    let slots = n_splits.max(decode_target_splits(ex, l.kv_heads, qh / l.kv_heads));
    let part = ex.scratch("decode partials", (qh * slots * (d + 2) * 4) as u64)?;
    let sel = match list {
        Some(li) => li.selected.buf.clone(),
        None => ex.scratch("no selection", 16)?,
    };
    let pages = ex.page_table(cache.table)?;
    let lanes = ex.tuning.per_thread_kernels;
    let entry = if lanes {
        "decode_lanes"
    } else {
        "decode_partial"
    };
    let lw = ListWords::new(list, 1);
    let p = ex.pipeline(shaders::ATTENTION_DECODE, entry, &lw.constants());
    let groups = if lanes {
        ex.grid((qh * n_splits).div_ceil(64))?
    } else {
        [n_splits as u32, l.kv_heads as u32, 1]
    };
    let arenas = kv.arenas_for(cache.table, 0..seq_len);
    // One split in one pass: the kernel stores the output itself, no reduce.
    let direct = n_splits == 1 && arenas.len() == 1;
    let dst = if direct { &out.buf } else { &part };
    for (i, &a) in arenas.iter().enumerate() {
        let params = AttentionDecodeParams {
            kv_len: ranks as u32,
            q_heads: qh as u32,
            kv_heads: l.kv_heads as u32,
            head_dim: d as u32,
            page_size: l.page_size as u32,
            split_len: split as u32,
            n_splits: n_splits as u32,
            arena_first_page: (a * kv.pages_per_arena) as u32,
            arena_pages: kv.pages_per_arena as u32,
            first_pass: u32::from(i == 0),
            scale: 1.0 / (d as f32).sqrt(),
            max_pos: rope.max_pos as u32,
            direct: u32::from(direct),
            n_init: lw.n_init,
            n_sel: lw.n_sel,
            tail_start: lw.tail_start,
            _p1: 0,
            block: lw.block,
            blocks_per_head: lw.blocks_per_head,
            _p2: 0,
        };
        let b = [
            Binding::from(&q.buf),
            Binding::from(&kv.k[cache.layer][a]),
            Binding::from(&kv.v[cache.layer][a]),
            Binding::from(&pages),
            Binding::from(&rope.buf),
            Binding::from(dst),
            Binding::from(&sel),
        ];
        ex.rec.dispatch(&p, params.words(), &b, groups);
    }
    if direct {
        return Ok(());
    }
    let r = ex.pipeline(shaders::ATTENTION_DECODE, "decode_reduce", &[]);
    ex.rec.dispatch(
        &r,
        DecodeReduceParams {
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

pub(super) fn prefill(
    ex: &mut GpuExecutor,
    q: &GpuTensor,
    cache: &GpuView<'_>,
    q_start: usize,
    kv_len: usize,
    out: &mut GpuTensor,
) -> Result<()> {
    let rows = 0..q.rows;
    let keys = Ranks {
        ranks: kv_len,
        seq_len: kv_len,
        keys: Keys::Dense,
    };
    prefill_impl(ex, q, cache, rows, q_start, keys, out)
}

/// Sparse prefill over a key list (TokenSelect sub-chunks, Quest): the same
/// kernel in list mode.
pub(super) fn prefill_list(
    ex: &mut GpuExecutor,
    q: &GpuTensor,
    cache: &GpuView<'_>,
    rows: Range<usize>,
    q_start: usize,
    list: &KeyList<'_, GpuIds>,
    out: &mut GpuTensor,
) -> Result<()> {
    let keys = Ranks {
        ranks: list.len(),
        seq_len: q_start + rows.len(),
        keys: Keys::List(list),
    };
    prefill_impl(ex, q, cache, rows, q_start, keys, out)
}

/// Tree attention for speculative verification: the prefill kernel in tree mode.
pub(super) fn tree(
    ex: &mut GpuExecutor,
    q: &GpuTensor,
    cache: &GpuView<'_>,
    prefix_len: usize,
    mask: &GpuIds,
    list: Option<&KeyList<'_, GpuIds>>,
    out: &mut GpuTensor,
) -> Result<()> {
    let seq_len = prefix_len + q.rows;
    let keys = match list {
        Some(li) => Ranks {
            ranks: li.len() + q.rows,
            seq_len,
            keys: Keys::TreeList(li, mask),
        },
        None => Ranks {
            ranks: seq_len,
            seq_len,
            keys: Keys::Tree(mask),
        },
    };
    prefill_impl(ex, q, cache, 0..q.rows, prefix_len, keys, out)
}

/// The key-list fields both attention shaders share after their own
/// parameters: sinks, selected count, window start, block size and blocks per
/// KV head (Quest lists); and the two override constants that specialise the
/// pipeline: mode (0 dense, 1 list, 2 tree, 3 list then tree) and compact
/// positions.
#[derive(Default)]
struct ListWords {
    mode: u32,
    n_init: u32,
    n_sel: u32,
    tail_start: u32,
    compact: bool,
    block: u32,
    blocks_per_head: u32,
}

impl ListWords {
    fn new(list: Option<&KeyList<'_, GpuIds>>, mode: u32) -> Self {
        match list {
            Some(li) => Self {
                mode,
                n_init: li.n_init as u32,
                n_sel: li.n_selected as u32,
                tail_start: li.tail_start as u32,
                compact: li.compact,
                block: li.selection.block() as u32,
                blocks_per_head: (li.n_selected / li.selection.block().max(1)) as u32,
            },
            None => Self::default(),
        }
    }

    /// `LIST_MODE` and `COMPACT`; compact only matters in list modes, so dense
    /// and tree passes share one pipeline whatever the list says.
    fn constants(&self) -> [(&'static str, f64); 2] {
        let compact = self.compact && (self.mode == 1 || self.mode == 3);
        [
            ("LIST_MODE", f64::from(self.mode)),
            ("COMPACT", super::flag(compact)),
        ]
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

/// The keys of a prefill: `ranks` of them (the first tokens, or the ranks of
/// a list) in a sequence of `seq_len` tokens.
struct Ranks<'a> {
    ranks: usize,
    seq_len: usize,
    keys: Keys<'a>,
}

/// Passes of `attention_prefill.wgsl` over the ranks of `keys` for query rows
/// `rows` at logical `q_start..`.
fn prefill_impl(
    ex: &mut GpuExecutor,
    q: &GpuTensor,
    cache: &GpuView<'_>,
    rows: Range<usize>,
    q_start: usize,
    keys: Ranks<'_>,
    out: &mut GpuTensor,
) -> Result<()> {
    let (kv, rope) = (cache.kv, cache.rope);
    let Ranks {
        ranks,
        seq_len,
        keys,
    } = keys;
    let l = kv.layout;
    let d = l.head_dim;
    let qh = q.cols / d;
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
        let arenas = kv.arenas_for(cache.table, tokens);
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
    // One binding holds the selection and the tree (WebGPU's 8 storage buffers
    // per stage): under a list and a tree both, they are copied into one buffer.
    let (key_buf, tree_off) = match keys {
        Keys::List(li) => (li.selected.buf.clone(), 0),
        Keys::Tree(mask) => (mask.buf.clone(), 0),
        Keys::TreeList(li, mask) => {
            let (sel, tree) = (&li.selected.buf, &mask.buf);
            let both = ex.scratch("prefill keys", sel.size() + tree.size())?;
            ex.rec.copy(sel, 0, &both, 0, sel.size());
            ex.rec.copy(tree, 0, &both, sel.size(), tree.size());
            (both, (sel.size() / 4) as u32)
        }
        Keys::Dense => (ex.scratch("no selection", 16)?, 0),
    };
    let pages = ex.page_table(cache.table)?;
    let lw = match keys {
        Keys::Tree(_) => ListWords {
            mode: 2,
            ..ListWords::default()
        },
        Keys::List(li) => ListWords::new(Some(li), 1),
        Keys::TreeList(li, _) => ListWords::new(Some(li), 3),
        Keys::Dense => ListWords::default(),
    };
    let tk = prefill_tile_keys(ex, d);
    let constants: Vec<_> = lw
        .constants()
        .into_iter()
        .chain([("TK", tk as f64), ("D4_MAX", (d / 4) as f64)])
        .collect();
    let p = ex.pipeline(shaders::ATTENTION_PREFILL, "prefill", &constants);
    for (i, &(kv_begin, kv_stop, a)) in passes.iter().enumerate() {
        let params = AttentionPrefillParams {
            n_q: n_q as u32,
            q_start: q_start as u32,
            kv_len: ranks as u32,
            q_heads: qh as u32,
            kv_heads: l.kv_heads as u32,
            head_dim: d as u32,
            page_size: l.page_size as u32,
            arena_first_page: (a * kv.pages_per_arena) as u32,
            arena_pages: kv.pages_per_arena as u32,
            first_pass: u32::from(i == 0),
            last_pass: u32::from(i + 1 == passes.len()),
            scale: 1.0 / (d as f32).sqrt(),
            max_pos: rope.max_pos as u32,
            kv_begin: kv_begin as u32,
            kv_stop: kv_stop as u32,
            row0: rows.start as u32,
            tree_off,
            n_init: lw.n_init,
            n_sel: lw.n_sel,
            tail_start: lw.tail_start,
            _p1: 0,
            block: lw.block,
            blocks_per_head: lw.blocks_per_head,
            _p2: 0,
        };
        let b = [
            Binding::from(&q.buf),
            Binding::from(&kv.k[cache.layer][a]),
            Binding::from(&kv.v[cache.layer][a]),
            Binding::from(&pages),
            Binding::from(&rope.buf),
            Binding::from(&state),
            Binding::from(&out.buf),
            Binding::from(&key_buf),
        ];
        let groups = [n_q.div_ceil(64) as u32, qh as u32, 1];
        ex.rec.dispatch(&p, params.words(), &b, groups);
    }
    Ok(())
}
