//! Repetition penalty, top-k selection and the pick (`sampling.wgsl`): a
//! sampling step reads back k candidates or, picked on the device, one id;
//! never the whole vocabulary.

use super::params::{PickParams, SamplingParams};
use super::{GpuExecutor, GpuIds, GpuTensor};
use crate::error::Result;
use crate::gpu::Binding;
use crate::sampling::Draw;
use crate::shaders;

pub(super) fn penalize(
    ex: &mut GpuExecutor,
    logits: &mut GpuTensor,
    ids: &[u32],
    penalty: f32,
) -> Result<()> {
    if ids.is_empty() {
        return Ok(());
    }
    // A scratch buffer refilled in order, sized for a typical penalty window
    // at once: no buffer per sampling step while the window fills.
    let id_buf = ex.scratch("penalty ids", ids.len().max(1024) as u64 * 4)?;
    ex.rec.upload(&id_buf, 0, bytemuck::cast_slice(ids));
    let p = ex.pipeline(shaders::SAMPLING, "penalize", &[]);
    let params = SamplingParams {
        cols: logits.cols as u32,
        n: ids.len() as u32,
        penalty,
        k: 0,
    };
    ex.rec.dispatch(
        &p,
        params.words(),
        &[Binding::from(&logits.buf), Binding::from(&id_buf)],
        [ids.len().div_ceil(64) as u32, 1, 1],
    );
    Ok(())
}

/// Records top_k's pass over row 0 into the candidate scratch buffers.
fn record_top_k(
    ex: &mut GpuExecutor,
    logits: &GpuTensor,
    k: usize,
) -> Result<(wgpu::Buffer, wgpu::Buffer)> {
    let vals = ex.scratch("top-k values", 64 * 4)?;
    let ids = ex.scratch("top-k ids", 64 * 4)?;
    let p = ex.pipeline(shaders::SAMPLING, "top_k", &[]);
    let params = SamplingParams {
        cols: logits.cols as u32,
        n: 0,
        penalty: 0.0,
        k: k as u32,
    };
    ex.rec.dispatch(
        &p,
        params.words(),
        &[
            Binding::from(&logits.buf),
            Binding::from(&vals),
            Binding::from(&ids),
        ],
        [1, 1, 1],
    );
    Ok((vals, ids))
}

pub(super) fn top_k(ex: &mut GpuExecutor, logits: &GpuTensor, k: usize) -> Result<Vec<(u32, f32)>> {
    let (vals, ids) = record_top_k(ex, logits, k)?;
    let vi = ex.rec.read(&vals, 0, (k * 4) as u64);
    let ii = ex.rec.read(&ids, 0, (k * 4) as u64);
    let r = ex.rec.submit()?;
    let v: Vec<f32> = bytemuck::pod_collect_to_vec(&r.reads[vi]);
    let i: Vec<u32> = bytemuck::pod_collect_to_vec(&r.reads[ii]);
    Ok(i.into_iter()
        .zip(v)
        .filter(|(id, _)| *id != u32::MAX)
        .collect())
}

/// Top-k, then the pick with the draw, into `out[0]`; nothing is read back.
pub(super) fn sample(
    ex: &mut GpuExecutor,
    logits: &GpuTensor,
    out: &mut GpuIds,
    draw: &Draw,
) -> Result<()> {
    let (vals, ids) = record_top_k(ex, logits, draw.top_k)?;
    let p = ex.pipeline(shaders::SAMPLING, "pick", &[]);
    let params = PickParams {
        k: draw.top_k as u32,
        temperature: draw.temperature,
        top_p: draw.top_p,
        u: draw.u,
    };
    ex.rec.dispatch(
        &p,
        params.words(),
        &[
            Binding::from(&vals),
            Binding::from(&ids),
            Binding::from(&out.buf),
        ],
        [1, 1, 1],
    );
    Ok(())
}
