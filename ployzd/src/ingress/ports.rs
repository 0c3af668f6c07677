//! Published-port listeners: one socket per `(address, port, protocol)`
//! on a serving machine. A TCP connection is forwarded to the first backend
//! (this machine's instances first) that accepts it within
//! [`CONNECT_TIMEOUT`]; a UDP flow (per client address) is pinned to one
//! backend until it has been idle for [`UDP_IDLE`]. Backends are reached on
//! their overlay addresses: the kernel routes the cluster range into the
//! mesh interface (remote instances) or the workload bridge (local ones).

use super::{table, Ingress};
use ployz_api::{Protocol, PublishedPort};
use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::net::{TcpListener, TcpStream, UdpSocket};

/// A backend that does not accept a connection within this is skipped.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// A UDP flow without a datagram either way for this long is dropped.
pub const UDP_IDLE: Duration = Duration::from_secs(30);

/// What a listener listens on.
pub type Key = (Option<Ipv4Addr>, u16, Protocol);

pub fn key_of(p: &PublishedPort) -> Key {
    (p.host_ip, p.host_port, p.protocol)
}

fn bind_addr(k: &Key) -> SocketAddr {
    SocketAddr::V4(SocketAddrV4::new(k.0.unwrap_or(Ipv4Addr::UNSPECIFIED), k.1))
}

impl Ingress {
    /// Listens on what `table` publishes (nothing when this machine does
    /// not serve) and stops listening on the rest.
    pub(super) fn converge(self: &Arc<Self>, t: &table::Table) {
        let want: Vec<Key> = if t.serving {
            t.ports.iter().map(|p| key_of(&p.port)).collect()
        } else {
            Vec::new()
        };
        let mut listeners = self.listeners.lock().unwrap_or_else(|e| e.into_inner());
        listeners.retain(|k, task| {
            let keep = want.contains(k) && !task.is_finished();
            if !keep {
                task.abort();
                tracing::info!(port = k.1, protocol = %k.2, "stopped listening");
            }
            keep
        });
        for k in want {
            if listeners.contains_key(&k) {
                continue;
            }
            match self.listen(k) {
                Ok(task) => {
                    tracing::info!(port = k.1, protocol = %k.2, "listening on a published port");
                    self.failed
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .remove(&k);
                    listeners.insert(k, task);
                }
                Err(e) => {
                    if self
                        .failed
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .insert(k)
                    {
                        tracing::warn!(port = k.1, protocol = %k.2, "cannot listen on a published port: {e}");
                    }
                }
            }
        }
    }

    fn listen(self: &Arc<Self>, k: Key) -> std::io::Result<tokio::task::JoinHandle<()>> {
        let addr = bind_addr(&k);
        let me = self.clone();
        Ok(match k.2 {
            Protocol::Tcp => {
                let std = std::net::TcpListener::bind(addr)?;
                std.set_nonblocking(true)?;
                let l = TcpListener::from_std(std)?;
                tokio::spawn(async move {
                    loop {
                        match l.accept().await {
                            Ok((conn, _)) => {
                                let me = me.clone();
                                tokio::spawn(async move { me.forward_tcp(k, conn).await });
                            }
                            Err(e) => {
                                tracing::debug!("accept: {e}");
                                tokio::time::sleep(Duration::from_millis(50)).await;
                            }
                        }
                    }
                })
            }
            Protocol::Udp => {
                let std = std::net::UdpSocket::bind(addr)?;
                std.set_nonblocking(true)?;
                let s = Arc::new(UdpSocket::from_std(std)?);
                tokio::spawn(async move { me.serve_udp(k, s).await })
            }
        })
    }

    /// The service and container port behind `k`, and the backends to
    /// try, in order.
    fn route(&self, k: &Key) -> Option<(u16, Vec<Ipv4Addr>)> {
        let t = self.table();
        let p = t.ports.iter().find(|p| key_of(&p.port) == *k)?;
        let order = table::order(t.backends(&p.service), &self.me, self.next_turn());
        Some((p.port.container_port, order))
    }

    async fn forward_tcp(&self, k: Key, mut conn: TcpStream) {
        let Some((port, order)) = self.route(&k) else {
            self.stats.tcp_failed.fetch_add(1, Ordering::Relaxed);
            return;
        };
        for ip in order {
            match tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect((ip, port))).await {
                Ok(Ok(mut up)) => {
                    self.stats.tcp_forwarded.fetch_add(1, Ordering::Relaxed);
                    let _ = conn.set_nodelay(true);
                    let _ = up.set_nodelay(true);
                    let _ = tokio::io::copy_bidirectional(&mut conn, &mut up).await;
                    return;
                }
                Ok(Err(e)) => tracing::debug!(%ip, port, "backend refused: {e}"),
                Err(_) => tracing::debug!(%ip, port, "backend did not accept in time"),
            }
        }
        self.stats.tcp_failed.fetch_add(1, Ordering::Relaxed);
    }

    async fn serve_udp(self: Arc<Self>, k: Key, sock: Arc<UdpSocket>) {
        type Flows = Arc<Mutex<HashMap<SocketAddr, (Arc<UdpSocket>, Arc<AtomicU64>)>>>;
        let flows: Flows = Arc::default();
        let start = Instant::now();
        let mut buf = vec![0u8; 65_536];
        loop {
            let (n, client) = match sock.recv_from(&mut buf).await {
                Ok(r) => r,
                Err(e) => {
                    tracing::debug!("udp recv: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let existing = flows
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .get(&client)
                .cloned();
            let now = start.elapsed().as_millis() as u64;
            let up = match existing {
                Some((up, last)) => {
                    last.store(now, Ordering::Relaxed);
                    up
                }
                None => {
                    let Some(up) = self.open_udp_flow(&k).await else {
                        self.stats.udp_failed.fetch_add(1, Ordering::Relaxed);
                        continue;
                    };
                    self.stats.udp_flows.fetch_add(1, Ordering::Relaxed);
                    let last = Arc::new(AtomicU64::new(now));
                    flows
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .insert(client, (up.clone(), last.clone()));
                    let (flows, sock, up2) = (flows.clone(), sock.clone(), up.clone());
                    tokio::spawn(async move {
                        udp_replies(up2, sock, client, start, last).await;
                        flows
                            .lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .remove(&client);
                    });
                    up
                }
            };
            let _ = up.send(&buf[..n]).await;
        }
    }

    async fn open_udp_flow(&self, k: &Key) -> Option<Arc<UdpSocket>> {
        let (port, order) = self.route(k)?;
        let ip = *order.first()?;
        let up = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0)).await.ok()?;
        up.connect((ip, port)).await.ok()?;
        Some(Arc::new(up))
    }

    /// Whether this machine could listen on each of `ports` for `service`:
    /// `None` if so, else who holds it.
    pub fn check_ports(&self, service: &str, ports: &[PublishedPort]) -> Vec<Option<String>> {
        let t = self.table();
        let held: Vec<Key> = self
            .listeners
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .keys()
            .copied()
            .collect();
        ports
            .iter()
            .map(|p| {
                let ours = held.iter().any(|k| {
                    k.1 == p.host_port
                        && k.2 == p.protocol
                        && (k.0.is_none() || p.host_ip.is_none() || k.0 == p.host_ip)
                });
                if ours {
                    return match t.owner_of(p) {
                        Some(owner) if owner == service => None,
                        Some(owner) => Some(format!("service `{owner}`")),
                        None => None,
                    };
                }
                let addr = bind_addr(&key_of(p));
                let tried = match p.protocol {
                    Protocol::Tcp => std::net::TcpListener::bind(addr).map(drop),
                    Protocol::Udp => std::net::UdpSocket::bind(addr).map(drop),
                };
                match tried {
                    Ok(()) => None,
                    // That address is not on this machine: nothing to clash with.
                    Err(e) if e.kind() == std::io::ErrorKind::AddrNotAvailable => None,
                    Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => {
                        Some(format!("a process on machine {}", self.me))
                    }
                    Err(e) => Some(format!("machine {} (cannot listen: {e})", self.me)),
                }
            })
            .collect()
    }
}

/// Relays a flow's replies to its client until no datagram went either
/// way for [`UDP_IDLE`] (`last`: ms since `start` of the last one).
async fn udp_replies(
    up: Arc<UdpSocket>,
    sock: Arc<UdpSocket>,
    client: SocketAddr,
    start: Instant,
    last: Arc<AtomicU64>,
) {
    let mut buf = vec![0u8; 65_536];
    loop {
        let idle = Duration::from_millis(
            (start.elapsed().as_millis() as u64).saturating_sub(last.load(Ordering::Relaxed)),
        );
        let Some(left) = UDP_IDLE.checked_sub(idle).filter(|d| !d.is_zero()) else {
            return;
        };
        match tokio::time::timeout(left, up.recv(&mut buf)).await {
            Ok(Ok(n)) => {
                last.store(start.elapsed().as_millis() as u64, Ordering::Relaxed);
                let _ = sock.send_to(&buf[..n], client).await;
            }
            // An ICMP error from the backend ends the flow; a timeout
            // looks again at when the client last sent.
            Ok(Err(_)) => return,
            Err(_) => {}
        }
    }
}
