//! Which destination a request propagates to. Route metadata names it where the host can
//! set it per route (plain Envoy); Istio and Envoy Gateway cannot, and apply the plugin to
//! a whole gateway, so the plugin has its own ordered rules on the request's `:authority`,
//! path prefix and, optionally, a header; then the default destination. A request that
//! nothing selects passes through untouched, or is refused where the configuration says
//! everything behind this gateway must be propagated: a token meant for one backend must
//! never reach another.

use crate::config::values::{ConfigError, Section};
use serde_json::Value;

/// How a rule matches `:authority`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AuthorityMatch {
    /// Any authority.
    Any,
    /// This host (lower case; with a port, host and port).
    Exact(String),
    /// `*.example.com`: any host ending in `.example.com` (lower case, dot included).
    Suffix(String),
}

/// One rule: every condition it has must hold.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    pub authority: AuthorityMatch,
    /// The path (before any query) starts with this.
    pub path_prefix: Option<String>,
    /// This header (lower-case name) has exactly this value.
    pub header: Option<(String, String)>,
    /// Index into the configuration's destinations.
    pub destination: usize,
}

/// What to do with requests nothing selects.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unmatched {
    PassThrough,
    Refuse,
}

/// How requests find their destination.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Selection {
    pub rules: Vec<Rule>,
    pub default: Option<usize>,
    pub unmatched: Unmatched,
}

/// The outcome for one request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Selected {
    Destination(usize),
    /// Not for the plugin: forwarded untouched.
    PassThrough,
    /// Nothing selects it and the configuration refuses such requests.
    Refuse,
    /// The route names a destination that is not configured.
    UnknownName(String),
}

/// The parts of a request the rules look at.
pub trait RequestView {
    /// A request header (pseudo-headers included) by lower-case name, as bytes.
    fn header(&self, name: &str) -> Option<&[u8]>;
}

impl Selection {
    /// True when requests are matched by rules (the request's headers must be read).
    pub fn has_rules(&self) -> bool {
        !self.rules.is_empty()
    }

    /// The destination for a request whose route names `named` (its route metadata, if
    /// any), else by the rules over `request`, else the default; `index` finds a
    /// destination by name.
    pub fn select(
        &self,
        index: &dyn Fn(&str) -> Option<usize>,
        named: Option<&[u8]>,
        request: &dyn RequestView,
    ) -> Selected {
        if let Some(bytes) = named {
            let name = String::from_utf8_lossy(bytes);
            return match index(&name) {
                Some(index) => Selected::Destination(index),
                None => Selected::UnknownName(name.into_owned()),
            };
        }
        if let Some(rule) = self.rules.iter().find(|r| r.matches(request)) {
            return Selected::Destination(rule.destination);
        }
        match (self.default, self.unmatched) {
            (Some(index), _) => Selected::Destination(index),
            (None, Unmatched::PassThrough) => Selected::PassThrough,
            (None, Unmatched::Refuse) => Selected::Refuse,
        }
    }

    /// One line for the log at load: how this configuration selects.
    pub fn describe(&self, destinations: &[String]) -> String {
        let name = |i: usize| destinations.get(i).map_or("?", String::as_str);
        let mut steps = vec!["route metadata".to_string()];
        if !self.rules.is_empty() {
            let rules: Vec<String> = self
                .rules
                .iter()
                .map(|r| format!("{} -> {}", r.describe(), name(r.destination)))
                .collect();
            steps.push(format!("{} rule(s) [{}]", rules.len(), rules.join("; ")));
        }
        if let Some(default) = self.default {
            steps.push(format!("default destination {}", name(default)));
        }
        let unmatched = match (self.default, self.unmatched) {
            (Some(_), _) => "",
            (None, Unmatched::PassThrough) => "; other requests pass through untouched",
            (None, Unmatched::Refuse) => "; other requests are refused (403)",
        };
        format!(
            "selects destinations by {}{unmatched}",
            steps.join(", then ")
        )
    }
}

impl Rule {
    fn matches(&self, request: &dyn RequestView) -> bool {
        let authority_ok = match &self.authority {
            AuthorityMatch::Any => true,
            AuthorityMatch::Exact(wanted) => request
                .header(":authority")
                .is_some_and(|a| authority_is(a, wanted)),
            AuthorityMatch::Suffix(suffix) => request
                .header(":authority")
                .is_some_and(|a| ends_with_ignore_case(host_of(a, suffix.contains(':')), suffix)),
        };
        authority_ok
            && self.path_prefix.as_ref().is_none_or(|prefix| {
                request.header(":path").is_some_and(|path| {
                    let path = path.split(|b| *b == b'?').next().unwrap_or_default();
                    path.starts_with(prefix.as_bytes())
                })
            })
            && self
                .header
                .as_ref()
                .is_none_or(|(name, value)| request.header(name) == Some(value.as_bytes()))
    }

    fn describe(&self) -> String {
        let mut parts = Vec::new();
        match &self.authority {
            AuthorityMatch::Any => {}
            AuthorityMatch::Exact(host) => parts.push(format!("authority {host}")),
            AuthorityMatch::Suffix(suffix) => parts.push(format!("authority *{suffix}")),
        }
        if let Some(prefix) = &self.path_prefix {
            parts.push(format!("path {prefix}*"));
        }
        if let Some((name, value)) = &self.header {
            parts.push(format!("{name}: {value}"));
        }
        if parts.is_empty() {
            "any request".into()
        } else {
            parts.join(" and ")
        }
    }
}

/// The authority's host, without a port unless `with_port`.
fn host_of(authority: &[u8], with_port: bool) -> &[u8] {
    if with_port {
        return authority;
    }
    // An IPv6 literal keeps its brackets: `[::1]:8443` → `[::1]`.
    let end = match authority.iter().rposition(|b| *b == b':') {
        Some(colon) if !authority[colon..].contains(&b']') => colon,
        _ => authority.len(),
    };
    &authority[..end]
}

/// True if `authority` is `wanted` (a host, or host and port when `wanted` has one).
fn authority_is(authority: &[u8], wanted: &str) -> bool {
    host_of(authority, wanted.contains(':') && !wanted.ends_with(']'))
        .eq_ignore_ascii_case(wanted.as_bytes())
}

fn ends_with_ignore_case(text: &[u8], suffix: &str) -> bool {
    text.len() > suffix.len()
        && text[text.len() - suffix.len()..].eq_ignore_ascii_case(suffix.as_bytes())
}

/// Reads `destinationRules` and `unmatchedRequests` of the configuration's `top` section;
/// `index` resolves a destination's name.
pub fn parse(
    top: &Section<'_>,
    default: Option<usize>,
    index: &dyn Fn(&str) -> Option<usize>,
) -> Result<Selection, ConfigError> {
    let unmatched = match top.string("unmatchedRequests")?.as_deref() {
        None | Some("passThrough") => Unmatched::PassThrough,
        Some("refuse") => Unmatched::Refuse,
        Some(_) => {
            return Err(ConfigError::new(
                "unmatchedRequests",
                "must be passThrough or refuse",
            ))
        }
    };
    let rules = match top.fields.get("destinationRules") {
        None => Vec::new(),
        Some(Value::Array(list)) => list
            .iter()
            .enumerate()
            .map(|(i, value)| rule(&format!("destinationRules[{i}]"), value, index))
            .collect::<Result<_, _>>()?,
        Some(_) => {
            return Err(ConfigError::new(
                "destinationRules",
                "must be a list of rules",
            ))
        }
    };
    Ok(Selection {
        rules,
        default,
        unmatched,
    })
}

const RULE_KEYS: [&str; 4] = ["destination", "authority", "pathPrefix", "header"];

fn rule(
    path: &str,
    value: &Value,
    index: &dyn Fn(&str) -> Option<usize>,
) -> Result<Rule, ConfigError> {
    let r = Section::new(path, value)?;
    if let Some(key) = r.fields.keys().find(|k| !RULE_KEYS.contains(&k.as_str())) {
        return Err(ConfigError::new(
            r.key(key),
            "is not a rule field (destination, authority, pathPrefix, header)",
        ));
    }
    let name = r.required_string("destination")?;
    let destination = index(&name).ok_or_else(|| {
        ConfigError::new(
            r.key("destination"),
            format!("names no destination: {name:?}"),
        )
    })?;
    let authority = match r.string("authority")? {
        None => AuthorityMatch::Any,
        Some(text) => authority_match(&text)
            .map_err(|problem| ConfigError::new(r.key("authority"), problem))?,
    };
    let path_prefix = r.string("pathPrefix")?;
    if path_prefix
        .as_ref()
        .is_some_and(|p| !p.starts_with('/') || p.contains(['?', '#']))
    {
        return Err(ConfigError::new(
            r.key("pathPrefix"),
            "must start with / and hold no query or fragment",
        ));
    }
    let header = match r.fields.get("header") {
        None => None,
        Some(value) => {
            let h = Section::new(r.key("header"), value)?;
            let name = h.required_string("name")?.to_ascii_lowercase();
            let valid = name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b));
            if !valid {
                return Err(ConfigError::new(
                    h.key("name"),
                    "is not an HTTP header name",
                ));
            }
            Some((name, h.required_string("value")?))
        }
    };
    Ok(Rule {
        authority,
        path_prefix,
        header,
        destination,
    })
}

/// `api.example.com`, `api.example.com:8443` or `*.example.com`.
fn authority_match(text: &str) -> Result<AuthorityMatch, &'static str> {
    let lower = text.to_ascii_lowercase();
    let (wildcard, host) = match lower.strip_prefix("*.") {
        Some(rest) => (true, rest),
        None => (false, lower.as_str()),
    };
    let valid = !host.is_empty()
        && host
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-.:[]".contains(&b))
        && !host.starts_with('.')
        && !host.contains("..");
    if !valid {
        return Err("must be a host (api.example.com), host:port, or *.domain");
    }
    Ok(if wildcard {
        AuthorityMatch::Suffix(format!(".{host}"))
    } else {
        AuthorityMatch::Exact(host.to_string())
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use std::collections::HashMap;

    struct Request(HashMap<&'static str, &'static str>);

    impl RequestView for Request {
        fn header(&self, name: &str) -> Option<&[u8]> {
            self.0.get(name).map(|v| v.as_bytes())
        }
    }

    fn request(authority: &'static str, path: &'static str) -> Request {
        Request(HashMap::from([(":authority", authority), (":path", path)]))
    }

    const NAMES: [&str; 3] = ["s4", "sf", "other"];

    fn names() -> Vec<String> {
        NAMES.iter().map(|s| s.to_string()).collect()
    }

    fn index(name: &str) -> Option<usize> {
        NAMES.iter().position(|d| *d == name)
    }

    fn selection(config: serde_json::Value) -> Result<Selection, ConfigError> {
        let top = Section::new("", &config).unwrap();
        let default = top
            .string("defaultDestination")
            .unwrap()
            .and_then(|n| NAMES.iter().position(|d| *d == n));
        parse(&top, default, &index)
    }

    #[test]
    fn route_metadata_then_the_first_matching_rule_then_the_default() {
        let s = selection(json!({"destinationRules": [
            {"authority": "api.example.com", "pathPrefix": "/sap/", "destination": "s4"},
            {"authority": "*.sf.example.com", "destination": "sf"},
            {"pathPrefix": "/x", "header": {"name": "X-Target", "value": "other"}, "destination": "other"}
        ]}))
        .unwrap();
        let n = names();
        let pick = |r: &Request| s.select(&index, None, r);
        assert_eq!(
            pick(&request("api.example.com", "/sap/opu?a")),
            Selected::Destination(0)
        );
        assert_eq!(
            pick(&request("API.Example.com:443", "/sap/x")),
            Selected::Destination(0)
        );
        assert_eq!(
            pick(&request("api.example.com", "/sapx")),
            Selected::PassThrough
        );
        assert_eq!(
            pick(&request("api.example.com", "/other?/sap/")),
            Selected::PassThrough
        );
        assert_eq!(
            pick(&request("evil-api.example.com", "/sap/")),
            Selected::PassThrough
        );
        assert_eq!(
            pick(&request("eu.sf.example.com", "/")),
            Selected::Destination(1)
        );
        assert_eq!(
            pick(&request("sf.example.com", "/")),
            Selected::PassThrough,
            "the apex is not *."
        );
        assert_eq!(
            pick(&request("eu.sf.example.com.evil", "/")),
            Selected::PassThrough
        );
        let mut with_header = request("h", "/x/1");
        assert_eq!(pick(&with_header), Selected::PassThrough);
        with_header.0.insert("x-target", "other");
        assert_eq!(pick(&with_header), Selected::Destination(2));
        // Route metadata comes first.
        assert_eq!(
            s.select(&index, Some(b"sf"), &request("api.example.com", "/sap/")),
            Selected::Destination(1)
        );
        assert_eq!(
            s.select(&index, Some(b"gone"), &request("api.example.com", "/sap/")),
            Selected::UnknownName("gone".into())
        );
        let log = s.describe(&n);
        assert!(
            log.contains("3 rule(s)")
                && log.contains("authority api.example.com and path /sap/* -> s4"),
            "{log}"
        );
        assert!(
            log.ends_with("other requests pass through untouched"),
            "{log}"
        );
    }

    #[test]
    fn unmatched_requests_go_to_the_default_or_are_refused_if_so_configured() {
        let n = names();
        let nothing = request("h", "/");
        let s = selection(json!({"defaultDestination": "other"})).unwrap();
        assert_eq!(s.select(&index, None, &nothing), Selected::Destination(2));
        let s = selection(json!({"unmatchedRequests": "refuse",
                                 "destinationRules": [{"authority": "a", "destination": "s4"}]}))
        .unwrap();
        assert_eq!(s.select(&index, None, &nothing), Selected::Refuse);
        assert!(s.describe(&n).ends_with("other requests are refused (403)"));
        assert_eq!(
            selection(json!({})).unwrap().select(&index, None, &nothing),
            Selected::PassThrough
        );
    }

    #[test]
    fn ports_and_ipv6_literals() {
        let s = selection(json!({"destinationRules": [
            {"authority": "api.example.com:8443", "destination": "s4"},
            {"authority": "[::1]", "destination": "sf"}
        ]}))
        .unwrap();
        assert_eq!(
            s.select(&index, None, &request("api.example.com:8443", "/")),
            Selected::Destination(0)
        );
        assert_eq!(
            s.select(&index, None, &request("api.example.com", "/")),
            Selected::PassThrough
        );
        assert_eq!(
            s.select(&index, None, &request("[::1]:8080", "/")),
            Selected::Destination(1)
        );
        assert_eq!(
            s.select(&index, None, &request("[::1]", "/")),
            Selected::Destination(1)
        );
    }

    #[test]
    fn bad_rules_are_refused_naming_the_key() {
        let refused = |config| selection(config).unwrap_err().to_string();
        assert_eq!(
            refused(json!({"destinationRules": [{"destination": "nope"}]})),
            "configuration key `destinationRules[0].destination` names no destination: \"nope\""
        );
        assert_eq!(
            refused(json!({"destinationRules": [{"destination": "s4", "host": "a"}]})),
            "configuration key `destinationRules[0].host` is not a rule field (destination, authority, pathPrefix, header)"
        );
        assert_eq!(
            refused(json!({"destinationRules": [{"destination": "s4", "authority": "a b"}]})),
            "configuration key `destinationRules[0].authority` must be a host (api.example.com), host:port, or *.domain"
        );
        assert_eq!(
            refused(json!({"destinationRules": [{"destination": "s4", "pathPrefix": "sap"}]})),
            "configuration key `destinationRules[0].pathPrefix` must start with / and hold no query or fragment"
        );
        assert_eq!(
            refused(
                json!({"destinationRules": [{"destination": "s4", "header": {"name": "a b", "value": "x"}}]})
            ),
            "configuration key `destinationRules[0].header.name` is not an HTTP header name"
        );
        assert_eq!(
            refused(json!({"unmatchedRequests": "drop"})),
            "configuration key `unmatchedRequests` must be passThrough or refuse"
        );
        assert_eq!(
            refused(json!({"destinationRules": {"destination": "s4"}})),
            "configuration key `destinationRules` must be a list of rules"
        );
    }
}
