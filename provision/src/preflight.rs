//! What a target must offer before we touch it, checked with one read-only
//! probe script. [`parse_probe`] and [`evaluate`] are pure; [`preflight`]
//! runs the probe over a [`Transport`].

use crate::ssh::{SshError, Transport};
use crate::{Ports, ServiceMode};
use std::collections::BTreeMap;
use std::path::PathBuf;

/// Why we are checking: a fresh install wants free ports and no ployzd; an
/// update wants ployzd installed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Purpose {
    Install,
    Update,
}

/// What preflight checks against.
#[derive(Debug, Clone)]
pub struct Request {
    /// The target as the user wrote it (for messages).
    pub target: String,
    pub mode: ServiceMode,
    /// `host` or `docker`.
    pub runtime: String,
    pub ports: Ports,
    pub purpose: Purpose,
}

/// CPU architectures we ship.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Arch {
    X86_64,
    Aarch64,
}

impl Arch {
    pub fn from_uname(m: &str) -> Option<Arch> {
        match m.trim() {
            "x86_64" | "amd64" => Some(Arch::X86_64),
            "aarch64" | "arm64" | "armv8l" => Some(Arch::Aarch64),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Arch::X86_64 => "x86_64",
            Arch::Aarch64 => "aarch64",
        }
    }

    /// The architecture of the machine running this code.
    pub fn local() -> Option<Arch> {
        Arch::from_uname(std::env::consts::ARCH)
    }
}

/// How privileged commands run on the target.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Privilege {
    Root,
    /// `sudo -n` works (passwordless).
    Sudo,
    None,
}

/// What we learned about a target that passed preflight.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostFacts {
    pub arch: Arch,
    /// `PRETTY_NAME` from /etc/os-release.
    pub os: String,
    pub user: String,
    pub uid: u32,
    pub home: PathBuf,
    pub privilege: Privilege,
    /// The C library is glibc (so `-gnu` builds run, besides static `-musl`).
    pub glibc: bool,
    /// `systemctl is-system-running` (system) or `--user` (user mode).
    pub systemd_state: String,
    /// User mode: lingering is already on.
    pub linger: bool,
    /// A `ployzd` unit is present.
    pub installed: bool,
}

impl HostFacts {
    /// Release target triples that run here, best first: static musl, then
    /// glibc builds on glibc hosts.
    pub fn triples(&self) -> Vec<String> {
        let mut t = vec![format!("{}-unknown-linux-musl", self.arch.as_str())];
        if self.glibc {
            t.push(format!("{}-unknown-linux-gnu", self.arch.as_str()));
        }
        t
    }

    /// Whether privileged commands need the `sudo -n` prefix.
    pub fn sudo(&self) -> bool {
        self.privilege == Privilege::Sudo
    }
}

/// A failed check: each names the target, what is wrong, and the fix.
#[derive(Debug, thiserror::Error)]
pub enum PreflightError {
    #[error("{target}: preflight: the probe could not run (exit {status}): {stderr}; the target needs a POSIX `sh` for the login user")]
    ProbeFailed {
        target: String,
        status: u32,
        stderr: String,
    },
    #[error("{target}: preflight: the OS is `{os}`, not Linux; ployzd runs on Linux only")]
    NotLinux { target: String, os: String },
    #[error("{target}: preflight: the CPU architecture `{arch}` is not supported; ployzd is built for x86_64 and aarch64")]
    UnsupportedArch { target: String, arch: String },
    #[error("{target}: preflight: `{user}` is not root and has no passwordless sudo, needed to {why}; log in as root (root@host) or add `{user} ALL=(ALL) NOPASSWD:ALL` to /etc/sudoers.d/ployz on the target")]
    NoPrivilege {
        target: String,
        user: String,
        why: &'static str,
    },
    #[error("{target}: preflight: systemd is not running as the init system (state `{state}`); ployzd runs as a systemd service: use a host booted with systemd")]
    NoSystemd { target: String, state: String },
    #[error("{target}: preflight: systemd is `{state}`; wait until `systemctl is-system-running` says running or degraded, then retry")]
    SystemdBusy { target: String, state: String },
    #[error("{target}: preflight: the systemd user manager of `{user}` is not running (state `{state}`) and cannot start: install pam_systemd (Debian/Ubuntu: `apt-get install libpam-systemd`), run `loginctl enable-linger {user}` as root, then retry — or use `--service-mode system`")]
    NoUserManager {
        target: String,
        user: String,
        state: String,
    },
    #[error("{target}: preflight: /dev/net/tun is missing; the WireGuard mesh needs it: `modprobe tun` (in a container: `--device /dev/net/tun`)")]
    NoTun { target: String },
    #[error("{target}: preflight: runtime `docker` was chosen but there is no docker daemon socket (/var/run/docker.sock); install and start Docker, or use `--runtime host`")]
    NoDocker { target: String },
    #[error("{target}: preflight: port {port}/{proto} ({purpose}) is already in use; stop what listens there (`ss -lntup` shows it) or free the port, then retry")]
    PortInUse {
        target: String,
        port: u16,
        proto: &'static str,
        purpose: &'static str,
    },
    #[error("{target}: preflight: ployzd is already installed here (unit {state}); use `ployzctl machine update` to upgrade it, or remove it first (`ployzctl machine rm`) to provision from scratch")]
    AlreadyInstalled { target: String, state: String },
    #[error("{target}: preflight: ployzd is not installed here ({binary} is missing); provision it with `ployzctl machine add` first")]
    NotInstalled { target: String, binary: String },
    #[error("{target}: preflight: {source}")]
    Transport { target: String, source: SshError },
}

/// The probe: read-only, one round trip, sections marked `@@name`.
pub const PROBE: &str = r##"export LC_ALL=C
echo @@uname; uname -s; uname -m
echo @@os-release; cat /etc/os-release 2>/dev/null
echo @@id; id -u; id -un; echo "$HOME"
echo @@sudo; if [ "$(id -u)" = 0 ]; then echo root; elif command -v sudo >/dev/null 2>&1 && sudo -n true >/dev/null 2>&1; then echo sudo; else echo none; fi
echo @@systemd; if [ -d /run/systemd/system ]; then echo booted; else echo not-booted; fi; systemctl is-system-running 2>/dev/null
echo @@user-systemd; XDG_RUNTIME_DIR="/run/user/$(id -u)" systemctl --user is-system-running 2>/dev/null
echo @@pam-systemd; find /lib /usr/lib /lib64 -maxdepth 3 -name pam_systemd.so 2>/dev/null | head -n 1
echo @@linger; if [ -e "/var/lib/systemd/linger/$(id -un)" ]; then echo yes; else echo no; fi
echo @@tun; if [ -c /dev/net/tun ]; then echo yes; else echo no; fi
echo @@docker; if [ -S /var/run/docker.sock ]; then echo yes; else echo no; fi
echo @@libc; getconf GNU_LIBC_VERSION 2>/dev/null
echo @@unit; for u in /etc/systemd/system/ployzd.service "$HOME/.config/systemd/user/ployzd.service"; do [ -e "$u" ] && echo "$u"; done; systemctl is-active ployzd 2>/dev/null
echo @@listen; if command -v ss >/dev/null 2>&1; then ss -Hlntu; else echo '!proc'; for f in tcp tcp6 udp udp6; do echo "#$f"; cat /proc/net/$f 2>/dev/null; done; fi
echo @@end
"##;

/// The probe's output, by section.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Probe {
    sections: BTreeMap<String, Vec<String>>,
}

impl Probe {
    fn lines(&self, s: &str) -> &[String] {
        self.sections.get(s).map(Vec::as_slice).unwrap_or(&[])
    }

    fn line(&self, s: &str, i: usize) -> &str {
        self.lines(s).get(i).map(String::as_str).unwrap_or("")
    }

    /// Whether the probe ran to its end (no truncated output).
    pub fn complete(&self) -> bool {
        self.sections.contains_key("end")
    }
}

/// Split the probe's stdout into sections.
pub fn parse_probe(stdout: &str) -> Probe {
    let mut p = Probe::default();
    let mut current: Option<String> = None;
    for line in stdout.lines() {
        if let Some(name) = line.strip_prefix("@@") {
            let name = name.trim().to_string();
            p.sections.entry(name.clone()).or_default();
            current = Some(name);
        } else if let Some(c) = &current {
            p.sections
                .entry(c.clone())
                .or_default()
                .push(line.to_string());
        }
    }
    p
}

/// `KEY=value` from os-release text, unquoted.
pub fn os_release_field(lines: &[String], key: &str) -> Option<String> {
    lines.iter().find_map(|l| {
        let v = l.strip_prefix(key)?.strip_prefix('=')?;
        Some(v.trim().trim_matches('"').trim_matches('\'').to_string())
    })
}

/// A listening socket found on the target.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Listener {
    pub proto: &'static str,
    pub port: u16,
}

/// Listening TCP and bound UDP ports from `ss -Hlntu` output, or from
/// /proc/net/{tcp,tcp6,udp,udp6} when the probe fell back to them.
pub fn parse_listeners(lines: &[String]) -> Vec<Listener> {
    let mut out = Vec::new();
    if lines.first().map(|l| l.trim()) == Some("!proc") {
        let mut proto = "";
        for l in &lines[1..] {
            let l = l.trim();
            if let Some(f) = l.strip_prefix('#') {
                proto = if f.starts_with("tcp") { "tcp" } else { "udp" };
                continue;
            }
            let cols: Vec<&str> = l.split_whitespace().collect();
            // sl local_address rem_address st ...
            if cols.len() < 4 || !cols[0].ends_with(':') {
                continue;
            }
            // TCP: only LISTEN (0A); UDP: any bound socket (07 = unconnected).
            if proto == "tcp" && cols[3] != "0A" {
                continue;
            }
            if let Some(port) = cols[1]
                .rsplit_once(':')
                .and_then(|(_, p)| u16::from_str_radix(p, 16).ok())
            {
                out.push(Listener { proto, port });
            }
        }
        return out;
    }
    for l in lines {
        let cols: Vec<&str> = l.split_whitespace().collect();
        // Netid State Recv-Q Send-Q Local:Port Peer:Port [Process]
        if cols.len() < 5 {
            continue;
        }
        let proto = match cols[0] {
            "tcp" => "tcp",
            "udp" => "udp",
            _ => continue,
        };
        if let Some(port) = cols[4]
            .rsplit_once(':')
            .and_then(|(_, p)| p.parse::<u16>().ok())
        {
            out.push(Listener { proto, port });
        }
    }
    out
}

/// Check a probe against a request. Pure.
pub fn evaluate(p: &Probe, req: &Request) -> Result<HostFacts, PreflightError> {
    let target = || req.target.clone();
    let os = p.line("uname", 0).trim().to_string();
    if os != "Linux" {
        return Err(PreflightError::NotLinux {
            target: target(),
            os: if os.is_empty() { "unknown".into() } else { os },
        });
    }
    let machine = p.line("uname", 1).trim();
    let arch = Arch::from_uname(machine).ok_or_else(|| PreflightError::UnsupportedArch {
        target: target(),
        arch: machine.to_string(),
    })?;
    let os_lines = p.lines("os-release");
    let pretty = os_release_field(os_lines, "PRETTY_NAME")
        .or_else(|| os_release_field(os_lines, "ID"))
        .unwrap_or_else(|| "unknown Linux".into());
    let uid: u32 = p.line("id", 0).trim().parse().unwrap_or(u32::MAX);
    let user = p.line("id", 1).trim().to_string();
    let home = PathBuf::from(p.line("id", 2).trim());
    let privilege = match p.line("sudo", 0).trim() {
        "root" => Privilege::Root,
        "sudo" => Privilege::Sudo,
        _ if uid == 0 => Privilege::Root,
        _ => Privilege::None,
    };
    let linger = p.line("linger", 0).trim() == "yes";

    // Init system.
    let booted = p.line("systemd", 0).trim() == "booted";
    let sys_state = p.line("systemd", 1).trim().to_string();
    let systemd_state = match req.mode {
        ServiceMode::System => {
            if req.purpose == Purpose::Install && privilege == Privilege::None {
                return Err(PreflightError::NoPrivilege {
                    target: target(),
                    user,
                    why: "install /usr/local/bin/ployzd and a system unit",
                });
            }
            check_system_state(booted, &sys_state, target)?;
            sys_state
        }
        ServiceMode::User => {
            // The user manager runs under the system one.
            check_system_state(booted, &sys_state, target)?;
            if !linger && privilege == Privilege::None {
                return Err(PreflightError::NoPrivilege {
                    target: target(),
                    user,
                    why:
                        "enable lingering (`loginctl enable-linger`) so ployzd runs without a login",
                });
            }
            let user_state = p.line("user-systemd", 0).trim().to_string();
            // Without lingering the user manager may legitimately be absent
            // until we enable it; with lingering on it must answer. It can
            // only start with pam_systemd (Debian: libpam-systemd).
            let pam = !p.line("pam-systemd", 0).trim().is_empty();
            if !usable_state(&user_state) && (linger || !pam) {
                return Err(PreflightError::NoUserManager {
                    target: target(),
                    user,
                    state: if user_state.is_empty() {
                        "not running".into()
                    } else {
                        user_state
                    },
                });
            }
            user_state
        }
    };

    if p.line("tun", 0).trim() != "yes" {
        return Err(PreflightError::NoTun { target: target() });
    }
    if req.runtime == "docker" && p.line("docker", 0).trim() != "yes" {
        return Err(PreflightError::NoDocker { target: target() });
    }

    let unit_files = p
        .lines("unit")
        .iter()
        .filter(|l| l.starts_with('/'))
        .count();
    let unit_state = p
        .lines("unit")
        .iter()
        .rfind(|l| !l.starts_with('/'))
        .map(|s| s.trim().to_string())
        .unwrap_or_default();
    let running = matches!(unit_state.as_str(), "active" | "activating" | "reloading");
    let installed = unit_files > 0 || running;
    match req.purpose {
        Purpose::Install => {
            if installed {
                return Err(PreflightError::AlreadyInstalled {
                    target: target(),
                    state: if running {
                        unit_state
                    } else {
                        "present, not running".into()
                    },
                });
            }
            let listening = parse_listeners(p.lines("listen"));
            let wanted: [(u16, &'static str, &'static str); 3] = [
                (req.ports.peer, "tcp", "ployzd peer channel"),
                (req.ports.nats, "tcp", "NATS control plane"),
                (req.ports.wireguard, "udp", "WireGuard"),
            ];
            for (port, proto, purpose) in wanted {
                if port != 0 && listening.iter().any(|l| l.port == port && l.proto == proto) {
                    return Err(PreflightError::PortInUse {
                        target: target(),
                        port,
                        proto,
                        purpose,
                    });
                }
            }
        }
        Purpose::Update => {
            if !installed {
                return Err(PreflightError::NotInstalled {
                    target: target(),
                    binary: "the ployzd unit".into(),
                });
            }
        }
    }

    Ok(HostFacts {
        arch,
        os: pretty,
        user,
        uid,
        home,
        privilege,
        glibc: p.line("libc", 0).trim().starts_with("glibc"),
        systemd_state,
        linger,
        installed,
    })
}

/// `running` and `degraded` work; `starting`/`initializing` work too
/// (units can be enabled and started while boot finishes).
fn usable_state(s: &str) -> bool {
    matches!(s, "running" | "degraded" | "starting" | "initializing")
}

fn check_system_state(
    booted: bool,
    state: &str,
    target: impl Fn() -> String,
) -> Result<(), PreflightError> {
    if !booted || matches!(state, "" | "offline" | "unknown") {
        return Err(PreflightError::NoSystemd {
            target: target(),
            state: if state.is_empty() {
                "no systemd".into()
            } else {
                state.to_string()
            },
        });
    }
    if !usable_state(state) {
        return Err(PreflightError::SystemdBusy {
            target: target(),
            state: state.to_string(),
        });
    }
    Ok(())
}

/// Run the probe on `t` and evaluate it.
pub async fn preflight<T: Transport>(t: &T, req: &Request) -> Result<HostFacts, PreflightError> {
    let out = t
        .exec(&format!("sh -c {}", crate::ssh::sh_quote(PROBE)))
        .await
        .map_err(|source| PreflightError::Transport {
            target: req.target.clone(),
            source,
        })?;
    let probe = parse_probe(&out.stdout_str());
    if !probe.complete() {
        return Err(PreflightError::ProbeFailed {
            target: req.target.clone(),
            status: out.status,
            stderr: out.stderr_str().trim().to_string(),
        });
    }
    evaluate(&probe, req)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::ssh::fake::FakeTransport;
    use crate::ssh::ExecOutput;

    /// Probe output of a fresh Debian 12 container logged in as root.
    pub(crate) const DEBIAN_ROOT: &str = "@@uname\nLinux\nx86_64\n@@os-release\nPRETTY_NAME=\"Debian GNU/Linux 12 (bookworm)\"\nNAME=\"Debian GNU/Linux\"\nID=debian\n@@id\n0\nroot\n/root\n@@sudo\nroot\n@@systemd\nbooted\nrunning\n@@user-systemd\n@@pam-systemd\n@@linger\nno\n@@tun\nyes\n@@docker\nno\n@@libc\nglibc 2.36\n@@unit\ninactive\n@@listen\ntcp   LISTEN 0      128          0.0.0.0:22        0.0.0.0:*\ntcp   LISTEN 0      128             [::]:22           [::]:*\n@@end\n";

    pub(crate) fn req(mode: ServiceMode) -> Request {
        Request {
            target: "root@10.0.1.20".into(),
            mode,
            runtime: "host".into(),
            ports: Ports::default(),
            purpose: Purpose::Install,
        }
    }

    fn with(section: &str, body: &str) -> String {
        let start = DEBIAN_ROOT.find(&format!("@@{section}\n")).unwrap();
        let rest = &DEBIAN_ROOT[start + section.len() + 3..];
        let end = rest.find("@@").unwrap();
        format!(
            "{}@@{section}\n{body}{}",
            &DEBIAN_ROOT[..start],
            &rest[end..]
        )
    }

    #[test]
    fn fresh_debian_as_root_passes() {
        let f = evaluate(&parse_probe(DEBIAN_ROOT), &req(ServiceMode::System)).unwrap();
        assert_eq!(f.arch, Arch::X86_64);
        assert_eq!(f.os, "Debian GNU/Linux 12 (bookworm)");
        assert_eq!(f.privilege, Privilege::Root);
        assert_eq!(f.home, PathBuf::from("/root"));
        assert!(f.glibc && !f.installed);
        assert_eq!(
            f.triples(),
            ["x86_64-unknown-linux-musl", "x86_64-unknown-linux-gnu"]
        );
    }

    #[test]
    fn each_failure_names_target_and_fix() {
        let r = req(ServiceMode::System);
        let cases: Vec<(String, &str)> = vec![
            (with("uname", "Darwin\narm64\n"), "not Linux"),
            (
                with("uname", "Linux\nriscv64\n"),
                "`riscv64` is not supported",
            ),
            (
                with("id", "1000\nann\n/home/ann\n").replace("@@sudo\nroot", "@@sudo\nnone"),
                "NOPASSWD",
            ),
            (
                with("systemd", "not-booted\noffline\n"),
                "use a host booted with systemd",
            ),
            (with("systemd", "booted\nmaintenance\n"), "wait until"),
            (with("tun", "no\n"), "modprobe tun"),
            (
                with("unit", "/etc/systemd/system/ployzd.service\nactive\n"),
                "machine update",
            ),
            (
                with("listen", "udp UNCONN 0 0 0.0.0.0:51820 0.0.0.0:*\n"),
                "51820/udp (WireGuard)",
            ),
            (
                with("listen", "tcp LISTEN 0 4096 127.0.0.1:4222 0.0.0.0:*\n"),
                "4222/tcp (NATS",
            ),
        ];
        for (probe, want) in cases {
            let e = evaluate(&parse_probe(&probe), &r).unwrap_err().to_string();
            assert!(e.starts_with("root@10.0.1.20: preflight: "), "{e}");
            assert!(e.contains(want), "`{want}` not in: {e}");
        }
        // A UDP socket on the peer port does not block the TCP peer port.
        let ok = with("listen", "udp UNCONN 0 0 0.0.0.0:7101 0.0.0.0:*\n");
        evaluate(&parse_probe(&ok), &r).unwrap();
    }

    #[test]
    fn sudo_user_passes_and_is_marked() {
        let probe = with("id", "1000\nann\n/home/ann\n").replace("@@sudo\nroot", "@@sudo\nsudo");
        let f = evaluate(&parse_probe(&probe), &req(ServiceMode::System)).unwrap();
        assert!(f.sudo());
        assert_eq!(f.user, "ann");
    }

    #[test]
    fn user_mode_needs_linger_or_privilege() {
        let base = with("id", "1000\nann\n/home/ann\n").replace("@@sudo\nroot", "@@sudo\nnone");
        let e = evaluate(&parse_probe(&base), &req(ServiceMode::User))
            .unwrap_err()
            .to_string();
        assert!(e.contains("enable-linger"), "{e}");
        let lingering = base
            .replace("@@linger\nno", "@@linger\nyes")
            .replace("@@user-systemd\n", "@@user-systemd\nrunning\n");
        let f = evaluate(&parse_probe(&lingering), &req(ServiceMode::User)).unwrap();
        assert_eq!(f.systemd_state, "running");
        // Not lingering yet, sudo to enable it, pam_systemd present: fine.
        let sudo = base.replace("@@sudo\nnone", "@@sudo\nsudo");
        let with_pam = sudo.replace(
            "@@pam-systemd\n",
            "@@pam-systemd\n/usr/lib/x86_64-linux-gnu/security/pam_systemd.so\n",
        );
        evaluate(&parse_probe(&with_pam), &req(ServiceMode::User)).unwrap();
        // Without pam_systemd the user manager can never start (a minimal
        // Debian): refused before anything is installed.
        let e = evaluate(&parse_probe(&sudo), &req(ServiceMode::User))
            .unwrap_err()
            .to_string();
        assert!(e.contains("libpam-systemd"), "{e}");
        let dead = base.replace("@@linger\nno", "@@linger\nyes");
        let e = evaluate(&parse_probe(&dead), &req(ServiceMode::User))
            .unwrap_err()
            .to_string();
        assert!(e.contains("user manager of `ann`"), "{e}");
    }

    #[test]
    fn docker_runtime_needs_docker() {
        let mut r = req(ServiceMode::System);
        r.runtime = "docker".into();
        let e = evaluate(&parse_probe(DEBIAN_ROOT), &r).unwrap_err();
        assert!(matches!(e, PreflightError::NoDocker { .. }));
        let ok = with("docker", "yes\n");
        evaluate(&parse_probe(&ok), &r).unwrap();
    }

    #[test]
    fn update_wants_no_free_ports() {
        let mut r = req(ServiceMode::System);
        r.purpose = Purpose::Update;
        let probe = with(
            "listen",
            "tcp LISTEN 0 4096 0.0.0.0:7101 0.0.0.0:*\nudp UNCONN 0 0 0.0.0.0:51820 0.0.0.0:*\n",
        )
        .replace(
            "@@unit\ninactive",
            "@@unit\n/etc/systemd/system/ployzd.service\nactive",
        );
        let f = evaluate(&parse_probe(&probe), &r).unwrap();
        assert!(f.installed);
    }

    #[test]
    fn proc_net_fallback() {
        let lines: Vec<String> = [
            "!proc",
            "#tcp",
            "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode",
            "   0: 00000000:1BBD 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 1",
            "   1: 0100007F:1F90 0100007F:D2F0 01 00000000:00000000 00:00000000 00000000     0        0 2",
            "#udp6",
            "  sl  local_address                         remote_address                        st tx_queue",
            "   0: 00000000000000000000000000000000:CA6C 00000000000000000000000000000000:0000 07 0",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let l = parse_listeners(&lines);
        assert_eq!(
            l,
            vec![
                Listener {
                    proto: "tcp",
                    port: 7101
                },
                Listener {
                    proto: "udp",
                    port: 51820
                },
            ]
        );
    }

    #[tokio::test]
    async fn probe_runs_once_and_read_only() {
        let t = FakeTransport::new().on("@@uname", ExecOutput::ok(DEBIAN_ROOT));
        preflight(&t, &req(ServiceMode::System)).await.unwrap();
        let cmds = t.commands();
        assert_eq!(cmds.len(), 1);
        assert!(cmds[0].starts_with("sh -c '"));
        for w in ["rm ", "mv ", "> /", "systemctl enable", "systemctl start"] {
            assert!(!cmds[0].contains(w), "probe must not change anything: {w}");
        }
    }

    #[tokio::test]
    async fn truncated_probe_is_an_error() {
        let t = FakeTransport::new().on("@@uname", ExecOutput::failed(127, "sh: not found"));
        let e = preflight(&t, &req(ServiceMode::System)).await.unwrap_err();
        assert!(
            matches!(e, PreflightError::ProbeFailed { status: 127, .. }),
            "{e}"
        );
    }
}
