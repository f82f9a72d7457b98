//! Speculative decoding: draft trees and their attention masks (docs/ALGORITHMS.md
//! section 4). Node 0 is the root (the last accepted token, not yet in the cache);
//! nodes are sorted so that every parent precedes its children.

use crate::error::{Error, Result};

mod drafters;
mod tree_size;

pub use drafters::{template, Combined, Drafter, PromptLookup, TokenRecycling, PAPER_LEVELS};
pub use tree_size::{
    choose_tree_size, expected_tau, max_expected_tau, Acceptance, TreeSize, PROBE_SIZES,
};

pub use crate::ops::MAX_NODES;
pub use crate::sampling::{accept_stride, pcg, uniform01, AcceptParams};

/// A draft tree: a token per node and each node's parent. A node may instead
/// name a rank: its token is then `adj[token of its parent][rank]`, filled on the
/// device by Token Recycling.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DraftTree {
    /// Token of each node; node 0 is the root (0 for recycled nodes until filled).
    pub tokens: Vec<u32>,
    /// Parent of each node (`None` for the root only).
    pub parents: Vec<Option<usize>>,
    /// Recycling rank of each node (`None` for a given token).
    pub ranks: Vec<Option<u8>>,
}

impl DraftTree {
    /// A tree holding only `root`.
    pub fn new(root: u32) -> Self {
        Self {
            tokens: vec![root],
            parents: vec![None],
            ranks: vec![None],
        }
    }

    /// Adds a node under `parent` whose token is its parent's `rank`-th recycled
    /// successor (0..8); returns the new node's index.
    pub fn push_recycled(&mut self, parent: usize, rank: u8) -> Result<usize> {
        if rank >= 8 {
            return Err(Error::InvalidOption(format!(
                "recycling rank {rank} must be below 8"
            )));
        }
        let i = self.push(parent, 0)?;
        self.ranks[i] = Some(rank);
        Ok(i)
    }

    /// The plan the draft kernel reads: (parent, rank, token) per node, with
    /// `u32::MAX` for no parent or no rank.
    pub fn plan(&self) -> Vec<u32> {
        let mut out = Vec::with_capacity(3 * self.len());
        for i in 0..self.len() {
            out.push(self.parents[i].map_or(u32::MAX, |p| p as u32));
            out.push(self.ranks[i].map_or(u32::MAX, u32::from));
            out.push(self.tokens[i]);
        }
        out
    }

    /// Adds `token` under `parent`; returns the new node's index.
    pub fn push(&mut self, parent: usize, token: u32) -> Result<usize> {
        if parent >= self.tokens.len() {
            return Err(Error::InvalidOption(format!(
                "draft tree: parent {parent} of a tree of {} nodes",
                self.tokens.len()
            )));
        }
        if self.tokens.len() == MAX_NODES {
            return Err(Error::Capacity(format!(
                "draft tree: more than {MAX_NODES} nodes"
            )));
        }
        self.tokens.push(token);
        self.parents.push(Some(parent));
        self.ranks.push(None);
        Ok(self.tokens.len() - 1)
    }

    /// Nodes in the tree.
    pub fn len(&self) -> usize {
        self.tokens.len()
    }

    /// True for a tree without nodes (not even a root).
    pub fn is_empty(&self) -> bool {
        self.tokens.is_empty()
    }

    /// Depth of each node (the root is 0).
    pub fn depths(&self) -> Vec<u32> {
        let mut d = vec![0u32; self.len()];
        for i in 1..self.len() {
            if let Some(p) = self.parents[i] {
                d[i] = d[p] + 1;
            }
        }
        d
    }

    /// The attention mask the tree kernels read: 4 ancestor words per node (bit j
    /// of node i set when j is i or one of its ancestors), then the depths.
    pub fn mask(&self) -> Result<Vec<u32>> {
        let n = self.len();
        if n == 0
            || n > MAX_NODES
            || self.parents.len() != n
            || self.ranks.len() != n
            || self.parents[0].is_some()
        {
            return Err(Error::InvalidOption(format!(
                "draft tree of {n} nodes: need 1..={MAX_NODES} nodes with the root first"
            )));
        }
        let mut words = vec![0u32; 5 * n];
        for i in 0..n {
            if i > 0 {
                let p = match self.parents[i] {
                    Some(p) if p < i => p,
                    other => {
                        return Err(Error::InvalidOption(format!(
                            "draft tree node {i}: parent {other:?} must be an earlier node"
                        )))
                    }
                };
                let (src, dst) = words.split_at_mut(4 * i);
                dst[..4].copy_from_slice(&src[4 * p..4 * p + 4]);
            }
            words[4 * i + i / 32] |= 1 << (i % 32);
        }
        for (w, d) in words[4 * n..].iter_mut().zip(self.depths()) {
            *w = d;
        }
        Ok(words)
    }

    /// The tree as the accept kernel walks it: `[first child; n]` then
    /// `[next sibling; n]`, `u32::MAX` for none, siblings in index order.
    pub fn links(&self) -> Vec<u32> {
        let n = self.len();
        let mut out = vec![u32::MAX; 2 * n];
        // Backwards, so each node is prepended before its earlier siblings.
        for i in (1..n).rev() {
            if let Some(p) = self.parents[i] {
                out[n + i] = out[p];
                out[p] = i as u32;
            }
        }
        out
    }

    /// Nodes on the longest root-to-leaf path (the most tokens one verify can
    /// accept before the bonus).
    pub fn max_path(&self) -> usize {
        self.depths().iter().max().map_or(0, |&d| d as usize + 1)
    }

    /// Whether node `j` is node `i` or one of its ancestors, from a [`Self::mask`].
    pub fn sees(mask: &[u32], i: usize, j: usize) -> bool {
        crate::ops::tree_sees(mask, i, j)
    }
}

/// Which drafter speculative decoding uses.
///
/// ```
/// let s: kvsieve::Speculate = "both".parse()?;
/// assert_eq!(s, kvsieve::Speculate::Both);
/// # Ok::<(), kvsieve::Error>(())
/// ```
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Speculate {
    /// Plain decoding.
    #[default]
    Off,
    /// Prompt lookup chains.
    Lookup,
    /// Token Recycling trees.
    Recycling,
    /// Both in one tree.
    Both,
}

impl Speculate {
    /// The name `FromStr` takes.
    pub fn name(self) -> &'static str {
        match self {
            Self::Off => "off",
            Self::Lookup => "lookup",
            Self::Recycling => "recycling",
            Self::Both => "both",
        }
    }
}

impl std::str::FromStr for Speculate {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "off" => Ok(Self::Off),
            "lookup" => Ok(Self::Lookup),
            "recycling" => Ok(Self::Recycling),
            "both" => Ok(Self::Both),
            o => Err(Error::InvalidOption(format!(
                "speculate {o:?}: expected off, lookup, recycling or both"
            ))),
        }
    }
}

/// One verify step's decision, parsed from the accept kernel's words.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Accepted {
    /// Accepted nodes, root first.
    pub path: Vec<usize>,
    /// Their tokens.
    pub tokens: Vec<u32>,
    /// The token sampled after the last accepted node.
    pub bonus: u32,
}

impl Accepted {
    /// Parses one trial's `[len, bonus, nodes.., tokens..]` (see [`accept_stride`]).
    pub fn parse(words: &[u32], depth: usize) -> Result<Self> {
        let len = words.first().copied().unwrap_or(0) as usize;
        if words.len() < accept_stride(depth) || len == 0 || len > depth {
            return Err(Error::Gpu(format!(
                "accept output: path of {len} nodes for a depth of {depth}"
            )));
        }
        Ok(Self {
            path: words[2..2 + len].iter().map(|&v| v as usize).collect(),
            tokens: words[2 + depth..2 + depth + len].to_vec(),
            bonus: words[1],
        })
    }

    /// The tokens this step emits: the accepted drafts, then the bonus.
    pub fn emitted(&self) -> Vec<u32> {
        let mut out = self.tokens[1..].to_vec();
        out.push(self.bonus);
        out
    }
}

/// Greedy acceptance (docs/ALGORITHMS.md section 4): from the root, follow the child
/// whose token is the model's argmax at the current node (`best[node]`), while
/// one exists. Returns the path's nodes, root first; the bonus token is
/// `best[path.last()]`.
pub fn greedy_path(tree: &DraftTree, best: &[u32]) -> Vec<usize> {
    let mut path = vec![0];
    let mut u = 0;
    loop {
        // Children come after their parent; the first match wins on duplicates.
        let next =
            (u + 1..tree.len()).find(|&c| tree.parents[c] == Some(u) && tree.tokens[c] == best[u]);
        match next {
            Some(c) => {
                path.push(c);
                u = c;
            }
            None => return path,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mask_holds_ancestors_and_depths() {
        // 0 -> 1 -> 3, 0 -> 2 -> 4 -> 5
        let mut t = DraftTree::new(10);
        let a = t.push(0, 11).unwrap();
        let b = t.push(0, 12).unwrap();
        t.push(a, 13).unwrap();
        let c = t.push(b, 14).unwrap();
        t.push(c, 15).unwrap();
        let m = t.mask().unwrap();
        let sees = |i, j| DraftTree::sees(&m, i, j);
        assert!(sees(5, 0) && sees(5, 2) && sees(5, 4) && sees(5, 5));
        assert!(!sees(5, 1) && !sees(5, 3));
        assert!(sees(3, 1) && !sees(3, 2));
        assert_eq!(&m[4 * 6..], &[0, 1, 1, 2, 2, 3]);
        assert!(t.push(9, 1).is_err());
    }

    #[test]
    fn greedy_path_follows_the_argmax() {
        let mut t = DraftTree::new(10);
        let a = t.push(0, 11).unwrap();
        let b = t.push(0, 12).unwrap();
        t.push(a, 13).unwrap();
        let c = t.push(b, 14).unwrap();
        // argmax at root is 12 -> node 2; at node 2 is 14 -> node 4; at node 4 is 99: stop.
        let best = [12, 0, 14, 0, 99];
        assert_eq!(greedy_path(&t, &best), vec![0, b, c]);
        assert_eq!(greedy_path(&t, &[7, 0, 0, 0, 0]), vec![0]);
    }

    #[test]
    fn links_list_children_in_index_order() {
        // 0 -> {1, 3}, 1 -> {2, 4}
        let mut t = DraftTree::new(0);
        for p in [0, 1, 0, 1] {
            t.push(p, 5).unwrap();
        }
        let l = t.links();
        let none = u32::MAX;
        assert_eq!(&l[..5], &[1, 2, none, none, none]);
        assert_eq!(&l[5..], &[none, 3, 4, none, none]);
        assert_eq!(t.max_path(), 3);
    }
}
