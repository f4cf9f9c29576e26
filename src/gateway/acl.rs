//! Topic access control: which topics a session may publish to and which
//! filters it may subscribe to. Implements MQTT topic-name / topic-filter
//! validation and matching, filter containment (a subscription is allowed
//! only if every topic it can match is inside an allowed filter), shared
//! subscriptions (`$share/{group}/{filter}`), deny lists checked before the
//! allow lists, and namespace templates such as
//! `devices/{ProductKey}/{DeviceKey}/#`.
//!
//! One matching rule everywhere (the ACLs of devices and accounts, config
//! validation, and the router through `RouterConfig::wildcard_excluded_levels`):
//! a filter whose first level is a wildcard never matches a topic whose first
//! level starts with `$` (MQTT §4.7.2) or is `admin` (the admin plane's
//! topics behave like `$` topics). Only filters naming `admin/…` reach them.

use std::fmt;

/// The default device namespace template (SPEC §3).
pub const DEFAULT_DEVICE_TEMPLATE: &str = "devices/{ProductKey}/{DeviceKey}/#";

/// First topic levels that filters starting with a wildcard do not match,
/// besides those starting with `$` (given to the router as
/// `wildcard_excluded_levels`).
pub const WILDCARD_EXCLUDED_LEVELS: &[&str] = &["admin"];

/// Whether a wildcard at the first level skips the first level `level`.
pub fn excluded_from_wildcards(level: &str) -> bool {
    level.starts_with('$') || WILDCARD_EXCLUDED_LEVELS.contains(&level)
}

fn first_level(f: &str) -> &str {
    f.split('/').next().unwrap_or(f)
}

fn starts_with_wildcard(f: &str) -> bool {
    f.starts_with('+') || f.starts_with('#')
}

/// `f` starts with a wildcard and `g`'s first level is one wildcards skip:
/// nothing `g` matches is matched by `f`.
fn wildcard_skips(f: &str, g: &str) -> bool {
    starts_with_wildcard(f) && excluded_from_wildcards(first_level(g))
}

/// What one session may do with topics. Filters are concrete MQTT topic
/// filters (templates already rendered).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Acl {
    /// A PUBLISH is allowed if its topic matches one of these filters.
    pub publish: Vec<String>,
    /// A SUBSCRIBE filter is allowed if it is contained in one of these.
    pub subscribe: Vec<String>,
    /// Checked before `publish`: no PUBLISH to a topic matching one of these.
    pub deny_publish: Vec<String>,
    /// Checked before `subscribe`: no subscription to a filter contained in
    /// one of these, and no delivery of a message whose topic matches one
    /// (so `#` minus `test/secret` is `subscribe = ["#"]`,
    /// `deny_subscribe = ["test/secret"]`).
    pub deny_subscribe: Vec<String>,
}

/// The verdict on one subscription filter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SubscribeVerdict {
    Allowed,
    /// Syntactically invalid filter (MQTT 5 SUBACK 0x8F, 3.1.1 0x80).
    Invalid,
    /// Valid but outside the session's namespace (0x87 / 0x80).
    NotAuthorized,
}

impl Acl {
    /// The same filters for publish and subscribe.
    pub fn both(filters: Vec<String>) -> Self {
        Acl {
            publish: filters.clone(),
            subscribe: filters,
            ..Acl::default()
        }
    }

    /// This ACL with `filters` out of reach (both directions) whatever it allows.
    pub fn denying(mut self, filters: &[&str]) -> Self {
        let filters = filters.iter().map(|f| (*f).to_owned());
        self.deny_publish.extend(filters.clone());
        self.deny_subscribe.extend(filters);
        self
    }

    /// The default device namespace `devices/{pk}/{dk}/#` for both directions.
    pub fn device(product_key: &str, device_key: &str) -> Self {
        let t = AclTemplate::both(&[DEFAULT_DEVICE_TEMPLATE]);
        t.render(&[("ProductKey", product_key), ("DeviceKey", device_key)])
            .unwrap_or_default()
    }

    /// May the session publish to `topic`? Invalid topic names never are.
    pub fn may_publish(&self, topic: &str) -> bool {
        valid_topic_name(topic)
            && !self.deny_publish.iter().any(|d| topic_matches(topic, d))
            && self.publish.iter().any(|f| topic_matches(topic, f))
    }

    /// May the session be sent a message published to `topic` (through a
    /// subscription that overlaps a `deny_subscribe` filter)?
    pub fn may_receive(&self, topic: &str) -> bool {
        !self.deny_subscribe.iter().any(|d| topic_matches(topic, d))
    }

    /// May the session subscribe to `filter` (possibly `$share/{group}/…`)?
    pub fn check_subscribe(&self, filter: &str) -> SubscribeVerdict {
        let inner = match shared_inner(filter) {
            Some(Some(inner)) => inner,
            Some(None) => return SubscribeVerdict::Invalid,
            None => filter,
        };
        if !valid_filter(inner) {
            return SubscribeVerdict::Invalid;
        }
        // `$`-topics (e.g. `$SYS/#`) are not served by the router; no
        // session may subscribe to them, whatever its filters say.
        if inner.starts_with('$') || self.deny_subscribe.iter().any(|d| filter_within(inner, d)) {
            return SubscribeVerdict::NotAuthorized;
        }
        if self.subscribe.iter().any(|a| filter_within(inner, a)) {
            SubscribeVerdict::Allowed
        } else {
            SubscribeVerdict::NotAuthorized
        }
    }
}

/// `Some(Some(inner))` for a well-formed `$share/{group}/{inner}`,
/// `Some(None)` for a malformed shared subscription, `None` otherwise.
fn shared_inner(filter: &str) -> Option<Option<&str>> {
    let rest = filter.strip_prefix("$share/")?;
    Some(match rest.split_once('/') {
        Some((group, inner))
            if !group.is_empty() && !group.contains(['+', '#']) && !inner.is_empty() =>
        {
            Some(inner)
        }
        _ => None,
    })
}

/// A topic name: non-empty, no wildcards, no NUL (MQTT §4.7.3, §1.5.4).
pub fn valid_topic_name(topic: &str) -> bool {
    !topic.is_empty() && !topic.contains(['+', '#', '\0'])
}

/// A topic filter: non-empty, `#` only as the whole last level, `+` only as
/// a whole level, no NUL.
pub fn valid_filter(filter: &str) -> bool {
    if filter.is_empty() || filter.contains('\0') {
        return false;
    }
    let mut levels = filter.split('/').peekable();
    while let Some(level) = levels.next() {
        let last = levels.peek().is_none();
        if level.contains('#') && !(level == "#" && last) {
            return false;
        }
        if level.contains('+') && level != "+" {
            return false;
        }
    }
    true
}

/// Does topic name `topic` match filter `filter`? A filter starting with a
/// wildcard does not match topics starting with `$` (MQTT §4.7.2) or `admin/`.
pub fn topic_matches(topic: &str, filter: &str) -> bool {
    if wildcard_skips(filter, topic) {
        return false;
    }
    let mut t = topic.split('/');
    for f in filter.split('/') {
        if f == "#" {
            return true;
        }
        match t.next() {
            Some(level) if f == "+" || f == level => {}
            _ => return false,
        }
    }
    t.next().is_none()
}

/// Is every topic matched by filter `f` also matched by filter `a`? Both
/// must be valid filters.
pub fn filter_within(f: &str, a: &str) -> bool {
    if wildcard_skips(a, f) {
        // `f` names a first level (`$…`, `admin`) that `a`'s wildcard skips.
        return false;
    }
    let mut fl = f.split('/');
    for al in a.split('/') {
        if al == "#" {
            // `a/#` matches its parent `a` and everything below.
            return true;
        }
        match fl.next() {
            // `f` ended: it matches only topics ending here, `a` needs more.
            None => return false,
            Some("#") => return false,
            Some("+") => {
                if al != "+" {
                    return false;
                }
            }
            Some(level) => {
                if al != "+" && al != level {
                    return false;
                }
            }
        }
    }
    fl.next().is_none()
}

/// Could one topic name match both the subscription filter `filter` (maybe
/// `$share/{group}/…`: its inner filter) and filter `other` (both valid)?
pub fn subscription_overlaps(filter: &str, other: &str) -> bool {
    let inner = match shared_inner(filter) {
        Some(Some(inner)) => inner,
        _ => filter,
    };
    filters_overlap(inner, other)
}

/// Could one topic name match both filters `a` and `b` (both valid)?
pub fn filters_overlap(a: &str, b: &str) -> bool {
    // Wildcards at the first level never match `$` or `admin` topics.
    if wildcard_skips(a, b) || wildcard_skips(b, a) {
        return false;
    }
    let (mut al, mut bl) = (a.split('/'), b.split('/'));
    loop {
        match (al.next(), bl.next()) {
            (Some("#"), _) | (_, Some("#")) => return true,
            (Some(x), Some(y)) => {
                if x != "+" && y != "+" && x != y {
                    return false;
                }
            }
            (None, None) => return true,
            // One ended: the other still matches its parent only through `#`.
            (None, Some(_)) => return false,
            (Some(_), None) => return false,
        }
    }
}

/// `template` with every level that holds a placeholder replaced by `+`:
/// the filter matching every topic any rendering of it can match.
pub fn template_pattern(template: &str) -> String {
    template
        .split('/')
        .map(|level| if level.contains('{') { "+" } else { level })
        .collect::<Vec<_>>()
        .join("/")
}

/// Namespace templates with `{Name}` placeholders, rendered per session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AclTemplate {
    pub publish: Vec<String>,
    pub subscribe: Vec<String>,
}

/// Why a template could not be rendered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AclError {
    /// `{Name}` has no value.
    UnknownPlaceholder(String),
    /// A value would inject a level separator, wildcard or NUL.
    UnsafeValue(String),
    /// `{` without `}`.
    Unterminated(String),
    /// The rendered filter is not a valid topic filter.
    InvalidFilter(String),
}

impl fmt::Display for AclError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            AclError::UnknownPlaceholder(n) => write!(f, "unknown placeholder {{{n}}}"),
            AclError::UnsafeValue(v) => write!(f, "value {v:?} contains '/', '+', '#' or NUL"),
            AclError::Unterminated(t) => write!(f, "unterminated placeholder in {t:?}"),
            AclError::InvalidFilter(t) => write!(f, "{t:?} is not a valid topic filter"),
        }
    }
}

impl std::error::Error for AclError {}

impl Default for AclTemplate {
    fn default() -> Self {
        AclTemplate::both(&[DEFAULT_DEVICE_TEMPLATE])
    }
}

impl AclTemplate {
    pub fn both(templates: &[&str]) -> Self {
        let v: Vec<String> = templates.iter().map(|s| (*s).to_owned()).collect();
        AclTemplate {
            publish: v.clone(),
            subscribe: v,
        }
    }

    /// Checks every template renders to a valid filter with placeholder
    /// values `x` (for config validation at startup).
    pub fn validate(&self, names: &[&str]) -> Result<(), AclError> {
        let vars: Vec<(&str, &str)> = names.iter().map(|n| (*n, "x")).collect();
        self.render(&vars).map(|_| ())
    }

    /// Substitutes `{Name}` with the value of `Name` in `vars`.
    pub fn render(&self, vars: &[(&str, &str)]) -> Result<Acl, AclError> {
        let render_all = |list: &[String]| -> Result<Vec<String>, AclError> {
            list.iter().map(|t| render_one(t, vars)).collect()
        };
        Ok(Acl {
            publish: render_all(&self.publish)?,
            subscribe: render_all(&self.subscribe)?,
            ..Acl::default()
        })
    }
}

fn render_one(template: &str, vars: &[(&str, &str)]) -> Result<String, AclError> {
    let mut out = String::with_capacity(template.len() + 32);
    let mut rest = template;
    while let Some(start) = rest.find('{') {
        out.push_str(&rest[..start]);
        let after = &rest[start + 1..];
        let Some(end) = after.find('}') else {
            return Err(AclError::Unterminated(template.to_owned()));
        };
        let name = &after[..end];
        let Some((_, value)) = vars.iter().find(|(n, _)| *n == name) else {
            return Err(AclError::UnknownPlaceholder(name.to_owned()));
        };
        if value.is_empty() || value.contains(['/', '+', '#', '\0']) {
            return Err(AclError::UnsafeValue((*value).to_owned()));
        }
        out.push_str(value);
        rest = &after[end + 1..];
    }
    out.push_str(rest);
    if valid_filter(&out) {
        Ok(out)
    } else {
        Err(AclError::InvalidFilter(out))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subscriptions_overlapping_the_event_topics() {
        let events = "admin/v1/events/#";
        for f in [
            "admin/v1/events/#",
            "admin/v1/events/device/connected",
            "admin/#",
            "admin/+/events/+/connected",
            "$share/g/admin/v1/events/device/+",
        ] {
            assert!(subscription_overlaps(f, events), "{f}");
        }
        for f in [
            "#",
            "+/v1/events/device/connected",
            "admin/v1/ops/response",
            "devices/p/d/#",
            "$share/g/#",
        ] {
            assert!(!subscription_overlaps(f, events), "{f}");
        }
    }

    #[test]
    fn matching() {
        assert!(topic_matches("a/b/c", "a/+/c"));
        assert!(topic_matches("a/b/c", "a/#"));
        assert!(topic_matches("a", "a/#"));
        assert!(topic_matches("a/b", "#"));
        assert!(!topic_matches("a/b", "a"));
        assert!(!topic_matches("a", "a/b"));
        assert!(!topic_matches("$SYS/x", "#"));
        assert!(!topic_matches("$SYS/x", "+/x"));
        assert!(topic_matches("$SYS/x", "$SYS/#"));
        assert!(topic_matches("a//b", "a/+/b"));
    }

    #[test]
    fn filters_validate() {
        for ok in ["#", "+", "a/+/b", "a/#", "+/+", "/", "a//b"] {
            assert!(valid_filter(ok), "{ok}");
        }
        for bad in ["", "a/#/b", "a#", "a/b+", "++", "a/\0"] {
            assert!(!valid_filter(bad), "{bad}");
        }
    }

    #[test]
    fn containment() {
        let a = "devices/p/d/#";
        assert!(filter_within("devices/p/d/#", a));
        assert!(filter_within("devices/p/d", a));
        assert!(filter_within("devices/p/d/+/x", a));
        assert!(filter_within("devices/p/d/+", a));
        assert!(filter_within("devices/p/d/x/#", a));
        assert!(!filter_within("devices/+/d/#", a));
        assert!(!filter_within("devices/p/+/#", a));
        assert!(!filter_within("devices/p/#", a));
        assert!(!filter_within("devices/#", a));
        assert!(!filter_within("#", a));
        assert!(!filter_within("+/#", a));
        assert!(!filter_within("devices/p/d2/#", a));
        assert!(!filter_within("devices/p", a));
        assert!(filter_within("x/+/y", "x/+/+"));
        assert!(!filter_within("x/+/y", "x/a/+"));
        assert!(filter_within("a/b", "+/+"));
        assert!(!filter_within("a/b/c", "+/+"));
        assert!(!filter_within("$SYS/#", "+/#"));
        assert!(!filter_within("$SYS/x", "#"));
        // Admin topics are like `$` topics: only a literal `admin` level
        // contains them.
        assert!(!filter_within("admin/#", "#"));
        assert!(!filter_within("admin/v1/x/request", "+/v1/+/request"));
        assert!(filter_within("admin/v1/x/request", "admin/+/+/request"));
        assert!(filter_within("administrator/x", "#"));
    }

    #[test]
    fn overlap() {
        let admin = "admin/#";
        for f in ["admin", "admin/v1/x/request", "admin/+", "admin/#"] {
            assert!(filters_overlap(f, admin), "{f}");
            assert!(filters_overlap(admin, f), "{f}");
        }
        // A wildcard at the first level never reaches the admin topics.
        for f in [
            "#",
            "+",
            "+/#",
            "+/v1/#",
            "devices/#",
            "devices/+/+/#",
            "$SYS/#",
            "+/+/+/x/#",
        ] {
            assert!(!filters_overlap(f, admin), "{f}");
            assert!(!filters_overlap(admin, f), "{f}");
        }
        assert!(filters_overlap("#", "administrator/x"));
        assert!(!filters_overlap("a/b", "a/b/c"));
        assert!(filters_overlap("a/b", "a/b/#"));
        assert!(!filters_overlap("a/+", "a"));
        assert!(!filters_overlap("$SYS/x", "+/x"));
        assert_eq!(template_pattern("{ProductKey}/{DeviceKey}/#"), "+/+/#");
        assert_eq!(template_pattern("d/x{DeviceKey}/up"), "d/+/up");
    }

    #[test]
    fn deny_wins_over_the_lists() {
        let mut acl = Acl::both(vec!["#".into(), "admin/v1/x/#".into()]).denying(&["admin/#"]);
        acl.deny_subscribe.push("test/secret/#".into());
        acl.deny_publish.push("test/ro".into());
        assert!(acl.may_publish("devices/p/d"));
        assert!(acl.may_publish("test/secret/x"));
        assert!(!acl.may_publish("test/ro"));
        assert!(!acl.may_publish("admin/v1/x/request"));
        assert!(!acl.may_publish("admin"));
        for f in [
            "admin/#",
            "admin/v1/x/response",
            "$share/g/admin/v1/#",
            "test/secret",
            "test/secret/+",
            "$share/g/test/secret/x",
        ] {
            assert_eq!(
                acl.check_subscribe(f),
                SubscribeVerdict::NotAuthorized,
                "{f}"
            );
        }
        // Filters overlapping a denied one are allowed; what they would
        // bring from the denied topics is not delivered.
        for f in [
            "#",
            "+",
            "+/v1/+/request",
            "test/+/x",
            "devices/#",
            "test/ro",
        ] {
            assert_eq!(acl.check_subscribe(f), SubscribeVerdict::Allowed, "{f}");
        }
        assert!(!acl.may_receive("test/secret/x"));
        assert!(!acl.may_receive("admin/v1/x/response"));
        assert!(acl.may_receive("test/ro"));
    }

    #[test]
    fn device_acl() {
        let acl = Acl::device("p", "d");
        assert_eq!(acl.publish, vec!["devices/p/d/#".to_owned()]);
        assert!(acl.may_publish("devices/p/d/telemetry"));
        assert!(acl.may_publish("devices/p/d"));
        assert!(!acl.may_publish("devices/p/d2/telemetry"));
        assert!(!acl.may_publish("admin/v1/x/request"));
        assert!(!acl.may_publish("devices/p/d/+"));
        for f in [
            "#",
            "+/#",
            "devices/p/other/#",
            "admin/#",
            "$SYS/#",
            "devices/+/d/#",
        ] {
            assert_eq!(
                acl.check_subscribe(f),
                SubscribeVerdict::NotAuthorized,
                "{f}"
            );
        }
        assert_eq!(
            acl.check_subscribe("devices/p/d/+/x"),
            SubscribeVerdict::Allowed
        );
        assert_eq!(
            acl.check_subscribe("$share/g/devices/p/d/#"),
            SubscribeVerdict::Allowed
        );
        assert_eq!(
            acl.check_subscribe("$share/g/#"),
            SubscribeVerdict::NotAuthorized
        );
        assert_eq!(acl.check_subscribe("$share/g"), SubscribeVerdict::Invalid);
        assert_eq!(acl.check_subscribe("a/#/b"), SubscribeVerdict::Invalid);
    }

    #[test]
    fn templates() {
        let t = AclTemplate {
            publish: vec!["devices/{ProductKey}/{DeviceKey}/up/#".into()],
            subscribe: vec!["devices/{ProductKey}/{DeviceKey}/down/#".into()],
        };
        let acl = t
            .render(&[("ProductKey", "p"), ("DeviceKey", "d:1")])
            .expect("renders");
        assert_eq!(acl.publish, vec!["devices/p/d:1/up/#".to_owned()]);
        assert_eq!(acl.subscribe, vec!["devices/p/d:1/down/#".to_owned()]);
        assert_eq!(
            t.render(&[("ProductKey", "p"), ("DeviceKey", "#")]),
            Err(AclError::UnsafeValue("#".into()))
        );
        assert_eq!(
            t.render(&[("ProductKey", "p")]),
            Err(AclError::UnknownPlaceholder("DeviceKey".into()))
        );
        assert!(AclTemplate::both(&["a/{X"]).validate(&["X"]).is_err());
        assert!(AclTemplate::both(&["a/{X}#"]).validate(&["X"]).is_err());
        assert!(AclTemplate::default()
            .validate(&["ProductKey", "DeviceKey"])
            .is_ok());
    }
}
