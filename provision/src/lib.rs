//! Provisioning: how ployzd is laid out on a machine in each service mode,
//! the systemd unit that runs it, and installing it on other machines over
//! SSH.
//!
//! - [`ssh`]: the [`ssh::Transport`] seam (russh, and a recording fake),
//!   host keys trusted on first use ([`known_hosts`]).
//! - [`preflight`]: what a target must offer, checked before anything is
//!   touched; parsing is pure and tested with the fake.
//! - [`release`]: release locations (`file://`, `http(s)://`), checksums,
//!   [`release::pack_release`]; [`git`]: building a ref with cargo.
//! - [`provision`]: [`provision::provision_machine`] (init/add) and
//!   [`provision::update_machine`] (update with rollback).

pub mod git;
pub mod known_hosts;
pub mod preflight;
pub mod provision;
pub mod release;
pub mod ssh;

use serde::{Deserialize, Serialize};
use std::fmt;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::str::FromStr;

/// How ployzd runs: as a system service (root) or a user service.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum ServiceMode {
    #[default]
    System,
    User,
}

impl ServiceMode {
    pub fn as_str(self) -> &'static str {
        match self {
            ServiceMode::System => "system",
            ServiceMode::User => "user",
        }
    }
}

impl fmt::Display for ServiceMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("unknown service mode `{0}`: use `system` (root, systemd system unit) or `user` (systemd user unit with lingering)")]
pub struct UnknownServiceMode(pub String);

impl FromStr for ServiceMode {
    type Err = UnknownServiceMode;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "system" => Ok(ServiceMode::System),
            "user" => Ok(ServiceMode::User),
            other => Err(UnknownServiceMode(other.into())),
        }
    }
}

/// Where things live on a machine in a given mode.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Layout {
    pub data_dir: PathBuf,
    pub socket: PathBuf,
    pub binary: PathBuf,
    pub unit: PathBuf,
}

/// The environment a layout is derived from (passed in, so it is testable).
#[derive(Debug, Clone, Default)]
pub struct Env {
    pub home: Option<PathBuf>,
    pub xdg_runtime_dir: Option<PathBuf>,
    pub uid: u32,
}

impl Env {
    pub fn current() -> Env {
        Env {
            home: std::env::var_os("HOME").map(PathBuf::from),
            xdg_runtime_dir: std::env::var_os("XDG_RUNTIME_DIR").map(PathBuf::from),
            // SAFETY: getuid has no preconditions and cannot fail.
            uid: unsafe { libc::getuid() },
        }
    }
}

impl Layout {
    pub fn for_mode(mode: ServiceMode, env: &Env) -> Layout {
        match mode {
            ServiceMode::System => Layout {
                data_dir: "/var/lib/ployz".into(),
                socket: "/run/ployz/ployzd.sock".into(),
                binary: "/usr/local/bin/ployzd".into(),
                unit: "/etc/systemd/system/ployzd.service".into(),
            },
            ServiceMode::User => {
                let home = env.home.clone().unwrap_or_else(|| "/root".into());
                let runtime = env
                    .xdg_runtime_dir
                    .clone()
                    .unwrap_or_else(|| PathBuf::from(format!("/run/user/{}", env.uid)));
                Layout {
                    data_dir: home.join(".local/share/ployz"),
                    socket: runtime.join("ployz/ployzd.sock"),
                    binary: home.join(".local/bin/ployzd"),
                    unit: home.join(".config/systemd/user/ployzd.service"),
                }
            }
        }
    }

    /// `ployzctl`, installed next to `ployzd`.
    pub fn ctl_binary(&self) -> PathBuf {
        self.binary.with_file_name("ployzctl")
    }

    /// The default mode for the calling user: root runs the system service.
    pub fn default_for(env: &Env) -> Layout {
        let mode = if env.uid == 0 {
            ServiceMode::System
        } else {
            ServiceMode::User
        };
        Layout::for_mode(mode, env)
    }
}

/// The flags of `ployzd run` a unit carries besides the layout's paths.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DaemonArgs {
    /// Workload runtime: `host` or `docker`.
    pub runtime: String,
    /// The address peers reach this machine on (`--advertise-ip`).
    pub advertise_ip: Option<IpAddr>,
    /// `--region`; `None` keeps ployzd's default.
    pub region: Option<String>,
    /// Ports; only those differing from ployzd's defaults are written.
    pub ports: Ports,
}

impl DaemonArgs {
    pub fn new(runtime: &str) -> DaemonArgs {
        DaemonArgs {
            runtime: runtime.to_string(),
            advertise_ip: None,
            region: None,
            ports: Ports::default(),
        }
    }
}

/// The ports ployzd listens on (checked free by preflight).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ports {
    /// Peer channel (Raft, joins), TCP.
    pub peer: u16,
    /// NATS client port, TCP.
    pub nats: u16,
    /// WireGuard, UDP.
    pub wireguard: u16,
}

impl Ports {
    pub const DEFAULT: Ports = Ports {
        peer: 7101,
        nats: 4222,
        wireguard: 51820,
    };
}

impl Default for Ports {
    fn default() -> Self {
        Ports::DEFAULT
    }
}

/// The systemd unit for ployzd.
pub fn render_unit(mode: ServiceMode, layout: &Layout, runtime: &str) -> String {
    render_unit_with(mode, layout, &DaemonArgs::new(runtime))
}

/// The systemd unit for ployzd, with the runtime, advertised address,
/// region and non-default ports on its command line.
pub fn render_unit_with(mode: ServiceMode, layout: &Layout, args: &DaemonArgs) -> String {
    let wanted_by = match mode {
        ServiceMode::System => "multi-user.target",
        ServiceMode::User => "default.target",
    };
    let mut run = format!(
        "--runtime {} --service-mode {mode}",
        unit_word(&args.runtime)
    );
    if let Some(ip) = args.advertise_ip {
        run.push_str(&format!(" --advertise-ip {ip}"));
    }
    if let Some(region) = &args.region {
        run.push_str(&format!(" --region {}", unit_word(region)));
    }
    let d = Ports::DEFAULT;
    if args.ports.peer != d.peer {
        run.push_str(&format!(" --peer-port {}", args.ports.peer));
    }
    if args.ports.nats != d.nats {
        run.push_str(&format!(" --nats-port {}", args.ports.nats));
    }
    if args.ports.wireguard != d.wireguard {
        run.push_str(&format!(" --wg-port {}", args.ports.wireguard));
    }
    format!(
        "[Unit]\n\
         Description=Ployz machine daemon\n\
         Documentation=https://github.com/ployz/ployz\n\
         After=network-online.target\n\
         Wants=network-online.target\n\
         \n\
         [Service]\n\
         Type=simple\n\
         ExecStart={bin} --data-dir {data} --socket {sock} run {run}\n\
         Restart=on-failure\n\
         RestartSec=2\n\
         KillMode=mixed\n\
         LimitNOFILE=1048576\n\
         \n\
         [Install]\n\
         WantedBy={wanted_by}\n",
        bin = quote(&layout.binary),
        data = quote(&layout.data_dir),
        sock = quote(&layout.socket),
    )
}

fn unit_word(s: &str) -> String {
    quote(Path::new(s))
}

fn quote(p: &Path) -> String {
    let s = p.display().to_string();
    if s.chars().any(|c| c.is_whitespace() || c == '"') {
        format!("\"{}\"", s.replace('\\', "\\\\").replace('"', "\\\""))
    } else {
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn system_layout() {
        let l = Layout::for_mode(ServiceMode::System, &Env::default());
        assert_eq!(l.socket, PathBuf::from("/run/ployz/ployzd.sock"));
        assert_eq!(l.data_dir, PathBuf::from("/var/lib/ployz"));
    }

    #[test]
    fn user_layout() {
        let env = Env {
            home: Some("/home/ann".into()),
            xdg_runtime_dir: Some("/run/user/1000".into()),
            uid: 1000,
        };
        let l = Layout::default_for(&env);
        assert_eq!(l.socket, PathBuf::from("/run/user/1000/ployz/ployzd.sock"));
        assert_eq!(l.data_dir, PathBuf::from("/home/ann/.local/share/ployz"));
        assert_eq!(l.binary, PathBuf::from("/home/ann/.local/bin/ployzd"));
        assert_eq!(
            l.unit,
            PathBuf::from("/home/ann/.config/systemd/user/ployzd.service")
        );
    }

    #[test]
    fn unit_carries_runtime_and_paths() {
        let l = Layout::for_mode(ServiceMode::System, &Env::default());
        let u = render_unit(ServiceMode::System, &l, "docker");
        assert!(u.contains("ExecStart=/usr/local/bin/ployzd --data-dir /var/lib/ployz --socket /run/ployz/ployzd.sock run --runtime docker --service-mode system\n"));
        assert!(u.contains("WantedBy=multi-user.target"));
    }

    #[test]
    fn unit_carries_advertise_ip_region_and_non_default_ports() {
        let env = Env {
            home: Some("/home/ann".into()),
            xdg_runtime_dir: None,
            uid: 1000,
        };
        let l = Layout::for_mode(ServiceMode::User, &env);
        let mut args = DaemonArgs::new("host");
        args.advertise_ip = Some("10.0.1.20".parse().unwrap());
        args.region = Some("eu west".into());
        args.ports.nats = 4333;
        let u = render_unit_with(ServiceMode::User, &l, &args);
        assert!(
            u.contains("ExecStart=/home/ann/.local/bin/ployzd --data-dir /home/ann/.local/share/ployz --socket /run/user/1000/ployz/ployzd.sock run --runtime host --service-mode user --advertise-ip 10.0.1.20 --region \"eu west\" --nats-port 4333\n"),
            "{u}"
        );
        assert!(u.contains("WantedBy=default.target"));
        assert_eq!(
            l.ctl_binary(),
            PathBuf::from("/home/ann/.local/bin/ployzctl")
        );
    }

    #[test]
    fn modes_parse() {
        assert_eq!("user".parse::<ServiceMode>().unwrap(), ServiceMode::User);
        assert!("root"
            .parse::<ServiceMode>()
            .unwrap_err()
            .to_string()
            .contains("`root`"));
    }
}
