//! Speculative-decoding kernels against the reference executor: tree attention
//! over a prefix plus a draft tree's ancestors.

mod common;

use common::*;
use kvsieve::kernels::GpuExecutor;
use kvsieve::ops::Ops;
use kvsieve::speculative::DraftTree;
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

fn tree_case(
    ex: &mut GpuExecutor,
    qh: usize,
    kh: usize,
    d: usize,
    prefix: usize,
    tree: &DraftTree,
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
    let qc = f.cpu.upload(&q, n, qh * d).unwrap();
    let mut oc = f.cpu.tensor(n, qh * d).unwrap();
    f.cpu
        .attention_tree(&qc, &f.kvc, 0, &f.table, prefix, &mask, &rc, &mut oc)
        .unwrap();
    let qg = ex.upload(&q, n, qh * d).unwrap();
    let mg = ex.ids(&mask).unwrap();
    let mut og = ex.tensor(n, qh * d).unwrap();
    ex.attention_tree(&qg, &f.kvg, 0, &f.table, prefix, &mg, &rg, &mut og)
        .unwrap();
    assert_close(
        &format!("tree attention {qh}/{kh}/{d}, {n} nodes after {prefix}"),
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
        tree_case(&mut ex, 9, 3, 64, 1500, &random_tree(37, 1));
        tree_case(&mut ex, 32, 8, 128, 300, &random_tree(128, 2));
        tree_case(&mut ex, 9, 3, 64, 1, &random_tree(1, 3));
    }
    // A prefix spread over many arenas.
    let mut ex = gpu().with_binding_limit(64 * 1024);
    tree_case(&mut ex, 9, 3, 64, 700, &random_tree(81, 4));
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
    ex.attention_tree(&qg, &f.kvg, 0, &f.table, prefix, &mg, &rg, &mut a)
        .unwrap();
    ex.attention_prefill(&qg, &f.kvg, 0, &f.table, prefix, len, &rg, &mut b)
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
        .attention_tree(&qg, &f.kvg, 0, &f.table, prefix, &short, &rg, &mut a)
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
            .attention_decode(&qc, &f.kvc, 0, &f.table, dst + 1, &rc, &mut oc)
            .unwrap();
        ex.attention_decode(&qg, &f.kvg, 0, &f.table, dst + 1, &rg, &mut og)
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
