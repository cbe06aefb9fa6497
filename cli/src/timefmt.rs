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
    let t = local(at_ms);
    format!("{:02}:{:02}:{:02}", t.hour, t.minute, t.second)
}

/// `YYYY-MM-DD HH:MM:SS`, local time; `-` for 0.
pub(crate) fn datetime(at_ms: u64) -> String {
    if at_ms == 0 {
        return "-".to_owned();
    }
    let t = local(at_ms);
    format!(
        "{:04}-{:02}-{:02} {:02}:{:02}:{:02}",
        t.year, t.month, t.day, t.hour, t.minute, t.second
    )
}

/// A calendar date and wall-clock time.
#[derive(Debug, PartialEq, Eq)]
struct Civil {
    year: i64,
    month: u32,
    day: u32,
    hour: u32,
    minute: u32,
    second: u32,
}

/// Local time through the C library, because it alone knows the time zone
/// rules (`TZ`, `/etc/localtime`); UTC if it cannot tell.
fn local(at_ms: u64) -> Civil {
    let Ok(secs) = libc::time_t::try_from(at_ms / 1000) else {
        return utc(at_ms);
    };
    // SAFETY: `tm` is plain old data (all-zero is valid, the zone pointer
    // null); `localtime_r` is the re-entrant variant and writes only into
    // the `tm` we pass, reading `secs` through a pointer to a live local.
    let mut tm: libc::tm = unsafe { std::mem::zeroed() };
    let converted = unsafe { !libc::localtime_r(&secs, &mut tm).is_null() };
    if !converted {
        return utc(at_ms);
    }
    let field = |v: libc::c_int| u32::try_from(v).unwrap_or(0);
    Civil {
        year: i64::from(tm.tm_year) + 1900,
        month: field(tm.tm_mon) + 1,
        day: field(tm.tm_mday),
        hour: field(tm.tm_hour),
        minute: field(tm.tm_min),
        second: field(tm.tm_sec),
    }
}

/// UTC from epoch milliseconds (Howard Hinnant's days-to-civil algorithm).
fn utc(at_ms: u64) -> Civil {
    let secs = at_ms / 1000;
    let days = i64::try_from(secs / 86400).unwrap_or(0);
    let time_of_day = secs % 86400;
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let day_of_era = z.rem_euclid(146_097);
    let year_of_era =
        (day_of_era - day_of_era / 1460 + day_of_era / 36524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let mp = (5 * day_of_year + 2) / 153;
    let day = day_of_year - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = year_of_era + era * 400 + i64::from(month <= 2);
    // Each value below is bounded (day <= 31, month <= 12, seconds of a day).
    let small = |v: i64| u32::try_from(v).unwrap_or(0);
    let small_u = |v: u64| u32::try_from(v).unwrap_or(0);
    Civil {
        year,
        month: small(month),
        day: small(day),
        hour: small_u(time_of_day / 3600),
        minute: small_u(time_of_day % 3600 / 60),
        second: small_u(time_of_day % 60),
    }
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
    fn utc_calendar_is_right_across_leap_days() {
        let civil = |y, mo, d, h, mi, s| Civil {
            year: y,
            month: mo,
            day: d,
            hour: h,
            minute: mi,
            second: s,
        };
        assert_eq!(utc(0), civil(1970, 1, 1, 0, 0, 0));
        // 2024-02-29T23:59:59Z
        assert_eq!(utc(1_709_251_199_000), civil(2024, 2, 29, 23, 59, 59));
        // 2000-03-01T12:00:00Z
        assert_eq!(utc(951_912_000_000), civil(2000, 3, 1, 12, 0, 0));
    }

    #[test]
    fn local_times_have_the_documented_shape() {
        let text = datetime(1_709_251_199_000);
        assert_eq!(text.len(), "2024-02-29 23:59:59".len(), "{text}");
        assert_eq!(clock(1_709_251_199_000).len(), "23:59:59".len());
        assert_eq!(datetime(0), "-");
    }
}
