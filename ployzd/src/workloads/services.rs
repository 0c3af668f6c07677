//! `service ls / rm / logs`.

use super::*;

impl Workloads {
    pub(crate) async fn service_list(&self) -> Result<ServiceList, ApiError> {
        self.store.require_network().await?;
        let instances = self.instances().await?;
        // This machine's prober: whose latest probe failed.
        let unreachable: HashSet<String> = self
            .overlay
            .rtt_rows()
            .into_iter()
            .filter(|r| r.error.is_some())
            .map(|r| r.peer)
            .collect();
        let mut services: Vec<ServiceView> = self
            .store
            .list::<ServiceRecord>(BUCKET_SERVICES)
            .await?
            .iter()
            .map(|s| Self::view_of(&s.value, &instances, &unreachable))
            .collect();
        // Grouped by project (services deployed alone first), then by name.
        services.sort_by(|a, b| (&a.project, &a.name).cmp(&(&b.project, &b.name)));
        Ok(ServiceList { services })
    }

    pub(crate) async fn service_rm(
        &self,
        name: &str,
        sink: &ProgressSink,
    ) -> Result<ServiceRemoved, ApiError> {
        validate_service_name(name)?;
        self.store.require_network().await?;
        let cur = self.service_record(name).await?;
        let machines: Vec<String> = {
            let mut m: Vec<String> = cur
                .value
                .placements
                .iter()
                .map(|p| p.machine.clone())
                .collect();
            m.sort();
            m.dedup();
            m
        };
        self.write_service(name, |_, _, _| Ok(None)).await?;
        note(
            sink,
            name,
            "removed",
            format!("waiting for {} machine(s) to stop it", machines.len()),
        );
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        loop {
            let left: HashSet<String> = self
                .instances()
                .await?
                .into_values()
                .filter(|i| i.service == name)
                .map(|i| i.machine)
                .collect();
            if left.is_empty() || tokio::time::Instant::now() >= deadline {
                let (pending_on, removed_on) = machines.into_iter().partition(|m| left.contains(m));
                return Ok(ServiceRemoved {
                    name: name.to_string(),
                    removed_on,
                    pending_on,
                });
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    pub(crate) async fn service_logs(
        &self,
        name: &str,
        slot: Option<u32>,
        tail: Option<usize>,
    ) -> Result<ServiceLogs, ApiError> {
        validate_service_name(name)?;
        self.store.require_network().await?;
        let tail = tail.unwrap_or(DEFAULT_LOG_TAIL).clamp(1, MAX_LOG_TAIL);
        let svc = self.service_record(name).await?;
        let placements: Vec<&Placement> = svc
            .value
            .placements
            .iter()
            .filter(|p| slot.is_none_or(|s| p.slot == s))
            .collect();
        if placements.is_empty() {
            return Err(no_instance(name, slot, svc.value.placements.len()));
        }
        let mut instances = Vec::new();
        for p in placements {
            let got = if p.machine == self.machine_id() {
                self.local_logs(name, p.slot, tail)
                    .await
                    .map_err(|e| e.message)
            } else {
                match self
                    .control
                    .call_machine(
                        &p.machine,
                        &PeerRequest::Logs {
                            service: name.to_string(),
                            slot: p.slot,
                            tail,
                        },
                        Duration::from_secs(10),
                    )
                    .await
                {
                    Ok(PeerResponse::Logs(l)) => Ok(l),
                    Ok(PeerResponse::Error(e)) => Err(e.message),
                    Ok(_) => Err(format!(
                        "machine {} answered with something other than logs (another ployzd version?)",
                        p.machine
                    )),
                    Err(e) => Err(e),
                }
            };
            let (logs, error) = match got {
                Ok(l) => (l, None),
                Err(e) => (String::new(), Some(e)),
            };
            instances.push(InstanceLogs {
                machine: p.machine.clone(),
                slot: p.slot,
                logs,
                error,
            });
        }
        Ok(ServiceLogs {
            name: name.to_string(),
            instances,
        })
    }

    /// The last `tail` lines of an instance running here.
    pub(crate) async fn local_logs(
        &self,
        service: &str,
        slot: u32,
        tail: usize,
    ) -> Result<String, ApiError> {
        validate_service_name(service)?;
        let w = self.engine()?;
        let id = workload_id(self.machine_id(), service, slot);
        let all = w.runtime.logs(&id).await.map_err(|e| {
            ApiError::new(
                ErrorCode::NotFound,
                format!(
                    "no logs for {service} slot {slot} on {}: {e}",
                    self.machine_id()
                ),
            )
        })?;
        Ok(last_lines(&all, tail.clamp(1, MAX_LOG_TAIL), MAX_LOG_BYTES))
    }
}

/// `service logs` found nothing to ask: the service has no instances at
/// all, or none with the slot asked for.
fn no_instance(name: &str, slot: Option<u32>, placed: usize) -> ApiError {
    match slot {
        Some(slot) if placed > 0 => ApiError::new(
            ErrorCode::NotFound,
            format!("service `{name}` has no instance with slot {slot}"),
        )
        .with_hint("`ployzctl service ls` shows the slots"),
        _ => ApiError::new(
            ErrorCode::NotFound,
            format!("service `{name}` has no instances (0 replicas): there are no logs to show"),
        )
        .with_hint(format!(
            "deploy it with `--replicas N` to run instances of `{name}`"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn logs_of_a_service_without_instances_say_so() {
        let e = no_instance("web", None, 0);
        assert_eq!(e.code, ErrorCode::NotFound);
        assert!(e.message.contains("has no instances"), "{}", e.message);
        assert!(!e.message.contains("slot"), "{}", e.message);
        assert!(no_instance("web", Some(3), 0)
            .message
            .contains("has no instances"));
        let e = no_instance("web", Some(3), 2);
        assert!(
            e.message.contains("no instance with slot 3"),
            "{}",
            e.message
        );
    }
}
