//! Host backend: OCI bundles run in-process with youki's libcontainer.
//!
//! Layout under the runtime's root directory:
//! - `state/<id>/`   libcontainer's container state (its `root_path`)
//! - `bundles/<id>/` the generated `config.json`
//! - `rootfs/<id>/`  the workload's writable layer (`upper/`, `work/`) and its
//!   overlay mount (`merged/`) over the shared image rootfs (see `rootfs`)
//! - `logs/<id>.log` the workload's stdout and stderr
//!
//! Every workload gets its own network namespace: only `lo` without a
//! [`NetworkAttachment`](crate::NetworkAttachment), else also `eth0` on a veth
//! pair whose other end is on the bridge (see `net`).
//!
//! libcontainer clones the calling process and runs Rust in the child, which
//! is only safe in a process with a single thread (see `helper`): a
//! [`HostRuntime`] keeps its blocking calls on one dedicated OS thread and
//! creates containers through a single-threaded helper process; a
//! single-threaded program may drive a [`HostEngine`] directly (see
//! `examples/rt.rs`). The process becomes a child subreaper so the workloads'
//! init processes are re-parented to it: that is how exit codes are collected
//! (stopped vs failed) and how zombies are reaped.

mod bundle;
mod cgroup;
mod enter;
mod exec;
mod helper;
pub mod net;
pub mod rootfs;

pub use bundle::oci_spec;

use crate::{
    BridgeNetwork, Image, Runtime, RuntimeError, RuntimeKind, State, WorkloadSpec, WorkloadStatus,
};
use libcontainer::config::YoukiConfig;
use libcontainer::container::builder::ContainerBuilder;
use libcontainer::container::{Container, ContainerStatus};
use libcontainer::error::LibcontainerError;
use libcontainer::signal::Signal;
use libcontainer::syscall::syscall::SyscallType;
use net::{NetConfig, NetConfigError, Rtnetlink};
use rootfs::RootfsPlan;
use std::collections::{HashMap, HashSet};
use std::fs::{self, File, OpenOptions};
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::sync::Mutex;
use std::time::Duration;

pub(crate) fn io_err<'a>(
    what: &'static str,
    path: &'a Path,
) -> impl FnOnce(std::io::Error) -> RuntimeError + 'a {
    move |source| RuntimeError::Io {
        what,
        path: path.to_path_buf(),
        source,
    }
}

fn lc_err<'a>(
    op: &'static str,
    id: &'a str,
) -> impl FnOnce(LibcontainerError) -> RuntimeError + 'a {
    move |source| RuntimeError::Container {
        op,
        id: id.to_string(),
        source: Box::new(source),
    }
}

/// Refuses a workload whose program is not in its image, in one sentence,
/// before libcontainer would fail on it deep inside its init.
fn missing_executable(spec: &WorkloadSpec, rootfs: &Path) -> Result<(), RuntimeError> {
    let Some(name) = spec.args.first() else {
        return Ok(());
    };
    let path = spec
        .env
        .iter()
        .rev()
        .find(|(k, _)| k == "PATH")
        .map(|(_, v)| v.as_str())
        .unwrap_or(&bundle::DEFAULT_PATH["PATH=".len()..]);
    let mounts: Vec<PathBuf> = spec.mounts.iter().map(|m| m.target.clone()).collect();
    if exec::missing_in_rootfs(rootfs, name, path, &mounts) {
        return Err(RuntimeError::ExecutableNotFound {
            id: spec.id.clone(),
            image: rootfs.display().to_string(),
            executable: name.clone(),
            searched: exec::searched(name, path),
        });
    }
    Ok(())
}

fn net_err(what: String) -> impl FnOnce(NetConfigError) -> RuntimeError {
    move |e| RuntimeError::Network {
        runtime: "host",
        what,
        reason: e.to_string(),
    }
}

/// A warning an operator must see though nothing failed.
fn warn(msg: &str) {
    tracing::warn!("{msg}");
}

/// The blocking core of the host backend. Not `Sync`: drive it from one thread
/// that is not a tokio worker. Its network changes apply to the network
/// namespace of that thread.
pub struct HostEngine {
    root: PathBuf,
    net: Box<dyn NetConfig>,
    /// Create through a single-threaded helper process (see `helper`):
    /// `Some`, holding the running zygote once there is one.
    create_helper: Option<Option<helper::Zygote>>,
    /// How long a create through the helper may take before the helper is
    /// killed and the create fails (a hung create must not hang the engine).
    create_timeout: std::time::Duration,
    /// Exit status (code, or 128+signal) of workloads we reaped.
    exits: HashMap<String, i64>,
    /// Workloads ended through `kill` (stop/delete) rather than on their own.
    stop_requested: HashSet<String>,
}

impl HostEngine {
    /// Creates the directory layout under `root` and makes this process a
    /// child subreaper (so workload exit codes can be collected).
    pub fn new(root: impl Into<PathBuf>) -> Result<Self, RuntimeError> {
        let root = root.into();
        for sub in ["state", "bundles", "logs", "rootfs"] {
            let dir = root.join(sub);
            fs::create_dir_all(&dir).map_err(io_err("create directory", &dir))?;
        }
        // Stable across restarts and spellings: it names the workloads' veths.
        let root = fs::canonicalize(&root).map_err(io_err("resolve", &root))?;
        // SAFETY: prctl with PR_SET_CHILD_SUBREAPER takes one integer argument
        // and only changes this process's re-parenting behaviour.
        let rc = unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) };
        if rc != 0 {
            return Err(RuntimeError::Io {
                what: "become child subreaper (prctl) for",
                path: root,
                source: std::io::Error::last_os_error(),
            });
        }
        Ok(HostEngine {
            root,
            net: Box::new(Rtnetlink),
            create_helper: None,
            create_timeout: std::time::Duration::from_secs(60),
            exits: HashMap::new(),
            stop_requested: HashSet::new(),
        })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    fn state_dir(&self) -> PathBuf {
        self.root.join("state")
    }

    fn bundle_dir(&self, id: &str) -> PathBuf {
        self.root.join("bundles").join(id)
    }

    /// Path of the workload's stdout/stderr log.
    pub fn log_path(&self, id: &str) -> PathBuf {
        self.root.join("logs").join(format!("{id}.log"))
    }

    fn load(&self, id: &str) -> Result<Container, RuntimeError> {
        crate::validate_id(id)?;
        let dir = self.state_dir().join(id);
        if !dir.join("state.json").exists() {
            return Err(RuntimeError::NotFound(id.to_string()));
        }
        Container::load(dir).map_err(lc_err("load state", id))
    }

    /// Creates containers in a single-threaded helper process instead of
    /// cloning this one: required when this process has other threads (see
    /// `helper`); [`HostRuntime`] always does it. Only a program that never
    /// has a second thread while it creates (like `examples/rt.rs`) may skip it.
    pub fn with_create_helper(mut self) -> Self {
        helper::ensure_linked();
        self.create_helper = Some(None);
        self
    }

    /// Replaces the 60 s a create through the helper may take.
    pub fn with_create_timeout(mut self, timeout: std::time::Duration) -> Self {
        self.create_timeout = timeout;
        self
    }

    /// The pid of the running create helper (zygote), if one runs.
    pub fn create_helper_pid(&self) -> Option<u32> {
        self.create_helper
            .as_ref()?
            .as_ref()
            .map(helper::Zygote::pid)
    }

    /// Replaces the kernel network seam (tests: a recording fake).
    pub fn with_net_config(mut self, net: Box<dyn NetConfig>) -> Self {
        self.net = net;
        self
    }

    /// Writes the bundle for `spec`, gives the workload its writable layer and
    /// creates the container (not started) with its network configured.
    pub fn create(&mut self, spec: &WorkloadSpec) -> Result<(), RuntimeError> {
        spec.validate()?;
        let rootfs = match &spec.image {
            Image::Rootfs(p) => p,
            Image::Reference(r) => {
                return Err(RuntimeError::UnsupportedImage {
                    runtime: "host",
                    id: spec.id.clone(),
                    image: format!("image reference `{r}`"),
                    hint: "give Image::Rootfs(<directory>) (unpack the image first) or use the docker runtime",
                })
            }
        };
        let rootfs = fs::canonicalize(rootfs).map_err(io_err("find rootfs", rootfs))?;
        for m in &spec.mounts {
            if !m.source.is_dir() {
                return Err(RuntimeError::InvalidSpec {
                    id: spec.id.clone(),
                    reason: format!(
                        "volume directory {} does not exist: create it first",
                        m.source.display()
                    ),
                });
            }
        }
        if self.state_dir().join(&spec.id).exists() {
            return Err(RuntimeError::AlreadyExists(spec.id.clone()));
        }
        missing_executable(spec, &rootfs)?;
        if let Some(att) = &spec.network {
            if !self.net.link_exists(&att.bridge) {
                return Err(RuntimeError::InvalidSpec {
                    id: spec.id.clone(),
                    reason: format!(
                        "bridge {} does not exist: call ensure_network for it first",
                        att.bridge
                    ),
                });
            }
        }
        let (plan, overlay_failure) = rootfs::prepare(&self.root, &spec.id, &rootfs)?;
        if let Some(reason) = overlay_failure {
            warn(&format!(
                "workload `{}` runs on a read-only rootfs with tmpfs on /tmp and /run: \
                 no private writable layer ({reason})",
                spec.id
            ));
        }
        let bundle = self.bundle_dir(&spec.id);
        let res = self.create_in(spec, &plan, &bundle);
        if res.is_err() {
            let _ = fs::remove_dir_all(&bundle);
            let _ = rootfs::remove(&self.root, &spec.id);
            return res;
        }
        if let Err(e) = self.configure_network(spec) {
            let _ = self.delete(&spec.id);
            return Err(e);
        }
        Ok(())
    }

    fn create_in(
        &mut self,
        spec: &WorkloadSpec,
        plan: &RootfsPlan,
        bundle: &Path,
    ) -> Result<(), RuntimeError> {
        let mut oci = oci_spec(spec, plan)?;
        fs::create_dir_all(bundle).map_err(io_err("create bundle directory", bundle))?;
        if let Some(dns) = spec.network.as_ref().and_then(|a| a.dns) {
            // Bound over the image's own file (read-only: the machine's
            // resolver is the one to use).
            let conf = bundle.join("resolv.conf");
            fs::write(&conf, crate::resolv_conf(dns)).map_err(io_err("write", &conf))?;
            let mut mounts = oci.mounts().clone().unwrap_or_default();
            mounts.push(
                libcontainer::oci_spec::runtime::MountBuilder::default()
                    .destination("/etc/resolv.conf")
                    .typ("bind")
                    .source(conf)
                    .options(vec!["rbind".to_string(), "ro".to_string()])
                    .build()
                    .map_err(|e| RuntimeError::Spec {
                        id: spec.id.clone(),
                        reason: format!("resolv.conf mount: {e}"),
                    })?,
            );
            oci.set_mounts(Some(mounts));
        }
        let config = bundle.join("config.json");
        oci.save(&config).map_err(|e| RuntimeError::Spec {
            id: spec.id.clone(),
            reason: format!("writing {}: {e}", config.display()),
        })?;
        self.create_from_bundle(&spec.id, bundle)
    }

    /// Brings up the created workload's network namespace: `lo`, and `eth0`
    /// on the bridge when it has an attachment.
    fn configure_network(&mut self, spec: &WorkloadSpec) -> Result<(), RuntimeError> {
        let id = &spec.id;
        let pid = self
            .load(id)?
            .pid()
            .ok_or_else(|| RuntimeError::Network {
                runtime: "host",
                what: format!("configure the network of workload `{id}`"),
                reason: "libcontainer recorded no init pid".into(),
            })?
            .as_raw();
        let steps = match &spec.network {
            None => vec![net::loopback_plan(pid)],
            Some(att) => net::attach_plan(pid, &self.veth_name(id), att).into(),
        };
        for (ns, ops) in steps {
            self.net
                .apply(ns, &ops)
                .map_err(net_err(match &spec.network {
                    Some(att) => format!("attach workload `{id}` to bridge {}", att.bridge),
                    None => format!("bring up loopback of workload `{id}`"),
                }))?;
        }
        Ok(())
    }

    fn veth_name(&self, id: &str) -> String {
        net::host_veth_name(&self.root, id)
    }

    /// Creates or repairs the bridge (see [`Runtime::ensure_network`]) in
    /// this thread's network namespace.
    pub fn ensure_network(&mut self, network: &BridgeNetwork) -> Result<(), RuntimeError> {
        network.validate()?;
        let exists = self.net.link_exists(&network.bridge);
        self.net
            .apply(net::Netns::Runtime, &net::bridge_plan(network, exists))
            .map_err(net_err(format!(
                "set up bridge {} ({})",
                network.bridge,
                network.subnet()
            )))
    }

    /// Removes the bridge and its forwarding rules; a missing bridge is fine.
    pub fn remove_network(&mut self, bridge: &str) -> Result<(), RuntimeError> {
        let exists = self.net.link_exists(bridge);
        self.net
            .apply(
                net::Netns::Runtime,
                &net::remove_bridge_plan(bridge, exists),
            )
            .map_err(net_err(format!("remove bridge {bridge}")))
    }

    /// Creates container `id` from an existing OCI bundle directory.
    pub fn create_from_bundle(&mut self, id: &str, bundle: &Path) -> Result<(), RuntimeError> {
        crate::validate_id(id)?;
        if self.state_dir().join(id).exists() {
            return Err(RuntimeError::AlreadyExists(id.to_string()));
        }
        self.exits.remove(id);
        self.stop_requested.remove(id);
        let Some(zygote) = self.create_helper.as_mut() else {
            return self.create_in_process(id, bundle);
        };
        let root = &self.root;
        let timeout = self.create_timeout;
        let res = serialized(|| helper::create(zygote, root, id, bundle, timeout));
        if res.is_err() {
            // The helper may have died half-way through.
            let _ = fs::remove_dir_all(self.state_dir().join(id));
        }
        res
    }

    /// libcontainer's create, cloning this process: it must have no other
    /// thread (see `helper`).
    fn create_in_process(&mut self, id: &str, bundle: &Path) -> Result<(), RuntimeError> {
        crate::validate_id(id)?;
        if self.state_dir().join(id).exists() {
            return Err(RuntimeError::AlreadyExists(id.to_string()));
        }
        let log_path = self.log_path(id);
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .map_err(io_err("open log file", &log_path))?;
        let log2 = log
            .try_clone()
            .map_err(io_err("duplicate log file", &log_path))?;
        let null = File::open("/dev/null").map_err(io_err("open", Path::new("/dev/null")))?;
        let res = serialized(|| {
            ContainerBuilder::new(id.to_string(), SyscallType::default())
                .with_root_path(self.state_dir())
                .and_then(|b| {
                    b.with_stdin(null)
                        .with_stdout(log)
                        .with_stderr(log2)
                        // Not libcontainer's default: see `exec` (a deadlock).
                        .with_executor(exec::EnvFreeExecutor::default())
                        .validate_id()
                })
                .and_then(|b| {
                    b.as_init(bundle)
                        .with_systemd(false)
                        .with_detach(true)
                        .build()
                })
        });
        match res {
            Ok(_) => Ok(()),
            Err(e) => {
                // libcontainer may leave a half-created state dir behind.
                let _ = fs::remove_dir_all(self.state_dir().join(id));
                Err(lc_err("create", id)(e))
            }
        }
    }

    pub fn start(&mut self, id: &str) -> Result<(), RuntimeError> {
        let mut c = self.load(id)?;
        if !c.can_start() {
            let state = self.map_status(id, &c);
            return Err(RuntimeError::InvalidState {
                id: id.to_string(),
                op: "start",
                state,
            });
        }
        serialized(|| c.start()).map_err(lc_err("start", id))
    }

    /// Sends `signal` to the workload's init process; a workload that is not
    /// running is left alone. Marks the workload as stopped on request.
    pub fn kill(&mut self, id: &str, signal: i32) -> Result<(), RuntimeError> {
        let mut c = self.load(id)?;
        if !c.can_kill() {
            return Ok(());
        }
        self.stop_requested.insert(id.to_string());
        let sig = to_signal(id, signal)?;
        serialized(|| c.kill(sig, false)).map_err(lc_err("kill", id))
    }

    pub fn state(&mut self, id: &str) -> Result<State, RuntimeError> {
        let c = self.load(id)?;
        Ok(self.map_status(id, &c))
    }

    /// The pid of a running workload's init (to enter its namespaces).
    pub fn running_pid(&mut self, id: &str) -> Result<i32, RuntimeError> {
        let c = self.load(id)?;
        let state = self.map_status(id, &c);
        match (state, c.pid()) {
            (State::Running, Some(pid)) => Ok(pid.as_raw()),
            _ => Err(RuntimeError::InvalidState {
                id: id.to_string(),
                op: "exec in",
                state,
            }),
        }
    }

    fn map_status(&mut self, id: &str, c: &Container) -> State {
        match c.status() {
            ContainerStatus::Creating | ContainerStatus::Created => State::Created,
            ContainerStatus::Running | ContainerStatus::Paused => State::Running,
            ContainerStatus::Stopped => {
                if let Some(pid) = c.pid() {
                    if !self.exits.contains_key(id) {
                        if let Some(code) = reap(pid.as_raw(), false) {
                            self.exits.insert(id.to_string(), code);
                        }
                    }
                }
                State::from_exit(
                    self.exits.get(id).copied(),
                    self.stop_requested.contains(id),
                )
            }
        }
    }

    /// Blocks until the workload's init process exits; returns its exit code
    /// (128+signal when killed). `None` when it is not our child (already reaped).
    pub fn wait(&mut self, id: &str) -> Result<Option<i64>, RuntimeError> {
        if let Some(code) = self.exits.get(id) {
            return Ok(Some(*code));
        }
        let c = self.load(id)?;
        let Some(pid) = c.pid() else { return Ok(None) };
        let code = reap(pid.as_raw(), true);
        if let Some(code) = code {
            self.exits.insert(id.to_string(), code);
        }
        Ok(code)
    }

    /// Kills the workload if needed, removes its network, cgroup, state,
    /// writable layer, bundle and log. Leftovers of a workload whose state is
    /// already gone are removed too (and `NotFound` returned).
    pub fn delete(&mut self, id: &str) -> Result<(), RuntimeError> {
        let mut c = match self.load(id) {
            Ok(c) => c,
            Err(RuntimeError::NotFound(_)) => {
                let _ = self.remove_leftovers(id);
                return Err(RuntimeError::NotFound(id.to_string()));
            }
            Err(e) => return Err(e),
        };
        if c.can_kill() {
            let sig = to_signal(id, libc::SIGKILL)?;
            serialized(|| c.kill(sig, false)).map_err(lc_err("kill", id))?;
        }
        if let Some(pid) = c.pid() {
            if !self.exits.contains_key(id) {
                // SIGKILLed (or already exited): reaping cannot block for long.
                reap(pid.as_raw(), true);
            }
        }
        // The namespace dies with the workload and takes the veth pair with
        // it, but asynchronously: remove it now so the name is free again.
        self.remove_veth(id)?;
        if !Self::delete_stopped(&mut c)? {
            serialized(|| c.delete(true)).map_err(lc_err("delete", id))?;
        }
        self.exits.remove(id);
        self.stop_requested.remove(id);
        self.remove_leftovers(id)
    }

    /// libcontainer's delete for the common case, without building a cgroup
    /// manager (see `cgroup`): a stopped container without poststop hooks or
    /// Intel RDT state loses its cgroup directories and state directory.
    /// `false`: not that case, use libcontainer's delete.
    fn delete_stopped(c: &mut Container) -> Result<bool, RuntimeError> {
        if c.status() != ContainerStatus::Stopped && c.refresh_status().is_err() {
            return Ok(false);
        }
        if c.status() != ContainerStatus::Stopped || c.systemd() || c.intel_rdt_dir().is_some() {
            return Ok(false);
        }
        let Ok(config) = YoukiConfig::load(&c.root) else {
            return Ok(false);
        };
        let poststop = config.hooks.as_ref().and_then(|h| h.poststop().as_ref());
        if poststop.is_some_and(|hooks| !hooks.is_empty()) {
            return Ok(false);
        }
        let Some(dirs) = cgroup::dirs_of(&config.cgroup_path) else {
            return Ok(false);
        };
        // Still busy after retries: libcontainer's delete retries and reports.
        if cgroup::remove_dirs(&dirs).is_err() {
            return Ok(false);
        }
        fs::remove_dir_all(&c.root).map_err(io_err("remove container state", &c.root))?;
        Ok(true)
    }

    fn remove_veth(&mut self, id: &str) -> Result<(), RuntimeError> {
        let veth = self.veth_name(id);
        if !self.net.link_exists(&veth) {
            return Ok(());
        }
        let res = self.net.apply(
            net::Netns::Runtime,
            &[ployz_netlink::Op::DeleteLink {
                ifname: veth.clone(),
            }
            .into()],
        );
        match res {
            // Gone meanwhile (the namespace's teardown won the race).
            Err(_) if !self.net.link_exists(&veth) => Ok(()),
            r => r.map_err(net_err(format!("remove veth {veth} of workload `{id}`"))),
        }
    }

    /// Everything of workload `id` outside libcontainer's state.
    fn remove_leftovers(&mut self, id: &str) -> Result<(), RuntimeError> {
        self.remove_veth(id)?;
        rootfs::remove(&self.root, id)?;
        let bundle = self.bundle_dir(id);
        if bundle.exists() {
            fs::remove_dir_all(&bundle).map_err(io_err("remove bundle", &bundle))?;
        }
        let log = self.log_path(id);
        match fs::remove_file(&log) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                Err(io_err("remove log", &log)(e))
            }
            _ => Ok(()),
        }
    }

    pub fn list(&mut self) -> Result<Vec<WorkloadStatus>, RuntimeError> {
        let dir = self.state_dir();
        let mut out = Vec::new();
        for entry in fs::read_dir(&dir).map_err(io_err("read state directory", &dir))? {
            let entry = entry.map_err(io_err("read state directory", &dir))?;
            let Some(id) = entry.file_name().to_str().map(str::to_string) else {
                continue;
            };
            match self.state(&id) {
                Ok(state) => {
                    let exit_code = match state {
                        State::Stopped | State::Failed => self.exits.get(&id).copied(),
                        State::Created | State::Running => None,
                    };
                    out.push(WorkloadStatus {
                        id,
                        state,
                        exit_code,
                    })
                }
                // Deleted concurrently or a stray directory: not a workload.
                Err(RuntimeError::NotFound(_)) | Err(RuntimeError::InvalidId(_)) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(out)
    }
}

fn to_signal(id: &str, signal: i32) -> Result<Signal, RuntimeError> {
    Signal::try_from(signal).map_err(|e| RuntimeError::InvalidSpec {
        id: id.to_string(),
        reason: format!("signal {signal} is not a valid signal: {e}"),
    })
}

/// waitpid on one pid; returns the exit code (128+signal when killed), or
/// `None` when it is still running (non-blocking) or not our child.
fn reap(pid: i32, block: bool) -> Option<i64> {
    let mut status = 0;
    loop {
        // SAFETY: waitpid writes only to `status`, a valid local.
        let rc = unsafe { libc::waitpid(pid, &mut status, if block { 0 } else { libc::WNOHANG }) };
        if rc == -1 && std::io::Error::last_os_error().raw_os_error() == Some(libc::EINTR) {
            continue;
        }
        if rc != pid {
            return None;
        }
        if libc::WIFEXITED(status) {
            return Some(libc::WEXITSTATUS(status) as i64);
        }
        if libc::WIFSIGNALED(status) {
            return Some(128 + libc::WTERMSIG(status) as i64);
        }
        return None;
    }
}

/// libcontainer clones this process; two clones racing from two threads of
/// one process deadlock or fail (seen in tests). Every libcontainer call in
/// the process goes through this lock.
///
/// So does every command this crate runs with pipes (`iptables`): a
/// clone (a fork that does not exec until `start`) made while such a pipe is
/// open keeps its write end, and reading the command's output to EOF then
/// hangs until that workload starts (seen in tests, with `ip` before
/// ployzd spoke netlink: two creates, each holding the other's pipe).
static LIBCONTAINER: Mutex<()> = Mutex::new(());

pub(crate) fn serialized<T>(f: impl FnOnce() -> T) -> T {
    let _guard = LIBCONTAINER.lock().unwrap_or_else(|p| p.into_inner());
    f()
}

type Job = Box<dyn FnOnce(&mut HostEngine) + Send>;

/// The host backend for async callers: a [`HostEngine`] on its own OS thread.
pub struct HostRuntime {
    tx: Mutex<mpsc::Sender<Job>>,
    root: PathBuf,
}

impl HostRuntime {
    /// Starts the worker thread; `root` holds state, bundles and logs
    /// (e.g. `<data-dir>/runtime`).
    pub fn new(root: impl Into<PathBuf>) -> Result<Self, RuntimeError> {
        let root = root.into();
        let mut engine = HostEngine::new(root.clone())?.with_create_helper();
        let (tx, rx) = mpsc::channel::<Job>();
        std::thread::Builder::new()
            .name("ployz-host-runtime".into())
            .spawn(move || {
                while let Ok(job) = rx.recv() {
                    job(&mut engine);
                }
            })
            .map_err(io_err("spawn the worker thread for", &root))?;
        Ok(HostRuntime {
            tx: Mutex::new(tx),
            root,
        })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    async fn call<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut HostEngine) -> Result<T, RuntimeError> + Send + 'static,
    ) -> Result<T, RuntimeError> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let job: Job = Box::new(move |engine| {
            let _ = tx.send(f(engine));
        });
        self.tx
            .lock()
            .map_err(|_| RuntimeError::WorkerGone)?
            .send(job)
            .map_err(|_| RuntimeError::WorkerGone)?;
        rx.await.map_err(|_| RuntimeError::WorkerGone)?
    }
}

const STOP_POLL: Duration = Duration::from_millis(20);
const KILL_GRACE: Duration = Duration::from_secs(10);

impl Runtime for HostRuntime {
    fn kind(&self) -> RuntimeKind {
        RuntimeKind::Host
    }

    async fn create(&self, spec: &WorkloadSpec) -> Result<(), RuntimeError> {
        let spec = spec.clone();
        self.call(move |e| e.create(&spec)).await
    }

    async fn start(&self, id: &str) -> Result<(), RuntimeError> {
        let id = id.to_string();
        self.call(move |e| e.start(&id)).await
    }

    async fn stop(&self, id: &str, timeout: Duration) -> Result<(), RuntimeError> {
        let owned = id.to_string();
        let state = self.call(move |e| e.state(&owned)).await?;
        if state != State::Running {
            // Created: nothing runs yet, but it must never start: kill its init.
            if state == State::Created {
                let owned = id.to_string();
                self.call(move |e| e.kill(&owned, libc::SIGKILL)).await?;
            }
            return Ok(());
        }
        let owned = id.to_string();
        self.call(move |e| e.kill(&owned, libc::SIGTERM)).await?;
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let owned = id.to_string();
            if self.call(move |e| e.state(&owned)).await? != State::Running {
                return Ok(());
            }
            if tokio::time::Instant::now() >= deadline {
                break;
            }
            tokio::time::sleep(STOP_POLL).await;
        }
        let owned = id.to_string();
        self.call(move |e| e.kill(&owned, libc::SIGKILL)).await?;
        let deadline = tokio::time::Instant::now() + KILL_GRACE;
        loop {
            let owned = id.to_string();
            let state = self.call(move |e| e.state(&owned)).await?;
            if state != State::Running {
                return Ok(());
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(RuntimeError::InvalidState {
                    id: id.to_string(),
                    op: "stop (still alive 10 s after SIGKILL; check for a process stuck in D state)",
                    state,
                });
            }
            tokio::time::sleep(STOP_POLL).await;
        }
    }

    async fn delete(&self, id: &str) -> Result<(), RuntimeError> {
        let id = id.to_string();
        self.call(move |e| e.delete(&id)).await
    }

    async fn state(&self, id: &str) -> Result<State, RuntimeError> {
        let id = id.to_string();
        self.call(move |e| e.state(&id)).await
    }

    async fn list(&self) -> Result<Vec<WorkloadStatus>, RuntimeError> {
        self.call(|e| e.list()).await
    }

    async fn ensure_network(&self, net: &BridgeNetwork) -> Result<(), RuntimeError> {
        let net = net.clone();
        self.call(move |e| e.ensure_network(&net)).await
    }

    async fn remove_network(&self, bridge: &str) -> Result<(), RuntimeError> {
        let bridge = bridge.to_string();
        self.call(move |e| e.remove_network(&bridge)).await
    }

    async fn exec(
        &self,
        id: &str,
        args: &[String],
        timeout: Duration,
    ) -> Result<crate::ExecOutput, RuntimeError> {
        crate::validate_exec(id, args)?;
        let owned = id.to_string();
        let pid = self.call(move |e| e.running_pid(&owned)).await?;
        enter::exec_in(&self.root.join("exec"), id, pid, args, timeout).await
    }

    async fn logs(&self, id: &str) -> Result<String, RuntimeError> {
        crate::validate_id(id)?;
        let path = self.root.join("logs").join(format!("{id}.log"));
        match tokio::fs::read(&path).await {
            Ok(bytes) => Ok(String::from_utf8_lossy(&bytes).into_owned()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                Err(RuntimeError::NotFound(id.to_string()))
            }
            Err(e) => Err(io_err("read log", &path)(e)),
        }
    }
}
