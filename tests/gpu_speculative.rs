//! Speculative-decoding kernels against the reference executor: tree attention
//! over a prefix plus a draft tree's ancestors.

mod common;

use common::*;
use kvsieve::kernels::GpuExecutor;
use kvsieve::ops::{Ops, RopeConfig};
use kvsieve::speculative::DraftTree;
use rand::Rng;

fn rope_cfg(d: usize, len: usize) -> RopeConfig {
    RopeConfig {
        head_dim: d,
        theta: 10000.0,
        scaling: None,
        max_positions: len,
    }
}

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
