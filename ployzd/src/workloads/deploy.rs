//! `deploy`: check the spec, import the image, place the replicas and
//! write the service record (compare-and-set), then roll the instances
//! one at a time and wait for the machines to report them.

use super::*;
use ployz_runtime::image::ImageError;
use ployz_runtime::registry::ImageRef;

/// How much of a failed instance's error the deploy's operation record keeps.
const OP_MESSAGE_ERROR_CHARS: usize = 300;

/// What a deploy request says, checked.
struct Checked {
    env: Vec<(String, String)>,
    volumes: Vec<VolumeSpec>,
    memory_limit: Option<u64>,
    health: Option<HealthCheck>,
    ports: Vec<PublishedPort>,
}

impl Workloads {
    pub(crate) async fn service_deploy(
        &self,
        req: DeployRequest,
        sink: &ProgressSink,
    ) -> Result<ServiceView, ApiError> {
        validate_service_name(&req.name)?;
        if let Some(p) = &req.project {
            crate::errors::validate_label("project name", p, MAX_SERVICE_NAME)?;
        }
        if req.replicas > MAX_REPLICAS {
            return Err(invalid(format!(
                "--replicas {} is too many: use 0 to {MAX_REPLICAS}",
                req.replicas
            )));
        }
        let env = parse_env(&req.env)?;
        let health = health::parse_health(&req)?;
        let volumes = parse_volumes(&req.volumes)?;
        let memory_limit = req.memory.as_deref().map(parse_memory).transpose()?;
        if let Some(shares) = req.cpu_shares {
            if !(2..=262_144).contains(&shares) {
                return Err(invalid(format!(
                    "--cpu-shares {shares} is out of range: use 2 to 262144 (1024 is the default weight)"
                )));
            }
        }
        if req.image.trim().is_empty() {
            return Err(invalid(
                "--image is empty: give an image archive (`docker save` tarball or OCI layout) or a name",
            ));
        }
        self.store.require_network().await?;
        let ports = ployz_api::ports::parse_publishes(&req.publish).map_err(invalid)?;
        self.check_ports(&req.name, &ports, sink).await?;
        if let Some(user) = &req.nats_user {
            self.control.require_user(user).await?;
        }
        let op = self
            .ops
            .begin(OpKind::Deploy, &req.name, OpDetail::default())
            .await?;
        let name = req.name.clone();
        match self
            .deploy_steps(
                &op,
                req,
                Checked {
                    env,
                    volumes,
                    memory_limit,
                    health,
                    ports,
                },
                sink,
            )
            .await
        {
            Ok(view) => {
                let down = view.not_ready().len();
                if down == 0 {
                    let what = if view.health_check.is_some() {
                        "every instance runs and is healthy"
                    } else {
                        "every instance runs"
                    };
                    op.finish(OpState::Succeeded, what, 0).await;
                } else {
                    let why = view
                        .not_ready()
                        .first()
                        .map(|i| {
                            // One line, short: the output is in the answer.
                            let error = i.error.as_deref().map(|e| {
                                let flat = e.split_whitespace().collect::<Vec<_>>().join(" ");
                                match flat.char_indices().nth(OP_MESSAGE_ERROR_CHARS) {
                                    Some((cut, _)) => format!("{}…", &flat[..cut]),
                                    None => flat,
                                }
                            });
                            let what = if i.state == InstanceState::Running {
                                i.health.to_string()
                            } else {
                                i.state.to_string()
                            };
                            format!(
                                " (slot {} on {} is {what}{})",
                                i.slot,
                                i.machine,
                                error.map(|e| format!(": {e}")).unwrap_or_default()
                            )
                        })
                        .unwrap_or_default();
                    let not = if view.health_check.is_some() {
                        "not running and healthy"
                    } else {
                        "not running"
                    };
                    op.finish(
                        OpState::Failed,
                        format!("{down} instance(s) of {name} {not}{why}"),
                        9,
                    )
                    .await;
                }
                Ok(view)
            }
            Err((changed, e)) => {
                op.end_with(changed, &e).await;
                Err(e)
            }
        }
    }

    /// The steps of a deploy, each recorded in `op`. An error says whether
    /// the service record was written.
    async fn deploy_steps(
        &self,
        op: &OpHandle,
        req: DeployRequest,
        checked: Checked,
        sink: &ProgressSink,
    ) -> Result<ServiceView, (bool, ApiError)> {
        let Checked {
            env,
            volumes,
            memory_limit,
            health,
            ports,
        } = checked;
        let unchanged = |e: ApiError| (false, e);
        let changed = |e: ApiError| (true, e);
        let progress = |step: &str, msg: String| note(sink, &req.name, step, msg);
        op.step("image", req.image.clone())
            .await
            .map_err(unchanged)?;
        let image = match image_source(&req.image) {
            ImageSource::Path => {
                let path = PathBuf::from(&req.image);
                progress("image", format!("importing {}", path.display()));
                let store = self.image_store().map_err(unchanged)?;
                let info = tokio::task::spawn_blocking(move || store.import_path(&path))
                    .await
                    .map_err(blocking_err)
                    .map_err(unchanged)?
                    .map_err(|e| invalid(e.to_string()))
                    .map_err(unchanged)?;
                progress(
                    "image",
                    format!("stored {} ({} bytes)", info.digest, info.size),
                );
                shipped_image(&req.image, &info, self.machine_id())
            }
            ImageSource::Registry => self
                .pull_image(&req.image, &req.name, sink, Some((op.id(), req.replicas)))
                .await
                .map_err(unchanged)?,
            source @ (ImageSource::NameOrRegistry | ImageSource::Digest) => {
                let store = self.image_store().map_err(unchanged)?;
                let name = req.image.clone();
                let stored = tokio::task::spawn_blocking(move || store.resolve(&name))
                    .await
                    .map_err(blocking_err)
                    .map_err(unchanged)?
                    .map_err(|e| match e {
                        ImageError::InvalidReference { .. } => invalid(e.to_string()),
                        e => internal(e.to_string()),
                    })
                    .map_err(unchanged)?;
                match (stored, source) {
                    (Some(info), _) => shipped_image(&req.image, &info, self.machine_id()),
                    // Not stored here: a name is a Docker Hub reference.
                    (None, ImageSource::NameOrRegistry) => self
                        .pull_image(&req.image, &req.name, sink, Some((op.id(), req.replicas)))
                        .await
                        .map_err(unchanged)?,
                    // A digest is looked up by each machine in its store.
                    (None, _) => ServiceImage {
                        reference: req.image.clone(),
                        digest: None,
                        image_id: None,
                        size: 0,
                        sources: Vec::new(),
                        manifest_digest: None,
                    },
                }
            }
        };
        // A redeploy rolls: instances running now are pinned to what they
        // run and replaced one at a time below, so the service keeps serving.
        let running: HashMap<String, u64> = self
            .instances()
            .await
            .map_err(unchanged)?
            .into_iter()
            .filter(|(_, i)| i.service == req.name && i.state == InstanceState::Running)
            .map(|(key, i)| (key, i.generation))
            .collect();
        op.step("record", "writing the service record")
            .await
            .map_err(unchanged)?;
        let record = self
            .write_service(&req.name, |cur, machines, load| {
                let mut placements = placement::place(
                    &req.name,
                    req.replicas,
                    cur.map(|c| c.placements.as_slice()).unwrap_or(&[]),
                    &candidates(machines, load),
                )
                .map_err(|e| refused(e.to_string()).with_hint(e.hint()))?;
                for p in &mut placements {
                    let key = InstanceRecord::key(&req.name, &p.machine, p.slot);
                    p.generation = match running.get(&key) {
                        Some(&g) if cur.is_some() && !p.paused => Some(g),
                        _ => None,
                    };
                }
                let now = now_ms();
                Ok(Some(ServiceRecord {
                    name: req.name.clone(),
                    image: image.clone(),
                    replicas: req.replicas,
                    command: req.command.clone(),
                    env: env.clone(),
                    volumes: volumes.clone(),
                    memory_limit,
                    cpu_shares: req.cpu_shares,
                    placements,
                    generation: cur.map_or(1, |c| c.generation + 1),
                    created_at_ms: cur.map_or(now, |c| c.created_at_ms),
                    updated_at_ms: now,
                    deployed_by: Some(op.id().to_string()),
                    project: req
                        .project
                        .clone()
                        .or_else(|| cur.and_then(|c| c.project.clone())),
                    health: health.clone(),
                    ports: ports.clone(),
                    nats_user: req.nats_user.clone(),
                }))
            })
            .await
            .map_err(unchanged)?
            .expect("deploy always writes");
        for p in &record.placements {
            progress(
                "placed",
                format!("slot {} on machine {}", p.slot, p.machine),
            );
        }
        let wait = req
            .wait_secs
            .map(Duration::from_secs)
            .unwrap_or(DEFAULT_DEPLOY_WAIT);
        let deadline = tokio::time::Instant::now() + wait;
        let _ = op.step("instances", "waiting for the instances").await;
        let view = self
            .wait_for_instances(&record, wait, |i| {
                progress(
                    "instance",
                    format!(
                        "slot {} on {}: {}{}",
                        i.slot,
                        i.machine,
                        i.state,
                        i.error
                            .as_ref()
                            .map(|e| format!(" ({e})"))
                            .unwrap_or_default()
                    ),
                )
            })
            .await
            .map_err(changed)?;
        let view = if wait.is_zero() {
            view
        } else {
            let view = self
                .wait_staying_up(&record, view, deadline, &progress)
                .await
                .map_err(changed)?;
            if record.health.is_some() && view.not_running().is_empty() {
                let _ = op
                    .step("health", "waiting for the instances to be healthy")
                    .await;
                self.wait_healthy(&record, deadline, wait, &progress)
                    .await
                    .map_err(changed)?
            } else {
                view
            }
        };
        let not_running: HashSet<(&str, u32)> = view
            .not_ready()
            .iter()
            .map(|i| (i.machine.as_str(), i.slot))
            .collect();
        let down = |p: &Placement| not_running.contains(&(p.machine.as_str(), p.slot));
        let mut pinned: Vec<Placement> = record
            .placements
            .iter()
            .filter(|p| p.generation.is_some())
            .cloned()
            .collect();
        if pinned.is_empty() {
            return Ok(view);
        }
        if record
            .placements
            .iter()
            .any(|p| p.generation.is_none() && down(p))
        {
            progress(
                "rollout",
                format!(
                    "not started: new instances are not all running; {} instance(s) keep their generation",
                    pinned.len()
                ),
            );
            return Ok(view);
        }
        // Pinned instances that stopped running since (a crash loop) go
        // first: replacing them costs no availability.
        pinned.sort_by_key(|p| (!down(p), p.slot));
        let _ = op
            .step(
                "rollout",
                format!("{} instance(s) to replace", pinned.len()),
            )
            .await;
        self.roll(&record, pinned, deadline, &progress)
            .await
            .map_err(changed)
    }

    /// Leader: end a deploy whose owner stopped running it. The service
    /// record, once written, stands: instances are started by their
    /// machines; a rollout that was under way stops where it was (the
    /// instances still pinned keep their older generation).
    pub(crate) async fn take_over_deploy(
        &self,
        op: Versioned<OperationRecord>,
    ) -> Result<(), ApiError> {
        let name = op.value.subject.clone();
        let service = self
            .store
            .get::<ServiceRecord>(BUCKET_SERVICES, &name)
            .await?;
        let ours = service
            .as_ref()
            .is_some_and(|s| s.value.deployed_by.as_deref() == Some(op.value.id.as_str()));
        let written = ours || !matches!(op.value.step.as_str(), "start" | "image" | "record");
        let pinned = match &service {
            Some(s) => s
                .value
                .placements
                .iter()
                .filter(|p| p.generation.is_some())
                .count(),
            None => 0,
        };
        let (state, message) = if !written {
            (
                OpState::RolledBack,
                format!(
                    "its owner {} stopped at step {} before the service record was written: nothing changed; deploy again",
                    op.value.owner, op.value.step
                ),
            )
        } else if !ours {
            (
                OpState::Failed,
                format!(
                    "its owner {} stopped at step {}; a later deploy has replaced what it wrote: `ployzctl service ls` shows what runs",
                    op.value.owner, op.value.step
                ),
            )
        } else if pinned > 0 {
            (
                OpState::Failed,
                format!(
                    "its owner {} stopped during the rollout; {pinned} instance(s) still run an older generation: deploy again to finish",
                    op.value.owner
                ),
            )
        } else {
            (
                OpState::Succeeded,
                format!(
                    "its owner {} stopped after writing the service; the machines run it",
                    op.value.owner
                ),
            )
        };
        let code = match state {
            OpState::Succeeded => 0,
            OpState::RolledBack => ErrorCode::Unavailable.exit_code(),
            _ => 9,
        };
        self.ops.take_over(&op, state, message, code).await?;
        Ok(())
    }

    /// The stored record of service `name`, or "no such service".
    pub(super) async fn service_record(
        &self,
        name: &str,
    ) -> Result<crate::store::Versioned<ServiceRecord>, ApiError> {
        self.store
            .get::<ServiceRecord>(BUCKET_SERVICES, name)
            .await?
            .ok_or_else(|| no_such_service(name))
    }

    /// Read-modify-write of a service record with compare-and-set. `change`
    /// gets the current record, the machines and their live-instance counts;
    /// it returns the new record, or `None` to delete it.
    /// The machines, and how many live instances each runs (placement's input).
    pub(super) async fn machines_and_load(
        &self,
    ) -> Result<(Vec<MachineRecord>, HashMap<String, usize>), ApiError> {
        let machines: Vec<MachineRecord> =
            self.store.values::<MachineRecord>(BUCKET_MACHINES).await?;
        let mut load: HashMap<String, usize> = HashMap::new();
        for i in self.store.list::<InstanceRecord>(BUCKET_INSTANCES).await? {
            if i.value.is_live() {
                *load.entry(i.value.machine).or_default() += 1;
            }
        }
        Ok((machines, load))
    }

    pub(super) async fn write_service(
        &self,
        name: &str,
        mut change: impl FnMut(
            Option<&ServiceRecord>,
            &[MachineRecord],
            &HashMap<String, usize>,
        ) -> Result<Option<ServiceRecord>, ApiError>,
    ) -> Result<Option<ServiceRecord>, ApiError> {
        for _ in 0..CAS_RETRIES {
            let cur = self
                .store
                .get::<ServiceRecord>(BUCKET_SERVICES, name)
                .await?;
            let (machines, load) = self.machines_and_load().await?;
            let next = change(cur.as_ref().map(|c| &c.value), &machines, &load)?;
            let expect = match &cur {
                Some(c) => Expect::Revision(c.revision),
                None => Expect::Absent,
            };
            let mut ops = store::records::ensure_bucket(BUCKET_SERVICES);
            // The host-port claims change in the same transaction, each
            // conditioned on the revision it was decided from.
            ops.extend(
                self.port_claim_ops(
                    name,
                    cur.as_ref().map_or(&[][..], |c| &c.value.ports),
                    next.as_ref().map_or(&[][..], |n| &n.ports),
                )
                .await?,
            );
            match &next {
                Some(rec) => ops.push(put(BUCKET_SERVICES, name, rec, expect)),
                None => ops.push(store::delete(BUCKET_SERVICES, name, expect)),
            }
            match self.store.txn(ops).await? {
                Ok(_) => return Ok(next),
                // Changed (or created, or removed) by someone else since it
                // was read: read again and decide again.
                Err((_, Rejection::WrongLastRevision { .. } | Rejection::KeyExists { .. })) => {
                    tracing::debug!(service = %name, "service changed concurrently; deciding again");
                    continue;
                }
                Err((_, other)) => {
                    return Err(internal(format!(
                        "the store rejected the service update: {other}"
                    )))
                }
            }
        }
        Err(store::unavailable(format!(
            "service {name} kept changing under {CAS_RETRIES} attempts to update it; retry"
        )))
    }

    /// Instances of every service, keyed by store key.
    pub(super) async fn instances(&self) -> Result<HashMap<String, InstanceRecord>, ApiError> {
        Ok(self
            .store
            .list_entries(BUCKET_INSTANCES)
            .await?
            .iter()
            .filter(|e| e.is_live())
            .filter_map(|e| {
                store::decode::<InstanceRecord>(e)
                    .ok()
                    .map(|v| (e.key.clone(), v.value))
            })
            .collect())
    }

    /// What `service ls` shows of `svc`; instances on the `unreachable`
    /// machines are flagged (their state is only the last they reported).
    pub(super) fn view_of(
        svc: &ServiceRecord,
        instances: &HashMap<String, InstanceRecord>,
        unreachable: &HashSet<String>,
    ) -> ServiceView {
        ServiceView {
            name: svc.name.clone(),
            project: svc.project.clone(),
            image: svc.image.reference.clone(),
            digest: svc.image.digest.clone(),
            manifest_digest: svc.image.manifest_digest.clone(),
            replicas: svc.replicas,
            generation: svc.generation,
            volumes: svc
                .volumes
                .iter()
                .map(|v| format!("{}:{}", v.name, v.target))
                .collect(),
            health_check: svc.health.clone(),
            ports: svc.ports.iter().map(|p| p.to_string()).collect(),
            instances: svc
                .placements
                .iter()
                .map(|p| {
                    let key = InstanceRecord::key(&svc.name, &p.machine, p.slot);
                    match instances.get(&key) {
                        Some(i)
                            if i.generation >= p.target_generation(svc.generation) || p.paused =>
                        {
                            InstanceView {
                                machine: p.machine.clone(),
                                slot: p.slot,
                                state: i.state,
                                overlay_ip: i.overlay_ip.clone(),
                                error: i.error.clone(),
                                exit_code: i.exit_code,
                                exited_at: i.exited_at_ms.map(ployz_api::time::rfc3339),
                                restarts: i.restarts,
                                unreachable: unreachable.contains(&p.machine),
                                generation: Some(i.generation),
                                health: i.health,
                                health_output: i.health_output.clone(),
                            }
                        }
                        other => InstanceView {
                            machine: p.machine.clone(),
                            slot: p.slot,
                            state: InstanceState::Pending,
                            overlay_ip: other.and_then(|i| i.overlay_ip.clone()),
                            error: None,
                            exit_code: None,
                            exited_at: None,
                            restarts: 0,
                            unreachable: unreachable.contains(&p.machine),
                            generation: None,
                            health: InstanceHealth::None,
                            health_output: None,
                        },
                    }
                })
                .collect(),
        }
    }
}

/// Where `--image` comes from. The rule, in order: an absolute path
/// (ployzctl sends a file or directory that exists as one) is an archive or
/// OCI layout to import; a reference naming a registry host or a digest is
/// pulled; a bare `sha256:`/hex digest is a stored image; any other name is
/// the image stored here under that name if there is one, and otherwise a
/// Docker Hub reference (`busybox` = `docker.io/library/busybox:latest`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum ImageSource {
    Path,
    Registry,
    Digest,
    NameOrRegistry,
}

pub(super) fn image_source(image: &str) -> ImageSource {
    let hexlike =
        |h: &str| (12..=64).contains(&h.len()) && h.bytes().all(|b| b.is_ascii_hexdigit());
    if image.starts_with('/') {
        ImageSource::Path
    } else if ImageRef::names_registry(image) {
        ImageSource::Registry
    } else if image.starts_with("sha256:") || hexlike(image) {
        ImageSource::Digest
    } else {
        ImageSource::NameOrRegistry
    }
}

pub(super) fn shipped_image(reference: &str, info: &ImageInfo, me: &str) -> ServiceImage {
    ServiceImage {
        reference: reference.to_string(),
        digest: Some(info.digest.clone()),
        image_id: Some(info.image_id.clone()),
        size: info.size,
        sources: vec![me.to_string()],
        manifest_digest: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn image_sources_follow_the_documented_rule() {
        use ImageSource::*;
        assert_eq!(image_source("/tmp/busybox.tar"), Path);
        assert_eq!(image_source("127.0.0.1:5000/app:1"), Registry);
        assert_eq!(image_source("docker.io/library/busybox"), Registry);
        assert_eq!(
            image_source(&format!("busybox@sha256:{}", "a".repeat(64))),
            Registry
        );
        assert_eq!(image_source("sha256:0123456789ab"), Digest);
        assert_eq!(image_source("0123456789abcdef"), Digest);
        assert_eq!(image_source("busybox"), NameOrRegistry);
        assert_eq!(image_source("ployz-busybox:latest"), NameOrRegistry);
        assert_eq!(image_source("library/busybox:1"), NameOrRegistry);
    }
}
