//! The store: sealed batches and node metadata, behind the [`Store`] trait. The small entries
//! are kept in sled, the batches' bodies in segment files of our own (`store/segments.rs`: sled's
//! memory grows with the bytes it holds, and bodies are most of them).
//!
//! sled trees and their keys:
//! - `batches`: batch id (u64 big-endian, so keys sort by id) → the batch's manifest: which
//!   segment file holds its body (the encoded [`SealedBatch`]), at which offset, its length and
//!   its SHA-256 (stores written before segment files existed hold the encoded batch itself
//!   here, which is still read);
//! - `headers`: batch id → the header as JSON, to list batches without reading ciphertext;
//! - `log`: the log of batches, every complete subtree's hash (`store/log.rs`), written in the
//!   transaction that stores the batch;
//! - `checkpoints`: tree size (u64 BE) → the signed checkpoint of the log at that size;
//! - `meta`: `seq_reserved` → u64, the first seq no process has handed out yet;
//!   `master_key_check` → the check value of the master key that seals the batches
//!   ([`open_node_keys`] records it and refuses any other key).
//!
//! Files beside sled's: `segments/<number, 8 digits>.seg`, the bodies one after another,
//! appended and never changed; created by the first write of an opening, never by a read.
//!
//! `put_batches` writes the bodies to the segment file and syncs it, then inserts the manifests
//! and headers in one transaction, flushes sled and `fdatasync`s its log before returning: a
//! manifest never names bytes that are not on disk, and what `put_batches` returned for
//! survives a power cut (sled's own flush, `sync_file_range`, would not commit the log's new
//! length or the drive's cache). A database lost beside its segment files is never silently
//! replaced by an empty one. Every read checks the body against its manifest's length and SHA-256,
//! and the bindings a copy or a lost write would break: the header sealed inside a batch names
//! the id it is stored under, and the `headers` entry equals it.

pub mod alarm_db;
mod log;
mod segments;

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::ops::ControlFlow;
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard, RwLock, RwLockReadGuard, RwLockWriteGuard};

use sled::transaction::{ConflictableTransactionError, TransactionError, TransactionalTree};
use sled::Transactional;
use tracing::warn;

pub use self::segments::SEGMENTS_DIR;
use self::segments::{SegmentReader, Segments};
use crate::seal::crypt::{Envelope, CHECK_LEN};
use crate::seal::entry;
use crate::seal::keys::{KeyError, NodeKeys, MASTER_KEY_FILE};
use crate::seal::merkle::Hash;
use crate::seal::{BatchHeader, SealedBatch};

/// sled's page cache. Batches are written once and read back rarely (a dump, a proof), so a
/// cache helps little.
const CACHE_BYTES: u64 = 8 << 20;

/// The first byte of a manifest (an inline record starts with [`VALUE_VERSION`]; version 2, a
/// manifest of 4 KiB parts kept in a `parts` tree, was never deployed and is not read).
const MANIFEST_VERSION: u8 = 3;
const MANIFEST_LEN: usize = 1 + 8 + 8 + 8 + 32;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("store {}: {source}", path.display())]
    Sled { path: PathBuf, source: sled::Error },
    #[error("stored record {key} is corrupt: {reason}")]
    Corrupt { key: String, reason: String },
    #[error("batch {0} is already stored")]
    Duplicate(u64),
    #[error(transparent)]
    Keys(#[from] KeyError),
    #[error("{}", key_missing(path, *batches))]
    KeyMissing { path: PathBuf, batches: usize },
    #[error("{}", wrong_key(path, *batches))]
    WrongKey { path: PathBuf, batches: usize },
    #[error(
        "{} does not open batch {id}, the last one stored: it is not the key that sealed the \
         store, or that batch is damaged",
        path.display()
    )]
    KeyDoesNotOpen { path: PathBuf, id: u64 },
    #[error(
        "{}: the store's database ({SLED_LOG}) is missing: restore the store directory from a \
         backup",
        path.display()
    )]
    NoDatabase { path: PathBuf },
    #[error("{}", locked(dir, *pid))]
    Locked { dir: PathBuf, pid: Option<u32> },
    #[error("{}: {source}", path.display())]
    Lock {
        path: PathBuf,
        source: std::io::Error,
    },
    /// A segment file (or its directory) could not be written, synced or read: a full disk, an
    /// I/O error. A failed write is retried over the same bytes.
    #[error("segment file {}: {source}", path.display())]
    Segment {
        path: PathBuf,
        source: std::io::Error,
    },
}

fn locked(dir: &Path, pid: Option<u32>) -> String {
    match pid {
        Some(pid) => format!("another iomt-edge (pid {pid}) is using {}", dir.display()),
        None => format!("another iomt-edge is using {}", dir.display()),
    }
}

fn key_missing(path: &Path, batches: usize) -> String {
    let holds = match batches {
        0 => "the store was started with it".to_owned(),
        1 => "the store holds 1 batch sealed with it: a new key could not open it".to_owned(),
        n => format!("the store holds {n} batches sealed with it: a new key could not open them"),
    };
    format!(
        "{} is missing, but {holds}; restore it from backup",
        path.display()
    )
}

fn wrong_key(path: &Path, batches: usize) -> String {
    let sealed = match batches {
        0 => "the key this store was started with".to_owned(),
        1 => "the key that sealed the 1 stored batch".to_owned(),
        n => format!("the key that sealed the {n} stored batches"),
    };
    format!("{} is not {sealed}", path.display())
}

/// Durable storage of sealed batches. `put_batches` returns only once the batches would survive
/// a crash of the process or the machine.
pub trait Store: Send + Sync + 'static {
    /// Writes the body of every batch not stored yet to the segment file and syncs it once, then
    /// stores every batch's manifest and header in one transaction and flushes once. A batch
    /// already stored with the same bytes is not an error, so a call whose transaction
    /// committed but whose flush failed is completed by calling again with the same batches;
    /// a batch id stored with other bytes is [`StoreError::Duplicate`], and then nothing of the
    /// call is stored.
    fn put_batches(&self, batches: &[SealedBatch]) -> Result<(), StoreError>;
    /// [`Store::put_batches`] of one batch.
    fn put_batch(&self, batch: &SealedBatch) -> Result<(), StoreError> {
        self.put_batches(std::slice::from_ref(batch))
    }
    /// The batch stored under `id`, checked against its key and its `headers` entry.
    fn batch(&self, id: u64) -> Result<Option<SealedBatch>, StoreError>;
    /// Headers of every stored batch, by id. Reads only the headers: a batch that is missing or
    /// unpaired is found by [`Store::scan`].
    fn headers(&self) -> Result<Vec<BatchHeader>, StoreError>;
    /// The header of the batch with the highest id.
    fn last_header(&self) -> Result<Option<BatchHeader>, StoreError>;
    /// Reads every batch in id order, checks that each is paired with an equal header and each
    /// header with a batch, and hands each batch to `each` until it breaks. Returns the number
    /// of batches handed over; the first inconsistency is an error naming the batch. `each` must
    /// not call the store.
    fn scan(&self, each: &mut dyn FnMut(SealedBatch) -> ControlFlow<()>)
        -> Result<u64, StoreError>;
    /// [`Store::scan`] handing nothing over: the number of batches, once each is found paired
    /// and consistent. Reads every batch.
    fn check(&self) -> Result<u64, StoreError> {
        self.scan(&mut |_| ControlFlow::Continue(()))
    }
    /// The header of batch `id`, from its `headers` entry (nothing decrypted or checked).
    fn header(&self, id: u64) -> Result<Option<BatchHeader>, StoreError>;
    /// The number of leaves in the log of batches (`store/log.rs`).
    fn log_size(&self) -> Result<u64, StoreError>;
    /// The stored hash of the complete subtree at `level` and `index` of the log of batches.
    fn log_node(&self, level: u8, index: u64) -> Result<Option<Hash>, StoreError>;
    /// Durably stores the signed checkpoint of the log at `size`. Storing the same note again
    /// is not an error; another note for the same size is.
    fn put_checkpoint(&self, size: u64, note: &str) -> Result<(), StoreError>;
    /// The first stored checkpoint of a size of at least `size`, and its size.
    fn checkpoint_from(&self, size: u64) -> Result<Option<(u64, String)>, StoreError>;
    /// The stored checkpoint of the largest size.
    fn latest_checkpoint(&self) -> Result<Option<(u64, String)>, StoreError>;
    /// Hands every stored checkpoint to `each`, by size, until it breaks. `each` must not call
    /// the store.
    fn checkpoints(
        &self,
        each: &mut dyn FnMut(u64, String) -> ControlFlow<()>,
    ) -> Result<(), StoreError>;
    /// The first seq that was never handed out.
    fn seq_reserved(&self) -> Result<u64, StoreError>;
    /// Durably records that seqs below `next` may have been handed out.
    fn reserve_seq(&self, next: u64) -> Result<(), StoreError>;
    /// The check value of the master key that seals this store's batches, once recorded.
    fn key_check_value(&self) -> Result<Option<[u8; CHECK_LEN]>, StoreError>;
    /// Durably records the master key's check value; refuses to replace another one.
    fn record_key_check_value(&self, check: &[u8; CHECK_LEN]) -> Result<(), StoreError>;
    /// Bytes the store occupies on disk.
    fn size_on_disk(&self) -> u64;
}

const VALUE_VERSION: u8 = 1;
const SEQ_RESERVED: &[u8] = b"seq_reserved";
/// sled 0.34's log file in the store directory.
pub const SLED_LOG: &str = "db";
const KEY_CHECK: &[u8] = b"master_key_check";

/// The store of a data directory: sled and the segment files. Not `Clone`: the sled handles
/// live only inside it, so that dropping them after an I/O error really closes the database and
/// the next call opens it afresh (see [`SledStore::open`]). Share it as `Arc<dyn Store>`.
pub struct SledStore {
    path: PathBuf,
    /// `None` after an I/O error: the next call reopens.
    trees: RwLock<Option<Trees>>,
    /// The segment file being written. Kept across reopenings of sled: its known-good end
    /// stays right whatever sled's errors. Locked after `trees`, for a whole `put_batches`.
    segments: Mutex<Segments>,
    /// Numbers each opening, so an error seen on one never closes the next.
    openings: AtomicU64,
}

impl std::fmt::Debug for SledStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SledStore")
            .field("path", &self.path)
            .finish()
    }
}

/// The handles of one opening of the database. Borrowed only under [`SledStore`]'s lock and
/// never cloned out of it.
struct Trees {
    opening: u64,
    db: sled::Db,
    batches: sled::Tree,
    headers: sled::Tree,
    meta: sled::Tree,
    /// The log of batches (`store/log.rs`).
    log_nodes: sled::Tree,
    /// Signed checkpoints of the log: tree size (u64 BE) → the signed note.
    checkpoints: sled::Tree,
    /// sled's log file, `<store>/db`: synced after each of sled's flushes (see [`Trees::durable`]).
    log: File,
    /// `<store>/segments`, read through a [`SegmentReader`].
    segments_dir: PathBuf,
}

/// What an operation on the open trees can fail with: sled's errors are kept apart so that
/// [`SledStore::with`] can tell an I/O error, which poisons the open database, from the rest.
enum Failure {
    Sled(sled::Error),
    Store(StoreError),
}

impl From<sled::Error> for Failure {
    fn from(e: sled::Error) -> Self {
        Failure::Sled(e)
    }
}

impl From<StoreError> for Failure {
    fn from(e: StoreError) -> Self {
        Failure::Store(e)
    }
}

impl<E: Into<Failure>> From<TransactionError<E>> for Failure {
    fn from(e: TransactionError<E>) -> Self {
        match e {
            TransactionError::Abort(e) => e.into(),
            TransactionError::Storage(e) => Failure::Sled(e),
        }
    }
}

impl From<std::convert::Infallible> for Failure {
    fn from(e: std::convert::Infallible) -> Self {
        match e {}
    }
}

impl SledStore {
    /// Opens (or creates) the store at `path`.
    ///
    /// After an I/O error (a full disk, a failed write) sled 0.34 records a global error in the
    /// open database and fails every later operation with it, for good: only a new opening
    /// clears it. So an operation that fails with an I/O error drops the handles, and the next
    /// call opens the database again; if that fails, the call returns why, and the one after
    /// tries again.
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        let store = SledStore {
            path: path.to_owned(),
            trees: RwLock::new(None),
            segments: Mutex::new(Segments::new(path)),
            openings: AtomicU64::new(0),
        };
        let trees = store.open_trees()?;
        *store.write() = Some(trees);
        Ok(store)
    }

    /// Builds the log of batches of a store written before it existed (a no-op otherwise);
    /// returns how many batches it appended. [`SledStore::open_existing`] does not, so that a
    /// command that only reads writes nothing; the service and `proof` do.
    pub fn build_log(&self) -> Result<u64, StoreError> {
        self.with(|t| t.build_log())
    }

    /// Opens the store at `path` only if it exists: for commands that read (`dump`), which
    /// must not leave a fresh database behind where one was lost.
    pub fn open_existing(path: &Path) -> Result<Self, StoreError> {
        if !path.join(SLED_LOG).is_file() {
            return Err(StoreError::NoDatabase {
                path: path.to_owned(),
            });
        }
        SledStore::open(path)
    }

    fn open_trees(&self) -> Result<Trees, StoreError> {
        let sled = |source| StoreError::Sled {
            path: self.path.clone(),
            source,
        };
        let segments_dir = self.path.join(SEGMENTS_DIR);
        // A lost database is not replaced by an empty one beside the bodies it named (the
        // next batches would reuse their ids).
        let lost = || {
            corrupt(
                self.path.display(),
                format!(
                    "its database names no batch, but {} holds batch bodies: restore the whole \
                     store directory from a backup",
                    segments_dir.display()
                ),
            )
        };
        if !self.path.join(SLED_LOG).exists() && segments::holds_bodies(&segments_dir) {
            return Err(lost());
        }
        // A new Config each time: clones of one share its global error.
        let db = open_sled(
            sled::Config::new()
                .path(&self.path)
                .cache_capacity(CACHE_BYTES),
        )
        .map_err(sled)?;
        let log = sled_log(&self.path).map_err(|source| StoreError::Segment {
            path: self.path.join(SLED_LOG),
            source,
        })?;
        let trees = Trees {
            opening: self.openings.fetch_add(1, Ordering::Relaxed),
            batches: db.open_tree("batches").map_err(sled)?,
            headers: db.open_tree("headers").map_err(sled)?,
            meta: db.open_tree("meta").map_err(sled)?,
            log_nodes: db.open_tree("log").map_err(sled)?,
            checkpoints: db.open_tree("checkpoints").map_err(sled)?,
            log,
            segments_dir: segments_dir.clone(),
            db,
        };
        // The same for a database replaced by an empty one.
        if trees.batches.first().map_err(sled)?.is_none()
            && segments::holds_bodies(&trees.segments_dir)
        {
            return Err(lost());
        }
        Ok(trees)
    }

    // A panic while the lock was held leaves the handles as sound as sled left them.
    fn read(&self) -> RwLockReadGuard<'_, Option<Trees>> {
        self.trees.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write(&self) -> RwLockWriteGuard<'_, Option<Trees>> {
        self.trees.write().unwrap_or_else(|e| e.into_inner())
    }

    // A panic while the lock was held leaves the writer's end where it was last committed.
    fn segments(&self) -> MutexGuard<'_, Segments> {
        self.segments.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Runs `op` on the open trees, opening them first if an I/O error closed them.
    fn with<T>(&self, op: impl FnOnce(&Trees) -> Result<T, Failure>) -> Result<T, StoreError> {
        let (result, opening) = {
            let guard = self.read();
            match guard.as_ref() {
                Some(trees) => (op(trees), trees.opening),
                None => {
                    drop(guard);
                    let mut guard = self.write();
                    if guard.is_none() {
                        *guard = Some(self.open_trees()?);
                    }
                    let trees = guard.as_ref().expect("opened just now");
                    (op(trees), trees.opening)
                }
            }
        };
        result.map_err(|failure| match failure {
            Failure::Store(e) => e,
            Failure::Sled(source) => {
                if matches!(source, sled::Error::Io(_)) {
                    self.close(opening, &source);
                }
                StoreError::Sled {
                    path: self.path.clone(),
                    source,
                }
            }
        })
    }

    /// Drops the handles of `opening` (unless another call already reopened): the last handle
    /// dropped closes the database and releases its file lock.
    fn close(&self, opening: u64, error: &sled::Error) {
        let mut guard = self.write();
        if guard.as_ref().is_some_and(|t| t.opening == opening) {
            warn!(
                store = %self.path.display(),
                %error,
                "I/O error: the store reopens on its next use"
            );
            *guard = None;
        }
    }

    #[cfg(test)]
    fn with_trees<T>(&self, op: impl FnOnce(&Trees) -> T) -> T {
        op(self.read().as_ref().expect("store open"))
    }
}

/// Opens a sled database, waiting a moment when its file lock is still taken. The data
/// directory's own lock (`DataDirLock`) keeps other processes out, so a taken sled lock is this
/// process's: sled's background threads hold it for a moment after the last handle of an
/// earlier opening is dropped (a reopening after an I/O error, a command run right after).
pub fn open_sled(config: sled::Config) -> sled::Result<sled::Db> {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    loop {
        match config.open() {
            Err(sled::Error::Io(e))
                if e.to_string().contains("could not acquire lock")
                    && std::time::Instant::now() < deadline =>
            {
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
            r => return r,
        }
    }
}

/// A descriptor of the log file of the sled database in `dir`, for [`make_durable`].
pub fn sled_log(dir: &Path) -> std::io::Result<File> {
    File::open(dir.join(SLED_LOG))
}

/// Flushes `db`, then syncs its log file (`log`, from [`sled_log`]). sled 0.34 makes its writes
/// durable with `sync_file_range` alone, which neither commits the file's metadata (its new
/// length) nor flushes the drive's cache; `fdatasync` does both, through any descriptor of the
/// file.
pub fn make_durable(db: &sled::Db, log: &File) -> sled::Result<()> {
    db.flush()?;
    log.sync_data().map_err(sled::Error::Io)
}

fn checkpoint_entry((k, v): (sled::IVec, sled::IVec)) -> Result<(u64, String), StoreError> {
    let size = log::parse_u64("checkpoint key", &k)?;
    let note = String::from_utf8(v.to_vec())
        .map_err(|_| corrupt(format!("checkpoint {size}"), "not UTF-8"))?;
    Ok((size, note))
}

fn corrupt(key: impl std::fmt::Display, reason: impl Into<String>) -> StoreError {
    StoreError::Corrupt {
        key: key.to_string(),
        reason: reason.into(),
    }
}

fn corrupt_batch(id: u64, reason: impl Into<String>) -> StoreError {
    corrupt(format!("batch {id}"), reason)
}

/// `[version u8][header json len u32][header json][wrapped key len u16][wrapped key]
/// [key nonce 12][nonce 12][ciphertext …]`
fn encode(b: &SealedBatch) -> Vec<u8> {
    let header = serde_json::to_vec(&b.header).expect("header serialises");
    let e = &b.envelope;
    let mut out = Vec::with_capacity(
        1 + 4 + header.len() + 2 + e.wrapped_key.len() + 24 + e.ciphertext.len(),
    );
    out.push(VALUE_VERSION);
    out.extend_from_slice(&(header.len() as u32).to_be_bytes());
    out.extend_from_slice(&header);
    out.extend_from_slice(&(e.wrapped_key.len() as u16).to_be_bytes());
    out.extend_from_slice(&e.wrapped_key);
    out.extend_from_slice(&e.key_nonce);
    out.extend_from_slice(&e.nonce);
    out.extend_from_slice(&e.ciphertext);
    out
}

/// Decodes the value stored under batch `id`, refusing one whose sealed header names another
/// id: the AEAD binds the ciphertext to its header, not the header to the key it is stored
/// under, so a record copied under another id would otherwise open cleanly.
fn decode(id: u64, v: &[u8]) -> Result<SealedBatch, StoreError> {
    let short = || corrupt_batch(id, "truncated");
    let (&version, rest) = v.split_first().ok_or_else(short)?;
    if version != VALUE_VERSION {
        return Err(corrupt_batch(id, format!("unknown version {version}")));
    }
    let (len, rest) = rest.split_first_chunk::<4>().ok_or_else(short)?;
    let len = u32::from_be_bytes(*len) as usize;
    let header = rest.get(..len).ok_or_else(short)?;
    let header: BatchHeader =
        serde_json::from_slice(header).map_err(|e| corrupt_batch(id, e.to_string()))?;
    if header.id != id {
        return Err(corrupt_batch(
            id,
            format!("it holds the sealed header of batch {}", header.id),
        ));
    }
    let rest = &rest[len..];
    let (klen, rest) = rest.split_first_chunk::<2>().ok_or_else(short)?;
    let klen = u16::from_be_bytes(*klen) as usize;
    let wrapped_key = rest.get(..klen).ok_or_else(short)?.to_vec();
    let rest = &rest[klen..];
    let (key_nonce, rest) = rest.split_first_chunk::<12>().ok_or_else(short)?;
    let (nonce, ciphertext) = rest.split_first_chunk::<12>().ok_or_else(short)?;
    Ok(SealedBatch {
        header,
        envelope: Envelope {
            wrapped_key,
            key_nonce: *key_nonce,
            nonce: *nonce,
            ciphertext: ciphertext.to_vec(),
        },
    })
}

fn id_of(key: &[u8]) -> Result<u64, StoreError> {
    key.try_into()
        .map(u64::from_be_bytes)
        .map_err(|_| corrupt(format!("{key:?}"), "key is not a u64"))
}

/// The `headers` entry stored under `id`, refusing one that describes another batch.
fn parse_header(id: u64, v: &[u8]) -> Result<BatchHeader, StoreError> {
    let header: BatchHeader = serde_json::from_slice(v)
        .map_err(|e| corrupt_batch(id, format!("its header entry: {e}")))?;
    if header.id != id {
        return Err(corrupt_batch(
            id,
            format!("its header entry is the header of batch {}", header.id),
        ));
    }
    Ok(header)
}

/// Checks that the `headers` entry of batch `id` equals the header sealed with it.
fn check_header_entry(
    id: u64,
    sealed: &BatchHeader,
    entry: Option<&[u8]>,
) -> Result<(), StoreError> {
    let entry = entry.ok_or_else(|| corrupt_batch(id, "it has no header entry"))?;
    if parse_header(id, entry)? != *sealed {
        return Err(corrupt_batch(
            id,
            "its header entry differs from the header sealed with it",
        ));
    }
    Ok(())
}

fn next_entry(it: &mut sled::Iter) -> Result<Option<(u64, sled::IVec)>, Failure> {
    match it.next().transpose()? {
        Some((k, v)) => Ok(Some((id_of(&k)?, v))),
        None => Ok(None),
    }
}

/// Where a body lies and what it is: the value under a batch's id in `batches`,
/// `[version u8 = 3][segment u64][offset u64][length u64][SHA-256 of the body]`, integers
/// big-endian.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Manifest {
    segment: u64,
    offset: u64,
    length: u64,
    digest: [u8; 32],
}

impl Manifest {
    fn encode(&self) -> [u8; MANIFEST_LEN] {
        let mut m = [0u8; MANIFEST_LEN];
        m[0] = MANIFEST_VERSION;
        m[1..9].copy_from_slice(&self.segment.to_be_bytes());
        m[9..17].copy_from_slice(&self.offset.to_be_bytes());
        m[17..25].copy_from_slice(&self.length.to_be_bytes());
        m[25..].copy_from_slice(&self.digest);
        m
    }

    /// The manifest stored as `v`, or `None` if `v` is not one (an inline record).
    fn parse(id: u64, v: &[u8]) -> Result<Option<Self>, StoreError> {
        if v.first() != Some(&MANIFEST_VERSION) {
            return Ok(None);
        }
        let m: &[u8; MANIFEST_LEN] = v
            .try_into()
            .map_err(|_| corrupt_batch(id, "its manifest has the wrong length"))?;
        let u64_at = |i: usize| u64::from_be_bytes(m[i..i + 8].try_into().expect("8 bytes"));
        Ok(Some(Manifest {
            segment: u64_at(1),
            offset: u64_at(9),
            length: u64_at(17),
            digest: m[25..].try_into().expect("32 bytes"),
        }))
    }
}

/// One batch of a `put_batches` call, encoded before the transaction, which sled may rerun.
struct Record<'a> {
    batch: &'a SealedBatch,
    key: [u8; 8],
    /// The encoded batch: the body written to a segment file.
    body: Vec<u8>,
    digest: [u8; 32],
    header: Vec<u8>,
    /// Its leaf in the log of batches; `None` for a header whose root is not a hash.
    leaf: Option<Hash>,
    /// Where its body was written, when this call wrote it.
    manifest: Option<Manifest>,
}

impl<'a> Record<'a> {
    fn new(batch: &'a SealedBatch) -> Self {
        let body = encode(batch);
        Record {
            batch,
            key: batch.header.id.to_be_bytes(),
            digest: ring::digest::digest(&ring::digest::SHA256, &body)
                .as_ref()
                .try_into()
                .expect("32 bytes"),
            body,
            header: serde_json::to_vec(&batch.header).expect("header serialises"),
            leaf: entry::log_leaf(&batch.header).ok(),
            manifest: None,
        }
    }

    fn id(&self) -> u64 {
        self.batch.header.id
    }

    /// Whether `stored`, found under this record's key, is this record: a manifest of a body
    /// of the same length and SHA-256 (wherever it lies), or (as a store written before
    /// segment files existed holds it) its encoded batch.
    fn is(&self, stored: &[u8]) -> Result<bool, StoreError> {
        Ok(match Manifest::parse(self.id(), stored)? {
            Some(m) => m.length == self.body.len() as u64 && m.digest == self.digest,
            None => stored == self.body.as_slice(),
        })
    }
}

fn put_record(
    batches: &TransactionalTree,
    headers: &TransactionalTree,
    log_nodes: &TransactionalTree,
    r: &Record<'_>,
) -> Result<(), ConflictableTransactionError<StoreError>> {
    let id = r.id();
    let abort = ConflictableTransactionError::Abort;
    let leaf = r
        .leaf
        .ok_or_else(|| abort(corrupt_batch(id, "its header's root is not a SHA-256 hash")))?;
    match batches.get(r.key)? {
        None => {
            // Its body was written by this call unless the batch was stored when the call
            // began, and only this call writes.
            let manifest = r
                .manifest
                .as_ref()
                .ok_or_else(|| abort(corrupt_batch(id, "it vanished while being stored")))?;
            batches.insert(&r.key, &manifest.encode()[..])?;
            headers.insert(&r.key, r.header.as_slice())?;
            log::append(log_nodes, id, leaf)?;
        }
        Some(stored) if r.is(&stored).map_err(abort)? => {
            // The retry of a call whose transaction committed and whose flush failed: the
            // batch is there already. Its header must be too, or the store is damaged.
            let entry = headers.get(r.key)?;
            check_header_entry(id, &r.batch.header, entry.as_deref()).map_err(abort)?;
            // Written again: after a failed write-back the kernel may hold the entries as
            // clean pages while the disk does not, and only new log records make the flush
            // that follows write them for sure.
            batches.insert(&r.key, stored)?;
            headers.insert(&r.key, r.header.as_slice())?;
            log::append(log_nodes, id, leaf)?;
        }
        Some(_) => return Err(abort(StoreError::Duplicate(id))),
    }
    Ok(())
}

impl Trees {
    /// Writes and syncs the bodies of the batches not stored yet, then commits every manifest
    /// and header in one transaction, not yet flushed.
    fn put_unflushed(
        &self,
        records: &mut [Record<'_>],
        segments: &mut Segments,
    ) -> Result<(), Failure> {
        // The first record of each id, and those whose bodies this call writes: the same id
        // twice in one call is one body (or a duplicate, which the transaction refuses).
        let mut first = HashMap::new();
        let mut to_write = Vec::new();
        for (i, r) in records.iter().enumerate() {
            if *first.entry(r.id()).or_insert(i) == i && self.batches.get(r.key)?.is_none() {
                to_write.push(i);
            }
        }
        let appended = if to_write.is_empty() {
            None
        } else {
            let bodies: Vec<&[u8]> = to_write.iter().map(|&i| &records[i].body[..]).collect();
            let appended = segments.append(&bodies, self.highest_named_segment()?)?;
            for (&i, &offset) in to_write.iter().zip(&appended.offsets) {
                let r = &mut records[i];
                r.manifest = Some(Manifest {
                    segment: appended.segment,
                    offset,
                    length: r.body.len() as u64,
                    digest: r.digest,
                });
            }
            Some(appended)
        };
        for i in 0..records.len() {
            let f = first[&records[i].id()];
            if f != i {
                records[i].manifest = records[f].manifest.clone();
            }
        }
        // In id order: each batch's leaf follows the previous one in the log.
        let mut order: Vec<&Record<'_>> = records.iter().collect();
        order.sort_by_key(|r| r.id());
        let result = (&self.batches, &self.headers, &self.log_nodes).transaction(
            |(batches, headers, log_nodes)| {
                for r in &order {
                    put_record(batches, headers, log_nodes, r)?;
                }
                Ok(())
            },
        );
        if let Some(appended) = appended {
            match &result {
                // Refused (a duplicate, a damaged header): no manifest names the bodies, and
                // the next call writes over them.
                Err(TransactionError::Abort(_)) => {}
                // Committed, or (a storage error) perhaps committed: never written over.
                Ok(()) | Err(TransactionError::Storage(_)) => segments.committed(appended),
            }
        }
        result?;
        Ok(())
    }

    /// The segment the last batch's manifest names (0 with none): at least the highest any
    /// manifest names, since batches are written in id order.
    fn highest_named_segment(&self) -> Result<u64, Failure> {
        Ok(match self.batches.last()? {
            Some((k, v)) => Manifest::parse(id_of(&k)?, &v)?.map_or(0, |m| m.segment),
            None => 0,
        })
    }

    /// The batch whose `batches` entry is `stored`: its body read through `reader` from the
    /// segment file its manifest names, or (a store written before segment files existed)
    /// `stored` itself.
    fn open_record(
        &self,
        id: u64,
        stored: &[u8],
        reader: &mut SegmentReader<'_>,
    ) -> Result<SealedBatch, Failure> {
        match Manifest::parse(id, stored)? {
            None => Ok(decode(id, stored)?),
            Some(m) => Ok(decode(id, &reader.read(id, &m)?)?),
        }
    }

    fn batch(
        &self,
        id: u64,
        reader: &mut SegmentReader<'_>,
    ) -> Result<Option<SealedBatch>, Failure> {
        let key = id.to_be_bytes();
        // Plain reads: a read transaction would write to sled's log, and `dump` writes
        // nothing. A batch being written may show its entry without its header (or the other
        // way round) for a moment; a second look tells that from damage.
        let mut value = self.batches.get(key)?;
        let mut entry = self.headers.get(key)?;
        if value.is_some() != entry.is_some() {
            value = self.batches.get(key)?;
            entry = self.headers.get(key)?;
        }
        match (value, entry) {
            (None, None) => Ok(None),
            (None, Some(_)) => Err(corrupt_batch(id, "it has a header entry but no batch").into()),
            (Some(v), entry) => {
                let sealed = self.open_record(id, &v, reader)?;
                check_header_entry(id, &sealed.header, entry.as_deref())?;
                Ok(Some(sealed))
            }
        }
    }

    fn unpaired_header(
        &self,
        id: u64,
        reader: &mut SegmentReader<'_>,
    ) -> Result<SealedBatch, Failure> {
        self.batch(id, reader)?
            .ok_or_else(|| corrupt_batch(id, "it has a header entry but no batch").into())
    }

    fn headers(&self) -> Result<Vec<BatchHeader>, Failure> {
        let mut out = Vec::new();
        for kv in self.headers.iter() {
            let (k, v) = kv?;
            out.push(parse_header(id_of(&k)?, &v)?);
        }
        Ok(out)
    }

    fn last_header(&self) -> Result<Option<BatchHeader>, Failure> {
        match self.headers.last()? {
            Some((k, v)) => Ok(Some(parse_header(id_of(&k)?, &v)?)),
            None => Ok(None),
        }
    }

    fn scan(&self, each: &mut dyn FnMut(SealedBatch) -> ControlFlow<()>) -> Result<u64, Failure> {
        let mut reader = SegmentReader::new(&self.segments_dir);
        let mut batches = self.batches.iter();
        let mut headers = self.headers.iter();
        let mut b = next_entry(&mut batches)?;
        let mut h = next_entry(&mut headers)?;
        let mut n = 0;
        loop {
            let (sealed, advance_batches, advance_headers) = match (&b, &h) {
                (None, None) => return Ok(n),
                (Some((bid, v)), Some((hid, entry))) if bid == hid => {
                    let sealed = self.open_record(*bid, v, &mut reader)?;
                    check_header_entry(*bid, &sealed.header, Some(entry))?;
                    (sealed, true, true)
                }
                // An unpaired id is damage, or a batch written after one iterator had passed
                // its id: the consistent read of that one id tells which.
                (Some((bid, _)), Some((hid, _))) if bid > hid => {
                    (self.unpaired_header(*hid, &mut reader)?, false, true)
                }
                (None, Some((hid, _))) => (self.unpaired_header(*hid, &mut reader)?, false, true),
                (Some((bid, _)), _) => {
                    let sealed = self
                        .batch(*bid, &mut reader)?
                        .ok_or_else(|| corrupt_batch(*bid, "it vanished while being read"))?;
                    (sealed, true, false)
                }
            };
            n += 1;
            if each(sealed).is_break() {
                return Ok(n);
            }
            if advance_batches {
                b = next_entry(&mut batches)?;
            }
            if advance_headers {
                h = next_entry(&mut headers)?;
            }
        }
    }

    fn log_size(&self) -> Result<u64, Failure> {
        match self.log_nodes.get(log::SIZE_KEY)? {
            Some(v) => Ok(log::parse_u64("log size", &v)?),
            None => Ok(0),
        }
    }

    fn log_node(&self, level: u8, index: u64) -> Result<Option<Hash>, Failure> {
        match self.log_nodes.get(log::node_key(level, index))? {
            Some(v) => Ok(Some(log::parse_hash(level, index, &v)?)),
            None => Ok(None),
        }
    }

    /// Appends to the log of batches the batches it does not hold yet: those of a store written
    /// before the log existed. In transactions of a few thousand, flushed at the end.
    fn build_log(&self) -> Result<u64, Failure> {
        let mut added = 0;
        loop {
            let from = self.log_size()?;
            let mut leaves = Vec::new();
            for kv in self.headers.range(from.to_be_bytes()..).take(4096) {
                let (k, v) = kv?;
                let id = id_of(&k)?;
                let h = parse_header(id, &v)?;
                let leaf = entry::log_leaf(&h)
                    .map_err(|e| corrupt_batch(id, format!("its header: {e}")))?;
                leaves.push((id, leaf));
            }
            if leaves.is_empty() {
                break;
            }
            added += leaves.len() as u64;
            self.log_nodes.transaction(|log_nodes| {
                for &(id, leaf) in &leaves {
                    log::append(log_nodes, id, leaf)?;
                }
                Ok(())
            })?;
        }
        if added > 0 {
            self.durable()?;
        }
        Ok(added)
    }

    fn header(&self, id: u64) -> Result<Option<BatchHeader>, Failure> {
        match self.headers.get(id.to_be_bytes())? {
            Some(v) => Ok(Some(parse_header(id, &v)?)),
            None => Ok(None),
        }
    }

    fn put_checkpoint(&self, size: u64, note: &str) -> Result<(), Failure> {
        let key = size.to_be_bytes();
        match self
            .checkpoints
            .compare_and_swap(key, None::<&[u8]>, Some(note.as_bytes()))?
        {
            Ok(()) => {}
            // Cut again after a crash between signing and flushing: Ed25519 signs the same text
            // to the same note.
            Err(e) if e.current.as_deref() == Some(note.as_bytes()) => {}
            Err(_) => {
                return Err(corrupt(
                    format!("checkpoint {size}"),
                    "another note of this size is stored",
                )
                .into())
            }
        }
        self.durable()
    }

    fn checkpoint_from(&self, size: u64) -> Result<Option<(u64, String)>, Failure> {
        match self.checkpoints.range(size.to_be_bytes()..).next() {
            Some(kv) => Ok(Some(checkpoint_entry(kv?)?)),
            None => Ok(None),
        }
    }

    fn latest_checkpoint(&self) -> Result<Option<(u64, String)>, Failure> {
        match self.checkpoints.last()? {
            Some(kv) => Ok(Some(checkpoint_entry(kv)?)),
            None => Ok(None),
        }
    }

    fn checkpoints(
        &self,
        each: &mut dyn FnMut(u64, String) -> ControlFlow<()>,
    ) -> Result<(), Failure> {
        for kv in self.checkpoints.iter() {
            let (size, note) = checkpoint_entry(kv?)?;
            if each(size, note).is_break() {
                break;
            }
        }
        Ok(())
    }

    fn seq_reserved(&self) -> Result<u64, Failure> {
        let stored = match self.meta.get(SEQ_RESERVED)? {
            Some(v) => id_of(&v)?,
            None => 0,
        };
        // The batches themselves are the last word, should the meta record lag behind them.
        let after_last = self.last_header()?.map_or(0, |h| h.seq_last + 1);
        Ok(stored.max(after_last))
    }

    fn reserve_seq(&self, next: u64) -> Result<(), Failure> {
        self.meta.insert(SEQ_RESERVED, &next.to_be_bytes())?;
        self.durable()
    }

    fn durable(&self) -> Result<(), Failure> {
        Ok(make_durable(&self.db, &self.log)?)
    }

    fn key_check_value(&self) -> Result<Option<[u8; CHECK_LEN]>, Failure> {
        match self.meta.get(KEY_CHECK)? {
            None => Ok(None),
            Some(v) => match <[u8; CHECK_LEN]>::try_from(v.as_ref()) {
                Ok(check) => Ok(Some(check)),
                Err(_) => Err(corrupt("master_key_check", "not 16 bytes").into()),
            },
        }
    }

    fn record_key_check_value(&self, check: &[u8; CHECK_LEN]) -> Result<(), Failure> {
        match self
            .meta
            .compare_and_swap(KEY_CHECK, None::<&[u8]>, Some(&check[..]))?
        {
            Ok(()) => {}
            Err(e) if e.current.as_deref() == Some(&check[..]) => {}
            Err(_) => {
                return Err(corrupt("master_key_check", "it records another master key").into())
            }
        }
        self.durable()
    }
}

impl Store for SledStore {
    fn put_batches(&self, batches: &[SealedBatch]) -> Result<(), StoreError> {
        if batches.is_empty() {
            return Ok(());
        }
        let mut records: Vec<Record<'_>> = batches.iter().map(Record::new).collect();
        self.with(|t| {
            t.put_unflushed(&mut records, &mut self.segments())?;
            t.durable()
        })
    }

    fn batch(&self, id: u64) -> Result<Option<SealedBatch>, StoreError> {
        self.with(|t| t.batch(id, &mut SegmentReader::new(&t.segments_dir)))
    }

    fn headers(&self) -> Result<Vec<BatchHeader>, StoreError> {
        self.with(|t| t.headers())
    }

    fn last_header(&self) -> Result<Option<BatchHeader>, StoreError> {
        self.with(|t| t.last_header())
    }

    fn scan(
        &self,
        each: &mut dyn FnMut(SealedBatch) -> ControlFlow<()>,
    ) -> Result<u64, StoreError> {
        self.with(|t| t.scan(each))
    }

    fn header(&self, id: u64) -> Result<Option<BatchHeader>, StoreError> {
        self.with(|t| t.header(id))
    }

    fn log_size(&self) -> Result<u64, StoreError> {
        self.with(|t| t.log_size())
    }

    fn log_node(&self, level: u8, index: u64) -> Result<Option<Hash>, StoreError> {
        self.with(|t| t.log_node(level, index))
    }

    fn put_checkpoint(&self, size: u64, note: &str) -> Result<(), StoreError> {
        self.with(|t| t.put_checkpoint(size, note))
    }

    fn checkpoint_from(&self, size: u64) -> Result<Option<(u64, String)>, StoreError> {
        self.with(|t| t.checkpoint_from(size))
    }

    fn latest_checkpoint(&self) -> Result<Option<(u64, String)>, StoreError> {
        self.with(|t| t.latest_checkpoint())
    }

    fn checkpoints(
        &self,
        each: &mut dyn FnMut(u64, String) -> ControlFlow<()>,
    ) -> Result<(), StoreError> {
        self.with(|t| t.checkpoints(each))
    }

    fn seq_reserved(&self) -> Result<u64, StoreError> {
        self.with(|t| t.seq_reserved())
    }

    fn reserve_seq(&self, next: u64) -> Result<(), StoreError> {
        self.with(|t| t.reserve_seq(next))
    }

    fn key_check_value(&self) -> Result<Option<[u8; CHECK_LEN]>, StoreError> {
        self.with(|t| t.key_check_value())
    }

    fn record_key_check_value(&self, check: &[u8; CHECK_LEN]) -> Result<(), StoreError> {
        self.with(|t| t.record_key_check_value(check))
    }

    fn size_on_disk(&self) -> u64 {
        // Not through `with`: a metric's failed directory listing must not close the store.
        let sled = self
            .read()
            .as_ref()
            .map_or(0, |t| t.db.size_on_disk().unwrap_or(0));
        sled + self.segments().bytes()
    }
}

/// The data directory's lock: `<data>/LOCK`, held with `flock` by the one process that uses the
/// directory (the service, or `dump`), and holding its pid. Taken before sled opens the store,
/// so a second process is told who has the directory instead of failing on sled's own lock.
/// The kernel releases it when the process ends, however it ends.
#[derive(Debug)]
pub struct DataDirLock {
    _file: File,
}

pub const LOCK_FILE: &str = "LOCK";

impl DataDirLock {
    /// Takes the lock of `data_dir`, which must exist, or says which process holds it.
    pub fn acquire(data_dir: &Path) -> Result<Self, StoreError> {
        let path = data_dir.join(LOCK_FILE);
        let lock_error = |source| StoreError::Lock {
            path: path.clone(),
            source,
        };
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o644)
            .open(&path)
            .map_err(lock_error)?;
        // SAFETY: flock only acts on the descriptor, which `file` keeps open for the call.
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            let e = std::io::Error::last_os_error();
            if e.raw_os_error() != Some(libc::EWOULDBLOCK) {
                return Err(lock_error(e));
            }
            // The holder may not have written its pid yet: then the message goes without it.
            let mut text = String::new();
            let pid = file
                .read_to_string(&mut text)
                .ok()
                .and_then(|_| text.trim().parse().ok());
            return Err(StoreError::Locked {
                dir: data_dir.to_owned(),
                pid,
            });
        }
        file.set_len(0).map_err(lock_error)?;
        writeln!(file, "{}", std::process::id()).map_err(lock_error)?;
        Ok(DataDirLock { _file: file })
    }
}

/// Whether [`open_node_keys`] may create keys.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyMode {
    /// The service: a fresh store (no batches, no recorded key) gets new keys.
    CreateIfFresh,
    /// Commands that inspect a data directory, and tests: never creates or records anything.
    ReadOnly,
}

/// Loads the node's keys from `keys_dir` and makes sure the master key is the one that sealed
/// `store`. A store that holds batches, or has recorded a key, never gets a new key: a missing
/// `master.key` or another key is an error naming the file. A fresh store takes the keys there
/// are, or, with [`KeyMode::CreateIfFresh`], new ones; and records the master key's check value.
/// A store written before check values were recorded gets one once the key opens its last batch.
pub fn open_node_keys(
    store: &dyn Store,
    keys_dir: &Path,
    node_name: &str,
    mode: KeyMode,
) -> Result<NodeKeys, StoreError> {
    let master_path = keys_dir.join(MASTER_KEY_FILE);
    let record = |keys: &NodeKeys| match mode {
        KeyMode::CreateIfFresh => store.record_key_check_value(&keys.master.check_value()),
        KeyMode::ReadOnly => Ok(()),
    };
    let batches = || store.headers().map(|h| h.len());
    let existing_keys = || match NodeKeys::load(keys_dir) {
        Err(KeyError::Missing { path }) if path == master_path => Err(StoreError::KeyMissing {
            path,
            batches: batches()?,
        }),
        keys => Ok(keys?),
    };
    let recorded = store.key_check_value()?;
    // With a recorded value the batches are not consulted, so one damaged header does not stop
    // `dump` from printing the batches before it.
    let last = match recorded {
        Some(_) => None,
        None => store.last_header()?,
    };
    match (recorded, last) {
        (None, None) => {
            let keys = match mode {
                KeyMode::CreateIfFresh => NodeKeys::load_or_create(keys_dir, node_name)?,
                KeyMode::ReadOnly => NodeKeys::load(keys_dir)?,
            };
            record(&keys)?;
            Ok(keys)
        }
        (Some(check), _) => {
            let keys = existing_keys()?;
            if check != keys.master.check_value() {
                return Err(StoreError::WrongKey {
                    path: master_path,
                    batches: batches()?,
                });
            }
            Ok(keys)
        }
        // Written before check values were recorded: the key must open the last batch.
        (None, Some(last)) => {
            let keys = existing_keys()?;
            let sealed = store
                .batch(last.id)?
                .ok_or_else(|| corrupt_batch(last.id, "it has a header entry but no batch"))?;
            keys.master
                .open(&sealed.envelope, &sealed.header.aad())
                .map_err(|_| StoreError::KeyDoesNotOpen {
                    path: master_path.clone(),
                    id: last.id,
                })?;
            record(&keys)?;
            Ok(keys)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;
    use std::os::unix::fs::PermissionsExt;

    fn sealed(id: u64) -> SealedBatch {
        SealedBatch {
            header: BatchHeader {
                id,
                rows: 2,
                seq_first: id * 10,
                seq_last: id * 10 + 1,
                ts_min: 1,
                ts_max: 2,
                received_min: 3,
                received_max: 4,
                root: "00".repeat(32),
                sealed_at: 5,
                leaf_encoding: 1,
            },
            envelope: Envelope {
                wrapped_key: vec![1; 48],
                key_nonce: [2; 12],
                nonce: [3; 12],
                ciphertext: vec![4; 100],
            },
        }
    }

    /// Batch `id` with other contents than [`sealed`].
    fn other(id: u64) -> SealedBatch {
        let mut b = sealed(id);
        b.envelope.ciphertext[0] = 9;
        b
    }

    /// Asserts that `result` failed with an error that names batch `id`.
    fn fails_naming<T: std::fmt::Debug>(result: Result<T, StoreError>, id: u64) -> String {
        let text = result.expect_err("must fail").to_string();
        assert!(text.contains(&format!("batch {id} ")), "{text}");
        text
    }

    /// Writes straight into one of the store's trees, as damage or an old version would.
    fn raw_put(s: &SledStore, tree: &str, id: u64, value: Vec<u8>) {
        s.with_trees(|t| {
            t.db.open_tree(tree)
                .unwrap()
                .insert(id.to_be_bytes(), value)
        })
        .unwrap();
    }

    fn raw_remove(s: &SledStore, tree: &str, id: u64) {
        s.with_trees(|t| t.db.open_tree(tree).unwrap().remove(id.to_be_bytes()))
            .unwrap()
            .expect("was there");
    }

    /// A new store whose log of batches already holds a leaf 0, so that tests may number their
    /// batches from 1 (ids must follow on from the log's size).
    fn store_from_one(dir: &Path) -> SledStore {
        let s = SledStore::open(dir).unwrap();
        s.with_trees(|t| {
            t.log_nodes
                .insert(log::node_key(0, 0), &[0u8; 32][..])
                .unwrap();
            t.log_nodes
                .insert(log::SIZE_KEY, &1u64.to_be_bytes())
                .unwrap();
        });
        s
    }

    fn header_json(h: &BatchHeader) -> Vec<u8> {
        serde_json::to_vec(h).unwrap()
    }

    #[test]
    fn batches_survive_reopening() {
        let dir = tempfile::tempdir().unwrap();
        {
            let s = SledStore::open(dir.path()).unwrap();
            s.put_batch(&sealed(0)).unwrap();
            s.put_batch(&sealed(1)).unwrap();
            s.put_batch(&sealed(1)).unwrap();
            assert!(matches!(
                s.put_batch(&other(1)),
                Err(StoreError::Duplicate(1))
            ));
            s.reserve_seq(5).unwrap();
        }
        let s = SledStore::open(dir.path()).unwrap();
        assert_eq!(s.batch(1).unwrap().unwrap(), sealed(1));
        assert_eq!(s.batch(2).unwrap(), None);
        assert_eq!(s.headers().unwrap().len(), 2);
        assert_eq!(s.last_header().unwrap().unwrap().id, 1);
        // The last batch ends at seq 11, above the reservation of 5.
        assert_eq!(s.seq_reserved().unwrap(), 12);
        s.reserve_seq(1_000).unwrap();
        assert_eq!(s.seq_reserved().unwrap(), 1_000);
    }

    #[test]
    fn truncated_records_are_reported_not_misread() {
        let v = encode(&sealed(7));
        for cut in 0..v.len() - 100 {
            assert!(decode(7, &v[..cut]).is_err(), "cut at {cut}");
        }
        assert_eq!(decode(7, &v).unwrap(), sealed(7));
    }

    #[test]
    fn a_batch_copied_under_another_id_does_not_open() {
        let dir = tempfile::tempdir().unwrap();
        let s = store_from_one(dir.path());
        s.put_batches(&[sealed(1), sealed(2)]).unwrap();
        // Batch 1's record and header entry, copied over batch 2's.
        raw_put(&s, "batches", 2, encode(&sealed(1)));
        raw_put(&s, "headers", 2, header_json(&sealed(1).header));
        let text = fails_naming(s.batch(2), 2);
        assert!(text.contains("sealed header of batch 1"), "{text}");
        fails_naming(s.check(), 2);
        assert!(decode(8, &encode(&sealed(7))).is_err());
        assert_eq!(s.batch(1).unwrap().unwrap(), sealed(1));

        // Batch 1's manifest (naming its body in the segment) copied over batch 3's: the body
        // hashes to the manifest, but the header sealed in it names batch 1.
        s.put_batches(&[sealed(3)]).unwrap();
        raw_put(&s, "batches", 3, manifest_of(&s, 1).encode().to_vec());
        raw_put(&s, "headers", 3, header_json(&sealed(1).header));
        let text = fails_naming(s.batch(3), 3);
        assert!(
            text.ends_with("it holds the sealed header of batch 1"),
            "{text}"
        );
        assert_eq!(s.batch(1).unwrap().unwrap(), sealed(1));
    }

    #[test]
    fn a_header_entry_must_equal_the_sealed_header() {
        let dir = tempfile::tempdir().unwrap();
        let s = store_from_one(dir.path());
        s.put_batches(&[sealed(1), sealed(2)]).unwrap();
        let mut h = sealed(2).header;
        h.rows = 1_000;
        raw_put(&s, "headers", 2, header_json(&h));
        let text = fails_naming(s.batch(2), 2);
        assert!(text.contains("differs from the header sealed"), "{text}");
        fails_naming(s.check(), 2);

        // A header entry that describes another batch is refused even by the header listing.
        raw_put(&s, "headers", 2, header_json(&sealed(1).header));
        let text = fails_naming(s.headers(), 2);
        assert!(text.contains("header of batch 1"), "{text}");
        fails_naming(s.last_header(), 2);
    }

    #[test]
    fn unpaired_batches_and_headers_are_found() {
        let dir = tempfile::tempdir().unwrap();
        let s = store_from_one(dir.path());
        s.put_batches(&[sealed(1), sealed(2), sealed(3)]).unwrap();
        assert_eq!(s.check().unwrap(), 3);

        raw_remove(&s, "headers", 2);
        let text = fails_naming(s.batch(2), 2);
        assert!(text.contains("no header entry"), "{text}");
        fails_naming(s.check(), 2);
        raw_put(&s, "headers", 2, header_json(&sealed(2).header));
        assert_eq!(s.check().unwrap(), 3);

        // The last batch lost, its header kept: the end of the walk is checked too.
        raw_remove(&s, "batches", 3);
        let text = fails_naming(s.batch(3), 3);
        assert!(text.contains("header entry but no batch"), "{text}");
        fails_naming(s.check(), 3);
        raw_remove(&s, "headers", 3);
        // And a batch with no header after the last header.
        raw_put(&s, "batches", 4, encode(&sealed(4)));
        fails_naming(s.check(), 4);
    }

    #[test]
    fn scan_hands_over_batches_in_order_until_told_to_stop() {
        let dir = tempfile::tempdir().unwrap();
        let s = store_from_one(dir.path());
        s.put_batches(&[sealed(3), sealed(1), sealed(2)]).unwrap();
        let mut seen = Vec::new();
        let n = s
            .scan(&mut |b| {
                seen.push(b);
                ControlFlow::Continue(())
            })
            .unwrap();
        assert_eq!((n, seen), (3, vec![sealed(1), sealed(2), sealed(3)]));
        let n = s.scan(&mut |_| ControlFlow::Break(())).unwrap();
        assert_eq!(n, 1);
    }

    #[test]
    fn a_group_is_stored_whole_or_not_at_all() {
        let dir = tempfile::tempdir().unwrap();
        let s = store_from_one(dir.path());
        s.put_batches(&[sealed(1)]).unwrap();
        let err = s
            .put_batches(&[sealed(2), other(1), sealed(3)])
            .unwrap_err();
        assert!(matches!(err, StoreError::Duplicate(1)), "{err}");
        assert_eq!(s.batch(2).unwrap(), None);
        assert_eq!(s.batch(3).unwrap(), None);
        assert_eq!(s.batch(1).unwrap().unwrap(), sealed(1));
        // The same id twice in one call: the same bytes are one batch (one body written, over
        // the bodies of the refused call), others a duplicate.
        s.put_batches(&[sealed(2), sealed(2)]).unwrap();
        let bodies = (encode(&sealed(1)).len() + encode(&sealed(2)).len()) as u64;
        assert_eq!(s.segments().writing(), Some((1, bodies)));
        assert!(matches!(
            s.put_batches(&[sealed(3), other(3)]),
            Err(StoreError::Duplicate(3))
        ));
        assert_eq!(s.check().unwrap(), 2);
    }

    #[test]
    fn batch_ids_must_follow_on_and_an_older_store_gets_its_log_built() {
        let dir = tempfile::tempdir().unwrap();
        {
            let s = SledStore::open(dir.path()).unwrap();
            let err = s.put_batches(&[sealed(1)]).unwrap_err().to_string();
            assert!(err.contains("log of batches holds 0"), "{err}");
            assert_eq!(s.batch(1).unwrap(), None);
            s.put_batches(&[sealed(2), sealed(0), sealed(1)]).unwrap();
            assert_eq!(s.log_size().unwrap(), 3);
            let leaf = |id| entry::log_leaf(&sealed(id).header).unwrap();
            assert_eq!(s.log_node(0, 2).unwrap(), Some(leaf(2)));
            assert_eq!(
                s.log_node(1, 0).unwrap(),
                Some(crate::seal::merkle::node_hash(&leaf(0), &leaf(1)))
            );
            assert_eq!(s.log_node(1, 1).unwrap(), None);
            // What a store written before the log existed holds: batches, no log.
            s.with_trees(|t| t.log_nodes.clear().unwrap());
        }
        let s = SledStore::open_existing(dir.path()).unwrap();
        assert_eq!(s.log_size().unwrap(), 0, "reading builds nothing");
        assert_eq!(s.build_log().unwrap(), 3);
        assert_eq!(s.build_log().unwrap(), 0);
        assert_eq!(
            s.log_node(0, 2).unwrap(),
            Some(entry::log_leaf(&sealed(2).header).unwrap())
        );
        drop(s);
        let s = SledStore::open(dir.path()).unwrap();
        assert_eq!(s.log_size().unwrap(), 3);
        s.put_batches(&[sealed(3)]).unwrap();
        assert_eq!(s.log_size().unwrap(), 4);
    }

    #[test]
    fn checkpoints_are_kept_by_size_and_never_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let s = SledStore::open(dir.path()).unwrap();
        assert_eq!(s.latest_checkpoint().unwrap(), None);
        s.put_checkpoint(3, "note 3").unwrap();
        s.put_checkpoint(10, "note 10").unwrap();
        s.put_checkpoint(3, "note 3").unwrap();
        let err = s.put_checkpoint(3, "another").unwrap_err().to_string();
        assert!(err.contains("checkpoint 3"), "{err}");
        assert_eq!(s.latest_checkpoint().unwrap(), Some((10, "note 10".into())));
        assert_eq!(s.checkpoint_from(4).unwrap(), Some((10, "note 10".into())));
        assert_eq!(s.checkpoint_from(3).unwrap(), Some((3, "note 3".into())));
        assert_eq!(s.checkpoint_from(11).unwrap(), None);
        let mut all = Vec::new();
        s.checkpoints(&mut |size, _| {
            all.push(size);
            ControlFlow::Continue(())
        })
        .unwrap();
        assert_eq!(all, vec![3, 10]);
    }

    #[test]
    fn a_call_whose_flush_failed_is_completed_by_calling_again() {
        let dir = tempfile::tempdir().unwrap();
        let group = [sealed(1), sealed(2), sealed(3)];
        {
            let s = store_from_one(dir.path());
            s.put_batches(&group[..1]).unwrap();
            // What a committed transaction leaves when the flush after it fails: the bodies of
            // the group in the segment, every manifest and header, not yet known to be durable.
            let mut records: Vec<Record<'_>> = group[1..].iter().map(Record::new).collect();
            let put = s.with_trees(|t| t.put_unflushed(&mut records, &mut s.segments()));
            assert!(put.is_ok());
            let written = segment_len(dir.path(), 1);
            assert_eq!(s.segments().writing(), Some((1, written)));
            // The caller's retry of the whole group: nothing is written twice.
            s.put_batches(&group).unwrap();
            s.put_batch(&group[2]).unwrap();
            assert_eq!(segment_len(dir.path(), 1), written);
            assert_eq!(s.segments().writing(), Some((1, written)));
        }
        let s = SledStore::open(dir.path()).unwrap();
        for b in &group {
            assert_eq!(s.batch(b.header.id).unwrap().as_ref(), Some(b));
        }
        assert_eq!(s.check().unwrap(), 3);
    }

    /// The segment files of the store in `dir`.
    fn segment_files(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> = fs::read_dir(dir.join(SEGMENTS_DIR))
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort();
        names
    }

    fn segment_len(dir: &Path, number: u64) -> u64 {
        fs::metadata(segments::segment_path(&dir.join(SEGMENTS_DIR), number))
            .unwrap()
            .len()
    }

    /// The manifest stored under `id`.
    fn manifest_of(s: &SledStore, id: u64) -> Manifest {
        let v = s.with_trees(|t| t.batches.get(id.to_be_bytes()).unwrap().unwrap());
        Manifest::parse(id, &v).unwrap().expect("a manifest")
    }

    #[test]
    fn a_multi_megabyte_batch_round_trips_through_a_segment_file() {
        let dir = tempfile::tempdir().unwrap();
        let mut big = sealed(2);
        big.envelope.ciphertext = (0..3 << 20).map(|i: u32| (i % 251) as u8).collect();
        let all = [sealed(1), big.clone(), sealed(3)];
        {
            let s = store_from_one(dir.path());
            s.put_batches(&all).unwrap();
            assert_eq!(s.batch(2).unwrap().as_ref(), Some(&big));
            // One file, the three bodies one after another.
            assert_eq!(segment_files(dir.path()), ["00000001.seg"]);
            let bodies: u64 = all.iter().map(|b| encode(b).len() as u64).sum();
            assert_eq!(segment_len(dir.path(), 1), bodies);
            let m = manifest_of(&s, 2);
            assert_eq!(
                (m.segment, m.offset, m.length),
                (1, encode(&all[0]).len() as u64, encode(&big).len() as u64)
            );
            assert!(s.size_on_disk() > bodies, "{}", s.size_on_disk());
            // A retry of the same batch is the same batch; other bytes under its id are not.
            s.put_batch(&big).unwrap();
            let mut changed = big.clone();
            changed.envelope.ciphertext[2 << 20] ^= 1;
            assert!(matches!(
                s.put_batch(&changed),
                Err(StoreError::Duplicate(2))
            ));
            assert_eq!(segment_len(dir.path(), 1), bodies);
        }
        let s = SledStore::open(dir.path()).unwrap();
        let mut seen = Vec::new();
        s.scan(&mut |b| {
            seen.push(b);
            ControlFlow::Continue(())
        })
        .unwrap();
        assert_eq!(seen, all);
    }

    #[test]
    fn damaged_cut_short_and_missing_segment_files_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let s = store_from_one(dir.path());
        s.put_batches(&[sealed(1)]).unwrap();
        drop(s);
        // Batches 2 and 3 in the second segment, written by the second opening.
        let s = SledStore::open(dir.path()).unwrap();
        s.put_batches(&[sealed(2), sealed(3)]).unwrap();
        assert_eq!(segment_files(dir.path()), ["00000001.seg", "00000002.seg"]);
        let path = segments::segment_path(&dir.path().join(SEGMENTS_DIR), 2);
        let original = fs::read(&path).unwrap();
        let three = manifest_of(&s, 3);
        assert_eq!(three.segment, 2);

        // A byte of batch 3's body changed in place.
        let mut damaged = original.clone();
        damaged[three.offset as usize + 10] ^= 1;
        fs::write(&path, &damaged).unwrap();
        let text = fails_naming(s.batch(3), 3);
        assert!(
            text.ends_with("its body in segment 2 does not hash to its manifest"),
            "{text}"
        );
        fails_naming(s.check(), 3);
        assert_eq!(s.batch(2).unwrap().unwrap(), sealed(2));

        // The file cut short inside batch 3's body.
        fs::write(&path, &original[..original.len() - 1]).unwrap();
        let text = fails_naming(s.batch(3), 3);
        assert!(
            text.contains(&format!(
                "its body in segment 2 is cut short: {} ends at byte {}, before byte {}",
                path.display(),
                original.len() - 1,
                original.len()
            )),
            "{text}"
        );
        fails_naming(s.check(), 3);
        assert_eq!(s.batch(2).unwrap().unwrap(), sealed(2));

        // The file lost.
        fs::remove_file(&path).unwrap();
        let text = fails_naming(s.batch(2), 2);
        assert!(
            text.contains(&format!(
                "its body's segment 2 is missing ({})",
                path.display()
            )),
            "{text}"
        );
        fails_naming(s.check(), 2);
        assert_eq!(s.batch(1).unwrap().unwrap(), sealed(1));
        // Reading created nothing in its place.
        assert!(!path.exists());

        fs::write(&path, &original).unwrap();
        assert_eq!(s.check().unwrap(), 3);
    }

    #[test]
    fn a_failed_body_write_is_retried_over_the_same_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let s = store_from_one(dir.path());
        s.put_batches(&[sealed(1)]).unwrap();
        let end = segment_len(dir.path(), 1);
        let group = [sealed(2), sealed(3)];
        // The disk fills up halfway through batch 3's body.
        s.segments().fail_after = Some(encode(&sealed(2)).len() + 50);
        let err = s.put_batches(&group).unwrap_err();
        let path = segments::segment_path(&dir.path().join(SEGMENTS_DIR), 1);
        match &err {
            StoreError::Segment { path: p, source } => {
                assert_eq!(p, &path);
                assert_eq!(source.raw_os_error(), Some(libc::ENOSPC));
            }
            other => panic!("{other:?}"),
        }
        assert!(
            err.to_string()
                .starts_with(&format!("segment file {}: ", path.display())),
            "{err}"
        );
        assert_eq!(s.batch(2).unwrap(), None);
        assert_eq!(s.batch(3).unwrap(), None);
        assert!(segment_len(dir.path(), 1) > end, "bytes were written");
        assert_eq!(s.segments().writing(), Some((1, end)));

        // The retry writes over the same region, and ends where the bodies end.
        s.put_batches(&group).unwrap();
        assert_eq!(manifest_of(&s, 2).offset, end);
        let bodies: u64 = group.iter().map(|b| encode(b).len() as u64).sum();
        assert_eq!(segment_len(dir.path(), 1), end + bodies);
        // A refused call (a duplicate) leaves the end where it was too.
        assert!(matches!(
            s.put_batches(&[sealed(4), other(3)]),
            Err(StoreError::Duplicate(3))
        ));
        assert_eq!(s.segments().writing(), Some((1, end + bodies)));
        s.put_batches(&[sealed(4)]).unwrap();
        assert_eq!(manifest_of(&s, 4).offset, end + bodies);
        drop(s);
        let s = SledStore::open(dir.path()).unwrap();
        assert_eq!(s.check().unwrap(), 4);
        for id in 1..=4 {
            assert_eq!(s.batch(id).unwrap().unwrap(), sealed(id));
        }
    }

    #[test]
    fn each_opening_that_writes_starts_a_new_segment_and_full_ones_are_followed() {
        let dir = tempfile::tempdir().unwrap();
        let s = SledStore::open(dir.path()).unwrap();
        s.put_batches(&[sealed(0)]).unwrap();
        drop(s);
        // What a crash leaves: a tail no manifest names.
        let first = segments::segment_path(&dir.path().join(SEGMENTS_DIR), 1);
        let mut tail = fs::read(&first).unwrap();
        tail.extend_from_slice(b"unreferenced tail");
        fs::write(&first, &tail).unwrap();

        let s = SledStore::open(dir.path()).unwrap();
        // An opening that only reads starts nothing.
        assert_eq!(s.check().unwrap(), 1);
        assert_eq!(segment_files(dir.path()), ["00000001.seg"]);
        // Each file is full once it has passed 1 byte: one group per file.
        s.segments().set_rotate_at(1);
        s.put_batches(&[sealed(1), sealed(2)]).unwrap();
        s.put_batches(&[sealed(3)]).unwrap();
        s.put_batches(&[sealed(4)]).unwrap();
        assert_eq!(
            segment_files(dir.path()),
            [
                "00000001.seg",
                "00000002.seg",
                "00000003.seg",
                "00000004.seg"
            ]
        );
        assert_eq!(fs::read(&first).unwrap(), tail, "never appended to");
        let segment = |id| manifest_of(&s, id).segment;
        assert_eq!(
            (1..=4).map(segment).collect::<Vec<_>>(),
            [2, 2, 3, 4],
            "one file per group"
        );
        let files: u64 = (1..=4).map(|n| segment_len(dir.path(), n)).sum();
        assert!(s.size_on_disk() >= files);
        drop(s);
        let s = SledStore::open(dir.path()).unwrap();
        assert_eq!(s.check().unwrap(), 5);
        assert_eq!(s.batch(3).unwrap().unwrap(), sealed(3));
    }

    #[test]
    fn reading_never_creates_the_segments_directory() {
        let dir = tempfile::tempdir().unwrap();
        let segments_dir = dir.path().join(SEGMENTS_DIR);
        {
            let s = store_from_one(dir.path());
            s.reserve_seq(7).unwrap();
            // Batches as a store written before segment files existed holds them: inline.
            raw_put(&s, "batches", 1, encode(&sealed(1)));
            raw_put(&s, "headers", 1, header_json(&sealed(1).header));
        }
        let s = SledStore::open(dir.path()).unwrap();
        assert_eq!(s.batch(1).unwrap().unwrap(), sealed(1));
        assert_eq!(s.batch(2).unwrap(), None);
        assert_eq!(s.check().unwrap(), 1);
        assert_eq!(s.headers().unwrap().len(), 1);
        assert!(s.size_on_disk() > 0);
        // Nor does a call with nothing new to write: an empty group, a batch stored inline.
        s.put_batches(&[]).unwrap();
        s.put_batches(&[sealed(1)]).unwrap();
        assert!(matches!(
            s.put_batch(&other(1)),
            Err(StoreError::Duplicate(1))
        ));
        assert!(!segments_dir.exists());

        // The first new batch does, beside the old ones.
        s.put_batches(&[sealed(2)]).unwrap();
        assert_eq!(segment_files(dir.path()), ["00000001.seg"]);
        assert_eq!(s.check().unwrap(), 2);
        assert_eq!(s.batch(1).unwrap().unwrap(), sealed(1));
    }

    #[test]
    fn a_manifest_with_another_layout_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let s = store_from_one(dir.path());
        s.put_batches(&[sealed(1)]).unwrap();
        let good = manifest_of(&s, 1).encode();
        raw_put(&s, "batches", 1, good[..MANIFEST_LEN - 1].to_vec());
        let text = fails_naming(s.batch(1), 1);
        assert!(text.contains("its manifest has the wrong length"), "{text}");
        // A manifest of 4 KiB parts (version 2, written for a day before segment files and
        // never deployed) is not read.
        let mut parts = vec![2u8];
        parts.extend_from_slice(&[0; 44]);
        raw_put(&s, "batches", 1, parts);
        let text = fails_naming(s.batch(1), 1);
        assert!(text.contains("unknown version 2"), "{text}");
        raw_put(&s, "batches", 1, good.to_vec());
        assert_eq!(s.batch(1).unwrap().unwrap(), sealed(1));
    }

    #[test]
    fn a_database_that_lost_its_manifests_does_not_start_over_beside_their_bodies() {
        let dir = tempfile::tempdir().unwrap();
        SledStore::open(dir.path())
            .unwrap()
            .put_batches(&[sealed(0), sealed(1)])
            .unwrap();
        // sled's files gone (a bad restore), the segment files kept.
        for entry in std::fs::read_dir(dir.path()).unwrap() {
            let path = entry.unwrap().path();
            if path.file_name() != Some(std::ffi::OsStr::new(SEGMENTS_DIR)) {
                if path.is_dir() {
                    std::fs::remove_dir_all(&path).unwrap();
                } else {
                    std::fs::remove_file(&path).unwrap();
                }
            }
        }
        let text = SledStore::open(dir.path()).unwrap_err().to_string();
        assert!(text.contains("holds batch bodies"), "{text}");
        assert!(!dir.path().join(SLED_LOG).exists(), "no new database made");
        // An empty database in its place is refused alike.
        drop(sled::open(dir.path()).unwrap());
        let text = SledStore::open(dir.path()).unwrap_err().to_string();
        assert!(text.contains("holds batch bodies"), "{text}");
        std::fs::remove_file(dir.path().join(SLED_LOG)).unwrap();
        assert!(matches!(
            SledStore::open_existing(dir.path()),
            Err(StoreError::NoDatabase { .. })
        ));
    }

    #[test]
    fn a_lost_segment_file_never_has_its_number_reused() {
        let dir = tempfile::tempdir().unwrap();
        SledStore::open(dir.path())
            .unwrap()
            .put_batches(&[sealed(0)])
            .unwrap();
        let first = segments::segment_path(&dir.path().join(SEGMENTS_DIR), 1);
        std::fs::remove_file(&first).unwrap();
        let s = SledStore::open(dir.path()).unwrap();
        s.put_batches(&[sealed(1)]).unwrap();
        assert!(!first.exists(), "segment 1 was made again");
        let text = fails_naming(s.batch(0), 0);
        assert!(text.contains("segment 1 is missing"), "{text}");
        assert_eq!(s.batch(1).unwrap().unwrap(), sealed(1));
    }

    #[test]
    fn a_retry_with_a_damaged_header_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let s = store_from_one(dir.path());
        s.put_batches(&[sealed(1)]).unwrap();
        raw_remove(&s, "headers", 1);
        fails_naming(s.put_batches(&[sealed(1)]), 1);
    }

    /// A store in `dir`/store with `n` batches really sealed with key file `dir`/keys, written as
    /// an older version would: no key check value recorded.
    fn sealed_store(dir: &Path, n: u64) -> SledStore {
        use crate::model::batch::{BatchBuilder, Row};
        use crate::model::reading::Metric;
        let keys = NodeKeys::load_or_create(&dir.join("keys"), "iomt-edge/t").unwrap();
        let sealer = crate::seal::Sealer::new(keys.master);
        let store = SledStore::open(&dir.join("store")).unwrap();
        let mut b = BatchBuilder::new(0, 1);
        for id in 0..n {
            b.push(Row {
                ts: id as i64,
                received: 0,
                source: "d",
                subject: None,
                metric: Metric::HeartRate,
                value: Some(60.0),
                text: None,
                flags: 0,
            });
            store
                .put_batch(&sealer.seal(id, b.take()).unwrap())
                .unwrap();
        }
        store
    }

    /// Under leaf encoding 2 each batch's salt key travels inside its envelope only: no file of
    /// the store holds one in the clear, as bytes or as hex.
    #[test]
    fn no_salt_key_is_stored_in_the_clear() {
        let dir = tempfile::tempdir().unwrap();
        let store = sealed_store(dir.path(), 3);
        let sealer =
            crate::seal::Sealer::new(NodeKeys::load(&dir.path().join("keys")).unwrap().master);
        let mut salt_keys = Vec::new();
        for h in store.headers().unwrap() {
            assert_eq!(h.leaf_encoding, 2, "batch {}", h.id);
            let opened = sealer.open(&store.batch(h.id).unwrap().unwrap()).unwrap();
            salt_keys.push(opened.salt_key.expect("a salt key"));
        }
        assert_eq!(salt_keys.len(), 3);
        drop(store);
        fn files(dir: &Path, out: &mut Vec<PathBuf>) {
            for entry in fs::read_dir(dir).unwrap() {
                let path = entry.unwrap().path();
                if path.is_dir() {
                    files(&path, out);
                } else {
                    out.push(path);
                }
            }
        }
        let mut all = Vec::new();
        files(&dir.path().join("store"), &mut all);
        let mut segment_bytes = 0;
        for path in all {
            let bytes = fs::read(&path).unwrap();
            if path.extension().is_some_and(|e| e == "seg") {
                segment_bytes += bytes.len();
            }
            for key in &salt_keys {
                let hex = crate::seal::merkle::to_hex(key);
                for needle in [&key[..], &key[..8], hex.as_bytes()] {
                    assert!(
                        !bytes.windows(needle.len()).any(|w| w == needle),
                        "{} holds a salt key",
                        path.display()
                    );
                }
            }
        }
        assert!(segment_bytes > 0, "no segment file was searched");
    }

    fn other_key(dir: &Path) -> PathBuf {
        let other = dir.join("other-keys");
        NodeKeys::load_or_create(&other, "iomt-edge/t").unwrap();
        other.join(MASTER_KEY_FILE)
    }

    #[test]
    fn a_fresh_store_gets_keys_and_records_the_check_value() {
        let dir = tempfile::tempdir().unwrap();
        let store = SledStore::open(&dir.path().join("store")).unwrap();
        let keys_dir = dir.path().join("keys");
        let err = open_node_keys(&store, &keys_dir, "iomt-edge/t", KeyMode::ReadOnly).unwrap_err();
        assert!(
            matches!(err, StoreError::Keys(KeyError::Missing { .. })),
            "{err}"
        );
        assert!(!keys_dir.exists());
        assert_eq!(store.key_check_value().unwrap(), None);

        let keys =
            open_node_keys(&store, &keys_dir, "iomt-edge/t", KeyMode::CreateIfFresh).unwrap();
        assert_eq!(
            store.key_check_value().unwrap(),
            Some(keys.master.check_value())
        );
        let again = open_node_keys(&store, &keys_dir, "iomt-edge/t", KeyMode::ReadOnly).unwrap();
        assert_eq!(again.master.check_value(), keys.master.check_value());
    }

    #[test]
    fn a_store_with_batches_never_gets_a_new_key() {
        let dir = tempfile::tempdir().unwrap();
        let keys_dir = dir.path().join("keys");
        let store = sealed_store(dir.path(), 3);
        open_node_keys(&store, &keys_dir, "iomt-edge/t", KeyMode::CreateIfFresh).unwrap();
        let master = keys_dir.join(MASTER_KEY_FILE);
        let saved = fs::read(&master).unwrap();
        fs::remove_file(&master).unwrap();
        for mode in [KeyMode::CreateIfFresh, KeyMode::ReadOnly] {
            let err = open_node_keys(&store, &keys_dir, "iomt-edge/t", mode).unwrap_err();
            assert_eq!(
                err.to_string(),
                format!(
                    "{} is missing, but the store holds 3 batches sealed with it: a new key could \
                     not open them; restore it from backup",
                    master.display()
                )
            );
            assert!(!master.exists(), "{mode:?} created a key");
        }

        fs::rename(other_key(dir.path()), &master).unwrap();
        let err =
            open_node_keys(&store, &keys_dir, "iomt-edge/t", KeyMode::CreateIfFresh).unwrap_err();
        assert_eq!(
            err.to_string(),
            format!(
                "{} is not the key that sealed the 3 stored batches",
                master.display()
            )
        );

        fs::remove_file(&master).unwrap();
        fs::write(&master, saved).unwrap();
        fs::set_permissions(&master, fs::Permissions::from_mode(0o600)).unwrap();
        open_node_keys(&store, &keys_dir, "iomt-edge/t", KeyMode::ReadOnly).unwrap();
    }

    #[test]
    fn a_recorded_key_is_required_even_before_the_first_batch() {
        let dir = tempfile::tempdir().unwrap();
        let keys_dir = dir.path().join("keys");
        let store = SledStore::open(&dir.path().join("store")).unwrap();
        open_node_keys(&store, &keys_dir, "iomt-edge/t", KeyMode::CreateIfFresh).unwrap();
        let master = keys_dir.join(MASTER_KEY_FILE);
        fs::remove_file(&master).unwrap();
        let err =
            open_node_keys(&store, &keys_dir, "iomt-edge/t", KeyMode::CreateIfFresh).unwrap_err();
        assert!(
            matches!(err, StoreError::KeyMissing { batches: 0, .. }),
            "{err}"
        );
        assert!(
            err.to_string().contains("the store was started with it"),
            "{err}"
        );
        assert!(!master.exists());
    }

    #[test]
    fn an_older_store_records_the_key_that_opens_its_last_batch() {
        let dir = tempfile::tempdir().unwrap();
        let keys_dir = dir.path().join("keys");
        let store = sealed_store(dir.path(), 2);
        let master = keys_dir.join(MASTER_KEY_FILE);
        let saved = fs::read(&master).unwrap();

        fs::remove_file(&master).unwrap();
        fs::rename(other_key(dir.path()), &master).unwrap();
        let err =
            open_node_keys(&store, &keys_dir, "iomt-edge/t", KeyMode::CreateIfFresh).unwrap_err();
        assert!(
            matches!(err, StoreError::KeyDoesNotOpen { id: 1, .. }),
            "{err}"
        );
        assert!(err.to_string().contains("does not open batch 1"), "{err}");
        assert_eq!(store.key_check_value().unwrap(), None);

        fs::write(&master, saved).unwrap();
        let keys = open_node_keys(&store, &keys_dir, "iomt-edge/t", KeyMode::ReadOnly).unwrap();
        assert_eq!(
            store.key_check_value().unwrap(),
            None,
            "read-only records nothing"
        );
        open_node_keys(&store, &keys_dir, "iomt-edge/t", KeyMode::CreateIfFresh).unwrap();
        assert_eq!(
            store.key_check_value().unwrap(),
            Some(keys.master.check_value())
        );
    }

    #[test]
    fn a_recorded_check_value_is_never_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let s = SledStore::open(dir.path()).unwrap();
        s.record_key_check_value(&[1; CHECK_LEN]).unwrap();
        s.record_key_check_value(&[1; CHECK_LEN]).unwrap();
        assert!(s.record_key_check_value(&[2; CHECK_LEN]).is_err());
        assert_eq!(s.key_check_value().unwrap(), Some([1; CHECK_LEN]));
    }

    #[test]
    fn one_lock_holder_per_data_directory() {
        let dir = tempfile::tempdir().unwrap();
        let held = DataDirLock::acquire(dir.path()).unwrap();
        let pid = std::process::id();
        assert_eq!(
            fs::read_to_string(dir.path().join(LOCK_FILE)).unwrap(),
            format!("{pid}\n")
        );
        // flock locks belong to the open file, so a second open in this process is refused
        // just as another process would be.
        let err = DataDirLock::acquire(dir.path()).unwrap_err();
        assert_eq!(
            err.to_string(),
            format!(
                "another iomt-edge (pid {pid}) is using {}",
                dir.path().display()
            )
        );
        drop(held);
        DataDirLock::acquire(dir.path()).unwrap();

        let missing = dir.path().join("missing");
        let err = DataDirLock::acquire(&missing).unwrap_err();
        assert!(
            err.to_string()
                .starts_with(&format!("{}: ", missing.join(LOCK_FILE).display())),
            "{err}"
        );
    }
}
