//! TokenSelect selection on the GPU (`tokenselect.wgsl`): scoring over the
//! candidate keys, per-head softmax statistics and the soft vote, a radix top-k
//! (4 passes of 8 bits over the vote's float bits) whose output is sorted by index,
//! and the Selection Cache check that turns those dispatches into indirect ones with
//! zero workgroups on a hit.

use super::params::{CacheParams, TokenSelectParams};
use super::{GpuExecutor, GpuIds, GpuKv, GpuTensor, GpuView};
use crate::error::{Error, Result};
use crate::gpu::{buffer, Binding, Pipeline};
use crate::kv::PageTable;
use crate::ops::{GqaMap, Prefilter, SelectPlan};
use crate::shaders;
use bytemuck::Zeroable;
use std::cell::Cell;
use std::sync::Arc;

/// Indirect-argument slots of one gated selection (see [`slots`]).
const MAX_SLOTS: usize = 48;

/// Selection Cache gate on the GPU.
#[derive(Clone, Debug)]
pub struct GpuGate {
    /// Indirect dispatch arguments, 16 bytes per slot.
    pub args: wgpu::Buffer,
    /// [hits, misses] (u32).
    pub counters: wgpu::Buffer,
    /// Workgroup counts of the checked selection's dispatches, in order.
    slots: Vec<[u32; 3]>,
    /// The slot the next gated dispatch takes.
    next: Cell<usize>,
}

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

/// Candidates up to which one workgroup runs the whole top-k (`radix_small`):
/// below this, nine dispatches cost more than the work they split.
const SMALL_TOP_K: usize = 32768;

fn radix_workgroups(n: usize) -> u32 {
    // Enough workgroups that each thread scans ~16 values.
    n.div_ceil(4096).clamp(1, 256) as u32
}

/// The workgroup counts of every selection dispatch, in launch order: for a
/// hierarchical selection block scores (one per arena), their vote (head_stats,
/// vote) and top-k (radix_small up to SMALL_TOP_K candidates, else radix_init,
/// 4 x (radix_hist, radix_pick), radix_collect);
/// then the token scores (one per arena), vote and top-k.
fn slots(
    ex: &GpuExecutor,
    plan: &SelectPlan,
    kv: &GpuKv,
    table: &PageTable,
) -> Result<Vec<[u32; 3]>> {
    let mut v = Vec::new();
    let vote_top_k = |v: &mut Vec<[u32; 3]>, n: usize| -> Result<()> {
        v.push([plan.q_heads as u32, 1, 1]);
        v.push(ex.grid(n.div_ceil(64))?);
        v.push([1, 1, 1]);
        if n <= SMALL_TOP_K {
            return Ok(());
        }
        for _ in 0..4 {
            v.push([radix_workgroups(n), 1, 1]);
            v.push([1, 1, 1]);
        }
        v.push([1, 1, 1]);
        Ok(())
    };
    let mut n = plan.n;
    if let Some(pf) = plan.prefilter {
        let groups = ex.grid((pf.n_blocks * kv.layout.kv_heads).div_ceil(64))?;
        let span = pf.first_block * pf.block..(pf.first_block + pf.n_blocks) * pf.block;
        v.extend(kv.arenas_for(table, span).iter().map(|_| groups));
        vote_top_k(&mut v, pf.n_blocks)?;
        n = pf.top * pf.block;
    }
    let score = ex.grid(n.div_ceil(64))?;
    v.extend(
        kv.arenas_for(table, plan.begin..plan.begin + plan.n)
            .iter()
            .map(|_| score),
    );
    vote_top_k(&mut v, n)?;
    Ok(v)
}

/// Dispatches directly, or through the gate's next slot when gated.
pub(super) fn launch(
    ex: &mut GpuExecutor,
    p: &Arc<Pipeline>,
    params: &[u32],
    b: &[Binding],
    groups: [u32; 3],
    gate: Option<&GpuGate>,
) -> Result<()> {
    match gate {
        Some(g) => {
            let slot = g.next.get();
            if g.slots.get(slot) != Some(&groups) {
                return Err(Error::Internal(
                    "selection op does not match the plan of its Selection Cache check".into(),
                ));
            }
            g.next.set(slot + 1);
            ex.rec
                .dispatch_indirect(p, params, b, &g.args, 16 * slot as u64)
        }
        None => ex.rec.dispatch(p, params, b, groups),
    }
    Ok(())
}

pub(super) fn new_gate(ex: &mut GpuExecutor) -> Result<GpuGate> {
    let _gl = ex.ctx.gl_guard();
    let args = ex.ctx.device.create_buffer(&wgpu::BufferDescriptor {
        label: Some("selection cache args"),
        size: 16 * MAX_SLOTS as u64,
        usage: buffer::STORAGE | wgpu::BufferUsages::INDIRECT,
        mapped_at_creation: false,
    });
    let counters = buffer::storage(&ex.ctx.device, 16, "selection cache counters");
    Ok(GpuGate {
        args,
        counters,
        slots: Vec::new(),
        next: Cell::new(0),
    })
}

pub(super) fn cache_check(
    ex: &mut GpuExecutor,
    fp: &GpuTensor,
    cached: &mut GpuTensor,
    threshold: f32,
    plan: &SelectPlan,
    cache: &GpuView<'_>,
    gate: &mut GpuGate,
) -> Result<()> {
    let s = slots(ex, plan, cache.kv, cache.table)?;
    if s.len() > MAX_SLOTS {
        return Err(Error::Capacity(format!(
            "Selection Cache: {} gated dispatches (one score pass per KV arena) exceed {MAX_SLOTS}",
            s.len()
        )));
    }
    let mut params = CacheParams {
        len: (fp.rows * fp.cols) as u32,
        slots: s.len() as u32,
        threshold,
        _p0: 0,
        args: [[0, 1, 1, 0]; MAX_SLOTS],
    };
    for (a, g) in params.args.iter_mut().zip(&s) {
        *a = [g[0], g[1], g[2], 0];
    }
    let p = ex.pipeline(shaders::TOKENSELECT, "cache_check", &[]);
    let b = [
        Binding::from(&fp.buf),
        Binding::from(&cached.buf),
        Binding::from(&gate.args),
        Binding::from(&gate.counters),
    ];
    ex.rec.dispatch(&p, params.words(), &b, [1, 1, 1]);
    gate.slots = s;
    gate.next.set(0);
    Ok(())
}

pub(super) fn gate_counts(ex: &mut GpuExecutor, gate: &GpuGate) -> Result<(u64, u64)> {
    let bytes = ex.read_bytes(&gate.counters, 8)?;
    let c: Vec<u32> = bytemuck::pod_collect_to_vec(&bytes);
    Ok((c[0] as u64, c[1] as u64))
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
    let pages = ex.page_table(cache.table);
    let p = ex.pipeline(shaders::TOKENSELECT, "score", &[]);
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
            modulo: u32::from(c.gqa == GqaMap::Modulo),
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

/// `batch` arrays of `n` order-preserving u32 keys each, back to back from
/// word `base` of a buffer.
pub(super) struct RadixKeys<'a> {
    pub keys: &'a wgpu::Buffer,
    pub base: usize,
    pub n: usize,
    pub batch: usize,
}

/// The `k` largest keys (ties to the lower index), as `begin + j` or the
/// prefilter's token of slot j, ascending, into `out.0` from word `out.1`; for
/// each key array of a batch, its `k` after the previous array's. A batch of
/// small arrays runs as one dispatch, a workgroup per array (lavapipe runs
/// them on different cores).
pub(super) fn radix_top_k(
    ex: &mut GpuExecutor,
    keys: RadixKeys<'_>,
    k: usize,
    begin: usize,
    out: (&wgpu::Buffer, usize),
    gate: Option<&GpuGate>,
    prefilter: Option<&Prefilter<'_, GpuIds>>,
) -> Result<()> {
    let n = keys.n;
    let votes_buf = keys.keys;
    let state = ex.scratch("radix state", 258 * 4)?;
    let mut pr = TokenSelectParams {
        k: k as u32,
        block: prefilter.map_or(0, |pf| pf.block) as u32,
        vbase: keys.base as u32,
        obase: out.1 as u32,
        ..params(n, begin, 0, None)
    };
    // Exact selection reads no block ids: any read-only buffer binds.
    let blocks = prefilter.map_or(votes_buf, |pf| &pf.blocks.buf);
    if n <= SMALL_TOP_K {
        let small = ex.pipeline(shaders::TOKENSELECT, "radix_small", &[]);
        let b = [
            Binding::from(&state),
            Binding::from(votes_buf),
            Binding::from(out.0),
            Binding::from(blocks),
        ];
        return launch(ex, &small, pr.words(), &b, [1, keys.batch as u32, 1], gate);
    }
    for i in 0..keys.batch {
        pr.vbase = (keys.base + i * n) as u32;
        pr.obase = (out.1 + i * k) as u32;
        radix_passes(ex, &state, votes_buf, out.0, blocks, &pr, gate)?;
    }
    Ok(())
}

/// The multi-workgroup radix top-k of one key array (`pr` as `radix_top_k`
/// fills it).
fn radix_passes(
    ex: &mut GpuExecutor,
    state: &wgpu::Buffer,
    votes_buf: &wgpu::Buffer,
    out: &wgpu::Buffer,
    blocks: &wgpu::Buffer,
    pr: &TokenSelectParams,
    gate: Option<&GpuGate>,
) -> Result<()> {
    let mut pr = *pr;
    let n = pr.n as usize;
    let init = ex.pipeline(shaders::TOKENSELECT, "radix_init", &[]);
    launch(
        ex,
        &init,
        pr.words(),
        &[Binding::from(state)],
        [1, 1, 1],
        gate,
    )?;
    let hist = ex.pipeline(shaders::TOKENSELECT, "radix_hist", &[]);
    let pick = ex.pipeline(shaders::TOKENSELECT, "radix_pick", &[]);
    let wgs = radix_workgroups(n);
    for pass in 0..4u32 {
        pr.pass_ = pass;
        let hb = [Binding::from(state), Binding::from(votes_buf)];
        launch(ex, &hist, pr.words(), &hb, [wgs, 1, 1], gate)?;
        launch(
            ex,
            &pick,
            pr.words(),
            &[Binding::from(state)],
            [1, 1, 1],
            gate,
        )?;
    }
    let collect = ex.pipeline(shaders::TOKENSELECT, "radix_collect", &[]);
    let cb = [
        Binding::from(state),
        Binding::from(votes_buf),
        Binding::from(out),
        Binding::from(blocks),
    ];
    launch(ex, &collect, pr.words(), &cb, [1, 1, 1], gate)
}
