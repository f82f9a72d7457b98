//! TokenSelect vs dense decode attention, per layer-step, on the adapter the
//! library would choose: a Selection Cache miss (score + vote + top-k + sparse
//! attention), a hit (cache check + sparse attention), and the selection's share of
//! the miss. Times from GPU timestamps when available.

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use kvsieve::attention::PageTable;
use kvsieve::kernels::{GpuExecutor, GpuIds, GpuKv, GpuRope, GpuTensor};
use kvsieve::ops::{KeyList, Ops, SelectPlan};
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
}

const K: usize = 2048;
const N_INIT: usize = 128;
const N_LOCAL: usize = 512;

fn setup(ex: &mut GpuExecutor, qh: usize, kh: usize, d: usize, len: usize) -> Setup {
    let common::Cache { kv, table, rope } = common::cache(ex, kh, d, len);
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
    Setup {
        kv,
        table,
        rope,
        q,
        out,
        scores,
        votes,
        sel,
        cached,
    }
}

fn sparse_attention(ex: &mut GpuExecutor, s: &mut Setup, len: usize) {
    let list = KeyList {
        n_init: N_INIT,
        selected: &s.sel,
        n_selected: K,
        tail_start: len - N_LOCAL,
        tail_len: N_LOCAL,
        compact: true,
    };
    ex.attention_decode_list(&s.q, &s.kv, 0, &s.table, len, &list, &s.rope, &mut s.out)
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
    ex.ts_score(&s.q, &s.kv, 0, &s.table, N_INIT, n, &mut s.scores, gate)
        .unwrap();
    ex.ts_vote(&s.scores, qh, n, &mut s.votes, gate).unwrap();
    let mut sel = s.sel.clone();
    ex.ts_top_k(&s.votes, n, K, N_INIT, &mut sel, gate).unwrap();
}

fn benches(c: &mut Criterion) {
    let mut ex =
        GpuExecutor::new().unwrap_or_else(|e| panic!("benchmarks need a GPU adapter: {e}"));
    eprintln!("{}", ex.ctx.describe());
    ex.rec.enable_timestamps();
    let mut g = c.benchmark_group("tokenselect_decode");
    g.sample_size(10)
        .warm_up_time(Duration::from_millis(300))
        .measurement_time(Duration::from_secs(2));
    for (name, qh, kh, d) in [
        ("h9kv3d64", 9usize, 3usize, 64usize),
        ("h32kv8d128", 32, 8, 128),
    ] {
        for len in [8192usize, 32768, 131072] {
            let mut s = setup(&mut ex, qh, kh, d, len);
            let id =
                |what: &str| BenchmarkId::new(format!("{name}/{what}"), format!("{}k", len / 1024));
            g.bench_function(id("dense"), |b| {
                b.iter_custom(|it| {
                    timed(&mut ex, it, |ex| {
                        ex.attention_decode(&s.q, &s.kv, 0, &s.table, len, &s.rope, &mut s.out)
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
            let mut gate = ex.ts_gate().unwrap();
            let plan = SelectPlan {
                layer: 0,
                q_heads: qh,
                begin: N_INIT,
                n: len - N_INIT - N_LOCAL,
                k: K,
            };
            g.bench_function(id("hit"), |b| {
                b.iter_custom(|it| {
                    timed(&mut ex, it, |ex| {
                        ex.ts_cache_check(
                            &s.q,
                            &mut s.cached,
                            0.9,
                            &plan,
                            &s.kv,
                            &s.table,
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

criterion_group!(tokenselect, benches);
criterion_main!(tokenselect);
