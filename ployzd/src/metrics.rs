//! `/metrics`: this machine's state in the Prometheus text format, built
//! fresh on every scrape from what the subsystems report (nothing here
//! keeps state of its own but the listener), with `prometheus-client`.
//! Served on `ployzd run --metrics-listen` (default 127.0.0.1:9101).

use crate::daemon::Daemon;
use ployz_api::*;
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::Duration;

/// Store reads a scrape makes wait at most this long (no quorum: those
/// families are left out, the rest is served).
const STORE_BUDGET: Duration = Duration::from_secs(2);

type Labels = Vec<(String, String)>;
type FloatGauge = Gauge<f64, AtomicU64>;

fn gauge(reg: &mut Registry, name: &str, help: &str, v: i64) {
    let g = Gauge::<i64>::default();
    g.set(v);
    reg.register(name, help, g);
}

impl Daemon {
    /// The exposition text of every family this machine reports.
    pub async fn metrics_text(&self) -> String {
        let mut reg = Registry::default();
        // A gauge of 1 rather than OpenMetrics' `info` type, which the
        // Prometheus text format (and promtool) does not know.
        let build: Family<Labels, Gauge> = Family::default();
        build
            .get_or_create(&vec![
                ("version".to_string(), crate::VERSION.to_string()),
                ("machine".to_string(), self.machine_id().to_string()),
            ])
            .set(1);
        reg.register("ployz_build_info", "ployzd's version and machine id", build);
        self.raft_metrics(&mut reg);
        self.store_metrics(&mut reg);
        self.nats_metrics(&mut reg);
        self.mesh_metrics(&mut reg).await;
        self.workload_metrics(&mut reg).await;
        self.operation_metrics(&mut reg).await;
        self.ingress_metrics(&mut reg);
        self.gateway_metrics(&mut reg);
        // Peer-port admission (issue 17).
        let refused = Counter::<u64>::default();
        refused.inc_by(crate::peer::admission::refused_total());
        reg.register(
            "ployz_peer_refused",
            "Peer-port connections refused as not from a current member",
            refused,
        );
        let mut out = String::new();
        if let Err(e) = encode(&mut out, &reg) {
            tracing::warn!("encoding metrics: {e}");
        }
        to_prometheus_text(&out)
    }

    /// Published-port forwarding and internal DNS (`ingress`).
    fn ingress_metrics(&self, reg: &mut Registry) {
        use std::sync::atomic::Ordering::Relaxed;
        let s = &self.ingress.stats;
        let family = |rows: &[(&str, &AtomicU64)]| {
            let f: Family<Labels, Counter> = Family::default();
            for (label, v) in rows {
                f.get_or_create(&vec![("protocol".to_string(), label.to_string())])
                    .inc_by(v.load(Relaxed));
            }
            f
        };
        reg.register(
            "ployz_published_connections_forwarded",
            "Connections (TCP) and flows (UDP) to published ports forwarded to an instance",
            family(&[("tcp", &s.tcp_forwarded), ("udp", &s.udp_flows)]),
        );
        reg.register(
            "ployz_published_connections_failed",
            "Connections and flows to published ports no healthy instance accepted",
            family(&[("tcp", &s.tcp_failed), ("udp", &s.udp_failed)]),
        );
        let d = &s.dns;
        let queries: Family<Labels, Counter> = Family::default();
        for (result, v) in [
            ("answered", &d.answered),
            ("nxdomain", &d.nxdomain),
            ("forwarded", &d.forwarded),
            ("failed", &d.failed),
        ] {
            queries
                .get_or_create(&vec![("result".to_string(), result.to_string())])
                .inc_by(v.load(Relaxed));
        }
        reg.register(
            "ployz_dns_queries",
            "Queries to this machine's internal resolver, by result",
            queries,
        );
    }

    /// The gateway's requests (by status code), their duration, and when
    /// each served certificate expires.
    fn gateway_metrics(&self, reg: &mut Registry) {
        let m = self.gateway.metrics().clone();
        reg.register(
            "ployz_gateway_requests",
            "Requests the HTTP(S) gateway answered, by status code",
            m.requests,
        );
        reg.register(
            "ployz_gateway_request_duration_seconds",
            "Time from a request's head to the response head, gateway errors included",
            m.duration,
        );
        let expiry: Family<Labels, Gauge> = Family::default();
        for (host, t) in self.gateway.certificate_expiry() {
            expiry
                .get_or_create(&vec![("host".to_string(), host)])
                .set(t as i64);
        }
        reg.register(
            "ployz_gateway_certificate_expiry_timestamp_seconds",
            "When each certificate the gateway serves expires (unix time)",
            expiry,
        );
    }

    fn raft_metrics(&self, reg: &mut Registry) {
        let m = self.store.node().raft().metrics().borrow().clone();
        gauge(
            reg,
            "ployz_raft_term",
            "Current Raft term",
            m.current_term as i64,
        );
        gauge(
            reg,
            "ployz_raft_is_leader",
            "1 when this machine leads the storage set",
            i64::from(self.store.is_leader()),
        );
        gauge(
            reg,
            "ployz_raft_last_log_index",
            "Index of the last entry in this replica's log",
            m.last_log_index.unwrap_or(0) as i64,
        );
        gauge(
            reg,
            "ployz_raft_applied_index",
            "Index of the last entry applied to this replica's state machine",
            m.last_applied.map_or(0, |l| l.index) as i64,
        );
        gauge(
            reg,
            "ployz_raft_snapshot_index",
            "Index covered by this replica's last snapshot",
            m.snapshot.map_or(0, |l| l.index) as i64,
        );
        gauge(
            reg,
            "ployz_raft_voters",
            "Voting members of the storage set",
            self.store.voters().len() as i64,
        );
    }

    fn store_metrics(&self, reg: &mut Registry) {
        let latency = self.store.latency();
        reg.register_with_unit(
            "ployz_store_write_duration",
            "Store writes from this machine, end to end (forwarding and commit included)",
            prometheus_client::registry::Unit::Seconds,
            latency.writes,
        );
        reg.register_with_unit(
            "ployz_store_read_duration",
            "Linearizable store reads from this machine, end to end",
            prometheus_client::registry::Unit::Seconds,
            latency.reads,
        );
        let node = self.store.node();
        let t = node.timings();
        reg.register_with_unit(
            "ployz_raft_append_duration",
            "Raft log appends on this machine's replica: encode, write and fsync, until Raft may count the entries",
            prometheus_client::registry::Unit::Seconds,
            t.append,
        );
        reg.register_with_unit(
            "ployz_raft_apply_duration",
            "State machine applies on this machine's replica, per batch of committed entries",
            prometheus_client::registry::Unit::Seconds,
            t.apply,
        );
        reg.register_with_unit(
            "ployz_store_fsync_duration",
            "fdatasyncs of this machine's Raft log segment files (and sled flushes of its vote and purge point)",
            prometheus_client::registry::Unit::Seconds,
            t.fsync,
        );
        reg.register_with_unit(
            "ployz_store_queue_duration",
            "Time a store write waits on this machine before its log entry is proposed",
            prometheus_client::registry::Unit::Seconds,
            t.queue,
        );
        reg.register_with_unit(
            "ployz_store_propose_duration",
            "From proposing a log entry (one write or a group) until it is committed and applied here",
            prometheus_client::registry::Unit::Seconds,
            t.propose,
        );
        reg.register(
            "ployz_store_group_size",
            "Writes carried by one proposed log entry (group commit)",
            t.group_size,
        );
        if let Ok(buckets) = node.buckets_local() {
            let keys: Family<Labels, Gauge> = Family::default();
            for b in buckets {
                if let Ok(Some(info)) = node.bucket_local(&b) {
                    keys.get_or_create(&vec![("bucket".into(), b)])
                        .set(info.live_keys as i64);
                }
            }
            reg.register(
                "ployz_store_keys",
                "Live keys per bucket in this machine's replica",
                keys,
            );
        }
        gauge(
            reg,
            "ployz_store_disk_bytes",
            "Bytes the store (Raft log, state machine, snapshots) takes on disk here",
            dir_bytes(&self.data_dir.join("store")) as i64,
        );
    }

    fn nats_metrics(&self, reg: &mut Registry) {
        let Some(s) = self.control.stats() else {
            gauge(reg, "ployz_nats_up", "1 when the NATS server runs", 0);
            return;
        };
        gauge(reg, "ployz_nats_up", "1 when the NATS server runs", 1);
        gauge(
            reg,
            "ployz_nats_connections",
            "Connected NATS clients",
            s.clients as i64,
        );
        gauge(
            reg,
            "ployz_nats_routes",
            "NATS routes to other machines that are attached",
            s.routes as i64,
        );
        gauge(
            reg,
            "ployz_nats_subscriptions",
            "Subscriptions of local clients",
            s.subscriptions as i64,
        );
        gauge(
            reg,
            "ployz_nats_remote_subscriptions",
            "Interest learned from routes",
            s.remote_subscriptions as i64,
        );
        gauge(
            reg,
            "ployz_nats_jetstream_consumers",
            "Live JetStream consumers (KV watches)",
            s.consumers as i64,
        );
        gauge(
            reg,
            "ployz_nats_pending_bytes",
            "Bytes queued for clients and not yet written",
            s.pending_bytes as i64,
        );
        for (name, help, v) in [
            (
                "ployz_nats_received_messages",
                "Messages published by clients",
                s.in_msgs,
            ),
            (
                "ployz_nats_received_bytes",
                "Payload bytes (headers included) published by clients",
                s.in_bytes,
            ),
            (
                "ployz_nats_sent_messages",
                "Messages delivered to clients",
                s.out_msgs,
            ),
            (
                "ployz_nats_sent_bytes",
                "Payload bytes (headers included) delivered to clients",
                s.out_bytes,
            ),
            (
                "ployz_nats_slow_consumers",
                "Clients closed because they did not read fast enough",
                s.slow_consumers,
            ),
        ] {
            let c = Counter::<u64>::default();
            c.inc_by(v);
            reg.register(name, help, c);
        }
    }

    async fn mesh_metrics(&self, reg: &mut Registry) {
        let machines: Vec<MachineRecord> = match self.store.local().get() {
            Some(f) => f.machines,
            None => return,
        };
        let Some(links) = self.overlay.links(&machines) else {
            gauge(reg, "ployz_mesh_up", "1 when the WireGuard mesh is up", 0);
            return;
        };
        gauge(reg, "ployz_mesh_up", "1 when the WireGuard mesh is up", 1);
        let rx: Family<Labels, Counter> = Family::default();
        let tx: Family<Labels, Counter> = Family::default();
        let age: Family<Labels, FloatGauge> = Family::default();
        for l in &links {
            let peer = vec![("peer".to_string(), l.id.clone())];
            rx.get_or_create(&peer).inc_by(l.rx_bytes);
            tx.get_or_create(&peer).inc_by(l.tx_bytes);
            if let Some(a) = l.handshake_age {
                age.get_or_create(&peer).set(a.as_secs_f64());
            }
        }
        reg.register_with_unit(
            "ployz_mesh_peer_received",
            "WireGuard bytes received from a peer",
            prometheus_client::registry::Unit::Bytes,
            rx,
        );
        reg.register_with_unit(
            "ployz_mesh_peer_sent",
            "WireGuard bytes sent to a peer",
            prometheus_client::registry::Unit::Bytes,
            tx,
        );
        reg.register_with_unit(
            "ployz_mesh_peer_handshake_age",
            "Time since the last WireGuard handshake with a peer",
            prometheus_client::registry::Unit::Seconds,
            age,
        );
        let rtt: Family<Labels, FloatGauge> = Family::default();
        for r in self.overlay.rtt_rows() {
            if let Some(ms) = r.median_ms {
                rtt.get_or_create(&vec![("peer".to_string(), r.peer)])
                    .set(ms / 1000.0);
            }
        }
        reg.register_with_unit(
            "ployz_mesh_peer_rtt_median",
            "Median round trip to a peer over the mesh (QUIC prober)",
            prometheus_client::registry::Unit::Seconds,
            rtt,
        );
    }

    async fn workload_metrics(&self, reg: &mut Registry) {
        let pulls = self.workloads.pull_metrics();
        reg.register(
            "ployz_image_pulls",
            "Images this machine fetched, by source (peer: another machine over the mesh; registry) and result",
            pulls.pulls,
        );
        reg.register_with_unit(
            "ployz_image_pull",
            "Bytes received by image pulls, by source",
            prometheus_client::registry::Unit::Bytes,
            pulls.bytes,
        );
        reg.register_with_unit(
            "ployz_image_pull_duration",
            "Duration of successful image pulls, by source",
            prometheus_client::registry::Unit::Seconds,
            pulls.duration,
        );
        let Ok(Ok(instances)) =
            tokio::time::timeout(STORE_BUDGET, self.workloads.local_instances()).await
        else {
            return;
        };
        let by_state: Family<Labels, Gauge> = Family::default();
        for s in [
            InstanceState::Pending,
            InstanceState::Running,
            InstanceState::Failed,
            InstanceState::Stopped,
        ] {
            by_state
                .get_or_create(&vec![("state".into(), s.to_string())])
                .set(0);
        }
        let by_health: Family<Labels, Gauge> = Family::default();
        for h in [
            InstanceHealth::None,
            InstanceHealth::Starting,
            InstanceHealth::Healthy,
            InstanceHealth::Unhealthy,
        ] {
            by_health
                .get_or_create(&vec![("health".into(), h.to_string())])
                .set(0);
        }
        let mut restarts = 0i64;
        for (state, r, health) in &instances {
            by_state
                .get_or_create(&vec![("state".into(), state.to_string())])
                .inc();
            by_health
                .get_or_create(&vec![("health".into(), health.to_string())])
                .inc();
            restarts += i64::from(*r);
        }
        reg.register(
            "ployz_instances",
            "Instances placed on this machine, by state",
            by_state,
        );
        reg.register(
            "ployz_instances_health",
            "Instances placed on this machine, by health (none: no health check)",
            by_health,
        );
        gauge(
            reg,
            "ployz_instance_restarts",
            "Restarts of this machine's instances since their deploys",
            restarts,
        );
    }

    async fn operation_metrics(&self, reg: &mut Registry) {
        let Ok(Ok(list)) = tokio::time::timeout(STORE_BUDGET, self.ops.list()).await else {
            return;
        };
        let ops: Family<Labels, Gauge> = Family::default();
        for kind in [
            OpKind::MachineAdd,
            OpKind::MachineUpdate,
            OpKind::MachineRm,
            OpKind::StoragePromote,
            OpKind::Migrate,
            OpKind::Deploy,
        ] {
            for state in [
                OpState::Running,
                OpState::Succeeded,
                OpState::RolledBack,
                OpState::Failed,
            ] {
                ops.get_or_create(&vec![
                    ("kind".into(), kind.to_string()),
                    ("state".into(), state.to_string()),
                ])
                .set(0);
            }
        }
        for o in list.operations {
            ops.get_or_create(&vec![
                ("kind".into(), o.kind.to_string()),
                ("state".into(), o.state.to_string()),
            ])
            .inc();
        }
        reg.register(
            "ployz_operations",
            "Recorded long operations (add, update, rm, promote, migrate, deploy) by kind and state",
            ops,
        );
    }
}

/// `prometheus-client` writes OpenMetrics; Prometheus' own text format
/// (what `promtool check metrics` and older scrapers parse) names a
/// counter's HELP and TYPE after its `_total` samples and has no `# UNIT`
/// or `# EOF` lines.
fn to_prometheus_text(open_metrics: &str) -> String {
    let counters: std::collections::HashSet<&str> = open_metrics
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.strip_suffix(" counter"))
        .collect();
    let mut out = String::with_capacity(open_metrics.len());
    for line in open_metrics.lines() {
        if line == "# EOF" || line.starts_with("# UNIT ") {
            continue;
        }
        let renamed = ["# HELP ", "# TYPE "].iter().find_map(|p| {
            let rest = line.strip_prefix(p)?;
            let (name, tail) = rest.split_once(' ')?;
            counters
                .contains(name)
                .then(|| format!("{p}{name}_total {tail}"))
        });
        out.push_str(renamed.as_deref().unwrap_or(line));
        out.push('\n');
    }
    out
}

/// Bytes of the files under `dir`.
fn dir_bytes(dir: &Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    entries
        .flatten()
        .map(|e| match e.file_type() {
            Ok(t) if t.is_dir() => dir_bytes(&e.path()),
            Ok(t) if t.is_file() => e.metadata().map_or(0, |m| m.len()),
            _ => 0,
        })
        .sum()
}

/// Serve `GET /metrics` on `addr` until the process ends.
pub async fn serve(daemon: Arc<Daemon>, addr: SocketAddr) {
    use http_body_util::Full;
    use hyper::body::Bytes;
    use hyper::{Response, StatusCode};
    crate::http::serve(
        addr,
        "metrics",
        |_| {},
        move |req| {
            let daemon = daemon.clone();
            async move {
                let resp = if req.uri().path() == "/metrics" && req.method() == hyper::Method::GET {
                    Response::builder()
                        .header("content-type", "text/plain; version=0.0.4; charset=utf-8")
                        .body(Full::new(Bytes::from(daemon.metrics_text().await)))
                } else {
                    Response::builder()
                        .status(StatusCode::NOT_FOUND)
                        .body(Full::new(Bytes::from("ployzd serves GET /metrics here\n")))
                };
                resp.expect("static response parts")
            }
        },
    )
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_are_named_after_their_samples() {
        let om = "# HELP a_bytes Sent.\n# TYPE a_bytes counter\n# UNIT a_bytes bytes\na_bytes_total{peer=\"x\"} 3\n# HELP g A gauge.\n# TYPE g gauge\ng 1\n# EOF\n";
        assert_eq!(
            to_prometheus_text(om),
            "# HELP a_bytes_total Sent.\n# TYPE a_bytes_total counter\na_bytes_total{peer=\"x\"} 3\n# HELP g A gauge.\n# TYPE g gauge\ng 1\n"
        );
    }
}
