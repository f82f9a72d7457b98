//! Token Recycling (`speculative.wgsl`): draft-tree token fill from the adjacency
//! matrix, its update from the verify forward's logits, and acceptance.

use super::{GpuExecutor, GpuIds, GpuTensor};
use crate::error::{shape_err, Result};
use crate::gpu::Binding;
use crate::ops::check;
use crate::sampling::AcceptParams;
use crate::shaders;

pub(super) fn draft(
    ex: &mut GpuExecutor,
    adj: &GpuIds,
    plan: &GpuIds,
    n: usize,
    out: &mut GpuIds,
) -> Result<()> {
    if n == 0 || n > crate::ops::MAX_NODES || plan.len < 3 * n || out.len < n {
        return shape_err(
            "spec_draft",
            format!(
                "{n} nodes, plan of {} words, output of {}",
                plan.len, out.len
            ),
        );
    }
    let p = ex.pipeline(shaders::SPECULATIVE, "draft", &[]);
    ex.rec.dispatch(
        &p,
        &[n as u32, (adj.len / 8) as u32, 0, 0, 0, 0, 0, 0],
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
    if adj.len != vocab * 8 || tokens.len < n || n > crate::ops::MAX_NODES {
        return shape_err(
            "spec_adj_update",
            format!(
                "adjacency of {} for a vocabulary of {vocab}, {} tokens for {n} rows",
                adj.len, tokens.len
            ),
        );
    }
    let p = ex.pipeline(shaders::SPECULATIVE, "adj_update", &[]);
    ex.rec.dispatch(
        &p,
        &[n as u32, vocab as u32, 0, 0, 0, 0, 0, 0],
        &[
            Binding::from(&adj.buf),
            Binding::from(&logits.buf),
            Binding::from(&tokens.buf),
        ],
        [n as u32, 1, 1],
    );
    Ok(())
}

#[allow(clippy::too_many_arguments)]
pub(super) fn accept(
    ex: &mut GpuExecutor,
    logits: &GpuTensor,
    tokens: &GpuIds,
    links: &GpuIds,
    params: &AcceptParams,
    depth: usize,
    trials: usize,
    out: &mut GpuIds,
) -> Result<()> {
    let (n, vocab) = (logits.rows, logits.cols);
    check::spec_accept(
        (n, vocab),
        tokens.len,
        links.len,
        params,
        depth,
        trials,
        out.len,
    )?;
    let p = ex.pipeline(shaders::SPECULATIVE, "accept", &[]);
    ex.rec.dispatch(
        &p,
        &params.words(n, vocab, depth),
        &[
            Binding::from(&logits.buf),
            Binding::from(&tokens.buf),
            Binding::from(&links.buf),
            Binding::from(&out.buf),
        ],
        [trials as u32, 1, 1],
    );
    Ok(())
}
