//! The last step of a container init: exec the workload's program.
//!
//! libcontainer runs its container init as a clone of the calling process
//! that never execs until the workload starts. Whatever lock another thread
//! held at the moment of the clone stays held forever in the child. Its
//! default executor sets the workload's environment with
//! `std::env::remove_var`/`set_var`, which take std's process-wide env lock
//! for writing; any thread reading the environment at the wrong moment
//! (`std::env::var`, every `Command::spawn`) left the init deadlocked and the
//! create hanging (reproduced by `creates_survive_threads_using_the_environment`
//! in tests/host.rs). This executor never touches the process environment:
//! it keeps the workload's variables and passes them to `execve`.

use libcontainer::oci_spec::runtime::Spec;
use libcontainer::workload::default::DefaultExecutor;
use libcontainer::workload::{
    Executor, ExecutorError, ExecutorSetEnvsError, ExecutorValidationError,
};
use std::cell::RefCell;
use std::collections::HashMap;
use std::ffi::{CStr, CString};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

#[derive(Clone, Default)]
pub struct EnvFreeExecutor {
    /// `KEY=VALUE` for execve, from `setup_envs` (same process as `exec`).
    envs: RefCell<Vec<CString>>,
    path: RefCell<Option<String>>,
}

impl Executor for EnvFreeExecutor {
    fn validate(&self, spec: &Spec) -> Result<(), ExecutorValidationError> {
        // Reads the spec only (PATH from it, the executable's mode).
        DefaultExecutor {}.validate(spec)
    }

    fn setup_envs(&self, envs: HashMap<String, String>) -> Result<(), ExecutorSetEnvsError> {
        let mut out = Vec::with_capacity(envs.len());
        for (k, v) in &envs {
            out.push(
                CString::new(format!("{k}={v}"))
                    .map_err(|e| ExecutorSetEnvsError::Other(format!("variable {k}: {e}")))?,
            );
        }
        *self.path.borrow_mut() = envs.get("PATH").cloned();
        *self.envs.borrow_mut() = out;
        Ok(())
    }

    fn exec(&self, spec: &Spec) -> Result<(), ExecutorError> {
        let args = spec
            .process()
            .as_ref()
            .and_then(|p| p.args().as_ref())
            .filter(|a| !a.is_empty())
            .ok_or(ExecutorError::InvalidArg)?;
        let program = resolve(&args[0], self.path.borrow().as_deref()).ok_or_else(|| {
            ExecutorError::Other(format!("executable `{}` not found in PATH", args[0]))
        })?;
        let c = |s: &[u8]| CString::new(s).map_err(|_| ExecutorError::InvalidArg);
        let program = c(program.as_os_str().as_bytes())?;
        let argv: Vec<CString> = args
            .iter()
            .map(|a| c(a.as_bytes()))
            .collect::<Result<_, _>>()?;
        let envs = self.envs.borrow();
        let mut argv_p: Vec<*const libc::c_char> = argv.iter().map(|a| a.as_ptr()).collect();
        argv_p.push(std::ptr::null());
        let mut envp: Vec<*const libc::c_char> = envs.iter().map(|e| e.as_ptr()).collect();
        envp.push(std::ptr::null());
        // SAFETY: NUL-terminated strings and NULL-terminated arrays that
        // outlive the call; execve only returns on failure.
        unsafe { libc::execve(program.as_ptr(), argv_p.as_ptr(), envp.as_ptr()) };
        let err = std::io::Error::last_os_error();
        Err(ExecutorError::Execution(
            format!("execve {}: {err}", show(&program)).into(),
        ))
    }
}

fn show(s: &CStr) -> String {
    s.to_string_lossy().into_owned()
}

/// execvp's lookup: a name with a `/` is used as is, else the first
/// executable regular file named so in `path`'s directories.
fn resolve(name: &str, path: Option<&str>) -> Option<PathBuf> {
    if name.contains('/') {
        return Some(PathBuf::from(name));
    }
    path.unwrap_or("/usr/local/bin:/usr/bin:/bin")
        .split(':')
        .map(|dir| Path::new(if dir.is_empty() { "." } else { dir }).join(name))
        .find(|p| {
            std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        })
}

/// The directories execvp would search for `name` (none for a name with a
/// `/`) and the candidates it would try, in order.
fn candidates(name: &str, path: &str) -> Vec<PathBuf> {
    if name.contains('/') {
        return vec![PathBuf::from(name)];
    }
    path.split(':')
        .filter(|dir| dir.starts_with('/'))
        .map(|dir| Path::new(dir).join(name))
        .collect()
}

/// Where [`missing_in_rootfs`] looked, for the message: `PATH a:b` or the path.
pub fn searched(name: &str, path: &str) -> String {
    if name.contains('/') {
        name.to_string()
    } else {
        format!("PATH {path}")
    }
}

/// Whether the container's execvp of `name` with `path` is bound to fail
/// because the image at `rootfs` has no executable regular file there.
/// Symlinks resolve inside `rootfs` (busybox's `/bin/sh -> /bin/busybox`).
/// `false` when it cannot tell: a candidate below one of the `mounts`
/// (a volume may bring the program) or a rootfs that cannot be opened.
pub fn missing_in_rootfs(rootfs: &Path, name: &str, path: &str, mounts: &[PathBuf]) -> bool {
    let Ok(root) = pathrs::Root::open(rootfs) else {
        return false;
    };
    let found = |p: &Path| {
        if mounts.iter().any(|m| p.starts_with(m)) {
            return true;
        }
        let Ok(handle) = root.resolve(p) else {
            return false;
        };
        let file = std::fs::File::from(std::os::fd::OwnedFd::from(handle));
        file.metadata()
            .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
    };
    !candidates(name, path).iter().any(|p| found(p))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_programs_inside_the_rootfs_only() {
        let dir = std::env::temp_dir().join(format!("ployz-exec-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("bin")).unwrap();
        let busybox = dir.join("bin/busybox");
        std::fs::write(&busybox, b"#!").unwrap();
        std::fs::set_permissions(&busybox, std::fs::Permissions::from_mode(0o755)).unwrap();
        std::fs::write(dir.join("bin/data"), b"x").unwrap();
        // Absolute link: resolves inside the rootfs, not on the host.
        std::os::unix::fs::symlink("/bin/busybox", dir.join("bin/sh")).unwrap();
        let path = "/usr/bin:/bin";
        assert!(!missing_in_rootfs(&dir, "sh", path, &[]));
        assert!(!missing_in_rootfs(&dir, "/bin/sh", path, &[]));
        assert!(missing_in_rootfs(&dir, "httpdd", path, &[]));
        assert!(missing_in_rootfs(&dir, "data", path, &[]), "not executable");
        assert!(
            missing_in_rootfs(&dir, "/usr/bin/env", path, &[]),
            "host's, not the image's"
        );
        assert!(missing_in_rootfs(&dir, "sh", "/usr/bin", &[]));
        assert!(!missing_in_rootfs(
            &dir,
            "/data/run",
            path,
            &[PathBuf::from("/data")]
        ));
        assert_eq!(searched("x", path), "PATH /usr/bin:/bin");
        assert_eq!(searched("/x", path), "/x");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn resolves_like_execvp() {
        assert_eq!(resolve("/x/y", None).unwrap(), Path::new("/x/y"));
        assert_eq!(resolve("./y", Some("/bin")).unwrap(), Path::new("./y"));
        let sh = resolve("sh", Some("/nonexistent:/bin:/usr/bin")).unwrap();
        assert!(sh.ends_with("sh"), "{sh:?}");
        assert_eq!(resolve("no-such-program-here", Some("/bin")), None);
    }

    #[test]
    fn setup_envs_leaves_the_process_environment_alone() {
        let ex = EnvFreeExecutor::default();
        let before: Vec<_> = std::env::vars_os().collect();
        ex.setup_envs(HashMap::from([
            ("PATH".to_string(), "/bin".to_string()),
            ("PLOYZ_X".to_string(), "1".to_string()),
        ]))
        .unwrap();
        assert_eq!(std::env::vars_os().collect::<Vec<_>>(), before);
        assert_eq!(ex.path.borrow().as_deref(), Some("/bin"));
        let mut envs: Vec<String> = ex
            .envs
            .borrow()
            .iter()
            .map(|e| e.to_string_lossy().into_owned())
            .collect();
        envs.sort();
        assert_eq!(envs, ["PATH=/bin", "PLOYZ_X=1"]);
    }
}
