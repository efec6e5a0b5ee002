//! A store whose filesystem fills up recovers once there is room again, in the same process: a
//! failed segment write is retried over the same bytes, and sled's sticky error after a failed
//! write must not wedge it until a restart.

mod common;

use std::fs::File;
use std::io::Write;

use iomt_edge::seal::crypt::MasterKey;
use iomt_edge::seal::Sealer;
use iomt_edge::store::{SledStore, Store, StoreError};

use common::tmpfs::Tmpfs;

/// Writes zeros until the filesystem refuses more.
fn fill(file: &mut File) {
    let chunk = vec![0u8; 64 << 10];
    loop {
        match file.write(&chunk) {
            Ok(0) => return,
            Ok(_) => {}
            Err(e) if e.raw_os_error() == Some(libc::ENOSPC) => return,
            Err(e) => panic!("filling the filesystem: {e}"),
        }
    }
}

#[test]
fn a_full_disk_fails_the_commit_and_the_retry_succeeds_once_there_is_room() {
    let fs = match Tmpfs::mount(8 << 20) {
        Ok(fs) => fs,
        Err(reason) => {
            eprintln!("skipped: cannot mount a tmpfs to fill up ({reason})");
            return;
        }
    };
    let path = fs.path().join("store");
    let sealer = Sealer::new(MasterKey::from_bytes(&[3u8; 32]).unwrap());
    let before: Vec<_> = (0..2)
        .map(|id| common::seal_batch(&sealer, id, 1_000))
        .collect();
    let group: Vec<_> = (2..6)
        .map(|id| common::seal_batch(&sealer, id, 1_000))
        .collect();

    let store = SledStore::open(&path).unwrap();
    store.put_batches(&before).unwrap();

    let filler_path = fs.path().join("filler");
    let mut filler = File::create(&filler_path).unwrap();
    fill(&mut filler);
    let err = store
        .put_batches(&group)
        .expect_err("a full filesystem fails the commit");
    // The bodies go first, to the segment file: that write fails, naming the file.
    let segment = path.join("segments").join("00000001.seg");
    match &err {
        StoreError::Segment { path, source } => {
            assert_eq!(path, &segment);
            assert_eq!(source.raw_os_error(), Some(libc::ENOSPC), "{source}");
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(
        err.to_string(),
        format!(
            "segment file {}: No space left on device (os error 28)",
            segment.display()
        )
    );
    // Still full: the retry fails again, and says why.
    assert!(store.put_batches(&group).is_err());
    // sled fails too once its log needs a page the filesystem cannot give, with its sticky
    // I/O error (each flush appends to its log).
    let err = (1..=10_000u64)
        .find_map(|n| store.reserve_seq(n).err())
        .expect("a full filesystem fails sled's flush");
    assert!(
        matches!(
            &err,
            StoreError::Sled {
                source: sled::Error::Io(_),
                ..
            }
        ),
        "{err:?}"
    );
    assert!(
        err.to_string()
            .starts_with(&format!("store {}: ", path.display())),
        "{err}"
    );

    drop(filler);
    std::fs::remove_file(&filler_path).unwrap();
    store
        .put_batches(&group)
        .expect("the same batches commit once there is room, without a restart");
    store.reserve_seq(1 << 30).unwrap();

    let all: Vec<_> = before.iter().chain(&group).collect();
    let check = |store: &SledStore| {
        assert_eq!(store.check().unwrap(), all.len() as u64);
        for b in &all {
            let stored = store.batch(b.header.id).unwrap().expect("stored");
            assert_eq!(&&stored, b);
            assert_eq!(
                sealer.open(&stored).unwrap(),
                sealer.open(b).unwrap(),
                "batch {}",
                b.header.id
            );
        }
    };
    check(&store);
    drop(store);
    let store = SledStore::open(&path).unwrap();
    check(&store);
    assert_eq!(store.seq_reserved().unwrap(), 1 << 30);
}
