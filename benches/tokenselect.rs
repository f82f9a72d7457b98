//! TokenSelect vs dense attention, per layer, on the adapter the library would
//! choose. Decode step: a Selection Cache miss (score + vote + top-k + sparse
//! attention), a hit (cache check + sparse attention), and the selection alone;
//! the same miss and selection for hierarchical TokenSelect (block bounds'
//! soft vote keeps PREFILTER_BLOCKS blocks of BLOCK tokens, then the token vote
//! over only those).
//! Prefill: one 512-query chunk at the end of the context, dense flash attention
//! vs TokenSelect (sub-chunk mean, score + vote + top-k, sparse flash attention),
//! and the selection alone. Times from GPU timestamps when available.
//!
//! On CPU adapters (lavapipe) the prefill group runs 8K only, since one dense
//! 512-query chunk at 128K takes over a minute there; `KVSIEVE_BENCH_FULL=1` runs
//! 8K to 128K for both shapes and adds a 1M-token decode step for the small one.
//! Real GPUs run everything, including a 1M-token prefill chunk.

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use kvsieve::attention::PageTable;
use kvsieve::kernels::{GpuBounds, GpuExecutor, GpuIds, GpuKv, GpuRope, GpuTensor};
use kvsieve::ops::prelude::*;
use kvsieve::ops::{GqaMap, KeyList, Prefilter, SelectPlan, Selection};
use std::time::Duration;

mod common;
use common::timed;

struct Setup {
    kv: GpuKv,
    table: PageTable,
    rope: GpuRope,
    q: GpuTensor,
    out: GpuTensor,
    scores: GpuTensor,
    votes: GpuTensor,
    sel: GpuIds,
    cached: GpuTensor,
    /// A prefill chunk of CHUNK queries, its output and its mean fingerprint.
    qp: GpuTensor,
    outp: GpuTensor,
    fp: GpuTensor,
    /// Unrotated key bounds and the hierarchical selection's blocks.
    bounds: GpuBounds,
    blocks: GpuIds,
}

const K: usize = 2048;
const N_INIT: usize = 128;
const N_LOCAL: usize = 512;
const CHUNK: usize = 512;
const BLOCK: usize = 16;
/// Blocks the hierarchical selection keeps: 4096 tokens, twice k.
const PREFILTER_BLOCKS: usize = 256;

/// Deterministic values in [-0.5, 0.5) (the contents only steer the top-k).
fn noise(n: usize, seed: u32) -> Vec<f32> {
    let mut x = seed.wrapping_mul(2654435761) | 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            (x >> 8) as f32 / (1u32 << 24) as f32 - 0.5
        })
        .collect()
}

fn setup(
    ex: &mut GpuExecutor,
    qh: usize,
    kh: usize,
    d: usize,
    len: usize,
) -> kvsieve::Result<Setup> {
    let common::Cache { kv, table, rope } = common::cache(ex, kh, d, len)?;
    let q = ex.upload(&vec![0.1; qh * d], 1, qh * d).unwrap();
    let out = ex.tensor(1, qh * d).unwrap();
    let n = len - N_INIT - N_LOCAL;
    let scores = ex.tensor(qh, n).unwrap();
    let votes = ex.tensor(1, n).unwrap();
    let sel: Vec<u32> = (0..K as u32)
        .map(|i| N_INIT as u32 + i * (n as u32 / K as u32))
        .collect();
    let sel = ex.ids(&sel).unwrap();
    // A valid cached fingerprint equal to q: every check hits.
    let mut c = vec![0.1f32; qh * d];
    c.push(1.0);
    let cached = ex.upload(&c, 1, qh * d + 1).unwrap();
    let qp = ex.upload(&noise(CHUNK * qh * d, 7), CHUNK, qh * d).unwrap();
    let outp = ex.tensor(CHUNK, qh * d).unwrap();
    let fp = ex.tensor(1, qh * d).unwrap();
    let mut bounds = ex.block_bounds(&kv.layout, BLOCK, false)?;
    ex.kv_bounds(&KvView::new(&kv, 0, &table, &rope), &mut bounds, 0..len)?;
    let blocks = ex.ids(&vec![0u32; PREFILTER_BLOCKS])?;
    Ok(Setup {
        kv,
        table,
        rope,
        q,
        out,
        scores,
        votes,
        sel,
        cached,
        qp,
        outp,
        fp,
        bounds,
        blocks,
    })
}

/// The setup, or None (with the reason on stderr) where the adapter cannot hold it.
fn try_setup(ex: &mut GpuExecutor, qh: usize, kh: usize, d: usize, len: usize) -> Option<Setup> {
    setup(ex, qh, kh, d, len)
        .map_err(|e| eprintln!("skipping {qh}/{kh}/{d} at {len} tokens: {e}"))
        .ok()
}

fn sparse_attention(ex: &mut GpuExecutor, s: &mut Setup, len: usize) {
    let list = KeyList {
        n_init: N_INIT,
        selected: &s.sel,
        n_selected: K,
        tail_start: len - N_LOCAL,
        tail_len: N_LOCAL,
        compact: true,
        selection: Selection::Shared,
    };
    ex.attention_decode_list(
        &s.q,
        &KvView::new(&s.kv, 0, &s.table, &s.rope),
        len,
        &list,
        &mut s.out,
    )
    .unwrap();
}

fn selection(
    ex: &mut GpuExecutor,
    s: &mut Setup,
    qh: usize,
    len: usize,
    gate: Option<&kvsieve::kernels::GpuGate>,
) {
    let n = len - N_INIT - N_LOCAL;
    ex.ts_score(
        &s.q,
        &KvView::new(&s.kv, 0, &s.table, &s.rope),
        N_INIT,
        n,
        GqaMap::Grouped,
        &mut s.scores,
        gate,
        None,
    )
    .unwrap();
    ex.ts_vote(&s.scores, qh, n, &mut s.votes, gate).unwrap();
    let mut sel = s.sel.clone();
    ex.ts_top_k(&s.votes, n, K, N_INIT, &mut sel, gate, None)
        .unwrap();
}

/// Hierarchical selection (as the policy runs it on a miss): block scores from
/// the bounds, their soft vote, the top blocks, then score, vote and top-k over
/// those blocks' tokens.
/// The default `TokenSelectConfig::prefilter_spread`.
const SPREAD: f32 = 0.25;

fn hierarchical_selection(ex: &mut GpuExecutor, s: &mut Setup, qh: usize, len: usize) {
    let n = len - N_INIT - N_LOCAL;
    let blocks = N_INIT / BLOCK..(N_INIT + n).div_ceil(BLOCK);
    let nb = blocks.len();
    ex.block_scores(
        &s.q,
        &s.bounds,
        0,
        &s.table,
        blocks.clone(),
        SPREAD,
        &mut s.scores,
        None,
    )
    .unwrap();
    ex.ts_vote(&s.scores, qh, nb, &mut s.votes, None).unwrap();
    ex.ts_top_k(
        &s.votes,
        nb,
        PREFILTER_BLOCKS,
        blocks.start,
        &mut s.blocks,
        None,
        None,
    )
    .unwrap();
    let pf = Prefilter {
        blocks: &s.blocks,
        count: PREFILTER_BLOCKS,
        block: BLOCK,
    };
    ex.ts_score(
        &s.q,
        &KvView::new(&s.kv, 0, &s.table, &s.rope),
        N_INIT,
        n,
        GqaMap::Grouped,
        &mut s.scores,
        None,
        Some(&pf),
    )
    .unwrap();
    ex.ts_vote(&s.scores, qh, pf.slots(), &mut s.votes, None)
        .unwrap();
    let mut sel = s.sel.clone();
    ex.ts_top_k(&s.votes, pf.slots(), K, N_INIT, &mut sel, None, Some(&pf))
        .unwrap();
}

/// Selection for a prefill chunk at the end of `len` tokens: the chunk's mean query
/// against the candidates before its local window.
fn prefill_selection(ex: &mut GpuExecutor, s: &mut Setup, qh: usize, len: usize) {
    let q_start = len - CHUNK;
    let n = q_start + 1 - N_INIT - N_LOCAL;
    ex.mean_rows(&s.qp, 0..CHUNK, &mut s.fp).unwrap();
    ex.ts_score(
        &s.fp,
        &KvView::new(&s.kv, 0, &s.table, &s.rope),
        N_INIT,
        n,
        GqaMap::Grouped,
        &mut s.scores,
        None,
        None,
    )
    .unwrap();
    ex.ts_vote(&s.scores, qh, n, &mut s.votes, None).unwrap();
    let mut sel = s.sel.clone();
    ex.ts_top_k(&s.votes, n, K, N_INIT, &mut sel, None, None)
        .unwrap();
}

fn prefill_sparse_attention(ex: &mut GpuExecutor, s: &mut Setup, len: usize) {
    let q_start = len - CHUNK;
    let list = KeyList {
        n_init: N_INIT,
        selected: &s.sel,
        n_selected: K,
        tail_start: q_start + 1 - N_LOCAL,
        tail_len: N_LOCAL - 1 + CHUNK,
        compact: true,
        selection: Selection::Shared,
    };
    ex.attention_prefill_list(
        &s.qp,
        &KvView::new(&s.kv, 0, &s.table, &s.rope),
        0..CHUNK,
        q_start,
        &list,
        &mut s.outp,
    )
    .unwrap();
}

fn prefill_benches(c: &mut Criterion) {
    let mut ex =
        GpuExecutor::new().unwrap_or_else(|e| panic!("benchmarks need a GPU adapter: {e}"));
    ex.rec.enable_timestamps();
    let full = std::env::var("KVSIEVE_BENCH_FULL").is_ok_and(|v| v == "1")
        || !ex.tuning.per_thread_kernels;
    let mut g = c.benchmark_group("tokenselect_prefill_chunk");
    g.sample_size(10)
        .sampling_mode(criterion::SamplingMode::Flat)
        .warm_up_time(Duration::from_millis(300))
        .measurement_time(Duration::from_secs(2));
    for (name, qh, kh, d) in [
        ("h9kv3d64", 9usize, 3usize, 64usize),
        ("h32kv8d128", 32, 8, 128),
    ] {
        let mut lens = match (full, qh) {
            (true, _) => vec![8192, 32768, 131072],
            (false, 9) => vec![8192],
            _ => vec![],
        };
        if qh == 9 && !ex.tuning.per_thread_kernels {
            lens.push(1 << 20); // real GPUs only: minutes per dense chunk on CPU drivers
        }
        for len in lens {
            let Some(mut s) = try_setup(&mut ex, qh, kh, d, len) else {
                continue;
            };
            let id =
                |what: &str| BenchmarkId::new(format!("{name}/{what}"), format!("{}k", len / 1024));
            g.bench_function(id("dense"), |b| {
                b.iter_custom(|it| {
                    timed(&mut ex, it, |ex| {
                        ex.attention_prefill(
                            &s.qp,
                            &KvView::new(&s.kv, 0, &s.table, &s.rope),
                            len - CHUNK,
                            len,
                            &mut s.outp,
                        )
                        .unwrap()
                    })
                })
            });
            g.bench_function(id("selection_only"), |b| {
                b.iter_custom(|it| timed(&mut ex, it, |ex| prefill_selection(ex, &mut s, qh, len)))
            });
            g.bench_function(id("tokenselect"), |b| {
                b.iter_custom(|it| {
                    timed(&mut ex, it, |ex| {
                        prefill_selection(ex, &mut s, qh, len);
                        prefill_sparse_attention(ex, &mut s, len);
                    })
                })
            });
        }
    }
    g.finish();
}

fn benches(c: &mut Criterion) {
    let mut ex =
        GpuExecutor::new().unwrap_or_else(|e| panic!("benchmarks need a GPU adapter: {e}"));
    eprintln!("{}", ex.ctx.describe());
    ex.rec.enable_timestamps();
    let mut g = c.benchmark_group("tokenselect_decode");
    g.sample_size(10)
        .sampling_mode(criterion::SamplingMode::Flat)
        .warm_up_time(Duration::from_millis(300))
        .measurement_time(Duration::from_secs(2));
    for (name, qh, kh, d) in [
        ("h9kv3d64", 9usize, 3usize, 64usize),
        ("h32kv8d128", 32, 8, 128),
    ] {
        let full = std::env::var("KVSIEVE_BENCH_FULL").is_ok_and(|v| v == "1")
            || !ex.tuning.per_thread_kernels;
        let mut lens = vec![8192usize, 32768, 131072];
        if full && qh == 9 {
            lens.push(1 << 20); // one layer of a 1M-token cache: 768 MiB of KV
        }
        for len in lens {
            let Some(mut s) = try_setup(&mut ex, qh, kh, d, len) else {
                continue;
            };
            let id =
                |what: &str| BenchmarkId::new(format!("{name}/{what}"), format!("{}k", len / 1024));
            g.bench_function(id("dense"), |b| {
                b.iter_custom(|it| {
                    timed(&mut ex, it, |ex| {
                        ex.attention_decode(
                            &s.q,
                            &KvView::new(&s.kv, 0, &s.table, &s.rope),
                            len,
                            &mut s.out,
                        )
                        .unwrap()
                    })
                })
            });
            g.bench_function(id("selection_only"), |b| {
                b.iter_custom(|it| timed(&mut ex, it, |ex| selection(ex, &mut s, qh, len, None)))
            });
            g.bench_function(id("miss"), |b| {
                b.iter_custom(|it| {
                    timed(&mut ex, it, |ex| {
                        selection(ex, &mut s, qh, len, None);
                        sparse_attention(ex, &mut s, len);
                    })
                })
            });
            g.bench_function(id("selection_only_hierarchical"), |b| {
                b.iter_custom(|it| {
                    timed(&mut ex, it, |ex| {
                        hierarchical_selection(ex, &mut s, qh, len)
                    })
                })
            });
            g.bench_function(id("miss_hierarchical"), |b| {
                b.iter_custom(|it| {
                    timed(&mut ex, it, |ex| {
                        hierarchical_selection(ex, &mut s, qh, len);
                        sparse_attention(ex, &mut s, len);
                    })
                })
            });
            let mut gate = ex.ts_gate().unwrap();
            let plan = SelectPlan {
                layer: 0,
                q_heads: qh,
                begin: N_INIT,
                n: len - N_INIT - N_LOCAL,
                k: K,
                prefilter: None,
            };
            g.bench_function(id("hit"), |b| {
                b.iter_custom(|it| {
                    timed(&mut ex, it, |ex| {
                        ex.ts_cache_check(
                            &s.q,
                            &mut s.cached,
                            0.9,
                            &plan,
                            &KvView::new(&s.kv, 0, &s.table, &s.rope),
                            &mut gate,
                        )
                        .unwrap();
                        selection(ex, &mut s, qh, len, Some(&gate));
                        sparse_attention(ex, &mut s, len);
                    })
                })
            });
        }
    }
    g.finish();
}

criterion_group!(tokenselect, benches, prefill_benches);
criterion_main!(tokenselect);
