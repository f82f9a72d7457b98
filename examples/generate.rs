//! Generates text from a prompt.
//!
//! `cargo run --release --example generate -- --prompt "Once upon a time" --max-tokens 64`
//! `--json` prints one JSON object on stdout; progress and logs go to stderr.

mod common;

use clap::Parser;
use common::{fail, ModelArgs};
use kvsieve::generate::Message;
use std::io::Write;

#[derive(Parser, Debug)]
#[command(about = "Generate text with kvsieve")]
struct Cli {
    #[command(flatten)]
    model: ModelArgs,
    /// Prompt text.
    #[arg(long, conflicts_with = "prompt_file")]
    prompt: Option<String>,
    /// Read the prompt from a file.
    #[arg(long)]
    prompt_file: Option<std::path::PathBuf>,
    /// Apply the chat template (the prompt is one user message).
    #[arg(long)]
    chat: bool,
    /// Print one JSON object with the text, tokens and speeds.
    #[arg(long)]
    json: bool,
}

fn main() {
    common::quiet_backend_probes();
    let cli = Cli::parse();
    let prompt = match (&cli.prompt, &cli.prompt_file) {
        (Some(p), _) => p.clone(),
        (None, Some(f)) => {
            std::fs::read_to_string(f).unwrap_or_else(|e| fail(format!("{}: {e}", f.display())))
        }
        (None, None) => fail("give --prompt TEXT or --prompt-file FILE"),
    };
    let params = cli.model.params().unwrap_or_else(|e| fail(e));
    let mut engine = cli.model.engine().unwrap_or_else(|e| fail(e));
    eprintln!(
        "kvsieve: {} on {}",
        engine.config.arch_name(),
        engine.backend_name()
    );
    let ids = if cli.chat {
        let text = engine
            .tokenizer
            .render_chat(&[Message::new("user", &prompt)], true)
            .unwrap_or_else(|e| fail(e));
        engine.tokenizer.encode(&text)
    } else {
        engine.tokenizer.encode(&prompt)
    }
    .unwrap_or_else(|e| fail(e));
    let mut text = String::new();
    let mut tokens = Vec::new();
    {
        let gen = engine
            .generate_ids(&ids, &params)
            .unwrap_or_else(|e| fail(e));
        for t in gen {
            let t = t.unwrap_or_else(|e| fail(e));
            if !cli.json {
                print!("{}", t.text);
                let _ = std::io::stdout().flush();
            }
            text.push_str(&t.text);
            tokens.push(t.id);
        }
    }
    let hit_rate = engine.selection_stats().hit_rate();
    let s = &engine.stats;
    if cli.json {
        let out = serde_json::json!({
            "text": text,
            "tokens": tokens,
            "prompt_tokens": ids.len(),
            "generated_tokens": tokens.len(),
            "prefill_tokens_per_s": s.prefill_tps(),
            "decode_tokens_per_s": s.decode_tps(),
            "selection_cache_hit_rate": hit_rate,
            "mean_accepted_tokens": s.mean_accepted(),
            "tree_size": s.tree_size,
        });
        println!("{out}");
    } else {
        println!();
    }
    eprintln!(
        "prefill {} tok at {:.1} tok/s, decode {} tok at {:.2} tok/s, accepted/step {}, draft tree {}",
        s.prefill_tokens,
        s.prefill_tps(),
        s.decode_tokens,
        s.decode_tps(),
        s.mean_accepted()
            .map(|t| format!("{t:.2}"))
            .unwrap_or_else(|| "n/a".into()),
        s.tree_label()
    );
}
