//! SAML 2.0 bearer assertions: canonical writing, attributes and enveloped signature.

pub mod assertion;
pub mod canonical;
pub mod signature;
