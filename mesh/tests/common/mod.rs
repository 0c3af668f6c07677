//! Mesh nodes on the shared namespace testbed (`ployz-testbed`; see
//! shared/design/testbed.md): each host gets a WireGuard key and an overlay
//! /24 of [`OVERLAY`], and runs the `meshnode` example or wireguard-go.
//! The testbed tears everything down in Drop, also when a test panics.
//!
//! Each process that owns a WireGuard device runs in its own mount
//! namespace with a private tmpfs on /run/wireguard, so several hosts can
//! all call their interface `plz0` (the UAPI socket path is per interface
//! name); `wg` reaches it through `nsenter --mount --net`.

#![allow(dead_code)]

use std::net::Ipv4Addr;
use std::ops::{Deref, DerefMut};
use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::Duration;

use ployz_mesh::keys::WgKeyPair;
pub use ployz_testbed::{must, wait_for, Testbed};

pub const OVERLAY: &str = "10.234.0.0/16";

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

/// A host's mesh identity: its WireGuard key and overlay address
/// (`10.234.<i+1>.1`); its underlay is the testbed host's address.
pub struct Node {
    pub underlay: Ipv4Addr,
    pub overlay: Ipv4Addr,
    pub key: WgKeyPair,
}

impl Node {
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

/// A [`Testbed`] (reached through Deref: `hosts`, `dir()`, `spawn`, …) plus one
/// [`Node`] per host.
pub struct MeshBed {
    tb: Testbed,
    pub nodes: Vec<Node>,
}

impl Deref for MeshBed {
    type Target = Testbed;
    fn deref(&self) -> &Testbed {
        &self.tb
    }
}

impl DerefMut for MeshBed {
    fn deref_mut(&mut self) -> &mut Testbed {
        &mut self.tb
    }
}

impl MeshBed {
    pub fn new(n: usize) -> MeshBed {
        let tb = Testbed::new(n);
        let nodes = (0..n)
            .map(|i| Node {
                underlay: tb.hosts[i].ip,
                overlay: Ipv4Addr::new(10, 234, i as u8 + 1, 1),
                key: WgKeyPair::generate(),
            })
            .collect();
        MeshBed { tb, nodes }
    }

    /// Run `sh -c cmd` in host `i`'s namespace.
    pub fn sh(&self, i: usize, cmd: &str) -> Output {
        self.hosts[i].sh(cmd)
    }

    /// A meshnode on host `i` with the given extra arguments; its status
    /// file is `status_path(i)`.
    pub fn spawn_meshnode(&mut self, i: usize, extra: &[String]) -> u32 {
        self.spawn_meshnode_env(i, extra, &[])
    }

    /// As [`MeshBed::spawn_meshnode`], with extra environment variables.
    pub fn spawn_meshnode_env(&mut self, i: usize, extra: &[String], env: &[(&str, &str)]) -> u32 {
        let n = &self.nodes[i];
        let mut args: Vec<String> = vec![
            "run".into(),
            "--key".into(),
            n.private_b64(),
            "--address".into(),
            n.overlay.to_string(),
            "--cluster".into(),
            OVERLAY.into(),
            "--status-file".into(),
            self.status_path(i).display().to_string(),
        ];
        args.extend_from_slice(extra);
        let bin = meshnode_bin();
        let pid = self.tb.spawn(i, &format!("meshnode{i}"), &bin, &args, env);
        let path = self.status_path(i);
        wait_for(
            &format!("meshnode{i} to start"),
            Duration::from_secs(10),
            || path.exists().then_some(()),
        );
        pid
    }

    pub fn status_path(&self, i: usize) -> PathBuf {
        self.dir().join(format!("status{i}"))
    }

    pub fn status(&self, i: usize) -> String {
        std::fs::read_to_string(self.status_path(i)).unwrap_or_default()
    }

    /// `wg <args>` in the mount and network namespaces of process `pid`.
    pub fn wg(&self, pid: u32, args: &[&str]) -> Output {
        ployz_testbed::nsenter(pid, "wg", args)
    }

    pub fn ping(&self, from: usize, to: Ipv4Addr) -> bool {
        self.sh(from, &format!("ping -c 2 -i 0.2 -W 2 {to}"))
            .status
            .success()
    }
}

impl Drop for MeshBed {
    fn drop(&mut self) {
        // The testbed prints the processes' logs after this.
        if std::thread::panicking() {
            for i in 0..self.nodes.len() {
                eprintln!("----- status{i}\n{}", self.status(i));
            }
        }
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
