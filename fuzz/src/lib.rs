//! What every fuzz target does: decode arbitrary bytes with the codec of one route of
//! pipelines/formats.toml, and check what a decoded reading may never be: a non-finite number,
//! a unit other than its metric's canonical one, a text where a number belongs.

use std::sync::OnceLock;

use iomt_edge::codec::{decode_to_readings, Message};
use iomt_edge::config::PipelineConfig;
use iomt_edge::pipeline::routes::Route;
use iomt_edge::model::reading::ValueKind;

fn routes() -> &'static [Route] {
    static ROUTES: OnceLock<Vec<Route>> = OnceLock::new();
    ROUTES.get_or_init(|| {
        let text = include_str!("../../pipelines/formats.toml");
        let config = PipelineConfig::parse(text, "formats.toml").expect("formats.toml");
        config
            .routes
            .iter()
            .map(|r| Route::build(r).expect("route"))
            .collect()
    })
}

/// Decodes `data` as a message on `topic`; panics on a broken invariant.
pub fn decode(topic: &str, data: &[u8]) {
    let route = routes()
        .iter()
        .find(|r| r.filter.matches(topic))
        .expect("a route for the target's topic");
    let msg = Message {
        topic,
        payload: data,
        received: 1_700_000_000_000_000,
        source: "fuzz",
        subject: None,
    };
    if let Ok(readings) = decode_to_readings(route.codec.as_ref(), &msg) {
        assert!(!readings.is_empty(), "Ok with no readings");
        for r in readings {
            assert_eq!(r.unit, r.metric.unit(), "{r:?}");
            match r.metric.info().kind {
                ValueKind::Numeric => {
                    assert!(r.text.is_none(), "{r:?}");
                    assert!(r.value.is_none_or(f64::is_finite), "{r:?}");
                }
                ValueKind::Text => assert!(r.value.is_none() && r.text.is_some(), "{r:?}"),
            }
        }
    }
}
