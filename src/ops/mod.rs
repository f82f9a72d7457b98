//! The ops interface the model and the attention policies are written against.
//!
//! Two executors implement it: [`crate::kernels::GpuExecutor`] (WGSL kernels through
//! wgpu, the product) and [`crate::reference::RefExecutor`] (CPU f32, the oracle and
//! the long-context harness).
//!
//! The interface is split by family, one trait per file, in the manner of
//! burn's backend op traits: [`TensorOps`] (`tensor.rs`: activations, weights,
//! the dense layer ops), [`KvOps`] (`kv.rs`: the paged KV cache and attention
//! over it), [`SelectionOps`] (`selection.rs`: the scores, votes, top-k and
//! Selection Cache gate of the sparse policies) and [`SpeculationOps`]
//! (`speculation.rs`: draft trees and acceptance). [`Ops`] is all four, and is
//! what model and policy code asks for.
//!
//! **Checks in front.** Each op is a provided method that checks its shapes
//! and options ([`check`], reading the executor's [`Limits`]) and then calls
//! the executor's `run_*` method, which may assume them. Executors implement
//! only the `run_*` methods, so a caller's mistake is the same typed error on
//! every executor (`tests/gpu_checks.rs` drives each op with bad shapes on
//! both and compares).
//!
//! Conventions: activations are f32 matrices `[rows, cols]`; weights are f16 in
//! Hugging Face `[out, in]` layout; heads are laid out `[rows, heads * head_dim]`;
//! keys go into the KV cache before RoPE and are rotated at attention time.
//!
//! ```
//! use kvsieve::ops::prelude::*;
//! use kvsieve::reference::RefExecutor;
//! use half::f16;
//! let mut ops = RefExecutor::new();
//! let x = ops.upload(&[1.0, 2.0, 3.0, 4.0], 1, 4).unwrap();
//! let w = ops.weight(&[f16::ONE; 8], 2, 4).unwrap();
//! let mut y = ops.tensor(1, 2).unwrap();
//! ops.matmul(&x, &w, &mut y).unwrap();
//! assert_eq!(ops.download(&y).unwrap(), vec![10.0, 10.0]);
//! ```

pub mod check;
mod kv;
mod selection;
mod speculation;
mod tensor;

pub use kv::{KvOps, KvView};
pub use selection::SelectionOps;
pub use speculation::SpeculationOps;
pub use tensor::{Epilogue, IdsTicket, TensorOps};

/// The traits a caller of the ops needs in scope (for a concrete executor
/// type; generic code bound by [`Ops`] sees every family's methods).
pub mod prelude {
    pub use super::{Executor, KvOps, KvView, Ops, SelectionOps, SpeculationOps, TensorOps};
}

use crate::error::{Error, Result};
use crate::kv::KvLayout;

/// What an executor can hold in one buffer; the front checks allocations
/// against it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Bytes of one tensor or RoPE table (the GPU's storage binding limit;
    /// weights and KV caches are split across bindings and not bounded by it).
    pub max_buffer_bytes: u64,
}

/// Work counters of an executor since it was created (zero where it has
/// nothing to count, as on the CPU).
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Counters {
    /// Kernel dispatches recorded.
    pub dispatches: u64,
    /// Bind groups created.
    pub bind_groups: u64,
    /// Buffers created by the calling thread (on any device; see
    /// [`crate::gpu::buffer::created`]).
    pub buffers: u64,
    /// Submits.
    pub submits: u64,
    /// Host nanoseconds encoding and submitting recorded work.
    pub submit_host_ns: f64,
    /// Host nanoseconds waiting for the device and reading back.
    pub wait_ns: f64,
}

/// What every executor provides besides its ops: its storage types, their
/// shapes, its limits and work control. The families build on it.
pub trait Executor: Sized + Send + 'static {
    /// f32 matrix `[rows, cols]` on the executor.
    type Tensor: Send;
    /// u32 vector (token ids, positions).
    type Ids: Send;
    /// f16 matrix `[rows, cols]` (Hugging Face `[out, in]`), possibly split in chunks.
    /// Shared (read-only) by every session on the model, hence `Sync`.
    type Weight: Send + Sync;
    /// RoPE cos/sin table (shared like the weights).
    type Rope: Send + Sync;
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
    /// Another executor on the same device, with its own recorded work, that
    /// may use this one's weights and RoPE tables (each session of a shared
    /// model runs on its own fork).
    fn fork(&self) -> Result<Self>;
    /// What one buffer may hold.
    fn limits(&self) -> Limits;
    /// Rows and columns of a tensor.
    fn dims(t: &Self::Tensor) -> (usize, usize);
    /// Rows of a tensor.
    fn rows(t: &Self::Tensor) -> usize {
        Self::dims(t).0
    }
    /// Length of an id vector.
    fn ids_len(ids: &Self::Ids) -> usize;
    /// Rows and columns of a weight.
    fn weight_dims(w: &Self::Weight) -> (usize, usize);
    /// Bytes a weight takes in the executor's memory.
    fn weight_bytes(w: &Self::Weight) -> u64;
    /// Positions a RoPE table covers, and its head dimension.
    fn rope_dims(rope: &Self::Rope) -> (usize, usize);
    /// The layout of a KV cache.
    fn kv_layout(kv: &Self::Kv) -> &KvLayout;
    /// Bytes a KV cache takes in the executor's memory.
    fn kv_bytes(kv: &Self::Kv) -> u64;
    /// The layout of the cache block bounds describe, and tokens per block.
    fn bounds_layout(bounds: &Self::Bounds) -> (&KvLayout, usize);

    /// Finishes all recorded work (a no-op on the CPU).
    fn flush(&mut self) -> Result<()>;
    /// Whether the device works apart from the host's cores, so recording a
    /// step while the device runs the last one saves time (a CPU adapter or
    /// executor shares the cores, and gains nothing).
    fn runs_apart(&self) -> bool {
        false
    }
    /// Submits the recorded work without waiting for it (executors that run
    /// ops as they are called have nothing to submit); reads asked for with
    /// [`TensorOps::read_ids_later`] land with it.
    fn submit_pending(&mut self) -> Result<()> {
        self.flush()
    }
    /// The device's loss, once it is lost (every later call fails; a GPU
    /// call in flight may have failed with a less telling error first).
    fn device_lost(&self) -> Option<Error> {
        None
    }
    /// Work counters since creation.
    fn counters(&self) -> Counters {
        Counters::default()
    }
    /// Turns per-kernel timing on or off (GPU timestamps; a no-op where unsupported).
    fn set_profiling(&mut self, _on: bool) {}
    /// Per-kernel totals since profiling began: (kernel, dispatches, nanoseconds).
    fn take_profile(&mut self) -> Vec<(String, u64, f64)> {
        Vec::new()
    }
}

/// Every op family: what the model and the policies are written against.
pub trait Ops: TensorOps + KvOps + SelectionOps + SpeculationOps {}

impl<E: TensorOps + KvOps + SelectionOps + SpeculationOps> Ops for E {}

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

    /// An even head dimension, a positive theta, at least one position.
    pub fn validate(&self) -> Result<()> {
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
        Ok(())
    }

    /// Rows of the table (see [`ROPE_SPLIT`]).
    pub fn table_rows(&self) -> usize {
        self.max_positions.min(ROPE_FLAT) + ROPE_SPLIT + self.max_positions.div_ceil(ROPE_SPLIT)
    }

    /// The `(cos, sin)` table `[table_rows, head_dim / 2]`: a row per
    /// position below [`ROPE_FLAT`], then rows for the angles `r * inv_freq`
    /// (`r < ROPE_SPLIT`) and `h * ROPE_SPLIT * inv_freq`, cos and sin
    /// evaluated in f64 from the exact angle; [`rope_at`] reads a position's
    /// row or composes it from two.
    pub fn table(&self) -> Result<Vec<[f32; 2]>> {
        self.validate()?;
        let inv = self.inv_freq();
        let mut t = Vec::with_capacity(self.table_rows() * inv.len());
        let flat = 0..self.max_positions.min(ROPE_FLAT);
        let high = (0..self.max_positions.div_ceil(ROPE_SPLIT)).map(|h| h * ROPE_SPLIT);
        for p in flat.chain(0..ROPE_SPLIT).chain(high) {
            for &f in &inv {
                let a = p as f64 * f as f64;
                t.push([a.cos() as f32, a.sin() as f32]);
            }
        }
        Ok(t)
    }
}

/// RoPE tables hold a row per position below [`ROPE_FLAT`] and are two-level
/// past it, so that one covering 2^24 positions takes 50K rows (13 MB at head
/// dim 64) and fits any binding: past the flat part, position `p`'s (cos,
/// sin) is composed by angle addition from row `p % ROPE_SPLIT` and row
/// `ROPE_SPLIT + p / ROPE_SPLIT` of the second part, in f32 (the kernels do
/// the same, `shaders/lib/rotary.wgsl`). Against cos and sin of the exact
/// angle the composed values are within 4.8e-7 at any position
/// (`tests/gpu_kernels.rs` checks near 2^20 and 2^24). Angles are exact: a
/// single table computed as transformers does rounds `pos * inv_freq` to f32
/// first, which at 2^20 positions moves the fastest channel by up to 0.06 rad.
pub const ROPE_SPLIT: usize = 1024;

/// Positions with a row of their own in a RoPE table (contexts within it
/// read one row per key, as a flat table would).
pub const ROPE_FLAT: usize = 32768;

/// `(cos, sin)` of channel pair `i` at position `pos` (clamped to the
/// table's `max_pos` positions) from a table of `half` pairs a row: its own
/// row below [`ROPE_FLAT`], composed from two past it.
#[inline]
pub fn rope_at(table: &[[f32; 2]], half: usize, max_pos: usize, pos: usize, i: usize) -> [f32; 2] {
    let p = pos.min(max_pos - 1);
    let flat = max_pos.min(ROPE_FLAT);
    if p < flat {
        return table[p * half + i];
    }
    let lo = table[(flat + p % ROPE_SPLIT) * half + i];
    let hi = table[(flat + ROPE_SPLIT + p / ROPE_SPLIT) * half + i];
    [lo[0] * hi[0] - lo[1] * hi[1], lo[1] * hi[0] + lo[0] * hi[1]]
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

/// Successors kept per token in the Token Recycling adjacency matrix `[vocab, ADJ_WIDTH]`.
pub const ADJ_WIDTH: usize = 8;

/// Whether node `j` of a draft tree is node `i` or one of its ancestors, read
/// from the tree mask [`KvOps::attention_tree`] takes (4 ancestor words per node,
/// then the depths).
pub fn tree_sees(mask: &[u32], i: usize, j: usize) -> bool {
    (mask[4 * i + j / 32] >> (j % 32)) & 1 == 1
}

/// The score of a hierarchical selection's slot outside the candidate range.
pub const NO_SCORE: f32 = -3.0e38;
