//! What `deploy` checks before it answers: that the instances it started
//! stay up (a crash loop fails the deploy with the exit code and the last
//! output, and `service ls` shows the exits), and that the image is whole
//! before anything is written (a truncated archive changes nothing).

use ployz_tests::images::busybox_image;
use ployz_tests::netns::Testbed;
use ployz_tests::{bin, eventually, stderr, stdout, Machine};
use serde_json::Value;
use std::process::Command;
use std::time::Duration;

const HTTPD: &[&str] = &["httpd", "-f", "-p", "8080", "-h", "/www"];

/// One machine founding `network` on a testbed of one host, and a busybox
/// httpd image in a temp dir (kept alive by the returned guard).
fn one_machine(network: &str) -> (Testbed, Machine, tempfile::TempDir, std::path::PathBuf) {
    let tb = Testbed::new(1);
    let m = Machine::start_in(&tb.hosts[0], &[]);
    m.ctl_json(&["mesh", "init", network]);
    let tmp = tempfile::tempdir().unwrap();
    let image = busybox_image(tmp.path(), "ployz-busybox", HTTPD);
    (tb, m, tmp, image)
}

fn services(m: &Machine) -> Vec<Value> {
    m.ctl_json(&["service", "ls"])["services"]
        .as_array()
        .unwrap()
        .clone()
}

fn deploy_op(m: &Machine, service: &str) -> Option<Value> {
    m.ctl_json(&["op", "ls"])["operations"]
        .as_array()
        .unwrap()
        .iter()
        .find(|o| o["kind"] == "deploy" && o["subject"] == service)
        .cloned()
}

#[test]
fn a_crash_looping_command_fails_the_deploy_with_its_exit_code_and_output() {
    let (_tb, m, _tmp, image) = one_machine("crashtest");
    let out = m.ctl(&[
        "--json",
        "deploy",
        "service",
        "crash",
        "--image",
        image.to_str().unwrap(),
        "--wait-secs",
        "60",
        "--",
        "sh",
        "-c",
        "echo crash-says-bye; exit 3",
    ]);
    assert_eq!(
        out.status.code(),
        Some(9),
        "stdout: {}\nstderr: {}",
        stdout(&out),
        stderr(&out)
    );
    let v: Value = serde_json::from_slice(&out.stdout).expect("the service as JSON");
    let i = &v["instances"][0];
    assert_eq!(i["state"], "failed", "{v:#}");
    let why = i["error"].as_str().unwrap_or_default();
    assert!(why.contains("exited with code 3"), "{why}");
    assert!(why.contains("crash-says-bye"), "the last output: {why}");
    assert_eq!(i["exit_code"], 3, "{v:#}");
    // The progress says it too, as it happens.
    let progress = stderr(&out);
    assert!(
        progress.contains("exited with code 3") && progress.contains("crash-says-bye"),
        "{progress}"
    );
    let op = deploy_op(&m, "crash").expect("the deploy is recorded");
    assert_eq!(op["state"], "failed", "{op:#}");
    assert_eq!(op["exit_code"], 9, "{op:#}");
    assert!(
        op["message"]
            .as_str()
            .unwrap()
            .contains("exited with code 3; last output: crash-says-bye"),
        "{op:#}"
    );

    // The machine keeps restarting it (with its backoff); `service ls` shows
    // the exits instead of a state that flips.
    let seen = eventually(Duration::from_secs(40), || {
        let s = services(&m);
        let i = s.iter().find(|s| s["name"] == "crash")?["instances"][0].clone();
        (i["exit_code"] == 3 && i["restarts"].as_u64() >= Some(1)).then_some(i)
    });
    let i = seen.unwrap_or_else(|| panic!("no restart recorded: {:#?}\n{}", services(&m), m.log()));
    assert!(i["exited_at"].as_str().unwrap().ends_with('Z'), "{i:#}");
    assert!(i.get("error").is_some(), "error is always there: {i:#}");
    let table = stdout(&m.ctl(&["service", "ls"]));
    let header = table.lines().next().unwrap();
    assert!(
        header.contains("RESTARTS") && header.contains("LAST EXIT"),
        "{table}"
    );
    // PROJECT (`-` for a service deployed alone), then SERVICE.
    let row = table
        .lines()
        .find(|l| l.split_whitespace().nth(1) == Some("crash"))
        .unwrap_or_else(|| panic!("{table}"));
    assert!(row.split_whitespace().any(|c| c == "3"), "{table}");

    // A service that stays up deploys as before, with no exit recorded.
    let v = m.deploy(&["web", "--image", image.to_str().unwrap()]);
    let i = &v["instances"][0];
    assert_eq!(i["state"], "running", "{v:#}");
    assert_eq!(i["restarts"], 0, "{v:#}");
    assert!(i["exit_code"].is_null() && i["error"].is_null(), "{v:#}");
}

#[test]
fn a_broken_image_is_refused_before_anything_is_written() {
    let (_tb, m, tmp, image) = one_machine("imgtest");
    let whole = std::fs::read(&image).unwrap();
    let blobs = m.data_dir().join("images/blobs");
    let stored = || std::fs::read_dir(&blobs).map(|d| d.count()).unwrap_or(0);
    // Cut inside the layer, and just before tar's end-of-archive marker.
    for (name, len) in [("halfway", whole.len() / 2), ("noend", whole.len() - 1024)] {
        let broken = tmp.path().join(format!("{name}.tar"));
        std::fs::write(&broken, &whole[..len]).unwrap();
        let out = m.ctl(&[
            "--json",
            "deploy",
            "service",
            name,
            "--image",
            broken.to_str().unwrap(),
        ]);
        assert_eq!(out.status.code(), Some(6), "{name}: {}", stdout(&out));
        let e: Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(e["error"]["code"], "invalid_argument", "{e:#}");
        let msg = e["error"]["message"].as_str().unwrap();
        assert!(msg.contains("truncated or corrupt"), "{msg}");
        assert!(
            msg.contains(&format!("{name}.tar")),
            "names the file: {msg}"
        );
        assert!(
            !services(&m).iter().any(|s| s["name"] == name),
            "{name} is not a service: {:#?}",
            services(&m)
        );
        let op = deploy_op(&m, name).expect("the deploy is recorded");
        assert_eq!(op["state"], "rolled_back", "{op:#}");
        assert_eq!(stored(), 0, "{name}: nothing stored");
    }

    // Something that is neither a file nor a directory is refused by the
    // daemon too (ployzctl passes a bare name that exists here as a path).
    let fifo = tmp.path().join("pipe");
    assert!(Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .unwrap()
        .success());
    let out = Command::new("timeout")
        .arg("60")
        .arg(bin("ployzctl"))
        .arg("--socket")
        .arg(m.socket())
        .args(["--json", "deploy", "service", "pipe", "--image", "pipe"])
        .current_dir(tmp.path())
        .env_remove("PLOYZ_SOCKET")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(6), "{}", stdout(&out));
    assert!(
        stdout(&out).contains("not a regular file or a directory"),
        "{}",
        stdout(&out)
    );
    assert!(!services(&m).iter().any(|s| s["name"] == "pipe"));

    // The whole archive still deploys.
    let v = m.deploy(&["web", "--image", image.to_str().unwrap()]);
    assert_eq!(v["instances"][0]["state"], "running", "{v:#}");
    assert_eq!(stored(), 2, "the archive and its metadata");
}
