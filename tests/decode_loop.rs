//! The decode loop on small synthetic models: answers that stop at the end of
//! the context, are interrupted or hit a device error; steady steps create
//! nothing and take few dispatches; steps in flight match the one-step loop;
//! speculation state kept across engines; a recycling request's prompt fills
//! the Token Recycling matrix.

use kvsieve::generate::{Backend, Engine, GenerateParams, Message, Options};
use kvsieve::Error;

#[path = "common/synthetic.rs"]
mod synthetic;
use synthetic::*;

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
    // Without the penalty a sampled request keeps steps in flight.
    let mut in_flight = sampled.clone();
    in_flight.sampling.repetition_penalty = 1.0;
    for (params, ahead) in [
        (greedy.clone(), 1),
        (greedy, 2),
        (sampled, 1),
        (in_flight, 2),
    ] {
        e.set_decode_ahead(ahead).unwrap();
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

    // A new engine loads the kept matrix at its first speculative request
    // (prompt lookup here: a recycling request would also refill the
    // prompt's rows before drafting).
    let mut b = open();
    let lookup = GenerateParams {
        speculate: Speculate::Lookup,
        ..spec(TreeSize::Fixed(6))
    };
    drop(b.generate_ids(&prompt, &lookup).unwrap());
    assert_eq!(b.recycling_matrix().unwrap(), Some(learned));
    drop(b);

    // Damaged files are ignored: the engine starts empty and answers.
    for f in std::fs::read_dir(&state).unwrap() {
        let path = f.unwrap().path();
        let len = std::fs::metadata(&path).unwrap().len() as usize;
        std::fs::write(&path, vec![0xEEu8; len]).unwrap();
    }
    let mut c = open();
    drop(c.generate_ids(&prompt, &lookup).unwrap());
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

/// A recycling request's prompt fills the matrix rows of its tokens before
/// the first draft: each is the 8 likeliest successors after the token's last
/// occurrence, as the reference's logits there rank them. On both executors,
/// the prompt fed in chunks of 96 rows and the LM head run over blocks of 64.
#[test]
fn a_recycling_request_fills_the_matrix_from_its_prompt() {
    use kvsieve::speculative::{Speculate, TreeSize};
    let d = write_model("recycle-prompt", "LlamaForCausalLM", |_| {});
    let prompt: Vec<u32> = (0..100).map(|i| 3 + (i * 7 + i / 9) % 50).collect();
    let mut last: Vec<(u32, usize)> = Vec::new();
    for (i, &t) in prompt.iter().enumerate() {
        last.retain(|&(u, _)| u != t);
        last.push((t, i));
    }
    let mut r = load_with_context(&d, 256).unwrap();
    let want: Vec<Vec<f32>> = last
        .iter()
        .map(|&(_, i)| {
            r.prefill(&prompt[..=i]).unwrap();
            r.logits().unwrap()
        })
        .collect();
    for backend in [Backend::Reference, Backend::Gpu] {
        let state = std::env::temp_dir().join(format!(
            "kvsieve-recycle-{}-{backend:?}",
            std::process::id()
        ));
        let _ = std::fs::remove_dir_all(&state);
        let opts = Options {
            backend,
            max_context: 256,
            prefill_chunk: 96,
            state_dir: Some(state.clone()),
            ..Options::default()
        };
        let mut e = Engine::load(&d, opts).unwrap();
        let params = GenerateParams {
            max_tokens: 1,
            stop_at_eos: false,
            speculate: Speculate::Recycling,
            tree_size: TreeSize::Fixed(4),
            ..Default::default()
        };
        e.generate_ids(&prompt, &params)
            .unwrap()
            .for_each(|t| drop(t.unwrap()));
        let adj = e.recycling_matrix().unwrap().expect("a matrix");
        for (&(tok, i), logits) in last.iter().zip(&want) {
            let row = &adj[tok as usize * 8..][..8];
            let mut top = logits.clone();
            top.sort_by(|a, b| b.total_cmp(a));
            // The same 8, in order, up to float noise between executors and
            // between a chunk's rows and a row prefilled alone.
            for (k, &t) in row.iter().enumerate() {
                let v = logits[t as usize];
                assert!(
                    (v - top[k]).abs() <= 1e-3,
                    "{backend:?}: row of token {tok} (position {i}), rank {k}: logit {v}, want {}",
                    top[k]
                );
                assert!(!row[..k].contains(&t), "{backend:?}: {row:?} repeats {t}");
            }
        }
        let filled = adj.chunks(8).filter(|r| r.iter().any(|&t| t != 0)).count();
        assert_eq!(
            filled,
            last.len(),
            "{backend:?}: rows beyond the prompt's tokens"
        );
        drop(e);
        let _ = std::fs::remove_dir_all(&state);
    }
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

/// Decoding with steps in flight gives the one-step loop's tokens, stop
/// reason and cache (its tokens and the keys and values behind them): when the
/// answer runs to its token limit, when it is dropped part-way, when the
/// context fills, and when an end-of-sequence token lands at the start, in the
/// middle or at the end of the window; greedy and sampled (the device picks
/// with the sampler's draws, in the same order either way); on the GPU with
/// sparse attention.
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
    let sampling = kvsieve::SamplingParams {
        temperature: 1.5,
        top_k: 40,
        top_p: 0.95,
        seed: 11,
        ..Default::default()
    };
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
        for sampled in [false, true] {
            let limit = |max_tokens, stop_at_eos| GenerateParams {
                max_tokens,
                stop_at_eos,
                sampling: match sampled {
                    true => sampling.clone(),
                    false => Default::default(),
                },
                ..Default::default()
            };
            one.config.eos.clear();
            one.reset();
            let answer = outcome(&mut one, &prompt, &limit(24, false), usize::MAX).0;
            assert_eq!(answer == plain, !sampled, "{backend:?}: sampled {sampled}");
            // End-of-sequence tokens at their first place in the answer, at the
            // start and spread over the windows.
            let firsts: Vec<usize> = [0, 3, 5, 8, 13]
                .into_iter()
                .filter(|&i| !answer[..i].contains(&answer[i]))
                .collect();
            assert!(firsts.len() >= 3, "{backend:?}: answer {answer:?} repeats");
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
                    let eos: Vec<u32> = eos.map(|i| answer[i]).into_iter().collect();
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
                        "{backend:?}, sampled {sampled}, {ahead} ahead, eos {:?}, max {max}, take {take}",
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
}
