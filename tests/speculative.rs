//! Speculative decoding is lossless: greedy output with each drafter (prompt
//! lookup, Token Recycling, both) equals plain greedy output token for token
//! (chat template, 64 new tokens) on the reference executor, both drafters on
//! every prompt of specbench-mini.jsonl and each one alone on the first four,
//! and on one prompt with two drafters on the GPU executor.
//! Prints tau (mean tokens per verify forward, bonus included).

use kvsieve::generate::{Backend, Engine, GenerateParams, Message, Options};
use kvsieve::speculative::{Speculate, TreeSize};

fn prompts() -> Vec<(String, String)> {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/specbench-mini.jsonl");
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            (
                v["category"].as_str().unwrap().to_string(),
                v["turns"][0].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

fn run(e: &mut Engine, prompt: &str, speculate: Speculate) -> Vec<u32> {
    let params = GenerateParams {
        max_tokens: 64,
        stop_at_eos: true,
        speculate,
        tree_size: TreeSize::Fixed(12),
        ..Default::default()
    };
    e.reset();
    e.chat(&[Message::new("user", prompt)], &params)
        .unwrap()
        .map(|t| t.unwrap().id)
        .collect()
}

/// Each drafter of `drafters` on the first `take` prompts.
fn check(backend: Backend, drafters: &[(Speculate, usize)]) {
    let dir = kvsieve::convert::default_model_dir().unwrap();
    let opts = Options {
        backend,
        max_context: 2048,
        ..Options::default()
    };
    let mut e = Engine::load(&dir, opts).unwrap();
    let mut total = vec![(0usize, 0usize); drafters.len()];
    let take = drafters.iter().map(|d| d.1).max().unwrap_or(0);
    for (i, (cat, p)) in prompts().iter().take(take).enumerate() {
        let plain = run(&mut e, p, Speculate::Off);
        for (&(d, n), tot) in drafters.iter().zip(total.iter_mut()) {
            if i >= n {
                continue;
            }
            let before = e.stats.clone();
            let spec = run(&mut e, p, d);
            let steps = e.stats.verify_steps - before.verify_steps;
            let toks = e.stats.verify_tokens - before.verify_tokens;
            tot.0 += steps;
            tot.1 += toks;
            eprintln!(
                "{backend:?} {d:?} {cat:>13}: {} tokens, tau {:.2} over {steps} verify steps",
                spec.len(),
                toks as f64 / steps.max(1) as f64
            );
            assert_eq!(plain, spec, "{cat}: {d:?} output differs from plain greedy");
        }
    }
    for ((d, _), (steps, toks)) in drafters.iter().zip(total) {
        eprintln!(
            "{backend:?} {d:?}: tau {:.2} overall",
            toks as f64 / steps.max(1) as f64
        );
    }
}

#[test]
fn speculation_is_lossless_on_the_reference_executor() {
    check(
        Backend::Reference,
        &[
            (Speculate::Both, usize::MAX),
            (Speculate::Lookup, 4),
            (Speculate::Recycling, 4),
        ],
    );
}

#[test]
fn speculation_is_lossless_on_the_gpu() {
    // lavapipe is slow: the first prompt, two drafters.
    check(
        Backend::Gpu,
        &[(Speculate::Lookup, 1), (Speculate::Both, 1)],
    );
}

/// Sampling with speculation runs end to end: the acceptance kernel takes drafts
/// at temperature 0.8 (its output distribution is checked exactly on synthetic
/// logits in gpu_speculative.rs). Run twice: the second run drafts from the
/// adjacency matrix the first one filled.
#[test]
fn sampled_speculation_accepts_drafts() {
    let dir = kvsieve::convert::default_model_dir().unwrap();
    let opts = Options {
        backend: Backend::Reference,
        max_context: 2048,
        ..Options::default()
    };
    let mut e = Engine::load(&dir, opts).unwrap();
    let params = GenerateParams {
        max_tokens: 48,
        stop_at_eos: false,
        speculate: Speculate::Both,
        tree_size: TreeSize::Fixed(12),
        sampling: kvsieve::generate::SamplingParams {
            temperature: 0.8,
            top_k: 40,
            top_p: 0.95,
            seed: 7,
            repetition_penalty: 1.0,
        },
        ..GenerateParams::default()
    };
    let (_, prompt) = &prompts()[2];
    for _ in 0..2 {
        e.reset();
        let before = e.stats.clone();
        let out: Vec<u32> = e
            .chat(&[Message::new("user", prompt)], &params)
            .unwrap()
            .map(|t| t.unwrap().id)
            .collect();
        let steps = e.stats.verify_steps - before.verify_steps;
        let toks = e.stats.verify_tokens - before.verify_tokens;
        eprintln!(
            "sampled, both:12: {} tokens, tau {:.2}",
            out.len(),
            toks as f64 / steps as f64
        );
        assert_eq!(out.len(), 48);
        assert!(
            toks > steps,
            "no draft accepted in {steps} sampled verify steps"
        );
    }
}
