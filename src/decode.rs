//! `iomt-edge decode`: one payload from standard input through one codec, exactly as the
//! service would decode it, printed as canonical readings. How a user checks a new device's
//! payload before wiring it into a pipeline.

use std::path::Path;

use crate::codec::encoding::{base64_to_bytes, hex_to_bytes, text_to_vec};
use crate::codec::{decode_to_readings_with_clock, CodecOptions, DecodeError, Message, Reason};
use crate::config::{CodecName, IngestConfig, PipelineConfig};
use crate::model::reading::{now_micros, Reading};
use crate::pipeline::routes::Route;
use crate::topic::{Template, TopicFilter};

/// How the payload is written on standard input.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InputEncoding {
    Raw,
    Hex,
    Base64,
}

/// What the command was asked to do.
#[derive(Debug, Clone)]
pub struct DecodeRequest<'a> {
    pub codec: CodecName,
    pub topic: Option<&'a str>,
    pub input: InputEncoding,
    /// A pipeline file and the index of its route (from 0, as in its error messages).
    pub route: Option<(&'a Path, usize)>,
}

#[derive(Debug, thiserror::Error)]
pub enum DecodeCommandError {
    /// The command line or the pipeline file is wrong: nothing was decoded.
    #[error("{0}")]
    Setup(String),
    /// The payload is invalid: exit status 2.
    #[error("invalid payload: {0}")]
    Payload(DecodeError),
}

/// Decodes `input` as the request says.
pub fn decode(req: &DecodeRequest<'_>, input: &[u8]) -> Result<Vec<Reading>, DecodeCommandError> {
    let setup = DecodeCommandError::Setup;
    let (route, ingest, filter_name) = match req.route {
        Some((path, n)) => route_of_pipeline(req, path, n)?,
        None => {
            let codec = crate::codec::build(req.codec, &CodecOptions::default())
                .map_err(|e| setup(format!("{e}: pass --pipeline FILE --route N")))?;
            let route = Route {
                filter_text: "#".to_owned(),
                filter: TopicFilter::parse("#").map_err(setup)?,
                codec,
                source: Template::parse("{topic}").map_err(setup)?,
                subject: None,
                trust_payload_ids: false,
            };
            (route, IngestConfig::default(), "the filter".to_owned())
        }
    };
    let topic = match req.topic {
        Some(t) => {
            if !route.filter.matches(t) {
                return Err(setup(format!(
                    "topic `{t}` does not match {filter_name} `{}`",
                    route.filter_text
                )));
            }
            t
        }
        // Only reached when no template reads the topic (checked with the route).
        None => "stdin",
    };
    let payload = match req.input {
        InputEncoding::Raw => input.to_vec(),
        InputEncoding::Hex => {
            text_to_vec(input, hex_to_bytes).map_err(DecodeCommandError::Payload)?
        }
        InputEncoding::Base64 => {
            text_to_vec(input, base64_to_bytes).map_err(DecodeCommandError::Payload)?
        }
    };
    let max = ingest.max_payload_bytes;
    if payload.len() > max {
        return Err(DecodeCommandError::Payload(DecodeError::new(
            Reason::Oversized,
            format!(
                "{} bytes, above ingest.max_payload_bytes = {max}",
                payload.len()
            ),
        )));
    }
    let source = route
        .source
        .render(topic)
        .unwrap_or_else(|| topic.to_owned());
    let subject = route.subject.as_ref().and_then(|t| t.render(topic));
    let msg = Message {
        topic,
        payload: &payload,
        received: now_micros(),
        source: &source,
        subject: subject.as_deref(),
    };
    decode_to_readings_with_clock(route.codec.as_ref(), &msg, ingest.clock_window())
        .map_err(DecodeCommandError::Payload)
}

/// Route `n` of the pipeline file at `path`, checked against the request, the file's `[ingest]`
/// limits, and how messages name the route's filter.
fn route_of_pipeline(
    req: &DecodeRequest<'_>,
    path: &Path,
    n: usize,
) -> Result<(Route, IngestConfig, String), DecodeCommandError> {
    let setup = DecodeCommandError::Setup;
    let file = path.display();
    let config = PipelineConfig::load(path).map_err(|e| setup(e.to_string()))?;
    let Some(route) = config.routes.get(n) else {
        return Err(setup(format!(
            "{file}: has {} routes, so --route takes 0 to {}",
            config.routes.len(),
            config.routes.len().saturating_sub(1)
        )));
    };
    if route.codec != req.codec {
        return Err(setup(format!(
            "route[{n}] of {file} uses codec `{}`, not `{}`",
            route.codec.as_str(),
            req.codec.as_str()
        )));
    }
    let built = Route::build(route).map_err(setup)?;
    if req.topic.is_none() {
        // Filling a template from the filter would print `+` as a device or patient id.
        let mut from_topic = Vec::new();
        if built.source.uses_topic() {
            from_topic.push(("source", route.source.as_str()));
        }
        if let (Some(t), Some(text)) = (&built.subject, &route.subject) {
            if t.uses_topic() {
                from_topic.push(("subject", text.as_str()));
            }
        }
        if !from_topic.is_empty() {
            let keys: Vec<&str> = from_topic.iter().map(|(k, _)| *k).collect();
            let templates: Vec<String> = from_topic.iter().map(|(_, t)| format!("`{t}`")).collect();
            return Err(setup(format!(
                "route[{n}] of {file} takes its {} from the topic ({}): pass --topic with a topic that matches `{}`",
                keys.join(" and "),
                templates.join(", "),
                built.filter_text
            )));
        }
    }
    Ok((built, config.ingest, format!("route[{n}]'s filter")))
}
