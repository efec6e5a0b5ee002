//! The repository stands alone: a user who clones it has everything the tests and the docs
//! refer to. Nothing reads from a directory beside the clone, every specification vector the
//! tests use is in `tests/vectors/` with its source named, and the design is in `docs/`.

use std::path::{Path, PathBuf};

const ROOT: &str = env!("CARGO_MANIFEST_DIR");

/// Directories that are build output or local scratch, not part of the repository.
const SKIP: &[&str] = &["target", ".git", "data", "corpus", "artifacts", "coverage"];

fn text_files(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        if path.is_dir() {
            if !SKIP.contains(&name.as_str()) {
                text_files(&path, out);
            }
        } else if std::fs::read_to_string(&path).is_ok() {
            out.push(path);
        }
    }
}

#[test]
fn nothing_refers_to_a_directory_beside_the_clone() {
    // Spelled in two parts so that this file does not match itself.
    let needle = format!("{}/shared", "..");
    let mut files = Vec::new();
    text_files(Path::new(ROOT), &mut files);
    assert!(
        files.len() > 50,
        "walked the repository: {} files",
        files.len()
    );
    let offenders: Vec<String> = files
        .iter()
        .filter(|f| std::fs::read_to_string(f).unwrap().contains(&needle))
        .map(|f| f.strip_prefix(ROOT).unwrap().display().to_string())
        .collect();
    assert!(offenders.is_empty(), "{needle} named in {offenders:?}");
}

#[test]
fn every_vector_file_names_its_source() {
    let dir = Path::new(ROOT).join("tests/vectors");
    let readme = std::fs::read_to_string(dir.join("README.md")).unwrap();
    let mut names = Vec::new();
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "json") {
            let name = path.file_name().unwrap().to_string_lossy().into_owned();
            let v: serde_json::Value =
                serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
            let source = v["source"].as_str().unwrap_or_default();
            assert!(!source.is_empty(), "{name} has no `source` field");
            assert!(
                readme.contains(&format!("`{name}`")),
                "tests/vectors/README.md does not list {name}"
            );
            names.push(name);
        }
    }
    names.sort();
    assert_eq!(
        names,
        [
            "ble-gatt.json",
            "merkle-rfc6962.json",
            "news2-rcp2017.json",
            "senml-rfc8428.json",
            "signed-note.json"
        ]
    );
}

#[test]
fn the_readme_points_at_the_design_in_the_repository() {
    let readme = std::fs::read_to_string(Path::new(ROOT).join("README.md")).unwrap();
    let first_paragraph = readme.split("\n\n").nth(1).unwrap();
    assert!(
        first_paragraph.contains("`docs/design.md`"),
        "{first_paragraph}"
    );
    let design = std::fs::read_to_string(Path::new(ROOT).join("docs/design.md")).unwrap();
    for section in [
        "## Data flow",
        "## Layers",
        "## Readings",
        "## Topics",
        "## Integrity",
        "## Durability",
        "## Conventions",
    ] {
        assert!(design.contains(section), "docs/design.md lacks {section}");
    }
}

#[test]
fn the_readme_says_how_to_install_and_what_the_test_script_installs() {
    let readme = std::fs::read_to_string(Path::new(ROOT).join("README.md")).unwrap();
    for how in ["cargo install --path .", "cargo run --release --"] {
        assert!(readme.contains(how), "README lacks `{how}`");
    }
    let script = std::fs::read_to_string(Path::new(ROOT).join("scripts/test.sh")).unwrap();
    // `need <command> <package> …`: the packages are every second word.
    let packages: Vec<&str> = script
        .lines()
        .filter_map(|l| l.strip_prefix("need "))
        .flat_map(|rest| rest.split_whitespace().skip(1).step_by(2))
        .collect();
    assert_eq!(
        packages,
        ["mosquitto", "mosquitto-clients", "g++", "nodejs", "npm"],
        "scripts/test.sh installs"
    );
    assert!(readme.contains("sudo apt-get"));
    for p in packages {
        assert!(
            readme.contains(&format!("`{p}`")),
            "README does not name {p}"
        );
    }
}
