//! Quest and TidalDecode decode steps against dense decoding, per layer, on the
//! adapter the library would choose (GPU timestamps when available), at equal
//! token budgets (2048):
//! - `quest`: the new token's block bounds, block scores summed over each KV
//!   head's query heads, per-KV-head top blocks, attention over those blocks
//!   plus the last one;
//! - `tidal_sparse`: a layer after the selection layer (attention over the
//!   chosen tokens plus the current one);
//! - `tidal_select`: the selection layer (dense attention, token scores summed
//!   over each KV head's query heads, top tokens per KV head).
//!
//! And Quest's block-sparse prefill (`sparse_prefill`): one sub-chunk of 64
//! queries at the end of the cache, dense (flash attention over every earlier
//! token) against Quest (the queries' mean, block scores, top blocks per KV
//! head, attention over those blocks plus the window: the sub-chunk and the 64
//! tokens before it).
//!
//! On CPU adapters (lavapipe) the 32/8/128 shape is skipped unless
//! `KVSIEVE_BENCH_FULL=1`.

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use kvsieve::kernels::GpuExecutor;
use kvsieve::ops::prelude::*;
use kvsieve::ops::{KeyList, Selection};
use std::time::Duration;

mod common;
use common::timed;

const BUDGET: usize = 2048;
const BLOCK: usize = 16;

fn benches(c: &mut Criterion) {
    let mut ex =
        GpuExecutor::new().unwrap_or_else(|e| panic!("benchmarks need a GPU adapter: {e}"));
    eprintln!("{}", ex.ctx.describe());
    ex.rec.enable_timestamps();
    let mut g = c.benchmark_group("sparse_decode");
    g.sample_size(10)
        .sampling_mode(criterion::SamplingMode::Flat)
        .warm_up_time(Duration::from_millis(300))
        .measurement_time(Duration::from_secs(2));
    let full = std::env::var("KVSIEVE_BENCH_FULL").is_ok_and(|v| v == "1")
        || !ex.tuning.per_thread_kernels;
    for (name, qh, kh, d) in [
        ("h9kv3d64", 9usize, 3usize, 64usize),
        ("h32kv8d128", 32, 8, 128),
    ] {
        if qh == 32 && !full {
            continue;
        }
        for len in [8192usize, 32768, 131072] {
            let cache = match common::cache(&mut ex, kh, d, len) {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("skipping {name} at {len}: {e}");
                    continue;
                }
            };
            let common::Cache { kv, table, rope } = cache;
            let q = ex.upload(&vec![0.1; qh * d], 1, qh * d).unwrap();
            let mut out = ex.tensor(1, qh * d).unwrap();
            let mut bounds = ex.block_bounds(&kv.layout, BLOCK, true).unwrap();
            ex.kv_bounds(&KvView::new(&kv, 0, &table, &rope), &mut bounds, 0..len)
                .unwrap();
            ex.flush().unwrap();
            let last = (len - 1) / BLOCK;
            let top = BUDGET / BLOCK - 1;
            let mut scores = ex.tensor(kh, len).unwrap();
            let mut group = ex.tensor(kh, last).unwrap();
            let mut blocks = ex.ids(&vec![0u32; kh * top]).unwrap();
            let mut tokens = ex.ids(&vec![0u32; kh * BUDGET]).unwrap();
            let id =
                |what: &str| BenchmarkId::new(format!("{name}/{what}"), format!("{}k", len / 1024));
            g.bench_function(id("dense"), |b| {
                b.iter_custom(|it| {
                    timed(&mut ex, it, |ex| {
                        ex.attention_decode(&q, &KvView::new(&kv, 0, &table, &rope), len, &mut out)
                            .unwrap()
                    })
                })
            });
            g.bench_function(id("quest"), |b| {
                b.iter_custom(|it| {
                    timed(&mut ex, it, |ex| {
                        ex.kv_bounds(
                            &KvView::new(&kv, 0, &table, &rope),
                            &mut bounds,
                            len - 1..len,
                        )
                        .unwrap();
                        ex.block_group_scores(&q, &bounds, 0, &table, 0..last, &mut group)
                            .unwrap();
                        ex.block_top_k(&group, kh, last, top, &mut blocks).unwrap();
                        let list = KeyList {
                            n_init: 0,
                            selected: &blocks,
                            n_selected: top * BLOCK,
                            tail_start: last * BLOCK,
                            tail_len: len - last * BLOCK,
                            compact: false,
                            selection: Selection::KvHeadBlocks(BLOCK),
                        };
                        ex.attention_decode_list(
                            &q,
                            &KvView::new(&kv, 0, &table, &rope),
                            len,
                            &list,
                            &mut out,
                        )
                        .unwrap();
                    })
                })
            });
            g.bench_function(id("tidal_sparse"), |b| {
                b.iter_custom(|it| {
                    timed(&mut ex, it, |ex| {
                        let list = KeyList {
                            n_init: 0,
                            selected: &tokens,
                            n_selected: BUDGET,
                            tail_start: len - 1,
                            tail_len: 1,
                            compact: false,
                            selection: Selection::KvHeadTokens,
                        };
                        ex.attention_decode_list(
                            &q,
                            &KvView::new(&kv, 0, &table, &rope),
                            len,
                            &list,
                            &mut out,
                        )
                        .unwrap();
                    })
                })
            });
            g.bench_function(id("tidal_select"), |b| {
                b.iter_custom(|it| {
                    timed(&mut ex, it, |ex| {
                        ex.attention_decode(&q, &KvView::new(&kv, 0, &table, &rope), len, &mut out)
                            .unwrap();
                        ex.token_scores(
                            &q,
                            &KvView::new(&kv, 0, &table, &rope),
                            len - 1,
                            &mut scores,
                        )
                        .unwrap();
                        ex.block_top_k(&scores, kh, len - 1, BUDGET, &mut tokens)
                            .unwrap();
                    })
                })
            });
        }
    }
    g.finish();
    prefill_benches(c, &mut ex);
}

const SUB: usize = 64;

fn prefill_benches(c: &mut Criterion, ex: &mut GpuExecutor) {
    let mut g = c.benchmark_group("sparse_prefill");
    g.sample_size(10)
        .sampling_mode(criterion::SamplingMode::Flat)
        .warm_up_time(Duration::from_millis(300))
        .measurement_time(Duration::from_secs(2));
    let (qh, kh, d) = (9usize, 3usize, 64usize);
    for len in [8192usize, 32768] {
        let common::Cache { kv, table, rope } = match common::cache(ex, kh, d, len) {
            Ok(c) => c,
            Err(e) => {
                eprintln!("skipping prefill at {len}: {e}");
                continue;
            }
        };
        let w = qh * d;
        let qv: Vec<f32> = (0..SUB * w)
            .map(|i| ((i * 7919) % 17) as f32 / 17.0 - 0.5)
            .collect();
        let q = ex.upload(&qv, SUB, w).unwrap();
        let mut fp = ex.tensor(1, w).unwrap();
        let mut out = ex.tensor(SUB, w).unwrap();
        let mut bounds = ex.block_bounds(&kv.layout, BLOCK, true).unwrap();
        ex.kv_bounds(&KvView::new(&kv, 0, &table, &rope), &mut bounds, 0..len)
            .unwrap();
        ex.flush().unwrap();
        let q_start = len - SUB;
        // The window: the sub-chunk and the SUB tokens before it.
        let before = (q_start - SUB) / BLOCK;
        let top = BUDGET / BLOCK - 1;
        let mut scores = ex.tensor(kh, before).unwrap();
        let mut blocks = ex.ids(&vec![0u32; kh * top]).unwrap();
        let id =
            |what: &str| BenchmarkId::new(format!("h9kv3d64/{what}"), format!("{}k", len / 1024));
        g.bench_function(id("dense"), |b| {
            b.iter_custom(|it| {
                timed(ex, it, |ex| {
                    ex.attention_prefill(
                        &q,
                        &KvView::new(&kv, 0, &table, &rope),
                        q_start,
                        len,
                        &mut out,
                    )
                    .unwrap()
                })
            })
        });
        g.bench_function(id("quest"), |b| {
            b.iter_custom(|it| {
                timed(ex, it, |ex| {
                    ex.mean_rows(&q, 0..SUB, &mut fp).unwrap();
                    ex.block_group_scores(&fp, &bounds, 0, &table, 0..before, &mut scores)
                        .unwrap();
                    ex.block_top_k(&scores, kh, before, top, &mut blocks)
                        .unwrap();
                    let list = KeyList {
                        n_init: 0,
                        selected: &blocks,
                        n_selected: top * BLOCK,
                        tail_start: before * BLOCK,
                        tail_len: len - before * BLOCK,
                        compact: false,
                        selection: Selection::KvHeadBlocks(BLOCK),
                    };
                    ex.attention_prefill_list(
                        &q,
                        &KvView::new(&kv, 0, &table, &rope),
                        0..SUB,
                        q_start,
                        &list,
                        &mut out,
                    )
                    .unwrap();
                })
            })
        });
    }
    g.finish();
}

criterion_group!(block_sparse, benches);
criterion_main!(block_sparse);
