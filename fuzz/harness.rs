#![allow(dead_code)] // each fuzz target uses one function of this file
//! One function per fuzz target: each takes untrusted bytes the way the plugin gets
//! them and checks what must hold for any input. Shared by the `cargo fuzz` targets
//! (`fuzz/fuzz_targets/*.rs`) and by `tests/fuzz_corpus.rs`, which replays the saved
//! corpus and every crash found on the stable toolchain inside `make test`.

use principal_propagation::cache::{CacheKey, Entry};
use principal_propagation::config::PluginConfig;
use principal_propagation::coordination::notice::Message;
use principal_propagation::coordination::slot;
use principal_propagation::destination_api::{Answer, ApiSettings, Exposure, TokenPart, API_PATH};
use principal_propagation::forwarding::{self, Additions, Edit, Removal};
use principal_propagation::http_url::HttpUrl;
use principal_propagation::identity::{self, attributes, payload, UserIdRule};
use principal_propagation::keys::SigningKey;
use principal_propagation::oauth::token_response;
use principal_propagation::saml::assertion::write;
use principal_propagation::saml::signature::sign_enveloped;
use principal_propagation::trust::download;
use quick_xml::escape::resolve_predefined_entity;
use quick_xml::events::Event;
use quick_xml::Reader;
use serde_json::Value;
use std::sync::OnceLock;

#[path = "../tests/common/sample.rs"]
#[allow(dead_code)] // the golden samples are not used here
mod sample;

/// The targets, by name (the directory names under `fuzz/corpus/`).
/// What a target checks: it panics when the input breaks a rule.
pub type Check = fn(&[u8]);

pub const TARGETS: [(&str, Check); 11] = [
    ("config", config),
    ("metadata_claims", metadata_claims),
    ("json_claims", json_claims),
    ("token_response", token_response),
    ("cache_entry", cache_entry),
    ("http_url", http_url),
    ("trust_path", trust_path),
    ("forwarding", forwarding),
    ("payload_pairs", payload_pairs),
    ("subject", subject),
    ("destination_api", destination_api),
];

const KEY: &str = include_str!("../tests/fixtures/signing-key.pem");
const CERT: &str = include_str!("../tests/fixtures/signing-cert.pem");

/// The value `*Env` references other than keys and certificates resolve to.
const PASSWORD: &str = "pa55-w0rd-from-env";

/// `*Env` references resolve to the test key, its certificate, or a password.
fn env(name: &str) -> Option<String> {
    Some(if name.contains("KEY") {
        KEY.to_string()
    } else if name.contains("CERT") {
        CERT.to_string()
    } else {
        PASSWORD.to_string()
    })
}

/// Plugin configuration (the JSON Envoy hands to `on_configure`): accepted or refused
/// with a message naming a key, never a panic, never a secret value in the message.
pub fn config(data: &[u8]) {
    if let Err(e) = PluginConfig::parse(data, &env) {
        let message = e.to_string();
        assert!(message.starts_with("configuration key `"), "{message}");
        let key_material = KEY.lines().filter(|l| !l.starts_with("-----"));
        assert!(
            !message.contains(PASSWORD) && key_material.clone().all(|l| !message.contains(l)),
            "a secret in a refusal"
        );
    }
}

/// Envoy's request metadata (protobuf) as the plugin reads it, then claims → assertion.
pub fn metadata_claims(data: &[u8]) {
    if let Some(claims) =
        payload::claims_from_metadata(data, "envoy.filters.http.jwt_authn", "payload")
    {
        assertion_from_claims(&claims);
    }
}

/// Any JSON as the verified payload, then claims → assertion.
pub fn json_claims(data: &[u8]) {
    if let Ok(claims) = serde_json::from_slice::<Value>(data) {
        assertion_from_claims(&claims);
    }
}

/// The P-256 test key: signing is not what these targets explore, and it is many times
/// faster than RSA (the golden tests pin both algorithms' signatures).
fn signing_key() -> &'static SigningKey {
    static KEY_PAIR: OnceLock<SigningKey> = OnceLock::new();
    KEY_PAIR.get_or_init(|| {
        SigningKey::from_pem(
            include_str!("../tests/fixtures/ec-key.pem"),
            include_str!("../tests/fixtures/ec-cert.pem"),
        )
        .expect("the P-256 test key pair")
    })
}

/// For every user id rule: either no user id (a 401), or an assertion that is
/// well-formed XML whose NameID reads back as exactly the user id.
fn assertion_from_claims(claims: &Value) {
    let rules = [
        UserIdRule::claim("user_name").expect("a claim name"),
        UserIdRule::claim("$.ext.user").expect("a JSON path"),
    ];
    for rule in &rules {
        let Ok(user_id) = identity::user_id(rule, claims) else {
            continue;
        };
        let attributes = attributes::from_claims(claims, false, false);
        let content = sample::content(&user_id, None, &attributes);
        // A user id XML cannot carry is refused (401) before anything is written.
        let Ok(unsigned) = write(&content) else {
            continue;
        };
        let signed =
            sign_enveloped(&unsigned, content.id, signing_key(), false).expect("a signature");
        assert_eq!(name_id_of(&signed).as_deref(), Some(user_id.as_str()));
    }
}

/// True if `xml` is well-formed and has a root element (panics on malformed XML).
fn has_root_element(xml: &str) -> bool {
    let mut reader = Reader::from_str(xml);
    loop {
        match reader.read_event().expect("well-formed XML") {
            Event::Start(_) | Event::Empty(_) => return true,
            Event::Eof => return false,
            _ => {}
        }
    }
}

/// The NameID text of a well-formed document (panics on malformed XML).
fn name_id_of(xml: &str) -> Option<String> {
    let mut reader = Reader::from_str(xml);
    let (mut inside, mut text, mut found) = (false, String::new(), None);
    loop {
        match reader.read_event().expect("well-formed XML") {
            Event::Start(e) if e.local_name().as_ref() == b"NameID" => inside = true,
            Event::Text(t) if inside => text.push_str(&t.xml10_content().expect("UTF-8")),
            Event::GeneralRef(r) if inside => {
                match r.resolve_char_ref().expect("a valid reference") {
                    Some(c) => text.push(c),
                    None => {
                        let name = r.decode().expect("UTF-8");
                        text.push_str(
                            resolve_predefined_entity(&name).expect("a predefined entity"),
                        );
                    }
                }
            }
            Event::CData(c) if inside => text.push_str(std::str::from_utf8(&c).expect("UTF-8")),
            Event::End(e) if e.local_name().as_ref() == b"NameID" => {
                inside = false;
                found = Some(std::mem::take(&mut text));
            }
            Event::Eof => return found,
            _ => {}
        }
    }
}

/// A token endpoint's answer: 2 bytes of status, the rest the body. A token comes only
/// from a 2xx answer and is never empty.
pub fn token_response(data: &[u8]) {
    let (status, body) = match data {
        [hi, lo, body @ ..] => (u16::from_be_bytes([*hi, *lo]), body),
        _ => return,
    };
    if let Ok(token) = token_response::parse(Some(status), body) {
        assert!((200..300).contains(&status), "a token from status {status}");
        assert!(!token.access_token.is_empty());
        assert!(token.expires_in_s <= token_response::MAX_LIFETIME_S);
    }
    assert!(
        token_response::parse(None, body).is_err(),
        "a token without a status"
    );
}

/// Shared data and queue messages as another VM (or anything) left them: a slot (lock
/// and entry) or an entry decodes to nothing or to an entry of this key that encodes back
/// to itself; a worker message decodes or not, and a notice encodes back to the same bytes.
pub fn cache_entry(data: &[u8]) {
    if let Some(Message::Notice(notice)) = Message::decode(data) {
        assert_eq!(notice.encode().as_slice(), data);
    }
    let key = CacheKey::new("namespace", "user", 100_000);
    let id_len = key.id.len();
    // Past the id checks (of an entry, and of an entry after a slot's lock), into the rest.
    let mut as_entry = data.to_vec();
    if as_entry.len() > id_len {
        as_entry[1..=id_len].copy_from_slice(&key.id);
    }
    let mut as_slot = data.to_vec();
    if as_slot.len() > slot::LOCK_LEN + id_len {
        as_slot[0] = slot::FORMAT;
        as_slot[slot::LOCK_LEN + 1..=slot::LOCK_LEN + id_len].copy_from_slice(&key.id);
    }
    for bytes in [data, as_entry.as_slice(), as_slot.as_slice()] {
        let entries = [Entry::decode(bytes, &key), slot::entry_in(bytes, &key)];
        for entry in entries.into_iter().flatten() {
            assert!(Entry::decode(&entry.encode(&key), &key) == Some(entry));
        }
    }
}

/// URLs from the configuration: parsed or refused, never a panic.
pub fn http_url(data: &[u8]) {
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = HttpUrl::parse(text);
    }
}

fn trust_config() -> &'static PluginConfig {
    static CONFIG: OnceLock<PluginConfig> = OnceLock::new();
    CONFIG.get_or_init(|| {
        let json = serde_json::json!({
            // `spare` is a key no destination signs with.
            "keys": {"default": {"active": {"privateKeyEnv": "KEY_A", "certificateEnv": "CERT_A"},
                                 "passive": {"privateKeyEnv": "KEY_B", "certificateEnv": "CERT_B"}},
                     "spare": {"privateKeyEnv": "KEY_C", "certificateEnv": "CERT_C"}},
            "trustMetadataPath": "/.well-known/saml-idp-metadata",
            "tokenServiceCluster": "ts",
            "destinations": [{"Name": "d", "Authentication": "OAuth2SAMLBearerAssertion",
                              "tokenServiceURL": "https://ts.example/oauth/token", "audience": "a",
                              "assertionIssuer": "gateway"}]
        });
        PluginConfig::parse(json.to_string().as_bytes(), &env)
            .expect("the trust test configuration")
    })
}

/// A request path under the trust download prefix: an answer or nothing; never private
/// key material; metadata only as a well-formed document with a root element.
pub fn trust_path(data: &[u8]) {
    let Ok(path) = std::str::from_utf8(data) else {
        return;
    };
    for path in [
        path.to_string(),
        format!("/.well-known/saml-idp-metadata{path}"),
    ] {
        if let Some(answer) = download::answer(trust_config(), &path, "https://gw.example") {
            assert!(!answer.body.contains("PRIVATE KEY"));
            if answer.content_type == "application/samlmetadata+xml" {
                assert!(
                    has_root_element(&answer.body),
                    "metadata without a root element"
                );
            }
        }
    }
}

/// A client's request headers (lines `name: value`, the first `:path`) as the plugin
/// forwards them: whatever they hold, no credential it removes survives the edits, and
/// the destination's own query parameter appears exactly once.
pub fn forwarding(data: &[u8]) {
    // Bytes as a client may send them (header values need not be UTF-8).
    let mut lines = data.split(|b| *b == b'\n');
    let path = [b"/".as_slice(), lines.next().unwrap_or_default()].concat();
    let mut raw: Vec<(&[u8], &[u8])> = lines
        .filter_map(|line| {
            let at = line.iter().position(|b| *b == b':')?;
            Some((line[..at].trim_ascii(), line[at + 1..].trim_ascii()))
        })
        .filter(|(n, _)| !n.is_empty())
        .collect();
    raw.push((b":path", &path));
    let lossy = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
    let headers: Vec<(String, String)> = raw.iter().map(|(n, v)| (lossy(n), lossy(v))).collect();
    let removal = Removal::default();
    let queries = [("sap-client".to_string(), "100".to_string())];
    let add = Additions {
        headers: &[],
        queries: &queries,
    };
    let edits = forwarding::edits(&raw, &removal, &add);
    let mut after = headers.clone();
    for edit in &edits {
        match edit {
            Edit::Remove(name) => after.retain(|(n, _)| !n.eq_ignore_ascii_case(name)),
            Edit::Set(name, value) => {
                after.retain(|(n, _)| !n.eq_ignore_ascii_case(name));
                after.push((name.clone(), String::from_utf8_lossy(value).into_owned()));
            }
        }
    }
    for (name, value) in &after {
        let lower = name.to_ascii_lowercase();
        assert!(
            !forwarding::DEFAULT_HEADERS
                .iter()
                .any(|h| match h.strip_suffix('*') {
                    Some(prefix) => lower.starts_with(prefix),
                    None => lower == *h,
                }),
            "{name} survived"
        );
        if lower == "cookie" {
            for cookie in value.split(';') {
                let cookie = cookie.split('=').next().unwrap_or_default().trim();
                assert!(!cookie.eq_ignore_ascii_case("MYSAPSSO2"), "{value}");
            }
        }
    }
    let path = &after
        .iter()
        .rev()
        .find(|(n, _)| n == ":path")
        .expect("a path")
        .1;
    let query = path.split_once('?').map_or("", |(_, q)| q);
    let names: Vec<String> = form_urlencoded::parse(query.as_bytes())
        .map(|(n, _)| n.to_ascii_lowercase())
        .collect();
    for removed in forwarding::DEFAULT_QUERY_PARAMETERS {
        assert!(!names.iter().any(|n| n == removed), "{path}");
    }
    assert_eq!(
        names.iter().filter(|n| *n == "sap-client").count(),
        1,
        "{path}"
    );
}

/// The verified payload as Envoy hands over one property (pairs): read as root claims,
/// the quick principal, where there is one, is made of strings fit for XML.
pub fn payload_pairs(data: &[u8]) {
    let Some(pairs) = payload::root_claims(data) else {
        return;
    };
    for rule in [
        UserIdRule::claim("user_name").expect("a rule"),
        UserIdRule::claim("$.ext.id").expect("a rule"),
        UserIdRule::SystemUser("TECH".into()),
    ] {
        if let Some(principal) = identity::principal_from_raw(&rule, &pairs) {
            let parts = [
                Some(&principal.user_id),
                principal.issuer.as_ref(),
                principal.origin.as_ref(),
            ];
            for part in parts.into_iter().flatten() {
                assert!(principal_propagation::saml::canonical::is_xml_text(part));
            }
        }
    }
}

/// A subject pattern (first line) and the user's claims (the rest, JSON) → the user's
/// certificate subject: refused, or a name whose every value fits a DN, that encodes and
/// decodes to itself, and whose certificate the builder writes.
pub fn subject(data: &[u8]) {
    use principal_propagation::x509::authority::{self, Authority, Request};
    use principal_propagation::x509::subject::{SubjectPattern, NAME_CLAIMS};
    use x509_cert::der::{Decode, Encode};
    let text = String::from_utf8_lossy(data);
    let (pattern, claims) = text.split_once('\n').unwrap_or((&text, "{}"));
    let Ok(pattern) = SubjectPattern::parse(pattern) else {
        return;
    };
    let Ok(claims) = serde_json::from_str::<Value>(claims) else {
        return;
    };
    let Ok(name) = pattern.resolve(&claims, &UserIdRule::first_claim(&NAME_CLAIMS)) else {
        return;
    };
    let der = name.to_der().expect("a subject encodes");
    assert_eq!(
        x509_cert::name::Name::from_der(&der).expect("and decodes"),
        name
    );
    for rdn in name.0.iter() {
        assert_eq!(rdn.0.len(), 1, "one attribute per RDN");
        for atv in rdn.0.iter() {
            let value = std::str::from_utf8(atv.value.value()).expect("text");
            assert!(
                !value.trim().is_empty() && !value.chars().any(char::is_control),
                "{value:?}"
            );
            assert!(value.chars().count() <= 255);
        }
    }
    static CA: OnceLock<Authority> = OnceLock::new();
    let ca = CA.get_or_init(|| {
        let key = SigningKey::from_pem(
            include_str!("../tests/fixtures/ca-ec-key.pem"),
            include_str!("../tests/fixtures/ca-ec-cert.pem"),
        )
        .expect("test CA");
        Authority::of(&key).expect("a CA")
    });
    static HOLDER: OnceLock<x509_cert::spki::SubjectPublicKeyInfoOwned> = OnceLock::new();
    let holder = HOLDER.get_or_init(|| {
        let der = include_bytes!("../tests/fixtures/ca-ec-cert.pem");
        let pem = std::str::from_utf8(der).expect("PEM");
        use x509_cert::der::DecodePem;
        x509_cert::Certificate::from_pem(pem)
            .expect("certificate")
            .tbs_certificate
            .subject_public_key_info
    });
    let unsigned = authority::write(
        ca,
        &Request {
            subject: name,
            holder_key: holder,
            serial: [1; 16],
            not_before_s: 1_800_000_000,
            not_after_s: 1_800_000_600,
        },
    )
    .expect("a certificate for any subject that resolved");
    assert!(!unsigned.to_be_signed.is_empty());
}

/// A request path for the find-destination API, and any text in its answer: a call only
/// under the API's path, naming a destination by one whole segment; every answer is
/// JSON that carries the text as it was and never a property outside the allow-list.
pub fn destination_api(data: &[u8]) {
    let api = ApiSettings::parse(&serde_json::json!({"pathPrefix": "/gw"})).expect("settings");
    let under = [b"/gw".as_slice(), API_PATH.as_bytes()].concat();
    for path in [data.to_vec(), [under.as_slice(), data].concat()] {
        if let Some(call) = api.call(&path) {
            assert!(path.starts_with(&under), "a call outside the API's path");
            if let Some(name) = &call.name {
                assert!(!name.is_empty() && !name.contains('/'), "{name:?}");
            }
        }
    }
    let text = String::from_utf8_lossy(data).into_owned();
    let raw = serde_json::json!({"Name": text, "URL": text, "tokenServicePassword": text, "exposeToClients": [text]});
    let exposure = Exposure::of(raw.as_object().expect("an object"), vec![text.clone()]);
    let answer = Answer::new(&text, &exposure, Some(&text));
    let token = TokenPart::Token {
        token: text.clone(),
        header_value: text.clone(),
        expires_in: 1,
    };
    for part in [token, TokenPart::Error(text.clone()), TokenPart::Skipped] {
        let body: Value = serde_json::from_str(&answer.body(&part)).expect("the answer is JSON");
        assert_eq!(body["owner"]["SubaccountId"], text.as_str());
        let shown = body["destinationConfiguration"]
            .as_object()
            .expect("an object");
        assert_eq!(shown.len(), 2, "only Name and URL are exposed");
        assert_eq!(shown["Name"], text.as_str());
    }
}
