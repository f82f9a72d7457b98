// Embedding gather: out[t, :] = table[ids[t], :] for the ids that fall in this chunk of
// the table. Tables larger than one storage binding are split by rows; the host
// dispatches once per chunk and each chunk writes only its own rows.
struct Params { tokens: u32, words: u32, row_start: u32, rows: u32 }
@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> ids: array<u32>;
@group(0) @binding(2) var<storage, read> table: array<u32>;        // [rows, H/2] packed f16
@group(0) @binding(3) var<storage, read_write> out: array<vec2<f32>>; // [tokens, H/2]

@compute @workgroup_size(64)
fn embedding(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let idx = gid.y * nwg.x * 64u + gid.x;
    if (idx >= p.tokens * p.words) { return; }
    let t = idx / p.words;
    let j = idx % p.words;
    let id = ids[t];
    if (id < p.row_start || id >= p.row_start + p.rows) { return; }
    out[idx] = unpack2x16float(table[(id - p.row_start) * p.words + j]);
}
