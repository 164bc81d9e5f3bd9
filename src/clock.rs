//! Instants by the store's clock and the text forms the Python service gives them.
//!
//! Every instant the service compares (`cached_at`, a user's invalidation marker, a
//! fence, "now") is read from one clock, the store's, so that clock skew between
//! replicas cannot revive a session. They travel as whole microseconds since the Unix
//! epoch; that is what Redis `TIME` gives and what a Lua number holds exactly.

use std::fmt;

use chrono::{DateTime, NaiveDate, NaiveDateTime, SecondsFormat, Utc};

/// An instant in whole microseconds since the Unix epoch.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Micros(pub i64);

impl Micros {
    /// The instant of a `DateTime`, truncated to the microsecond.
    pub fn from_datetime(t: DateTime<Utc>) -> Self {
        Micros(t.timestamp_micros())
    }

    /// A span of time in whole microseconds (saturating).
    pub fn from_duration(d: std::time::Duration) -> Self {
        Micros(i64::try_from(d.as_micros()).unwrap_or(i64::MAX))
    }

    /// The instant as a `DateTime`; `None` only for instants chrono cannot represent.
    pub fn to_datetime(self) -> Option<DateTime<Utc>> {
        DateTime::from_timestamp_micros(self.0)
    }

    /// Reads Python's float seconds (`str(time.time())`, the JSON `cached_at`):
    /// `"1732780000"`, `"1732780000.5"`, `"1732780000.1234567"`. Digits past the sixth
    /// decimal are dropped, as the Lua scripts do.
    pub fn parse_seconds(text: &str) -> Option<Self> {
        let (whole, fraction) = text.split_once('.').unwrap_or((text, ""));
        if whole.is_empty()
            || !whole.bytes().all(|b| b.is_ascii_digit())
            || !fraction.bytes().all(|b| b.is_ascii_digit())
        {
            return None;
        }
        let seconds: i64 = whole.parse().ok()?;
        let mut micros = 0i64;
        for digit in fraction.bytes().chain(std::iter::repeat(b'0')).take(6) {
            micros = micros * 10 + i64::from(digit - b'0');
        }
        seconds
            .checked_mul(1_000_000)?
            .checked_add(micros)
            .map(Micros)
    }

    /// Reads a JSON number of seconds, as Python's `time.time()` writes it.
    pub fn from_seconds_f64(seconds: f64) -> Option<Self> {
        let micros = (seconds * 1e6).round();
        (micros.is_finite() && micros.abs() < 9.0e15).then_some(Micros(micros as i64))
    }

    /// Float seconds with six decimals, which Python's `float()` reads back exactly.
    pub fn seconds(self) -> Seconds {
        Seconds(self)
    }
}

/// Display form of [`Micros::seconds`].
pub struct Seconds(Micros);

impl fmt::Display for Seconds {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let m = self.0.0;
        write!(
            f,
            "{}.{:06}",
            m.div_euclid(1_000_000),
            m.rem_euclid(1_000_000)
        )
    }
}

/// Reads every form Python's `datetime.isoformat()` writes, and the RFC 3339 forms an
/// identity provider sends: naive (taken as UTC), `+00:00` or another offset, `Z`,
/// with or without fractional seconds, or a bare date.
pub fn parse_iso(text: &str) -> Option<DateTime<Utc>> {
    if let Ok(t) = DateTime::parse_from_rfc3339(text) {
        return Some(t.with_timezone(&Utc));
    }
    if let Ok(t) = NaiveDateTime::parse_from_str(text, "%Y-%m-%dT%H:%M:%S%.f") {
        return Some(t.and_utc());
    }
    if let Ok(t) = NaiveDateTime::parse_from_str(text, "%Y-%m-%dT%H:%M") {
        return Some(t.and_utc());
    }
    NaiveDate::parse_from_str(text, "%Y-%m-%d")
        .ok()
        .and_then(|d| d.and_hms_opt(0, 0, 0))
        .map(|t| t.and_utc())
}

/// Writes what Python's `isoformat()` writes for an aware UTC datetime: microseconds only
/// when there are any, and a `+00:00` offset. Python 3.7+ reads it back with
/// `datetime.fromisoformat`.
pub fn format_iso(t: DateTime<Utc>) -> String {
    // RFC 3339's writer, not `format`: a strftime string is parsed again on every call.
    let digits = match t.timestamp_subsec_micros() {
        0 => SecondsFormat::Secs,
        _ => SecondsFormat::Micros,
    };
    t.to_rfc3339_opts(digits, false)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Python's `isoformat()` for an aware UTC datetime, over the years a session may name.
    #[test]
    fn formats_as_python_does() {
        for (text, python) in [
            ("2024-01-15T10:30:00Z", "2024-01-15T10:30:00+00:00"),
            ("2024-01-15T10:30:00.5Z", "2024-01-15T10:30:00.500000+00:00"),
            (
                "2024-01-15T10:30:00.000001Z",
                "2024-01-15T10:30:00.000001+00:00",
            ),
            (
                "2024-01-15T10:30:00.0000019Z",
                "2024-01-15T10:30:00.000001+00:00",
            ),
            ("0001-01-01T00:00:00Z", "0001-01-01T00:00:00+00:00"),
            (
                "9999-12-31T23:59:59.999999Z",
                "9999-12-31T23:59:59.999999+00:00",
            ),
        ] {
            let t = DateTime::parse_from_rfc3339(text).unwrap().to_utc();
            assert_eq!(format_iso(t), python, "{text}");
        }
    }

    /// Markers in every form `str(time.time())` takes read to the same microseconds.
    #[test]
    fn parses_python_seconds() {
        assert_eq!(
            Micros::parse_seconds("1732780000.123456"),
            Some(Micros(1_732_780_000_123_456))
        );
        assert_eq!(
            Micros::parse_seconds("1732780000.1234567"),
            Some(Micros(1_732_780_000_123_456))
        );
        assert_eq!(
            Micros::parse_seconds("1732780000.5"),
            Some(Micros(1_732_780_000_500_000))
        );
        assert_eq!(
            Micros::parse_seconds("1732780000"),
            Some(Micros(1_732_780_000_000_000))
        );
        assert_eq!(Micros::parse_seconds(""), None);
        assert_eq!(Micros::parse_seconds("1.2.3"), None);
        assert_eq!(Micros::parse_seconds("-5"), None);
        assert_eq!(Micros::parse_seconds("abc"), None);
    }

    /// Seconds written with six decimals read back unchanged.
    #[test]
    fn seconds_round_trip() {
        let m = Micros(1_732_780_000_000_042);
        assert_eq!(m.seconds().to_string(), "1732780000.000042");
        assert_eq!(Micros::parse_seconds(&m.seconds().to_string()), Some(m));
        assert_eq!(Micros::from_seconds_f64(1732780000.000042), Some(m));
    }

    /// Every form Python's isoformat() writes is read, naive ones as UTC.
    #[test]
    fn parses_isoformat_forms() {
        let want = DateTime::parse_from_rfc3339("2024-01-15T10:30:00Z")
            .unwrap()
            .with_timezone(&Utc);
        for text in [
            "2024-01-15T10:30:00",
            "2024-01-15T10:30:00+00:00",
            "2024-01-15T10:30:00Z",
            "2024-01-15T12:30:00+02:00",
            "2024-01-15T10:30:00.000+00:00",
            "2024-01-15T10:30:00.000000",
        ] {
            assert_eq!(parse_iso(text), Some(want), "{text}");
        }
        let fractional = parse_iso("2024-01-15T10:30:00.123456").unwrap();
        assert_eq!(fractional.timestamp_subsec_micros(), 123_456);
        assert_eq!(parse_iso("2024-01-15").unwrap().timestamp(), 1_705_276_800);
        assert_eq!(parse_iso("not a date"), None);
    }

    /// The output is exactly what Python writes for an aware UTC datetime.
    #[test]
    fn formats_like_isoformat() {
        let t = parse_iso("2024-01-15T10:30:00+00:00").unwrap();
        assert_eq!(format_iso(t), "2024-01-15T10:30:00+00:00");
        let t = parse_iso("2024-01-15T10:30:00.123456+00:00").unwrap();
        assert_eq!(format_iso(t), "2024-01-15T10:30:00.123456+00:00");
        let t = parse_iso("2024-01-15T10:30:00.1+00:00").unwrap();
        assert_eq!(format_iso(t), "2024-01-15T10:30:00.100000+00:00");
    }
}
