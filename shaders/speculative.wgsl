// Token Recycling on the device (ALGORITHMS.md section 5).
//
// draft: fills a draft tree's tokens from its plan, one (parent, rank, token)
// triple per node in parent-before-child order: a node with a rank takes
// adj[token of its parent][rank], the others keep the given token. One thread
// walks the nodes (at most 128), so parents are always filled first.
//
// adj_update: after a verify forward, for every node i, adj[token i] = the 8
// best tokens of its logits (value descending, ties to the lower id). When a
// token appears at several nodes the last node writes, so the result does not
// depend on scheduling. One workgroup per node: each thread keeps the top 8 of
// its strided slice of the vocabulary, then 8 rounds of a max-reduction pop the
// overall best.
//
// accept: walks the tree from the root with the target distribution of each
// visited node (the plain sampler's: top-k of the logits, softmax at the
// temperature, nucleus cut at top_p; greedy is k = 1). Multi-draft speculative
// sampling with deterministic drafts: the children are tried in index order,
// child x is accepted with probability p(x) / (mass left), a rejected x is
// zeroed; when no child is accepted the bonus token is sampled from what is
// left. The output distribution is exactly the plain sampler's. One workgroup
// per trial (the model uses one; the statistical test many), thread 0 walks,
// all threads find each node's top-k.
// k, depth, temperature, top_p and seed are accept's; the others pass zeros.
struct Params {
    n: u32, vocab: u32, k: u32, depth: u32,
    temperature: f32, top_p: f32, seed_lo: u32, seed_hi: u32,
}
@group(0) @binding(0) var<uniform> p: Params;

const NONE: u32 = 0xffffffffu;

@group(0) @binding(1) var<storage, read> adj_r: array<u32>;     // [vocab, 8]
@group(0) @binding(2) var<storage, read> plan: array<u32>;      // [n, 3]
@group(0) @binding(3) var<storage, read_write> toks: array<u32>; // [n]

@compute @workgroup_size(1)
fn draft() {
    for (var i = 0u; i < p.n; i++) {
        let parent = plan[3u * i];
        let rank = plan[3u * i + 1u];
        var t = plan[3u * i + 2u];
        if (parent != NONE && rank != NONE) {
            t = adj_r[toks[parent] * 8u + rank];
        }
        toks[i] = t;
    }
}

@group(0) @binding(1) var<storage, read_write> adj_w: array<u32>; // [vocab, 8]
@group(0) @binding(2) var<storage, read> logits: array<f32>;      // [n, vocab]
@group(0) @binding(3) var<storage, read> toks_r: array<u32>;      // [n]

var<workgroup> red_v: array<f32, 256>;
var<workgroup> red_i: array<u32, 256>;
var<workgroup> red_t: array<u32, 256>;
var<workgroup> skip_sh: u32;

@compute @workgroup_size(256)
fn adj_update(@builtin(local_invocation_id) lid: vec3<u32>, @builtin(workgroup_id) wid: vec3<u32>) {
    let i = wid.x;
    let tid = lid.x;
    let tok = toks_r[i];
    if (tid == 0u) {
        var s = 0u;
        for (var j = i + 1u; j < p.n; j++) {
            if (toks_r[j] == tok) { s = 1u; }
        }
        skip_sh = s;
    }
    if (workgroupUniformLoad(&skip_sh) == 1u) { return; }
    var lv: array<f32, 8>;
    var li: array<u32, 8>;
    for (var k = 0u; k < 8u; k++) { lv[k] = NEG; li[k] = NONE; }
    let row = i * p.vocab;
    // Ascending ids per thread: an equal value never displaces an earlier id.
    for (var c = tid; c < p.vocab; c += 256u) {
        let v = logits[row + c];
        if (v > lv[7]) {
            var k = 7u;
            while (k > 0u && v > lv[k - 1u]) {
                lv[k] = lv[k - 1u];
                li[k] = li[k - 1u];
                k--;
            }
            lv[k] = v;
            li[k] = c;
        }
    }
    var head = 0u;
    for (var r = 0u; r < 8u; r++) {
        red_v[tid] = select(NEG, lv[min(head, 7u)], head < 8u);
        red_i[tid] = select(NONE, li[min(head, 7u)], head < 8u);
        red_t[tid] = tid;
        workgroupBarrier();
        for (var s = 128u; s > 0u; s >>= 1u) {
            if (tid < s && better(red_v[tid + s], red_i[tid + s], red_v[tid], red_i[tid])) {
                red_v[tid] = red_v[tid + s];
                red_i[tid] = red_i[tid + s];
                red_t[tid] = red_t[tid + s];
            }
            workgroupBarrier();
        }
        if (tid == 0u) { adj_w[tok * 8u + r] = select(0u, red_i[0], red_i[0] != NONE); }
        let winner = red_t[0];
        workgroupBarrier();
        if (tid == winner) { head++; }
    }
}

@group(0) @binding(1) var<storage, read> acc_logits: array<f32>; // [n, vocab]
@group(0) @binding(2) var<storage, read> acc_toks: array<u32>;   // [n]
@group(0) @binding(3) var<storage, read> links: array<u32>;      // first child [n], next sibling [n]
@group(0) @binding(4) var<storage, read_write> acc_out: array<u32>; // per trial [2 + 2 * depth]

var<workgroup> cand_i: array<u32, 64>;
var<workgroup> cand_p: array<f32, 64>;
var<workgroup> cur_sh: u32;
var<workgroup> done_sh: u32;

// PCG hash (O'Neill); the reference executor has the same function.
fn pcg(v: u32) -> u32 {
    let state = v * 747796405u + 2891336453u;
    let word = ((state >> ((state >> 28u) + 4u)) ^ state) * 277803737u;
    return (word >> 22u) ^ word;
}

// Uniform in [0, 1) with 24 bits, draw number `draw` of trial `trial`.
fn uniform01(trial: u32, draw: u32) -> f32 {
    // Nested hashes: nearby seeds and trials give unrelated streams.
    let h = pcg(pcg(pcg(pcg(p.seed_lo) ^ p.seed_hi) ^ trial) ^ draw);
    return f32(h >> 8u) / 16777216.0;
}

@compute @workgroup_size(256)
fn accept(@builtin(local_invocation_id) lid: vec3<u32>, @builtin(workgroup_id) wid: vec3<u32>) {
    let tid = lid.x;
    let trial = wid.x;
    let base = trial * (2u + 2u * p.depth);
    var len = 1u;
    var draw = 0u;
    if (tid == 0u) {
        cur_sh = 0u;
        done_sh = 0u;
        acc_out[base + 2u] = 0u;
        acc_out[base + 2u + p.depth] = acc_toks[0];
    }
    loop {
        let cur = workgroupUniformLoad(&cur_sh);
        let row = cur * p.vocab;
        // k rounds of a workgroup argmax, each excluding the ids already taken.
        var last_v = 3.0e38;
        var last_i = NONE;
        for (var r = 0u; r < p.k; r++) {
            var bv = NEG;
            var bi = NONE;
            for (var j = tid; j < p.vocab; j += 256u) {
                let v = acc_logits[row + j];
                let after = r == 0u || v < last_v || (v == last_v && j > last_i);
                if (v == v && after && better(v, j, bv, bi)) { bv = v; bi = j; }
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
            if (tid == 0u) { cand_i[r] = last_i; cand_p[r] = last_v; }
            workgroupBarrier();
        }
        if (tid == 0u) {
            // Softmax at the temperature, then the nucleus: the smallest prefix
            // whose mass reaches top_p, renormalised.
            let t = max(p.temperature, 1e-6);
            let top = cand_p[0];
            var z = 0.0;
            var kk = 0u;
            for (var r = 0u; r < p.k; r++) {
                if (cand_i[r] == NONE) { break; }
                cand_p[r] = exp((cand_p[r] - top) / t);
                z += cand_p[r];
                kk++;
            }
            var keep = kk;
            var acc = 0.0;
            for (var r = 0u; r < kk; r++) {
                cand_p[r] /= z;
                acc += cand_p[r];
                if (acc >= p.top_p) { keep = r + 1u; break; }
            }
            var mass = 0.0;
            for (var r = 0u; r < keep; r++) { mass += cand_p[r]; }
            for (var r = keep; r < 64u; r++) { cand_p[r] = 0.0; }
            var next = NONE;
            var c = links[cur];
            while (c != NONE) {
                let x = acc_toks[c];
                var px = 0.0;
                var at = 0u;
                for (var r = 0u; r < keep; r++) {
                    if (cand_i[r] == x) { px = cand_p[r]; at = r; }
                }
                if (px > 0.0) {
                    let u = uniform01(trial, draw);
                    draw++;
                    if (u * mass < px) { next = c; break; }
                    mass -= px;
                    cand_p[at] = 0.0;
                }
                c = links[p.n + c];
            }
            if (next != NONE && len < p.depth) {
                acc_out[base + 2u + len] = next;
                acc_out[base + 2u + p.depth + len] = acc_toks[next];
                len++;
                cur_sh = next;
            } else {
                // Bonus token from the residual; the last kept candidate if
                // rounding leaves u past the end.
                var u = uniform01(trial, draw) * mass;
                draw++;
                var pick = NONE;
                for (var r = 0u; r < keep; r++) {
                    if (cand_p[r] > 0.0) {
                        pick = cand_i[r];
                        if (u < cand_p[r]) { break; }
                        u -= cand_p[r];
                    }
                }
                acc_out[base] = len;
                acc_out[base + 1u] = select(cand_i[0], pick, pick != NONE);
                done_sh = 1u;
            }
        }
        if (workgroupUniformLoad(&done_sh) == 1u) { break; }
    }
}
