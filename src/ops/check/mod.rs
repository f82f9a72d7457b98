//! Shape and option checks of the ops front: each checked op in the family
//! traits calls one of these before its executor runs, so a caller's mistake
//! is the same typed error on every executor.

use super::MAX_NODES;
use crate::error::{shape_err, Error, Result};
use crate::quant::DType;
use std::ops::Range;

mod attention;
pub use attention::*;

/// `y = x W^T`.
pub fn matmul(x: (usize, usize), w: (usize, usize), y: (usize, usize)) -> Result<()> {
    if x.1 != w.1 {
        return shape_err(
            "matmul",
            format!("x is {x:?} but W is {w:?}: inner dims differ"),
        );
    }
    if y != (x.0, w.0) {
        return shape_err("matmul", format!("y is {y:?}, expected ({}, {})", x.0, w.0));
    }
    // The GPU kernels read activations as vec4 and weights as f16 pairs.
    if !x.1.is_multiple_of(4) {
        return shape_err("matmul", format!("in-dim {} must be a multiple of 4", x.1));
    }
    Ok(())
}

/// A matmul through an epilogue: SwiGLU pairs halve W's rows.
pub fn matmul_then(
    x: (usize, usize),
    w: (usize, usize),
    y: (usize, usize),
    epi: super::Epilogue,
) -> Result<()> {
    if epi != super::Epilogue::SwigluPairs {
        return matmul(x, w, y);
    }
    if !w.0.is_multiple_of(2) || y != (x.0, w.0 / 2) {
        return shape_err(
            "matmul_then",
            format!(
                "SwiGLU pairs: W is {w:?} (gate and up stacked), y is {y:?}, expected ({}, {})",
                x.0,
                w.0 / 2
            ),
        );
    }
    matmul(x, w, (x.0, w.0))
}

/// A matmul whose result's columns go to three tensors in order.
pub fn matmul_parts(x: (usize, usize), w: (usize, usize), ys: [(usize, usize); 3]) -> Result<()> {
    let width: usize = ys.iter().map(|y| y.1).sum();
    if ys.iter().any(|y| y.0 != x.0 || y.1 == 0) || width != w.0 {
        return shape_err(
            "matmul_parts",
            format!(
                "outputs {ys:?} must have x's {} rows and split W's {} rows",
                x.0, w.0
            ),
        );
    }
    matmul(x, w, (x.0, w.0))
}

/// A weight of `bytes` bytes of `dtype` as `[rows, cols]`: rows of whole
/// blocks; f16 rows are packed in pairs on the GPU, so `cols` must be even.
pub fn weight(dtype: DType, bytes: u64, rows: usize, cols: usize) -> Result<()> {
    let per = dtype.block().0;
    let Some(row_bytes) = dtype.bytes_for(cols as u64) else {
        return shape_err(
            "weight",
            format!("{cols} columns are not whole {dtype} blocks of {per}"),
        );
    };
    if Some(bytes) != row_bytes.checked_mul(rows as u64) {
        return shape_err(
            "weight",
            format!("{bytes} bytes of {dtype} for ({rows}, {cols})"),
        );
    }
    if !cols.is_multiple_of(2) {
        return shape_err(
            "weight",
            format!("{cols} columns: f16 rows are packed in pairs, need an even count"),
        );
    }
    Ok(())
}

/// Same shape.
pub fn same(op: &'static str, a: (usize, usize), b: (usize, usize)) -> Result<()> {
    if a != b {
        return shape_err(op, format!("shapes differ: {a:?} vs {b:?}"));
    }
    Ok(())
}

/// RMSNorm.
pub fn rms_norm(x: (usize, usize), w: (usize, usize), y: (usize, usize), eps: f32) -> Result<()> {
    same("rms_norm", x, y)?;
    // A weight of a row's length, or of a segment's (per-head norms).
    if w.0 != 1 || w.1 == 0 || !x.1.is_multiple_of(w.1) {
        return shape_err(
            "rms_norm",
            format!(
                "weight is {w:?}, expected (1, {}) or (1, a divisor of it)",
                x.1
            ),
        );
    }
    if !(eps >= 0.0) {
        return Err(Error::InvalidOption(format!(
            "rms_norm eps {eps} must be >= 0"
        )));
    }
    Ok(())
}

/// RMSNorm folded into a matmul: the norm spans whole rows of x.
pub fn norm_matmul(x: (usize, usize), norm: (usize, usize), eps: f32) -> Result<()> {
    if norm != (1, x.1) {
        return shape_err(
            "norm_matmul_then",
            format!("norm weight is {norm:?}, expected (1, {})", x.1),
        );
    }
    rms_norm(x, norm, x, eps)
}

/// RoPE.
pub fn rope(x: (usize, usize), heads: usize, head_dim: usize, positions: usize) -> Result<()> {
    if heads == 0 || x.1 != heads * head_dim {
        return shape_err(
            "rope",
            format!("x is {x:?}, expected {heads} heads of {head_dim}"),
        );
    }
    if positions < x.0 {
        return shape_err("rope", format!("{positions} positions for {} rows", x.0));
    }
    Ok(())
}

/// Embedding gather.
pub fn embed(tokens: usize, table: (usize, usize), out: (usize, usize)) -> Result<()> {
    if out != (tokens, table.1) {
        return shape_err(
            "embed",
            format!("out is {out:?}, expected ({tokens}, {})", table.1),
        );
    }
    Ok(())
}

/// Bias row for `add_bias`.
pub fn add_bias(x: (usize, usize), bias: (usize, usize)) -> Result<()> {
    if bias != (1, x.1) {
        return shape_err(
            "add_bias",
            format!("bias is {bias:?}, x has {} columns", x.1),
        );
    }
    Ok(())
}

/// Row copy.
pub fn copy_rows(
    src: (usize, usize),
    src_row: usize,
    dst: (usize, usize),
    dst_row: usize,
    rows: usize,
) -> Result<()> {
    if src.1 != dst.1 || src_row + rows > src.0 || dst_row + rows > dst.0 {
        return shape_err(
            "copy_rows",
            format!("{rows} rows from {src_row} of {src:?} to {dst_row} of {dst:?}"),
        );
    }
    Ok(())
}

/// Mean of rows `rows` of `x` into one row of `out`.
pub fn mean_rows(x: (usize, usize), rows: &Range<usize>, out: (usize, usize)) -> Result<()> {
    if rows.is_empty() || rows.end > x.0 || out.1 != x.1 || out.0 == 0 {
        return shape_err("mean_rows", format!("rows {rows:?} of {x:?} into {out:?}"));
    }
    Ok(())
}

/// Top-k selection bounds.
pub fn top_k(logits: (usize, usize), k: usize) -> Result<()> {
    if k == 0 || k > 64 || k > logits.1 {
        return Err(Error::InvalidOption(format!(
            "top-k {k}: must be in 1..=64 and at most the vocabulary {}",
            logits.1
        )));
    }
    if logits.0 == 0 {
        return shape_err("top_k", "no rows");
    }
    Ok(())
}

/// Token ids must index the table.
pub fn token_ids(ids: &[u32], vocab: usize) -> Result<()> {
    if let Some(&bad) = ids.iter().find(|&&t| t as usize >= vocab) {
        return shape_err(
            "embed",
            format!("token id {bad} is outside the vocabulary of {vocab}"),
        );
    }
    Ok(())
}

/// Speculative acceptance: `(n, vocab)` logits, word counts of the tokens,
/// links and output buffers.
#[allow(clippy::too_many_arguments)]
pub fn spec_accept(
    logits: (usize, usize),
    tokens: usize,
    links: usize,
    params: &crate::sampling::AcceptParams,
    depth: usize,
    trials: usize,
    out: usize,
) -> Result<()> {
    let (n, vocab) = logits;
    if n == 0 || n > MAX_NODES || tokens < n || links < 2 * n {
        return shape_err(
            "spec_accept",
            format!("{n} nodes with {tokens} tokens and {links} link words"),
        );
    }
    if depth == 0 || depth > n || trials == 0 {
        return shape_err(
            "spec_accept",
            format!("path depth {depth} of {n} nodes, {trials} trials"),
        );
    }
    if trials > 65_535 || out < trials * crate::sampling::accept_stride(depth) {
        return shape_err(
            "spec_accept",
            format!("{out} output words for {trials} trials of depth {depth}"),
        );
    }
    if params.top_k == 0 || params.top_k > 64 || params.top_k > vocab {
        return Err(Error::InvalidOption(format!(
            "top-k {} must be in 1..=64 and at most the vocabulary {vocab}",
            params.top_k
        )));
    }
    if !(params.top_p > 0.0 && params.top_p <= 1.0 && params.temperature >= 0.0) {
        return Err(Error::InvalidOption(format!(
            "top-p {} must be in (0, 1] and temperature {} >= 0",
            params.top_p, params.temperature
        )));
    }
    Ok(())
}

/// A device-side sampling step: top-k bounds, a positive temperature, a
/// nucleus in (0, 1], a uniform draw in [0, 1) and an output id.
pub fn sample(logits: (usize, usize), out: usize, draw: &crate::sampling::Draw) -> Result<()> {
    top_k(logits, draw.top_k)?;
    if out == 0 {
        return shape_err("sample", "no output id");
    }
    let t = draw.temperature;
    if !(t > 0.0 && t.is_finite() && draw.top_p > 0.0 && draw.top_p <= 1.0) {
        return Err(Error::InvalidOption(format!(
            "sampling at temperature {t} (must be > 0) and top-p {} (must be in (0, 1])",
            draw.top_p
        )));
    }
    if !(0.0..1.0).contains(&draw.u) {
        return Err(Error::InvalidOption(format!(
            "sampling draw {} must be in [0, 1)",
            draw.u
        )));
    }
    Ok(())
}

/// Row-wise argmax: an output per row.
pub fn argmax(x: (usize, usize), out: usize) -> Result<()> {
    if out < x.0 {
        return shape_err("argmax", format!("{out} outputs for {} rows", x.0));
    }
    Ok(())
}

/// Repetition penalty: a row of logits, a positive finite penalty.
pub fn penalize(logits: (usize, usize), penalty: f32) -> Result<()> {
    if logits.0 == 0 {
        return shape_err("penalize", "no rows");
    }
    if !(penalty > 0.0 && penalty.is_finite()) {
        return Err(Error::InvalidOption(format!(
            "repetition penalty {penalty} must be positive and finite"
        )));
    }
    Ok(())
}

/// A draft of `n` nodes from a plan of `plan` words into `out` ids.
pub fn spec_draft(n: usize, plan: usize, out: usize) -> Result<()> {
    if n == 0 || n > MAX_NODES || plan < 3 * n || out < n {
        return shape_err(
            "spec_draft",
            format!("{n} nodes, plan of {plan} words, output of {out}"),
        );
    }
    Ok(())
}

/// Token Recycling's adjacency (8 ids per vocabulary entry) updated from
/// `(n, vocab)` logits and their `tokens`.
pub fn spec_adj_update(adj: usize, logits: (usize, usize), tokens: usize) -> Result<()> {
    let (n, vocab) = logits;
    if adj != vocab * super::ADJ_WIDTH || tokens < n || n > MAX_NODES {
        return shape_err(
            "spec_adj_update",
            format!("adjacency of {adj} for a vocabulary of {vocab}, {tokens} tokens for {n} rows"),
        );
    }
    Ok(())
}
