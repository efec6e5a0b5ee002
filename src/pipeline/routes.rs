//! Topic routes: the table that finds a message's route (with a cache, since devices publish on
//! the same few topics over and over).

use std::collections::HashMap;
use std::sync::Arc;

use crate::codec::Codec;
use crate::config::RouteConfig;
use crate::topic::{Template, TopicFilter};

/// One compiled `[[route]]`.
#[derive(Debug, Clone)]
pub struct Route {
    pub filter_text: String,
    pub filter: TopicFilter,
    pub codec: Arc<dyn Codec>,
    pub source: Template,
    pub subject: Option<Template>,
    /// An authenticated publisher may name other devices and subjects in its payloads.
    pub trust_payload_ids: bool,
}

impl Route {
    pub fn build(c: &RouteConfig) -> Result<Self, String> {
        Ok(Route {
            filter_text: c.topic.get_ref().clone(),
            filter: TopicFilter::parse(c.topic.get_ref())?,
            codec: c.build_codec()?,
            source: Template::parse(&c.source)?,
            subject: c.subject.as_deref().map(Template::parse).transpose()?,
            trust_payload_ids: c.trust_payload_ids,
        })
    }
}

/// Which account may publish on a topic: the first matching route's `identity` template (its
/// `source` unless it names one), rendered. The embedded broker asks this of every publish from
/// a device account before anything else sees the message.
#[derive(Debug, Clone, Default)]
pub struct Owners {
    /// Each route's filter, `identity`, and the `source` and `subject` templates that decide,
    /// as in [`RouteTable::resolve`], whether the route takes a topic at all.
    routes: Vec<(TopicFilter, Template, Template, Option<Template>)>,
}

impl Owners {
    pub fn new(routes: &[RouteConfig]) -> Result<Self, String> {
        let routes = routes
            .iter()
            .map(|c| {
                let filter = TopicFilter::parse(c.topic.get_ref())?;
                let identity = Template::parse(c.identity.as_deref().unwrap_or(&c.source))?;
                let source = Template::parse(&c.source)?;
                let subject = c.subject.as_deref().map(Template::parse).transpose()?;
                Ok((filter, identity, source, subject))
            })
            .collect::<Result<_, String>>()?;
        Ok(Owners { routes })
    }

    /// Whether `account` owns `topic`. A topic no route takes is nobody's: a device has no
    /// business publishing there. The route is the one ingest will decode it by: the first
    /// whose filter matches and whose templates the topic fills.
    pub fn owned_by(&self, topic: &str, account: &str) -> bool {
        self.routes
            .iter()
            .find(|(f, _, source, subject)| {
                f.matches(topic)
                    && source.render(topic).is_some()
                    && subject.as_ref().is_none_or(|s| s.render(topic).is_some())
            })
            .and_then(|(_, identity, _, _)| identity.render(topic))
            .is_some_and(|owner| owner == account)
    }
}

/// What a topic resolves to: its route and the rendered names.
#[derive(Debug, Clone)]
pub struct Resolved {
    pub route: usize,
    pub source: Box<str>,
    pub subject: Option<Box<str>>,
}

/// The route cache holds at most about this many bytes (topics can be 64 KiB long, and a
/// device fleet's topics are few, so a full cache means someone publishes on ever new topics:
/// starting over is the right answer).
const CACHE_BYTES: usize = 8 << 20;

/// Routes in pipeline-file order: the first matching route wins.
#[derive(Debug)]
pub struct RouteTable {
    routes: Vec<Route>,
    cache: HashMap<Box<str>, Option<Resolved>>,
    cache_bytes: usize,
}

impl RouteTable {
    pub fn new(routes: Vec<Route>) -> Self {
        RouteTable {
            routes,
            cache: HashMap::new(),
            cache_bytes: 0,
        }
    }

    pub fn routes(&self) -> &[Route] {
        &self.routes
    }

    /// The route of a topic and its source/subject; `None` when no route matches or the topic
    /// lacks a level the route's templates name.
    pub fn resolve(&mut self, topic: &str) -> Option<(&Route, &Resolved)> {
        if !self.cache.contains_key(topic) {
            if self.cache_bytes >= CACHE_BYTES {
                self.cache.clear();
                self.cache_bytes = 0;
            }
            let resolved = self.routes.iter().enumerate().find_map(|(i, r)| {
                if !r.filter.matches(topic) {
                    return None;
                }
                Some(Resolved {
                    route: i,
                    source: r.source.render(topic)?.into(),
                    subject: match &r.subject {
                        Some(t) => Some(t.render(topic)?.into()),
                        None => None,
                    },
                })
            });
            self.cache_bytes += 64
                + topic.len()
                + resolved.as_ref().map_or(0, |r| {
                    r.source.len() + r.subject.as_ref().map_or(0, |s| s.len())
                });
            self.cache.insert(topic.into(), resolved);
        }
        let resolved = self.cache.get(topic).and_then(Option::as_ref)?;
        Some((&self.routes[resolved.route], resolved))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table() -> RouteTable {
        let c = crate::config::PipelineConfig::parse(
            r#"
[[route]]
topic = "t/#"
codec = "senml-json"
source = "{topic}"
subject = "s-{2}"
"#,
            "t.toml",
        )
        .unwrap();
        RouteTable::new(c.routes.iter().map(|r| Route::build(r).unwrap()).collect())
    }

    #[test]
    fn the_route_cache_is_bounded_in_bytes() {
        let mut t = table();
        // Ever new 10 KiB topics: far more than the cache may hold.
        for i in 0..3_000 {
            let topic = format!("t/{i}/{}", "x".repeat(10 << 10));
            let (_, r) = t.resolve(&topic).expect("routed");
            assert_eq!(r.subject.as_deref(), Some(format!("s-{i}").as_str()));
            assert!(
                t.cache_bytes <= CACHE_BYTES + 2 * topic.len() + 64 + 16,
                "{} bytes cached",
                t.cache_bytes
            );
        }
        assert!(t.cache.len() < 3_000, "the cache started over");
    }

    #[test]
    fn a_topic_is_owned_by_its_first_routes_identity_and_an_unrouted_one_by_nobody() {
        let c = crate::config::PipelineConfig::parse(
            r#"
[[route]]
topic = "ward/+/bed/+/vitals"
codec = "json"
source = "ward{2}-bed{4}-monitor"
[route.json]
ts = "/ts"
[[route.json.reading]]
value = "/hr"
metric = "heart_rate"

[[route]]
topic = "gw/+/ble/#"
codec = "senml-json"
source = "{4}"
identity = "gateway-{2}"

[[route]]
topic = "gw/#"
codec = "senml-json"
source = "anyone"
"#,
            "t.toml",
        )
        .unwrap();
        let owners = Owners::new(&c.routes).unwrap();
        assert!(owners.owned_by("ward/7/bed/3/vitals", "ward7-bed3-monitor"));
        assert!(!owners.owned_by("ward/7/bed/4/vitals", "ward7-bed3-monitor"));
        assert!(!owners.owned_by("ward/7/bed/3/notes", "ward7-bed3-monitor"));
        // `identity` names the gateway, not the devices behind it that `source` names.
        assert!(owners.owned_by("gw/g1/ble/aa:bb", "gateway-g1"));
        assert!(!owners.owned_by("gw/g1/ble/aa:bb", "aa:bb"));
        assert!(!owners.owned_by("gw/g2/ble/aa:bb", "gateway-g1"));
        // The first matching route decides, as it does for decoding.
        assert!(!owners.owned_by("gw/g1/ble/aa:bb", "anyone"));
        assert!(owners.owned_by("gw/g1/other", "anyone"));
        // ... of those whose templates the topic fills: `gw/+/ble/#` matches `gw/g1/ble`, but
        // its `{4}` has no level there, so ingest decodes it by the third route, whose owner
        // owns it.
        assert!(owners.owned_by("gw/g1/ble", "anyone"));
        assert!(!owners.owned_by("gw/g1/ble", "gateway-g1"));
    }
}
