// lib/rotary.wgsl: rotate-half RoPE as Hugging Face applies it. Channel i < D/2
// pairs with i + D/2; rotated by an angle with cosine c and sine s:
// lo' = lo c - hi s, hi' = hi c + lo s. The table holds (cos, sin) per
// position and channel pair, positions clamped to the table.

// A table row for position `pos` of a table of `max_pos` positions.
fn rope_row(pos: u32, max_pos: u32) -> u32 {
    return min(pos, max_pos - 1u);
}

struct Rotated2 { lo: vec2<f32>, hi: vec2<f32> }
struct Rotated4 { lo: vec4<f32>, hi: vec4<f32> }

fn rotate2(lo: vec2<f32>, hi: vec2<f32>, c: vec2<f32>, s: vec2<f32>) -> Rotated2 {
    return Rotated2(lo * c - hi * s, hi * c + lo * s);
}

fn rotate4(lo: vec4<f32>, hi: vec4<f32>, c: vec4<f32>, s: vec4<f32>) -> Rotated4 {
    return Rotated4(lo * c - hi * s, hi * c + lo * s);
}
