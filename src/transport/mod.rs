//! Transports: the embedded MQTT broker, the external broker's client and the HTTP endpoint.
//! Each implements the pipeline's seams ([`crate::pipeline`]) over a real protocol.

pub mod broker;
pub mod external;
pub mod http;
