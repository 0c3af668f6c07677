//! Namespace hosts: one network namespace per host, each with a veth into a
//! private bridge in the root namespace and its own address. Everything a
//! [`Testbed`] creates carries its unique prefix and is removed on drop, also
//! when the test panics.

use std::fs::OpenOptions;
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::process::{Command, Stdio};

const LOCK_DIR: &str = "/run/ployz-tests";

fn run(args: &[&str]) -> Result<(), String> {
    let out = Command::new(args[0])
        .args(&args[1..])
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("{}: {e}", args[0]))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "`{}` failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

fn must(args: &[&str]) {
    if let Err(e) = run(args) {
        panic!("{e}");
    }
}

/// One namespace host.
#[derive(Debug, Clone)]
pub struct Host {
    pub netns: String,
    pub ip: Ipv4Addr,
}

impl Host {
    /// A command that runs inside this host's namespace.
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.netns]).arg(program);
        c
    }

    /// Drop all traffic in and out of this host (except loopback).
    pub fn cut(&self) {
        for chain in ["INPUT", "OUTPUT"] {
            let iface = if chain == "INPUT" { "-i" } else { "-o" };
            must(&[
                "ip",
                "netns",
                "exec",
                &self.netns,
                "iptables",
                "-A",
                chain,
                iface,
                "eth0",
                "-j",
                "DROP",
            ]);
        }
    }

    /// Undo [`Host::cut`].
    pub fn heal(&self) {
        for chain in ["INPUT", "OUTPUT"] {
            let iface = if chain == "INPUT" { "-i" } else { "-o" };
            let _ = run(&[
                "ip",
                "netns",
                "exec",
                &self.netns,
                "iptables",
                "-D",
                chain,
                iface,
                "eth0",
                "-j",
                "DROP",
            ]);
        }
    }
}

/// A bridge and N namespace hosts on `10.231.<slot>.0/24`.
pub struct Testbed {
    prefix: String,
    bridge: String,
    slot_lock: PathBuf,
    pub hosts: Vec<Host>,
}

impl Testbed {
    pub fn new(n: usize) -> Testbed {
        assert!(n > 0 && n < 200);
        std::fs::create_dir_all(LOCK_DIR).expect("lock dir");
        // Claim a /24 no other live testbed uses.
        let (slot, slot_lock) = (1u8..=250)
            .find_map(|s| {
                let p = PathBuf::from(format!("{LOCK_DIR}/slot-{s}"));
                OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .open(&p)
                    .ok()
                    .map(|_| (s, p))
            })
            .expect("a free testbed slot");
        let prefix = format!("pz{:x}{slot:02x}", std::process::id() % 0xfff);
        let bridge = format!("{prefix}b");
        let mut tb = Testbed {
            prefix,
            bridge,
            slot_lock,
            hosts: Vec::new(),
        };
        must(&["ip", "link", "add", &tb.bridge, "type", "bridge"]);
        must(&["ip", "link", "set", &tb.bridge, "up"]);
        // The root namespace (the test process) reaches the hosts at .254.
        must(&[
            "ip",
            "addr",
            "add",
            &format!("10.231.{slot}.254/24"),
            "dev",
            &tb.bridge,
        ]);
        // dockerd's br_netfilter + FORWARD DROP would eat bridged traffic.
        let _ = run(&[
            "iptables", "-I", "FORWARD", "-i", &tb.bridge, "-o", &tb.bridge, "-j", "ACCEPT",
        ]);
        for i in 0..n {
            let netns = format!("{}h{i}", tb.prefix);
            let veth = format!("{}v{i}", tb.prefix);
            let ip = Ipv4Addr::new(10, 231, slot, i as u8 + 1);
            must(&["ip", "netns", "add", &netns]);
            tb.hosts.push(Host {
                netns: netns.clone(),
                ip,
            });
            must(&[
                "ip", "link", "add", &veth, "type", "veth", "peer", "name", "eth0", "netns", &netns,
            ]);
            must(&["ip", "link", "set", &veth, "master", &tb.bridge, "up"]);
            let ns = |args: &[&str]| {
                let mut a = vec!["ip", "netns", "exec", &netns];
                a.extend_from_slice(args);
                must(&a);
            };
            ns(&["ip", "link", "set", "lo", "up"]);
            ns(&["ip", "addr", "add", &format!("{ip}/24"), "dev", "eth0"]);
            ns(&["ip", "link", "set", "eth0", "up"]);
        }
        tb
    }

    pub fn prefix(&self) -> &str {
        &self.prefix
    }
}

impl Drop for Testbed {
    fn drop(&mut self) {
        for h in &self.hosts {
            // Kill whatever still runs in the namespace, then remove it.
            if let Ok(out) = Command::new("ip")
                .args(["netns", "pids", &h.netns])
                .output()
            {
                for pid in String::from_utf8_lossy(&out.stdout).split_whitespace() {
                    if let Ok(pid) = pid.parse::<i32>() {
                        // SAFETY: kill(2) on a pid inside our own test namespace.
                        unsafe { libc::kill(pid, libc::SIGKILL) };
                    }
                }
            }
            let _ = run(&["ip", "netns", "del", &h.netns]);
        }
        for i in 0..self.hosts.len() {
            let _ = run(&["ip", "link", "del", &format!("{}v{i}", self.prefix)]);
        }
        let _ = run(&[
            "iptables",
            "-D",
            "FORWARD",
            "-i",
            &self.bridge,
            "-o",
            &self.bridge,
            "-j",
            "ACCEPT",
        ]);
        let _ = run(&["ip", "link", "del", &self.bridge]);
        let _ = std::fs::remove_file(&self.slot_lock);
    }
}
