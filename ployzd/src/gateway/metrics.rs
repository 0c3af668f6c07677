//! The gateway's request metrics (kept here, reported by `/metrics`).

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use std::collections::HashMap;
use std::sync::{Arc, RwLock};

type Labels = Vec<(String, String)>;

#[derive(Clone)]
pub struct GatewayMetrics {
    pub requests: Family<Labels, Counter>,
    pub duration: Histogram,
    /// The family's counter of each status code seen, so a request costs a
    /// read lock and an atomic add (no label strings built per request).
    by_code: Arc<RwLock<HashMap<u16, Counter>>>,
}

impl GatewayMetrics {
    pub fn new() -> GatewayMetrics {
        GatewayMetrics {
            requests: Family::default(),
            // 250 µs .. ~8 s.
            duration: Histogram::new(exponential_buckets(0.00025, 2.0, 16)),
            by_code: Arc::default(),
        }
    }

    pub fn observe(&self, code: u16, seconds: f64) {
        let cached = self
            .by_code
            .read()
            .expect("metrics lock")
            .get(&code)
            .map(|c| c.inc());
        if cached.is_none() {
            let c = self
                .requests
                .get_or_create(&vec![("code".to_string(), code.to_string())])
                .clone();
            c.inc();
            self.by_code.write().expect("metrics lock").insert(code, c);
        }
        self.duration.observe(seconds);
    }
}

impl Default for GatewayMetrics {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cached_counters_are_the_family_s() {
        let m = GatewayMetrics::new();
        m.observe(200, 0.001);
        m.observe(200, 0.001);
        m.observe(502, 0.001);
        let get = |code: &str| {
            m.requests
                .get_or_create(&vec![("code".to_string(), code.to_string())])
                .get()
        };
        assert_eq!((get("200"), get("502")), (2, 1));
    }
}
