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
struct Params { n: u32, vocab: u32, _p0: u32, _p1: u32 }
@group(0) @binding(0) var<uniform> p: Params;

const NONE: u32 = 0xffffffffu;
const NEG: f32 = -3.0e38;

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

fn better(av: f32, ai: u32, bv: f32, bi: u32) -> bool {
    return av > bv || (av == bv && ai < bi);
}

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
