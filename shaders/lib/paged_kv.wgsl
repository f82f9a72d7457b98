// lib/paged_kv.wgsl: the paged KV layout. Pages live in arena buffers of
// `arena_pages` pages each (one storage binding); a kernel bound to one arena
// skips the pages of the others. Per arena: [page][kv_head][slot][head_dim].

// Whether physical page `page` lies in the arena holding pages first..first + count.
fn in_arena(page: u32, first: u32, count: u32) -> bool {
    return page >= first && page < first + count;
}

// Row index (in key or value rows of head_dim) of `slot` of KV head `kvh` in
// arena-local page `local_page`.
fn kv_row(local_page: u32, kv_heads: u32, kvh: u32, page_size: u32, slot: u32) -> u32 {
    return (local_page * kv_heads + kvh) * page_size + slot;
}
