//! The crate's modules form layers that only point down (src/lib.rs, docs/architecture.md): a
//! module may use modules of a lower layer, and its own submodules, never one of its own layer
//! or above. This test reads every source file and checks each `crate::` path against the table.

use std::collections::BTreeMap;
use std::path::Path;

/// Top-level module → layer. Modules of one layer never use each other.
const LAYERS: &[(&str, u32)] = &[
    ("model", 0),
    ("topic", 1),
    ("codec", 2),
    ("alarm", 2),
    ("seal", 2),
    ("store", 3),
    ("ledger", 4),
    ("config", 5),
    ("pipeline", 6),
    ("transport", 7),
    ("decode", 8),
    ("replay", 8),
    ("verify", 8),
    ("service", 9),
];

fn layer(module: &str) -> Option<u32> {
    LAYERS.iter().find(|(m, _)| *m == module).map(|(_, l)| *l)
}

fn rust_files(dir: &Path, out: &mut Vec<std::path::PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

#[test]
fn modules_only_use_lower_layers() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    let mut violations = BTreeMap::new();
    let mut seen = 0;
    for file in files {
        let rel = file.strip_prefix(&src).unwrap();
        let first = rel
            .components()
            .next()
            .unwrap()
            .as_os_str()
            .to_string_lossy();
        let module = first.trim_end_matches(".rs").to_owned();
        if module == "lib" || module == "main" {
            continue;
        }
        let own = layer(&module)
            .unwrap_or_else(|| panic!("src/{module}: add the new module to LAYERS in this test"));
        let text = std::fs::read_to_string(&file).unwrap();
        for (n, line) in text.lines().enumerate() {
            let mut rest = line;
            while let Some(i) = rest.find("crate::") {
                rest = &rest[i + "crate::".len()..];
                let used: String = rest
                    .chars()
                    .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                    .collect();
                seen += 1;
                if used == module {
                    continue;
                }
                let Some(theirs) = layer(&used) else { continue };
                if theirs >= own {
                    violations.insert(
                        format!("{}:{}", rel.display(), n + 1),
                        format!("{module} (layer {own}) uses {used} (layer {theirs})"),
                    );
                }
            }
        }
    }
    assert!(seen > 100, "the scan found the crate's paths");
    assert!(
        violations.is_empty(),
        "modules pointing sideways or up:\n{}",
        violations
            .iter()
            .map(|(at, what)| format!("  {at}: {what}"))
            .collect::<Vec<_>>()
            .join("\n")
    );
}
