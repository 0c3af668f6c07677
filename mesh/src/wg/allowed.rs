//! Allowed IPs: the routing table of a WireGuard device. Each prefix belongs
//! to at most one peer; a packet goes to the peer with the longest matching
//! prefix, and a decrypted packet is accepted only if its source routes back
//! to the peer that sent it (cryptokey routing).

use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;

use crate::overlay::Ipv4Net;

/// An IPv4 or IPv6 prefix, host bits cleared.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct AllowedIp {
    pub addr: IpAddr,
    pub prefix: u8,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("`{0}` is not an address prefix like 10.101.1.0/24 or fd00::/64")]
pub struct AllowedIpError(pub String);

impl AllowedIp {
    pub fn new(addr: IpAddr, prefix: u8) -> Option<AllowedIp> {
        let max = if addr.is_ipv4() { 32 } else { 128 };
        if prefix > max {
            return None;
        }
        Some(AllowedIp {
            addr: mask(addr, prefix),
            prefix,
        })
    }

    pub fn contains(&self, ip: IpAddr) -> bool {
        ip.is_ipv4() == self.addr.is_ipv4() && mask(ip, self.prefix) == self.addr
    }
}

fn mask(addr: IpAddr, prefix: u8) -> IpAddr {
    match addr {
        IpAddr::V4(a) => {
            let m = u32::MAX.checked_shl(32 - u32::from(prefix)).unwrap_or(0);
            IpAddr::V4((u32::from(a) & m).into())
        }
        IpAddr::V6(a) => {
            let m = u128::MAX.checked_shl(128 - u32::from(prefix)).unwrap_or(0);
            IpAddr::V6((u128::from(a) & m).into())
        }
    }
}

impl From<Ipv4Net> for AllowedIp {
    fn from(n: Ipv4Net) -> Self {
        AllowedIp {
            addr: mask(IpAddr::V4(n.addr), n.prefix),
            prefix: n.prefix,
        }
    }
}

impl fmt::Display for AllowedIp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

impl FromStr for AllowedIp {
    type Err = AllowedIpError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = || AllowedIpError(s.to_owned());
        let (a, p) = match s.split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (s, None),
        };
        let addr: IpAddr = a.parse().map_err(|_| err())?;
        let prefix = match p {
            Some(p) => p.parse().map_err(|_| err())?,
            None if addr.is_ipv4() => 32,
            None => 128,
        };
        AllowedIp::new(addr, prefix).ok_or_else(err)
    }
}

/// Longest-prefix-match table from prefixes to values (peer handles).
/// Linear scan over entries sorted longest first: a cluster has tens of
/// peers, where this beats a trie on cache behaviour.
#[derive(Debug, Clone)]
pub struct RouteTable<T> {
    entries: Vec<(AllowedIp, T)>,
}

impl<T> Default for RouteTable<T> {
    fn default() -> Self {
        RouteTable {
            entries: Vec::new(),
        }
    }
}

impl<T> RouteTable<T> {
    /// Insert, taking the prefix away from whoever held it.
    pub fn insert(&mut self, ip: AllowedIp, value: T) {
        self.entries.retain(|(k, _)| *k != ip);
        let at = self
            .entries
            .iter()
            .position(|(k, _)| k.prefix < ip.prefix)
            .unwrap_or(self.entries.len());
        self.entries.insert(at, (ip, value));
    }

    pub fn lookup(&self, ip: IpAddr) -> Option<&T> {
        self.entries
            .iter()
            .find(|(k, _)| k.contains(ip))
            .map(|(_, v)| v)
    }

    pub fn retain(&mut self, mut keep: impl FnMut(&AllowedIp, &T) -> bool) {
        self.entries.retain(|(k, v)| keep(k, v));
    }

    pub fn iter(&self) -> impl Iterator<Item = &(AllowedIp, T)> {
        self.entries.iter()
    }

    pub fn clear(&mut self) {
        self.entries.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn parse_masks_and_defaults() {
        let a: AllowedIp = "10.1.2.3/24".parse().unwrap();
        assert_eq!(a.to_string(), "10.1.2.0/24");
        assert_eq!("10.1.2.3".parse::<AllowedIp>().unwrap().prefix, 32);
        assert_eq!(
            "fd00::1/64".parse::<AllowedIp>().unwrap().to_string(),
            "fd00::/64"
        );
        assert_eq!("0.0.0.0/0".parse::<AllowedIp>().unwrap().prefix, 0);
        assert!("10.0.0.0/33".parse::<AllowedIp>().is_err());
        assert!("nonsense".parse::<AllowedIp>().is_err());
    }

    #[test]
    fn longest_prefix_wins_and_prefixes_move() {
        let mut t = RouteTable::default();
        t.insert("10.0.0.0/8".parse().unwrap(), 'a');
        t.insert("10.1.0.0/16".parse().unwrap(), 'b');
        t.insert("::/0".parse().unwrap(), 'c');
        assert_eq!(t.lookup(ip("10.1.2.3")), Some(&'b'));
        assert_eq!(t.lookup(ip("10.2.2.3")), Some(&'a'));
        assert_eq!(t.lookup(ip("11.0.0.1")), None);
        assert_eq!(t.lookup(ip("fd00::1")), Some(&'c'));
        t.insert("10.1.0.0/16".parse().unwrap(), 'd');
        assert_eq!(t.lookup(ip("10.1.2.3")), Some(&'d'));
        assert_eq!(t.iter().count(), 3);
        t.retain(|_, v| *v != 'd');
        assert_eq!(t.lookup(ip("10.1.2.3")), Some(&'a'));
    }
}
