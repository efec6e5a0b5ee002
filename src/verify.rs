//! `iomt-edge verify`: checks a data directory from its bytes up. Every batch is decrypted and
//! re-hashed to its root; the log of batches is rebuilt from the sealed headers and compared
//! with the one stored; every checkpoint's signature, its root at its size, and its consistency
//! with the one before; the local hash chain link by link, each entry against the checkpoint it
//! anchors; and that no checkpoint was lost between the store and the ledger. Each failure names
//! the batch, checkpoint or chain entry and why; the checks go on after a failure, so one
//! report lists them all.

use std::collections::BTreeMap;
use std::ops::ControlFlow;
use std::path::Path;

use crate::ledger::db::LedgerDb;
use crate::ledger::local::LocalChain;
use crate::ledger::log::BatchLog;
use crate::ledger::outbox::Outbox;
use crate::ledger::Receipt;
use crate::seal::checkpoint::{Checkpoint, NoteVerifier};
use crate::seal::entry;
use crate::seal::merkle::{self, Frontier, Hash};
use crate::seal::Sealer;
use crate::store::{open_node_keys, KeyMode, SledStore, Store, StoreError};

#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    /// The data directory cannot be checked at all (no store, no key).
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("{0}")]
    Setup(String),
}

/// What `verify` found.
#[derive(Debug, Default)]
pub struct Report {
    pub batches: u64,
    pub readings: u64,
    pub checkpoints: u64,
    pub chain_entries: u64,
    pub anchors_pending: u64,
    /// Checkpoints anchored on an Ethereum chain, with their notes and receipts: checked on
    /// the chain by [`check_on_chain`].
    pub on_chain: Vec<(String, Receipt)>,
    /// Of those, how many were found on the chain.
    pub on_chain_found: u64,
    /// Each failed check: what (batch 7, checkpoint 12, chain entry 3) and why.
    pub failures: Vec<String>,
}

impl Report {
    pub fn ok(&self) -> bool {
        self.failures.is_empty()
    }

    fn fail(&mut self, what: String) {
        self.failures.push(what);
    }
}

/// Progress callbacks: the command line draws a bar on a terminal.
pub trait Progress {
    fn start(&mut self, what: &str, total: u64);
    fn advance(&mut self, n: u64);
    fn finish(&mut self);
}

/// Checks the data directory `data`. `Err` only when it cannot be checked at all.
pub fn verify(data: &Path, progress: &mut dyn Progress) -> Result<Report, VerifyError> {
    let store = SledStore::open_existing(&data.join("store"))?;
    // The name is only used to create keys, which this never does.
    let keys = open_node_keys(&store, &data.join("keys"), "", KeyMode::ReadOnly)?;
    let verifier = NoteVerifier::parse(&keys.signer.verifier_key())
        .map_err(|e| VerifyError::Setup(format!("the node key: {e}")))?;
    let origin = keys.signer.name().to_owned();
    let sealer = Sealer::new(keys.master);
    let mut report = Report::default();

    // Batches, in id order, and the log rebuilt from their sealed headers.
    let log_size = store.log_size()?;
    let last_id = store.last_header()?.map_or(0, |h| h.id + 1);
    let latest_checkpoint = store.latest_checkpoint()?.map_or(0, |(s, _)| s);
    let n = log_size.max(last_id).max(latest_checkpoint);
    let mut frontier = Frontier::default();
    // The rebuilt root at each size a checkpoint names.
    let mut checkpoints = Vec::new();
    store.checkpoints(&mut |size, note| {
        checkpoints.push((size, note));
        ControlFlow::Continue(())
    })?;
    let mut sizes: BTreeMap<u64, Option<Hash>> =
        checkpoints.iter().map(|(size, _)| (*size, None)).collect();
    progress.start("batches", n);
    let mut log_intact = true;
    let mut interior: Vec<(u8, u64, Hash)> = Vec::new();
    let mut bad_nodes = 0u64;
    for id in 0..n {
        progress.advance(1);
        let leaf = match store.batch(id) {
            Ok(Some(sealed)) => match sealer.open(&sealed) {
                Ok(batch) => {
                    report.batches += 1;
                    report.readings += batch.batch.num_rows() as u64;
                    entry::log_leaf(&sealed.header).ok()
                }
                Err(e) => {
                    report.fail(format!("batch {id}: does not open: {e}"));
                    None
                }
            },
            Ok(None) => {
                report.fail(format!(
                    "batch {id}: missing (the log, a later batch or a checkpoint counts it)"
                ));
                None
            }
            Err(e) => {
                report.fail(format!("batch {id}: {e}"));
                None
            }
        };
        // A batch that failed still takes its place in the log, as the stored leaf, so that
        // one damaged batch does not make every later checkpoint fail too.
        let stored = store.log_node(0, id).ok().flatten();
        match (leaf, stored) {
            (Some(l), Some(s)) if l != s => {
                report.fail(format!(
                    "batch {id}: its leaf in the stored log is not the hash of its sealed header"
                ));
                log_intact = false;
            }
            (Some(_), None) if id < log_size => {
                report.fail(format!("batch {id}: the stored log lacks its leaf"));
                log_intact = false;
            }
            _ => {}
        }
        match leaf.or(stored) {
            Some(l) if frontier.size() == id => {
                frontier.push(l);
                // Each complete subtree this leaf closes must be the node the store serves
                // (roots, proofs and tiles are read from those nodes).
                let mut node = (0u8, id, l);
                while let Some(&(level, index, left)) = interior.last() {
                    if level != node.0 {
                        break;
                    }
                    interior.pop();
                    let parent = (level + 1, index >> 1, merkle::node_hash(&left, &node.2));
                    if store.log_node(parent.0, parent.1).ok().flatten() != Some(parent.2) {
                        bad_nodes += 1;
                        if bad_nodes <= 3 {
                            report.fail(format!(
                                "the stored log's node {}/{} is not the hash of its leaves",
                                parent.0, parent.1
                            ));
                        }
                        log_intact = false;
                    }
                    node = parent;
                }
                interior.push(node);
            }
            Some(_) => {}
            None => {
                // Nothing to put in its place: later roots cannot be rebuilt.
                log_intact = false;
            }
        }
        if let Some(root) = sizes.get_mut(&(id + 1)) {
            *root = (frontier.size() == id + 1).then(|| frontier.root());
        }
    }
    progress.finish();
    if bad_nodes > 3 {
        report.fail(format!("{bad_nodes} stored log nodes in all are damaged"));
    }
    if log_size != n && n > 0 {
        report.fail(format!(
            "the log of batches holds {log_size} leaves, the store {n} batches"
        ));
    }

    // Checkpoints: signed by the node, each root the rebuilt log's at its size, each
    // consistent with the one before through the stored log.
    progress.start("checkpoints", checkpoints.len() as u64);
    let log = BatchLog::new(&store);
    let mut previous: Option<Checkpoint> = None;
    for (size, note) in &checkpoints {
        progress.advance(1);
        report.checkpoints += 1;
        let what = format!("checkpoint of tree size {size}");
        let c = match verifier
            .verify(note)
            .map_err(|e| e.to_string())
            .and_then(|text| Checkpoint::parse(text).map_err(|e| e.to_string()))
        {
            Ok(c) => c,
            Err(e) => {
                report.fail(format!("{what}: its signature does not verify: {e}"));
                continue;
            }
        };
        if c.size != *size || c.origin != origin {
            report.fail(format!(
                "{what}: it is stored under the wrong size or names another origin ({})",
                c.origin
            ));
            continue;
        }
        match sizes.get(size).copied().flatten() {
            Some(root) if root == c.root => {}
            Some(_) => report.fail(format!(
                "{what}: the batches stored do not hash to its root (a batch was changed, \
                 removed, reordered or rolled back)"
            )),
            None if *size > n => report.fail(format!(
                "{what}: the store holds only {n} batches (it was cut short or rolled back)"
            )),
            None => report.fail(format!(
                "{what}: its root cannot be rebuilt: a batch before it is missing"
            )),
        }
        if let Some(p) = &previous {
            let consistent = log_intact
                && log
                    .consistency_proof(p.size, c.size)
                    .ok()
                    .is_some_and(|proof| {
                        merkle::verify_consistency(p.size, c.size, &p.root, &c.root, &proof).is_ok()
                    });
            if !consistent {
                report.fail(format!(
                    "{what}: not consistent with the checkpoint of tree size {} before it",
                    p.size
                ));
            }
        }
        previous = Some(c);
    }
    progress.finish();

    // The local chain and the outbox: every checkpoint anchored or waiting, none anchored that
    // the store does not hold.
    match LedgerDb::open_existing(&data.join("ledger")) {
        Err(e) => report.fail(format!("the ledger database: {e}")),
        Ok(None) if !checkpoints.is_empty() => {
            report.fail("the ledger database (ledger/) is missing".into())
        }
        Ok(None) => {}
        Ok(Some(db)) => {
            let db = std::sync::Arc::new(db);
            let outbox = Outbox::new(db.clone());
            check_ledger(&db, &outbox, &checkpoints, &verifier, &mut report);
        }
    }
    Ok(report)
}

fn check_ledger(
    db: &LedgerDb,
    outbox: &Outbox,
    checkpoints: &[(u64, String)],
    verifier: &NoteVerifier,
    report: &mut Report,
) {
    let stored: BTreeMap<u64, &String> = checkpoints.iter().map(|(s, n)| (*s, n)).collect();
    let mut chained = BTreeMap::new();
    let mut failures = Vec::new();
    let walked = {
        LocalChain::walk(db, &mut |e, hash| {
            match verifier.verify(&e.note).map(Checkpoint::parse) {
                Ok(Ok(c)) if c.size == e.size && c.root == e.root => {}
                Ok(Ok(_)) => failures.push(format!(
                    "chain entry {}: its tree size or root is not its checkpoint's",
                    e.index
                )),
                _ => failures.push(format!(
                    "chain entry {}: its checkpoint's signature does not verify",
                    e.index
                )),
            }
            match stored.get(&e.size) {
                Some(note) if **note == e.note => {}
                Some(_) => failures.push(format!(
                    "chain entry {}: anchors another checkpoint of tree size {} than the store holds",
                    e.index, e.size
                )),
                None => failures.push(format!(
                    "chain entry {}: anchors a checkpoint of tree size {} the store does not hold \
                     (the store was rolled back or lost it)",
                    e.index, e.size
                )),
            }
            chained.insert(e.size, (e.index, *hash));
            Ok(())
        })
    };
    match walked {
        Ok(n) => report.chain_entries = n,
        Err(e) => failures.push(e),
    }
    report.failures.extend(failures);
    match outbox.known() {
        Ok(known) => {
            for (size, note) in known {
                match stored.get(&size) {
                    Some(n) if **n == note => {}
                    Some(_) => report.fail(format!(
                        "checkpoint of tree size {size}: the ledger database anchored or queued \
                         another one (the store was replaced)"
                    )),
                    None => report.fail(format!(
                        "checkpoint of tree size {size}: anchored or queued by the ledger \
                         database, but the store does not hold it (the store was rolled back or \
                         lost it)"
                    )),
                }
            }
        }
        Err(e) => report.fail(format!("the outbox: {e}")),
    }
    for (size, _) in checkpoints {
        let receipt = outbox.receipt(*size);
        let pending = outbox.is_pending(*size).unwrap_or(false);
        match receipt {
            Ok(Some(Receipt::Local {
                index, entry_hash, ..
            })) => {
                let linked = chained
                    .get(size)
                    .is_some_and(|(i, h)| *i == index && merkle::to_hex(h) == entry_hash);
                if !linked {
                    report.fail(format!(
                        "checkpoint of tree size {size}: its receipt names chain entry {index} \
                         with another hash, or an entry that does not anchor it"
                    ));
                }
            }
            Ok(Some(r @ Receipt::Ethereum { .. })) => {
                report.on_chain.push((stored[size].clone(), r));
            }
            Ok(None) if pending => report.anchors_pending += 1,
            Ok(None) => report.fail(format!(
                "checkpoint of tree size {size}: neither anchored nor waiting in the outbox"
            )),
            Err(e) => report.fail(format!("checkpoint of tree size {size}: {e}")),
        }
    }
}

/// Looks for every Ethereum anchor of the report on the chain at `rpc`, through the contract
/// its receipt names, and fails each that is not there as its receipt says (dropped by a
/// reorg, another chain, another contract).
pub async fn check_on_chain(report: &mut Report, rpc: &str) {
    use crate::ledger::ethereum::find_as_receipt_says;
    use crate::ledger::Anchor;
    let anchors = std::mem::take(&mut report.on_chain);
    for (note, receipt) in &anchors {
        let Receipt::Ethereum {
            tx_hash,
            block_hash,
            ..
        } = receipt
        else {
            continue;
        };
        let checkpoint = match Checkpoint::parse(note) {
            Ok(c) => c,
            Err(e) => {
                report.fail(format!("an anchored checkpoint: {e}"));
                continue;
            }
        };
        let what = format!("anchor of the checkpoint of tree size {}", checkpoint.size);
        let anchor = Anchor {
            checkpoint,
            note: note.clone(),
        };
        match find_as_receipt_says(rpc, receipt, &anchor).await {
            Ok(Some(Receipt::Ethereum {
                tx_hash: t,
                block_hash: b,
                ..
            })) if &t == tx_hash && &b == block_hash => report.on_chain_found += 1,
            Ok(Some(_)) => {
                report.on_chain_found += 1;
                // Anchored again in another transaction (a reorg re-included it): still there.
            }
            Ok(None) => report.fail(format!(
                "{what}: not on the chain as its receipt says (transaction {tx_hash})"
            )),
            Err(e) => report.fail(format!("{what}: {e}")),
        }
    }
    report.on_chain = anchors;
}
