//! Bounds the retained messages clients leave in rumqttd's router, which keeps one per topic
//! for ever: past the bound, a retained publish is still delivered to its subscribers, just not
//! kept for later ones (and counted). Alarms, which this service retains itself, do not pass
//! here.

use std::collections::HashMap;
use std::sync::Mutex;

/// Retained topics kept at most …
pub const MAX_RETAINED: usize = 10_000;
/// … and bytes of retained payloads.
pub const MAX_RETAINED_BYTES: usize = 16 << 20;

#[derive(Debug, Default)]
struct Inner {
    sizes: HashMap<Vec<u8>, usize>,
    bytes: usize,
}

#[derive(Debug, Default)]
pub struct Retained {
    inner: Mutex<Inner>,
}

impl Retained {
    /// Whether a retained publish of `len` payload bytes on `topic` may be kept. An empty
    /// payload clears the topic and is always admitted.
    pub fn admit(&self, topic: &[u8], len: usize) -> bool {
        let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let old = inner.sizes.get(topic).copied();
        if len == 0 {
            if let Some(old) = old {
                inner.sizes.remove(topic);
                inner.bytes -= old + topic.len();
            }
            return true;
        }
        let bytes = inner.bytes - old.map_or(0, |o| o + topic.len()) + len + topic.len();
        let count = inner.sizes.len() + usize::from(old.is_none());
        if count > MAX_RETAINED || bytes > MAX_RETAINED_BYTES {
            return false;
        }
        inner.sizes.insert(topic.to_vec(), len);
        inner.bytes = bytes;
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retained_messages_are_bounded_and_clearing_frees_room() {
        let r = Retained::default();
        for i in 0..MAX_RETAINED {
            assert!(r.admit(format!("config/{i}").as_bytes(), 10));
        }
        assert!(!r.admit(b"config/one-too-many", 10));
        assert!(r.admit(b"config/3", 20), "replacing one is fine");
        assert!(r.admit(b"config/3", 0), "clearing is always fine");
        assert!(r.admit(b"config/one-too-many", 10), "room again");
        assert!(!r.admit(b"big", MAX_RETAINED_BYTES));
    }
}
