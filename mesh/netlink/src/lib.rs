//! Links, addresses and routes over rtnetlink, so `ployzd` needs no iproute2
//! on the host.
//!
//! Two halves, as elsewhere in Ployz: [`Op`] is one change as plain data
//! (plans are lists of them, tested without a kernel; it prints as the `ip`
//! command doing the same, for logs), and [`Netlink`] applies it through a
//! blocking `NETLINK_ROUTE` socket: no threads, no async runtime, usable from
//! a plain std thread or a single-threaded helper process.
//!
//! A netlink socket belongs to the network namespace its creator was in when
//! it was opened: open it on a thread that has `setns`-ed into another
//! namespace to change that one (see `ployz-runtime`'s host backend).

use std::fmt;
use std::io;
use std::net::{IpAddr, Ipv4Addr};

use netlink_packet_core::{
    NetlinkMessage, NetlinkPayload, NLM_F_ACK, NLM_F_CREATE, NLM_F_DUMP, NLM_F_EXCL, NLM_F_REPLACE,
    NLM_F_REQUEST,
};
use netlink_packet_route::address::{AddressAttribute, AddressMessage};
use netlink_packet_route::link::{
    InfoData, InfoKind, InfoVeth, LinkAttribute, LinkFlags, LinkInfo, LinkMessage,
};
use netlink_packet_route::route::{
    RouteAddress, RouteAttribute, RouteHeader, RouteMessage, RouteProtocol, RouteScope, RouteType,
};
use netlink_packet_route::{AddressFamily, RouteNetlinkMessage};
use netlink_sys::{protocols::NETLINK_ROUTE, Socket, SocketAddr};

/// One change to a network namespace's links, addresses or routes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    /// A new bridge (fails if a link of that name exists).
    AddBridge {
        name: String,
    },
    /// A veth pair: `host` here, `peer` created directly in the network
    /// namespace of `peer_pid` (here when `None`), both with `mtu` when set.
    AddVeth {
        host: String,
        peer: String,
        peer_pid: Option<i32>,
        mtu: Option<u16>,
        /// The peer's MAC address (the kernel picks a random one when `None`).
        peer_mac: Option<[u8; 6]>,
    },
    DeleteLink {
        ifname: String,
    },
    SetUp {
        ifname: String,
    },
    SetDown {
        ifname: String,
    },
    SetMtu {
        ifname: String,
        mtu: u16,
    },
    /// Makes `ifname` a port of the bridge `master`.
    SetMaster {
        ifname: String,
        master: String,
    },
    /// Moves `ifname` into the network namespace of process `pid`.
    MoveToNetns {
        ifname: String,
        pid: i32,
    },
    /// Adds the address, or leaves it if it is already there.
    ReplaceAddress {
        ifname: String,
        addr: Ipv4Addr,
        prefix: u8,
    },
    /// Adds or replaces the route to `dest/prefix` (`prefix` 0: the default
    /// route) in the main table.
    ReplaceRoute {
        dest: Ipv4Addr,
        prefix: u8,
        via: Option<Ipv4Addr>,
        dev: Option<String>,
        src: Option<Ipv4Addr>,
    },
}

impl Op {
    /// What this change does, for error messages ("cannot {describe}: …").
    pub fn describe(&self) -> String {
        match self {
            Op::AddBridge { name } => format!("create bridge {name}"),
            Op::AddVeth {
                host,
                peer,
                peer_pid: Some(pid),
                ..
            } => format!(
                "create veth pair {host}/{peer} ({peer} in the network namespace of pid {pid})"
            ),
            Op::AddVeth { host, peer, .. } => format!("create veth pair {host}/{peer}"),
            Op::DeleteLink { ifname } => format!("delete link {ifname}"),
            Op::SetUp { ifname } => format!("set {ifname} up"),
            Op::SetDown { ifname } => format!("set {ifname} down"),
            Op::SetMtu { ifname, mtu } => format!("set mtu {mtu} on {ifname}"),
            Op::SetMaster { ifname, master } => format!("attach {ifname} to bridge {master}"),
            Op::MoveToNetns { ifname, pid } => {
                format!("move {ifname} into the network namespace of pid {pid}")
            }
            Op::ReplaceAddress {
                ifname,
                addr,
                prefix,
            } => format!("add address {addr}/{prefix} to {ifname}"),
            Op::ReplaceRoute { .. } => {
                // "route replace default via 10.0.0.1" -> "add route default via 10.0.0.1"
                let cmd = self.to_string();
                format!("add route {}", cmd.trim_start_matches("ip route replace "))
            }
        }
    }
}

/// The equivalent `ip` command (for logs and tests; nothing runs it).
impl fmt::Display for Op {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Op::AddBridge { name } => write!(f, "ip link add name {name} type bridge"),
            Op::AddVeth {
                host,
                peer,
                peer_pid,
                mtu,
                peer_mac,
            } => {
                let mtu = mtu.map(|m| format!(" mtu {m}")).unwrap_or_default();
                let mac = peer_mac
                    .map(|m| {
                        let hex: Vec<String> = m.iter().map(|b| format!("{b:02x}")).collect();
                        format!(" address {}", hex.join(":"))
                    })
                    .unwrap_or_default();
                write!(
                    f,
                    "ip link add name {host}{mtu} type veth peer name {peer}{mtu}{mac}"
                )?;
                if let Some(pid) = peer_pid {
                    write!(f, " netns {pid}")?;
                }
                Ok(())
            }
            Op::DeleteLink { ifname } => write!(f, "ip link del dev {ifname}"),
            Op::SetUp { ifname } => write!(f, "ip link set dev {ifname} up"),
            Op::SetDown { ifname } => write!(f, "ip link set dev {ifname} down"),
            Op::SetMtu { ifname, mtu } => write!(f, "ip link set dev {ifname} mtu {mtu}"),
            Op::SetMaster { ifname, master } => {
                write!(f, "ip link set dev {ifname} master {master}")
            }
            Op::MoveToNetns { ifname, pid } => write!(f, "ip link set dev {ifname} netns {pid}"),
            Op::ReplaceAddress {
                ifname,
                addr,
                prefix,
            } => write!(f, "ip addr replace {addr}/{prefix} dev {ifname}"),
            Op::ReplaceRoute {
                dest,
                prefix,
                via,
                dev,
                src,
            } => {
                f.write_str("ip route replace ")?;
                if *prefix == 0 {
                    f.write_str("default")?;
                } else {
                    write!(f, "{dest}/{prefix}")?;
                }
                if let Some(via) = via {
                    write!(f, " via {via}")?;
                }
                if let Some(dev) = dev {
                    write!(f, " dev {dev}")?;
                }
                if let Some(src) = src {
                    write!(f, " src {src}")?;
                }
                Ok(())
            }
        }
    }
}

/// A failed netlink operation: what was asked, and the kernel's answer.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot open a netlink socket: {}", reason(.0))]
    Socket(#[source] io::Error),
    #[error("cannot {what}: no interface named {ifname}")]
    NoSuchLink { what: String, ifname: String },
    #[error("cannot {what}: {}", reason(.source))]
    Kernel {
        what: String,
        #[source]
        source: io::Error,
    },
}

impl Error {
    /// The errno the kernel answered with, if it answered with one.
    pub fn errno(&self) -> Option<i32> {
        match self {
            Error::Socket(e) | Error::Kernel { source: e, .. } => e.raw_os_error(),
            Error::NoSuchLink { .. } => Some(libc::ENODEV),
        }
    }
}

/// An errno as words, with what to do about the usual one.
fn reason(e: &io::Error) -> String {
    let text = e.to_string();
    let text = match e.raw_os_error() {
        Some(code) => text
            .strip_suffix(&format!(" (os error {code})"))
            .unwrap_or(&text)
            .to_owned(),
        None => text,
    };
    match e.raw_os_error() {
        Some(libc::EPERM) | Some(libc::EACCES) => format!("{text} (needs CAP_NET_ADMIN)"),
        _ => text,
    }
}

/// A link as the kernel reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Link {
    pub index: u32,
    pub name: String,
    pub mtu: Option<u32>,
    /// Administratively up (`IFF_UP`).
    pub up: bool,
    /// Index of the bridge it is a port of.
    pub master: Option<u32>,
}

/// An IPv4 route of the main table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    pub dest: Ipv4Addr,
    pub prefix: u8,
    pub via: Option<Ipv4Addr>,
    pub oif: Option<u32>,
    pub src: Option<Ipv4Addr>,
}

/// A blocking `NETLINK_ROUTE` socket in the network namespace of the thread
/// that opened it. Needs CAP_NET_ADMIN for changes.
pub struct Netlink {
    socket: Socket,
    seq: u32,
}

impl Netlink {
    pub fn open() -> Result<Self, Error> {
        let mut socket = Socket::new(NETLINK_ROUTE).map_err(Error::Socket)?;
        socket.bind(&SocketAddr::new(0, 0)).map_err(Error::Socket)?;
        Ok(Netlink { socket, seq: 0 })
    }

    /// Applies one change.
    pub fn apply(&mut self, op: &Op) -> Result<(), Error> {
        let what = || op.describe();
        let kernel = |source| Error::Kernel {
            what: what(),
            source,
        };
        let create = NLM_F_CREATE | NLM_F_EXCL;
        let replace = NLM_F_CREATE | NLM_F_REPLACE;
        match op {
            Op::AddBridge { name } => {
                let mut m = LinkMessage::default();
                m.attributes.push(LinkAttribute::IfName(name.clone()));
                m.attributes
                    .push(LinkAttribute::LinkInfo(vec![LinkInfo::Kind(
                        InfoKind::Bridge,
                    )]));
                self.request(RouteNetlinkMessage::NewLink(m), create)
                    .map_err(kernel)?;
            }
            Op::AddVeth {
                host,
                peer,
                peer_pid,
                mtu,
                peer_mac,
            } => {
                let mut p = LinkMessage::default();
                p.attributes.push(LinkAttribute::IfName(peer.clone()));
                if let Some(mac) = peer_mac {
                    p.attributes.push(LinkAttribute::Address(mac.to_vec()));
                }
                if let Some(mtu) = mtu {
                    p.attributes.push(LinkAttribute::Mtu(u32::from(*mtu)));
                }
                if let Some(pid) = peer_pid {
                    p.attributes.push(LinkAttribute::NetNsPid(*pid as u32));
                }
                let mut m = LinkMessage::default();
                m.attributes.push(LinkAttribute::IfName(host.clone()));
                if let Some(mtu) = mtu {
                    m.attributes.push(LinkAttribute::Mtu(u32::from(*mtu)));
                }
                m.attributes.push(LinkAttribute::LinkInfo(vec![
                    LinkInfo::Kind(InfoKind::Veth),
                    LinkInfo::Data(InfoData::Veth(InfoVeth::Peer(p))),
                ]));
                self.request(RouteNetlinkMessage::NewLink(m), create)
                    .map_err(kernel)?;
            }
            Op::DeleteLink { ifname } => {
                let mut m = LinkMessage::default();
                m.header.index = self.index_for(ifname, what)?;
                self.request(RouteNetlinkMessage::DelLink(m), 0)
                    .map_err(kernel)?;
            }
            Op::SetUp { ifname } | Op::SetDown { ifname } => {
                let mut m = LinkMessage::default();
                m.header.index = self.index_for(ifname, what)?;
                m.header.change_mask = LinkFlags::Up;
                if matches!(op, Op::SetUp { .. }) {
                    m.header.flags = LinkFlags::Up;
                }
                self.request(RouteNetlinkMessage::SetLink(m), 0)
                    .map_err(kernel)?;
            }
            Op::SetMtu { ifname, mtu } => {
                self.set_link(ifname, LinkAttribute::Mtu(u32::from(*mtu)), what)?;
            }
            Op::SetMaster { ifname, master } => {
                let master = self.index_for(master, what)?;
                self.set_link(ifname, LinkAttribute::Controller(master), what)?;
            }
            Op::MoveToNetns { ifname, pid } => {
                self.set_link(ifname, LinkAttribute::NetNsPid(*pid as u32), what)?;
            }
            Op::ReplaceAddress {
                ifname,
                addr,
                prefix,
            } => {
                let mut m = AddressMessage::default();
                m.header.family = AddressFamily::Inet;
                m.header.prefix_len = *prefix;
                m.header.index = self.index_for(ifname, what)?;
                m.attributes
                    .push(AddressAttribute::Local(IpAddr::V4(*addr)));
                m.attributes
                    .push(AddressAttribute::Address(IpAddr::V4(*addr)));
                self.request(RouteNetlinkMessage::NewAddress(m), replace)
                    .map_err(kernel)?;
            }
            Op::ReplaceRoute {
                dest,
                prefix,
                via,
                dev,
                src,
            } => {
                let mut m = RouteMessage::default();
                m.header.address_family = AddressFamily::Inet;
                m.header.destination_prefix_length = *prefix;
                m.header.table = RouteHeader::RT_TABLE_MAIN;
                m.header.protocol = RouteProtocol::Boot;
                m.header.kind = RouteType::Unicast;
                // What `ip` picks: on-link without a gateway, global with one.
                m.header.scope = if via.is_none() && dev.is_some() {
                    RouteScope::Link
                } else {
                    RouteScope::Universe
                };
                if *prefix > 0 {
                    m.attributes
                        .push(RouteAttribute::Destination(RouteAddress::Inet(*dest)));
                }
                if let Some(via) = via {
                    m.attributes
                        .push(RouteAttribute::Gateway(RouteAddress::Inet(*via)));
                }
                if let Some(dev) = dev {
                    let index = self.index_for(dev, what)?;
                    m.attributes.push(RouteAttribute::Oif(index));
                }
                if let Some(src) = src {
                    m.attributes
                        .push(RouteAttribute::PrefSource(RouteAddress::Inet(*src)));
                }
                self.request(RouteNetlinkMessage::NewRoute(m), replace)
                    .map_err(kernel)?;
            }
        }
        Ok(())
    }

    /// The link named `ifname`, or `None` when there is none.
    pub fn link(&mut self, ifname: &str) -> Result<Option<Link>, Error> {
        let mut m = LinkMessage::default();
        m.attributes.push(LinkAttribute::IfName(ifname.to_owned()));
        match self.request(RouteNetlinkMessage::GetLink(m), 0) {
            Ok(replies) => Ok(replies.into_iter().find_map(|r| match r {
                RouteNetlinkMessage::NewLink(l) => Some(link_of(l)),
                _ => None,
            })),
            Err(e) if e.raw_os_error() == Some(libc::ENODEV) => Ok(None),
            Err(source) => Err(Error::Kernel {
                what: format!("look up link {ifname}"),
                source,
            }),
        }
    }

    /// The IPv4 addresses (with prefix length) of `ifname`.
    pub fn addresses(&mut self, ifname: &str) -> Result<Vec<(Ipv4Addr, u8)>, Error> {
        let what = || format!("list the addresses of {ifname}");
        let index = self.index_for(ifname, what)?;
        let mut m = AddressMessage::default();
        m.header.family = AddressFamily::Inet;
        let replies = self
            .request(RouteNetlinkMessage::GetAddress(m), NLM_F_DUMP)
            .map_err(|source| Error::Kernel {
                what: what(),
                source,
            })?;
        Ok(replies
            .into_iter()
            .filter_map(|r| match r {
                RouteNetlinkMessage::NewAddress(a) if a.header.index == index => {
                    a.attributes.iter().find_map(|at| match at {
                        AddressAttribute::Local(IpAddr::V4(ip)) => Some((*ip, a.header.prefix_len)),
                        _ => None,
                    })
                }
                _ => None,
            })
            .collect())
    }

    /// The IPv4 routes of the main table.
    pub fn routes(&mut self) -> Result<Vec<Route>, Error> {
        let mut m = RouteMessage::default();
        m.header.address_family = AddressFamily::Inet;
        let replies = self
            .request(RouteNetlinkMessage::GetRoute(m), NLM_F_DUMP)
            .map_err(|source| Error::Kernel {
                what: "list routes".into(),
                source,
            })?;
        let v4 = |a: &RouteAddress| match a {
            RouteAddress::Inet(ip) => Some(*ip),
            _ => None,
        };
        Ok(replies
            .into_iter()
            .filter_map(|r| match r {
                RouteNetlinkMessage::NewRoute(r)
                    if r.header.table == RouteHeader::RT_TABLE_MAIN =>
                {
                    let mut route = Route {
                        dest: Ipv4Addr::UNSPECIFIED,
                        prefix: r.header.destination_prefix_length,
                        via: None,
                        oif: None,
                        src: None,
                    };
                    for a in &r.attributes {
                        match a {
                            RouteAttribute::Destination(d) => {
                                route.dest = v4(d).unwrap_or(route.dest)
                            }
                            RouteAttribute::Gateway(g) => route.via = v4(g),
                            RouteAttribute::PrefSource(s) => route.src = v4(s),
                            RouteAttribute::Oif(i) => route.oif = Some(*i),
                            _ => {}
                        }
                    }
                    Some(route)
                }
                _ => None,
            })
            .collect())
    }

    fn index_for(&mut self, ifname: &str, what: impl Fn() -> String) -> Result<u32, Error> {
        match self.link(ifname) {
            Ok(Some(l)) => Ok(l.index),
            Ok(None) => Err(Error::NoSuchLink {
                what: what(),
                ifname: ifname.to_owned(),
            }),
            Err(e) => Err(e),
        }
    }

    fn set_link(
        &mut self,
        ifname: &str,
        attr: LinkAttribute,
        what: impl Fn() -> String,
    ) -> Result<(), Error> {
        let mut m = LinkMessage::default();
        m.header.index = self.index_for(ifname, &what)?;
        m.attributes.push(attr);
        self.request(RouteNetlinkMessage::SetLink(m), 0)
            .map(drop)
            .map_err(|source| Error::Kernel {
                what: what(),
                source,
            })
    }

    /// Sends one request (acknowledged) and collects the kernel's replies
    /// until its acknowledgement, the end of a dump, or an error.
    fn request(
        &mut self,
        msg: RouteNetlinkMessage,
        flags: u16,
    ) -> io::Result<Vec<RouteNetlinkMessage>> {
        self.seq = self.seq.wrapping_add(1);
        let seq = self.seq;
        let mut req = NetlinkMessage::from(msg);
        req.header.flags = NLM_F_REQUEST | NLM_F_ACK | flags;
        req.header.sequence_number = seq;
        req.finalize();
        let mut buf = vec![0u8; req.buffer_len()];
        req.serialize(&mut buf);
        self.socket.send(&buf, 0)?;

        let mut replies = Vec::new();
        loop {
            let (datagram, _) = self.socket.recv_from_full()?;
            let mut at = 0;
            while at < datagram.len() {
                let msg = NetlinkMessage::<RouteNetlinkMessage>::deserialize(&datagram[at..])
                    .map_err(|e| io::Error::other(format!("malformed netlink reply: {e}")))?;
                let len = msg.header.length as usize;
                if msg.header.sequence_number == seq {
                    match msg.payload {
                        NetlinkPayload::InnerMessage(m) => replies.push(m),
                        NetlinkPayload::Error(e) => {
                            return match e.code {
                                None => Ok(replies),
                                Some(code) => Err(io::Error::from_raw_os_error(-code.get())),
                            };
                        }
                        NetlinkPayload::Done(_) => return Ok(replies),
                        _ => {}
                    }
                }
                if len == 0 {
                    break;
                }
                // Messages are 4-byte aligned within a datagram.
                at += (len + 3) & !3;
            }
        }
    }
}

fn link_of(l: LinkMessage) -> Link {
    let mut link = Link {
        index: l.header.index,
        name: String::new(),
        mtu: None,
        up: l.header.flags.contains(LinkFlags::Up),
        master: None,
    };
    for a in l.attributes {
        match a {
            LinkAttribute::IfName(n) => link.name = n,
            LinkAttribute::Mtu(m) => link.mtu = Some(m),
            LinkAttribute::Controller(m) => link.master = Some(m),
            _ => {}
        }
    }
    link
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ops_print_as_the_equivalent_ip_command() {
        let cases = [
            (
                Op::AddVeth {
                    host: "plzab".into(),
                    peer: "eth0".into(),
                    peer_pid: Some(42),
                    mtu: Some(1420),
                    peer_mac: None,
                },
                "ip link add name plzab mtu 1420 type veth peer name eth0 mtu 1420 netns 42",
            ),
            (
                Op::AddVeth {
                    host: "plzab".into(),
                    peer: "eth0".into(),
                    peer_pid: None,
                    mtu: None,
                    peer_mac: Some([0x02, 0x42, 10, 101, 3, 7]),
                },
                "ip link add name plzab type veth peer name eth0 address 02:42:0a:65:03:07",
            ),
            (
                Op::ReplaceRoute {
                    dest: Ipv4Addr::UNSPECIFIED,
                    prefix: 0,
                    via: Some(Ipv4Addr::new(10, 0, 0, 1)),
                    dev: None,
                    src: None,
                },
                "ip route replace default via 10.0.0.1",
            ),
            (
                Op::ReplaceRoute {
                    dest: Ipv4Addr::new(10, 101, 0, 0),
                    prefix: 16,
                    via: None,
                    dev: Some("plz0".into()),
                    src: Some(Ipv4Addr::new(10, 101, 3, 1)),
                },
                "ip route replace 10.101.0.0/16 dev plz0 src 10.101.3.1",
            ),
            (
                Op::MoveToNetns {
                    ifname: "v0".into(),
                    pid: 7,
                },
                "ip link set dev v0 netns 7",
            ),
        ];
        for (op, want) in cases {
            assert_eq!(op.to_string(), want);
        }
    }

    #[test]
    fn errors_say_what_failed_and_what_it_needs() {
        let op = Op::SetMtu {
            ifname: "plz0".into(),
            mtu: 1420,
        };
        let e = Error::Kernel {
            what: op.describe(),
            source: io::Error::from_raw_os_error(libc::EPERM),
        };
        assert_eq!(
            e.to_string(),
            "cannot set mtu 1420 on plz0: Operation not permitted (needs CAP_NET_ADMIN)"
        );
        assert_eq!(e.errno(), Some(libc::EPERM));
        let route = Op::ReplaceRoute {
            dest: Ipv4Addr::UNSPECIFIED,
            prefix: 0,
            via: Some(Ipv4Addr::new(10, 0, 0, 1)),
            dev: None,
            src: None,
        };
        assert_eq!(route.describe(), "add route default via 10.0.0.1");
    }
}
