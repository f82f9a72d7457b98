// Selection Cache gate: whether a layer-step's selection kernels run is
// decided on the device and applied through indirect dispatch.
// ---- Selection Cache: compares the current fingerprint with the layer's cached one
// (cosine over all heads) and, on a hit, zeroes the indirect dispatch arguments of
// the selection kernels so they run no workgroups; on a miss it writes their real
// sizes and stores the new fingerprint. No CPU round trip.
struct GateParams { len: u32, slots: u32, threshold: f32, _p0: u32, args: array<vec4<u32>, 48> }
@group(0) @binding(0) var<uniform> cp: GateParams;
@group(0) @binding(1) var<storage, read> fp: array<f32>;             // [len]
@group(0) @binding(2) var<storage, read_write> cached: array<f32>;   // [len + 1]; [len] = 1 when valid
@group(0) @binding(3) var<storage, read_write> args: array<u32>;     // [slots * 4]
@group(0) @binding(4) var<storage, read_write> counters: array<u32>; // [0] hits, [1] misses
var<workgroup> dots: array<vec3<f32>, 256>;
var<workgroup> hit_sh: u32;

@compute @workgroup_size(256)
fn cache_check(@builtin(local_invocation_id) lid: vec3<u32>) {
    var acc = vec3<f32>(0.0);
    for (var i = lid.x; i < cp.len; i += 256u) {
        let a = fp[i];
        let b = cached[i];
        acc += vec3<f32>(a * b, a * a, b * b);
    }
    dots[lid.x] = acc;
    workgroupBarrier();
    for (var s = 128u; s > 0u; s >>= 1u) {
        if (lid.x < s) { dots[lid.x] += dots[lid.x + s]; }
        workgroupBarrier();
    }
    if (lid.x == 0u) {
        let d = dots[0];
        let cosine = d.x / max(sqrt(d.y * d.z), 1e-30);
        let hit = cached[cp.len] == 1.0 && cosine >= cp.threshold;
        hit_sh = select(0u, 1u, hit);
        if (hit) { counters[0] += 1u; } else { counters[1] += 1u; }
        for (var s = 0u; s < cp.slots; s++) {
            let a = select(cp.args[s], vec4<u32>(0u, 1u, 1u, 0u), hit);
            args[4u * s] = a.x;
            args[4u * s + 1u] = a.y;
            args[4u * s + 2u] = a.z;
            args[4u * s + 3u] = 0u;
        }
    }
    workgroupBarrier();
    if (hit_sh == 0u) {
        for (var i = lid.x; i < cp.len; i += 256u) { cached[i] = fp[i]; }
        if (lid.x == 0u) { cached[cp.len] = 1.0; }
    }
}
