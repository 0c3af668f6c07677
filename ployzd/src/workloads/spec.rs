//! Service specs as the API gives them, checked before anything is
//! written: names, environment, memory, volumes; and the names and
//! addresses derived from them (workload ids, bridges, instance IPs). Pure.

use super::*;

/// The last `n` lines of `s`, at most `max_bytes` of them (cut at a line
/// start, or at a character boundary for one huge line).
pub fn last_lines(s: &str, n: usize, max_bytes: usize) -> String {
    let mut start = s.len();
    let mut lines = 0;
    let body = s.strip_suffix('\n').unwrap_or(s);
    for (i, _) in body.match_indices('\n').rev() {
        lines += 1;
        if lines == n {
            start = i + 1;
            break;
        }
    }
    if lines < n {
        start = 0;
    }
    let mut out = &s[start..];
    if out.len() > max_bytes {
        let mut cut = out.len() - max_bytes;
        while !out.is_char_boundary(cut) {
            cut += 1;
        }
        out = &out[cut..];
        if let Some(nl) = out.find('\n') {
            if nl + 1 < out.len() {
                out = &out[nl + 1..];
            }
        }
    }
    out.to_string()
}

/// The last [`EXIT_OUTPUT_LINES`] non-empty lines of `log`, each cut to
/// [`EXIT_OUTPUT_LINE_CHARS`] characters: what an instance's record keeps
/// of its output when it exits.
pub fn output_tail(log: &str) -> Vec<String> {
    let mut lines: Vec<String> = log
        .lines()
        .rev()
        .map(str::trim_end)
        .filter(|l| !l.is_empty())
        .take(EXIT_OUTPUT_LINES)
        .map(|l| match l.char_indices().nth(EXIT_OUTPUT_LINE_CHARS) {
            Some((cut, _)) => format!("{}…", &l[..cut]),
            None => l.to_string(),
        })
        .collect();
    lines.reverse();
    lines
}

/// How an instance exited, for people: `exited with code 3 (restarted 2
/// times); last output:` and the lines, indented. `None` if it never exited
/// in its generation.
pub fn exit_summary(i: &InstanceRecord) -> Option<String> {
    i.exited_at_ms?;
    let mut s = match i.exit_code {
        _ if i.killed_unhealthy => format!(
            "unhealthy, restarted by its machine; last probe: {}",
            i.health_output.as_deref().unwrap_or("(no output)")
        ),
        Some(c) if (129..=128 + 64).contains(&c) => {
            format!("exited with code {c} (signal {})", c - 128)
        }
        Some(c) => format!("exited with code {c}"),
        None => "exited (exit code unknown)".to_string(),
    };
    match i.restarts {
        0 => {}
        1 => s.push_str(" (restarted 1 time)"),
        n => s.push_str(&format!(" (restarted {n} times)")),
    }
    if i.last_output.is_empty() {
        s.push_str("; it wrote no output");
    } else {
        s.push_str("; last output:");
        for line in &i.last_output {
            s.push_str("\n    ");
            s.push_str(line);
        }
    }
    Some(s)
}

// ---------------------------------------------------------------------------
// Validation (pure)

pub fn validate_service_name(name: &str) -> Result<(), ApiError> {
    crate::errors::validate_label("service name", name, MAX_SERVICE_NAME)
}

pub(super) fn no_such_service(name: &str) -> ApiError {
    ApiError::new(ErrorCode::NotFound, format!("no service named `{name}`"))
        .with_hint("`ployzctl service ls` lists the services")
}

pub fn validate_volume_name(name: &str) -> Result<(), ApiError> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name.as_bytes()[0].is_ascii_alphanumeric()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(invalid(format!(
            "invalid volume name `{name}`: use 1-64 characters of [A-Za-z0-9_.-] starting with a letter or digit"
        )))
    }
}

/// `KEY=VALUE` pairs.
pub fn parse_env(env: &[String]) -> Result<Vec<(String, String)>, ApiError> {
    let mut out: Vec<(String, String)> = Vec::new();
    for e in env {
        let Some((k, v)) = e.split_once('=') else {
            return Err(invalid(format!(
                "-e `{e}` is not KEY=VALUE (for example -e PORT=8080)"
            )));
        };
        let ok = !k.is_empty()
            && !k.as_bytes()[0].is_ascii_digit()
            && k.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_');
        if !ok {
            return Err(invalid(format!(
                "-e `{e}`: `{k}` is not a variable name (letters, digits and '_', not starting with a digit)"
            )));
        }
        out.retain(|(old, _)| old != k);
        out.push((k.to_string(), v.to_string()));
    }
    Ok(out)
}

/// A memory size: bytes, or with a K, M or G suffix (powers of 1024).
pub fn parse_memory(s: &str) -> Result<u64, ApiError> {
    let t = s.trim();
    let (num, mult) = match t.chars().last().map(|c| c.to_ascii_uppercase()) {
        Some('K') => (&t[..t.len() - 1], 1u64 << 10),
        Some('M') => (&t[..t.len() - 1], 1 << 20),
        Some('G') => (&t[..t.len() - 1], 1 << 30),
        _ => (t, 1),
    };
    let bytes = num
        .parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(mult))
        .ok_or_else(|| {
            invalid(format!(
                "--memory `{s}` is not a size: use bytes or a number with K, M or G (e.g. 64M)"
            ))
        })?;
    if bytes < 4 << 20 {
        return Err(invalid(format!(
            "--memory `{s}` is below 4M: a workload needs at least that much"
        )));
    }
    Ok(bytes)
}

/// `volume:/path` pairs.
pub fn parse_volumes(vols: &[String]) -> Result<Vec<VolumeSpec>, ApiError> {
    let mut out: Vec<VolumeSpec> = Vec::new();
    for v in vols {
        let Some((name, target)) = v.split_once(':') else {
            return Err(invalid(format!(
                "-v `{v}` is not VOLUME:/PATH (for example -v data:/var/lib/data)"
            )));
        };
        validate_volume_name(name)?;
        if !target.starts_with('/') || target.split('/').any(|c| c == "..") {
            return Err(invalid(format!(
                "-v `{v}`: the mount point `{target}` must be an absolute path without '..'"
            )));
        }
        // `/a/`, `/a//` and `/a/.` are the mount point `/a`.
        let parts: Vec<&str> = target
            .split('/')
            .filter(|c| !c.is_empty() && *c != ".")
            .collect();
        let target = format!("/{}", parts.join("/"));
        if target == "/" {
            return Err(invalid(format!(
                "-v `{v}`: a volume cannot be mounted over the whole filesystem (/)"
            )));
        }
        if let Some(o) = out.iter().find(|o| o.target == target) {
            return Err(invalid(format!(
                "-v `{v}`: {target} is already the mount point of volume `{}`; give each mount point once",
                o.name
            )));
        }
        if out.iter().any(|o| o.name == name) {
            return Err(invalid(format!(
                "-v `{v}`: volume `{name}` is already mounted at {}; mount each volume once (migrate moves a volume with its one mount point)",
                out.iter().find(|o| o.name == name).map_or("", |o| o.target.as_str())
            )));
        }
        out.push(VolumeSpec {
            name: name.to_string(),
            target,
        });
    }
    Ok(out)
}

/// The runtime's id for instance `slot` of `service` on machine `machine`.
/// The machine prefix keeps ids apart when machines share one dockerd.
pub fn workload_id(machine: &str, service: &str, slot: u32) -> String {
    format!("{}{service}-{slot}", workload_prefix(machine))
}

pub(super) fn workload_prefix(machine: &str) -> String {
    format!("plz-{}-", &machine[..machine.len().min(8)])
}

/// The bridge workloads of a subnet attach to (≤ 15 characters).
pub fn bridge_name(subnet: Ipv4Addr) -> String {
    format!("plz{:08x}", u32::from(subnet))
}

/// First free workload address of a /24 (x.y.z.2 – x.y.z.253; .1 is the
/// machine's own overlay address and the workloads' gateway).
pub fn allocate_ip(subnet: Ipv4Addr, used: &HashSet<Ipv4Addr>) -> Option<Ipv4Addr> {
    let base = u32::from(subnet) & 0xffff_ff00;
    (2..=253)
        .map(|h| Ipv4Addr::from(base | h))
        .find(|ip| !used.contains(ip))
}

pub(super) fn parse_subnet(subnet: &str) -> Result<(Ipv4Addr, u8), ApiError> {
    let (a, p) = subnet
        .split_once('/')
        .ok_or_else(|| internal(format!("machine subnet `{subnet}` is malformed")))?;
    let addr: Ipv4Addr = a
        .parse()
        .map_err(|_| internal(format!("machine subnet `{subnet}` is malformed")))?;
    let prefix: u8 = p
        .parse()
        .map_err(|_| internal(format!("machine subnet `{subnet}` is malformed")))?;
    Ok((addr, prefix))
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;

    /// An unpaused, unpinned placement (fixture).
    pub(in crate::workloads) fn placement(machine: &str, slot: u32) -> Placement {
        Placement {
            machine: machine.into(),
            slot,
            paused: false,
            generation: None,
        }
    }

    pub(in crate::workloads) fn instance(generation: u64) -> InstanceRecord {
        InstanceRecord {
            service: "web".into(),
            machine: "m1".into(),
            state: InstanceState::Running,
            overlay_ip: None,
            slot: 0,
            generation,
            error: None,
            updated_at_ms: 1,
            exit_code: None,
            exited_at_ms: None,
            restarts: 0,
            last_output: vec![],
            health: InstanceHealth::None,
            health_output: None,
            killed_unhealthy: false,
        }
    }

    #[test]
    fn output_tail_keeps_the_last_lines_cut_short() {
        assert!(output_tail("").is_empty());
        assert_eq!(output_tail("one\n\ntwo  \n"), ["one", "two"]);
        let log: String = (0..25).map(|n| format!("line {n}\n")).collect();
        let tail = output_tail(&log);
        assert_eq!(tail.len(), EXIT_OUTPUT_LINES);
        assert_eq!(tail[0], "line 15");
        assert_eq!(tail[9], "line 24");
        let long = "é".repeat(EXIT_OUTPUT_LINE_CHARS + 5);
        let cut = &output_tail(&long)[0];
        assert_eq!(cut.chars().count(), EXIT_OUTPUT_LINE_CHARS + 1);
        assert!(cut.ends_with('…'));
    }

    #[test]
    fn exit_summary_names_code_restarts_and_output() {
        let mut i = instance(1);
        assert_eq!(exit_summary(&i), None, "never exited");
        i.exit_code = Some(3);
        assert_eq!(exit_summary(&i), None, "only an exit seen counts");
        i.exited_at_ms = Some(5);
        assert_eq!(
            exit_summary(&i).unwrap(),
            "exited with code 3; it wrote no output"
        );
        i.restarts = 2;
        i.last_output = vec!["starting".into(), "boom".into()];
        assert_eq!(
            exit_summary(&i).unwrap(),
            "exited with code 3 (restarted 2 times); last output:\n    starting\n    boom"
        );
        i.exit_code = Some(137);
        i.restarts = 1;
        assert!(exit_summary(&i)
            .unwrap()
            .starts_with("exited with code 137 (signal 9) (restarted 1 time)"));
        i.exit_code = None;
        assert!(exit_summary(&i)
            .unwrap()
            .starts_with("exited (exit code unknown)"));
        i.killed_unhealthy = true;
        i.health_output = Some("GET http://10.101.1.2:80/: cannot connect".into());
        assert!(exit_summary(&i).unwrap().starts_with(
            "unhealthy, restarted by its machine; last probe: GET http://10.101.1.2:80/: cannot connect (restarted 1 time); last output:"
        ));
    }

    #[test]
    fn names_and_ids() {
        validate_service_name("web-1").unwrap();
        for bad in ["", "-a", "a-", "Web", "a_b", &"x".repeat(41)] {
            assert!(validate_service_name(bad).is_err(), "{bad}");
        }
        let id = workload_id("0123456789ab", &"x".repeat(40), u32::MAX);
        assert!(id.len() <= 64, "{id}");
        ployz_runtime::validate_id(&id).unwrap();
        assert_eq!(workload_id("0123456789ab", "web", 3), "plz-01234567-web-3");
        assert_eq!(bridge_name(Ipv4Addr::new(10, 101, 3, 0)), "plz0a650300");
    }

    #[test]
    fn env_and_volumes() {
        let env = parse_env(&["A=1".into(), "B=x=y".into(), "A=2".into()]).unwrap();
        assert_eq!(env, [("B".into(), "x=y".into()), ("A".into(), "2".into())]);
        assert!(parse_env(&["NOEQ".into()])
            .unwrap_err()
            .message
            .contains("KEY=VALUE"));
        assert!(parse_env(&["1A=x".into()]).is_err());
        let v = parse_volumes(&["data:/var/data".into()]).unwrap();
        assert_eq!(v[0].name, "data");
        assert!(parse_volumes(&["data".into()]).is_err());
        assert!(parse_volumes(&["data:rel".into()]).is_err());
        assert!(parse_volumes(&["../x:/a".into()]).is_err());
        assert!(parse_volumes(&["a:/x".into(), "b:/x".into()]).is_err());
    }

    #[test]
    fn volumes_are_mounted_once_each() {
        let v = |a: &[&str]| parse_volumes(&a.iter().map(|s| s.to_string()).collect::<Vec<_>>());
        let ok = v(&["data:/a/", "logs:/b//c/."]).unwrap();
        assert_eq!(ok[0].target, "/a");
        assert_eq!(ok[1].target, "/b/c");
        for bad in [
            &["data:/a", "data:/b"][..],
            &["data:/a", "logs:/a"],
            &["data:/a", "logs:/a/"],
            &["data:/a", "logs://a"],
            &["data:/"],
            &["data:/x/../a"],
            &["data"],
        ] {
            let e = v(bad).unwrap_err();
            assert_eq!(e.code, ErrorCode::InvalidArgument, "{bad:?}: {}", e.message);
        }
        let e = v(&["data:/a", "data:/b"]).unwrap_err();
        assert!(e.message.contains("already mounted at /a"), "{}", e.message);
    }

    #[test]
    fn log_tails() {
        assert_eq!(last_lines("a\nb\nc\n", 2, 100), "b\nc\n");
        assert_eq!(last_lines("a\nb\nc", 2, 100), "b\nc");
        assert_eq!(last_lines("a\nb\n", 5, 100), "a\nb\n");
        assert_eq!(last_lines("", 5, 100), "");
        assert_eq!(last_lines("aaaa\nbbbb\ncccc\n", 10, 7), "cccc\n");
        assert_eq!(last_lines("ééééé", 1, 3).len(), 2);
    }

    #[test]
    fn memory_sizes() {
        assert_eq!(parse_memory("64M").unwrap(), 64 << 20);
        assert_eq!(parse_memory("1g").unwrap(), 1 << 30);
        assert_eq!(parse_memory("8388608").unwrap(), 8 << 20);
        assert!(parse_memory("1M").unwrap_err().message.contains("below 4M"));
        assert!(parse_memory("lots").is_err());
        assert!(parse_memory("99999999999G").is_err());
    }

    #[test]
    fn ip_allocation() {
        let net = Ipv4Addr::new(10, 101, 3, 0);
        let mut used = HashSet::new();
        assert_eq!(allocate_ip(net, &used), Some(Ipv4Addr::new(10, 101, 3, 2)));
        used.insert(Ipv4Addr::new(10, 101, 3, 2));
        assert_eq!(allocate_ip(net, &used), Some(Ipv4Addr::new(10, 101, 3, 3)));
        for h in 2..=253 {
            used.insert(Ipv4Addr::new(10, 101, 3, h));
        }
        assert_eq!(allocate_ip(net, &used), None);
    }
}
