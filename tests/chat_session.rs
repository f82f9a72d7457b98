//! The chat binary as a user drives it from a pipe: the default model, a
//! 384-token context and short answers, far more turns than the context holds
//! (100 on the reference executor; 8 in a 160-token context on the GPU one).
//! Every turn must be answered (no error, the
//! conversation never stuck), the context must stay bounded, and the oldest
//! turns must have been dropped along the way.
//!
//! `cargo test --release` runs 100 turns (and builds the chat example it runs;
//! with `--test chat_session` alone, build it first: `cargo build --release
//! --example chat`). `KVSIEVE_CHAT_TURNS=1000 cargo test --release --test
//! chat_session -- --nocapture` is the long run.

use std::io::Write;
use std::path::PathBuf;
use std::process::{Command, Stdio};

const MAX_CONTEXT: usize = 384;

/// `target/<profile>/examples/chat`, which `cargo test` builds with the tests.
fn chat_binary() -> PathBuf {
    let exe = std::env::current_exe().expect("test binary path");
    let profile_dir = exe
        .parent()
        .and_then(|d| d.parent())
        .expect("target/<profile>");
    profile_dir
        .join("examples")
        .join(format!("chat{}", std::env::consts::EXE_SUFFIX))
}

/// Runs the chat binary on `input` (reference executor, greedy, short
/// answers); returns stdout and stderr.
fn run_chat(input: &str) -> (String, String) {
    let bin = chat_binary();
    let mut child = Command::new(&bin)
        .args(["--backend", "reference", "--max-tokens", "12"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("{}: {e}", bin.display()));
    child
        .stdin
        .take()
        .unwrap()
        .write_all(input.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        out.status.success(),
        "chat exited with {}:\n{err}",
        out.status
    );
    (String::from_utf8_lossy(&out.stdout).into_owned(), err)
}

#[test]
fn a_saved_conversation_continues_identically() {
    let file = std::env::temp_dir().join(format!("kvsieve-chat-{}.json", std::process::id()));
    let file = file.display();
    let (first, err) = run_chat(&format!(
        "Hello! Who are you?\n/save {file}\nWhat is the capital of France?\n"
    ));
    assert!(err.contains("saved 2 messages"), "{err}");
    let (second, err) = run_chat(&format!("/load {file}\nWhat is the capital of France?\n"));
    assert!(err.contains("loaded 2 messages"), "{err}");
    // The last exchange (question echoed, then the answer) is the same.
    let last = |s: &str| {
        s.lines()
            .rev()
            .take(2)
            .map(String::from)
            .collect::<Vec<_>>()
    };
    assert_eq!(last(&first), last(&second));
    assert!(
        second.lines().count() == 2,
        "stdout carries only the conversation: {second:?}"
    );
}

#[test]
fn a_long_chat_in_a_small_context_keeps_answering() {
    let turns: usize = std::env::var("KVSIEVE_CHAT_TURNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100);
    long_chat("reference", turns, MAX_CONTEXT);
}

/// The same on the GPU executor, in a smaller context so that a few turns
/// outgrow it (each drop re-prefills the conversation, slow on a CPU driver).
#[test]
fn a_long_chat_on_the_gpu_executor() {
    long_chat("gpu", 8, 160);
}

fn long_chat(backend: &str, turns: usize, max_context: usize) {
    let bin = chat_binary();
    assert!(
        bin.exists(),
        "{} is missing: `cargo test` builds the examples (or `cargo build --release --example chat`)",
        bin.display()
    );
    let t0 = std::time::Instant::now();
    let mut child = Command::new(&bin)
        .args([
            "--backend",
            backend,
            "--max-context",
            &max_context.to_string(),
        ])
        .args([
            "--max-tokens",
            "8",
            "--system",
            "You answer in one short sentence.",
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start the chat example");
    let mut stdin = child.stdin.take().unwrap();
    let feeder = std::thread::spawn(move || {
        for i in 0..turns {
            let topic = ["the sea", "mountains", "rivers", "the moon", "forests"][i % 5];
            writeln!(stdin, "Tell me something about {topic} (question {i}).").unwrap();
        }
    });
    let out = child.wait_with_output().expect("chat output");
    feeder.join().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    let tail: String = stderr.lines().rev().take(10).collect::<Vec<_>>().join("\n");
    assert!(
        out.status.success(),
        "chat exited with {}:\n{tail}",
        out.status
    );

    // stdout: each message echoed ("> ...") and answered on the next line.
    let lines: Vec<&str> = stdout.lines().collect();
    let asked: Vec<usize> = (0..lines.len())
        .filter(|&i| lines[i].starts_with("> "))
        .collect();
    assert_eq!(asked.len(), turns, "messages echoed");
    for &i in &asked {
        assert!(
            i + 1 < lines.len() && !lines[i + 1].starts_with("> "),
            "no answer to {:?}",
            lines[i]
        );
    }
    assert!(!stderr.contains("error"), "errors on stderr:\n{tail}");
    // stderr: one stats line per turn, the context never past the limit.
    let contexts: Vec<usize> = stderr
        .lines()
        .filter_map(|l| l.split("| context ").nth(1))
        .filter_map(|r| r.split(' ').next()?.parse().ok())
        .collect();
    assert_eq!(contexts.len(), turns, "stats lines");
    assert!(
        contexts.iter().all(|&c| c <= max_context),
        "context past {max_context}: {contexts:?}"
    );
    let drops = stderr
        .lines()
        .filter(|l| l.contains("oldest messages were dropped"))
        .count();
    assert!(drops > 0, "the conversation never outgrew the context");
    eprintln!(
        "{backend}: {turns} turns answered in {:.0} s; {drops} drops; largest context {} tokens",
        t0.elapsed().as_secs_f64(),
        contexts.iter().max().unwrap()
    );
}
