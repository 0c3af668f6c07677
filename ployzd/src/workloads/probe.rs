//! Health checks, the IO: the probes (behind [`Prober`]) and the loop that
//! runs them for the instances of this machine. What to probe is handed in
//! by the reconciler after each pass ([`HealthMonitor::set_targets`]); when
//! an instance's health changes, the loop wakes the reconciler, which
//! writes it into the instance's record (the record's only writer) and
//! restarts an unhealthy instance. The decisions are [`super::health`]'s.

use super::health::{http_passes, http_status, tail, ProbeOutcome, Tracker, PROBE_OUTPUT_CHARS};
use super::*;
use std::future::Future;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// How often the loop looks for due probes.
const TICK: Duration = Duration::from_millis(200);
/// Most of an HTTP response read to find its status line.
const HTTP_HEAD_MAX: usize = 1024;

/// One run of one instance of this machine with a health check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Target {
    /// The workload id.
    pub(super) id: String,
    /// Which run: when it was started (a restart is a new run).
    pub(super) run: u64,
    pub(super) addr: Option<Ipv4Addr>,
    pub(super) check: HealthCheck,
}

/// Runs one probe against one instance.
pub(super) trait Prober: Send + Sync {
    fn probe(&self, target: &Target) -> impl Future<Output = ProbeOutcome> + Send;
}

/// The probes for real: `exec` through the runtime, HTTP and TCP to the
/// instance's address on its bridge.
pub(super) struct RuntimeProber<'a> {
    pub(super) runtime: &'a AnyRuntime,
}

impl Prober for RuntimeProber<'_> {
    async fn probe(&self, t: &Target) -> ProbeOutcome {
        let timeout = Duration::from_millis(t.check.timeout_ms);
        let timed_out = |what: String| {
            ProbeOutcome::fail(format!("{what}: no answer within {}", human(timeout)))
        };
        match &t.check.probe {
            HealthProbe::Cmd { command } => {
                let args = ["/bin/sh".to_string(), "-c".to_string(), command.clone()];
                // The runtime bounds the command; this bounds the runtime.
                let run = self.runtime.exec(&t.id, &args, timeout);
                match tokio::time::timeout(timeout + Duration::from_secs(5), run).await {
                    Err(_) => timed_out(format!("`{command}`")),
                    Ok(Err(e)) => ProbeOutcome::fail(e.to_string()),
                    Ok(Ok(out)) => {
                        let said = tail(&out.output, PROBE_OUTPUT_CHARS);
                        match out.exit_code {
                            Some(0) => ProbeOutcome::pass(said),
                            Some(c) => ProbeOutcome::fail(format!(
                                "`{command}` exited with code {c}{}",
                                if said.is_empty() {
                                    String::new()
                                } else {
                                    format!(": {said}")
                                }
                            )),
                            None => ProbeOutcome::fail(format!(
                                "`{command}` did not end within {} (killed){}",
                                human(timeout),
                                if said.is_empty() {
                                    String::new()
                                } else {
                                    format!(": {said}")
                                }
                            )),
                        }
                    }
                }
            }
            HealthProbe::Http { path, port } => {
                let Some(addr) = t.addr else {
                    return ProbeOutcome::fail("the instance has no address to probe");
                };
                tokio::time::timeout(timeout, http_get(addr, *port, path))
                    .await
                    .unwrap_or_else(|_| timed_out(format!("GET http://{addr}:{port}{path}")))
            }
            HealthProbe::Tcp { port } => {
                let Some(addr) = t.addr else {
                    return ProbeOutcome::fail("the instance has no address to probe");
                };
                match tokio::time::timeout(timeout, tokio::net::TcpStream::connect((addr, *port)))
                    .await
                {
                    Err(_) => timed_out(format!("connect to {addr}:{port}")),
                    Ok(Err(e)) => ProbeOutcome::fail(format!("connect to {addr}:{port}: {e}")),
                    Ok(Ok(_)) => ProbeOutcome::pass(format!("connected to {addr}:{port}")),
                }
            }
        }
    }
}

fn human(d: Duration) -> String {
    humantime::format_duration(d).to_string()
}

/// `GET path` over HTTP/1.1; passes on a 2xx or 3xx status.
async fn http_get(addr: Ipv4Addr, port: u16, path: &str) -> ProbeOutcome {
    let what = format!("GET http://{addr}:{port}{path}");
    let mut s = match tokio::net::TcpStream::connect((addr, port)).await {
        Ok(s) => s,
        Err(e) => return ProbeOutcome::fail(format!("{what}: cannot connect: {e}")),
    };
    let req = format!(
        "GET {path} HTTP/1.1\r\nHost: {addr}:{port}\r\nUser-Agent: ployz-health\r\nAccept: */*\r\nConnection: close\r\n\r\n"
    );
    if let Err(e) = s.write_all(req.as_bytes()).await {
        return ProbeOutcome::fail(format!("{what}: cannot send the request: {e}"));
    }
    let mut head = Vec::new();
    let mut buf = [0u8; 512];
    while !head.contains(&b'\n') && head.len() < HTTP_HEAD_MAX {
        match s.read(&mut buf).await {
            Ok(0) => break,
            Ok(n) => head.extend_from_slice(&buf[..n]),
            Err(e) => return ProbeOutcome::fail(format!("{what}: cannot read the answer: {e}")),
        }
    }
    let text = String::from_utf8_lossy(&head);
    let line = text.lines().next().unwrap_or("").trim().to_string();
    match http_status(&line) {
        Some(code) if http_passes(code) => ProbeOutcome::pass(line),
        Some(_) => ProbeOutcome::fail(format!("{what}: {line}")),
        None if line.is_empty() => ProbeOutcome::fail(format!("{what}: closed without an answer")),
        None => ProbeOutcome::fail(format!("{what}: not an HTTP answer: {line}")),
    }
}

struct Entry {
    target: Target,
    tracker: Tracker,
}

/// The health of this machine's instances, in memory (a restarted ployzd
/// starts them over at `starting`). Times are milliseconds since the
/// monitor was made, on tokio's clock.
pub(super) struct HealthMonitor {
    entries: std::sync::Mutex<HashMap<String, Entry>>,
    base: tokio::time::Instant,
}

impl HealthMonitor {
    pub(super) fn new() -> HealthMonitor {
        HealthMonitor {
            entries: Default::default(),
            base: tokio::time::Instant::now(),
        }
    }

    fn now_ms(&self) -> u64 {
        self.base.elapsed().as_millis() as u64
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Entry>> {
        self.entries.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// What runs here with a health check now; a new run (or a changed
    /// check or address) starts over at `starting`.
    pub(super) fn set_targets(&self, targets: Vec<Target>) {
        self.set_targets_at(targets, self.now_ms());
    }

    fn set_targets_at(&self, targets: Vec<Target>, now_ms: u64) {
        let mut entries = self.lock();
        let keep: HashSet<&str> = targets.iter().map(|t| t.id.as_str()).collect();
        entries.retain(|id, _| keep.contains(id.as_str()));
        for t in targets {
            if entries.get(&t.id).is_some_and(|e| e.target == t) {
                continue;
            }
            let tracker = Tracker::new(&t.check, now_ms);
            entries.insert(t.id.clone(), Entry { target: t, tracker });
        }
    }

    /// The health of run `run` of workload `id` and its last failed probe's
    /// output; `None` if it is not followed (yet).
    pub(super) fn health_of(&self, id: &str, run: u64) -> Option<(InstanceHealth, Option<String>)> {
        let entries = self.lock();
        let e = entries.get(id).filter(|e| e.target.run == run)?;
        Some((
            e.tracker.health(),
            e.tracker.last_failure().map(str::to_string),
        ))
    }

    /// The probes due now, each marked as running.
    fn due(&self, now_ms: u64) -> Vec<Target> {
        self.lock()
            .values_mut()
            .filter_map(|e| e.tracker.start_probe(now_ms).then(|| e.target.clone()))
            .collect()
    }

    /// A probe of `t` ended: the new health if it changed (and the run is
    /// still the one followed).
    fn done(&self, t: &Target, outcome: ProbeOutcome, now_ms: u64) -> Option<InstanceHealth> {
        let mut entries = self.lock();
        let e = entries.get_mut(&t.id).filter(|e| e.target == *t)?;
        e.tracker.probe_done(now_ms, outcome)
    }
}

impl Workloads {
    /// The probe loop: starts due probes (each bounded by its timeout, many
    /// at once), feeds their outcomes to the trackers, and wakes the
    /// reconciler when an instance's health changed.
    pub(super) async fn run_health(self: Arc<Self>, mut stop: tokio::sync::watch::Receiver<bool>) {
        let mut probes: tokio::task::JoinSet<(Target, ProbeOutcome)> = Default::default();
        loop {
            tokio::select! {
                _ = stop.changed() => break,
                Some(joined) = probes.join_next(), if !probes.is_empty() => {
                    let Ok((t, outcome)) = joined else { continue };
                    let passed = outcome.passed;
                    let said = outcome.output.clone();
                    if let Some(h) = self.health.done(&t, outcome, self.health.now_ms()) {
                        tracing::info!(workload = %t.id, health = %h, passed, probe = %said, "health changed");
                        self.kick.notify_one();
                    } else if !passed {
                        tracing::debug!(workload = %t.id, probe = %said, "health probe failed");
                    }
                    continue;
                }
                _ = tokio::time::sleep(TICK) => {}
            }
            for t in self.health.due(self.health.now_ms()) {
                let me = self.clone();
                probes.spawn(async move {
                    let outcome = match me.engine.get() {
                        Some(w) => {
                            RuntimeProber {
                                runtime: &w.runtime,
                            }
                            .probe(&t)
                            .await
                        }
                        None => ProbeOutcome::fail("the runtime is not open"),
                    };
                    (t, outcome)
                });
            }
        }
        probes.abort_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn target(id: &str, run: u64) -> Target {
        Target {
            id: id.into(),
            run,
            addr: Some(Ipv4Addr::new(10, 101, 1, 2)),
            check: HealthCheck {
                probe: HealthProbe::Tcp { port: 80 },
                interval_ms: 1000,
                timeout_ms: 500,
                retries: 2,
                start_period_ms: 0,
            },
        }
    }

    /// A prober answering from a script, for the monitor's bookkeeping.
    struct Scripted(Vec<bool>, std::sync::Mutex<usize>);

    impl Prober for Scripted {
        async fn probe(&self, _t: &Target) -> ProbeOutcome {
            let mut n = self.1.lock().unwrap();
            let ok = self.0.get(*n).copied().unwrap_or(false);
            *n += 1;
            if ok {
                ProbeOutcome::pass("ok")
            } else {
                ProbeOutcome::fail("refused")
            }
        }
    }

    #[tokio::test]
    async fn the_monitor_follows_runs_and_forgets_what_left() {
        let m = HealthMonitor::new();
        let p = Scripted(vec![true, false, false], Default::default());
        m.set_targets_at(vec![target("a", 7)], 0);
        assert_eq!(m.health_of("a", 7), Some((InstanceHealth::Starting, None)));
        assert_eq!(m.health_of("a", 8), None, "another run");
        assert!(m.due(500).is_empty());
        let mut changes = vec![];
        for now in [1_000, 2_000, 3_000] {
            for t in m.due(now) {
                let o = p.probe(&t).await;
                changes.extend(m.done(&t, o, now));
            }
        }
        assert_eq!(
            changes,
            vec![InstanceHealth::Healthy, InstanceHealth::Unhealthy]
        );
        assert_eq!(
            m.health_of("a", 7),
            Some((InstanceHealth::Unhealthy, Some("refused".into())))
        );
        // The same target again changes nothing; a restart starts over.
        m.set_targets_at(vec![target("a", 7)], 3_500);
        assert_eq!(m.health_of("a", 7).unwrap().0, InstanceHealth::Unhealthy);
        m.set_targets_at(vec![target("a", 9)], 4_000);
        assert_eq!(m.health_of("a", 9), Some((InstanceHealth::Starting, None)));
        // A late outcome of the old run is dropped.
        assert_eq!(
            m.done(&target("a", 7), ProbeOutcome::pass("ok"), 4_100),
            None
        );
        assert_eq!(m.health_of("a", 9).unwrap().0, InstanceHealth::Starting);
        m.set_targets_at(vec![], 5_000);
        assert_eq!(m.health_of("a", 9), None);
    }

    #[tokio::test]
    async fn http_and_tcp_probes_against_a_real_listener() {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = l.local_addr().unwrap().port();
        let server = tokio::spawn(async move {
            for status in ["200 OK", "503 Service Unavailable"] {
                let (mut s, _) = l.accept().await.unwrap();
                let mut buf = [0u8; 1024];
                let n = s.read(&mut buf).await.unwrap();
                let req = String::from_utf8_lossy(&buf[..n]).to_string();
                assert!(req.starts_with("GET /up HTTP/1.1\r\n"), "{req}");
                s.write_all(format!("HTTP/1.1 {status}\r\nContent-Length: 0\r\n\r\n").as_bytes())
                    .await
                    .unwrap();
            }
        });
        let lo = Ipv4Addr::LOCALHOST;
        let ok = http_get(lo, port, "/up").await;
        assert!(ok.passed, "{ok:?}");
        assert_eq!(ok.output, "HTTP/1.1 200 OK");
        let bad = http_get(lo, port, "/up").await;
        assert!(!bad.passed);
        assert!(
            bad.output
                .ends_with("/up: HTTP/1.1 503 Service Unavailable"),
            "{}",
            bad.output
        );
        server.await.unwrap();
        // Nothing listens there any more.
        let refused = http_get(lo, port, "/up").await;
        assert!(
            !refused.passed && refused.output.contains("cannot connect"),
            "{refused:?}"
        );
    }
}
