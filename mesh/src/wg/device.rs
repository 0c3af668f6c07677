//! The userspace WireGuard device: a TUN interface, one UDP socket, the peer
//! table, and three threads: the data path (TUN→encrypt→UDP and
//! UDP→decrypt→TUN on one thread, so a lone packet wakes nobody else),
//! timers (handshakes, keepalives, rekeys via `Tunn::update_timers`) and
//! the UAPI control socket so `wg show <if>` and `wg set <if>` work.
//!
//! The protocol itself is boringtun's `noise::Tunn`: it touches no IO; this
//! file only moves bytes between it, the TUN and the socket. No allocation
//! per packet: the data thread owns its buffers. Offloads, each negotiated
//! and skipped (logged) when the kernel refuses: TSO from the TUN (64 KB
//! TCP super-packets we cut into segments, [`super::offload`]), coalesced
//! writes to it (GRO), UDP GSO on send and UDP GRO on receive; UDP IO is
//! batched (`recvmmsg`/`sendmmsg`).

use std::collections::HashMap;
use std::io::{self, BufRead, BufReader, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6, UdpSocket};
use std::os::fd::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::thread::JoinHandle;
use std::time::{Duration, SystemTime};

use boringtun::noise::errors::WireGuardError;
use boringtun::noise::handshake::parse_handshake_anon;
use boringtun::noise::rate_limiter::RateLimiter;
use boringtun::noise::{Packet, Tunn, TunnResult};
use boringtun::x25519::{PublicKey, StaticSecret};

use super::allowed::{AllowedIp, RouteTable};
use super::batch::{self, RecvBatch, SendBatch, SLOT};
use super::offload::{self, Gro, VnetHdr, VNET_HDR_LEN};
use super::tun::{poll_ready, wait_readable, Tun};
use super::uapi::{self, DeviceInfo, PeerInfo, SetRequest};

/// How often idle worker threads look at the stop flag.
const TICK: Duration = Duration::from_millis(100);
/// `Tunn::update_timers` cadence (boringtun's own device uses 250 ms).
const TIMER_TICK: Duration = Duration::from_millis(250);
/// Handshakes per second before we answer with cookies.
const HANDSHAKE_RATE_LIMIT: u64 = 100;
/// Largest datagram / packet we read; per-thread, allocated once.
const BUF: usize = 65_536;
/// A TUN read: a 64 KB TSO super-packet after its virtio_net_hdr.
const TUN_BUF: usize = 65_536 + VNET_HDR_LEN;
/// TUN reads per round before the socket gets its turn.
const TUN_READS: usize = 64;
/// Decrypted packets of one receive round, written (coalesced) at its end.
const RX_ARENA: usize = 1 << 20;
/// Room for the WireGuard header and tag around a packet.
const OVERHEAD: usize = 64;
/// Socket buffers: large enough to ride out a scheduling hiccup at Gbit/s.
const SOCKET_BUFFER: usize = 4 << 20;

/// Set to `0` to run the data path without any offload (no vnet header,
/// TSO, UDP GSO/GRO): an escape hatch for a kernel that misbehaves, and
/// how the tests mix offloading and plain nodes.
pub const OFFLOAD_ENV: &str = "PLOYZ_MESH_OFFLOAD";

#[derive(Debug, Clone)]
pub struct DeviceConfig {
    pub ifname: String,
    pub private_key: [u8; 32],
    pub listen_port: u16,
    /// Directory of the UAPI socket; `wg` looks in [`uapi::SOCKET_DIR`].
    pub socket_dir: PathBuf,
}

#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    #[error("could not create TUN interface `{ifname}`: {source} (needs CAP_NET_ADMIN and /dev/net/tun)")]
    Tun { ifname: String, source: io::Error },
    #[error("could not bind UDP port {port}: {source} (is another WireGuard device using it?)")]
    Bind { port: u16, source: io::Error },
    #[error("a WireGuard device already answers on {}; stop it first", path.display())]
    AlreadyRunning { path: PathBuf },
    #[error("could not create control socket {}: {source}", path.display())]
    ControlSocket { path: PathBuf, source: io::Error },
    #[error("could not start a device thread: {0}")]
    Thread(io::Error),
}

/// A configuration change the device refused.
#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    #[error("listen port is {current}; changing it to {requested} needs a restart of the device")]
    ListenPort { current: u16, requested: u16 },
    #[error("could not set fwmark {mark}: {source}")]
    Fwmark { mark: u32, source: io::Error },
}

impl ApplyError {
    pub fn errno(&self) -> i32 {
        match self {
            ApplyError::ListenPort { .. } => libc::EADDRINUSE,
            ApplyError::Fwmark { source, .. } => source.raw_os_error().unwrap_or(libc::EIO),
        }
    }
}

struct Keys {
    secret: StaticSecret,
    public: PublicKey,
    limiter: Arc<RateLimiter>,
}

impl Keys {
    fn new(secret: [u8; 32]) -> Keys {
        let secret = StaticSecret::from(secret);
        let public = PublicKey::from(&secret);
        let limiter = Arc::new(RateLimiter::new(&public, HANDSHAKE_RATE_LIMIT));
        Keys {
            secret,
            public,
            limiter,
        }
    }
}

struct Peer {
    public_key: [u8; 32],
    index: u32,
    state: Mutex<PeerState>,
    rx_bytes: AtomicU64,
    tx_bytes: AtomicU64,
}

struct PeerState {
    tunn: Tunn,
    endpoint: Option<SocketAddr>,
    keepalive: Option<u16>,
    preshared_key: Option<[u8; 32]>,
}

#[derive(Default)]
struct Table {
    by_key: HashMap<[u8; 32], Arc<Peer>>,
    by_index: HashMap<u32, Arc<Peer>>,
    routes: RouteTable<Arc<Peer>>,
}

impl Table {
    fn remove(&mut self, key: &[u8; 32]) {
        if let Some(peer) = self.by_key.remove(key) {
            self.by_index.remove(&peer.index);
            self.routes.retain(|_, p| !Arc::ptr_eq(p, &peer));
        }
    }

    fn free_index(&self) -> u32 {
        loop {
            // Tunn shifts the index left by 8 bits: 24 bits are ours.
            let i = rand::random::<u32>() & 0x00ff_ffff;
            if !self.by_index.contains_key(&i) {
                return i;
            }
        }
    }
}

struct Shared {
    tun: Tun,
    udp: UdpSocket,
    /// Whether to try UDP GSO/GRO (see [`OFFLOAD_ENV`]).
    offload: bool,
    dual_stack: bool,
    listen_port: u16,
    keys: RwLock<Keys>,
    table: RwLock<Table>,
    fwmark: Mutex<Option<u32>>,
    stop: AtomicBool,
}

/// A running device. Dropping it stops the threads, removes the control
/// socket and deletes the interface.
pub struct Device {
    shared: Arc<Shared>,
    threads: Vec<JoinHandle<()>>,
    socket_path: PathBuf,
}

// Locks are only poisoned by a panic in a device thread; the data they guard
// stays consistent (every update is a single assignment), so carry on.
fn read<T>(l: &RwLock<T>) -> RwLockReadGuard<'_, T> {
    l.read().unwrap_or_else(|e| e.into_inner())
}
fn write<T>(l: &RwLock<T>) -> RwLockWriteGuard<'_, T> {
    l.write().unwrap_or_else(|e| e.into_inner())
}
fn lock<T>(l: &Mutex<T>) -> MutexGuard<'_, T> {
    l.lock().unwrap_or_else(|e| e.into_inner())
}

impl Device {
    pub fn start(cfg: DeviceConfig) -> Result<Device, DeviceError> {
        let socket_path = cfg.socket_dir.join(format!("{}.sock", cfg.ifname));
        if UnixStream::connect(&socket_path).is_ok() {
            return Err(DeviceError::AlreadyRunning { path: socket_path });
        }
        let offload = std::env::var_os(OFFLOAD_ENV).is_none_or(|v| v != "0");
        if !offload {
            tracing::info!("{OFFLOAD_ENV}=0: data path without offloads");
        }
        let open = if offload {
            Tun::open_offload
        } else {
            Tun::open
        };
        let tun = open(&cfg.ifname).map_err(|source| DeviceError::Tun {
            ifname: cfg.ifname.clone(),
            source,
        })?;
        let (udp, dual_stack) = bind_udp(cfg.listen_port).map_err(|source| DeviceError::Bind {
            port: cfg.listen_port,
            source,
        })?;
        let listen_port = udp
            .local_addr()
            .map_err(|source| DeviceError::Bind {
                port: cfg.listen_port,
                source,
            })?
            .port();
        let listener = bind_control(&cfg.socket_dir, &socket_path).map_err(|source| {
            DeviceError::ControlSocket {
                path: socket_path.clone(),
                source,
            }
        })?;

        let shared = Arc::new(Shared {
            tun,
            udp,
            offload,
            dual_stack,
            listen_port,
            keys: RwLock::new(Keys::new(cfg.private_key)),
            table: RwLock::new(Table::default()),
            fwmark: Mutex::new(None),
            stop: AtomicBool::new(false),
        });
        let mut dev = Device {
            shared,
            threads: Vec::new(),
            socket_path,
        };
        let name = cfg.ifname;
        dev.spawn(format!("{name}-data"), |s| s.data_loop())?;
        dev.spawn(format!("{name}-timers"), |s| s.timer_loop())?;
        dev.spawn(format!("{name}-uapi"), move |s| s.uapi_loop(&listener))?;
        Ok(dev)
    }

    fn spawn(
        &mut self,
        name: String,
        f: impl FnOnce(&Shared) + Send + 'static,
    ) -> Result<(), DeviceError> {
        let shared = Arc::clone(&self.shared);
        let h = std::thread::Builder::new()
            .name(name)
            .spawn(move || f(&shared))
            .map_err(DeviceError::Thread)?;
        self.threads.push(h);
        Ok(())
    }

    pub fn name(&self) -> &str {
        self.shared.tun.name()
    }

    pub fn listen_port(&self) -> u16 {
        self.shared.listen_port
    }

    pub fn public_key(&self) -> [u8; 32] {
        read(&self.shared.keys).public.to_bytes()
    }

    pub fn apply(&self, req: SetRequest) -> Result<(), ApplyError> {
        self.shared.apply(req)
    }

    pub fn info(&self) -> DeviceInfo {
        self.shared.info()
    }

    /// Stop the threads, remove the control socket, delete the interface.
    pub fn stop(mut self) {
        self.shutdown();
    }

    fn shutdown(&mut self) {
        self.shared.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            if t.join().is_err() {
                tracing::error!("a WireGuard device thread panicked");
            }
        }
        let _ = std::fs::remove_file(&self.socket_path);
    }
}

impl Drop for Device {
    fn drop(&mut self) {
        self.shutdown();
    }
}

fn bind_udp(port: u16) -> io::Result<(UdpSocket, bool)> {
    use socket2::{Domain, Protocol, Socket, Type};
    let dual = (|| {
        let s = Socket::new(Domain::IPV6, Type::DGRAM, Some(Protocol::UDP))?;
        s.set_only_v6(false)?;
        s.bind(&SocketAddr::from((Ipv6Addr::UNSPECIFIED, port)).into())?;
        Ok::<_, io::Error>(s)
    })();
    let (sock, dual_stack) = match dual {
        Ok(s) => (s, true),
        Err(_) => {
            // IPv6 disabled on this host: IPv4 only.
            let s = Socket::new(Domain::IPV4, Type::DGRAM, Some(Protocol::UDP))?;
            s.bind(&SocketAddr::from((Ipv4Addr::UNSPECIFIED, port)).into())?;
            (s, false)
        }
    };
    // Root may exceed net.core.[rw]mem_max; others get what the sysctl allows.
    if set_buffer_force(&sock, libc::SO_RCVBUFFORCE).is_err() {
        let _ = sock.set_recv_buffer_size(SOCKET_BUFFER);
    }
    if set_buffer_force(&sock, libc::SO_SNDBUFFORCE).is_err() {
        let _ = sock.set_send_buffer_size(SOCKET_BUFFER);
    }
    sock.set_nonblocking(true)?;
    Ok((sock.into(), dual_stack))
}

fn set_buffer_force(sock: &socket2::Socket, opt: libc::c_int) -> io::Result<()> {
    let size = SOCKET_BUFFER as libc::c_int;
    // SAFETY: setsockopt reads one c_int from a valid pointer.
    let rc = unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            opt,
            (&size as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

fn bind_control(dir: &Path, path: &Path) -> io::Result<UnixListener> {
    std::fs::create_dir_all(dir)?;
    // A stale socket of a dead process (a live one was refused above).
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let l = UnixListener::bind(path)?;
    l.set_nonblocking(true)?;
    Ok(l)
}

/// Received addresses on a dual-stack socket are v4-mapped; report them as v4.
fn unmap(addr: SocketAddr) -> SocketAddr {
    match addr {
        SocketAddr::V6(a) => match a.ip().to_ipv4_mapped() {
            Some(v4) => SocketAddr::V4(SocketAddrV4::new(v4, a.port())),
            None => addr,
        },
        v4 => v4,
    }
}

fn is_cookie_reply(out: &[u8]) -> bool {
    out.first() == Some(&3)
}

/// Buffers of the data thread, allocated once.
struct Worker {
    tun_buf: Vec<u8>,
    /// One segment of a super-packet being cut.
    scratch: Vec<u8>,
    tx: SendBatch,
    rx: RecvBatch,
    arena: Vec<u8>,
    gro: Gro,
    /// The last receive filled every message slot (more may be queued).
    rx_full: bool,
}

impl Worker {
    fn new(shared: &Shared) -> Worker {
        let fd = shared.udp.as_raw_fd();
        let gso = shared.offload && batch::probe_gso(fd);
        let gro = shared.offload && batch::enable_gro(fd);
        tracing::debug!(vnet = shared.tun.vnet(), gso, gro, "data path offloads");
        Worker {
            tun_buf: vec![0; TUN_BUF],
            scratch: vec![0; TUN_BUF],
            tx: SendBatch::new(gso),
            rx: RecvBatch::new(gro),
            arena: vec![0; RX_ARENA],
            gro: Gro::default(),
            rx_full: false,
        }
    }
}

impl Shared {
    fn stopped(&self) -> bool {
        self.stop.load(Ordering::Relaxed)
    }

    /// The address to hand the socket: v4-mapped on a dual-stack socket.
    fn wire_addr(&self, to: SocketAddr) -> SocketAddr {
        match to {
            SocketAddr::V4(a) if self.dual_stack => {
                SocketAddr::V6(SocketAddrV6::new(a.ip().to_ipv6_mapped(), a.port(), 0, 0))
            }
            other => other,
        }
    }

    fn send_to(&self, buf: &[u8], to: SocketAddr) -> io::Result<usize> {
        self.udp.send_to(buf, self.wire_addr(to))
    }

    /// Wait for `fd` after a `WouldBlock`; logs and backs off on errors.
    fn idle(&self, fd: i32) {
        if let Err(e) = wait_readable(fd, TICK) {
            tracing::warn!(error = %e, "poll failed");
            std::thread::sleep(TICK);
        }
    }

    /// The data path, one thread: TUN → encrypt → UDP and UDP → decrypt →
    /// TUN, each batch handled to the end before blocking in `poll` on
    /// both descriptors. A lone packet (a ping) thus crosses no queue and
    /// wakes no other thread; a reply the kernel queues on the TUN while
    /// we write the request is picked up by the same loop. (Busy-polling
    /// for the peer's answer after a send was tried: no measurable gain on
    /// the 2-vCPU bench box, where the scheduler packs every thread of the
    /// path onto one vCPU anyway; see BENCHMARKS.md.)
    fn data_loop(&self) {
        let mut w = Worker::new(self);
        let fds = [self.tun.as_raw_fd(), self.udp.as_raw_fd()];
        let mut ready = [true, true];
        while !self.stopped() {
            if !ready.contains(&true) {
                match poll_ready(&fds, TICK) {
                    Ok(r) => ready = r,
                    Err(e) => {
                        tracing::warn!(error = %e, "poll failed");
                        std::thread::sleep(TICK);
                    }
                }
                continue;
            }
            let tun = ready[0] && self.tun_batch(&mut w);
            let udp = ready[1] && self.udp_batch(&mut w);
            // Writing to the TUN often makes the kernel answer at once
            // (a ping reply, a TCP ack): look at the TUN again right away.
            // A short receive batch means the socket is drained: poll.
            ready = [tun || udp, udp && w.rx_full];
        }
    }

    /// Read what the TUN has (up to a batch), encrypt, send. True if any
    /// packet was read.
    fn tun_batch(&self, w: &mut Worker) -> bool {
        let mut any = false;
        let mut reads = 0;
        // Room for one more super-packet's worth of datagrams.
        while reads < TUN_READS && w.tx.has_room(TUN_BUF + 128 * OVERHEAD, 128) {
            let n = match self.tun.read(&mut w.tun_buf) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    tracing::warn!(error = %e, "TUN read failed");
                    std::thread::sleep(TICK);
                    break;
                }
            };
            reads += 1;
            any = true;
            let Worker {
                tun_buf,
                scratch,
                tx,
                ..
            } = w;
            if !self.tun.vnet() {
                self.outbound(&tun_buf[..n], None, scratch, tx);
                continue;
            }
            // The packet follows its virtio_net_hdr: finish a partial
            // checksum, or cut a TCP super-packet into segments.
            let Some(hdr) = VnetHdr::parse(&tun_buf[..n]) else {
                continue;
            };
            let pkt = &mut tun_buf[VNET_HDR_LEN..n];
            if hdr.gso_type != offload::GSO_NONE {
                self.outbound(pkt, Some(&hdr), scratch, tx);
                continue;
            }
            if hdr.flags & offload::F_NEEDS_CSUM != 0 {
                if let Err(e) = offload::finish_checksum(&hdr, pkt) {
                    tracing::debug!(error = %e, "dropped a packet from the TUN");
                    continue;
                }
            }
            self.outbound(pkt, None, scratch, tx);
        }
        if !w.tx.is_empty() {
            w.tx.flush(self.udp.as_raw_fd());
        }
        any
    }

    /// A packet from the TUN (a TCP super-packet to segment when `gso`):
    /// find the peer by destination, encrypt into the send batch. The peer
    /// lock is taken once for all segments.
    fn outbound(
        &self,
        pkt: &[u8],
        gso: Option<&VnetHdr>,
        scratch: &mut [u8],
        batch: &mut SendBatch,
    ) {
        let Some(ip) = Tunn::dst_address(pkt) else {
            return;
        };
        let table = read(&self.table);
        let Some(peer) = table.routes.lookup(ip) else {
            return;
        };
        let mut st = lock(&peer.state);
        let endpoint = st.endpoint.map(|ep| self.wire_addr(ep));
        let mut sent = 0u64;
        let mut seal = |packet: &[u8]| {
            if packet.len() + OVERHEAD > SLOT || batch.is_full() {
                tracing::debug!(
                    len = packet.len(),
                    "packet dropped: too large or batch full"
                );
                return;
            }
            match st.tunn.encapsulate(packet, batch.slot()) {
                TunnResult::WriteToNetwork(out) => {
                    let len = out.len();
                    if let Some(ep) = endpoint {
                        sent += len as u64;
                        batch.push(len, ep);
                    }
                }
                TunnResult::Err(e) => tracing::debug!(error = ?e, "encapsulate failed"),
                _ => {}
            }
        };
        match gso {
            None => seal(pkt),
            Some(hdr) => {
                if let Err(e) = offload::tcp_segment(hdr, pkt, scratch, &mut seal) {
                    tracing::debug!(error = %e, "dropped a super-packet from the TUN");
                }
            }
        }
        drop(st);
        peer.tx_bytes.fetch_add(sent, Ordering::Relaxed);
    }

    /// Receive a batch from the socket, decrypt, write to the TUN
    /// (coalesced when the TUN takes vnet headers). True if any arrived.
    fn udp_batch(&self, w: &mut Worker) -> bool {
        let fd = self.udp.as_raw_fd();
        let n = match w.rx.recv(fd) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return false,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => return true,
            // ICMP errors surface as ECONNREFUSED etc. on the next call.
            Err(e) => {
                tracing::trace!(error = %e, "UDP receive error");
                return true;
            }
        };
        w.rx_full = n == w.rx.capacity();
        let Worker { rx, arena, gro, .. } = w;
        let mut used = 0;
        for i in 0..n {
            let Some((msg, from, seg)) = rx.get(i) else {
                continue;
            };
            let from = unmap(from);
            for datagram in msg.chunks(seg) {
                if used + datagram.len() + OVERHEAD > arena.len() {
                    self.write_tun(arena, gro);
                    used = 0;
                }
                if let Some(len) = self.inbound(datagram, from, &mut arena[used..]) {
                    if self.tun.vnet() {
                        gro.push(arena, used, len);
                        used += len;
                    } else if let Err(e) = self.tun.write(&arena[used..used + len]) {
                        tracing::debug!(error = %e, "TUN write failed");
                    }
                }
            }
        }
        self.write_tun(arena, gro);
        true
    }

    fn write_tun(&self, arena: &mut [u8], gro: &mut Gro) {
        gro.flush(arena, |iov| {
            if let Err(e) = self.tun.writev(iov) {
                tracing::debug!(error = %e, "TUN write failed");
            }
        });
    }

    /// A datagram from the network: find the peer, decrypt into `dst`.
    /// Returns the length of a packet for the TUN now at the start of `dst`.
    fn inbound(&self, datagram: &[u8], from: SocketAddr, dst: &mut [u8]) -> Option<usize> {
        let table = read(&self.table);
        let peer = match Tunn::parse_incoming_packet(datagram) {
            Ok(Packet::HandshakeInit(_)) => {
                let keys = read(&self.keys);
                match keys.limiter.verify_packet(Some(from.ip()), datagram, dst) {
                    Ok(Packet::HandshakeInit(h)) => {
                        match parse_handshake_anon(&keys.secret, &keys.public, &h) {
                            Ok(half) => table.by_key.get(&half.peer_static_public),
                            Err(_) => None,
                        }
                    }
                    Err(TunnResult::WriteToNetwork(cookie)) => {
                        let _ = self.send_to(cookie, from);
                        None
                    }
                    _ => None,
                }
            }
            Ok(Packet::HandshakeResponse(p)) => table.by_index.get(&(p.receiver_idx >> 8)),
            Ok(Packet::PacketCookieReply(p)) => table.by_index.get(&(p.receiver_idx >> 8)),
            Ok(Packet::PacketData(p)) => table.by_index.get(&(p.receiver_idx >> 8)),
            Err(_) => None,
        };
        let peer = peer?;
        let mut st = lock(&peer.state);
        let (len, src) = match st.tunn.decapsulate(Some(from.ip()), datagram, dst) {
            TunnResult::Done => {
                st.endpoint = Some(from);
                peer.rx_bytes
                    .fetch_add(datagram.len() as u64, Ordering::Relaxed);
                return None;
            }
            TunnResult::Err(e) => {
                tracing::trace!(error = ?e, "decapsulate failed");
                return None;
            }
            TunnResult::WriteToNetwork(out) => {
                if !is_cookie_reply(out) {
                    st.endpoint = Some(from);
                    peer.rx_bytes
                        .fetch_add(datagram.len() as u64, Ordering::Relaxed);
                }
                let mut sent = self.send_to(out, from).map(|n| n as u64).unwrap_or(0);
                // Packets queued while the handshake was in flight.
                while let TunnResult::WriteToNetwork(out) = st.tunn.decapsulate(None, &[], dst) {
                    sent += self.send_to(out, from).map(|n| n as u64).unwrap_or(0);
                }
                peer.tx_bytes.fetch_add(sent, Ordering::Relaxed);
                return None;
            }
            TunnResult::WriteToTunnelV4(out, src) => (out.len(), IpAddr::V4(src)),
            TunnResult::WriteToTunnelV6(out, src) => (out.len(), IpAddr::V6(src)),
        };
        st.endpoint = Some(from);
        drop(st);
        self.admit(&table, peer, src, datagram.len()).then_some(len)
    }

    /// Cryptokey routing: accept a decrypted packet only if its source
    /// address belongs to the peer that sent it.
    fn admit(&self, table: &Table, peer: &Arc<Peer>, src: IpAddr, wire: usize) -> bool {
        peer.rx_bytes.fetch_add(wire as u64, Ordering::Relaxed);
        match table.routes.lookup(src) {
            Some(owner) if Arc::ptr_eq(owner, peer) => true,
            _ => {
                tracing::debug!(%src, "dropped packet from a source outside the peer's allowed IPs");
                false
            }
        }
    }

    fn timer_loop(&self) {
        let mut dst = vec![0u8; BUF + OVERHEAD];
        let mut ticks: u32 = 0;
        while !self.stopped() {
            std::thread::sleep(TIMER_TICK);
            ticks = ticks.wrapping_add(1);
            if ticks.is_multiple_of(4) {
                read(&self.keys).limiter.reset_count();
            }
            let table = read(&self.table);
            for peer in table.by_key.values() {
                let mut st = lock(&peer.state);
                let endpoint = st.endpoint;
                match st.tunn.update_timers(&mut dst) {
                    TunnResult::WriteToNetwork(out) => {
                        if let Some(ep) = endpoint {
                            if self.send_to(out, ep).is_ok() {
                                peer.tx_bytes.fetch_add(out.len() as u64, Ordering::Relaxed);
                            }
                        }
                    }
                    TunnResult::Err(WireGuardError::ConnectionExpired) | TunnResult::Done => {}
                    TunnResult::Err(e) => tracing::debug!(error = ?e, "timer error"),
                    _ => {}
                }
            }
        }
    }

    fn uapi_loop(&self, listener: &UnixListener) {
        let fd = listener.as_raw_fd();
        while !self.stopped() {
            match listener.accept() {
                Ok((conn, _)) => {
                    if let Err(e) = self.serve_uapi(conn) {
                        tracing::debug!(error = %e, "UAPI connection failed");
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => self.idle(fd),
                Err(e) => {
                    tracing::warn!(error = %e, "UAPI accept failed");
                    std::thread::sleep(TICK);
                }
            }
        }
    }

    fn serve_uapi(&self, conn: UnixStream) -> io::Result<()> {
        conn.set_nonblocking(false)?;
        // A client that stalls must not wedge the control plane.
        conn.set_read_timeout(Some(Duration::from_secs(2)))?;
        let mut reader = BufReader::new(conn.try_clone()?);
        let mut out = conn;
        let mut line = String::new();
        loop {
            line.clear();
            if reader.read_line(&mut line)? == 0 {
                return Ok(());
            }
            match line.trim_end_matches('\n') {
                "get=1" => {
                    read_body(&mut reader)?;
                    out.write_all(uapi::format_get(&self.info()).as_bytes())?;
                }
                "set=1" => {
                    let body = read_body(&mut reader)?;
                    let errno = match uapi::parse_set(body.iter().map(String::as_str)) {
                        Ok(req) => match self.apply(req) {
                            Ok(()) => 0,
                            Err(e) => {
                                tracing::warn!(error = %e, "UAPI set refused");
                                e.errno()
                            }
                        },
                        Err(e) => {
                            tracing::warn!(error = %e, "UAPI set malformed");
                            e.errno()
                        }
                    };
                    write!(out, "errno={errno}\n\n")?;
                }
                "" => {}
                _ => {
                    write!(out, "errno={}\n\n", libc::EINVAL)?;
                    return Ok(());
                }
            }
        }
    }

    fn apply(&self, req: SetRequest) -> Result<(), ApplyError> {
        if let Some(requested) = req.listen_port {
            if requested != self.listen_port && requested != 0 {
                return Err(ApplyError::ListenPort {
                    current: self.listen_port,
                    requested,
                });
            }
        }
        if let Some(mark) = req.fwmark {
            socket2::SockRef::from(&self.udp)
                .set_mark(mark)
                .map_err(|source| ApplyError::Fwmark { mark, source })?;
            *lock(&self.fwmark) = Some(mark);
        }
        let mut table = write(&self.table);
        if let Some(secret) = req.private_key {
            let new = Keys::new(secret);
            let mut keys = write(&self.keys);
            if new.public != keys.public {
                for peer in table.by_key.values() {
                    lock(&peer.state)
                        .tunn
                        .set_static_private(new.secret.clone(), new.public, None);
                }
                *keys = new;
            }
        }
        if req.replace_peers {
            let keys: Vec<[u8; 32]> = table.by_key.keys().copied().collect();
            for k in keys {
                table.remove(&k);
            }
        }
        let keys = read(&self.keys);
        for p in req.peers {
            if p.remove {
                table.remove(&p.public_key);
                continue;
            }
            if p.public_key == keys.public.to_bytes() {
                // wg ignores its own key as a peer; so do we.
                continue;
            }
            let psk = p
                .preshared_key
                .map(|k| if k == [0; 32] { None } else { Some(k) });
            let keepalive = p
                .persistent_keepalive
                .map(|k| if k == 0 { None } else { Some(k) });
            let peer = match table.by_key.get(&p.public_key) {
                Some(peer) => {
                    let peer = Arc::clone(peer);
                    let mut st = lock(&peer.state);
                    if let Some(ep) = p.endpoint {
                        st.endpoint = Some(ep);
                    }
                    let psk = psk.unwrap_or(st.preshared_key);
                    let keepalive = keepalive.unwrap_or(st.keepalive);
                    if psk != st.preshared_key || keepalive != st.keepalive {
                        // Tunn fixes both at creation: a new one, new session.
                        st.tunn = Tunn::new(
                            keys.secret.clone(),
                            PublicKey::from(p.public_key),
                            psk,
                            keepalive,
                            peer.index,
                            None,
                        );
                        st.preshared_key = psk;
                        st.keepalive = keepalive;
                    }
                    drop(st);
                    peer
                }
                None if p.update_only => continue,
                None => {
                    let index = table.free_index();
                    let psk = psk.flatten();
                    let keepalive = keepalive.flatten();
                    let peer = Arc::new(Peer {
                        public_key: p.public_key,
                        index,
                        state: Mutex::new(PeerState {
                            tunn: Tunn::new(
                                keys.secret.clone(),
                                PublicKey::from(p.public_key),
                                psk,
                                keepalive,
                                index,
                                None,
                            ),
                            endpoint: p.endpoint,
                            keepalive,
                            preshared_key: psk,
                        }),
                        rx_bytes: AtomicU64::new(0),
                        tx_bytes: AtomicU64::new(0),
                    });
                    table.by_key.insert(p.public_key, Arc::clone(&peer));
                    table.by_index.insert(index, Arc::clone(&peer));
                    peer
                }
            };
            if p.replace_allowed_ips {
                table.routes.retain(|_, owner| !Arc::ptr_eq(owner, &peer));
            }
            for ip in p.allowed_ips {
                table.routes.insert(ip, Arc::clone(&peer));
            }
        }
        Ok(())
    }

    fn info(&self) -> DeviceInfo {
        let table = read(&self.table);
        let now = SystemTime::now();
        let mut peers: Vec<PeerInfo> = table
            .by_key
            .values()
            .map(|peer| {
                let st = lock(&peer.state);
                let since = st.tunn.stats().0;
                PeerInfo {
                    public_key: peer.public_key,
                    preshared_key: st.preshared_key,
                    endpoint: st.endpoint,
                    last_handshake: since.and_then(|d| now.checked_sub(d)),
                    rx_bytes: peer.rx_bytes.load(Ordering::Relaxed),
                    tx_bytes: peer.tx_bytes.load(Ordering::Relaxed),
                    persistent_keepalive: st.keepalive,
                    allowed_ips: table
                        .routes
                        .iter()
                        .filter(|(_, owner)| Arc::ptr_eq(owner, peer))
                        .map(|(ip, _)| *ip)
                        .collect::<Vec<AllowedIp>>(),
                }
            })
            .collect();
        peers.sort_by_key(|p| p.public_key);
        DeviceInfo {
            private_key: read(&self.keys).secret.to_bytes(),
            listen_port: self.listen_port,
            fwmark: *lock(&self.fwmark),
            peers,
        }
    }
}

/// Lines up to the blank line (or EOF) that ends a request.
fn read_body(r: &mut impl BufRead) -> io::Result<Vec<String>> {
    let mut lines = Vec::new();
    let mut line = String::new();
    loop {
        line.clear();
        if r.read_line(&mut line)? == 0 {
            return Ok(lines);
        }
        let l = line.trim_end_matches('\n');
        if l.is_empty() {
            return Ok(lines);
        }
        lines.push(l.to_owned());
    }
}
