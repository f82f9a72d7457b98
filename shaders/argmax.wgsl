// Row-wise argmax over a vocabulary, one workgroup per row. Ties go to the lowest
// index and NaN never wins, so the GPU and the reference pick the same token.
struct Params { rows: u32, cols: u32, _p0: u32, _p1: u32 }
@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> x: array<f32>;
@group(0) @binding(2) var<storage, read_write> out: array<u32>;

var<workgroup> best_v: array<f32, 256>;
var<workgroup> best_i: array<u32, 256>;

@compute @workgroup_size(256)
fn argmax(@builtin(local_invocation_id) lid: vec3<u32>, @builtin(workgroup_id) wid: vec3<u32>) {
    let row = wid.x;
    if (row >= p.rows) { return; }
    var bv = NEG;
    var bi = 0xffffffffu;
    for (var j = lid.x; j < p.cols; j += 256u) {
        let v = x[row * p.cols + j];
        // v == v is false for NaN.
        if (v == v && better(v, j, bv, bi)) { bv = v; bi = j; }
    }
    best_v[lid.x] = bv;
    best_i[lid.x] = bi;
    workgroupBarrier();
    for (var s = 128u; s > 0u; s >>= 1u) {
        if (lid.x < s) {
            let ov = best_v[lid.x + s];
            let oi = best_i[lid.x + s];
            if (better(ov, oi, best_v[lid.x], best_i[lid.x])) {
                best_v[lid.x] = ov;
                best_i[lid.x] = oi;
            }
        }
        workgroupBarrier();
    }
    if (lid.x == 0u) { out[row] = select(best_i[0], 0u, best_i[0] == 0xffffffffu); }
}
