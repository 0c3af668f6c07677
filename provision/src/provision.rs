//! Provisioning a machine over SSH (`machine init` / `machine add`) and
//! updating one (`machine update`, with rollback).
//!
//! Everything a target needs is decided here from the preflight facts; the
//! remote side only runs plain shell (`cat`, `chmod`, `mv`, `systemctl`,
//! `ployzctl`). The `*_over` functions take any [`Transport`], so the
//! sequence of commands is unit-tested with the recording fake.

use crate::git::{GitBuildError, GitSource};
use crate::preflight::{self, HostFacts, PreflightError, Purpose};
use crate::release::{self, ReleaseError, ReleaseLocation};
use crate::ssh::{sh_quote, ExecOutput, SshError, SshOptions, SshSession, SshTarget, Transport};
use crate::{render_unit_with, DaemonArgs, Env, Layout, Ports, ServiceMode};
use serde::Serialize;
use std::fmt;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

/// What is happening, for live progress (and the failing step of an error).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Step {
    /// SSH connection, host key check, login.
    Connect,
    /// Read-only checks of the target.
    Preflight,
    /// Fetching and verifying (or building) the binaries locally.
    Fetch,
    /// Uploading the binaries.
    Upload,
    /// Writing the systemd unit (and enabling lingering in user mode).
    Unit,
    /// `systemctl enable --now ployzd`.
    Start,
    /// Waiting for the daemon's API socket to answer (or the new version).
    WaitReady,
    /// `ployzctl machine invite import` on the target.
    Join,
    /// Update: checking the new binary runs on the target.
    Check,
    /// Update: renaming the new binaries over the old ones.
    Swap,
    /// Update: `systemctl restart ployzd`.
    Restart,
    /// Update: restoring the previous binaries after a failed update.
    Rollback,
    Done,
}

impl Step {
    pub fn as_str(self) -> &'static str {
        match self {
            Step::Connect => "connect",
            Step::Preflight => "preflight",
            Step::Fetch => "fetch",
            Step::Upload => "upload",
            Step::Unit => "unit",
            Step::Start => "start",
            Step::WaitReady => "wait_ready",
            Step::Join => "join",
            Step::Check => "check",
            Step::Swap => "swap",
            Step::Restart => "restart",
            Step::Rollback => "rollback",
            Step::Done => "done",
        }
    }
}

impl fmt::Display for Step {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Where the binaries come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum InstallSource {
    /// A release location; `version` may be `latest`.
    Release {
        location: ReleaseLocation,
        version: String,
    },
    /// Built from a git ref on the initiating machine.
    Git(GitSource),
}

/// A verified pair of binaries for one target triple.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Binaries {
    /// The release version, or the git ref.
    pub version: String,
    pub triple: String,
    pub ployzd: Vec<u8>,
    pub ployzctl: Vec<u8>,
}

/// Failure to obtain binaries.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    #[error(transparent)]
    Release(#[from] ReleaseError),
    #[error(transparent)]
    Build(#[from] GitBuildError),
    #[error("cannot read the built binary {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("the build task failed: {0}")]
    Task(String),
}

/// Fetch and verify (release) or build (git) the binaries for the first of
/// `triples` available. Call once and pass the result in
/// [`ProvisionOptions::prefetched`] to provision several targets of one
/// architecture without fetching again.
pub async fn fetch_binaries(
    source: &InstallSource,
    triples: &[String],
) -> Result<Binaries, FetchError> {
    match source {
        InstallSource::Release { location, version } => {
            let version = release::resolve_version(location, version).await?;
            let d = release::fetch_binary(location, &version, "ployzd", triples).await?;
            let c = release::fetch_binary(
                location,
                &version,
                "ployzctl",
                std::slice::from_ref(&d.triple),
            )
            .await?;
            Ok(Binaries {
                version,
                triple: d.triple,
                ployzd: d.bytes,
                ployzctl: c.bytes,
            })
        }
        InstallSource::Git(src) => {
            let src = src.clone();
            let t = triples.to_vec();
            let built = tokio::task::spawn_blocking(move || crate::git::build(&src, &t))
                .await
                .map_err(|e| FetchError::Task(e.to_string()))??;
            let read = |p: &Path| {
                std::fs::read(p).map_err(|source| FetchError::Read {
                    path: p.to_path_buf(),
                    source,
                })
            };
            Ok(Binaries {
                version: match source {
                    InstallSource::Git(g) => g.reference.clone(),
                    InstallSource::Release { version, .. } => version.clone(),
                },
                triple: built.triple.clone(),
                ployzd: read(&built.ployzd)?,
                ployzctl: read(&built.ployzctl)?,
            })
        }
    }
}

/// Everything `machine init` / `machine add` decide for one target.
#[derive(Debug, Clone)]
pub struct ProvisionOptions {
    pub target: SshTarget,
    pub ssh: SshOptions,
    pub service_mode: ServiceMode,
    /// `host` or `docker`.
    pub runtime: String,
    pub install: InstallSource,
    /// `--advertise-ip` in the unit; `None`: the address SSH reached.
    pub advertise_ip: Option<IpAddr>,
    pub region: Option<String>,
    pub ports: Ports,
    /// How long the started daemon may take to answer on its socket.
    pub ready_timeout: Duration,
    /// Binaries fetched beforehand (used when their triple runs on the target).
    pub prefetched: Option<Arc<Binaries>>,
    /// Progress of the binary uploads.
    pub uploads: Option<UploadProgress>,
}

impl ProvisionOptions {
    /// System mode, host runtime, default ports, 60 s to come up.
    pub fn new(target: SshTarget, ssh: SshOptions, install: InstallSource) -> ProvisionOptions {
        ProvisionOptions {
            target,
            ssh,
            service_mode: ServiceMode::System,
            runtime: "host".into(),
            install,
            advertise_ip: None,
            region: None,
            ports: Ports::default(),
            ready_timeout: Duration::from_secs(60),
            prefetched: None,
            uploads: None,
        }
    }
}

/// A provisioned, joined machine.
#[derive(Debug, Clone, PartialEq)]
pub struct Provisioned {
    pub target: SshTarget,
    pub machine_id: String,
    /// The installed release version (or git ref).
    pub version: String,
    /// `PRETTY_NAME` of the target's OS and its architecture.
    pub os: String,
    pub arch: &'static str,
    /// The full `invite import --json` answer.
    pub join: serde_json::Value,
}

/// A remote command failed, or the connection broke during a step.
#[derive(Debug, thiserror::Error)]
pub enum RemoteError {
    #[error("{target}: {step}: `{command}` failed (exit {status}): {stderr}")]
    Command {
        target: String,
        step: Step,
        command: String,
        status: u32,
        stderr: String,
    },
    #[error("{target}: {step}: {source}")]
    Transport {
        target: String,
        step: Step,
        source: SshError,
    },
}

impl RemoteError {
    pub fn step(&self) -> Step {
        match self {
            RemoteError::Command { step, .. } | RemoteError::Transport { step, .. } => *step,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ProvisionError {
    #[error("{target}: connect: {source}")]
    Connect { target: String, source: SshError },
    #[error(transparent)]
    Preflight(#[from] PreflightError),
    #[error("{target}: fetch: {source}")]
    Fetch { target: String, source: FetchError },
    #[error(transparent)]
    Remote(#[from] RemoteError),
    #[error("{target}: wait_ready: ployzd did not answer on {socket} within {} (unit: {state}); last log lines:\n{journal}\nFix the cause above and retry; on the target `systemctl status ployzd` shows the service", ployz_api::time::human(*waited))]
    NotReady {
        target: String,
        socket: String,
        waited: Duration,
        state: String,
        journal: String,
    },
    #[error("{target}: join: the invite import failed: {message}; if the invite expired or was used, create a new one (`ployzctl machine invite create`); check the target can reach the founder's peer port")]
    Join { target: String, message: String },
}

impl ProvisionError {
    /// The step that failed.
    pub fn step(&self) -> Step {
        match self {
            ProvisionError::Connect { .. } => Step::Connect,
            ProvisionError::Preflight(_) => Step::Preflight,
            ProvisionError::Fetch { .. } => Step::Fetch,
            ProvisionError::Remote(r) => r.step(),
            ProvisionError::NotReady { .. } => Step::WaitReady,
            ProvisionError::Join { .. } => Step::Join,
        }
    }
}

/// Commands on one target, with `sudo -n` for privileged ones when the
/// login user is not root.
/// Told how far each binary upload got: the file's name, bytes sent,
/// its size. Called often; the receiver throttles.
#[derive(Clone)]
pub struct UploadProgress(Arc<UploadFn>);

/// `(file, bytes sent, size)`.
type UploadFn = dyn Fn(&str, u64, u64) + Send + Sync;

impl UploadProgress {
    pub fn new(f: impl Fn(&str, u64, u64) + Send + Sync + 'static) -> UploadProgress {
        UploadProgress(Arc::new(f))
    }
}

impl fmt::Debug for UploadProgress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("UploadProgress")
    }
}

struct Remote<'a, T: Transport> {
    t: &'a T,
    target: String,
    sudo: bool,
    mode: ServiceMode,
    uid: u32,
    uploads: Option<UploadProgress>,
}

impl<'a, T: Transport> Remote<'a, T> {
    fn new(t: &'a T, target: &SshTarget, facts: &HostFacts, mode: ServiceMode) -> Self {
        Remote {
            t,
            target: target.to_string(),
            sudo: facts.sudo(),
            mode,
            uid: facts.uid,
            uploads: None,
        }
    }

    fn reporting(mut self, uploads: Option<UploadProgress>) -> Self {
        self.uploads = uploads;
        self
    }

    /// Wrap `script` for `sh`; `privileged` adds `sudo -n` when needed.
    fn wrap(&self, script: &str, privileged: bool) -> String {
        if privileged && self.sudo {
            format!("sudo -n sh -c {}", sh_quote(script))
        } else {
            format!("sh -c {}", sh_quote(script))
        }
    }

    /// Privileged in system mode (root-owned paths), the user's own in user mode.
    fn owned(&self) -> bool {
        self.mode == ServiceMode::System
    }

    /// `systemctl` for this mode.
    fn systemctl(&self) -> String {
        match self.mode {
            ServiceMode::System => "systemctl".into(),
            ServiceMode::User => format!("XDG_RUNTIME_DIR=/run/user/{} systemctl --user", self.uid),
        }
    }

    fn journalctl(&self) -> String {
        match self.mode {
            ServiceMode::System => "journalctl -u ployzd".into(),
            ServiceMode::User => format!(
                "XDG_RUNTIME_DIR=/run/user/{} journalctl --user -u ployzd",
                self.uid
            ),
        }
    }

    async fn exec(
        &self,
        step: Step,
        script: &str,
        privileged: bool,
        stdin: &[u8],
    ) -> Result<ExecOutput, RemoteError> {
        self.t
            .exec_with_input(&self.wrap(script, privileged), stdin)
            .await
            .map_err(|source| RemoteError::Transport {
                target: self.target.clone(),
                step,
                source,
            })
    }

    /// Run and require exit 0. `shown` is how the command appears in errors
    /// (never a secret).
    async fn run(
        &self,
        step: Step,
        script: &str,
        shown: &str,
        privileged: bool,
    ) -> Result<ExecOutput, RemoteError> {
        let out = self.exec(step, script, privileged, &[]).await?;
        if !out.success() {
            return Err(RemoteError::Command {
                target: self.target.clone(),
                step,
                command: shown.to_string(),
                status: out.status,
                stderr: tail(&out.stderr_str(), 20),
            });
        }
        Ok(out)
    }

    /// Write `bytes` to `path` with `mode`: into a temporary file next to
    /// it, then `mv` (an atomic rename), so `path` is never half-written.
    async fn put(
        &self,
        step: Step,
        path: &Path,
        bytes: &[u8],
        mode: u32,
        privileged: bool,
    ) -> Result<(), RemoteError> {
        let p = sh_quote(&path.display().to_string());
        let script = format!(
            "set -e; mkdir -p \"$(dirname {p})\"; tmp={p}.ployz-tmp.$$; trap 'rm -f \"$tmp\"' EXIT; \
             cat > \"$tmp\"; chmod {mode:o} \"$tmp\"; mv -f \"$tmp\" {p}"
        );
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let total = bytes.len() as u64;
        let report = |done: u64| {
            if let Some(u) = self.uploads.as_ref().filter(|_| step == Step::Upload) {
                (u.0)(&name, done, total)
            }
        };
        report(0);
        let out = self
            .t
            .exec_sending(&self.wrap(&script, privileged), bytes, &report)
            .await
            .map_err(|source| RemoteError::Transport {
                target: self.target.clone(),
                step,
                source,
            })?;
        if !out.success() {
            return Err(RemoteError::Command {
                target: self.target.clone(),
                step,
                command: format!("upload {} ({} bytes)", path.display(), bytes.len()),
                status: out.status,
                stderr: tail(&out.stderr_str(), 20),
            });
        }
        Ok(())
    }

    /// Unit state and the last log lines, for error messages.
    async fn diagnose(&self, step: Step) -> (String, String) {
        let script = format!(
            "{} is-active ployzd 2>&1; echo @@; {} -n 30 --no-pager 2>&1 | tail -n 30",
            self.systemctl(),
            self.journalctl()
        );
        match self.exec(step, &script, self.owned(), &[]).await {
            Ok(out) => {
                let s = out.stdout_str();
                let (state, journal) = s.split_once("@@").unwrap_or((&s, ""));
                (state.trim().to_string(), journal.trim().to_string())
            }
            Err(e) => ("unknown".into(), e.to_string()),
        }
    }
}

fn tail(s: &str, n: usize) -> String {
    let lines: Vec<&str> = s.trim().lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// The layout on the target for `mode`, from preflight facts.
pub fn target_layout(mode: ServiceMode, facts: &HostFacts) -> Layout {
    Layout::for_mode(
        mode,
        &Env {
            home: Some(facts.home.clone()),
            xdg_runtime_dir: Some(PathBuf::from(format!("/run/user/{}", facts.uid))),
            uid: facts.uid,
        },
    )
}

/// The error message of a failed `ployzctl --json` call.
fn ctl_error(out: &ExecOutput) -> String {
    let parsed: Option<serde_json::Value> = serde_json::from_slice(&out.stdout).ok();
    if let Some(e) = parsed.as_ref().and_then(|v| v.get("error")) {
        let msg = e
            .get("message")
            .and_then(|m| m.as_str())
            .map(str::to_string)
            .unwrap_or_else(|| e.to_string());
        return match e.get("hint").and_then(|h| h.as_str()) {
            Some(h) => format!("{msg} (hint: {h})"),
            None => msg,
        };
    }
    let text = format!("{} {}", out.stdout_str().trim(), out.stderr_str().trim());
    let text = tail(text.trim(), 10);
    if text.is_empty() {
        format!("ployzctl exited with {}", out.status)
    } else {
        text
    }
}

/// Connect to `opts.target`, check it, install ployzd, start it and join it
/// with the invite `token`. Returns once the target has imported the invite
/// (which itself returns once the machine is active).
pub async fn provision_machine(
    opts: &ProvisionOptions,
    token: &str,
    mut progress: impl FnMut(Step) + Send,
) -> Result<Provisioned, ProvisionError> {
    progress(Step::Connect);
    let session = SshSession::connect(&opts.target, &opts.ssh)
        .await
        .map_err(|source| ProvisionError::Connect {
            target: opts.target.to_string(),
            source,
        })?;
    let r = provision_over(&session, opts, token, progress).await;
    session.close().await;
    r
}

/// [`provision_machine`] over an established transport.
pub async fn provision_over<T: Transport>(
    t: &T,
    opts: &ProvisionOptions,
    token: &str,
    mut progress: impl FnMut(Step) + Send,
) -> Result<Provisioned, ProvisionError> {
    let target = opts.target.to_string();
    progress(Step::Preflight);
    let facts = preflight::preflight(
        t,
        &preflight::Request {
            target: target.clone(),
            mode: opts.service_mode,
            runtime: opts.runtime.clone(),
            ports: opts.ports,
            purpose: Purpose::Install,
        },
    )
    .await?;

    progress(Step::Fetch);
    let triples = facts.triples();
    let bins = match &opts.prefetched {
        Some(b) if triples.contains(&b.triple) => b.clone(),
        _ => Arc::new(
            fetch_binaries(&opts.install, &triples)
                .await
                .map_err(|source| ProvisionError::Fetch {
                    target: target.clone(),
                    source,
                })?,
        ),
    };

    let mode = opts.service_mode;
    let layout = target_layout(mode, &facts);
    let remote = Remote::new(t, &opts.target, &facts, mode).reporting(opts.uploads.clone());
    let owned = remote.owned();

    progress(Step::Upload);
    remote
        .put(Step::Upload, &layout.binary, &bins.ployzd, 0o755, owned)
        .await?;
    remote
        .put(
            Step::Upload,
            &layout.ctl_binary(),
            &bins.ployzctl,
            0o755,
            owned,
        )
        .await?;

    progress(Step::Unit);
    if mode == ServiceMode::User && !facts.linger {
        let cmd = format!("loginctl enable-linger {}", sh_quote(&facts.user));
        remote.run(Step::Unit, &cmd, &cmd, true).await?;
        // The user manager starts asynchronously once lingering is on.
        let wait = format!(
            "i=0; while [ $i -lt 100 ]; do case \"$({} is-system-running 2>/dev/null)\" in \
             running|degraded|starting|initializing) exit 0;; esac; i=$((i+1)); sleep 0.1; done; \
             {} is-system-running",
            remote.systemctl(),
            remote.systemctl()
        );
        remote
            .run(
                Step::Unit,
                &wait,
                "wait for the systemd user manager",
                false,
            )
            .await?;
    }
    let args = DaemonArgs {
        runtime: opts.runtime.clone(),
        advertise_ip: opts.advertise_ip.or_else(|| t.remote_ip()),
        region: opts.region.clone(),
        ports: opts.ports,
    };
    let unit = render_unit_with(mode, &layout, &args);
    remote
        .put(Step::Unit, &layout.unit, unit.as_bytes(), 0o644, owned)
        .await?;

    progress(Step::Start);
    let start = format!(
        "{s} daemon-reload && {s} enable --now ployzd.service",
        s = remote.systemctl()
    );
    remote.run(Step::Start, &start, &start, owned).await?;

    progress(Step::WaitReady);
    let ctl = sh_quote(&layout.ctl_binary().display().to_string());
    let sock = sh_quote(&layout.socket.display().to_string());
    let rounds = (opts.ready_timeout.as_millis() / 200).max(1);
    // ployzctl exits 3 while nothing answers on the socket.
    let wait = format!(
        "i=0; while [ $i -lt {rounds} ]; do {ctl} --socket {sock} mesh status >/dev/null 2>&1; \
         rc=$?; if [ $rc -ne 3 ] && [ $rc -lt 126 ]; then exit 0; fi; i=$((i+1)); sleep 0.2; done; exit 1"
    );
    let out = remote.exec(Step::WaitReady, &wait, owned, &[]).await?;
    if !out.success() {
        let (state, journal) = remote.diagnose(Step::WaitReady).await;
        return Err(ProvisionError::NotReady {
            target,
            socket: layout.socket.display().to_string(),
            waited: opts.ready_timeout,
            state,
            journal,
        });
    }

    progress(Step::Join);
    // The token goes on stdin: on the command line it would show in `ps`
    // on the target for as long as the join takes.
    let import = format!("{ctl} --socket {sock} --json machine invite import --token-stdin");
    let mut out = remote
        .exec(Step::Join, &import, owned, format!("{token}\n").as_bytes())
        .await?;
    if out.status == 2 && String::from_utf8_lossy(&out.stderr).contains("--token-stdin") {
        // A release older than `--token-stdin` (a usage error): argv it is.
        let argv = format!(
            "{ctl} --socket {sock} --json machine invite import --token {}",
            sh_quote(token)
        );
        out = remote.exec(Step::Join, &argv, owned, &[]).await?;
    }
    let parsed: Option<serde_json::Value> = serde_json::from_slice(&out.stdout).ok();
    let machine_id = parsed
        .as_ref()
        .and_then(|v| v.get("machine_id"))
        .and_then(|v| v.as_str())
        .map(str::to_string);
    let (Some(machine_id), true) = (machine_id, out.success()) else {
        return Err(ProvisionError::Join {
            target,
            message: ctl_error(&out),
        });
    };
    let join = parsed.unwrap_or_default();
    let version = join
        .pointer("/machine/version")
        .and_then(|v| v.as_str())
        .map(str::to_string)
        .unwrap_or_else(|| bins.version.clone());
    progress(Step::Done);
    Ok(Provisioned {
        target: opts.target.clone(),
        machine_id,
        version,
        os: facts.os.clone(),
        arch: facts.arch.as_str(),
        join,
    })
}

/// What `machine update` decides for one target.
#[derive(Debug, Clone)]
pub struct UpdateOptions {
    pub target: SshTarget,
    pub ssh: SshOptions,
    pub service_mode: ServiceMode,
    pub location: ReleaseLocation,
    /// A version or `latest`.
    pub version: String,
    /// How long the restarted daemon may take to answer with the new
    /// version before we roll back.
    pub ready_timeout: Duration,
    /// Binaries fetched beforehand (used when their triple runs on the target).
    pub prefetched: Option<Arc<Binaries>>,
    /// Progress of the binary uploads.
    pub uploads: Option<UploadProgress>,
}

impl UpdateOptions {
    pub fn new(target: SshTarget, ssh: SshOptions, location: ReleaseLocation) -> UpdateOptions {
        UpdateOptions {
            target,
            ssh,
            service_mode: ServiceMode::System,
            location,
            version: "latest".into(),
            ready_timeout: Duration::from_secs(60),
            prefetched: None,
            uploads: None,
        }
    }
}

/// A successful update.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Updated {
    pub target: String,
    pub machine_id: String,
    /// As the daemon reported it before and after.
    pub old_version: String,
    pub new_version: String,
    /// The release version installed (the name in the release location).
    pub release: String,
}

#[derive(Debug, thiserror::Error)]
pub enum UpdateError {
    #[error("{target}: connect: {source}")]
    Connect { target: String, source: SshError },
    #[error(transparent)]
    Preflight(#[from] PreflightError),
    #[error("{target}: fetch: {source}")]
    Fetch { target: String, source: FetchError },
    #[error(transparent)]
    Remote(#[from] RemoteError),
    #[error("{target}: check: the new ployzd ({release}) does not run on this machine: `ployzd --version` gave exit {status}: {output}; nothing was changed — publish a build for this machine")]
    BadBinary {
        target: String,
        release: String,
        status: u32,
        output: String,
    },
    #[error("{target}: wait_ready: ployzd {attempted} did not come up ({reason}); ROLLED BACK to {restored}, which is running again. Log of the failed start:\n{journal}")]
    RolledBack {
        target: String,
        attempted: String,
        restored: String,
        reason: String,
        journal: String,
    },
    #[error("{target}: rollback: ployzd {attempted} did not come up ({reason}) and the restored {restored} did not answer either; on the target check `systemctl status ployzd` and `journalctl -u ployzd`. Log:\n{journal}")]
    RollbackFailed {
        target: String,
        attempted: String,
        restored: String,
        reason: String,
        journal: String,
    },
}

impl UpdateError {
    pub fn step(&self) -> Step {
        match self {
            UpdateError::Connect { .. } => Step::Connect,
            UpdateError::Preflight(_) => Step::Preflight,
            UpdateError::Fetch { .. } => Step::Fetch,
            UpdateError::Remote(r) => r.step(),
            UpdateError::BadBinary { .. } => Step::Check,
            UpdateError::RolledBack { .. } => Step::WaitReady,
            UpdateError::RollbackFailed { .. } => Step::Rollback,
        }
    }
}

/// `ployzd 0.4.2` → `0.4.2`.
pub fn parse_version_output(s: &str) -> Option<String> {
    let line = s.lines().next()?.trim();
    let mut parts = line.split_whitespace();
    let first = parts.next()?;
    Some(parts.next().unwrap_or(first).to_string())
}

/// Fetch the release, upload it beside the installed binaries, check it
/// runs, swap it in (rename), restart ployzd and wait for it to report the
/// new version; roll back to the previous binaries (and restart) if it does
/// not come up.
pub async fn update_machine(
    opts: &UpdateOptions,
    mut progress: impl FnMut(Step) + Send,
) -> Result<Updated, UpdateError> {
    progress(Step::Connect);
    let session = SshSession::connect(&opts.target, &opts.ssh)
        .await
        .map_err(|source| UpdateError::Connect {
            target: opts.target.to_string(),
            source,
        })?;
    let r = update_over(&session, opts, progress).await;
    session.close().await;
    r
}

/// The daemon's `mesh status --json` (machine id, version), if it answers.
async fn daemon_status<T: Transport>(
    remote: &Remote<'_, T>,
    layout: &Layout,
    step: Step,
) -> Result<Option<(String, String)>, RemoteError> {
    let cmd = format!(
        "{} --socket {} --json mesh status",
        sh_quote(&layout.ctl_binary().display().to_string()),
        sh_quote(&layout.socket.display().to_string())
    );
    let out = remote.exec(step, &cmd, remote.owned(), &[]).await?;
    if !out.success() {
        return Ok(None);
    }
    let v: Option<serde_json::Value> = serde_json::from_slice(&out.stdout).ok();
    Ok(v.and_then(|v| {
        Some((
            v.get("machine_id")?.as_str()?.to_string(),
            v.get("version")?.as_str()?.to_string(),
        ))
    }))
}

/// Poll until the daemon answers with `version` (and its unit is active).
async fn wait_version<T: Transport>(
    remote: &Remote<'_, T>,
    layout: &Layout,
    version: &str,
    timeout: Duration,
) -> Result<Result<String, String>, RemoteError> {
    let deadline = tokio::time::Instant::now() + timeout;
    let mut last = format!(
        "no answer on the API socket within {}",
        ployz_api::time::human(timeout)
    );
    loop {
        if let Some((id, v)) = daemon_status(remote, layout, Step::WaitReady).await? {
            if v == version {
                return Ok(Ok(id));
            }
            last = format!(
                "it still reports version {v} after {}",
                ployz_api::time::human(timeout)
            );
        }
        if tokio::time::Instant::now() >= deadline {
            return Ok(Err(last));
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

/// [`update_machine`] over an established transport.
pub async fn update_over<T: Transport>(
    t: &T,
    opts: &UpdateOptions,
    mut progress: impl FnMut(Step) + Send,
) -> Result<Updated, UpdateError> {
    let target = opts.target.to_string();
    progress(Step::Preflight);
    let facts = preflight::preflight(
        t,
        &preflight::Request {
            target: target.clone(),
            mode: opts.service_mode,
            runtime: String::new(),
            ports: Ports::default(),
            purpose: Purpose::Update,
        },
    )
    .await?;
    let mode = opts.service_mode;
    let layout = target_layout(mode, &facts);
    let remote = Remote::new(t, &opts.target, &facts, mode).reporting(opts.uploads.clone());
    let owned = remote.owned();
    let bin = layout.binary.display().to_string();
    let ctl = layout.ctl_binary().display().to_string();
    let (q_bin, q_ctl) = (sh_quote(&bin), sh_quote(&ctl));

    // What runs now.
    let (machine_id, old_version) = match daemon_status(&remote, &layout, Step::Preflight).await? {
        Some(s) => s,
        None => {
            let out = remote
                .run(
                    Step::Preflight,
                    &format!("{q_bin} --version"),
                    &format!("{bin} --version"),
                    false,
                )
                .await?;
            (
                String::new(),
                parse_version_output(&out.stdout_str()).unwrap_or_else(|| "unknown".into()),
            )
        }
    };

    progress(Step::Fetch);
    let triples = facts.triples();
    let fetch_err = |source| UpdateError::Fetch {
        target: target.clone(),
        source,
    };
    let bins = match &opts.prefetched {
        Some(b) if triples.contains(&b.triple) => b.clone(),
        _ => Arc::new(
            fetch_binaries(
                &InstallSource::Release {
                    location: opts.location.clone(),
                    version: opts.version.clone(),
                },
                &triples,
            )
            .await
            .map_err(fetch_err)?,
        ),
    };

    progress(Step::Upload);
    let new_bin = PathBuf::from(format!("{bin}.new"));
    let new_ctl = PathBuf::from(format!("{ctl}.new"));
    remote
        .put(Step::Upload, &new_bin, &bins.ployzd, 0o755, owned)
        .await?;
    remote
        .put(Step::Upload, &new_ctl, &bins.ployzctl, 0o755, owned)
        .await?;

    progress(Step::Check);
    let out = remote
        .exec(
            Step::Check,
            &format!("{} --version", sh_quote(&format!("{bin}.new"))),
            false,
            &[],
        )
        .await?;
    let new_version = match (out.success(), parse_version_output(&out.stdout_str())) {
        (true, Some(v)) => v,
        _ => {
            let cleanup = format!(
                "rm -f {} {}",
                sh_quote(&format!("{bin}.new")),
                sh_quote(&format!("{ctl}.new"))
            );
            let _ = remote.exec(Step::Check, &cleanup, owned, &[]).await;
            return Err(UpdateError::BadBinary {
                target,
                release: bins.version.clone(),
                status: out.status,
                output: tail(&format!("{}{}", out.stdout_str(), out.stderr_str()), 10),
            });
        }
    };

    progress(Step::Swap);
    // Keep the running binaries as .prev (hard links), then rename the new
    // ones over them: each path always names a complete binary.
    let swap = format!(
        "set -e; ln -f {q_bin} {q_bin}.prev; ln -f {q_ctl} {q_ctl}.prev; \
         mv -f {q_bin}.new {q_bin}; mv -f {q_ctl}.new {q_ctl}"
    );
    remote
        .run(Step::Swap, &swap, "swap in the new binaries", owned)
        .await?;

    progress(Step::Restart);
    let restart = format!(
        "{s} reset-failed ployzd >/dev/null 2>&1; {s} restart ployzd",
        s = remote.systemctl()
    );
    let restarted = remote.exec(Step::Restart, &restart, owned, &[]).await?;

    progress(Step::WaitReady);
    let outcome = if restarted.success() {
        wait_version(&remote, &layout, &new_version, opts.ready_timeout).await?
    } else {
        Err(format!(
            "`systemctl restart ployzd` failed: {}",
            tail(&restarted.stderr_str(), 5)
        ))
    };
    match outcome {
        Ok(id) => {
            let cleanup = format!("rm -f {q_bin}.prev {q_ctl}.prev");
            let _ = remote.exec(Step::Done, &cleanup, owned, &[]).await;
            progress(Step::Done);
            Ok(Updated {
                target,
                machine_id: if id.is_empty() { machine_id } else { id },
                old_version,
                new_version,
                release: bins.version.clone(),
            })
        }
        Err(reason) => {
            let (_, journal) = remote.diagnose(Step::WaitReady).await;
            progress(Step::Rollback);
            let rollback = format!(
                "set -e; mv -f {q_bin}.prev {q_bin}; mv -f {q_ctl}.prev {q_ctl}; \
                 {s} reset-failed ployzd >/dev/null 2>&1 || true; {s} restart ployzd",
                s = remote.systemctl()
            );
            let rolled = remote.exec(Step::Rollback, &rollback, owned, &[]).await?;
            let back = if rolled.success() {
                wait_version(&remote, &layout, &old_version, opts.ready_timeout).await?
            } else {
                Err(tail(&rolled.stderr_str(), 5))
            };
            match back {
                Ok(_) => Err(UpdateError::RolledBack {
                    target,
                    attempted: new_version,
                    restored: old_version,
                    reason,
                    journal,
                }),
                Err(why) => Err(UpdateError::RollbackFailed {
                    target,
                    attempted: new_version,
                    restored: old_version,
                    reason: format!("{reason}; after rollback: {why}"),
                    journal,
                }),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::preflight::tests::DEBIAN_ROOT;
    use crate::ssh::fake::FakeTransport;

    fn bins() -> Arc<Binaries> {
        Arc::new(Binaries {
            version: "0.4.2".into(),
            triple: "x86_64-unknown-linux-gnu".into(),
            ployzd: b"DAEMON".to_vec(),
            ployzctl: b"CTL".to_vec(),
        })
    }

    fn opts() -> ProvisionOptions {
        let mut o = ProvisionOptions::new(
            "root@10.0.1.20".parse().unwrap(),
            SshOptions::new("/nonexistent/known_hosts"),
            InstallSource::Release {
                location: ReleaseLocation::File("/nonexistent".into()),
                version: "latest".into(),
            },
        );
        o.prefetched = Some(bins());
        o.ready_timeout = Duration::from_secs(2);
        o
    }

    const JOINED: &str =
        r#"{"machine_id":"m-2","network":{"name":"n"},"machine":{"version":"0.4.2"}}"#;

    #[tokio::test]
    async fn system_mode_as_root_installs_unit_starts_and_joins() {
        let t = FakeTransport::new()
            .on("@@uname", ExecOutput::ok(DEBIAN_ROOT))
            .on("invite import", ExecOutput::ok(JOINED));
        let mut steps = Vec::new();
        let sent = Arc::new(std::sync::Mutex::new(Vec::new()));
        let mut o = opts();
        o.uploads = Some(UploadProgress::new({
            let sent = sent.clone();
            move |file, done, total| sent.lock().unwrap().push((file.to_string(), done, total))
        }));
        let p = provision_over(&t, &o, "TOKEN-1", |s| steps.push(s))
            .await
            .unwrap();
        // Both binaries report from 0 to their size; the unit file is no upload.
        assert_eq!(
            *sent.lock().unwrap(),
            [
                ("ployzd".to_string(), 0, 6),
                ("ployzd".to_string(), 6, 6),
                ("ployzctl".to_string(), 0, 3),
                ("ployzctl".to_string(), 3, 3),
            ]
        );
        assert_eq!(p.machine_id, "m-2");
        assert_eq!(p.version, "0.4.2");
        assert_eq!(
            steps,
            [
                Step::Preflight,
                Step::Fetch,
                Step::Upload,
                Step::Unit,
                Step::Start,
                Step::WaitReady,
                Step::Join,
                Step::Done
            ]
        );
        let rec = t.recorded();
        let cmds: Vec<&str> = rec.iter().map(|r| r.cmd.as_str()).collect();
        assert!(
            cmds.iter().all(|c| !c.starts_with("sudo")),
            "root needs no sudo"
        );
        let uploads: Vec<_> = rec
            .iter()
            .filter(|r| !r.stdin.is_empty() && !r.cmd.contains("invite import"))
            .collect();
        assert_eq!(uploads.len(), 3);
        assert!(uploads[0]
            .cmd
            .contains("mv -f \"$tmp\" /usr/local/bin/ployzd"));
        assert_eq!(uploads[0].stdin, b"DAEMON");
        assert!(uploads[1].cmd.contains("/usr/local/bin/ployzctl"));
        assert!(uploads[2]
            .cmd
            .contains("/etc/systemd/system/ployzd.service"));
        assert!(uploads[2].cmd.contains("chmod 644"));
        let unit = String::from_utf8_lossy(&uploads[2].stdin).into_owned();
        assert!(
            unit.contains("run --runtime host --service-mode system --advertise-ip 192.0.2.10\n"),
            "{unit}"
        );
        let start = cmds
            .iter()
            .position(|c| c.contains("enable --now ployzd"))
            .unwrap();
        let join = cmds
            .iter()
            .position(|c| c.contains("invite import"))
            .unwrap();
        assert!(start < join);
        // The token is never on the command line (it would show in `ps`).
        assert!(cmds[join].contains("--token-stdin"));
        assert!(cmds.iter().all(|c| !c.contains("TOKEN-1")), "{cmds:?}");
        let fed = rec
            .iter()
            .find(|r| r.cmd.contains("invite import"))
            .unwrap();
        assert_eq!(fed.stdin, b"TOKEN-1\n");
        assert!(cmds[join].contains("--socket /run/ployz/ployzd.sock"));
    }

    #[tokio::test]
    async fn sudo_user_gets_sudo_for_privileged_steps_only() {
        let probe = DEBIAN_ROOT
            .replace("@@id\n0\nroot\n/root", "@@id\n1000\nann\n/home/ann")
            .replace("@@sudo\nroot", "@@sudo\nsudo");
        let t = FakeTransport::new()
            .on("@@uname", ExecOutput::ok(&probe))
            .on("invite import", ExecOutput::ok(JOINED));
        let mut o = opts();
        o.target = "ann@10.0.1.20".parse().unwrap();
        provision_over(&t, &o, "T", |_| {}).await.unwrap();
        let cmds = t.commands();
        assert!(cmds[0].starts_with("sh -c"), "the probe runs unprivileged");
        for c in &cmds[1..] {
            assert!(c.starts_with("sudo -n sh -c"), "{c}");
        }
    }

    #[tokio::test]
    async fn user_mode_enables_linger_and_uses_the_user_manager() {
        let probe = DEBIAN_ROOT
            .replace("@@id\n0\nroot\n/root", "@@id\n1000\nann\n/home/ann")
            .replace("@@sudo\nroot", "@@sudo\nsudo")
            .replace(
                "@@pam-systemd\n",
                "@@pam-systemd\n/lib/x86_64-linux-gnu/security/pam_systemd.so\n",
            );
        let t = FakeTransport::new()
            .on("@@uname", ExecOutput::ok(&probe))
            .on("invite import", ExecOutput::ok(JOINED));
        let mut o = opts();
        o.service_mode = ServiceMode::User;
        provision_over(&t, &o, "T", |_| {}).await.unwrap();
        let cmds = t.commands();
        let linger = cmds.iter().find(|c| c.contains("enable-linger")).unwrap();
        assert!(linger.starts_with("sudo -n") && linger.contains("enable-linger ann"));
        let unit = t
            .recorded()
            .into_iter()
            .find(|r| r.cmd.contains(".config/systemd/user/ployzd.service"))
            .unwrap();
        assert!(
            unit.cmd.starts_with("sh -c"),
            "user files are the user's own"
        );
        let start = cmds.iter().find(|c| c.contains("enable --now")).unwrap();
        assert!(start.contains("XDG_RUNTIME_DIR=/run/user/1000 systemctl --user"));
        assert!(!start.starts_with("sudo"));
        let join = cmds.iter().find(|c| c.contains("invite import")).unwrap();
        assert!(join
            .contains("/home/ann/.local/bin/ployzctl --socket /run/user/1000/ployz/ployzd.sock"));
    }

    #[tokio::test]
    async fn failures_are_typed_by_step() {
        // Upload fails (disk full).
        let t = FakeTransport::new()
            .on("@@uname", ExecOutput::ok(DEBIAN_ROOT))
            .on(
                "cat > ",
                ExecOutput::failed(1, "cat: write error: No space left on device"),
            );
        let e = provision_over(&t, &opts(), "T", |_| {}).await.unwrap_err();
        assert_eq!(e.step(), Step::Upload);
        let m = e.to_string();
        assert!(
            m.starts_with("root@10.0.1.20: upload:") && m.contains("No space left"),
            "{m}"
        );
        assert!(!t.commands().iter().any(|c| c.contains("systemctl enable")));

        // The daemon never answers: the journal is in the error.
        let t = FakeTransport::new()
            .on("@@uname", ExecOutput::ok(DEBIAN_ROOT))
            .on("mesh status", ExecOutput::failed(1, ""))
            .on(
                "is-active ployzd",
                ExecOutput::ok("failed\n@@\nployzd: cannot open /dev/net/tun\n"),
            );
        let e = provision_over(&t, &opts(), "T", |_| {}).await.unwrap_err();
        assert_eq!(e.step(), Step::WaitReady);
        assert!(e.to_string().contains("cannot open /dev/net/tun"), "{e}");

        // The invite was already used: the daemon's message, never the token.
        let t = FakeTransport::new()
            .on("@@uname", ExecOutput::ok(DEBIAN_ROOT))
            .on(
                "invite import",
                ExecOutput {
                    status: 4,
                    stdout: br#"{"error":{"code":"conflict","message":"invite inv-1 was already used","hint":null}}"#.to_vec(),
                    stderr: vec![],
                },
            );
        let e = provision_over(&t, &opts(), "SECRET-TOKEN", |_| {})
            .await
            .unwrap_err();
        assert_eq!(e.step(), Step::Join);
        let m = e.to_string();
        assert!(
            m.contains("already used") && !m.contains("SECRET-TOKEN"),
            "{m}"
        );
    }

    fn uopts() -> UpdateOptions {
        let mut o = UpdateOptions::new(
            "root@10.0.1.20".parse().unwrap(),
            SshOptions::new("/nonexistent/known_hosts"),
            ReleaseLocation::File("/nonexistent".into()),
        );
        o.prefetched = Some(bins());
        o.ready_timeout = Duration::from_millis(600);
        o
    }

    fn installed_probe() -> String {
        DEBIAN_ROOT.replace(
            "@@unit\ninactive",
            "@@unit\n/etc/systemd/system/ployzd.service\nactive",
        )
    }

    fn status(v: &str) -> ExecOutput {
        ExecOutput::ok(&format!(r#"{{"machine_id":"m-2","version":"{v}"}}"#))
    }

    #[tokio::test]
    async fn update_swaps_restarts_and_reports_versions() {
        let t = FakeTransport::new()
            .on("@@uname", ExecOutput::ok(&installed_probe()))
            .on("ployzd.new --version", ExecOutput::ok("ployzd 0.4.2\n"))
            .on_seq(
                "mesh status",
                vec![status("0.4.1"), status("0.4.1"), status("0.4.2")],
            );
        let mut steps = Vec::new();
        let u = update_over(&t, &uopts(), |s| steps.push(s)).await.unwrap();
        assert_eq!(
            (u.old_version.as_str(), u.new_version.as_str()),
            ("0.4.1", "0.4.2")
        );
        assert_eq!(u.machine_id, "m-2");
        assert!(!steps.contains(&Step::Rollback));
        let cmds = t.commands();
        let swap = cmds.iter().position(|c| c.contains("ln -f")).unwrap();
        let restart = cmds
            .iter()
            .position(|c| c.contains("restart ployzd"))
            .unwrap();
        assert!(swap < restart);
        assert!(cmds[swap].contains("mv -f /usr/local/bin/ployzd.new /usr/local/bin/ployzd"));
        assert!(cmds
            .last()
            .unwrap()
            .contains("rm -f /usr/local/bin/ployzd.prev"));
    }

    #[tokio::test]
    async fn update_rolls_back_when_the_new_daemon_does_not_come_up() {
        let t = FakeTransport::new()
            .on("@@uname", ExecOutput::ok(&installed_probe()))
            .on("ployzd.new --version", ExecOutput::ok("ployzd 9.9.9\n"))
            .on(
                "is-active ployzd",
                ExecOutput::ok("activating\n@@\nployzd: exit 1\n"),
            )
            // Before: 0.4.1; the new one never answers; after rollback 0.4.1.
            .on_seq(
                "mesh status",
                vec![
                    status("0.4.1"),
                    ExecOutput::failed(3, ""),
                    ExecOutput::failed(3, ""),
                    ExecOutput::failed(3, ""),
                    status("0.4.1"),
                ],
            );
        let mut steps = Vec::new();
        let e = update_over(&t, &uopts(), |s| steps.push(s))
            .await
            .unwrap_err();
        assert!(steps.contains(&Step::Rollback));
        match &e {
            UpdateError::RolledBack {
                attempted,
                restored,
                journal,
                ..
            } => {
                assert_eq!((attempted.as_str(), restored.as_str()), ("9.9.9", "0.4.1"));
                assert!(journal.contains("exit 1"));
            }
            other => panic!("expected RolledBack, got {other}"),
        }
        let cmds = t.commands();
        let rb = cmds
            .iter()
            .find(|c| c.contains("ployzd.prev /usr/local/bin/ployzd;"))
            .unwrap();
        assert!(rb.contains("restart ployzd"));
    }

    #[tokio::test]
    async fn update_refuses_a_binary_that_does_not_run_without_touching_anything() {
        let t = FakeTransport::new()
            .on("@@uname", ExecOutput::ok(&installed_probe()))
            .on("mesh status", status("0.4.1"))
            .on(
                "ployzd.new --version",
                ExecOutput::failed(126, "cannot execute binary file: Exec format error"),
            );
        let e = update_over(&t, &uopts(), |_| {}).await.unwrap_err();
        assert_eq!(e.step(), Step::Check);
        assert!(e.to_string().contains("Exec format error"));
        assert!(!t
            .commands()
            .iter()
            .any(|c| c.contains("ln -f") || c.contains("restart")));
    }

    #[tokio::test]
    async fn update_needs_an_installed_daemon() {
        let t = FakeTransport::new().on("@@uname", ExecOutput::ok(DEBIAN_ROOT));
        let e = update_over(&t, &uopts(), |_| {}).await.unwrap_err();
        assert!(
            matches!(
                e,
                UpdateError::Preflight(PreflightError::NotInstalled { .. })
            ),
            "{e}"
        );
    }

    /// The daemon runs these on `tokio::spawn`: the futures must be Send.
    #[test]
    fn futures_are_send() {
        fn send<T: Send>(_: &T) {}
        let o = opts();
        send(&provision_machine(&o, "t", |_| {}));
        let u = uopts();
        send(&update_machine(&u, |_| {}));
    }

    #[test]
    fn version_output() {
        assert_eq!(
            parse_version_output("ployzd 0.4.2\n").as_deref(),
            Some("0.4.2")
        );
        assert_eq!(parse_version_output("0.4.2").as_deref(), Some("0.4.2"));
        assert_eq!(parse_version_output(""), None);
    }
}
