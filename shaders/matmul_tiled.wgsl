// y[m, n_offset + n] = sum_k x[m, k] * W[n, k] for many rows (prefill).
// Register tiling without workgroup memory: each thread computes a 4x4 block of y,
// reading 4 rows of x and 4 rows of W per k-step of 4. On CPU drivers this beats
// shared-memory tiling (barriers dominate there); WG_X/WG_Y are override constants.
// Takes lib/prologue.wgsl's RMSNorm and lib/epilogue.wgsl's epilogues.
struct Params { m: u32, k4: u32, rows: u32, n_offset: u32, y_stride: u32, _p0: u32, _p1: u32, _p2: u32 }
@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> x: array<vec4<f32>>;   // [M, K/4]
@group(0) @binding(2) var<storage, read> w: array<vec2<u32>>;   // [rows, K/4]
@group(0) @binding(3) var<storage, read_write> y: array<f32>;   // [M, y_stride]
@group(0) @binding(4) var<storage, read> g: array<vec2<u32>>;   // the norm's weight [K/4] (NORM)

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

override WG_X: u32 = 8u;
override WG_Y: u32 = 8u;

@compute @workgroup_size(WG_X, WG_Y)
fn matmul_tiled(@builtin(global_invocation_id) gid: vec3<u32>) {
    let n0 = gid.x * 4u;
    let m0 = gid.y * 4u;
    if (n0 >= p.rows || m0 >= p.m) { return; }
    var acc: array<vec4<f32>, 4>;   // acc[i][j] = y[m0 + i, n0 + j]
    for (var i = 0u; i < 4u; i++) { acc[i] = vec4<f32>(0.0); }
    var xr: array<u32, 4>;
    var wrow: array<u32, 4>;
    for (var i = 0u; i < 4u; i++) {
        xr[i] = min(m0 + i, p.m - 1u) * p.k4;
        wrow[i] = min(n0 + i, p.rows - 1u) * p.k4;
    }
    var ss = vec4<f32>(0.0);   // the norm's sums of squares of the 4 rows of x
    for (var j = 0u; j < p.k4; j++) {
        let w0 = w[wrow[0] + j];
        let w1 = w[wrow[1] + j];
        let w2 = w[wrow[2] + j];
        let w3 = w[wrow[3] + j];
        let b0 = vec4<f32>(unpack2x16float(w0.x), unpack2x16float(w0.y));
        let b1 = vec4<f32>(unpack2x16float(w1.x), unpack2x16float(w1.y));
        let b2 = vec4<f32>(unpack2x16float(w2.x), unpack2x16float(w2.y));
        let b3 = vec4<f32>(unpack2x16float(w3.x), unpack2x16float(w3.y));
        var gv = vec4<f32>(1.0);
        if (NORM != 0u) { gv = f16x4(g[j]); }
        for (var i = 0u; i < 4u; i++) {
            var a = x[xr[i] + j];
            if (NORM != 0u) { ss[i] += dot(a, a); }
            a *= gv;
            acc[i] += vec4<f32>(dot(a, b0), dot(a, b1), dot(a, b2), dot(a, b3));
        }
    }
    for (var i = 0u; i < 4u; i++) {
        let m = m0 + i;
        if (m < p.m) {
            let base = m * p.y_stride + p.n_offset + n0;
            let sc = norm_scale(ss[i], 4u * p.k4);
            for (var jj = 0u; jj < 4u; jj++) {
                if (n0 + jj < p.rows) { store_y(base + jj, acc[i][jj] * sc); }
            }
        }
    }
}
