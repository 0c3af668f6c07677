//! Reaching services on real ployzd machines (host runtime, 3 namespace
//! hosts): a published port answers on every machine's underlay address,
//! also where no instance runs, and keeps answering while an instance is
//! killed; taken host ports are refused naming their owner; workloads
//! resolve `web.internal` to exactly the healthy instances. Drained and
//! standby machines keep forwarding; a removed machine stops listening
//! once it is leaving and leaves no instance running. And the docker
//! runtime's containers get the resolver with `--dns`.
//!
//! Nothing here asserts a duration beyond generous bounds.

use ployz_tests::images::{busybox_image, busybox_image_plus};
use ployz_tests::netns::Testbed;
use ployz_tests::{eventually, stderr, stdout, Machine};
use serde_json::Value;
use std::collections::BTreeSet;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const HTTPD: &[&str] = &["httpd", "-f", "-p", "8080", "-h", "/www"];

/// The `service ls --json` instance objects of `service`.
fn instance_values(m: &Machine, service: &str) -> Vec<Value> {
    let v = m.ctl_json(&["service", "ls"]);
    v["services"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|s| s["name"] == service)
        .flat_map(|s| s["instances"].as_array().unwrap().clone())
        .collect()
}

/// `(machine, slot, overlay_ip, health)` of each instance of `service`.
fn instances(m: &Machine, service: &str) -> Vec<(String, u64, String, String)> {
    instance_values(m, service)
        .into_iter()
        .map(|i| {
            (
                i["machine"].as_str().unwrap().to_string(),
                i["slot"].as_u64().unwrap(),
                i["overlay_ip"].as_str().unwrap_or("").to_string(),
                i["health"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

/// GET `http://ip:port/index.html` from the root namespace (outside every
/// machine), as an outside client would.
fn get(ip: &str, port: u16) -> Result<String, String> {
    let o = Command::new("curl")
        .args([
            "-sS",
            "-f",
            "-m",
            "8",
            &format!("http://{ip}:{port}/index.html"),
        ])
        .output()
        .unwrap();
    if o.status.success() {
        Ok(stdout(&o))
    } else {
        Err(stderr(&o))
    }
}

/// The host pid of workload `id`'s init on machine `m` (host runtime).
fn workload_pid(m: &Machine, id: &str) -> Option<i32> {
    let body = std::fs::read(
        m.data_dir()
            .join("runtime/state")
            .join(id)
            .join("state.json"),
    )
    .ok()?;
    let v: Value = serde_json::from_slice(&body).ok()?;
    v["pid"].as_i64().map(|p| p as i32).filter(|p| *p > 1)
}

fn workload_id(machine: &str, service: &str, slot: u64) -> String {
    format!("plz-{}-{service}-{slot}", &machine[..machine.len().min(8)])
}

/// Runs `busybox ARGS` inside the workload with init `pid` (its mount and
/// network namespaces: its own /etc/resolv.conf, its own address).
fn in_workload(pid: i32, args: &[&str]) -> std::process::Output {
    Command::new("nsenter")
        .args(["-t", &pid.to_string(), "-m", "-n", "/bin/busybox"])
        .args(args)
        .output()
        .unwrap()
}

/// The addresses `name` resolves to inside the workload (`None`: the
/// lookup failed, e.g. NXDOMAIN).
fn resolve(pid: i32, name: &str) -> Option<BTreeSet<String>> {
    let o = in_workload(pid, &["nslookup", name]);
    if !o.status.success() {
        return None;
    }
    // busybox: "Server: …\nAddress: …:53\n\nName: web.internal\nAddress: 10.101.2.2\n"
    let out = stdout(&o);
    let answers = out.split_once("Name:")?.1;
    Some(
        answers
            .lines()
            .filter_map(|l| l.trim().strip_prefix("Address:"))
            .map(|a| a.trim().to_string())
            .collect(),
    )
}

/// The first answer for `name` inside the workload with init `pid`,
/// asking again while lookups fail (a timeout on a loaded box); panics if
/// none succeeds within 30 s.
fn answer(pid: i32, name: &str) -> BTreeSet<String> {
    eventually(Duration::from_secs(30), || resolve(pid, name))
        .unwrap_or_else(|| panic!("no lookup of {name} succeeded in 30 s"))
}

/// How often instance `slot` of `service` on `machine` was restarted.
fn restarts(m: &Machine, service: &str, machine: &str, slot: u64) -> u64 {
    instance_values(m, service)
        .into_iter()
        .find(|i| i["machine"] == machine && i["slot"].as_u64() == Some(slot))
        .and_then(|i| i["restarts"].as_u64())
        .unwrap_or(0)
}

/// A process holding a port inside a host namespace, killed on drop.
struct Holder(Child);

impl Drop for Holder {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn published_ports_answer_everywhere_and_dns_follows_health() {
    let tb = Testbed::new(3);
    let ms = ployz_tests::cluster_on(&tb, "ingress");
    let ids: Vec<String> = ms.iter().map(|m| m.id()).collect();
    let tmp = tempfile::tempdir().unwrap();
    let image = busybox_image(tmp.path(), "ployz-ingress", HTTPD);
    let image = image.to_str().unwrap();

    // A process on machine 2 holds TCP 9090: publishing it is refused,
    // naming the machine, and nothing is written.
    let mut nc = tb.hosts[2].command("busybox");
    nc.args(["httpd", "-f", "-p", "9090", "-h", "/"])
        .stdin(Stdio::null())
        .stdout(Stdio::null());
    let _holder = Holder(nc.spawn().unwrap());
    let holds = eventually(Duration::from_secs(10), || {
        let o = tb.hosts[2].sh("cat /proc/net/tcp /proc/net/tcp6");
        // 9090 = 0x2382, state 0A = LISTEN.
        stdout(&o)
            .lines()
            .any(|l| l.contains(":2382 ") && l.contains(" 0A "))
            .then_some(())
    });
    assert!(holds.is_some(), "httpd did not listen on 9090");
    let out = ms[0].ctl(&[
        "deploy",
        "service",
        "taken",
        "--image",
        image,
        "--publish",
        "9090:8080",
    ]);
    assert_eq!(out.status.code(), Some(6), "{}", stderr(&out));
    assert!(
        stderr(&out).contains(&format!("a process on machine {}", ids[2])),
        "{}",
        stderr(&out)
    );
    let ls = ms[0].ctl_json(&["service", "ls"]);
    assert_eq!(ls["services"].as_array().unwrap().len(), 0, "{ls:#}");
    let ops = ms[0].ctl_json(&["op", "ls"]);
    assert!(
        !ops.to_string().contains("taken"),
        "no operation for a refused deploy: {ops:#}"
    );
    // A malformed spec: exit 6 too.
    let out = ms[0].ctl(&[
        "deploy",
        "service",
        "bad",
        "--image",
        image,
        "--publish",
        "80",
    ]);
    assert_eq!(out.status.code(), Some(6), "{}", stderr(&out));
    assert!(stderr(&out).contains("--publish `80`"), "{}", stderr(&out));

    // Two healthy replicas of web published on 8080. The health check
    // fails while /data/sick exists (a volume: it survives restarts).
    let v = ms[0].deploy(&[
        "web",
        "--image",
        image,
        "--replicas",
        "2",
        "--publish",
        "8080:8080",
        "-v",
        "webdata:/data",
        "--health-cmd",
        "test ! -e /data/sick",
        "--health-interval",
        "1s",
        "--health-retries",
        "1",
        "--wait-secs",
        "120",
    ]);
    assert_eq!(v["ports"], serde_json::json!(["8080:8080/tcp"]), "{v:#}");
    let web = instances(&ms[0], "web");
    assert_eq!(web.len(), 2, "{web:?}");
    assert!(web.iter().all(|i| i.3 == "healthy"), "{web:?}");
    let with: BTreeSet<&str> = web.iter().map(|i| i.0.as_str()).collect();
    let without = ids
        .iter()
        .position(|id| !with.contains(id.as_str()))
        .expect("a machine without an instance");
    let table = stdout(&ms[0].ctl(&["service", "ls"]));
    assert!(
        table.contains("PORTS") && table.contains("8080:8080/tcp"),
        "{table}"
    );

    // Every machine answers on its underlay address, also the one
    // without an instance.
    for (i, h) in tb.hosts.iter().enumerate() {
        let ip = h.ip.to_string();
        let page = eventually(Duration::from_secs(30), || get(&ip, 8080).ok());
        assert!(
            page.is_some(),
            "machine {i} (instance: {}) does not forward 8080: {:?}\n{}",
            i != without,
            get(&ip, 8080),
            ms[i].log()
        );
    }

    // Another service cannot publish 8080; the owner is named.
    let out = ms[1].ctl(&[
        "deploy",
        "service",
        "other",
        "--image",
        image,
        "--publish",
        "8080:80",
    ]);
    assert_eq!(out.status.code(), Some(6), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("published by service `web`"),
        "{}",
        stderr(&out)
    );
    assert_eq!(instances(&ms[0], "other").len(), 0);

    // DNS: from inside an instance, web.internal is exactly the two
    // instances, SLOT.web.internal one, unknown names NXDOMAIN.
    let all: BTreeSet<String> = web.iter().map(|i| i.2.clone()).collect();
    let (a_machine, a_slot) = (web[0].0.clone(), web[0].1);
    let a_ms = ids.iter().position(|id| *id == a_machine).unwrap();
    let a_pid = workload_pid(&ms[a_ms], &workload_id(&a_machine, "web", a_slot)).unwrap();
    let conf = stdout(&in_workload(a_pid, &["cat", "/etc/resolv.conf"]));
    assert!(
        conf.contains("nameserver 10.") && conf.contains("search internal"),
        "{conf}"
    );
    let got = eventually(Duration::from_secs(30), || {
        resolve(a_pid, "web.internal").filter(|g| *g == all)
    });
    assert_eq!(
        got.as_ref(),
        Some(&all),
        "{:?}",
        resolve(a_pid, "web.internal")
    );
    // (A lookup that fails, e.g. times out on a loaded box, is asked
    // again; the first answer must be the right one.)
    let one = answer(a_pid, &format!("{}.web.internal", web[1].1));
    assert_eq!(one, BTreeSet::from([web[1].2.clone()]));
    assert_eq!(resolve(a_pid, "nothere.internal"), None);
    // Short names through `search internal`.
    assert_eq!(answer(a_pid, "web"), all);

    // Kill instance A: requests to every machine keep succeeding (the
    // other instance serves, over the mesh where needed).
    let restarts_before = restarts(&ms[0], "web", &a_machine, a_slot);
    // SAFETY: kill(2) with a pid read from the machine's runtime state.
    unsafe { libc::kill(a_pid, libc::SIGKILL) };
    let start = Instant::now();
    let mut failures = Vec::new();
    let mut n = 0;
    while start.elapsed() < Duration::from_secs(8) {
        for h in &tb.hosts {
            n += 1;
            if let Err(e) = get(&h.ip.to_string(), 8080) {
                failures.push(format!("{}: {e}", h.ip));
            }
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(
        failures.is_empty(),
        "{} of {n} requests failed after the kill: {failures:?}",
        failures.len()
    );

    // A comes back (restarted, healthy) and into DNS again. Its machine
    // may not have seen the kill yet (the records still say healthy): wait
    // for the restart to be counted and for a new, living init.
    let back = eventually(Duration::from_secs(90), || {
        let w = instances(&ms[0], "web");
        (w.len() == 2
            && w.iter().all(|i| i.3 == "healthy")
            && restarts(&ms[0], "web", &a_machine, a_slot) > restarts_before)
            .then_some(())
    });
    assert!(
        back.is_some(),
        "{:?}\n{}",
        instances(&ms[0], "web"),
        ms[a_ms].log()
    );
    let old_pid = a_pid;
    let a_pid = eventually(Duration::from_secs(30), || {
        workload_pid(&ms[a_ms], &workload_id(&a_machine, "web", a_slot))
            .filter(|p| *p != old_pid && std::path::Path::new(&format!("/proc/{p}")).exists())
    })
    .expect("restarted instance A has no new init");
    let b_ip = web[1].2.clone();
    let got = eventually(Duration::from_secs(30), || {
        resolve(a_pid, "web.internal").filter(|g| *g == all)
    });
    assert_eq!(
        got.as_ref(),
        Some(&all),
        "{:?}",
        resolve(a_pid, "web.internal")
    );

    // A turns unhealthy (and stays so across restarts): it leaves the
    // answer, which is then exactly B.
    let o = in_workload(a_pid, &["touch", "/data/sick"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let only_b = BTreeSet::from([b_ip.clone()]);
    let b_machine = ids.iter().position(|id| *id == web[1].0).unwrap();
    let b_pid = workload_pid(&ms[b_machine], &workload_id(&web[1].0, "web", web[1].1)).unwrap();
    let got = eventually(Duration::from_secs(60), || {
        resolve(b_pid, "web.internal").filter(|g| *g == only_b)
    });
    assert_eq!(
        got.as_ref(),
        Some(&only_b),
        "{:?}",
        instances(&ms[0], "web")
    );
    // And stays out while it restarts: every answer is exactly B (a
    // lookup that fails is asked again, it proves nothing either way).
    for _ in 0..5 {
        assert_eq!(answer(b_pid, "web.internal"), only_b);
        std::thread::sleep(Duration::from_millis(300));
    }
    // Names outside .internal go to the host's resolvers: none answers in
    // a namespace host without one, so the lookup fails rather than
    // hanging or answering NXDOMAIN itself.

    // Metrics count what was forwarded.
    let metrics = stdout(&ms[without].exec("curl", &["-s", "http://127.0.0.1:9101/metrics"]));
    let forwarded = metrics
        .lines()
        .find(|l| l.starts_with("ployz_published_connections_forwarded_total{protocol=\"tcp\"}"))
        .and_then(|l| l.split_whitespace().last()?.parse::<u64>().ok());
    assert!(forwarded.is_some_and(|n| n > 0), "{metrics}");
    assert!(
        metrics.contains("ployz_dns_queries_total{result=\"answered\"}"),
        "{metrics}"
    );

    // rm: every machine stops listening.
    ms[0].ctl_json(&["service", "rm", "web"]);
    for h in &tb.hosts {
        let ip = h.ip.to_string();
        let gone = eventually(Duration::from_secs(30), || get(&ip, 8080).err());
        assert!(gone.is_some(), "{ip} still answers 8080 after rm");
    }
}

/// Sends `msg` to `ip:port` over UDP from the root namespace and returns
/// the answer, if one comes from that address within a second.
fn udp_ask(ip: &str, port: u16, msg: &str) -> Option<String> {
    let sock = std::net::UdpSocket::bind("0.0.0.0:0").unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(1))).unwrap();
    let to: std::net::SocketAddr = format!("{ip}:{port}").parse().unwrap();
    sock.send_to(msg.as_bytes(), to).ok()?;
    let mut buf = [0u8; 2048];
    let (n, from) = sock.recv_from(&mut buf).ok()?;
    (from == to).then(|| String::from_utf8_lossy(&buf[..n]).into_owned())
}

/// A UDP service published on a host port answers on every machine,
/// including those without an instance; and two deploys racing for one
/// host port (from two machines) cannot both take it: one wins, the other
/// is refused with exit 6 naming the winner, and nothing of it is written.
#[test]
fn udp_ports_answer_everywhere_and_racing_deploys_cannot_share_a_port() {
    let tb = Testbed::new(3);
    let ms = ployz_tests::cluster_on(&tb, "udpports");
    let ids: Vec<String> = ms.iter().map(|m| m.id()).collect();
    let tmp = tempfile::tempdir().unwrap();
    let echo = std::fs::read(env!("CARGO_BIN_EXE_udp-echo")).unwrap();
    let image = busybox_image_plus(
        tmp.path(),
        "ployz-udp",
        &["udp-echo", "5000"],
        &[("bin/udp-echo", &echo)],
    );
    let v = ms[0].deploy(&[
        "echo",
        "--image",
        image.to_str().unwrap(),
        "--publish",
        "5300:5000/udp",
        "--wait-secs",
        "120",
    ]);
    assert_eq!(v["ports"], serde_json::json!(["5300:5000/udp"]), "{v:#}");
    let at = instances(&ms[0], "echo");
    assert_eq!(at.len(), 1, "{at:?}");
    for (i, h) in tb.hosts.iter().enumerate() {
        let ip = h.ip.to_string();
        let msg = format!("hi {i}");
        let answer = eventually(Duration::from_secs(20), || udp_ask(&ip, 5300, &msg));
        assert_eq!(
            answer.as_deref(),
            Some(format!("echo: hi {i}").as_str()),
            "machine {i} (instance: {}) does not forward UDP 5300\n{}",
            at[0].0 == ids[i],
            ms[i].log()
        );
        // The flow keeps its backend: a second datagram answers too.
        assert_eq!(udp_ask(&ip, 5300, "again").as_deref(), Some("echo: again"));
    }
    let metrics = stdout(&ms[0].exec("curl", &["-s", "http://127.0.0.1:9101/metrics"]));
    assert!(
        metrics.contains("ployz_published_connections_forwarded_total{protocol=\"udp\"}"),
        "{metrics}"
    );
    ms[0].ctl_json(&["service", "rm", "echo"]);

    // Races: two machines deploy two services on one host port at once.
    let httpd = busybox_image(tmp.path(), "ployz-race", HTTPD);
    let httpd = httpd.to_str().unwrap();
    for round in 0..3u16 {
        let port = (5400 + round).to_string();
        let spec = format!("{port}:8080");
        let names = [format!("race-a{round}"), format!("race-b{round}")];
        let outs: Vec<std::process::Output> = std::thread::scope(|s| {
            let hs: Vec<_> = names
                .iter()
                .zip(&ms)
                .map(|(name, m)| {
                    let spec = &spec;
                    s.spawn(move || {
                        m.ctl(&[
                            "deploy",
                            "service",
                            name,
                            "--image",
                            httpd,
                            "--publish",
                            spec,
                            "--wait-secs",
                            "60",
                        ])
                    })
                })
                .collect();
            hs.into_iter().map(|h| h.join().unwrap()).collect()
        });
        let won: Vec<usize> = (0..2).filter(|&i| outs[i].status.success()).collect();
        assert_eq!(
            won.len(),
            1,
            "round {round}: exactly one deploy may take port {port}: {:?}",
            outs.iter()
                .map(|o| (o.status.code(), stderr(o)))
                .collect::<Vec<_>>()
        );
        let (w, l) = (won[0], 1 - won[0]);
        assert_eq!(outs[l].status.code(), Some(6), "{}", stderr(&outs[l]));
        assert!(
            stderr(&outs[l]).contains(&format!("published by service `{}`", names[w])),
            "{}",
            stderr(&outs[l])
        );
        assert_eq!(instances(&ms[0], &names[l]).len(), 0);
        let ls = ms[0].ctl_json(&["service", "ls"]);
        let listed: Vec<&str> = ls["services"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|s| s["name"].as_str())
            .collect();
        assert_eq!(listed, vec![names[w].as_str()], "{ls:#}");
        // Removing the winner releases the port: the loser may take it now.
        ms[0].ctl_json(&["service", "rm", &names[w]]);
        // (Each machine's listener of the winner closes within a moment.)
        let deploy = || {
            ms[1].ctl(&[
                "deploy",
                "service",
                &names[l],
                "--image",
                httpd,
                "--publish",
                &spec,
            ])
        };
        let taken = eventually(Duration::from_secs(20), || {
            deploy().status.success().then_some(())
        });
        assert!(taken.is_some(), "{}", stderr(&deploy()));
        ms[0].ctl_json(&["service", "rm", &names[l]]);
    }
}

/// The docker runtime's containers resolve through the machine's resolver
/// (`--dns` with the bridge gateway).
#[test]
fn docker_containers_resolve_service_names() {
    let info = Command::new("docker").arg("info").output();
    assert!(
        info.as_ref().is_ok_and(|o| o.status.success()),
        "dockerd is not running: start it (scripts/setup does)"
    );
    let octet = 128 + ((std::process::id() + 50) % 100) as u8;
    let cidr = format!("10.{octet}.0.0/16");
    let m = Machine::start_with(&["--runtime", "docker"]);
    m.ctl_json(&["mesh", "init", "dockerdns", "--cidr", &cidr]);
    let me = m.id();
    let subnet = m.ctl_json(&["mesh", "status"])["machine"]["subnet"]
        .as_str()
        .unwrap()
        .to_string();
    let net: std::net::Ipv4Addr = subnet.split('/').next().unwrap().parse().unwrap();
    let gateway = std::net::Ipv4Addr::from(u32::from(net) | 1).to_string();
    let guard = DockerNet {
        machine: Some(m),
        network: format!("plz{:08x}", u32::from(net)),
    };
    let m = guard.machine.as_ref().unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let image = busybox_image(
        tmp.path(),
        &format!("ployz-dkdns-{}", std::process::id()),
        HTTPD,
    );
    let v = m.deploy(&["web", "--image", image.to_str().unwrap()]);
    let web_ip = v["instances"][0]["overlay_ip"]
        .as_str()
        .unwrap()
        .to_string();
    let container = workload_id(&me, "web", v["instances"][0]["slot"].as_u64().unwrap());
    let o = Command::new("docker")
        .args(["inspect", "-f", "{{json .HostConfig.Dns}}", &container])
        .output()
        .unwrap();
    assert_eq!(
        stdout(&o).trim(),
        format!("[\"{gateway}\"]"),
        "{}",
        stderr(&o)
    );
    let got = eventually(Duration::from_secs(20), || {
        let o = Command::new("docker")
            .args([
                "exec",
                &container,
                "/bin/busybox",
                "nslookup",
                "web.internal",
            ])
            .output()
            .unwrap();
        let out = stdout(&o);
        out.split_once("Name:")
            .is_some_and(|(_, a)| a.contains(&web_ip))
            .then_some(out)
    });
    assert!(
        got.is_some(),
        "web.internal did not resolve to {web_ip}\n{}",
        m.log()
    );
}

/// Removes the machine first (with its containers), then its docker
/// network and its firewall rules, even when the test fails.
struct DockerNet {
    machine: Option<Machine>,
    network: String,
}

impl Drop for DockerNet {
    fn drop(&mut self) {
        drop(self.machine.take());
        let _ = Command::new("docker")
            .args(["network", "rm", &self.network])
            .output();
        let tag = format!("\"ployz:{}\"", self.network);
        for chain in ["DOCKER-USER", "FORWARD"] {
            let Ok(o) = Command::new("iptables").args(["-S", chain]).output() else {
                continue;
            };
            for rule in stdout(&o).lines().filter(|l| l.contains(&tag)) {
                let Some(spec) = rule.strip_prefix("-A ") else {
                    continue;
                };
                let _ = Command::new("sh")
                    .args(["-c", &format!("iptables -w -D {spec}")])
                    .output();
            }
        }
    }
}

/// Whether `ip:port` refuses a TCP connection (nothing listens there):
/// `false` when it accepts, or when no answer comes within 3 s.
fn refuses(ip: &str, port: u16) -> bool {
    let to: std::net::SocketAddr = format!("{ip}:{port}").parse().unwrap();
    matches!(
        std::net::TcpStream::connect_timeout(&to, Duration::from_secs(3)),
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused
    )
}

/// The processes in the host-runtime cgroups of the workloads of the
/// machine whose id starts with `id8` (cgroup v2, or v1's pids hierarchy).
fn workload_procs(id8: &str) -> Vec<i32> {
    let prefix = format!("plz-{id8}-");
    let mut out = Vec::new();
    for base in ["/sys/fs/cgroup/ployz", "/sys/fs/cgroup/pids/ployz"] {
        let Ok(dirs) = std::fs::read_dir(base) else {
            continue;
        };
        for d in dirs.flatten() {
            if !d.file_name().to_string_lossy().starts_with(&prefix) {
                continue;
            }
            let procs = std::fs::read_to_string(d.path().join("cgroup.procs")).unwrap_or_default();
            out.extend(procs.lines().filter_map(|l| l.trim().parse::<i32>().ok()));
        }
    }
    out
}

/// Kills what runs in the workload cgroups of machine `.0` on drop.
struct Reaper(String);

impl Drop for Reaper {
    fn drop(&mut self) {
        for pid in workload_procs(&self.0) {
            // SAFETY: kill(2) on a process in a test machine's cgroups.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
    }
}

/// Issue 14's lifecycle rule for published ports: drained and standby
/// machines keep forwarding (a standby machine without an instance, over
/// the mesh), a removed machine stops listening, and the rest go on.
#[test]
fn published_ports_follow_the_machine_lifecycle() {
    let tb = Testbed::new(3);
    let mut ms = ployz_tests::cluster_on(&tb, "ingresslife");
    let ids: Vec<String> = ms.iter().map(|m| m.id()).collect();
    let ip = |i: usize| tb.hosts[i].ip.to_string();
    let tmp = tempfile::tempdir().unwrap();
    // httpd ignoring SIGTERM: stopping an instance takes the whole grace.
    let image = busybox_image(
        tmp.path(),
        "ployz-ingress-life",
        &["sh", "-c", "trap '' TERM; exec httpd -f -p 8080 -h /www"],
    );
    let image = image.to_str().unwrap();

    // Two replicas spread over two machines: the removed machine `r` (one
    // with an instance, not machine 0, which runs the commands), the
    // drained machine `d` (the other instance, which stays) and the
    // standby machine `s` (none).
    ms[0].deploy(&[
        "web",
        "--image",
        image,
        "--replicas",
        "2",
        "--publish",
        "8181:8080",
        "--wait-secs",
        "120",
    ]);
    let web = instances(&ms[0], "web");
    let with: Vec<usize> = web
        .iter()
        .map(|i| ids.iter().position(|id| *id == i.0).unwrap())
        .collect();
    assert!(with.len() == 2 && with[0] != with[1], "{web:?}");
    let r = *with.iter().find(|&&i| i != 0).unwrap();
    let d = *with.iter().find(|&&i| i != r).unwrap();
    let s = (0..3).find(|i| !with.contains(i)).unwrap();
    for (i, m) in ms.iter().enumerate() {
        let page = eventually(Duration::from_secs(30), || get(&ip(i), 8181).ok());
        assert!(
            page.is_some(),
            "machine {i} does not forward 8181: {:?}\n{}",
            get(&ip(i), 8181),
            m.log()
        );
    }

    ms[0].ctl_json(&["machine", "drain", &ids[d]]);
    ms[0].ctl_json(&["machine", "standby", &ids[s]]);
    assert_eq!(ms[0].lifecycle_of(&ids[d]).as_deref(), Some("draining"));
    assert_eq!(ms[0].lifecycle_of(&ids[s]).as_deref(), Some("standby"));
    // A barrier: a second service published after both changes. A machine
    // that forwards it has rebuilt its table from the store since (the
    // table is built from one pass over the machines, services and
    // instances; the deploy takes seconds longer than that pass), so it
    // serves in its new lifecycle. It lands on `r`, the only active one.
    ms[0].deploy(&[
        "mark",
        "--image",
        image,
        "--publish",
        "8282:8080",
        "--wait-secs",
        "120",
    ]);
    for i in [d, s] {
        let marked = eventually(Duration::from_secs(30), || get(&ip(i), 8282).ok());
        assert!(
            marked.is_some(),
            "machine {i} ({}) does not forward a port published after the change: {:?}\n{}",
            ms[0].lifecycle_of(&ids[i]).unwrap_or_default(),
            get(&ip(i), 8282),
            ms[i].log()
        );
        let page = get(&ip(i), 8181);
        assert!(page.is_ok(), "machine {i}: {page:?}\n{}", ms[i].log());
    }
    // (`d` kept its instance: draining moves nothing.)
    let kept = instances(&ms[0], "web");
    assert!(kept.iter().any(|x| x.0 == ids[d]), "{kept:?}");

    // Removed: `r` stops listening as soon as it is leaving, before its
    // cleanup is over (it stops its two instances one by one, and they
    // ignore SIGTERM: 5 s each before they are killed; a listener closed
    // only when ployzd stops would close after that), and exits; nothing of it keeps
    // running, and the drained and the standby machine still forward to
    // the instance left on `d`.
    let r_id8 = &ids[r][..8];
    assert!(!refuses(&ip(r), 8181), "machine {r} listens before rm");
    let procs = workload_procs(r_id8);
    assert!(procs.len() >= 2, "machine {r}'s instances: {procs:?}");
    // Its data directory goes with it: kill what it leaves, also when an
    // assertion below fails.
    let _reaper = Reaper(r_id8.to_string());
    let rm = ms[0].ctl_spawn(&["--json", "machine", "rm", &ids[r]]);
    let closed_while_cleaning = eventually(Duration::from_secs(30), || {
        refuses(&ip(r), 8181).then(|| !workload_procs(r_id8).is_empty())
    });
    let rm = rm.wait_with_output().unwrap();
    assert!(rm.status.success(), "{}", stderr(&rm));
    let rm: Value = serde_json::from_slice(&rm.stdout).unwrap();
    assert_eq!(rm["cleaned_up"], true, "{rm}");
    assert!(
        ms[r].wait_exit(Duration::from_secs(30)).is_some(),
        "removed ployzd kept running\n{}",
        ms[r].log()
    );
    assert_eq!(
        closed_while_cleaning,
        Some(true),
        "machine {r} listened on 8181 until its cleanup was over (None: still listens)\n{}",
        ms[r].log()
    );
    let orphans = workload_procs(r_id8);
    assert!(
        orphans.is_empty(),
        "instances of the removed machine outlived it: {orphans:?}\n{}",
        ms[r].log()
    );
    let left = instances(&ms[0], "web");
    assert_eq!(left.len(), 1, "{left:?}");
    assert_eq!(left[0].0, ids[d], "{left:?}");
    for i in [d, s] {
        let page = eventually(Duration::from_secs(30), || get(&ip(i), 8181).ok());
        assert!(
            page.is_some(),
            "machine {i} stopped forwarding 8181 after the rm: {:?}\n{}",
            get(&ip(i), 8181),
            ms[i].log()
        );
    }
    ms[0].ctl_json(&["service", "rm", "mark"]);
    ms[0].ctl_json(&["service", "rm", "web"]);
}
