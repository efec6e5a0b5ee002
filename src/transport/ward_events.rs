//! What `GET /events` sends one dashboard: `snapshot` (the whole ward) first, then every change
//! of the ward view in order (`bed`, with its id), a `heartbeat` of its own every
//! [`HEARTBEAT`] so that a quiet ward can be told from a dead link, and a fresh `snapshot`
//! whenever this reader fell so far behind that changes were lost. Ends when the service stops,
//! so that a stop never waits for an open dashboard.

use std::sync::Arc;
use std::time::Duration;

use serde_json::{json, Value};
use tokio::sync::{broadcast, watch};

use crate::model::reading::now_micros;
use crate::pipeline::ward::WardHub;
use crate::transport::raised;

/// The page calls a link stale after 12 s without a message: this leaves room for two misses.
pub const HEARTBEAT: Duration = Duration::from_secs(5);

/// One server-sent event.
#[derive(Debug, Clone, PartialEq)]
pub struct Message {
    pub event: &'static str,
    /// The ward view's event id: `bed` and `snapshot` have one.
    pub id: Option<u64>,
    pub data: String,
}

/// Sends the ward to one reader through `tx` (as `wrap` turns each message into what the
/// channel carries) until the reader goes away or `stop` turns true. `extra` is merged into
/// every snapshot (what the page needs to know besides the ward: whether writes need a token).
pub async fn feed<T>(
    ward: Arc<WardHub>,
    extra: Value,
    mut stop: watch::Receiver<bool>,
    tx: flume::Sender<T>,
    wrap: fn(Message) -> T,
) {
    // Subscribed before the snapshot, so that no change falls between the two.
    let mut changes = ward.subscribe();
    let (mut last, first) = snapshot(&ward, &extra);
    if !send(&tx, &mut stop, wrap(first)).await {
        return;
    }
    let mut beat = tokio::time::interval_at(tokio::time::Instant::now() + HEARTBEAT, HEARTBEAT);
    beat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let message = tokio::select! {
            _ = raised(&mut stop) => return,
            _ = beat.tick() => heartbeat(),
            change = changes.recv() => match change {
                // Already in the snapshot this reader has.
                Ok(e) if e.id <= last => continue,
                Ok(e) => {
                    last = e.id;
                    Message {
                        event: e.kind,
                        id: Some(e.id),
                        data: e.data.to_string(),
                    }
                }
                Err(broadcast::error::RecvError::Lagged(_)) => {
                    let (id, m) = snapshot(&ward, &extra);
                    last = id;
                    m
                }
                Err(broadcast::error::RecvError::Closed) => return,
            },
        };
        if !send(&tx, &mut stop, wrap(message)).await {
            return;
        }
    }
}

/// False once the reader is gone or the service stops: a reader that does not read holds
/// nothing up but its own feed (the changes it misses meanwhile come back as a snapshot).
async fn send<T>(tx: &flume::Sender<T>, stop: &mut watch::Receiver<bool>, m: T) -> bool {
    tokio::select! {
        sent = tx.send_async(m) => sent.is_ok(),
        _ = raised(stop) => false,
    }
}

fn snapshot(ward: &WardHub, extra: &Value) -> (u64, Message) {
    let (id, mut body) = ward.snapshot();
    if let (Some(body), Some(extra)) = (body.as_object_mut(), extra.as_object()) {
        body.extend(extra.clone());
        body.insert("now_us".into(), now_micros().into());
    }
    (
        id,
        Message {
            event: "snapshot",
            id: Some(id),
            data: body.to_string(),
        },
    )
}

/// The service's clock rides along: the page measures the age of readings against it, not
/// against the clock of the screen's computer.
fn heartbeat() -> Message {
    Message {
        event: "heartbeat",
        id: None,
        data: json!({"now_us": now_micros()}).to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::reading::Metric;
    use crate::pipeline::ward::VitalReading;

    fn reading(subject: &str, v: f64) -> VitalReading {
        VitalReading {
            subject: subject.into(),
            metric: Metric::HeartRate,
            value: Some(v),
            text: None,
            ts: 1_700_000_000_000_000,
            received: 1_700_000_000_000_000,
        }
    }

    async fn next(rx: &flume::Receiver<Message>) -> Message {
        tokio::time::timeout(HEARTBEAT * 2, rx.recv_async())
            .await
            .expect("a message")
            .expect("feed open")
    }

    #[tokio::test]
    async fn a_reader_gets_a_snapshot_then_each_change_and_heartbeats() {
        let ward = Arc::new(WardHub::new("w"));
        ward.vitals(&[reading("bed-1", 70.0)]);
        let (stop_tx, stop) = watch::channel(false);
        let (tx, rx) = flume::bounded(4);
        let task = tokio::spawn(feed(
            ward.clone(),
            json!({"write_needs_token": true}),
            stop,
            tx,
            |m| m,
        ));
        let first = next(&rx).await;
        assert_eq!((first.event, first.id), ("snapshot", Some(1)));
        let snap: Value = serde_json::from_str(&first.data).unwrap();
        assert_eq!(snap["beds"][0]["vitals"]["heart_rate"]["value"], 70.0);
        assert_eq!(snap["write_needs_token"], true);
        assert_eq!(snap["site"], "w");

        ward.vitals(&[reading("bed-2", 80.0)]);
        let bed = next(&rx).await;
        assert_eq!((bed.event, bed.id), ("bed", Some(2)));
        assert_eq!(
            serde_json::from_str::<Value>(&bed.data).unwrap()["subject"],
            "bed-2"
        );

        // Quiet ward: a heartbeat with the service's clock.
        let beat = next(&rx).await;
        assert_eq!((beat.event, beat.id), ("heartbeat", None));
        assert!(serde_json::from_str::<Value>(&beat.data).unwrap()["now_us"].is_i64());

        stop_tx.send_replace(true);
        tokio::time::timeout(Duration::from_secs(1), task)
            .await
            .expect("the feed ends at stop")
            .unwrap();
        assert!(rx.recv_async().await.is_err(), "and closes the stream");
    }

    #[tokio::test]
    async fn a_reader_that_fell_behind_gets_a_fresh_snapshot_not_a_gap() {
        let ward = Arc::new(WardHub::new("w"));
        let (_stop_tx, stop) = watch::channel(false);
        // Room for the snapshot only: the reader reads nothing while the ward changes.
        let (tx, rx) = flume::bounded(1);
        tokio::spawn(feed(ward.clone(), json!({}), stop, tx, |m| m));
        while rx.is_empty() {
            tokio::task::yield_now().await;
        }
        for i in 0..5000 {
            ward.vitals(&[reading(&format!("bed-{}", i % 20), f64::from(i % 200))]);
        }
        let (last, _) = ward.snapshot();
        assert_eq!(next(&rx).await.event, "snapshot");
        let mut seen = Vec::new();
        loop {
            let m = next(&rx).await;
            seen.push(m.event);
            if m.id == Some(last) {
                break;
            }
        }
        assert!(seen.contains(&"snapshot"), "resynchronised: {seen:?}");
        assert!(seen.len() < 100, "not every change: {}", seen.len());
    }

    #[tokio::test]
    async fn a_reader_that_went_away_ends_its_feed() {
        let ward = Arc::new(WardHub::new("w"));
        let (_stop_tx, stop) = watch::channel(false);
        let (tx, rx) = flume::bounded(1);
        let task = tokio::spawn(feed(ward.clone(), json!({}), stop, tx, |m| m));
        assert_eq!(next(&rx).await.event, "snapshot");
        drop(rx);
        ward.vitals(&[reading("bed-1", 70.0)]);
        tokio::time::timeout(Duration::from_secs(5), task)
            .await
            .expect("the feed ends")
            .unwrap();
    }
}
