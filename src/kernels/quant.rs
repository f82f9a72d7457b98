//! Quantized weights on the GPU: GGUF's 32-value block types (Q8_0, Q4_0, Q4_1,
//! Q5_0, Q5_1) repacked bit-exactly at load into aligned u32 planes
//! (`shaders/lib/quant.wgsl` describes them; same size as the blocks, up to one
//! padding half), which WGSL can read without 8- or 16-bit loads. Types without
//! a kernel here (the K types, for now) and vectors are decoded to f16 at load.

use crate::quant::DType;

/// The `QTYPE` override of a type the quantized kernels read, if any.
pub fn kernel_type(t: DType) -> Option<u32> {
    Some(match t {
        DType::Q8_0 => 1,
        DType::Q4_0 => 2,
        DType::Q4_1 => 3,
        DType::Q5_0 => 4,
        DType::Q5_1 => 5,
        _ => return None,
    })
}

/// Word offsets of a chunk of `blocks` blocks: (qh plane, scale plane, total words).
pub fn planes(t: DType, blocks: usize) -> (usize, usize, usize) {
    let qs = blocks * if t == DType::Q8_0 { 8 } else { 4 };
    let qh = qs;
    let sc = qh
        + if matches!(t, DType::Q5_0 | DType::Q5_1) {
            blocks
        } else {
            0
        };
    let total = sc
        + if matches!(t, DType::Q4_1 | DType::Q5_1) {
            blocks
        } else {
            blocks.div_ceil(2)
        };
    (qh, sc, total)
}

/// Repacks `raw` (whole blocks of `t`, a kernel type) into its planes.
pub fn repack(t: DType, raw: &[u8]) -> Vec<u32> {
    let bytes = t.block().1;
    let blocks = raw.len() / bytes;
    let (qh_off, sc_off, total) = planes(t, blocks);
    let mut out = vec![0u32; total];
    let half = |b: &[u8]| u16::from_le_bytes([b[0], b[1]]) as u32;
    for (i, b) in raw.chunks_exact(bytes).enumerate() {
        let has_min = matches!(t, DType::Q4_1 | DType::Q5_1);
        if has_min {
            out[sc_off + i] = half(b) | (half(&b[2..]) << 16);
        } else {
            out[sc_off + i / 2] |= half(b) << (16 * (i % 2));
        }
        let mut rest = &b[if has_min { 4 } else { 2 }..];
        if t == DType::Q8_0 {
            for g in 0..8 {
                out[i * 8 + g] = u32::from_le_bytes(rest[4 * g..4 * g + 4].try_into().unwrap());
            }
            continue;
        }
        if matches!(t, DType::Q5_0 | DType::Q5_1) {
            out[qh_off + i] = u32::from_le_bytes(rest[..4].try_into().unwrap());
            rest = &rest[4..];
        }
        // ggml: qs[j] holds value j (low nibble) and value j + 16 (high).
        let nib = |e: usize| if e < 16 { rest[e] & 15 } else { rest[e - 16] >> 4 } as u32;
        for g in 0..4 {
            out[i * 4 + g] = (0..8).fold(0, |w, k| w | (nib(8 * g + k) << (4 * k)));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The planes hold the blocks' bits: the same size, and every value
    /// recovered as the shader reads it.
    #[test]
    fn repack_is_bit_exact() {
        for t in [
            DType::Q8_0,
            DType::Q4_0,
            DType::Q4_1,
            DType::Q5_0,
            DType::Q5_1,
        ] {
            let (per, bytes) = t.block();
            let blocks = 5;
            let raw: Vec<u8> = (0..blocks * bytes).map(|i| (i * 97 + 13) as u8).collect();
            let w = repack(t, &raw);
            assert!(w.len() * 4 <= raw.len() + 2, "{t}: {} words", w.len());
            let (qh_off, sc_off, _) = planes(t, blocks);
            for i in 0..blocks {
                let b = &raw[i * bytes..];
                let has_min = matches!(t, DType::Q4_1 | DType::Q5_1);
                let d = if has_min {
                    w[sc_off + i] & 0xFFFF
                } else {
                    (w[sc_off + i / 2] >> (16 * (i % 2))) & 0xFFFF
                };
                assert_eq!(d, u16::from_le_bytes([b[0], b[1]]) as u32);
                for e in 0..per {
                    let v = match t {
                        DType::Q8_0 => (w[i * 8 + e / 4] >> (8 * (e % 4))) & 0xFF,
                        _ => {
                            let n = (w[i * 4 + e / 8] >> (4 * (e % 8))) & 15;
                            let hi = if matches!(t, DType::Q5_0 | DType::Q5_1) {
                                ((w[qh_off + i] >> e) & 1) << 4
                            } else {
                                0
                            };
                            n | hi
                        }
                    };
                    let q = &b[if has_min { 4 } else { 2 }..];
                    let want = match t {
                        DType::Q8_0 => q[e] as u32,
                        DType::Q4_0 | DType::Q4_1 => {
                            (if e < 16 { q[e] & 15 } else { q[e - 16] >> 4 }) as u32
                        }
                        _ => {
                            let qh = u32::from_le_bytes(q[..4].try_into().unwrap());
                            let n = if e < 16 {
                                q[4 + e] & 15
                            } else {
                                q[4 + e - 16] >> 4
                            } as u32;
                            n | (((qh >> e) & 1) << 4)
                        }
                    };
                    assert_eq!(v, want, "{t} block {i} value {e}");
                }
            }
        }
    }
}
