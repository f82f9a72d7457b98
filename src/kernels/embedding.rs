//! Embedding gather (`embedding.wgsl`), one dispatch per chunk of the table;
//! quantized tables through `embedding_q`.

use super::params::EmbeddingParams;
use super::quant;
use super::{GpuExecutor, GpuIds, GpuTensor, GpuWeight};
use crate::error::Result;
use crate::gpu::Binding;
use crate::shaders;

pub(super) fn embed(
    ex: &mut GpuExecutor,
    ids: &GpuIds,
    table: &GpuWeight,
    out: &mut GpuTensor,
) -> Result<()> {
    let words = table.cols / 2;
    let qtype = quant::kernel_type(table.dtype);
    let (p, per_thread) = match qtype {
        Some(q) => (
            ex.pipeline(shaders::EMBEDDING, "embedding_q", &[("QTYPE", q as f64)]),
            4,
        ),
        None => (ex.pipeline(shaders::EMBEDDING, "embedding", &[]), 1),
    };
    let groups = ex.grid((ids.len * words / per_thread).div_ceil(64))?;
    for chunk in &table.chunks {
        let blocks = chunk.rows * table.cols / table.dtype.block().0;
        let [qh_off, sc_off, ks_off, _] = quant::planes(table.dtype, blocks);
        let params = EmbeddingParams {
            tokens: ids.len as u32,
            words: words as u32,
            row_start: chunk.row_start as u32,
            rows: chunk.rows as u32,
            qh_off: qh_off as u32,
            sc_off: sc_off as u32,
            ks_off: ks_off as u32,
            ..bytemuck::Zeroable::zeroed()
        };
        ex.rec.dispatch(
            &p,
            params.words(),
            &[
                Binding::from(&ids.buf),
                Binding::from(&chunk.buffer),
                Binding::from(&out.buf),
            ],
            groups,
        );
    }
    Ok(())
}
