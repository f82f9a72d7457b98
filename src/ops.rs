//! The ops interface the model and the attention policies are written against.
//!
//! Two executors implement it: [`crate::kernels::GpuExecutor`] (WGSL kernels through
//! wgpu, the product) and [`crate::reference::RefExecutor`] (CPU f32, the oracle and
//! the long-context harness). Both run the same shape checks (the `check_*`
//! functions here), so a caller's mistake is the same typed error on either.
//!
//! Conventions: activations are f32 matrices `[rows, cols]`; weights are f16 in
//! Hugging Face `[out, in]` layout; heads are laid out `[rows, heads * head_dim]`;
//! keys go into the KV cache before RoPE and are rotated at attention time.
//!
//! ```
//! use kvsieve::ops::Ops;
//! use kvsieve::reference::RefExecutor;
//! use half::f16;
//! let mut ops = RefExecutor::new();
//! let x = ops.upload(&[1.0, 2.0, 3.0, 4.0], 1, 4).unwrap();
//! let w = ops.weight(&[f16::ONE; 8], 2, 4).unwrap();
//! let mut y = ops.tensor(1, 2).unwrap();
//! ops.matmul(&x, &w, &mut y).unwrap();
//! assert_eq!(ops.download(&y).unwrap(), vec![10.0, 10.0]);
//! ```

use crate::error::{shape_err, Error, Result};
use crate::kv::{KvLayout, PageTable};
use half::f16;
use std::ops::Range;

/// Llama 3 RoPE frequency scaling (`rope_scaling` with `rope_type: llama3`).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Llama3Scaling {
    /// `factor`
    pub factor: f64,
    /// `low_freq_factor`
    pub low_freq_factor: f64,
    /// `high_freq_factor`
    pub high_freq_factor: f64,
    /// `original_max_position_embeddings`
    pub original_max_position_embeddings: f64,
}

/// Rotary embedding parameters.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RopeConfig {
    /// Head dimension (even).
    pub head_dim: usize,
    /// `rope_theta`.
    pub theta: f64,
    /// Optional llama3 scaling.
    pub scaling: Option<Llama3Scaling>,
    /// Positions the table covers.
    pub max_positions: usize,
}

impl RopeConfig {
    /// Inverse frequencies as Hugging Face computes them (f32), llama3 scaling applied.
    pub fn inv_freq(&self) -> Vec<f32> {
        let d = self.head_dim;
        (0..d / 2)
            .map(|i| {
                let base = (1.0f64 / self.theta.powf((2 * i) as f64 / d as f64)) as f32;
                match self.scaling {
                    None => base,
                    Some(s) => {
                        let inv = base as f64;
                        let low_wl = s.original_max_position_embeddings / s.low_freq_factor;
                        let high_wl = s.original_max_position_embeddings / s.high_freq_factor;
                        let wl = 2.0 * std::f64::consts::PI / inv;
                        let v = if wl < high_wl {
                            inv
                        } else if wl > low_wl {
                            inv / s.factor
                        } else {
                            let smooth = (s.original_max_position_embeddings / wl
                                - s.low_freq_factor)
                                / (s.high_freq_factor - s.low_freq_factor);
                            (1.0 - smooth) * inv / s.factor + smooth * inv
                        };
                        v as f32
                    }
                }
            })
            .collect()
    }

    /// The `(cos, sin)` table `[max_positions, head_dim / 2]`: angle = pos * inv_freq
    /// in f32 like Hugging Face, cos/sin evaluated in f64.
    pub fn table(&self) -> Result<Vec<[f32; 2]>> {
        if self.head_dim == 0 || !self.head_dim.is_multiple_of(2) {
            return Err(Error::InvalidOption(format!(
                "rope head_dim {} must be even",
                self.head_dim
            )));
        }
        if !(self.theta > 0.0) {
            return Err(Error::InvalidOption(format!(
                "rope_theta {} must be positive",
                self.theta
            )));
        }
        if self.max_positions == 0 {
            return Err(Error::InvalidOption(
                "rope table needs max_positions > 0".into(),
            ));
        }
        let inv = self.inv_freq();
        let mut t = Vec::with_capacity(self.max_positions * inv.len());
        for p in 0..self.max_positions {
            for &f in &inv {
                let a = (p as f32 * f) as f64;
                t.push([a.cos() as f32, a.sin() as f32]);
            }
        }
        Ok(t)
    }
}

/// The keys a sparse decode step attends to, by rank: `[0, n_init)`, then
/// `selected[0..n_selected)` (ascending logical indices), then `tail_len` tokens from
/// `tail_start`. With `compact` positions a key's RoPE position is its rank.
pub struct KeyList<'a, I> {
    /// Attention sinks at the start.
    pub n_init: usize,
    /// Selected logical indices (device buffer), ascending.
    pub selected: &'a I,
    /// How many of `selected` are used.
    pub n_selected: usize,
    /// First token of the local window.
    pub tail_start: usize,
    /// Tokens in the local window.
    pub tail_len: usize,
    /// Rank positions (TokenSelect's compact mode) instead of logical ones.
    pub compact: bool,
    /// What `selected` holds.
    pub selection: Selection,
}

/// What a [`KeyList`]'s `selected` buffer holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Selection {
    /// Token indices shared by every head (TokenSelect).
    Shared,
    /// `[kv_heads, n_selected]` token indices, a list per KV head (Tidal).
    KvHeadTokens,
    /// `[kv_heads, n_selected / B]` block indices of B tokens per KV head
    /// (Quest): selected rank i of KV head g is token
    /// `selected[g * n_selected / B + i / B] * B + i % B`.
    KvHeadBlocks(usize),
}

impl Selection {
    /// The kernels' word for it: 0 shared, else tokens per block of a KV
    /// head's list (1 for tokens).
    pub fn block(self) -> usize {
        match self {
            Selection::Shared => 0,
            Selection::KvHeadTokens => 1,
            Selection::KvHeadBlocks(b) => b,
        }
    }
}

impl<I> KeyList<'_, I> {
    /// Keys in the list.
    pub fn len(&self) -> usize {
        self.n_init + self.n_selected + self.tail_len
    }

    /// True when the list is empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The same list with the selection held in `selected` (another executor's copy).
    pub fn with_selected<'b, J>(&self, selected: &'b J) -> KeyList<'b, J> {
        KeyList {
            n_init: self.n_init,
            selected,
            n_selected: self.n_selected,
            tail_start: self.tail_start,
            tail_len: self.tail_len,
            compact: self.compact,
            selection: self.selection,
        }
    }
}

/// Which KV head a query head's TokenSelect scores use.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum GqaMap {
    /// Query head h reads KV head h / (H / H_kv): the model's own grouping.
    #[default]
    Grouped,
    /// Query head h reads KV head h mod H_kv (the TokenSelect paper's code).
    Modulo,
}

impl GqaMap {
    /// The KV head of query head `h` of `q_heads` over `kv_heads`.
    pub fn kv_head(self, h: usize, q_heads: usize, kv_heads: usize) -> usize {
        match self {
            GqaMap::Grouped => h / (q_heads / kv_heads),
            GqaMap::Modulo => h % kv_heads,
        }
    }
}

impl std::str::FromStr for GqaMap {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "grouped" | "standard" => Ok(Self::Grouped),
            "modulo" => Ok(Self::Modulo),
            o => Err(Error::InvalidOption(format!(
                "GQA map {o:?}: expected grouped or modulo"
            ))),
        }
    }
}

/// The selection a TokenSelect layer-step runs (what the gated ops will do).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SelectPlan {
    /// Layer.
    pub layer: usize,
    /// Query heads.
    pub q_heads: usize,
    /// First candidate token.
    pub begin: usize,
    /// Candidates.
    pub n: usize,
    /// Tokens selected.
    pub k: usize,
    /// Hierarchical selection: the block stage that picks the candidates.
    pub prefilter: Option<PrefilterPlan>,
}

/// The block stage of a hierarchical TokenSelect selection: block scores and
/// soft vote over blocks `first_block..first_block + n_blocks` (those overlapping
/// the candidates), the `top` best of them, then the token stage over their
/// `top * block` tokens.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PrefilterPlan {
    /// Tokens per block.
    pub block: usize,
    /// First block scored.
    pub first_block: usize,
    /// Blocks scored.
    pub n_blocks: usize,
    /// Blocks kept.
    pub top: usize,
}

/// Candidates of a hierarchical TokenSelect selection: the tokens of `count`
/// blocks whose ids (ascending) are in `blocks`, `block` tokens each. Slot j
/// of the scores and votes is token `blocks[j / block] * block + j % block`;
/// a slot outside the candidate range scores [`NO_SCORE`] and votes 0.
pub struct Prefilter<'a, I> {
    /// Block ids, ascending.
    pub blocks: &'a I,
    /// How many of `blocks` are used.
    pub count: usize,
    /// Tokens per block.
    pub block: usize,
}

impl<I> Prefilter<'_, I> {
    /// Score slots: `count * block`.
    pub fn slots(&self) -> usize {
        self.count * self.block
    }
}

/// Most nodes a draft tree may hold (the ancestor sets are 4 u32 words).
pub const MAX_NODES: usize = 128;

/// Whether node `j` of a draft tree is node `i` or one of its ancestors, read
/// from the tree mask [`Ops::attention_tree`] takes (4 ancestor words per node,
/// then the depths).
pub fn tree_sees(mask: &[u32], i: usize, j: usize) -> bool {
    (mask[4 * i + j / 32] >> (j % 32)) & 1 == 1
}

/// The score of a hierarchical selection's slot outside the candidate range.
pub const NO_SCORE: f32 = -3.0e38;

/// The operations the model and policies use; see the module docs for conventions.
#[allow(clippy::too_many_arguments)]
pub trait Ops: Send + 'static {
    /// f32 matrix `[rows, cols]` on the executor.
    type Tensor: Send;
    /// u32 vector (token ids, positions).
    type Ids: Send;
    /// f16 matrix `[rows, cols]` (Hugging Face `[out, in]`), possibly split in chunks.
    type Weight: Send;
    /// RoPE cos/sin table.
    type Rope: Send;
    /// KV cache storage for a [`KvLayout`].
    type Kv: Send;
    /// Selection Cache decision state: whether the selection kernels run this
    /// layer-step, decided on the device, plus hit/miss counters.
    type Gate: Send;
    /// Block bounds of a KV cache: per layer, page, KV head and block, the
    /// per-channel max and min of the keys, rotated at their positions (Quest)
    /// or not (hierarchical TokenSelect, whose scores are rotation-free).
    type Bounds: Send;

    /// Executor name (and adapter for the GPU).
    fn name(&self) -> String;
    /// Rows and columns of a tensor.
    fn dims(t: &Self::Tensor) -> (usize, usize);
    /// Rows of a tensor.
    fn rows(t: &Self::Tensor) -> usize {
        Self::dims(t).0
    }

    /// A zeroed tensor.
    fn tensor(&mut self, rows: usize, cols: usize) -> Result<Self::Tensor>;
    /// A tensor holding `data` (row-major).
    fn upload(&mut self, data: &[f32], rows: usize, cols: usize) -> Result<Self::Tensor>;
    /// Reads a tensor back (finishes pending work first).
    fn download(&mut self, t: &Self::Tensor) -> Result<Vec<f32>>;
    /// An id vector holding `data`.
    fn ids(&mut self, data: &[u32]) -> Result<Self::Ids>;
    /// Reads ids back (finishes pending work first).
    fn download_ids(&mut self, ids: &Self::Ids) -> Result<Vec<u32>>;
    /// A weight matrix from f16 data `[rows, cols]`.
    fn weight(&mut self, data: &[f16], rows: usize, cols: usize) -> Result<Self::Weight>;
    /// A RoPE table.
    fn rope_table(&mut self, cfg: &RopeConfig) -> Result<Self::Rope>;
    /// KV storage for `layout`.
    fn kv_cache(&mut self, layout: &KvLayout) -> Result<Self::Kv>;
    /// Block-bound storage for caches of `layout`, blocks of `block` tokens (a
    /// divisor of the page size, at least 4), of keys rotated at their positions
    /// when `rotated` (Quest) or unrotated (hierarchical TokenSelect).
    fn block_bounds(
        &mut self,
        layout: &KvLayout,
        block: usize,
        rotated: bool,
    ) -> Result<Self::Bounds>;
    /// Finishes all recorded work (a no-op on the CPU).
    fn flush(&mut self) -> Result<()>;
    /// Turns per-kernel timing on or off (GPU timestamps; a no-op where unsupported).
    fn set_profiling(&mut self, _on: bool) {}
    /// Per-kernel totals since profiling began: (kernel, dispatches, nanoseconds).
    fn take_profile(&mut self) -> Vec<(String, u64, f64)> {
        Vec::new()
    }

    /// `y = x W^T`: x `[m, k]`, W `[n, k]`, y `[m, n]`.
    fn matmul(&mut self, x: &Self::Tensor, w: &Self::Weight, y: &mut Self::Tensor) -> Result<()>;
    /// RMSNorm of each row with weight `w` `[1, cols]`.
    fn rms_norm(
        &mut self,
        x: &Self::Tensor,
        w: &Self::Weight,
        eps: f32,
        y: &mut Self::Tensor,
    ) -> Result<()>;
    /// Rotates `x` `[rows, heads * head_dim]` in place; row r at `positions[r]`.
    fn rope(
        &mut self,
        x: &mut Self::Tensor,
        heads: usize,
        positions: &Self::Ids,
        rope: &Self::Rope,
    ) -> Result<()>;
    /// `gate = silu(gate) * up`.
    fn swiglu(&mut self, gate: &mut Self::Tensor, up: &Self::Tensor) -> Result<()>;
    /// `acc += x`.
    fn add(&mut self, acc: &mut Self::Tensor, x: &Self::Tensor) -> Result<()>;
    /// `out[t] = table[ids[t]]`.
    fn embed(
        &mut self,
        ids: &Self::Ids,
        table: &Self::Weight,
        out: &mut Self::Tensor,
    ) -> Result<()>;
    /// `x[r, :] += bias` for every row; `bias` is `[1, cols]`.
    fn add_bias(&mut self, x: &mut Self::Tensor, bias: &Self::Weight) -> Result<()>;
    /// Copies `rows` rows of `src` starting at `src_row` into `dst` at `dst_row`.
    fn copy_rows(
        &mut self,
        src: &Self::Tensor,
        src_row: usize,
        dst: &mut Self::Tensor,
        dst_row: usize,
        rows: usize,
    ) -> Result<()>;
    /// Repetition penalty on row 0 of `logits` for the given distinct token ids.
    fn penalize(&mut self, logits: &mut Self::Tensor, ids: &[u32], penalty: f32) -> Result<()>;
    /// The `k` (1..=64) largest values of row 0 with their ids, descending (ties to the
    /// lower id). Only these are read back.
    fn top_k(&mut self, logits: &Self::Tensor, k: usize) -> Result<Vec<(u32, f32)>>;
    /// A Selection Cache gate (counters at zero).
    fn ts_gate(&mut self) -> Result<Self::Gate>;
    /// Selection Cache check: compares `fp` `[1, len]` with `cached` `[1, len + 1]`
    /// (last value: 1 when valid). Hit (cosine >= `threshold`): the gated selection ops
    /// of this layer-step do nothing, the previous selection stays. Miss: `cached`
    /// takes `fp` and the gated ops run. `plan` is the selection they will run.
    fn ts_cache_check(
        &mut self,
        fp: &Self::Tensor,
        cached: &mut Self::Tensor,
        threshold: f32,
        plan: &SelectPlan,
        kv: &Self::Kv,
        table: &PageTable,
        gate: &mut Self::Gate,
    ) -> Result<()>;
    /// (hits, misses) counted by the gate (reads back 8 bytes on the GPU).
    fn ts_gate_counts(&mut self, gate: &Self::Gate) -> Result<(u64, u64)>;
    /// TokenSelect scoring: `scores[h * n + j] = q_h . K[begin + j, g(h)]` (g from
    /// `gqa`) with the unrotated cached keys, unscaled (`q` `[1, q_heads * head_dim]` is rotated by the
    /// caller). `scores` needs at least `q_heads * n` elements. With `prefilter`
    /// the slots are its blocks' tokens (`q_heads * prefilter.slots()` scores),
    /// those outside `begin..begin + n` scoring [`NO_SCORE`].
    fn ts_score(
        &mut self,
        q: &Self::Tensor,
        kv: &Self::Kv,
        layer: usize,
        table: &PageTable,
        begin: usize,
        n: usize,
        gqa: GqaMap,
        scores: &mut Self::Tensor,
        gate: Option<&Self::Gate>,
        prefilter: Option<&Prefilter<'_, Self::Ids>>,
    ) -> Result<()>;
    /// Soft vote: `votes[j] = sum_h softmax_j(scores[h, :n])`, at least 1e-30,
    /// and 0 for a slot scoring [`NO_SCORE`]. (The selection ops do nothing when
    /// `gate` says the Selection Cache hit.)
    fn ts_vote(
        &mut self,
        scores: &Self::Tensor,
        q_heads: usize,
        n: usize,
        votes: &mut Self::Tensor,
        gate: Option<&Self::Gate>,
    ) -> Result<()>;
    /// The `k` largest of `votes[..n]` (ties to the lower index) as `begin + j`,
    /// or with `prefilter` as slot j's token, ascending, into `out[..k]`.
    fn ts_top_k(
        &mut self,
        votes: &Self::Tensor,
        n: usize,
        k: usize,
        begin: usize,
        out: &mut Self::Ids,
        gate: Option<&Self::Gate>,
        prefilter: Option<&Prefilter<'_, Self::Ids>>,
    ) -> Result<()>;
    /// Attention of one query (rotated by the caller) over the keys of `list`;
    /// `seq_len` is the sequence's length (for page lookups).
    fn attention_decode_list(
        &mut self,
        q: &Self::Tensor,
        kv: &Self::Kv,
        layer: usize,
        table: &PageTable,
        seq_len: usize,
        list: &KeyList<'_, Self::Ids>,
        rope: &Self::Rope,
        out: &mut Self::Tensor,
    ) -> Result<()>;
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
        kv: &Self::Kv,
        layer: usize,
        table: &PageTable,
        rows: Range<usize>,
        q_start: usize,
        list: &KeyList<'_, Self::Ids>,
        rope: &Self::Rope,
        out: &mut Self::Tensor,
    ) -> Result<()>;
    /// Tree attention for speculative verification: the rows of `q` are the nodes of
    /// a draft tree (rotated by the caller), node j's keys and values at slot
    /// `prefix_len + j`. Node i sees the prefix and its ancestors, itself included.
    /// `tree` holds [`crate::speculative::DraftTree::mask`]. The prefix is the
    /// first `prefix_len` tokens, or with `list` its ranks (TokenSelect: sinks,
    /// the root's selection and the window up to `prefix_len`). Node j's key is
    /// rotated at base + depth(j), base being `prefix_len` or, for a compact list,
    /// its length.
    #[allow(clippy::too_many_arguments)]
    fn attention_tree(
        &mut self,
        q: &Self::Tensor,
        kv: &Self::Kv,
        layer: usize,
        table: &PageTable,
        prefix_len: usize,
        tree: &Self::Ids,
        list: Option<&KeyList<'_, Self::Ids>>,
        rope: &Self::Rope,
        out: &mut Self::Tensor,
    ) -> Result<()>;
    /// Fills a draft tree's tokens into `out[..n]` from its plan (`n` triples
    /// parent, rank, token; [`crate::speculative::DraftTree::plan`]): a node with a
    /// rank takes `adj[token of its parent * 8 + rank]` (Token Recycling).
    fn spec_draft(
        &mut self,
        adj: &Self::Ids,
        plan: &Self::Ids,
        n: usize,
        out: &mut Self::Ids,
    ) -> Result<()>;
    /// Token Recycling update: for each row i of `logits` (`[n, vocab]`),
    /// `adj[tokens[i] * 8..][..8]` = its 8 best token ids (value descending, ties to
    /// the lower id); the last of several rows with one token wins.
    fn spec_adj_update(
        &mut self,
        adj: &mut Self::Ids,
        logits: &Self::Tensor,
        tokens: &Self::Ids,
    ) -> Result<()>;
    /// Acceptance of a verify step (docs/ALGORITHMS.md section 4): walks the tree given
    /// by `links` ([`crate::speculative::DraftTree::links`]) and the node `tokens`
    /// with the target distribution of each node's `logits` row (`[n, vocab]`),
    /// accepting child x with probability p(x) / (mass left) and sampling the bonus
    /// from the residual; greedy when `params.top_k` is 1. Writes `trials`
    /// independent results of [`crate::sampling::accept_stride`]`(depth)` words
    /// each (`[len, bonus, path nodes.., path tokens..]`), `depth` being the
    /// longest path. Only these words are read back.
    #[allow(clippy::too_many_arguments)]
    fn spec_accept(
        &mut self,
        logits: &Self::Tensor,
        tokens: &Self::Ids,
        links: &Self::Ids,
        params: &crate::sampling::AcceptParams,
        depth: usize,
        trials: usize,
        out: &mut Self::Ids,
    ) -> Result<()>;
    /// Recomputes the bounds of `layer` for every block overlapping `tokens` (keys
    /// already in the cache; a block's keys at `tokens.end` and beyond are not
    /// part of it yet), keys rotated at their logical positions if the bounds
    /// are rotated ones.
    fn kv_bounds(
        &mut self,
        kv: &Self::Kv,
        bounds: &mut Self::Bounds,
        layer: usize,
        table: &PageTable,
        tokens: Range<usize>,
        rope: &Self::Rope,
    ) -> Result<()>;
    /// Block scores: `out[h * n + b - blocks.start]` (`n` = `blocks.len()`,
    /// packed like [`Ops::ts_score`]'s) = q . c + spread |q| . r for query head
    /// h (`q` `[1, q_heads * D]`, rotated as the bounds' keys need) against its
    /// KV head's bounds of logical block b, for `b` in `blocks`, with c = (M + m)
    /// / 2 and r = (M - m) / 2 the centre and half-range of the block's keys per
    /// channel. `spread` 1 gives sum_i max(q_i M_i, q_i m_i), an upper bound of
    /// q . k over the block; a smaller `spread` (in 0..=1) ranks blocks by their
    /// centre plus part of their spread. Gated by the Selection Cache like the
    /// TokenSelect ops (hierarchical selection).
    #[allow(clippy::too_many_arguments)]
    fn block_scores(
        &mut self,
        q: &Self::Tensor,
        bounds: &Self::Bounds,
        layer: usize,
        table: &PageTable,
        blocks: Range<usize>,
        spread: f32,
        out: &mut Self::Tensor,
        gate: Option<&Self::Gate>,
    ) -> Result<()>;
    /// Quest's block scores summed over each KV head's query heads, in one pass:
    /// `out[g * n + b - blocks.start]` = sum over g's query heads h of
    /// [`Ops::block_scores`]'s `h` row, computed as sum_i (P_i M_i + N_i m_i)
    /// with P (N) the sum of the group's positive (negative) query parts (equal,
    /// since max(q M, q m) = max(q, 0) M + min(q, 0) m). A block's bounds are read
    /// once per KV head instead of once per query head; `out` has a row per KV
    /// head, the form [`Ops::block_top_k`] takes with `kv_heads` rows.
    fn block_group_scores(
        &mut self,
        q: &Self::Tensor,
        bounds: &Self::Bounds,
        layer: usize,
        table: &PageTable,
        blocks: Range<usize>,
        out: &mut Self::Tensor,
    ) -> Result<()>;
    /// TidalDecode scores: `out[g * n + t]` = sum over KV head g's query heads h
    /// of q_h . k_t for tokens `0..n` of `layer`, keys rotated at their true
    /// positions (`q` `[1, q_heads * D]`, rotated); computed as (sum_h q_h) . k_t,
    /// one pass over the keys per KV head. `out` has a row per KV head, the form
    /// [`Ops::block_top_k`] takes with `kv_heads` rows.
    fn token_scores(
        &mut self,
        q: &Self::Tensor,
        kv: &Self::Kv,
        layer: usize,
        table: &PageTable,
        n: usize,
        rope: &Self::Rope,
        out: &mut Self::Tensor,
    ) -> Result<()>;
    /// Quest block choice per KV head: the `k` blocks of `0..n` with the largest
    /// sum over the head's query heads of `scores[h * n + b]` (rows: query heads),
    /// ties to the lower index, as ascending block ids into `out[g * k..][..k]`.
    fn block_top_k(
        &mut self,
        scores: &Self::Tensor,
        kv_heads: usize,
        n: usize,
        k: usize,
        out: &mut Self::Ids,
    ) -> Result<()>;
    /// `out[0, :]` = mean of rows `rows` of `x` (TokenSelect's prefill fingerprint).
    fn mean_rows(
        &mut self,
        x: &Self::Tensor,
        rows: Range<usize>,
        out: &mut Self::Tensor,
    ) -> Result<()>;
    /// Row-wise argmax (ties to the lowest index) into `out[0..rows]`.
    fn argmax(&mut self, x: &Self::Tensor, out: &mut Self::Ids) -> Result<()>;
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
    ) -> Result<()>;
    /// Moves the keys and values of every layer from logical index `src` to `dst`
    /// for each `(src, dst)` in order (committing an accepted draft path).
    fn kv_move(
        &mut self,
        kv: &mut Self::Kv,
        table: &PageTable,
        moves: &[(usize, usize)],
    ) -> Result<()>;
    /// Causal attention for a chunk of queries `q` `[n, q_heads * head_dim]` (already
    /// rotated) at positions `q_start..q_start + n` over the first `kv_len` cached
    /// tokens; keys are rotated at their own positions. Flash attention.
    fn attention_prefill(
        &mut self,
        q: &Self::Tensor,
        kv: &Self::Kv,
        layer: usize,
        table: &PageTable,
        q_start: usize,
        kv_len: usize,
        rope: &Self::Rope,
        out: &mut Self::Tensor,
    ) -> Result<()>;
    /// Attention of one query over the first `kv_len` cached tokens. Split-KV flash decoding.
    fn attention_decode(
        &mut self,
        q: &Self::Tensor,
        kv: &Self::Kv,
        layer: usize,
        table: &PageTable,
        kv_len: usize,
        rope: &Self::Rope,
        out: &mut Self::Tensor,
    ) -> Result<()>;
}

/// Shape checks shared by both executors.
pub mod check {
    use super::*;

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

    /// A weight of `len` f16 values as `[rows, cols]`; rows are packed in pairs
    /// of f16 on the GPU, so `cols` must be even.
    pub fn weight(len: usize, rows: usize, cols: usize) -> Result<()> {
        if len != rows * cols {
            return shape_err("weight", format!("{len} values for ({rows}, {cols})"));
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
    pub fn rms_norm(
        x: (usize, usize),
        w: (usize, usize),
        y: (usize, usize),
        eps: f32,
    ) -> Result<()> {
        same("rms_norm", x, y)?;
        if w != (1, x.1) {
            return shape_err(
                "rms_norm",
                format!("weight is {w:?}, expected (1, {})", x.1),
            );
        }
        if !(eps >= 0.0) {
            return Err(Error::InvalidOption(format!(
                "rms_norm eps {eps} must be >= 0"
            )));
        }
        Ok(())
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
}
