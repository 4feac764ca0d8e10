//! The few parts of an `http(s)` URL the plugin needs: authority and path with query.
//!
//! The token service is reached through an Envoy cluster, so only the `:authority` and
//! `:path` pseudo-headers are derived from the URL; a full URL parser would be dead weight.

/// An absolute `http` or `https` URL split into its request parts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpUrl {
    /// The URL exactly as configured (used as the default assertion recipient).
    pub full: String,
    /// Host and optional port, for `:authority`.
    pub authority: String,
    /// Path and query, for `:path` (at least `/`).
    pub path_and_query: String,
}

impl HttpUrl {
    /// Parses an absolute URL; refuses other schemes, user info, fragments and spaces.
    pub fn parse(url: &str) -> Result<Self, &'static str> {
        let rest = url
            .strip_prefix("https://")
            .or_else(|| url.strip_prefix("http://"))
            .ok_or("must be an absolute http:// or https:// URL")?;
        if url
            .chars()
            .any(|c| c.is_ascii_whitespace() || c.is_ascii_control())
        {
            return Err("must not contain spaces or control characters");
        }
        if url.contains('#') {
            return Err("must not contain a fragment (#)");
        }
        let split = rest.find(['/', '?']).unwrap_or(rest.len());
        let (authority, path) = rest.split_at(split);
        if authority.is_empty() {
            return Err("must name a host");
        }
        if authority.contains('@') {
            return Err("must not contain user info; use tokenServiceUser/tokenServicePassword");
        }
        let path_and_query = match path.chars().next() {
            None => "/".to_string(),
            Some('?') => format!("/{path}"),
            Some(_) => path.to_string(),
        };
        Ok(HttpUrl {
            full: url.to_string(),
            authority: authority.to_string(),
            path_and_query,
        })
    }
}

/// Appends form-encoded `name=value` pairs to a path that may already have a query.
pub fn append_query(path_and_query: &str, pairs: &[(String, String)]) -> String {
    if pairs.is_empty() {
        return path_and_query.to_string();
    }
    let mut encoded = form_urlencoded::Serializer::new(String::new());
    for (name, value) in pairs {
        encoded.append_pair(name, value);
    }
    let separator = match path_and_query.find('?') {
        None => "?",
        Some(i) if i + 1 == path_and_query.len() || path_and_query.ends_with('&') => "",
        Some(_) => "&",
    };
    format!("{path_and_query}{separator}{}", encoded.finish())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_authority_and_path() {
        let u = HttpUrl::parse("https://my1-api.s4hana.ondemand.com/sap/bc/sec/oauth2/token?a=1")
            .unwrap();
        assert_eq!(u.authority, "my1-api.s4hana.ondemand.com");
        assert_eq!(u.path_and_query, "/sap/bc/sec/oauth2/token?a=1");
        assert_eq!(HttpUrl::parse("http://h:8080").unwrap().path_and_query, "/");
        assert_eq!(
            HttpUrl::parse("http://h?x=1").unwrap().path_and_query,
            "/?x=1"
        );
    }

    #[test]
    fn refuses_what_is_not_a_plain_http_url() {
        for bad in [
            "ftp://h/",
            "h/path",
            "http:///x",
            "http://u:p@h/",
            "http://h/a b",
            "http://h/#f",
        ] {
            assert!(HttpUrl::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn appends_encoded_queries() {
        let pairs = vec![
            ("a b".to_string(), "x&y=z".to_string()),
            ("c".into(), "é".into()),
        ];
        assert_eq!(append_query("/p", &pairs), "/p?a+b=x%26y%3Dz&c=%C3%A9");
        assert_eq!(append_query("/p?q=1", &pairs[1..]), "/p?q=1&c=%C3%A9");
        assert_eq!(append_query("/p?", &pairs[1..]), "/p?c=%C3%A9");
        assert_eq!(append_query("/p", &[]), "/p");
    }
}
