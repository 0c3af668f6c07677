use std::fs;
use std::path::Path;

use nix::unistd::Pid;

use crate::common::{self, CGROUP_PROCS, ControllerOpt, WrapIoResult, WrappedIoError};

pub(super) trait Controller {
    type Error: From<WrappedIoError>;
    type Resource;

    /// Adds a new task specified by its pid to the cgroup
    fn add_task(pid: Pid, cgroup_path: &Path) -> Result<(), Self::Error> {
        fs::create_dir_all(cgroup_path).wrap_create_dir(cgroup_path)?;
        attach(pid, cgroup_path)?;
        Ok(())
    }

    /// Applies resource restrictions to the cgroup
    fn apply(controller_opt: &ControllerOpt, cgroup_root: &Path) -> Result<(), Self::Error>;

    /// Checks if the controller needs to handle this request
    fn needs_to_handle<'a>(controller_opt: &'a ControllerOpt) -> Option<&'a Self::Resource>;
}

/// Moves process `pid` into the v1 cgroup at `cgroup_path`.
///
/// Ployz patch: a single-threaded process moving itself writes "0" to `tasks`
/// instead of its pid to `cgroup.procs`. The effect is the same (its only
/// thread is the whole process), but the kernel then skips the global
/// threadgroup rwsem, whose write side waits for an RCU grace period: 7-15 ms
/// per container on our VMs against 0.3 ms this way. The intermediate process
/// (a clone, so one thread) always moves itself.
pub(super) fn attach(pid: Pid, cgroup_path: &Path) -> Result<(), WrappedIoError> {
    if pid == nix::unistd::getpid() && is_single_threaded() {
        common::write_cgroup_file_str(cgroup_path.join(CGROUP_TASKS), "0")
    } else {
        common::write_cgroup_file(cgroup_path.join(CGROUP_PROCS), pid)
    }
}

const CGROUP_TASKS: &str = "tasks";

/// Whether this process has exactly one thread (`num_threads` in
/// /proc/self/stat: the 18th field after the parenthesised command name).
fn is_single_threaded() -> bool {
    fs::read_to_string("/proc/self/stat")
        .ok()
        .and_then(|stat| {
            let (_, fields) = stat.rsplit_once(") ")?;
            fields.split(' ').nth(17)?.parse::<u64>().ok()
        })
        == Some(1)
}

#[cfg(test)]
mod ployz_tests {
    #[test]
    fn this_test_thread_is_not_alone() {
        // The test harness runs tests on threads besides main.
        assert!(!super::is_single_threaded());
    }
}
