// Elementwise ops of the transformer block: SwiGLU, the residual add, bias add,
// and the row mean of a TokenSelect prefill sub-chunk.
// n: elements (swiglu, add, add_bias) or columns (mean_rows); cols: the row
// length (add_bias); row0, rows: the rows averaged (mean_rows).
struct Params { n: u32, cols: u32, row0: u32, rows: u32 }
@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read_write> a: array<f32>;   // gate (swiglu) or accumulator (add)
@group(0) @binding(2) var<storage, read> b: array<f32>;         // up (swiglu) or addend (add)

fn linear_id(gid: vec3<u32>, nwg: vec3<u32>) -> u32 {
    return gid.y * nwg.x * 64u + gid.x;
}

// a = silu(a) * b
@compute @workgroup_size(64)
fn swiglu(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = linear_id(gid, nwg);
    if (i >= p.n) { return; }
    let g = a[i];
    a[i] = g / (1.0 + exp(-g)) * b[i];
}

// a = a + b
@compute @workgroup_size(64)
fn add(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = linear_id(gid, nwg);
    if (i >= p.n) { return; }
    a[i] = a[i] + b[i];
}

// a[r, c] += bias[c] (Qwen2's q/k/v biases), bias f16 packed in pairs.
@group(0) @binding(2) var<storage, read> bias: array<u32>;

@compute @workgroup_size(64)
fn add_bias(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = linear_id(gid, nwg);
    if (i >= p.n) { return; }
    let c = i % p.cols;
    let pair = unpack2x16float(bias[c / 2u]);
    a[i] = a[i] + select(pair.x, pair.y, (c & 1u) == 1u);
}

// a[c] = mean over rows row0..row0 + rows of b[r, c] (TokenSelect's prefill
// fingerprint); n = columns.
@compute @workgroup_size(64)
fn mean_rows(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let c = linear_id(gid, nwg);
    if (c >= p.n) { return; }
    var acc = 0.0;
    for (var r = 0u; r < p.rows; r++) { acc += b[(p.row0 + r) * p.n + c]; }
    a[c] = acc / f32(p.rows);
}
