//! Repetition penalty and top-k selection (`sampling.wgsl`): a sampling step reads
//! back k candidates, never the whole vocabulary.

use super::params::SamplingParams;
use super::{GpuExecutor, GpuTensor};
use crate::error::Result;
use crate::gpu::Binding;
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

pub(super) fn top_k(ex: &mut GpuExecutor, logits: &GpuTensor, k: usize) -> Result<Vec<(u32, f32)>> {
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
