//! Who serves what (pure): from the machine, service and instance records,
//! the instances each service may route to (running, and healthy or
//! without a health check), the ports this machine publishes, and the
//! order in which a forwarder tries backends.

use ployz_api::ports::{PortClaim, PortOwner};
use ployz_api::*;
use std::collections::BTreeMap;
use std::net::Ipv4Addr;

/// One instance a service routes to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Backend {
    pub ip: Ipv4Addr,
    pub machine: String,
    pub slot: u32,
}

/// A published port and the service behind it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Published {
    pub port: PublishedPort,
    pub service: String,
}

/// What this machine's forwarders and resolver answer from.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Table {
    /// This machine listens on published ports (active, draining, standby).
    pub serving: bool,
    /// Every service (also those without ready instances), its ready
    /// instances ordered by slot.
    pub services: BTreeMap<String, Vec<Backend>>,
    pub ports: Vec<Published>,
}

/// Running, and healthy if its service has a check: the only instances
/// anything routes to.
pub fn ready(i: &InstanceRecord) -> bool {
    i.state == InstanceState::Running
        && matches!(i.health, InstanceHealth::None | InstanceHealth::Healthy)
}

/// Whether a machine in this lifecycle listens on published ports.
pub fn serves(l: Lifecycle) -> bool {
    matches!(
        l,
        Lifecycle::Active | Lifecycle::Draining | Lifecycle::Standby
    )
}

impl Table {
    pub fn build(
        me: &str,
        machines: &[MachineRecord],
        services: &[ServiceRecord],
        instances: &[InstanceRecord],
    ) -> Table {
        let serving = machines.iter().any(|m| m.id == me && serves(m.lifecycle));
        let mut out = BTreeMap::new();
        let mut ports = Vec::new();
        for s in services {
            // Only instances of a placement the service still has.
            let mut b: Vec<Backend> = instances
                .iter()
                .filter(|i| i.service == s.name && ready(i))
                .filter(|i| {
                    s.placements
                        .iter()
                        .any(|p| p.machine == i.machine && p.slot == i.slot)
                })
                .filter_map(|i| {
                    Some(Backend {
                        ip: i.overlay_ip.as_deref()?.parse().ok()?,
                        machine: i.machine.clone(),
                        slot: i.slot,
                    })
                })
                .collect();
            b.sort_by_key(|b| b.slot);
            out.insert(s.name.clone(), b);
            for p in &s.ports {
                ports.push(Published {
                    port: p.clone(),
                    service: s.name.clone(),
                });
            }
        }
        Table {
            serving,
            services: out,
            ports,
        }
    }

    pub fn backends(&self, service: &str) -> &[Backend] {
        self.services.get(service).map_or(&[], |b| b.as_slice())
    }

    /// The service publishing a port that needs the same host socket as `p`.
    pub fn owner_of(&self, p: &PublishedPort) -> Option<&str> {
        self.ports
            .iter()
            .find(|x| x.port.clashes(p))
            .map(|x| x.service.as_str())
    }
}

/// The order a connection tries backends in: this machine's instances
/// first, then the others; each group rotated by `turn` so connections
/// spread over the instances.
pub fn order(backends: &[Backend], me: &str, turn: usize) -> Vec<Ipv4Addr> {
    let rotate = |mut v: Vec<Ipv4Addr>| {
        if !v.is_empty() {
            let n = turn % v.len();
            v.rotate_left(n);
        }
        v
    };
    let (local, remote): (Vec<&Backend>, Vec<&Backend>) =
        backends.iter().partition(|b| b.machine == me);
    let mut out = rotate(local.iter().map(|b| b.ip).collect());
    out.extend(rotate(remote.iter().map(|b| b.ip).collect()));
    out
}

/// Services whose published ports clash with `wanted` (deployed as
/// `service`): `(port, owner)` for each clash with another service.
pub fn clashes<'a>(
    services: &'a [ServiceRecord],
    service: &str,
    wanted: &[PublishedPort],
) -> Vec<(PublishedPort, &'a str)> {
    let mut out = Vec::new();
    for w in wanted {
        for s in services.iter().filter(|s| s.name != service) {
            if s.ports.iter().any(|p| p.clashes(w)) {
                out.push((w.clone(), s.name.as_str()));
            }
        }
    }
    out
}

/// Claim records to write: key and new value (`None`: delete it).
pub type ClaimChanges = Vec<(String, Option<PortClaim>)>;

/// The claim records a service's write needs (issue 14: two deploys must
/// not both take a host port). `current` holds the claim record of every
/// key (`PublishedPort::claim_key`) that `old` or `new` touches, if it
/// exists. Returns the keys whose record changes and its new value (`None`:
/// delete it, nobody publishes that port any more), or the first of `new`'s
/// ports another service's claim clashes with, and that service.
pub fn claim_changes(
    service: &str,
    old: &[PublishedPort],
    new: &[PublishedPort],
    current: &std::collections::HashMap<String, PortClaim>,
) -> Result<ClaimChanges, (PublishedPort, String)> {
    let mut keys: Vec<String> = old.iter().chain(new).map(|p| p.claim_key()).collect();
    keys.sort();
    keys.dedup();
    let mut out = Vec::new();
    for key in keys {
        let cur = current.get(&key).cloned().unwrap_or_default();
        let mut next = PortClaim {
            owners: cur
                .owners
                .iter()
                .filter(|o| o.service != service)
                .cloned()
                .collect(),
        };
        for p in new.iter().filter(|p| p.claim_key() == key) {
            if let Some(o) = next
                .owners
                .iter()
                .find(|o| o.service != service && o.port.clashes(p))
            {
                return Err((p.clone(), o.service.clone()));
            }
            next.owners.push(PortOwner {
                service: service.to_string(),
                port: p.clone(),
            });
        }
        if next == cur {
            continue;
        }
        out.push((key, (!next.owners.is_empty()).then_some(next)));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn machine(id: &str, lifecycle: Lifecycle) -> MachineRecord {
        serde_json::from_value(serde_json::json!({
            "id": id, "hostname": id, "lifecycle": lifecycle, "authority": "storage",
            "region": "r", "region_role": "primary", "runtime": "host", "identity_key": "k", "endpoints": [], "overlay_ip": "10.101.1.1", "subnet": "10.101.1.0/24",
            "wg_public_key": "k", "peer_addr": "10.101.1.1:7101", "version": "v",
            "created_at_ms": 0, "updated_at_ms": 0
        }))
        .unwrap()
    }

    fn service(name: &str, placements: &[(&str, u32)], ports: &[&str]) -> ServiceRecord {
        serde_json::from_value(serde_json::json!({
            "name": name,
            "image": {"reference": "x", "digest": null, "size": 0},
            "replicas": placements.len(),
            "placements": placements.iter().map(|(m, s)| serde_json::json!({"machine": m, "slot": s})).collect::<Vec<_>>(),
            "generation": 1, "created_at_ms": 0, "updated_at_ms": 0,
            "ports": ports.iter().map(|p| parse_publish(p).unwrap()).collect::<Vec<_>>(),
        }))
        .unwrap()
    }

    fn instance(
        svc: &str,
        m: &str,
        slot: u32,
        state: InstanceState,
        health: InstanceHealth,
    ) -> InstanceRecord {
        InstanceRecord {
            service: svc.into(),
            machine: m.into(),
            state,
            overlay_ip: Some(format!("10.101.{}.{}", slot + 1, 2)),
            slot,
            generation: 1,
            error: None,
            updated_at_ms: 0,
            exit_code: None,
            exited_at_ms: None,
            restarts: 0,
            last_output: vec![],
            health,
            health_output: None,
            killed_unhealthy: false,
        }
    }

    use ployz_api::ports::parse_publish;
    use InstanceHealth as H;
    use InstanceState as S;

    #[test]
    fn only_running_healthy_or_unchecked_instances_of_placements_serve() {
        let services = [service(
            "web",
            &[("a", 0), ("b", 1), ("c", 2), ("a", 3)],
            &["8080:80"],
        )];
        let instances = [
            instance("web", "a", 0, S::Running, H::Healthy),
            instance("web", "b", 1, S::Running, H::Unhealthy),
            instance("web", "c", 2, S::Running, H::Starting),
            instance("web", "a", 3, S::Failed, H::None),
            instance("web", "b", 9, S::Running, H::Healthy), // no placement
            instance("db", "a", 0, S::Running, H::None),
        ];
        let t = Table::build(
            "a",
            &[machine("a", Lifecycle::Active)],
            &services,
            &instances,
        );
        assert!(t.serving);
        let slots: Vec<u32> = t.backends("web").iter().map(|b| b.slot).collect();
        assert_eq!(slots, [0]);
        assert!(t.backends("db").is_empty());
        assert_eq!(t.ports.len(), 1);
        assert_eq!(
            t.owner_of(&parse_publish("8080:9/tcp").unwrap()),
            Some("web")
        );
        assert_eq!(t.owner_of(&parse_publish("8080:9/udp").unwrap()), None);
    }

    #[test]
    fn draining_and_standby_machines_serve_leaving_and_unknown_ones_do_not() {
        for (l, serving) in [
            (Lifecycle::Active, true),
            (Lifecycle::Draining, true),
            (Lifecycle::Standby, true),
            (Lifecycle::Joining, false),
            (Lifecycle::Leaving, false),
        ] {
            assert_eq!(
                Table::build("a", &[machine("a", l)], &[], &[]).serving,
                serving
            );
        }
        assert!(!Table::build("gone", &[machine("a", Lifecycle::Active)], &[], &[]).serving);
    }

    #[test]
    fn local_backends_come_first_and_turns_rotate_each_group() {
        let b = |ip: [u8; 4], m: &str| Backend {
            ip: ip.into(),
            machine: m.into(),
            slot: 0,
        };
        let all = [
            b([10, 0, 0, 1], "x"),
            b([10, 0, 0, 2], "me"),
            b([10, 0, 0, 3], "y"),
        ];
        let ips = |v: Vec<Ipv4Addr>| v.iter().map(|i| i.octets()[3]).collect::<Vec<_>>();
        assert_eq!(ips(order(&all, "me", 0)), [2, 1, 3]);
        assert_eq!(ips(order(&all, "me", 1)), [2, 3, 1]);
        assert_eq!(ips(order(&all, "other", 2)), [3, 1, 2]);
        assert!(order(&[], "me", 5).is_empty());
    }

    #[test]
    fn clashes_name_other_services_only() {
        let services = [
            service("web", &[], &["8080:80"]),
            service("api", &[], &["9000:80/udp"]),
        ];
        let want = [parse_publish("8080:81").unwrap()];
        assert!(clashes(&services, "web", &want).is_empty());
        let got = clashes(&services, "other", &want);
        assert_eq!(got[0].1, "web");
        let want = [parse_publish("9000:1/udp").unwrap()];
        assert_eq!(clashes(&services, "web", &want)[0].1, "api");
    }

    #[test]
    fn port_claims_are_taken_kept_and_released() {
        use std::collections::HashMap;
        let p = |s: &str| parse_publish(s).unwrap();
        let none = HashMap::new();
        // A first claim creates the record.
        let ch = claim_changes("web", &[], &[p("8080:80")], &none).unwrap();
        assert_eq!(ch.len(), 1);
        assert_eq!(ch[0].0, "tcp-8080");
        let web = ch[0].1.clone().unwrap();
        assert_eq!(web.owners[0].service, "web");
        let cur: HashMap<String, PortClaim> = [("tcp-8080".to_string(), web.clone())].into();
        // Another service is refused, naming the owner; UDP on the same
        // port, or another address next to a specific one, is not a clash.
        let err = claim_changes("api", &[], &[p("8080:81")], &cur).unwrap_err();
        assert_eq!((err.0, err.1.as_str()), (p("8080:81"), "web"));
        assert!(claim_changes("api", &[], &[p("8080:81/udp")], &cur).is_ok());
        let one_ip: HashMap<String, PortClaim> = [(
            "tcp-8080".to_string(),
            claim_changes("web", &[], &[p("10.0.0.1:8080:80")], &none).unwrap()[0]
                .1
                .clone()
                .unwrap(),
        )]
        .into();
        let both = claim_changes("api", &[], &[p("10.0.0.2:8080:80")], &one_ip).unwrap();
        assert_eq!(both[0].1.as_ref().unwrap().owners.len(), 2);
        assert_eq!(
            claim_changes("api", &[], &[p("8080:80")], &one_ip)
                .unwrap_err()
                .1,
            "web"
        );
        // The owner redeploying the same port changes nothing; moving it
        // releases the old record and takes the new one.
        assert!(claim_changes("web", &[p("8080:80")], &[p("8080:80")], &cur)
            .unwrap()
            .is_empty());
        let moved = claim_changes("web", &[p("8080:80")], &[p("9090:80")], &cur).unwrap();
        assert_eq!(
            moved
                .iter()
                .map(|(k, v)| (k.as_str(), v.is_some()))
                .collect::<Vec<_>>(),
            vec![("tcp-8080", false), ("tcp-9090", true)]
        );
        // A legacy record (ports but no claim yet) gets its claim written.
        assert_eq!(
            claim_changes("web", &[p("8080:80")], &[p("8080:80")], &none).unwrap()[0].0,
            "tcp-8080"
        );
        // Removing the service releases its claims.
        assert_eq!(
            claim_changes("web", &[p("8080:80")], &[], &cur).unwrap(),
            vec![("tcp-8080".to_string(), None)]
        );
    }
}
