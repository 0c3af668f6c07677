//! Published ports: `[IP:]HOST_PORT:CONTAINER_PORT[/tcp|/udp]` (pure).
//!
//! A service's published ports are kept in its record; every machine that
//! may serve (active, draining, standby) listens on each host port and
//! forwards to a healthy instance's container port (`ployzd::ingress`).

use serde::{Deserialize, Serialize};
use std::fmt;
use std::net::Ipv4Addr;

/// Transport protocol of a published port.
#[derive(
    Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq, Hash, PartialOrd, Ord,
)]
#[serde(rename_all = "snake_case")]
pub enum Protocol {
    #[default]
    Tcp,
    Udp,
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
        })
    }
}

/// Claims on host ports, one record ([`PortClaim`]) per protocol and port
/// (key [`PublishedPort::claim_key`], `tcp-8080`). A service's record is
/// written in the same transaction as its claims, conditioned on their
/// revisions, so two deploys cannot both take a port.
pub const BUCKET_PORT_CLAIMS: &str = "port_claims";

/// Who publishes one protocol and port (on which addresses).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct PortClaim {
    pub owners: Vec<PortOwner>,
}

/// One service's published port in a [`PortClaim`].
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct PortOwner {
    pub service: String,
    pub port: PublishedPort,
}

/// One published port of a service.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PublishedPort {
    /// Host address to listen on; `None`: every address.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host_ip: Option<Ipv4Addr>,
    pub host_port: u16,
    pub container_port: u16,
    #[serde(default)]
    pub protocol: Protocol,
}

impl PublishedPort {
    /// Whether two published ports need the same host socket (same port and
    /// protocol, and addresses that overlap: equal, or one of them is every
    /// address).
    pub fn clashes(&self, other: &PublishedPort) -> bool {
        self.host_port == other.host_port
            && self.protocol == other.protocol
            && match (self.host_ip, other.host_ip) {
                (Some(a), Some(b)) => a == b,
                _ => true,
            }
    }
}

impl PublishedPort {
    /// The key of this port's claim record: protocol and host port.
    pub fn claim_key(&self) -> String {
        format!("{}-{}", self.protocol, self.host_port)
    }
}

impl fmt::Display for PublishedPort {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(ip) = self.host_ip {
            write!(f, "{ip}:")?;
        }
        write!(
            f,
            "{}:{}/{}",
            self.host_port, self.container_port, self.protocol
        )
    }
}

fn port(s: &str, what: &str, spec: &str) -> Result<u16, String> {
    match s.parse::<u16>() {
        Ok(p) if p > 0 => Ok(p),
        _ => Err(format!(
            "--publish `{spec}`: {what} `{s}` is not a port number (1-65535)"
        )),
    }
}

/// Parses `[IP:]HOST_PORT:CONTAINER_PORT[/tcp|/udp]`.
pub fn parse_publish(spec: &str) -> Result<PublishedPort, String> {
    let (rest, protocol) = match spec.rsplit_once('/') {
        Some((r, "tcp")) => (r, Protocol::Tcp),
        Some((r, "udp")) => (r, Protocol::Udp),
        Some((_, p)) => {
            return Err(format!(
                "--publish `{spec}`: protocol `{p}` is neither tcp nor udp"
            ))
        }
        None => (spec, Protocol::Tcp),
    };
    let parts: Vec<&str> = rest.split(':').collect();
    let (host_ip, host, container) = match parts.as_slice() {
        [h, c] => (None, *h, *c),
        [ip, h, c] => {
            let ip: Ipv4Addr = ip.parse().map_err(|_| {
                format!("--publish `{spec}`: `{ip}` is not an IPv4 address like 192.0.2.10")
            })?;
            (Some(ip).filter(|ip| !ip.is_unspecified()), *h, *c)
        }
        _ => {
            return Err(format!(
                "--publish `{spec}` is not [IP:]HOST_PORT:CONTAINER_PORT[/tcp|/udp], e.g. 8080:80"
            ))
        }
    };
    Ok(PublishedPort {
        host_ip,
        host_port: port(host, "host port", spec)?,
        container_port: port(container, "container port", spec)?,
        protocol,
    })
}

/// Parses every spec and refuses two that need the same host socket.
pub fn parse_publishes(specs: &[String]) -> Result<Vec<PublishedPort>, String> {
    let mut out: Vec<PublishedPort> = Vec::new();
    for s in specs {
        let p = parse_publish(s)?;
        if let Some(o) = out.iter().find(|o| o.clashes(&p)) {
            return Err(format!(
                "--publish `{s}` and `{o}` both use host port {}/{}: give each its own",
                p.host_port, p.protocol
            ));
        }
        out.push(p);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn specs_parse_and_print() {
        for (s, shown) in [
            ("8080:80", "8080:80/tcp"),
            ("8080:80/tcp", "8080:80/tcp"),
            ("53:5353/udp", "53:5353/udp"),
            ("192.0.2.1:80:8080", "192.0.2.1:80:8080/tcp"),
            ("0.0.0.0:80:8080", "80:8080/tcp"),
        ] {
            let p = parse_publish(s).unwrap();
            assert_eq!(p.to_string(), shown);
            assert_eq!(parse_publish(&p.to_string()).unwrap(), p);
        }
        for bad in [
            "80",
            "a:80",
            "80:0",
            "70000:80",
            "80:80/sctp",
            "x:80:80",
            "1:2:3:4",
        ] {
            assert!(parse_publish(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn clashes_need_same_port_protocol_and_overlapping_address() {
        let p = |s: &str| parse_publish(s).unwrap();
        assert!(p("80:1").clashes(&p("80:2")));
        assert!(p("80:1").clashes(&p("192.0.2.1:80:2")));
        assert!(!p("80:1").clashes(&p("80:1/udp")));
        assert!(!p("192.0.2.1:80:1").clashes(&p("192.0.2.2:80:1")));
        assert!(parse_publishes(&["80:1".into(), "80:2".into()]).is_err());
        assert_eq!(
            parse_publishes(&["80:1".into(), "80:1/udp".into()])
                .unwrap()
                .len(),
            2
        );
    }

    #[test]
    fn records_without_a_protocol_decode_as_tcp() {
        let p: PublishedPort =
            serde_json::from_str(r#"{"host_port":80,"container_port":8080}"#).unwrap();
        assert_eq!(p.protocol, Protocol::Tcp);
    }
}
