//! Quest block bounds and block scores (`block_sparse.wgsl`).

use super::gate::{launch, GpuGate};
use super::params::BlockSparseParams;
use super::topk::{radix_top_k, RadixKeys};
use super::{GpuExecutor, GpuIds, GpuTensor, GpuView};
use crate::error::Result;
use crate::gpu::{buffer, Binding};
use crate::kv::{KvLayout, PageTable};
use crate::shaders;
use bytemuck::Zeroable;
use std::ops::Range;

/// Block bounds on the device: `bufs[layer][arena]`, arenas holding the same
/// pages as the KV cache's (a page's bounds take 4 / block of its K bytes, so
/// they fit wherever the keys do: per block and KV head D f16 maxima and D
/// minima, against block x D keys of f16).
pub struct GpuBounds {
    /// Tokens per block.
    pub block: usize,
    /// Keys rotated at their positions (Quest) or not (hierarchical TokenSelect).
    pub rotated: bool,
    /// Layout of the cache the bounds describe.
    pub layout: KvLayout,
    /// Pages per arena (as the KV cache's).
    pub pages_per_arena: usize,
    /// `bufs[layer][arena]`.
    pub bufs: Vec<Vec<wgpu::Buffer>>,
}

/// Bytes of one page's bounds: per KV head and block, max and min of each
/// channel in f16.
pub(super) fn bounds_page_bytes(layout: &KvLayout, block: usize) -> u64 {
    (layout.kv_heads * (layout.page_size / block) * 2 * layout.head_dim * 2) as u64
}

pub(super) fn alloc(
    ex: &mut GpuExecutor,
    layout: &KvLayout,
    block: usize,
    rotated: bool,
) -> Result<GpuBounds> {
    let per_arena = ex.kv_pages_per_arena(layout)?;
    let arenas = layout.num_pages.div_ceil(per_arena);
    let bounds_page = bounds_page_bytes(layout, block);
    let bufs = (0..layout.layers)
        .map(|_| {
            (0..arenas)
                .map(|a| {
                    let pages = per_arena.min(layout.num_pages - a * per_arena);
                    buffer::storage(&ex.ctx.device, pages as u64 * bounds_page, "block bounds")
                })
                .collect::<Result<Vec<_>>>()
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(GpuBounds {
        block,
        rotated,
        layout: *layout,
        pages_per_arena: per_arena,
        bufs,
    })
}

/// The fields every entry point shares: blocks `blocks` of `block` tokens in
/// a sequence of `seq_len`, over arena `arena.0` of `arena.1` pages.
fn params(
    l: &KvLayout,
    block: usize,
    blocks: Range<usize>,
    seq_len: usize,
    arena: (usize, usize),
) -> BlockSparseParams {
    BlockSparseParams {
        first_block: blocks.start as u32,
        n_blocks: blocks.len() as u32,
        seq_len: seq_len as u32,
        kv_heads: l.kv_heads as u32,
        head_dim: l.head_dim as u32,
        page_size: l.page_size as u32,
        block: block as u32,
        arena_first_page: (arena.0 * arena.1) as u32,
        arena_pages: arena.1 as u32,
        ..Zeroable::zeroed()
    }
}

pub(super) fn bounds(
    ex: &mut GpuExecutor,
    cache: &GpuView<'_>,
    b: &mut GpuBounds,
    tokens: Range<usize>,
) -> Result<()> {
    let (kv, rope, layer, table) = (cache.kv, cache.rope, cache.layer, cache.table);
    let l = kv.layout;
    if tokens.is_empty() {
        return Ok(());
    }
    let first = tokens.start / b.block;
    let n_blocks = tokens.end.div_ceil(b.block) - first;
    let pages = ex.page_table(table)?;
    let rotate = [("ROTATE", super::flag(b.rotated))];
    let p = ex.pipeline(shaders::BLOCK_SPARSE, "bounds", &rotate);
    let groups = ex.grid((n_blocks * l.kv_heads * l.head_dim / 4).div_ceil(64))?;
    let span = first * b.block..tokens.end;
    for a in kv.arenas_for(table, span) {
        let words = BlockSparseParams {
            max_pos: rope.max_pos as u32,
            ..params(
                &l,
                b.block,
                first..first + n_blocks,
                tokens.end,
                (a, kv.pages_per_arena),
            )
        };
        let bind = [
            Binding::from(&pages),
            Binding::from(&kv.k[layer][a]),
            Binding::from(&rope.buf),
            Binding::from(&b.bufs[layer][a]),
        ];
        ex.rec.dispatch(&p, words.words(), &bind, groups);
    }
    Ok(())
}

/// What a block-scores call computes: per query head with `spread` weighting
/// the half-ranges (hierarchical TokenSelect), or Quest's bound summed over
/// each KV head's query heads.
#[derive(Clone, Copy)]
pub(super) enum ScoreRows {
    PerHead { spread: f32 },
    PerKvHead,
}

/// Bounds of one layer of a sequence.
pub(super) struct BoundsAt<'a> {
    pub bounds: &'a GpuBounds,
    pub layer: usize,
    pub table: &'a PageTable,
}

/// Per query head, one pass per arena (`head_scores`); or per KV head, the
/// group's query parts (`group_query`) and then one pass per arena
/// (`group_scores`).
pub(super) fn scores(
    ex: &mut GpuExecutor,
    q: &GpuTensor,
    at: BoundsAt<'_>,
    blocks: Range<usize>,
    rows: ScoreRows,
    out: &mut GpuTensor,
    gate: Option<&GpuGate>,
) -> Result<()> {
    let BoundsAt {
        bounds: b,
        layer,
        table,
    } = at;
    let l = b.layout;
    let qh = q.cols / l.head_dim;
    if blocks.is_empty() {
        return Ok(());
    }
    let words = |a: usize| BlockSparseParams {
        q_heads: qh as u32,
        out_cols: blocks.len() as u32,
        alpha: match rows {
            ScoreRows::PerHead { spread } => spread,
            ScoreRows::PerKvHead => 0.0,
        },
        ..params(
            &l,
            b.block,
            blocks.clone(),
            blocks.end * b.block,
            (a, b.pages_per_arena),
        )
    };
    let (query, entry) = match rows {
        ScoreRows::PerHead { .. } => (q.buf.clone(), "head_scores"),
        ScoreRows::PerKvHead => (group_query(ex, q, &l, words(0), false)?, "group_scores"),
    };
    let pages = ex.page_table(table)?;
    let p = ex.pipeline(shaders::BLOCK_SPARSE, entry, &[]);
    let groups = ex.grid((blocks.len() * l.kv_heads).div_ceil(64))?;
    let span = blocks.start * b.block..blocks.end * b.block;
    for a in super::arenas_for(l.page_size, b.pages_per_arena, table, span) {
        let bind = [
            Binding::from(&pages),
            Binding::from(&query),
            Binding::from(&b.bufs[layer][a]),
            Binding::from(&out.buf),
        ];
        launch(ex, &p, words(a).words(), &bind, groups, gate)?;
    }
    Ok(())
}

/// Each KV head's query parts (`group_query`): the sums over its query heads
/// of their positive and negative parts, or (`sum_only`) of the queries, into
/// a scratch buffer.
fn group_query(
    ex: &mut GpuExecutor,
    q: &GpuTensor,
    l: &KvLayout,
    words: BlockSparseParams,
    sum_only: bool,
) -> Result<wgpu::Buffer> {
    let gq = ex.scratch("group query", (l.kv_heads * l.head_dim * 8) as u64)?;
    let sum_only = [("SUM_ONLY", super::flag(sum_only))];
    let prep = ex.pipeline(shaders::BLOCK_SPARSE, "group_query", &sum_only);
    let groups = [(l.kv_heads * l.head_dim / 2).div_ceil(64) as u32, 1, 1];
    let bind = [Binding::from(&q.buf), Binding::from(&gq)];
    ex.rec.dispatch(&prep, words.words(), &bind, groups);
    Ok(gq)
}

pub(super) fn top_k(
    ex: &mut GpuExecutor,
    scores: &GpuTensor,
    kv_heads: usize,
    n: usize,
    k: usize,
    out: &mut GpuIds,
) -> Result<()> {
    let keys = ex.scratch("group keys", (kv_heads * n * 4) as u64)?;
    let p = ex.pipeline(shaders::BLOCK_SPARSE, "group_keys", &[]);
    let words = BlockSparseParams {
        n_blocks: n as u32,
        kv_heads: kv_heads as u32,
        q_heads: scores.rows as u32,
        out_cols: n as u32,
        ..Zeroable::zeroed()
    };
    let bind = [Binding::from(&scores.buf), Binding::from(&keys)];
    let groups = ex.grid((n * kv_heads).div_ceil(64))?;
    ex.rec.dispatch(&p, words.words(), &bind, groups);
    let keys = RadixKeys {
        keys: &keys,
        base: 0,
        n,
        batch: kv_heads,
    };
    radix_top_k(ex, keys, k, 0, (&out.buf, 0), None, None)
}

pub(super) fn token_scores(
    ex: &mut GpuExecutor,
    q: &GpuTensor,
    cache: &GpuView<'_>,
    n: usize,
    out: &mut GpuTensor,
) -> Result<()> {
    let (kv, rope, layer, table) = (cache.kv, cache.rope, cache.layer, cache.table);
    let l = kv.layout;
    let qh = q.cols / l.head_dim;
    if n == 0 {
        return Ok(());
    }
    let words = |a| BlockSparseParams {
        max_pos: rope.max_pos as u32,
        q_heads: qh as u32,
        out_cols: n as u32,
        ..params(&l, 1, 0..n, n, (a, kv.pages_per_arena))
    };
    let sum = group_query(ex, q, &l, words(0), true)?;
    let pages = ex.page_table(table)?;
    let p = ex.pipeline(shaders::BLOCK_SPARSE, "token_scores", &[]);
    let groups = ex.grid((n * l.kv_heads).div_ceil(64))?;
    for a in kv.arenas_for(table, 0..n) {
        let bind = [
            Binding::from(&pages),
            Binding::from(&sum),
            Binding::from(&kv.k[layer][a]),
            Binding::from(&rope.buf),
            Binding::from(&out.buf),
        ];
        ex.rec.dispatch(&p, words(a).words(), &bind, groups);
    }
    Ok(())
}
