//! The Prometheus metrics of the service, registered once in their own registry.

use std::sync::{Arc, Mutex};

use prometheus::{
    Encoder, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry, TextEncoder,
};

type DepthProbe = Box<dyn Fn() -> i64 + Send + Sync>;

/// Every metric the service exports. Cheap to share behind an `Arc`; the hot path resolves its
/// labelled children once and keeps them.
pub struct Metrics {
    registry: Registry,
    pub messages_received: IntCounterVec,
    pub messages_unrouted: IntCounter,
    pub payloads_oversized: IntCounter,
    pub decode_failures: IntCounterVec,
    pub dead_letters: IntCounter,
    pub readings_decoded: IntCounter,
    pub readings_stored: IntCounter,
    pub batches_sealed: IntCounter,
    pub bytes_stored: IntCounter,
    pub store_size_bytes: IntGauge,
    pub store_errors: IntCounter,
    pub alarms_raised: IntCounterVec,
    pub alarms_cleared: IntCounter,
    pub alarms_active: IntGauge,
    pub alarm_transitions: IntCounterVec,
    pub alarm_acks_refused: IntCounter,
    pub http_unauthorized: IntCounter,
    pub adaptive_commands: IntCounterVec,
    pub stored_latency: Histogram,
    pub queue_depth: IntGaugeVec,
    pub queue_bytes: IntGaugeVec,
    pub topics_refused: IntCounterVec,
    pub connections: IntGauge,
    pub connections_refused: IntCounterVec,
    pub publishes_refused: IntCounterVec,
    pub publishes_delayed: IntCounterVec,
    pub acks_sent: IntCounter,
    pub next_seq: IntGauge,
    pub healthy: IntGauge,
    pub disk_free_bytes: IntGauge,
    pub intake_open: IntGauge,
    pub alarm_subjects_untracked: IntCounter,
    pub checkpoints_cut: IntCounter,
    pub anchors: IntCounterVec,
    pub outbox_depth: IntGauge,
    pub outbox_oldest_seconds: IntGauge,
    depth_probes: Mutex<Vec<(String, bool, DepthProbe)>>,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Metrics")
    }
}

impl Metrics {
    pub fn new() -> Arc<Self> {
        let registry = Registry::new();
        fn reg<C: prometheus::core::Collector + Clone + 'static>(r: &Registry, c: C) -> C {
            r.register(Box::new(c.clone()))
                .expect("metric names are unique");
            c
        }
        let counter = |name: &str, help: &str| reg(&registry, IntCounter::new(name, help).unwrap());
        let counter_vec = |name: &str, help: &str, labels: &[&str]| {
            reg(
                &registry,
                IntCounterVec::new(Opts::new(name, help), labels).unwrap(),
            )
        };
        let gauge = |name: &str, help: &str| reg(&registry, IntGauge::new(name, help).unwrap());
        let m = Arc::new(Metrics {
            messages_received: counter_vec(
                "iomt_messages_received_total",
                "MQTT messages received, by route (topic filter)",
                &["route"],
            ),
            messages_unrouted: counter(
                "iomt_messages_unrouted_total",
                "MQTT messages on a topic no route matches",
            ),
            payloads_oversized: counter(
                "iomt_payloads_oversized_total",
                "payloads refused before decoding because they exceed ingest.max_payload_bytes",
            ),
            decode_failures: counter_vec(
                "iomt_decode_failures_total",
                "payloads that could not be decoded, by codec and reason",
                &["codec", "reason"],
            ),
            dead_letters: counter("iomt_dead_letters_total", "messages published on edge/deadletter/…"),
            readings_decoded: counter("iomt_readings_decoded_total", "readings decoded into an open batch"),
            readings_stored: counter("iomt_readings_stored_total", "readings in batches committed to the store"),
            batches_sealed: counter("iomt_batches_sealed_total", "batches sealed and committed to the store"),
            bytes_stored: counter("iomt_bytes_stored_total", "encrypted batch bytes committed to the store"),
            store_size_bytes: gauge("iomt_store_size_bytes", "size of the store on disk"),
            store_errors: counter("iomt_store_errors_total", "batches that failed to seal or store"),
            alarms_raised: counter_vec("iomt_alarms_raised_total", "alarms raised, by priority", &["priority"]),
            alarms_cleared: counter("iomt_alarms_cleared_total", "alarms cleared"),
            alarms_active: gauge("iomt_alarms_active", "alarms not cleared now"),
            alarm_transitions: counter_vec(
                "iomt_alarm_transitions_total",
                "alarm transitions, by what happened (raised, acknowledged, silenced, escalated, cleared, ...)",
                &["what"],
            ),
            alarm_acks_refused: counter(
                "iomt_alarm_acks_refused_total",
                "acknowledgements over MQTT refused (no such alarm, a bad body)",
            ),
            http_unauthorized: counter(
                "iomt_http_unauthorized_total",
                "HTTP requests refused for want of the bearer token (or the dashboard's session)",
            ),
            adaptive_commands: counter_vec(
                "iomt_adaptive_commands_total",
                "adaptive-monitoring commands published, by raise or relax",
                &["command"],
            ),
            stored_latency: reg(
                &registry,
                Histogram::with_opts(
                    HistogramOpts::new(
                        "iomt_receive_to_stored_seconds",
                        "time from receiving a reading to its batch being committed",
                    )
                    .buckets(vec![
                        0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
                    ]),
                )
                .unwrap(),
            ),
            connections_refused: counter_vec(
                "iomt_connections_refused_total",
                "broker connections refused, by reason (limit, tls, credentials, certificate, anonymous, busy: the password check took longer than a CONNECT may, origin: a websocket from a web page not allowed)",
                &["reason"],
            ),
            publishes_refused: counter_vec(
                "iomt_publishes_refused_total",
                "publishes refused, by reason (impostor: as another device or subject; not_operator: an ack or setting from a device)",
                &["reason"],
            ),
            publishes_delayed: counter_vec(
                "iomt_publishes_delayed_total",
                "times a connection was not read for a while because it went past a limit, by limit (rate, inflight)",
                &["limit"],
            ),
            queue_depth: reg(
                &registry,
                IntGaugeVec::new(
                    Opts::new("iomt_queue_depth", "items waiting between two stages, by stage"),
                    &["stage"],
                )
                .unwrap(),
            ),
            queue_bytes: reg(
                &registry,
                IntGaugeVec::new(
                    Opts::new(
                        "iomt_queue_bytes",
                        "bytes waiting in front of a stage, by stage (each queue is bounded in bytes)",
                    ),
                    &["stage"],
                )
                .unwrap(),
            ),
            topics_refused: counter_vec(
                "iomt_topics_refused_total",
                "publishes, wills and subscriptions refused for their topic, by reason (an invalid name, reserved: the service's own topics, will, subscribe_not_authorized)",
                &["reason"],
            ),
            connections: gauge("iomt_connections", "MQTT clients connected to the embedded broker"),
            acks_sent: counter(
                "iomt_acks_sent_total",
                "QoS 1/2 messages acknowledged to their sender after their readings were stored",
            ),
            next_seq: gauge("iomt_next_seq", "the seq the next reading will get"),
            healthy: gauge("iomt_healthy", "1 while /healthz answers ok"),
            disk_free_bytes: gauge(
                "iomt_disk_free_bytes",
                "bytes free on the data directory's filesystem",
            ),
            intake_open: gauge(
                "iomt_intake_open",
                "1 while messages are taken in; 0 while they could not be stored (store failing, disk nearly full) or the service is not running",
            ),
            alarm_subjects_untracked: counter(
                "iomt_alarm_subjects_untracked_total",
                "readings of subjects a rule could not track because it already tracks its maximum",
            ),
            checkpoints_cut: counter(
                "iomt_checkpoints_cut_total",
                "signed checkpoints of the log of batches cut and stored",
            ),
            anchors: counter_vec(
                "iomt_anchors_total",
                "checkpoint anchors, by ledger backend and result (done: confirmed on the ledger; failed: an attempt that failed and will be retried)",
                &["backend", "result"],
            ),
            outbox_depth: gauge(
                "iomt_anchor_outbox_depth",
                "checkpoints waiting in the outbox for their ledger",
            ),
            outbox_oldest_seconds: gauge(
                "iomt_anchor_outbox_oldest_seconds",
                "age of the oldest checkpoint waiting in the outbox (0 when none waits)",
            ),
            depth_probes: Mutex::new(Vec::new()),
            registry,
        });
        // The refusal counters' series exist from the start, at 0: an alert on their rise
        // (deploy/prometheus/alerts.yml) then sees the first refusal as one, where a series
        // that first appears at 1 shows no increase at all.
        let connection_reasons = [
            "limit",
            "tls",
            "credentials",
            "certificate",
            "anonymous",
            "busy",
            "origin",
        ];
        let topic_reasons = [
            "empty",
            "not_utf8",
            "wildcard",
            "nul",
            "reserved",
            "will",
            "subscribe_not_authorized",
        ];
        for (vec, labels) in [
            (&m.connections_refused, &connection_reasons[..]),
            (&m.publishes_refused, &["impostor", "not_operator"]),
            (&m.publishes_delayed, &["rate", "inflight"]),
            (&m.topics_refused, &topic_reasons),
        ] {
            for label in labels {
                vec.with_label_values(&[*label]);
            }
        }
        m
    }

    /// Registers a stage queue whose depth is read at each scrape.
    pub fn probe_queue(&self, stage: &str, probe: impl Fn() -> i64 + Send + Sync + 'static) {
        self.depth_probes.lock().expect("probe lock").push((
            stage.to_owned(),
            false,
            Box::new(probe),
        ));
    }

    /// Registers a stage queue whose size in bytes is read at each scrape.
    pub fn probe_queue_bytes(&self, stage: &str, probe: impl Fn() -> i64 + Send + Sync + 'static) {
        self.depth_probes.lock().expect("probe lock").push((
            stage.to_owned(),
            true,
            Box::new(probe),
        ));
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        for (stage, bytes, probe) in self.depth_probes.lock().expect("probe lock").iter() {
            let gauge = if *bytes {
                &self.queue_bytes
            } else {
                &self.queue_depth
            };
            gauge.with_label_values(&[stage.as_str()]).set(probe());
        }
        let mut out = Vec::new();
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut out)
            .expect("text encoding");
        String::from_utf8(out).expect("prometheus text is UTF-8")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refusal_series_are_exported_at_zero_before_the_first_refusal() {
        let text = Metrics::new().render();
        // (src/topic.rs checks these are the names its errors give.)
        for reason in [
            "empty",
            "not_utf8",
            "wildcard",
            "nul",
            "reserved",
            "will",
            "subscribe_not_authorized",
        ] {
            let line = format!("iomt_topics_refused_total{{reason=\"{reason}\"}} 0");
            assert!(text.lines().any(|l| l == line), "{line}");
        }
        for line in [
            "iomt_connections_refused_total{reason=\"origin\"} 0",
            "iomt_publishes_refused_total{reason=\"impostor\"} 0",
            "iomt_publishes_delayed_total{limit=\"rate\"} 0",
        ] {
            assert!(text.lines().any(|l| l == line), "{line}");
        }
    }
}
