//! Segment files: the bodies of the stored batches (each an encoded sealed batch), one after
//! another in `<store>/segments/<number, 8 digits>.seg`, found through the manifests in sled's
//! `batches` tree.
//!
//! Hand-written rather than kept in sled: sled 0.34's memory grows with the bytes it stores,
//! whatever its `cache_capacity`. Whole batches became blobs it kept in memory (170 MiB after
//! 270 MB), and even in 4 KiB parts its page table kept every tree node ever written (a leaf
//! holds at most 16 items), 7 to 30 MB more for every GB: a base station storing for weeks
//! would run out of memory. The bodies need nothing sled does beyond durability: each is
//! written once, never changed, and found by a manifest that sled holds in about 50 bytes of
//! memory. An append-only file written with `pwrite` and made durable with `fdatasync` is all
//! that takes, and costs no memory per byte stored.
//!
//! Rules that keep a manifest from ever naming bytes that are not, or no longer, there:
//! - bodies are written at the segment's known-good end and synced before the transaction that
//!   inserts their manifests; the end moves past them only once that transaction committed, so
//!   a failed write or sync (a full disk) is retried over the same region, and bytes a manifest
//!   may name are never written again;
//! - each opening of the store that writes starts a new file (the highest number + 1), so the
//!   tail a crash left unreferenced in an older file is never appended to; a file that passes
//!   [`SEGMENT_BYTES`] is followed by a new one;
//! - nothing here is created until the first write: reading a store (`dump`) creates nothing.

use std::ffi::OsStr;
use std::fs::{self, File, OpenOptions};
use std::io::ErrorKind;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use super::{corrupt_batch, Manifest, StoreError};

/// The directory of the segment files, in the store's directory.
pub const SEGMENTS_DIR: &str = "segments";
/// Writing moves on to a new file once one has passed this size.
pub const SEGMENT_BYTES: u64 = 64 << 20;

/// `dir/<number, zero-padded to 8 digits>.seg`.
pub fn segment_path(dir: &Path, number: u64) -> PathBuf {
    dir.join(format!("{number:08}.seg"))
}

/// The number of a segment file named `name`, if it is one.
fn segment_number(name: &OsStr) -> Option<u64> {
    let digits = name.to_str()?.strip_suffix(".seg")?;
    if digits.len() < 8 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

fn segment_error(path: &Path) -> impl FnOnce(std::io::Error) -> StoreError + '_ {
    move |source| StoreError::Segment {
        path: path.to_owned(),
        source,
    }
}

/// Syncs directory `dir`, so that an entry created in it survives a crash.
fn sync_dir(dir: &Path) -> Result<(), StoreError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(segment_error(dir))
}

/// What the segment directory holds: the highest file number (0 with none) and the bytes of
/// all its files. A missing directory holds nothing.
fn survey(dir: &Path) -> Result<(u64, u64), StoreError> {
    let entries = match fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == ErrorKind::NotFound => return Ok((0, 0)),
        Err(e) => return Err(segment_error(dir)(e)),
    };
    let (mut highest, mut bytes) = (0, 0);
    for entry in entries {
        let entry = entry.map_err(segment_error(dir))?;
        if let Some(number) = segment_number(&entry.file_name()) {
            highest = highest.max(number);
            bytes += entry.metadata().map_or(0, |m| m.len());
        }
    }
    Ok((highest, bytes))
}

/// Whether `dir` holds a segment file with anything in it.
pub fn holds_bodies(dir: &Path) -> bool {
    fs::read_dir(dir).is_ok_and(|entries| {
        entries.flatten().any(|e| {
            segment_number(&e.file_name()).is_some() && e.metadata().is_ok_and(|m| m.len() > 0)
        })
    })
}

/// The file bodies are appended to.
#[derive(Debug)]
struct Writer {
    number: u64,
    path: PathBuf,
    file: File,
    /// The known-good end: the bytes before it were synced and may be named by a committed
    /// manifest; the bytes after it are named by none.
    end: u64,
}

/// The bodies [`Segments::append`] wrote and synced, not yet counted as stored.
#[derive(Debug)]
#[must_use = "the end moves past the bodies only once their manifests are committed"]
pub struct Appended {
    pub segment: u64,
    /// Where each body begins, in the order given.
    pub offsets: Vec<u64>,
    end: u64,
}

/// The writing side of the segment files, one per opening of the store.
#[derive(Debug)]
pub struct Segments {
    dir: PathBuf,
    rotate_at: u64,
    writer: Option<Writer>,
    /// The bytes of the segment files other than the writer's, once counted.
    others: Option<u64>,
    /// Tests: the next `append` writes this many bytes, then fails as a full disk would.
    #[cfg(test)]
    pub fail_after: Option<usize>,
}

impl Segments {
    /// The segment files of the store in `store_dir`. Creates nothing.
    pub fn new(store_dir: &Path) -> Self {
        Segments {
            dir: store_dir.join(SEGMENTS_DIR),
            rotate_at: SEGMENT_BYTES,
            writer: None,
            others: None,
            #[cfg(test)]
            fail_after: None,
        }
    }

    #[cfg(test)]
    pub fn set_rotate_at(&mut self, bytes: u64) {
        self.rotate_at = bytes;
    }

    /// Starts a new segment file, numbered after the highest there is and after `named` (the
    /// highest a manifest names: should that file be lost, its number is still never reused),
    /// creating the directory if this is the first. Syncs the directories above it every time:
    /// an earlier attempt may have created an entry and failed before its sync.
    fn start(&mut self, named: u64) -> Result<&mut Writer, StoreError> {
        match fs::create_dir(&self.dir) {
            Ok(()) => {}
            Err(e) if e.kind() == ErrorKind::AlreadyExists => {}
            Err(e) => return Err(segment_error(&self.dir)(e)),
        }
        if let Some(store_dir) = self.dir.parent() {
            sync_dir(store_dir)?;
            // sled created the store directory in the data directory and synced neither.
            if let Some(data_dir) = store_dir.parent().filter(|d| !d.as_os_str().is_empty()) {
                sync_dir(data_dir)?;
            }
        }
        let (highest, bytes) = survey(&self.dir)?;
        let number = highest.max(named) + 1;
        let path = segment_path(&self.dir, number);
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&path)
            .map_err(segment_error(&path))?;
        if let Err(e) = sync_dir(&self.dir) {
            // Not left behind: each retry would add another empty file.
            let _ = fs::remove_file(&path);
            return Err(e);
        }
        self.others = Some(bytes);
        Ok(self.writer.insert(Writer {
            number,
            path,
            file,
            end: 0,
        }))
    }

    /// Writes `bodies` one after another at the known-good end of the current segment (a new
    /// one on the first write of this opening, or once the current one has passed its size)
    /// and syncs them once. The end stays where it was until [`Segments::committed`]. `named`
    /// is the highest segment number a manifest names.
    pub fn append(&mut self, bodies: &[&[u8]], named: u64) -> Result<Appended, StoreError> {
        #[cfg(test)]
        let mut budget = self.fail_after.take();
        if self
            .writer
            .as_ref()
            .is_some_and(|w| w.end >= self.rotate_at)
        {
            self.writer = None;
        }
        let w = match self.writer {
            Some(ref mut w) => w,
            None => self.start(named)?,
        };
        let mut offsets = Vec::with_capacity(bodies.len());
        let mut at = w.end;
        for body in bodies {
            #[cfg(test)]
            if let Some(left) = budget.as_mut() {
                if body.len() > *left {
                    w.file
                        .write_all_at(&body[..*left], at)
                        .map_err(segment_error(&w.path))?;
                    return Err(segment_error(&w.path)(std::io::Error::from_raw_os_error(
                        libc::ENOSPC,
                    )));
                }
                *left -= body.len();
            }
            w.file
                .write_all_at(body, at)
                .map_err(segment_error(&w.path))?;
            offsets.push(at);
            at += body.len() as u64;
        }
        w.file.sync_data().map_err(segment_error(&w.path))?;
        Ok(Appended {
            segment: w.number,
            offsets,
            end: at,
        })
    }

    /// Counts what `appended` wrote as stored: the manifests naming it were committed (or may
    /// have been), so it is never written over.
    pub fn committed(&mut self, appended: Appended) {
        if let Some(w) = self.writer.as_mut() {
            if w.number == appended.segment {
                w.end = w.end.max(appended.end);
            }
        }
    }

    /// The bytes of every segment file.
    pub fn bytes(&mut self) -> u64 {
        let others = match self.others {
            Some(n) => n,
            None => {
                let n = survey(&self.dir).map_or(0, |(_, bytes)| bytes);
                self.others = Some(n);
                n
            }
        };
        let writing = self
            .writer
            .as_ref()
            .map_or(0, |w| w.file.metadata().map_or(w.end, |m| m.len()));
        others + writing
    }

    /// The number of the segment being written and its known-good end.
    #[cfg(test)]
    pub fn writing(&self) -> Option<(u64, u64)> {
        self.writer.as_ref().map(|w| (w.number, w.end))
    }
}

/// The reading side: reads bodies named by manifests, keeping the file it opened last (a scan
/// reads one segment after another).
#[derive(Debug)]
pub struct SegmentReader<'a> {
    dir: &'a Path,
    open: Option<(u64, File)>,
}

impl<'a> SegmentReader<'a> {
    /// Reads the segment files in `segments_dir`, opening them for reading only.
    pub fn new(segments_dir: &'a Path) -> Self {
        SegmentReader {
            dir: segments_dir,
            open: None,
        }
    }

    /// The body of batch `id` that manifest `m` names, checked against its length and SHA-256.
    pub fn read(&mut self, id: u64, m: &Manifest) -> Result<Vec<u8>, StoreError> {
        let path = segment_path(self.dir, m.segment);
        let file = match self.open {
            Some((n, ref file)) if n == m.segment => file,
            _ => {
                self.open = None;
                let file = match File::open(&path) {
                    Ok(file) => file,
                    Err(e) if e.kind() == ErrorKind::NotFound => {
                        return Err(corrupt_batch(
                            id,
                            format!(
                                "its body's segment {} is missing ({})",
                                m.segment,
                                path.display()
                            ),
                        ))
                    }
                    Err(e) => return Err(segment_error(&path)(e)),
                };
                &self.open.insert((m.segment, file)).1
            }
        };
        let size = file.metadata().map_err(segment_error(&path))?.len();
        let cut_short = |end: String| {
            corrupt_batch(
                id,
                format!(
                    "its body in segment {} is cut short: {} ends at byte {size}, before byte \
                     {end}",
                    m.segment,
                    path.display()
                ),
            )
        };
        match m.offset.checked_add(m.length) {
            Some(end) if end <= size => {}
            Some(end) => return Err(cut_short(end.to_string())),
            None => return Err(cut_short(format!("{} + {}", m.offset, m.length))),
        }
        let mut body = vec![0u8; m.length as usize];
        match file.read_exact_at(&mut body, m.offset) {
            Ok(()) => {}
            Err(e) if e.kind() == ErrorKind::UnexpectedEof => {
                return Err(cut_short((m.offset + m.length).to_string()))
            }
            Err(e) => return Err(segment_error(&path)(e)),
        }
        if ring::digest::digest(&ring::digest::SHA256, &body).as_ref() != m.digest {
            return Err(corrupt_batch(
                id,
                format!(
                    "its body in segment {} does not hash to its manifest",
                    m.segment
                ),
            ));
        }
        Ok(body)
    }
}
