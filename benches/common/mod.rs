//! Timing shared by the benchmarks.

use kvsieve::attention::{KvLayout, PageAllocator, PageTable};
use kvsieve::kernels::{GpuExecutor, GpuKv, GpuRope};
use kvsieve::ops::prelude::*;
use kvsieve::ops::RopeConfig;
use std::time::{Duration, Instant};

/// Runs `record` (which records one instance of the work) `iters` times, one
/// submit each, and returns the summed GPU time (timestamps) or wall time.
pub fn timed(
    ex: &mut GpuExecutor,
    iters: u64,
    mut record: impl FnMut(&mut GpuExecutor),
) -> Duration {
    let mut total = Duration::ZERO;
    for _ in 0..iters {
        let t = Instant::now();
        record(ex);
        let r = ex.rec.submit().expect("submit");
        total += match r.gpu_ns {
            Some(ns) if ns > 0.0 => Duration::from_nanos(ns as u64),
            _ => t.elapsed(),
        };
    }
    total
}

/// A one-layer KV cache holding `len` tokens (contents irrelevant for timing).
pub struct Cache {
    pub kv: GpuKv,
    pub table: PageTable,
    pub rope: GpuRope,
}

/// Allocates a [`Cache`] of `len` tokens for `kv_heads` heads of `d` dims; fails
/// where the adapter's limits do not hold it (a 1M-position RoPE table, say).
pub fn cache(
    ex: &mut GpuExecutor,
    kv_heads: usize,
    d: usize,
    len: usize,
) -> kvsieve::Result<Cache> {
    let layout = KvLayout {
        layers: 1,
        kv_heads,
        head_dim: d,
        page_size: 64,
        num_pages: len.div_ceil(64),
    };
    let mut alloc = PageAllocator::new(&layout);
    let mut table = alloc.new_sequence();
    alloc.reserve(&mut table, len)?;
    table.len = len;
    let rope = ex.rope_table(&RopeConfig {
        head_dim: d,
        theta: 1e4,
        scaling: None,
        max_positions: len,
    })?;
    let kv = ex.kv_cache(&layout)?;
    Ok(Cache { kv, table, rope })
}
