//! Protocol errors produced by the parsers.
//!
//! Every [`ProtoError`] is fatal for the connection, exactly like an error
//! returned from nats-server's `client.parse`. Some of them are announced to
//! the peer with an `-ERR` line first ([`ProtoError::err_text`]); the others
//! close the connection silently, as nats-server does (its `readLoop` only
//! logs those and calls `closeConnection(ProtocolViolation)`).

use std::fmt;

/// A fatal protocol error detected while parsing.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ProtoError {
    /// An unknown verb, a verb not followed by a separator, or a payload
    /// not terminated by CRLF (nats-server's `parseErr` label).
    /// Sent as `-ERR 'Unknown Protocol Operation'`.
    UnknownOp,
    /// A control line (the argument part) longer than `max_control_line`.
    /// `len` is a lower bound of the offending length.
    /// Sent as `-ERR 'maximum control line exceeded'`.
    MaxControlLine {
        /// Bytes seen so far (at least `max + 1`).
        len: usize,
        /// Configured maximum.
        max: usize,
    },
    /// A `PUB`/`HPUB` (or `MSG`/`HMSG`) announcing more than `max_payload`
    /// bytes. Sent as `-ERR 'Maximum Payload Violation'`.
    MaxPayload {
        /// Announced size (total size for `HPUB`).
        size: usize,
        /// Configured maximum.
        max: usize,
    },
    /// The connection must start with `CONNECT` (authorization required)
    /// but another operation arrived. Sent as
    /// `-ERR 'Authorization Violation'`.
    AuthViolation,
    /// `HPUB` on a connection that did not negotiate headers. nats-server
    /// returns `ErrMsgHeadersNotSupported` from the parser: silent close.
    HeadersNotSupported,
    /// Malformed arguments (wrong argument count, bad or missing size,
    /// header size larger than total size). Silent close.
    BadArgs {
        /// The operation whose arguments were bad.
        op: &'static str,
        /// What was wrong, mirroring the nats-server log text.
        reason: &'static str,
    },
}

impl ProtoError {
    /// The text nats-server sends in `-ERR '<text>'` before closing, or
    /// `None` when the connection is closed without an `-ERR`.
    pub fn err_text(&self) -> Option<&'static str> {
        match self {
            ProtoError::UnknownOp => Some(crate::ERR_UNKNOWN_OP),
            ProtoError::MaxControlLine { .. } => Some(crate::ERR_MAX_CONTROL_LINE),
            ProtoError::MaxPayload { .. } => Some(crate::ERR_MAX_PAYLOAD),
            ProtoError::AuthViolation => Some(crate::ERR_AUTH_VIOLATION),
            ProtoError::HeadersNotSupported | ProtoError::BadArgs { .. } => None,
        }
    }
}

impl fmt::Display for ProtoError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ProtoError::UnknownOp => f.write_str("unknown protocol operation"),
            ProtoError::MaxControlLine { len, max } => {
                write!(f, "maximum control line exceeded: {len} > {max}")
            }
            ProtoError::MaxPayload { size, max } => {
                write!(f, "maximum payload exceeded: {size} > {max}")
            }
            ProtoError::AuthViolation => f.write_str("authorization violation"),
            ProtoError::HeadersNotSupported => f.write_str("message headers not supported"),
            ProtoError::BadArgs { op, reason } => write!(f, "{op}: {reason}"),
        }
    }
}

impl std::error::Error for ProtoError {}
