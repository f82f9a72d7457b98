// What a matmul does with each output s before storing it, chosen per pipeline
// (fusing the op that would follow into the matmul saves a dispatch and a pass
// over y): 0 stores s; 1 adds it to y (the residual add after o_proj and
// down_proj); 2 stores silu(y) * s, with y holding the gate projection (SwiGLU
// after up_proj). The same float operations, in the same order, as the unfused ops.
override EPILOGUE: u32 = 0u;

// Whether the epilogue reads y's old value.
fn epilogue_reads() -> bool { return EPILOGUE != 0u; }

fn epilogue(s: f32, old: f32) -> f32 {
    if (EPILOGUE == 1u) { return old + s; }
    if (EPILOGUE == 2u) { return old / (1.0 + exp(-old)) * s; }
    return s;
}

// Where an output goes: with OUT_B > 0 the result's columns [0, OUT_B) go to
// y, [OUT_B, OUT_C) to y2 and [OUT_C, width) to y3, each its own tensor (q, k
// and v from one weight [q; k; v]: one dispatch for three projections, x read
// once); otherwise every column goes to y. Returns (output 0..=2, its index)
// of element i of a result `width` columns wide.
override OUT_B: u32 = 0u;
override OUT_C: u32 = 0u;

fn route(i: u32, width: u32) -> vec2<u32> {
    if (OUT_B == 0u) { return vec2<u32>(0u, i); }
    let m = i / width;
    let c = i % width;
    if (c < OUT_B) { return vec2<u32>(0u, m * OUT_B + c); }
    if (c < OUT_C) { return vec2<u32>(1u, m * (OUT_C - OUT_B) + c - OUT_B); }
    return vec2<u32>(2u, m * (width - OUT_C) + c - OUT_C);
}
