//! Streaming generation: the step loop behind [`Engine::generate_ids`] and
//! [`Engine::chat`], plain decode steps and speculative verify steps, each
//! item one [`Token`].

use super::chat::StopReason;
use super::engine::{Engine, GenerateParams};
use super::sampler::Sampler;
use crate::error::{Error, Result};
use crate::sampling::AcceptParams;
use crate::speculative::Drafter;
use std::time::{Duration, Instant};

/// One generated token and the text it completes.
///
/// ```no_run
/// # use kvsieve::{Engine, GenerateParams, Options};
/// # let mut engine = Engine::load(&kvsieve::convert::default_model_dir()?, Options::default())?;
/// for tok in engine.generate("Once upon a time", &GenerateParams::default())? {
///     let tok: kvsieve::Token = tok?;
///     print!("{}", tok.text);
/// }
/// # Ok::<(), kvsieve::Error>(())
/// ```
#[derive(Clone, Debug, PartialEq)]
pub struct Token {
    /// Token id.
    pub id: u32,
    /// New text since the previous token (may be empty while a UTF-8 character is incomplete).
    pub text: String,
}

/// Streaming generation; each item is one token.
pub struct Generation<'a> {
    engine: &'a mut Engine,
    sampler: Sampler,
    drafter: Option<Box<dyn Drafter>>,
    tree_size: usize,
    /// Tokens a verify step decided that are not emitted yet.
    pending: std::collections::VecDeque<u32>,
    /// With an automatic tree size: tokens a verify step must produce to beat
    /// plain decoding (its cost in plain steps). After [`GUARD_STEPS`] verify
    /// steps producing fewer on average, the request decodes plainly.
    break_even: Option<f64>,
    /// This request's verify steps and the tokens they produced.
    verified: (usize, usize),
    max_tokens: usize,
    stop_at_eos: bool,
    /// Token ids generated so far.
    pub generated: Vec<u32>,
    emitted_text: usize,
    prefill_started: Option<Instant>,
    done: bool,
    stop: Option<StopReason>,
    /// Messages [`Engine::chat`] dropped from the front of the conversation
    /// (after the system ones) to fit the context; an app keeping the history
    /// drops them too.
    pub dropped_messages: usize,
    /// Decode steps kept in flight (0: one step at a time), see
    /// [`super::Options::decode_ahead`].
    ahead: usize,
    /// Tokens cached when the request began (after its prompt).
    base: usize,
    /// Whether the last launched step fed its token, so another may follow.
    open: bool,
}

/// Verify steps a request with an automatic tree size runs before it judges
/// whether its drafts pay.
const GUARD_STEPS: usize = 12;

impl<'a> Generation<'a> {
    /// A generation on `engine`, whose prompt is prefilled (since `started`).
    pub(super) fn new(
        engine: &'a mut Engine,
        sampler: Sampler,
        drafter: Option<Box<dyn Drafter>>,
        tree_size: usize,
        break_even: Option<f64>,
        params: &GenerateParams,
        started: Instant,
    ) -> Self {
        let p = &sampler.params;
        let ahead = match engine.decode_ahead() {
            // The penalty needs every earlier token on the host.
            n if n > 1 && drafter.is_none() && p.repetition_penalty == 1.0 => n,
            _ => 0,
        };
        let base = engine.runner.cached().len();
        Generation {
            engine,
            sampler,
            drafter,
            tree_size,
            break_even,
            verified: (0, 0),
            pending: std::collections::VecDeque::new(),
            max_tokens: params.max_tokens,
            stop_at_eos: params.stop_at_eos,
            generated: Vec::new(),
            emitted_text: 0,
            prefill_started: Some(started),
            done: params.max_tokens == 0,
            stop: (params.max_tokens == 0).then_some(StopReason::MaxTokens),
            dropped_messages: 0,
            ahead,
            base,
            open: true,
        }
    }
}

impl Generation<'_> {
    /// Why the generation ended (`None` while it runs).
    pub fn stop_reason(&self) -> Option<StopReason> {
        self.stop
    }

    /// Tokens the one-step loop would have cached by now: everything read
    /// but the last token (which it feeds only when it needs the next one).
    fn settled_len(&self, read: usize) -> usize {
        self.base + read.saturating_sub(1)
    }

    /// The next token with steps in flight: tops the window up, then lands
    /// the oldest step. Each launch reads one token and feeds it unless it is
    /// the last one wanted or the context is full, as the one-step loop would.
    fn step_ahead(&mut self) -> Result<Option<u32>> {
        let e = &mut *self.engine;
        while self.open && e.runner.in_flight() < self.ahead {
            let next = self.generated.len() + e.runner.in_flight();
            if next >= self.max_tokens {
                break;
            }
            // Every launch so far fed its token, so this one starts there.
            let room = e.runner.max_context() - (self.base + next);
            self.open = next + 1 < self.max_tokens && room > 0;
            // One draw per launch, in token order: the one-step loop's stream.
            let draw = self.sampler.draw();
            let (r, sent) = (Instant::now(), e.runner.counters().submit_host_ns);
            e.runner.launch(self.open, draw.as_ref())?;
            // Recording only: the launch's submit counts as submit time.
            let submit = e.runner.counters().submit_host_ns - sent;
            let record = r
                .elapsed()
                .saturating_sub(Duration::from_nanos(submit as u64));
            e.stats.decode_record_time += record;
        }
        if e.runner.in_flight() == 0 {
            // The last launch could not feed its token: the context is full.
            self.stop = Some(StopReason::ContextFull);
            return Ok(None);
        }
        e.runner.land().map(Some)
    }

    fn step(&mut self) -> Result<Option<Token>> {
        let t = Instant::now();
        let e = &mut *self.engine;
        // Room left for the last token and what follows it.
        let room = e.runner.max_context() - e.runner.cached().len();
        if self.ahead == 0 && self.pending.is_empty() && !self.generated.is_empty() && room == 0 {
            self.stop = Some(StopReason::ContextFull);
            return Ok(None);
        }
        let landed = match self.ahead {
            0 => None,
            _ => match self.step_ahead()? {
                Some(id) => Some(id),
                None => return Ok(None),
            },
        };
        let e = &mut *self.engine;
        let id = match (
            // With steps in flight nothing drafts, so nothing is pending.
            landed.or_else(|| self.pending.pop_front()),
            self.generated.last(),
            &mut self.drafter,
        ) {
            (Some(id), _, _) => id,
            // A draft tree needs room for all its nodes; near the end of the
            // context the step decodes one token.
            (None, Some(&root), Some(drafter)) if room >= self.tree_size => {
                // Speculative step: draft from the root, verify all nodes at once.
                let tree = drafter.draft(e.runner.cached(), root, self.tree_size)?;
                let seed = self.sampler.seed();
                let params = AcceptParams::from_sampling(&self.sampler.params, seed);
                let toks = e.runner.verify(&tree, &params)?;
                e.stats.verify_steps += 1;
                e.stats.verify_tokens += toks.len();
                self.verified = (self.verified.0 + 1, self.verified.1 + toks.len());
                let (steps, made) = self.verified;
                if self
                    .break_even
                    .is_some_and(|b| steps >= GUARD_STEPS && (made as f64) < b * steps as f64)
                {
                    // This text's drafts do not pay for their verification.
                    self.drafter = None;
                }
                self.pending.extend(toks);
                self.pending
                    .pop_front()
                    .ok_or_else(|| Error::Gpu("verify returned no token".into()))?
            }
            (None, last, _) => {
                if let Some(&last) = last {
                    let r = Instant::now();
                    e.runner.feed(&[last], false)?;
                    e.stats.decode_record_time += r.elapsed();
                }
                let recent: Vec<u32> = if self.sampler.params.repetition_penalty != 1.0 {
                    e.runner.cached().to_vec()
                } else {
                    Vec::new()
                };
                e.runner.sample(&mut self.sampler, &recent)?
            }
        };
        match self.prefill_started.take() {
            Some(start) => e.stats.prefill_time += start.elapsed(),
            None => {
                e.stats.decode_time += t.elapsed();
                e.stats.decode_tokens += 1;
            }
        }
        if self.stop_at_eos && e.config.eos.contains(&id) {
            self.stop = Some(StopReason::Eos);
            if self.ahead > 0 {
                // Drop the steps launched past the end.
                let keep = self.settled_len(self.generated.len() + 1);
                self.engine.runner.truncate(keep);
            }
            return Ok(None);
        }
        self.generated.push(id);
        let text = e.tokenizer.decode(&self.generated)?;
        // Hold back an incomplete UTF-8 sequence (decoded as U+FFFD) until it completes.
        let ready = text.trim_end_matches('\u{FFFD}');
        let delta = ready.get(self.emitted_text..).unwrap_or("").to_string();
        self.emitted_text = self.emitted_text.max(ready.len());
        Ok(Some(Token { id, text: delta }))
    }
}

impl Iterator for Generation<'_> {
    type Item = Result<Token>;
    fn next(&mut self) -> Option<Self::Item> {
        if self.done {
            return None;
        }
        if self.generated.len() >= self.max_tokens {
            self.stop.get_or_insert(StopReason::MaxTokens);
            return None;
        }
        match self.step() {
            Ok(Some(t)) => Some(Ok(t)),
            Ok(None) => {
                self.done = true;
                None
            }
            Err(e) => {
                self.done = true;
                self.stop = Some(StopReason::Error);
                Some(Err(self.engine.after_error(e)))
            }
        }
    }
}
