//! Model loading on small synthetic checkpoints: every kind of bad input gets an
//! error that names the problem, and a Qwen2-style model (q/k/v biases, untied
//! head) gives the same logits on both executors.

use half::f16;
use kvsieve::generate::{Backend, Engine, GenerateParams, Options, SamplingParams};
use kvsieve::Error;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

const VOCAB: usize = 300;

/// A tiny byte-level BPE tokenizer: 256 byte tokens plus a few merges and specials.
fn tokenizer_json() -> serde_json::Value {
    // GPT-2 byte-to-unicode map, so every byte is a token.
    let mut bs: Vec<u32> = (33..=126).chain(161..=172).chain(174..=255).collect();
    let mut cs = bs.clone();
    let mut n = 0;
    for b in 0..256u32 {
        if !bs.contains(&b) {
            bs.push(b);
            cs.push(256 + n);
            n += 1;
        }
    }
    let mut vocab = serde_json::Map::new();
    vocab.insert("<|endoftext|>".into(), 0.into());
    vocab.insert("<|im_start|>".into(), 1.into());
    vocab.insert("<|im_end|>".into(), 2.into());
    for (i, c) in cs.iter().enumerate() {
        vocab.insert(char::from_u32(*c).unwrap().to_string(), (3 + i).into());
    }
    serde_json::json!({
        "version": "1.0", "truncation": null, "padding": null,
        "added_tokens": [
            {"id": 0, "content": "<|endoftext|>", "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true},
            {"id": 1, "content": "<|im_start|>", "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true},
            {"id": 2, "content": "<|im_end|>", "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true}],
        "normalizer": null,
        "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true},
        "post_processor": null,
        "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
        "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
                  "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
                  "vocab": vocab, "merges": []}
    })
}

struct Tiny {
    hidden: usize,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
    inter: usize,
    layers: usize,
}

const TINY: Tiny = Tiny {
    hidden: 64,
    heads: 4,
    kv_heads: 2,
    head_dim: 16,
    inter: 96,
    layers: 2,
};

fn config(arch: &str) -> serde_json::Value {
    serde_json::json!({
        "architectures": [arch], "hidden_size": TINY.hidden, "intermediate_size": TINY.inter,
        "num_hidden_layers": TINY.layers, "num_attention_heads": TINY.heads,
        "num_key_value_heads": TINY.kv_heads, "vocab_size": VOCAB, "rms_norm_eps": 1e-6,
        "rope_theta": 10000.0, "tie_word_embeddings": false, "max_position_embeddings": 256,
        "bos_token_id": 1, "eos_token_id": 2
    })
}

fn tensors(qkv_bias: bool) -> Vec<(String, Vec<usize>)> {
    let t = &TINY;
    let (qd, kd) = (t.heads * t.head_dim, t.kv_heads * t.head_dim);
    let mut v = vec![
        (
            "model.embed_tokens.weight".to_string(),
            vec![VOCAB, t.hidden],
        ),
        ("lm_head.weight".to_string(), vec![VOCAB, t.hidden]),
        ("model.norm.weight".to_string(), vec![t.hidden]),
    ];
    for i in 0..t.layers {
        let p = |s: &str| format!("model.layers.{i}.{s}");
        v.push((p("input_layernorm.weight"), vec![t.hidden]));
        v.push((p("post_attention_layernorm.weight"), vec![t.hidden]));
        v.push((p("self_attn.q_proj.weight"), vec![qd, t.hidden]));
        v.push((p("self_attn.k_proj.weight"), vec![kd, t.hidden]));
        v.push((p("self_attn.v_proj.weight"), vec![kd, t.hidden]));
        v.push((p("self_attn.o_proj.weight"), vec![t.hidden, qd]));
        v.push((p("mlp.gate_proj.weight"), vec![t.inter, t.hidden]));
        v.push((p("mlp.up_proj.weight"), vec![t.inter, t.hidden]));
        v.push((p("mlp.down_proj.weight"), vec![t.hidden, t.inter]));
        if qkv_bias {
            v.push((p("self_attn.q_proj.bias"), vec![qd]));
            v.push((p("self_attn.k_proj.bias"), vec![kd]));
            v.push((p("self_attn.v_proj.bias"), vec![kd]));
        }
    }
    v
}

/// Writes a model directory; `edit` may change the tensor list (name, shape, dtype).
fn write_model(
    name: &str,
    arch: &str,
    edit: impl FnOnce(&mut Vec<(String, Vec<usize>, safetensors::Dtype)>),
) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("kvsieve-test-{}-{name}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("config.json"), config(arch).to_string()).unwrap();
    std::fs::write(dir.join("tokenizer.json"), tokenizer_json().to_string()).unwrap();
    let mut list: Vec<(String, Vec<usize>, safetensors::Dtype)> =
        tensors(arch == "Qwen2ForCausalLM")
            .into_iter()
            .map(|(n, s)| (n, s, safetensors::Dtype::F16))
            .collect();
    edit(&mut list);
    let mut seed = 12345u64;
    let data: Vec<Vec<u8>> = list
        .iter()
        .map(|(n, s, dt)| {
            let count: usize = s.iter().product();
            let norm = n.contains("norm");
            let vals = (0..count).map(|_| {
                seed = seed
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                let r = ((seed >> 40) as f32 / (1u64 << 24) as f32) - 0.5;
                if norm {
                    1.0 + 0.1 * r
                } else {
                    0.3 * r
                }
            });
            match dt {
                safetensors::Dtype::F32 => vals.flat_map(|v| v.to_le_bytes()).collect(),
                safetensors::Dtype::I32 => vals.flat_map(|v| (v as i32).to_le_bytes()).collect(),
                _ => vals.flat_map(|v| f16::from_f32(v).to_le_bytes()).collect(),
            }
        })
        .collect();
    let views: Vec<(String, safetensors::tensor::TensorView)> = list
        .iter()
        .zip(&data)
        .map(|((n, s, dt), d)| {
            (
                n.clone(),
                safetensors::tensor::TensorView::new(*dt, s.clone(), d).unwrap(),
            )
        })
        .collect();
    safetensors::serialize_to_file(
        views,
        None::<HashMap<String, String>>,
        &dir.join("model.safetensors"),
    )
    .unwrap();
    dir
}

fn load(dir: &Path, backend: Backend) -> kvsieve::Result<Engine> {
    Engine::load(
        dir,
        Options {
            backend,
            max_context: 128,
            ..Options::default()
        },
    )
}

fn err_text(r: kvsieve::Result<Engine>) -> String {
    match r {
        Ok(_) => panic!("expected an error"),
        Err(e) => e.to_string(),
    }
}

/// The file an I/O or format error names, and whether it is a format error.
fn err_file(r: kvsieve::Result<Engine>) -> (String, bool) {
    match r {
        Err(Error::Io { path, .. }) => (path.display().to_string(), false),
        Err(Error::Format { path, .. }) => (path.display().to_string(), true),
        Err(e) => panic!("expected an I/O or format error, got {e}"),
        Ok(_) => panic!("expected an error"),
    }
}

#[test]
fn bad_model_directories_get_named_errors() {
    let ok = write_model("ok", "LlamaForCausalLM", |_| {});
    assert!(load(&ok, Backend::Reference).is_ok());

    let d = write_model("noconfig", "LlamaForCausalLM", |_| {});
    std::fs::remove_file(d.join("config.json")).unwrap();
    let (f, format) = err_file(load(&d, Backend::Reference));
    assert!(f.ends_with("config.json") && !format, "{f}");

    let d = write_model("badconfig", "LlamaForCausalLM", |_| {});
    std::fs::write(d.join("config.json"), "{\"hidden_size\": ").unwrap();
    let e = err_text(load(&d, Backend::Reference));
    assert!(e.contains("config.json") && e.contains("malformed"), "{e}");
    let (f, format) = err_file(load(&d, Backend::Reference));
    assert!(f.ends_with("config.json") && format, "{f}");

    let d = write_model("arch", "GPT2LMHeadModel", |_| {});
    assert!(err_text(load(&d, Backend::Reference)).contains("GPT2LMHeadModel"));

    let d = write_model("missing", "LlamaForCausalLM", |l| {
        l.retain(|(n, _, _)| !n.contains("layers.1.mlp.up_proj"))
    });
    assert!(err_text(load(&d, Backend::Reference)).contains("model.layers.1.mlp.up_proj.weight"));

    let d = write_model("shape", "LlamaForCausalLM", |l| {
        l.iter_mut()
            .find(|(n, _, _)| n.ends_with("layers.0.self_attn.k_proj.weight"))
            .unwrap()
            .1 = vec![16, 64];
    });
    let e = err_text(load(&d, Backend::Reference));
    assert!(
        e.contains("layers.0.self_attn.k_proj.weight") && e.contains("[16, 64]"),
        "{e}"
    );

    let d = write_model("dtype", "LlamaForCausalLM", |l| {
        l.iter_mut()
            .find(|(n, _, _)| n == "model.norm.weight")
            .unwrap()
            .2 = safetensors::Dtype::I32;
    });
    let e = err_text(load(&d, Backend::Reference));
    assert!(e.contains("model.norm.weight") && e.contains("I32"), "{e}");

    let d = write_model("corrupt", "LlamaForCausalLM", |_| {});
    std::fs::write(
        d.join("model.safetensors"),
        b"\xff\xff\xff\xff\xff\xff\xff\x7fgarbage",
    )
    .unwrap();
    assert!(err_text(load(&d, Backend::Reference)).contains("model.safetensors"));
    let (f, format) = err_file(load(&d, Backend::Reference));
    assert!(f.ends_with("model.safetensors") && format, "{f}");

    let d = write_model("notok", "LlamaForCausalLM", |_| {});
    std::fs::write(d.join("tokenizer.json"), "{").unwrap();
    assert!(err_text(load(&d, Backend::Reference)).contains("tokenizer.json"));
    let (f, format) = err_file(load(&d, Backend::Reference));
    assert!(f.ends_with("tokenizer.json") && format, "{f}");
    std::fs::remove_file(d.join("tokenizer.json")).unwrap();
    let (f, format) = err_file(load(&d, Backend::Reference));
    assert!(f.ends_with("tokenizer.json") && !format, "{f}");
}

#[test]
fn bad_requests_get_named_errors() {
    let d = write_model("requests", "LlamaForCausalLM", |_| {});
    let mut e = load(&d, Backend::Reference).unwrap();
    // Longer than the 128-token context.
    let long: Vec<u32> = (0..200).map(|i| 3 + i % 200).collect();
    let r = e.generate_ids(&long, &GenerateParams::default());
    assert!(
        matches!(r, Err(Error::Capacity(ref m)) if m.contains("128")),
        "{:?}",
        r.err()
    );
    // Token ids outside the vocabulary.
    assert!(e
        .generate_ids(&[5, VOCAB as u32], &GenerateParams::default())
        .is_err());
    // Invalid sampling values and option names.
    let bad = GenerateParams {
        sampling: SamplingParams {
            top_p: 1.5,
            ..Default::default()
        },
        ..Default::default()
    };
    assert!(e
        .generate_ids(&[5], &bad)
        .err()
        .unwrap()
        .to_string()
        .contains("top-p 1.5"));
    let bad = GenerateParams {
        sampling: SamplingParams {
            top_k: 0,
            ..Default::default()
        },
        ..Default::default()
    };
    assert!(e.generate_ids(&[5], &bad).is_err());
    // Bad Quest options: the message names the value.
    use kvsieve::attention::{AttentionPolicy, QuestConfig};
    for (c, word) in [
        (
            QuestConfig {
                block: 3,
                ..Default::default()
            },
            "block 3",
        ),
        (
            QuestConfig {
                block: 24,
                ..Default::default()
            },
            "block size 24",
        ),
        (
            QuestConfig {
                budget: 16,
                ..Default::default()
            },
            "budget 16",
        ),
    ] {
        let m = e
            .set_policy(AttentionPolicy::Quest(c))
            .unwrap_err()
            .to_string();
        assert!(m.contains(word), "{m}");
    }
    let spread = kvsieve::attention::TokenSelectConfig {
        prefilter_blocks: 256,
        prefilter_spread: 1.5,
        ..Default::default()
    };
    let m = e
        .set_policy(AttentionPolicy::TokenSelect(spread))
        .unwrap_err()
        .to_string();
    assert!(m.contains("spread 1.5"), "{m}");
    // Speculation with a repetition penalty is refused by name.
    let bad = GenerateParams {
        speculate: kvsieve::speculative::Speculate::Lookup,
        tree_size: kvsieve::speculative::TreeSize::Fixed(4),
        sampling: SamplingParams {
            repetition_penalty: 1.2,
            ..Default::default()
        },
        ..Default::default()
    };
    let m = e.generate_ids(&[5, 6], &bad).err().unwrap().to_string();
    assert!(m.contains("repetition penalty"), "{m}");
    assert!("tpu"
        .parse::<Backend>()
        .unwrap_err()
        .to_string()
        .contains("tpu"));
    // The engine still works after the errors.
    assert_eq!(
        e.generate_ids(
            &[5, 6, 7],
            &GenerateParams {
                max_tokens: 3,
                stop_at_eos: false,
                ..Default::default()
            }
        )
        .unwrap()
        .count(),
        3
    );
}

#[test]
fn qwen2_biases_and_untied_head_agree_across_executors() {
    let d = write_model("qwen", "Qwen2ForCausalLM", |_| {});
    let mut cpu = load(&d, Backend::Reference).unwrap();
    let mut gpu = load(&d, Backend::Gpu).unwrap();
    let prompt: Vec<u32> = (0..70).map(|i| 3 + (i * 37) % 250).collect();
    for n in [1usize, 9, 70] {
        cpu.prefill(&prompt[..n]).unwrap();
        gpu.prefill(&prompt[..n]).unwrap();
        let (a, b) = (cpu.logits().unwrap(), gpu.logits().unwrap());
        let worst = a
            .iter()
            .zip(&b)
            .map(|(x, y)| (x - y).abs())
            .fold(0.0f32, f32::max);
        assert!(worst < 1e-3, "prefix {n}: logits differ by {worst}");
    }
    // Sampling: the device top-k and the CPU top-k pick the same tokens with one seed.
    let params = GenerateParams {
        sampling: SamplingParams {
            temperature: 0.8,
            top_k: 20,
            top_p: 0.9,
            repetition_penalty: 1.2,
            seed: 7,
        },
        max_tokens: 12,
        stop_at_eos: false,
        ..Default::default()
    };
    let a: Vec<u32> = cpu
        .generate_ids(&prompt, &params)
        .unwrap()
        .map(|t| t.unwrap().id)
        .collect();
    let b: Vec<u32> = gpu
        .generate_ids(&prompt, &params)
        .unwrap()
        .map(|t| t.unwrap().id)
        .collect();
    assert_eq!(a, b);
    let c: Vec<u32> = cpu
        .generate_ids(&prompt, &params)
        .unwrap()
        .map(|t| t.unwrap().id)
        .collect();
    assert_eq!(a, c, "same seed, same tokens");
}
