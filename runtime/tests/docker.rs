//! Docker backend against a real dockerd (started here if it is not running).

mod common;

use common::{busybox_rootfs, eventually, rand_u32, run_ok, unique, wget, TestNetns};
use hyper::Method;
use ployz_runtime::dockerd::Body;
use ployz_runtime::{
    BridgeNetwork, DockerRuntime, Image, NetworkAttachment, Runtime, RuntimeError, State,
    WorkloadSpec,
};
use std::net::Ipv4Addr;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

/// The full `Id` dockerd reports for the object at `path` (an inspect endpoint).
async fn object_id(rt: &DockerRuntime, path: &str) -> String {
    let info = rt
        .client()
        .json(Method::GET, path, Body::Empty)
        .await
        .unwrap();
    info["Id"]
        .as_str()
        .expect("an inspect answer has an Id")
        .to_string()
}

fn docker_ok() -> bool {
    Command::new("docker")
        .arg("info")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

fn ensure_dockerd() {
    if docker_ok() {
        return;
    }
    // Left running for later tests (like the brief's `dockerd &`): the shell
    // backgrounds it and exits.
    let started = Command::new("sh")
        .args(["-c", "dockerd >/var/log/dockerd.log 2>&1 &"])
        .status()
        .expect("run sh to start dockerd");
    assert!(
        started.success(),
        "could not start dockerd (install docker.io)"
    );
    for _ in 0..300 {
        if docker_ok() {
            return;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!("dockerd did not come up in 30 s: see /var/log/dockerd.log");
}

/// Removes the test's containers, networks (with their iptables rules),
/// root-namespace links and image, also on panic.
struct Cleanup {
    containers: Vec<String>,
    image: String,
    /// (docker network name, subnet)
    networks: Vec<(String, String)>,
    links: Vec<String>,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        for c in &self.containers {
            let _ = Command::new("docker").args(["rm", "-f", c]).output();
        }
        for (name, subnet) in &self.networks {
            let _ = Command::new("docker")
                .args(["network", "rm", name])
                .output();
            for chain in ["DOCKER-USER", "FORWARD"] {
                let Ok(listing) = Command::new("iptables").args(["-S", chain]).output() else {
                    continue;
                };
                for rule in String::from_utf8_lossy(&listing.stdout).lines() {
                    if let Some(rest) = rule.strip_prefix(&format!("-A {chain} ")) {
                        if rest.contains(&format!("-d {subnet} ")) {
                            let mut args = vec!["-D", chain];
                            // iptables quotes comments; no shell to unquote them.
                            args.extend(rest.split_whitespace().map(|w| w.trim_matches('"')));
                            let _ = Command::new("iptables").args(&args).output();
                        }
                    }
                }
            }
        }
        for l in &self.links {
            let _ = Command::new("ip").args(["link", "del", l]).output();
        }
        if !self.image.is_empty() {
            let _ = Command::new("docker")
                .args(["rmi", "-f", &self.image])
                .output();
        }
    }
}

/// `docker import`s the busybox rootfs at `rootfs` as `tag`.
fn import_busybox(rootfs: &Path, tag: &str) {
    let tar = rootfs.with_extension("tar");
    assert!(Command::new("tar")
        .arg("-C")
        .arg(rootfs)
        .arg("-cf")
        .arg(&tar)
        .arg(".")
        .status()
        .unwrap()
        .success());
    assert!(Command::new("docker")
        .arg("import")
        .arg(&tar)
        .arg(tag)
        .stdout(Stdio::null())
        .status()
        .unwrap()
        .success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn docker_lifecycle() {
    ensure_dockerd();
    let tmp = tempfile::tempdir().unwrap();
    let rootfs = busybox_rootfs(&tmp.path().join("rootfs"));
    let vol = tmp.path().join("vol");
    std::fs::create_dir(&vol).unwrap();
    let id = unique("ployz-dk");
    let bad = unique("ployz-dk-bad");
    let tag = format!("ployz-test-busybox:{}", unique("t"));
    let _cleanup = Cleanup {
        containers: vec![id.clone(), bad.clone()],
        image: tag.clone(),
        networks: Vec::new(),
        links: Vec::new(),
    };
    import_busybox(&rootfs, &tag);

    let rt = DockerRuntime::connect().unwrap();
    let mut spec = WorkloadSpec::new(
        &id,
        Image::Reference(tag.clone()),
        vec![
            "sh".into(),
            "-c".into(),
            "echo hello; echo from-inside > /data/out.txt; sleep 30".into(),
        ],
    );
    spec.memory_limit = Some(64 << 20);
    common::create_with_data_volume(&rt, &mut spec, &vol).await;
    assert!(rt.list().await.unwrap().iter().any(|w| w.id == id));

    rt.start(&id).await.unwrap();
    assert_eq!(rt.state(&id).await.unwrap(), State::Running);
    assert!(eventually(10, async || rt.logs(&id).await.unwrap().contains("hello")).await);
    // exec: exit code, both streams, and only the tail of a long output.
    let out = rt
        .exec(
            &id,
            &[
                "sh".into(),
                "-c".into(),
                "echo to-out; echo to-err >&2; exit 3".into(),
            ],
            Duration::from_secs(10),
        )
        .await
        .unwrap();
    assert_eq!(out.exit_code, Some(3), "{out:?}");
    assert!(
        out.output.contains("to-out") && out.output.contains("to-err"),
        "{out:?}"
    );
    let long = "i=0; while [ $i -lt 3000 ]; do echo line-$i; i=$((i+1)); done";
    let out = rt
        .exec(
            &id,
            &["sh".into(), "-c".into(), long.into()],
            Duration::from_secs(10),
        )
        .await
        .unwrap();
    assert_eq!(out.exit_code, Some(0), "{out:?}");
    assert!(
        out.output.len() <= ployz_runtime::EXEC_OUTPUT_MAX,
        "{}",
        out.output.len()
    );
    assert!(
        out.output.trim_end().ends_with("line-2999"),
        "{:?}",
        out.output.get(..80)
    );
    assert!(!out.output.contains("line-0\n"));
    assert!(eventually(10, async || vol.join("out.txt").exists()).await);
    assert_eq!(
        std::fs::read_to_string(vol.join("out.txt")).unwrap(),
        "from-inside\n"
    );
    let full = object_id(&rt, &format!("/containers/{id}/json")).await;
    let limit = std::fs::read_to_string(format!(
        "/sys/fs/cgroup/memory/docker/{full}/memory.limit_in_bytes"
    ))
    .unwrap();
    assert_eq!(limit.trim(), (64u64 << 20).to_string());

    rt.stop(&id, Duration::from_secs(1)).await.unwrap();
    assert_eq!(rt.state(&id).await.unwrap(), State::Stopped);
    rt.delete(&id).await.unwrap();
    assert!(matches!(
        rt.state(&id).await,
        Err(RuntimeError::NotFound(_))
    ));
    assert!(!rt.list().await.unwrap().iter().any(|w| w.id == id));

    // A workload that fails on its own.
    let spec = WorkloadSpec::new(
        &bad,
        Image::Reference(tag.clone()),
        vec!["sh".into(), "-c".into(), "exit 3".into()],
    );
    rt.create(&spec).await.unwrap();
    rt.start(&bad).await.unwrap();
    assert!(eventually(10, async || rt.state(&bad).await.unwrap() == State::Failed).await);
    let listed = rt.list().await.unwrap();
    let status = listed.iter().find(|w| w.id == bad).unwrap();
    assert_eq!(status.exit_code, Some(3), "{listed:?}");
    rt.delete(&bad).await.unwrap();
}

/// A container on a ployz bridge network at a fixed address answers the
/// host and a peer namespace routed through the host (standing in for
/// another machine on the mesh): dockerd's FORWARD and raw-table rules must
/// not drop that.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn docker_network_fixed_address_is_routable() {
    ensure_dockerd();
    let tmp = tempfile::tempdir().unwrap();
    let rootfs = busybox_rootfs(&tmp.path().join("rootfs"));
    std::fs::create_dir_all(rootfs.join("www")).unwrap();
    std::fs::write(rootfs.join("www/index.html"), "hello from docker\n").unwrap();
    let tag = format!("ployz-test-busybox:{}", unique("n"));
    let r = rand_u32();
    let (x, y) = (200 + (r % 50) as u8, (r >> 8) as u8);
    let bridge = format!("plzd{:08x}", r);
    let subnet = format!("10.{x}.{y}.0/24");
    let id = unique("ployz-dk-net");
    let veth = format!("plzdv{:08x}", r);
    let mut cleanup = Cleanup {
        containers: vec![id.clone()],
        image: tag.clone(),
        networks: vec![(bridge.clone(), subnet.clone())],
        links: vec![veth.clone()],
    };
    import_busybox(&rootfs, &tag);

    let rt = DockerRuntime::connect().unwrap();
    let gateway = Ipv4Addr::new(10, x, y, 1);
    let peer_range = format!("10.234.{y}.0/30");
    let net = BridgeNetwork {
        bridge: bridge.clone(),
        gateway,
        prefix: 24,
        mtu: Some(1420),
        allow_from: Some(peer_range.clone()),
    };
    rt.ensure_network(&net).await.unwrap();
    rt.ensure_network(&net).await.unwrap(); // idempotent
                                            // Both tagged as ployzd's own.
    let fw_tag = format!("ployz:{bridge}");
    let comment = ["-m", "comment", "--comment", fw_tag.as_str()];
    let mut accept = vec!["-C", "DOCKER-USER", "-s", &peer_range, "-d", &subnet];
    accept.extend(comment);
    accept.extend(["-j", "ACCEPT"]);
    run_ok("iptables", &accept);
    let mut drop = vec!["-C", "DOCKER-USER", "-d", &subnet];
    drop.extend(comment);
    drop.extend(["-j", "DROP"]);
    run_ok("iptables", &drop);
    let rules = run_ok("iptables", &["-S", "DOCKER-USER"]);
    assert_eq!(rules.matches(&subnet).count(), 2, "{rules}");
    // The docker network's bridge carries the requested name.
    run_ok("ip", &["link", "show", "dev", &bridge]);

    let addr = Ipv4Addr::new(10, x, y, 5);
    let mut spec = WorkloadSpec::new(
        &id,
        Image::Reference(tag.clone()),
        vec![
            "httpd".into(),
            "-f".into(),
            "-p".into(),
            "80".into(),
            "-h".into(),
            "/www".into(),
        ],
    );
    spec.network = Some(NetworkAttachment {
        bridge: bridge.clone(),
        address: addr,
        prefix: 24,
        gateway,
        mtu: Some(1420),
        dns: None,
    });
    rt.create(&spec).await.unwrap();
    rt.start(&id).await.unwrap();
    let mtu = run_ok("docker", &["exec", &id, "cat", "/sys/class/net/eth0/mtu"]);
    assert_eq!(mtu.trim(), "1420");

    let url = format!("http://{addr}/");
    assert_eq!(
        wget(None, &url, 10).expect("host -> container"),
        "hello from docker\n"
    );

    // A "remote machine": a namespace behind a veth, routing the subnet via us.
    let peer = TestNetns::new("plzt-dpeer");
    let (ha, pa) = (Ipv4Addr::new(10, 234, y, 1), Ipv4Addr::new(10, 234, y, 2));
    run_ok(
        "ip",
        &[
            "link", "add", &veth, "type", "veth", "peer", "name", "mesh0", "netns", &peer.name,
        ],
    );
    run_ok("ip", &["addr", "add", &format!("{ha}/30"), "dev", &veth]);
    run_ok("ip", &["link", "set", &veth, "up"]);
    peer.exec_ok(&["ip", "addr", "add", &format!("{pa}/30"), "dev", "mesh0"]);
    peer.exec_ok(&["ip", "link", "set", "mesh0", "up"]);
    peer.exec_ok(&["ip", "route", "add", &subnet, "via", &ha.to_string()]);
    assert_eq!(
        wget(Some(&peer), &url, 10).expect("routed peer -> container"),
        "hello from docker\n"
    );
    // A stranger outside `allow_from` that this host routes back to reaches
    // the host but not the container.
    let stranger = Ipv4Addr::new(10, 235, y, 2);
    let src = stranger.to_string();
    peer.exec_ok(&["ip", "addr", "add", &format!("{src}/32"), "dev", "mesh0"]);
    let back = format!("{src}/32");
    run_ok("ip", &["route", "add", &back, "via", &pa.to_string()]);
    peer.exec_ok(&["ping", "-c", "1", "-W", "3", "-I", &src, &ha.to_string()]);
    let out = peer.exec(&["curl", "-s", "-m", "3", "--interface", &src, &url]);
    let _ = Command::new("ip").args(["route", "del", &back]).output();
    assert!(!out.status.success(), "a stranger reached the container");

    rt.delete(&id).await.unwrap();
    rt.remove_network(&bridge).await.unwrap();
    let rules = run_ok("iptables", &["-S", "DOCKER-USER"]);
    assert!(!rules.contains(&subnet), "{rules}");
    assert!(!Command::new("docker")
        .args(["network", "inspect", &bridge])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .unwrap()
        .success());
    rt.remove_network(&bridge).await.unwrap(); // best effort, no error
    cleanup.networks.clear();
}

/// `docker save` of a test image, removed from dockerd, loaded back through
/// `load_image`, then run by tag and by image id.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn load_saved_image_and_run_it() {
    ensure_dockerd();
    let tmp = tempfile::tempdir().unwrap();
    let rootfs = busybox_rootfs(&tmp.path().join("rootfs"));
    let tag = format!("ployz-test-busybox:{}", unique("load"));
    let by_tag = unique("ployz-dk-tag");
    let by_id = unique("ployz-dk-id");
    let _cleanup = Cleanup {
        containers: vec![by_tag.clone(), by_id.clone()],
        image: tag.clone(),
        networks: Vec::new(),
        links: Vec::new(),
    };
    import_busybox(&rootfs, &tag);
    let rt = DockerRuntime::connect().unwrap();
    let image_id = object_id(&rt, &format!("/images/{tag}/json")).await;
    assert!(image_id.starts_with("sha256:"), "{image_id}");
    let archive = tmp.path().join("saved.tar");
    run_ok("docker", &["save", "-o", archive.to_str().unwrap(), &tag]);
    run_ok("docker", &["rmi", &tag]);
    assert!(!rt.has_image(&tag).await.unwrap());
    assert!(!rt.has_image(&image_id).await.unwrap());

    rt.load_image(&archive).await.unwrap();
    assert!(rt.has_image(&tag).await.unwrap());
    assert!(rt.has_image(&image_id).await.unwrap());
    rt.load_image(&archive).await.unwrap(); // loading twice is fine

    for (id, reference) in [(&by_tag, &tag), (&by_id, &image_id)] {
        let spec = WorkloadSpec::new(
            id.as_str(),
            Image::Reference(reference.clone()),
            vec!["echo".into(), format!("ran {reference}")],
        );
        rt.create(&spec).await.unwrap();
        rt.start(id).await.unwrap();
        assert!(eventually(10, async || rt.state(id).await.unwrap() == State::Stopped).await);
        assert!(rt.logs(id).await.unwrap().contains("ran "));
        rt.delete(id).await.unwrap();
    }

    // Errors name the archive.
    let missing = tmp.path().join("missing.tar");
    let e = rt.load_image(&missing).await.unwrap_err();
    assert!(e.to_string().contains("missing.tar"), "{e}");
    let garbage = tmp.path().join("garbage.tar");
    std::fs::write(&garbage, b"this is not a tar archive").unwrap();
    let e = rt.load_image(&garbage).await.unwrap_err();
    assert!(
        matches!(e, RuntimeError::ImageLoad { .. }) && e.to_string().contains("garbage.tar"),
        "{e}"
    );
}
