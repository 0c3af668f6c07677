//! What a removed machine keeps, and what no longer works for it (issue 17,
//! SECURITY.md "A removed machine that kept its data dir"): the peer port
//! serves only current members from their overlay addresses, and `machine
//! rm` rotates the NATS credential key, so every NATS password the removed
//! machine knew is refused while the new ones work; instances given
//! `NATS_URL` (`--nats-user`) are replaced with the new credentials.

use ployz_tests::images::busybox_image;
use ployz_tests::netns::{Host, Testbed};
use ployz_tests::{bin, eventually, stderr, stdout, Machine};
use serde_json::Value;
use std::os::unix::io::AsRawFd;
use std::time::Duration;

/// Whether `user`/`password` logs in to the TLS listener `server` (trusting
/// `ca`), from inside `host`'s network namespace. `Err` carries the
/// connect error's kind.
fn nats_login(
    host: Option<&Host>,
    server: &str,
    ca: &str,
    user: &str,
    password: &str,
) -> Result<(), async_nats::ConnectErrorKind> {
    let netns = host.map(|h| format!("/run/netns/{}", h.netns));
    let (server, ca, user, password) = (
        server.to_string(),
        ca.to_string(),
        user.to_string(),
        password.to_string(),
    );
    std::thread::spawn(move || {
        if let Some(path) = netns {
            let ns = std::fs::File::open(&path).expect("the host's network namespace");
            // SAFETY: setns(2) on a file we hold open; this thread only.
            let r = unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) };
            assert_eq!(r, 0, "setns into {path}");
        }
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a runtime");
        rt.block_on(async {
            let c = async_nats::ConnectOptions::with_user_and_password(user, password)
                .tls_client_config(ployz_tests::tls_trusting(&ca))
                .connection_timeout(Duration::from_secs(3))
                .connect(&server)
                .await
                .map_err(|e| e.kind())?;
            c.flush().await.expect("a logged-in client flushes");
            Ok(())
        })
    })
    .join()
    .expect("the login thread")
}

fn refused(r: Result<(), async_nats::ConnectErrorKind>) -> bool {
    r == Err(async_nats::ConnectErrorKind::AuthorizationViolation)
}

fn overlay_ip(m: &Machine) -> String {
    m.ctl_json(&["mesh", "status"])["machine"]["overlay_ip"]
        .as_str()
        .expect("an overlay address")
        .to_string()
}

/// `ployzd peer-probe` with `dir`'s network secret, as machine `as_id`, run
/// by `cmd` (a namespace): exit code and stdout.
fn probe(
    mut cmd: std::process::Command,
    dir: &str,
    addr: &str,
    service: &str,
    as_id: &str,
) -> (Option<i32>, String) {
    let o = cmd
        .args(["--data-dir", dir, "peer-probe", "--addr", addr])
        .args(["--service", service, "--as", as_id])
        .stdin(std::process::Stdio::null())
        .output()
        .expect("run ployzd peer-probe");
    (o.status.code(), format!("{}{}", stdout(&o), stderr(&o)))
}

#[test]
fn a_force_removed_machine_that_kept_its_data_dir_is_locked_out() {
    let tb = Testbed::new(3);
    let ip0 = tb.hosts[0].ip.to_string();
    let m0 = Machine::start_in(&tb.hosts[0], &["--nats-listen", &ip0]);
    m0.ctl_json(&["mesh", "init", "locked"]);
    let mut ms = vec![m0];
    for h in &tb.hosts[1..] {
        let m = Machine::start_in(h, &[]);
        let token = ms[0].invite();
        let s = m.ctl_json(&["machine", "invite", "import", "--token", &token]);
        assert_eq!(s["machine"]["lifecycle"], "active", "{s}");
        ms.push(m);
    }
    let ids: Vec<String> = ms.iter().map(|m| m.id()).collect();
    let server = format!("tls://{ip0}:4222");
    let app = ms[0].ctl_json(&[
        "nats",
        "user",
        "add",
        "lockapp",
        "--allow-pub",
        "app.>",
        "--allow-sub",
        "app.>",
    ]);
    let app_pass = app["password"].as_str().unwrap().to_string();
    let operator = ms[0].nats_info();
    let admin = ms[0].nats_admin_info();
    let ca = operator["ca_pem"].as_str().expect("the CA").to_string();
    let pass = |v: &Value| v["password"].as_str().unwrap().to_string();
    let m2_dir = ms[2].data_dir().to_string_lossy().into_owned();
    let ployzd = bin("ployzd");
    let ployzd = ployzd.to_str().unwrap();
    let peer0_underlay = format!("{ip0}:7101");
    let peer0_overlay = format!("{}:7101", overlay_ip(&ms[0]));

    // While a member: machine 2 is admitted from its overlay address, and
    // refused from the underlay (members talk over the mesh).
    let in_m2 = |dir: &str, addr: &str, service: &str, as_id: &str| {
        let o = ms[2].exec(
            ployzd,
            &[
                "--data-dir",
                dir,
                "peer-probe",
                "--addr",
                addr,
                "--service",
                service,
                "--as",
                as_id,
            ],
        );
        (o.status.code(), format!("{}{}", stdout(&o), stderr(&o)))
    };
    let (code, out) = in_m2(&m2_dir, &peer0_overlay, "rpc", &ids[2]);
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains("admitted: read 3 machine records"), "{out}");
    let (code, out) = in_m2(&m2_dir, &peer0_overlay, "raft", &ids[2]);
    assert_eq!(code, Some(0), "{out}");
    let (code, out) = in_m2(&m2_dir, &peer0_underlay, "rpc", &ids[2]);
    assert_eq!(code, Some(3), "{out}");
    assert!(
        out.contains("not admitted") && out.contains("overlay address"),
        "{out}"
    );
    // Before the removal the old passwords work from machine 2's host.
    assert_eq!(
        nats_login(
            Some(&tb.hosts[2]),
            &server,
            &ca,
            "operator",
            &pass(&operator)
        ),
        Ok(())
    );

    // Machine 2 stops, keeping its data dir (network secret, cluster.json),
    // and is removed with --force.
    assert!(ms[2].stop().success());
    let r = ms[0].ctl_json(&["machine", "rm", "--force", &ids[2]]);
    assert_eq!(r["cleaned_up"], false, "{r}");
    assert!(std::path::Path::new(&m2_dir).join("cluster.json").exists());

    // The peer port refuses it, as itself or as a member, for rpc and raft.
    for (as_id, service) in [
        (&ids[2], "rpc"),
        (&ids[2], "raft"),
        (&ids[1], "rpc"),
        (&ids[0], "raft"),
    ] {
        let (code, out) = probe(
            tb.hosts[2].command(ployzd),
            &m2_dir,
            &peer0_underlay,
            service,
            as_id,
        );
        assert_eq!(code, Some(3), "as {as_id} over {service}: {out}");
        assert!(
            out.contains("refused") && out.contains("not admitted"),
            "{out}"
        );
        assert!(!out.contains("admitted: read"), "{out}");
    }
    let (_, out) = probe(
        tb.hosts[2].command(ployzd),
        &m2_dir,
        &peer0_underlay,
        "rpc",
        &ids[2],
    );
    assert!(out.contains(&format!("no machine `{}`", ids[2])), "{out}");
    // Logged once per source and reason, counted in the metric.
    let log = ms[0].log();
    let lines = log
        .lines()
        .filter(|l| {
            l.contains("peer connection refused") && l.contains(&format!("no machine `{}`", ids[2]))
        })
        .count();
    assert_eq!(lines, 1, "{log}");
    let metrics = stdout(&tb.hosts[0].sh("curl -s http://127.0.0.1:9101/metrics"));
    let refused_count = metrics
        .lines()
        .find_map(|l| l.strip_prefix("ployz_peer_refused_total "))
        .and_then(|v| v.trim().parse::<u64>().ok())
        .unwrap_or_else(|| panic!("no ployz_peer_refused_total: {metrics}"));
    assert!(refused_count >= 6, "{refused_count}");

    // Every NATS password it knew is refused from its host; the new ones work.
    let host2 = Some(&tb.hosts[2]);
    assert!(refused(nats_login(
        host2,
        &server,
        &ca,
        "operator",
        &pass(&operator)
    )));
    assert!(refused(nats_login(
        host2,
        &server,
        &ca,
        "ployz",
        &pass(&admin)
    )));
    assert!(refused(nats_login(
        host2, &server, &ca, "lockapp", &app_pass
    )));
    let operator2 = ms[0].nats_info();
    assert_ne!(pass(&operator2), pass(&operator));
    assert!(operator2["url"]
        .as_str()
        .unwrap()
        .starts_with("tls://operator:"));
    assert_eq!(
        nats_login(host2, &server, &ca, "operator", &pass(&operator2)),
        Ok(())
    );
    let admin2 = ms[0].nats_admin_info();
    assert_ne!(pass(&admin2), pass(&admin));
    assert_eq!(
        nats_login(None, &server, &ca, "ployz", &pass(&admin2)),
        Ok(())
    );
    // The app user's credentials are handed out again (a new password).
    let app2 = ms[0].ctl_json(&[
        "nats",
        "user",
        "add",
        "lockapp",
        "--allow-pub",
        "app.>",
        "--allow-sub",
        "app.>",
    ]);
    assert_eq!(
        nats_login(
            host2,
            &server,
            &ca,
            "lockapp",
            app2["password"].as_str().unwrap()
        ),
        Ok(())
    );
    assert!(refused(nats_login(
        host2, &server, &ca, "lockapp", &app_pass
    )));
    // The surviving machines still work together.
    assert_eq!(ms[1].machines().len(), 2);
}

/// Prints a digest of its NATS password (never the password) and whether
/// the server answered PING.
const NATS_PROBE: &str = r#"u=${NATS_URL#nats://}; cred=${u%@*}; hp=${u#*@};
user=${cred%%:*}; pass=${cred#*:}; host=${hp%:*}; port=${hp##*:};
echo "CRED $(echo "$pass" | md5sum | cut -c1-12)";
(printf 'CONNECT {"user":"%s","pass":"%s","verbose":false}\r\nPING\r\n' "$user" "$pass"; sleep 2) | nc -w 3 "$host" "$port" | tr -d '\r' | grep -v '^INFO' | sed 's/^/GOT /';
echo DONE; sleep 3600"#;

#[test]
fn a_removal_rotates_nats_credentials_and_replaces_nats_user_instances() {
    let tb = Testbed::new(2);
    let ip0 = tb.hosts[0].ip.to_string();
    let m0 = Machine::start_in(&tb.hosts[0], &["--nats-listen", &ip0]);
    m0.ctl_json(&["mesh", "init", "rotate"]);
    let server = format!("tls://{ip0}:4222");
    let operator = m0.nats_info();
    let ca = operator["ca_pem"].as_str().expect("the CA").to_string();
    let old = operator["password"].as_str().unwrap().to_string();
    let app = m0.ctl_json(&["nats", "user", "add", "rotapp", "--allow-pub", "rot.>"]);
    let app_pass = app["password"].as_str().unwrap().to_string();

    // A service with NATS credentials, placed on the only machine.
    let tmp = tempfile::tempdir().unwrap();
    let image = busybox_image(tmp.path(), "ployz-busybox", &["sleep", "3600"]);
    let image = image.to_str().unwrap();
    m0.ctl_json(&[
        "deploy",
        "service",
        "natsprobe",
        "--image",
        image,
        "--nats-user",
        "rotapp",
        "--",
        "sh",
        "-c",
        NATS_PROBE,
    ]);
    let report = |not: Option<&str>| {
        eventually(Duration::from_secs(60), || {
            let s = stdout(&m0.ctl(&["service", "logs", "natsprobe"]));
            let cred = s
                .lines()
                .find_map(|l| l.strip_prefix("CRED "))
                .map(str::to_string)?;
            (s.contains("DONE") && Some(cred.as_str()) != not).then_some((cred, s))
        })
        .unwrap_or_else(|| {
            panic!(
                "natsprobe did not report: {}",
                stdout(&m0.ctl(&["service", "logs", "natsprobe"]))
            )
        })
    };
    let (cred1, logs) = report(None);
    assert!(logs.contains("GOT PONG"), "{logs}");

    // A second machine joins, and is removed normally (it is reachable).
    let mut m1 = Machine::start_in(&tb.hosts[1], &[]);
    let token = m0.invite();
    m1.ctl_json(&["machine", "invite", "import", "--token", &token]);
    let id1 = m1.id();
    let r = m0.ctl_json(&["machine", "rm", &id1]);
    assert_eq!(r["cleaned_up"], true, "{r}");
    assert!(m1.wait_exit(Duration::from_secs(10)).is_some());

    // The operator's old URL stops working; `nats url` gives the new one.
    assert!(refused(nats_login(None, &server, &ca, "operator", &old)));
    let new = m0.nats_info();
    let new_pass = new["password"].as_str().unwrap().to_string();
    assert_ne!(new_pass, old);
    assert_eq!(
        nats_login(None, &server, &ca, "operator", &new_pass),
        Ok(())
    );
    assert!(refused(nats_login(None, &server, &ca, "rotapp", &app_pass)));
    // The instance is replaced with the new credentials, and they work.
    let (cred2, logs) = report(Some(&cred1));
    assert_ne!(cred2, cred1);
    assert!(logs.contains("GOT PONG"), "{logs}");
    let log = m0.log();
    assert!(log.contains("NATS credentials rotated"), "{log}");
    assert!(!log.contains(&old) && !log.contains(&new_pass) && !log.contains(&app_pass));
}
