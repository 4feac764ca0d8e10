//! `pp assertion`: the assertion and the token request the gateway would send for a user,
//! made by the plugin's own code from the plugin's own configuration. The first thing to
//! run when a target refuses: it shows what the target receives, without a proxy.

use principal_propagation::config::PluginConfig;
use principal_propagation::credentials::saml_bearer;
use principal_propagation::identity;
use principal_propagation::oauth::token_request;
use rand_core::{OsRng, RngCore};
use serde_json::Value;
use sha2::{Digest, Sha256};
use std::time::{SystemTime, UNIX_EPOCH};

pub const USAGE: &str = "usage: pp assertion --config <plugin.json> --destination <name> (--claims '<JSON>' | --jwt <JWT>)
                    [--out <file>] [--exchange true [--ca <pem>]]

Prints the SAML assertion the gateway would send for the user with these claims (a JWT's
payload is read without verifying it), readable, with the digest of its canonical bytes,
and the token request it would POST, with the password, configured header and body values
and the assertion itself left out. The configuration is read as the plugin reads it: keys
named by `*Env` come from this process's environment. --out writes the signed assertion
as sent (one line, before its base64 encoding), for a verifier such as xmlsec1 or `pp
check`. Nothing is sent unless --exchange true: then the request goes to tokenServiceURL
(TLS verified against Mozilla's roots, or only the CA in --ca) and the answer is printed
with its tokens left out.";

/// Form fields whose values are not secrets.
const PLAIN_FIELDS: [&str; 4] = ["grant_type", "client_id", "scope", "company_id"];

pub fn run(args: &[String]) -> Result<String, String> {
    let options = crate::parse_options(args)?;
    let get = |name: &str| options.get(name).map(String::as_str);
    let required = |name: &str| get(name).ok_or_else(|| format!("--{name} is required\n{USAGE}"));
    let path = required("config")?;
    let bytes = std::fs::read(path).map_err(|e| format!("{path}: {e}"))?;
    let env = |name: &str| std::env::var(name).ok();
    let config = PluginConfig::parse(&bytes, &env).map_err(|e| format!("{path}: {e}"))?;
    let name = required("destination")?;
    let dest = config
        .destination(name)
        .ok_or_else(|| format!("no destination {name:?} in {path}"))?;
    let Some(saml) = dest.saml() else {
        return Err(format!(
            "{name} is a PrincipalPropagation destination: its credential is a client certificate \
             (see `pp keys sample-certificate`)"
        ));
    };
    if let Some(service) = &saml.assertion_service {
        return Err(format!(
            "{name} takes its assertion from the identity provider at {} (on-behalf-of); the \
             gateway signs none",
            service.url.full
        ));
    }
    let claims = match (get("claims"), get("jwt")) {
        (Some(json), None) => serde_json::from_str(json).map_err(|e| format!("--claims: {e}"))?,
        (None, Some(jwt)) => jwt_payload(jwt)?,
        _ => return Err(format!("give --claims or --jwt\n{USAGE}")),
    };
    let principal =
        identity::principal(&dest.user_id, &claims).map_err(|e| format!("the user: {e}"))?;
    let attributes = saml_bearer::attributes_for(&claims, dest, saml);
    let now_ms = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_err(|e| e.to_string())?
        .as_millis() as u64;
    let mut random = [0u8; 16];
    OsRng.fill_bytes(&mut random);
    let id = saml_bearer::assertion_id(&random);
    let signed = saml_bearer::start(
        &config,
        dest,
        saml,
        &principal.user_id,
        &attributes,
        now_ms,
        &id,
    )
    .map_err(|e| format!("cannot write the assertion: {e:?}"))?
    .finish()
    .map_err(|e| format!("cannot sign the assertion: {e:?}"))?;
    let request = token_request::build(saml, &signed);
    if let Some(out) = get("out") {
        std::fs::write(out, &signed).map_err(|e| format!("{out}: {e}"))?;
    }

    let exchange = match get("exchange") {
        None | Some("false") => None,
        Some("true") => Some(exchange(&request, saml, get("ca"))),
        Some(_) => return Err("--exchange must be true or false".into()),
    };
    let mut out = format!(
        "# destination {name}: user id {:?} (rule {:?}), key {:?}\n\n## The assertion\n\n{}\n\n",
        principal.user_id,
        dest.user_id,
        dest.key_name,
        readable(&signed)
    );
    out.push_str(&digest_lines(&signed));
    out.push_str("\n## The token request\n\n");
    out.push_str(&request_lines(&request, saml));
    if let Some(answer) = exchange {
        out.push_str("\n## The answer\n\n");
        out.push_str(&answer?);
    }
    Ok(out)
}

/// Answers larger than this are not read whole (the plugin's limit too).
const MAX_ANSWER_BYTES: u64 = 64 * 1024;
/// Fields of a token answer that are credentials.
const TOKEN_FIELDS: [&str; 3] = ["access_token", "refresh_token", "id_token"];

/// Sends `request` to the destination's token service; its status and answer, every
/// token in it left out.
fn exchange(
    request: &token_request::TokenRequest,
    saml: &principal_propagation::config::destination::SamlSettings,
    ca: Option<&str>,
) -> Result<String, String> {
    use std::sync::Arc;
    use ureq::tls::{parse_pem, PemItem, RootCerts, TlsConfig};
    let service = &saml.token_service;
    let header = |name: &str| {
        request
            .headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    };
    let scheme = service.url.full.split("://").next().unwrap_or("https");
    let url = format!(
        "{scheme}://{}{}",
        header(":authority").unwrap_or_default(),
        header(":path").unwrap_or("/")
    );
    let mut tls = TlsConfig::builder();
    if let Some(path) = ca {
        let pem = std::fs::read(path).map_err(|e| format!("--ca {path}: {e}"))?;
        let roots: Vec<_> = parse_pem(&pem)
            .filter_map(|item| match item {
                Ok(PemItem::Certificate(certificate)) => Some(certificate),
                _ => None,
            })
            .collect();
        if roots.is_empty() {
            return Err(format!("--ca {path}: no PEM certificate in it"));
        }
        tls = tls.root_certs(RootCerts::Specific(Arc::new(roots)));
    }
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .tls_config(tls.build())
        .http_status_as_error(false)
        .timeout_global(Some(std::time::Duration::from_millis(service.timeout_ms)))
        .build()
        .into();
    let mut post = agent.post(&url);
    for (name, value) in request.headers.iter().filter(|(n, _)| !n.starts_with(':')) {
        post = post.header(name, value);
    }
    let mut response = post
        .send(&request.body[..])
        .map_err(|e| format!("the exchange at {} failed: {e}", service.url.full))?;
    let status = response.status().as_u16();
    let body = response
        .body_mut()
        .with_config()
        .limit(MAX_ANSWER_BYTES)
        .read_to_string()
        .map_err(|e| format!("the answer could not be read: {e}"))?;
    Ok(format!("HTTP {status}\n{}\n", redacted_answer(&body)))
}

/// A token answer with every token replaced by its length; anything else shown as it is
/// (an error, a lifetime, a scope).
fn redacted_answer(body: &str) -> String {
    match serde_json::from_str::<Value>(body) {
        Ok(Value::Object(mut fields)) => {
            for name in TOKEN_FIELDS {
                if let Some(token) = fields.get_mut(name) {
                    let length = token.as_str().map_or(0, str::len);
                    *token = Value::String(format!("<{length} characters, not shown>"));
                }
            }
            serde_json::to_string_pretty(&Value::Object(fields)).unwrap_or_default()
        }
        _ => format!(
            "(not a JSON object; {} bytes, not shown: it may hold a token)",
            body.len()
        ),
    }
}

/// A JWT's payload, unverified (the operator's own token, for a look only).
fn jwt_payload(jwt: &str) -> Result<Value, String> {
    use base64::engine::general_purpose::URL_SAFE_NO_PAD;
    use base64::Engine;
    let payload = jwt
        .trim()
        .split('.')
        .nth(1)
        .ok_or("--jwt is not a JWT (three dot-separated parts)")?;
    let bytes = URL_SAFE_NO_PAD
        .decode(payload.trim_end_matches('='))
        .map_err(|e| format!("--jwt: the payload is not base64url: {e}"))?;
    serde_json::from_slice(&bytes).map_err(|e| format!("--jwt: the payload is not JSON: {e}"))
}

/// The canonical document one element per line, indented (a view: the signature covers
/// the one-line canonical bytes, whose digest follows). Canonical XML escapes `<` in text
/// and attributes and quotes attributes with `"`, so a tag ends at the first `>` outside
/// quotes.
pub fn readable(xml: &str) -> String {
    let mut out = String::with_capacity(xml.len() * 2);
    let mut depth = 0usize;
    let mut last_was_close = false;
    let mut rest = xml;
    while let Some(start) = rest.find('<') {
        out.push_str(&rest[..start]);
        let tag_len = tag_length(&rest[start..]);
        let tag = &rest[start..start + tag_len];
        if tag.starts_with("</") {
            depth = depth.saturating_sub(1);
            if last_was_close {
                out.push('\n');
                out.push_str(&"  ".repeat(depth));
            }
            last_was_close = true;
        } else {
            if !out.is_empty() {
                out.push('\n');
                out.push_str(&"  ".repeat(depth));
            }
            depth += 1;
            last_was_close = false;
        }
        out.push_str(tag);
        rest = &rest[start + tag_len..];
    }
    out.push_str(rest);
    out
}

/// Bytes up to and including the `>` that ends the tag at the start of `s`.
fn tag_length(s: &str) -> usize {
    let mut quoted = false;
    for (i, c) in s.char_indices() {
        match c {
            '"' => quoted = !quoted,
            '>' if !quoted => return i + 1,
            _ => {}
        }
    }
    s.len()
}

/// The digest the signature covers: SHA-256 of the assertion without its `ds:Signature`
/// (the enveloped transform), which the gateway writes in exclusive-canonical form
/// already; and whether `DigestValue` says the same.
fn digest_lines(signed: &str) -> String {
    use base64::engine::general_purpose::STANDARD;
    use base64::Engine;
    let without_signature = match (signed.find("<ds:Signature"), signed.find("</ds:Signature>")) {
        (Some(start), Some(end)) => format!(
            "{}{}",
            &signed[..start],
            &signed[end + "</ds:Signature>".len()..]
        ),
        _ => return "no ds:Signature found\n".into(),
    };
    let digest = STANDARD.encode(Sha256::digest(without_signature.as_bytes()));
    let stated = signed
        .split_once("<ds:DigestValue>")
        .and_then(|(_, rest)| rest.split_once("</ds:DigestValue>"))
        .map_or("", |(value, _)| value);
    format!(
        "SHA-256 of the assertion's {} canonical bytes without its signature (the enveloped \
         transform): {digest} ({} DigestValue)\n",
        without_signature.len(),
        if stated == digest {
            "equals"
        } else {
            "DIFFERS FROM"
        }
    )
}

/// The request as it goes out, with every secret left out.
fn request_lines(
    request: &token_request::TokenRequest,
    saml: &principal_propagation::config::destination::SamlSettings,
) -> String {
    let service = &saml.token_service;
    let mut out = format!(
        "POST {} (cluster {}, timeout {} ms)\n",
        service.url.full, service.cluster, service.timeout_ms
    );
    for (name, _) in &service.queries {
        out.push_str(&format!("  query {name}=<configured value, not shown>\n"));
    }
    for (name, value) in &request.headers {
        let shown = match name.as_str() {
            ":method" | ":path" | ":authority" => continue,
            "authorization" => match &service.basic_auth {
                Some((user, _)) => format!("Basic <client {user:?}, password not shown>"),
                None => "<not shown>".into(),
            },
            "content-type" | "accept" => value.clone(),
            _ => "<configured value, not shown>".into(),
        };
        out.push_str(&format!("{name}: {shown}\n"));
    }
    out.push('\n');
    for (name, value) in form_urlencoded::parse(&request.body) {
        let shown = match name.as_ref() {
            "assertion" => format!(
                "<the assertion above, {} characters of {}>",
                value.len(),
                match saml.encoding {
                    principal_propagation::config::AssertionEncoding::Base64Url =>
                        "base64url without padding",
                    principal_propagation::config::AssertionEncoding::Base64 => "base64",
                }
            ),
            field if PLAIN_FIELDS.contains(&field) => value.into_owned(),
            _ => "<configured value, not shown>".into(),
        };
        out.push_str(&format!("  {name}={shown}\n"));
    }
    out
}
