//! The format fixtures (fixtures/formats/) and their pipeline (pipelines/formats.toml).

use std::path::{Path, PathBuf};

use iomt_edge::config::{CodecName, PipelineConfig};
use iomt_edge::pipeline::routes::{Route, RouteTable};
use iomt_edge::replay::load_fixture;
use serde_json::Value;

/// Every codec has a fixture named after it.
pub fn formats() -> Vec<&'static str> {
    CodecName::ALL.iter().map(|c| c.as_str()).collect()
}

pub fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(format!("fixtures/formats/{name}.jsonl"))
}

/// What the edge should make of one message.
#[derive(Debug, Clone, PartialEq)]
pub enum Expect {
    /// (metric, value or text) in order.
    Readings(Vec<(String, Value)>),
    DeadLetter(String),
}

pub struct Line {
    pub topic: String,
    pub payload: Vec<u8>,
    pub expect: Expect,
}

pub fn lines(name: &str) -> Vec<Line> {
    let path = fixture(name);
    let messages = load_fixture(&path).unwrap();
    let text = std::fs::read_to_string(&path).unwrap();
    let raw: Vec<Value> = text
        .lines()
        .filter(|l| !l.trim().is_empty() && !l.starts_with("//"))
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(raw.len(), messages.len());
    messages
        .into_iter()
        .zip(raw)
        .map(|(m, v)| {
            let e = &v["expect"];
            let expect = match (&e["readings"], &e["dead_letter"]) {
                (Value::Array(r), Value::Null) => Expect::Readings(
                    r.iter()
                        .map(|p| (p[0].as_str().unwrap().to_owned(), p[1].clone()))
                        .collect(),
                ),
                (Value::Null, Value::String(reason)) => Expect::DeadLetter(reason.clone()),
                _ => panic!("{name}: line without expect: {v}"),
            };
            Line {
                topic: m.topic.clone(),
                payload: m.payload.to_vec(),
                expect,
            }
        })
        .collect()
}

pub fn pipeline_text() -> String {
    std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/pipelines/formats.toml"
    ))
    .unwrap()
}

/// The routes of pipelines/formats.toml.
pub fn route_table() -> RouteTable {
    let config = PipelineConfig::parse(&pipeline_text(), "formats.toml").unwrap();
    RouteTable::new(
        config
            .routes
            .iter()
            .map(|r| Route::build(r).unwrap())
            .collect(),
    )
}
