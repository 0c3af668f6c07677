//! Batched UDP IO: `recvmmsg` / `sendmmsg` over preallocated buffers, so
//! the data path makes one syscall per batch instead of per packet; and,
//! when the kernel has them, UDP GSO (`UDP_SEGMENT`: one message carries a
//! run of equal-size datagrams to one address) and UDP GRO (`UDP_GRO`: one
//! receive returns a run of datagrams from one sender).

use std::io;
use std::mem::MaybeUninit;
use std::net::SocketAddr;
use std::os::fd::RawFd;
use std::sync::atomic::{AtomicBool, Ordering};

use socket2::SockAddr;

/// Messages per `recvmmsg` / `sendmmsg`.
pub const BATCH: usize = 32;
/// Bytes per datagram at most: jumbo frames (MTU 9000) plus WireGuard overhead.
pub const SLOT: usize = 9216 + 64;
/// Receive buffer per message with UDP GRO: a whole coalesced run.
const GRO_SLOT: usize = 65_536;
/// Messages per `recvmmsg` with UDP GRO (each up to [`GRO_SLOT`]).
const GRO_BATCH: usize = 16;
/// Datagrams per GSO message at most (the kernel's `UDP_MAX_SEGMENTS`).
const GSO_SEGS: usize = 64;
/// Payload bytes per GSO message at most (one IP packet's worth).
const GSO_BYTES: usize = 65_000;
/// Bytes of encrypted datagrams one [`SendBatch`] holds.
const SEND_ARENA: usize = 512 * 1024;
/// Datagrams one [`SendBatch`] holds.
const SEND_MAX: usize = 512;

const SOL_UDP: libc::c_int = 17;
const UDP_SEGMENT: libc::c_int = 103;
const UDP_GRO: libc::c_int = 104;
/// `CMSG_SPACE(sizeof(int))` on 64-bit Linux.
const CMSG_INT_SPACE: usize = 24;

fn setsockopt_int(
    fd: RawFd,
    level: libc::c_int,
    opt: libc::c_int,
    v: libc::c_int,
) -> io::Result<()> {
    // SAFETY: setsockopt reads one c_int from a valid pointer.
    let rc = unsafe {
        libc::setsockopt(
            fd,
            level,
            opt,
            (&v as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// Turn on UDP GRO for `fd`; false (logged) when the kernel refuses.
pub fn enable_gro(fd: RawFd) -> bool {
    match setsockopt_int(fd, SOL_UDP, UDP_GRO, 1) {
        Ok(()) => true,
        Err(e) => {
            tracing::info!(error = %e, "UDP_GRO unavailable: one datagram per receive");
            false
        }
    }
}

/// Whether the kernel knows `UDP_SEGMENT` (probed with size 0 = off).
pub fn probe_gso(fd: RawFd) -> bool {
    match setsockopt_int(fd, SOL_UDP, UDP_SEGMENT, 0) {
        Ok(()) => true,
        Err(e) => {
            tracing::info!(error = %e, "UDP_SEGMENT unavailable: one datagram per message");
            false
        }
    }
}

/// Received messages of one `recvmmsg`; with GRO each may hold a run of
/// datagrams of `segment` bytes (the last may be shorter).
pub struct RecvBatch {
    bufs: Vec<u8>,
    slot: usize,
    count: usize,
    lens: Vec<usize>,
    segs: Vec<usize>,
    addrs: Vec<libc::sockaddr_storage>,
    addr_lens: Vec<libc::socklen_t>,
    cmsgs: Vec<[u64; CMSG_INT_SPACE / 8]>,
    n: usize,
}

impl Default for RecvBatch {
    fn default() -> Self {
        RecvBatch::new(false)
    }
}

impl RecvBatch {
    /// `gro`: buffers sized for coalesced runs.
    pub fn new(gro: bool) -> Self {
        let (slot, count) = if gro {
            (GRO_SLOT, GRO_BATCH)
        } else {
            (SLOT, BATCH)
        };
        RecvBatch {
            bufs: vec![0; count * slot],
            slot,
            count,
            lens: vec![0; count],
            segs: vec![0; count],
            // SAFETY: sockaddr_storage is plain old data; all-zero is valid.
            addrs: vec![unsafe { MaybeUninit::zeroed().assume_init() }; count],
            addr_lens: vec![0; count],
            cmsgs: vec![[0; CMSG_INT_SPACE / 8]; count],
            n: 0,
        }
    }

    /// Messages one receive may return.
    pub fn capacity(&self) -> usize {
        self.count
    }

    /// Receive without blocking; `WouldBlock` when nothing is queued.
    /// Returns how many messages arrived.
    pub fn recv(&mut self, fd: RawFd) -> io::Result<usize> {
        let mut iov: [libc::iovec; BATCH] = [libc::iovec {
            iov_base: std::ptr::null_mut(),
            iov_len: 0,
        }; BATCH];
        // SAFETY: mmsghdr is plain old data; all-zero is valid.
        let mut msgs: [libc::mmsghdr; BATCH] = unsafe { MaybeUninit::zeroed().assume_init() };
        for i in 0..self.count {
            iov[i].iov_base = self.bufs[i * self.slot..].as_mut_ptr().cast();
            iov[i].iov_len = self.slot;
            let h = &mut msgs[i].msg_hdr;
            h.msg_name = (&mut self.addrs[i] as *mut libc::sockaddr_storage).cast();
            h.msg_namelen = std::mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
            h.msg_iov = &mut iov[i];
            h.msg_iovlen = 1;
            h.msg_control = self.cmsgs[i].as_mut_ptr().cast();
            h.msg_controllen = CMSG_INT_SPACE as _;
        }
        // SAFETY: every msghdr points at live buffers owned by self / this
        // frame, with their true lengths.
        let n = unsafe {
            libc::recvmmsg(
                fd,
                msgs.as_mut_ptr(),
                self.count as libc::c_uint,
                libc::MSG_DONTWAIT as _,
                std::ptr::null_mut(),
            )
        };
        if n < 0 {
            self.n = 0;
            return Err(io::Error::last_os_error());
        }
        self.n = n as usize;
        for (i, m) in msgs.iter().take(self.n).enumerate() {
            // Truncated datagrams are larger than any packet we accept;
            // mark them empty so they are skipped.
            self.lens[i] = if m.msg_hdr.msg_flags & libc::MSG_TRUNC != 0 {
                0
            } else {
                m.msg_len as usize
            };
            self.addr_lens[i] = m.msg_hdr.msg_namelen;
            self.segs[i] = gro_segment(&m.msg_hdr).unwrap_or(self.lens[i]);
        }
        Ok(self.n)
    }

    /// Message `i` of the last batch: its bytes, sender, and the size of
    /// each datagram in it (all but the last; the last may be shorter).
    pub fn get(&self, i: usize) -> Option<(&[u8], SocketAddr, usize)> {
        if i >= self.n || self.lens[i] == 0 {
            return None;
        }
        let addr = parse_sockaddr(&self.addrs[i], self.addr_lens[i])?;
        let start = i * self.slot;
        let seg = self.segs[i].max(1);
        Some((&self.bufs[start..start + self.lens[i]], addr, seg))
    }
}

/// The `UDP_GRO` segment size of a received message, if it carries one.
fn gro_segment(h: &libc::msghdr) -> Option<usize> {
    // SAFETY: the control buffer was filled by recvmmsg; the CMSG macros
    // stay within msg_controllen.
    unsafe {
        let mut c = libc::CMSG_FIRSTHDR(h);
        while !c.is_null() {
            if (*c).cmsg_level == SOL_UDP && (*c).cmsg_type == UDP_GRO {
                let v = std::ptr::read_unaligned(libc::CMSG_DATA(c).cast::<libc::c_int>());
                return usize::try_from(v).ok().filter(|v| *v > 0);
            }
            c = libc::CMSG_NXTHDR(h, c);
        }
    }
    None
}

/// Log "GSO failed, falling back" once per process.
static GSO_FALLBACK_LOGGED: AtomicBool = AtomicBool::new(false);

struct Entry {
    off: usize,
    len: usize,
    to: SocketAddr,
    addr: SockAddr,
}

/// Encrypted datagrams collected for one flush (`sendmmsg`, with GSO runs
/// when enabled).
pub struct SendBatch {
    buf: Vec<u8>,
    used: usize,
    ents: Vec<Entry>,
    gso: bool,
}

impl Default for SendBatch {
    fn default() -> Self {
        SendBatch::new(false)
    }
}

impl SendBatch {
    pub fn new(gso: bool) -> Self {
        SendBatch {
            buf: vec![0; SEND_ARENA],
            used: 0,
            ents: Vec::with_capacity(SEND_MAX),
            gso,
        }
    }

    pub fn gso(&self) -> bool {
        self.gso
    }

    pub fn len(&self) -> usize {
        self.ents.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ents.is_empty()
    }

    /// Whether `bytes` more of datagrams (each at most [`SLOT`]) fit.
    pub fn has_room(&self, bytes: usize, datagrams: usize) -> bool {
        self.used + bytes <= self.buf.len() && self.ents.len() + datagrams <= SEND_MAX
    }

    pub fn is_full(&self) -> bool {
        !self.has_room(SLOT, 1)
    }

    /// The free space to write the next datagram into (at least [`SLOT`]
    /// bytes unless [`SendBatch::is_full`]).
    pub fn slot(&mut self) -> &mut [u8] {
        &mut self.buf[self.used..]
    }

    /// Commit the first `len` bytes of the slot, to `to`.
    pub fn push(&mut self, len: usize, to: SocketAddr) {
        let len = len.min(self.buf.len() - self.used);
        self.ents.push(Entry {
            off: self.used,
            len,
            to,
            addr: SockAddr::from(to),
        });
        self.used += len;
    }

    /// End of the run of datagrams that one GSO message may carry from
    /// entry `i`: same address, same size (the last may be shorter),
    /// contiguous, within the kernel's limits.
    fn run_end(&self, i: usize) -> usize {
        let first = &self.ents[i];
        let mut j = i + 1;
        let mut bytes = first.len;
        if !self.gso {
            return j;
        }
        while j < self.ents.len() && j - i < GSO_SEGS {
            let e = &self.ents[j];
            let prev = &self.ents[j - 1];
            if e.to != first.to
                || e.len > first.len
                || e.off != prev.off + prev.len
                || bytes + e.len > GSO_BYTES
            {
                break;
            }
            bytes += e.len;
            j += 1;
            if e.len < first.len {
                break;
            }
        }
        j
    }

    /// Send everything queued; waits (briefly) for room when the socket
    /// buffer is full. Datagrams the kernel refuses are dropped (UDP).
    pub fn flush(&mut self, fd: RawFd) {
        let total = self.ents.len();
        let mut sent = 0;
        let mut stalls = 0;
        while sent < total {
            let mut iov: [libc::iovec; BATCH] = [libc::iovec {
                iov_base: std::ptr::null_mut(),
                iov_len: 0,
            }; BATCH];
            // SAFETY: mmsghdr is plain old data; all-zero is valid.
            let mut msgs: [libc::mmsghdr; BATCH] = unsafe { MaybeUninit::zeroed().assume_init() };
            let mut cmsgs = [[0u64; CMSG_INT_SPACE / 8]; BATCH];
            // Entry index where each message starts, and one past the end.
            let mut starts = [0usize; BATCH + 1];
            let mut k = 0;
            let mut i = sent;
            while i < total && k < BATCH {
                let j = self.run_end(i);
                let e = &self.ents[i];
                let last = &self.ents[j - 1];
                iov[k].iov_base = self.buf[e.off..].as_mut_ptr().cast();
                iov[k].iov_len = last.off + last.len - e.off;
                let h = &mut msgs[k].msg_hdr;
                h.msg_name = e.addr.as_ptr() as *mut libc::c_void;
                h.msg_namelen = e.addr.len();
                h.msg_iov = &mut iov[k];
                h.msg_iovlen = 1;
                if j - i > 1 {
                    h.msg_control = cmsgs[k].as_mut_ptr().cast();
                    h.msg_controllen = CMSG_INT_SPACE as _;
                    // SAFETY: the control buffer holds one cmsghdr + u16.
                    unsafe {
                        let c = libc::CMSG_FIRSTHDR(h);
                        (*c).cmsg_level = SOL_UDP;
                        (*c).cmsg_type = UDP_SEGMENT;
                        (*c).cmsg_len = libc::CMSG_LEN(2) as _;
                        std::ptr::write_unaligned(libc::CMSG_DATA(c).cast::<u16>(), e.len as u16);
                        h.msg_controllen = libc::CMSG_SPACE(2) as _;
                    }
                }
                starts[k] = i;
                k += 1;
                i = j;
            }
            starts[k] = i;
            // SAFETY: as in recv; the kernel only reads these buffers.
            let n = unsafe { libc::sendmmsg(fd, msgs.as_mut_ptr(), k as libc::c_uint, 0) };
            if n > 0 {
                sent = starts[n as usize];
                stalls = 0;
                continue;
            }
            let e = io::Error::last_os_error();
            let gso_msg = starts[1] - starts[0] > 1;
            match e.kind() {
                io::ErrorKind::WouldBlock if stalls < 10 => {
                    stalls += 1;
                    wait_writable(fd);
                }
                io::ErrorKind::Interrupted => {}
                _ if gso_msg && matches!(e.raw_os_error(), Some(libc::EIO | libc::EINVAL)) => {
                    // The egress device cannot do UDP segmentation (or the
                    // kernel does not take it for this path): plain sends.
                    if !GSO_FALLBACK_LOGGED.swap(true, Ordering::Relaxed) {
                        tracing::info!(error = %e, "UDP GSO send failed; sending datagrams one by one");
                    }
                    self.gso = false;
                }
                _ => {
                    // e.g. ENETUNREACH for this destination: skip the message.
                    tracing::trace!(error = %e, "sendmmsg");
                    sent = starts[1];
                }
            }
        }
        self.ents.clear();
        self.used = 0;
    }
}

fn parse_sockaddr(ss: &libc::sockaddr_storage, len: libc::socklen_t) -> Option<SocketAddr> {
    let len = len as usize;
    match ss.ss_family as libc::c_int {
        libc::AF_INET if len >= std::mem::size_of::<libc::sockaddr_in>() => {
            // SAFETY: the family says this storage holds a sockaddr_in.
            let sin =
                unsafe { &*(ss as *const libc::sockaddr_storage).cast::<libc::sockaddr_in>() };
            let ip = std::net::Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr));
            Some(SocketAddr::from((ip, u16::from_be(sin.sin_port))))
        }
        libc::AF_INET6 if len >= std::mem::size_of::<libc::sockaddr_in6>() => {
            // SAFETY: the family says this storage holds a sockaddr_in6.
            let sin6 =
                unsafe { &*(ss as *const libc::sockaddr_storage).cast::<libc::sockaddr_in6>() };
            let ip = std::net::Ipv6Addr::from(sin6.sin6_addr.s6_addr);
            Some(SocketAddr::V6(std::net::SocketAddrV6::new(
                ip,
                u16::from_be(sin6.sin6_port),
                sin6.sin6_flowinfo,
                sin6.sin6_scope_id,
            )))
        }
        _ => None,
    }
}

fn wait_writable(fd: RawFd) {
    let mut pfd = libc::pollfd {
        fd,
        events: libc::POLLOUT,
        revents: 0,
    };
    // SAFETY: one valid pollfd.
    unsafe { libc::poll(&mut pfd, 1, 10) };
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsRawFd;

    /// Everything `rx` yields within a second, split into datagrams.
    fn receive(rx: &mut RecvBatch, sock: &std::net::UdpSocket, want: usize) -> Vec<Vec<u8>> {
        let mut got = Vec::new();
        for _ in 0..200 {
            match rx.recv(sock.as_raw_fd()) {
                Ok(n) => {
                    for i in 0..n {
                        let (d, _, seg) = rx.get(i).unwrap();
                        got.extend(d.chunks(seg).map(<[u8]>::to_vec));
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    std::thread::sleep(std::time::Duration::from_millis(5))
                }
                Err(e) => panic!("{e}"),
            }
            if got.len() >= want {
                break;
            }
        }
        got
    }

    fn send_and_receive(gso: bool, gro: bool) {
        let a = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let b = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let to = b.local_addr().unwrap();
        let gso = gso && probe_gso(a.as_raw_fd());
        let gro = gro && enable_gro(b.as_raw_fd());
        let mut tx = SendBatch::new(gso);
        // A run of equal datagrams, a short one, then others.
        let sizes = [1000, 1000, 1000, 1000, 300, 1000, 7, 7];
        let mut want = Vec::new();
        for (i, &n) in sizes.iter().enumerate() {
            let d: Vec<u8> = (0..n).map(|k| (i * 31 + k) as u8).collect();
            tx.slot()[..n].copy_from_slice(&d);
            tx.push(n, to);
            want.push(d);
        }
        assert_eq!(tx.len(), sizes.len());
        tx.flush(a.as_raw_fd());
        assert!(tx.is_empty());
        let mut rx = RecvBatch::new(gro);
        assert_eq!(receive(&mut rx, &b, want.len()), want);
    }

    #[test]
    fn send_and_receive_a_batch_on_loopback() {
        send_and_receive(false, false);
    }

    #[test]
    fn send_and_receive_with_gso_and_gro_on_loopback() {
        send_and_receive(true, true);
        send_and_receive(true, false);
        send_and_receive(false, true);
    }

    #[test]
    fn gso_runs_respect_address_size_and_limits() {
        let mut tx = SendBatch::new(true);
        let x: SocketAddr = "10.0.0.1:1".parse().unwrap();
        let y: SocketAddr = "10.0.0.2:1".parse().unwrap();
        for (n, to) in [(100, x), (100, x), (50, x), (100, x), (100, y), (100, y)] {
            tx.push(n, to);
        }
        assert_eq!(tx.run_end(0), 3, "short datagram ends the run");
        assert_eq!(tx.run_end(3), 4, "other address");
        assert_eq!(tx.run_end(4), 6);
        let mut tx = SendBatch::new(true);
        for _ in 0..100 {
            tx.push(1400, x);
        }
        assert_eq!(tx.run_end(0), 46, "65 000 bytes per message");
        let mut tx = SendBatch::new(true);
        for _ in 0..100 {
            tx.push(100, x);
        }
        assert_eq!(tx.run_end(0), GSO_SEGS);
        tx.gso = false;
        assert_eq!(tx.run_end(0), 1);
    }
}
