//! Every GPU kernel against its CPU reference twin, on the adapter the library
//! would choose, with ragged sizes (not multiples of any tile) and with weights and
//! KV caches split across several storage bindings.

mod common;

use common::*;
use half::f16;
use kvsieve::attention::{dense_attention, KvLayout, PageAllocator};
use kvsieve::kernels::GpuExecutor;
use kvsieve::ops::prelude::*;
use kvsieve::ops::{Llama3Scaling, RopeConfig};
use kvsieve::reference::RefExecutor;
use kvsieve::Error;
use rand::Rng;

/// matmul tolerance: f32 accumulation in a different order; the error bound grows
/// with sqrt(K) * |x| * |w|, here at most ~1e-5 of the dot product's scale.
fn check_matmul(ex: &mut GpuExecutor, m: usize, n: usize, k: usize, seed: u64) {
    let mut r = rng(seed);
    let x = randn(&mut r, m * k, 1.0);
    let w = rand_f16(&mut r, n * k, 0.5);
    let mut cpu = RefExecutor::new();
    let (xc, wc) = (cpu.upload(&x, m, k).unwrap(), cpu.weight(&w, n, k).unwrap());
    let mut yc = cpu.tensor(m, n).unwrap();
    cpu.matmul(&xc, &wc, &mut yc).unwrap();
    let (xg, wg) = (ex.upload(&x, m, k).unwrap(), ex.weight(&w, n, k).unwrap());
    let mut yg = ex.tensor(m, n).unwrap();
    ex.matmul(&xg, &wg, &mut yg).unwrap();
    let got = ex.download(&yg).unwrap();
    let tol = 2e-5 * (k as f32).sqrt();
    assert_close(
        &format!("matmul m={m} n={n} k={k}"),
        &got,
        &yc.data,
        tol,
        1e-4,
    );
}

#[test]
fn matmul_all_paths_ragged() {
    let mut seed = 1;
    for mut ex in gpu_variants() {
        for &m in &[1usize, 2, 3, 7, 16, 17, 33, 70] {
            for &(n, k) in &[(1usize, 4usize), (13, 36), (130, 260), (67, 576)] {
                check_matmul(&mut ex, m, n, k, seed);
                seed += 1;
            }
        }
    }
}

#[test]
fn matmul_weight_split_across_bindings() {
    // 1 KiB bindings: a 130 x 260 f16 weight becomes 66 chunks of 2 rows.
    let mut ex = gpu().with_binding_limit(1024);
    let w = ex.weight(&vec![f16::ONE; 130 * 260], 130, 260).unwrap();
    assert!(w.chunks.len() > 1, "weight was not split");
    for (i, &m) in [1usize, 5, 40].iter().enumerate() {
        check_matmul(&mut ex, m, 130, 260, 100 + i as u64);
    }
}

#[test]
fn matmul_rejects_bad_shapes() {
    let mut ex = gpu();
    let x = ex.tensor(2, 8).unwrap();
    let w = ex.weight(&[f16::ZERO; 3 * 6], 3, 6).unwrap();
    let mut y = ex.tensor(2, 3).unwrap();
    assert!(matches!(
        ex.matmul(&x, &w, &mut y),
        Err(Error::Shape { .. })
    ));
    let x = ex.tensor(2, 6).unwrap();
    // in-dim 6 is not a multiple of 4: the GPU path says so instead of misreading.
    assert!(matches!(
        ex.matmul(&x, &w, &mut y),
        Err(Error::Shape { .. })
    ));
    assert!(matches!(
        ex.weight(&[f16::ZERO; 5], 2, 3),
        Err(Error::Shape { .. })
    ));
}

#[test]
fn rmsnorm_swiglu_add() {
    let mut ex = gpu();
    let mut cpu = RefExecutor::new();
    let mut r = rng(7);
    for &(rows, cols) in &[(1usize, 576usize), (5, 130), (33, 62)] {
        let x = randn(&mut r, rows * cols, 2.0);
        let w = rand_f16(&mut r, cols, 1.0);
        let (xc, wc) = (
            cpu.upload(&x, rows, cols).unwrap(),
            cpu.weight(&w, 1, cols).unwrap(),
        );
        let mut yc = cpu.tensor(rows, cols).unwrap();
        cpu.rms_norm(&xc, &wc, 1e-5, &mut yc).unwrap();
        let (xg, wg) = (
            ex.upload(&x, rows, cols).unwrap(),
            ex.weight(&w, 1, cols).unwrap(),
        );
        let mut yg = ex.tensor(rows, cols).unwrap();
        ex.rms_norm(&xg, &wg, 1e-5, &mut yg).unwrap();
        assert_close("rmsnorm", &ex.download(&yg).unwrap(), &yc.data, 1e-5, 1e-5);

        let u = randn(&mut r, rows * cols, 3.0);
        let (mut gc, uc) = (
            cpu.upload(&x, rows, cols).unwrap(),
            cpu.upload(&u, rows, cols).unwrap(),
        );
        cpu.swiglu(&mut gc, &uc).unwrap();
        let (mut gg, ug) = (
            ex.upload(&x, rows, cols).unwrap(),
            ex.upload(&u, rows, cols).unwrap(),
        );
        ex.swiglu(&mut gg, &ug).unwrap();
        assert_close("swiglu", &ex.download(&gg).unwrap(), &gc.data, 1e-5, 1e-5);
        cpu.add(&mut gc, &uc).unwrap();
        ex.add(&mut gg, &ug).unwrap();
        assert_close("add", &ex.download(&gg).unwrap(), &gc.data, 1e-5, 1e-5);
    }
}

#[test]
fn rope_matches_reference_with_llama3_scaling() {
    let mut ex = gpu();
    let mut cpu = RefExecutor::new();
    let mut r = rng(11);
    let scaling = Llama3Scaling {
        factor: 8.0,
        low_freq_factor: 1.0,
        high_freq_factor: 4.0,
        original_max_position_embeddings: 8192.0,
    };
    for (d, heads, rows, sc) in [
        (64usize, 9usize, 3usize, None),
        (128, 4, 5, Some(scaling)),
        (8, 2, 17, None),
    ] {
        let cfg = RopeConfig {
            head_dim: d,
            theta: 500000.0,
            scaling: sc,
            max_positions: 40000,
        };
        let x = randn(&mut r, rows * heads * d, 1.0);
        let pos: Vec<u32> = (0..rows).map(|i| (i as u32 * 7919) % 40000).collect();
        let (rc, rg) = (cpu.rope_table(&cfg).unwrap(), ex.rope_table(&cfg).unwrap());
        let mut xc = cpu.upload(&x, rows, heads * d).unwrap();
        cpu.rope(&mut xc, heads, &pos, &rc).unwrap();
        let mut xg = ex.upload(&x, rows, heads * d).unwrap();
        let pg = ex.ids(&pos).unwrap();
        ex.rope(&mut xg, heads, &pg, &rg).unwrap();
        assert_close("rope", &ex.download(&xg).unwrap(), &xc.data, 1e-6, 1e-5);
    }
}

/// RoPE at any length: the table for 2^24 positions is 13 MB
/// (a single table would be 4 GiB at head dim 64); composed (cos, sin) is
/// within 4.8e-7 of the exact angle's everywhere, and the rope op agrees
/// across executors and with f64 rotation near 2^20 and 2^24.
#[test]
fn rope_at_any_length() {
    let positions: Vec<u32> = vec![
        0, 1, 1023, 1024, 1025, 524_287, 524_288, 1_048_575, 1_048_576, 1_048_577, 1_060_921,
        16_777_215,
    ];
    let mut ex = gpu();
    let mut cpu = RefExecutor::new();
    let mut r = rng(12);
    for theta in [10000.0, 500000.0] {
        let (d, heads) = (64usize, 3usize);
        let cfg = RopeConfig {
            head_dim: d,
            theta,
            scaling: None,
            max_positions: 1 << 24,
        };
        let table = cfg.table().unwrap();
        assert_eq!(table.len(), (32768 + 1024 + 16384) * 32);
        let inv = cfg.inv_freq();
        let mut worst = 0.0f64;
        for &p in &positions {
            for (i, &f) in inv.iter().enumerate() {
                let a = p as f64 * f as f64;
                let [c, s] = kvsieve::ops::rope_at(&table, d / 2, 1 << 24, p as usize, i);
                worst = worst.max((c as f64 - a.cos()).abs().max((s as f64 - a.sin()).abs()));
            }
        }
        assert!(
            worst <= 4.8e-7,
            "theta {theta}: composed rope off by {worst}"
        );
        let rows = positions.len();
        let x = randn(&mut r, rows * heads * d, 1.0);
        let (rc, rg) = (cpu.rope_table(&cfg).unwrap(), ex.rope_table(&cfg).unwrap());
        let mut xc = cpu.upload(&x, rows, heads * d).unwrap();
        cpu.rope(&mut xc, heads, &positions, &rc).unwrap();
        let mut xg = ex.upload(&x, rows, heads * d).unwrap();
        let pg = ex.ids(&positions).unwrap();
        ex.rope(&mut xg, heads, &pg, &rg).unwrap();
        assert_close(
            "rope near 2^20 and 2^24",
            &ex.download(&xg).unwrap(),
            &xc.data,
            1e-6,
            1e-5,
        );
        let half = d / 2;
        let exact: Vec<f32> = (0..rows * heads)
            .flat_map(|rh| {
                let p = positions[rh / heads] as f64;
                let v = &x[rh * d..(rh + 1) * d];
                let mut o = vec![0.0f32; d];
                for (i, &f) in inv.iter().enumerate() {
                    let (c, s) = ((p * f as f64).cos(), (p * f as f64).sin());
                    let (lo, hi) = (v[i] as f64, v[i + half] as f64);
                    o[i] = (lo * c - hi * s) as f32;
                    o[i + half] = (hi * c + lo * s) as f32;
                }
                o
            })
            .collect();
        assert_close("rope against f64 rotation", &xc.data, &exact, 4e-6, 0.0);
    }
}

/// Decode attention over 600K keys, rotated at their positions: a flat RoPE
/// table for them would pass lavapipe's and WebGPU's 128 MiB binding.
#[test]
fn decode_attention_600k_positions() {
    let arenas = check_attention(&mut gpu(), 2, 1, 64, 600_000, 1, 64, 82);
    eprintln!("600K-key decode: {arenas} arena(s) per K/V");
}

/// Refilled id vectors take effect in recording order: two gathers through one
/// id vector, refilled between them, in a single submit.
#[test]
fn set_ids_is_ordered_with_recorded_work() {
    let mut r = rng(4);
    let (vocab, hidden) = (300usize, 40usize);
    let table = rand_f16(&mut r, vocab * hidden, 1.0);
    let (a, b): (Vec<u32>, Vec<u32>) = (vec![5, 299, 7], vec![0, 13, 250]);
    let gather = |ids: &[u32]| -> Vec<f32> {
        ids.iter()
            .flat_map(|&i| {
                table[i as usize * hidden..][..hidden]
                    .iter()
                    .map(|x| x.to_f32())
            })
            .collect()
    };
    let mut ex = gpu();
    let tg = ex.weight(&table, vocab, hidden).unwrap();
    let mut ids = ex.ids(&[1, 1, 1]).unwrap();
    let (mut oa, mut ob) = (ex.tensor(3, hidden).unwrap(), ex.tensor(3, hidden).unwrap());
    ex.set_ids(&mut ids, &a).unwrap();
    ex.embed(&ids, &tg, &mut oa).unwrap();
    ex.set_ids(&mut ids, &b).unwrap();
    ex.embed(&ids, &tg, &mut ob).unwrap();
    assert_eq!(ex.download(&oa).unwrap(), gather(&a));
    assert_eq!(ex.download(&ob).unwrap(), gather(&b));
    assert_eq!(ex.download_ids(&ids).unwrap(), b);
}

/// Decode's loop on the device: each step gathers the row of the last
/// step's argmax and takes the argmax of it, its submit left in flight with a
/// readback of the token. The tokens land in order (reads from earlier
/// submits first), a waited-for download between them carries the reads of
/// the work it submits, a read of work not submitted yet submits it, and a
/// ticket lands once.
#[test]
fn reads_land_in_order_from_submits_left_in_flight() {
    let n = 64usize;
    // Row i points at perm[i]: its only non-zero column.
    let perm: Vec<u32> = (0..n as u32).map(|i| (i * 29 + 11) % n as u32).collect();
    let mut table = vec![f16::ZERO; n * n];
    for (i, &p) in perm.iter().enumerate() {
        table[i * n + p as usize] = f16::ONE;
    }
    let mut ex = gpu();
    let tg = ex.weight(&table, n, n).unwrap();
    let mut ids = ex.ids(&[3]).unwrap();
    let mut x = ex.tensor(1, n).unwrap();
    let step = |ex: &mut GpuExecutor, ids: &mut _, x: &mut _| {
        ex.embed(ids, &tg, x).unwrap();
        ex.argmax(x, ids).unwrap();
        ex.read_ids_later(ids).unwrap()
    };
    let mut tickets = Vec::new();
    for _ in 0..5 {
        tickets.push(step(&mut ex, &mut ids, &mut x));
        ex.submit_pending().unwrap();
    }
    // Recorded, not submitted yet.
    let last = step(&mut ex, &mut ids, &mut x);
    let mut want = Vec::new();
    let mut t = 3u32;
    for _ in 0..6 {
        t = perm[t as usize];
        want.push(t);
    }
    let mut got = Vec::new();
    let mut tickets = tickets.into_iter();
    got.push(ex.finish_read(tickets.next().unwrap()).unwrap()[0]);
    // A waited-for download in between submits the sixth step too: its
    // gather is the row of the fifth token, which points at the sixth.
    let row = ex.download(&x).unwrap();
    assert_eq!(row.iter().position(|&v| v == 1.0), Some(want[5] as usize));
    for t in tickets.chain([last]) {
        got.push(ex.finish_read(t).unwrap()[0]);
    }
    assert_eq!(got, want);
    // A read whose work is recorded and not submitted submits it.
    let seventh = step(&mut ex, &mut ids, &mut x);
    assert_eq!(ex.finish_read(seventh).unwrap(), [perm[want[5] as usize]]);
    // Nothing is left in flight, and a taken read is gone.
    assert_eq!(ex.rec.in_flight(), 0);
    let again = kvsieve::ops::IdsTicket::pending(1);
    assert!(ex.finish_read(again).is_err());
}

#[test]
fn embedding_gather_split_table() {
    let mut r = rng(3);
    let (vocab, hidden) = (1000usize, 72usize);
    let table = rand_f16(&mut r, vocab * hidden, 1.0);
    let ids: Vec<u32> = vec![0, 999, 17, 500, 17, 263, 998, 1];
    let mut cpu = RefExecutor::new();
    let tc = cpu.weight(&table, vocab, hidden).unwrap();
    let mut oc = cpu.tensor(ids.len(), hidden).unwrap();
    cpu.embed(&ids, &tc, &mut oc).unwrap();
    // 4 KiB bindings split the 144 KB table into 36 chunks.
    for mut ex in [gpu(), gpu().with_binding_limit(4096)] {
        let tg = ex.weight(&table, vocab, hidden).unwrap();
        let ig = ex.ids(&ids).unwrap();
        let mut og = ex.tensor(ids.len(), hidden).unwrap();
        ex.embed(&ig, &tg, &mut og).unwrap();
        assert_eq!(
            ex.download(&og).unwrap(),
            oc.data,
            "embedding with {} chunks",
            tg.chunks.len()
        );
    }
    let mut one = cpu.tensor(1, hidden).unwrap();
    assert!(matches!(
        cpu.embed(&vec![1000], &tc, &mut one),
        Err(Error::Shape { .. })
    ));
}

#[test]
fn bias_penalty_top_k_and_copy_match_reference() {
    let mut ex = gpu();
    let mut cpu = RefExecutor::new();
    let mut r = rng(21);
    // Bias rows (Qwen2's q/k/v biases), ragged width.
    let (rows, cols) = (3usize, 132usize);
    let x = randn(&mut r, rows * cols, 2.0);
    let b = rand_f16(&mut r, cols, 1.0);
    let (mut xc, bc) = (
        cpu.upload(&x, rows, cols).unwrap(),
        cpu.weight(&b, 1, cols).unwrap(),
    );
    cpu.add_bias(&mut xc, &bc).unwrap();
    let (mut xg, bg) = (
        ex.upload(&x, rows, cols).unwrap(),
        ex.weight(&b, 1, cols).unwrap(),
    );
    ex.add_bias(&mut xg, &bg).unwrap();
    assert_close("add_bias", &ex.download(&xg).unwrap(), &xc.data, 1e-6, 1e-6);

    // Repetition penalty (positive logits divided, negative multiplied; ids past
    // the row and repeated ids as the reference treats them), then top-k over
    // more candidates than one workgroup takes (the multi-pass radix select),
    // with and without ties.
    for (vocab, ties) in [(40_000usize, false), (5_000, true)] {
        let mut logits = randn(&mut r, vocab, 4.0);
        if ties {
            // 9 distinct values: the top 64 are all ties, broken by lower id.
            logits.iter_mut().for_each(|v| *v = v.round());
        }
        let ids: Vec<u32> = vec![0, 7, 7, 123, vocab as u32 - 1, vocab as u32 + 5];
        let mut lc = cpu.upload(&logits, 1, vocab).unwrap();
        cpu.penalize(&mut lc, &ids, 1.3).unwrap();
        let mut lg = ex.upload(&logits, 1, vocab).unwrap();
        ex.penalize(&mut lg, &ids, 1.3).unwrap();
        assert_close("penalize", &ex.download(&lg).unwrap(), &lc.data, 0.0, 0.0);
        for k in [1usize, 8, 64] {
            assert_eq!(
                ex.top_k(&lg, k).unwrap(),
                cpu.top_k(&lc, k).unwrap(),
                "top_k k={k} vocab={vocab} ties={ties}"
            );
        }
    }

    // Top-k's bound pass, its edges: a flat row (every value reaches the
    // bound: the argmax rounds run instead), fewer valid values than k
    // (NaNs), fewer values than threads, and a row whose best values sit in
    // one thread's stride.
    let flat = vec![0.5f32; 3_000];
    let mut nans = vec![f32::NAN; 700];
    for i in [3, 300, 301, 699, 5] {
        nans[i] = i as f32;
    }
    let short = randn(&mut r, 100, 1.0);
    let mut strided = randn(&mut r, 4_096, 1.0);
    for i in 0..16 {
        strided[7 + 256 * i] = 10.0 + i as f32;
    }
    for row in [flat, nans, short, strided] {
        let (lc, lg) = (
            cpu.upload(&row, 1, row.len()).unwrap(),
            ex.upload(&row, 1, row.len()).unwrap(),
        );
        for k in [1usize, 8, 64] {
            if k > row.len() {
                continue;
            }
            assert_eq!(
                ex.top_k(&lg, k).unwrap(),
                cpu.top_k(&lc, k).unwrap(),
                "top_k k={k} of {} values",
                row.len()
            );
        }
    }

    // The copy kernel (the benches' bandwidth ceiling) moves bytes exactly.
    let data: Vec<u32> = (0..1024).map(|_| r.gen()).collect();
    let src =
        kvsieve::gpu::buffer::storage_init(&ex.ctx.device, bytemuck::cast_slice(&data), "src")
            .unwrap();
    let dst = kvsieve::gpu::buffer::storage(&ex.ctx.device, 4096, "dst").unwrap();
    kvsieve::kernels::copy_buffer(&mut ex, &src, &dst, 4096).unwrap();
    assert_eq!(
        ex.read_bytes(&dst, 4096).unwrap(),
        bytemuck::cast_slice::<u32, u8>(&data)
    );

    // The recorder reuses the last step's command in the same place when the
    // pipeline and bindings match: the new parameters must still apply, and
    // another buffer there must not reuse it.
    let dst = kvsieve::gpu::buffer::storage(&ex.ctx.device, 4096, "dst").unwrap();
    let bytes = |d: &[u32]| bytemuck::cast_slice::<u32, u8>(d).to_vec();
    kvsieve::kernels::copy_buffer(&mut ex, &src, &dst, 16).unwrap();
    let mut want = vec![0u32; 1024];
    want[..4].copy_from_slice(&data[..4]);
    assert_eq!(ex.read_bytes(&dst, 4096).unwrap(), bytes(&want));
    let groups = ex.rec.bind_group_count;
    kvsieve::kernels::copy_buffer(&mut ex, &src, &dst, 4096).unwrap();
    assert_eq!(ex.read_bytes(&dst, 4096).unwrap(), bytes(&data));
    assert_eq!(
        ex.rec.bind_group_count, groups,
        "the repeated step's bind group"
    );
    let other: Vec<u32> = (0..1024).map(|_| r.gen()).collect();
    let src2 =
        kvsieve::gpu::buffer::storage_init(&ex.ctx.device, bytemuck::cast_slice(&other), "src2")
            .unwrap();
    kvsieve::kernels::copy_buffer(&mut ex, &src2, &dst, 4096).unwrap();
    assert_eq!(ex.read_bytes(&dst, 4096).unwrap(), bytes(&other));
}

/// The device's pick from the top-k candidates equals the reference's (the
/// host sampler's rule) over draws that sweep [0, 1), temperatures, nucleus
/// thresholds and k, ties and NaN logits included; and the reference's draws
/// pick each candidate in proportion to its probability.
#[test]
fn sample_picks_as_the_host_does() {
    use kvsieve::sampling::{target_distribution, Draw};
    let mut ex = gpu();
    let mut cpu = RefExecutor::new();
    let mut r = rng(33);
    for (vocab, ties, nans) in [(5_003usize, false, 0usize), (1_000, true, 3)] {
        let mut logits = randn(&mut r, vocab, 3.0);
        if ties {
            logits.iter_mut().for_each(|v| *v = v.round());
        }
        for i in 0..nans {
            logits[17 * i + 1] = f32::NAN;
        }
        let lc = cpu.upload(&logits, 1, vocab).unwrap();
        let lg = ex.upload(&logits, 1, vocab).unwrap();
        let (mut oc, mut og) = (cpu.ids(&[0]).unwrap(), ex.ids(&[0]).unwrap());
        for (top_k, temperature, top_p) in
            [(1, 1.0, 1.0), (8, 0.7, 1.0), (40, 1.3, 0.9), (64, 4.0, 0.5)]
        {
            let cands = cpu.top_k(&lc, top_k).unwrap();
            let probs = target_distribution(&cands, temperature, top_p);
            let mass: f32 = probs.iter().sum();
            let mut counts = vec![0usize; cands.len()];
            let n = 200;
            for i in 0..n {
                // Mid-bin draws: a draw on a bin's edge may round either way.
                let u = (i as f32 + 0.5) / n as f32;
                let draw = Draw {
                    top_k,
                    temperature,
                    top_p,
                    u,
                };
                cpu.sample(&lc, &mut oc, &draw).unwrap();
                let c = oc[0];
                // Every 8th draw on the GPU too (each is a submit; the
                // browser and GL runs pay for each).
                if i % 8 == 3 || i == n - 1 {
                    ex.sample(&lg, &mut og, &draw).unwrap();
                    let g = ex.download_ids(&og).unwrap()[0];
                    assert_eq!(g, c, "k {top_k}, t {temperature}, p {top_p}, u {u}");
                }
                let at = cands.iter().position(|x| x.0 == c).expect("a candidate");
                assert!(at < probs.len(), "picked outside the nucleus");
                counts[at] += 1;
            }
            // Each candidate gets the draws its share of the nucleus covers.
            for (at, p) in probs.iter().enumerate() {
                let want = p / mass * n as f32;
                assert!(
                    (counts[at] as f32 - want).abs() <= 1.0,
                    "candidate {at}: {} draws for a share of {want}",
                    counts[at]
                );
            }
        }
    }
}

#[test]
fn argmax_ties_and_nan() {
    let mut ex = gpu();
    let mut cpu = RefExecutor::new();
    let mut r = rng(5);
    let cols = 49152 + 3;
    let mut x = randn(&mut r, 3 * cols, 10.0);
    x[cols + 100] = 50.0; // tie in row 1: lowest index wins
    x[cols + 40000] = 50.0;
    x[2 * cols + 5] = f32::NAN; // NaN never wins
    x[2 * cols + 6] = 60.0;
    let mut want = vec![0u32; 3];
    let xc = cpu.upload(&x, 3, cols).unwrap();
    cpu.argmax(&xc, &mut want).unwrap();
    assert_eq!(want[1], 100);
    assert_eq!(want[2], 6);
    let xg = ex.upload(&x, 3, cols).unwrap();
    let mut out = ex.ids(&[0, 0, 0]).unwrap();
    ex.argmax(&xg, &mut out).unwrap();
    assert_eq!(ex.download_ids(&out).unwrap(), want);
}

/// Fills a cache with random K/V on both executors and compares dense attention.
#[allow(clippy::too_many_arguments)]
fn check_attention(
    ex: &mut GpuExecutor,
    q_heads: usize,
    kv_heads: usize,
    d: usize,
    kv_len: usize,
    n_q: usize,
    page_size: usize,
    seed: u64,
) -> usize {
    let mut r = rng(seed);
    let layout = KvLayout {
        layers: 2,
        kv_heads,
        head_dim: d,
        page_size,
        num_pages: kv_len.div_ceil(page_size) + 3,
    };
    let mut cpu = RefExecutor::new();
    let mut alloc = PageAllocator::new(&layout);
    let mut table = alloc.new_sequence();
    // Take a page first and give it back later so the sequence's pages are not in order.
    let mut other = alloc.new_sequence();
    alloc.reserve(&mut other, page_size * 2).unwrap();
    alloc.reserve(&mut table, kv_len).unwrap();
    alloc.release(&mut other);
    let mut kvc = cpu.kv_cache(&layout).unwrap();
    let mut kvg = ex.kv_cache(&layout).unwrap();
    let rope_cfg = RopeConfig {
        head_dim: d,
        theta: 10000.0,
        scaling: None,
        max_positions: kv_len + 1,
    };
    let (rc, rg) = (
        cpu.rope_table(&rope_cfg).unwrap(),
        ex.rope_table(&rope_cfg).unwrap(),
    );
    let layer = 1;
    // Append in ragged blocks, as prefill chunks would.
    let block = 16384usize.min(kv_len).max(1);
    let mut start = 0;
    while start < kv_len {
        let n = block.min(kv_len - start);
        let k = randn(&mut r, n * kv_heads * d, 1.0);
        let v = randn(&mut r, n * kv_heads * d, 1.0);
        let (kc, vc) = (
            cpu.upload(&k, n, kv_heads * d).unwrap(),
            cpu.upload(&v, n, kv_heads * d).unwrap(),
        );
        let (kg, vg) = (
            ex.upload(&k, n, kv_heads * d).unwrap(),
            ex.upload(&v, n, kv_heads * d).unwrap(),
        );
        // Every other block also rotates a chunk of queries in the same pass
        // (kv_append_rope); the pages are checked below either way.
        if (start / block + seed as usize).is_multiple_of(2) && n * q_heads * d <= 1 << 22 {
            let x = randn(&mut r, n * q_heads * d, 1.0);
            let pos: Vec<u32> = (start as u32..(start + n) as u32).collect();
            let mut qc = cpu.upload(&x, n, q_heads * d).unwrap();
            let pc = cpu.ids(&pos).unwrap();
            cpu.kv_append_rope(
                &mut kvc, layer, &table, start, &kc, &vc, &mut qc, q_heads, &pc, &rc,
            )
            .unwrap();
            let mut qg = ex.upload(&x, n, q_heads * d).unwrap();
            let pg = ex.ids(&pos).unwrap();
            ex.kv_append_rope(
                &mut kvg, layer, &table, start, &kg, &vg, &mut qg, q_heads, &pg, &rg,
            )
            .unwrap();
            let got = ex.download(&qg).unwrap();
            assert_close("kv_append_rope queries", &got, &qc.data, 1e-6, 1e-5);
        } else {
            cpu.kv_append(&mut kvc, layer, &table, start, &kc, &vc)
                .unwrap();
            ex.kv_append(&mut kvg, layer, &table, start, &kg, &vg)
                .unwrap();
        }
        ex.flush().unwrap();
        start += n;
    }
    table.len = kv_len;
    // The paged storage itself must match the reference bit for bit (same page
    // layout, same f16 rounding).
    let page_elems = layout.page_elems();
    for (name, gpu_arenas, cpu_store) in [
        ("k", &kvg.k[layer], &kvc.k[layer]),
        ("v", &kvg.v[layer], &kvc.v[layer]),
    ] {
        let mut all = Vec::new();
        for a in gpu_arenas {
            let bytes = ex.read_bytes(a, a.size()).unwrap();
            all.extend(
                bytemuck::cast_slice::<u8, f16>(&bytes)
                    .iter()
                    .map(|h| h.to_f32()),
            );
        }
        for &pg in &table.pages {
            let pg = pg as usize;
            let arena = pg / kvg.pages_per_arena;
            let local = pg % kvg.pages_per_arena;
            let base: usize = gpu_arenas[..arena]
                .iter()
                .map(|b| b.size() as usize / 2)
                .sum::<usize>()
                + local * page_elems;
            let got = &all[base..base + page_elems];
            let want = &cpu_store[pg * page_elems..(pg + 1) * page_elems];
            if got != want {
                let i = got.iter().zip(want).position(|(a, b)| a != b).unwrap();
                panic!(
                    "kv_append {name}: page {pg} element {i} got {} want {}",
                    got[i], want[i]
                );
            }
        }
    }
    let q = randn(&mut r, n_q * q_heads * d, 1.0);
    let q_start = kv_len - n_q;
    let qc = cpu.upload(&q, n_q, q_heads * d).unwrap();
    let mut oc = cpu.tensor(n_q, q_heads * d).unwrap();
    dense_attention(
        &mut cpu,
        &qc,
        &KvView::new(&kvc, layer, &table, &rc),
        q_start,
        kv_len,
        &mut oc,
    )
    .unwrap();
    let qg = ex.upload(&q, n_q, q_heads * d).unwrap();
    let mut og = ex.tensor(n_q, q_heads * d).unwrap();
    dense_attention(
        ex,
        &qg,
        &KvView::new(&kvg, layer, &table, &rg),
        q_start,
        kv_len,
        &mut og,
    )
    .unwrap();
    let got = ex.download(&og).unwrap();
    // Outputs are convex combinations of f16 values in [-1, 1]; f32 online softmax
    // in another order differs by a few ulps of the exp sums.
    assert_close(
        &format!("attention q{q_heads}/kv{kv_heads} d{d} len{kv_len} nq{n_q} page{page_size}"),
        &got,
        &oc.data,
        2e-5,
        1e-3,
    );
    kvg.k[layer].len()
}

#[test]
fn decode_attention_ragged() {
    for mut ex in gpu_variants() {
        for (i, &(qh, kh, d, len, page)) in [
            (9usize, 3usize, 64usize, 1usize, 16usize),
            (9, 3, 64, 77, 16),
            (4, 1, 32, 1000, 64),
            (32, 8, 128, 1500, 64),
            (8, 8, 8, 300, 7),
        ]
        .iter()
        .enumerate()
        {
            check_attention(&mut ex, qh, kh, d, len, 1, page, 20 + i as u64);
        }
    }
}

#[test]
fn prefill_attention_ragged() {
    let mut ex = gpu();
    for (i, &(qh, kh, d, len, nq, page)) in [
        (9usize, 3usize, 64usize, 70usize, 70usize, 16usize),
        (9, 3, 64, 300, 45, 64),
        (4, 2, 128, 129, 129, 64),
        (6, 6, 8, 50, 3, 5),
    ]
    .iter()
    .enumerate()
    {
        check_attention(&mut ex, qh, kh, d, len, nq, page, 40 + i as u64);
    }
}

#[test]
fn prefill_attention_long_context() {
    // A 512-query chunk at the end of 4K keys: many key-range passes on CPU drivers.
    let mut ex = gpu();
    check_attention(&mut ex, 9, 3, 64, 4096, 512, 64, 50);
    check_attention(&mut ex, 8, 2, 128, 3000, 100, 64, 51);
    // Keys past the RoPE table's flat rows (32,768): rotation composed.
    check_attention(&mut ex, 4, 1, 32, 33_000, 16, 64, 52);
}

#[test]
fn attention_across_several_kv_arenas() {
    // 16 KiB bindings: pages of 16 tokens x 3 heads x 64 dims (6 KiB) -> 2 pages per
    // arena, so 1000 tokens span 32 arenas and every pass must carry its state.
    for ex in gpu_variants() {
        let mut ex = ex.with_binding_limit(16 * 1024);
        let arenas = check_attention(&mut ex, 9, 3, 64, 1000, 1, 16, 60);
        assert!(arenas > 8, "expected many arenas, got {arenas}");
        check_attention(&mut ex, 9, 3, 64, 200, 37, 16, 61);
    }
}

#[test]
fn decode_attention_128k_context() {
    // The real thing: 128K tokens of the 32/8 x 128 shape is 512 MiB of KV per layer,
    // several arenas on adapters with a 128 MiB binding limit.
    for mut ex in gpu_variants() {
        let arenas = check_attention(&mut ex, 32, 8, 128, 131072, 1, 64, 80);
        eprintln!("128K decode used {arenas} arena(s) per K/V");
        check_attention(&mut ex, 9, 3, 64, 131072 + 33, 1, 64, 81);
    }
}

#[test]
fn attention_rejects_bad_input() {
    let mut ex = gpu();
    let layout = KvLayout {
        layers: 1,
        kv_heads: 2,
        head_dim: 16,
        page_size: 8,
        num_pages: 4,
    };
    let mut alloc = PageAllocator::new(&layout);
    let mut t = alloc.new_sequence();
    alloc.reserve(&mut t, 20).unwrap();
    let kv = ex.kv_cache(&layout).unwrap();
    let rope = ex
        .rope_table(&RopeConfig {
            head_dim: 16,
            theta: 1e4,
            scaling: None,
            max_positions: 64,
        })
        .unwrap();
    let q = ex.tensor(1, 3 * 16).unwrap();
    let mut o = ex.tensor(1, 3 * 16).unwrap();
    // 3 query heads over 2 KV heads is not a whole group.
    assert!(matches!(
        ex.attention_decode(&q, &KvView::new(&kv, 0, &t, &rope), 5, &mut o),
        Err(Error::Shape { .. })
    ));
    let q = ex.tensor(1, 4 * 16).unwrap();
    let mut o = ex.tensor(1, 4 * 16).unwrap();
    // More keys than reserved pages, and a layer that does not exist.
    assert!(ex
        .attention_decode(&q, &KvView::new(&kv, 0, &t, &rope), 25, &mut o)
        .is_err());
    assert!(ex
        .attention_decode(&q, &KvView::new(&kv, 1, &t, &rope), 5, &mut o)
        .is_err());
    // The pool is exhausted: a typed capacity error, and nothing changes.
    assert!(matches!(
        alloc.reserve(&mut t, 100),
        Err(Error::Capacity(_))
    ));
    assert_eq!(t.pages.len(), 3);
    let bad = KvLayout {
        head_dim: 6,
        ..layout
    };
    assert!(matches!(ex.kv_cache(&bad), Err(Error::InvalidOption(_))));
}

#[test]
fn a_step_is_one_submit() {
    let mut ex = gpu();
    let x = ex.upload(&[1.0; 64], 1, 64).unwrap();
    let w = ex.weight(&vec![f16::ONE; 64 * 64], 64, 64).unwrap();
    let mut a = ex.tensor(1, 64).unwrap();
    let mut b = ex.tensor(1, 64).unwrap();
    let before = ex.rec.submit_count;
    for _ in 0..10 {
        ex.matmul(&x, &w, &mut a).unwrap();
        ex.add(&mut b, &a).unwrap();
    }
    let mut id = ex.ids(&[0]).unwrap();
    ex.argmax(&b, &mut id).unwrap();
    assert_eq!(ex.download(&b).unwrap(), vec![640.0; 64]);
    assert_eq!(
        ex.rec.submit_count - before,
        1,
        "21 dispatches must go out in one submit"
    );
}

/// The attention kernels cut their work to stay under llvmpipe's loop limiter
/// (Tuning::loop_limit). This probes the driver: a loop of 100000 iterations with
/// barriers must either run fully or stop exactly at the limit the tuning assumes.
#[test]
fn driver_loop_limit_matches_tuning() {
    use kvsieve::gpu::{Binding, PipelineCache, Recorder};
    use kvsieve::shaders::Shader;
    let ctx = ctx();
    let src = r#"
struct P { n: u32, a: u32, b: u32, c: u32 }
@group(0) @binding(0) var<uniform> p: P;
@group(0) @binding(1) var<storage, read_write> out: array<u32>;
var<workgroup> sh: array<u32, 64>;
@compute @workgroup_size(64)
fn main(@builtin(local_invocation_id) lid: vec3<u32>) {
    var cnt = 0u;
    for (var i = 0u; i < p.n; i++) {
        sh[lid.x] = i;
        workgroupBarrier();
        cnt += sh[(lid.x + 1u) % 64u] + 1u - i;
        workgroupBarrier();
    }
    out[lid.x] = cnt;
}
"#;
    let shader = Shader {
        name: "loop probe",
        source: Box::leak(src.to_string().into_boxed_str()),
        lib: &[],
    };
    let (pipeline, buf) = {
        let _gl = ctx.gl_guard();
        let pipeline = PipelineCache::default().get(&ctx.device, shader, "main", &[]);
        (
            pipeline,
            kvsieve::gpu::buffer::storage(&ctx.device, 256, "probe").unwrap(),
        )
    };
    let mut rec = Recorder::new(ctx.clone());
    rec.dispatch(
        &pipeline,
        &[100_000, 0, 0, 0],
        &[Binding::from(&buf)],
        [1, 1, 1],
    );
    let i = rec.read(&buf, 0, 256);
    let r = rec.submit().unwrap();
    let ran: Vec<u32> = bytemuck::pod_collect_to_vec(&r.reads[i]);
    let tuning = gpu().tuning;
    match tuning.loop_limit {
        None => assert_eq!(
            ran[0], 100_000,
            "driver stops loops but tuning assumes no limit"
        ),
        Some(limit) => assert!(
            ran[0] as u64 >= limit,
            "driver stopped at {} but tuning assumes {limit}",
            ran[0]
        ),
    }
}
