//! Host time as SAML `xs:dateTime` values.
//!
//! Time is an input (the host's clock, in milliseconds since the Unix epoch), never read
//! here, so the core stays deterministic under test and identical in every runtime.

/// Formats Unix milliseconds as `YYYY-MM-DDThh:mm:ss.mmmZ` (UTC, as SAML requires).
pub fn xs_date_time(unix_ms: u64) -> String {
    let secs = unix_ms / 1000;
    let millis = unix_ms % 1000;
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    let (year, month, day) = civil_from_days(days);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{millis:03}Z",
        rem / 3600,
        (rem % 3600) / 60,
        rem % 60
    )
}

/// Days since 1970-01-01 to a proleptic Gregorian date (Howard Hinnant's algorithm).
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_epoch_and_known_instants() {
        assert_eq!(xs_date_time(0), "1970-01-01T00:00:00.000Z");
        // 2000-02-29 (leap day in a 400-year leap year) 12:34:56.789
        assert_eq!(xs_date_time(951_827_696_789), "2000-02-29T12:34:56.789Z");
        // 2026-11-22T05:05:21Z
        assert_eq!(xs_date_time(1_795_323_921_000), "2026-11-22T05:05:21.000Z");
        // last millisecond of 2099
        assert_eq!(xs_date_time(4_102_444_799_999), "2099-12-31T23:59:59.999Z");
    }
}
