//! Speculative decoding: draft trees and their attention masks (ALGORITHMS.md
//! section 4). Node 0 is the root (the last accepted token, not yet in the cache);
//! nodes are sorted so that every parent precedes its children.

use crate::error::{Error, Result};

/// Most nodes a draft tree may hold (the ancestor sets are 4 u32 words).
pub const MAX_NODES: usize = 128;

/// A draft tree: a token per node and each node's parent.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DraftTree {
    /// Token of each node; node 0 is the root.
    pub tokens: Vec<u32>,
    /// Parent of each node (`None` for the root only).
    pub parents: Vec<Option<usize>>,
}

impl DraftTree {
    /// A tree holding only `root`.
    pub fn new(root: u32) -> Self {
        Self {
            tokens: vec![root],
            parents: vec![None],
        }
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
        if n == 0 || n > MAX_NODES || self.parents.len() != n || self.parents[0].is_some() {
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

    /// Whether node `j` is node `i` or one of its ancestors, from a [`Self::mask`].
    pub fn sees(mask: &[u32], i: usize, j: usize) -> bool {
        (mask[4 * i + j / 32] >> (j % 32)) & 1 == 1
    }
}

/// Proposes draft trees for speculative decoding.
pub trait Drafter: Send {
    /// A tree of at most `max_nodes` nodes rooted at `root`, which follows the
    /// cached `context`.
    fn draft(&mut self, context: &[u32], root: u32, max_nodes: usize) -> Result<DraftTree>;
}

/// Prompt lookup (ALGORITHMS.md section 6): for n = 3 down to 1, the most recent
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
        let len = seq.len();
        for n in (1..=self.max_ngram.min(len.saturating_sub(1))).rev() {
            let tail = &seq[len - n..];
            if let Some(i) = (0..len - n).rev().find(|&i| &seq[i..i + n] == tail) {
                return &seq[i + n..(i + n + self.max_chain).min(len)];
            }
        }
        &[]
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

/// Which drafter speculative decoding uses.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Speculate {
    /// Plain decoding.
    #[default]
    Off,
    /// Prompt lookup chains.
    Lookup,
}

impl std::str::FromStr for Speculate {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "off" => Ok(Self::Off),
            "lookup" => Ok(Self::Lookup),
            o => Err(Error::InvalidOption(format!(
                "speculate {o:?}: expected off or lookup"
            ))),
        }
    }
}

impl Speculate {
    /// The drafter, if any.
    pub fn drafter(self) -> Option<Box<dyn Drafter>> {
        match self {
            Speculate::Off => None,
            Speculate::Lookup => Some(Box::new(PromptLookup::default())),
        }
    }
}

/// Greedy acceptance (ALGORITHMS.md section 4): from the root, follow the child
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
}
