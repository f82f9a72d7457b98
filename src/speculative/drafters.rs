//! Drafters: prompt lookup (docs/ALGORITHMS.md section 6), Token Recycling
//! templates (section 5) and both in one best-first tree.

use super::{DraftTree, Speculate};
use crate::error::Result;

/// Proposes draft trees for speculative decoding.
pub trait Drafter: Send {
    /// A tree of at most `max_nodes` nodes rooted at `root`, which follows the
    /// cached `context`.
    fn draft(&mut self, context: &[u32], root: u32, max_nodes: usize) -> Result<DraftTree>;
}

/// Prompt lookup (docs/ALGORITHMS.md section 6): for n = 3 down to 1, the most recent
/// earlier occurrence of the last n tokens; the tokens that followed it become a
/// chain of up to `max_chain` drafts.
#[derive(Clone, Debug)]
pub struct PromptLookup {
    /// Longest n-gram matched.
    pub max_ngram: usize,
    /// Longest chain proposed.
    pub max_chain: usize,
}

impl Default for PromptLookup {
    fn default() -> Self {
        Self {
            max_ngram: 3,
            max_chain: 10,
        }
    }
}

impl PromptLookup {
    /// The continuation of the most recent earlier match of `seq`'s last n tokens.
    pub fn lookup<'a>(&self, seq: &'a [u32]) -> &'a [u32] {
        self.matched(seq).0
    }

    /// [`Self::lookup`]'s continuation and the n it matched (0: none).
    pub fn matched<'a>(&self, seq: &'a [u32]) -> (&'a [u32], usize) {
        let len = seq.len();
        for n in (1..=self.max_ngram.min(len.saturating_sub(1))).rev() {
            let tail = &seq[len - n..];
            if let Some(i) = (0..len - n).rev().find(|&i| &seq[i..i + n] == tail) {
                return (&seq[i + n..(i + n + self.max_chain).min(len)], n);
            }
        }
        (&[], 0)
    }
}

/// How often the first d + 1 drafts of a lookup chain are all right, by the
/// length of the n-gram it matched (rows n = 1, 2, 3 or more): measured over
/// the greedy answers of the default model to specbench-mini (687 positions;
/// a 3-gram's first draft is right 78 % of the time, a 1-gram's 18 %). They
/// rank chain nodes against recycled ones in [`Combined`]'s trees.
const LOOKUP_REACH: [[f64; 10]; 3] = [
    [
        0.18, 0.08, 0.02, 0.01, 0.01, 0.01, 0.005, 0.005, 0.005, 0.005,
    ],
    [0.48, 0.20, 0.14, 0.12, 0.12, 0.09, 0.09, 0.08, 0.08, 0.08],
    [0.78, 0.67, 0.60, 0.53, 0.47, 0.43, 0.38, 0.34, 0.30, 0.26],
];

/// [`LOOKUP_REACH`] for the d-th draft (from 0) of a chain matched on an n-gram.
fn lookup_reach(n: usize, d: usize) -> f64 {
    let row = &LOOKUP_REACH[n.clamp(1, 3) - 1];
    match row.get(d) {
        Some(&p) => p,
        None => row[row.len() - 1] * 0.9f64.powi((d + 1 - row.len()) as i32),
    }
}

impl Drafter for PromptLookup {
    fn draft(&mut self, context: &[u32], root: u32, max_nodes: usize) -> Result<DraftTree> {
        let mut seq = Vec::with_capacity(context.len() + 1);
        seq.extend_from_slice(context);
        seq.push(root);
        let mut tree = DraftTree::new(root);
        for &t in self.lookup(&seq).iter().take(max_nodes.saturating_sub(1)) {
            let last = tree.len() - 1;
            tree.push(last, t)?;
        }
        Ok(tree)
    }
}

/// Node counts per level of the Token Recycling paper's 80-node template.
pub const PAPER_LEVELS: [usize; 6] = [8, 21, 25, 15, 8, 3];

/// How likely the r-th recycled successor is to be right (a decreasing prior that
/// shapes the templates: a node's score is the product along its path).
const RANK_PRIOR: [f64; 8] = [0.45, 0.2, 0.12, 0.08, 0.06, 0.04, 0.03, 0.02];

/// A recycling template as (parent, rank) per non-root node (node indices count
/// the root as 0; parents come first). With `levels`, level d holds `levels[d]`
/// nodes, the best-scoring (parent, rank) pairs of the level above; without, the
/// `n` best-scoring nodes overall (best first).
pub fn template(n: usize, levels: Option<&[usize]>) -> Vec<(usize, u8)> {
    let mut nodes: Vec<(usize, u8)> = Vec::new();
    let mut score = vec![1.0f64];
    let better = |a: &(f64, usize, u8), b: &(f64, usize, u8)| {
        b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)).then(a.2.cmp(&b.2))
    };
    match levels {
        Some(levels) => {
            let mut prev = vec![0usize];
            for &count in levels {
                let mut cand: Vec<(f64, usize, u8)> = prev
                    .iter()
                    .flat_map(|&p| (0..8u8).map(move |r| (p, r)))
                    .map(|(p, r)| (score[p] * RANK_PRIOR[r as usize], p, r))
                    .collect();
                cand.sort_by(better);
                cand.truncate(count);
                cand.sort_by_key(|c| (c.1, c.2));
                prev.clear();
                for (sc, p, r) in cand {
                    nodes.push((p, r));
                    score.push(sc);
                    prev.push(nodes.len());
                }
            }
        }
        None => {
            let mut next = Frontier::default();
            next.offer_recycled(0, 1.0);
            while nodes.len() < n {
                let Some((sc, Candidate::Recycled { parent, rank })) = next.take_best() else {
                    break;
                };
                nodes.push((parent, rank));
                next.offer_recycled(nodes.len(), sc);
            }
        }
    }
    nodes
}

/// Token Recycling (docs/ALGORITHMS.md section 5): a static template whose tokens the
/// device fills from the adjacency matrix (the last verify's top-8 successors of
/// every token seen).
#[derive(Clone, Debug)]
pub struct TokenRecycling {
    /// (parent, rank) per non-root node.
    pub template: Vec<(usize, u8)>,
}

impl TokenRecycling {
    /// A template of `size` nodes, root included: the paper's 80-node shape for
    /// 81, the best-scoring nodes otherwise.
    pub fn new(size: usize) -> Self {
        let template = if size == 81 {
            template(80, Some(&PAPER_LEVELS))
        } else {
            template(size.saturating_sub(1), None)
        };
        Self { template }
    }
}

impl Drafter for TokenRecycling {
    fn draft(&mut self, _context: &[u32], root: u32, max_nodes: usize) -> Result<DraftTree> {
        // Template node k + 1 becomes tree node k + 1 (parents come first).
        let mut tree = DraftTree::new(root);
        for &(p, r) in self.template.iter().take(max_nodes.saturating_sub(1)) {
            tree.push_recycled(p, r)?;
        }
        Ok(tree)
    }
}

/// Prompt lookup's chain and Token Recycling's successors in one tree, built
/// best first: a chain node scores how often chains of its n-gram reach it
/// (measured per n on the default model), a recycled node its parent's score
/// times its rank's prior, and recycled children of a chain node only share
/// what the chain's next draft leaves. So a 3-gram's chain comes before most
/// recycled nodes, a 1-gram's after the root's top successor, and recycled
/// nodes also hang under chain nodes (the device fills them from the chain's
/// tokens).
#[derive(Clone, Debug, Default)]
pub struct Combined {
    /// The lookup drafter.
    pub lookup: PromptLookup,
}

/// A node [`Combined`] may add next.
#[derive(Clone, Copy)]
enum Candidate {
    /// Draft d of the chain, under node `parent`.
    Chain { d: usize, parent: usize },
    /// The rank-th recycled successor of node `parent`.
    Recycled { parent: usize, rank: u8 },
}

/// A [`Candidate`] with its score and the order it was offered in.
struct Scored(f64, usize, Candidate);

impl PartialEq for Scored {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == std::cmp::Ordering::Equal
    }
}
impl Eq for Scored {}
impl PartialOrd for Scored {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Scored {
    /// Higher scores first, then the earlier offered.
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.0.total_cmp(&other.0).then(other.1.cmp(&self.1))
    }
}

/// The nodes a best-first tree may add next, with their scores.
#[derive(Default)]
struct Frontier {
    cands: std::collections::BinaryHeap<Scored>,
    offered: usize,
}

impl Frontier {
    fn offer(&mut self, score: f64, c: Candidate) {
        self.cands.push(Scored(score, self.offered, c));
        self.offered += 1;
    }

    /// The 8 recycled successors of node `parent`, `share` of whose score is
    /// left to them.
    fn offer_recycled(&mut self, parent: usize, share: f64) {
        for (rank, prior) in RANK_PRIOR.iter().enumerate() {
            let rank = rank as u8;
            self.offer(share * prior, Candidate::Recycled { parent, rank });
        }
    }

    /// The best-scoring candidate (the earliest offered among equals).
    fn take_best(&mut self) -> Option<(f64, Candidate)> {
        self.cands.pop().map(|Scored(score, _, c)| (score, c))
    }
}

impl Drafter for Combined {
    fn draft(&mut self, context: &[u32], root: u32, max_nodes: usize) -> Result<DraftTree> {
        let mut seq = Vec::with_capacity(context.len() + 1);
        seq.extend_from_slice(context);
        seq.push(root);
        let (chain, n) = self.lookup.matched(&seq);
        let reach = |d: usize| lookup_reach(n, d);
        // The share of a node's score its recycled children get when chain
        // draft d comes next under it: the chance that draft is wrong.
        let left = |d: usize| match d {
            _ if d >= chain.len() => 1.0,
            0 => 1.0 - reach(0),
            _ => 1.0 - reach(d) / reach(d - 1),
        };
        let mut next = Frontier::default();
        if !chain.is_empty() {
            next.offer(reach(0), Candidate::Chain { d: 0, parent: 0 });
        }
        next.offer_recycled(0, left(0));
        let mut tree = DraftTree::new(root);
        while tree.len() < max_nodes {
            let Some((score, c)) = next.take_best() else {
                break;
            };
            match c {
                Candidate::Chain { d, parent } => {
                    let i = tree.push(parent, chain[d])?;
                    if d + 1 < chain.len() {
                        next.offer(
                            reach(d + 1),
                            Candidate::Chain {
                                d: d + 1,
                                parent: i,
                            },
                        );
                    }
                    next.offer_recycled(i, score * left(d + 1));
                }
                Candidate::Recycled { parent, rank } => {
                    let i = tree.push_recycled(parent, rank)?;
                    next.offer_recycled(i, score);
                }
            }
        }
        Ok(tree)
    }
}

impl Speculate {
    /// The drafter for trees of `tree_size` nodes, if any.
    pub fn drafter(self, tree_size: usize) -> Option<Box<dyn Drafter>> {
        match self {
            Speculate::Off => None,
            Speculate::Lookup => Some(Box::new(PromptLookup::default())),
            Speculate::Recycling => Some(Box::new(TokenRecycling::new(tree_size))),
            Speculate::Both => Some(Box::new(Combined::default())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prompt_lookup_continues_the_latest_match() {
        let pl = PromptLookup::default();
        // Last 3 tokens 1 2 3 occurred at 0 and 5; the latest (5) is followed by 9 9.
        assert_eq!(
            pl.lookup(&[1, 2, 3, 4, 7, 1, 2, 3, 9, 9, 1, 2, 3]),
            &[9, 9, 1, 2, 3]
        );
        // Falls back to shorter n-grams; nothing matches a fresh token.
        assert_eq!(pl.lookup(&[5, 6, 8, 6]), &[8, 6]);
        assert!(pl.lookup(&[5, 6, 7]).is_empty());
        let t = PromptLookup::default().draft(&[4, 5, 6, 4], 5, 3).unwrap();
        assert_eq!(t.tokens, vec![5, 6, 4]);
        assert_eq!(t.parents, vec![None, Some(0), Some(1)]);
    }

    #[test]
    fn templates_have_the_requested_shape() {
        let paper = template(80, Some(&PAPER_LEVELS));
        assert_eq!(paper.len(), 80);
        let mut t = DraftTree::new(1);
        for &(p, r) in &paper {
            t.push_recycled(p, r).unwrap();
        }
        let depths = t.depths();
        for (d, &count) in PAPER_LEVELS.iter().enumerate() {
            assert_eq!(
                depths.iter().filter(|&&x| x as usize == d + 1).count(),
                count
            );
        }
        assert!(t.mask().is_ok());
        let small = template(15, None);
        assert_eq!(small.len(), 15);
        assert!(small.iter().enumerate().all(|(i, &(p, _))| p <= i));
        // The best single draft is the top successor of the root.
        assert_eq!(template(1, None), vec![(0, 0)]);
        let plan = TokenRecycling::new(4).draft(&[], 9, 4).unwrap().plan();
        assert_eq!(&plan[..6], &[u32::MAX, u32::MAX, 9, 0, 0, 0]);
    }

    #[test]
    fn combined_trees_rank_chain_and_recycled_nodes() {
        let mut both = Combined::default();
        // No match: the recycling drafter's best-first tree.
        for size in [2, 5, 16] {
            let t = both.draft(&[1, 2], 3, size).unwrap();
            assert_eq!(
                t,
                TokenRecycling::new(size).draft(&[1, 2], 3, size).unwrap()
            );
        }
        // A 3-gram match (7 8 9 -> 4 5): its chain comes first, recycled
        // nodes hang under the root and under the chain.
        let ctx = [7, 8, 9, 4, 5, 6, 7, 8];
        let t = both.draft(&ctx, 9, 3).unwrap();
        assert_eq!(t.tokens, vec![9, 4, 5]);
        assert_eq!(t.parents, vec![None, Some(0), Some(1)]);
        let t = both.draft(&ctx, 9, 16).unwrap();
        assert!(t.ranks.iter().skip(3).any(|r| r.is_some()));
        assert!((3..16).any(|i| t.ranks[i].is_some() && t.parents[i] == Some(0)));
        assert!((3..16).any(|i| t.ranks[i].is_some() && t.parents[i] == Some(1)));
        assert!(t.mask().is_ok());
        // A 1-gram match (5 -> 6) is right less often than the root's top
        // successor: that comes first, the chain's draft after it.
        let t = both.draft(&[5, 6, 1], 5, 3).unwrap();
        assert_eq!(t.ranks[1], Some(0));
        assert_eq!(t.tokens, vec![5, 0, 6]);
    }
}
