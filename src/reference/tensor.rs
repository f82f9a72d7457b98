//! The reference's tensor ops: f32 on the CPU, GEMM through `matrixmultiply`.

use super::{
    argmax_row, dot_rows, rotate, top_k_row, RefExecutor, RefRope, RefTensor, RefWeight, SMALL_M,
};
use crate::error::Result;
use crate::ops::{check, Epilogue, IdsTicket, RopeConfig, TensorOps};
use crate::quant::DType;
use crate::sampling::{pick, Draw};
use half::f16;
use rayon::prelude::*;
use std::ops::Range;

impl TensorOps for RefExecutor {
    fn run_tensor(&mut self, rows: usize, cols: usize) -> Result<RefTensor> {
        Ok(RefTensor {
            data: vec![0.0; rows * cols],
            rows,
            cols,
        })
    }

    fn run_upload(&mut self, data: &[f32], rows: usize, cols: usize) -> Result<RefTensor> {
        Ok(RefTensor {
            data: data.to_vec(),
            rows,
            cols,
        })
    }

    fn run_download(&mut self, t: &RefTensor) -> Result<Vec<f32>> {
        Ok(t.data.clone())
    }

    fn run_ids(&mut self, data: &[u32]) -> Result<Vec<u32>> {
        Ok(data.to_vec())
    }

    fn run_set_ids(&mut self, ids: &mut Vec<u32>, data: &[u32]) -> Result<()> {
        ids.copy_from_slice(data);
        Ok(())
    }

    fn run_download_ids(&mut self, ids: &Vec<u32>) -> Result<Vec<u32>> {
        Ok(ids.clone())
    }

    fn run_read_ids_later(&mut self, ids: &Vec<u32>) -> Result<IdsTicket> {
        Ok(IdsTicket::ready(ids.clone()))
    }

    fn run_finish_read(&mut self, ticket: u64) -> Result<Vec<u32>> {
        Err(crate::error::Error::InvalidOption(format!(
            "the reference executor issued no readback ticket {ticket}"
        )))
    }

    fn run_weight(
        &mut self,
        dtype: DType,
        bytes: &[u8],
        rows: usize,
        cols: usize,
    ) -> Result<RefWeight> {
        // Quantized matrices stay as blocks; vectors (norms, biases) and float
        // types become f32 of f16 values, as the GPU stores them.
        if dtype.is_quantized() && rows > 1 {
            return Ok(RefWeight {
                data: Vec::new(),
                blocks: Some((dtype, bytes.to_vec())),
                rows,
                cols,
            });
        }
        let mut data = vec![0.0; rows * cols];
        crate::quant::dequantize(dtype, bytes, &mut data)?;
        if dtype != DType::F16 {
            data.iter_mut()
                .for_each(|v| *v = f16::from_f32(*v).to_f32());
        }
        Ok(RefWeight {
            data,
            blocks: None,
            rows,
            cols,
        })
    }

    fn run_rope_table(&mut self, cfg: &RopeConfig) -> Result<RefRope> {
        Ok(RefRope {
            cs: cfg.table()?,
            half: cfg.head_dim / 2,
            max_pos: cfg.max_positions,
        })
    }

    fn run_matmul(
        &mut self,
        x: &RefTensor,
        w: &RefWeight,
        y: &mut RefTensor,
        epi: Epilogue,
    ) -> Result<()> {
        if epi == Epilogue::Store {
            return matmul_store(x, w, y);
        }
        if epi == Epilogue::SwigluPairs {
            // Both halves, then SwiGLU of the gate half with the up half.
            let (m, h) = (x.rows, w.rows / 2);
            let mut s = RefTensor {
                data: vec![0.0; m * 2 * h],
                rows: m,
                cols: 2 * h,
            };
            matmul_store(x, w, &mut s)?;
            let mut up = RefTensor {
                data: vec![0.0; m * h],
                rows: m,
                cols: h,
            };
            copy_columns(&s, 0, y);
            copy_columns(&s, h, &mut up);
            return self.run_swiglu(y, &up);
        }
        // The unfused ops, so both executors agree with the model before fusion.
        let mut s = RefTensor {
            data: vec![0.0; y.data.len()],
            rows: y.rows,
            cols: y.cols,
        };
        matmul_store(x, w, &mut s)?;
        match epi {
            Epilogue::Add => self.run_add(y, &s),
            _ => self.run_swiglu(y, &s),
        }
    }

    fn run_norm_matmul(
        &mut self,
        x: &RefTensor,
        norm: &RefWeight,
        eps: f32,
        w: &RefWeight,
        y: &mut RefTensor,
        epi: Epilogue,
    ) -> Result<()> {
        // The unfused ops, the GPU kernels' twin.
        let mut h = RefTensor {
            data: vec![0.0; x.data.len()],
            rows: x.rows,
            cols: x.cols,
        };
        self.run_rms_norm(x, norm, eps, &mut h)?;
        self.run_matmul(&h, w, y, epi)
    }

    fn run_matmul_parts(
        &mut self,
        x: &RefTensor,
        norm: Option<(&RefWeight, f32)>,
        w: &RefWeight,
        ys: [&mut RefTensor; 3],
    ) -> Result<()> {
        // The whole result, then each part's columns copied out.
        let mut full = RefTensor {
            data: vec![0.0; x.rows * w.rows],
            rows: x.rows,
            cols: w.rows,
        };
        match norm {
            Some((g, eps)) => self.run_norm_matmul(x, g, eps, w, &mut full, Epilogue::Store)?,
            None => matmul_store(x, w, &mut full)?,
        }
        let mut c0 = 0;
        for y in ys {
            copy_columns(&full, c0, y);
            c0 += y.cols;
        }
        Ok(())
    }

    fn run_rms_norm(
        &mut self,
        x: &RefTensor,
        w: &RefWeight,
        eps: f32,
        y: &mut RefTensor,
    ) -> Result<()> {
        let c = w.cols;
        if c == 0 {
            return Ok(());
        }
        y.data
            .par_chunks_mut(c)
            .zip(x.data.par_chunks(c))
            .for_each(|(yr, xr)| {
                let ss: f32 = xr.iter().map(|v| v * v).sum();
                let inv = 1.0 / (ss / c as f32 + eps).sqrt();
                for ((o, &v), &g) in yr.iter_mut().zip(xr).zip(&w.data) {
                    *o = v * inv * g;
                }
            });
        Ok(())
    }

    fn run_rope(
        &mut self,
        x: &mut RefTensor,
        heads: usize,
        positions: &Vec<u32>,
        rope: &RefRope,
    ) -> Result<()> {
        let d = rope.half * 2;
        if x.cols == 0 {
            return Ok(());
        }
        let cols = x.cols;
        x.data
            .par_chunks_mut(cols)
            .enumerate()
            .for_each(|(r, row)| {
                let cs = rope.row(positions[r] as usize);
                for h in 0..heads {
                    rotate(&mut row[h * d..(h + 1) * d], &cs);
                }
            });
        Ok(())
    }

    fn run_swiglu(&mut self, gate: &mut RefTensor, up: &RefTensor) -> Result<()> {
        gate.data.par_iter_mut().zip(&up.data).for_each(|(g, &u)| {
            *g = *g / (1.0 + (-*g).exp()) * u;
        });
        Ok(())
    }

    fn run_add(&mut self, acc: &mut RefTensor, x: &RefTensor) -> Result<()> {
        acc.data.iter_mut().zip(&x.data).for_each(|(a, &b)| *a += b);
        Ok(())
    }

    fn run_embed(&mut self, ids: &Vec<u32>, table: &RefWeight, out: &mut RefTensor) -> Result<()> {
        // Ids are data, not shape: the front cannot see a device's copy, so
        // the GPU gathers nothing for an id outside the table (the engine
        // checks ids before upload) and the reference refuses it here.
        check::token_ids(ids, table.rows)?;
        let c = table.cols;
        for (t, &id) in ids.iter().enumerate() {
            table.row_into(id as usize, &mut out.data[t * c..(t + 1) * c]);
        }
        Ok(())
    }

    fn run_add_bias(&mut self, x: &mut RefTensor, bias: &RefWeight) -> Result<()> {
        if x.cols == 0 {
            return Ok(());
        }
        for row in x.data.chunks_mut(x.cols) {
            row.iter_mut().zip(&bias.data).for_each(|(a, b)| *a += b);
        }
        Ok(())
    }

    fn run_copy_rows(
        &mut self,
        src: &RefTensor,
        src_row: usize,
        dst: &mut RefTensor,
        dst_row: usize,
        rows: usize,
    ) -> Result<()> {
        let c = src.cols;
        dst.data[dst_row * c..(dst_row + rows) * c]
            .copy_from_slice(&src.data[src_row * c..(src_row + rows) * c]);
        Ok(())
    }

    fn run_mean_rows(
        &mut self,
        x: &RefTensor,
        rows: Range<usize>,
        out: &mut RefTensor,
    ) -> Result<()> {
        let c = x.cols;
        let o = &mut out.data[..c];
        o.iter_mut().for_each(|v| *v = 0.0);
        for r in rows.clone() {
            for (v, xv) in o.iter_mut().zip(&x.data[r * c..(r + 1) * c]) {
                *v += xv;
            }
        }
        let inv = rows.len() as f32;
        o.iter_mut().for_each(|v| *v /= inv);
        Ok(())
    }

    fn run_argmax(&mut self, x: &RefTensor, out: &mut Vec<u32>) -> Result<()> {
        for (r, o) in out.iter_mut().take(x.rows).enumerate() {
            *o = argmax_row(&x.data[r * x.cols..(r + 1) * x.cols]);
        }
        Ok(())
    }

    fn run_penalize(&mut self, logits: &mut RefTensor, ids: &[u32], penalty: f32) -> Result<()> {
        for &t in ids {
            if let Some(l) = logits.data[..logits.cols].get_mut(t as usize) {
                *l = if *l > 0.0 { *l / penalty } else { *l * penalty };
            }
        }
        Ok(())
    }

    fn run_top_k(&mut self, logits: &RefTensor, k: usize) -> Result<Vec<(u32, f32)>> {
        Ok(top_k_row(&logits.data[..logits.cols], k))
    }

    fn run_sample(&mut self, logits: &RefTensor, out: &mut Vec<u32>, draw: &Draw) -> Result<()> {
        let cands = top_k_row(&logits.data[..logits.cols], draw.top_k);
        // No candidate (every logit NaN) leaves an id past the vocabulary,
        // which the session reports, as the GPU's pick does.
        out[0] = pick(&cands, draw.temperature, draw.top_p, draw.u).unwrap_or(u32::MAX);
        Ok(())
    }
}

/// `y[:, col0..col0 + n] = x W^T` for x `[m, k]` and W `[n, k]` (row-major),
/// y `[m, y_cols]`.
#[allow(clippy::too_many_arguments)]
fn sgemm_cols(
    x: &[f32],
    m: usize,
    k: usize,
    w: &[f32],
    n: usize,
    col0: usize,
    y: &mut [f32],
    y_cols: usize,
) {
    assert!(x.len() >= m * k && w.len() >= n * k && col0 + n <= y_cols && y.len() >= m * y_cols);
    // SAFETY: the pointers and strides describe x [m,k], W^T [k,n] (W is [n,k]
    // row-major) and the [m, n] block of y at column col0 with row stride
    // y_cols, all within their slices (asserted above).
    unsafe {
        matrixmultiply::sgemm(
            m,
            k,
            n,
            1.0,
            x.as_ptr(),
            k as isize,
            1,
            w.as_ptr(),
            1,
            k as isize,
            0.0,
            y.as_mut_ptr().add(col0),
            y_cols as isize,
            1,
        );
    }
}

/// Columns `c0..c0 + y.cols` of every row of `full` into `y`.
fn copy_columns(full: &RefTensor, c0: usize, y: &mut RefTensor) {
    if y.cols == 0 {
        return;
    }
    for (dst, src) in y.data.chunks_mut(y.cols).zip(full.data.chunks(full.cols)) {
        dst.copy_from_slice(&src[c0..c0 + y.cols]);
    }
}

/// `y = x W^T` (the reference's matmul; epilogues apply after it).
fn matmul_store(x: &RefTensor, w: &RefWeight, y: &mut RefTensor) -> Result<()> {
    let (m, k, n) = (x.rows, x.cols, w.rows);
    if m == 0 || n == 0 {
        return Ok(());
    }
    if m <= SMALL_M {
        // Few rows (decode, verify trees): one pass over the weights, each
        // weight row reused from L1 for every x row. sgemm would repack the
        // whole weight matrix per call, which costs ~5x a GEMV at m = 2.
        let xs: Vec<&[f32]> = x.data.chunks(k).collect();
        let mut yt = vec![0.0f32; n * m];
        yt.par_chunks_mut(256 * m).enumerate().for_each(|(c, out)| {
            let mut row = if w.blocks.is_some() {
                vec![0.0; k]
            } else {
                Vec::new()
            };
            for (i, o) in out.chunks_mut(m).enumerate() {
                let r = c * 256 + i;
                if w.blocks.is_some() {
                    w.row_into(r, &mut row);
                    dot_rows(&xs, &row, o);
                } else {
                    dot_rows(&xs, &w.data[r * k..(r + 1) * k], o);
                }
            }
        });
        if m == 1 {
            y.data.copy_from_slice(&yt);
        } else {
            for (r, row) in yt.chunks(m).enumerate() {
                for (i, &v) in row.iter().enumerate() {
                    y.data[i * n + r] = v;
                }
            }
        }
        return Ok(());
    }
    if w.blocks.is_none() {
        sgemm_cols(&x.data, m, k, &w.data, n, 0, &mut y.data, n);
        return Ok(());
    }
    // A quantized matrix: decode a panel of rows at a time (never the whole
    // matrix), each panel filling its columns of y.
    const PANEL: usize = 512;
    let mut panel = vec![0.0f32; PANEL.min(n) * k];
    for r0 in (0..n).step_by(PANEL) {
        let rows = PANEL.min(n - r0);
        panel[..rows * k]
            .par_chunks_mut(k)
            .enumerate()
            .for_each(|(i, row)| w.row_into(r0 + i, row));
        sgemm_cols(&x.data, m, k, &panel[..rows * k], rows, r0, &mut y.data, n);
    }
    Ok(())
}
