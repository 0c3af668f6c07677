//! What ployzctl says, and how it exits, when the caller got something
//! wrong: one real ployzd (a namespace host where workloads run), the real
//! ployzctl.

use ployz_tests::images::busybox_image;
use ployz_tests::netns::Testbed;
use ployz_tests::{ctl_at, stderr, stdout, Machine};
use serde_json::Value;
use std::process::Command;

fn code_and_error(m: &Machine, args: &[&str]) -> (Option<i32>, String) {
    let mut a = vec!["--json"];
    a.extend_from_slice(args);
    let o = m.ctl(&a);
    let v: Value = serde_json::from_slice(&o.stdout)
        .unwrap_or_else(|_| panic!("{args:?}: {} {}", stdout(&o), stderr(&o)));
    let msg = v["error"]["message"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    (o.status.code(), msg)
}

#[test]
fn a_regular_file_is_not_a_socket_and_is_left_alone() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("not-a-socket");
    std::fs::write(&file, "keep me").unwrap();
    let out = ctl_at(&file, &["machine", "ls"]);
    assert_eq!(out.status.code(), Some(3));
    let e = stderr(&out);
    assert!(e.contains("regular file, not a socket"), "{e}");
    assert!(!e.contains("left over"), "{e}");

    let out = Command::new(ployz_tests::bin("ployzd"))
        .args(["--data-dir"])
        .arg(dir.path().join("data"))
        .arg("--socket")
        .arg(&file)
        .args(["run", "--no-mesh"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let e = stderr(&out);
    assert!(e.contains("not a socket"), "{e}");
    assert!(!e.contains("stale"), "{e}");
    assert_eq!(std::fs::read_to_string(&file).unwrap(), "keep me");
}

#[test]
fn bad_targets_and_release_outputs_are_invalid_arguments() {
    let m = Machine::start();
    m.ctl_json(&["mesh", "init", "errs"]);
    for target in ["", "root@host:99999"] {
        let (code, msg) = code_and_error(&m, &["machine", "init", target, "--network", "errs"]);
        assert_eq!(code, Some(6), "{target:?}: {msg}");
        assert!(msg.contains("invalid SSH target"), "{msg}");
    }
    let o = m.ctl(&["release", "pack", "--out", "/proc/ployz-x"]);
    assert_eq!(o.status.code(), Some(6), "{}", stderr(&o));
    assert!(stderr(&o).contains("/proc/ployz-x"), "{}", stderr(&o));
}

#[test]
fn services_refuse_what_cannot_work_and_say_why() {
    let tb = Testbed::new(1);
    let m = Machine::start_in(&tb.hosts[0], &[]);
    m.ctl_json(&["mesh", "init", "svcerrs"]);
    let tmp = tempfile::tempdir().unwrap();
    let image = busybox_image(tmp.path(), "ployz-busybox", &["sleep", "600"]);
    let image = image.to_str().unwrap();

    // The same volume twice, or the same mount point twice.
    for vols in [["data:/a", "data:/b"], ["data:/a", "logs:/a/"]] {
        let (code, msg) = code_and_error(
            &m,
            &[
                "deploy", "service", "v", "--image", image, "-v", vols[0], "-v", vols[1],
            ],
        );
        assert_eq!(code, Some(6), "{vols:?}: {msg}");
    }

    // A program the image does not have: one sentence, naming both.
    let (code, v) = m.try_deploy(&[
        "typo",
        "--image",
        image,
        "--wait-secs",
        "20",
        "--",
        "httpdd",
        "-f",
    ]);
    assert_eq!(code, Some(9), "{v:#}");
    let why = v["instances"][0]["error"].as_str().unwrap_or_default();
    assert!(why.contains("has no executable `httpdd`"), "{why}");
    assert!(why.contains(image), "names the image: {why}");
    assert!(!why.contains("root") && !why.contains("cgroups"), "{why}");
    assert_eq!(why.matches("httpdd").count(), 1, "said once: {why}");

    // Logs of a service without instances; migrate from a machine without it.
    let v = m.ctl_json(&[
        "deploy",
        "service",
        "idle",
        "--image",
        image,
        "--replicas",
        "0",
    ]);
    assert_eq!(v["instances"].as_array().map(Vec::len), Some(0), "{v:#}");
    let (code, msg) = code_and_error(&m, &["service", "logs", "idle"]);
    assert_eq!(code, Some(4), "{msg}");
    assert!(
        msg.contains("has no instances") && !msg.contains("slot"),
        "{msg}"
    );
    let id = m.id();
    let (code, msg) = code_and_error(
        &m,
        &["service", "migrate", "idle", "--to", &id, "--from", &id],
    );
    assert_eq!(code, Some(4), "{msg}");

    // service ls --json carries every key the README lists.
    let v = m.ctl_json(&["service", "ls"]);
    let typo = v["services"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["name"] == "typo")
        .unwrap();
    let inst = &typo["instances"][0];
    for k in [
        "machine",
        "slot",
        "state",
        "overlay_ip",
        "error",
        "unreachable",
        "generation",
    ] {
        assert!(inst.get(k).is_some(), "{k} missing: {inst:#}");
    }
}
