//! The gateway's decisions as pure functions: which hostnames and path
//! prefixes are valid, which route a request takes (Host, then the
//! longest path prefix on a segment boundary), which instances serve it,
//! and in what order (round robin). No IO, no clock.

use ployz_api::*;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};

/// Checks and lower-cases a route's hostname: DNS labels of letters,
/// digits and `-` (not at either end), 1..63 bytes each, 253 in all, at
/// least one label; no port, no wildcard, no IP address.
pub fn normalize_host(host: &str) -> Result<String, String> {
    let h = host.trim_end_matches('.').to_ascii_lowercase();
    let why = if h.is_empty() {
        Some("it is empty")
    } else if h.len() > 253 {
        Some("it is longer than 253 bytes")
    } else if h.split('.').any(|l| l.is_empty() || l.len() > 63) {
        Some("every dot-separated label must have 1 to 63 characters")
    } else if !h
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
    {
        Some("only letters, digits, `-` and `.` are allowed (no port, scheme or wildcard)")
    } else if h.split('.').any(|l| l.starts_with('-') || l.ends_with('-')) {
        Some("a label may not start or end with `-`")
    } else if h.parse::<std::net::Ipv4Addr>().is_ok() {
        Some("it is an IP address; routes are by hostname")
    } else {
        None
    };
    match why {
        Some(w) => Err(format!("`{host}` is not a valid hostname: {w}")),
        None => Ok(h),
    }
}

/// Checks a path prefix: starts with `/`, printable ASCII without query,
/// fragment or whitespace; a trailing `/` is dropped (`/api/` is `/api`).
pub fn normalize_path(path: Option<&str>) -> Result<String, String> {
    let Some(p) = path else {
        return Ok("/".into());
    };
    let bad = if !p.starts_with('/') {
        Some("it must start with `/`")
    } else if p.len() > 256 {
        Some("it is longer than 256 bytes")
    } else if !p.bytes().all(|b| b.is_ascii_graphic()) || p.contains(['?', '#']) {
        Some("only printable characters without spaces, `?` or `#` are allowed")
    } else if p.contains("//") {
        Some("it has an empty segment (`//`)")
    } else {
        None
    };
    if let Some(w) = bad {
        return Err(format!("`{p}` is not a valid path prefix: {w}"));
    }
    let t = p.trim_end_matches('/');
    Ok(if t.is_empty() { "/".into() } else { t.into() })
}

/// Whether `path` (a request's) falls under `prefix` (a route's): equal, or
/// continuing with `/` after it.
pub fn prefix_matches(prefix: &str, path: &str) -> bool {
    prefix == "/"
        || (path.starts_with(prefix)
            && matches!(path.as_bytes().get(prefix.len()), None | Some(b'/')))
}

/// Host of a request: the `Host` header (or the URI's authority, for
/// HTTP/2), without its port, lower-cased.
pub fn request_host(host_header: Option<&str>, authority: Option<&str>) -> Option<String> {
    let raw = host_header.or(authority)?;
    let h = if let Some(rest) = raw.strip_prefix('[') {
        rest.split(']').next().unwrap_or(rest)
    } else {
        raw.rsplit_once(':')
            .filter(|(_, p)| p.bytes().all(|b| b.is_ascii_digit()))
            .map_or(raw, |(h, _)| h)
    };
    Some(h.trim_end_matches('.').to_ascii_lowercase())
}

/// Whether an instance may take requests: running and healthy (or without
/// a health check), with an overlay address.
pub fn serves(i: &InstanceRecord) -> bool {
    crate::ingress::table::ready(i) && i.overlay_ip.is_some()
}

/// One route as the gateway serves it.
#[derive(Debug)]
pub struct Route {
    pub record: RouteRecord,
    /// Where its healthy instances listen, in a stable order.
    pub backends: Vec<SocketAddr>,
    next: AtomicUsize,
}

impl Route {
    /// Backends to try for one request, in order: the round-robin pick,
    /// then the next one (the one retry when connecting fails).
    pub fn pick(&self) -> Picked {
        let n = self.backends.len();
        let mut p = Picked {
            addrs: [SocketAddr::from(([0, 0, 0, 0], 0)); 2],
            len: n.min(2),
        };
        if n > 0 {
            let i = self.next.fetch_add(1, Ordering::Relaxed) % n;
            p.addrs = [self.backends[i], self.backends[(i + 1) % n]];
        }
        p
    }
}

/// The backends of one request (at most two; no allocation per request).
#[derive(Debug, Clone, Copy)]
pub struct Picked {
    addrs: [SocketAddr; 2],
    len: usize,
}

impl std::ops::Deref for Picked {
    type Target = [SocketAddr];
    fn deref(&self) -> &[SocketAddr] {
        &self.addrs[..self.len]
    }
}

/// Routes by hostname, each host's routes longest path first.
#[derive(Debug, Default)]
pub struct Table {
    hosts: HashMap<String, Vec<Route>>,
}

impl Table {
    /// Builds the table from the routes and instances buckets.
    pub fn build(routes: Vec<RouteRecord>, instances: &[InstanceRecord]) -> Table {
        let mut hosts: HashMap<String, Vec<Route>> = HashMap::new();
        for r in routes {
            let mut backends: Vec<SocketAddr> = instances
                .iter()
                .filter(|i| i.service == r.service && serves(i))
                .filter_map(|i| i.overlay_ip.as_deref()?.parse().ok())
                .map(|ip| SocketAddr::new(ip, r.port))
                .collect();
            backends.sort();
            backends.dedup();
            hosts.entry(r.host.clone()).or_default().push(Route {
                record: r,
                backends,
                next: AtomicUsize::new(0),
            });
        }
        for rs in hosts.values_mut() {
            rs.sort_by_key(|r| std::cmp::Reverse(r.record.path.len()));
        }
        Table { hosts }
    }

    /// The route for a request: `None` when no route has this host or
    /// none of its prefixes matches.
    pub fn find(&self, host: &str, path: &str) -> Option<&Route> {
        self.hosts
            .get(host)?
            .iter()
            .find(|r| prefix_matches(&r.record.path, path))
    }

    /// Whether some route of `host` wants TLS (port 80 then redirects).
    pub fn wants_tls(&self, host: &str) -> bool {
        self.hosts
            .get(host)
            .is_some_and(|rs| rs.iter().any(|r| r.record.tls == RouteTls::Acme))
    }

    pub fn routes(&self) -> impl Iterator<Item = &Route> {
        self.hosts.values().flatten()
    }
}

/// `route add`'s decision over the existing routes: `Err` names the service
/// that already has this hostname and path.
pub fn check_add(existing: &[RouteRecord], new: &RouteRecord) -> Result<(), String> {
    match existing
        .iter()
        .find(|r| r.host == new.host && r.path == new.path && r.service != new.service)
    {
        Some(r) => Err(format!(
            "{}{} is already routed to service `{}`",
            r.host,
            if r.path == "/" { "" } else { &r.path },
            r.service
        )),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn route(host: &str, path: &str, service: &str) -> RouteRecord {
        RouteRecord {
            host: host.into(),
            path: path.into(),
            service: service.into(),
            port: 80,
            tls: RouteTls::Off,
            updated_at_ms: 0,
        }
    }

    fn instance(service: &str, ip: &str, health: InstanceHealth) -> InstanceRecord {
        InstanceRecord {
            service: service.into(),
            machine: "m".into(),
            state: InstanceState::Running,
            overlay_ip: Some(ip.into()),
            slot: 0,
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

    #[test]
    fn hostnames() {
        assert_eq!(
            normalize_host("App.Example.COM.").unwrap(),
            "app.example.com"
        );
        assert_eq!(normalize_host("localhost").unwrap(), "localhost");
        for bad in [
            "",
            "a..b",
            "-a.com",
            "a-.com",
            "a.com:80",
            "*.a.com",
            "http://a.com",
            "10.0.0.1",
            "a b",
            &"x".repeat(64),
        ] {
            assert!(normalize_host(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn paths() {
        assert_eq!(normalize_path(None).unwrap(), "/");
        assert_eq!(normalize_path(Some("/")).unwrap(), "/");
        assert_eq!(normalize_path(Some("/api/")).unwrap(), "/api");
        for bad in ["api", "/a b", "/a?x", "/a#x", "/a//b"] {
            assert!(normalize_path(Some(bad)).is_err(), "{bad}");
        }
    }

    #[test]
    fn prefixes_match_on_segment_boundaries() {
        assert!(prefix_matches("/", "/anything"));
        assert!(prefix_matches("/api", "/api"));
        assert!(prefix_matches("/api", "/api/v1"));
        assert!(!prefix_matches("/api", "/apix"));
        assert!(!prefix_matches("/api", "/"));
    }

    #[test]
    fn hosts_of_requests() {
        assert_eq!(request_host(Some("A.com:8080"), None).unwrap(), "a.com");
        assert_eq!(request_host(None, Some("b.com")).unwrap(), "b.com");
        assert_eq!(request_host(Some("[::1]:80"), None).unwrap(), "::1");
        assert_eq!(request_host(None, None), None);
    }

    #[test]
    fn longest_prefix_wins_and_unknown_hosts_miss() {
        let t = Table::build(
            vec![
                route("a.com", "/", "web"),
                route("a.com", "/api", "api"),
                route("a.com", "/api/admin", "admin"),
            ],
            &[],
        );
        assert_eq!(t.find("a.com", "/x").unwrap().record.service, "web");
        assert_eq!(t.find("a.com", "/api/v1").unwrap().record.service, "api");
        assert_eq!(
            t.find("a.com", "/api/admin/x").unwrap().record.service,
            "admin"
        );
        assert_eq!(t.find("a.com", "/apix").unwrap().record.service, "web");
        assert!(t.find("b.com", "/").is_none());
        let t = Table::build(vec![route("a.com", "/api", "api")], &[]);
        assert!(t.find("a.com", "/").is_none());
    }

    #[test]
    fn only_running_healthy_instances_serve_in_round_robin() {
        let mut stopped = instance("web", "10.0.0.4", InstanceHealth::None);
        stopped.state = InstanceState::Stopped;
        let t = Table::build(
            vec![route("a.com", "/", "web")],
            &[
                instance("web", "10.0.0.1", InstanceHealth::Healthy),
                instance("web", "10.0.0.2", InstanceHealth::None),
                instance("web", "10.0.0.3", InstanceHealth::Unhealthy),
                instance("web", "10.0.0.5", InstanceHealth::Starting),
                instance("other", "10.0.0.6", InstanceHealth::Healthy),
                stopped,
            ],
        );
        let r = t.find("a.com", "/").unwrap();
        let a: SocketAddr = "10.0.0.1:80".parse().unwrap();
        let b: SocketAddr = "10.0.0.2:80".parse().unwrap();
        assert_eq!(r.backends, vec![a, b]);
        assert_eq!(*r.pick(), [a, b]);
        assert_eq!(*r.pick(), [b, a]);
        assert_eq!(*r.pick(), [a, b]);
        let empty = Table::build(vec![route("a.com", "/", "web")], &[]);
        assert!(empty.find("a.com", "/").unwrap().pick().is_empty());
        let one = Table::build(
            vec![route("a.com", "/", "web")],
            &[instance("web", "10.0.0.1", InstanceHealth::Healthy)],
        );
        assert_eq!(*one.find("a.com", "/").unwrap().pick(), [a]);
    }

    #[test]
    fn a_taken_host_and_path_names_its_service() {
        let existing = vec![route("a.com", "/", "web"), route("a.com", "/api", "api")];
        let err = check_add(&existing, &route("a.com", "/", "other")).unwrap_err();
        assert!(err.contains("`web`"), "{err}");
        assert!(check_add(&existing, &route("a.com", "/", "web")).is_ok());
        assert!(check_add(&existing, &route("a.com", "/v2", "other")).is_ok());
    }

    #[test]
    fn tls_routes_redirect() {
        let mut r = route("s.com", "/", "web");
        r.tls = RouteTls::Acme;
        let t = Table::build(vec![r, route("p.com", "/", "web")], &[]);
        assert!(t.wants_tls("s.com"));
        assert!(!t.wants_tls("p.com"));
    }
}
