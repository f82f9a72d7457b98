//! Quest block bounds and block scores (`block_sparse.wgsl`).

use super::tokenselect::{launch, radix_top_k, GpuGate, RadixKeys};
use super::{GpuExecutor, GpuIds, GpuKv, GpuRope, GpuTensor};
use crate::error::Result;
use crate::gpu::{buffer, Binding};
use crate::kv::{KvLayout, PageTable};
use crate::ops::check;
use crate::shaders;

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

pub(super) fn alloc(
    ex: &mut GpuExecutor,
    layout: &KvLayout,
    block: usize,
    rotated: bool,
) -> Result<GpuBounds> {
    layout.validate()?;
    check::bounds_block(layout, block)?;
    let per_arena = ex.kv_pages_per_arena(layout)?;
    let arenas = layout.num_pages.div_ceil(per_arena);
    let bounds_page =
        (layout.kv_heads * (layout.page_size / block) * 2 * layout.head_dim * 2) as u64;
    let bufs = (0..layout.layers)
        .map(|_| {
            (0..arenas)
                .map(|a| {
                    let pages = per_arena.min(layout.num_pages - a * per_arena);
                    buffer::storage(&ex.ctx.device, pages as u64 * bounds_page, "block bounds")
                })
                .collect()
        })
        .collect();
    Ok(GpuBounds {
        block,
        rotated,
        layout: *layout,
        pages_per_arena: per_arena,
        bufs,
    })
}

/// The uniform words every entry point shares (`rotate` comes after them).
#[allow(clippy::too_many_arguments)]
fn params(
    l: &KvLayout,
    block: usize,
    first_block: usize,
    n_blocks: usize,
    seq_len: usize,
    arena: usize,
    pages_per_arena: usize,
    max_pos: usize,
    q_heads: usize,
    out_cols: usize,
) -> [u32; 16] {
    [
        first_block as u32,
        n_blocks as u32,
        seq_len as u32,
        l.kv_heads as u32,
        l.head_dim as u32,
        l.page_size as u32,
        block as u32,
        (arena * pages_per_arena) as u32,
        pages_per_arena as u32,
        max_pos as u32,
        q_heads as u32,
        out_cols as u32,
        0,
        0,
        0,
        0,
    ]
}

pub(super) fn bounds(
    ex: &mut GpuExecutor,
    kv: &GpuKv,
    b: &mut GpuBounds,
    layer: usize,
    table: &PageTable,
    tokens: std::ops::Range<usize>,
    rope: &GpuRope,
) -> Result<()> {
    let l = kv.layout;
    check::kv_bounds(&l, layer, table, &tokens, rope.max_pos)?;
    if tokens.is_empty() {
        return Ok(());
    }
    let first = tokens.start / b.block;
    let n_blocks = tokens.end.div_ceil(b.block) - first;
    let pages = ex.page_table(table);
    let p = ex.pipeline(shaders::BLOCK_SPARSE, "bounds", &[]);
    let groups = ex.grid((n_blocks * l.kv_heads * l.head_dim / 4).div_ceil(64))?;
    let span = first * b.block..tokens.end;
    for a in kv.arenas_for(table, span) {
        let mut words = params(
            &l,
            b.block,
            first,
            n_blocks,
            tokens.end,
            a,
            kv.pages_per_arena,
            rope.max_pos,
            0,
            0,
        );
        words[12] = u32::from(b.rotated);
        let bind = [
            Binding::from(&pages),
            Binding::from(&kv.k[layer][a]),
            Binding::from(&rope.buf),
            Binding::from(&b.bufs[layer][a]),
        ];
        ex.rec.dispatch(&p, &words, &bind, groups);
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

/// Per query head, one pass per arena (`head_scores`); or per KV head, the
/// group's query parts (`group_query`) and then one pass per arena
/// (`group_scores`).
#[allow(clippy::too_many_arguments)]
pub(super) fn scores(
    ex: &mut GpuExecutor,
    q: &GpuTensor,
    b: &GpuBounds,
    layer: usize,
    table: &PageTable,
    blocks: std::ops::Range<usize>,
    rows: ScoreRows,
    out: &mut GpuTensor,
    gate: Option<&GpuGate>,
) -> Result<()> {
    let l = b.layout;
    let (q_shape, out_shape) = ((q.rows, q.cols), (out.rows, out.cols));
    let qh = match rows {
        ScoreRows::PerHead { spread } => {
            check::block_spread(spread)?;
            check::block_scores(&l, b.block, layer, table, q_shape, &blocks, out_shape)?
        }
        ScoreRows::PerKvHead => {
            check::block_group_scores(&l, b.block, layer, table, q_shape, &blocks, out_shape)?
        }
    };
    if blocks.is_empty() {
        return Ok(());
    }
    let words = |a: usize| {
        let mut w = params(
            &l,
            b.block,
            blocks.start,
            blocks.len(),
            blocks.end * b.block,
            a,
            b.pages_per_arena,
            0,
            qh,
            blocks.len(),
        );
        if let ScoreRows::PerHead { spread } = rows {
            w[13] = spread.to_bits();
        }
        w
    };
    let (query, entry) = match rows {
        ScoreRows::PerHead { .. } => (q.buf.clone(), "head_scores"),
        ScoreRows::PerKvHead => (group_query(ex, q, &l, &words(0), false)?, "group_scores"),
    };
    let pages = ex.page_table(table);
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
        launch(ex, &p, &words(a), &bind, groups, gate)?;
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
    words: &[u32; 16],
    sum_only: bool,
) -> Result<wgpu::Buffer> {
    let gq = ex.scratch("group query", (l.kv_heads * l.head_dim * 8) as u64)?;
    let prep = ex.pipeline(shaders::BLOCK_SPARSE, "group_query", &[]);
    let groups = [(l.kv_heads * l.head_dim / 2).div_ceil(64) as u32, 1, 1];
    let bind = [Binding::from(&q.buf), Binding::from(&gq)];
    let mut words = *words;
    words[14] = u32::from(sum_only);
    ex.rec.dispatch(&prep, &words, &bind, groups);
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
    check::block_top_k((scores.rows, scores.cols), kv_heads, n, k, out.len)?;
    let keys = ex.scratch("group keys", (kv_heads * n * 4) as u64)?;
    let p = ex.pipeline(shaders::BLOCK_SPARSE, "group_keys", &[]);
    let mut words = [0u32; 16];
    words[1] = n as u32;
    words[3] = kv_heads as u32;
    words[10] = scores.rows as u32;
    words[11] = n as u32;
    let bind = [Binding::from(&scores.buf), Binding::from(&keys)];
    let groups = ex.grid((n * kv_heads).div_ceil(64))?;
    ex.rec.dispatch(&p, &words, &bind, groups);
    let keys = RadixKeys {
        keys: &keys,
        base: 0,
        n,
        batch: kv_heads,
    };
    radix_top_k(ex, keys, k, 0, (&out.buf, 0), None, None)
}

#[allow(clippy::too_many_arguments)]
pub(super) fn token_scores(
    ex: &mut GpuExecutor,
    q: &GpuTensor,
    kv: &GpuKv,
    layer: usize,
    table: &PageTable,
    n: usize,
    rope: &GpuRope,
    out: &mut GpuTensor,
) -> Result<()> {
    let l = kv.layout;
    let qh = check::token_scores(
        &l,
        layer,
        table,
        (q.rows, q.cols),
        n,
        (out.rows, out.cols),
        rope.max_pos,
    )?;
    if n == 0 {
        return Ok(());
    }
    let words = |a| params(&l, 1, 0, n, n, a, kv.pages_per_arena, rope.max_pos, qh, n);
    let sum = group_query(ex, q, &l, &words(0), true)?;
    let pages = ex.page_table(table);
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
        ex.rec.dispatch(&p, &words(a), &bind, groups);
    }
    Ok(())
}
