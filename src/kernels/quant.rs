//! Quantized weights on the GPU: GGUF's block types (Q8_0, Q4_0, Q4_1, Q5_0,
//! Q5_1, Q4_K, Q5_K, Q6_K) repacked bit-exactly at load into aligned u32 planes
//! (`shaders/lib/quant.wgsl` describes them), which WGSL reads without 8- or
//! 16-bit loads. The planes hold exactly the blocks' bits (a permutation of
//! them), so a chunk takes the blocks' size plus at most one padding half.

use crate::quant::DType;

/// The `QTYPE` override of a type the quantized kernels read, if any.
pub fn kernel_type(t: DType) -> Option<u32> {
    Some(match t {
        DType::Q8_0 => 1,
        DType::Q4_0 => 2,
        DType::Q4_1 => 3,
        DType::Q5_0 => 4,
        DType::Q5_1 => 5,
        DType::Q4_K => 6,
        DType::Q5_K => 7,
        DType::Q6_K => 8,
        _ => return None,
    })
}

/// Word offsets of the planes of a chunk of `blocks` blocks:
/// `[qh, sc, ks, total words]`.
pub fn planes(t: DType, blocks: usize) -> [usize; 4] {
    let (qs, qh, sc, ks) = match t {
        DType::Q8_0 => (8, 0, 1, 0),
        DType::Q4_0 => (4, 0, 1, 0),
        DType::Q5_0 => (4, 2, 1, 0),
        DType::Q4_1 => (4, 0, 2, 0),
        DType::Q5_1 => (4, 2, 2, 0),
        DType::Q4_K => (32, 0, 2, 3),
        DType::Q5_K => (32, 16, 2, 3),
        DType::Q6_K => (32, 32, 1, 4),
        _ => (0, 0, 0, 0),
    };
    // qh and sc in half-words per block (sc 1 = one f16 d, 2 = a d|m word).
    let qh_off = blocks * qs;
    let sc_off = qh_off + blocks * qh / 2;
    let sc_words = if sc == 2 { blocks } else { blocks.div_ceil(2) };
    let ks_off = sc_off + sc_words;
    [qh_off, sc_off, ks_off, ks_off + blocks * ks]
}

fn half(b: &[u8]) -> u32 {
    u16::from_le_bytes([b[0], b[1]]) as u32
}

fn word(b: &[u8]) -> u32 {
    u32::from_le_bytes([b[0], b[1], b[2], b[3]])
}

/// Eight 4-bit fields in order, one per value.
fn pack4(vals: impl Iterator<Item = u32>) -> u32 {
    vals.enumerate()
        .fold(0, |w, (k, v)| w | ((v & 15) << (4 * k)))
}

/// Repacks `raw` (whole blocks of `t`, a kernel type) into its planes.
pub fn repack(t: DType, raw: &[u8]) -> Vec<u32> {
    let bytes = t.block().1;
    let blocks = raw.len() / bytes;
    let [qh_off, sc_off, ks_off, total] = planes(t, blocks);
    let mut out = vec![0u32; total];
    for (i, b) in raw.chunks_exact(bytes).enumerate() {
        match t {
            DType::Q8_0 | DType::Q4_0 | DType::Q5_0 | DType::Q4_1 | DType::Q5_1 => {
                let has_min = matches!(t, DType::Q4_1 | DType::Q5_1);
                if has_min {
                    out[sc_off + i] = half(b) | (half(&b[2..]) << 16);
                } else {
                    out[sc_off + i / 2] |= half(b) << (16 * (i % 2));
                }
                let mut rest = &b[if has_min { 4 } else { 2 }..];
                if t == DType::Q8_0 {
                    for g in 0..8 {
                        out[i * 8 + g] = word(&rest[4 * g..]);
                    }
                    continue;
                }
                if matches!(t, DType::Q5_0 | DType::Q5_1) {
                    out[qh_off + i] = word(rest);
                    rest = &rest[4..];
                }
                // ggml: qs[j] holds value j (low nibble) and value j + 16 (high).
                let nib = |e: usize| {
                    if e < 16 {
                        rest[e] & 15
                    } else {
                        rest[e - 16] >> 4
                    }
                } as u32;
                for g in 0..4 {
                    out[i * 4 + g] = pack4((0..8).map(|k| nib(8 * g + k)));
                }
            }
            DType::Q4_K | DType::Q5_K => {
                out[sc_off + i] = half(b) | (half(&b[2..]) << 16);
                for k in 0..3 {
                    out[ks_off + 3 * i + k] = word(&b[4 + 4 * k..]);
                }
                let (qh, qs) = if t == DType::Q5_K {
                    (&b[16..48], &b[48..176])
                } else {
                    (&b[16..16], &b[16..144])
                };
                // ggml: 32-byte chunk c holds sub-block 2c (low nibbles) and
                // 2c + 1 (high); value l of sub-block j has its fifth bit at
                // bit j of qh[l].
                for j in 0..8 {
                    let chunk = &qs[32 * (j / 2)..32 * (j / 2) + 32];
                    let nib = |l: usize| {
                        (if j % 2 == 0 {
                            chunk[l] & 15
                        } else {
                            chunk[l] >> 4
                        }) as u32
                    };
                    for g in 0..4 {
                        out[32 * i + 4 * j + g] = pack4((0..8).map(|k| nib(8 * g + k)));
                    }
                    if t == DType::Q5_K {
                        out[qh_off + 8 * i + j] =
                            (0..32).fold(0, |w, l| w | ((((qh[l] >> j) & 1) as u32) << l));
                    }
                }
            }
            DType::Q6_K => {
                out[sc_off + i / 2] |= half(&b[208..]) << (16 * (i % 2));
                for k in 0..4 {
                    out[ks_off + 4 * i + k] = word(&b[192 + 4 * k..]);
                }
                // ggml, per 128-value half n: value l (0..32) takes ql[l] low,
                // l + 32 ql[l + 32] low, l + 64 ql[l] high, l + 96 ql[l + 32]
                // high; the high bits come from qh[l] bits 0-1, 2-3, 4-5, 6-7.
                let value = |e: usize| -> (u32, u32) {
                    let (n, r) = (e / 128, e % 128);
                    let (ql, qh) = (&b[64 * n..64 * n + 64], &b[128 + 32 * n..128 + 32 * n + 32]);
                    let (quarter, l) = (r / 32, r % 32);
                    let lo = match quarter {
                        0 => ql[l] & 15,
                        1 => ql[l + 32] & 15,
                        2 => ql[l] >> 4,
                        _ => ql[l + 32] >> 4,
                    };
                    (lo as u32, ((qh[l] >> (2 * quarter)) & 3) as u32)
                };
                for g in 0..32 {
                    out[32 * i + g] = pack4((0..8).map(|k| value(8 * g + k).0));
                }
                for w in 0..16 {
                    out[qh_off + 16 * i + w] =
                        (0..16).fold(0, |a, k| a | (value(16 * w + k).1 << (2 * k)));
                }
            }
            _ => {}
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quant::dequantize;

    /// Decodes the planes as `lib/quant.wgsl` does, in f32 with ggml's
    /// operation order, for the bit-exactness test.
    fn decode_planes(t: DType, w: &[u32], blocks: usize) -> Vec<f32> {
        let [qh_off, sc_off, ks_off, _] = planes(t, blocks);
        let h =
            |i: usize| half::f16::from_bits((w[sc_off + i / 2] >> (16 * (i % 2))) as u16).to_f32();
        let hw =
            |x: u32, hi: bool| half::f16::from_bits((if hi { x >> 16 } else { x }) as u16).to_f32();
        let per = t.block().0;
        let mut out = vec![0.0; blocks * per];
        for i in 0..blocks {
            for e in 0..per {
                let y = &mut out[i * per + e];
                let nib = |base: usize| (w[base + e / 8] >> (4 * (e % 8))) & 15;
                *y = match t {
                    DType::Q8_0 => ((w[i * 8 + e / 4] >> (8 * (e % 4))) as u8 as i8) as f32 * h(i),
                    DType::Q4_0 => (nib(i * 4) as i32 - 8) as f32 * h(i),
                    DType::Q5_0 => {
                        ((nib(i * 4) | (((w[qh_off + i] >> e) & 1) << 4)) as i32 - 16) as f32 * h(i)
                    }
                    DType::Q4_1 => {
                        nib(i * 4) as f32 * hw(w[sc_off + i], false) + hw(w[sc_off + i], true)
                    }
                    DType::Q5_1 => {
                        (nib(i * 4) | (((w[qh_off + i] >> e) & 1) << 4)) as f32
                            * hw(w[sc_off + i], false)
                            + hw(w[sc_off + i], true)
                    }
                    DType::Q4_K | DType::Q5_K => {
                        let ks: Vec<u8> = (0..12)
                            .map(|k| (w[ks_off + 3 * i + k / 4] >> (8 * (k % 4))) as u8)
                            .collect();
                        let (sc, mn) = crate::quant::scale_min_k4(e / 32, &ks);
                        let dd = w[sc_off + i];
                        let mut q = nib(32 * i);
                        if t == DType::Q5_K {
                            q |= ((w[qh_off + 8 * i + e / 32] >> (e % 32)) & 1) << 4;
                        }
                        hw(dd, false) * sc as f32 * q as f32 - hw(dd, true) * mn as f32
                    }
                    _ => {
                        let q = nib(32 * i)
                            | (((w[qh_off + 16 * i + e / 16] >> (2 * (e % 16))) & 3) << 4);
                        let sc = (w[ks_off + 4 * i + e / 64] >> (8 * ((e / 16) % 4))) as u8 as i8;
                        h(i) * sc as f32 * (q as i32 - 32) as f32
                    }
                };
            }
        }
        out
    }

    /// The planes hold the blocks' bits: the blocks' size (plus one padding
    /// half at most), and every value decoded from them equals ggml's.
    #[test]
    fn repack_is_bit_exact() {
        for t in crate::quant::ALL
            .into_iter()
            .filter(|t| kernel_type(*t).is_some())
        {
            let bytes = t.block().1;
            for blocks in [1usize, 5] {
                let mut raw: Vec<u8> = (0..blocks * bytes)
                    .map(|i| (i * 97 + 13 + i / 7) as u8)
                    .collect();
                // Finite scales.
                for b in raw.chunks_exact_mut(bytes) {
                    let at: &[usize] = match t {
                        DType::Q6_K => &[208],
                        DType::Q4_1 | DType::Q5_1 | DType::Q4_K | DType::Q5_K => &[0, 2],
                        _ => &[0],
                    };
                    for &o in at {
                        b[o..o + 2].copy_from_slice(
                            &half::f16::from_f32(0.01 + o as f32 * 0.003).to_le_bytes(),
                        );
                    }
                }
                let w = repack(t, &raw);
                assert!(
                    w.len() * 4 <= raw.len() + 2,
                    "{t}: {} words for {} bytes",
                    w.len(),
                    raw.len()
                );
                let mut want = vec![0.0; blocks * t.block().0];
                dequantize(t, &raw, &mut want).unwrap();
                let got = decode_planes(t, &w, blocks);
                for (e, (a, b)) in got.iter().zip(&want).enumerate() {
                    assert_eq!(a.to_bits(), b.to_bits(), "{t} value {e}: {a} vs {b}");
                }
            }
        }
    }
}
