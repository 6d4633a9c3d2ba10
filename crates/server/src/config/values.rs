//! Reading one value: booleans, durations, sizes, and the error that names the
//! variable; plus the field list of a part, for refusing unknown variables.

use std::time::Duration;

use serde::Deserialize;
use serde::de::{self, Deserializer, Visitor};

use super::ConfigError;

pub(crate) fn error(variable: &str, value: &str, expected: &str) -> ConfigError {
    ConfigError {
        variable: variable.to_owned(),
        value: value.to_owned(),
        expected: expected.to_owned(),
    }
}

/// Parses `value` when set (an empty value counts as unset), else uses `default`.
pub(crate) fn parse_or<T>(
    variable: &str,
    value: Option<String>,
    default: T,
    expected: &str,
    parse: impl FnOnce(&str) -> Option<T>,
) -> Result<T, ConfigError> {
    match value.as_deref().map(str::trim) {
        None | Some("") => Ok(default),
        Some(text) => parse(text).ok_or_else(|| error(variable, text, expected)),
    }
}

pub(crate) fn parse_bool(value: &str) -> Option<bool> {
    match value.to_ascii_lowercase().as_str() {
        "true" | "1" | "yes" | "on" => Some(true),
        "false" | "0" | "no" | "off" => Some(false),
        _ => None,
    }
}

/// `500ms`, `10s`, `1m`, `1h`; a bare number is seconds.
pub fn parse_duration(value: &str) -> Option<Duration> {
    let value = value.trim();
    let digits_end = value
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(value.len());
    let (number, unit) = value.split_at(digits_end);
    let number: u64 = number.parse().ok()?;
    let millis = match unit.trim() {
        "ms" => number,
        "" | "s" => number.checked_mul(1_000)?,
        "m" => number.checked_mul(60_000)?,
        "h" => number.checked_mul(3_600_000)?,
        _ => return None,
    };
    Some(Duration::from_millis(millis))
}

/// `65536`, `64KiB`, `64KB`, `1MiB`, `1M`: binary multiples.
pub(crate) fn parse_size(value: &str) -> Option<usize> {
    let digits_end = value
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(value.len());
    let (number, unit) = value.split_at(digits_end);
    let number: usize = number.parse().ok()?;
    let multiplier = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" | "kib" => 1 << 10,
        "m" | "mb" | "mib" => 1 << 20,
        "g" | "gb" | "gib" => 1 << 30,
        _ => return None,
    };
    number.checked_mul(multiplier)
}

/// A whole number within `range`.
pub(crate) fn parse_count<T: std::str::FromStr + PartialOrd>(
    range: std::ops::RangeInclusive<T>,
) -> impl FnOnce(&str) -> Option<T> {
    move |text| text.parse().ok().filter(|n| range.contains(n))
}

/// The names of the fields of a struct that derives `Deserialize`: the struct is asked
/// to deserialize itself from a deserializer that only writes down what it is told.
pub(crate) fn fields<T: for<'de> Deserialize<'de>>() -> &'static [&'static str] {
    struct Recorder(Option<&'static [&'static str]>);

    impl<'de> Deserializer<'de> for &mut Recorder {
        type Error = de::value::Error;

        fn deserialize_any<V: Visitor<'de>>(self, _: V) -> Result<V::Value, Self::Error> {
            Err(de::Error::custom("only structs are recorded"))
        }

        fn deserialize_struct<V: Visitor<'de>>(
            self,
            _name: &'static str,
            fields: &'static [&'static str],
            _visitor: V,
        ) -> Result<V::Value, Self::Error> {
            self.0 = Some(fields);
            Err(de::Error::custom("recorded"))
        }

        serde::forward_to_deserialize_any! {
            bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string bytes
            byte_buf option unit unit_struct newtype_struct seq tuple tuple_struct map
            enum identifier ignored_any
        }
    }

    let mut recorder = Recorder(None);
    let _ = T::deserialize(&mut recorder);
    recorder.0.unwrap_or(&[])
}

/// Levenshtein distance, for "did you mean" hints.
pub(crate) fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut previous: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut current = vec![i + 1];
        for (j, cb) in b.iter().enumerate() {
            let substitution = previous[j] + usize::from(ca != *cb);
            current.push(substitution.min(previous[j + 1] + 1).min(current[j] + 1));
        }
        previous = current;
    }
    previous[b.len()]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn units() {
        assert_eq!(parse_duration("1m"), Some(Duration::from_secs(60)));
        assert_eq!(parse_duration("250ms"), Some(Duration::from_millis(250)));
        assert_eq!(parse_duration("5"), Some(Duration::from_secs(5)));
        assert_eq!(parse_duration("s"), None);
        assert_eq!(parse_size("64KiB"), Some(65536));
        assert_eq!(parse_size("1MiB"), Some(1 << 20));
        assert_eq!(parse_size("12"), Some(12));
        assert_eq!(parse_size("1.5MiB"), None);
    }

    #[test]
    fn field_names_and_distances() {
        #[derive(Deserialize)]
        #[allow(dead_code)]
        struct Sample {
            alpha: Option<String>,
            beta_gamma: Option<String>,
        }
        assert_eq!(fields::<Sample>(), ["alpha", "beta_gamma"]);
        assert_eq!(edit_distance("WS_PONG_TIMOUT", "WS_PONG_TIMEOUT"), 1);
        assert_eq!(edit_distance("", "abc"), 3);
        assert_eq!(edit_distance("same", "same"), 0);
    }
}
