//! iomt-edge: an edge service for the Internet of Medical Things. See DESIGN.md for the data
//! flow; each module below is one stage or one seam of it.

pub mod alarm;
pub mod batch;
pub mod broker;
pub mod codec;
pub mod commit;
pub mod config;
pub mod decode;
pub mod events;
pub mod http;
pub mod ingest;
pub mod ledger;
pub mod metrics;
pub mod output;
pub mod reading;
pub mod replay;
pub mod seal;
pub mod service;
pub mod store;
pub mod units;
