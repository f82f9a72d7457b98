//! Hostile model files: structure-aware mutations of valid files, with fixed
//! seeds, through the real loaders (`Engine::load` on the reference executor:
//! parsing, config, tokenizer, chat template and every tensor). Each input must
//! give a model or an error: no panic, no input running past a time bound, and
//! no single allocation larger than the input justifies (a header that claims
//! 2^40 tensors or a 2^60-byte string is refused before allocating).
//!
//! Loaders: a GGUF file (header counts, metadata keys, types and values, tensor
//! directory), and a safetensors directory's `model.safetensors` header,
//! `model.safetensors.index.json`, `config.json`, `tokenizer.json` and
//! `tokenizer_config.json`.
//!
//! `cargo test --release --test fuzz` runs 10^4 inputs per loader;
//! `KVSIEVE_FUZZ_INPUTS=1000000 cargo test --release --test fuzz -- --nocapture`
//! is the long run (it prints the counts per loader).

#[path = "common/synthetic.rs"]
mod synthetic;

use kvsieve::generate::{Backend, Engine, Message, Options};
use rand::{rngs::StdRng, Rng, SeedableRng};
use serde_json::Value;
use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};
use synthetic::*;

// ---- The largest single allocation, per thread ----

struct Counting;

thread_local! {
    static LARGEST: Cell<usize> = const { Cell::new(0) };
}

fn note(n: usize) {
    let _ = LARGEST.try_with(|c| {
        if n > c.get() {
            c.set(n)
        }
    });
}

// SAFETY: forwards to the system allocator; only records sizes.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        note(l.size());
        System.alloc(l)
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        System.dealloc(p, l)
    }
    unsafe fn alloc_zeroed(&self, l: Layout) -> *mut u8 {
        note(l.size());
        System.alloc_zeroed(l)
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, n: usize) -> *mut u8 {
        note(n);
        System.realloc(p, l, n)
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

// ---- The run ----

/// Inputs per loader: 10^4 in `cargo test`, `KVSIEVE_FUZZ_INPUTS` for longer runs.
fn inputs() -> u64 {
    std::env::var("KVSIEVE_FUZZ_INPUTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10_000)
}

/// One input may take this long; a longer one is a hang
/// (`KVSIEVE_FUZZ_INPUT_SECS` raises it for runs on a busy machine).
fn input_time() -> Duration {
    let secs = std::env::var("KVSIEVE_FUZZ_INPUT_SECS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10);
    Duration::from_secs(secs)
}

/// The most one allocation may take for an input of `len` bytes: the loaders
/// turn a few MB of file into model state, never gigabytes.
fn allocation_bound(len: usize) -> usize {
    (64 << 20).max(16 * len)
}

/// Start time (ms since the run began) of the input each loader is on, for the
/// watchdog; 0 when idle.
static BUSY_SINCE: [AtomicU64; 6] = [const { AtomicU64::new(0) }; 6];
/// The input each loader is on.
static CURRENT: [AtomicU64; 6] = [const { AtomicU64::new(0) }; 6];
const LOADERS: [&str; 6] = [
    "gguf",
    "safetensors",
    "index",
    "config",
    "tokenizer",
    "tokenizer_config",
];

/// Milliseconds since the first loader started (one clock for all of them).
fn clock() -> u64 {
    static T0: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    T0.get_or_init(Instant::now).elapsed().as_millis() as u64 + 1
}

fn watchdog() {
    static STARTED: std::sync::Once = std::sync::Once::new();
    STARTED.call_once(|| {
        std::thread::spawn(move || loop {
            std::thread::sleep(Duration::from_secs(1));
            let now = clock();
            for (i, b) in BUSY_SINCE.iter().enumerate() {
                let since = b.load(Ordering::Relaxed);
                if since > 0 && now.saturating_sub(since) > input_time().as_millis() as u64 {
                    // Straight to stderr: the test harness captures eprintln!.
                    use std::io::Write as _;
                    let _ = writeln!(
                        std::io::stderr(),
                        "fuzz: the {} loader hangs on its input {} (over {:?})",
                        LOADERS[i],
                        CURRENT[i].load(Ordering::Relaxed),
                        input_time()
                    );
                    std::process::exit(2);
                }
            }
        });
    });
}

/// Mutates `seed` `inputs()` times with `mutate`, writes each result with
/// `write` and loads it; fails on panics, slow inputs and oversized allocations.
fn run(
    name: &str,
    slot: usize,
    seed: &[u8],
    mutate: impl Fn(&mut StdRng, &[u8]) -> Vec<u8>,
    write: impl Fn(&[u8]),
    load: impl Fn() -> Result<(), String>,
) {
    watchdog();
    let base = Instant::now();
    let mut rng = StdRng::seed_from_u64(0x5eed ^ slot as u64);
    let (mut ok, mut errors, mut slowest) = (0u64, 0u64, Duration::ZERO);
    let mut failures: Vec<String> = Vec::new();
    let mut messages = std::collections::BTreeMap::<String, u64>::new();
    let n = inputs();
    for i in 0..n {
        let input = mutate(&mut rng, seed);
        write(&input);
        CURRENT[slot].store(i, Ordering::Relaxed);
        BUSY_SINCE[slot].store(clock(), Ordering::Relaxed);
        LARGEST.with(|c| c.set(0));
        let start = Instant::now();
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(&load));
        let took = start.elapsed();
        let largest = LARGEST.with(Cell::get);
        BUSY_SINCE[slot].store(0, Ordering::Relaxed);
        slowest = slowest.max(took);
        match r {
            Ok(Ok(())) => ok += 1,
            Ok(Err(e)) => {
                errors += 1;
                // The error's kind, without the numbers that vary by input.
                let key: String = e.chars().filter(|c| !c.is_ascii_digit()).take(70).collect();
                *messages.entry(key).or_default() += 1;
            }
            Err(p) => {
                let msg = p
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_default();
                failures.push(format!("input {i}: panic: {msg}"));
                save(name, i, &input);
            }
        }
        if largest > allocation_bound(input.len()) {
            failures.push(format!(
                "input {i}: one allocation of {largest} bytes for a {}-byte input",
                input.len()
            ));
            save(name, i, &input);
        }
        if failures.len() >= 10 {
            break;
        }
    }
    eprintln!(
        "fuzz {name}: {n} inputs in {:.1} s: {ok} loaded, {errors} errors, {} failures; \
         slowest input {:.1} ms; most common errors:",
        base.elapsed().as_secs_f64(),
        failures.len(),
        slowest.as_secs_f64() * 1e3
    );
    let mut common: Vec<_> = messages.into_iter().collect();
    common.sort_by_key(|(_, c)| std::cmp::Reverse(*c));
    for (m, c) in common.iter().take(5) {
        eprintln!("  {c:>7}  {m}");
    }
    assert!(failures.is_empty(), "fuzz {name}:\n{}", failures.join("\n"));
}

/// Keeps a failing input for reproduction (`target/fuzz-failures/`).
fn save(name: &str, i: u64, input: &[u8]) {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("fuzz-failures");
    let _ = std::fs::create_dir_all(&dir);
    let _ = std::fs::write(dir.join(format!("{name}-{i}")), input);
}

fn load_engine(path: &Path) -> Result<(), String> {
    let mut e = Engine::load(
        path,
        Options {
            backend: Backend::Reference,
            max_context: 64,
            ..Options::default()
        },
    )
    .map_err(|e| e.to_string())?;
    // What a chat does first: render, tokenize, detokenize.
    let text = e
        .tokenizer
        .render_chat(&[Message::new("user", "hello world")], true)
        .unwrap_or_else(|_| "hello world".into());
    let ids = e.tokenizer.encode(&text).map_err(|e| e.to_string())?;
    e.tokenizer.decode(&ids).map_err(|e| e.to_string())?;
    e.reset();
    Ok(())
}

fn scratch(name: &str) -> PathBuf {
    let dir =
        Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("fuzz-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

// ---- Mutations ----

/// Numbers a hostile file uses: zero, edges of every width, huge counts.
fn hostile_u64(r: &mut StdRng) -> u64 {
    const V: [u64; 14] = [
        0,
        1,
        2,
        3,
        255,
        65_535,
        1 << 31,
        u32::MAX as u64,
        1 << 32,
        1 << 40,
        1 << 60,
        i64::MAX as u64,
        u64::MAX,
        u64::MAX - 7,
    ];
    match r.gen_range(0..4) {
        0 => r.gen(),
        1 => r.gen_range(0..4096),
        _ => V[r.gen_range(0..V.len())],
    }
}

/// A few byte-level edits: flips, overwrites with hostile numbers, truncation,
/// insertion and deletion of a run.
fn bytes_mutation(r: &mut StdRng, b: &mut Vec<u8>, header: usize) {
    for _ in 0..r.gen_range(1..4) {
        // Edits land in the first `header` bytes (what the parsers read).
        let end = header.min(b.len());
        if end == 0 {
            b.push(r.gen());
            return;
        }
        match r.gen_range(0..6) {
            0 | 1 => {
                let i = r.gen_range(0..end);
                b[i] ^= 1 << r.gen_range(0..8);
            }
            2 => {
                let i = r.gen_range(0..end);
                let v = hostile_u64(r).to_le_bytes();
                let w = [1, 2, 4, 8][r.gen_range(0..4)];
                for (k, x) in v.iter().take(w).enumerate() {
                    if let Some(y) = b.get_mut(i + k) {
                        *y = *x;
                    }
                }
            }
            3 => {
                let cut = r.gen_range(0..b.len());
                b.truncate(cut);
                return;
            }
            4 => {
                let i = r.gen_range(0..end);
                let n = r.gen_range(1..64);
                let fill: Vec<u8> = (0..n).map(|_| r.gen()).collect();
                b.splice(i..i, fill);
            }
            _ => {
                let i = r.gen_range(0..end);
                let n = r.gen_range(1..64).min(b.len() - i);
                b.drain(i..i + n);
            }
        }
    }
}

/// A JSON value a hostile file puts where another was.
fn hostile_json(r: &mut StdRng) -> Value {
    match r.gen_range(0..12) {
        0 => Value::Null,
        1 => Value::Bool(r.gen()),
        2 => serde_json::json!(hostile_u64(r)),
        3 => serde_json::json!(-(r.gen_range(0..1_000_000i64))),
        4 => serde_json::json!([1e308, -1e308, 0.5, 1e-300][r.gen_range(0..4)]),
        5 => Value::String(String::new()),
        6 => Value::String("\u{0}\u{202e}\u{fffd}<|im_end|>{{ x }}".into()),
        7 => Value::String("a".repeat(r.gen_range(0..100_000))),
        8 => serde_json::json!([]),
        9 => serde_json::json!({}),
        10 => serde_json::json!([hostile_u64(r), "x", null]),
        _ => serde_json::json!({"type": "BPE", "vocab": {}, "merges": [["a", "b"]]}),
    }
}

/// Walks to a random node of `v` and replaces, deletes, duplicates or nests it.
fn json_mutation(r: &mut StdRng, v: &mut Value, depth: usize) {
    let children = match v {
        Value::Object(m) => m.len(),
        Value::Array(a) => a.len(),
        _ => 0,
    };
    if children > 0 && depth < 12 && r.gen_range(0..4) != 0 {
        let i = r.gen_range(0..children);
        if r.gen_range(0..8) == 0 {
            // Remove, or copy a sibling in its place.
            match v {
                Value::Object(m) => {
                    let k = m.keys().nth(i).cloned().unwrap_or_default();
                    m.remove(&k);
                }
                Value::Array(a) => {
                    if r.gen() {
                        a.remove(i);
                    } else {
                        let x = a[i].clone();
                        a.insert(r.gen_range(0..=a.len()), x);
                    }
                }
                _ => {}
            }
            return;
        }
        let child = match v {
            Value::Object(m) => m.values_mut().nth(i),
            Value::Array(a) => a.get_mut(i),
            _ => None,
        };
        if let Some(c) = child {
            json_mutation(r, c, depth + 1);
        }
        return;
    }
    *v = match r.gen_range(0..8) {
        // Deep nesting (parsers have recursion limits).
        0 => {
            let mut x = v.clone();
            for _ in 0..r.gen_range(1..300) {
                x = Value::Array(vec![x]);
            }
            x
        }
        // A number nudged to an edge.
        1 if v.is_number() => {
            serde_json::json!(v.as_f64().unwrap_or(0.0) * [0.0, -1.0, 1e6, 0.5][r.gen_range(0..4)])
        }
        _ => hostile_json(r),
    };
}

/// A JSON file mutated structurally (most inputs) or as bytes.
fn json_file_mutation(r: &mut StdRng, seed: &[u8]) -> Vec<u8> {
    let mut v: Value = serde_json::from_slice(seed).expect("seed is JSON");
    for _ in 0..r.gen_range(1..4) {
        json_mutation(r, &mut v, 0);
    }
    let mut b = serde_json::to_vec(&v).unwrap();
    if r.gen_range(0..5) == 0 {
        let len = b.len();
        bytes_mutation(r, &mut b, len);
    }
    b
}

/// A valid safetensors file whose tensors have other dtypes or shapes than
/// the config implies (offsets and data recomputed, so only our checks can
/// refuse it).
fn safetensors_semantic(r: &mut StdRng, header: &[u8]) -> Vec<u8> {
    const DTYPES: [(&str, usize); 9] = [
        ("F16", 2),
        ("BF16", 2),
        ("F32", 4),
        ("F64", 8),
        ("I8", 1),
        ("U8", 1),
        ("I32", 4),
        ("I64", 8),
        ("BOOL", 1),
    ];
    let mut h: serde_json::Map<String, Value> = serde_json::from_slice(header).unwrap();
    let names: Vec<String> = h.keys().filter(|k| *k != "__metadata__").cloned().collect();
    for _ in 0..r.gen_range(1..3) {
        let t = &mut h[&names[r.gen_range(0..names.len())]];
        if r.gen() {
            t["dtype"] = DTYPES[r.gen_range(0..DTYPES.len())].0.into();
        } else {
            let shape = t["shape"].as_array_mut().unwrap();
            match r.gen_range(0..4) {
                0 => shape.reverse(),
                1 => shape.push(serde_json::json!(r.gen_range(1..4))),
                2 if !shape.is_empty() => {
                    shape.pop();
                }
                _ => {
                    let i = r
                        .gen_range(0..shape.len().max(1))
                        .min(shape.len().saturating_sub(1));
                    if let Some(d) = shape.get_mut(i) {
                        *d = serde_json::json!([0, 1, 3, 31, 33, 4096][r.gen_range(0..6)]);
                    }
                }
            }
        }
    }
    // Data laid out again in the original order.
    let mut order: Vec<(u64, String)> = names
        .iter()
        .map(|n| (h[n]["data_offsets"][0].as_u64().unwrap(), n.clone()))
        .collect();
    order.sort();
    let mut at = 0usize;
    for (_, n) in &order {
        let t = &mut h[n];
        let size = DTYPES.iter().find(|d| t["dtype"] == d.0).map_or(1, |d| d.1);
        let numel: usize = t["shape"]
            .as_array()
            .unwrap()
            .iter()
            .map(|d| d.as_u64().unwrap() as usize)
            .product();
        t["data_offsets"] = serde_json::json!([at, at + numel * size]);
        at += numel * size;
    }
    let head = serde_json::to_vec(&h).unwrap();
    let mut out = (head.len() as u64).to_le_bytes().to_vec();
    out.extend(&head);
    out.extend((0..at).map(|i| (i * 7) as u8));
    out
}

/// A safetensors file: valid with other dtypes or shapes, its JSON header
/// mutated (with the length prefix kept true, or made hostile), or its bytes.
fn safetensors_mutation(r: &mut StdRng, seed: &[u8]) -> Vec<u8> {
    let n = u64::from_le_bytes(seed[..8].try_into().unwrap()) as usize;
    let (header, data) = (&seed[8..8 + n], &seed[8 + n..]);
    if r.gen_range(0..3) == 0 {
        return safetensors_semantic(r, header);
    }
    let mut out;
    if r.gen_range(0..4) != 0 {
        let h = json_file_mutation(r, header);
        out = (h.len() as u64).to_le_bytes().to_vec();
        out.extend(&h);
        out.extend(data);
        if r.gen_range(0..6) == 0 {
            out[..8].copy_from_slice(&hostile_u64(r).to_le_bytes());
        }
    } else {
        out = seed.to_vec();
        bytes_mutation(r, &mut out, 8 + n);
    }
    out
}

/// A GGUF file: a hostile number over one of its fields (counts, lengths,
/// types, dimensions, offsets: every 8-byte-aligned position of the header and
/// directory is one), or byte edits, in the header, metadata and directory.
fn gguf_mutation(r: &mut StdRng, seed: &[u8], header: usize) -> Vec<u8> {
    let mut b = seed.to_vec();
    if r.gen_range(0..2) == 0 {
        for _ in 0..r.gen_range(1..3) {
            let at = r.gen_range(0..header);
            let v = hostile_u64(r);
            // Fields are u32 (types, ranks) or u64 (counts, lengths, dims, offsets).
            let w = if r.gen() { 4 } else { 8 };
            let v = &v.to_le_bytes()[..w];
            b[at..at + w].copy_from_slice(v);
        }
    } else {
        bytes_mutation(r, &mut b, header);
    }
    b
}

/// Where a GGUF file's data section starts (its header, metadata and directory
/// are what the mutations aim at).
fn gguf_header_len(b: &[u8]) -> usize {
    kvsieve::convert::gguf::Gguf::parse(b)
        .expect("seed parses")
        .data_start()
}

// ---- The loaders ----

#[test]
fn gguf_files() {
    let seed = gguf_model("llama", false, |_| {});
    let header = gguf_header_len(&seed) - 8;
    let path = scratch("gguf").join("model.gguf");
    run(
        "gguf",
        0,
        &seed,
        |r, s| gguf_mutation(r, s, header),
        |b| std::fs::write(&path, b).unwrap(),
        || load_engine(&path),
    );
}

/// A model directory with every file valid; returns the seed bytes of `file`.
fn model_dir(name: &str, index: bool) -> (PathBuf, Vec<u8>) {
    let src = write_model(&format!("fuzz-{name}"), "LlamaForCausalLM", |_| {});
    let dir = scratch(name);
    for f in ["config.json", "tokenizer.json", "model.safetensors"] {
        std::fs::copy(src.join(f), dir.join(f)).unwrap();
    }
    std::fs::write(
        dir.join("tokenizer_config.json"),
        serde_json::json!({
            "chat_template": "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}",
            "bos_token": "<|im_start|>", "eos_token": "<|im_end|>"
        })
        .to_string(),
    )
    .unwrap();
    if index {
        // The same weights as a one-shard checkpoint.
        std::fs::rename(
            dir.join("model.safetensors"),
            dir.join("model-00001-of-00001.safetensors"),
        )
        .unwrap();
        let names: Vec<String> = tensors("LlamaForCausalLM")
            .into_iter()
            .map(|t| t.0)
            .collect();
        let map: serde_json::Map<String, Value> = names
            .into_iter()
            .map(|n| (n, Value::String("model-00001-of-00001.safetensors".into())))
            .collect();
        std::fs::write(
            dir.join("model.safetensors.index.json"),
            serde_json::json!({"metadata": {"total_size": 0}, "weight_map": map}).to_string(),
        )
        .unwrap();
    }
    let _ = std::fs::remove_dir_all(&src);
    (dir.clone(), Vec::new())
}

fn dir_loader(
    name: &str,
    slot: usize,
    file: &str,
    index: bool,
    mutate: fn(&mut StdRng, &[u8]) -> Vec<u8>,
) {
    let (dir, _) = model_dir(name, index);
    let path = dir.join(file);
    let seed = std::fs::read(&path).unwrap();
    assert!(
        load_engine(&dir).is_ok(),
        "{name}: the seed directory loads"
    );
    run(
        name,
        slot,
        &seed,
        mutate,
        |b| std::fs::write(&path, b).unwrap(),
        || load_engine(&dir),
    );
}

#[test]
fn safetensors_headers() {
    dir_loader(
        "safetensors",
        1,
        "model.safetensors",
        false,
        safetensors_mutation,
    );
}

#[test]
fn safetensors_index() {
    dir_loader(
        "index",
        2,
        "model.safetensors.index.json",
        true,
        json_file_mutation,
    );
}

#[test]
fn config_json() {
    dir_loader("config", 3, "config.json", false, json_file_mutation);
}

#[test]
fn tokenizer_json() {
    dir_loader("tokenizer", 4, "tokenizer.json", false, json_file_mutation);
}

#[test]
fn tokenizer_config_json() {
    dir_loader(
        "tokenizer_config",
        5,
        "tokenizer_config.json",
        false,
        json_file_mutation,
    );
}

/// Reproduces one input: `KVSIEVE_FUZZ_REPRO=<model dir or .gguf> cargo test
/// --release --test fuzz repro -- --ignored --nocapture` loads it once, timed.
#[test]
#[ignore]
fn repro() {
    let path = PathBuf::from(std::env::var("KVSIEVE_FUZZ_REPRO").expect("KVSIEVE_FUZZ_REPRO"));
    let t = Instant::now();
    let r = load_engine(&path);
    eprintln!("{:?} in {:.1} ms", r, t.elapsed().as_secs_f64() * 1e3);
}
