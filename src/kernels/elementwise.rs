//! SwiGLU, residual add, bias add and row mean (`elementwise.wgsl`).

use super::params::ElementwiseParams;
use super::{GpuExecutor, GpuTensor};
use crate::error::Result;
use crate::gpu::Binding;
use crate::shaders;
use bytemuck::Zeroable;

pub(super) fn binary(
    ex: &mut GpuExecutor,
    entry: &'static str,
    a: &mut GpuTensor,
    b: &GpuTensor,
) -> Result<()> {
    let n = a.rows * a.cols;
    let p = ex.pipeline(shaders::ELEMENTWISE, entry, &[]);
    let groups = ex.grid(n.div_ceil(64))?;
    ex.rec.dispatch(
        &p,
        ElementwiseParams {
            n: n as u32,
            ..Zeroable::zeroed()
        }
        .words(),
        &[Binding::from(&a.buf), Binding::from(&b.buf)],
        groups,
    );
    Ok(())
}

pub(super) fn add_bias(
    ex: &mut GpuExecutor,
    x: &mut GpuTensor,
    bias: &super::GpuWeight,
) -> Result<()> {
    let n = x.rows * x.cols;
    let p = ex.pipeline(shaders::ELEMENTWISE, "add_bias", &[]);
    let groups = ex.grid(n.div_ceil(64))?;
    ex.rec.dispatch(
        &p,
        ElementwiseParams {
            n: n as u32,
            cols: x.cols as u32,
            ..Zeroable::zeroed()
        }
        .words(),
        &[Binding::from(&x.buf), Binding::from(&bias.chunks[0].buffer)],
        groups,
    );
    Ok(())
}

pub(super) fn mean_rows(
    ex: &mut GpuExecutor,
    x: &GpuTensor,
    rows: std::ops::Range<usize>,
    out: &mut GpuTensor,
) -> Result<()> {
    let p = ex.pipeline(shaders::ELEMENTWISE, "mean_rows", &[]);
    let groups = ex.grid(x.cols.div_ceil(64))?;
    ex.rec.dispatch(
        &p,
        ElementwiseParams {
            n: x.cols as u32,
            cols: 0,
            row0: rows.start as u32,
            rows: rows.len() as u32,
        }
        .words(),
        &[Binding::from(&out.buf), Binding::from(&x.buf)],
        groups,
    );
    Ok(())
}
