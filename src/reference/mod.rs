//! The CPU reference executor: every op in f32, multi-threaded, with
//! `matrixmultiply` for GEMM. It is the oracle for the GPU kernels and the harness
//! for long-context quality. It stores KV as f16-rounded values like the GPU, and
//! rotates keys with the same table, so both take the same decisions.

mod attention;
pub mod block_sparse;
mod kv;
mod selection;
mod speculative;
mod tensor;
pub mod tokenselect;

use crate::error::Result;
use crate::kv::{KvLayout, PageTable};
use crate::ops::{Executor, KvView, Limits};
use half::f16;

/// f32 matrix `[rows, cols]`.
#[derive(Clone, Debug, PartialEq)]
pub struct RefTensor {
    /// Row-major values.
    pub data: Vec<f32>,
    /// Rows.
    pub rows: usize,
    /// Columns.
    pub cols: usize,
}

/// Weight matrix: f32 values (exact f16 values) or, for a quantized matrix,
/// its blocks, decoded a row at a time as the ops read them.
#[derive(Clone, Debug)]
pub struct RefWeight {
    /// Row-major values (empty when `blocks` holds the matrix).
    pub data: Vec<f32>,
    /// A quantized matrix's type and rows of blocks.
    pub blocks: Option<(crate::quant::DType, Vec<u8>)>,
    /// Rows (`out`).
    pub rows: usize,
    /// Columns (`in`).
    pub cols: usize,
}

impl RefWeight {
    /// Row `r` as f32 into `out` (`cols` values).
    pub fn row_into(&self, r: usize, out: &mut [f32]) {
        match &self.blocks {
            None => out.copy_from_slice(&self.data[r * self.cols..(r + 1) * self.cols]),
            Some((t, b)) => {
                let rb = b.len() / self.rows.max(1);
                // Sizes were checked when the weight was made.
                let _ = crate::quant::dequantize(*t, &b[r * rb..(r + 1) * rb], out);
            }
        }
    }
}

/// Two-level RoPE table `[table_rows, head_dim / 2]` of (cos, sin) (see
/// [`crate::ops::ROPE_SPLIT`]).
#[derive(Clone, Debug)]
pub struct RefRope {
    /// The table.
    pub cs: Vec<[f32; 2]>,
    /// head_dim / 2.
    pub half: usize,
    /// Positions covered.
    pub max_pos: usize,
}

/// One position's (cos, sin) pairs: the table's own row within
/// [`crate::ops::ROPE_FLAT`] positions (no copy: keys are rotated one by one
/// on every step), composed beyond it as the kernels compose them.
pub enum RopeRow<'a> {
    /// A row of the table.
    Table(&'a [[f32; 2]]),
    /// Composed from two rows.
    Composed(Vec<[f32; 2]>),
}

impl std::ops::Deref for RopeRow<'_> {
    type Target = [[f32; 2]];
    fn deref(&self) -> &[[f32; 2]] {
        match self {
            RopeRow::Table(r) => r,
            RopeRow::Composed(cs) => cs,
        }
    }
}

impl RefRope {
    /// The (cos, sin) pairs of position `pos` (clamped to the table), as the
    /// kernels read them.
    pub fn row(&self, pos: usize) -> RopeRow<'_> {
        let h = self.half;
        let p = pos.min(self.max_pos - 1);
        if p < self.max_pos.min(crate::ops::ROPE_FLAT) {
            return RopeRow::Table(&self.cs[p * h..(p + 1) * h]);
        }
        RopeRow::Composed(
            (0..h)
                .map(|i| crate::ops::rope_at(&self.cs, h, self.max_pos, pos, i))
                .collect(),
        )
    }
}

/// KV storage: per layer, `[page][kv_head][slot][head_dim]` values rounded to f16.
#[derive(Clone, Debug)]
pub struct RefKv {
    /// Layout.
    pub layout: KvLayout,
    /// Keys (before RoPE) per layer.
    pub k: Vec<Vec<f32>>,
    /// Values per layer.
    pub v: Vec<Vec<f32>>,
}

impl RefKv {
    /// Offset of (logical position, kv head) in a layer's storage.
    pub fn offset(&self, table: &PageTable, pos: usize, kvh: usize) -> usize {
        let l = &self.layout;
        let page = table.pages[pos / l.page_size] as usize;
        ((page * l.kv_heads + kvh) * l.page_size + pos % l.page_size) * l.head_dim
    }
}

/// Selection Cache decision on the CPU.
#[derive(Clone, Debug, Default)]
pub struct RefGate {
    /// The last check hit: gated selection ops skip.
    pub hit: bool,
    /// Hits counted.
    pub hits: u64,
    /// Misses counted.
    pub misses: u64,
}

fn skipped(gate: Option<&RefGate>) -> bool {
    gate.is_some_and(|g| g.hit)
}

/// The CPU executor.
#[derive(Debug, Default)]
pub struct RefExecutor;

impl RefExecutor {
    /// A new executor (uses all cores through rayon and matrixmultiply).
    pub fn new() -> Self {
        Self
    }
}

fn round_f16(x: f32) -> f32 {
    f16::from_f32(x).to_f32()
}

impl Executor for RefExecutor {
    type Tensor = RefTensor;
    type Ids = Vec<u32>;
    type Weight = RefWeight;
    type Rope = RefRope;
    type Kv = RefKv;
    type Gate = RefGate;
    type Bounds = block_sparse::RefBounds;

    fn name(&self) -> String {
        "reference (CPU f32)".into()
    }

    fn fork(&self) -> Result<Self> {
        Ok(Self)
    }

    fn limits(&self) -> Limits {
        Limits {
            max_buffer_bytes: u64::MAX,
        }
    }

    fn dims(t: &RefTensor) -> (usize, usize) {
        (t.rows, t.cols)
    }

    fn ids_len(ids: &Vec<u32>) -> usize {
        ids.len()
    }

    fn weight_dims(w: &RefWeight) -> (usize, usize) {
        (w.rows, w.cols)
    }

    fn weight_bytes(w: &RefWeight) -> u64 {
        w.blocks.as_ref().map_or(w.data.len() * 4, |b| b.1.len()) as u64
    }

    fn rope_dims(rope: &RefRope) -> (usize, usize) {
        (rope.max_pos, rope.half * 2)
    }

    fn kv_layout(kv: &RefKv) -> &KvLayout {
        &kv.layout
    }

    fn kv_bytes(kv: &RefKv) -> u64 {
        kv.k.iter().chain(&kv.v).map(|l| l.len() as u64 * 4).sum()
    }

    fn bounds_layout(b: &block_sparse::RefBounds) -> (&KvLayout, usize) {
        (&b.layout, b.block)
    }

    fn flush(&mut self) -> Result<()> {
        Ok(())
    }
}

/// One layer of a reference KV cache as the ops read it.
pub(crate) type RefView<'a> = KvView<'a, RefExecutor>;

/// f32 dot product with 8 independent accumulators (lets LLVM vectorise), on
/// AVX2 when the CPU has it (same summation order, so the same result).
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") {
        // SAFETY: the CPU supports AVX2 (checked just above).
        return unsafe { dot_avx2(a, b) };
    }
    dot_impl(a, b)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn dot_avx2(a: &[f32], b: &[f32]) -> f32 {
    dot_impl(a, b)
}

#[inline(always)]
fn dot_impl(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0.0f32; 8];
    let n = a.len().min(b.len());
    let chunks = n / 8;
    for c in 0..chunks {
        let r = c * 8..c * 8 + 8;
        let (x, y): (&[f32; 8], &[f32; 8]) =
            (a[r.clone()].try_into().unwrap(), b[r].try_into().unwrap());
        for l in 0..8 {
            acc[l] += x[l] * y[l];
        }
    }
    let mut s: f32 = acc.iter().sum();
    for i in chunks * 8..n {
        s += a[i] * b[i];
    }
    s
}

/// Largest row count the reference matmul serves with dot products instead of
/// sgemm (measured crossover on a 2-core AVX2 machine, SmolLM2 shapes).
const SMALL_M: usize = 16;

/// `out[i] = dot(xs[i], w)` for every row: blocks of four x rows per pass over
/// `w`, so each loaded weight lane feeds four accumulators; a short last block
/// repeats its final row (extra results dropped) instead of falling back to
/// one-row dots.
fn dot_rows(xs: &[&[f32]], w: &[f32], out: &mut [f32]) {
    if xs.len() == 1 {
        out[0] = dot(xs[0], w);
        return;
    }
    // Four rows is the measured sweet spot: eight spill registers and run 3x
    // slower per row on AVX2.
    for (block, o) in xs.chunks(4).zip(out.chunks_mut(4)) {
        dot_block::<4>(block, w, o);
    }
}

fn dot_block<const R: usize>(block: &[&[f32]], w: &[f32], out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") {
        // SAFETY: the CPU supports AVX2 (checked just above).
        return unsafe { dot_block_avx2::<R>(block, w, out) };
    }
    dot_block_impl::<R>(block, w, out)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn dot_block_avx2<const R: usize>(block: &[&[f32]], w: &[f32], out: &mut [f32]) {
    dot_block_impl::<R>(block, w, out)
}

#[inline(always)]
fn dot_block_impl<const R: usize>(block: &[&[f32]], w: &[f32], out: &mut [f32]) {
    let rows: [&[f32]; R] = std::array::from_fn(|i| block[i.min(block.len() - 1)]);
    let k = w.len();
    let chunks = k / 8;
    let mut acc = [[0.0f32; 8]; R];
    for ch in 0..chunks {
        let r = ch * 8..ch * 8 + 8;
        // Fixed-size views drop the bounds checks so the lanes vectorise.
        let wv: &[f32; 8] = w[r.clone()].try_into().unwrap();
        for (acc, x) in acc.iter_mut().zip(rows) {
            let x: &[f32; 8] = x[r.clone()].try_into().unwrap();
            for l in 0..8 {
                acc[l] += x[l] * wv[l];
            }
        }
    }
    for (j, o) in out.iter_mut().enumerate() {
        let mut s: f32 = acc[j].iter().sum();
        for t in chunks * 8..k {
            s += rows[j][t] * w[t];
        }
        *o = s;
    }
}

/// Rotate-half RoPE of one head vector with its (cos, sin) row.
pub fn rotate(x: &mut [f32], cs: &[[f32; 2]]) {
    let half = cs.len();
    for i in 0..half {
        let (x1, x2) = (x[i], x[i + half]);
        x[i] = x1 * cs[i][0] - x2 * cs[i][1];
        x[i + half] = x2 * cs[i][0] + x1 * cs[i][1];
    }
}

/// The k largest (id, value) pairs, descending, ties to the lower id, NaN skipped.
pub fn top_k_row(row: &[f32], k: usize) -> Vec<(u32, f32)> {
    let mut best: Vec<(u32, f32)> = Vec::with_capacity(k + 1);
    for (j, &v) in row.iter().enumerate() {
        if v.is_nan() || (best.len() == k && v <= best[k - 1].1) {
            continue;
        }
        let pos = best.partition_point(|&(_, bv)| bv >= v);
        best.insert(pos, (j as u32, v));
        best.truncate(k);
    }
    best
}

/// Argmax with ties to the lowest index; NaN never wins (index 0 if all NaN).
pub fn argmax_row(row: &[f32]) -> u32 {
    let mut best = f32::NEG_INFINITY;
    let mut bi: Option<usize> = None;
    for (j, &v) in row.iter().enumerate() {
        if !v.is_nan() && (bi.is_none() || v > best) {
            best = v;
            bi = Some(j);
        }
    }
    bi.unwrap_or(0) as u32
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kv::PageAllocator;
    use crate::ops::prelude::*;
    use crate::ops::RopeConfig;

    fn lcg(seed: &mut u64) -> f32 {
        *seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((*seed >> 33) as f32 / (1u64 << 31) as f32) * 2.0 - 1.0
    }

    #[test]
    fn matmul_gemv_and_gemm_match_naive() {
        let mut ex = RefExecutor::new();
        let mut s = 1;
        for m in [1usize, 3, 6, 40] {
            // 36: a ragged tail past the 8-wide dot blocks.
            let (k, n) = (36, 70);
            let x: Vec<f32> = (0..m * k).map(|_| lcg(&mut s)).collect();
            let w: Vec<f16> = (0..n * k).map(|_| f16::from_f32(lcg(&mut s))).collect();
            let (xt, wt) = (ex.upload(&x, m, k).unwrap(), ex.weight(&w, n, k).unwrap());
            let mut y = ex.tensor(m, n).unwrap();
            ex.matmul(&xt, &wt, &mut y).unwrap();
            for i in 0..m {
                for j in 0..n {
                    let want: f32 = (0..k).map(|c| x[i * k + c] * w[j * k + c].to_f32()).sum();
                    assert!((y.data[i * n + j] - want).abs() < 1e-5);
                }
            }
        }
    }

    #[test]
    fn rope_rotates_pairs_half_apart() {
        let cfg = RopeConfig {
            head_dim: 4,
            theta: 10000.0,
            scaling: None,
            max_positions: 8,
        };
        let mut ex = RefExecutor::new();
        let rope = ex.rope_table(&cfg).unwrap();
        let mut x = ex.upload(&[1.0, 0.0, 0.0, 0.0], 1, 4).unwrap();
        ex.rope(&mut x, 1, &vec![3], &rope).unwrap();
        // Pair (0, 2) rotates by 3 * theta^0 = 3 rad.
        assert!((x.data[0] - 3f32.cos()).abs() < 1e-6);
        assert!((x.data[2] - 3f32.sin()).abs() < 1e-6);
        assert_eq!(x.data[1], 0.0);
    }

    #[test]
    fn llama3_scaling_keeps_high_and_divides_low_frequencies() {
        let base = RopeConfig {
            head_dim: 128,
            theta: 500000.0,
            scaling: None,
            max_positions: 1,
        };
        let s = crate::ops::Llama3Scaling {
            factor: 8.0,
            low_freq_factor: 1.0,
            high_freq_factor: 4.0,
            original_max_position_embeddings: 8192.0,
        };
        let plain = base.inv_freq();
        let scaled = RopeConfig {
            scaling: Some(s),
            ..base
        }
        .inv_freq();
        assert_eq!(plain[0], scaled[0]);
        assert!((scaled[63] - plain[63] / 8.0).abs() <= plain[63] * 1e-6);
    }

    /// Dense attention against a direct evaluation of softmax(q R(p) . R(j) k / sqrt(d)) v.
    #[test]
    fn attention_matches_direct_formula() {
        let (qh, kh, d, len, ps) = (4usize, 2usize, 8usize, 11usize, 4usize);
        let layout = KvLayout {
            layers: 1,
            kv_heads: kh,
            head_dim: d,
            page_size: ps,
            num_pages: 5,
        };
        let mut ex = RefExecutor::new();
        let mut alloc = PageAllocator::new(&layout);
        let mut t = alloc.new_sequence();
        alloc.reserve(&mut t, len).unwrap();
        let mut kv = ex.kv_cache(&layout).unwrap();
        let mut s = 7;
        let k: Vec<f32> = (0..len * kh * d).map(|_| lcg(&mut s)).collect();
        let v: Vec<f32> = (0..len * kh * d).map(|_| lcg(&mut s)).collect();
        let (kt, vt) = (
            ex.upload(&k, len, kh * d).unwrap(),
            ex.upload(&v, len, kh * d).unwrap(),
        );
        ex.kv_append(&mut kv, 0, &t, 0, &kt, &vt).unwrap();
        let cfg = RopeConfig {
            head_dim: d,
            theta: 100.0,
            scaling: None,
            max_positions: 64,
        };
        let rope = ex.rope_table(&cfg).unwrap();
        let n_q = 3;
        let q: Vec<f32> = (0..n_q * qh * d).map(|_| lcg(&mut s)).collect();
        let qt = ex.upload(&q, n_q, qh * d).unwrap();
        let mut out = ex.tensor(n_q, qh * d).unwrap();
        ex.attention_prefill(
            &qt,
            &KvView::new(&kv, 0, &t, &rope),
            len - n_q,
            len,
            &mut out,
        )
        .unwrap();
        for i in 0..n_q {
            for h in 0..qh {
                let g = h / (qh / kh);
                let visible = len - n_q + i + 1;
                let qv = &q[(i * qh + h) * d..(i * qh + h + 1) * d];
                let scores: Vec<f64> = (0..visible)
                    .map(|j| {
                        let mut kj: Vec<f32> =
                            (0..d).map(|c| round_f16(k[(j * kh + g) * d + c])).collect();
                        rotate(&mut kj, &rope.row(j));
                        qv.iter()
                            .zip(&kj)
                            .map(|(a, b)| (*a as f64) * (*b as f64))
                            .sum::<f64>()
                            / (d as f64).sqrt()
                    })
                    .collect();
                let mx = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let z: f64 = scores.iter().map(|x| (x - mx).exp()).sum();
                for c in 0..d {
                    let want: f64 = (0..visible)
                        .map(|j| {
                            (scores[j] - mx).exp() / z * round_f16(v[(j * kh + g) * d + c]) as f64
                        })
                        .sum();
                    let got = out.data[(i * qh + h) * d + c] as f64;
                    assert!((got - want).abs() < 1e-5, "q{i} h{h} c{c}: {got} vs {want}");
                }
            }
        }
        // Decode of the last query equals the last prefill row.
        let q_last = ex.upload(&q[(n_q - 1) * qh * d..], 1, qh * d).unwrap();
        let mut o1 = ex.tensor(1, qh * d).unwrap();
        ex.attention_decode(&q_last, &KvView::new(&kv, 0, &t, &rope), len, &mut o1)
            .unwrap();
        assert_eq!(o1.data, out.data[(n_q - 1) * qh * d..].to_vec());
    }
}
