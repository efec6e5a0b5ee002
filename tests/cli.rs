//! The command line as a user meets it: error messages and what the service writes to its log.

mod common;

use std::process::Command;

use common::*;

#[test]
fn a_missing_pipeline_file_is_named_once_with_its_cause() {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_iomt-edge"))
        .current_dir(dir.path())
        .args(["run", "--pipeline", "nonexist.toml", "--data", "data"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(
        String::from_utf8_lossy(&out.stderr),
        "error: nonexist.toml: No such file or directory (os error 2)\n"
    );
    assert!(
        !dir.path().join("data").exists(),
        "nothing is created for a pipeline that was never read"
    );
}

#[test]
fn a_log_written_to_a_file_has_no_colour_codes() {
    let dir = tempfile::tempdir().unwrap();
    // Edge::start sends standard error to a file, as a service manager or `2>log` would.
    let edge = Edge::start(&pipeline(""), &dir.path().join("data"));
    assert!(edge.stop().success());
    let log = std::fs::read_to_string(dir.path().join("data.log")).unwrap();
    assert!(!log.trim().is_empty(), "the service logged something");
    assert!(!log.contains('\x1b'), "colour codes in the log: {log:?}");
}
