//! Wire and record types shared by `ployzd` and `ployzctl`.
//!
//! This is the only crate that knows the shape of what crosses the local API
//! socket (one [`wire::Request`] enum in, one [`wire::Response`] out) and of the
//! records kept in the replicated store ([`records`]). Both binaries depend on
//! it; it depends on nothing of ours, so `ployzctl` never links the store.
//!
//! Every JSON field is snake_case; the `--json` output schemas documented in
//! the README are these types serialised as they are.

pub mod compose;
pub mod gateway;
pub mod invite;
pub mod ports;
pub mod records;
pub mod time;
pub mod wire;

pub use gateway::*;
pub use ports::{Protocol, PublishedPort};
pub use records::*;
pub use wire::*;
