//! RMSNorm (`rmsnorm.wgsl`): one workgroup per row (per head for per-head norms).

use super::params::RmsNormParams;
use super::{GpuExecutor, GpuTensor, GpuWeight};
use crate::error::Result;
use crate::gpu::Binding;
use crate::shaders;

pub(super) fn rms_norm(
    ex: &mut GpuExecutor,
    x: &GpuTensor,
    w: &GpuWeight,
    eps: f32,
    y: &mut GpuTensor,
) -> Result<()> {
    let p = ex.pipeline(shaders::RMSNORM, "rmsnorm", &[]);
    // Per-head norms are rows of the weight's length.
    let rows = x.rows * (x.cols / w.cols.max(1));
    let groups = ex.grid(rows)?;
    let params = RmsNormParams {
        rows: rows as u32,
        cols: w.cols as u32,
        eps,
        _p0: 0,
    };
    ex.rec.dispatch(
        &p,
        params.words(),
        &[
            Binding::from(&x.buf),
            Binding::from(&w.chunks[0].buffer),
            Binding::from(&y.buf),
        ],
        groups,
    );
    Ok(())
}
