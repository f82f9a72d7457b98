// Split-KV flash decoding for one query token with GQA over the paged KV cache.
//
// decode_partial: one workgroup per (KV split, KV head) handles all G query heads of
// that KV head, so each key and value is read once per step. Keys are stored before
// RoPE and rotated on the fly at their own position (dense attention: position = index).
// Tiles of 64 keys: (1) a thread per key computes the G scores, (2) G threads update the
// running max/sum (online softmax, f32), (3) threads own (head, dim-pair) outputs and
// accumulate p * V. The state (m, l, acc) of each (query head, split) lives in `part`;
// with a KV cache spanning several arena buffers the host runs one pass per arena and
// each pass continues the state left by the previous one.
//
// decode_reduce: combines the splits of each query head into the output. With one
// split and one pass (`direct`) there is nothing to combine: `part` is bound to
// the output and the kernel stores acc / l there itself (the same division the
// reduce would do), a dispatch fewer.
// List mode (sparse policies): the attended keys are ranks 0..kv_len of the list
// [0, n_init) ++ sel[0..n_sel) ++ [tail_start, tail_start + rest); a key's RoPE
// position is its rank (compact) or its logical index (original). With block > 0
// (Quest) the selection is per KV head and holds blocks: selected rank i of KV
// head g is token sel[g * blocks_per_head + i / block] * block + i % block.
struct Params {
    kv_len: u32, q_heads: u32, kv_heads: u32, head_dim: u32,
    page_size: u32, split_len: u32, n_splits: u32, arena_first_page: u32,
    arena_pages: u32, first_pass: u32, scale: f32, max_pos: u32,
    direct: u32, n_init: u32, n_sel: u32, tail_start: u32,
    _p1: u32, block: u32, blocks_per_head: u32, _p2: u32,
}
// Fixed per pipeline, so the key loop does not branch on them: list mode (0
// dense, 1 key list) and compact positions (list mode only).
override LIST_MODE: u32 = 0u;
override COMPACT: bool = false;
@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> q: array<f32>;              // [q_heads * D], rotated
@group(0) @binding(2) var<storage, read> k_arena: array<u32>;
@group(0) @binding(3) var<storage, read> v_arena: array<u32>;
@group(0) @binding(4) var<storage, read> pages: array<u32>;
@group(0) @binding(5) var<storage, read> cs: array<vec2<f32>>;       // rope table [max_pos, D/2]
@group(0) @binding(6) var<storage, read_write> part: array<f32>;     // [q_heads, n_splits, D + 2], or direct the output [q_heads * D]
@group(0) @binding(7) var<storage, read> sel: array<u32>;            // selected ids (list mode)

const TILE: u32 = 64u;
const MAX_G: u32 = 8u;
const MAX_D: u32 = 128u;
const NONE: u32 = 0xffffffffu;

var<workgroup> q_sh: array<f32, 1024>;        // MAX_G * MAX_D
var<workgroup> s_sh: array<f32, 512>;         // MAX_G * TILE: scores, then probabilities
var<workgroup> base_sh: array<u32, 64>;       // word offset of each tile key's row, or NONE
var<workgroup> alpha_sh: array<f32, 8>;

// Logical token index of rank r for KV head kvh.
fn logical(r: u32, kvh: u32) -> u32 {
    if (LIST_MODE == 0u) { return r; }
    let l = KeyListView(p.n_init, p.n_sel, p.tail_start, p.block, p.blocks_per_head);
    let w = key_list_word(l, r, kvh);
    var word = 0u;
    if (w != NO_WORD) { word = sel[w]; }
    return key_list_logical(l, r, word);
}

// RoPE position of rank r for KV head kvh.
fn position(r: u32, kvh: u32) -> u32 {
    let pos = select(logical(r, kvh), r, LIST_MODE == 0u || COMPACT);
    return rope_row(pos, p.max_pos);
}

fn key_base(r: u32, kvh: u32) -> u32 {
    let j = logical(r, kvh);
    let page = pages[j / p.page_size];
    if (!in_arena(page, p.arena_first_page, p.arena_pages)) { return NONE; }
    let local_page = page - p.arena_first_page;
    return kv_row(local_page, p.kv_heads, kvh, p.page_size, j % p.page_size) * (p.head_dim / 2u);
}

@compute @workgroup_size(64)
fn decode_partial(@builtin(local_invocation_id) lid: vec3<u32>, @builtin(workgroup_id) wid: vec3<u32>) {
    let tid = lid.x;
    let split = wid.x;
    let kvh = wid.y;
    let g_count = p.q_heads / p.kv_heads;
    let d = p.head_dim;
    let half = d / 2u;
    let quarter = d / 4u;
    let words = half;
    let stride = d + 2u;
    for (var i = tid; i < g_count * d; i += TILE) {
        q_sh[i] = q[kvh * g_count * d + i];
    }
    // Outputs owned by this thread: (head, word) pairs o = tid + TILE * n.
    let n_pairs = g_count * words;
    var acc: array<vec2<f32>, 8>;
    var m = NEG;
    var l = 0.0;
    if (p.first_pass == 1u) {
        for (var n = 0u; n < 8u; n++) { acc[n] = vec2<f32>(0.0); }
    } else {
        for (var n = 0u; n < 8u; n++) {
            let o = tid + TILE * n;
            if (o < n_pairs) {
                let g = o / words;
                let w = o % words;
                let pb = ((kvh * g_count + g) * p.n_splits + split) * stride;
                acc[n] = vec2<f32>(part[pb + 2u + 2u * w], part[pb + 3u + 2u * w]);
            }
        }
        if (tid < g_count) {
            let pb = ((kvh * g_count + tid) * p.n_splits + split) * stride;
            m = part[pb];
            l = part[pb + 1u];
        }
    }
    workgroupBarrier();
    let begin = split * p.split_len;
    let end = min(begin + p.split_len, p.kv_len);
    for (var t0 = begin; t0 < end; t0 += TILE) {
        // (1) scores of this tile's keys
        let j = t0 + tid;
        var base = NONE;
        if (j < end) { base = key_base(j, kvh); }
        base_sh[tid] = base;
        var sc: array<f32, 8>;
        for (var g = 0u; g < MAX_G; g++) { sc[g] = 0.0; }
        if (base != NONE) {
            let pos = position(j, kvh);
            let rl = rope_lo(pos, half, p.max_pos);
            let rh = rope_hi(pos, half, p.max_pos);
            for (var w = 0u; w < quarter; w++) {
                // dims (2w, 2w+1) and their rotate-half partners (2w + D/2, 2w + 1 + D/2)
                let lo = unpack2x16float(k_arena[base + w]);
                let hi = unpack2x16float(k_arena[base + w + quarter]);
                var c0 = cs[rl + 2u * w];
                var c1 = cs[rl + 2u * w + 1u];
                if (rh != ROPE_NONE) {
                    c0 = rope_compose(c0, cs[rh + 2u * w]);
                    c1 = rope_compose(c1, cs[rh + 2u * w + 1u]);
                }
                let rk = rotate2(lo, hi, vec2<f32>(c0.x, c1.x), vec2<f32>(c0.y, c1.y));
                let r_lo = rk.lo;
                let r_hi = rk.hi;
                for (var g = 0u; g < g_count; g++) {
                    let qb = g * d + 2u * w;
                    sc[g] += q_sh[qb] * r_lo.x + q_sh[qb + 1u] * r_lo.y
                           + q_sh[qb + half] * r_hi.x + q_sh[qb + half + 1u] * r_hi.y;
                }
            }
        }
        for (var g = 0u; g < g_count; g++) {
            s_sh[g * TILE + tid] = select(NEG, sc[g] * p.scale, base != NONE);
        }
        workgroupBarrier();
        // (2) online softmax update, one thread per query head
        if (tid < g_count) {
            var tmax = NEG;
            for (var t = 0u; t < TILE; t++) {
                if (base_sh[t] != NONE) { tmax = max(tmax, s_sh[tid * TILE + t]); }
            }
            let m_new = max(m, tmax);
            let alpha = exp(m - m_new);
            var sum = 0.0;
            for (var t = 0u; t < TILE; t++) {
                var pr = 0.0;
                if (base_sh[t] != NONE) { pr = exp(s_sh[tid * TILE + t] - m_new); }
                s_sh[tid * TILE + t] = pr;
                sum += pr;
            }
            l = l * alpha + sum;
            m = m_new;
            alpha_sh[tid] = alpha;
        }
        workgroupBarrier();
        // (3) acc = acc * alpha + P V
        for (var n = 0u; n < 8u; n++) {
            let o = tid + TILE * n;
            if (o < n_pairs) {
                let g = o / words;
                let w = o % words;
                var a = acc[n] * alpha_sh[g];
                for (var t = 0u; t < TILE; t++) {
                    let b = base_sh[t];
                    if (b != NONE) {
                        a += s_sh[g * TILE + t] * unpack2x16float(v_arena[b + w]);
                    }
                }
                acc[n] = a;
            }
        }
        workgroupBarrier();
    }
    if (p.direct == 1u) {
        if (tid < g_count) { alpha_sh[tid] = l; }
        workgroupBarrier();
        for (var n = 0u; n < 8u; n++) {
            let o = tid + TILE * n;
            if (o < n_pairs) {
                let g = o / words;
                let ob = (kvh * g_count + g) * d + 2u * (o % words);
                let lg = alpha_sh[g];
                part[ob] = select(0.0, acc[n].x / lg, lg > 0.0);
                part[ob + 1u] = select(0.0, acc[n].y / lg, lg > 0.0);
            }
        }
        return;
    }
    for (var n = 0u; n < 8u; n++) {
        let o = tid + TILE * n;
        if (o < n_pairs) {
            let g = o / words;
            let w = o % words;
            let pb = ((kvh * g_count + g) * p.n_splits + split) * stride;
            part[pb + 2u + 2u * w] = acc[n].x;
            part[pb + 3u + 2u * w] = acc[n].y;
        }
    }
    if (tid < g_count) {
        let pb = ((kvh * g_count + tid) * p.n_splits + split) * stride;
        part[pb] = m;
        part[pb + 1u] = l;
    }
}

// Variant without workgroup memory or barriers for CPU drivers: one thread per
// (split, query head) runs its own online softmax over the split. Threads of one
// split are adjacent, so the G heads sharing a KV head read the same keys together
// (cache hits on a CPU). Same `part` layout and multi-pass state as decode_partial.
@compute @workgroup_size(64)
fn decode_lanes(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let t = gid.y * nwg.x * 64u + gid.x;
    if (t >= p.q_heads * p.n_splits) { return; }
    let h = t % p.q_heads;
    let split = t / p.q_heads;
    let kvh = h / (p.q_heads / p.kv_heads);
    let d = p.head_dim;
    let d4 = d / 4u;
    let e8 = d / 8u;
    let half = d / 2u;
    let stride = d + 2u;
    let pb = (h * p.n_splits + split) * stride;
    var qv: array<vec4<f32>, 32>;
    var acc: array<vec4<f32>, 32>;
    for (var i = 0u; i < d4; i++) {
        qv[i] = vec4<f32>(q[h * d + 4u * i], q[h * d + 4u * i + 1u], q[h * d + 4u * i + 2u], q[h * d + 4u * i + 3u]) * p.scale;
        acc[i] = vec4<f32>(0.0);
    }
    var m = NEG;
    var l = 0.0;
    if (p.first_pass == 0u) {
        m = part[pb];
        l = part[pb + 1u];
        for (var i = 0u; i < d4; i++) {
            acc[i] = vec4<f32>(part[pb + 2u + 4u * i], part[pb + 3u + 4u * i], part[pb + 4u + 4u * i], part[pb + 5u + 4u * i]);
        }
    }
    let begin = split * p.split_len;
    let end = min(begin + p.split_len, p.kv_len);
    for (var j = begin; j < end; j++) {
        let base = key_base(j, kvh);
        if (base == NONE) { continue; }
        let pos = position(j, kvh);
        let rl = rope_lo(pos, half, p.max_pos);
        let rh = rope_hi(pos, half, p.max_pos);
        var s4 = vec4<f32>(0.0);
        for (var w = 0u; w < e8; w++) {
            // dims 4w..4w+3 and their rotate-half partners 4w + D/2 ..
            let lo = vec4<f32>(unpack2x16float(k_arena[base + 2u * w]), unpack2x16float(k_arena[base + 2u * w + 1u]));
            let hi = vec4<f32>(unpack2x16float(k_arena[base + 2u * w + half / 2u]),
                               unpack2x16float(k_arena[base + 2u * w + 1u + half / 2u]));
            var c01 = cs[rl + 4u * w];
            var c1 = cs[rl + 4u * w + 1u];
            var c2 = cs[rl + 4u * w + 2u];
            var c3 = cs[rl + 4u * w + 3u];
            if (rh != ROPE_NONE) {
                c01 = rope_compose(c01, cs[rh + 4u * w]);
                c1 = rope_compose(c1, cs[rh + 4u * w + 1u]);
                c2 = rope_compose(c2, cs[rh + 4u * w + 2u]);
                c3 = rope_compose(c3, cs[rh + 4u * w + 3u]);
            }
            let c = vec4<f32>(c01.x, c1.x, c2.x, c3.x);
            let s = vec4<f32>(c01.y, c1.y, c2.y, c3.y);
            let rk = rotate4(lo, hi, c, s);
            s4 += qv[w] * rk.lo + qv[w + e8] * rk.hi;
        }
        let sc = s4.x + s4.y + s4.z + s4.w;
        let m_new = max(m, sc);
        let alpha = exp(m - m_new);
        let pr = exp(sc - m_new);
        l = l * alpha + pr;
        m = m_new;
        for (var i = 0u; i < d4; i++) {
            let v = vec4<f32>(unpack2x16float(v_arena[base + 2u * i]), unpack2x16float(v_arena[base + 2u * i + 1u]));
            acc[i] = acc[i] * alpha + pr * v;
        }
    }
    if (p.direct == 1u) {
        for (var i = 0u; i < d4; i++) {
            let o = select(vec4<f32>(0.0), acc[i] / l, l > 0.0);
            for (var c = 0u; c < 4u; c++) { part[h * d + 4u * i + c] = o[c]; }
        }
        return;
    }
    part[pb] = m;
    part[pb + 1u] = l;
    for (var i = 0u; i < d4; i++) {
        part[pb + 2u + 4u * i] = acc[i].x;
        part[pb + 3u + 4u * i] = acc[i].y;
        part[pb + 4u + 4u * i] = acc[i].z;
        part[pb + 5u + 4u * i] = acc[i].w;
    }
}

struct ReduceParams { q_heads: u32, head_dim: u32, n_splits: u32, _p0: u32 }
@group(0) @binding(0) var<uniform> rp: ReduceParams;
@group(0) @binding(1) var<storage, read> rpart: array<f32>;
@group(0) @binding(2) var<storage, read_write> out: array<f32>;      // [q_heads * D]

@compute @workgroup_size(64)
fn decode_reduce(@builtin(local_invocation_id) lid: vec3<u32>, @builtin(workgroup_id) wid: vec3<u32>) {
    let h = wid.x;
    let stride = rp.head_dim + 2u;
    var mx = NEG;
    for (var s = 0u; s < rp.n_splits; s++) { mx = max(mx, rpart[(h * rp.n_splits + s) * stride]); }
    var den = 0.0;
    for (var s = 0u; s < rp.n_splits; s++) {
        let b = (h * rp.n_splits + s) * stride;
        den += exp(rpart[b] - mx) * rpart[b + 1u];
    }
    for (var i = lid.x; i < rp.head_dim; i += 64u) {
        var num = 0.0;
        for (var s = 0u; s < rp.n_splits; s++) {
            let b = (h * rp.n_splits + s) * stride;
            num += exp(rpart[b] - mx) * rpart[b + 2u + i];
        }
        out[h * rp.head_dim + i] = select(0.0, num / den, den > 0.0);
    }
}
