//! A Linux TUN device (`/dev/net/tun`, `IFF_TUN | IFF_NO_PI`): raw IP
//! packets in and out. Closing the last file descriptor deletes the
//! interface, so dropping the [`Tun`] is the teardown.
//!
//! [`Tun::open_offload`] also asks for `IFF_VNET_HDR` and checksum/TSO
//! offloads (`TUNSETOFFLOAD`): every packet then starts with a
//! `virtio_net_hdr` ([`super::offload`]), the kernel may hand us 64 KB TCP
//! super-packets, and we may write coalesced ones.

use std::ffi::CStr;
use std::io::{self, IoSlice};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::time::Duration;

/// Longest interface name the kernel takes (IFNAMSIZ - 1).
pub const MAX_IFNAME: usize = libc::IFNAMSIZ - 1;

const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
const TUNSETOFFLOAD: libc::c_ulong = 0x4004_54d0;
const IFF_VNET_HDR: libc::c_int = 0x4000;
const TUN_F_CSUM: libc::c_uint = 0x01;
const TUN_F_TSO4: libc::c_uint = 0x02;
const TUN_F_TSO6: libc::c_uint = 0x04;

#[derive(Debug)]
pub struct Tun {
    fd: OwnedFd,
    name: String,
    vnet: bool,
}

#[repr(C)]
struct IfReq {
    name: [u8; libc::IFNAMSIZ],
    flags: libc::c_short,
    _pad: [u8; 22],
}

impl Tun {
    /// Create (or attach to) TUN interface `name`. Needs CAP_NET_ADMIN.
    pub fn open(name: &str) -> io::Result<Tun> {
        Tun::open_flags(name, 0)
    }

    /// As [`Tun::open`], with `virtio_net_hdr` framing and checksum + TSO
    /// offloads when the kernel agrees; otherwise (logged) a plain TUN.
    pub fn open_offload(name: &str) -> io::Result<Tun> {
        let mut tun = match Tun::open_flags(name, IFF_VNET_HDR) {
            Ok(t) => t,
            Err(e) => {
                tracing::info!(error = %e, "TUN without IFF_VNET_HDR: no offloads");
                return Tun::open(name);
            }
        };
        let offloads = TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6;
        // SAFETY: TUNSETOFFLOAD takes its flags by value.
        if unsafe {
            libc::ioctl(
                tun.fd.as_raw_fd(),
                TUNSETOFFLOAD as _,
                offloads as libc::c_ulong,
            )
        } < 0
        {
            let e = io::Error::last_os_error();
            tracing::info!(error = %e, "TUNSETOFFLOAD refused: no TSO from the TUN");
            // Keep the header framing: coalesced writes still work.
        }
        tun.vnet = true;
        Ok(tun)
    }

    fn open_flags(name: &str, extra: libc::c_int) -> io::Result<Tun> {
        if name.is_empty() || name.len() > MAX_IFNAME || name.bytes().any(|b| b == 0 || b == b'/') {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("`{name}` is not a valid interface name (1-{MAX_IFNAME} bytes, no `/`)"),
            ));
        }
        let path = c"/dev/net/tun";
        // SAFETY: path is a valid NUL-terminated string.
        let raw = unsafe { libc::open(path.as_ptr(), libc::O_RDWR | libc::O_CLOEXEC) };
        if raw < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `raw` is a fresh descriptor we own.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        let mut req = IfReq {
            name: [0; libc::IFNAMSIZ],
            flags: (libc::IFF_TUN | libc::IFF_NO_PI | extra) as libc::c_short,
            _pad: [0; 22],
        };
        req.name[..name.len()].copy_from_slice(name.as_bytes());
        // SAFETY: TUNSETIFF reads and writes an ifreq, which IfReq lays out.
        if unsafe { libc::ioctl(fd.as_raw_fd(), TUNSETIFF as _, &mut req) } < 0 {
            return Err(io::Error::last_os_error());
        }
        set_nonblocking(fd.as_raw_fd())?;
        let name = CStr::from_bytes_until_nul(&req.name)
            .map(|c| c.to_string_lossy().into_owned())
            .unwrap_or_else(|_| name.to_owned());
        Ok(Tun {
            fd,
            name,
            vnet: false,
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Whether packets carry a `virtio_net_hdr` (see [`Tun::open_offload`]).
    pub fn vnet(&self) -> bool {
        self.vnet
    }

    /// Read one packet. `WouldBlock` when none is queued.
    pub fn read(&self, buf: &mut [u8]) -> io::Result<usize> {
        // SAFETY: buf is valid for writes of buf.len() bytes.
        let n = unsafe { libc::read(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
        if n < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(n as usize)
        }
    }

    /// Write one packet (the kernel takes it whole or drops it).
    pub fn write(&self, packet: &[u8]) -> io::Result<usize> {
        // SAFETY: packet is valid for reads of packet.len() bytes.
        let n = unsafe { libc::write(self.fd.as_raw_fd(), packet.as_ptr().cast(), packet.len()) };
        if n < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(n as usize)
        }
    }
}

impl Tun {
    /// Write one packet given in pieces (the vnet header first, if any).
    pub fn writev(&self, iov: &[IoSlice<'_>]) -> io::Result<usize> {
        // SAFETY: IoSlice is ABI-compatible with iovec; the slices are live.
        let n = unsafe {
            libc::writev(
                self.fd.as_raw_fd(),
                iov.as_ptr().cast(),
                iov.len() as libc::c_int,
            )
        };
        if n < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(n as usize)
        }
    }
}

impl AsRawFd for Tun {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

pub(crate) fn set_nonblocking(fd: RawFd) -> io::Result<()> {
    // SAFETY: fcntl on a descriptor we hold; no pointers involved.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    if flags < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: as above.
    if unsafe { libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Wait until `fd` is readable or `timeout` passes; `Ok(false)` on timeout.
/// Worker threads use it between non-blocking reads so they notice a stop
/// request without a wake-up descriptor.
pub(crate) fn wait_readable(fd: RawFd, timeout: Duration) -> io::Result<bool> {
    Ok(poll_ready(&[fd], timeout)?[0])
}

/// Wait until one of `fds` is readable or `timeout` passes (zero: just
/// look); which ones are. Interrupted counts as none.
pub(crate) fn poll_ready<const N: usize>(
    fds: &[RawFd; N],
    timeout: Duration,
) -> io::Result<[bool; N]> {
    let mut pfds = fds.map(|fd| libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    });
    let ms = timeout.as_millis().min(i32::MAX as u128) as libc::c_int;
    // SAFETY: N valid pollfds.
    let n = unsafe { libc::poll(pfds.as_mut_ptr(), N as libc::nfds_t, ms) };
    if n < 0 {
        let e = io::Error::last_os_error();
        if e.kind() == io::ErrorKind::Interrupted {
            return Ok([false; N]);
        }
        return Err(e);
    }
    // Errors and hang-ups count as readable: the read reports them.
    Ok(pfds.map(|p| p.revents != 0))
}
