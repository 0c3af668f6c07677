//! Image pull accounting for `/metrics`: how many images this machine
//! fetched, from where (a peer over the mesh or the registry), how many bytes
//! and how long each took. Counted where the fetch happens; read by the
//! metrics endpoint through [`Workloads::pull_metrics`].

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};

type Labels = Vec<(String, String)>;

/// Where an image came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PullSource {
    /// Another machine of the network, over the mesh (`blob` service).
    Peer,
    /// The image's registry (at deploy time, or when no peer had it).
    Registry,
}

impl PullSource {
    fn label(self) -> &'static str {
        match self {
            PullSource::Peer => "peer",
            PullSource::Registry => "registry",
        }
    }
}

fn duration_histogram() -> Histogram {
    // 10 ms .. ~5 min.
    Histogram::new(exponential_buckets(0.01, 2.0, 15))
}

/// Shared counters (clones share the same values, as prometheus-client's
/// metrics do).
#[derive(Clone)]
pub struct PullMetrics {
    /// `source`, `result` (ok|error).
    pub pulls: Family<Labels, Counter>,
    /// `source`: bytes received (archive bytes from peers, blob bytes from
    /// registries).
    pub bytes: Family<Labels, Counter>,
    /// `source`: duration of successful pulls.
    pub duration: Family<Labels, Histogram, fn() -> Histogram>,
}

impl Default for PullMetrics {
    fn default() -> Self {
        let m = PullMetrics {
            pulls: Family::default(),
            bytes: Family::default(),
            duration: Family::new_with_constructor(duration_histogram),
        };
        // Every series exists from the start, so a rate() has a zero to begin from.
        for s in [PullSource::Peer, PullSource::Registry] {
            for r in ["ok", "error"] {
                let _ = m.pulls.get_or_create(&labels(s, Some(r)));
            }
            let _ = m.bytes.get_or_create(&labels(s, None));
        }
        m
    }
}

fn labels(source: PullSource, result: Option<&str>) -> Labels {
    let mut l = vec![("source".to_string(), source.label().to_string())];
    if let Some(r) = result {
        l.push(("result".to_string(), r.to_string()));
    }
    l
}

impl PullMetrics {
    pub fn succeeded(&self, source: PullSource, bytes: u64, took: std::time::Duration) {
        self.pulls.get_or_create(&labels(source, Some("ok"))).inc();
        self.bytes
            .get_or_create(&labels(source, None))
            .inc_by(bytes);
        self.duration
            .get_or_create(&labels(source, None))
            .observe(took.as_secs_f64());
    }

    pub fn failed(&self, source: PullSource) {
        self.pulls
            .get_or_create(&labels(source, Some("error")))
            .inc();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_by_source_and_result() {
        let m = PullMetrics::default();
        m.succeeded(PullSource::Peer, 100, std::time::Duration::from_millis(20));
        m.succeeded(PullSource::Peer, 50, std::time::Duration::from_millis(20));
        m.failed(PullSource::Registry);
        assert_eq!(
            m.pulls
                .get_or_create(&labels(PullSource::Peer, Some("ok")))
                .get(),
            2
        );
        assert_eq!(
            m.bytes.get_or_create(&labels(PullSource::Peer, None)).get(),
            150
        );
        assert_eq!(
            m.pulls
                .get_or_create(&labels(PullSource::Registry, Some("error")))
                .get(),
            1
        );
        // A clone shares the values.
        let c = m.clone();
        c.failed(PullSource::Registry);
        assert_eq!(
            m.pulls
                .get_or_create(&labels(PullSource::Registry, Some("error")))
                .get(),
            2
        );
    }
}
