//! Long-context quality of the sparse policies on the reference executor (which
//! takes the same decisions as the GPU; see model_default.rs): teacher-forced
//! next-token agreement with dense attention over a few thousand tokens of
//! natural text (the project's design documents), TokenSelect, Quest and Tidal
//! at the same budget of about 2K tokens.

use kvsieve::attention::{AttentionPolicy, QuestConfig, TidalConfig, TokenSelectConfig};
use kvsieve::eval::{agreement, selection_recall, teacher_forced_argmaxes};
use kvsieve::generate::{Backend, Engine, Options};

fn text() -> String {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
    ["design.md", "algorithms.md"]
        .iter()
        .map(|f| std::fs::read_to_string(dir.join(f)).unwrap())
        .collect::<Vec<_>>()
        .join("\n\n")
}

fn engine(policy: AttentionPolicy, len: usize) -> Engine {
    let dir = kvsieve::convert::default_model_dir().unwrap();
    let opts = Options {
        backend: Backend::Reference,
        max_context: len + 8,
        policy,
        ..Options::default()
    };
    Engine::load(&dir, opts).unwrap()
}

/// Argmax after each position in `from..ids.len()`, decoding one token at a time.
fn argmaxes(policy: AttentionPolicy, ids: &[u32], from: usize) -> (Vec<u32>, Option<f64>) {
    let mut e = engine(policy, ids.len());
    let out = teacher_forced_argmaxes(&mut e, ids, from).unwrap();
    (out, e.selection_stats().hit_rate())
}

fn ids(len: usize) -> Vec<u32> {
    let dir = kvsieve::convert::default_model_dir().unwrap();
    let tok = kvsieve::generate::Tokenizer::load(&dir).unwrap();
    let mut ids = tok.encode(&text()).unwrap();
    ids.truncate(len);
    assert_eq!(ids.len(), len, "fixture text too short");
    ids
}

/// Hierarchical TokenSelect recovers most of exact TokenSelect's selection (a
/// diagnostic: answers are what counts, see the agreement test below): k =
/// 512 (sinks 128, window 512) over ~3,200 candidates (199 blocks), the
/// prefilter keeping 96 blocks of 16 (1,536 tokens, 3k; with 128 it would
/// keep more than half the blocks, where the selection is exact). No
/// Selection Cache, so every layer selects at every one of 24 positions.
/// Measured: 69.2 % (81.7 % with 128 blocks before the block stage was kept
/// to contexts where it halves the candidates). The exact selection is spread
/// thin: the 128 blocks holding most of its tokens hold 90.8 % of them (64
/// blocks: 63.7 %).
#[test]
fn hierarchical_tokenselect_recovers_the_exact_selection() {
    let ids = ids(3824);
    let cfg = TokenSelectConfig {
        k: 512,
        cache_threshold: 2.0,
        positions: kvsieve::attention::Positions::Original,
        ..Default::default()
    };
    let mut exact = engine(AttentionPolicy::TokenSelect(cfg), ids.len());
    let env = |k: &str, d: usize| {
        std::env::var(k)
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(d)
    };
    let hier = TokenSelectConfig {
        prefilter_blocks: env("TS_PF_BLOCKS", 96),
        prefilter_block: env("TS_PF_BLOCK", 16),
        ..cfg
    };
    let mut approx = engine(AttentionPolicy::TokenSelect(hier), ids.len());
    let recall = selection_recall(&mut exact, &mut approx, &ids, 3800).unwrap();
    eprintln!(
        "hierarchical TokenSelect ({} blocks of {}) recalls {:.1}% of exact TokenSelect's selection (k 512)",
        hier.prefilter_blocks,
        hier.prefilter_block,
        100.0 * recall
    );
    assert!(recall >= 0.65, "recall {recall:.3} below 65%");
}

#[test]
fn sparse_policies_agree_with_dense_on_natural_text() {
    let len = std::env::var("TS_LEN")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(4000usize);
    let ids = ids(len);
    // The paper's budget (2048 + 128 + 512 = 2688 of 3800..4000 tokens) with the
    // Selection Cache on; original positions, since the prompt was prefilled densely
    // at true positions. TS_* environment variables override the settings for
    // exploration (measured, 200 positions from 3800: compact positions 91.5 %,
    // original 99.0 %; k = 512 with 64 sinks and a 256 window: 87 %).
    let env = |k: &str, d: f64| {
        std::env::var(k)
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(d)
    };
    let ts = AttentionPolicy::TokenSelect(TokenSelectConfig {
        k: env("TS_K", 2048.0) as usize,
        n_init: env("TS_INIT", 128.0) as usize,
        n_local: env("TS_LOCAL", 512.0) as usize,
        cache_threshold: env("TS_THR", 0.9) as f32,
        positions: if env("TS_COMPACT", 0.0) > 0.0 {
            kvsieve::attention::Positions::Compact
        } else {
            kvsieve::attention::Positions::Original
        },
        ..Default::default()
    });
    let from = env("TS_FROM", 3800.0) as usize;
    // Quest and Tidal prefill densely: they decode over this engine's dense
    // prefill (`Engine::switch_policy`; the first position re-runs the
    // prompt's last token under the policy).
    let mut shared = engine(AttentionPolicy::Dense, ids.len());
    let dense = teacher_forced_argmaxes(&mut shared, &ids, from).unwrap();
    let (sparse, hit_rate) = argmaxes(ts, &ids, from);
    // Hierarchical against exact at k 512: 64 blocks of 16 (1,024 tokens) of
    // the ~200 candidate blocks (at k 2048 the block stage would keep more
    // than half of them, so the selection would be exact).
    let at_k = |blocks| match ts {
        AttentionPolicy::TokenSelect(c) => AttentionPolicy::TokenSelect(TokenSelectConfig {
            k: 512,
            prefilter_blocks: blocks,
            ..c
        }),
        p => p,
    };
    let (exact_512, _) = argmaxes(at_k(0), &ids, from);
    let (prefiltered, _) = argmaxes(at_k(64), &ids, from);
    let (e_rate, h_rate) = (
        agreement(&dense, &exact_512),
        agreement(&dense, &prefiltered),
    );
    eprintln!(
        "k 512 vs dense: exact TokenSelect agrees at {:.1}%, hierarchical (64 blocks) at {:.1}%",
        100.0 * e_rate,
        100.0 * h_rate
    );
    let same = dense.iter().zip(&sparse).filter(|(a, b)| a == b).count();
    let rate = same as f64 / dense.len() as f64;
    eprintln!(
        "TokenSelect {ts:?} vs dense: next-token argmax agrees at {same}/{} positions ({:.1}%), selection-cache hit rate {:.1}%",
        dense.len(),
        100.0 * rate,
        100.0 * hit_rate.unwrap_or(0.0)
    );
    // Quest at the paper's budget of 2048 tokens (blocks of 16, layers 0 and 1 dense).
    let quest = AttentionPolicy::Quest(QuestConfig::default());
    shared.switch_policy(quest).unwrap();
    let blocks = teacher_forced_argmaxes(&mut shared, &ids, from).unwrap();
    let q_same = dense.iter().zip(&blocks).filter(|(a, b)| a == b).count();
    let q_rate = q_same as f64 / dense.len() as f64;
    eprintln!(
        "Quest {quest:?} vs dense: next-token argmax agrees at {q_same}/{} positions ({:.1}%)",
        dense.len(),
        100.0 * q_rate
    );
    let tidal = AttentionPolicy::Tidal(TidalConfig::default());
    shared.switch_policy(tidal).unwrap();
    let chosen = teacher_forced_argmaxes(&mut shared, &ids, from).unwrap();
    let t_same = dense.iter().zip(&chosen).filter(|(a, b)| a == b).count();
    let t_rate = t_same as f64 / dense.len() as f64;
    eprintln!(
        "Tidal {tidal:?} vs dense: next-token argmax agrees at {t_same}/{} positions ({:.1}%)",
        dense.len(),
        100.0 * t_rate
    );
    assert!(rate >= 0.95, "TokenSelect agreement {rate:.3} below 95%");
    // Measured: exact 92.5 %, hierarchical 78.1 %. Where the block stage
    // prunes this hard it costs answers (issue 17's 2 points are not met in
    // this regime; at k 2048 with 256 blocks, 4K and 8K contexts select
    // exactly); the floor catches a block stage that picks blocks badly.
    assert!(
        h_rate >= e_rate - 0.2,
        "hierarchical TokenSelect agreement {h_rate:.3} more than 20 points below exact's {e_rate:.3} (k 512)"
    );
    // Measured at this budget (2048 of 3800..4000 tokens): Quest 92.5 %, Tidal
    // 86.6 %; with budgets of 500 of 600 tokens both reproduce dense greedy output,
    // so the gap is the policies' own (block bounds are loose; Tidal reuses one
    // layer's choice for many), not their plumbing.
    assert!(q_rate >= 0.90, "Quest agreement {q_rate:.3} below 90%");
    assert!(t_rate >= 0.85, "Tidal agreement {t_rate:.3} below 85%");
}
