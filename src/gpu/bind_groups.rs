//! Bind groups as the recorder caches them: by what they bind (layout,
//! uniform range, storage ranges), kept while recent submits use them.

/// A dispatch's uniform range: the parameter buffer, offset and size.
pub(crate) type ParamsRange = Option<(wgpu::Buffer, u64, u64)>;

/// What a bind group binds: its layout, the parameter range and the storage ranges.
#[derive(PartialEq, Eq, Hash)]
pub(super) struct BindKey {
    pub layout: wgpu::BindGroupLayout,
    pub params: ParamsRange,
    pub bindings: Vec<(wgpu::Buffer, u64, Option<u64>)>,
}

/// Submits a cached bind group survives unused (it holds its buffers alive).
pub(super) const BIND_GROUP_TTL: u64 = 8;

/// A bind group for `key` (binding 0 the parameters, then the storage ranges).
pub(super) fn create_bind_group(
    device: &wgpu::Device,
    label: &str,
    key: &BindKey,
) -> wgpu::BindGroup {
    let mut entries = Vec::with_capacity(key.bindings.len() + 1);
    if let Some((u, offset, size)) = &key.params {
        entries.push(wgpu::BindGroupEntry {
            binding: 0,
            resource: wgpu::BindingResource::Buffer(wgpu::BufferBinding {
                buffer: u,
                offset: *offset,
                size: wgpu::BufferSize::new(*size),
            }),
        });
    }
    for (k, (buffer, offset, size)) in key.bindings.iter().enumerate() {
        entries.push(wgpu::BindGroupEntry {
            binding: k as u32 + 1,
            resource: wgpu::BindingResource::Buffer(wgpu::BufferBinding {
                buffer,
                offset: *offset,
                size: size.and_then(wgpu::BufferSize::new),
            }),
        });
    }
    device.create_bind_group(&wgpu::BindGroupDescriptor {
        label: Some(label),
        layout: &key.layout,
        entries: &entries,
    })
}
