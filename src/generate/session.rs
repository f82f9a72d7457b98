//! A sequence being generated on one executor: its KV pages, the tokens they hold,
//! chunked prefill, and one device step per token.

use super::sampler::Sampler;
use crate::attention::{Attention, AttentionPolicy};
use crate::error::{Error, Result};
use crate::kv::{KvLayout, PageAllocator, PageTable};
use crate::model::{Llama, Workspace};
use crate::ops::{IdsTicket, Ops};
use crate::sampling::{accept_stride, AcceptParams, Draw};
use crate::speculative::{Accepted, DraftTree};
use std::collections::HashMap;
use std::sync::Arc;

/// Tokens a new session's KV cache holds before it grows.
pub const INITIAL_TOKENS: usize = 2048;

/// A verify workspace and its per-node argmax and token buffers.
struct VerifyBuffers<E: Ops> {
    ws: Workspace<E>,
    /// The accept kernel's output (one trial).
    accept: E::Ids,
    toks: E::Ids,
}

/// [`Session::recycle_rows`]' buffers for a block of rows.
struct RecycleBuffers<E: Ops> {
    /// Last-layer rows.
    x: E::Tensor,
    /// Their logits.
    logits: E::Tensor,
    /// Their tokens.
    ids: E::Ids,
}

/// Model, KV cache and workspaces on executor `E`.
pub struct Session<E: Ops> {
    /// The executor.
    pub ops: E,
    /// The model (weights shared with every session forked from this one).
    pub model: Arc<Llama<E>>,
    kv: E::Kv,
    alloc: PageAllocator,
    table: PageTable,
    /// Tokens whose keys and values are in the cache, in order.
    pub tokens: Vec<u32>,
    workspaces: HashMap<usize, Workspace<E>>,
    /// Token and position vectors of each workspace, refilled every step.
    step_ids: HashMap<usize, (E::Ids, E::Ids)>,
    /// Verify workspaces by node count (logits for every row), with their per-node
    /// argmax and token buffers; draft trees vary in size from step to step.
    verify_ws: HashMap<usize, VerifyBuffers<E>>,
    /// Token Recycling adjacency `[vocab, 8]`, kept across requests.
    adj: Option<E::Ids>,
    /// [`Session::recycle_rows`]' buffers by row count.
    recycle_ws: HashMap<usize, RecycleBuffers<E>>,
    last_rows: Option<usize>,
    argmax_out: Option<E::Ids>,
    /// Largest chunk of a prefill.
    pub chunk: usize,
    /// Context capacity in tokens (the KV cache grows up to it).
    pub max_context: usize,
    /// Whether the dense-past-the-trained-length warning was given.
    warned: bool,
    /// KV pages the cache, the policy and the allocator all hold.
    pages: usize,
    /// Attention policy and its state.
    pub attention: Attention<E>,
    /// Decode steps launched ahead of the host ([`Session::launch`]): their
    /// token's readback, the tokens cached before the step, and whether it
    /// fed its token (into the slot at that length).
    ahead: std::collections::VecDeque<(IdsTicket, usize, bool)>,
    /// While steps are in flight: the tokens cached before the last landed
    /// one (before the first launched one when none has landed).
    landed_len: usize,
}

/// Fed tokens at most (the last ones of a feed) whose Token Recycling rows
/// [`Session::feed`] fills when asked: the LM head costs about a quarter
/// of a small model's forward per row.
pub const RECYCLE_PROMPT_ROWS: usize = 512;

/// Rows per LM-head pass of that filling (their logits take rows x vocab
/// floats: 12.6 MB for a 49,152-token vocabulary).
const RECYCLE_BLOCK: usize = 64;

/// The id a launched step's token holds in the cache until it lands (no
/// vocabulary has it, so no prompt matches it).
const UNREAD: u32 = u32::MAX;

impl<E: Ops> Session<E> {
    /// A session that holds up to `max_context` tokens in pages of
    /// `page_size`; the KV cache starts at [`INITIAL_TOKENS`] and grows with
    /// the sequence.
    pub fn new(
        mut ops: E,
        model: Arc<Llama<E>>,
        max_context: usize,
        page_size: usize,
        chunk: usize,
        policy: AttentionPolicy,
    ) -> Result<Self> {
        if chunk == 0 || page_size == 0 || max_context == 0 {
            return Err(Error::InvalidOption(format!(
                "prefill chunk {chunk}, page size {page_size} and context {max_context} must be > 0"
            )));
        }
        let c = &model.cfg;
        let layout = KvLayout {
            layers: c.layers,
            kv_heads: c.kv_heads,
            head_dim: c.head_dim,
            page_size,
            num_pages: max_context.min(INITIAL_TOKENS).div_ceil(page_size),
        };
        let kv = ops.kv_cache(&layout)?;
        let shape = crate::attention::AttentionShape {
            layout,
            q_heads: c.heads,
            trained: c.max_positions,
        };
        let attention = Attention::new(policy, shape)?;
        let alloc = PageAllocator::new(&layout);
        let table = alloc.new_sequence();
        Ok(Self {
            ops,
            model,
            kv,
            alloc,
            table,
            tokens: Vec::new(),
            workspaces: HashMap::new(),
            step_ids: HashMap::new(),
            verify_ws: HashMap::new(),
            adj: None,
            recycle_ws: HashMap::new(),
            last_rows: None,
            argmax_out: None,
            chunk,
            max_context,
            warned: false,
            pages: layout.num_pages,
            attention,
            ahead: Default::default(),
            landed_len: 0,
        })
    }

    /// Tokens the KV cache holds now.
    pub fn capacity(&self) -> usize {
        self.pages * E::kv_layout(&self.kv).page_size
    }

    /// An error when `total` tokens would not fit the maximum context.
    fn check_context(&self, total: usize) -> Result<()> {
        if total > self.max_context {
            return Err(Error::Capacity(format!(
                "{total} tokens exceed the maximum context of {} tokens",
                self.max_context
            )));
        }
        Ok(())
    }

    /// Makes room for the sequence to hold `total` tokens: grows the cache
    /// as needed and reserves its pages for the sequence.
    fn reserve(&mut self, total: usize) -> Result<()> {
        self.ensure_capacity(total)?;
        self.alloc.reserve(&mut self.table, total)
    }

    /// Grows the KV cache (and the policy's storage that follows it) to hold
    /// `total` tokens: doubling, up to `max_context`.
    fn ensure_capacity(&mut self, total: usize) -> Result<()> {
        if self.attention.policy == AttentionPolicy::Dense
            && total > self.model.cfg.max_positions
            && !self.warned
        {
            self.warned = true;
            eprintln!(
                "warning: dense attention past the model's trained context of {} tokens; \
                 quality will fall (a sparse policy, e.g. TokenSelect, extrapolates)",
                self.model.cfg.max_positions
            );
        }
        let have = self.capacity();
        if total <= have {
            return Ok(());
        }
        let page = E::kv_layout(&self.kv).page_size;
        // A growth that failed half-way may have grown the cache already.
        let pages = total
            .max(2 * have)
            .min(self.max_context)
            .div_ceil(page)
            .max(E::kv_layout(&self.kv).num_pages);
        let grown = self
            .ops
            .kv_grow(&mut self.kv, pages)
            .and_then(|_| self.attention.grow(&mut self.ops, pages));
        if let Err(e) = grown {
            return Err(match e {
                Error::OutOfMemory(m) => Error::OutOfMemory(format!(
                    "growing the KV cache to {} tokens: {m}; {have} tokens fit",
                    pages * page
                )),
                other => other,
            });
        }
        self.alloc.grow(self.pages, pages);
        self.pages = pages;
        Ok(())
    }

    /// A new session on the same model and device: its own executor, empty KV
    /// cache of the same capacity, and this session's policy with fresh state.
    pub fn fork(&self) -> Result<Self> {
        let layout = &self.attention.shape.layout;
        Self::new(
            self.ops.fork()?,
            self.model.clone(),
            self.max_context,
            layout.page_size,
            self.chunk,
            self.attention.policy,
        )
    }

    /// Bytes the KV cache takes in the executor's memory.
    pub fn kv_bytes(&self) -> u64 {
        E::kv_bytes(&self.kv)
    }

    /// Switches the attention policy; a different policy drops the cache.
    pub fn set_policy(&mut self, policy: AttentionPolicy) -> Result<()> {
        if policy != self.attention.policy || self.attention.probing {
            self.switch_policy(policy)?;
            self.truncate(0);
        }
        Ok(())
    }

    /// Switches the attention policy and keeps the cache: the new policy's
    /// state starts fresh over the keys and values the old one computed
    /// (the cache's layout is the same for every policy).
    pub fn switch_policy(&mut self, policy: AttentionPolicy) -> Result<()> {
        self.abandon();
        self.attention = Attention::new(policy, self.attention.shape)?;
        Ok(())
    }

    /// The Token Recycling adjacency matrix `[vocab, ADJ_WIDTH]`, once a
    /// verify step has made it.
    pub fn recycling(&mut self) -> Result<Option<Vec<u32>>> {
        match &self.adj {
            Some(adj) => self.ops.download_ids(adj).map(Some),
            None => Ok(None),
        }
    }

    /// Replaces the Token Recycling adjacency matrix (`[vocab, ADJ_WIDTH]`
    /// token ids, as [`Session::recycling`] returns it).
    pub fn set_recycling(&mut self, adj: &[u32]) -> Result<()> {
        let vocab = self.model.cfg.vocab;
        if adj.len() != vocab * crate::ops::ADJ_WIDTH || adj.iter().any(|&t| t as usize >= vocab) {
            return Err(Error::InvalidOption(format!(
                "a Token Recycling matrix needs {} token ids below {vocab}",
                vocab * crate::ops::ADJ_WIDTH
            )));
        }
        self.adj = Some(self.ops.ids(adj)?);
        Ok(())
    }

    /// Switches to Tidal's calibration state for `c` (drops the cache).
    pub fn probe_tidal(&mut self, c: crate::attention::TidalConfig) -> Result<()> {
        self.attention = Attention::tidal_probe(c, self.attention.shape)?;
        self.truncate(0);
        Ok(())
    }

    /// Forgets everything cached after the first `len` tokens, and the steps
    /// in flight (waited for and dropped, with what they cached).
    pub fn truncate(&mut self, len: usize) {
        let len = len.min(self.settled_len());
        if !self.ahead.is_empty() {
            // The logits are a dropped step's.
            self.last_rows = None;
        }
        for (ticket, _, _) in std::mem::take(&mut self.ahead) {
            // Only their tokens are lost (cut off below); a failed device
            // shows at the next request.
            let _ = self.ops.finish_read(ticket);
        }
        if len < self.tokens.len() {
            self.tokens.truncate(len);
            self.table.len = len;
            self.last_rows = None;
        }
    }

    /// The workspace and the token and position vectors of a step of `n` rows.
    fn step_buffers(&mut self, n: usize) -> Result<()> {
        if !self.workspaces.contains_key(&n) {
            // Keep the decode workspace and the latest chunk size only (a
            // decode step may still read the logits of the last chunk).
            self.workspaces.retain(|&rows, _| rows == 1 || n == 1);
            self.step_ids.retain(|&rows, _| rows == 1 || n == 1);
            let ws = Workspace::new(&mut self.ops, &self.model.cfg, n)?;
            self.workspaces.insert(n, ws);
            let zeros = vec![0u32; n];
            let ids = (self.ops.ids(&zeros)?, self.ops.ids(&zeros)?);
            self.step_ids.insert(n, ids);
        }
        Ok(())
    }

    /// Runs the model over a step of `n` rows from position `start` (its
    /// buffers made by [`Session::step_buffers`]): the tokens `part`, or with
    /// `None` the one token the last argmax left on the device.
    fn step(&mut self, part: Option<&[u32]>, start: usize, n: usize) -> Result<()> {
        let pos: Vec<u32> = (start as u32..(start + n) as u32).collect();
        let (Some(ws), Some((ids, positions))) =
            (self.workspaces.get_mut(&n), self.step_ids.get_mut(&n))
        else {
            return Err(Error::Gpu("workspace missing".into()));
        };
        let ids = match part {
            Some(part) => {
                self.ops.set_ids(ids, part)?;
                &*ids
            }
            None => self
                .argmax_out
                .as_ref()
                .ok_or_else(|| Error::Gpu("argmax buffer missing".into()))?,
        };
        self.ops.set_ids(positions, &pos)?;
        self.model.forward(
            &mut self.ops,
            &mut self.kv,
            &self.table,
            ids,
            positions,
            start,
            n,
            ws,
            &mut self.attention,
            None,
        )?;
        self.last_rows = Some(n);
        Ok(())
    }

    /// Appends `tokens` to the cache (prefill in chunks); afterwards the logits of
    /// the last one are ready for [`Session::sample`].
    ///
    /// With `recycle` it also runs the LM head over the fed tokens (the last
    /// [`RECYCLE_PROMPT_ROWS`]) and sets each one's Token Recycling row to its
    /// 8 likeliest successors, as a verify step does for its nodes: a
    /// request's first recycled drafts then come from its own prompt rather
    /// than from an empty or unrelated matrix.
    pub fn feed(&mut self, tokens: &[u32], recycle: bool) -> Result<()> {
        if tokens.is_empty() {
            return Ok(());
        }
        self.abandon();
        let total = self.tokens.len() + tokens.len();
        self.check_context(total)?;
        if let Some(&bad) = tokens.iter().find(|&&t| t as usize >= self.model.cfg.vocab) {
            return Err(Error::InvalidOption(format!(
                "token id {bad} is outside the vocabulary of {}",
                self.model.cfg.vocab
            )));
        }
        self.reserve(total)?;
        self.attention.expect_len(total);
        // The first fed token whose Token Recycling row is filled.
        let recycle_from = tokens.len().saturating_sub(RECYCLE_PROMPT_ROWS);
        for (i, part) in tokens.chunks(self.chunk).enumerate() {
            let start = self.tokens.len();
            let n = part.len();
            self.step_buffers(n)?;
            self.step(Some(part), start, n)?;
            let first = recycle_from.saturating_sub(i * self.chunk);
            if recycle && first < n {
                self.recycle_rows(part, first)?;
            }
            self.tokens.extend_from_slice(part);
            self.table.len = self.tokens.len();
            if tokens.len() > self.chunk {
                // Long prompts: finish each chunk so the device does not queue them all.
                self.ops.flush()?;
            }
        }
        Ok(())
    }

    /// The Token Recycling matrix, made empty (all zeros) on first use.
    fn adj_ready(&mut self) -> Result<()> {
        if self.adj.is_none() {
            let n = self.model.cfg.vocab * crate::ops::ADJ_WIDTH;
            self.adj = Some(self.ops.ids(&vec![0u32; n])?);
        }
        Ok(())
    }

    /// Token Recycling rows of `part`'s tokens from `first` on, from the step
    /// just run over `part` (its workspace's last-layer rows), in blocks of
    /// [`RECYCLE_BLOCK`] rows.
    fn recycle_rows(&mut self, part: &[u32], first: usize) -> Result<()> {
        self.adj_ready()?;
        let n = part.len();
        for r0 in (first..n).step_by(RECYCLE_BLOCK) {
            let m = RECYCLE_BLOCK.min(n - r0);
            if !self.recycle_ws.contains_key(&m) {
                self.recycle_ws.retain(|&rows, _| rows == RECYCLE_BLOCK);
                let c = &self.model.cfg;
                let x = self.ops.tensor(m, c.hidden)?;
                let logits = self.ops.tensor(m, c.vocab)?;
                let ids = self.ops.ids(&vec![0u32; m])?;
                self.recycle_ws.insert(m, RecycleBuffers { x, logits, ids });
            }
            let (Some(ws), Some(RecycleBuffers { x, logits, ids }), Some(adj)) = (
                self.workspaces.get(&n),
                self.recycle_ws.get_mut(&m),
                self.adj.as_mut(),
            ) else {
                return Err(Error::Gpu("recycling buffers missing".into()));
            };
            self.ops.copy_rows(ws.hidden(), r0, x, 0, m)?;
            self.model.head_logits(&mut self.ops, x, logits)?;
            self.ops.set_ids(ids, &part[r0..r0 + m])?;
            self.ops.spec_adj_update(adj, logits, ids)?;
        }
        Ok(())
    }

    /// Speculative step: runs the draft `tree` (its root is the last chosen token,
    /// not yet in the cache) through the model in one forward, accepts a path on
    /// the device by `params` (greedy: the longest path of argmax matches;
    /// sampling: lossless multi-draft speculative sampling), commits that path's
    /// keys and values, and returns the accepted tokens after the root followed
    /// by the bonus token (not in the cache yet).
    pub fn verify(&mut self, tree: &DraftTree, params: &AcceptParams) -> Result<Vec<u32>> {
        self.abandon();
        let mask = tree.mask()?;
        let n = tree.len();
        let start = self.tokens.len();
        if start == 0 {
            return Err(Error::InvalidOption(
                "verify needs a prefilled prompt".into(),
            ));
        }
        if start + n > self.max_context {
            return Err(Error::Capacity(format!(
                "a draft tree of {n} nodes after {start} tokens exceeds the maximum context of {}",
                self.max_context
            )));
        }
        if let Some(&bad) = tree
            .tokens
            .iter()
            .find(|&&t| t as usize >= self.model.cfg.vocab)
        {
            return Err(Error::InvalidOption(format!(
                "draft token {bad} is outside the vocabulary of {}",
                self.model.cfg.vocab
            )));
        }
        self.reserve(start + n)?;
        self.table.len = start + n;
        if !self.verify_ws.contains_key(&n) {
            let ws = Workspace::for_verify(&mut self.ops, &self.model.cfg, n)?;
            let accept = self.ops.ids(&vec![0u32; accept_stride(n)])?;
            let toks = self.ops.ids(&vec![0u32; n])?;
            self.verify_ws.insert(n, VerifyBuffers { ws, accept, toks });
        }
        self.adj_ready()?;
        let (Some(VerifyBuffers { ws, accept, toks }), Some(adj)) =
            (self.verify_ws.get_mut(&n), self.adj.as_mut())
        else {
            return Err(Error::Gpu("verify workspace missing".into()));
        };
        // Recycled nodes get their tokens on the device.
        let plan = self.ops.ids(&tree.plan())?;
        self.ops.spec_draft(adj, &plan, n, toks)?;
        let pos: Vec<u32> = tree.depths().iter().map(|d| start as u32 + d).collect();
        let pos = self.ops.ids(&pos)?;
        self.model.forward(
            &mut self.ops,
            &mut self.kv,
            &self.table,
            toks,
            &pos,
            start,
            n,
            ws,
            &mut self.attention,
            Some(&mask),
        )?;
        let logits = ws
            .all_logits
            .as_ref()
            .ok_or_else(|| Error::Gpu("verify logits missing".into()))?;
        self.ops.spec_adj_update(adj, logits, toks)?;
        // Acceptance on the device; the readback is the accepted path and its
        // tokens, at most 2 + 2 * depth words.
        let depth = tree.max_path();
        let links = self.ops.ids(&tree.links())?;
        self.ops
            .spec_accept(logits, toks, &links, params, depth, 1, accept)?;
        let words = self.ops.download_ids(accept)?;
        let acc = Accepted::parse(&words, depth)?;
        let moves: Vec<(usize, usize)> = acc
            .path
            .iter()
            .enumerate()
            .filter(|(t, &node)| *t != node)
            .map(|(t, &node)| (start + node, start + t))
            .collect();
        self.ops.kv_move(&mut self.kv, &self.table, &moves)?;
        self.tokens.extend(&acc.tokens);
        self.table.len = self.tokens.len();
        self.last_rows = None;
        Ok(acc.emitted())
    }

    /// Chooses the next token from the last fed token's logits. `recent` are the
    /// tokens the repetition penalty applies to.
    pub fn sample(&mut self, sampler: &mut Sampler, recent: &[u32]) -> Result<u32> {
        self.abandon();
        let p = &sampler.params;
        if p.repetition_penalty != 1.0 && !recent.is_empty() {
            let penalty = p.repetition_penalty;
            let rows = self.last_rows()?;
            let ws = self
                .workspaces
                .get_mut(&rows)
                .ok_or_else(|| Error::Gpu("workspace missing".into()))?;
            self.ops.penalize(&mut ws.logits, recent, penalty)?;
        }
        let draw = sampler.draw();
        self.choose(draw.as_ref())?;
        let out = self.argmax_out.as_ref().ok_or_else(no_out)?;
        let id = self.ops.download_ids(out)?.first().copied();
        self.token_id(id)
    }

    /// The rows of the last fed step, whose logits the next token comes from.
    fn last_rows(&self) -> Result<usize> {
        self.last_rows
            .ok_or_else(|| Error::InvalidOption("decode before any token was fed".into()))
    }

    /// Records the choice of the next token from the last fed token's logits
    /// into the id buffer the next step's embedding reads: the argmax, or the
    /// device's pick with `draw`.
    fn choose(&mut self, draw: Option<&Draw>) -> Result<()> {
        let rows = self.last_rows()?;
        if self.argmax_out.is_none() {
            self.argmax_out = Some(self.ops.ids(&[0])?);
        }
        let (Some(ws), Some(out)) = (self.workspaces.get_mut(&rows), self.argmax_out.as_mut())
        else {
            return Err(Error::Gpu("workspace missing".into()));
        };
        match draw {
            Some(d) => self.ops.sample(&ws.logits, out, d)?,
            None => self.ops.argmax(&ws.logits, out)?,
        }
        Ok(())
    }

    /// A token id read back, checked against the vocabulary.
    fn token_id(&self, id: Option<u32>) -> Result<u32> {
        id.filter(|&t| (t as usize) < self.model.cfg.vocab)
            .ok_or_else(|| Error::Gpu(format!("decode step read back {id:?}")))
    }

    /// Decoding ahead of the host: records the choice of the next token from
    /// the last fed token's logits (the argmax, or the device's pick with
    /// `draw`) and, when `feed`, a step that feeds that token (read on the
    /// device, not by the host) at the next position, and submits them
    /// without waiting. [`Session::land`] returns the tokens in launch order;
    /// until then the cache holds a placeholder id for each fed one.
    pub fn launch(&mut self, feed: bool, draw: Option<&Draw>) -> Result<()> {
        let start = self.tokens.len();
        if feed {
            self.check_context(start + 1)?;
            self.reserve(start + 1)?;
            self.step_buffers(1)?;
        }
        self.choose(draw)?;
        let out = self.argmax_out.as_ref().ok_or_else(no_out)?;
        let ticket = self.ops.read_ids_later(out)?;
        // Queued before the step, so a failure below still lets it land.
        if self.ahead.is_empty() {
            self.landed_len = start;
        }
        self.ahead.push_back((ticket, start, feed));
        if feed {
            self.step(None, start, 1)?;
            self.tokens.push(UNREAD);
            self.table.len = self.tokens.len();
        }
        self.ops.submit_pending()
    }

    /// The oldest launched token, waiting for its step if it has not finished.
    pub fn land(&mut self) -> Result<u32> {
        let (ticket, slot, fed) = self
            .ahead
            .pop_front()
            .ok_or_else(|| Error::InvalidOption("no decode step in flight".into()))?;
        let id = self.ops.finish_read(ticket)?.first().copied();
        let id = self.token_id(id)?;
        if fed && slot < self.tokens.len() {
            self.tokens[slot] = id;
        }
        self.landed_len = slot;
        Ok(id)
    }

    /// The tokens cached as the one-step loop would have them: it feeds a
    /// token only once it has read it and needs the next, so none a step in
    /// flight fed, nor the last landed one.
    pub fn settled_len(&self) -> usize {
        match self.ahead.is_empty() {
            true => self.tokens.len(),
            false => self.landed_len,
        }
    }

    /// Steps launched and not landed yet.
    pub fn in_flight(&self) -> usize {
        self.ahead.len()
    }

    /// Drops the steps in flight (a generation that stopped reading them)
    /// with what they cached.
    fn abandon(&mut self) {
        // Without steps in flight this cuts nothing.
        self.truncate(self.settled_len());
    }

    /// The logits of the last fed token (reads back the whole row; for tests).
    pub fn logits(&mut self) -> Result<Vec<f32>> {
        self.abandon();
        let rows = self
            .last_rows
            .ok_or_else(|| Error::InvalidOption("no logits yet".into()))?;
        let ws = self
            .workspaces
            .get(&rows)
            .ok_or_else(|| Error::Gpu("workspace missing".into()))?;
        self.ops.download(&ws.logits)
    }
}

fn no_out() -> Error {
    Error::Gpu("the next token's id buffer is missing".into())
}
