//! The node's log of batches, read from the hashes the store keeps (`store/log.rs`): its root at
//! any size, inclusion and consistency proofs (RFC 6962 §2.1), and its tiles and entry bundles
//! as c2sp.org/tlog-tiles serves them.
//!
//! Every stored node heads a complete subtree, so the hash of any range the RFC's recursions
//! ask for is one stored node or, for the one range that ends at the tree's right edge, the
//! O(log n) nodes of its binary decomposition: a root or a proof reads O(log n) hashes, whatever
//! the log's size, and never a header.

use super::LedgerError;
use crate::seal::entry;
use crate::seal::merkle::{empty_root, node_hash, Hash};
use crate::store::Store;

/// Hashes in a tile, and entries in an entry bundle (c2sp.org/tlog-tiles).
pub const TILE_WIDTH: u64 = 256;
/// Tree levels a tile spans.
pub const TILE_HEIGHT: u32 = 8;

/// The log of batches of a store.
pub struct BatchLog<'a> {
    store: &'a dyn Store,
    /// Stored hashes read so far: what a root or a proof costs (`benches/log.rs`).
    reads: std::cell::Cell<u64>,
}

/// The largest power of two below `n` (n ≥ 2).
fn split(n: u64) -> u64 {
    1 << (63 - (n - 1).leading_zeros())
}

impl<'a> BatchLog<'a> {
    pub fn new(store: &'a dyn Store) -> Self {
        BatchLog {
            store,
            reads: std::cell::Cell::new(0),
        }
    }

    /// Stored hashes read by this handle so far.
    pub fn hashes_read(&self) -> u64 {
        self.reads.get()
    }

    /// Leaves in the log now.
    pub fn size(&self) -> Result<u64, LedgerError> {
        Ok(self.store.log_size()?)
    }

    fn node(&self, level: u8, index: u64) -> Result<Hash, LedgerError> {
        self.reads.set(self.reads.get() + 1);
        self.store
            .log_node(level, index)?
            .ok_or(LedgerError::MissingNode { level, index })
    }

    /// The hash of leaves `start .. start + n`.
    fn range_hash(&self, start: u64, n: u64) -> Result<Hash, LedgerError> {
        if n == 0 {
            return Ok(empty_root());
        }
        if n.is_power_of_two() && start % n == 0 {
            return self.node(n.trailing_zeros() as u8, start / n);
        }
        let k = split(n);
        Ok(node_hash(
            &self.range_hash(start, k)?,
            &self.range_hash(start + k, n - k)?,
        ))
    }

    fn check_size(&self, size: u64) -> Result<(), LedgerError> {
        let have = self.size()?;
        if size > have {
            return Err(LedgerError::Beyond { size, have });
        }
        Ok(())
    }

    /// The log's root when it held `size` leaves.
    pub fn root(&self, size: u64) -> Result<Hash, LedgerError> {
        self.check_size(size)?;
        self.range_hash(0, size)
    }

    /// The inclusion proof of leaf `index` in the tree of `size` leaves, nearest sibling first
    /// (RFC 6962 PATH).
    pub fn inclusion_proof(&self, index: u64, size: u64) -> Result<Vec<Hash>, LedgerError> {
        self.check_size(size)?;
        if index >= size {
            return Err(LedgerError::Beyond {
                size: index + 1,
                have: size,
            });
        }
        let mut out = Vec::new();
        self.path(index, 0, size, &mut out)?;
        Ok(out)
    }

    fn path(&self, m: u64, start: u64, n: u64, out: &mut Vec<Hash>) -> Result<(), LedgerError> {
        if n <= 1 {
            return Ok(());
        }
        let k = split(n);
        if m < k {
            self.path(m, start, k, out)?;
            out.push(self.range_hash(start + k, n - k)?);
        } else {
            self.path(m - k, start + k, n - k, out)?;
            out.push(self.range_hash(start, k)?);
        }
        Ok(())
    }

    /// The consistency proof between the trees of `size1` and `size2` leaves (RFC 6962 PROOF).
    pub fn consistency_proof(&self, size1: u64, size2: u64) -> Result<Vec<Hash>, LedgerError> {
        self.check_size(size2)?;
        if size1 > size2 {
            return Err(LedgerError::Beyond {
                size: size1,
                have: size2,
            });
        }
        let mut out = Vec::new();
        if size1 > 0 && size1 < size2 {
            self.subproof(size1, 0, size2, true, &mut out)?;
        }
        Ok(out)
    }

    fn subproof(
        &self,
        m: u64,
        start: u64,
        n: u64,
        whole: bool,
        out: &mut Vec<Hash>,
    ) -> Result<(), LedgerError> {
        if m == n {
            if !whole {
                out.push(self.range_hash(start, n)?);
            }
            return Ok(());
        }
        let k = split(n);
        if m <= k {
            self.subproof(m, start, k, whole, out)?;
            out.push(self.range_hash(start + k, n - k)?);
        } else {
            self.subproof(m - k, start + k, n - k, false, out)?;
            out.push(self.range_hash(start, k)?);
        }
        Ok(())
    }

    /// The first `width` hashes of tile `index` at tile level `level`: the nodes at tree level
    /// `8·level`, numbers `index·256 ..`, concatenated (c2sp.org/tlog-tiles). `None` when the log
    /// does not hold that many complete nodes there.
    pub fn tile(&self, level: u8, index: u64, width: u64) -> Result<Option<Vec<u8>>, LedgerError> {
        let tree_level = u32::from(level) * TILE_HEIGHT;
        if !(1..=TILE_WIDTH).contains(&width) || tree_level > 63 {
            return Ok(None);
        }
        let complete = self.size()? >> tree_level;
        let Some(first) = index.checked_mul(TILE_WIDTH) else {
            return Ok(None);
        };
        if first.saturating_add(width) > complete {
            return Ok(None);
        }
        let mut out = Vec::with_capacity(width as usize * 32);
        for i in first..first + width {
            out.extend_from_slice(&self.node(tree_level as u8, i)?);
        }
        Ok(Some(out))
    }

    /// The entry bundle `index` of `width` entries: each batch header's canonical bytes
    /// (seal::entry) after a big-endian u16 length (c2sp.org/tlog-tiles). `None` beyond the log.
    pub fn entries(&self, index: u64, width: u64) -> Result<Option<Vec<u8>>, LedgerError> {
        let Some(first) = index.checked_mul(TILE_WIDTH) else {
            return Ok(None);
        };
        if !(1..=TILE_WIDTH).contains(&width) || first.saturating_add(width) > self.size()? {
            return Ok(None);
        }
        let mut out = Vec::with_capacity(width as usize * (2 + entry::ENTRY_LEN));
        for id in first..first + width {
            let h = self.store.header(id)?.ok_or(LedgerError::MissingNode {
                level: 0,
                index: id,
            })?;
            let bytes = entry::encode(&h).map_err(|_| LedgerError::BadRoot(id))?;
            out.extend_from_slice(&(bytes.len() as u16).to_be_bytes());
            out.extend_from_slice(&bytes);
        }
        Ok(Some(out))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::batch::{BatchBuilder, Row};
    use crate::model::reading::Metric;
    use crate::seal::crypt::MasterKey;
    use crate::seal::merkle;
    use crate::seal::{SealedBatch, Sealer};
    use crate::store::SledStore;

    fn batches(n: u64) -> Vec<SealedBatch> {
        let sealer = Sealer::new(MasterKey::from_bytes(&[5u8; 32]).unwrap());
        (0..n)
            .map(|id| {
                let mut b = BatchBuilder::new(id, 1);
                b.push(Row {
                    ts: id as i64,
                    received: 0,
                    source: "d",
                    subject: None,
                    metric: Metric::HeartRate,
                    value: Some(60.0 + id as f64),
                    text: None,
                    flags: 0,
                });
                sealer.seal(id, b.take()).unwrap()
            })
            .collect()
    }

    /// The incremental log agrees with the in-memory RFC 6962 tree (seal::merkle, checked
    /// against the RFC's vectors) at every size, for every root, inclusion and consistency
    /// proof, whether the batches came one by one or in groups.
    #[test]
    fn the_stored_log_agrees_with_the_rfc_6962_tree_at_every_size() {
        let all = batches(70);
        let leaves: Vec<Hash> = all
            .iter()
            .map(|b| entry::log_leaf(&b.header).unwrap())
            .collect();
        let dir = tempfile::tempdir().unwrap();
        let store = SledStore::open(dir.path()).unwrap();
        let log = BatchLog::new(&store);
        assert_eq!(log.root(0).unwrap(), merkle::empty_root());
        let mut stored = 0usize;
        for group in all.chunks(3) {
            store.put_batches(group).unwrap();
            stored += group.len();
            assert_eq!(log.size().unwrap(), stored as u64);
        }
        for n in 1..=70usize {
            assert_eq!(
                log.root(n as u64).unwrap(),
                merkle::root(&leaves[..n]),
                "{n}"
            );
            for i in 0..n {
                assert_eq!(
                    log.inclusion_proof(i as u64, n as u64).unwrap(),
                    merkle::inclusion_proof(&leaves[..n], i).unwrap(),
                    "leaf {i} of {n}"
                );
            }
            for m in 1..=n {
                assert_eq!(
                    log.consistency_proof(m as u64, n as u64).unwrap(),
                    merkle::consistency_proof(&leaves[..n], m).unwrap(),
                    "{m} → {n}"
                );
            }
        }
        // Reads grow with log n, not n: a proof at 70 leaves reads at most a few per level.
        let counted = BatchLog::new(&store);
        counted.inclusion_proof(0, 70).unwrap();
        counted.consistency_proof(33, 70).unwrap();
        counted.root(70).unwrap();
        assert!(
            counted.hashes_read() <= 3 * 2 * 7,
            "{}",
            counted.hashes_read()
        );
        assert!(matches!(
            log.root(71),
            Err(LedgerError::Beyond { size: 71, have: 70 })
        ));
        assert!(log.inclusion_proof(70, 70).is_err());
    }

    #[test]
    fn tiles_and_entry_bundles_hold_what_tlog_tiles_says() {
        let all = batches(300);
        let dir = tempfile::tempdir().unwrap();
        let store = SledStore::open(dir.path()).unwrap();
        store.put_batches(&all).unwrap();
        let log = BatchLog::new(&store);
        let leaves: Vec<Hash> = all
            .iter()
            .map(|b| entry::log_leaf(&b.header).unwrap())
            .collect();
        // Level 0: the leaf hashes; a full tile 0 and a partial tile 1 of 44.
        let full = log.tile(0, 0, 256).unwrap().unwrap();
        assert_eq!(full.len(), 256 * 32);
        assert_eq!(&full[..32], &leaves[0]);
        assert_eq!(&full[255 * 32..], &leaves[255]);
        let part = log.tile(0, 1, 44).unwrap().unwrap();
        assert_eq!(&part[43 * 32..], &leaves[299]);
        assert!(log.tile(0, 1, 45).unwrap().is_none());
        assert!(log.tile(0, 1, 256).unwrap().is_none());
        // Level 1 holds the roots of complete 256-leaf subtrees: just one here.
        assert_eq!(
            log.tile(1, 0, 1).unwrap().unwrap(),
            merkle::root(&leaves[..256]).to_vec()
        );
        assert!(log.tile(1, 0, 2).unwrap().is_none());
        assert!(log.tile(0, 0, 0).unwrap().is_none());
        assert!(log.tile(0, u64::MAX, 1).unwrap().is_none());
        // Entries: u16 length, then the header's canonical bytes, which hash to the leaf.
        let bundle = log.entries(1, 44).unwrap().unwrap();
        assert_eq!(bundle.len(), 44 * (2 + entry::ENTRY_LEN));
        assert_eq!(&bundle[..2], &(entry::ENTRY_LEN as u16).to_be_bytes());
        let first = &bundle[2..2 + entry::ENTRY_LEN];
        assert_eq!(entry::decode(first).unwrap(), all[256].header);
        assert_eq!(merkle::leaf_hash(first), leaves[256]);
        assert!(log.entries(1, 45).unwrap().is_none());
    }
}
