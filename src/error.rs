//! The error contract: every failure on the request path is one of these, and each maps
//! to exactly one local reply (status, headers, JSON body without secrets).

use crate::identity::UserIdError;
use crate::x509::subject::SubjectError;
use serde_json::json;

/// Seconds a client is asked to wait before retrying after a token service failure.
pub const RETRY_AFTER_SECONDS: u32 = 5;
/// Seconds a client is asked to wait when the gateway itself is busy.
pub const OVERLOADED_RETRY_AFTER_SECONDS: u32 = 1;

/// Why a request cannot be forwarded with a token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Failure {
    /// No verified JWT payload: the user is not authenticated.
    NotAuthenticated,
    /// The claims name no usable user id.
    UserId(UserIdError),
    /// The user id holds characters a SAML assertion (XML 1.0) cannot carry.
    UserIdNotXml,
    /// The claims make no certificate subject (a value a DN cannot carry, or missing).
    Subject(SubjectError),
    /// The token service refused the exchange with this OAuth error code.
    Rejected { code: String },
    /// The identity provider refused to issue the assertion (on-behalf-of) with this
    /// code (`invalid_grant AADSTS65001`): a set-up problem of the gateway's application.
    AssertionRefused { code: String },
    /// The identity provider refused the user's own token (expired, another audience,
    /// not verifiable): the user must sign in again.
    UserTokenRefused { code: String },
    /// The token service could not be reached or answered something unusable.
    Unavailable { reason: &'static str },
    /// The token service did not answer within the configured timeout.
    Timeout,
    /// The gateway is too busy to exchange now (its cap of exchanges in flight, or an
    /// exchange that could not start in time).
    Overloaded { reason: &'static str },
    /// A fault of the gateway itself (for example no randomness for the assertion ID).
    Internal { reason: &'static str },
    /// Nothing selects a destination for the request, and the configuration refuses such
    /// requests (`unmatchedRequests: refuse`).
    NoDestination,
}

/// A local reply to send instead of forwarding the request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalReply {
    pub status: u32,
    pub headers: Vec<(&'static str, String)>,
    pub body: String,
}

impl Failure {
    /// Status, OAuth-style error code and a description without secrets.
    fn parts(&self) -> (u32, &'static str, String) {
        match self {
            Failure::NotAuthenticated => (
                401,
                "unauthorized",
                "an authenticated user is required".to_string(),
            ),
            Failure::UserId(e) => (401, "unauthorized", e.to_string()),
            Failure::UserIdNotXml => (
                401,
                "unauthorized",
                "user ID contains characters that a SAML assertion cannot carry".to_string(),
            ),
            Failure::Subject(e) => (401, "unauthorized", e.to_string()),
            Failure::Rejected { code } => (
                502,
                "bad_gateway",
                format!("token service rejected the SAML bearer assertion: {code}"),
            ),
            Failure::AssertionRefused { code } => (
                502,
                "bad_gateway",
                format!("identity provider refused to issue the SAML assertion: {code}"),
            ),
            Failure::UserTokenRefused { code } => (
                401,
                "unauthorized",
                format!("identity provider refused the user's token: {code}"),
            ),
            Failure::Unavailable { reason } => (
                503,
                "temporarily_unavailable",
                format!("token service unavailable: {reason}"),
            ),
            Failure::Timeout => (
                504,
                "gateway_timeout",
                "token service did not answer in time".to_string(),
            ),
            Failure::Overloaded { reason } => (
                503,
                "temporarily_unavailable",
                format!("the gateway is busy: {reason}; retry shortly"),
            ),
            Failure::Internal { reason } => (500, "server_error", reason.to_string()),
            Failure::NoDestination => (
                403,
                "access_denied",
                "no destination is configured for this request".to_string(),
            ),
        }
    }

    /// The description the client sees; also what the log says about the failure.
    pub fn description(&self) -> String {
        self.parts().2
    }

    /// The reply the client sees.
    pub fn reply(&self) -> LocalReply {
        let (status, error, description) = self.parts();
        let mut headers = vec![("content-type", "application/json".to_string())];
        match (status, self) {
            (401, _) => headers.push(("www-authenticate", "Bearer".to_string())),
            (_, Failure::Overloaded { .. }) => {
                headers.push(("retry-after", OVERLOADED_RETRY_AFTER_SECONDS.to_string()))
            }
            (503 | 504, _) => headers.push(("retry-after", RETRY_AFTER_SECONDS.to_string())),
            _ => {}
        }
        LocalReply {
            status,
            headers,
            body: json!({"error": error, "error_description": description}).to_string(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn maps_each_failure_to_the_contract() {
        let r = Failure::NotAuthenticated.reply();
        assert_eq!(r.status, 401);
        assert!(r.headers.contains(&("www-authenticate", "Bearer".into())));
        let r = Failure::UserId(UserIdError::Missing {
            claim: "email".into(),
        })
        .reply();
        assert_eq!(r.status, 401);
        assert!(r.body.contains("claim 'email' is missing"));
        let r = Failure::Rejected {
            code: "invalid_grant".into(),
        }
        .reply();
        assert_eq!(r.status, 502);
        assert!(r.body.contains("invalid_grant"));
        let r = Failure::Unavailable {
            reason: "connection failed",
        }
        .reply();
        assert_eq!((r.status, r.headers[1].0), (503, "retry-after"));
        assert_eq!(Failure::Timeout.reply().status, 504);
        let r = Failure::Overloaded { reason: "busy" }.reply();
        assert_eq!(r.status, 503);
        assert!(r.headers.contains(&("retry-after", "1".into())));
        assert!(r.body.contains("temporarily_unavailable"));
        let body: serde_json::Value = serde_json::from_str(&Failure::Timeout.reply().body).unwrap();
        assert_eq!(body["error"], "gateway_timeout");
        let r = Failure::NoDestination.reply();
        assert_eq!(r.status, 403);
        assert_eq!(r.headers.len(), 1, "no WWW-Authenticate, no Retry-After");
        assert!(r.body.contains("access_denied"));
    }
}
