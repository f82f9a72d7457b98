//! Adapter choice, device creation and a printable description of what the
//! adapter offers.

use crate::error::{Error, Result};
use std::fmt::Write as _;

/// Optional capabilities the kernels can take advantage of.
#[derive(Clone, Copy, Debug, Default)]
pub struct Capabilities {
    /// `SHADER_F16`: f16 arithmetic in WGSL.
    pub shader_f16: bool,
    /// `SUBGROUP`: subgroup operations in WGSL.
    pub subgroups: bool,
    /// `TIMESTAMP_QUERY`: GPU timestamps around compute passes.
    pub timestamps: bool,
}

/// How to pick the adapter; [`AdapterRequest::from_env`] reads
/// `KVSIEVE_ADAPTER` (substring of the adapter name), `KVSIEVE_BACKEND`
/// (vulkan, metal, dx12, gl) and `KVSIEVE_LIMITS` (`adapter`, the default, or
/// `webgpu`).
#[derive(Clone, Debug, Default)]
pub struct AdapterRequest {
    /// Only adapters whose name contains this (case-insensitive).
    pub name_contains: Option<String>,
    /// Only this backend.
    pub backend: Option<wgpu::Backend>,
    /// Create the device with exactly WebGPU's default limits (8 storage
    /// buffers per stage, 16 KiB of workgroup memory, 256 invocations, 128 MiB
    /// storage bindings) instead of the adapter's own: what a browser offers
    /// at the least, so kernels are checked against it on any adapter.
    pub webgpu_limits: bool,
}

impl AdapterRequest {
    /// Reads the overrides from the environment; an unknown backend name is an error.
    pub fn from_env() -> Result<Self> {
        let name_contains = std::env::var("KVSIEVE_ADAPTER")
            .ok()
            .filter(|s| !s.is_empty());
        let backend = match std::env::var("KVSIEVE_BACKEND") {
            Ok(s) if !s.is_empty() => Some(parse_backend(&s)?),
            _ => None,
        };
        let webgpu_limits = match std::env::var("KVSIEVE_LIMITS").as_deref() {
            Err(_) | Ok("") | Ok("adapter") => false,
            Ok("webgpu") => true,
            Ok(other) => {
                return Err(Error::InvalidOption(format!(
                    "KVSIEVE_LIMITS={other:?}: expected adapter or webgpu"
                )))
            }
        };
        Ok(Self {
            name_contains,
            backend,
            webgpu_limits,
        })
    }
}

/// Parses a backend name as used by `KVSIEVE_BACKEND`.
pub fn parse_backend(s: &str) -> Result<wgpu::Backend> {
    match s.to_ascii_lowercase().as_str() {
        "vulkan" | "vk" => Ok(wgpu::Backend::Vulkan),
        "metal" | "mtl" => Ok(wgpu::Backend::Metal),
        "dx12" | "d3d12" => Ok(wgpu::Backend::Dx12),
        "gl" | "gles" | "opengl" => Ok(wgpu::Backend::Gl),
        other => Err(Error::InvalidOption(format!(
            "KVSIEVE_BACKEND={other:?}: expected one of vulkan, metal, dx12, gl"
        ))),
    }
}

fn backend_bits(b: wgpu::Backend) -> wgpu::Backends {
    match b {
        wgpu::Backend::Vulkan => wgpu::Backends::VULKAN,
        wgpu::Backend::Metal => wgpu::Backends::METAL,
        wgpu::Backend::Dx12 => wgpu::Backends::DX12,
        wgpu::Backend::Gl => wgpu::Backends::GL,
        _ => wgpu::Backends::all(),
    }
}

/// Ranks adapters: discrete, then integrated, then virtual, then CPU drivers;
/// among equals, native APIs before GL (GL compute is a fallback).
fn rank(info: &wgpu::AdapterInfo) -> (u32, u32) {
    let ty = match info.device_type {
        wgpu::DeviceType::DiscreteGpu => 0,
        wgpu::DeviceType::IntegratedGpu => 1,
        wgpu::DeviceType::VirtualGpu => 2,
        wgpu::DeviceType::Cpu => 3,
        wgpu::DeviceType::Other => 4,
    };
    let api = if info.backend == wgpu::Backend::Gl {
        1
    } else {
        0
    };
    (ty, api)
}

/// The device the GPU executor runs on, with the adapter's real limits.
pub struct GpuContext {
    /// The wgpu device.
    pub device: wgpu::Device,
    /// Its queue.
    pub queue: wgpu::Queue,
    /// Adapter name, backend, driver.
    pub info: wgpu::AdapterInfo,
    /// The limits the device was created with (the adapter's own, or WebGPU's
    /// defaults under `KVSIEVE_LIMITS=webgpu`).
    pub limits: wgpu::Limits,
    /// Optional features that were enabled.
    pub caps: Capabilities,
    /// Where submits run instead of this device (a test hook, see [`super::replay`]).
    replay: Option<std::sync::Arc<dyn super::Replay>>,
    gl_lock: std::sync::Mutex<()>,
    /// Errors wgpu reported outside an error scope, and the device's loss.
    faults: std::sync::Arc<Faults>,
    /// Bytes of the adapter's largest device-local memory heap, where the
    /// adapter reports it (Vulkan).
    memory: Option<u64>,
}

/// What wgpu reported through the device's callbacks: an error outside any
/// error scope (by default wgpu panics on these) or the device's loss.
#[derive(Default)]
struct Faults {
    lost: std::sync::Mutex<Option<String>>,
    uncaptured: std::sync::Mutex<Option<Error>>,
    /// Test hook: the next submit carries an invalid dispatch.
    poison: std::sync::atomic::AtomicBool,
}

/// Runs `f` inside out-of-memory and validation error scopes: wgpu's error,
/// when there is one, is what went wrong (whatever `f` returned is its
/// consequence); errors do not reach wgpu's default handler, which panics.
pub(crate) fn scoped<T>(device: &wgpu::Device, f: impl FnOnce() -> Result<T>) -> Result<T> {
    let oom = device.push_error_scope(wgpu::ErrorFilter::OutOfMemory);
    let validation = device.push_error_scope(wgpu::ErrorFilter::Validation);
    let done = f();
    let validation = pollster::block_on(validation.pop());
    let oom = pollster::block_on(oom.pop());
    match oom.or(validation) {
        Some(e) => Err(typed(e)),
        None => done,
    }
}

/// `device.poll`, with the panic wgpu raises when a poll fails for a reason it
/// has no error value for (the device lost mid-wait) caught as an error; the
/// caller's loss check names it.
pub(crate) fn poll(device: &wgpu::Device, kind: wgpu::PollType) -> Result<()> {
    let polled = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| device.poll(kind)));
    match polled {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(e)) => Err(Error::Gpu(format!("waiting for the device: {e}"))),
        Err(_) => Err(Error::DeviceLost("waiting for the device failed".into())),
    }
}

/// A wgpu error as kvsieve's.
pub(crate) fn typed(e: wgpu::Error) -> Error {
    match e {
        wgpu::Error::OutOfMemory { source } => Error::OutOfMemory(format!("GPU: {source}")),
        other => Error::Gpu(format!("validation: {other}")),
    }
}

impl std::fmt::Debug for GpuContext {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "GpuContext({} on {:?})",
            self.info.name, self.info.backend
        )
    }
}

/// Text shown when no adapter exists, telling the user how to get one.
pub const INSTALL_HINT: &str = "kvsieve needs a Vulkan, Metal, DX12 or OpenGL (EGL) adapter. \
On Linux without a GPU install Mesa's CPU drivers: `apt-get install -y mesa-vulkan-drivers` \
(lavapipe, Vulkan) or `libegl1 libgl1-mesa-dri` (llvmpipe, GL).";

/// The size of the adapter's largest device-local memory heap (Vulkan only,
/// on the platforms where wgpu builds its Vulkan backend by default).
#[cfg(any(windows, target_os = "linux", target_os = "android"))]
fn device_local_heap(adapter: &wgpu::Adapter) -> Option<u64> {
    // SAFETY: only reads the physical device's memory properties through the
    // instance that enumerated it; nothing is kept past this call.
    let hal = unsafe { adapter.as_hal::<wgpu::hal::api::Vulkan>() }?;
    let props = unsafe {
        hal.shared_instance()
            .raw_instance()
            .get_physical_device_memory_properties(hal.raw_physical_device())
    };
    let n = (props.memory_heap_count as usize).min(props.memory_heaps.len());
    // VK_MEMORY_HEAP_DEVICE_LOCAL_BIT
    props.memory_heaps[..n]
        .iter()
        .filter(|h| h.flags.as_raw() & 1 != 0)
        .map(|h| h.size)
        .max()
}

#[cfg(not(any(windows, target_os = "linux", target_os = "android")))]
fn device_local_heap(_adapter: &wgpu::Adapter) -> Option<u64> {
    None
}

impl GpuContext {
    /// Picks the adapter per [`AdapterRequest::from_env`] and creates the device.
    pub fn new() -> Result<Self> {
        Self::with_request(&AdapterRequest::from_env()?)
    }

    /// Picks an adapter matching `req`, preferring discrete over integrated over
    /// anything else, and creates a device with the adapter's own limits (or
    /// WebGPU's defaults, see [`AdapterRequest::webgpu_limits`]).
    pub fn with_request(req: &AdapterRequest) -> Result<Self> {
        // Native APIs first; GL (whose EGL probing is slow and noisy) only when no
        // native adapter matches.
        let tries = match req.backend {
            Some(b) => vec![backend_bits(b)],
            None => vec![wgpu::Backends::PRIMARY, wgpu::Backends::GL],
        };
        let mut candidates = Vec::new();
        for backends in tries {
            let mut desc = wgpu::InstanceDescriptor::new_without_display_handle();
            desc.backends = backends;
            let instance = wgpu::Instance::new(desc);
            candidates = pollster::block_on(instance.enumerate_adapters(backends))
                .into_iter()
                .filter(|a| {
                    let info = a.get_info();
                    req.name_contains.as_ref().is_none_or(|n| {
                        info.name
                            .to_ascii_lowercase()
                            .contains(&n.to_ascii_lowercase())
                    })
                })
                // Compute shaders are required; GL adapters without them are useless here.
                .filter(|a| {
                    a.get_downlevel_capabilities()
                        .flags
                        .contains(wgpu::DownlevelFlags::COMPUTE_SHADERS)
                })
                .collect::<Vec<_>>();
            if !candidates.is_empty() {
                break;
            }
        }
        candidates.sort_by_key(|a| rank(&a.get_info()));
        let adapter = candidates.into_iter().next().ok_or_else(|| {
            let filter = match (&req.name_contains, req.backend) {
                (None, None) => String::new(),
                (n, b) => format!(" matching adapter {n:?} backend {b:?}"),
            };
            Error::NoAdapter(format!(
                "no adapter with compute shaders found{filter}. {INSTALL_HINT}"
            ))
        })?;
        let info = adapter.get_info();
        let supported = adapter.features();
        let mut features = wgpu::Features::empty();
        let caps = Capabilities {
            shader_f16: supported.contains(wgpu::Features::SHADER_F16),
            subgroups: supported.contains(wgpu::Features::SUBGROUP),
            timestamps: supported.contains(wgpu::Features::TIMESTAMP_QUERY),
        };
        for (on, f) in [
            (caps.shader_f16, wgpu::Features::SHADER_F16),
            (caps.subgroups, wgpu::Features::SUBGROUP),
            (caps.timestamps, wgpu::Features::TIMESTAMP_QUERY),
        ] {
            if on {
                features |= f;
            }
        }
        // wgpu's default limits are WebGPU's defaults.
        let limits = if req.webgpu_limits {
            wgpu::Limits::default()
        } else {
            adapter.limits()
        };
        let (device, queue) = pollster::block_on(adapter.request_device(&wgpu::DeviceDescriptor {
            label: Some("kvsieve"),
            required_features: features,
            required_limits: limits.clone(),
            experimental_features: wgpu::ExperimentalFeatures::disabled(),
            memory_hints: wgpu::MemoryHints::Performance,
            trace: wgpu::Trace::Off,
        }))
        .map_err(|e| Error::Gpu(format!("request_device on {}: {e}", info.name)))?;
        let faults = std::sync::Arc::new(Faults::default());
        let f = faults.clone();
        device.on_uncaptured_error(std::sync::Arc::new(move |e: wgpu::Error| {
            let mut slot = f.uncaptured.lock().unwrap_or_else(|e| e.into_inner());
            slot.get_or_insert(typed(e));
        }));
        let f = faults.clone();
        device.set_device_lost_callback(move |reason, msg| {
            let mut lost = f.lost.lock().unwrap_or_else(|e| e.into_inner());
            lost.get_or_insert(format!("{reason:?}: {msg}"));
        });
        Ok(Self {
            device,
            queue,
            memory: device_local_heap(&adapter),
            info,
            limits,
            caps,
            replay: None,
            gl_lock: std::sync::Mutex::new(()),
            faults,
        })
    }

    /// Bytes of the adapter's largest device-local memory heap, where the
    /// adapter reports it (Vulkan; on integrated GPUs this is shared system
    /// memory). `None` elsewhere, and for CPU drivers, whose heap size is not
    /// a limit (lavapipe reports 2 GiB and allocates past it from the host).
    pub fn memory_bytes(&self) -> Option<u64> {
        self.memory
            .filter(|_| self.info.device_type != wgpu::DeviceType::Cpu)
    }

    /// The device's state: an error once it is lost (every later call), or
    /// the first error wgpu reported outside an error scope since the last
    /// check (taken).
    pub fn check(&self) -> Result<()> {
        self.check_lost()?;
        let taken = self
            .faults
            .uncaptured
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        taken.map_or(Ok(()), Err)
    }

    /// An error when the device is lost (every call after the loss).
    pub(crate) fn check_lost(&self) -> Result<()> {
        match &*self.faults.lost.lock().unwrap_or_else(|e| e.into_inner()) {
            Some(msg) => Err(Error::DeviceLost(format!(
                "{} ({msg}); load the model again",
                self.info.name
            ))),
            None => Ok(()),
        }
    }

    /// The device's loss, once wgpu has reported it: a destroyed device is
    /// reported from its next poll, which this makes (without waiting).
    pub(crate) fn lost(&self) -> Option<Error> {
        let _ = poll(&self.device, wgpu::PollType::Poll);
        self.check_lost().err()
    }

    /// Test hook: the next submit on this device also records a command
    /// that wgpu's validation rejects (a copy past a buffer's end), so the
    /// path from a device error to the caller can be exercised on any adapter.
    #[doc(hidden)]
    pub fn poison_next_submit(&self) {
        self.faults
            .poison
            .store(true, std::sync::atomic::Ordering::SeqCst);
    }

    /// Takes the poison flag (see [`GpuContext::poison_next_submit`]).
    pub(crate) fn take_poison(&self) -> bool {
        self.faults
            .poison
            .swap(false, std::sync::atomic::Ordering::SeqCst)
    }

    /// Runs every later submit on `target` instead of this device: buffers stay
    /// here and hold what the target computed (see [`super::replay`]).
    pub fn set_replay(&mut self, target: std::sync::Arc<dyn super::Replay>) {
        self.replay = Some(target);
    }

    /// The replay target, if any.
    pub fn replay(&self) -> Option<&std::sync::Arc<dyn super::Replay>> {
        self.replay.as_ref()
    }

    /// On the GL backend, serialises use of the device across threads: wgpu's GL
    /// context lock gives up (panics) after a short wait, which a long submit on
    /// another thread exceeds. Other backends are thread-safe and get `None`.
    pub fn gl_guard(&self) -> Option<std::sync::MutexGuard<'_, ()>> {
        (self.info.backend == wgpu::Backend::Gl)
            .then(|| self.gl_lock.lock().unwrap_or_else(|e| e.into_inner()))
    }

    /// Largest byte size of one storage binding (128 MiB on lavapipe).
    pub fn max_binding(&self) -> u64 {
        self.limits
            .max_storage_buffer_binding_size
            .min(self.limits.max_buffer_size)
    }

    /// Adapter, backend, enabled features and the limits kernels care about.
    pub fn describe(&self) -> String {
        let l = &self.limits;
        let mut s = String::new();
        let _ = writeln!(
            s,
            "adapter: {} ({:?}, {:?})",
            self.info.name, self.info.device_type, self.info.backend
        );
        let _ = writeln!(s, "driver: {} {}", self.info.driver, self.info.driver_info);
        let _ = writeln!(
            s,
            "features: shader_f16={} subgroups={} timestamps={}",
            self.caps.shader_f16, self.caps.subgroups, self.caps.timestamps
        );
        let _ = writeln!(
            s,
            "limits: max_storage_binding={} MiB, max_buffer={} MiB, storage_buffers_per_stage={}, \
             workgroup_storage={} B, invocations_per_workgroup={}, workgroups_per_dim={}",
            l.max_storage_buffer_binding_size >> 20,
            l.max_buffer_size >> 20,
            l.max_storage_buffers_per_shader_stage,
            l.max_compute_workgroup_storage_size,
            l.max_compute_invocations_per_workgroup,
            l.max_compute_workgroups_per_dimension
        );
        s
    }
}
