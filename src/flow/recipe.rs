//! One exchange's steps, as the engine sees them: a [`Recipe`] says how a credential is
//! made (sign something, call a service, read its answer); the engine decides when each step
//! runs, holds the cross-worker lock meanwhile, enforces the deadlines and caches the result.
//! A new credential kind is a new recipe: a short-lived X.509 certificate is one signature
//! and no callout, an assertion fetched from the user's identity provider is two callouts in
//! a row. Neither touches the scheduler, the locks or the cache.

use crate::error::Failure;
use crate::host::Telemetry;
use crate::keys::{SignError, Signing, SigningKey, ECDSA_SHA256};
use crate::metrics::Metric;
use crate::oauth::token_request::TokenRequest;

/// How one exchange makes its credential, a step at a time.
pub trait Recipe {
    /// The first step, once the exchange may run.
    fn start(&mut self, start: &Start<'_>) -> Step;
    /// The signature asked for by the last [`Step::Sign`] is done (or failed).
    fn signed(&mut self, signed: Result<String, SignError>, log: &dyn Telemetry) -> Step;
    /// The callout asked for by the last [`Step::Call`] ended.
    fn answered(&mut self, answer: &Answer<'_>, log: &dyn Telemetry) -> Step;
    /// The destination's name and the user id, for log lines (never secrets).
    fn describe(&self) -> (&str, &str);
}

/// What a recipe's first step gets.
pub struct Start<'a> {
    /// Host time (ms since the Unix epoch).
    pub now_ms: u64,
    /// Fresh random bytes, for IDs that must never repeat (SAML assertion IDs).
    pub random: [u8; 16],
    pub log: &'a dyn Telemetry,
}

/// What the engine should do next for an exchange.
pub enum Step {
    /// Compute this signature, a slice at a time (see [`crate::flow::scheduler`]).
    Sign(Box<dyn Stepwise>),
    /// Send this request through the host's callout and report its answer.
    Call(TokenRequest),
    /// The exchange is over: a credential to cache and forward, or why there is none.
    Done(Result<Issued, Failure>),
}

/// Work that can stop between units, so that a worker serves other requests in between.
pub trait Stepwise {
    /// Does up to `units` units of work; `Some` with the signed artifact once done (and
    /// only once).
    fn advance(&mut self, units: usize) -> Option<Result<String, SignError>>;
    /// The histogram its time is recorded in.
    fn metric(&self) -> Metric;
    /// How many units make a step of 20–40 µs: what a request does in passing, and how
    /// often a slice looks at the clock.
    fn units_per_step(&self) -> usize;
}

/// The histogram a signature by `key` is recorded in.
pub fn signing_metric(key: &SigningKey) -> Metric {
    if key.signature_method() == ECDSA_SHA256 {
        Metric::SigningEcMicros
    } else {
        Metric::SigningMicros
    }
}

/// Makes the signed artifact from the raw signature.
type Finish = dyn FnOnce(Vec<u8>) -> Result<String, SignError>;

/// A key's raw signature under way, turned into the recipe's artifact once done (a
/// certificate, a JWT).
pub struct KeySigning {
    signing: Signing,
    finish: Option<Box<Finish>>,
    metric: Metric,
}

impl KeySigning {
    /// Starts signing `message` with `key`; `finish` makes the artifact of the signature.
    pub fn start(
        key: &SigningKey,
        message: &[u8],
        finish: impl FnOnce(Vec<u8>) -> Result<String, SignError> + 'static,
    ) -> Self {
        KeySigning {
            signing: key.start_signing(message),
            finish: Some(Box::new(finish)),
            metric: signing_metric(key),
        }
    }
}

impl Stepwise for KeySigning {
    fn advance(&mut self, units: usize) -> Option<Result<String, SignError>> {
        let signature = self.signing.advance(units)?;
        let finish = self.finish.take()?;
        Some(signature.and_then(finish))
    }

    fn metric(&self) -> Metric {
        self.metric
    }

    fn units_per_step(&self) -> usize {
        self.signing.units_per_step()
    }
}

/// How a callout ended.
pub struct Answer<'a> {
    /// `None` when the host saw no `:status` (connection failure, reset or timeout).
    pub status: Option<u16>,
    pub body: &'a [u8],
    /// Time from dispatch to the answer.
    pub elapsed_ms: u64,
    /// The timeout the callout was dispatched with.
    pub timeout_ms: u64,
}

/// A callout that ends without a response after this share of its timeout (percent) is
/// taken for a timeout: Envoy resets a callout whose response headers arrived but whose
/// body was still trickling in when the timeout hit, and reports no status. Envoy arms
/// the timer from its event loop's cached clock, so it fires some tens of milliseconds
/// before the timeout as measured here (seen: 970–991 ms of 1000).
const TIMEOUT_SHARE_PERCENT: u64 = 90;

impl Answer<'_> {
    /// True when the callout ran into its timeout (rather than being refused or reset).
    pub fn timed_out(&self) -> bool {
        self.status.is_none() && self.elapsed_ms * 100 >= self.timeout_ms * TIMEOUT_SHARE_PERCENT
    }
}

/// A credential the exchange obtained.
#[derive(Clone, PartialEq, Eq)]
pub struct Issued {
    /// What goes into the request's `Authorization: Bearer` header.
    pub access_token: String,
    /// How long it lives; 0 when unknown (it then serves the waiting requests and is not
    /// cached).
    pub lifetime_ms: u64,
}

impl std::fmt::Debug for Issued {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Issued(lifetime_ms: {})", self.lifetime_ms)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_silent_callout_is_a_timeout_only_near_its_timeout() {
        let answer = |status, elapsed_ms| Answer {
            status,
            body: b"",
            elapsed_ms,
            timeout_ms: 1_000,
        };
        assert!(!answer(None, 899).timed_out(), "a reset");
        assert!(answer(None, 900).timed_out());
        assert!(answer(None, 5_000).timed_out());
        assert!(!answer(Some(504), 5_000).timed_out(), "an answer");
        assert!(!format!(
            "{:?}",
            Issued {
                access_token: "secret".into(),
                lifetime_ms: 1
            }
        )
        .contains("secret"));
    }
}
