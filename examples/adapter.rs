//! Prints the adapter kvsieve would choose (honouring KVSIEVE_ADAPTER and
//! KVSIEVE_BACKEND) and checks one dense decode-attention step on it against the
//! CPU reference executor.
//!
//! `cargo run --release --example adapter`

use kvsieve::attention::{dense_attention, KvLayout, PageAllocator};
use kvsieve::kernels::GpuExecutor;
use kvsieve::ops::prelude::*;
use kvsieve::ops::RopeConfig;
use kvsieve::reference::RefExecutor;

fn main() -> kvsieve::Result<()> {
    let mut gpu = GpuExecutor::new()?;
    print!("{}", gpu.ctx.describe());
    println!("tuning: {:?}", gpu.tuning);
    let mut cpu = RefExecutor::new();
    let (qh, kh, d, len) = (9usize, 3usize, 64usize, 4000usize);
    let layout = KvLayout {
        layers: 1,
        kv_heads: kh,
        head_dim: d,
        page_size: 64,
        num_pages: len.div_ceil(64),
    };
    let mut alloc = PageAllocator::new(&layout);
    let mut table = alloc.new_sequence();
    alloc.reserve(&mut table, len)?;
    table.len = len;
    let vals = |n: usize, salt: usize| -> Vec<f32> {
        (0..n)
            .map(|i| (((i * 7919 + salt) % 1000) as f32 / 500.0) - 1.0)
            .collect()
    };
    let (k, v, q) = (
        vals(len * kh * d, 1),
        vals(len * kh * d, 2),
        vals(qh * d, 3),
    );
    let rope = RopeConfig {
        head_dim: d,
        theta: 100000.0,
        scaling: None,
        max_positions: len,
    };
    let mut kv_g = gpu.kv_cache(&layout)?;
    let mut kv_c = cpu.kv_cache(&layout)?;
    let (rg, rc) = (gpu.rope_table(&rope)?, cpu.rope_table(&rope)?);
    let (kg, vg) = (gpu.upload(&k, len, kh * d)?, gpu.upload(&v, len, kh * d)?);
    gpu.kv_append(&mut kv_g, 0, &table, 0, &kg, &vg)?;
    let (kc, vc) = (cpu.upload(&k, len, kh * d)?, cpu.upload(&v, len, kh * d)?);
    cpu.kv_append(&mut kv_c, 0, &table, 0, &kc, &vc)?;
    let (qg, qc) = (gpu.upload(&q, 1, qh * d)?, cpu.upload(&q, 1, qh * d)?);
    let (mut og, mut oc) = (gpu.tensor(1, qh * d)?, cpu.tensor(1, qh * d)?);
    let t = std::time::Instant::now();
    dense_attention(
        &mut gpu,
        &qg,
        &KvView::new(&kv_g, 0, &table, &rg),
        len - 1,
        len,
        &mut og,
    )?;
    let got = gpu.download(&og)?;
    let gpu_ms = t.elapsed().as_secs_f64() * 1e3;
    dense_attention(
        &mut cpu,
        &qc,
        &KvView::new(&kv_c, 0, &table, &rc),
        len - 1,
        len,
        &mut oc,
    )?;
    let err = got
        .iter()
        .zip(&oc.data)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0f32, f32::max);
    println!("decode attention over {len} tokens: max |gpu - reference| = {err:.2e} ({gpu_ms:.1} ms incl. submit)");
    if err > 1e-3 {
        return Err(kvsieve::Error::Gpu(format!(
            "GPU result differs from the reference by {err}"
        )));
    }
    Ok(())
}
