// TokenSelect selection: per-head scores of the query against the unrotated cached
// keys of its KV head over the candidate range, per-head softmax summed over heads
// (soft vote), and a deterministic radix top-k on the vote's float bits.
//
// Candidates are the tokens begin..begin + n, or (hierarchical selection, block
// > 0) the tokens of `blocks` (ascending block ids of `block` tokens each): slot
// j is token blocks[j / block] * block + j % block, and the n slots' tokens
// outside begin..begin + range_n score NO_SCORE and vote 0 so they are never
// chosen while enough real candidates remain.
struct Params {
    n: u32, begin: u32, q_heads: u32, kv_heads: u32,
    head_dim: u32, page_size: u32, arena_first_page: u32, arena_pages: u32,
    k: u32, pass_: u32, modulo: u32, block: u32,
    range_n: u32, vbase: u32, obase: u32, _p3: u32,
}
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
            let h = select(g * group + hh, hh * p.kv_heads + g, p.modulo == 1u);
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

// ---- radix top-k over the vote bits (votes are >= 0, so their u32 bits order like
// the floats; Quest's signed block scores come as order-preserving keys) of
// vr[vbase..vbase + n], into selected[obase..obase + k].
// state: [0] = prefix, [1] = still-needed count, [2..258) = histogram.
@group(0) @binding(1) var<storage, read_write> state: array<atomic<u32>>;
@group(0) @binding(2) var<storage, read> vr: array<u32>;              // votes as bits [n]
var<workgroup> local_hist: array<atomic<u32>, 256>;

// Resets the state before pass 0: empty prefix, k still needed, zero histogram.
@compute @workgroup_size(256)
fn radix_init(@builtin(local_invocation_id) lid: vec3<u32>) {
    atomicStore(&state[2u + lid.x], 0u);
    if (lid.x == 0u) {
        atomicStore(&state[0], 0u);
        atomicStore(&state[1], p.k);
    }
}

// Counts, for candidates whose higher digits equal the prefix, the digit of pass_.
@compute @workgroup_size(256)
fn radix_hist(@builtin(local_invocation_id) lid: vec3<u32>, @builtin(workgroup_id) wid: vec3<u32>,
              @builtin(num_workgroups) nwg: vec3<u32>) {
    atomicStore(&local_hist[lid.x], 0u);
    workgroupBarrier();
    let shift = 24u - 8u * p.pass_;
    let prefix = atomicLoad(&state[0]);
    let per = (p.n + nwg.x - 1u) / nwg.x;
    let start = wid.x * per;
    let end = min(start + per, p.n);
    for (var j = start + lid.x; j < end; j += 256u) {
        let b = vr[p.vbase + j];
        // Higher digits (above shift + 8) must match the prefix found so far.
        let hi_ok = p.pass_ == 0u || (b >> (shift + 8u)) == (prefix >> (shift + 8u));
        if (hi_ok) { atomicAdd(&local_hist[(b >> shift) & 255u], 1u); }
    }
    workgroupBarrier();
    let c = atomicLoad(&local_hist[lid.x]);
    if (c > 0u) { atomicAdd(&state[2u + lid.x], c); }
}

// Picks the digit where the count from the top reaches the needed number; clears
// the histogram for the next pass.
@compute @workgroup_size(1)
fn radix_pick() {
    let shift = 24u - 8u * p.pass_;
    var need = atomicLoad(&state[1]);
    var prefix = atomicLoad(&state[0]);
    var digit = 0u;
    for (var d = 255i; d >= 0; d--) {
        let c = atomicLoad(&state[2u + u32(d)]);
        if (c >= need) { digit = u32(d); break; }
        need -= c;
    }
    prefix = prefix | (digit << shift);
    atomicStore(&state[0], prefix);
    atomicStore(&state[1], need);
    for (var d = 0u; d < 256u; d++) { atomicStore(&state[2u + d], 0u); }
}

// Writes the selected candidates in ascending index order: all with bits above the
// threshold, and the first `need` (lowest indices) equal to it. One workgroup; each
// thread owns a contiguous slice, counts, scans, then writes.
@group(0) @binding(3) var<storage, read_write> selected: array<u32>;  // [k], absolute ids
@group(0) @binding(4) var<storage, read> collect_blocks: array<u32>; // block ids (block > 0)
var<workgroup> cnt_hi: array<u32, 256>;
var<workgroup> cnt_eq: array<u32, 256>;

@compute @workgroup_size(256)
fn radix_collect(@builtin(local_invocation_id) lid: vec3<u32>) {
    collect(lid.x, atomicLoad(&state[0]), atomicLoad(&state[1]), p.vbase, p.obase);
}

// Writes candidate j of the keys at vbase when its bits are above thr, or equal
// to it among the first need_eq such, into selected[obase..] (called by every
// thread of one workgroup).
fn collect(tid: u32, thr: u32, need_eq: u32, vbase: u32, obase: u32) {
    let lid = vec3<u32>(tid, 0u, 0u);
    let per = (p.n + 255u) / 256u;
    let start = lid.x * per;
    let end = min(start + per, p.n);
    var hi = 0u;
    var eq = 0u;
    for (var j = start; j < end; j++) {
        let b = vr[vbase + j];
        if (b > thr) { hi++; } else if (b == thr) { eq++; }
    }
    cnt_hi[lid.x] = hi;
    cnt_eq[lid.x] = eq;
    workgroupBarrier();
    if (lid.x == 0u) {
        // Exclusive scans (serial: 256 entries).
        var sh = 0u;
        var se = 0u;
        for (var t = 0u; t < 256u; t++) {
            let a = cnt_hi[t];
            let b = cnt_eq[t];
            cnt_hi[t] = sh;
            cnt_eq[t] = se;
            sh += a;
            se += b;
        }
    }
    workgroupBarrier();
    // Equal-to-threshold candidates before this slice that are taken.
    var eq_seen = cnt_eq[lid.x];
    // Output position = (hi before) + (taken eq before).
    var out = cnt_hi[lid.x] + min(eq_seen, need_eq);
    for (var j = start; j < end; j++) {
        let b = vr[vbase + j];
        var take = b > thr;
        if (b == thr) {
            take = eq_seen < need_eq;
            eq_seen++;
        }
        if (take && out < p.k) {
            var t = p.begin + j;
            if (p.block > 0u) { t = collect_blocks[j / p.block] * p.block + j % p.block; }
            selected[obase + out] = t;
            out++;
        }
    }
}

// The whole radix top-k in one workgroup, for up to a few tens of thousands of
// candidates (hierarchical selection's stages): four passes with a workgroup
// histogram, then the collect, in one dispatch instead of ten. Workgroup y
// takes the y-th key array of a batch (Quest's KV heads): keys from
// vbase + y * n, output from obase + y * k.
var<workgroup> small_hist: array<atomic<u32>, 256>;
var<workgroup> small_state: vec2<u32>;   // prefix, still needed

@compute @workgroup_size(256)
fn radix_small(@builtin(local_invocation_id) lid: vec3<u32>, @builtin(workgroup_id) wid: vec3<u32>) {
    let vbase = p.vbase + wid.y * p.n;
    if (lid.x == 0u) { small_state = vec2<u32>(0u, p.k); }
    for (var pass_ = 0u; pass_ < 4u; pass_++) {
        atomicStore(&small_hist[lid.x], 0u);
        workgroupBarrier();
        let shift = 24u - 8u * pass_;
        let prefix = small_state.x;
        for (var j = lid.x; j < p.n; j += 256u) {
            let b = vr[vbase + j];
            if (pass_ == 0u || (b >> (shift + 8u)) == (prefix >> (shift + 8u))) {
                atomicAdd(&small_hist[(b >> shift) & 255u], 1u);
            }
        }
        workgroupBarrier();
        if (lid.x == 0u) {
            var need = small_state.y;
            var digit = 0u;
            for (var d = 255i; d >= 0; d--) {
                let c = atomicLoad(&small_hist[u32(d)]);
                if (c >= need) { digit = u32(d); break; }
                need -= c;
            }
            small_state = vec2<u32>(prefix | (digit << shift), need);
        }
        workgroupBarrier();
    }
    let st = workgroupUniformLoad(&small_state);
    // The threshold lands in `state` as after the multi-pass version.
    if (lid.x == 0u && wid.y == 0u) {
        atomicStore(&state[0], st.x);
        atomicStore(&state[1], st.y);
    }
    collect(lid.x, st.x, st.y, vbase, p.obase + wid.y * p.k);
}

// ---- Selection Cache: compares the current fingerprint with the layer's cached one
// (cosine over all heads) and, on a hit, zeroes the indirect dispatch arguments of
// the selection kernels so they run no workgroups; on a miss it writes their real
// sizes and stores the new fingerprint. No CPU round trip.
struct CacheParams { len: u32, slots: u32, threshold: f32, _p0: u32, args: array<vec4<u32>, 48> }
@group(0) @binding(0) var<uniform> cp: CacheParams;
@group(0) @binding(1) var<storage, read> fp: array<f32>;             // [len]
@group(0) @binding(2) var<storage, read_write> cached: array<f32>;   // [len + 1]; [len] = 1 when valid
@group(0) @binding(3) var<storage, read_write> args: array<u32>;     // [slots * 4]
@group(0) @binding(4) var<storage, read_write> counters: array<u32>; // [0] hits, [1] misses
var<workgroup> dots: array<vec3<f32>, 256>;
var<workgroup> hit_sh: u32;

@compute @workgroup_size(256)
fn cache_check(@builtin(local_invocation_id) lid: vec3<u32>) {
    var acc = vec3<f32>(0.0);
    for (var i = lid.x; i < cp.len; i += 256u) {
        let a = fp[i];
        let b = cached[i];
        acc += vec3<f32>(a * b, a * a, b * b);
    }
    dots[lid.x] = acc;
    workgroupBarrier();
    for (var s = 128u; s > 0u; s >>= 1u) {
        if (lid.x < s) { dots[lid.x] += dots[lid.x + s]; }
        workgroupBarrier();
    }
    if (lid.x == 0u) {
        let d = dots[0];
        let cosine = d.x / max(sqrt(d.y * d.z), 1e-30);
        let hit = cached[cp.len] == 1.0 && cosine >= cp.threshold;
        hit_sh = select(0u, 1u, hit);
        if (hit) { counters[0] += 1u; } else { counters[1] += 1u; }
        for (var s = 0u; s < cp.slots; s++) {
            let a = select(cp.args[s], vec4<u32>(0u, 1u, 1u, 0u), hit);
            args[4u * s] = a.x;
            args[4u * s + 1u] = a.y;
            args[4u * s + 2u] = a.z;
            args[4u * s + 3u] = 0u;
        }
    }
    workgroupBarrier();
    if (hit_sh == 0u) {
        for (var i = lid.x; i < cp.len; i += 256u) { cached[i] = fp[i]; }
        if (lid.x == 0u) { cached[cp.len] = 1.0; }
    }
}
