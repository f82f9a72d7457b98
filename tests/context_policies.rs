//! Long contexts and the attention policies on small synthetic models: a
//! context that grows on demand, TokenSelect's automatic positions, Tidal's
//! calibration, and switching policies over a kept cache.

use kvsieve::generate::{Backend, Engine, GenerateParams, Options};
use kvsieve::Error;

#[path = "common/synthetic.rs"]
mod synthetic;
use synthetic::*;

/// With no max_context the KV cache starts at 2048 tokens and grows with
/// the sequence: a 5000-token prompt past the tiny model's 256 trained
/// positions runs under TokenSelect on both executors, which agree, and the
/// cache grew. Dense chats stay within the trained context unless a
/// capacity is chosen.
#[test]
fn the_context_grows_on_demand() {
    use kvsieve::attention::{AttentionPolicy, TokenSelectConfig};
    let d = write_model("grow", "LlamaForCausalLM", |_| {});
    let ts = AttentionPolicy::TokenSelect(TokenSelectConfig {
        k: 64,
        n_init: 4,
        n_local: 32,
        subchunk: 64,
        ..Default::default()
    });
    let prompt: Vec<u32> = (0..5000).map(|i| 3 + (i * 17 + i / 7) % 250).collect();
    let mut logits = Vec::new();
    for backend in [Backend::Reference, Backend::Gpu] {
        let opts = Options {
            backend,
            policy: ts,
            prefill_chunk: 1024,
            ..Options::default()
        };
        let mut e = Engine::load(&d, opts).unwrap();
        assert!(e.max_context() > 5000, "{backend:?}: {}", e.max_context());
        assert_eq!(e.chat_context(), e.max_context());
        let before = e.kv_bytes();
        e.prefill(&prompt).unwrap();
        let after = e.kv_bytes();
        assert!(
            after >= before * 5000 / 2048,
            "{backend:?}: {before} -> {after} bytes"
        );
        eprintln!("{backend:?}: KV {before} -> {after} bytes for 5000 tokens");
        logits.push(e.logits().unwrap());
        let greedy = greedy(&mut e, &prompt, 4);
        assert_eq!(greedy.len(), 4);
        e.set_policy(AttentionPolicy::Dense).unwrap();
        assert_eq!(
            e.chat_context(),
            256,
            "dense chats keep to the trained context"
        );
    }
    common_close(&logits[1], &logits[0], 2e-2);
    let chosen = load(&d, Backend::Reference).unwrap();
    assert_eq!((chosen.max_context(), chosen.chat_context()), (128, 128));
}

fn common_close(got: &[f32], want: &[f32], atol: f32) {
    let worst = got
        .iter()
        .zip(want)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0f32, f32::max);
    assert!(worst <= atol, "logits differ by {worst}");
}

/// `Positions::Auto`, the default: within the trained context (the tiny
/// model's 256 positions) TokenSelect attends at original positions, past it
/// at compact ones; each step gives exactly the logits of the fixed scheme.
#[test]
fn tokenselect_positions_auto_switch_at_the_trained_length() {
    use kvsieve::attention::{AttentionPolicy, Positions, TokenSelectConfig};
    let d = write_model("auto_pos", "LlamaForCausalLM", |_| {});
    let ts = |positions| {
        AttentionPolicy::TokenSelect(TokenSelectConfig {
            k: 16,
            n_init: 4,
            n_local: 16,
            subchunk: 8,
            positions,
            ..Default::default()
        })
    };
    assert_eq!(TokenSelectConfig::default().positions, Positions::Auto);
    for backend in [Backend::Reference, Backend::Gpu] {
        let engine_chunked = |p, prefill_chunk| {
            let opts = Options {
                backend,
                max_context: 512,
                policy: ts(p),
                prefill_chunk,
                ..Options::default()
            };
            Engine::load(&d, opts).unwrap()
        };
        let engine = |p| engine_chunked(p, 512);
        let (mut auto, mut orig, mut comp) = (
            engine(Positions::Auto),
            engine(Positions::Original),
            engine(Positions::Compact),
        );
        // A prompt past the trained length fed in chunks of 64: its chunks
        // within the trained length take compact positions too.
        let (mut auto64, mut comp64) = (
            engine_chunked(Positions::Auto, 64),
            engine_chunked(Positions::Compact, 64),
        );
        let prompt: Vec<u32> = (0..300).map(|i| 3 + (i * 13) % 250).collect();
        for len in [100, 256, 257, 300] {
            let ids = &prompt[..len];
            let logits = |e: &mut Engine| {
                e.reset();
                e.prefill(ids).unwrap();
                e.logits().unwrap()
            };
            let (a, o, c) = (logits(&mut auto), logits(&mut orig), logits(&mut comp));
            assert!(
                o != c,
                "{backend:?} len {len}: the schemes agree, the test shows nothing"
            );
            let want = if len <= 256 { &o } else { &c };
            assert!(
                &a == want,
                "{backend:?} len {len}: auto is not the expected scheme"
            );
            if len > 256 {
                assert!(
                    logits(&mut auto64) == logits(&mut comp64),
                    "{backend:?} len {len} in chunks of 64: auto is not compact"
                );
            }
        }
        // Decode steps after a 250-token prompt: as original ones up to the
        // trained length (6 new tokens reach 256), not after it.
        let greedy_logits = |e: &mut Engine, n: usize| {
            e.reset();
            let params = GenerateParams {
                max_tokens: n,
                stop_at_eos: false,
                ..Default::default()
            };
            let toks: Vec<u32> = e
                .generate_ids(&prompt[..250], &params)
                .unwrap()
                .map(|t| t.unwrap().id)
                .collect();
            (toks, e.logits().unwrap())
        };
        let within = (greedy_logits(&mut auto, 7), greedy_logits(&mut orig, 7));
        assert_eq!(auto.cached_tokens().len(), 256);
        assert!(
            within.0 == within.1,
            "{backend:?}: decode within 256 is original"
        );
        let past = (greedy_logits(&mut auto, 12), greedy_logits(&mut orig, 12));
        assert_eq!(auto.cached_tokens().len(), 261);
        assert!(
            past.0 .1 != past.1 .1,
            "{backend:?}: decode past 256 is not original"
        );
    }
    let c = TokenSelectConfig::default();
    assert!(!c.compact_at(256, 256) && c.compact_at(257, 256));
}

#[test]
fn tidal_calibration_is_checked_cached_and_leaves_the_policy() {
    use kvsieve::attention::{AttentionPolicy, QuestConfig};
    let d = write_model("tidal-cal", "LlamaForCausalLM", |_| {});
    // Two layers: nothing after a selection layer 1 to re-select in.
    let mut e = load_with_context(&d, 600).unwrap();
    let err = e.calibrate_tidal(1, 64).unwrap_err().to_string();
    assert!(err.contains("selection layer 1"), "{err}");
    // The needle text needs room.
    let mut small = load_with_context(&d, 128).unwrap();
    let err = small.calibrate_tidal(0, 64).unwrap_err();
    assert!(matches!(err, Error::Capacity(_)), "{err}");

    let quest = AttentionPolicy::Quest(QuestConfig::default());
    e.set_policy(quest).unwrap();
    let cal = e.calibrate_tidal(0, 64).unwrap();
    assert_eq!(cal.config.reselection_layer, 1);
    assert_eq!(cal.config.budget, 64);
    assert_eq!(cal.held.len(), 2);
    assert!(cal
        .held
        .iter()
        .all(|h| h.is_some_and(|h| (0.0..=1.0).contains(&h))));
    assert_eq!(e.policy(), quest, "calibration left another policy behind");
    let again = e.calibrate_tidal(0, 64).unwrap();
    assert!(again.cached && again.held == cal.held);
    // The engine still answers (its cache was dropped, not broken).
    let prompt: Vec<u32> = (0..30).map(|i| 3 + (i * 13) % 250).collect();
    assert_eq!(greedy(&mut e, &prompt, 4).len(), 4);
}

/// `switch_policy` keeps the cache and gives the new policy fresh state over
/// it: Quest decoding after a dense prefill is exactly Quest decoding after
/// its own (Quest prefills densely), on both executors, and differs from
/// dense decoding there; `set_policy` drops the cache.
#[test]
fn switching_policy_keeps_the_cache() {
    use kvsieve::attention::{AttentionPolicy, QuestConfig};
    let d = write_model("switch", "LlamaForCausalLM", |_| {});
    let quest = AttentionPolicy::Quest(QuestConfig {
        block: 16,
        budget: 64,
        dense_layers: 1,
        ..Default::default()
    });
    let prompt: Vec<u32> = (0..200).map(|i| 3 + (i * 29 + i / 5) % 250).collect();
    let prefix = &prompt[..199];
    for backend in [Backend::Reference, Backend::Gpu] {
        let engine = |policy| {
            let opts = Options {
                backend,
                max_context: 256,
                policy,
                ..Options::default()
            };
            Engine::load(&d, opts).unwrap()
        };
        let decode = |e: &mut Engine| {
            e.prefill(prefix).unwrap();
            let toks = greedy(e, &prompt, 8);
            (toks, e.logits().unwrap())
        };
        let want = decode(&mut engine(quest));
        let dense = decode(&mut engine(AttentionPolicy::Dense));
        assert_ne!(dense.1, want.1, "{backend:?}: Quest should select here");

        let mut e = engine(AttentionPolicy::Dense);
        e.prefill(prefix).unwrap();
        e.switch_policy(quest).unwrap();
        assert_eq!(e.policy(), quest);
        assert_eq!(e.cached_tokens(), prefix, "{backend:?}: the cache stays");
        let toks = greedy(&mut e, &prompt, 8);
        assert_eq!((toks, e.logits().unwrap()), want, "{backend:?}");

        e.set_policy(AttentionPolicy::Dense).unwrap();
        assert!(
            e.cached_tokens().is_empty(),
            "{backend:?}: set_policy drops it"
        );
    }
}

/// Passkey prompts in every filler: as long as asked (within a sentence),
/// ending in the question, with the key after the asked share of the filler.
#[test]
fn passkey_prompts_hide_the_key_at_its_depth_in_every_filler() {
    use kvsieve::eval::{passkey_prompt, Filler};
    let d = write_model("passkey", "LlamaForCausalLM", |_| {});
    let e = load(&d, Backend::Reference).unwrap();
    let prose = "Pages hold keys. A cache grows on demand! Does it fit? It does.".to_string();
    for filler in [Filler::Repeat, Filler::Varied, Filler::Text(prose)] {
        for (tokens, depth) in [(3000, 0.0), (3000, 0.3), (4096, 0.75), (4096, 1.0)] {
            let ids = passkey_prompt(&e.tokenizer, tokens, depth, 68437, &filler).unwrap();
            assert!(
                ids.len() <= tokens && ids.len() + 100 > tokens,
                "{filler:?}: {} tokens for {tokens}",
                ids.len()
            );
            let text = e.tokenizer.decode(&ids).unwrap();
            assert!(text.ends_with("The pass key is"), "{filler:?}");
            // The share of the filler (between the intro and the question)
            // before the needle.
            let needle = " The pass key is 68437. Remember it. 68437 is the pass key.";
            let start = text.find("information there.").unwrap() + "information there.".len();
            let end = text.rfind(" What is the pass key?").unwrap() - needle.len();
            let at = text.find(needle).unwrap();
            let share = (at - start) as f64 / (end - start) as f64;
            assert!(
                (share - depth).abs() < 0.02,
                "{filler:?} depth {depth}: key at {share:.3}"
            );
        }
    }
    let empty = passkey_prompt(&e.tokenizer, 500, 0.5, 1, &Filler::Text(" ".into()));
    assert!(empty.unwrap_err().to_string().contains("empty"));
    assert!(passkey_prompt(&e.tokenizer, 500, 1.5, 1, &Filler::Varied).is_err());
}

/// TokenSelect's prompt tail: a prompt's last `prompt_tail` queries select
/// one by one, so the prompt's logits are those of feeding its tail a token
/// at a time (Selection Cache off), within and past the trained length, on
/// both executors; one shared sub-chunk gives other logits.
#[test]
fn tokenselect_prompt_tail_selects_per_token() {
    use kvsieve::attention::{AttentionPolicy, TokenSelectConfig};
    let d = write_model("prompt_tail", "LlamaForCausalLM", |_| {});
    let ts = |prompt_tail| {
        AttentionPolicy::TokenSelect(TokenSelectConfig {
            k: 16,
            n_init: 4,
            n_local: 16,
            subchunk: 64,
            cache_threshold: 2.0,
            prompt_tail,
            ..Default::default()
        })
    };
    let prompt: Vec<u32> = (0..300).map(|i| 3 + (i * 41 + i / 3) % 250).collect();
    for backend in [Backend::Reference, Backend::Gpu] {
        let engine = |tail| {
            let opts = Options {
                backend,
                max_context: 512,
                policy: ts(tail),
                ..Options::default()
            };
            Engine::load(&d, opts).unwrap()
        };
        let (mut tail, mut steps, mut shared) = (engine(8), engine(0), engine(0));
        for len in [200, 300] {
            let ids = &prompt[..len];
            tail.prefill(ids).unwrap();
            steps.prefill(&ids[..len - 8]).unwrap();
            for end in len - 7..=len {
                steps.prefill(&ids[..end]).unwrap();
            }
            shared.prefill(ids).unwrap();
            let (want, got) = (steps.logits().unwrap(), tail.logits().unwrap());
            let scale = want.iter().fold(1.0f32, |m, x| m.max(x.abs()));
            common_close(&got, &want, 1e-4 * scale);
            let other = shared.logits().unwrap();
            let apart = want.iter().zip(&other).map(|(a, b)| (a - b).abs());
            assert!(
                apart.fold(0.0f32, f32::max) > 1e-3 * scale,
                "{backend:?} {len}: one sub-chunk should select otherwise"
            );
            for e in [&mut tail, &mut steps, &mut shared] {
                e.reset();
            }
        }
    }
}
