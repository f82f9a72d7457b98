//! Rotary embedding of queries (`rope.wgsl`); keys are rotated inside attention.

use super::params::RopeParams;
use super::{GpuExecutor, GpuIds, GpuRope, GpuTensor};
use crate::error::Result;
use crate::gpu::Binding;
use crate::shaders;

pub(super) fn rope(
    ex: &mut GpuExecutor,
    x: &mut GpuTensor,
    heads: usize,
    pos: &GpuIds,
    rope: &GpuRope,
) -> Result<()> {
    let d = rope.half * 2;
    let n = x.rows * heads * rope.half;
    let p = ex.pipeline(shaders::ROPE, "rope", &[]);
    let groups = ex.grid(n.div_ceil(64))?;
    let params = RopeParams {
        rows: x.rows as u32,
        heads: heads as u32,
        head_dim: d as u32,
        max_pos: rope.max_pos as u32,
    };
    ex.rec.dispatch(
        &p,
        params.words(),
        &[
            Binding::from(&x.buf),
            Binding::from(&pos.buf),
            Binding::from(&rope.buf),
        ],
        groups,
    );
    Ok(())
}
