//! Sampling parameters and the host side of sampling: the executor penalises and
//! selects the top candidates on the device; only those come back here.

use crate::error::{Error, Result};
use rand::{rngs::StdRng, Rng, SeedableRng};

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

/// Seeded sampler state.
pub struct Sampler {
    /// Parameters.
    pub params: SamplingParams,
    rng: StdRng,
}

impl Sampler {
    /// A sampler seeded with `params.seed`.
    pub fn new(params: SamplingParams) -> Result<Self> {
        params.validate()?;
        let rng = StdRng::seed_from_u64(params.seed);
        Ok(Self { params, rng })
    }

    /// A fresh seed from this sampler's stream (for device-side draws, such as
    /// speculative acceptance).
    pub fn seed(&mut self) -> u64 {
        self.rng.gen()
    }

    /// Picks a token from the top candidates (descending logits).
    pub fn pick(&mut self, candidates: &[(u32, f32)]) -> Result<u32> {
        let Some(&(first, top)) = candidates.first() else {
            return Err(Error::Gpu("no candidates to sample from".into()));
        };
        let t = self.params.temperature.max(1e-6);
        let mut probs: Vec<f32> = candidates
            .iter()
            .map(|&(_, l)| ((l - top) / t).exp())
            .collect();
        let z: f32 = probs.iter().sum();
        probs.iter_mut().for_each(|p| *p /= z);
        // Nucleus: keep the smallest prefix whose mass reaches top_p.
        let mut keep = probs.len();
        let mut acc = 0.0;
        for (i, p) in probs.iter().enumerate() {
            acc += p;
            if acc >= self.params.top_p {
                keep = i + 1;
                break;
            }
        }
        let mass: f32 = probs[..keep].iter().sum();
        let mut u = self.rng.gen::<f32>() * mass;
        for (i, p) in probs[..keep].iter().enumerate() {
            if u < *p {
                return Ok(candidates[i].0);
            }
            u -= p;
        }
        Ok(candidates.get(keep - 1).map(|c| c.0).unwrap_or(first))
    }
}
