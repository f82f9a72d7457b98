//! The ops interface for the GPU executor: its storage types' shapes and
//! limits, and each family's `run_*` hooks, forwarding to the kernel module
//! of the op's shader family or primitive. The ops front has checked the
//! arguments before any of these runs.

use super::quant;
use super::{
    argmax, attention, block_sparse, buffer, elementwise, embedding, gate, kv_append, matmul,
    rmsnorm, rope, sampling, speculative, tokenselect, GpuBounds, GpuExecutor, GpuGate, GpuIds,
    GpuKv, GpuRope, GpuTensor, GpuView, GpuWeight,
};
use crate::error::Result;
use crate::kv::{KvLayout, PageTable};
use crate::ops::{
    Executor, GqaMap, IdsTicket, KeyList, KvOps, Limits, Prefilter, RopeConfig, SelectPlan,
    SelectionOps, SpeculationOps, TensorOps,
};
use crate::quant::DType;
use crate::sampling::{AcceptParams, Draw};
use half::f16;
use std::ops::Range;

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

    fn fork(&self) -> Result<Self> {
        // Same device, pipelines and kernel choices; own recorder and scratch.
        Ok(Self {
            rec: crate::gpu::Recorder::new(self.ctx.clone()),
            ctx: self.ctx.clone(),
            pipelines: self.pipelines.clone(),
            page_tables: Default::default(),
            scratch: Default::default(),
            normed: None,
            tuning: self.tuning.clone(),
            max_binding: self.max_binding,
        })
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

    fn weight_bytes(w: &GpuWeight) -> u64 {
        w.chunks.iter().map(|c| c.buffer.size()).sum()
    }

    fn rope_dims(rope: &GpuRope) -> (usize, usize) {
        (rope.max_pos, rope.half * 2)
    }

    fn kv_layout(kv: &GpuKv) -> &KvLayout {
        &kv.layout
    }

    fn kv_bytes(kv: &GpuKv) -> u64 {
        kv.k.iter().chain(&kv.v).flatten().map(|b| b.size()).sum()
    }

    fn bounds_layout(b: &GpuBounds) -> (&KvLayout, usize) {
        (&b.layout, b.block)
    }

    fn flush(&mut self) -> Result<()> {
        self.rec.submit().map(|_| ())
    }

    fn runs_apart(&self) -> bool {
        self.ctx.info.device_type != wgpu::DeviceType::Cpu
    }

    fn submit_pending(&mut self) -> Result<()> {
        self.rec.submit_pending()
    }

    fn counters(&self) -> crate::ops::Counters {
        crate::ops::Counters {
            dispatches: self.rec.dispatch_count,
            bind_groups: self.rec.bind_group_count,
            buffers: crate::gpu::buffer::created(),
            submits: self.rec.submit_count,
            submit_host_ns: self.rec.submit_host_ns,
            wait_ns: self.rec.wait_ns,
        }
    }

    fn device_lost(&self) -> Option<crate::error::Error> {
        self.ctx.lost()
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
            buf: buffer::storage(&self.ctx.device, (rows * cols * 4) as u64, "tensor")?,
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

    fn run_set_ids(&mut self, ids: &mut GpuIds, data: &[u32]) -> Result<()> {
        self.rec.upload(&ids.buf, 0, bytemuck::cast_slice(data));
        Ok(())
    }

    fn run_download_ids(&mut self, ids: &GpuIds) -> Result<Vec<u32>> {
        let bytes = self.read_bytes(&ids.buf, (ids.len * 4) as u64)?;
        Ok(bytemuck::pod_collect_to_vec(&bytes))
    }

    fn run_read_ids_later(&mut self, ids: &GpuIds) -> Result<IdsTicket> {
        let size = (ids.len.max(1) * 4) as u64;
        Ok(IdsTicket::pending(self.rec.read_later(&ids.buf, 0, size)))
    }

    fn run_finish_read(&mut self, ticket: u64) -> Result<Vec<u32>> {
        let bytes = self.rec.take_later(ticket)?;
        Ok(bytemuck::pod_collect_to_vec(&bytes))
    }

    fn run_weight(
        &mut self,
        dtype: DType,
        bytes: &[u8],
        rows: usize,
        cols: usize,
    ) -> Result<GpuWeight> {
        let ctx = self.ctx.clone();
        let _gl = ctx.gl_guard();
        let device = &self.ctx.device;
        if rows > 1 && quant::kernel_type(dtype).is_some() {
            // Quantized matrix: each chunk's blocks repacked into its planes
            // (one padding half per chunk at most).
            let row_bytes = dtype.bytes_for(cols as u64).unwrap_or(0);
            let limit = self.max_binding.saturating_sub(4);
            let chunks = buffer::chunk_rows(rows, row_bytes, limit, "weight", |start, n| {
                let rb = row_bytes as usize;
                let words = quant::repack(dtype, &bytes[start * rb..(start + n) * rb]);
                buffer::storage_init(device, bytemuck::cast_slice(&words), "weight")
            })?;
            return Ok(GpuWeight {
                dtype,
                chunks,
                rows,
                cols,
            });
        }
        // f16 rows: as stored, or decoded and rounded to f16 (F32 and BF16, and
        // quantized vectors, which only norms and biases would be).
        let decoded: Vec<f16>;
        let data: &[u8] = if dtype == DType::F16 {
            bytes
        } else {
            let mut v = vec![0.0f32; rows * cols];
            crate::quant::dequantize(dtype, bytes, &mut v)?;
            decoded = v.into_iter().map(f16::from_f32).collect();
            bytemuck::cast_slice(&decoded)
        };
        let row_bytes = cols * 2;
        let chunks = buffer::chunk_rows(
            rows,
            row_bytes as u64,
            self.max_binding,
            "weight",
            |start, n| {
                buffer::storage_init(
                    device,
                    &data[start * row_bytes..(start + n) * row_bytes],
                    "weight",
                )
            },
        )?;
        Ok(GpuWeight {
            dtype: DType::F16,
            chunks,
            rows,
            cols,
        })
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

    fn run_matmul(
        &mut self,
        x: &GpuTensor,
        w: &GpuWeight,
        y: &mut GpuTensor,
        epi: crate::ops::Epilogue,
    ) -> Result<()> {
        matmul::matmul(self, x, w, matmul::Out::One(y, epi), None)
    }

    fn run_norm_matmul(
        &mut self,
        x: &GpuTensor,
        norm: &GpuWeight,
        eps: f32,
        w: &GpuWeight,
        y: &mut GpuTensor,
        epi: crate::ops::Epilogue,
    ) -> Result<()> {
        self.matmul_normed(x, Some((norm, eps)), w, matmul::Out::One(y, epi))
    }

    fn run_matmul_parts(
        &mut self,
        x: &GpuTensor,
        norm: Option<(&GpuWeight, f32)>,
        w: &GpuWeight,
        ys: [&mut GpuTensor; 3],
    ) -> Result<()> {
        let [a, b, c] = ys;
        self.matmul_normed(x, norm, w, matmul::Out::Parts([a, b, c]))
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

    fn run_sample(&mut self, logits: &GpuTensor, out: &mut GpuIds, draw: &Draw) -> Result<()> {
        sampling::sample(self, logits, out, draw)
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
                )?);
                vl.push(buffer::storage(
                    &self.ctx.device,
                    pages as u64 * page_bytes,
                    "v arena",
                )?);
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

    fn run_kv_grow(&mut self, kv: &mut GpuKv, num_pages: usize) -> Result<()> {
        let ctx = self.ctx.clone();
        let _gl = ctx.gl_guard();
        let page_bytes = kv.layout.page_elems() as u64 * 2;
        let (old, per) = (kv.layout.num_pages, kv.pages_per_arena);
        for list in kv.k.iter_mut().chain(kv.v.iter_mut()) {
            self.grow_arenas(list, per, page_bytes, old, num_pages, "kv arena")?;
        }
        kv.layout.num_pages = num_pages;
        Ok(())
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
        kv_append::kv_append(self, kv, layer, table, start, k, v, None)
    }

    fn run_kv_append_rope(
        &mut self,
        kv: &mut GpuKv,
        layer: usize,
        table: &PageTable,
        start: usize,
        k: &GpuTensor,
        v: &GpuTensor,
        q: &mut GpuTensor,
        q_heads: usize,
        positions: &GpuIds,
        rope: &GpuRope,
    ) -> Result<()> {
        let queries = (q, q_heads, positions, rope);
        kv_append::kv_append(self, kv, layer, table, start, k, v, Some(queries))
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

    fn run_bounds_grow(&mut self, b: &mut GpuBounds, num_pages: usize) -> Result<()> {
        let ctx = self.ctx.clone();
        let _gl = ctx.gl_guard();
        let page_bytes = block_sparse::bounds_page_bytes(&b.layout, b.block);
        let (old, per) = (b.layout.num_pages, b.pages_per_arena);
        for list in b.bufs.iter_mut() {
            self.grow_arenas(list, per, page_bytes, old, num_pages, "block bounds")?;
        }
        b.layout.num_pages = num_pages;
        Ok(())
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

impl GpuExecutor {
    /// A matmul after an optional RMSNorm of x: folded into the kernel, or one
    /// shared norm dispatch first ([`super::Tuning::fused_norm`]).
    fn matmul_normed(
        &mut self,
        x: &GpuTensor,
        norm: Option<(&GpuWeight, f32)>,
        w: &GpuWeight,
        out: matmul::Out<'_>,
    ) -> Result<()> {
        let Some((g, eps)) = norm else {
            return matmul::matmul(self, x, w, out, None);
        };
        if self.tuning.fused_norm {
            return matmul::matmul(self, x, w, out, norm);
        }
        let h = rmsnorm::shared(self, x, g, eps)?;
        matmul::matmul(self, &h, w, out, None)?;
        self.normed = self.normed.take().map(|(k, _)| (k, self.rec.recorded));
        Ok(())
    }
}
