//! Namespace hosts (shared/design/testbed.md, "Kind 1"): one network
//! namespace per host, a veth each into a private bridge in the root
//! namespace, an address each on `10.232.<slot>.0/24` (the root namespace is
//! `.254`). The mesh tests (`mesh/tests`) and the process tests
//! (`ployz-tests`) both build on this crate.
//!
//! A [`Testbed`] claims its slot with a lock file held for its lifetime
//! (`flock`, released by the kernel even when the test process is killed),
//! so parallel tests and test binaries never share names or addresses; a new
//! claim first removes what a killed run left in that slot. Everything it
//! created (processes, namespaces, bridge, FORWARD rule) is removed on drop,
//! also when the test panics.

use std::ffi::OsStr;
use std::fs::{File, OpenOptions};
use std::net::Ipv4Addr;
use std::os::fd::AsRawFd as _;
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

const LOCK_DIR: &str = "/run/ployz-testbed";

/// Run `argv` and return its stdout, or a message saying what failed.
pub fn run(argv: &[&str]) -> Result<String, String> {
    let out = Command::new(argv[0])
        .args(&argv[1..])
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("{}: {e}", argv[0]))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(format!(
            "`{}` failed ({}): {}{}",
            argv.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// [`run`], panicking on failure.
pub fn must(argv: &[&str]) -> String {
    run(argv).unwrap_or_else(|e| panic!("{e}"))
}

/// Run `program args` in the network and mount namespaces of process `pid`
/// (e.g. `wg show plz0` against a daemon's private /run/wireguard).
pub fn nsenter(pid: u32, program: &str, args: &[&str]) -> Output {
    Command::new("nsenter")
        .args(["-t", &pid.to_string(), "--mount", "--net", program])
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("run nsenter")
}

/// Poll `f` every 200 ms until it returns `Some` or `timeout` passes.
pub fn eventually<T>(timeout: Duration, f: impl FnMut() -> Option<T>) -> Option<T> {
    eventually_every(Duration::from_millis(200), timeout, f)
}

/// [`eventually`], polling every `every`.
pub fn eventually_every<T>(
    every: Duration,
    timeout: Duration,
    mut f: impl FnMut() -> Option<T>,
) -> Option<T> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return Some(v);
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(every);
    }
}

/// [`eventually`], panicking with `what` on timeout.
pub fn wait_for<T>(what: &str, timeout: Duration, f: impl FnMut() -> Option<T>) -> T {
    eventually(timeout, f)
        .unwrap_or_else(|| panic!("timed out after {timeout:?} waiting for {what}"))
}

/// Namespace tests need root (CAP_NET_ADMIN) and /dev/net/tun.
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

/// One namespace host: its namespace and its address on the bridge (`eth0`).
#[derive(Debug, Clone)]
pub struct Host {
    pub netns: String,
    pub ip: Ipv4Addr,
}

impl Host {
    /// A command that runs inside this host's namespace (`ip netns exec`).
    pub fn command(&self, program: impl AsRef<OsStr>) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.netns]).arg(program);
        c
    }

    /// Run `sh -c script` in this host's namespace.
    pub fn sh(&self, script: &str) -> Output {
        self.command("sh")
            .args(["-c", script])
            .stdin(Stdio::null())
            .output()
            .expect("run ip netns exec")
    }

    /// A command for a daemon on this host: its network namespace plus a
    /// mount namespace of its own with a private tmpfs on /run/wireguard, so
    /// every host's WireGuard control socket (`/run/wireguard/<if>.sock`) is
    /// its own, as on a real machine. (Not `ip netns exec`: it remounts
    /// /sys, which hides the cgroup hierarchies the host runtime needs.)
    pub fn daemon_command(&self, program: impl AsRef<OsStr>) -> Command {
        let mut c = Command::new("nsenter");
        c.arg(format!("--net=/run/netns/{}", self.netns))
            .args(["unshare", "--mount", "--propagation", "private", "sh", "-c"])
            .arg(
                "mkdir -p /run/wireguard && mount -t tmpfs ployz-wg /run/wireguard \
                 && exec \"$0\" \"$@\"",
            )
            .arg(program);
        c
    }

    /// Drop all traffic in and out of this host's `eth0`.
    pub fn cut(&self) {
        for rule in Self::CUT {
            let mut argv = vec!["ip", "netns", "exec", &self.netns, "iptables", "-w", "-A"];
            argv.extend_from_slice(rule);
            must(&argv);
        }
    }

    /// Undo [`Host::cut`].
    pub fn heal(&self) {
        for rule in Self::CUT {
            let mut argv = vec!["ip", "netns", "exec", &self.netns, "iptables", "-w", "-D"];
            argv.extend_from_slice(rule);
            let _ = run(&argv);
        }
    }

    const CUT: [&'static [&'static str]; 2] = [
        &["INPUT", "-i", "eth0", "-j", "DROP"],
        &["OUTPUT", "-o", "eth0", "-j", "DROP"],
    ];
}

/// A bridge and N namespace hosts; processes started with
/// [`Testbed::spawn`] log into its directory and die with it.
pub struct Testbed {
    prefix: String,
    bridge: String,
    slot: u8,
    dir: tempfile::TempDir,
    pub hosts: Vec<Host>,
    procs: Vec<(String, Child)>,
    // Released last: the slot is free again once everything is gone.
    _lock: File,
}

impl Testbed {
    /// `n` hosts, `10.232.<slot>.1` … `.n`, reachable from each other and
    /// from the root namespace (`.254`).
    pub fn new(n: usize) -> Testbed {
        assert!(n > 0 && n < 200, "1 to 199 hosts");
        require_root();
        let (slot, lock) = claim_slot();
        let prefix = format!("plzt{slot}");
        let mut tb = Testbed {
            bridge: format!("{prefix}b"),
            prefix,
            slot,
            dir: tempfile::Builder::new()
                .prefix("ployz-testbed-")
                .tempdir()
                .expect("tempdir"),
            hosts: Vec::new(),
            procs: Vec::new(),
            _lock: lock,
        };
        tb.remove_network(); // what a killed run left in this slot
        must(&["ip", "link", "add", &tb.bridge, "type", "bridge"]);
        must(&["ip", "link", "set", &tb.bridge, "up"]);
        let gateway = format!("{}/24", tb.gateway());
        must(&["ip", "addr", "add", &gateway, "dev", &tb.bridge]);
        // Once dockerd has run, br_netfilter and a FORWARD policy of DROP
        // would eat the traffic between our hosts.
        must(&[
            "iptables", "-w", "-I", "FORWARD", "-i", &tb.bridge, "-o", &tb.bridge, "-j", "ACCEPT",
        ]);
        for i in 0..n {
            let netns = format!("{}h{i}", tb.prefix);
            let veth = format!("{}v{i}", tb.prefix);
            let ip = Ipv4Addr::new(10, 232, slot, i as u8 + 1);
            must(&["ip", "netns", "add", &netns]);
            tb.hosts.push(Host {
                netns: netns.clone(),
                ip,
            });
            must(&[
                "ip", "link", "add", &veth, "type", "veth", "peer", "name", "eth0", "netns", &netns,
            ]);
            must(&["ip", "link", "set", &veth, "master", &tb.bridge, "up"]);
            let addr = format!("{ip}/24");
            must(&["ip", "-n", &netns, "link", "set", "lo", "up"]);
            must(&["ip", "-n", &netns, "addr", "add", &addr, "dev", "eth0"]);
            must(&["ip", "-n", &netns, "link", "set", "eth0", "up"]);
        }
        tb
    }

    /// The prefix of every name this testbed gives (namespaces `<prefix>h<i>`,
    /// veths `<prefix>v<i>`, the bridge).
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    pub fn bridge(&self) -> &str {
        &self.bridge
    }

    /// The root namespace's address on the bridge.
    pub fn gateway(&self) -> Ipv4Addr {
        Ipv4Addr::new(10, 232, self.slot, 254)
    }

    /// A private directory for logs and files the test writes; removed on drop.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Start `program args` on host `i` through [`Host::daemon_command`]
    /// (the pid is the program's own: every step execs), stdout and stderr
    /// into `<dir>/<name>.log`. It is killed on drop; its log is printed
    /// when the test panics.
    pub fn spawn(
        &mut self,
        i: usize,
        name: &str,
        program: &Path,
        args: &[String],
        env: &[(&str, &str)],
    ) -> u32 {
        let log = File::create(self.log_path(name)).expect("log file");
        let child = self.hosts[i]
            .daemon_command(program)
            .args(args)
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log fd"))
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {}: {e}", program.display()));
        let pid = child.id();
        self.procs.push((name.to_owned(), child));
        pid
    }

    fn log_path(&self, name: &str) -> std::path::PathBuf {
        self.dir().join(format!("{name}.log"))
    }

    /// The logs of every process [`Testbed::spawn`] started.
    pub fn logs(&self) -> String {
        let mut s = String::new();
        for (name, _) in &self.procs {
            let text = std::fs::read_to_string(self.log_path(name)).unwrap_or_default();
            s.push_str(&format!("----- {name}\n{text}\n"));
        }
        s
    }

    /// Remove every namespace, the bridge and the FORWARD rule of this
    /// slot, killing what runs in the namespaces; by name, so it also
    /// clears what a killed run left.
    fn remove_network(&self) {
        let list = run(&["ip", "netns", "list"]).unwrap_or_default();
        let ours = format!("{}h", self.prefix);
        for netns in list
            .lines()
            .filter_map(|l| l.split_whitespace().next())
            .filter(|n| {
                n.strip_prefix(&ours)
                    .is_some_and(|i| i.parse::<u32>().is_ok())
            })
        {
            let pids = run(&["ip", "netns", "pids", netns]).unwrap_or_default();
            for pid in pids
                .split_whitespace()
                .filter_map(|p| p.parse::<i32>().ok())
            {
                // SAFETY: kill(2) on a process inside one of our namespaces.
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
            // Deleting the namespace deletes its veth end, and so the pair.
            let _ = run(&["ip", "netns", "del", netns]);
        }
        // A deleted namespace goes away asynchronously, its veth pairs with
        // it; deleting our ends now frees their names for the next claim.
        let links = run(&["ip", "-o", "link", "show"]).unwrap_or_default();
        let veths = format!("{}v", self.prefix);
        for link in links
            .lines()
            .filter_map(|l| l.split(": ").nth(1))
            .map(|name| name.split('@').next().unwrap_or(name))
            .filter(|n| {
                n.strip_prefix(&veths)
                    .is_some_and(|i| i.parse::<u32>().is_ok())
            })
        {
            let _ = run(&["ip", "link", "del", link]);
        }
        let _ = run(&["ip", "link", "del", &self.bridge]);
        let rule = [
            "FORWARD",
            "-i",
            &self.bridge,
            "-o",
            &self.bridge,
            "-j",
            "ACCEPT",
        ];
        while run(&[&["iptables", "-w", "-D"][..], &rule[..]].concat()).is_ok() {}
    }
}

impl Drop for Testbed {
    fn drop(&mut self) {
        if std::thread::panicking() && !self.procs.is_empty() {
            eprintln!("{}", self.logs());
        }
        for (_, child) in &mut self.procs {
            let _ = child.kill();
            let _ = child.wait();
        }
        self.remove_network();
    }
}

/// Lock the first free slot (1..=250) for this process's lifetime.
fn claim_slot() -> (u8, File) {
    std::fs::create_dir_all(LOCK_DIR).expect("testbed lock dir");
    (1u8..=250)
        .find_map(|slot| {
            let file = OpenOptions::new()
                .create(true)
                .truncate(false)
                .write(true)
                .open(format!("{LOCK_DIR}/slot-{slot}.lock"))
                .expect("slot lock file");
            // SAFETY: flock(2) on a file descriptor we own.
            let locked =
                unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0;
            locked.then_some((slot, file))
        })
        .expect("a free testbed slot (250 in use?)")
}
