// The RMSNorm before a matmul, folded into it (NORM = 1; 0 reads x as it is):
// the kernel dots x * g (g the norm's f16 weight, binding 4) with the weights,
// sums x^2 from the same loads of x, and scales each output by
// 1 / sqrt(mean(x^2) + NORM_EPS) at the end. The normed activations are never
// written: a dispatch and a pass over them saved for each norm.
override NORM: u32 = 0u;
override NORM_EPS: f32 = 0.0;
@group(0) @binding(4) var<storage, read> g: array<vec2<u32>>;   // the norm's weight [K/4] (x itself without the norm)

// Four f16 values packed in two words.
fn f16x4(q: vec2<u32>) -> vec4<f32> {
    return vec4<f32>(unpack2x16float(q.x), unpack2x16float(q.y));
}

// The norm's weight for x's column vec4 j (ones without the norm).
fn gw(j: u32) -> vec4<f32> {
    if (NORM != 0u) { return f16x4(g[j]); }
    return vec4<f32>(1.0);
}

// The norm's scale of an output row whose x row has sum of squares ss over k values.
fn norm_scale(ss: f32, k: u32) -> f32 {
    if (NORM != 0u) { return inverseSqrt(ss / f32(k) + NORM_EPS); }
    return 1.0;
}
