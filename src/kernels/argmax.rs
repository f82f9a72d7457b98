//! Row-wise argmax (`argmax.wgsl`): greedy sampling reads back 4 bytes per row.

use super::params::ArgmaxParams;
use super::{GpuExecutor, GpuIds, GpuTensor};
use crate::error::Result;
use crate::gpu::Binding;
use crate::shaders;

pub(super) fn argmax(ex: &mut GpuExecutor, x: &GpuTensor, out: &mut GpuIds) -> Result<()> {
    let p = ex.pipeline(shaders::ARGMAX, "argmax", &[]);
    let params = ArgmaxParams {
        rows: x.rows as u32,
        cols: x.cols as u32,
        _p0: 0,
        _p1: 0,
    };
    ex.rec.dispatch(
        &p,
        params.words(),
        &[Binding::from(&x.buf), Binding::from(&out.buf)],
        [x.rows as u32, 1, 1],
    );
    Ok(())
}
