//! `iomt-edge dump` as a user runs it: it reads, never creates, and says what is wrong.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use iomt_edge::seal::keys::MASTER_KEY_FILE;
use iomt_edge::store::{DataDirLock, SledStore, Store};

fn dump(data: &Path) -> Output {
    Command::new(env!("CARGO_BIN_EXE_iomt-edge"))
        .arg("dump")
        .arg("--data")
        .arg(data)
        .arg("--site")
        .arg(common::SITE)
        .output()
        .expect("run iomt-edge dump")
}

/// Asserts a failed dump: exit status 1, `stdout` printed, and `error: <message>` on stderr.
fn assert_fails(out: &Output, stdout: &str, message: &str) {
    assert_eq!(
        String::from_utf8_lossy(&out.stderr),
        format!("error: {message}\n")
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout), stdout);
    assert_eq!(out.status.code(), Some(1));
}

/// The dump lines of batch `id` as [`common::seal_batch`] made it with 2 rows.
fn lines_of_batch(id: u64) -> String {
    (0..2u64)
        .map(|i| {
            let seq = id * 2 + i;
            format!(
                r#"{{"batch":{id},"flags":[],"metric":"heart_rate","seq":{seq},"source":"w7-b1-mon","subject":"w7-b1","ts":"2023-11-14T22:13:{:02}Z","unit":"/min","value":{:?}}}"#,
                20 + seq,
                60.0 + id as f64 + i as f64 / 100.0,
            ) + "\n"
        })
        .collect()
}

#[test]
fn a_good_dump_prints_every_reading() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    common::write_store(&data, 3, 2, true);
    let out = dump(&data);
    assert_eq!(String::from_utf8_lossy(&out.stderr), "");
    assert!(out.status.success());
    let expected = [
        r#"{"batch":0,"flags":[],"metric":"heart_rate","seq":0,"source":"w7-b1-mon","subject":"w7-b1","ts":"2023-11-14T22:13:20Z","unit":"/min","value":60.0}"#,
        r#"{"batch":0,"flags":[],"metric":"heart_rate","seq":1,"source":"w7-b1-mon","subject":"w7-b1","ts":"2023-11-14T22:13:21Z","unit":"/min","value":60.01}"#,
        r#"{"batch":1,"flags":[],"metric":"heart_rate","seq":2,"source":"w7-b1-mon","subject":"w7-b1","ts":"2023-11-14T22:13:22Z","unit":"/min","value":61.0}"#,
        r#"{"batch":1,"flags":[],"metric":"heart_rate","seq":3,"source":"w7-b1-mon","subject":"w7-b1","ts":"2023-11-14T22:13:23Z","unit":"/min","value":61.01}"#,
        r#"{"batch":2,"flags":[],"metric":"heart_rate","seq":4,"source":"w7-b1-mon","subject":"w7-b1","ts":"2023-11-14T22:13:24Z","unit":"/min","value":62.0}"#,
        r#"{"batch":2,"flags":[],"metric":"heart_rate","seq":5,"source":"w7-b1-mon","subject":"w7-b1","ts":"2023-11-14T22:13:25Z","unit":"/min","value":62.01}"#,
    ];
    let stdout = String::from_utf8(out.stdout).unwrap();
    assert_eq!(stdout.lines().collect::<Vec<_>>(), expected);
    assert!(stdout.ends_with('\n'));
    // The helper the other tests build their expectations with agrees.
    assert_eq!(stdout, (0..3).map(lines_of_batch).collect::<String>());
}

#[test]
fn a_mistyped_data_directory_is_an_error_and_nothing_is_created() {
    let dir = tempfile::tempdir().unwrap();
    let mistyped = dir.path().join("dtaa");
    let out = dump(&mistyped);
    assert_fails(
        &out,
        "",
        &format!(
            "{}: no iomt-edge data here (no store/ directory)",
            mistyped.display()
        ),
    );
    assert!(!mistyped.exists(), "dump created {}", mistyped.display());

    // A directory that exists but holds no store is left as it was.
    let out = dump(dir.path());
    assert_fails(
        &out,
        "",
        &format!(
            "{}: no iomt-edge data here (no store/ directory)",
            dir.path().display()
        ),
    );
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
}

#[test]
fn a_missing_key_is_an_error_and_none_is_created() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    common::write_store(&data, 2, 2, true);
    let master = data.join("keys").join(MASTER_KEY_FILE);
    std::fs::remove_file(&master).unwrap();
    assert_fails(
        &dump(&data),
        "",
        &format!(
            "{} is missing, but the store holds 2 batches sealed with it: a new key could not \
             open them; restore it from backup",
            master.display()
        ),
    );
    assert!(!master.exists(), "dump created a key");
}

#[test]
fn another_stores_key_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let other = dir.path().join("other");
    common::write_store(&data, 2, 2, true);
    common::write_store(&other, 1, 2, true);
    let master = data.join("keys").join(MASTER_KEY_FILE);
    std::fs::copy(other.join("keys").join(MASTER_KEY_FILE), &master).unwrap();
    assert_fails(
        &dump(&data),
        "",
        &format!(
            "{} is not the key that sealed the 2 stored batches",
            master.display()
        ),
    );
}

#[test]
fn an_older_store_with_another_key_names_the_batch_the_key_does_not_open() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let other = dir.path().join("other");
    common::write_store(&data, 2, 2, false);
    common::write_store(&other, 1, 2, false);
    let master = data.join("keys").join(MASTER_KEY_FILE);
    let own = std::fs::read(&master).unwrap();
    std::fs::copy(other.join("keys").join(MASTER_KEY_FILE), &master).unwrap();
    assert_fails(
        &dump(&data),
        "",
        &format!(
            "{} does not open batch 1, the last one stored: it is not the key that sealed the \
             store, or that batch is damaged",
            master.display()
        ),
    );
    // With its own key the older store dumps, and dump records nothing in it.
    std::fs::write(&master, own).unwrap();
    let out = dump(&data);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        String::from_utf8(out.stdout).unwrap(),
        lines_of_batch(0) + &lines_of_batch(1)
    );
    let store = SledStore::open(&data.join("store")).unwrap();
    assert_eq!(store.key_check_value().unwrap(), None);
}

/// Batch `id`'s manifest in the store of `data`: its segment, offset and length.
fn body_of(data: &Path, id: u64) -> (u64, u64, u64) {
    let db = sled::open(data.join("store")).unwrap();
    let m = db
        .open_tree("batches")
        .unwrap()
        .get(id.to_be_bytes())
        .unwrap()
        .unwrap();
    assert_eq!((m[0], m.len()), (3, 57), "a manifest");
    let at = |i: usize| u64::from_be_bytes(m[i..i + 8].try_into().unwrap());
    (at(1), at(9), at(17))
}

fn segment_file(data: &Path, number: u64) -> PathBuf {
    data.join("store")
        .join("segments")
        .join(format!("{number:08}.seg"))
}

#[test]
fn a_damaged_batch_ends_the_dump_after_the_batches_before_it() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    common::write_store(&data, 3, 2, true);
    // The last byte of batch 1's body (the end of its ciphertext), in the segment file.
    let (segment, offset, len) = body_of(&data, 1);
    let path = segment_file(&data, segment);
    let original = std::fs::read(&path).unwrap();
    let mut bytes = original.clone();
    bytes[(offset + len - 1) as usize] ^= 1;
    std::fs::write(&path, bytes).unwrap();
    assert_fails(
        &dump(&data),
        &lines_of_batch(0),
        "stored record batch 1 is corrupt: its body in segment 1 does not hash to its manifest",
    );

    // The file cut short inside batch 2's body, the last one: batches 0 and 1 are printed.
    let (_, offset, len) = body_of(&data, 2);
    std::fs::write(&path, &original[..(offset + len / 2) as usize]).unwrap();
    assert_fails(
        &dump(&data),
        &(lines_of_batch(0) + &lines_of_batch(1)),
        &format!(
            "stored record batch 2 is corrupt: its body in segment 1 is cut short: {} ends at \
             byte {}, before byte {}",
            path.display(),
            offset + len / 2,
            offset + len
        ),
    );

    // The file lost: nothing can be printed, and dump does not make a new one.
    std::fs::remove_file(&path).unwrap();
    assert_fails(
        &dump(&data),
        "",
        &format!(
            "stored record batch 0 is corrupt: its body's segment 1 is missing ({})",
            path.display()
        ),
    );
    assert!(!path.exists());
}

#[test]
fn a_batch_copied_under_another_id_ends_the_dump_there() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    common::write_store(&data, 3, 2, true);
    // Batch 1's manifest (which names its body in the segment file) and header entry, copied
    // over batch 2's.
    let db = sled::open(data.join("store")).unwrap();
    for tree in ["batches", "headers"] {
        let tree = db.open_tree(tree).unwrap();
        let one = tree.get(1u64.to_be_bytes()).unwrap().unwrap();
        tree.insert(2u64.to_be_bytes(), one).unwrap();
    }
    db.flush().unwrap();
    drop(db);
    assert_fails(
        &dump(&data),
        &(lines_of_batch(0) + &lines_of_batch(1)),
        "stored record batch 2 is corrupt: it holds the sealed header of batch 1",
    );
}

#[test]
fn dump_creates_no_segment_file() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    // A store without batches has no segment directory, and dump does not make one.
    common::write_store(&data, 0, 2, true);
    let out = dump(&data);
    assert_eq!(String::from_utf8_lossy(&out.stderr), "");
    assert!(out.status.success());
    assert_eq!(out.stdout, b"");
    assert!(!data.join("store").join("segments").exists());

    // With batches, dump starts no segment file of its own.
    common::write_store(&data, 2, 2, true);
    let files = || {
        let mut names: Vec<_> = std::fs::read_dir(data.join("store").join("segments"))
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        names.sort();
        names
    };
    assert_eq!(files(), ["00000001.seg"]);
    let out = dump(&data);
    assert!(out.status.success());
    assert_eq!(
        String::from_utf8(out.stdout).unwrap(),
        lines_of_batch(0) + &lines_of_batch(1)
    );
    assert_eq!(files(), ["00000001.seg"]);
}

#[test]
fn a_data_directory_in_use_is_refused_with_the_holder_named() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    common::write_store(&data, 1, 2, true);
    let lock = DataDirLock::acquire(&data).unwrap();
    assert_fails(
        &dump(&data),
        "",
        &format!(
            "another iomt-edge (pid {}) is using {}",
            std::process::id(),
            data.display()
        ),
    );
    drop(lock);
    assert_eq!(
        String::from_utf8(dump(&data).stdout).unwrap(),
        lines_of_batch(0)
    );
}

#[test]
fn a_store_whose_database_was_lost_is_an_error_and_none_is_made() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    common::write_store(&data, 2, 2, true);
    let db = data.join("store").join("db");
    std::fs::remove_file(&db).unwrap();
    assert_fails(
        &dump(&data),
        "",
        &format!(
            "{}: the store's database (db) is missing: restore the store directory from a backup",
            data.join("store").display()
        ),
    );
    assert!(!db.exists(), "dump made a new database");
}
