//! Removing a stopped workload's cgroups without libcontainer's delete.
//!
//! libcontainer's `Container::delete` builds a full cgroup manager first: for
//! each of the 12 v1 controllers it resolves /proc/self/mountinfo and
//! /proc/self/cgroup through a hardened procfs handle and parses them, about
//! 600 syscalls; delete took 2.0 ms (median) that way and takes 0.75 ms this
//! way. A stopped workload only needs its cgroup directories removed: this
//! reads mountinfo once. The host backend takes this path only for a stopped
//! workload without poststop hooks or Intel RDT state, and falls back to
//! libcontainer's delete otherwise (or when the layout is not one it knows).

use std::fs;
use std::io;
use std::path::{Component, Path, PathBuf};
use std::time::Duration;

const CGROUP_ROOT: &str = "/sys/fs/cgroup";

/// The controllers libcontainer's v1 manager creates a directory in.
const V1_CONTROLLERS: &[&str] = &[
    "cpu",
    "cpuacct",
    "cpuset",
    "devices",
    "hugetlb",
    "memory",
    "pids",
    "perf_event",
    "blkio",
    "net_prio",
    "net_cls",
    "freezer",
];

/// Mount points of the v1 hierarchies holding one of [`V1_CONTROLLERS`]
/// (named hierarchies such as `name=systemd` excluded), in mountinfo order,
/// without duplicates.
pub fn v1_controller_mounts(mountinfo: &str) -> Vec<PathBuf> {
    let mut out: Vec<PathBuf> = Vec::new();
    for line in mountinfo.lines() {
        // id parent maj:min root mountpoint opts [optional...] - fstype source superopts
        let Some((left, right)) = line.split_once(" - ") else {
            continue;
        };
        let mut r = right.split(' ');
        let (Some("cgroup"), Some(_source), Some(superopts)) = (r.next(), r.next(), r.next())
        else {
            continue;
        };
        let Some(mount_point) = left.split(' ').nth(4) else {
            continue;
        };
        if !superopts.split(',').any(|o| V1_CONTROLLERS.contains(&o)) {
            continue;
        }
        let path = PathBuf::from(unescape(mount_point));
        if !out.contains(&path) {
            out.push(path);
        }
    }
    out
}

/// mountinfo escapes space, tab, newline and backslash as `\ooo`.
fn unescape(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 3 < b.len() && b[i + 1..i + 4].iter().all(u8::is_ascii_digit) {
            let v = (b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0');
            out.push(v);
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// `cgroup_path` below `base`, the way libcgroups joins them (an absolute
/// path is taken relative to `base`); `None` for a path with `..`.
pub fn join_cgroup(base: &Path, cgroup_path: &Path) -> Option<PathBuf> {
    let mut out = base.to_path_buf();
    for c in cgroup_path.components() {
        match c {
            Component::RootDir | Component::CurDir => {}
            Component::Normal(n) => out.push(n),
            Component::ParentDir | Component::Prefix(_) => return None,
        }
    }
    (out != base).then_some(out)
}

/// The directories libcontainer made for `cgroup_path` on this host, or
/// `None` when the cgroup layout is not a plain v1/hybrid or unified one.
pub fn dirs_of(cgroup_path: &Path) -> Option<Vec<PathBuf>> {
    let root = Path::new(CGROUP_ROOT);
    // SAFETY: statfs is plain old data; all-zero is a valid value.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    let c_root = std::ffi::CString::new(CGROUP_ROOT).ok()?;
    // SAFETY: statfs writes into `st`, which we own, from a NUL-terminated path.
    if unsafe { libc::statfs(c_root.as_ptr(), &mut st) } != 0 {
        return None;
    }
    // `f_type` is signed on glibc and unsigned on musl: compare as u64.
    let f_type = st.f_type as u64;
    match f_type {
        t if t == libc::CGROUP2_SUPER_MAGIC as u64 => Some(vec![join_cgroup(root, cgroup_path)?]),
        // Legacy or hybrid: libcontainer uses its v1 manager for both.
        t if t == libc::TMPFS_MAGIC as u64 => {
            let mountinfo = fs::read_to_string("/proc/self/mountinfo").ok()?;
            let mounts = v1_controller_mounts(&mountinfo);
            if mounts.is_empty() {
                return None;
            }
            mounts.iter().map(|m| join_cgroup(m, cgroup_path)).collect()
        }
        _ => None,
    }
}

/// Removes `dirs` like libcgroups does: SIGKILL whatever is still listed in
/// `cgroup.procs`, then rmdir, retrying briefly while the kernel lets go.
pub fn remove_dirs(dirs: &[PathBuf]) -> io::Result<()> {
    for dir in dirs {
        let procs = match fs::read_to_string(dir.join("cgroup.procs")) {
            Ok(p) => p,
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(e) => return Err(e),
        };
        for pid in procs.lines().filter_map(|l| l.trim().parse::<i32>().ok()) {
            // SAFETY: kill with a pid read from the cgroup; no memory involved.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
        let mut delay = Duration::from_millis(5);
        let mut attempt = 0;
        loop {
            match fs::remove_dir(dir) {
                Ok(()) => break,
                Err(e) if e.kind() == io::ErrorKind::NotFound => break,
                Err(e) if attempt >= 5 => return Err(e),
                Err(_) => {
                    std::thread::sleep(delay);
                    delay *= 2;
                    attempt += 1;
                }
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const HYBRID: &str = "\
25 30 0:23 / /sys rw,nosuid,nodev,noexec,relatime shared:7 - sysfs sysfs rw
26 25 0:24 / /sys/fs/cgroup ro,nosuid,nodev,noexec shared:8 - tmpfs tmpfs ro,mode=755
27 26 0:25 / /sys/fs/cgroup/unified rw,nosuid,nodev,noexec,relatime shared:9 - cgroup2 cgroup2 rw
28 26 0:26 / /sys/fs/cgroup/systemd rw,nosuid,nodev,noexec,relatime shared:10 - cgroup cgroup rw,xattr,name=systemd
31 26 0:29 / /sys/fs/cgroup/cpu,cpuacct rw,nosuid,nodev,noexec,relatime shared:13 - cgroup cgroup rw,cpu,cpuacct
32 26 0:30 / /sys/fs/cgroup/memory rw,nosuid,nodev,noexec,relatime shared:14 - cgroup cgroup rw,memory
33 26 0:31 / /sys/fs/cgroup/net_cls,net_prio rw,nosuid,nodev,noexec,relatime shared:15 - cgroup cgroup rw,net_cls,net_prio
90 26 0:30 / /sys/fs/cgroup/memory rw,relatime shared:14 - cgroup cgroup rw,memory
91 30 0:40 / /mnt/with\\040space rw - cgroup cgroup rw,pids
";

    #[test]
    fn finds_controller_hierarchies_once() {
        let mounts = v1_controller_mounts(HYBRID);
        assert_eq!(
            mounts,
            [
                "/sys/fs/cgroup/cpu,cpuacct",
                "/sys/fs/cgroup/memory",
                "/sys/fs/cgroup/net_cls,net_prio",
                "/mnt/with space",
            ]
            .map(PathBuf::from)
        );
    }

    #[test]
    fn joins_like_libcgroups() {
        let m = Path::new("/sys/fs/cgroup/memory");
        assert_eq!(
            join_cgroup(m, Path::new("/ployz/web")).unwrap(),
            Path::new("/sys/fs/cgroup/memory/ployz/web")
        );
        assert_eq!(
            join_cgroup(m, Path::new(":youki:x")).unwrap(),
            Path::new("/sys/fs/cgroup/memory/:youki:x")
        );
        assert_eq!(join_cgroup(m, Path::new("/ployz/../x")), None);
        assert_eq!(join_cgroup(m, Path::new("/")), None);
    }
}
