//! Speculative-decoding kernels against the reference executor: tree attention
//! over a prefix plus a draft tree's ancestors.

mod common;

use common::*;
use kvsieve::kernels::GpuExecutor;
use kvsieve::ops::prelude::*;
use kvsieve::ops::{KeyList, Selection};
use kvsieve::reference::RefExecutor;
use kvsieve::speculative::{accept_stride, greedy_path, AcceptParams, Accepted, DraftTree};
use rand::Rng;

/// A random tree of `n` nodes (parents drawn among earlier nodes, tokens repeat).
fn random_tree(n: usize, seed: u64) -> DraftTree {
    let mut r = rng(seed);
    let mut t = DraftTree::new(1);
    for i in 1..n {
        let p = r.gen_range(0..i);
        t.push(p, r.gen_range(0..4)).unwrap();
    }
    t
}

/// Tree attention of `tree` after `prefix` tokens on both executors: over the
/// whole prefix, or with `list` = (sinks, window, compact) over a key list of
/// sinks, a strided selection and the window before the tree.
fn tree_case(
    ex: &mut GpuExecutor,
    qh: usize,
    kh: usize,
    d: usize,
    prefix: usize,
    tree: &DraftTree,
    list: Option<(usize, usize, bool)>,
) {
    let n = tree.len();
    let len = prefix + n;
    let mut f = fill(ex, kh, d, len, 41);
    let (rc, rg) = (
        f.cpu.rope_table(&rope_cfg(d, len)).unwrap(),
        ex.rope_table(&rope_cfg(d, len)).unwrap(),
    );
    let mask = tree.mask().unwrap();
    let q = randn(&mut rng(42), n * qh * d, 1.0);
    let sel: Vec<u32> = match list {
        Some((n_init, n_local, _)) => (n_init..prefix - n_local)
            .step_by(3)
            .map(|t| t as u32)
            .collect(),
        None => Vec::new(),
    };
    let sg = ex
        .ids(&sel.iter().copied().chain([0]).collect::<Vec<_>>())
        .unwrap();
    let lists = list.map(|(n_init, n_local, compact)| {
        let lc = KeyList {
            n_init,
            selected: &sel,
            n_selected: sel.len(),
            tail_start: prefix - n_local,
            tail_len: n_local,
            compact,
            selection: Selection::Shared,
        };
        (lc.with_selected(&sel), lc.with_selected(&sg))
    });
    let qc = f.cpu.upload(&q, n, qh * d).unwrap();
    let mut oc = f.cpu.tensor(n, qh * d).unwrap();
    f.cpu
        .attention_tree(
            &qc,
            &KvView::new(&f.kvc, 0, &f.table, &rc),
            prefix,
            &mask,
            lists.as_ref().map(|l| &l.0),
            &mut oc,
        )
        .unwrap();
    let qg = ex.upload(&q, n, qh * d).unwrap();
    let mg = ex.ids(&mask).unwrap();
    let mut og = ex.tensor(n, qh * d).unwrap();
    ex.attention_tree(
        &qg,
        &KvView::new(&f.kvg, 0, &f.table, &rg),
        prefix,
        &mg,
        lists.as_ref().map(|l| &l.1),
        &mut og,
    )
    .unwrap();
    assert_close(
        &format!("tree attention {qh}/{kh}/{d}, {n} nodes after {prefix}, list {list:?}"),
        &ex.download(&og).unwrap(),
        &oc.data,
        2e-5,
        1e-3,
    );
}

#[test]
fn tree_attention_matches_reference() {
    for mut ex in gpu_variants() {
        // Longer than one llvmpipe pass (about 900 keys), ragged node counts.
        tree_case(&mut ex, 9, 3, 64, 1500, &random_tree(37, 1), None);
        tree_case(&mut ex, 32, 8, 128, 300, &random_tree(128, 2), None);
        tree_case(&mut ex, 9, 3, 64, 1, &random_tree(1, 3), None);
        // TokenSelect: a key list before the tree, both position modes; the
        // list is longer than one llvmpipe pass.
        tree_case(
            &mut ex,
            9,
            3,
            64,
            3100,
            &random_tree(23, 5),
            Some((16, 63, true)),
        );
        tree_case(
            &mut ex,
            32,
            8,
            128,
            500,
            &random_tree(9, 6),
            Some((4, 17, false)),
        );
    }
    // A prefix spread over many arenas.
    let mut ex = gpu().with_binding_limit(64 * 1024);
    tree_case(&mut ex, 9, 3, 64, 700, &random_tree(81, 4), None);
    tree_case(
        &mut ex,
        9,
        3,
        64,
        700,
        &random_tree(17, 7),
        Some((8, 40, true)),
    );
}

/// A key list holding every prefix token at true positions is dense tree
/// attention, on both executors; a window not ending at the tree is an error.
#[test]
fn a_full_list_tree_is_dense_tree_attention() {
    let mut ex = gpu();
    let (qh, kh, d, prefix) = (9usize, 3usize, 64usize, 400usize);
    let tree = random_tree(19, 8);
    let n = tree.len();
    let mut f = fill(&mut ex, kh, d, prefix + n, 45);
    let (rc, rg) = (
        f.cpu.rope_table(&rope_cfg(d, prefix + n)).unwrap(),
        ex.rope_table(&rope_cfg(d, prefix + n)).unwrap(),
    );
    let q = randn(&mut rng(46), n * qh * d, 1.0);
    let mask = tree.mask().unwrap();
    let sel: Vec<u32> = (10..prefix as u32 - 30).collect();
    let lc = KeyList {
        n_init: 10,
        selected: &sel,
        n_selected: sel.len(),
        tail_start: prefix - 30,
        tail_len: 30,
        compact: false,
        selection: Selection::Shared,
    };
    let sg = ex.ids(&sel).unwrap();
    let lg = lc.with_selected(&sg);
    let qc = f.cpu.upload(&q, n, qh * d).unwrap();
    let (mut a, mut b) = (
        f.cpu.tensor(n, qh * d).unwrap(),
        f.cpu.tensor(n, qh * d).unwrap(),
    );
    f.cpu
        .attention_tree(
            &qc,
            &KvView::new(&f.kvc, 0, &f.table, &rc),
            prefix,
            &mask,
            Some(&lc),
            &mut a,
        )
        .unwrap();
    f.cpu
        .attention_tree(
            &qc,
            &KvView::new(&f.kvc, 0, &f.table, &rc),
            prefix,
            &mask,
            None,
            &mut b,
        )
        .unwrap();
    assert_close(
        "reference: full list = dense tree",
        &a.data,
        &b.data,
        1e-6,
        1e-5,
    );
    let (qg, mg) = (ex.upload(&q, n, qh * d).unwrap(), ex.ids(&mask).unwrap());
    let (mut ga, mut gb) = (ex.tensor(n, qh * d).unwrap(), ex.tensor(n, qh * d).unwrap());
    ex.attention_tree(
        &qg,
        &KvView::new(&f.kvg, 0, &f.table, &rg),
        prefix,
        &mg,
        Some(&lg),
        &mut ga,
    )
    .unwrap();
    ex.attention_tree(
        &qg,
        &KvView::new(&f.kvg, 0, &f.table, &rg),
        prefix,
        &mg,
        None,
        &mut gb,
    )
    .unwrap();
    assert_close(
        "gpu: full list = dense tree",
        &ex.download(&ga).unwrap(),
        &ex.download(&gb).unwrap(),
        1e-6,
        1e-5,
    );
    let bad = KeyList { tail_len: 29, ..lg };
    assert!(ex
        .attention_tree(
            &qg,
            &KvView::new(&f.kvg, 0, &f.table, &rg),
            prefix,
            &mg,
            Some(&bad),
            &mut ga
        )
        .is_err());
}

/// A chain is ordinary causal attention: node i at position prefix + i.
#[test]
fn a_chain_tree_is_causal_prefill() {
    let mut ex = gpu();
    let (qh, kh, d, prefix, n) = (9usize, 3usize, 64usize, 900usize, 20usize);
    let len = prefix + n;
    let mut f = fill(&mut ex, kh, d, len, 43);
    let rg = ex.rope_table(&rope_cfg(d, len)).unwrap();
    let mut chain = DraftTree::new(5);
    for i in 1..n {
        chain.push(i - 1, 5).unwrap();
    }
    let q = randn(&mut rng(44), n * qh * d, 1.0);
    let qg = ex.upload(&q, n, qh * d).unwrap();
    let (mut a, mut b) = (ex.tensor(n, qh * d).unwrap(), ex.tensor(n, qh * d).unwrap());
    let mg = ex.ids(&chain.mask().unwrap()).unwrap();
    ex.attention_tree(
        &qg,
        &KvView::new(&f.kvg, 0, &f.table, &rg),
        prefix,
        &mg,
        None,
        &mut a,
    )
    .unwrap();
    ex.attention_prefill(
        &qg,
        &KvView::new(&f.kvg, 0, &f.table, &rg),
        prefix,
        len,
        &mut b,
    )
    .unwrap();
    assert_close(
        "chain = causal",
        &ex.download(&a).unwrap(),
        &ex.download(&b).unwrap(),
        1e-6,
        1e-5,
    );
    // A mask of the wrong size is an error, not a panic.
    let short = ex.ids(&[0u32; 7]).unwrap();
    assert!(ex
        .attention_tree(
            &qg,
            &KvView::new(&f.kvg, 0, &f.table, &rg),
            prefix,
            &short,
            None,
            &mut a
        )
        .is_err());
    let _ = &mut f.cpu;
}

/// Token Recycling: the adjacency update (top-8 per node row, the last of
/// duplicate tokens wins) and the template fill equal the reference's.
#[test]
fn recycling_kernels_match_reference() {
    let mut ex = gpu();
    let mut cpu = kvsieve::reference::RefExecutor::new();
    let (n, vocab) = (19usize, 5003usize);
    let mut logits = randn(&mut rng(50), n * vocab, 4.0);
    // Exact ties inside one row: the lower id must win.
    logits[3 * vocab + 10] = 9.0;
    logits[3 * vocab + 20] = 9.0;
    let mut r = rng(51);
    // Repeated tokens: only the last node with a token writes its row.
    let mut tokens: Vec<u32> = (0..n).map(|_| r.gen_range(0..6u32) * 7).collect();
    tokens[3] = 999; // unique, so node 3 writes its row
    let (lc, lg) = (
        cpu.upload(&logits, n, vocab).unwrap(),
        ex.upload(&logits, n, vocab).unwrap(),
    );
    let mut adj_c = vec![0u32; vocab * 8];
    let mut adj_g = ex.ids(&adj_c).unwrap();
    let tg = ex.ids(&tokens).unwrap();
    cpu.spec_adj_update(&mut adj_c, &lc, &tokens).unwrap();
    ex.spec_adj_update(&mut adj_g, &lg, &tg).unwrap();
    let got = ex.download_ids(&adj_g).unwrap();
    assert_eq!(got, adj_c, "adjacency after the update");
    // Row 3 ties ids 10 and 20 at the top: the lower id comes first.
    assert_eq!(&adj_c[999 * 8..999 * 8 + 2], &[10, 20]);
    // Fill a tree: given tokens and recycled ranks, two levels deep.
    let mut t = DraftTree::new(tokens[3]);
    let a = t.push_recycled(0, 0).unwrap();
    t.push_recycled(a, 3).unwrap();
    let b = t.push(0, 14).unwrap();
    t.push_recycled(b, 7).unwrap();
    let plan = t.plan();
    let mut out_c = vec![0u32; t.len()];
    cpu.spec_draft(&adj_c, &plan, t.len(), &mut out_c).unwrap();
    let (pg, mut og) = (
        ex.ids(&plan).unwrap(),
        ex.ids(&vec![0u32; t.len()]).unwrap(),
    );
    ex.spec_draft(&adj_g, &pg, t.len(), &mut og).unwrap();
    assert_eq!(ex.download_ids(&og).unwrap(), out_c, "draft fill");
    assert_eq!(out_c[1], adj_c[tokens[3] as usize * 8]);
    assert_eq!(out_c[3], 14);
}

/// Committing an accepted path: KV rows moved in order (a later move may read an
/// earlier one's destination) across pages and arenas, as on the reference.
#[test]
fn kv_move_matches_reference() {
    let mut ex = gpu().with_binding_limit(64 * 1024);
    let (kh, d, len) = (3usize, 64usize, 700usize);
    let mut f = fill(&mut ex, kh, d, len, 60);
    let moves = [
        (650usize, 600usize),
        (655, 601),
        (600, 602),
        (130, 699),
        (5, 5),
    ];
    let row = |kv: &kvsieve::reference::RefKv, t: usize, h: usize| {
        let o = kv.offset(&f.table, t, h);
        (kv.k[0][o..o + d].to_vec(), kv.v[0][o..o + d].to_vec())
    };
    // The reference's semantics: sequential copies.
    let mut shadow: std::collections::HashMap<usize, Vec<_>> = std::collections::HashMap::new();
    for &(src, dst) in &moves {
        let src_rows = shadow
            .get(&src)
            .cloned()
            .unwrap_or_else(|| (0..kh).map(|h| row(&f.kvc, src, h)).collect());
        shadow.insert(dst, src_rows);
    }
    f.cpu.kv_move(&mut f.kvc, &f.table, &moves).unwrap();
    for (dst, rows) in shadow {
        for (h, r) in rows.iter().enumerate() {
            assert_eq!(&row(&f.kvc, dst, h), r, "reference row {dst} head {h}");
        }
    }
    ex.kv_move(&mut f.kvg, &f.table, &moves).unwrap();
    // The GPU cache now holds the same rows: decode attention over 0..=dst agrees
    // (any row that differs changes the output).
    let cfg = rope_cfg(d, len);
    let (rc, rg) = (
        f.cpu.rope_table(&cfg).unwrap(),
        ex.rope_table(&cfg).unwrap(),
    );
    for &(_, dst) in &moves {
        let q = randn(&mut rng(61 + dst as u64), 9 * d, 1.0);
        let (qc, qg) = (
            f.cpu.upload(&q, 1, 9 * d).unwrap(),
            ex.upload(&q, 1, 9 * d).unwrap(),
        );
        let (mut oc, mut og) = (
            f.cpu.tensor(1, 9 * d).unwrap(),
            ex.tensor(1, 9 * d).unwrap(),
        );
        f.cpu
            .attention_decode(
                &qc,
                &KvView::new(&f.kvc, 0, &f.table, &rc),
                dst + 1,
                &mut oc,
            )
            .unwrap();
        ex.attention_decode(
            &qg,
            &KvView::new(&f.kvg, 0, &f.table, &rg),
            dst + 1,
            &mut og,
        )
        .unwrap();
        assert_close(
            &format!("after the moves, keys 0..={dst}"),
            &ex.download(&og).unwrap(),
            &oc.data,
            2e-5,
            1e-3,
        );
    }
    assert!(ex.kv_move(&mut f.kvg, &f.table, &[(0, 10_000)]).is_err());
}

/// Runs `spec_accept` for `trials` trials on both executors; returns the words.
fn accept_both(
    ex: &mut GpuExecutor,
    logits: &[f32],
    vocab: usize,
    tree: &DraftTree,
    params: &AcceptParams,
    trials: usize,
) -> (Vec<u32>, Vec<u32>) {
    let n = tree.len();
    let (depth, links) = (tree.max_path(), tree.links());
    let words = trials * accept_stride(depth);
    let mut cpu = RefExecutor::new();
    let lc = cpu.upload(logits, n, vocab).unwrap();
    let mut oc = vec![0u32; words];
    cpu.spec_accept(&lc, &tree.tokens, &links, params, depth, trials, &mut oc)
        .unwrap();
    let lg = ex.upload(logits, n, vocab).unwrap();
    let (tg, kg) = (ex.ids(&tree.tokens).unwrap(), ex.ids(&links).unwrap());
    let mut og = ex.ids(&vec![0u32; words]).unwrap();
    ex.spec_accept(&lg, &tg, &kg, params, depth, trials, &mut og)
        .unwrap();
    (ex.download_ids(&og).unwrap(), oc)
}

#[test]
fn acceptance_matches_reference() {
    let mut ex = gpu();
    // Ragged vocabulary; tokens repeat among siblings; a logit row with ties.
    let vocab = 1000 + 37;
    for (n, seed) in [(1usize, 5u64), (9, 6), (81, 7)] {
        let mut tree = random_tree(n, seed);
        let mut r = rng(seed);
        let mut logits = randn(&mut r, n * vocab, 1.0);
        // Make the drafts likely: each child's token is its parent's argmax
        // (or second best) most of the time.
        for i in 1..n {
            if r.gen_bool(0.7) {
                let p = tree.parents[i].unwrap();
                tree.tokens[i] = r.gen_range(0..3);
                logits[p * vocab + tree.tokens[i] as usize] = 4.0 + r.gen::<f32>();
            }
        }
        if n > 1 {
            logits[vocab + 3] = logits[vocab + 2];
        }
        let greedy = AcceptParams::greedy();
        let (g, c) = accept_both(&mut ex, &logits, vocab, &tree, &greedy, 4);
        assert_eq!(g, c, "greedy acceptance, {n} nodes");
        let d = tree.max_path();
        let acc = Accepted::parse(&g[..accept_stride(d)], d).unwrap();
        let mut best = vec![0u32; n];
        let mut cpu = RefExecutor::new();
        let lc = cpu.upload(&logits, n, vocab).unwrap();
        cpu.argmax(&lc, &mut best).unwrap();
        assert_eq!(
            acc.path,
            greedy_path(&tree, &best),
            "greedy path, {n} nodes"
        );
        assert_eq!(acc.bonus, best[*acc.path.last().unwrap()]);
        // Sampling: the same draws, so the same decisions up to rounding.
        let sampled = AcceptParams {
            top_k: 40,
            temperature: 0.7,
            top_p: 0.95,
            seed: 99 + seed,
        };
        let trials = 300;
        let (g, c) = accept_both(&mut ex, &logits, vocab, &tree, &sampled, trials);
        let s = accept_stride(d);
        let same = g.chunks(s).zip(c.chunks(s)).filter(|(a, b)| a == b).count();
        assert!(
            same * 100 >= trials * 99,
            "{same} of {trials} sampled trials agree, {n} nodes"
        );
        let multi = (0..trials).filter(|t| g[t * s] > 1).count();
        if n > 1 {
            assert!(multi > 0, "no trial accepted a draft, {n} nodes");
        }
    }
}

/// Exact distribution of the tokens one verify step emits under plain
/// sampling: every emitted sequence with its probability.
fn emitted_distribution(
    dists: &[Vec<f64>],
    tree: &DraftTree,
    node: usize,
    prefix: Vec<u32>,
    prob: f64,
    out: &mut Vec<(Vec<u32>, f64)>,
) {
    for (tok, &p) in dists[node].iter().enumerate() {
        if p == 0.0 {
            continue;
        }
        let mut seq = prefix.clone();
        seq.push(tok as u32);
        // The first child with this token is the one accepted.
        match (node + 1..tree.len())
            .find(|&c| tree.parents[c] == Some(node) && tree.tokens[c] == tok as u32)
        {
            Some(c) => emitted_distribution(dists, tree, c, seq, prob * p, out),
            None => out.push((seq, prob * p)),
        }
    }
}

/// The plain sampler's target distribution in f64: top-k, temperature, nucleus.
fn target(row: &[f32], prm: &AcceptParams) -> Vec<f64> {
    let mut idx: Vec<usize> = (0..row.len()).collect();
    idx.sort_by(|&a, &b| row[b].total_cmp(&row[a]).then(a.cmp(&b)));
    idx.truncate(prm.top_k);
    let top = row[idx[0]] as f64;
    let e: Vec<f64> = idx
        .iter()
        .map(|&i| ((row[i] as f64 - top) / prm.temperature as f64).exp())
        .collect();
    let z: f64 = e.iter().sum();
    let (mut acc, mut keep) = (0.0, e.len());
    for (r, v) in e.iter().enumerate() {
        acc += v / z;
        if acc >= prm.top_p as f64 {
            keep = r + 1;
            break;
        }
    }
    let mass: f64 = e[..keep].iter().sum();
    let mut p = vec![0.0; row.len()];
    for r in 0..keep {
        p[idx[r]] = e[r] / mass;
    }
    p
}

/// Pearson's chi-square of observed sequence counts against the exact
/// distribution, cells with expectation below 5 pooled; returns (statistic,
/// critical value at significance 0.001).
fn chi_square(words: &[u32], depth: usize, trials: usize, dist: &[(Vec<u32>, f64)]) -> (f64, f64) {
    let s = accept_stride(depth);
    let mut counts = std::collections::HashMap::new();
    for t in 0..trials {
        let acc = Accepted::parse(&words[t * s..(t + 1) * s], depth).unwrap();
        *counts.entry(acc.emitted()).or_insert(0usize) += 1;
    }
    let known: usize = dist
        .iter()
        .map(|(q, _)| counts.get(q).copied().unwrap_or(0))
        .sum();
    assert_eq!(known, trials, "a trial emitted a sequence of probability 0");
    let (mut stat, mut cells, mut pool_o, mut pool_e) = (0.0, 0usize, 0.0, 0.0);
    for (q, p) in dist {
        let (o, e) = (
            counts.get(q).copied().unwrap_or(0) as f64,
            p * trials as f64,
        );
        if e < 5.0 {
            pool_o += o;
            pool_e += e;
        } else {
            stat += (o - e).powi(2) / e;
            cells += 1;
        }
    }
    if pool_e > 0.0 {
        stat += (pool_o - pool_e).powi(2) / pool_e;
        cells += 1;
    }
    // Wilson-Hilferty quantile of chi-square(df) at 1 - 0.001 (z = 3.0902).
    let df = (cells - 1) as f64;
    let h = 2.0 / (9.0 * df);
    (stat, df * (1.0 - h + 3.0902 * h.sqrt()).powi(3))
}

/// Lossless sampling: the emitted tokens of one verify step follow plain
/// sampling's distribution exactly (chi-square at significance 0.001, on both
/// executors, with a vocabulary of 6 and a tree whose nodes share tokens).
#[test]
fn speculative_sampling_is_lossless() {
    let vocab = 6;
    // root -> {2, 0, 5, 2}; node 1 (2) -> {1, 3}; node 2 (0) -> {2}; node 5 (3) -> {4}.
    let mut tree = DraftTree::new(3);
    for (p, t) in [
        (0, 2),
        (0, 0),
        (0, 5),
        (0, 2),
        (1, 1),
        (1, 3),
        (2, 2),
        (6, 4),
    ] {
        tree.push(p, t).unwrap();
    }
    let n = tree.len();
    let logits = randn(&mut rng(17), n * vocab, 1.2);
    let mut ex = gpu();
    for (prm, trials) in [
        (
            AcceptParams {
                top_k: 5,
                temperature: 0.8,
                top_p: 0.9,
                seed: 1,
            },
            20_000,
        ),
        (
            AcceptParams {
                top_k: 6,
                temperature: 1.3,
                top_p: 1.0,
                seed: 2,
            },
            20_000,
        ),
    ] {
        let dists: Vec<Vec<f64>> = (0..n)
            .map(|i| target(&logits[i * vocab..(i + 1) * vocab], &prm))
            .collect();
        let mut dist = Vec::new();
        emitted_distribution(&dists, &tree, 0, Vec::new(), 1.0, &mut dist);
        let total: f64 = dist.iter().map(|d| d.1).sum();
        assert!((total - 1.0).abs() < 1e-9);
        let (g, c) = accept_both(&mut ex, &logits, vocab, &tree, &prm, trials);
        for (who, words) in [("gpu", &g), ("reference", &c)] {
            let (stat, crit) = chi_square(words, tree.max_path(), trials, &dist);
            println!("{who} {prm:?}: chi-square {stat:.1}, critical {crit:.1}");
            assert!(
                stat < crit,
                "{who}: chi-square {stat:.1} >= {crit:.1} for {prm:?}"
            );
        }
    }
}
