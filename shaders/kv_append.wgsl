// Appends new keys and values (f32, keys before RoPE) to the paged KV cache as f16.
// Page layout: [page][kv_head][slot][D/2 packed words]. The cache may span several
// arena buffers (one storage binding each); the host dispatches once per arena and
// each pass writes only the pages that live in its arena.
//
// kv_append_rope also rotates the step's queries (rope.wgsl's rotation) in the
// same pass, for layers whose policy attends with queries at their true
// positions: a dispatch fewer per layer. The host runs it for the first arena's
// pass only, so each query is rotated once.
struct Params {
    tokens: u32, start: u32, kv_heads: u32, words: u32,
    page_size: u32, arena_first_page: u32, arena_pages: u32, q_heads: u32,
    max_pos: u32, _p0: u32, _p1: u32, _p2: u32,
}
@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> k_new: array<vec2<f32>>;   // [tokens, kv_heads, D/2]
@group(0) @binding(2) var<storage, read> v_new: array<vec2<f32>>;
@group(0) @binding(3) var<storage, read> pages: array<u32>;         // page table of the sequence
@group(0) @binding(4) var<storage, read_write> k_arena: array<u32>;
@group(0) @binding(5) var<storage, read_write> v_arena: array<u32>;
@group(0) @binding(6) var<storage, read_write> q: array<f32>;       // [tokens, q_heads * D] (kv_append_rope)
@group(0) @binding(7) var<storage, read> pos: array<u32>;           // [tokens]
@group(0) @binding(8) var<storage, read> cs: array<vec2<f32>>;      // rope table

// Stores word idx of the new rows ([tokens, kv_heads, words]) if its page is
// in this pass's arena.
fn append(idx: u32) {
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

@compute @workgroup_size(64)
fn kv_append(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let idx = gid.y * nwg.x * 64u + gid.x;
    if (idx >= p.tokens * p.kv_heads * p.words) { return; }
    append(idx);
}

// A thread per (token, query head h, channel pair i): rotates the pair and, for
// h < kv_heads, appends word i of KV head h.
@compute @workgroup_size(64)
fn kv_append_rope(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let idx = gid.y * nwg.x * 64u + gid.x;
    let half = p.words;
    if (idx >= p.tokens * p.q_heads * half) { return; }
    let i = idx % half;
    let h = (idx / half) % p.q_heads;
    let t = idx / (half * p.q_heads);
    if (h < p.kv_heads) { append((t * p.kv_heads + h) * half + i); }
    let position = rope_row(pos[t], p.max_pos);
    var c = cs[rope_lo(position, half, p.max_pos) + i];
    let rh = rope_hi(position, half, p.max_pos);
    if (rh != ROPE_NONE) { c = rope_compose(c, cs[rh + i]); }
    let base = (t * p.q_heads + h) * 2u * half;
    let r = rotate_pair(vec2<f32>(q[base + i], q[base + i + half]), c);
    q[base + i] = r.x;
    q[base + i + half] = r.y;
}
