//! Target profiles (`targetProfile`): what each kind of target documents and refuses, so
//! that a destination gets that target's defaults and a configuration the target would
//! refuse is refused at load, saying what to change, instead of an `invalid_grant` at the
//! first user's request. The rules and their sources: `docs/target-profiles.md` (only
//! vendor-documented rules, SAP's own wiki and the open-source UAA refuse; the rest are
//! notices).

use super::destination::{AssertionEncoding, Destination, SamlSettings, NAMEID_EMAIL};
use super::values::ConfigError;
use crate::keys::{KeyPair, ECDSA_SHA256};
use crate::saml::assertion::Attribute;
use serde_json::{Map, Value};
use std::collections::BTreeMap;

/// The profiles, by their `targetProfile` names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TargetProfile {
    /// SAP S/4HANA Cloud Public Edition (a communication system with an OAuth 2.0 IdP).
    S4HanaCloud,
    /// On-premise AS ABAP (SAML2 trusted provider, SOAUTH2 client).
    Abap,
    /// SAP SuccessFactors HXM Suite OData API.
    SuccessFactors,
    /// SAP BTP XSUAA (the subaccount's `…/oauth/token/alias/<alias>`).
    Xsuaa,
    /// Salesforce's SAML bearer assertion flow.
    Salesforce,
}

pub const NAMES: [&str; 5] = [
    "s4hana-cloud",
    "abap",
    "successfactors",
    "xsuaa",
    "salesforce",
];
const X509_AUTHN: &str = "urn:oasis:names:tc:SAML:2.0:ac:classes:X509";
const SUCCESSFACTORS: &str = "www.successfactors.com";
const SALESFORCE_AUDIENCES: [&str; 2] = [
    "https://login.salesforce.com",
    "https://test.salesforce.com",
];
const ABAP_TOKEN_PATH: &str = "/sap/bc/sec/oauth2/token";
const XSUAA_ALIAS_PATH: &str = "/oauth/token/alias/";

impl TargetProfile {
    pub fn parse(name: &str) -> Option<Self> {
        Some(match name {
            "s4hana-cloud" => TargetProfile::S4HanaCloud,
            "abap" => TargetProfile::Abap,
            "successfactors" => TargetProfile::SuccessFactors,
            "xsuaa" => TargetProfile::Xsuaa,
            "salesforce" => TargetProfile::Salesforce,
            _ => return None,
        })
    }

    pub fn name(self) -> &'static str {
        match self {
            TargetProfile::S4HanaCloud => NAMES[0],
            TargetProfile::Abap => NAMES[1],
            TargetProfile::SuccessFactors => NAMES[2],
            TargetProfile::Xsuaa => NAMES[3],
            TargetProfile::Salesforce => NAMES[4],
        }
    }

    /// Fills the target's documented defaults into `d` (a destination's properties) where
    /// the destination sets none.
    pub fn fill_defaults(self, d: &mut Map<String, Value>) {
        let text = |d: &Map<String, Value>, key: &str| {
            d.get(key).and_then(Value::as_str).map(str::to_string)
        };
        let default = |d: &mut Map<String, Value>, key: &str, value: Option<String>| {
            if let (None, Some(value)) = (d.get(key), value) {
                d.insert(key.to_string(), Value::String(value));
            }
        };
        match self {
            TargetProfile::S4HanaCloud => {
                default(d, "authnContextClassRef", Some(X509_AUTHN.into()));
                let user = text(d, "tokenServiceUser");
                default(d, "clientKey", user);
            }
            TargetProfile::Abap => {}
            TargetProfile::SuccessFactors => {
                default(d, "audience", Some(SUCCESSFACTORS.into()));
                default(d, "assertionIssuer", Some(SUCCESSFACTORS.into()));
                default(d, "samlAssertionEncoding", Some("base64".into()));
                let api_key = text(d, "apiKey");
                default(d, "clientKey", api_key);
            }
            TargetProfile::Xsuaa => {
                default(d, "nameIdFormat", Some(NAMEID_EMAIL.into()));
                let user = text(d, "tokenServiceUser");
                default(d, "clientKey", user);
            }
            TargetProfile::Salesforce => {
                default(d, "audience", Some(SALESFORCE_AUDIENCES[0].into()));
                let client = text(d, "clientKey");
                default(d, "assertionIssuer", client);
            }
        }
    }

    /// Attributes the target needs in every assertion: SuccessFactors' `api_key` (the API
    /// key, as SAP's sample generator writes it) and, with an e-mail NameID, `use_email`
    /// (else SuccessFactors reads the NameID as a user ID).
    pub fn fixed_attributes(self, saml: &SamlSettings) -> Vec<Attribute> {
        let attribute = |name: &str, value: &str| Attribute {
            name: name.into(),
            values: vec![value.into()],
        };
        match (self, saml.client_key.as_deref()) {
            (TargetProfile::SuccessFactors, Some(api_key)) => {
                let mut attributes = vec![attribute("api_key", api_key)];
                if saml.name_id_format == NAMEID_EMAIL {
                    attributes.push(attribute("use_email", "true"));
                }
                attributes
            }
            _ => Vec::new(),
        }
    }

    /// What the target refuses (an error naming the key and what to change), and what
    /// it may refuse (notices), for a destination parsed with this profile's defaults.
    pub fn check(
        self,
        path: &str,
        d: &Destination,
        raw: &Map<String, Value>,
        keys: &BTreeMap<String, KeyPair>,
        notices: &mut Vec<String>,
    ) -> Result<(), ConfigError> {
        let name = self.name();
        let key = |k: &str| format!("{path}.{k}");
        let refuse = |k: &str, problem: String| Err(ConfigError::new(key(k), problem));
        let Some(saml) = d.saml() else {
            return refuse(
                "targetProfile",
                format!("{name} applies to OAuth2SAMLBearerAssertion destinations only"),
            );
        };
        let mut notice = |text: String| notices.push(format!("{path} ({name}): {text}"));
        let signing = keys.get(&d.key_name).map(|k| &k.active);
        let ecdsa = signing.is_some_and(|k| k.signature_method() == ECDSA_SHA256);
        let basic_user = saml
            .token_service
            .basic_auth
            .as_ref()
            .map(|(u, _)| u.as_str());
        let token_path = saml
            .token_service
            .url
            .path_and_query
            .split('?')
            .next()
            .unwrap_or("");
        let gateway_signed = saml.assertion_service.is_none();
        match self {
            TargetProfile::S4HanaCloud => {
                if host_of(&saml.audience).contains("-api.") {
                    return refuse(
                        "audience",
                        format!(
                            "{:?} has -api in the host: S/4HANA Cloud's SAML2 audience is the tenant URL without it \
                             (the communication arrangement's OAuth 2.0 Details, SAML2 Audience)",
                            saml.audience
                        ),
                    );
                }
                let Some(user) = basic_user else {
                    return refuse(
                        "tokenServiceUser",
                        "is required: the communication user authenticates with HTTP Basic".into(),
                    );
                };
                if saml.client_key.as_deref() != Some(user) {
                    return refuse(
                        "clientKey",
                        format!("must be the communication user tokenServiceUser names ({user:?})"),
                    );
                }
                let cn = signing.and_then(|k| k.certificate().subject_cn.clone());
                if gateway_signed && cn.as_deref() != Some(saml.assertion_issuer.as_str()) {
                    return refuse(
                        "assertionIssuer",
                        format!(
                            "{:?} differs from the signing certificate's CN {:?}: the communication system's \
                             provider name is the CN; set assertionIssuer to it, or issue the certificate with \
                             that CN (pp keys generate --issuer)",
                            saml.assertion_issuer,
                            cn.unwrap_or_default()
                        ),
                    );
                }
                if !token_path.ends_with(ABAP_TOKEN_PATH) {
                    notice(format!(
                        "tokenServiceURL's path is usually {ABAP_TOKEN_PATH} (the API host's)"
                    ));
                }
            }
            TargetProfile::Abap => {
                let token_url = saml.token_service.url.full.as_str();
                if saml.audience != token_url && saml.assertion_recipient != token_url {
                    return refuse(
                        "assertionRecipient",
                        "AS ABAP takes an assertion only if its Audience or its Recipient is the token endpoint \
                         URL: leave assertionRecipient unset (it is then tokenServiceURL), or set audience to it"
                            .into(),
                    );
                }
                if !token_path.ends_with(ABAP_TOKEN_PATH) {
                    notice(format!("AS ABAP's token endpoint is {ABAP_TOKEN_PATH}"));
                }
                if basic_user.is_none() {
                    notice("the OAuth client (a system user) authenticates with HTTP Basic: set tokenServiceUser".into());
                }
            }
            TargetProfile::SuccessFactors => {
                let Some(client) = saml.client_key.as_deref() else {
                    return refuse(
                        "clientKey",
                        "is required: SuccessFactors takes the OAuth client's API key as client_id"
                            .into(),
                    );
                };
                if let Some(api_key) = raw.get("apiKey").and_then(Value::as_str) {
                    if api_key != client {
                        return refuse(
                            "apiKey",
                            "and clientKey must both be the OAuth client's API key".into(),
                        );
                    }
                }
                let company_in_url = saml
                    .token_service
                    .url
                    .path_and_query
                    .split_once('?')
                    .is_some_and(|(_, q)| q.split('&').any(|p| p.starts_with("company_id=")))
                    || saml
                        .token_service
                        .queries
                        .iter()
                        .any(|(k, _)| k == "company_id");
                if saml.company_id.is_none() && !company_in_url {
                    return refuse(
                        "companyId",
                        "is required: SuccessFactors needs the company ID (or company_id in tokenServiceURL)".into(),
                    );
                }
                if saml.audience != SUCCESSFACTORS {
                    notice(format!(
                        "SuccessFactors documents the audience {SUCCESSFACTORS}"
                    ));
                }
                if ecdsa {
                    notice("SuccessFactors documents RSA signatures only".into());
                }
            }
            TargetProfile::Xsuaa => {
                let recipient_path = path_of(&saml.assertion_recipient);
                let alias = recipient_path
                    .split_once(XSUAA_ALIAS_PATH)
                    .map(|(_, alias)| alias)
                    .filter(|alias| !alias.is_empty() && !alias.contains('/'));
                if alias.is_none() {
                    return refuse(
                        if raw.contains_key("assertionRecipient") { "assertionRecipient" } else { "tokenServiceURL" },
                        format!(
                            "XSUAA takes the assertion only at the subaccount's {XSUAA_ALIAS_PATH}<alias> URL \
                             (the AssertionConsumerService Location of https://<subdomain>.authentication.<region>/saml/metadata), \
                             which is also the Recipient; {:?} is not one",
                            saml.assertion_recipient
                        ),
                    );
                }
                let Some(user) = basic_user else {
                    return refuse(
                        "tokenServiceUser",
                        "is required: the XSUAA instance's clientid (and clientsecret as the password)".into(),
                    );
                };
                if saml.client_key.as_deref() != Some(user) {
                    return refuse(
                        "clientKey",
                        format!(
                            "must be the XSUAA instance's clientid, as tokenServiceUser ({user:?})"
                        ),
                    );
                }
            }
            TargetProfile::Salesforce => {
                let Some(client) = saml.client_key.as_deref() else {
                    return refuse(
                        "clientKey",
                        "is required: the connected app's consumer key, which is also the Issuer"
                            .into(),
                    );
                };
                if gateway_signed && saml.assertion_issuer != client {
                    return refuse(
                        "assertionIssuer",
                        format!("must be the connected app's consumer key (clientKey {client:?})"),
                    );
                }
                let Some(audience) = SALESFORCE_AUDIENCES.iter().find(|a| **a == saml.audience)
                else {
                    return refuse(
                        "audience",
                        format!(
                            "must be {} (production) or {} (sandbox)",
                            SALESFORCE_AUDIENCES[0], SALESFORCE_AUDIENCES[1]
                        ),
                    );
                };
                let recipient = format!("{audience}/services/oauth2/token");
                if saml.assertion_recipient != recipient {
                    return refuse(
                        if raw.contains_key("assertionRecipient") { "assertionRecipient" } else { "tokenServiceURL" },
                        format!("the Recipient must be {recipient} (the token URL that matches the audience)"),
                    );
                }
                if saml.encoding == AssertionEncoding::Base64 {
                    return refuse(
                        "samlAssertionEncoding",
                        "must be base64url: Salesforce's SAML bearer flow wants base64url".into(),
                    );
                }
                if gateway_signed && ecdsa {
                    return refuse(
                        "KeyStoreLocation",
                        "names an ECDSA key: Salesforce verifies RSA signatures only (SHA-1 or SHA-256)".into(),
                    );
                }
                if basic_user.is_some() {
                    notice("Salesforce needs no client secret: tokenServiceUser and its password are sent anyway".into());
                }
            }
        }
        Ok(())
    }
}

/// The host of a URL (or the whole text, for a plain name).
fn host_of(url: &str) -> &str {
    let rest = url.split_once("://").map_or(url, |(_, rest)| rest);
    rest.split(['/', '?', '#']).next().unwrap_or(rest)
}

/// The path of a URL, without its query.
fn path_of(url: &str) -> &str {
    let rest = url.split_once("://").map_or(url, |(_, rest)| rest);
    let path = rest.find('/').map_or("", |at| &rest[at..]);
    path.split(['?', '#']).next().unwrap_or(path)
}
