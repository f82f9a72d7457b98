//! Speculative decoding is lossless: greedy output with prompt lookup equals plain
//! greedy output token for token on every prompt of specbench-mini.jsonl (chat
//! template, 64 new tokens), on the reference executor for all prompts and on the
//! GPU executor for two. Prints tau (mean tokens per verify forward).

use kvsieve::generate::{Backend, Engine, GenerateParams, Message, Options};
use kvsieve::speculative::Speculate;

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
        ..Default::default()
    };
    e.reset();
    e.chat(&[Message::new("user", prompt)], &params)
        .unwrap()
        .map(|t| t.unwrap().id)
        .collect()
}

fn check(backend: Backend, take: usize) {
    let dir = kvsieve::convert::default_model_dir().unwrap();
    let opts = Options {
        backend,
        max_context: 2048,
        ..Options::default()
    };
    let mut e = Engine::load(&dir, opts).unwrap();
    for (cat, p) in prompts().iter().take(take) {
        let plain = run(&mut e, p, Speculate::Off);
        let before = e.stats.clone();
        let spec = run(&mut e, p, Speculate::Lookup);
        let steps = e.stats.verify_steps - before.verify_steps;
        let toks = e.stats.verify_tokens - before.verify_tokens;
        eprintln!(
            "{backend:?} {cat:>13}: {} tokens, tau {:.2} over {steps} verify steps",
            spec.len(),
            toks as f64 / steps.max(1) as f64
        );
        assert_eq!(
            plain, spec,
            "{cat}: speculative output differs from plain greedy"
        );
    }
}

#[test]
fn lookup_speculation_is_lossless_on_the_reference_executor() {
    check(Backend::Reference, usize::MAX);
}

#[test]
fn lookup_speculation_is_lossless_on_the_gpu() {
    // lavapipe is slow: the first two prompts.
    check(Backend::Gpu, 2);
}
