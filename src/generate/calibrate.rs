//! Tidal's re-selection layer by measurement (TidalDecode chose its layers by
//! which layer's selection holds what the later layers need; here, what a
//! retrieval needs): a built-in text with a planted needle, at three depths,
//! decoded one step under Tidal's calibration state, in which every layer from
//! the selection layer on makes its own top-budget choice per KV head. The
//! re-selection layer is the first layer after the selection layer whose
//! choice holds the needle for (nearly) every KV head at every depth, the
//! point from which the model's retrieval heads have found it. The choice is
//! kept per model with the engine's state files ([`Options::state_dir`](super::Options::state_dir)).

use super::Engine;
use crate::attention::TidalConfig;
use crate::error::{Error, Result};

const FILLER: &str = " The river runs down to the sea. Birds fly over the hills. \
The old mill turns slowly. Bread is baked in the morning.";
const QUESTION: &str = " What is the secret code? The secret code is";
const DEPTHS: [f64; 3] = [0.2, 0.5, 0.8];

/// Calibration text length in tokens (less when the context is smaller), and
/// the budget share it is probed at (a 2,048-token budget at 8K tokens keeps
/// a quarter).
const TOKENS: usize = 2048;
const SHARE: usize = 4;

/// A layer holds the needle when its choices keep at least this share of the
/// needle's tokens, over every KV head and depth.
const HOLD: f64 = 0.9;

/// What calibration found.
#[derive(Clone, Debug, PartialEq)]
pub struct TidalCalibration {
    /// The chosen layers and budget.
    pub config: TidalConfig,
    /// Per layer, the share of the needle's tokens its choices kept (mean over
    /// KV heads and depths; `None` for the dense layers before the selection layer).
    pub held: Vec<Option<f64>>,
    /// Whether the result came from the cache.
    pub cached: bool,
}

/// The needle prompt and the needle's token range.
fn needle_prompt(
    e: &Engine,
    tokens: usize,
    depth: f64,
    key: u32,
) -> Result<(Vec<u32>, std::ops::Range<usize>)> {
    let tok = &e.tokenizer;
    let needle = format!(" The secret code is {key}. Remember the code {key}.");
    let per = tok.encode(&FILLER.repeat(4))?.len() as f64 / 4.0;
    let fixed = tok.encode(&format!("{needle}{QUESTION}"))?.len();
    let reps = ((tokens.saturating_sub(fixed + 2)) as f64 / per).floor() as usize;
    let before = (reps as f64 * depth).round() as usize;
    let head = FILLER.repeat(before);
    let start = tok.encode(&head)?.len();
    let end = tok.encode(&format!("{head}{needle}"))?.len();
    let text = format!("{head}{needle}{}{QUESTION}", FILLER.repeat(reps - before));
    Ok((tok.encode(&text)?, start..end))
}

impl Engine {
    /// Tidal's layers for this model with `budget` tokens per KV head: the
    /// selection layer `selection_layer` and a re-selection layer found by
    /// measurement (see the module docs), cached per model. Runs on this
    /// engine (several seconds on a GPU, longer on the reference); the cached
    /// conversation is dropped and the policy left as it was.
    ///
    /// ```no_run
    /// use kvsieve::attention::AttentionPolicy;
    /// use kvsieve::generate::{Engine, Options};
    /// let mut e = Engine::load_default(Options::default())?;
    /// let cal = e.calibrate_tidal(2, 2048)?;
    /// e.set_policy(AttentionPolicy::Tidal(cal.config))?;
    /// # Ok::<(), kvsieve::Error>(())
    /// ```
    pub fn calibrate_tidal(
        &mut self,
        selection_layer: usize,
        budget: usize,
    ) -> Result<TidalCalibration> {
        let layers = self.config.layers;
        if selection_layer + 2 > layers {
            return Err(Error::InvalidOption(format!(
                "Tidal's selection layer {selection_layer} leaves no layer to re-select in a {layers}-layer model"
            )));
        }
        let file = format!("tidal-s{selection_layer}.json");
        let saved = self.state.as_ref().and_then(|s| s.read(&file, 1 << 16));
        if let Some(held) = saved.and_then(|b| read_cache(&b, layers)) {
            return Ok(choose(selection_layer, budget, held, true));
        }
        let policy = self.runner.policy();
        let held = self.measure(selection_layer);
        // Leave the policy as it was, whatever the measurement did.
        self.runner.set_policy(policy)?;
        let held = held?;
        if let Some(s) = &self.state {
            s.write(&file, &write_cache(&held));
        }
        Ok(choose(selection_layer, budget, held, false))
    }

    fn measure(&mut self, selection_layer: usize) -> Result<Vec<Option<f64>>> {
        let tokens = TOKENS.min(self.max_context().saturating_sub(1));
        if tokens < 256 {
            return Err(Error::Capacity(format!(
                "Tidal calibration needs a context of at least 257 tokens, this engine holds {}",
                self.max_context()
            )));
        }
        let probe = TidalConfig {
            selection_layer,
            reselection_layer: selection_layer + 1,
            budget: tokens / SHARE,
        };
        let layers = self.config.layers;
        let kv_heads = self.config.kv_heads;
        let mut sums = vec![0.0f64; layers];
        for (i, &depth) in DEPTHS.iter().enumerate() {
            let (ids, needle) = needle_prompt(self, tokens, depth, 40213 + 7919 * i as u32)?;
            // A fresh probe each time: the prefix is dense work, the last
            // token one decode step in which every layer chooses.
            self.runner.probe_tidal(probe)?;
            self.prefill(&ids[..ids.len() - 1])?;
            self.prefill(&ids)?;
            for (layer, sum) in sums.iter_mut().enumerate().skip(selection_layer) {
                let Some(sel) = self.runner.selected(layer)? else {
                    continue;
                };
                for head in sel.chunks(probe.budget).take(kv_heads) {
                    let kept = head
                        .iter()
                        .filter(|&&t| needle.contains(&(t as usize)))
                        .count();
                    *sum += kept as f64 / needle.len().max(1) as f64;
                }
            }
        }
        let n = (DEPTHS.len() * kv_heads) as f64;
        Ok((0..layers)
            .map(|l| (l >= selection_layer).then(|| sums[l] / n))
            .collect())
    }
}

/// The first layer after the selection layer that holds the needle (the
/// best-holding one when none does).
fn choose(
    selection_layer: usize,
    budget: usize,
    held: Vec<Option<f64>>,
    cached: bool,
) -> TidalCalibration {
    let after = || held.iter().enumerate().skip(selection_layer + 1);
    let best = after().filter_map(|(l, h)| h.map(|h| (l, h))).fold(
        (selection_layer + 1, -1.0),
        |b, (l, h)| if h > b.1 { (l, h) } else { b },
    );
    let reselection_layer = after()
        .find(|(_, h)| h.is_some_and(|h| h >= HOLD))
        .map_or(best.0, |(l, _)| l);
    TidalCalibration {
        config: TidalConfig {
            selection_layer,
            reselection_layer,
            budget,
        },
        held,
        cached,
    }
}

fn read_cache(bytes: &[u8], layers: usize) -> Option<Vec<Option<f64>>> {
    let v: serde_json::Value = serde_json::from_slice(bytes).ok()?;
    if v.get("version")?.as_u64()? != CACHE_VERSION {
        return None;
    }
    let held: Vec<Option<f64>> = v
        .get("held")?
        .as_array()?
        .iter()
        .map(|h| h.as_f64().filter(|h| (0.0..=1.0).contains(h)))
        .collect();
    (held.len() == layers).then_some(held)
}

/// Bumped when the measurement changes, so old results are measured again.
const CACHE_VERSION: u64 = 1;

fn write_cache(held: &[Option<f64>]) -> Vec<u8> {
    let v = serde_json::json!({ "version": CACHE_VERSION, "held": held });
    v.to_string().into_bytes()
}
