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
}
