//! `iomt-edge decode`: one payload from standard input through one codec, exactly as the
//! service would decode it, printed as canonical readings. How a user checks a new device's
//! payload before wiring it into a pipeline.

use std::path::Path;

use crate::codec::encoding::{base64_to_bytes, hex_to_bytes, text_to_vec};
use crate::codec::{decode_to_readings, DecodeError, Message, Reason};
use crate::config::{CodecName, PipelineConfig};
use crate::model::reading::{now_micros, Reading};
use crate::pipeline::routes::Route;

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
    let (config, index) = match req.route {
        Some((path, n)) => {
            let config = PipelineConfig::load(path).map_err(|e| setup(e.to_string()))?;
            if n >= config.routes.len() {
                return Err(setup(format!(
                    "{}: has {} routes, so --route takes 0 to {}",
                    path.display(),
                    config.routes.len(),
                    config.routes.len().saturating_sub(1)
                )));
            }
            let codec = config.routes[n].codec;
            if codec != req.codec {
                return Err(setup(format!(
                    "route[{n}] of {} uses codec `{}`, not `{}`",
                    path.display(),
                    codec.as_str(),
                    req.codec.as_str()
                )));
            }
            (config, n)
        }
        None => {
            let text = format!(
                "[[route]]\ntopic = \"#\"\ncodec = \"{}\"\n",
                req.codec.as_str()
            );
            let config = PipelineConfig::parse(&text, "--codec").map_err(|e| {
                setup(format!(
                    "{e}\n(codec `{}` needs its options: pass --pipeline FILE --route N)",
                    req.codec.as_str()
                ))
            })?;
            (config, 0)
        }
    };
    let route = Route::build(&config.routes[index]).map_err(setup)?;
    let filter = &route.filter_text;
    let topic = match req.topic {
        Some(t) => {
            if !route.filter.matches(t) {
                return Err(setup(format!(
                    "topic `{t}` does not match route[{index}]'s filter `{filter}`"
                )));
            }
            t.to_owned()
        }
        // Without a topic the route's filter stands in, wildcards and all, so the templates
        // show which level they would take.
        None if req.route.is_some() => filter.clone(),
        None => "stdin".to_owned(),
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
    let max = config.ingest.max_payload_bytes;
    if payload.len() > max {
        return Err(DecodeCommandError::Payload(DecodeError::new(
            Reason::Oversized,
            format!(
                "{} bytes, above ingest.max_payload_bytes = {max}",
                payload.len()
            ),
        )));
    }
    let source = route.source.render(&topic).unwrap_or_else(|| topic.clone());
    let subject = route.subject.as_ref().and_then(|t| t.render(&topic));
    let msg = Message {
        topic: &topic,
        payload: &payload,
        received: now_micros(),
        source: &source,
        subject: subject.as_deref(),
    };
    decode_to_readings(route.codec.as_ref(), &msg).map_err(DecodeCommandError::Payload)
}
