//! Kernel benchmarks on the adapter the library would choose.
//!
//! Decode paths report bytes moved (criterion's GiB/s), compute-bound paths report
//! FLOPs as "elements" (criterion's elem/s = FLOP/s). Times come from GPU
//! timestamps around the submit when the adapter has them, else wall time.
//! The buffer-copy kernel is the bandwidth ceiling the decode kernels are judged by.
//!
//! On CPU drivers (lavapipe, llvmpipe) the largest compute cases take minutes per
//! sample; they run only with KVSIEVE_BENCH_FULL=1.

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use half::f16;
use kvsieve::kernels::{copy_buffer, GpuExecutor};
use kvsieve::ops::prelude::*;
use std::time::Duration;

mod common;
use common::{cache, timed};

fn executor() -> GpuExecutor {
    let mut ex =
        GpuExecutor::new().unwrap_or_else(|e| panic!("benchmarks need a GPU adapter: {e}"));
    eprintln!("{}", ex.ctx.describe());
    ex.rec.enable_timestamps();
    if let Ok(v) = std::env::var("KVSIEVE_SMALL_MAX_ROWS") {
        ex.tuning.small_max_rows = v.parse().expect("KVSIEVE_SMALL_MAX_ROWS");
    }
    ex
}

fn cpu_adapter(ex: &GpuExecutor) -> bool {
    ex.ctx.info.device_type == wgpu::DeviceType::Cpu
}

fn full() -> bool {
    std::env::var("KVSIEVE_BENCH_FULL").is_ok_and(|v| v == "1")
}

fn bench_copy(c: &mut Criterion, ex: &mut GpuExecutor) {
    let mut g = c.benchmark_group("copy");
    g.sample_size(10)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(3));
    for mib in [16u64, 64] {
        let bytes = mib << 20;
        let src = kvsieve::gpu::buffer::storage(&ex.ctx.device, bytes, "src").unwrap();
        let dst = kvsieve::gpu::buffer::storage(&ex.ctx.device, bytes, "dst").unwrap();
        // Read + write.
        g.throughput(Throughput::Bytes(2 * bytes));
        g.bench_function(BenchmarkId::from_parameter(format!("{mib}MiB")), |b| {
            b.iter_custom(|iters| {
                timed(ex, iters, |ex| copy_buffer(ex, &src, &dst, bytes).unwrap())
            })
        });
    }
    g.finish();
}

fn bench_matmul(c: &mut Criterion, ex: &mut GpuExecutor) {
    let mut g = c.benchmark_group("matmul");
    g.sample_size(10)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(3));
    let shapes = [
        ("smollm2_576x1536", 576usize, 1536usize),
        ("smollm2_576x49152", 576, 49152),
        ("llama3_4096x14336", 4096, 14336),
    ];
    for (name, k, n) in shapes {
        let w = ex.weight(&vec![f16::from_f32(0.01); n * k], n, k).unwrap();
        for m in [1usize, 4, 16, 512] {
            let flops = 2 * m * n * k;
            if cpu_adapter(ex) && !full() && flops > 10_000_000_000 {
                eprintln!(
                    "matmul {name} m={m}: skipped on a CPU adapter (KVSIEVE_BENCH_FULL=1 runs it)"
                );
                continue;
            }
            let x = ex.upload(&vec![0.5; m * k], m, k).unwrap();
            let mut y = ex.tensor(m, n).unwrap();
            if m <= 16 {
                g.throughput(Throughput::Bytes(
                    (n * k * 2 + m * k * 4 + m * n * 4) as u64,
                ));
            } else {
                g.throughput(Throughput::Elements(flops as u64));
            }
            g.bench_function(BenchmarkId::new(name, format!("rows{m}")), |b| {
                b.iter_custom(|iters| timed(ex, iters, |ex| ex.matmul(&x, &w, &mut y).unwrap()))
            });
        }
    }
    g.finish();
}

const HEADS: [(&str, usize, usize, usize); 2] =
    [("h9kv3d64", 9, 3, 64), ("h32kv8d128", 32, 8, 128)];

fn bench_decode(c: &mut Criterion, ex: &mut GpuExecutor) {
    let mut g = c.benchmark_group("attention_decode");
    g.sample_size(10)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(3));
    for (name, qh, kh, d) in HEADS {
        for len in [1024usize, 8192, 32768, 131072] {
            let cc = cache(ex, kh, d, len).expect("KV cache");
            let q = ex.upload(&vec![0.1; qh * d], 1, qh * d).unwrap();
            let mut out = ex.tensor(1, qh * d).unwrap();
            // K and V read once each (f16).
            g.throughput(Throughput::Bytes((2 * len * kh * d * 2) as u64));
            g.bench_function(BenchmarkId::new(name, format!("{}k", len / 1024)), |b| {
                b.iter_custom(|iters| {
                    timed(ex, iters, |ex| {
                        ex.attention_decode(
                            &q,
                            &KvView::new(&cc.kv, 0, &cc.table, &cc.rope),
                            len,
                            &mut out,
                        )
                        .unwrap()
                    })
                })
            });
        }
    }
    g.finish();
}

fn bench_prefill(c: &mut Criterion, ex: &mut GpuExecutor) {
    let mut g = c.benchmark_group("attention_prefill");
    g.sample_size(10)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(3));
    let chunk = 512usize;
    for (name, qh, kh, d) in HEADS {
        for len in [4096usize, 32768] {
            // Causal: each query sees (len - chunk + i + 1) keys; 4 FLOPs per key and dim.
            let keys: usize = (0..chunk).map(|i| len - chunk + i + 1).sum();
            let flops = 4 * qh * d * keys;
            if cpu_adapter(ex) && !full() && flops > 10_000_000_000 {
                eprintln!(
                    "prefill {name} {len}: skipped on a CPU adapter (KVSIEVE_BENCH_FULL=1 runs it)"
                );
                continue;
            }
            let cc = cache(ex, kh, d, len).expect("KV cache");
            let q = ex
                .upload(&vec![0.1; chunk * qh * d], chunk, qh * d)
                .unwrap();
            let mut out = ex.tensor(chunk, qh * d).unwrap();
            g.throughput(Throughput::Elements(flops as u64));
            g.bench_function(BenchmarkId::new(name, format!("{}k", len / 1024)), |b| {
                b.iter_custom(|iters| {
                    timed(ex, iters, |ex| {
                        ex.attention_prefill(
                            &q,
                            &KvView::new(&cc.kv, 0, &cc.table, &cc.rope),
                            len - chunk,
                            len,
                            &mut out,
                        )
                        .unwrap()
                    })
                })
            });
        }
    }
    g.finish();
}

/// Seconds per call of `f`, best of 5 runs of 4 calls (GPU timestamps when present).
fn seconds(ex: &mut GpuExecutor, mut f: impl FnMut(&mut GpuExecutor)) -> f64 {
    f(ex);
    (0..5)
        .map(|_| timed(ex, 4, &mut f).as_secs_f64() / 4.0)
        .fold(f64::MAX, f64::min)
}

/// An `[n, k]` weight of type `t` as stored: 0.01 everywhere, through the
/// reference quantizer where there is one, else zero blocks (the kernels' cost
/// does not depend on the values).
fn weight_bytes(t: kvsieve::quant::DType, n: usize, k: usize) -> Vec<u8> {
    use kvsieve::quant::DType;
    let f = vec![0.01f32; n * k];
    let mut raw = Vec::new();
    match t {
        DType::F16 => raw.extend(f.iter().flat_map(|v| f16::from_f32(*v).to_le_bytes())),
        DType::Q8_0 | DType::Q4_0 | DType::Q4_1 => {
            kvsieve::quant::quantize(t, &f, &mut raw).unwrap()
        }
        _ => raw.resize(t.bytes_for((n * k) as u64).unwrap() as usize, 0),
    }
    raw
}

/// Quantized GEMV (one row of x, decode) for every weight type at the issue's
/// shapes: criterion's GiB/s over the bytes read (weights as stored, x, y), then
/// a table of GB/s and the fraction of the copy kernel's bandwidth from one
/// same-run measurement (stdout, and `target/qgemv.json`).
fn bench_qgemv(c: &mut Criterion, ex: &mut GpuExecutor) {
    use kvsieve::quant::DType;
    let mut g = c.benchmark_group("qgemv");
    g.sample_size(10)
        .warm_up_time(Duration::from_millis(300))
        .measurement_time(Duration::from_secs(2));
    // (k, n): in-dim x out-dim.
    let shapes = [
        (576usize, 1536usize),
        (1536, 576),
        (576, 49152),
        (4096, 14336),
    ];
    let types = [
        DType::F16,
        DType::Q8_0,
        DType::Q4_0,
        DType::Q4_1,
        DType::Q5_0,
        DType::Q5_1,
        DType::Q4_K,
        DType::Q5_K,
        DType::Q6_K,
    ];
    let bytes = 64u64 << 20;
    let src = kvsieve::gpu::buffer::storage(&ex.ctx.device, bytes, "src").unwrap();
    let dst = kvsieve::gpu::buffer::storage(&ex.ctx.device, bytes, "dst").unwrap();
    let copy_bw =
        2.0 * bytes as f64 / seconds(ex, |ex| copy_buffer(ex, &src, &dst, bytes).unwrap());
    let mut rows = Vec::new();
    for (k, n) in shapes {
        let x = ex.upload(&vec![0.5; k], 1, k).unwrap();
        let mut y = ex.tensor(1, n).unwrap();
        for t in types {
            if !k.is_multiple_of(t.block().0) {
                continue; // K types need rows of whole 256-value blocks
            }
            let w = ex.weight_raw(t, &weight_bytes(t, n, k), n, k).unwrap();
            let read = t.bytes_for((n * k) as u64).unwrap() + (k * 4 + n * 4) as u64;
            g.throughput(Throughput::Bytes(read));
            g.bench_function(BenchmarkId::new(format!("{k}x{n}"), t.name()), |b| {
                b.iter_custom(|iters| timed(ex, iters, |ex| ex.matmul(&x, &w, &mut y).unwrap()))
            });
            let bw = read as f64 / seconds(ex, |ex| ex.matmul(&x, &w, &mut y).unwrap());
            let gflops = 2.0 * (n * k) as f64 * bw / read as f64 / 1e9;
            rows.push((format!("{k}x{n}"), t.name(), bw, gflops));
        }
    }
    g.finish();
    // Speculative verification runs 2..16 rows through the same weights: the
    // time per step should grow gently with rows, not jump past one row; 64
    // rows is a prefill chunk's path. At a large shape and the default model's
    // FFN shape.
    const SWEEP_ROWS: [usize; 6] = [1, 2, 4, 8, 16, 64];
    let mut sweep = Vec::new();
    for (k, n) in [(2048usize, 8192usize), (576, 1536)] {
        for t in [
            DType::F16,
            DType::Q8_0,
            DType::Q4_1,
            DType::Q4_K,
            DType::Q6_K,
        ] {
            if !k.is_multiple_of(t.block().0) {
                continue;
            }
            let w = ex.weight_raw(t, &weight_bytes(t, n, k), n, k).unwrap();
            let mut ms = Vec::new();
            for m in SWEEP_ROWS {
                let x = ex.upload(&vec![0.5; m * k], m, k).unwrap();
                let mut y = ex.tensor(m, n).unwrap();
                // The first calls after new buffers run slow on lavapipe (seen in
                // this sweep for a few hundred ms): warm up, then take the best.
                let t = (0..2)
                    .map(|_| seconds(ex, |ex| ex.matmul(&x, &w, &mut y).unwrap()))
                    .fold(f64::MAX, f64::min);
                ms.push(1e3 * t);
            }
            sweep.push((format!("{k}x{n}"), t.name(), ms));
        }
    }
    println!("\nqgemv: copy kernel {:.2} GB/s", copy_bw / 1e9);
    println!("| shape (in x out) | type | GB/s read | fraction of copy | GFLOP/s |");
    println!("|---|---|---|---|---|");
    for (shape, t, bw, gf) in &rows {
        println!(
            "| {shape} | {t} | {:.2} | {:.2} | {gf:.1} |",
            bw / 1e9,
            bw / copy_bw
        );
    }
    println!("\nrows sweep: ms per matmul (x of one row)");
    let head: Vec<String> = SWEEP_ROWS.iter().map(|m| m.to_string()).collect();
    println!("| shape | type | {} |", head.join(" | "));
    println!("|---|---|{}", "---|".repeat(SWEEP_ROWS.len()));
    for (shape, t, ms) in &sweep {
        let cells: Vec<String> = ms
            .iter()
            .map(|v| format!("{v:.2} ({:.2}x)", v / ms[0]))
            .collect();
        println!("| {shape} | {t} | {} |", cells.join(" | "));
    }
    let json = serde_json::json!({
        "rows_sweep": sweep.iter().map(|(shape, t, ms)| serde_json::json!({
            "shape": shape, "type": t, "rows": SWEEP_ROWS, "ms": ms,
        })).collect::<Vec<_>>(),
        "adapter": ex.ctx.describe(),
        "copy_bytes_per_s": copy_bw,
        "qgemv": rows.iter().map(|(s, t, bw, gf)| serde_json::json!({
            "shape": s, "type": t, "bytes_per_s": bw, "fraction_of_copy": bw / copy_bw, "gflops": gf,
        })).collect::<Vec<_>>(),
    });
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("target/qgemv.json");
    let _ = std::fs::write(
        path,
        serde_json::to_string_pretty(&json).unwrap_or_default(),
    );
}

fn benches(c: &mut Criterion) {
    let mut ex = executor();
    bench_copy(c, &mut ex);
    bench_qgemv(c, &mut ex);
    bench_matmul(c, &mut ex);
    bench_decode(c, &mut ex);
    bench_prefill(c, &mut ex);
}

criterion_group!(kernels, benches);
criterion_main!(kernels);
