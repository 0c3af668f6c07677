//! Provisioning end to end: real sshd and systemd in fresh Debian containers
//! (tests/src/fresh.rs), real ployzd binaries installed from a `file://`
//! release packed from the built ones, joined to a founder ployzd running on
//! this host. Needs root and docker (scripts/fresh-host-image sets it up).

use ployz_provision::provision::{
    provision_machine, update_machine, InstallSource, ProvisionError, ProvisionOptions, Step,
    UpdateError, UpdateOptions,
};
use ployz_provision::release::{host_triple, pack_release, ReleaseLocation};
use ployz_provision::ssh::{SshError, SshOptions, SshSession, SshTarget, Transport};
use ployz_tests::fresh::{self, FreshHost};
use ployz_tests::Machine;
use std::path::Path;
use std::time::{Duration, Instant};

/// The version the built ployzd reports (`ployzd --version`).
fn built_version() -> String {
    let out = std::process::Command::new(ployz_tests::bin("ployzd"))
        .arg("--version")
        .output()
        .expect("ployzd --version");
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .nth(1)
        .expect("ployzd prints `ployzd <version>`")
        .to_string()
}

/// Pack the built binaries as release `version` in `dir`.
fn pack(dir: &Path, version: &str) -> ReleaseLocation {
    let d = ployz_tests::bin("ployzd");
    let c = ployz_tests::bin("ployzctl");
    let p = pack_release(
        dir,
        version,
        &host_triple(),
        &[("ployzd", &d), ("ployzctl", &c)],
    )
    .expect("pack release");
    p.url.parse().expect("release url")
}

struct Env {
    _dir: tempfile::TempDir,
    release: ReleaseLocation,
    known_hosts: std::path::PathBuf,
    key: std::path::PathBuf,
}

fn env() -> Env {
    let key = fresh::image();
    let dir = tempfile::tempdir().expect("tempdir");
    let release = pack(&dir.path().join("release"), &built_version());
    Env {
        known_hosts: dir.path().join("known_hosts"),
        release,
        key,
        _dir: dir,
    }
}

impl Env {
    fn ssh(&self) -> SshOptions {
        let mut s = SshOptions::new(&self.known_hosts);
        s.identity = Some(self.key.clone());
        s.connect_timeout = Duration::from_secs(8);
        s
    }

    fn opts(&self, target: &str) -> ProvisionOptions {
        let mut o = ProvisionOptions::new(
            target.parse().expect("target"),
            self.ssh(),
            InstallSource::Release {
                location: self.release.clone(),
                version: "latest".into(),
            },
        );
        o.ready_timeout = Duration::from_secs(60);
        o
    }
}

/// A founder on this host, advertising the address containers reach it on.
fn founder(host: &FreshHost) -> Machine {
    let f = Machine::start_advertising(host.gateway);
    f.ctl_json(&["mesh", "init", "provtest"]);
    f
}

async fn ssh_run(env: &Env, target: &str, cmd: &str) -> String {
    let t: SshTarget = target.parse().unwrap();
    let s = SshSession::connect(&t, &env.ssh()).await.expect("ssh");
    let out = s.exec(cmd).await.expect("exec");
    s.close().await;
    out.stdout_str().trim().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn provision_one_fresh_host_in_system_mode() {
    let env = env();
    let host = FreshHost::start();
    let f = founder(&host);
    let token = f.invite();
    let target = host.root_target();

    let started = Instant::now();
    let mut steps = Vec::new();
    let p = provision_machine(&env.opts(&target), &token, |s| {
        steps.push((s, started.elapsed()))
    })
    .await
    .unwrap_or_else(|e| panic!("provision failed: {e}\nfounder log:\n{}", f.log()));
    let took = started.elapsed();
    println!("provisioned {target} in {took:?}: {steps:?}");

    assert_eq!(steps.last().map(|s| s.0), Some(Step::Done));
    assert_eq!(p.version, built_version());
    assert!(p.os.contains("bookworm"), "{}", p.os);
    assert_eq!(
        ssh_run(&env, &target, "systemctl is-active ployzd").await,
        "active"
    );
    assert_eq!(
        ssh_run(&env, &target, "systemctl is-enabled ployzd").await,
        "enabled"
    );
    let unit = host.exec_ok("cat /etc/systemd/system/ployzd.service");
    assert!(
        unit.contains(&format!("--advertise-ip {}", host.ip)),
        "{unit}"
    );
    assert_eq!(f.lifecycle_of(&p.machine_id).as_deref(), Some("active"));
    // The new machine sees the network too.
    let st = host.exec_ok("ployzctl --json mesh status");
    assert!(st.contains("provtest"), "{st}");
    // The host key was remembered on first use.
    let kh = std::fs::read_to_string(&env.known_hosts).unwrap();
    assert!(kh.starts_with(&format!("{} ssh-", host.ip)), "{kh}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn add_three_targets_one_unreachable() {
    let env = env();
    let a = FreshHost::start();
    let b = FreshHost::start();
    let f = founder(&a);
    let bad = format!("root@{}", fresh::unreachable_ip(a.gateway));
    // b is reached as an unprivileged user with passwordless sudo.
    let targets = [a.root_target(), bad.clone(), format!("ployz@{}", b.ip)];

    // Fetch once for all targets, like `machine add` does.
    let first = env.opts(&targets[0]);
    let bins = ployz_provision::provision::fetch_binaries(&first.install, &[host_triple()])
        .await
        .expect("fetch");
    let bins = std::sync::Arc::new(bins);

    let mut results = Vec::new();
    for t in &targets {
        let mut o = env.opts(t);
        o.prefetched = Some(bins.clone());
        let token = f.invite();
        let started = Instant::now();
        let r = provision_machine(&o, &token, |_| {}).await;
        println!(
            "{t}: {:?} after {:?}",
            r.as_ref().map(|p| &p.machine_id),
            started.elapsed()
        );
        results.push(r);
    }
    let ok: Vec<_> = results.iter().filter_map(|r| r.as_ref().ok()).collect();
    assert_eq!(ok.len(), 2, "two good targets join");
    for p in &ok {
        assert_eq!(f.lifecycle_of(&p.machine_id).as_deref(), Some("active"));
    }
    let e = results[1]
        .as_ref()
        .expect_err("the unreachable target fails");
    assert_eq!(e.step(), Step::Connect);
    let msg = e.to_string();
    assert!(msg.starts_with(&format!("{bad}: connect:")), "{msg}");
    assert!(matches!(
        e,
        ProvisionError::Connect {
            source: SshError::Connect { .. } | SshError::Timeout { .. },
            ..
        }
    ));
    let ls = f.ctl_json(&["machine", "ls"]);
    assert_eq!(ls["machines"].as_array().unwrap().len(), 3, "founder + 2");
    // The sudo path installed the system service all the same.
    assert_eq!(b.exec_ok("systemctl is-active ployzd").trim(), "active");
    assert_eq!(b.exec_ok("stat -c %U /usr/local/bin/ployzd").trim(), "root");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_key_missing_user_manager_and_changed_host_key_are_refused() {
    let env = env();
    let host = FreshHost::start();
    let target: SshTarget = host.root_target().parse().unwrap();

    // First contact: trusted and remembered.
    let s = SshSession::connect(&target, &env.ssh())
        .await
        .expect("first connect");
    assert_eq!(s.exec("id -u").await.unwrap().stdout_str().trim(), "0");
    s.close().await;

    // A key the host does not authorise.
    let dir = tempfile::tempdir().unwrap();
    let other = dir.path().join("other");
    let st = std::process::Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-f"])
        .arg(&other)
        .status()
        .unwrap();
    assert!(st.success());
    let mut wrong = env.ssh();
    wrong.identity = Some(other.clone());
    let e = SshSession::connect(&target, &wrong)
        .await
        .err()
        .expect("wrong key refused");
    assert!(matches!(e, SshError::AuthRejected { .. }), "{e}");
    assert!(e.to_string().contains("authorized_keys"), "{e}");
    // Provisioning with it fails at connect, naming the target.
    let mut o = env.opts(&host.root_target());
    o.ssh = wrong;
    let e = provision_machine(&o, "unused", |_| {}).await.unwrap_err();
    assert_eq!(e.step(), Step::Connect);
    assert!(
        e.to_string().starts_with(&format!("{target}: connect:")),
        "{e}"
    );

    // User mode on a minimal Debian (no pam_systemd, so no user manager):
    // refused by preflight, before anything is written.
    let mut o = env.opts(&format!("ployz@{}", host.ip));
    o.service_mode = ployz_provision::ServiceMode::User;
    let e = provision_machine(&o, "unused", |_| {}).await.unwrap_err();
    assert_eq!(e.step(), Step::Preflight, "{e}");
    assert!(e.to_string().contains("libpam-systemd"), "{e}");
    host.exec_ok(
        "test ! -e /home/ployz/.local/bin/ployzd && test ! -e /var/lib/systemd/linger/ployz",
    );

    // The machine is "reinstalled": new host key.
    host.regenerate_host_keys();
    let e = SshSession::connect(&target, &env.ssh())
        .await
        .err()
        .expect("changed key refused");
    match &e {
        SshError::HostKeyChanged(c) => {
            assert_eq!(c.host, host.ip.to_string());
            assert_ne!(c.remembered, c.offered);
            assert!(c.remembered.starts_with("SHA256:") && c.offered.starts_with("SHA256:"));
            assert_eq!(c.file, env.known_hosts);
            assert_eq!(c.line, 1);
        }
        other => panic!("expected HostKeyChanged, got {other}"),
    }
    let msg = e.to_string();
    assert!(
        msg.contains(&env.known_hosts.display().to_string()),
        "{msg}"
    );
    // Nothing was overwritten: still exactly one line for the host.
    let kh = std::fs::read_to_string(&env.known_hosts).unwrap();
    assert_eq!(kh.lines().count(), 1, "{kh}");

    // After the operator removes the line, the new key is trusted.
    std::fs::write(&env.known_hosts, "").unwrap();
    let s = SshSession::connect(&target, &env.ssh())
        .await
        .expect("re-trusted");
    s.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn update_then_rollback_of_a_broken_release() {
    let env = env();
    let host = FreshHost::start();
    let f = founder(&host);
    let target = host.root_target();
    let p = provision_machine(&env.opts(&target), &f.invite(), |_| {})
        .await
        .unwrap_or_else(|e| panic!("provision failed: {e}"));
    let version = built_version();

    // A "new" release (same binary, another name).
    let rel_dir = match env.release.clone() {
        ReleaseLocation::File(d) => d,
        other => panic!("expected a file:// release, got {other}"),
    };
    pack(&rel_dir, "99.0.0-next");
    let mut u = UpdateOptions::new(target.parse().unwrap(), env.ssh(), env.release.clone());
    u.version = "latest".into();
    u.ready_timeout = Duration::from_secs(30);
    let started = Instant::now();
    let mut steps = Vec::new();
    let up = update_machine(&u, |s| steps.push(s))
        .await
        .unwrap_or_else(|e| panic!("update: {e}"));
    println!("updated in {:?}: {up:?}", started.elapsed());
    assert_eq!(up.release, "99.0.0-next");
    assert_eq!(
        (up.old_version.as_str(), up.new_version.as_str()),
        (version.as_str(), version.as_str())
    );
    assert_eq!(up.machine_id, p.machine_id);
    assert!(steps.contains(&Step::Restart) && !steps.contains(&Step::Rollback));
    assert_eq!(
        ssh_run(&env, &target, "systemctl is-active ployzd").await,
        "active"
    );
    assert_eq!(
        host.exec_ok("ls /usr/local/bin | sort | tr '\\n' ' '")
            .trim(),
        "ployzctl ployzd",
        "no .new/.prev leftovers"
    );
    let good_sum = host.exec_ok("sha256sum /usr/local/bin/ployzd | cut -d' ' -f1");

    // A broken release: answers --version, then exits 1 as a daemon.
    let dir = tempfile::tempdir().unwrap();
    let broken = dir.path().join("ployzd");
    std::fs::write(
        &broken,
        "#!/bin/sh\nif [ \"$1\" = --version ]; then echo 'ployzd 99.1.0-broken'; exit 0; fi\necho 'broken build' >&2\nexit 1\n",
    )
    .unwrap();
    let ctl = ployz_tests::bin("ployzctl");
    pack_release(
        &rel_dir,
        "99.1.0-broken",
        &host_triple(),
        &[("ployzd", &broken), ("ployzctl", &ctl)],
    )
    .unwrap();
    u.version = "99.1.0-broken".into();
    u.ready_timeout = Duration::from_secs(8);
    let mut steps = Vec::new();
    let e = update_machine(&u, |s| steps.push(s)).await.unwrap_err();
    println!("broken update: {e}");
    assert!(steps.contains(&Step::Rollback));
    match &e {
        UpdateError::RolledBack {
            attempted,
            restored,
            journal,
            ..
        } => {
            assert_eq!(attempted, "99.1.0-broken");
            assert_eq!(restored, &version);
            assert!(journal.contains("broken build"), "{journal}");
        }
        other => panic!("expected RolledBack, got {other}"),
    }
    assert_eq!(
        ssh_run(&env, &target, "systemctl is-active ployzd").await,
        "active"
    );
    assert_eq!(
        host.exec_ok("sha256sum /usr/local/bin/ployzd | cut -d' ' -f1"),
        good_sum,
        "the previous binary is back"
    );
    assert_eq!(f.lifecycle_of(&p.machine_id).as_deref(), Some("active"));
}
