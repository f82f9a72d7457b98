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
