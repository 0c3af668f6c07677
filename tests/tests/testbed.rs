//! The namespace testbed itself: hosts reach each other, a cut host is cut
//! off, healing restores it, and dropping the testbed removes everything.

use ployz_tests::netns::Testbed;
use std::process::Command;

fn ping(from: &ployz_tests::netns::Host, to: std::net::Ipv4Addr) -> bool {
    from.command("ping")
        .args(["-c1", "-W1", &to.to_string()])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false)
}

#[test]
fn hosts_reach_each_other_and_are_cleaned_up() {
    let (netns, bridge);
    {
        let tb = Testbed::new(3);
        netns = tb.hosts[0].netns.clone();
        bridge = format!("{}b", tb.prefix());
        assert!(ping(&tb.hosts[0], tb.hosts[2].ip));
        tb.hosts[2].cut();
        assert!(!ping(&tb.hosts[0], tb.hosts[2].ip));
        tb.hosts[2].heal();
        assert!(ping(&tb.hosts[0], tb.hosts[2].ip));
    }
    let list = Command::new("ip").args(["netns", "list"]).output().unwrap();
    assert!(!String::from_utf8_lossy(&list.stdout).contains(&netns));
    let link = Command::new("ip")
        .args(["link", "show", &bridge])
        .output()
        .unwrap();
    assert!(!link.status.success(), "bridge {bridge} left behind");
}
