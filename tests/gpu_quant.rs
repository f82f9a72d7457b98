//! Quantized weights: every type the GPU keeps quantized, through every matmul
//! path (1 row, 2..16 rows, prefill tiles) and the embedding gather, against the
//! reference executor (ggml's dequantization, then f32 dot products), with
//! ragged row counts, the legacy types' inner sizes 576 and 1536, the K types'
//! 2048 and 14336, and tensors split across bindings.

mod common;

use common::*;
use half::f16;
use kvsieve::kernels::GpuExecutor;
use kvsieve::ops::prelude::*;
use kvsieve::quant::DType;
use kvsieve::reference::RefExecutor;
use rand::Rng;

/// `rows` rows of `cols` random values of `t`: random bits with finite scales.
fn random_blocks(seed: u64, t: DType, rows: usize, cols: usize) -> Vec<u8> {
    let mut r = rng(seed);
    let (per, bytes) = t.block();
    let n = rows * cols / per;
    let mut raw: Vec<u8> = (0..n * bytes).map(|_| r.gen()).collect();
    // K types multiply by 6-bit sub-block scales too: keep their weights near the legacy ones.
    let amp = if per == 256 { 0.004 } else { 0.1 };
    let mut scale = |b: &mut [u8]| {
        b.copy_from_slice(&f16::from_f32((r.gen::<f32>() - 0.5) * amp).to_le_bytes())
    };
    for b in raw.chunks_exact_mut(bytes) {
        match t {
            DType::Q6_K => scale(&mut b[208..210]),
            DType::Q4_1 | DType::Q5_1 | DType::Q4_K | DType::Q5_K => {
                scale(&mut b[0..2]);
                scale(&mut b[2..4]);
            }
            _ => scale(&mut b[0..2]),
        }
    }
    raw
}

fn check(ex: &mut GpuExecutor, t: DType, m: usize, n: usize, k: usize, seed: u64) {
    let raw = random_blocks(seed, t, n, k);
    let x = randn(&mut rng(seed + 1000), m * k, 1.0);
    let mut cpu = RefExecutor::new();
    let (xc, wc) = (
        cpu.upload(&x, m, k).unwrap(),
        cpu.weight_raw(t, &raw, n, k).unwrap(),
    );
    let mut yc = cpu.tensor(m, n).unwrap();
    cpu.matmul(&xc, &wc, &mut yc).unwrap();
    let (xg, wg) = (
        ex.upload(&x, m, k).unwrap(),
        ex.weight_raw(t, &raw, n, k).unwrap(),
    );
    let mut yg = ex.tensor(m, n).unwrap();
    ex.matmul(&xg, &wg, &mut yg).unwrap();
    let got = ex.download(&yg).unwrap();
    // Weights up to ~1.6 (|d| <= 0.05, |q| <= 32; K types |d sc| <= 0.13),
    // dequantized exactly, summed in f32 in another order.
    let (atol, rtol) = (5e-5 * (k as f32).sqrt(), 1e-4);
    assert_close(
        &format!("{t} matmul m={m} n={n} k={k} chunks={}", wg.chunks.len()),
        &got,
        &yc.data,
        atol,
        rtol,
    );
}

const LEGACY: [DType; 5] = [
    DType::Q8_0,
    DType::Q4_0,
    DType::Q4_1,
    DType::Q5_0,
    DType::Q5_1,
];

#[test]
fn quantized_matmul_every_type_and_path() {
    let mut seed = 1;
    for mut ex in gpu_variants() {
        for t in LEGACY {
            for &m in &[1usize, 2, 7, 16, 17, 40] {
                for &(n, k) in &[(67usize, 576usize), (13, 1536)] {
                    check(&mut ex, t, m, n, k, seed);
                    seed += 1;
                }
            }
        }
    }
}

#[test]
fn k_types_on_every_path() {
    let mut seed = 500;
    for mut ex in gpu_variants() {
        for t in [DType::Q4_K, DType::Q5_K, DType::Q6_K] {
            for &m in &[1usize, 5, 16, 20] {
                for &(n, k) in &[(9usize, 2048usize), (3, 14336)] {
                    check(&mut ex, t, m, n, k, seed);
                    seed += 1;
                }
            }
        }
    }
}

#[test]
fn per_thread_kernels_at_every_workgroup_width() {
    // The per-thread GEMVs size their workgroups (ROWS_WG 8..64) from the rows
    // and the CPU threads; with one thread, 67/130/260/520 rows take 8/16/32/64.
    let mut ex = gpu();
    ex.tuning.per_thread_kernels = true;
    ex.tuning.cpu_threads = 1;
    let mut seed = 900;
    for t in LEGACY.into_iter().chain([DType::Q4_K]) {
        let k = if t.block().0 == 256 { 512 } else { 576 };
        for n in [67usize, 130, 260, 520] {
            for m in [1usize, 2] {
                check(&mut ex, t, m, n, k, seed);
                seed += 1;
            }
        }
    }
}

#[test]
fn quantized_weight_split_across_bindings() {
    // 2 KiB bindings: a 61 x 1536 Q4_1 matrix (960 bytes a row) takes 31 chunks.
    for mut ex in [gpu().with_binding_limit(2048), {
        let mut e = gpu().with_binding_limit(2048);
        e.tuning.per_thread_kernels = !e.tuning.per_thread_kernels;
        e
    }] {
        for (i, t) in [DType::Q4_1, DType::Q8_0, DType::Q5_0, DType::Q6_K]
            .into_iter()
            .enumerate()
        {
            let w = ex
                .weight_raw(t, &random_blocks(9, t, 61, 1536), 61, 1536)
                .unwrap();
            assert!(w.chunks.len() > 1, "{t} was not split");
            for &m in &[1usize, 3, 33] {
                check(&mut ex, t, m, 61, 1536, 700 + 10 * i as u64 + m as u64);
            }
        }
    }
}

#[test]
fn quantized_embedding_gather() {
    let (vocab, hidden) = (301usize, 576usize);
    let ids: Vec<u32> = vec![0, 300, 17, 150, 17, 263, 299, 1];
    for t in LEGACY
        .into_iter()
        .chain([DType::Q4_K, DType::Q5_K, DType::Q6_K])
    {
        let hidden = if t.block().0 == 256 { 512 } else { hidden };
        let raw = random_blocks(31, t, vocab, hidden);
        let mut cpu = RefExecutor::new();
        let tc = cpu.weight_raw(t, &raw, vocab, hidden).unwrap();
        let mut oc = cpu.tensor(ids.len(), hidden).unwrap();
        cpu.embed(&ids, &tc, &mut oc).unwrap();
        for mut ex in [gpu(), gpu().with_binding_limit(4096)] {
            let tg = ex.weight_raw(t, &raw, vocab, hidden).unwrap();
            let mut og = ex.tensor(ids.len(), hidden).unwrap();
            let ig = ex.ids(&ids).unwrap();
            ex.embed(&ig, &tg, &mut og).unwrap();
            let tol = 1e-6;
            assert_close(
                &format!("{t} embedding, {} chunks", tg.chunks.len()),
                &ex.download(&og).unwrap(),
                &oc.data,
                tol,
                tol,
            );
        }
    }
}

/// The fused epilogues (residual add, SwiGLU) against the unfused reference
/// ops, on every matmul path (1 row, a few rows, prefill tiles), both kernel
/// families, f16 and quantized weights, and a weight split across bindings.
#[test]
fn matmul_epilogues_on_every_path_and_type() {
    use kvsieve::ops::Epilogue;
    let mut seed = 1200;
    let mut split = gpu().with_binding_limit(2048);
    split.tuning.per_thread_kernels = !split.tuning.per_thread_kernels;
    let mut exs = gpu_variants();
    exs.push(gpu().with_binding_limit(2048));
    exs.push(split);
    for mut ex in exs {
        for t in [
            DType::F16,
            DType::Q8_0,
            DType::Q4_1,
            DType::Q4_K,
            DType::Q6_K,
        ] {
            let (n, k) = if t.block().0 == 256 {
                (37, 512)
            } else {
                (37, 576)
            };
            for &m in &[1usize, 3, 17, 40] {
                for epi in [Epilogue::Add, Epilogue::Swiglu] {
                    seed += 1;
                    let raw = if t == DType::F16 {
                        let w = rand_f16(&mut rng(seed), n * k, 0.1);
                        bytemuck::cast_slice(&w).to_vec()
                    } else {
                        random_blocks(seed, t, n, k)
                    };
                    let x = randn(&mut rng(seed + 1), m * k, 1.0);
                    let y0 = randn(&mut rng(seed + 2), m * n, 1.0);
                    let mut cpu = RefExecutor::new();
                    let (xc, wc) = (
                        cpu.upload(&x, m, k).unwrap(),
                        cpu.weight_raw(t, &raw, n, k).unwrap(),
                    );
                    let mut yc = cpu.upload(&y0, m, n).unwrap();
                    cpu.matmul_then(&xc, &wc, &mut yc, epi).unwrap();
                    let (xg, wg) = (
                        ex.upload(&x, m, k).unwrap(),
                        ex.weight_raw(t, &raw, n, k).unwrap(),
                    );
                    let mut yg = ex.upload(&y0, m, n).unwrap();
                    ex.matmul_then(&xg, &wg, &mut yg, epi).unwrap();
                    // The matmul's tolerance, times up to |silu(y0)| ~ 4 for SwiGLU.
                    let (atol, rtol) = (2e-4 * (k as f32).sqrt(), 4e-4);
                    assert_close(
                        &format!("{t} {epi:?} m={m} chunks={}", wg.chunks.len()),
                        &ex.download(&yg).unwrap(),
                        &yc.data,
                        atol,
                        rtol,
                    );
                }
            }
        }
    }
}
