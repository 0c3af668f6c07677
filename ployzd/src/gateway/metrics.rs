//! The gateway's request metrics (kept here, reported by `/metrics`).

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};

type Labels = Vec<(String, String)>;

#[derive(Clone)]
pub struct GatewayMetrics {
    pub requests: Family<Labels, Counter>,
    pub duration: Histogram,
}

impl GatewayMetrics {
    pub fn new() -> GatewayMetrics {
        GatewayMetrics {
            requests: Family::default(),
            // 250 µs .. ~8 s.
            duration: Histogram::new(exponential_buckets(0.00025, 2.0, 16)),
        }
    }

    pub fn observe(&self, code: u16, seconds: f64) {
        self.requests
            .get_or_create(&vec![("code".to_string(), code.to_string())])
            .inc();
        self.duration.observe(seconds);
    }
}

impl Default for GatewayMetrics {
    fn default() -> Self {
        Self::new()
    }
}
