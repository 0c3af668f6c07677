//! Host backend against the real kernel (root, cgroup v1): no mocks.

mod common;

use common::{busybox_rootfs, eventually, unique};
use ployz_runtime::host::HostEngine;
use ployz_runtime::{HostRuntime, Image, Runtime, RuntimeError, State, VolumeMount, WorkloadSpec};
use std::path::PathBuf;
use std::time::Duration;

/// Deletes the workload even when the test panics.
struct Cleanup {
    root: PathBuf,
    id: String,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        // Deleting never clones, so it is fine on this thread.
        if let Ok(mut engine) = HostEngine::new(&self.root) {
            let _ = engine.delete(&self.id);
        }
    }
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
    let _cleanup = Cleanup {
        root: root.clone(),
        id: id.clone(),
    };

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
    assert!(eventually(10, async || vol.join("out.txt").exists()).await);
    assert_eq!(
        std::fs::read_to_string(vol.join("out.txt")).unwrap(),
        "from-inside\n"
    );

    let limit = std::fs::read_to_string(memory_cgroup(&id).join("memory.limit_in_bytes")).unwrap();
    assert_eq!(limit.trim(), (64u64 << 20).to_string());
    let shares =
        std::fs::read_to_string(format!("/sys/fs/cgroup/cpu/ployz/{id}/cpu.shares")).unwrap();
    assert_eq!(shares.trim(), "512");

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
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exit_codes_map_to_stopped_and_failed() {
    let tmp = tempfile::tempdir().unwrap();
    let rootfs = busybox_rootfs(&tmp.path().join("rootfs"));
    let root = tmp.path().join("rt");
    let rt = HostRuntime::new(&root).unwrap();
    let ok = unique("ok");
    let bad = unique("bad");
    let _c1 = Cleanup {
        root: root.clone(),
        id: ok.clone(),
    };
    let _c2 = Cleanup {
        root: root.clone(),
        id: bad.clone(),
    };
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
