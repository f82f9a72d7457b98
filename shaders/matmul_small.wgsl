// y[m, n_offset + n] = sum_k x[m, k] * W[n, k] for 1..=16 rows of x (decode GEMV and
// speculative verification). W is f16 in Hugging Face [out, in] layout, read as packed
// u32 pairs so adapters without SHADER_F16 work. One workgroup owns ROWS weight rows:
// every thread walks K with a stride of the workgroup size (contiguous loads across
// threads), keeps M x ROWS partial sums in registers, and a single barrier-reduction
// at the end combines them (barriers are expensive on CPU drivers).
struct Params { m: u32, k4: u32, rows: u32, n_offset: u32, y_stride: u32, _p0: u32, _p1: u32, _p2: u32 }
@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> x: array<vec4<f32>>;   // [M, K/4]
@group(0) @binding(2) var<storage, read> w: array<vec2<u32>>;   // [rows, K/4] (4 halves each)
@group(0) @binding(3) var<storage, read_write> y: array<f32>;   // [M, y_stride]

// Stores output s at y[i] through the pipeline's epilogue.
fn store_y(i: u32, s: f32) {
    var old = 0.0;
    if (epilogue_reads()) { old = y[i]; }
    y[i] = epilogue(s, old);
}

const WG: u32 = 64u;
const MAX_ACC: u32 = 64u;       // M * ROWS must not exceed this (checked on the host)
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
    var wr: array<vec4<f32>, 16>;
    for (var j = tid; j < p.k4; j += WG) {
        for (var r = 0u; r < ROWS; r++) {
            let row = min(row0 + r, p.rows - 1u);
            let q = w[row * p.k4 + j];
            wr[r] = vec4<f32>(unpack2x16float(q.x), unpack2x16float(q.y));
        }
        for (var m = 0u; m < p.m; m++) {
            let xv = x[m * p.k4 + j];
            for (var r = 0u; r < ROWS; r++) {
                acc[m * ROWS + r] += dot(xv, wr[r]);
            }
        }
    }
    let n_out = p.m * ROWS;
    for (var o = 0u; o < n_out; o++) { red[o * WG + tid] = acc[o]; }
    workgroupBarrier();
    // Each of the first M*ROWS threads sums one output over the workgroup.
    if (tid < n_out) {
        var s = 0.0;
        for (var t = 0u; t < WG; t++) { s += red[tid * WG + t]; }
        let m = tid / ROWS;
        let r = tid % ROWS;
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

@compute @workgroup_size(ROWS_WG)
fn matmul_rows(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let t = gid.y * nwg.x * ROWS_WG + gid.x;
    let n0 = t * 4u;
    if (n0 >= p.rows) { return; }
    var acc: array<vec4<f32>, 16>;   // acc[m] = y[m, n0 .. n0 + 4]
    for (var m = 0u; m < 16u; m++) { acc[m] = vec4<f32>(0.0); }
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
        for (var m = 0u; m < p.m; m++) {
            let a = x[m * p.k4 + j];
            acc[m] += vec4<f32>(dot(a, b0), dot(a, b1), dot(a, b2), dot(a, b3));
        }
    }
    for (var m = 0u; m < p.m; m++) {
        let base = m * p.y_stride + p.n_offset + n0;
        for (var jj = 0u; jj < 4u; jj++) {
            if (n0 + jj < p.rows) { store_y(base + jj, acc[m][jj]); }
        }
    }
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
    for (var m = 0u; m < 16u; m++) { acc[m] = vec4<f32>(0.0); }
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
        for (var m = 0u; m < p.m; m++) {
            let xa = x[m * p.k4 + 2u * j];
            let xb = x[m * p.k4 + 2u * j + 1u];
            acc[m] += vec4<f32>(dot(xa, a0) + dot(xb, b0), dot(xa, a1) + dot(xb, b1),
                                dot(xa, a2) + dot(xb, b2), dot(xa, a3) + dot(xb, b3));
        }
    }
    for (var m = 0u; m < p.m; m++) {
        let base = m * p.y_stride + p.n_offset + n0;
        for (var jj = 0u; jj < 4u; jj++) {
            if (n0 + jj < p.rows) { store_y(base + jj, acc[m][jj]); }
        }
    }
}
