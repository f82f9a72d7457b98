//! Synthetic model files shared by the loader tests and the fuzz harness: a
//! tiny byte-level BPE tokenizer, a GGUF writer and block data of every GGML
//! type, and engines loaded over them.
#![allow(dead_code)]

use half::f16;
use kvsieve::generate::{Backend, Engine, GenerateParams, Options, SamplingParams};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// Tokens of the tiny tokenizer (3 specials, 256 bytes, filler up to here).
pub const VOCAB: usize = 300;

/// A tiny byte-level BPE tokenizer: 256 byte tokens plus a few merges and specials.
pub fn tokenizer_json() -> serde_json::Value {
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

pub struct GgufWriter {
    pub kv: Vec<u8>,
    pub n_kv: u64,
    pub tensors: Vec<(String, Vec<u64>, u32, Vec<u8>)>,
}

impl GgufWriter {
    pub fn new() -> Self {
        Self {
            kv: Vec::new(),
            n_kv: 0,
            tensors: Vec::new(),
        }
    }
    pub fn s(b: &mut Vec<u8>, x: &str) {
        b.extend((x.len() as u64).to_le_bytes());
        b.extend(x.as_bytes());
    }
    pub fn key(&mut self, k: &str, ty: u32) {
        Self::s(&mut self.kv, k);
        self.kv.extend(ty.to_le_bytes());
        self.n_kv += 1;
    }
    pub fn str(&mut self, k: &str, v: &str) {
        self.key(k, 8);
        Self::s(&mut self.kv, v);
    }
    pub fn u32(&mut self, k: &str, v: u32) {
        self.key(k, 4);
        self.kv.extend(v.to_le_bytes());
    }
    pub fn f32(&mut self, k: &str, v: f32) {
        self.key(k, 6);
        self.kv.extend(v.to_le_bytes());
    }
    pub fn strs(&mut self, k: &str, v: &[String]) {
        self.key(k, 9);
        self.kv.extend(8u32.to_le_bytes());
        self.kv.extend((v.len() as u64).to_le_bytes());
        for x in v {
            Self::s(&mut self.kv, x);
        }
    }
    pub fn f32s(&mut self, k: &str, v: &[f32]) {
        self.key(k, 9);
        self.kv.extend(6u32.to_le_bytes());
        self.kv.extend((v.len() as u64).to_le_bytes());
        for x in v {
            self.kv.extend(x.to_le_bytes());
        }
    }
    pub fn i32s(&mut self, k: &str, v: &[i32]) {
        self.key(k, 9);
        self.kv.extend(5u32.to_le_bytes());
        self.kv.extend((v.len() as u64).to_le_bytes());
        for x in v {
            self.kv.extend(x.to_le_bytes());
        }
    }
    /// A tensor of HF shape `[rows, cols]` (or `[cols]`) stored as GGML type `ty`.
    pub fn tensor(&mut self, name: &str, shape: &[usize], ty: u32, data: Vec<u8>) {
        let dims = shape.iter().rev().map(|&d| d as u64).collect();
        self.tensors.push((name.into(), dims, ty, data));
    }
    pub fn finish(self) -> Vec<u8> {
        let mut b = b"GGUF".to_vec();
        b.extend(3u32.to_le_bytes());
        b.extend((self.tensors.len() as u64).to_le_bytes());
        b.extend(self.n_kv.to_le_bytes());
        b.extend(&self.kv);
        let mut off = 0u64;
        for (n, dims, ty, data) in &self.tensors {
            Self::s(&mut b, n);
            b.extend((dims.len() as u32).to_le_bytes());
            for d in dims {
                b.extend(d.to_le_bytes());
            }
            b.extend(ty.to_le_bytes());
            b.extend(off.to_le_bytes());
            off += (data.len() as u64).div_ceil(32) * 32;
        }
        b.resize(b.len().div_ceil(32) * 32, 0);
        for (_, _, _, data) in &self.tensors {
            b.extend(data);
            b.resize(b.len().div_ceil(32) * 32, 0);
        }
        b
    }
}

/// GGML type ids.
pub const F32: u32 = 0;
pub const Q4_0: u32 = 2;
pub const Q4_1: u32 = 3;
pub const Q5_0: u32 = 6;
pub const Q5_1: u32 = 7;
pub const Q8_0: u32 = 8;
pub const Q4_K: u32 = 12;
pub const Q5_K: u32 = 13;
pub const Q6_K: u32 = 14;

/// `n` values of GGML type `ty` from a seeded generator: random bits with small
/// finite scales for the quantized types.
pub fn gguf_data(ty: u32, n: usize, seed: &mut u64, norm: bool) -> Vec<u8> {
    let mut next = || {
        *seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (*seed >> 33) as u32
    };
    if ty == F32 {
        return (0..n)
            .flat_map(|_| {
                let r = (next() % 1000) as f32 / 1000.0 - 0.5;
                (if norm { 1.0 + 0.1 * r } else { 0.3 * r }).to_le_bytes()
            })
            .collect();
    }
    let dt = kvsieve::quant::DType::from_ggml(ty).unwrap();
    let (per, bytes) = dt.block();
    let mut raw: Vec<u8> = (0..n / per * bytes).map(|_| next() as u8).collect();
    let amp = if per == 256 { 0.002 } else { 0.04 };
    let scale = |b: &mut [u8], next: &mut dyn FnMut() -> u32| {
        let v = ((next() % 1000) as f32 / 1000.0 - 0.5) * amp;
        b.copy_from_slice(&f16::from_f32(v).to_le_bytes());
    };
    for b in raw.chunks_exact_mut(bytes) {
        match ty {
            Q6_K => scale(&mut b[208..210], &mut next),
            Q4_1 | Q5_1 | Q4_K | Q5_K => {
                scale(&mut b[0..2], &mut next);
                scale(&mut b[2..4], &mut next);
            }
            _ => scale(&mut b[0..2], &mut next),
        }
    }
    raw
}

/// Shapes of the tiny safetensors model.
pub struct Tiny {
    pub hidden: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub inter: usize,
    pub layers: usize,
}

pub const TINY: Tiny = Tiny {
    hidden: 64,
    heads: 4,
    kv_heads: 2,
    head_dim: 16,
    inter: 96,
    layers: 2,
};

/// config.json of the tiny model.
pub fn config(arch: &str) -> serde_json::Value {
    serde_json::json!({
        "architectures": [arch], "hidden_size": TINY.hidden, "intermediate_size": TINY.inter,
        "num_hidden_layers": TINY.layers, "num_attention_heads": TINY.heads,
        "num_key_value_heads": TINY.kv_heads, "vocab_size": VOCAB, "rms_norm_eps": 1e-6,
        "rope_theta": 10000.0, "tie_word_embeddings": false, "max_position_embeddings": 256,
        "bos_token_id": 1, "eos_token_id": 2
    })
}

/// The tiny model's tensors (Hugging Face names and shapes) for `arch`.
pub fn tensors(arch: &str) -> Vec<(String, Vec<usize>)> {
    let qkv_bias = arch == "Qwen2ForCausalLM";
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
        if arch == "Qwen3ForCausalLM" {
            v.push((p("self_attn.q_norm.weight"), vec![t.head_dim]));
            v.push((p("self_attn.k_norm.weight"), vec![t.head_dim]));
        }
        if qkv_bias {
            v.push((p("self_attn.q_proj.bias"), vec![qd]));
            v.push((p("self_attn.k_proj.bias"), vec![kd]));
            v.push((p("self_attn.v_proj.bias"), vec![kd]));
        }
    }
    v
}

/// Writes a model directory; `edit` may change the tensor list (name, shape, dtype).
pub fn write_model(
    name: &str,
    arch: &str,
    edit: impl FnOnce(&mut Vec<(String, Vec<usize>, safetensors::Dtype)>),
) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("kvsieve-test-{}-{name}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("config.json"), config(arch).to_string()).unwrap();
    std::fs::write(dir.join("tokenizer.json"), tokenizer_json().to_string()).unwrap();
    let mut list: Vec<(String, Vec<usize>, safetensors::Dtype)> = tensors(arch)
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

/// A SentencePiece vocabulary of `n` pieces: specials, 256 byte tokens, the
/// pieces of "hello world" with scores favouring whole words, filler.
pub fn spm_vocab(n: usize) -> (Vec<String>, Vec<f32>, Vec<i32>) {
    let mut t: Vec<(String, f32, i32)> = vec![
        ("<unk>".into(), 0.0, 2),
        ("<s>".into(), 0.0, 3),
        ("</s>".into(), 0.0, 3),
    ];
    t.extend((0..256).map(|b| (format!("<0x{b:02X}>"), 0.0, 6)));
    for (p, s) in [
        ("\u{2581}", -1.0),
        ("h", -2.0),
        ("e", -2.0),
        ("l", -2.0),
        ("o", -2.0),
        ("w", -2.0),
        ("r", -2.0),
        ("d", -2.0),
        ("\u{2581}h", -3.0),
        ("\u{2581}he", -4.0),
        ("ll", -3.5),
        ("llo", -5.0),
        ("\u{2581}hello", -6.0),
        ("\u{2581}w", -3.0),
        ("or", -3.0),
        ("ld", -3.0),
        ("\u{2581}wor", -7.0),
        ("\u{2581}world", -8.0),
    ] {
        t.push((p.into(), s, 1));
    }
    let mut i = 0;
    while t.len() < n {
        t.push((format!("\u{2581}filler{i}"), -50.0, 1));
        i += 1;
    }
    (
        t.iter().map(|x| x.0.clone()).collect(),
        t.iter().map(|x| x.1).collect(),
        t.iter().map(|x| x.2).collect(),
    )
}

/// A synthetic GGUF model (`llama`, `qwen2` or `qwen3`) whose matrices mix the
/// types a Q4_K_M file holds and the legacy ones: hidden 256, intermediate 512,
/// 2 layers, head dim 64, 300 tokens (a SentencePiece vocabulary when `spm`,
/// byte-level BPE otherwise). `edit` may add or change entries before writing.
pub fn gguf_model(arch: &str, spm: bool, edit: impl FnOnce(&mut GgufWriter)) -> Vec<u8> {
    let (hidden, inter, layers, heads, kv_heads, hd, vocab) =
        (256usize, 512usize, 2usize, 4usize, 2usize, 64usize, VOCAB);
    let mut w = GgufWriter::new();
    w.str("general.architecture", arch);
    let k = |s: &str| format!("{arch}.{s}");
    w.u32(&k("context_length"), 256);
    w.u32(&k("embedding_length"), hidden as u32);
    w.u32(&k("feed_forward_length"), inter as u32);
    w.u32(&k("block_count"), layers as u32);
    w.u32(&k("attention.head_count"), heads as u32);
    w.u32(&k("attention.head_count_kv"), kv_heads as u32);
    w.u32(&k("attention.key_length"), hd as u32);
    w.f32(&k("attention.layer_norm_rms_epsilon"), 1e-6);
    w.f32(&k("rope.freq_base"), 10000.0);
    w.u32(&k("vocab_size"), vocab as u32);
    let tok = tokenizer_json();
    let mut tokens: Vec<(u64, String)> = tok["model"]["vocab"]
        .as_object()
        .unwrap()
        .iter()
        .map(|(s, i)| (i.as_u64().unwrap(), s.clone()))
        .collect();
    tokens.sort();
    let tokens: Vec<String> = tokens.into_iter().map(|t| t.1).collect();
    let types: Vec<i32> = (0..tokens.len())
        .map(|i| if i < 3 { 3 } else { 1 })
        .collect();
    if spm {
        let (tokens, scores, types) = spm_vocab(vocab);
        w.str("tokenizer.ggml.model", "llama");
        w.strs("tokenizer.ggml.tokens", &tokens);
        w.f32s("tokenizer.ggml.scores", &scores);
        w.i32s("tokenizer.ggml.token_type", &types);
        w.u32("tokenizer.ggml.unknown_token_id", 0);
    } else {
        w.str("tokenizer.ggml.model", "gpt2");
        w.str("tokenizer.ggml.pre", "default");
        w.strs("tokenizer.ggml.tokens", &tokens);
        w.i32s("tokenizer.ggml.token_type", &types);
        w.strs("tokenizer.ggml.merges", &[]);
    }
    w.u32("tokenizer.ggml.bos_token_id", 1);
    w.u32("tokenizer.ggml.eos_token_id", 2);
    w.str(
        "tokenizer.chat_template",
        "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}",
    );
    let mut seed = 99u64;
    let mut t = |w: &mut GgufWriter, name: &str, shape: &[usize], ty: u32| {
        let n = shape.iter().product();
        let data = gguf_data(ty, n, &mut seed, name.contains("norm"));
        w.tensor(name, shape, ty, data);
    };
    // A Q8_0 embedding (tied: also the LM head) as the default model has; a
    // Q6_K output would be a separate tensor.
    t(&mut w, "token_embd.weight", &[vocab, hidden], Q8_0);
    t(&mut w, "output_norm.weight", &[hidden], F32);
    let (qd, kd) = (heads * hd, kv_heads * hd);
    for i in 0..layers {
        // Layer 0 as a Q4_K_M file (Q4_K, Q6_K for v and down, Q5_K for one);
        // layer 1 the legacy types.
        let ty = |k: u32, legacy: u32| if i == 0 { k } else { legacy };
        let p = |s: &str| format!("blk.{i}.{s}");
        t(&mut w, &p("attn_norm.weight"), &[hidden], F32);
        t(&mut w, &p("ffn_norm.weight"), &[hidden], F32);
        t(&mut w, &p("attn_q.weight"), &[qd, hidden], ty(Q4_K, Q4_0));
        t(&mut w, &p("attn_k.weight"), &[kd, hidden], ty(Q4_K, Q4_1));
        t(&mut w, &p("attn_v.weight"), &[kd, hidden], ty(Q6_K, Q5_0));
        t(
            &mut w,
            &p("attn_output.weight"),
            &[hidden, qd],
            ty(Q4_K, Q5_1),
        );
        t(
            &mut w,
            &p("ffn_gate.weight"),
            &[inter, hidden],
            ty(Q5_K, Q8_0),
        );
        t(
            &mut w,
            &p("ffn_up.weight"),
            &[inter, hidden],
            ty(Q4_K, Q4_1),
        );
        t(
            &mut w,
            &p("ffn_down.weight"),
            &[hidden, inter],
            ty(Q6_K, Q5_0),
        );
        if arch == "qwen3" {
            t(&mut w, &p("attn_q_norm.weight"), &[hd], F32);
            t(&mut w, &p("attn_k_norm.weight"), &[hd], F32);
        }
    }
    edit(&mut w);
    w.finish()
}

// Engines over the synthetic models, shared by the model tests.

pub fn load(dir: &Path, backend: Backend) -> kvsieve::Result<Engine> {
    Engine::load(
        dir,
        Options {
            backend,
            max_context: 128,
            ..Options::default()
        },
    )
}

pub fn load_with_context(dir: &Path, max_context: usize) -> kvsieve::Result<Engine> {
    let opts = Options {
        backend: Backend::Reference,
        max_context,
        ..Options::default()
    };
    Engine::load(dir, opts)
}

pub fn greedy(e: &mut Engine, prompt: &[u32], n: usize) -> Vec<u32> {
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

/// Top-k, nucleus and a repetition penalty: the sampled path's every kernel.
pub fn sampled_with_penalty() -> SamplingParams {
    SamplingParams {
        temperature: 0.8,
        top_k: 20,
        top_p: 0.9,
        repetition_penalty: 1.2,
        seed: 7,
    }
}

/// GGUF writer for synthetic models: metadata (strings, u32, f32, arrays of
/// strings or i32) and tensors (ggml dimension order), 32-byte aligned.
/// Writes a synthetic GGUF model (`llama` or `qwen3`) whose matrices mix the
/// types a Q4_K_M file holds (and the other legacy ones): hidden 256,
/// intermediate 512, 2 layers, head dim 64, 300 tokens.
pub fn write_gguf(name: &str, arch: &str, edit: impl FnOnce(&mut GgufWriter)) -> PathBuf {
    write_gguf_vocab(name, arch, false, edit)
}

/// [`write_gguf`] with a SentencePiece (`llama`) vocabulary when `spm`.
pub fn write_gguf_vocab(
    name: &str,
    arch: &str,
    spm: bool,
    edit: impl FnOnce(&mut GgufWriter),
) -> PathBuf {
    let path =
        std::env::temp_dir().join(format!("kvsieve-test-{}-{name}.gguf", std::process::id()));
    std::fs::write(&path, gguf_model(arch, spm, edit)).unwrap();
    path
}
