//! The cluster range is cut into /24 slices, one per machine. Slice `n` of
//! `10.101.0.0/16` is `10.101.n.0/24`; the machine's own overlay address is
//! the slice's `.1`. Slice 0 is reserved so no machine owns the range's
//! network address.

use std::fmt;
use std::net::Ipv4Addr;
use std::str::FromStr;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Ipv4Net {
    pub addr: Ipv4Addr,
    pub prefix: u8,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CidrError {
    #[error("`{0}` is not an IPv4 range like 10.101.0.0/16")]
    Syntax(String),
    #[error("`{0}` has host bits set; did you mean {1}?")]
    HostBits(String, Ipv4Net),
    #[error("`{0}` must be between /8 and /23 so it holds at least two /24 machine subnets")]
    Size(String),
}

impl Ipv4Net {
    fn mask(prefix: u8) -> u32 {
        if prefix == 0 {
            0
        } else {
            u32::MAX << (32 - prefix)
        }
    }

    pub fn contains(&self, ip: Ipv4Addr) -> bool {
        let m = Self::mask(self.prefix);
        u32::from(ip) & m == u32::from(self.addr) & m
    }
}

impl fmt::Display for Ipv4Net {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

impl FromStr for Ipv4Net {
    type Err = CidrError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (a, p) = s
            .split_once('/')
            .ok_or_else(|| CidrError::Syntax(s.into()))?;
        let addr: Ipv4Addr = a.parse().map_err(|_| CidrError::Syntax(s.into()))?;
        let prefix: u8 = p.parse().map_err(|_| CidrError::Syntax(s.into()))?;
        if prefix > 32 {
            return Err(CidrError::Syntax(s.into()));
        }
        let masked = Ipv4Addr::from(u32::from(addr) & Self::mask(prefix));
        if masked != addr {
            return Err(CidrError::HostBits(
                s.into(),
                Ipv4Net {
                    addr: masked,
                    prefix,
                },
            ));
        }
        Ok(Ipv4Net { addr, prefix })
    }
}

/// A cluster range and the /24 slices in it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClusterRange {
    net: Ipv4Net,
}

impl ClusterRange {
    pub fn parse(s: &str) -> Result<Self, CidrError> {
        let net: Ipv4Net = s.parse()?;
        if !(8..=23).contains(&net.prefix) {
            return Err(CidrError::Size(s.into()));
        }
        Ok(ClusterRange { net })
    }

    pub fn net(&self) -> Ipv4Net {
        self.net
    }

    /// Number of allocatable slices (slice 0 is reserved).
    pub fn slices(&self) -> u32 {
        (1u32 << (24 - self.net.prefix)) - 1
    }

    /// Slice `n` (1-based), or `None` past the end.
    pub fn slice(&self, n: u32) -> Option<Slice> {
        if n == 0 || n > self.slices() {
            return None;
        }
        let base = u32::from(self.net.addr) + (n << 8);
        Some(Slice {
            index: n,
            net: Ipv4Net {
                addr: Ipv4Addr::from(base),
                prefix: 24,
            },
        })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Slice {
    pub index: u32,
    pub net: Ipv4Net,
}

impl Slice {
    /// The machine's own overlay address: `.1` of its slice.
    pub fn overlay_ip(&self) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.net.addr) + 1)
    }

    /// A single-token store key for this slice: `10-101-3-0`.
    pub fn key(&self) -> String {
        self.net.addr.to_string().replace('.', "-")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slices_of_default_range() {
        let r = ClusterRange::parse("10.101.0.0/16").unwrap();
        assert_eq!(r.slices(), 255);
        assert_eq!(r.slice(0), None);
        let s = r.slice(1).unwrap();
        assert_eq!(s.net.to_string(), "10.101.1.0/24");
        assert_eq!(s.overlay_ip(), Ipv4Addr::new(10, 101, 1, 1));
        assert_eq!(s.key(), "10-101-1-0");
        assert_eq!(r.slice(255).unwrap().net.to_string(), "10.101.255.0/24");
        assert_eq!(r.slice(256), None);
    }

    #[test]
    fn other_ranges() {
        let r = ClusterRange::parse("172.20.0.0/20").unwrap();
        assert_eq!(r.slices(), 15);
        assert_eq!(r.slice(15).unwrap().net.to_string(), "172.20.15.0/24");
        assert!(r.net().contains(Ipv4Addr::new(172, 20, 15, 9)));
        assert!(!r.net().contains(Ipv4Addr::new(172, 20, 16, 1)));
    }

    #[test]
    fn bad_ranges() {
        assert!(matches!(
            ClusterRange::parse("10.101.0.0"),
            Err(CidrError::Syntax(_))
        ));
        assert!(matches!(
            ClusterRange::parse("10.101.0.0/33"),
            Err(CidrError::Syntax(_))
        ));
        assert!(matches!(
            ClusterRange::parse("10.101.0.0/24"),
            Err(CidrError::Size(_))
        ));
        assert!(matches!(
            ClusterRange::parse("0.0.0.0/4"),
            Err(CidrError::Size(_))
        ));
        match ClusterRange::parse("10.101.3.0/16") {
            Err(CidrError::HostBits(_, n)) => assert_eq!(n.to_string(), "10.101.0.0/16"),
            other => panic!("{other:?}"),
        }
    }
}
