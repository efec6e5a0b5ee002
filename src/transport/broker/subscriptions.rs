//! Which topic filters the embedded broker's clients subscribe to, so that a device's publish is
//! handed to the router (for dashboards and other subscribers) only when some subscription could
//! want it, or when it is retained. Device data reaches ingest directly either way; without this
//! index every reading would also pass through the router for nobody.
//!
//! Entries are kept by client id, as rumqttd keeps a persistent session's subscriptions across
//! its connections; each entry names the connection that owns it now, so that when a session is
//! taken over the old connection's end does not erase the new one's filters.

use std::collections::HashMap;
use std::sync::RwLock;

use crate::topic::TopicFilter;

/// Filters one client may hold: a bound on memory (also rumqttd's: it keeps a log per filter).
pub const MAX_FILTERS_PER_CLIENT: usize = 256;
/// Distinct filters all clients together may hold.
pub const MAX_FILTERS: usize = 16_384;

#[derive(Debug, Default)]
struct Client {
    /// The connection (session number) that owns the entry now.
    session: u64,
    filters: Vec<(String, TopicFilter)>,
}

#[derive(Debug, Default)]
struct Inner {
    by_client: HashMap<String, Client>,
    filters: usize,
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

/// Why a subscription is not taken.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    /// The filter is not a valid MQTT filter.
    Invalid,
    /// The client, or all clients together, hold as many filters as allowed.
    Quota,
}

impl Subscriptions {
    /// Connection `session` now serves `client`: a clean session starts with no filters; a
    /// resumed one keeps the session's.
    pub fn connect(&self, client: &str, session: u64, clean: bool) {
        let mut inner = self.inner.write().unwrap_or_else(|e| e.into_inner());
        let old = inner.by_client.remove(client);
        let filters = match old {
            Some(c) if !clean => c.filters,
            Some(c) => {
                inner.filters -= c.filters.len();
                Vec::new()
            }
            None => Vec::new(),
        };
        inner
            .by_client
            .insert(client.to_owned(), Client { session, filters });
    }

    /// Checks a filter before it is subscribed.
    pub fn check(&self, client: &str, filter: &str) -> Result<(), Refused> {
        TopicFilter::parse(effective(filter)).map_err(|_| Refused::Invalid)?;
        let inner = self.inner.read().unwrap_or_else(|e| e.into_inner());
        let held = inner.by_client.get(client).map_or(0, |c| c.filters.len());
        if held >= MAX_FILTERS_PER_CLIENT || inner.filters >= MAX_FILTERS {
            return Err(Refused::Quota);
        }
        Ok(())
    }

    /// Records a subscription [`Subscriptions::check`] accepted.
    pub fn subscribe(&self, client: &str, session: u64, filter: &str) {
        let Ok(parsed) = TopicFilter::parse(effective(filter)) else {
            return;
        };
        let mut inner = self.inner.write().unwrap_or_else(|e| e.into_inner());
        let entry = inner
            .by_client
            .entry(client.to_owned())
            .or_insert_with(|| Client {
                session,
                filters: Vec::new(),
            });
        if entry.filters.iter().any(|(f, _)| f == filter) {
            return;
        }
        entry.filters.push((filter.to_owned(), parsed));
        inner.filters += 1;
    }

    pub fn unsubscribe(&self, client: &str, filter: &str) {
        let mut inner = self.inner.write().unwrap_or_else(|e| e.into_inner());
        let mut removed = 0;
        if let Some(c) = inner.by_client.get_mut(client) {
            let before = c.filters.len();
            c.filters.retain(|(f, _)| f != filter);
            removed = before - c.filters.len();
        }
        inner.filters -= removed;
    }

    /// Connection `session` of `client` ended. A clean session's filters go, as in rumqttd;
    /// unless the entry belongs to a newer connection (a takeover), which keeps its own.
    pub fn disconnect(&self, client: &str, session: u64, clean: bool) {
        let mut inner = self.inner.write().unwrap_or_else(|e| e.into_inner());
        let owned = inner
            .by_client
            .get(client)
            .is_some_and(|c| c.session == session);
        if owned && clean {
            if let Some(c) = inner.by_client.remove(client) {
                inner.filters -= c.filters.len();
            }
        }
    }

    /// Whether some subscription may want a message on `topic`.
    pub fn wanted(&self, topic: &str) -> bool {
        let inner = self.inner.read().unwrap_or_else(|e| e.into_inner());
        inner
            .by_client
            .values()
            .flat_map(|c| &c.filters)
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
        s.connect("dash", 1, true);
        s.subscribe("dash", 1, "alarms/#");
        assert!(!s.wanted("ward/7/bed/3/vitals"));
        s.subscribe("dash", 1, "ward/+/bed/3/#");
        assert!(s.wanted("ward/7/bed/3/vitals"));
        s.connect("other", 2, true);
        s.subscribe("other", 2, "$share/g/ward/#");
        s.unsubscribe("dash", "ward/+/bed/3/#");
        assert!(
            s.wanted("ward/7/bed/3/vitals"),
            "the shared one still wants it"
        );
        s.disconnect("other", 2, true);
        assert!(!s.wanted("ward/7/bed/3/vitals"));
        assert!(s.wanted("alarms/w/bed/r"));
    }

    #[test]
    fn a_taken_over_session_keeps_the_new_connections_filters() {
        let s = Subscriptions::default();
        s.connect("dash", 1, true);
        s.subscribe("dash", 1, "ward/#");
        // The same client id connects again (clean), taking the session over …
        s.connect("dash", 2, true);
        s.subscribe("dash", 2, "ward/#");
        // … and the old connection's end must not erase the new one's subscription.
        s.disconnect("dash", 1, true);
        assert!(s.wanted("ward/7"));
        s.disconnect("dash", 2, true);
        assert!(!s.wanted("ward/7"));
    }

    #[test]
    fn persistent_sessions_keep_their_filters_across_connections() {
        let s = Subscriptions::default();
        s.connect("recorder", 1, false);
        s.subscribe("recorder", 1, "ward/#");
        s.disconnect("recorder", 1, false);
        assert!(
            s.wanted("ward/7"),
            "rumqttd keeps delivering into the session"
        );
        s.connect("recorder", 2, false);
        assert!(s.wanted("ward/7"));
        s.connect("recorder", 3, true);
        assert!(!s.wanted("ward/7"), "a clean start drops them");
    }

    #[test]
    fn filters_are_bounded_per_client() {
        let s = Subscriptions::default();
        s.connect("greedy", 1, true);
        for i in 0..MAX_FILTERS_PER_CLIENT {
            assert_eq!(s.check("greedy", &format!("t/{i}")), Ok(()));
            s.subscribe("greedy", 1, &format!("t/{i}"));
        }
        assert_eq!(s.check("greedy", "t/more"), Err(Refused::Quota));
        assert_eq!(s.check("other", "a/#/b"), Err(Refused::Invalid));
        assert!(!s.wanted("unrelated/topic"));
    }
}
