//! One real ployzd, driven through the real ployzctl: founding a network,
//! listing machines, lifecycle, invites, errors, restarts and kill -9.

use ployz_tests::{ctl_at, stderr, stdout, Machine};
use serde_json::Value;
use std::os::unix::fs::PermissionsExt;
use std::time::Duration;

fn founded() -> Machine {
    let m = Machine::start();
    m.ctl_json(&["mesh", "init", "demo"]);
    m
}

#[test]
fn founder_is_one_active_storage_machine() {
    let m = Machine::start();
    let status = m.ctl_json(&["mesh", "init", "demo", "--region", "eu-west"]);
    assert_eq!(status["network"]["name"], "demo");
    assert_eq!(status["network"]["cidr"], "10.101.0.0/16");
    assert_eq!(status["network"]["storage_replicas"], 1);
    assert_eq!(status["store"]["role"], "leader");

    // Both spellings of --json give the documented schema.
    let a = m.ctl_json(&["machine", "ls"]);
    let out = m.ctl(&["machine", "ls", "--json"]);
    assert!(out.status.success());
    let b: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(a, b);
    let list = a["machines"].as_array().unwrap();
    assert_eq!(list.len(), 1);
    let me = &list[0];
    for field in [
        "id",
        "lifecycle",
        "authority",
        "region",
        "region_role",
        "overlay_ip",
        "subnet",
        "version",
        "created_at",
    ] {
        assert!(me.get(field).is_some(), "missing {field} in {me}");
    }
    assert_eq!(me["lifecycle"], "active");
    assert_eq!(me["authority"], "storage");
    assert_eq!(me["region"], "eu-west");
    assert_eq!(me["region_role"], "primary");
    assert_eq!(me["overlay_ip"], "10.101.1.1");
    assert_eq!(me["subnet"], "10.101.1.0/24");
    assert_eq!(me["id"].as_str().unwrap().len(), 12);
    assert_eq!(me["id"], status["machine_id"]);

    let table = stdout(&m.ctl(&["machine", "ls"]));
    let header = table.lines().next().unwrap();
    for col in [
        "ID",
        "LIFECYCLE",
        "AUTHORITY",
        "REGION",
        "REGION ROLE",
        "OVERLAY IP",
        "SUBNET",
        "VERSION",
        "CREATED",
    ] {
        assert!(header.contains(col), "header {header:?} lacks {col}");
    }
    assert!(table.contains("10.101.1.0/24") && table.contains("active"));
}

#[test]
fn custom_range_and_second_init_refused() {
    let m = Machine::start();
    let s = m.ctl_json(&["mesh", "init", "lab", "--cidr", "172.20.0.0/20"]);
    assert_eq!(s["machine"]["subnet"], "172.20.1.0/24");
    let again = m.ctl(&["mesh", "init", "other"]);
    assert_eq!(again.status.code(), Some(5), "{}", stderr(&again));
    assert!(stderr(&again).contains("already belongs to network `lab`"));
    // Nothing changed.
    assert_eq!(m.machines().len(), 1);
}

#[test]
fn bad_input_is_refused_and_changes_nothing() {
    let m = Machine::start();
    let o = m.ctl(&["mesh", "init", "Bad_Name"]);
    assert_eq!(o.status.code(), Some(6));
    assert!(stderr(&o).contains("invalid network name `Bad_Name`"));
    let o = m.ctl(&["mesh", "init", "ok", "--cidr", "10.101.0.0/25"]);
    assert_eq!(o.status.code(), Some(6));
    assert!(stderr(&o).contains("/8 and /23"), "{}", stderr(&o));

    // Before any network: clear "no network" errors, exit 7.
    let o = m.ctl(&["machine", "ls"]);
    assert_eq!(o.status.code(), Some(7));
    assert!(stderr(&o).contains("not part of a network"));
    assert!(stderr(&o).contains("mesh init"));
    let o = m.ctl(&["--json", "machine", "invite", "create"]);
    assert_eq!(o.status.code(), Some(7));
    let err: Value = serde_json::from_slice(&o.stdout).expect("JSON error");
    assert_eq!(err["error"]["code"], "no_network");

    // The failed attempts left no network behind.
    let s = m.ctl_json(&["mesh", "status"]);
    assert!(s["network"].is_null());
    m.ctl_json(&["mesh", "init", "ok"]);

    let o = m.ctl(&["machine", "invite", "create", "--ttl-secs", "0"]);
    assert_eq!(o.status.code(), Some(6));
    assert!(stderr(&o).contains("--ttl-secs 0 is out of range"));
    let o = m.ctl(&["machine", "drain", "ffffffffffff"]);
    assert_eq!(o.status.code(), Some(4));
    assert!(stderr(&o).contains("no machine `ffffffffffff`"));
    let o = m.ctl(&["--json", "machine", "invite", "revoke", "inv-nope"]);
    assert_eq!(o.status.code(), Some(4));
    let err: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(err["error"]["code"], "not_found");
    assert!(err["error"]["message"]
        .as_str()
        .unwrap()
        .contains("inv-nope"));
    assert!(m.ctl_json(&["machine", "invite", "list"])["invites"]
        .as_array()
        .unwrap()
        .is_empty());
}

#[test]
fn lifecycle_transitions_persist_across_kill9() {
    let mut m = founded();
    let id = m.machines()[0]["id"].as_str().unwrap().to_string();
    let prefix = &id[..5];

    let r = m.ctl_json(&["machine", "drain", prefix]);
    assert_eq!(r["previous"], "active");
    assert_eq!(r["machine"]["lifecycle"], "draining");
    assert_eq!(r["changed"], true);
    let r = m.ctl_json(&["machine", "drain", &id]);
    assert_eq!(r["changed"], false);
    let r = m.ctl_json(&["machine", "standby", &id]);
    assert_eq!(r["machine"]["lifecycle"], "standby");
    let out = m.ctl(&["machine", "standby", &id]);
    assert!(stdout(&out).contains("already standby"), "{}", stdout(&out));

    m.kill9();
    m.restart();
    assert_eq!(m.machines()[0]["lifecycle"], "standby");
    let r = m.ctl_json(&["machine", "activate", &id]);
    assert_eq!(r["previous"], "standby");
    assert_eq!(m.machines()[0]["lifecycle"], "active");
}

#[test]
fn fifty_invites_survive_kill9_with_their_status() {
    let mut m = founded();
    let mut ids = Vec::new();
    for i in 0..50 {
        let ttl = if i == 7 { "1" } else { "600" };
        let c = m.ctl_json(&["machine", "invite", "create", "--ttl-secs", ttl]);
        let token = c["token"].as_str().unwrap();
        assert!(token.contains('.'), "token {token}");
        ids.push(c["invite_id"].as_str().unwrap().to_string());
    }
    let revoked = ids[3].clone();
    let r = m.ctl_json(&["machine", "invite", "revoke", &revoked]);
    assert_eq!(r["status"], "revoked");
    std::thread::sleep(Duration::from_millis(1200));

    m.kill9();
    m.restart();

    let list = m.ctl_json(&["machine", "invite", "list"]);
    let invites = list["invites"].as_array().unwrap();
    assert_eq!(invites.len(), 50);
    for inv in invites {
        let id = inv["invite_id"].as_str().unwrap();
        assert!(ids.iter().any(|x| x == id), "unknown invite {id}");
        let want = if id == revoked {
            "revoked"
        } else if id == ids[7] {
            "expired"
        } else {
            "active"
        };
        assert_eq!(inv["status"], want, "{inv}");
        assert!(inv["consumed_by"].is_null());
        assert!(inv.get("expires_at").is_some());
    }
    // Revoking twice is harmless and stays revoked.
    let r = m.ctl_json(&["machine", "invite", "revoke", &revoked]);
    assert_eq!(r["status"], "revoked");
}

#[test]
fn clean_stop_and_restart_keep_everything() {
    let mut m = founded();
    let before = m.machines();
    assert!(m.stop().success(), "SIGTERM exits 0; log:\n{}", m.log());
    assert!(!m.socket().exists(), "socket removed on clean stop");
    m.restart();
    assert_eq!(m.machines(), before);
}

#[test]
fn keys_and_socket_are_private() {
    let m = founded();
    let mode = |p: &std::path::Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&m.socket()), 0o600);
    assert_eq!(mode(&m.data_dir()), 0o700);
    assert_eq!(mode(&m.data_dir().join("identity.json")), 0o600);
}

#[test]
fn second_daemon_on_same_data_or_socket_is_refused() {
    let m = founded();
    let out = std::process::Command::new(ployz_tests::bin("ployzd"))
        .arg("--data-dir")
        .arg(m.data_dir())
        .arg("--socket")
        .arg(m.socket())
        .arg("run")
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(stderr(&out).contains("another ployzd"), "{}", stderr(&out));
    // The first one is unharmed.
    assert_eq!(m.machines().len(), 1);
}

#[test]
fn unprivileged_user_cannot_use_the_socket() {
    let m = founded();
    // Open the directories so only the socket's own mode stands in the way.
    for dir in [
        m.socket().parent().unwrap(),
        m.socket().parent().unwrap().parent().unwrap(),
    ] {
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    // Run ployzctl as `nobody`; the socket is root-only.
    let out = std::process::Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
        .arg(ployz_tests::bin("ployzctl"))
        .arg("--socket")
        .arg(m.socket())
        .args(["machine", "ls"])
        .output()
        .expect("setpriv (util-linux) runs");
    assert_eq!(out.status.code(), Some(3), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("permission denied"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn no_daemon_says_where_it_looked() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("nope.sock");
    let out = ctl_at(&sock, &["machine", "ls"]);
    assert_eq!(out.status.code(), Some(3));
    let e = stderr(&out);
    assert!(e.contains(&sock.display().to_string()), "{e}");
    assert!(e.contains("ployzd run"), "{e}");
    let out = ctl_at(&sock, &["--json", "machine", "ls"]);
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["error"]["code"], "no_daemon");
}
