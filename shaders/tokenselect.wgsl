// TokenSelect selection: per-head scores of the query against the unrotated cached
// keys of its KV head over the candidate range, and the per-head softmax summed
// over heads (soft vote). The top-k over the votes is topk.wgsl's.
//
// Candidates are the tokens begin..begin + n, or (hierarchical selection, block
// > 0) the tokens of `blocks` (ascending block ids of `block` tokens each): slot
// j is token blocks[j / block] * block + j % block, and the n slots' tokens
// outside begin..begin + range_n score NO_SCORE and vote 0 so they are never
// chosen while enough real candidates remain.
struct Params {
    n: u32, begin: u32, q_heads: u32, kv_heads: u32,
    head_dim: u32, page_size: u32, arena_first_page: u32, arena_pages: u32,
    _p0: u32, block: u32, range_n: u32, _p1: u32,
}
// The GQA map, fixed per pipeline (see below).
override GQA_MODULO: bool = false;
@group(0) @binding(0) var<uniform> p: Params;
const NO_SCORE: f32 = NEG;

// ---- score: s[h, j] = q_h . K[begin + j, g(h)], unscaled; thread per candidate.
// g(h) = h / group, or h mod kv_heads when `modulo` is set.
@group(0) @binding(1) var<storage, read> q: array<vec4<f32>>;        // [q_heads * D/4], rotated at n_local
@group(0) @binding(2) var<storage, read> k_arena: array<vec2<u32>>;
@group(0) @binding(3) var<storage, read> pages: array<u32>;
@group(0) @binding(4) var<storage, read_write> scores: array<f32>;   // [q_heads, n]
@group(0) @binding(5) var<storage, read> score_blocks: array<u32>;   // block ids (block > 0)

@compute @workgroup_size(64)
fn score(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let j = gid.y * nwg.x * 64u + gid.x;
    if (j >= p.n) { return; }
    var t = p.begin + j;
    if (p.block > 0u) {
        t = score_blocks[j / p.block] * p.block + j % p.block;
        if (t < p.begin || t >= p.begin + p.range_n) {
            for (var h = 0u; h < p.q_heads; h++) { scores[h * p.n + j] = NO_SCORE; }
            return;
        }
    }
    let page = pages[t / p.page_size];
    if (!in_arena(page, p.arena_first_page, p.arena_pages)) { return; }
    let d4 = p.head_dim / 4u;
    let group = p.q_heads / p.kv_heads;
    for (var g = 0u; g < p.kv_heads; g++) {
        let base = kv_row(page - p.arena_first_page, p.kv_heads, g, p.page_size, t % p.page_size) * d4;
        for (var hh = 0u; hh < group; hh++) {
            let h = select(g * group + hh, hh * p.kv_heads + g, GQA_MODULO);
            var acc = vec4<f32>(0.0);
            for (var i = 0u; i < d4; i++) {
                let kw = k_arena[base + i];
                acc += q[h * d4 + i] * vec4<f32>(unpack2x16float(kw.x), unpack2x16float(kw.y));
            }
            scores[h * p.n + j] = acc.x + acc.y + acc.z + acc.w;
        }
    }
}

// ---- head_stats: per head, max and sum(exp(s - max)) over the candidates.
@group(0) @binding(1) var<storage, read> s_in: array<f32>;            // [q_heads, n]
@group(0) @binding(2) var<storage, read_write> stats: array<vec2<f32>>; // [q_heads]
var<workgroup> red: array<f32, 256>;

@compute @workgroup_size(256)
fn head_stats(@builtin(local_invocation_id) lid: vec3<u32>, @builtin(workgroup_id) wid: vec3<u32>) {
    let h = wid.x;
    var m = NEG;
    for (var j = lid.x; j < p.n; j += 256u) { m = max(m, s_in[h * p.n + j]); }
    red[lid.x] = m;
    workgroupBarrier();
    for (var s = 128u; s > 0u; s >>= 1u) {
        if (lid.x < s) { red[lid.x] = max(red[lid.x], red[lid.x + s]); }
        workgroupBarrier();
    }
    let mx = red[0];
    workgroupBarrier();
    var sum = 0.0;
    for (var j = lid.x; j < p.n; j += 256u) { sum += exp(s_in[h * p.n + j] - mx); }
    red[lid.x] = sum;
    workgroupBarrier();
    for (var s = 128u; s > 0u; s >>= 1u) {
        if (lid.x < s) { red[lid.x] += red[lid.x + s]; }
        workgroupBarrier();
    }
    if (lid.x == 0u) { stats[h] = vec2<f32>(mx, red[0]); }
}

// ---- vote: v[j] = sum_h softmax_h(s)[j]; thread per candidate. A real
// candidate's vote is at least 1e-30 (an underflowed vote still outranks a slot
// outside the range, whose vote is 0).
@group(0) @binding(1) var<storage, read> sv: array<f32>;              // [q_heads, n]
@group(0) @binding(2) var<storage, read> st: array<vec2<f32>>;        // [q_heads]
@group(0) @binding(3) var<storage, read_write> votes: array<f32>;     // [n]

@compute @workgroup_size(64)
fn vote(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let j = gid.y * nwg.x * 64u + gid.x;
    if (j >= p.n) { return; }
    var v = 0.0;
    for (var h = 0u; h < p.q_heads; h++) {
        let m = st[h];
        v += exp(sv[h * p.n + j] - m.x) / m.y;
    }
    votes[j] = select(max(v, 1e-30), 0.0, sv[j] <= NO_SCORE);
}
