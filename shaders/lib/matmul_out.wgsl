// lib/matmul_out.wgsl: where the matmul kernels (f16 and quantized) put their
// results: y (binding 3) and, for a stacked weight's parts, y2 and y3
// (bindings 5, 6), through lib/epilogue.wgsl's epilogues and routing; and the
// end of their cooperative kernels (one reduction of every thread's partial
// sums over the workgroup).
@group(0) @binding(3) var<storage, read_write> y: array<f32>;   // [M, width]
@group(0) @binding(5) var<storage, read_write> y2: array<f32>;  // the second part's outputs (OUT_B)
@group(0) @binding(6) var<storage, read_write> y3: array<f32>;  // the third part's

// Stores output s, element i of rows `width` wide, through the pipeline's
// epilogue, or into its part's tensor (parts take no epilogue).
fn store_y(i: u32, s: f32, width: u32) {
    let r = route(i, width);
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

// Stores thread t's outputs for one row of x (a per-thread or tiled kernel;
// lib/epilogue.wgsl's rows4(t) were its 4 weight rows, v their sums) from
// element base of rows `width` wide; `rows` weight rows.
fn store_outs(base: u32, t: u32, v: vec4<f32>, rows: u32, width: u32) {
    let k = outs_per_thread();
    for (var jj = 0u; jj < k; jj++) {
        if (k * t + jj < out_count(rows)) { store_y(base + k * t + jj, out_value(v, jj), width); }
    }
}

const WG: u32 = 64u;        // threads of a cooperative workgroup
const MAX_ACC: u32 = 64u;   // partial sums a thread keeps: M * ROWS, plus M with the norm (checked on the host)
var<workgroup> red: array<f32, 4096>;   // WG * MAX_ACC

// The end of a cooperative kernel: thread tid's partial sums acc (m rows of x
// times `slots` weight-row slots, then with the norm m sums of squares of x's
// rows over k values) reduced over the workgroup; the first m * slots threads
// each store one output of workgroup wg (`rows` weight rows from column
// n_offset of rows `width` wide).
fn coop_finish(tid: u32, acc: array<f32, 64>, m: u32, slots: u32, wg: u32, rows: u32, k: u32,
               n_offset: u32, width: u32) {
    let n_out = m * slots;
    var n_red = n_out;
    if (NORM != 0u) { n_red += m; }
    for (var o = 0u; o < n_red; o++) { red[o * WG + tid] = acc[o]; }
    workgroupBarrier();
    let per = outs_per_group(slots);
    let r = tid % slots;
    if (tid >= n_out || r >= per) { return; }
    let mi = tid / slots;
    var s = 0.0;
    var q = 0.0;
    var u = 0.0;
    for (var t = 0u; t < WG; t++) {
        s += red[tid * WG + t];
        if (NORM != 0u) { q += red[(n_out + mi) * WG + t]; }
        if (EPILOGUE == 3u) { u += red[(tid + per) * WG + t]; }
    }
    let sc = norm_scale(q, k);
    var v = s * sc;
    if (EPILOGUE == 3u) { v = silu_mul(v, u * sc); }
    let j = wg * per + r;
    if (j < out_count(rows)) { store_y(mi * width + n_offset + j, v, width); }
}
