//! How long an upstream asks us to wait: `retry-after-ms`, `x-ms-retry-after-ms`, `Retry-After`.

use std::time::Duration;

/// The longest wait we take from a header; anything longer is clamped (it only needs to be
/// longer than any budget or cooldown cap).
const MAX: Duration = Duration::from_secs(24 * 3600);

/// `headers` are (lower-case name, value) pairs of a response. Millisecond headers win over
/// `Retry-After`, as OpenAI's and Azure's SDKs read them. HTTP-date forms of `Retry-After` are
/// compared to `now_unix_secs`.
pub fn parse<'a>(
    headers: impl Iterator<Item = (&'a str, &'a [u8])> + Clone,
    now_unix_secs: u64,
) -> Option<Duration> {
    let find = |name: &str| {
        headers
            .clone()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v)
    };
    for name in ["retry-after-ms", "x-ms-retry-after-ms"] {
        if let Some(us) = find(name).and_then(|v| number(v, 1000)) {
            return Some(Duration::from_micros(us).min(MAX));
        }
    }
    let value = find("retry-after")?;
    if let Some(ms) = number(value, 1000) {
        return Some(Duration::from_millis(ms).min(MAX));
    }
    let text = std::str::from_utf8(value).ok()?;
    let at = http_date_unix(text.trim())?;
    Some(Duration::from_secs(at.saturating_sub(now_unix_secs)).min(MAX))
}

fn number(v: &[u8], scale: u128) -> Option<u64> {
    let n = crate::duration::scaled_decimal(std::str::from_utf8(v).ok()?.trim(), scale)?;
    Some(u64::try_from(n).unwrap_or(u64::MAX))
}

/// IMF-fixdate, e.g. `Wed, 21 Oct 2015 07:28:00 GMT`.
fn http_date_unix(s: &str) -> Option<u64> {
    let mut parts = s.split_ascii_whitespace();
    let _weekday = parts.next()?;
    let day: u64 = parts.next()?.parse().ok()?;
    let month = match parts.next()? {
        "Jan" => 1,
        "Feb" => 2,
        "Mar" => 3,
        "Apr" => 4,
        "May" => 5,
        "Jun" => 6,
        "Jul" => 7,
        "Aug" => 8,
        "Sep" => 9,
        "Oct" => 10,
        "Nov" => 11,
        "Dec" => 12,
        _ => return None,
    };
    let year: u64 = parts.next()?.parse().ok()?;
    let mut hms = parts.next()?.split(':');
    let h: u64 = hms.next()?.parse().ok()?;
    let m: u64 = hms.next()?.parse().ok()?;
    let sec: u64 = hms.next()?.parse().ok()?;
    if parts.next()? != "GMT"
        || !(1..=31).contains(&day)
        || !(1970..=9999).contains(&year)
        || h > 23
        || m > 59
        || sec > 60
    {
        return None;
    }
    Some(days_from_civil(year, month, day) * 86_400 + h * 3600 + m * 60 + sec)
}

/// Days since 1970-01-01 (Howard Hinnant's algorithm), for years >= 1970.
fn days_from_civil(y: u64, m: u64, d: u64) -> u64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y / 400;
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    (era * 146_097 + doe).saturating_sub(719_468)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(headers: &[(&str, &str)]) -> Option<Duration> {
        let h: Vec<(&str, &[u8])> = headers.iter().map(|(n, v)| (*n, v.as_bytes())).collect();
        parse(h.iter().copied(), 1_445_412_000)
    }

    #[test]
    fn retry_after_forms() {
        assert_eq!(p(&[("retry-after", "2")]), Some(Duration::from_secs(2)));
        assert_eq!(p(&[("Retry-After", " 0 ")]), Some(Duration::ZERO));
        assert_eq!(
            p(&[("retry-after-ms", "1500")]),
            Some(Duration::from_millis(1500))
        );
        assert_eq!(
            p(&[("x-ms-retry-after-ms", "250")]),
            Some(Duration::from_millis(250))
        );
        assert_eq!(
            p(&[("retry-after", "20"), ("retry-after-ms", "100")]),
            Some(Duration::from_millis(100))
        );
        // 1445412480 is Wed, 21 Oct 2015 07:28:00 GMT; now is 480 s before.
        assert_eq!(
            p(&[("retry-after", "Wed, 21 Oct 2015 07:28:00 GMT")]),
            Some(Duration::from_secs(480))
        );
        assert_eq!(
            p(&[("retry-after", "Wed, 21 Oct 2014 07:28:00 GMT")]),
            Some(Duration::ZERO)
        );
    }

    #[test]
    fn garbage_is_ignored() {
        for v in [
            "",
            "-1",
            "soon",
            "1e9",
            "NaN",
            "Wed, 32 Oct 2015 07:28:00 GMT",
            "Wed, 21 Foo 2015 07:28:00 GMT",
        ] {
            assert_eq!(p(&[("retry-after", v)]), None, "{v}");
        }
        assert_eq!(
            p(&[("retry-after-ms", "x"), ("retry-after", "3")]),
            Some(Duration::from_secs(3))
        );
        assert_eq!(p(&[]), None);
        assert_eq!(p(&[("retry-after", "99999999999999999999")]), Some(MAX));
    }
}
