//! `OAuth2SAMLBearerAssertion` with the assertion from the user's identity provider:
//! Microsoft Entra ID's on-behalf-of flow exchanges the user's own token for a SAML
//! assertion that Entra signs for the target, then that assertion is exchanged at the
//! target's token service (RFC 7522). Two callouts in a row under one lock; with a key
//! credential, a `client_assertion` JWT is signed first. Only the final token is
//! cached: the assertion is used once (targets remember assertion IDs).

use crate::config::destination::{AssertionService, ClientCredential, SamlSettings};
use crate::config::{AssertionEncoding, Destination, PluginConfig};
use crate::error::Failure;
use crate::flow::recipe::{Answer, Issued, KeySigning, Recipe, Start, Step};
use crate::host::{Level, Telemetry};
use crate::keys::{SignError, ECDSA_SHA256};
use crate::oauth::{on_behalf_of, token_request, token_response};
use base64::engine::general_purpose::{STANDARD, URL_SAFE, URL_SAFE_NO_PAD};
use base64::Engine;
use serde_json::Value;
use std::rc::Rc;

/// Entra's codes that mean the user's token itself is unusable (401, not 502):
/// AADSTS50013 (invalid assertion), AADSTS500133 (expired), AADSTS500131 (issued for
/// another application).
const USER_TOKEN_CODES: [u64; 3] = [50013, 500133, 500131];

/// Where the exchange stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stage {
    /// The on-behalf-of call is out.
    AssertionAsked,
    /// The RFC 7522 call is out.
    TokenAsked,
}

/// One user's exchange through the identity provider.
pub struct OnBehalfOf {
    config: Rc<PluginConfig>,
    destination: usize,
    user_id: String,
    /// The user's verified JWT, as the client sent it.
    user_token: String,
    stage: Stage,
}

impl OnBehalfOf {
    /// The exchange of `user_token` (the verified JWT of `user_id`) at
    /// `config.destinations[destination]`.
    pub fn new(
        config: Rc<PluginConfig>,
        destination: usize,
        user_id: String,
        user_token: String,
    ) -> Self {
        OnBehalfOf {
            config,
            destination,
            user_id,
            user_token,
            stage: Stage::AssertionAsked,
        }
    }

    fn settings(&self) -> Result<(&Destination, &SamlSettings, &AssertionService), Failure> {
        let dest = self.config.destinations.get(self.destination);
        dest.and_then(|d| {
            let saml = d.saml()?;
            Some((d, saml, saml.assertion_service.as_ref()?))
        })
        .ok_or(Failure::Internal {
            reason: "unknown destination",
        })
    }

    fn ask_for_assertion(&mut self, client_assertion: Option<&str>) -> Step {
        let request = match self.settings() {
            Ok((_, _, service)) => {
                on_behalf_of::request(service, &self.user_token, client_assertion)
            }
            Err(failure) => return Step::Done(Err(failure)),
        };
        self.stage = Stage::AssertionAsked;
        Step::Call(request)
    }
}

impl Recipe for OnBehalfOf {
    fn start(&mut self, input: &Start<'_>) -> Step {
        let (dest, service) = match self.settings() {
            Ok((dest, _, service)) => (dest, service),
            Err(failure) => return Step::Done(Err(failure)),
        };
        let ClientCredential::AssertionKey(name) = &service.credential else {
            return self.ask_for_assertion(None);
        };
        let Some(key) = self.config.keys.get(name).map(|pair| &pair.active) else {
            return Step::Done(Err(cannot_sign(input.log, &dest.name)));
        };
        let Ok(certificate) = STANDARD.decode(key.certificate_base64()) else {
            return Step::Done(Err(cannot_sign(input.log, &dest.name)));
        };
        let alg = if key.signature_method() == ECDSA_SHA256 {
            "ES256"
        } else {
            "RS256"
        };
        let signing_input = on_behalf_of::client_assertion_input(
            service,
            alg,
            &certificate,
            input.now_ms / 1000,
            &input.random,
        );
        let message = signing_input.clone();
        Step::Sign(Box::new(KeySigning::start(
            key,
            message.as_bytes(),
            move |signature| Ok(on_behalf_of::client_assertion(&signing_input, &signature)),
        )))
    }

    fn signed(&mut self, signed: Result<String, SignError>, log: &dyn Telemetry) -> Step {
        match signed {
            Ok(client_assertion) => self.ask_for_assertion(Some(&client_assertion)),
            Err(_) => {
                let name = self.config.destination_name(self.destination).to_string();
                Step::Done(Err(cannot_sign(log, &name)))
            }
        }
    }

    fn answered(&mut self, answer: &Answer<'_>, _log: &dyn Telemetry) -> Step {
        if answer.timed_out() {
            return Step::Done(Err(Failure::Timeout));
        }
        let saml = match self.settings() {
            Ok((_, saml, _)) => saml,
            Err(failure) => return Step::Done(Err(failure)),
        };
        match self.stage {
            Stage::AssertionAsked => {
                let requested = saml
                    .assertion_service
                    .as_ref()
                    .map_or("", |service| service.token_type);
                let assertion = match assertion_of(answer, requested)
                    .and_then(|issued| encoded_for(saml, &issued))
                {
                    Ok(assertion) => assertion,
                    Err(failure) => return Step::Done(Err(failure)),
                };
                let request = token_request::build_encoded(saml, &assertion);
                self.stage = Stage::TokenAsked;
                Step::Call(request)
            }
            Stage::TokenAsked => Step::Done(token_response::parse(answer.status, answer.body).map(
                |token| Issued {
                    access_token: token.access_token,
                    lifetime_ms: token.expires_in_s * 1000,
                },
            )),
        }
    }

    fn describe(&self) -> (&str, &str) {
        (
            self.config.destination_name(self.destination),
            &self.user_id,
        )
    }
}

/// The assertion in the identity provider's answer (`access_token`, base64url as
/// issued), or why there is none: its OAuth error (401 when the user's token is the
/// problem, else 502), or the transport failure as for a token service.
fn assertion_of(answer: &Answer<'_>, requested_type: &str) -> Result<String, Failure> {
    match answer.status {
        Some(200) => {}
        Some(400..=499) => {
            return Err(match token_response::error_detail(answer.body) {
                Some((error, numeric)) => {
                    let code = match numeric {
                        Some(n) => format!("{error} AADSTS{n}"),
                        None => error,
                    };
                    if numeric.is_some_and(|n| USER_TOKEN_CODES.contains(&n)) {
                        Failure::UserTokenRefused { code }
                    } else {
                        Failure::AssertionRefused { code }
                    }
                }
                None => Failure::Unavailable {
                    reason: "identity provider: client error without an OAuth error",
                },
            })
        }
        status => {
            return Err(token_response::parse(status, answer.body).err().unwrap_or(
                Failure::Unavailable {
                    reason: "identity provider: unexpected status",
                },
            ))
        }
    }
    let garbage = |reason| Failure::Unavailable { reason };
    if answer.body.len() > token_response::MAX_RESPONSE_BYTES {
        return Err(garbage("identity provider: response too large"));
    }
    let json: Value = serde_json::from_slice(answer.body)
        .map_err(|_| garbage("identity provider: response is not JSON"))?;
    if let Some(issued) = json.get("issued_token_type") {
        if issued.as_str() != Some(requested_type) {
            return Err(garbage("identity provider: issued another token type"));
        }
    }
    let assertion = json
        .get("access_token")
        .and_then(Value::as_str)
        .filter(|a| !a.is_empty())
        .ok_or(garbage("identity provider: response has no assertion"))?;
    // base64url as Entra sends it (padding tolerated); the bytes must be XML.
    let xml = URL_SAFE_NO_PAD
        .decode(assertion.trim_end_matches('='))
        .map_err(|_| garbage("identity provider: the assertion is not base64url"))?;
    if !xml.trim_ascii_start().starts_with(b"<") {
        return Err(garbage("identity provider: the assertion is not XML"));
    }
    Ok(assertion.to_string())
}

/// The assertion as the destination's `samlAssertionEncoding` wants it: as issued
/// (base64url), or re-encoded as standard base64 (SuccessFactors).
fn encoded_for(saml: &SamlSettings, issued: &str) -> Result<String, Failure> {
    match saml.encoding {
        AssertionEncoding::Base64Url => Ok(issued.to_string()),
        AssertionEncoding::Base64 => URL_SAFE
            .decode(issued)
            .or_else(|_| URL_SAFE_NO_PAD.decode(issued))
            .map(|xml| STANDARD.encode(xml))
            .map_err(|_| Failure::Unavailable {
                reason: "identity provider: the assertion is not base64url",
            }),
    }
}

/// Logs that no client assertion could be signed (no user data) and the answer.
fn cannot_sign(log: &dyn Telemetry, destination: &str) -> Failure {
    log.log(
        Level::Error,
        &format!("destination {destination}: cannot sign the client assertion"),
    );
    Failure::Internal {
        reason: "cannot sign the client assertion",
    }
}
