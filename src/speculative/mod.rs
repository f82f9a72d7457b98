//! Speculative decoding: draft trees and their attention masks (docs/ALGORITHMS.md
//! section 4). Node 0 is the root (the last accepted token, not yet in the cache);
//! nodes are sorted so that every parent precedes its children.

use crate::error::{Error, Result};

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

    /// Adds the template under the root of `tree`, up to `max_nodes` nodes in all.
    fn attach(&self, tree: &mut DraftTree, max_nodes: usize) -> Result<()> {
        // Template node k + 1 becomes tree node ids[k + 1]; the root stays 0.
        let mut ids = vec![0usize];
        for &(p, r) in &self.template {
            if tree.len() >= max_nodes {
                break;
            }
            let i = tree.push_recycled(ids[p], r)?;
            ids.push(i);
        }
        Ok(())
    }
}

impl Drafter for TokenRecycling {
    fn draft(&mut self, _context: &[u32], root: u32, max_nodes: usize) -> Result<DraftTree> {
        let mut tree = DraftTree::new(root);
        self.attach(&mut tree, max_nodes)?;
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

/// How many nodes a draft tree holds.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum TreeSize {
    /// Chosen per adapter from the measured cost of verifying N rows
    /// ([`choose_tree_size`]); speculation is skipped when no size pays.
    #[default]
    Auto,
    /// This many nodes, root included (1..=128).
    Fixed(usize),
}

impl std::str::FromStr for TreeSize {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        if s == "auto" {
            return Ok(Self::Auto);
        }
        match s.parse::<usize>() {
            Ok(n) if (1..=MAX_NODES).contains(&n) => Ok(Self::Fixed(n)),
            _ => Err(Error::InvalidOption(format!(
                "tree size {s:?}: expected auto or 1..={MAX_NODES}"
            ))),
        }
    }
}

/// Tree sizes the auto choice probes, smallest first.
pub const PROBE_SIZES: [usize; 8] = [1, 2, 4, 8, 16, 32, 64, 81];

/// Tau (tokens per verify forward, bonus included) by tree size for each
/// drafter, greedy, measured with `examples/specbench` on the reference executor
/// over specbench-mini (64 new tokens per prompt), each size on its own engine
/// from an empty Token Recycling matrix that learns over the 12 prompts. Tau
/// depends on the model and the text, not on the adapter, so one table serves
/// every adapter.
const TAU_BOTH: [(usize, f64); 7] = [
    (1, 1.0),
    (2, 1.18),
    (4, 1.31),
    (8, 1.43),
    (16, 1.64),
    (32, 1.84),
    (81, 2.12),
];
const TAU_RECYCLING: [(usize, f64); 7] = [
    (1, 1.0),
    (2, 1.14),
    (4, 1.26),
    (8, 1.39),
    (16, 1.57),
    (32, 1.73),
    (81, 1.98),
];
// Chains stop at 10 drafts, so larger trees add nothing.
const TAU_LOOKUP: [(usize, f64); 3] = [(1, 1.0), (4, 1.26), (11, 1.30)];

/// Expected tau of `spec` with trees of `size` nodes (linear between the
/// measured sizes, flat beyond the last).
pub fn expected_tau(spec: Speculate, size: usize) -> f64 {
    let table: &[(usize, f64)] = match spec {
        Speculate::Off => return 1.0,
        Speculate::Lookup => &TAU_LOOKUP,
        Speculate::Recycling => &TAU_RECYCLING,
        Speculate::Both => &TAU_BOTH,
    };
    let mut prev = table[0];
    for &(n, t) in table {
        if size <= n {
            if n == prev.0 {
                return t;
            }
            let f = (size - prev.0) as f64 / (n - prev.0) as f64;
            return prev.1 + f * (t - prev.1);
        }
        prev = (n, t);
    }
    prev.1
}

/// The tree size with the most expected tokens per second, from measured verify
/// costs `(size, seconds)` whose first entry is size 1 (a plain step through the
/// verify path). `None` when no size beats plain decoding by 5%: speculation
/// would not pay on this adapter.
///
/// `accept` scales the tables' accepted drafts (tau - 1) to what this model
/// and its texts have shown (see [`Acceptance`]); 1.0 takes the tables as
/// they are.
pub fn choose_tree_size(spec: Speculate, costs: &[(usize, f64)], accept: f64) -> Option<usize> {
    let &(one, base) = costs.first()?;
    if one != 1 || !(base > 0.0) {
        return None;
    }
    costs
        .iter()
        .filter(|c| c.0 > 1)
        .map(|&(n, t)| (n, (1.0 + (expected_tau(spec, n) - 1.0) * accept) * base / t))
        .filter(|&(_, gain)| gain > 1.05)
        // The smallest of equal gains: same speed for less work.
        .fold(None, |best: Option<(usize, f64)>, c| match best {
            Some(b) if b.1 >= c.1 => Some(b),
            _ => Some(c),
        })
        .map(|(n, _)| n)
}

/// Drafts accepted so far against what the tau tables expected for the same
/// verify steps, per drafter: the tables were measured on one model and one
/// prompt set, and a request's text can accept far fewer (or more) drafts.
/// [`Acceptance::scale`] is what [`choose_tree_size`] takes.
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Acceptance {
    /// Per drafter (lookup, recycling, both): verify steps, drafts accepted
    /// (tokens beyond one per step), drafts the tables expected.
    pub seen: std::collections::BTreeMap<String, (u64, u64, f64)>,
}

/// Verify steps a drafter needs before its measured acceptance replaces the tables'.
const MIN_STEPS: u64 = 32;

impl Acceptance {
    /// Records `steps` verify steps of `spec` with trees of `size` nodes that
    /// produced `tokens` tokens (bonus included).
    pub fn record(&mut self, spec: Speculate, size: usize, steps: u64, tokens: u64) {
        if steps == 0 || spec == Speculate::Off {
            return;
        }
        let e = self.seen.entry(spec.name().to_string()).or_default();
        e.0 += steps;
        e.1 += tokens.saturating_sub(steps);
        e.2 += steps as f64 * (expected_tau(spec, size) - 1.0);
    }

    /// Accepted over expected drafts for `spec` (1.0 until it has run
    /// `MIN_STEPS` verify steps), clamped to 0..=2.
    pub fn scale(&self, spec: Speculate) -> f64 {
        match self.seen.get(spec.name()) {
            Some(&(steps, got, want)) if steps >= MIN_STEPS && want > 0.0 => {
                (got as f64 / want).clamp(0.0, 2.0)
            }
            _ => 1.0,
        }
    }
}

/// Largest tau in the tables: a size whose verify costs more than this many
/// plain steps cannot pay, so probing stops there.
pub fn max_expected_tau() -> f64 {
    TAU_BOTH
        .iter()
        .chain(&TAU_RECYCLING)
        .chain(&TAU_LOOKUP)
        .map(|t| t.1)
        .fold(1.0, f64::max)
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

    #[test]
    fn auto_tree_size_follows_the_cost_curve() {
        assert_eq!("auto".parse::<TreeSize>().unwrap(), TreeSize::Auto);
        assert_eq!("16".parse::<TreeSize>().unwrap(), TreeSize::Fixed(16));
        assert!("0".parse::<TreeSize>().is_err() && "129".parse::<TreeSize>().is_err());
        assert_eq!(expected_tau(Speculate::Both, 1), 1.0);
        let mid = expected_tau(Speculate::Both, 12);
        assert!(mid > expected_tau(Speculate::Both, 8) && mid < expected_tau(Speculate::Both, 16));
        // Flat cost (a big GPU): the largest tree wins.
        let flat: Vec<(usize, f64)> = PROBE_SIZES.iter().map(|&n| (n, 1.0)).collect();
        assert_eq!(choose_tree_size(Speculate::Both, &flat, 1.0), Some(81));
        // Cost linear in rows (compute-bound): nothing pays, speculation is off.
        let linear: Vec<(usize, f64)> = PROBE_SIZES.iter().map(|&n| (n, n as f64)).collect();
        assert_eq!(choose_tree_size(Speculate::Both, &linear, 1.0), None);
        // Lookup chains stop at 11 nodes: larger trees buy nothing.
        assert_eq!(
            choose_tree_size(Speculate::Lookup, &flat[..6], 1.0),
            Some(16)
        );
        assert_eq!(choose_tree_size(Speculate::Both, &[], 1.0), None);
        // A text that accepts few drafts: with a flat cost curve the largest
        // tree still pays; with the reference's curve (verify 4 rows = 1.19
        // steps) tau 1.1 at 8 nodes (a scale of about 0.23) leaves no size.
        let mut a = Acceptance::default();
        a.record(Speculate::Both, 8, 16, 17);
        assert_eq!(a.scale(Speculate::Both), 1.0, "too few steps to judge");
        a.record(Speculate::Both, 8, 24, 27);
        let scale = a.scale(Speculate::Both);
        assert!((scale - 4.0 / (40.0 * 0.43)).abs() < 1e-9, "{scale}");
        assert_eq!(a.scale(Speculate::Lookup), 1.0);
        assert_eq!(choose_tree_size(Speculate::Both, &flat, scale), Some(81));
        let reference = [
            (1, 1.0),
            (2, 1.14),
            (4, 1.19),
            (8, 1.53),
            (16, 2.31),
            (32, 6.12),
        ];
        assert_eq!(choose_tree_size(Speculate::Both, &reference, 1.0), Some(4));
        assert_eq!(choose_tree_size(Speculate::Both, &reference, scale), None);
    }
}
