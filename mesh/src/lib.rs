//! The WireGuard mesh of a ployz cluster.
//!
//! - [`overlay`]: the cluster range and its /24 machine slices.
//! - [`endpoints`]: a machine's underlay endpoint candidates.
//! - [`keys`]: WireGuard key material.
//! - [`wg`]: the userspace WireGuard device (boringtun's protocol core, our
//!   TUN/UDP data path and `wg`-compatible control socket).
//! - [`netconfig`]: interface address/MTU/route/up behind a trait.
//! - [`mesh`]: the [`Mesh`] API ployzd drives.
//! - [`rtt`] and [`prober`]: RTT statistics and the QUIC prober feeding them.

pub mod endpoints;
pub mod keys;
pub mod mesh;
pub mod netconfig;
pub mod overlay;
pub mod prober;
pub mod rtt;
pub mod wg;

pub use mesh::{Mesh, MeshConfig, MeshError, PeerConfig, PeerStatus};
pub use prober::{Prober, ProberError, RttRow};
