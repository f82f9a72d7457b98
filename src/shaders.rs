//! WGSL sources, one file per kernel family, compiled into the crate.

/// A WGSL source file by name.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Shader {
    /// File name under `shaders/`.
    pub name: &'static str,
    /// WGSL text.
    pub source: &'static str,
}

macro_rules! shaders {
    ($($id:ident => $file:literal),* $(,)?) => {
        $(
            #[doc = concat!("`shaders/", $file, "`")]
            pub const $id: Shader = Shader { name: $file, source: include_str!(concat!("../shaders/", $file)) };
        )*
        /// Every shader of the crate (validated by a unit test).
        pub const ALL: &[Shader] = &[$($id),*];
    };
}

shaders! {
    COPY => "copy.wgsl",
    MATMUL_SMALL => "matmul_small.wgsl",
    MATMUL_TILED => "matmul_tiled.wgsl",
    RMSNORM => "rmsnorm.wgsl",
    ROPE => "rope.wgsl",
    ELEMENTWISE => "elementwise.wgsl",
    EMBEDDING => "embedding.wgsl",
    ARGMAX => "argmax.wgsl",
    KV_APPEND => "kv_append.wgsl",
    ATTENTION_DECODE => "attention_decode.wgsl",
    ATTENTION_PREFILL => "attention_prefill.wgsl",
    SAMPLING => "sampling.wgsl",
    TOKENSELECT => "tokenselect.wgsl",
    SPECULATIVE => "speculative.wgsl",
    BLOCK_SPARSE => "block_sparse.wgsl",
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Parses and validates every shader with naga; needs no GPU.
    #[test]
    fn naga_validates_every_shader() {
        let on_disk = std::fs::read_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/shaders"))
            .expect("shaders/ exists")
            .filter_map(|e| e.ok())
            .filter(|e| e.path().extension().is_some_and(|x| x == "wgsl"))
            .count();
        assert_eq!(
            on_disk,
            ALL.len(),
            "every file in shaders/ must be listed in shaders::ALL"
        );
        for s in ALL {
            let module = naga::front::wgsl::parse_str(s.source)
                .unwrap_or_else(|e| panic!("{}: {}", s.name, e.emit_to_string(s.source)));
            let mut v = naga::valid::Validator::new(
                naga::valid::ValidationFlags::all(),
                // wgpu grants this where the downlevel flag SHADER_F16_IN_F32 is set (checked at device creation).
                naga::valid::Capabilities::SHADER_FLOAT16_IN_FLOAT32,
            );
            v.validate(&module)
                .unwrap_or_else(|e| panic!("{}: {}", s.name, e.emit_to_string(s.source)));
            assert!(
                !module.entry_points.is_empty(),
                "{} has no entry point",
                s.name
            );
        }
    }
}
