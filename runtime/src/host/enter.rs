//! `exec` for the host runtime: a process that enters a running workload's
//! namespaces (ipc, uts, net, pid, cgroup, mount) and its root directory,
//! the way `nsenter --all --root` does, then runs the command.
//!
//! It is an ordinary fork + exec (`tokio::process`): between the two, the
//! child only makes system calls (`setns`, `fchdir`, `chroot`, `chdir`), which
//! is safe in a fork of a multi-threaded process, unlike a libcontainer
//! clone that runs library code before its exec. The namespace files and the
//! root are opened before the fork. The program itself stays in ployzd's
//! PID namespace (joining one takes effect for children only), so what it
//! starts runs in the workload's. Output goes to a file, not a pipe, read
//! once the command ended: a background process it leaves behind cannot
//! keep the probe waiting for an end of file.

use crate::{ExecOutput, RuntimeError};
use std::fs::File;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::Path;
use std::process::Stdio;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// The namespaces entered, in order (mount last: it changes what paths mean).
const NAMESPACES: [&str; 6] = ["ipc", "uts", "net", "pid", "cgroup", "mnt"];

/// What `PATH` a command run in a workload gets.
const PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

static SEQ: AtomicU64 = AtomicU64::new(0);

/// Runs `args` in the namespaces and root of process `pid` (a workload's
/// init); output is collected in a file under `scratch`.
pub(super) async fn exec_in(
    scratch: &Path,
    id: &str,
    pid: i32,
    args: &[String],
    timeout: Duration,
) -> Result<ExecOutput, RuntimeError> {
    use crate::host::io_err as io;
    let proc = Path::new("/proc").join(pid.to_string());
    let mut fds: Vec<OwnedFd> = Vec::new();
    for ns in NAMESPACES {
        let path = proc.join("ns").join(ns);
        let f = File::open(&path).map_err(io("open the namespace", &path))?;
        fds.push(f.into());
    }
    let root_path = proc.join("root");
    let root: OwnedFd = File::open(&root_path)
        .map_err(io("open the root directory", &root_path))?
        .into();
    tokio::fs::create_dir_all(scratch)
        .await
        .map_err(io("create", scratch))?;
    let out_path = scratch.join(format!(
        "{id}.{}.{}.out",
        std::process::id(),
        SEQ.fetch_add(1, Ordering::Relaxed)
    ));
    let out = File::create(&out_path).map_err(io("create", &out_path))?;
    let err = out.try_clone().map_err(io("duplicate", &out_path))?;
    let result = run(&args[0], &args[1..], &fds, &root, out, err, timeout).await;
    let output = tokio::fs::read(&out_path).await.unwrap_or_default();
    let _ = tokio::fs::remove_file(&out_path).await;
    let exit_code = result.map_err(|e| RuntimeError::Engine {
        op: "exec",
        id: id.to_string(),
        message: format!("cannot run `{}` in the workload: {e}", args[0]),
    })?;
    Ok(ExecOutput {
        exit_code,
        output: crate::exec_output_tail(&output),
    })
}

async fn run(
    program: &str,
    args: &[String],
    namespaces: &[OwnedFd],
    root: &OwnedFd,
    out: File,
    err: File,
    timeout: Duration,
) -> std::io::Result<Option<i64>> {
    let ns: Vec<i32> = namespaces.iter().map(|f| f.as_raw_fd()).collect();
    let root = root.as_raw_fd();
    let mut cmd = tokio::process::Command::new(program);
    cmd.args(args)
        .env_clear()
        .env("PATH", PATH)
        .stdin(Stdio::null())
        .stdout(Stdio::from(out))
        .stderr(Stdio::from(err))
        .kill_on_drop(true);
    // SAFETY: the closure runs in the forked child before exec and only
    // makes system calls on file descriptors opened before the fork (and a
    // static string): nothing allocates or takes a lock.
    unsafe {
        cmd.pre_exec(move || {
            for &fd in &ns {
                if libc::setns(fd, 0) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            if libc::fchdir(root) != 0
                || libc::chroot(c".".as_ptr()) != 0
                || libc::chdir(c"/".as_ptr()) != 0
            {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = cmd.spawn()?;
    match tokio::time::timeout(timeout, child.wait()).await {
        Ok(status) => {
            let status = status?;
            use std::os::unix::process::ExitStatusExt;
            Ok(status
                .code()
                .map(i64::from)
                .or_else(|| status.signal().map(|s| 128 + i64::from(s))))
        }
        Err(_) => {
            let _ = child.kill().await;
            Ok(None)
        }
    }
}
