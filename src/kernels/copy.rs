//! Buffer copy kernel (`copy.wgsl`): the adapter's bandwidth ceiling for benches.

use super::GpuExecutor;
use crate::error::{shape_err, Result};
use crate::gpu::Binding;
use crate::shaders;

/// Records a kernel copy of `bytes` (a multiple of 16) from `src` to `dst`.
pub fn copy_buffer(
    ex: &mut GpuExecutor,
    src: &wgpu::Buffer,
    dst: &wgpu::Buffer,
    bytes: u64,
) -> Result<()> {
    if !bytes.is_multiple_of(16) || bytes > src.size() || bytes > dst.size() {
        return shape_err(
            "copy",
            format!("{bytes} bytes: must be a multiple of 16 within both buffers"),
        );
    }
    let n = (bytes / 16) as usize;
    let p = ex.pipeline(shaders::COPY, "copy", &[]);
    let groups = ex.grid(n.div_ceil(64))?;
    ex.rec.dispatch(
        &p,
        super::params::CopyParams {
            n: n as u32,
            ..bytemuck::Zeroable::zeroed()
        }
        .words(),
        &[Binding::from(src), Binding::from(dst)],
        groups,
    );
    Ok(())
}
