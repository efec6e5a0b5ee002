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

#[cfg(test)]
mod tests {
    use super::*;

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
}
