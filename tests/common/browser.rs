//! The kernels on a browser's WebGPU: one headless Chromium per test process
//! runs every submit of the GPU executor (kvsieve::gpu::replay) on Dawn, Tint and
//! SwiftShader, a WGSL implementation independent of wgpu and naga.
//!
//! `KVSIEVE_BROWSER=chromium` turns it on for the GPU tests (`common::ctx`);
//! `KVSIEVE_CHROMIUM` names the binary when it is not `chromium` on the PATH.
//! The browser loads a loopback page (tests/browser/harness.html) that fetches
//! jobs from this process and posts the buffers back; asked for and unable to
//! start, it fails the test with chromium's own log, never a silent skip.

use kvsieve::gpu::{PipelineKey, Replay, ReplayCmd, ReplayJob};
use serde_json::{json, Value};
use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

const PAGE: &str = include_str!("../browser/harness.html");
/// Longest wait for the browser to come up, and for one job.
const START_TIMEOUT: Duration = Duration::from_secs(90);
const JOB_TIMEOUT: Duration = Duration::from_secs(600);

/// True when `KVSIEVE_BROWSER` asks for the browser (`chromium`); any other
/// non-empty value is a mistake worth stopping for.
pub fn requested() -> bool {
    match std::env::var("KVSIEVE_BROWSER").as_deref() {
        Err(_) | Ok("") | Ok("off") => false,
        Ok("chromium") => true,
        Ok(other) => panic!("KVSIEVE_BROWSER={other:?}: expected chromium or off"),
    }
}

/// What the page answered.
type Answer = Result<Vec<u8>, String>;

/// A running browser with the harness page loaded.
pub struct Browser {
    /// What the page reported about its adapter.
    pub adapter: String,
    jobs: Sender<Vec<u8>>,
    state: Mutex<State>,
    log: PathBuf,
}

struct State {
    answers: Receiver<Answer>,
    /// Shaders the page already holds.
    sent: HashSet<&'static str>,
    /// Pipelines replayed so far (shader, entry, constants).
    ran: Vec<PipelineKey>,
    /// Buffers the page keeps between jobs: id -> (size, hash of contents,
    /// last job that used it).
    held: HashMap<u64, (usize, u64, u64)>,
    jobs_run: u64,
}

/// Bytes of buffers the page may keep between jobs before the least recently
/// used are dropped.
const HELD_BYTES: usize = 1 << 30;

fn content_hash(data: &[u8]) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    data.hash(&mut h);
    h.finish()
}

/// The process's browser, started on first use. A failed start fails every
/// test that asks, with the same message (it is not retried).
pub fn shared() -> Arc<Browser> {
    static B: OnceLock<Result<Arc<Browser>, String>> = OnceLock::new();
    match B.get_or_init(|| {
        Browser::start().map(|b| {
            eprintln!("browser WebGPU adapter: {}", b.adapter);
            Arc::new(b)
        })
    }) {
        Ok(b) => b.clone(),
        Err(e) => panic!(
            "KVSIEVE_BROWSER=chromium asked for the browser harness, which could not start: {e}"
        ),
    }
}

impl Browser {
    fn start() -> Result<Self, String> {
        let server =
            tiny_http::Server::http("127.0.0.1:0").map_err(|e| format!("loopback server: {e}"))?;
        let port = server
            .server_addr()
            .to_ip()
            .ok_or("loopback server has no IP address")?
            .port();
        let (job_tx, job_rx) = mpsc::channel::<Vec<u8>>();
        let (ans_tx, ans_rx) = mpsc::channel::<Answer>();
        let (hello_tx, hello_rx) = mpsc::channel::<Answer>();
        std::thread::spawn(move || serve(server, job_rx, ans_tx, hello_tx));

        let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
            .join(format!("chromium-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        let log = dir.join("chromium.log");
        let _ = std::fs::remove_file(ran_file());
        let bin = std::env::var("KVSIEVE_CHROMIUM").unwrap_or_else(|_| "chromium".into());
        launch(&bin, &dir, &log, &format!("http://127.0.0.1:{port}/"))?;
        let adapter = match hello_rx.recv_timeout(START_TIMEOUT) {
            Ok(Ok(a)) => String::from_utf8_lossy(&a).into_owned(),
            Ok(Err(e)) => return Err(format!("{e}\n{}", log_tail(&log))),
            Err(_) => {
                return Err(format!(
                    "{bin} did not load the harness page within {} s\n{}",
                    START_TIMEOUT.as_secs(),
                    log_tail(&log)
                ))
            }
        };
        Ok(Browser {
            adapter,
            jobs: job_tx,
            state: Mutex::new(State {
                answers: ans_rx,
                sent: HashSet::new(),
                ran: Vec::new(),
                held: HashMap::new(),
                jobs_run: 0,
            }),
            log,
        })
    }

    /// Sends one job (header and buffer contents) and waits for the answer.
    fn call(&self, st: &mut State, header: Value, buffers: &[&[u8]]) -> Answer {
        let head = serde_json::to_vec(&header).map_err(|e| e.to_string())?;
        let mut msg =
            Vec::with_capacity(8 + head.len() + buffers.iter().map(|b| b.len()).sum::<usize>());
        msg.extend_from_slice(&(head.len() as u32).to_le_bytes());
        msg.extend_from_slice(&head);
        msg.resize(msg.len().div_ceil(4) * 4, 0);
        for b in buffers {
            msg.extend_from_slice(b);
        }
        self.jobs
            .send(msg)
            .map_err(|_| "the loopback server stopped".to_string())?;
        match st.answers.recv_timeout(JOB_TIMEOUT) {
            Ok(a) => a,
            Err(RecvTimeoutError::Timeout) => Err(format!(
                "no answer from the browser within {} s\n{}",
                JOB_TIMEOUT.as_secs(),
                log_tail(&self.log)
            )),
            Err(RecvTimeoutError::Disconnected) => Err("the loopback server stopped".into()),
        }
    }

    /// Sources of the shaders in `keys` the page does not hold yet.
    fn new_sources<'a>(st: &mut State, keys: impl Iterator<Item = &'a PipelineKey>) -> Value {
        let mut m = serde_json::Map::new();
        for k in keys {
            if st.sent.insert(k.shader.name) {
                m.insert(k.shader.name.into(), k.shader.source.into());
            }
        }
        Value::Object(m)
    }

    /// Builds every pipeline in `keys` on the browser's device (shader
    /// compilation and pipeline creation with the pipeline's own constants),
    /// returning the first failure.
    pub fn compile(&self, keys: &[PipelineKey]) -> Result<(), String> {
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let shaders = Self::new_sources(&mut st, keys.iter());
        let compile: Vec<Value> = keys.iter().map(key_json).collect();
        let header =
            json!({"shaders": shaders, "buffers": [], "cmds": [], "drop": [], "compile": compile});
        self.call(&mut st, header, &[]).map(|_| ())
    }

    /// Pipelines that ran on the browser so far, in first-run order.
    pub fn pipelines_ran(&self) -> Vec<PipelineKey> {
        self.state
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .ran
            .clone()
    }
}

impl Replay for Browser {
    fn replay(&self, job: &ReplayJob) -> Result<Vec<Vec<u8>>, String> {
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let keys: Vec<&PipelineKey> = job
            .cmds
            .iter()
            .filter_map(|c| match c {
                ReplayCmd::Dispatch { pipeline, .. } => Some(pipeline),
                ReplayCmd::Copy { .. } => None,
            })
            .collect();
        let shaders = Self::new_sources(&mut st, keys.iter().copied());
        for k in &keys {
            if !st.ran.contains(k) {
                st.ran.push((*k).clone());
                log_ran(k);
            }
        }
        let cmds: Vec<Value> = job.cmds.iter().map(cmd_json).collect();
        st.jobs_run += 1;
        let now = st.jobs_run;
        // Send only what the page does not hold already.
        let hashes: Vec<u64> = job.buffers.iter().map(|b| content_hash(b)).collect();
        let mut send = Vec::new();
        let mut meta = Vec::new();
        for (i, b) in job.buffers.iter().enumerate() {
            let fresh = !st.held.contains_key(&job.ids[i])
                || st.held[&job.ids[i]].0 != b.len()
                || st.held[&job.ids[i]].1 != hashes[i];
            if fresh {
                send.push(b.as_slice());
            }
            st.held.insert(job.ids[i], (b.len(), hashes[i], now));
            meta.push(
                json!({"id": job.ids[i].to_string(), "size": b.len(), "send": fresh,
                             "written": job.written[i]}),
            );
        }
        let drop = evict(&mut st.held, now);
        let header = json!({"shaders": shaders, "buffers": meta, "cmds": cmds, "drop": drop});
        let out = match self.call(&mut st, header, &send) {
            Ok(out) => out,
            Err(e) => {
                // The page's buffers may be half-updated: start afresh.
                st.held.clear();
                return Err(e);
            }
        };
        let sizes: Vec<usize> = (0..job.buffers.len())
            .filter(|&i| job.written[i])
            .map(|i| job.buffers[i].len())
            .collect();
        if out.len() != sizes.iter().sum::<usize>() {
            st.held.clear();
            return Err(format!(
                "the browser returned {} bytes for written buffers of {sizes:?}",
                out.len()
            ));
        }
        let mut at = 0;
        let mut result = Vec::with_capacity(sizes.len());
        for i in (0..job.buffers.len()).filter(|&i| job.written[i]) {
            let n = job.buffers[i].len();
            let data = out[at..at + n].to_vec();
            at += n;
            st.held.insert(job.ids[i], (n, content_hash(&data), now));
            result.push(data);
        }
        Ok(result)
    }
}

/// Where each test process lists the pipelines it ran on the browser, one
/// [`key_line`] a line (`tests/portability.rs` marks them in its table).
pub fn ran_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/browser-ran")
}

/// A pipeline as one line: `shader entry NAME=value ...`.
pub fn key_line(k: &PipelineKey) -> String {
    let mut s = format!("{} {}", k.shader.name, k.entry);
    for (n, v) in &k.constants {
        s += &format!(" {n}={v}");
    }
    s
}

/// This test binary's list: `<dir>/<target name>.txt`.
fn ran_file() -> PathBuf {
    let exe = std::env::current_exe().ok();
    let name = exe
        .as_ref()
        .and_then(|p| p.file_stem())
        .and_then(|s| s.to_str())
        .and_then(|s| s.split('-').next())
        .unwrap_or("tests");
    ran_dir().join(format!("{name}.txt"))
}

fn log_ran(k: &PipelineKey) {
    use std::io::Write as _;
    let _ = std::fs::create_dir_all(ran_dir());
    if let Ok(mut f) = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(ran_file())
    {
        let _ = writeln!(f, "{}", key_line(k));
    }
}

/// Forgets the least recently used buffers (none of job `now`'s) until the
/// page holds at most [`HELD_BYTES`]; returns their ids for the page to drop.
fn evict(held: &mut HashMap<u64, (usize, u64, u64)>, now: u64) -> Vec<String> {
    let mut total: usize = held.values().map(|v| v.0).sum();
    let mut order: Vec<(u64, u64)> = held
        .iter()
        .filter(|(_, v)| v.2 != now)
        .map(|(id, v)| (v.2, *id))
        .collect();
    order.sort_unstable();
    let mut drop = Vec::new();
    for (_, id) in order {
        if total <= HELD_BYTES {
            break;
        }
        total -= held.remove(&id).map_or(0, |v| v.0);
        drop.push(id.to_string());
    }
    drop
}

fn key_json(k: &PipelineKey) -> Value {
    let constants: serde_json::Map<String, Value> = k
        .constants
        .iter()
        .map(|(n, v)| ((*n).to_string(), json!(v)))
        .collect();
    json!({"shader": k.shader.name, "entry": k.entry, "constants": constants})
}

fn cmd_json(c: &ReplayCmd) -> Value {
    match c {
        ReplayCmd::Dispatch {
            pipeline,
            params,
            bindings,
            groups,
            indirect,
        } => {
            let mut v = key_json(pipeline);
            v["op"] = "dispatch".into();
            v["params"] = json!(params);
            v["bindings"] = json!(bindings);
            v["groups"] = json!(groups);
            v["indirect"] = json!(indirect);
            v
        }
        ReplayCmd::Copy {
            src,
            src_offset,
            dst,
            dst_offset,
            size,
        } => json!({"op": "copy", "src": src, "src_offset": src_offset,
                    "dst": dst, "dst_offset": dst_offset, "size": size}),
    }
}

/// Serves the page and moves jobs and answers between it and the test threads
/// (the page makes one request at a time, so one thread serves it).
fn serve(
    server: tiny_http::Server,
    jobs: Receiver<Vec<u8>>,
    answers: Sender<Answer>,
    hello: Sender<Answer>,
) {
    let mut ready = false;
    for mut req in server.incoming_requests() {
        let mut body = Vec::new();
        let _ = req.as_reader().read_to_end(&mut body);
        let path = req.url().to_string();
        let resp = match (req.method(), path.as_str()) {
            (tiny_http::Method::Get, "/") => {
                tiny_http::Response::from_data(PAGE.as_bytes().to_vec()).with_header(
                    "Content-Type: text/html; charset=utf-8"
                        .parse::<tiny_http::Header>()
                        .expect("static header"),
                )
            }
            // Long poll; the page asks again after an empty answer.
            (tiny_http::Method::Get, "/job") => match jobs.recv_timeout(Duration::from_secs(20)) {
                Ok(job) => tiny_http::Response::from_data(job),
                Err(RecvTimeoutError::Timeout) => {
                    tiny_http::Response::from_data(Vec::new()).with_status_code(204)
                }
                Err(RecvTimeoutError::Disconnected) => return,
            },
            (tiny_http::Method::Post, "/hello") => {
                ready = true;
                let _ = hello.send(Ok(body));
                tiny_http::Response::from_data(Vec::new())
            }
            (tiny_http::Method::Post, "/result") => {
                let _ = answers.send(Ok(body));
                tiny_http::Response::from_data(Vec::new())
            }
            (tiny_http::Method::Post, "/error") => {
                let msg = String::from_utf8_lossy(&body).into_owned();
                let _ = if ready {
                    answers.send(Err(msg))
                } else {
                    hello.send(Err(msg))
                };
                tiny_http::Response::from_data(Vec::new())
            }
            _ => tiny_http::Response::from_data(Vec::new()).with_status_code(404),
        };
        let _ = req.respond(resp);
    }
}

/// Process group of the browser, killed when this process exits.
static GROUP: std::sync::atomic::AtomicI32 = std::sync::atomic::AtomicI32::new(0);

extern "C" fn kill_browser() {
    let g = GROUP.load(std::sync::atomic::Ordering::SeqCst);
    if g > 0 {
        // SAFETY: kill(2) on a process group this process created.
        unsafe {
            libc::kill(-g, libc::SIGKILL);
        }
    }
}

/// Starts the browser from a thread that lives as long as the process (the
/// parent-death signal follows the spawning thread), in its own process group
/// that an exit handler kills.
fn launch(
    bin: &str,
    dir: &std::path::Path,
    log: &std::path::Path,
    url: &str,
) -> Result<(), String> {
    use std::os::unix::process::CommandExt;
    let stderr = std::fs::File::create(log).map_err(|e| format!("{}: {e}", log.display()))?;
    let mut cmd = std::process::Command::new(bin);
    cmd.args([
        "--headless=new",
        // Root in a container has no usable sandbox.
        "--no-sandbox",
        "--enable-unsafe-webgpu",
        "--use-webgpu-adapter=swiftshader",
        "--disable-dev-shm-usage",
        "--no-first-run",
        "--no-default-browser-check",
        "--enable-logging=stderr",
        "--v=0",
    ])
    .arg(format!("--user-data-dir={}", dir.join("profile").display()))
    .arg(url)
    .stdin(std::process::Stdio::null())
    .stdout(std::process::Stdio::null())
    .stderr(stderr)
    .process_group(0);
    // SAFETY: prctl is async-signal-safe and touches only the child.
    unsafe {
        cmd.pre_exec(|| {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            Ok(())
        });
    }
    let (tx, rx) = mpsc::channel();
    let bin = bin.to_string();
    std::thread::spawn(move || match cmd.spawn() {
        Ok(child) => {
            GROUP.store(child.id() as i32, std::sync::atomic::Ordering::SeqCst);
            // SAFETY: registers a plain extern "C" function.
            unsafe {
                libc::atexit(kill_browser);
            }
            let _ = tx.send(Ok(()));
            loop {
                std::thread::park();
            }
        }
        Err(e) => {
            let _ = tx.send(Err(format!(
                "cannot run {bin}: {e} (install Debian's chromium, or set KVSIEVE_CHROMIUM)"
            )));
        }
    });
    rx.recv()
        .map_err(|_| "browser launcher thread died".to_string())?
}

/// The end of chromium's log, without the D-Bus noise of a machine without one.
fn log_tail(log: &std::path::Path) -> String {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let lines: Vec<&str> = text.lines().filter(|l| !l.contains("dbus")).collect();
    format!(
        "chromium log ({}), last lines:\n{}",
        log.display(),
        lines[lines.len().saturating_sub(30)..].join("\n")
    )
}
