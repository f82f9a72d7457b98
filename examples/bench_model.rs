//! End-to-end speed on a model: prefill tokens/s for a 512-token prompt, decode
//! tokens/s over 128 tokens, decode's share of the adapter's copy bandwidth, and
//! where decode time goes per kernel (GPU timestamps). Prints a Markdown table and
//! writes JSON.
//!
//! `cargo run --release --example bench_model -- --json bench_model.json`

use clap::Parser;
use kvsieve::generate::{Backend, Engine, GenerateParams, Options};
use kvsieve::kernels::{copy_buffer, GpuExecutor};
use std::path::PathBuf;
use std::time::Instant;

#[derive(Parser, Debug)]
struct Cli {
    /// Model directory or GGUF file (default: the default model).
    #[arg(long)]
    model: Option<PathBuf>,
    /// gpu or reference.
    #[arg(long, default_value = "gpu")]
    backend: String,
    /// Prompt length.
    #[arg(long, default_value_t = 512)]
    prompt_tokens: usize,
    /// Tokens decoded.
    #[arg(long, default_value_t = 128)]
    decode_tokens: usize,
    /// Decode steps timed per kernel.
    #[arg(long, default_value_t = 8)]
    profile_steps: usize,
    /// Quantize float weight matrices at load: off, q8_0, q4_0 or q4_1.
    #[arg(long, default_value = "off")]
    quantize: String,
    /// Decode steps kept in flight (1: read each token before the next
    /// step; 0: 2 on a GPU, 1 on a CPU adapter).
    #[arg(long, default_value_t = 0)]
    decode_ahead: usize,
    /// Sampling temperature of the decoded tokens (0 = greedy; top-k 40):
    /// sampled steps pick on the device and stay in flight as greedy ones do.
    #[arg(long, default_value_t = 0.0)]
    temperature: f32,
    /// Write the results here as JSON.
    #[arg(long)]
    json: Option<PathBuf>,
}

/// Copy-kernel bandwidth (bytes read + written per second) on the chosen adapter.
fn copy_bandwidth() -> kvsieve::Result<f64> {
    let mut ex = GpuExecutor::new()?;
    ex.rec.enable_timestamps();
    let bytes = 64u64 << 20;
    let src = kvsieve::gpu::buffer::storage(&ex.ctx.device, bytes, "src").unwrap();
    let dst = kvsieve::gpu::buffer::storage(&ex.ctx.device, bytes, "dst").unwrap();
    let mut best = f64::MAX;
    for _ in 0..5 {
        let t = Instant::now();
        copy_buffer(&mut ex, &src, &dst, bytes)?;
        let r = ex.rec.submit()?;
        let secs = r
            .gpu_ns
            .map(|ns| ns * 1e-9)
            .unwrap_or_else(|| t.elapsed().as_secs_f64());
        best = best.min(secs);
    }
    Ok(2.0 * bytes as f64 / best)
}

/// The recorder's own floor: host microseconds to record and submit one
/// dispatch of a trivial kernel (the copy kernel on 16 bytes, two storage
/// bindings, bind groups cached), median over 20 steps of 256 dispatches
/// after 4 that warm. What a decode step costs per dispatch above it is the
/// model's recording. The second figure is the same dispatches made through
/// wgpu directly, each with a bind group made beforehand: wgpu's and the
/// driver's own cost.
fn host_floor_us() -> kvsieve::Result<(f64, f64)> {
    let mut ex = GpuExecutor::new()?;
    let src = kvsieve::gpu::buffer::storage(&ex.ctx.device, 4096, "src")?;
    let dst = kvsieve::gpu::buffer::storage(&ex.ctx.device, 4096, "dst")?;
    let mut per = Vec::new();
    for step in 0..24 {
        let (t, h0) = (Instant::now(), ex.rec.submit_host_ns);
        for _ in 0..256 {
            copy_buffer(&mut ex, &src, &dst, 16)?;
        }
        let record_ns = t.elapsed().as_nanos() as f64;
        // Submitted and waited for: what `submit_host_ns` adds is the host's part.
        ex.rec.submit()?;
        if step >= 4 {
            per.push((record_ns + ex.rec.submit_host_ns - h0) / 256.0 / 1e3);
        }
    }
    // wgpu alone: the same dispatches, each with its own bind group (its
    // uniform at its own offset, as the recorder's are), all made once.
    let p = kvsieve::gpu::PipelineCache::default().get(
        &ex.ctx.device,
        kvsieve::shaders::COPY,
        "copy",
        &[],
    );
    let uniform = ex.ctx.device.create_buffer(&wgpu::BufferDescriptor {
        label: Some("params"),
        size: 256 * 256,
        usage: wgpu::BufferUsages::UNIFORM | wgpu::BufferUsages::COPY_DST,
        mapped_at_creation: false,
    });
    fn entry(binding: u32, buffer: &wgpu::Buffer, offset: u64) -> wgpu::BindGroupEntry<'_> {
        wgpu::BindGroupEntry {
            binding,
            resource: wgpu::BindingResource::Buffer(wgpu::BufferBinding {
                buffer,
                offset,
                size: wgpu::BufferSize::new(16),
            }),
        }
    }
    let groups: Vec<wgpu::BindGroup> = (0..256)
        .map(|i| {
            ex.ctx.device.create_bind_group(&wgpu::BindGroupDescriptor {
                label: None,
                layout: &p.layout,
                entries: &[
                    entry(0, &uniform, 256 * i),
                    entry(1, &src, 0),
                    entry(2, &dst, 0),
                ],
            })
        })
        .collect();
    let mut raw = Vec::new();
    for step in 0..24 {
        let t = Instant::now();
        let mut enc = ex.ctx.device.create_command_encoder(&Default::default());
        {
            let mut pass = enc.begin_compute_pass(&Default::default());
            for bg in &groups {
                pass.set_pipeline(&p.pipeline);
                pass.set_bind_group(0, bg, &[]);
                pass.dispatch_workgroups(1, 1, 1);
            }
        }
        let index = ex.ctx.queue.submit([enc.finish()]);
        let host_ns = t.elapsed().as_nanos() as f64;
        ex.ctx
            .device
            .poll(wgpu::PollType::Wait {
                submission_index: Some(index),
                timeout: None,
            })
            .map_err(|e| kvsieve::Error::Gpu(e.to_string()))?;
        if step >= 4 {
            raw.push(host_ns / 256.0 / 1e3);
        }
    }
    let median = |mut v: Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    Ok((median(per), median(raw)))
}

fn main() -> kvsieve::Result<()> {
    let cli = Cli::parse();
    let backend: Backend = cli.backend.parse()?;
    let opts = Options {
        backend,
        max_context: cli.prompt_tokens + cli.decode_tokens + 64,
        progress: true,
        decode_ahead: cli.decode_ahead,
        quantize: match cli.quantize.as_str() {
            "off" => None,
            s => Some(kvsieve::quant::DType::parse(s).ok_or_else(|| {
                kvsieve::Error::InvalidOption(format!("--quantize {s:?}: off, q8_0, q4_0 or q4_1"))
            })?),
        },
        ..Default::default()
    };
    let mut e = match &cli.model {
        Some(d) => Engine::load(d, opts)?,
        None => Engine::load_default(opts)?,
    };
    let c = e.config.clone();
    let sampling = kvsieve::SamplingParams {
        temperature: cli.temperature,
        ..Default::default()
    };
    sampling.validate()?;
    let filler = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. ";
    let mut prompt = e
        .tokenizer
        .encode(&filler.repeat(cli.prompt_tokens / 10 + 8))?;
    prompt.truncate(cli.prompt_tokens);
    // Warm-up: build pipelines and buffers.
    e.generate_ids(
        &prompt[..16],
        &GenerateParams {
            max_tokens: 2,
            stop_at_eos: false,
            ..Default::default()
        },
    )?
    .for_each(drop);
    e.reset();
    e.stats = Default::default();
    let params = GenerateParams {
        max_tokens: cli.decode_tokens + 1,
        stop_at_eos: false,
        sampling: sampling.clone(),
        ..Default::default()
    };
    let n = e.generate_ids(&prompt, &params)?.count();
    let s = e.stats.clone();
    // Bytes read per decode token: every weight matrix as stored plus the KV cache.
    let (kv, l) = (c.kv_heads * c.head_dim, c.layers);
    let (weight_bytes, weight_read) = e.weight_bytes();
    let weight_read = weight_read as usize;
    let mean_ctx = cli.prompt_tokens + cli.decode_tokens / 2;
    let kv_bytes = 2 * 2 * l * kv * mean_ctx;
    let bytes_per_token = (weight_read + kv_bytes) as f64;
    let decode_bw = bytes_per_token * s.decode_tps();
    let copy_bw = if backend == Backend::Gpu {
        Some(copy_bandwidth()?)
    } else {
        None
    };
    // Host cost of a steady-state decode step: two requests on the cached
    // prompt, the second `profile_steps` tokens longer; the difference in
    // counters is what those extra steps cost (the first steps of a request,
    // which differ from the rest, cancel out).
    e.prefill(&prompt)?;
    // One step at a time: with steps in flight, a driver whose submit waits
    // for the step before (lavapipe does) would count device time as host time.
    e.set_decode_ahead(1)?;
    let steps = cli.profile_steps.max(2);
    let mut marks = Vec::new();
    // The first request warms; the other two start alike (after a request).
    for extra in [0, 0, steps] {
        let (c0, r0) = (e.counters(), e.stats.decode_record_time);
        e.generate_ids(
            &prompt,
            &GenerateParams {
                max_tokens: steps + 1 + extra,
                stop_at_eos: false,
                sampling: sampling.clone(),
                ..Default::default()
            },
        )?
        .for_each(drop);
        let (c1, r1) = (e.counters(), e.stats.decode_record_time);
        marks.push((c1, c0, (r1 - r0).as_secs_f64()));
    }
    let d = |f: &dyn Fn(&kvsieve::ops::Counters) -> f64| {
        let ((a1, a0, _), (b1, b0, _)) = (&marks[1], &marks[2]);
        ((f(b1) - f(b0)) - (f(a1) - f(a0))) / steps as f64
    };
    let record_ms = (marks[2].2 - marks[1].2) * 1e3 / steps as f64;
    let submit_ms = d(&|c| c.submit_host_ns) / 1e6;
    let host_ms_per_token = record_ms + submit_ms;
    let dispatches_per_layer = d(&|c| c.dispatches as f64) / l as f64;
    let bind_groups_per_token = d(&|c| c.bind_groups as f64);
    let buffers_per_token = d(&|c| c.buffers as f64);
    let wait_ms = d(&|c| c.wait_ns) / 1e6;
    let dispatches_per_token = d(&|c| c.dispatches as f64);
    let host_us_per_dispatch = host_ms_per_token * 1e3 / dispatches_per_token.max(1.0);
    let floor_us = if backend == Backend::Gpu {
        Some(host_floor_us()?)
    } else {
        None
    };
    e.set_decode_ahead(cli.decode_ahead)?;
    let ahead = e.decode_ahead();
    // Per-kernel time over a few decode steps.
    e.set_profiling(true);
    let extra = GenerateParams {
        max_tokens: cli.profile_steps + 1,
        stop_at_eos: false,
        sampling: sampling.clone(),
        ..Default::default()
    };
    e.generate_ids(&prompt, &extra)?.for_each(drop);
    e.set_profiling(false);
    let mut prof = e.take_profile();
    prof.sort_by(|a, b| b.2.total_cmp(&a.2));
    let total_ns: f64 = prof.iter().map(|p| p.2).sum();

    println!("| model | executor | weights MB | prompt | prefill tok/s | decode tok/s | decode GB/s | copy GB/s | decode / copy |");
    println!("|---|---|---|---|---|---|---|---|---|");
    println!(
        "| {} L{} H{} | {} | {:.1} | {} | {:.1} | {:.2} | {:.2} | {} | {} |",
        c.arch_name(),
        c.layers,
        c.hidden,
        e.backend_name(),
        weight_bytes as f64 / 1e6,
        prompt.len(),
        s.prefill_tps(),
        s.decode_tps(),
        decode_bw / 1e9,
        copy_bw
            .map(|b| format!("{:.2}", b / 1e9))
            .unwrap_or("-".into()),
        copy_bw
            .map(|b| format!("{:.2}", decode_bw / b))
            .unwrap_or("-".into()),
    );
    if backend == Backend::Gpu {
        println!(
            "\n| host ms / token (record + submit) | host us / dispatch (trivial kernel: recorder, wgpu alone) | wait ms / token | dispatches / layer | bind groups / token | buffers / token |"
        );
        println!("|---|---|---|---|---|---|");
        println!(
            "| {host_ms_per_token:.2} ({record_ms:.2} + {submit_ms:.2}) | {host_us_per_dispatch:.2} ({:.2}, {:.2}) | {wait_ms:.2} | {dispatches_per_layer:.1} | {bind_groups_per_token:.0} | {buffers_per_token:.0} |",
            floor_us.map_or(f64::NAN, |f| f.0),
            floor_us.map_or(f64::NAN, |f| f.1)
        );
    }
    if !prof.is_empty() {
        println!(
            "\n| kernel (decode, {} steps) | dispatches | ms | share |",
            cli.profile_steps
        );
        println!("|---|---|---|---|");
        for (k, d, ns) in &prof {
            println!(
                "| {k} | {d} | {:.1} | {:.1}% |",
                ns / 1e6,
                100.0 * ns / total_ns
            );
        }
    }
    if let Some(path) = cli.json {
        let j = serde_json::json!({
            "model": c.arch_name(), "executor": e.backend_name(), "prompt_tokens": prompt.len(), "decode_ahead": ahead, "temperature": cli.temperature,
            "generated_tokens": n, "prefill_tokens_per_s": s.prefill_tps(), "decode_tokens_per_s": s.decode_tps(),
            "bytes_per_decode_token": bytes_per_token, "weight_bytes": weight_bytes, "decode_bytes_per_s": decode_bw,
            "copy_bytes_per_s": copy_bw, "decode_over_copy": copy_bw.map(|b| decode_bw / b),
            "host_ms_per_token": host_ms_per_token, "record_ms_per_token": record_ms,
            "submit_ms_per_token": submit_ms, "wait_ms_per_token": wait_ms,
            "host_us_per_dispatch": host_us_per_dispatch, "host_floor_us_per_dispatch": floor_us.map(|f| f.0), "wgpu_floor_us_per_dispatch": floor_us.map(|f| f.1),
            "dispatches_per_layer": dispatches_per_layer, "bind_groups_per_token": bind_groups_per_token, "buffers_per_token": buffers_per_token,
            "decode_kernel_profile": prof.iter().map(|(k, d, ns)| serde_json::json!({"kernel": k, "dispatches": d, "ns": ns})).collect::<Vec<_>>(),
        });
        std::fs::write(&path, serde_json::to_string_pretty(&j).unwrap_or_default())
            .map_err(|e| kvsieve::Error::io(&path, e))?;
    }
    Ok(())
}
