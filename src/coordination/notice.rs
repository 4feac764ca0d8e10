//! Messages on a worker's queue: "wake up and run your queued exchanges" (sent to itself
//! from a request's context, which must not dispatch callouts) and "the exchange of this
//! identity ended" (sent to every other worker).

use crate::cache::ID_LEN;

/// A wake-up sent to the worker's own queue.
pub const WAKE: &[u8] = b"w";
const NOTICE: u8 = b'n';
const NOTICE_LEN: usize = 1 + ID_LEN + 8;

/// "The exchange of this identity has ended (its result, if any, is stored)."
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Notice {
    /// The cache key id of the identity (a hash: no user id travels).
    pub key_id: [u8; ID_LEN],
    /// When the result was stored (host ns), to measure how fast waiters wake.
    pub stored_at_ns: u64,
}

/// A message as read from a queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Message {
    Wake,
    Notice(Notice),
}

impl Notice {
    pub fn encode(&self) -> [u8; NOTICE_LEN] {
        let mut out = [0u8; NOTICE_LEN];
        out[0] = NOTICE;
        out[1..=ID_LEN].copy_from_slice(&self.key_id);
        out[1 + ID_LEN..].copy_from_slice(&self.stored_at_ns.to_be_bytes());
        out
    }
}

impl Message {
    /// `None` for anything else (a message of another version of the plugin).
    pub fn decode(bytes: &[u8]) -> Option<Message> {
        if bytes == WAKE {
            return Some(Message::Wake);
        }
        if bytes.len() != NOTICE_LEN || bytes[0] != NOTICE {
            return None;
        }
        let mut key_id = [0u8; ID_LEN];
        key_id.copy_from_slice(&bytes[1..=ID_LEN]);
        let stored_at_ns = u64::from_be_bytes(bytes[1 + ID_LEN..].try_into().ok()?);
        Some(Message::Notice(Notice {
            key_id,
            stored_at_ns,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_round_trip_and_strangers_are_ignored() {
        let notice = Notice {
            key_id: [7; ID_LEN],
            stored_at_ns: 42,
        };
        assert_eq!(
            Message::decode(&notice.encode()),
            Some(Message::Notice(notice))
        );
        assert_eq!(Message::decode(WAKE), Some(Message::Wake));
        assert_eq!(Message::decode(b""), None);
        assert_eq!(Message::decode(&[0u8; 16]), None, "the old stripe notice");
        assert_eq!(Message::decode(&notice.encode()[..NOTICE_LEN - 1]), None);
    }
}
