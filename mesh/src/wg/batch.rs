//! Batched UDP IO: `recvmmsg` / `sendmmsg` over fixed, preallocated slots,
//! so the data path makes one syscall per batch instead of per packet.

use std::io;
use std::mem::MaybeUninit;
use std::net::SocketAddr;
use std::os::fd::RawFd;

use socket2::SockAddr;

/// Packets per batch.
pub const BATCH: usize = 32;
/// Bytes per slot: jumbo frames (MTU 9000) plus WireGuard overhead.
pub const SLOT: usize = 9216 + 64;

/// Datagrams received by one `recvmmsg`.
pub struct RecvBatch {
    bufs: Vec<u8>,
    lens: [usize; BATCH],
    addrs: Vec<libc::sockaddr_storage>,
    addr_lens: [libc::socklen_t; BATCH],
    n: usize,
}

impl Default for RecvBatch {
    fn default() -> Self {
        RecvBatch {
            bufs: vec![0; BATCH * SLOT],
            lens: [0; BATCH],
            // SAFETY: sockaddr_storage is plain old data; all-zero is valid.
            addrs: vec![unsafe { MaybeUninit::zeroed().assume_init() }; BATCH],
            addr_lens: [0; BATCH],
            n: 0,
        }
    }
}

impl RecvBatch {
    /// Receive up to [`BATCH`] datagrams without blocking; `WouldBlock`
    /// when none is queued. Returns how many arrived.
    pub fn recv(&mut self, fd: RawFd) -> io::Result<usize> {
        let mut iov: [libc::iovec; BATCH] = [libc::iovec {
            iov_base: std::ptr::null_mut(),
            iov_len: 0,
        }; BATCH];
        // SAFETY: mmsghdr is plain old data; all-zero is valid.
        let mut msgs: [libc::mmsghdr; BATCH] = unsafe { MaybeUninit::zeroed().assume_init() };
        for i in 0..BATCH {
            iov[i].iov_base = self.bufs[i * SLOT..].as_mut_ptr().cast();
            iov[i].iov_len = SLOT;
            let h = &mut msgs[i].msg_hdr;
            h.msg_name = (&mut self.addrs[i] as *mut libc::sockaddr_storage).cast();
            h.msg_namelen = std::mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
            h.msg_iov = &mut iov[i];
            h.msg_iovlen = 1;
        }
        // SAFETY: every msghdr points at live buffers owned by self / this
        // frame, with their true lengths.
        let n = unsafe {
            libc::recvmmsg(
                fd,
                msgs.as_mut_ptr(),
                BATCH as libc::c_uint,
                libc::MSG_DONTWAIT,
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
        }
        Ok(self.n)
    }

    /// Datagram `i` of the last batch and its sender.
    pub fn get(&self, i: usize) -> Option<(&[u8], SocketAddr)> {
        if i >= self.n || self.lens[i] == 0 {
            return None;
        }
        let addr = parse_sockaddr(&self.addrs[i], self.addr_lens[i])?;
        Some((&self.bufs[i * SLOT..i * SLOT + self.lens[i]], addr))
    }
}

/// Datagrams collected for one `sendmmsg`.
pub struct SendBatch {
    bufs: Vec<u8>,
    lens: [usize; BATCH],
    addrs: Vec<SockAddr>,
}

impl Default for SendBatch {
    fn default() -> Self {
        SendBatch {
            bufs: vec![0; BATCH * SLOT],
            lens: [0; BATCH],
            addrs: Vec::with_capacity(BATCH),
        }
    }
}

impl SendBatch {
    pub fn len(&self) -> usize {
        self.addrs.len()
    }

    pub fn is_empty(&self) -> bool {
        self.addrs.is_empty()
    }

    pub fn is_full(&self) -> bool {
        self.addrs.len() == BATCH
    }

    /// The next free slot to write a datagram into.
    /// Panics when full: callers check [`SendBatch::is_full`] first.
    pub fn slot(&mut self) -> &mut [u8] {
        let i = self.addrs.len();
        &mut self.bufs[i * SLOT..(i + 1) * SLOT]
    }

    /// Commit the first `len` bytes of the current slot, to `to`.
    pub fn push(&mut self, len: usize, to: SocketAddr) {
        let i = self.addrs.len();
        self.lens[i] = len.min(SLOT);
        self.addrs.push(SockAddr::from(to));
    }

    /// Send everything queued; waits (briefly) for room when the socket
    /// buffer is full. Datagrams the kernel refuses are dropped (UDP).
    pub fn flush(&mut self, fd: RawFd) {
        let total = self.addrs.len();
        let mut sent = 0;
        let mut stalls = 0;
        while sent < total {
            let mut iov: [libc::iovec; BATCH] = [libc::iovec {
                iov_base: std::ptr::null_mut(),
                iov_len: 0,
            }; BATCH];
            // SAFETY: mmsghdr is plain old data; all-zero is valid.
            let mut msgs: [libc::mmsghdr; BATCH] = unsafe { MaybeUninit::zeroed().assume_init() };
            let count = total - sent;
            for k in 0..count {
                let i = sent + k;
                iov[k].iov_base = self.bufs[i * SLOT..].as_mut_ptr().cast();
                iov[k].iov_len = self.lens[i];
                let h = &mut msgs[k].msg_hdr;
                h.msg_name = self.addrs[i].as_ptr() as *mut libc::c_void;
                h.msg_namelen = self.addrs[i].len();
                h.msg_iov = &mut iov[k];
                h.msg_iovlen = 1;
            }
            // SAFETY: as in recv; the kernel only reads these buffers.
            let n = unsafe {
                libc::sendmmsg(
                    fd,
                    msgs.as_mut_ptr(),
                    count as libc::c_uint,
                    libc::MSG_DONTWAIT,
                )
            };
            if n > 0 {
                sent += n as usize;
                continue;
            }
            let e = io::Error::last_os_error();
            match e.kind() {
                io::ErrorKind::WouldBlock if stalls < 10 => {
                    stalls += 1;
                    wait_writable(fd);
                }
                io::ErrorKind::Interrupted => {}
                _ => {
                    // e.g. ENETUNREACH for this destination: skip the datagram.
                    tracing::trace!(error = %e, "sendmmsg");
                    sent += 1;
                }
            }
        }
        self.addrs.clear();
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

    #[test]
    fn send_and_receive_a_batch_on_loopback() {
        let a = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let b = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let to = b.local_addr().unwrap();
        let mut tx = SendBatch::default();
        for i in 0..5u8 {
            tx.slot()[..3].copy_from_slice(&[i, i, i]);
            tx.push(3, to);
        }
        assert_eq!(tx.len(), 5);
        tx.flush(a.as_raw_fd());
        assert!(tx.is_empty());
        let mut rx = RecvBatch::default();
        let mut got = Vec::new();
        for _ in 0..100 {
            match rx.recv(b.as_raw_fd()) {
                Ok(n) => {
                    for i in 0..n {
                        let (d, from) = rx.get(i).unwrap();
                        assert_eq!(from, a.local_addr().unwrap());
                        got.push(d.to_vec());
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    std::thread::sleep(std::time::Duration::from_millis(5))
                }
                Err(e) => panic!("{e}"),
            }
            if got.len() == 5 {
                break;
            }
        }
        assert_eq!(got, (0..5u8).map(|i| vec![i, i, i]).collect::<Vec<_>>());
    }
}
