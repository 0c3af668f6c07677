//! `ployzctl machine init` / `machine add` end to end through the CLI: the
//! daemon provisions fresh Debian containers (systemd + sshd) over SSH from
//! a release location made with `ployzctl release pack`.

use ployz_tests::fresh::{self, FreshHost};
use ployz_tests::{stderr, stdout, Machine};
use serde_json::Value;

#[test]
fn init_one_host_then_add_three_with_one_bad() {
    let key = fresh::image();
    let key = key.to_str().unwrap();
    let a = FreshHost::start();
    let b = FreshHost::start();
    let c = FreshHost::start();
    let f = Machine::start_advertising(a.gateway);
    f.ctl_json(&["mesh", "init", "clitest"]);

    // An offline release location, as an air-gapped operator would make it.
    let dir = tempfile::tempdir().unwrap();
    let out = std::process::Command::new(ployz_tests::bin("ployzctl"))
        .args(["--json", "release", "pack", "--out"])
        .arg(dir.path().join("release"))
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let packed: Value = serde_json::from_slice(&out.stdout).unwrap();
    let url = packed["url"].as_str().unwrap().to_string();
    assert!(url.starts_with("file://"), "{url}");

    // A wrong network name is refused before anything is touched.
    let o = f.ctl(&[
        "machine",
        "init",
        &a.root_target(),
        "--network",
        "other",
        "--release-url",
        &url,
        "--identity",
        key,
    ]);
    assert_eq!(o.status.code(), Some(6), "{}", stderr(&o));
    assert!(stderr(&o).contains("does not match"), "{}", stderr(&o));

    let started = std::time::Instant::now();
    let o = f.ctl(&[
        "--json",
        "machine",
        "init",
        &a.root_target(),
        "--network",
        "clitest",
        "--runtime",
        "host",
        "--service-mode",
        "system",
        "--install-source",
        "release",
        "--install-version",
        "latest",
        "--release-url",
        &url,
        "--identity",
        key,
    ]);
    println!("machine init took {:?}", started.elapsed());
    assert!(
        o.status.success(),
        "{}\n{}\nfounder log:\n{}",
        stdout(&o),
        stderr(&o),
        f.log()
    );
    // Live progress went to stderr, step by step.
    let progress = stderr(&o);
    for step in ["connect", "preflight", "upload", "start", "join"] {
        assert!(
            progress.contains(&format!("] {step}")),
            "no {step} progress: {progress}"
        );
    }
    // Not a terminal: each binary's upload is one line with its size (no
    // byte counts filling the log).
    for bin in ["ployzd", "ployzctl"] {
        let lines: Vec<&str> = progress
            .lines()
            .filter(|l| l.contains(&format!("] upload {bin}")))
            .collect();
        assert!(
            lines.len() == 1 && lines[0].ends_with("iB)"),
            "upload lines of {bin}: {lines:?}\n{progress}"
        );
    }
    let r: Value = serde_json::from_slice(&o.stdout).unwrap();
    let id = r["results"][0]["machine"].as_str().unwrap().to_string();
    assert_eq!(a.exec_ok("systemctl is-active ployzd").trim(), "active");
    assert_eq!(f.lifecycle_of(&id).as_deref(), Some("active"));
    // Visible from the new machine's side too.
    let theirs = a.exec_ok("ployzctl --json machine ls");
    assert!(
        theirs.contains(&id) && theirs.contains("\"active\""),
        "{theirs}"
    );

    // update through the CLI: a new release (the same build under a new
    // name) is installed, restarted and reported; the machine stays active.
    let out = std::process::Command::new(ployz_tests::bin("ployzctl"))
        .args([
            "--json",
            "release",
            "pack",
            "--version",
            "0.1.0-next",
            "--out",
        ])
        .arg(dir.path().join("release"))
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let o = f.ctl(&[
        "--json",
        "machine",
        "update",
        "--version",
        "0.1.0-next",
        "--release-url",
        &url,
        "--identity",
        key,
        &id,
    ]);
    assert!(o.status.success(), "{}\n{}", stdout(&o), stderr(&o));
    let r: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(r["results"][0]["ok"], true, "{r}");
    assert!(
        r["results"][0]["message"]
            .as_str()
            .unwrap()
            .contains("0.1.0-next"),
        "{r}"
    );
    // The founder itself was not provisioned over SSH: a clear per-machine refusal.
    let o = f.ctl(&[
        "--json",
        "machine",
        "update",
        "--release-url",
        &url,
        "--identity",
        key,
    ]);
    assert_eq!(o.status.code(), Some(9), "{}", stderr(&o));
    let r: Value = serde_json::from_slice(&o.stdout).unwrap();
    let refused: Vec<&Value> = r["results"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|x| x["ok"] == false)
        .collect();
    assert_eq!(refused.len(), 1, "{r}");
    assert!(
        refused[0]["message"]
            .as_str()
            .unwrap()
            .contains("not provisioned over SSH"),
        "{r}"
    );
    assert_eq!(f.lifecycle_of(&id).as_deref(), Some("active"));

    // add: two good targets and one unreachable one.
    let bad = format!("root@{}", fresh::unreachable_ip(a.gateway));
    let o = f.ctl(&[
        "--json",
        "machine",
        "add",
        "--network",
        "clitest",
        "--release-url",
        &url,
        "--identity",
        key,
        &b.root_target(),
        &bad,
        &c.root_target(),
    ]);
    assert_eq!(
        o.status.code(),
        Some(9),
        "partial failure exits 9: {}",
        stderr(&o)
    );
    let r: Value = serde_json::from_slice(&o.stdout).unwrap();
    let results = r["results"].as_array().unwrap();
    assert_eq!(results.len(), 3);
    assert_eq!(results[0]["ok"], true, "{r}");
    assert_eq!(results[2]["ok"], true, "{r}");
    assert_eq!(results[1]["ok"], false);
    assert_eq!(results[1]["step"], "connect");
    assert_eq!(results[1]["target"], bad.as_str());
    assert!(
        results[1]["message"].as_str().unwrap().contains(&bad),
        "{r}"
    );
    let ls = f.ctl_json(&["machine", "ls"]);
    assert_eq!(ls["machines"].as_array().unwrap().len(), 4, "{ls}");
    // rm of a provisioned machine: it stops, forgets the network and takes
    // out what `machine add` installed (unit and binaries).
    let b_id = results[0]["machine"].as_str().unwrap().to_string();
    let r = f.ctl_json(&["machine", "rm", &b_id]);
    assert_eq!(r["cleaned_up"], true, "{r}");
    let gone = ployz_tests::eventually(std::time::Duration::from_secs(15), || {
        let o = b.exec("test -e /etc/systemd/system/ployzd.service || test -e /usr/local/bin/ployzd || systemctl is-active --quiet ployzd");
        (!o.status.success()).then_some(())
    });
    assert!(
        gone.is_some(),
        "unit/binary/daemon left on the removed host: {}",
        b.exec_ok(
            "ls -la /usr/local/bin /etc/systemd/system; systemctl status ployzd --no-pager || true"
        )
    );
    assert!(!b
        .exec_ok("ls /var/lib/ployz 2>/dev/null || true")
        .contains("identity.json"));

    // The failed target's invite did not linger.
    let invites = f.ctl_json(&["machine", "invite", "list"]);
    assert!(
        invites["invites"]
            .as_array()
            .unwrap()
            .iter()
            .all(|i| i["status"] != "active"),
        "{invites}"
    );
}
