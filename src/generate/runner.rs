//! The engine's executor-erased session (`Runner`) and loading a model onto
//! an executor behind it.

use super::engine::Options;
use super::sampler::Sampler;
use super::session::Session;
use crate::error::{Error, Result};
use crate::model::{Llama, ModelConfig, TensorSource};
use crate::ops::Ops;
use crate::sampling::Draw;
use crate::speculative::{AcceptParams, DraftTree};
use std::sync::Arc;

/// Executor-erased session.
pub(super) trait Runner: Send {
    fn feed(&mut self, tokens: &[u32], recycle: bool) -> Result<()>;
    fn sample(&mut self, s: &mut Sampler, recent: &[u32]) -> Result<u32>;
    fn launch(&mut self, feed: bool, draw: Option<&Draw>) -> Result<()>;
    fn land(&mut self) -> Result<u32>;
    fn in_flight(&self) -> usize;
    fn runs_apart(&self) -> bool;
    fn truncate(&mut self, len: usize);
    fn cached(&self) -> &[u32];
    fn weight_bytes(&self) -> (u64, u64);
    fn logits(&mut self) -> Result<Vec<f32>>;
    fn name(&self) -> String;
    fn selection_stats(&mut self) -> crate::attention::SelectionStats;
    fn selected(&mut self, layer: usize) -> Result<Option<Vec<u32>>>;
    fn set_profiling(&mut self, on: bool);
    fn take_profile(&mut self) -> Vec<(String, u64, f64)>;
    fn set_policy(&mut self, policy: crate::attention::AttentionPolicy) -> Result<()>;
    fn switch_policy(&mut self, policy: crate::attention::AttentionPolicy) -> Result<()>;
    fn probe_tidal(&mut self, c: crate::attention::TidalConfig) -> Result<()>;
    fn recycling(&mut self) -> Result<Option<Vec<u32>>>;
    fn set_recycling(&mut self, adj: &[u32]) -> Result<()>;
    fn verify(&mut self, tree: &DraftTree, params: &AcceptParams) -> Result<Vec<u32>>;
    fn max_context(&self) -> usize;
    fn fork(&self) -> Result<Box<dyn Runner>>;
    fn kv_bytes(&self) -> u64;
    fn device_lost(&self) -> Option<Error>;
    fn policy(&self) -> crate::attention::AttentionPolicy;
    fn counters(&self) -> crate::ops::Counters;
}

impl<E: Ops> Runner for Session<E> {
    fn feed(&mut self, tokens: &[u32], recycle: bool) -> Result<()> {
        Session::feed(self, tokens, recycle)
    }
    fn sample(&mut self, s: &mut Sampler, recent: &[u32]) -> Result<u32> {
        Session::sample(self, s, recent)
    }
    fn launch(&mut self, feed: bool, draw: Option<&Draw>) -> Result<()> {
        Session::launch(self, feed, draw)
    }
    fn land(&mut self) -> Result<u32> {
        Session::land(self)
    }
    fn in_flight(&self) -> usize {
        Session::in_flight(self)
    }
    fn runs_apart(&self) -> bool {
        self.ops.runs_apart()
    }
    fn truncate(&mut self, len: usize) {
        Session::truncate(self, len)
    }
    fn cached(&self) -> &[u32] {
        &self.tokens[..self.settled_len()]
    }
    fn weight_bytes(&self) -> (u64, u64) {
        (self.model.weight_bytes, self.model.weight_bytes_per_token)
    }
    fn logits(&mut self) -> Result<Vec<f32>> {
        Session::logits(self)
    }
    fn name(&self) -> String {
        self.ops.name()
    }
    fn selection_stats(&mut self) -> crate::attention::SelectionStats {
        self.attention.stats(&mut self.ops).unwrap_or_default()
    }
    fn selected(&mut self, layer: usize) -> Result<Option<Vec<u32>>> {
        self.attention.selected(&mut self.ops, layer)
    }
    fn set_profiling(&mut self, on: bool) {
        self.ops.set_profiling(on)
    }
    fn take_profile(&mut self) -> Vec<(String, u64, f64)> {
        self.ops.take_profile()
    }
    fn set_policy(&mut self, policy: crate::attention::AttentionPolicy) -> Result<()> {
        Session::set_policy(self, policy)
    }
    fn switch_policy(&mut self, policy: crate::attention::AttentionPolicy) -> Result<()> {
        Session::switch_policy(self, policy)
    }
    fn probe_tidal(&mut self, c: crate::attention::TidalConfig) -> Result<()> {
        Session::probe_tidal(self, c)
    }
    fn recycling(&mut self) -> Result<Option<Vec<u32>>> {
        Session::recycling(self)
    }
    fn set_recycling(&mut self, adj: &[u32]) -> Result<()> {
        Session::set_recycling(self, adj)
    }
    fn verify(&mut self, tree: &DraftTree, params: &AcceptParams) -> Result<Vec<u32>> {
        Session::verify(self, tree, params)
    }
    fn max_context(&self) -> usize {
        self.max_context
    }
    fn fork(&self) -> Result<Box<dyn Runner>> {
        Ok(Box::new(Session::fork(self)?))
    }
    fn kv_bytes(&self) -> u64 {
        Session::kv_bytes(self)
    }
    fn device_lost(&self) -> Option<Error> {
        self.ops.device_lost()
    }
    fn policy(&self) -> crate::attention::AttentionPolicy {
        self.attention.policy
    }
    fn counters(&self) -> crate::ops::Counters {
        self.ops.counters()
    }
}

/// Loads the model onto `ops` and wraps it in a session.
pub(super) fn load<E: Ops + 'static>(
    mut ops: E,
    weights: &dyn TensorSource,
    config: &ModelConfig,
    max_context: usize,
    opts: &Options,
) -> Result<Box<dyn Runner>> {
    let model = Llama::load(
        &mut ops,
        weights,
        config.clone(),
        max_context,
        opts.progress,
        opts.quantize,
    )?;
    Ok(Box::new(Session::new(
        ops,
        Arc::new(model),
        max_context,
        opts.page_size,
        opts.prefill_chunk,
        opts.policy,
    )?))
}
