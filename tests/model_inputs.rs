//! Model loading on small synthetic checkpoints: every kind of bad input gets an
//! error that names the problem, and the Qwen2, Qwen3 and mixed-quant GGUF
//! variants give the same logits on both executors.

use kvsieve::generate::{Backend, Engine, GenerateParams, Options, SamplingParams};
use kvsieve::Error;
use std::path::Path;

#[path = "common/synthetic.rs"]
mod synthetic;
use synthetic::*;

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

    // Found by tests/fuzz.rs: sizes past any model were allocated from (2^41
    // layers aborted the process); an added token of 95 KB took minutes.
    let d = write_model("huge", "LlamaForCausalLM", |_| {});
    let mut cfg = config("LlamaForCausalLM");
    cfg["num_hidden_layers"] = (1u64 << 41).into();
    std::fs::write(d.join("config.json"), cfg.to_string()).unwrap();
    let e = err_text(load(&d, Backend::Reference));
    assert!(
        e.contains("config.json") && e.contains("num_hidden_layers"),
        "{e}"
    );
    let d = write_model("longtoken", "LlamaForCausalLM", |_| {});
    let mut tok = tokenizer_json();
    tok["added_tokens"][1]["content"] = "a".repeat(100_000).into();
    std::fs::write(d.join("tokenizer.json"), tok.to_string()).unwrap();
    let e = err_text(load(&d, Backend::Reference));
    assert!(
        e.contains("tokenizer.json") && e.contains("added token 1"),
        "{e}"
    );

    // A sharded checkpoint's index names files beside it, nothing else (an
    // absolute path or `..` could open any file, a FIFO too).
    for shard in [
        "/dev/stdin",
        "../model.safetensors",
        "sub/model.safetensors",
    ] {
        let d = write_model("index", "LlamaForCausalLM", |_| {});
        std::fs::remove_file(d.join("model.safetensors")).unwrap();
        let map: serde_json::Map<String, serde_json::Value> = tensors("LlamaForCausalLM")
            .into_iter()
            .map(|(n, _)| (n, shard.into()))
            .collect();
        std::fs::write(
            d.join("model.safetensors.index.json"),
            serde_json::json!({ "weight_map": map }).to_string(),
        )
        .unwrap();
        let e = err_text(load(&d, Backend::Reference));
        assert!(
            e.contains("index.json") && e.contains("not a file name"),
            "{shard}: {e}"
        );
    }
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
        sampling: sampled_with_penalty(),
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

/// Logits of prefixes of `prompt` agree across the executors.
fn logits_agree(cpu: &mut Engine, gpu: &mut Engine, prompt: &[u32], tol: f32) {
    for n in [1usize, 9, prompt.len()] {
        cpu.prefill(&prompt[..n]).unwrap();
        gpu.prefill(&prompt[..n]).unwrap();
        let (a, b) = (cpu.logits().unwrap(), gpu.logits().unwrap());
        let scale = a.iter().fold(1.0f32, |m, x| m.max(x.abs()));
        let worst = a
            .iter()
            .zip(&b)
            .map(|(x, y)| (x - y).abs())
            .fold(0.0f32, f32::max);
        assert!(
            worst < tol * scale,
            "prefix {n}: logits differ by {worst} (scale {scale})"
        );
    }
}

#[test]
fn qwen3_qk_norm_agrees_across_executors() {
    let d = write_model("qwen3", "Qwen3ForCausalLM", |_| {});
    let mut cpu = load(&d, Backend::Reference).unwrap();
    let mut gpu = load(&d, Backend::Gpu).unwrap();
    assert_eq!(cpu.config.arch_name(), "Qwen3ForCausalLM");
    let prompt: Vec<u32> = (0..70).map(|i| 3 + (i * 37) % 250).collect();
    logits_agree(&mut cpu, &mut gpu, &prompt, 1e-4);
    assert_eq!(greedy(&mut cpu, &prompt, 8), greedy(&mut gpu, &prompt, 8));
    // Missing per-head norms are named.
    let d = write_model("qwen3-nonorm", "Qwen3ForCausalLM", |l| {
        l.retain(|(n, _, _)| !n.ends_with("k_norm.weight"))
    });
    let e = err_text(load(&d, Backend::Reference));
    assert!(e.contains("k_norm"), "{e}");
}

#[test]
fn synthetic_gguf_models_agree_across_executors() {
    for arch in ["llama", "qwen3"] {
        let path = write_gguf(&format!("mixed-{arch}"), arch, |_| {});
        let mut cpu = load(&path, Backend::Reference).unwrap_or_else(|e| panic!("{arch}: {e}"));
        let mut gpu = load(&path, Backend::Gpu).unwrap();
        // Weights stay quantized: about the file's size, not 2 bytes a value.
        let file = std::fs::metadata(&path).unwrap().len();
        let (bytes, _) = gpu.weight_bytes();
        assert!(
            bytes <= file,
            "{arch}: {bytes} bytes of weights for a {file}-byte file"
        );
        let prompt: Vec<u32> = (0..40).map(|i| 3 + (i * 37) % 250).collect();
        logits_agree(&mut cpu, &mut gpu, &prompt, 1e-4);
        assert_eq!(
            greedy(&mut cpu, &prompt, 8),
            greedy(&mut gpu, &prompt, 8),
            "{arch}"
        );
        let chat = cpu
            .tokenizer
            .render_chat(&[kvsieve::generate::Message::new("user", "hi")], false)
            .unwrap();
        assert_eq!(chat, "<|im_start|>user\nhi<|im_end|>\n");
    }
}

#[test]
fn bad_gguf_files_get_named_errors() {
    let err = |path: &Path| err_text(load(path, Backend::Reference));
    let ok = write_gguf("bad-ok", "llama", |_| {});
    let bytes = std::fs::read(&ok).unwrap();
    let at = |name: &str, b: Vec<u8>| {
        let p =
            std::env::temp_dir().join(format!("kvsieve-test-{}-{name}.gguf", std::process::id()));
        std::fs::write(&p, b).unwrap();
        p
    };
    // Bad magic, bad version, a truncated header, data running past the end.
    let mut b = bytes.clone();
    b[0] = b'X';
    assert!(err(&at("magic", b)).contains("magic"));
    let mut b = bytes.clone();
    b[4] = 9;
    assert!(err(&at("version", b)).contains("version 9"));
    assert!(err(&at("header", bytes[..200].to_vec())).contains("truncated"));
    let e = err(&at("data", bytes[..bytes.len() - 4096].to_vec()));
    assert!(e.contains("past the end"), "{e}");
    // A tensor count far larger than the file.
    let mut b = bytes.clone();
    b[8..16].copy_from_slice(&u64::MAX.to_le_bytes());
    let e = err(&at("count", b));
    assert!(
        e.contains("truncated") || e.contains("malformed GGUF"),
        "{e}"
    );
    // An architecture that is not supported, named.
    let gpt2 = write_gguf("bad-arch", "gpt2", |_| {});
    let e = err(&gpt2);
    assert!(e.contains("\"gpt2\"") && e.contains("not supported"), "{e}");
    // An unsupported tensor type, naming the tensor and the type.
    let p = write_gguf("bad-type", "llama", |w| {
        let t = w
            .tensors
            .iter_mut()
            .find(|t| t.0 == "blk.1.attn_q.weight")
            .unwrap();
        t.2 = 9; // Q8_1
    });
    let e = err(&p);
    assert!(
        e.contains("blk.1.attn_q.weight") && e.contains("type 9"),
        "{e}"
    );
    // A shape that disagrees with the metadata.
    let p = write_gguf("bad-shape", "llama", |w| {
        let t = w
            .tensors
            .iter_mut()
            .find(|t| t.0 == "blk.0.ffn_up.weight")
            .unwrap();
        t.1 = vec![256, 256];
        t.3.truncate(t.3.len() / 2);
    });
    let e = err(&p);
    assert!(
        e.contains("mlp.up_proj.weight") && e.contains("shape"),
        "{e}"
    );
}

#[test]
fn sentencepiece_vocabulary_from_gguf() {
    let path = write_gguf_vocab("spm", "llama", true, |_| {});
    let e = load(&path, Backend::Reference).unwrap();
    let (tokens, _, _) = spm_vocab(VOCAB);
    let id = |p: &str| tokens.iter().position(|t| t == p).unwrap() as u32;
    let t = &e.tokenizer;
    // Whole words merge by score; a space prefix is added, as SentencePiece does.
    assert_eq!(
        t.encode("hello world").unwrap(),
        [id("\u{2581}hello"), id("\u{2581}world")]
    );
    assert_eq!(
        t.decode(&t.encode("hello world").unwrap()).unwrap(),
        "hello world"
    );
    // Characters outside the vocabulary fall back to their UTF-8 bytes.
    let ids = t.encode("h\u{e9}").unwrap();
    assert_eq!(ids, [id("\u{2581}h"), id("<0xC3>"), id("<0xA9>")]);
    assert_eq!(t.decode(&ids).unwrap(), "h\u{e9}");
    // Control tokens in the text are recognised.
    assert_eq!(t.encode("<s>").unwrap()[0], id("<s>"));
}

/// A load that cannot fit the adapter's (or for the reference, the
/// machine's) memory fails before allocating, with both sizes: a model
/// directory whose one safetensors file holds a 64 GiB f32 embedding (a
/// sparse file, nothing written). The check reads the headers only.
#[test]
fn a_model_that_does_not_fit_fails_before_loading() {
    let d = write_model("nofit", "LlamaForCausalLM", |_| {});
    let cfg = d.join("config.json");
    let mut c: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&cfg).unwrap()).unwrap();
    c["vocab_size"] = (1 << 22).into();
    c["hidden_size"] = 4096.into();
    std::fs::write(&cfg, c.to_string()).unwrap();
    let bytes: u64 = (1 << 22) * 4096 * 4;
    let header = serde_json::json!({"model.embed_tokens.weight": {
        "dtype": "F32", "shape": [1 << 22, 4096], "data_offsets": [0, bytes]}})
    .to_string();
    let mut head = (header.len() as u64).to_le_bytes().to_vec();
    head.extend_from_slice(header.as_bytes());
    let path = d.join("model.safetensors");
    std::fs::write(&path, &head).unwrap();
    let f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
    f.set_len(head.len() as u64 + bytes).unwrap();
    drop(f);
    for backend in [Backend::Reference, Backend::Gpu] {
        let ctx = kvsieve::gpu::GpuContext::new().unwrap();
        let cpu_driver = ctx.info.device_type == wgpu::DeviceType::Cpu;
        if backend == Backend::Gpu && ctx.memory_bytes().is_none() && !cpu_driver {
            eprintln!("{}: the adapter does not report its memory", ctx.info.name);
            continue;
        }
        let opts = Options {
            backend,
            ..Options::default()
        };
        match Engine::load(&d, opts) {
            Err(Error::OutOfMemory(msg)) => {
                eprintln!("{backend:?}: {msg}");
                // 2^34 values: 64 GiB in f32 on the reference, 32 GiB in f16 on the GPU.
                let w = if backend == Backend::Gpu {
                    32768
                } else {
                    65536
                };
                assert!(msg.contains(&format!("({w} MiB of weights")), "{msg}");
                assert!(
                    msg.contains("MiB of KV cache for its first 2048 tokens"),
                    "{msg}"
                );
            }
            Err(e) => panic!("{backend:?}: expected OutOfMemory, got {e}"),
            Ok(_) => panic!("{backend:?}: a 64 GiB model loaded"),
        }
    }
    let r = load_with_context(&d, (1 << 24) + 1);
    assert!(
        err_text(r).contains("max_context 16777217: at most 16777216"),
        "past the largest context"
    );
    let _ = std::fs::remove_file(&path);
}
