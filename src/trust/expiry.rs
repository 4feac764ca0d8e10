//! Certificate expiry notices, as SAP's Destination Service sends them: 14, 7 and 3 days
//! ahead, and an error once a certificate has expired.
//!
//! An expired active certificate does not stop signing: targets that pin the
//! certificate keep accepting assertions, and stopping would turn a warning into an
//! outage. The error repeats daily until the certificate is renewed or rotated.

use crate::config::PluginConfig;

/// Days before expiry at which notices start and get more urgent.
pub const NOTICE_DAYS: [i64; 3] = [14, 7, 3];
const DAY_S: i64 = 86_400;

/// One certificate's standing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertificateStatus {
    pub key: String,
    /// `active` or `passive`.
    pub slot: &'static str,
    /// Whole days until expiry (negative once expired).
    pub days_left: i64,
    pub not_after_s: u64,
}

/// What to log about one certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Notice {
    /// Expires within one of [`NOTICE_DAYS`] (the smallest threshold reached).
    ExpiresSoon {
        status: CertificateStatus,
        threshold_days: i64,
    },
    Expired {
        status: CertificateStatus,
    },
}

impl Notice {
    pub fn message(&self) -> String {
        match self {
            Notice::ExpiresSoon { status, threshold_days } => format!(
                "certificate of key {:?} ({}) expires in {} day(s), within {threshold_days} days: renew it, or register the passive certificate at the targets and rotate",
                status.key, status.slot, status.days_left
            ),
            Notice::Expired { status } => format!(
                "certificate of key {:?} ({}) has expired {} day(s) ago; assertions are still signed with it, but targets that check validity will reject them: renew or rotate now",
                status.key, status.slot, -status.days_left
            ),
        }
    }
}

/// Every certificate of the key set with its days left at `now_s`.
pub fn statuses(config: &PluginConfig, now_s: u64) -> Vec<CertificateStatus> {
    let mut out = Vec::new();
    for (name, pair) in &config.keys {
        let slots = std::iter::once(("active", &pair.active))
            .chain(pair.passive.as_ref().map(|k| ("passive", k)));
        for (slot, key) in slots {
            let not_after_s = key.certificate().not_after_s;
            let seconds_left = not_after_s as i64 - now_s as i64;
            out.push(CertificateStatus {
                key: name.clone(),
                slot,
                days_left: seconds_left.div_euclid(DAY_S),
                not_after_s,
            });
        }
    }
    out
}

/// The notices due at `now_s`.
pub fn notices(config: &PluginConfig, now_s: u64) -> Vec<Notice> {
    statuses(config, now_s)
        .into_iter()
        .filter_map(|status| {
            if status.not_after_s <= now_s {
                return Some(Notice::Expired { status });
            }
            let threshold = NOTICE_DAYS.iter().rev().find(|&&d| status.days_left < d)?;
            Some(Notice::ExpiresSoon {
                threshold_days: *threshold,
                status,
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{config_json, destination_json, parse};

    #[test]
    fn warns_at_14_7_and_3_days_and_errors_once_expired() {
        let config = parse(&config_json(vec![destination_json("d")])).unwrap();
        let not_after = config.keys["default"].active.certificate().not_after_s;
        let at = |days_before: i64| (not_after as i64 - days_before * DAY_S + 60) as u64;
        assert!(notices(&config, at(20)).is_empty());
        let threshold = |n: &Notice| match n {
            Notice::ExpiresSoon { threshold_days, .. } => *threshold_days,
            Notice::Expired { .. } => 0,
        };
        assert_eq!(
            notices(&config, at(14))
                .iter()
                .map(threshold)
                .collect::<Vec<_>>(),
            [14]
        );
        assert_eq!(
            notices(&config, at(7))
                .iter()
                .map(threshold)
                .collect::<Vec<_>>(),
            [7]
        );
        assert_eq!(
            notices(&config, at(3))
                .iter()
                .map(threshold)
                .collect::<Vec<_>>(),
            [3]
        );
        assert_eq!(
            notices(&config, at(1))
                .iter()
                .map(threshold)
                .collect::<Vec<_>>(),
            [3]
        );
        let expired = notices(&config, not_after + 2 * DAY_S as u64);
        assert!(matches!(&expired[..], [Notice::Expired { status }] if status.days_left == -2));
        assert!(expired[0].message().contains("expired 2 day(s) ago"));
        assert_eq!(statuses(&config, at(14))[0].days_left, 13);
    }
}
