//! The per-machine reconciler: runs what is placed on this machine,
//! removes what is no longer placed here, restarts what exited, and
//! reports each instance in the `instances` bucket (only the machine
//! running an instance writes its record).

use super::*;

impl Workloads {
    /// One pass: make this machine run exactly what is placed on it.
    pub(crate) async fn reconcile(&self) -> Result<(), ApiError> {
        if self.is_leaving() {
            return Ok(());
        }
        let me = self.machine_id().to_string();
        let services: Vec<ServiceRecord> =
            self.store.values::<ServiceRecord>(BUCKET_SERVICES).await?;
        let mut desired: BTreeMap<String, (ServiceRecord, Placement)> = BTreeMap::new();
        for s in &services {
            for p in s.placements.iter().filter(|p| p.machine == me) {
                desired.insert(workload_id(&me, &s.name, p.slot), (s.clone(), p.clone()));
            }
        }
        if desired.is_empty() && self.engine.get().is_none() && !self.has_local_workloads() {
            return Ok(());
        }
        let reported: HashMap<String, InstanceRecord> = self
            .instances()
            .await?
            .into_iter()
            .filter(|(_, i)| i.machine == me)
            .collect();
        let w = match self.engine() {
            Ok(w) => w,
            Err(e) => {
                self.report_failed(&desired, &reported, &e.message).await?;
                return Err(e);
            }
        };
        let prefix = workload_prefix(&me);
        let actual: HashMap<String, (State, Option<i64>)> = match w.runtime.list().await {
            Ok(l) => l
                .into_iter()
                .filter(|s| s.id.starts_with(&prefix))
                .map(|s| (s.id, (s.state, s.exit_code)))
                .collect(),
            Err(e) => {
                let msg = format!("the {} runtime does not answer: {e}", w.runtime.kind());
                self.report_failed(&desired, &reported, &msg).await?;
                return Err(internal(msg));
            }
        };
        let mut st = w.state.lock().await;
        // `remove_all` may have run while this pass waited for the lock:
        // what it read is stale, and nothing may start again.
        if self.is_leaving() {
            return Ok(());
        }
        // Remove what is no longer placed here.
        let stale: Vec<String> = actual
            .keys()
            .chain(st.workloads.keys())
            .filter(|id| !desired.contains_key(*id))
            .cloned()
            .collect::<HashSet<_>>()
            .into_iter()
            .collect();
        for id in stale {
            tracing::info!(workload = %id, "removing an instance no longer placed here");
            if actual.contains_key(&id) {
                let _ = w.runtime.stop(&id, STOP_GRACE).await;
                if let Err(e) = w.runtime.delete(&id).await {
                    tracing::warn!(workload = %id, "delete failed: {e}");
                    continue;
                }
            }
            st.workloads.remove(&id);
            save_state(&w.data_dir, &st)?;
        }
        if desired.is_empty() && st.workloads.is_empty() {
            // Nothing runs here any more: take the workload network down too
            // (a later deploy sets it up again).
            w.remove_networks().await;
        }
        let mut ops = Vec::new();
        for (key, i) in &reported {
            let placed = desired.values().any(|(s, p)| {
                InstanceRecord::key(&s.name, &me, p.slot) == *key && s.name == i.service
            });
            if !placed {
                ops.push(store::delete(BUCKET_INSTANCES, key, Expect::Any));
            }
        }
        if !ops.is_empty() {
            let _ = self.store.txn(ops).await?;
        }
        // Run what is placed here.
        // This machine's record (its subnet), read only when something starts.
        let mut mine: Option<MachineRecord> = None;
        // What the health monitor is to probe after this pass.
        let mut targets = Vec::new();
        let nats_now = self.control.credentials_generation();
        for (id, (svc, p)) in &desired {
            let key = InstanceRecord::key(&svc.name, &me, p.slot);
            let (state, exit_code) = match actual.get(id) {
                Some((s, c)) => (Some(*s), *c),
                None => (None, None),
            };
            // An instance given NATS credentials that were rotated since
            // (`machine rm`) is replaced with the new ones.
            let stale_nats = svc.nats_user.is_some()
                && nats_now.is_some()
                && st
                    .workloads
                    .get(id)
                    .is_some_and(|l| l.nats_generation != nats_now);
            if stale_nats && state == Some(State::Running) {
                tracing::info!(workload = %id, "NATS credentials rotated: replacing the instance");
            }
            // Pinned by a rolling update, an older instance keeps running.
            let current_gen = !stale_nats
                && st
                    .workloads
                    .get(id)
                    .is_some_and(|l| l.generation >= p.target_generation(svc.generation));
            let exited = current_gen && matches!(state, Some(State::Stopped | State::Failed));
            if exited && !p.paused && st.workloads.get(id).is_some_and(|l| !l.run_exited()) {
                self.note_exit(w, &mut st, id, exit_code).await?;
            }
            // Its health check failed `retries` times in a row: it is
            // restarted like an instance that exited.
            let unhealthy = current_gen
                && !p.paused
                && state == Some(State::Running)
                && st.workloads.get(id).is_some_and(|l| {
                    self.health.health_of(id, l.started_at_ms).map(|h| h.0)
                        == Some(InstanceHealth::Unhealthy)
                });
            if unhealthy {
                self.note_unhealthy(w, &mut st, id).await?;
            }
            let local = st.workloads.get(id).cloned();
            let (next_state, error) = if p.paused {
                if state == Some(State::Running) {
                    let _ = w.runtime.stop(id, STOP_GRACE).await;
                }
                (InstanceState::Stopped, None)
            } else if current_gen && state == Some(State::Running) && !unhealthy {
                (InstanceState::Running, None)
            } else {
                if exited
                    && now_ms().saturating_sub(local.as_ref().map_or(0, |l| l.started_at_ms))
                        < RESTART_BACKOFF.as_millis() as u64
                {
                    let msg = match local.as_ref().and_then(|l| l.exit_code) {
                        Some(c) => format!("exited with code {c}; restarting"),
                        None => "exited; restarting".to_string(),
                    };
                    (InstanceState::Failed, Some(msg))
                } else {
                    // Report pending before the (possibly slow) start.
                    let pending = instance_record(
                        svc,
                        p,
                        &me,
                        InstanceState::Pending,
                        svc.generation,
                        None,
                        local.as_ref(),
                    );
                    if reported.get(&key).map(|r| (r.state, r.generation))
                        != Some((InstanceState::Pending, svc.generation))
                    {
                        let _ = self
                            .store
                            .txn(vec![put(BUCKET_INSTANCES, &key, &pending, Expect::Any)])
                            .await?;
                    }
                    if mine.is_none() {
                        mine = Some(self.store.my_record().await?);
                    }
                    let me_rec = mine.as_ref().expect("just read");
                    match self
                        .start_instance(w, &mut st, id, svc, p, me_rec, state.is_some())
                        .await
                    {
                        Ok(()) => (InstanceState::Running, None),
                        Err(e) => {
                            tracing::warn!(workload = %id, "cannot start: {}", e.message);
                            (InstanceState::Failed, Some(e.message))
                        }
                    }
                }
            };
            // The generation it actually runs (older while pinned).
            let generation = st
                .workloads
                .get(id)
                .map_or(svc.generation, |l| l.generation);
            let local = st.workloads.get(id);
            let mut rec = instance_record(svc, p, &me, next_state, generation, error, local);
            // Probed while it runs the service's generation with a check.
            if let (Some(check), Some(l), InstanceState::Running) = (&svc.health, local, next_state)
            {
                if l.generation == svc.generation {
                    targets.push(probe::Target {
                        id: id.clone(),
                        run: l.started_at_ms,
                        addr: l.ip,
                        check: check.clone(),
                    });
                    let (health, output) = self
                        .health
                        .health_of(id, l.started_at_ms)
                        .unwrap_or((InstanceHealth::Starting, None));
                    rec.health = health;
                    if output.is_some() {
                        rec.health_output = output;
                    }
                }
            }
            let same = reported.get(&key).is_some_and(|r| {
                r.state == rec.state
                    && r.generation == rec.generation
                    && r.overlay_ip == rec.overlay_ip
                    && r.error == rec.error
                    && r.exit_code == rec.exit_code
                    && r.exited_at_ms == rec.exited_at_ms
                    && r.restarts == rec.restarts
                    && r.last_output == rec.last_output
                    && r.health == rec.health
                    && r.health_output == rec.health_output
                    && r.killed_unhealthy == rec.killed_unhealthy
            });
            if !same {
                let _ = self
                    .store
                    .txn(vec![put(BUCKET_INSTANCES, &key, &rec, Expect::Any)])
                    .await?;
            }
        }
        self.health.set_targets(targets);
        Ok(())
    }

    /// Without a working runtime, every instance placed here is failed, with
    /// the reason (rather than pending forever).
    pub(super) async fn report_failed(
        &self,
        desired: &BTreeMap<String, (ServiceRecord, Placement)>,
        reported: &HashMap<String, InstanceRecord>,
        why: &str,
    ) -> Result<(), ApiError> {
        let me = self.machine_id();
        let mut ops = Vec::new();
        for (svc, p) in desired.values() {
            let key = InstanceRecord::key(&svc.name, me, p.slot);
            let rec = instance_record(
                svc,
                p,
                me,
                InstanceState::Failed,
                svc.generation,
                Some(why.to_string()),
                None,
            );
            let same = reported.get(&key).is_some_and(|r| {
                r.state == rec.state && r.generation == rec.generation && r.error == rec.error
            });
            if !same {
                ops.push(put(BUCKET_INSTANCES, &key, &rec, Expect::Any));
            }
        }
        if !ops.is_empty() {
            let _ = self.store.txn(ops).await?;
        }
        Ok(())
    }

    /// The current run of workload `id` has ended: remember how (exit code,
    /// when, its last lines of output) before a restart replaces it.
    async fn note_exit(
        &self,
        w: &Engine,
        st: &mut LocalState,
        id: &str,
        exit_code: Option<i64>,
    ) -> Result<(), ApiError> {
        let output = match w.runtime.logs(id).await {
            Ok(log) => output_tail(&log),
            Err(e) => {
                tracing::debug!(workload = %id, "no output of the exited instance: {e}");
                Vec::new()
            }
        };
        let Some(l) = st.workloads.get_mut(id) else {
            return Ok(());
        };
        tracing::info!(workload = %id, ?exit_code, restarts = l.restarts, "instance exited");
        l.exit_code = exit_code;
        l.exited_at_ms = Some(now_ms().max(l.started_at_ms));
        l.last_output = output;
        l.killed_unhealthy = false;
        save_state(&w.data_dir, st)
    }

    /// The current run of workload `id` is unhealthy: remember it ended so
    /// (with its last probe's output and its own last lines) before the
    /// restart that follows.
    async fn note_unhealthy(
        &self,
        w: &Engine,
        st: &mut LocalState,
        id: &str,
    ) -> Result<(), ApiError> {
        let run = st.workloads.get(id).map(|l| l.started_at_ms);
        let probe = run
            .and_then(|r| self.health.health_of(id, r))
            .and_then(|h| h.1);
        tracing::warn!(workload = %id, probe = ?probe, "instance unhealthy: restarting it");
        self.note_exit(w, st, id, None).await?;
        if let Some(l) = st.workloads.get_mut(id) {
            l.killed_unhealthy = true;
            l.health_output = probe;
        }
        save_state(&w.data_dir, st)
    }

    pub(super) fn has_local_workloads(&self) -> bool {
        !load_state(&self.cfg.data_dir).workloads.is_empty()
    }

    /// (Re)create and start one instance.
    #[allow(clippy::too_many_arguments)]
    pub(super) async fn start_instance(
        &self,
        w: &Engine,
        st: &mut LocalState,
        id: &str,
        svc: &ServiceRecord,
        p: &Placement,
        mine: &MachineRecord,
        exists: bool,
    ) -> Result<(), ApiError> {
        if exists {
            let _ = w.runtime.stop(id, STOP_GRACE).await;
            w.runtime
                .delete(id)
                .await
                .map_err(|e| internal(format!("cannot remove the old instance: {e}")))?;
        }
        let (image, config) = self.prepare_image(w, svc).await?;
        let (subnet, prefix) = parse_subnet(&mine.subnet)?;
        let gateway = Ipv4Addr::from(u32::from(subnet) | 1);
        let bridge = bridge_name(subnet);
        let ensured = w
            .bridges
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .contains(&bridge);
        if !ensured {
            // Only the cluster reaches workloads: over the mesh, in packets
            // that fit it.
            let cluster = self.store.require_network().await?.cidr;
            w.runtime
                .ensure_network(&BridgeNetwork {
                    bridge: bridge.clone(),
                    gateway,
                    prefix,
                    mtu: Some(crate::overlay::MTU),
                    allow_from: Some(cluster),
                })
                .await
                .map_err(|e| internal(format!("cannot set up the workload network: {e}")))?;
            w.bridges
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .insert(bridge.clone());
        }
        let ip = match st.workloads.get(id).and_then(|l| l.ip) {
            Some(ip) => ip,
            None => {
                let used: HashSet<Ipv4Addr> = st.workloads.values().filter_map(|l| l.ip).collect();
                allocate_ip(subnet, &used).ok_or_else(|| {
                    refused(format!(
                        "machine {} has no free workload address left in {}",
                        mine.id, mine.subnet
                    ))
                })?
            }
        };
        let mut mounts = Vec::new();
        for v in &svc.volumes {
            let dir = w.volume_dir(&v.name);
            tokio::fs::create_dir_all(&dir)
                .await
                .map_err(|e| internal(format!("cannot create volume {}: {e}", dir.display())))?;
            mounts.push(VolumeMount {
                source: dir,
                target: PathBuf::from(&v.target),
                read_only: false,
            });
        }
        let args = if svc.command.is_empty() {
            config
                .as_ref()
                .map(|c| c.entrypoint.iter().chain(&c.cmd).cloned().collect())
                .unwrap_or_default()
        } else {
            svc.command.clone()
        };
        if args.is_empty() {
            return Err(invalid(format!(
                "service `{}` has no command and its image names none: deploy again with `-- <command>`",
                svc.name
            )));
        }
        let mut env: Vec<(String, String)> =
            config.as_ref().map(|c| c.env.clone()).unwrap_or_default();
        for (k, v) in &svc.env {
            env.retain(|(old, _)| old != k);
            env.push((k.clone(), v.clone()));
        }
        let mut nats_generation = None;
        if let Some(user) = &svc.nats_user {
            // The NATS app user's credentials, on this machine's server.
            let (url, generation) = self.control.app_url(user).await?;
            env.retain(|(old, _)| old != "NATS_URL");
            env.push(("NATS_URL".into(), url));
            nats_generation = Some(generation);
        }
        let mut spec = WorkloadSpec::new(id, image, args);
        spec.env = env;
        spec.mounts = mounts;
        spec.hostname = Some(svc.name.clone());
        spec.memory_limit = svc.memory_limit;
        spec.cpu_shares = svc.cpu_shares;
        spec.network = Some(NetworkAttachment {
            bridge,
            address: ip,
            prefix,
            gateway,
            mtu: Some(crate::overlay::MTU),
            // The machine's resolver (`ingress::dns`) listens there.
            dns: Some(gateway),
        });
        // A restart in the same generation keeps how the last run ended and
        // counts itself; a new generation starts afresh.
        let prev = st
            .workloads
            .get(id)
            .filter(|l| l.generation == svc.generation);
        let restarts = prev.map_or(0, |l| l.restarts + u32::from(l.run_exited()));
        let exit_code = prev.and_then(|l| l.exit_code);
        let exited_at_ms = prev.and_then(|l| l.exited_at_ms);
        let last_output = prev.map(|l| l.last_output.clone()).unwrap_or_default();
        let killed_unhealthy = prev.is_some_and(|l| l.killed_unhealthy);
        let health_output = prev.and_then(|l| l.health_output.clone());
        st.workloads.insert(
            id.to_string(),
            LocalWorkload {
                service: svc.name.clone(),
                slot: p.slot,
                generation: svc.generation,
                ip: Some(ip),
                started_at_ms: now_ms(),
                image: svc.image.digest.clone(),
                image_known: true,
                exit_code,
                exited_at_ms,
                restarts,
                last_output,
                killed_unhealthy,
                health_output,
                nats_generation,
            },
        );
        save_state(&w.data_dir, st)?;
        let named = |mut e: ployz_runtime::RuntimeError| {
            // The user knows the image by what they deployed, not by its
            // unpacked directory or docker id.
            if let ployz_runtime::RuntimeError::ExecutableNotFound { image, .. } = &mut e {
                *image = svc.image.reference.clone();
            }
            internal(e.to_string())
        };
        w.runtime.create(&spec).await.map_err(named)?;
        if let Err(e) = w.runtime.start(id).await {
            let _ = w.runtime.delete(id).await;
            return Err(named(e));
        }
        tracing::info!(workload = %id, %ip, generation = svc.generation, "instance started");
        Ok(())
    }

    fn is_leaving(&self) -> bool {
        self.leaving.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// `machine rm`: this machine is leaving, stop and delete its instances.
    /// `progress(removed, total)` is called as instances go.
    ///
    /// The reconciler starts nothing from here on (its placements are still
    /// in the store until the remover deletes them, after this cleanup): a
    /// pass running now is waited for (the state lock) and what it started
    /// is in the list below. Otherwise a pass would restart what this
    /// stopped, and that instance would outlive the machine's exit.
    pub(crate) async fn remove_all(&self, progress: impl Fn(usize, usize)) -> usize {
        self.leaving
            .store(true, std::sync::atomic::Ordering::SeqCst);
        let Ok(w) = self.engine() else { return 0 };
        let mut st = w.state.lock().await;
        let prefix = workload_prefix(self.machine_id());
        let ids: Vec<String> = match w.runtime.list().await {
            Ok(l) => l
                .into_iter()
                .map(|s| s.id)
                .filter(|id| id.starts_with(&prefix))
                .collect(),
            Err(e) => {
                tracing::warn!("cannot list workloads to remove: {e}");
                return 0;
            }
        };
        let mut n = 0;
        progress(0, ids.len());
        for (done, id) in ids.iter().enumerate() {
            let _ = w.runtime.stop(id, STOP_GRACE).await;
            match w.runtime.delete(id).await {
                Ok(()) => n += 1,
                Err(e) => tracing::warn!(workload = %id, "cannot delete: {e}"),
            }
            progress(done + 1, ids.len());
        }
        st.workloads.clear();
        let _ = save_state(&w.data_dir, &st);
        w.remove_networks().await;
        n
    }

    /// Drop a removed machine's placements and instance records.
    pub(crate) async fn forget_machine(&self, machine: &str) -> Result<(), ApiError> {
        let services = self.store.list::<ServiceRecord>(BUCKET_SERVICES).await?;
        for s in services {
            if s.value.placements.iter().any(|p| p.machine == machine) {
                self.write_service(&s.value.name, |cur, _, _| {
                    let Some(cur) = cur else { return Ok(None) };
                    let mut next = cur.clone();
                    next.placements.retain(|p| p.machine != machine);
                    Ok(Some(next))
                })
                .await?;
            }
        }
        let ops: Vec<_> = self
            .instances()
            .await?
            .into_iter()
            .filter(|(_, i)| i.machine == machine)
            .map(|(k, _)| store::delete(BUCKET_INSTANCES, &k, Expect::Any))
            .collect();
        if !ops.is_empty() {
            let _ = self.store.txn(ops).await?;
        }
        Ok(())
    }
}

impl Workloads {
    /// The reconciler loop: a pass every few seconds and on every change
    /// to the services bucket, with image collection now and then.
    pub async fn run(self: Arc<Self>, mut stop: tokio::sync::watch::Receiver<bool>) {
        let mut last_gc = tokio::time::Instant::now();
        let kick = self.kick.clone();
        let health = tokio::spawn(self.clone().run_health(stop.clone()));
        let watcher = tokio::spawn(
            self.store
                .clone()
                .watch_bucket(BUCKET_SERVICES, kick.clone()),
        );
        loop {
            let kicked = tokio::select! {
                _ = stop.changed() => break,
                _ = tokio::time::sleep(RECONCILE_EVERY) => false,
                _ = kick.notified() => true,
            };
            if self.store.local().get().is_none() {
                continue;
            }
            let pass = async {
                if let Err(e) = self.reconcile().await {
                    tracing::debug!("reconcile: {}", e.message);
                }
                // Also right after services changed: a removed service's image may
                // go once its instances are gone (and the grace period is over).
                if kicked || last_gc.elapsed() >= IMAGE_GC_EVERY {
                    last_gc = tokio::time::Instant::now();
                    if let Err(e) = self.gc_images().await {
                        tracing::warn!("image garbage collection: {}", e.message);
                    }
                }
            };
            // A pass may wait on the store; a stop does not wait for it.
            tokio::select! {
                _ = stop.changed() => break,
                _ = pass => {}
            }
        }
        watcher.abort();
        health.abort();
    }
}

/// The record of instance `p` of `svc` on machine `me`, with what this
/// machine remembers of its exits (`local`).
fn instance_record(
    svc: &ServiceRecord,
    p: &Placement,
    me: &str,
    state: InstanceState,
    generation: u64,
    error: Option<String>,
    local: Option<&LocalWorkload>,
) -> InstanceRecord {
    // An instance keeps its address across generations; what an older
    // generation's runs did is not this one's story.
    let overlay_ip = local.and_then(|l| l.ip).map(|ip| ip.to_string());
    let local = local.filter(|l| l.generation == generation);
    InstanceRecord {
        service: svc.name.clone(),
        machine: me.to_string(),
        state,
        overlay_ip,
        slot: p.slot,
        generation,
        error,
        updated_at_ms: now_ms(),
        exit_code: local.and_then(|l| l.exit_code),
        exited_at_ms: local.and_then(|l| l.exited_at_ms),
        restarts: local.map_or(0, |l| l.restarts),
        last_output: local.map(|l| l.last_output.clone()).unwrap_or_default(),
        health: InstanceHealth::None,
        health_output: local.and_then(|l| l.health_output.clone()),
        killed_unhealthy: local.is_some_and(|l| l.killed_unhealthy),
    }
}
