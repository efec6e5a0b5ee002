//! The node's log of batches as the store keeps it: every node of its RFC 6962 tree that heads a
//! complete subtree, so that a root, an inclusion or a consistency proof, or a tile of the log
//! reads O(log n) stored hashes and never the headers (the ledger layer does that math).
//!
//! Tree `log`: `[level: u8][index: u64 BE]` → the 32-byte hash of the complete subtree over
//! leaves `index·2^level .. (index+1)·2^level`; level 0 holds the leaves, each batch's
//! `seal::entry::log_leaf`. `size` → u64 BE, the number of leaves. A batch's leaf and the
//! parents it completes are inserted in the transaction that stores the batch, so the log and
//! the batches never disagree; a store written before the log existed gets its log built when
//! the service opens it.

use sled::transaction::{ConflictableTransactionError, TransactionalTree};

use super::{corrupt, StoreError};
use crate::seal::merkle::{node_hash, Hash};

pub(super) const SIZE_KEY: &[u8] = b"size";

pub(super) fn node_key(level: u8, index: u64) -> [u8; 9] {
    let mut k = [0u8; 9];
    k[0] = level;
    k[1..].copy_from_slice(&index.to_be_bytes());
    k
}

pub(super) fn parse_u64(key: &str, v: &[u8]) -> Result<u64, StoreError> {
    <[u8; 8]>::try_from(v)
        .map(u64::from_be_bytes)
        .map_err(|_| corrupt(key, "not 8 bytes"))
}

pub(super) fn parse_hash(level: u8, index: u64, v: &[u8]) -> Result<Hash, StoreError> {
    Hash::try_from(v).map_err(|_| corrupt(format!("log node {level}/{index}"), "not 32 bytes"))
}

type Abort = ConflictableTransactionError<StoreError>;

fn get_hash(log: &TransactionalTree, level: u8, index: u64) -> Result<Hash, Abort> {
    match log.get(node_key(level, index))? {
        Some(v) => parse_hash(level, index, &v).map_err(Abort::Abort),
        None => Err(Abort::Abort(corrupt(
            format!("log node {level}/{index}"),
            "missing: the log of batches is damaged",
        ))),
    }
}

/// Inserts leaf `id` and every parent it completes. `id` must be the log's size (a new batch),
/// or (the retry of a call whose transaction committed but whose flush may not have) a leaf the
/// log holds already with this hash, whose nodes are then written again with the same values,
/// for the reason `put_record` writes its entries again.
pub(super) fn append(log: &TransactionalTree, id: u64, leaf: Hash) -> Result<(), Abort> {
    let size = match log.get(SIZE_KEY)? {
        Some(v) => parse_u64("log size", &v).map_err(Abort::Abort)?,
        None => 0,
    };
    if id < size {
        if get_hash(log, 0, id)? != leaf {
            return Err(Abort::Abort(corrupt(
                format!("log node 0/{id}"),
                "it is not the leaf of the batch stored under that id",
            )));
        }
    } else if id > size {
        return Err(Abort::Abort(corrupt(
            format!("batch {id}"),
            format!("the log of batches holds {size}: batch ids must follow on"),
        )));
    }
    log.insert(&node_key(0, id), &leaf[..])?;
    let (mut level, mut index, mut hash) = (0u8, id, leaf);
    while index & 1 == 1 {
        hash = node_hash(&get_hash(log, level, index - 1)?, &hash);
        level += 1;
        index >>= 1;
        log.insert(&node_key(level, index), &hash[..])?;
    }
    if id >= size {
        log.insert(SIZE_KEY, &(id + 1).to_be_bytes())?;
    }
    Ok(())
}
