//! A request's decision: forward with the cached token, wait for the user's exchange, or
//! answer at once.
//!
//! A cache hit costs as little as the host allows: the user id is one claim read as one
//! property (all claims are read only for an exchange, which needs the assertion's
//! attributes, or when the claim might not be a string); the token comes from the
//! worker's own copy when it has one, else from the shared slot.

use super::exchanges::NewExchange;
use super::outcome::failure_of;
use super::recipe::Recipe;
use super::{Decision, Worker};
use crate::cache::{CacheKey, Entry};
use crate::config::{Destination, Kind, PluginConfig};
use crate::coordination::slot;
use crate::credentials::client_certificate::ClientCertificate;
use crate::credentials::on_behalf_of::OnBehalfOf;
use crate::credentials::saml_bearer::{self, SamlBearer};
use crate::error::Failure;
use crate::host::Host;
use crate::identity::{self, user_token, Identity, Principal};
use crate::metrics::Metric;
use crate::saml::assertion::Attribute;
use crate::saml::canonical::is_xml_text;
use serde_json::Value;
use std::rc::Rc;
use x509_cert::name::Name;

impl Worker {
    /// Decides a request for `config.destinations[destination]` from the user's verified
    /// `identity`.
    pub fn on_request(
        &mut self,
        host: &dyn Host,
        config: &Rc<PluginConfig>,
        request_id: u32,
        destination: usize,
        identity: &dyn Identity,
    ) -> Decision {
        self.on_request_with_expiry(host, config, request_id, destination, identity)
            .0
    }

    /// [`Worker::on_request`], and until when a credential it forwards with may be used
    /// (the find-destination API tells applications): 0 unless it forwards.
    pub fn on_request_with_expiry(
        &mut self,
        host: &dyn Host,
        config: &Rc<PluginConfig>,
        request_id: u32,
        destination: usize,
        identity: &dyn Identity,
    ) -> (Decision, u64) {
        let mut usable_until_ms = 0;
        let decision = self.decide(
            host,
            config,
            request_id,
            destination,
            identity,
            &mut usable_until_ms,
        );
        (decision, usable_until_ms)
    }

    fn decide(
        &mut self,
        host: &dyn Host,
        config: &Rc<PluginConfig>,
        request_id: u32,
        destination: usize,
        identity: &dyn Identity,
        usable_until_ms: &mut u64,
    ) -> Decision {
        self.scheduler.note_request();
        self.help_sign(host);
        let Some(dest) = config.destinations.get(destination) else {
            return Decision::Fail(Failure::Internal {
                reason: "unknown destination",
            });
        };
        let mut claims = None;
        let principal = match identity.quick_principal(&dest.user_id) {
            Some(principal) => principal,
            None => {
                let Some(all) = identity.claims() else {
                    return Decision::Fail(Failure::NotAuthenticated);
                };
                match identity::principal(&dest.user_id, claims.insert(all)) {
                    Ok(principal) => principal,
                    Err(e) => return Decision::Fail(Failure::UserId(e)),
                }
            }
        };
        if dest.saml().is_some() && !is_xml_text(&principal.user_id) {
            return Decision::Fail(Failure::UserIdNotXml);
        }
        let principal_key = principal.key();
        let now_ms = host.now_ms();
        if let Some((token, times)) = self.hot.get(&dest.cache_namespace, &principal_key, now_ms) {
            self.counters.add(Metric::CacheHit, 1);
            *usable_until_ms = times.reuse_until_ms;
            return Decision::Forward(dest.carrier.value(token));
        }
        // What shapes the credential besides the principal (read only for an exchange).
        let mut shaping = || {
            let claims = claims.take().or_else(|| identity.claims())?;
            Some(shaping_of(&claims, dest, identity))
        };
        let key = CacheKey::new(&dest.cache_namespace, &principal_key, config.cache_slots);
        match slot::read_entry(host, &key).and_then(|e| e.live_at(now_ms)) {
            Some(Entry::Token {
                access_token,
                times,
            }) => {
                self.counters.add(Metric::CacheHit, 1);
                if now_ms < times.refresh_at_ms {
                    self.hot.put(
                        &dest.cache_namespace,
                        &principal_key,
                        key.id,
                        &access_token,
                        times,
                    );
                } else if !self.exchanges.contains_key(&key.id)
                    && self.exchanges.len() < config.max_exchanges_per_worker
                {
                    // Refresh in the background; this request goes on with the current token.
                    if let Some(Ok(shaping)) = shaping() {
                        let refresh = self.new_exchange(
                            host,
                            config,
                            destination,
                            key,
                            &principal,
                            shaping,
                            None,
                        );
                        if refresh.is_ok_and(|refresh| self.queue(host, refresh)) {
                            self.counters.add(Metric::Refresh, 1);
                        }
                    }
                }
                *usable_until_ms = times.reuse_until_ms;
                return Decision::Forward(dest.carrier.value(&access_token));
            }
            Some(entry) => return Decision::Fail(failure_of(entry)),
            None => self.counters.add(Metric::CacheMiss, 1),
        }
        if self.join(&key.id, request_id, now_ms) {
            return Decision::Wait;
        }
        if self.exchanges.len() >= config.max_exchanges_per_worker {
            self.counters.add(Metric::AdmissionRefused, 1);
            return Decision::Fail(Failure::Overloaded {
                reason: "too many new users at once",
            });
        }
        let shaping = match shaping() {
            Some(Ok(shaping)) => shaping,
            Some(Err(failure)) => return Decision::Fail(failure),
            None => return Decision::Fail(Failure::NotAuthenticated),
        };
        let exchange = match self.new_exchange(
            host,
            config,
            destination,
            key,
            &principal,
            shaping,
            Some(request_id),
        ) {
            Ok(exchange) => exchange,
            Err(failure) => return Decision::Fail(failure),
        };
        if self.queue(host, exchange) {
            Decision::Wait
        } else {
            Decision::Fail(Failure::Internal {
                reason: "cannot schedule the token exchange",
            })
        }
    }

    /// The exchange for `principal` at `config.destinations[destination]`, by the
    /// destination's credential kind.
    #[allow(clippy::too_many_arguments)]
    fn new_exchange(
        &mut self,
        host: &dyn Host,
        config: &Rc<PluginConfig>,
        destination: usize,
        key: CacheKey,
        principal: &Principal,
        shaping: Shaping,
        waiter: Option<u32>,
    ) -> Result<NewExchange, Failure> {
        let dest = config
            .destinations
            .get(destination)
            .ok_or(Failure::Internal {
                reason: "unknown destination",
            })?;
        let user_id = principal.user_id.clone();
        let recipe: Box<dyn Recipe> = match shaping {
            Shaping::UserToken(user_token) => Box::new(OnBehalfOf::new(
                Rc::clone(config),
                destination,
                user_id,
                user_token,
            )),
            Shaping::Attributes(attributes) => Box::new(SamlBearer::new(
                Rc::clone(config),
                destination,
                user_id,
                attributes,
            )),
            Shaping::Subject(subject) => {
                let holder_key = self
                    .holder_key
                    .at(host.now_ms(), |seed| host.fill_random(seed))
                    .ok_or(Failure::Internal {
                        reason: "no randomness for the certificate's key",
                    })?;
                Box::new(ClientCertificate::new(
                    Rc::clone(config),
                    destination,
                    user_id,
                    subject,
                    holder_key,
                ))
            }
        };
        Ok(NewExchange {
            key,
            recipe,
            config: Rc::clone(config),
            waiter,
            timeout_ms: dest.exchange_timeout_ms(),
            namespace: Rc::from(dest.cache_namespace.as_str()),
            principal: principal.key(),
            carrier: dest.carrier.clone(),
        })
    }
}

/// What shapes a credential besides the principal, read from the claims.
enum Shaping {
    /// The assertion's SAML attributes.
    Attributes(Vec<Attribute>),
    /// The certificate's subject.
    Subject(Name),
    /// The user's own verified token, for the identity provider (on-behalf-of).
    UserToken(String),
}

/// The claims' part in the destination's credential: SAML attributes, the certificate
/// subject (a user whose claims make no valid subject is refused, 401), or the user's
/// verified token for the identity provider.
fn shaping_of(
    claims: &Value,
    dest: &Destination,
    identity: &dyn Identity,
) -> Result<Shaping, Failure> {
    match &dest.kind {
        Kind::SamlBearer(saml) if saml.assertion_service.is_some() => {
            match identity.raw_token() {
                Some(token) if user_token::payload_matches(&token, claims) => {
                    Ok(Shaping::UserToken(token))
                }
                // Another token than the one jwt_authn verified: never passed on.
                Some(_) => Err(Failure::NotAuthenticated),
                None => Err(Failure::Internal {
                    reason: "the user's token is not in the request: the jwt_authn provider must keep it (forward: true)",
                }),
            }
        }
        Kind::SamlBearer(saml) => Ok(Shaping::Attributes(saml_bearer::attributes_for(
            claims, dest, saml,
        ))),
        Kind::ClientCertificate(settings) => settings
            .subject
            .resolve(claims, &dest.user_id)
            .map(Shaping::Subject)
            .map_err(Failure::Subject),
    }
}
