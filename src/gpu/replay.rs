//! Replaying submits on another WebGPU implementation.
//!
//! A [`GpuContext`] given a [`Replay`] target does not run
//! its dispatches itself: each submit's commands, with the contents of every
//! buffer they touch, go to the target (the tests' headless-browser harness runs
//! them on Chromium's WebGPU), and the contents it returns are written back, so
//! the executor above runs unchanged and its results come from the other
//! implementation. This is how the kernels are checked on Dawn and Tint, a
//! second WGSL stack beside wgpu and naga; it is a test hook, not a fast path.

use super::pipeline::PipelineKey;
use super::readback::map_for_reading;
use super::recorder::{Cmd, SubmitResult};
use super::GpuContext;
use crate::error::{Error, Result};
use std::collections::HashMap;

/// One command of a replayed submit; buffers are indices into
/// [`ReplayJob::buffers`].
#[derive(Clone, Debug)]
pub enum ReplayCmd {
    /// A compute dispatch.
    Dispatch {
        /// Shader, entry point and override constants.
        pipeline: PipelineKey,
        /// Uniform words at binding 0.
        params: Vec<u32>,
        /// Storage bindings 1, 2, ...: (buffer, byte offset, byte size or the rest).
        bindings: Vec<(usize, u64, Option<u64>)>,
        /// Workgroup counts of a direct dispatch.
        groups: [u32; 3],
        /// (buffer, byte offset) of the counts of an indirect dispatch.
        indirect: Option<(usize, u64)>,
    },
    /// A buffer-to-buffer copy.
    Copy {
        /// Source buffer.
        src: usize,
        /// Byte offset in the source.
        src_offset: u64,
        /// Destination buffer.
        dst: usize,
        /// Byte offset in the destination.
        dst_offset: u64,
        /// Bytes copied.
        size: u64,
    },
}

/// A submit to replay: the contents of every buffer it touches (each a multiple
/// of 4 bytes) as they are before it, and its commands in order.
#[derive(Clone, Debug, Default)]
pub struct ReplayJob {
    /// Buffer contents before the submit.
    pub buffers: Vec<Vec<u8>>,
    /// Each buffer's identity, the same in every job while the buffer lives
    /// (a target may keep buffers between jobs and resend only changed ones).
    pub ids: Vec<u64>,
    /// Whether the submit may write each buffer (a storage binding with write
    /// access, or a copy destination); only these come back.
    pub written: Vec<bool>,
    /// The commands.
    pub cmds: Vec<ReplayCmd>,
}

/// Runs submits elsewhere. `replay` returns the contents after the job of the
/// buffers marked [`ReplayJob::written`], in the job's order and sizes, or a
/// message naming what failed there (a shader that did not compile, a
/// validation error, a lost device).
pub trait Replay: Send + Sync {
    /// Runs `job` and returns the written buffers' contents after it.
    fn replay(&self, job: &ReplayJob) -> std::result::Result<Vec<Vec<u8>>, String>;
}

/// The bindings of group 0 that `shader` declares as storage with write
/// access (parsed once per shader; a binding any global writes counts).
pub(crate) fn writable_bindings(shader: crate::shaders::Shader) -> Vec<u32> {
    use std::sync::Mutex;
    static CACHE: Mutex<Option<HashMap<&'static str, Vec<u32>>>> = Mutex::new(None);
    let mut cache = CACHE.lock().unwrap_or_else(|e| e.into_inner());
    cache
        .get_or_insert_with(HashMap::new)
        .entry(shader.name)
        .or_insert_with(|| {
            // Every shader is validated by the crate's own tests; a parse failure
            // here leaves every binding marked written, the safe side.
            let Ok(module) = naga::front::wgsl::parse_str(shader.source) else {
                return (0..64).collect();
            };
            module
                .global_variables
                .iter()
                .filter_map(|(_, g)| match (g.space, &g.binding) {
                    (naga::AddressSpace::Storage { access }, Some(b))
                        if b.group == 0 && access.contains(naga::StorageAccess::STORE) =>
                    {
                        Some(b.binding)
                    }
                    _ => None,
                })
                .collect()
        })
        .clone()
}

/// Runs `cmds` on the replay target: snapshots every buffer they touch, sends
/// the job, writes back the buffers the target changed and answers `reads`
/// from the contents it returned.
pub(super) fn submit(
    ctx: &GpuContext,
    target: &dyn Replay,
    cmds: &[Cmd],
    reads: &[(wgpu::Buffer, u64, u64)],
) -> Result<SubmitResult> {
    let mut buffers: Vec<wgpu::Buffer> = Vec::new();
    let mut ids: Vec<u64> = Vec::new();
    let mut written: Vec<bool> = Vec::new();
    let mut index: HashMap<u64, usize> = HashMap::new();
    let mut slot = |b: &wgpu::Buffer, writes: bool| -> usize {
        // A wgpu buffer hashes by its resource id: stable while it lives.
        let id = {
            use std::hash::{Hash, Hasher};
            let mut h = std::collections::hash_map::DefaultHasher::new();
            b.hash(&mut h);
            h.finish()
        };
        let i = *index.entry(id).or_insert_with(|| {
            buffers.push(b.clone());
            ids.push(id);
            written.push(false);
            buffers.len() - 1
        });
        written[i] |= writes;
        i
    };
    // An upload travels as a copy from a buffer holding its data.
    let mut upload_sources = Vec::new();
    for c in cmds {
        if let Cmd::Upload { data, .. } = c {
            upload_sources.push(super::buffer::storage_init(&ctx.device, data, "upload")?);
        }
    }
    let mut upload_sources = upload_sources.iter();
    let mut job_cmds = Vec::with_capacity(cmds.len());
    for c in cmds {
        job_cmds.push(match c {
            Cmd::Dispatch {
                pipeline,
                params,
                bindings,
                groups,
                indirect,
                ..
            } => {
                let writable = writable_bindings(pipeline.key.shader);
                ReplayCmd::Dispatch {
                    pipeline: pipeline.key.clone(),
                    params: params.clone(),
                    bindings: bindings
                        .iter()
                        .enumerate()
                        .map(|(k, b)| {
                            let w = writable.contains(&(k as u32 + 1));
                            (slot(&b.buffer, w), b.offset, b.size)
                        })
                        .collect(),
                    groups: *groups,
                    indirect: indirect.as_ref().map(|(b, off)| (slot(b, false), *off)),
                }
            }
            Cmd::Copy {
                src,
                src_offset,
                dst,
                dst_offset,
                size,
            } => ReplayCmd::Copy {
                src: slot(src, false),
                src_offset: *src_offset,
                dst: slot(dst, true),
                dst_offset: *dst_offset,
                size: *size,
            },
            Cmd::Upload {
                data,
                dst,
                dst_offset,
            } => ReplayCmd::Copy {
                src: slot(
                    upload_sources
                        .next()
                        .ok_or_else(|| Error::Gpu("upload source missing".into()))?,
                    false,
                ),
                src_offset: 0,
                dst: slot(dst, true),
                dst_offset: *dst_offset,
                size: data.len() as u64,
            },
        });
    }
    let read_slots: Vec<usize> = reads.iter().map(|(b, _, _)| slot(b, false)).collect();
    let mut job = ReplayJob {
        buffers: snapshot(ctx, &buffers)?,
        ids,
        written,
        cmds: job_cmds,
    };
    let mut returned = target
        .replay(&job)
        .map_err(|e| Error::Gpu(format!("replayed submit: {e}")))?
        .into_iter();
    for ((buf, old), _) in buffers
        .iter()
        .zip(job.buffers.iter_mut())
        .zip(&job.written)
        .filter(|(_, w)| **w)
    {
        let new = returned.next().filter(|n| n.len() == old.len());
        let new = new.ok_or_else(|| {
            Error::Gpu("replayed submit: the target returned other buffers than written".into())
        })?;
        if new != *old {
            ctx.queue.write_buffer(buf, 0, &new);
            *old = new;
        }
    }
    let mut result = SubmitResult::default();
    for ((_, off, size), &s) in reads.iter().zip(&read_slots) {
        let data = &job.buffers[s];
        let range = *off as usize..(*off + *size) as usize;
        let bytes = data.get(range).ok_or_else(|| {
            Error::Gpu(format!(
                "readback of {size} bytes at {off} past a buffer of {}",
                data.len()
            ))
        })?;
        result.reads.push(bytes.to_vec());
    }
    Ok(result)
}

/// The whole contents of `buffers`, read back in one submit through staging
/// buffers of at most the device's largest buffer size.
fn snapshot(ctx: &GpuContext, buffers: &[wgpu::Buffer]) -> Result<Vec<Vec<u8>>> {
    let device = &ctx.device;
    let max = ctx.limits.max_buffer_size.max(1);
    // Consecutive buffers share a staging buffer while they fit it.
    let mut groups: Vec<(u64, Vec<usize>)> = Vec::new();
    for (i, b) in buffers.iter().enumerate() {
        match groups.last_mut() {
            Some((bytes, members)) if *bytes + b.size() <= max => {
                *bytes += b.size();
                members.push(i);
            }
            _ => groups.push((b.size(), vec![i])),
        }
    }
    let mut enc = device.create_command_encoder(&Default::default());
    let mut stagings = Vec::with_capacity(groups.len());
    for (bytes, members) in &groups {
        let staging = device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("kvsieve replay snapshot"),
            size: (*bytes).max(4),
            usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
            mapped_at_creation: false,
        });
        let mut at = 0;
        for &i in members {
            enc.copy_buffer_to_buffer(&buffers[i], 0, &staging, at, Some(buffers[i].size()));
            at += buffers[i].size();
        }
        stagings.push(staging);
    }
    ctx.queue.submit([enc.finish()]);
    map_for_reading(device, &stagings, "snapshot")?;
    let mut out = vec![Vec::new(); buffers.len()];
    for ((_, members), st) in groups.iter().zip(&stagings) {
        {
            let view = st
                .slice(..)
                .get_mapped_range()
                .map_err(|e| Error::Gpu(format!("snapshot view: {e}")))?;
            let mut at = 0usize;
            for &i in members {
                let n = buffers[i].size() as usize;
                out[i] = view[at..at + n].to_vec();
                at += n;
            }
        }
        st.unmap();
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::writable_bindings;
    use crate::shaders::{ALL, COPY, ELEMENTWISE};

    #[test]
    fn writable_bindings_follow_storage_access() {
        assert_eq!(writable_bindings(COPY), vec![2]);
        assert_eq!(writable_bindings(ELEMENTWISE), vec![1]);
        // Every kernel writes something, and never the uniform at binding 0.
        for s in ALL {
            let w = writable_bindings(*s);
            assert!(!w.is_empty() && !w.contains(&0), "{}: {w:?}", s.name);
        }
    }
}
