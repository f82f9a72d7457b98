//! The default model's GGUF file (SmolLM2-135M-Instruct.Q4_1.gguf: Q4_1 with a
//! Q8_0 embedding) loaded directly, weights kept quantized: its tokenizer and
//! chat template from the metadata match transformers', its greedy output
//! agrees with the f16 model's (transformers' greedy ids in the fixture) on most
//! public reference prompts, and both executors generate the same tokens.

use kvsieve::generate::{Backend, Engine, GenerateParams, Message, Options};
use serde_json::Value;

fn gguf_path() -> std::path::PathBuf {
    kvsieve::convert::default_model_gguf().unwrap_or_else(|e| panic!("default model: {e}"))
}

fn fixture() -> Value {
    let p = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/ref-smollm2-public.json");
    serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap()
}

fn ids(v: &Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

fn load(backend: Backend) -> Engine {
    let opts = Options {
        backend,
        max_context: 1024,
        progress: false,
        ..Options::default()
    };
    Engine::load(&gguf_path(), opts).unwrap_or_else(|e| panic!("load GGUF: {e}"))
}

fn greedy(e: &mut Engine, prompt: &[u32], n: usize) -> Vec<u32> {
    let params = GenerateParams {
        max_tokens: n,
        stop_at_eos: false,
        ..Default::default()
    };
    e.generate_ids(prompt, &params)
        .unwrap()
        .map(|t| t.unwrap().id)
        .collect()
}

#[test]
fn gguf_direct_matches_the_f16_model() {
    let mut e = load(Backend::Reference);
    let (bytes, _) = e.weight_bytes();
    let file = std::fs::metadata(gguf_path()).unwrap().len();
    // Weights take the file's size (norms are f32 in the file and f16 here).
    assert!(
        (bytes as f64) <= file as f64 * 1.05 && (bytes as f64) >= file as f64 * 0.9,
        "weights {bytes} bytes for a {file}-byte file"
    );
    let fx = fixture();
    let results = fx["results"].as_array().unwrap();
    let msgs = [Message::new(
        "user",
        "How many planets are in the solar system? Name them.",
    )];
    assert_eq!(
        e.tokenizer.render_chat(&msgs, true).unwrap(),
        results[0]["prompt_text"].as_str().unwrap(),
        "chat template from the GGUF metadata"
    );
    let mut long = 0;
    for r in results {
        let name = r["name"].as_str().unwrap();
        let prompt = ids(&r["prompt_ids"]);
        assert_eq!(
            e.tokenizer
                .encode(r["prompt_text"].as_str().unwrap())
                .unwrap(),
            prompt,
            "{name}: tokens"
        );
        let want = ids(&r["greedy_ids"]);
        let got = greedy(&mut e, &prompt, 16.min(want.len()));
        let same = got.iter().zip(&want).take_while(|(a, b)| a == b).count();
        eprintln!(
            "{name}: {same}/{} greedy tokens as the f16 model",
            got.len()
        );
        if same >= 16 {
            long += 1;
        }
    }
    assert!(
        long >= 3,
        "Q4_1 greedy output matched the f16 model for 16 tokens on only {long} of 4 prompts"
    );
}

#[test]
fn gguf_direct_same_tokens_on_both_executors() {
    let prompt = ids(&fixture()["results"][0]["prompt_ids"]);
    let cpu = greedy(&mut load(Backend::Reference), &prompt, 16);
    let gpu = greedy(&mut load(Backend::Gpu), &prompt, 16);
    assert_eq!(
        gpu, cpu,
        "GPU and reference greedy tokens from the Q4_1 file"
    );
}

/// `--quantize q8_0` on the f16 directory: the same greedy tokens as the f16
/// model on most public prompts, and on both executors.
#[test]
fn quantize_at_load_q8_0() {
    let dir = kvsieve::convert::default_model_dir().unwrap();
    let load_q = |backend| {
        let opts = Options {
            backend,
            max_context: 1024,
            quantize: Some(kvsieve::quant::DType::Q8_0),
            ..Options::default()
        };
        Engine::load(&dir, opts).unwrap_or_else(|e| panic!("load: {e}"))
    };
    let mut e = load_q(Backend::Reference);
    let (bytes, _) = e.weight_bytes();
    assert!(bytes < 150_000_000, "Q8_0 weights take {bytes} bytes");
    let fx = fixture();
    let mut long = 0;
    for r in fx["results"].as_array().unwrap() {
        let want = ids(&r["greedy_ids"]);
        let got = greedy(&mut e, &ids(&r["prompt_ids"]), 16.min(want.len()));
        if got.iter().zip(&want).take_while(|(a, b)| a == b).count() >= 16 {
            long += 1;
        }
    }
    assert!(
        long >= 3,
        "Q8_0 matched the f16 model for 16 tokens on only {long} of 4 prompts"
    );
    let prompt = ids(&fx["results"][1]["prompt_ids"]);
    let cpu = greedy(&mut e, &prompt, 12);
    assert_eq!(greedy(&mut load_q(Backend::Gpu), &prompt, 12), cpu);
    let bad = Options {
        quantize: Some(kvsieve::quant::DType::Q4_K),
        ..Options::default()
    };
    let err = Engine::load(&dir, bad).map(|_| ()).unwrap_err().to_string();
    assert!(err.contains("Q4_K"), "{err}");
}
