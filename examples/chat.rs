//! Streaming chat with the default model (or `--model DIR`).
//!
//! `cargo run --release --example chat`
//! Commands: /reset (new conversation), /stats (totals), /quit. Works with piped
//! stdin too: one user message per line. Past the context the oldest turns are
//! dropped (`--overflow error` refuses instead), with a notice on stderr.

mod common;

use clap::Parser;
use common::{fail, ModelArgs};
use kvsieve::generate::{Message, Stats, StopReason};
use std::io::{BufRead, IsTerminal, Write};

#[derive(Parser, Debug)]
#[command(about = "Chat with a model through kvsieve")]
struct Cli {
    #[command(flatten)]
    model: ModelArgs,
    /// System prompt (default: the chat template's own).
    #[arg(long)]
    system: Option<String>,
}

fn stats_line(before: &Stats, after: &Stats, cached: usize, hit_rate: Option<f64>) -> String {
    let pt = after.prefill_tokens - before.prefill_tokens;
    let ps = (after.prefill_time - before.prefill_time).as_secs_f64();
    let dt = after.decode_tokens - before.decode_tokens;
    let ds = (after.decode_time - before.decode_time).as_secs_f64();
    format!(
        "[prefill {pt} tok {:.1} tok/s | decode {dt} tok {:.2} tok/s | context {cached} tok | selection-cache hit rate {} | accepted/step {} | draft tree {}]",
        pt as f64 / ps.max(1e-9),
        dt as f64 / ds.max(1e-9),
        hit_rate.map(|r| format!("{:.0}%", 100.0 * r)).unwrap_or_else(|| "n/a".into()),
        {
            let steps = after.verify_steps - before.verify_steps;
            let toks = after.verify_tokens - before.verify_tokens;
            if steps > 0 {
                format!("{:.2}", toks as f64 / steps as f64)
            } else {
                "1.00".to_string()
            }
        },
        after.tree_label()
    )
}

fn main() {
    let cli = Cli::parse();
    let params = cli.model.params().unwrap_or_else(|e| fail(e));
    let mut engine = cli.model.engine().unwrap_or_else(|e| fail(e));
    let interactive = std::io::stdin().is_terminal();
    let max_context = engine.max_context();
    eprintln!(
        "kvsieve chat: {} on {}. /reset, /stats, /quit.",
        engine.config.arch_name(),
        engine.backend_name()
    );
    let mut history: Vec<Message> = cli
        .system
        .iter()
        .map(|s| Message::new("system", s))
        .collect();
    let stdin = std::io::stdin();
    let mut lines = stdin.lock().lines();
    loop {
        if interactive {
            print!("> ");
            let _ = std::io::stdout().flush();
        }
        let Some(line) = lines.next() else { break };
        let line = line.unwrap_or_else(|e| fail(e));
        let line = line.trim();
        match line {
            "" => continue,
            "/quit" | "/exit" => break,
            "/reset" => {
                history.retain(|m| m.role == "system");
                engine.reset();
                eprintln!("(conversation reset)");
                continue;
            }
            "/stats" => {
                let s = &engine.stats;
                eprintln!(
                    "[total: prefill {} tok {:.1} tok/s | decode {} tok {:.2} tok/s | context {} tok]",
                    s.prefill_tokens,
                    s.prefill_tps(),
                    s.decode_tokens,
                    s.decode_tps(),
                    engine.cached_tokens().len()
                );
                continue;
            }
            _ => {}
        }
        if !interactive {
            println!("> {line}");
        }
        history.push(Message::new("user", line));
        let before = engine.stats.clone();
        let mut answer = String::new();
        match engine.chat(&history, &params) {
            Ok(mut gen) => {
                if gen.dropped_messages > 0 {
                    // The engine answered without them: the history follows.
                    let system = history.iter().take_while(|m| m.role == "system").count();
                    history.drain(system..system + gen.dropped_messages);
                    eprintln!(
                        "(the {} oldest messages were dropped to fit the context of {} tokens)",
                        gen.dropped_messages, max_context
                    );
                }
                for t in gen.by_ref() {
                    match t {
                        Ok(t) => {
                            print!("{}", t.text);
                            let _ = std::io::stdout().flush();
                            answer.push_str(&t.text);
                        }
                        Err(e) => {
                            eprintln!("\nerror: {e}");
                            break;
                        }
                    }
                }
                if gen.stop_reason() == Some(StopReason::ContextFull) {
                    eprintln!("\n(the answer was cut: the context is full)");
                }
            }
            Err(e) => {
                eprintln!("error: {e}");
                history.pop();
                continue;
            }
        }
        println!();
        history.push(Message::new("assistant", answer.trim()));
        let hit = engine.selection_stats().hit_rate();
        eprintln!(
            "{}",
            stats_line(&before, &engine.stats, engine.cached_tokens().len(), hit)
        );
    }
}
