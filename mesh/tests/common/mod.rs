//! Namespace hosts for the mesh tests (see shared/design/testbed.md): one
//! network namespace per host, a veth each into a per-test bridge, underlay
//! addresses 10.233.<subnet>.<i+1>/24. Everything is torn down in Drop, also
//! when a test panics; processes are killed first.
//!
//! Each process that owns a WireGuard device runs in its own mount
//! namespace with a private tmpfs on /run/wireguard, so several hosts can
//! all call their interface `plz0` (the UAPI socket path is per interface
//! name); `wg` reaches it through `nsenter --mount --net`.

#![allow(dead_code)]

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use ployz_mesh::keys::WgKeyPair;

pub const OVERLAY: &str = "10.234.0.0/16";

pub fn run(cmd: &str, args: &[&str]) -> Output {
    Command::new(cmd)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("running {cmd}: {e}"))
}

pub fn must(cmd: &str, args: &[&str]) -> String {
    let out = run(cmd, args);
    assert!(
        out.status.success(),
        "{cmd} {}: {}{}",
        args.join(" "),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

pub fn meshnode_bin() -> PathBuf {
    // target/<profile>/deps/<test>-<hash> → target/<profile>/examples/meshnode
    let exe = std::env::current_exe().expect("current_exe");
    let bin = exe
        .parent()
        .and_then(Path::parent)
        .expect("target dir")
        .join("examples/meshnode");
    assert!(
        bin.exists(),
        "{} missing: `cargo test` builds examples; run the tests through cargo",
        bin.display()
    );
    bin
}

pub fn require_root() {
    // SAFETY: geteuid has no preconditions.
    let uid = unsafe { libc::geteuid() };
    assert_eq!(
        uid, 0,
        "namespace tests need root (CAP_NET_ADMIN, /dev/net/tun)"
    );
    assert!(
        Path::new("/dev/net/tun").exists(),
        "/dev/net/tun is missing"
    );
}

pub fn wait_for<T>(what: &str, timeout: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let end = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return v;
        }
        if Instant::now() > end {
            panic!("timed out after {timeout:?} waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

pub struct Host {
    pub ns: String,
    pub underlay: Ipv4Addr,
    pub overlay: Ipv4Addr,
    pub key: WgKeyPair,
}

impl Host {
    pub fn public_b64(&self) -> String {
        self.key.public_base64()
    }
    pub fn private_b64(&self) -> String {
        use base64::Engine as _;
        base64::engine::general_purpose::STANDARD.encode(self.key.secret_bytes())
    }
    /// `<pubkey>@<underlay>:51820/<overlay /24>` for meshnode's --peer.
    pub fn peer_spec(&self) -> String {
        let o = self.overlay.octets();
        format!(
            "{}@{}:51820/{}.{}.{}.0/24",
            self.public_b64(),
            self.underlay,
            o[0],
            o[1],
            o[2]
        )
    }
}

pub struct Testbed {
    pub tag: String,
    pub bridge: String,
    pub hosts: Vec<Host>,
    pub dir: PathBuf,
    procs: Vec<(String, Child)>,
}

impl Testbed {
    /// `tag`: ≤ 5 chars, unique per test; `subnet`: the third octet of the
    /// underlay 10.233.<subnet>.0/24, unique per test.
    pub fn new(tag: &str, subnet: u8, n: usize) -> Testbed {
        require_root();
        assert!(tag.len() <= 5);
        let dir = std::env::temp_dir().join(format!("ployz-mesh-{tag}"));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("test dir");
        std::fs::create_dir_all("/run/wireguard").expect("/run/wireguard");
        let mut tb = Testbed {
            tag: tag.to_owned(),
            bridge: format!("pzb{tag}"),
            hosts: Vec::new(),
            dir,
            procs: Vec::new(),
        };
        tb.cleanup(n); // leftovers of a killed run
        must("ip", &["link", "add", &tb.bridge, "type", "bridge"]);
        must("ip", &["link", "set", &tb.bridge, "up"]);
        must(
            "iptables",
            &[
                "-I", "FORWARD", "-i", &tb.bridge, "-o", &tb.bridge, "-j", "ACCEPT",
            ],
        );
        for i in 0..n {
            let ns = tb.ns_name(i);
            let host_if = format!("pz{tag}h{i}");
            let ns_if = format!("pz{tag}n{i}");
            let underlay = Ipv4Addr::new(10, 233, subnet, i as u8 + 1);
            must("ip", &["netns", "add", &ns]);
            must(
                "ip",
                &[
                    "link", "add", &host_if, "type", "veth", "peer", "name", &ns_if,
                ],
            );
            must("ip", &["link", "set", &ns_if, "netns", &ns]);
            must("ip", &["link", "set", &host_if, "master", &tb.bridge, "up"]);
            must("ip", &["-n", &ns, "link", "set", &ns_if, "name", "eth0"]);
            must(
                "ip",
                &[
                    "-n",
                    &ns,
                    "addr",
                    "add",
                    &format!("{underlay}/24"),
                    "dev",
                    "eth0",
                ],
            );
            must("ip", &["-n", &ns, "link", "set", "eth0", "up"]);
            must("ip", &["-n", &ns, "link", "set", "lo", "up"]);
            tb.hosts.push(Host {
                ns,
                underlay,
                overlay: Ipv4Addr::new(10, 234, i as u8 + 1, 1),
                key: WgKeyPair::generate(),
            });
        }
        tb
    }

    fn ns_name(&self, i: usize) -> String {
        format!("pz{}{i}", self.tag)
    }

    fn cleanup(&self, n: usize) {
        for i in 0..n.max(self.hosts.len()) {
            let _ = run("ip", &["netns", "del", &self.ns_name(i)]);
            let _ = run("ip", &["link", "del", &format!("pz{}h{i}", self.tag)]);
        }
        let _ = run("ip", &["link", "del", &self.bridge]);
        // Remove every copy of our FORWARD rule.
        for _ in 0..8 {
            let out = run(
                "iptables",
                &[
                    "-D",
                    "FORWARD",
                    "-i",
                    &self.bridge,
                    "-o",
                    &self.bridge,
                    "-j",
                    "ACCEPT",
                ],
            );
            if !out.status.success() {
                break;
            }
        }
    }

    /// Run `sh -c cmd` in host `i`'s namespace.
    pub fn sh(&self, i: usize, cmd: &str) -> Output {
        run("ip", &["netns", "exec", &self.hosts[i].ns, "sh", "-c", cmd])
    }

    /// Start `program args` in host `i`'s namespace with a private
    /// /run/wireguard; returns the pid (the same process: every step execs).
    pub fn spawn(&mut self, i: usize, name: &str, program: &Path, args: &[String]) -> u32 {
        self.spawn_env(i, name, program, args, &[])
    }

    /// As [`Testbed::spawn`], with extra environment variables.
    pub fn spawn_env(
        &mut self,
        i: usize,
        name: &str,
        program: &Path,
        args: &[String],
        env: &[(&str, &str)],
    ) -> u32 {
        let log = self.dir.join(format!("{name}.log"));
        let log = std::fs::File::create(&log).expect("log file");
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.hosts[i].ns])
            .args(["unshare", "--mount", "--propagation", "private", "sh", "-c"])
            .arg(r#"mount -t tmpfs tmpfs /run/wireguard && exec "$0" "$@""#)
            .arg(program)
            .args(args)
            .env("WG_I_PREFER_BUGGY_USERSPACE_TO_POLISHED_KMOD", "1")
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log);
        let child = cmd.spawn().expect("spawn");
        let pid = child.id();
        self.procs.push((name.to_owned(), child));
        pid
    }

    /// A meshnode on host `i` with the given extra arguments; its status
    /// file is `status_path(i)`.
    pub fn spawn_meshnode(&mut self, i: usize, extra: &[String]) -> u32 {
        self.spawn_meshnode_env(i, extra, &[])
    }

    /// As [`Testbed::spawn_meshnode`], with extra environment variables.
    pub fn spawn_meshnode_env(&mut self, i: usize, extra: &[String], env: &[(&str, &str)]) -> u32 {
        let h = &self.hosts[i];
        let mut args: Vec<String> = vec![
            "run".into(),
            "--key".into(),
            h.private_b64(),
            "--address".into(),
            h.overlay.to_string(),
            "--cluster".into(),
            OVERLAY.into(),
            "--status-file".into(),
            self.status_path(i).display().to_string(),
        ];
        args.extend_from_slice(extra);
        let bin = meshnode_bin();
        let pid = self.spawn_env(i, &format!("meshnode{i}"), &bin, &args, env);
        let path = self.status_path(i);
        wait_for(
            &format!("meshnode{i} to start"),
            Duration::from_secs(10),
            || path.exists().then_some(()),
        );
        pid
    }

    pub fn status_path(&self, i: usize) -> PathBuf {
        self.dir.join(format!("status{i}"))
    }

    pub fn status(&self, i: usize) -> String {
        std::fs::read_to_string(self.status_path(i)).unwrap_or_default()
    }

    /// `wg <args>` in the mount and network namespaces of process `pid`.
    pub fn wg(&self, pid: u32, args: &[&str]) -> Output {
        let t = pid.to_string();
        let mut a = vec!["-t", &t, "--mount", "--net", "wg"];
        a.extend_from_slice(args);
        run("nsenter", &a)
    }

    pub fn ping(&self, from: usize, to: std::net::Ipv4Addr) -> bool {
        self.sh(from, &format!("ping -c 2 -i 0.2 -W 2 {to}"))
            .status
            .success()
    }

    pub fn logs(&self) -> String {
        let mut s = String::new();
        for (name, _) in &self.procs {
            let text =
                std::fs::read_to_string(self.dir.join(format!("{name}.log"))).unwrap_or_default();
            s.push_str(&format!("----- {name}\n{text}\n"));
        }
        s
    }
}

impl Drop for Testbed {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("{}", self.logs());
            for i in 0..self.hosts.len() {
                eprintln!("----- status{i}\n{}", self.status(i));
            }
        }
        for (_, child) in &mut self.procs {
            let _ = child.kill();
            let _ = child.wait();
        }
        self.cleanup(self.hosts.len());
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Peer lines of `wg show <if> dump`: (public key, endpoint, latest
/// handshake epoch seconds).
pub fn dump_peers(dump: &str) -> Vec<(String, String, u64)> {
    dump.lines()
        .skip(1)
        .filter_map(|l| {
            let f: Vec<&str> = l.split('\t').collect();
            (f.len() >= 8).then(|| (f[0].to_owned(), f[2].to_owned(), f[4].parse().unwrap_or(0)))
        })
        .collect()
}

pub fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}
