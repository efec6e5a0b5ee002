//! The documentation stands alone: a user who clones only this repository finds everything the
//! docs and the tests refer to. Every relative link in a markdown file, and every repository
//! path a markdown file writes in backticks, names a file or directory that exists; every
//! `docs/*.md` a source file names exists; nothing names or reads a directory beside the clone;
//! the README points at docs/architecture.md and SECURITY.md; every specification vector names
//! its source.
//!
//! Plain Rust, no network and no git: the checks walk the working tree, skipping build output
//! and local scratch, so they hold for a clone and for an unpacked archive alike.

use std::path::{Component, Path, PathBuf};

const ROOT: &str = env!("CARGO_MANIFEST_DIR");

/// Directories that are build output or local scratch, not part of the repository.
const SKIP: &[&str] = &[
    "target",
    ".git",
    "data",
    "corpus",
    "artifacts",
    "coverage",
    "node_modules",
];

/// Top-level directories whose paths, written in backticks in a markdown file, must exist: a
/// span such as `src/model/units.rs` reads as a file of this repository and nothing else.
const PATH_ROOTS: &[&str] = &[
    "benches/",
    "contracts/",
    "docs/",
    "examples/",
    "fixtures/",
    "pipelines/",
    "scripts/",
    "src/",
    "tests/",
];

fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        if path.is_dir() {
            if !SKIP.contains(&name.as_str()) {
                walk(&path, out);
            }
        } else {
            out.push(path);
        }
    }
}

fn files_ending(ext: &str) -> Vec<PathBuf> {
    let mut files = Vec::new();
    walk(Path::new(ROOT), &mut files);
    files.retain(|f| f.extension().is_some_and(|e| e == ext));
    files.sort();
    files
}

fn rel(path: &Path) -> String {
    path.strip_prefix(ROOT)
        .unwrap_or(path)
        .display()
        .to_string()
}

/// What a markdown file refers to: relative link targets (as written, resolved against the
/// file's directory) and repository paths in backticks (resolved against the root), each with
/// its line number.
#[derive(Debug, Default, PartialEq)]
struct References {
    links: Vec<(usize, String)>,
    paths: Vec<(usize, String)>,
}

/// Reads the references out of markdown text. Fenced code blocks are skipped (they hold shell
/// sessions and file contents, not references), and so are links inside code spans.
fn references(text: &str) -> References {
    let mut refs = References::default();
    let mut fence: Option<&str> = None;
    for (n, line) in text.lines().enumerate() {
        let n = n + 1;
        let trimmed = line.trim_start();
        if let Some(open) = fence {
            if trimmed.starts_with(open) {
                fence = None;
            }
            continue;
        }
        if let Some(mark) = ["```", "~~~"].into_iter().find(|m| trimmed.starts_with(m)) {
            fence = Some(mark);
            continue;
        }
        // A reference definition: `[label]: target`.
        if let Some(rest) = trimmed.strip_prefix('[') {
            if let Some((_, target)) = rest.split_once("]:").filter(|(l, _)| !l.contains(']')) {
                refs.links.push((n, link_target(target)));
                continue;
            }
        }
        let mut prose = String::new();
        let mut rest = line;
        while let Some(open) = rest.find('`') {
            prose.push_str(&rest[..open]);
            let ticks = rest[open..].chars().take_while(|&c| c == '`').count();
            let after = &rest[open + ticks..];
            let Some(close) = after.find(&"`".repeat(ticks)) else {
                rest = after;
                continue;
            };
            let span = after[..close].trim();
            if is_repository_path(span) {
                refs.paths.push((n, span.to_owned()));
            }
            prose.push(' ');
            rest = &after[close + ticks..];
        }
        prose.push_str(rest);
        let mut rest = prose.as_str();
        while let Some(at) = rest.find("](") {
            let after = &rest[at + 2..];
            let end = after.find(')').unwrap_or(after.len());
            refs.links.push((n, link_target(&after[..end])));
            rest = &after[end..];
        }
    }
    refs.links.retain(|(_, t)| is_relative(t));
    refs
}

/// A link's target without its angle brackets, title or fragment.
fn link_target(raw: &str) -> String {
    let raw = raw.trim();
    let raw = raw
        .strip_prefix('<')
        .and_then(|r| r.split_once('>'))
        .map(|(t, _)| t)
        .unwrap_or_else(|| raw.split_whitespace().next().unwrap_or(""));
    let target = raw.split(['#', '?']).next().unwrap_or("");
    target.replace("%20", " ")
}

fn is_relative(target: &str) -> bool {
    !target.is_empty() && !target.contains("://") && !target.starts_with("mailto:")
}

/// Whether a code span unambiguously names a path of this repository: it starts with one of
/// [`PATH_ROOTS`] and holds nothing but path characters (no placeholder such as `<seq>`, no
/// ellipsis, no glob, no line number).
fn is_repository_path(span: &str) -> bool {
    PATH_ROOTS.iter().any(|r| span.starts_with(r))
        && span
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "/._-".contains(c))
        && !span.split('/').any(|part| part == "..")
}

/// Whether `target`, resolved against `base`, is a file or directory inside the repository.
fn exists_inside(base: &Path, target: &str) -> bool {
    let mut path = PathBuf::from(ROOT);
    let start = base.strip_prefix(ROOT).unwrap_or(base);
    for part in start.components().chain(Path::new(target).components()) {
        match part {
            Component::ParentDir => {
                if !path.pop() || !path.starts_with(ROOT) {
                    return false;
                }
            }
            Component::Normal(p) => path.push(p),
            Component::CurDir => {}
            // An absolute link names a file on the reader's machine, not in the clone.
            Component::RootDir | Component::Prefix(_) => return false,
        }
    }
    path.starts_with(ROOT) && path.exists()
}

/// Every reference of one markdown file that names nothing in the repository.
fn broken(file: &Path, text: &str) -> Vec<String> {
    let dir = file.parent().unwrap_or(Path::new(ROOT));
    let refs = references(text);
    let mut out = Vec::new();
    for (line, target) in refs.links {
        if !exists_inside(dir, &target) {
            out.push(format!("{}:{line}: link to {target}", rel(file)));
        }
    }
    for (line, path) in refs.paths {
        if !exists_inside(Path::new(ROOT), &path) {
            out.push(format!("{}:{line}: `{path}`", rel(file)));
        }
    }
    out
}

#[test]
fn every_markdown_reference_names_a_file_in_the_repository() {
    let files = files_ending("md");
    let names: Vec<String> = files.iter().map(|f| rel(f)).collect();
    for must in [
        "README.md",
        "SECURITY.md",
        "docs/architecture.md",
        "docs/proof-format.md",
        "fixtures/README.md",
        "tests/vectors/README.md",
    ] {
        assert!(names.iter().any(|n| n == must), "walked {names:?}");
    }
    let mut links = 0;
    let mut failures = Vec::new();
    for file in &files {
        let text = std::fs::read_to_string(file).unwrap();
        links += references(&text).links.len();
        failures.extend(broken(file, &text));
    }
    assert!(links >= 5, "the scan found the docs' links: {links}");
    assert!(
        failures.is_empty(),
        "markdown names what is not in the repository:\n  {}",
        failures.join("\n  ")
    );
}

#[test]
fn every_doc_a_source_file_names_exists() {
    let mut failures = Vec::new();
    let mut seen = 0;
    for file in files_ending("rs") {
        let text = std::fs::read_to_string(&file).unwrap();
        for (n, line) in text.lines().enumerate() {
            let mut rest = line;
            while let Some(at) = rest.find("docs/") {
                let name: String = rest[at..]
                    .chars()
                    .take_while(|c| c.is_ascii_alphanumeric() || "/._-".contains(*c))
                    .collect();
                rest = &rest[at + name.len()..];
                let name = name.trim_end_matches('.');
                if name.ends_with(".md") {
                    seen += 1;
                    if !Path::new(ROOT).join(name).is_file() {
                        failures.push(format!("{}:{}: {name}", rel(&file), n + 1));
                    }
                }
            }
        }
    }
    assert!(
        seen > 3,
        "the scan found the sources' doc references: {seen}"
    );
    assert!(
        failures.is_empty(),
        "source files name docs that do not exist:\n  {}",
        failures.join("\n  ")
    );
}

#[test]
fn the_checker_finds_a_broken_link_and_a_missing_path() {
    let md = "# T\n\nSee [the design](doc/nothing-here.md#part), [ok](README.md), \
              [web](https://example.org/x), [anchor](#t), and `src/not-a-module.rs` but \
              not `src/<placeholder>` or `tests/…`.\n\n[def]: ../../outside.md\n\n\
              ```sh\ncat [x](doc/in-a-fence.md) `src/in-a-fence.rs`\n```\n\
              A span `[y](doc/in-a-span.md)` holds no link.\n";
    assert_eq!(
        references(md),
        References {
            links: vec![
                (3, "doc/nothing-here.md".into()),
                (3, "README.md".into()),
                (5, "../../outside.md".into()),
            ],
            paths: vec![(3, "src/not-a-module.rs".into())],
        }
    );
    let readme = Path::new(ROOT).join("README.md");
    let found = broken(&readme, md);
    assert_eq!(
        found,
        [
            "README.md:3: link to doc/nothing-here.md",
            "README.md:5: link to ../../outside.md",
            "README.md:3: `src/not-a-module.rs`",
        ],
        "README.md in the root: a link out of the repository is broken too"
    );
}

#[test]
fn nothing_refers_to_a_directory_beside_the_clone() {
    // Spelled in parts so that this file does not match itself. Lower case: the text is
    // compared lower-cased, so `DESIGN.md` and `design.md` are both caught.
    let needles = [
        format!("{}/shared", ".."),
        format!("{}\\shared", ".."),
        format!("shared/{}.md", "design"),
        format!("\"{}\").join(\"shared\")", ".."),
    ];
    let mut files = Vec::new();
    walk(Path::new(ROOT), &mut files);
    assert!(
        files.len() > 50,
        "walked the repository: {} files",
        files.len()
    );
    let mut offenders = Vec::new();
    for f in &files {
        let Ok(text) = std::fs::read_to_string(f) else {
            continue; // binary: names no path a reader follows
        };
        let text = text.to_lowercase();
        for needle in &needles {
            if text.contains(needle.as_str()) {
                offenders.push(format!("{}: {needle}", rel(f)));
            }
        }
    }
    assert!(
        offenders.is_empty(),
        "a directory beside the clone is named:\n  {}",
        offenders.join("\n  ")
    );
}

#[test]
fn every_vector_file_names_its_source() {
    let dir = Path::new(ROOT).join("tests/vectors");
    let readme = std::fs::read_to_string(dir.join("README.md")).unwrap();
    let mut names = Vec::new();
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        if name == "README.md" {
            continue;
        }
        assert!(
            path.extension().is_some_and(|e| e == "json"),
            "{name}: vectors are JSON files with a `source` field"
        );
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
fn the_readme_opens_with_the_architecture() {
    let readme = std::fs::read_to_string(Path::new(ROOT).join("README.md")).unwrap();
    let first_paragraph = readme.split("\n\n").nth(1).unwrap();
    assert!(
        first_paragraph.contains("[docs/architecture.md](docs/architecture.md)"),
        "{first_paragraph}"
    );
    let doc = std::fs::read_to_string(Path::new(ROOT).join("docs/architecture.md")).unwrap();
    for section in [
        "## Stages",
        "## Data flow and its queues",
        "## Readings",
        "## Topics",
        "## Durability",
        "## Integrity",
        "## Seams",
        "## Module layers",
        "## Conventions",
    ] {
        assert!(
            doc.contains(section),
            "docs/architecture.md lacks {section}"
        );
    }
}

#[test]
fn the_readme_points_to_the_security_policy() {
    let readme = std::fs::read_to_string(Path::new(ROOT).join("README.md")).unwrap();
    let section = readme
        .split("\n## Security\n")
        .nth(1)
        .expect("README has a Security section");
    assert!(
        section.contains("[SECURITY.md](SECURITY.md)"),
        "README's Security section does not link SECURITY.md"
    );
    let policy = std::fs::read_to_string(Path::new(ROOT).join("SECURITY.md")).unwrap();
    for part in [
        "## Ports",
        "## An attacker on the ward network",
        "## Keys and secrets",
        "## Reporting a vulnerability",
    ] {
        assert!(policy.contains(part), "SECURITY.md lacks {part}");
    }
    // Reports go through the host's private channel, not an address made up for the file.
    assert!(!policy.contains('@'), "SECURITY.md names an e-mail address");
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
