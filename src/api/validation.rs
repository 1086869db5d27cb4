//! Checks the apiserver cannot make from the schema alone, shared by the
//! controllers (which turn a failure into a status condition) and the CLI.

use std::time::Duration;

/// A spec value keysmith cannot act on; the message is shown to users as is.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct InvalidField {
    /// The JSON path of the field, such as `spec.rotateEvery`.
    pub field: String,
    /// What is wrong, in words a user can act on.
    pub message: String,
}

impl InvalidField {
    /// An error for `field`.
    pub fn new(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self { field: field.into(), message: message.into() }
    }
}

/// Parses a Go-style duration (`720h`, `1h30m`, `90s`, `1.5h`, `250ms`), the
/// format Kubernetes uses. Negative and empty durations are refused.
pub fn parse_duration(field: &str, text: &str) -> Result<Duration, InvalidField> {
    let invalid = || {
        InvalidField::new(
            field,
            format!("{text:?} is not a duration; use a number and a unit such as 720h, 90m or 1h30m"),
        )
    };
    if text.is_empty() {
        return Err(invalid());
    }
    let mut total = 0f64;
    let mut rest = text;
    while !rest.is_empty() {
        let number_len = rest.find(|c: char| !(c.is_ascii_digit() || c == '.')).ok_or_else(invalid)?;
        if number_len == 0 {
            return Err(invalid());
        }
        let value: f64 = rest[..number_len].parse().map_err(|_| invalid())?;
        rest = &rest[number_len..];
        let unit_len = rest.find(|c: char| c.is_ascii_digit() || c == '.').unwrap_or(rest.len());
        let seconds_per_unit = match &rest[..unit_len] {
            "h" => 3600.0,
            "m" => 60.0,
            "s" => 1.0,
            "ms" => 1e-3,
            "us" | "µs" => 1e-6,
            "ns" => 1e-9,
            _ => return Err(invalid()),
        };
        total += value * seconds_per_unit;
        rest = &rest[unit_len..];
    }
    Duration::try_from_secs_f64(total).map_err(|_| InvalidField::new(field, format!("{text:?} is too long")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_go_durations() {
        let cases = [("720h", 720 * 3600), ("1h30m", 5400), ("90s", 90), ("1.5h", 5400), ("0s", 0), ("2h0m5s", 7205)];
        for (text, secs) in cases {
            assert_eq!(parse_duration("f", text).unwrap(), Duration::from_secs(secs), "{text}");
        }
        assert_eq!(parse_duration("f", "250ms").unwrap(), Duration::from_millis(250));
    }

    #[test]
    fn refuses_what_go_refuses() {
        for text in ["", "30", "30 days", "30d", "h", "-1h", "1h 30m", "1..5h", "1hh"] {
            let err = parse_duration("spec.rotateEvery", text).unwrap_err();
            assert_eq!(err.field, "spec.rotateEvery");
            assert!(err.to_string().contains("is not a duration"), "{text}: {err}");
        }
    }

    #[test]
    fn huge_durations_are_refused_not_panicked_on() {
        for text in ["5124095576030431h", "99999999999999999999999h"] {
            let err = parse_duration("spec.rotateEvery", text).unwrap_err();
            assert!(err.message.contains("too long"), "{err}");
        }
    }

    #[test]
    fn agrees_with_the_schema_pattern() {
        let pattern = regex::Regex::new(crate::api::DURATION_PATTERN).unwrap();
        for text in ["720h", "1h30m", "90s", "1.5h", "250ms", "30", "30d", "1 h", "", "h1"] {
            assert_eq!(
                pattern.is_match(text),
                parse_duration("f", text).is_ok(),
                "schema and parser disagree on {text:?}"
            );
        }
    }
}
