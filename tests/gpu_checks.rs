//! A caller's mistake is the same typed error on either executor: each case
//! drives one op with bad shapes or options on the GPU and on the reference
//! and compares the errors (the checks run once, in the ops front). Every
//! checked op has at least one case (`every_op_has_a_case`).

mod common;

use half::f16;
use kvsieve::kv::{KvLayout, PageAllocator, PageTable};
use kvsieve::ops::prelude::*;
use kvsieve::ops::{GqaMap, KeyList, Prefilter, RopeConfig, SelectPlan, Selection};
use kvsieve::quant::DType;
use kvsieve::reference::RefExecutor;
use kvsieve::sampling::AcceptParams;
use kvsieve::Error;

/// The error `case` returns on executor `E`, rendered.
fn err<E: Ops>(ex: &mut E, name: &str, case: &dyn Fn(&mut E) -> kvsieve::Result<()>) -> String {
    match case(ex) {
        Err(e @ (Error::Shape { .. } | Error::InvalidOption(_) | Error::Capacity(_))) => {
            e.to_string()
        }
        other => panic!(
            "{name} on {}: expected a typed error, got {other:?}",
            ex.name()
        ),
    }
}

const LAYOUT: KvLayout = KvLayout {
    layers: 1,
    kv_heads: 2,
    head_dim: 8,
    page_size: 16,
    num_pages: 4,
};

/// A one-layer cache with 32 tokens reserved, and a RoPE table of 64 positions.
struct Cache<E: Ops> {
    kv: E::Kv,
    table: PageTable,
    rope: E::Rope,
}

fn cache<E: Ops>(ex: &mut E) -> kvsieve::Result<Cache<E>> {
    let mut alloc = PageAllocator::new(&LAYOUT);
    let mut table = alloc.new_sequence();
    alloc.reserve(&mut table, 32)?;
    table.len = 32;
    let rope = ex.rope_table(&RopeConfig {
        head_dim: 8,
        theta: 10000.0,
        scaling: None,
        max_positions: 64,
    })?;
    Ok(Cache {
        kv: ex.kv_cache(&LAYOUT)?,
        table,
        rope,
    })
}

impl<E: Ops> Cache<E> {
    fn view(&self, layer: usize) -> KvView<'_, E> {
        KvView::new(&self.kv, layer, &self.table, &self.rope)
    }
}

/// A list of 2 sinks, `n_sel` selected and a window from `tail_start` to `end`.
fn list<I>(sel: &I, n_sel: usize, tail_start: usize, end: usize) -> KeyList<'_, I> {
    KeyList {
        n_init: 2,
        selected: sel,
        n_selected: n_sel,
        tail_start,
        tail_len: end - tail_start,
        compact: false,
        selection: Selection::Shared,
    }
}

fn h(n: usize) -> Vec<f16> {
    vec![f16::from_f32(0.5); n]
}

/// One op call with bad shapes.
type Case<E> = Box<dyn Fn(&mut E) -> kvsieve::Result<()>>;

/// Bad-shape cases, generic over the executor.
/// `sample` with a draw at `temperature` and uniform `u`.
fn sample_case<E: Ops>(temperature: f32, u: f32) -> Case<E> {
    Box::new(move |ex: &mut E| {
        let x = ex.tensor(1, 128)?;
        let mut out = ex.ids(&[0])?;
        let draw = kvsieve::sampling::Draw {
            top_k: 8,
            temperature,
            top_p: 1.0,
            u,
        };
        ex.sample(&x, &mut out, &draw)
    })
}

fn cases<E: Ops>() -> Vec<(&'static str, Case<E>)> {
    vec![
        (
            "matmul inner dims",
            Box::new(|ex: &mut E| {
                let (x, w) = (ex.tensor(2, 8)?, ex.weight(&h(3 * 12), 3, 12)?);
                let mut y = ex.tensor(2, 3)?;
                ex.matmul(&x, &w, &mut y)
            }),
        ),
        (
            "matmul in-dim not a multiple of 4",
            Box::new(|ex: &mut E| {
                let (x, w) = (ex.tensor(2, 6)?, ex.weight(&h(3 * 6), 3, 6)?);
                let mut y = ex.tensor(2, 3)?;
                ex.matmul(&x, &w, &mut y)
            }),
        ),
        (
            "matmul output shape",
            Box::new(|ex: &mut E| {
                let (x, w) = (ex.tensor(2, 8)?, ex.weight(&h(3 * 8), 3, 8)?);
                let mut y = ex.tensor(2, 4)?;
                ex.matmul(&x, &w, &mut y)
            }),
        ),
        (
            "set_ids length",
            Box::new(|ex: &mut E| {
                let mut ids = ex.ids(&[1, 2, 3])?;
                ex.set_ids(&mut ids, &[4, 5])
            }),
        ),
        (
            "matmul_then output shape",
            Box::new(|ex: &mut E| {
                let (x, w) = (ex.tensor(2, 8)?, ex.weight(&h(3 * 8), 3, 8)?);
                let mut y = ex.tensor(2, 4)?;
                ex.matmul_then(&x, &w, &mut y, kvsieve::ops::Epilogue::Add)
            }),
        ),
        (
            "norm_matmul_then norm width",
            Box::new(|ex: &mut E| {
                let (x, w) = (ex.tensor(2, 8)?, ex.weight(&h(3 * 8), 3, 8)?);
                let g = ex.weight(&h(4), 1, 4)?;
                let mut y = ex.tensor(2, 3)?;
                ex.norm_matmul_then(&x, &g, 1e-5, &w, &mut y, kvsieve::ops::Epilogue::Store)
            }),
        ),
        (
            "norm_matmul_then eps",
            Box::new(|ex: &mut E| {
                let (x, w) = (ex.tensor(2, 8)?, ex.weight(&h(3 * 8), 3, 8)?);
                let g = ex.weight(&h(8), 1, 8)?;
                let mut y = ex.tensor(2, 3)?;
                ex.norm_matmul_then(&x, &g, f32::NAN, &w, &mut y, kvsieve::ops::Epilogue::Store)
            }),
        ),
        (
            "matmul_then SwiGLU pairs of an odd row count",
            Box::new(|ex: &mut E| {
                let (x, w) = (ex.tensor(2, 8)?, ex.weight(&h(3 * 8), 3, 8)?);
                let mut y = ex.tensor(2, 1)?;
                ex.matmul_then(&x, &w, &mut y, kvsieve::ops::Epilogue::SwigluPairs)
            }),
        ),
        (
            "matmul_parts widths",
            Box::new(|ex: &mut E| {
                let (x, w) = (ex.tensor(2, 8)?, ex.weight(&h(12 * 8), 12, 8)?);
                let (mut a, mut b, mut c) = (ex.tensor(2, 4)?, ex.tensor(2, 4)?, ex.tensor(2, 2)?);
                ex.matmul_parts(&x, None, &w, [&mut a, &mut b, &mut c])
            }),
        ),
        (
            "matmul_parts rows",
            Box::new(|ex: &mut E| {
                let (x, w) = (ex.tensor(2, 8)?, ex.weight(&h(12 * 8), 12, 8)?);
                let (mut a, mut b, mut c) = (ex.tensor(2, 4)?, ex.tensor(1, 4)?, ex.tensor(2, 4)?);
                ex.matmul_parts(&x, None, &w, [&mut a, &mut b, &mut c])
            }),
        ),
        (
            "matmul_parts norm width",
            Box::new(|ex: &mut E| {
                let (x, w) = (ex.tensor(2, 8)?, ex.weight(&h(12 * 8), 12, 8)?);
                let g = ex.weight(&h(4), 1, 4)?;
                let (mut a, mut b, mut c) = (ex.tensor(2, 4)?, ex.tensor(2, 4)?, ex.tensor(2, 4)?);
                ex.matmul_parts(&x, Some((&g, 1e-5)), &w, [&mut a, &mut b, &mut c])
            }),
        ),
        (
            "weight odd columns",
            Box::new(|ex: &mut E| ex.weight(&h(3 * 5), 3, 5).map(|_| ())),
        ),
        (
            "weight value count",
            Box::new(|ex: &mut E| ex.weight(&h(7), 2, 4).map(|_| ())),
        ),
        (
            "weight_raw ragged blocks",
            Box::new(|ex: &mut E| ex.weight_raw(DType::Q4_0, &[0; 36], 2, 48).map(|_| ())),
        ),
        (
            "weight_raw byte count",
            Box::new(|ex: &mut E| ex.weight_raw(DType::Q4_K, &[0; 200], 1, 256).map(|_| ())),
        ),
        (
            "ts_vote zero heads",
            Box::new(|ex: &mut E| {
                let s = ex.tensor(4, 64)?;
                let mut y = ex.tensor(1, 64)?;
                ex.ts_vote(&s, 0, 64, &mut y, None)
            }),
        ),
        (
            "ts_vote scores too small",
            Box::new(|ex: &mut E| {
                let s = ex.tensor(4, 64)?;
                let mut y = ex.tensor(1, 64)?;
                ex.ts_vote(&s, 8, 64, &mut y, None)
            }),
        ),
        (
            "rms_norm weight width",
            Box::new(|ex: &mut E| {
                let (x, w) = (ex.tensor(2, 8)?, ex.weight(&h(6), 1, 6)?);
                let mut y = ex.tensor(2, 8)?;
                ex.rms_norm(&x, &w, 1e-5, &mut y)
            }),
        ),
        (
            "add shapes",
            Box::new(|ex: &mut E| {
                let x = ex.tensor(2, 8)?;
                let mut y = ex.tensor(3, 8)?;
                ex.add(&mut y, &x)
            }),
        ),
        (
            "copy_rows past the end",
            Box::new(|ex: &mut E| {
                let x = ex.tensor(2, 8)?;
                let mut y = ex.tensor(2, 8)?;
                ex.copy_rows(&x, 1, &mut y, 0, 2)
            }),
        ),
        (
            "upload value count",
            Box::new(|ex: &mut E| ex.upload(&[1.0; 5], 2, 3).map(|_| ())),
        ),
        (
            "rope_table odd head dim",
            Box::new(|ex: &mut E| {
                let cfg = RopeConfig {
                    head_dim: 7,
                    theta: 10000.0,
                    scaling: None,
                    max_positions: 8,
                };
                ex.rope_table(&cfg).map(|_| ())
            }),
        ),
        (
            "rope positions too few",
            Box::new(|ex: &mut E| {
                let c = cache(ex)?;
                let mut x = ex.tensor(3, 16)?;
                let pos = ex.ids(&[0, 1])?;
                ex.rope(&mut x, 2, &pos, &c.rope)
            }),
        ),
        (
            "swiglu shapes",
            Box::new(|ex: &mut E| {
                let x = ex.tensor(2, 8)?;
                let mut y = ex.tensor(2, 4)?;
                ex.swiglu(&mut y, &x)
            }),
        ),
        (
            "embed output rows",
            Box::new(|ex: &mut E| {
                let (ids, t) = (ex.ids(&[0, 1, 2])?, ex.weight(&h(4 * 8), 4, 8)?);
                let mut out = ex.tensor(2, 8)?;
                ex.embed(&ids, &t, &mut out)
            }),
        ),
        (
            "add_bias width",
            Box::new(|ex: &mut E| {
                let b = ex.weight(&h(6), 1, 6)?;
                let mut x = ex.tensor(2, 8)?;
                ex.add_bias(&mut x, &b)
            }),
        ),
        (
            "mean_rows range",
            Box::new(|ex: &mut E| {
                let x = ex.tensor(2, 8)?;
                let mut y = ex.tensor(1, 8)?;
                ex.mean_rows(&x, 1..3, &mut y)
            }),
        ),
        (
            "argmax outputs",
            Box::new(|ex: &mut E| {
                let x = ex.tensor(3, 8)?;
                let mut ids = ex.ids(&[0, 0])?;
                ex.argmax(&x, &mut ids)
            }),
        ),
        (
            "penalize zero penalty",
            Box::new(|ex: &mut E| {
                let mut x = ex.tensor(1, 8)?;
                ex.penalize(&mut x, &[1, 2], 0.0)
            }),
        ),
        (
            "top_k over 64",
            Box::new(|ex: &mut E| {
                let x = ex.tensor(1, 128)?;
                ex.top_k(&x, 65).map(|_| ())
            }),
        ),
        ("sample draw outside [0, 1)", sample_case(1.0, 1.0)),
        ("sample zero temperature", sample_case(0.0, 0.5)),
        (
            "kv_cache head dim",
            Box::new(|ex: &mut E| {
                let bad = KvLayout {
                    head_dim: 12,
                    ..LAYOUT
                };
                ex.kv_cache(&bad).map(|_| ())
            }),
        ),
        (
            "kv_append width",
            Box::new(|ex: &mut E| {
                let mut c = cache(ex)?;
                let (k, v) = (ex.tensor(4, 8)?, ex.tensor(4, 8)?);
                ex.kv_append(&mut c.kv, 0, &c.table, 0, &k, &v)
            }),
        ),
        (
            "kv_append_rope query rows",
            Box::new(|ex: &mut E| {
                let mut c = cache(ex)?;
                let (k, v) = (ex.tensor(4, 2 * 8)?, ex.tensor(4, 2 * 8)?);
                let (mut q, pos) = (ex.tensor(3, 4 * 8)?, ex.ids(&[0, 1, 2, 3])?);
                let (kv, t, r) = (&mut c.kv, &c.table, &c.rope);
                ex.kv_append_rope(kv, 0, t, 0, &k, &v, &mut q, 4, &pos, r)
            }),
        ),
        (
            "kv_move outside the pages",
            Box::new(|ex: &mut E| {
                let mut c = cache(ex)?;
                ex.kv_move(&mut c.kv, &c.table, &[(1, 40)])
            }),
        ),
        (
            "attention_prefill layer",
            Box::new(|ex: &mut E| {
                let c = cache(ex)?;
                let q = ex.tensor(4, 32)?;
                let mut out = ex.tensor(4, 32)?;
                ex.attention_prefill(&q, &c.view(1), 0, 8, &mut out)
            }),
        ),
        (
            "attention_decode two rows",
            Box::new(|ex: &mut E| {
                let c = cache(ex)?;
                let q = ex.tensor(2, 32)?;
                let mut out = ex.tensor(2, 32)?;
                ex.attention_decode(&q, &c.view(0), 8, &mut out)
            }),
        ),
        (
            "attention_decode_list window",
            Box::new(|ex: &mut E| {
                let c = cache(ex)?;
                let (q, sel) = (ex.tensor(1, 32)?, ex.ids(&[4, 5])?);
                let mut out = ex.tensor(1, 32)?;
                let l = list(&sel, 2, 10, 19);
                ex.attention_decode_list(&q, &c.view(0), 20, &l, &mut out)
            }),
        ),
        (
            "attention_prefill_list selected over capacity",
            Box::new(|ex: &mut E| {
                let c = cache(ex)?;
                let (q, sel) = (ex.tensor(4, 32)?, ex.ids(&[4, 5])?);
                let mut out = ex.tensor(4, 32)?;
                let l = list(&sel, 3, 10, 20);
                ex.attention_prefill_list(&q, &c.view(0), 0..4, 16, &l, &mut out)
            }),
        ),
        (
            "attention_tree mask words",
            Box::new(|ex: &mut E| {
                let c = cache(ex)?;
                let (q, mask) = (ex.tensor(3, 32)?, ex.ids(&[0; 10])?);
                let mut out = ex.tensor(3, 32)?;
                ex.attention_tree(&q, &c.view(0), 8, &mask, None, &mut out)
            }),
        ),
        (
            "ts_cache_check cache length",
            Box::new(|ex: &mut E| {
                let c = cache(ex)?;
                let fp = ex.tensor(1, 32)?;
                let mut cached = ex.tensor(1, 32)?;
                let mut gate = ex.ts_gate()?;
                let plan = SelectPlan {
                    layer: 0,
                    q_heads: 4,
                    begin: 2,
                    n: 16,
                    k: 4,
                    prefilter: None,
                };
                ex.ts_cache_check(&fp, &mut cached, 0.9, &plan, &c.view(0), &mut gate)?;
                ex.ts_gate_counts(&gate).map(|_| ())
            }),
        ),
        (
            "ts_score candidates outside the sequence",
            Box::new(|ex: &mut E| {
                let c = cache(ex)?;
                let q = ex.tensor(1, 32)?;
                let mut s = ex.tensor(4, 64)?;
                let map = GqaMap::Grouped;
                ex.ts_score(&q, &c.view(0), 30, 40, map, &mut s, None, None)
            }),
        ),
        (
            "ts_top_k k over n",
            Box::new(|ex: &mut E| {
                let v = ex.tensor(1, 16)?;
                let mut out = ex.ids(&[0; 32])?;
                ex.ts_top_k(&v, 16, 17, 0, &mut out, None, None)
            }),
        ),
        (
            "ts_top_k prefilter slots",
            Box::new(|ex: &mut E| {
                let v = ex.tensor(1, 16)?;
                let (mut out, blocks) = (ex.ids(&[0; 4])?, ex.ids(&[0, 1])?);
                let pf = Prefilter {
                    blocks: &blocks,
                    count: 2,
                    block: 4,
                };
                ex.ts_top_k(&v, 16, 4, 0, &mut out, None, Some(&pf))
            }),
        ),
        (
            "kv_grow shrinking",
            Box::new(|ex: &mut E| {
                let mut kv = ex.kv_cache(&LAYOUT)?;
                ex.kv_grow(&mut kv, LAYOUT.num_pages - 1)
            }),
        ),
        (
            "bounds_grow shrinking",
            Box::new(|ex: &mut E| {
                let mut b = ex.block_bounds(&LAYOUT, 4, true)?;
                ex.bounds_grow(&mut b, LAYOUT.num_pages - 1)
            }),
        ),
        (
            "block_bounds block size",
            Box::new(|ex: &mut E| ex.block_bounds(&LAYOUT, 3, true).map(|_| ())),
        ),
        (
            "kv_bounds tokens past the pages",
            Box::new(|ex: &mut E| {
                let c = cache(ex)?;
                let mut b = ex.block_bounds(&LAYOUT, 4, true)?;
                ex.kv_bounds(&c.view(0), &mut b, 0..40)
            }),
        ),
        (
            "block_scores spread",
            Box::new(|ex: &mut E| {
                let c = cache(ex)?;
                let b = ex.block_bounds(&LAYOUT, 4, false)?;
                let q = ex.tensor(1, 32)?;
                let mut out = ex.tensor(4, 8)?;
                ex.block_scores(&q, &b, 0, &c.table, 0..8, 1.5, &mut out, None)
            }),
        ),
        (
            "block_scores output rows",
            Box::new(|ex: &mut E| {
                let c = cache(ex)?;
                let b = ex.block_bounds(&LAYOUT, 4, false)?;
                let q = ex.tensor(1, 32)?;
                let mut out = ex.tensor(2, 8)?;
                ex.block_scores(&q, &b, 0, &c.table, 0..8, 0.5, &mut out, None)
            }),
        ),
        (
            "block_group_scores blocks past the pages",
            Box::new(|ex: &mut E| {
                let c = cache(ex)?;
                let b = ex.block_bounds(&LAYOUT, 4, true)?;
                let q = ex.tensor(1, 32)?;
                let mut out = ex.tensor(2, 16)?;
                ex.block_group_scores(&q, &b, 0, &c.table, 0..9, &mut out)
            }),
        ),
        (
            "token_scores beyond the RoPE table",
            Box::new(|ex: &mut E| {
                let mut c = cache(ex)?;
                let mut alloc = PageAllocator::new(&LAYOUT);
                c.table = alloc.new_sequence();
                alloc.reserve(&mut c.table, 64)?;
                let rope = ex.rope_table(&RopeConfig {
                    head_dim: 8,
                    theta: 10000.0,
                    scaling: None,
                    max_positions: 16,
                })?;
                let q = ex.tensor(1, 32)?;
                let mut out = ex.tensor(2, 32)?;
                let view = KvView::new(&c.kv, 0, &c.table, &rope);
                ex.token_scores(&q, &view, 32, &mut out)
            }),
        ),
        (
            "block_top_k k over n",
            Box::new(|ex: &mut E| {
                let s = ex.tensor(4, 8)?;
                let mut out = ex.ids(&[0; 32])?;
                ex.block_top_k(&s, 2, 8, 9, &mut out)
            }),
        ),
        (
            "spec_draft plan words",
            Box::new(|ex: &mut E| {
                let (adj, plan) = (ex.ids(&[0; 64])?, ex.ids(&[0; 5])?);
                let mut out = ex.ids(&[0; 2])?;
                ex.spec_draft(&adj, &plan, 2, &mut out)
            }),
        ),
        (
            "spec_adj_update adjacency size",
            Box::new(|ex: &mut E| {
                let mut adj = ex.ids(&[0; 60])?;
                let (logits, tokens) = (ex.tensor(2, 8)?, ex.ids(&[1, 2])?);
                ex.spec_adj_update(&mut adj, &logits, &tokens)
            }),
        ),
        (
            "spec_accept links",
            Box::new(|ex: &mut E| {
                let logits = ex.tensor(3, 8)?;
                let (tokens, links) = (ex.ids(&[0; 3])?, ex.ids(&[0; 4])?);
                let mut out = ex.ids(&[0; 64])?;
                let p = AcceptParams::greedy();
                ex.spec_accept(&logits, &tokens, &links, &p, 2, 1, &mut out)
            }),
        ),
    ]
}

/// Every checked op of the four families (`tensor`, `ids`, `download`,
/// `download_ids`, `ts_gate` and `ts_gate_counts` take nothing a caller can
/// get wrong; `ts_gate_counts` runs in the `ts_cache_check` case).
const CHECKED_OPS: &[&str] = &[
    "upload",
    "set_ids",
    "weight",
    "weight_raw",
    "rope_table",
    "matmul",
    "matmul_then",
    "norm_matmul_then",
    "matmul_parts",
    "rms_norm",
    "rope",
    "swiglu",
    "add",
    "embed",
    "add_bias",
    "copy_rows",
    "mean_rows",
    "argmax",
    "penalize",
    "top_k",
    "sample",
    "kv_cache",
    "kv_grow",
    "bounds_grow",
    "kv_append",
    "kv_append_rope",
    "kv_move",
    "attention_prefill",
    "attention_decode",
    "attention_decode_list",
    "attention_prefill_list",
    "attention_tree",
    "ts_cache_check",
    "ts_score",
    "ts_vote",
    "ts_top_k",
    "block_bounds",
    "kv_bounds",
    "block_scores",
    "block_group_scores",
    "token_scores",
    "block_top_k",
    "spec_draft",
    "spec_adj_update",
    "spec_accept",
];

#[test]
fn every_op_has_a_case() {
    let names: Vec<&str> = cases::<RefExecutor>()
        .iter()
        .map(|(n, _)| n.split(' ').next().unwrap())
        .collect();
    for op in CHECKED_OPS {
        assert!(names.contains(op), "no bad-input case for {op}");
    }
    // Every provided method of the family traits is listed (or exempt).
    let files = [
        include_str!("../src/ops/tensor.rs"),
        include_str!("../src/ops/kv.rs"),
        include_str!("../src/ops/selection.rs"),
        include_str!("../src/ops/speculation.rs"),
    ];
    // The trait's methods: from `pub trait` on (helpers after it are free functions).
    let src: String = files
        .iter()
        .map(|f| &f[f.find("\npub trait").expect("a family trait")..])
        .collect();
    // Readbacks take nothing to check.
    let exempt = [
        "tensor",
        "ids",
        "download",
        "download_ids",
        "read_ids_later",
        "finish_read",
        "ts_gate",
        "ts_gate_counts",
    ];
    for line in src.lines() {
        let Some(rest) = line.strip_prefix("    fn ") else {
            continue;
        };
        let name = rest.split(['(', '<']).next().unwrap();
        if name.starts_with("run_") || exempt.contains(&name) {
            continue;
        }
        assert!(CHECKED_OPS.contains(&name), "{name} is not in CHECKED_OPS");
    }
}

#[test]
fn bad_shapes_are_the_same_error_on_both_executors() {
    let mut gpu = common::gpu();
    let mut cpu = RefExecutor::new();
    let (g, c) = (cases(), cases());
    for ((name, on_gpu), (_, on_cpu)) in g.iter().zip(c.iter()) {
        let a = err(&mut gpu, name, on_gpu.as_ref());
        let b = err(&mut cpu, name, on_cpu.as_ref());
        assert_eq!(a, b, "{name}: the executors disagree");
    }
}

/// What the device reports comes back typed from the call that caused it: a
/// buffer past the adapter's limit, a submit wgpu's validation rejects (the
/// test hook), and the device's loss; after the first two the executor goes
/// on, after the loss every call says so. Runs on its own device, which it
/// destroys.
#[test]
fn device_errors_come_back_typed() {
    use kvsieve::gpu::GpuContext;
    use kvsieve::kernels::GpuExecutor;
    use std::sync::Arc;
    let ctx = Arc::new(GpuContext::new().unwrap());
    let mut ex = GpuExecutor::with_context(ctx.clone());
    let max = ctx.device.limits().max_buffer_size;
    match kvsieve::gpu::buffer::storage(&ctx.device, max + 1, "huge") {
        Err(Error::Capacity(m)) => {
            assert!(m.contains("exceeds the adapter's largest buffer"), "{m}")
        }
        other => panic!("expected a capacity error, got {other:?}"),
    }
    let x = ex.upload(&[1.0, 2.0, 3.0, 4.0], 1, 4).unwrap();
    let w = ex.weight(&[f16::ONE; 8], 2, 4).unwrap();
    let mut y = ex.tensor(1, 2).unwrap();
    ctx.poison_next_submit();
    ex.matmul(&x, &w, &mut y).unwrap();
    match ex.download(&y) {
        Err(Error::Gpu(m)) => assert!(m.contains("validation"), "{m}"),
        other => panic!("expected a validation error, got {other:?}"),
    }
    ex.matmul(&x, &w, &mut y).unwrap();
    assert_eq!(
        ex.download(&y).unwrap(),
        vec![10.0, 10.0],
        "after the error"
    );

    ctx.device.destroy();
    for _ in 0..2 {
        let r = ex.matmul(&x, &w, &mut y).and_then(|_| ex.download(&y));
        assert!(matches!(r, Err(Error::DeviceLost(_))), "{r:?}");
    }
    let r = ex.tensor(4, 4).and_then(|t| ex.download(&t));
    assert!(matches!(r, Err(Error::DeviceLost(_))), "{r:?}");
}
