//! Stored weight types and their CPU codecs: GGUF's block formats decoded
//! exactly as ggml's `dequantize_row_*` (f32 arithmetic in ggml's operation
//! order, so results are bit-identical), and ggml's reference quantizers
//! (`quantize_row_*_ref`) for Q8_0, Q4_0 and Q4_1. Block layouts:
//! `../shared/ALGORITHMS.md` section 8.

use crate::error::{Error, Result};
use half::{bf16, f16};

/// A tensor's stored element type.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[allow(non_camel_case_types)]
pub enum DType {
    /// 32-bit float.
    F32,
    /// IEEE half.
    F16,
    /// bfloat16.
    BF16,
    /// 32 values: f16 scale, 32 i8.
    Q8_0,
    /// 32 values: f16 scale, 32 nibbles (offset 8).
    Q4_0,
    /// 32 values: f16 scale and min, 32 nibbles.
    Q4_1,
    /// 32 values: f16 scale, 32 five-bit values (offset 16).
    Q5_0,
    /// 32 values: f16 scale and min, 32 five-bit values.
    Q5_1,
    /// 256 values in 8 sub-blocks with 6-bit scales and mins, 4-bit values.
    Q4_K,
    /// As Q4_K with 5-bit values.
    Q5_K,
    /// 256 values in 16 sub-blocks with i8 scales, 6-bit values (offset 32).
    Q6_K,
}

/// Every type, in GGML id order.
pub const ALL: [DType; 11] = [
    DType::F32,
    DType::F16,
    DType::Q4_0,
    DType::Q4_1,
    DType::Q5_0,
    DType::Q5_1,
    DType::Q8_0,
    DType::Q4_K,
    DType::Q5_K,
    DType::Q6_K,
    DType::BF16,
];

impl DType {
    /// The type of GGML type id `id`, if supported.
    pub fn from_ggml(id: u32) -> Option<Self> {
        Some(match id {
            0 => Self::F32,
            1 => Self::F16,
            2 => Self::Q4_0,
            3 => Self::Q4_1,
            6 => Self::Q5_0,
            7 => Self::Q5_1,
            8 => Self::Q8_0,
            12 => Self::Q4_K,
            13 => Self::Q5_K,
            14 => Self::Q6_K,
            30 => Self::BF16,
            _ => return None,
        })
    }

    /// ggml's name of the type (`Q4_K`, `F16`, ...).
    pub fn name(self) -> &'static str {
        match self {
            Self::F32 => "F32",
            Self::F16 => "F16",
            Self::BF16 => "BF16",
            Self::Q8_0 => "Q8_0",
            Self::Q4_0 => "Q4_0",
            Self::Q4_1 => "Q4_1",
            Self::Q5_0 => "Q5_0",
            Self::Q5_1 => "Q5_1",
            Self::Q4_K => "Q4_K",
            Self::Q5_K => "Q5_K",
            Self::Q6_K => "Q6_K",
        }
    }

    /// Parses a type name as [`DType::name`] spells it (any case).
    pub fn parse(s: &str) -> Option<Self> {
        ALL.into_iter().find(|t| t.name().eq_ignore_ascii_case(s))
    }

    /// (values per block, bytes per block).
    pub fn block(self) -> (usize, usize) {
        match self {
            Self::F32 => (1, 4),
            Self::F16 | Self::BF16 => (1, 2),
            Self::Q8_0 => (32, 34),
            Self::Q4_0 => (32, 18),
            Self::Q4_1 => (32, 20),
            Self::Q5_0 => (32, 22),
            Self::Q5_1 => (32, 24),
            Self::Q4_K => (256, 144),
            Self::Q5_K => (256, 176),
            Self::Q6_K => (256, 210),
        }
    }

    /// True for the block-quantized types.
    pub fn is_quantized(self) -> bool {
        self.block().0 > 1
    }

    /// Bytes of `n` values, or `None` when `n` is not a whole number of blocks
    /// (or the size overflows).
    pub fn bytes_for(self, n: u64) -> Option<u64> {
        let (per, bytes) = self.block();
        n.is_multiple_of(per as u64)
            .then(|| (n / per as u64).checked_mul(bytes as u64))
            .flatten()
    }
}

impl std::fmt::Display for DType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

fn h(b: &[u8]) -> f32 {
    f16::from_le_bytes([b[0], b[1]]).to_f32()
}

/// Decodes `raw` (whole blocks of `ty`) into `out` (`out.len()` values).
pub fn dequantize(ty: DType, raw: &[u8], out: &mut [f32]) -> Result<()> {
    let (per, bytes) = ty.block();
    if !out.len().is_multiple_of(per) || raw.len() != out.len() / per * bytes {
        return Err(Error::Internal(format!(
            "dequantize {ty}: {} bytes for {} values",
            raw.len(),
            out.len()
        )));
    }
    let blocks = raw.chunks_exact(bytes).zip(out.chunks_exact_mut(per));
    match ty {
        DType::F32 => {
            for (b, y) in blocks {
                y[0] = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
            }
        }
        DType::F16 => {
            for (b, y) in blocks {
                y[0] = h(b);
            }
        }
        DType::BF16 => {
            for (b, y) in blocks {
                y[0] = bf16::from_le_bytes([b[0], b[1]]).to_f32();
            }
        }
        DType::Q8_0 => {
            for (b, y) in blocks {
                let d = h(b);
                for (y, &q) in y.iter_mut().zip(&b[2..34]) {
                    *y = q as i8 as f32 * d;
                }
            }
        }
        DType::Q4_0 | DType::Q4_1 => {
            let has_min = ty == DType::Q4_1;
            for (b, y) in blocks {
                let d = h(b);
                let (m, qs) = if has_min {
                    (h(&b[2..]), &b[4..20])
                } else {
                    (0.0, &b[2..18])
                };
                for (j, &q) in qs.iter().enumerate() {
                    let (x0, x1) = ((q & 0xF) as i32, (q >> 4) as i32);
                    if has_min {
                        y[j] = x0 as f32 * d + m;
                        y[j + 16] = x1 as f32 * d + m;
                    } else {
                        y[j] = (x0 - 8) as f32 * d;
                        y[j + 16] = (x1 - 8) as f32 * d;
                    }
                }
            }
        }
        DType::Q5_0 | DType::Q5_1 => {
            let has_min = ty == DType::Q5_1;
            for (b, y) in blocks {
                let d = h(b);
                let (m, rest) = if has_min {
                    (h(&b[2..]), &b[4..])
                } else {
                    (0.0, &b[2..])
                };
                let qh = u32::from_le_bytes([rest[0], rest[1], rest[2], rest[3]]);
                let qs = &rest[4..20];
                for (j, &q) in qs.iter().enumerate() {
                    let xh0 = ((qh >> j) << 4) & 0x10;
                    let xh1 = (qh >> (j + 12)) & 0x10;
                    let x0 = ((q as u32 & 0xF) | xh0) as i32;
                    let x1 = ((q as u32 >> 4) | xh1) as i32;
                    if has_min {
                        y[j] = x0 as f32 * d + m;
                        y[j + 16] = x1 as f32 * d + m;
                    } else {
                        y[j] = (x0 - 16) as f32 * d;
                        y[j + 16] = (x1 - 16) as f32 * d;
                    }
                }
            }
        }
        DType::Q4_K | DType::Q5_K => {
            let five = ty == DType::Q5_K;
            for (b, y) in blocks {
                let (d, dmin) = (h(b), h(&b[2..]));
                let scales = &b[4..16];
                let (qh, qs) = if five {
                    (&b[16..48], &b[48..176])
                } else {
                    (&b[16..16], &b[16..144])
                };
                for c in 0..4 {
                    let (sc1, m1) = scale_min_k4(2 * c, scales);
                    let (sc2, m2) = scale_min_k4(2 * c + 1, scales);
                    let (d1, m1) = (d * sc1 as f32, dmin * m1 as f32);
                    let (d2, m2) = (d * sc2 as f32, dmin * m2 as f32);
                    let q = &qs[32 * c..32 * c + 32];
                    let (u1, u2) = (1u8 << (2 * c), 2u8 << (2 * c));
                    let y = &mut y[64 * c..64 * c + 64];
                    for l in 0..32 {
                        let (hi1, hi2) = if five {
                            (
                                if qh[l] & u1 != 0 { 16 } else { 0 },
                                if qh[l] & u2 != 0 { 16 } else { 0 },
                            )
                        } else {
                            (0, 0)
                        };
                        y[l] = d1 * ((q[l] & 0xF) + hi1) as f32 - m1;
                        y[l + 32] = d2 * ((q[l] >> 4) + hi2) as f32 - m2;
                    }
                }
            }
        }
        DType::Q6_K => {
            for (b, y) in blocks {
                let d = h(&b[208..]);
                for n in 0..2 {
                    let ql = &b[64 * n..64 * n + 64];
                    let qh = &b[128 + 32 * n..128 + 32 * n + 32];
                    let sc = &b[192 + 8 * n..192 + 8 * n + 8];
                    let y = &mut y[128 * n..128 * n + 128];
                    for l in 0..32 {
                        let is = l / 16;
                        let q1 = ((ql[l] & 0xF) | ((qh[l] & 3) << 4)) as i32 - 32;
                        let q2 = ((ql[l + 32] & 0xF) | (((qh[l] >> 2) & 3) << 4)) as i32 - 32;
                        let q3 = ((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) as i32 - 32;
                        let q4 = ((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) as i32 - 32;
                        let s = |i: usize| d * sc[is + i] as i8 as f32;
                        y[l] = s(0) * q1 as f32;
                        y[l + 32] = s(2) * q2 as f32;
                        y[l + 64] = s(4) * q3 as f32;
                        y[l + 96] = s(6) * q4 as f32;
                    }
                }
            }
        }
    }
    Ok(())
}

/// ggml's `get_scale_min_k4`: sub-block `j`'s 6-bit scale and min.
pub fn scale_min_k4(j: usize, q: &[u8]) -> (u8, u8) {
    if j < 4 {
        (q[j] & 63, q[j + 4] & 63)
    } else {
        (
            (q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4),
            (q[j + 4] >> 4) | ((q[j] >> 6) << 4),
        )
    }
}

/// Encodes `x` (a whole number of 32-value blocks) as `ty` (Q8_0, Q4_0 or Q4_1)
/// with ggml's reference quantizers, appending to `out`.
pub fn quantize(ty: DType, x: &[f32], out: &mut Vec<u8>) -> Result<()> {
    if !matches!(ty, DType::Q8_0 | DType::Q4_0 | DType::Q4_1) {
        return Err(Error::Unsupported(format!(
            "quantizing to {ty} (q8_0, q4_0 and q4_1 are supported)"
        )));
    }
    if !x.len().is_multiple_of(32) {
        return Err(Error::Shape {
            op: "quantize",
            msg: format!("{} values are not whole blocks of 32", x.len()),
        });
    }
    let put = |out: &mut Vec<u8>, v: f32| out.extend(f16::from_f32(v).to_le_bytes());
    for x in x.chunks_exact(32) {
        match ty {
            DType::Q8_0 => {
                let amax = x.iter().fold(0.0f32, |a, v| a.max(v.abs()));
                let d = amax / 127.0;
                let id = if d != 0.0 { 1.0 / d } else { 0.0 };
                put(out, d);
                out.extend(x.iter().map(|&v| (v * id).round() as i8 as u8));
            }
            DType::Q4_0 => {
                let (mut amax, mut max) = (0.0f32, 0.0f32);
                for &v in x {
                    if amax < v.abs() {
                        amax = v.abs();
                        max = v;
                    }
                }
                let d = max / -8.0;
                let id = if d != 0.0 { 1.0 / d } else { 0.0 };
                put(out, d);
                let q = |v: f32| ((v * id + 8.5) as i8).min(15) as u8;
                out.extend((0..16).map(|j| q(x[j]) | (q(x[j + 16]) << 4)));
            }
            _ => {
                let min = x.iter().fold(f32::MAX, |a, &v| a.min(v));
                let max = x.iter().fold(-f32::MAX, |a, &v| a.max(v));
                let d = (max - min) / 15.0;
                let id = if d != 0.0 { 1.0 / d } else { 0.0 };
                put(out, d);
                put(out, min);
                let q = |v: f32| (((v - min) * id + 0.5) as i8).min(15) as u8;
                out.extend((0..16).map(|j| q(x[j]) | (q(x[j + 16]) << 4)));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_ids_and_sizes() {
        for t in ALL {
            assert_eq!(DType::parse(&t.name().to_lowercase()), Some(t));
        }
        assert_eq!(DType::from_ggml(12), Some(DType::Q4_K));
        assert_eq!(DType::from_ggml(9), None, "Q8_1 is not a storage type here");
        assert_eq!(DType::Q6_K.bytes_for(512), Some(420));
        assert_eq!(DType::Q4_0.bytes_for(33), None);
        assert_eq!(DType::F32.bytes_for(u64::MAX), None, "overflow");
    }

    #[test]
    fn quantize_round_trips_within_a_step() {
        let x: Vec<f32> = (0..64)
            .map(|i| ((i * 37) % 19) as f32 * 0.1 - 0.9)
            .collect();
        for (t, step) in [
            (DType::Q8_0, 1.0 / 127.0),
            (DType::Q4_0, 1.0 / 8.0),
            (DType::Q4_1, 1.0 / 15.0),
        ] {
            let mut q = Vec::new();
            quantize(t, &x, &mut q).unwrap();
            assert_eq!(q.len() as u64, t.bytes_for(64).unwrap());
            let mut y = vec![0.0; 64];
            dequantize(t, &q, &mut y).unwrap();
            for (a, b) in x.iter().zip(&y) {
                assert!((a - b).abs() <= 1.9 * step * 1.01, "{t}: {a} vs {b}");
            }
        }
        assert!(quantize(DType::Q4_K, &x, &mut Vec::new()).is_err());
    }

    fn f32s(b: &[u8]) -> Vec<f32> {
        b.chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect()
    }

    macro_rules! fixture {
        ($t:literal, $ext:literal) => {
            include_bytes!(concat!("../tests/fixtures/quant/", $t, $ext)).as_slice()
        };
    }

    /// Bit for bit against gguf-py's `dequantize` (tests/fixtures/quant/make_fixtures.py).
    #[test]
    fn dequantize_matches_gguf_py() {
        let cases: [(DType, &[u8], &[u8]); 8] = [
            (
                DType::Q8_0,
                fixture!("Q8_0", ".blocks"),
                fixture!("Q8_0", ".f32"),
            ),
            (
                DType::Q4_0,
                fixture!("Q4_0", ".blocks"),
                fixture!("Q4_0", ".f32"),
            ),
            (
                DType::Q4_1,
                fixture!("Q4_1", ".blocks"),
                fixture!("Q4_1", ".f32"),
            ),
            (
                DType::Q5_0,
                fixture!("Q5_0", ".blocks"),
                fixture!("Q5_0", ".f32"),
            ),
            (
                DType::Q5_1,
                fixture!("Q5_1", ".blocks"),
                fixture!("Q5_1", ".f32"),
            ),
            (
                DType::Q4_K,
                fixture!("Q4_K", ".blocks"),
                fixture!("Q4_K", ".f32"),
            ),
            (
                DType::Q5_K,
                fixture!("Q5_K", ".blocks"),
                fixture!("Q5_K", ".f32"),
            ),
            (
                DType::Q6_K,
                fixture!("Q6_K", ".blocks"),
                fixture!("Q6_K", ".f32"),
            ),
        ];
        for (t, raw, want) in cases {
            let want = f32s(want);
            let mut got = vec![0.0; want.len()];
            dequantize(t, raw, &mut got).unwrap();
            for (i, (a, b)) in got.iter().zip(&want).enumerate() {
                assert_eq!(a.to_bits(), b.to_bits(), "{t} value {i}: {a} vs {b}");
            }
        }
    }

    /// Byte for byte against gguf-py's `quantize` (ggml's reference quantizers).
    #[test]
    fn quantize_matches_gguf_py() {
        let cases: [(DType, &[u8], &[u8]); 3] = [
            (
                DType::Q8_0,
                fixture!("Q8_0", ".input.f32"),
                fixture!("Q8_0", ".quantized"),
            ),
            (
                DType::Q4_0,
                fixture!("Q4_0", ".input.f32"),
                fixture!("Q4_0", ".quantized"),
            ),
            (
                DType::Q4_1,
                fixture!("Q4_1", ".input.f32"),
                fixture!("Q4_1", ".quantized"),
            ),
        ];
        for (t, x, want) in cases {
            let mut got = Vec::new();
            quantize(t, &f32s(x), &mut got).unwrap();
            assert_eq!(got, want, "{t}");
        }
    }
}
