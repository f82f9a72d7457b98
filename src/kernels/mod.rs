//! The GPU executor: one module per shader family, each with shape checks and the
//! dispatch of its WGSL kernel. All dispatches go into the executor's
//! [`Recorder`] and reach the GPU in one submit when results are read back (or on
//! [`crate::ops::Executor::flush`]).

mod argmax;
mod attention;
mod block_sparse;
pub use block_sparse::GpuBounds;
mod copy;
mod elementwise;
mod embedding;
mod gate;
mod kv_append;
mod matmul;
mod ops_impl;
pub mod params;
pub mod quant;
mod rmsnorm;
mod rope;
mod sampling;
mod speculative;
mod tokenselect;
mod topk;

use crate::error::{Error, Result};
use crate::gpu::buffer::{self, RowChunk};
use crate::gpu::{GpuContext, PipelineCache, Recorder};
use crate::kv::{KvLayout, PageTable};
use crate::ops::KvView;
use std::collections::HashMap;
use std::sync::Arc;

/// f32 matrix `[rows, cols]` in one storage buffer.
#[derive(Clone, Debug)]
pub struct GpuTensor {
    /// The buffer.
    pub buf: wgpu::Buffer,
    /// Rows.
    pub rows: usize,
    /// Columns.
    pub cols: usize,
}

/// u32 vector.
#[derive(Clone, Debug)]
pub struct GpuIds {
    /// The buffer.
    pub buf: wgpu::Buffer,
    /// Length.
    pub len: usize,
}

/// Weight matrix split by rows into chunks that each fit one storage binding:
/// f16 rows, or a quantized type's planes ([`quant`]) per chunk.
#[derive(Clone, Debug)]
pub struct GpuWeight {
    /// How the chunks store values: F16, or a quantized kernel type.
    pub dtype: crate::quant::DType,
    /// The chunks, in row order.
    pub chunks: Vec<RowChunk>,
    /// Rows.
    pub rows: usize,
    /// Columns.
    pub cols: usize,
}

/// RoPE (cos, sin) table on the GPU.
#[derive(Clone, Debug)]
pub struct GpuRope {
    /// The table `[table_rows, half]` of `vec2<f32>` (see
    /// [`crate::ops::ROPE_SPLIT`]).
    pub buf: wgpu::Buffer,
    /// head_dim / 2.
    pub half: usize,
    /// Positions covered.
    pub max_pos: usize,
}

/// Paged KV storage: per layer, K and V arenas of `pages_per_arena` pages each.
#[derive(Clone, Debug)]
pub struct GpuKv {
    /// Layout.
    pub layout: KvLayout,
    /// Pages held by one arena buffer (bounded by the storage binding limit).
    pub pages_per_arena: usize,
    /// `k[layer][arena]`.
    pub k: Vec<Vec<wgpu::Buffer>>,
    /// `v[layer][arena]`.
    pub v: Vec<Vec<wgpu::Buffer>>,
}

impl GpuKv {
    /// Arena buffers (ascending) holding a page of the logical tokens `tokens`
    /// (a non-empty range inside the reserved pages of `table`).
    pub fn arenas_for(&self, table: &PageTable, tokens: std::ops::Range<usize>) -> Vec<usize> {
        arenas_for(self.layout.page_size, self.pages_per_arena, table, tokens)
    }
}

/// Arenas of `pages_per_arena` pages (ascending) holding a page of the logical
/// `tokens` of `table` (shared by the KV cache and its block bounds).
fn arenas_for(
    page_size: usize,
    pages_per_arena: usize,
    table: &PageTable,
    tokens: std::ops::Range<usize>,
) -> Vec<usize> {
    let pages = &table.pages[tokens.start / page_size..tokens.end.div_ceil(page_size)];
    let mut used: Vec<usize> = pages
        .iter()
        .map(|&p| p as usize / pages_per_arena)
        .collect();
    used.sort_unstable();
    used.dedup();
    used
}

/// A bool override constant's value: wgpu takes every override as an f64.
fn flag(on: bool) -> f64 {
    f64::from(u8::from(on))
}

/// Mesa's CPU drivers share llvmpipe's JIT and its loop limiter.
fn llvmpipe(info: &wgpu::AdapterInfo) -> bool {
    let n = info.name.to_ascii_lowercase();
    let d = info.driver.to_ascii_lowercase();
    n.contains("llvmpipe")
        || n.contains("lavapipe")
        || d.contains("llvmpipe")
        || d.contains("lavapipe")
}

/// Per-adapter tuning: tile shapes passed as override constants, split sizes.
#[derive(Clone, Debug)]
pub struct Tuning {
    /// Weight rows per workgroup of the 1-row GEMV.
    pub gemv_rows: u32,
    /// Workgroup shape of the tiled GEMM (threads; each thread computes 4x4).
    pub tiled_wg: (u32, u32),
    /// Rows of x up to which the small-batch matmul is used instead of the tiled one.
    pub small_max_rows: usize,
    /// Decode attention: aim for this many (split, kv head) workgroups.
    pub decode_workgroups: usize,
    /// Decode attention: smallest split, in tokens (multiple of 64).
    pub decode_min_split: usize,
    /// Iterations after which the driver ends a loop nest (llvmpipe, and so Mesa's
    /// lavapipe and GL-on-llvmpipe, stop every outermost loop after 65535 iterations
    /// of it and the loops inside it). Attention splits its work to stay below it.
    pub loop_limit: Option<u64>,
    /// Kernels without workgroup memory or barriers for small matmuls and decode
    /// attention (a thread per output block). CPU drivers pay a coroutine switch per
    /// barrier, so this wins there; real GPUs want the cooperative kernels.
    pub per_thread_kernels: bool,
    /// Threads a CPU driver spreads workgroups over (this machine's cores).
    pub cpu_threads: usize,
    /// RMSNorm in the prologue of the matmuls that read it (a dispatch fewer
    /// per norm). Off on CPU drivers, where every thread of a per-thread kernel
    /// redoes the norm weight's loads for its 4 rows (decode measured 7 %
    /// slower on lavapipe): there the norm runs once into a scratch buffer that
    /// consecutive matmuls on the same rows share.
    pub fused_norm: bool,
}

impl Tuning {
    /// Defaults for an adapter: CPU drivers want few, large workgroups.
    pub fn for_adapter(info: &wgpu::AdapterInfo) -> Self {
        let cpu = info.device_type == wgpu::DeviceType::Cpu
            || info.name.to_ascii_lowercase().contains("llvmpipe");
        Self::with_kind(info, cpu)
    }

    /// The choices for a CPU driver (`cpu`) or a GPU, whatever the adapter is
    /// (the loop limit stays the adapter's: it is a correctness bound).
    pub fn with_kind(info: &wgpu::AdapterInfo, cpu: bool) -> Self {
        Tuning {
            gemv_rows: if cpu { 8 } else { 4 },
            tiled_wg: (8, 8),
            small_max_rows: 16,
            decode_workgroups: if cpu { 16 } else { 512 },
            decode_min_split: if cpu { 512 } else { 256 },
            loop_limit: if llvmpipe(info) { Some(65535) } else { None },
            per_thread_kernels: cpu,
            fused_norm: !cpu,
            cpu_threads: std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1),
        }
    }
}

/// The GPU executor.
pub struct GpuExecutor {
    /// Device and adapter.
    pub ctx: Arc<GpuContext>,
    pipelines: Arc<PipelineCache>,
    /// Work recorded since the last submit.
    pub rec: Recorder,
    page_tables: HashMap<u64, (wgpu::Buffer, usize, usize)>,
    scratch: HashMap<&'static str, wgpu::Buffer>,
    /// Tile and split choices.
    pub tuning: Tuning,
    max_binding: u64,
    /// What the "normed rows" scratch holds (x, norm, eps bits) and
    /// [`Recorder::recorded`] after the last matmul that read it.
    normed: Option<(NormKey, u64)>,
}

/// The rows a shared (unfused) norm was computed for.
type NormKey = (wgpu::Buffer, wgpu::Buffer, u32, usize, usize);

impl std::fmt::Debug for GpuExecutor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "GpuExecutor({:?})", self.ctx)
    }
}

impl GpuExecutor {
    /// An executor on the adapter chosen by [`GpuContext::new`]. `KVSIEVE_TUNING`
    /// (`cpu` or `gpu`) forces the kernel choices of a CPU driver or of a GPU
    /// instead of the adapter's kind (portability tests run the GPU kernels on a
    /// CPU driver this way).
    pub fn new() -> Result<Self> {
        Self::on(Arc::new(GpuContext::new()?))
    }

    /// An executor on `ctx`, with the kernel choices of [`GpuExecutor::new`]
    /// (`KVSIEVE_TUNING` included).
    pub fn on(ctx: Arc<GpuContext>) -> Result<Self> {
        let mut ex = Self::with_context(ctx);
        match std::env::var("KVSIEVE_TUNING").as_deref() {
            Err(_) | Ok("") => {}
            Ok("cpu") => ex.tuning = Tuning::with_kind(&ex.ctx.info, true),
            Ok("gpu") => ex.tuning = Tuning::with_kind(&ex.ctx.info, false),
            Ok(other) => {
                return Err(Error::InvalidOption(format!(
                    "KVSIEVE_TUNING={other:?}: expected cpu or gpu"
                )))
            }
        }
        Ok(ex)
    }

    /// An executor on an existing device (executors on one device may share it).
    pub fn with_context(ctx: Arc<GpuContext>) -> Self {
        let tuning = Tuning::for_adapter(&ctx.info);
        let ctx_max = ctx.max_binding();
        Self {
            rec: Recorder::new(ctx.clone()),
            ctx,
            pipelines: Arc::new(PipelineCache::default()),
            page_tables: HashMap::new(),
            scratch: HashMap::new(),
            normed: None,
            tuning,
            max_binding: ctx_max,
        }
    }

    /// Caps the bytes of one storage binding below the adapter's limit, so that
    /// weights and KV arenas split into more chunks (used by tests to exercise the
    /// multi-binding paths on any adapter). A cap above the adapter's limit is ignored.
    pub fn with_binding_limit(mut self, bytes: u64) -> Self {
        self.max_binding = bytes.clamp(256, self.ctx.max_binding());
        self
    }

    /// Grows one layer's arenas (`per_arena` pages of `page_bytes` each, the
    /// last possibly partial) from `old` to `new` pages: a partial last arena
    /// is replaced by a larger one holding a copy of it (recorded, so it
    /// follows the work recorded before), then arenas are appended.
    pub(crate) fn grow_arenas(
        &mut self,
        arenas: &mut Vec<wgpu::Buffer>,
        per_arena: usize,
        page_bytes: u64,
        old: usize,
        new: usize,
        label: &str,
    ) -> Result<()> {
        // Arenas a failed growth appended are not part of the cache.
        arenas.truncate(old.div_ceil(per_arena));
        let mut have = old;
        if !old.is_multiple_of(per_arena) {
            let a = old / per_arena;
            let pages = per_arena.min(new - a * per_arena);
            let buf = buffer::storage(&self.ctx.device, pages as u64 * page_bytes, label)?;
            let held = (old - a * per_arena) as u64 * page_bytes;
            self.rec.copy(&arenas[a], 0, &buf, 0, held);
            arenas[a] = buf;
            have = a * per_arena + pages;
        }
        while have < new {
            let pages = per_arena.min(new - have);
            arenas.push(buffer::storage(
                &self.ctx.device,
                pages as u64 * page_bytes,
                label,
            )?);
            have += pages;
        }
        Ok(())
    }

    /// The largest storage binding this executor uses.
    pub fn max_binding(&self) -> u64 {
        self.max_binding
    }

    pub(crate) fn pipeline(
        &self,
        shader: crate::shaders::Shader,
        entry: &'static str,
        constants: &[(&'static str, f64)],
    ) -> Arc<crate::gpu::Pipeline> {
        let _gl = self.ctx.gl_guard();
        self.pipelines
            .get(&self.ctx.device, shader, entry, constants)
    }

    /// 2-D grid for `n` workgroups.
    pub(crate) fn grid(&self, n: usize) -> Result<[u32; 3]> {
        let max = self.ctx.limits.max_compute_workgroups_per_dimension;
        if n as u64 > max as u64 * max as u64 {
            return Err(Error::Capacity(format!(
                "{n} workgroups exceed the adapter's grid"
            )));
        }
        Ok(crate::gpu::grid(n as u32, max))
    }

    /// A scratch buffer of at least `bytes`, reused across dispatches (work in one
    /// submit runs in order, so reuse between ops is safe).
    pub(crate) fn scratch(&mut self, name: &'static str, bytes: u64) -> Result<wgpu::Buffer> {
        let _gl = self.ctx.gl_guard();
        if bytes > self.ctx.max_binding() {
            return Err(Error::Capacity(format!(
                "{name} scratch of {bytes} bytes exceeds the storage binding limit of {}",
                self.ctx.max_binding()
            )));
        }
        if let Some(b) = self.scratch.get(name) {
            if b.size() >= bytes {
                return Ok(b.clone());
            }
        }
        let b = buffer::storage(&self.ctx.device, bytes.next_power_of_two(), name)?;
        self.scratch.insert(name, b.clone());
        Ok(b)
    }

    /// The device copy of a page table, with entries appended since last time written.
    /// Pages per KV arena buffer for `layout` (one storage binding each); the
    /// block bounds use the same split.
    fn kv_pages_per_arena(&self, layout: &KvLayout) -> Result<usize> {
        buffer::rows_per_chunk(layout.page_elems() as u64 * 2, self.max_binding, "KV page")
    }

    pub(crate) fn page_table(&mut self, table: &PageTable) -> Result<wgpu::Buffer> {
        let _gl = self.ctx.gl_guard();
        let n = table.pages.len();
        let entry = self.page_tables.get(&table.id());
        let (buf, cap, written) = match entry {
            Some((b, cap, w)) if *cap >= n => (b.clone(), *cap, *w),
            _ => {
                let cap = n.max(64).next_power_of_two();
                let b = buffer::storage(&self.ctx.device, cap as u64 * 4, "page table")?;
                (b, cap, 0)
            }
        };
        if n > written {
            self.ctx.queue.write_buffer(
                &buf,
                written as u64 * 4,
                bytemuck::cast_slice(&table.pages[written..n]),
            );
        }
        self.page_tables
            .insert(table.id(), (buf.clone(), cap, n.max(written)));
        Ok(buf)
    }

    /// Forgets the device copy of a released page table.
    pub fn drop_page_table(&mut self, table: &PageTable) {
        self.page_tables.remove(&table.id());
    }

    /// Submits recorded work and reads back `bytes` of `buf`.
    pub fn read_bytes(&mut self, buf: &wgpu::Buffer, bytes: u64) -> Result<Vec<u8>> {
        if bytes == 0 {
            self.rec.submit()?;
            return Ok(Vec::new());
        }
        let i = self.rec.read(buf, 0, bytes);
        let mut r = self.rec.submit()?;
        Ok(std::mem::take(&mut r.reads[i]))
    }
}

/// One layer of a GPU KV cache as the ops read it.
pub(crate) type GpuView<'a> = KvView<'a, GpuExecutor>;

pub use copy::copy_buffer;
pub use gate::GpuGate;
