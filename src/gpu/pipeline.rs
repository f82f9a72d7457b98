//! Compute pipelines, created once per (shader, entry point, override constants).

use crate::shaders::Shader;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

/// A compiled compute pipeline and the layout of its bind group 0.
#[derive(Debug)]
pub struct Pipeline {
    /// The pipeline.
    pub pipeline: wgpu::ComputePipeline,
    /// Layout of group 0 (binding 0 is the uniform params, then storage buffers).
    pub layout: wgpu::BindGroupLayout,
    /// Label for errors and profiles.
    pub label: String,
    /// What it was built from.
    pub key: PipelineKey,
}

type Key = (&'static str, &'static str, Vec<(&'static str, u64)>);

/// A pipeline as built: shader, entry point and override constants.
#[derive(Clone, Debug, PartialEq)]
pub struct PipelineKey {
    /// The shader.
    pub shader: Shader,
    /// Its entry point.
    pub entry: &'static str,
    /// Override constants, as passed to wgpu.
    pub constants: Vec<(&'static str, f64)>,
}

static BUILT: Mutex<Vec<PipelineKey>> = Mutex::new(Vec::new());

/// Every distinct pipeline this process has built, on any device, in the order
/// first built (the portability tests translate each one for every backend).
pub fn pipelines_built() -> Vec<PipelineKey> {
    BUILT.lock().unwrap_or_else(|e| e.into_inner()).clone()
}

/// Pipeline cache keyed by shader, entry point and override constants.
#[derive(Default)]
pub struct PipelineCache {
    modules: Mutex<HashMap<&'static str, wgpu::ShaderModule>>,
    pipelines: Mutex<HashMap<Key, Arc<Pipeline>>>,
}

impl PipelineCache {
    /// Returns the pipeline, building it (and the shader module) on first use.
    pub fn get(
        &self,
        device: &wgpu::Device,
        shader: Shader,
        entry: &'static str,
        constants: &[(&'static str, f64)],
    ) -> Arc<Pipeline> {
        let key: Key = (
            shader.name,
            entry,
            constants.iter().map(|(n, v)| (*n, v.to_bits())).collect(),
        );
        if let Some(p) = self
            .pipelines
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&key)
        {
            return p.clone();
        }
        let module = {
            let mut modules = self.modules.lock().unwrap_or_else(|e| e.into_inner());
            modules
                .entry(shader.name)
                .or_insert_with(|| {
                    device.create_shader_module(wgpu::ShaderModuleDescriptor {
                        label: Some(shader.name),
                        source: wgpu::ShaderSource::Wgsl(shader.source.into()),
                    })
                })
                .clone()
        };
        let label = format!("{}::{}{:?}", shader.name, entry, constants);
        let pipeline = device.create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
            label: Some(&label),
            layout: None,
            module: &module,
            entry_point: Some(entry),
            compilation_options: wgpu::PipelineCompilationOptions {
                constants,
                // Every kernel initialises what it reads from workgroup memory.
                zero_initialize_workgroup_memory: false,
            },
            cache: None,
        });
        let layout = pipeline.get_bind_group_layout(0);
        let built = PipelineKey {
            shader,
            entry,
            constants: constants.to_vec(),
        };
        {
            let mut all = BUILT.lock().unwrap_or_else(|e| e.into_inner());
            if !all.contains(&built) {
                all.push(built.clone());
            }
        }
        let p = Arc::new(Pipeline {
            pipeline,
            layout,
            label,
            key: built,
        });
        self.pipelines
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(key, p.clone());
        p
    }

    /// Number of pipelines built so far.
    pub fn len(&self) -> usize {
        self.pipelines.lock().map(|p| p.len()).unwrap_or(0)
    }

    /// True when no pipeline was built yet.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}
