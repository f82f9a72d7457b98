//! Quest block bounds and block scores against the reference executor, and the
//! bound property itself: no key of a block scores above its block's bound.

mod common;

use common::*;
use kvsieve::kernels::GpuExecutor;
use kvsieve::ops::prelude::*;
use kvsieve::ops::{KeyList, Selection};
use kvsieve::reference::{dot, RefExecutor};

/// Bounds built in two updates (the second continues a partial block), scores
/// of a random query on both executors over the blocks after the first, and
/// the bound property on the reference; keys rotated (Quest) or not
/// (hierarchical TokenSelect).
fn case(
    ex: &mut GpuExecutor,
    qh: usize,
    kh: usize,
    d: usize,
    len: usize,
    block: usize,
    rotated: bool,
) {
    let mut f = fill(ex, kh, d, len, 51);
    let (rc, rg) = (
        f.cpu.rope_table(&rope_cfg(d, len)).unwrap(),
        ex.rope_table(&rope_cfg(d, len)).unwrap(),
    );
    let mut bc = f.cpu.block_bounds(&f.layout, block, rotated).unwrap();
    let mut bg = ex.block_bounds(&f.layout, block, rotated).unwrap();
    let cut = len / 2 + 3;
    for range in [0..cut, cut..len] {
        f.cpu
            .kv_bounds(
                &KvView::new(&f.kvc, 0, &f.table, &rc),
                &mut bc,
                range.clone(),
            )
            .unwrap();
        ex.kv_bounds(&KvView::new(&f.kvg, 0, &f.table, &rg), &mut bg, range)
            .unwrap();
    }
    let end = len.div_ceil(block);
    let first = usize::from(end > 1);
    let nb = end - first;
    let q = randn(&mut rng(52), qh * d, 1.0);
    let qc = f.cpu.upload(&q, 1, qh * d).unwrap();
    let qg = ex.upload(&q, 1, qh * d).unwrap();
    let n = qh * nb;
    // Spread 1 (the bound, `sc` below), 0 (the block centres) and in between,
    // which weighs the half-ranges linearly.
    let mut by_spread = Vec::new();
    for spread in [1.0, 0.0, 0.25] {
        let mut sc = f.cpu.tensor(qh, nb + 5).unwrap();
        f.cpu
            .block_scores(&qc, &bc, 0, &f.table, first..end, spread, &mut sc, None)
            .unwrap();
        let mut sg = ex.tensor(qh, nb + 5).unwrap();
        ex.block_scores(&qg, &bg, 0, &f.table, first..end, spread, &mut sg, None)
            .unwrap();
        assert_close(
            &format!("block scores {qh}/{kh}/{d}, {len} tokens, blocks of {block}, rotated {rotated}, spread {spread}"),
            &ex.download(&sg).unwrap()[..n],
            &sc.data[..n],
            1e-3,
            1e-4,
        );
        by_spread.push(sc);
    }
    let mixed: Vec<f32> = (0..n)
        .map(|i| 0.75 * by_spread[1].data[i] + 0.25 * by_spread[0].data[i])
        .collect();
    assert_close("spread 0.25", &by_spread[2].data[..n], &mixed, 1e-3, 1e-4);
    let sc = by_spread.swap_remove(0);
    // Group scores: each KV head's row is the sum of its query heads' rows.
    let mut gc = f.cpu.tensor(kh, nb + 5).unwrap();
    f.cpu
        .block_group_scores(&qc, &bc, 0, &f.table, first..end, &mut gc)
        .unwrap();
    let mut gg = ex.tensor(kh, nb + 5).unwrap();
    ex.block_group_scores(&qg, &bg, 0, &f.table, first..end, &mut gg)
        .unwrap();
    let group = qh / kh;
    let summed: Vec<f32> = (0..kh * nb)
        .map(|i| {
            let (g, b) = (i / nb, i % nb);
            (g * group..(g + 1) * group)
                .map(|h| sc.data[h * nb + b])
                .sum()
        })
        .collect();
    let what = format!("group scores {qh}/{kh}/{d}, {len} tokens, blocks of {block}");
    assert_close(&what, &gc.data[..kh * nb], &summed, 1e-3, 1e-4);
    assert_close(
        &what,
        &ex.download(&gg).unwrap()[..kh * nb],
        &gc.data[..kh * nb],
        1e-3,
        1e-4,
    );
    // The bound: q . k(t) <= score of t's block, for every key.
    for h in 0..qh {
        let qv = &q[h * d..(h + 1) * d];
        let g = h / (qh / kh);
        for t in first * block..len {
            let off = f.kvc.offset(&f.table, t, g);
            let mut k = f.kvc.k[0][off..off + d].to_vec();
            if rotated {
                kvsieve::reference::rotate(&mut k, &rc.row(t));
            }
            let s = sc.data[h * nb + t / block - first];
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
    case(&mut ex, 9, 3, 64, 1000 + 13, 16, true);
    case(&mut ex, 9, 3, 64, 1000 + 13, 16, false);
    case(&mut ex, 32, 8, 128, 300, 8, true);
    case(&mut ex, 9, 3, 64, 5, 16, true);
    // 10 query heads per KV head.
    case(&mut ex, 20, 2, 64, 400 + 9, 16, true);
    // Pages spread over many arenas.
    let mut ex = gpu().with_binding_limit(64 * 1024);
    case(&mut ex, 9, 3, 64, 2000 + 7, 16, true);
    case(&mut ex, 9, 3, 64, 2000 + 7, 16, false);
    // Keys past the RoPE table's flat rows (32,768): rotation composed.
    case(&mut ex, 4, 1, 32, 33_000, 16, true);
}

#[test]
fn bad_block_sizes_and_ranges_are_errors() {
    let mut ex = gpu();
    let f = fill(&mut ex, 3, 64, 100, 53);
    assert!(ex.block_bounds(&f.layout, 3, true).is_err());
    assert!(ex.block_bounds(&f.layout, 24, true).is_err());
    let mut b = ex.block_bounds(&f.layout, 16, true).unwrap();
    let rope = ex.rope_table(&rope_cfg(64, 100)).unwrap();
    assert!(ex
        .kv_bounds(&KvView::new(&f.kvg, 1, &f.table, &rope), &mut b, 0..10)
        .is_err());
    assert!(ex
        .kv_bounds(&KvView::new(&f.kvg, 0, &f.table, &rope), &mut b, 0..10_000)
        .is_err());
    let q = ex.tensor(1, 9 * 64).unwrap();
    let mut out = ex.tensor(9, 3).unwrap();
    assert!(ex
        .block_scores(&q, &b, 0, &f.table, 0..7, 1.0, &mut out, None)
        .is_err());
    assert!(ex
        .block_scores(&q, &b, 0, &f.table, 1..20, 1.0, &mut out, None)
        .is_err());
    // Spread outside 0..=1.
    let mut out = ex.tensor(9, 7).unwrap();
    assert!(ex
        .block_scores(&q, &b, 0, &f.table, 0..7, 1.0, &mut out, None)
        .is_ok());
    assert!(ex
        .block_scores(&q, &b, 0, &f.table, 0..7, 1.5, &mut out, None)
        .is_err());
    // Group scores want a row per KV head.
    let mut out = ex.tensor(2, 7).unwrap();
    assert!(ex
        .block_group_scores(&q, &b, 0, &f.table, 0..7, &mut out)
        .is_err());
}

#[test]
fn top_blocks_match_reference() {
    let mut ex = gpu();
    let mut cpu = RefExecutor::new();
    for (qh, kh, n, k) in [
        (9usize, 3usize, 517usize, 13usize),
        (32, 8, 40, 40),
        (9, 3, 1, 1),
        // Quest's group scores: a row per KV head, one workgroup per head.
        (3, 3, 8191, 127),
        // Tidal's token choice: past 32K candidates the multi-pass radix top-k.
        (9, 3, 40_000 + 3, 2048),
    ] {
        // Packed [qh, n] scores in a larger tensor.
        let cols = n + 3;
        let mut s = randn(&mut rng(54), qh * cols, 1.0);
        // Ties across heads and blocks.
        s[5] = s[7 % n];
        s[n + 2 % n] = s[2 % n];
        let (sc, sg) = (
            cpu.upload(&s, qh, cols).unwrap(),
            ex.upload(&s, qh, cols).unwrap(),
        );
        let mut oc = vec![0u32; kh * k];
        cpu.block_top_k(&sc, kh, n, k, &mut oc).unwrap();
        let mut og = ex.ids(&vec![0u32; kh * k]).unwrap();
        ex.block_top_k(&sg, kh, n, k, &mut og).unwrap();
        assert_eq!(
            ex.download_ids(&og).unwrap(),
            oc,
            "top {k} of {n} blocks, {qh}/{kh}"
        );
        // Each KV head's choice is its group's best blocks.
        let group = qh / kh;
        for g in 0..kh {
            let best = |b: usize| {
                (g * group..(g + 1) * group)
                    .map(|h| s[h * n + b])
                    .sum::<f32>()
            };
            let chosen = &oc[g * k..(g + 1) * k];
            let floor = chosen
                .iter()
                .map(|&b| best(b as usize))
                .fold(f32::MAX, f32::min);
            assert!((0..n)
                .filter(|b| !chosen.contains(&(*b as u32)))
                .all(|b| best(b) <= floor));
        }
    }
    let s = ex.tensor(9, 10).unwrap();
    let mut o = ex.ids(&[0u32; 30]).unwrap();
    assert!(ex.block_top_k(&s, 3, 10, 11, &mut o).is_err());
    assert!(ex.block_top_k(&s, 4, 10, 2, &mut o).is_err());
}

/// Decode attention over per-KV-head block lists (Quest) on both executors,
/// and a list of every block is dense decode.
#[test]
fn block_list_decode_matches_reference() {
    for mut ex in gpu_variants() {
        for (qh, kh, d, len, block) in [
            (9usize, 3usize, 64usize, 1000 + 13, 16usize),
            (32, 8, 128, 700, 8),
            // Block 1 is Tidal's per-KV-head token list.
            (9, 3, 64, 517, 1),
        ] {
            let mut f = fill(&mut ex, kh, d, len, 55);
            let (rc, rg) = (
                f.cpu.rope_table(&rope_cfg(d, len)).unwrap(),
                ex.rope_table(&rope_cfg(d, len)).unwrap(),
            );
            let last = (len - 1) / block;
            let q = randn(&mut rng(56), qh * d, 1.0);
            let (qc, qg) = (
                f.cpu.upload(&q, 1, qh * d).unwrap(),
                ex.upload(&q, 1, qh * d).unwrap(),
            );
            let run = |ex: &mut GpuExecutor, f: &mut Fixture, ids: &[u32], per_head: usize| {
                let lc = KeyList {
                    n_init: 0,
                    selected: &ids.to_vec(),
                    n_selected: per_head * block,
                    tail_start: last * block,
                    tail_len: len - last * block,
                    compact: false,
                    selection: Selection::KvHeadBlocks(block),
                };
                let mut oc = f.cpu.tensor(1, qh * d).unwrap();
                f.cpu
                    .attention_decode_list(
                        &qc,
                        &KvView::new(&f.kvc, 0, &f.table, &rc),
                        len,
                        &lc,
                        &mut oc,
                    )
                    .unwrap();
                let sg = ex.ids(ids).unwrap();
                let lg = lc.with_selected(&sg);
                let mut og = ex.tensor(1, qh * d).unwrap();
                ex.attention_decode_list(
                    &qg,
                    &KvView::new(&f.kvg, 0, &f.table, &rg),
                    len,
                    &lg,
                    &mut og,
                )
                .unwrap();
                (oc.data, ex.download(&og).unwrap())
            };
            // Different blocks per KV head, in no particular order.
            let per_head = 7;
            let ids: Vec<u32> = (0..kh * per_head)
                .map(|i| ((i * 37 + (i / per_head) * 11) % last) as u32)
                .collect();
            let (c, g) = run(&mut ex, &mut f, &ids, per_head);
            assert_close(&format!("block list {qh}/{kh}/{d}"), &g, &c, 2e-5, 1e-3);
            // Every block: dense decode.
            let all: Vec<u32> = (0..kh).flat_map(|_| 0..last as u32).collect();
            let (c, g) = run(&mut ex, &mut f, &all, last);
            let mut dense = ex.tensor(1, qh * d).unwrap();
            ex.attention_decode(&qg, &KvView::new(&f.kvg, 0, &f.table, &rg), len, &mut dense)
                .unwrap();
            let mut dc = f.cpu.tensor(1, qh * d).unwrap();
            f.cpu
                .attention_decode(&qc, &KvView::new(&f.kvc, 0, &f.table, &rc), len, &mut dc)
                .unwrap();
            assert_close("reference: all blocks = dense", &c, &dc.data, 1e-5, 1e-4);
            assert_close(
                "gpu: all blocks = dense",
                &g,
                &ex.download(&dense).unwrap(),
                1e-5,
                1e-4,
            );
        }
    }
}

/// Prefill attention of a chunk over per-KV-head block lists (Quest sub-chunks)
/// on both executors: ragged chunk sizes, rows inside a larger query tensor, a
/// window starting mid-chunk's block; and a list of every block is dense prefill.
#[test]
fn block_list_prefill_matches_reference() {
    let mut ex = gpu();
    for (qh, kh, d, len, block, m) in [
        (9usize, 3usize, 64usize, 1000 + 13, 16usize, 37usize),
        (32, 8, 128, 700, 8, 70),
        (9, 3, 64, 300, 32, 5),
    ] {
        let mut f = fill(&mut ex, kh, d, len, 59);
        let (rc, rg) = (
            f.cpu.rope_table(&rope_cfg(d, len)).unwrap(),
            ex.rope_table(&rope_cfg(d, len)).unwrap(),
        );
        // The chunk is the last m tokens; its window starts at its first block.
        let q_start = len - m;
        let tail = q_start / block;
        let (r0, rows) = (3, m + 5);
        let q = randn(&mut rng(60), rows * qh * d, 1.0);
        let (qc, qg) = (
            f.cpu.upload(&q, rows, qh * d).unwrap(),
            ex.upload(&q, rows, qh * d).unwrap(),
        );
        let w = qh * d;
        let run = |ex: &mut GpuExecutor, f: &mut Fixture, ids: &[u32], per_head: usize| {
            let lc = KeyList {
                n_init: 0,
                selected: &ids.to_vec(),
                n_selected: per_head * block,
                tail_start: tail * block,
                tail_len: len - tail * block,
                compact: false,
                selection: Selection::KvHeadBlocks(block),
            };
            let mut oc = f.cpu.tensor(rows, w).unwrap();
            f.cpu
                .attention_prefill_list(
                    &qc,
                    &KvView::new(&f.kvc, 0, &f.table, &rc),
                    r0..r0 + m,
                    q_start,
                    &lc,
                    &mut oc,
                )
                .unwrap();
            let sg = ex.ids(ids).unwrap();
            let lg = lc.with_selected(&sg);
            let mut og = ex.tensor(rows, w).unwrap();
            ex.attention_prefill_list(
                &qg,
                &KvView::new(&f.kvg, 0, &f.table, &rg),
                r0..r0 + m,
                q_start,
                &lg,
                &mut og,
            )
            .unwrap();
            let g = ex.download(&og).unwrap();
            (
                oc.data[r0 * w..(r0 + m) * w].to_vec(),
                g[r0 * w..(r0 + m) * w].to_vec(),
            )
        };
        let per_head = 5.min(tail);
        let ids: Vec<u32> = (0..kh)
            .flat_map(|g| {
                let mut b: Vec<u32> = (0..tail as u32)
                    .filter(|b| (b * 7 + g as u32 * 3) % 4 != 1)
                    .take(per_head)
                    .collect();
                b.sort_unstable();
                b
            })
            .collect();
        assert_eq!(ids.len(), kh * per_head);
        let (c, g) = run(&mut ex, &mut f, &ids, per_head);
        assert_close(
            &format!("prefill block list {qh}/{kh}/{d}, chunk {m}"),
            &g,
            &c,
            2e-5,
            1e-3,
        );
        // Every block before the window: dense prefill of the chunk.
        let all: Vec<u32> = (0..kh).flat_map(|_| 0..tail as u32).collect();
        let (c, g) = run(&mut ex, &mut f, &all, tail);
        let chunk = |q: &[f32]| q[r0 * w..(r0 + m) * w].to_vec();
        let mut dc = f.cpu.tensor(m, w).unwrap();
        let qd = f.cpu.upload(&chunk(&q), m, w).unwrap();
        f.cpu
            .attention_prefill(
                &qd,
                &KvView::new(&f.kvc, 0, &f.table, &rc),
                q_start,
                len,
                &mut dc,
            )
            .unwrap();
        assert_close(
            "reference: all blocks = dense prefill",
            &c,
            &dc.data,
            1e-5,
            1e-4,
        );
        let qd = ex.upload(&chunk(&q), m, w).unwrap();
        let mut dg = ex.tensor(m, w).unwrap();
        ex.attention_prefill(
            &qd,
            &KvView::new(&f.kvg, 0, &f.table, &rg),
            q_start,
            len,
            &mut dg,
        )
        .unwrap();
        assert_close(
            "gpu: all blocks = dense prefill",
            &g,
            &ex.download(&dg).unwrap(),
            1e-5,
            1e-4,
        );
    }
}

/// TidalDecode's scores: q . k with keys rotated at their positions, on both
/// executors and against the direct formula.
#[test]
fn token_scores_match_reference() {
    let mut ex = gpu();
    for (qh, kh, d, len) in [
        (9usize, 3usize, 64usize, 1000 + 13),
        (32, 8, 128, 300),
        (4, 1, 32, 33_000),
    ] {
        let mut f = fill(&mut ex, kh, d, len, 57);
        let (rc, rg) = (
            f.cpu.rope_table(&rope_cfg(d, len)).unwrap(),
            ex.rope_table(&rope_cfg(d, len)).unwrap(),
        );
        let n = len - 1;
        let q = randn(&mut rng(58), qh * d, 1.0);
        let (qc, qg) = (
            f.cpu.upload(&q, 1, qh * d).unwrap(),
            ex.upload(&q, 1, qh * d).unwrap(),
        );
        let mut sc = f.cpu.tensor(kh, n + 2).unwrap();
        f.cpu
            .token_scores(&qc, &KvView::new(&f.kvc, 0, &f.table, &rc), n, &mut sc)
            .unwrap();
        let mut sg = ex.tensor(kh, n + 2).unwrap();
        ex.token_scores(&qg, &KvView::new(&f.kvg, 0, &f.table, &rg), n, &mut sg)
            .unwrap();
        assert_close(
            &format!("token scores {qh}/{kh}/{d}"),
            &ex.download(&sg).unwrap(),
            &sc.data,
            1e-3,
            1e-4,
        );
        // Each KV head's row: its query heads' dot products with the rotated key.
        let group = qh / kh;
        for g in [0, kh - 1] {
            for t in [0, n / 2, n - 1] {
                let off = f.kvc.offset(&f.table, t, g);
                let mut k = f.kvc.k[0][off..off + d].to_vec();
                kvsieve::reference::rotate(&mut k, &rc.row(t));
                let want: f32 = (g * group..(g + 1) * group)
                    .map(|h| dot(&q[h * d..(h + 1) * d], &k))
                    .sum();
                let got = sc.data[g * n + t];
                assert!(
                    (got - want).abs() < 1e-3 * (1.0 + want.abs()),
                    "{got} vs {want}"
                );
            }
        }
    }
}

/// A KV cache and its block bounds grown while in use (on the GPU over small
/// bindings: a partial last arena is replaced and arenas appended) give the
/// same attention and block scores as caches allocated at full size.
#[test]
fn kv_cache_and_bounds_grow_in_place() {
    use kvsieve::kv::{KvLayout, PageAllocator};
    let (qh, kh, d, page, block) = (4usize, 2usize, 32usize, 16usize, 8usize);
    let small = KvLayout {
        layers: 1,
        kv_heads: kh,
        head_dim: d,
        page_size: page,
        num_pages: 5,
    };
    let big = KvLayout {
        num_pages: 23,
        ..small
    };
    let len = 300; // 19 pages
    let mut r = rng(61);
    let k = randn(&mut r, len * kh * d, 1.0);
    let v = randn(&mut r, len * kh * d, 1.0);
    let q = randn(&mut r, qh * d, 1.0);
    // A page of K is 2 KiB: 2 pages a binding, arenas of 2, 2 and 1 pages.
    let mut ex = common::gpu().with_binding_limit(4096);
    let mut cpu = RefExecutor::new();
    let rope_c = cpu.rope_table(&rope_cfg(d, len)).unwrap();
    let rope_g = ex.rope_table(&rope_cfg(d, len)).unwrap();
    // Full size, on the reference.
    let mut alloc = PageAllocator::new(&big);
    let mut table = alloc.new_sequence();
    alloc.reserve(&mut table, len).unwrap();
    table.len = len;
    let mut kvc = cpu.kv_cache(&big).unwrap();
    let mut bc = cpu.block_bounds(&big, block, true).unwrap();
    let (kt, vt) = (
        cpu.upload(&k, len, kh * d).unwrap(),
        cpu.upload(&v, len, kh * d).unwrap(),
    );
    cpu.kv_append(&mut kvc, 0, &table, 0, &kt, &vt).unwrap();
    let view = KvView::new(&kvc, 0, &table, &rope_c);
    cpu.kv_bounds(&view, &mut bc, 0..len).unwrap();
    // Grown on the GPU: 70 tokens in 5 pages, then 23 pages and the rest.
    let mut galloc = PageAllocator::new(&small);
    let mut gtable = galloc.new_sequence();
    let mut kvg = ex.kv_cache(&small).unwrap();
    let mut bg = ex.block_bounds(&small, block, true).unwrap();
    assert_eq!(kvg.k[0].len(), 3);
    for (range, grow) in [(0..70, false), (70..len, true)] {
        if grow {
            ex.kv_grow(&mut kvg, big.num_pages).unwrap();
            ex.bounds_grow(&mut bg, big.num_pages).unwrap();
            galloc.grow(small.num_pages, big.num_pages);
        }
        galloc.reserve(&mut gtable, range.end).unwrap();
        gtable.len = range.end;
        let n = range.len();
        let (kt, vt) = (
            ex.upload(&k[range.start * kh * d..range.end * kh * d], n, kh * d)
                .unwrap(),
            ex.upload(&v[range.start * kh * d..range.end * kh * d], n, kh * d)
                .unwrap(),
        );
        ex.kv_append(&mut kvg, 0, &gtable, range.start, &kt, &vt)
            .unwrap();
        let view = KvView::new(&kvg, 0, &gtable, &rope_g);
        ex.kv_bounds(&view, &mut bg, range).unwrap();
    }
    assert_eq!(kvg.k[0].len(), 12, "arenas after growing to 23 pages");
    assert_eq!(kvsieve::kernels::GpuExecutor::kv_bytes(&kvg), 2 * 23 * 2048);
    assert!(matches!(
        ex.kv_grow(&mut kvg, 10),
        Err(kvsieve::Error::Shape { .. })
    ));
    let (qc, qg) = (
        cpu.upload(&q, 1, qh * d).unwrap(),
        ex.upload(&q, 1, qh * d).unwrap(),
    );
    let mut oc = cpu.tensor(1, qh * d).unwrap();
    let mut og = ex.tensor(1, qh * d).unwrap();
    cpu.attention_decode(&qc, &KvView::new(&kvc, 0, &table, &rope_c), len, &mut oc)
        .unwrap();
    ex.attention_decode(&qg, &KvView::new(&kvg, 0, &gtable, &rope_g), len, &mut og)
        .unwrap();
    assert_close(
        "attention after growth",
        &ex.download(&og).unwrap(),
        &oc.data,
        1e-4,
        1e-3,
    );
    let nb = len.div_ceil(block);
    let mut sc = cpu.tensor(qh, nb).unwrap();
    let mut sg = ex.tensor(qh, nb).unwrap();
    cpu.block_scores(&qc, &bc, 0, &table, 0..nb, 1.0, &mut sc, None)
        .unwrap();
    ex.block_scores(&qg, &bg, 0, &gtable, 0..nb, 1.0, &mut sg, None)
        .unwrap();
    assert_close(
        "block scores after growth",
        &ex.download(&sg).unwrap(),
        &sc.data,
        1e-3,
        1e-3,
    );
}
