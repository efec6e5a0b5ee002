//! The command line as a user meets it: error messages and what the service writes to its log.

mod common;

use std::process::Command;

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
