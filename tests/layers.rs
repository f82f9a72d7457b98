//! Dependencies run one way (docs/ARCHITECTURE.md): each top-level module of
//! `src/` may name only the modules below it. Reads every `crate::` path in
//! code (comments and doc links aside).

use std::collections::BTreeSet;
use std::path::Path;

/// Module and the modules it may use. Lower layers first.
const LAYERS: &[(&str, &[&str])] = &[
    ("error", &[]),
    ("quant", &["error"]),
    ("shaders", &[]),
    ("progress", &[]),
    ("kv", &["error"]),
    ("sampling", &["error"]),
    ("ops", &["error", "kv", "quant", "sampling"]),
    ("gpu", &["error", "shaders"]),
    (
        "kernels",
        &["error", "gpu", "kv", "ops", "quant", "sampling", "shaders"],
    ),
    ("reference", &["error", "kv", "ops", "quant", "sampling"]),
    ("attention", &["error", "kv", "ops"]),
    ("convert", &["error", "progress", "quant"]),
    (
        "model",
        &[
            "error",
            "kv",
            "ops",
            "attention",
            "convert",
            "progress",
            "quant",
        ],
    ),
    ("speculative", &["error", "ops", "sampling"]),
    (
        "generate",
        &[
            "error",
            "kv",
            "ops",
            "sampling",
            "gpu",
            "kernels",
            "reference",
            "attention",
            "convert",
            "model",
            "quant",
            "speculative",
        ],
    ),
    (
        "eval",
        &["error", "generate", "reference", "attention", "ops"],
    ),
];

fn sources(p: &Path, out: &mut Vec<std::path::PathBuf>) {
    if p.is_dir() {
        for e in std::fs::read_dir(p).unwrap() {
            sources(&e.unwrap().path(), out);
        }
    } else if p.extension().is_some_and(|x| x == "rs") {
        out.push(p.to_path_buf());
    }
}

/// Modules named by `crate::NAME` in the code lines of `text`.
fn uses(text: &str) -> BTreeSet<String> {
    let mut found = BTreeSet::new();
    for line in text.lines() {
        let code = line.split("//").next().unwrap_or("");
        let mut rest = code;
        while let Some(at) = rest.find("crate::") {
            rest = &rest[at + 7..];
            let name: String = rest
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            found.insert(name);
        }
    }
    found
}

#[test]
fn modules_use_only_lower_layers() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut bad = Vec::new();
    let mut seen = BTreeSet::new();
    for e in std::fs::read_dir(&src).unwrap() {
        let path = e.unwrap().path();
        let name = path.file_stem().unwrap().to_string_lossy().to_string();
        if name == "lib" {
            continue;
        }
        let Some((_, allowed)) = LAYERS.iter().find(|(m, _)| *m == name) else {
            panic!(
                "src/{name} is not placed in a layer: add it to LAYERS and docs/ARCHITECTURE.md"
            );
        };
        seen.insert(name.clone());
        let mut files = Vec::new();
        sources(&path, &mut files);
        for f in files {
            let text = std::fs::read_to_string(&f).unwrap();
            for used in uses(&text) {
                if used != name && !allowed.contains(&used.as_str()) {
                    bad.push(format!("{} uses crate::{used}", f.display()));
                }
            }
        }
    }
    assert!(
        bad.is_empty(),
        "dependencies that reach up or sideways:\n{}",
        bad.join("\n")
    );
    assert_eq!(seen.len(), LAYERS.len(), "LAYERS names a module src/ lacks");
}

#[test]
fn the_scanner_sees_code_not_comments() {
    let u = uses("use crate::ops::Ops; // crate::model\n/// [`crate::speculative::X`]\nlet a = crate::kv::f();");
    assert_eq!(u, ["kv", "ops"].iter().map(|s| s.to_string()).collect());
}
