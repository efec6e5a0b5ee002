//! Why a payload could not be decoded: the error every codec returns, and the fixed set of
//! reasons that label the decode-failure metric and the dead letters.

/// Why a payload could not be decoded: a small fixed set, so it can label a metric.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Reason {
    /// Not valid JSON/CBOR/… at all.
    Syntax,
    /// Valid syntax, but not the structure the format requires.
    Structure,
    /// The payload ends before a field its own flags announce.
    Truncated,
    MissingField,
    BadType,
    BadValue,
    BadUnit,
    BadTime,
    UnknownName,
    Version,
    /// The source itself withdrew the record (FHIR status entered-in-error or cancelled).
    Status,
    Empty,
    Oversized,
    /// The payload names a device or subject other than the one its authenticated publisher
    /// may speak for.
    Identity,
}

impl Reason {
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::Syntax => "syntax",
            Reason::Structure => "structure",
            Reason::Truncated => "truncated",
            Reason::MissingField => "missing_field",
            Reason::BadType => "bad_type",
            Reason::BadValue => "bad_value",
            Reason::BadUnit => "bad_unit",
            Reason::BadTime => "bad_time",
            Reason::UnknownName => "unknown_name",
            Reason::Version => "version",
            Reason::Status => "status",
            Reason::Empty => "empty",
            Reason::Oversized => "oversized",
            Reason::Identity => "identity",
        }
    }
}

/// A payload that cannot be decoded. `detail` names fields and positions, never values, so it
/// is safe to log and to publish on the dead-letter topic.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}: {detail}", reason.as_str())]
pub struct DecodeError {
    pub reason: Reason,
    pub detail: String,
}

impl DecodeError {
    pub fn new(reason: Reason, detail: impl Into<String>) -> Self {
        DecodeError {
            reason,
            detail: detail.into(),
        }
    }
}
