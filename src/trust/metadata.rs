//! SAML 2.0 metadata describing the gateway as an identity provider.
//!
//! Targets (S/4HANA Cloud, SuccessFactors, XSUAA subaccounts) import an IdP's metadata
//! to trust its assertions: `entityID` is the assertion issuer and each
//! `KeyDescriptor use="signing"` carries a certificate. Publishing the passive
//! certificate next to the active one lets targets trust it before a rotation.
//! Only public material is ever written here.

use crate::config::PluginConfig;
use crate::keys::CertificateInfo;
use crate::saml::canonical::{push_attribute, push_text};

const MD_NS: &str = "urn:oasis:names:tc:SAML:2.0:metadata";
const DS_NS: &str = "http://www.w3.org/2000/09/xmldsig#";
const SAML2_PROTOCOL: &str = "urn:oasis:names:tc:SAML:2.0:protocol";
const HTTP_REDIRECT: &str = "urn:oasis:names:tc:SAML:2.0:bindings:HTTP-Redirect";

/// What is published for one named key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PublishedKey<'a> {
    /// Distinct `assertionIssuer`s of the destinations signing with this key.
    pub entity_ids: Vec<&'a str>,
    /// Distinct `nameIdFormat`s of those destinations.
    pub name_id_formats: Vec<&'a str>,
    pub active: &'a CertificateInfo,
    pub passive: Option<&'a CertificateInfo>,
}

/// The key `name` as published, if it exists.
pub fn published_key<'a>(config: &'a PluginConfig, name: &str) -> Option<PublishedKey<'a>> {
    let pair = config.keys.get(name)?;
    let mut entity_ids = Vec::new();
    let mut name_id_formats = Vec::new();
    let saml = config.destinations.iter().filter(|d| d.key_name == name);
    // Destinations whose identity provider signs the assertion publish nothing here.
    let signed_here = saml
        .filter_map(|d| d.saml())
        .filter(|s| s.assertion_service.is_none());
    for destination in signed_here {
        if !entity_ids.contains(&destination.assertion_issuer.as_str()) {
            entity_ids.push(destination.assertion_issuer.as_str());
        }
        if !name_id_formats.contains(&destination.name_id_format.as_str()) {
            name_id_formats.push(destination.name_id_format.as_str());
        }
    }
    Some(PublishedKey {
        entity_ids,
        name_id_formats,
        active: pair.active.certificate(),
        passive: pair.passive.as_ref().map(|k| k.certificate()),
    })
}

/// The key published when none is named: `default`, else the only key.
pub fn default_key_name(config: &PluginConfig) -> Option<&str> {
    if config.keys.contains_key("default") {
        return Some("default");
    }
    match config.keys.keys().next() {
        Some(only) if config.keys.len() == 1 => Some(only.as_str()),
        _ => None,
    }
}

/// The metadata document: an `EntityDescriptor` per issuer using the key (wrapped in an
/// `EntitiesDescriptor` when there are several). `sso_location` fills the
/// `SingleSignOnService` the schema requires (the gateway has no interactive login).
pub fn idp_metadata(key: &PublishedKey<'_>, sso_location: &str) -> String {
    let mut out = String::from("<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n");
    let several = key.entity_ids.len() > 1;
    if several {
        out.push_str(&format!(
            "<md:EntitiesDescriptor xmlns:md=\"{MD_NS}\" xmlns:ds=\"{DS_NS}\">"
        ));
    }
    for entity_id in &key.entity_ids {
        out.push_str("<md:EntityDescriptor");
        if !several {
            out.push_str(&format!(" xmlns:md=\"{MD_NS}\" xmlns:ds=\"{DS_NS}\""));
        }
        out.push_str(" entityID=\"");
        escape_attribute(&mut out, entity_id);
        out.push_str("\"><md:IDPSSODescriptor protocolSupportEnumeration=\"");
        out.push_str(SAML2_PROTOCOL);
        out.push_str("\">");
        for certificate in std::iter::once(key.active).chain(key.passive) {
            out.push_str(
                "<md:KeyDescriptor use=\"signing\"><ds:KeyInfo><ds:X509Data><ds:X509Certificate>",
            );
            out.push_str(&certificate.der_base64);
            out.push_str("</ds:X509Certificate></ds:X509Data></ds:KeyInfo></md:KeyDescriptor>");
        }
        for format in &key.name_id_formats {
            out.push_str("<md:NameIDFormat>");
            escape_text(&mut out, format);
            out.push_str("</md:NameIDFormat>");
        }
        out.push_str("<md:SingleSignOnService Binding=\"");
        out.push_str(HTTP_REDIRECT);
        out.push_str("\" Location=\"");
        escape_attribute(&mut out, sso_location);
        out.push_str("\"/></md:IDPSSODescriptor></md:EntityDescriptor>");
    }
    if several {
        out.push_str("</md:EntitiesDescriptor>");
    }
    out.push('\n');
    out
}

// Configuration values were checked to be XML text at load; a request-derived location
// that is not is replaced rather than written.
fn escape_attribute(out: &mut String, value: &str) {
    if push_attribute(out, value).is_err() {
        out.push_str("about:invalid");
    }
}

fn escape_text(out: &mut String, value: &str) {
    let _ = push_text(out, value);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{config_json, destination_json, parse};
    use serde_json::json;

    #[test]
    fn publishes_issuer_formats_and_both_certificates() {
        let mut second = destination_json("e");
        second["assertionIssuer"] = json!("other & issuer");
        let mut config = config_json(vec![destination_json("d"), destination_json("d2"), second]);
        config["keys"] = json!({"default": {
            "active": {"privateKey": crate::testing::KEY, "certificate": crate::testing::CERT},
            "passive": {"privateKey": include_str!("../../tests/fixtures/passive-key.pem"),
                        "certificate": include_str!("../../tests/fixtures/passive-cert.pem")}
        }});
        let config = parse(&config).unwrap();
        assert_eq!(default_key_name(&config), Some("default"));
        let key = published_key(&config, "default").unwrap();
        assert_eq!(
            key.entity_ids,
            ["principal-propagation-gateway", "other & issuer"]
        );
        let xml = idp_metadata(&key, "http://gw/.well-known/saml-idp-metadata");
        assert!(xml.contains("<md:EntitiesDescriptor"));
        assert!(xml.contains("entityID=\"other &amp; issuer\""));
        assert_eq!(xml.matches("<md:KeyDescriptor use=\"signing\">").count(), 4);
        assert!(xml.contains(&key.passive.unwrap().der_base64));
        assert!(!xml.contains("PRIVATE"));
        assert!(published_key(&config, "nope").is_none());

        let single = PublishedKey {
            entity_ids: vec!["gw"],
            ..key
        };
        let xml = idp_metadata(&single, "http://gw/m");
        assert!(
            xml.contains("<md:EntityDescriptor xmlns:md=\"urn:oasis:names:tc:SAML:2.0:metadata\"")
        );
        assert!(!xml.contains("EntitiesDescriptor"));
    }
}
