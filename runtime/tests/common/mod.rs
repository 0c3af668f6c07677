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
