// lib/rotary.wgsl: rotate-half RoPE as Hugging Face applies it. Channel i < D/2
// pairs with i + D/2; rotated by an angle with cosine c and sine s:
// lo' = lo c - hi s, hi' = hi c + lo s. The table (see kvsieve::ops::ROPE_SPLIT)
// holds a row per position up to ROPE_FLAT, then two levels: past it a
// position's (cos, sin) per channel pair is composed by angle addition from
// row pos % ROPE_SPLIT and row ROPE_SPLIT + pos / ROPE_SPLIT of the second
// part, so a table for 2^24 positions fits any binding and contexts within
// ROPE_FLAT read one row. Positions are clamped to the table.

const ROPE_SPLIT: u32 = 1024u;
const ROPE_FLAT: u32 = 32768u;
const ROPE_NONE: u32 = 0xffffffffu;

// Element offset of a position's own row, or of its low row past the flat
// part (`half` pairs a row, a table of `max_pos` positions).
fn rope_lo(pos: u32, half: u32, max_pos: u32) -> u32 {
    let flat = min(max_pos, ROPE_FLAT);
    if (pos < flat) { return pos * half; }
    return (flat + pos % ROPE_SPLIT) * half;
}

// Element offset of a position's high row, or ROPE_NONE in the flat part.
fn rope_hi(pos: u32, half: u32, max_pos: u32) -> u32 {
    let flat = min(max_pos, ROPE_FLAT);
    if (pos < flat) { return ROPE_NONE; }
    return (flat + ROPE_SPLIT + pos / ROPE_SPLIT) * half;
}

// (cos, sin) of the sum of the two rows' angles, as kvsieve::ops::rope_at.
fn rope_compose(lo: vec2<f32>, hi: vec2<f32>) -> vec2<f32> {
    return vec2<f32>(lo.x * hi.x - lo.y * hi.y, lo.y * hi.x + lo.x * hi.y);
}

// A table row for position `pos` of a table of `max_pos` positions.
fn rope_row(pos: u32, max_pos: u32) -> u32 {
    return min(pos, max_pos - 1u);
}

// Pair (lo, hi) rotated by (cos, sin) c.
fn rotate_pair(x: vec2<f32>, c: vec2<f32>) -> vec2<f32> {
    return vec2<f32>(x.x * c.x - x.y * c.y, x.y * c.x + x.x * c.y);
}

struct Rotated2 { lo: vec2<f32>, hi: vec2<f32> }
struct Rotated4 { lo: vec4<f32>, hi: vec4<f32> }

fn rotate2(lo: vec2<f32>, hi: vec2<f32>, c: vec2<f32>, s: vec2<f32>) -> Rotated2 {
    return Rotated2(lo * c - hi * s, hi * c + lo * s);
}

fn rotate4(lo: vec4<f32>, hi: vec4<f32>, c: vec4<f32>, s: vec4<f32>) -> Rotated4 {
    return Rotated4(lo * c - hi * s, hi * c + lo * s);
}
