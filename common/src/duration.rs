//! Durations as Kiln writes them everywhere — in `kiln.yml` and in every
//! command-line flag: `500ms`, `30s`, `15m`, `2h`, `1m30s`, `1h30m15s250ms`.
//!
//! [`parse`] is the one reader; [`format`] writes a duration so that
//! [`parse`] reads it back.

use std::fmt;
use std::time::Duration;

/// Units from largest to smallest, with their length in milliseconds. `ms`
/// comes before `m` so that `500ms` is not read as 500 minutes and an `s`.
const UNITS: [(&str, u64); 4] = [("h", 3_600_000), ("ms", 1), ("m", 60_000), ("s", 1_000)];

/// What an error message offers as valid values.
pub const EXAMPLES: &str = "500ms, 30s, 1m30s or 2h";

/// Parses one or more `<digits><unit>` parts with units `h`, `m`, `s` and
/// `ms`, largest unit first and each unit at most once (so `1h30m`, not
/// `30m1h` or `1m1m`, which are more likely typos than intent). Zero is
/// accepted; a caller for which zero makes no sense says so itself.
pub fn parse(text: &str) -> Result<Duration, DurationError> {
    let fail = |problem| DurationError {
        text: text.to_owned(),
        problem,
    };
    if text.is_empty() {
        return Err(fail(Problem::Empty));
    }
    let mut rest = text;
    let mut total_ms: u64 = 0;
    let mut previous_unit_ms = u64::MAX;
    while !rest.is_empty() {
        let n_digits = rest
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(rest.len());
        if n_digits == 0 {
            return Err(fail(Problem::NoNumber));
        }
        let number: u64 = rest[..n_digits]
            .parse()
            .map_err(|_| fail(Problem::TooLong))?;
        rest = &rest[n_digits..];
        if rest.is_empty() {
            return Err(fail(Problem::NoUnit));
        }
        let Some((unit, unit_ms)) = UNITS.into_iter().find(|(unit, _)| rest.starts_with(unit))
        else {
            return Err(fail(Problem::UnknownUnit));
        };
        if unit_ms >= previous_unit_ms {
            return Err(fail(Problem::UnitOrder));
        }
        previous_unit_ms = unit_ms;
        rest = &rest[unit.len()..];
        total_ms = number
            .checked_mul(unit_ms)
            .and_then(|ms| total_ms.checked_add(ms))
            .ok_or_else(|| fail(Problem::TooLong))?;
    }
    Ok(Duration::from_millis(total_ms))
}

/// `5s` for whole seconds, `1500ms` otherwise: how Kiln's messages write a
/// duration, in a form [`parse`] reads back (to the millisecond).
pub fn format(duration: Duration) -> String {
    if duration.subsec_millis() == 0 {
        format!("{}s", duration.as_secs())
    } else {
        format!("{}ms", duration.as_millis())
    }
}

/// A text that [`parse`] refused: the text, what is wrong with it, and (in
/// its message) what a valid value looks like.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DurationError {
    text: String,
    problem: Problem,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Problem {
    Empty,
    NoNumber,
    NoUnit,
    UnknownUnit,
    UnitOrder,
    TooLong,
}

impl fmt::Display for DurationError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let problem = match self.problem {
            Problem::Empty => "it is empty",
            Problem::NoNumber => "each part must start with a whole number",
            Problem::NoUnit => "a number needs a unit (h, m, s or ms)",
            Problem::UnknownUnit => "units are h, m, s and ms, in lower case",
            Problem::UnitOrder => "units must go from largest to smallest, each at most once",
            Problem::TooLong => "it is too long to count in milliseconds",
        };
        let text = &self.text;
        write!(
            f,
            "`{text}` is not a duration: {problem}; write e.g. {EXAMPLES}"
        )
    }
}

impl std::error::Error for DurationError {}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(text: &str, expected: Option<Duration>) {
        assert_eq!(parse(text).ok(), expected, "{text:?}");
    }

    #[test]
    fn table() {
        let ms = Duration::from_millis;
        for (text, expected) in [
            ("500ms", Some(ms(500))),
            ("250ms", Some(ms(250))),
            ("30s", Some(ms(30_000))),
            ("1m30s", Some(ms(90_000))),
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
            ("soon", None),
            ("99999999999999999999s", None),
            ("18446744073709551615h", None),
            ("18446744073709551615ms", Some(ms(u64::MAX))),
        ] {
            check(text, expected);
        }
    }

    #[test]
    fn errors_say_what_is_wrong_and_show_valid_values() {
        let message = |text: &str| parse(text).unwrap_err().to_string();
        assert_eq!(
            message("30"),
            "`30` is not a duration: a number needs a unit (h, m, s or ms); \
             write e.g. 500ms, 30s, 1m30s or 2h"
        );
        assert!(message("").contains("it is empty"));
        assert!(message("junk").contains("start with a whole number"));
        assert!(message("3 days").contains("units are h, m, s and ms"));
        assert!(message("30s1m").contains("largest to smallest"));
        assert!(message("99999999999999999999s").contains("too long"));
    }

    #[test]
    fn formatted_durations_parse_back() {
        for duration in [
            Duration::ZERO,
            Duration::from_millis(1500),
            Duration::from_secs(5),
            Duration::from_secs(90),
        ] {
            assert_eq!(parse(&format(duration)), Ok(duration));
        }
        assert_eq!(format(Duration::from_millis(1500)), "1500ms");
        assert_eq!(format(Duration::from_secs(5)), "5s");
    }
}
