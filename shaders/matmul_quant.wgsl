// y[m, n_offset + n] = sum_k x[m, k] * W[n, k] with W quantized (lib/quant.wgsl's
// planes), dequantized in the kernel, 8 values at a time. Three paths as for f16
// weights: qmatmul_rows (CPU drivers, a thread per 4 weight rows, no barriers),
// qmatmul_small (1..=16 rows on GPUs: a workgroup per ROWS weight rows, threads
// striding over K, one reduction) and qmatmul_tiled (prefill: 4x4 register tiles,
// the weights dequantized into the tile). qmatmul_rows (32-value types) and
// qmatmul_rows_k (K types) serve M = 1 only, qmatmul_rows_m 2 or more rows.
// Every path takes lib/prologue.wgsl's RMSNorm and lib/epilogue.wgsl's epilogues.
struct Params { m: u32, k4: u32, rows: u32, n_offset: u32, y_stride: u32, qh_off: u32, sc_off: u32, ks_off: u32 }
@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> x: array<vec4<f32>>;   // [M, K/4]
@group(0) @binding(2) var<storage, read> w: array<vec4<u32>>;   // planes of one row chunk (16-byte padded)

override QTYPE: u32 = 1u;

fn q_load(i: u32) -> u32 { return w[i / 4u][i % 4u]; }

fn planes() -> vec3<u32> { return vec3<u32>(p.qh_off, p.sc_off, p.ks_off); }

// Group gi (values 8gi..8gi+7) of weight row `row`.
fn wgroup(row: u32, gi: u32) -> W8 {
    return q_group(QTYPE, row * (4u * p.k4 / q_block(QTYPE)), gi, planes());
}

fn dot8(m: u32, gi: u32, v: W8) -> f32 {
    return dot(x[m * p.k4 + 2u * gi] * gw(2u * gi), v.lo) + dot(x[m * p.k4 + 2u * gi + 1u] * gw(2u * gi + 1u), v.hi);
}

override ROWS_WG: u32 = 64u;

// One row of x (decode on CPU drivers), 32-value types: a block at a time, the
// block's x values and their sum loaded once for 4 weight rows, each row's
// scale applied once per block (d * sum(q x) + c * sum(x)).
@compute @workgroup_size(ROWS_WG)
fn qmatmul_rows(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let t = gid.y * nwg.x * ROWS_WG + gid.x;
    if (outs_per_thread() * t >= out_count(p.rows)) { return; }
    let r = rows4(t, p.rows);
    let nb = p.k4 / 8u;
    let o = planes();
    var acc = vec4<f32>(0.0);
    var ss = 0.0;
    var xs: array<vec4<f32>, 8>;
    for (var b = 0u; b < nb; b++) {
        var xsum = vec4<f32>(0.0);
        for (var j = 0u; j < 8u; j++) {
            let v = x[8u * b + j];
            if (NORM != 0u) { ss += dot(v, v); }
            xs[j] = v * gw(8u * b + j);
            xsum += xs[j];
        }
        let sx = xsum.x + xsum.y + xsum.z + xsum.w;
        for (var i = 0u; i < 4u; i++) {
            let rb = r[i] * nb + b;
            // The block's values in 16-byte loads (a quarter of the loads of
            // q_values' word at a time; measured 10-20 % faster on lavapipe).
            var dq = 0.0;
            if (QTYPE == Q_8_0) {
                let qa = w[2u * rb];
                let qb = w[2u * rb + 1u];
                let q = array<u32, 8>(qa.x, qa.y, qa.z, qa.w, qb.x, qb.y, qb.z, qb.w);
                for (var g = 0u; g < 4u; g++) {
                    dq += dot(xs[2u * g], q_i8x4(q[2u * g])) + dot(xs[2u * g + 1u], q_i8x4(q[2u * g + 1u]));
                }
            } else {
                let qv = w[rb];
                var qh = 0u;
                if (QTYPE == Q_5_0 || QTYPE == Q_5_1) { qh = q_load(o.x + rb); }
                for (var g = 0u; g < 4u; g++) {
                    var v = q_nibbles(qv[g]);
                    if (QTYPE == Q_5_0 || QTYPE == Q_5_1) {
                        let h = q_bits16(qh >> (8u * g));
                        v.lo += h.lo;
                        v.hi += h.hi;
                    }
                    dq += dot(xs[2u * g], v.lo) + dot(xs[2u * g + 1u], v.hi);
                }
            }
            let s = q_scale(QTYPE, rb, o);
            acc[i] += s.x * dq + s.y * sx;
        }
    }
    store_outs(p.n_offset, t, acc * norm_scale(ss, 4u * p.k4), p.rows, p.y_stride);
}

// One row of x, K types: a 32-value sub-block at a time, its x values and
// their half sums loaded once for 4 weight rows (q_k_dot32).
@compute @workgroup_size(ROWS_WG)
fn qmatmul_rows_k(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let t = gid.y * nwg.x * ROWS_WG + gid.x;
    if (outs_per_thread() * t >= out_count(p.rows)) { return; }
    let r = rows4(t, p.rows);
    let nb = p.k4 / 64u;
    let o = planes();
    var acc = vec4<f32>(0.0);
    var ss = 0.0;
    var xs: array<vec4<f32>, 8>;
    for (var b = 0u; b < nb; b++) {
        for (var j = 0u; j < 8u; j++) {
            var s0 = vec4<f32>(0.0);
            var s1 = vec4<f32>(0.0);
            for (var i = 0u; i < 4u; i++) {
                let c = 64u * b + 8u * j + i;
                let va = x[c];
                let vb = x[c + 4u];
                if (NORM != 0u) { ss += dot(va, va) + dot(vb, vb); }
                xs[i] = va * gw(c);
                xs[i + 4u] = vb * gw(c + 4u);
                s0 += xs[i];
                s1 += xs[i + 4u];
            }
            let s16 = vec2<f32>(s0.x + s0.y + s0.z + s0.w, s1.x + s1.y + s1.z + s1.w);
            for (var i = 0u; i < 4u; i++) {
                let rb = r[i] * nb + b;
                acc[i] += q_k_dot32(QTYPE, rb, j, w[rb * 8u + j], xs, s16, o);
            }
        }
    }
    store_outs(p.n_offset, t, acc * norm_scale(ss, 4u * p.k4), p.rows, p.y_stride);
}

const MAX_M: u32 = 16u;   // rows of x of the per-thread kernels (checked on the host)

// Values of a Q8_0, Q4_0 or Q4_1 block rb in order, unscaled, in 16-byte loads (a quarter
// of q_values' loads; on lavapipe each lane's load is a gather).
fn block32(rb: u32, o: vec3<u32>) -> array<vec4<f32>, 8> {
    var v: array<vec4<f32>, 8>;
    if (QTYPE == Q_8_0) {
        let qa = w[2u * rb];
        let qb = w[2u * rb + 1u];
        v = array<vec4<f32>, 8>(q_i8x4(qa.x), q_i8x4(qa.y), q_i8x4(qa.z), q_i8x4(qa.w),
                                q_i8x4(qb.x), q_i8x4(qb.y), q_i8x4(qb.z), q_i8x4(qb.w));
    } else {
        let qv = w[rb];
        for (var g = 0u; g < 4u; g++) {
            let n = q_nibbles(qv[g]);
            v[2u * g] = n.lo;
            v[2u * g + 1u] = n.hi;
        }
    }
    return v;
}

fn dot16(a: array<vec4<f32>, 8>, b: array<vec4<f32>, 8>, h: u32) -> f32 {
    return dot(a[h], b[h]) + dot(a[h + 1u], b[h + 1u]) + dot(a[h + 2u], b[h + 2u]) + dot(a[h + 3u], b[h + 3u]);
}

// 32 x values of row m from vec4 index i (times the norm's weight), the sums
// of their two halves, and the sum of squares of the values as stored.
struct X32 { v: array<vec4<f32>, 8>, s: vec2<f32>, q: f32 }

fn x32(m: u32, i: u32) -> X32 {
    var r: X32;
    var s0 = vec4<f32>(0.0);
    var s1 = vec4<f32>(0.0);
    r.q = 0.0;
    for (var j = 0u; j < 4u; j++) {
        let va = x[m * p.k4 + i + j];
        let vb = x[m * p.k4 + i + j + 4u];
        if (NORM != 0u) { r.q += dot(va, va) + dot(vb, vb); }
        r.v[j] = va * gw(i + j);
        r.v[j + 4u] = vb * gw(i + j + 4u);
        s0 += r.v[j];
        s1 += r.v[j + 4u];
    }
    r.s = vec2<f32>(s0.x + s0.y + s0.z + s0.w, s1.x + s1.y + s1.z + s1.w);
    return r;
}


// 2 or more rows of x on CPU drivers (speculative verification, prefill), Q8_0,
// Q4_0 and Q4_1: a thread per 4 weight rows and MAX_M rows of x, each block of
// weights decoded once and dotted with every row of x (the tiled kernel decodes
// it once per 4 rows).
// Measured on lavapipe at 2048x8192 against the tiled kernel: 1.35-1.5x faster
// at 2 rows, 1.2x at 16, within 15 % either way at 4 and 8. For Q5_* and K types
// this layout (values decoded into arrays) was slower, even for one row.
@compute @workgroup_size(ROWS_WG)
fn qmatmul_rows_m(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let t = gid.y * nwg.x * ROWS_WG + gid.x;
    if (outs_per_thread() * t >= out_count(p.rows)) { return; }
    // Prefill: the grid's z takes the rows of x in runs of MAX_M. The row
    // loops run to mc, bounded by MAX_M through min(), which lets lavapipe
    // unroll them and keep acc in registers: 2..16 rows ran 1.5-6x faster
    // than with p.m as the bound.
    let m0 = gid.z * MAX_M;
    let mc = min(MAX_M, p.m - m0);
    let r = rows4(t, p.rows);
    let nb = p.k4 / 8u;
    let o = planes();
    var acc: array<vec4<f32>, MAX_M>;
    var ss: array<f32, MAX_M>;
    for (var m = 0u; m < MAX_M; m++) {
        acc[m] = vec4<f32>(0.0);
        ss[m] = 0.0;
    }
    for (var b = 0u; b < nb; b++) {
        var wv: array<array<vec4<f32>, 8>, 4>;
        var sc: array<vec2<f32>, 4>;
        for (var i = 0u; i < 4u; i++) {
            let rb = r[i] * nb + b;
            wv[i] = block32(rb, o);
            sc[i] = q_scale(QTYPE, rb, o);
        }
        for (var m = 0u; m < mc; m++) {
            let xb = x32(m0 + m, 8u * b);
            ss[m] += xb.q;
            let sx = xb.s.x + xb.s.y;
            var d = vec4<f32>(0.0);
            for (var i = 0u; i < 4u; i++) {
                d[i] = sc[i].x * (dot16(xb.v, wv[i], 0u) + dot16(xb.v, wv[i], 4u)) + sc[i].y * sx;
            }
            acc[m] += d;
        }
    }
    for (var m = 0u; m < mc; m++) {
        store_outs((m0 + m) * p.y_stride + p.n_offset, t, acc[m] * norm_scale(ss[m], 4u * p.k4), p.rows, p.y_stride);
    }
}

override ROWS: u32 = 4u;

@compute @workgroup_size(64)
fn qmatmul_small(@builtin(local_invocation_id) lid: vec3<u32>, @builtin(workgroup_id) wid: vec3<u32>,
                 @builtin(num_workgroups) nwg: vec3<u32>) {
    let tid = lid.x;
    let wg = wid.y * nwg.x + wid.x;
    let per = outs_per_group(ROWS);
    if (wg * per >= out_count(p.rows)) { return; }   // uniform per workgroup
    var acc: array<f32, 64>;
    for (var i = 0u; i < MAX_ACC; i++) { acc[i] = 0.0; }
    let n_out = p.m * ROWS;
    let groups = p.k4 / 2u;
    for (var gi = tid; gi < groups; gi += WG) {
        for (var r = 0u; r < ROWS; r++) {
            let v = wgroup(slot_row(wg, r, ROWS, p.rows), gi);
            for (var m = 0u; m < p.m; m++) { acc[m * ROWS + r] += dot8(m, gi, v); }
        }
        // The norm's sums of squares ride in the slots after the outputs.
        if (NORM != 0u) {
            for (var m = 0u; m < p.m; m++) {
                let va = x[m * p.k4 + 2u * gi];
                let vb = x[m * p.k4 + 2u * gi + 1u];
                acc[n_out + m] += dot(va, va) + dot(vb, vb);
            }
        }
    }
    coop_finish(tid, acc, p.m, ROWS, wg, p.rows, 4u * p.k4, p.n_offset, p.y_stride);
}

override WG_X: u32 = 8u;
override WG_Y: u32 = 8u;

@compute @workgroup_size(WG_X, WG_Y)
fn qmatmul_tiled(@builtin(global_invocation_id) gid: vec3<u32>) {
    let t = gid.x;
    let m0 = gid.y * 4u;
    if (outs_per_thread() * t >= out_count(p.rows) || m0 >= p.m) { return; }
    var acc: array<vec4<f32>, 4>;
    for (var i = 0u; i < 4u; i++) { acc[i] = vec4<f32>(0.0); }
    let r = rows4(t, p.rows);
    var xr: array<u32, 4>;
    for (var i = 0u; i < 4u; i++) { xr[i] = min(m0 + i, p.m - 1u) * p.k4; }
    var ss = vec4<f32>(0.0);
    let groups = p.k4 / 2u;
    for (var gi = 0u; gi < groups; gi++) {
        let w0 = wgroup(r.x, gi);
        let w1 = wgroup(r.y, gi);
        let w2 = wgroup(r.z, gi);
        let w3 = wgroup(r.w, gi);
        let ga = gw(2u * gi);
        let gb = gw(2u * gi + 1u);
        for (var i = 0u; i < 4u; i++) {
            var xa = x[xr[i] + 2u * gi];
            var xb = x[xr[i] + 2u * gi + 1u];
            if (NORM != 0u) { ss[i] += dot(xa, xa) + dot(xb, xb); }
            xa *= ga;
            xb *= gb;
            acc[i] += vec4<f32>(dot(xa, w0.lo) + dot(xb, w0.hi), dot(xa, w1.lo) + dot(xb, w1.hi),
                                dot(xa, w2.lo) + dot(xb, w2.hi), dot(xa, w3.lo) + dot(xb, w3.hi));
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
