//! Provisioning: how ployzd is laid out on a machine in each service mode,
//! and the systemd unit that runs it.

use serde::{Deserialize, Serialize};
use std::fmt;
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

/// The systemd unit for ployzd.
pub fn render_unit(mode: ServiceMode, layout: &Layout, runtime: &str) -> String {
    let wanted_by = match mode {
        ServiceMode::System => "multi-user.target",
        ServiceMode::User => "default.target",
    };
    format!(
        "[Unit]\n\
         Description=Ployz machine daemon\n\
         Documentation=https://github.com/ployz/ployz\n\
         After=network-online.target\n\
         Wants=network-online.target\n\
         \n\
         [Service]\n\
         Type=simple\n\
         ExecStart={bin} --data-dir {data} --socket {sock} run --runtime {runtime} --service-mode {mode}\n\
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
    fn modes_parse() {
        assert_eq!("user".parse::<ServiceMode>().unwrap(), ServiceMode::User);
        assert!("root"
            .parse::<ServiceMode>()
            .unwrap_err()
            .to_string()
            .contains("`root`"));
    }
}
