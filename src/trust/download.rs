//! Answers for the trust download paths: which document a request asks for.

use super::metadata::{default_key_name, idp_metadata, published_key};
use crate::config::PluginConfig;

/// A local answer to a trust download request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Download {
    pub status: u32,
    pub content_type: &'static str,
    pub body: String,
}

/// The answer to a request with `method` for `path`, if it asks for trust material
/// (see [`answer`]): only `GET` and `HEAD` are answered, anything else gets 405 (the
/// reply then carries `Allow: GET, HEAD`).
pub fn respond(
    config: &PluginConfig,
    method: &str,
    path: &str,
    base_url: &str,
) -> Option<Download> {
    let download = answer(config, path, base_url)?;
    Some(if method == "GET" || method == "HEAD" {
        download
    } else {
        Download {
            status: 405,
            content_type: "text/plain",
            body: String::new(),
        }
    })
}

/// The answer for `path` if it lies under the configured metadata path, else `None`
/// (the request is not for us). `base_url` (scheme and authority) makes the metadata's
/// `SingleSignOnService` location absolute.
///
/// - `<prefix>`: metadata of the default key
/// - `<prefix>/<key>`: metadata of that key
/// - `<prefix>/<key>/active.pem`, `<prefix>/<key>/passive.pem`: the certificate as PEM
pub fn answer(config: &PluginConfig, path: &str, base_url: &str) -> Option<Download> {
    let prefix = config.trust_metadata_path.as_deref()?;
    let path = path.split(['?', '#']).next().unwrap_or_default();
    let rest = path.strip_prefix(prefix)?;
    let not_found = || Download {
        status: 404,
        content_type: "application/json",
        body: r#"{"error":"not_found","error_description":"no such key or certificate"}"#.into(),
    };
    let (key_name, file) = match rest {
        "" | "/" => (default_key_name(config), None),
        _ => {
            let rest = rest.strip_prefix('/')?;
            match rest.split_once('/') {
                None => (Some(rest), None),
                Some((key, file)) => (Some(key), Some(file)),
            }
        }
    };
    let Some(key) = key_name.and_then(|name| published_key(config, name)) else {
        return Some(not_found());
    };
    Some(match file {
        // A key no destination signs with has no issuer to describe: an EntityDescriptor
        // needs an entityID, so there is no well-formed metadata document for it.
        None if key.entity_ids.is_empty() => not_found(),
        None => Download {
            status: 200,
            content_type: "application/samlmetadata+xml",
            body: idp_metadata(&key, &format!("{base_url}{path}")),
        },
        Some("active.pem") => pem(key.active.pem()),
        Some("passive.pem") => match key.passive {
            Some(passive) => pem(passive.pem()),
            None => not_found(),
        },
        Some(_) => not_found(),
    })
}

fn pem(body: String) -> Download {
    Download {
        status: 200,
        content_type: "application/x-pem-file",
        body,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{config_json, destination_json, parse, CERT, KEY};
    use serde_json::json;

    #[test]
    fn serves_metadata_and_certificates_under_the_path_only() {
        let mut config = config_json(vec![destination_json("d")]);
        config["trustMetadataPath"] = json!("/.well-known/saml-idp-metadata");
        let mut config_value = config;
        let config = parse(&config_value).unwrap();
        let get = |p: &str| answer(&config, p, "http://gw");
        assert_eq!(get("/hello"), None);
        assert_eq!(get("/.well-known/saml-idp-metadataX"), None);
        let metadata = get("/.well-known/saml-idp-metadata").unwrap();
        assert_eq!(
            (metadata.status, metadata.content_type),
            (200, "application/samlmetadata+xml")
        );
        assert!(metadata
            .body
            .contains("entityID=\"principal-propagation-gateway\""));
        assert!(metadata
            .body
            .contains("Location=\"http://gw/.well-known/saml-idp-metadata\""));
        assert_eq!(
            get("/.well-known/saml-idp-metadata/default")
                .unwrap()
                .status,
            200
        );
        let pem = get("/.well-known/saml-idp-metadata/default/active.pem").unwrap();
        assert!(pem.body.starts_with("-----BEGIN CERTIFICATE-----\n"));
        assert_eq!(
            get("/.well-known/saml-idp-metadata/default/passive.pem")
                .unwrap()
                .status,
            404
        );
        assert_eq!(
            get("/.well-known/saml-idp-metadata/other").unwrap().status,
            404
        );
        assert_eq!(
            get("/.well-known/saml-idp-metadata/default/key.pem")
                .unwrap()
                .status,
            404
        );

        // Found by fuzzing: a key that no destination uses produced a 200 "metadata"
        // document without a root element. Its certificates stay downloadable.
        config_value["keys"]["spare"] = json!({"privateKey": KEY, "certificate": CERT});
        let spare = parse(&config_value).unwrap();
        let get = |p: &str| answer(&spare, p, "http://gw");
        assert_eq!(
            get("/.well-known/saml-idp-metadata/spare").unwrap().status,
            404
        );
        assert_eq!(
            get("/.well-known/saml-idp-metadata/spare/active.pem")
                .unwrap()
                .status,
            200
        );

        let disabled = parse(&config_json(vec![destination_json("d")])).unwrap();
        assert_eq!(
            answer(&disabled, "/.well-known/saml-idp-metadata", "http://gw"),
            None
        );
    }
}
