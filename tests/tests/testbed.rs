//! The namespace testbed itself: hosts reach each other and the root
//! namespace, a cut host is cut off, healing restores it, and dropping the
//! testbed removes everything, also when the test panics.

use ployz_tests::netns::{Host, Testbed};
use std::process::Command;

fn ping(from: &Host, to: std::net::Ipv4Addr) -> bool {
    from.command("ping")
        .args(["-c1", "-W1", &to.to_string()])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false)
}

fn forward_rules() -> String {
    let out = Command::new("iptables")
        .args(["-S", "FORWARD"])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Nothing named after `netns` or `bridge` is left: namespace, bridge, rule.
fn assert_gone(netns: &str, bridge: &str) {
    let list = Command::new("ip").args(["netns", "list"]).output().unwrap();
    assert!(
        !String::from_utf8_lossy(&list.stdout).contains(netns),
        "namespace {netns} left behind"
    );
    let link = Command::new("ip")
        .args(["link", "show", bridge])
        .output()
        .unwrap();
    assert!(!link.status.success(), "bridge {bridge} left behind");
    assert!(
        !forward_rules().contains(&format!("-i {bridge} ")),
        "FORWARD rule for {bridge} left behind"
    );
}

#[test]
fn hosts_reach_each_other_and_are_cleaned_up() {
    let (netns, bridge);
    {
        let tb = Testbed::new(3);
        netns = tb.hosts[0].netns.clone();
        bridge = tb.bridge().to_string();
        assert!(forward_rules().contains(&format!("-i {bridge} -o {bridge} -j ACCEPT")));
        assert!(ping(&tb.hosts[0], tb.hosts[2].ip));
        assert!(ping(&tb.hosts[1], tb.gateway()), "root namespace");
        tb.hosts[2].cut();
        assert!(!ping(&tb.hosts[0], tb.hosts[2].ip));
        tb.hosts[2].heal();
        assert!(ping(&tb.hosts[0], tb.hosts[2].ip));
        let out = tb.hosts[1].sh("ip -o -4 addr show dev eth0");
        let addr = String::from_utf8_lossy(&out.stdout);
        assert!(addr.contains(&format!("{}/24", tb.hosts[1].ip)), "{addr}");
    }
    assert_gone(&netns, &bridge);
}

#[test]
fn a_panicking_test_still_tears_down_its_hosts_and_processes() {
    let names = std::sync::Mutex::new(None);
    let result = std::panic::catch_unwind(|| {
        let mut tb = Testbed::new(2);
        let pid = tb.spawn(
            1,
            "sleeper",
            std::path::Path::new("/bin/sleep"),
            &["600".to_string()],
            &[],
        );
        *names.lock().unwrap() = Some((tb.hosts[1].netns.clone(), tb.bridge().to_string(), pid));
        panic!("test failure");
    });
    assert!(result.is_err());
    let (netns, bridge, pid) = names.lock().unwrap().take().expect("testbed was built");
    assert_gone(&netns, &bridge);
    // SAFETY: kill(2) with signal 0 only checks whether the pid exists.
    let alive = unsafe { libc::kill(pid as i32, 0) } == 0;
    assert!(!alive, "process {pid} outlived its testbed");
}
