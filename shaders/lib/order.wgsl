// lib/order.wgsl: the ordering every top-k and argmax kernel shares, so that
// ties resolve the same way on the GPU as in the reference executor.

// Below every real score: the start value of a running max, and the score of
// a slot that must never be chosen (the reference's `ops::NO_SCORE`).
const NEG: f32 = -3.0e38;

// Whether (v, i) ranks before (bv, bi): larger value first, ties to the lower index.
fn better(v: f32, i: u32, bv: f32, bi: u32) -> bool {
    return v > bv || (v == bv && i < bi);
}
