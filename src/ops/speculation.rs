//! Speculation ops: Token Recycling's draft trees and adjacency, and the
//! lossless acceptance of a verify step.

use super::{check, Executor};
use crate::error::Result;
use crate::sampling::AcceptParams;

/// Speculation ops. Callers use the checked methods; executors implement the
/// `run_*` methods, which may assume the checks passed.
pub trait SpeculationOps: Executor {
    /// Fills a draft tree's tokens into `out[..n]` from its plan (`n` triples
    /// parent, rank, token; [`crate::speculative::DraftTree::plan`]): a node with a
    /// rank takes `adj[token of its parent * 8 + rank]` (Token Recycling).
    fn spec_draft(
        &mut self,
        adj: &Self::Ids,
        plan: &Self::Ids,
        n: usize,
        out: &mut Self::Ids,
    ) -> Result<()> {
        check::spec_draft(n, Self::ids_len(plan), Self::ids_len(out))?;
        self.run_spec_draft(adj, plan, n, out)
    }
    /// Token Recycling update: for each row i of `logits` (`[n, vocab]`),
    /// `adj[tokens[i] * 8..][..8]` = its 8 best token ids (value descending, ties to
    /// the lower id); the last of several rows with one token wins.
    fn spec_adj_update(
        &mut self,
        adj: &mut Self::Ids,
        logits: &Self::Tensor,
        tokens: &Self::Ids,
    ) -> Result<()> {
        let (adj_len, tokens_len) = (Self::ids_len(adj), Self::ids_len(tokens));
        check::spec_adj_update(adj_len, Self::dims(logits), tokens_len)?;
        self.run_spec_adj_update(adj, logits, tokens)
    }
    /// Acceptance of a verify step (docs/ALGORITHMS.md section 4): walks the tree given
    /// by `links` ([`crate::speculative::DraftTree::links`]) and the node `tokens`
    /// with the target distribution of each node's `logits` row (`[n, vocab]`),
    /// accepting child x with probability p(x) / (mass left) and sampling the bonus
    /// from the residual; greedy when `params.top_k` is 1. Writes `trials`
    /// independent results of [`crate::sampling::accept_stride`]`(depth)` words
    /// each (`[len, bonus, path nodes.., path tokens..]`), `depth` being the
    /// longest path. Only these words are read back.
    #[allow(clippy::too_many_arguments)]
    fn spec_accept(
        &mut self,
        logits: &Self::Tensor,
        tokens: &Self::Ids,
        links: &Self::Ids,
        params: &AcceptParams,
        depth: usize,
        trials: usize,
        out: &mut Self::Ids,
    ) -> Result<()> {
        check::spec_accept(
            Self::dims(logits),
            Self::ids_len(tokens),
            Self::ids_len(links),
            params,
            depth,
            trials,
            Self::ids_len(out),
        )?;
        self.run_spec_accept(logits, tokens, links, params, depth, trials, out)
    }

    /// [`SpeculationOps::spec_draft`], checked.
    fn run_spec_draft(
        &mut self,
        adj: &Self::Ids,
        plan: &Self::Ids,
        n: usize,
        out: &mut Self::Ids,
    ) -> Result<()>;
    /// [`SpeculationOps::spec_adj_update`], checked.
    fn run_spec_adj_update(
        &mut self,
        adj: &mut Self::Ids,
        logits: &Self::Tensor,
        tokens: &Self::Ids,
    ) -> Result<()>;
    /// [`SpeculationOps::spec_accept`], checked.
    #[allow(clippy::too_many_arguments)]
    fn run_spec_accept(
        &mut self,
        logits: &Self::Tensor,
        tokens: &Self::Ids,
        links: &Self::Ids,
        params: &AcceptParams,
        depth: usize,
        trials: usize,
        out: &mut Self::Ids,
    ) -> Result<()>;
}
