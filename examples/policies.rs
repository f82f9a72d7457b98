//! One comparison of the attention policies at equal token budgets (about 2K
//! tokens each), printed as a Markdown table and written as JSON (one object
//! per policy):
//! - passkey accuracy at each `--lens` over `--depths` and `--fillers`
//!   (reference executor);
//! - teacher-forced next-token agreement with dense over `--positions`
//!   positions ending at `--agreement-len` tokens of the project's design
//!   documents (reference executor);
//! - decode attention per layer-step averaged over the default model's layers
//!   on a synthetic cache (every layer's real policy code: Quest's and Tidal's
//!   dense layers, TokenSelect selecting in every layer, its Selection Cache
//!   off), as a speedup over dense, at each `--kernel-lens` (GPU executor,
//!   GPU timestamps where the adapter has them);
//! - end to end at each `--decode-context` length (executor `--e2e-backend`):
//!   one passkey prompt of that length (key at `--e2e-depth`), prefill
//!   tokens/s, greedy decode tokens/s over `--decode-tokens` tokens, the
//!   Selection Cache's hit rate, and whether the answer holds the key. On a
//!   CPU Vulkan driver the 16K-token prefill alone takes the better part of an
//!   hour per policy (about 4 TFLOP at lavapipe's ~1.5 GFLOP/s): there pass
//!   `--e2e-backend reference`, or `--decode-context 0` to leave it out.
//!
//! ```text
//! cargo run --release --example policies -- --json policies.json
//! cargo run --release --example policies -- --skip-quality --kernel-lens 0 \
//!     --decode-context 16384,32768 --e2e-backend reference
//! ```

use clap::Parser;
use kvsieve::attention::{
    Attention, AttentionPolicy, KvLayout, LayerInput, PageAllocator, QuestConfig, TidalConfig,
    TokenSelectConfig,
};
use kvsieve::eval::{
    agreement, first_integer, passkey_prompt, passkey_trial, teacher_forced_argmaxes, Filler,
};
use kvsieve::generate::{Backend, Engine, GenerateParams, Options};
use kvsieve::kernels::GpuExecutor;
use kvsieve::model::ModelConfig;
use kvsieve::ops::prelude::*;
use kvsieve::ops::RopeConfig;
use serde::Serialize;
use std::path::PathBuf;
use std::time::{Duration, Instant};

type R<T> = std::result::Result<T, Box<dyn std::error::Error>>;

#[derive(Parser, Debug)]
#[command(
    about = "Compare the attention policies: passkey, agreement, kernel speedup, decode tok/s"
)]
struct Args {
    /// Write the results here as JSON.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Passkey prompt lengths (reference executor).
    #[arg(long, value_delimiter = ',', default_value = "4096,8000")]
    lens: Vec<usize>,
    /// Passkey depths (share of the filler before the key).
    #[arg(long, value_delimiter = ',', default_value = "0.9,0.6,0.3")]
    depths: Vec<f64>,
    /// Passkey haystacks: `repeat` (the classic five sentences), `varied`
    /// (sentences from word lists, no repeats, no digits), `docs` (the
    /// project's design notes, tests/fixtures/design.md, with numbers in them).
    #[arg(long, value_delimiter = ',', default_value = "repeat")]
    fillers: Vec<String>,
    /// Teacher-forced positions compared with dense.
    #[arg(long, default_value_t = 200)]
    positions: usize,
    /// Tokens of text the agreement runs over (positions end here; 0 skips
    /// the agreement column).
    #[arg(long, default_value_t = 4000)]
    agreement_len: usize,
    /// Context lengths of the decode-attention timing (GPU executor; 0 skips it).
    #[arg(long, value_delimiter = ',', default_value = "32768,131072")]
    kernel_lens: Vec<usize>,
    /// Timed decode steps per policy and length (after one untimed step).
    #[arg(long, default_value_t = 3)]
    kernel_steps: usize,
    /// Prompt lengths of the end-to-end measurement (0 skips it).
    #[arg(long, value_delimiter = ',', default_value = "16384")]
    decode_context: Vec<usize>,
    /// Tokens decoded in the end-to-end measurement (at least 7: the answer).
    #[arg(long, default_value_t = 8)]
    decode_tokens: usize,
    /// Executor of the end-to-end measurement: gpu or reference.
    #[arg(long, default_value = "gpu")]
    e2e_backend: Backend,
    /// Depth of the end-to-end prompt's key.
    #[arg(long, default_value_t = 0.5)]
    e2e_depth: f64,
    /// Skip the reference-executor columns (passkey, agreement).
    #[arg(long)]
    skip_quality: bool,
    /// Run only these policies (by row label, e.g. `dense,Quest`); dense
    /// runs too where a column needs its baseline (agreement, kernel speedup).
    #[arg(long, value_delimiter = ',')]
    only: Vec<String>,
}

#[derive(Serialize, Default)]
struct Row {
    policy: String,
    config: String,
    /// Per length and filler: keys found of trials (reference executor).
    passkey: Vec<PasskeyCell>,
    /// Next-token agreement with dense (reference executor).
    agreement: Option<f64>,
    /// Per context length: mean decode attention ms per layer-step and the
    /// speedup over dense (GPU executor).
    kernel: Vec<(usize, f64, f64)>,
    /// End to end, per `decode_context` length.
    e2e: Vec<EndToEnd>,
}

#[derive(Serialize, Clone)]
struct PasskeyCell {
    len: usize,
    filler: String,
    found: usize,
    trials: usize,
}

/// One passkey prompt run end to end.
#[derive(Serialize, Clone)]
struct EndToEnd {
    context: usize,
    prefill_tps: f64,
    decode_tps: f64,
    /// Selection Cache hits over sparse decode layer-steps (sparse policies).
    cache_hit_rate: Option<f64>,
    passkey_found: bool,
    answer: String,
}

#[derive(Serialize)]
struct Report {
    reference_executor: String,
    gpu_executor: String,
    e2e_executor: String,
    decode_context: Vec<usize>,
    rows: Vec<Row>,
}

fn policies() -> Vec<(&'static str, AttentionPolicy)> {
    let ts = TokenSelectConfig::default();
    vec![
        ("dense", AttentionPolicy::Dense),
        ("TokenSelect exact", AttentionPolicy::TokenSelect(ts)),
        (
            "TokenSelect hierarchical",
            AttentionPolicy::TokenSelect(TokenSelectConfig {
                prefilter_blocks: 256,
                ..ts
            }),
        ),
        ("Quest", AttentionPolicy::Quest(QuestConfig::default())),
        (
            "Quest blocks of 32",
            AttentionPolicy::Quest(QuestConfig {
                block: 32,
                ..Default::default()
            }),
        ),
        ("Tidal", AttentionPolicy::Tidal(TidalConfig::default())),
        (
            "Tidal re-selection 14",
            AttentionPolicy::Tidal(TidalConfig {
                reselection_layer: 14,
                ..Default::default()
            }),
        ),
    ]
}

fn describe(p: &AttentionPolicy) -> String {
    match p {
        AttentionPolicy::Dense => "all tokens".into(),
        AttentionPolicy::TokenSelect(c) if c.prefilter_blocks > 0 => format!(
            "k {} + {} sinks + {} window, {:?} positions; {} blocks of {}",
            c.k, c.n_init, c.n_local, c.positions, c.prefilter_blocks, c.prefilter_block
        ),
        AttentionPolicy::TokenSelect(c) => format!(
            "k {} + {} sinks + {} window, {:?} positions",
            c.k, c.n_init, c.n_local, c.positions
        ),
        AttentionPolicy::Quest(c) => format!(
            "budget {}, blocks of {}, {} dense layers{}",
            c.budget,
            c.block,
            c.dense_layers,
            if c.prefill_subchunk > 0 {
                format!(", sparse prefill per {}", c.prefill_subchunk)
            } else {
                String::new()
            }
        ),
        AttentionPolicy::Tidal(c) => format!(
            "budget {}, selection layer {}, re-selection layer {}",
            c.budget, c.selection_layer, c.reselection_layer
        ),
    }
}

fn text() -> String {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
    ["design.md", "algorithms.md"]
        .iter()
        .map(|f| std::fs::read_to_string(dir.join(f)).unwrap_or_default())
        .collect::<Vec<_>>()
        .join("\n\n")
}

/// The filler named on the command line.
fn filler(name: &str) -> kvsieve::Result<Filler> {
    if name != "docs" {
        return Filler::named(name);
    }
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/design.md");
    let text = std::fs::read_to_string(&path)
        .map_err(|e| kvsieve::Error::InvalidOption(format!("{}: {e}", path.display())))?;
    Ok(Filler::Text(text))
}

/// `len` tokens of the fixture text, repeated as needed.
fn text_ids(e: &Engine, len: usize) -> kvsieve::Result<Vec<u32>> {
    let once = e.tokenizer.encode(&text())?;
    if once.is_empty() {
        return Err(kvsieve::Error::InvalidOption(
            "tests/fixtures text is missing".into(),
        ));
    }
    Ok(once.iter().copied().cycle().take(len).collect())
}

fn passkey_key(len: usize, depth: f64) -> u32 {
    10007 + (len as u32 * 7 + (depth * 100.0) as u32 * 131) % 89989
}

/// Passkey and agreement columns on the reference executor.
fn quality(args: &Args, rows: &mut [Row], pols: &[(&str, AttentionPolicy)]) -> R<String> {
    let max = args
        .lens
        .iter()
        .copied()
        .max()
        .unwrap_or(0)
        .max(args.agreement_len);
    let opts = Options {
        backend: Backend::Reference,
        max_context: max + 16,
        ..Options::default()
    };
    let mut e = Engine::load_default(opts)?;
    let name = e.backend_name();
    let fillers = args
        .fillers
        .iter()
        .map(|n| Ok((n.clone(), filler(n)?)))
        .collect::<kvsieve::Result<Vec<_>>>()?;
    let ids = text_ids(&e, args.agreement_len.max(1))?;
    let from = args.agreement_len.saturating_sub(args.positions).max(1);
    let mut dense = Vec::new();
    // Latest key first: prompts share their tokens up to the earlier key.
    let mut depths = args.depths.clone();
    depths.sort_by(|a, b| b.total_cmp(a));
    for (row, (label, policy)) in rows.iter_mut().zip(pols) {
        e.set_policy(*policy)?;
        for &len in &lengths(&args.lens) {
            for (fname, f) in &fillers {
                let mut found = 0;
                for &depth in &depths {
                    let key = passkey_key(len, depth);
                    let (ok, text) = passkey_trial(&mut e, len, depth, key, f)?;
                    eprintln!(
                        "passkey {label:>24} {fname:>6} len {len:>5} depth {depth:.2}: {ok} ({text:?})"
                    );
                    found += usize::from(ok);
                }
                row.passkey.push(PasskeyCell {
                    len,
                    filler: fname.clone(),
                    found,
                    trials: depths.len(),
                });
            }
        }
        if args.agreement_len == 0 {
            continue;
        }
        e.reset();
        let preds = teacher_forced_argmaxes(&mut e, &ids, from)?;
        if dense.is_empty() {
            dense = preds.clone();
        }
        row.agreement = Some(agreement(&dense, &preds));
        eprintln!("agreement {label:>24}: {:.3}", agreement(&dense, &preds));
    }
    Ok(name)
}

/// Mean decode-attention time per layer-step of `policy` at `len` tokens:
/// every layer of `cfg` through the policy's own code on a synthetic cache.
fn layer_step_ms(
    ex: &mut GpuExecutor,
    cfg: &ModelConfig,
    policy: AttentionPolicy,
    len: usize,
    steps: usize,
) -> R<f64> {
    let layout = KvLayout {
        layers: cfg.layers,
        kv_heads: cfg.kv_heads,
        head_dim: cfg.head_dim,
        page_size: 64,
        num_pages: len.div_ceil(64),
    };
    let mut alloc = PageAllocator::new(&layout);
    let mut table = alloc.new_sequence();
    alloc.reserve(&mut table, len)?;
    table.len = len;
    let kv = ex.kv_cache(&layout)?;
    let rope = ex.rope_table(&RopeConfig {
        head_dim: cfg.head_dim,
        theta: cfg.rope_theta,
        scaling: None,
        max_positions: len,
    })?;
    let qd = cfg.heads * cfg.head_dim;
    let q0: Vec<f32> = (0..qd)
        .map(|i| ((i * 7919) % 17) as f32 / 17.0 - 0.5)
        .collect();
    let q0 = ex.upload(&q0, 1, qd)?;
    let mut q = ex.tensor(1, qd)?;
    let mut out = ex.tensor(1, qd)?;
    let pos = ex.ids(&[(len - 1) as u32])?;
    let shape = kvsieve::attention::AttentionShape {
        layout,
        q_heads: cfg.heads,
        trained: cfg.max_positions,
    };
    let mut att = Attention::<GpuExecutor>::new(policy, shape)?;
    let mut total = Duration::ZERO;
    for step in 0..=steps {
        let t = Instant::now();
        att.begin_step(ex, 1, len)?;
        for layer in 0..cfg.layers {
            ex.copy_rows(&q0, 0, &mut q, 0, 1)?;
            let input = LayerInput {
                cache: KvView::new(&kv, layer, &table, &rope),
                q_heads: cfg.heads,
                positions: &pos,
                start: len - 1,
                n: 1,
                q_rotated: false,
            };
            att.layer(ex, &input, &mut q, &mut out)?;
        }
        let r = ex.rec.submit()?;
        // The first step builds block bounds over the whole cache: untimed.
        if step > 0 {
            total += match r.gpu_ns {
                Some(ns) if ns > 0.0 => Duration::from_nanos(ns as u64),
                _ => t.elapsed(),
            };
        }
    }
    Ok(total.as_secs_f64() * 1e3 / (steps * cfg.layers) as f64)
}

/// The kernel column on the GPU executor.
fn gpu_columns(args: &Args, rows: &mut [Row], pols: &[(&str, AttentionPolicy)]) -> R<String> {
    let dir = kvsieve::convert::default_model_dir()?;
    let cfg = ModelConfig::from_json(&std::fs::read_to_string(dir.join("config.json"))?)?;
    let mut ex = GpuExecutor::new()?;
    let name = ex.name();
    ex.rec.enable_timestamps();
    for len in lengths(&args.kernel_lens) {
        let mut dense_ms = 0.0;
        for (row, (label, policy)) in rows.iter_mut().zip(pols) {
            // TokenSelect selects in every layer: the Selection Cache is off.
            let policy = match *policy {
                AttentionPolicy::TokenSelect(c) => {
                    AttentionPolicy::TokenSelect(TokenSelectConfig {
                        cache_threshold: 2.0,
                        ..c
                    })
                }
                p => p,
            };
            let ms = layer_step_ms(&mut ex, &cfg, policy, len, args.kernel_steps)?;
            if matches!(policy, AttentionPolicy::Dense) {
                dense_ms = ms;
            }
            let speedup = dense_ms / ms;
            eprintln!("kernel {label:>24} {len:>7}: {ms:.2} ms per layer-step ({speedup:.2}x)");
            row.kernel.push((len, ms, speedup));
        }
    }
    Ok(name)
}

/// Whether `p` prefills exactly as dense does (Quest without its sparse
/// prefill, Tidal): such policies decode over one shared dense prefill.
fn prefills_densely(p: &AttentionPolicy) -> bool {
    match p {
        AttentionPolicy::Dense | AttentionPolicy::Tidal(_) => true,
        AttentionPolicy::Quest(c) => c.prefill_subchunk == 0,
        AttentionPolicy::TokenSelect(_) => false,
    }
}

/// The end-to-end columns: per policy and length, one passkey prompt on
/// `--e2e-backend`. The policies that prefill densely share one prefill of
/// all but the prompt's last token (its rate is their prefill column) and
/// take over its cache ([`Engine::switch_policy`]); the others run on a fresh
/// engine. Every policy feeds the prompt's last token itself, then decodes.
fn end_to_end(args: &Args, rows: &mut [Row], pols: &[(&str, AttentionPolicy)]) -> R<String> {
    let mut name = "not run".to_string();
    for ctx in lengths(&args.decode_context) {
        let key = passkey_key(ctx, args.e2e_depth);
        let mut shared: Option<(Engine, f64)> = None;
        for (row, (label, policy)) in rows.iter_mut().zip(pols) {
            let dense_prefill = prefills_densely(policy);
            let opts = Options {
                backend: args.e2e_backend,
                max_context: ctx + args.decode_tokens + 16,
                policy: if dense_prefill {
                    AttentionPolicy::Dense
                } else {
                    *policy
                },
                progress: true,
                ..Options::default()
            };
            let (mut e, known) = match shared.take() {
                Some((e, tps)) if dense_prefill => (e, Some(tps)),
                other => {
                    shared = other;
                    (Engine::load_default(opts)?, None)
                }
            };
            name = e.backend_name();
            let ids = passkey_prompt(&e.tokenizer, ctx, args.e2e_depth, key, &Filler::Repeat)?;
            let prefill_tps = match known {
                Some(tps) => tps,
                None => {
                    let prefix = &ids[..ids.len() - 1];
                    let t = Instant::now();
                    e.prefill(prefix)?;
                    prefix.len() as f64 / t.elapsed().as_secs_f64()
                }
            };
            e.switch_policy(*policy)?;
            e.stats = Default::default();
            let params = GenerateParams {
                max_tokens: args.decode_tokens.max(7),
                stop_at_eos: false,
                ..Default::default()
            };
            let mut answer = String::new();
            for t in e.generate_ids(&ids, &params)? {
                answer.push_str(&t?.text);
            }
            let r = EndToEnd {
                context: ctx,
                prefill_tps,
                decode_tps: e.stats.decode_tps(),
                cache_hit_rate: e.selection_stats().hit_rate(),
                passkey_found: first_integer(&answer) == Some(key as u64),
                answer,
            };
            eprintln!(
                "e2e {label:>24} {ctx:>6}: prefill {:.1} tok/s, decode {:.2} tok/s, hits {:?}, key {} ({:?})",
                r.prefill_tps, r.decode_tps, r.cache_hit_rate, r.passkey_found, r.answer
            );
            row.e2e.push(r);
            if dense_prefill {
                shared = Some((e, prefill_tps));
            }
        }
    }
    Ok(name)
}

/// The lengths of a list option that run (0 leaves a measurement out).
fn lengths(list: &[usize]) -> Vec<usize> {
    list.iter().copied().filter(|&l| l > 0).collect()
}

fn table(rep: &Report, args: &Args) -> String {
    let mut s = String::new();
    let mut head = vec!["policy".to_string(), "tokens attended".to_string()];
    let quality = !args.skip_quality;
    let agreement = quality && args.agreement_len > 0;
    if quality {
        for l in lengths(&args.lens) {
            for f in &args.fillers {
                head.push(format!("passkey {l} {f} (ref)"));
            }
        }
    }
    if agreement {
        head.push("agreement (ref)".into());
    }
    let (kernel_lens, contexts) = (lengths(&args.kernel_lens), lengths(&args.decode_context));
    for &l in &kernel_lens {
        head.push(format!("attention speedup {}K (GPU)", l / 1024));
    }
    for &c in &contexts {
        for what in ["prefill tok/s", "decode tok/s", "cache hits", "passkey"] {
            head.push(format!("{what} at {c} (e2e)"));
        }
    }
    s += &format!("| {} |\n|{}\n", head.join(" | "), "---|".repeat(head.len()));
    for r in &rep.rows {
        let mut cells = vec![r.policy.clone(), r.config.clone()];
        if quality {
            for l in lengths(&args.lens) {
                for f in &args.fillers {
                    cells.push(
                        match r.passkey.iter().find(|p| p.len == l && &p.filler == f) {
                            Some(p) => format!("{}/{}", p.found, p.trials),
                            None => "not run".into(),
                        },
                    );
                }
            }
        }
        if agreement {
            cells.push(
                r.agreement
                    .map_or("not run".into(), |a| format!("{:.1} %", 100.0 * a)),
            );
        }
        for &l in &kernel_lens {
            cells.push(match r.kernel.iter().find(|k| k.0 == l) {
                Some((_, ms, x)) => format!("{x:.2}x ({ms:.2} ms)"),
                None => "not run".into(),
            });
        }
        for &c in &contexts {
            match r.e2e.iter().find(|e| e.context == c) {
                Some(e) => cells.extend([
                    format!("{:.1}", e.prefill_tps),
                    format!("{:.2}", e.decode_tps),
                    e.cache_hit_rate
                        .map_or("-".into(), |h| format!("{:.0} %", 100.0 * h)),
                    if e.passkey_found { "found" } else { "missed" }.into(),
                ]),
                None => cells.extend(std::iter::repeat_n("not run".to_string(), 4)),
            }
        }
        s += &format!("| {} |\n", cells.join(" | "));
    }
    s += &format!(
        "\nref: {}; GPU: {}; e2e: {}\n",
        rep.reference_executor, rep.gpu_executor, rep.e2e_executor
    );
    s
}

fn main() -> R<()> {
    let args = Args::parse();
    let mut pols = policies();
    if !args.only.is_empty() {
        for name in &args.only {
            if !pols.iter().any(|(n, _)| n == name) {
                let known: Vec<_> = pols.iter().map(|(n, _)| *n).collect();
                return Err(format!("--only: no policy {name:?} (known: {known:?})").into());
            }
        }
        let baseline = (!args.skip_quality && args.agreement_len > 0)
            || !lengths(&args.kernel_lens).is_empty();
        pols.retain(|(n, _)| (*n == "dense" && baseline) || args.only.iter().any(|o| o == n));
    }
    let mut rows: Vec<Row> = pols
        .iter()
        .map(|(n, p)| Row {
            policy: n.to_string(),
            config: describe(p),
            ..Default::default()
        })
        .collect();
    let reference_executor = if args.skip_quality {
        "not run".into()
    } else {
        quality(&args, &mut rows, &pols)?
    };
    let gpu_executor = if !lengths(&args.kernel_lens).is_empty() {
        gpu_columns(&args, &mut rows, &pols)?
    } else {
        "not run".into()
    };
    let e2e_executor = end_to_end(&args, &mut rows, &pols)?;
    let rep = Report {
        reference_executor,
        gpu_executor,
        e2e_executor,
        decode_context: args.decode_context.clone(),
        rows,
    };
    println!("{}", table(&rep, &args));
    if let Some(path) = &args.json {
        std::fs::write(path, serde_json::to_string_pretty(&rep)?)?;
        eprintln!("wrote {}", path.display());
    }
    Ok(())
}
