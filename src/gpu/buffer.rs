//! Storage buffers and row-chunked tensors that respect the adapter's binding limit.

use crate::error::{Error, Result};

/// Usage of every storage buffer: bound to kernels, copied in and out.
pub const STORAGE: wgpu::BufferUsages = wgpu::BufferUsages::STORAGE
    .union(wgpu::BufferUsages::COPY_DST)
    .union(wgpu::BufferUsages::COPY_SRC);

/// Creates a zeroed storage buffer of at least `bytes` (rounded up to 16, never empty).
pub fn storage(device: &wgpu::Device, bytes: u64, label: &str) -> wgpu::Buffer {
    device.create_buffer(&wgpu::BufferDescriptor {
        label: Some(label),
        size: bytes.max(16).div_ceil(16) * 16,
        usage: STORAGE,
        mapped_at_creation: false,
    })
}

/// Creates a storage buffer holding `data` (padded to a multiple of 16 bytes).
pub fn storage_init(device: &wgpu::Device, data: &[u8], label: &str) -> Result<wgpu::Buffer> {
    let size = (data.len() as u64).max(16).div_ceil(16) * 16;
    let buf = device.create_buffer(&wgpu::BufferDescriptor {
        label: Some(label),
        size,
        usage: STORAGE,
        mapped_at_creation: true,
    });
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
