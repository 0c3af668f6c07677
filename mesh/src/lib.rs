//! Overlay addressing and underlay endpoints for the WireGuard mesh.
//!
//! Today: the pure arithmetic of the cluster range ([`overlay`]), the choice
//! and order of a machine's underlay endpoint candidates ([`endpoints`]) and
//! WireGuard key material ([`keys`]). The userspace WireGuard device and the
//! RTT prober build on these.

pub mod endpoints;
pub mod keys;
pub mod overlay;
