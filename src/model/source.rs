//! Tensor sources: model code asks for a tensor by its Hugging Face name and
//! expected shape and gets it in its stored type, borrowed from a memory
//! mapping where it can be (in the manner of candle's `VarBuilder`). Two
//! sources: a safetensors directory ([`Weights`]) and a GGUF file read in place
//! ([`GgufModel`], which also brings its config, tokenizer and chat template).

use super::weights::Weights;
use super::ModelConfig;
use crate::convert::gguf::{self, Gguf, TensorInfo};
use crate::error::{Error, Result};
use crate::quant::DType;
use std::borrow::Cow;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// A tensor in its stored type: row-major `shape` (Hugging Face order), bytes
/// as whole blocks of `dtype` per row.
pub struct TensorData<'a> {
    /// Stored type.
    pub dtype: DType,
    /// Shape, slowest dimension first.
    pub shape: Vec<usize>,
    /// The values (borrowed from the file, or permuted rows).
    pub bytes: Cow<'a, [u8]>,
}

/// Where a model's tensors come from.
pub trait TensorSource {
    /// True when the source holds `name`.
    fn has(&self, name: &str) -> bool;
    /// Tensor `name`, checked to have `shape`.
    fn tensor(&self, name: &str, shape: &[usize]) -> Result<TensorData<'_>>;
    /// Stored type and element count of every tensor (for sizing a load
    /// before it starts).
    fn stored(&self) -> Vec<(DType, u64)>;
}

fn check_shape(name: &str, got: &[usize], want: &[usize]) -> Result<()> {
    if got != want {
        return Err(Error::Shape {
            op: "load",
            msg: format!("tensor {name} has shape {got:?}, the config implies {want:?}"),
        });
    }
    Ok(())
}

impl TensorSource for Weights {
    fn has(&self, name: &str) -> bool {
        Weights::has(self, name)
    }
    fn stored(&self) -> Vec<(DType, u64)> {
        Weights::stored(self)
    }
    fn tensor(&self, name: &str, shape: &[usize]) -> Result<TensorData<'_>> {
        let (dtype, got, bytes) = self.raw(name)?;
        check_shape(name, &got, shape)?;
        Ok(TensorData {
            dtype,
            shape: got,
            bytes: Cow::Borrowed(bytes),
        })
    }
}

/// A tokenizer as `tokenizer.json` and `tokenizer_config.json` values.
pub type TokenizerParts = (serde_json::Value, serde_json::Value);

/// A GGUF model file, memory-mapped and read in place.
pub struct GgufModel {
    path: PathBuf,
    map: memmap2::Mmap,
    data_start: usize,
    /// Hugging Face name -> directory entry.
    tensors: HashMap<String, TensorInfo>,
    /// llama.cpp permutes Q and K rows for its RoPE layout in `llama` files.
    permuted: bool,
    heads: usize,
    kv_heads: usize,
}

impl GgufModel {
    /// Maps and parses `path`: the tensor source, the config its metadata
    /// describe, and its tokenizer as `tokenizer.json` and
    /// `tokenizer_config.json` values (chat template, special tokens).
    pub fn open(path: &Path) -> Result<(Self, ModelConfig, TokenizerParts)> {
        let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
        // SAFETY: read-only mapping of a file we do not modify.
        let map = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| Error::io(path, e))?;
        let named = |e: Error| match e {
            Error::Unsupported(m) => Error::Unsupported(format!("{}: {m}", path.display())),
            other => other.in_file(path),
        };
        let (config, tokenizer, tensors, data_start, permuted) = {
            let g = Gguf::parse(&map).map_err(named)?;
            let cfg_json = crate::convert::config_json(&g).map_err(named)?;
            let config = ModelConfig::from_json(&cfg_json.to_string()).map_err(named)?;
            let tokenizer = crate::convert::tokenizer::from_gguf(&g).map_err(named)?;
            let mut tensors = HashMap::new();
            for t in &g.tensors {
                // Tensors without a Hugging Face name (rope frequency tables and the
                // like) are not used by the forward.
                if let Some(n) = crate::convert::hf_name(&t.name) {
                    tensors.insert(n, t.clone());
                }
            }
            let permuted = cfg_json["model_type"] == "llama";
            (config, tokenizer, tensors, g.data_start(), permuted)
        };
        let source = Self {
            path: path.to_path_buf(),
            heads: config.heads,
            kv_heads: config.kv_heads,
            map,
            data_start,
            tensors,
            permuted,
        };
        Ok((source, config, tokenizer))
    }
}

impl TensorSource for GgufModel {
    fn has(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }
    fn stored(&self) -> Vec<(DType, u64)> {
        self.tensors
            .values()
            .filter_map(|t| {
                let n = t.dims.iter().try_fold(1u64, |a, &d| a.checked_mul(d))?;
                Some((DType::from_ggml(t.type_id)?, n))
            })
            .collect()
    }
    fn tensor(&self, name: &str, shape: &[usize]) -> Result<TensorData<'_>> {
        let t = self
            .tensors
            .get(name)
            .ok_or_else(|| Error::format(&self.path, format!("tensor {name} is missing")))?;
        let (dtype, bytes) =
            gguf::tensor_bytes(&self.map, self.data_start, t).map_err(|e| e.in_file(&self.path))?;
        let got: Vec<usize> = t.dims.iter().rev().map(|&d| d as usize).collect();
        check_shape(name, &got, shape)?;
        let heads = if name.ends_with("q_proj.weight") {
            self.heads
        } else if name.ends_with("k_proj.weight") {
            self.kv_heads
        } else {
            0
        };
        if !self.permuted || heads == 0 {
            return Ok(TensorData {
                dtype,
                shape: got,
                bytes: Cow::Borrowed(bytes),
            });
        }
        // Undo the permutation on whole rows (blocks never cross rows).
        let rows = got[0];
        let row_bytes = bytes.len() / rows.max(1);
        let per = rows / heads;
        if per * heads != rows || !per.is_multiple_of(2) {
            return Err(Error::format(
                &self.path,
                format!("tensor {name}: {rows} rows do not split into {heads} heads of even size"),
            ));
        }
        let half = per / 2;
        let mut out = vec![0u8; bytes.len()];
        for h in 0..heads {
            for s in 0..2 {
                for i in 0..half {
                    let hf = h * per + s * half + i;
                    let gg = h * per + 2 * i + s;
                    out[hf * row_bytes..(hf + 1) * row_bytes]
                        .copy_from_slice(&bytes[gg * row_bytes..(gg + 1) * row_bytes]);
                }
            }
        }
        Ok(TensorData {
            dtype,
            shape: got,
            bytes: Cow::Owned(out),
        })
    }
}
