//! Timestamps on the wire: UTC, RFC 3339 with milliseconds
//! (`2026-11-23T03:40:00.123Z`), stored as milliseconds since the epoch.

use std::fmt;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// A point in wall-clock time, millisecond precision.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Timestamp(pub u64);

impl Timestamp {
    pub fn now() -> Timestamp {
        Timestamp::from(SystemTime::now())
    }

    pub fn millis(self) -> u64 {
        self.0
    }

    pub fn plus(self, d: Duration) -> Timestamp {
        Timestamp(self.0.saturating_add(d.as_millis() as u64))
    }

    /// Time from `self` until `later`, zero if `later` is earlier.
    pub fn until(self, later: Timestamp) -> Duration {
        Duration::from_millis(later.0.saturating_sub(self.0))
    }

    /// Parses `YYYY-MM-DDTHH:MM:SS[.fff]Z`. Years of more than four digits
    /// are read too, so a record stored far in the future (before requests
    /// were bounded) still reads back instead of breaking every listing.
    pub fn parse(s: &str) -> Option<Timestamp> {
        let ylen = s.bytes().take_while(u8::is_ascii_digit).count();
        if !(4..=12).contains(&ylen) {
            return None;
        }
        // The same layout after the year, whatever its width.
        let y: i64 = s[..ylen].parse().ok()?;
        let s = s.get(ylen - 4..)?;
        let b = s.as_bytes();
        if b.len() < 20 || b[4] != b'-' || b[7] != b'-' || b[10] != b'T' || b[13] != b':' || b[16] != b':' {
            return None;
        }
        let num = |r: std::ops::Range<usize>| -> Option<i64> {
            let t = s.get(r)?;
            t.bytes().all(|c| c.is_ascii_digit()).then(|| t.parse().ok())?
        };
        let (mo, d) = (num(5..7)?, num(8..10)?);
        let (h, mi, se) = (num(11..13)?, num(14..16)?, num(17..19)?);
        if !(1..=12).contains(&mo) || !(1..=31).contains(&d) || h > 23 || mi > 59 || se > 60 {
            return None;
        }
        let rest = &s[19..];
        let (ms, tail) = match rest.strip_prefix('.') {
            Some(frac) => {
                let digits = frac.bytes().take_while(u8::is_ascii_digit).count();
                if digits == 0 {
                    return None;
                }
                let mut ms: i64 = 0;
                for (i, c) in frac[..digits.min(3)].bytes().enumerate() {
                    ms += (c - b'0') as i64 * [100, 10, 1][i];
                }
                (ms, &frac[digits..])
            }
            None => (0, rest),
        };
        if tail != "Z" {
            return None;
        }
        let days = days_from_civil(y, mo, d);
        let secs = days.checked_mul(86_400)?.checked_add(h * 3600 + mi * 60 + se)?;
        let millis = u64::try_from(secs).ok()?.checked_mul(1000)?.checked_add(ms as u64)?;
        Some(Timestamp(millis))
    }
}

impl From<SystemTime> for Timestamp {
    fn from(t: SystemTime) -> Self {
        Timestamp(t.duration_since(UNIX_EPOCH).unwrap_or_default().as_millis() as u64)
    }
}

impl fmt::Display for Timestamp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let secs = (self.0 / 1000) as i64;
        let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
        let (y, m, d) = civil_from_days(days);
        write!(f, "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{:03}Z", rem / 3600, rem % 3600 / 60, rem % 60, self.0 % 1000)
    }
}

impl utoipa::PartialSchema for Timestamp {
    fn schema() -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
        use utoipa::openapi::schema::{KnownFormat, ObjectBuilder, SchemaFormat, Type};
        ObjectBuilder::new()
            .schema_type(Type::String)
            .format(Some(SchemaFormat::KnownFormat(KnownFormat::DateTime)))
            .description(Some("UTC, RFC 3339 with milliseconds"))
            .into()
    }
}

impl utoipa::ToSchema for Timestamp {}

impl Serialize for Timestamp {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Timestamp {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Timestamp::parse(&s).ok_or_else(|| serde::de::Error::custom(format!("bad timestamp {s:?}")))
    }
}

// Howard Hinnant's civil-date algorithms (public domain), proleptic Gregorian.
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

fn civil_from_days(z: i64) -> (i64, i64, i64) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    (if m <= 2 { yoe + era * 400 + 1 } else { yoe + era * 400 }, m, d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_and_parses() {
        let t = Timestamp(1_795_405_200_123);
        let s = t.to_string();
        assert_eq!(s, "2026-11-23T03:40:00.123Z");
        assert_eq!(Timestamp::parse(&s), Some(t));
        assert_eq!(Timestamp::parse("1970-01-01T00:00:00Z"), Some(Timestamp(0)));
        assert_eq!(Timestamp::parse("2000-02-29T12:00:00.5Z").unwrap().to_string(), "2000-02-29T12:00:00.500Z");
        assert_eq!(Timestamp::parse("2000-13-01T00:00:00Z"), None);
        assert_eq!(Timestamp::parse("garbage"), None);
    }

    /// `ttl_s` of 2^63-1 was once accepted and stored `delete_at` in year
    /// 584556019; every listing then failed on it. Such a record reads back.
    #[test]
    fn ttl_overflow_stored_timestamps_still_parse() {
        let far = Timestamp::parse("584556019-04-03T14:25:51.615Z").expect("a far year parses");
        assert_eq!(far.to_string(), "584556019-04-03T14:25:51.615Z");
        let max = Timestamp(u64::MAX);
        assert_eq!(Timestamp::parse(&max.to_string()), Some(max));
        assert_eq!(Timestamp::parse("99999999999999-01-01T00:00:00Z"), None, "past u64 is refused, not wrapped");
        assert_eq!(Timestamp::parse("+2026-01-01T00:00:00Z"), None);
        assert_eq!(Timestamp::parse("2026-1-01T00:00:00.5Z"), None);
    }

    #[test]
    fn every_day_for_a_century_round_trips() {
        for day in 0..36_525i64 {
            let t = Timestamp((day * 86_400_000 + 45_296_789) as u64);
            assert_eq!(Timestamp::parse(&t.to_string()), Some(t));
        }
    }
}
