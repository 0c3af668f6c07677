//! Failed client logins, without IO or a clock: each failure from a source
//! address earns that address a longer delay before its refusal (so guessing
//! the password is slow), and failures are logged at most once per interval
//! with a count of those not logged (so a flood cannot flood the log).

use std::collections::HashMap;
use std::time::Duration;

/// Delay before the first refusal from an address; it doubles per failure.
pub(crate) const FIRST_DELAY: Duration = Duration::from_millis(250);
pub(crate) const MAX_DELAY: Duration = Duration::from_secs(5);
/// An address without failures for this long starts again from the first delay.
pub(crate) const FORGET_AFTER: Duration = Duration::from_secs(60);
/// At most one log line per interval.
pub(crate) const LOG_EVERY: Duration = Duration::from_secs(10);
/// Beyond this many remembered addresses, the forgotten ones are dropped.
const PRUNE_ABOVE: usize = 1024;

#[derive(Debug, Default)]
pub(crate) struct AuthFailures {
    /// Per address: failures in a row and when the last one was.
    by_addr: HashMap<String, (u32, Duration)>,
    last_log: Option<Duration>,
    /// Failures since the last log line that it did not report.
    unlogged: u64,
}

/// What to do about one failed login.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Verdict {
    /// How long to hold the refusal back (this connection only).
    pub delay: Duration,
    /// Failures in a row from this address, this one included.
    pub failures: u32,
    /// `Some(n)`: log this failure, with `n` earlier ones left out since the last line.
    pub log: Option<u64>,
}

impl AuthFailures {
    /// A login from `addr` failed at `now` (any monotonic clock).
    pub(crate) fn failed(&mut self, addr: &str, now: Duration) -> Verdict {
        if self.by_addr.len() > PRUNE_ABOVE {
            self.by_addr
                .retain(|_, (_, last)| now.saturating_sub(*last) < FORGET_AFTER);
        }
        let entry = self.by_addr.entry(addr.to_string()).or_insert((0, now));
        if now.saturating_sub(entry.1) >= FORGET_AFTER {
            entry.0 = 0;
        }
        entry.0 = entry.0.saturating_add(1);
        entry.1 = now;
        let failures = entry.0;
        let delay = FIRST_DELAY
            .saturating_mul(1u32 << (failures - 1).min(16))
            .min(MAX_DELAY);
        let log = match self.last_log {
            Some(at) if now.saturating_sub(at) < LOG_EVERY => {
                self.unlogged += 1;
                None
            }
            _ => {
                self.last_log = Some(now);
                Some(std::mem::take(&mut self.unlogged))
            }
        };
        Verdict {
            delay,
            failures,
            log,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn delays_grow_per_address_and_are_forgotten() {
        let mut f = AuthFailures::default();
        let delays: Vec<Duration> = (0..7).map(|i| f.failed("10.0.0.9", MS * i).delay).collect();
        assert_eq!(
            delays,
            [250, 500, 1000, 2000, 4000, 5000, 5000].map(|ms| MS * ms)
        );
        // Another address is not slowed by this one's failures.
        assert_eq!(f.failed("10.0.0.7", MS * 10).delay, FIRST_DELAY);
        // A minute later the first address starts over.
        let v = f.failed("10.0.0.9", MS * 6 + FORGET_AFTER);
        assert_eq!((v.delay, v.failures), (FIRST_DELAY, 1));
    }

    #[test]
    fn a_flood_is_slow_and_logs_a_line_per_interval() {
        // 300 sequential attempts each wait for their refusal.
        let mut f = AuthFailures::default();
        let mut now = Duration::ZERO;
        let mut lines = Vec::new();
        for _ in 0..300 {
            let v = f.failed("192.0.2.1", now);
            if let Some(skipped) = v.log {
                lines.push(skipped);
            }
            now += v.delay;
        }
        assert!(now > Duration::from_secs(1400), "took only {now:?}");
        // One line per 10 s: about 150 for ~1500 s, not 300; the first
        // reports nothing skipped, later ones what they left out.
        assert!(lines.len() < 160 && lines.len() > 100, "{}", lines.len());
        assert_eq!(lines[0], 0);
        assert!(lines.iter().skip(1).all(|n| *n >= 1), "{lines:?}");
        assert_eq!(
            lines.iter().sum::<u64>() + lines.len() as u64 + f.unlogged,
            300
        );
    }

    #[test]
    fn many_addresses_are_pruned() {
        let mut f = AuthFailures::default();
        for i in 0..2000 {
            f.failed(&format!("10.1.{}.{}", i / 250, i % 250), Duration::ZERO);
        }
        f.failed("10.9.9.9", FORGET_AFTER * 2);
        assert!(f.by_addr.len() < 10, "{}", f.by_addr.len());
    }
}
