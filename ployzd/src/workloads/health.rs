//! Health checks, the pure part: when to probe an instance and what its
//! probes' outcomes make of its health. No IO and no clock: times are
//! milliseconds on the caller's monotonic clock, outcomes are handed in.
//! The probes themselves and the loop that runs them are in [`super::probe`].
//!
//! One [`Tracker`] follows one run of one instance (a restart gets a new
//! one): `starting` until a probe passes (`healthy`); after the start
//! period, or once it has been healthy, `retries` failed probes in a row make
//! it `unhealthy`, which is final for the run (its machine restarts it).

use crate::errors::invalid;
use ployz_api::{ApiError, DeployRequest, HealthCheck, HealthProbe, InstanceHealth};
use std::time::Duration;

/// While an instance is in its start period and not yet healthy, it is
/// probed at least this often (so a deploy sees it healthy soon after it
/// answers, whatever the interval).
pub const STARTING_PROBE_EVERY_MS: u64 = 1_000;

/// Longest probe output kept (the end of it).
pub const PROBE_OUTPUT_CHARS: usize = 300;

/// Defaults of `deploy service --health-*` (shorter than docker's 30 s, so a
/// deploy that waits for health does not wait for long).
pub const DEFAULT_INTERVAL_MS: u64 = 10_000;
pub const DEFAULT_TIMEOUT_MS: u64 = 5_000;
pub const DEFAULT_RETRIES: u32 = 3;
pub const DEFAULT_START_PERIOD_MS: u64 = 0;

/// What one probe found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProbeOutcome {
    pub passed: bool,
    /// What it said (an HTTP status line, an error, a command's output).
    pub output: String,
}

impl ProbeOutcome {
    pub fn pass(output: impl Into<String>) -> Self {
        ProbeOutcome {
            passed: true,
            output: output.into(),
        }
    }

    pub fn fail(output: impl Into<String>) -> Self {
        ProbeOutcome {
            passed: false,
            output: output.into(),
        }
    }
}

/// The health of one run of one instance.
#[derive(Debug, Clone)]
pub struct Tracker {
    interval_ms: u64,
    retries: u32,
    start_period_ms: u64,
    started_ms: u64,
    health: InstanceHealth,
    /// Failed probes in a row that count.
    failures: u32,
    /// When the last probe ended.
    last_probe_ms: Option<u64>,
    in_flight: bool,
    /// What the last failed probe said.
    last_failure: Option<String>,
}

impl Tracker {
    /// A run that started (was first seen running) at `started_ms`.
    pub fn new(check: &HealthCheck, started_ms: u64) -> Tracker {
        Tracker {
            interval_ms: check.interval_ms.max(1),
            retries: check.retries.max(1),
            start_period_ms: check.start_period_ms,
            started_ms,
            health: InstanceHealth::Starting,
            failures: 0,
            last_probe_ms: None,
            in_flight: false,
            last_failure: None,
        }
    }

    pub fn health(&self) -> InstanceHealth {
        self.health
    }

    pub fn last_failure(&self) -> Option<&str> {
        self.last_failure.as_deref()
    }

    fn in_start_period(&self, now_ms: u64) -> bool {
        now_ms < self.started_ms.saturating_add(self.start_period_ms)
    }

    /// When the next probe is due; `None` once unhealthy (the run is over)
    /// or while a probe runs.
    pub fn next_probe_ms(&self) -> Option<u64> {
        if self.in_flight || self.health == InstanceHealth::Unhealthy {
            return None;
        }
        let fast = self.interval_ms.min(STARTING_PROBE_EVERY_MS);
        Some(match self.last_probe_ms {
            None => self.started_ms.saturating_add(fast),
            Some(last) => {
                let every = if self.health == InstanceHealth::Starting && self.in_start_period(last)
                {
                    fast
                } else {
                    self.interval_ms
                };
                last.saturating_add(every)
            }
        })
    }

    /// Whether a probe should start at `now_ms`; if so, it is marked as
    /// running (one at a time).
    pub fn start_probe(&mut self, now_ms: u64) -> bool {
        match self.next_probe_ms() {
            Some(at) if now_ms >= at => {
                self.in_flight = true;
                true
            }
            _ => false,
        }
    }

    /// A probe ended at `now_ms`: the new health if it changed.
    pub fn probe_done(&mut self, now_ms: u64, outcome: ProbeOutcome) -> Option<InstanceHealth> {
        self.in_flight = false;
        self.last_probe_ms = Some(now_ms);
        if self.health == InstanceHealth::Unhealthy {
            return None;
        }
        let before = self.health;
        if outcome.passed {
            self.failures = 0;
            self.health = InstanceHealth::Healthy;
        } else {
            self.last_failure = Some(tail(&outcome.output, PROBE_OUTPUT_CHARS));
            // Docker's rule: failures in the start period do not count,
            // unless the instance has already been healthy.
            if self.health == InstanceHealth::Healthy || !self.in_start_period(now_ms) {
                self.failures += 1;
                if self.failures >= self.retries {
                    self.health = InstanceHealth::Unhealthy;
                }
            }
        }
        (self.health != before).then_some(self.health)
    }
}

/// Longest interval, timeout or start period accepted.
const MAX_DURATION: Duration = Duration::from_secs(3600);
const MAX_RETRIES: u32 = 100;
const MAX_COMMAND_CHARS: usize = 4096;

/// The health check a deploy asks for (`None`: no `--health-cmd/-http/-tcp`),
/// or what is wrong with its flags.
pub fn parse_health(req: &DeployRequest) -> Result<Option<HealthCheck>, ApiError> {
    let given: Vec<&str> = [
        ("--health-cmd", &req.health_cmd),
        ("--health-http", &req.health_http),
        ("--health-tcp", &req.health_tcp),
    ]
    .into_iter()
    .filter(|(_, v)| v.is_some())
    .map(|(flag, _)| flag)
    .collect();
    if given.len() > 1 {
        return Err(invalid(format!(
            "{} given together: a service has one health check, choose one",
            given.join(" and ")
        )));
    }
    let probe = if let Some(cmd) = &req.health_cmd {
        if cmd.trim().is_empty() {
            return Err(invalid(
                "--health-cmd is empty: give a shell command, e.g. --health-cmd 'test -e /tmp/ready'",
            ));
        }
        if cmd.len() > MAX_COMMAND_CHARS {
            return Err(invalid(format!(
                "--health-cmd is longer than {MAX_COMMAND_CHARS} bytes: put it in a script inside the image"
            )));
        }
        HealthProbe::Cmd {
            command: cmd.clone(),
        }
    } else if let Some(http) = &req.health_http {
        parse_http(http)?
    } else if let Some(tcp) = &req.health_tcp {
        HealthProbe::Tcp {
            port: parse_port("--health-tcp", tcp)?,
        }
    } else {
        let stray: Vec<&str> = [
            ("--health-interval", req.health_interval.is_some()),
            ("--health-timeout", req.health_timeout.is_some()),
            ("--health-retries", req.health_retries.is_some()),
            ("--health-start-period", req.health_start_period.is_some()),
        ]
        .into_iter()
        .filter(|(_, set)| *set)
        .map(|(flag, _)| flag)
        .collect();
        if !stray.is_empty() {
            return Err(invalid(format!(
                "{} without a health check: add --health-cmd, --health-http or --health-tcp",
                stray.join(", ")
            )));
        }
        return Ok(None);
    };
    let ms = |flag: &str, v: &Option<String>, default: u64, min: Duration| match v {
        None => Ok(default),
        Some(s) => parse_duration(flag, s, min).map(|d| d.as_millis() as u64),
    };
    let interval_ms = ms(
        "--health-interval",
        &req.health_interval,
        DEFAULT_INTERVAL_MS,
        Duration::from_millis(100),
    )?;
    let timeout_ms = ms(
        "--health-timeout",
        &req.health_timeout,
        DEFAULT_TIMEOUT_MS,
        Duration::from_millis(100),
    )?;
    let start_period_ms = ms(
        "--health-start-period",
        &req.health_start_period,
        DEFAULT_START_PERIOD_MS,
        Duration::ZERO,
    )?;
    let retries = req.health_retries.unwrap_or(DEFAULT_RETRIES);
    if !(1..=MAX_RETRIES).contains(&retries) {
        return Err(invalid(format!(
            "--health-retries {retries} is out of range: use 1 to {MAX_RETRIES} (failed probes in a row before an instance is unhealthy)"
        )));
    }
    Ok(Some(HealthCheck {
        probe,
        interval_ms,
        timeout_ms,
        retries,
        start_period_ms,
    }))
}

/// `PATH[:PORT]`: an absolute path (query allowed), port 80 by default.
fn parse_http(s: &str) -> Result<HealthProbe, ApiError> {
    let bad = |why: &str| {
        invalid(format!(
            "--health-http `{s}` {why}: give PATH[:PORT], e.g. /healthz or /healthz:8080"
        ))
    };
    if !s.starts_with('/') {
        return Err(bad("does not start with /"));
    }
    let (path, port) = match s.rsplit_once(':') {
        Some((path, port)) => (path, parse_port("--health-http", port)?),
        None => (s, 80),
    };
    if path
        .chars()
        .any(|c| c.is_whitespace() || c.is_control() || c == '#')
    {
        return Err(bad("has a space, control character or # in its path"));
    }
    Ok(HealthProbe::Http {
        path: path.to_string(),
        port,
    })
}

fn parse_port(flag: &str, s: &str) -> Result<u16, ApiError> {
    match s.parse::<u16>() {
        Ok(p) if p > 0 => Ok(p),
        _ => Err(invalid(format!(
            "{flag}: `{s}` is not a port: use 1 to 65535"
        ))),
    }
}

/// A duration like `500ms`, `10s`, `1m`, `1m30s`, between `min` and an hour.
fn parse_duration(flag: &str, s: &str, min: Duration) -> Result<Duration, ApiError> {
    let d = humantime::parse_duration(s.trim()).map_err(|e| {
        invalid(format!(
            "{flag} `{s}` is not a duration ({e}): use e.g. 500ms, 10s or 1m"
        ))
    })?;
    if d < min || d > MAX_DURATION {
        return Err(invalid(format!(
            "{flag} `{s}` is out of range: use {} to 1h",
            humantime::format_duration(min)
        )));
    }
    Ok(d)
}

/// The last `max` characters of `s`, trimmed, with `…` when cut.
pub fn tail(s: &str, max: usize) -> String {
    let s = s.trim();
    let n = s.chars().count();
    if n <= max {
        return s.to_string();
    }
    let cut: String = s.chars().skip(n - max).collect();
    format!("…{cut}")
}

/// The status code of an HTTP response's first line (`HTTP/1.1 204 No
/// Content`), if it is one.
pub fn http_status(first_line: &str) -> Option<u16> {
    let mut parts = first_line.split_whitespace();
    let version = parts.next()?;
    if !version.starts_with("HTTP/") {
        return None;
    }
    let code = parts.next()?;
    if code.len() != 3 {
        return None;
    }
    code.parse().ok()
}

/// Whether an HTTP status passes a health probe: 2xx and 3xx.
pub fn http_passes(status: u16) -> bool {
    (200..400).contains(&status)
}

#[cfg(test)]
mod tests {
    use super::*;
    use ployz_api::HealthProbe;

    fn check(interval_ms: u64, retries: u32, start_period_ms: u64) -> HealthCheck {
        HealthCheck {
            probe: HealthProbe::Tcp { port: 80 },
            interval_ms,
            timeout_ms: 1000,
            retries,
            start_period_ms,
        }
    }

    /// Runs probes at every due time up to `until`, answering each with
    /// `answer(now)`; returns (time, new health) of every change.
    fn drive(
        t: &mut Tracker,
        from: u64,
        until: u64,
        answer: impl Fn(u64) -> bool,
    ) -> Vec<(u64, InstanceHealth)> {
        let mut changes = vec![];
        let mut now = from;
        while now <= until {
            if t.start_probe(now) {
                let o = if answer(now) {
                    ProbeOutcome::pass("ok")
                } else {
                    ProbeOutcome::fail(format!("refused at {now}"))
                };
                if let Some(h) = t.probe_done(now, o) {
                    changes.push((now, h));
                }
            }
            now += 100;
        }
        changes
    }

    #[test]
    fn starts_starting_and_one_pass_makes_it_healthy() {
        let mut t = Tracker::new(&check(10_000, 3, 0), 0);
        assert_eq!(t.health(), InstanceHealth::Starting);
        // The first probe comes after a second, not after the interval.
        assert_eq!(t.next_probe_ms(), Some(1_000));
        assert!(!t.start_probe(999));
        assert!(t.start_probe(1_000));
        // One at a time.
        assert!(!t.start_probe(5_000));
        assert_eq!(t.next_probe_ms(), None);
        assert_eq!(
            t.probe_done(1_050, ProbeOutcome::pass("HTTP/1.1 200 OK")),
            Some(InstanceHealth::Healthy)
        );
        // Healthy: probed every interval after the last one ended.
        assert_eq!(t.next_probe_ms(), Some(11_050));
        assert_eq!(t.last_failure(), None);
    }

    #[test]
    fn retries_failures_in_a_row_make_it_unhealthy_and_that_is_final() {
        let mut t = Tracker::new(&check(1_000, 3, 0), 0);
        let changes = drive(&mut t, 0, 20_000, |_| false);
        // Probes at 1 s, 2 s, 3 s: the third failure decides.
        assert_eq!(changes, vec![(3_000, InstanceHealth::Unhealthy)]);
        assert_eq!(t.next_probe_ms(), None, "no probes after unhealthy");
        assert_eq!(t.last_failure(), Some("refused at 3000"));
        // A late answer changes nothing.
        assert_eq!(t.probe_done(4_000, ProbeOutcome::pass("ok")), None);
        assert_eq!(t.health(), InstanceHealth::Unhealthy);
    }

    #[test]
    fn a_pass_resets_the_count() {
        let mut t = Tracker::new(&check(1_000, 3, 0), 0);
        // Fails twice, passes once, fails twice: never three in a row.
        let pattern = |now: u64| matches!(now, 3_000 | 6_000);
        let changes = drive(&mut t, 0, 7_000, pattern);
        assert_eq!(changes, vec![(3_000, InstanceHealth::Healthy)]);
        assert_eq!(t.health(), InstanceHealth::Healthy);
        // From healthy, three failures in a row: 7 s, 8 s, 9 s.
        let changes = drive(&mut t, 7_100, 20_000, |_| false);
        assert_eq!(changes, vec![(9_000, InstanceHealth::Unhealthy)]);
    }

    #[test]
    fn failures_in_the_start_period_do_not_count() {
        let mut t = Tracker::new(&check(5_000, 2, 10_000), 0);
        let changes = drive(&mut t, 0, 60_000, |_| false);
        // Probed every second during the 10 s start period, failures
        // ignored; then every 5 s after the last: 10 s counts, 15 s decides.
        assert_eq!(changes, vec![(15_000, InstanceHealth::Unhealthy)]);
        let mut t = Tracker::new(&check(5_000, 2, 10_000), 0);
        let changes = drive(&mut t, 0, 4_000, |now| now >= 4_000);
        assert_eq!(changes, vec![(4_000, InstanceHealth::Healthy)]);
        assert_eq!(t.next_probe_ms(), Some(9_000), "healthy: the interval");
    }

    #[test]
    fn once_healthy_failures_count_even_in_the_start_period() {
        let mut t = Tracker::new(&check(1_000, 2, 60_000), 0);
        let changes = drive(&mut t, 0, 10_000, |now| now < 2_000);
        assert_eq!(
            changes,
            vec![
                (1_000, InstanceHealth::Healthy),
                (3_000, InstanceHealth::Unhealthy)
            ]
        );
    }

    #[test]
    fn zero_values_are_safe() {
        let mut t = Tracker::new(&check(0, 0, 0), 5);
        assert_eq!(t.next_probe_ms(), Some(6));
        assert!(t.start_probe(6));
        assert_eq!(
            t.probe_done(6, ProbeOutcome::fail("no")),
            Some(InstanceHealth::Unhealthy)
        );
    }

    #[test]
    fn output_is_cut_from_the_front() {
        let long = format!("{}END", "x".repeat(1000));
        let mut t = Tracker::new(&check(1_000, 5, 0), 0);
        assert!(t.start_probe(1_000));
        t.probe_done(1_000, ProbeOutcome::fail(long));
        let kept = t.last_failure().unwrap();
        assert!(kept.ends_with("END") && kept.starts_with('…'), "{kept}");
        assert_eq!(kept.chars().count(), PROBE_OUTPUT_CHARS + 1);
        assert_eq!(tail("  short\n", 10), "short");
    }

    fn req() -> DeployRequest {
        DeployRequest {
            name: "web".into(),
            image: "busybox".into(),
            replicas: 1,
            env: vec![],
            volumes: vec![],
            command: vec![],
            wait_secs: None,
            memory: None,
            cpu_shares: None,
            project: None,
            health_cmd: None,
            health_http: None,
            health_tcp: None,
            health_interval: None,
            health_timeout: None,
            health_retries: None,
            health_start_period: None,
            nats_user: None,
        }
    }

    #[test]
    fn health_flags_parse_with_defaults() {
        assert_eq!(parse_health(&req()).unwrap(), None);
        let h = parse_health(&DeployRequest {
            health_http: Some("/healthz?full=1:8080".into()),
            ..req()
        })
        .unwrap()
        .unwrap();
        assert_eq!(
            h,
            HealthCheck {
                probe: HealthProbe::Http {
                    path: "/healthz?full=1".into(),
                    port: 8080
                },
                interval_ms: DEFAULT_INTERVAL_MS,
                timeout_ms: DEFAULT_TIMEOUT_MS,
                retries: DEFAULT_RETRIES,
                start_period_ms: DEFAULT_START_PERIOD_MS,
            }
        );
        let h = parse_health(&DeployRequest {
            health_http: Some("/".into()),
            health_interval: Some("1s".into()),
            health_timeout: Some("500ms".into()),
            health_retries: Some(5),
            health_start_period: Some("1m30s".into()),
            ..req()
        })
        .unwrap()
        .unwrap();
        assert_eq!(
            (
                h.probe,
                h.interval_ms,
                h.timeout_ms,
                h.retries,
                h.start_period_ms
            ),
            (
                HealthProbe::Http {
                    path: "/".into(),
                    port: 80
                },
                1000,
                500,
                5,
                90_000
            )
        );
        let h = parse_health(&DeployRequest {
            health_cmd: Some("test -e /ready".into()),
            ..req()
        })
        .unwrap()
        .unwrap();
        assert_eq!(
            h.probe,
            HealthProbe::Cmd {
                command: "test -e /ready".into()
            }
        );
        let h = parse_health(&DeployRequest {
            health_tcp: Some("5432".into()),
            ..req()
        })
        .unwrap()
        .unwrap();
        assert_eq!(h.probe, HealthProbe::Tcp { port: 5432 });
    }

    #[test]
    fn bad_health_flags_say_what_is_wrong() {
        let cases: Vec<(DeployRequest, &str)> = vec![
            (
                DeployRequest {
                    health_cmd: Some("true".into()),
                    health_tcp: Some("80".into()),
                    ..req()
                },
                "--health-cmd and --health-tcp given together",
            ),
            (
                DeployRequest {
                    health_cmd: Some("  ".into()),
                    ..req()
                },
                "--health-cmd is empty",
            ),
            (
                DeployRequest {
                    health_http: Some("healthz".into()),
                    ..req()
                },
                "does not start with /",
            ),
            (
                DeployRequest {
                    health_http: Some("/a b".into()),
                    ..req()
                },
                "has a space",
            ),
            (
                DeployRequest {
                    health_http: Some("/x:99999".into()),
                    ..req()
                },
                "`99999` is not a port",
            ),
            (
                DeployRequest {
                    health_tcp: Some("0".into()),
                    ..req()
                },
                "--health-tcp: `0` is not a port",
            ),
            (
                DeployRequest {
                    health_tcp: Some("80".into()),
                    health_interval: Some("often".into()),
                    ..req()
                },
                "--health-interval `often` is not a duration",
            ),
            (
                DeployRequest {
                    health_tcp: Some("80".into()),
                    health_timeout: Some("1ms".into()),
                    ..req()
                },
                "--health-timeout `1ms` is out of range",
            ),
            (
                DeployRequest {
                    health_tcp: Some("80".into()),
                    health_start_period: Some("2h".into()),
                    ..req()
                },
                "--health-start-period `2h` is out of range",
            ),
            (
                DeployRequest {
                    health_tcp: Some("80".into()),
                    health_retries: Some(0),
                    ..req()
                },
                "--health-retries 0 is out of range",
            ),
            (
                DeployRequest {
                    health_interval: Some("5s".into()),
                    ..req()
                },
                "--health-interval without a health check",
            ),
        ];
        for (r, want) in cases {
            let e = parse_health(&r).unwrap_err();
            assert_eq!(e.code, ployz_api::ErrorCode::InvalidArgument);
            assert!(e.message.contains(want), "{} / {want}", e.message);
        }
    }

    #[test]
    fn http_status_lines() {
        assert_eq!(http_status("HTTP/1.1 200 OK"), Some(200));
        assert_eq!(http_status("HTTP/1.0 302 Found\r"), Some(302));
        assert_eq!(http_status("HTTP/2 404"), Some(404));
        assert_eq!(http_status("SSH-2.0-OpenSSH"), None);
        assert_eq!(http_status("HTTP/1.1 2000 x"), None);
        assert_eq!(http_status(""), None);
        assert!(http_passes(200) && http_passes(204) && http_passes(301) && http_passes(399));
        assert!(!http_passes(199) && !http_passes(404) && !http_passes(500));
    }
}
