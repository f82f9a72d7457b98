//! Radix top-k on the GPU (`topk.wgsl`), shared by TokenSelect, its
//! hierarchical prefilter, Quest and Tidal: 4 passes of 8 bits over
//! order-preserving u32 keys, the output sorted by index; small arrays in one
//! workgroup-wide dispatch.

use super::gate::{launch, GpuGate};
use super::params::TopKParams;
use super::{GpuExecutor, GpuIds};
use crate::error::Result;
use crate::gpu::Binding;
use crate::ops::Prefilter;
use crate::shaders;
use bytemuck::Zeroable;

/// Candidates up to which one workgroup runs the whole top-k (`radix_small`):
/// below this, nine dispatches cost more than the work they split.
pub(super) const SMALL_TOP_K: usize = 32768;

pub(super) fn radix_workgroups(n: usize) -> u32 {
    // Enough workgroups that each thread scans ~16 values.
    n.div_ceil(4096).clamp(1, 256) as u32
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
    let mut pr = TopKParams {
        n: n as u32,
        begin: begin as u32,
        k: k as u32,
        block: prefilter.map_or(0, |pf| pf.block) as u32,
        vbase: keys.base as u32,
        obase: out.1 as u32,
        ..Zeroable::zeroed()
    };
    // Exact selection reads no block ids: any read-only buffer binds.
    let blocks = prefilter.map_or(votes_buf, |pf| &pf.blocks.buf);
    if n <= SMALL_TOP_K {
        let small = ex.pipeline(shaders::TOPK, "radix_small", &[]);
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
    pr: &TopKParams,
    gate: Option<&GpuGate>,
) -> Result<()> {
    let mut pr = *pr;
    let n = pr.n as usize;
    let init = ex.pipeline(shaders::TOPK, "radix_init", &[]);
    launch(
        ex,
        &init,
        pr.words(),
        &[Binding::from(state)],
        [1, 1, 1],
        gate,
    )?;
    let hist = ex.pipeline(shaders::TOPK, "radix_hist", &[]);
    let pick = ex.pipeline(shaders::TOPK, "radix_pick", &[]);
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
    let collect = ex.pipeline(shaders::TOPK, "radix_collect", &[]);
    let cb = [
        Binding::from(state),
        Binding::from(votes_buf),
        Binding::from(out),
        Binding::from(blocks),
    ];
    launch(ex, &collect, pr.words(), &cb, [1, 1, 1], gate)
}
