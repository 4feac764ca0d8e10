//! `pp check`: every rule a target applies to a SAML bearer assertion, each passed or
//! failed with the actual and the expected value. For any assertion: the gateway's, or one
//! an identity provider issued (Entra ID on-behalf-of), so the signature is verified by
//! xmlsec1, a well-kept XML-DSig implementation, never by re-running the gateway's signer.

use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use base64::Engine;
use principal_propagation::config::profile::TargetProfile;
use principal_propagation::config::PluginConfig;
use quick_xml::escape::resolve_predefined_entity;
use quick_xml::events::Event;
use quick_xml::name::ResolveResult;
use quick_xml::NsReader;
use std::io::Read;
use std::process::{Command, Stdio};
use std::time::{SystemTime, UNIX_EPOCH};
use x509_cert::der::DecodePem;

pub const USAGE: &str =
    "usage: pp check (--cert <pem> | --config <plugin.json> --destination <name>)
                [--profile s4hana-cloud|abap|successfactors|xsuaa|salesforce]
                [--issuer <i>] [--audience <a>] [--recipient <url>] [--name-id-format <urn>]
                [--at <RFC 3339 time>] [--skew <seconds>] [--max-age <seconds>] <file or ->

Checks a SAML 2.0 bearer assertion the way token servers do and prints every rule, passed
or failed, with the actual and the expected value. The input is the assertion as XML, as
base64 or base64url, or a captured token request's form body (its `assertion` field).
Expected values come from the flags, else from the destination (--config, its keys named
by `*Env` read from this environment): assertionIssuer, audience, assertionRecipient,
nameIdFormat and the certificate of its key. --at is the clock (default now), --skew the
tolerance either way (default 60), --max-age how old IssueInstant may be (default 3000,
XSUAA's order). --profile (default: the destination's targetProfile) adds that target's
own rules. The signature is verified by xmlsec1 (Debian package xmlsec1).
Exit status: 0 when every rule passes, 1 when one fails, 2 when the check cannot run.";

const SAML: &[u8] = b"urn:oasis:names:tc:SAML:2.0:assertion";
const DS: &[u8] = b"http://www.w3.org/2000/09/xmldsig#";
const BEARER: &str = "urn:oasis:names:tc:SAML:2.0:cm:bearer";

/// The result of `pp check`: the report, and whether every rule passed.
pub struct Report {
    pub text: String,
    pub passed: bool,
}

/// What the rules expect.
#[derive(Default)]
struct Expected {
    issuer: Option<String>,
    audience: Option<String>,
    recipient: Option<String>,
    name_id_format: Option<String>,
    certificate_pem: String,
    profile: Option<TargetProfile>,
}

pub fn run(args: &[String]) -> Result<Report, String> {
    let (input_path, flags) = match args.split_last() {
        Some((last, rest)) if !last.starts_with("--") && rest.len() % 2 == 0 => {
            (last.as_str(), rest)
        }
        _ => return Err(format!("the assertion's file (or -) comes last\n{USAGE}")),
    };
    let options = crate::parse_options(flags)?;
    let get = |name: &str| options.get(name).cloned();
    let mut expected = Expected::default();
    if let (Some(path), Some(name)) = (get("config"), get("destination")) {
        let bytes = std::fs::read(&path).map_err(|e| format!("{path}: {e}"))?;
        let env = |n: &str| std::env::var(n).ok();
        let config = PluginConfig::parse(&bytes, &env).map_err(|e| format!("{path}: {e}"))?;
        let dest = config
            .destination(&name)
            .ok_or_else(|| format!("no destination {name:?} in {path}"))?;
        let saml = dest
            .saml()
            .ok_or_else(|| format!("{name} is not an OAuth2SAMLBearerAssertion destination"))?;
        if saml.assertion_service.is_none() {
            expected.issuer = Some(saml.assertion_issuer.clone());
            expected.name_id_format = Some(saml.name_id_format.clone());
            if let Some(key) = config.keys.get(&dest.key_name) {
                expected.certificate_pem = key.active.certificate().pem();
            }
        }
        expected.audience = Some(saml.audience.clone());
        expected.profile = saml.target_profile;
        expected.recipient = Some(saml.assertion_recipient.clone());
    } else if get("config").is_some() || get("destination").is_some() {
        return Err("--config and --destination go together".into());
    }
    for (flag, slot) in [
        ("issuer", &mut expected.issuer),
        ("audience", &mut expected.audience),
        ("recipient", &mut expected.recipient),
        ("name-id-format", &mut expected.name_id_format),
    ] {
        if let Some(value) = get(flag) {
            *slot = Some(value);
        }
    }
    if let Some(name) = get("profile") {
        expected.profile = Some(TargetProfile::parse(&name).ok_or(format!(
            "--profile {name:?}: the profiles are {}",
            principal_propagation::config::profile::NAMES.join(", ")
        ))?);
    }
    if let Some(path) = get("cert") {
        expected.certificate_pem =
            std::fs::read_to_string(&path).map_err(|e| format!("{path}: {e}"))?;
    }
    if expected.certificate_pem.is_empty() {
        return Err(format!(
            "give --cert, or a gateway-signed destination\n{USAGE}"
        ));
    }
    let now_s = match get("at") {
        Some(at) => parse_time(&at).ok_or(format!("--at {at:?} is not an RFC 3339 time"))?,
        None => SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_err(|e| e.to_string())?
            .as_secs_f64(),
    };
    let seconds = |flag: &str, default: f64| -> Result<f64, String> {
        get(flag).map_or(Ok(default), |v| {
            v.parse::<u32>()
                .map(f64::from)
                .map_err(|_| format!("--{flag} must be a whole number of seconds"))
        })
    };
    let skew = seconds("skew", 60.0)?;
    let max_age = seconds("max-age", 3000.0)?;

    let mut raw = Vec::new();
    if input_path == "-" {
        std::io::stdin()
            .read_to_end(&mut raw)
            .map_err(|e| format!("stdin: {e}"))?;
    } else {
        raw = std::fs::read(input_path).map_err(|e| format!("{input_path}: {e}"))?;
    }
    let (xml, encoding) = decode_input(&raw)?;
    let doc = parse(&xml)?;
    let mut rules = Rules::default();
    check(&doc, &xml, &expected, now_s, skew, max_age, &mut rules);
    if let Some(profile) = expected.profile {
        profile_rules(profile, &doc, &expected, encoding, &mut rules);
    }
    Ok(Report {
        passed: rules.failed == 0,
        text: rules.finish(),
    })
}

/// How the assertion was given.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Encoding {
    Xml,
    Base64Url,
    Base64,
}

/// The assertion's XML from what was given: XML, base64 or base64url of it, or a form body
/// with an `assertion` field.
fn decode_input(raw: &[u8]) -> Result<(Vec<u8>, Encoding), String> {
    let text = String::from_utf8_lossy(raw);
    let trimmed = text.trim();
    if trimmed.starts_with('<') {
        return Ok((trimmed.as_bytes().to_vec(), Encoding::Xml));
    }
    let encoded = if trimmed.contains("assertion=") {
        form_urlencoded::parse(trimmed.as_bytes())
            .find(|(k, _)| k == "assertion")
            .map(|(_, v)| v.into_owned())
            .ok_or("the form body has no assertion field")?
    } else {
        trimmed.to_string()
    };
    let compact: String = encoded.chars().filter(|c| !c.is_whitespace()).collect();
    let url_safe = !compact.contains(['+', '/', '=']);
    match URL_SAFE_NO_PAD.decode(&compact) {
        Ok(xml) if url_safe => Ok((xml, Encoding::Base64Url)),
        _ => STANDARD
            .decode(&compact)
            .map(|xml| (xml, Encoding::Base64))
            .map_err(|_| "the input is neither XML nor base64/base64url of it".to_string()),
    }
}

/// The rules of one kind of target beyond the common ones (`docs/target-profiles.md`).
fn profile_rules(
    profile: TargetProfile,
    root: &Element,
    expected: &Expected,
    encoding: Encoding,
    rules: &mut Rules,
) {
    let name = profile.name();
    let issuer = root.child(SAML, "Issuer").map_or("", |i| i.text.trim());
    let audience = root
        .path(&[
            (SAML, "Conditions"),
            (SAML, "AudienceRestriction"),
            (SAML, "Audience"),
        ])
        .map_or("", |a| a.text.trim());
    let recipient = root
        .path(&[
            (SAML, "Subject"),
            (SAML, "SubjectConfirmation"),
            (SAML, "SubjectConfirmationData"),
        ])
        .and_then(|d| d.attribute("Recipient"))
        .unwrap_or("");
    let name_id = root
        .path(&[(SAML, "Subject"), (SAML, "NameID")])
        .map_or("", |n| n.text.trim());
    match profile {
        TargetProfile::S4HanaCloud => {
            let cn = certificate_cn(&expected.certificate_pem).unwrap_or_default();
            rules.rule(
                &format!("{name} Issuer is the certificate's CN"),
                issuer == cn,
                format!("{issuer:?} (the CN: {cn:?}, the communication system's provider name)"),
            );
            rules.rule(
                &format!("{name} Audience without -api"),
                !audience.contains("-api."),
                format!("{audience:?} (the SAML2 audience is the tenant URL without -api)"),
            );
        }
        TargetProfile::Abap => {
            rules.rule(
                &format!("{name} NameID without a colon"),
                !name_id.contains(':'),
                format!("{name_id:?} (AS ABAP maps no NameID with a colon)"),
            );
        }
        TargetProfile::SuccessFactors => {
            let api_key = root
                .child(SAML, "AttributeStatement")
                .and_then(|s| {
                    s.children
                        .iter()
                        .find(|a| a.is(SAML, "Attribute") && a.attribute("Name") == Some("api_key"))
                })
                .and_then(|a| a.child(SAML, "AttributeValue"))
                .map(|v| v.text.trim());
            rules.rule(
                &format!("{name} api_key attribute"),
                api_key.is_some_and(|k| !k.is_empty()),
                format!(
                    "{:?} (the OAuth client's API key, as SAP's sample writes it)",
                    api_key.unwrap_or("(none)")
                ),
            );
            rules.rule(
                &format!("{name} Audience"),
                audience == "www.successfactors.com",
                format!("{audience:?} (documented: \"www.successfactors.com\")"),
            );
        }
        TargetProfile::Xsuaa => {
            let alias = recipient
                .split_once("/oauth/token/alias/")
                .is_some_and(|(_, a)| !a.is_empty() && !a.contains('/'));
            rules.rule(
                &format!("{name} Recipient is the alias URL"),
                alias,
                format!("{recipient:?} (the subaccount's .../oauth/token/alias/<alias>)"),
            );
        }
        TargetProfile::Salesforce => {
            let method = root
                .path(&[
                    (DS, "Signature"),
                    (DS, "SignedInfo"),
                    (DS, "SignatureMethod"),
                ])
                .and_then(|m| m.attribute("Algorithm"))
                .unwrap_or("");
            rules.rule(
                &format!("{name} RSA signature"),
                method.ends_with("#rsa-sha256") || method.ends_with("#rsa-sha1"),
                format!("{method:?} (RSA with SHA-1 or SHA-256 only)"),
            );
            let audiences = [
                "https://login.salesforce.com",
                "https://test.salesforce.com",
            ];
            let audience_ok = audiences.contains(&audience);
            rules.rule(
                &format!("{name} Audience"),
                audience_ok,
                format!(
                    "{audience:?} (https://login.salesforce.com or https://test.salesforce.com)"
                ),
            );
            rules.rule(
                &format!("{name} Recipient matches the audience"),
                audience_ok && recipient == format!("{audience}/services/oauth2/token"),
                format!("{recipient:?} (<audience>/services/oauth2/token)"),
            );
            rules.rule(
                &format!("{name} base64url"),
                encoding != Encoding::Base64,
                format!("given as {encoding:?} (Salesforce wants base64url)"),
            );
        }
    }
}

/// The subject CN of a PEM certificate.
fn certificate_cn(pem: &str) -> Option<String> {
    let certificate = x509_cert::Certificate::from_pem(pem.trim()).ok()?;
    principal_propagation::keys::common_name(&certificate.tbs_certificate.subject)
}

/// An element: namespace, local name, attributes (unprefixed names), text, children.
#[derive(Default, Debug)]
struct Element {
    ns: Vec<u8>,
    name: String,
    attributes: Vec<(String, String)>,
    text: String,
    children: Vec<Element>,
}

impl Element {
    fn is(&self, ns: &[u8], name: &str) -> bool {
        self.ns == ns && self.name == name
    }

    fn child(&self, ns: &[u8], name: &str) -> Option<&Element> {
        self.children.iter().find(|c| c.is(ns, name))
    }

    fn path(&self, steps: &[(&[u8], &str)]) -> Option<&Element> {
        steps
            .iter()
            .try_fold(self, |element, (ns, name)| element.child(ns, name))
    }

    fn attribute(&self, name: &str) -> Option<&str> {
        self.attributes
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

/// The document's root element (a DTD or processing of entities is refused: an assertion
/// has none).
fn parse(xml: &[u8]) -> Result<Element, String> {
    let mut reader = NsReader::from_reader(xml);
    let mut stack: Vec<Element> = Vec::new();
    let mut buf = Vec::new();
    loop {
        let (ns, event) = reader
            .read_resolved_event_into(&mut buf)
            .map_err(|e| format!("not well-formed XML: {e}"))?;
        let ns = match ns {
            ResolveResult::Bound(ns) => ns.as_ref().to_vec(),
            _ => Vec::new(),
        };
        match event {
            Event::Start(ref e) | Event::Empty(ref e) => {
                let empty = matches!(event, Event::Empty(_));
                let mut element = Element {
                    ns,
                    name: String::from_utf8_lossy(e.local_name().as_ref()).into_owned(),
                    ..Element::default()
                };
                for attribute in e.attributes() {
                    let attribute = attribute.map_err(|e| format!("bad attribute: {e}"))?;
                    let key = attribute.key;
                    if key.as_ref().starts_with(b"xmlns") {
                        continue;
                    }
                    let value = attribute
                        .normalized_value(quick_xml::XmlVersion::Implicit1_0)
                        .map_err(|e| format!("bad attribute value: {e}"))?;
                    element.attributes.push((
                        String::from_utf8_lossy(key.local_name().as_ref()).into_owned(),
                        value.into_owned(),
                    ));
                }
                if empty {
                    match stack.last_mut() {
                        Some(parent) => parent.children.push(element),
                        None => return Ok(element),
                    }
                } else {
                    stack.push(element);
                }
            }
            Event::End(_) => {
                let element = stack.pop().ok_or("unbalanced XML")?;
                match stack.last_mut() {
                    Some(parent) => parent.children.push(element),
                    None => return Ok(element),
                }
            }
            Event::Text(t) => {
                if let Some(current) = stack.last_mut() {
                    let text = t.xml10_content().map_err(|e| format!("bad text: {e}"))?;
                    current.text.push_str(&text);
                }
            }
            Event::GeneralRef(r) => {
                if let Some(current) = stack.last_mut() {
                    let resolved = match r.resolve_char_ref() {
                        Ok(Some(c)) => c.to_string(),
                        _ => {
                            let name = r.decode().map_err(|e| format!("bad reference: {e}"))?;
                            resolve_predefined_entity(&name)
                                .ok_or(format!("unknown entity &{name};"))?
                                .to_string()
                        }
                    };
                    current.text.push_str(&resolved);
                }
            }
            Event::CData(t) => {
                if let Some(current) = stack.last_mut() {
                    current.text.push_str(&String::from_utf8_lossy(&t));
                }
            }
            Event::DocType(_) => return Err("a DOCTYPE is not allowed in an assertion".into()),
            Event::Eof => return Err("no root element".into()),
            _ => {}
        }
        buf.clear();
    }
}

/// The rules' outcomes, as lines.
#[derive(Default)]
struct Rules {
    lines: Vec<String>,
    failed: usize,
}

impl Rules {
    fn rule(&mut self, name: &str, passed: bool, detail: String) {
        if !passed {
            self.failed += 1;
        }
        let mark = if passed { "pass" } else { "FAIL" };
        self.lines.push(format!("{mark}  {name}: {detail}"));
    }

    /// A value against the expected one; without an expectation, shown and passed.
    fn equals(&mut self, name: &str, actual: Option<&str>, expected: Option<&str>) {
        let shown = actual.map_or("(none)".to_string(), |a| format!("{a:?}"));
        match expected {
            Some(expected) => self.rule(
                name,
                actual == Some(expected),
                format!("{shown} (expected {expected:?})"),
            ),
            None => self.rule(
                name,
                actual.is_some(),
                format!("{shown} (nothing expected given)"),
            ),
        }
    }

    fn finish(self) -> String {
        let summary = if self.failed == 0 {
            format!("all {} rules pass", self.lines.len())
        } else {
            format!("{} of {} rules FAIL", self.failed, self.lines.len())
        };
        format!("{}\n\n{summary}", self.lines.join("\n"))
    }
}

fn check(
    root: &Element,
    xml: &[u8],
    expected: &Expected,
    now: f64,
    skew: f64,
    max_age: f64,
    rules: &mut Rules,
) {
    rules.rule(
        "assertion",
        root.is(SAML, "Assertion") && root.attribute("Version") == Some("2.0"),
        format!(
            "root element {:?} version {:?} (expected a SAML 2.0 Assertion)",
            root.name,
            root.attribute("Version").unwrap_or("(none)")
        ),
    );
    signature_rules(root, xml, &expected.certificate_pem, rules);
    certificate_rule(&expected.certificate_pem, now, rules);

    let issuer = root.child(SAML, "Issuer").map(|i| i.text.trim());
    rules.equals("Issuer", issuer, expected.issuer.as_deref());
    let audiences: Vec<&str> = root
        .path(&[(SAML, "Conditions"), (SAML, "AudienceRestriction")])
        .map(|r| {
            r.children
                .iter()
                .filter(|a| a.is(SAML, "Audience"))
                .map(|a| a.text.trim())
                .collect()
        })
        .unwrap_or_default();
    let audience_ok = match &expected.audience {
        Some(wanted) => audiences.contains(&wanted.as_str()),
        None => !audiences.is_empty(),
    };
    rules.rule(
        "Audience",
        audience_ok,
        format!(
            "{audiences:?} (expected {})",
            expected
                .audience
                .as_deref()
                .map_or("one".into(), |a| format!("{a:?}"))
        ),
    );

    let name_id = root.path(&[(SAML, "Subject"), (SAML, "NameID")]);
    rules.rule(
        "NameID",
        name_id.is_some_and(|n| !n.text.trim().is_empty()),
        format!("{:?}", name_id.map_or("(none)", |n| n.text.as_str())),
    );
    rules.equals(
        "NameID Format",
        name_id.and_then(|n| n.attribute("Format")),
        expected.name_id_format.as_deref(),
    );

    let confirmations: Vec<&Element> = root
        .child(SAML, "Subject")
        .map(|s| {
            s.children
                .iter()
                .filter(|c| c.is(SAML, "SubjectConfirmation"))
                .collect()
        })
        .unwrap_or_default();
    let bearer = confirmations
        .iter()
        .find(|c| c.attribute("Method") == Some(BEARER));
    rules.rule(
        "bearer confirmation",
        bearer.is_some(),
        format!(
            "methods {:?} (expected {BEARER})",
            confirmations
                .iter()
                .map(|c| c.attribute("Method").unwrap_or("(none)"))
                .collect::<Vec<_>>()
        ),
    );
    let data = bearer.and_then(|b| b.child(SAML, "SubjectConfirmationData"));
    rules.equals(
        "Recipient",
        data.and_then(|d| d.attribute("Recipient")),
        expected.recipient.as_deref(),
    );
    rules.rule(
        "SubjectConfirmationData without NotBefore",
        data.is_some_and(|d| d.attribute("NotBefore").is_none()),
        format!(
            "NotBefore {:?} (a bearer confirmation must not have one: SAML profiles §4.1.4.2)",
            data.and_then(|d| d.attribute("NotBefore"))
                .unwrap_or("(none)")
        ),
    );
    time_rule(
        "SubjectConfirmationData NotOnOrAfter",
        data.and_then(|d| d.attribute("NotOnOrAfter")),
        |t| now - skew < t,
        now,
        "after the clock minus the skew",
        rules,
    );

    let conditions = root.child(SAML, "Conditions");
    time_rule(
        "Conditions NotBefore",
        conditions.and_then(|c| c.attribute("NotBefore")),
        |t| t <= now + skew,
        now,
        "not after the clock plus the skew",
        rules,
    );
    time_rule(
        "Conditions NotOnOrAfter",
        conditions.and_then(|c| c.attribute("NotOnOrAfter")),
        |t| now - skew < t,
        now,
        "after the clock minus the skew",
        rules,
    );
    let unknown: Vec<&str> = conditions
        .map(|c| {
            c.children
                .iter()
                .filter(|x| !x.is(SAML, "AudienceRestriction"))
                .map(|x| x.name.as_str())
                .collect()
        })
        .unwrap_or_default();
    rules.rule(
        "no other conditions",
        unknown.is_empty(),
        format!(
            "{unknown:?} (token servers refuse conditions they do not know, OneTimeUse included)"
        ),
    );
    time_rule(
        "IssueInstant",
        root.attribute("IssueInstant"),
        |t| t >= now - max_age - skew && t <= now + skew,
        now,
        &format!("at most {max_age} s old and not in the future (± the skew)"),
        rules,
    );
}

/// A time attribute against the clock.
fn time_rule(
    name: &str,
    value: Option<&str>,
    holds: impl Fn(f64) -> bool,
    now: f64,
    expectation: &str,
    rules: &mut Rules,
) {
    match value.map(|v| (v, parse_time(v))) {
        Some((text, Some(t))) => rules.rule(
            name,
            holds(t),
            format!(
                "{text} ({:+.0} s from the clock; expected {expectation})",
                t - now
            ),
        ),
        Some((text, None)) => rules.rule(name, false, format!("{text:?} is not an xs:dateTime")),
        None => rules.rule(name, false, "missing".into()),
    }
}

/// The one reference must sign the root assertion; xmlsec1 then checks its digest and the
/// signature with the given certificate.
fn signature_rules(root: &Element, xml: &[u8], certificate_pem: &str, rules: &mut Rules) {
    let signature = root.child(DS, "Signature");
    let references: Vec<&Element> = signature
        .and_then(|s| s.child(DS, "SignedInfo"))
        .map(|i| {
            i.children
                .iter()
                .filter(|r| r.is(DS, "Reference"))
                .collect()
        })
        .unwrap_or_default();
    let id = root.attribute("ID").unwrap_or_default();
    let uri = references.first().and_then(|r| r.attribute("URI"));
    rules.rule(
        "signed element",
        references.len() == 1 && uri == Some(&format!("#{id}")) && !id.is_empty(),
        format!(
            "{} reference(s), URI {:?} (expected one, to the assertion's ID {id:?})",
            references.len(),
            uri.unwrap_or("(none)")
        ),
    );
    match xmlsec1_verify(xml, certificate_pem) {
        Ok((ok, references_ok, verified)) => {
            rules.rule(
                "digest",
                references_ok,
                if references_ok {
                    "the signed content is unchanged".into()
                } else {
                    "the signed content was changed after signing (or another transform was used)"
                        .into()
                },
            );
            let detail = match (ok && verified, references_ok) {
                (true, _) => "valid for the certificate (xmlsec1)",
                (false, true) => {
                    "not made by the certificate's key, or the signed info was changed (xmlsec1)"
                }
                (false, false) => "not valid while the digest differs (xmlsec1)",
            };
            rules.rule("signature", ok && verified, detail.into());
        }
        Err(problem) => rules.rule("signature", false, problem),
    }
}

/// xmlsec1's verdict: (verified, every reference's digest matched, the status line said OK).
fn xmlsec1_verify(xml: &[u8], certificate_pem: &str) -> Result<(bool, bool, bool), String> {
    // The assertion is a bearer credential until it expires: a fresh directory only this
    // user can read (created, never reused, so no one else's directory or link is taken).
    use rand_core::{OsRng, RngCore};
    use std::os::unix::fs::DirBuilderExt;
    let dir = std::env::temp_dir().join(format!("pp-check-{:016x}", OsRng.next_u64()));
    std::fs::DirBuilder::new()
        .mode(0o700)
        .create(&dir)
        .map_err(|e| format!("{}: {e}", dir.display()))?;
    let (document, certificate) = (dir.join("assertion.xml"), dir.join("cert.pem"));
    let written =
        std::fs::write(&document, xml).and_then(|_| std::fs::write(&certificate, certificate_pem));
    let output = written.map_err(|e| e.to_string()).and_then(|_| {
        Command::new("xmlsec1")
            .args(["--verify", "--pubkey-cert-pem"])
            .arg(&certificate)
            .args([
                "--id-attr:ID",
                "urn:oasis:names:tc:SAML:2.0:assertion:Assertion",
            ])
            .arg(&document)
            .stdin(Stdio::null())
            .output()
            .map_err(|e| format!("cannot run xmlsec1 ({e}): install it (Debian package xmlsec1)"))
    });
    let _ = std::fs::remove_dir_all(&dir);
    let output = output?;
    let mut text = String::from_utf8_lossy(&output.stdout).into_owned();
    text.push_str(&String::from_utf8_lossy(&output.stderr));
    let references_ok = text
        .lines()
        .find_map(|l| l.strip_prefix("SignedInfo References (ok/all): "))
        .and_then(|counts| counts.split_once('/'))
        .is_some_and(|(ok, all)| ok == all && ok.trim() != "0");
    let said_ok = text.lines().any(|l| l.trim() == "OK");
    Ok((output.status.success(), references_ok, said_ok))
}

/// The certificate is valid at the clock (targets check it at each exchange).
fn certificate_rule(pem: &str, now: f64, rules: &mut Rules) {
    match x509_cert::Certificate::from_pem(pem.trim()) {
        Ok(certificate) => {
            let validity = &certificate.tbs_certificate.validity;
            let from = validity.not_before.to_unix_duration().as_secs_f64();
            let until = validity.not_after.to_unix_duration().as_secs_f64();
            rules.rule(
                "certificate validity",
                from <= now && now <= until,
                format!(
                    "{} to {} (the clock: {})",
                    validity.not_before,
                    validity.not_after,
                    principal_propagation::time::xs_date_time((now * 1000.0) as u64)
                ),
            );
        }
        Err(e) => rules.rule("certificate", false, format!("not a PEM certificate: {e}")),
    }
}

/// Seconds since the epoch of an xs:dateTime / RFC 3339 time in UTC (`Z`) or with an
/// offset.
fn parse_time(text: &str) -> Option<f64> {
    let text = text.trim();
    let (date, time) = text.split_once(['T', 't'])?;
    let mut d = date.splitn(3, '-').map(|p| p.parse::<i64>().ok());
    let (year, month, day) = (d.next()??, d.next()??, d.next()??);
    let (clock, offset_s) = if let Some(clock) = time.strip_suffix(['Z', 'z']) {
        (clock, 0)
    } else {
        let at = time.rfind(['+', '-'])?;
        let (clock, offset) = time.split_at(at);
        let sign = if offset.starts_with('-') { -1 } else { 1 };
        let (h, m) = offset[1..].split_once(':')?;
        (
            clock,
            sign * (h.parse::<i64>().ok()? * 3600 + m.parse::<i64>().ok()? * 60),
        )
    };
    let mut c = clock.splitn(3, ':');
    let (hour, minute) = (
        c.next()?.parse::<i64>().ok()?,
        c.next()?.parse::<i64>().ok()?,
    );
    let second = c.next()?.parse::<f64>().ok()?;
    if !(1..=12).contains(&month) || !(1..=31).contains(&day) || hour > 23 || minute > 59 {
        return None;
    }
    // Days from the civil date (Howard Hinnant's algorithm).
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (month + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    Some((days * 86_400 + hour * 3600 + minute * 60 - offset_s) as f64 + second)
}

#[cfg(test)]
mod tests {
    use super::parse_time;

    #[test]
    fn reads_xs_date_times() {
        assert_eq!(parse_time("1970-01-01T00:00:00Z"), Some(0.0));
        assert_eq!(
            parse_time("2026-12-06T17:58:08.255Z"),
            Some(1_796_579_888.255)
        );
        assert_eq!(
            parse_time("2026-12-06T18:58:08.255+01:00"),
            Some(1_796_579_888.255)
        );
        assert_eq!(parse_time("2000-03-01T00:00:00Z"), Some(951_868_800.0));
        assert_eq!(parse_time("2026-13-01T00:00:00Z"), None);
        assert_eq!(parse_time("yesterday"), None);
    }
}
