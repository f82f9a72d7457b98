//! The host side of sampling: the seeded stream of draws. The executor
//! penalises, selects the top candidates and picks among them with the
//! draw on the device; only the token comes back.

use crate::error::Result;
use crate::sampling::Draw;
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

    /// The next token's draw: one uniform from this sampler's stream, which
    /// the executor's pick ([`crate::ops::TensorOps::sample`],
    /// [`crate::sampling::pick`]) turns into a token from the top candidates.
    /// `None` for greedy sampling, which draws nothing (the argmax).
    pub fn draw(&mut self) -> Option<Draw> {
        (!self.params.greedy()).then(|| Draw {
            top_k: self.params.top_k,
            temperature: self.params.temperature,
            top_p: self.params.top_p,
            u: self.rng.gen::<f32>(),
        })
    }
}
