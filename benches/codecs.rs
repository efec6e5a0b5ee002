//! Readings decoded per second by each codec on one core: `cargo bench --bench codecs`.
//!
//! Each codec decodes the good payloads of its format fixture (fixtures/formats/, realistic
//! messages of a few readings each) with the options of pipelines/formats.toml, through the
//! normalising sink into a batch builder: the ingest hot path minus the broker. Throughput is
//! in readings, except `fhir/observations`, which counts FHIR Observations (a blood-pressure
//! panel is one Observation of two readings). The builder is rolled back between passes, as a
//! batch is taken when full, so no run grows memory.

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use iomt_edge::codec::{decode_payload, Codec, Message, ReadingSink};
use iomt_edge::config::{CodecName, PipelineConfig};
use iomt_edge::model::batch::BatchBuilder;
use iomt_edge::pipeline::routes::RouteTable;
use serde_json::Value;

struct Corpus {
    name: &'static str,
    codec: std::sync::Arc<dyn Codec>,
    /// (topic, payload, source, subject)
    messages: Vec<(String, Vec<u8>, String, Option<String>)>,
}

fn corpus(table: &mut RouteTable, name: &'static str) -> Corpus {
    let path = format!(
        "{}/fixtures/formats/{name}.jsonl",
        env!("CARGO_MANIFEST_DIR")
    );
    let messages = iomt_edge::replay::load_fixture(std::path::Path::new(&path)).unwrap();
    let text = std::fs::read_to_string(&path).unwrap();
    let mut out = Vec::new();
    let mut codec = None;
    for (m, line) in messages.iter().zip(text.lines()) {
        let v: Value = serde_json::from_str(line).unwrap();
        if v["expect"]["readings"].is_null() {
            continue;
        }
        let (route, resolved) = table.resolve(&m.topic).unwrap();
        codec = Some(route.codec.clone());
        out.push((
            m.topic.clone(),
            m.payload.to_vec(),
            resolved.source.to_string(),
            resolved.subject.as_deref().map(str::to_owned),
        ));
    }
    Corpus {
        name,
        codec: codec.unwrap(),
        messages: out,
    }
}

/// Decodes every message once into `b`; returns the number of readings.
fn pass(c: &Corpus, b: &mut BatchBuilder) -> usize {
    b.rollback(0);
    for (topic, payload, source, subject) in &c.messages {
        let msg = Message {
            topic,
            payload,
            received: 1_709_251_200_000_000,
            source,
            subject: subject.as_deref(),
        };
        let mut sink = ReadingSink::new(b, &msg);
        decode_payload(c.codec.as_ref(), &msg, &mut sink).unwrap();
    }
    b.len()
}

fn observations(c: &Corpus) -> usize {
    c.messages
        .iter()
        .map(|(_, p, _, _)| {
            let v: Value = serde_json::from_slice(p).unwrap();
            match v["entry"].as_array() {
                Some(e) => e
                    .iter()
                    .filter(|e| e["resource"]["resourceType"] == "Observation")
                    .count(),
                None => 1,
            }
        })
        .sum()
}

fn bench(c: &mut Criterion) {
    let text = include_str!("../pipelines/formats.toml");
    let config = PipelineConfig::parse(text, "formats.toml").unwrap();
    let mut table = RouteTable::new(
        config
            .routes
            .iter()
            .map(|r| iomt_edge::pipeline::routes::Route::build(r).unwrap())
            .collect(),
    );
    let mut g = c.benchmark_group("decode");
    // Every codec has a fixture named after it.
    for name in CodecName::ALL.map(CodecName::as_str) {
        let corpus = corpus(&mut table, name);
        let mut builder = BatchBuilder::new(0, 4096);
        let readings = pass(&corpus, &mut builder);
        let (label, per_pass) = if name == "fhir" {
            ("fhir/observations".to_owned(), observations(&corpus))
        } else {
            (format!("{}/readings", corpus.name), readings)
        };
        g.throughput(Throughput::Elements(per_pass as u64));
        g.bench_function(label, |b| b.iter(|| pass(&corpus, &mut builder)));
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
