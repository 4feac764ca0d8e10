//! Short-lived X.509 client certificates for users (SAP's `PrincipalPropagation`, as the
//! Cloud Connector does it for on-premise systems): the subject names the user, the
//! gateway's CA key signs, the backend trusts the certificate because it arrives over the
//! gateway's own authenticated connection.

pub mod authority;
pub mod holder;
pub mod subject;
