//! Rendering: aligned tables for people, the API's own JSON for scripts.

use crate::client::ClientError;
use ployz_api::*;
use serde::Serialize;

fn print_json<T: Serialize>(v: &T) {
    println!(
        "{}",
        serde_json::to_string_pretty(v).expect("responses serialise")
    );
}

/// Print rows as left-aligned columns separated by three spaces.
pub fn table(headers: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.len()).collect();
    for r in rows {
        for (w, c) in widths.iter_mut().zip(r) {
            *w = (*w).max(c.chars().count());
        }
    }
    let mut out = String::new();
    let mut line = |cells: Vec<&str>| {
        let mut l = String::new();
        for (i, (c, w)) in cells.iter().zip(&widths).enumerate() {
            if i + 1 == cells.len() {
                l.push_str(c);
            } else {
                l.push_str(&format!("{c:<w$}   ", w = *w));
            }
        }
        out.push_str(l.trim_end());
        out.push('\n');
    };
    line(headers.to_vec());
    for r in rows {
        line(r.iter().map(String::as_str).collect());
    }
    out
}

/// A table column: its header and the cell it shows for a row.
type Column<T> = (&'static str, fn(&T) -> String);

/// `rows` as a [`table`] with `columns`.
fn table_of<T>(rows: &[T], columns: &[Column<T>]) -> String {
    let headers: Vec<&str> = columns.iter().map(|(h, _)| *h).collect();
    let cells: Vec<Vec<String>> = rows
        .iter()
        .map(|r| columns.iter().map(|(_, cell)| cell(r)).collect())
        .collect();
    table(&headers, &cells)
}

fn opt(s: &Option<String>) -> String {
    s.clone().unwrap_or_else(|| "-".into())
}

fn ok_or_failed(ok: bool) -> String {
    if ok { "ok" } else { "FAILED" }.into()
}

const MACHINE_COLUMNS: [Column<MachineView>; 9] = [
    ("ID", |m| m.id.clone()),
    ("LIFECYCLE", |m| m.lifecycle.to_string()),
    ("AUTHORITY", |m| m.authority.to_string()),
    ("REGION", |m| m.region.clone()),
    ("REGION ROLE", |m| m.region_role.to_string()),
    ("OVERLAY IP", |m| m.overlay_ip.clone()),
    ("SUBNET", |m| m.subnet.clone()),
    ("VERSION", |m| m.version.clone()),
    ("CREATED", |m| m.created_at.clone()),
];

const INVITE_COLUMNS: [Column<InviteView>; 4] = [
    ("INVITE ID", |i| i.invite_id.clone()),
    ("STATUS", |i| i.status.to_string()),
    ("EXPIRES AT", |i| i.expires_at.clone()),
    ("CONSUMED BY", |i| opt(&i.consumed_by)),
];

/// `machine storage promote`; `machine init/add/update` put TARGET first.
const RESULT_COLUMNS: [Column<TargetResult>; 4] = [
    ("MACHINE", |t| t.machine.clone()),
    ("RESULT", |t| ok_or_failed(t.ok)),
    ("STEP", |t| opt(&t.step)),
    ("DETAIL", |t| t.message.clone()),
];

const TARGET_COLUMN: Column<TargetResult> = ("TARGET", |t| opt(&t.target));

const RTT_COLUMNS: [Column<RttRow>; 4] = [
    ("MACHINE", |x| x.machine.clone()),
    ("PEER", |x| x.peer.clone()),
    ("MEDIAN", |x| {
        x.median_ms.map_or("-".into(), |m| format!("{m:.1}ms"))
    }),
    ("STDDEV", |x| {
        x.stddev_ms.map_or("-".into(), |s| format!("±{s:.1}ms"))
    }),
];

/// One row per instance; a service without instances gets one row of dashes.
type InstanceRow<'a> = (&'a ServiceView, Option<&'a InstanceView>);

fn service_columns<'a>() -> [Column<InstanceRow<'a>>; 12] {
    [
        ("PROJECT", |(s, _)| opt(&s.project)),
        ("SERVICE", |(s, _)| s.name.clone()),
        ("IMAGE", |(s, _)| s.image.clone()),
        ("REPLICAS", |(s, _)| s.replicas.to_string()),
        ("PORTS", |(s, _)| {
            if s.ports.is_empty() {
                "-".into()
            } else {
                s.ports.join(",")
            }
        }),
        ("MACHINE", |(_, i)| {
            i.map_or("-".into(), |i| i.machine.clone())
        }),
        ("SLOT", |(_, i)| {
            i.map_or("-".into(), |i| i.slot.to_string())
        }),
        ("STATE", |(_, i)| {
            i.map_or("-".into(), |i| {
                if i.unreachable {
                    format!("{} (machine unreachable)", i.state)
                } else {
                    i.state.to_string()
                }
            })
        }),
        ("HEALTH", |(_, i)| {
            i.map_or("-".into(), |i| match i.health {
                InstanceHealth::None => "-".into(),
                h => h.to_string(),
            })
        }),
        // A crash loop shows here even while STATE reads running.
        ("RESTARTS", |(_, i)| {
            i.map_or("-".into(), |i| i.restarts.to_string())
        }),
        ("LAST EXIT", |(_, i)| {
            i.and_then(|i| i.exit_code)
                .map_or("-".into(), |c| c.to_string())
        }),
        ("OVERLAY IP", |(_, i)| {
            i.map_or("-".into(), |i| opt(&i.overlay_ip))
        }),
    ]
}

fn services_table(services: &[ServiceView]) -> String {
    let rows: Vec<InstanceRow> = services
        .iter()
        .flat_map(|s| {
            let none = s.instances.is_empty().then_some((s, None));
            none.into_iter()
                .chain(s.instances.iter().map(move |i| (s, Some(i))))
        })
        .collect();
    table_of(&rows, &service_columns())
}

fn targets_table(results: &[TargetResult]) -> String {
    let mut columns = vec![TARGET_COLUMN];
    columns.extend(RESULT_COLUMNS);
    table_of(results, &columns)
}

pub fn print_response(resp: &Response, json: bool) {
    match resp {
        Response::Status(s) => {
            if json {
                return print_json(s);
            }
            println!("machine:   {} (ployzd {})", s.machine_id, s.version);
            match &s.network {
                Some(n) => {
                    println!("network:   {} ({})", n.name, n.network_id);
                    println!("range:     {}", n.cidr);
                    println!("founder:   {}", n.founder);
                    println!("replicas:  {}", n.storage_replicas);
                    println!("created:   {}", n.created_at);
                }
                None => println!(
                    "network:   none (create one with `ployzctl mesh init <network>` or join with `ployzctl machine invite import --token <token>`)"
                ),
            }
            if let Some(m) = &s.machine {
                println!(
                    "this:      {} {} overlay {} subnet {}",
                    m.lifecycle, m.authority, m.overlay_ip, m.subnet
                );
            }
            let st = &s.store;
            println!(
                "store:     {} term {} leader {} applied {} snapshot {} voters [{}]",
                st.role,
                st.term,
                opt(&st.leader),
                st.last_applied.map_or("-".into(), |i| i.to_string()),
                st.snapshot_index.map_or("-".into(), |i| i.to_string()),
                st.voters.join(", ")
            );
            if let Some(e) = &st.error {
                println!("warning:   {e} (network and machine above are this machine's last known copies)");
            }
        }
        Response::Machines(list) => {
            if json {
                return print_json(list);
            }
            print!("{}", table_of(&list.machines, &MACHINE_COLUMNS));
        }
        Response::Machine(r) => {
            if json {
                return print_json(r);
            }
            if r.changed {
                println!(
                    "machine {}: {} -> {}",
                    r.machine.id, r.previous, r.machine.lifecycle
                );
            } else {
                println!(
                    "machine {} is already {}",
                    r.machine.id, r.machine.lifecycle
                );
            }
            if !r.workloads.is_empty() {
                println!(
                    "still running there (not moved): {}",
                    r.workloads.join(", ")
                );
            }
        }
        Response::InviteCreated(i) => {
            if json {
                return print_json(i);
            }
            println!("invite:  {}", i.invite_id);
            println!("expires: {}", i.expires_at);
            println!("token:   {}", i.token);
            println!();
            println!("On the joining machine run:");
            println!("  ployzctl machine invite import --token {}", i.token);
        }
        Response::Invites(list) => {
            if json {
                return print_json(list);
            }
            print!("{}", table_of(&list.invites, &INVITE_COLUMNS));
        }
        Response::Invite(i) => {
            if json {
                return print_json(i);
            }
            println!("invite {} is {}", i.invite_id, i.status);
        }
        Response::Services(l) => {
            if json {
                return print_json(l);
            }
            print!("{}", services_table(&l.services));
        }
        Response::Service(v) => {
            if json {
                return print_json(v);
            }
            print!("{}", services_table(std::slice::from_ref(v.as_ref())));
            for i in v.not_ready() {
                let what = if i.state == InstanceState::Running {
                    i.health.to_string()
                } else {
                    i.state.to_string()
                };
                let why = i.error.as_ref().or(i.health_output.as_ref());
                eprintln!(
                    "warning: slot {} on {} is {what}{}",
                    i.slot,
                    i.machine,
                    why.map(|e| format!(": {e}")).unwrap_or_default()
                );
            }
        }
        Response::Logs(l) => {
            if json {
                return print_json(l);
            }
            let many = l.instances.len() > 1;
            for i in &l.instances {
                if many {
                    println!("==> {} slot {} on {} <==", l.name, i.slot, i.machine);
                }
                print!("{}", i.logs);
                if let Some(e) = &i.error {
                    eprintln!("warning: slot {} on {}: {e}", i.slot, i.machine);
                }
            }
        }
        Response::ServiceRemoved(r) => {
            if json {
                return print_json(r);
            }
            println!(
                "service {} removed{}",
                r.name,
                if r.removed_on.is_empty() {
                    String::new()
                } else {
                    format!("; instances stopped on {}", r.removed_on.join(", "))
                }
            );
            if !r.pending_on.is_empty() {
                eprintln!(
                    "warning: not confirmed yet by {} (they remove their instances when they next reach the store)",
                    r.pending_on.join(", ")
                );
            }
        }
        Response::Targets(r) => {
            if json {
                return print_json(r);
            }
            print!("{}", targets_table(&r.results));
        }
        Response::Rtt(r) => {
            if json {
                return print_json(r);
            }
            print!("{}", table_of(&r.rows, &RTT_COLUMNS));
            for w in &r.warnings {
                eprintln!("warning: {w}");
            }
        }
        Response::Nats(n) => {
            if json {
                return print_json(n);
            }
            println!("{}", n.url);
        }
        Response::Promoted(r) => {
            if json {
                return print_json(r);
            }
            print!("{}", table_of(&r.results, &RESULT_COLUMNS));
            println!(
                "storage set ({} of --replicas {}): {}",
                r.voters.len(),
                r.replicas,
                r.voters.join(", ")
            );
        }
        Response::Removed(r) => {
            if json {
                return print_json(r);
            }
            println!(
                "machine {} removed{}{}",
                r.machine,
                if r.cleaned_up {
                    " (it stopped its workloads, left the mesh and deleted its state)"
                } else {
                    " (its records are deleted; the machine did not confirm cleaning itself up)"
                },
                if r.left_storage {
                    "; it left the storage set"
                } else {
                    ""
                }
            );
        }
        Response::Operations(l) => {
            if json {
                return print_json(l);
            }
            print!("{}", ops_table(&l.operations));
        }
        Response::Routes(l) => {
            if json {
                return print_json(l);
            }
            if l.routes.is_empty() {
                println!("no routes (ployzctl route add HOSTNAME --service S --port P)");
                return;
            }
            println!(
                "{:<32} {:<16} {:<20} {:<6} {:<5} {:<9} CERTIFICATE",
                "HOST", "PATH", "SERVICE", "PORT", "TLS", "BACKENDS"
            );
            for r in &l.routes {
                println!(
                    "{:<32} {:<16} {:<20} {:<6} {:<5} {:<9} {}",
                    r.host,
                    r.path,
                    r.service,
                    r.port,
                    r.tls.as_str(),
                    r.backends,
                    match (r.tls, &r.certificate_expires) {
                        (ployz_api::RouteTls::Off, _) => "-".to_string(),
                        (_, Some(t)) => format!("expires {t}"),
                        (_, None) => "pending".to_string(),
                    }
                );
            }
        }
        Response::Acme(a) => {
            if json {
                return print_json(a);
            }
            match (&a.directory, &a.email) {
                (Some(d), Some(e)) => println!(
                    "directory {d}\nemail     {e}\nchallenge {}{}",
                    a.challenge.as_str(),
                    if a.custom_ca {
                        "\nca        custom roots"
                    } else {
                        ""
                    }
                ),
                _ => println!("ACME is not set (ployzctl acme set --email E [--directory URL])"),
            }
            for c in &a.certificates {
                println!("certificate {:<32} expires {}", c.host, c.not_after);
            }
        }
        // --- NATS app users (issue 17) ---
        Response::NatsUser(u) => {
            if json {
                return print_json(u);
            }
            println!("{}", u.url);
        }
        Response::NatsUsers(l) => {
            if json {
                return print_json(l);
            }
            if l.users.is_empty() {
                println!("no NATS users (ployzctl nats user add NAME --allow-pub SUBJ …)");
            }
            for u in &l.users {
                let mut grants = Vec::new();
                grants.extend(u.allow_pub.iter().map(|s| format!("pub {s}")));
                grants.extend(u.allow_sub.iter().map(|s| format!("sub {s}")));
                grants.extend(u.kv_buckets.iter().map(|b| format!("kv {b}")));
                println!("{:<24} {}", u.user, grants.join(", "));
            }
        }
        // --- end NATS app users ---
        Response::Registries(l) => {
            if json {
                return print_json(l);
            }
            if l.registries.is_empty() {
                println!(
                    "no registries (ployzctl registry add HOST --insecure, or registry login)"
                );
            }
            for r in &l.registries {
                println!(
                    "{:<30} {:<8} {}",
                    r.host,
                    if r.insecure { "http" } else { "https" },
                    r.username
                        .as_deref()
                        .map(|u| format!("user {u}"))
                        .unwrap_or_else(|| "anonymous".into())
                );
            }
        }
        Response::Dashboard(d) => {
            if json {
                return print_json(d);
            }
            println!("{}", d.url);
            println!("(the link logs in once, within 5 minutes; the dashboard listens on this machine only unless ployzd runs with --ui-listen)");
        }
        Response::Doctor(r) => {
            if json {
                return print_json(r);
            }
            print!("{}", doctor_table(r));
        }
        Response::Left(l) => {
            if json {
                return print_json(l);
            }
            println!(
                "machine {} left network `{}`: {} workload(s) stopped and deleted; ployzd stops and deletes this machine's state (start it again to join a network)",
                l.machine, l.network, l.removed_workloads
            );
        }
        Response::Operation(op) => {
            if json {
                return print_json(op);
            }
            println!(
                "operation {} ({} {}) {} at step {}: {}",
                op.id, op.kind, op.subject, op.state, op.step, op.message
            );
        }
    }
}

/// `op ls`: ID, KIND, SUBJECT, STATE, STEP, OWNER, STARTED, MESSAGE.
fn ops_table(ops: &[OpView]) -> String {
    let rows: Vec<Vec<String>> = ops
        .iter()
        .map(|o| {
            vec![
                o.id.clone(),
                o.kind.to_string(),
                o.subject.clone(),
                o.state.to_string(),
                o.step.clone(),
                o.owner.clone(),
                o.started_at.clone(),
                o.message.clone(),
            ]
        })
        .collect();
    table(
        &[
            "ID", "KIND", "SUBJECT", "STATE", "STEP", "OWNER", "STARTED", "MESSAGE",
        ],
        &rows,
    )
}

/// `status`: one line per check, then the hints of those not ok.
pub fn doctor_table(r: &ployz_api::DoctorReport) -> String {
    let rows: Vec<Vec<String>> = r
        .checks
        .iter()
        .map(|c| vec![c.check.clone(), c.status.to_string(), c.message.clone()])
        .collect();
    let mut out = format!("machine {} (ployzd {})\n", r.machine_id, r.version);
    out.push_str(&table(&["CHECK", "STATUS", "DETAIL"], &rows));
    for c in r.checks.iter().filter(|c| c.hint.is_some()) {
        out.push_str(&format!(
            "{} {}: {}\n",
            c.status,
            c.check,
            c.hint.as_deref().unwrap_or_default()
        ));
    }
    out
}

/// Whether a multi-target answer reports a failed target.
pub fn has_failures(resp: &Response) -> bool {
    match resp {
        Response::Promoted(r) => r.results.iter().any(|t| !t.ok),
        Response::Targets(r) => r.results.iter().any(|t| !t.ok),
        Response::Service(v) => !v.not_ready().is_empty(),
        Response::ServiceRemoved(r) => !r.pending_on.is_empty(),
        Response::Logs(l) => l.instances.iter().any(|i| i.error.is_some()),
        _ => false,
    }
}

#[derive(Serialize)]
struct JsonError<'a> {
    error: &'a ApiError,
}

pub fn print_error(e: &ApiError, json: bool) {
    if json {
        print_json(&JsonError { error: e });
    } else {
        eprintln!("error: {}", e.message);
        if let Some(h) = &e.hint {
            eprintln!("hint: {h}");
        }
    }
}

pub fn print_client_error(e: &ClientError, json: bool) {
    let code = match e {
        ClientError::NoDaemon { .. } => "no_daemon",
        ClientError::Denied { .. } => "permission_denied",
        ClientError::Protocol(_) => "internal",
    };
    if json {
        print_json(&serde_json::json!({
            "error": { "code": code, "message": e.message(), "hint": e.hint() }
        }));
    } else {
        eprintln!("error: {}", e.message());
        if let Some(h) = e.hint() {
            eprintln!("hint: {h}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_aligns_columns() {
        let t = table(
            &["ID", "STATE"],
            &[
                vec!["a".into(), "active".into()],
                vec!["long-id".into(), "x".into()],
            ],
        );
        assert_eq!(t, "ID        STATE\na         active\nlong-id   x\n");
    }

    #[test]
    fn table_counts_characters_and_trims_empty_last_cells() {
        let t = table(
            &["A", "B", "C"],
            &[
                vec!["±1.0ms".into(), "".into(), "".into()],
                vec!["x".into(), "yy".into(), "z".into()],
            ],
        );
        assert_eq!(t, "A        B    C\n±1.0ms\nx        yy   z\n");
    }

    #[test]
    fn table_of_takes_headers_and_cells_from_columns() {
        const COLUMNS: [Column<(u32, &str)>; 2] =
            [("N", |r| r.0.to_string()), ("NAME", |r| r.1.to_string())];
        assert_eq!(
            table_of(&[(1, "one"), (10, "ten")], &COLUMNS),
            "N    NAME\n1    one\n10   ten\n"
        );
        assert_eq!(table_of(&[], &COLUMNS), "N   NAME\n");
    }

    fn machine(id: &str, lifecycle: Lifecycle, authority: Authority) -> MachineView {
        MachineView {
            id: id.into(),
            hostname: "h".into(),
            lifecycle,
            authority,
            region: "eu-west".into(),
            region_role: RegionRole::Primary,
            overlay_ip: "10.101.1.1".into(),
            subnet: "10.101.1.0/24".into(),
            version: "0.1.0".into(),
            runtime: "host".into(),
            endpoints: vec![],
            peer_addr: "10.0.0.1:7100".into(),
            wg_public_key: "k".into(),
            created_at: "2025-01-01T00:00:00Z".into(),
            updated_at: "2025-01-01T00:00:00Z".into(),
        }
    }

    #[test]
    fn machine_table() {
        let list = [
            machine("a1b2c3d4e5f6", Lifecycle::Active, Authority::Storage),
            machine("0f0f0f0f0f0f", Lifecycle::Standby, Authority::Compute),
        ];
        assert_eq!(
            table_of(&list, &MACHINE_COLUMNS),
            "\
ID             LIFECYCLE   AUTHORITY   REGION    REGION ROLE   OVERLAY IP   SUBNET          VERSION   CREATED
a1b2c3d4e5f6   active      storage     eu-west   primary       10.101.1.1   10.101.1.0/24   0.1.0     2025-01-01T00:00:00Z
0f0f0f0f0f0f   standby     compute     eu-west   primary       10.101.1.1   10.101.1.0/24   0.1.0     2025-01-01T00:00:00Z
"
        );
    }

    #[test]
    fn invite_table() {
        let invite = |id: &str, status, consumed_by: Option<&str>| InviteView {
            invite_id: id.into(),
            status,
            issuer: "a1b2c3d4e5f6".into(),
            created_at: "2025-01-01T00:00:00Z".into(),
            expires_at: "2025-01-02T00:00:00Z".into(),
            consumed_by: consumed_by.map(str::to_string),
            revoked_at: None,
        };
        let list = [
            invite("inv1", InviteStatus::Active, None),
            invite("inv2", InviteStatus::Consumed, Some("0f0f0f0f0f0f")),
        ];
        assert_eq!(
            table_of(&list, &INVITE_COLUMNS),
            "\
INVITE ID   STATUS     EXPIRES AT             CONSUMED BY
inv1        active     2025-01-02T00:00:00Z   -
inv2        consumed   2025-01-02T00:00:00Z   0f0f0f0f0f0f
"
        );
    }

    fn result(machine: &str, ok: bool, target: Option<&str>, step: Option<&str>) -> TargetResult {
        TargetResult {
            machine: machine.into(),
            ok,
            target: target.map(str::to_string),
            step: step.map(str::to_string),
            message: if ok { "joined" } else { "ssh refused" }.into(),
        }
    }

    #[test]
    fn promote_and_target_tables() {
        let promoted = [
            result("a1b2c3d4e5f6", true, None, None),
            result("0f0f0f0f0f0f", false, None, Some("catch-up")),
        ];
        assert_eq!(
            table_of(&promoted, &RESULT_COLUMNS),
            "\
MACHINE        RESULT   STEP       DETAIL
a1b2c3d4e5f6   ok       -          joined
0f0f0f0f0f0f   FAILED   catch-up   ssh refused
"
        );
        let targets = [
            result("a1b2c3d4e5f6", true, Some("root@10.0.0.2"), None),
            result("-", false, Some("root@10.0.0.3"), Some("connect")),
        ];
        assert_eq!(
            targets_table(&targets),
            "\
TARGET          MACHINE        RESULT   STEP      DETAIL
root@10.0.0.2   a1b2c3d4e5f6   ok       -         joined
root@10.0.0.3   -              FAILED   connect   ssh refused
"
        );
    }

    #[test]
    fn rtt_table() {
        let row = |peer: &str, median_ms, stddev_ms| RttRow {
            machine: "a1b2c3d4e5f6".into(),
            peer: peer.into(),
            median_ms,
            stddev_ms,
            samples: 5,
            error: None,
        };
        let rows = [
            row("0f0f0f0f0f0f", Some(0.34), Some(0.04)),
            row("b", None, None),
        ];
        assert_eq!(
            table_of(&rows, &RTT_COLUMNS),
            "\
MACHINE        PEER           MEDIAN   STDDEV
a1b2c3d4e5f6   0f0f0f0f0f0f   0.3ms    ±0.0ms
a1b2c3d4e5f6   b              -        -
"
        );
    }

    #[test]
    fn service_table_has_a_row_per_instance_and_one_for_a_service_without() {
        let instance =
            |machine: &str, slot, state, overlay_ip: Option<&str>, unreachable| InstanceView {
                machine: machine.into(),
                slot,
                state,
                overlay_ip: overlay_ip.map(str::to_string),
                error: None,
                exit_code: None,
                exited_at: None,
                restarts: 0,
                unreachable,
                generation: Some(1),
                health: InstanceHealth::None,
                health_output: None,
            };
        let service = |name: &str, replicas, instances| ServiceView {
            name: name.into(),
            project: None,
            image: "web:1".into(),
            digest: None,
            manifest_digest: None,
            replicas,
            generation: 1,
            volumes: vec![],
            health_check: None,
            ports: vec![],
            instances,
        };
        let services = [
            service(
                "web",
                2,
                vec![
                    instance(
                        "a1b2c3d4e5f6",
                        0,
                        InstanceState::Running,
                        Some("10.101.1.2"),
                        false,
                    ),
                    InstanceView {
                        exit_code: Some(3),
                        exited_at: Some("2026-11-27T12:05:18Z".into()),
                        restarts: 4,
                        health: InstanceHealth::Unhealthy,
                        ..instance("0f0f0f0f0f0f", 1, InstanceState::Running, None, true)
                    },
                ],
            ),
            service("idle", 0, vec![]),
        ];
        assert_eq!(
            services_table(&services),
            "\
PROJECT   SERVICE   IMAGE   REPLICAS   PORTS   MACHINE        SLOT   STATE                           HEALTH      RESTARTS   LAST EXIT   OVERLAY IP
-         web       web:1   2          -       a1b2c3d4e5f6   0      running                         -           0          -           10.101.1.2
-         web       web:1   2          -       0f0f0f0f0f0f   1      running (machine unreachable)   unhealthy   4          3           -
-         idle      web:1   0          -       -              -      -                               -           -          -           -
"
        );
    }
}
