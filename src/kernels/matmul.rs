//! `y = x W^T` with f16 weights: `matmul_small.wgsl` for 1..=16 rows (decode and
//! speculative verification; a cooperative kernel for GPUs, a per-thread one for CPU
//! drivers), `matmul_tiled.wgsl` for prefill (and 2..=16 rows on CPU drivers). Weights split
//! across bindings are processed chunk by chunk, each writing its column range.
//! Quantized weights take `matmul_quant.wgsl`'s paths, chosen the same way, except
//! that on CPU drivers Q8_0, Q4_0 and Q4_1 take the per-thread kernel for any
//! number of rows (runs of 16 rows each decode the weights once).
//! Every kernel takes an RMSNorm of x (`lib/prologue.wgsl`) and an epilogue, and
//! can send the parts of a stacked weight's result to three tensors
//! (`lib/epilogue.wgsl`'s `route`).

use super::params::{MatmulSmallParams, QMatmulParams};
use super::quant;
use super::{GpuExecutor, GpuTensor, GpuWeight};
use crate::error::Result;
use crate::gpu::Binding;
use crate::ops::Epilogue;
use crate::quant::DType;
use crate::shaders;
use bytemuck::Zeroable;

/// Rows of x per run of the quantized multi-row per-thread kernel (`MAX_M` in
/// matmul_quant.wgsl; further runs take the grid's z).
const QUANT_ROWS_M: usize = 16;

/// Where a matmul's result goes.
pub(super) enum Out<'a> {
    /// All of it to one tensor, through an epilogue.
    One(&'a GpuTensor, Epilogue),
    /// Columns to three tensors in order, each taking as many as it has.
    Parts([&'a GpuTensor; 3]),
}

pub(super) fn matmul(
    ex: &mut GpuExecutor,
    x: &GpuTensor,
    w: &GpuWeight,
    out: Out<'_>,
    norm: Option<(&GpuWeight, f32)>,
) -> Result<()> {
    let (m, k4) = (x.rows, x.cols / 4);
    let (y, epi, parts) = match out {
        Out::One(y, epi) => (y, epi, None),
        Out::Parts([a, b, c]) => (a, Epilogue::Store, Some((a.cols, a.cols + b.cols, b, c))),
    };
    // With parts, rows of the result are the whole stacked width wide.
    let y_stride = parts.map_or(y.cols, |_| w.rows);
    if m == 0 || w.rows == 0 {
        return Ok(());
    }
    let qtype = quant::kernel_type(w.dtype);
    // Per-thread kernels: their loop iterations must stay under the loop limit.
    // f16 (one row of x): K/4 steps of 1 + M loads; quantized one row: K/32
    // blocks of 8 x loads and 4 x 4 weight groups; quantized 2..=QUANT_ROWS_M rows
    // (Q8_0, Q4_0, Q4_1; qmatmul_rows_m): per block 4 x 4 groups and 4 scales,
    // then per row of x 8 loads and 4 dots. (Measured on lavapipe: for f16 the
    // per-thread kernel beats the tiled one for 1 row and loses from 4; the
    // quantized multi-row one decodes each weight once per run of up to
    // QUANT_ROWS_M rows, where the tiled kernel decodes it once per 4 rows, so
    // it takes prefill too unless a short last run wastes most of a decode:
    // 17 rows ran at 0.7x the tiled kernel, 64 and 256 at 1.1-1.25x.)
    let runs = m.div_ceil(QUANT_ROWS_M);
    let multi_row = m > 1
        && (m <= QUANT_ROWS_M || 4 * m >= 3 * QUANT_ROWS_M * runs)
        && matches!(w.dtype, DType::Q8_0 | DType::Q4_0 | DType::Q4_1);
    let iterations = match qtype {
        None => k4 * (1 + m),
        Some(_) if multi_row => x.cols / 32 * (20 + 12 * m.min(QUANT_ROWS_M)),
        Some(_) => x.cols / 32 * 24,
    };
    let per_thread = ex.tuning.per_thread_kernels
        && (m == 1 || multi_row)
        && ex
            .tuning
            .loop_limit
            .is_none_or(|l| iterations as u64 + 1000 < l);
    let pairs = epi == Epilogue::SwigluPairs;
    if pairs && w.chunks.len() > 1 {
        // A gate row and its up row must meet in one kernel, and a weight
        // split across bindings may part them: the gate half goes to y and
        // the up half to a scratch tensor, then SwiGLU combines them.
        let h = w.rows / 2;
        let up = GpuTensor {
            buf: ex.scratch("pairs up", (m * h * 4) as u64)?,
            rows: m,
            cols: h,
        };
        let none = GpuTensor {
            buf: ex.scratch("no part 3", 16)?,
            rows: m,
            cols: 0,
        };
        matmul(ex, x, w, Out::Parts([y, &up, &none]), norm)?;
        let mut gate = GpuTensor {
            buf: y.buf.clone(),
            rows: m,
            cols: h,
        };
        return super::elementwise::binary(ex, "swiglu", &mut gate, &up);
    }
    // The cooperative kernel's weight rows per workgroup: each thread keeps
    // M x ROWS partial sums in 64 slots (with the norm, M sums of squares
    // more); pairs need an even count (gate rows, then their up rows).
    let coop_rows = {
        let r = if m == 1 {
            ex.tuning.gemv_rows
        } else {
            (64 / m as u32).clamp(1, 4)
        };
        let r = match norm {
            Some(_) => r.min(64u32.saturating_sub(m as u32) / m as u32),
            None => r,
        };
        if pairs {
            r & !1
        } else {
            r
        }
    };
    let small = m <= ex.tuning.small_max_rows && !ex.tuning.per_thread_kernels && coop_rows >= 1;
    // The dequantizing kernels take the type as their first override constant;
    // every kernel takes its epilogue (left at its default when storing, so
    // plain matmuls keep their pipelines).
    let constants = |rest: &[(&'static str, f64)]| -> Vec<(&'static str, f64)> {
        qtype
            .map(|q| ("QTYPE", q as f64))
            .into_iter()
            .chain(rest.iter().copied())
            .chain((epi != Epilogue::Store).then_some(("EPILOGUE", epi.code() as f64)))
            .chain(
                norm.into_iter()
                    .flat_map(|(_, eps)| [("NORM", 1.0), ("NORM_EPS", eps as f64)]),
            )
            .chain(
                parts
                    .into_iter()
                    .flat_map(|(b, c, _, _)| [("OUT_B", b as f64), ("OUT_C", c as f64)]),
            )
            .collect()
    };
    // Without parts the second and third outputs are unused stand-ins (each
    // its own buffer: writable bindings must not alias).
    let (y2, y3) = match parts {
        Some((_, _, b, c)) => (b.buf.clone(), c.buf.clone()),
        None => (ex.scratch("no part 2", 16)?, ex.scratch("no part 3", 16)?),
    };
    // Without the norm, x stands in for its weight (the binding is in every
    // pipeline's layout; the kernel does not read it).
    let norm_buf = norm.map_or(&x.buf, |(g, _)| &g.chunks[0].buffer);
    let blocks_per_row = x.cols / w.dtype.block().0;
    for chunk in &w.chunks {
        // The f16 kernels' blocks (small and tiled share a layout, as the layout
        // test checks) and the quantized one's, which adds its planes' offsets.
        let mut words = [0u32; 8];
        match qtype {
            None => words.copy_from_slice(
                MatmulSmallParams {
                    m: m as u32,
                    k4: k4 as u32,
                    rows: chunk.rows as u32,
                    n_offset: chunk.row_start as u32,
                    y_stride: y_stride as u32,
                    ..Zeroable::zeroed()
                }
                .words(),
            ),
            Some(_) => {
                let [qh_off, sc_off, ks_off, _] =
                    quant::planes(w.dtype, chunk.rows * blocks_per_row);
                words.copy_from_slice(
                    QMatmulParams {
                        m: m as u32,
                        k4: k4 as u32,
                        rows: chunk.rows as u32,
                        n_offset: chunk.row_start as u32,
                        y_stride: y_stride as u32,
                        qh_off: qh_off as u32,
                        sc_off: sc_off as u32,
                        ks_off: ks_off as u32,
                    }
                    .words(),
                )
            }
        }
        let bindings = [
            Binding::from(&x.buf),
            Binding::from(&chunk.buffer),
            Binding::from(&y.buf),
            Binding::from(norm_buf),
            Binding::from(&y2),
            Binding::from(&y3),
        ];
        if per_thread {
            // CPU drivers run workgroups on their threads: aim for 2 per core.
            let threads = chunk.rows.div_ceil(4);
            let want = 2 * ex.tuning.cpu_threads.max(1);
            let wg = (threads / want).clamp(8, 64).next_power_of_two().min(64);
            let (shader, entry) = match qtype {
                None if k4 % 2 == 0 => (shaders::MATMUL_SMALL, "matmul_rows8"),
                None => (shaders::MATMUL_SMALL, "matmul_rows"),
                Some(_) if m > 1 => (shaders::MATMUL_QUANT, "qmatmul_rows_m"),
                Some(_) if w.dtype.block().0 == 256 => (shaders::MATMUL_QUANT, "qmatmul_rows_k"),
                Some(_) => (shaders::MATMUL_QUANT, "qmatmul_rows"),
            };
            let p = ex.pipeline(shader, entry, &constants(&[("ROWS_WG", wg as f64)]));
            let mut groups = ex.grid(threads.div_ceil(wg))?;
            groups[2] = runs as u32;
            ex.rec.dispatch(&p, &words, &bindings, groups);
        } else if small {
            // M * ROWS partial sums per thread must fit the kernel's 64 registers.
            let rows = coop_rows;
            let (shader, entry) = match qtype {
                None => (shaders::MATMUL_SMALL, "matmul_small"),
                Some(_) => (shaders::MATMUL_QUANT, "qmatmul_small"),
            };
            let p = ex.pipeline(shader, entry, &constants(&[("ROWS", rows as f64)]));
            let groups = ex.grid(chunk.rows.div_ceil(rows as usize))?;
            ex.rec.dispatch(&p, &words, &bindings, groups);
        } else {
            let (wx, wy) = ex.tuning.tiled_wg;
            let (shader, entry) = match qtype {
                None => (shaders::MATMUL_TILED, "matmul_tiled"),
                Some(_) => (shaders::MATMUL_QUANT, "qmatmul_tiled"),
            };
            let p = ex.pipeline(
                shader,
                entry,
                &constants(&[("WG_X", wx as f64), ("WG_Y", wy as f64)]),
            );
            let gx = chunk.rows.div_ceil(4 * wx as usize) as u32;
            let gy = m.div_ceil(4 * wy as usize) as u32;
            ex.rec.dispatch(&p, &words, &bindings, [gx, gy, 1]);
        }
    }
    Ok(())
}
