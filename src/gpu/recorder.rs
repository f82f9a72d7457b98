//! Command recording: every dispatch of a step goes into one encoder and one
//! submit. Uniform parameters of all dispatches (and small uploads) share one
//! buffer written once per submit; readbacks ride on the same submit through one
//! staging buffer. Both buffers persist across submits, and bind groups are
//! cached by what they bind: a decode step that repeats the last one's
//! dispatches creates no buffer and no bind group. A submit may also be left
//! in flight ([`Recorder::submit_pending`]) while the next one is recorded;
//! its readbacks land by ticket.

use super::bind_groups::{create_bind_group, BindKey, ParamsRange, BIND_GROUP_TTL};
use super::device::scoped;
use super::pipeline::Pipeline;
use super::readback::{land, named_loss, start_map, InFlight, Sent};
use super::GpuContext;
use crate::error::{Error, Result};
use std::sync::Arc;

/// A buffer range bound to a kernel.
#[derive(Clone, Debug, PartialEq)]
pub struct Binding {
    /// The buffer.
    pub buffer: wgpu::Buffer,
    /// Byte offset (a multiple of the adapter's storage offset alignment).
    pub offset: u64,
    /// Byte size, or the rest of the buffer.
    pub size: Option<u64>,
}

impl From<&wgpu::Buffer> for Binding {
    fn from(b: &wgpu::Buffer) -> Self {
        Binding {
            buffer: b.clone(),
            offset: 0,
            size: None,
        }
    }
}

/// A recorded command (the replay path reads them too).
pub(super) enum Cmd {
    Dispatch {
        pipeline: Arc<Pipeline>,
        params: Vec<u32>,
        bindings: Vec<Binding>,
        groups: [u32; 3],
        indirect: Option<(wgpu::Buffer, u64)>,
        /// The bind group the last submit encoding this command used, with
        /// its parameter range: kept while the command is re-recorded alike.
        bound: Option<(wgpu::BindGroup, ParamsRange)>,
    },
    Copy {
        src: wgpu::Buffer,
        src_offset: u64,
        dst: wgpu::Buffer,
        dst_offset: u64,
        size: u64,
    },
    /// Host data written into `dst` at this point of the step (it rides in the
    /// parameter buffer and is copied from there).
    Upload {
        data: Vec<u8>,
        dst: wgpu::Buffer,
        dst_offset: u64,
    },
}

/// Records a step's work; [`Recorder::submit`] sends it as one command buffer.
pub struct Recorder {
    ctx: Arc<GpuContext>,
    /// The step's commands are `cmds[..n_cmds]`; the rest are the last
    /// step's, kept so that a step recording the same dispatch at the same
    /// place reuses it (its buffers, vectors and bind group) instead of
    /// cloning and hashing them again.
    cmds: Vec<Cmd>,
    n_cmds: usize,
    reads: Vec<(wgpu::Buffer, u64, u64)>,
    timestamps: Option<(wgpu::QuerySet, wgpu::Buffer)>,
    profiling: bool,
    /// Per-kernel GPU time when profiling: label -> (dispatches, nanoseconds).
    pub profile: super::readback::Profile,
    /// Dispatches recorded since creation (for stats and tests).
    pub dispatch_count: u64,
    /// Submits made since creation.
    pub submit_count: u64,
    /// Commands (dispatches, copies, uploads) recorded since creation: while it
    /// stays the same, no buffer's contents can have changed.
    pub recorded: u64,
    /// Bind groups created since creation (one per dispatch today).
    pub bind_group_count: u64,
    /// Host nanoseconds spent encoding and submitting (not waiting).
    pub submit_host_ns: f64,
    /// Host nanoseconds spent waiting for submitted work and its readbacks.
    pub wait_ns: f64,
    /// The parameter buffer (uniforms and uploads), grown as needed.
    params_buf: Option<wgpu::Buffer>,
    /// Readback staging buffers not in use (one per submit in flight).
    staging: Vec<wgpu::Buffer>,
    /// Readbacks the next submit makes for [`Recorder::take_later`], by ticket.
    later: Vec<(u64, (wgpu::Buffer, u64, u64))>,
    next_ticket: u64,
    /// Submits not waited for yet, oldest first, with their later tickets.
    in_flight: std::collections::VecDeque<(Sent, Vec<u64>)>,
    /// Later readbacks whose submit finished, by ticket.
    landed: std::collections::HashMap<u64, Vec<u8>>,
    /// Bind groups by what they bind, with the submit that last used each.
    bind_groups: std::collections::HashMap<BindKey, (wgpu::BindGroup, u64)>,
}

/// What a submit returned.
#[derive(Debug, Default)]
pub struct SubmitResult {
    /// The bytes of each requested readback, in request order.
    pub reads: Vec<Vec<u8>>,
    /// GPU time between the start of the first and the end of the last compute pass,
    /// when timestamps are enabled and supported.
    pub gpu_ns: Option<f64>,
}

impl Recorder {
    /// A recorder on `ctx`.
    pub fn new(ctx: Arc<GpuContext>) -> Self {
        Self {
            ctx,
            cmds: Vec::new(),
            n_cmds: 0,
            reads: Vec::new(),
            timestamps: None,
            profiling: false,
            profile: Default::default(),
            dispatch_count: 0,
            recorded: 0,
            submit_count: 0,
            bind_group_count: 0,
            submit_host_ns: 0.0,
            wait_ns: 0.0,
            params_buf: None,
            staging: Vec::new(),
            later: Vec::new(),
            next_ticket: 0,
            in_flight: Default::default(),
            landed: Default::default(),
            bind_groups: Default::default(),
        }
    }

    /// Measure GPU time of each submit with timestamp queries (ignored when the
    /// adapter has no TIMESTAMP_QUERY).
    pub fn enable_timestamps(&mut self) {
        if !self.ctx.caps.timestamps || self.timestamps.is_some() {
            return;
        }
        let qs = self.ctx.device.create_query_set(&wgpu::QuerySetDescriptor {
            label: Some("kvsieve timestamps"),
            ty: wgpu::QueryType::Timestamp,
            count: 2,
        });
        let buf = self.ctx.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("kvsieve timestamp resolve"),
            size: 16,
            usage: wgpu::BufferUsages::QUERY_RESOLVE | wgpu::BufferUsages::COPY_SRC,
            mapped_at_creation: false,
        });
        self.timestamps = Some((qs, buf));
    }

    /// Per-kernel profiling: every dispatch gets its own compute pass with GPU
    /// timestamps around it (slower; for finding where the time goes). Needs
    /// TIMESTAMP_QUERY; ignored without it.
    pub fn set_profiling(&mut self, on: bool) {
        self.profiling = on && self.ctx.caps.timestamps;
    }

    /// Records one dispatch. `params` are the kernel's uniform words (binding 0);
    /// `bindings` are its storage buffers at bindings 1, 2, ...
    pub fn dispatch(
        &mut self,
        pipeline: &Arc<Pipeline>,
        params: &[u32],
        bindings: &[Binding],
        groups: [u32; 3],
    ) {
        if groups.contains(&0) {
            return;
        }
        self.record_dispatch(pipeline, params, bindings, groups, None);
    }

    /// Records a dispatch in the next command slot, reusing the command the
    /// last step left there when it ran the same pipeline on the same
    /// bindings (only its parameters and workgroup counts change).
    fn record_dispatch(
        &mut self,
        pipeline: &Arc<Pipeline>,
        params: &[u32],
        bindings: &[Binding],
        groups: [u32; 3],
        indirect: Option<(&wgpu::Buffer, u64)>,
    ) {
        self.dispatch_count += 1;
        self.recorded += 1;
        if let Some(Cmd::Dispatch {
            pipeline: p,
            params: pa,
            bindings: b,
            groups: g,
            indirect: ind,
            ..
        }) = self.cmds.get_mut(self.n_cmds)
        {
            if Arc::ptr_eq(p, pipeline) && b.as_slice() == bindings {
                pa.clear();
                pa.extend_from_slice(params);
                *g = groups;
                if ind.as_ref().map(|(b, o)| (b, *o)) != indirect {
                    *ind = indirect.map(|(b, o)| (b.clone(), o));
                }
                self.n_cmds += 1;
                return;
            }
        }
        self.put(Cmd::Dispatch {
            pipeline: pipeline.clone(),
            params: params.to_vec(),
            bindings: bindings.to_vec(),
            groups,
            indirect: indirect.map(|(b, o)| (b.clone(), o)),
            bound: None,
        });
    }

    /// Puts `cmd` in the next command slot.
    fn put(&mut self, cmd: Cmd) {
        let i = self.n_cmds;
        self.n_cmds += 1;
        if i < self.cmds.len() {
            self.cmds[i] = cmd;
        } else {
            self.cmds.push(cmd);
        }
    }

    /// Records a dispatch whose workgroup counts are read on the GPU from `args` at
    /// `offset` (three u32), written there by an earlier kernel of the same step.
    pub fn dispatch_indirect(
        &mut self,
        pipeline: &Arc<Pipeline>,
        params: &[u32],
        bindings: &[Binding],
        args: &wgpu::Buffer,
        offset: u64,
    ) {
        self.record_dispatch(pipeline, params, bindings, [0; 3], Some((args, offset)));
    }

    /// Records a buffer-to-buffer copy (sizes and offsets multiples of 4).
    pub fn copy(
        &mut self,
        src: &wgpu::Buffer,
        src_offset: u64,
        dst: &wgpu::Buffer,
        dst_offset: u64,
        size: u64,
    ) {
        self.recorded += 1;
        self.put(Cmd::Copy {
            src: src.clone(),
            src_offset,
            dst: dst.clone(),
            dst_offset,
            size,
        });
    }

    /// Records writing `data` (a multiple of 4 bytes) into `dst` at `dst_offset`
    /// (a multiple of 4), ordered with the step's other commands.
    pub fn upload(&mut self, dst: &wgpu::Buffer, dst_offset: u64, data: &[u8]) {
        if data.is_empty() {
            return;
        }
        self.recorded += 1;
        self.put(Cmd::Upload {
            data: data.to_vec(),
            dst: dst.clone(),
            dst_offset,
        });
    }

    /// Asks for `size` bytes of `buffer` at `offset` to be read back after the next submit.
    pub fn read(&mut self, buffer: &wgpu::Buffer, offset: u64, size: u64) -> usize {
        self.reads.push((buffer.clone(), offset, size));
        self.reads.len() - 1
    }

    /// True when nothing is recorded.
    pub fn is_empty(&self) -> bool {
        self.n_cmds == 0 && self.reads.is_empty() && self.later.is_empty()
    }

    /// Asks for `size` bytes of `buffer` at `offset` as they are after the next
    /// submit (waited for or not); [`Recorder::take_later`] returns them by the
    /// ticket this returns.
    pub fn read_later(&mut self, buffer: &wgpu::Buffer, offset: u64, size: u64) -> u64 {
        self.next_ticket += 1;
        let read = (buffer.clone(), offset, size);
        self.later.push((self.next_ticket, read));
        self.next_ticket
    }

    /// Submits everything recorded as one command buffer, waits, and returns the
    /// readbacks. GPU validation errors ([`Error::Gpu`]), out of memory
    /// ([`Error::OutOfMemory`]) and the device's loss ([`Error::DeviceLost`])
    /// come back as errors; the recorded work is dropped either way, so the
    /// recorder is ready for the next step.
    pub fn submit(&mut self) -> Result<SubmitResult> {
        let ctx = self.ctx.clone();
        let Some((sent, tickets)) = self.send(&ctx)? else {
            return Ok(SubmitResult::default());
        };
        let mut done = self.finish(&ctx, sent)?;
        self.keep_later(&mut done, tickets);
        Ok(done)
    }

    /// Submits everything recorded without waiting for it, so the host can
    /// record the next step while the device runs this one. Its readbacks must
    /// be [`Recorder::read_later`] ones.
    pub fn submit_pending(&mut self) -> Result<()> {
        if !self.reads.is_empty() {
            return Err(Error::Gpu(
                "a submit that is not waited for cannot carry waited-for readbacks".into(),
            ));
        }
        let ctx = self.ctx.clone();
        if let Some(sent) = self.send(&ctx)? {
            self.in_flight.push_back(sent);
        }
        Ok(())
    }

    /// The bytes [`Recorder::read_later`] asked for under `ticket`, waiting for
    /// their submit (and the ones before it) when it has not landed yet.
    pub fn take_later(&mut self, ticket: u64) -> Result<Vec<u8>> {
        loop {
            if let Some(bytes) = self.landed.remove(&ticket) {
                return Ok(bytes);
            }
            if let Some((sent, tickets)) = self.in_flight.pop_front() {
                let ctx = self.ctx.clone();
                let mut done = self.finish(&ctx, sent)?;
                self.keep_later(&mut done, tickets);
            } else if self.later.iter().any(|(t, _)| *t == ticket) {
                self.submit()?;
            } else {
                return Err(Error::Gpu(format!(
                    "readback {ticket} was not asked for, was taken, or its submit failed"
                )));
            }
        }
    }

    /// Submits not waited for and not landed yet.
    pub fn in_flight(&self) -> usize {
        self.in_flight.len()
    }

    /// Encodes and submits what is recorded (nothing when nothing is), inside
    /// error scopes; returns it with the tickets of its later readbacks, which
    /// follow the waited-for ones.
    fn send(&mut self, ctx: &GpuContext) -> Result<Option<(Sent, Vec<u64>)>> {
        if self.is_empty() {
            return Ok(None);
        }
        let mut cmds = std::mem::take(&mut self.cmds);
        let n = std::mem::take(&mut self.n_cmds);
        let mut reads = std::mem::take(&mut self.reads);
        let later = std::mem::take(&mut self.later);
        let tickets = later.iter().map(|(t, _)| *t).collect();
        reads.extend(later.into_iter().map(|(_, r)| r));
        let (start, host) = (std::time::Instant::now(), self.submit_host_ns);
        let sent = ctx.check().and_then(|()| {
            let _gl = ctx.gl_guard();
            scoped(&ctx.device, || {
                self.encode_and_submit(ctx, &mut cmds[..n], reads)
            })
        });
        // Kept for the next step to reuse; after a failed submit nothing is.
        if sent.is_ok() {
            cmds.truncate(n);
            self.cmds = cmds;
        }
        // What the submit took beyond encoding it was waiting.
        self.wait_ns += start.elapsed().as_nanos() as f64 - (self.submit_host_ns - host);
        Ok(Some((named_loss(ctx, sent)?, tickets)))
    }

    /// Waits for a sent submit and reads its readbacks.
    fn finish(&mut self, ctx: &GpuContext, sent: Sent) -> Result<SubmitResult> {
        let start = std::time::Instant::now();
        let done = match sent {
            Sent::Landed(r) => Ok(r),
            Sent::InFlight(f) => {
                let _gl = ctx.gl_guard();
                land(ctx, f, &mut self.profile).map(|(r, staging)| {
                    self.staging.extend(staging);
                    r
                })
            }
        };
        self.wait_ns += start.elapsed().as_nanos() as f64;
        named_loss(ctx, done)
    }

    /// Moves a submit's later readbacks (its last ones) to the landed ones.
    fn keep_later(&mut self, done: &mut SubmitResult, tickets: Vec<u64>) {
        let tail = done.reads.split_off(done.reads.len() - tickets.len());
        self.landed.extend(tickets.into_iter().zip(tail));
    }

    fn encode_and_submit(
        &mut self,
        ctx: &GpuContext,
        cmds: &mut [Cmd],
        reads: Vec<(wgpu::Buffer, u64, u64)>,
    ) -> Result<Sent> {
        let device = &ctx.device;
        if let Some(target) = ctx.replay() {
            self.submit_count += 1;
            let done = super::replay::submit(ctx, target.as_ref(), cmds, &reads)?;
            return Ok(Sent::Landed(done));
        }

        // All uniform params and uploads in one buffer, each at an aligned offset.
        let align = ctx.limits.min_uniform_buffer_offset_alignment.max(16) as usize;
        let encode_start = std::time::Instant::now();
        // Sized once for the step's uniforms and uploads.
        let bound: usize = cmds
            .iter()
            .map(|c| match c {
                Cmd::Dispatch { params, .. } => align + (params.len() * 4).max(16) + 16,
                Cmd::Upload { data, .. } => data.len() + 16,
                Cmd::Copy { .. } => 0,
            })
            .sum();
        let mut blob: Vec<u8> = Vec::with_capacity(bound + 16);
        let mut offsets = Vec::new();
        let mut upload_offsets = Vec::new();
        for c in cmds.iter() {
            if let Cmd::Dispatch { params, .. } = c {
                let off = blob.len().div_ceil(align) * align;
                blob.resize(off, 0);
                offsets.push(off);
                let bytes: &[u8] = bytemuck::cast_slice(params);
                blob.extend_from_slice(bytes);
                // Uniform structs are padded to 16 bytes.
                let padded = bytes.len().max(16).div_ceil(16) * 16;
                blob.resize(off + padded, 0);
            }
        }
        // Uploads after every uniform, so their sizes never move a uniform's
        // offset (which would change its bind group).
        for c in cmds.iter() {
            if let Cmd::Upload { data, .. } = c {
                let off = blob.len().div_ceil(16) * 16;
                blob.resize(off, 0);
                upload_offsets.push(off);
                blob.extend_from_slice(data);
            }
        }
        let uniforms = if blob.is_empty() {
            None
        } else {
            blob.resize(blob.len().div_ceil(16) * 16, 0);
            let buf = match self.params_buf.take() {
                Some(b) if b.size() >= blob.len() as u64 => b,
                _ => {
                    super::buffer::note_created();
                    device.create_buffer(&wgpu::BufferDescriptor {
                        label: Some("kvsieve params"),
                        size: (blob.len() as u64).next_power_of_two().max(4096),
                        usage: wgpu::BufferUsages::UNIFORM
                            | wgpu::BufferUsages::COPY_DST
                            | wgpu::BufferUsages::COPY_SRC,
                        mapped_at_creation: false,
                    })
                }
            };
            ctx.queue.write_buffer(&buf, 0, &blob);
            self.params_buf = Some(buf.clone());
            Some(buf)
        };
        let submit_index = self.submit_count;

        let mut enc = device.create_command_encoder(&wgpu::CommandEncoderDescriptor {
            label: Some("kvsieve step"),
        });
        let n_dispatches = cmds
            .iter()
            .filter(|c| matches!(c, Cmd::Dispatch { .. }))
            .count();
        // wgpu caps a query set at 4096 queries.
        let profiling = self.profiling && n_dispatches > 0 && 2 * n_dispatches <= 4096;
        let n_passes = if profiling {
            n_dispatches
        } else {
            count_passes(cmds)
        };
        let prof = profiling.then(|| {
            let qs = device.create_query_set(&wgpu::QuerySetDescriptor {
                label: Some("kvsieve profile"),
                ty: wgpu::QueryType::Timestamp,
                count: 2 * n_dispatches as u32,
            });
            let buf = device.create_buffer(&wgpu::BufferDescriptor {
                label: Some("kvsieve profile resolve"),
                size: 16 * n_dispatches as u64,
                usage: wgpu::BufferUsages::QUERY_RESOLVE | wgpu::BufferUsages::COPY_SRC,
                mapped_at_creation: false,
            });
            (qs, buf)
        });
        let mut pass_labels: Vec<String> = Vec::new();
        let mut pass_index = 0usize;
        let mut i = 0usize;
        let mut dispatch_index = 0usize;
        let mut upload_index = 0usize;
        while i < cmds.len() {
            match &cmds[i] {
                Cmd::Copy {
                    src,
                    src_offset,
                    dst,
                    dst_offset,
                    size,
                } => {
                    enc.copy_buffer_to_buffer(src, *src_offset, dst, *dst_offset, Some(*size));
                    i += 1;
                }
                Cmd::Upload {
                    data,
                    dst,
                    dst_offset,
                } => {
                    if let Some(u) = &uniforms {
                        let src_offset = upload_offsets[upload_index] as u64;
                        let size = data.len() as u64;
                        enc.copy_buffer_to_buffer(u, src_offset, dst, *dst_offset, Some(size));
                    }
                    upload_index += 1;
                    i += 1;
                }
                Cmd::Dispatch { .. } => {
                    let ts = match &prof {
                        Some((qs, _)) => Some(wgpu::ComputePassTimestampWrites {
                            query_set: qs,
                            beginning_of_pass_write_index: Some(2 * pass_index as u32),
                            end_of_pass_write_index: Some(2 * pass_index as u32 + 1),
                        }),
                        // The first pass writes the start, the last the end; a pass
                        // between them (copies split passes) writes nothing.
                        None => self
                            .timestamps
                            .as_ref()
                            .filter(|_| pass_index == 0 || pass_index + 1 == n_passes)
                            .map(|(qs, _)| wgpu::ComputePassTimestampWrites {
                                query_set: qs,
                                beginning_of_pass_write_index: (pass_index == 0).then_some(0),
                                end_of_pass_write_index: (pass_index + 1 == n_passes).then_some(1),
                            }),
                    };
                    let mut pass = enc.begin_compute_pass(&wgpu::ComputePassDescriptor {
                        label: Some("kvsieve"),
                        timestamp_writes: ts,
                    });
                    while let Some(Cmd::Dispatch {
                        pipeline,
                        params,
                        bindings,
                        groups,
                        indirect,
                        bound,
                    }) = cmds.get_mut(i)
                    {
                        if profiling && pass_labels.len() > pass_index {
                            break;
                        }
                        if profiling {
                            pass_labels.push(pipeline.label.clone());
                        }
                        let uoff = offsets[dispatch_index] as u64;
                        let usize_ = (params.len() * 4).max(16).div_ceil(16) as u64 * 16;
                        // The command's own bind group while its uniform range
                        // is where it was (the storage ranges are the same, or
                        // the command would be a new one); else the cache's.
                        let same = match (bound.as_ref().map(|(_, r)| r), &uniforms) {
                            (Some(Some((b, o, n))), Some(u)) => {
                                b == u && *o == uoff && *n == usize_
                            }
                            (Some(None), None) => true,
                            _ => false,
                        };
                        if !same {
                            let range = uniforms.as_ref().map(|u| (u.clone(), uoff, usize_));
                            let key = BindKey {
                                layout: pipeline.layout.clone(),
                                params: range.clone(),
                                bindings: bindings
                                    .iter()
                                    .map(|b| (b.buffer.clone(), b.offset, b.size))
                                    .collect(),
                            };
                            let bg = match self.bind_groups.get_mut(&key) {
                                Some((bg, used)) => {
                                    *used = submit_index;
                                    bg.clone()
                                }
                                None => {
                                    self.bind_group_count += 1;
                                    let bg = create_bind_group(device, &pipeline.label, &key);
                                    self.bind_groups.insert(key, (bg.clone(), submit_index));
                                    bg
                                }
                            };
                            *bound = Some((bg, range));
                        }
                        pass.set_pipeline(&pipeline.pipeline);
                        pass.set_bind_group(0, bound.as_ref().map(|(bg, _)| bg), &[]);
                        match indirect {
                            Some((buf, off)) => pass.dispatch_workgroups_indirect(buf, *off),
                            None => pass.dispatch_workgroups(groups[0], groups[1], groups[2]),
                        }
                        dispatch_index += 1;
                        i += 1;
                    }
                    pass_index += 1;
                }
            }
        }
        // Readbacks: one staging buffer for all of them.
        let mut staging_offsets = Vec::new();
        let mut total = 0u64;
        for (_, _, size) in &reads {
            staging_offsets.push(total);
            total += size.div_ceil(8) * 8;
        }
        if let Some((qs, resolve)) = &self.timestamps {
            if n_passes > 0 && !profiling {
                enc.resolve_query_set(qs, 0..2, resolve, 0);
            }
        }
        let want_ts = self.timestamps.is_some() && n_passes > 0 && !profiling;
        let ts_offset = total;
        if want_ts {
            total += 16;
        }
        if let Some((qs, resolve)) = &prof {
            enc.resolve_query_set(qs, 0..2 * n_dispatches as u32, resolve, 0);
        }
        let prof_offset = total;
        if profiling {
            total += 16 * n_dispatches as u64;
        }
        let staging = if total > 0 {
            // A staging buffer still mapped for an earlier submit is not free.
            let free = self.staging.iter().position(|b| b.size() >= total);
            Some(match free {
                Some(k) => self.staging.swap_remove(k),
                None => {
                    super::buffer::note_created();
                    device.create_buffer(&wgpu::BufferDescriptor {
                        label: Some("kvsieve readback"),
                        size: total.next_power_of_two().max(4096),
                        usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
                        mapped_at_creation: false,
                    })
                }
            })
        } else {
            None
        };
        if let Some(st) = &staging {
            for ((buf, off, size), so) in reads.iter().zip(&staging_offsets) {
                enc.copy_buffer_to_buffer(buf, *off, st, *so, Some(size.div_ceil(4) * 4));
            }
            if want_ts {
                if let Some((_, resolve)) = &self.timestamps {
                    enc.copy_buffer_to_buffer(resolve, 0, st, ts_offset, Some(16));
                }
            }
            if let Some((_, resolve)) = &prof {
                enc.copy_buffer_to_buffer(
                    resolve,
                    0,
                    st,
                    prof_offset,
                    Some(16 * n_dispatches as u64),
                );
            }
        }
        if ctx.take_poison() {
            // The test hook: a copy past the end of a buffer, which wgpu's
            // validation rejects, makes the whole command buffer invalid.
            let b = super::buffer::storage(device, 16, "poison")?;
            enc.copy_buffer_to_buffer(&b, 0, &b, 16, Some(16));
        }
        let index = ctx.queue.submit([enc.finish()]);
        self.submit_count += 1;
        // Forget bind groups that recent submits did not use (a command's own
        // counts as used: reusing it does not touch the cache).
        if self.submit_count.is_multiple_of(BIND_GROUP_TTL) {
            let oldest = submit_index.saturating_sub(BIND_GROUP_TTL);
            // wgpu's handles hash and compare by identity.
            #[allow(clippy::mutable_key_type)]
            let held: std::collections::HashSet<&wgpu::BindGroup> = cmds
                .iter()
                .filter_map(|c| match c {
                    Cmd::Dispatch {
                        bound: Some((bg, _)),
                        ..
                    } => Some(bg),
                    _ => None,
                })
                .collect();
            self.bind_groups
                .retain(|_, (bg, used)| *used >= oldest || held.contains(&*bg));
        }
        // The map waits for the submit; asking now lets a later poll land it.
        let mapped = staging.as_ref().map(start_map);
        self.submit_host_ns += encode_start.elapsed().as_nanos() as f64;
        Ok(Sent::InFlight(InFlight {
            index,
            staging,
            mapped,
            reads: reads
                .iter()
                .zip(staging_offsets)
                .map(|((_, _, size), so)| (so, *size))
                .collect(),
            ts_offset: want_ts.then_some(ts_offset),
            profile: profiling.then_some((prof_offset, pass_labels)),
        }))
    }
}

/// Compute passes a step's commands take (copies and uploads end a pass).
fn count_passes(cmds: &[Cmd]) -> usize {
    let mut n = 0;
    let mut in_pass = false;
    for c in cmds {
        match c {
            Cmd::Dispatch { .. } => {
                if !in_pass {
                    n += 1;
                    in_pass = true;
                }
            }
            Cmd::Copy { .. } | Cmd::Upload { .. } => in_pass = false,
        }
    }
    n
}
