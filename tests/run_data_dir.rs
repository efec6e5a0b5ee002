//! `iomt-edge run` and its data directory: one process per directory, and never a new key for a
//! store whose batches were sealed with another.

mod common;

use std::path::Path;
use std::process::{Command, Output};

use iomt_edge::seal::keys::MASTER_KEY_FILE;

/// `iomt-edge run` on `data` with the test pipeline, for a start that must fail.
fn run_refused(data: &Path) -> Output {
    let pipeline = data.with_extension("toml");
    std::fs::write(&pipeline, common::pipeline("")).unwrap();
    Command::new(env!("CARGO_BIN_EXE_iomt-edge"))
        .arg("run")
        .arg("--pipeline")
        .arg(&pipeline)
        .arg("--data")
        .arg(data)
        .output()
        .expect("run iomt-edge")
}

/// Asserts that the command failed with `message` as its last line on stderr.
fn assert_refused(out: &Output, message: &str) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(stderr.lines().last(), Some(message), "{stderr}");
    assert_eq!(out.status.code(), Some(1));
}

fn dump(data: &Path) -> Output {
    Command::new(env!("CARGO_BIN_EXE_iomt-edge"))
        .args(["dump", "--site", common::SITE, "--data"])
        .arg(data)
        .output()
        .expect("run iomt-edge dump")
}

#[test]
fn a_second_process_on_a_data_directory_is_told_who_has_it() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let edge = common::Edge::start(&common::pipeline(""), &data);
    let holder = format!(
        "another iomt-edge (pid {}) is using {}",
        edge.child.id(),
        data.display()
    );
    assert_refused(&run_refused(&data), &format!("error: store: {holder}"));
    let out = dump(&data);
    assert_eq!(
        String::from_utf8_lossy(&out.stderr),
        format!("error: {holder}\n")
    );
    assert_eq!(out.status.code(), Some(1));

    assert!(edge.stop().success());
    let out = dump(&data);
    assert_eq!(String::from_utf8_lossy(&out.stderr), "");
    assert!(out.status.success());
}

#[test]
fn the_service_never_replaces_the_key_of_a_store_with_batches() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let other = dir.path().join("other");
    common::write_store(&data, 2, 2, true);
    common::write_store(&other, 1, 2, true);
    let master = data.join("keys").join(MASTER_KEY_FILE);
    let own = std::fs::read(&master).unwrap();

    std::fs::remove_file(&master).unwrap();
    assert_refused(
        &run_refused(&data),
        &format!(
            "error: store: {} is missing, but the store holds 2 batches sealed with it: a new \
             key could not open them; restore it from backup",
            master.display()
        ),
    );
    assert!(!master.exists(), "the service created a new key");

    std::fs::copy(other.join("keys").join(MASTER_KEY_FILE), &master).unwrap();
    assert_refused(
        &run_refused(&data),
        &format!(
            "error: store: {} is not the key that sealed the 2 stored batches",
            master.display()
        ),
    );

    std::fs::write(&master, own).unwrap();
    let edge = common::Edge::start(&common::pipeline(""), &data);
    assert!(edge.stop().success());
    assert_eq!(common::stored_readings(&data).len(), 4);
}
