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

override ROWS: u32 = 4u;         // weight rows per workgroup, at most 16

@compute @workgroup_size(64)
fn matmul_small(@builtin(local_invocation_id) lid: vec3<u32>, @builtin(workgroup_id) wid: vec3<u32>,
                @builtin(num_workgroups) nwg: vec3<u32>) {
    let tid = lid.x;
    let wg = wid.y * nwg.x + wid.x;
    let per = outs_per_group(ROWS);
    if (wg * per >= out_count(p.rows)) { return; }   // uniform per workgroup
    var acc: array<f32, 64>;
    for (var i = 0u; i < MAX_ACC; i++) { acc[i] = 0.0; }
    let n_out = p.m * ROWS;
    var wr: array<vec4<f32>, 16>;
    for (var j = tid; j < p.k4; j += WG) {
        for (var r = 0u; r < ROWS; r++) {
            let row = slot_row(wg, r, ROWS, p.rows);
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
    coop_finish(tid, acc, p.m, ROWS, wg, p.rows, 4u * p.k4, p.n_offset, p.y_stride);
}

// Variant without workgroup memory or barriers for CPU drivers (lavapipe, llvmpipe),
// where a barrier costs a coroutine switch per workgroup: each thread owns 4 weight
// rows and all M (<= 16) rows of x and walks the whole K. Uncoalesced on real GPUs,
// so the tuning picks it only for CPU adapters.
override ROWS_WG: u32 = 64u;   // threads per workgroup: small for small matrices, so every core gets work

// Stores thread t's outputs (acc[m] scaled by the norm) for every row of x.
fn store_acc(t: u32, acc: array<vec4<f32>, 16>, ss: array<f32, 16>) {
    for (var m = 0u; m < p.m; m++) {
        let v = acc[m] * norm_scale(ss[m], 4u * p.k4);
        store_outs(m * p.y_stride + p.n_offset, t, v, p.rows, p.y_stride);
    }
}

@compute @workgroup_size(ROWS_WG)
fn matmul_rows(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let t = gid.y * nwg.x * ROWS_WG + gid.x;
    if (outs_per_thread() * t >= out_count(p.rows)) { return; }
    let rr = rows4(t, p.rows);
    var acc: array<vec4<f32>, 16>;   // acc[m]: row m of x against the rows rows4(t)
    var ss: array<f32, 16>;          // the norm's sums of squares of x's rows
    for (var m = 0u; m < 16u; m++) {
        acc[m] = vec4<f32>(0.0);
        ss[m] = 0.0;
    }
    let r0 = rr.x * p.k4;
    let r1 = rr.y * p.k4;
    let r2 = rr.z * p.k4;
    let r3 = rr.w * p.k4;
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
    store_acc(t, acc, ss);
}

// matmul_rows with 8 halves per load (K a multiple of 8): half the loop trips and
// wider loads per lane.
@group(0) @binding(2) var<storage, read> w8: array<vec4<u32>>;   // [rows, K/8]

@compute @workgroup_size(ROWS_WG)
fn matmul_rows8(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let t = gid.y * nwg.x * ROWS_WG + gid.x;
    if (outs_per_thread() * t >= out_count(p.rows)) { return; }
    let rr = rows4(t, p.rows);
    let k8 = p.k4 / 2u;
    var acc: array<vec4<f32>, 16>;
    var ss: array<f32, 16>;
    for (var m = 0u; m < 16u; m++) {
        acc[m] = vec4<f32>(0.0);
        ss[m] = 0.0;
    }
    let r0 = rr.x * k8;
    let r1 = rr.y * k8;
    let r2 = rr.z * k8;
    let r3 = rr.w * k8;
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
    store_acc(t, acc, ss);
}
