//! Tensor ops: activations, ids and weights, and the dense layer ops
//! (matmul, norms, RoPE, elementwise, gathers, sampling helpers).

use super::{check, Executor, RopeConfig};
use crate::error::{shape_err, Error, Result};
use crate::quant::DType;
use crate::sampling::Draw;
use half::f16;
use std::ops::Range;

/// What a matmul does with its result `s = x W^T` ([`TensorOps::matmul_then`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Epilogue {
    /// `y = s`.
    #[default]
    Store,
    /// `y += s`, as [`TensorOps::add`] would (the residual add).
    Add,
    /// `y = silu(y) * s`, as [`TensorOps::swiglu`] would with `y` holding the
    /// gate projection and `s` the up projection.
    Swiglu,
    /// W stacks the gate and up projections, `[gate; up]` (`2n` rows), and
    /// `y` `[m, n]` gets `silu(x gate^T) * (x up^T)`: SwiGLU's two matmuls in one.
    SwigluPairs,
}

impl Epilogue {
    /// The kernels' `EPILOGUE` override constant.
    pub fn code(self) -> u32 {
        match self {
            Epilogue::Store => 0,
            Epilogue::Add => 1,
            Epilogue::Swiglu => 2,
            Epilogue::SwigluPairs => 3,
        }
    }
}

/// A readback started by [`TensorOps::read_ids_later`]; [`TensorOps::finish_read`]
/// returns its ids.
#[derive(Debug)]
pub struct IdsTicket(Ticket);

#[derive(Debug)]
enum Ticket {
    /// Read already (an executor that runs ops as they are called).
    Ready(Vec<u32>),
    /// The executor's ticket for a readback riding on a submit.
    Pending(u64),
}

impl IdsTicket {
    /// Ids read at once.
    pub fn ready(ids: Vec<u32>) -> Self {
        IdsTicket(Ticket::Ready(ids))
    }
    /// A readback the executor knows by `ticket`.
    pub fn pending(ticket: u64) -> Self {
        IdsTicket(Ticket::Pending(ticket))
    }
}

/// Tensor ops. Callers use the checked methods; executors implement the
/// `run_*` methods, which may assume the checks passed.
pub trait TensorOps: Executor {
    /// A zeroed tensor.
    fn tensor(&mut self, rows: usize, cols: usize) -> Result<Self::Tensor> {
        fits(self, "tensor", rows as u64 * cols as u64 * 4)?;
        self.run_tensor(rows, cols)
    }
    /// A tensor holding `data` (row-major).
    fn upload(&mut self, data: &[f32], rows: usize, cols: usize) -> Result<Self::Tensor> {
        if data.len() != rows * cols {
            return shape_err(
                "upload",
                format!("{} values for ({rows}, {cols})", data.len()),
            );
        }
        fits(self, "tensor", data.len() as u64 * 4)?;
        self.run_upload(data, rows, cols)
    }
    /// Reads a tensor back (finishes pending work first).
    fn download(&mut self, t: &Self::Tensor) -> Result<Vec<f32>> {
        self.run_download(t)
    }
    /// An id vector holding `data`.
    fn ids(&mut self, data: &[u32]) -> Result<Self::Ids> {
        fits(self, "id vector", data.len() as u64 * 4)?;
        self.run_ids(data)
    }
    /// Overwrites `ids` with `data` (the same length), in order with the work
    /// recorded around it: a step refills its id vectors instead of creating them.
    fn set_ids(&mut self, ids: &mut Self::Ids, data: &[u32]) -> Result<()> {
        if data.len() != Self::ids_len(ids) {
            return shape_err(
                "set_ids",
                format!("{} ids into a vector of {}", data.len(), Self::ids_len(ids)),
            );
        }
        self.run_set_ids(ids, data)
    }
    /// Reads ids back (finishes pending work first).
    fn download_ids(&mut self, ids: &Self::Ids) -> Result<Vec<u32>> {
        self.run_download_ids(ids)
    }
    /// Reads `ids` back as the work recorded so far leaves them, without
    /// waiting: the read rides on the next submit, which
    /// [`Executor::submit_pending`] may leave in flight. Nothing recorded
    /// before that submit may write `ids` again.
    fn read_ids_later(&mut self, ids: &Self::Ids) -> Result<IdsTicket> {
        self.run_read_ids_later(ids)
    }
    /// The ids a [`TensorOps::read_ids_later`] asked for, waiting for their
    /// submit (and those before it) if it has not finished.
    fn finish_read(&mut self, ticket: IdsTicket) -> Result<Vec<u32>> {
        match ticket.0 {
            Ticket::Ready(ids) => Ok(ids),
            Ticket::Pending(t) => self.run_finish_read(t),
        }
    }
    /// A weight matrix from f16 data `[rows, cols]` (`cols` even).
    fn weight(&mut self, data: &[f16], rows: usize, cols: usize) -> Result<Self::Weight> {
        check::weight(DType::F16, data.len() as u64 * 2, rows, cols)?;
        self.run_weight(DType::F16, bytemuck::cast_slice(data), rows, cols)
    }
    /// A weight matrix `[rows, cols]` in its stored type: `bytes` holds `rows`
    /// rows of `cols` values, each row whole blocks of `dtype` (GGUF layout).
    /// Quantized matrices stay quantized; F32 and BF16 values are rounded to
    /// f16 on both executors (the kernels read f16).
    fn weight_raw(
        &mut self,
        dtype: DType,
        bytes: &[u8],
        rows: usize,
        cols: usize,
    ) -> Result<Self::Weight> {
        check::weight(dtype, bytes.len() as u64, rows, cols)?;
        fits(self, "weight", bytes.len() as u64)?;
        self.run_weight(dtype, bytes, rows, cols)
    }
    /// A RoPE table.
    fn rope_table(&mut self, cfg: &RopeConfig) -> Result<Self::Rope> {
        cfg.validate()?;
        let bytes = cfg.table_rows() as u64 * (cfg.head_dim / 2) as u64 * 8;
        if bytes > self.limits().max_buffer_bytes {
            return Err(Error::Capacity(format!(
                "RoPE table for {} positions ({bytes} bytes) exceeds the buffer limit of {}",
                cfg.max_positions,
                self.limits().max_buffer_bytes
            )));
        }
        self.run_rope_table(cfg)
    }

    /// `y = x W^T`: x `[m, k]`, W `[n, k]`, y `[m, n]`; k a multiple of 4.
    fn matmul(&mut self, x: &Self::Tensor, w: &Self::Weight, y: &mut Self::Tensor) -> Result<()> {
        self.matmul_then(x, w, y, Epilogue::Store)
    }
    /// `x W^T` combined into `y` by `epi` in the same pass: the residual add or
    /// SwiGLU that would follow the matmul, without a dispatch of its own.
    /// Shapes as [`TensorOps::matmul`], except that with
    /// [`Epilogue::SwigluPairs`] `y` has half of W's rows as columns.
    fn matmul_then(
        &mut self,
        x: &Self::Tensor,
        w: &Self::Weight,
        y: &mut Self::Tensor,
        epi: Epilogue,
    ) -> Result<()> {
        check::matmul_then(Self::dims(x), Self::weight_dims(w), Self::dims(y), epi)?;
        self.run_matmul(x, w, y, epi)
    }
    /// `rms_norm(x, norm, eps) W^T` combined into `y` by `epi`: the RMSNorm
    /// before a matmul folded into it, so the normed rows are never written
    /// (one dispatch where [`TensorOps::rms_norm`] and
    /// [`TensorOps::matmul_then`] take two). `norm` is `[1, k]`; other shapes
    /// as [`TensorOps::matmul`].
    #[allow(clippy::too_many_arguments)]
    fn norm_matmul_then(
        &mut self,
        x: &Self::Tensor,
        norm: &Self::Weight,
        eps: f32,
        w: &Self::Weight,
        y: &mut Self::Tensor,
        epi: Epilogue,
    ) -> Result<()> {
        check::norm_matmul(Self::dims(x), Self::weight_dims(norm), eps)?;
        check::matmul_then(Self::dims(x), Self::weight_dims(w), Self::dims(y), epi)?;
        self.run_norm_matmul(x, norm, eps, w, y, epi)
    }
    /// `x W^T` of a weight whose rows are three projections stacked, `[a; b;
    /// c]`, each part's columns stored in its own tensor of `ys`, in order
    /// (q, k and v in one pass over x); after the RMSNorm `norm` = (weight,
    /// eps) of x when given, as [`TensorOps::norm_matmul_then`]. Each of `ys`
    /// is `[m, its part's rows]`.
    fn matmul_parts(
        &mut self,
        x: &Self::Tensor,
        norm: Option<(&Self::Weight, f32)>,
        w: &Self::Weight,
        ys: [&mut Self::Tensor; 3],
    ) -> Result<()> {
        if let Some((g, eps)) = norm {
            check::norm_matmul(Self::dims(x), Self::weight_dims(g), eps)?;
        }
        let dims = [Self::dims(ys[0]), Self::dims(ys[1]), Self::dims(ys[2])];
        check::matmul_parts(Self::dims(x), Self::weight_dims(w), dims)?;
        self.run_matmul_parts(x, norm, w, ys)
    }
    /// RMSNorm of each row with weight `w` `[1, cols]`, or of each segment of
    /// `w`'s length (`[1, head_dim]`: per-head norms).
    fn rms_norm(
        &mut self,
        x: &Self::Tensor,
        w: &Self::Weight,
        eps: f32,
        y: &mut Self::Tensor,
    ) -> Result<()> {
        check::rms_norm(Self::dims(x), Self::weight_dims(w), Self::dims(y), eps)?;
        self.run_rms_norm(x, w, eps, y)
    }
    /// Rotates `x` `[rows, heads * head_dim]` in place; row r at `positions[r]`.
    fn rope(
        &mut self,
        x: &mut Self::Tensor,
        heads: usize,
        positions: &Self::Ids,
        rope: &Self::Rope,
    ) -> Result<()> {
        let head_dim = Self::rope_dims(rope).1;
        check::rope(Self::dims(x), heads, head_dim, Self::ids_len(positions))?;
        self.run_rope(x, heads, positions, rope)
    }
    /// `gate = silu(gate) * up`.
    fn swiglu(&mut self, gate: &mut Self::Tensor, up: &Self::Tensor) -> Result<()> {
        check::same("swiglu", Self::dims(gate), Self::dims(up))?;
        self.run_swiglu(gate, up)
    }
    /// `acc += x`.
    fn add(&mut self, acc: &mut Self::Tensor, x: &Self::Tensor) -> Result<()> {
        check::same("add", Self::dims(acc), Self::dims(x))?;
        self.run_add(acc, x)
    }
    /// `out[t] = table[ids[t]]`.
    fn embed(
        &mut self,
        ids: &Self::Ids,
        table: &Self::Weight,
        out: &mut Self::Tensor,
    ) -> Result<()> {
        check::embed(
            Self::ids_len(ids),
            Self::weight_dims(table),
            Self::dims(out),
        )?;
        self.run_embed(ids, table, out)
    }
    /// `x[r, :] += bias` for every row; `bias` is `[1, cols]`.
    fn add_bias(&mut self, x: &mut Self::Tensor, bias: &Self::Weight) -> Result<()> {
        check::add_bias(Self::dims(x), Self::weight_dims(bias))?;
        self.run_add_bias(x, bias)
    }
    /// Copies `rows` rows of `src` starting at `src_row` into `dst` at `dst_row`.
    fn copy_rows(
        &mut self,
        src: &Self::Tensor,
        src_row: usize,
        dst: &mut Self::Tensor,
        dst_row: usize,
        rows: usize,
    ) -> Result<()> {
        check::copy_rows(Self::dims(src), src_row, Self::dims(dst), dst_row, rows)?;
        self.run_copy_rows(src, src_row, dst, dst_row, rows)
    }
    /// `out[0, :]` = mean of rows `rows` of `x` (TokenSelect's prefill fingerprint).
    fn mean_rows(
        &mut self,
        x: &Self::Tensor,
        rows: Range<usize>,
        out: &mut Self::Tensor,
    ) -> Result<()> {
        check::mean_rows(Self::dims(x), &rows, Self::dims(out))?;
        self.run_mean_rows(x, rows, out)
    }
    /// Row-wise argmax (ties to the lowest index) into `out[0..rows]`.
    fn argmax(&mut self, x: &Self::Tensor, out: &mut Self::Ids) -> Result<()> {
        check::argmax(Self::dims(x), Self::ids_len(out))?;
        self.run_argmax(x, out)
    }
    /// Repetition penalty on row 0 of `logits` for the given token ids: each
    /// id once however often it appears (as transformers' gather and scatter
    /// do), ids outside the vocabulary ignored. The executors get them distinct.
    fn penalize(&mut self, logits: &mut Self::Tensor, ids: &[u32], penalty: f32) -> Result<()> {
        check::penalize(Self::dims(logits), penalty)?;
        let mut distinct = ids.to_vec();
        distinct.sort_unstable();
        distinct.dedup();
        self.run_penalize(logits, &distinct, penalty)
    }
    /// The `k` (1..=64) largest values of row 0 with their ids, descending (ties to the
    /// lower id). Only these are read back.
    fn top_k(&mut self, logits: &Self::Tensor, k: usize) -> Result<Vec<(u32, f32)>> {
        check::top_k(Self::dims(logits), k)?;
        self.run_top_k(logits, k)
    }

    /// Draws the next token from row 0 into `out[0]` on the device: its
    /// top-k candidates, [`crate::sampling::target_distribution`] and the
    /// draw's uniform ([`crate::sampling::pick`]), so a sampled step, like a
    /// greedy one, leaves its token where the next step's embedding reads it.
    fn sample(&mut self, logits: &Self::Tensor, out: &mut Self::Ids, draw: &Draw) -> Result<()> {
        check::sample(Self::dims(logits), Self::ids_len(out), draw)?;
        self.run_sample(logits, out, draw)
    }

    /// [`TensorOps::tensor`], checked.
    fn run_tensor(&mut self, rows: usize, cols: usize) -> Result<Self::Tensor>;
    /// [`TensorOps::upload`], checked.
    fn run_upload(&mut self, data: &[f32], rows: usize, cols: usize) -> Result<Self::Tensor>;
    /// [`TensorOps::download`].
    fn run_download(&mut self, t: &Self::Tensor) -> Result<Vec<f32>>;
    /// [`TensorOps::ids`], checked.
    fn run_ids(&mut self, data: &[u32]) -> Result<Self::Ids>;
    /// [`TensorOps::set_ids`], checked.
    fn run_set_ids(&mut self, ids: &mut Self::Ids, data: &[u32]) -> Result<()>;
    /// [`TensorOps::download_ids`].
    fn run_download_ids(&mut self, ids: &Self::Ids) -> Result<Vec<u32>>;
    /// [`TensorOps::read_ids_later`].
    fn run_read_ids_later(&mut self, ids: &Self::Ids) -> Result<IdsTicket>;
    /// [`TensorOps::finish_read`] of a pending ticket.
    fn run_finish_read(&mut self, ticket: u64) -> Result<Vec<u32>>;
    /// [`TensorOps::weight_raw`], checked.
    fn run_weight(
        &mut self,
        dtype: DType,
        bytes: &[u8],
        rows: usize,
        cols: usize,
    ) -> Result<Self::Weight>;
    /// [`TensorOps::rope_table`], checked.
    fn run_rope_table(&mut self, cfg: &RopeConfig) -> Result<Self::Rope>;
    /// [`TensorOps::matmul_then`], checked.
    fn run_matmul(
        &mut self,
        x: &Self::Tensor,
        w: &Self::Weight,
        y: &mut Self::Tensor,
        epi: Epilogue,
    ) -> Result<()>;
    /// [`TensorOps::norm_matmul_then`], checked.
    #[allow(clippy::too_many_arguments)]
    fn run_norm_matmul(
        &mut self,
        x: &Self::Tensor,
        norm: &Self::Weight,
        eps: f32,
        w: &Self::Weight,
        y: &mut Self::Tensor,
        epi: Epilogue,
    ) -> Result<()>;
    /// [`TensorOps::matmul_parts`], checked.
    fn run_matmul_parts(
        &mut self,
        x: &Self::Tensor,
        norm: Option<(&Self::Weight, f32)>,
        w: &Self::Weight,
        ys: [&mut Self::Tensor; 3],
    ) -> Result<()>;
    /// [`TensorOps::rms_norm`], checked.
    fn run_rms_norm(
        &mut self,
        x: &Self::Tensor,
        w: &Self::Weight,
        eps: f32,
        y: &mut Self::Tensor,
    ) -> Result<()>;
    /// [`TensorOps::rope`], checked.
    fn run_rope(
        &mut self,
        x: &mut Self::Tensor,
        heads: usize,
        positions: &Self::Ids,
        rope: &Self::Rope,
    ) -> Result<()>;
    /// [`TensorOps::swiglu`], checked.
    fn run_swiglu(&mut self, gate: &mut Self::Tensor, up: &Self::Tensor) -> Result<()>;
    /// [`TensorOps::add`], checked.
    fn run_add(&mut self, acc: &mut Self::Tensor, x: &Self::Tensor) -> Result<()>;
    /// [`TensorOps::embed`], checked.
    fn run_embed(
        &mut self,
        ids: &Self::Ids,
        table: &Self::Weight,
        out: &mut Self::Tensor,
    ) -> Result<()>;
    /// [`TensorOps::add_bias`], checked.
    fn run_add_bias(&mut self, x: &mut Self::Tensor, bias: &Self::Weight) -> Result<()>;
    /// [`TensorOps::copy_rows`], checked.
    fn run_copy_rows(
        &mut self,
        src: &Self::Tensor,
        src_row: usize,
        dst: &mut Self::Tensor,
        dst_row: usize,
        rows: usize,
    ) -> Result<()>;
    /// [`TensorOps::mean_rows`], checked.
    fn run_mean_rows(
        &mut self,
        x: &Self::Tensor,
        rows: Range<usize>,
        out: &mut Self::Tensor,
    ) -> Result<()>;
    /// [`TensorOps::argmax`], checked.
    fn run_argmax(&mut self, x: &Self::Tensor, out: &mut Self::Ids) -> Result<()>;
    /// [`TensorOps::penalize`], checked.
    fn run_penalize(&mut self, logits: &mut Self::Tensor, ids: &[u32], penalty: f32) -> Result<()>;
    /// [`TensorOps::top_k`], checked.
    fn run_top_k(&mut self, logits: &Self::Tensor, k: usize) -> Result<Vec<(u32, f32)>>;
    /// [`TensorOps::sample`], checked.
    fn run_sample(&mut self, logits: &Self::Tensor, out: &mut Self::Ids, draw: &Draw)
        -> Result<()>;
}

/// A buffer of `bytes` within the executor's limit.
fn fits<E: Executor>(ex: &E, what: &str, bytes: u64) -> Result<()> {
    let max = ex.limits().max_buffer_bytes;
    if bytes > max {
        return Err(Error::Capacity(format!(
            "{what} of {bytes} bytes exceeds the buffer limit of {max}"
        )));
    }
    Ok(())
}
