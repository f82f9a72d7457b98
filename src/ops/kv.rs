//! KV ops: the paged KV cache and attention over it (dense, over a key list,
//! over a draft tree).

use super::{check, Executor, KeyList};
use crate::error::{shape_err, Result};
use crate::kv::{KvLayout, PageTable};
use std::ops::Range;

/// One layer of a sequence's paged KV cache, as the attention and selection
/// ops read it: the cache, the layer, the sequence's page table and the RoPE
/// table its keys are rotated with.
pub struct KvView<'a, E: Executor> {
    /// The cache.
    pub kv: &'a E::Kv,
    /// Layer.
    pub layer: usize,
    /// The sequence's pages.
    pub table: &'a PageTable,
    /// RoPE table.
    pub rope: &'a E::Rope,
}

impl<E: Executor> Clone for KvView<'_, E> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<E: Executor> Copy for KvView<'_, E> {}

impl<'a, E: Executor> KvView<'a, E> {
    /// A view of `layer` of `kv` for the sequence of `table`.
    pub fn new(kv: &'a E::Kv, layer: usize, table: &'a PageTable, rope: &'a E::Rope) -> Self {
        Self {
            kv,
            layer,
            table,
            rope,
        }
    }

    /// The cache's layout.
    pub fn layout(&self) -> &KvLayout {
        E::kv_layout(self.kv)
    }

    /// Positions the RoPE table covers.
    pub fn max_pos(&self) -> usize {
        E::rope_dims(self.rope).0
    }
}

/// KV ops. Callers use the checked methods; executors implement the `run_*`
/// methods, which may assume the checks passed.
pub trait KvOps: Executor {
    /// KV storage for `layout`.
    fn kv_cache(&mut self, layout: &KvLayout) -> Result<Self::Kv> {
        layout.validate()?;
        self.run_kv_cache(layout)
    }
    /// Grows `kv` to `num_pages` pages, keeping what it holds (the cache
    /// grows with the sequence instead of being sized for the longest one).
    fn kv_grow(&mut self, kv: &mut Self::Kv, num_pages: usize) -> Result<()> {
        check::grow("kv_grow", Self::kv_layout(kv), num_pages)?;
        if num_pages == Self::kv_layout(kv).num_pages {
            return Ok(());
        }
        self.run_kv_grow(kv, num_pages)
    }
    /// Stores k, v `[tokens, kv_heads * head_dim]` (keys before RoPE) at logical
    /// positions `start..` of `table` in `layer`; pages must be reserved.
    fn kv_append(
        &mut self,
        kv: &mut Self::Kv,
        layer: usize,
        table: &PageTable,
        start: usize,
        k: &Self::Tensor,
        v: &Self::Tensor,
    ) -> Result<()> {
        let l = Self::kv_layout(kv);
        check::kv_append(l, layer, table, start, Self::dims(k), Self::dims(v))?;
        self.run_kv_append(kv, layer, table, start, k, v)
    }
    /// [`KvOps::kv_append`] and [`super::TensorOps::rope`] of the step's queries `q`
    /// `[tokens, q_heads * head_dim]` at `positions`, in one pass where the
    /// executor can (the model's step for layers whose policy attends with
    /// queries at their true positions: a dispatch fewer per layer).
    #[allow(clippy::too_many_arguments)]
    fn kv_append_rope(
        &mut self,
        kv: &mut Self::Kv,
        layer: usize,
        table: &PageTable,
        start: usize,
        k: &Self::Tensor,
        v: &Self::Tensor,
        q: &mut Self::Tensor,
        q_heads: usize,
        positions: &Self::Ids,
        rope: &Self::Rope,
    ) -> Result<()> {
        let l = Self::kv_layout(kv);
        check::kv_append(l, layer, table, start, Self::dims(k), Self::dims(v))?;
        let (qd, head_dim) = (Self::dims(q), Self::rope_dims(rope).1);
        check::rope(qd, q_heads, head_dim, Self::ids_len(positions))?;
        if qd.0 != Self::dims(k).0 || head_dim != l.head_dim {
            return shape_err(
                "kv_append_rope",
                format!(
                    "q is {qd:?} with a RoPE head dim of {head_dim}, k is {:?} with {}",
                    Self::dims(k),
                    l.head_dim
                ),
            );
        }
        self.run_kv_append_rope(kv, layer, table, start, k, v, q, q_heads, positions, rope)
    }
    /// Moves the keys and values of every layer from logical index `src` to `dst`
    /// for each `(src, dst)` in order (committing an accepted draft path).
    fn kv_move(
        &mut self,
        kv: &mut Self::Kv,
        table: &PageTable,
        moves: &[(usize, usize)],
    ) -> Result<()> {
        check::kv_move(Self::kv_layout(kv), table, moves)?;
        self.run_kv_move(kv, table, moves)
    }
    /// Causal attention for a chunk of queries `q` `[n, q_heads * head_dim]` (already
    /// rotated) at positions `q_start..q_start + n` over the first `kv_len` cached
    /// tokens; keys are rotated at their own positions. Flash attention.
    fn attention_prefill(
        &mut self,
        q: &Self::Tensor,
        cache: &KvView<'_, Self>,
        q_start: usize,
        kv_len: usize,
        out: &mut Self::Tensor,
    ) -> Result<()> {
        let op = "attention_prefill";
        attention_shape(op, cache, Self::dims(q), Self::dims(out), q_start, kv_len)?;
        self.run_attention_prefill(q, cache, q_start, kv_len, out)
    }
    /// Attention of one query over the first `kv_len` cached tokens. Split-KV
    /// flash decoding.
    fn attention_decode(
        &mut self,
        q: &Self::Tensor,
        cache: &KvView<'_, Self>,
        kv_len: usize,
        out: &mut Self::Tensor,
    ) -> Result<()> {
        let op = "attention_decode";
        let (qd, od) = (Self::dims(q), Self::dims(out));
        if qd.0 != 1 {
            return shape_err(op, format!("{} query rows, expected 1", qd.0));
        }
        attention_shape(op, cache, qd, od, kv_len.saturating_sub(1), kv_len)?;
        self.run_attention_decode(q, cache, kv_len, out)
    }
    /// Attention of one query (rotated by the caller) over the keys of `list`;
    /// `seq_len` is the sequence's length (for page lookups).
    fn attention_decode_list(
        &mut self,
        q: &Self::Tensor,
        cache: &KvView<'_, Self>,
        seq_len: usize,
        list: &KeyList<'_, Self::Ids>,
        out: &mut Self::Tensor,
    ) -> Result<()> {
        check::attention_decode_list(
            cache.layout(),
            cache.layer,
            cache.table,
            Self::dims(q),
            Self::dims(out),
            seq_len,
            list,
            Self::ids_len(list.selected),
            cache.max_pos(),
        )?;
        self.run_attention_decode_list(q, cache, seq_len, list, out)
    }
    /// Causal attention of query rows `rows` of `q` (rotated by the caller; row
    /// `rows.start + i` is the token at logical index `q_start + i`) over the keys of
    /// `list`, into the same rows of `out`. A query sees the list's keys up to its
    /// own logical index; the sinks and selected keys must precede `list.tail_start
    /// <= q_start`, and the tail must end at the last query. Sparse prefill:
    /// TokenSelect's shared token lists, or Quest's blocks per KV head
    /// (per-KV-head selections).
    fn attention_prefill_list(
        &mut self,
        q: &Self::Tensor,
        cache: &KvView<'_, Self>,
        rows: Range<usize>,
        q_start: usize,
        list: &KeyList<'_, Self::Ids>,
        out: &mut Self::Tensor,
    ) -> Result<()> {
        check::attention_list(
            "attention_prefill_list",
            cache.layout(),
            cache.layer,
            cache.table,
            Self::dims(q),
            Self::dims(out),
            &rows,
            q_start,
            list,
            Self::ids_len(list.selected),
            cache.max_pos(),
        )?;
        self.run_attention_prefill_list(q, cache, rows, q_start, list, out)
    }
    /// Tree attention for speculative verification: the rows of `q` are the nodes of
    /// a draft tree (rotated by the caller), node j's keys and values at slot
    /// `prefix_len + j`. Node i sees the prefix and its ancestors, itself included.
    /// `tree` holds [`crate::speculative::DraftTree::mask`]. The prefix is the
    /// first `prefix_len` tokens, or with `list` its ranks (TokenSelect: sinks,
    /// the root's selection and the window up to `prefix_len`). Node j's key is
    /// rotated at base + depth(j), base being `prefix_len` or, for a compact list,
    /// its length.
    fn attention_tree(
        &mut self,
        q: &Self::Tensor,
        cache: &KvView<'_, Self>,
        prefix_len: usize,
        tree: &Self::Ids,
        list: Option<&KeyList<'_, Self::Ids>>,
        out: &mut Self::Tensor,
    ) -> Result<()> {
        check::attention_tree(
            cache.layout(),
            cache.layer,
            cache.table,
            Self::dims(q),
            Self::dims(out),
            prefix_len,
            Self::ids_len(tree),
            list.map(|li| (li, Self::ids_len(li.selected))),
            cache.max_pos(),
        )?;
        self.run_attention_tree(q, cache, prefix_len, tree, list, out)
    }

    /// [`KvOps::kv_cache`], checked.
    fn run_kv_cache(&mut self, layout: &KvLayout) -> Result<Self::Kv>;
    /// [`KvOps::kv_grow`], checked (`num_pages` more than held).
    fn run_kv_grow(&mut self, kv: &mut Self::Kv, num_pages: usize) -> Result<()>;
    /// [`KvOps::kv_append`], checked.
    fn run_kv_append(
        &mut self,
        kv: &mut Self::Kv,
        layer: usize,
        table: &PageTable,
        start: usize,
        k: &Self::Tensor,
        v: &Self::Tensor,
    ) -> Result<()>;
    /// [`KvOps::kv_append_rope`], checked.
    #[allow(clippy::too_many_arguments)]
    fn run_kv_append_rope(
        &mut self,
        kv: &mut Self::Kv,
        layer: usize,
        table: &PageTable,
        start: usize,
        k: &Self::Tensor,
        v: &Self::Tensor,
        q: &mut Self::Tensor,
        q_heads: usize,
        positions: &Self::Ids,
        rope: &Self::Rope,
    ) -> Result<()>;
    /// [`KvOps::kv_move`], checked.
    fn run_kv_move(
        &mut self,
        kv: &mut Self::Kv,
        table: &PageTable,
        moves: &[(usize, usize)],
    ) -> Result<()>;
    /// [`KvOps::attention_prefill`], checked.
    fn run_attention_prefill(
        &mut self,
        q: &Self::Tensor,
        cache: &KvView<'_, Self>,
        q_start: usize,
        kv_len: usize,
        out: &mut Self::Tensor,
    ) -> Result<()>;
    /// [`KvOps::attention_decode`], checked.
    fn run_attention_decode(
        &mut self,
        q: &Self::Tensor,
        cache: &KvView<'_, Self>,
        kv_len: usize,
        out: &mut Self::Tensor,
    ) -> Result<()>;
    /// [`KvOps::attention_decode_list`], checked.
    fn run_attention_decode_list(
        &mut self,
        q: &Self::Tensor,
        cache: &KvView<'_, Self>,
        seq_len: usize,
        list: &KeyList<'_, Self::Ids>,
        out: &mut Self::Tensor,
    ) -> Result<()>;
    /// [`KvOps::attention_prefill_list`], checked.
    fn run_attention_prefill_list(
        &mut self,
        q: &Self::Tensor,
        cache: &KvView<'_, Self>,
        rows: Range<usize>,
        q_start: usize,
        list: &KeyList<'_, Self::Ids>,
        out: &mut Self::Tensor,
    ) -> Result<()>;
    /// [`KvOps::attention_tree`], checked.
    fn run_attention_tree(
        &mut self,
        q: &Self::Tensor,
        cache: &KvView<'_, Self>,
        prefix_len: usize,
        tree: &Self::Ids,
        list: Option<&KeyList<'_, Self::Ids>>,
        out: &mut Self::Tensor,
    ) -> Result<()>;
}

fn attention_shape<E: Executor>(
    op: &'static str,
    cache: &KvView<'_, E>,
    q: (usize, usize),
    out: (usize, usize),
    q_start: usize,
    kv_len: usize,
) -> Result<usize> {
    check::attention(
        op,
        cache.layout(),
        cache.layer,
        cache.table,
        q,
        out,
        q_start,
        kv_len,
        cache.max_pos(),
    )
}
