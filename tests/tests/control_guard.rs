//! Workloads cannot reach ployzd's peer port (issue 18, item 10): from
//! inside an instance, the peer port of every machine (its own machine's
//! over the bridge, the others' over the mesh) is dropped, while another
//! service's instance answers; the machines themselves keep talking to each
//! other. NATS is reachable (issue 17: workloads deployed with `--nats-user`
//! use it; without credentials they are refused, tests/tests/nats_perms.rs).
//! `machine rm` takes the guard away with the other rules.

use ployz_tests::images::busybox_image;
use ployz_tests::netns::Testbed;
use ployz_tests::{eventually, stdout, Machine};
use std::time::Duration;

const PROBE: &str = "for t in $TARGETS; do \
    if nc -w 2 ${t%:*} ${t#*:} </dev/null >/dev/null 2>&1; \
    then echo \"OPEN $t\"; else echo \"CLOSED $t\"; fi; done; sleep 3600";

fn overlay_ips(m: &Machine) -> Vec<String> {
    m.ctl_json(&["machine", "ls"])["machines"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["overlay_ip"].as_str().unwrap().to_string())
        .collect()
}

#[test]
fn workloads_cannot_reach_the_control_plane() {
    let tb = Testbed::new(2);
    let mut ms = ployz_tests::cluster_on(&tb, "guardtest");
    let tmp = tempfile::tempdir().unwrap();
    let web = busybox_image(
        tmp.path(),
        "ployz-busybox",
        &["httpd", "-f", "-p", "8080", "-h", "/"],
    );
    let web = web.to_str().unwrap();
    let v = ms[0].ctl_json(&[
        "deploy",
        "service",
        "web",
        "--image",
        web,
        "--replicas",
        "2",
    ]);
    let web_ip = v["instances"][0]["overlay_ip"]
        .as_str()
        .unwrap()
        .to_string();

    let mut targets: Vec<String> = Vec::new();
    for ip in overlay_ips(&ms[0]) {
        targets.push(format!("{ip}:7101"));
        targets.push(format!("{ip}:4222"));
    }
    targets.push(format!("{web_ip}:8080"));
    let env = format!("TARGETS={}", targets.join(" "));
    ms[0].ctl_json(&[
        "deploy",
        "service",
        "probe",
        "--image",
        web,
        "--replicas",
        "2",
        "--env",
        &env,
        "--",
        "sh",
        "-c",
        PROBE,
    ]);
    let logs = eventually(Duration::from_secs(60), || {
        let o = ms[0].ctl(&["service", "logs", "probe"]);
        let s = stdout(&o);
        (s.matches("OPEN ").count() + s.matches("CLOSED ").count() == 2 * targets.len())
            .then_some(s)
    })
    .unwrap_or_else(|| {
        panic!(
            "the probes did not report: {}",
            stdout(&ms[0].ctl(&["service", "logs", "probe"]))
        )
    });
    println!("{logs}");
    for t in &targets {
        let want = if t.ends_with(":8080") || t.ends_with(":4222") {
            "OPEN"
        } else {
            "CLOSED"
        };
        assert_eq!(
            logs.matches(&format!("{want} {t}\n")).count(),
            2,
            "both instances see {t} {want}:\n{logs}"
        );
    }
    // The machines themselves still reach each other's control plane.
    for m in &ms {
        assert!(m.ctl(&["service", "ls"]).status.success());
        let rules = m.exec("iptables", &["-S", "PLOYZ-CONTROL"]);
        assert!(stdout(&rules).contains("-j DROP"), "{}", stdout(&rules));
    }
    let rtt = ms[0].ctl(&["machine", "rtt"]);
    assert!(rtt.status.success(), "{}", stdout(&rtt));

    // Leaving takes the guard away.
    let gone = ms[1].id();
    let host1 = tb.hosts[1].clone();
    ms[0].ctl_json(&["machine", "rm", &gone]);
    assert!(ms[1].wait_exit(Duration::from_secs(30)).is_some());
    let left = host1
        .command("iptables")
        .args(["-S", "INPUT"])
        .output()
        .unwrap();
    assert!(
        !stdout(&left).contains("PLOYZ-CONTROL"),
        "{}",
        stdout(&left)
    );
    let chain = host1
        .command("iptables")
        .args(["-S", "PLOYZ-CONTROL"])
        .output()
        .unwrap();
    assert!(!chain.status.success(), "the chain is deleted");
}
