//! Passkey retrieval (docs/ALGORITHMS.md section 7) on the reference executor, which
//! takes the same decisions as the GPU one (see model_default.rs): within the
//! trained context (8K for the default model) TokenSelect finds every key dense
//! finds, and at 16K, twice the trained context, TokenSelect with compact
//! positions still finds it at several depths. Quest (budget 2048) finds
//! every key dense finds at 8K (at 4K half the prompt fits its budget; left
//! out to keep the test command short). Hierarchical TokenSelect (k 2048, 256
//! blocks of 16) prunes to 256 of ~980 blocks at 16K and, decoding over
//! TokenSelect's prefill of each prompt, finds every key TokenSelect finds
//! (at 8K its block stage would keep more than half the ~470 candidate
//! blocks, so it selects exactly as TokenSelect does: not run again; its own
//! prefill's selections are checked against exact TokenSelect's at long
//! context in long_context.rs). Tidal (budget 2048, selection at layer 2)
//! takes its re-selection layer from `Engine::calibrate_tidal` (a needle
//! text of its own): in the default model the needle enters every KV head's
//! top 2048 only from about layer 14 on, and with the paper's layer 13 Tidal
//! missed the 8K keys at depths 0.6 and 0.3.
//!
//! Two prompts share their tokens up to the earlier of their two keys, so each
//! run takes its prompts by key position, latest first, and the engine
//! re-prefills only from the key on. Quest and Tidal prefill densely, so they
//! decode over dense's prefill of each prompt (`Engine::switch_policy`);
//! hierarchical TokenSelect decodes over TokenSelect's (its own prefill of
//! the three 16K prompts took about 300 of the test's 1,050 seconds).

use kvsieve::attention::{AttentionPolicy, QuestConfig, TokenSelectConfig};
use kvsieve::eval::{passkey_trial, Filler};
use kvsieve::generate::{Backend, Engine, Options};

const DEPTHS: [f64; 3] = [0.9, 0.6, 0.3];
/// The length within the trained context (8K). At 4K dense and TokenSelect
/// found all three keys; left out to keep the test command short (about 120 s).
const TRAINED: usize = 8000;
const EXTRAPOLATED: usize = 16384;

fn key(len: usize, depth: f64) -> u32 {
    10007 + (len as u32 * 7 + (depth * 100.0) as u32 * 131) % 89989
}

/// One policy of a [`run`]: its name, the policy, and the lengths it runs at.
type Arm<'a> = (&'a str, AttentionPolicy, &'a [usize]);

/// Runs every (length, depth) cell under each arm's policy; returns, per arm,
/// whether each key was found. The arms of one cell share its prompt's cache:
/// the first arm prefills it and the others switch policy over it and decode
/// (for Quest and Tidal over dense the same prefill as their own; for
/// hierarchical over TokenSelect a decoding-only check).
fn run(e: &mut Engine, arms: &[Arm<'_>]) -> Vec<Vec<(usize, f64, bool)>> {
    e.set_policy(arms[0].1).unwrap();
    let mut lens: Vec<usize> = arms.iter().flat_map(|a| a.2.iter().copied()).collect();
    lens.sort_unstable();
    lens.dedup();
    let mut cells: Vec<(usize, f64)> = lens
        .iter()
        .flat_map(|&l| DEPTHS.iter().map(move |&d| (l, d)))
        .collect();
    cells.sort_by(|a, b| (b.0 as f64 * b.1).total_cmp(&(a.0 as f64 * a.1)));
    let mut found = vec![Vec::new(); arms.len()];
    for (len, depth) in cells {
        let k = key(len, depth);
        for (&(name, policy, lens), out) in arms.iter().zip(found.iter_mut()) {
            if !lens.contains(&len) {
                continue;
            }
            e.switch_policy(policy).unwrap();
            let (ok, text) = passkey_trial(e, len, depth, k, &Filler::Repeat).unwrap();
            eprintln!(
                "passkey {name:>12} len {len:>5} depth {depth:.1}: {} ({text:?})",
                if ok { "found" } else { "MISSED" },
            );
            out.push((len, depth, ok));
        }
    }
    found
}

fn found(cells: &[(usize, f64, bool)], len: usize, depth: f64) -> bool {
    cells.iter().any(|&(l, d, ok)| l == len && d == depth && ok)
}

#[test]
fn passkey_retrieval_dense_and_sparse_policies() {
    let dir = kvsieve::convert::default_model_dir().unwrap();
    let opts = Options {
        backend: Backend::Reference,
        max_context: EXTRAPOLATED + 16,
        ..Options::default()
    };
    let mut e = Engine::load(&dir, opts).unwrap();
    // Tidal's re-selection layer by calibration (a needle text of its own),
    // measured once and then read from the cache.
    let cal = e.calibrate_tidal(2, 2048).unwrap();
    eprintln!("Tidal calibration: {:?}, held {:?}", cal.config, cal.held);
    let again = e.calibrate_tidal(2, 2048).unwrap();
    assert!(again.cached, "the second calibration was measured again");
    assert_eq!(again.config, cal.config);
    let layer = cal.config.reselection_layer;
    // Quest and Tidal prefill densely: they decode over dense's prefill.
    let quest = AttentionPolicy::Quest(QuestConfig::default());
    let tidal = AttentionPolicy::Tidal(cal.config);
    let shared = run(
        &mut e,
        &[
            ("dense", AttentionPolicy::Dense, &[TRAINED]),
            ("quest", quest, &[TRAINED]),
            ("tidal", tidal, &[TRAINED]),
        ],
    );
    let (dense, blocks, tidal) = (&shared[0], &shared[1], &shared[2]);
    let lens = [TRAINED, EXTRAPOLATED];
    let ts = AttentionPolicy::TokenSelect(TokenSelectConfig::default());
    // Hierarchical at 16K only: at 8K its block stage would keep more than
    // half the blocks, so it selects exactly as TokenSelect does; at 16K it
    // prunes to 256 of ~1,000.
    let hier = AttentionPolicy::TokenSelect(TokenSelectConfig {
        prefilter_blocks: 256,
        ..Default::default()
    });
    let selected = run(
        &mut e,
        &[
            ("tokenselect", ts, &lens),
            ("hierarchical", hier, &[EXTRAPOLATED]),
        ],
    );
    let (sparse, prefiltered) = (&selected[0], &selected[1]);
    eprintln!(
        "| length | depth | dense | TokenSelect (auto positions) | Quest | hierarchical TokenSelect (over TokenSelect's prefill) | Tidal (2, {layer}, calibrated) |\n|---|---|---|---|---|---|---|"
    );
    for &len in &lens {
        for depth in DEPTHS {
            let d = if len == EXTRAPOLATED {
                "not run"
            } else if found(dense, len, depth) {
                "found"
            } else {
                "missed"
            };
            let s = if found(sparse, len, depth) {
                "found"
            } else {
                "missed"
            };
            let cell =
                |cells: &[(usize, f64, bool)]| match (len == TRAINED, found(cells, len, depth)) {
                    (false, _) => "not run",
                    (true, true) => "found",
                    (true, false) => "missed",
                };
            let h = match (len != EXTRAPOLATED, found(prefiltered, len, depth)) {
                (true, _) => "not run",
                (false, true) => "found",
                (false, false) => "missed",
            };
            eprintln!(
                "| {len} | {depth} | {d} | {s} | {} | {h} | {} |",
                cell(blocks),
                cell(tidal)
            );
        }
    }
    let len = TRAINED;
    assert!(
        DEPTHS.iter().any(|&d| found(dense, len, d)),
        "len {len}: dense found no key; the task is broken"
    );
    for depth in DEPTHS {
        assert!(
            !found(dense, len, depth) || found(sparse, len, depth),
            "len {len} depth {depth}: dense found the key, TokenSelect did not"
        );
        assert!(
            !found(dense, len, depth) || found(blocks, len, depth),
            "len {len} depth {depth}: dense found the key, Quest did not"
        );
        assert!(
            !found(dense, len, depth) || found(tidal, len, depth),
            "len {len} depth {depth}: dense found the key, Tidal (calibrated layer {layer}) did not"
        );
    }
    let n = DEPTHS
        .iter()
        .filter(|&&d| found(sparse, EXTRAPOLATED, d))
        .count();
    assert!(
        n >= 2,
        "TokenSelect found the key at {n} of {} depths at 16K",
        DEPTHS.len()
    );
    for depth in DEPTHS {
        assert!(
            !found(sparse, EXTRAPOLATED, depth) || found(prefiltered, EXTRAPOLATED, depth),
            "16K depth {depth}: TokenSelect found the key, hierarchical TokenSelect did not"
        );
    }
}
