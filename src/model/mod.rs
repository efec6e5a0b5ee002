//! The model: what a reading is (catalogue, units, flags, the Arrow schema and batches), why a
//! payload can be refused, the service's metrics and its internal events. It depends on nothing
//! else of this crate; every other layer builds on it.

pub mod batch;
pub mod decode_error;
pub mod events;
pub mod metrics;
pub mod reading;
pub mod units;
