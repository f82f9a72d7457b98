// y[m, n_offset + n] = sum_k x[m, k] * W[n, k] for many rows (prefill).
// Register tiling without workgroup memory: each thread computes a 4x4 block of y,
// reading 4 rows of x and 4 rows of W per k-step of 4. On CPU drivers this beats
// shared-memory tiling (barriers dominate there); WG_X/WG_Y are override constants.
// Takes lib/prologue.wgsl's RMSNorm and lib/epilogue.wgsl's epilogues.
struct Params { m: u32, k4: u32, rows: u32, n_offset: u32, y_stride: u32, _p0: u32, _p1: u32, _p2: u32 }
@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> x: array<vec4<f32>>;   // [M, K/4]
@group(0) @binding(2) var<storage, read> w: array<vec2<u32>>;   // [rows, K/4]

override WG_X: u32 = 8u;
override WG_Y: u32 = 8u;

@compute @workgroup_size(WG_X, WG_Y)
fn matmul_tiled(@builtin(global_invocation_id) gid: vec3<u32>) {
    let t = gid.x;
    let m0 = gid.y * 4u;
    if (outs_per_thread() * t >= out_count(p.rows) || m0 >= p.m) { return; }
    let rr = rows4(t, p.rows);
    var acc: array<vec4<f32>, 4>;   // acc[i][j]: row m0 + i of x against weight row rr[j]
    for (var i = 0u; i < 4u; i++) { acc[i] = vec4<f32>(0.0); }
    var xr: array<u32, 4>;
    var wrow: array<u32, 4>;
    for (var i = 0u; i < 4u; i++) {
        xr[i] = min(m0 + i, p.m - 1u) * p.k4;
        wrow[i] = rr[i] * p.k4;
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
        let gv = gw(j);
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
            let v = acc[i] * norm_scale(ss[i], 4u * p.k4);
            store_outs(m * p.y_stride + p.n_offset, t, v, p.rows, p.y_stride);
        }
    }
}
