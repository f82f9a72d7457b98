//! CPU twin of `speculative.wgsl::accept`: the same walk, the same candidate
//! order, the same draws, so both executors take the same decisions up to
//! rounding of the probabilities.

use super::{top_k_row, RefExecutor, RefTensor};
use crate::error::Result;
use crate::ops::SpeculationOps;
use crate::sampling::{accept_stride, target_distribution, uniform01, AcceptParams};
use rayon::prelude::*;

const NONE: u32 = u32::MAX;

/// One trial's output words `[len, bonus, nodes.., tokens..]`.
pub fn accept_trial(
    logits: &[f32],
    vocab: usize,
    tokens: &[u32],
    links: &[u32],
    prm: &AcceptParams,
    depth: usize,
    trial: u32,
) -> Vec<u32> {
    let n = tokens.len();
    let mut out = vec![0u32; accept_stride(depth)];
    out[2 + depth] = tokens[0];
    let (mut cur, mut len, mut draw) = (0usize, 1usize, 0u32);
    loop {
        let cand = top_k_row(&logits[cur * vocab..(cur + 1) * vocab], prm.top_k);
        let mut probs = target_distribution(&cand, prm.temperature, prm.top_p);
        let keep = probs.len();
        let mut mass: f32 = probs.iter().sum();
        let mut next = None;
        let mut c = links[cur];
        while c != NONE {
            let x = tokens[c as usize];
            // The last equal candidate, as the kernel's scan keeps it.
            if let Some(at) = (0..keep).rev().find(|&r| cand[r].0 == x) {
                let px = probs[at];
                if px > 0.0 {
                    let u = uniform01(prm.seed, trial, draw);
                    draw += 1;
                    if u * mass < px {
                        next = Some(c as usize);
                        break;
                    }
                    mass -= px;
                    probs[at] = 0.0;
                }
            }
            c = links[n + c as usize];
        }
        match next {
            Some(c) if len < depth => {
                out[2 + len] = c as u32;
                out[2 + depth + len] = tokens[c];
                len += 1;
                cur = c;
            }
            _ => {
                let mut u = uniform01(prm.seed, trial, draw) * mass;
                let mut pick = None;
                for (r, &pr) in probs.iter().enumerate() {
                    if pr > 0.0 {
                        pick = Some(cand[r].0);
                        if u < pr {
                            break;
                        }
                        u -= pr;
                    }
                }
                out[0] = len as u32;
                out[1] = pick.or(cand.first().map(|c| c.0)).unwrap_or(0);
                return out;
            }
        }
    }
}

impl SpeculationOps for RefExecutor {
    fn run_spec_draft(
        &mut self,
        adj: &Vec<u32>,
        plan: &Vec<u32>,
        n: usize,
        out: &mut Vec<u32>,
    ) -> Result<()> {
        for i in 0..n {
            let (parent, rank, token) = (plan[3 * i], plan[3 * i + 1], plan[3 * i + 2]);
            out[i] = if parent != u32::MAX && rank != u32::MAX {
                let at = out[parent as usize] as usize * 8 + rank as usize;
                adj.get(at).copied().unwrap_or(0)
            } else {
                token
            };
        }
        Ok(())
    }

    fn run_spec_adj_update(
        &mut self,
        adj: &mut Vec<u32>,
        logits: &RefTensor,
        tokens: &Vec<u32>,
    ) -> Result<()> {
        let (n, vocab) = (logits.rows, logits.cols);
        // The last node of a repeated token wins, so earlier duplicates skip.
        let rows: Vec<usize> = (0..n)
            .filter(|&i| !tokens[i + 1..n].contains(&tokens[i]) && (tokens[i] as usize) < vocab)
            .collect();
        let tops: Vec<Vec<(u32, f32)>> = rows
            .par_iter()
            .map(|&i| top_k_row(&logits.data[i * vocab..(i + 1) * vocab], 8))
            .collect();
        for (&i, top) in rows.iter().zip(&tops) {
            let tok = tokens[i] as usize;
            for (r, &(b, _)) in top.iter().enumerate() {
                adj[tok * 8 + r] = b;
            }
        }
        Ok(())
    }

    fn run_spec_accept(
        &mut self,
        logits: &RefTensor,
        tokens: &Vec<u32>,
        links: &Vec<u32>,
        params: &AcceptParams,
        depth: usize,
        trials: usize,
        out: &mut Vec<u32>,
    ) -> Result<()> {
        let (n, vocab) = (logits.rows, logits.cols);
        let stride = accept_stride(depth);
        let (toks, links) = (&tokens[..n], &links[..2 * n]);
        out[..trials * stride]
            .par_chunks_mut(stride)
            .enumerate()
            .for_each(|(t, o)| {
                o.copy_from_slice(&accept_trial(
                    &logits.data,
                    vocab,
                    toks,
                    links,
                    params,
                    depth,
                    t as u32,
                ))
            });
        Ok(())
    }
}
