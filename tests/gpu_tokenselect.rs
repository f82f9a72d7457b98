//! TokenSelect kernels against the reference executor: scoring, soft vote, radix
//! top-k (exact, with ties), and sparse decode over a key list.

mod common;

use common::*;
use kvsieve::attention::dense_attention;
use kvsieve::kernels::GpuExecutor;
use kvsieve::ops::prelude::*;
use kvsieve::ops::{GqaMap, KeyList, Selection};
use kvsieve::reference::{tokenselect, RefExecutor, RefTensor};

/// Scores and votes agree; the GPU's selection equals the reference's except where
/// two votes are within float noise of the k-th one.
#[allow(clippy::too_many_arguments)]
fn check_selection(
    ex: &mut GpuExecutor,
    qh: usize,
    kh: usize,
    d: usize,
    len: usize,
    k: usize,
    seed: u64,
    gqa: GqaMap,
) {
    let mut f = fill(ex, kh, d, len, seed);
    let (n_init, n_local) = (16usize, 64usize);
    let (begin, n) = (n_init, len - n_init - n_local);
    let q = randn(&mut rng(seed + 1), qh * d, 2.0);
    let qc = f.cpu.upload(&q, 1, qh * d).unwrap();
    let mut sc = f.cpu.tensor(qh, n).unwrap();
    f.cpu
        .ts_score(
            &qc,
            &KvView::new(&f.kvc, 0, &f.table, &f.ropec),
            begin,
            n,
            gqa,
            &mut sc,
            None,
            None,
        )
        .unwrap();
    let mut vc = f.cpu.tensor(1, n).unwrap();
    f.cpu.ts_vote(&sc, qh, n, &mut vc, None).unwrap();
    let mut selc = vec![0u32; k];
    f.cpu
        .ts_top_k(&vc, n, k, begin, &mut selc, None, None)
        .unwrap();

    let qg = ex.upload(&q, 1, qh * d).unwrap();
    let mut sg = ex.tensor(qh, n).unwrap();
    ex.ts_score(
        &qg,
        &KvView::new(&f.kvg, 0, &f.table, &f.ropeg),
        begin,
        n,
        gqa,
        &mut sg,
        None,
        None,
    )
    .unwrap();
    assert_close("ts_score", &ex.download(&sg).unwrap(), &sc.data, 1e-4, 1e-5);
    let mut vg = ex.tensor(1, n).unwrap();
    ex.ts_vote(&sg, qh, n, &mut vg, None).unwrap();
    let votes_gpu = ex.download(&vg).unwrap();
    // Unscaled scores reach tens; exp turns their float-order differences (~1e-5)
    // into relative vote differences of ~1e-4, and WGSL's exp is looser than libm's.
    assert_close("ts_vote", &votes_gpu, &vc.data, 1e-7, 1e-3);
    let mut selg = ex.ids(&vec![0u32; k]).unwrap();
    ex.ts_top_k(&vg, n, k, begin, &mut selg, None, None)
        .unwrap();
    let got = ex.download_ids(&selg).unwrap();
    // Exactly the reference's choice on the GPU's own votes.
    assert_eq!(
        got,
        tokenselect::top_k(&votes_gpu, k, begin),
        "radix top-k vs sort on the same votes"
    );
    // And the same set as the reference up to near-ties.
    let mut sorted = vc.data.clone();
    sorted.sort_by(|a, b| b.total_cmp(a));
    let kth = sorted[k - 1];
    let want: std::collections::HashSet<u32> = selc.iter().copied().collect();
    for &g in &got {
        if !want.contains(&g) {
            let v = vc.data[(g as usize) - begin];
            assert!(
                (v - kth).abs() <= 1e-5 * kth.abs().max(1e-12) + 1e-9,
                "{g} selected with vote {v}, k-th is {kth}"
            );
        }
    }
    assert!(
        got.windows(2).all(|w| w[0] < w[1]),
        "selection sorted ascending"
    );
}

#[test]
fn selection_matches_reference() {
    let mut ex = gpu();
    check_selection(&mut ex, 9, 3, 64, 1000, 64, 1, GqaMap::Grouped);
    check_selection(&mut ex, 9, 3, 64, 1000, 64, 1, GqaMap::Modulo);
    check_selection(&mut ex, 32, 8, 128, 20_000 + 37, 2048, 2, GqaMap::Modulo);
    check_selection(&mut ex, 9, 3, 64, 131_072, 2048, 3, GqaMap::Grouped);
}

#[test]
fn radix_top_k_breaks_ties_by_index() {
    let mut ex = gpu();
    // Many exact ties, zeros and ragged lengths: one workgroup below 32K
    // candidates, the multi-pass version above.
    for (n, k) in [
        (70_001usize, 1usize),
        (70_001, 100),
        (70_001, 5000),
        (70_001, 8192),
        (5_003, 1),
        (5_003, 700),
        (32_768, 32_768),
    ] {
        let votes: Vec<f32> = (0..n).map(|i| ((i * 7919) % 13) as f32 * 0.25).collect();
        let want = tokenselect::top_k(&votes, k, 5);
        let vg = ex.upload(&votes, 1, n).unwrap();
        let mut out = ex.ids(&vec![0u32; k]).unwrap();
        ex.ts_top_k(&vg, n, k, 5, &mut out, None, None).unwrap();
        assert_eq!(ex.download_ids(&out).unwrap(), want, "n = {n}, k = {k}");
    }
}

#[test]
fn scoring_across_arenas() {
    // 64 KiB bindings: 64-token pages of 3 x 64 halves (24 KiB) -> 2 pages per arena.
    let mut ex = gpu().with_binding_limit(64 * 1024);
    check_selection(&mut ex, 9, 3, 64, 3000, 128, 4, GqaMap::Grouped);
}

fn list_attention(
    ex: &mut GpuExecutor,
    qh: usize,
    kh: usize,
    d: usize,
    len: usize,
    k: usize,
    compact: bool,
) {
    let mut f = fill(ex, kh, d, len, 9);
    let rope_cfg = rope_cfg(d, len);
    let (rc, rg) = (
        f.cpu.rope_table(&rope_cfg).unwrap(),
        ex.rope_table(&rope_cfg).unwrap(),
    );
    let (n_init, n_local) = (7usize, 33usize);
    let mut sel: Vec<u32> = (0..k)
        .map(|i| (n_init + (i * 7919) % (len - n_init - n_local)) as u32)
        .collect();
    sel.sort_unstable();
    sel.dedup();
    let q = randn(&mut rng(5), qh * d, 1.0);
    let qc = f.cpu.upload(&q, 1, qh * d).unwrap();
    let mut oc = f.cpu.tensor(1, qh * d).unwrap();
    let list_c = KeyList {
        n_init,
        selected: &sel,
        n_selected: sel.len(),
        tail_start: len - n_local,
        tail_len: n_local,
        compact,
        selection: Selection::Shared,
    };
    f.cpu
        .attention_decode_list(
            &qc,
            &KvView::new(&f.kvc, 0, &f.table, &rc),
            len,
            &list_c,
            &mut oc,
        )
        .unwrap();
    let sg = ex.ids(&sel).unwrap();
    let qg = ex.upload(&q, 1, qh * d).unwrap();
    let mut og = ex.tensor(1, qh * d).unwrap();
    let list_g = KeyList {
        n_init,
        selected: &sg,
        n_selected: sel.len(),
        tail_start: len - n_local,
        tail_len: n_local,
        compact,
        selection: Selection::Shared,
    };
    ex.attention_decode_list(
        &qg,
        &KvView::new(&f.kvg, 0, &f.table, &rg),
        len,
        &list_g,
        &mut og,
    )
    .unwrap();
    assert_close(
        &format!("list attention compact={compact}"),
        &ex.download(&og).unwrap(),
        &oc.data,
        2e-5,
        1e-3,
    );
    let _ = f.layout;
}

#[test]
fn list_attention_matches_reference() {
    for mut ex in gpu_variants() {
        list_attention(&mut ex, 9, 3, 64, 5000, 300, true);
        list_attention(&mut ex, 32, 8, 128, 3000, 1000, false);
    }
}

#[test]
fn a_list_covering_everything_is_dense_attention() {
    let mut ex = gpu();
    let (qh, kh, d, len) = (9usize, 3usize, 64usize, 777usize);
    let mut f = fill(&mut ex, kh, d, len, 11);
    let rope_cfg = rope_cfg(d, len);
    let rg = ex.rope_table(&rope_cfg).unwrap();
    let q = randn(&mut rng(12), qh * d, 1.0);
    let qg = ex.upload(&q, 1, qh * d).unwrap();
    let mut dense = ex.tensor(1, qh * d).unwrap();
    dense_attention(
        &mut ex,
        &qg,
        &KvView::new(&f.kvg, 0, &f.table, &rg),
        len - 1,
        len,
        &mut dense,
    )
    .unwrap();
    // Sinks 0..100, every token from 100 to len-50 selected, window of 50.
    let sel: Vec<u32> = (100..(len - 50) as u32).collect();
    let sg = ex.ids(&sel).unwrap();
    for compact in [false, true] {
        let list = KeyList {
            n_init: 100,
            selected: &sg,
            n_selected: sel.len(),
            tail_start: len - 50,
            tail_len: 50,
            compact,
            selection: Selection::Shared,
        };
        let mut out = ex.tensor(1, qh * d).unwrap();
        ex.attention_decode_list(
            &qg,
            &KvView::new(&f.kvg, 0, &f.table, &rg),
            len,
            &list,
            &mut out,
        )
        .unwrap();
        // The list is 0..len in order, so ranks equal positions either way.
        assert_close(
            "full list = dense",
            &ex.download(&out).unwrap(),
            &ex.download(&dense).unwrap(),
            1e-6,
            1e-5,
        );
    }
    let _: &RefTensor = &f.cpu.tensor(1, 1).unwrap();
}

/// Sparse prefill: query rows `r0..r0 + m` of a `rows`-row tensor at logical
/// `q_start..` over sinks, `k` spread selections and a window ending at the last
/// query; GPU against reference.
#[allow(clippy::too_many_arguments)]
fn prefill_list(
    ex: &mut GpuExecutor,
    qh: usize,
    kh: usize,
    d: usize,
    len: usize,
    k: usize,
    rows: usize,
    r0: usize,
    m: usize,
    compact: bool,
) {
    let mut f = fill(ex, kh, d, len, 21);
    let rope_cfg = rope_cfg(d, len);
    let (rc, rg) = (
        f.cpu.rope_table(&rope_cfg).unwrap(),
        ex.rope_table(&rope_cfg).unwrap(),
    );
    let q_start = len - m;
    let (n_init, n_local) = (7usize, 33usize);
    let tail_start = q_start + 1 - n_local;
    let mut sel: Vec<u32> = (0..k)
        .map(|i| (n_init + (i * 7919) % (tail_start - n_init)) as u32)
        .collect();
    sel.sort_unstable();
    sel.dedup();
    let q = randn(&mut rng(6), rows * qh * d, 1.0);
    let qc = f.cpu.upload(&q, rows, qh * d).unwrap();
    let mut oc = f.cpu.tensor(rows, qh * d).unwrap();
    let list_c = KeyList {
        n_init,
        selected: &sel,
        n_selected: sel.len(),
        tail_start,
        tail_len: len - tail_start,
        compact,
        selection: Selection::Shared,
    };
    f.cpu
        .attention_prefill_list(
            &qc,
            &KvView::new(&f.kvc, 0, &f.table, &rc),
            r0..r0 + m,
            q_start,
            &list_c,
            &mut oc,
        )
        .unwrap();
    let sg = ex.ids(&sel).unwrap();
    let qg = ex.upload(&q, rows, qh * d).unwrap();
    let mut og = ex.tensor(rows, qh * d).unwrap();
    let list_g = list_c.with_selected(&sg);
    ex.attention_prefill_list(
        &qg,
        &KvView::new(&f.kvg, 0, &f.table, &rg),
        r0..r0 + m,
        q_start,
        &list_g,
        &mut og,
    )
    .unwrap();
    let got = ex.download(&og).unwrap();
    let w = qh * d;
    assert_close(
        &format!("prefill list {qh}/{kh}/{d} compact={compact}"),
        &got[r0 * w..(r0 + m) * w],
        &oc.data[r0 * w..(r0 + m) * w],
        2e-5,
        1e-3,
    );
    // Rows outside the range are untouched.
    assert!(got[..r0 * w]
        .iter()
        .chain(&got[(r0 + m) * w..])
        .all(|&x| x == 0.0));
}

#[test]
fn prefill_list_matches_reference() {
    for mut ex in gpu_variants() {
        // A list longer than one pass on llvmpipe (about 900 keys), ragged rows.
        prefill_list(&mut ex, 9, 3, 64, 4000, 1000, 150, 20, 110, true);
        prefill_list(&mut ex, 32, 8, 128, 2500, 300, 70, 0, 70, false);
    }
    // Keys spread over many arenas (2 pages per 64 KiB binding).
    let mut ex = gpu().with_binding_limit(64 * 1024);
    prefill_list(&mut ex, 9, 3, 64, 3000, 500, 100, 37, 63, true);
}

/// A list of every earlier token at true positions is dense causal attention.
#[test]
fn a_full_prefill_list_is_dense_prefill() {
    let mut ex = gpu();
    let (qh, kh, d, len, n) = (9usize, 3usize, 64usize, 1500usize, 200usize);
    let mut f = fill(&mut ex, kh, d, len, 13);
    let rope_cfg = rope_cfg(d, len);
    let (rc, rg) = (
        f.cpu.rope_table(&rope_cfg).unwrap(),
        ex.rope_table(&rope_cfg).unwrap(),
    );
    let q = randn(&mut rng(14), n * qh * d, 1.0);
    let q_start = len - n;
    let none: Vec<u32> = Vec::new();
    let list_c = KeyList {
        n_init: 0,
        selected: &none,
        n_selected: 0,
        tail_start: 0,
        tail_len: len,
        compact: false,
        selection: Selection::Shared,
    };
    let qc = f.cpu.upload(&q, n, qh * d).unwrap();
    let (mut dc, mut lc) = (
        f.cpu.tensor(n, qh * d).unwrap(),
        f.cpu.tensor(n, qh * d).unwrap(),
    );
    f.cpu
        .attention_prefill(
            &qc,
            &KvView::new(&f.kvc, 0, &f.table, &rc),
            q_start,
            len,
            &mut dc,
        )
        .unwrap();
    f.cpu
        .attention_prefill_list(
            &qc,
            &KvView::new(&f.kvc, 0, &f.table, &rc),
            0..n,
            q_start,
            &list_c,
            &mut lc,
        )
        .unwrap();
    assert_close(
        "reference: full list = dense",
        &lc.data,
        &dc.data,
        1e-6,
        1e-5,
    );
    let sg = ex.ids(&[0]).unwrap();
    let qg = ex.upload(&q, n, qh * d).unwrap();
    let (mut dg, mut lg) = (ex.tensor(n, qh * d).unwrap(), ex.tensor(n, qh * d).unwrap());
    ex.attention_prefill(
        &qg,
        &KvView::new(&f.kvg, 0, &f.table, &rg),
        q_start,
        len,
        &mut dg,
    )
    .unwrap();
    let list_g = list_c.with_selected(&sg);
    ex.attention_prefill_list(
        &qg,
        &KvView::new(&f.kvg, 0, &f.table, &rg),
        0..n,
        q_start,
        &list_g,
        &mut lg,
    )
    .unwrap();
    assert_close(
        "GPU: full list = dense",
        &ex.download(&lg).unwrap(),
        &ex.download(&dg).unwrap(),
        1e-6,
        1e-5,
    );
    // Bad lists are errors, not panics: a window that does not end at the last query.
    let bad = KeyList {
        tail_len: len - 1,
        ..list_g
    };
    assert!(ex
        .attention_prefill_list(
            &qg,
            &KvView::new(&f.kvg, 0, &f.table, &rg),
            0..n,
            q_start,
            &bad,
            &mut lg
        )
        .is_err());
}

#[test]
fn mean_rows_matches_reference() {
    let mut ex = gpu();
    let mut cpu = RefExecutor::new();
    let (rows, cols) = (77usize, 576usize);
    let x = randn(&mut rng(15), rows * cols, 1.0);
    let (xc, xg) = (
        cpu.upload(&x, rows, cols).unwrap(),
        ex.upload(&x, rows, cols).unwrap(),
    );
    let (mut oc, mut og) = (cpu.tensor(1, cols).unwrap(), ex.tensor(1, cols).unwrap());
    cpu.mean_rows(&xc, 5..69, &mut oc).unwrap();
    ex.mean_rows(&xg, 5..69, &mut og).unwrap();
    let want: Vec<f32> = (0..cols)
        .map(|c| (5..69).map(|r| x[r * cols + c]).sum::<f32>() / 64.0)
        .collect();
    assert_close("mean_rows reference", &oc.data, &want, 1e-6, 1e-5);
    assert_close(
        "mean_rows GPU",
        &ex.download(&og).unwrap(),
        &want,
        1e-6,
        1e-5,
    );
    assert!(ex.mean_rows(&xg, 70..80, &mut og).is_err());
}

/// The Selection Cache decides on the device exactly as the reference does: same
/// hits and misses over a sequence of queries, and a hit keeps the old selection
/// (the gated dispatches run zero workgroups).
#[test]
fn selection_cache_decisions_agree() {
    use kvsieve::ops::SelectPlan;
    let mut ex = gpu();
    let (qh, kh, d, len, k) = (9usize, 3usize, 64usize, 4000usize, 256usize);
    let mut f = fill(&mut ex, kh, d, len, 21);
    let (begin, n) = (16usize, len - 16 - 64);
    let plan = SelectPlan {
        layer: 0,
        q_heads: qh,
        begin,
        n,
        k,
        prefilter: None,
    };
    let mut gc = f.cpu.ts_gate().unwrap();
    let mut gg = ex.ts_gate().unwrap();
    let mut cached_c = f.cpu.tensor(1, qh * d + 1).unwrap();
    let mut cached_g = ex.tensor(1, qh * d + 1).unwrap();
    let mut sc = f.cpu.tensor(qh, n).unwrap();
    let mut vc = f.cpu.tensor(1, n).unwrap();
    let mut selc = vec![0u32; k];
    let mut sg = ex.tensor(qh, n).unwrap();
    let mut vg = ex.tensor(1, n).unwrap();
    let mut selg = ex.ids(&vec![0u32; k]).unwrap();
    let base = randn(&mut rng(30), qh * d, 1.0);
    // Small drifts hit, a jump misses, drifting from there hits again.
    let jump = randn(&mut rng(31), qh * d, 1.0);
    let queries: Vec<Vec<f32>> = vec![
        base.clone(),
        base.iter().map(|x| x * 1.01 + 0.01).collect(),
        base.iter().map(|x| x + 0.05).collect(),
        jump.clone(),
        jump.iter().map(|x| x * 0.98).collect(),
    ];
    let mut last_gpu_selection = Vec::new();
    for (step, q) in queries.iter().enumerate() {
        let qc = f.cpu.upload(q, 1, qh * d).unwrap();
        f.cpu
            .ts_cache_check(
                &qc,
                &mut cached_c,
                0.9,
                &plan,
                &KvView::new(&f.kvc, 0, &f.table, &f.ropec),
                &mut gc,
            )
            .unwrap();
        f.cpu
            .ts_score(
                &qc,
                &KvView::new(&f.kvc, 0, &f.table, &f.ropec),
                begin,
                n,
                GqaMap::Grouped,
                &mut sc,
                Some(&gc),
                None,
            )
            .unwrap();
        f.cpu.ts_vote(&sc, qh, n, &mut vc, Some(&gc)).unwrap();
        f.cpu
            .ts_top_k(&vc, n, k, begin, &mut selc, Some(&gc), None)
            .unwrap();
        let qg = ex.upload(q, 1, qh * d).unwrap();
        ex.ts_cache_check(
            &qg,
            &mut cached_g,
            0.9,
            &plan,
            &KvView::new(&f.kvg, 0, &f.table, &f.ropeg),
            &mut gg,
        )
        .unwrap();
        ex.ts_score(
            &qg,
            &KvView::new(&f.kvg, 0, &f.table, &f.ropeg),
            begin,
            n,
            GqaMap::Grouped,
            &mut sg,
            Some(&gg),
            None,
        )
        .unwrap();
        ex.ts_vote(&sg, qh, n, &mut vg, Some(&gg)).unwrap();
        ex.ts_top_k(&vg, n, k, begin, &mut selg, Some(&gg), None)
            .unwrap();
        let got = ex.download_ids(&selg).unwrap();
        let (hits_c, misses_c) = f.cpu.ts_gate_counts(&gc).unwrap();
        let (hits_g, misses_g) = ex.ts_gate_counts(&gg).unwrap();
        assert_eq!((hits_g, misses_g), (hits_c, misses_c), "step {step}");
        if gc.hit {
            assert_eq!(
                got, last_gpu_selection,
                "step {step}: a hit must keep the selection"
            );
        } else {
            let shared = got.iter().filter(|x| selc.contains(x)).count();
            assert!(shared + 2 >= k, "step {step}: {shared} of {k} shared");
        }
        last_gpu_selection = got;
    }
    assert_eq!(
        f.cpu.ts_gate_counts(&gc).unwrap(),
        (3, 2),
        "hit, hit, miss, hit after the first miss"
    );
}

/// What a hierarchical selection produced on one executor.
struct Hier {
    block_votes: Vec<f32>,
    blocks: Vec<u32>,
    votes: Vec<f32>,
    selected: Vec<u32>,
}

/// The hierarchical selection as the policy runs it: block scores from the
/// unrotated bounds, their soft vote, the `top` best blocks (or `given` ones),
/// then score, vote and top-k over those blocks' tokens.
#[allow(clippy::too_many_arguments)]
fn hierarchical<E: Ops>(
    ex: &mut E,
    q: &E::Tensor,
    cache: &KvView<'_, E>,
    bounds: &E::Bounds,
    (qh, begin, n, k): (usize, usize, usize, usize),
    (top, block): (usize, usize),
    gate: Option<&E::Gate>,
    given: Option<&[u32]>,
) -> Hier {
    use kvsieve::ops::Prefilter;
    let blocks = begin / block..(begin + n).div_ceil(block);
    let nb = blocks.len();
    let cols = nb.max(top * block);
    let mut scores = ex.tensor(qh, cols).unwrap();
    let mut votes = ex.tensor(1, cols).unwrap();
    let mut ids = ex.ids(&vec![0u32; top]).unwrap();
    ex.block_scores(
        q,
        bounds,
        0,
        cache.table,
        blocks.clone(),
        0.25,
        &mut scores,
        gate,
    )
    .unwrap();
    ex.ts_vote(&scores, qh, nb, &mut votes, gate).unwrap();
    ex.ts_top_k(&votes, nb, top, blocks.start, &mut ids, gate, None)
        .unwrap();
    let block_votes = ex.download(&votes).unwrap()[..nb].to_vec();
    if let Some(b) = given {
        ids = ex.ids(b).unwrap();
    }
    let pf = Prefilter {
        blocks: &ids,
        count: top,
        block,
    };
    let mut sel = ex.ids(&vec![0u32; k]).unwrap();
    ex.ts_score(
        q,
        cache,
        begin,
        n,
        GqaMap::Grouped,
        &mut scores,
        gate,
        Some(&pf),
    )
    .unwrap();
    ex.ts_vote(&scores, qh, pf.slots(), &mut votes, gate)
        .unwrap();
    ex.ts_top_k(&votes, pf.slots(), k, begin, &mut sel, gate, Some(&pf))
        .unwrap();
    Hier {
        block_votes,
        blocks: ex.download_ids(&ids).unwrap(),
        votes: ex.download(&votes).unwrap()[..pf.slots()].to_vec(),
        selected: ex.download_ids(&sel).unwrap(),
    }
}

/// `got` holds `want` except members whose value (by `value`) is within float
/// noise of the k-th largest of `all`.
fn same_top_up_to_ties(
    what: &str,
    got: &[u32],
    want: &[u32],
    all: &[f32],
    value: impl Fn(u32) -> f32,
) {
    let mut sorted = all.to_vec();
    sorted.sort_by(|a, b| b.total_cmp(a));
    let kth = sorted[want.len() - 1];
    for &g in got {
        if !want.contains(&g) {
            let v = value(g);
            assert!(
                (v - kth).abs() <= 1e-4 * kth.abs().max(1e-12) + 1e-9,
                "{what}: {g} chosen with {v}, k-th is {kth}"
            );
        }
    }
    assert!(got.windows(2).all(|w| w[0] < w[1]), "{what}: ascending");
}

/// Hierarchical TokenSelect on the GPU against the reference: the block stage's
/// votes and choice, then (on the GPU's blocks) the token stage's choice; every
/// selected token lies in a chosen block and in the candidate range. Ragged
/// ranges (candidates start and end inside blocks), GQA groups of 3 and 4, many
/// arenas; the gated path (Selection Cache) selects the same and a hit keeps it.
#[test]
fn hierarchical_selection_matches_reference() {
    use kvsieve::ops::{PrefilterPlan, SelectPlan};
    let cases = [
        // qh, kh, d, len, k, blocks kept, block, begin, binding limit
        (
            9usize,
            3usize,
            64usize,
            3000 + 13,
            256usize,
            40usize,
            16usize,
            13usize,
            None,
        ),
        (32, 8, 128, 20_000 + 37, 1024, 100, 16, 128, None),
        (9, 3, 64, 2400 + 5, 300, 90, 8, 7, Some(128 * 1024)),
    ];
    for (qh, kh, d, len, k, top, block, begin, limit) in cases {
        let mut ex = match limit {
            Some(l) => gpu().with_binding_limit(l),
            None => gpu(),
        };
        let what = format!("{qh}/{kh}/{d} at {len}, k {k}, {top} blocks of {block}");
        let mut f = fill(&mut ex, kh, d, len, 71);
        let n = len - begin - 61;
        let rope = rope_cfg(d, len);
        let (rc, rg) = (
            f.cpu.rope_table(&rope).unwrap(),
            ex.rope_table(&rope).unwrap(),
        );
        let mut bc = f.cpu.block_bounds(&f.layout, block, false).unwrap();
        let mut bg = ex.block_bounds(&f.layout, block, false).unwrap();
        f.cpu
            .kv_bounds(&KvView::new(&f.kvc, 0, &f.table, &rc), &mut bc, 0..len)
            .unwrap();
        ex.kv_bounds(&KvView::new(&f.kvg, 0, &f.table, &rg), &mut bg, 0..len)
            .unwrap();
        let q = randn(&mut rng(72), qh * d, 1.0);
        let (qc, qg) = (
            f.cpu.upload(&q, 1, qh * d).unwrap(),
            ex.upload(&q, 1, qh * d).unwrap(),
        );
        let shape = (qh, begin, n, k);
        let c = hierarchical(
            &mut f.cpu,
            &qc,
            &KvView::new(&f.kvc, 0, &f.table, &f.ropec),
            &bc,
            shape,
            (top, block),
            None,
            None,
        );
        let g = hierarchical(
            &mut ex,
            &qg,
            &KvView::new(&f.kvg, 0, &f.table, &f.ropeg),
            &bg,
            shape,
            (top, block),
            None,
            None,
        );
        assert_close(
            &format!("{what}: block votes"),
            &g.block_votes,
            &c.block_votes,
            1e-7,
            1e-3,
        );
        let first = begin / block;
        same_top_up_to_ties(
            &format!("{what}: blocks"),
            &g.blocks,
            &c.blocks,
            &c.block_votes,
            |b| c.block_votes[b as usize - first],
        );
        // The token stage on the GPU's blocks.
        let c = hierarchical(
            &mut f.cpu,
            &qc,
            &KvView::new(&f.kvc, 0, &f.table, &f.ropec),
            &bc,
            shape,
            (top, block),
            None,
            Some(&g.blocks),
        );
        assert_close(
            &format!("{what}: token votes"),
            &g.votes,
            &c.votes,
            1e-7,
            1e-3,
        );
        let slot_of = |t: u32| {
            let i = g
                .blocks
                .iter()
                .position(|&b| b as usize == t as usize / block)
                .unwrap();
            i * block + t as usize % block
        };
        for &t in &g.selected {
            let t = t as usize;
            assert!(
                (begin..begin + n).contains(&t),
                "{what}: token {t} outside the candidates"
            );
            assert!(
                g.blocks.contains(&((t / block) as u32)),
                "{what}: token {t} outside the blocks"
            );
        }
        same_top_up_to_ties(
            &format!("{what}: tokens"),
            &g.selected,
            &c.selected,
            &c.votes,
            |t| c.votes[slot_of(t)],
        );
        // Gated: a miss selects the same, a hit keeps it.
        let plan = SelectPlan {
            layer: 0,
            q_heads: qh,
            begin,
            n,
            k,
            prefilter: Some(PrefilterPlan {
                block,
                first_block: first,
                n_blocks: (begin + n).div_ceil(block) - first,
                top,
            }),
        };
        let mut gate = ex.ts_gate().unwrap();
        let mut cached = ex.tensor(1, qh * d + 1).unwrap();
        for step in 0..2 {
            ex.ts_cache_check(
                &qg,
                &mut cached,
                0.9,
                &plan,
                &KvView::new(&f.kvg, 0, &f.table, &f.ropeg),
                &mut gate,
            )
            .unwrap();
            let gated = hierarchical(
                &mut ex,
                &qg,
                &KvView::new(&f.kvg, 0, &f.table, &f.ropeg),
                &bg,
                shape,
                (top, block),
                Some(&gate),
                None,
            );
            if step == 0 {
                assert_eq!(gated.selected, g.selected, "{what}: gated miss");
            }
        }
        assert_eq!(
            ex.ts_gate_counts(&gate).unwrap(),
            (1, 1),
            "{what}: one miss, one hit"
        );
    }
}
