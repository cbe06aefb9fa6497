//! How `kiln` writes times and durations, in one place so every table and
//! progress line agrees.
//!
//! The protocol carries milliseconds since the Unix epoch, with 0 meaning
//! "not yet"; the helpers here take that convention as given.

use std::time::{SystemTime, UNIX_EPOCH};

/// Milliseconds since the Unix epoch, this machine's clock.
pub(crate) fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// Compact, fixed-ish width: `0.4s`, `8.1s`, `42s`, `2m05s`, `1h02m`, `3d04h`.
pub(crate) fn duration(ms: u64) -> String {
    let secs = ms / 1000;
    match secs {
        // Stages of a demo take fractions of seconds; a decimal helps there.
        0..10 => format!("{}.{}s", secs, (ms % 1000) / 100),
        10..60 => format!("{secs}s"),
        60..3600 => format!("{}m{:02}s", secs / 60, secs % 60),
        3600..86400 => format!("{}h{:02}m", secs / 3600, (secs % 3600) / 60),
        _ => format!("{}d{:02}h", secs / 86400, (secs % 86400) / 3600),
    }
}

/// How long ago `at_ms` was: `just now`, `12s ago`, `5m ago`, `3h ago`,
/// `2d ago`; `-` for "never" (0).
pub(crate) fn age(at_ms: u64, now_ms: u64) -> String {
    if at_ms == 0 {
        return "-".to_owned();
    }
    let secs = now_ms.saturating_sub(at_ms) / 1000;
    match secs {
        0 => "just now".to_owned(),
        1..60 => format!("{secs}s ago"),
        60..3600 => format!("{}m ago", secs / 60),
        3600..86400 => format!("{}h ago", secs / 3600),
        _ => format!("{}d ago", secs / 86400),
    }
}

/// The length of `start..end`, or `start..now` while it is still going;
/// `None` before it started.
pub(crate) fn elapsed_ms(start_ms: u64, end_ms: u64, now_ms: u64) -> Option<u64> {
    if start_ms == 0 {
        return None;
    }
    let end = if end_ms == 0 { now_ms } else { end_ms };
    Some(end.saturating_sub(start_ms))
}

/// [`elapsed_ms`] formatted, `-` before the start.
pub(crate) fn elapsed(start_ms: u64, end_ms: u64, now_ms: u64) -> String {
    elapsed_ms(start_ms, end_ms, now_ms).map_or_else(|| "-".to_owned(), duration)
}

/// `HH:MM:SS`, local time: the prefix of progress lines.
pub(crate) fn clock(at_ms: u64) -> String {
    local(at_ms).strftime("%H:%M:%S").to_string()
}

/// `YYYY-MM-DD HH:MM:SS`, local time; `-` for 0.
pub(crate) fn datetime(at_ms: u64) -> String {
    if at_ms == 0 {
        return "-".to_owned();
    }
    local(at_ms).strftime("%Y-%m-%d %H:%M:%S").to_string()
}

/// RFC 3339 in UTC (`2024-02-29T23:59:59.25Z`); `None` for 0 ("not yet").
pub(crate) fn rfc3339(at_ms: u64) -> Option<String> {
    (at_ms != 0).then(|| timestamp(at_ms).to_string())
}

fn timestamp(at_ms: u64) -> jiff::Timestamp {
    i64::try_from(at_ms)
        .ok()
        .and_then(|ms| jiff::Timestamp::from_millisecond(ms).ok())
        .unwrap_or(jiff::Timestamp::MAX)
}

/// `at_ms` in this machine's time zone (`TZ`, else `/etc/localtime`; UTC
/// when neither says), through jiff and the system's zone database.
fn local(at_ms: u64) -> jiff::ZonedDateTime {
    timestamp(at_ms).to_zoned_datetime(jiff::tz::TimeZone::system())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_get_coarser_as_they_grow() {
        let cases = [
            (0, "0.0s"),
            (420, "0.4s"),
            (8_160, "8.1s"),
            (42_000, "42s"),
            (125_000, "2m05s"),
            (3_720_000, "1h02m"),
            (273_600_000, "3d04h"),
        ];
        for (ms, want) in cases {
            assert_eq!(duration(ms), want, "{ms} ms");
        }
    }

    #[test]
    fn ages_count_back_from_now() {
        let now = 1_000_000_000;
        assert_eq!(age(0, now), "-");
        assert_eq!(age(now - 300, now), "just now");
        assert_eq!(age(now - 12_000, now), "12s ago");
        assert_eq!(age(now - 5 * 60_000, now), "5m ago");
        assert_eq!(age(now - 3 * 3_600_000, now), "3h ago");
        assert_eq!(
            age(now + 5_000, now),
            "just now",
            "clock skew is not negative age"
        );
    }

    #[test]
    fn elapsed_runs_to_now_until_finished() {
        assert_eq!(elapsed_ms(0, 0, 50), None);
        assert_eq!(elapsed_ms(10, 0, 50), Some(40));
        assert_eq!(elapsed_ms(10, 30, 50), Some(20));
        assert_eq!(elapsed(0, 0, 50), "-");
    }

    #[test]
    fn rfc3339_is_utc_with_milliseconds() {
        assert_eq!(rfc3339(0), None);
        // A leap day.
        assert_eq!(
            rfc3339(1_709_251_199_000).as_deref(),
            Some("2024-02-29T23:59:59Z")
        );
        assert_eq!(
            rfc3339(951_912_000_250).as_deref(),
            Some("2000-03-01T12:00:00.25Z")
        );
    }

    #[test]
    fn local_times_have_the_documented_shape() {
        let text = datetime(1_709_251_199_000);
        assert_eq!(text.len(), "2024-02-29 23:59:59".len(), "{text}");
        assert_eq!(clock(1_709_251_199_000).len(), "23:59:59".len());
        assert_eq!(datetime(0), "-");
    }
}
