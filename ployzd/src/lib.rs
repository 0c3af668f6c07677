//! ployzd: the daemon every machine of a Ployz cluster runs.
//!
//! [`daemon::Daemon`] is the composition root: it builds each subsystem
//! once and [`api`] routes every request (one [`ployz_api::Request`] enum
//! from the socket, [`peer::PeerRequest`] from other machines) to the
//! subsystem that owns it. Subsystems own their state behind a narrow API
//! and depend on each other one way only (see `ARCHITECTURE.md`):
//! [`provisioning`] → [`cluster`] → [`workloads`] → [`overlay`] →
//! [`control`] → [`store`] → [`peer`]. The Unix socket ([`server`]) is one
//! way in; the binary (`main.rs`) only parses flags, starts things and maps
//! errors to exit codes.

// The request handlers' futures nest the store's (group commit, batched reads) deeper than
// the default limit of 128 lets rustc compute their layout.
#![recursion_limit = "256"]

pub mod api;
pub mod cluster;
pub mod control;
pub mod daemon;
pub mod dashboard;
pub mod doctor;
pub mod errors;
pub mod gateway;
pub mod http;
pub mod identity;
pub mod ingress;
#[cfg(ployz_fast_mem)]
mod mem;
pub mod metrics;
pub mod ops;
pub mod overlay;
pub mod peer;
pub mod provisioning;
pub mod server;
pub mod store;
pub mod workloads;

pub const VERSION: &str = env!("CARGO_PKG_VERSION");
