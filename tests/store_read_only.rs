//! A store directory the process cannot write to is reported with its path, not as a bare sled
//! error.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use iomt_edge::store::{SledStore, Store};

fn assert_names_the_store(path: &Path) {
    let err = SledStore::open(path).expect_err("an unwritable store does not open");
    let text = err.to_string();
    assert!(
        text.starts_with(&format!("store {}: ", path.display())),
        "{text}"
    );
}

#[test]
fn an_unwritable_store_directory_is_named_in_the_error() {
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data");
        std::fs::create_dir(&data).unwrap();
        std::fs::set_permissions(&data, std::fs::Permissions::from_mode(0o555)).unwrap();
        assert_names_the_store(&data.join("store"));
        return;
    }
    // Root writes through permission bits: only a read-only filesystem stops it.
    let fs = match common::tmpfs::Tmpfs::mount(4 << 20) {
        Ok(fs) => fs,
        Err(reason) => {
            eprintln!("skipped: running as root and cannot mount a read-only tmpfs ({reason})");
            return;
        }
    };
    let existing = fs.path().join("store");
    SledStore::open(&existing).unwrap().reserve_seq(1).unwrap();
    fs.remount_read_only().unwrap();
    assert_names_the_store(&existing);
    assert_names_the_store(&fs.path().join("never-created"));
}
