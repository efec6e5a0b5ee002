//! Which topic filters the embedded broker's clients subscribe to, so that a device's publish is
//! handed to the router (for dashboards and other subscribers) only when some subscription could
//! want it, or when it is retained. Device data reaches ingest directly either way; without this
//! index every reading would also pass through the router for nobody.

use std::collections::HashMap;
use std::sync::RwLock;

use crate::topic::TopicFilter;

/// Filters kept per client before the index gives up and forwards everything: a bound on memory
/// against a client that subscribes without end.
const MAX_FILTERS_PER_CLIENT: usize = 256;

#[derive(Debug, Default)]
struct Inner {
    by_client: HashMap<String, Vec<(String, TopicFilter)>>,
    /// Some client holds more filters than the index keeps: forward everything.
    overflow: bool,
}

/// Shared by every connection.
#[derive(Debug, Default)]
pub struct Subscriptions {
    inner: RwLock<Inner>,
}

/// The filter a subscription matches with: `$share/<group>/<filter>` shares `<filter>`.
fn effective(filter: &str) -> &str {
    filter
        .strip_prefix("$share/")
        .and_then(|rest| rest.split_once('/'))
        .map_or(filter, |(_, f)| f)
}

impl Subscriptions {
    pub fn subscribe(&self, client: &str, filter: &str) {
        let Ok(parsed) = TopicFilter::parse(effective(filter)) else {
            // The router refuses it too.
            return;
        };
        let mut inner = self.inner.write().unwrap_or_else(|e| e.into_inner());
        let filters = inner.by_client.entry(client.to_owned()).or_default();
        if filters.iter().any(|(f, _)| f == filter) {
            return;
        }
        if filters.len() >= MAX_FILTERS_PER_CLIENT {
            inner.overflow = true;
            return;
        }
        filters.push((filter.to_owned(), parsed));
    }

    pub fn unsubscribe(&self, client: &str, filter: &str) {
        let mut inner = self.inner.write().unwrap_or_else(|e| e.into_inner());
        if let Some(filters) = inner.by_client.get_mut(client) {
            filters.retain(|(f, _)| f != filter);
            if filters.is_empty() {
                inner.by_client.remove(client);
            }
        }
    }

    /// A client's session ended (clean session) or restarted clean: the router forgets its
    /// subscriptions, and so does the index.
    pub fn forget(&self, client: &str) {
        let mut inner = self.inner.write().unwrap_or_else(|e| e.into_inner());
        inner.by_client.remove(client);
    }

    /// Whether some subscription may want a message on `topic`.
    pub fn wanted(&self, topic: &str) -> bool {
        let inner = self.inner.read().unwrap_or_else(|e| e.into_inner());
        inner.overflow
            || inner
                .by_client
                .values()
                .flatten()
                .any(|(_, f)| f.matches(topic))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn publishes_are_wanted_while_a_matching_subscription_lasts() {
        let s = Subscriptions::default();
        assert!(!s.wanted("ward/7/bed/3/vitals"));
        s.subscribe("dash", "alarms/#");
        assert!(!s.wanted("ward/7/bed/3/vitals"));
        s.subscribe("dash", "ward/+/bed/3/#");
        assert!(s.wanted("ward/7/bed/3/vitals"));
        s.subscribe("other", "$share/g/ward/#");
        s.unsubscribe("dash", "ward/+/bed/3/#");
        assert!(
            s.wanted("ward/7/bed/3/vitals"),
            "the shared one still wants it"
        );
        s.forget("other");
        assert!(!s.wanted("ward/7/bed/3/vitals"));
        assert!(s.wanted("alarms/w/bed/r"));
    }

    #[test]
    fn a_client_with_too_many_filters_makes_everything_wanted() {
        let s = Subscriptions::default();
        for i in 0..=MAX_FILTERS_PER_CLIENT {
            s.subscribe("greedy", &format!("t/{i}"));
        }
        assert!(s.wanted("unrelated/topic"));
    }
}
