//! `ployzd`'s NATS server: what any standard NATS client sees when it connects to a ployz
//! machine.
//!
//! * **Client IO** ([`Server::serve`], [`Server::serve_connection`]): one task per connection
//!   drives a [`ployz_nats_proto::Session`] (all protocol rules live there, IO-free); interest
//!   lives in one shared [`ployz_nats_proto::Sublist`]. Delivery honours queue groups, echo,
//!   `UNSUB` max and no-responders; outbound buffers are bounded (slow consumers are cut off).
//! * **Routes** ([`Server::attach_route`], [`Server::maintain_route`]): a full mesh between the
//!   servers of a cluster over any byte stream (ployzd's encrypted peer channel, TCP in tests),
//!   speaking a simplified nats-server route protocol (`RS+`/`RS-`/`RMSG`/`HMSG`). A message is
//!   forwarded once to each route with matching interest and never re-forwarded; a queue group
//!   gets each message once cluster-wide.
//! * **JetStream KV** ([`Server::with_kv`]): the KV subset of the JetStream API over a
//!   [`KvBackend`] (the Raft store, `ployz_consensus::Node`, or a forwarder to it), enough for
//!   async-nats' `jetstream::kv` to work unchanged.
//!
//! **Architecture invariant:** protocol parsing and per-connection rules stay in
//! `ployz-nats-proto`; this crate only moves bytes, routes interest and maps the JetStream API
//! onto the store.
//!
//! ```no_run
//! # async fn demo(node: ployz_consensus::Node) -> std::io::Result<()> {
//! use ployz_natsd::{Credentials, Server, ServerConfig};
//! let server = Server::with_kv(
//!     ServerConfig {
//!         server_name: "machine-1".into(),
//!         credentials: Some(Credentials::Token("secret".into())),
//!         ..ServerConfig::default()
//!     },
//!     node,
//! );
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:4222").await?;
//! tokio::spawn({
//!     let server = server.clone();
//!     async move { server.serve(listener).await }
//! });
//! // Dialing side of a route (the acceptor calls `server.attach_route(stream, name)`):
//! server.maintain_route("machine-2", || tokio::net::TcpStream::connect("10.0.0.2:6222"));
//! // ...
//! server.shutdown().await;
//! # Ok(())
//! # }
//! ```

#![forbid(unsafe_code)]

mod auth_failures;
mod backend;
mod config;
mod jetstream;
mod route;
mod server;

pub use backend::{BackendError, KvBackend};
pub use config::{Credentials, ServerConfig};
pub use server::{RouteHandle, Server, ServerStats};
