//! How many nodes a draft tree gets: the tau measured per drafter and size,
//! the choice from an adapter's verify-cost curve, and the acceptance a
//! model's texts have shown.

use super::{Speculate, MAX_NODES};
use crate::error::{Error, Result};

/// How many nodes a draft tree holds.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum TreeSize {
    /// Chosen per adapter from the measured cost of verifying N rows
    /// ([`choose_tree_size`]); speculation is skipped when no size pays.
    #[default]
    Auto,
    /// This many nodes, root included (1..=128).
    Fixed(usize),
}

impl std::str::FromStr for TreeSize {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        if s == "auto" {
            return Ok(Self::Auto);
        }
        match s.parse::<usize>() {
            Ok(n) if (1..=MAX_NODES).contains(&n) => Ok(Self::Fixed(n)),
            _ => Err(Error::InvalidOption(format!(
                "tree size {s:?}: expected auto or 1..={MAX_NODES}"
            ))),
        }
    }
}

/// Tree sizes the auto choice probes, smallest first.
pub const PROBE_SIZES: [usize; 8] = [1, 2, 4, 8, 16, 32, 64, 81];

/// Tau (tokens per verify forward, bonus included) by tree size for each
/// drafter, greedy, measured with `examples/specbench` on the reference executor
/// over specbench-mini (64 new tokens per prompt), each size on its own engine
/// from an empty Token Recycling matrix that learns over the 12 prompts. Tau
/// depends on the model and the text, not on the adapter, so one table serves
/// every adapter.
const TAU_BOTH: [(usize, f64); 7] = [
    (1, 1.0),
    (2, 1.18),
    (4, 1.31),
    (8, 1.43),
    (16, 1.64),
    (32, 1.84),
    (81, 2.12),
];
const TAU_RECYCLING: [(usize, f64); 7] = [
    (1, 1.0),
    (2, 1.14),
    (4, 1.26),
    (8, 1.39),
    (16, 1.57),
    (32, 1.73),
    (81, 1.98),
];
// Chains stop at 10 drafts, so larger trees add nothing.
const TAU_LOOKUP: [(usize, f64); 3] = [(1, 1.0), (4, 1.26), (11, 1.30)];

/// Expected tau of `spec` with trees of `size` nodes (linear between the
/// measured sizes, flat beyond the last).
pub fn expected_tau(spec: Speculate, size: usize) -> f64 {
    let table: &[(usize, f64)] = match spec {
        Speculate::Off => return 1.0,
        Speculate::Lookup => &TAU_LOOKUP,
        Speculate::Recycling => &TAU_RECYCLING,
        Speculate::Both => &TAU_BOTH,
    };
    let mut prev = table[0];
    for &(n, t) in table {
        if size <= n {
            if n == prev.0 {
                return t;
            }
            let f = (size - prev.0) as f64 / (n - prev.0) as f64;
            return prev.1 + f * (t - prev.1);
        }
        prev = (n, t);
    }
    prev.1
}

/// The tree size with the most expected tokens per second, from measured verify
/// costs `(size, seconds)` whose first entry is size 1 (a plain step through the
/// verify path). `None` when no size beats plain decoding by 5%: speculation
/// would not pay on this adapter.
///
/// `accept` scales the tables' accepted drafts (tau - 1) to what this model
/// and its texts have shown (see [`Acceptance`]); 1.0 takes the tables as
/// they are.
pub fn choose_tree_size(spec: Speculate, costs: &[(usize, f64)], accept: f64) -> Option<usize> {
    let &(one, base) = costs.first()?;
    if one != 1 || !(base > 0.0) {
        return None;
    }
    costs
        .iter()
        .filter(|c| c.0 > 1)
        .map(|&(n, t)| (n, (1.0 + (expected_tau(spec, n) - 1.0) * accept) * base / t))
        .filter(|&(_, gain)| gain > 1.05)
        // The smallest of equal gains: same speed for less work.
        .fold(None, |best: Option<(usize, f64)>, c| match best {
            Some(b) if b.1 >= c.1 => Some(b),
            _ => Some(c),
        })
        .map(|(n, _)| n)
}

/// Drafts accepted so far against what the tau tables expected for the same
/// verify steps, per drafter: the tables were measured on one model and one
/// prompt set, and a request's text can accept far fewer (or more) drafts.
/// [`Acceptance::scale`] is what [`choose_tree_size`] takes.
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Acceptance {
    /// Per drafter (lookup, recycling, both): verify steps, drafts accepted
    /// (tokens beyond one per step), drafts the tables expected.
    pub seen: std::collections::BTreeMap<String, (u64, u64, f64)>,
}

/// Verify steps a drafter needs before its measured acceptance replaces the tables'.
const MIN_STEPS: u64 = 32;

impl Acceptance {
    /// Records `steps` verify steps of `spec` with trees of `size` nodes that
    /// produced `tokens` tokens (bonus included).
    pub fn record(&mut self, spec: Speculate, size: usize, steps: u64, tokens: u64) {
        if steps == 0 || spec == Speculate::Off {
            return;
        }
        let e = self.seen.entry(spec.name().to_string()).or_default();
        e.0 += steps;
        e.1 += tokens.saturating_sub(steps);
        e.2 += steps as f64 * (expected_tau(spec, size) - 1.0);
    }

    /// Accepted over expected drafts for `spec` (1.0 until it has run
    /// `MIN_STEPS` verify steps), clamped to 0..=2.
    pub fn scale(&self, spec: Speculate) -> f64 {
        match self.seen.get(spec.name()) {
            Some(&(steps, got, want)) if steps >= MIN_STEPS && want > 0.0 => {
                (got as f64 / want).clamp(0.0, 2.0)
            }
            _ => 1.0,
        }
    }
}

/// Largest tau in the tables: a size whose verify costs more than this many
/// plain steps cannot pay, so probing stops there.
pub fn max_expected_tau() -> f64 {
    TAU_BOTH
        .iter()
        .chain(&TAU_RECYCLING)
        .chain(&TAU_LOOKUP)
        .map(|t| t.1)
        .fold(1.0, f64::max)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auto_tree_size_follows_the_cost_curve() {
        assert_eq!("auto".parse::<TreeSize>().unwrap(), TreeSize::Auto);
        assert_eq!("16".parse::<TreeSize>().unwrap(), TreeSize::Fixed(16));
        assert!("0".parse::<TreeSize>().is_err() && "129".parse::<TreeSize>().is_err());
        assert_eq!(expected_tau(Speculate::Both, 1), 1.0);
        let mid = expected_tau(Speculate::Both, 12);
        assert!(mid > expected_tau(Speculate::Both, 8) && mid < expected_tau(Speculate::Both, 16));
        // Flat cost (a big GPU): the largest tree wins.
        let flat: Vec<(usize, f64)> = PROBE_SIZES.iter().map(|&n| (n, 1.0)).collect();
        assert_eq!(choose_tree_size(Speculate::Both, &flat, 1.0), Some(81));
        // Cost linear in rows (compute-bound): nothing pays, speculation is off.
        let linear: Vec<(usize, f64)> = PROBE_SIZES.iter().map(|&n| (n, n as f64)).collect();
        assert_eq!(choose_tree_size(Speculate::Both, &linear, 1.0), None);
        // Lookup chains stop at 11 nodes: larger trees buy nothing.
        assert_eq!(
            choose_tree_size(Speculate::Lookup, &flat[..6], 1.0),
            Some(16)
        );
        assert_eq!(choose_tree_size(Speculate::Both, &[], 1.0), None);
        // A text that accepts few drafts: with a flat cost curve the largest
        // tree still pays; with the reference's curve (verify 4 rows = 1.19
        // steps) tau 1.1 at 8 nodes (a scale of about 0.23) leaves no size.
        let mut a = Acceptance::default();
        a.record(Speculate::Both, 8, 16, 17);
        assert_eq!(a.scale(Speculate::Both), 1.0, "too few steps to judge");
        a.record(Speculate::Both, 8, 24, 27);
        let scale = a.scale(Speculate::Both);
        assert!((scale - 4.0 / (40.0 * 0.43)).abs() < 1e-9, "{scale}");
        assert_eq!(a.scale(Speculate::Lookup), 1.0);
        assert_eq!(choose_tree_size(Speculate::Both, &flat, scale), Some(81));
        let reference = [
            (1, 1.0),
            (2, 1.14),
            (4, 1.19),
            (8, 1.53),
            (16, 2.31),
            (32, 6.12),
        ];
        assert_eq!(choose_tree_size(Speculate::Both, &reference, 1.0), Some(4));
        assert_eq!(choose_tree_size(Speculate::Both, &reference, scale), None);
    }
}
