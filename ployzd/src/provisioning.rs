//! `machine init` / `add` / `update`: SSH provisioning driven by the daemon.
//! Targets go in sequence, each with its own invite; one failing target
//! never stops the others, and every target gets a result naming the step
//! that failed and why. Progress streams to the caller as it happens.

use crate::cluster::Cluster;
use crate::errors::{invalid, note, note_bytes, ProgressSink};
use crate::ops::{OpHandle, Operations};
use crate::store::{Store, Versioned};
use ployz_api::*;
use ployz_provision::provision::{
    provision_machine, update_machine, InstallSource, ProvisionOptions, UpdateOptions,
    UploadProgress,
};
use ployz_provision::release::ReleaseLocation;
use ployz_provision::ssh::{SshOptions, SshTarget};
use ployz_provision::ServiceMode;
use std::path::PathBuf;
use std::sync::Arc;

fn result(
    target: &str,
    machine: &str,
    ok: bool,
    step: Option<&str>,
    message: String,
) -> TargetResult {
    TargetResult {
        machine: machine.to_string(),
        ok,
        target: Some(target.to_string()),
        step: step.map(str::to_string),
        message,
    }
}

/// Pick the install source from the flags: a version implies `release`,
/// git flags imply `git` (as the page describes).
pub fn install_source(req: &AddRequest) -> Result<InstallSource, ApiError> {
    let git = req.install_git_url.is_some() || req.install_git_ref.is_some();
    let source = match req.install_source.as_deref() {
        Some(s) => s.to_string(),
        None if git => "git".into(),
        None => "release".into(),
    };
    match source.as_str() {
        "release" => {
            if git {
                return Err(invalid(
                    "--install-git-url/--install-git-ref need --install-source git",
                ));
            }
            let location = ReleaseLocation::from_flag_or_env(req.release_url.as_deref())
                .map_err(|e| invalid(e.to_string()))?;
            Ok(InstallSource::Release {
                location,
                version: req
                    .install_version
                    .clone()
                    .unwrap_or_else(|| "latest".into()),
            })
        }
        "git" => {
            let url = req.install_git_url.clone().ok_or_else(|| {
                invalid("--install-source git needs --install-git-url (and optionally --install-git-ref)")
            })?;
            Ok(InstallSource::Git(ployz_provision::git::GitSource {
                url,
                reference: req.install_git_ref.clone().unwrap_or_else(|| "main".into()),
                cargo_target_dir: None,
            }))
        }
        other => Err(invalid(format!(
            "unknown --install-source `{other}`: use `release` or `git`"
        ))),
    }
}

/// SSH provisioning of other machines from this one.
pub struct Provisioning {
    /// Holds `known_hosts`.
    data_dir: PathBuf,
    /// The region a provisioned machine gets unless told otherwise.
    region: String,
    store: Arc<Store>,
    cluster: Arc<Cluster>,
    ops: Arc<Operations>,
}

/// A result's SSH target, or its machine when it has none.
fn who(r: &TargetResult) -> &str {
    match r.target.as_deref() {
        Some(t) if t != "-" => t,
        _ => &r.machine,
    }
}

/// How a multi-target operation ended, from its per-target results:
/// every target done, none (nothing changed), or some.
fn outcome(results: &[TargetResult], what: &str) -> (OpState, String, i32) {
    let done: Vec<&str> = results.iter().filter(|r| r.ok).map(who).collect();
    let failed: Vec<String> = results
        .iter()
        .filter(|r| !r.ok)
        .map(|r| {
            format!(
                "{} ({}: {})",
                who(r),
                r.step.as_deref().unwrap_or("-"),
                r.message
            )
        })
        .collect();
    if failed.is_empty() {
        (
            OpState::Succeeded,
            format!("{what}: {}", done.join(", ")),
            0,
        )
    } else if done.is_empty() {
        (
            OpState::Failed,
            format!("none {what}; failed: {}", failed.join("; ")),
            EXIT_PARTIAL,
        )
    } else {
        (
            OpState::Failed,
            format!("{what}: {}; failed: {}", done.join(", "), failed.join("; ")),
            EXIT_PARTIAL,
        )
    }
}

/// What `ployzctl` exits with when some targets of a command failed.
const EXIT_PARTIAL: i32 = 9;

impl Provisioning {
    pub fn new(
        data_dir: PathBuf,
        region: String,
        store: Arc<Store>,
        cluster: Arc<Cluster>,
        ops: Arc<Operations>,
    ) -> Provisioning {
        Provisioning {
            data_dir,
            region,
            store,
            cluster,
            ops,
        }
    }

    fn ssh_options(&self, identity: Option<&str>) -> SshOptions {
        let mut o = SshOptions::new(self.data_dir.join("known_hosts"));
        o.identity = identity.map(PathBuf::from);
        o
    }

    pub(crate) async fn machine_add(
        &self,
        req: AddRequest,
        sink: &ProgressSink,
    ) -> Result<TargetsReport, ApiError> {
        let targets = parse_targets(&req.targets)?;
        let net = self.store.require_network().await?;
        if req.network != net.name {
            return Err(invalid(format!(
                "--network {} does not match this machine's network `{}`",
                req.network, net.name
            ))
            .with_hint("run `ployzctl machine add` on a machine of the network you want to grow"));
        }
        let install = install_source(&req)?;
        let mode: ServiceMode = req
            .service_mode
            .as_deref()
            .unwrap_or("system")
            .parse()
            .map_err(|e: ployz_provision::UnknownServiceMode| invalid(e.to_string()))?;
        let runtime: ployz_runtime::RuntimeKind = req
            .runtime
            .as_deref()
            .unwrap_or("host")
            .parse()
            .map_err(|e: ployz_runtime::UnknownRuntime| invalid(e.to_string()))?;
        let names: Vec<String> = targets.iter().map(|(n, _)| n.clone()).collect();
        let op = self
            .ops
            .begin(
                OpKind::MachineAdd,
                &names.join(","),
                OpDetail {
                    machines: names.clone(),
                    ..OpDetail::default()
                },
            )
            .await?;
        let results = self
            .add_targets(&op, targets, install, mode, runtime, &req, sink)
            .await;
        let (state, message, code) = outcome(&results, "joined");
        op.finish(state, message, code).await;
        Ok(TargetsReport { results })
    }

    /// The targets of `machine add`, one after the other; each invite is
    /// recorded in the operation before its target gets it.
    #[allow(clippy::too_many_arguments)]
    async fn add_targets(
        &self,
        op: &OpHandle,
        targets: Vec<(String, SshTarget)>,
        install: InstallSource,
        mode: ServiceMode,
        runtime: ployz_runtime::RuntimeKind,
        req: &AddRequest,
        sink: &ProgressSink,
    ) -> Vec<TargetResult> {
        let mut results = Vec::new();
        let total = targets.len();
        for (n, (name, target)) in targets.into_iter().enumerate() {
            if let Err(e) = op
                .step(
                    &format!("invite {name}"),
                    format!("target {}/{total}: issuing a single-use invite", n + 1),
                )
                .await
            {
                results.push(result(&name, "-", false, Some("operation"), e.message));
                continue;
            }
            note(sink, &name, "invite", "issuing a single-use invite");
            let invite = match self.cluster.invite_create(600).await {
                Ok(i) => i,
                Err(e) => {
                    results.push(result(&name, "-", false, Some("invite"), e.message));
                    continue;
                }
            };
            let recorded = op
                .record_detail(|d| {
                    d.invites.push(OpInvite {
                        target: name.clone(),
                        invite_id: invite.invite_id.clone(),
                    })
                })
                .await;
            let recorded = match recorded {
                Ok(()) => {
                    op.step(
                        &format!("provision {name}"),
                        format!("target {}/{total}: installing and joining over SSH", n + 1),
                    )
                    .await
                }
                Err(e) => Err(e),
            };
            if let Err(e) = recorded {
                let _ = self.cluster.invite_revoke(&invite.invite_id).await;
                results.push(result(&name, "-", false, Some("operation"), e.message));
                continue;
            }
            let mut opts = ProvisionOptions::new(
                target.clone(),
                self.ssh_options(req.identity.as_deref()),
                install.clone(),
            );
            opts.service_mode = mode;
            opts.runtime = runtime.to_string();
            opts.region = Some(self.region.clone());
            opts.uploads = Some(upload_progress(sink, &name));
            let started = std::time::Instant::now();
            let progress = {
                let sink = sink.clone();
                let name = name.clone();
                move |step: ployz_provision::provision::Step| {
                    note(
                        &sink,
                        &name,
                        step.as_str(),
                        format!("{:.1}s", started.elapsed().as_secs_f64()),
                    );
                }
            };
            match provision_machine(&opts, &invite.token, progress).await {
                Ok(p) => {
                    if let Err(e) = self.remember_ssh_target(&p.machine_id, &name).await {
                        tracing::warn!(
                            "recording the SSH target of {}: {}",
                            p.machine_id,
                            e.message
                        );
                    }
                    results.push(result(
                        &name,
                        &p.machine_id,
                        true,
                        None,
                        format!(
                            "joined as {} ({} {}, ployzd {}) in {:.1}s",
                            p.machine_id,
                            p.os,
                            p.arch,
                            p.version,
                            started.elapsed().as_secs_f64()
                        ),
                    ));
                }
                Err(e) => {
                    // Nothing joined with it: the invite must not linger.
                    let _ = self.cluster.invite_revoke(&invite.invite_id).await;
                    results.push(result(
                        &name,
                        "-",
                        false,
                        Some(e.step().as_str()),
                        e.to_string(),
                    ));
                }
            }
        }
        results
    }

    /// Leader: end the `machine add` of an owner that stopped running it.
    /// An invite its target used means that machine joined (its SSH target
    /// is recorded); every other invite is revoked, so a target that was
    /// half-way through its install can never join with it.
    pub(crate) async fn take_over_add(
        &self,
        op: Versioned<OperationRecord>,
    ) -> Result<(), ApiError> {
        self.ops
            .end_stale(op, |op| async move {
                let results = self.add_outcome(&op).await?;
                Ok(outcome(&results, "joined"))
            })
            .await
    }

    /// What became of each target of a `machine add` whose owner stopped.
    async fn add_outcome(
        &self,
        op: &Versioned<OperationRecord>,
    ) -> Result<Vec<TargetResult>, ApiError> {
        let mut results = Vec::new();
        for name in &op.value.detail.machines {
            let Some(inv) = op.value.detail.invites.iter().find(|i| &i.target == name) else {
                results.push(result(
                    name,
                    "-",
                    false,
                    Some("invite"),
                    "not started".into(),
                ));
                continue;
            };
            let used = self
                .store
                .get::<InviteRecord>(BUCKET_INVITES, &inv.invite_id)
                .await?
                .and_then(|r| r.value.consumed_by);
            let used = match used {
                Some(m) => Some(m),
                None => match self.cluster.invite_revoke(&inv.invite_id).await {
                    Ok(_) => None,
                    // Used between the read and the revoke.
                    Err(e) if e.code == ErrorCode::Refused => self
                        .store
                        .get::<InviteRecord>(BUCKET_INVITES, &inv.invite_id)
                        .await?
                        .and_then(|r| r.value.consumed_by),
                    Err(e) if e.code == ErrorCode::NotFound => None,
                    Err(e) => return Err(e),
                },
            };
            match used {
                Some(machine) => {
                    if let Err(e) = self.remember_ssh_target(&machine, name).await {
                        tracing::warn!("recording the SSH target of {machine}: {}", e.message);
                    }
                    results.push(result(name, &machine, true, None, "joined".into()));
                }
                None => results.push(result(
                    name,
                    "-",
                    false,
                    Some("provision"),
                    "did not join; its invite is revoked (run `ployzctl machine add` again for it)"
                        .into(),
                )),
            }
        }
        Ok(results)
    }

    async fn remember_ssh_target(&self, id: &str, target: &str) -> Result<(), ApiError> {
        self.store
            .update_machine_record(id, |m| {
                m.ssh_target = Some(target.to_string());
                true
            })
            .await
            .map(|_| ())
    }

    pub(crate) async fn machine_update(
        &self,
        version: Option<String>,
        wanted: Vec<String>,
        release_url: Option<String>,
        identity: Option<String>,
        sink: &ProgressSink,
    ) -> Result<TargetsReport, ApiError> {
        let location = ReleaseLocation::from_flag_or_env(release_url.as_deref())
            .map_err(|e| invalid(e.to_string()))?;
        let machines = if wanted.is_empty() {
            self.store.machines().await?
        } else {
            let mut v = Vec::new();
            for w in &wanted {
                v.push(self.store.resolve_machine(w).await?);
            }
            v
        };
        let ids: Vec<String> = machines.iter().map(|m| m.value.id.clone()).collect();
        let op = self
            .ops
            .begin(
                OpKind::MachineUpdate,
                &ids.join(","),
                OpDetail {
                    machines: ids,
                    version: version.clone(),
                    ..OpDetail::default()
                },
            )
            .await?;
        let results = self
            .update_each(
                &op,
                machines,
                &version,
                &location,
                identity.as_deref(),
                sink,
            )
            .await;
        let (state, message, code) = outcome(&results, "updated");
        op.finish(state, message, code).await;
        Ok(TargetsReport { results })
    }

    /// The machines of `machine update`, one after the other.
    async fn update_each(
        &self,
        op: &OpHandle,
        machines: Vec<Versioned<MachineRecord>>,
        version: &Option<String>,
        location: &ReleaseLocation,
        identity: Option<&str>,
        sink: &ProgressSink,
    ) -> Vec<TargetResult> {
        let mut results = Vec::new();
        let total = machines.len();
        for (n, m) in machines.into_iter().enumerate() {
            let id = m.value.id.clone();
            if let Err(e) = op
                .step(
                    &format!("update {id}"),
                    format!("machine {}/{total}", n + 1),
                )
                .await
            {
                results.push(result("-", &id, false, Some("operation"), e.message));
                continue;
            }
            let Some(target) = m.value.ssh_target.clone() else {
                results.push(result(
                    "-",
                    &id,
                    false,
                    Some("target"),
                    format!("machine {id} was not provisioned over SSH, so there is no way in to update it; update its binary on the machine and restart ployzd"),
                ));
                continue;
            };
            let parsed = match target.parse::<SshTarget>() {
                Ok(t) => t,
                Err(e) => {
                    results.push(result(&target, &id, false, Some("target"), e.to_string()));
                    continue;
                }
            };
            let mut opts = UpdateOptions::new(parsed, self.ssh_options(identity), location.clone());
            if let Some(v) = version {
                opts.version = v.clone();
            }
            opts.uploads = Some(upload_progress(sink, &target));
            let progress = {
                let sink = sink.clone();
                let target = target.clone();
                move |step: ployz_provision::provision::Step| {
                    note(&sink, &target, step.as_str(), "")
                }
            };
            match update_machine(&opts, progress).await {
                Ok(u) => results.push(result(
                    &target,
                    &id,
                    true,
                    None,
                    format!(
                        "updated {} -> {} (release {})",
                        u.old_version, u.new_version, u.release
                    ),
                )),
                Err(e) => results.push(result(
                    &target,
                    &id,
                    false,
                    Some(e.step().as_str()),
                    e.to_string(),
                )),
            }
        }
        results
    }

    /// Leader: end the `machine update` of an owner that stopped running
    /// it. Nothing can resume an SSH session, so it reports the version
    /// each machine runs now (from its record, which ployzd rewrites when
    /// it starts).
    pub(crate) async fn take_over_update(
        &self,
        op: Versioned<OperationRecord>,
    ) -> Result<(), ApiError> {
        self.ops
            .end_stale(op, |op| async move {
                let results = self.update_outcome(&op).await?;
                Ok(outcome(&results, "updated"))
            })
            .await
    }

    /// The version each machine of a stopped `machine update` runs now.
    async fn update_outcome(
        &self,
        op: &Versioned<OperationRecord>,
    ) -> Result<Vec<TargetResult>, ApiError> {
        let mut results = Vec::new();
        for id in &op.value.detail.machines {
            let rec = self.store.get::<MachineRecord>(BUCKET_MACHINES, id).await?;
            results.push(match (rec, &op.value.detail.version) {
                (None, _) => result(
                    "-",
                    id,
                    false,
                    Some("record"),
                    "no longer in the network".into(),
                ),
                (Some(r), Some(want)) if r.value.version == *want => {
                    result("-", id, true, None, format!("runs {want}"))
                }
                (Some(r), _) => result(
                    "-",
                    id,
                    false,
                    Some("update"),
                    format!(
                        "runs {}; run `ployzctl machine update {id}` again",
                        r.value.version
                    ),
                ),
            });
        }
        Ok(results)
    }
}

/// Every target parsed before any work starts: one bad target (empty, a
/// port out of range) is the caller's mistake, not a failed provisioning.
fn parse_targets(targets: &[String]) -> Result<Vec<(String, SshTarget)>, ApiError> {
    if targets.is_empty() {
        return Err(invalid("name at least one target (`user@host`)"));
    }
    let mut out = Vec::new();
    let mut bad = Vec::new();
    for t in targets {
        match t.parse::<SshTarget>() {
            Ok(parsed) => out.push((t.clone(), parsed)),
            Err(e) => bad.push(e.to_string()),
        }
    }
    if !bad.is_empty() {
        return Err(invalid(bad.join("; "))
            .with_hint("nothing was provisioned: fix the target and run the command again"));
    }
    Ok(out)
}

/// Byte progress of a target's binary uploads for `sink`: the first and
/// last count of each file, and at most ten a second in between.
fn upload_progress(sink: &ProgressSink, target: &str) -> UploadProgress {
    let sink = sink.clone();
    let target = target.to_string();
    let last = std::sync::Mutex::new(None::<std::time::Instant>);
    UploadProgress::new(move |file, done, total| {
        let now = std::time::Instant::now();
        let mut last = last.lock().unwrap_or_else(|e| e.into_inner());
        let due = done == 0
            || done == total
            || last.is_none_or(|t| now - t >= std::time::Duration::from_millis(100));
        if due {
            *last = Some(now);
            note_bytes(&sink, &target, "upload", file, done, Some(total));
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_targets_are_refused_before_any_work() {
        let t = |a: &[&str]| parse_targets(&a.iter().map(|s| s.to_string()).collect::<Vec<_>>());
        let ok = t(&["root@10.0.0.1", "admin@h:2222"]).unwrap();
        assert_eq!(ok[1].1.port, 2222);
        for bad in [&[][..], &[""], &["root@host:99999"], &["root@h", "@h"]] {
            let e = t(bad).unwrap_err();
            assert_eq!(e.code, ErrorCode::InvalidArgument, "{bad:?}");
            assert_eq!(e.code.exit_code(), 6);
        }
        let e = t(&["root@host:99999"]).unwrap_err();
        assert!(
            e.message.contains("root@host:99999") && e.message.contains("port"),
            "{}",
            e.message
        );
    }
}
