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
    if model == "llama" {
        return sentencepiece(g);
    }
    if model != "gpt2" {
        return Err(Error::Unsupported(format!(
            "GGUF tokenizer model {model:?} is not supported (byte-level BPE \"gpt2\" or \
             SentencePiece \"llama\")"
        )));
    }
    let tokens = strings(g, "tokenizer.ggml.tokens")?;
    let merges = strings(g, "tokenizer.ggml.merges")?;
    let types = token_types(g, tokens.len());
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
    let pre_tokenizer = pre_tokenizer(pre)?;
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
    let cfg = tokenizer_config(g, &tokens, "GPT2Tokenizer");
    Ok((tok, cfg))
}

/// `tokenizer_config.json`: special tokens by name and the chat template.
fn tokenizer_config(g: &Gguf, tokens: &[String], class: &str) -> Json {
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
    json!({
        "add_bos_token": add_bos,
        "add_eos_token": false,
        "bos_token": name("tokenizer.ggml.bos_token_id"),
        "eos_token": name("tokenizer.ggml.eos_token_id"),
        "unk_token": name("tokenizer.ggml.unknown_token_id"),
        "pad_token": name("tokenizer.ggml.padding_token_id"),
        "model_max_length": ctx,
        "clean_up_tokenization_spaces": false,
        "tokenizer_class": class,
        "chat_template": g.get("tokenizer.chat_template").and_then(Value::as_str),
    })
}

fn token_types(g: &Gguf, n: usize) -> Vec<i64> {
    match g.get("tokenizer.ggml.token_type") {
        Some(Value::Array(a)) => a
            .iter()
            .map(|v| match v {
                Value::I(i) => *i,
                Value::U(u) => *u as i64,
                _ => 1,
            })
            .collect(),
        _ => vec![1; n],
    }
}

/// A SentencePiece (`llama`) vocabulary as Hugging Face's LlamaConverter writes
/// it: BPE with byte fallback over "▁"-marked pieces, the merges recovered from
/// the pieces' scores (as transformers' SentencePieceExtractor does: every split
/// of a piece into two pieces, ordered by the merged piece's score).
fn sentencepiece(g: &Gguf) -> Result<(Json, Json)> {
    let tokens = strings(g, "tokenizer.ggml.tokens")?;
    let scores: Vec<f64> = match g.get("tokenizer.ggml.scores") {
        Some(Value::Array(a)) if a.len() == tokens.len() => {
            a.iter().map(|v| v.as_f64().unwrap_or(0.0)).collect()
        }
        _ => {
            return Err(Error::malformed(
                "GGUF tokenizer.ggml.scores missing or of the wrong length",
            ))
        }
    };
    let types = token_types(g, tokens.len());
    let index: std::collections::HashMap<&str, usize> = tokens
        .iter()
        .enumerate()
        .map(|(i, t)| (t.as_str(), i))
        .collect();
    let mut merges: Vec<(usize, usize, usize)> = Vec::new(); // (left, right, merged)
    for (m, piece) in tokens.iter().enumerate() {
        let mut local: Vec<(usize, usize, usize)> = piece
            .char_indices()
            .skip(1)
            .filter_map(|(at, _)| {
                let (l, r) = piece.split_at(at);
                Some((*index.get(l)?, *index.get(r)?, m))
            })
            .collect();
        local.sort();
        merges.extend(local);
    }
    // Stable: ties keep the piece order, as Python's sorted does.
    merges.sort_by(|a, b| scores[b.2].total_cmp(&scores[a.2]));
    let mut vocab = Map::new();
    for (i, t) in tokens.iter().enumerate() {
        vocab.insert(t.clone(), json!(i));
    }
    let added: Vec<Json> = tokens
        .iter()
        .enumerate()
        .filter(|(i, _)| matches!(types.get(*i), Some(2) | Some(3) | Some(4)))
        .map(|(i, t)| {
            json!({"id": i, "content": t, "single_word": false, "lstrip": false, "rstrip": false,
                   "normalized": false, "special": types[i] != 4})
        })
        .collect();
    let unk = g
        .get("tokenizer.ggml.unknown_token_id")
        .and_then(Value::as_u64)
        .and_then(|i| tokens.get(i as usize))
        .cloned();
    let prefix = !matches!(
        g.get("tokenizer.ggml.add_space_prefix"),
        Some(Value::Bool(false))
    );
    let mut norm =
        vec![json!({"type": "Replace", "pattern": {"String": " "}, "content": "\u{2581}"})];
    let mut dec = vec![
        json!({"type": "Replace", "pattern": {"String": "\u{2581}"}, "content": " "}),
        json!({"type": "ByteFallback"}),
        json!({"type": "Fuse"}),
    ];
    if prefix {
        norm.insert(0, json!({"type": "Prepend", "prepend": "\u{2581}"}));
        dec.push(json!({"type": "Strip", "content": " ", "start": 1, "stop": 0}));
    }
    let merges: Vec<Json> = merges
        .iter()
        .map(|&(l, r, _)| json!([tokens[l], tokens[r]]))
        .collect();
    let tok = json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": {"type": "Sequence", "normalizers": norm},
        "pre_tokenizer": null,
        "post_processor": null,
        "decoder": {"type": "Sequence", "decoders": dec},
        "model": {
            "type": "BPE", "dropout": null, "unk_token": unk, "continuing_subword_prefix": null,
            "end_of_word_suffix": null, "fuse_unk": true, "byte_fallback": true, "ignore_merges": false,
            "vocab": vocab, "merges": merges,
        }
    });
    Ok((tok, tokenizer_config(g, &tokens, "LlamaTokenizer")))
}

/// The pre-tokenizer (tokenizer.json form) that `tokenizer.ggml.pre` names.
fn pre_tokenizer(pre: &str) -> Result<Json> {
    let byte_level = json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true});
    // The split before byte-level BPE, as llama.cpp's `tokenizer.ggml.pre` names it
    // (regexes from llama.cpp's llama-vocab.cpp and the models' tokenizer.json).
    let split = |pattern: &str| {
        json!({"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": pattern}, "behavior": "Isolated", "invert": false},
            {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": false}]})
    };
    const LLAMA3: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
    const QWEN2: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
    Ok(match pre {
        // GPT-2's split (the byte-level pre-tokenizer's own regex).
        "default" | "gpt2" => byte_level,
        // SmolLM's pre-tokenizer splits digits one by one before byte-level BPE.
        "smollm" => json!({"type": "Sequence", "pretokenizers": [
            {"type": "Digits", "individual_digits": true}, byte_level]}),
        "llama-bpe" | "llama3" => split(LLAMA3),
        "qwen2" => split(QWEN2),
        other => {
            return Err(Error::Unsupported(format!(
                "GGUF pre-tokenizer {other:?} (tokenizer.ggml.pre) is not supported \
                 (default, gpt2, smollm, llama-bpe, qwen2)"
            )))
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn split(pre: &str, text: &str) -> Vec<String> {
        let p: tokenizers::PreTokenizerWrapper =
            serde_json::from_value(pre_tokenizer(pre).unwrap()).unwrap();
        use tokenizers::PreTokenizer;
        let mut s = tokenizers::PreTokenizedString::from(text);
        p.pre_tokenize(&mut s).unwrap();
        s.get_splits(
            tokenizers::OffsetReferential::Original,
            tokenizers::OffsetType::Byte,
        )
        .into_iter()
        .map(|(t, _, _)| t.to_string())
        .collect()
    }

    #[test]
    fn pre_tokenizers_by_name() {
        // Llama 3 groups digits in threes, Qwen2 and SmolLM one by one, GPT-2 not at all.
        assert_eq!(split("llama-bpe", "x 12345"), ["x", "Ġ", "123", "45"]);
        assert_eq!(split("qwen2", "12345"), ["1", "2", "3", "4", "5"]);
        assert_eq!(split("smollm", "123"), ["1", "2", "3"]);
        assert_eq!(split("gpt2", "I'm 123"), ["I", "'m", "Ġ123"]);
        assert!(pre_tokenizer("falcon")
            .unwrap_err()
            .to_string()
            .contains("falcon"));
    }
}
