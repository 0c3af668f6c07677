//! The HTTP(S) gateway on real ployzd processes (host runtime) on three
//! namespace hosts: routes answer by Host and path prefix from every
//! machine, a killed instance is skipped, a route without healthy
//! instances answers a 503 naming it, HTTP/2 with curl; then certificates
//! from a real ACME server (Debian's pebble, its listener certificate made
//! here), served by every machine, the chain checked against pebble's
//! root, and renewed (pebble issues 60 s certificates: renewal at 2/3).
//!
//! Pebble validates for real: it runs in a namespace whose /etc/hosts
//! (`ip netns exec` mounts /etc/netns/NS/hosts) sends the test hostnames
//! to one machine, which answers the HTTP-01 or TLS-ALPN-01 challenge the
//! ordering machine stored.

use ployz_tests::images::{busybox_image, busybox_image_plus};
use ployz_tests::netns::{Host, Testbed};
use ployz_tests::{eventually, stderr, stdout, Machine};
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::Duration;

const HTTPD: &[&str] = &["httpd", "-f", "-p", "8080", "-h", "/www"];
const PAGE: &str = "hello from a ployz workload\n";

/// `curl` from `host` with `args`; (exit ok, stdout).
fn curl(host: &Host, args: &str) -> (bool, String) {
    let o = host.sh(&format!("curl -s -m 5 {args}"));
    (o.status.success(), stdout(&o))
}

/// GET `path` for `hostname` from `from` through the gateway at `to`.
fn get(from: &Host, to: &Host, hostname: &str, path: &str) -> (bool, String) {
    curl(
        from,
        &format!("-H 'Host: {hostname}' http://{}{path}", to.ip),
    )
}

fn status(from: &Host, to: &Host, hostname: &str, path: &str) -> String {
    curl(
        from,
        &format!(
            "-o /dev/null -w '%{{http_code}}' -H 'Host: {hostname}' http://{}{path}",
            to.ip
        ),
    )
    .1
}

/// Kills the httpd of the instance at `ip` (found by its network namespace).
fn kill_instance(ip: &str) {
    let pids = stdout(
        &std::process::Command::new("pgrep")
            .args(["-f", "httpd -f -p 8080 -h /www"])
            .output()
            .unwrap(),
    );
    for pid in pids.split_whitespace() {
        let addrs = stdout(
            &std::process::Command::new("nsenter")
                .args(["-t", pid, "-n", "ip", "-o", "-4", "addr"])
                .output()
                .unwrap(),
        );
        if addrs.contains(&format!(" {ip}/")) {
            let _ = std::process::Command::new("kill")
                .args(["-9", pid])
                .status();
            return;
        }
    }
    panic!("no httpd with address {ip}");
}

/// Through the gateway at `to`: a WebSocket (tungstenite client) to
/// ws://ws.test/chat, a text and a binary message, each echoed back.
fn ws_echo(to: &Host) -> Result<(), String> {
    use tungstenite::client::IntoClientRequest;
    use tungstenite::Message;
    let s = std::net::TcpStream::connect((to.ip, 80)).map_err(|e| e.to_string())?;
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let req = "ws://ws.test/chat"
        .into_client_request()
        .map_err(|e| e.to_string())?;
    let (mut ws, resp) = tungstenite::client(req, s).map_err(|e| e.to_string())?;
    if resp.status() != 101 {
        return Err(format!("status {}", resp.status()));
    }
    for m in [
        Message::text("hello through the gateway"),
        Message::binary(vec![0u8, 1, 2, 255]),
    ] {
        ws.send(m.clone()).map_err(|e| e.to_string())?;
        let back = ws.read().map_err(|e| e.to_string())?;
        if back != m {
            return Err(format!("sent {m:?}, got {back:?}"));
        }
    }
    let _ = ws.close(None);
    Ok(())
}

/// Pebble in its own namespace host, killed (and its /etc/netns entry
/// removed) on drop.
struct Pebble {
    child: Child,
    netns_etc: PathBuf,
    dir: PathBuf,
}

impl Drop for Pebble {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.netns_etc);
        if std::thread::panicking() {
            eprintln!(
                "pebble log:\n{}",
                std::fs::read_to_string(self.dir.join("pebble.log")).unwrap_or_default()
            );
        }
    }
}

fn sh(dir: &Path, script: &str) {
    let o = std::process::Command::new("sh")
        .args(["-c", script])
        .current_dir(dir)
        .output()
        .unwrap();
    assert!(o.status.success(), "{script}: {}", stderr(&o));
}

/// Starts pebble on `host`: a CA and listener certificate for its address,
/// 60 s certificates, validation against `names` resolved to `target`.
fn pebble(host: &Host, dir: &Path, names: &[&str], target: &Host) -> Pebble {
    let ip = host.ip;
    sh(
        dir,
        &format!(
            "openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes \
               -keyout ca.key -out ca.pem -days 1 -subj /CN=pebble-test-ca 2>/dev/null && \
             openssl req -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes \
               -keyout leaf.key -out leaf.csr -subj /CN=pebble 2>/dev/null && \
             printf 'subjectAltName=IP:{ip}\\nbasicConstraints=CA:FALSE\\nextendedKeyUsage=serverAuth\\n' > ext && \
             openssl x509 -req -in leaf.csr -CA ca.pem -CAkey ca.key -CAcreateserial \
               -out leaf.pem -days 1 -extfile ext 2>/dev/null"
        ),
    );
    let config = serde_json::json!({"pebble": {
        "listenAddress": format!("{ip}:14000"),
        "managementListenAddress": format!("{ip}:15000"),
        "certificate": dir.join("leaf.pem"),
        "privateKey": dir.join("leaf.key"),
        "httpPort": 80,
        "tlsPort": 443,
        "ocspResponderURL": "",
        "externalAccountBindingRequired": false,
        "certificateValidityPeriod": 60,
    }});
    std::fs::write(dir.join("pebble.json"), config.to_string()).unwrap();
    let netns_etc = PathBuf::from("/etc/netns").join(&host.netns);
    std::fs::create_dir_all(&netns_etc).unwrap();
    let mut hosts = String::from("127.0.0.1 localhost\n");
    for n in names {
        hosts.push_str(&format!("{} {n}\n", target.ip));
    }
    std::fs::write(netns_etc.join("hosts"), hosts).unwrap();
    let log = std::fs::File::create(dir.join("pebble.log")).unwrap();
    let child = host
        .command("pebble")
        .arg("-config")
        .arg(dir.join("pebble.json"))
        .env("PEBBLE_VA_NOSLEEP", "1")
        // A fresh authorization per order: the renewal validates again.
        .env("PEBBLE_AUTHZREUSE", "0")
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .expect("pebble (apt-get install pebble; scripts/setup)");
    let p = Pebble {
        child,
        netns_etc,
        dir: dir.to_path_buf(),
    };
    eventually(Duration::from_secs(20), || {
        let (ok, _) = curl(
            host,
            &format!("--cacert {}/ca.pem https://{ip}:14000/dir", dir.display()),
        );
        ok.then_some(())
    })
    .expect("pebble answers on :14000");
    p
}

/// The `certificate_expires` of `hostname`'s route, once there is one.
fn cert_expiry(m: &Machine, hostname: &str) -> Option<String> {
    let ls = m.ctl_json(&["route", "ls"]);
    ls["routes"]
        .as_array()?
        .iter()
        .find(|r| r["host"] == hostname)?["certificate_expires"]
        .as_str()
        .map(String::from)
}

#[test]
fn gateway_routes_by_host_and_path_with_acme_certificates() {
    // Three machines, and a fourth host for pebble (no ployzd).
    let tb = Testbed::new(4);
    let founder = Machine::start_in(&tb.hosts[0], &[]);
    founder.ctl_json(&["mesh", "init", "gwtest"]);
    let mut ms = vec![founder];
    for h in &tb.hosts[1..3] {
        let m = Machine::start_in(h, &[]);
        let token = ms[0].invite();
        let s = m.ctl_json(&["machine", "invite", "import", "--token", &token]);
        assert_eq!(s["machine"]["lifecycle"], "active", "{s}");
        ms.push(m);
    }
    let hosts = &tb.hosts[..3];
    let tmp = tempfile::tempdir().unwrap();
    let web = busybox_image(tmp.path(), "ployz-busybox", HTTPD);
    let web = web.to_str().unwrap();
    let api = busybox_image(
        tmp.path(),
        "ployz-busybox-api",
        &[
            "sh",
            "-c",
            "mkdir -p /srv/api && echo api here > /srv/api/index.html && exec httpd -f -p 8080 -h /srv",
        ],
    );
    let api = api.to_str().unwrap();
    ms[0].deploy(&[
        "web",
        "--image",
        web,
        "--replicas",
        "2",
        "--health-http",
        "/index.html:8080",
        "--health-interval",
        "1s",
        "--wait-secs",
        "120",
    ]);
    ms[0].deploy(&["api", "--image", api, "--wait-secs", "120"]);

    // Refusals change nothing: a bad hostname exits 6, an unknown service 4,
    // a taken hostname + path 5 naming its service.
    let o = ms[0].ctl(&[
        "route",
        "add",
        "bad_host!",
        "--service",
        "web",
        "--port",
        "8080",
    ]);
    assert_eq!(o.status.code(), Some(6), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("not a valid hostname"),
        "{}",
        stderr(&o)
    );
    let o = ms[0].ctl(&[
        "route",
        "add",
        "a.test",
        "--service",
        "nope",
        "--port",
        "80",
    ]);
    assert_eq!(o.status.code(), Some(4), "{}", stderr(&o));
    assert!(stderr(&o).contains("no service `nope`"), "{}", stderr(&o));
    ms[0].ctl_json(&[
        "route",
        "add",
        "a.test",
        "--service",
        "web",
        "--port",
        "8080",
    ]);
    let o = ms[1].ctl(&[
        "route",
        "add",
        "A.test",
        "--service",
        "api",
        "--port",
        "8080",
    ]);
    assert_eq!(o.status.code(), Some(5), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("already routed to service `web`"),
        "{}",
        stderr(&o)
    );
    let ls = ms[2].ctl_json(&[
        "route",
        "add",
        "a.test",
        "--path",
        "/api/",
        "--service",
        "api",
        "--port",
        "8080",
    ]);
    let routes = ls["routes"].as_array().unwrap();
    assert_eq!(routes.len(), 2, "{ls:#}");
    assert_eq!(routes[0]["path"], "/", "{ls:#}");
    assert_eq!(routes[0]["service"], "web", "{ls:#}");
    assert_eq!(routes[1]["path"], "/api", "{ls:#}");
    assert_eq!(routes[0]["backends"], 2, "{ls:#}");

    // Every machine answers by Host (within about a second of the route),
    // the longest path prefix wins, an unknown host is a 404.
    for from in hosts {
        for to in hosts {
            let body = eventually(Duration::from_secs(10), || {
                let (ok, b) = get(from, to, "a.test", "/index.html");
                (ok && b == PAGE).then_some(b)
            });
            assert!(
                body.is_some(),
                "{} → {}: {:?}",
                from.ip,
                to.ip,
                get(from, to, "a.test", "/index.html")
            );
        }
        assert_eq!(
            get(from, &hosts[0], "a.test", "/api/index.html").1,
            "api here\n"
        );
        assert_eq!(status(from, &hosts[1], "nobody.test", "/"), "404");
    }
    // HTTP/2 (prior knowledge on the plain port).
    let (ok, v) = curl(
        &hosts[0],
        &format!("--http2-prior-knowledge -o /dev/null -w '%{{http_version}} %{{http_code}}' -H 'Host: a.test' http://{}/index.html", hosts[1].ip),
    );
    assert!(ok && v == "2 200", "{v}");

    // A WebSocket is passed through and spliced both ways: a real
    // WebSocket echo server (tungstenite) behind it, a real client.
    let ws_bin = std::fs::read(env!("CARGO_BIN_EXE_ws-echo")).unwrap();
    let echo = busybox_image_plus(
        tmp.path(),
        "ployz-ws-echo",
        &["ws-echo", "7000"],
        &[("bin/ws-echo", &ws_bin)],
    );
    ms[0].deploy(&[
        "echo",
        "--image",
        echo.to_str().unwrap(),
        "--wait-secs",
        "120",
    ]);
    ms[0].ctl_json(&[
        "route",
        "add",
        "ws.test",
        "--service",
        "echo",
        "--port",
        "7000",
    ]);
    let upgraded = eventually(Duration::from_secs(10), || ws_echo(&hosts[2]).ok());
    assert!(upgraded.is_some(), "{:?}", ws_echo(&hosts[2]));

    // One instance of web killed: every request still answers (the gateway
    // retries another instance when connecting fails), until its record
    // says it is not running and it is skipped.
    let insts = ms[0].ctl_json(&["service", "ls"])["services"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["name"] == "web")
        .unwrap()["instances"]
        .clone();
    let victim = insts[0]["overlay_ip"].as_str().unwrap().to_string();
    kill_instance(&victim);
    for i in 0..30 {
        let (ok, b) = get(&hosts[i % 3], &hosts[(i + 1) % 3], "a.test", "/index.html");
        assert!(ok && b == PAGE, "request {i} after the kill: {b}");
    }

    // A route whose service has no healthy instance: 503 naming the route.
    ms[0].ctl_json(&["service", "rm", "api"]);
    let page = eventually(Duration::from_secs(20), || {
        let (_, b) = get(&hosts[2], &hosts[0], "a.test", "/api/x");
        b.contains("503").then_some(b)
    })
    .expect("a 503 once api is gone");
    assert!(
        page.contains("a.test/api → service api port 8080 has no healthy instance"),
        "{page}"
    );
    assert_eq!(status(&hosts[2], &hosts[0], "a.test", "/api/x"), "503");

    // Metrics count what the gateway answered.
    let metrics = stdout(&hosts[0].sh("curl -s http://127.0.0.1:9101/metrics"));
    assert!(
        metrics.contains("ployz_gateway_requests_total{code=\"200\"}"),
        "{metrics}"
    );
    assert!(
        metrics.contains("ployz_gateway_request_duration_seconds_bucket"),
        "{metrics}"
    );

    // ACME with pebble: HTTP-01 answered by machine 1 (where pebble's
    // /etc/hosts sends s.test), whichever machine orders.
    let pdir = tempfile::tempdir().unwrap();
    let _pebble = pebble(&tb.hosts[3], pdir.path(), &["s.test"], &hosts[1]);
    let directory = format!("https://{}:14000/dir", tb.hosts[3].ip);
    let ca = pdir.path().join("ca.pem");
    let o = ms[0].ctl(&[
        "acme",
        "set",
        "--directory",
        "http://x.test/dir",
        "--email",
        "ops@example.test",
    ]);
    assert_eq!(o.status.code(), Some(6), "{}", stderr(&o));
    let a = ms[0].ctl_json(&[
        "acme",
        "set",
        "--directory",
        &directory,
        "--email",
        "ops@example.test",
        "--ca-file",
        ca.to_str().unwrap(),
    ]);
    assert_eq!(a["directory"], directory.as_str(), "{a:#}");
    assert_eq!(a["custom_ca"], true, "{a:#}");
    ms[1].ctl_json(&[
        "route",
        "add",
        "s.test",
        "--service",
        "web",
        "--port",
        "8080",
        "--tls",
        "acme",
    ]);
    let first = eventually(Duration::from_secs(90), || cert_expiry(&ms[2], "s.test"))
        .unwrap_or_else(|| {
            panic!(
                "no certificate for s.test: {}\n{}",
                ms[0].log(),
                ms[1].log()
            )
        });
    // Pebble's root (new at every start), then every machine serves the
    // chain for s.test over HTTPS, HTTP/2 by ALPN.
    let root = pdir.path().join("root.pem");
    let (ok, pem) = curl(
        &tb.hosts[3],
        &format!(
            "--cacert {} https://{}:15000/roots/0",
            ca.display(),
            tb.hosts[3].ip
        ),
    );
    assert!(ok && pem.contains("BEGIN CERTIFICATE"), "{pem}");
    std::fs::write(&root, pem).unwrap();
    for to in hosts {
        let body = eventually(Duration::from_secs(10), || {
            let (ok, b) = curl(
                &hosts[0],
                &format!("--cacert {} --resolve s.test:443:{} -w ' %{{http_version}}' --http2 https://s.test/index.html", root.display(), to.ip),
            );
            ok.then_some(b)
        });
        assert_eq!(
            body.as_deref(),
            Some(&*format!("{PAGE} 2")),
            "HTTPS via {}",
            to.ip
        );
    }
    // Port 80 redirects a TLS route to HTTPS.
    let (_, r) = curl(&hosts[2], &format!("-o /dev/null -w '%{{http_code}} %{{redirect_url}}' -H 'Host: s.test' http://{}/index.html?q=1", hosts[0].ip));
    assert_eq!(r, "308 https://s.test/index.html?q=1");

    // Renewal: the 60 s certificate is replaced after 40 s, this time by
    // TLS-ALPN-01.
    ms[0].ctl_json(&[
        "acme",
        "set",
        "--directory",
        &directory,
        "--email",
        "ops@example.test",
        "--ca-file",
        ca.to_str().unwrap(),
        "--challenge",
        "tls-alpn-01",
    ]);
    let renewed = eventually(Duration::from_secs(100), || {
        cert_expiry(&ms[0], "s.test").filter(|e| *e != first)
    })
    .unwrap_or_else(|| panic!("s.test was not renewed: {}", ms[0].log()));
    assert!(renewed > first, "{renewed} after {first}");
    let (ok, b) = curl(
        &hosts[2],
        &format!(
            "--cacert {} --resolve s.test:443:{} https://s.test/index.html",
            root.display(),
            hosts[2].ip
        ),
    );
    assert!(ok && b == PAGE, "{b}");
    let log = std::fs::read_to_string(pdir.path().join("pebble.log")).unwrap();
    // The first order validated over HTTP, the renewal's (after the first
    // issue) over TLS-ALPN-01: a new authorization, no HTTP attempt.
    let (before, after) = log.split_once("Issued certificate").expect("issued");
    assert!(
        before.contains("validate w/ HTTP") && before.contains("set VALID"),
        "{log}"
    );
    assert!(
        !after.contains("validate w/ HTTP") && after.contains("set VALID"),
        "{log}"
    );
    let shown = ms[2].ctl_json(&["acme", "show"]);
    assert_eq!(shown["challenge"], "tls-alpn-01", "{shown:#}");
    assert_eq!(shown["certificates"][0]["host"], "s.test", "{shown:#}");
    let metrics = stdout(&hosts[1].sh("curl -s http://127.0.0.1:9101/metrics"));
    assert!(
        metrics.contains("ployz_gateway_certificate_expiry_timestamp_seconds{host=\"s.test\"}"),
        "{metrics}"
    );

    // route rm: one path, then the rest of the host.
    let ls = ms[0].ctl_json(&["route", "rm", "a.test", "--path", "/api"]);
    assert_eq!(ls["routes"].as_array().unwrap().len(), 3, "{ls:#}");
    let o = ms[0].ctl(&["route", "rm", "nothere.test"]);
    assert_eq!(o.status.code(), Some(4), "{}", stderr(&o));
    let ls = ms[0].ctl_json(&["route", "rm", "a.test"]);
    assert_eq!(ls["routes"].as_array().unwrap().len(), 2, "{ls:#}");
    let gone = eventually(Duration::from_secs(10), || {
        (status(&hosts[1], &hosts[1], "a.test", "/") == "404").then_some(())
    });
    assert!(gone.is_some());
}
