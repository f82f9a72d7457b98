//! Typed kernel parameters: one `#[repr(C)]` Pod struct per WGSL uniform block,
//! written by field name. [`LAYOUTS`] records each struct's shader, WGSL struct
//! name, size and field offsets, and a unit test checks them against the
//! struct naga reports for the composed shader, so a Rust struct and its WGSL
//! twin cannot drift apart by field order.
//!

use crate::shaders::{self, Shader};

/// The WGSL scalar type of a parameter field.
pub trait WgslScalar {
    /// `u32`, `i32` or `f32`.
    const WGSL: &'static str;
}
impl WgslScalar for u32 {
    const WGSL: &'static str = "u32";
}
impl WgslScalar for i32 {
    const WGSL: &'static str = "i32";
}
impl WgslScalar for f32 {
    const WGSL: &'static str = "f32";
}
/// The Selection Cache check's indirect-argument slots.
impl WgslScalar for [[u32; 4]; 48] {
    const WGSL: &'static str = "array<vec4<u32>, 48>";
}

/// A parameter struct's layout as Rust lays it out.
#[derive(Clone, Copy, Debug)]
pub struct Layout {
    /// Rust type name.
    pub rust: &'static str,
    /// The shader whose uniform block it fills.
    pub shader: Shader,
    /// The WGSL struct's name in that shader.
    pub wgsl: &'static str,
    /// Bytes.
    pub size: usize,
    /// (field name, byte offset, WGSL scalar type), in order.
    pub fields: &'static [(&'static str, usize, &'static str)],
}

macro_rules! kernel_params {
    ($(
        $(#[$doc:meta])*
        $name:ident for $shader:ident :: $wgsl:literal { $($(#[$fdoc:meta])* $f:ident: $t:ty),* $(,)? }
    )*) => {
        $(
            $(#[$doc])*
            #[repr(C)]
            #[derive(Clone, Copy, Debug, PartialEq, bytemuck::Pod, bytemuck::Zeroable)]
            pub struct $name { $($(#[$fdoc])* pub $f: $t),* }

            impl $name {
                /// The uniform block's words, as the recorder takes them.
                pub fn words(&self) -> &[u32] {
                    bytemuck::cast_slice(std::slice::from_ref(self))
                }
            }
        )*
        /// Every parameter struct, for the layout test.
        pub const LAYOUTS: &[Layout] = &[$(Layout {
            rust: stringify!($name),
            shader: shaders::$shader,
            wgsl: $wgsl,
            size: std::mem::size_of::<$name>(),
            fields: &[$((stringify!($f), std::mem::offset_of!($name, $f), <$t as WgslScalar>::WGSL)),*],
        }),*];
    };
}

kernel_params! {
    /// `copy.wgsl`: `n` words.
    CopyParams for COPY::"Params" { n: u32, _p0: u32, _p1: u32, _p2: u32 }
    /// `elementwise.wgsl`: `n` elements (swiglu, add, add_bias) or columns
    /// (mean_rows); `cols` the row length (add_bias); `row0..row0 + rows` the
    /// rows averaged (mean_rows).
    ElementwiseParams for ELEMENTWISE::"Params" { n: u32, cols: u32, row0: u32, rows: u32 }
    /// `rmsnorm.wgsl`.
    RmsNormParams for RMSNORM::"Params" { rows: u32, cols: u32, eps: f32, _p0: u32 }
    /// `rope.wgsl`.
    RopeParams for ROPE::"Params" { rows: u32, heads: u32, head_dim: u32, max_pos: u32 }
    /// `argmax.wgsl`.
    ArgmaxParams for ARGMAX::"Params" { rows: u32, cols: u32, _p0: u32, _p1: u32 }
    /// `sampling.wgsl`: `n` penalised ids, `k` candidates.
    SamplingParams for SAMPLING::"Params" { cols: u32, n: u32, penalty: f32, k: u32 }
    /// `sampling.wgsl::pick`: k candidates, the target distribution and the draw.
    PickParams for SAMPLING::"PickParams" { k: u32, temperature: f32, top_p: f32, u: f32 }
    /// `embedding.wgsl`: one chunk of the table (rows `row_start..row_start + rows`);
    /// a quantized table's planes as [`QMatmulParams`]'.
    EmbeddingParams for EMBEDDING::"Params" {
        tokens: u32, words: u32, row_start: u32, rows: u32, qh_off: u32, sc_off: u32, ks_off: u32, _p0: u32,
    }
    /// `matmul_quant.wgsl`: as [`MatmulSmallParams`], with the word offsets of
    /// the chunk's planes (`lib/quant.wgsl`).
    QMatmulParams for MATMUL_QUANT::"Params" {
        m: u32, k4: u32, rows: u32, n_offset: u32, y_stride: u32, qh_off: u32, sc_off: u32, ks_off: u32,
    }
    /// `matmul_small.wgsl`: one row chunk of W, its output columns from `n_offset`.
    MatmulSmallParams for MATMUL_SMALL::"Params" {
        m: u32, k4: u32, rows: u32, n_offset: u32, y_stride: u32, _p0: u32, _p1: u32, _p2: u32,
    }
    /// `matmul_tiled.wgsl`: as [`MatmulSmallParams`].
    MatmulTiledParams for MATMUL_TILED::"Params" {
        m: u32, k4: u32, rows: u32, n_offset: u32, y_stride: u32, _p0: u32, _p1: u32, _p2: u32,
    }
    /// `kv_append.wgsl`: one arena's pass (`q_heads` and `max_pos` for the
    /// queries `kv_append_rope` rotates).
    KvAppendParams for KV_APPEND::"Params" {
        tokens: u32, start: u32, kv_heads: u32, words: u32,
        page_size: u32, arena_first_page: u32, arena_pages: u32, q_heads: u32,
        max_pos: u32, _p0: u32, _p1: u32, _p2: u32,
    }
    /// `attention_decode.wgsl`: one arena's pass of split-KV decoding over
    /// `kv_len` ranks; the list fields as [`AttentionPrefillParams`]'s.
    AttentionDecodeParams for ATTENTION_DECODE::"Params" {
        kv_len: u32, q_heads: u32, kv_heads: u32, head_dim: u32,
        page_size: u32, split_len: u32, n_splits: u32, arena_first_page: u32,
        arena_pages: u32, first_pass: u32, scale: f32, max_pos: u32,
        direct: u32, n_init: u32, n_sel: u32, tail_start: u32,
        _p1: u32, block: u32, blocks_per_head: u32, _p2: u32,
    }
    /// `attention_prefill.wgsl`: one pass over ranks `kv_begin..kv_stop` of one
    /// arena for `n_q` query rows from `row0` at logical `q_start` (the mode and
    /// compact positions are override constants).
    AttentionPrefillParams for ATTENTION_PREFILL::"Params" {
        n_q: u32, q_start: u32, kv_len: u32, q_heads: u32,
        kv_heads: u32, head_dim: u32, page_size: u32, arena_first_page: u32,
        arena_pages: u32, first_pass: u32, last_pass: u32, scale: f32,
        max_pos: u32, kv_begin: u32, kv_stop: u32, row0: u32,
        tree_off: u32, n_init: u32, n_sel: u32, tail_start: u32,
        _p1: u32, block: u32, blocks_per_head: u32, _p2: u32,
    }
    /// `tokenselect.wgsl`: scoring (one arena) and the vote over `n` slots.
    /// `block` the prefilter's tokens per block (0: exact), `range_n` the
    /// candidates (the GQA map is an override constant).
    TokenSelectParams for TOKENSELECT::"Params" {
        n: u32, begin: u32, q_heads: u32, kv_heads: u32,
        head_dim: u32, page_size: u32, arena_first_page: u32, arena_pages: u32,
        _p0: u32, block: u32, range_n: u32, _p1: u32,
    }
    /// `topk.wgsl`: the `k` best of `n` keys from word `vbase`, written from
    /// word `obase` as `begin + j` or (`block` > 0) a prefilter slot's token;
    /// `pass_` the radix digit of a multi-pass selection.
    TopKParams for TOPK::"Params" {
        n: u32, begin: u32, k: u32, pass_: u32, block: u32, vbase: u32, obase: u32, _p0: u32,
    }
    /// `gate.wgsl`: the fingerprint's length, the gated dispatches' workgroup
    /// counts (`args[i].xyz`, `slots` of them).
    GateParams for GATE::"GateParams" {
        len: u32, slots: u32, threshold: f32, _p0: u32, args: [[u32; 4]; 48],
    }
    /// `block_sparse.wgsl`: bounds updates, block scores and token scores over
    /// one arena; `alpha` the spread (rotation and sum-only are override
    /// constants).
    BlockSparseParams for BLOCK_SPARSE::"Params" {
        first_block: u32, n_blocks: u32, seq_len: u32, kv_heads: u32,
        head_dim: u32, page_size: u32, block: u32, arena_first_page: u32,
        arena_pages: u32, max_pos: u32, q_heads: u32, out_cols: u32,
        _p0: u32, alpha: f32, _p1: u32, _p2: u32,
    }
    /// `speculative.wgsl`: draft and adj_update read `n` and `vocab`; accept
    /// all (`k` the top-k of the target distribution, the seed in two words).
    SpeculativeParams for SPECULATIVE::"Params" {
        n: u32, vocab: u32, k: u32, depth: u32,
        temperature: f32, top_p: f32, seed_lo: u32, seed_hi: u32,
    }
    /// `attention_decode.wgsl::decode_reduce`.
    DecodeReduceParams for ATTENTION_DECODE::"ReduceParams" {
        q_heads: u32, head_dim: u32, n_splits: u32, _p0: u32,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use naga::{ScalarKind, TypeInner};

    /// Each Rust struct matches the WGSL struct of the composed shader: same
    /// field names, offsets and scalar types in the same order, same size.
    #[test]
    fn rust_params_match_wgsl_structs() {
        for l in LAYOUTS {
            let module = naga::front::wgsl::parse_str(l.shader.source)
                .unwrap_or_else(|e| panic!("{}: {}", l.shader.name, e));
            let (members, span) = module
                .types
                .iter()
                .find_map(|(_, t)| match (&t.name, &t.inner) {
                    (Some(n), TypeInner::Struct { members, span }) if n == l.wgsl => {
                        Some((members.clone(), *span))
                    }
                    _ => None,
                })
                .unwrap_or_else(|| panic!("{} has no struct {}", l.shader.name, l.wgsl));
            let wgsl: Vec<(String, usize, &str)> = members
                .iter()
                .map(|m| {
                    let kind = match module.types[m.ty].inner {
                        TypeInner::Scalar(s) if s.width == 4 => match s.kind {
                            ScalarKind::Uint => "u32",
                            ScalarKind::Sint => "i32",
                            ScalarKind::Float => "f32",
                            _ => "other",
                        },
                        TypeInner::Array {
                            base,
                            size: naga::ArraySize::Constant(n),
                            ..
                        } if n.get() == 48
                            && matches!(
                                module.types[base].inner,
                                TypeInner::Vector {
                                    size: naga::VectorSize::Quad,
                                    scalar: naga::Scalar::U32
                                }
                            ) =>
                        {
                            "array<vec4<u32>, 48>"
                        }
                        _ => "other",
                    };
                    (m.name.clone().unwrap_or_default(), m.offset as usize, kind)
                })
                .collect();
            let rust: Vec<(String, usize, &str)> = l
                .fields
                .iter()
                .map(|&(n, o, k)| (n.to_string(), o, k))
                .collect();
            assert_eq!(rust, wgsl, "{} vs {}::{}", l.rust, l.shader.name, l.wgsl);
            assert_eq!(l.size, span as usize, "{} size", l.rust);
        }
    }

    /// Every struct is registered once.
    #[test]
    fn layouts_are_unique() {
        let mut seen = std::collections::HashSet::new();
        for l in LAYOUTS {
            assert!(seen.insert((l.shader.name, l.wgsl)), "{} twice", l.wgsl);
        }
    }
}
