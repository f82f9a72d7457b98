//! Helpers shared by the integration tests.
#![allow(dead_code)]
// `!(a <= b)` treats NaN as a failure.
#![allow(clippy::neg_cmp_op_on_partial_ord)]

use half::f16;
use kvsieve::attention::{KvLayout, PageAllocator, PageTable};
use kvsieve::gpu::{AdapterRequest, GpuContext};
use kvsieve::kernels::GpuExecutor;
use kvsieve::ops::prelude::*;
use kvsieve::ops::RopeConfig;
use kvsieve::reference::{RefExecutor, RefKv};
use rand::{rngs::StdRng, Rng, SeedableRng};
use std::sync::{Arc, OnceLock};

pub mod browser;

/// The device the library would choose; a missing adapter fails the test with
/// instructions (never a silent skip). Under `KVSIEVE_BROWSER=chromium` the
/// device has exactly WebGPU's default limits and every submit runs in headless
/// Chromium's WebGPU instead ([`browser`]).
pub fn ctx() -> Arc<GpuContext> {
    static CTX: OnceLock<Arc<GpuContext>> = OnceLock::new();
    CTX.get_or_init(|| {
        let mut req = AdapterRequest::from_env().expect("adapter request");
        let in_browser = browser::requested();
        req.webgpu_limits |= in_browser;
        match GpuContext::with_request(&req) {
            Ok(mut c) => {
                eprintln!("{}", c.describe());
                if in_browser {
                    c.set_replay(browser::shared());
                }
                Arc::new(c)
            }
            Err(e) => panic!("GPU tests need an adapter: {e}"),
        }
    })
    .clone()
}

/// Row counts of a matmul check over many types and paths: every one of
/// `all` natively; in the browser, where each check is a round trip to the
/// page, the first, middle and last of them (one row, a middle count, the
/// largest), so every kernel path still runs there and the other counts run
/// natively.
pub fn row_counts(all: &[usize]) -> Vec<usize> {
    if !browser::requested() || all.len() <= 3 {
        return all.to_vec();
    }
    vec![all[0], all[all.len() / 2], all[all.len() - 1]]
}

pub fn gpu() -> GpuExecutor {
    GpuExecutor::with_context(ctx())
}

/// Both kernel families of the adapter: the cooperative (workgroup memory and
/// barriers) and the per-thread variants, whichever the tuning would pick.
pub fn gpu_variants() -> Vec<GpuExecutor> {
    let a = gpu();
    let mut b = gpu();
    b.tuning.per_thread_kernels = !a.tuning.per_thread_kernels;
    vec![a, b]
}

pub fn rng(seed: u64) -> StdRng {
    StdRng::seed_from_u64(seed)
}

pub fn randn(r: &mut StdRng, n: usize, scale: f32) -> Vec<f32> {
    (0..n)
        .map(|_| (r.gen::<f32>() * 2.0 - 1.0) * scale)
        .collect()
}

pub fn rand_f16(r: &mut StdRng, n: usize, scale: f32) -> Vec<f16> {
    randn(r, n, scale).into_iter().map(f16::from_f32).collect()
}

/// Asserts |a - b| <= atol + rtol * |b| elementwise, reporting the worst element.
pub fn assert_close(what: &str, got: &[f32], want: &[f32], atol: f32, rtol: f32) {
    assert_eq!(got.len(), want.len(), "{what}: lengths differ");
    let mut worst = (0usize, 0.0f32);
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        let err = (g - w).abs();
        let excess = err - (atol + rtol * w.abs());
        if !(excess <= worst.1) || g.is_nan() {
            worst = (i, if g.is_nan() { f32::INFINITY } else { excess });
        }
    }
    if worst.1 > 0.0 {
        let bad: Vec<usize> = got
            .iter()
            .zip(want)
            .enumerate()
            .filter(|(_, (g, w))| !((*g - *w).abs() <= atol + rtol * w.abs()))
            .map(|(i, _)| i)
            .collect();
        eprintln!(
            "{what}: {} of {} elements out of tolerance, first {:?}",
            bad.len(),
            got.len(),
            &bad[..bad.len().min(16)]
        );
        eprintln!(
            "got  {:?}\nwant {:?}",
            &got[..got.len().min(8)],
            &want[..want.len().min(8)]
        );
        let i = worst.0;
        panic!(
            "{what}: element {i} got {} want {} (atol {atol}, rtol {rtol})",
            got[i], want[i]
        );
    }
}

/// A one-layer KV cache filled with the same random keys and values on both
/// executors.
pub struct Fixture {
    pub cpu: RefExecutor,
    pub kvc: RefKv,
    pub kvg: kvsieve::kernels::GpuKv,
    pub table: PageTable,
    pub layout: KvLayout,
    /// RoPE tables for `len` positions.
    pub ropec: kvsieve::reference::RefRope,
    pub ropeg: kvsieve::kernels::GpuRope,
}

pub fn fill(ex: &mut GpuExecutor, kv_heads: usize, d: usize, len: usize, seed: u64) -> Fixture {
    let mut r = rng(seed);
    let layout = KvLayout {
        layers: 1,
        kv_heads,
        head_dim: d,
        page_size: 64,
        num_pages: len.div_ceil(64) + 1,
    };
    let mut cpu = RefExecutor::new();
    let mut alloc = PageAllocator::new(&layout);
    let mut table = alloc.new_sequence();
    alloc.reserve(&mut table, len).unwrap();
    table.len = len;
    let mut kvc = cpu.kv_cache(&layout).unwrap();
    let mut kvg = ex.kv_cache(&layout).unwrap();
    let mut start = 0;
    while start < len {
        let n = 16384.min(len - start);
        let k = randn(&mut r, n * kv_heads * d, 1.0);
        let v = randn(&mut r, n * kv_heads * d, 1.0);
        let (kc, vc) = (
            cpu.upload(&k, n, kv_heads * d).unwrap(),
            cpu.upload(&v, n, kv_heads * d).unwrap(),
        );
        cpu.kv_append(&mut kvc, 0, &table, start, &kc, &vc).unwrap();
        let (kg, vg) = (
            ex.upload(&k, n, kv_heads * d).unwrap(),
            ex.upload(&v, n, kv_heads * d).unwrap(),
        );
        ex.kv_append(&mut kvg, 0, &table, start, &kg, &vg).unwrap();
        ex.flush().unwrap();
        start += n;
    }
    let ropec = cpu.rope_table(&rope_cfg(d, len)).unwrap();
    let ropeg = ex.rope_table(&rope_cfg(d, len)).unwrap();
    Fixture {
        cpu,
        kvc,
        kvg,
        table,
        layout,
        ropec,
        ropeg,
    }
}

/// Plain RoPE (theta 10000) for `len` positions of `d` dims.
pub fn rope_cfg(d: usize, len: usize) -> RopeConfig {
    RopeConfig {
        head_dim: d,
        theta: 10000.0,
        scaling: None,
        max_positions: len,
    }
}
