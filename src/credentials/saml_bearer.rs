//! `OAuth2SAMLBearerAssertion` signed by the gateway: write an assertion for the user, sign
//! it, exchange it at the destination's token service (RFC 7522), read the token answer.

use crate::config::destination::SamlSettings;
use crate::config::{Destination, PluginConfig};
use crate::error::Failure;
use crate::flow::recipe::{signing_metric, Answer, Issued, Recipe, Start, Step, Stepwise};
use crate::host::{Level, Telemetry};
use crate::identity::{attributes, UserIdRule};
use crate::keys::SignError;
use crate::metrics::Metric;
use crate::oauth::{token_request, token_response};
use crate::saml::assertion::{self, AssertionContent, Attribute, UnwritableField};
use crate::saml::canonical::is_xml_text;
use crate::saml::signature::EnvelopedSigning;
use serde_json::Value;
use std::rc::Rc;

/// The ID of an assertion: `_` and 32 hex digits from 16 random bytes (an NCName).
pub fn assertion_id(random: &[u8; 16]) -> String {
    let mut id = String::with_capacity(33);
    id.push('_');
    for b in random {
        id.push_str(&format!("{b:02x}"));
    }
    id
}

/// SAML attributes for the assertion: the user's (values XML cannot carry are left out),
/// then the ones the target needs in every assertion (its profile's), which replace a
/// user's attribute of the same name. A destination with `SystemUser` has no user's: its
/// one token serves every user, so no user's attributes (their groups, their personal
/// data) may shape it.
pub fn attributes_for(claims: &Value, dest: &Destination, saml: &SamlSettings) -> Vec<Attribute> {
    let mut attributes: Vec<Attribute> = if matches!(dest.user_id, UserIdRule::SystemUser(_)) {
        Vec::new()
    } else {
        attributes::from_claims(
            claims,
            saml.skip_user_attributes_prefix,
            saml.skip_user_uuid,
        )
        .into_iter()
        .filter(|a| is_xml_text(&a.name) && a.values.iter().all(|v| is_xml_text(v)))
        .filter(|a| !saml.fixed_attributes.iter().any(|f| f.name == a.name))
        .collect()
    };
    attributes.extend(saml.fixed_attributes.iter().cloned());
    attributes
}

/// Why no request could be built (configuration was validated, so this is rare).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BuildError {
    /// `KeyStoreLocation` names no key (cannot happen after validation).
    NoKey,
    /// A value cannot be written into XML.
    Unwritable(UnwritableField),
    /// The signature could not be made (see [`SignError`]).
    Signing(SignError),
}

/// Writes a fresh assertion for `user_id` and starts its signature; the caller advances
/// the signature (a slice at a time, see [`EnvelopedSigning::advance`]) and wraps the
/// signed assertion in the destination's token request ([`token_request::build`]).
/// `id` must be new for every call: targets remember assertion IDs and reject replays.
pub fn start(
    config: &PluginConfig,
    destination: &Destination,
    saml: &SamlSettings,
    user_id: &str,
    attributes: &[Attribute],
    now_ms: u64,
    id: &str,
) -> Result<EnvelopedSigning, BuildError> {
    let key = &config
        .keys
        .get(&destination.key_name)
        .ok_or(BuildError::NoKey)?
        .active;
    let content = AssertionContent {
        id,
        issue_instant_ms: now_ms,
        issuer: &saml.assertion_issuer,
        name_id: user_id,
        name_id_format: &saml.name_id_format,
        name_qualifier: saml.name_qualifier.as_deref(),
        recipient: &saml.assertion_recipient,
        audience: &saml.audience,
        authn_context_class_ref: &saml.authn_context_class_ref,
        not_before_ms: now_ms.saturating_sub(config.clock_skew_ms),
        not_on_or_after_ms: now_ms + config.assertion_lifetime_ms,
        attributes,
    };
    let unsigned = assertion::write(&content).map_err(BuildError::Unwritable)?;
    Ok(EnvelopedSigning::start(
        &unsigned,
        id,
        key,
        saml.include_certificate,
    ))
}

/// One user's exchange at one destination.
pub struct SamlBearer {
    config: Rc<PluginConfig>,
    destination: usize,
    user_id: String,
    attributes: Vec<Attribute>,
}

impl SamlBearer {
    /// The exchange for `user_id` at `config.destinations[destination]`, whose assertion
    /// carries `attributes`.
    pub fn new(
        config: Rc<PluginConfig>,
        destination: usize,
        user_id: String,
        attributes: Vec<Attribute>,
    ) -> Self {
        SamlBearer {
            config,
            destination,
            user_id,
            attributes,
        }
    }

    fn destination(&self) -> Result<(&Destination, &SamlSettings), Failure> {
        self.config
            .destinations
            .get(self.destination)
            .and_then(|d| Some((d, d.saml()?)))
            .ok_or(Failure::Internal {
                reason: "unknown destination",
            })
    }
}

impl Recipe for SamlBearer {
    fn start(&mut self, input: &Start<'_>) -> Step {
        let (dest, saml) = match self.destination() {
            Ok(found) => found,
            Err(failure) => return Step::Done(Err(failure)),
        };
        let metric = match self.config.keys.get(&dest.key_name) {
            Some(pair) => signing_metric(&pair.active),
            None => Metric::SigningMicros,
        };
        let id = assertion_id(&input.random);
        match start(
            &self.config,
            dest,
            saml,
            &self.user_id,
            &self.attributes,
            input.now_ms,
            &id,
        ) {
            Ok(signing) => Step::Sign(Box::new(AssertionSigning { signing, metric })),
            Err(e) => Step::Done(Err(cannot_build(input.log, &dest.name, &e))),
        }
    }

    fn signed(&mut self, signed: Result<String, SignError>, log: &dyn Telemetry) -> Step {
        let (dest, saml) = match self.destination() {
            Ok(found) => found,
            Err(failure) => return Step::Done(Err(failure)),
        };
        match signed {
            Ok(document) => Step::Call(token_request::build(saml, &document)),
            Err(e) => Step::Done(Err(cannot_build(log, &dest.name, &BuildError::Signing(e)))),
        }
    }

    fn answered(&mut self, answer: &Answer<'_>, _log: &dyn Telemetry) -> Step {
        if answer.timed_out() {
            return Step::Done(Err(Failure::Timeout));
        }
        Step::Done(
            token_response::parse(answer.status, answer.body).map(|token| Issued {
                access_token: token.access_token,
                lifetime_ms: token.expires_in_s * 1000,
            }),
        )
    }

    fn describe(&self) -> (&str, &str) {
        (
            self.config.destination_name(self.destination),
            &self.user_id,
        )
    }
}

/// The assertion's signature under way.
struct AssertionSigning {
    signing: EnvelopedSigning,
    metric: Metric,
}

impl Stepwise for AssertionSigning {
    fn advance(&mut self, units: usize) -> Option<Result<String, SignError>> {
        self.signing.advance(units)
    }

    fn metric(&self) -> Metric {
        self.metric
    }

    fn units_per_step(&self) -> usize {
        self.signing.units_per_step()
    }
}

/// Logs why no assertion could be made (no user data in the message) and the answer.
fn cannot_build(log: &dyn Telemetry, destination: &str, error: &BuildError) -> Failure {
    log.log(
        Level::Error,
        &format!("destination {destination}: cannot build assertion: {error:?}"),
    );
    Failure::Internal {
        reason: "cannot build the SAML assertion",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_ncnames_from_the_random_bytes() {
        let id = assertion_id(&[0xab; 16]);
        assert_eq!(id, format!("_{}", "ab".repeat(16)));
        assert_ne!(id, assertion_id(&[0xac; 16]));
    }
}
