//! The reference's KV ops: the paged cache as f16-rounded f32, attention in f32.

use super::{attention, round_f16, tokenselect, RefExecutor, RefKv, RefRope, RefTensor, RefView};
use crate::error::Result;
use crate::kv::{KvLayout, PageTable};
use crate::ops::{KeyList, KvOps, TensorOps};
use std::ops::Range;

impl KvOps for RefExecutor {
    fn run_kv_cache(&mut self, layout: &KvLayout) -> Result<RefKv> {
        let n = layout.num_pages * layout.page_elems();
        Ok(RefKv {
            layout: *layout,
            k: vec![vec![0.0; n]; layout.layers],
            v: vec![vec![0.0; n]; layout.layers],
        })
    }

    fn run_kv_grow(&mut self, kv: &mut RefKv, num_pages: usize) -> Result<()> {
        let n = num_pages * kv.layout.page_elems();
        for l in kv.k.iter_mut().chain(kv.v.iter_mut()) {
            l.resize(n, 0.0);
        }
        kv.layout.num_pages = num_pages;
        Ok(())
    }

    fn run_kv_append(
        &mut self,
        kv: &mut RefKv,
        layer: usize,
        table: &PageTable,
        start: usize,
        k: &RefTensor,
        v: &RefTensor,
    ) -> Result<()> {
        let (hk, d) = (kv.layout.kv_heads, kv.layout.head_dim);
        for t in 0..k.rows {
            for h in 0..hk {
                let off = kv.offset(table, start + t, h);
                let src = (t * hk + h) * d;
                for i in 0..d {
                    kv.k[layer][off + i] = round_f16(k.data[src + i]);
                    kv.v[layer][off + i] = round_f16(v.data[src + i]);
                }
            }
        }
        Ok(())
    }

    // The twin of the fused pass: the two unfused ops.
    fn run_kv_append_rope(
        &mut self,
        kv: &mut RefKv,
        layer: usize,
        table: &PageTable,
        start: usize,
        k: &RefTensor,
        v: &RefTensor,
        q: &mut RefTensor,
        q_heads: usize,
        positions: &Vec<u32>,
        rope: &RefRope,
    ) -> Result<()> {
        self.run_kv_append(kv, layer, table, start, k, v)?;
        self.run_rope(q, q_heads, positions, rope)
    }

    fn run_kv_move(
        &mut self,
        kv: &mut RefKv,
        table: &PageTable,
        moves: &[(usize, usize)],
    ) -> Result<()> {
        let (hk, d) = (kv.layout.kv_heads, kv.layout.head_dim);
        for &(src, dst) in moves {
            for h in 0..hk {
                let (a, b) = (kv.offset(table, src, h), kv.offset(table, dst, h));
                for layer in 0..kv.layout.layers {
                    kv.k[layer].copy_within(a..a + d, b);
                    kv.v[layer].copy_within(a..a + d, b);
                }
            }
        }
        Ok(())
    }

    fn run_attention_prefill(
        &mut self,
        q: &RefTensor,
        cache: &RefView<'_>,
        q_start: usize,
        kv_len: usize,
        out: &mut RefTensor,
    ) -> Result<()> {
        attention::dense(q, cache, q_start, kv_len, out);
        Ok(())
    }

    fn run_attention_decode(
        &mut self,
        q: &RefTensor,
        cache: &RefView<'_>,
        kv_len: usize,
        out: &mut RefTensor,
    ) -> Result<()> {
        let q_start = kv_len - 1;
        attention::dense(q, cache, q_start, kv_len, out);
        Ok(())
    }

    fn run_attention_decode_list(
        &mut self,
        q: &RefTensor,
        cache: &RefView<'_>,
        seq_len: usize,
        list: &KeyList<'_, Vec<u32>>,
        out: &mut RefTensor,
    ) -> Result<()> {
        let q_start = seq_len - 1;
        tokenselect::attention_list(q, cache, 0..1, q_start, list, out);
        Ok(())
    }

    fn run_attention_prefill_list(
        &mut self,
        q: &RefTensor,
        cache: &RefView<'_>,
        rows: Range<usize>,
        q_start: usize,
        list: &KeyList<'_, Vec<u32>>,
        out: &mut RefTensor,
    ) -> Result<()> {
        tokenselect::attention_list(q, cache, rows, q_start, list, out);
        Ok(())
    }

    fn run_attention_tree(
        &mut self,
        q: &RefTensor,
        cache: &RefView<'_>,
        prefix_len: usize,
        tree: &Vec<u32>,
        list: Option<&KeyList<'_, Vec<u32>>>,
        out: &mut RefTensor,
    ) -> Result<()> {
        let (kv, layer, table, rope) = (cache.kv, cache.layer, cache.table, cache.rope);
        attention::tree(q, kv, layer, table, prefix_len, tree, list, rope, out);
        Ok(())
    }
}
