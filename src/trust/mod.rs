//! The gateway's signing trust as targets see it: SAML IdP metadata and certificates to
//! download, and warnings before a certificate expires.

pub mod download;
pub mod expiry;
pub mod metadata;
