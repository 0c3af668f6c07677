//! The internal resolver every workload uses: UDP and TCP port 53 on the
//! workload bridge's gateway address of its machine. `SERVICE.internal`
//! answers the overlay addresses of the service's ready instances,
//! `SLOT.SERVICE.internal` that one instance; unknown names under
//! `.internal` are NXDOMAIN; everything else is relayed to the host's
//! resolvers (`/etc/resolv.conf`). [`answer`] is the pure core.

use super::table::Table;
use super::Ingress;
use hickory_proto::op::{Message, MessageType, OpCode, ResponseCode};
use hickory_proto::rr::{rdata::A, Name, RData, Record, RecordType};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};

/// The zone the resolver answers itself.
pub const ZONE: &str = "internal";
/// Answers may change at any moment: nobody should keep them.
const TTL: u32 = 0;
/// How long one upstream resolver gets for a relayed query.
const UPSTREAM_TIMEOUT: Duration = Duration::from_secs(2);

/// Queries by result (`/metrics`).
#[derive(Default)]
pub struct DnsStats {
    pub answered: AtomicU64,
    pub nxdomain: AtomicU64,
    pub forwarded: AtomicU64,
    pub failed: AtomicU64,
}

/// What to do with one query.
#[derive(Debug, PartialEq, Eq)]
pub enum Decision {
    /// Send this reply (`nx`: it says NXDOMAIN).
    Reply { bytes: Vec<u8>, nx: bool },
    /// Not ours: relay the query to the host's resolvers.
    Forward,
    /// Not even a readable header: drop it.
    Drop,
}

/// Answers `query` from `table` (pure).
pub fn answer(table: &Table, query: &[u8]) -> Decision {
    let msg = match Message::from_vec(query) {
        Ok(m) => m,
        Err(_) if query.len() >= 2 => {
            let id = u16::from_be_bytes([query[0], query[1]]);
            return reply(
                Message::error_msg(id, OpCode::Query, ResponseCode::FormErr),
                false,
            );
        }
        Err(_) => return Decision::Drop,
    };
    let id = msg.metadata.id;
    if msg.metadata.message_type != MessageType::Query
        || msg.metadata.op_code != OpCode::Query
        || msg.queries.len() != 1
    {
        return reply(
            Message::error_msg(id, msg.metadata.op_code, ResponseCode::FormErr),
            false,
        );
    }
    let q = &msg.queries[0];
    let name = q.name().to_ascii().to_ascii_lowercase();
    let name = name.trim_end_matches('.');
    let labels: Vec<&str> = match name.strip_suffix(ZONE) {
        Some("") => Vec::new(),
        Some(rest) if rest.ends_with('.') => rest.trim_end_matches('.').split('.').collect(),
        _ => return Decision::Forward,
    };
    let ips: Option<Vec<Ipv4Addr>> = match labels.as_slice() {
        [service] => table
            .services
            .get(*service)
            .map(|b| b.iter().map(|b| b.ip).collect()),
        [slot, service] => table.services.get(*service).and_then(|b| {
            let slot: u32 = slot.parse().ok()?;
            b.iter().find(|b| b.slot == slot).map(|b| vec![b.ip])
        }),
        // The zone itself exists (no records of its own).
        [] => Some(Vec::new()),
        _ => None,
    };
    let mut out = Message::response(id, OpCode::Query);
    out.metadata.authoritative = true;
    out.metadata.recursion_desired = msg.metadata.recursion_desired;
    out.metadata.recursion_available = true;
    out.add_query(q.clone());
    let Some(mut ips) = ips else {
        out.metadata.response_code = ResponseCode::NXDomain;
        return reply(out, true);
    };
    if matches!(q.query_type(), RecordType::A | RecordType::ANY) {
        // Spread clients over the instances.
        if !ips.is_empty() {
            let n = usize::from(id) % ips.len();
            ips.rotate_left(n);
        }
        let owner: Name = q.name().clone();
        for ip in ips {
            out.add_answer(Record::from_rdata(owner.clone(), TTL, RData::A(A(ip))));
        }
    }
    reply(out, false)
}

fn reply(m: Message, nx: bool) -> Decision {
    match m.to_vec() {
        Ok(bytes) => Decision::Reply { bytes, nx },
        Err(_) => Decision::Drop,
    }
}

/// The host's resolvers as read from `/etc/resolv.conf` at `stamp`
/// (modification time, size), without `skip`.
pub(super) struct Upstreams {
    stamp: Option<(Option<std::time::SystemTime>, u64)>,
    skip: Ipv4Addr,
    resolvers: Vec<SocketAddr>,
}

/// The resolvers of the host (`nameserver` lines of `/etc/resolv.conf`),
/// without `skip` (this resolver itself).
pub fn host_resolvers(resolv_conf: &str, skip: Ipv4Addr) -> Vec<SocketAddr> {
    resolv_conf
        .lines()
        .filter_map(|l| {
            let mut w = l.split_whitespace();
            (w.next() == Some("nameserver")).then(|| w.next())?
        })
        .filter_map(|a| a.split('%').next()?.parse::<IpAddr>().ok())
        .filter(|ip| *ip != IpAddr::V4(skip))
        .map(|ip| SocketAddr::new(ip, 53))
        .collect()
}

impl Ingress {
    /// Serves DNS on this machine's gateway address once it is known,
    /// retrying the bind until the address exists. Runs until aborted.
    pub(super) async fn serve_dns(self: Arc<Self>) {
        let mut bound: Option<(Ipv4Addr, Vec<tokio::task::JoinHandle<()>>)> = None;
        let mut warned = false;
        loop {
            let want = self.dns_address();
            if bound.as_ref().map(|b| b.0) != want {
                if let Some((_, tasks)) = bound.take() {
                    tasks.iter().for_each(|t| t.abort());
                }
                if let Some(addr) = want {
                    match self.bind_dns(addr).await {
                        Ok(tasks) => {
                            tracing::info!(%addr, "internal DNS listening");
                            bound = Some((addr, tasks));
                        }
                        Err(e) => {
                            if !warned {
                                tracing::info!(%addr, "internal DNS cannot listen yet: {e}");
                                warned = true;
                            }
                        }
                    }
                }
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    async fn bind_dns(
        self: &Arc<Self>,
        addr: Ipv4Addr,
    ) -> std::io::Result<Vec<tokio::task::JoinHandle<()>>> {
        let udp = Arc::new(UdpSocket::bind((addr, 53)).await?);
        let tcp = TcpListener::bind((addr, 53)).await?;
        let me = self.clone();
        let u = tokio::spawn(async move {
            let mut buf = vec![0u8; 4096];
            loop {
                let Ok((n, from)) = udp.recv_from(&mut buf).await else {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    continue;
                };
                let query = buf[..n].to_vec();
                match me.decide(&query) {
                    Decision::Reply { bytes, .. } => {
                        let _ = udp.send_to(&bytes, from).await;
                    }
                    Decision::Forward => {
                        let (me, udp) = (me.clone(), udp.clone());
                        tokio::spawn(async move {
                            if let Some(r) = me.relay_udp(&query, addr).await {
                                let _ = udp.send_to(&r, from).await;
                            }
                        });
                    }
                    Decision::Drop => {}
                }
            }
        });
        let me = self.clone();
        let t = tokio::spawn(async move {
            loop {
                let Ok((conn, _)) = tcp.accept().await else {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    continue;
                };
                let me = me.clone();
                tokio::spawn(async move {
                    let _ = me.serve_dns_tcp(conn, addr).await;
                });
            }
        });
        Ok(vec![u, t])
    }

    /// Answers from the table, counting the result.
    fn decide(&self, query: &[u8]) -> Decision {
        let d = answer(&self.table(), query);
        let s = &self.stats.dns;
        match &d {
            Decision::Reply { nx: true, .. } => s.nxdomain.fetch_add(1, Ordering::Relaxed),
            Decision::Reply { nx: false, .. } => s.answered.fetch_add(1, Ordering::Relaxed),
            Decision::Forward => s.forwarded.fetch_add(1, Ordering::Relaxed),
            Decision::Drop => s.failed.fetch_add(1, Ordering::Relaxed),
        };
        d
    }

    async fn serve_dns_tcp(&self, mut conn: TcpStream, addr: Ipv4Addr) -> std::io::Result<()> {
        loop {
            let len = match tokio::time::timeout(Duration::from_secs(10), conn.read_u16()).await {
                Ok(Ok(l)) => usize::from(l),
                _ => return Ok(()),
            };
            let mut query = vec![0u8; len];
            conn.read_exact(&mut query).await?;
            let bytes = match self.decide(&query) {
                Decision::Reply { bytes, .. } => bytes,
                Decision::Forward => match self.relay_tcp(&query, addr).await {
                    Some(r) => r,
                    None => return Ok(()),
                },
                Decision::Drop => return Ok(()),
            };
            conn.write_u16(bytes.len() as u16).await?;
            conn.write_all(&bytes).await?;
        }
    }

    /// The host's resolvers: /etc/resolv.conf is read again only when its
    /// modification time or size changed (one `stat` per relayed query).
    fn upstreams(&self, addr: Ipv4Addr) -> Vec<SocketAddr> {
        const RESOLV_CONF: &str = "/etc/resolv.conf";
        let stamp = std::fs::metadata(RESOLV_CONF)
            .ok()
            .map(|m| (m.modified().ok(), m.len()));
        let mut cache = self.upstreams.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(c) = cache.as_ref() {
            if stamp.is_some() && c.stamp == stamp && c.skip == addr {
                return c.resolvers.clone();
            }
        }
        let resolvers = std::fs::read_to_string(RESOLV_CONF)
            .map(|c| host_resolvers(&c, addr))
            .unwrap_or_default();
        *cache = Some(Upstreams {
            stamp,
            skip: addr,
            resolvers: resolvers.clone(),
        });
        resolvers
    }

    async fn relay_udp(&self, query: &[u8], addr: Ipv4Addr) -> Option<Vec<u8>> {
        for up in self.upstreams(addr) {
            let bind: SocketAddr = if up.is_ipv4() {
                (Ipv4Addr::UNSPECIFIED, 0).into()
            } else {
                (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
            };
            let Ok(sock) = UdpSocket::bind(bind).await else {
                continue;
            };
            if sock.connect(up).await.is_err() || sock.send(query).await.is_err() {
                continue;
            }
            let mut buf = vec![0u8; 65_536];
            if let Ok(Ok(n)) = tokio::time::timeout(UPSTREAM_TIMEOUT, sock.recv(&mut buf)).await {
                buf.truncate(n);
                return Some(buf);
            }
        }
        self.stats.dns.failed.fetch_add(1, Ordering::Relaxed);
        None
    }

    async fn relay_tcp(&self, query: &[u8], addr: Ipv4Addr) -> Option<Vec<u8>> {
        for up in self.upstreams(addr) {
            let once = async {
                let mut s = TcpStream::connect(up).await?;
                s.write_u16(query.len() as u16).await?;
                s.write_all(query).await?;
                let n = usize::from(s.read_u16().await?);
                let mut r = vec![0u8; n];
                s.read_exact(&mut r).await?;
                Ok::<_, std::io::Error>(r)
            };
            if let Ok(Ok(r)) = tokio::time::timeout(UPSTREAM_TIMEOUT, once).await {
                return Some(r);
            }
        }
        self.stats.dns.failed.fetch_add(1, Ordering::Relaxed);
        None
    }
}

#[cfg(test)]
mod tests {
    use super::super::table::Backend;
    use super::*;
    use hickory_proto::op::Query;

    fn table() -> Table {
        let b = |ip: [u8; 4], slot| Backend {
            ip: ip.into(),
            machine: "m".into(),
            slot,
        };
        let mut t = Table::default();
        t.services.insert(
            "web".into(),
            vec![b([10, 101, 1, 2], 0), b([10, 101, 2, 2], 1)],
        );
        t.services.insert("idle".into(), vec![]);
        t
    }

    fn ask(name: &str, ty: RecordType) -> Vec<u8> {
        let mut m = Message::new(7, MessageType::Query, OpCode::Query);
        m.metadata.recursion_desired = true;
        m.add_query(Query::query(Name::from_ascii(name).unwrap(), ty));
        m.to_vec().unwrap()
    }

    fn reply_of(d: Decision) -> (ResponseCode, Vec<Ipv4Addr>) {
        let Decision::Reply { bytes, .. } = d else {
            panic!("no reply: {d:?}");
        };
        let m = Message::from_vec(&bytes).unwrap();
        assert_eq!(m.metadata.id, 7);
        let mut ips: Vec<Ipv4Addr> = m
            .answers
            .iter()
            .filter_map(|r| match &r.data {
                RData::A(a) => Some(a.0),
                _ => None,
            })
            .collect();
        ips.sort();
        (m.metadata.response_code, ips)
    }

    #[test]
    fn services_answer_their_ready_instances() {
        let t = table();
        let (code, ips) = reply_of(answer(&t, &ask("web.internal.", RecordType::A)));
        assert_eq!(code, ResponseCode::NoError);
        assert_eq!(
            ips,
            [Ipv4Addr::new(10, 101, 1, 2), Ipv4Addr::new(10, 101, 2, 2)]
        );
        let (_, ips) = reply_of(answer(&t, &ask("WEB.Internal", RecordType::A)));
        assert_eq!(ips.len(), 2);
        let (_, ips) = reply_of(answer(&t, &ask("1.web.internal.", RecordType::A)));
        assert_eq!(ips, [Ipv4Addr::new(10, 101, 2, 2)]);
        // A service without ready instances exists, with no addresses.
        let (code, ips) = reply_of(answer(&t, &ask("idle.internal.", RecordType::A)));
        assert_eq!((code, ips.len()), (ResponseCode::NoError, 0));
        // AAAA of a service: no data, not NXDOMAIN (so clients fall back to A).
        let (code, ips) = reply_of(answer(&t, &ask("web.internal.", RecordType::AAAA)));
        assert_eq!((code, ips.len()), (ResponseCode::NoError, 0));
    }

    #[test]
    fn unknown_names_under_the_zone_are_nxdomain() {
        let t = table();
        for n in [
            "db.internal.",
            "7.web.internal.",
            "x.web.internal.",
            "a.b.c.internal.",
        ] {
            let d = answer(&t, &ask(n, RecordType::A));
            assert!(matches!(d, Decision::Reply { nx: true, .. }), "{n}");
            assert_eq!(reply_of(d).0, ResponseCode::NXDomain, "{n}");
        }
    }

    #[test]
    fn other_names_are_forwarded_and_garbage_is_formerr() {
        let t = table();
        for n in ["example.com.", "internal.example.com.", "xinternal."] {
            assert_eq!(answer(&t, &ask(n, RecordType::A)), Decision::Forward, "{n}");
        }
        assert_eq!(answer(&t, &[1]), Decision::Drop);
        let Decision::Reply { bytes, .. } = answer(&t, &[0, 7, 0xff, 0xff, 0, 9]) else {
            panic!("garbage gets FORMERR");
        };
        assert_eq!(
            Message::from_vec(&bytes).unwrap().metadata.response_code,
            ResponseCode::FormErr
        );
    }

    #[test]
    fn host_resolvers_skip_ourselves() {
        let conf = "# x\nnameserver 10.0.0.1\nnameserver 10.101.1.1\nsearch internal\nnameserver fe80::1%eth0\n";
        let got = host_resolvers(conf, Ipv4Addr::new(10, 101, 1, 1));
        assert_eq!(
            got,
            [
                "10.0.0.1:53".parse::<SocketAddr>().unwrap(),
                "[fe80::1]:53".parse().unwrap()
            ]
        );
    }
}
