//! Safetensors checkpoints (one file or sharded with `model.safetensors.index.json`),
//! memory-mapped; f32, bf16 and f16 tensors are handed out as stored.

use crate::error::{Error, Result};
use crate::quant::DType;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// The tensors of a model directory.
pub struct Weights {
    /// The model directory (named in errors).
    dir: PathBuf,
    maps: Vec<(PathBuf, memmap2::Mmap)>,
    /// tensor name -> index into `maps`
    index: HashMap<String, usize>,
}

fn err(path: &Path, msg: impl std::fmt::Display) -> Error {
    Error::format(path, msg.to_string())
}

impl Weights {
    /// Opens `model.safetensors` or the shards listed in `model.safetensors.index.json`.
    pub fn open(dir: &Path) -> Result<Self> {
        let single = dir.join("model.safetensors");
        let index_path = dir.join("model.safetensors.index.json");
        let files: Vec<PathBuf> = if single.exists() {
            vec![single]
        } else if index_path.exists() {
            let text =
                std::fs::read_to_string(&index_path).map_err(|e| Error::io(&index_path, e))?;
            let v: serde_json::Value = serde_json::from_str(&text)
                .map_err(|e| err(&index_path, format!("malformed: {e}")))?;
            let map = v
                .get("weight_map")
                .and_then(|m| m.as_object())
                .ok_or_else(|| err(&index_path, "no weight_map"))?;
            let mut files: Vec<String> = map
                .values()
                .filter_map(|f| f.as_str().map(str::to_string))
                .collect();
            files.sort();
            files.dedup();
            // Shards are files beside the index: a path elsewhere (absolute, with
            // `..` or a separator) could open any file on the machine, a FIFO too.
            let mut shards = Vec::with_capacity(files.len());
            for f in files {
                let plain = matches!(
                    Path::new(&f).components().collect::<Vec<_>>()[..],
                    [std::path::Component::Normal(_)]
                );
                if !plain {
                    return Err(err(
                        &index_path,
                        format!("shard {f:?} is not a file name in the model directory"),
                    ));
                }
                shards.push(dir.join(f));
            }
            shards
        } else {
            return Err(err(
                dir,
                "no model.safetensors or model.safetensors.index.json",
            ));
        };
        let mut maps = Vec::new();
        let mut index = HashMap::new();
        for path in files {
            let f = std::fs::File::open(&path).map_err(|e| Error::io(&path, e))?;
            // SAFETY: read-only mapping of a file we do not modify.
            let map = unsafe { memmap2::Mmap::map(&f) }.map_err(|e| Error::io(&path, e))?;
            let names = safetensors::SafeTensors::read_metadata(&map)
                .map_err(|e| err(&path, format!("corrupted safetensors header: {e}")))?
                .1
                .tensors()
                .into_keys()
                .collect::<Vec<_>>();
            for n in names {
                index.insert(n, maps.len());
            }
            maps.push((path, map));
        }
        Ok(Self {
            dir: dir.to_path_buf(),
            maps,
            index,
        })
    }

    /// True when the checkpoint holds `name`.
    pub fn has(&self, name: &str) -> bool {
        self.index.contains_key(name)
    }

    /// Stored type and element count of every tensor (from the headers).
    pub fn stored(&self) -> Vec<(DType, u64)> {
        let mut out = Vec::new();
        for (_, map) in &self.maps {
            let Ok(st) = safetensors::SafeTensors::deserialize(map) else {
                continue;
            };
            for (_, t) in st.tensors() {
                let dtype = match t.dtype() {
                    safetensors::Dtype::F16 => DType::F16,
                    safetensors::Dtype::BF16 => DType::BF16,
                    _ => DType::F32,
                };
                let n = t.shape().iter().map(|&d| d as u64).product();
                out.push((dtype, n));
            }
        }
        out
    }

    /// A tensor's stored type, shape and bytes (borrowed from the mapping).
    pub fn raw(&self, name: &str) -> Result<(DType, Vec<usize>, &[u8])> {
        let &i = self
            .index
            .get(name)
            .ok_or_else(|| Error::format(&self.dir, format!("tensor {name} is missing")))?;
        let (path, map) = &self.maps[i];
        let st = safetensors::SafeTensors::deserialize(map)
            .map_err(|e| err(path, format!("corrupted safetensors: {e}")))?;
        let t = st
            .tensor(name)
            .map_err(|e| err(path, format!("{name}: {e}")))?;
        let dtype = match t.dtype() {
            safetensors::Dtype::F16 => DType::F16,
            safetensors::Dtype::BF16 => DType::BF16,
            safetensors::Dtype::F32 => DType::F32,
            other => {
                return Err(Error::Unsupported(format!(
                    "tensor {name}: dtype {other:?} (f32, bf16, f16 supported)"
                )))
            }
        };
        let shape = t.shape().to_vec();
        // The view borrows `map`; re-slice it from the mapping itself.
        let data = t.data();
        let off = data.as_ptr() as usize - map.as_ptr() as usize;
        Ok((dtype, shape, &map[off..off + data.len()]))
    }
}
