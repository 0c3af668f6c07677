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

fn opt(s: &Option<String>) -> String {
    s.clone().unwrap_or_else(|| "-".into())
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
            let rows: Vec<Vec<String>> = list
                .machines
                .iter()
                .map(|m| {
                    vec![
                        m.id.clone(),
                        m.lifecycle.to_string(),
                        m.authority.to_string(),
                        m.region.clone(),
                        m.region_role.to_string(),
                        m.overlay_ip.clone(),
                        m.subnet.clone(),
                        m.version.clone(),
                        m.created_at.clone(),
                    ]
                })
                .collect();
            print!(
                "{}",
                table(
                    &[
                        "ID",
                        "LIFECYCLE",
                        "AUTHORITY",
                        "REGION",
                        "REGION ROLE",
                        "OVERLAY IP",
                        "SUBNET",
                        "VERSION",
                        "CREATED"
                    ],
                    &rows
                )
            );
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
            let rows: Vec<Vec<String>> = list
                .invites
                .iter()
                .map(|i| {
                    vec![
                        i.invite_id.clone(),
                        i.status.to_string(),
                        i.expires_at.clone(),
                        opt(&i.consumed_by),
                    ]
                })
                .collect();
            print!(
                "{}",
                table(&["INVITE ID", "STATUS", "EXPIRES AT", "CONSUMED BY"], &rows)
            );
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
            for i in v.not_running() {
                eprintln!(
                    "warning: slot {} on {} is {}{}",
                    i.slot,
                    i.machine,
                    i.state,
                    i.error
                        .as_ref()
                        .map(|e| format!(": {e}"))
                        .unwrap_or_default()
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
            let rows: Vec<Vec<String>> = r
                .results
                .iter()
                .map(|t| {
                    vec![
                        t.target.clone().unwrap_or_else(|| "-".into()),
                        t.machine.clone(),
                        if t.ok { "ok".into() } else { "FAILED".into() },
                        t.step.clone().unwrap_or_else(|| "-".into()),
                        t.message.clone(),
                    ]
                })
                .collect();
            print!(
                "{}",
                table(&["TARGET", "MACHINE", "RESULT", "STEP", "DETAIL"], &rows)
            );
        }
        Response::Rtt(r) => {
            if json {
                return print_json(r);
            }
            let rows: Vec<Vec<String>> = r
                .rows
                .iter()
                .map(|x| {
                    vec![
                        x.machine.clone(),
                        x.peer.clone(),
                        x.median_ms.map_or("-".into(), |m| format!("{m:.1}ms")),
                        x.stddev_ms.map_or("-".into(), |s| format!("±{s:.1}ms")),
                    ]
                })
                .collect();
            print!("{}", table(&["MACHINE", "PEER", "MEDIAN", "STDDEV"], &rows));
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
            let rows: Vec<Vec<String>> = r
                .results
                .iter()
                .map(|t| {
                    vec![
                        t.machine.clone(),
                        if t.ok { "ok".into() } else { "FAILED".into() },
                        t.step.clone().unwrap_or_else(|| "-".into()),
                        t.message.clone(),
                    ]
                })
                .collect();
            print!("{}", table(&["MACHINE", "RESULT", "STEP", "DETAIL"], &rows));
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

/// Whether a multi-target answer reports a failed target.
/// One row per instance: SERVICE, IMAGE, REPLICAS, MACHINE, SLOT, STATE, OVERLAY IP.
fn services_table(services: &[ServiceView]) -> String {
    let mut rows = Vec::new();
    for s in services {
        if s.instances.is_empty() {
            rows.push(vec![
                s.name.clone(),
                s.image.clone(),
                s.replicas.to_string(),
                "-".into(),
                "-".into(),
                "-".into(),
                "-".into(),
            ]);
        }
        for i in &s.instances {
            rows.push(vec![
                s.name.clone(),
                s.image.clone(),
                s.replicas.to_string(),
                i.machine.clone(),
                i.slot.to_string(),
                if i.unreachable {
                    format!("{} (machine unreachable)", i.state)
                } else {
                    i.state.to_string()
                },
                opt(&i.overlay_ip),
            ]);
        }
    }
    table(
        &[
            "SERVICE",
            "IMAGE",
            "REPLICAS",
            "MACHINE",
            "SLOT",
            "STATE",
            "OVERLAY IP",
        ],
        &rows,
    )
}

pub fn has_failures(resp: &Response) -> bool {
    match resp {
        Response::Promoted(r) => r.results.iter().any(|t| !t.ok),
        Response::Targets(r) => r.results.iter().any(|t| !t.ok),
        Response::Service(v) => !v.not_running().is_empty(),
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
}
