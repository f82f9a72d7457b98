//! KV append (`kv_append.wgsl`), alone or with the queries' RoPE: one pass
//! per arena buffer; KV moves for committing accepted draft tokens (buffer
//! copies).

use super::params::KvAppendParams;
use super::{GpuExecutor, GpuIds, GpuKv, GpuRope, GpuTensor};
use crate::error::Result;
use crate::gpu::Binding;
use crate::kv::PageTable;
use crate::shaders;

/// The queries `kv_append_rope` rotates: the tensor, its heads, their
/// positions and the RoPE table.
pub(super) type Queries<'a> = (&'a mut GpuTensor, usize, &'a GpuIds, &'a GpuRope);

/// KV append, and with `q` the queries' RoPE in the first arena's pass.
#[allow(clippy::too_many_arguments)]
pub(super) fn kv_append(
    ex: &mut GpuExecutor,
    kv: &mut GpuKv,
    layer: usize,
    table: &PageTable,
    start: usize,
    k: &GpuTensor,
    v: &GpuTensor,
    mut q: Option<Queries<'_>>,
) -> Result<()> {
    let l = kv.layout;
    if k.rows == 0 {
        return Ok(());
    }
    let pages = ex.page_table(table)?;
    let words = l.head_dim / 2;
    // Only arenas holding one of the touched pages need a pass.
    for a in kv.arenas_for(table, start..start + k.rows) {
        let (ka, va) = (&kv.k[layer][a], &kv.v[layer][a]);
        let mut params = KvAppendParams {
            tokens: k.rows as u32,
            start: start as u32,
            kv_heads: l.kv_heads as u32,
            words: words as u32,
            page_size: l.page_size as u32,
            arena_first_page: (a * kv.pages_per_arena) as u32,
            arena_pages: kv.pages_per_arena as u32,
            q_heads: 0,
            max_pos: 0,
            _p0: 0,
            _p1: 0,
            _p2: 0,
        };
        let mut b = vec![
            Binding::from(&k.buf),
            Binding::from(&v.buf),
            Binding::from(&pages),
            Binding::from(ka),
            Binding::from(va),
        ];
        let (entry, threads) = match q.take() {
            Some((q, heads, pos, rope)) => {
                params.q_heads = heads as u32;
                params.max_pos = rope.max_pos as u32;
                b.extend([
                    Binding::from(&q.buf),
                    Binding::from(&pos.buf),
                    Binding::from(&rope.buf),
                ]);
                ("kv_append_rope", k.rows * heads * words)
            }
            None => ("kv_append", k.rows * l.kv_heads * words),
        };
        let p = ex.pipeline(shaders::KV_APPEND, entry, &[]);
        let groups = ex.grid(threads.div_ceil(64))?;
        ex.rec.dispatch(&p, params.words(), &b, groups);
    }
    Ok(())
}

/// Moves KV rows (all layers, K and V, every head) from `src` to `dst` slots, in
/// order. Buffer copies cannot overlap a buffer with itself, so each row goes
/// through a scratch buffer; moves are applied in order, so a later move may read
/// what an earlier one wrote.
pub(super) fn kv_move(
    ex: &mut GpuExecutor,
    kv: &GpuKv,
    table: &PageTable,
    moves: &[(usize, usize)],
) -> Result<()> {
    let l = kv.layout;
    let row = (l.head_dim * 2) as u64; // f16
    let scratch = ex.scratch("kv move", row.max(16))?;
    // (arena, byte offset) of a slot's row for KV head h.
    let at = |slot: usize, h: usize| {
        let page = table.pages[slot / l.page_size] as usize;
        let (arena, local) = (page / kv.pages_per_arena, page % kv.pages_per_arena);
        let off = ((local * l.kv_heads + h) * l.page_size + slot % l.page_size) as u64 * row;
        (arena, off)
    };
    for &(src, dst) in moves {
        if src == dst {
            continue;
        }
        for h in 0..l.kv_heads {
            let ((sa, so), (da, d_off)) = (at(src, h), at(dst, h));
            for layer in 0..l.layers {
                for bufs in [&kv.k[layer], &kv.v[layer]] {
                    ex.rec.copy(&bufs[sa], so, &scratch, 0, row);
                    ex.rec.copy(&scratch, 0, &bufs[da], d_off, row);
                }
            }
        }
    }
    Ok(())
}
