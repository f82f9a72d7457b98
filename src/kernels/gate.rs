//! The Selection Cache gate on the GPU (`gate.wgsl`): a check compares the
//! layer's fingerprint with the cached one on the device and writes the
//! indirect-dispatch arguments of the selection kernels that follow (zero
//! workgroups on a hit), so a hit skips them without a round trip. Any
//! selection op dispatches through [`launch`].

use super::params::GateParams;
use super::topk::{radix_workgroups, SMALL_TOP_K};
use super::{GpuExecutor, GpuKv, GpuTensor, GpuView};
use crate::error::{Error, Result};
use crate::gpu::{buffer, Binding, Pipeline};
use crate::kv::PageTable;
use crate::ops::SelectPlan;
use crate::shaders;
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
    let counters = buffer::storage(&ex.ctx.device, 16, "selection cache counters")?;
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
    let mut params = GateParams {
        len: (fp.rows * fp.cols) as u32,
        slots: s.len() as u32,
        threshold,
        _p0: 0,
        args: [[0, 1, 1, 0]; MAX_SLOTS],
    };
    for (a, g) in params.args.iter_mut().zip(&s) {
        *a = [g[0], g[1], g[2], 0];
    }
    let p = ex.pipeline(shaders::GATE, "cache_check", &[]);
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
