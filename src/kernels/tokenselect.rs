//! TokenSelect selection on the GPU (`tokenselect.wgsl`): scoring over the
//! candidate keys, per-head softmax statistics and the soft vote, and a radix top-k
//! (4 passes of 8 bits over the vote's float bits) whose output is sorted by index.

use super::{GpuExecutor, GpuIds, GpuKv, GpuTensor};
use crate::attention::PageTable;
use crate::error::{shape_err, Result};
use crate::gpu::Binding;
use crate::ops::check;
use crate::shaders;

fn params(
    n: usize,
    begin: usize,
    qh: usize,
    kv: &GpuKv,
    arena: usize,
    k: usize,
    pass: u32,
) -> [u32; 12] {
    let l = kv.layout;
    [
        n as u32,
        begin as u32,
        qh as u32,
        l.kv_heads as u32,
        l.head_dim as u32,
        l.page_size as u32,
        (arena * kv.pages_per_arena) as u32,
        kv.pages_per_arena as u32,
        k as u32,
        pass,
        0,
        0,
    ]
}

#[allow(clippy::too_many_arguments)]
pub(super) fn score(
    ex: &mut GpuExecutor,
    q: &GpuTensor,
    kv: &GpuKv,
    layer: usize,
    table: &PageTable,
    begin: usize,
    n: usize,
    scores: &mut GpuTensor,
) -> Result<()> {
    let qh = check::ts(
        &kv.layout,
        layer,
        table,
        (q.rows, q.cols),
        begin,
        n,
        scores.rows * scores.cols,
    )?;
    let pages = ex.page_table(table);
    let p = ex.pipeline(shaders::TOKENSELECT, "score", &[]);
    let groups = ex.grid(n.div_ceil(64))?;
    let first = begin / kv.layout.page_size;
    let last = (begin + n - 1) / kv.layout.page_size;
    let mut arenas: Vec<usize> = table.pages[first..=last]
        .iter()
        .map(|&pg| pg as usize / kv.pages_per_arena)
        .collect();
    arenas.sort_unstable();
    arenas.dedup();
    for a in arenas {
        let b = [
            Binding::from(&q.buf),
            Binding::from(&kv.k[layer][a]),
            Binding::from(&pages),
            Binding::from(&scores.buf),
        ];
        ex.rec
            .dispatch(&p, &params(n, begin, qh, kv, a, 0, 0), &b, groups);
    }
    Ok(())
}

pub(super) fn vote(
    ex: &mut GpuExecutor,
    scores: &GpuTensor,
    qh: usize,
    n: usize,
    votes: &mut GpuTensor,
) -> Result<()> {
    if scores.rows * scores.cols < qh * n || votes.rows * votes.cols < n || qh == 0 {
        return shape_err("ts_vote", format!("{qh} heads x {n} candidates do not fit"));
    }
    let stats = ex.scratch("vote stats", (qh * 8) as u64)?;
    let mut pr = [0u32; 12];
    pr[0] = n as u32;
    pr[2] = qh as u32;
    let hs = ex.pipeline(shaders::TOKENSELECT, "head_stats", &[]);
    ex.rec.dispatch(
        &hs,
        &pr,
        &[Binding::from(&scores.buf), Binding::from(&stats)],
        [qh as u32, 1, 1],
    );
    let v = ex.pipeline(shaders::TOKENSELECT, "vote", &[]);
    let groups = ex.grid(n.div_ceil(64))?;
    ex.rec.dispatch(
        &v,
        &pr,
        &[
            Binding::from(&scores.buf),
            Binding::from(&stats),
            Binding::from(&votes.buf),
        ],
        groups,
    );
    Ok(())
}

pub(super) fn top_k(
    ex: &mut GpuExecutor,
    votes: &GpuTensor,
    n: usize,
    k: usize,
    begin: usize,
    out: &mut GpuIds,
) -> Result<()> {
    if votes.rows * votes.cols < n || k == 0 || k > n || out.len < k {
        return shape_err("ts_top_k", format!("top {k} of {n} into {} slots", out.len));
    }
    let state = ex.scratch("radix state", 258 * 4)?;
    let mut pr = [0u32; 12];
    pr[0] = n as u32;
    pr[1] = begin as u32;
    pr[8] = k as u32;
    let init = ex.pipeline(shaders::TOKENSELECT, "radix_init", &[]);
    ex.rec
        .dispatch(&init, &pr, &[Binding::from(&state)], [1, 1, 1]);
    let hist = ex.pipeline(shaders::TOKENSELECT, "radix_hist", &[]);
    let pick = ex.pipeline(shaders::TOKENSELECT, "radix_pick", &[]);
    // Enough workgroups that each thread scans ~16 values.
    let wgs = n.div_ceil(4096).clamp(1, 256) as u32;
    for pass in 0..4u32 {
        pr[9] = pass;
        ex.rec.dispatch(
            &hist,
            &pr,
            &[Binding::from(&state), Binding::from(&votes.buf)],
            [wgs, 1, 1],
        );
        ex.rec
            .dispatch(&pick, &pr, &[Binding::from(&state)], [1, 1, 1]);
    }
    let collect = ex.pipeline(shaders::TOKENSELECT, "radix_collect", &[]);
    ex.rec.dispatch(
        &collect,
        &pr,
        &[
            Binding::from(&state),
            Binding::from(&votes.buf),
            Binding::from(&out.buf),
        ],
        [1, 1, 1],
    );
    Ok(())
}
