//! KV append (`kv_append.wgsl`): one pass per arena buffer.

use super::{GpuExecutor, GpuKv, GpuTensor};
use crate::attention::PageTable;
use crate::error::Result;
use crate::gpu::Binding;
use crate::ops::check;
use crate::shaders;

pub(super) fn kv_append(
    ex: &mut GpuExecutor,
    kv: &mut GpuKv,
    layer: usize,
    table: &PageTable,
    start: usize,
    k: &GpuTensor,
    v: &GpuTensor,
) -> Result<()> {
    let l = kv.layout;
    check::kv_append(&l, layer, table, start, (k.rows, k.cols), (v.rows, v.cols))?;
    if k.rows == 0 {
        return Ok(());
    }
    let pages = ex.page_table(table);
    let words = l.head_dim / 2;
    let p = ex.pipeline(shaders::KV_APPEND, "kv_append", &[]);
    let groups = ex.grid((k.rows * l.kv_heads * words).div_ceil(64))?;
    // Only arenas holding one of the touched pages need a pass.
    for a in kv.arenas_for(table, start..start + k.rows) {
        let (ka, va) = (&kv.k[layer][a], &kv.v[layer][a]);
        let lo = (a * kv.pages_per_arena) as u32;
        let params = [
            k.rows as u32,
            start as u32,
            l.kv_heads as u32,
            words as u32,
            l.page_size as u32,
            lo,
            kv.pages_per_arena as u32,
            0,
        ];
        let b = [
            Binding::from(&k.buf),
            Binding::from(&v.buf),
            Binding::from(&pages),
            Binding::from(ka),
            Binding::from(va),
        ];
        ex.rec.dispatch(&p, &params, &b, groups);
    }
    Ok(())
}
