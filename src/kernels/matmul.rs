//! `y = x W^T` with f16 weights: `matmul_small.wgsl` for 1..=16 rows (decode and
//! speculative verification; a cooperative kernel for GPUs, a per-thread one for CPU
//! drivers), `matmul_tiled.wgsl` for prefill (and 2..=16 rows on CPU drivers). Weights split
//! across bindings are processed chunk by chunk, each writing its column range.
//! Quantized weights take `matmul_quant.wgsl`'s three paths, chosen the same way.

use super::params::{MatmulSmallParams, QMatmulParams};
use super::quant;
use super::{GpuExecutor, GpuTensor, GpuWeight};
use crate::error::Result;
use crate::gpu::Binding;
use crate::shaders;
use bytemuck::Zeroable;

pub(super) fn matmul(
    ex: &mut GpuExecutor,
    x: &GpuTensor,
    w: &GpuWeight,
    y: &mut GpuTensor,
) -> Result<()> {
    let (m, k4) = (x.rows, x.cols / 4);
    if m == 0 || w.rows == 0 {
        return Ok(());
    }
    if let Some(qtype) = quant::kernel_type(w.dtype) {
        return matmul_quant(ex, x, w, y, qtype);
    }
    let small = m <= ex.tuning.small_max_rows;
    // Per-thread kernel: k4 * (1 + m) loop iterations must stay under a loop limit.
    // (Measured on lavapipe: it beats the tiled kernel for 1 row, loses from 4 rows.)
    let per_thread = ex.tuning.per_thread_kernels
        && m == 1
        && ex
            .tuning
            .loop_limit
            .is_none_or(|l| (k4 * (1 + m)) as u64 + 1000 < l);
    for chunk in &w.chunks {
        // The tiled kernel's block has the same layout (the layout test checks both).
        let params = MatmulSmallParams {
            m: m as u32,
            k4: k4 as u32,
            rows: chunk.rows as u32,
            n_offset: chunk.row_start as u32,
            y_stride: y.cols as u32,
            ..Zeroable::zeroed()
        };
        let params = params.words();
        let bindings = [
            Binding::from(&x.buf),
            Binding::from(&chunk.buffer),
            Binding::from(&y.buf),
        ];
        if per_thread {
            // CPU drivers run workgroups on their threads: aim for 2 per core.
            let threads = chunk.rows.div_ceil(4);
            let want = 2 * ex.tuning.cpu_threads.max(1);
            let wg = (threads / want).clamp(8, 64).next_power_of_two().min(64);
            let p = ex.pipeline(
                shaders::MATMUL_SMALL,
                if k4 % 2 == 0 {
                    "matmul_rows8"
                } else {
                    "matmul_rows"
                },
                &[("ROWS_WG", wg as f64)],
            );
            let groups = ex.grid(threads.div_ceil(wg))?;
            ex.rec.dispatch(&p, params, &bindings, groups);
        } else if small && !ex.tuning.per_thread_kernels {
            // M * ROWS partial sums per thread must fit the kernel's 64 registers.
            let rows = if m == 1 {
                ex.tuning.gemv_rows
            } else {
                (64 / m as u32).clamp(1, 4)
            };
            let p = ex.pipeline(
                shaders::MATMUL_SMALL,
                "matmul_small",
                &[("ROWS", rows as f64)],
            );
            let groups = ex.grid(chunk.rows.div_ceil(rows as usize))?;
            ex.rec.dispatch(&p, params, &bindings, groups);
        } else {
            let (wx, wy) = ex.tuning.tiled_wg;
            let p = ex.pipeline(
                shaders::MATMUL_TILED,
                "matmul_tiled",
                &[("WG_X", wx as f64), ("WG_Y", wy as f64)],
            );
            let gx = chunk.rows.div_ceil(4 * wx as usize) as u32;
            let gy = m.div_ceil(4 * wy as usize) as u32;
            ex.rec.dispatch(&p, params, &bindings, [gx, gy, 1]);
        }
    }
    Ok(())
}

/// [`matmul`] over a quantized weight: the same path choice, with the
/// dequantizing kernels (QTYPE `qtype`).
fn matmul_quant(
    ex: &mut GpuExecutor,
    x: &GpuTensor,
    w: &GpuWeight,
    y: &mut GpuTensor,
    qtype: u32,
) -> Result<()> {
    let (m, k4) = (x.rows, x.cols / 4);
    let blocks_per_row = x.cols / w.dtype.block().0;
    let k_type = w.dtype.block().0 == 256;
    // The per-thread kernel (one row of x) runs K/32 blocks of 8 x loads and
    // 4 x 4 weight groups.
    let per_thread = ex.tuning.per_thread_kernels
        && m == 1
        && ex
            .tuning
            .loop_limit
            .is_none_or(|l| (x.cols / 32 * 24) as u64 + 1000 < l);
    let small = m <= ex.tuning.small_max_rows && !ex.tuning.per_thread_kernels;
    let qt = ("QTYPE", qtype as f64);
    for chunk in &w.chunks {
        let [qh_off, sc_off, ks_off, _] = quant::planes(w.dtype, chunk.rows * blocks_per_row);
        let params = QMatmulParams {
            m: m as u32,
            k4: k4 as u32,
            rows: chunk.rows as u32,
            n_offset: chunk.row_start as u32,
            y_stride: y.cols as u32,
            qh_off: qh_off as u32,
            sc_off: sc_off as u32,
            ks_off: ks_off as u32,
        };
        let params = params.words();
        let bindings = [
            Binding::from(&x.buf),
            Binding::from(&chunk.buffer),
            Binding::from(&y.buf),
        ];
        if per_thread {
            let threads = chunk.rows.div_ceil(4);
            let want = 2 * ex.tuning.cpu_threads.max(1);
            let wg = (threads / want).clamp(8, 64).next_power_of_two().min(64);
            let p = ex.pipeline(
                shaders::MATMUL_QUANT,
                if k_type {
                    "qmatmul_rows_k"
                } else {
                    "qmatmul_rows"
                },
                &[qt, ("ROWS_WG", wg as f64)],
            );
            let groups = ex.grid(threads.div_ceil(wg))?;
            ex.rec.dispatch(&p, params, &bindings, groups);
        } else if small {
            let rows = if m == 1 {
                ex.tuning.gemv_rows
            } else {
                (64 / m as u32).clamp(1, 4)
            };
            let p = ex.pipeline(
                shaders::MATMUL_QUANT,
                "qmatmul_small",
                &[qt, ("ROWS", rows as f64)],
            );
            let groups = ex.grid(chunk.rows.div_ceil(rows as usize))?;
            ex.rec.dispatch(&p, params, &bindings, groups);
        } else {
            let (wx, wy) = ex.tuning.tiled_wg;
            let p = ex.pipeline(
                shaders::MATMUL_QUANT,
                "qmatmul_tiled",
                &[qt, ("WG_X", wx as f64), ("WG_Y", wy as f64)],
            );
            let gx = chunk.rows.div_ceil(4 * wx as usize) as u32;
            let gy = m.div_ceil(4 * wy as usize) as u32;
            ex.rec.dispatch(&p, params, &bindings, [gx, gy, 1]);
        }
    }
    Ok(())
}
