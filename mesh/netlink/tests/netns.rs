//! Every change against a real kernel, in throwaway network namespaces (needs
//! root): a thread of this test unshares its own namespace, a child process
//! (`unshare --net sleep`) stands for a workload's.

use ployz_netlink::{Netlink, Op};
use std::fs::File;
use std::net::Ipv4Addr;
use std::os::fd::AsRawFd;
use std::process::{Child, Command};
use std::time::{Duration, Instant};

/// A process in a network namespace of its own, killed on drop.
struct Workload(Child);

impl Workload {
    fn start() -> Workload {
        let child = Command::new("unshare")
            .args(["--net", "sleep", "60"])
            .spawn()
            .expect("unshare (util-linux)");
        let pid = child.id();
        let w = Workload(child);
        let ours = std::fs::read_link("/proc/self/ns/net").unwrap();
        let deadline = Instant::now() + Duration::from_secs(5);
        while std::fs::read_link(format!("/proc/{pid}/ns/net"))
            .ok()
            .as_ref()
            == Some(&ours)
        {
            assert!(Instant::now() < deadline, "unshare --net did not happen");
            std::thread::sleep(Duration::from_millis(10));
        }
        w
    }

    fn pid(&self) -> i32 {
        self.0.id() as i32
    }
}

impl Drop for Workload {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Runs `f` on a thread in a new network namespace, or in the one of `pid`.
fn in_netns<T: Send>(pid: Option<i32>, f: impl FnOnce() -> T + Send) -> T {
    std::thread::scope(|s| {
        s.spawn(|| {
            match pid {
                // SAFETY: unshare(2) of this (scoped, short-lived) thread's network namespace.
                None => assert_eq!(unsafe { libc::unshare(libc::CLONE_NEWNET) }, 0),
                Some(pid) => {
                    let ns = File::open(format!("/proc/{pid}/ns/net")).unwrap();
                    // SAFETY: setns(2) on a namespace fd we own, for this thread only.
                    let rc = unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) };
                    assert_eq!(rc, 0);
                }
            }
            f()
        })
        .join()
        .unwrap()
    })
}

fn s(v: &str) -> String {
    v.to_string()
}

#[test]
fn bridge_veth_addresses_routes_and_namespaces() {
    let w = Workload::start();
    let pid = w.pid();
    in_netns(None, || {
        let mut nl = Netlink::open().unwrap();
        let gw = Ipv4Addr::new(10, 9, 0, 1);
        for op in [
            Op::SetUp { ifname: s("lo") },
            Op::AddBridge { name: s("br0") },
            Op::SetMtu {
                ifname: s("br0"),
                mtu: 1420,
            },
            Op::ReplaceAddress {
                ifname: s("br0"),
                addr: gw,
                prefix: 24,
            },
            // Twice: a restarted daemon finds it there.
            Op::ReplaceAddress {
                ifname: s("br0"),
                addr: gw,
                prefix: 24,
            },
            Op::SetUp { ifname: s("br0") },
            Op::AddVeth {
                host: s("vh0"),
                peer: s("vp0"),
                peer_pid: Some(pid),
                mtu: Some(1400),
                peer_mac: Some([0x02, 0x42, 10, 10, 0, 9]),
            },
            Op::SetMaster {
                ifname: s("vh0"),
                master: s("br0"),
            },
            Op::SetUp { ifname: s("vh0") },
            Op::AddVeth {
                host: s("vx0"),
                peer: s("vx1"),
                peer_pid: None,
                mtu: None,
                peer_mac: None,
            },
            Op::MoveToNetns {
                ifname: s("vx1"),
                pid,
            },
            Op::ReplaceRoute {
                dest: Ipv4Addr::new(10, 10, 0, 0),
                prefix: 16,
                via: None,
                dev: Some(s("br0")),
                src: Some(gw),
            },
            Op::ReplaceRoute {
                dest: Ipv4Addr::UNSPECIFIED,
                prefix: 0,
                via: Some(Ipv4Addr::new(10, 9, 0, 254)),
                dev: None,
                src: None,
            },
        ] {
            nl.apply(&op).unwrap_or_else(|e| panic!("{op}: {e}"));
        }
        let br = nl.link("br0").unwrap().expect("br0");
        assert_eq!(br.mtu, Some(1420));
        assert!(br.up);
        assert_eq!(nl.addresses("br0").unwrap(), [(gw, 24)]);
        let vh = nl.link("vh0").unwrap().expect("vh0");
        assert_eq!(
            (vh.master, vh.mtu, vh.up),
            (Some(br.index), Some(1400), true)
        );
        assert!(
            nl.link("vp0").unwrap().is_none(),
            "the peer lives elsewhere"
        );
        assert!(nl.link("vx1").unwrap().is_none(), "moved away");
        let routes = nl.routes().unwrap();
        assert!(
            routes.iter().any(|r| r.dest == Ipv4Addr::new(10, 10, 0, 0)
                && r.prefix == 16
                && r.oif == Some(br.index)
                && r.src == Some(gw)),
            "{routes:?}"
        );
        assert!(
            routes
                .iter()
                .any(|r| r.prefix == 0 && r.via == Some(Ipv4Addr::new(10, 9, 0, 254))),
            "{routes:?}"
        );

        // Failures say what was asked and why.
        let e = nl
            .apply(&Op::SetMtu {
                ifname: s("nosuch0"),
                mtu: 1420,
            })
            .unwrap_err();
        assert_eq!(
            e.to_string(),
            "cannot set mtu 1420 on nosuch0: no interface named nosuch0"
        );
        let e = nl.apply(&Op::AddBridge { name: s("br0") }).unwrap_err();
        assert_eq!(e.errno(), Some(libc::EEXIST));
        assert_eq!(e.to_string(), "cannot create bridge br0: File exists");

        nl.apply(&Op::DeleteLink { ifname: s("br0") }).unwrap();
        assert!(nl.link("br0").unwrap().is_none());
        nl.apply(&Op::SetDown { ifname: s("vh0") }).unwrap();
        assert!(!nl.link("vh0").unwrap().unwrap().up);
        // Checked while this namespace lives: when it goes (asynchronously,
        // after its thread ends) the kernel deletes vh0 and with it vp0.
        // The workload's side: both links arrived, with their MTU.
        in_netns(Some(pid), || {
            let mut nl = Netlink::open().unwrap();
            let vp = nl
                .link("vp0")
                .unwrap()
                .expect("vp0 in the workload's namespace");
            assert_eq!(vp.mtu, Some(1400));
            assert!(nl.link("vx1").unwrap().is_some());
        });
        // With the MAC address asked for.
        let shown = Command::new("nsenter")
            .args([
                "-t",
                &pid.to_string(),
                "-n",
                "ip",
                "-o",
                "link",
                "show",
                "vp0",
            ])
            .output()
            .unwrap();
        let shown = String::from_utf8_lossy(&shown.stdout);
        assert!(shown.contains("link/ether 02:42:0a:0a:00:09"), "{shown}");
    });
}
