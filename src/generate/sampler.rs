//! The host side of sampling: the executor penalises and
//! selects the top candidates on the device; only those come back here.

use crate::error::{Error, Result};
pub use crate::sampling::SamplingParams;
use crate::sampling::{pick, Draw};
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
    /// [`crate::sampling::target_distribution`] with this sampler's next draw.
    pub fn pick(&mut self, candidates: &[(u32, f32)]) -> Result<u32> {
        let u = self.rng.gen::<f32>();
        pick(candidates, self.params.temperature, self.params.top_p, u)
            .ok_or_else(|| Error::Internal("no candidates to sample from".into()))
    }

    /// The next token's draw for the device to pick with
    /// ([`crate::ops::TensorOps::sample`]); it takes the same place in this
    /// sampler's stream as [`Sampler::pick`].
    pub fn draw(&mut self) -> Draw {
        Draw {
            top_k: self.params.top_k,
            temperature: self.params.temperature,
            top_p: self.params.top_p,
            u: self.rng.gen::<f32>(),
        }
    }
}
