// Quest-style block bounds and block scores (ALGORITHMS.md section 2).
//
// bounds: for every block of `block` tokens that overlaps the updated range, per
// KV head and channel, the max and min of the keys rotated at their true
// positions (so a query rotated at its own position bounds its real logits), or
// with rotate = 0 of the unrotated keys (TokenSelect's rotation-free scores).
// A block is recomputed from the cache as a whole, which keeps the bounds exact
// after appends, partial blocks and speculative KV moves. Stored as f16 (half
// the reads of f32 when scoring), each widened by 2^-9 of its size plus 2^-23
// before rounding so the stored max stays above every key and the min below.
// One thread per (block, KV head, channels 2c and 2c + 1 with their rotation
// partners D/2 + 2c, D/2 + 2c + 1): the rotation mixes each with its partner.
// The host dispatches once per arena; a pass writes only blocks of its pages.
// Layout per arena: [page][kv_head][block in page][max D/2 words, min D/2 words],
// each word two f16 channels.
//
// scores: score[h][b] = sum_i max(q_i M_i, q_i m_i) for query head h against
// its KV head's bounds of logical block b: an upper bound of q . k over the
// block (head_scores and group_scores below).
struct Params {
    first_block: u32, n_blocks: u32, seq_len: u32, kv_heads: u32,
    head_dim: u32, page_size: u32, block: u32, arena_first_page: u32,
    arena_pages: u32, max_pos: u32, q_heads: u32, out_cols: u32,
    _p0: u32, alpha: f32, _p1: u32, _p2: u32,
}
// Fixed per pipeline: whether the cache holds keys before RoPE (bounds rotate
// them), and whether group_query writes only the summed query (token_scores).
override ROTATE: bool = true;
override SUM_ONLY: bool = false;
@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> pages: array<u32>;

@group(0) @binding(2) var<storage, read> k_arena: array<u32>;       // packed f16 pairs
@group(0) @binding(3) var<storage, read> cs: array<vec2<f32>>;      // [max_pos, D/2] (cos, sin)
@group(0) @binding(4) var<storage, read_write> bounds_w: array<u32>;

// Offset (in words) of the bounds of (page in arena, kv head, block in page).
fn bounds_base(local_page: u32, h: u32, b_in_page: u32) -> u32 {
    let per_page = p.page_size / p.block;
    return ((local_page * p.kv_heads + h) * per_page + b_in_page) * p.head_dim;
}

fn widen(v: vec2<f32>, dir: f32) -> u32 {
    let w = v + dir * (abs(v) * 0.001953125 + 1.1920929e-7);
    return pack2x16float(clamp(w, vec2<f32>(-65504.0), vec2<f32>(65504.0)));
}

// Channels c and c + 1 (c even, < D/2) of a key and their partners, rotated at t.
fn rotated(base: u32, c: u32, t: u32) -> vec4<f32> {
    let half = p.head_dim / 2u;
    let lo = unpack2x16float(k_arena[base + c / 2u]);
    let hi = unpack2x16float(k_arena[base + (c + half) / 2u]);
    if (!ROTATE) { return vec4<f32>(lo, hi); }
    let pos = rope_row(t, p.max_pos);
    let rl = rope_lo(pos, half, p.max_pos) + c;
    let rh = rope_hi(pos, half, p.max_pos);
    var c0 = cs[rl];
    var c1 = cs[rl + 1u];
    if (rh != ROPE_NONE) {
        c0 = rope_compose(c0, cs[rh + c]);
        c1 = rope_compose(c1, cs[rh + c + 1u]);
    }
    let rk = rotate2(lo, hi, vec2<f32>(c0.x, c1.x), vec2<f32>(c0.y, c1.y));
    return vec4<f32>(rk.lo, rk.hi);
}

@compute @workgroup_size(64)
fn bounds(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let quarter = p.head_dim / 4u;
    let idx = gid.y * nwg.x * 64u + gid.x;
    if (idx >= p.n_blocks * p.kv_heads * quarter) { return; }
    let c = 2u * (idx % quarter);
    let h = (idx / quarter) % p.kv_heads;
    let b = p.first_block + idx / (quarter * p.kv_heads);
    let t0 = b * p.block;
    let t1 = min(t0 + p.block, p.seq_len);
    let page = pages[t0 / p.page_size];
    if (!in_arena(page, p.arena_first_page, p.arena_pages)) { return; }
    let local_page = page - p.arena_first_page;
    var mx = vec4<f32>(NEG);
    var mn = vec4<f32>(-NEG);
    for (var t = t0; t < t1; t++) {
        let base = kv_row(local_page, p.kv_heads, h, p.page_size, t % p.page_size) * (p.head_dim / 2u);
        let r = rotated(base, c, t);
        mx = max(mx, r);
        mn = min(mn, r);
    }
    let o = bounds_base(local_page, h, (t0 % p.page_size) / p.block);
    let half_w = p.head_dim / 2u;   // words of the max (and of the min)
    bounds_w[o + c / 2u] = widen(mx.xy, 1.0);
    bounds_w[o + (c + half_w) / 2u] = widen(mx.zw, 1.0);
    bounds_w[o + half_w + c / 2u] = widen(mn.xy, -1.0);
    bounds_w[o + half_w + (c + half_w) / 2u] = widen(mn.zw, -1.0);
}

// Block scores. With c = (M + m) / 2 and r = (M - m) / 2 a block's score for
// query q is q . c + alpha |q| . r. alpha = 1 is Quest's bound
// sum_i max(q_i M_i, q_i m_i); a smaller alpha ranks blocks by their centre
// plus part of their spread (hierarchical TokenSelect).
//
// head_scores: scores[h][b] for every query head h; one thread per (block, KV
// head) scores the KV head's query heads, so a block's bounds come from memory
// once, and reads the query itself (two floats per word: on lavapipe the loads
// cost more than the arithmetic).
@group(0) @binding(2) var<storage, read> q: array<vec2<f32>>;            // [q_heads * D/2], rotated
@group(0) @binding(3) var<storage, read> bounds_r: array<u32>;
@group(0) @binding(4) var<storage, read_write> scores: array<f32>;       // [rows, out_cols]

// Offset of the bounds of logical block b for KV head g, or none when another
// arena holds the block.
fn block_offset(b: u32, g: u32) -> i32 {
    let page = pages[(b * p.block) / p.page_size];
    if (!in_arena(page, p.arena_first_page, p.arena_pages)) { return -1; }
    return i32(bounds_base(page - p.arena_first_page, g, ((b * p.block) % p.page_size) / p.block));
}

// A block-scoring thread: its block b, KV head g and the offset o of their
// bounds; o < 0 when it has none (past the end, or another arena's block).
struct BlockThread { b: u32, g: u32, o: i32 }

fn block_thread(gid: vec3<u32>, nwg: vec3<u32>) -> BlockThread {
    let idx = gid.y * nwg.x * 64u + gid.x;
    if (idx >= p.n_blocks * p.kv_heads) { return BlockThread(0u, 0u, -1); }
    let b = p.first_block + idx % p.n_blocks;
    let g = idx / p.n_blocks;
    return BlockThread(b, g, block_offset(b, g));
}

@compute @workgroup_size(64)
fn head_scores(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let th = block_thread(gid, nwg);
    if (th.o < 0) { return; }
    let b = th.b;
    let g = th.g;
    let o = u32(th.o);
    let half_w = p.head_dim / 2u;
    let group = p.q_heads / p.kv_heads;
    let alpha = p.alpha;
    for (var h = g * group; h < (g + 1u) * group; h++) {
        var s = vec2<f32>(0.0);
        for (var w = 0u; w < half_w; w++) {
            let qi = q[h * half_w + w];
            let mx = unpack2x16float(bounds_r[o + w]);
            let mn = unpack2x16float(bounds_r[o + half_w + w]);
            s += qi * (mx + mn) + alpha * abs(qi) * (mx - mn);
        }
        scores[h * p.out_cols + (b - p.first_block)] = 0.5 * (s.x + s.y);
    }
}

// group_query / group_scores (Quest; Tidal's token_scores use group_query too):
// the bound summed over KV head g's query heads in one pass.
// max(q M, q m) = max(q, 0) M + min(q, 0) m, so the sum is
// sum_i (P_i M_i + N_i m_i) with P (N) the sum over the group of the queries'
// positive (negative) parts: a block's bounds are read and multiplied once per
// KV head, not once per query head. group_query writes, one thread per (KV
// head, word), gq[g * D/2 + w] = (P_2w, P_2w+1, N_2w, N_2w+1) as vec4s, or
// with sum_only the group's summed query P + N as vec2s (token_scores: on
// lavapipe at 128K a Tidal selection layer took 1.34x dense reading the sums,
// 1.45x reading the parts); group_scores writes
// scores[g][b], one thread per (block, KV head).
@group(0) @binding(1) var<storage, read> gq_in: array<vec2<f32>>;          // [q_heads * D/2], rotated
@group(0) @binding(2) var<storage, read_write> gq_out: array<f32>;         // [kv_heads * D/2] vec4s or vec2s

@compute @workgroup_size(64)
fn group_query(@builtin(global_invocation_id) gid: vec3<u32>) {
    let half_w = p.head_dim / 2u;
    if (gid.x >= p.kv_heads * half_w) { return; }
    let g = gid.x / half_w;
    let w = gid.x % half_w;
    let group = p.q_heads / p.kv_heads;
    var pos = vec2<f32>(0.0);
    var neg = vec2<f32>(0.0);
    for (var h = g * group; h < (g + 1u) * group; h++) {
        let qi = gq_in[h * half_w + w];
        pos += max(qi, vec2<f32>(0.0));
        neg += min(qi, vec2<f32>(0.0));
    }
    if (SUM_ONLY) {
        let q = pos + neg;
        gq_out[2u * gid.x] = q.x;
        gq_out[2u * gid.x + 1u] = q.y;
    } else {
        gq_out[4u * gid.x] = pos.x;
        gq_out[4u * gid.x + 1u] = pos.y;
        gq_out[4u * gid.x + 2u] = neg.x;
        gq_out[4u * gid.x + 3u] = neg.y;
    }
}

@group(0) @binding(2) var<storage, read> gq: array<vec4<f32>>;            // [kv_heads * D/2]

@compute @workgroup_size(64)
fn group_scores(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let th = block_thread(gid, nwg);
    if (th.o < 0) { return; }
    let b = th.b;
    let g = th.g;
    let o = u32(th.o);
    let half_w = p.head_dim / 2u;
    var s = vec2<f32>(0.0);
    for (var w = 0u; w < half_w; w++) {
        let pn = gq[g * half_w + w];
        s += pn.xy * unpack2x16float(bounds_r[o + w]) + pn.zw * unpack2x16float(bounds_r[o + half_w + w]);
    }
    scores[g * p.out_cols + (b - p.first_block)] = s.x + s.y;
}

// group_keys: per KV head g and block (or token) b, the sum over g's query
// heads of scores[h][b] (the KV head's blocks serve all of them; the sum found
// every passkey dense attention finds at 4K and 8K, the max lost two), as an
// order-preserving u32 key for the radix top-k in tokenselect.wgsl (which then
// runs once per KV head over keys[g * n_blocks..]).
@group(0) @binding(1) var<storage, read> gk_scores: array<f32>;       // [q_heads, out_cols]
@group(0) @binding(2) var<storage, read_write> gk_keys: array<u32>;   // [kv_heads, n_blocks]

@compute @workgroup_size(64)
fn group_keys(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let idx = gid.y * nwg.x * 64u + gid.x;
    if (idx >= p.n_blocks * p.kv_heads) { return; }
    let b = idx % p.n_blocks;
    let g = idx / p.n_blocks;
    let group = p.q_heads / p.kv_heads;
    var v = 0.0;
    for (var h = g * group; h < (g + 1u) * group; h++) {
        v += gk_scores[h * p.out_cols + b];
    }
    let bits = bitcast<u32>(v);
    gk_keys[idx] = select(bits | 0x80000000u, ~bits, (bits & 0x80000000u) != 0u);
}

// token_scores (TidalDecode): scores[g][t] = sum over KV head g's query heads h
// of q_h . k_t for tokens t of 0..n_blocks (here a token count), keys rotated at
// their true positions. The sum is (sum_h q_h) . k_t, so group_query (sum_only)
// adds each group's queries and each key is rotated once and dotted with its
// group's sum (one thread per (token, KV head)); a pass per arena.
@group(0) @binding(2) var<storage, read> ts_q: array<vec2<f32>>;       // [kv_heads * D/2] summed queries
@group(0) @binding(3) var<storage, read> ts_k: array<u32>;             // packed f16 pairs
@group(0) @binding(4) var<storage, read> ts_cs: array<vec2<f32>>;
@group(0) @binding(5) var<storage, read_write> ts_out: array<f32>;     // [kv_heads, out_cols]

@compute @workgroup_size(64)
fn token_scores(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let idx = gid.y * nwg.x * 64u + gid.x;
    if (idx >= p.n_blocks * p.kv_heads) { return; }
    let t = idx % p.n_blocks;
    let g = idx / p.n_blocks;
    let page = pages[t / p.page_size];
    if (!in_arena(page, p.arena_first_page, p.arena_pages)) { return; }
    let half = p.head_dim / 2u;
    let quarter = p.head_dim / 4u;
    // Words: channels 2c, 2c + 1 at base + c, their partners at base + quarter + c.
    let base = kv_row(page - p.arena_first_page, p.kv_heads, g, p.page_size, t % p.page_size) * half;
    let pos = rope_row(t, p.max_pos);
    let rl = rope_lo(pos, half, p.max_pos);
    let rh = rope_hi(pos, half, p.max_pos);
    var s = vec2<f32>(0.0);
    for (var c = 0u; c < quarter; c++) {
        let lo = unpack2x16float(ts_k[base + c]);
        let hi = unpack2x16float(ts_k[base + quarter + c]);
        var a = ts_cs[rl + 2u * c];
        var b = ts_cs[rl + 2u * c + 1u];
        if (rh != ROPE_NONE) {
            a = rope_compose(a, ts_cs[rh + 2u * c]);
            b = rope_compose(b, ts_cs[rh + 2u * c + 1u]);
        }
        let rk = rotate2(lo, hi, vec2<f32>(a.x, b.x), vec2<f32>(a.y, b.y));
        s += ts_q[g * half + c] * rk.lo + ts_q[g * half + quarter + c] * rk.hi;
    }
    ts_out[g * p.out_cols + t] = s.x + s.y;
}
