//! iomt-edge: an edge service for the Internet of Medical Things (docs/architecture.md).
//!
//! The modules form layers that only point down (`tests/layers.rs` checks it):
//!
//! 1. [`model`]: readings, catalogue, units, decode errors, metrics, internal events;
//! 2. [`topic`], then [`codec`], [`alarm`], [`seal`]: each owns its options and its logic;
//! 3. [`store`], then [`ledger`]: sealed batches on disk, and the log of them;
//! 4. [`config`]: reads a pipeline file and compiles it from the options of the layers above;
//! 5. [`pipeline`]: the stages and their seams (input, acker, publisher, ack token);
//! 6. [`transport`]: the embedded broker, the external broker's client, HTTP;
//! 7. the commands ([`decode`], [`replay`], [`verify`]) and [`service`], which wires a running
//!    node.

pub mod alarm;
pub mod codec;
pub mod config;
pub mod decode;
pub mod ledger;
pub mod model;
pub mod pipeline;
pub mod replay;
pub mod seal;
pub mod service;
pub mod store;
pub mod topic;
pub mod transport;
pub mod verify;
