// What a matmul does with each output s before storing it, chosen per pipeline
// (fusing the op that would follow into the matmul saves a dispatch and a pass
// over y): 0 stores s; 1 adds it to y (the residual add after o_proj and
// down_proj); 2 stores silu(y) * s, with y holding the gate projection (SwiGLU
// after up_proj); 3 (pairs) reads a weight that stacks [gate; up] (2H rows)
// and stores silu(gate_j) * up_j for j < H (gate and up in one dispatch). The
// same float operations, in the same order, as the unfused ops.
override EPILOGUE: u32 = 0u;

// Whether the epilogue reads y's old value.
fn epilogue_reads() -> bool { return EPILOGUE == 1u || EPILOGUE == 2u; }

fn silu_mul(g: f32, u: f32) -> f32 { return g / (1.0 + exp(-g)) * u; }

fn epilogue(s: f32, old: f32) -> f32 {
    if (EPILOGUE == 1u) { return old + s; }
    if (EPILOGUE == 2u) { return silu_mul(old, s); }
    return s;
}

// Outputs thread t of a per-thread kernel stores: 4 from 4t, or with pairs 2
// from 2t (its rows 2t, 2t + 1 of the gate and the same of the up part).
fn outs_per_thread() -> u32 { return select(4u, 2u, EPILOGUE == 3u); }

// Outputs of a matrix of `rows` weight rows.
fn out_count(rows: u32) -> u32 { return select(rows, rows / 2u, EPILOGUE == 3u); }

// The 4 weight rows of thread t (clamped to the matrix; `rows` rows).
fn rows4(t: u32, rows: u32) -> vec4<u32> {
    if (EPILOGUE == 3u) {
        let h = rows / 2u;
        let j = min(2u * t, h - 1u);
        let j1 = min(2u * t + 1u, h - 1u);
        return vec4<u32>(j, j1, h + j, h + j1);
    }
    let last = rows - 1u;
    let n0 = 4u * t;
    return vec4<u32>(min(n0, last), min(n0 + 1u, last), min(n0 + 2u, last), min(n0 + 3u, last));
}

// The weight row of slot r of a cooperative workgroup wg of `per` slots
// (with pairs, its first half of slots are gate rows and the second the
// matching up rows), clamped.
fn slot_row(wg: u32, r: u32, per: u32, rows: u32) -> u32 {
    if (EPILOGUE == 3u) {
        let h = rows / 2u;
        let half = per / 2u;
        let j = min(wg * half + r % half, h - 1u);
        return select(j, h + j, r >= half);
    }
    return min(wg * per + r, rows - 1u);
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

// Outputs a cooperative workgroup of `per` weight-row slots stores.
fn outs_per_group(per: u32) -> u32 { return select(per, per / 2u, EPILOGUE == 3u); }

// Output jj of 4 accumulated rows: the row itself, or with pairs silu(gate) * up.
fn out_value(acc: vec4<f32>, jj: u32) -> f32 {
    if (EPILOGUE == 3u) { return silu_mul(acc[jj], acc[jj + 2u]); }
    return acc[jj];
}
