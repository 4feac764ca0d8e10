//! How the workers of one Envoy share exchanges: everything here lives in the host's shared
//! data (one map for every worker VM of a `vm_id`) or travels through its shared queues.
//!
//! - [`slot`]: a cache slot holds a user's entry and the lock of that user's exchange, so
//!   that one exchange per identity runs across all workers and nobody waits behind
//!   another user's;
//! - [`notice`]: the message a worker sends when an exchange ended (and its own wake-up);
//! - [`registry`]: which worker queues are alive, so that notices reach every worker and
//!   none goes to a VM that is gone.
//!
//! Keys carry a format version (`v2`): a code update with another layout runs beside the
//! old VMs without either misreading the other's values.

pub mod notice;
pub mod registry;
pub mod slot;
