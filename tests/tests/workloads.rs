//! Services on real ployzd machines: deploy with lifecycle-aware placement,
//! reachability over the mesh, drain/standby with running workloads,
//! migration with a volume, removal of a machine running workloads, and the
//! docker runtime against the real dockerd.

use ployz_tests::images::busybox_image;
use ployz_tests::netns::Testbed;
use ployz_tests::{eventually, stderr, stdout, Machine};
use serde_json::Value;
use std::collections::HashSet;
use std::time::Duration;

const HTTPD: &[&str] = &["httpd", "-f", "-p", "8080", "-h", "/www"];

/// `(machine, state, overlay_ip)` of each instance of `service`.
fn instances(m: &Machine, service: &str) -> Vec<(String, String, String)> {
    let v = m.ctl_json(&["service", "ls"]);
    v["services"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|s| s["name"] == service)
        .flat_map(|s| s["instances"].as_array().unwrap().clone())
        .map(|i| {
            (
                i["machine"].as_str().unwrap().to_string(),
                i["state"].as_str().unwrap().to_string(),
                i["overlay_ip"].as_str().unwrap_or("").to_string(),
            )
        })
        .collect()
}

/// GET http://ip:8080/path from inside machine `m`'s namespace.
fn http_get(m: &Machine, ip: &str, path: &str) -> Option<String> {
    let o = m.exec(
        "curl",
        &["-sf", "-m", "3", &format!("http://{ip}:8080{path}")],
    );
    o.status.success().then(|| stdout(&o))
}

#[test]
fn services_follow_lifecycle_migrate_with_volumes_and_leave_with_their_machine() {
    let tb = Testbed::new(3);
    let ms = ployz_tests::cluster_on(&tb, "svctest");
    let ids: Vec<String> = ms.iter().map(Machine::id).collect();
    let tmp = tempfile::tempdir().unwrap();
    let image = busybox_image(tmp.path(), "ployz-busybox", HTTPD);
    let image = image.to_str().unwrap();

    // 1. Two replicas, both running, on two different active machines, each
    // reachable over the mesh from every other machine.
    let v = ms[0].deploy(&["web", "--image", image, "--replicas", "2"]);
    let inst = v["instances"].as_array().unwrap();
    assert_eq!(inst.len(), 2, "{v:#}");
    assert!(inst.iter().all(|i| i["state"] == "running"), "{v:#}");
    let on: HashSet<&str> = inst
        .iter()
        .map(|i| i["machine"].as_str().unwrap())
        .collect();
    assert_eq!(on.len(), 2, "replicas spread over two machines: {v:#}");
    assert!(v["digest"].as_str().unwrap().starts_with("sha256:"));
    for i in inst {
        let ip = i["overlay_ip"].as_str().unwrap();
        let host = i["machine"].as_str().unwrap();
        let subnet_of = |id: &str| {
            ms[0].ctl_json(&["machine", "ls"])["machines"]
                .as_array()
                .unwrap()
                .iter()
                .find(|m| m["id"] == id)
                .unwrap()["subnet"]
                .as_str()
                .unwrap()
                .to_string()
        };
        let subnet = subnet_of(host);
        let prefix = subnet.rsplit_once('.').unwrap().0;
        assert!(ip.starts_with(&format!("{prefix}.")), "{ip} is in {subnet}");
        for (k, m) in ms.iter().enumerate() {
            let body = eventually(Duration::from_secs(20), || http_get(m, ip, "/"));
            assert_eq!(
                body.as_deref(),
                Some("hello from a ployz workload\n"),
                "machine {k} cannot reach {ip} (on {host}) over the mesh"
            );
        }
        // The workload bridge has the mesh's MTU, and only the cluster's
        // range may forward into it.
        let m = ms.iter().find(|m| m.id() == host).unwrap();
        let links = stdout(&m.exec("ip", &["-o", "link", "show", "type", "bridge"]));
        let bridge = links
            .lines()
            .find(|l| l.contains(": plz"))
            .unwrap_or_else(|| panic!("no workload bridge on {host}: {links}"));
        assert!(bridge.contains("mtu 1420"), "{bridge}");
        let rules = stdout(&m.exec("iptables", &["-S", "FORWARD"]));
        let cluster = ms[0].ctl_json(&["mesh", "status"])["network"]["cidr"]
            .as_str()
            .map(String::from);
        assert!(
            rules.lines().any(|r| cluster
                .as_deref()
                .is_some_and(|c| r.contains(&format!("-s {c} -o plz")))),
            "{cluster:?}: {rules}"
        );
        assert!(
            rules
                .lines()
                .any(|r| r.contains("-o plz") && r.ends_with("-j DROP")),
            "{rules}"
        );
    }

    // Logs of every instance, fetched from the machines that run them.
    let logs = ms[2].ctl_json(&["service", "logs", "web"]);
    let li = logs["instances"].as_array().unwrap();
    assert_eq!(li.len(), 2, "{logs:#}");
    assert!(li.iter().all(|i| i.get("error").is_none()), "{logs:#}");

    // A redeploy rolls, one instance at a time: at every moment one of the
    // two answers, and both end up serving the new page.
    let ips: Vec<String> = instances(&ms[0], "web")
        .into_iter()
        .map(|(_, _, ip)| ip)
        .collect();
    // `deploy service web` with a new command (2 replicas).
    let redeploy = |cmd: &str| -> Vec<String> {
        [
            "deploy",
            "service",
            "web",
            "--image",
            image,
            "--replicas",
            "2",
            "--wait-secs",
            "60",
            "--",
            "sh",
            "-c",
            cmd,
        ]
        .map(String::from)
        .to_vec()
    };
    let page =
        |text: &str| format!("echo {text} > /www/index.html && exec httpd -f -p 8080 -h /www");
    let args = redeploy(&page("v2"));
    let (out, gaps, samples) = std::thread::scope(|sc| {
        let d = sc.spawn(|| {
            let a: Vec<&str> = args.iter().map(String::as_str).collect();
            ms[0].ctl(&a)
        });
        let (mut gaps, mut samples) = (0, 0);
        while !d.is_finished() {
            samples += 1;
            if !ips.iter().any(|ip| http_get(&ms[0], ip, "/").is_some()) {
                gaps += 1;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        (d.join().unwrap(), gaps, samples)
    });
    let progress = stderr(&out);
    assert!(out.status.success(), "{progress}");
    assert_eq!(
        progress.matches("running generation").count(),
        2,
        "{progress}"
    );
    assert_eq!(
        gaps, 0,
        "no instance answered in {gaps} of {samples} samples:\n{progress}"
    );
    for ip in &ips {
        assert_eq!(http_get(&ms[0], ip, "/").as_deref(), Some("v2\n"), "{ip}");
    }
    // A redeploy whose instances crash stops after the first: the other
    // keeps serving the previous page, and the deploy exits 9.
    let args = redeploy("exit 1");
    let a: Vec<&str> = args.iter().map(String::as_str).collect();
    let bad = ms[0].ctl(&a);
    let progress = stderr(&bad);
    assert_eq!(bad.status.code(), Some(9), "{progress}");
    assert!(progress.contains("rollout stopped at slot"), "{progress}");
    assert!(
        progress.contains("1 instance(s) still run an older generation"),
        "{progress}"
    );
    let serving: Vec<_> = ips
        .iter()
        .filter_map(|ip| http_get(&ms[0], ip, "/"))
        .collect();
    assert_eq!(serving, ["v2\n"], "{progress}");
    // And a good redeploy puts both back.
    let args = redeploy(&page("hello from a ployz workload"));
    let a: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = ms[0].ctl(&a);
    assert!(
        out.status.success(),
        "{}\n{}\n{}",
        stderr(&out),
        stdout(&out),
        stdout(&ms[0].ctl(&["service", "ls"]))
    );
    for ip in &ips {
        let body = eventually(Duration::from_secs(20), || http_get(&ms[0], ip, "/"));
        assert_eq!(
            body.as_deref(),
            Some("hello from a ployz workload\n"),
            "{ip}"
        );
    }

    // 2. Drain a machine running a replica (not the founder: it is the only
    // storage machine, and it is removed at the end).
    let busy_inst = inst
        .iter()
        .find(|i| i["machine"] != ids[0].as_str())
        .unwrap();
    let busy = busy_inst["machine"].as_str().unwrap().to_string();
    let busy_ip = busy_inst["overlay_ip"].as_str().unwrap().to_string();
    ms[0].ctl_json(&["machine", "drain", &busy]);
    let v = ms[0].deploy(&["api", "--image", image, "--replicas", "3"]);
    let api_on: Vec<&str> = v["instances"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["machine"].as_str().unwrap())
        .collect();
    assert_eq!(api_on.len(), 3, "{v:#}");
    assert!(
        !api_on.contains(&busy.as_str()),
        "a new deploy landed on draining machine {busy}: {v:#}"
    );
    // Its running workload stays.
    assert!(instances(&ms[0], "web")
        .iter()
        .any(|(m, s, _)| *m == busy && s == "running"));
    assert!(http_get(&ms[0], &busy_ip, "/").is_some());

    // Standby without --force names the workload; with --force it proceeds.
    let o = ms[0].ctl(&["machine", "standby", &busy]);
    assert_eq!(o.status.code(), Some(5), "standby refused: {}", stderr(&o));
    assert!(stderr(&o).contains("web"), "{}", stderr(&o));
    let r = ms[0].ctl_json(&["machine", "standby", "--force", &busy]);
    assert_eq!(r["machine"]["lifecycle"], "standby", "{r:#}");
    assert!(
        http_get(&ms[0], &busy_ip, "/").is_some(),
        "standby keeps it running"
    );

    // 3. A volume moves with its service.
    ms[0].ctl_json(&["service", "rm", "api"]);
    let v = ms[0].deploy(&[
        "db",
        "--image",
        image,
        "-v",
        "data:/www",
        "--",
        "httpd",
        "-f",
        "-p",
        "8080",
        "-h",
        "/www",
    ]);
    let src = v["instances"][0]["machine"].as_str().unwrap().to_string();
    let src_ip = v["instances"][0]["overlay_ip"]
        .as_str()
        .unwrap()
        .to_string();
    let src_idx = ids.iter().position(|i| *i == src).unwrap();
    assert_ne!(src, busy, "standby machine takes no placement");
    let payload: String = (0..2000)
        .map(|i| char::from(b'a' + (i * 7 % 26) as u8))
        .collect();
    std::fs::write(ms[src_idx].data_dir().join("volumes/data/f"), &payload).unwrap();
    assert_eq!(
        http_get(&ms[0], &src_ip, "/f").as_deref(),
        Some(payload.as_str())
    );
    let dst_idx = (0..3).find(|i| ids[*i] != src && ids[*i] != busy).unwrap();
    let out = ms[0].ctl(&["--json", "service", "migrate", "db", "--to", &ids[dst_idx]]);
    assert!(
        out.status.success(),
        "migrate: {}\n{}",
        stderr(&out),
        ms[0].log()
    );
    let progress = stderr(&out);
    assert!(
        progress.contains("sha256:"),
        "progress shows the checksum: {progress}"
    );
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    let inst = v["instances"].as_array().unwrap();
    assert_eq!(inst.len(), 1, "{v:#}");
    assert_eq!(inst[0]["machine"], ids[dst_idx].as_str());
    assert_eq!(inst[0]["state"], "running");
    let dst_ip = inst[0]["overlay_ip"].as_str().unwrap();
    assert_eq!(
        std::fs::read_to_string(ms[dst_idx].data_dir().join("volumes/data/f")).unwrap(),
        payload
    );
    let got = eventually(Duration::from_secs(10), || http_get(&ms[0], dst_ip, "/f"));
    assert_eq!(
        got.as_deref(),
        Some(payload.as_str()),
        "same bytes on the target"
    );
    let gone = eventually(Duration::from_secs(20), || {
        http_get(&ms[0], &src_ip, "/f").is_none().then_some(())
    });
    assert!(gone.is_some(), "the source no longer serves it");
    assert!(!instances(&ms[0], "db").iter().any(|(m, _, _)| *m == src));

    // A migration to a non-active machine is refused and changes nothing.
    let o = ms[0].ctl(&["service", "migrate", "db", "--to", &busy]);
    assert_eq!(o.status.code(), Some(5), "{}", stderr(&o));
    assert!(stderr(&o).contains("standby"), "{}", stderr(&o));
    assert_eq!(instances(&ms[0], "db")[0].1, "running");

    // A machine that stops answering: `service ls` elsewhere flags its
    // instances (their state is only the last reported), until it is back.
    let k = (1..ms.len())
        .find(|&k| instances(&ms[0], "db").iter().any(|(m, _, _)| *m == ids[k]))
        .or_else(|| {
            (1..ms.len()).find(|&k| {
                instances(&ms[0], "web")
                    .iter()
                    .any(|(m, _, _)| *m == ids[k])
            })
        })
        .expect("an instance on a machine other than the one asked");
    let (asker, cut_id) = (&ms[0], ids[k].clone());
    let flagged = |want: bool| {
        let v = asker.ctl_json(&["service", "ls"]);
        let all: Vec<Value> = v["services"]
            .as_array()?
            .iter()
            .flat_map(|s| s["instances"].as_array().cloned().unwrap_or_default())
            .filter(|i| i["machine"] == cut_id.as_str())
            .collect();
        (!all.is_empty() && all.iter().all(|i| i["unreachable"] == want)).then_some(())
    };
    tb.hosts[k].cut();
    let seen = eventually(Duration::from_secs(40), || flagged(true));
    let table = stdout(&ms[0].ctl(&["service", "ls"]));
    tb.hosts[k].heal();
    assert!(
        seen.is_some(),
        "instances on cut machine {} not flagged",
        ids[k]
    );
    assert!(table.contains("(machine unreachable)"), "{table}");
    assert!(
        eventually(Duration::from_secs(40), || flagged(false)).is_some(),
        "instances on {} still flagged after heal",
        ids[k]
    );

    // 4. Removing a machine stops its workloads and drops its placements.
    let r = ms[0].ctl_json(&["machine", "rm", &busy]);
    assert_eq!(r["cleaned_up"], true, "{r:#}");
    assert!(!instances(&ms[0], "web").iter().any(|(m, _, _)| *m == busy));
    let down = eventually(Duration::from_secs(20), || {
        http_get(&ms[0], &busy_ip, "/").is_none().then_some(())
    });
    assert!(down.is_some(), "the removed machine's workload is stopped");

    // Bad input changes nothing.
    let o = ms[0].ctl(&["deploy", "service", "Bad_Name", "--image", image]);
    assert_eq!(o.status.code(), Some(6), "{}", stderr(&o));
    let o = ms[0].ctl(&["deploy", "service", "x", "--image", "./missing.tar"]);
    assert_eq!(o.status.code(), Some(6), "{}", stderr(&o));
    let o = ms[0].ctl(&["deploy", "service", "x", "--image", image, "-e", "NOPE"]);
    assert_eq!(o.status.code(), Some(6), "{}", stderr(&o));
    assert!(!ms[0].ctl_json(&["service", "ls"])["services"]
        .as_array()
        .unwrap()
        .iter()
        .any(|s| s["name"] == "x"));

    // service rm removes it everywhere.
    let r = ms[0].ctl_json(&["service", "rm", "web"]);
    assert!(r["pending_on"].as_array().unwrap().is_empty(), "{r:#}");
    assert!(instances(&ms[0], "web").is_empty());
}

/// Removes what this test created in the root namespace, also on failure:
/// the machine first (with its containers, so the network can go), then
/// its docker network and every iptables rule tagged with it.
struct DockerGuard {
    machine: Option<Machine>,
    network: String,
}

impl Drop for DockerGuard {
    fn drop(&mut self) {
        drop(self.machine.take());
        let _ = std::process::Command::new("docker")
            .args(["network", "rm", &self.network])
            .output();
        let tag = format!("\"ployz:{}\"", self.network);
        for chain in ["DOCKER-USER", "FORWARD"] {
            let Ok(o) = std::process::Command::new("iptables")
                .args(["-S", chain])
                .output()
            else {
                continue;
            };
            for rule in stdout(&o).lines().filter(|l| l.contains(&tag)) {
                let Some(spec) = rule.strip_prefix("-A ") else {
                    continue;
                };
                let _ = std::process::Command::new("sh")
                    .args(["-c", &format!("iptables -w -D {spec}")])
                    .output();
            }
        }
    }
}

fn docker_networks() -> String {
    let o = std::process::Command::new("docker")
        .args(["network", "ls", "--format", "{{.Name}}"])
        .output()
        .unwrap();
    stdout(&o)
}

#[test]
fn docker_runtime_runs_the_same_deploy() {
    let info = std::process::Command::new("docker").arg("info").output();
    assert!(
        info.as_ref().is_ok_and(|o| o.status.success()),
        "dockerd is not running: start it (scripts/setup does)"
    );
    // A private range so the bridge never collides with another test.
    let octet = 128 + (std::process::id() % 100) as u8;
    let cidr = format!("10.{octet}.0.0/16");
    let m = Machine::start_with(&["--runtime", "docker"]);
    m.ctl_json(&["mesh", "init", "dockertest", "--cidr", &cidr]);
    let subnet = m.ctl_json(&["mesh", "status"])["machine"]["subnet"]
        .as_str()
        .unwrap()
        .to_string();
    let net: std::net::Ipv4Addr = subnet.split('/').next().unwrap().parse().unwrap();
    let guard = DockerGuard {
        machine: Some(m),
        network: format!("plz{:08x}", u32::from(net)),
    };
    let m = guard.machine.as_ref().unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let image = busybox_image(
        tmp.path(),
        &format!("ployz-dk-{}", std::process::id()),
        HTTPD,
    );
    let v = m.deploy(&["web", "--image", image.to_str().unwrap(), "--replicas", "2"]);
    let inst = v["instances"].as_array().unwrap();
    assert_eq!(inst.len(), 2, "{v:#}\n{}", m.log());
    assert!(
        inst.iter().all(|i| i["state"] == "running"),
        "{v:#}\n{}",
        m.log()
    );
    let id = m.id();
    let ps = std::process::Command::new("docker")
        .args([
            "ps",
            "--format",
            "{{.Names}}",
            "--filter",
            &format!("name=^plz-{}-web-", &id[..8]),
        ])
        .output()
        .unwrap();
    assert_eq!(
        stdout(&ps).lines().count(),
        2,
        "dockerd runs both: {}",
        stdout(&ps)
    );
    for i in inst {
        let ip = i["overlay_ip"].as_str().unwrap();
        let o = std::process::Command::new("curl")
            .args(["-sf", "-m", "3", &format!("http://{ip}:8080/")])
            .output()
            .unwrap();
        assert_eq!(
            stdout(&o),
            "hello from a ployz workload\n",
            "{}",
            stderr(&o)
        );
    }
    // dockerd reports how a container ended: a crash fails its deploy with
    // the exit code and the output.
    let (code, v) = m.try_deploy(&[
        "crash",
        "--image",
        image.to_str().unwrap(),
        "--",
        "sh",
        "-c",
        "echo docker-says-bye; exit 4",
    ]);
    assert_eq!(code, Some(9), "{v:#}");
    assert_eq!(v["instances"][0]["exit_code"], 4, "{v:#}");
    let why = v["instances"][0]["error"].as_str().unwrap_or_default();
    assert!(
        why.contains("exited with code 4") && why.contains("docker-says-bye"),
        "{why}"
    );
    m.ctl_json(&["service", "rm", "crash"]);
    m.ctl_json(&["service", "rm", "web"]);
    let ps = std::process::Command::new("docker")
        .args([
            "ps",
            "-a",
            "--format",
            "{{.Names}}",
            "--filter",
            &format!("name=^plz-{}-", &id[..8]),
        ])
        .output()
        .unwrap();
    assert_eq!(stdout(&ps).trim(), "", "service rm deletes the containers");
    // With nothing left to run, the machine takes its docker network down.
    let gone = eventually(Duration::from_secs(15), || {
        (!docker_networks().lines().any(|n| n == guard.network)).then_some(())
    });
    assert!(gone.is_some(), "network {} is left behind", guard.network);
}

#[test]
fn workloads_survive_a_daemon_restart_and_exited_ones_restart() {
    let tb = Testbed::new(1);
    let mut m = Machine::start_in(&tb.hosts[0], &[]);
    m.ctl_json(&["mesh", "init", "restarts"]);
    let tmp = tempfile::tempdir().unwrap();
    let image = busybox_image(tmp.path(), "ployz-busybox", HTTPD);
    let v = m.deploy(&["web", "--image", image.to_str().unwrap(), "--memory", "64M"]);
    assert_eq!(v["instances"][0]["state"], "running", "{v:#}");
    let ip = v["instances"][0]["overlay_ip"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(http_get(&m, &ip, "/").is_some());
    // The memory limit is the workload's cgroup limit.
    let state_dir = m.data_dir().join("runtime/state");
    let wid = std::fs::read_dir(&state_dir)
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    let st: Value =
        serde_json::from_slice(&std::fs::read(wid.join("state.json")).unwrap()).unwrap();
    let pid = st["pid"].as_i64().unwrap();
    let cg = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap();
    let limit = cg
        .lines()
        .find_map(|l| {
            let mut it = l.splitn(3, ':');
            let (_, ctrl, path) = (it.next()?, it.next()?, it.next()?);
            if ctrl.split(',').any(|c| c == "memory") {
                std::fs::read_to_string(format!(
                    "/sys/fs/cgroup/memory{path}/memory.limit_in_bytes"
                ))
                .ok()
            } else if ctrl.is_empty() {
                std::fs::read_to_string(format!("/sys/fs/cgroup{path}/memory.max")).ok()
            } else {
                None
            }
        })
        .unwrap_or_else(|| panic!("no memory cgroup for pid {pid}:\n{cg}"));
    assert_eq!(limit.trim(), (64u64 << 20).to_string());

    // kill -9 the daemon: the workload keeps serving; the restarted daemon
    // adopts it instead of starting a second copy.
    m.kill9();
    let o = tb.hosts[0]
        .command("curl")
        .args(["-sf", "-m", "3", &format!("http://{ip}:8080/")])
        .output()
        .unwrap();
    assert!(o.status.success(), "served while ployzd is down");
    // From now on, unused images go as soon as nothing needs them.
    m.set_env(&[("PLOYZ_IMAGE_GC_GRACE_SECS", "0")]);
    m.restart();
    let back = eventually(Duration::from_secs(20), || {
        let i = instances(&m, "web");
        (i.len() == 1 && i[0].1 == "running" && i[0].2 == ip).then_some(())
    });
    assert!(back.is_some(), "{:?}", instances(&m, "web"));
    std::thread::sleep(Duration::from_secs(4));
    assert_eq!(
        m.log().matches("instance started").count(),
        1,
        "adopted, not restarted:\n{}",
        m.log()
    );

    // A workload that exits is started again (and its deploy fails: it
    // does not stay up).
    let out = m.ctl(&[
        "--json",
        "deploy",
        "service",
        "blip",
        "--image",
        image.to_str().unwrap(),
        "--",
        "sh",
        "-c",
        "echo blip-says-hi; sleep 1; exit 3",
    ]);
    assert_eq!(out.status.code(), Some(9), "{}", stderr(&out));
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["instances"][0]["state"], "failed", "{v:#}");
    // Progress streams to stderr, up to the final state.
    let progress = stderr(&out);
    assert!(
        progress.contains("[blip] placed slot 0")
            && progress.contains(": running")
            && progress.contains("exited with code 3"),
        "{progress}"
    );
    let restarted = eventually(Duration::from_secs(30), || {
        (m.log().matches("instance started").count() >= 3).then_some(())
    });
    assert!(
        restarted.is_some(),
        "exited workload restarted:\n{}",
        m.log()
    );
    let logs = m.ctl(&["service", "logs", "blip"]);
    assert!(stdout(&logs).contains("blip-says-hi"), "{}", stderr(&logs));
    // Image garbage collection: an image a service still uses stays (both
    // services run the same archive), the last one's removal frees it.
    let blobs = m.data_dir().join("images/blobs");
    let stored = || {
        std::fs::read_dir(&blobs)
            .map(|d| {
                d.filter_map(Result::ok)
                    .filter(|e| !e.file_name().to_string_lossy().ends_with(".json"))
                    .count()
            })
            .unwrap_or(0)
    };
    assert_eq!(stored(), 1, "the image both services run");
    m.ctl_json(&["service", "rm", "blip"]);
    std::thread::sleep(Duration::from_secs(4));
    assert_eq!(stored(), 1, "kept while web runs it");
    assert!(http_get(&m, &ip, "/").is_some(), "web still serves");
    m.ctl_json(&["service", "rm", "web"]);
    let gone = eventually(Duration::from_secs(10), || {
        http_get(&m, &ip, "/").is_none().then_some(())
    });
    assert!(gone.is_some());
    let freed = eventually(Duration::from_secs(20), || (stored() == 0).then_some(()));
    assert!(freed.is_some(), "unused image kept:\n{}", m.log());
    assert!(m.log().contains("removed an image nothing uses any more"));
}

#[test]
fn instances_say_why_when_the_runtime_is_missing() {
    let m = Machine::start_with_env(
        &["--runtime", "docker"],
        &[("DOCKER_HOST", "unix:///nonexistent/docker.sock")],
    );
    m.ctl_json(&["mesh", "init", "nodocker", "--cidr", "10.127.0.0/16"]);
    let tmp = tempfile::tempdir().unwrap();
    let image = busybox_image(tmp.path(), "ployz-busybox", HTTPD);
    let (code, v) = m.try_deploy(&[
        "web",
        "--image",
        image.to_str().unwrap(),
        "--wait-secs",
        "30",
    ]);
    assert_eq!(code, Some(9), "{v:#}");
    assert_eq!(v["instances"][0]["state"], "failed", "{v:#}");
    let why = v["instances"][0]["error"].as_str().unwrap_or_default();
    assert!(
        why.contains("docker"),
        "the reason names the runtime: {why}"
    );
}
