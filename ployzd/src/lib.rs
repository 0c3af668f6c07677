//! ployzd: the daemon every machine of a Ployz cluster runs.
//!
//! [`daemon::Daemon`] is the core: it owns the machine identity and the
//! replicated store, and answers one [`ployz_api::Request`] enum. The Unix
//! socket ([`server`]) is one way in; the binary (`main.rs`) only parses
//! flags, starts things and maps errors to exit codes.

pub mod bus;
pub mod daemon;
pub mod identity;
pub mod join;
pub mod nats;
pub mod ops;
pub mod overlay;
pub mod peer;
pub mod placement;
pub mod provisioning;
pub mod rules;
pub mod seal;
pub mod server;
pub mod store;
pub mod workloads;
