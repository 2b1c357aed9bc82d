//! Durations as the YAML writes them: a whole number and a unit, like
//! `250ms`, `15s`, `2m` or `1h`. [`crate::format_duration`] is the inverse.
//!
//! Fractions and bare numbers are refused on purpose: `1.5s` and `15` are
//! both ambiguous to a reader (is `15` seconds or milliseconds?), and a
//! whole number of a smaller unit always says the same thing plainly.

use std::time::Duration;

/// Parses `<whole number><unit>` with unit `ms`, `s`, `m` or `h`.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let not_a_duration = || {
        format!(
            "not a duration {s:?}: expected a whole number and a unit (ms, s, m, h), like 250ms or 15s"
        )
    };
    let digits_end = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (number, unit) = s.split_at(digits_end);
    if number.is_empty() {
        return Err(not_a_duration());
    }
    let millis_per_unit: u64 = match unit {
        "ms" => 1,
        "s" => 1_000,
        "m" => 60_000,
        "h" => 3_600_000,
        _ => return Err(not_a_duration()),
    };
    let too_large = || format!("duration {s:?} is too large");
    // `number` is all ASCII digits, so parsing can only fail by overflowing.
    let number: u64 = number.parse().map_err(|_| too_large())?;
    number
        .checked_mul(millis_per_unit)
        .map(Duration::from_millis)
        .ok_or_else(too_large)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::format_duration;

    #[test]
    fn parses_each_unit() {
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("15s"), Ok(Duration::from_secs(15)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("1h"), Ok(Duration::from_secs(3600)));
        assert_eq!(parse_duration("0s"), Ok(Duration::ZERO));
    }

    #[test]
    fn refuses_bare_numbers_fractions_spaces_and_unknown_units() {
        assert_eq!(
            parse_duration("15").unwrap_err(),
            r#"not a duration "15": expected a whole number and a unit (ms, s, m, h), like 250ms or 15s"#
        );
        for bad in [
            "", "s", "1.5s", "15 s", " 15s", "15s ", "-1s", "+1s", "1d", "1S", "1sec", "1h30m",
        ] {
            let err = parse_duration(bad).unwrap_err();
            assert!(err.starts_with("not a duration"), "{bad:?}: {err}");
        }
    }

    #[test]
    fn refuses_overflow() {
        let err = parse_duration("99999999999999999999s").unwrap_err();
        assert!(err.contains("too large"), "{err}");
        let err = parse_duration("18446744073709551615h").unwrap_err();
        assert!(err.contains("too large"), "{err}");
    }

    #[test]
    fn format_is_the_inverse() {
        for s in [
            "250ms", "1500ms", "15s", "90s", "2m", "90m", "1h", "48h", "0s",
        ] {
            let d = parse_duration(s).unwrap();
            assert_eq!(format_duration(d), s);
            assert_eq!(parse_duration(&format_duration(d)), Ok(d));
        }
    }
}
