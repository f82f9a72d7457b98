//! Storage buffers and row-chunked tensors that respect the adapter's binding limit.

use crate::error::{Error, Result};
use std::cell::Cell;

thread_local! {
    static CREATED: Cell<u64> = const { Cell::new(0) };
}

/// Buffers the calling thread has created, on any device (a session is driven
/// by one thread at a time, so tests and benchmarks diff this count around a
/// request; the steady-state decode loop creates none).
pub fn created() -> u64 {
    CREATED.with(|c| c.get())
}

/// Counts a buffer created outside this module.
pub(crate) fn note_created() {
    CREATED.with(|c| c.set(c.get() + 1));
}

/// Usage of every storage buffer: bound to kernels, copied in and out.
pub const STORAGE: wgpu::BufferUsages = wgpu::BufferUsages::STORAGE
    .union(wgpu::BufferUsages::COPY_DST)
    .union(wgpu::BufferUsages::COPY_SRC);

/// Creates a buffer of `size` bytes, catching wgpu's errors: a size past the
/// device's limit is a capacity error before wgpu sees it; out of memory and
/// validation errors come back typed instead of reaching wgpu's default
/// handler (which panics).
fn create(device: &wgpu::Device, size: u64, label: &str, mapped: bool) -> Result<wgpu::Buffer> {
    let max = device.limits().max_buffer_size;
    if size > max {
        return Err(Error::Capacity(format!(
            "{label}: a buffer of {size} bytes exceeds the adapter's largest buffer ({max} bytes)"
        )));
    }
    note_created();
    let created = super::device::scoped(device, || {
        Ok(device.create_buffer(&wgpu::BufferDescriptor {
            label: Some(label),
            size,
            usage: STORAGE,
            mapped_at_creation: mapped,
        }))
    });
    created.map_err(|e| match e {
        Error::OutOfMemory(m) => {
            Error::OutOfMemory(format!("allocating {label} of {size} bytes: {m}"))
        }
        Error::Gpu(m) => Error::Gpu(format!("allocating {label}: {m}")),
        other => other,
    })
}

/// Creates a zeroed storage buffer of at least `bytes` (rounded up to 16, never empty).
pub fn storage(device: &wgpu::Device, bytes: u64, label: &str) -> Result<wgpu::Buffer> {
    create(device, bytes.max(16).div_ceil(16) * 16, label, false)
}

/// Creates a storage buffer holding `data` (padded to a multiple of 16 bytes).
pub fn storage_init(device: &wgpu::Device, data: &[u8], label: &str) -> Result<wgpu::Buffer> {
    let size = (data.len() as u64).max(16).div_ceil(16) * 16;
    let buf = create(device, size, label, true)?;
    {
        let mut view = buf
            .slice(..)
            .get_mapped_range_mut()
            .map_err(|e| Error::Gpu(format!("mapping new buffer {label}: {e}")))?;
        view.slice(..data.len()).copy_from_slice(data);
    }
    buf.unmap();
    Ok(buf)
}

/// One chunk of a row-split matrix: a buffer holding rows `row_start..row_start+rows`.
#[derive(Clone, Debug)]
pub struct RowChunk {
    /// The buffer (one storage binding).
    pub buffer: wgpu::Buffer,
    /// First row held.
    pub row_start: usize,
    /// Number of rows held.
    pub rows: usize,
}

/// How many rows of `row_bytes` fit one binding of `max_binding` bytes.
pub fn rows_per_chunk(row_bytes: u64, max_binding: u64, what: &str) -> Result<usize> {
    let n = max_binding / row_bytes.max(1);
    if n == 0 {
        return Err(Error::Capacity(format!(
            "{what}: one row of {row_bytes} bytes exceeds the adapter's storage binding limit of {max_binding} bytes"
        )));
    }
    Ok(n as usize)
}

/// Splits `rows` rows of `row_bytes` bytes into chunks that each fit one binding,
/// creating each chunk's buffer with `make(row_start, rows)`.
pub fn chunk_rows(
    rows: usize,
    row_bytes: u64,
    max_binding: u64,
    what: &str,
    mut make: impl FnMut(usize, usize) -> Result<wgpu::Buffer>,
) -> Result<Vec<RowChunk>> {
    let per = rows_per_chunk(row_bytes, max_binding, what)?;
    let mut chunks = Vec::new();
    let mut start = 0;
    while start < rows || (rows == 0 && chunks.is_empty()) {
        let n = per.min(rows - start);
        chunks.push(RowChunk {
            buffer: make(start, n)?,
            row_start: start,
            rows: n,
        });
        start += n;
        if rows == 0 {
            break;
        }
    }
    Ok(chunks)
}
