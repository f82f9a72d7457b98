//! Model loading on small synthetic checkpoints: every kind of bad input gets an
//! error that names the problem, and a Qwen2-style model (q/k/v biases, untied
//! head) gives the same logits on both executors.

use kvsieve::generate::{Backend, Engine, GenerateParams, Message, Options, SamplingParams};
use kvsieve::Error;
use std::path::{Path, PathBuf};

#[path = "common/synthetic.rs"]
mod synthetic;
use synthetic::*;

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

/// Top-k, nucleus and a repetition penalty: the sampled path's every kernel.
fn sampled_with_penalty() -> SamplingParams {
    SamplingParams {
        temperature: 0.8,
        top_k: 20,
        top_p: 0.9,
        repetition_penalty: 1.2,
        seed: 7,
    }
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

/// GGUF writer for synthetic models: metadata (strings, u32, f32, arrays of
/// strings or i32) and tensors (ggml dimension order), 32-byte aligned.
/// Writes a synthetic GGUF model (`llama` or `qwen3`) whose matrices mix the
/// types a Q4_K_M file holds (and the other legacy ones): hidden 256,
/// intermediate 512, 2 layers, head dim 64, 300 tokens.
fn write_gguf(name: &str, arch: &str, edit: impl FnOnce(&mut GgufWriter)) -> PathBuf {
    write_gguf_vocab(name, arch, false, edit)
}

/// [`write_gguf`] with a SentencePiece (`llama`) vocabulary when `spm`.
fn write_gguf_vocab(
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

#[test]
fn an_answer_stops_cleanly_at_the_end_of_the_context() {
    // 128 tokens of context: a 100-token prompt leaves room to feed 28 more,
    // so 29 tokens come out (the last is sampled, never fed), then the stop.
    let d = write_model("ctxfull", "LlamaForCausalLM", |_| {});
    let mut e = load(&d, Backend::Reference).unwrap();
    assert_eq!(e.max_context(), 128);
    let prompt: Vec<u32> = (0..100).map(|i| 3 + (i * 7) % 250).collect();
    let params = GenerateParams {
        max_tokens: 1000,
        stop_at_eos: false,
        ..Default::default()
    };
    let mut g = e.generate_ids(&prompt, &params).unwrap();
    let out: Vec<u32> = g.by_ref().map(|t| t.unwrap().id).collect();
    assert_eq!(out.len(), 29);
    assert_eq!(g.stop_reason(), Some(kvsieve::StopReason::ContextFull));
    drop(g);
    // The engine goes on: a shorter prompt reuses what it can and answers.
    assert_eq!(greedy(&mut e, &prompt[..50], 5).len(), 5);
}

#[test]
fn an_interrupted_answer_leaves_an_engine_that_answers_as_a_fresh_one() {
    // Stopping the iteration is how an answer is interrupted (the chat
    // example's Ctrl-C); the next message must get exactly the answer a
    // freshly loaded engine gives to the same conversation.
    let path = write_gguf("interrupt", "llama", |_| {});
    let params = GenerateParams {
        max_tokens: 12,
        stop_at_eos: false,
        ..Default::default()
    };
    let answer = |e: &mut Engine, msgs: &[Message]| -> (Vec<u32>, String) {
        let mut g = e.chat(msgs, &params).unwrap();
        let toks: Vec<kvsieve::Token> = g.by_ref().map(|t| t.unwrap()).collect();
        (
            toks.iter().map(|t| t.id).collect(),
            toks.iter().map(|t| t.text.as_str()).collect(),
        )
    };
    let mut e = load(&path, Backend::Reference).unwrap();
    let mut msgs = vec![Message::new("user", "hello world")];
    let partial: String = e
        .chat(&msgs, &params)
        .unwrap()
        .take(3)
        .map(|t| t.unwrap().text)
        .collect();
    msgs.push(Message::new("assistant", &partial));
    msgs.push(Message::new("user", "hello again"));
    let after_interrupt = answer(&mut e, &msgs);
    let mut fresh = load(&path, Backend::Reference).unwrap();
    assert_eq!(after_interrupt, answer(&mut fresh, &msgs));
}

/// A device error in the middle of an answer (the test hook makes a submit
/// carry a command wgpu's validation rejects) comes back from the call that
/// caused it; the engine drops its cache and answers the next request as a
/// fresh one does. After the device is lost, every call says so: no panic,
/// no hang.
#[test]
fn device_errors_are_typed_and_the_engine_recovers_or_says_it_cannot() {
    use std::sync::Arc;
    let d = write_model("deverr", "LlamaForCausalLM", |_| {});
    let ctx = Arc::new(kvsieve::gpu::GpuContext::new().unwrap());
    let opts = Options {
        backend: Backend::Gpu,
        max_context: 128,
        device: Some(ctx.clone()),
        ..Options::default()
    };
    let mut e = Engine::load(&d, opts).unwrap();
    let prompt: Vec<u32> = (0..20).map(|i| 3 + (i * 11) % 250).collect();
    let want = greedy(&mut e, &prompt, 8);

    // Mid-answer: the next step's submit fails (one step at a time, and with
    // steps in flight, where it is a submit not waited for).
    let params = GenerateParams {
        max_tokens: 8,
        stop_at_eos: false,
        ..Default::default()
    };
    for ahead in [1, 2] {
        e.set_decode_ahead(ahead).unwrap();
        let mut g = e.generate_ids(&prompt, &params).unwrap();
        let first: Vec<u32> = g.by_ref().take(3).map(|t| t.unwrap().id).collect();
        assert_eq!(first, want[..3]);
        ctx.poison_next_submit();
        match g.next() {
            Some(Err(Error::Gpu(msg))) => assert!(msg.contains("validation"), "{msg}"),
            other => panic!("{ahead} ahead: expected a validation error, got {other:?}"),
        }
        assert_eq!(g.stop_reason(), Some(kvsieve::StopReason::Error));
        assert!(g.next().is_none());
        drop(g);
        assert!(e.cached_tokens().is_empty(), "the cache was not dropped");
        assert_eq!(greedy(&mut e, &prompt, 8), want, "after a device error");
    }
    e.set_decode_ahead(0).unwrap();

    // In the prefill's submit (recorded by generate_ids, submitted with the
    // first token's readback).
    e.reset();
    ctx.poison_next_submit();
    let r: kvsieve::Result<Vec<u32>> = e
        .generate_ids(&prompt, &params)
        .and_then(|g| g.map(|t| t.map(|t| t.id)).collect());
    assert!(matches!(r, Err(Error::Gpu(_))), "{r:?}");
    assert_eq!(greedy(&mut e, &prompt, 8), want, "after a failed prefill");

    // A second session on the same device is untouched by the first's error.
    let mut other = e.session().unwrap();
    ctx.poison_next_submit();
    let r: kvsieve::Result<Vec<u32>> = e
        .generate_ids(&prompt, &params)
        .and_then(|g| g.map(|t| t.map(|t| t.id)).collect());
    assert!(r.is_err());
    assert_eq!(greedy(&mut other, &prompt, 8), want);

    // The device lost: this call and every later one say so.
    ctx.device.destroy();
    for _ in 0..2 {
        match e.generate_ids(&prompt, &params) {
            Err(Error::DeviceLost(msg)) => assert!(msg.contains("load the model again"), "{msg}"),
            other => panic!("expected DeviceLost, got {:?}", other.err()),
        }
    }
    assert!(matches!(
        other.generate_ids(&prompt, &params),
        Err(Error::DeviceLost(_))
    ));
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

fn load_with_context(dir: &Path, max_context: usize) -> kvsieve::Result<Engine> {
    let opts = Options {
        backend: Backend::Reference,
        max_context,
        ..Options::default()
    };
    Engine::load(dir, opts)
}

/// Decode tokens of `prompt` (cached already) and what the device created meanwhile.
fn decode_creations(e: &mut Engine, prompt: &[u32], params: &GenerateParams) -> (u64, u64) {
    let c0 = e.counters();
    e.generate_ids(prompt, params).unwrap().for_each(|t| {
        t.unwrap();
    });
    let c1 = e.counters();
    (c1.buffers - c0.buffers, c1.bind_groups - c0.bind_groups)
}

#[test]
fn steady_decode_creates_no_buffers_or_bind_groups() {
    let d = write_model("steady", "LlamaForCausalLM", |_| {});
    let mut e = load(&d, Backend::Gpu).unwrap();
    // Past 64 tokens, so the CPU drivers' attention has several splits
    // throughout (one split stores its output itself, a kernel of its own).
    let prompt: Vec<u32> = (0..70).map(|i| 3 + (i * 37) % 250).collect();
    let greedy = GenerateParams {
        max_tokens: 4,
        stop_at_eos: false,
        ..Default::default()
    };
    let sampled = GenerateParams {
        sampling: sampled_with_penalty(),
        ..greedy.clone()
    };
    for params in [greedy, sampled] {
        let long_params = GenerateParams {
            max_tokens: 40,
            ..params.clone()
        };
        // Warm: pipelines, workspaces and bind groups of this kind of step,
        // from an empty cache and from the cached prompt (whose last token
        // reruns as a one-row step).
        decode_creations(&mut e, &prompt, &params);
        decode_creations(&mut e, &prompt, &params);
        let short = decode_creations(&mut e, &prompt, &params);
        let long = decode_creations(&mut e, &prompt, &long_params);
        // 36 more decode steps created nothing more than 4 did.
        assert_eq!(
            long, short,
            "(buffers, bind groups) created: 40 steps against 4"
        );
        assert_eq!(
            short,
            (0, 0),
            "a repeated request created buffers or bind groups"
        );
    }
}

/// Dispatches of a decode step at a short context (one attention split): at
/// most 8 a layer (the two RMSNorms, q/k/v stacked, the KV append with the
/// queries' RoPE, attention storing its output itself, o_proj with the
/// residual add, gate/up with SwiGLU, down_proj with the add; 6 with the GPU
/// tuning, whose matmuls fold the norms), plus the embedding, the final norm,
/// the LM head and the argmax.
#[test]
fn a_short_decode_step_takes_at_most_8_dispatches_a_layer() {
    let d = write_model("dispatches", "LlamaForCausalLM", |_| {});
    let mut e = load(&d, Backend::Gpu).unwrap();
    let prompt: Vec<u32> = (0..20).map(|i| 3 + (i * 37) % 250).collect();
    let run = |e: &mut Engine, n: usize| {
        let params = GenerateParams {
            max_tokens: n,
            stop_at_eos: false,
            ..Default::default()
        };
        let c0 = e.counters();
        e.generate_ids(&prompt, &params).unwrap().for_each(|t| {
            t.unwrap();
        });
        e.counters().dispatches - c0.dispatches
    };
    run(&mut e, 2);
    // The prompt is cached after the first run: the two runs differ by 8
    // decode steps.
    let per_token = (run(&mut e, 10) - run(&mut e, 2)) as f64 / 8.0;
    let layers = e.config.layers as f64;
    assert!(
        per_token <= 8.0 * layers + 4.0,
        "{per_token} dispatches a decode step for {layers} layers"
    );
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

#[test]
fn speculation_state_is_kept_across_engines_and_bad_files_are_ignored() {
    use kvsieve::speculative::{Speculate, TreeSize};
    let d = write_model("spec-state", "LlamaForCausalLM", |_| {});
    let state = std::env::temp_dir().join(format!("kvsieve-state-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&state);
    let open = || {
        Engine::load(
            &d,
            Options {
                backend: Backend::Reference,
                max_context: 256,
                state_dir: Some(state.clone()),
                ..Options::default()
            },
        )
        .unwrap()
    };
    let spec = |tree_size| GenerateParams {
        max_tokens: 24,
        stop_at_eos: false,
        speculate: Speculate::Recycling,
        tree_size,
        ..Default::default()
    };
    let prompt: Vec<u32> = (0..40).map(|i| 3 + (i * 7) % 60).collect();
    let plain = greedy(&mut open(), &prompt, 24);

    let mut a = open();
    assert_eq!(a.recycling_matrix().unwrap(), None);
    let out: Vec<u32> = a
        .generate_ids(&prompt, &spec(TreeSize::Auto))
        .unwrap()
        .map(|t| t.unwrap().id)
        .collect();
    assert_eq!(out, plain, "speculation changed greedy output");
    a.generate_ids(&prompt, &spec(TreeSize::Fixed(6)))
        .unwrap()
        .for_each(|t| drop(t.unwrap()));
    let learned = a.recycling_matrix().unwrap().expect("a matrix");
    assert!(learned.iter().any(|&t| t != 0), "nothing learned");
    drop(a); // keeps the matrix
    let files: Vec<String> = std::fs::read_dir(&state)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert!(
        files.iter().any(|f| f.ends_with("-token-recycling.bin")),
        "{files:?}"
    );
    assert!(
        files.iter().any(|f| f.contains("-verify-costs-")),
        "{files:?}"
    );

    // A new engine drafts from the kept matrix from its first request.
    let mut b = open();
    drop(b.generate_ids(&prompt, &spec(TreeSize::Fixed(6))).unwrap());
    assert_eq!(b.recycling_matrix().unwrap(), Some(learned));
    drop(b);

    // Damaged files are ignored: the engine starts empty and answers.
    for f in std::fs::read_dir(&state).unwrap() {
        let path = f.unwrap().path();
        let len = std::fs::metadata(&path).unwrap().len() as usize;
        std::fs::write(&path, vec![0xEEu8; len]).unwrap();
    }
    let mut c = open();
    drop(c.generate_ids(&prompt, &spec(TreeSize::Fixed(6))).unwrap());
    assert_eq!(
        c.recycling_matrix().unwrap(),
        None,
        "a damaged matrix was loaded"
    );
    let out: Vec<u32> = c
        .generate_ids(&prompt, &spec(TreeSize::Auto))
        .unwrap()
        .map(|t| t.unwrap().id)
        .collect();
    assert_eq!(out, plain);
    drop(c);
    let _ = std::fs::remove_dir_all(&state);
}

/// A request's tokens and stop reason, then the cache it leaves: its tokens,
/// and the logits of a token fed after all but the last of them (which read
/// every key and value the request wrote).
type Outcome = (Vec<u32>, Option<kvsieve::StopReason>, Vec<u32>, Vec<f32>);

fn outcome(e: &mut Engine, prompt: &[u32], params: &GenerateParams, take: usize) -> Outcome {
    let mut g = e.generate_ids(prompt, params).unwrap();
    let toks: Vec<u32> = g.by_ref().take(take).map(|t| t.unwrap().id).collect();
    let stop = g.stop_reason();
    drop(g);
    let cached = e.cached_tokens().to_vec();
    let mut next = cached[..cached.len() - 1].to_vec();
    next.push(5);
    e.prefill(&next).unwrap();
    (toks, stop, cached, e.logits().unwrap())
}

/// Greedy decoding with steps in flight gives the one-step loop's tokens, stop
/// reason and cache (its tokens and the keys and values behind them): when the
/// answer runs to its token limit, when it is dropped part-way, when the
/// context fills, and when an end-of-sequence token lands at the start, in the
/// middle or at the end of the window; on the GPU with sparse attention.
#[test]
fn decode_ahead_matches_the_one_step_loop() {
    // Mixed quantized types; this prompt's answer does not repeat at once.
    let d = write_gguf("ahead", "llama", |_| {});
    let prompt: Vec<u32> = (0..40).map(|i| 3 + (i * 37) % 250).collect();
    let long: Vec<u32> = (0..100).map(|i| 3 + (i * 7) % 250).collect();
    // TokenSelect selects past 28 tokens: its Selection Cache and
    // selections run inside the steps in flight.
    let sparse = kvsieve::AttentionPolicy::TokenSelect(kvsieve::TokenSelectConfig {
        k: 8,
        n_init: 4,
        n_local: 16,
        ..Default::default()
    });
    let runs = [
        (Backend::Gpu, sparse),
        (Backend::Reference, Default::default()),
    ];
    for (backend, policy) in runs {
        let engine = |ahead| {
            let opts = Options {
                backend,
                max_context: 128,
                decode_ahead: ahead,
                policy,
                ..Options::default()
            };
            Engine::load(&d, opts).unwrap()
        };
        let mut one = engine(1);
        let plain = greedy(&mut one, &prompt, 24);
        // End-of-sequence tokens at their first place in the answer, at the
        // start and spread over the windows.
        let firsts: Vec<usize> = [0, 3, 5, 8, 13]
            .into_iter()
            .filter(|&i| !plain[..i].contains(&plain[i]))
            .collect();
        assert!(firsts.len() >= 3, "{backend:?}: answer {plain:?} repeats");
        let limit = |max_tokens, stop_at_eos| GenerateParams {
            max_tokens,
            stop_at_eos,
            ..Default::default()
        };
        // (eos position, prompt, max tokens, tokens taken)
        let mut cases = vec![
            (None, &prompt, 24, usize::MAX),
            (None, &prompt, 1, usize::MAX),
            (None, &prompt, 24, 5),
            (None, &long, 1000, usize::MAX),
        ];
        for &i in &firsts {
            cases.push((Some(i), &prompt, 24, usize::MAX));
        }
        for ahead in [2, 3, 8] {
            let mut e = engine(ahead);
            for &(eos, p, max, take) in &cases {
                let eos: Vec<u32> = eos.map(|i| plain[i]).into_iter().collect();
                let params = limit(max, !eos.is_empty());
                one.config.eos = eos.clone();
                e.config.eos = eos;
                // The same history: a prompt's last token computed by a
                // prefill or by a one-row step differs in rounding.
                one.reset();
                e.reset();
                let want = outcome(&mut one, p, &params, take);
                let got = outcome(&mut e, p, &params, take);
                assert_eq!(
                    (&got.0, got.1, &got.2),
                    (&want.0, want.1, &want.2),
                    "{backend:?}, {ahead} ahead, eos {:?}, max {max}, take {take}",
                    e.config.eos
                );
                let worst = (got.3.iter().zip(&want.3))
                    .map(|(a, b)| (a - b).abs())
                    .fold(0.0f32, f32::max);
                assert!(
                    worst <= 1e-6,
                    "{backend:?}, {ahead} ahead: logits differ by {worst}"
                );
            }
        }
    }
}
