//! MQTT topics: filters (`+`, `#`), the `{n}` templates that name a reading's source and subject
//! from topic levels, and the checks on topic names devices publish to.

/// An MQTT topic filter (`+` one level, `#` the rest).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TopicFilter {
    levels: Vec<FilterLevel>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum FilterLevel {
    Exact(String),
    Plus,
    Hash,
}

impl TopicFilter {
    pub fn parse(filter: &str) -> Result<Self, String> {
        if filter.is_empty() {
            return Err("a topic filter cannot be empty".into());
        }
        let parts: Vec<&str> = filter.split('/').collect();
        let mut levels = Vec::with_capacity(parts.len());
        for (i, p) in parts.iter().enumerate() {
            levels.push(match *p {
                "+" => FilterLevel::Plus,
                "#" if i == parts.len() - 1 => FilterLevel::Hash,
                p if p.contains(['+', '#']) => {
                    return Err(format!(
                        "`{filter}`: + and # must stand alone, and # only last"
                    ))
                }
                p => FilterLevel::Exact(p.to_owned()),
            });
        }
        Ok(TopicFilter { levels })
    }

    /// How many levels the filter has, a trailing `#` counted as one.
    pub fn levels(&self) -> usize {
        self.levels.len()
    }

    /// Whether the filter ends in `#`, so that the topics it matches may have any number of
    /// levels from there on.
    pub fn is_multi_level(&self) -> bool {
        matches!(self.levels.last(), Some(FilterLevel::Hash))
    }

    /// Checks that every topic level `template` names can exist in a topic this filter matches.
    /// A filter ending in `#` matches topics of any length from the `#` on, so any level is
    /// allowed there: a topic too short for the template is left unrouted when it arrives.
    pub fn check_template(&self, template: &Template) -> Result<(), String> {
        match template.max_level() {
            Some(n) if n > self.levels() && !self.is_multi_level() => Err(format!(
                "{{{n}}} names topic level {n}, but the filter {self} has {} levels",
                self.levels()
            )),
            _ => Ok(()),
        }
    }

    pub fn matches(&self, topic: &str) -> bool {
        // Filters starting with a wildcard do not match $-topics (MQTT 4.7.2).
        if topic.starts_with('$') && !matches!(self.levels.first(), Some(FilterLevel::Exact(_))) {
            return false;
        }
        let mut parts = topic.split('/');
        for level in &self.levels {
            match level {
                FilterLevel::Hash => return true,
                FilterLevel::Plus => {
                    if parts.next().is_none() {
                        return false;
                    }
                }
                FilterLevel::Exact(e) => {
                    if parts.next() != Some(e.as_str()) {
                        return false;
                    }
                }
            }
        }
        parts.next().is_none()
    }
}

impl std::fmt::Display for TopicFilter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for (i, level) in self.levels.iter().enumerate() {
            if i > 0 {
                f.write_str("/")?;
            }
            f.write_str(match level {
                FilterLevel::Exact(e) => e,
                FilterLevel::Plus => "+",
                FilterLevel::Hash => "#",
            })?;
        }
        Ok(())
    }
}

/// `"ward{2}-bed{4}"`: literal text with `{n}` (topic level n, from 1) and `{topic}`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Template {
    parts: Vec<TemplatePart>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum TemplatePart {
    Text(String),
    Level(usize),
    Topic,
}

impl Template {
    pub fn parse(t: &str) -> Result<Self, String> {
        let mut parts = Vec::new();
        let mut rest = t;
        while let Some(open) = rest.find('{') {
            if open > 0 {
                parts.push(TemplatePart::Text(rest[..open].to_owned()));
            }
            let close = rest[open..]
                .find('}')
                .ok_or_else(|| format!("`{t}`: unclosed {{"))?
                + open;
            let inner = &rest[open + 1..close];
            parts.push(match inner {
                "topic" => TemplatePart::Topic,
                n => match n.parse::<usize>() {
                    Ok(n) if n >= 1 => TemplatePart::Level(n),
                    _ => {
                        return Err(format!(
                            "`{t}`: {{{inner}}} is neither {{topic}} nor a topic level from 1"
                        ))
                    }
                },
            });
            rest = &rest[close + 1..];
        }
        if rest.contains('}') {
            return Err(format!("`{t}`: unopened }}"));
        }
        if !rest.is_empty() {
            parts.push(TemplatePart::Text(rest.to_owned()));
        }
        Ok(Template { parts })
    }

    /// The highest topic level the template names, if it names any.
    pub fn max_level(&self) -> Option<usize> {
        self.parts
            .iter()
            .filter_map(|p| match p {
                TemplatePart::Level(n) => Some(*n),
                _ => None,
            })
            .max()
    }

    /// Whether rendering takes anything from the topic (a level or the whole topic).
    pub fn uses_topic(&self) -> bool {
        self.parts
            .iter()
            .any(|p| matches!(p, TemplatePart::Level(_) | TemplatePart::Topic))
    }

    /// Renders against a topic; `None` if the topic lacks a level the template names.
    pub fn render(&self, topic: &str) -> Option<String> {
        let mut out = String::new();
        for p in &self.parts {
            match p {
                TemplatePart::Text(s) => out.push_str(s),
                TemplatePart::Topic => out.push_str(topic),
                TemplatePart::Level(n) => out.push_str(topic.split('/').nth(n - 1)?),
            }
        }
        Some(out)
    }
}

/// Why a topic name a client published to is refused (MQTT 3.1.1 §4.7, MQTT 5 §4.7).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum TopicNameError {
    #[error("the topic name is empty")]
    Empty,
    #[error("the topic name is not UTF-8")]
    NotUtf8,
    #[error("the topic name contains a wildcard (+ or #)")]
    Wildcard,
    #[error("the topic name contains U+0000")]
    Nul,
}

impl TopicNameError {
    /// A short label for metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            TopicNameError::Empty => "empty",
            TopicNameError::NotUtf8 => "not_utf8",
            TopicNameError::Wildcard => "wildcard",
            TopicNameError::Nul => "nul",
        }
    }
}

/// Checks a topic name a client published to: filters' wildcards and NUL are not allowed in
/// names, and a name is UTF-8 and not empty.
pub fn check_topic_name(topic: &[u8]) -> Result<&str, TopicNameError> {
    if topic.is_empty() {
        return Err(TopicNameError::Empty);
    }
    let name = std::str::from_utf8(topic).map_err(|_| TopicNameError::NotUtf8)?;
    if name.contains(['+', '#']) {
        return Err(TopicNameError::Wildcard);
    }
    if name.contains('\0') {
        return Err(TopicNameError::Nul);
    }
    Ok(name)
}

/// The longest topic level [`level`] writes, in bytes.
pub const MAX_LEVEL_BYTES: usize = 128;

/// Bytes that stand for themselves in a topic level built from an identifier; every other byte
/// (including `%` and `~`) is percent-encoded.
fn plain(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.')
}

/// Encodes an identifier (a subject, a source) as one topic level, so that no two identifiers
/// share a level and none can break out of it.
///
/// - Bytes outside `A-Z a-z 0-9 - _ .` are percent-encoded as `%XX` (upper-case hex, RFC 3986),
///   so `/`, `+`, `#`, NUL, control characters, `%` and `~` never appear raw: `ward7/bed3`
///   becomes `ward7%2Fbed3`, distinct from `ward7_bed3`. A dashboard decodes the level with
///   `decodeURIComponent`.
/// - An identifier that is empty, or whose encoding is longer than [`MAX_LEVEL_BYTES`], becomes
///   the longest whole-escape prefix of its encoding that fits, then `~`, then the first 32 hex
///   digits (128 bits) of the SHA-256 of the identifier. Only such levels contain `~`, so they
///   cannot collide with a plain one, and two of them only if SHA-256 collides in 128 bits.
pub fn level(id: &str) -> String {
    let mut out = String::with_capacity(id.len());
    for &b in id.as_bytes() {
        if plain(b) {
            out.push(b as char);
        } else {
            out.push('%');
            out.push(HEX[(b >> 4) as usize] as char);
            out.push(HEX[(b & 0xf) as usize] as char);
        }
    }
    if !out.is_empty() && out.len() <= MAX_LEVEL_BYTES {
        return out;
    }
    hashed(&out, id.as_bytes())
}

const HEX: &[u8; 16] = b"0123456789ABCDEF";

/// `prefix~hash`: see [`level`].
fn hashed(encoded: &str, raw: &[u8]) -> String {
    let digest = ring::digest::digest(&ring::digest::SHA256, raw);
    const HASH_HEX: usize = 32;
    let bytes = encoded.as_bytes();
    let mut cut = (MAX_LEVEL_BYTES - 1 - HASH_HEX).min(bytes.len());
    // Never cut a %XX escape in two: back off while one of the last two kept bytes opens one.
    while (cut >= 1 && bytes[cut - 1] == b'%') || (cut >= 2 && bytes[cut - 2] == b'%') {
        cut -= 1;
    }
    let mut out = encoded[..cut].to_owned();
    out.push('~');
    for b in &digest.as_ref()[..HASH_HEX / 2] {
        out.push(HEX[(b >> 4) as usize].to_ascii_lowercase() as char);
        out.push(HEX[(b & 0xf) as usize].to_ascii_lowercase() as char);
    }
    out
}

/// The identifier a level written by [`level`] stands for; `None` for a hashed level (the
/// identifier was too long to write whole) or a level [`level`] would not write.
pub fn unlevel(level_text: &str) -> Option<String> {
    if level_text.is_empty() || level_text.contains('~') {
        return None;
    }
    let b = level_text.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = |c: u8| (c as char).to_digit(16);
            let hi = hex(*b.get(i + 1)?)?;
            let lo = hex(*b.get(i + 2)?)?;
            out.push((hi * 16 + lo) as u8);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    let id = String::from_utf8(out).ok()?;
    // Only the one spelling `level` writes names it: anything else would let two topics
    // configure one subject.
    (level(&id) == level_text).then_some(id)
}

/// Whether `s` can stand as one level of the topics this service publishes (a site, a rule
/// name): as [`level`] would write it, so it needs no encoding.
pub fn is_plain_level(s: &str) -> bool {
    !s.is_empty() && s.len() <= MAX_LEVEL_BYTES && s.bytes().all(plain)
}

/// `alarms/<site>/<subject>/<rule>`; the subject is encoded with [`level`]. `site` and `rule`
/// are checked plain levels from the pipeline file.
pub fn alarm_topic(site: &str, subject: &str, rule: &str) -> String {
    format!("alarms/{site}/{}/{rule}", level(subject))
}

/// `news2/<site>/<subject>`, the subject encoded with [`level`].
pub fn news2_topic(site: &str, subject: &str) -> String {
    format!("news2/{site}/{}", level(subject))
}

/// The prefix of the dead-letter topics.
pub const DEAD_LETTER_PREFIX: &str = "edge/deadletter/";

/// MQTT's limit on a topic name, in bytes.
pub const MAX_TOPIC_BYTES: usize = 65_535;

/// `edge/deadletter/<original topic>`: the original topic name is a valid name (checked on
/// receipt), so only its length needs care: one too long to fit under the prefix is replaced
/// by its [`level`] hash form.
pub fn dead_letter_topic(topic: &str) -> String {
    if DEAD_LETTER_PREFIX.len() + topic.len() <= MAX_TOPIC_BYTES {
        format!("{DEAD_LETTER_PREFIX}{topic}")
    } else {
        format!("{DEAD_LETTER_PREFIX}{}", hashed("", topic.as_bytes()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_topic_error_has_its_refusal_series_from_the_start() {
        let text = crate::model::metrics::Metrics::new().render();
        for e in [
            TopicNameError::Empty,
            TopicNameError::NotUtf8,
            TopicNameError::Wildcard,
            TopicNameError::Nul,
        ] {
            let line = format!("iomt_topics_refused_total{{reason=\"{}\"}} 0", e.as_str());
            assert!(text.lines().any(|l| l == line), "{line}");
        }
    }

    #[test]
    fn unlevel_reverses_level_and_nothing_else() {
        for id in ["bed-3", "ward7/bed3", "ward7_bed3", "Zoë #1", "a+b"] {
            assert_eq!(unlevel(&level(id)).as_deref(), Some(id));
        }
        assert_eq!(
            unlevel("ward7%2fbed3"),
            None,
            "lower-case escape: not our spelling"
        );
        assert_eq!(unlevel("%ZZ"), None);
        assert_eq!(unlevel(&level(&"x".repeat(500))), None, "hashed");
    }

    #[test]
    fn filters_match_like_mqtt() {
        let f = |s| TopicFilter::parse(s).unwrap();
        assert!(f("ward/+/bed/+/ble/2a37").matches("ward/7/bed/3/ble/2a37"));
        assert!(!f("ward/+/bed/+/ble/2a37").matches("ward/7/bed/3/ble"));
        assert!(!f("ward/+/bed/+/ble/2a37").matches("ward/7/bed/3/ble/2a37/x"));
        assert!(f("ward/#").matches("ward/7/bed"));
        assert!(f("ward/#").matches("ward"));
        assert!(f("#").matches("a/b"));
        assert!(!f("#").matches("$SYS/x"));
        assert!(!f("+/x").matches("$SYS/x"));
        assert!(f("a/+").matches("a/"));
        for bad in ["", "a/#/b", "a/b+", "a#"] {
            assert!(TopicFilter::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn templates_render_topic_levels() {
        let t = Template::parse("ward{2}-bed{4}").unwrap();
        assert_eq!(t.render("ward/7/bed/3/hr").as_deref(), Some("ward7-bed3"));
        assert_eq!(t.render("ward/7").as_deref(), None);
        assert_eq!(
            Template::parse("{topic}").unwrap().render("a/b").as_deref(),
            Some("a/b")
        );
        assert_eq!(
            Template::parse("fixed").unwrap().render("a").as_deref(),
            Some("fixed")
        );
        for bad in ["{0}", "{x}", "a{1", "a}"] {
            assert!(Template::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn topic_names_refuse_wildcards_nul_and_non_utf8() {
        assert_eq!(check_topic_name(b"ward/7/bed/3"), Ok("ward/7/bed/3"));
        assert_eq!(check_topic_name(b"a//b/"), Ok("a//b/"));
        assert_eq!(check_topic_name(b""), Err(TopicNameError::Empty));
        assert_eq!(check_topic_name(b"ward/+"), Err(TopicNameError::Wildcard));
        assert_eq!(check_topic_name(b"ward/#"), Err(TopicNameError::Wildcard));
        assert_eq!(check_topic_name(b"bed4+"), Err(TopicNameError::Wildcard));
        assert_eq!(check_topic_name(b"a\0b"), Err(TopicNameError::Nul));
        assert_eq!(check_topic_name(b"a\xffb"), Err(TopicNameError::NotUtf8));
    }

    #[test]
    fn levels_are_plain_where_they_can_be() {
        assert_eq!(level("w7-b3"), "w7-b3");
        assert_eq!(level("ward7/bed3"), "ward7%2Fbed3");
        assert_eq!(level("ward7_bed3"), "ward7_bed3");
        assert_eq!(level("a+b#c"), "a%2Bb%23c");
        assert_eq!(level("nul\0"), "nul%00");
        assert_eq!(level("50%"), "50%25");
        assert_eq!(level("x~y"), "x%7Ey");
        assert_eq!(level("é"), "%C3%A9");
        assert_eq!(
            alarm_topic("ward", "ward7/bed3", "spo2-low"),
            "alarms/ward/ward7%2Fbed3/spo2-low"
        );
        // The empty subject gets a level of its own, not `alarms/ward//spo2-low`.
        let empty = level("");
        assert!(empty.starts_with('~') && empty.len() == 33, "{empty}");
    }

    #[test]
    fn long_levels_are_bounded_and_still_distinct() {
        let a = "x".repeat(1000);
        let b = format!("{}y", "x".repeat(999));
        let (la, lb) = (level(&a), level(&b));
        assert!(la.len() <= MAX_LEVEL_BYTES && lb.len() <= MAX_LEVEL_BYTES);
        assert_ne!(la, lb);
        assert!(la.starts_with("xxxx") && la.contains('~'));
        // A prefix cut never splits an escape.
        let slashes = "/".repeat(200);
        let l = level(&slashes);
        let (prefix, _) = l.split_once('~').unwrap();
        assert!(
            prefix.len() % 3 == 0
                && prefix.chars().filter(|&c| c == '%').count() == prefix.len() / 3,
            "{l}"
        );
        // A hashed level cannot equal a plain one: plain levels never contain `~`.
        assert!(!level("a~b").contains('~'));
    }

    #[test]
    fn levels_are_injective_over_random_identifiers() {
        use std::collections::HashMap;
        let mut seen: HashMap<String, String> = HashMap::new();
        let alphabet: Vec<char> = "ab/_%~+#\0é -.".chars().collect();
        let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
        for _ in 0..20_000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let len = (x % 7) as usize + if x % 97 == 0 { 150 } else { 0 };
            let id: String = (0..len)
                .map(|i| alphabet[((x >> (i % 60)) as usize + i * 7) % alphabet.len()])
                .collect();
            let l = level(&id);
            assert!(l.len() <= MAX_LEVEL_BYTES && !l.is_empty());
            assert!(
                check_topic_name(l.as_bytes()).is_ok() && !l.contains('/'),
                "{l:?}"
            );
            if let Some(other) = seen.insert(l.clone(), id.clone()) {
                assert_eq!(other, id, "{other:?} and {id:?} share level {l}");
            }
        }
        assert!(
            seen.len() > 500,
            "the generator produced many distinct identifiers"
        );
    }

    #[test]
    fn dead_letter_topics_fit_mqtt() {
        assert_eq!(
            dead_letter_topic("ward/7/vitals"),
            "edge/deadletter/ward/7/vitals"
        );
        let long = "t".repeat(MAX_TOPIC_BYTES - 3);
        let dl = dead_letter_topic(&long);
        assert!(dl.len() <= MAX_TOPIC_BYTES && dl.starts_with("edge/deadletter/~"));
    }

    #[test]
    fn templates_may_only_name_levels_the_filter_has() {
        let f = |s| TopicFilter::parse(s).unwrap();
        let t = |s| Template::parse(s).unwrap();
        let vitals = f("ward/+/bed/+/vitals");
        assert_eq!(vitals.levels(), 5);
        assert_eq!(vitals.to_string(), "ward/+/bed/+/vitals");
        assert_eq!(t("ward{2}-bed{4}").max_level(), Some(4));
        assert_eq!(t("{topic}").max_level(), None);
        assert!(vitals.check_template(&t("ward{2}-bed{4}")).is_ok());
        assert!(vitals.check_template(&t("{5}")).is_ok());
        assert!(vitals.check_template(&t("{topic}")).is_ok());
        assert_eq!(
            vitals.check_template(&t("{9}")).unwrap_err(),
            "{9} names topic level 9, but the filter ward/+/bed/+/vitals has 5 levels"
        );
        assert_eq!(
            vitals.check_template(&t("w{2}-{6}")).unwrap_err(),
            "{6} names topic level 6, but the filter ward/+/bed/+/vitals has 5 levels"
        );
        // Past a `#` a topic may have any number of levels.
        let hash = f("gw/+/#");
        assert!(hash.is_multi_level());
        assert!(hash.check_template(&t("{9}")).is_ok());
        assert_eq!(
            t("{9}").render("gw/1/a/b/c/d/e/f/dev-9").as_deref(),
            Some("dev-9")
        );
        assert!(t("fixed").max_level().is_none() && !t("fixed").uses_topic());
        assert!(t("{topic}").uses_topic() && t("x{1}").uses_topic());
    }
}
