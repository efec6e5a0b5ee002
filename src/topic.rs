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
