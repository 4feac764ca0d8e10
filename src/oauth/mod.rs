//! The RFC 7522 token exchange: the request we send and the answer we accept.

pub mod token_request;
pub mod token_response;
