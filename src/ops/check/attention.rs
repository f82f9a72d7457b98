//! Checks of the attention, KV cache and selection ops (TokenSelect, Quest,
//! Tidal, hierarchical selection, tree attention).

use super::same;
use crate::error::{shape_err, Error, Result};
use crate::kv::{KvLayout, PageTable};
use crate::ops::{KeyList, Selection, MAX_NODES};
use std::ops::Range;

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

/// Block size of Quest bounds for a layout.
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
