//! Configuration parsing: what is accepted, and that each refusal names key and problem.
use crate::config::destination::{AssertionEncoding, NAMEID_UNSPECIFIED};
use crate::config::PluginConfig;
use crate::identity::UserIdRule;
use crate::testing::{
    certificate_destination_json, config_json, destination_json, parse, with_ca_keys, CERT, KEY,
};
use serde_json::{json, Value};

/// A change to a destination's JSON.
type Edit = dyn Fn(&mut serde_json::Map<String, Value>);

fn refused(config: Value) -> String {
    parse(&config)
        .expect_err("configuration must be refused")
        .to_string()
}

fn with_destination(change: impl FnOnce(&mut serde_json::Map<String, Value>)) -> Value {
    let mut d = destination_json("d");
    change(d.as_object_mut().unwrap());
    config_json(vec![d])
}

#[test]
fn accepts_a_pasted_sap_destination_with_defaults() {
    let config = parse(&with_destination(|d| {
        d.insert("Description".into(), json!("exported from the BTP cockpit"));
        d.insert("ProxyType".into(), json!("Internet"));
        d.insert("tokenServiceURLType".into(), json!("Dedicated"));
        d.insert(
            "includeSigningCertificateInSAMLAssertion".into(),
            json!("true"),
        );
        d.insert(
            "tokenServiceURL.SocketReadTimeoutInSeconds".into(),
            json!("30"),
        );
    }))
    .unwrap();
    let d = &config.destinations[0];
    let saml = d.saml().unwrap();
    assert_eq!(
        saml.assertion_recipient,
        "http://127.0.0.1:9100/oauth/token"
    );
    assert_eq!(saml.name_id_format, NAMEID_UNSPECIFIED);
    assert_eq!(d.user_id, UserIdRule::claim("user_name").unwrap());
    assert_eq!(saml.encoding, AssertionEncoding::Base64Url);
    assert!(saml.include_certificate);
    assert_eq!(saml.token_service.timeout_ms, 30_000);
    assert_eq!(saml.token_service.cluster, "token_service");
    assert_eq!(d.key_name, "default");
    assert_eq!(config.assertion_lifetime_ms, 300_000);
    assert_eq!(config.selection.default, None);
}

/// `config` with the find-destination API answered.
fn with_api(mut config: Value) -> Value {
    config["destinationApi"] = json!({});
    config
}

/// A destination as the BTP cockpit exports it (the seed's `QUOVADIS`, SuccessFactors with
/// the application's own trust): it loads with only the gateway's fields added (the
/// cluster, at the top level, and the key its `KeyStoreLocation` names); the store's
/// password is ignored with a notice that shows no secret, and `x_user_token.jwks_uri`
/// is kept for applications.
#[test]
fn accepts_a_destination_exported_from_the_cockpit() {
    let quovadis = json!({
        "Name": "QUOVADIS",
        "Type": "HTTP",
        "URL": "https://apisalesdemo8.successfactors.com",
        "Authentication": "OAuth2SAMLBearerAssertion",
        "ProxyType": "Internet",
        "Description": "SFSF with its own X.509 trust",
        "tokenServiceURLType": "Dedicated",
        "tokenServiceURL": "https://apisalesdemo8.successfactors.com/oauth/token",
        "clientKey": "NzQ3ZWQ2NjM3MmI3MjBhYmQ",
        "audience": "www.successfactors.com",
        "assertionIssuer": "quovadis",
        "nameIdFormat": "urn:oasis:names:tc:SAML:1.1:nameid-format:unspecified",
        "authnContextClassRef": "urn:oasis:names:tc:SAML:2.0:ac:classes:PreviousSession",
        "userIdSource": "user_name",
        "companyId": "SFPART057448",
        "KeyStoreLocation": "quovadis.pfx",
        "KeyStorePassword": "p12-store-password",
        "x_user_token.jwks_uri": "https://quovadis.authentication.eu10.hana.ondemand.com/token_keys",
    });
    let mut config = config_json(vec![quovadis]);
    config["keys"]["quovadis.pfx"] = json!({"privateKey": KEY, "certificate": CERT});
    let parsed = parse(&config).unwrap();
    let d = &parsed.destinations[0];
    assert_eq!(d.key_name, "quovadis.pfx");
    assert_eq!(
        d.saml().unwrap().company_id.as_deref(),
        Some("SFPART057448")
    );
    assert_eq!(parsed.notices.len(), 1);
    assert!(parsed.notices[0].contains("destinations[0].KeyStorePassword is ignored"));
    assert!(!parsed.notices[0].contains("p12-store-password"));
    assert!(d.exposure.is_none(), "exposed only when asked");

    config["destinationApi"] = json!({});
    config["destinations"][0]["exposeToClients"] = json!("app-1, app-2");
    let parsed = parse(&config).unwrap();
    let exposure = parsed.destinations[0].exposure.as_ref().unwrap();
    assert!(exposure.allows("app-1") && exposure.allows("app-2") && !exposure.allows("app"));
    let shown: Value = serde_json::from_str(&exposure.configuration).unwrap();
    assert_eq!(
        shown["x_user_token.jwks_uri"],
        "https://quovadis.authentication.eu10.hana.ondemand.com/token_keys"
    );
    assert!(shown.get("KeyStorePassword").is_none() && shown.get("KeyStoreLocation").is_none());
    assert!(!exposure.configuration.contains("p12-store-password"));
    assert_eq!(parsed.destination_api.as_ref().unwrap().path_prefix, "");
}

#[test]
fn email_format_reads_the_email_claim_and_system_user_wins() {
    let config = parse(&with_destination(|d| {
        d.insert(
            "nameIdFormat".into(),
            json!("urn:oasis:names:tc:SAML:1.1:nameid-format:emailAddress"),
        );
    }))
    .unwrap();
    assert_eq!(
        config.destinations[0].user_id,
        UserIdRule::claim("email").unwrap()
    );
    let config = parse(&with_destination(|d| {
        d.insert("SystemUser".into(), json!("TECH_USER"));
        d.insert("userIdSource".into(), json!("sub"));
    }))
    .unwrap();
    assert_eq!(
        config.destinations[0].user_id,
        UserIdRule::SystemUser("TECH_USER".into())
    );
}

#[test]
fn keys_come_inline_or_from_the_environment() {
    let mut config = config_json(vec![destination_json("d")]);
    config["keys"] = json!({"k1": {"privateKeyEnv": "SIGNING_KEY", "certificate": CERT}});
    let env = |name: &str| (name == "SIGNING_KEY").then(|| KEY.to_string());
    let parsed = PluginConfig::parse(config.to_string().as_bytes(), &env).unwrap();
    assert_eq!(
        parsed.destinations[0].key_name, "k1",
        "the only key is the default"
    );
}

#[test]
fn the_client_password_can_come_from_the_environment() {
    let mut d = destination_json("d");
    let fields = d.as_object_mut().unwrap();
    fields.remove("tokenServicePassword");
    fields.insert("tokenServicePasswordEnv".into(), json!("CLIENT_SECRET"));
    let config = config_json(vec![d]);
    let env = |name: &str| (name == "CLIENT_SECRET").then(|| "from-env".to_string());
    let parsed = PluginConfig::parse(config.to_string().as_bytes(), &env).unwrap();
    let (_, password) = parsed.destinations[0]
        .saml()
        .unwrap()
        .token_service
        .basic_auth
        .clone()
        .unwrap();
    assert_eq!(password, "from-env");

    let unset = PluginConfig::parse(config.to_string().as_bytes(), &|_| None)
        .unwrap_err()
        .to_string();
    assert_eq!(
        unset,
        "configuration key `destinations[0].tokenServicePasswordEnv` names environment variable \"CLIENT_SECRET\", which is not set in the Wasm VM"
    );
}

#[test]
fn refuses_bad_configurations_naming_key_and_problem() {
    let cases: Vec<(Value, &str)> = vec![
        (json!("[]"), "configuration key `(configuration)` must be a JSON object"),
        (json!({"keys": {}}), "`keys` is required: at least one signing key"),
        (config_json(vec![]), "`destinations` is required"),
        (
            with_destination(|d| {
                d.remove("audience");
            }),
            "`destinations[0].audience` is required",
        ),
        (
            with_destination(|d| {
                d.insert("audience".into(), json!(42));
            }),
            "`destinations[0].audience` must be a string",
        ),
        (
            with_destination(|d| {
                d.insert("tokenServiceUrl".into(), json!("x"));
            }),
            "`destinations[0].tokenServiceUrl` is not a supported destination property",
        ),
        (
            with_destination(|d| {
                d.insert("Authentication".into(), json!("BasicAuthentication"));
            }),
            "supported are OAuth2SAMLBearerAssertion and PrincipalPropagation",
        ),
        (
            with_destination(|d| {
                d.insert("tokenServiceURL".into(), json!("ftp://x/token"));
            }),
            "`destinations[0].tokenServiceURL` must be an absolute http:// or https:// URL",
        ),
        (
            with_destination(|d| {
                d.remove("tokenServicePassword");
            }),
            "`destinations[0].tokenServicePassword` is required when tokenServiceUser is set",
        ),
        (
            with_destination(|d| {
                d.insert("tokenServicePasswordEnv".into(), json!("CLIENT_SECRET"));
            }),
            "`destinations[0].tokenServicePassword` and tokenServicePasswordEnv are both set; use one",
        ),
        (
            with_destination(|d| {
                d.insert("nameIdFormat".into(), json!("urn:oasis:names:tc:SAML:1.1:nameid-format:X509SubjectName"));
            }),
            "`destinations[0].nameIdFormat` has no default user id claim",
        ),
        (
            with_destination(|d| {
                d.insert("samlAssertionEncoding".into(), json!("hex"));
            }),
            "must be base64url or base64",
        ),
        (
            with_destination(|d| {
                d.insert("tokenServiceURL.SocketReadTimeoutInSeconds".into(), json!("0"));
            }),
            "must be a whole number from 1 to 600",
        ),
        (
            with_destination(|d| {
                d.insert("includeSigningCertificateInSAMLAssertion".into(), json!("yes"));
            }),
            "must be true or false",
        ),
        (
            with_destination(|d| {
                d.insert("tokenService.body.grant_type".into(), json!("password"));
            }),
            "`destinations[0].tokenService.body.grant_type` would replace a form field the gateway sets itself",
        ),
        (
            with_destination(|d| {
                d.insert("URL.headers.Authorization".into(), json!("x"));
            }),
            "names a header the gateway sets itself",
        ),
        (
            with_destination(|d| {
                d.insert("URL.headers.X-Ok".into(), json!("a\r\nInjected: 1"));
            }),
            "must not contain control characters",
        ),
        (
            with_destination(|d| {
                d.insert("tokenServiceURL.headers.".into(), json!("x"));
            }),
            "needs a name after the prefix",
        ),
        (
            with_destination(|d| {
                d.insert("x_user_token.jwks_uri".into(), json!(42));
            }),
            "`destinations[0].x_user_token.jwks_uri` must be a string",
        ),
        (
            with_destination(|d| {
                d.insert("exposeToClients".into(), json!(["app"]));
            }),
            "`destinations[0].exposeToClients` needs the top-level destinationApi setting",
        ),
        (
            with_api(with_destination(|d| {
                d.insert("exposeToClients".into(), json!([]));
            })),
            "`destinations[0].exposeToClients` must name at least one client id",
        ),
        (
            with_api(with_destination(|d| {
                d.insert("exposeToClients".into(), json!([1.5, {}]));
            })),
            "`destinations[0].exposeToClients` must be a list of strings",
        ),
        (
            with_api(with_ca_keys(config_json(vec![{
                let mut d = certificate_destination_json("pp");
                d["exposeToClients"] = json!(["app"]);
                d
            }]))),
            "`destinations[0].exposeToClients` applies to OAuth2SAMLBearerAssertion destinations only",
        ),
        (
            {
                let mut config = with_destination(|_| {});
                config["destinationApi"] = json!({"pathPrefix": "api/"});
                config
            },
            "`destinationApi.pathPrefix` must be empty or a path starting with /",
        ),
        (
            with_destination(|d| {
                d.insert("KeyStoreLocation".into(), json!("missing"));
            }),
            "`destinations[0].KeyStoreLocation` names no key in `keys`",
        ),
        (
            with_destination(|d| {
                d.insert("assertionIssuer".into(), json!("bad\u{1}issuer"));
            }),
            "`destinations[0].assertionIssuer` contains characters that XML 1.0 cannot carry",
        ),
        (
            with_destination(|d| {
                d.insert("ProxyType".into(), json!("OnPremise"));
            }),
            "`destinations[0].ProxyType` must be Internet",
        ),
        (
            config_json(vec![destination_json("same"), destination_json("same")]),
            "`destinations[1].Name` \"same\" is used by another destination",
        ),
        (
            {
                let mut c = config_json(vec![destination_json("d")]);
                c["defaultDestination"] = json!("nope");
                c
            },
            "`defaultDestination` names no destination",
        ),
        (
            {
                let mut c = config_json(vec![destination_json("d")]);
                c["keys"]["default"]["privateKey"] = json!(CERT);
                c
            },
            "`keys.default.privateKey` is not a PEM RSA or P-256 private key",
        ),
        (
            {
                let mut c = config_json(vec![destination_json("d")]);
                c["keys"]["default"]["privateKeyEnv"] = json!("UNSET");
                c
            },
            "`keys.default.privateKey` and privateKeyEnv are both set; use one",
        ),
        (
            {
                let mut c = config_json(vec![destination_json("d")]);
                c.as_object_mut().unwrap().remove("tokenServiceCluster");
                c
            },
            "`destinations[0].tokenServiceCluster` is required",
        ),
        (
            {
                let mut c = config_json(vec![destination_json("d")]);
                c["assertionLifetimeSeconds"] = json!(99_999);
                c
            },
            "`assertionLifetimeSeconds` must be a whole number from 10 to 3000",
        ),
        (
            {
                let mut c = config_json(vec![destination_json("d")]);
                c["tokenCache"] = json!(1);
                c
            },
            "`tokenCache` is not a supported plugin setting",
        ),
    ];
    for (config, expected) in cases {
        let message = refused(config);
        assert!(
            message.contains(expected),
            "{message:?} should contain {expected:?}"
        );
        assert!(!message.contains("BEGIN"), "no key material in {message:?}");
    }
}

#[test]
fn refusals_never_echo_secret_values() {
    let message = refused(with_destination(|d| {
        d.insert("tokenServicePassword".into(), json!(17));
    }));
    assert_eq!(
        message,
        "configuration key `destinations[0].tokenServicePassword` must be a string"
    );
}

#[test]
fn keys_can_have_an_active_and_a_passive_certificate() {
    let passive_key = include_str!("../../tests/fixtures/passive-key.pem");
    let passive_cert = include_str!("../../tests/fixtures/passive-cert.pem");
    let mut config = config_json(vec![destination_json("d")]);
    config["keys"] = json!({"default": {
        "active": {"privateKey": KEY, "certificate": CERT},
        "passive": {"privateKey": passive_key, "certificate": passive_cert}
    }});
    let parsed = parse(&config).unwrap();
    let pair = &parsed.keys["default"];
    assert!(pair
        .active
        .certificate()
        .pem()
        .replace('\n', "")
        .contains(CERT.lines().nth(1).unwrap()));
    let passive = pair.passive.as_ref().unwrap();
    assert_ne!(
        passive.certificate_base64(),
        pair.active.certificate_base64()
    );

    config["keys"]["default"]["extra"] = json!(1);
    assert!(refused(config.clone())
        .contains("`keys.default.extra` is not supported next to active/passive"));
    config["keys"] =
        json!({"default": {"passive": {"privateKey": passive_key, "certificate": passive_cert}}});
    assert!(refused(config).contains("`keys.default.active` is required next to passive"));
}

/// A configuration whose only key is `private_key` (with `certificate`).
fn with_key(private_key: &str, certificate: &str) -> Value {
    let mut c = config_json(vec![destination_json("d")]);
    c["keys"]["default"] = json!({"privateKey": private_key, "certificate": certificate});
    c
}

/// An RSA key of chosen "primes" as PKCS#8 PEM (the `rsa` crate checks `p q = n` and
/// `d e = 1 mod (p - 1)`, not primality, so a product of pool primes makes wide shapes).
fn rsa_key_pem(p: rsa::BigUint, q: rsa::BigUint) -> String {
    use rsa::pkcs8::EncodePrivateKey;
    let key = rsa::RsaPrivateKey::from_p_q(p, q, rsa::BigUint::from(65_537u32)).unwrap();
    key.to_pkcs8_pem(rsa::pkcs8::LineEnding::LF)
        .unwrap()
        .to_string()
}

fn pool(text: &str) -> Vec<rsa::BigUint> {
    text.lines()
        .map(|l| rsa::BigUint::parse_bytes(l.as_bytes(), 16).unwrap())
        .collect()
}

#[test]
fn refuses_multi_prime_rsa_keys_naming_the_key() {
    let cert = include_str!("../../tests/fixtures/multi-prime-cert.pem");
    for pem in [
        include_str!("../../tests/fixtures/multi-prime-key.pem"),
        include_str!("../../tests/fixtures/multi-prime-key-pkcs1.pem"),
    ] {
        assert_eq!(
            refused(with_key(pem, cert)),
            "configuration key `keys.default.privateKey` is a 3-prime RSA key; only two-prime RSA keys are supported"
        );
    }
}

#[test]
fn refuses_rsa_keys_over_4096_bits_naming_the_key() {
    let primes_1024 = pool(include_str!("../../tests/fixtures/primes-1024.txt"));
    let primes_2048 = pool(include_str!("../../tests/fixtures/primes-2048.txt"));
    // 2048 + 2048 + 1024 bits.
    let wide = rsa_key_pem(primes_2048[0].clone(), &primes_2048[1] * &primes_1024[0]);
    assert_eq!(
        refused(with_key(&wide, CERT)),
        "configuration key `keys.default.privateKey` is a 5120-bit RSA key; at most 4096 bits are supported"
    );
}

#[test]
fn refuses_rsa_keys_whose_primes_do_not_fit_naming_the_key() {
    let primes_1024 = pool(include_str!("../../tests/fixtures/primes-1024.txt"));
    // A 4096-bit modulus of a 1024-bit and a 3072-bit factor.
    let lopsided = rsa_key_pem(
        primes_1024[0].clone(),
        &primes_1024[1] * &primes_1024[2] * &primes_1024[3],
    );
    let message = refused(with_key(&lopsided, CERT));
    assert_eq!(
        message,
        "configuration key `keys.default.privateKey` is a 4096-bit RSA key with a 3072-bit prime factor; each may have at most 2068 bits"
    );
}

#[test]
fn a_cleartext_token_service_needs_an_explicit_opt_in() {
    let mut config = config_json(vec![destination_json("d")]);
    config
        .as_object_mut()
        .unwrap()
        .remove("allowInsecureTokenService");
    assert_eq!(
        refused(config.clone()),
        "configuration key `destinations[0].tokenServiceURL` must be https:// (client \
         credentials, assertions and tokens cross it); set allowInsecureTokenService to true \
         only for a development token service"
    );
    config["destinations"][0]["tokenServiceURL"] = json!("https://uaa.example/oauth/token");
    assert!(parse(&config).is_ok());
    config["allowInsecureTokenService"] = json!("yes");
    assert_eq!(
        refused(config),
        "configuration key `allowInsecureTokenService` must be true or false"
    );
}

#[test]
fn a_destination_extends_the_credentials_removed_and_the_statuses_that_evict() {
    let config = parse(&with_destination(|d| {
        d.insert(
            "removeRequestHeaders".into(),
            json!(["X-Api-Key", "x-legacy-*"]),
        );
        d.insert("removeCookies".into(), json!("JSESSIONID, SAP_SESSIONID_X"));
        d.insert("removeQueryParameters".into(), json!(["apikey"]));
        d.insert("evictTokenOnUpstreamStatus".into(), json!([401, "403"]));
    }))
    .unwrap();
    let d = &config.destinations[0];
    for default in crate::forwarding::DEFAULT_HEADERS {
        assert!(d.removal.headers.iter().any(|h| h == default), "{default}");
    }
    assert!(d.removal.headers.contains(&"x-api-key".to_string()));
    assert!(d.removal.headers.contains(&"x-legacy-*".to_string()));
    assert_eq!(
        d.removal.cookies,
        ["jsessionid", "mysapsso2", "sap_sessionid_x"]
    );
    assert_eq!(
        d.removal.query_parameters,
        ["access_token", "apikey", "sap-password", "sap-user"]
    );
    assert_eq!(d.evict_on_status, [401, 403]);
    let defaults = parse(&config_json(vec![destination_json("d")])).unwrap();
    assert_eq!(defaults.destinations[0].evict_on_status, [401]);
    assert_eq!(
        defaults.destinations[0].removal,
        crate::forwarding::Removal::default()
    );
    let off = parse(&with_destination(|d| {
        d.insert("evictTokenOnUpstreamStatus".into(), json!([]));
    }))
    .unwrap();
    assert!(off.destinations[0].evict_on_status.is_empty());

    let key = |k: &str, v: Value| {
        refused(with_destination(|d| {
            d.insert(k.into(), v);
        }))
    };
    assert_eq!(
        key("removeRequestHeaders", json!(["*"])),
        "configuration key `destinations[0].removeRequestHeaders` \"*\" would match every header"
    );
    assert_eq!(
        key("removeRequestHeaders", json!(["Host"])),
        "configuration key `destinations[0].removeRequestHeaders` \"Host\" names a header the gateway sets itself"
    );
    assert_eq!(
        key("removeRequestHeaders", json!(["a b"])),
        "configuration key `destinations[0].removeRequestHeaders` \"a b\" names an invalid HTTP header"
    );
    assert_eq!(
        key("removeCookies", json!(["a;b"])),
        "configuration key `destinations[0].removeCookies` \"a;b\" is not a cookie name"
    );
    assert_eq!(
        key("removeQueryParameters", json!(["a=b"])),
        "configuration key `destinations[0].removeQueryParameters` \"a=b\" is not a query parameter name"
    );
    assert_eq!(
        key("evictTokenOnUpstreamStatus", json!([200])),
        "configuration key `destinations[0].evictTokenOnUpstreamStatus` \"200\" is not an HTTP error status (400-599)"
    );
    assert_eq!(
        key("removeCookies", json!({"a": 1})),
        "configuration key `destinations[0].removeCookies` must be a list of strings or a comma-separated string"
    );
}

#[test]
fn a_principal_propagation_destination_with_defaults_and_its_refusals() {
    use crate::config::destination::{Kind, DEFAULT_CERTIFICATE_MINUTES};
    let config = |change: &dyn Fn(&mut serde_json::Map<String, Value>)| {
        let mut d = certificate_destination_json("onprem");
        change(d.as_object_mut().unwrap());
        with_ca_keys(config_json(vec![destination_json("saml"), d]))
    };
    let parsed = parse(&config(&|_| {})).unwrap();
    let d = &parsed.destinations[1];
    let Kind::ClientCertificate(settings) = &d.kind else {
        panic!("not a certificate destination");
    };
    assert_eq!(settings.validity_ms, DEFAULT_CERTIFICATE_MINUTES * 60_000);
    assert_eq!(d.carrier.header, "ssl_client_cert");
    assert_eq!(d.carrier.value("MIIB"), "MIIB");
    assert_eq!(d.key_name, "ca");
    assert_eq!(
        d.user_id,
        UserIdRule::first_claim(&crate::x509::subject::NAME_CLAIMS)
    );
    assert_eq!(parsed.destinations[0].carrier.value("t"), "Bearer t");
    let custom = parse(&config(&|d| {
        d.insert("clientCertificateHeader".into(), json!("X-User-Cert"));
        d.insert("clientCertificateValidityMinutes".into(), json!(43200));
        d.insert(
            "clientCertificateSubjectPattern".into(),
            json!("CN=${name}, OU=Users, O=ACME, C=DE"),
        );
        d.insert("clientCertificateIssuerKey".into(), json!("ca-ec"));
    }))
    .unwrap();
    let d = &custom.destinations[1];
    assert_eq!(d.carrier.header, "x-user-cert");
    assert!(
        d.removal.headers.contains(&"x-user-cert".to_string()),
        "a client's own copy is removed"
    );
    assert_ne!(
        d.cache_namespace, parsed.destinations[1].cache_namespace,
        "another CA, other certificates"
    );

    let refusal = |change: &dyn Fn(&mut serde_json::Map<String, Value>)| refused(config(change));
    let cases: Vec<(Box<Edit>, &str)> = vec![
        (
            Box::new(|d| drop(d.remove("clientCertificateIssuerKey"))),
            "`destinations[1].clientCertificateIssuerKey` is required",
        ),
        (
            Box::new(|d| drop(d.insert("clientCertificateIssuerKey".into(), json!("nope")))),
            "names no key in `keys`: \"nope\"",
        ),
        (
            Box::new(|d| drop(d.insert("clientCertificateIssuerKey".into(), json!("default")))),
            "names key \"default\", which has a CA certificate without keyUsage keyCertSign",
        ),
        (
            Box::new(|d| drop(d.insert("clientCertificateValidityMinutes".into(), json!(43201)))),
            "`destinations[1].clientCertificateValidityMinutes` must be",
        ),
        (
            Box::new(|d| drop(d.insert("clientCertificateValidityMinutes".into(), json!(0)))),
            "`destinations[1].clientCertificateValidityMinutes` must be",
        ),
        (
            Box::new(|d| {
                drop(d.insert(
                    "clientCertificateSubjectPattern".into(),
                    json!("UID=${name}"),
                ))
            }),
            "is not a DN field of the pattern",
        ),
        (
            Box::new(|d| drop(d.insert("clientCertificateHeader".into(), json!("Authorization")))),
            "names a header the gateway sets itself",
        ),
        (
            Box::new(|d| drop(d.insert("audience".into(), json!("x")))),
            "`destinations[1].audience` applies to OAuth2SAMLBearerAssertion destinations only",
        ),
        (
            Box::new(|d| drop(d.insert("tokenServiceURL.headers.X".into(), json!("x")))),
            "applies to OAuth2SAMLBearerAssertion destinations only",
        ),
        (
            Box::new(|d| drop(d.insert("ProxyType".into(), json!("PrivateLink")))),
            "`destinations[1].ProxyType` must be Internet",
        ),
    ];
    for (change, expected) in cases {
        let message = refusal(&*change);
        assert!(
            message.contains(expected),
            "{message:?} should contain {expected:?}"
        );
    }
    let mut no_sign = config(&|_| {});
    no_sign["keys"]["ca"] = json!({
        "privateKey": include_str!("../../tests/fixtures/ca-nosign-key.pem"),
        "certificate": include_str!("../../tests/fixtures/ca-nosign-cert.pem"),
    });
    assert!(refused(no_sign).contains("without keyUsage keyCertSign"));
    let saml_with_certificate_key = refused(with_destination(|d| {
        d.insert("clientCertificateHeader".into(), json!("X"));
    }));
    assert!(saml_with_certificate_key.contains("applies to PrincipalPropagation destinations only"));
}

#[test]
fn an_assertion_from_the_identity_provider_is_configured_or_refused_clearly() {
    use crate::config::destination::{ClientCredential, SAML1_TOKEN_TYPE};
    let service = |change: &dyn Fn(&mut serde_json::Map<String, Value>)| {
        let mut d = destination_json("entra");
        let fields = d.as_object_mut().unwrap();
        fields.remove("assertionIssuer");
        fields.insert(
            "assertionServiceURL".into(),
            json!("http://127.0.0.1:9400/t/oauth2/v2.0/token"),
        );
        fields.insert("assertionServiceCluster".into(), json!("sts"));
        fields.insert("assertionServiceClientId".into(), json!("gateway-app"));
        fields.insert(
            "assertionServiceClientSecretEnv".into(),
            json!("STS_SECRET"),
        );
        change(fields);
        config_json(vec![d])
    };
    let env = |name: &str| (name == "STS_SECRET").then(|| "app-secret".to_string());
    let parse_env = |config: &Value| PluginConfig::parse(config.to_string().as_bytes(), &env);
    let config = parse_env(&service(&|_| {})).unwrap();
    let d = &config.destinations[0];
    let s = d.saml().unwrap().assertion_service.as_ref().unwrap();
    assert_eq!(s.scope, "spn:dev-token-server/.default");
    assert!(matches!(&s.credential, ClientCredential::Secret(secret) if secret == "app-secret"));
    assert_eq!(
        d.user_id,
        UserIdRule::claim("sub").unwrap(),
        "the token's subject by default"
    );
    assert!(!format!("{s:?}").contains("app-secret"));
    let saml1 = parse_env(&service(&|d| {
        d.insert("assertionServiceTokenType".into(), json!("saml1"));
        d.insert("audience".into(), json!("https://target.example"));
    }))
    .unwrap();
    let s1 = saml1.destinations[0]
        .saml()
        .unwrap()
        .assertion_service
        .clone()
        .unwrap();
    assert_eq!(
        (s1.token_type, s1.scope.as_str()),
        (SAML1_TOKEN_TYPE, "https://target.example/.default")
    );
    let keyed = parse_env(&service(&|d| {
        d.remove("assertionServiceClientSecretEnv");
        d.insert(
            "assertionServiceClientAssertionKey".into(),
            json!("default"),
        );
    }))
    .unwrap();
    assert_eq!(keyed.destinations[0].key_name, "default");

    let refused_with = |change: &dyn Fn(&mut serde_json::Map<String, Value>)| {
        parse_env(&service(change))
            .expect_err("refused")
            .to_string()
    };
    let cases: Vec<(&Edit, &str)> = vec![
        (
            &|d| drop(d.insert("assertionIssuer".into(), json!("gw"))),
            "`destinations[0].assertionIssuer` does not apply",
        ),
        (
            &|d| drop(d.insert("KeyStoreLocation".into(), json!("default"))),
            "`destinations[0].KeyStoreLocation` does not apply",
        ),
        (
            &|d| drop(d.insert("SystemUser".into(), json!("TECH"))),
            "`destinations[0].SystemUser` does not apply",
        ),
        (
            &|d| drop(d.remove("assertionServiceClientSecretEnv")),
            "`destinations[0].assertionServiceClientSecret` is required",
        ),
        (
            &|d| {
                drop(d.insert(
                    "assertionServiceClientAssertionKey".into(),
                    json!("default"),
                ))
            },
            "are both set",
        ),
        (
            &|d| {
                d.remove("assertionServiceClientSecretEnv");
                d.insert("assertionServiceClientAssertionKey".into(), json!("nope"));
            },
            "`destinations[0].assertionServiceClientAssertionKey` names no key",
        ),
        (
            &|d| drop(d.insert("assertionServiceTokenType".into(), json!("jwt"))),
            "must be saml2 or saml1",
        ),
        (
            &|d| drop(d.remove("assertionServiceCluster")),
            "`destinations[0].assertionServiceCluster` is required",
        ),
        (
            &|d| drop(d.remove("assertionServiceURL")),
            "needs assertionServiceURL",
        ),
    ];
    for (change, expected) in cases {
        let message = refused_with(change);
        assert!(
            message.contains(expected),
            "{message:?} should contain {expected:?}"
        );
    }
    let mut https_needed = service(&|_| {});
    https_needed
        .as_object_mut()
        .unwrap()
        .remove("allowInsecureTokenService");
    https_needed["destinations"][0]["tokenServiceURL"] = json!("https://uaa.example/oauth/token");
    let message = parse_env(&https_needed).unwrap_err().to_string();
    assert!(
        message.contains("`destinations[0].assertionServiceURL` must be https://"),
        "{message}"
    );
}

/// A destination for `profile`, with `change` applied; parsed with the test key (CN
/// `principal-propagation-test`).
fn profiled(profile: &str, change: impl FnOnce(&mut serde_json::Map<String, Value>)) -> Value {
    with_destination(|d| {
        d.insert("targetProfile".into(), json!(profile));
        change(d);
    })
}

#[test]
fn a_target_profile_fills_its_defaults() {
    let sf = parse(&profiled("successfactors", |d| {
        d.remove("audience");
        d.remove("assertionIssuer");
        d.insert("apiKey".into(), json!("API-KEY"));
        d.insert("companyId".into(), json!("ACME"));
        d.insert(
            "nameIdFormat".into(),
            json!("urn:oasis:names:tc:SAML:1.1:nameid-format:emailAddress"),
        );
    }))
    .unwrap();
    let saml = sf.destinations[0].saml().unwrap();
    assert_eq!(saml.audience, "www.successfactors.com");
    assert_eq!(saml.assertion_issuer, "www.successfactors.com");
    assert_eq!(saml.encoding, AssertionEncoding::Base64);
    assert_eq!(saml.client_key.as_deref(), Some("API-KEY"));
    let fixed: Vec<(&str, &str)> = saml
        .fixed_attributes
        .iter()
        .map(|a| (a.name.as_str(), a.values[0].as_str()))
        .collect();
    assert_eq!(fixed, [("api_key", "API-KEY"), ("use_email", "true")]);

    let xsuaa = parse(&profiled("xsuaa", |d| {
        d.insert(
            "tokenServiceURL".into(),
            json!("http://127.0.0.1:9100/oauth/token/alias/sub.aws-live-eu10"),
        );
    }))
    .unwrap();
    let saml = xsuaa.destinations[0].saml().unwrap();
    assert_eq!(
        saml.name_id_format,
        "urn:oasis:names:tc:SAML:1.1:nameid-format:emailAddress"
    );
    assert_eq!(saml.client_key.as_deref(), Some("gateway-client"));

    let s4 = parse(&profiled("s4hana-cloud", |d| {
        d.insert(
            "assertionIssuer".into(),
            json!("principal-propagation-test"),
        );
        d.insert(
            "audience".into(),
            json!("https://my300117.s4hana.ondemand.com"),
        );
    }))
    .unwrap();
    let saml = s4.destinations[0].saml().unwrap();
    assert_eq!(
        saml.authn_context_class_ref,
        "urn:oasis:names:tc:SAML:2.0:ac:classes:X509"
    );
    assert_eq!(saml.client_key.as_deref(), Some("gateway-client"));
    // What a destination sets itself stays.
    let own = parse(&profiled("s4hana-cloud", |d| {
        d.insert(
            "assertionIssuer".into(),
            json!("principal-propagation-test"),
        );
        d.insert("authnContextClassRef".into(), json!("urn:x"));
    }))
    .unwrap();
    assert_eq!(
        own.destinations[0].saml().unwrap().authn_context_class_ref,
        "urn:x"
    );
}

#[test]
fn a_target_profile_refuses_what_the_target_refuses_saying_what_to_change() {
    let salesforce = |change: fn(&mut serde_json::Map<String, Value>)| {
        profiled("salesforce", move |d| {
            d.remove("assertionIssuer");
            d.remove("audience");
            d.insert("clientKey".into(), json!("3MVG9key"));
            d.insert(
                "assertionRecipient".into(),
                json!("https://login.salesforce.com/services/oauth2/token"),
            );
            change(d);
        })
    };
    assert!(parse(&salesforce(|_| {})).is_ok());
    let cases: Vec<(Value, &str)> = vec![
        (
            profiled("s4hana-cloud", |d| {
                d.insert("assertionIssuer".into(), json!("principal-propagation-test"));
                d.insert("audience".into(), json!("https://my300117-api.s4hana.ondemand.com"));
            }),
            "`destinations[0].audience` \"https://my300117-api.s4hana.ondemand.com\" has -api in the host",
        ),
        (
            profiled("s4hana-cloud", |_| {}),
            "`destinations[0].assertionIssuer` \"principal-propagation-gateway\" differs from the signing certificate's CN",
        ),
        (
            profiled("s4hana-cloud", |d| {
                d.insert("assertionIssuer".into(), json!("principal-propagation-test"));
                d.insert("clientKey".into(), json!("SOMEONE_ELSE"));
            }),
            "`destinations[0].clientKey` must be the communication user",
        ),
        (
            profiled("xsuaa", |_| {}),
            "`destinations[0].tokenServiceURL` XSUAA takes the assertion only at the subaccount's /oauth/token/alias/<alias> URL",
        ),
        (
            profiled("xsuaa", |d| {
                d.insert(
                    "tokenServiceURL".into(),
                    json!("http://127.0.0.1:9100/oauth/token/alias/a"),
                );
                d.insert("assertionRecipient".into(), json!("http://127.0.0.1:9100/oauth/token"));
            }),
            "`destinations[0].assertionRecipient` XSUAA takes the assertion only",
        ),
        (
            profiled("successfactors", |d| {
                d.insert("companyId".into(), json!("ACME"));
            }),
            "`destinations[0].clientKey` is required: SuccessFactors takes the OAuth client's API key",
        ),
        (
            profiled("successfactors", |d| {
                d.insert("clientKey".into(), json!("K"));
            }),
            "`destinations[0].companyId` is required",
        ),
        (
            profiled("successfactors", |d| {
                d.insert("clientKey".into(), json!("K"));
                d.insert("apiKey".into(), json!("OTHER"));
                d.insert("companyId".into(), json!("ACME"));
            }),
            "`destinations[0].apiKey` and clientKey must both be the OAuth client's API key",
        ),
        (
            salesforce(|d| {
                d.insert("assertionIssuer".into(), json!("me"));
            }),
            "`destinations[0].assertionIssuer` must be the connected app's consumer key",
        ),
        (
            salesforce(|d| {
                d.insert("audience".into(), json!("https://acme.my.salesforce.com"));
            }),
            "`destinations[0].audience` must be https://login.salesforce.com (production) or https://test.salesforce.com",
        ),
        (
            salesforce(|d| {
                d.insert("audience".into(), json!("https://test.salesforce.com"));
            }),
            "`destinations[0].assertionRecipient` the Recipient must be https://test.salesforce.com/services/oauth2/token",
        ),
        (
            salesforce(|d| {
                d.insert("samlAssertionEncoding".into(), json!("base64"));
            }),
            "`destinations[0].samlAssertionEncoding` must be base64url",
        ),
        (
            profiled("abap", |d| {
                d.insert("assertionRecipient".into(), json!("https://elsewhere/x"));
            }),
            "`destinations[0].assertionRecipient` AS ABAP takes an assertion only if its Audience or its Recipient is the token endpoint",
        ),
        (
            profiled("nope", |_| {}),
            "`destinations[0].targetProfile` is \"nope\"; the profiles are s4hana-cloud, abap, successfactors, xsuaa, salesforce",
        ),
        (
            with_ca_keys(config_json(vec![{
                let mut d = certificate_destination_json("pp");
                d["targetProfile"] = json!("abap");
                d
            }])),
            "`destinations[0].targetProfile` applies to OAuth2SAMLBearerAssertion destinations only",
        ),
    ];
    for (config, expected) in cases {
        let message = refused(config);
        assert!(
            message.contains(expected),
            "{message}\n  expected: {expected}"
        );
    }
}

#[test]
fn salesforce_refuses_an_ecdsa_key_and_profiles_leave_notices() {
    let mut config = profiled("salesforce", |d| {
        d.remove("assertionIssuer");
        d.remove("audience");
        d.insert("clientKey".into(), json!("3MVG9key"));
        d.insert(
            "assertionRecipient".into(),
            json!("https://login.salesforce.com/services/oauth2/token"),
        );
        d.insert("KeyStoreLocation".into(), json!("ec"));
    });
    config["keys"]["ec"] = json!({
        "privateKey": include_str!("../../tests/fixtures/ec-key.pem"),
        "certificate": include_str!("../../tests/fixtures/ec-cert.pem"),
    });
    assert!(refused(config).contains(
        "`destinations[0].KeyStoreLocation` names an ECDSA key: Salesforce verifies RSA signatures only"
    ));
    let abap = parse(&profiled("abap", |d| {
        d.remove("tokenServiceUser");
        d.remove("tokenServicePassword");
    }))
    .unwrap();
    assert!(abap
        .notices
        .iter()
        .any(|n| n.contains("(abap): AS ABAP's token endpoint is /sap/bc/sec/oauth2/token")));
    assert!(abap
        .notices
        .iter()
        .any(|n| n.contains("authenticates with HTTP Basic")));
    let ignored = parse(&with_destination(|d| {
        d.insert("apiKey".into(), json!("K"));
    }))
    .unwrap();
    assert!(ignored.notices[0].contains("apiKey is ignored"));
}
