//! Token Recycling (`speculative.wgsl`): draft-tree token fill from the adjacency
//! matrix, its update from the verify forward's logits, and acceptance.

use super::params::SpeculativeParams;
use super::{GpuExecutor, GpuIds, GpuTensor};
use crate::error::Result;
use crate::gpu::Binding;
use crate::sampling::AcceptParams;
use crate::shaders;
use bytemuck::Zeroable;

/// The walk of an acceptance: the longest path and independent trials.
pub(super) struct Walk {
    pub depth: usize,
    pub trials: usize,
}

pub(super) fn draft(
    ex: &mut GpuExecutor,
    adj: &GpuIds,
    plan: &GpuIds,
    n: usize,
    out: &mut GpuIds,
) -> Result<()> {
    let p = ex.pipeline(shaders::SPECULATIVE, "draft", &[]);
    let params = SpeculativeParams {
        n: n as u32,
        vocab: (adj.len / 8) as u32,
        ..Zeroable::zeroed()
    };
    ex.rec.dispatch(
        &p,
        params.words(),
        &[
            Binding::from(&adj.buf),
            Binding::from(&plan.buf),
            Binding::from(&out.buf),
        ],
        [1, 1, 1],
    );
    Ok(())
}

pub(super) fn adj_update(
    ex: &mut GpuExecutor,
    adj: &mut GpuIds,
    logits: &GpuTensor,
    tokens: &GpuIds,
) -> Result<()> {
    let (n, vocab) = (logits.rows, logits.cols);
    let p = ex.pipeline(shaders::SPECULATIVE, "adj_update", &[]);
    let params = SpeculativeParams {
        n: n as u32,
        vocab: vocab as u32,
        ..Zeroable::zeroed()
    };
    ex.rec.dispatch(
        &p,
        params.words(),
        &[
            Binding::from(&adj.buf),
            Binding::from(&logits.buf),
            Binding::from(&tokens.buf),
        ],
        [n as u32, 1, 1],
    );
    Ok(())
}

pub(super) fn accept(
    ex: &mut GpuExecutor,
    logits: &GpuTensor,
    tokens: &GpuIds,
    links: &GpuIds,
    a: &AcceptParams,
    walk: Walk,
    out: &mut GpuIds,
) -> Result<()> {
    let p = ex.pipeline(shaders::SPECULATIVE, "accept", &[]);
    let params = SpeculativeParams {
        n: logits.rows as u32,
        vocab: logits.cols as u32,
        k: a.top_k as u32,
        depth: walk.depth as u32,
        temperature: a.temperature,
        top_p: a.top_p,
        seed_lo: a.seed as u32,
        seed_hi: (a.seed >> 32) as u32,
    };
    ex.rec.dispatch(
        &p,
        params.words(),
        &[
            Binding::from(&logits.buf),
            Binding::from(&tokens.buf),
            Binding::from(&links.buf),
            Binding::from(&out.buf),
        ],
        [walk.trials as u32, 1, 1],
    );
    Ok(())
}
