//! Spec-Bench-style report on the default model, greedy: per category of the
//! prompt file, plain decode tokens/s, speculative tokens/s, speedup and tau (mean
//! tokens per verify forward, bonus included) for each drafter and tree size; then
//! the cost curve of one verify forward for 1, 2, 4, ..., 128 rows relative to a
//! plain decode step, which is what decides the tree size an adapter should use.
//! Prints Markdown tables and writes JSON.
//!
//! Each drafter:tree runs every prompt, in file order, on its own engine with
//! an empty state directory: the Token Recycling matrix starts empty and learns
//! from that configuration's own verifies only (one engine for all configs let
//! a config draft from a matrix that an earlier config had filled on the same
//! answer).
//!
//! `cargo run --release --example specbench -- --prompts ../shared/eval/specbench-mini.jsonl --json OUT`

use clap::Parser;
use kvsieve::generate::{Backend, Engine, GenerateParams, Message, Options};
use kvsieve::speculative::{Speculate, TreeSize};
use std::collections::BTreeMap;
use std::path::PathBuf;

#[derive(Parser, Debug)]
struct Cli {
    /// JSONL prompts with "category" and "turns".
    #[arg(long)]
    prompts: PathBuf,
    /// Write the results here as JSON.
    #[arg(long)]
    json: Option<PathBuf>,
    /// gpu or reference.
    #[arg(long, default_value = "gpu")]
    backend: String,
    /// Model directory (default: the default model).
    #[arg(long)]
    model: Option<PathBuf>,
    /// New tokens per prompt.
    #[arg(long, default_value_t = 64)]
    max_tokens: usize,
    /// Drafter:tree pairs to run, tree a size or auto (empty: only the
    /// verify-cost curve).
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "lookup:11,recycling:4,recycling:auto,both:16,both:81,both:auto"
    )]
    configs: Vec<String>,
}

#[derive(Default, Clone)]
struct Sum {
    tokens: usize,
    secs: f64,
    steps: usize,
    verified: usize,
}

fn run(e: &mut Engine, prompt: &str, p: &GenerateParams) -> kvsieve::Result<(Vec<u32>, Sum)> {
    e.reset();
    let before = e.stats.clone();
    let ids: Vec<u32> = e
        .chat(&[Message::new("user", prompt)], p)?
        .map(|t| t.map(|t| t.id))
        .collect::<kvsieve::Result<_>>()?;
    let s = &e.stats;
    Ok((
        ids,
        Sum {
            tokens: s.decode_tokens - before.decode_tokens,
            secs: (s.decode_time - before.decode_time).as_secs_f64(),
            steps: s.verify_steps - before.verify_steps,
            verified: s.verify_tokens - before.verify_tokens,
        },
    ))
}

/// An engine whose kept state lives in `state` (None: the default directory).
fn load(cli: &Cli, state: Option<PathBuf>) -> kvsieve::Result<Engine> {
    let opts = Options {
        backend: cli.backend.parse::<Backend>()?,
        max_context: 4096,
        state_dir: state,
        ..Options::default()
    };
    match &cli.model {
        Some(d) => Engine::load(d, opts),
        None => Engine::load_default(opts),
    }
}

fn add(acc: &mut Sum, s: &Sum) {
    acc.tokens += s.tokens;
    acc.secs += s.secs;
    acc.steps += s.steps;
    acc.verified += s.verified;
}

fn main() -> kvsieve::Result<()> {
    let cli = Cli::parse();
    let mut e = load(&cli, None)?;
    let text = std::fs::read_to_string(&cli.prompts)
        .map_err(|err| kvsieve::Error::io(&cli.prompts, err))?;
    let mut prompts = Vec::new();
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        let v: serde_json::Value = serde_json::from_str(line)
            .map_err(|err| kvsieve::Error::format(&cli.prompts, format!("prompt line: {err}")))?;
        let cat = v["category"].as_str().unwrap_or("?").to_string();
        let turn = v["turns"][0].as_str().unwrap_or("").to_string();
        prompts.push((cat, turn));
    }
    let mut configs = Vec::new();
    for c in cli.configs.iter().filter(|c| !c.trim().is_empty()) {
        let (d, n) = c.split_once(':').unwrap_or((c.as_str(), "auto"));
        configs.push((c.clone(), d.parse::<Speculate>()?, n.parse::<TreeSize>()?));
    }
    eprintln!(
        "specbench on {}: {} prompts",
        e.backend_name(),
        prompts.len()
    );
    let plain_p = GenerateParams {
        max_tokens: cli.max_tokens,
        ..Default::default()
    };
    // Per (config, category): plain and speculative sums. Plain runs beside
    // each config's (same prompt, just before it), so both see the same load
    // on a noisy machine.
    let mut table: BTreeMap<(String, String), (Sum, Sum)> = BTreeMap::new();
    for (ci, (name, spec, size)) in configs.iter().enumerate() {
        let dir =
            std::env::temp_dir().join(format!("kvsieve-specbench-{}-{ci}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let mut se = load(&cli, Some(dir.clone()))?;
        let p = GenerateParams {
            speculate: *spec,
            tree_size: *size,
            ..plain_p.clone()
        };
        for (cat, prompt) in &prompts {
            let (plain_ids, plain_sum) = run(&mut e, prompt, &plain_p)?;
            let (ids, sum) = run(&mut se, prompt, &p)?;
            if ids != plain_ids {
                eprintln!("warning: {name} on a {cat} prompt differs from plain greedy");
            }
            for key in [
                (name.clone(), cat.clone()),
                (name.clone(), "overall".to_string()),
            ] {
                let entry = table.entry(key).or_default();
                add(&mut entry.0, &plain_sum);
                add(&mut entry.1, &sum);
            }
        }
        drop(se);
        let _ = std::fs::remove_dir_all(&dir);
    }
    println!("| drafter:tree | category | plain tok/s | speculative tok/s | speedup | tau |");
    println!("|---|---|---|---|---|---|");
    let mut rows = Vec::new();
    for ((name, cat), (plain, spec)) in &table {
        let (pt, st) = (
            plain.tokens as f64 / plain.secs.max(1e-9),
            spec.tokens as f64 / spec.secs.max(1e-9),
        );
        let tau = spec.verified as f64 / spec.steps.max(1) as f64;
        println!(
            "| {name} | {cat} | {pt:.2} | {st:.2} | {:.2}x | {tau:.2} |",
            st / pt
        );
        rows.push(serde_json::json!({
            "config": name, "category": cat, "plain_tokens_per_s": pt,
            "speculative_tokens_per_s": st, "speedup": st / pt, "tau": tau,
        }));
    }
    // Verify cost: one forward of N chained nodes after the first prompt, against a
    // plain one-token step (N = 1 is that step through the verify path).
    let (_, first) = &prompts[0];
    let ids = e.tokenizer.encode(
        &e.tokenizer
            .render_chat(&[Message::new("user", first)], true)?,
    )?;
    let mut curve = Vec::new();
    println!("\n| verify rows | ms per forward | relative to 1 row |\n|---|---|---|");
    let costs = e.verify_cost(&ids, &[1, 2, 4, 8, 16, 32, 64, 81, 128], 3, f64::INFINITY)?;
    let b = costs[0].1;
    for &(n, best) in &costs {
        println!("| {n} | {:.1} | {:.2} |", best * 1e3, best / b);
        curve.push(serde_json::json!({"rows": n, "seconds": best, "relative": best / b}));
    }
    let auto: Vec<_> = [Speculate::Lookup, Speculate::Recycling, Speculate::Both]
        .iter()
        .map(|&s| {
            let n = kvsieve::speculative::choose_tree_size(s, &costs, 1.0);
            println!("auto tree size for {s:?} on this adapter: {n:?}");
            serde_json::json!({"drafter": format!("{s:?}"), "tree_size": n})
        })
        .collect();
    if let Some(path) = &cli.json {
        let out = serde_json::json!({
            "adapter": e.backend_name(), "max_tokens": cli.max_tokens,
            "results": rows, "verify_curve": curve, "auto_tree": auto,
        });
        std::fs::write(path, serde_json::to_string_pretty(&out).unwrap_or_default())
            .map_err(|err| kvsieve::Error::io(path, err))?;
    }
    Ok(())
}
