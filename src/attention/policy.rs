//! Attention policies and the per-session state they keep. The model calls
//! [`Attention::layer`] with each layer's raw (unrotated) queries; the policy
//! rotates them and runs dense or sparse attention.

use super::{dense_attention, KvLayout, PageTable};
use crate::error::{Error, Result};
use crate::model::ModelConfig;
use crate::ops::{GqaMap, KeyList, Ops, Prefilter, PrefilterPlan, SelectPlan};

/// RoPE positions of selected keys.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Positions {
    /// A key's position is its rank in the attended list (extrapolates past the
    /// trained context).
    #[default]
    Compact,
    /// True positions.
    Original,
}

impl std::str::FromStr for Positions {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "compact" => Ok(Self::Compact),
            "original" => Ok(Self::Original),
            o => Err(Error::InvalidOption(format!(
                "positions {o:?}: expected compact or original"
            ))),
        }
    }
}

/// TokenSelect parameters (ALGORITHMS.md section 1); defaults are the paper's.
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
    /// favours blocks of widely spread keys; on the default model 0.25 recovered
    /// more of exact TokenSelect's selection (4K, k 512, 128 blocks: 81.7 %
    /// against 79.1 %; 8K, k 128, 64 blocks: 47.0 % against 41.2 %).
    pub prefilter_spread: f32,
}

impl Default for TokenSelectConfig {
    fn default() -> Self {
        Self {
            k: 2048,
            n_init: 128,
            n_local: 512,
            cache_threshold: 0.9,
            positions: Positions::Compact,
            subchunk: 512,
            gqa_map: GqaMap::Grouped,
            prefilter_blocks: 0,
            prefilter_block: 16,
            prefilter_spread: 0.25,
        }
    }
}

/// Quest parameters (ALGORITHMS.md section 2); defaults are the paper's.
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

/// TidalDecode parameters (ALGORITHMS.md section 3). The defaults place the
/// layers as the paper does for a 32-layer model (2 and 13). The right
/// re-selection layer depends on the model: in the 30-layer default model the
/// needle of a passkey prompt enters the KV heads' top tokens from layer 14 on,
/// and at 8K re-selection at 14 finds every key dense finds while 13 misses two
/// of three (`tests/passkey.rs`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TidalConfig {
    /// The layer that selects (layers before it are dense).
    pub selection_layer: usize,
    /// The layer that selects again; later layers use its choice.
    pub reselection_layer: usize,
    /// Tokens each KV head keeps (the current token comes on top).
    pub budget: usize,
}

impl Default for TidalConfig {
    fn default() -> Self {
        Self {
            selection_layer: 2,
            reselection_layer: 13,
            budget: 2048,
        }
    }
}

/// Which attention runs.
#[derive(Clone, Copy, Debug, PartialEq, Default)]
pub enum AttentionPolicy {
    /// Full causal attention (the reference).
    #[default]
    Dense,
    /// Per-head token-level selection with soft voting, in decode steps and in
    /// prefill sub-chunks.
    TokenSelect(TokenSelectConfig),
    /// Quest: per-block key bounds, the best blocks of each KV head by their
    /// upper-bound score, block-sparse decode (prefill stays dense).
    BlockSparse(QuestConfig),
    /// TidalDecode: dense attention plus a top-budget token choice per KV head in
    /// the selection layers, the chosen positions reused by the layers after them
    /// (decode; prefill stays dense).
    Tidal(TidalConfig),
}

impl AttentionPolicy {
    /// Checks the values, naming the bad one.
    pub fn validate(&self) -> Result<()> {
        if let AttentionPolicy::BlockSparse(c) = self {
            if c.block < 4 || c.budget < 2 * c.block {
                return Err(Error::InvalidOption(format!(
                    "Quest block {} must be >= 4 and the budget {} at least two blocks",
                    c.block, c.budget
                )));
            }
        }
        if let AttentionPolicy::Tidal(c) = self {
            if c.budget == 0 || c.reselection_layer <= c.selection_layer {
                return Err(Error::InvalidOption(format!(
                    "Tidal budget {} must be >= 1 and the re-selection layer {} after the selection layer {}",
                    c.budget, c.reselection_layer, c.selection_layer
                )));
            }
        }
        if let AttentionPolicy::TokenSelect(c) = self {
            if c.k == 0 || c.k > 65536 {
                return Err(Error::InvalidOption(format!(
                    "TokenSelect k {} must be in 1..=65536",
                    c.k
                )));
            }
            if c.subchunk == 0 {
                return Err(Error::InvalidOption(
                    "TokenSelect prefill sub-chunk must be >= 1".into(),
                ));
            }
            if c.n_local == 0 {
                return Err(Error::InvalidOption(
                    "TokenSelect n_local must be >= 1 (it holds the current token)".into(),
                ));
            }
            if c.prefilter_blocks > 0
                && (c.prefilter_block < 4
                    || c.prefilter_blocks * c.prefilter_block < c.k + 2 * c.prefilter_block)
            {
                return Err(Error::InvalidOption(format!(
                    "TokenSelect prefilter: {} blocks of {} tokens must hold k {} plus two blocks (blocks >= 4 tokens)",
                    c.prefilter_blocks, c.prefilter_block, c.k
                )));
            }
            if !(0.0..=1.0).contains(&c.prefilter_spread) {
                return Err(Error::InvalidOption(format!(
                    "TokenSelect prefilter spread {} must be in 0..=1",
                    c.prefilter_spread
                )));
            }
            if !(c.cache_threshold >= -1.0) {
                return Err(Error::InvalidOption(format!(
                    "cache threshold {} must be >= -1",
                    c.cache_threshold
                )));
            }
        }
        Ok(())
    }
}

/// Selection counters.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct SelectionStats {
    /// Layer-steps that ran a selection.
    pub selections: u64,
    /// Layer-steps that reused the cached selection.
    pub cache_hits: u64,
    /// Prefill sub-chunk selections (layer by sub-chunk; not part of the hit rate).
    pub prefill_selections: u64,
}

impl SelectionStats {
    /// Share of sparse decode layer-steps served by the Selection Cache.
    pub fn hit_rate(&self) -> Option<f64> {
        let n = self.selections + self.cache_hits;
        (n > 0).then(|| self.cache_hits as f64 / n as f64)
    }
}

/// Quest state: block bounds, scores and each layer's chosen blocks.
struct QuestBuffers<E: Ops> {
    bounds: E::Bounds,
    /// `[kv_heads, cap]` block scores, summed over each KV head's query heads.
    scores: E::Tensor,
    cap: usize,
    /// Per layer: `[kv_heads, top]` block ids.
    selected: Vec<E::Ids>,
    /// Leading tokens whose blocks' bounds are up to date.
    valid: usize,
    /// First token whose block this step recomputes.
    from: usize,
    /// `[1, q_heads * head_dim]`: a prefill sub-chunk's mean query.
    fingerprint: E::Tensor,
}

/// Hierarchical TokenSelect state: unrotated key bounds and the chosen blocks.
struct PrefilterBuffers<E: Ops> {
    bounds: E::Bounds,
    /// `[prefilter_blocks]` block ids.
    blocks: E::Ids,
    /// Leading tokens whose blocks' bounds are up to date.
    valid: usize,
    /// First token whose block this step recomputes.
    from: usize,
}

/// Tidal state: token scores and the chosen positions passed layer to layer.
struct TidalBuffers<E: Ops> {
    /// `[kv_heads, cap]` token scores, summed over each KV head's query heads.
    scores: E::Tensor,
    cap: usize,
    /// `[kv_heads, budget]` token indices.
    selected: E::Ids,
}

struct TsBuffers<E: Ops> {
    cap: usize,
    q_fp: E::Tensor,
    scores: E::Tensor,
    votes: E::Tensor,
    selected: Vec<E::Ids>,
    /// Per layer: the fingerprint of the cached selection `[1, len + 1]`.
    cached: Vec<E::Tensor>,
    /// Zeros `[1, len + 1]`: copied over `cached` to invalidate it.
    no_cache: E::Tensor,
    /// Raw (unrotated) queries of a prefill chunk, for the sub-chunk means.
    q_raw: Option<E::Tensor>,
    gate: E::Gate,
}

/// A prefill sub-chunk: rows of the chunk and whether it selects.
#[derive(Clone, Debug)]
struct SubChunk {
    rows: std::ops::Range<usize>,
    sparse: bool,
}

/// What the current forward does in every layer.
enum Step<E: Ops> {
    /// Dense attention at true positions.
    Dense,
    /// One sparse decode token: fingerprint position, query position.
    Decode(TokenSelectConfig, E::Ids, E::Ids),
    /// Prefill sub-chunks, at least one sparse: fingerprint position, per-row
    /// query positions.
    Prefill(TokenSelectConfig, Vec<SubChunk>, E::Ids, E::Ids),
    /// A draft tree's nodes (speculative verification), its mask.
    Tree(E::Ids),
    /// One Quest decode token (layers past the dense ones select blocks).
    Quest,
    /// A Quest prefill chunk cut into sub-chunks of this many queries, each
    /// choosing its blocks (block-sparse prefill).
    QuestPrefill(usize),
    /// One Tidal decode token.
    Tidal,
    /// A draft tree under TokenSelect: the root selects as a decode query
    /// would, every node attends to that selection plus its ancestors. Mask,
    /// fingerprint position, node positions.
    TreeList(TokenSelectConfig, E::Ids, E::Ids, E::Ids),
}

/// A policy and its state for one session.
pub struct Attention<E: Ops> {
    /// The policy.
    pub policy: AttentionPolicy,
    /// The KV cache layout the policy serves.
    pub layout: KvLayout,
    ts: Option<TsBuffers<E>>,
    quest: Option<QuestBuffers<E>>,
    tidal: Option<TidalBuffers<E>>,
    pre: Option<PrefilterBuffers<E>>,
    step: Step<E>,
    /// Selections run without the Selection Cache (threshold above 1).
    uncached_selections: u64,
    prefill_selections: u64,
}

/// Candidates of a query at logical index `t`: `[n_init, t + 1 - n_local)`, when
/// there are more than `k` of them (else attention is dense).
fn candidates(c: &TokenSelectConfig, t: usize) -> Option<usize> {
    let cand = (t + 1).checked_sub(c.n_init + c.n_local)?;
    (cand > c.k).then_some(cand)
}

impl<E: Ops> Attention<E> {
    /// State for `policy` over caches of `layout`.
    pub fn new(policy: AttentionPolicy, layout: &KvLayout) -> Result<Self> {
        policy.validate()?;
        if let AttentionPolicy::BlockSparse(c) = policy {
            crate::ops::check::bounds_block(layout, c.block)?;
        }
        if let AttentionPolicy::TokenSelect(c) = policy {
            if c.prefilter_blocks > 0 {
                crate::ops::check::bounds_block(layout, c.prefilter_block)?;
            }
        }
        Ok(Self {
            policy,
            layout: *layout,
            ts: None,
            quest: None,
            tidal: None,
            pre: None,
            step: Step::Dense,
            uncached_selections: 0,
            prefill_selections: 0,
        })
    }

    /// Grows (or creates) the selection buffers to `cand` candidates and `rows`
    /// raw query rows.
    fn ensure_buffers(
        &mut self,
        ops: &mut E,
        cfg: &ModelConfig,
        c: &TokenSelectConfig,
        cand: usize,
        rows: usize,
    ) -> Result<()> {
        let qd = cfg.heads * cfg.head_dim;
        // A hierarchical selection's slots may pass the candidates by two blocks.
        let cand = cand + 2 * c.prefilter_block * usize::from(c.prefilter_blocks > 0);
        if self.ts.is_none() {
            let mut selected = Vec::with_capacity(cfg.layers);
            let mut cached = Vec::with_capacity(cfg.layers);
            for _ in 0..cfg.layers {
                selected.push(ops.ids(&vec![0u32; c.k])?);
                cached.push(ops.tensor(1, qd + 1)?);
            }
            // Grow geometrically so decode does not reallocate every step.
            let cap = cand.next_power_of_two().max(1024);
            self.ts = Some(TsBuffers {
                cap,
                q_fp: ops.tensor(1, qd)?,
                scores: ops.tensor(cfg.heads, cap)?,
                votes: ops.tensor(1, cap)?,
                selected,
                cached,
                no_cache: ops.tensor(1, qd + 1)?,
                q_raw: None,
                gate: ops.ts_gate()?,
            });
        }
        let Some(ts) = self.ts.as_mut() else {
            return Ok(());
        };
        if ts.cap < cand {
            ts.cap = cand.next_power_of_two();
            ts.scores = ops.tensor(cfg.heads, ts.cap)?;
            ts.votes = ops.tensor(1, ts.cap)?;
        }
        if rows > 1 && ts.q_raw.as_ref().is_none_or(|t| E::rows(t) < rows) {
            ts.q_raw = Some(ops.tensor(rows, qd)?);
        }
        Ok(())
    }

    /// Prepares a step of `n` tokens ending at `seq_len` (called once per forward,
    /// before the layers).
    pub fn begin_step(
        &mut self,
        ops: &mut E,
        cfg: &ModelConfig,
        n: usize,
        seq_len: usize,
    ) -> Result<()> {
        self.step = Step::Dense;
        if let AttentionPolicy::BlockSparse(c) = self.policy {
            return self.begin_quest(ops, cfg, &c, n, seq_len);
        }
        if let AttentionPolicy::Tidal(c) = self.policy {
            // Sparse once more tokens precede the current one than the budget.
            if n == 1 && seq_len - 1 > c.budget {
                if self.tidal.as_ref().is_none_or(|t| t.cap < seq_len) {
                    let cap = seq_len.next_power_of_two().max(1024);
                    self.tidal = Some(TidalBuffers {
                        scores: ops.tensor(cfg.kv_heads, cap)?,
                        cap,
                        selected: ops.ids(&vec![0u32; cfg.kv_heads * c.budget])?,
                    });
                }
                self.step = Step::Tidal;
            }
            return Ok(());
        }
        let AttentionPolicy::TokenSelect(c) = self.policy else {
            return Ok(());
        };
        let start = seq_len - n;
        let list_len = c.n_init + c.k + c.n_local;
        if c.prefilter_blocks > 0 {
            // Bounds follow the cache from the first token, selecting or not.
            if self.pre.is_none() {
                self.pre = Some(PrefilterBuffers {
                    bounds: ops.block_bounds(&self.layout, c.prefilter_block, false)?,
                    blocks: ops.ids(&vec![0u32; c.prefilter_blocks])?,
                    valid: 0,
                    from: 0,
                });
            }
            if let Some(pre) = self.pre.as_mut() {
                pre.from = pre.valid.min(start);
                pre.valid = seq_len;
            }
        }
        if n > 1 {
            // New tokens make the Selection Cache's decisions stale.
            if let Some(ts) = self.ts.as_mut() {
                for cached in ts.cached.iter_mut() {
                    ops.copy_rows(&ts.no_cache, 0, cached, 0, 1)?;
                }
            }
        }
        if n == 1 {
            let Some(cand) = candidates(&c, start) else {
                return Ok(());
            };
            self.ensure_buffers(ops, cfg, &c, cand, 1)?;
            let q_pos = match c.positions {
                Positions::Compact => list_len - 1,
                Positions::Original => start,
            };
            // The fingerprint is rotated as if it sat n_local tokens back.
            let fp = ops.ids(&[c.n_local as u32])?;
            self.step = Step::Decode(c, fp, ops.ids(&[q_pos as u32])?);
            return Ok(());
        }
        // Prefill: a sub-chunk whose first query has more than k candidates selects
        // once for all its queries (later queries add tokens to the local window).
        let mut subs = Vec::new();
        let mut max_cand = 0;
        let mut positions = Vec::with_capacity(n);
        for r0 in (0..n).step_by(c.subchunk) {
            let rows = r0..(r0 + c.subchunk).min(n);
            let cand = candidates(&c, start + r0);
            max_cand = max_cand.max(cand.unwrap_or(0));
            for (i, r) in rows.clone().enumerate() {
                positions.push(match (cand, c.positions) {
                    (Some(_), Positions::Compact) => list_len - 1 + i,
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
        self.ensure_buffers(ops, cfg, &c, max_cand, n)?;
        let fp = ops.ids(&[c.n_local as u32])?;
        self.step = Step::Prefill(c, subs, fp, ops.ids(&positions)?);
        Ok(())
    }

    /// Quest: bounds for the new tokens in every step; a decode token with more
    /// whole blocks before its own than the budget holds selects.
    fn begin_quest(
        &mut self,
        ops: &mut E,
        cfg: &ModelConfig,
        c: &QuestConfig,
        n: usize,
        seq_len: usize,
    ) -> Result<()> {
        let start = seq_len - n;
        let top = c.top_blocks();
        let last = (seq_len - 1) / c.block;
        if self.quest.is_none() {
            let mut selected = Vec::with_capacity(cfg.layers);
            for _ in 0..cfg.layers {
                selected.push(ops.ids(&vec![0u32; cfg.kv_heads * top])?);
            }
            self.quest = Some(QuestBuffers {
                bounds: ops.block_bounds(&self.layout, c.block, true)?,
                scores: ops.tensor(cfg.kv_heads, 1024)?,
                cap: 1024,
                selected,
                valid: 0,
                from: 0,
                fingerprint: ops.tensor(1, cfg.heads * cfg.head_dim)?,
            });
        }
        let Some(qb) = self.quest.as_mut() else {
            return Ok(());
        };
        qb.from = qb.valid.min(start);
        qb.valid = seq_len;
        if last <= top || (n > 1 && c.prefill_subchunk == 0) {
            return Ok(());
        }
        if qb.cap < last {
            qb.cap = last.next_power_of_two();
            qb.scores = ops.tensor(cfg.kv_heads, qb.cap)?;
        }
        self.step = if n == 1 {
            Step::Quest
        } else {
            Step::QuestPrefill(c.prefill_subchunk)
        };
        Ok(())
    }

    /// Prepares a verify step over the nodes of a draft tree (`mask` from
    /// [`crate::speculative::DraftTree::mask`]) whose root is the token at logical
    /// index `start`: dense tree attention, or under TokenSelect (when the root
    /// has more than k candidates) the root's selection for every node. The
    /// root's query drives the Selection Cache like a decode query: consecutive
    /// roots are consecutive accepted tokens.
    pub fn begin_tree(
        &mut self,
        ops: &mut E,
        cfg: &ModelConfig,
        mask: &[u32],
        start: usize,
    ) -> Result<()> {
        let tree = ops.ids(mask)?;
        // Draft slots are not the committed tokens: their blocks recompute later.
        if let Some(qb) = self.quest.as_mut() {
            qb.valid = qb.valid.min(start);
        }
        if let Some(pre) = self.pre.as_mut() {
            pre.valid = pre.valid.min(start);
            pre.from = pre.valid;
        }
        let cand = match self.policy {
            AttentionPolicy::TokenSelect(c) => candidates(&c, start).map(|n| (c, n)),
            _ => None,
        };
        let Some((c, cand)) = cand else {
            self.step = Step::Tree(tree);
            return Ok(());
        };
        self.ensure_buffers(ops, cfg, &c, cand, 1)?;
        let n = mask.len() / 5;
        let base = match c.positions {
            Positions::Compact => c.n_init + c.k + c.n_local - 1,
            Positions::Original => start,
        } as u32;
        let positions: Vec<u32> = mask[4 * n..].iter().map(|&d| base + d).collect();
        let fp = ops.ids(&[c.n_local as u32])?;
        self.step = Step::TreeList(c, tree, fp, ops.ids(&positions)?);
        Ok(())
    }

    /// Attention of layer `layer` for raw queries `q` (rotated here) of the tokens at
    /// `start..start + n`, whose keys are already in the cache.
    #[allow(clippy::too_many_arguments)]
    pub fn layer(
        &mut self,
        ops: &mut E,
        cfg: &ModelConfig,
        layer: usize,
        q: &mut E::Tensor,
        positions: &E::Ids,
        kv: &E::Kv,
        table: &PageTable,
        start: usize,
        n: usize,
        rope: &E::Rope,
        out: &mut E::Tensor,
    ) -> Result<()> {
        let seq_len = start + n;
        if let Step::Tree(mask) = &self.step {
            ops.rope(q, cfg.heads, positions, rope)?;
            return ops.attention_tree(q, kv, layer, table, start, mask, None, rope, out);
        }
        if let (Some(tb), AttentionPolicy::Tidal(c), Step::Tidal) =
            (self.tidal.as_mut(), self.policy, &self.step)
        {
            ops.rope(q, cfg.heads, positions, rope)?;
            if layer < c.selection_layer {
                return dense_attention(ops, q, kv, layer, table, start, seq_len, rope, out);
            }
            if layer == c.selection_layer || layer == c.reselection_layer {
                // Full attention here, and the top-budget tokens before the
                // current one per KV head (q . k summed over its query heads).
                let n = seq_len - 1;
                ops.token_scores(q, kv, layer, table, n, rope, &mut tb.scores)?;
                ops.block_top_k(&tb.scores, cfg.kv_heads, n, c.budget, &mut tb.selected)?;
                return dense_attention(ops, q, kv, layer, table, start, seq_len, rope, out);
            }
            let list = KeyList {
                n_init: 0,
                selected: &tb.selected,
                n_selected: c.budget,
                tail_start: seq_len - 1,
                tail_len: 1,
                compact: false,
                block: 1,
            };
            return ops.attention_decode_list(q, kv, layer, table, seq_len, &list, rope, out);
        }
        if let (Some(qb), AttentionPolicy::BlockSparse(c)) = (self.quest.as_mut(), self.policy) {
            ops.rope(q, cfg.heads, positions, rope)?;
            if layer < c.dense_layers {
                return dense_attention(ops, q, kv, layer, table, start, seq_len, rope, out);
            }
            ops.kv_bounds(kv, &mut qb.bounds, layer, table, qb.from..seq_len, rope)?;
            if let Step::QuestPrefill(sub) = self.step {
                return quest_prefill(
                    ops, cfg, c, sub, qb, q, kv, layer, table, start, n, rope, out,
                );
            }
            if !matches!(self.step, Step::Quest) {
                return dense_attention(ops, q, kv, layer, table, start, seq_len, rope, out);
            }
            // The query's own block is always attended; the top blocks come from
            // the whole blocks before it.
            let (top, last) = (c.top_blocks(), (seq_len - 1) / c.block);
            ops.block_group_scores(q, &qb.bounds, layer, table, 0..last, &mut qb.scores)?;
            ops.block_top_k(&qb.scores, cfg.kv_heads, last, top, &mut qb.selected[layer])?;
            let list = KeyList {
                n_init: 0,
                selected: &qb.selected[layer],
                n_selected: top * c.block,
                tail_start: last * c.block,
                tail_len: seq_len - last * c.block,
                compact: false,
                block: c.block,
            };
            return ops.attention_decode_list(q, kv, layer, table, seq_len, &list, rope, out);
        }
        if let Some(pre) = self.pre.as_mut() {
            ops.kv_bounds(kv, &mut pre.bounds, layer, table, pre.from..seq_len, rope)?;
        }
        let mut pre = self.pre.as_mut();
        let Some(ts) = self.ts.as_mut() else {
            ops.rope(q, cfg.heads, positions, rope)?;
            return dense_attention(ops, q, kv, layer, table, start, seq_len, rope, out);
        };
        match &self.step {
            Step::Dense | Step::Tree(_) | Step::Quest | Step::QuestPrefill(_) | Step::Tidal => {
                ops.rope(q, cfg.heads, positions, rope)?;
                dense_attention(ops, q, kv, layer, table, start, seq_len, rope, out)
            }
            Step::Decode(c, fp_pos, q_pos) | Step::TreeList(c, _, fp_pos, q_pos) => {
                // The query at `start` (a decode token, or a draft tree's root
                // in row 0) selects. A decode window ends with the token itself;
                // a tree's holds the n_local - 1 tokens before the root, the
                // tree follows.
                let cand = start + 1 - c.n_init - c.n_local;
                self.uncached_selections += query_select(
                    ops,
                    ts,
                    pre.as_deref_mut(),
                    c,
                    cfg,
                    layer,
                    q,
                    fp_pos,
                    kv,
                    table,
                    cand,
                    rope,
                )?;
                ops.rope(q, cfg.heads, q_pos, rope)?;
                let tree = match &self.step {
                    Step::TreeList(_, mask, ..) => Some(mask),
                    _ => None,
                };
                let list = KeyList {
                    n_init: c.n_init,
                    selected: &ts.selected[layer],
                    n_selected: c.k,
                    tail_start: start + 1 - c.n_local,
                    tail_len: c.n_local - usize::from(tree.is_some()),
                    compact: c.positions == Positions::Compact,
                    block: 0,
                };
                match tree {
                    Some(mask) => {
                        ops.attention_tree(q, kv, layer, table, start, mask, Some(&list), rope, out)
                    }
                    None => {
                        ops.attention_decode_list(q, kv, layer, table, seq_len, &list, rope, out)
                    }
                }
            }
            Step::Prefill(c, subs, fp_pos, q_pos) => {
                let Some(q_raw) = ts.q_raw.as_mut() else {
                    return crate::error::shape_err("tokenselect prefill", "no raw-query buffer");
                };
                ops.copy_rows(q, 0, q_raw, 0, n)?;
                ops.rope(q, cfg.heads, q_pos, rope)?;
                for sub in subs {
                    let a = start + sub.rows.start;
                    let m = sub.rows.len();
                    let list = if sub.sparse {
                        let Some(q_raw) = ts.q_raw.as_ref() else {
                            return crate::error::shape_err(
                                "tokenselect prefill",
                                "no raw-query buffer",
                            );
                        };
                        ops.mean_rows(q_raw, sub.rows.clone(), &mut ts.q_fp)?;
                        ops.rope(&mut ts.q_fp, cfg.heads, fp_pos, rope)?;
                        let cand = a + 1 - c.n_init - c.n_local;
                        let pre = pre.as_deref_mut();
                        select(ops, ts, pre, c, cfg.heads, kv, layer, table, cand, false)?;
                        self.prefill_selections += 1;
                        KeyList {
                            n_init: c.n_init,
                            selected: &ts.selected[layer],
                            n_selected: c.k,
                            tail_start: a + 1 - c.n_local,
                            tail_len: c.n_local - 1 + m,
                            compact: c.positions == Positions::Compact,
                            block: 0,
                        }
                    } else {
                        // Within the budget: every earlier token, at true positions.
                        KeyList {
                            n_init: 0,
                            selected: &ts.selected[layer],
                            n_selected: 0,
                            tail_start: 0,
                            tail_len: a + m,
                            compact: false,
                            block: 0,
                        }
                    };
                    ops.attention_prefill_list(
                        q,
                        kv,
                        layer,
                        table,
                        sub.rows.clone(),
                        a,
                        &list,
                        rope,
                        out,
                    )?;
                }
                Ok(())
            }
        }
    }

    /// Selections run and Selection Cache hits so far (reads the device counters).
    pub fn stats(&mut self, ops: &mut E) -> Result<SelectionStats> {
        let (hits, misses) = match &self.ts {
            Some(ts) => ops.ts_gate_counts(&ts.gate)?,
            None => (0, 0),
        };
        Ok(SelectionStats {
            selections: misses + self.uncached_selections,
            cache_hits: hits,
            prefill_selections: self.prefill_selections,
        })
    }

    /// The selection of `layer` from the last sparse step (for tests and tools).
    /// (Quest: the chosen block ids, `[kv_heads, top]`; Tidal: the token ids
    /// in use, `[kv_heads, budget]`, for layers past the selection layer.)
    pub fn selected(&mut self, ops: &mut E, layer: usize) -> Result<Option<Vec<u32>>> {
        let ids = match (&self.ts, &self.quest, &self.tidal, self.policy) {
            (Some(ts), ..) => ts.selected.get(layer),
            (_, Some(qb), ..) => qb.selected.get(layer),
            (.., Some(tb), AttentionPolicy::Tidal(c)) if layer > c.selection_layer => {
                Some(&tb.selected)
            }
            _ => None,
        };
        ids.map(|ids| ops.download_ids(ids)).transpose()
    }
}

/// Selection for one query (decode token, or a draft tree's root): row 0 of the
/// raw queries `q` is the fingerprint, rotated at `fp_pos`; the Selection Cache
/// decides on the device whether the selection ops run. Returns the number of
/// selections run without the cache (0 or 1).
#[allow(clippy::too_many_arguments)]
fn query_select<E: Ops>(
    ops: &mut E,
    ts: &mut TsBuffers<E>,
    pre: Option<&mut PrefilterBuffers<E>>,
    c: &TokenSelectConfig,
    cfg: &ModelConfig,
    layer: usize,
    q: &E::Tensor,
    fp_pos: &E::Ids,
    kv: &E::Kv,
    table: &PageTable,
    cand: usize,
    rope: &E::Rope,
) -> Result<u64> {
    ops.copy_rows(q, 0, &mut ts.q_fp, 0, 1)?;
    ops.rope(&mut ts.q_fp, cfg.heads, fp_pos, rope)?;
    // Selection Cache: decided on the device; on a hit the selection ops run zero
    // workgroups and the layer keeps its previous selection.
    let gated = c.cache_threshold <= 1.0;
    if gated {
        let plan = SelectPlan {
            layer,
            q_heads: cfg.heads,
            begin: c.n_init,
            n: cand,
            k: c.k,
            prefilter: prefilter_plan(c, pre.is_some(), cand),
        };
        ops.ts_cache_check(
            &ts.q_fp,
            &mut ts.cached[layer],
            c.cache_threshold,
            &plan,
            kv,
            table,
            &mut ts.gate,
        )?;
    }
    select(ops, ts, pre, c, cfg.heads, kv, layer, table, cand, gated)?;
    Ok(u64::from(!gated))
}

/// The block stage of a hierarchical selection over `cand` candidates from
/// `n_init`, when it has more blocks than it keeps.
fn prefilter_plan(c: &TokenSelectConfig, on: bool, cand: usize) -> Option<PrefilterPlan> {
    let block = c.prefilter_block;
    let first_block = c.n_init / block;
    let n_blocks = (c.n_init + cand).div_ceil(block) - first_block;
    (on && c.prefilter_blocks > 0 && n_blocks > c.prefilter_blocks).then_some(PrefilterPlan {
        block,
        first_block,
        n_blocks,
        top: c.prefilter_blocks,
    })
}

/// Scoring, soft vote and top-k over `cand` candidates from `n_init` into the
/// layer's selection (gated by the Selection Cache decision when `gated`).
/// Hierarchical: first the best blocks by their bounds' soft vote, then the
/// same over only those blocks' tokens.
#[allow(clippy::too_many_arguments)]
fn select<E: Ops>(
    ops: &mut E,
    ts: &mut TsBuffers<E>,
    pre: Option<&mut PrefilterBuffers<E>>,
    c: &TokenSelectConfig,
    heads: usize,
    kv: &E::Kv,
    layer: usize,
    table: &PageTable,
    cand: usize,
    gated: bool,
) -> Result<()> {
    let gate = gated.then_some(&ts.gate);
    let pre_on = pre.is_some();
    let pf = match (pre, prefilter_plan(c, pre_on, cand)) {
        (Some(pre), Some(plan)) => {
            let blocks = plan.first_block..plan.first_block + plan.n_blocks;
            ops.block_scores(
                &ts.q_fp,
                &pre.bounds,
                layer,
                table,
                blocks,
                c.prefilter_spread,
                &mut ts.scores,
                gate,
            )?;
            ops.ts_vote(&ts.scores, heads, plan.n_blocks, &mut ts.votes, gate)?;
            ops.ts_top_k(
                &ts.votes,
                plan.n_blocks,
                plan.top,
                plan.first_block,
                &mut pre.blocks,
                gate,
                None,
            )?;
            let pre: &PrefilterBuffers<E> = pre;
            Some(Prefilter {
                blocks: &pre.blocks,
                count: plan.top,
                block: plan.block,
            })
        }
        _ => None,
    };
    let slots = pf.as_ref().map_or(cand, |pf| pf.slots());
    ops.ts_score(
        &ts.q_fp,
        kv,
        layer,
        table,
        c.n_init,
        cand,
        c.gqa_map,
        &mut ts.scores,
        gate,
        pf.as_ref(),
    )?;
    ops.ts_vote(&ts.scores, heads, slots, &mut ts.votes, gate)?;
    ops.ts_top_k(
        &ts.votes,
        slots,
        c.k,
        c.n_init,
        &mut ts.selected[layer],
        gate,
        pf.as_ref(),
    )
}

/// Quest block-sparse prefill of the chunk's queries `0..n` (rotated; row i is
/// the token at `start + i`): each sub-chunk of `sub` queries attends to a
/// window (its own blocks and the `sub` tokens before them) plus the budget /
/// block - 1 best earlier blocks of each KV head, scored by their bounds
/// against the sub-chunk's mean query (on the reference executor at 8K the
/// mean kept one passkey of two where the largest bound over the rows, tried
/// too, kept none). A sub-chunk with no more earlier blocks than that attends
/// to all.
#[allow(clippy::too_many_arguments)]
fn quest_prefill<E: Ops>(
    ops: &mut E,
    cfg: &ModelConfig,
    c: QuestConfig,
    sub: usize,
    qb: &mut QuestBuffers<E>,
    q: &E::Tensor,
    kv: &E::Kv,
    layer: usize,
    table: &PageTable,
    start: usize,
    n: usize,
    rope: &E::Rope,
    out: &mut E::Tensor,
) -> Result<()> {
    let top = c.top_blocks();
    for first in (0..n).step_by(sub) {
        let rows = first..(first + sub).min(n);
        let (q_start, end) = (start + first, start + rows.end);
        // The window: the sub-chunk's own blocks and the `sub` tokens before it
        // (a decode query's own block plays that part), so every query sees
        // its recent context. The top blocks come from the whole blocks before.
        let before = q_start.saturating_sub(sub) / c.block;
        let (n_selected, tail_start) = if before <= top {
            (0, 0)
        } else {
            ops.mean_rows(q, rows.clone(), &mut qb.fingerprint)?;
            let (fp, scores) = (&qb.fingerprint, &mut qb.scores);
            ops.block_group_scores(fp, &qb.bounds, layer, table, 0..before, scores)?;
            ops.block_top_k(scores, cfg.kv_heads, before, top, &mut qb.selected[layer])?;
            (top * c.block, before * c.block)
        };
        let list = KeyList {
            n_init: 0,
            selected: &qb.selected[layer],
            n_selected,
            tail_start,
            tail_len: end - tail_start,
            compact: false,
            block: if n_selected > 0 { c.block } else { 0 },
        };
        ops.attention_prefill_list(q, kv, layer, table, rows, q_start, &list, rope, out)?;
    }
    Ok(())
}
