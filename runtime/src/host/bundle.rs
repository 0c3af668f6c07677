//! Pure translation of a [`WorkloadSpec`] into an OCI runtime spec.

use super::rootfs::RootfsPlan;
use crate::{RuntimeError, WorkloadSpec};
use libcontainer::oci_spec::runtime::{
    LinuxCpuBuilder, LinuxMemoryBuilder, LinuxNamespaceBuilder, LinuxNamespaceType, MountBuilder,
    RootBuilder, Spec,
};
use std::path::PathBuf;

pub const DEFAULT_PATH: &str = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// Builds the `config.json` for `spec` on `rootfs` (absolute paths).
///
/// Starts from oci-spec's defaults (pid, ipc, uts, mount, network and cgroup
/// namespaces, the usual /proc, /dev, /sys mounts, masked paths, default
/// capabilities). The network namespace is a new one, configured after
/// create (see `host::net`). A read-only root gets tmpfs on /tmp and /run.
/// The cgroup is `/ployz/<id>` in every v1 hierarchy.
pub fn oci_spec(spec: &WorkloadSpec, rootfs: &RootfsPlan) -> Result<Spec, RuntimeError> {
    let id = &spec.id;
    let bad = |what: &str, e: &dyn std::fmt::Display| RuntimeError::Spec {
        id: id.clone(),
        reason: format!("{what}: {e}"),
    };
    let mut oci = Spec::default();
    oci.set_hostname(Some(spec.hostname.clone().unwrap_or_else(|| id.clone())));
    oci.set_root(Some(
        RootBuilder::default()
            .path(rootfs.path().to_path_buf())
            .readonly(matches!(rootfs, RootfsPlan::ReadOnly(_)))
            .build()
            .map_err(|e| bad("root", &e))?,
    ));

    let mut process = oci.process().clone().unwrap_or_default();
    process.set_terminal(Some(false));
    process.set_args(Some(spec.args.clone()));
    let mut env: Vec<String> = spec.env.iter().map(|(k, v)| format!("{k}={v}")).collect();
    if !spec.env.iter().any(|(k, _)| k == "PATH") {
        env.insert(0, DEFAULT_PATH.to_string());
    }
    process.set_env(Some(env));
    oci.set_process(Some(process));

    let mut mounts = oci.mounts().clone().unwrap_or_default();
    if let RootfsPlan::ReadOnly(_) = rootfs {
        for dir in ["/tmp", "/run"] {
            mounts.push(
                MountBuilder::default()
                    .destination(dir)
                    .typ("tmpfs")
                    .source("tmpfs")
                    .options(["nosuid", "nodev", "mode=1777"].map(String::from).to_vec())
                    .build()
                    .map_err(|e| bad("tmpfs mount", &e))?,
            );
        }
    }
    for m in &spec.mounts {
        let mode = if m.read_only { "ro" } else { "rw" };
        mounts.push(
            MountBuilder::default()
                .destination(m.target.clone())
                .typ("bind")
                .source(m.source.clone())
                .options(vec!["rbind".to_string(), mode.to_string()])
                .build()
                .map_err(|e| bad("volume mount", &e))?,
        );
    }
    oci.set_mounts(Some(mounts));

    let mut linux = oci.linux().clone().unwrap_or_default();
    let mut namespaces = linux.namespaces().clone().unwrap_or_default();
    if !namespaces
        .iter()
        .any(|n| n.typ() == LinuxNamespaceType::Network)
    {
        namespaces.push(
            LinuxNamespaceBuilder::default()
                .typ(LinuxNamespaceType::Network)
                .build()
                .map_err(|e| bad("network namespace", &e))?,
        );
    }
    linux.set_namespaces(Some(namespaces));
    linux.set_cgroups_path(Some(PathBuf::from(format!("/ployz/{id}"))));
    let mut resources = linux.resources().clone().unwrap_or_default();
    if let Some(limit) = spec.memory_limit {
        let limit = i64::try_from(limit).map_err(|e| bad("memory_limit", &e))?;
        resources.set_memory(Some(
            LinuxMemoryBuilder::default()
                .limit(limit)
                .build()
                .map_err(|e| bad("memory", &e))?,
        ));
    }
    if let Some(shares) = spec.cpu_shares {
        resources.set_cpu(Some(
            LinuxCpuBuilder::default()
                .shares(shares)
                .build()
                .map_err(|e| bad("cpu", &e))?,
        ));
    }
    linux.set_resources(Some(resources));
    oci.set_linux(Some(linux));
    Ok(oci)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Image, VolumeMount};
    use std::path::Path;

    #[test]
    fn translates_spec() {
        let mut s = WorkloadSpec::new(
            "web",
            Image::Rootfs("/r".into()),
            vec!["sh".into(), "-c".into(), "true".into()],
        );
        s.env.push(("A".into(), "1".into()));
        s.memory_limit = Some(64 << 20);
        s.cpu_shares = Some(512);
        s.mounts.push(VolumeMount {
            source: "/var/lib/v".into(),
            target: "/data".into(),
            read_only: true,
        });
        let oci = oci_spec(&s, &RootfsPlan::Overlay("/r".into())).unwrap();
        assert_eq!(oci.hostname().as_deref(), Some("web"));
        let root = oci.root().as_ref().unwrap();
        assert_eq!(root.path(), Path::new("/r"));
        assert_eq!(root.readonly(), Some(false));
        let p = oci.process().as_ref().unwrap();
        assert_eq!(p.args().as_ref().unwrap(), &s.args);
        let env = p.env().as_ref().unwrap();
        assert!(env[0].starts_with("PATH="));
        assert!(env.contains(&"A=1".to_string()));
        let m = oci
            .mounts()
            .as_ref()
            .unwrap()
            .iter()
            .find(|m| m.destination() == Path::new("/data"))
            .unwrap();
        assert_eq!(m.options().as_ref().unwrap(), &["rbind", "ro"]);
        let linux = oci.linux().as_ref().unwrap();
        assert_eq!(
            linux.cgroups_path().as_deref(),
            Some(Path::new("/ployz/web"))
        );
        let netns = linux
            .namespaces()
            .as_ref()
            .unwrap()
            .iter()
            .find(|n| n.typ() == LinuxNamespaceType::Network)
            .expect("a private network namespace");
        assert_eq!(netns.path(), &None);
        let r = linux.resources().as_ref().unwrap();
        assert_eq!(r.memory().as_ref().unwrap().limit(), Some(64 << 20));
        assert_eq!(r.cpu().as_ref().unwrap().shares(), Some(512));
        assert!(!oci
            .mounts()
            .as_ref()
            .unwrap()
            .iter()
            .any(|m| m.typ().as_deref() == Some("tmpfs") && m.destination() == Path::new("/tmp")));
    }

    #[test]
    fn read_only_fallback_gets_tmpfs() {
        let s = WorkloadSpec::new("w", Image::Rootfs("/img".into()), vec!["true".into()]);
        let oci = oci_spec(&s, &RootfsPlan::ReadOnly("/img".into())).unwrap();
        let root = oci.root().as_ref().unwrap();
        assert_eq!(root.path(), Path::new("/img"));
        assert_eq!(root.readonly(), Some(true));
        for dir in ["/tmp", "/run"] {
            let m = oci
                .mounts()
                .as_ref()
                .unwrap()
                .iter()
                .find(|m| m.destination() == Path::new(dir))
                .unwrap_or_else(|| panic!("no mount on {dir}"));
            assert_eq!(m.typ().as_deref(), Some("tmpfs"));
        }
    }
}
