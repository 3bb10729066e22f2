//! When a `Nightly` fires: Buildbot's cron fields (minute, hour,
//! dayOfMonth, month, dayOfWeek with 0 = Monday), matched in a time zone
//! (the master's local one at run time). As in cron, when both dayOfMonth
//! and dayOfWeek are restricted, a day matching either fires.

use chrono::{DateTime, Datelike, Duration, NaiveDate, NaiveDateTime, TimeZone, Timelike};

pub use crate::config::Cron;
use crate::config::CronField;

fn matches(f: &CronField, v: u32) -> bool {
    match f {
        CronField::Any(_) => true,
        CronField::Values(vs) => vs.contains(&v),
    }
}

fn restricted(f: &CronField) -> bool {
    matches!(f, CronField::Values(_))
}

impl Cron {
    fn day_matches(&self, d: NaiveDate) -> bool {
        let dom = matches(&self.day_of_month, d.day());
        // chrono: Monday = 0, as Buildbot counts.
        let dow = matches(&self.day_of_week, d.weekday().num_days_from_monday());
        match (
            restricted(&self.day_of_month),
            restricted(&self.day_of_week),
        ) {
            (true, true) => dom || dow,
            _ => dom && dow,
        }
    }

    /// The first minute strictly after `after` that the fields match, in
    /// `after`'s time zone; `None` if none comes within eight years (a
    /// field set such as the 31st of February).
    pub fn next_after<Tz: TimeZone>(&self, after: &DateTime<Tz>) -> Option<DateTime<Tz>> {
        let tz = after.timezone();
        let local = after.naive_local();
        let mut t: NaiveDateTime = local.with_second(0)?.with_nanosecond(0)? + Duration::minutes(1);
        let limit = local + Duration::days(366 * 8);
        while t < limit {
            if !matches(&self.month, t.month()) {
                // First minute of the next month.
                let (y, m) = if t.month() == 12 {
                    (t.year() + 1, 1)
                } else {
                    (t.year(), t.month() + 1)
                };
                t = NaiveDate::from_ymd_opt(y, m, 1)?.and_hms_opt(0, 0, 0)?;
                continue;
            }
            if !self.day_matches(t.date()) {
                t = t.date().succ_opt()?.and_hms_opt(0, 0, 0)?;
                continue;
            }
            if !matches(&self.hour, t.hour()) {
                t = t.with_minute(0)? + Duration::hours(1);
                continue;
            }
            if !matches(&self.minute, t.minute()) {
                t += Duration::minutes(1);
                continue;
            }
            // A local time in a DST gap does not exist: skip it.
            if let Some(at) = tz.from_local_datetime(&t).earliest() {
                if at > *after {
                    return Some(at);
                }
            }
            t += Duration::minutes(1);
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::AnyMarker;
    use chrono::{FixedOffset, Utc};

    fn any() -> CronField {
        CronField::Any(AnyMarker)
    }
    fn v(x: &[u32]) -> CronField {
        CronField::Values(x.to_vec())
    }

    #[test]
    fn daily_at_a_time_crosses_the_day_boundary() {
        let c = Cron {
            minute: v(&[30]),
            hour: v(&[3]),
            day_of_month: any(),
            month: any(),
            day_of_week: any(),
        };
        let t = Utc.with_ymd_and_hms(2026, 12, 31, 22, 0, 0).unwrap();
        assert_eq!(
            c.next_after(&t),
            Some(Utc.with_ymd_and_hms(2027, 1, 1, 3, 30, 0).unwrap())
        );
        // Exactly at the time: the next one, a day later.
        let t = Utc.with_ymd_and_hms(2027, 1, 1, 3, 30, 0).unwrap();
        assert_eq!(
            c.next_after(&t),
            Some(Utc.with_ymd_and_hms(2027, 1, 2, 3, 30, 0).unwrap())
        );
    }

    #[test]
    fn fields_are_read_in_the_zone_given() {
        // India: +05:30 all year, no DST.
        let ist = FixedOffset::east_opt(5 * 3600 + 1800).unwrap();
        let c = Cron {
            minute: v(&[0]),
            hour: v(&[2]),
            day_of_month: any(),
            month: any(),
            day_of_week: any(),
        };
        // 21:00 UTC on the 10th is 02:30 IST on the 11th: the next 02:00 IST
        // is on the 12th, 20:30 UTC on the 11th.
        let t = Utc
            .with_ymd_and_hms(2026, 11, 10, 21, 0, 0)
            .unwrap()
            .with_timezone(&ist);
        let next = c.next_after(&t).unwrap();
        assert_eq!(
            next.with_timezone(&Utc),
            Utc.with_ymd_and_hms(2026, 11, 11, 20, 30, 0).unwrap()
        );
    }

    #[test]
    fn day_of_week_counts_from_monday_and_either_day_field_matches() {
        let c = Cron {
            minute: v(&[0]),
            hour: v(&[0]),
            day_of_month: any(),
            month: any(),
            day_of_week: v(&[5]), // Saturday
        };
        // 2026-11-24 is a Tuesday.
        let t = Utc.with_ymd_and_hms(2026, 11, 24, 12, 0, 0).unwrap();
        assert_eq!(
            c.next_after(&t),
            Some(Utc.with_ymd_and_hms(2026, 11, 28, 0, 0, 0).unwrap())
        );
        let c = Cron {
            day_of_month: v(&[25]),
            ..c
        };
        assert_eq!(
            c.next_after(&t),
            Some(Utc.with_ymd_and_hms(2026, 11, 25, 0, 0, 0).unwrap())
        );
    }

    #[test]
    fn every_few_minutes_and_impossible_dates() {
        let c = Cron {
            minute: v(&[0, 15, 30, 45]),
            hour: any(),
            day_of_month: any(),
            month: any(),
            day_of_week: any(),
        };
        let t = Utc.with_ymd_and_hms(2026, 11, 24, 23, 50, 10).unwrap();
        assert_eq!(
            c.next_after(&t),
            Some(Utc.with_ymd_and_hms(2026, 11, 25, 0, 0, 0).unwrap())
        );
        let never = Cron {
            minute: v(&[0]),
            hour: v(&[0]),
            day_of_month: v(&[31]),
            month: v(&[2]),
            day_of_week: any(),
        };
        assert_eq!(never.next_after(&t), None);
    }
}

/// Property-based checks: for any fields, the next time is strictly later,
/// matches every field (in the zone given), and no earlier minute after
/// the start does. `PROPTEST_CASES=N` runs more (bench/fuzz.sh).
#[cfg(test)]
mod fuzz {
    use super::*;
    use crate::config::AnyMarker;
    use chrono::{FixedOffset, Utc};
    use proptest::collection::vec;
    use proptest::prelude::*;

    fn field(lo: u32, hi: u32) -> impl Strategy<Value = CronField> {
        prop_oneof![
            Just(CronField::Any(AnyMarker)),
            vec(lo..=hi, 1..4).prop_map(|mut v| {
                v.sort_unstable();
                v.dedup();
                CronField::Values(v)
            }),
        ]
    }

    fn cron() -> impl Strategy<Value = Cron> {
        (
            field(0, 59),
            field(0, 23),
            field(1, 31),
            field(1, 12),
            field(0, 6),
        )
            .prop_map(|(minute, hour, day_of_month, month, day_of_week)| Cron {
                minute,
                hour,
                day_of_month,
                month,
                day_of_week,
            })
    }

    fn fires_at<Tz: TimeZone>(c: &Cron, t: &DateTime<Tz>) -> bool {
        let l = t.naive_local();
        matches(&c.minute, l.minute())
            && matches(&c.hour, l.hour())
            && matches(&c.month, l.month())
            && c.day_matches(l.date())
    }

    proptest! {
        #[test]
        fn fuzz_the_next_time_matches_and_none_is_skipped(
            c in cron(),
            start in 0i64..4_000_000_000,
            offset_minutes in -720i32..=840,
        ) {
            let zone = FixedOffset::east_opt(offset_minutes * 60).unwrap_or(FixedOffset::east_opt(0).expect("UTC"));
            let after = Utc.timestamp_opt(start, 0).single().expect("a time").with_timezone(&zone);
            let Some(next) = c.next_after(&after) else {
                // Only an impossible date (the 30th of February, say) has none.
                prop_assert!(matches!(c.day_of_month, CronField::Values(_)) && matches!(c.month, CronField::Values(_)));
                return Ok(());
            };
            prop_assert!(next > after);
            prop_assert_eq!(next.second(), 0);
            prop_assert!(fires_at(&c, &next), "{:?} at {}", c, next);
            // No minute in between fires (checked over the first day).
            let mut t = after.with_second(0).and_then(|t| t.with_nanosecond(0)).expect("whole minute")
                + Duration::minutes(1);
            let mut n = 0;
            while t < next && n < 1440 {
                prop_assert!(!fires_at(&c, &t), "{:?} fires at {} before {}", c, t, next);
                t += Duration::minutes(1);
                n += 1;
            }
        }
    }
}
