// Rotary embedding in place, Hugging Face rotate-half layout: for i < D/2 the pair
// (x[i], x[i + D/2]) is rotated by the angle of (position, i). cos/sin come from a
// table built on the host in f64 (llama3 scaling folded in), indexed by the position
// read from a buffer, so any position scheme (original or compact) uses one kernel.
struct Params { rows: u32, heads: u32, head_dim: u32, max_pos: u32 }
@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read_write> x: array<f32>;      // [rows, heads * D]
@group(0) @binding(2) var<storage, read> pos: array<u32>;           // [rows]
@group(0) @binding(3) var<storage, read> cs: array<vec2<f32>>;      // [max_pos, D/2] (cos, sin)

@compute @workgroup_size(64)
fn rope(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let half = p.head_dim / 2u;
    let idx = gid.y * nwg.x * 64u + gid.x;
    if (idx >= p.rows * p.heads * half) { return; }
    let i = idx % half;
    let h = (idx / half) % p.heads;
    let r = idx / (half * p.heads);
    let position = rope_row(pos[r], p.max_pos);
    var c = cs[rope_lo(position, half, p.max_pos) + i];
    let rh = rope_hi(position, half, p.max_pos);
    if (rh != ROPE_NONE) { c = rope_compose(c, cs[rh + i]); }
    let base = r * p.heads * p.head_dim + h * p.head_dim;
    let y = rotate_pair(vec2<f32>(x[base + i], x[base + i + half]), c);
    x[base + i] = y.x;
    x[base + i + half] = y.y;
}
