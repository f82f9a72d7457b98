//! The Llama-family forward (Llama, Mistral, Qwen2, Qwen3), written once against [`Ops`]:
//! chunked prefill and decode share one code path; logits only for the last row.

use super::config::ModelConfig;
use super::source::TensorSource;
use crate::attention::{Attention, LayerInput, Step};
use crate::error::Result;
use crate::kv::PageTable;
use crate::ops::{Epilogue, KvView, Ops};
use crate::quant::DType;
use std::borrow::Cow;

/// Projections that read the same rows: one weight stacking them (`[q; k;
/// v]`, `[gate; up]`: one matmul) when they share a type, else apart.
enum Stack<W, const N: usize> {
    Stacked(W),
    Apart([W; N]),
}

impl<W, const N: usize> Stack<W, N> {
    fn weights(&self) -> Vec<&W> {
        match self {
            Stack::Stacked(w) => vec![w],
            Stack::Apart(ws) => ws.iter().collect(),
        }
    }
}

struct Layer<E: Ops> {
    in_norm: E::Weight,
    qkv: Stack<E::Weight, 3>,
    bias: Option<[E::Weight; 3]>,
    /// Per-head RMSNorm weights of q and k (Qwen3).
    qk_norm: Option<[E::Weight; 2]>,
    o: E::Weight,
    post_norm: E::Weight,
    gate_up: Stack<E::Weight, 2>,
    down: E::Weight,
}

/// A tensor's type and bytes as the executor will hold them.
type Raw<'a> = (DType, Cow<'a, [u8]>);

/// Matrices of `cols` columns (each with its row count) as one stacked weight
/// when they share a type and the stack takes at most `max_bytes`, else each
/// its own weight.
fn stack<E: Ops, const N: usize>(
    ops: &mut E,
    parts: [(Raw<'_>, usize); N],
    cols: usize,
    max_bytes: u64,
) -> Result<Stack<E::Weight, N>> {
    let t = parts[0].0 .0;
    let rows: usize = parts.iter().map(|p| p.1).sum();
    // A margin for the planes' padding of quantized types.
    let fits = t
        .bytes_for((rows * cols) as u64)
        .is_some_and(|b| b.saturating_add(256) <= max_bytes);
    if fits && parts.iter().all(|p| p.0 .0 == t) {
        let bytes = parts.iter().map(|p| &*p.0 .1).collect::<Vec<_>>().concat();
        return Ok(Stack::Stacked(ops.weight_raw(t, &bytes, rows, cols)?));
    }
    let mut ws = Vec::with_capacity(N);
    for ((t, b), r) in parts {
        ws.push(ops.weight_raw(t, &b, r, cols)?);
    }
    ws.try_into()
        .map(Stack::Apart)
        .map_err(|_| crate::error::Error::Internal("stack parts".into()))
}

/// A loaded model on executor `E`.
pub struct Llama<E: Ops> {
    /// Hyper-parameters.
    pub cfg: ModelConfig,
    embed: E::Weight,
    lm_head: Option<E::Weight>,
    norm: E::Weight,
    layers: Vec<Layer<E>>,
    /// RoPE table covering the context.
    pub rope: E::Rope,
    /// Bytes the weights take on the executor.
    pub weight_bytes: u64,
    /// Bytes of weights one decode step reads (every matrix once; the
    /// embedding table only for the LM head when tied).
    pub weight_bytes_per_token: u64,
}

/// Activation buffers for a chunk of `rows` tokens, reused across layers.
pub struct Workspace<E: Ops> {
    rows: usize,
    x: E::Tensor,
    q: E::Tensor,
    k: E::Tensor,
    v: E::Tensor,
    attn: E::Tensor,
    /// The gate projection, then SwiGLU's output (the up projection is fused).
    gate: E::Tensor,
    last: E::Tensor,
    /// Normed q and k (per-head norms), swapped with `q` and `k`.
    qk_normed: Option<(E::Tensor, E::Tensor)>,
    /// Logits of the last row `[1, vocab]`.
    pub logits: E::Tensor,
    /// Verify workspaces: logits of every row `[rows, vocab]`.
    pub all_logits: Option<E::Tensor>,
}

impl<E: Ops> Workspace<E> {
    /// Buffers for chunks of `rows` tokens.
    pub fn new(ops: &mut E, cfg: &ModelConfig, rows: usize) -> Result<Self> {
        let (hd, qd, kd) = (
            cfg.hidden,
            cfg.heads * cfg.head_dim,
            cfg.kv_heads * cfg.head_dim,
        );
        Ok(Self {
            rows,
            x: ops.tensor(rows, hd)?,
            q: ops.tensor(rows, qd)?,
            k: ops.tensor(rows, kd)?,
            v: ops.tensor(rows, kd)?,
            attn: ops.tensor(rows, qd)?,
            gate: ops.tensor(rows, cfg.intermediate)?,
            last: ops.tensor(1, hd)?,
            qk_normed: if cfg.qk_norm {
                Some((ops.tensor(rows, qd)?, ops.tensor(rows, kd)?))
            } else {
                None
            },
            logits: ops.tensor(1, cfg.vocab)?,
            all_logits: None,
        })
    }

    /// Buffers for verifying a draft tree of `rows` nodes: logits for every row.
    pub fn for_verify(ops: &mut E, cfg: &ModelConfig, rows: usize) -> Result<Self> {
        let mut ws = Self::new(ops, cfg, rows)?;
        ws.all_logits = Some(ops.tensor(rows, cfg.vocab)?);
        Ok(ws)
    }

    /// Rows this workspace holds.
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// The last layer's output of every row (before the final norm), after
    /// [`Llama::forward`].
    pub fn hidden(&self) -> &E::Tensor {
        &self.x
    }
}

impl<E: Ops> Llama<E> {
    /// Loads the weights of `cfg` from `w` onto the executor, each in its stored
    /// type, or float matrices quantized to `quantize`. `max_positions` sizes the
    /// RoPE table (the longest context this model will run).
    pub fn load(
        ops: &mut E,
        w: &dyn TensorSource,
        cfg: ModelConfig,
        max_positions: usize,
        progress: bool,
        quantize: Option<DType>,
    ) -> Result<Self> {
        let (h, qd, kd, inter, v) = (
            cfg.hidden,
            cfg.heads * cfg.head_dim,
            cfg.kv_heads * cfg.head_dim,
            cfg.intermediate,
            cfg.vocab,
        );
        let bar = progress.then(|| crate::progress::bar(cfg.layers as u64 + 2, "load"));
        let raw = |name: &str, rows: usize, cols: usize| -> Result<Raw<'_>> {
            let shape = if rows == 1 {
                vec![cols]
            } else {
                vec![rows, cols]
            };
            let t = w.tensor(name, &shape)?;
            match quantize {
                // Float matrices of whole 32-value rows; vectors and stored
                // quantized tensors keep their type.
                Some(q) if rows > 1 && !t.dtype.is_quantized() && cols.is_multiple_of(32) => {
                    let mut f = vec![0.0f32; rows * cols];
                    crate::quant::dequantize(t.dtype, &t.bytes, &mut f)?;
                    let mut b =
                        Vec::with_capacity(q.bytes_for(f.len() as u64).unwrap_or(0) as usize);
                    crate::quant::quantize(q, &f, &mut b)?;
                    Ok((q, Cow::Owned(b)))
                }
                _ => Ok((t.dtype, t.bytes)),
            }
        };
        let mat = |ops: &mut E, name: &str, rows: usize, cols: usize| -> Result<E::Weight> {
            let (t, b) = raw(name, rows, cols)?;
            ops.weight_raw(t, &b, rows, cols)
        };
        // SwiGLU pairs want a gate row and its up row in one binding.
        let max_bytes = ops.limits().max_buffer_bytes;
        let embed = mat(ops, "model.embed_tokens.weight", v, h)?;
        let lm_head = if cfg.tied_embeddings || !w.has("lm_head.weight") {
            None
        } else {
            Some(mat(ops, "lm_head.weight", v, h)?)
        };
        let norm = mat(ops, "model.norm.weight", 1, h)?;
        if let Some(b) = &bar {
            b.inc(2);
        }
        let mut layers = Vec::with_capacity(cfg.layers);
        for i in 0..cfg.layers {
            let p = |s: &str| format!("model.layers.{i}.{s}");
            let bias = if cfg.qkv_bias {
                Some([
                    mat(ops, &p("self_attn.q_proj.bias"), 1, qd)?,
                    mat(ops, &p("self_attn.k_proj.bias"), 1, kd)?,
                    mat(ops, &p("self_attn.v_proj.bias"), 1, kd)?,
                ])
            } else {
                None
            };
            let qk_norm = if cfg.qk_norm {
                let hd = cfg.head_dim;
                Some([
                    mat(ops, &p("self_attn.q_norm.weight"), 1, hd)?,
                    mat(ops, &p("self_attn.k_norm.weight"), 1, hd)?,
                ])
            } else {
                None
            };
            layers.push(Layer {
                qk_norm,
                in_norm: mat(ops, &p("input_layernorm.weight"), 1, h)?,
                qkv: stack(
                    ops,
                    [
                        (raw(&p("self_attn.q_proj.weight"), qd, h)?, qd),
                        (raw(&p("self_attn.k_proj.weight"), kd, h)?, kd),
                        (raw(&p("self_attn.v_proj.weight"), kd, h)?, kd),
                    ],
                    h,
                    u64::MAX,
                )?,
                bias,
                o: mat(ops, &p("self_attn.o_proj.weight"), h, qd)?,
                post_norm: mat(ops, &p("post_attention_layernorm.weight"), 1, h)?,
                gate_up: stack(
                    ops,
                    [
                        (raw(&p("mlp.gate_proj.weight"), inter, h)?, inter),
                        (raw(&p("mlp.up_proj.weight"), inter, h)?, inter),
                    ],
                    h,
                    max_bytes,
                )?,
                down: mat(ops, &p("mlp.down_proj.weight"), h, inter)?,
            });
            if let Some(b) = &bar {
                b.inc(1);
            }
        }
        if let Some(b) = bar {
            b.finish_and_clear();
        }
        let rope = ops.rope_table(&cfg.rope(max_positions))?;
        let b = |w: &E::Weight| E::weight_bytes(w);
        let per_layer: u64 = layers
            .iter()
            .map(|l| {
                [&l.in_norm, &l.o, &l.post_norm, &l.down]
                    .into_iter()
                    .chain(l.qkv.weights())
                    .chain(l.gate_up.weights())
                    .map(b)
                    .sum::<u64>()
                    + l.bias.iter().flatten().map(b).sum::<u64>()
            })
            .sum();
        let head = b(lm_head.as_ref().unwrap_or(&embed)) + b(&norm);
        let weight_bytes = per_layer + head + lm_head.as_ref().map_or(0, |_| b(&embed));
        Ok(Self {
            cfg,
            embed,
            lm_head,
            norm,
            layers,
            rope,
            weight_bytes,
            weight_bytes_per_token: per_layer + head,
        })
    }

    /// Runs `tokens` (at positions `start..`, whose KV pages are reserved in `table`)
    /// through every layer, appending their keys and values, and leaves the logits of
    /// the last token in `ws.logits` (of every token in `ws.all_logits` for a verify
    /// workspace). With `tree` (a draft tree's mask), the tokens are the tree's nodes
    /// and attend to the cache plus their ancestors. Nothing is submitted: the caller
    /// reads results.
    #[allow(clippy::too_many_arguments)]
    pub fn forward(
        &self,
        ops: &mut E,
        kv: &mut E::Kv,
        table: &PageTable,
        tokens: &E::Ids,
        positions: &E::Ids,
        start: usize,
        n: usize,
        ws: &mut Workspace<E>,
        attn: &mut Attention<E>,
        tree: Option<&[u32]>,
    ) -> Result<()> {
        if n != ws.rows {
            return crate::error::shape_err(
                "forward",
                format!("{n} tokens for a workspace of {} rows", ws.rows),
            );
        }
        let c = &self.cfg;
        ops.embed(tokens, &self.embed, &mut ws.x)?;
        match tree {
            Some(mask) => attn.begin(ops, Step::Tree { mask, start })?,
            None => attn.begin(
                ops,
                Step::Tokens {
                    n,
                    seq_len: start + n,
                },
            )?,
        }
        for (i, l) in self.layers.iter().enumerate() {
            // The RMSNorms ride in the prologues of the matmuls that read them.
            let (x, eps, keep) = (&ws.x, c.eps, Epilogue::Store);
            match &l.qkv {
                Stack::Stacked(w) => {
                    let ys = [&mut ws.q, &mut ws.k, &mut ws.v];
                    ops.matmul_parts(x, Some((&l.in_norm, eps)), w, ys)?;
                }
                Stack::Apart([q, k, v]) => {
                    ops.norm_matmul_then(x, &l.in_norm, eps, q, &mut ws.q, keep)?;
                    ops.norm_matmul_then(x, &l.in_norm, eps, k, &mut ws.k, keep)?;
                    ops.norm_matmul_then(x, &l.in_norm, eps, v, &mut ws.v, keep)?;
                }
            }
            if let Some([bq, bk, bv]) = &l.bias {
                ops.add_bias(&mut ws.q, bq)?;
                ops.add_bias(&mut ws.k, bk)?;
                ops.add_bias(&mut ws.v, bv)?;
            }
            if let (Some([qn, kn]), Some((qt, kt))) = (&l.qk_norm, ws.qk_normed.as_mut()) {
                ops.rms_norm(&ws.q, qn, c.eps, qt)?;
                ops.rms_norm(&ws.k, kn, c.eps, kt)?;
                std::mem::swap(&mut ws.q, qt);
                std::mem::swap(&mut ws.k, kt);
            }
            let q_rotated = attn.queries_at_true_positions(i);
            if q_rotated {
                let (q, rope) = (&mut ws.q, &self.rope);
                ops.kv_append_rope(
                    kv, i, table, start, &ws.k, &ws.v, q, c.heads, positions, rope,
                )?;
            } else {
                ops.kv_append(kv, i, table, start, &ws.k, &ws.v)?;
            }
            let input = LayerInput {
                cache: KvView {
                    kv,
                    layer: i,
                    table,
                    rope: &self.rope,
                },
                q_heads: c.heads,
                positions,
                start,
                n,
                q_rotated,
            };
            attn.layer(ops, &input, &mut ws.q, &mut ws.attn)?;
            // The residual adds and SwiGLU ride in the matmuls' epilogues.
            ops.matmul_then(&ws.attn, &l.o, &mut ws.x, Epilogue::Add)?;
            let (x, post, y) = (&ws.x, &l.post_norm, &mut ws.gate);
            match &l.gate_up {
                Stack::Stacked(w) => {
                    ops.norm_matmul_then(x, post, c.eps, w, y, Epilogue::SwigluPairs)?;
                }
                Stack::Apart([gate, up]) => {
                    ops.norm_matmul_then(x, post, c.eps, gate, y, Epilogue::Store)?;
                    ops.norm_matmul_then(x, post, c.eps, up, y, Epilogue::Swiglu)?;
                }
            }
            ops.matmul_then(&ws.gate, &l.down, &mut ws.x, Epilogue::Add)?;
        }
        if let Some(logits) = ws.all_logits.as_mut() {
            return self.head_logits(ops, &ws.x, logits);
        }
        // Only the last position's logits are needed.
        let last = if n == 1 {
            &ws.x
        } else {
            ops.copy_rows(&ws.x, n - 1, &mut ws.last, 0, 1)?;
            &ws.last
        };
        self.head_logits(ops, last, &mut ws.logits)
    }

    /// Logits `[rows, vocab]` of last-layer outputs `x` (`[rows, hidden]`,
    /// [`Workspace::hidden`]): the final norm, then the LM head.
    pub fn head_logits(&self, ops: &mut E, x: &E::Tensor, out: &mut E::Tensor) -> Result<()> {
        let head = self.lm_head.as_ref().unwrap_or(&self.embed);
        ops.norm_matmul_then(x, &self.norm, self.cfg.eps, head, out, Epilogue::Store)
    }
}
