// Radix top-k (shared by TokenSelect, its hierarchical prefilter, Quest and
// Tidal): the k largest of n order-preserving u32 keys, ties to the lower
// index, written in ascending index order as begin + j, or (block > 0) as the
// token of slot j of a prefilter's blocks (blocks[j / block] * block + j % block).
struct Params {
    n: u32, begin: u32, k: u32, pass_: u32,
    block: u32, vbase: u32, obase: u32, _p0: u32,
}
@group(0) @binding(0) var<uniform> p: Params;

// Keys vr[vbase..vbase + n] (votes are >= 0, so their u32 bits order like the
// floats; signed scores come as order-preserving keys), into
// selected[obase..obase + k].
// state: [0] = prefix, [1] = still-needed count, [2..258) = histogram.
@group(0) @binding(1) var<storage, read_write> state: array<atomic<u32>>;
@group(0) @binding(2) var<storage, read> vr: array<u32>;              // votes as bits [n]
var<workgroup> local_hist: array<atomic<u32>, 256>;

// Resets the state before pass 0: empty prefix, k still needed, zero histogram.
@compute @workgroup_size(256)
fn radix_init(@builtin(local_invocation_id) lid: vec3<u32>) {
    atomicStore(&state[2u + lid.x], 0u);
    if (lid.x == 0u) {
        atomicStore(&state[0], 0u);
        atomicStore(&state[1], p.k);
    }
}

// Counts, for candidates whose higher digits equal the prefix, the digit of pass_.
@compute @workgroup_size(256)
fn radix_hist(@builtin(local_invocation_id) lid: vec3<u32>, @builtin(workgroup_id) wid: vec3<u32>,
              @builtin(num_workgroups) nwg: vec3<u32>) {
    atomicStore(&local_hist[lid.x], 0u);
    workgroupBarrier();
    let shift = 24u - 8u * p.pass_;
    let prefix = atomicLoad(&state[0]);
    let per = (p.n + nwg.x - 1u) / nwg.x;
    let start = wid.x * per;
    let end = min(start + per, p.n);
    for (var j = start + lid.x; j < end; j += 256u) {
        let b = vr[p.vbase + j];
        // Higher digits (above shift + 8) must match the prefix found so far.
        let hi_ok = p.pass_ == 0u || (b >> (shift + 8u)) == (prefix >> (shift + 8u));
        if (hi_ok) { atomicAdd(&local_hist[(b >> shift) & 255u], 1u); }
    }
    workgroupBarrier();
    let c = atomicLoad(&local_hist[lid.x]);
    if (c > 0u) { atomicAdd(&state[2u + lid.x], c); }
}

// Picks the digit where the count from the top reaches the needed number; clears
// the histogram for the next pass.
@compute @workgroup_size(1)
fn radix_pick() {
    let shift = 24u - 8u * p.pass_;
    var need = atomicLoad(&state[1]);
    var prefix = atomicLoad(&state[0]);
    var digit = 0u;
    for (var d = 255i; d >= 0; d--) {
        let c = atomicLoad(&state[2u + u32(d)]);
        if (c >= need) { digit = u32(d); break; }
        need -= c;
    }
    prefix = prefix | (digit << shift);
    atomicStore(&state[0], prefix);
    atomicStore(&state[1], need);
    for (var d = 0u; d < 256u; d++) { atomicStore(&state[2u + d], 0u); }
}

// Writes the selected candidates in ascending index order: all with bits above the
// threshold, and the first `need` (lowest indices) equal to it. One workgroup; each
// thread owns a contiguous slice, counts, scans, then writes.
@group(0) @binding(3) var<storage, read_write> selected: array<u32>;  // [k], absolute ids
@group(0) @binding(4) var<storage, read> collect_blocks: array<u32>; // block ids (block > 0)
var<workgroup> cnt_hi: array<u32, 256>;
var<workgroup> cnt_eq: array<u32, 256>;

@compute @workgroup_size(256)
fn radix_collect(@builtin(local_invocation_id) lid: vec3<u32>) {
    collect(lid.x, atomicLoad(&state[0]), atomicLoad(&state[1]), p.vbase, p.obase);
}

// Writes candidate j of the keys at vbase when its bits are above thr, or equal
// to it among the first need_eq such, into selected[obase..] (called by every
// thread of one workgroup).
fn collect(tid: u32, thr: u32, need_eq: u32, vbase: u32, obase: u32) {
    let lid = vec3<u32>(tid, 0u, 0u);
    let per = (p.n + 255u) / 256u;
    let start = lid.x * per;
    let end = min(start + per, p.n);
    var hi = 0u;
    var eq = 0u;
    for (var j = start; j < end; j++) {
        let b = vr[vbase + j];
        if (b > thr) { hi++; } else if (b == thr) { eq++; }
    }
    cnt_hi[lid.x] = hi;
    cnt_eq[lid.x] = eq;
    workgroupBarrier();
    if (lid.x == 0u) {
        // Exclusive scans (serial: 256 entries).
        var sh = 0u;
        var se = 0u;
        for (var t = 0u; t < 256u; t++) {
            let a = cnt_hi[t];
            let b = cnt_eq[t];
            cnt_hi[t] = sh;
            cnt_eq[t] = se;
            sh += a;
            se += b;
        }
    }
    workgroupBarrier();
    // Equal-to-threshold candidates before this slice that are taken.
    var eq_seen = cnt_eq[lid.x];
    // Output position = (hi before) + (taken eq before).
    var out = cnt_hi[lid.x] + min(eq_seen, need_eq);
    for (var j = start; j < end; j++) {
        let b = vr[vbase + j];
        var take = b > thr;
        if (b == thr) {
            take = eq_seen < need_eq;
            eq_seen++;
        }
        if (take && out < p.k) {
            var t = p.begin + j;
            if (p.block > 0u) { t = collect_blocks[j / p.block] * p.block + j % p.block; }
            selected[obase + out] = t;
            out++;
        }
    }
}

// The whole radix top-k in one workgroup, for up to a few tens of thousands of
// candidates (hierarchical selection's stages): four passes with a workgroup
// histogram, then the collect, in one dispatch instead of ten. Workgroup y
// takes the y-th key array of a batch (Quest's KV heads): keys from
// vbase + y * n, output from obase + y * k.
var<workgroup> small_hist: array<atomic<u32>, 256>;
var<workgroup> small_state: vec2<u32>;   // prefix, still needed

@compute @workgroup_size(256)
fn radix_small(@builtin(local_invocation_id) lid: vec3<u32>, @builtin(workgroup_id) wid: vec3<u32>) {
    let vbase = p.vbase + wid.y * p.n;
    if (lid.x == 0u) { small_state = vec2<u32>(0u, p.k); }
    for (var pass_ = 0u; pass_ < 4u; pass_++) {
        atomicStore(&small_hist[lid.x], 0u);
        workgroupBarrier();
        let shift = 24u - 8u * pass_;
        let prefix = small_state.x;
        for (var j = lid.x; j < p.n; j += 256u) {
            let b = vr[vbase + j];
            if (pass_ == 0u || (b >> (shift + 8u)) == (prefix >> (shift + 8u))) {
                atomicAdd(&small_hist[(b >> shift) & 255u], 1u);
            }
        }
        workgroupBarrier();
        if (lid.x == 0u) {
            var need = small_state.y;
            var digit = 0u;
            for (var d = 255i; d >= 0; d--) {
                let c = atomicLoad(&small_hist[u32(d)]);
                if (c >= need) { digit = u32(d); break; }
                need -= c;
            }
            small_state = vec2<u32>(prefix | (digit << shift), need);
        }
        workgroupBarrier();
    }
    let st = workgroupUniformLoad(&small_state);
    // The threshold lands in `state` as after the multi-pass version.
    if (lid.x == 0u && wid.y == 0u) {
        atomicStore(&state[0], st.x);
        atomicStore(&state[1], st.y);
    }
    collect(lid.x, st.x, st.y, vbase, p.obase + wid.y * p.k);
}
