//! Quest (docs/ALGORITHMS.md section 2): per-block key bounds that follow the
//! cache; a decode query (or, optionally, a prefill sub-chunk's mean query)
//! scores each earlier block by its upper bound and attends to the best blocks
//! of each KV head plus its own.

use super::dense;
use super::{AttentionShape, LayerInput, PolicyState, Step};
use crate::error::{Error, Result};
use crate::ops::{KeyList, Ops, Selection};

/// Quest parameters (docs/ALGORITHMS.md section 2); defaults are the paper's.
///
/// ```
/// let c = kvsieve::QuestConfig { block: 2, ..Default::default() };
/// assert!(c.validate().is_err());
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct QuestConfig {
    /// Tokens per block (divides the page size; at least 4).
    pub block: usize,
    /// Tokens attended per decode step: the last (partial) block plus the
    /// budget / block - 1 best blocks of each KV head.
    pub budget: usize,
    /// Leading layers that stay dense.
    pub dense_layers: usize,
    /// Block-sparse prefill (0: dense prefill, as in the paper): each sub-chunk
    /// of this many queries attends to a window (itself and as many tokens
    /// before it) plus the budget / block - 1 best earlier blocks of each KV
    /// head, scored with the mean of its (rotated) queries.
    pub prefill_subchunk: usize,
}

impl QuestConfig {
    /// Blocks chosen per KV head: the budget less the query's own block (decode)
    /// or window (prefill sub-chunk).
    ///
    /// ```
    /// use kvsieve::attention::QuestConfig;
    /// assert_eq!(QuestConfig::default().top_blocks(), 2048 / 16 - 1);
    /// ```
    pub fn top_blocks(&self) -> usize {
        self.budget / self.block - 1
    }

    /// Checks the values, naming the bad one.
    pub fn validate(&self) -> Result<()> {
        if self.block < 4 || self.budget < 2 * self.block {
            return Err(Error::InvalidOption(format!(
                "Quest block {} must be >= 4 and the budget {} at least two blocks",
                self.block, self.budget
            )));
        }
        Ok(())
    }
}

impl Default for QuestConfig {
    fn default() -> Self {
        Self {
            block: 16,
            budget: 2048,
            dense_layers: 2,
            prefill_subchunk: 0,
        }
    }
}

/// Block bounds, scores and each layer's chosen blocks.
struct Buffers<E: Ops> {
    bounds: E::Bounds,
    /// `[kv_heads, cap]` block scores, summed over each KV head's query heads.
    scores: E::Tensor,
    cap: usize,
    /// Per layer: `[kv_heads, top]` block ids.
    selected: Vec<E::Ids>,
    /// `[1, q_dim]`: a prefill sub-chunk's mean query.
    fingerprint: E::Tensor,
}

/// What the current forward does in the layers past the dense ones.
enum Mode<E: Ops> {
    /// Dense attention (bounds still follow the new tokens).
    Dense,
    /// Dense tree attention of a draft tree.
    Tree(E::Ids),
    /// One decode token selecting blocks.
    Decode,
    /// A prefill chunk cut into sub-chunks of this many queries, each choosing
    /// its blocks.
    Prefill(usize),
}

/// Quest's state for one session.
pub struct Quest<E: Ops> {
    c: QuestConfig,
    shape: AttentionShape,
    buf: Option<Buffers<E>>,
    /// Leading tokens whose blocks' bounds are up to date.
    valid: usize,
    /// First token whose block this step recomputes.
    from: usize,
    mode: Mode<E>,
}

impl<E: Ops> Quest<E> {
    /// State for `c` (checked) over `shape`.
    pub fn new(c: QuestConfig, shape: AttentionShape) -> Result<Self> {
        c.validate()?;
        crate::ops::check::bounds_block(&shape.layout, c.block)?;
        Ok(Self {
            c,
            shape,
            buf: None,
            valid: 0,
            from: 0,
            mode: Mode::Dense,
        })
    }

    /// Bounds for the new tokens in every step; a decode token with more whole
    /// blocks before its own than the budget holds selects.
    fn begin_tokens(&mut self, ops: &mut E, n: usize, seq_len: usize) -> Result<()> {
        let (c, kv_heads) = (self.c, self.shape.layout.kv_heads);
        let start = seq_len - n;
        let top = c.top_blocks();
        let last = (seq_len - 1) / c.block;
        let buf = match self.buf.take() {
            Some(b) => b,
            None => Buffers {
                bounds: ops.block_bounds(&self.shape.layout, c.block, true)?,
                scores: ops.tensor(kv_heads, 1024)?,
                cap: 1024,
                selected: (0..self.shape.layout.layers)
                    .map(|_| ops.ids(&vec![0u32; kv_heads * top]))
                    .collect::<Result<_>>()?,
                fingerprint: ops.tensor(1, self.shape.q_dim())?,
            },
        };
        let buf = self.buf.insert(buf);
        self.from = self.valid.min(start);
        self.valid = seq_len;
        if last <= top || (n > 1 && c.prefill_subchunk == 0) {
            return Ok(());
        }
        if buf.cap < last {
            buf.cap = last.next_power_of_two();
            buf.scores = ops.tensor(kv_heads, buf.cap)?;
        }
        self.mode = if n == 1 {
            Mode::Decode
        } else {
            Mode::Prefill(c.prefill_subchunk)
        };
        Ok(())
    }

    /// Block-sparse prefill of the chunk's rotated queries (row i is the token
    /// at `start + i`): each sub-chunk of `sub` queries attends to a window
    /// (its own blocks and the `sub` tokens before them) plus the budget /
    /// block - 1 best earlier blocks of each KV head, scored by their bounds
    /// against the sub-chunk's mean query (the mean kept more passkeys than the
    /// largest bound over the rows; docs/RESULTS.md). A sub-chunk with no more
    /// earlier blocks than that attends to all.
    fn prefill(
        &mut self,
        ops: &mut E,
        a: &LayerInput<'_, E>,
        sub: usize,
        q: &E::Tensor,
        out: &mut E::Tensor,
    ) -> Result<()> {
        let (c, kv_heads) = (self.c, self.shape.layout.kv_heads);
        let Some(buf) = self.buf.as_mut() else {
            return Err(Error::Internal("Quest buffers missing".into()));
        };
        let top = c.top_blocks();
        for first in (0..a.n).step_by(sub) {
            let rows = first..(first + sub).min(a.n);
            let (q_start, end) = (a.start + first, a.start + rows.end);
            // The window: the sub-chunk's own blocks and the `sub` tokens
            // before it (a decode query's own block plays that part), so every
            // query sees its recent context. The top blocks come from the
            // whole blocks before.
            let before = q_start.saturating_sub(sub) / c.block;
            let (n_selected, tail_start) = if before <= top {
                (0, 0)
            } else {
                ops.mean_rows(q, rows.clone(), &mut buf.fingerprint)?;
                let (fp, scores) = (&buf.fingerprint, &mut buf.scores);
                ops.block_group_scores(
                    fp,
                    &buf.bounds,
                    a.cache.layer,
                    a.cache.table,
                    0..before,
                    scores,
                )?;
                let sel = &mut buf.selected[a.cache.layer];
                ops.block_top_k(scores, kv_heads, before, top, sel)?;
                (top * c.block, before * c.block)
            };
            let list = KeyList {
                n_init: 0,
                selected: &buf.selected[a.cache.layer],
                n_selected,
                tail_start,
                tail_len: end - tail_start,
                compact: false,
                selection: if n_selected > 0 {
                    Selection::KvHeadBlocks(c.block)
                } else {
                    Selection::Shared
                },
            };
            ops.attention_prefill_list(q, &a.cache, rows, q_start, &list, out)?;
        }
        Ok(())
    }

    /// A decode query: its own block is always attended; the top blocks come
    /// from the whole blocks before it.
    fn decode(
        &mut self,
        ops: &mut E,
        a: &LayerInput<'_, E>,
        q: &E::Tensor,
        out: &mut E::Tensor,
    ) -> Result<()> {
        let (c, kv_heads) = (self.c, self.shape.layout.kv_heads);
        let Some(buf) = self.buf.as_mut() else {
            return Err(Error::Internal("Quest buffers missing".into()));
        };
        let seq_len = a.seq_len();
        let (top, last) = (c.top_blocks(), (seq_len - 1) / c.block);
        let sel = &mut buf.selected[a.cache.layer];
        ops.block_group_scores(
            q,
            &buf.bounds,
            a.cache.layer,
            a.cache.table,
            0..last,
            &mut buf.scores,
        )?;
        ops.block_top_k(&buf.scores, kv_heads, last, top, sel)?;
        let list = KeyList {
            n_init: 0,
            selected: &buf.selected[a.cache.layer],
            n_selected: top * c.block,
            tail_start: last * c.block,
            tail_len: seq_len - last * c.block,
            compact: false,
            selection: Selection::KvHeadBlocks(c.block),
        };
        ops.attention_decode_list(q, &a.cache, seq_len, &list, out)
    }
}

impl<E: Ops> PolicyState<E> for Quest<E> {
    fn grow(&mut self, ops: &mut E, num_pages: usize) -> Result<()> {
        self.shape.layout.num_pages = num_pages;
        match self.buf.as_mut() {
            Some(b) => ops.bounds_grow(&mut b.bounds, num_pages),
            None => Ok(()),
        }
    }

    fn begin(&mut self, ops: &mut E, step: Step<'_>) -> Result<()> {
        self.mode = Mode::Dense;
        match step {
            Step::Tokens { n, seq_len } => self.begin_tokens(ops, n, seq_len),
            Step::Tree { mask, start } => {
                // Draft slots are not the committed tokens: their blocks
                // recompute later.
                self.valid = self.valid.min(start);
                self.mode = Mode::Tree(ops.ids(mask)?);
                Ok(())
            }
        }
    }

    // Every path rotates the queries at their true positions first.
    fn queries_at_true_positions(&self, _layer: usize) -> bool {
        true
    }

    fn layer(
        &mut self,
        ops: &mut E,
        a: &LayerInput<'_, E>,
        q: &mut E::Tensor,
        out: &mut E::Tensor,
    ) -> Result<()> {
        if let Mode::Tree(mask) = &self.mode {
            return dense::tree(ops, a, mask, q, out);
        }
        dense::rotate(ops, a, q)?;
        if a.cache.layer < self.c.dense_layers {
            return dense::attend(ops, a, q, out);
        }
        let Some(buf) = self.buf.as_mut() else {
            // No committed step yet: nothing to select from.
            return dense::attend(ops, a, q, out);
        };
        let range = self.from..a.seq_len();
        ops.kv_bounds(&a.cache, &mut buf.bounds, range)?;
        match self.mode {
            Mode::Prefill(sub) => self.prefill(ops, a, sub, q, out),
            Mode::Decode => self.decode(ops, a, q, out),
            Mode::Dense | Mode::Tree(_) => dense::attend(ops, a, q, out),
        }
    }

    fn selected(&mut self, ops: &mut E, layer: usize) -> Result<Option<Vec<u32>>> {
        let ids = self.buf.as_ref().and_then(|b| b.selected.get(layer));
        ids.map(|ids| ops.download_ids(ids)).transpose()
    }
}
