//! Shape and option checks of the ops front: each checked op in the family
//! traits calls one of these before its executor runs, so a caller's mistake
//! is the same typed error on every executor.

use super::{KeyList, Selection, MAX_NODES};
use crate::error::{shape_err, Error, Result};
use crate::kv::{KvLayout, PageTable};
use crate::quant::DType;
use std::ops::Range;

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

/// TokenSelect's soft vote over `n` candidates of `q_heads` heads, with
/// `scores` and `votes` holding that many values.
pub fn ts_vote(scores: usize, votes: usize, q_heads: usize, n: usize) -> Result<()> {
    if q_heads == 0 || scores < q_heads * n || votes < n {
        return shape_err(
            "ts_vote",
            format!("{q_heads} heads x {n} candidates do not fit"),
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

/// TokenSelect shapes (`slots` scores per head): returns the query head count.
#[allow(clippy::too_many_arguments)]
pub fn ts(
    layout: &KvLayout,
    layer: usize,
    table: &PageTable,
    q: (usize, usize),
    begin: usize,
    n: usize,
    slots: usize,
    scores_len: usize,
) -> Result<usize> {
    if layer >= layout.layers {
        return shape_err("ts_score", format!("layer {layer} of {}", layout.layers));
    }
    let d = layout.head_dim;
    if q.0 != 1 || !q.1.is_multiple_of(d) || !(q.1 / d).is_multiple_of(layout.kv_heads) {
        return shape_err(
            "ts_score",
            format!("q is {q:?}: one row of whole GQA groups of {d}"),
        );
    }
    let qh = q.1 / d;
    if n == 0 || (begin + n).div_ceil(layout.page_size) > table.pages.len() {
        return shape_err(
            "ts_score",
            format!("candidates {begin}..{} outside the sequence", begin + n),
        );
    }
    if scores_len < qh * slots {
        return shape_err(
            "ts_score",
            format!("scores hold {scores_len} values, need {}", qh * slots),
        );
    }
    Ok(qh)
}

/// A hierarchical selection's blocks: (count, tokens per block, ids held).
pub fn prefilter(pf: Option<(usize, usize, usize)>) -> Result<()> {
    match pf {
        Some((count, block, held)) if count == 0 || block == 0 || held < count => shape_err(
            "prefilter",
            format!("{count} blocks of {block} tokens from {held} block ids"),
        ),
        _ => Ok(()),
    }
}

/// Attention over a key list for query rows `rows` at logical `q_start..`:
/// returns the query head count.
#[allow(clippy::too_many_arguments)]
pub fn attention_list<I>(
    op: &'static str,
    layout: &KvLayout,
    layer: usize,
    table: &PageTable,
    q: (usize, usize),
    out: (usize, usize),
    rows: &Range<usize>,
    q_start: usize,
    list: &KeyList<'_, I>,
    selected_capacity: usize,
    max_pos: usize,
) -> Result<usize> {
    let n = rows.len();
    if n == 0 || rows.end > q.0 {
        return shape_err(op, format!("rows {rows:?} of {} query rows", q.0));
    }
    let seq_len = q_start + n;
    let qh = attention(
        op,
        layout,
        layer,
        table,
        (n, q.1),
        (n, out.1),
        q_start,
        seq_len,
        max_pos,
    )?;
    // Quest lists: whole blocks, one row of block ids per KV head.
    let capacity = match list.n_selected.checked_div(list.selection.block()) {
        Some(per_head)
            if !list.n_selected.is_multiple_of(list.selection.block())
                || selected_capacity < layout.kv_heads * per_head
                || list.compact =>
        {
            return shape_err(
                op,
                format!(
                    "{} selected tokens in blocks of {} for {} KV heads with {selected_capacity} slots (compact {})",
                    list.n_selected, list.selection.block(), layout.kv_heads, list.compact
                ),
            );
        }
        Some(_) => list.n_selected,
        None => selected_capacity,
    };
    if q.0 != out.0
        || list.n_selected > capacity
        || list.tail_start + list.tail_len != seq_len
        || list.tail_start > q_start
        || list.n_init > list.tail_start
    {
        return shape_err(
            op,
            format!(
                "list of {} sinks, {} selected (capacity {selected_capacity}), window {}..{} for queries {q_start}..{seq_len}",
                list.n_init,
                list.n_selected,
                list.tail_start,
                list.tail_start + list.tail_len
            ),
        );
    }
    let max_rank = list.len() - 1;
    if list.compact && max_rank >= max_pos {
        return Err(Error::Capacity(format!(
            "{op}: rank {max_rank} beyond the RoPE table's {max_pos}"
        )));
    }
    Ok(qh)
}

/// Tree attention shapes, with the prefix's key list if any (its window must
/// end where the tree starts): returns the query head count.
#[allow(clippy::too_many_arguments)]
pub fn attention_tree<I>(
    layout: &KvLayout,
    layer: usize,
    table: &PageTable,
    q: (usize, usize),
    out: (usize, usize),
    prefix_len: usize,
    tree_words: usize,
    list: Option<(&KeyList<'_, I>, usize)>,
    max_pos: usize,
) -> Result<usize> {
    let n = q.0;
    if let Some((li, capacity)) = list {
        if li.n_selected > capacity
            || li.selection != Selection::Shared
            || li.tail_start + li.tail_len != prefix_len
            || li.n_init > li.tail_start
        {
            return shape_err(
                "attention_tree",
                format!(
                    "list of {} sinks, {} selected (capacity {capacity}), window {}..{} before a tree at {prefix_len}",
                    li.n_init,
                    li.n_selected,
                    li.tail_start,
                    li.tail_start + li.tail_len
                ),
            );
        }
        if li.compact && li.len() + n > max_pos {
            return Err(Error::Capacity(format!(
                "attention_tree: {} ranks and {n} nodes beyond the RoPE table's {max_pos}",
                li.len()
            )));
        }
    }
    if n > MAX_NODES || tree_words != 5 * n {
        return shape_err(
            "attention_tree",
            format!(
                "{n} tree nodes with a mask of {tree_words} words (need {} and at most {} nodes)",
                5 * n,
                MAX_NODES
            ),
        );
    }
    attention(
        "attention_tree",
        layout,
        layer,
        table,
        q,
        out,
        prefix_len,
        prefix_len + n,
        max_pos,
    )
}

/// Sparse decode over a key list: one query row, the last of `seq_len`.
#[allow(clippy::too_many_arguments)]
pub fn attention_decode_list<I>(
    layout: &KvLayout,
    layer: usize,
    table: &PageTable,
    q: (usize, usize),
    out: (usize, usize),
    seq_len: usize,
    list: &KeyList<'_, I>,
    selected_capacity: usize,
    max_pos: usize,
) -> Result<usize> {
    if q.0 != 1 {
        return shape_err(
            "attention_decode_list",
            format!("{} query rows, expected 1", q.0),
        );
    }
    attention_list(
        "attention_decode_list",
        layout,
        layer,
        table,
        q,
        out,
        &(0..1),
        seq_len.saturating_sub(1),
        list,
        selected_capacity,
        max_pos,
    )
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

/// Block size of Quest bounds for a layout.
/// Growing storage of `layout` to `num_pages` pages: never shrinks, and the
/// grown layout must be valid.
pub fn grow(op: &'static str, layout: &KvLayout, num_pages: usize) -> Result<()> {
    if num_pages < layout.num_pages {
        return shape_err(
            op,
            format!(
                "{num_pages} pages is fewer than the {} held (storage only grows)",
                layout.num_pages
            ),
        );
    }
    KvLayout {
        num_pages,
        ..*layout
    }
    .validate()
}

pub fn bounds_block(layout: &KvLayout, block: usize) -> Result<()> {
    if block < 4 || !layout.page_size.is_multiple_of(block) {
        return Err(Error::InvalidOption(format!(
            "block size {block} must be at least 4 and divide the page size {}",
            layout.page_size
        )));
    }
    Ok(())
}

/// Token scores: blocks of one token, a row per KV head, all inside the RoPE
/// table; returns the query head count.
pub fn token_scores(
    layout: &KvLayout,
    layer: usize,
    table: &PageTable,
    q: (usize, usize),
    n: usize,
    out: (usize, usize),
    max_pos: usize,
) -> Result<usize> {
    let qh = block_score_shapes(layout, 1, layer, table, q, &(0..n), out, true)?;
    if n > max_pos {
        return Err(Error::Capacity(format!(
            "token_scores: {n} tokens beyond the RoPE table's {max_pos}"
        )));
    }
    Ok(qh)
}

/// Block top-k: `(q_heads, cols)` scores, the ids buffer's length.
pub fn block_top_k(
    scores: (usize, usize),
    kv_heads: usize,
    n: usize,
    k: usize,
    out: usize,
) -> Result<()> {
    let bad = kv_heads == 0
        || scores.0 == 0
        || !scores.0.is_multiple_of(kv_heads)
        || n > scores.1
        || k == 0
        || k > n
        || out < kv_heads * k;
    if bad {
        return shape_err(
            "block_top_k",
            format!(
                "top {k} of {n} blocks from scores {scores:?} for {kv_heads} KV heads into {out} slots"
            ),
        );
    }
    Ok(())
}

/// Bound updates: the layer, and tokens inside the reserved pages.
pub fn kv_bounds(
    layout: &KvLayout,
    layer: usize,
    table: &PageTable,
    tokens: &Range<usize>,
    max_pos: usize,
) -> Result<()> {
    let cap = table.pages.len() * layout.page_size;
    if layer >= layout.layers || tokens.end > cap || tokens.start > tokens.end {
        return shape_err(
            "kv_bounds",
            format!(
                "layer {layer} of {}, tokens {tokens:?} of {cap} reserved slots",
                layout.layers
            ),
        );
    }
    if tokens.end > max_pos {
        return Err(Error::Capacity(format!(
            "kv_bounds: token {} beyond the RoPE table's {max_pos}",
            tokens.end - 1
        )));
    }
    Ok(())
}

/// Block scores: returns the query head count.
pub fn block_scores(
    layout: &KvLayout,
    block: usize,
    layer: usize,
    table: &PageTable,
    q: (usize, usize),
    blocks: &Range<usize>,
    out: (usize, usize),
) -> Result<usize> {
    block_score_shapes(layout, block, layer, table, q, blocks, out, false)
}

/// Block scores' spread: in 0..=1.
pub fn block_spread(spread: f32) -> Result<()> {
    if !(0.0..=1.0).contains(&spread) {
        return Err(Error::InvalidOption(format!(
            "block_scores: spread {spread} outside 0..=1"
        )));
    }
    Ok(())
}

/// Group block scores (a row per KV head): returns the query head count.
pub fn block_group_scores(
    layout: &KvLayout,
    block: usize,
    layer: usize,
    table: &PageTable,
    q: (usize, usize),
    blocks: &Range<usize>,
    out: (usize, usize),
) -> Result<usize> {
    block_score_shapes(layout, block, layer, table, q, blocks, out, true)
}

#[allow(clippy::too_many_arguments)]
fn block_score_shapes(
    layout: &KvLayout,
    block: usize,
    layer: usize,
    table: &PageTable,
    q: (usize, usize),
    blocks: &Range<usize>,
    out: (usize, usize),
    per_kv_head: bool,
) -> Result<usize> {
    let d = layout.head_dim;
    let qh = q.1 / d;
    let bad = q.0 != 1
        || !q.1.is_multiple_of(d)
        || qh == 0
        || !qh.is_multiple_of(layout.kv_heads)
        || layer >= layout.layers
        || blocks.start > blocks.end
        || blocks.end * block > table.pages.len() * layout.page_size
        || out.0 < if per_kv_head { layout.kv_heads } else { qh }
        || out.1 < blocks.len();
    if bad {
        return shape_err(
            if per_kv_head {
                "block_group_scores"
            } else {
                "block_scores"
            },
            format!(
                "q {q:?}, blocks {blocks:?} of {block} in {} pages, out {out:?}, layer {layer}",
                table.pages.len()
            ),
        );
    }
    Ok(qh)
}

/// KV moves: every index inside the reserved pages.
pub fn kv_move(layout: &KvLayout, table: &PageTable, moves: &[(usize, usize)]) -> Result<()> {
    let cap = table.pages.len() * layout.page_size;
    if let Some(m) = moves.iter().find(|m| m.0 >= cap || m.1 >= cap) {
        return shape_err(
            "kv_move",
            format!("move {} -> {} outside the {cap} reserved slots", m.0, m.1),
        );
    }
    Ok(())
}

/// KV append.
pub fn kv_append(
    layout: &KvLayout,
    layer: usize,
    table: &PageTable,
    start: usize,
    k: (usize, usize),
    v: (usize, usize),
) -> Result<()> {
    same("kv_append", k, v)?;
    if layer >= layout.layers {
        return shape_err("kv_append", format!("layer {layer} of {}", layout.layers));
    }
    if k.1 != layout.kv_heads * layout.head_dim {
        return shape_err(
            "kv_append",
            format!(
                "k is {k:?}, expected {} kv heads of {}",
                layout.kv_heads, layout.head_dim
            ),
        );
    }
    if (start + k.0).div_ceil(layout.page_size) > table.pages.len() {
        return Err(Error::Capacity(format!(
            "kv_append: positions {start}..{} need pages that are not reserved ({} pages)",
            start + k.0,
            table.pages.len()
        )));
    }
    Ok(())
}

/// Attention over the cache: returns the number of query heads.
#[allow(clippy::too_many_arguments)]
pub fn attention(
    op: &'static str,
    layout: &KvLayout,
    layer: usize,
    table: &PageTable,
    q: (usize, usize),
    out: (usize, usize),
    q_start: usize,
    kv_len: usize,
    max_pos: usize,
) -> Result<usize> {
    same(op, q, out)?;
    if layer >= layout.layers {
        return shape_err(op, format!("layer {layer} of {}", layout.layers));
    }
    let d = layout.head_dim;
    if q.1 == 0 || !q.1.is_multiple_of(d) {
        return shape_err(
            op,
            format!("q is {q:?}, not a whole number of heads of {d}"),
        );
    }
    let qh = q.1 / d;
    if !qh.is_multiple_of(layout.kv_heads) || qh / layout.kv_heads > 8 {
        return shape_err(
            op,
            format!(
                "{qh} query heads over {} kv heads: need a whole group of at most 8",
                layout.kv_heads
            ),
        );
    }
    if q.0 == 0 || kv_len < q_start + q.0 {
        return shape_err(
            op,
            format!("{} queries from {q_start} but only {kv_len} keys", q.0),
        );
    }
    if kv_len > table.pages.len() * layout.page_size {
        return shape_err(
            op,
            format!(
                "kv_len {kv_len} exceeds the sequence's {} reserved pages",
                table.pages.len()
            ),
        );
    }
    if kv_len > max_pos {
        return Err(Error::Capacity(format!(
            "{op}: position {kv_len} beyond the RoPE table's {max_pos}"
        )));
    }
    Ok(qh)
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

/// TokenSelect's top-k: `k` of `n` votes into `out` ids, with the
/// prefilter's (count, tokens per block, ids held) if any.
pub fn ts_top_k(
    votes: usize,
    n: usize,
    k: usize,
    out: usize,
    prefilter: Option<(usize, usize, usize)>,
) -> Result<()> {
    if votes < n || k == 0 || k > n || out < k {
        return shape_err("ts_top_k", format!("top {k} of {n} into {out} slots"));
    }
    self::prefilter(prefilter)?;
    if prefilter.is_some_and(|(count, block, _)| count * block != n) {
        return shape_err("ts_top_k", format!("{n} votes for the prefilter's slots"));
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
