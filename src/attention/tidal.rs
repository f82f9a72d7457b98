//! TidalDecode (docs/ALGORITHMS.md section 3): dense attention in the
//! selection layers, which also choose the top-budget tokens per KV head by
//! q . k summed over the head's query heads; the layers after a selection layer
//! attend to its choice (decode; prefill stays dense).

use super::dense;
use super::{AttentionShape, LayerInput, PolicyState, Step};
use crate::error::{Error, Result};
use crate::ops::{KeyList, Ops, Selection};

/// TidalDecode parameters (docs/ALGORITHMS.md section 3). The defaults place the
/// layers as the paper does for a 32-layer model (2 and 13). The right
/// re-selection layer depends on the model (docs/RESULTS.md has the default
/// model's passkey figures by layer).
///
/// ```
/// let c = kvsieve::TidalConfig { reselection_layer: 14, ..Default::default() };
/// assert!(c.validate().is_ok());
/// ```
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

impl TidalConfig {
    /// Checks the values, naming the bad one.
    pub fn validate(&self) -> Result<()> {
        if self.budget == 0 || self.reselection_layer <= self.selection_layer {
            return Err(Error::InvalidOption(format!(
                "Tidal budget {} must be >= 1 and the re-selection layer {} after the selection layer {}",
                self.budget, self.reselection_layer, self.selection_layer
            )));
        }
        Ok(())
    }
}

/// Token scores and the chosen positions passed layer to layer.
struct Buffers<E: Ops> {
    /// `[kv_heads, cap]` token scores, summed over each KV head's query heads.
    scores: E::Tensor,
    cap: usize,
    /// `[kv_heads, budget]` token indices.
    selected: E::Ids,
}

/// What the current forward does.
enum Mode<E: Ops> {
    Dense,
    Tree(E::Ids),
    /// One decode token with more tokens before it than the budget.
    Decode,
}

/// Tidal's state for one session.
pub struct Tidal<E: Ops> {
    c: TidalConfig,
    shape: AttentionShape,
    buf: Option<Buffers<E>>,
    mode: Mode<E>,
    /// Calibration ([`Tidal::probe`]): each layer's own choice, by layer.
    probe: Option<Vec<E::Ids>>,
}

impl<E: Ops> Tidal<E> {
    /// State for `c` over `shape`.
    pub fn new(c: TidalConfig, shape: AttentionShape) -> Self {
        Self {
            c,
            shape,
            buf: None,
            mode: Mode::Dense,
            probe: None,
        }
    }

    /// A calibration state: in a decode step every layer from the selection
    /// layer on attends densely and makes its own top-budget choice, kept for
    /// [`PolicyState::selected`]; the output is dense attention's.
    pub fn probe(c: TidalConfig, shape: AttentionShape) -> Self {
        Self {
            probe: Some(Vec::new()),
            ..Self::new(c, shape)
        }
    }
}

impl<E: Ops> PolicyState<E> for Tidal<E> {
    fn begin(&mut self, ops: &mut E, step: Step<'_>) -> Result<()> {
        self.mode = Mode::Dense;
        match step {
            Step::Tree { mask, .. } => self.mode = Mode::Tree(ops.ids(mask)?),
            // Sparse once more tokens precede the current one than the budget.
            Step::Tokens { n, seq_len } if n == 1 && seq_len - 1 > self.c.budget => {
                if self.buf.as_ref().is_none_or(|b| b.cap < seq_len) {
                    let kv_heads = self.shape.layout.kv_heads;
                    let cap = seq_len.next_power_of_two().max(1024);
                    self.buf = Some(Buffers {
                        scores: ops.tensor(kv_heads, cap)?,
                        cap,
                        selected: ops.ids(&vec![0u32; kv_heads * self.c.budget])?,
                    });
                }
                if let Some(per_layer) = self.probe.as_mut().filter(|p| p.is_empty()) {
                    let n = self.shape.layout.kv_heads * self.c.budget;
                    for _ in 0..self.shape.layout.layers {
                        per_layer.push(ops.ids(&vec![0u32; n])?);
                    }
                }
                self.mode = Mode::Decode;
            }
            Step::Tokens { .. } => {}
        }
        Ok(())
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
        let c = self.c;
        match (&self.mode, self.buf.as_mut()) {
            (Mode::Tree(mask), _) => dense::tree(ops, a, mask, q, out),
            (Mode::Decode, Some(b)) if a.cache.layer >= c.selection_layer => {
                dense::rotate(ops, a, q)?;
                let seq_len = a.seq_len();
                if let Some(per_layer) = self.probe.as_mut() {
                    let (n, kv_heads) = (seq_len - 1, self.shape.layout.kv_heads);
                    ops.token_scores(q, &a.cache, n, &mut b.scores)?;
                    let out_ids = &mut per_layer[a.cache.layer];
                    ops.block_top_k(&b.scores, kv_heads, n, c.budget, out_ids)?;
                    return dense::attend(ops, a, q, out);
                }
                if a.cache.layer == c.selection_layer || a.cache.layer == c.reselection_layer {
                    // Full attention here, and the top-budget tokens before the
                    // current one per KV head.
                    let (n, kv_heads) = (seq_len - 1, self.shape.layout.kv_heads);
                    ops.token_scores(q, &a.cache, n, &mut b.scores)?;
                    ops.block_top_k(&b.scores, kv_heads, n, c.budget, &mut b.selected)?;
                    return dense::attend(ops, a, q, out);
                }
                let list = KeyList {
                    n_init: 0,
                    selected: &b.selected,
                    n_selected: c.budget,
                    tail_start: seq_len - 1,
                    tail_len: 1,
                    compact: false,
                    selection: Selection::KvHeadTokens,
                };
                ops.attention_decode_list(q, &a.cache, seq_len, &list, out)
            }
            _ => dense::rotate_and_attend(ops, a, q, out),
        }
    }

    fn selected(&mut self, ops: &mut E, layer: usize) -> Result<Option<Vec<u32>>> {
        if let Some(per_layer) = &self.probe {
            return match per_layer.get(layer) {
                Some(ids) if layer >= self.c.selection_layer => ops.download_ids(ids).map(Some),
                _ => Ok(None),
            };
        }
        match &self.buf {
            Some(b) if layer > self.c.selection_layer => ops.download_ids(&b.selected).map(Some),
            _ => Ok(None),
        }
    }
}
