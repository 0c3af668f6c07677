//! The NATS client-protocol core of `ployzd`: what a NATS client sees when
//! it talks to ployzd as if it were nats-server.
//!
//! # Design
//!
//! Like `quinn-proto`, this crate does **no IO, owns no socket, reads no
//! clock and has no async**. Everything is a deterministic state machine:
//! bytes and the current time go in, actions come out. The current time is
//! always a parameter (`now: Duration` since an arbitrary origin), so tests
//! drive it with a fake clock and every run is reproducible.
//!
//! * [`parser`]: incremental, split-safe, mostly zero-copy parsers for both
//!   directions ([`Parser`] for what clients send, [`ServerOpParser`] for
//!   what servers send) and encoders ([`ClientOp::encode`],
//!   [`ServerOp::encode`]). Pull style: `next(buf) -> (consumed, op)`.
//!   Operations borrow from the input when they are wholly inside it, and
//!   from bounded internal buffers otherwise (control lines at most
//!   `max_control_line + 1` bytes, payloads at most `max_payload`).
//! * [`subject`]: subject validation (publish subjects vs subscription
//!   filters), matching, and [`Sublist`], a token-trie interest index with
//!   `*`/`>` wildcards and queue groups.
//! * [`session`]: [`Session`], one client connection: greeting (`INFO`),
//!   `CONNECT` and authentication, verbose `+OK`, `PING`/`PONG`, echo,
//!   headers, `no_responders`, `UNSUB` max counting, keepalive with stale
//!   detection, and bounded outbound buffering (slow consumer). It emits
//!   [`Action`]s (bytes to send, interest changes and publishes for the
//!   router, close) and receives deliveries through [`Session::deliver`].
//!
//! The IO layer (in `ployzd`) owns sockets and timers: it feeds reads to
//! [`Session::handle_input`], writes [`Action::Send`] bytes and reports them
//! with [`Session::bytes_flushed`], calls [`Session::handle_timeout`] at
//! [`Session::poll_timeout`], and routes [`Action::Publish`] through a
//! [`Sublist`] to other sessions' [`Session::deliver`].
//!
//! # Fidelity to nats-server
//!
//! Behaviour follows nats-server (checked against `parser.go`, `client.go`,
//! `sublist.go`, `errors.go` and `const.go`, v2.10–v2.14): error texts are
//! byte-exact (including their inconsistent casing, e.g.
//! `'maximum control line exceeded'` but `'Maximum Payload Violation'`),
//! fatal errors close the connection, malformed arguments (`PUB foo -1`,
//! an overflowing size, `HPUB` header size above total size, `CONNECT`
//! with bad JSON) close it *without* an `-ERR` (seen on the wire from
//! nats-server 2.9.10: natsd's compat suite checks both servers), `SUB` with a bad subject is answered with
//! `-ERR 'Invalid Subject'` and the connection stays up, a pedantic client
//! publishing to a wildcard gets `-ERR 'Invalid Publish Subject'` and the
//! message is still routed, and a slow consumer is dropped without an
//! `-ERR`. Deliberate differences are documented where they occur
//! (no first-PING jitter, non-UTF-8 subjects refused, `HMSG`/`MSG` from a
//! client rejected as unknown operations).

#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod error;
pub mod info;
pub mod parser;
pub mod session;
pub mod subject;

pub use error::ProtoError;
pub use info::{ConnectInfo, ServerInfo};
pub use parser::{ClientOp, Parser, ServerOp, ServerOpParser};
pub use session::{
    Action, Auth, CloseReason, ConnectionMeta, Delivery, Message, Permissions, ResponsePermission,
    ServerConfig, Session, Stats, SubjectPermission, User, MAX_TRACKED_REPLIES,
};
pub use subject::{Sublist, SublistResult};

/// `-ERR` text for an unknown verb or a bad payload terminator.
pub const ERR_UNKNOWN_OP: &str = "Unknown Protocol Operation";
/// `-ERR` text for an over-long control line (nats-server's
/// `ErrMaxControlLine`, lower case on the wire).
pub const ERR_MAX_CONTROL_LINE: &str = "maximum control line exceeded";
/// `-ERR` text for a payload above `max_payload`.
pub const ERR_MAX_PAYLOAD: &str = "Maximum Payload Violation";
/// `-ERR` text for any authentication failure.
pub const ERR_AUTH_VIOLATION: &str = "Authorization Violation";
