//! Publishers under load for the fault tests: several MQTT connections publishing QoS 1
//! messages with unique ids as fast as their window of unacknowledged messages allows, each
//! recording exactly which ids a PUBACK acknowledged. A connection that fails reconnects and
//! goes on with new ids (what it had not been acknowledged for, it simply does not count, as a
//! device that gives up on a message would not); so "acknowledged" below is precisely what the
//! broker promised.

#![allow(dead_code)]

use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

use super::raw::{ack_pkid, handshake, publish_packet, read_packet};

/// Seconds since the epoch that message id 0 carries as its device time; id n carries T0 + n.
pub const T0: i64 = 1_700_000_000;

/// The topic connection `c` publishes on, routed by `common::pipeline`'s vitals route.
pub fn topic(c: usize) -> String {
    format!("ward/7/bed/{c}/vitals")
}

/// Where the publishers send: a port that may change (a restarted broker keeps its port here,
/// but a test may point them elsewhere).
#[derive(Debug, Clone)]
pub struct Target(pub Arc<Mutex<u16>>);

impl Target {
    pub fn new(port: u16) -> Self {
        Target(Arc::new(Mutex::new(port)))
    }

    fn port(&self) -> u16 {
        *self.0.lock().unwrap()
    }
}

/// Running publishers.
pub struct Load {
    stop: Arc<AtomicBool>,
    acked: Arc<Mutex<BTreeSet<u64>>>,
    sent: Arc<AtomicU64>,
    /// PUBACKs that came before the PUBACK of a message sent earlier on the same connection
    /// (MQTT requires them in the order of the PUBLISHes).
    out_of_order: Arc<AtomicU64>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Load {
    /// Starts `connections` publishers with `window` unacknowledged messages each. With
    /// `limit`, each stops after that many acknowledged messages.
    pub fn start(target: Target, connections: usize, window: usize, limit: Option<u64>) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let acked = Arc::new(Mutex::new(BTreeSet::new()));
        let sent = Arc::new(AtomicU64::new(0));
        let out_of_order = Arc::new(AtomicU64::new(0));
        let tasks = (0..connections)
            .map(|c| {
                tokio::spawn(publisher(
                    target.clone(),
                    c,
                    window,
                    limit,
                    stop.clone(),
                    acked.clone(),
                    sent.clone(),
                    out_of_order.clone(),
                ))
            })
            .collect();
        Load {
            stop,
            acked,
            sent,
            out_of_order,
            tasks,
        }
    }

    /// Ids acknowledged so far.
    pub fn acked(&self) -> BTreeSet<u64> {
        self.acked.lock().unwrap().clone()
    }

    pub fn acked_count(&self) -> usize {
        self.acked.lock().unwrap().len()
    }

    /// Publishes written so far (acknowledged or not).
    pub fn sent(&self) -> u64 {
        self.sent.load(Ordering::Relaxed)
    }

    /// PUBACKs received out of their messages' order.
    pub fn out_of_order(&self) -> u64 {
        self.out_of_order.load(Ordering::Relaxed)
    }

    /// Waits until at least `n` ids are acknowledged, for up to `within`.
    pub async fn wait_acked(&self, n: usize, within: Duration) {
        let deadline = tokio::time::Instant::now() + within;
        while self.acked_count() < n {
            assert!(
                tokio::time::Instant::now() < deadline,
                "only {} of {n} acknowledged",
                self.acked_count()
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Stops publishing and returns every id acknowledged. Panics if any PUBACK came out of
    /// order.
    pub async fn stop(self) -> BTreeSet<u64> {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.tasks {
            let _ = tokio::time::timeout(Duration::from_secs(30), t).await;
        }
        assert_eq!(
            self.out_of_order.load(Ordering::Relaxed),
            0,
            "PUBACKs out of order"
        );
        let acked = self.acked.lock().unwrap().clone();
        acked
    }

    /// Waits for every publisher to reach its limit, then returns the ids acknowledged.
    pub async fn finish(self, within: Duration) -> BTreeSet<u64> {
        let deadline = tokio::time::Instant::now() + within;
        for t in self.tasks {
            tokio::time::timeout_at(deadline, t)
                .await
                .expect("publishers finished")
                .unwrap();
        }
        assert_eq!(
            self.out_of_order.load(Ordering::Relaxed),
            0,
            "PUBACKs out of order"
        );
        let acked = self.acked.lock().unwrap().clone();
        acked
    }
}

/// Ids are `c * 10^7 + n`: unique across connections and reconnections.
const PER_CONNECTION: u64 = 10_000_000;

#[allow(clippy::too_many_arguments)]
async fn publisher(
    target: Target,
    c: usize,
    window: usize,
    limit: Option<u64>,
    stop: Arc<AtomicBool>,
    acked: Arc<Mutex<BTreeSet<u64>>>,
    sent: Arc<AtomicU64>,
    out_of_order: Arc<AtomicU64>,
) {
    let mut next = c as u64 * PER_CONNECTION;
    let mut mine = 0u64;
    let topic = topic(c);
    let mut attempt = 0u32;
    while !stop.load(Ordering::Relaxed) && limit.is_none_or(|l| mine < l) {
        let Ok(mut s) = TcpStream::connect(("127.0.0.1", target.port())).await else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        attempt += 1;
        let id = format!("load-{c}-{attempt}");
        if tokio::time::timeout(Duration::from_secs(5), handshake(&mut s, &id, 4))
            .await
            .map_or(true, |r| r.is_err())
        {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        }
        let (mut rd, mut wr) = s.into_split();
        let inflight: Arc<Mutex<HashMap<u16, u64>>> = Arc::default();
        let room = Arc::new(tokio::sync::Semaphore::new(window));
        let reader = {
            let inflight = inflight.clone();
            let acked = acked.clone();
            let room = room.clone();
            let out_of_order = out_of_order.clone();
            tokio::spawn(async move {
                let mut body = Vec::new();
                let mut n = 0u64;
                let mut last = None;
                while let Ok(t) = read_packet(&mut rd, &mut body).await {
                    if t >> 4 == 4 {
                        if let Some(id) = inflight.lock().unwrap().remove(&ack_pkid(&body)) {
                            // Ids increase with each PUBLISH of a connection.
                            if last.is_some_and(|l| id < l) {
                                out_of_order.fetch_add(1, Ordering::Relaxed);
                            }
                            last = Some(id);
                            acked.lock().unwrap().insert(id);
                            n += 1;
                            room.add_permits(1);
                        }
                    }
                }
                n
            })
        };
        let mut pkid: u16 = 0;
        let mut packet = Vec::with_capacity(128);
        loop {
            if stop.load(Ordering::Relaxed) || limit.is_some_and(|l| mine >= l) {
                break;
            }
            let Ok(Ok(permit)) =
                tokio::time::timeout(Duration::from_millis(200), room.acquire()).await
            else {
                if reader.is_finished() {
                    break;
                }
                continue;
            };
            permit.forget();
            pkid = pkid.checked_add(1).unwrap_or(1);
            let id = next;
            next += 1;
            inflight.lock().unwrap().insert(pkid, id);
            packet.clear();
            let payload = format!(r#"{{"ts":{},"hr":{}}}"#, T0 + id as i64, 60 + id % 60);
            publish_packet(
                topic.as_bytes(),
                1,
                pkid,
                payload.as_bytes(),
                4,
                &mut packet,
            );
            if wr.write_all(&packet).await.is_err() {
                break;
            }
            sent.fetch_add(1, Ordering::Relaxed);
            mine += 1;
        }
        // Wait for the acknowledgements still due (or the connection to close).
        let wait = tokio::time::Instant::now() + Duration::from_secs(10);
        while !inflight.lock().unwrap().is_empty()
            && !reader.is_finished()
            && tokio::time::Instant::now() < wait
        {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let _ = wr.write_all(&[0xE0, 0]).await; // DISCONNECT
        let _ = wr.shutdown().await;
        reader.abort();
        // Messages of this connection that were never acknowledged are not counted: a limit
        // counts acknowledged messages only.
        mine = acked
            .lock()
            .unwrap()
            .range(c as u64 * PER_CONNECTION..(c as u64 + 1) * PER_CONNECTION)
            .count() as u64;
    }
}

/// The message ids a stored reading carries (its device time minus T0), with how often each
/// appears.
pub fn stored_ids(readings: &[iomt_edge::model::reading::Reading]) -> HashMap<u64, usize> {
    let mut ids = HashMap::new();
    for r in readings {
        *ids.entry((r.ts / 1_000_000 - T0) as u64).or_default() += 1;
    }
    ids
}

/// Asserts that every acknowledged id is stored, naming the first missing ones.
pub fn assert_all_stored(acked: &BTreeSet<u64>, stored: &HashMap<u64, usize>) {
    let missing: Vec<u64> = acked
        .iter()
        .filter(|id| !stored.contains_key(id))
        .copied()
        .collect();
    assert!(
        missing.is_empty(),
        "{} of {} acknowledged messages are not stored; first: {:?}",
        missing.len(),
        acked.len(),
        &missing[..missing.len().min(10)]
    );
}
