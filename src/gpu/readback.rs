//! Readbacks of submitted work: a submit left in flight lands later, by
//! waiting for its submission and reading its staging buffer.

use super::recorder::SubmitResult;
use super::GpuContext;
use crate::error::{Error, Result};

/// Per-kernel GPU time: label -> (dispatches, nanoseconds).
pub(super) type Profile = std::collections::BTreeMap<String, (u64, f64)>;

/// A submit: landed already (the browser replay waits), or in flight.
pub(super) enum Sent {
    Landed(SubmitResult),
    InFlight(InFlight),
}

/// A loss shows up as whatever failed first (a map, a wait): name it.
pub(super) fn named_loss<T>(ctx: &GpuContext, done: Result<T>) -> Result<T> {
    ctx.check_lost()?;
    done
}

/// A submitted command buffer whose readbacks have not been read yet.
pub(super) struct InFlight {
    pub(super) index: wgpu::SubmissionIndex,
    pub(super) staging: Option<wgpu::Buffer>,
    pub(super) mapped: Option<Mapping>,
    /// Staging offset and size of each readback, in request order.
    pub(super) reads: Vec<(u64, u64)>,
    /// Staging offset of the submit's two timestamps.
    pub(super) ts_offset: Option<u64>,
    /// Staging offset of the per-dispatch timestamps and their kernels' labels.
    pub(super) profile: Option<(u64, Vec<String>)>,
}

/// Waits for a submit's work and reads its readbacks; per-kernel times go
/// into `profile`. Returns the staging buffer for reuse after a clean read (a
/// failed map leaves it unusable).
pub(super) fn land(
    ctx: &GpuContext,
    f: InFlight,
    profile: &mut Profile,
) -> Result<(SubmitResult, Option<wgpu::Buffer>)> {
    let device = &ctx.device;
    let waited = super::device::poll(
        device,
        wgpu::PollType::Wait {
            submission_index: Some(f.index),
            timeout: None,
        },
    );
    if let Err(e) = waited {
        // A submission the device did not take (lost, or its submit failed):
        // a plain wait lets the device notice a loss, which the caller names.
        let _ = super::device::poll(device, wgpu::PollType::wait_indefinitely());
        return Err(e);
    }
    let (Some(st), Some(mapped)) = (f.staging, f.mapped) else {
        return Ok((SubmitResult::default(), None));
    };
    mapped_or_error(mapped, "readback")?;
    let mut result = SubmitResult::default();
    {
        let view = st
            .slice(..)
            .get_mapped_range()
            .map_err(|e| Error::Gpu(format!("readback view: {e}")))?;
        for (so, size) in &f.reads {
            result
                .reads
                .push(view[*so as usize..(*so + *size) as usize].to_vec());
        }
        let period = ctx.queue.get_timestamp_period() as f64;
        if let Some(off) = f.ts_offset {
            let t: &[u64] = bytemuck::cast_slice(&view[off as usize..off as usize + 16]);
            result.gpu_ns = Some(t[1].wrapping_sub(t[0]) as f64 * period);
        }
        if let Some((off, labels)) = &f.profile {
            let end = *off as usize + 16 * labels.len();
            let t: &[u64] = bytemuck::cast_slice(&view[*off as usize..end]);
            for (k, label) in labels.iter().enumerate() {
                let ns = t[2 * k + 1].wrapping_sub(t[2 * k]) as f64 * period;
                let e = profile.entry(label.clone()).or_insert((0, 0.0));
                e.0 += 1;
                e.1 += ns;
            }
            if let (Some(first), Some(last)) = (t.first(), t.last()) {
                result.gpu_ns = Some(last.wrapping_sub(*first) as f64 * period);
            }
        }
    }
    st.unmap();
    Ok((result, Some(st)))
}

/// A buffer's map for reading, asked for and not yet waited for.
pub(super) type Mapping =
    std::sync::mpsc::Receiver<std::result::Result<(), wgpu::BufferAsyncError>>;

/// Asks to map `buffer` (MAP_READ) once the work submitted so far is done;
/// a later poll lands it.
pub(super) fn start_map(buffer: &wgpu::Buffer) -> Mapping {
    let (tx, rx) = std::sync::mpsc::channel();
    buffer.slice(..).map_async(wgpu::MapMode::Read, move |r| {
        let _ = tx.send(r);
    });
    rx
}

/// The outcome of a map the device has polled past; `what` names the buffer.
fn mapped_or_error(m: Mapping, what: &str) -> Result<()> {
    m.recv()
        .map_err(|e| Error::Gpu(format!("{what} channel: {e}")))?
        .map_err(|e| Error::Gpu(format!("map {what}: {e}")))
}

/// Maps `buffers` (MAP_READ, written by a submitted copy) and waits for them;
/// `what` names them in errors.
pub(super) fn map_for_reading(
    device: &wgpu::Device,
    buffers: &[wgpu::Buffer],
    what: &str,
) -> Result<()> {
    let maps: Vec<Mapping> = buffers.iter().map(start_map).collect();
    super::device::poll(device, wgpu::PollType::wait_indefinitely())?;
    maps.into_iter().try_for_each(|m| mapped_or_error(m, what))
}
