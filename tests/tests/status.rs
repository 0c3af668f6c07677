//! `ployzctl status` (`doctor`), shell completions, JSON logs, and `mesh
//! init` returning only once the NATS control plane it started serves.

use ployz_tests::netns::Testbed;
use ployz_tests::{ctl_at, stdout, Machine};
use serde_json::Value;

/// `status --json` and its exit code.
fn status(m: &Machine) -> (Value, Option<i32>) {
    let out = m.ctl(&["--json", "status"]);
    let v = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|_| panic!("status: {}", String::from_utf8_lossy(&out.stderr)));
    (v, out.status.code())
}

fn check<'a>(v: &'a Value, name: &str) -> &'a Value {
    v["checks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["check"] == name)
        .unwrap_or_else(|| panic!("no check {name}: {v:#}"))
}

/// Every check ok except possibly `disk`, which depends on the box.
fn all_ok_but_disk(v: &Value) -> bool {
    v["checks"]
        .as_array()
        .unwrap()
        .iter()
        .all(|c| c["status"] == "ok" || c["check"] == "disk")
}

#[test]
fn status_of_a_lone_machine_before_and_after_founding() {
    let m = Machine::start_with(&["--log-format", "json"]);
    let (v, code) = status(&m);
    let net = check(&v, "network");
    assert_eq!(net["status"], "fail", "{v:#}");
    assert!(net["hint"].as_str().unwrap().contains("mesh init"), "{v:#}");
    assert_eq!(check(&v, "runtime")["status"], "ok", "{v:#}");
    assert!(check(&v, "disk")["message"]
        .as_str()
        .unwrap()
        .contains("free of"));
    assert_eq!(code, Some(11), "{v:#}");
    // The table names each failing check with its hint.
    let text = stdout(&m.ctl(&["doctor"]));
    assert!(
        text.contains("CHECK") && text.contains("fail network:"),
        "{text}"
    );

    m.ctl_json(&["mesh", "init", "statusnet"]);
    // Right after `mesh init`, NATS serves (no "starting" error).
    let url = m.ctl(&["--json", "nats", "url"]);
    assert!(
        url.status.success(),
        "{}",
        String::from_utf8_lossy(&url.stderr)
    );
    let (v, code) = status(&m);
    for c in ["network", "store", "nats", "runtime"] {
        assert_eq!(check(&v, c)["status"], "ok", "{v:#}");
    }
    assert_eq!(
        code == Some(0),
        v["checks"]
            .as_array()
            .unwrap()
            .iter()
            .all(|c| c["status"] == "ok")
    );

    // `--log-format json`: every line of the log is a JSON object.
    let log = m.log();
    let lines: Vec<&str> = log.lines().filter(|l| !l.trim().is_empty()).collect();
    assert!(!lines.is_empty());
    for l in &lines {
        let j: Value = serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}"));
        assert!(j["level"].is_string() && j["timestamp"].is_string(), "{l}");
    }
    assert!(log.contains("founded network"), "{log}");

    // No daemon: the first check fails and ployzctl exits 3.
    let dir = tempfile::tempdir().unwrap();
    let none = ctl_at(&dir.path().join("none.sock"), &["status"]);
    assert_eq!(none.status.code(), Some(3));
    assert!(stdout(&none).contains("daemon  fail"), "{}", stdout(&none));
}

#[test]
fn status_across_a_mesh_names_a_dead_peer() {
    let tb = Testbed::new(2);
    let mut ms = ployz_tests::cluster_on(&tb, "statusmesh");
    let peer = ms[1].id();
    let ok = ployz_tests::eventually(std::time::Duration::from_secs(30), || {
        let (v, code) = status(&ms[0]);
        all_ok_but_disk(&v).then_some((v, code))
    });
    let (v, code) = ok.unwrap_or_else(|| panic!("{:#}", status(&ms[0]).0));
    println!("{}", stdout(&ms[0].ctl(&["status"])));
    assert_eq!(check(&v, &format!("mesh {peer}"))["status"], "ok", "{v:#}");
    let clock = check(&v, &format!("clock {peer}"));
    assert!(
        clock["message"].as_str().unwrap().contains(" ms against"),
        "{v:#}"
    );
    if check(&v, "disk")["status"] == "ok" {
        assert_eq!(code, Some(0), "{v:#}");
    }

    ms[1].kill9();
    println!("{}", stdout(&ms[0].ctl(&["status"])));
    let (v, code) = status(&ms[0]);
    let clock = check(&v, &format!("clock {peer}"));
    assert_eq!(clock["status"], "warn", "{v:#}");
    assert!(clock["hint"].as_str().unwrap().contains(&peer), "{v:#}");
    assert_eq!(code, Some(11), "{v:#}");
    // The founder still holds the store alone (the peer never voted).
    assert_eq!(check(&v, "store")["status"], "ok", "{v:#}");
}

#[test]
fn completions_for_each_shell() {
    let m = ployz_tests::bin("ployzctl");
    for (shell, marker) in [
        ("bash", "complete -F"),
        ("zsh", "#compdef ployzctl"),
        ("fish", "complete -c ployzctl"),
    ] {
        let out = std::process::Command::new(&m)
            .args(["completions", shell])
            .output()
            .unwrap();
        assert!(out.status.success(), "{shell}");
        let script = String::from_utf8_lossy(&out.stdout);
        assert!(script.contains(marker), "{shell}: {script}");
        assert!(
            script.contains("migrate"),
            "{shell}: subcommands are completed"
        );
    }
    let bad = std::process::Command::new(&m)
        .args(["completions", "tcsh"])
        .output()
        .unwrap();
    assert_eq!(bad.status.code(), Some(2));
}

/// `GET /metrics` from inside a host's namespace (ployzd listens on the
/// namespace's own loopback).
fn scrape(tb: &Testbed, host: usize, path: &str) -> String {
    let out = tb.hosts[host]
        .command("curl")
        .args(["-sS", "-i", "--max-time", "10"])
        .arg(format!("http://127.0.0.1:9101{path}"))
        .output()
        .expect("curl");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn metrics_pass_promtool_and_cover_each_subsystem() {
    let tb = Testbed::new(2);
    let ms = ployz_tests::cluster_on(&tb, "metricsnet");
    let peer = ms[1].id();
    // A write and a read, so the latency histograms have samples.
    ms[0].ctl_json(&["machine", "drain", &peer]);
    ms[0].ctl_json(&["machine", "activate", &peer]);
    let families = [
        "ployz_build_info{".to_string(),
        "ployz_raft_term ".into(),
        "ployz_raft_is_leader 1".into(),
        "ployz_raft_applied_index ".into(),
        "ployz_store_write_duration_seconds_bucket{".into(),
        "ployz_store_read_duration_seconds_count ".into(),
        "ployz_raft_append_duration_seconds_bucket{".into(),
        "ployz_raft_apply_duration_seconds_count ".into(),
        "ployz_store_fsync_duration_seconds_sum ".into(),
        "ployz_store_queue_duration_seconds_count ".into(),
        "ployz_store_propose_duration_seconds_bucket{".into(),
        "ployz_store_group_size_count ".into(),
        "ployz_store_keys{bucket=\"machines\"} 2".into(),
        "ployz_store_disk_bytes ".into(),
        "ployz_nats_connections ".into(),
        "ployz_nats_routes 1".into(),
        "ployz_nats_received_messages_total ".into(),
        "ployz_nats_sent_bytes_total ".into(),
        "ployz_nats_slow_consumers_total 0".into(),
        "ployz_mesh_up 1".into(),
        format!("ployz_mesh_peer_received_bytes_total{{peer=\"{peer}\"}}"),
        format!("ployz_mesh_peer_handshake_age_seconds{{peer=\"{peer}\"}}"),
        format!("ployz_mesh_peer_rtt_median_seconds{{peer=\"{peer}\"}}"),
        "ployz_instances{state=\"running\"} 0".into(),
        "ployz_operations{kind=\"deploy\",state=\"running\"} 0".into(),
    ];
    // Routes and RTT samples take a moment after the join.
    let text = ployz_tests::eventually(std::time::Duration::from_secs(30), || {
        let r = scrape(&tb, 0, "/metrics");
        families.iter().all(|f| r.contains(f.as_str())).then_some(r)
    })
    .unwrap_or_else(|| {
        let r = scrape(&tb, 0, "/metrics");
        let missing: Vec<&String> = families
            .iter()
            .filter(|f| !r.contains(f.as_str()))
            .collect();
        panic!("missing {missing:?}:\n{r}")
    });
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    let body = text.split("\r\n\r\n").nth(1).unwrap().to_string();
    // promtool (Prometheus 2) lints the exposition text.
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("metrics.txt");
    std::fs::write(&file, &body).unwrap();
    let lint = std::process::Command::new("sh")
        .arg("-c")
        .arg(format!("promtool check metrics < {}", file.display()))
        .output()
        .expect("promtool (Debian package prometheus)");
    assert!(
        lint.status.success(),
        "promtool: {}{}\n{body}",
        String::from_utf8_lossy(&lint.stdout),
        String::from_utf8_lossy(&lint.stderr)
    );
    // Anything else is a 404 that says where the metrics are.
    assert!(scrape(&tb, 0, "/").starts_with("HTTP/1.1 404"));
}
