//! Health checks on a real ployzd (host runtime) in a namespace host: an
//! HTTP check that passes, a TCP check that never does (unhealthy, restarted,
//! the deploy fails naming the probe), a command check run inside the
//! instance, and bad flags refused before anything is written.
//!
//! Nothing here asserts a duration: every state is polled for with a
//! generous bound, so a loaded machine only makes it slower.

use ployz_tests::images::busybox_image;
use ployz_tests::netns::Testbed;
use ployz_tests::{eventually, stderr, Machine};
use serde_json::Value;
use std::time::Duration;

const HTTPD: &[&str] = &["httpd", "-f", "-p", "8080", "-h", "/www"];

/// The one instance of `service` as `service ls --json` shows it.
fn instance(m: &Machine, service: &str) -> Value {
    let v = m.ctl_json(&["service", "ls"]);
    v["services"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["name"] == service)
        .unwrap_or_else(|| panic!("no service {service}: {v:#}"))["instances"][0]
        .clone()
}

#[test]
fn health_checks_gate_deploys_and_restart_unhealthy_instances() {
    let tb = Testbed::new(1);
    let m = Machine::start_in(&tb.hosts[0], &[]);
    m.ctl_json(&["mesh", "init", "health"]);
    let tmp = tempfile::tempdir().unwrap();
    let image = busybox_image(tmp.path(), "ployz-busybox", HTTPD);
    let image = image.to_str().unwrap();

    // Bad flags: exit 6, a message naming the flag, nothing written.
    for (flags, says) in [
        (
            vec!["--health-tcp", "8080", "--health-cmd", "true"],
            "given together",
        ),
        (
            vec!["--health-http", "/:8080", "--health-interval", "often"],
            "--health-interval `often` is not a duration",
        ),
        (vec!["--health-http", "healthz"], "does not start with /"),
        (
            vec!["--health-tcp", "8080", "--health-retries", "0"],
            "--health-retries 0",
        ),
        (vec!["--health-timeout", "1s"], "without a health check"),
    ] {
        let mut args = vec!["deploy", "service", "nope", "--image", image];
        args.extend(flags.iter().copied());
        let o = m.ctl(&args);
        assert_eq!(o.status.code(), Some(6), "{flags:?}: {}", stderr(&o));
        assert!(stderr(&o).contains(says), "{flags:?}: {}", stderr(&o));
    }
    let ls = m.ctl_json(&["service", "ls"]);
    assert_eq!(ls["services"].as_array().unwrap().len(), 0, "{ls:#}");

    // 1. An HTTP check that passes: the deploy returns once the instance is
    // healthy, and `service ls` says so.
    let v = m.deploy(&[
        "web",
        "--image",
        image,
        "--health-http",
        "/index.html:8080",
        "--health-interval",
        "1s",
        "--health-timeout",
        "3s",
        "--health-retries",
        "3",
        "--wait-secs",
        "120",
    ]);
    assert_eq!(v["instances"][0]["state"], "running", "{v:#}");
    assert_eq!(v["instances"][0]["health"], "healthy", "{v:#}");
    assert_eq!(v["health_check"]["probe"]["kind"], "http", "{v:#}");
    assert_eq!(v["health_check"]["probe"]["port"], 8080, "{v:#}");
    assert_eq!(v["health_check"]["interval_ms"], 1000, "{v:#}");
    let i = instance(&m, "web");
    assert_eq!(i["health"], "healthy", "{i:#}");
    assert_eq!(i["restarts"], 0, "{i:#}");
    let table = ployz_tests::stdout(&m.ctl(&["service", "ls"]));
    assert!(
        table.contains("HEALTH") && table.contains("healthy"),
        "{table}"
    );

    // 2. A TCP check on a port nothing listens on: the deploy fails with
    // exit 9 and the probe's output; the instance is restarted (and counted)
    // again and again.
    let out = m.ctl(&[
        "--json",
        "deploy",
        "service",
        "sick",
        "--image",
        image,
        "--health-tcp",
        "9999",
        "--health-interval",
        "1s",
        "--health-timeout",
        "2s",
        "--health-retries",
        "2",
        "--wait-secs",
        "120",
    ]);
    let progress = stderr(&out);
    assert_eq!(out.status.code(), Some(9), "{progress}");
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    let why = v["instances"][0]["error"].as_str().unwrap_or_default();
    assert!(why.contains("unhealthy"), "{v:#}");
    assert!(why.contains(":9999"), "the probe's output: {v:#}");
    let restarted = eventually(Duration::from_secs(120), || {
        let i = instance(&m, "sick");
        (i["restarts"].as_u64().unwrap_or(0) >= 2).then_some(i)
    });
    let i = restarted.unwrap_or_else(|| {
        panic!(
            "not restarted twice: {:#}\n{}",
            instance(&m, "sick"),
            m.log()
        )
    });
    // Refused at once, also after restarts: a restarted instance keeps its
    // address and its MAC, so nothing on the way still points elsewhere (a
    // new random MAC left probes unanswered until the neighbour entry aged).
    assert!(
        i["health_output"]
            .as_str()
            .is_some_and(|o| o.contains(":9999") && o.contains("refused")),
        "{i:#}"
    );
    assert_ne!(i["health"], "healthy", "{i:#}");
    assert!(m.log().contains("instance unhealthy: restarting it"));
    // The operation record says it too.
    let ops = m.ctl_json(&["op", "ls"]);
    let op = ops["operations"]
        .as_array()
        .unwrap()
        .iter()
        .find(|o| o["subject"] == "sick")
        .unwrap()
        .clone();
    assert_eq!(op["state"], "failed", "{op:#}");
    assert_eq!(op["exit_code"], 9, "{op:#}");
    m.ctl_json(&["service", "rm", "sick"]);

    // 3. A command check, run inside the instance: the file it tests exists
    // only in the instance's root, a few seconds after it starts.
    let v = m.deploy(&[
        "ready",
        "--image",
        image,
        "--health-cmd",
        "test -e /www/ready && echo ok",
        "--health-interval",
        "1s",
        "--health-timeout",
        "5s",
        "--health-start-period",
        "60s",
        "--wait-secs",
        "120",
        "--",
        "sh",
        "-c",
        "sleep 2; echo up > /www/ready; exec httpd -f -p 8080 -h /www",
    ]);
    assert_eq!(v["instances"][0]["health"], "healthy", "{v:#}");
    assert_eq!(v["health_check"]["probe"]["kind"], "cmd", "{v:#}");
    assert_eq!(
        v["health_check"]["probe"]["command"],
        "test -e /www/ready && echo ok"
    );
    assert!(
        !std::path::Path::new("/www/ready").exists(),
        "the check ran inside the instance, not on the host"
    );
    // A failing command check says what the command said.
    let (code, v) = m.try_deploy(&[
        "notready",
        "--image",
        image,
        "--health-cmd",
        "echo not-there-yet; exit 3",
        "--health-interval",
        "1s",
        "--health-retries",
        "1",
        "--wait-secs",
        "120",
    ]);
    assert_eq!(code, Some(9), "{v:#}");
    let why = v["instances"][0]["error"].as_str().unwrap_or_default();
    assert!(
        why.contains("exited with code 3") && why.contains("not-there-yet"),
        "{v:#}"
    );

    // 4. A redeploy of the healthy service rolls and waits for health again.
    let v = m.deploy(&[
        "web",
        "--image",
        image,
        "--health-tcp",
        "8080",
        "--health-interval",
        "1s",
        "--wait-secs",
        "120",
    ]);
    assert_eq!(v["generation"], 2, "{v:#}");
    assert_eq!(v["instances"][0]["health"], "healthy", "{v:#}");
    assert_eq!(v["health_check"]["probe"]["kind"], "tcp", "{v:#}");
    // And without a check, health is `none`.
    let v = m.deploy(&["web", "--image", image, "--wait-secs", "120"]);
    assert_eq!(v["instances"][0]["health"], "none", "{v:#}");
    assert_eq!(v["health_check"], Value::Null, "{v:#}");
    // 5. A rolling redeploy moves to the next instance only once the
    // replaced one is healthy: with a check that never passes, it stops at
    // the first; the other keeps running the previous generation.
    let v = m.deploy(&[
        "pair",
        "--image",
        image,
        "--replicas",
        "2",
        "--wait-secs",
        "120",
    ]);
    assert_eq!(v["instances"].as_array().unwrap().len(), 2, "{v:#}");
    let (code, v) = m.try_deploy(&[
        "pair",
        "--image",
        image,
        "--replicas",
        "2",
        "--health-cmd",
        "echo never-healthy; exit 1",
        "--health-interval",
        "1s",
        "--health-retries",
        "1",
        "--wait-secs",
        "120",
    ]);
    assert_eq!(code, Some(9), "{v:#}");
    let inst = v["instances"].as_array().unwrap();
    let old: Vec<&Value> = inst.iter().filter(|i| i["generation"] == 1).collect();
    assert_eq!(old.len(), 1, "one instance kept generation 1: {v:#}");
    assert_eq!(old[0]["state"], "running", "{v:#}");
    let failed: Vec<&Value> = inst.iter().filter(|i| i["state"] == "failed").collect();
    assert_eq!(failed.len(), 1, "{v:#}");
    assert!(
        failed[0]["error"]
            .as_str()
            .is_some_and(|e| e.contains("never-healthy")),
        "{v:#}"
    );
    for s in ["web", "ready", "notready", "pair"] {
        m.ctl_json(&["service", "rm", s]);
    }
}

#[test]
fn a_migration_waits_for_the_moved_instance_to_be_healthy() {
    let tb = Testbed::new(2);
    let ms = ployz_tests::cluster_on(&tb, "healthmig");
    let tmp = tempfile::tempdir().unwrap();
    let image = busybox_image(tmp.path(), "ployz-busybox", HTTPD);
    let v = ms[0].deploy(&[
        "moved",
        "--image",
        image.to_str().unwrap(),
        "--health-http",
        "/index.html:8080",
        "--health-interval",
        "1s",
        "--wait-secs",
        "120",
    ]);
    assert_eq!(v["instances"][0]["health"], "healthy", "{v:#}");
    let from = v["instances"][0]["machine"].as_str().unwrap().to_string();
    let to = ms.iter().map(Machine::id).find(|id| *id != from).unwrap();
    let out = ms[0].ctl(&["--json", "service", "migrate", "moved", "--to", &to]);
    assert!(
        out.status.success(),
        "migrate: {}\n{}",
        stderr(&out),
        ms[0].log()
    );
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    let inst = v["instances"].as_array().unwrap();
    assert_eq!(inst.len(), 1, "{v:#}");
    assert_eq!(inst[0]["machine"], to.as_str(), "{v:#}");
    // The source went only once the target was healthy.
    assert_eq!(inst[0]["health"], "healthy", "{v:#}");
    ms[0].ctl_json(&["service", "rm", "moved"]);
}
