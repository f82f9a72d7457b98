//! The sampling rule, below the ops interface: the parameters of plain and
//! speculative sampling, the one target distribution both follow (the host
//! sampler, the reference executor's acceptance and, in WGSL, the accept
//! kernel), and the seeded draws the acceptance kernels share. Lossless
//! speculation depends on these agreeing.

use crate::error::{Error, Result};

/// How the next token is chosen.
#[derive(Clone, Debug, PartialEq)]
pub struct SamplingParams {
    /// 0 = greedy (argmax on the device, 4 bytes read back).
    pub temperature: f32,
    /// Candidates considered (1..=64).
    pub top_k: usize,
    /// Nucleus threshold in (0, 1].
    pub top_p: f32,
    /// Hugging Face repetition penalty (1 = off).
    pub repetition_penalty: f32,
    /// Seed of the sampler's RNG.
    pub seed: u64,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self {
            temperature: 0.0,
            top_k: 40,
            top_p: 1.0,
            repetition_penalty: 1.0,
            seed: 0,
        }
    }
}

impl SamplingParams {
    /// Checks every value, naming the bad one.
    pub fn validate(&self) -> Result<()> {
        if !(self.temperature >= 0.0) || !self.temperature.is_finite() {
            return Err(Error::InvalidOption(format!(
                "temperature {} must be >= 0",
                self.temperature
            )));
        }
        if self.top_k == 0 || self.top_k > 64 {
            return Err(Error::InvalidOption(format!(
                "top-k {} must be in 1..=64",
                self.top_k
            )));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(Error::InvalidOption(format!(
                "top-p {} must be in (0, 1]",
                self.top_p
            )));
        }
        if !(self.repetition_penalty > 0.0) || !self.repetition_penalty.is_finite() {
            return Err(Error::InvalidOption(format!(
                "repetition penalty {} must be > 0",
                self.repetition_penalty
            )));
        }
        Ok(())
    }

    /// True when sampling reduces to argmax.
    pub fn greedy(&self) -> bool {
        self.temperature == 0.0 || self.top_k == 1
    }
}

/// One plain sampling step as the device draws it ([`crate::ops::TensorOps::sample`]):
/// the target distribution's parameters and the step's uniform draw, taken
/// from the host sampler's stream so the token is the one the host would pick
/// from the same candidates.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Draw {
    /// Candidates considered (1..=64).
    pub top_k: usize,
    /// Softmax temperature (> 0).
    pub temperature: f32,
    /// Nucleus threshold in (0, 1].
    pub top_p: f32,
    /// Uniform in [0, 1).
    pub u: f32,
}

/// The candidate (descending logits) that the uniform draw `u` picks from
/// [`target_distribution`]: the first whose cumulative probability passes
/// `u` times the nucleus's mass. `sampling.wgsl::pick` is its twin.
///
/// ```
/// let c = [(7, 2.0), (3, 1.0), (9, -5.0)];
/// assert_eq!(kvsieve::sampling::pick(&c, 1.0, 1.0, 0.1), Some(7));
/// assert_eq!(kvsieve::sampling::pick(&c, 1.0, 1.0, 0.9), Some(3));
/// ```
pub fn pick(candidates: &[(u32, f32)], temperature: f32, top_p: f32, u: f32) -> Option<u32> {
    let probs = target_distribution(candidates, temperature, top_p);
    let mass: f32 = probs.iter().sum();
    let mut u = u * mass;
    for (c, p) in candidates.iter().zip(&probs) {
        if u < *p {
            return Some(c.0);
        }
        u -= p;
    }
    candidates.get(probs.len().checked_sub(1)?).map(|c| c.0)
}

/// How a verify step accepts draft tokens: the target distribution (the plain
/// sampler's: top-k, temperature, nucleus; `top_k` 1 is greedy) and the seed of
/// its random draws.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AcceptParams {
    /// Candidates of the target distribution (1..=64; 1 = greedy).
    pub top_k: usize,
    /// Softmax temperature (ignored when `top_k` is 1).
    pub temperature: f32,
    /// Nucleus threshold in (0, 1].
    pub top_p: f32,
    /// Seed of this step's draws.
    pub seed: u64,
}

impl AcceptParams {
    /// Greedy acceptance: the longest path of argmax matches, then the argmax.
    pub fn greedy() -> Self {
        Self {
            top_k: 1,
            temperature: 0.0,
            top_p: 1.0,
            seed: 0,
        }
    }

    /// The rule matching plain sampling with `p` (greedy when `p` is).
    pub fn from_sampling(p: &SamplingParams, seed: u64) -> Self {
        Self {
            top_k: if p.greedy() { 1 } else { p.top_k },
            temperature: p.temperature,
            top_p: p.top_p,
            seed,
        }
    }
}

/// Output words per trial of [`crate::ops::SpeculationOps::spec_accept`] for trees whose
/// longest path has `depth` nodes.
pub fn accept_stride(depth: usize) -> usize {
    2 + 2 * depth
}

/// PCG hash (O'Neill), as in `speculative.wgsl`.
pub fn pcg(v: u32) -> u32 {
    let state = v.wrapping_mul(747796405).wrapping_add(2891336453);
    let word = ((state >> ((state >> 28) + 4)) ^ state).wrapping_mul(277803737);
    (word >> 22) ^ word
}

/// Draw `draw` of trial `trial`: uniform in [0, 1) with 24 bits, as in
/// `speculative.wgsl`.
pub fn uniform01(seed: u64, trial: u32, draw: u32) -> f32 {
    // Nested hashes: nearby seeds and trials give unrelated streams.
    let h = pcg(pcg(pcg(pcg(seed as u32) ^ (seed >> 32) as u32) ^ trial) ^ draw);
    (h >> 8) as f32 / 16777216.0
}

/// The target distribution over `candidates` (descending logits): softmax at
/// `temperature` over all of them, then the nucleus, the shortest prefix whose
/// mass reaches `top_p`. Returns that prefix's probabilities (not renormalised;
/// callers draw against their sum).
///
/// ```
/// let p = kvsieve::sampling::target_distribution(&[(7, 2.0), (3, 1.0), (9, -5.0)], 1.0, 0.7);
/// assert_eq!(p.len(), 1);
/// assert!((p[0] - 0.7308).abs() < 1e-3);
/// ```
pub fn target_distribution(candidates: &[(u32, f32)], temperature: f32, top_p: f32) -> Vec<f32> {
    let t = temperature.max(1e-6);
    let top = candidates.first().map_or(0.0, |c| c.1);
    let mut probs: Vec<f32> = candidates.iter().map(|c| ((c.1 - top) / t).exp()).collect();
    let z: f32 = probs.iter().sum();
    let mut keep = probs.len();
    let mut acc = 0.0f32;
    for (r, p) in probs.iter_mut().enumerate() {
        *p /= z;
        acc += *p;
        if acc >= top_p {
            keep = r + 1;
            break;
        }
    }
    probs.truncate(keep);
    probs
}
