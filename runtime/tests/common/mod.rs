//! Shared test fixtures: a busybox rootfs and unique names.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{SystemTime, UNIX_EPOCH};

pub const BUSYBOX: &str = "/bin/busybox";

/// A name no other test run uses (pid + clock).
pub fn unique(prefix: &str) -> String {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .subsec_nanos();
    format!("{prefix}-{}-{nanos}", std::process::id())
}

/// Builds a minimal busybox root filesystem at `dir` and returns it.
pub fn busybox_rootfs(dir: &Path) -> PathBuf {
    assert!(
        Path::new(BUSYBOX).exists(),
        "{BUSYBOX} is missing: install Debian's busybox-static (apt-get install -y busybox-static)"
    );
    let out = Command::new(BUSYBOX).arg("--help").output().unwrap();
    assert!(
        !String::from_utf8_lossy(&out.stdout).contains("dynamically"),
        "need a static busybox"
    );
    for d in ["bin", "proc", "dev", "sys", "tmp", "etc", "data"] {
        std::fs::create_dir_all(dir.join(d)).unwrap();
    }
    std::fs::copy(BUSYBOX, dir.join("bin/busybox")).unwrap();
    for tool in [
        "sh", "true", "sleep", "cat", "echo", "httpd", "ls", "wget", "id", "ps",
    ] {
        std::os::unix::fs::symlink("busybox", dir.join("bin").join(tool)).unwrap();
    }
    dir.to_path_buf()
}

/// Polls `f` every 20 ms until it returns true or `secs` pass.
pub async fn eventually(secs: u64, mut f: impl AsyncFnMut() -> bool) -> bool {
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(secs);
    while tokio::time::Instant::now() < deadline {
        if f().await {
            return true;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    false
}

/// A small number no concurrent test run is likely to share (pid + clock).
pub fn rand_u32() -> u32 {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .subsec_nanos();
    nanos ^ std::process::id().rotate_left(16)
}

/// Runs a command, panicking with its stderr when it fails; returns stdout.
pub fn run_ok(cmd: &str, args: &[&str]) -> String {
    let out = Command::new(cmd).args(args).output().unwrap();
    assert!(
        out.status.success(),
        "{cmd} {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A network namespace made with `ip netns add` for one test, deleted on
/// drop (also when the test panics).
pub struct TestNetns {
    pub name: String,
}

impl TestNetns {
    pub fn new(prefix: &str) -> Self {
        let name = unique(prefix);
        run_ok("ip", &["netns", "add", &name]);
        let ns = TestNetns { name };
        ns.exec_ok(&["ip", "link", "set", "lo", "up"]);
        ns
    }

    /// Runs `f` on a new thread that joined this namespace; threads it
    /// spawns (e.g. a `HostRuntime`'s worker) and processes they start stay in it.
    pub fn enter<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> T {
        in_netns(&self.name, f)
    }

    /// `ip netns exec <ns> args...`
    pub fn exec(&self, args: &[&str]) -> std::process::Output {
        Command::new("ip")
            .args(["netns", "exec", &self.name])
            .args(args)
            .output()
            .unwrap()
    }

    pub fn exec_ok(&self, args: &[&str]) -> String {
        let mut all = vec!["netns", "exec", &self.name];
        all.extend_from_slice(args);
        run_ok("ip", &all)
    }
}

impl Drop for TestNetns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .output();
    }
}

/// Runs `f` on a new thread inside the named network namespace (`ip netns`).
pub fn in_netns<T: Send + 'static>(name: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    use std::os::fd::AsRawFd;
    let file = std::fs::File::open(format!("/run/netns/{name}")).unwrap();
    std::thread::spawn(move || {
        // SAFETY: setns on a namespace fd we own, for this thread only.
        let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
        assert_eq!(rc, 0, "setns: {}", std::io::Error::last_os_error());
        f()
    })
    .join()
    .unwrap()
}

/// busybox wget of `url` from inside `ns` (or the current namespace), with
/// retries for up to `secs`; returns the body.
pub fn wget(ns: Option<&TestNetns>, url: &str, secs: u64) -> Result<String, String> {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(secs);
    loop {
        // Not wget's own -T: busybox 1.35 segfaults when that timer fires.
        let args = ["timeout", "5", BUSYBOX, "wget", "-q", "-O", "-", url];
        let out = match ns {
            Some(ns) => ns.exec(&args),
            None => Command::new(args[0]).args(&args[1..]).output().unwrap(),
        };
        if out.status.success() {
            return Ok(String::from_utf8_lossy(&out.stdout).into_owned());
        }
        if std::time::Instant::now() >= deadline {
            return Err(String::from_utf8_lossy(&out.stderr).into_owned());
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
}

/// Mount `vol` read-write at `/data` in `spec`, create it, and check that
/// it is `Created` and that a second create is refused as a duplicate.
pub async fn create_with_data_volume<R: ployz_runtime::Runtime>(
    rt: &R,
    spec: &mut ployz_runtime::WorkloadSpec,
    vol: &Path,
) {
    spec.mounts.push(ployz_runtime::VolumeMount {
        source: vol.to_path_buf(),
        target: "/data".into(),
        read_only: false,
    });
    rt.create(spec).await.unwrap();
    assert_eq!(
        rt.state(&spec.id).await.unwrap(),
        ployz_runtime::State::Created
    );
    assert!(matches!(
        rt.create(spec).await,
        Err(ployz_runtime::RuntimeError::AlreadyExists(_))
    ));
}
