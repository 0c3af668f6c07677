//! Docker backend against a real dockerd (started here if it is not running).

mod common;

use common::{busybox_rootfs, eventually, unique};
use ployz_runtime::{
    DockerRuntime, Image, Runtime, RuntimeError, State, VolumeMount, WorkloadSpec,
};
use std::process::{Command, Stdio};
use std::time::Duration;

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

/// Removes the test's containers and image, also on panic.
struct Cleanup {
    containers: Vec<String>,
    image: String,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        for c in &self.containers {
            let _ = Command::new("docker").args(["rm", "-f", c]).output();
        }
        let _ = Command::new("docker")
            .args(["rmi", "-f", &self.image])
            .output();
    }
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
    };
    let tar = tmp.path().join("rootfs.tar");
    assert!(Command::new("tar")
        .arg("-C")
        .arg(&rootfs)
        .arg("-cf")
        .arg(&tar)
        .arg(".")
        .status()
        .unwrap()
        .success());
    assert!(Command::new("docker")
        .arg("import")
        .arg(&tar)
        .arg(&tag)
        .stdout(Stdio::null())
        .status()
        .unwrap()
        .success());

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
    spec.mounts.push(VolumeMount {
        source: vol.clone(),
        target: "/data".into(),
        read_only: false,
    });
    rt.create(&spec).await.unwrap();
    assert_eq!(rt.state(&id).await.unwrap(), State::Created);
    assert!(matches!(
        rt.create(&spec).await,
        Err(RuntimeError::AlreadyExists(_))
    ));
    assert!(rt.list().await.unwrap().iter().any(|w| w.id == id));

    rt.start(&id).await.unwrap();
    assert_eq!(rt.state(&id).await.unwrap(), State::Running);
    assert!(eventually(10, async || rt.logs(&id).await.unwrap().contains("hello")).await);
    assert!(eventually(10, async || vol.join("out.txt").exists()).await);
    assert_eq!(
        std::fs::read_to_string(vol.join("out.txt")).unwrap(),
        "from-inside\n"
    );
    let full = rt
        .client()
        .inspect_container(&id, None)
        .await
        .unwrap()
        .id
        .unwrap();
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
    rt.delete(&bad).await.unwrap();
}
