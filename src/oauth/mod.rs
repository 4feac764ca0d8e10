//! The token exchanges: the RFC 7522 request we send and the answer we accept, and the
//! on-behalf-of request that gets an assertion from the user's identity provider.

pub mod on_behalf_of;
pub mod token_request;
pub mod token_response;
