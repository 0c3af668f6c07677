//! Host backend against the real kernel (root, cgroup v1): no mocks.

mod common;

use common::{busybox_rootfs, eventually, in_netns, rand_u32, unique, wget, TestNetns};
use ployz_runtime::host::HostEngine;
use ployz_runtime::{
    BridgeNetwork, HostRuntime, Image, NetworkAttachment, Runtime, RuntimeError, State,
    WorkloadSpec,
};
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Deletes the workload even when the test panics.
struct Cleanup {
    root: PathBuf,
    id: String,
    /// The network namespace the runtime ran in (`ip netns` name).
    netns: Option<String>,
}

impl Cleanup {
    fn new(root: &Path, id: &str) -> Self {
        Cleanup {
            root: root.to_path_buf(),
            id: id.to_string(),
            netns: None,
        }
    }

    fn in_netns(root: &Path, id: &str, ns: &TestNetns) -> Self {
        Cleanup {
            root: root.to_path_buf(),
            id: id.to_string(),
            netns: Some(ns.name.clone()),
        }
    }
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        // Deleting never clones, so it is fine on any thread.
        let (root, id) = (self.root.clone(), self.id.clone());
        let delete = move || {
            if let Ok(mut engine) = HostEngine::new(&root) {
                let _ = engine.delete(&id);
            }
        };
        match &self.netns {
            Some(ns) => in_netns(ns, delete),
            None => delete(),
        }
    }
}

fn sh(script: &str) -> Vec<String> {
    vec!["sh".into(), "-c".into(), script.into()]
}

fn memory_cgroup(id: &str) -> PathBuf {
    PathBuf::from(format!("/sys/fs/cgroup/memory/ployz/{id}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lifecycle_logs_limits_and_volume() {
    let tmp = tempfile::tempdir().unwrap();
    let rootfs = busybox_rootfs(&tmp.path().join("rootfs"));
    let vol = tmp.path().join("vol");
    std::fs::create_dir(&vol).unwrap();
    let root = tmp.path().join("rt");
    let rt = HostRuntime::new(&root).unwrap();
    let id = unique("host");
    let _cleanup = Cleanup::new(&root, &id);

    let mut spec = WorkloadSpec::new(
        &id,
        Image::Rootfs(rootfs),
        vec![
            "sh".into(),
            "-c".into(),
            "echo hello; echo from-inside > /data/out.txt; sleep 30".into(),
        ],
    );
    spec.memory_limit = Some(64 << 20);
    spec.cpu_shares = Some(512);
    common::create_with_data_volume(&rt, &mut spec, &vol).await;
    let listed = rt.list().await.unwrap();
    assert!(listed
        .iter()
        .any(|w| w.id == id && w.state == State::Created));

    rt.start(&id).await.unwrap();
    assert_eq!(rt.state(&id).await.unwrap(), State::Running);
    assert!(
        eventually(10, async || rt.logs(&id).await.unwrap().contains("hello")).await,
        "logs: {:?}",
        rt.logs(&id).await
    );
    assert!(
        eventually(10, async || std::fs::read_to_string(vol.join("out.txt"))
            .is_ok_and(|s| s == "from-inside\n"))
        .await
    );

    let limit = std::fs::read_to_string(memory_cgroup(&id).join("memory.limit_in_bytes")).unwrap();
    assert_eq!(limit.trim(), (64u64 << 20).to_string());
    let shares =
        std::fs::read_to_string(format!("/sys/fs/cgroup/cpu/ployz/{id}/cpu.shares")).unwrap();
    assert_eq!(shares.trim(), "512");
    // The workload is inside its cgroup in every hierarchy, not just next to
    // it: its intermediate process joins through `tasks` (the patched
    // libcgroups), and each hierarchy must list the same processes.
    let mut members = Vec::new();
    for hierarchy in std::fs::read_dir("/sys/fs/cgroup").unwrap() {
        let dir = hierarchy.unwrap().path().join("ployz").join(&id);
        if let Ok(procs) = std::fs::read_to_string(dir.join("cgroup.procs")) {
            members.push((dir, procs));
        }
    }
    assert!(members.len() >= 2, "cgroups: {members:?}");
    let (_, first) = &members[0];
    assert!(!first.trim().is_empty(), "no process in {members:?}");
    assert!(
        members.iter().all(|(_, procs)| procs == first),
        "{members:?}"
    );

    // sh as pid 1 ignores SIGTERM: this exercises the SIGKILL fallback.
    rt.stop(&id, Duration::from_millis(500)).await.unwrap();
    assert_eq!(rt.state(&id).await.unwrap(), State::Stopped);
    rt.stop(&id, Duration::from_millis(500)).await.unwrap();

    rt.delete(&id).await.unwrap();
    assert!(matches!(
        rt.state(&id).await,
        Err(RuntimeError::NotFound(_))
    ));
    assert!(matches!(rt.logs(&id).await, Err(RuntimeError::NotFound(_))));
    assert!(!rt.list().await.unwrap().iter().any(|w| w.id == id));
    assert!(!memory_cgroup(&id).exists(), "cgroup left behind");
    for hierarchy in std::fs::read_dir("/sys/fs/cgroup").unwrap() {
        let dir = hierarchy.unwrap().path().join("ployz").join(&id);
        assert!(!dir.exists(), "{} left behind", dir.display());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exit_codes_map_to_stopped_and_failed() {
    let tmp = tempfile::tempdir().unwrap();
    let rootfs = busybox_rootfs(&tmp.path().join("rootfs"));
    let root = tmp.path().join("rt");
    let rt = HostRuntime::new(&root).unwrap();
    let ok = unique("ok");
    let bad = unique("bad");
    let _c1 = Cleanup::new(&root, &ok);
    let _c2 = Cleanup::new(&root, &bad);
    for (id, cmd) in [(&ok, "exit 0"), (&bad, "echo oops >&2; exit 3")] {
        let spec = WorkloadSpec::new(
            id.as_str(),
            Image::Rootfs(rootfs.clone()),
            vec!["sh".into(), "-c".into(), cmd.into()],
        );
        rt.create(&spec).await.unwrap();
        rt.start(id).await.unwrap();
    }
    assert!(eventually(10, async || rt.state(&ok).await.unwrap() == State::Stopped).await);
    assert!(eventually(10, async || rt.state(&bad).await.unwrap() == State::Failed).await);
    assert!(rt.logs(&bad).await.unwrap().contains("oops"));
    // `list` reports how each ended.
    let listed = rt.list().await.unwrap();
    let code = |id: &str| listed.iter().find(|w| w.id == id).unwrap().exit_code;
    assert_eq!((code(&ok), code(&bad)), (Some(0), Some(3)), "{listed:?}");
    assert!(matches!(
        rt.start(&bad).await,
        Err(RuntimeError::InvalidState { .. })
    ));
    rt.delete(&ok).await.unwrap();
    rt.delete(&bad).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refuses_bad_input_with_helpful_errors() {
    let tmp = tempfile::tempdir().unwrap();
    let rt = HostRuntime::new(tmp.path().join("rt")).unwrap();
    let spec = WorkloadSpec::new("x", Image::Reference("busybox".into()), vec!["true".into()]);
    let e = rt.create(&spec).await.unwrap_err();
    assert!(e.to_string().contains("docker runtime"), "{e}");
    assert!(matches!(
        rt.start("nope").await,
        Err(RuntimeError::NotFound(_))
    ));
    assert!(matches!(
        rt.state("../etc").await,
        Err(RuntimeError::InvalidId(_))
    ));
}

/// Two workloads on one bridge inside a test network namespace (standing in
/// for the machine), and a peer namespace behind it standing in for another
/// machine on the mesh: workload to workload, machine to workload, and
/// routed peer to workload (forwarding, default route via the gateway) all work;
/// a routed stranger outside `allow_from` is dropped; bridge and workload
/// interfaces have the requested MTU.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workloads_on_a_bridge_reach_each_other_and_the_mesh() {
    let tmp = tempfile::tempdir().unwrap();
    let rootfs = busybox_rootfs(&tmp.path().join("rootfs"));
    std::fs::create_dir_all(rootfs.join("www")).unwrap();
    std::fs::write(rootfs.join("www/index.html"), "hello from a\n").unwrap();
    let root = tmp.path().join("rt");

    let r = rand_u32();
    let (x, y) = (20 + (r % 200) as u8, (r >> 8) as u8);
    let machine = TestNetns::new("plzt-machine");
    let peer = TestNetns::new("plzt-peer");
    // The "mesh": a veth between machine and peer, peer routes the bridge
    // subnet via the machine (as the TUN route would).
    let (ma, pa) = (Ipv4Addr::new(10, 233, y, 1), Ipv4Addr::new(10, 233, y, 2));
    common::run_ok(
        "ip",
        &[
            "link",
            "add",
            "mesh0",
            "netns",
            &machine.name,
            "type",
            "veth",
            "peer",
            "name",
            "mesh0",
            "netns",
            &peer.name,
        ],
    );
    machine.exec_ok(&["ip", "addr", "add", &format!("{ma}/30"), "dev", "mesh0"]);
    machine.exec_ok(&["ip", "link", "set", "mesh0", "up"]);
    peer.exec_ok(&["ip", "addr", "add", &format!("{pa}/30"), "dev", "mesh0"]);
    peer.exec_ok(&["ip", "link", "set", "mesh0", "up"]);
    let subnet = format!("10.{x}.{y}.0/24");
    peer.exec_ok(&["ip", "route", "add", &subnet, "via", &ma.to_string()]);
    // A stranger: a second address on the peer, outside `allow_from`, that
    // the machine routes back to (so only the firewall can stop it).
    let stranger = Ipv4Addr::new(10, 234, y, 2);
    peer.exec_ok(&[
        "ip",
        "addr",
        "add",
        &format!("{stranger}/32"),
        "dev",
        "mesh0",
    ]);
    machine.exec_ok(&[
        "ip",
        "route",
        "add",
        &format!("{stranger}/32"),
        "via",
        &pa.to_string(),
    ]);

    // New namespaces may inherit forwarding from the host: start without it.
    machine.exec_ok(&["sh", "-c", "echo 0 > /proc/sys/net/ipv4/ip_forward"]);

    let root2 = root.clone();
    let rt = machine.enter(move || HostRuntime::new(root2).unwrap());
    let gateway = Ipv4Addr::new(10, x, y, 1);
    let bridge = format!("plzt{:08x}", r);
    let net = BridgeNetwork {
        bridge: bridge.clone(),
        gateway,
        prefix: 24,
        mtu: Some(1420),
        allow_from: Some(format!("10.233.{y}.0/30")),
    };
    // First without a source range (as an older ployzd left it), then with:
    // the wider accept rule must go.
    rt.ensure_network(&BridgeNetwork {
        allow_from: None,
        ..net.clone()
    })
    .await
    .unwrap();
    rt.ensure_network(&net).await.unwrap();
    rt.ensure_network(&net).await.unwrap(); // idempotent
    let rules = machine.exec_ok(&["iptables", "-S", "FORWARD"]);
    let ours: Vec<&str> = rules.lines().filter(|l| l.contains(&bridge)).collect();
    assert_eq!(ours.len(), 3, "{rules}");
    assert!(
        !rules.contains(&format!("-A FORWARD -o {bridge} -j ACCEPT")),
        "{rules}"
    );
    let link = machine.exec_ok(&["ip", "-o", "link", "show", "dev", &bridge]);
    assert!(link.contains("mtu 1420"), "{link}");
    assert_eq!(
        machine
            .exec_ok(&["cat", "/proc/sys/net/ipv4/ip_forward"])
            .trim(),
        "1"
    );
    let addrs = machine.exec_ok(&["ip", "-4", "-o", "addr", "show", "dev", &bridge]);
    assert!(addrs.contains(&format!("{gateway}/24")), "{addrs}");

    let attach = |last: u8| NetworkAttachment {
        bridge: bridge.clone(),
        address: Ipv4Addr::new(10, x, y, last),
        prefix: 24,
        gateway,
        mtu: Some(1420),
        dns: None,
    };
    let a = unique("net-a");
    let b = unique("net-b");
    let _ca = Cleanup::in_netns(&root, &a, &machine);
    let _cb = Cleanup::in_netns(&root, &b, &machine);
    let a_ip = Ipv4Addr::new(10, x, y, 2);
    let mut spec_a = WorkloadSpec::new(
        &a,
        Image::Rootfs(rootfs.clone()),
        sh("exec httpd -f -p 80 -h /www"),
    );
    spec_a.network = Some(attach(2));
    let mut spec_b = WorkloadSpec::new(
        &b,
        Image::Rootfs(rootfs.clone()),
        sh(&format!(
            "echo mtu=$(cat /sys/class/net/eth0/mtu); i=0; while [ $i -lt 100 ]; do \
               wget -q -O - http://{a_ip}/ && exit 0; i=$((i+1)); sleep 0.1; \
             done; exit 1"
        )),
    );
    spec_b.network = Some(attach(3));

    // Attaching to a bridge that does not exist is refused up front.
    let mut stray = spec_b.clone();
    stray.id = unique("net-stray");
    stray.network.as_mut().unwrap().bridge = "plznope0".into();
    let e = rt.create(&stray).await.unwrap_err();
    assert!(e.to_string().contains("ensure_network"), "{e}");

    rt.create(&spec_a).await.unwrap();
    rt.create(&spec_b).await.unwrap();
    let ports = machine.exec_ok(&["ip", "-o", "link", "show", "master", &bridge]);
    assert_eq!(ports.lines().count(), 2, "{ports}");
    rt.start(&a).await.unwrap();
    rt.start(&b).await.unwrap();

    assert!(
        eventually(20, async || rt.state(&b).await.unwrap() != State::Running).await,
        "b still running"
    );
    assert_eq!(
        rt.state(&b).await.unwrap(),
        State::Stopped,
        "b could not fetch from a: {}",
        rt.logs(&b).await.unwrap()
    );
    assert!(rt.logs(&b).await.unwrap().contains("hello from a"));
    assert!(rt.logs(&b).await.unwrap().contains("mtu=1420"));

    let url = format!("http://{a_ip}/");
    let body = wget(Some(&machine), &url, 10).expect("machine -> workload");
    assert_eq!(body, "hello from a\n");
    let body = wget(Some(&peer), &url, 10).expect("peer over the mesh -> workload");
    assert_eq!(body, "hello from a\n");
    // The stranger reaches the machine but not the workload behind it.
    let src = stranger.to_string();
    peer.exec_ok(&["ping", "-c", "1", "-W", "3", "-I", &src, &ma.to_string()]);
    let out = peer.exec(&["curl", "-s", "-m", "3", "--interface", &src, &url]);
    assert!(!out.status.success(), "a stranger reached the workload");

    rt.delete(&a).await.unwrap();
    rt.delete(&b).await.unwrap();
    let ports = machine.exec_ok(&["ip", "-o", "link", "show", "master", &bridge]);
    assert_eq!(ports.trim(), "", "veths left behind");

    rt.remove_network(&bridge).await.unwrap();
    assert!(!machine
        .exec(&["ip", "link", "show", "dev", &bridge])
        .status
        .success());
    let rules = machine.exec_ok(&["iptables", "-S", "FORWARD"]);
    assert!(!rules.contains(&bridge), "{rules}");
    rt.remove_network(&bridge).await.unwrap(); // best effort, no error
}

/// Without an attachment a workload has its own namespace with only `lo`, up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unattached_workload_has_only_loopback() {
    let tmp = tempfile::tempdir().unwrap();
    let rootfs = busybox_rootfs(&tmp.path().join("rootfs"));
    std::fs::create_dir_all(rootfs.join("www")).unwrap();
    std::fs::write(rootfs.join("www/index.html"), "via loopback\n").unwrap();
    let root = tmp.path().join("rt");
    let rt = HostRuntime::new(&root).unwrap();
    let id = unique("lo");
    let _c = Cleanup::new(&root, &id);
    let spec = WorkloadSpec::new(
        &id,
        Image::Rootfs(rootfs),
        sh(
            "httpd -p 127.0.0.1:8080 -h /www && wget -q -O - http://127.0.0.1:8080/ \
            && cat /proc/net/dev",
        ),
    );
    rt.create(&spec).await.unwrap();
    rt.start(&id).await.unwrap();
    assert!(eventually(10, async || rt.state(&id).await.unwrap() != State::Running).await);
    let logs = rt.logs(&id).await.unwrap();
    assert_eq!(rt.state(&id).await.unwrap(), State::Stopped, "{logs}");
    assert!(logs.contains("via loopback"), "{logs}");
    let ifaces: Vec<&str> = logs
        .lines()
        .filter_map(|l| l.split_once(':').map(|(name, _)| name.trim()))
        .filter(|n| !n.contains(' ') && !n.is_empty() && !n.contains('|'))
        .collect();
    assert_eq!(ifaces, ["lo"], "{logs}");
    rt.delete(&id).await.unwrap();
}

/// Workloads of one image each write to their own overlay layer: never to
/// each other's, never to the shared image directory.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_workload_writes_to_its_own_layer() {
    let tmp = tempfile::tempdir().unwrap();
    let rootfs = busybox_rootfs(&tmp.path().join("rootfs"));
    let root = tmp.path().join("rt");
    let rt = HostRuntime::new(&root).unwrap();
    let a = unique("layer-a");
    let b = unique("layer-b");
    let _ca = Cleanup::new(&root, &a);
    let _cb = Cleanup::new(&root, &b);
    let run =
        |id: &str, script: &str| WorkloadSpec::new(id, Image::Rootfs(rootfs.clone()), sh(script));
    rt.create(&run(
        &a,
        "echo mine > /written-by-a && echo t > /tmp/a && rm /bin/cat && echo a-done",
    ))
    .await
    .unwrap();
    rt.start(&a).await.unwrap();
    assert!(eventually(10, async || rt.state(&a).await.unwrap() != State::Running).await);
    let logs = rt.logs(&a).await.unwrap();
    assert_eq!(rt.state(&a).await.unwrap(), State::Stopped, "{logs}");
    assert!(logs.contains("a-done"), "{logs}");
    let layer = root.join("rootfs").join(&a);
    assert!(layer.join("upper/written-by-a").exists());

    rt.create(&run(
        &b,
        "test ! -e /written-by-a && test ! -e /tmp/a && test -e /bin/cat && echo b-clean",
    ))
    .await
    .unwrap();
    rt.start(&b).await.unwrap();
    assert!(eventually(10, async || rt.state(&b).await.unwrap() != State::Running).await);
    let logs = rt.logs(&b).await.unwrap();
    assert!(logs.contains("b-clean"), "{logs}");

    assert!(
        !rootfs.join("written-by-a").exists(),
        "wrote into the image"
    );
    assert!(!rootfs.join("tmp/a").exists(), "wrote into the image");
    assert!(rootfs.join("bin/cat").exists(), "deleted from the image");

    rt.delete(&a).await.unwrap();
    rt.delete(&b).await.unwrap();
    assert!(!layer.exists(), "layer left behind");
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    assert!(
        !mounts.contains(root.to_str().unwrap()),
        "mount left behind: {mounts}"
    );
}

/// Unmounts a test mount on drop.
struct Unmount(PathBuf);

impl Drop for Unmount {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.0)
            .status();
    }
}

/// When overlayfs cannot be used (here: the layer directory is itself on
/// overlayfs, which it refuses as an upper layer) the workload still runs:
/// read-only root, writable tmpfs /tmp and /run.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_overlayfs_the_root_is_read_only_with_tmpfs() {
    let tmp = tempfile::tempdir().unwrap();
    let rootfs = busybox_rootfs(&tmp.path().join("rootfs"));
    let root = tmp.path().join("rt");
    let layers = root.join("rootfs");
    let ovl = tmp.path().join("ovl");
    for d in [&layers, &ovl.join("l"), &ovl.join("u"), &ovl.join("w")] {
        std::fs::create_dir_all(d).unwrap();
    }
    let opts = format!(
        "lowerdir={},upperdir={},workdir={}",
        ovl.join("l").display(),
        ovl.join("u").display(),
        ovl.join("w").display()
    );
    common::run_ok(
        "mount",
        &[
            "-t",
            "overlay",
            "overlay",
            "-o",
            &opts,
            layers.to_str().unwrap(),
        ],
    );
    let _unmount = Unmount(layers.clone());
    let rt = HostRuntime::new(&root).unwrap();
    let id = unique("ro");
    let _c = Cleanup::new(&root, &id);
    let spec = WorkloadSpec::new(
        &id,
        Image::Rootfs(rootfs.clone()),
        sh(
            "echo t > /tmp/t && cat /tmp/t && touch /run/r && echo run-ok; \
            if echo x > /root-write 2>/dev/null; then echo WRITABLE; else echo read-only; fi",
        ),
    );
    rt.create(&spec).await.unwrap();
    rt.start(&id).await.unwrap();
    assert!(eventually(10, async || rt.state(&id).await.unwrap() != State::Running).await);
    let logs = rt.logs(&id).await.unwrap();
    assert_eq!(rt.state(&id).await.unwrap(), State::Stopped, "{logs}");
    assert!(
        logs.contains("run-ok") && logs.contains("read-only"),
        "{logs}"
    );
    assert!(!rootfs.join("root-write").exists());
    assert!(!rootfs.join("tmp/t").exists());
    rt.delete(&id).await.unwrap();
}

/// Workloads are created while other threads of the process use the
/// environment (`std::env::var`, `Command::spawn` take std's env lock, and
/// ployzd does both on other threads). libcontainer clones without exec, so
/// a child can inherit that lock held by a thread it does not have: its
/// default executor then deadlocked the container init in `remove_var`
/// (seen here, about one create in ten under this load).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn creates_survive_threads_using_the_environment() {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;
    let tmp = tempfile::tempdir().unwrap();
    let rootfs = busybox_rootfs(&tmp.path().join("rootfs"));
    let root = tmp.path().join("rt");
    let rt = HostRuntime::new(&root).unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let readers: Vec<_> = (0..2)
        .map(|_| {
            let stop = stop.clone();
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    std::hint::black_box(std::env::var_os("PATH"));
                }
            })
        })
        .collect();
    let mut cleanups = Vec::new();
    for i in 0..20 {
        let id = unique(&format!("env{i}"));
        cleanups.push(Cleanup::new(&root, &id));
        let spec = WorkloadSpec::new(&id, Image::Rootfs(rootfs.clone()), sh("echo ok"));
        let created = tokio::time::timeout(Duration::from_secs(20), rt.create(&spec)).await;
        let started = match created {
            Ok(r) => {
                r.unwrap();
                tokio::time::timeout(Duration::from_secs(20), rt.start(&id)).await
            }
            Err(e) => Err(e),
        };
        if started.is_err() {
            stop.store(true, Ordering::Relaxed);
            panic!("create/start of workload {i} hung: a cloned child deadlocked");
        }
        started.unwrap().unwrap();
        assert!(
            eventually(10, async || rt.state(&id).await.unwrap() == State::Stopped).await,
            "workload {i} did not finish: {:?}",
            rt.logs(&id).await
        );
        rt.delete(&id).await.unwrap();
    }
    stop.store(true, Ordering::Relaxed);
    for r in readers {
        r.join().unwrap();
    }
}

/// ployzd creates through one zygote for the engine's whole life (a fork per
/// create, not an exec); the workload's init is ployzd's to reap as soon as
/// create returns; a zygote that died is replaced on the next create.
#[test]
fn one_zygote_serves_every_create_and_a_dead_one_is_replaced() {
    let tmp = tempfile::tempdir().unwrap();
    let rootfs = busybox_rootfs(&tmp.path().join("rootfs"));
    let root = tmp.path().join("rt");
    let mut engine = HostEngine::new(&root).unwrap().with_create_helper();
    assert_eq!(
        engine.create_helper_pid(),
        None,
        "started before any create"
    );
    let mut zygotes = Vec::new();
    for (i, code) in [0, 3, 7].into_iter().enumerate() {
        let id = unique(&format!("zyg{i}"));
        let _cleanup = Cleanup::new(&root, &id);
        let spec = WorkloadSpec::new(
            &id,
            Image::Rootfs(rootfs.clone()),
            sh(&format!("exit {code}")),
        );
        engine.create(&spec).unwrap();
        let pid = engine.create_helper_pid().expect("a zygote after a create");
        zygotes.push(pid);
        engine.start(&id).unwrap();
        // A blocking wait right after create: the init must already be ours.
        assert_eq!(
            engine.wait(&id).unwrap(),
            Some(code),
            "exit code of workload {i}"
        );
        engine.delete(&id).unwrap();
        if i == 1 {
            // SAFETY: kill(2) on the zygote's pid, our own child.
            assert_eq!(unsafe { libc::kill(pid as i32, libc::SIGKILL) }, 0);
            // Dead (a zombie until the engine notices), not dying.
            let stat = format!("/proc/{pid}/stat");
            let dead = || {
                std::fs::read_to_string(&stat)
                    .map(|s| {
                        s.rsplit(") ")
                            .next()
                            .is_some_and(|rest| rest.starts_with('Z'))
                    })
                    .unwrap_or(true)
            };
            let deadline = std::time::Instant::now() + Duration::from_secs(10);
            while !dead() {
                assert!(
                    std::time::Instant::now() < deadline,
                    "zygote {pid} survived SIGKILL"
                );
                std::thread::sleep(Duration::from_millis(10));
            }
        }
    }
    assert_eq!(
        zygotes[0], zygotes[1],
        "the second create reused the zygote"
    );
    assert_ne!(
        zygotes[1], zygotes[2],
        "a fresh zygote replaced the killed one"
    );
    drop(engine);
    let comm = format!("/proc/{}/comm", zygotes[2]);
    assert!(
        std::fs::read_to_string(&comm).is_err(),
        "dropping the engine ended its zygote"
    );
}

/// A create that hangs (here: its zygote stopped) fails after the engine's
/// timeout instead of hanging the engine, and the next create gets a fresh
/// zygote.
#[test]
fn a_hung_create_times_out_and_the_next_one_works() {
    let tmp = tempfile::tempdir().unwrap();
    let rootfs = busybox_rootfs(&tmp.path().join("rootfs"));
    let root = tmp.path().join("rt");
    let mut engine = HostEngine::new(&root)
        .unwrap()
        .with_create_helper()
        .with_create_timeout(Duration::from_secs(2));
    let first = unique("hang0");
    let _c0 = Cleanup::new(&root, &first);
    let spec = |id: &str| WorkloadSpec::new(id, Image::Rootfs(rootfs.clone()), sh("exit 0"));
    engine.create(&spec(&first)).unwrap();
    engine.delete(&first).unwrap();
    let stuck = engine.create_helper_pid().unwrap();
    // SAFETY: kill(2) on our own child.
    assert_eq!(unsafe { libc::kill(stuck as i32, libc::SIGSTOP) }, 0);
    let hung = unique("hang1");
    let _c1 = Cleanup::new(&root, &hung);
    let started = std::time::Instant::now();
    let e = engine.create(&spec(&hung)).unwrap_err();
    assert!(e.to_string().contains("did not finish within"), "{e}");
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "{:?}",
        started.elapsed()
    );
    assert!(
        engine.state(&hung).is_err(),
        "no half-created workload left"
    );
    let next = unique("hang2");
    let _c2 = Cleanup::new(&root, &next);
    engine.create(&spec(&next)).unwrap();
    assert_ne!(engine.create_helper_pid(), Some(stuck));
    engine.start(&next).unwrap();
    assert_eq!(engine.wait(&next).unwrap(), Some(0));
    engine.delete(&next).unwrap();
}
