// Causal flash attention for a chunk of queries over the paged KV cache (GQA).
// A workgroup owns 64 consecutive queries of one query head; each thread keeps one
// query row, its running max/sum and f32 accumulator in registers (vec4s). Key/value
// tiles of TK tokens are staged in workgroup memory, keys rotated by RoPE at their
// position as they are loaded. Query i (chunk-relative) sees keys j <= q_start + i.
//
// The host runs one pass per (KV range, arena): a cache spanning several arena
// buffers needs one pass per arena, and CPU drivers (llvmpipe) stop any loop nest
// after 65535 iterations, so the keys are also cut into ranges short enough to stay
// below that. The (m, l, acc) state is carried in `state` between passes; the last
// pass writes the normalised output.
//
// List mode (sparse prefill: TokenSelect and Quest sub-chunks): the keys are ranks
// 0..kv_len of [0, n_init) ++ keys[0..n_sel) ++ [tail_start, ...), as in
// attention_decode.wgsl; a key's RoPE position is its rank (compact) or its logical
// index. With block > 0 (Quest) the selection is per KV head and holds blocks:
// selected rank i of KV head g is token keys[g * blocks_per_head + i / block] *
// block + i % block. Sinks and selected tokens precede tail_start <= q_start, so
// causality only cuts the tail: query i sees ranks up to last_rank(q_start + i).
// The queries are rows row0.. of `q` and `out`.
//
// Tree mode (speculative verification): the queries are the n_q nodes of a draft
// tree whose keys sit at slots q_start + j; node i sees every token before q_start
// and the nodes in its ancestor set (bits of keys[tree_off + 4i..][..4], itself included). Node
// j's RoPE position is q_start + depth, with depths at keys[tree_off + 4 n_q + j].
//
// List-tree mode (speculative verification under TokenSelect): ranks below
// L = kv_len - n_q are a key list over the prefix (as in list mode, its window
// ending at q_start), seen by every node; rank L + j is tree node j, seen through
// the ancestor sets, at position (L if compact, else q_start) + depth.
struct Params {
    n_q: u32, q_start: u32, kv_len: u32, q_heads: u32,
    kv_heads: u32, head_dim: u32, page_size: u32, arena_first_page: u32,
    arena_pages: u32, first_pass: u32, last_pass: u32, scale: f32,
    max_pos: u32, kv_begin: u32, kv_stop: u32, row0: u32,
    tree_off: u32, n_init: u32, n_sel: u32, tail_start: u32,
    _p1: u32, block: u32, blocks_per_head: u32, _p2: u32,
}
// Fixed per pipeline, so the key loop does not branch on them: the mode below
// and compact positions (list modes only).
override LIST_MODE: u32 = 0u;
override COMPACT: bool = false;
const DENSE: u32 = 0u;
const LIST: u32 = 1u;
const TREE: u32 = 2u;
const LIST_TREE: u32 = 3u;
@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> q: array<vec4<f32>>;      // [n_q, q_heads * D/4], rotated
@group(0) @binding(2) var<storage, read> k_arena: array<vec2<u32>>; // 4 halves per element
@group(0) @binding(3) var<storage, read> v_arena: array<vec2<u32>>;
@group(0) @binding(4) var<storage, read> pages: array<u32>;
@group(0) @binding(5) var<storage, read> cs: array<vec2<f32>>;     // two-level rope table (lib/rotary.wgsl)
@group(0) @binding(6) var<storage, read_write> state: array<f32>;  // [n_q, q_heads, D + 2]
@group(0) @binding(7) var<storage, read_write> out: array<vec4<f32>>; // [n_q, q_heads * D/4]
// Selected ids (list modes) from 0, the draft tree's ancestor sets and depths
// (tree modes) from tree_off: one binding, so the kernel stays within WebGPU's
// default 8 storage buffers per stage.
@group(0) @binding(8) var<storage, read> keys: array<u32>;

// Keys per tile (at most 16) and the tile's row stride (head_dim / 4 <= 32): set
// per pipeline so the tiles fit the adapter's workgroup memory (WebGPU's default
// 16 KiB holds 15 keys at head_dim 128, 16 below). The defaults fit WebGPU's
// default limits too, for a pipeline built without constants.
override TK: u32 = 15u;
override D4_MAX: u32 = 32u;
override TILE: u32 = TK * D4_MAX;

var<workgroup> k_sh: array<vec4<f32>, TILE>;
var<workgroup> v_sh: array<vec4<f32>, TILE>;
var<workgroup> ok_sh: array<u32, TK>;

fn unpack4(w: vec2<u32>) -> vec4<f32> {
    return vec4<f32>(unpack2x16float(w.x), unpack2x16float(w.y));
}

fn is_list() -> bool { return LIST_MODE == LIST || LIST_MODE == LIST_TREE; }

// First rank of the tree nodes (tree modes).
fn tree_rank() -> u32 { return select(p.q_start, p.kv_len - p.n_q, LIST_MODE == LIST_TREE); }

// Logical token index of rank r for KV head kvh.
fn logical(r: u32, kvh: u32) -> u32 {
    if (LIST_MODE == LIST_TREE && r >= tree_rank()) { return p.q_start + r - tree_rank(); }
    if (!is_list()) { return r; }
    let l = KeyListView(p.n_init, p.n_sel, p.tail_start, p.block, p.blocks_per_head);
    let w = key_list_word(l, r, kvh);
    var word = 0u;
    if (w != NO_WORD) { word = keys[w]; }
    return key_list_logical(l, r, word);
}

// RoPE position of rank r for KV head kvh.
fn position(r: u32, kvh: u32) -> u32 {
    let t0 = tree_rank();
    if ((LIST_MODE == TREE || LIST_MODE == LIST_TREE) && r >= t0) {
        let base = select(p.q_start, t0, LIST_MODE == LIST_TREE && COMPACT);
        return rope_row(base + keys[p.tree_off + 4u * p.n_q + r - t0], p.max_pos);
    }
    let pos = select(logical(r, kvh), r, !is_list() || COMPACT);
    return rope_row(pos, p.max_pos);
}

// Tree modes: whether node i sees the key at rank r (ancestors only).
fn tree_visible(i: u32, r: u32) -> bool {
    if ((LIST_MODE != TREE && LIST_MODE != LIST_TREE) || r < tree_rank()) { return true; }
    let j = r - tree_rank();
    return ((keys[p.tree_off + 4u * i + j / 32u] >> (j % 32u)) & 1u) == 1u;
}

// Last rank a query at logical index t may see.
fn last_rank(t: u32) -> u32 {
    if (LIST_MODE == LIST_TREE) { return tree_rank() + (t - p.q_start); }
    if (LIST_MODE != LIST) { return t; }
    return p.n_init + p.n_sel + (t - p.tail_start);
}

@compute @workgroup_size(64)
fn prefill(@builtin(local_invocation_id) lid: vec3<u32>, @builtin(workgroup_id) wid: vec3<u32>) {
    let tid = lid.x;
    let h = wid.y;
    let qi = wid.x * 64u + tid;
    let live = qi < p.n_q;
    let d4 = p.head_dim / 4u;
    let e8 = p.head_dim / 8u;   // items per key: 4 dims of the first half + their partners
    let kvh = h / (p.q_heads / p.kv_heads);
    let stride = p.head_dim + 2u;
    var qv: array<vec4<f32>, 32>;
    var acc: array<vec4<f32>, 32>;
    var m = NEG;
    var l = 0.0;
    let qrow = p.row0 + min(qi, p.n_q - 1u);
    for (var i = 0u; i < d4; i++) {
        qv[i] = q[(qrow * p.q_heads + h) * d4 + i] * p.scale;
        acc[i] = vec4<f32>(0.0);
    }
    let sb = (min(qi, p.n_q - 1u) * p.q_heads + h) * stride;
    if (p.first_pass == 0u && live) {
        m = state[sb];
        l = state[sb + 1u];
        for (var i = 0u; i < d4; i++) {
            acc[i] = vec4<f32>(state[sb + 2u + 4u * i], state[sb + 3u + 4u * i],
                               state[sb + 4u + 4u * i], state[sb + 5u + 4u * i]);
        }
    }
    let limit = last_rank(p.q_start + min(qi, p.n_q - 1u)); // last visible rank of this query
    let last_q = min(wid.x * 64u + 63u, p.n_q - 1u);
    let kv_end = min(min(p.kv_len, last_rank(p.q_start + last_q) + 1u), p.kv_stop);
    for (var t0 = p.kv_begin; t0 < kv_end; t0 += TK) {
        for (var it = tid; it < TK * e8; it += 64u) {
            let t = it / e8;
            let w = it % e8;
            let r = t0 + t;
            var ok = false;
            var base = 0u;
            if (r < kv_end) {
                let j = logical(r, kvh);
                let page = pages[j / p.page_size];
                if (in_arena(page, p.arena_first_page, p.arena_pages)) {
                    ok = true;
                    base = kv_row(page - p.arena_first_page, p.kv_heads, kvh, p.page_size, j % p.page_size) * d4;
                }
            }
            if (w == 0u) { ok_sh[t] = select(0u, 1u, ok); }
            if (ok) {
                let pos = position(r, kvh);
                let lo = unpack4(k_arena[base + w]);
                let hi = unpack4(k_arena[base + w + e8]);
                // cos/sin of dims 4w..4w+3
                let rl = rope_lo(pos, p.head_dim / 2u, p.max_pos) + 4u * w;
                let rh = rope_hi(pos, p.head_dim / 2u, p.max_pos);
                var c0 = cs[rl];
                var c1 = cs[rl + 1u];
                var c2 = cs[rl + 2u];
                var c3 = cs[rl + 3u];
                if (rh != ROPE_NONE) {
                    let h = rh + 4u * w;
                    c0 = rope_compose(c0, cs[h]);
                    c1 = rope_compose(c1, cs[h + 1u]);
                    c2 = rope_compose(c2, cs[h + 2u]);
                    c3 = rope_compose(c3, cs[h + 3u]);
                }
                let c = vec4<f32>(c0.x, c1.x, c2.x, c3.x);
                let s = vec4<f32>(c0.y, c1.y, c2.y, c3.y);
                let rk = rotate4(lo, hi, c, s);
                k_sh[t * D4_MAX + w] = rk.lo;
                k_sh[t * D4_MAX + w + e8] = rk.hi;
                v_sh[t * D4_MAX + w] = unpack4(v_arena[base + w]);
                v_sh[t * D4_MAX + w + e8] = unpack4(v_arena[base + w + e8]);
            }
        }
        workgroupBarrier();
        if (live) {
            var s: array<f32, 16>;
            var tmax = NEG;
            for (var t = 0u; t < TK; t++) {
                var v = NEG;
                if (ok_sh[t] == 1u && t0 + t <= limit && t0 + t < kv_end
                    && tree_visible(min(qi, p.n_q - 1u), t0 + t)) {
                    var acc4 = vec4<f32>(0.0);
                    for (var i = 0u; i < d4; i++) { acc4 += qv[i] * k_sh[t * D4_MAX + i]; }
                    v = acc4.x + acc4.y + acc4.z + acc4.w;
                    tmax = max(tmax, v);
                }
                s[t] = v;
            }
            if (tmax > NEG) {
                let m_new = max(m, tmax);
                let alpha = exp(m - m_new);
                for (var i = 0u; i < d4; i++) { acc[i] *= alpha; }
                l *= alpha;
                for (var t = 0u; t < TK; t++) {
                    if (s[t] > NEG) {
                        let pr = exp(s[t] - m_new);
                        l += pr;
                        for (var i = 0u; i < d4; i++) { acc[i] += pr * v_sh[t * D4_MAX + i]; }
                    }
                }
                m = m_new;
            }
        }
        workgroupBarrier();
    }
    if (!live) { return; }
    if (p.last_pass == 1u) {
        let ob = ((p.row0 + qi) * p.q_heads + h) * d4;
        let inv = select(0.0, 1.0 / l, l > 0.0);
        for (var i = 0u; i < d4; i++) { out[ob + i] = acc[i] * inv; }
    } else {
        state[sb] = m;
        state[sb + 1u] = l;
        for (var i = 0u; i < d4; i++) {
            state[sb + 2u + 4u * i] = acc[i].x;
            state[sb + 3u + 4u * i] = acc[i].y;
            state[sb + 4u + 4u * i] = acc[i].z;
            state[sb + 5u + 4u * i] = acc[i].w;
        }
    }
}
