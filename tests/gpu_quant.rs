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
            for &m in &row_counts(&[1, 2, 7, 16, 17, 40]) {
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

/// The fused RMSNorm prologue and epilogues (residual add, SwiGLU, SwiGLU of a
/// stacked [gate; up] weight) against the unfused reference ops, on every
/// matmul path (1 row, a few rows, prefill tiles), both kernel families, f16
/// and quantized weights, and a weight split across bindings (each chunk norms
/// x itself; stacked pairs split apart take the unfused way).
#[test]
fn matmul_prologue_and_epilogues_on_every_path_and_type() {
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
            let k = if t.block().0 == 256 { 512 } else { 576 };
            for &m in &row_counts(&[1, 3, 17, 40]) {
                for (norm, epi) in [
                    (false, Epilogue::Add),
                    (false, Epilogue::Swiglu),
                    (false, Epilogue::SwigluPairs),
                    (true, Epilogue::Store),
                    (true, Epilogue::Swiglu),
                    (true, Epilogue::SwigluPairs),
                ] {
                    seed += 1;
                    // Pairs: 2 x 19 stacked rows, 19 outputs.
                    let (n, ny) = if epi == Epilogue::SwigluPairs {
                        (38, 19)
                    } else {
                        (37, 37)
                    };
                    let raw = if t == DType::F16 {
                        let w = rand_f16(&mut rng(seed), n * k, 0.1);
                        bytemuck::cast_slice(&w).to_vec()
                    } else {
                        random_blocks(seed, t, n, k)
                    };
                    // Rows of x far from unit scale, so a missing norm shows.
                    let x = randn(&mut rng(seed + 1), m * k, if norm { 3.0 } else { 1.0 });
                    let y0 = randn(&mut rng(seed + 2), m * ny, 1.0);
                    let g: Vec<f16> = randn(&mut rng(seed + 3), k, 0.3)
                        .iter()
                        .map(|v| f16::from_f32(1.0 + v))
                        .collect();
                    let eps = 1e-5;
                    let mut cpu = RefExecutor::new();
                    let (xc, wc, gc) = (
                        cpu.upload(&x, m, k).unwrap(),
                        cpu.weight_raw(t, &raw, n, k).unwrap(),
                        cpu.weight(&g, 1, k).unwrap(),
                    );
                    let mut yc = cpu.upload(&y0, m, ny).unwrap();
                    let (xg, wg, gg) = (
                        ex.upload(&x, m, k).unwrap(),
                        ex.weight_raw(t, &raw, n, k).unwrap(),
                        ex.weight(&g, 1, k).unwrap(),
                    );
                    let mut yg = ex.upload(&y0, m, ny).unwrap();
                    if norm {
                        cpu.norm_matmul_then(&xc, &gc, eps, &wc, &mut yc, epi)
                            .unwrap();
                        // Folded into the kernels, or one norm dispatch first
                        // (CPU drivers' choice), by turns.
                        ex.tuning.fused_norm = seed % 4 != 0;
                        ex.norm_matmul_then(&xg, &gg, eps, &wg, &mut yg, epi)
                            .unwrap();
                    } else {
                        cpu.matmul_then(&xc, &wc, &mut yc, epi).unwrap();
                        ex.matmul_then(&xg, &wg, &mut yg, epi).unwrap();
                    }
                    // The matmul's tolerance, times up to |silu(y0)| ~ 4 for SwiGLU.
                    let (atol, rtol) = (2e-4 * (k as f32).sqrt(), 4e-4);
                    assert_close(
                        &format!(
                            "{t} norm={norm} fused={} {epi:?} m={m} chunks={}",
                            ex.tuning.fused_norm,
                            wg.chunks.len()
                        ),
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

/// Without the fused prologue, matmuls on the same rows share one norm dispatch
/// (q, k and v; gate and up) while nothing else is recorded between them, and
/// a norm is computed again once the rows may have changed.
#[test]
fn unfused_norm_is_shared_only_while_the_rows_stand() {
    use kvsieve::ops::Epilogue::Store;
    let mut ex = gpu();
    ex.tuning.fused_norm = false;
    let (m, n, k) = (2, 24, 64);
    let x0 = randn(&mut rng(71), m * k, 2.0);
    let dx = randn(&mut rng(72), m * k, 1.0);
    let g: Vec<f16> = (0..k)
        .map(|i| f16::from_f32(0.5 + i as f32 / k as f32))
        .collect();
    let ws: Vec<Vec<f16>> = (0..3)
        .map(|i| rand_f16(&mut rng(73 + i), n * k, 0.1))
        .collect();
    // The reference: two matmuls on x, then x += dx, then a third.
    let mut cpu = RefExecutor::new();
    let (gc, mut xc) = (
        cpu.weight(&g, 1, k).unwrap(),
        cpu.upload(&x0, m, k).unwrap(),
    );
    let dc = cpu.upload(&dx, m, k).unwrap();
    let mut want = Vec::new();
    for (i, w) in ws.iter().enumerate() {
        if i == 2 {
            cpu.add(&mut xc, &dc).unwrap();
        }
        let wc = cpu.weight(w, n, k).unwrap();
        let mut y = cpu.tensor(m, n).unwrap();
        cpu.norm_matmul_then(&xc, &gc, 1e-5, &wc, &mut y, Store)
            .unwrap();
        want.push(y.data);
    }
    let (gg, mut xg) = (ex.weight(&g, 1, k).unwrap(), ex.upload(&x0, m, k).unwrap());
    let wg: Vec<_> = ws.iter().map(|w| ex.weight(w, n, k).unwrap()).collect();
    let d = ex.upload(&dx, m, k).unwrap();
    let mut ys: Vec<_> = (0..3).map(|_| ex.tensor(m, n).unwrap()).collect();
    ex.flush().unwrap();
    let before = ex.rec.dispatch_count;
    ex.norm_matmul_then(&xg, &gg, 1e-5, &wg[0], &mut ys[0], Store)
        .unwrap();
    ex.norm_matmul_then(&xg, &gg, 1e-5, &wg[1], &mut ys[1], Store)
        .unwrap();
    assert_eq!(
        ex.rec.dispatch_count - before,
        3,
        "one norm for two matmuls"
    );
    ex.add(&mut xg, &d).unwrap();
    let before = ex.rec.dispatch_count;
    ex.norm_matmul_then(&xg, &gg, 1e-5, &wg[2], &mut ys[2], Store)
        .unwrap();
    assert_eq!(ex.rec.dispatch_count - before, 2, "x changed: normed again");
    for (i, (y, w)) in ys.iter().zip(&want).enumerate() {
        assert_close(
            &format!("matmul {i}"),
            &ex.download(y).unwrap(),
            w,
            1e-4,
            1e-4,
        );
    }
}

/// A stacked weight `[a; b; c]` whose result's columns go to three tensors (q,
/// k and v in one dispatch), with and without the norm, on every path, both
/// kernel families, and split across bindings (a chunk may straddle parts).
#[test]
fn stacked_weight_parts_on_every_path_and_type() {
    let mut split = gpu().with_binding_limit(2048);
    split.tuning.per_thread_kernels = !split.tuning.per_thread_kernels;
    let mut exs = gpu_variants();
    exs.push(gpu().with_binding_limit(2048));
    exs.push(split);
    let parts = [20, 8, 12];
    let n: usize = parts.iter().sum();
    let mut seed = 1500;
    for mut ex in exs {
        for t in [DType::F16, DType::Q4_1, DType::Q4_K, DType::Q6_K] {
            let k = if t.block().0 == 256 { 512 } else { 576 };
            for &m in &[1usize, 3, 17] {
                for norm in [false, true] {
                    seed += 1;
                    ex.tuning.fused_norm = seed % 3 != 0;
                    let raw = if t == DType::F16 {
                        bytemuck::cast_slice(&rand_f16(&mut rng(seed), n * k, 0.1)).to_vec()
                    } else {
                        random_blocks(seed, t, n, k)
                    };
                    let x = randn(&mut rng(seed + 1), m * k, 2.0);
                    let g: Vec<f16> = randn(&mut rng(seed + 2), k, 0.3)
                        .iter()
                        .map(|v| f16::from_f32(1.0 + v))
                        .collect();
                    let mut cpu = RefExecutor::new();
                    let (xc, wc, gc) = (
                        cpu.upload(&x, m, k).unwrap(),
                        cpu.weight_raw(t, &raw, n, k).unwrap(),
                        cpu.weight(&g, 1, k).unwrap(),
                    );
                    let mut yc: Vec<_> = parts.iter().map(|&c| cpu.tensor(m, c).unwrap()).collect();
                    let [a, b, c] = &mut yc[..] else {
                        unreachable!()
                    };
                    let nc = norm.then_some((&gc, 1e-5));
                    cpu.matmul_parts(&xc, nc, &wc, [a, b, c]).unwrap();
                    let (xg, wg, gg) = (
                        ex.upload(&x, m, k).unwrap(),
                        ex.weight_raw(t, &raw, n, k).unwrap(),
                        ex.weight(&g, 1, k).unwrap(),
                    );
                    let mut yg: Vec<_> = parts.iter().map(|&c| ex.tensor(m, c).unwrap()).collect();
                    let [a, b, c] = &mut yg[..] else {
                        unreachable!()
                    };
                    let ng = norm.then_some((&gg, 1e-5));
                    ex.matmul_parts(&xg, ng, &wg, [a, b, c]).unwrap();
                    for (i, (g, c)) in yg.iter().zip(&yc).enumerate() {
                        assert_close(
                            &format!(
                                "{t} norm={norm} fused={} m={m} part {i} chunks={}",
                                ex.tuning.fused_norm,
                                wg.chunks.len()
                            ),
                            &ex.download(g).unwrap(),
                            &c.data,
                            2e-4 * (k as f32).sqrt(),
                            4e-4,
                        );
                    }
                }
            }
        }
    }
}
