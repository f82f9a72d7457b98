//! Per-model state learned at run time and kept across processes, so that a
//! new process starts where the last one left off: Tidal's calibrated layer,
//! the Token Recycling adjacency matrix, the drafts accepted per drafter and
//! the verify-cost curve of each adapter. Files live in [`Options::state_dir`](super::Options::state_dir)
//! under a key that changes when the model's files do. Keeping state is best
//! effort: a directory that cannot be written costs a new process the
//! measurement, and a file that does not check out is ignored.

use super::Engine;
use crate::error::Result;
use crate::ops::ADJ_WIDTH;
use crate::speculative::Acceptance;
use std::path::{Path, PathBuf};

impl Engine {
    /// The Token Recycling adjacency matrix (`[vocab, 8]` successor token
    /// ids, row by token), once speculation has made or loaded it. It is kept
    /// across requests and, per model, across processes.
    pub fn recycling_matrix(&mut self) -> Result<Option<Vec<u32>>> {
        self.runner.recycling()
    }

    /// The verify-cost curve measured earlier on this adapter, if kept.
    pub(super) fn saved_verify_costs(&self) -> Option<Vec<(usize, f64)>> {
        let files = self.state.as_ref()?;
        let adapter = self.backend_name();
        let bytes = files.read(&costs_name(&adapter), 1 << 16)?;
        decode_costs(&bytes, &adapter, crate::ops::MAX_NODES)
    }

    pub(super) fn save_verify_costs(&self, costs: &[(usize, f64)]) {
        if let Some(files) = &self.state {
            let adapter = self.backend_name();
            files.write(&costs_name(&adapter), &encode_costs(&adapter, costs));
        }
    }

    /// Folds the last speculative request's verify steps into the acceptance record.
    pub(super) fn fold_pending(&mut self) {
        if let Some((spec, size, steps, tokens)) = self.pending.take() {
            let s = &self.stats;
            let steps = s.verify_steps.saturating_sub(steps) as u64;
            let tokens = s.verify_tokens.saturating_sub(tokens) as u64;
            self.acceptance.record(spec, size, steps, tokens);
        }
    }

    /// Before the first speculative request: the matrix and the acceptance
    /// record the last process left, if any (a file that does not check out
    /// is ignored).
    pub(super) fn restore_speculation(&mut self) -> Result<()> {
        if std::mem::replace(&mut self.speculation_restored, true) {
            return Ok(());
        }
        let vocab = self.config.vocab;
        let Some(files) = &self.state else {
            return Ok(());
        };
        if let Some(a) = files
            .read(ACCEPTANCE_FILE, 1 << 16)
            .and_then(|b| serde_json::from_slice::<Acceptance>(&b).ok())
            .filter(|a| a.seen.values().all(|v| v.2.is_finite() && v.2 >= 0.0))
        {
            // What this process saw before the restore counts too.
            for (k, v) in a.seen {
                let e = self.acceptance.seen.entry(k).or_default();
                (e.0, e.1, e.2) = (e.0 + v.0, e.1 + v.1, e.2 + v.2);
            }
        }
        let max = 16 + (vocab * ADJ_WIDTH * 4) as u64;
        if let Some(adj) = files
            .read(RECYCLING_FILE, max)
            .and_then(|b| decode_recycling(&b, vocab, ADJ_WIDTH))
        {
            self.runner.set_recycling(&adj)?;
        }
        Ok(())
    }
}

impl Drop for Engine {
    /// Keeps the Token Recycling matrix for the next process, when this
    /// engine speculated.
    fn drop(&mut self) {
        if !self.speculation_restored || self.runner.device_lost().is_some() {
            return;
        }
        self.fold_pending();
        if let (Some(files), Ok(text)) = (&self.state, serde_json::to_vec(&self.acceptance)) {
            files.write(ACCEPTANCE_FILE, &text);
        }
        if let (Some(files), Ok(Some(adj))) = (&self.state, self.runner.recycling()) {
            files.write(
                RECYCLING_FILE,
                &encode_recycling(&adj, self.config.vocab, ADJ_WIDTH),
            );
        }
    }
}

const RECYCLING_FILE: &str = "token-recycling.bin";
const ACCEPTANCE_FILE: &str = "acceptance.json";

/// Where one model's state files are.
#[derive(Clone, Debug)]
pub(super) struct StateFiles {
    dir: PathBuf,
    key: String,
}

impl StateFiles {
    /// Files for the model at `model` under `dir` (default `<cache>/state`);
    /// `None` when the model's files cannot be read for a key.
    pub fn new(model: &Path, dir: Option<&Path>) -> Option<Self> {
        Some(Self {
            dir: dir.map_or_else(
                || crate::convert::cache_dir().join("state"),
                Path::to_path_buf,
            ),
            key: model_key(model)?,
        })
    }

    /// The file for `what` (a short name) of this model.
    pub fn path(&self, what: &str) -> PathBuf {
        self.dir.join(format!("{}-{what}", self.key))
    }

    /// The file's bytes when it exists and holds at most `max` bytes.
    pub fn read(&self, what: &str, max: u64) -> Option<Vec<u8>> {
        let path = self.path(what);
        if path.metadata().ok()?.len() > max {
            return None;
        }
        std::fs::read(path).ok()
    }

    /// Writes the file whole (a temporary file renamed over it, so a reader
    /// or a second writer never sees half of one).
    pub fn write(&self, what: &str, bytes: &[u8]) {
        let path = self.path(what);
        let tmp = self
            .dir
            .join(format!(".{}-{what}.{}", self.key, std::process::id()));
        let done = std::fs::create_dir_all(&self.dir)
            .and_then(|_| std::fs::write(&tmp, bytes))
            .and_then(|_| std::fs::rename(&tmp, &path));
        if done.is_err() {
            let _ = std::fs::remove_file(&tmp);
        }
    }
}

/// A name for the model at `path` that changes when its files do: a hash of
/// the canonical path and each file's name, size and modification time.
fn model_key(path: &Path) -> Option<String> {
    use sha2::{Digest, Sha256};
    let path = path.canonicalize().ok()?;
    let mut files = vec![path.clone()];
    if path.is_dir() {
        files = std::fs::read_dir(&path)
            .ok()?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.is_file())
            .collect();
        files.sort();
    }
    let mut h = Sha256::new();
    h.update(path.to_string_lossy().as_bytes());
    for f in files {
        let m = f.metadata().ok()?;
        let t = m
            .modified()
            .ok()?
            .duration_since(std::time::UNIX_EPOCH)
            .ok()?;
        h.update(format!("{}:{}:{}\n", f.display(), m.len(), t.as_nanos()).as_bytes());
    }
    Some(hex16(&h.finalize()))
}

/// The first 16 hex digits of a digest: short file names that do not collide
/// in practice.
fn hex16(digest: &[u8]) -> String {
    digest[..8].iter().map(|b| format!("{b:02x}")).collect()
}

const RECYCLING_MAGIC: &[u8; 4] = b"KVTR";
const RECYCLING_VERSION: u32 = 1;

/// The Token Recycling matrix's file: magic, version, vocabulary, width, then
/// the `[vocab, width]` token ids (little-endian u32).
pub(super) fn encode_recycling(adj: &[u32], vocab: usize, width: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(16 + adj.len() * 4);
    out.extend_from_slice(RECYCLING_MAGIC);
    for w in [RECYCLING_VERSION, vocab as u32, width as u32] {
        out.extend_from_slice(&w.to_le_bytes());
    }
    out.extend_from_slice(bytemuck::cast_slice(adj));
    out
}

/// The matrix in `bytes`, if it is one for this vocabulary and width with
/// every entry a token id.
pub(super) fn decode_recycling(bytes: &[u8], vocab: usize, width: usize) -> Option<Vec<u32>> {
    let want = 16 + vocab * width * 4;
    if bytes.len() != want || &bytes[..4] != RECYCLING_MAGIC {
        return None;
    }
    let word = |i: usize| u32::from_le_bytes([bytes[i], bytes[i + 1], bytes[i + 2], bytes[i + 3]]);
    if (word(4), word(8), word(12)) != (RECYCLING_VERSION, vocab as u32, width as u32) {
        return None;
    }
    // Read as written: `encode_recycling` casts the ids' bytes.
    let adj: Vec<u32> = bytemuck::pod_collect_to_vec(&bytes[16..]);
    adj.iter().all(|&t| (t as usize) < vocab).then_some(adj)
}

/// Bumped when the verify-cost measurement changes.
const COSTS_VERSION: u64 = 1;

/// The verify-cost curve's file for `adapter`.
pub(super) fn costs_name(adapter: &str) -> String {
    use sha2::{Digest, Sha256};
    format!(
        "verify-costs-{}.json",
        hex16(&Sha256::digest(adapter.as_bytes()))
    )
}

pub(super) fn encode_costs(adapter: &str, costs: &[(usize, f64)]) -> Vec<u8> {
    serde_json::json!({ "version": COSTS_VERSION, "adapter": adapter, "costs": costs })
        .to_string()
        .into_bytes()
}

/// The curve in `bytes`, if it was measured on `adapter` and is a usable one
/// (sizes ascending from 1 within `max_nodes`, times positive and finite).
pub(super) fn decode_costs(
    bytes: &[u8],
    adapter: &str,
    max_nodes: usize,
) -> Option<Vec<(usize, f64)>> {
    let v: serde_json::Value = serde_json::from_slice(bytes).ok()?;
    if v.get("version")?.as_u64()? != COSTS_VERSION || v.get("adapter")?.as_str()? != adapter {
        return None;
    }
    let costs: Vec<(usize, f64)> = serde_json::from_value(v.get("costs")?.clone()).ok()?;
    let sizes_ok = costs.first()?.0 == 1
        && costs.windows(2).all(|w| w[0].0 < w[1].0)
        && costs.last()?.0 <= max_nodes;
    let times_ok = costs.iter().all(|c| c.1.is_finite() && c.1 > 0.0);
    (sizes_ok && times_ok).then_some(costs)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recycling_files_round_trip_and_bad_ones_are_refused() {
        let adj: Vec<u32> = (0..40).map(|i| i % 5).collect();
        let bytes = encode_recycling(&adj, 5, 8);
        assert_eq!(decode_recycling(&bytes, 5, 8), Some(adj.clone()));
        assert_eq!(decode_recycling(&bytes, 6, 8), None, "another vocabulary");
        assert_eq!(
            decode_recycling(&bytes[..bytes.len() - 4], 5, 8),
            None,
            "short"
        );
        let mut bad = bytes.clone();
        bad[16] = 9; // token 9 in a vocabulary of 5
        assert_eq!(decode_recycling(&bad, 5, 8), None);
        let mut bad = bytes;
        bad[0] = b'X';
        assert_eq!(decode_recycling(&bad, 5, 8), None);
    }

    #[test]
    fn cost_files_round_trip_and_bad_ones_are_refused() {
        let costs = vec![(1, 0.01), (2, 0.011), (4, 0.013)];
        let bytes = encode_costs("gpu A", &costs);
        assert_eq!(decode_costs(&bytes, "gpu A", 128), Some(costs));
        assert_eq!(decode_costs(&bytes, "gpu B", 128), None, "another adapter");
        assert_eq!(
            decode_costs(&bytes, "gpu A", 2),
            None,
            "sizes past the limit"
        );
        for bad in [
            r#"{"version":1,"adapter":"gpu A","costs":[[2,0.1]]}"#,
            r#"{"version":1,"adapter":"gpu A","costs":[[1,0.1],[1,0.2]]}"#,
            r#"{"version":1,"adapter":"gpu A","costs":[[1,-0.1]]}"#,
            r#"{"version":1,"adapter":"gpu A","costs":[]}"#,
            "not json",
        ] {
            assert_eq!(decode_costs(bad.as_bytes(), "gpu A", 128), None, "{bad}");
        }
        assert!(
            costs_name("gpu A").ends_with(".json") && costs_name("gpu A") != costs_name("gpu B")
        );
    }
}
