//! The host side of sampling: the executor penalises and
//! selects the top candidates on the device; only those come back here.

use crate::error::{Error, Result};
use crate::sampling::target_distribution;
pub use crate::sampling::SamplingParams;
use rand::{rngs::StdRng, Rng, SeedableRng};

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

    /// Picks a token from the top candidates (descending logits) by
    /// [`target_distribution`].
    pub fn pick(&mut self, candidates: &[(u32, f32)]) -> Result<u32> {
        let Some(&(first, _)) = candidates.first() else {
            return Err(Error::Internal("no candidates to sample from".into()));
        };
        let probs = target_distribution(candidates, self.params.temperature, self.params.top_p);
        let keep = probs.len();
        let mass: f32 = probs.iter().sum();
        let mut u = self.rng.gen::<f32>() * mass;
        for (i, p) in probs.iter().enumerate() {
            if u < *p {
                return Ok(candidates[i].0);
            }
            u -= p;
        }
        Ok(candidates.get(keep - 1).map(|c| c.0).unwrap_or(first))
    }
}
