//! WGSL sources, one file per kernel family, compiled into the crate.
//!
//! Shared WGSL lives once in `shaders/lib/` and is composed into each kernel
//! at build time: a shader's [`Shader::source`] is its library files, in the
//! order listed, followed by its own file (`concat!` of `include_str!`s, so
//! the composition costs nothing at run time and naga validates exactly the
//! text the device compiles). Library functions take what they need as
//! arguments, so they do not depend on the names of a kernel's globals.

/// A WGSL source file by name.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Shader {
    /// File name under `shaders/`.
    pub name: &'static str,
    /// WGSL text: the library files it uses, then the file itself.
    pub source: &'static str,
    /// The `shaders/lib/` files composed in front of it, in order.
    pub lib: &'static [&'static str],
}

macro_rules! shaders {
    (lib [$($lfile:literal),* $(,)?]
     $($id:ident => $file:literal [$($dep:literal),*]),* $(,)?) => {
        /// Every library file (each used by at least one shader; a unit test checks).
        pub const LIB: &[&str] = &[$($lfile),*];
        $(
            #[doc = concat!("`shaders/", $file, "`")]
            pub const $id: Shader = Shader {
                name: $file,
                source: concat!(
                    $(include_str!(concat!("../shaders/lib/", $dep)),)*
                    include_str!(concat!("../shaders/", $file))
                ),
                lib: &[$($dep),*],
            };
        )*
        /// Every shader of the crate (validated by a unit test).
        pub const ALL: &[Shader] = &[$($id),*];
    };
}

shaders! {
    lib ["order.wgsl", "paged_kv.wgsl", "key_list.wgsl", "rotary.wgsl", "quant.wgsl", "epilogue.wgsl", "prologue.wgsl", "matmul_out.wgsl"]
    COPY => "copy.wgsl" [],
    MATMUL_SMALL => "matmul_small.wgsl" ["epilogue.wgsl", "prologue.wgsl", "matmul_out.wgsl"],
    MATMUL_TILED => "matmul_tiled.wgsl" ["epilogue.wgsl", "prologue.wgsl", "matmul_out.wgsl"],
    MATMUL_QUANT => "matmul_quant.wgsl" ["quant.wgsl", "epilogue.wgsl", "prologue.wgsl", "matmul_out.wgsl"],
    RMSNORM => "rmsnorm.wgsl" [],
    ROPE => "rope.wgsl" ["rotary.wgsl"],
    ELEMENTWISE => "elementwise.wgsl" [],
    EMBEDDING => "embedding.wgsl" ["quant.wgsl"],
    ARGMAX => "argmax.wgsl" ["order.wgsl"],
    KV_APPEND => "kv_append.wgsl" ["paged_kv.wgsl", "rotary.wgsl"],
    ATTENTION_DECODE => "attention_decode.wgsl" ["order.wgsl", "paged_kv.wgsl", "key_list.wgsl", "rotary.wgsl"],
    ATTENTION_PREFILL => "attention_prefill.wgsl" ["order.wgsl", "paged_kv.wgsl", "key_list.wgsl", "rotary.wgsl"],
    SAMPLING => "sampling.wgsl" ["order.wgsl"],
    TOKENSELECT => "tokenselect.wgsl" ["order.wgsl", "paged_kv.wgsl"],
    TOPK => "topk.wgsl" [],
    GATE => "gate.wgsl" [],
    SPECULATIVE => "speculative.wgsl" ["order.wgsl"],
    BLOCK_SPARSE => "block_sparse.wgsl" ["order.wgsl", "paged_kv.wgsl", "rotary.wgsl"],
}

#[cfg(test)]
mod tests {
    use super::*;

    fn wgsl_files(dir: &str) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(dir)
            .expect("shader folder exists")
            .filter_map(|e| e.ok())
            .filter(|e| e.path().extension().is_some_and(|x| x == "wgsl"))
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    }

    /// Every file in `shaders/lib/` is listed, used by some shader, and
    /// composed into that shader's text.
    #[test]
    fn library_files_are_listed_and_composed() {
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/shaders/lib");
        let mut listed: Vec<String> = LIB.iter().map(|s| s.to_string()).collect();
        listed.sort();
        assert_eq!(
            wgsl_files(dir),
            listed,
            "shaders/lib/ and shaders::LIB differ"
        );
        for lib in LIB {
            let text = std::fs::read_to_string(format!("{dir}/{lib}")).unwrap();
            let users: Vec<_> = ALL.iter().filter(|s| s.lib.contains(lib)).collect();
            assert!(!users.is_empty(), "{lib} is used by no shader");
            for s in users {
                assert!(
                    s.source.contains(&text),
                    "{} does not compose {lib}",
                    s.name
                );
            }
        }
        for s in ALL {
            let own = std::fs::read_to_string(format!("{dir}/../{}", s.name)).unwrap();
            assert!(
                s.source.ends_with(&own),
                "{} must end with its own file",
                s.name
            );
        }
    }

    /// A shared function is defined once, in the library: no kernel file
    /// defines a function or constant of the same name again.
    #[test]
    fn kernels_do_not_redefine_library_items() {
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/shaders");
        for lib in LIB {
            let text = std::fs::read_to_string(format!("{dir}/lib/{lib}")).unwrap();
            let names: Vec<&str> = text
                .lines()
                .filter_map(|l| l.strip_prefix("fn ").or_else(|| l.strip_prefix("const ")))
                .filter_map(|l| l.split(['(', ':', ' ']).next())
                .collect();
            assert!(!names.is_empty(), "{lib} defines nothing");
            for s in ALL {
                let own = std::fs::read_to_string(format!("{dir}/{}", s.name)).unwrap();
                for n in &names {
                    for def in [format!("fn {n}("), format!("const {n}:")] {
                        assert!(!own.contains(&def), "{} redefines {n} of lib/{lib}", s.name);
                    }
                }
            }
        }
    }

    /// Parses and validates every shader as composed with naga; needs no GPU.
    #[test]
    fn naga_validates_every_shader() {
        let on_disk = wgsl_files(concat!(env!("CARGO_MANIFEST_DIR"), "/shaders")).len();
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
