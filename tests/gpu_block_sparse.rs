//! Quest block bounds and block scores against the reference executor, and the
//! bound property itself: no key of a block scores above its block's bound.

mod common;

use common::*;
use kvsieve::kernels::GpuExecutor;
use kvsieve::ops::Ops;
use kvsieve::reference::dot;

/// Bounds built in two updates (the second continues a partial block), scores
/// of a random rotated query on both executors, and the bound property on the
/// reference.
fn case(ex: &mut GpuExecutor, qh: usize, kh: usize, d: usize, len: usize, block: usize) {
    let mut f = fill(ex, kh, d, len, 51);
    let (rc, rg) = (
        f.cpu.rope_table(&rope_cfg(d, len)).unwrap(),
        ex.rope_table(&rope_cfg(d, len)).unwrap(),
    );
    let mut bc = f.cpu.block_bounds(&f.layout, block).unwrap();
    let mut bg = ex.block_bounds(&f.layout, block).unwrap();
    let cut = len / 2 + 3;
    for range in [0..cut, cut..len] {
        f.cpu
            .kv_bounds(&f.kvc, &mut bc, 0, &f.table, range.clone(), &rc)
            .unwrap();
        ex.kv_bounds(&f.kvg, &mut bg, 0, &f.table, range, &rg)
            .unwrap();
    }
    let n_blocks = len.div_ceil(block);
    let q = randn(&mut rng(52), qh * d, 1.0);
    let qc = f.cpu.upload(&q, 1, qh * d).unwrap();
    let mut sc = f.cpu.tensor(qh, n_blocks + 5).unwrap();
    f.cpu
        .block_scores(&qc, &bc, 0, &f.table, n_blocks, &mut sc)
        .unwrap();
    let qg = ex.upload(&q, 1, qh * d).unwrap();
    let mut sg = ex.tensor(qh, n_blocks + 5).unwrap();
    ex.block_scores(&qg, &bg, 0, &f.table, n_blocks, &mut sg)
        .unwrap();
    assert_close(
        &format!("block scores {qh}/{kh}/{d}, {len} tokens, blocks of {block}"),
        &ex.download(&sg).unwrap(),
        &sc.data,
        1e-3,
        1e-4,
    );
    // The bound: q . k_rot(t) <= score of t's block, for every key.
    let half = d / 2;
    for h in 0..qh {
        let qv = &q[h * d..(h + 1) * d];
        let g = h / (qh / kh);
        for t in 0..len {
            let off = f.kvc.offset(&f.table, t, g);
            let mut k = f.kvc.k[0][off..off + d].to_vec();
            kvsieve::reference::rotate(&mut k, &rc.cs[t * half..(t + 1) * half]);
            let s = sc.data[h * sc.cols + t / block];
            assert!(
                dot(qv, &k) <= s + 1e-4,
                "head {h}, token {t}: {} > bound {s}",
                dot(qv, &k)
            );
        }
    }
}

#[test]
fn block_bounds_and_scores_match_reference() {
    let mut ex = gpu();
    case(&mut ex, 9, 3, 64, 1000 + 13, 16);
    case(&mut ex, 32, 8, 128, 300, 8);
    case(&mut ex, 9, 3, 64, 5, 16);
    // Pages spread over many arenas.
    let mut ex = gpu().with_binding_limit(64 * 1024);
    case(&mut ex, 9, 3, 64, 2000 + 7, 16);
}

#[test]
fn bad_block_sizes_and_ranges_are_errors() {
    let mut ex = gpu();
    let f = fill(&mut ex, 3, 64, 100, 53);
    assert!(ex.block_bounds(&f.layout, 3).is_err());
    assert!(ex.block_bounds(&f.layout, 24).is_err());
    let mut b = ex.block_bounds(&f.layout, 16).unwrap();
    let rope = ex.rope_table(&rope_cfg(64, 100)).unwrap();
    assert!(ex
        .kv_bounds(&f.kvg, &mut b, 1, &f.table, 0..10, &rope)
        .is_err());
    assert!(ex
        .kv_bounds(&f.kvg, &mut b, 0, &f.table, 0..10_000, &rope)
        .is_err());
    let q = ex.tensor(1, 9 * 64).unwrap();
    let mut out = ex.tensor(9, 3).unwrap();
    assert!(ex.block_scores(&q, &b, 0, &f.table, 7, &mut out).is_err());
}
