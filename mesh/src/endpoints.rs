//! Underlay endpoint candidates: the addresses peers may reach this machine
//! at. Loopback, link-local, multicast and addresses on container/bridge
//! interfaces are dropped; the rest are ordered private, then CGNAT, then
//! public (a peer tries them in that order).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// An address seen on a local interface.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InterfaceAddr {
    pub iface: String,
    pub ip: IpAddr,
}

const SKIPPED_IFACE_PREFIXES: &[&str] = &[
    "lo", "docker", "br-", "veth", "virbr", "cni", "flannel", "cali", "plz", "wg", "tun",
];

/// Reachability class, lower is preferred.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Class {
    Private = 0,
    Cgnat = 1,
    Public = 2,
}

pub fn classify(ip: IpAddr) -> Option<Class> {
    match ip {
        IpAddr::V4(v4) => classify_v4(v4),
        IpAddr::V6(v6) => classify_v6(v6),
    }
}

fn classify_v4(ip: Ipv4Addr) -> Option<Class> {
    if ip.is_loopback()
        || ip.is_link_local()
        || ip.is_unspecified()
        || ip.is_multicast()
        || ip.is_broadcast()
        || ip.is_documentation()
    {
        return None;
    }
    let o = ip.octets();
    if ip.is_private() {
        Some(Class::Private)
    } else if o[0] == 100 && (o[1] & 0xc0) == 64 {
        Some(Class::Cgnat)
    } else {
        Some(Class::Public)
    }
}

fn classify_v6(ip: Ipv6Addr) -> Option<Class> {
    let seg0 = ip.segments()[0];
    if ip.is_loopback() || ip.is_unspecified() || ip.is_multicast() || (seg0 & 0xffc0) == 0xfe80 {
        return None;
    }
    if (seg0 & 0xfe00) == 0xfc00 {
        Some(Class::Private)
    } else {
        Some(Class::Public)
    }
}

/// Filter and order candidates; `exclude` drops addresses inside the overlay.
pub fn candidates(
    addrs: &[InterfaceAddr],
    port: u16,
    exclude: impl Fn(IpAddr) -> bool,
) -> Vec<String> {
    let mut picked: Vec<(Class, bool, IpAddr)> = addrs
        .iter()
        .filter(|a| {
            !SKIPPED_IFACE_PREFIXES
                .iter()
                .any(|p| a.iface.starts_with(p))
        })
        .filter(|a| !exclude(a.ip))
        .filter_map(|a| classify(a.ip).map(|c| (c, a.ip.is_ipv6(), a.ip)))
        .collect();
    // Stable: keeps interface order within a class; IPv4 before IPv6.
    picked.sort_by_key(|(c, v6, _)| (*c, *v6));
    picked.dedup_by_key(|(_, _, ip)| *ip);
    picked
        .into_iter()
        .map(|(_, _, ip)| std::net::SocketAddr::new(ip, port).to_string())
        .collect()
}

/// Addresses on this host's interfaces (getifaddrs).
pub fn local_addrs() -> std::io::Result<Vec<InterfaceAddr>> {
    let mut out = Vec::new();
    let mut head: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs fills `head` with a list we free below.
    if unsafe { libc::getifaddrs(&mut head) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    let mut cur = head;
    while !cur.is_null() {
        // SAFETY: `cur` is a node of the list getifaddrs returned.
        let ifa = unsafe { &*cur };
        cur = ifa.ifa_next;
        if ifa.ifa_addr.is_null() || ifa.ifa_name.is_null() {
            continue;
        }
        // SAFETY: ifa_name is a NUL-terminated C string owned by the list.
        let name = unsafe { std::ffi::CStr::from_ptr(ifa.ifa_name) }
            .to_string_lossy()
            .into_owned();
        // SAFETY: ifa_addr is non-null; the family tells which sockaddr it is.
        let family = unsafe { (*ifa.ifa_addr).sa_family } as i32;
        let ip = match family {
            libc::AF_INET => {
                // SAFETY: family is AF_INET so this is a sockaddr_in.
                let sin = unsafe { &*(ifa.ifa_addr as *const libc::sockaddr_in) };
                IpAddr::V4(Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr)))
            }
            libc::AF_INET6 => {
                // SAFETY: family is AF_INET6 so this is a sockaddr_in6.
                let sin6 = unsafe { &*(ifa.ifa_addr as *const libc::sockaddr_in6) };
                IpAddr::V6(Ipv6Addr::from(sin6.sin6_addr.s6_addr))
            }
            _ => continue,
        };
        out.push(InterfaceAddr { iface: name, ip });
    }
    // SAFETY: `head` came from getifaddrs and is freed once.
    unsafe { libc::freeifaddrs(head) };
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn a(iface: &str, ip: &str) -> InterfaceAddr {
        InterfaceAddr {
            iface: iface.into(),
            ip: ip.parse().unwrap(),
        }
    }

    #[test]
    fn filters_and_orders() {
        let addrs = vec![
            a("lo", "127.0.0.1"),
            a("eth0", "203.0.114.7"),
            a("eth1", "100.72.1.2"),
            a("eth2", "192.168.1.5"),
            a("docker0", "172.17.0.1"),
            a("veth12", "10.0.0.9"),
            a("eth0", "fe80::1"),
            a("eth0", "2001:db9::5"),
            a("eth3", "169.254.3.3"),
            a("plz0", "10.101.1.1"),
            a("eth4", "10.101.9.9"),
            a("eth2", "192.168.1.5"),
        ];
        let overlay: crate::overlay::Ipv4Net = "10.101.0.0/16".parse().unwrap();
        let got = candidates(&addrs, 51820, |ip| match ip {
            IpAddr::V4(v4) => overlay.contains(v4),
            _ => false,
        });
        assert_eq!(
            got,
            vec![
                "192.168.1.5:51820",
                "100.72.1.2:51820",
                "203.0.114.7:51820",
                "[2001:db9::5]:51820",
            ]
        );
    }

    #[test]
    fn local_addrs_include_loopback() {
        let addrs = local_addrs().unwrap();
        assert!(addrs.iter().any(|a| a.ip.is_loopback()));
    }
}
