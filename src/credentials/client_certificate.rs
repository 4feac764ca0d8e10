//! `PrincipalPropagation`: a short-lived X.509 certificate for the user, signed by the
//! destination's CA key a slice at a time; one signature and no callout. The request
//! carries it in a header (by default `SSL_CLIENT_CERT`, single-line base64 of the DER, as
//! SAP Web Dispatcher sends it) over the gateway's own authenticated TLS connection.

use crate::config::destination::CertificateSettings;
use crate::config::{Destination, Kind, PluginConfig};
use crate::error::Failure;
use crate::flow::recipe::{Answer, Issued, KeySigning, Recipe, Start, Step};
use crate::host::{Level, Telemetry};
use crate::keys::SignError;
use crate::x509::authority::{self, Request};
use base64::Engine;
use std::rc::Rc;
use x509_cert::name::Name;
use x509_cert::spki::SubjectPublicKeyInfoOwned;

/// One user's certificate for one destination.
pub struct ClientCertificate {
    config: Rc<PluginConfig>,
    destination: usize,
    user_id: String,
    subject: Name,
    holder_key: Rc<SubjectPublicKeyInfoOwned>,
    lifetime_ms: u64,
}

impl ClientCertificate {
    /// The certificate for `user_id` (for logs) with `subject`, certifying `holder_key`.
    pub fn new(
        config: Rc<PluginConfig>,
        destination: usize,
        user_id: String,
        subject: Name,
        holder_key: Rc<SubjectPublicKeyInfoOwned>,
    ) -> Self {
        ClientCertificate {
            config,
            destination,
            user_id,
            subject,
            holder_key,
            lifetime_ms: 0,
        }
    }

    fn destination(&self) -> Option<(&Destination, &CertificateSettings)> {
        let dest = self.config.destinations.get(self.destination)?;
        match &dest.kind {
            Kind::ClientCertificate(settings) => Some((dest, settings)),
            Kind::SamlBearer(_) => None,
        }
    }
}

impl Recipe for ClientCertificate {
    fn start(&mut self, input: &Start<'_>) -> Step {
        let Some((dest, settings)) = self.destination() else {
            return Step::Done(Err(Failure::Internal {
                reason: "unknown destination",
            }));
        };
        let Some(key) = self
            .config
            .keys
            .get(&dest.key_name)
            .map(|pair| &pair.active)
        else {
            return Step::Done(Err(cannot_write(input.log, &dest.name)));
        };
        let not_after_s = (input.now_ms + settings.validity_ms) / 1000;
        let request = Request {
            subject: self.subject.clone(),
            holder_key: &self.holder_key,
            serial: input.random,
            not_before_s: input.now_ms.saturating_sub(self.config.clock_skew_ms) / 1000,
            not_after_s,
        };
        let mut unsigned = match authority::write(&settings.authority, &request) {
            Ok(unsigned) => unsigned,
            Err(_) => return Step::Done(Err(cannot_write(input.log, &dest.name))),
        };
        self.lifetime_ms = (not_after_s * 1000).saturating_sub(input.now_ms);
        // The signer hashes the bytes at the start; the certificate keeps the rest.
        let to_be_signed = std::mem::take(&mut unsigned.to_be_signed);
        Step::Sign(Box::new(KeySigning::start(
            key,
            &to_be_signed,
            move |signature| {
                unsigned
                    .signed(&signature)
                    .map(|der| base64::engine::general_purpose::STANDARD.encode(der))
                    .map_err(|_| SignError)
            },
        )))
    }

    fn signed(&mut self, signed: Result<String, SignError>, log: &dyn Telemetry) -> Step {
        match signed {
            Ok(certificate) => Step::Done(Ok(Issued {
                access_token: certificate,
                lifetime_ms: self.lifetime_ms,
            })),
            Err(_) => {
                let name = self.config.destination_name(self.destination).to_string();
                Step::Done(Err(cannot_write(log, &name)))
            }
        }
    }

    fn answered(&mut self, _answer: &Answer<'_>, _log: &dyn Telemetry) -> Step {
        Step::Done(Err(Failure::Internal {
            reason: "a client certificate needs no callout",
        }))
    }

    fn describe(&self) -> (&str, &str) {
        (
            self.config.destination_name(self.destination),
            &self.user_id,
        )
    }
}

/// Logs that no certificate could be made (no user data in the message) and the answer.
fn cannot_write(log: &dyn Telemetry, destination: &str) -> Failure {
    log.log(
        Level::Error,
        &format!("destination {destination}: cannot make the user's client certificate"),
    );
    Failure::Internal {
        reason: "cannot make the client certificate",
    }
}
