//! Attention policies and the per-session state they keep.
//!
//! Each policy lives in its own file: its public config, the config's checks and
//! a [`PolicyState`] that runs on the [`Ops`] interface. [`Attention`] holds the
//! state of the configured policy (built by one `match` in [`Attention::new`]);
//! the model calls [`Attention::begin`] once per forward and
//! [`Attention::layer`] with each layer's raw (unrotated) queries, which the
//! policy rotates before it attends.
//!
//! A new policy is one file here (config, checks, state) and one arm in each of
//! the two matches below ([`AttentionPolicy::validate`] and [`Attention::new`]).

pub mod dense;
pub mod prefilter;
pub mod quest;
pub mod selection_cache;
pub mod tidal;
pub mod tokenselect;

pub use crate::kv::{KvLayout, PageAllocator, PageTable};
pub use crate::ops::GqaMap;
pub use dense::dense_attention;
pub use quest::QuestConfig;
pub use tidal::TidalConfig;
pub use tokenselect::{Positions, TokenSelectConfig};

use crate::error::Result;
use crate::ops::{KvView, Ops};

/// Which attention runs.
///
/// ```
/// use kvsieve::{AttentionPolicy, QuestConfig};
/// let p = AttentionPolicy::Quest(QuestConfig { budget: 1024, ..Default::default() });
/// assert!(p.validate().is_ok());
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Default)]
pub enum AttentionPolicy {
    /// Full causal attention (the reference).
    #[default]
    Dense,
    /// TokenSelect: per-head token-level selection with soft voting, in decode
    /// steps and in prefill sub-chunks, with the Selection Cache and the
    /// optional hierarchical prefilter.
    TokenSelect(TokenSelectConfig),
    /// Quest: per-block key bounds, the best blocks of each KV head by their
    /// upper-bound score, block-sparse decode (and optionally prefill).
    Quest(QuestConfig),
    /// TidalDecode: dense attention plus a top-budget token choice per KV head in
    /// the selection layers, the chosen positions reused by the layers after them
    /// (decode; prefill stays dense).
    Tidal(TidalConfig),
}

impl AttentionPolicy {
    /// Checks the values, naming the bad one.
    ///
    /// ```
    /// use kvsieve::attention::{AttentionPolicy, QuestConfig};
    /// let bad = AttentionPolicy::Quest(QuestConfig { block: 2, ..Default::default() });
    /// assert!(bad.validate().is_err());
    /// ```
    pub fn validate(&self) -> Result<()> {
        match self {
            AttentionPolicy::Dense => Ok(()),
            AttentionPolicy::TokenSelect(c) => c.validate(),
            AttentionPolicy::Quest(c) => c.validate(),
            AttentionPolicy::Tidal(c) => c.validate(),
        }
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
    ///
    /// ```
    /// let s = kvsieve::attention::SelectionStats { selections: 1, cache_hits: 3, ..Default::default() };
    /// assert_eq!(s.hit_rate(), Some(0.75));
    /// ```
    pub fn hit_rate(&self) -> Option<f64> {
        let n = self.selections + self.cache_hits;
        (n > 0).then(|| self.cache_hits as f64 / n as f64)
    }
}

/// What a forward does, announced to the policy before its layers run.
#[derive(Clone, Copy, Debug)]
pub enum Step<'a> {
    /// `n` new tokens ending at `seq_len` (a prefill chunk, or one decode token).
    Tokens {
        /// New tokens.
        n: usize,
        /// Tokens in the cache after this step.
        seq_len: usize,
    },
    /// The nodes of a draft tree (speculative verification), `mask` from
    /// [`crate::speculative::DraftTree::mask`], whose root is the token at
    /// logical index `start`.
    Tree {
        /// The tree's mask words.
        mask: &'a [u32],
        /// Logical index of the root.
        start: usize,
    },
}

/// One layer's inputs to attention, other than the queries and the output.
pub struct LayerInput<'a, E: Ops> {
    /// The layer of the KV cache, the step's keys and values already
    /// appended, with the sequence's page table and the RoPE table.
    pub cache: KvView<'a, E>,
    /// Query heads.
    pub q_heads: usize,
    /// True RoPE positions of the step's tokens.
    pub positions: &'a E::Ids,
    /// Logical index of the step's first token.
    pub start: usize,
    /// Tokens in the step.
    pub n: usize,
    /// The queries come rotated at `positions` (the model rotated them while
    /// appending the step's keys, as the policy asked through
    /// [`PolicyState::queries_at_true_positions`]).
    pub q_rotated: bool,
}

impl<E: Ops> LayerInput<'_, E> {
    /// Tokens cached once this step's are in.
    pub fn seq_len(&self) -> usize {
        self.start + self.n
    }
}

/// The per-session state of one policy.
pub trait PolicyState<E: Ops> {
    /// Prepares the layers of one forward.
    fn begin(&mut self, ops: &mut E, step: Step<'_>) -> Result<()>;
    /// Attention of one layer: rotates the raw queries `q` and writes `out`.
    fn layer(
        &mut self,
        ops: &mut E,
        a: &LayerInput<'_, E>,
        q: &mut E::Tensor,
        out: &mut E::Tensor,
    ) -> Result<()>;
    /// Whether `layer` of the prepared step only reads the queries after
    /// rotating them at their true positions: the model then rotates them in
    /// the pass that appends the step's keys (a dispatch fewer) and passes them
    /// in rotated. False where the policy reads raw queries (TokenSelect's
    /// selection) or other positions (compact ones).
    fn queries_at_true_positions(&self, _layer: usize) -> bool {
        false
    }
    /// The prompt being fed (in chunks) takes the sequence to `seq_len`
    /// tokens: a policy whose scheme depends on the length decides it for the
    /// whole prompt, not chunk by chunk.
    fn expect_len(&mut self, _seq_len: usize) {}
    /// Selections run and Selection Cache hits so far.
    fn stats(&mut self, _ops: &mut E) -> Result<SelectionStats> {
        Ok(SelectionStats::default())
    }
    /// The selection of `layer` from the last sparse step, as the policy keeps it.
    fn selected(&mut self, _ops: &mut E, _layer: usize) -> Result<Option<Vec<u32>>> {
        Ok(None)
    }
    /// The KV cache grew to `num_pages` pages: storage that follows its pages
    /// (block bounds) grows too.
    fn grow(&mut self, _ops: &mut E, _num_pages: usize) -> Result<()> {
        Ok(())
    }
}

/// Sizes a policy's buffers follow.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AttentionShape {
    /// The KV cache the policy serves.
    pub layout: KvLayout,
    /// Query heads.
    pub q_heads: usize,
    /// The model's trained context (`max_position_embeddings`): where
    /// [`tokenselect::Positions::Auto`] switches to compact positions.
    pub trained: usize,
}

impl AttentionShape {
    /// Values in one row of queries.
    pub fn q_dim(&self) -> usize {
        self.q_heads * self.layout.head_dim
    }
}

/// A policy and its state for one session.
pub struct Attention<E: Ops> {
    /// The policy.
    pub policy: AttentionPolicy,
    /// The sizes the policy serves.
    pub shape: AttentionShape,
    state: Box<dyn PolicyState<E> + Send>,
    /// A calibration state rather than `policy` itself.
    pub(crate) probing: bool,
}

impl<E: Ops> Attention<E> {
    /// State for `policy` over caches and queries of `shape`.
    pub fn new(policy: AttentionPolicy, shape: AttentionShape) -> Result<Self> {
        policy.validate()?;
        let state: Box<dyn PolicyState<E> + Send> = match policy {
            AttentionPolicy::Dense => Box::new(dense::Dense::new()),
            AttentionPolicy::TokenSelect(c) => Box::new(tokenselect::TokenSelect::new(c, shape)?),
            AttentionPolicy::Quest(c) => Box::new(quest::Quest::new(c, shape)?),
            AttentionPolicy::Tidal(c) => Box::new(tidal::Tidal::new(c, shape)),
        };
        Ok(Self {
            policy,
            shape,
            state,
            probing: false,
        })
    }

    /// Tidal's calibration state ([`tidal::Tidal::probe`]): every layer from
    /// the selection layer on makes its own choice; attention stays dense.
    pub fn tidal_probe(c: TidalConfig, shape: AttentionShape) -> Result<Self> {
        c.validate()?;
        Ok(Self {
            policy: AttentionPolicy::Tidal(c),
            shape,
            state: Box::new(tidal::Tidal::probe(c, shape)),
            probing: true,
        })
    }

    /// The KV cache grew to `num_pages` pages.
    pub fn grow(&mut self, ops: &mut E, num_pages: usize) -> Result<()> {
        self.shape.layout.num_pages = num_pages;
        self.state.grow(ops, num_pages)
    }

    /// The KV cache layout the policy serves.
    pub fn layout(&self) -> &KvLayout {
        &self.shape.layout
    }

    /// The prompt being fed takes the sequence to `seq_len` tokens
    /// ([`PolicyState::expect_len`]); called before its first chunk.
    pub fn expect_len(&mut self, seq_len: usize) {
        self.state.expect_len(seq_len)
    }

    /// Prepares a step (called once per forward, before the layers).
    pub fn begin(&mut self, ops: &mut E, step: Step<'_>) -> Result<()> {
        self.state.begin(ops, step)
    }

    /// Prepares a step of `n` tokens ending at `seq_len`.
    pub fn begin_step(&mut self, ops: &mut E, n: usize, seq_len: usize) -> Result<()> {
        self.begin(ops, Step::Tokens { n, seq_len })
    }

    /// Whether `layer` wants its queries rotated at their true positions
    /// before [`Attention::layer`] ([`PolicyState::queries_at_true_positions`]).
    pub fn queries_at_true_positions(&self, layer: usize) -> bool {
        self.state.queries_at_true_positions(layer)
    }

    /// Attention of one layer for the queries `q` of the step's tokens (raw,
    /// rotated here, unless `a.q_rotated`), whose keys are already in the cache.
    pub fn layer(
        &mut self,
        ops: &mut E,
        a: &LayerInput<'_, E>,
        q: &mut E::Tensor,
        out: &mut E::Tensor,
    ) -> Result<()> {
        self.state.layer(ops, a, q, out)
    }

    /// Selections run and Selection Cache hits so far (reads the device counters).
    pub fn stats(&mut self, ops: &mut E) -> Result<SelectionStats> {
        self.state.stats(ops)
    }

    /// The selection of `layer` from the last sparse step (for tests and tools):
    /// TokenSelect's token ids; Quest's chosen block ids, `[kv_heads, top]`;
    /// Tidal's token ids in use, `[kv_heads, budget]`, for layers past the
    /// selection layer.
    pub fn selected(&mut self, ops: &mut E, layer: usize) -> Result<Option<Vec<u32>>> {
        self.state.selected(ops, layer)
    }
}
