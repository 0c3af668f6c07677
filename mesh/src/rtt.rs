//! RTT statistics over a sliding window: pure, no clock of its own (the
//! caller passes `now`), so tests drive it with numbers and a fake clock.

use std::collections::VecDeque;
use std::time::Duration;

use tokio::time::Instant;

/// Summary of the samples in a window.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RttStats {
    /// True median: the mean of the two middle samples for an even count.
    pub median_ms: f64,
    /// Population standard deviation (divides by n).
    pub stddev_ms: f64,
    pub samples: usize,
}

/// Samples younger than `window`, at most `capacity` of them (oldest drop
/// first).
#[derive(Debug, Clone)]
pub struct RttWindow {
    window: Duration,
    capacity: usize,
    samples: VecDeque<(Instant, f64)>,
}

impl RttWindow {
    pub fn new(window: Duration, capacity: usize) -> Self {
        RttWindow {
            window,
            capacity: capacity.max(1),
            samples: VecDeque::with_capacity(capacity.max(1)),
        }
    }

    pub fn push(&mut self, at: Instant, rtt: Duration) {
        if self.samples.len() == self.capacity {
            self.samples.pop_front();
        }
        self.samples.push_back((at, rtt.as_secs_f64() * 1000.0));
        self.evict(at);
    }

    /// Drop samples taken more than `window` before `now`.
    pub fn evict(&mut self, now: Instant) {
        while let Some((t, _)) = self.samples.front() {
            if now.saturating_duration_since(*t) > self.window {
                self.samples.pop_front();
            } else {
                break;
            }
        }
    }

    pub fn len(&self) -> usize {
        self.samples.len()
    }

    pub fn is_empty(&self) -> bool {
        self.samples.is_empty()
    }

    pub fn stats(&self) -> Option<RttStats> {
        let n = self.samples.len();
        if n == 0 {
            return None;
        }
        let mut v: Vec<f64> = self.samples.iter().map(|(_, ms)| *ms).collect();
        v.sort_by(f64::total_cmp);
        let median_ms = if n % 2 == 1 {
            v[n / 2]
        } else {
            (v[n / 2 - 1] + v[n / 2]) / 2.0
        };
        let mean = v.iter().sum::<f64>() / n as f64;
        let var = v.iter().map(|x| (x - mean) * (x - mean)).sum::<f64>() / n as f64;
        Some(RttStats {
            median_ms,
            stddev_ms: var.sqrt(),
            samples: n,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(x: u64) -> Duration {
        Duration::from_millis(x)
    }

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() < 1e-9
    }

    #[test]
    fn empty_has_no_stats() {
        assert_eq!(RttWindow::new(ms(1000), 10).stats(), None);
    }

    #[test]
    fn odd_and_even_median_and_population_stddev() {
        let t0 = Instant::now();
        let mut w = RttWindow::new(Duration::from_secs(60), 100);
        for (i, x) in [5u64, 1, 3].iter().enumerate() {
            w.push(t0 + Duration::from_secs(i as u64), ms(*x));
        }
        let s = w.stats().unwrap();
        assert!(close(s.median_ms, 3.0));
        // mean 3, deviations 4+4+0 → var 8/3.
        assert!(close(s.stddev_ms, (8.0f64 / 3.0).sqrt()));
        assert_eq!(s.samples, 3);

        w.push(t0 + Duration::from_secs(3), ms(10));
        let s = w.stats().unwrap();
        // sorted 1 3 5 10: median (3+5)/2.
        assert!(close(s.median_ms, 4.0));
        // mean 4.75; squared deviations 14.0625+3.0625+0.0625+27.5625 = 44.75.
        assert!(close(s.stddev_ms, (44.75f64 / 4.0).sqrt()));
    }

    #[test]
    fn constant_samples_have_zero_stddev() {
        let t0 = Instant::now();
        let mut w = RttWindow::new(Duration::from_secs(60), 100);
        for i in 0..5 {
            w.push(t0 + Duration::from_secs(i), ms(2));
        }
        let s = w.stats().unwrap();
        assert!(close(s.median_ms, 2.0) && close(s.stddev_ms, 0.0));
    }

    #[test]
    fn old_samples_leave_the_window() {
        let t0 = Instant::now();
        let mut w = RttWindow::new(Duration::from_secs(10), 100);
        w.push(t0, ms(100));
        w.push(t0 + Duration::from_secs(5), ms(1));
        w.push(t0 + Duration::from_secs(9), ms(2));
        assert_eq!(w.len(), 3);
        // At t0+11 the first sample is 11 s old: gone.
        w.evict(t0 + Duration::from_secs(11));
        assert_eq!(w.len(), 2);
        assert!(close(w.stats().unwrap().median_ms, 1.5));
        w.evict(t0 + Duration::from_secs(30));
        assert!(w.is_empty());
    }

    #[test]
    fn capacity_drops_oldest() {
        let t0 = Instant::now();
        let mut w = RttWindow::new(Duration::from_secs(60), 3);
        for (i, x) in [100u64, 1, 2, 3].iter().enumerate() {
            w.push(t0 + Duration::from_millis(i as u64), ms(*x));
        }
        let s = w.stats().unwrap();
        assert_eq!(s.samples, 3);
        assert!(close(s.median_ms, 2.0));
    }
}
