// Quantized weights (GGUF's 32-value block types), repacked bit-exactly at load
// into aligned u32 planes of one buffer (see kernels/quant.rs), for a matrix
// chunk of B = rows * blocks_per_row blocks:
//   qs plane at word 0: 4-bit types 4 words per block, word g holding values
//     8g..8g+7 as nibbles 0..7 (ggml's nibble order undone); Q8_0 8 words per
//     block, 4 i8 values each in order;
//   qh plane at qh_off (Q5_0, Q5_1): one word per block, bit e = value e's
//     fifth bit (ggml's qh as is);
//   scale plane at sc_off: Q4_1, Q5_1 one word per block (d | m << 16);
//     Q8_0, Q4_0, Q5_0 one f16 d per block, two per word.
// A kernel reads 8 values (a group; 4 groups per block) with q_addr, four loads
// and q_decode; the type is the kernel's QTYPE override, so the switch folds.
const Q_8_0: u32 = 1u;
const Q_4_0: u32 = 2u;
const Q_4_1: u32 = 3u;
const Q_5_0: u32 = 4u;
const Q_5_1: u32 = 5u;

// Eight weights, in order.
struct W8 { lo: vec4<f32>, hi: vec4<f32> }

// Word addresses of group g of block rb: (qs word, second qs word, qh word, scale word).
fn q_addr(qt: u32, rb: u32, g: u32, qh_off: u32, sc_off: u32) -> vec4<u32> {
    if (qt == Q_8_0) {
        let q = rb * 8u + 2u * g;
        return vec4<u32>(q, q + 1u, q, sc_off + rb / 2u);
    }
    let q = rb * 4u + g;
    var sc = sc_off + rb / 2u;
    if (qt == Q_4_1 || qt == Q_5_1) { sc = sc_off + rb; }
    var qh = q;
    if (qt == Q_5_0 || qt == Q_5_1) { qh = qh_off + rb; }
    return vec4<u32>(q, q, qh, sc);
}

fn q_nibbles(q: u32) -> W8 {
    let s = vec4<u32>(0u, 4u, 8u, 12u);
    return W8(vec4<f32>((vec4<u32>(q) >> s) & vec4<u32>(15u)),
              vec4<f32>((vec4<u32>(q) >> (s + vec4<u32>(16u))) & vec4<u32>(15u)));
}

fn q_i8x4(w: u32) -> vec4<f32> {
    return vec4<f32>(bitcast<vec4<i32>>(vec4<u32>(w) << vec4<u32>(24u, 16u, 8u, 0u)) >> vec4<u32>(24u));
}

// A block's scale as (d, c): every weight of the block is d * q + c for its
// integer value q (q_values); c is the min, or -d * the offset of the signed types.
fn q_scale(qt: u32, sc: u32, rb: u32) -> vec2<f32> {
    let s = unpack2x16float(sc);
    if (qt == Q_4_1 || qt == Q_5_1) { return s; }
    let d = s[rb & 1u];
    if (qt == Q_4_0) { return vec2<f32>(d, -8.0 * d); }
    if (qt == Q_5_0) { return vec2<f32>(d, -16.0 * d); }
    return vec2<f32>(d, 0.0);
}

// Group g's integer values, unscaled.
fn q_values(qt: u32, q0: u32, q1: u32, qh: u32, g: u32) -> W8 {
    if (qt == Q_8_0) { return W8(q_i8x4(q0), q_i8x4(q1)); }
    var v = q_nibbles(q0);
    if (qt == Q_5_0 || qt == Q_5_1) {
        let b = vec4<u32>(qh >> (8u * g)) >> vec4<u32>(0u, 1u, 2u, 3u);
        v.lo += vec4<f32>((b & vec4<u32>(1u)) * 16u);
        v.hi += vec4<f32>(((b >> vec4<u32>(4u)) & vec4<u32>(1u)) * 16u);
    }
    return v;
}

// Group g of a block from its loaded words, dequantized as ggml does:
// d * (q - offset), or d * q + m (rb picks the f16 of a shared scale word).
fn q_decode(qt: u32, q0: u32, q1: u32, qh: u32, sc: u32, rb: u32, g: u32) -> W8 {
    let v = q_values(qt, q0, q1, qh, g);
    let s = unpack2x16float(sc);
    if (qt == Q_4_1 || qt == Q_5_1) {
        return W8(v.lo * s.x + s.y, v.hi * s.x + s.y);
    }
    let d = s[rb & 1u];
    var off = 0.0;
    if (qt == Q_4_0) { off = 8.0; }
    if (qt == Q_5_0) { off = 16.0; }
    return W8((v.lo - off) * d, (v.hi - off) * d);
}
