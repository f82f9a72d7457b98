// Sampling support: repetition penalty on the logits of given tokens, top-k
// selection (a sampling step reads back k candidates instead of the
// vocabulary), and the pick from those candidates with the host's draw, so a
// sampled step can leave its token on the device as a greedy one does.
struct Params { cols: u32, n: u32, penalty: f32, k: u32 }
@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read_write> logits: array<f32>;   // one row [cols]
@group(0) @binding(2) var<storage, read> ids: array<u32>;            // distinct token ids

// HF's repetition penalty: positive logits divided, negative multiplied.
@compute @workgroup_size(64)
fn penalize(@builtin(global_invocation_id) gid: vec3<u32>) {
    let i = gid.x;
    if (i >= p.n) { return; }
    let t = ids[i];
    if (t >= p.cols) { return; }
    let l = logits[t];
    logits[t] = select(l * p.penalty, l / p.penalty, l > 0.0);
}

@group(0) @binding(2) var<storage, read_write> out_vals: array<f32>;  // [k]
@group(0) @binding(3) var<storage, read_write> out_ids: array<u32>;   // [k]

var<workgroup> best_v: array<f32, 256>;
var<workgroup> best_i: array<u32, 256>;

// Values that reach the bound, ranked in workgroup memory (10 KiB with the
// above: within WebGPU's 16 KiB).
const CAP: u32 = 1024u;
var<workgroup> sel_v: array<f32, CAP>;
var<workgroup> sel_i: array<u32, CAP>;
var<workgroup> n_sel: atomic<u32>;
var<workgroup> n_found: u32;
var<workgroup> bound: f32;

// The top k of row 0 (descending, ties to the lower index; NaN never taken;
// slots past the valid values get (NEG, 0xffffffff)). Each thread finds the
// best of its stride; the k-th best of those 256 is a lower bound of the
// k-th best value (k values from different threads reach it), so one more
// pass collects every value reaching it, and each such value's rank among
// them is its slot. Two passes and four barriers instead of k argmax rounds;
// when more than CAP values reach the bound (a flat or tied row) the rounds
// run instead.
@compute @workgroup_size(256)
fn top_k(@builtin(local_invocation_id) lid: vec3<u32>) {
    let t = lid.x;
    var bv = NEG;
    var bi = 0xffffffffu;
    for (var j = t; j < p.cols; j += 256u) {
        let v = logits[j];
        if (v == v && better(v, j, bv, bi)) { bv = v; bi = j; }
    }
    best_v[t] = bv;
    best_i[t] = bi;
    if (t == 0u) {
        atomicStore(&n_sel, 0u);
        // Fewer than k threads with a value: every value is a candidate.
        bound = NEG;
    }
    workgroupBarrier();
    var rank = 0u;
    for (var j = 0u; j < 256u; j++) {
        if (better(best_v[j], best_i[j], bv, bi)) { rank++; }
    }
    if (rank == p.k - 1u && bi != 0xffffffffu) { bound = bv; }
    workgroupBarrier();
    let b = bound;
    for (var j = t; j < p.cols; j += 256u) {
        let v = logits[j];
        if (v == v && v >= b) {
            let s = atomicAdd(&n_sel, 1u);
            if (s < CAP) {
                sel_v[s] = v;
                sel_i[s] = j;
            }
        }
    }
    workgroupBarrier();
    if (t == 0u) { n_found = atomicLoad(&n_sel); }
    let n = workgroupUniformLoad(&n_found);
    if (n > CAP) {
        top_k_rounds(t);
        return;
    }
    for (var s = t; s < n; s += 256u) {
        let v = sel_v[s];
        let i = sel_i[s];
        var r = 0u;
        for (var j = 0u; j < n; j++) {
            if (better(sel_v[j], sel_i[j], v, i)) { r++; }
        }
        if (r < p.k) {
            out_vals[r] = v;
            out_ids[r] = i;
        }
    }
    for (var r = n + t; r < p.k; r += 256u) {
        out_vals[r] = NEG;
        out_ids[r] = 0xffffffffu;
    }
}

// k rounds of a workgroup argmax; each round excludes the ids already taken
// (v < last value, or equal value with a larger index), so ties resolve by index
// like the reference, and the logits are not modified.
fn top_k_rounds(t: u32) {
    var last_v = 3.0e38;
    var last_i = 0xffffffffu;
    var started = false;
    for (var r = 0u; r < p.k; r++) {
        var bv = NEG;
        var bi = 0xffffffffu;
        for (var j = t; j < p.cols; j += 256u) {
            let v = logits[j];
            let after_last = !started || v < last_v || (v == last_v && j > last_i);
            if (v == v && after_last && better(v, j, bv, bi)) { bv = v; bi = j; }
        }
        best_v[t] = bv;
        best_i[t] = bi;
        workgroupBarrier();
        for (var s = 128u; s > 0u; s >>= 1u) {
            if (t < s && better(best_v[t + s], best_i[t + s], best_v[t], best_i[t])) {
                best_v[t] = best_v[t + s];
                best_i[t] = best_i[t + s];
            }
            workgroupBarrier();
        }
        last_v = best_v[0];
        last_i = best_i[0];
        started = true;
        if (t == 0u) {
            out_vals[r] = last_v;
            out_ids[r] = last_i;
        }
        workgroupBarrier();
    }
}

struct PickParams { k: u32, temperature: f32, top_p: f32, u: f32 }
@group(0) @binding(0) var<uniform> q: PickParams;
@group(0) @binding(1) var<storage, read> cand_vals: array<f32>;   // top_k's output
@group(0) @binding(2) var<storage, read> cand_ids: array<u32>;
@group(0) @binding(3) var<storage, read_write> picked: array<u32>;  // [1]

fn cand_p(i: u32, top: f32, t: f32, z: f32) -> f32 { return exp((cand_vals[i] - top) / t) / z; }

// sampling.rs's `pick` on the device, one thread: softmax at the temperature
// over the candidates, the nucleus (the shortest prefix reaching top_p), then
// the first candidate whose cumulative probability passes u times the
// nucleus's mass. The token stays on the device for the next step's
// embedding; no candidates (every logit NaN) writes an id past any vocabulary.
@compute @workgroup_size(1)
fn pick() {
    var n = 0u;
    while (n < q.k && cand_ids[n] != 0xffffffffu) { n++; }
    if (n == 0u) {
        picked[0] = 0xffffffffu;
        return;
    }
    let t = max(q.temperature, 1e-6);
    let top = cand_vals[0];
    var z = 0.0;
    for (var i = 0u; i < n; i++) { z += cand_p(i, top, t, 1.0); }
    var keep = n;
    var mass = 0.0;
    for (var i = 0u; i < n; i++) {
        mass += cand_p(i, top, t, z);
        if (mass >= q.top_p) {
            keep = i + 1u;
            break;
        }
    }
    var u = q.u * mass;
    for (var i = 0u; i < keep; i++) {
        let pr = cand_p(i, top, t, z);
        if (u < pr) {
            picked[0] = cand_ids[i];
            return;
        }
        u -= pr;
    }
    picked[0] = cand_ids[keep - 1u];
}
