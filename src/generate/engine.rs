//! The library entry point: load a model directory, generate a stream of tokens,
//! chat with a message list (reusing the cached conversation prefix).

use super::chat::{self, Overflow};
use super::footprint::{host_memory, Footprint, MAX_CONTEXT};
use super::generation::Generation;
use super::runner::{self, Runner};
use super::sampler::{Sampler, SamplingParams};
use super::state::StateFiles;
use super::tokenizer::{Message, Tokenizer};
use crate::error::{Error, Result};
use crate::gpu::GpuContext;
use crate::kernels::GpuExecutor;
use crate::model::{GgufModel, ModelConfig, TensorSource, Weights};
use crate::quant::DType;
use crate::reference::RefExecutor;
use crate::speculative::{AcceptParams, DraftTree, Speculate, TreeSize};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Which executor runs the model.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Backend {
    /// WGSL kernels through wgpu (the default).
    #[default]
    Gpu,
    /// CPU f32 reference executor.
    Reference,
}

impl std::str::FromStr for Backend {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "gpu" => Ok(Self::Gpu),
            "reference" | "ref" | "cpu" => Ok(Self::Reference),
            other => Err(Error::InvalidOption(format!(
                "backend {other:?}: expected gpu or reference"
            ))),
        }
    }
}

/// Load-time options.
///
/// ```
/// use kvsieve::{AttentionPolicy, Backend, Options, TokenSelectConfig};
/// let opts = Options {
///     backend: Backend::Reference,
///     max_context: 8192,
///     policy: AttentionPolicy::TokenSelect(TokenSelectConfig::default()),
///     ..Options::default()
/// };
/// assert!(opts.policy.validate().is_ok());
/// ```
#[derive(Clone, Debug)]
pub struct Options {
    /// Executor.
    pub backend: Backend,
    /// Largest context in tokens. The KV cache starts at 2048 tokens and
    /// grows with the sequence up to it; 0 = as far as the adapter's (or for
    /// the reference, the machine's) memory allows, at most 2^24.
    pub max_context: usize,
    /// Tokens per prefill chunk.
    pub prefill_chunk: usize,
    /// Tokens per KV page.
    pub page_size: usize,
    /// Progress bars on stderr.
    pub progress: bool,
    /// Attention policy.
    pub policy: crate::attention::AttentionPolicy,
    /// Quantize float weight matrices at load (Q8_0, Q4_0 or Q4_1, ggml's
    /// reference quantizers); `None` keeps each tensor's stored type.
    pub quantize: Option<crate::quant::DType>,
    /// The GPU device to run on (`Backend::Gpu`): one an app already has, to
    /// share it with its own work or to choose the adapter in code. `None`
    /// picks one as [`GpuContext::new`] does.
    pub device: Option<Arc<GpuContext>>,
    /// Where state learned at run time is kept across processes, per model:
    /// Tidal's calibrated layer, the Token Recycling matrix, the drafts each
    /// drafter had accepted, the verify-cost curve of each adapter. `None`:
    /// `state/` under the cache directory.
    pub state_dir: Option<std::path::PathBuf>,
    /// Decode steps kept in flight (1: each token is read back before the
    /// next step is recorded). With more, the next step reads its token on
    /// the device (the argmax, or for sampling requests the device's pick
    /// with the host sampler's draw), so the host records it while the device
    /// runs the last one; a request that stops at an end-of-sequence token
    /// drops the steps past it. Requests that penalise repetition or
    /// speculate decode one step at a time. 0 (the default): [`DECODE_AHEAD`] on a GPU, 1 on
    /// a CPU adapter and the reference executor, where the host's recording
    /// takes cores from the device.
    pub decode_ahead: usize,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            backend: Backend::Gpu,
            max_context: 0,
            prefill_chunk: 512,
            page_size: 64,
            progress: false,
            policy: Default::default(),
            quantize: None,
            device: None,
            state_dir: None,
            decode_ahead: 0,
        }
    }
}

/// Decode steps in flight on a GPU by default ([`Options::decode_ahead`]):
/// one runs while the host records the next.
pub const DECODE_AHEAD: usize = 2;

/// The most decode steps [`Options::decode_ahead`] keeps in flight (each one
/// past an end-of-sequence token is wasted work).
pub const MAX_DECODE_AHEAD: usize = 8;

fn check_decode_ahead(steps: usize) -> Result<()> {
    match steps {
        0..=MAX_DECODE_AHEAD => Ok(()),
        _ => Err(Error::InvalidOption(format!(
            "decode ahead {steps}: 1..={MAX_DECODE_AHEAD} steps in flight"
        ))),
    }
}

/// What `generate` and `chat` do.
///
/// ```
/// use kvsieve::{GenerateParams, Speculate};
/// let mut p = GenerateParams { max_tokens: 64, speculate: Speculate::Both, ..Default::default() };
/// p.sampling.temperature = 0.7;
/// assert!(p.sampling.validate().is_ok());
/// ```
#[derive(Clone, Debug)]
pub struct GenerateParams {
    /// Sampling.
    pub sampling: SamplingParams,
    /// Tokens to generate at most.
    pub max_tokens: usize,
    /// Stop at an end-of-sequence token (it is not emitted).
    pub stop_at_eos: bool,
    /// Speculative decoding drafter (dense attention, no repetition penalty;
    /// greedy or sampled, lossless either way).
    pub speculate: Speculate,
    /// Nodes of a draft tree: fixed, or chosen from this adapter's measured
    /// verify cost (measured once per engine, on the first speculative request).
    pub tree_size: TreeSize,
    /// [`Engine::chat`] past the context: drop the oldest turns (the default)
    /// or return the error.
    pub overflow: Overflow,
}

impl Default for GenerateParams {
    fn default() -> Self {
        Self {
            sampling: SamplingParams::default(),
            max_tokens: 128,
            stop_at_eos: true,
            speculate: Speculate::Off,
            tree_size: TreeSize::Auto,
            overflow: Overflow::DropOldest,
        }
    }
}

/// Throughput counters since the engine was loaded (or reset).
///
/// ```
/// use std::time::Duration;
/// let s = kvsieve::Stats { decode_tokens: 50, decode_time: Duration::from_secs(2), ..Default::default() };
/// assert_eq!(s.decode_tps(), 25.0);
/// ```
#[derive(Clone, Debug, Default)]
pub struct Stats {
    /// Prompt tokens run through prefill.
    pub prefill_tokens: usize,
    /// Time in prefill (including the first token's sampling, when the work runs).
    pub prefill_time: Duration,
    /// Tokens decoded one by one.
    pub decode_tokens: usize,
    /// Time in decode steps.
    pub decode_time: Duration,
    /// Host time of decode steps spent recording the step's work (the
    /// forward's ops), before it is submitted.
    pub decode_record_time: Duration,
    /// Speculative verify forwards.
    pub verify_steps: usize,
    /// Tokens those forwards produced (accepted drafts plus the bonus token).
    pub verify_tokens: usize,
    /// Draft tree size of the last speculative request (0: speculation off,
    /// or the auto choice found that no size pays on this adapter).
    pub tree_size: usize,
}

impl Stats {
    /// Prefill tokens per second.
    pub fn prefill_tps(&self) -> f64 {
        self.prefill_tokens as f64 / self.prefill_time.as_secs_f64().max(1e-9)
    }
    /// Decode tokens per second.
    pub fn decode_tps(&self) -> f64 {
        self.decode_tokens as f64 / self.decode_time.as_secs_f64().max(1e-9)
    }
    /// The last request's draft tree size, or "off".
    pub fn tree_label(&self) -> String {
        match self.tree_size {
            0 => "off".into(),
            n => format!("{n} nodes"),
        }
    }
    /// Mean tokens per verify forward (tau, bonus included), if any ran.
    pub fn mean_accepted(&self) -> Option<f64> {
        (self.verify_steps > 0).then(|| self.verify_tokens as f64 / self.verify_steps as f64)
    }
}

/// A loaded model ready to generate: one conversation (KV cache, policy
/// state, statistics) over weights that [`Engine::session`] shares with more.
///
/// Threads: an `Engine` is `Send` (move it to any thread) but not `Sync`
/// (each call takes `&mut self`, so one thread drives a session at a time).
/// Sessions of one model may run on different threads at once; on the GPU
/// their submits share one queue and take turns (on wgpu's GL backend, one
/// at a time through a lock). A [`Generation`] borrows its engine and lives
/// on that engine's thread.
///
/// ```no_run
/// use kvsieve::generate::{Engine, GenerateParams, Message, Options};
/// let mut engine = Engine::load_default(Options::default())?;
/// let msgs = [Message::new("user", "Name three colours.")];
/// for tok in engine.chat(&msgs, &GenerateParams::default())? {
///     print!("{}", tok?.text);
/// }
/// # Ok::<(), kvsieve::Error>(())
/// ```
pub struct Engine {
    /// Model hyper-parameters.
    pub config: ModelConfig,
    /// Tokenizer and chat template (shared by the engine's sessions).
    pub tokenizer: Arc<Tokenizer>,
    pub(super) runner: Box<dyn Runner>,
    /// Throughput counters.
    pub stats: Stats,
    /// Measured verify cost `(nodes, seconds)` behind the auto tree size.
    verify_costs: Option<Vec<(usize, f64)>>,
    /// Whether the caller chose the context capacity (`Options::max_context`).
    chosen_context: bool,
    /// Where this model's state is kept across processes.
    pub(super) state: Option<StateFiles>,
    /// Whether the speculation state (Token Recycling matrix, acceptance)
    /// was looked for in the state files (before the first speculative
    /// request; the engine then saves it when dropped).
    pub(super) speculation_restored: bool,
    /// Drafts accepted against the tau tables' expectation, per drafter
    /// (kept with the model's state).
    pub(super) acceptance: crate::speculative::Acceptance,
    /// The speculative request in flight: drafter, tree size and the verify
    /// counters when it began (folded into `acceptance` by the next request).
    pub(super) pending: Option<(Speculate, usize, usize, usize)>,
    /// [`Options::decode_ahead`].
    pub(super) decode_ahead: usize,
}

impl Engine {
    /// Loads a model: a Hugging Face directory (config.json, safetensors,
    /// tokenizer.json) or a GGUF file (read in place; weights keep their types).
    pub fn load(path: &Path, opts: Options) -> Result<Self> {
        check_decode_ahead(opts.decode_ahead)?;
        if let Some(q) = opts.quantize {
            if !matches!(q, DType::Q8_0 | DType::Q4_0 | DType::Q4_1) {
                return Err(Error::InvalidOption(format!(
                    "quantize to {q}: q8_0, q4_0 or q4_1"
                )));
            }
        }
        let (weights, config, tokenizer): (Box<dyn TensorSource>, _, _) = if path.is_file() {
            let (g, config, (tok, tok_cfg)) = GgufModel::open(path)?;
            let tokenizer = Tokenizer::from_parts(tok.to_string().as_bytes(), &tok_cfg)
                .map_err(|e| e.in_file(path))?;
            (Box::new(g), config, tokenizer)
        } else {
            let config = ModelConfig::from_file(&path.join("config.json"))?;
            let tokenizer = Tokenizer::load(path)?;
            (Box::new(Weights::open(path)?), config, tokenizer)
        };
        let weights = weights.as_ref();
        if opts.max_context > MAX_CONTEXT {
            return Err(Error::InvalidOption(format!(
                "max_context {}: at most {MAX_CONTEXT} tokens",
                opts.max_context
            )));
        }
        let need = Footprint::of(weights, &config, &opts);
        // The KV cache starts small and grows with the sequence: up to
        // max_context when given, else up to what the memory holds.
        let first = match opts.max_context {
            0 => crate::generate::session::INITIAL_TOKENS,
            n => n.min(crate::generate::session::INITIAL_TOKENS),
        };
        let cap = |fit: usize| match opts.max_context {
            0 => fit.clamp(1, MAX_CONTEXT),
            n => n,
        };
        let runner = match opts.backend {
            Backend::Gpu => {
                let ex = match &opts.device {
                    Some(ctx) => GpuExecutor::on(ctx.clone())?,
                    None => GpuExecutor::new()?,
                };
                // A CPU driver allocates from the host.
                let cpu = ex.ctx.info.device_type == wgpu::DeviceType::Cpu;
                let fit = match ex.ctx.memory_bytes() {
                    Some(heap) => need.fits(first, Some(heap), &ex.ctx.info.name)?,
                    None if cpu => need.fits(first, host_memory(), "this machine")?,
                    None => usize::MAX,
                };
                runner::load(ex, weights, &config, cap(fit), &opts)?
            }
            Backend::Reference => {
                let fit = need.fits(first, host_memory(), "this machine")?;
                runner::load(RefExecutor::new(), weights, &config, cap(fit), &opts)?
            }
        };
        Ok(Self {
            config,
            tokenizer: Arc::new(tokenizer),
            runner,
            stats: Stats::default(),
            verify_costs: None,
            chosen_context: opts.max_context > 0,
            state: StateFiles::new(path, opts.state_dir.as_deref()),
            speculation_restored: false,
            acceptance: Default::default(),
            pending: None,
            decode_ahead: opts.decode_ahead,
        })
    }

    /// Loads the default model (SmolLM2-135M-Instruct) as shipped, Q4_1 weights
    /// with a Q8_0 embedding, fetching the GGUF file on first use.
    pub fn load_default(opts: Options) -> Result<Self> {
        let path = crate::convert::default_model_gguf()?;
        Self::load(&path, opts)
    }

    /// Another conversation on the same model: the weights, tokenizer and
    /// device are shared (nothing is loaded again); the new engine has its own
    /// KV cache (of this one's capacity), attention policy state (this one's
    /// policy), speculation state and statistics. Create and drop sessions at
    /// will; each is `Send` and may run on its own thread (the GPU queue is
    /// shared, so concurrent sessions take turns on the device).
    ///
    /// ```no_run
    /// use kvsieve::{Engine, GenerateParams, Message, Options};
    /// let mut chat = Engine::load_default(Options::default())?;
    /// let mut summary = chat.session()?; // same weights, own KV cache
    /// let p = GenerateParams::default();
    /// let a: String = chat.chat(&[Message::new("user", "Hi!")], &p)?
    ///     .map(|t| t.map(|t| t.text)).collect::<Result<_, _>>()?;
    /// let b: String = summary.generate("Summary of the day:", &p)?
    ///     .map(|t| t.map(|t| t.text)).collect::<Result<_, _>>()?;
    /// eprintln!("{a}\n{b}\nKV: {} + {} bytes", chat.kv_bytes(), summary.kv_bytes());
    /// # Ok::<(), kvsieve::Error>(())
    /// ```
    pub fn session(&self) -> Result<Self> {
        Ok(Self {
            config: self.config.clone(),
            tokenizer: self.tokenizer.clone(),
            runner: self
                .runner
                .fork()
                .map_err(|e| self.runner.device_lost().unwrap_or(e))?,
            stats: Stats::default(),
            verify_costs: self.verify_costs.clone(),
            chosen_context: self.chosen_context,
            state: self.state.clone(),
            speculation_restored: false,
            // Read from the state files with the matrix, as a new engine's.
            acceptance: Default::default(),
            pending: None,
            decode_ahead: self.decode_ahead,
        })
    }

    /// Bytes this session's KV cache takes on the executor (device memory on
    /// the GPU; the weights are counted once, by [`Engine::weight_bytes`]).
    pub fn kv_bytes(&self) -> u64 {
        self.runner.kv_bytes()
    }

    /// Bytes the weights take on the executor, and the bytes of weights one
    /// decode step reads.
    pub fn weight_bytes(&self) -> (u64, u64) {
        self.runner.weight_bytes()
    }

    /// Executor name.
    pub fn backend_name(&self) -> String {
        self.runner.name()
    }

    /// Tokens currently held in the KV cache.
    pub fn cached_tokens(&self) -> &[u32] {
        self.runner.cached()
    }

    /// The executor's work counters since the engine was created (dispatches,
    /// bind groups, submits, host time encoding and submitting, waiting):
    /// with [`Stats::decode_record_time`], the host cost of a step.
    pub fn counters(&self) -> crate::ops::Counters {
        self.runner.counters()
    }

    /// Per-kernel GPU timing (see [`crate::gpu::Recorder::set_profiling`]).
    pub fn set_profiling(&mut self, on: bool) {
        self.runner.set_profiling(on)
    }

    /// Per-kernel totals since profiling began: (kernel, dispatches, nanoseconds).
    pub fn take_profile(&mut self) -> Vec<(String, u64, f64)> {
        self.runner.take_profile()
    }

    /// Sparse-attention counters (selections run, Selection Cache hits).
    pub fn selection_stats(&mut self) -> crate::attention::SelectionStats {
        self.runner.selection_stats()
    }

    /// The tokens `layer` selected in the last sparse decode step, if any.
    pub fn selected(&mut self, layer: usize) -> Result<Option<Vec<u32>>> {
        self.runner.selected(layer)
    }

    /// The attention policy in use.
    pub fn policy(&self) -> crate::attention::AttentionPolicy {
        self.runner.policy()
    }

    /// Switches the attention policy for the next requests. The cached
    /// conversation is dropped when the policy changes, since its keys and values
    /// were computed under the old one.
    ///
    /// ```no_run
    /// use kvsieve::attention::{AttentionPolicy, TokenSelectConfig};
    /// use kvsieve::generate::{Engine, Options};
    /// let mut engine = Engine::load_default(Options::default())?;
    /// engine.set_policy(AttentionPolicy::TokenSelect(TokenSelectConfig::default()))?;
    /// # Ok::<(), kvsieve::Error>(())
    /// ```
    pub fn set_policy(&mut self, policy: crate::attention::AttentionPolicy) -> Result<()> {
        self.runner.set_policy(policy)
    }

    /// Switches the attention policy and keeps the cached conversation: the
    /// new policy attends over keys and values the old one computed. For
    /// prefilling with one policy and decoding with another (a dense prefill,
    /// then sparse decoding), or comparing policies' decoding over one prefill.
    ///
    /// ```no_run
    /// use kvsieve::attention::{AttentionPolicy, QuestConfig};
    /// use kvsieve::generate::{Engine, GenerateParams, Options};
    /// let mut engine = Engine::load_default(Options::default())?;
    /// let ids = engine.tokenizer.encode("The grass is green. The sky is")?;
    /// engine.prefill(&ids)?; // dense
    /// engine.switch_policy(AttentionPolicy::Quest(QuestConfig::default()))?;
    /// for t in engine.generate_ids(&ids, &GenerateParams::default())? {
    ///     print!("{}", t?.text); // the prompt stays cached; Quest decodes
    /// }
    /// # Ok::<(), kvsieve::Error>(())
    /// ```
    pub fn switch_policy(&mut self, policy: crate::attention::AttentionPolicy) -> Result<()> {
        self.runner.switch_policy(policy)
    }

    /// One speculative verify step on the cached tokens: `tree`'s root is the
    /// next token (not cached yet); `params` is the acceptance rule
    /// ([`AcceptParams::greedy`] or one matching a sampler). Commits the accepted
    /// path and returns the accepted tokens after the root plus the bonus token.
    /// For tools and tests; generation with `GenerateParams::speculate` calls it
    /// for you.
    pub fn verify(&mut self, tree: &DraftTree, params: &AcceptParams) -> Result<Vec<u32>> {
        self.runner.verify(tree, params)
    }

    /// Seconds of one speculative verify step of n chained draft nodes after
    /// the prompt `ids` (its last token is the root), best of `reps`, for each
    /// n of `sizes` in order; stops after the first size costing more than
    /// `stop_above` times the first one. Leaves `ids[..len - 1]` cached.
    pub fn verify_cost(
        &mut self,
        ids: &[u32],
        sizes: &[usize],
        reps: usize,
        stop_above: f64,
    ) -> Result<Vec<(usize, f64)>> {
        if ids.len() < 2 {
            return Err(Error::InvalidOption(
                "measuring the verify cost needs a prompt of two tokens or more".into(),
            ));
        }
        let prefix = ids.len() - 1;
        if self.runner.cached().get(..prefix) != Some(&ids[..prefix]) {
            self.prefill(&ids[..prefix])?;
        }
        let mut out: Vec<(usize, f64)> = Vec::new();
        for &n in sizes {
            let mut tree = DraftTree::new(ids[prefix]);
            for i in 1..n {
                tree.push(i - 1, ids[prefix])?;
            }
            let mut best = f64::MAX;
            for _ in 0..reps.max(1) {
                self.runner.truncate(prefix);
                let t = Instant::now();
                self.runner.verify(&tree, &AcceptParams::greedy())?;
                best = best.min(t.elapsed().as_secs_f64());
            }
            self.runner.truncate(prefix);
            out.push((n, best));
            if best > stop_above * out[0].1 {
                break;
            }
        }
        Ok(out)
    }

    /// Context capacity in tokens (prompt and answer together): the KV cache
    /// grows up to it ([`Options::max_context`], or what the memory holds).
    pub fn max_context(&self) -> usize {
        self.runner.max_context()
    }

    /// The context [`Engine::chat`] keeps a conversation within: the capacity,
    /// except that with dense attention and no `max_context` chosen it is the
    /// model's trained context (dense attention past it loses quality; the
    /// sparse policies extrapolate).
    pub fn chat_context(&self) -> usize {
        let dense = self.runner.policy() == crate::attention::AttentionPolicy::Dense;
        match (self.chosen_context, dense) {
            (false, true) => self.max_context().min(self.config.max_positions),
            _ => self.max_context(),
        }
    }

    /// Sets [`Options::decode_ahead`] for the next requests.
    ///
    /// ```no_run
    /// # let mut engine = kvsieve::Engine::load_default(Default::default())?;
    /// engine.set_decode_ahead(1)?; // read each token before the next step
    /// assert!(engine.set_decode_ahead(100).is_err());
    /// # Ok::<(), kvsieve::Error>(())
    /// ```
    pub fn set_decode_ahead(&mut self, steps: usize) -> Result<()> {
        check_decode_ahead(steps)?;
        self.decode_ahead = steps;
        Ok(())
    }

    /// Decode steps requests keep in flight ([`Options::decode_ahead`], its
    /// automatic value resolved for this executor).
    pub fn decode_ahead(&self) -> usize {
        match self.decode_ahead {
            0 if self.runner.runs_apart() => DECODE_AHEAD,
            0 => 1,
            n => n,
        }
    }

    /// Drops the cached conversation.
    pub fn reset(&mut self) {
        self.runner.truncate(0);
    }

    /// Makes the cache hold exactly `ids` with fresh logits for the last one,
    /// reusing the longest cached prefix.
    pub fn prefill(&mut self, ids: &[u32]) -> Result<()> {
        self.recycling_prefill(ids, false)
    }

    /// [`Engine::prefill`], also filling the Token Recycling rows of the fed
    /// tokens when `recycle` (see `Session::feed`).
    fn recycling_prefill(&mut self, ids: &[u32], recycle: bool) -> Result<()> {
        if ids.is_empty() {
            return Err(Error::InvalidOption("empty prompt".into()));
        }
        // Recording a step creates nothing on the device, so a lost device
        // would otherwise show only at the first readback.
        if let Some(lost) = self.runner.device_lost() {
            return Err(self.after_error(lost));
        }
        let cached = self.runner.cached();
        let mut lcp = cached.iter().zip(ids).take_while(|(a, b)| a == b).count();
        if lcp == ids.len() {
            lcp -= 1; // re-run the last token to get its logits
        }
        self.runner.truncate(lcp);
        if let Err(e) = self.runner.feed(&ids[lcp..], recycle) {
            return Err(self.after_error(e));
        }
        self.stats.prefill_tokens += ids.len() - lcp;
        Ok(())
    }

    /// After a device error the cache may hold half-written work: it is
    /// dropped, so the next request recomputes the conversation (the engine
    /// stays usable). After [`Error::DeviceLost`] every call fails the same way.
    pub(super) fn after_error(&mut self, e: Error) -> Error {
        if let Some(lost) = self.runner.device_lost() {
            self.runner.truncate(0);
            return lost;
        }
        if matches!(
            e,
            Error::Gpu(_) | Error::OutOfMemory(_) | Error::DeviceLost(_) | Error::Internal(_)
        ) {
            self.runner.truncate(0);
        }
        e
    }

    /// Logits after the last fed token (whole vocabulary; for tests and tools).
    pub fn logits(&mut self) -> Result<Vec<f32>> {
        self.runner.logits()
    }

    /// Streams tokens continuing `prompt` (used as is, no template).
    pub fn generate(&mut self, prompt: &str, params: &GenerateParams) -> Result<Generation<'_>> {
        let ids = self.tokenizer.encode(prompt)?;
        self.generate_ids(&ids, params)
    }

    /// Streams tokens continuing the prompt token ids.
    pub fn generate_ids(&mut self, ids: &[u32], params: &GenerateParams) -> Result<Generation<'_>> {
        let sampler = Sampler::new(params.sampling.clone())?;
        // Checked before any tree-size measurement, so the answer does not
        // depend on what the measurement would choose.
        if params.speculate != Speculate::Off && params.sampling.repetition_penalty != 1.0 {
            return Err(Error::InvalidOption(
                "speculative decoding does not take a repetition penalty (each draft node has its own history)".into(),
            ));
        }
        let t = Instant::now();
        let mut calibration = Duration::ZERO;
        let mut break_even = None;
        self.fold_pending();
        if params.speculate != Speculate::Off {
            self.restore_speculation()?;
        }
        // The recycling drafter drafts from the prompt's own rows first. With
        // both drafters prompt lookup already proposes what those rows would
        // (tau on specbench-mini unchanged at 2, 4 and 8 nodes), so their
        // prompts skip the LM head over every row.
        let recycles = params.speculate == Speculate::Recycling;
        let tree_size = match (params.speculate, params.tree_size) {
            (Speculate::Off, _) => 0,
            (_, TreeSize::Fixed(n)) if (1..=crate::ops::MAX_NODES).contains(&n) => n,
            (_, TreeSize::Fixed(n)) => {
                return Err(Error::InvalidOption(format!(
                    "tree size {n} must be in 1..={}",
                    crate::ops::MAX_NODES
                )))
            }
            (spec, TreeSize::Auto) => {
                if self.verify_costs.is_none() {
                    self.verify_costs = self.saved_verify_costs();
                }
                if self.verify_costs.is_none() && ids.len() >= 2 {
                    // The prompt prefix is real prefill work (kept in the
                    // cache); the probing is timed apart.
                    self.recycling_prefill(&ids[..ids.len() - 1], recycles)?;
                    let c = Instant::now();
                    let sizes = crate::speculative::PROBE_SIZES;
                    let max = crate::speculative::max_expected_tau();
                    let costs = self.verify_cost(ids, &sizes, 2, max);
                    let costs = costs.map_err(|e| self.after_error(e))?;
                    self.save_verify_costs(&costs);
                    self.verify_costs = Some(costs);
                    calibration = c.elapsed();
                }
                // The size the acceptance seen so far makes best; when none
                // pays by it, the tables' choice, which the request drops if
                // its own drafts do not pay (see `Generation::break_even`).
                let costs = self.verify_costs.as_deref().unwrap_or(&[]);
                let accept = self.acceptance.scale(spec);
                let n = crate::speculative::choose_tree_size(spec, costs, accept)
                    .or_else(|| crate::speculative::choose_tree_size(spec, costs, 1.0))
                    .unwrap_or(0);
                let cost = |n| costs.iter().find(|c| c.0 == n).map(|c| c.1);
                if let (Some(one), Some(at)) = (cost(1), cost(n)) {
                    break_even = Some(at / one);
                }
                n
            }
        };
        let drafter = (tree_size > 0)
            .then(|| params.speculate.drafter(tree_size))
            .flatten();
        if drafter.is_some() {
            let s = &self.stats;
            self.pending = Some((params.speculate, tree_size, s.verify_steps, s.verify_tokens));
        }
        self.stats.tree_size = tree_size;
        self.recycling_prefill(ids, recycles && drafter.is_some())?;
        let t = t + calibration;
        Ok(Generation::new(
            self, sampler, drafter, tree_size, break_even, params, t,
        ))
    }

    /// Streams the assistant's answer to `messages` (chat template applied, generation
    /// prompt added). The cached prefix of the conversation is reused. When the
    /// conversation and the room kept for the answer (`max_tokens`, at most half
    /// the context) do not fit, [`GenerateParams::overflow`] decides: the oldest
    /// turns are dropped ([`Generation::dropped_messages`]), or it is an error.
    pub fn chat(
        &mut self,
        messages: &[Message],
        params: &GenerateParams,
    ) -> Result<Generation<'_>> {
        let max = self.chat_context();
        let budget = max - params.max_tokens.min(max / 2);
        let (ids, dropped) = chat::fit(&self.tokenizer, messages, budget, params.overflow)?;
        let mut g = self.generate_ids(&ids, params)?;
        g.dropped_messages = dropped;
        Ok(g)
    }
}
