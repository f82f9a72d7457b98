// Buffer copy: the adapter's bandwidth ceiling that decode kernels are judged against.
struct Params { n: u32, _p0: u32, _p1: u32, _p2: u32 }
@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> src: array<vec4<u32>>;
@group(0) @binding(2) var<storage, read_write> dst: array<vec4<u32>>;

@compute @workgroup_size(64)
fn copy(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    // 2-D grid: more than 65535 workgroups are needed for large buffers.
    let i = gid.y * nwg.x * 64u + gid.x;
    if (i < p.n) {
        dst[i] = src[i];
    }
}
