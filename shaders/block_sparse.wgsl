// Quest-style block bounds and block scores (ALGORITHMS.md section 2).
//
// bounds: for every block of `block` tokens that overlaps the updated range, per
// KV head and channel, the max and min of the keys rotated at their true
// positions (so a query rotated at its own position bounds its real logits), or
// with rotate = 0 of the unrotated keys (TokenSelect's rotation-free scores).
// A block is recomputed from the cache as a whole, which keeps the bounds exact
// after appends, partial blocks and speculative KV moves. One thread per
// (block, KV head, channel pair i / i + D/2): the rotation mixes the pair. The
// host dispatches once per arena; a pass writes only blocks of its pages.
// Layout per arena: [page][kv_head][block in page][max D, min D] f32.
//
// scores: score[h][b] = sum_i max(q_i M_i, q_i m_i) for query head h against
// its KV head's bounds of logical block b: an upper bound of q . k over the
// block. One thread per (query head, block).
struct Params {
    first_block: u32, n_blocks: u32, seq_len: u32, kv_heads: u32,
    head_dim: u32, page_size: u32, block: u32, arena_first_page: u32,
    arena_pages: u32, max_pos: u32, q_heads: u32, out_cols: u32,
    rotate: u32, _p0: u32, _p1: u32, _p2: u32,
}
@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> pages: array<u32>;

@group(0) @binding(2) var<storage, read> k_arena: array<u32>;       // packed f16 pairs
@group(0) @binding(3) var<storage, read> cs: array<vec2<f32>>;      // [max_pos, D/2] (cos, sin)
@group(0) @binding(4) var<storage, read_write> bounds_w: array<f32>;

fn half_at(base: u32, i: u32) -> f32 {
    let w = unpack2x16float(k_arena[base + i / 2u]);
    return select(w.x, w.y, (i & 1u) == 1u);
}

// Offset of the bounds of (page in arena, kv head, block in page).
fn bounds_base(local_page: u32, h: u32, b_in_page: u32) -> u32 {
    let per_page = p.page_size / p.block;
    return ((local_page * p.kv_heads + h) * per_page + b_in_page) * 2u * p.head_dim;
}

@compute @workgroup_size(64)
fn bounds(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let half = p.head_dim / 2u;
    let idx = gid.y * nwg.x * 64u + gid.x;
    if (idx >= p.n_blocks * p.kv_heads * half) { return; }
    let i = idx % half;
    let h = (idx / half) % p.kv_heads;
    let b = p.first_block + idx / (half * p.kv_heads);
    let t0 = b * p.block;
    let t1 = min(t0 + p.block, p.seq_len);
    let page = pages[t0 / p.page_size];
    if (page < p.arena_first_page || page >= p.arena_first_page + p.arena_pages) { return; }
    let local_page = page - p.arena_first_page;
    var mx = vec2<f32>(-3.0e38);
    var mn = vec2<f32>(3.0e38);
    for (var t = t0; t < t1; t++) {
        let base = ((local_page * p.kv_heads + h) * p.page_size + t % p.page_size) * half;
        let lo = half_at(base, i);
        let hi = half_at(base, i + half);
        var r = vec2<f32>(lo, hi);
        if (p.rotate == 1u) {
            let c = cs[min(t, p.max_pos - 1u) * half + i];
            r = vec2<f32>(lo * c.x - hi * c.y, hi * c.x + lo * c.y);
        }
        mx = max(mx, r);
        mn = min(mn, r);
    }
    let o = bounds_base(local_page, h, (t0 % p.page_size) / p.block);
    bounds_w[o + i] = mx.x;
    bounds_w[o + i + half] = mx.y;
    bounds_w[o + p.head_dim + i] = mn.x;
    bounds_w[o + p.head_dim + i + half] = mn.y;
}

@group(0) @binding(2) var<storage, read> q: array<f32>;              // [q_heads * D], rotated
@group(0) @binding(3) var<storage, read> bounds_r: array<f32>;
@group(0) @binding(4) var<storage, read_write> scores: array<f32>;   // [q_heads, out_cols]

@compute @workgroup_size(64)
fn scores_main(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let idx = gid.y * nwg.x * 64u + gid.x;
    if (idx >= p.n_blocks * p.q_heads) { return; }
    let b = p.first_block + idx % p.n_blocks;
    let h = idx / p.n_blocks;
    let page = pages[(b * p.block) / p.page_size];
    if (page < p.arena_first_page || page >= p.arena_first_page + p.arena_pages) { return; }
    let kvh = h / (p.q_heads / p.kv_heads);
    let o = bounds_base(page - p.arena_first_page, kvh, ((b * p.block) % p.page_size) / p.block);
    var s = 0.0;
    for (var i = 0u; i < p.head_dim; i++) {
        let qi = q[h * p.head_dim + i];
        s += max(qi * bounds_r[o + i], qi * bounds_r[o + p.head_dim + i]);
    }
    scores[h * p.out_cols + (b - p.first_block)] = s;
}

// top_blocks: per KV head g (one workgroup each), the k blocks of 0..n_blocks with
// the largest sum over g's query heads of scores[h][b] (the KV head's blocks
// serve all of them; the sum found every passkey dense attention finds at 4K and
// 8K, the max lost two), value descending, ties to the lower index: k rounds of
// a workgroup argmax, each excluding what earlier rounds took. Written to
// out[g * k + r].
@group(0) @binding(1) var<storage, read> top_scores: array<f32>;     // [q_heads, out_cols]
@group(0) @binding(2) var<storage, read_write> top_out: array<u32>;  // [kv_heads, k]

var<workgroup> red_v: array<f32, 256>;
var<workgroup> red_i: array<u32, 256>;

fn better(av: f32, ai: u32, bv: f32, bi: u32) -> bool {
    return av > bv || (av == bv && ai < bi);
}

@compute @workgroup_size(256)
fn top_blocks(@builtin(local_invocation_id) lid: vec3<u32>, @builtin(workgroup_id) wid: vec3<u32>) {
    let tid = lid.x;
    let g = wid.x;
    let group = p.q_heads / p.kv_heads;
    let k = p.block;   // the number of blocks to keep travels in the block slot
    var last_v = 3.0e38;
    var last_i = 0xffffffffu;
    for (var r = 0u; r < k; r++) {
        var bv = -3.0e38;
        var bi = 0xffffffffu;
        for (var b = tid; b < p.n_blocks; b += 256u) {
            var v = 0.0;
            for (var h = g * group; h < (g + 1u) * group; h++) {
                v += top_scores[h * p.out_cols + b];
            }
            let after = r == 0u || v < last_v || (v == last_v && b > last_i);
            if (after && better(v, b, bv, bi)) { bv = v; bi = b; }
        }
        red_v[tid] = bv;
        red_i[tid] = bi;
        workgroupBarrier();
        for (var s = 128u; s > 0u; s >>= 1u) {
            if (tid < s && better(red_v[tid + s], red_i[tid + s], red_v[tid], red_i[tid])) {
                red_v[tid] = red_v[tid + s];
                red_i[tid] = red_i[tid + s];
            }
            workgroupBarrier();
        }
        last_v = red_v[0];
        last_i = red_i[0];
        if (tid == 0u) { top_out[g * k + r] = last_i; }
        workgroupBarrier();
    }
}

// token_scores (TidalDecode): scores[h][j] = q_h . k_j for tokens j of 0..n_blocks
// (here a token count), keys rotated at their true positions, query head h
// against its KV head. One thread per (query head, token); a pass per arena.
@group(0) @binding(2) var<storage, read> ts_q: array<f32>;             // [q_heads * D], rotated
@group(0) @binding(3) var<storage, read> ts_k: array<u32>;             // packed f16 pairs
@group(0) @binding(4) var<storage, read> ts_cs: array<vec2<f32>>;
@group(0) @binding(5) var<storage, read_write> ts_out: array<f32>;     // [q_heads, out_cols]

fn k_half(base: u32, i: u32) -> f32 {
    let w = unpack2x16float(ts_k[base + i / 2u]);
    return select(w.x, w.y, (i & 1u) == 1u);
}

@compute @workgroup_size(64)
fn token_scores(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let idx = gid.y * nwg.x * 64u + gid.x;
    if (idx >= p.n_blocks * p.q_heads) { return; }
    let t = idx % p.n_blocks;
    let h = idx / p.n_blocks;
    let page = pages[t / p.page_size];
    if (page < p.arena_first_page || page >= p.arena_first_page + p.arena_pages) { return; }
    let kvh = h / (p.q_heads / p.kv_heads);
    let half = p.head_dim / 2u;
    let base = (((page - p.arena_first_page) * p.kv_heads + kvh) * p.page_size + t % p.page_size) * half;
    let pos = min(t, p.max_pos - 1u);
    var s = 0.0;
    for (var i = 0u; i < half; i++) {
        let lo = k_half(base, i);
        let hi = k_half(base, i + half);
        let c = ts_cs[pos * half + i];
        s += ts_q[h * p.head_dim + i] * (lo * c.x - hi * c.y)
           + ts_q[h * p.head_dim + i + half] * (hi * c.x + lo * c.y);
    }
    ts_out[h * p.out_cols + t] = s;
}
