//! Wall-clock helpers. Records store milliseconds since the Unix epoch; output
//! shows them as RFC 3339 in UTC.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Milliseconds since the Unix epoch, now.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// `2026-11-27T11:37:24Z` for a millisecond timestamp (second precision).
pub fn rfc3339(ms: u64) -> String {
    humantime::format_rfc3339_seconds(UNIX_EPOCH + Duration::from_millis(ms)).to_string()
}

/// A duration for people: `250ms`, `1.5s`, `15s`, `2m`, `2m30s`, `1h5m`.
/// Rounded to what matters at its size (14.999998071 s is `15s`).
pub fn human(d: Duration) -> String {
    let ms = d.as_secs_f64() * 1000.0;
    if ms < 1.0 && !d.is_zero() {
        return format!("{}µs", d.as_micros().max(1));
    }
    if ms < 999.5 {
        return format!("{}ms", ms.round() as u64);
    }
    if ms < 9_950.0 {
        let tenths = (ms / 100.0).round() as u64;
        return if tenths.is_multiple_of(10) {
            format!("{}s", tenths / 10)
        } else {
            format!("{}.{}s", tenths / 10, tenths % 10)
        };
    }
    let secs = (ms / 1000.0).round() as u64;
    match (secs / 3600, secs % 3600 / 60, secs % 60) {
        (0, 0, s) => format!("{s}s"),
        (0, m, 0) => format!("{m}m"),
        (0, m, s) => format!("{m}m{s}s"),
        (h, 0, _) => format!("{h}h"),
        (h, m, _) => format!("{h}h{m}m"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_read_like_people_write_them() {
        let h = |ms: u64| human(Duration::from_millis(ms));
        assert_eq!(human(Duration::from_nanos(14_999_998_071)), "15s");
        assert_eq!(h(0), "0ms");
        assert_eq!(human(Duration::from_nanos(1500)), "1µs");
        assert_eq!(h(250), "250ms");
        assert_eq!(h(999), "999ms");
        assert_eq!(h(1000), "1s");
        assert_eq!(h(1500), "1.5s");
        assert_eq!(h(9_990), "10s");
        assert_eq!(h(15_000), "15s");
        assert_eq!(h(59_700), "1m");
        assert_eq!(h(120_000), "2m");
        assert_eq!(h(150_000), "2m30s");
        assert_eq!(h(3_600_000), "1h");
        assert_eq!(h(3_900_000), "1h5m");
    }

    #[test]
    fn formats_utc() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(1_795_779_444_000), "2026-11-27T11:37:24Z");
    }
}
