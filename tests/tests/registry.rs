//! Images from a real OCI registry: Debian's `docker-registry` (distribution
//! 2.8) with its own config file in host 0's namespace, one open and one with
//! htpasswd (basic) auth; images pushed with `skopeo`. Deploys 3 replicas by
//! reference on a 3-machine namespace cluster and checks the pinned digest
//! against skopeo's (and again for the image pushed with zstd layers in an
//! OCI manifest); a wrong tag, a wrong password and an unreachable host
//! fail with their exit codes and change nothing.

use ployz_tests::images::{busybox_image, noisy_busybox_image, padded_busybox_image};
use ployz_tests::netns::{Host, Testbed};
use ployz_tests::{bin, eventually, stdout, Machine};
use serde_json::Value;
use std::io::Write;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

const HTTPD: &[&str] = &["httpd", "-f", "-p", "8080", "-h", "/www"];
const USER: &str = "ployzuser";
const PASSWORD: &str = "s3cret-pa55word";

/// Where a registry and skopeo run: a namespace host, or the root namespace
/// (next to dockerd, for the docker runtime).
#[derive(Clone, Copy)]
enum Place<'a> {
    Ns(&'a Host),
    Root,
}

impl Place<'_> {
    fn ip(&self) -> String {
        match self {
            Place::Ns(h) => h.ip.to_string(),
            Place::Root => "127.0.0.1".into(),
        }
    }

    fn command(&self, program: &str) -> Command {
        match self {
            Place::Ns(h) => h.command(program),
            Place::Root => Command::new(program),
        }
    }
}

/// A `docker-registry serve CONFIG` process, killed on drop.
struct Registry {
    child: Child,
    addr: String,
}

impl Registry {
    fn start(host: &Host, dir: &Path, port: u16, htpasswd: bool) -> Registry {
        Registry::start_at(Place::Ns(host), dir, port, htpasswd)
    }

    fn start_at(place: Place, dir: &Path, port: u16, htpasswd: bool) -> Registry {
        let auth = if htpasswd {
            let o = Command::new("htpasswd")
                .args(["-Bbn", USER, PASSWORD])
                .output()
                .expect("htpasswd (apt-get install apache2-utils)");
            assert!(o.status.success());
            let file = dir.join(format!("htpasswd-{port}"));
            std::fs::write(&file, &o.stdout).unwrap();
            format!(
                "auth:\n  htpasswd:\n    realm: ployz-test\n    path: {}\n",
                file.display()
            )
        } else {
            String::new()
        };
        Registry::start_with(place, dir, port, &auth)
    }

    /// A registry whose `auth:` section is `auth` (YAML, may be empty).
    fn start_with(place: Place, dir: &Path, port: u16, auth: &str) -> Registry {
        let addr = format!("{}:{port}", place.ip());
        let root = dir.join(format!("reg-{port}"));
        std::fs::create_dir_all(&root).unwrap();
        let cfg = format!(
            "version: 0.1\nlog:\n  level: warn\nstorage:\n  filesystem:\n    rootdirectory: {}\n\
             http:\n  addr: {addr}\n{auth}",
            root.display()
        );
        let cfg_path = dir.join(format!("registry-{port}.yml"));
        std::fs::write(&cfg_path, cfg).unwrap();
        let log = std::fs::File::create(dir.join(format!("registry-{port}.log"))).unwrap();
        let child = place
            .command("docker-registry")
            .arg("serve")
            .arg(&cfg_path)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("docker-registry (apt-get install docker-registry)");
        let up = eventually(Duration::from_secs(20), || {
            let o = place
                .command("curl")
                .args(["-s", "-o", "/dev/null", "-w", "%{http_code}"])
                .arg(format!("http://{addr}/v2/"))
                .stdin(Stdio::null())
                .output()
                .unwrap();
            let code = stdout(&o);
            (code == "200" || code == "401").then_some(())
        });
        assert!(up.is_some(), "registry at {addr} did not come up");
        Registry { child, addr }
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn skopeo_push(host: &Host, archive: &Path, dest: &str, creds: Option<&str>) {
    skopeo_push_at(Place::Ns(host), archive, dest, creds)
}

fn skopeo_push_at(place: Place, archive: &Path, dest: &str, creds: Option<&str>) {
    skopeo_push_with(place, archive, dest, creds, &[])
}

/// `skopeo copy` with `extra` options (e.g. the manifest format, the layers' compression).
fn skopeo_push_with(place: Place, archive: &Path, dest: &str, creds: Option<&str>, extra: &[&str]) {
    let mut c = place.command("skopeo");
    c.args(["copy", "--dest-tls-verify=false"]).args(extra);
    if let Some(creds) = creds {
        c.args(["--dest-creds", creds]);
    }
    let o = c
        .arg(format!("docker-archive:{}", archive.display()))
        .arg(format!("docker://{dest}"))
        .stdin(Stdio::null())
        .output()
        .expect("skopeo (apt-get install skopeo)");
    assert!(
        o.status.success(),
        "skopeo copy to {dest}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
}

fn skopeo_digest(host: &Host, reference: &str) -> String {
    skopeo_digest_at(Place::Ns(host), reference)
}

fn skopeo_digest_at(place: Place, reference: &str) -> String {
    let o = place
        .command("skopeo")
        .args(["inspect", "--tls-verify=false"])
        .arg(format!("docker://{reference}"))
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let v: Value = serde_json::from_slice(&o.stdout).unwrap();
    v["Digest"].as_str().unwrap().to_string()
}

/// The manifest `reference` points at, as the registry serves it.
fn skopeo_raw_manifest(host: &Host, reference: &str) -> Value {
    let o = Place::Ns(host)
        .command("skopeo")
        .args(["inspect", "--raw", "--tls-verify=false"])
        .arg(format!("docker://{reference}"))
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    serde_json::from_slice(&o.stdout).unwrap()
}

/// `ployzctl registry login HOST --username U --password-stdin --insecure`.
fn login(m: &Machine, host: &str, password: &str) -> std::process::Output {
    let mut c = Command::new(bin("ployzctl"))
        .arg("--socket")
        .arg(m.socket())
        .args([
            "registry",
            "login",
            host,
            "--username",
            USER,
            "--password-stdin",
            "--insecure",
        ])
        .env_remove("PLOYZ_SOCKET")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    writeln!(c.stdin.take().unwrap(), "{password}").unwrap();
    c.wait_with_output().unwrap()
}

/// `/metrics` of the ployzd in `host`'s namespace (its own loopback).
fn scrape_metrics(host: &Host) -> String {
    let out = host
        .command("curl")
        .args(["-sS", "--max-time", "10", "http://127.0.0.1:9101/metrics"])
        .output()
        .expect("curl");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The value of one sample (`name{labels}` exactly as exported), 0 when absent.
fn counter(text: &str, sample: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(sample)?.trim().parse().ok())
        .unwrap_or(0.0)
}

fn service_names(m: &Machine) -> Vec<String> {
    m.ctl_json(&["service", "ls"])["services"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["name"].as_str().unwrap().to_string())
        .collect()
}

/// Images a machine's log says it fetched from a peer after the service
/// record named them (not while the deploy pulled them, not from a registry).
fn fetched_from_peers(log: &str) -> usize {
    log.lines()
        .filter(|l| {
            l.contains("image fetched")
                && !l.contains("while its deploy pulled it")
                && !l.contains("from its registry")
        })
        .count()
}

#[test]
fn deploys_from_a_registry_by_reference_with_pinned_digest_and_clear_errors() {
    let tb = Testbed::new(3);
    // Machine 2 keeps to ChaCha20-Poly1305 on the peer channel, as a machine
    // of an earlier version does: its sessions (raft, rpc, the image it
    // fetches from machine 0) fall back to it, while machines 0 and 1 agree
    // on AES-256-GCM where the CPU has it.
    let ms = ployz_tests::cluster_on_with_env(
        &tb,
        "regtest",
        &[&[], &[], &[("PLOYZ_PEER_CIPHER", "chacha20-poly1305")]],
    );
    let tmp = tempfile::tempdir().unwrap();
    let open = Registry::start(&tb.hosts[0], tmp.path(), 5000, false);
    let authed = Registry::start(&tb.hosts[0], tmp.path(), 5001, true);
    let image = busybox_image(tmp.path(), "ployz-busybox", HTTPD);
    let reference = format!("{}/ployz/busybox:1", open.addr);
    skopeo_push(&tb.hosts[0], &image, &reference, None);
    let private = format!("{}/ployz/busybox:1", authed.addr);
    skopeo_push(
        &tb.hosts[0],
        &image,
        &private,
        Some(&format!("{USER}:{PASSWORD}")),
    );
    let want = skopeo_digest(&tb.hosts[0], &reference);
    let solo = format!("{}/ployz/solo:1", open.addr);
    skopeo_push(&tb.hosts[0], &image, &solo, None);
    let fb = format!("{}/ployz/fb:1", open.addr);
    skopeo_push(&tb.hosts[0], &image, &fb, None);
    let ids: Vec<String> = ms.iter().map(|m| m.id()).collect();

    // Plain HTTP only for a host named insecure.
    let (code, v) = ms[0].try_deploy(&["web", "--image", &reference]);
    assert_ne!(code, Some(0), "{v}");
    assert!(service_names(&ms[0]).is_empty());
    ms[0].ctl_json(&["registry", "add", &open.addr, "--insecure"]);
    let ls = ms[1].ctl_json(&["registry", "ls"]);
    assert_eq!(ls["registries"][0]["host"], open.addr.as_str(), "{ls}");
    assert_eq!(ls["registries"][0]["insecure"], true, "{ls}");

    // Three replicas from the registry, every machine running the pinned digest.
    let v = ms[0].deploy(&["web", "--image", &reference, "--replicas", "3"]);
    let inst = v["instances"].as_array().unwrap();
    assert_eq!(inst.len(), 3, "{v:#}");
    assert!(inst.iter().all(|i| i["state"] == "running"), "{v:#}");
    assert_eq!(v["manifest_digest"], want.as_str(), "{v:#}");
    assert_eq!(v["image"], format!("{reference}@{want}").as_str(), "{v:#}");
    let ls = ms[2].ctl_json(&["service", "ls"]);
    assert_eq!(ls["services"][0]["manifest_digest"], want.as_str(), "{ls}");
    // The other two machines followed the archive while machine 0 pulled it
    // (placement was known when the pull began), not after the record.
    for m in &ms[1..] {
        let log = m.log();
        assert!(
            log.contains("image fetched while its deploy pulled it"),
            "{log}"
        );
        assert_eq!(fetched_from_peers(&log), 0, "{log}");
    }

    // zstd layers: skopeo pushes an image as an OCI manifest with a tar+zstd
    // layer; it runs on every machine like the gzip one. (A layer of its own:
    // skopeo would reuse the gzip blob of a layer the registry already has.)
    let zst = format!("{}/ployz/zstd:1", open.addr);
    let zimage = padded_busybox_image(tmp.path(), "ployz-zstd", HTTPD, 4096);
    skopeo_push_with(
        Place::Ns(&tb.hosts[0]),
        &zimage,
        &zst,
        None,
        &["--format", "oci", "--dest-compress-format", "zstd"],
    );
    let raw = skopeo_raw_manifest(&tb.hosts[0], &zst);
    assert!(
        raw["layers"]
            .as_array()
            .unwrap()
            .iter()
            .all(|l| l["mediaType"] == "application/vnd.oci.image.layer.v1.tar+zstd"),
        "{raw}"
    );
    let want_zst = skopeo_digest(&tb.hosts[0], &zst);
    let v = ms[0].deploy(&["zst", "--image", &zst, "--replicas", "3"]);
    let inst = v["instances"].as_array().unwrap();
    assert_eq!(inst.len(), 3, "{v:#}");
    assert!(inst.iter().all(|i| i["state"] == "running"), "{v:#}");
    assert_eq!(v["manifest_digest"], want_zst.as_str(), "{v:#}");
    ms[0].ctl_json(&["service", "rm", "zst"]);

    // Bare names: an image stored here under that name wins; any other name
    // is a Docker Hub reference (no route to it from the namespaces).
    ms[0].deploy(&["arch", "--image", image.to_str().unwrap()]);
    ms[0].ctl_json(&["service", "rm", "arch"]);
    let v = ms[0].deploy(&["byname", "--image", "ployz-busybox"]);
    assert_eq!(v["instances"][0]["state"], "running", "{v:#}");
    assert!(v["manifest_digest"].is_null(), "{v:#}");
    ms[0].ctl_json(&["service", "rm", "byname"]);
    let (code, v) = ms[0].try_deploy(&["hub", "--image", "ployz-stored-nowhere"]);
    assert!(matches!(code, Some(6 | 7)), "{v}");
    let msg = v["error"]["message"].as_str().unwrap_or_default();
    assert!(msg.contains("registry docker.io"), "{v}");
    assert!(!service_names(&ms[0]).contains(&"hub".to_string()));

    // Peers first: both images are pulled by machine 0 and run there only.
    for id in &ids[1..] {
        ms[0].ctl_json(&["machine", "drain", id]);
    }
    for (name, r) in [("solo", &solo), ("fb", &fb)] {
        let v = ms[0].deploy(&[name, "--image", r]);
        assert_eq!(v["instances"][0]["machine"], ids[0].as_str(), "{v:#}");
    }
    for id in &ids[1..] {
        ms[0].ctl_json(&["machine", "activate", id]);
    }
    // With the registry gone, a machine new to the image gets it from a peer.
    drop(open);
    let fetched = fetched_from_peers(&ms[1].log());
    let v = ms[0].ctl_json(&["service", "migrate", "solo", "--to", &ids[1]]);
    assert_eq!(v["instances"][0]["machine"], ids[1].as_str(), "{v:#}");
    assert_eq!(v["instances"][0]["state"], "running", "{v:#}");
    assert_eq!(
        fetched_from_peers(&ms[1].log()),
        fetched + 1,
        "{}",
        ms[1].log()
    );
    let m1 = scrape_metrics(&tb.hosts[1]);
    assert!(
        counter(&m1, r#"ployz_image_pulls_total{source="peer",result="ok"}"#) >= 1.0,
        "{m1}"
    );
    assert!(
        counter(&m1, r#"ployz_image_pull_bytes_total{source="peer"}"#) > 0.0,
        "{m1}"
    );
    // No peer has it any more (machine 0 lost its copy): from the registry,
    // pinned to the digest, packed into the very archive the service runs.
    let open = Registry::start(&tb.hosts[0], tmp.path(), 5000, false);
    let ls = ms[0].ctl_json(&["service", "ls"]);
    let fb_svc = ls["services"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["name"] == "fb")
        .unwrap()
        .clone();
    let archive = fb_svc["digest"].as_str().unwrap();
    let hex = archive.strip_prefix("sha256:").unwrap();
    std::fs::remove_file(ms[0].data_dir().join("images/blobs").join(hex)).unwrap();
    let v = ms[0].ctl_json(&["service", "migrate", "fb", "--to", &ids[2]]);
    assert_eq!(v["instances"][0]["machine"], ids[2].as_str(), "{v:#}");
    assert_eq!(v["instances"][0]["state"], "running", "{v:#}");
    assert!(
        ms[2].log().contains("image fetched from its registry"),
        "{}",
        ms[2].log()
    );
    assert!(ms[2].data_dir().join("images/blobs").join(hex).is_file());
    let m2 = scrape_metrics(&tb.hosts[2]);
    assert!(
        counter(
            &m2,
            r#"ployz_image_pulls_total{source="registry",result="ok"}"#
        ) >= 1.0,
        "{m2}"
    );
    assert!(
        counter(&m2, r#"ployz_image_pull_bytes_total{source="registry"}"#) > 0.0,
        "{m2}"
    );

    // A wrong tag: exit 6 with the registry's own message; nothing written.
    let (code, v) = ms[0].try_deploy(&[
        "web2",
        "--image",
        &format!("{}/ployz/busybox:nope", open.addr),
    ]);
    assert_eq!(code, Some(6), "{v}");
    let msg = v["error"]["message"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert!(msg.contains("manifest unknown"), "{v}");
    assert!(!service_names(&ms[0]).contains(&"web2".to_string()));

    // A blob that does not match its digest (a layer flipped in the
    // registry's storage): refused, nothing stored, no service.
    let bad = format!("{}/ployz/bad:1", open.addr);
    let bimage = padded_busybox_image(tmp.path(), "ployz-bad", HTTPD, 3000);
    skopeo_push(&tb.hosts[0], &bimage, &bad, None);
    let digests = |r: &str| -> Vec<String> {
        skopeo_raw_manifest(&tb.hosts[0], r)["layers"]
            .as_array()
            .unwrap()
            .iter()
            .map(|l| l["digest"].as_str().unwrap().to_string())
            .collect()
    };
    let shared = digests(&reference);
    let own: Vec<String> = digests(&bad)
        .into_iter()
        .filter(|d| !shared.contains(d))
        .collect();
    assert!(!own.is_empty(), "the image has no layer of its own");
    let hex = own[0].strip_prefix("sha256:").unwrap();
    let data = tmp
        .path()
        .join("reg-5000/docker/registry/v2/blobs/sha256")
        .join(&hex[..2])
        .join(hex)
        .join("data");
    let mut bytes = std::fs::read(&data).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x55;
    std::fs::write(&data, &bytes).unwrap();
    let stored = |m: &Machine| {
        std::fs::read_dir(m.data_dir().join("images/blobs"))
            .unwrap()
            .count()
    };
    let before: Vec<usize> = ms.iter().map(stored).collect();
    // Earlier failed deploys (the plain-HTTP refusal above) failed their
    // followers' prefetches too: count from here.
    let prefetch_failures = |m: &Machine| m.log().matches("prefetch failed").count();
    let failed_before: Vec<usize> = ms.iter().map(prefetch_failures).collect();
    // Three replicas: the other machines follow the pull, and drop what
    // they received when it fails.
    let (code, v) = ms[0].try_deploy(&["bad", "--image", &bad, "--replicas", "3"]);
    assert_eq!(code, Some(6), "{v}");
    let msg = v["error"]["message"].as_str().unwrap_or_default();
    assert!(msg.contains("does not match its digest"), "{v}");
    assert!(msg.contains(&own[0]), "{v}");
    assert!(!service_names(&ms[0]).contains(&"bad".to_string()));
    let leftovers: Vec<_> = std::fs::read_dir(ms[0].data_dir().join("images/tmp"))
        .unwrap()
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
    for (m, was) in ms.iter().zip(&failed_before).skip(1) {
        let failed = eventually(Duration::from_secs(20), || {
            (prefetch_failures(m) > *was).then_some(())
        });
        assert!(failed.is_some(), "{}", m.log());
        let tmp_left: Vec<_> = std::fs::read_dir(m.data_dir().join("images/tmp"))
            .unwrap()
            .collect();
        assert!(tmp_left.is_empty(), "{tmp_left:?}");
    }
    let after: Vec<usize> = ms.iter().map(stored).collect();
    assert_eq!(before, after, "a failed pull stored something");

    // A wrong password: refused at login (exit 8), nothing stored, never
    // printed; without credentials, the deploy is refused (exit 8) too.
    let o = login(&ms[0], &authed.addr, "wrong-password");
    assert_eq!(
        o.status.code(),
        Some(8),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    let said = format!("{}{}", stdout(&o), String::from_utf8_lossy(&o.stderr));
    assert!(said.contains("refused"), "{said}");
    assert!(!said.contains("wrong-password"), "{said}");
    let ls = ms[0].ctl_json(&["registry", "ls"]);
    assert_eq!(ls["registries"].as_array().unwrap().len(), 1, "{ls}");
    ms[0].ctl_json(&["registry", "add", &authed.addr, "--insecure"]);
    let (code, v) = ms[0].try_deploy(&["priv", "--image", &private]);
    assert_eq!(code, Some(8), "{v}");
    assert!(!v.to_string().contains("wrong-password"), "{v}");
    assert!(!service_names(&ms[0]).contains(&"priv".to_string()));

    // The right one: deploys; `registry ls` names the user, never the password.
    let o = login(&ms[0], &authed.addr, PASSWORD);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    for m in &ms {
        assert!(
            !m.log().contains("wrong-password"),
            "a password is in a log"
        );
    }
    // `registry add` again keeps the credentials the login stored.
    ms[0].ctl_json(&["registry", "add", &authed.addr, "--insecure"]);
    let v = ms[1].deploy(&["priv", "--image", &private]);
    assert_eq!(v["instances"][0]["state"], "running", "{v:#}");
    let ls = ms[2].ctl(&["--json", "registry", "ls"]);
    let text = stdout(&ls);
    assert!(text.contains(USER), "{text}");
    assert!(!text.contains(PASSWORD), "{text}");
    for m in &ms {
        assert!(!m.log().contains(PASSWORD), "the password is in a log");
    }

    // An unreachable registry names the host and the address tried.
    let dead = format!("{}:5009", tb.hosts[0].ip);
    ms[0].ctl_json(&["registry", "add", &dead, "--insecure"]);
    let (code, v) = ms[0].try_deploy(&["gone", "--image", &format!("{dead}/x/y:1")]);
    assert_eq!(code, Some(7), "{v}");
    let msg = v["error"]["message"].as_str().unwrap_or_default();
    assert!(msg.contains(&format!("http://{dead}/v2/")), "{v}");
    assert!(!service_names(&ms[0]).contains(&"gone".to_string()));

    // registry rm forgets a host.
    ms[0].ctl_json(&["registry", "rm", &dead]);
    let ls = ms[0].ctl_json(&["registry", "ls"]);
    assert_eq!(ls["registries"].as_array().unwrap().len(), 2, "{ls}");
}

/// Removes what the docker test created in the root namespace, also on
/// failure: the machine (with its containers), its docker network and the
/// iptables rules tagged with it.
struct DockerGuard {
    machine: Option<Machine>,
    network: String,
}

impl Drop for DockerGuard {
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

/// The docker runtime runs a pulled image: ployzd's archive is `docker
/// load`ed and the container serves.
#[test]
fn docker_runtime_runs_an_image_pulled_from_a_registry() {
    let info = Command::new("docker").arg("info").output();
    assert!(
        info.as_ref().is_ok_and(|o| o.status.success()),
        "dockerd is not running: start it (scripts/setup does)"
    );
    let tmp = tempfile::tempdir().unwrap();
    let port = 20000 + (std::process::id() % 20000) as u16;
    let reg = Registry::start_at(Place::Root, tmp.path(), port, false);
    let image = busybox_image(tmp.path(), "ployz-dk-reg", HTTPD);
    let reference = format!("{}/ployz/dk-{}:1", reg.addr, std::process::id());
    skopeo_push_at(Place::Root, &image, &reference, None);
    let want = skopeo_digest_at(Place::Root, &reference);

    let octet = 128 + ((std::process::id() + 50) % 100) as u8;
    let cidr = format!("10.{octet}.0.0/16");
    let m = Machine::start_with(&["--runtime", "docker"]);
    m.ctl_json(&["mesh", "init", "dockerreg", "--cidr", &cidr]);
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
    m.ctl_json(&["registry", "add", &reg.addr, "--insecure"]);
    let v = m.deploy(&["web", "--image", &reference]);
    assert_eq!(v["manifest_digest"], want.as_str(), "{v:#}");
    assert_eq!(v["instances"][0]["state"], "running", "{v:#}\n{}", m.log());
    let ip = v["instances"][0]["overlay_ip"]
        .as_str()
        .unwrap()
        .to_string();
    let page = eventually(Duration::from_secs(20), || {
        let o = Command::new("curl")
            .args(["-sf", "-m", "3", &format!("http://{ip}:8080/")])
            .output()
            .unwrap();
        o.status.success().then(|| stdout(&o))
    });
    assert_eq!(
        page.as_deref(),
        Some("hello from a ployz workload\n"),
        "the container serves"
    );
    m.ctl_json(&["service", "rm", "web"]);
    // Images docker loaded are left to docker: remove this test's.
    let _ = Command::new("docker").args(["rmi", &reference]).output();
}

/// The token service of the Docker registry token protocol, the counterpart
/// a registry configured with `auth: token:` sends clients to (the registry
/// itself is the real `docker-registry`; it checks every token this signs):
/// `GET /token?service=S&scope=repository:NAME:ACTIONS` with basic auth
/// answers a JWT (ES256, the signing certificate in `x5c`) granting the
/// requested scopes to `USER` with `PASSWORD`, and 401 to anyone else.
struct TokenServer {
    realm: String,
    /// The certificate the registry trusts (`rootcertbundle`).
    cert: std::path::PathBuf,
    /// Users that were given a token, one entry per token.
    issued: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
    /// Token requests refused (bad or missing credentials).
    refused: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

const TOKEN_SERVICE: &str = "ployz-test-registry";
const TOKEN_ISSUER: &str = "ployz-test-issuer";

impl TokenServer {
    fn start(ip: std::net::Ipv4Addr, dir: &Path) -> TokenServer {
        use std::sync::atomic::{AtomicBool, AtomicUsize};
        use std::sync::{Arc, Mutex};
        let key = dir.join("token-key.pem");
        let cert = dir.join("token-cert.pem");
        let o = Command::new("openssl")
            .args([
                "req",
                "-x509",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:P-256",
            ])
            .args([
                "-nodes",
                "-days",
                "2",
                "-subj",
                "/CN=ployz-test-token-issuer",
            ])
            .arg("-keyout")
            .arg(&key)
            .arg("-out")
            .arg(&cert)
            .output()
            .expect("openssl");
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let o = Command::new("openssl")
            .args(["x509", "-outform", "DER", "-in"])
            .arg(&cert)
            .output()
            .unwrap();
        assert!(o.status.success());
        let cert_der = o.stdout;
        let listener = std::net::TcpListener::bind((ip, 0)).unwrap();
        listener.set_nonblocking(true).unwrap();
        let realm = format!("http://{}/token", listener.local_addr().unwrap());
        let issued = Arc::new(Mutex::new(Vec::new()));
        let refused = Arc::new(AtomicUsize::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let (i, r, st, k) = (issued.clone(), refused.clone(), stop.clone(), key.clone());
        std::thread::spawn(move || {
            while !st.load(std::sync::atomic::Ordering::Relaxed) {
                match listener.accept() {
                    Ok((conn, _)) => {
                        conn.set_nonblocking(false).unwrap();
                        let _ = serve_token(conn, &k, &cert_der, &i, &r);
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(20)),
                }
            }
        });
        TokenServer {
            realm,
            cert,
            issued,
            refused,
            stop,
        }
    }

    /// The registry's `auth:` section for this token service.
    fn registry_auth(&self) -> String {
        format!(
            "auth:\n  token:\n    realm: {}\n    service: {TOKEN_SERVICE}\n    issuer: {TOKEN_ISSUER}\n    rootcertbundle: {}\n",
            self.realm,
            self.cert.display()
        )
    }
}

impl Drop for TokenServer {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
    }
}

fn b64url(bytes: &[u8]) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

/// An ECDSA signature in DER (`SEQUENCE { INTEGER r, INTEGER s }`, what
/// openssl prints) as JWS wants it: r and s, 32 bytes each.
fn der_signature_to_jws(der: &[u8]) -> Vec<u8> {
    fn int(b: &[u8]) -> (&[u8], &[u8]) {
        assert_eq!(b[0], 0x02, "INTEGER");
        let n = b[1] as usize;
        (&b[2..2 + n], &b[2 + n..])
    }
    assert_eq!(der[0], 0x30, "SEQUENCE");
    let body = if der[1] & 0x80 != 0 {
        &der[3..]
    } else {
        &der[2..]
    };
    let (r, rest) = int(body);
    let (s, _) = int(rest);
    let mut out = Vec::new();
    for x in [r, s] {
        let x: Vec<u8> = x.iter().copied().skip_while(|b| *b == 0).collect();
        out.extend(std::iter::repeat_n(0u8, 32 - x.len()));
        out.extend(x);
    }
    out
}

fn serve_token(
    mut conn: std::net::TcpStream,
    key: &Path,
    cert_der: &[u8],
    issued: &std::sync::Mutex<Vec<String>>,
    refused: &std::sync::atomic::AtomicUsize,
) -> std::io::Result<()> {
    use base64::Engine as _;
    use std::io::{BufRead, BufReader};
    conn.set_read_timeout(Some(Duration::from_secs(10)))?;
    let mut reader = BufReader::new(conn.try_clone()?);
    let mut request_line = String::new();
    reader.read_line(&mut request_line)?;
    let mut user = None;
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line)? == 0 || line.trim().is_empty() {
            break;
        }
        let (name, value) = line.split_once(':').unwrap_or_default();
        if name.eq_ignore_ascii_case("authorization") {
            let value = value.trim();
            if let Some(b) = value.strip_prefix("Basic ") {
                let raw = base64::engine::general_purpose::STANDARD
                    .decode(b)
                    .unwrap_or_default();
                let text = String::from_utf8_lossy(&raw).to_string();
                if text == format!("{USER}:{PASSWORD}") {
                    user = Some(USER.to_string());
                }
            }
        }
    }
    let target = request_line.split_whitespace().nth(1).unwrap_or_default();
    let query = target.split_once('?').map(|(_, q)| q).unwrap_or_default();
    let Some(user) = user.filter(|_| request_line.starts_with("GET /token")) else {
        refused.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let body = r#"{"errors":[{"code":"UNAUTHORIZED","message":"bad credentials"}]}"#;
        return write!(
            conn,
            "HTTP/1.1 401 Unauthorized\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        );
    };
    // Grant exactly the scopes asked for.
    let mut access = Vec::new();
    for (k, v) in query.split('&').filter_map(|kv| kv.split_once('=')) {
        if k != "scope" {
            continue;
        }
        let v = v
            .replace("%3A", ":")
            .replace("%2F", "/")
            .replace("%2C", ",");
        let mut parts = v.splitn(3, ':');
        let (Some(kind), Some(name), Some(actions)) = (parts.next(), parts.next(), parts.next())
        else {
            continue;
        };
        access.push(serde_json::json!({
            "type": kind, "name": name,
            "actions": actions.split(',').collect::<Vec<_>>(),
        }));
    }
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let header = serde_json::json!({
        "alg": "ES256", "typ": "JWT",
        "x5c": [base64::engine::general_purpose::STANDARD.encode(cert_der)],
    });
    let claims = serde_json::json!({
        "iss": TOKEN_ISSUER, "sub": user, "aud": TOKEN_SERVICE,
        "exp": now + 300, "nbf": now - 10, "iat": now,
        "jti": format!("{now}-{}", issued.lock().unwrap().len()),
        "access": access,
    });
    let signing_input = format!(
        "{}.{}",
        b64url(header.to_string().as_bytes()),
        b64url(claims.to_string().as_bytes())
    );
    let mut sign = Command::new("openssl")
        .args(["dgst", "-sha256", "-sign"])
        .arg(key)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()?;
    sign.stdin
        .take()
        .unwrap()
        .write_all(signing_input.as_bytes())?;
    let der = sign.wait_with_output()?.stdout;
    let token = format!("{signing_input}.{}", b64url(&der_signature_to_jws(&der)));
    issued.lock().unwrap().push(user);
    let body =
        serde_json::json!({"token": token, "access_token": token, "expires_in": 300}).to_string();
    write!(
        conn,
        "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
}

#[test]
fn bearer_token_registry_login_and_deploy() {
    let tb = Testbed::new(2);
    let ms = ployz_tests::cluster_on(&tb, "tokentest");
    let tmp = tempfile::tempdir().unwrap();
    let tokens = TokenServer::start(tb.gateway(), tmp.path());
    let reg = Registry::start_with(
        Place::Ns(&tb.hosts[0]),
        tmp.path(),
        5002,
        &tokens.registry_auth(),
    );
    // The registry asks for a bearer token, naming the token service.
    let o = tb.hosts[1]
        .command("curl")
        .args(["-s", "-D", "-", "-o", "/dev/null"])
        .arg(format!("http://{}/v2/", reg.addr))
        .output()
        .unwrap();
    let head = stdout(&o);
    assert!(head.contains("401"), "{head}");
    assert!(
        head.contains(&format!("Bearer realm=\"{}\"", tokens.realm)),
        "{head}"
    );

    let image = busybox_image(tmp.path(), "ployz-busybox", HTTPD);
    let reference = format!("{}/ployz/busybox:1", reg.addr);
    skopeo_push(
        &tb.hosts[0],
        &image,
        &reference,
        Some(&format!("{USER}:{PASSWORD}")),
    );
    let o = tb.hosts[0]
        .command("skopeo")
        .args(["inspect", "--tls-verify=false", "--creds"])
        .arg(format!("{USER}:{PASSWORD}"))
        .arg(format!("docker://{reference}"))
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let want: Value = serde_json::from_slice(&o.stdout).unwrap();
    let want = want["Digest"].as_str().unwrap().to_string();
    ms[0].ctl_json(&["registry", "add", &reg.addr, "--insecure"]);

    // No credentials: the token service refuses, so does the deploy (8);
    // nothing is created.
    let (code, v) = ms[0].try_deploy(&["tok", "--image", &reference]);
    assert_eq!(code, Some(8), "{v}");
    assert!(!service_names(&ms[0]).contains(&"tok".to_string()));

    // A wrong password is refused by the token service at login, stores
    // nothing and is never printed.
    let refused_before = tokens.refused.load(std::sync::atomic::Ordering::Relaxed);
    let o = login(&ms[0], &reg.addr, "wrong-password");
    assert_eq!(
        o.status.code(),
        Some(8),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(!String::from_utf8_lossy(&o.stderr).contains("wrong-password"));
    assert!(tokens.refused.load(std::sync::atomic::Ordering::Relaxed) > refused_before);

    // The right password: login gets a token, the deploy pulls with one
    // (on the deploying machine) and runs the pinned digest on both.
    let before = tokens.issued.lock().unwrap().len();
    let o = login(&ms[0], &reg.addr, PASSWORD);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(tokens.issued.lock().unwrap().len() > before);
    let before = tokens.issued.lock().unwrap().len();
    let v = ms[1].deploy(&["tok", "--image", &reference, "--replicas", "2"]);
    for i in v["instances"].as_array().unwrap() {
        assert_eq!(i["state"], "running", "{v:#}");
    }
    assert!(
        tokens.issued.lock().unwrap().len() > before,
        "no token was used"
    );
    let ls = ms[0].ctl_json(&["service", "ls"]);
    let svc = ls["services"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["name"] == "tok")
        .unwrap()
        .clone();
    assert_eq!(svc["manifest_digest"], want.as_str(), "{svc:#}");

    // A pull that takes a while reports its bytes; without a terminal the
    // transfer prints one line with the image's size, not one per report.
    let noisy = noisy_busybox_image(tmp.path(), "ployz-noisy", HTTPD, 3 << 20);
    let noisy_ref = format!("{}/ployz/noisy:1", reg.addr);
    skopeo_push(
        &tb.hosts[0],
        &noisy,
        &noisy_ref,
        Some(&format!("{USER}:{PASSWORD}")),
    );
    let o = ms[0].ctl(&["deploy", "service", "noisy", "--image", &noisy_ref]);
    let err = String::from_utf8_lossy(&o.stderr).to_string();
    assert!(o.status.success(), "{err}");
    let pulls: Vec<&str> = err
        .lines()
        .filter(|l| l.starts_with(&format!("[noisy] image pull {noisy_ref}")))
        .collect();
    assert_eq!(pulls.len(), 1, "{err}");
    assert!(pulls[0].ends_with(" MiB)"), "{err}");
    for m in &ms {
        assert!(!m.log().contains(PASSWORD), "the password is in a log");
    }
}
