//! Userspace WireGuard: boringtun's `noise::Tunn` for the protocol, our own
//! TUN, UDP socket, peer table and UAPI control socket.

pub mod allowed;
pub mod batch;
pub mod device;
pub mod offload;
pub mod tun;
pub mod uapi;
