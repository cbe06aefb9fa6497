//! `schedule:` triggers: standard five-field cron expressions in UTC.
//!
//! # Policy
//! - Five fields, `minute hour day-of-month month day-of-week`, plus
//!   croner's extensions within them (`L`, `W`, `#`, names like `MON`,
//!   `@daily`-style nicknames). No seconds field: nothing in a build farm
//!   needs to start more often than once a minute.
//! - All times are UTC; there is no time zone setting, so no slot is ever
//!   skipped or repeated by a daylight-saving change.
//! - Missed slots are not replayed. [`Schedule::due`] answers with the most
//!   recent slot after the last one fired, so a coordinator that was down
//!   over several slots fires once, for the latest of them, when it is back,
//!   and a slot at or before the last fired one never fires again. The
//!   coordinator stores the slot it fired (not the time it noticed) as the
//!   new `last_fired`; before the first firing it passes the pipeline's
//!   registration time, so slots before registration never fire.

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

use chrono::{DateTime, NaiveDate, Utc};
use croner::Cron;
use croner::parser::{CronParser, Seconds, Year};

/// A parsed cron expression.
#[derive(Clone, PartialEq, Eq)]
pub struct Schedule {
    /// As written in the file, for messages and display.
    expression: String,
    cron: Cron,
    /// `params:` a run this schedule starts is given (`{cron, params}`
    /// form), checked against the pipeline's declarations when the file
    /// is read.
    pub params: BTreeMap<String, String>,
    /// Where those `params:` are written, for the check's error.
    pub params_at: Option<crate::spec::Position>,
}

impl Schedule {
    /// Parses a five-field expression; the error is croner's reason, or
    /// says that the expression can never fire (`0 0 30 2 *`).
    pub fn parse(expression: &str) -> Result<Self, String> {
        let parser = CronParser::builder()
            .seconds(Seconds::Disallowed)
            .year(Year::Disallowed)
            .build();
        // croner's reasons end with a full stop; ours go on after them.
        let cron = parser
            .parse(expression)
            .map_err(|error| error.to_string().trim_end_matches('.').to_owned())?;
        let schedule = Schedule {
            expression: expression.to_owned(),
            cron,
            params: BTreeMap::new(),
            params_at: None,
        };
        if schedule.matches_some_day() {
            Ok(schedule)
        } else {
            Err("it matches no date (check the day of month against the month)".to_owned())
        }
    }

    /// Whether any day of a four-year span with a leap day (which covers
    /// every date and weekday a pattern can name) matches. croner's own
    /// search would answer too, but only after walking to the year 5000
    /// for `0 0 30 2 *`, which is too slow for files that anyone may send.
    fn matches_some_day(&self) -> bool {
        let pattern = &self.cron.pattern;
        let hour = (0..24).find(|hour| pattern.hour_match(*hour).unwrap_or(false));
        let minute = (0..60).find(|minute| pattern.minute_match(*minute).unwrap_or(false));
        let (Some(hour), Some(minute)) = (hour, minute) else {
            return false;
        };
        let first = NaiveDate::from_ymd_opt(2000, 1, 1).expect("a real date");
        let end = NaiveDate::from_ymd_opt(2004, 3, 1).expect("a real date");
        first
            .iter_days()
            .take_while(|day| *day < end)
            .filter_map(|day| day.and_hms_opt(hour, minute, 0))
            .any(|time| self.cron.is_time_matching(&time.and_utc()).unwrap_or(false))
    }

    /// The expression as written.
    pub fn expression(&self) -> &str {
        &self.expression
    }

    /// The first slot strictly after `after_ms`, in ms since the Unix epoch:
    /// when the coordinator's timer should next wake for this schedule.
    pub fn next_after(&self, after_ms: u64) -> Option<u64> {
        let next = self.cron.find_next_occurrence(&to_time(after_ms)?, false);
        next.ok().and_then(to_ms)
    }

    /// The slot to fire now, if any: the latest slot `s` with
    /// `last_fired_ms < s <= now_ms`. See the module's policy.
    pub fn due(&self, last_fired_ms: u64, now_ms: u64) -> Option<u64> {
        if now_ms <= last_fired_ms {
            return None;
        }
        let latest = self.cron.find_previous_occurrence(&to_time(now_ms)?, true);
        latest
            .ok()
            .and_then(to_ms)
            .filter(|slot| *slot > last_fired_ms)
    }
}

/// [`Schedule::due`] over all of a pipeline's schedules, which share one
/// `last_fired`: the latest due slot of any of them, so two expressions that
/// fall on the same minute start one run, not two.
pub fn due(schedules: &[Schedule], last_fired_ms: u64, now_ms: u64) -> Option<u64> {
    schedules
        .iter()
        .filter_map(|schedule| schedule.due(last_fired_ms, now_ms))
        .max()
}

/// The earliest [`Schedule::next_after`] over all of a pipeline's schedules.
pub fn next_after(schedules: &[Schedule], after_ms: u64) -> Option<u64> {
    schedules
        .iter()
        .filter_map(|schedule| schedule.next_after(after_ms))
        .min()
}

impl FromStr for Schedule {
    type Err = String;

    fn from_str(expression: &str) -> Result<Self, String> {
        Self::parse(expression)
    }
}

impl fmt::Debug for Schedule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("Schedule").field(&self.expression).finish()
    }
}

impl fmt::Display for Schedule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.expression)
    }
}

fn to_time(ms: u64) -> Option<DateTime<Utc>> {
    DateTime::from_timestamp_millis(i64::try_from(ms).ok()?)
}

fn to_ms(time: DateTime<Utc>) -> Option<u64> {
    u64::try_from(time.timestamp_millis()).ok()
}

#[cfg(test)]
mod tests {
    use chrono::TimeZone;

    use super::*;

    /// ms since the epoch of a UTC date and time.
    fn at(y: i32, mo: u32, d: u32, h: u32, mi: u32, s: u32) -> u64 {
        to_ms(Utc.with_ymd_and_hms(y, mo, d, h, mi, s).unwrap()).unwrap()
    }

    fn nightly() -> Schedule {
        Schedule::parse("0 3 * * *").unwrap()
    }

    #[test]
    fn parses_five_fields_and_refuses_others() {
        for good in [
            "0 3 * * *",
            "*/15 * * * MON-FRI",
            "0 0 L * *",
            "@daily",
            "0 12 * JAN 1#2",
        ] {
            assert!(Schedule::parse(good).is_ok(), "{good}");
        }
        for bad in [
            "",
            "0 3 * *",
            "0 0 3 * * *",
            "0 0 3 * * * 2030",
            "61 * * * *",
            "x y z a b",
        ] {
            assert!(Schedule::parse(bad).is_err(), "{bad:?}");
        }
        assert_eq!(
            Schedule::parse("0 0 30 2 *").unwrap_err(),
            "it matches no date (check the day of month against the month)"
        );
        assert!(Schedule::parse("0 0 29 2 *").is_ok(), "leap days exist");
    }

    #[test]
    fn fires_the_slot_between_last_fired_and_now() {
        let registered = at(2025, 6, 1, 2, 59, 0);
        assert_eq!(nightly().due(registered, at(2025, 6, 1, 2, 59, 59)), None);
        assert_eq!(
            nightly().due(registered, at(2025, 6, 1, 3, 0, 0)),
            Some(at(2025, 6, 1, 3, 0, 0)),
            "a slot is due at its exact time"
        );
        assert_eq!(
            nightly().due(registered, at(2025, 6, 1, 3, 0, 7)),
            Some(at(2025, 6, 1, 3, 0, 0))
        );
    }

    #[test]
    fn never_fires_a_slot_twice() {
        let fired = at(2025, 6, 1, 3, 0, 0);
        assert_eq!(nightly().due(fired, at(2025, 6, 1, 3, 0, 0)), None);
        assert_eq!(nightly().due(fired, at(2025, 6, 1, 3, 0, 30)), None);
        assert_eq!(nightly().due(fired, at(2025, 6, 2, 2, 59, 59)), None);
        assert_eq!(
            nightly().due(fired, at(2025, 6, 2, 3, 0, 0)),
            Some(at(2025, 6, 2, 3, 0, 0))
        );
    }

    #[test]
    fn slots_before_registration_never_fire() {
        let registered = at(2025, 6, 1, 3, 0, 1);
        assert_eq!(nightly().due(registered, at(2025, 6, 1, 12, 0, 0)), None);
    }

    #[test]
    fn a_long_outage_fires_once_for_the_latest_missed_slot() {
        let last_fired = at(2025, 6, 1, 3, 0, 0);
        let back_up = at(2025, 6, 5, 9, 30, 0);
        let slot = nightly().due(last_fired, back_up);
        assert_eq!(slot, Some(at(2025, 6, 5, 3, 0, 0)));
        // Recording that slot leaves nothing else due from the outage.
        assert_eq!(nightly().due(slot.unwrap(), back_up), None);
        assert_eq!(nightly().next_after(back_up), Some(at(2025, 6, 6, 3, 0, 0)));
    }

    #[test]
    fn a_clock_that_went_back_fires_nothing() {
        let last_fired = at(2025, 6, 2, 3, 0, 0);
        assert_eq!(nightly().due(last_fired, at(2025, 6, 1, 4, 0, 0)), None);
    }

    #[test]
    fn next_after_is_strictly_after() {
        let slot = at(2025, 6, 1, 3, 0, 0);
        assert_eq!(nightly().next_after(slot - 1), Some(slot));
        assert_eq!(nightly().next_after(slot), Some(at(2025, 6, 2, 3, 0, 0)));
        assert_eq!(
            Schedule::parse("*/15 * * * *")
                .unwrap()
                .next_after(slot + 1),
            Some(at(2025, 6, 1, 3, 15, 0))
        );
    }

    #[test]
    fn several_schedules_share_one_last_fired() {
        let schedules = [
            Schedule::parse("0 3 * * *").unwrap(),
            Schedule::parse("0 * * * SUN").unwrap(),
        ];
        // 2025-06-01 is a Sunday: both fire at 03:00, once.
        let last_fired = at(2025, 6, 1, 2, 30, 0);
        assert_eq!(
            due(&schedules, last_fired, at(2025, 6, 1, 3, 0, 5)),
            Some(at(2025, 6, 1, 3, 0, 0))
        );
        assert_eq!(
            due(
                &schedules,
                at(2025, 6, 1, 3, 0, 0),
                at(2025, 6, 1, 3, 59, 0)
            ),
            None
        );
        assert_eq!(
            next_after(&schedules, at(2025, 6, 1, 3, 0, 0)),
            Some(at(2025, 6, 1, 4, 0, 0))
        );
        assert_eq!(
            next_after(&schedules, at(2025, 6, 1, 23, 0, 0)),
            Some(at(2025, 6, 2, 3, 0, 0))
        );
    }
}
