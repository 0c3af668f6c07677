//! `service migrate`: pause the instance on its source, copy its volumes,
//! place it on the target and drop the source placement only once the
//! target runs it; any earlier failure withdraws the target and resumes
//! the source.

use super::*;

impl Workloads {
    pub(crate) async fn service_migrate(
        &self,
        name: &str,
        to: &str,
        from: Option<&str>,
        sink: &ProgressSink,
    ) -> Result<ServiceView, ApiError> {
        validate_service_name(name)?;
        self.store.require_network().await?;
        let progress = |step: &str, msg: String| note(sink, name, step, msg);
        let target = self.store.resolve_machine(to).await?.value;
        if target.lifecycle != Lifecycle::Active {
            return Err(refused(format!(
                "machine {} is {}, and only active machines take new placements",
                target.id, target.lifecycle
            ))
            .with_hint(format!(
                "activate it with `ployzctl machine activate {}` or pick another --to",
                target.id
            )));
        }
        let source_id = match from {
            Some(f) => Some(self.store.resolve_machine(f).await?.value.id),
            None => None,
        };
        let svc = self.service_record(name).await?;
        let src = pick_source(name, &svc.value.placements, source_id.as_deref())?;
        if src.machine == target.id {
            return Err(invalid(format!(
                "service `{name}` already runs on machine {}: pick another --to",
                target.id
            )));
        }
        if svc.value.placements.iter().any(|p| p.machine == target.id)
            && svc.value.volumes.is_empty()
        {
            // Harmless without volumes, but worth saying.
            progress(
                "note",
                format!("machine {} already runs another instance", target.id),
            );
        }
        let op = self
            .ops
            .begin(
                OpKind::Migrate,
                name,
                OpDetail {
                    source: Some(src.clone()),
                    target: Some(target.id.clone()),
                    ..OpDetail::default()
                },
            )
            .await?;
        let outcome = self
            .migrate_steps(&op, &svc.value, &src, &target.id, &progress, sink)
            .await;
        match outcome {
            Ok(view) => {
                op.finish(OpState::Succeeded, format!("moved to {}", target.id), 0)
                    .await;
                Ok(view)
            }
            Err((step, e)) => {
                progress("rollback", format!("{step} failed: {}", e.message));
                let undo = self.undo_migration(name, &src, &target.id, &op).await;
                let (state, resumed) = match &undo {
                    Ok(_) => (
                        OpState::RolledBack,
                        format!("; the original keeps running on {}", src.machine),
                    ),
                    Err(u) => (
                        OpState::Failed,
                        format!(
                            "; restoring the original also failed ({}); the storage leader rolls it back (`ployzctl op wait {}`)",
                            u.message,
                            op.id()
                        ),
                    ),
                };
                let message = format!(
                    "migrating `{name}` failed at {step}: {}{resumed}",
                    e.message
                );
                op.finish(state, message.clone(), e.code.exit_code()).await;
                Err(ApiError::new(e.code, message)
                    .with_hint(e.hint.unwrap_or_else(|| "fix the cause and retry".into())))
            }
        }
    }

    /// Asks `target` to pull a volume (`pull`), and while it does, reports
    /// the bytes it received so far to `sink` (twice a second).
    async fn pull_reporting(
        &self,
        target: &str,
        pull: &PeerRequest,
        service: &str,
        volume: &str,
        sink: &ProgressSink,
    ) -> Result<PeerResponse, String> {
        let call = self
            .control
            .call_machine(target, pull, Duration::from_secs(600));
        tokio::pin!(call);
        let mut tick = tokio::time::interval(Duration::from_millis(500));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let ask = PeerRequest::VolumePullProgress {
            name: volume.to_string(),
        };
        let message = format!("volume {volume}");
        loop {
            tokio::select! {
                r = &mut call => return r,
                _ = tick.tick() => {
                    // An older ployzd on the target does not know the
                    // question: then there is just no byte count.
                    let asked = self.control.call_machine(target, &ask, Duration::from_secs(2));
                    tokio::select! {
                        r = &mut call => return r,
                        a = asked => {
                            if let Ok(PeerResponse::VolumePullProgress { bytes: Some(b) }) = a {
                                note_bytes(sink, service, "copy", &message, b, None);
                            }
                        }
                    }
                }
            }
        }
    }

    /// Undo a migration that did not finish: withdraw the target placement
    /// it added and resume the source, retrying while the store is
    /// unavailable (a new leader is being elected) for as long as `op`'s
    /// lease holds. `Ok(false)`: nothing to undo (the switch happened).
    pub(super) async fn undo_migration(
        &self,
        name: &str,
        src: &Placement,
        target: &str,
        op: &OpHandle,
    ) -> Result<bool, ApiError> {
        let target_slot = op.detail().await.target_slot;
        loop {
            match self
                .rollback_placements(name, src, target, target_slot)
                .await
            {
                Ok(undone) => return Ok(undone),
                Err(e) if e.code == ErrorCode::Unavailable && op.check_lease().is_ok() => {
                    tracing::debug!(service = %name, "rolling back the migration: {}", e.message);
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// One attempt: if the source placement is still there, drop the
    /// target's (`target_slot`) and unpause the source. Whether it was.
    async fn rollback_placements(
        &self,
        name: &str,
        src: &Placement,
        target: &str,
        target_slot: Option<u32>,
    ) -> Result<bool, ApiError> {
        let mut undone = false;
        self.write_service(name, |cur, _, _| {
            let Some(cur) = cur else { return Ok(None) };
            let mut next = cur.clone();
            undone = next
                .placements
                .iter()
                .any(|p| p.machine == src.machine && p.slot == src.slot);
            if undone {
                next.placements
                    .retain(|p| !(p.machine == target && Some(p.slot) == target_slot));
                for p in &mut next.placements {
                    if p.machine == src.machine && p.slot == src.slot {
                        p.paused = false;
                    }
                }
            }
            Ok(Some(next))
        })
        .await?;
        Ok(undone)
    }

    /// Leader: finish a migration whose owner stopped running it: roll it
    /// back unless the switch to the target already happened.
    pub(crate) async fn take_over_migrate(
        &self,
        op: Versioned<OperationRecord>,
    ) -> Result<(), ApiError> {
        let (Some(src), Some(target)) = (
            op.value.detail.source.clone(),
            op.value.detail.target.clone(),
        ) else {
            self.ops
                .take_over(&op, OpState::Failed, "malformed operation record".into(), 1)
                .await?;
            return Ok(());
        };
        let owner = op.value.owner.clone();
        let Some(op) = self.ops.claim(&op).await? else {
            return Ok(());
        };
        let name = op.value.subject.clone();
        let undone = self
            .rollback_placements(&name, &src, &target, op.value.detail.target_slot)
            .await?;
        let (state, message, code) = if undone {
            (
                OpState::RolledBack,
                format!(
                    "rolled back by the storage leader after its owner {owner} stopped; the original runs on {}",
                    src.machine
                ),
                ErrorCode::Unavailable.exit_code(),
            )
        } else {
            (
                OpState::Succeeded,
                format!("the instance had moved to {target} when its owner {owner} stopped"),
                0,
            )
        };
        self.ops.take_over(&op, state, message, code).await?;
        Ok(())
    }

    /// The steps of a migration, each recorded in `op`; errors name the
    /// step: pause the source, copy the volumes, start on the target, and
    /// only then drop the source.
    async fn migrate_steps(
        &self,
        op: &OpHandle,
        svc: &ServiceRecord,
        src: &Placement,
        target: &str,
        progress: &(impl Fn(&str, String) + Sync),
        sink: &ProgressSink,
    ) -> Result<ServiceView, (&'static str, ApiError)> {
        let name = svc.name.as_str();
        // 1. Pause the source so the volume copy is consistent.
        progress(
            "stop",
            format!("stopping slot {} on {}", src.slot, src.machine),
        );
        op.step(
            "stop",
            format!("stopping slot {} on {}", src.slot, src.machine),
        )
        .await
        .map_err(|e| ("stop", e))?;
        self.set_paused(name, src, true)
            .await
            .map_err(|e| ("stop", e))?;
        let src_key = InstanceRecord::key(name, &src.machine, src.slot);
        let stopped = self
            .wait_instance(&src_key, Duration::from_secs(60), |i| {
                i.state != InstanceState::Running && i.state != InstanceState::Pending
            })
            .await
            .map_err(|e| ("stop", e))?;
        if !stopped {
            return Err((
                "stop",
                ApiError::new(
                    ErrorCode::Unavailable,
                    format!(
                        "machine {} did not stop service `{name}` within 60 s",
                        src.machine
                    ),
                )
                .with_hint("check the machine with `ployzctl machine ls` and retry"),
            ));
        }
        // 2. Copy the volumes.
        op.step(
            "copy",
            format!("{} volume(s) to {target}", svc.volumes.len()),
        )
        .await
        .map_err(|e| ("copy", e))?;
        for v in &svc.volumes {
            progress(
                "copy",
                format!("volume {} from {} to {target}", v.name, src.machine),
            );
            let pull = PeerRequest::PullVolume {
                name: v.name.clone(),
                from: src.machine.clone(),
            };
            let resp = self
                .pull_reporting(target, &pull, name, &v.name, sink)
                .await
                .map_err(|e| ("copy", ApiError::new(ErrorCode::Unavailable, e)))?;
            match resp {
                PeerResponse::VolumePulled { bytes, sha256 } => progress(
                    "copy",
                    format!("volume {}: {bytes} bytes, {sha256} verified", v.name),
                ),
                PeerResponse::Error(e) => return Err(("copy", e)),
                other => {
                    return Err((
                        "copy",
                        internal(format!("machine {target} answered {other:?}")),
                    ))
                }
            }
        }
        // 3. Place it on the target and wait for it to run.
        progress("start", format!("starting on {target}"));
        op.step("start", format!("starting on {target}"))
            .await
            .map_err(|e| ("start", e))?;
        // The slot is recorded before it is placed, so whoever rolls this
        // back knows which placement to withdraw.
        let slot = self
            .service_record(name)
            .await
            .map_err(|e| ("start", e))?
            .value
            .placements
            .iter()
            .map(|p| p.slot + 1)
            .max()
            .unwrap_or(0);
        op.set_target_slot(slot).await.map_err(|e| ("start", e))?;
        let placed = self
            .write_service(name, |cur, _, _| {
                let Some(cur) = cur else {
                    return Err(ApiError::new(
                        ErrorCode::NotFound,
                        format!("service `{name}` was removed during the migration"),
                    ));
                };
                if cur.placements.iter().any(|p| p.slot == slot) {
                    return Err(refused(format!(
                        "service `{name}` changed during the migration (slot {slot} was taken)"
                    ))
                    .with_hint("retry the migration"));
                }
                let mut next = cur.clone();
                next.placements.push(Placement {
                    machine: target.to_string(),
                    slot,
                    paused: false,
                    generation: None,
                });
                next.updated_at_ms = now_ms();
                Ok(Some(next))
            })
            .await
            .map_err(|e| ("start", e))?
            .expect("kept");
        let new = placed.placements.last().expect("just pushed").clone();
        let key = InstanceRecord::key(name, &new.machine, new.slot);
        let gen = placed.generation;
        let mut last = None;
        let running = self
            .wait_instance(&key, Duration::from_secs(120), |i| {
                last = Some(i.clone());
                i.generation == gen
                    && matches!(i.state, InstanceState::Running | InstanceState::Failed)
            })
            .await
            .map_err(|e| ("start", e))?;
        match last {
            Some(i) if running && i.state == InstanceState::Running => progress(
                "start",
                format!(
                    "running on {target} at {}",
                    i.overlay_ip.as_deref().unwrap_or("-")
                ),
            ),
            Some(i) if running => {
                return Err((
                    "start",
                    ApiError::new(
                        ErrorCode::Unavailable,
                        format!(
                            "the instance on {target} failed: {}",
                            i.error.as_deref().unwrap_or("no reason given")
                        ),
                    ),
                ))
            }
            _ => {
                return Err((
                    "start",
                    ApiError::new(
                        ErrorCode::Unavailable,
                        format!(
                            "machine {target} did not report the instance running within 120 s"
                        ),
                    ),
                ))
            }
        }
        // 4. Only now drop the source.
        op.step(
            "switch",
            format!("removing slot {} from {}", src.slot, src.machine),
        )
        .await
        .map_err(|e| ("cleanup", e))?;
        progress(
            "cleanup",
            format!("removing slot {} from {}", src.slot, src.machine),
        );
        let done = self
            .write_service(name, |cur, _, _| {
                let Some(cur) = cur else { return Ok(None) };
                let mut next = cur.clone();
                next.placements
                    .retain(|p| !(p.machine == src.machine && p.slot == src.slot));
                next.updated_at_ms = now_ms();
                Ok(Some(next))
            })
            .await
            .map_err(|e| ("cleanup", e))?;
        let src_key = InstanceRecord::key(name, &src.machine, src.slot);
        let gone = self
            .wait_absent(&src_key, Duration::from_secs(30))
            .await
            .unwrap_or(false);
        if !gone {
            progress(
                "cleanup",
                format!("{} has not confirmed removing the old instance yet; it will when it next reconciles", src.machine),
            );
        }
        for v in &svc.volumes {
            match self
                .control
                .call_machine(
                    &src.machine,
                    &PeerRequest::DropVolume {
                        name: v.name.clone(),
                    },
                    Duration::from_secs(30),
                )
                .await
            {
                Ok(PeerResponse::VolumeDropped { dropped: true }) => progress(
                    "cleanup",
                    format!("volume {} removed from {}", v.name, src.machine),
                ),
                Ok(_) => progress(
                    "cleanup",
                    format!(
                        "volume {} kept on {} (still in use there)",
                        v.name, src.machine
                    ),
                ),
                Err(e) => progress(
                    "cleanup",
                    format!("volume {} left on {}: {e}", v.name, src.machine),
                ),
            }
        }
        let instances = self.instances().await.map_err(|e| ("cleanup", e))?;
        Ok(Self::view_of(
            done.as_ref().unwrap_or(&placed),
            &instances,
            &HashSet::new(),
        ))
    }

    pub(super) async fn set_paused(
        &self,
        name: &str,
        at: &Placement,
        paused: bool,
    ) -> Result<(), ApiError> {
        self.write_service(name, |cur, _, _| {
            let Some(cur) = cur else {
                return Err(no_such_service(name));
            };
            let mut next = cur.clone();
            for p in &mut next.placements {
                if p.machine == at.machine && p.slot == at.slot {
                    p.paused = paused;
                }
            }
            Ok(Some(next))
        })
        .await
        .map(|_| ())
    }

    /// Poll one instance record until `done` holds; false at the deadline.
    pub(super) async fn wait_instance(
        &self,
        key: &str,
        wait: Duration,
        mut done: impl FnMut(&InstanceRecord) -> bool,
    ) -> Result<bool, ApiError> {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            if let Some(i) = self
                .store
                .get::<InstanceRecord>(BUCKET_INSTANCES, key)
                .await?
            {
                if done(&i.value) {
                    return Ok(true);
                }
            }
            if tokio::time::Instant::now() >= deadline {
                return Ok(false);
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    pub(super) async fn wait_absent(&self, key: &str, wait: Duration) -> Result<bool, ApiError> {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            if self
                .store
                .get::<InstanceRecord>(BUCKET_INSTANCES, key)
                .await?
                .is_none()
            {
                return Ok(true);
            }
            if tokio::time::Instant::now() >= deadline {
                return Ok(false);
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }
}

/// The instance `service migrate` moves: the one on `from`, or the only one.
/// None there is "not found" (exit 4), several without `--from` is a
/// question the caller must answer.
fn pick_source(
    name: &str,
    placements: &[Placement],
    from: Option<&str>,
) -> Result<Placement, ApiError> {
    let candidates: Vec<&Placement> = placements
        .iter()
        .filter(|p| from.is_none_or(|s| p.machine == s))
        .collect();
    match candidates.as_slice() {
        [] => Err(ApiError::new(
            ErrorCode::NotFound,
            match from {
                Some(s) => format!("service `{name}` has no instance on machine {s}"),
                None => format!("service `{name}` has no instances to migrate"),
            },
        )
        .with_hint("`ployzctl service ls` shows where it runs")),
        [one] => Ok((*one).clone()),
        many => Err(invalid(format!(
            "service `{name}` runs on several machines ({}): say which instance moves with --from <machine>",
            many.iter()
                .map(|p| p.machine.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::workloads::spec::tests::placement as at;

    #[test]
    fn the_source_is_the_named_machine_or_the_only_instance() {
        let two = [at("aaa", 0), at("bbb", 1)];
        assert_eq!(pick_source("web", &two, Some("bbb")).unwrap().slot, 1);
        assert_eq!(pick_source("web", &two[..1], None).unwrap().slot, 0);
        let e = pick_source("web", &two, Some("ccc")).unwrap_err();
        assert_eq!(e.code, ErrorCode::NotFound, "{}", e.message);
        assert_eq!(e.code.exit_code(), 4);
        assert!(
            e.message.contains("no instance on machine ccc"),
            "{}",
            e.message
        );
        let e = pick_source("web", &[], None).unwrap_err();
        assert_eq!(e.code, ErrorCode::NotFound, "{}", e.message);
        let e = pick_source("web", &two, None).unwrap_err();
        assert_eq!(e.code, ErrorCode::InvalidArgument, "{}", e.message);
    }
}
