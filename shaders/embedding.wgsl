// Embedding gather: out[t, :] = table[ids[t], :] for the ids that fall in this chunk of
// the table. Tables larger than one storage binding are split by rows; the host
// dispatches once per chunk and each chunk writes only its own rows.
struct Params { tokens: u32, words: u32, row_start: u32, rows: u32, qh_off: u32, sc_off: u32, ks_off: u32, _p0: u32 }
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

// The same gather from a quantized table (lib/quant.wgsl's planes): a thread per
// 8 values, dequantized as the matmul kernels do.
override QTYPE: u32 = 1u;

fn q_load(i: u32) -> u32 { return table[i]; }

@compute @workgroup_size(64)
fn embedding_q(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let groups = p.words / 4u;
    let idx = gid.y * nwg.x * 64u + gid.x;
    if (idx >= p.tokens * groups) { return; }
    let t = idx / groups;
    let gi = idx % groups;
    let id = ids[t];
    if (id < p.row_start || id >= p.row_start + p.rows) { return; }
    let rb0 = (id - p.row_start) * (8u * groups / q_block(QTYPE));
    let v = q_group(QTYPE, rb0, gi, vec3<u32>(p.qh_off, p.sc_off, p.ks_off));
    let o = t * p.words + 4u * gi;
    out[o] = v.lo.xy;
    out[o + 1u] = v.lo.zw;
    out[o + 2u] = v.hi.xy;
    out[o + 3u] = v.hi.zw;
}
