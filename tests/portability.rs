//! Portability without the platforms: every pipeline the crate builds (shader,
//! entry point and override constants as the pipeline cache records them, under
//! the CPU-driver and the GPU tunings) is translated with naga as wgpu-hal 30's
//! backends translate it: MSL (Metal), HLSL at shader model 5.1 (FXC) and 6.0
//! (DXC), and SPIR-V (Vulkan), the SPIR-V validated by `spirv-val`. Each entry
//! point's storage buffers, workgroup memory and invocations are measured from
//! naga's IR and checked against WebGPU's default limits. The table goes to
//! `target/portability.md` (docs/PORTABILITY.md holds a copy), the pipeline
//! list to `target/portability-pipelines.txt`: under `KVSIEVE_BROWSER` the
//! test compiles that list in Chromium instead of driving the engine again,
//! when the same test binary wrote it.
//!
//! `spirv-val` comes from Debian's `spirv-tools`; without it the SPIR-V is only
//! written, unless `KVSIEVE_REQUIRE_SPIRV_VAL=1` (set by `.ci/run`) makes its
//! absence a failure.

mod common;

use kvsieve::attention::{AttentionPolicy, QuestConfig, TidalConfig, TokenSelectConfig};
use kvsieve::generate::{Engine, GenerateParams, Options};
use kvsieve::gpu::{pipelines_built, PipelineKey};
use kvsieve::ops::prelude::*;
use kvsieve::quant::DType;
use kvsieve::shaders::{Shader, ALL};
use kvsieve::Speculate;
use naga::back::{hlsl, msl, spv};
use naga::valid::{Capabilities, ValidationFlags, Validator};
use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;

/// WebGPU's default limits (what a browser guarantees).
const WEBGPU_STORAGE_BUFFERS: usize = 8;
const WEBGPU_WORKGROUP_BYTES: u32 = 16384;
const WEBGPU_INVOCATIONS: u32 = 256;
/// Metal's buffer argument table: 31 slots per stage.
const METAL_BUFFER_SLOTS: usize = 31;

/// What one entry point needs, from naga's IR after the overrides are applied.
#[derive(Clone, Copy, Debug, Default)]
struct Needs {
    storage_buffers: usize,
    uniform_buffers: usize,
    workgroup_bytes: u32,
    invocations: u32,
}

#[derive(Default)]
struct Report {
    needs: Needs,
    msl: Option<String>,
    hlsl51: Option<String>,
    hlsl60: Option<String>,
    spv: Option<String>,
    /// None: spirv-val absent.
    spv_val: Option<Option<String>>,
}

impl Report {
    fn failures(&self) -> Vec<String> {
        let mut f = Vec::new();
        for (what, e) in [
            ("MSL", &self.msl),
            ("HLSL 5.1", &self.hlsl51),
            ("HLSL 6.0", &self.hlsl60),
            ("SPIR-V", &self.spv),
        ] {
            if let Some(e) = e {
                f.push(format!("{what}: {e}"));
            }
        }
        if let Some(Some(e)) = &self.spv_val {
            f.push(format!("spirv-val: {e}"));
        }
        let n = self.needs;
        if n.storage_buffers > WEBGPU_STORAGE_BUFFERS {
            f.push(format!(
                "{} storage buffers (WebGPU default {WEBGPU_STORAGE_BUFFERS})",
                n.storage_buffers
            ));
        }
        if n.workgroup_bytes > WEBGPU_WORKGROUP_BYTES {
            f.push(format!(
                "{} bytes of workgroup memory (WebGPU default {WEBGPU_WORKGROUP_BYTES})",
                n.workgroup_bytes
            ));
        }
        if n.invocations > WEBGPU_INVOCATIONS {
            f.push(format!(
                "{} invocations per workgroup (WebGPU default {WEBGPU_INVOCATIONS})",
                n.invocations
            ));
        }
        if n.storage_buffers + n.uniform_buffers + 1 > METAL_BUFFER_SLOTS {
            f.push("more buffers than Metal's 31 slots".into());
        }
        f
    }
}

fn parse(shader: Shader) -> (naga::Module, naga::valid::ModuleInfo) {
    let module = naga::front::wgsl::parse_str(shader.source)
        .unwrap_or_else(|e| panic!("{}: {}", shader.name, e.emit_to_string(shader.source)));
    let info = Validator::new(ValidationFlags::all(), Capabilities::all())
        .validate(&module)
        .unwrap_or_else(|e| panic!("{}: {e:?}", shader.name));
    (module, info)
}

fn needs(module: &naga::Module, info: &naga::valid::ModuleInfo, ep: usize) -> Needs {
    let fi = info.get_entry_point(ep);
    let mut n = Needs {
        invocations: module.entry_points[ep].workgroup_size.iter().product(),
        ..Default::default()
    };
    for (h, g) in module.global_variables.iter() {
        if fi[h].is_empty() {
            continue; // not used by this entry point: not counted by WebGPU either
        }
        match g.space {
            naga::AddressSpace::Storage { .. } => n.storage_buffers += 1,
            naga::AddressSpace::Uniform => n.uniform_buffers += 1,
            naga::AddressSpace::WorkGroup => {
                n.workgroup_bytes += module.types[g.ty].inner.size(module.to_ctx())
            }
            _ => {}
        }
    }
    n
}

/// Group-0 bindings of the entry point in binding order: (binding, space).
fn bindings(module: &naga::Module) -> Vec<(naga::ResourceBinding, naga::AddressSpace)> {
    let mut v: Vec<_> = module
        .global_variables
        .iter()
        .filter_map(|(_, g)| g.binding.map(|b| (b, g.space)))
        .collect();
    v.sort_by_key(|(b, _)| (b.group, b.binding));
    v
}

/// Metal: one buffer slot per binding in order, then the sizes buffer (the
/// kernels use runtime-sized arrays), as wgpu-hal's create_pipeline_layout.
fn msl_options(module: &naga::Module, entry: &str) -> msl::Options {
    let mut resources = msl::BindingMap::default();
    let mut slot = 0u8;
    let mut storage = false;
    for (b, space) in bindings(module) {
        let mutable = match space {
            naga::AddressSpace::Storage { access } => {
                storage = true;
                access.contains(naga::StorageAccess::STORE)
            }
            _ => false,
        };
        resources.insert(
            b,
            msl::BindTarget {
                buffer: Some(slot),
                mutable,
                ..Default::default()
            },
        );
        slot += 1;
    }
    msl::Options {
        lang_version: (2, 4),
        per_entry_point_map: msl::EntryPointResourceMap::from([(
            entry.to_string(),
            msl::EntryPointResources {
                resources,
                immediates_buffer: None,
                sizes_buffer: storage.then_some(slot),
            },
        )]),
        fake_missing_bindings: false,
        bounds_check_policies: naga::proc::BoundsCheckPolicies {
            index: naga::proc::BoundsCheckPolicy::Restrict,
            buffer: naga::proc::BoundsCheckPolicy::Restrict,
            image_load: naga::proc::BoundsCheckPolicy::Restrict,
            binding_array: naga::proc::BoundsCheckPolicy::Unchecked,
        },
        // The pipelines ask for no zeroing (every kernel initialises what it reads).
        zero_initialize_workgroup_memory: false,
        force_loop_bounding: true,
        ..Default::default()
    }
}

/// DX12: CBVs, SRVs (read-only storage) and UAVs (read-write storage) each
/// numbered from register 0 in binding order, space 0; the special constants
/// (num_workgroups) in the next CBV register, as wgpu-hal's create_pipeline_layout.
fn hlsl_options(module: &naga::Module, sm: hlsl::ShaderModel) -> hlsl::Options {
    let mut binding_map = hlsl::BindingMap::default();
    let (mut cbv, mut srv, mut uav) = (0u32, 0u32, 0u32);
    for (b, space) in bindings(module) {
        let reg = match space {
            naga::AddressSpace::Uniform => &mut cbv,
            naga::AddressSpace::Storage { access }
                if !access.contains(naga::StorageAccess::STORE) =>
            {
                &mut srv
            }
            _ => &mut uav,
        };
        binding_map.insert(
            b,
            hlsl::BindTarget {
                space: 0,
                register: *reg,
                binding_array_size: None,
                dynamic_storage_buffer_offsets_index: None,
                restrict_indexing: false,
            },
        );
        *reg += 1;
    }
    hlsl::Options {
        shader_model: sm,
        binding_map,
        fake_missing_bindings: false,
        special_constants_binding: Some(hlsl::BindTarget {
            space: 0,
            register: cbv,
            binding_array_size: None,
            dynamic_storage_buffer_offsets_index: None,
            restrict_indexing: false,
        }),
        zero_initialize_workgroup_memory: false,
        restrict_indexing: true,
        force_loop_bounding: true,
        ..Default::default()
    }
}

/// Vulkan 1.1 (SPIR-V 1.3), bounds checks restricted (no robust buffer access
/// assumed), no workgroup zeroing, as wgpu-hal's adapter options for our pipelines.
fn spv_options() -> spv::Options<'static> {
    spv::Options {
        lang_version: (1, 3),
        flags: spv::WriterFlags::empty(),
        bounds_check_policies: naga::proc::BoundsCheckPolicies {
            index: naga::proc::BoundsCheckPolicy::Restrict,
            buffer: naga::proc::BoundsCheckPolicy::Restrict,
            image_load: naga::proc::BoundsCheckPolicy::Restrict,
            binding_array: naga::proc::BoundsCheckPolicy::Unchecked,
        },
        zero_initialize_workgroup_memory: spv::ZeroInitializeWorkgroupMemoryMode::None,
        force_loop_bounding: true,
        // Vulkan keeps WGSL's (group, binding) as (set, binding).
        fake_missing_bindings: true,
        ..Default::default()
    }
}

fn spirv_val() -> Option<std::path::PathBuf> {
    let ok = std::process::Command::new("spirv-val")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !ok && std::env::var("KVSIEVE_REQUIRE_SPIRV_VAL").is_ok_and(|v| v == "1") {
        panic!("KVSIEVE_REQUIRE_SPIRV_VAL=1 but spirv-val is not installed (apt-get install spirv-tools)");
    }
    ok.then(|| "spirv-val".into())
}

fn translate(
    parsed: &HashMap<&'static str, (naga::Module, naga::valid::ModuleInfo)>,
    key: &PipelineKey,
    val: Option<&std::path::Path>,
    tmp: &std::path::Path,
) -> Report {
    let (module, info) = &parsed[key.shader.name];
    let constants: naga::back::PipelineConstants = key
        .constants
        .iter()
        .map(|(k, v)| (k.to_string(), *v))
        .collect();
    let stage = naga::ShaderStage::Compute;
    let (module, info) = match naga::back::pipeline_constants::process_overrides(
        module,
        info,
        Some((stage, key.entry)),
        &constants,
    ) {
        Ok(m) => m,
        Err(e) => {
            let e = format!("overrides: {e:?}");
            return Report {
                msl: Some(e.clone()),
                hlsl51: Some(e.clone()),
                hlsl60: Some(e.clone()),
                spv: Some(e),
                ..Default::default()
            };
        }
    };
    let ep = module
        .entry_points
        .iter()
        .position(|e| e.name == key.entry)
        .unwrap_or_else(|| panic!("{}: no entry point {}", key.shader.name, key.entry));
    let mut r = Report {
        needs: needs(&module, &info, ep),
        ..Default::default()
    };
    let popts = msl::PipelineOptions {
        entry_point: Some((stage, key.entry.to_string())),
        ..Default::default()
    };
    r.msl = msl::write_string(&module, &info, &msl_options(&module, key.entry), &popts)
        .err()
        .map(|e| format!("{e:?}"));
    for (sm, slot) in [
        (hlsl::ShaderModel::V5_1, &mut r.hlsl51),
        (hlsl::ShaderModel::V6_0, &mut r.hlsl60),
    ] {
        let opts = hlsl_options(&module, sm);
        let popts = hlsl::PipelineOptions {
            entry_point: Some((stage, key.entry.to_string())),
        };
        let mut out = String::new();
        *slot = hlsl::Writer::new(&mut out, &opts, &popts)
            .write(&module, &info, None)
            .err()
            .map(|e| format!("{e:?}"));
    }
    let popts = spv::PipelineOptions {
        shader_stage: stage,
        entry_point: key.entry.to_string(),
    };
    match spv::write_vec(&module, &info, &spv_options(), Some(&popts)) {
        Err(e) => r.spv = Some(format!("{e:?}")),
        Ok(words) => {
            if let Some(val) = val {
                let path = tmp.join("kernel.spv");
                std::fs::write(&path, bytemuck::cast_slice::<u32, u8>(&words)).unwrap();
                let out = std::process::Command::new(val)
                    .args(["--target-env", "vulkan1.1"])
                    .arg(&path)
                    .output()
                    .expect("spirv-val runs");
                r.spv_val = Some(
                    (!out.status.success())
                        .then(|| String::from_utf8_lossy(&out.stderr).trim().to_string()),
                );
            }
        }
    }
    r
}

/// A short generation with `policy` on `e` (small budgets, so the sparse
/// paths engage on a ~100-token prompt); under dense also speculative and
/// sampled decoding. Tidal prefills densely, so it decodes over the prompt
/// dense left cached; the others prefill it under their own policy.
fn drive_engine(e: &mut Engine, policy: AttentionPolicy) {
    let dense = matches!(policy, AttentionPolicy::Dense);
    if matches!(policy, AttentionPolicy::Tidal(_)) {
        e.switch_policy(policy).unwrap();
    } else {
        e.set_policy(policy).unwrap();
    }
    let prompt = "The quick brown fox jumps over the lazy dog. ".repeat(10);
    let mut p = GenerateParams {
        max_tokens: 2,
        stop_at_eos: false,
        ..Default::default()
    };
    e.generate(&prompt, &p)
        .unwrap()
        .for_each(|t| drop(t.unwrap()));
    if dense {
        // A fixed tree: the automatic size may be off on this adapter (and a
        // verify-cost curve kept from an earlier process skips the probing).
        p.speculate = Speculate::Both;
        p.tree_size = kvsieve::speculative::TreeSize::Fixed(4);
        e.generate(&prompt, &p)
            .unwrap()
            .for_each(|t| drop(t.unwrap()));
        p.speculate = Speculate::Off;
        p.sampling.temperature = 0.8;
        p.sampling.top_k = 20;
        p.sampling.repetition_penalty = 1.1;
        e.generate(&prompt, &p)
            .unwrap()
            .for_each(|t| drop(t.unwrap()));
    }
}

/// Kernels the model does not reach with the default model's weight types: a
/// matmul per weight type and path, and the copy kernel.
fn drive_kernels(ex: &mut kvsieve::kernels::GpuExecutor) {
    for t in [
        DType::F16,
        DType::Q8_0,
        DType::Q4_0,
        DType::Q4_1,
        DType::Q5_0,
        DType::Q5_1,
        DType::Q4_K,
        DType::Q5_K,
        DType::Q6_K,
    ] {
        let (n, k) = (8usize, 512usize);
        let raw = vec![0u8; t.bytes_for((n * k) as u64).unwrap() as usize];
        let w = ex.weight_raw(t, &raw, n, k).unwrap();
        for m in [1usize, 3, 40] {
            let x = ex.upload(&vec![0.5; m * k], m, k).unwrap();
            let mut y = ex.tensor(m, n).unwrap();
            ex.matmul(&x, &w, &mut y).unwrap();
            ex.download(&y).unwrap();
        }
        let ids = ex.ids(&[1, 3]).unwrap();
        let mut out = ex.tensor(2, k).unwrap();
        ex.embed(&ids, &w, &mut out).unwrap();
        ex.download(&out).unwrap();
    }
    // f16 rows of an odd number of vec4s (matmul_rows, not matmul_rows8).
    let w = ex.weight(&vec![half::f16::ZERO; 8 * 516], 8, 516).unwrap();
    let x = ex.upload(&vec![0.5; 516], 1, 516).unwrap();
    let mut y = ex.tensor(1, 8).unwrap();
    ex.matmul(&x, &w, &mut y).unwrap();
    // A bias (Qwen2), a repetition penalty, and a top-k over more candidates
    // than one workgroup takes (the multi-pass radix select).
    let bias = ex.weight(&[half::f16::ONE; 8], 1, 8).unwrap();
    ex.add_bias(&mut y, &bias).unwrap();
    // The unfused residual add and SwiGLU (the model fuses them into matmuls).
    let z = ex.upload(&[0.5; 8], 1, 8).unwrap();
    ex.add(&mut y, &z).unwrap();
    ex.swiglu(&mut y, &z).unwrap();
    let mut logits = ex.upload(&vec![0.25; 40000], 1, 40000).unwrap();
    ex.penalize(&mut logits, &[1, 2], 1.2).unwrap();
    ex.top_k(&logits, 8).unwrap();
    let mut chosen = ex.ids(&[0; 8]).unwrap();
    ex.block_top_k(&logits, 1, 40000, 8, &mut chosen).unwrap();
    let src = kvsieve::gpu::buffer::storage(&ex.ctx.device, 4096, "src").unwrap();
    let dst = kvsieve::gpu::buffer::storage(&ex.ctx.device, 4096, "dst").unwrap();
    kvsieve::kernels::copy_buffer(ex, &src, &dst, 4096).unwrap();
    ex.flush().unwrap();
}

/// Where the native run keeps the pipelines it built, for the browser run.
fn kept_path() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("target/portability-pipelines.txt")
}

/// This test binary: its path, size and modification time.
fn exe_identity() -> String {
    let exe = std::env::current_exe().unwrap();
    let meta = std::fs::metadata(&exe).unwrap();
    let modified = meta
        .modified()
        .ok()
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map_or(0, |d| d.as_nanos());
    format!("{} {} {modified}", exe.display(), meta.len())
}

/// Writes `keys` (one per line: shader, entry point, constants as name=bits)
/// under this binary's identity.
fn keep_pipelines(keys: &[PipelineKey]) {
    let mut text = exe_identity() + "\n";
    for k in keys {
        let constants: Vec<String> = k
            .constants
            .iter()
            .map(|(n, v)| format!("{n}={}", v.to_bits()))
            .collect();
        let _ = writeln!(
            text,
            "{}\t{}\t{}",
            k.shader.name,
            k.entry,
            constants.join(",")
        );
    }
    let _ = std::fs::write(kept_path(), text);
}

/// The keys [`keep_pipelines`] wrote, when this same binary wrote them.
fn kept_pipelines() -> Option<Vec<PipelineKey>> {
    let text = std::fs::read_to_string(kept_path()).ok()?;
    let mut lines = text.lines();
    if lines.next()? != exe_identity() {
        return None;
    }
    // Test code: the names live as long as the process.
    let leak = |s: &str| -> &'static str { Box::leak(s.to_string().into_boxed_str()) };
    lines
        .map(|line| {
            let mut f = line.split('\t');
            let (shader, entry, constants) = (f.next()?, f.next()?, f.next()?);
            let shader = *ALL.iter().find(|s| s.name == shader)?;
            let constants = constants
                .split(',')
                .filter(|c| !c.is_empty())
                .map(|c| {
                    let (n, bits) = c.split_once('=')?;
                    Some((leak(n), f64::from_bits(bits.parse().ok()?)))
                })
                .collect::<Option<Vec<_>>>()?;
            Some(PipelineKey {
                shader,
                entry: leak(entry),
                constants,
            })
        })
        .collect()
}

#[test]
fn every_pipeline_translates_and_fits_webgpu_limits() {
    // Budgets small enough that the ~100-token prompt (chunks of 64) runs
    // every policy's sparse prefill and decode: each drive but Tidal's
    // prefills it on a CPU driver, once per tuning.
    let ts = TokenSelectConfig {
        k: 16,
        n_init: 8,
        n_local: 16,
        subchunk: 32,
        ..Default::default()
    };
    let policies = [
        AttentionPolicy::Dense,
        AttentionPolicy::Tidal(TidalConfig {
            budget: 32,
            ..Default::default()
        }),
        AttentionPolicy::TokenSelect(ts),
        // Hierarchical: 3 blocks of 8 hold k 8 plus two blocks, and the ~75
        // candidate tokens at the prompt's tail are more than twice 3 blocks
        // (the block stage runs only where it keeps at most half of them).
        AttentionPolicy::TokenSelect(TokenSelectConfig {
            k: 8,
            prefilter_blocks: 3,
            prefilter_block: 8,
            ..ts
        }),
        AttentionPolicy::Quest(QuestConfig {
            budget: 32,
            prefill_subchunk: 32,
            ..Default::default()
        }),
    ];
    // In the browser run, the pipelines the native run of this same test
    // binary built (the drives are the same work again, minutes on a CPU
    // driver); any other binary's list is not taken.
    let kept = common::browser::requested().then(kept_pipelines).flatten();
    // Both tunings: the engine reads KVSIEVE_TUNING when it creates its executor
    // (this binary's only test, so nothing else reads the variable meanwhile).
    // One engine per tuning drives every policy in turn (dense first: Tidal
    // decodes over its prefill).
    if kept.is_none() {
        for tuning in ["cpu", "gpu"] {
            std::env::set_var("KVSIEVE_TUNING", tuning);
            let mut e = Engine::load_default(Options {
                max_context: 512,
                prefill_chunk: 64,
                ..Default::default()
            })
            .expect("default model");
            for p in &policies {
                drive_engine(&mut e, *p);
            }
            drop(e);
            let mut ex = kvsieve::kernels::GpuExecutor::new().unwrap();
            drive_kernels(&mut ex);
        }
    }
    std::env::remove_var("KVSIEVE_TUNING");

    let parsed: HashMap<_, _> = ALL.iter().map(|s| (s.name, parse(*s))).collect();
    let val = spirv_val();
    let tmp = std::env::temp_dir().join(format!("kvsieve-portability-{}", std::process::id()));
    std::fs::create_dir_all(&tmp).unwrap();
    let built = match kept {
        Some(keys) => {
            eprintln!("{} pipelines as the native run built them", keys.len());
            keys
        }
        None => {
            let built = pipelines_built();
            keep_pipelines(&built);
            built
        }
    };
    let mut failures = Vec::new();
    // Chromium's WebGPU (KVSIEVE_BROWSER=chromium): every pipeline compiled
    // there; "ran" where a replayed kernel test ran it (tests/common/browser.rs).
    let browser = common::browser::requested().then(common::browser::shared);
    let ran: std::collections::HashSet<String> = std::fs::read_dir(common::browser::ran_dir())
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| std::fs::read_to_string(e.path()).ok())
        .flat_map(|t| t.lines().map(String::from).collect::<Vec<_>>())
        .collect();
    let mut table = String::new();
    let _ = writeln!(
        table,
        "| shader | entry point | override constants | storage buffers | workgroup bytes | \
         invocations | MSL 2.4 | HLSL 5.1 | HLSL 6.0 | SPIR-V 1.3 | spirv-val | WebGPU defaults | \
         Chromium WebGPU |"
    );
    let _ = writeln!(
        table,
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|"
    );
    let mut seen: BTreeMap<(&str, &str), usize> = BTreeMap::new();
    for key in &built {
        let r = translate(&parsed, key, val.as_deref(), &tmp);
        *seen.entry((key.shader.name, key.entry)).or_default() += 1;
        let mut f = r.failures();
        let chromium = match &browser {
            None => "not run",
            Some(b) => match b.compile(std::slice::from_ref(key)) {
                Err(e) => {
                    f.push(format!("Chromium WebGPU: {e}"));
                    "FAIL"
                }
                Ok(()) if ran.contains(&common::browser::key_line(key)) => "ran",
                Ok(()) => "compiles",
            },
        };
        let mark = |e: &Option<String>| if e.is_none() { "ok" } else { "FAIL" };
        let consts: Vec<String> = key
            .constants
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        let n = r.needs;
        let fits = n.storage_buffers <= WEBGPU_STORAGE_BUFFERS
            && n.workgroup_bytes <= WEBGPU_WORKGROUP_BYTES
            && n.invocations <= WEBGPU_INVOCATIONS;
        let _ = writeln!(
            table,
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            key.shader.name,
            key.entry,
            if consts.is_empty() {
                "-".into()
            } else {
                consts.join(" ")
            },
            n.storage_buffers,
            n.workgroup_bytes,
            n.invocations,
            mark(&r.msl),
            mark(&r.hlsl51),
            mark(&r.hlsl60),
            mark(&r.spv),
            match &r.spv_val {
                None => "not run",
                Some(None) => "ok",
                Some(Some(_)) => "FAIL",
            },
            if fits { "fits" } else { "FAIL" },
            chromium,
        );
        for e in f {
            failures.push(format!(
                "{}::{} {:?}: {e}",
                key.shader.name, key.entry, key.constants
            ));
        }
    }
    let _ = std::fs::remove_dir_all(&tmp);
    // Every entry point of every shader was built at least once (a new kernel
    // must be reached by the workload above).
    let mut missing = Vec::new();
    for s in ALL {
        for ep in &parsed[s.name].0.entry_points {
            if !seen.contains_key(&(s.name, ep.name.as_str())) {
                missing.push(format!("{}::{}", s.name, ep.name));
            }
        }
    }
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("target/portability.md");
    let _ = std::fs::write(&path, &table);
    eprintln!(
        "{} pipelines translated ({} entry points); spirv-val {}; table in {}",
        built.len(),
        seen.len(),
        if val.is_some() {
            "run"
        } else {
            "not installed"
        },
        path.display()
    );
    assert!(
        missing.is_empty(),
        "entry points never built by the workload: {missing:?}"
    );
    assert!(
        failures.is_empty(),
        "{} failures:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

/// Without a device: every entry point of every shader at its default override
/// values (what a pipeline gets when it passes none) translates the same way and
/// fits WebGPU's default limits, and compiles in Chromium's WebGPU under
/// `KVSIEVE_BROWSER=chromium`.
#[test]
fn every_entry_point_translates_at_default_constants() {
    let parsed: HashMap<_, _> = ALL.iter().map(|s| (s.name, parse(*s))).collect();
    let val = spirv_val();
    let tmp = std::env::temp_dir().join(format!("kvsieve-portability-d{}", std::process::id()));
    std::fs::create_dir_all(&tmp).unwrap();
    let mut failures = Vec::new();
    for s in ALL {
        for ep in &parsed[s.name].0.entry_points {
            let key = PipelineKey {
                shader: *s,
                entry: Box::leak(ep.name.clone().into_boxed_str()),
                constants: Vec::new(),
            };
            let r = translate(&parsed, &key, val.as_deref(), &tmp);
            // The defaults fit WebGPU's default limits as well: a pipeline built
            // without constants must work in a browser (Chromium found
            // attention_prefill's 16 keys x head_dim 128 over 16 KiB).
            for e in r.failures() {
                failures.push(format!("{}::{}: {e}", s.name, ep.name));
            }
            if common::browser::requested() {
                if let Err(e) = common::browser::shared().compile(&[key]) {
                    failures.push(format!("{}::{}: Chromium WebGPU: {e}", s.name, ep.name));
                }
            }
        }
    }
    let _ = std::fs::remove_dir_all(&tmp);
    assert!(
        failures.is_empty(),
        "{} failures:\n{}",
        failures.len(),
        failures.join("\n")
    );
}
