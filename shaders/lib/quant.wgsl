// Quantized weights: GGUF's block types, repacked bit-exactly at load into
// aligned u32 planes of one buffer per matrix chunk (kernels/quant.rs), so WGSL
// reads them without 8- or 16-bit loads. A kernel that composes this file
// defines `fn q_load(i: u32) -> u32` (a word of its weight binding); the type is
// its QTYPE override, so the switches fold at pipeline creation. Planes, for a
// chunk of B blocks (o = the plane offsets (qh, sc, ks) in words):
//   qs at 0: 4-bit values 8 per word in order (ggml's nibble order undone);
//     Q8_0 4 i8 per word; Q6_K its low 4 bits, 8 per word.
//   qh at o.x: Q5_0/Q5_1 one word per block (bit e = value e's fifth bit, as
//     ggml stores it); Q5_K 8 words per block (word j bit l = value 32j + l's);
//     Q6_K 16 words per block (value e's 2 high bits at bit 2(e % 16)).
//   sc at o.y: Q4_1/Q5_1 one word per block (d | m << 16), Q4_K/Q5_K one word
//     (d | dmin << 16); Q8_0/Q4_0/Q5_0/Q6_K one f16 d per block, 2 per word.
//   ks at o.z: Q4_K/Q5_K the 12 bytes of 6-bit scales and mins (3 words, as
//     stored); Q6_K the 16 i8 scales (4 words).
const Q_8_0: u32 = 1u;
const Q_4_0: u32 = 2u;
const Q_4_1: u32 = 3u;
const Q_5_0: u32 = 4u;
const Q_5_1: u32 = 5u;
const Q_4_K: u32 = 6u;
const Q_5_K: u32 = 7u;
const Q_6_K: u32 = 8u;

// Eight weights, in order.
struct W8 { lo: vec4<f32>, hi: vec4<f32> }

fn q_is_k(qt: u32) -> bool { return qt >= Q_4_K; }

// Values per block of the type.
fn q_block(qt: u32) -> u32 { if (q_is_k(qt)) { return 256u; } return 32u; }

fn q_nibbles(q: u32) -> W8 {
    let s = vec4<u32>(0u, 4u, 8u, 12u);
    return W8(vec4<f32>((vec4<u32>(q) >> s) & vec4<u32>(15u)),
              vec4<f32>((vec4<u32>(q) >> (s + vec4<u32>(16u))) & vec4<u32>(15u)));
}

fn q_i8x4(w: u32) -> vec4<f32> {
    return vec4<f32>(bitcast<vec4<i32>>(vec4<u32>(w) << vec4<u32>(24u, 16u, 8u, 0u)) >> vec4<u32>(24u));
}

fn q_half(plane: u32, i: u32) -> f32 {
    return unpack2x16float(q_load(plane + i / 2u))[i & 1u];
}

// 8 one-bit fields of `bits` from bit 0, each scaled to 16 (a fifth bit).
fn q_bits16(bits: u32) -> W8 {
    let b = vec4<u32>(bits) >> vec4<u32>(0u, 1u, 2u, 3u);
    return W8(vec4<f32>((b & vec4<u32>(1u)) * 16u), vec4<f32>(((b >> vec4<u32>(4u)) & vec4<u32>(1u)) * 16u));
}

// Byte k of the ks plane of block rb (3 words per block).
fn q_kbyte(ks: u32, k: u32) -> u32 { return (q_load(ks + k / 4u) >> (8u * (k % 4u))) & 255u; }

// ggml's get_scale_min_k4 for sub-block j: (scale, min).
fn q_scale_min_k4(ks: u32, j: u32) -> vec2<f32> {
    if (j < 4u) {
        return vec2<f32>(f32(q_kbyte(ks, j) & 63u), f32(q_kbyte(ks, j + 4u) & 63u));
    }
    let sc = (q_kbyte(ks, j + 4u) & 15u) | ((q_kbyte(ks, j - 4u) >> 6u) << 4u);
    let mn = (q_kbyte(ks, j + 4u) >> 4u) | ((q_kbyte(ks, j) >> 6u) << 4u);
    return vec2<f32>(f32(sc), f32(mn));
}

// A 32-value block's scale as (d, c): each weight is d * q + c for its integer
// value q (q_values); c is the min, or -d times the signed types' offset.
fn q_scale(qt: u32, rb: u32, o: vec3<u32>) -> vec2<f32> {
    if (qt == Q_4_1 || qt == Q_5_1) { return unpack2x16float(q_load(o.y + rb)); }
    let d = q_half(o.y, rb);
    if (qt == Q_4_0) { return vec2<f32>(d, -8.0 * d); }
    if (qt == Q_5_0) { return vec2<f32>(d, -16.0 * d); }
    return vec2<f32>(d, 0.0);
}

// Group g (values 8g..8g+7) of 32-value block rb: integer values, unscaled.
fn q_values(qt: u32, rb: u32, g: u32, o: vec3<u32>) -> W8 {
    if (qt == Q_8_0) {
        let q = rb * 8u + 2u * g;
        return W8(q_i8x4(q_load(q)), q_i8x4(q_load(q + 1u)));
    }
    var v = q_nibbles(q_load(rb * 4u + g));
    if (qt == Q_5_0 || qt == Q_5_1) {
        let h = q_bits16(q_load(o.x + rb) >> (8u * g));
        v.lo += h.lo;
        v.hi += h.hi;
    }
    return v;
}

// Group gi of a row (values 8gi..8gi+7), dequantized as ggml's dequantize_row_*
// compute them; the row's blocks start at block rb0 of the chunk.
fn q_group(qt: u32, rb0: u32, gi: u32, o: vec3<u32>) -> W8 {
    if (!q_is_k(qt)) {
        let rb = rb0 + gi / 4u;
        let g = gi % 4u;
        let v = q_values(qt, rb, g, o);
        if (qt == Q_4_1 || qt == Q_5_1) {
            let s = unpack2x16float(q_load(o.y + rb));
            return W8(v.lo * s.x + s.y, v.hi * s.x + s.y);
        }
        let d = q_half(o.y, rb);
        var off = 0.0;
        if (qt == Q_4_0) { off = 8.0; }
        if (qt == Q_5_0) { off = 16.0; }
        return W8((v.lo - off) * d, (v.hi - off) * d);
    }
    let rb = rb0 + gi / 32u;
    let g = gi % 32u;
    var v = q_nibbles(q_load(rb * 32u + g));
    if (qt == Q_6_K) {
        // Two high bits per value: 16 values per word.
        let hw = q_load(o.x + rb * 16u + g / 2u) >> (16u * (g % 2u));
        let s = vec4<u32>(0u, 2u, 4u, 6u);
        v.lo += vec4<f32>(((vec4<u32>(hw) >> s) & vec4<u32>(3u)) * 16u);
        v.hi += vec4<f32>(((vec4<u32>(hw) >> (s + vec4<u32>(8u))) & vec4<u32>(3u)) * 16u);
        let sb = g / 2u;   // sub-block of 16
        let sc = f32(bitcast<i32>(q_load(o.z + rb * 4u + sb / 4u) << (24u - 8u * (sb % 4u))) >> 24u);
        let ds = q_half(o.y, rb) * sc;
        return W8(ds * (v.lo - 32.0), ds * (v.hi - 32.0));
    }
    if (qt == Q_5_K) {
        let h = q_bits16(q_load(o.x + rb * 8u + g / 4u) >> (8u * (g % 4u)));
        v.lo += h.lo;
        v.hi += h.hi;
    }
    let dd = unpack2x16float(q_load(o.y + rb));
    let sm = q_scale_min_k4(o.z + rb * 3u, g / 4u);
    let d1 = dd.x * sm.x;
    let m1 = dd.y * sm.y;
    return W8(d1 * v.lo - m1, d1 * v.hi - m1);
}

// K types, one row of x: the dot of 32 x values (sub-block j of block rb, as
// 8 vec4 and the sums of their two 16-value halves) with that sub-block's
// weights (qs: its 4 words of nibbles, loaded by the caller in one piece),
// each scale and min applied once per sub-block rather than per weight.
fn q_k_dot32(qt: u32, rb: u32, j: u32, qs: vec4<u32>, xs: array<vec4<f32>, 8>, s16: vec2<f32>, o: vec3<u32>) -> f32 {
    var h0 = 0.0;
    var h1 = 0.0;
    for (var g = 0u; g < 4u; g++) {
        let gg = 4u * j + g;
        var v = q_nibbles(qs[g]);
        if (qt == Q_5_K) {
            let h = q_bits16(q_load(o.x + rb * 8u + j) >> (8u * g));
            v.lo += h.lo;
            v.hi += h.hi;
        }
        if (qt == Q_6_K) {
            let hw = q_load(o.x + rb * 16u + gg / 2u) >> (16u * (gg % 2u));
            let s = vec4<u32>(0u, 2u, 4u, 6u);
            v.lo += vec4<f32>(((vec4<u32>(hw) >> s) & vec4<u32>(3u)) * 16u);
            v.hi += vec4<f32>(((vec4<u32>(hw) >> (s + vec4<u32>(8u))) & vec4<u32>(3u)) * 16u);
        }
        let t = dot(xs[2u * g], v.lo) + dot(xs[2u * g + 1u], v.hi);
        if (g < 2u) { h0 += t; } else { h1 += t; }
    }
    if (qt == Q_6_K) {
        let d = q_half(o.y, rb);
        let sw = q_load(o.z + rb * 4u + j / 2u) >> (16u * (j % 2u));
        let sc0 = f32(bitcast<i32>(sw << 24u) >> 24u);
        let sc1 = f32(bitcast<i32>(sw << 16u) >> 24u);
        return d * sc0 * (h0 - 32.0 * s16.x) + d * sc1 * (h1 - 32.0 * s16.y);
    }
    let dd = unpack2x16float(q_load(o.y + rb));
    let sm = q_scale_min_k4(o.z + rb * 3u, j);
    return dd.x * sm.x * (h0 + h1) - dd.y * sm.y * (s16.x + s16.y);
}
