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
pub mod params;
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
use crate::ops::{
    Executor, GqaMap, KeyList, KvOps, KvView, Limits, Prefilter, RopeConfig, SelectPlan,
    SelectionOps, SpeculationOps, TensorOps,
};
use crate::sampling::AcceptParams;
use half::f16;
use std::collections::HashMap;
use std::ops::Range;
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

/// f16 matrix split by rows into chunks that each fit one storage binding.
#[derive(Clone, Debug)]
pub struct GpuWeight {
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
    /// `[max_pos, half]` of `vec2<f32>`.
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
}

impl Tuning {
    /// Defaults for an adapter: CPU drivers want few, large workgroups.
    pub fn for_adapter(info: &wgpu::AdapterInfo) -> Self {
        let cpu = info.device_type == wgpu::DeviceType::Cpu
            || info.name.to_ascii_lowercase().contains("llvmpipe");
        Tuning {
            gemv_rows: if cpu { 8 } else { 4 },
            tiled_wg: (8, 8),
            small_max_rows: 16,
            decode_workgroups: if cpu { 16 } else { 512 },
            decode_min_split: if cpu { 512 } else { 256 },
            loop_limit: if llvmpipe(info) { Some(65535) } else { None },
            per_thread_kernels: cpu,
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
}

impl std::fmt::Debug for GpuExecutor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "GpuExecutor({:?})", self.ctx)
    }
}

impl GpuExecutor {
    /// An executor on the adapter chosen by [`GpuContext::new`].
    pub fn new() -> Result<Self> {
        Ok(Self::with_context(Arc::new(GpuContext::new()?)))
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
        let b = buffer::storage(&self.ctx.device, bytes.next_power_of_two(), name);
        self.scratch.insert(name, b.clone());
        Ok(b)
    }

    /// The device copy of a page table, with entries appended since last time written.
    /// Pages per KV arena buffer for `layout` (one storage binding each); the
    /// block bounds use the same split.
    fn kv_pages_per_arena(&self, layout: &KvLayout) -> Result<usize> {
        buffer::rows_per_chunk(layout.page_elems() as u64 * 2, self.max_binding, "KV page")
    }

    pub(crate) fn page_table(&mut self, table: &PageTable) -> wgpu::Buffer {
        let _gl = self.ctx.gl_guard();
        let n = table.pages.len();
        let entry = self.page_tables.get(&table.id());
        let (buf, cap, written) = match entry {
            Some((b, cap, w)) if *cap >= n => (b.clone(), *cap, *w),
            _ => {
                let cap = n.max(64).next_power_of_two();
                let b = buffer::storage(&self.ctx.device, cap as u64 * 4, "page table");
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
        buf
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

impl Executor for GpuExecutor {
    type Tensor = GpuTensor;
    type Ids = GpuIds;
    type Weight = GpuWeight;
    type Rope = GpuRope;
    type Kv = GpuKv;
    type Gate = gate::GpuGate;
    type Bounds = block_sparse::GpuBounds;

    fn name(&self) -> String {
        format!("gpu ({}, {:?})", self.ctx.info.name, self.ctx.info.backend)
    }

    fn limits(&self) -> Limits {
        Limits {
            max_buffer_bytes: self.ctx.max_binding(),
        }
    }

    fn dims(t: &GpuTensor) -> (usize, usize) {
        (t.rows, t.cols)
    }

    fn ids_len(ids: &GpuIds) -> usize {
        ids.len
    }

    fn weight_dims(w: &GpuWeight) -> (usize, usize) {
        (w.rows, w.cols)
    }

    fn rope_dims(rope: &GpuRope) -> (usize, usize) {
        (rope.max_pos, rope.half * 2)
    }

    fn kv_layout(kv: &GpuKv) -> &KvLayout {
        &kv.layout
    }

    fn bounds_layout(b: &GpuBounds) -> (&KvLayout, usize) {
        (&b.layout, b.block)
    }

    fn flush(&mut self) -> Result<()> {
        self.rec.submit().map(|_| ())
    }

    fn set_profiling(&mut self, on: bool) {
        self.rec.set_profiling(on);
    }

    fn take_profile(&mut self) -> Vec<(String, u64, f64)> {
        std::mem::take(&mut self.rec.profile)
            .into_iter()
            .map(|(k, (n, ns))| (k, n, ns))
            .collect()
    }
}

impl TensorOps for GpuExecutor {
    fn run_tensor(&mut self, rows: usize, cols: usize) -> Result<GpuTensor> {
        let ctx = self.ctx.clone();
        let _gl = ctx.gl_guard();
        Ok(GpuTensor {
            buf: buffer::storage(&self.ctx.device, (rows * cols * 4) as u64, "tensor"),
            rows,
            cols,
        })
    }

    fn run_upload(&mut self, data: &[f32], rows: usize, cols: usize) -> Result<GpuTensor> {
        let ctx = self.ctx.clone();
        let _gl = ctx.gl_guard();
        let buf = buffer::storage_init(&self.ctx.device, bytemuck::cast_slice(data), "tensor")?;
        Ok(GpuTensor { buf, rows, cols })
    }

    fn run_download(&mut self, t: &GpuTensor) -> Result<Vec<f32>> {
        let bytes = self.read_bytes(&t.buf, (t.rows * t.cols * 4) as u64)?;
        Ok(bytemuck::pod_collect_to_vec(&bytes))
    }

    fn run_ids(&mut self, data: &[u32]) -> Result<GpuIds> {
        let ctx = self.ctx.clone();
        let _gl = ctx.gl_guard();
        let buf = buffer::storage_init(&self.ctx.device, bytemuck::cast_slice(data), "ids")?;
        Ok(GpuIds {
            buf,
            len: data.len(),
        })
    }

    fn run_download_ids(&mut self, ids: &GpuIds) -> Result<Vec<u32>> {
        let bytes = self.read_bytes(&ids.buf, (ids.len * 4) as u64)?;
        Ok(bytemuck::pod_collect_to_vec(&bytes))
    }

    fn run_weight(&mut self, data: &[f16], rows: usize, cols: usize) -> Result<GpuWeight> {
        let ctx = self.ctx.clone();
        let _gl = ctx.gl_guard();
        let device = &self.ctx.device;
        let row_bytes = cols as u64 * 2;
        let chunks =
            buffer::chunk_rows(rows, row_bytes, self.max_binding, "weight", |start, n| {
                buffer::storage_init(
                    device,
                    bytemuck::cast_slice(&data[start * cols..(start + n) * cols]),
                    "weight",
                )
            })?;
        Ok(GpuWeight { chunks, rows, cols })
    }

    fn run_rope_table(&mut self, cfg: &RopeConfig) -> Result<GpuRope> {
        let ctx = self.ctx.clone();
        let _gl = ctx.gl_guard();
        let t = cfg.table()?;
        let buf = buffer::storage_init(&self.ctx.device, bytemuck::cast_slice(&t), "rope table")?;
        Ok(GpuRope {
            buf,
            half: cfg.head_dim / 2,
            max_pos: cfg.max_positions,
        })
    }

    fn run_matmul(&mut self, x: &GpuTensor, w: &GpuWeight, y: &mut GpuTensor) -> Result<()> {
        matmul::matmul(self, x, w, y)
    }

    fn run_rms_norm(
        &mut self,
        x: &GpuTensor,
        w: &GpuWeight,
        eps: f32,
        y: &mut GpuTensor,
    ) -> Result<()> {
        rmsnorm::rms_norm(self, x, w, eps, y)
    }

    fn run_rope(
        &mut self,
        x: &mut GpuTensor,
        heads: usize,
        positions: &GpuIds,
        rope: &GpuRope,
    ) -> Result<()> {
        rope::rope(self, x, heads, positions, rope)
    }

    fn run_swiglu(&mut self, gate: &mut GpuTensor, up: &GpuTensor) -> Result<()> {
        elementwise::binary(self, "swiglu", gate, up)
    }

    fn run_add(&mut self, acc: &mut GpuTensor, x: &GpuTensor) -> Result<()> {
        elementwise::binary(self, "add", acc, x)
    }

    fn run_embed(&mut self, ids: &GpuIds, table: &GpuWeight, out: &mut GpuTensor) -> Result<()> {
        embedding::embed(self, ids, table, out)
    }

    fn run_add_bias(&mut self, x: &mut GpuTensor, bias: &GpuWeight) -> Result<()> {
        elementwise::add_bias(self, x, bias)
    }

    fn run_copy_rows(
        &mut self,
        src: &GpuTensor,
        src_row: usize,
        dst: &mut GpuTensor,
        dst_row: usize,
        rows: usize,
    ) -> Result<()> {
        let c = (src.cols * 4) as u64;
        if rows > 0 && c > 0 {
            self.rec.copy(
                &src.buf,
                src_row as u64 * c,
                &dst.buf,
                dst_row as u64 * c,
                rows as u64 * c,
            );
        }
        Ok(())
    }

    fn run_mean_rows(
        &mut self,
        x: &GpuTensor,
        rows: Range<usize>,
        out: &mut GpuTensor,
    ) -> Result<()> {
        elementwise::mean_rows(self, x, rows, out)
    }

    fn run_argmax(&mut self, x: &GpuTensor, out: &mut GpuIds) -> Result<()> {
        argmax::argmax(self, x, out)
    }

    fn run_penalize(&mut self, logits: &mut GpuTensor, ids: &[u32], penalty: f32) -> Result<()> {
        sampling::penalize(self, logits, ids, penalty)
    }

    fn run_top_k(&mut self, logits: &GpuTensor, k: usize) -> Result<Vec<(u32, f32)>> {
        sampling::top_k(self, logits, k)
    }
}

impl KvOps for GpuExecutor {
    fn run_kv_cache(&mut self, layout: &KvLayout) -> Result<GpuKv> {
        let ctx = self.ctx.clone();
        let _gl = ctx.gl_guard();
        let page_bytes = layout.page_elems() as u64 * 2;
        let per_arena = self.kv_pages_per_arena(layout)?;
        let arenas = layout.num_pages.div_ceil(per_arena);
        let mut k = Vec::with_capacity(layout.layers);
        let mut v = Vec::with_capacity(layout.layers);
        for _ in 0..layout.layers {
            let mut kl = Vec::with_capacity(arenas);
            let mut vl = Vec::with_capacity(arenas);
            for a in 0..arenas {
                let pages = per_arena.min(layout.num_pages - a * per_arena);
                kl.push(buffer::storage(
                    &self.ctx.device,
                    pages as u64 * page_bytes,
                    "k arena",
                ));
                vl.push(buffer::storage(
                    &self.ctx.device,
                    pages as u64 * page_bytes,
                    "v arena",
                ));
            }
            k.push(kl);
            v.push(vl);
        }
        Ok(GpuKv {
            layout: *layout,
            pages_per_arena: per_arena,
            k,
            v,
        })
    }

    fn run_kv_append(
        &mut self,
        kv: &mut GpuKv,
        layer: usize,
        table: &PageTable,
        start: usize,
        k: &GpuTensor,
        v: &GpuTensor,
    ) -> Result<()> {
        kv_append::kv_append(self, kv, layer, table, start, k, v)
    }

    fn run_kv_move(
        &mut self,
        kv: &mut GpuKv,
        table: &PageTable,
        moves: &[(usize, usize)],
    ) -> Result<()> {
        kv_append::kv_move(self, kv, table, moves)
    }

    fn run_attention_prefill(
        &mut self,
        q: &GpuTensor,
        cache: &GpuView<'_>,
        q_start: usize,
        kv_len: usize,
        out: &mut GpuTensor,
    ) -> Result<()> {
        attention::prefill(self, q, cache, q_start, kv_len, out)
    }

    fn run_attention_decode(
        &mut self,
        q: &GpuTensor,
        cache: &GpuView<'_>,
        kv_len: usize,
        out: &mut GpuTensor,
    ) -> Result<()> {
        attention::decode(self, q, cache, kv_len, out)
    }

    fn run_attention_decode_list(
        &mut self,
        q: &GpuTensor,
        cache: &GpuView<'_>,
        seq_len: usize,
        list: &KeyList<'_, GpuIds>,
        out: &mut GpuTensor,
    ) -> Result<()> {
        attention::decode_list(self, q, cache, seq_len, list, out)
    }

    fn run_attention_prefill_list(
        &mut self,
        q: &GpuTensor,
        cache: &GpuView<'_>,
        rows: Range<usize>,
        q_start: usize,
        list: &KeyList<'_, GpuIds>,
        out: &mut GpuTensor,
    ) -> Result<()> {
        attention::prefill_list(self, q, cache, rows, q_start, list, out)
    }

    fn run_attention_tree(
        &mut self,
        q: &GpuTensor,
        cache: &GpuView<'_>,
        prefix_len: usize,
        tree: &GpuIds,
        list: Option<&KeyList<'_, GpuIds>>,
        out: &mut GpuTensor,
    ) -> Result<()> {
        attention::tree(self, q, cache, prefix_len, tree, list, out)
    }
}

impl SelectionOps for GpuExecutor {
    fn run_ts_gate(&mut self) -> Result<GpuGate> {
        gate::new_gate(self)
    }

    fn run_ts_cache_check(
        &mut self,
        fp: &GpuTensor,
        cached: &mut GpuTensor,
        threshold: f32,
        plan: &SelectPlan,
        cache: &GpuView<'_>,
        gate: &mut GpuGate,
    ) -> Result<()> {
        gate::cache_check(self, fp, cached, threshold, plan, cache, gate)
    }

    fn run_ts_gate_counts(&mut self, gate: &GpuGate) -> Result<(u64, u64)> {
        gate::gate_counts(self, gate)
    }

    fn run_ts_score(
        &mut self,
        q: &GpuTensor,
        cache: &GpuView<'_>,
        begin: usize,
        n: usize,
        gqa: GqaMap,
        scores: &mut GpuTensor,
        gate: Option<&GpuGate>,
        prefilter: Option<&Prefilter<'_, GpuIds>>,
    ) -> Result<()> {
        let c = tokenselect::Candidates { begin, n, gqa };
        tokenselect::score(self, q, cache, c, scores, gate, prefilter)
    }

    fn run_ts_vote(
        &mut self,
        scores: &GpuTensor,
        q_heads: usize,
        n: usize,
        votes: &mut GpuTensor,
        gate: Option<&GpuGate>,
    ) -> Result<()> {
        tokenselect::vote(self, scores, q_heads, n, votes, gate)
    }

    fn run_ts_top_k(
        &mut self,
        votes: &GpuTensor,
        n: usize,
        k: usize,
        begin: usize,
        out: &mut GpuIds,
        gate: Option<&GpuGate>,
        prefilter: Option<&Prefilter<'_, GpuIds>>,
    ) -> Result<()> {
        let pick = tokenselect::Pick { n, k, begin };
        tokenselect::top_k(self, votes, pick, out, gate, prefilter)
    }

    fn run_block_bounds(
        &mut self,
        layout: &KvLayout,
        block: usize,
        rotated: bool,
    ) -> Result<GpuBounds> {
        let ctx = self.ctx.clone();
        let _gl = ctx.gl_guard();
        block_sparse::alloc(self, layout, block, rotated)
    }

    fn run_kv_bounds(
        &mut self,
        cache: &GpuView<'_>,
        bounds: &mut GpuBounds,
        tokens: Range<usize>,
    ) -> Result<()> {
        block_sparse::bounds(self, cache, bounds, tokens)
    }

    fn run_block_scores(
        &mut self,
        q: &GpuTensor,
        bounds: &GpuBounds,
        layer: usize,
        table: &PageTable,
        blocks: Range<usize>,
        spread: f32,
        out: &mut GpuTensor,
        gate: Option<&GpuGate>,
    ) -> Result<()> {
        let rows = block_sparse::ScoreRows::PerHead { spread };
        let at = block_sparse::BoundsAt {
            bounds,
            layer,
            table,
        };
        block_sparse::scores(self, q, at, blocks, rows, out, gate)
    }

    fn run_block_group_scores(
        &mut self,
        q: &GpuTensor,
        bounds: &GpuBounds,
        layer: usize,
        table: &PageTable,
        blocks: Range<usize>,
        out: &mut GpuTensor,
    ) -> Result<()> {
        let rows = block_sparse::ScoreRows::PerKvHead;
        let at = block_sparse::BoundsAt {
            bounds,
            layer,
            table,
        };
        block_sparse::scores(self, q, at, blocks, rows, out, None)
    }

    fn run_token_scores(
        &mut self,
        q: &GpuTensor,
        cache: &GpuView<'_>,
        n: usize,
        out: &mut GpuTensor,
    ) -> Result<()> {
        block_sparse::token_scores(self, q, cache, n, out)
    }

    fn run_block_top_k(
        &mut self,
        scores: &GpuTensor,
        kv_heads: usize,
        n: usize,
        k: usize,
        out: &mut GpuIds,
    ) -> Result<()> {
        block_sparse::top_k(self, scores, kv_heads, n, k, out)
    }
}

impl SpeculationOps for GpuExecutor {
    fn run_spec_draft(
        &mut self,
        adj: &GpuIds,
        plan: &GpuIds,
        n: usize,
        out: &mut GpuIds,
    ) -> Result<()> {
        speculative::draft(self, adj, plan, n, out)
    }

    fn run_spec_adj_update(
        &mut self,
        adj: &mut GpuIds,
        logits: &GpuTensor,
        tokens: &GpuIds,
    ) -> Result<()> {
        speculative::adj_update(self, adj, logits, tokens)
    }

    fn run_spec_accept(
        &mut self,
        logits: &GpuTensor,
        tokens: &GpuIds,
        links: &GpuIds,
        params: &AcceptParams,
        depth: usize,
        trials: usize,
        out: &mut GpuIds,
    ) -> Result<()> {
        let walk = speculative::Walk { depth, trials };
        speculative::accept(self, logits, tokens, links, params, walk, out)
    }
}

/// One layer of a GPU KV cache as the ops read it.
pub(crate) type GpuView<'a> = KvView<'a, GpuExecutor>;

pub use copy::copy_buffer;
pub use gate::GpuGate;
