//! Durations as people and providers write them: `"250ms"`, `"10s"`, `"1.5s"`, `"2m"`, `"1h"`,
//! `"1d"`, and the compound Go form OpenAI uses in its rate-limit headers (`"6m0s"`, `"1h2m3.5s"`).
//!
//! Exact integer arithmetic (no floating point), so `"0.1s"` is 100 ms and never 99.

use std::time::Duration;

/// The units, longest suffix first so that `ms` is not read as `m`.
const UNITS: [(&str, u128); 7] = [
    ("ns", 1),
    ("us", 1_000),
    ("µs", 1_000),
    ("ms", 1_000_000),
    ("s", 1_000_000_000),
    ("h", 3_600_000_000_000),
    ("d", 86_400_000_000_000),
];
const MINUTE_NS: u128 = 60_000_000_000;

/// One or more `<decimal><unit>` parts (units `ns`, `us`, `ms`, `s`, `m`, `h`, `d`), surrounding white
/// space allowed. `None` for anything else, or a value beyond `Duration::MAX`.
pub fn parse(text: &str) -> Option<Duration> {
    let mut rest = text.trim();
    if rest.is_empty() {
        return None;
    }
    let mut total_ns: u128 = 0;
    while !rest.is_empty() {
        let digits = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(rest.len());
        let (number, after) = rest.split_at(digits);
        let (unit_ns, after) = unit(after)?;
        total_ns = total_ns.saturating_add(scaled_decimal(number, unit_ns)?);
        rest = after;
    }
    let secs = u64::try_from(total_ns / 1_000_000_000).ok()?;
    Some(Duration::new(secs, (total_ns % 1_000_000_000) as u32))
}

fn unit(text: &str) -> Option<(u128, &str)> {
    for (suffix, ns) in UNITS {
        if let Some(rest) = text.strip_prefix(suffix) {
            // `m` followed by `s` was taken as `ms` above; a lone `m` is minutes.
            return Some((ns, rest));
        }
    }
    text.strip_prefix('m').map(|rest| (MINUTE_NS, rest))
}

/// A non-negative decimal such as `"1.25"` times `scale` (1000 -> 1250). Digits finer than the
/// scale are dropped; values too large saturate (callers bound them); `None` when it is not a
/// decimal.
pub fn scaled_decimal(text: &str, scale: u128) -> Option<u128> {
    let (int, frac) = text.split_once('.').unwrap_or((text, ""));
    let digits = |t: &str| t.bytes().all(|b| b.is_ascii_digit());
    if (int.is_empty() && frac.is_empty()) || !digits(int) || !digits(frac) {
        return None;
    }
    let mut value = int.bytes().fold(0u128, |v, b| {
        v.saturating_mul(10).saturating_add(u128::from(b - b'0'))
    });
    value = value.saturating_mul(scale);
    let mut unit = scale;
    for b in frac.bytes() {
        unit /= 10;
        if unit == 0 {
            break;
        }
        value = value.saturating_add(u128::from(b - b'0') * unit);
    }
    Some(value)
}

/// Milliseconds of a duration, saturating at `u64::MAX`.
pub fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_forms_people_and_providers_write() {
        let ms = Duration::from_millis;
        for (text, want) in [
            ("250ms", ms(250)),
            ("10s", ms(10_000)),
            ("1.5s", ms(1500)),
            (" 3s ", ms(3000)),
            ("2m", ms(120_000)),
            ("1h", ms(3_600_000)),
            ("0.1s", ms(100)),
            ("6ms", ms(6)),
            ("0s", ms(0)),
            ("6m0s", ms(360_000)),
            ("1h2m3.5s", ms(3_723_500)),
            ("59.999s", ms(59_999)),
            ("1.5ms", Duration::from_micros(1500)),
            ("20us", Duration::from_micros(20)),
            ("7ns", Duration::from_nanos(7)),
            ("1d", ms(86_400_000)),
            ("1d12h", ms(129_600_000)),
        ] {
            assert_eq!(parse(text), Some(want), "{text}");
        }
    }

    #[test]
    fn anything_else_is_refused() {
        for text in [
            "",
            " ",
            "s",
            "10",
            "-1s",
            "+1s",
            "1e3s",
            "NaNs",
            "1..2s",
            "1.2.3s",
            "1 s",
            "1s 2s",
            "1day",
            "1sec",
            "1minute",
            ".s",
            "1s2",
            "99999999999999999999999999999999999999999h",
        ] {
            assert_eq!(parse(text), None, "{text:?}");
        }
    }

    #[test]
    fn decimals_scale_exactly() {
        assert_eq!(scaled_decimal("1.25", 1000), Some(1250));
        assert_eq!(scaled_decimal(".5", 1000), Some(500));
        assert_eq!(scaled_decimal("5.", 1000), Some(5000));
        assert_eq!(scaled_decimal("0.0001", 1000), Some(0));
        assert_eq!(scaled_decimal("", 1000), None);
        assert_eq!(scaled_decimal("1,5", 1000), None);
        assert_eq!(scaled_decimal(&"9".repeat(60), 1), Some(u128::MAX));
    }
}
