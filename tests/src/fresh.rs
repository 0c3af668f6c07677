//! Fresh machines for provisioning tests: Debian bookworm containers booted
//! with systemd as PID 1, sshd running, no Ployz (testbed.md, "Kind 2").
//!
//! [`image`] builds the `ployz-fresh-host` image once per test process with
//! `scripts/fresh-host-image` (debootstrap, cached under /var/cache/ployz;
//! it installs docker.io and starts dockerd if needed) and returns the test
//! SSH key authorised for `root` and for the sudo user `ployz`.
//! [`FreshHost::start`] runs one container and waits for sshd; dropping it
//! removes the container, also when the test panics. The founder of a test
//! network is a ployzd in the root namespace advertising an address the
//! containers reach, the docker bridge gateway
//! ([`crate::Machine::start_advertising`]).
//!
//! Needs root. Never changes the firewall's global policy.

use std::io::Read as _;
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// The image every fresh host boots.
pub const IMAGE: &str = "ployz-fresh-host";

/// The test key (private half) and the image, built once per process.
pub fn image() -> PathBuf {
    static KEY: OnceLock<PathBuf> = OnceLock::new();
    KEY.get_or_init(|| {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/fresh-host-image");
        let out = Command::new(&script)
            .stdin(Stdio::null())
            .output()
            .unwrap_or_else(|e| panic!("cannot run {}: {e}", script.display()));
        assert!(
            out.status.success(),
            "{} failed ({}):\n{}{}",
            script.display(),
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let key = String::from_utf8_lossy(&out.stdout)
            .lines()
            .last()
            .unwrap_or_default()
            .trim()
            .to_string();
        let key = PathBuf::from(key);
        assert!(key.exists(), "the script did not print the key path");
        key
    })
    .clone()
}

fn docker(args: &[&str]) -> Output {
    Command::new("docker")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("run docker")
}

fn docker_ok(args: &[&str]) -> String {
    let out = docker(args);
    assert!(
        out.status.success(),
        "docker {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// A running fresh container.
pub struct FreshHost {
    pub name: String,
    pub ip: IpAddr,
    /// The docker bridge gateway: the host's address as the container sees it.
    pub gateway: IpAddr,
}

impl FreshHost {
    /// Boot a fresh host and wait until its sshd answers with a banner.
    pub fn start() -> FreshHost {
        image();
        static N: AtomicU32 = AtomicU32::new(0);
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        let name = format!(
            "ployz-fresh-{}-{}-{:08x}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed),
            nanos
        );
        docker_ok(&[
            "run",
            "-d",
            "--name",
            &name,
            "--hostname",
            &name[..name.len().min(63)],
            "--label",
            "ployz.test=fresh-host",
            "--cap-add",
            "SYS_ADMIN",
            "--cap-add",
            "NET_ADMIN",
            "--device",
            "/dev/net/tun",
            "--security-opt",
            "seccomp=unconfined",
            "--cgroupns=host",
            "-v",
            "/sys/fs/cgroup:/sys/fs/cgroup:rw",
            "--tmpfs",
            "/run",
            "--tmpfs",
            "/run/lock",
            "--tmpfs",
            "/tmp",
            IMAGE,
            "/sbin/init",
        ]);
        // From here on Drop removes the container.
        let mut host = FreshHost {
            name,
            ip: IpAddr::from([0, 0, 0, 0]),
            gateway: IpAddr::from([0, 0, 0, 0]),
        };
        let ip = docker_ok(&[
            "inspect",
            "-f",
            "{{.NetworkSettings.IPAddress}}",
            &host.name,
        ]);
        let gw = docker_ok(&["inspect", "-f", "{{.NetworkSettings.Gateway}}", &host.name]);
        host.ip = ip
            .parse()
            .unwrap_or_else(|_| panic!("container address `{ip}`"));
        host.gateway = gw
            .parse()
            .unwrap_or_else(|_| panic!("container gateway `{gw}`"));
        host.wait_sshd(Duration::from_secs(60));
        host
    }

    fn wait_sshd(&self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        let addr = SocketAddr::new(self.ip, 22);
        loop {
            if let Ok(mut s) = TcpStream::connect_timeout(&addr, Duration::from_millis(500)) {
                let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
                let mut buf = [0u8; 4];
                if s.read_exact(&mut buf).is_ok() && &buf == b"SSH-" {
                    return;
                }
            }
            assert!(
                Instant::now() < deadline,
                "sshd in {} did not answer within {timeout:?}; `docker logs {}`",
                self.name,
                self.name
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// `root@<ip>`
    pub fn root_target(&self) -> String {
        format!("root@{}", self.ip)
    }

    /// Run a command inside the container (bypassing SSH; for assertions
    /// and for breaking things on purpose).
    pub fn exec(&self, cmd: &str) -> Output {
        docker(&["exec", &self.name, "sh", "-c", cmd])
    }

    /// Like [`FreshHost::exec`], asserting success; returns stdout.
    pub fn exec_ok(&self, cmd: &str) -> String {
        let out = self.exec(cmd);
        assert!(
            out.status.success(),
            "`{cmd}` in {} failed ({}): {}{}",
            self.name,
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Give the host a new SSH host key (as a reinstall would).
    pub fn regenerate_host_keys(&self) {
        self.exec_ok(
            "rm -f /etc/ssh/ssh_host_* && ssh-keygen -A >/dev/null && systemctl restart ssh",
        );
        self.wait_sshd(Duration::from_secs(20));
    }
}

impl Drop for FreshHost {
    fn drop(&mut self) {
        let _ = docker(&["rm", "-f", "-v", &self.name]);
    }
}

/// An address nothing answers on: in the docker bridge's range, outside
/// the addresses docker hands out first.
pub fn unreachable_ip(gateway: IpAddr) -> IpAddr {
    match gateway {
        IpAddr::V4(v4) => {
            let o = v4.octets();
            IpAddr::from([o[0], o[1], 255, 254])
        }
        v6 => v6,
    }
}
