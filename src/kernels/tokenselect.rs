//! TokenSelect scoring on the GPU (`tokenselect.wgsl`): scores over the
//! candidate keys, per-head softmax statistics and the soft vote; its top-k is
//! [`super::topk`]'s and its gating [`super::gate`]'s.

use super::gate::{launch, GpuGate};
use super::params::TokenSelectParams;
use super::topk::{radix_top_k, RadixKeys};
use super::{GpuExecutor, GpuIds, GpuKv, GpuTensor, GpuView};
use crate::error::Result;
use crate::gpu::Binding;
use crate::ops::{GqaMap, Prefilter};
use crate::shaders;
use bytemuck::Zeroable;

/// Parameters of a pass over `n` slots from candidate `begin` with `qh`
/// query heads, reading arena `arena` of `kv` (0 where no KV is read).
fn params(n: usize, begin: usize, qh: usize, kv: Option<(&GpuKv, usize)>) -> TokenSelectParams {
    let mut p = TokenSelectParams {
        n: n as u32,
        begin: begin as u32,
        q_heads: qh as u32,
        ..Zeroable::zeroed()
    };
    if let Some((kv, arena)) = kv {
        let l = kv.layout;
        p.kv_heads = l.kv_heads as u32;
        p.head_dim = l.head_dim as u32;
        p.page_size = l.page_size as u32;
        p.arena_first_page = (arena * kv.pages_per_arena) as u32;
        p.arena_pages = kv.pages_per_arena as u32;
    }
    p
}

/// Which candidates a TokenSelect scoring pass covers.
pub(super) struct Candidates {
    pub begin: usize,
    pub n: usize,
    pub gqa: GqaMap,
}

/// A top-k: the `k` best of `n` votes, reported from token `begin`.
pub(super) struct Pick {
    pub n: usize,
    pub k: usize,
    pub begin: usize,
}

pub(super) fn score(
    ex: &mut GpuExecutor,
    q: &GpuTensor,
    cache: &GpuView<'_>,
    c: Candidates,
    scores: &mut GpuTensor,
    gate: Option<&GpuGate>,
    prefilter: Option<&Prefilter<'_, GpuIds>>,
) -> Result<()> {
    let kv = cache.kv;
    let slots = prefilter.map_or(c.n, |pf| pf.slots());
    let qh = q.cols / kv.layout.head_dim;
    let pages = ex.page_table(cache.table)?;
    let modulo = [("GQA_MODULO", super::flag(c.gqa == GqaMap::Modulo))];
    let p = ex.pipeline(shaders::TOKENSELECT, "score", &modulo);
    let groups = ex.grid(slots.div_ceil(64))?;
    for a in kv.arenas_for(cache.table, c.begin..c.begin + c.n) {
        let b = [
            Binding::from(&q.buf),
            Binding::from(&kv.k[cache.layer][a]),
            Binding::from(&pages),
            Binding::from(&scores.buf),
            // Exact selection reads no block ids: any read-only buffer binds.
            Binding::from(prefilter.map_or(&q.buf, |pf| &pf.blocks.buf)),
        ];
        let prm = TokenSelectParams {
            block: prefilter.map_or(0, |pf| pf.block) as u32,
            range_n: c.n as u32,
            ..params(slots, c.begin, qh, Some((kv, a)))
        };
        launch(ex, &p, prm.words(), &b, groups, gate)?;
    }
    Ok(())
}

pub(super) fn vote(
    ex: &mut GpuExecutor,
    scores: &GpuTensor,
    qh: usize,
    n: usize,
    votes: &mut GpuTensor,
    gate: Option<&GpuGate>,
) -> Result<()> {
    let stats = ex.scratch("vote stats", (qh * 8) as u64)?;
    let pr = params(n, 0, qh, None);
    let hs = ex.pipeline(shaders::TOKENSELECT, "head_stats", &[]);
    let b = [Binding::from(&scores.buf), Binding::from(&stats)];
    launch(ex, &hs, pr.words(), &b, [qh as u32, 1, 1], gate)?;
    let v = ex.pipeline(shaders::TOKENSELECT, "vote", &[]);
    let groups = ex.grid(n.div_ceil(64))?;
    let b = [
        Binding::from(&scores.buf),
        Binding::from(&stats),
        Binding::from(&votes.buf),
    ];
    launch(ex, &v, pr.words(), &b, groups, gate)
}

pub(super) fn top_k(
    ex: &mut GpuExecutor,
    votes: &GpuTensor,
    pick: Pick,
    out: &mut GpuIds,
    gate: Option<&GpuGate>,
    prefilter: Option<&Prefilter<'_, GpuIds>>,
) -> Result<()> {
    let keys = RadixKeys {
        keys: &votes.buf,
        base: 0,
        n: pick.n,
        batch: 1,
    };
    let to = (&out.buf, 0);
    radix_top_k(ex, keys, pick.k, pick.begin, to, gate, prefilter)
}
