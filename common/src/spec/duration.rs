//! Durations as pipeline files write them: `500ms`, `30s`, `15m`, `2h`, `1h30m`.

use std::time::Duration;

/// Units from largest to smallest, with their length in milliseconds. `ms`
/// comes before `m` so that `500ms` is not read as 500 minutes and an `s`.
const UNITS: [(&str, u64); 4] = [("h", 3_600_000), ("ms", 1), ("m", 60_000), ("s", 1_000)];

/// Parses one or more `<digits><unit>` parts, largest unit first and each unit
/// at most once (so `1h30m`, not `30m1h` or `1m1m`, which are more likely
/// typos than intent). `None` for anything else, including overflow; zero is
/// accepted here and rejected by the caller, which knows what it is for.
pub(super) fn parse(text: &str) -> Option<Duration> {
    if text.is_empty() {
        return None;
    }
    let mut rest = text;
    let mut total_ms: u64 = 0;
    let mut previous_unit_ms = u64::MAX;
    while !rest.is_empty() {
        let n_digits = rest
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(rest.len());
        if n_digits == 0 {
            return None;
        }
        let number: u64 = rest[..n_digits].parse().ok()?;
        rest = &rest[n_digits..];
        let (unit, unit_ms) = UNITS.into_iter().find(|(unit, _)| rest.starts_with(unit))?;
        if unit_ms >= previous_unit_ms {
            return None;
        }
        previous_unit_ms = unit_ms;
        rest = &rest[unit.len()..];
        total_ms = total_ms.checked_add(number.checked_mul(unit_ms)?)?;
    }
    Some(Duration::from_millis(total_ms))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table() {
        let ms = Duration::from_millis;
        for (text, expected) in [
            ("500ms", Some(ms(500))),
            ("30s", Some(ms(30_000))),
            ("15m", Some(ms(15 * 60_000))),
            ("2h", Some(ms(2 * 3_600_000))),
            ("1h30m", Some(ms(90 * 60_000))),
            ("1h30m15s250ms", Some(ms(5_415_250))),
            ("1m500ms", Some(ms(60_500))),
            ("0s", Some(ms(0))),
            ("007s", Some(ms(7_000))),
            ("", None),
            ("30", None),
            ("s", None),
            ("15x", None),
            ("1.5h", None),
            ("-1s", None),
            ("+1s", None),
            ("1 h", None),
            (" 1h", None),
            ("1h ", None),
            ("1H", None),
            ("1d", None),
            ("30m1h", None),
            ("1m1m", None),
            ("1h30", None),
            ("1sms", None),
            ("１s", None),
            ("99999999999999999999s", None),
            ("18446744073709551615h", None),
            ("18446744073709551615ms", Some(ms(u64::MAX))),
        ] {
            assert_eq!(parse(text), expected, "{text:?}");
        }
    }
}
