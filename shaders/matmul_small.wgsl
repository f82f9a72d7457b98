// y[m, n_offset + n] = sum_k x[m, k] * W[n, k] for 1..=16 rows of x (decode GEMV and
// speculative verification). W is f16 in Hugging Face [out, in] layout, read as packed
// u32 pairs so adapters without SHADER_F16 work. One workgroup owns ROWS weight rows:
// every thread walks K with a stride of the workgroup size (contiguous loads across
// threads), keeps M x ROWS partial sums in registers, and a single barrier-reduction
// at the end combines them (barriers are expensive on CPU drivers). Every kernel
// takes lib/prologue.wgsl's RMSNorm and lib/epilogue.wgsl's epilogues.
struct Params { m: u32, k4: u32, rows: u32, n_offset: u32, y_stride: u32, _p0: u32, _p1: u32, _p2: u32 }
@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> x: array<vec4<f32>>;   // [M, K/4]
@group(0) @binding(2) var<storage, read> w: array<vec2<u32>>;   // [rows, K/4] (4 halves each)
@group(0) @binding(3) var<storage, read_write> y: array<f32>;   // [M, y_stride]
@group(0) @binding(4) var<storage, read> g: array<vec2<u32>>;   // the norm's weight [K/4] (NORM)

// The norm's weight for x's column vec4 j (ones without the norm).
fn gw(j: u32) -> vec4<f32> {
    if (NORM != 0u) { return f16x4(g[j]); }
    return vec4<f32>(1.0);
}

@group(0) @binding(5) var<storage, read_write> y2: array<f32>;  // the second part's outputs (OUT_B)
@group(0) @binding(6) var<storage, read_write> y3: array<f32>;  // the third part's

// Stores output s (element i of y_stride-wide rows) through the pipeline's
// epilogue, or into its part's tensor (parts take no epilogue).
fn store_y(i: u32, s: f32) {
    let r = route(i, p.y_stride);
    if (r.x == 1u) {
        y2[r.y] = s;
        return;
    }
    if (r.x == 2u) {
        y3[r.y] = s;
        return;
    }
    var old = 0.0;
    if (epilogue_reads()) { old = y[r.y]; }
    y[r.y] = epilogue(s, old);
}

const WG: u32 = 64u;
const MAX_ACC: u32 = 64u;       // M * ROWS, plus M with the norm, must not exceed this (checked on the host)
override ROWS: u32 = 4u;         // weight rows per workgroup, at most 16

var<workgroup> red: array<f32, 4096>;  // WG * MAX_ACC

@compute @workgroup_size(64)
fn matmul_small(@builtin(local_invocation_id) lid: vec3<u32>, @builtin(workgroup_id) wid: vec3<u32>,
                @builtin(num_workgroups) nwg: vec3<u32>) {
    let tid = lid.x;
    let row0 = (wid.y * nwg.x + wid.x) * ROWS;
    if (row0 >= p.rows) { return; }   // uniform per workgroup
    var acc: array<f32, 64>;
    for (var i = 0u; i < MAX_ACC; i++) { acc[i] = 0.0; }
    let n_out = p.m * ROWS;
    var wr: array<vec4<f32>, 16>;
    for (var j = tid; j < p.k4; j += WG) {
        for (var r = 0u; r < ROWS; r++) {
            let row = min(row0 + r, p.rows - 1u);
            let q = w[row * p.k4 + j];
            wr[r] = vec4<f32>(unpack2x16float(q.x), unpack2x16float(q.y));
        }
        let gv = gw(j);
        for (var m = 0u; m < p.m; m++) {
            let raw = x[m * p.k4 + j];
            // The norm's sums of squares ride in the slots after the outputs.
            if (NORM != 0u) { acc[n_out + m] += dot(raw, raw); }
            let xv = raw * gv;
            for (var r = 0u; r < ROWS; r++) {
                acc[m * ROWS + r] += dot(xv, wr[r]);
            }
        }
    }
    var n_red = n_out;
    if (NORM != 0u) { n_red += p.m; }
    for (var o = 0u; o < n_red; o++) { red[o * WG + tid] = acc[o]; }
    workgroupBarrier();
    // Each of the first M*ROWS threads sums one output over the workgroup.
    if (tid < n_out) {
        var s = 0.0;
        for (var t = 0u; t < WG; t++) { s += red[tid * WG + t]; }
        let m = tid / ROWS;
        let r = tid % ROWS;
        if (NORM != 0u) {
            var q = 0.0;
            for (var t = 0u; t < WG; t++) { q += red[(n_out + m) * WG + t]; }
            s *= norm_scale(q, 4u * p.k4);
        }
        if (row0 + r < p.rows) {
            store_y(m * p.y_stride + p.n_offset + row0 + r, s);
        }
    }
}

// Variant without workgroup memory or barriers for CPU drivers (lavapipe, llvmpipe),
// where a barrier costs a coroutine switch per workgroup: each thread owns 4 weight
// rows and all M (<= 16) rows of x and walks the whole K. Uncoalesced on real GPUs,
// so the tuning picks it only for CPU adapters.
override ROWS_WG: u32 = 64u;   // threads per workgroup: small for small matrices, so every core gets work

// Stores y[m, n0 .. n0 + 4] = acc[m] for every row of x, scaled by the norm.
fn store_acc(n0: u32, acc: array<vec4<f32>, 16>, ss: array<f32, 16>) {
    for (var m = 0u; m < p.m; m++) {
        let base = m * p.y_stride + p.n_offset + n0;
        let sc = norm_scale(ss[m], 4u * p.k4);
        for (var jj = 0u; jj < 4u; jj++) {
            if (n0 + jj < p.rows) { store_y(base + jj, acc[m][jj] * sc); }
        }
    }
}

@compute @workgroup_size(ROWS_WG)
fn matmul_rows(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let t = gid.y * nwg.x * ROWS_WG + gid.x;
    let n0 = t * 4u;
    if (n0 >= p.rows) { return; }
    var acc: array<vec4<f32>, 16>;   // acc[m] = y[m, n0 .. n0 + 4]
    var ss: array<f32, 16>;          // the norm's sums of squares of x's rows
    for (var m = 0u; m < 16u; m++) {
        acc[m] = vec4<f32>(0.0);
        ss[m] = 0.0;
    }
    let r0 = min(n0, p.rows - 1u) * p.k4;
    let r1 = min(n0 + 1u, p.rows - 1u) * p.k4;
    let r2 = min(n0 + 2u, p.rows - 1u) * p.k4;
    let r3 = min(n0 + 3u, p.rows - 1u) * p.k4;
    for (var j = 0u; j < p.k4; j++) {
        let w0 = w[r0 + j];
        let w1 = w[r1 + j];
        let w2 = w[r2 + j];
        let w3 = w[r3 + j];
        let b0 = vec4<f32>(unpack2x16float(w0.x), unpack2x16float(w0.y));
        let b1 = vec4<f32>(unpack2x16float(w1.x), unpack2x16float(w1.y));
        let b2 = vec4<f32>(unpack2x16float(w2.x), unpack2x16float(w2.y));
        let b3 = vec4<f32>(unpack2x16float(w3.x), unpack2x16float(w3.y));
        let gv = gw(j);
        for (var m = 0u; m < p.m; m++) {
            let raw = x[m * p.k4 + j];
            if (NORM != 0u) { ss[m] += dot(raw, raw); }
            let a = raw * gv;
            acc[m] += vec4<f32>(dot(a, b0), dot(a, b1), dot(a, b2), dot(a, b3));
        }
    }
    store_acc(n0, acc, ss);
}

// matmul_rows with 8 halves per load (K a multiple of 8): half the loop trips and
// wider loads per lane.
@group(0) @binding(2) var<storage, read> w8: array<vec4<u32>>;   // [rows, K/8]

@compute @workgroup_size(ROWS_WG)
fn matmul_rows8(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let t = gid.y * nwg.x * ROWS_WG + gid.x;
    let n0 = t * 4u;
    if (n0 >= p.rows) { return; }
    let k8 = p.k4 / 2u;
    var acc: array<vec4<f32>, 16>;
    var ss: array<f32, 16>;
    for (var m = 0u; m < 16u; m++) {
        acc[m] = vec4<f32>(0.0);
        ss[m] = 0.0;
    }
    let r0 = min(n0, p.rows - 1u) * k8;
    let r1 = min(n0 + 1u, p.rows - 1u) * k8;
    let r2 = min(n0 + 2u, p.rows - 1u) * k8;
    let r3 = min(n0 + 3u, p.rows - 1u) * k8;
    for (var j = 0u; j < k8; j++) {
        let w0 = w8[r0 + j];
        let w1 = w8[r1 + j];
        let w2 = w8[r2 + j];
        let w3 = w8[r3 + j];
        let a0 = vec4<f32>(unpack2x16float(w0.x), unpack2x16float(w0.y));
        let b0 = vec4<f32>(unpack2x16float(w0.z), unpack2x16float(w0.w));
        let a1 = vec4<f32>(unpack2x16float(w1.x), unpack2x16float(w1.y));
        let b1 = vec4<f32>(unpack2x16float(w1.z), unpack2x16float(w1.w));
        let a2 = vec4<f32>(unpack2x16float(w2.x), unpack2x16float(w2.y));
        let b2 = vec4<f32>(unpack2x16float(w2.z), unpack2x16float(w2.w));
        let a3 = vec4<f32>(unpack2x16float(w3.x), unpack2x16float(w3.y));
        let b3 = vec4<f32>(unpack2x16float(w3.z), unpack2x16float(w3.w));
        let ga = gw(2u * j);
        let gb = gw(2u * j + 1u);
        for (var m = 0u; m < p.m; m++) {
            var xa = x[m * p.k4 + 2u * j];
            var xb = x[m * p.k4 + 2u * j + 1u];
            if (NORM != 0u) { ss[m] += dot(xa, xa) + dot(xb, xb); }
            xa *= ga;
            xb *= gb;
            acc[m] += vec4<f32>(dot(xa, a0) + dot(xb, b0), dot(xa, a1) + dot(xb, b1),
                                dot(xa, a2) + dot(xb, b2), dot(xa, a3) + dot(xb, b3));
        }
    }
    store_acc(n0, acc, ss);
}
