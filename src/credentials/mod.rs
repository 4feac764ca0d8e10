//! The credential kinds: how each kind of destination propagates the user, as a
//! [`crate::flow::recipe::Recipe`] the exchange engine runs.

pub mod client_certificate;
pub mod on_behalf_of;
pub mod saml_bearer;
