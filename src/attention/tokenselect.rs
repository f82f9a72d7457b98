//! TokenSelect (docs/ALGORITHMS.md section 1): per-head q . k scores of the
//! candidates, a soft vote over the query heads and the top k tokens, attended
//! with the sinks and the local window; in decode steps, draft trees and
//! prefill sub-chunks. The Selection Cache ([`super::selection_cache`]) and the
//! hierarchical prefilter ([`super::prefilter`]) are its parts.

use super::dense;
use super::prefilter::{self, HierarchicalPrefilter};
use super::selection_cache::SelectionCache;
use super::{AttentionShape, LayerInput, PolicyState, SelectionStats, Step};
use crate::error::{Error, Result};
use crate::ops::{GqaMap, KeyList, Ops, SelectPlan, Selection};

/// RoPE positions of selected keys.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Positions {
    /// Original positions while the context is within the model's trained
    /// length (closest to dense attention there), compact ones once it goes
    /// past (positions the model never saw otherwise); a prompt that goes past
    /// takes compact positions from its first chunk on.
    #[default]
    Auto,
    /// A key's position is its rank in the attended list (extrapolates past the
    /// trained context).
    Compact,
    /// True positions.
    Original,
}

impl std::str::FromStr for Positions {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "auto" => Ok(Self::Auto),
            "compact" => Ok(Self::Compact),
            "original" => Ok(Self::Original),
            o => Err(Error::InvalidOption(format!(
                "positions {o:?}: expected auto, compact or original"
            ))),
        }
    }
}

/// TokenSelect parameters (docs/ALGORITHMS.md section 1); defaults are the paper's.
///
/// ```
/// use kvsieve::{Positions, TokenSelectConfig};
/// let c = TokenSelectConfig { k: 512, positions: Positions::Original, ..Default::default() };
/// assert!(c.validate().is_ok());
/// ```
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct TokenSelectConfig {
    /// Tokens selected per step.
    pub k: usize,
    /// Attention sinks kept at the start.
    pub n_init: usize,
    /// Local window kept at the end.
    pub n_local: usize,
    /// Selection Cache: reuse the last selection while cos(q, cached q) >= this
    /// (values above 1 disable the cache).
    pub cache_threshold: f32,
    /// Position scheme.
    pub positions: Positions,
    /// Prefill queries per selection: each sub-chunk of this many queries selects
    /// with the mean of its queries as the fingerprint.
    pub subchunk: usize,
    /// A prompt's last this many queries select one by one: the question at
    /// the end of a prompt would otherwise share its sub-chunk's mean query,
    /// which the text before it dominates (docs/RESULTS.md, passkeys past the
    /// trained context).
    pub prompt_tail: usize,
    /// KV head each query head scores against.
    pub gqa_map: GqaMap,
    /// Hierarchical selection (0: exact): the candidates' blocks are scored by
    /// their key bounds and only the tokens of this many best blocks take part
    /// in the soft vote.
    pub prefilter_blocks: usize,
    /// Tokens per block of the hierarchical selection.
    pub prefilter_block: usize,
    /// How much of a block's spread its score counts (0..=1): the score is
    /// q . c + spread |q| . r for the block's per-channel key centre c and
    /// half-range r. 1 is the upper bound sum_i max(q_i M_i, q_i m_i), which
    /// favours blocks of widely spread keys (docs/RESULTS.md compares values).
    pub prefilter_spread: f32,
}

impl Default for TokenSelectConfig {
    fn default() -> Self {
        Self {
            k: 2048,
            n_init: 128,
            n_local: 512,
            cache_threshold: 0.9,
            positions: Positions::Auto,
            subchunk: 512,
            prompt_tail: 16,
            gqa_map: GqaMap::Grouped,
            prefilter_blocks: 0,
            prefilter_block: 16,
            prefilter_spread: 0.25,
        }
    }
}

impl TokenSelectConfig {
    /// Checks the values, naming the bad one.
    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(Error::InvalidOption(m));
        if self.k == 0 || self.k > 65536 {
            return bad(format!("TokenSelect k {} must be in 1..=65536", self.k));
        }
        if self.subchunk == 0 {
            return bad("TokenSelect prefill sub-chunk must be >= 1".into());
        }
        if self.n_local == 0 {
            return bad("TokenSelect n_local must be >= 1 (it holds the current token)".into());
        }
        if self.prefilter_blocks > 0
            && (self.prefilter_block < 4
                || self.prefilter_blocks * self.prefilter_block < self.k + 2 * self.prefilter_block)
        {
            return bad(format!(
                "TokenSelect prefilter: {} blocks of {} tokens must hold k {} plus two blocks (blocks >= 4 tokens)",
                self.prefilter_blocks, self.prefilter_block, self.k
            ));
        }
        if !(0.0..=1.0).contains(&self.prefilter_spread) {
            return bad(format!(
                "TokenSelect prefilter spread {} must be in 0..=1",
                self.prefilter_spread
            ));
        }
        if !(self.cache_threshold >= -1.0) {
            return bad(format!(
                "cache threshold {} must be >= -1",
                self.cache_threshold
            ));
        }
        Ok(())
    }

    /// Candidates of a query at logical index `t`: `[n_init, t + 1 - n_local)`,
    /// when there are more than `k` of them (else attention is dense).
    fn candidates(&self, t: usize) -> Option<usize> {
        let cand = (t + 1).checked_sub(self.n_init + self.n_local)?;
        (cand > self.k).then_some(cand)
    }

    /// Length of a selected key list.
    fn list_len(&self) -> usize {
        self.n_init + self.k + self.n_local
    }

    /// The key list of a query (or the first query of a sub-chunk) at logical
    /// index `at` over the layer's selection, with `tail_len` window tokens.
    fn list<'a, I>(
        &self,
        selected: &'a I,
        at: usize,
        tail_len: usize,
        compact: bool,
    ) -> KeyList<'a, I> {
        KeyList {
            n_init: self.n_init,
            selected,
            n_selected: self.k,
            tail_start: at + 1 - self.n_local,
            tail_len,
            compact,
            selection: Selection::Shared,
        }
    }

    /// Whether a step whose context reaches `seq_len` tokens uses compact
    /// positions, for a model trained on `trained` positions.
    pub fn compact_at(&self, seq_len: usize, trained: usize) -> bool {
        match self.positions {
            Positions::Compact => true,
            Positions::Original => false,
            Positions::Auto => seq_len > trained,
        }
    }
}

/// Selection scratch and per-layer selections, grown to the candidates.
struct Buffers<E: Ops> {
    cap: usize,
    /// `[1, q_dim]`: the (rotated) query fingerprint.
    q_fp: E::Tensor,
    /// `[q_heads, cap]` per-head scores.
    scores: E::Tensor,
    /// `[1, cap]` soft votes.
    votes: E::Tensor,
    /// Per layer: `[k]` selected token indices.
    selected: Vec<E::Ids>,
    cache: SelectionCache<E>,
    /// Raw (unrotated) queries of a prefill chunk, for the sub-chunk means.
    q_raw: Option<E::Tensor>,
    /// `[1]`: the fingerprint's RoPE position (`n_local`: rotated as if it sat
    /// that many tokens back).
    fp_pos: E::Ids,
    /// `[1]`: a decode query's compact position (`list_len - 1`).
    compact_pos: E::Ids,
}

/// A prefill sub-chunk: rows of the chunk and whether it selects.
#[derive(Clone, Debug)]
struct SubChunk {
    rows: std::ops::Range<usize>,
    sparse: bool,
}

/// Query positions of a sparse step: the model's true ones, or the step's own.
enum QueryPos<E: Ops> {
    True,
    Own(E::Ids),
}

impl<E: Ops> QueryPos<E> {
    fn get<'a>(&'a self, a: &'a LayerInput<'_, E>) -> &'a E::Ids {
        match self {
            QueryPos::True => a.positions,
            QueryPos::Own(p) => p,
        }
    }
}

/// What the current forward does in every layer.
enum Mode<E: Ops> {
    /// Dense attention at true positions.
    Dense,
    /// A draft tree within the budget: dense tree attention.
    Tree(E::Ids),
    /// One sparse decode token (at its true position, or at the constant
    /// compact one the buffers hold: nothing is uploaded per step).
    Decode,
    /// Prefill sub-chunks, at least one sparse, and every row's query position.
    Prefill(Vec<SubChunk>, QueryPos<E>),
    /// A draft tree whose root selects as a decode query would; every node
    /// attends to that selection plus its ancestors. Mask, node positions.
    TreeList(E::Ids, QueryPos<E>),
}

/// TokenSelect's state for one session.
pub struct TokenSelect<E: Ops> {
    c: TokenSelectConfig,
    shape: AttentionShape,
    buf: Option<Buffers<E>>,
    pre: Option<HierarchicalPrefilter<E>>,
    mode: Mode<E>,
    /// Compact positions in the current step ([`TokenSelectConfig::compact_at`]).
    compact: bool,
    /// The length the prompt being fed reaches ([`PolicyState::expect_len`]).
    horizon: usize,
    /// Selections run without the Selection Cache (threshold above 1).
    uncached_selections: u64,
    prefill_selections: u64,
}

impl<E: Ops> TokenSelect<E> {
    /// State for `c` (checked) over `shape`.
    pub fn new(c: TokenSelectConfig, shape: AttentionShape) -> Result<Self> {
        c.validate()?;
        if c.prefilter_blocks > 0 {
            crate::ops::check::bounds_block(&shape.layout, c.prefilter_block)?;
        }
        Ok(Self {
            c,
            shape,
            buf: None,
            pre: None,
            mode: Mode::Dense,
            compact: false,
            horizon: 0,
            uncached_selections: 0,
            prefill_selections: 0,
        })
    }

    /// Grows (or creates) the selection buffers to `cand` candidates and `rows`
    /// raw query rows.
    fn ensure_buffers(&mut self, ops: &mut E, cand: usize, rows: usize) -> Result<&mut Buffers<E>> {
        let (c, qd, heads) = (&self.c, self.shape.q_dim(), self.shape.q_heads);
        // A hierarchical selection's slots may pass the candidates by two blocks.
        let cand = cand + 2 * c.prefilter_block * usize::from(c.prefilter_blocks > 0);
        let buf = match self.buf.take() {
            Some(b) => b,
            None => {
                let layers = self.shape.layout.layers;
                let selected = (0..layers)
                    .map(|_| ops.ids(&vec![0u32; c.k]))
                    .collect::<Result<_>>()?;
                // Grow geometrically so decode does not reallocate every step.
                let cap = cand.next_power_of_two().max(1024);
                Buffers {
                    cap,
                    q_fp: ops.tensor(1, qd)?,
                    scores: ops.tensor(heads, cap)?,
                    votes: ops.tensor(1, cap)?,
                    selected,
                    cache: SelectionCache::new(ops, layers, qd)?,
                    q_raw: None,
                    fp_pos: ops.ids(&[c.n_local as u32])?,
                    compact_pos: ops.ids(&[(c.list_len() - 1) as u32])?,
                }
            }
        };
        let buf = self.buf.insert(buf);
        if buf.cap < cand {
            buf.cap = cand.next_power_of_two();
            buf.scores = ops.tensor(heads, buf.cap)?;
            buf.votes = ops.tensor(1, buf.cap)?;
        }
        if rows > 1 && buf.q_raw.as_ref().is_none_or(|t| E::rows(t) < rows) {
            buf.q_raw = Some(ops.tensor(rows, qd)?);
        }
        Ok(buf)
    }

    fn begin_tokens(&mut self, ops: &mut E, n: usize, seq_len: usize) -> Result<()> {
        let c = self.c;
        let start = seq_len - n;
        self.compact = c.compact_at(seq_len.max(self.horizon), self.shape.trained);
        let compact = self.compact;
        if c.prefilter_blocks > 0 {
            // Bounds follow the cache from the first token, selecting or not.
            if self.pre.is_none() {
                self.pre = Some(HierarchicalPrefilter::new(ops, &c, &self.shape.layout)?);
            }
            if let Some(pre) = self.pre.as_mut() {
                pre.begin_tokens(start, seq_len);
            }
        }
        if n > 1 {
            if let Some(buf) = self.buf.as_mut() {
                buf.cache.invalidate(ops)?;
            }
        }
        if n == 1 {
            let Some(cand) = c.candidates(start) else {
                return Ok(());
            };
            self.ensure_buffers(ops, cand, 1)?;
            self.mode = Mode::Decode;
            return Ok(());
        }
        // Prefill: a sub-chunk whose first query has more than k candidates selects
        // once for all its queries (later queries add tokens to the local window).
        let mut subs = Vec::new();
        let mut max_cand = 0;
        let mut positions = Vec::with_capacity(n);
        let tail = if seq_len == self.horizon {
            n.saturating_sub(c.prompt_tail)
        } else {
            n
        };
        let mut next = 0;
        while next < n {
            let r0 = next;
            next = if r0 >= tail {
                r0 + 1
            } else {
                (r0 + c.subchunk).min(tail)
            };
            let rows = r0..next;
            let cand = c.candidates(start + r0);
            max_cand = max_cand.max(cand.unwrap_or(0));
            for (i, r) in rows.clone().enumerate() {
                positions.push(match cand {
                    Some(_) if compact => c.list_len() - 1 + i,
                    _ => start + r,
                } as u32);
            }
            subs.push(SubChunk {
                rows,
                sparse: cand.is_some(),
            });
        }
        if max_cand == 0 {
            return Ok(());
        }
        self.ensure_buffers(ops, max_cand, n)?;
        let q_pos = if compact {
            QueryPos::Own(ops.ids(&positions)?)
        } else {
            QueryPos::True
        };
        self.mode = Mode::Prefill(subs, q_pos);
        Ok(())
    }

    /// A verify step: dense tree attention, or (when the root has more than k
    /// candidates) the root's selection for every node. The root's query drives
    /// the Selection Cache like a decode query: consecutive roots are
    /// consecutive accepted tokens.
    fn begin_tree(&mut self, ops: &mut E, mask: &[u32], start: usize) -> Result<()> {
        let tree = ops.ids(mask)?;
        if let Some(pre) = self.pre.as_mut() {
            pre.begin_tree(start);
        }
        let c = self.c;
        let Some(cand) = c.candidates(start) else {
            self.mode = Mode::Tree(tree);
            return Ok(());
        };
        self.ensure_buffers(ops, cand, 1)?;
        let n = mask.len() / 5;
        self.compact = c.compact_at(start + n, self.shape.trained);
        let q_pos = if self.compact {
            let base = (c.list_len() - 1) as u32;
            let depths = &mask[4 * n..];
            QueryPos::Own(ops.ids(&depths.iter().map(|&d| base + d).collect::<Vec<_>>())?)
        } else {
            QueryPos::True
        };
        self.mode = Mode::TreeList(tree, q_pos);
        Ok(())
    }

    /// Selection for one query (decode token, or a draft tree's root in row
    /// 0 of the raw queries `q`): the fingerprint is that row rotated at
    /// `n_local`; the Selection Cache decides on the device whether the
    /// selection ops run.
    fn query_select(&mut self, ops: &mut E, a: &LayerInput<'_, E>, q: &E::Tensor) -> Result<()> {
        let c = self.c;
        let cand = a.start + 1 - c.n_init - c.n_local;
        let Some(buf) = self.buf.as_mut() else {
            return Err(Error::Internal("TokenSelect buffers missing".into()));
        };
        ops.copy_rows(q, 0, &mut buf.q_fp, 0, 1)?;
        ops.rope(&mut buf.q_fp, a.q_heads, &buf.fp_pos, a.cache.rope)?;
        let gated = c.cache_threshold <= 1.0;
        if gated {
            let plan = SelectPlan {
                layer: a.cache.layer,
                q_heads: a.q_heads,
                begin: c.n_init,
                n: cand,
                k: c.k,
                prefilter: self.pre.as_ref().and_then(|_| prefilter::plan(&c, cand)),
            };
            buf.cache
                .check(ops, &buf.q_fp, c.cache_threshold, &plan, &a.cache)?;
        } else {
            self.uncached_selections += 1;
        }
        select(ops, &c, buf, self.pre.as_mut(), a, cand, gated)
    }

    fn layer_sparse(
        &mut self,
        ops: &mut E,
        a: &LayerInput<'_, E>,
        q: &mut E::Tensor,
        out: &mut E::Tensor,
    ) -> Result<()> {
        let c = self.c;
        match &self.mode {
            Mode::Dense => return dense::rotate_and_attend(ops, a, q, out),
            Mode::Tree(mask) => return dense::tree(ops, a, mask, q, out),
            Mode::Prefill(..) => return self.prefill(ops, a, q, out),
            Mode::Decode | Mode::TreeList(..) => {}
        }
        // The query at `start` (a decode token, or a draft tree's root in
        // row 0) selects. A decode window ends with the token itself; a
        // tree's holds the n_local - 1 tokens before the root, the tree
        // follows.
        self.query_select(ops, a, q)?;
        let Some(buf) = self.buf.as_ref() else {
            return Err(Error::Internal("TokenSelect buffers missing".into()));
        };
        let (pos, tree) = match &self.mode {
            Mode::Decode if self.compact => (&buf.compact_pos, None),
            Mode::Decode => (a.positions, None),
            Mode::TreeList(mask, p) => (p.get(a), Some(mask)),
            _ => return Err(Error::Internal("TokenSelect mode changed".into())),
        };
        ops.rope(q, a.q_heads, pos, a.cache.rope)?;
        let sel = &buf.selected[a.cache.layer];
        match tree {
            Some(mask) => {
                let list = c.list(sel, a.start, c.n_local - 1, self.compact);
                ops.attention_tree(q, &a.cache, a.start, mask, Some(&list), out)
            }
            None => {
                let list = c.list(sel, a.start, c.n_local, self.compact);
                ops.attention_decode_list(q, &a.cache, a.seq_len(), &list, out)
            }
        }
    }

    /// A prefill chunk: each sparse sub-chunk selects with the mean of its raw
    /// queries and attends to the sinks, its selection and its window; the
    /// others attend to every earlier token at true positions.
    fn prefill(
        &mut self,
        ops: &mut E,
        a: &LayerInput<'_, E>,
        q: &mut E::Tensor,
        out: &mut E::Tensor,
    ) -> Result<()> {
        let c = self.c;
        let Mode::Prefill(subs, q_pos) = &self.mode else {
            return Err(Error::Internal("TokenSelect prefill mode missing".into()));
        };
        let Some(buf) = self.buf.as_mut() else {
            return Err(Error::Internal("TokenSelect buffers missing".into()));
        };
        let Some(q_raw) = buf.q_raw.as_mut() else {
            return Err(Error::Internal(
                "TokenSelect raw-query buffer missing".into(),
            ));
        };
        ops.copy_rows(q, 0, q_raw, 0, a.n)?;
        ops.rope(q, a.q_heads, q_pos.get(a), a.cache.rope)?;
        for sub in subs {
            let at = a.start + sub.rows.start;
            let m = sub.rows.len();
            if sub.sparse {
                let Some(q_raw) = buf.q_raw.as_ref() else {
                    return Err(Error::Internal(
                        "TokenSelect raw-query buffer missing".into(),
                    ));
                };
                ops.mean_rows(q_raw, sub.rows.clone(), &mut buf.q_fp)?;
                ops.rope(&mut buf.q_fp, a.q_heads, &buf.fp_pos, a.cache.rope)?;
                let cand = at + 1 - c.n_init - c.n_local;
                select(ops, &c, buf, self.pre.as_mut(), a, cand, false)?;
                self.prefill_selections += 1;
            }
            let sel = &buf.selected[a.cache.layer];
            let list = if sub.sparse {
                c.list(sel, at, c.n_local - 1 + m, self.compact)
            } else {
                // Within the budget: every earlier token, at true positions.
                KeyList {
                    n_init: 0,
                    selected: sel,
                    n_selected: 0,
                    tail_start: 0,
                    tail_len: at + m,
                    compact: false,
                    selection: Selection::Shared,
                }
            };
            let rows = sub.rows.clone();
            ops.attention_prefill_list(q, &a.cache, rows, at, &list, out)?;
        }
        Ok(())
    }
}

/// Scoring, soft vote and top-k over `cand` candidates from `n_init` into the
/// layer's selection (gated by the Selection Cache decision when `gated`);
/// hierarchical: first the block stage, then the same over only those blocks'
/// tokens. The fingerprint is in `buf.q_fp`.
fn select<E: Ops>(
    ops: &mut E,
    c: &TokenSelectConfig,
    buf: &mut Buffers<E>,
    pre: Option<&mut HierarchicalPrefilter<E>>,
    a: &LayerInput<'_, E>,
    cand: usize,
    gated: bool,
) -> Result<()> {
    let gate = gated.then_some(&buf.cache.gate);
    let (fp, scores, votes) = (&buf.q_fp, &mut buf.scores, &mut buf.votes);
    let pf = match pre {
        Some(pre) => pre.select_blocks(ops, c, a, fp, cand, scores, votes, gate)?,
        None => None,
    };
    let slots = pf.as_ref().map_or(cand, |pf| pf.slots());
    let (n_init, map) = (c.n_init, c.gqa_map);
    ops.ts_score(fp, &a.cache, n_init, cand, map, scores, gate, pf.as_ref())?;
    ops.ts_vote(scores, a.q_heads, slots, votes, gate)?;
    let selected = &mut buf.selected[a.cache.layer];
    ops.ts_top_k(votes, slots, c.k, c.n_init, selected, gate, pf.as_ref())
}

impl<E: Ops> PolicyState<E> for TokenSelect<E> {
    fn grow(&mut self, ops: &mut E, num_pages: usize) -> Result<()> {
        self.shape.layout.num_pages = num_pages;
        match self.pre.as_mut() {
            Some(pre) => pre.grow(ops, num_pages),
            None => Ok(()),
        }
    }

    fn begin(&mut self, ops: &mut E, step: Step<'_>) -> Result<()> {
        self.mode = Mode::Dense;
        match step {
            Step::Tokens { n, seq_len } => self.begin_tokens(ops, n, seq_len),
            Step::Tree { mask, start } => self.begin_tree(ops, mask, start),
        }
    }

    // Dense and tree steps rotate at true positions; selecting steps read
    // the raw queries first.
    // Auto positions decide for the whole prompt: its early chunks, within
    // the trained length, take compact positions too when the prompt goes
    // past it, so the result does not depend on the chunk size, and the keys
    // of the whole prompt come from one scheme (16K passkeys that mixed the
    // two were missed where compact ones were found).
    fn expect_len(&mut self, seq_len: usize) {
        self.horizon = seq_len;
    }

    fn queries_at_true_positions(&self, _layer: usize) -> bool {
        matches!(self.mode, Mode::Dense | Mode::Tree(_))
    }

    fn layer(
        &mut self,
        ops: &mut E,
        a: &LayerInput<'_, E>,
        q: &mut E::Tensor,
        out: &mut E::Tensor,
    ) -> Result<()> {
        // Tree steps leave the bounds to the next committed step.
        if !matches!(self.mode, Mode::Tree(_)) {
            if let Some(pre) = self.pre.as_mut() {
                pre.update_bounds(ops, a)?;
            }
        }
        self.layer_sparse(ops, a, q, out)
    }

    fn stats(&mut self, ops: &mut E) -> Result<SelectionStats> {
        let (hits, misses) = match &self.buf {
            Some(b) => b.cache.counts(ops)?,
            None => (0, 0),
        };
        Ok(SelectionStats {
            selections: misses + self.uncached_selections,
            cache_hits: hits,
            prefill_selections: self.prefill_selections,
        })
    }

    fn selected(&mut self, ops: &mut E, layer: usize) -> Result<Option<Vec<u32>>> {
        let ids = self.buf.as_ref().and_then(|b| b.selected.get(layer));
        ids.map(|ids| ops.download_ids(ids)).transpose()
    }
}
