//! Rebuilds a Hugging Face `tokenizer.json` (byte-level BPE) and
//! `tokenizer_config.json` from a GGUF's vocabulary, merges and chat template.

use super::gguf::{Gguf, Value};
use crate::error::{Error, Result};
use serde_json::{json, Map, Value as Json};

fn strings(g: &Gguf, key: &str) -> Result<Vec<String>> {
    match g.get(key) {
        Some(Value::Array(a)) => a
            .iter()
            .map(|v| {
                v.as_str()
                    .map(str::to_string)
                    .ok_or_else(|| Error::malformed(format!("GGUF {key}: not strings")))
            })
            .collect(),
        _ => Err(Error::malformed(format!("GGUF metadata {key} missing"))),
    }
}

/// (tokenizer.json, tokenizer_config.json)
pub fn from_gguf(g: &Gguf) -> Result<(Json, Json)> {
    let model = g
        .get("tokenizer.ggml.model")
        .and_then(Value::as_str)
        .unwrap_or("");
    if model != "gpt2" {
        return Err(Error::Unsupported(format!(
            "GGUF tokenizer model {model:?} is not supported (byte-level BPE \"gpt2\" only)"
        )));
    }
    let tokens = strings(g, "tokenizer.ggml.tokens")?;
    let merges = strings(g, "tokenizer.ggml.merges")?;
    let types: Vec<i64> = match g.get("tokenizer.ggml.token_type") {
        Some(Value::Array(a)) => a
            .iter()
            .map(|v| match v {
                Value::I(i) => *i,
                Value::U(u) => *u as i64,
                _ => 1,
            })
            .collect(),
        _ => vec![1; tokens.len()],
    };
    let mut vocab = Map::new();
    for (i, t) in tokens.iter().enumerate() {
        vocab.insert(t.clone(), json!(i));
    }
    // GGUF token types: 3 = control, 4 = user-defined; both are added tokens.
    let added: Vec<Json> = tokens
        .iter()
        .enumerate()
        .filter(|(i, _)| matches!(types.get(*i), Some(3) | Some(4)))
        .map(|(i, t)| {
            json!({"id": i, "content": t, "single_word": false, "lstrip": false, "rstrip": false,
                   "normalized": false, "special": types[i] == 3})
        })
        .collect();
    let pre = g
        .get("tokenizer.ggml.pre")
        .and_then(Value::as_str)
        .unwrap_or("default");
    let byte_level = json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true});
    // SmolLM's pre-tokenizer splits digits one by one before byte-level BPE.
    let pre_tokenizer = match pre {
        "smollm" => json!({"type": "Sequence", "pretokenizers": [
            {"type": "Digits", "individual_digits": true}, byte_level]}),
        _ => byte_level,
    };
    let tok = json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": null,
        "pre_tokenizer": pre_tokenizer,
        "post_processor": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": false, "use_regex": true},
        "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
        "model": {
            "type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
            "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
            "vocab": vocab, "merges": merges,
        }
    });
    let name = |key: &str| -> Json {
        g.get(key)
            .and_then(Value::as_u64)
            .and_then(|i| tokens.get(i as usize))
            .map(|s| json!(s))
            .unwrap_or(Json::Null)
    };
    let add_bos = matches!(
        g.get("tokenizer.ggml.add_bos_token"),
        Some(Value::Bool(true))
    );
    let ctx = g
        .get("llama.context_length")
        .and_then(Value::as_u64)
        .unwrap_or(2048);
    let cfg = json!({
        "add_bos_token": add_bos,
        "add_eos_token": false,
        "bos_token": name("tokenizer.ggml.bos_token_id"),
        "eos_token": name("tokenizer.ggml.eos_token_id"),
        "unk_token": name("tokenizer.ggml.unknown_token_id"),
        "pad_token": name("tokenizer.ggml.padding_token_id"),
        "model_max_length": ctx,
        "clean_up_tokenization_spaces": false,
        "tokenizer_class": "GPT2Tokenizer",
        "chat_template": g.get("tokenizer.chat_template").and_then(Value::as_str),
    });
    Ok((tok, cfg))
}
