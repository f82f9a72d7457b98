// Appends new keys and values (f32, keys before RoPE) to the paged KV cache as f16.
// Page layout: [page][kv_head][slot][D/2 packed words]. The cache may span several
// arena buffers (one storage binding each); the host dispatches once per arena and
// each pass writes only the pages that live in its arena.
struct Params {
    tokens: u32, start: u32, kv_heads: u32, words: u32,
    page_size: u32, arena_first_page: u32, arena_pages: u32, _p0: u32,
}
@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> k_new: array<vec2<f32>>;   // [tokens, kv_heads, D/2]
@group(0) @binding(2) var<storage, read> v_new: array<vec2<f32>>;
@group(0) @binding(3) var<storage, read> pages: array<u32>;         // page table of the sequence
@group(0) @binding(4) var<storage, read_write> k_arena: array<u32>;
@group(0) @binding(5) var<storage, read_write> v_arena: array<u32>;

@compute @workgroup_size(64)
fn kv_append(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let idx = gid.y * nwg.x * 64u + gid.x;
    if (idx >= p.tokens * p.kv_heads * p.words) { return; }
    let w = idx % p.words;
    let h = (idx / p.words) % p.kv_heads;
    let t = idx / (p.words * p.kv_heads);
    let logical = p.start + t;
    let page = pages[logical / p.page_size];
    if (!in_arena(page, p.arena_first_page, p.arena_pages)) { return; }
    let local_page = page - p.arena_first_page;
    let slot = logical % p.page_size;
    let dst = kv_row(local_page, p.kv_heads, h, p.page_size, slot) * p.words + w;
    k_arena[dst] = pack2x16float(k_new[idx]);
    v_arena[dst] = pack2x16float(v_new[idx]);
}
