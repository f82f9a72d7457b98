// y[r, :] = x[r, :] / sqrt(mean(x[r, :]^2) + eps) * w, one workgroup per row.
struct Params { rows: u32, cols: u32, eps: f32, _p0: u32 }
@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> x: array<f32>;
@group(0) @binding(2) var<storage, read> w: array<u32>;      // f16 weight, packed pairs
@group(0) @binding(3) var<storage, read_write> y: array<f32>;

var<workgroup> red: array<f32, 64>;

fn weight_at(i: u32) -> f32 {
    let pair = unpack2x16float(w[i / 2u]);
    return select(pair.x, pair.y, (i & 1u) == 1u);
}

@compute @workgroup_size(64)
fn rmsnorm(@builtin(local_invocation_id) lid: vec3<u32>, @builtin(workgroup_id) wid: vec3<u32>,
           @builtin(num_workgroups) nwg: vec3<u32>) {
    let row = wid.y * nwg.x + wid.x;
    if (row >= p.rows) { return; }
    let base = row * p.cols;
    var s = 0.0;
    for (var i = lid.x; i < p.cols; i += 64u) {
        let v = x[base + i];
        s += v * v;
    }
    red[lid.x] = s;
    workgroupBarrier();
    for (var stride = 32u; stride > 0u; stride >>= 1u) {
        if (lid.x < stride) { red[lid.x] += red[lid.x + stride]; }
        workgroupBarrier();
    }
    let inv = inverseSqrt(red[0] / f32(p.cols) + p.eps);
    for (var i = lid.x; i < p.cols; i += 64u) {
        y[base + i] = x[base + i] * inv * weight_at(i);
    }
}
