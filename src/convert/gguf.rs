//! A GGUF (v2/v3) reader over the file's bytes: metadata, tensor directory, and
//! each tensor's stored bytes and type ([`crate::quant`] decodes them).

use crate::error::{Error, Result};
use crate::quant::{self, DType};
use std::collections::BTreeMap;

/// A metadata value.
#[derive(Clone, Debug, PartialEq)]
pub enum Value {
    /// Any unsigned integer type.
    U(u64),
    /// Any signed integer type.
    I(i64),
    /// f32 or f64.
    F(f64),
    /// bool.
    Bool(bool),
    /// string.
    Str(String),
    /// array.
    Array(Vec<Value>),
}

impl Value {
    /// As an unsigned integer.
    pub fn as_u64(&self) -> Option<u64> {
        match self {
            Value::U(v) => Some(*v),
            Value::I(v) if *v >= 0 => Some(*v as u64),
            _ => None,
        }
    }
    /// As a float.
    pub fn as_f64(&self) -> Option<f64> {
        match self {
            Value::F(v) => Some(*v),
            Value::U(v) => Some(*v as f64),
            Value::I(v) => Some(*v as f64),
            _ => None,
        }
    }
    /// As a string.
    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::Str(s) => Some(s),
            _ => None,
        }
    }
}

/// One tensor's directory entry.
#[derive(Clone, Debug)]
pub struct TensorInfo {
    /// GGUF name (e.g. `blk.0.attn_q.weight`).
    pub name: String,
    /// Dimensions, fastest first (ggml order: `[cols, rows]` for matrices).
    pub dims: Vec<u64>,
    /// Raw type id.
    pub type_id: u32,
    /// Offset in the data section.
    pub offset: u64,
}

impl TensorInfo {
    /// Number of elements.
    pub fn elements(&self) -> u64 {
        self.dims.iter().product()
    }
}

/// A parsed GGUF file over its bytes.
pub struct Gguf<'a> {
    bytes: &'a [u8],
    /// Metadata.
    pub meta: BTreeMap<String, Value>,
    /// Tensors in file order.
    pub tensors: Vec<TensorInfo>,
    data_start: usize,
}

struct Cursor<'a> {
    b: &'a [u8],
    pos: usize,
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8]> {
        let end = self
            .pos
            .checked_add(n)
            .filter(|&e| e <= self.b.len())
            .ok_or_else(|| {
                Error::malformed(format!(
                    "GGUF truncated: need {n} bytes at offset {}",
                    self.pos
                ))
            })?;
        let s = &self.b[self.pos..end];
        self.pos = end;
        Ok(s)
    }
    fn u32(&mut self) -> Result<u32> {
        Ok(u32::from_le_bytes(
            self.take(4)?.try_into().map_err(|_| bad("u32"))?,
        ))
    }
    fn u64(&mut self) -> Result<u64> {
        Ok(u64::from_le_bytes(
            self.take(8)?.try_into().map_err(|_| bad("u64"))?,
        ))
    }
    fn string(&mut self) -> Result<String> {
        let n = self.u64()? as usize;
        if n > self.b.len() {
            return Err(bad("string length"));
        }
        Ok(String::from_utf8_lossy(self.take(n)?).into_owned())
    }
    fn value(&mut self, ty: u32, depth: usize) -> Result<Value> {
        let v = match ty {
            0 => Value::U(self.take(1)?[0] as u64),
            1 => Value::I(self.take(1)?[0] as i8 as i64),
            2 => Value::U(
                u16::from_le_bytes(self.take(2)?.try_into().map_err(|_| bad("u16"))?) as u64,
            ),
            3 => Value::I(
                i16::from_le_bytes(self.take(2)?.try_into().map_err(|_| bad("i16"))?) as i64,
            ),
            4 => Value::U(self.u32()? as u64),
            5 => Value::I(self.u32()? as i32 as i64),
            6 => Value::F(f32::from_bits(self.u32()?) as f64),
            7 => Value::Bool(self.take(1)?[0] != 0),
            8 => Value::Str(self.string()?),
            9 => {
                if depth > 2 {
                    return Err(bad("nested arrays"));
                }
                let ety = self.u32()?;
                let n = self.u64()? as usize;
                if n > self.b.len() {
                    return Err(bad("array length"));
                }
                let mut items = Vec::with_capacity(n);
                for _ in 0..n {
                    items.push(self.value(ety, depth + 1)?);
                }
                Value::Array(items)
            }
            10 => Value::U(self.u64()?),
            11 => Value::I(self.u64()? as i64),
            12 => Value::F(f64::from_bits(self.u64()?)),
            other => return Err(bad(&format!("metadata type {other}"))),
        };
        Ok(v)
    }
}

/// [`Gguf::raw`] over a file's bytes and data offset (for holders of the
/// mapping that do not keep the parsed metadata).
pub fn tensor_bytes<'b>(
    bytes: &'b [u8],
    data_start: usize,
    t: &TensorInfo,
) -> Result<(DType, &'b [u8])> {
    let ty = DType::from_ggml(t.type_id).ok_or_else(|| {
        Error::Unsupported(format!(
            "tensor {}: GGML type {} is not supported (F32, F16, BF16, Q8_0, Q4_0, Q4_1, \
             Q5_0, Q5_1, Q4_K, Q5_K, Q6_K)",
            t.name, t.type_id
        ))
    })?;
    let n = t
        .dims
        .iter()
        .try_fold(1u64, |a, &d| a.checked_mul(d))
        .ok_or_else(|| bad(&format!("tensor {} dimensions {:?}", t.name, t.dims)))?;
    let size = ty.bytes_for(n).ok_or_else(|| {
        bad(&format!(
            "tensor {} size: {n} values are not whole {ty} blocks",
            t.name
        ))
    })?;
    let start = (data_start as u64).checked_add(t.offset);
    let end = start.and_then(|s| s.checked_add(size));
    match (start, end) {
        (Some(s), Some(e)) if e <= bytes.len() as u64 => Ok((ty, &bytes[s as usize..e as usize])),
        _ => Err(Error::malformed(format!(
            "GGUF truncated: tensor {} ({size} bytes at offset {}) runs past the end of the file",
            t.name, t.offset
        ))),
    }
}

fn bad(what: &str) -> Error {
    Error::malformed(format!("malformed GGUF: bad {what}"))
}

impl<'a> Gguf<'a> {
    /// Parses the header, metadata and tensor directory.
    pub fn parse(bytes: &'a [u8]) -> Result<Self> {
        let mut c = Cursor { b: bytes, pos: 0 };
        if c.take(4)? != b"GGUF" {
            return Err(Error::malformed("not a GGUF file (bad magic)"));
        }
        let version = c.u32()?;
        if !(2..=3).contains(&version) {
            return Err(Error::malformed(format!(
                "GGUF version {version} unsupported (2 or 3)"
            )));
        }
        let n_tensors = c.u64()? as usize;
        let n_kv = c.u64()? as usize;
        let mut meta = BTreeMap::new();
        for _ in 0..n_kv {
            let key = c.string()?;
            let ty = c.u32()?;
            meta.insert(key, c.value(ty, 0)?);
        }
        let mut tensors = Vec::with_capacity(n_tensors.min(1 << 16));
        for _ in 0..n_tensors {
            let name = c.string()?;
            let nd = c.u32()? as usize;
            if nd > 4 {
                return Err(bad("tensor rank"));
            }
            let mut dims = Vec::with_capacity(nd);
            for _ in 0..nd {
                dims.push(c.u64()?);
            }
            let type_id = c.u32()?;
            let offset = c.u64()?;
            tensors.push(TensorInfo {
                name,
                dims,
                type_id,
                offset,
            });
        }
        let align = meta
            .get("general.alignment")
            .and_then(Value::as_u64)
            .unwrap_or(32)
            .max(1) as usize;
        let data_start = c.pos.div_ceil(align) * align;
        Ok(Self {
            bytes,
            meta,
            tensors,
            data_start,
        })
    }

    /// Byte offset of the data section in the file.
    pub fn data_start(&self) -> usize {
        self.data_start
    }

    /// A metadata value by key.
    pub fn get(&self, key: &str) -> Option<&Value> {
        self.meta.get(key)
    }

    /// A tensor's directory entry by name.
    pub fn tensor(&self, name: &str) -> Option<&TensorInfo> {
        self.tensors.iter().find(|t| t.name == name)
    }

    /// A tensor's stored type and bytes, checked against the file: a supported
    /// type, a whole number of blocks, data inside the file.
    pub fn raw(&self, t: &TensorInfo) -> Result<(DType, &'a [u8])> {
        tensor_bytes(self.bytes, self.data_start, t)
    }

    /// Dequantizes a tensor to f32 (values computed exactly as ggml's
    /// `dequantize_row_*`).
    pub fn dequantize(&self, t: &TensorInfo) -> Result<Vec<f32>> {
        let (ty, raw) = self.raw(t)?;
        let mut out = vec![0.0; raw.len() / ty.block().1 * ty.block().0];
        quant::dequantize(ty, raw, &mut out)?;
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use half::{bf16, f16};

    /// Builds a GGUF holding one tensor of each supported type.
    fn build(tensors: &[(&str, u32, Vec<u64>, Vec<u8>)]) -> Vec<u8> {
        let mut b = Vec::new();
        let s = |b: &mut Vec<u8>, x: &str| {
            b.extend((x.len() as u64).to_le_bytes());
            b.extend(x.as_bytes());
        };
        b.extend(b"GGUF");
        b.extend(3u32.to_le_bytes());
        b.extend((tensors.len() as u64).to_le_bytes());
        b.extend(1u64.to_le_bytes());
        s(&mut b, "general.architecture");
        b.extend(8u32.to_le_bytes());
        s(&mut b, "llama");
        let mut offset = 0u64;
        for (name, ty, dims, data) in tensors {
            s(&mut b, name);
            b.extend((dims.len() as u32).to_le_bytes());
            for d in dims {
                b.extend(d.to_le_bytes());
            }
            b.extend(ty.to_le_bytes());
            b.extend(offset.to_le_bytes());
            offset += (data.len() as u64).div_ceil(32) * 32;
        }
        while b.len() % 32 != 0 {
            b.push(0);
        }
        for (_, _, _, data) in tensors {
            b.extend(data);
            while b.len() % 32 != 0 {
                b.push(0);
            }
        }
        b
    }

    #[test]
    fn dequantizes_every_supported_type() {
        let h = |x: f32| f16::from_f32(x).to_le_bytes();
        // Q4_0: d = 0.5, nibbles j (low) and 15 - j (high): values (q - 8) * d.
        let mut q40 = h(0.5).to_vec();
        q40.extend((0..16u8).map(|j| j | ((15 - j) << 4)));
        // Q4_1: d = 0.25, m = -1: values q * d + m.
        let mut q41 = h(0.25).to_vec();
        q41.extend(h(-1.0));
        q41.extend((0..16u8).map(|j| j | ((15 - j) << 4)));
        // Q8_0: d = 0.1, q = -16..16.
        let mut q80 = h(0.1).to_vec();
        q80.extend((0..32).map(|j| (j as i8 - 16) as u8));
        let f16s: Vec<u8> = [1.5f32, -2.0].iter().flat_map(|&x| h(x)).collect();
        let bf16s: Vec<u8> = [3.0f32, -0.5]
            .iter()
            .flat_map(|&x| bf16::from_f32(x).to_le_bytes())
            .collect();
        let f32s: Vec<u8> = [7.0f32, 8.0].iter().flat_map(|x| x.to_le_bytes()).collect();
        let file = build(&[
            ("a", 2, vec![32], q40),
            ("b", 3, vec![32], q41),
            ("c", 8, vec![32], q80),
            ("d", 1, vec![2], f16s),
            ("e", 30, vec![2], bf16s),
            ("f", 0, vec![2], f32s),
        ]);
        let g = Gguf::parse(&file).unwrap();
        assert_eq!(
            g.get("general.architecture").and_then(Value::as_str),
            Some("llama")
        );
        let deq = |n: &str| g.dequantize(g.tensor(n).unwrap()).unwrap();
        let a = deq("a");
        assert_eq!(a[0], -4.0);
        assert_eq!(a[16], (15.0 - 8.0) * 0.5);
        let b = deq("b");
        assert_eq!(b[3], 3.0 * 0.25 - 1.0);
        assert_eq!(b[16], 15.0 * 0.25 - 1.0);
        let c = deq("c");
        assert_eq!(c[0], -16.0 * f16::from_f32(0.1).to_f32());
        assert_eq!(deq("d"), vec![1.5, -2.0]);
        assert_eq!(deq("e"), vec![3.0, -0.5]);
        assert_eq!(deq("f"), vec![7.0, 8.0]);
    }

    #[test]
    fn rejects_malformed_files() {
        assert!(Gguf::parse(b"GGML....").is_err());
        assert!(Gguf::parse(b"GGUF\x03\x00\x00\x00").is_err(), "truncated");
        let mut f = build(&[("a", 2, vec![32], vec![0; 18])]);
        f.truncate(f.len() - 20);
        let g = Gguf::parse(&f).unwrap();
        assert!(
            g.dequantize(g.tensor("a").unwrap()).is_err(),
            "data past the end"
        );
        let f = build(&[("q", 9, vec![32], vec![0; 36])]);
        let g = Gguf::parse(&f).unwrap();
        let e = g
            .dequantize(g.tensor("q").unwrap())
            .unwrap_err()
            .to_string();
        assert!(e.contains("tensor q: GGML type 9"), "{e}");
    }
}
