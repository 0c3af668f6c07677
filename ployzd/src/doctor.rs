//! `ployzctl status` (`doctor`): one pass over what this machine needs,
//! each check ok / warn / fail with a hint. Read-only: it asks the
//! subsystems, never changes them. Every check has its own deadline, so a
//! store without quorum or a silent peer makes a check fail, not the
//! command hang.

use crate::daemon::Daemon;
use crate::peer::{PeerRequest, PeerResponse};
use ployz_api::time::now_ms;
use ployz_api::*;
use std::path::Path;
use std::time::{Duration, Instant};

/// How long a store read or a peer may take before its check fails.
const CHECK_TIMEOUT: Duration = Duration::from_secs(3);
/// A WireGuard handshake is redone every 2 minutes while packets flow (and
/// keepalives make them flow): older than this, the peer is not answering.
const HANDSHAKE_STALE: Duration = Duration::from_secs(180);
/// Clock skew against another machine: warn above, fail above.
const SKEW_WARN_MS: i64 = 1_000;
const SKEW_FAIL_MS: i64 = 30_000;
/// Free space of the data directory: warn / fail below these.
const DISK_WARN_BYTES: u64 = 1 << 30;
const DISK_FAIL_BYTES: u64 = 256 << 20;
const DISK_WARN_PERCENT: f64 = 10.0;
const DISK_FAIL_PERCENT: f64 = 2.0;

impl Daemon {
    pub(crate) async fn doctor(&self) -> DoctorReport {
        let mut checks = Vec::new();
        let joined = self.store.local().get();
        match &joined {
            Some(f) => checks.push(Check::ok(
                "network",
                format!("member of network `{}` ({})", f.network_name, f.secret.network_id),
            )),
            None => checks.push(Check::fail(
                "network",
                "this machine is in no network",
                "found one with `ployzctl mesh init NAME`, or join one with `ployzctl machine invite import --token TOKEN` (the token from `ployzctl machine invite create` on a member)",
            )),
        }
        if let Some(file) = &joined {
            let store_ok = self.check_store(&mut checks).await;
            let machines: Vec<MachineRecord> = if store_ok {
                match tokio::time::timeout(CHECK_TIMEOUT, self.store.machines()).await {
                    Ok(Ok(ms)) => ms.into_iter().map(|m| m.value).collect(),
                    _ => file.machines.clone(),
                }
            } else {
                file.machines.clone()
            };
            let mesh = file.network.as_ref().map(|n| n.mesh).unwrap_or(true);
            if mesh {
                self.check_mesh(&machines, &mut checks);
            }
            self.check_nats(&mut checks).await;
            self.check_clocks(&machines, &mut checks).await;
        }
        checks.push(match self.workloads.runtime_check().await {
            Ok(m) => Check::ok("runtime", m),
            Err(e) => Check::fail(
                "runtime",
                e,
                "the host runtime needs root and cgroups; the docker runtime needs dockerd running (`systemctl start docker`)",
            ),
        });
        checks.push(disk_check(&self.data_dir));
        DoctorReport {
            machine_id: self.machine_id().to_string(),
            version: crate::VERSION.to_string(),
            checks,
        }
    }

    /// Quorum and leader: a linearizable read must answer in time.
    async fn check_store(&self, checks: &mut Vec<Check>) -> bool {
        let read = tokio::time::timeout(CHECK_TIMEOUT, self.store.network()).await;
        let status = self.cluster.status_within(Some(CHECK_TIMEOUT)).await.ok();
        let leader = status.as_ref().and_then(|s| s.store.leader.clone());
        let voters = status.as_ref().map(|s| s.store.voters.len()).unwrap_or(0);
        match read {
            Ok(Ok(_)) => {
                checks.push(Check::ok(
                    "store",
                    format!(
                        "answers; leader {}, {voters} storage machine(s)",
                        leader.as_deref().unwrap_or("(through a storage peer)")
                    ),
                ));
                true
            }
            Ok(Err(e)) => {
                checks.push(Check::fail(
                    "store",
                    format!("does not answer: {}", e.message),
                    "a majority of the storage machines (`ployzctl mesh status` lists them) must run and reach each other",
                ));
                false
            }
            Err(_) => {
                checks.push(Check::fail(
                    "store",
                    format!(
                        "no answer within {}s (no quorum?)",
                        CHECK_TIMEOUT.as_secs()
                    ),
                    "a majority of the storage machines (`ployzctl mesh status` lists them) must run and reach each other",
                ));
                false
            }
        }
    }

    /// One line per peer: its last WireGuard handshake.
    fn check_mesh(&self, machines: &[MachineRecord], checks: &mut Vec<Check>) {
        let Some(peers) = self.overlay.links(machines) else {
            checks.push(Check::fail(
                "mesh",
                "the WireGuard interface is not up",
                "see the ployzd log for why the mesh did not start (it needs CAP_NET_ADMIN and /dev/net/tun)",
            ));
            return;
        };
        if peers.is_empty() {
            checks.push(Check::ok("mesh", "up; no other machine yet"));
        }
        for link in peers {
            let (id, age, endpoint) = (link.id, link.handshake_age, link.endpoint);
            let what = format!("mesh {id}");
            let to = endpoint
                .map(|e| e.to_string())
                .unwrap_or_else(|| "(no endpoint known)".into());
            checks.push(match age {
                Some(a) if a <= HANDSHAKE_STALE => {
                    Check::ok(what, format!("handshake {}s ago ({to})", a.as_secs()))
                }
                Some(a) => Check::warn(
                    what,
                    format!("last handshake {}s ago ({to})", a.as_secs()),
                    format!("is ployzd running on {id}, and is UDP to {to} open?"),
                ),
                None => Check::warn(
                    what,
                    format!("no handshake yet ({to})"),
                    format!("is ployzd running on {id}, and is UDP to {to} open?"),
                ),
            });
        }
    }

    /// The NATS server answers a client on loopback with its INFO line.
    async fn check_nats(&self, checks: &mut Vec<Check>) {
        let Some(port) = self.control.port() else {
            checks.push(Check::fail(
                "nats",
                "the NATS server is not started",
                "it starts once this machine is in a network and the mesh is up; see the ployzd log",
            ));
            return;
        };
        let probe = async {
            use tokio::io::AsyncReadExt;
            let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
            let mut buf = [0u8; 5];
            s.read_exact(&mut buf).await?;
            Ok::<_, std::io::Error>(buf)
        };
        checks.push(match tokio::time::timeout(CHECK_TIMEOUT, probe).await {
            Ok(Ok(b)) if &b == b"INFO " => {
                Check::ok("nats", format!("serving clients on port {port}"))
            }
            Ok(Ok(_)) => Check::fail(
                "nats",
                format!("port {port} answers, but not as a NATS server"),
                "another program may hold the port: pass ployzd a free --nats-port",
            ),
            Ok(Err(e)) => Check::fail(
                "nats",
                format!("127.0.0.1:{port}: {e}"),
                "see the ployzd log for why the NATS server stopped",
            ),
            Err(_) => Check::fail(
                "nats",
                format!(
                    "127.0.0.1:{port} sent nothing within {}s",
                    CHECK_TIMEOUT.as_secs()
                ),
                "see the ployzd log",
            ),
        });
    }

    /// Every other machine's wall clock against ours, with half the round
    /// trip as the correction.
    async fn check_clocks(&self, machines: &[MachineRecord], checks: &mut Vec<Check>) {
        let others: Vec<&MachineRecord> = machines
            .iter()
            .filter(|m| m.id != self.machine_id())
            .collect();
        let mut asks = tokio::task::JoinSet::new();
        for m in others {
            let control = self.control.clone();
            let id = m.id.clone();
            asks.spawn(async move {
                let sent = Instant::now();
                let at = now_ms() as i64;
                let answer = control
                    .call_machine(&id, &PeerRequest::Ping, CHECK_TIMEOUT)
                    .await;
                let rtt = sent.elapsed().as_millis() as i64;
                (id, answer.map(|a| (a, at + rtt / 2, rtt)))
            });
        }
        let mut answers = Vec::new();
        while let Some(done) = asks.join_next().await {
            if let Ok(a) = done {
                answers.push(a);
            }
        }
        answers.sort_by(|a, b| a.0.cmp(&b.0));
        for (id, answer) in answers {
            let what = format!("clock {id}");
            checks.push(match answer {
                Ok((
                    PeerResponse::Pong {
                        time_ms: Some(t), ..
                    },
                    mid,
                    rtt,
                )) => skew_check(what, &id, t as i64 - mid, rtt),
                Ok((PeerResponse::Pong { time_ms: None, .. }, _, _)) => Check::warn(
                    what,
                    "its ployzd does not report its clock (an older version)",
                    format!("update it: `ployzctl machine update {id}`"),
                ),
                Ok((other, _, _)) => Check::warn(
                    what,
                    format!("unexpected answer {other:?}"),
                    "see that machine's ployzd log",
                ),
                Err(e) => Check::warn(
                    what,
                    format!("did not answer: {e}"),
                    format!("is {id} running and reachable (`ployzctl machine rtt`)?"),
                ),
            });
        }
    }
}

/// A peer's clock `skew_ms` ahead of ours (negative: behind).
fn skew_check(what: String, id: &str, skew_ms: i64, rtt_ms: i64) -> Check {
    let msg = format!(
        "{skew_ms:+} ms against this machine (±{} ms)",
        rtt_ms / 2 + 1
    );
    let hint = format!(
        "run NTP on both machines (`timedatectl set-ntp true`); {id}'s clock and this one's differ"
    );
    if skew_ms.abs() > SKEW_FAIL_MS {
        Check::fail(what, msg, hint)
    } else if skew_ms.abs() > SKEW_WARN_MS {
        Check::warn(what, msg, hint)
    } else {
        Check::ok(what, msg)
    }
}

/// Free space of the file system holding `dir`.
fn disk_check(dir: &Path) -> Check {
    let stat = match nix_statvfs(dir) {
        Ok(s) => s,
        Err(e) => {
            return Check::fail(
                "disk",
                format!("cannot stat {}: {e}", dir.display()),
                "check that the data directory exists and is readable by root",
            )
        }
    };
    let (free, total) = stat;
    let percent = if total == 0 {
        0.0
    } else {
        free as f64 * 100.0 / total as f64
    };
    let msg = format!(
        "{} free of {} ({percent:.0}%) in {}",
        human_bytes(free),
        human_bytes(total),
        dir.display()
    );
    let hint = format!(
        "free space on the file system of {} (old images: `ployzctl service rm` what no longer runs)",
        dir.display()
    );
    if free < DISK_FAIL_BYTES || percent < DISK_FAIL_PERCENT {
        Check::fail("disk", msg, hint)
    } else if free < DISK_WARN_BYTES || percent < DISK_WARN_PERCENT {
        Check::warn("disk", msg, hint)
    } else {
        Check::ok("disk", msg)
    }
}

/// (available bytes, total bytes) of the file system holding `dir`.
fn nix_statvfs(dir: &Path) -> std::io::Result<(u64, u64)> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(dir.as_os_str().as_bytes())
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
    // SAFETY: statvfs(3) fills the zeroed struct we own from a valid C string.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statvfs(c.as_ptr(), &mut st) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    let frag = st.f_frsize as u64;
    Ok((st.f_bavail as u64 * frag, st.f_blocks as u64 * frag))
}

fn human_bytes(b: u64) -> String {
    const GIB: f64 = (1u64 << 30) as f64;
    const MIB: f64 = (1u64 << 20) as f64;
    if b as f64 >= GIB {
        format!("{:.1} GiB", b as f64 / GIB)
    } else {
        format!("{:.0} MiB", b as f64 / MIB)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn skew_thresholds() {
        let s = |ms| skew_check("clock x".into(), "x", ms, 2).status;
        assert_eq!(s(0), CheckStatus::Ok);
        assert_eq!(s(-900), CheckStatus::Ok);
        assert_eq!(s(1_500), CheckStatus::Warn);
        assert_eq!(s(-45_000), CheckStatus::Fail);
        let c = skew_check("clock x".into(), "x", 2_000, 4);
        assert!(c.message.contains("+2000 ms"), "{}", c.message);
        assert!(c.hint.unwrap().contains("NTP"));
    }

    #[test]
    fn disk_of_a_real_directory() {
        let d = tempfile::tempdir().unwrap();
        let c = disk_check(d.path());
        assert!(c.message.contains("free of"), "{}", c.message);
        let missing = disk_check(Path::new("/nonexistent/ployz"));
        assert_eq!(missing.status, CheckStatus::Fail);
        assert!(missing.message.contains("cannot stat"));
    }
}
