//! Long-context quality of the sparse policies on the reference executor (which
//! takes the same decisions as the GPU; see model_default.rs): teacher-forced
//! next-token agreement with dense attention over a few thousand tokens of
//! natural text (the project's design documents), TokenSelect, Quest and Tidal
//! at the same budget of about 2K tokens.

use kvsieve::attention::{AttentionPolicy, QuestConfig, TidalConfig, TokenSelectConfig};
use kvsieve::generate::{Backend, Engine, Options};
use kvsieve::reference::argmax_row;

fn text() -> String {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
    ["design.md", "algorithms.md"]
        .iter()
        .map(|f| std::fs::read_to_string(dir.join(f)).unwrap())
        .collect::<Vec<_>>()
        .join("\n\n")
}

/// Argmax after each position in `from..ids.len()`, decoding one token at a time.
fn argmaxes(policy: AttentionPolicy, ids: &[u32], from: usize) -> (Vec<u32>, Option<f64>) {
    let dir = kvsieve::convert::default_model_dir().unwrap();
    let opts = Options {
        backend: Backend::Reference,
        max_context: ids.len() + 8,
        policy,
        ..Options::default()
    };
    let mut e = Engine::load(&dir, opts).unwrap();
    let mut out = Vec::new();
    for end in from..=ids.len() {
        e.prefill(&ids[..end]).unwrap(); // reuses the cache: one new token per step
        out.push(argmax_row(&e.logits().unwrap()));
    }
    (out, e.selection_stats().hit_rate())
}

#[test]
fn sparse_policies_agree_with_dense_on_natural_text() {
    let dir = kvsieve::convert::default_model_dir().unwrap();
    let tok = kvsieve::generate::Tokenizer::load(&dir).unwrap();
    let mut ids = tok.encode(&text()).unwrap();
    let len = std::env::var("TS_LEN")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(4000usize);
    ids.truncate(len);
    assert_eq!(ids.len(), len, "fixture text too short");
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
    let (dense, _) = argmaxes(AttentionPolicy::Dense, &ids, from);
    let (sparse, hit_rate) = argmaxes(ts, &ids, from);
    let same = dense.iter().zip(&sparse).filter(|(a, b)| a == b).count();
    let rate = same as f64 / dense.len() as f64;
    eprintln!(
        "TokenSelect {ts:?} vs dense: next-token argmax agrees at {same}/{} positions ({:.1}%), selection-cache hit rate {:.1}%",
        dense.len(),
        100.0 * rate,
        100.0 * hit_rate.unwrap_or(0.0)
    );
    // Quest at the paper's budget of 2048 tokens (blocks of 16, layers 0 and 1 dense).
    let quest = AttentionPolicy::BlockSparse(QuestConfig::default());
    let (blocks, _) = argmaxes(quest, &ids, from);
    let q_same = dense.iter().zip(&blocks).filter(|(a, b)| a == b).count();
    let q_rate = q_same as f64 / dense.len() as f64;
    eprintln!(
        "Quest {quest:?} vs dense: next-token argmax agrees at {q_same}/{} positions ({:.1}%)",
        dense.len(),
        100.0 * q_rate
    );
    let tidal = AttentionPolicy::Tidal(TidalConfig::default());
    let (chosen, _) = argmaxes(tidal, &ids, from);
    let t_same = dense.iter().zip(&chosen).filter(|(a, b)| a == b).count();
    let t_rate = t_same as f64 / dense.len() as f64;
    eprintln!(
        "Tidal {tidal:?} vs dense: next-token argmax agrees at {t_same}/{} positions ({:.1}%)",
        dense.len(),
        100.0 * t_rate
    );
    assert!(rate >= 0.95, "TokenSelect agreement {rate:.3} below 95%");
    // Measured at this budget (2048 of 3800..4000 tokens): Quest 92.5 %, Tidal
    // 86.6 %; with budgets of 500 of 600 tokens both reproduce dense greedy output,
    // so the gap is the policies' own (block bounds are loose; Tidal reuses one
    // layer's choice for many), not their plumbing.
    assert!(q_rate >= 0.90, "Quest agreement {q_rate:.3} below 90%");
    assert!(t_rate >= 0.85, "Tidal agreement {t_rate:.3} below 85%");
}
