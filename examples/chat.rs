//! Streaming chat with the default model (or `--model DIR|FILE.gguf`).
//!
//! `cargo run --release --example chat`
//!
//! In a terminal: line editing and history (kept in kvsieve's cache
//! directory), Ctrl-C stops the answer being written (what was written stays
//! in the conversation, marked cut), Ctrl-C or Ctrl-D at the prompt exits.
//! From a pipe: one message or command per line, each message echoed.
//! Commands: /help, /system TEXT, /save FILE, /load FILE (the conversation as
//! JSON messages), /reset, /stats, /quit. Past the context the oldest turns
//! are dropped (`--overflow error` refuses instead), with a notice on stderr.
//! stdout carries only the conversation; everything else goes to stderr.

mod common;

use clap::Parser;
use common::{fail, ModelArgs};
use kvsieve::generate::{Message, Stats, StopReason};
use std::io::{BufRead, IsTerminal, Write};
use std::sync::atomic::{AtomicBool, Ordering};

#[derive(Parser, Debug)]
#[command(about = "Chat with a model through kvsieve")]
struct Cli {
    #[command(flatten)]
    model: ModelArgs,
    /// System prompt (default: the chat template's own).
    #[arg(long)]
    system: Option<String>,
}

const HELP: &str = "/system TEXT  set the system prompt (empty: the template's own)
/save FILE    write the conversation as JSON messages
/load FILE    continue a saved conversation
/reset        start over (the system prompt stays)
/stats        totals since start
/quit         leave (also Ctrl-D; Ctrl-C stops an answer)";

/// A message as /save writes it: an answer stopped by Ctrl-C is marked.
#[derive(serde::Serialize, serde::Deserialize)]
struct Saved {
    #[serde(flatten)]
    msg: Message,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    cut: bool,
}

/// Set while an answer streams: Ctrl-C then stops it instead of the program.
static ANSWERING: AtomicBool = AtomicBool::new(false);
static STOP: AtomicBool = AtomicBool::new(false);

/// Where the lines come from: a line editor on a terminal, else plain lines.
enum Input {
    Editor(Box<rustyline::DefaultEditor>, Option<std::path::PathBuf>),
    Lines(std::io::Lines<std::io::StdinLock<'static>>),
}

impl Input {
    fn new() -> Self {
        if std::io::stdin().is_terminal() {
            if let Ok(mut ed) = rustyline::DefaultEditor::new() {
                let path = kvsieve::convert::cache_dir().join("chat_history.txt");
                let _ = ed.load_history(&path);
                return Input::Editor(Box::new(ed), Some(path));
            }
        }
        Input::Lines(std::io::stdin().lock().lines())
    }

    /// The next line; `None` at the end (Ctrl-D, or Ctrl-C at the prompt).
    fn next(&mut self) -> Option<String> {
        match self {
            Input::Editor(ed, _) => match ed.readline("> ") {
                Ok(line) => {
                    let _ = ed.add_history_entry(line.as_str());
                    Some(line)
                }
                Err(rustyline::error::ReadlineError::Interrupted)
                | Err(rustyline::error::ReadlineError::Eof) => None,
                Err(e) => fail(e),
            },
            Input::Lines(lines) => lines.next().map(|l| l.unwrap_or_else(|e| fail(e))),
        }
    }

    fn piped(&self) -> bool {
        matches!(self, Input::Lines(_))
    }
}

impl Drop for Input {
    fn drop(&mut self) {
        if let Input::Editor(ed, Some(path)) = self {
            let _ = ed.save_history(path);
        }
    }
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

fn save(path: &str, history: &[Saved]) -> Result<(), String> {
    let text = serde_json::to_string_pretty(history).map_err(|e| e.to_string())?;
    std::fs::write(path, text).map_err(|e| format!("{path}: {e}"))
}

fn load(path: &str) -> Result<Vec<Saved>, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{path}: {e}"))?;
    serde_json::from_str(&text).map_err(|e| format!("{path}: not a saved conversation ({e})"))
}

fn main() {
    common::quiet_backend_probes();
    let cli = Cli::parse();
    // Ctrl-C stops the answer being written; at any other time it quits.
    let _ = ctrlc::set_handler(|| {
        if ANSWERING.load(Ordering::SeqCst) {
            STOP.store(true, Ordering::SeqCst);
        } else {
            std::process::exit(130);
        }
    });
    let params = cli.model.params().unwrap_or_else(|e| fail(e));
    let mut engine = cli.model.engine().unwrap_or_else(|e| fail(e));
    let max_context = engine.chat_context();
    eprintln!(
        "kvsieve chat: {} on {} ({} MiB of weights, {} MiB of KV cache now; conversations up to {max_context} tokens). /help for commands.",
        engine.config.arch_name(),
        engine.backend_name(),
        engine.weight_bytes().0 >> 20,
        engine.kv_bytes() >> 20,
    );
    let system = |text: &str| Saved {
        msg: Message::new("system", text),
        cut: false,
    };
    let mut history: Vec<Saved> = cli.system.as_deref().map(system).into_iter().collect();
    let mut input = Input::new();
    while let Some(line) = input.next() {
        let line = line.trim();
        let (cmd, arg) = line.split_once(' ').unwrap_or((line, ""));
        let arg = arg.trim();
        match cmd {
            "" => continue,
            "/quit" | "/exit" => break,
            "/help" => {
                eprintln!("{HELP}");
                continue;
            }
            "/reset" => {
                history.retain(|m| m.msg.role == "system");
                engine.reset();
                eprintln!("(conversation reset)");
                continue;
            }
            "/system" => {
                history.retain(|m| m.msg.role != "system");
                if !arg.is_empty() {
                    history.insert(0, system(arg));
                }
                eprintln!(
                    "(system prompt {})",
                    if arg.is_empty() { "cleared" } else { "set" }
                );
                continue;
            }
            "/save" | "/load" if arg.is_empty() => {
                eprintln!("{cmd} needs a file name");
                continue;
            }
            "/save" => {
                match save(arg, &history) {
                    Ok(()) => eprintln!("(saved {} messages to {arg})", history.len()),
                    Err(e) => eprintln!("error: {e}"),
                }
                continue;
            }
            "/load" => {
                match load(arg) {
                    Ok(h) => {
                        history = h;
                        eprintln!("(loaded {} messages from {arg})", history.len());
                    }
                    Err(e) => eprintln!("error: {e}"),
                }
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
            c if c.starts_with('/') => {
                eprintln!("unknown command {c}; /help lists them");
                continue;
            }
            _ => {}
        }
        if input.piped() {
            println!("> {line}");
        }
        history.push(Saved {
            msg: Message::new("user", line),
            cut: false,
        });
        let before = engine.stats.clone();
        let mut answer = String::new();
        let messages: Vec<Message> = history.iter().map(|m| m.msg.clone()).collect();
        let mut cut = false;
        match engine.chat(&messages, &params) {
            Ok(mut gen) => {
                if gen.dropped_messages > 0 {
                    // The engine answered without them: the history follows.
                    let system = history
                        .iter()
                        .take_while(|m| m.msg.role == "system")
                        .count();
                    history.drain(system..system + gen.dropped_messages);
                    eprintln!(
                        "(the {} oldest messages were dropped to fit the context of {max_context} tokens)",
                        gen.dropped_messages
                    );
                }
                STOP.store(false, Ordering::SeqCst);
                ANSWERING.store(true, Ordering::SeqCst);
                for t in gen.by_ref() {
                    if STOP.load(Ordering::SeqCst) {
                        cut = true;
                        break;
                    }
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
                ANSWERING.store(false, Ordering::SeqCst);
                if cut {
                    eprintln!("\n(answer stopped; what was written stays in the conversation)");
                } else if gen.stop_reason() == Some(StopReason::ContextFull) {
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
        history.push(Saved {
            msg: Message::new("assistant", answer.trim()),
            cut,
        });
        let hit = engine.selection_stats().hit_rate();
        eprintln!(
            "{}",
            stats_line(&before, &engine.stats, engine.cached_tokens().len(), hit)
        );
    }
}
