//! Embedding gather (`embedding.wgsl`), one dispatch per chunk of the table.

use super::params::EmbeddingParams;
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
    let p = ex.pipeline(shaders::EMBEDDING, "embedding", &[]);
    let groups = ex.grid((ids.len * words).div_ceil(64))?;
    for chunk in &table.chunks {
        let params = EmbeddingParams {
            tokens: ids.len as u32,
            words: words as u32,
            row_start: chunk.row_start as u32,
            rows: chunk.rows as u32,
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
