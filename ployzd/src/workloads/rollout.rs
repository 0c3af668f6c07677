//! Rolling out what a deploy wrote: wait for the instances to run (and
//! stay up, and be healthy when the service has a health check), replace
//! pinned instances one at a time.

use super::*;

/// Whether an instance of `svc` already runs (or starts) a generation newer
/// than `svc`'s: a later deploy of the service wrote its record.
fn superseded(svc: &ServiceRecord, records: &HashMap<String, InstanceRecord>) -> bool {
    records
        .values()
        .any(|i| i.service == svc.name && i.generation > svc.generation)
}

impl Workloads {
    /// Replaces the `pinned` instances of `record` one at a time: unpin one,
    /// wait until its machine runs it at the new generation steadily, then
    /// the next. Stops at the first that fails (the others keep running
    /// their generation) or when a newer deploy took over.
    pub(super) async fn roll(
        &self,
        record: &ServiceRecord,
        pinned: Vec<Placement>,
        deadline: tokio::time::Instant,
        progress: &impl Fn(&str, String),
    ) -> Result<ServiceView, ApiError> {
        let name = &record.name;
        let gen = record.generation;
        let mut latest = record.clone();
        let mut stopped: Option<(String, u32, String)> = None;
        for (n, p) in pinned.iter().enumerate() {
            progress(
                "rollout",
                format!(
                    "slot {} on {}: generation {} -> {gen}",
                    p.slot,
                    p.machine,
                    p.generation.unwrap_or(0)
                ),
            );
            let written = self
                .write_service(name, |cur, _, _| {
                    let Some(cur) = cur.filter(|c| c.generation == gen) else {
                        return Err(refused(format!(
                            "service {name} was redeployed or removed during the rollout"
                        )));
                    };
                    let mut next = cur.clone();
                    for q in &mut next.placements {
                        if q.machine == p.machine && q.slot == p.slot {
                            q.generation = None;
                        }
                    }
                    Ok(Some(next))
                })
                .await;
            latest = match written {
                Ok(Some(r)) => r,
                Ok(None) => break,
                Err(e) => {
                    progress("rollout", format!("stopped: {}", e.message));
                    break;
                }
            };
            if let Err(why) = self.wait_steady(name, p, gen, deadline).await {
                stopped = Some((p.machine.clone(), p.slot, why.clone()));
                progress(
                    "rollout",
                    format!(
                        "stopped at slot {} on {}: {why}; {} instance(s) still run an older generation",
                        p.slot,
                        p.machine,
                        pinned.len() - n - 1
                    ),
                );
                break;
            }
            progress(
                "rollout",
                format!("slot {} on {}: running generation {gen}", p.slot, p.machine),
            );
        }
        let mut view = Self::view_of(&latest, &self.instances().await?, &HashSet::new());
        // The one that stopped the rollout is failed in the answer, with why
        // (its machine goes on restarting it).
        if let Some((machine, slot, why)) = stopped {
            if let Some(i) = view
                .instances
                .iter_mut()
                .find(|i| i.machine == machine && i.slot == slot)
            {
                i.state = InstanceState::Failed;
                i.error = Some(why);
            }
        }
        Ok(view)
    }

    /// Once the instances first ran: the ones this deploy started must keep
    /// running for [`ROLLOUT_STEADY`] (two reconciler passes, so one that
    /// exits at once has been seen exiting), or until `deadline`. One that
    /// exited meanwhile is failed in the answer, with its exit code and last
    /// output (its machine goes on restarting it).
    pub(super) async fn wait_staying_up(
        &self,
        svc: &ServiceRecord,
        mut view: ServiceView,
        deadline: tokio::time::Instant,
        progress: &impl Fn(&str, String),
    ) -> Result<ServiceView, ApiError> {
        let steady_until = tokio::time::Instant::now() + ROLLOUT_STEADY;
        loop {
            let records = self.instances().await?;
            let crashed = crashed(svc, &records);
            if !crashed.is_empty() {
                view = Self::view_of(svc, &records, &HashSet::new());
                mark_crashed(&mut view, crashed, progress);
                return Ok(view);
            }
            let now = tokio::time::Instant::now();
            // One that is not running already fails the deploy.
            if !view.not_running().is_empty() || now >= steady_until || now >= deadline {
                return Ok(view);
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
            let records = self.instances().await?;
            // A newer deploy of the service took over (two deploys at once:
            // the later one rolls what this one started). What this deploy
            // started ran until then; the newer deploy answers for the rest.
            if superseded(svc, &records) {
                progress(
                    "instances",
                    "a newer deploy of the service took over".to_string(),
                );
                return Ok(view);
            }
            view = Self::view_of(svc, &records, &HashSet::new());
        }
    }

    /// Until `deadline`: the instance of placement `p` runs generation `gen`
    /// and keeps running for [`ROLLOUT_STEADY`] (one that crashes at start
    /// must not pass for running).
    pub(super) async fn wait_steady(
        &self,
        name: &str,
        p: &Placement,
        gen: u64,
        deadline: tokio::time::Instant,
    ) -> Result<(), String> {
        let key = InstanceRecord::key(name, &p.machine, p.slot);
        let mut since: Option<(u64, tokio::time::Instant)> = None;
        loop {
            let now = self
                .store
                .get::<InstanceRecord>(BUCKET_INSTANCES, &key)
                .await;
            let i = match now {
                Ok(i) => i.map(|v| v.value),
                Err(e) => return Err(e.message),
            };
            let i = i.filter(|i| i.generation >= gen);
            if let Some(why) = i.as_ref().and_then(exit_summary) {
                return Err(why);
            }
            let mut last_probe = None;
            match i {
                Some(i) if i.health == InstanceHealth::Unhealthy => {
                    return Err(format!("unhealthy; last probe: {}", probe_said(&i)));
                }
                // With a health check, only a healthy instance passes.
                Some(i)
                    if i.state == InstanceState::Running
                        && i.health == InstanceHealth::Starting =>
                {
                    last_probe = Some(probe_said(&i));
                    since = None;
                }
                Some(i) if i.state == InstanceState::Running => match since {
                    Some((at, t)) if at == i.updated_at_ms => {
                        if t.elapsed() >= ROLLOUT_STEADY {
                            return Ok(());
                        }
                    }
                    _ => since = Some((i.updated_at_ms, tokio::time::Instant::now())),
                },
                Some(i) if i.state == InstanceState::Failed => {
                    return Err(format!(
                        "failed{}",
                        i.error.map(|e| format!(" ({e})")).unwrap_or_default()
                    ))
                }
                _ => since = None,
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(match last_probe {
                    Some(said) => {
                        format!("not healthy before the deploy's deadline; last probe: {said}")
                    }
                    None => "not steadily running before the deploy's deadline".into(),
                });
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    /// With a health check, once the instances run: until every instance
    /// this deploy started (placements neither pinned nor paused) is
    /// healthy, or one is unhealthy or was restarted (for that or an exit),
    /// or `deadline`. Those that are not healthy then carry why in the
    /// answer's `error`, with their last probe's output.
    pub(super) async fn wait_healthy(
        &self,
        svc: &ServiceRecord,
        deadline: tokio::time::Instant,
        wait: Duration,
        progress: &impl Fn(&str, String),
    ) -> Result<ServiceView, ApiError> {
        let fresh: HashSet<(&str, u32)> = svc
            .placements
            .iter()
            .filter(|p| p.generation.is_none() && !p.paused)
            .map(|p| (p.machine.as_str(), p.slot))
            .collect();
        let mut seen: HashMap<(String, u32), InstanceHealth> = HashMap::new();
        loop {
            let records = self.instances().await?;
            let mut view = Self::view_of(svc, &records, &HashSet::new());
            let mut bad = false;
            let mut all_healthy = true;
            for i in view
                .instances
                .iter_mut()
                .filter(|i| fresh.contains(&(i.machine.as_str(), i.slot)))
            {
                if seen.insert((i.machine.clone(), i.slot), i.health) != Some(i.health) {
                    progress(
                        "health",
                        format!("slot {} on {}: {}", i.slot, i.machine, i.health),
                    );
                }
                all_healthy &= i.ready() && i.health == InstanceHealth::Healthy;
                if i.health == InstanceHealth::Unhealthy {
                    bad = true;
                    i.error = Some(format!(
                        "unhealthy; last probe: {}",
                        i.health_output.as_deref().unwrap_or("(no output)")
                    ));
                }
            }
            if all_healthy {
                return Ok(view);
            }
            let crashed = crashed(svc, &records);
            let timed_out = tokio::time::Instant::now() >= deadline;
            if crashed.is_empty() && !bad && !timed_out {
                tokio::time::sleep(Duration::from_millis(250)).await;
                continue;
            }
            mark_crashed(&mut view, crashed, progress);
            for i in view.instances.iter_mut().filter(|i| {
                fresh.contains(&(i.machine.as_str(), i.slot)) && !i.ready() && i.error.is_none()
            }) {
                i.error = Some(format!(
                    "not healthy within the deploy's wait ({} s); last probe: {}",
                    wait.as_secs(),
                    i.health_output
                        .as_deref()
                        .unwrap_or("none failed yet (no probe has answered)")
                ));
            }
            return Ok(view);
        }
    }

    /// Wait until every placement of `svc` runs its generation (or failed),
    /// reporting each change once.
    pub(super) async fn wait_for_instances(
        &self,
        svc: &ServiceRecord,
        wait: Duration,
        mut report: impl FnMut(&InstanceView),
    ) -> Result<ServiceView, ApiError> {
        let deadline = tokio::time::Instant::now() + wait;
        let mut seen: HashMap<(String, u32), (InstanceState, Option<String>)> = HashMap::new();
        loop {
            let view = Self::view_of(svc, &self.instances().await?, &HashSet::new());
            for i in &view.instances {
                let now = (i.state, i.error.clone());
                if seen.get(&(i.machine.clone(), i.slot)) != Some(&now) {
                    report(i);
                    seen.insert((i.machine.clone(), i.slot), now);
                }
            }
            let settled = view.instances.iter().all(|i| {
                matches!(i.state, InstanceState::Running | InstanceState::Failed)
                    || (i.state == InstanceState::Stopped
                        && svc
                            .placements
                            .iter()
                            .any(|p| p.machine == i.machine && p.slot == i.slot && p.paused))
            });
            if settled || tokio::time::Instant::now() >= deadline {
                return Ok(view);
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }
}

/// What the last failed probe of `i` said, for people.
fn probe_said(i: &InstanceRecord) -> String {
    i.health_output
        .clone()
        .unwrap_or_else(|| "none failed yet (not probed yet, or no answer so far)".into())
}

/// The instances of `svc` a deploy started (placements neither pinned to
/// an older generation nor paused) that exited since, with how:
/// `(machine, slot, summary)`.
fn crashed(
    svc: &ServiceRecord,
    records: &HashMap<String, InstanceRecord>,
) -> Vec<(String, u32, String)> {
    svc.placements
        .iter()
        .filter(|p| p.generation.is_none() && !p.paused)
        .filter_map(|p| {
            let i = records.get(&InstanceRecord::key(&svc.name, &p.machine, p.slot))?;
            if i.generation < svc.generation {
                return None;
            }
            Some((p.machine.clone(), p.slot, exit_summary(i)?))
        })
        .collect()
}

/// Report each crashed instance and show it as failed, with why, in `view`.
fn mark_crashed(
    view: &mut ServiceView,
    crashed: Vec<(String, u32, String)>,
    progress: &impl Fn(&str, String),
) {
    for (machine, slot, why) in crashed {
        progress("instance", format!("slot {slot} on {machine}: {why}"));
        if let Some(i) = view
            .instances
            .iter_mut()
            .find(|i| i.machine == machine && i.slot == slot)
        {
            i.state = InstanceState::Failed;
            i.error = Some(why);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::workloads::spec::tests::{instance, placement};

    fn service(placements: Vec<Placement>) -> ServiceRecord {
        ServiceRecord {
            name: "web".into(),
            image: ServiceImage {
                reference: "web:1".into(),
                digest: None,
                image_id: None,
                manifest_digest: None,
                size: 0,
                sources: vec![],
            },
            replicas: placements.len() as u32,
            command: vec![],
            env: vec![],
            volumes: vec![],
            memory_limit: None,
            cpu_shares: None,
            placements,
            generation: 2,
            nats_user: None,
            created_at_ms: 0,
            updated_at_ms: 0,
            deployed_by: None,
            project: None,
            health: None,
            ports: vec![],
        }
    }

    #[test]
    fn crashed_are_the_fresh_instances_that_exited() {
        let svc = service(vec![
            placement("m1", 0),
            placement("m2", 1),
            Placement {
                generation: Some(1),
                ..placement("m3", 2)
            },
            Placement {
                paused: true,
                ..placement("m4", 3)
            },
            placement("m5", 4),
        ]);
        let exited = |machine: &str, slot, generation| {
            let mut i = instance(generation);
            i.machine = machine.into();
            i.slot = slot;
            i.exit_code = Some(3);
            i.exited_at_ms = Some(10);
            i.restarts = 1;
            i.last_output = vec!["bye".into()];
            (InstanceRecord::key("web", machine, slot), i)
        };
        let mut up = instance(2);
        up.machine = "m2".into();
        up.slot = 1;
        let records: HashMap<String, InstanceRecord> = [
            // Exited at the new generation: crashed.
            exited("m1", 0, 2),
            // Running, never exited.
            (InstanceRecord::key("web", "m2", 1), up),
            // Pinned to generation 1, or paused: not this deploy's.
            exited("m3", 2, 1),
            exited("m4", 3, 2),
            // Still reporting the previous generation's exit.
            exited("m5", 4, 1),
        ]
        .into_iter()
        .collect();
        let c = crashed(&svc, &records);
        assert_eq!(c.len(), 1, "{c:?}");
        assert_eq!((c[0].0.as_str(), c[0].1), ("m1", 0));
        assert!(c[0].2.contains("exited with code 3"), "{}", c[0].2);
        assert!(c[0].2.contains("bye"), "{}", c[0].2);
    }
}
