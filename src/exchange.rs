//! One token exchange for one user: a fresh signed assertion and the request carrying it.

use crate::config::{Destination, PluginConfig};
use crate::keys::SignError;
use crate::saml::assertion::{self, AssertionContent, Attribute, UnwritableField};
use crate::saml::signature::EnvelopedSigning;

/// The ID of an assertion: `_` and 32 hex digits from 16 random bytes (an NCName).
pub fn assertion_id(random: &[u8; 16]) -> String {
    let mut id = String::with_capacity(33);
    id.push('_');
    for b in random {
        id.push_str(&format!("{b:02x}"));
    }
    id
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
/// signed assertion in the destination's token request
/// ([`crate::oauth::token_request::build`]).
/// `id` must be new for every call: targets remember assertion IDs and reject replays.
pub fn start(
    config: &PluginConfig,
    destination: &Destination,
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
        issuer: &destination.assertion_issuer,
        name_id: user_id,
        name_id_format: &destination.name_id_format,
        name_qualifier: destination.name_qualifier.as_deref(),
        recipient: &destination.assertion_recipient,
        audience: &destination.audience,
        authn_context_class_ref: &destination.authn_context_class_ref,
        not_before_ms: now_ms.saturating_sub(config.clock_skew_ms),
        not_on_or_after_ms: now_ms + config.assertion_lifetime_ms,
        attributes,
    };
    let unsigned = assertion::write(&content).map_err(BuildError::Unwritable)?;
    Ok(EnvelopedSigning::start(
        &unsigned,
        id,
        key,
        destination.include_certificate,
    ))
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
