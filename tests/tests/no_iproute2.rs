//! ployzd on hosts without iproute2: its `PATH` holds every tool of this
//! machine except `ip`. The mesh comes up between two machines, host-runtime
//! workloads get their bridge and veth and answer over the mesh, and when a
//! machine leaves (`machine rm`) it takes every firewall rule of ployzd's
//! with it, older untagged ones included, and leaves the others alone.

use ployz_tests::images::busybox_image;
use ployz_tests::netns::{Host, Testbed};
use ployz_tests::{eventually, stdout, Machine};
use serde_json::Value;
use std::collections::HashSet;
use std::path::Path;
use std::time::Duration;

/// A directory with a symlink to every program on this machine's `PATH`
/// except `ip` (the first of each name wins, as with `PATH`).
fn path_without_ip(dir: &Path) {
    let path = std::env::var("PATH").unwrap_or_default();
    let mut seen = HashSet::new();
    for d in path
        .split(':')
        .chain(["/usr/local/sbin", "/usr/sbin", "/usr/bin", "/sbin", "/bin"])
    {
        let Ok(entries) = std::fs::read_dir(d) else {
            continue;
        };
        for e in entries.flatten() {
            let name = e.file_name();
            if name == "ip" || !seen.insert(name.clone()) {
                continue;
            }
            std::os::unix::fs::symlink(e.path(), dir.join(&name)).unwrap();
        }
    }
    assert!(!dir.join("ip").exists());
    assert!(dir.join("iptables").exists(), "iptables is installed");
}

/// The environment ployzd `pid` really runs with.
fn environ_of(pid: u32) -> String {
    String::from_utf8_lossy(&std::fs::read(format!("/proc/{pid}/environ")).unwrap())
        .replace('\0', "\n")
}

fn iptables_s(host: &Host, chain: &str) -> String {
    let o = host
        .command("iptables")
        .args(["-S", chain])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    stdout(&o)
}

fn status(m: &Machine) -> Value {
    m.ctl_json(&["mesh", "status"])
}

#[test]
fn ployzd_needs_no_iproute2() {
    let bin = tempfile::tempdir().unwrap();
    path_without_ip(bin.path());
    let path = bin.path().to_str().unwrap().to_string();
    let env = [("PATH", path.as_str())];

    let tb = Testbed::new(2);
    let founder = Machine::start_in_with_env(&tb.hosts[0], &[], &env);
    founder.ctl_json(&["mesh", "init", "noip"]);
    let joiner = Machine::start_in_with_env(&tb.hosts[1], &[], &env);
    let token = founder.ctl_json(&["machine", "invite", "create"])["token"]
        .as_str()
        .unwrap()
        .to_string();
    joiner.ctl_json(&["machine", "invite", "import", "--token", &token]);
    let ms = [founder, joiner];
    for m in &ms {
        assert!(
            environ_of(m.pid())
                .lines()
                .any(|l| l == format!("PATH={path}")),
            "ployzd runs with the PATH without ip"
        );
    }

    // plz0 configured over netlink: MTU, address, up, the cluster route.
    let cidr = status(&ms[0])["network"]["cidr"]
        .as_str()
        .unwrap()
        .to_string();
    let ips: Vec<String> = ms
        .iter()
        .map(|m| {
            status(m)["machine"]["overlay_ip"]
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect();
    for (m, ip) in ms.iter().zip(&ips) {
        let link = stdout(&m.exec("ip", &["-o", "link", "show", "dev", "plz0"]));
        assert!(link.contains("mtu 1420") && link.contains(",UP"), "{link}");
        let addr = stdout(&m.exec("ip", &["-4", "-o", "addr", "show", "dev", "plz0"]));
        assert!(addr.contains(&format!("inet {ip}/32")), "{addr}");
        let route = stdout(&m.exec("ip", &["route", "show", &cidr]));
        assert!(
            route.contains("dev plz0") && route.contains(&format!("src {ip}")),
            "{route}"
        );
    }
    // The mesh carries traffic both ways.
    for (i, m) in ms.iter().enumerate() {
        let other = &ips[1 - i];
        let ok = eventually(Duration::from_secs(15), || {
            m.exec("ping", &["-c1", "-W1", other])
                .status
                .success()
                .then_some(())
        });
        assert!(ok.is_some(), "machine {i} cannot ping {other}\n{}", m.log());
    }

    // Host-runtime workloads: one on each machine, on a bridge with a veth.
    let tmp = tempfile::tempdir().unwrap();
    let image = busybox_image(
        tmp.path(),
        "ployz-noip",
        &["httpd", "-f", "-p", "8080", "-h", "/www"],
    );
    let v = ms[0].deploy(&["web", "--image", image.to_str().unwrap(), "--replicas", "2"]);
    let inst = v["instances"].as_array().unwrap();
    assert_eq!(inst.len(), 2, "{v:#}");
    assert!(inst.iter().all(|i| i["state"] == "running"), "{v:#}");
    for i in inst {
        let ip = i["overlay_ip"].as_str().unwrap();
        for m in &ms {
            let body = eventually(Duration::from_secs(20), || {
                let o = m.exec("curl", &["-sf", "-m", "3", &format!("http://{ip}:8080/")]);
                o.status.success().then(|| stdout(&o))
            });
            assert_eq!(
                body.as_deref(),
                Some("hello from a ployz workload\n"),
                "{ip} over the mesh"
            );
        }
    }
    let leaver_id = ms[1].id();
    let subnet = status(&ms[1])["machine"]["subnet"]
        .as_str()
        .unwrap()
        .to_string();
    let net: std::net::Ipv4Addr = subnet.split('/').next().unwrap().parse().unwrap();
    let bridge = format!("plz{:08x}", u32::from(net));
    let link = stdout(&ms[1].exec("ip", &["-o", "link", "show", "dev", &bridge]));
    assert!(link.contains("mtu 1420") && link.contains(",UP"), "{link}");
    let ports = stdout(&ms[1].exec("ip", &["-o", "link", "show", "master", &bridge]));
    assert_eq!(ports.lines().count(), 1, "one veth on {bridge}: {ports}");
    let rules = iptables_s(&tb.hosts[1], "FORWARD");
    let tag = format!("--comment \"ployz:{bridge}\"");
    assert_eq!(
        rules.lines().filter(|r| r.contains(&tag)).count(),
        3,
        "{rules}"
    );

    // What an older ployzd left (an untagged rule for another of its
    // bridges), and a rule of the host's own.
    let add = |rule: &[&str]| {
        let o = tb.hosts[1]
            .command("iptables")
            .args(["-A", "FORWARD"])
            .args(rule)
            .output()
            .unwrap();
        assert!(o.status.success());
    };
    add(&["-o", "plz0a650500", "-j", "DROP"]);
    add(&["-i", "eth0", "-p", "tcp", "--dport", "22", "-j", "ACCEPT"]);

    let mut ms = ms;
    let r = ms[0].ctl_json(&["machine", "rm", &leaver_id]);
    assert!(
        ms[1].wait_exit(Duration::from_secs(30)).is_some(),
        "the removed machine kept running: {r:#}\n{}",
        ms[1].log()
    );
    let rules = iptables_s(&tb.hosts[1], "FORWARD");
    assert!(!rules.contains("ployz:"), "{rules}");
    assert!(!rules.contains("plz"), "{rules}");
    assert!(
        rules.contains("-A FORWARD -i eth0 -p tcp -m tcp --dport 22 -j ACCEPT"),
        "{rules}"
    );
    assert!(
        ms[1].log().contains("removed ployzd's firewall rules"),
        "{}",
        ms[1].log()
    );
}
