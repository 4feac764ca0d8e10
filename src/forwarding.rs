//! What a propagated request carries to the backend: exactly one credential, the one the
//! gateway injects. Every inbound credential a backend might accept is removed first:
//! another `Authorization`-like header, a forwarded client certificate (SAP ICM logs a
//! user on from one when it comes from a trusted proxy, and certificates are public), an
//! SAP logon ticket (header or cookie), or a credential in the query (a JWT sent as
//! `?access_token=` would otherwise land in the backend's URLs and logs).
//!
//! The proxy-wasm layer reads the request's headers once, as the host serializes them
//! ([`crate::pairs`]: bytes, which a client may fill with anything), and applies the
//! [`Edit`]s this module computes; the `Authorization` header itself it replaces (or
//! removes while the request waits for its token).

use crate::http_url::append_query;

/// Headers removed from every propagated request (lower case; a trailing `*` matches a
/// prefix). `authorization` is not listed: the gateway replaces it. `ssl-client-cert*`
/// too: CGI-style servers read a dash as the underscore (`HTTP_SSL_CLIENT_CERT`).
pub const DEFAULT_HEADERS: [&str; 7] = [
    "proxy-authorization",
    "x-user-token",
    "ssl_client_cert*",
    "ssl-client-cert*",
    "x-ssl-client-cert",
    "x-forwarded-client-cert",
    "mysapsso2",
];

/// Cookies removed from every propagated request (SAP logon and assertion tickets).
pub const DEFAULT_COOKIES: [&str; 1] = ["MYSAPSSO2"];

/// Query parameters removed from every propagated request.
pub const DEFAULT_QUERY_PARAMETERS: [&str; 3] = ["sap-user", "sap-password", "access_token"];

/// Request headers the gateway or Envoy owns: never removed, whatever a prefix matches
/// (the request would break, or the gateway sets them itself: `authorization` is
/// replaced), and never set by a destination's header families.
pub const GATEWAY_HEADERS: [&str; 7] = [
    "authorization",
    "host",
    "content-length",
    "content-type",
    "transfer-encoding",
    "connection",
    "te",
];

/// What a destination removes: the defaults above plus its own additions. Names are
/// compared without regard to ASCII case (backends differ, and SAP's are case-blind).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Removal {
    /// Lower-case header names; a trailing `*` matches every header with that prefix.
    pub headers: Vec<String>,
    /// Lower-case cookie names.
    pub cookies: Vec<String>,
    /// Lower-case query parameter names (compared after percent-decoding).
    pub query_parameters: Vec<String>,
}

impl Removal {
    /// The defaults extended by a destination's own lists.
    pub fn with_extra(headers: &[String], cookies: &[String], query_parameters: &[String]) -> Self {
        let merge = |defaults: &[&str], extra: &[String]| {
            let mut all: Vec<String> = defaults
                .iter()
                .map(|s| s.to_ascii_lowercase())
                .chain(extra.iter().map(|s| s.to_ascii_lowercase()))
                .collect();
            all.sort();
            all.dedup();
            all
        };
        Removal {
            headers: merge(&DEFAULT_HEADERS, headers),
            cookies: merge(&DEFAULT_COOKIES, cookies),
            query_parameters: merge(&DEFAULT_QUERY_PARAMETERS, query_parameters),
        }
    }

    /// Also removes the header `name` (unless a pattern covers it already).
    pub fn add_header(&mut self, name: &str) {
        let name = name.to_ascii_lowercase();
        if !self.removes_header(name.as_bytes()) {
            self.headers.push(name);
            self.headers.sort();
        }
    }

    fn removes_header(&self, name: &[u8]) -> bool {
        // `cookie` is filtered cookie by cookie, never removed whole by a pattern.
        if name.starts_with(b":")
            || name.eq_ignore_ascii_case(b"cookie")
            || GATEWAY_HEADERS
                .iter()
                .any(|n| name.eq_ignore_ascii_case(n.as_bytes()))
        {
            return false;
        }
        self.headers
            .iter()
            .any(|pattern| match pattern.strip_suffix('*') {
                Some(prefix) => name
                    .get(..prefix.len())
                    .is_some_and(|start| start.eq_ignore_ascii_case(prefix.as_bytes())),
                None => name.eq_ignore_ascii_case(pattern.as_bytes()),
            })
    }
}

impl Default for Removal {
    fn default() -> Self {
        Removal::with_extra(&[], &[], &[])
    }
}

/// A change to the request's headers: names in lower case, values as bytes (a client's
/// cookie or path need not be UTF-8, and what is kept of them keeps its bytes).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Edit {
    Remove(String),
    Set(String, Vec<u8>),
}

/// What the destination adds to a propagated request (`URL.headers.<k>`,
/// `URL.queries.<k>`).
pub struct Additions<'a> {
    pub headers: &'a [(String, String)],
    pub queries: &'a [(String, String)],
}

/// The edits that turn `headers` (the request as received, pseudo-headers included) into
/// the request the backend gets, `Authorization` aside: removed credentials, the cookie
/// header without ticket cookies, the path without credential parameters and with the
/// destination's own (which replace a client's parameter of the same name), and the
/// destination's headers. Removals come first, so an added header is never removed.
pub fn edits(headers: &[(&[u8], &[u8])], removal: &Removal, add: &Additions<'_>) -> Vec<Edit> {
    let mut edits = Vec::new();
    let mut removed: Vec<&[u8]> = Vec::new();
    let mut cookies: Vec<&[u8]> = Vec::new();
    let mut cookie_dropped = false;
    let mut path = None;
    for &(name, value) in headers {
        if name.eq_ignore_ascii_case(b"cookie") {
            for cookie in value.split(|b| *b == b';').map(<[u8]>::trim_ascii) {
                if cookie.is_empty() {
                    continue;
                }
                let cookie_name = cookie
                    .split(|b| *b == b'=')
                    .next()
                    .unwrap_or_default()
                    .trim_ascii();
                if removal
                    .cookies
                    .iter()
                    .any(|c| c.as_bytes().eq_ignore_ascii_case(cookie_name))
                {
                    cookie_dropped = true;
                } else {
                    cookies.push(cookie);
                }
            }
        } else if name == b":path" {
            path = Some(value);
        } else if removal.removes_header(name)
            && !removed.iter().any(|r| r.eq_ignore_ascii_case(name))
        {
            removed.push(name);
            edits.push(Edit::Remove(
                String::from_utf8_lossy(name).to_ascii_lowercase(),
            ));
        }
    }
    if cookie_dropped {
        edits.push(if cookies.is_empty() {
            Edit::Remove("cookie".into())
        } else {
            Edit::Set("cookie".into(), cookies.join(&b"; "[..]))
        });
    }
    if let Some(path) = path {
        if let Some(rewritten) = rewrite_query(path, &removal.query_parameters, add.queries) {
            edits.push(Edit::Set(":path".into(), rewritten));
        }
    }
    for (name, value) in add.headers {
        edits.push(Edit::Set(name.clone(), value.clone().into_bytes()));
    }
    edits
}

/// `path` without the query parameters named in `remove` or `add`, with `add` appended;
/// `None` if that is `path` as it is. Kept parameters keep their bytes exactly (a backend
/// may tell `+` from `%20`).
fn rewrite_query(path: &[u8], remove: &[String], add: &[(String, String)]) -> Option<Vec<u8>> {
    let (base, query) = match path.iter().position(|b| *b == b'?') {
        Some(at) => (&path[..at], &path[at + 1..]),
        None => (path, &b""[..]),
    };
    let mut kept: Vec<&[u8]> = Vec::new();
    let mut dropped = false;
    for pair in query.split(|b| *b == b'&').filter(|p| !p.is_empty()) {
        let name = parameter_name(pair);
        let named = |n: &str| name.eq_ignore_ascii_case(n);
        if remove.iter().any(|n| named(n)) || add.iter().any(|(n, _)| named(n)) {
            dropped = true;
        } else {
            kept.push(pair);
        }
    }
    if !dropped && add.is_empty() {
        return None;
    }
    let mut rewritten = base.to_vec();
    if !kept.is_empty() {
        rewritten.push(b'?');
        rewritten.extend(kept.join(&b'&'));
    }
    if !add.is_empty() {
        // The appended part is form-encoded ASCII; what comes before keeps its bytes.
        let appended = append_query("", add);
        rewritten.push(if kept.is_empty() { b'?' } else { b'&' });
        rewritten.extend_from_slice(appended.trim_start_matches('?').as_bytes());
    }
    Some(rewritten)
}

/// A query parameter's name, percent- and `+`-decoded (`sap%2Duser` is `sap-user`).
fn parameter_name(pair: &[u8]) -> String {
    let raw = pair.split(|b| *b == b'=').next().unwrap_or_default();
    form_urlencoded::parse(raw)
        .next()
        .map(|(name, _)| name.into_owned())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request<'a>(pairs: &[(&'a str, &'a str)]) -> Vec<(&'a [u8], &'a [u8])> {
        pairs
            .iter()
            .map(|(n, v)| (n.as_bytes(), v.as_bytes()))
            .collect()
    }

    fn set(name: &str, value: &str) -> Edit {
        Edit::Set(name.into(), value.as_bytes().to_vec())
    }

    const NOTHING: Additions<'static> = Additions {
        headers: &[],
        queries: &[],
    };

    #[test]
    fn every_default_credential_header_is_removed_and_nothing_else() {
        let headers = request(&[
            (":path", "/a"),
            ("authorization", "Bearer user-jwt"),
            ("proxy-authorization", "Basic eDp5"),
            ("x-user-token", "jwt"),
            ("ssl_client_cert", "MIIB"),
            ("ssl_client_cert_chain_0", "MIIC"),
            ("SSL_CLIENT_CERT_CHAIN_12", "MIID"),
            ("SSL-Client-Cert", "MIIF"),
            ("x-ssl-client-cert", "MIIE"),
            ("x-forwarded-client-cert", "By=a;Hash=b"),
            ("mysapsso2", "AjQxMDMBABhE"),
            ("accept", "application/json"),
            ("x-ssl-client-cert-extra", "kept: not a listed name"),
        ]);
        let edits = edits(&headers, &Removal::default(), &NOTHING);
        let removed: Vec<&str> = edits
            .iter()
            .map(|e| match e {
                Edit::Remove(n) => n.as_str(),
                Edit::Set(n, _) => panic!("unexpected set of {n}"),
            })
            .collect();
        assert_eq!(
            removed,
            [
                "proxy-authorization",
                "x-user-token",
                "ssl_client_cert",
                "ssl_client_cert_chain_0",
                "ssl_client_cert_chain_12",
                "ssl-client-cert",
                "x-ssl-client-cert",
                "x-forwarded-client-cert",
                "mysapsso2"
            ]
        );
    }

    #[test]
    fn a_plain_request_needs_no_edit() {
        let headers = request(&[(":path", "/a?b=c"), ("cookie", "session=1")]);
        assert!(edits(&headers, &Removal::default(), &NOTHING).is_empty());
    }

    #[test]
    fn ticket_cookies_go_and_the_others_keep_their_bytes() {
        let headers = request(&[("cookie", "a=1; MYSAPSSO2=AjQx; b=2; mysapsso2=x")]);
        assert_eq!(
            edits(&headers, &Removal::default(), &NOTHING),
            [set("cookie", "a=1; b=2")]
        );
        let only = request(&[("cookie", "MYSAPSSO2=AjQx")]);
        assert_eq!(
            edits(&only, &Removal::default(), &NOTHING),
            [Edit::Remove("cookie".into())]
        );
        let odd: Vec<(&[u8], &[u8])> = vec![(b"cookie", b"caf\xe9=1; MYSAPSSO2=x")];
        assert_eq!(
            edits(&odd, &Removal::default(), &NOTHING),
            [Edit::Set("cookie".into(), b"caf\xe9=1".to_vec())]
        );
    }

    #[test]
    fn credential_parameters_leave_the_query_however_they_are_spelled() {
        let headers = request(&[(
            ":path",
            "/odata?$filter=a%20eq%20'x+y'&sap-user=ALICE&SAP-PASSWORD=pw&sap%2Duser=B&access_token=eyJ&top=1",
        )]);
        assert_eq!(
            edits(&headers, &Removal::default(), &NOTHING),
            [set(":path", "/odata?$filter=a%20eq%20'x+y'&top=1")]
        );
        let only = request(&[(":path", "/x?access_token=eyJ")]);
        assert_eq!(
            edits(&only, &Removal::default(), &NOTHING),
            [set(":path", "/x")]
        );
    }

    #[test]
    fn the_destinations_parameters_replace_the_clients_own() {
        let queries = [("sap-client".to_string(), "100".to_string())];
        let add = Additions {
            headers: &[],
            queries: &queries,
        };
        let headers = request(&[(":path", "/a?sap-client=999&x=1")]);
        assert_eq!(
            edits(&headers, &Removal::default(), &add),
            [set(":path", "/a?x=1&sap-client=100")]
        );
        let bare = request(&[(":path", "/a")]);
        assert_eq!(
            edits(&bare, &Removal::default(), &add),
            [set(":path", "/a?sap-client=100")]
        );
        let odd: Vec<(&[u8], &[u8])> = vec![(b":path", b"/caf\xe9?sap-client=1")];
        assert_eq!(
            edits(&odd, &Removal::default(), &add),
            [Edit::Set(
                ":path".into(),
                b"/caf\xe9?sap-client=100".to_vec()
            )]
        );
    }

    #[test]
    fn a_destination_extends_the_lists_and_its_headers_come_last() {
        let removal = Removal::with_extra(
            &["X-Api-Key".into(), "x-legacy-*".into()],
            &["JSESSIONID".into()],
            &["apikey".into()],
        );
        let added = [("x-api-key".to_string(), "gateway".to_string())];
        let add = Additions {
            headers: &added,
            queries: &[],
        };
        let headers = request(&[
            (":path", "/a?apikey=k&b=1"),
            ("x-api-key", "client"),
            ("x-legacy-user", "u"),
            ("cookie", "JSESSIONID=s; c=1"),
        ]);
        assert_eq!(
            edits(&headers, &removal, &add),
            [
                Edit::Remove("x-api-key".into()),
                Edit::Remove("x-legacy-user".into()),
                set("cookie", "c=1"),
                set(":path", "/a?b=1"),
                set("x-api-key", "gateway"),
            ]
        );
    }
}
