//! The wgpu layer: adapter and device, pipelines, buffers, command recording.

mod bind_groups;
pub mod buffer;
pub mod device;
pub mod pipeline;
mod readback;
pub mod recorder;
pub mod replay;

pub use device::{AdapterRequest, Capabilities, GpuContext, INSTALL_HINT};
pub use pipeline::{pipelines_built, Pipeline, PipelineCache, PipelineKey};
pub use recorder::{Binding, Recorder, SubmitResult};
pub use replay::{Replay, ReplayCmd, ReplayJob};

/// Splits `n` workgroups into a 2-D grid that respects the per-dimension limit;
/// kernels rebuild the linear index from `num_workgroups`.
pub fn grid(n: u32, max_per_dim: u32) -> [u32; 3] {
    if n <= max_per_dim {
        [n, 1, 1]
    } else {
        let y = n.div_ceil(max_per_dim);
        [n.div_ceil(y), y, 1]
    }
}
