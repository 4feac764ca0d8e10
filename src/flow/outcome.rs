//! What an exchange's result leaves in the cache, and what it tells the operator.
//!
//! Nothing unusable is ever cached as a token. A failure is remembered briefly per user
//! (a rejection for `failedExchangeHoldSeconds`, a transport failure for
//! [`FAILURE_BACKOFF_MS`]), so that a broken user cannot hammer the token service. A refresh
//! that brings nothing better leaves the still-usable token in place: a failed one tries
//! again after the backoff, a successful one whose token is too short-lived to cache does
//! not try again before the old token runs out.

use super::recipe::{Issued, Recipe};
use crate::cache::{self, CacheKey, Entry, TokenTimes};
use crate::config::PluginConfig;
use crate::error::Failure;
use crate::host::{Level, Telemetry};
use crate::metrics::Metric;

/// How long a transport failure (unreachable, garbage, timeout) is answered from
/// shared data before the next request tries again. Short, so that service resumes
/// within a second of the token service healing (this plus one exchange); long enough
/// that a failing token service sees at most two exchanges a second per user and
/// destination, however many requests arrive (they share one exchange anyway).
pub const FAILURE_BACKOFF_MS: u64 = 500;

/// The slot's entry after an exchange for `key` ended with `result` at `now_ms`, given the
/// entry it holds for this identity now (`current`); `None` leaves the slot as it is.
pub fn entry_after(
    result: &Result<Issued, Failure>,
    current: Option<Entry>,
    config: &PluginConfig,
    key: &CacheKey,
    now_ms: u64,
) -> Option<Entry> {
    let usable = match current.and_then(|e| e.live_at(now_ms)) {
        Some(Entry::Token {
            access_token,
            times,
        }) => Some((access_token, times)),
        _ => None,
    };
    let keep = |(access_token, times): (String, TokenTimes), refresh_at_ms: u64| {
        Some(Entry::Token {
            access_token,
            times: TokenTimes {
                refresh_at_ms: refresh_at_ms.min(times.reuse_until_ms),
                reuse_until_ms: times.reuse_until_ms,
            },
        })
    };
    match result {
        Ok(issued) => {
            let times = cache::token_times(
                now_ms,
                issued.lifetime_ms,
                config.token_margin_ms,
                key.jitter(),
            );
            if times.reuse_until_ms > now_ms {
                return Some(Entry::Token {
                    access_token: issued.access_token.clone(),
                    times,
                });
            }
            // Too short-lived (or of unknown lifetime) to cache: it served its waiters. A
            // token still usable stays, and is not refreshed again before it runs out.
            usable.and_then(|old| {
                let until = old.1.reuse_until_ms;
                keep(old, until)
            })
        }
        Err(_) if usable.is_some() => usable.and_then(|old| keep(old, now_ms + FAILURE_BACKOFF_MS)),
        Err(Failure::Rejected { code }) => (config.failure_hold_ms > 0).then(|| Entry::Rejected {
            code: code.clone(),
            until_ms: now_ms + config.failure_hold_ms,
        }),
        Err(Failure::AssertionRefused { code }) => {
            (config.failure_hold_ms > 0).then(|| Entry::Rejected {
                code: format!("{ASSERTION_REFUSED}{code}"),
                until_ms: now_ms + config.failure_hold_ms,
            })
        }
        // Held only briefly: the user comes back with a new token at once.
        Err(Failure::UserTokenRefused { code }) => Some(Entry::Rejected {
            code: format!("{USER_TOKEN_REFUSED}{code}"),
            until_ms: now_ms + FAILURE_BACKOFF_MS,
        }),
        Err(failure) => Some(Entry::Failed {
            timeout: *failure == Failure::Timeout,
            until_ms: now_ms + FAILURE_BACKOFF_MS,
        }),
    }
}

/// Counts the result and logs what an operator needs: rejections with the user and the
/// OAuth code, other failures with their reason and duration, never a token.
pub fn report(
    log: &dyn Telemetry,
    recipe: &dyn Recipe,
    result: &Result<Issued, Failure>,
    elapsed_ms: u64,
    counts: &mut dyn FnMut(Metric),
) {
    let (destination, user) = recipe.describe();
    match result {
        Ok(issued) => {
            counts(Metric::ExchangeOk);
            if issued.lifetime_ms > 0 && issued.lifetime_ms <= cache::MIN_MARGIN_MS {
                log.log(
                    Level::Info,
                    &format!(
                        "destination {destination}: the token service issues tokens of {} s, too short-lived to cache",
                        issued.lifetime_ms / 1000
                    ),
                );
            }
        }
        Err(Failure::Rejected { code }) => {
            counts(Metric::ExchangeRejected);
            log.log(
                Level::Warn,
                &format!(
                    "destination {destination}: token service rejected the assertion for user {user:?}: {code}"
                ),
            );
        }
        Err(Failure::AssertionRefused { code } | Failure::UserTokenRefused { code }) => {
            counts(Metric::ExchangeRejected);
            log.log(
                Level::Warn,
                &format!(
                    "destination {destination}: the identity provider refused the on-behalf-of exchange for user {user:?}: {code}"
                ),
            );
        }
        Err(failure) => {
            counts(Metric::ExchangeFailed);
            log.log(
                Level::Warn,
                &format!(
                    "destination {destination}: token exchange failed after {elapsed_ms} ms: {}",
                    failure.description()
                ),
            );
        }
    }
}

/// How a stored rejection says the identity provider refused (not the token service):
/// a backslash starts no OAuth error code (RFC 6749 §5.2 excludes it), so the prefixes
/// cannot be mistaken for one.
const ASSERTION_REFUSED: &str = "\\assertion ";
const USER_TOKEN_REFUSED: &str = "\\user-token ";

/// What the waiters of an exchange that found `entry` stored get.
pub fn answer_of(entry: Entry) -> Result<(String, u64), Failure> {
    match entry {
        Entry::Token {
            access_token,
            times,
        } => Ok((access_token, times.reuse_until_ms)),
        other => Err(failure_of(other)),
    }
}

/// The failure a stored failure entry stands for.
pub fn failure_of(entry: Entry) -> Failure {
    match entry {
        Entry::Rejected { code, .. } => {
            if let Some(code) = code.strip_prefix(ASSERTION_REFUSED) {
                Failure::AssertionRefused { code: code.into() }
            } else if let Some(code) = code.strip_prefix(USER_TOKEN_REFUSED) {
                Failure::UserTokenRefused { code: code.into() }
            } else {
                Failure::Rejected { code }
            }
        }
        Entry::Failed { timeout: true, .. } => Failure::Timeout,
        Entry::Failed { timeout: false, .. } => Failure::Unavailable {
            reason: "the last exchange failed moments ago; retrying shortly",
        },
        Entry::Token { .. } => Failure::Internal {
            reason: "unexpected token entry",
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{config_json, destination_json, parse};

    const NOW: u64 = 1_000_000;

    fn setup() -> (PluginConfig, CacheKey) {
        let c = parse(&config_json(vec![destination_json("d")])).unwrap();
        let key = CacheKey::new("ns", "alice", 10);
        (c, key)
    }

    fn old_token() -> Entry {
        Entry::Token {
            access_token: "old".into(),
            times: TokenTimes {
                refresh_at_ms: NOW - 1,
                reuse_until_ms: NOW + 60_000,
            },
        }
    }

    fn issued(lifetime_ms: u64) -> Result<Issued, Failure> {
        Ok(Issued {
            access_token: "new".into(),
            lifetime_ms,
        })
    }

    #[test]
    fn a_usable_token_is_cached_with_its_times() {
        let (c, key) = setup();
        let Some(Entry::Token {
            access_token,
            times,
        }) = entry_after(&issued(3_600_000), Some(old_token()), &c, &key, NOW)
        else {
            panic!("a token")
        };
        assert_eq!(access_token, "new");
        assert_eq!(
            times,
            cache::token_times(NOW, 3_600_000, None, key.jitter())
        );
    }

    #[test]
    fn a_refresh_too_short_lived_to_cache_keeps_the_old_token_until_it_runs_out() {
        let (c, key) = setup();
        for lifetime in [0, 20_000] {
            let kept = entry_after(&issued(lifetime), Some(old_token()), &c, &key, NOW);
            assert_eq!(
                kept,
                Some(Entry::Token {
                    access_token: "old".into(),
                    times: TokenTimes {
                        refresh_at_ms: NOW + 60_000,
                        reuse_until_ms: NOW + 60_000
                    }
                })
            );
            assert_eq!(entry_after(&issued(lifetime), None, &c, &key, NOW), None);
        }
    }

    #[test]
    fn a_failed_refresh_keeps_the_token_and_tries_again_after_the_backoff() {
        let (c, key) = setup();
        for failure in [
            Failure::Timeout,
            Failure::Rejected {
                code: "invalid_grant".into(),
            },
        ] {
            let Some(Entry::Token {
                access_token,
                times,
            }) = entry_after(&Err(failure), Some(old_token()), &c, &key, NOW)
            else {
                panic!("the old token")
            };
            assert_eq!(access_token, "old");
            assert_eq!(times.refresh_at_ms, NOW + FAILURE_BACKOFF_MS);
        }
    }

    #[test]
    fn failures_are_held_briefly_never_as_tokens() {
        let (c, key) = setup();
        let rejected = Err(Failure::Rejected {
            code: "invalid_grant".into(),
        });
        assert_eq!(
            entry_after(&rejected, None, &c, &key, NOW),
            Some(Entry::Rejected {
                code: "invalid_grant".into(),
                until_ms: NOW + 5_000
            })
        );
        assert_eq!(
            entry_after(&Err(Failure::Timeout), None, &c, &key, NOW),
            Some(Entry::Failed {
                timeout: true,
                until_ms: NOW + FAILURE_BACKOFF_MS
            })
        );
        let mut no_hold = c.clone();
        no_hold.failure_hold_ms = 0;
        assert_eq!(entry_after(&rejected, None, &no_hold, &key, NOW), None);
        assert!(matches!(answer_of(old_token()), Ok((t, _)) if t == "old"));
        assert_eq!(
            failure_of(Entry::Failed {
                timeout: false,
                until_ms: 0
            })
            .reply()
            .status,
            503
        );
    }
}
