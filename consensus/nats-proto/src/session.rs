//! The per-connection state machine of a NATS server.
//!
//! A [`Session`] is driven by three inputs, all carrying the current time as
//! a [`Duration`] since an arbitrary origin (a fake clock in tests):
//!
//! * [`Session::handle_input`]: bytes read from the socket;
//! * [`Session::handle_timeout`]: the deadline from
//!   [`Session::poll_timeout`] passed (keepalive, auth timeout);
//! * [`Session::deliver`]: the router hands over a message for one of this
//!   connection's subscriptions.
//!
//! and produces [`Action`]s via [`Session::poll_action`]: bytes to write,
//! interest changes and publishes for the router, and finally a close.
//! Outbound bytes count as *pending* until the IO layer reports them written
//! with [`Session::bytes_flushed`]; above [`ServerConfig::max_pending`] the
//! session closes itself as a slow consumer and stops queueing.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use crate::error::ProtoError;
use crate::info::{ConnectInfo, ServerInfo};
use crate::parser::{
    encode_err, push_usize, ClientOp, Parser, DEFAULT_MAX_CONTROL_LINE, DEFAULT_MAX_PAYLOAD,
};
use crate::subject::{is_valid_filter, is_valid_literal_subject, subject_matches};

/// nats-server's `MAX_PENDING_SIZE` (64 MiB).
pub const DEFAULT_MAX_PENDING: usize = 64 * 1024 * 1024;
/// nats-server's `DEFAULT_PING_INTERVAL`.
pub const DEFAULT_PING_INTERVAL: Duration = Duration::from_secs(120);
/// nats-server's `DEFAULT_PING_MAX_OUT`.
pub const DEFAULT_MAX_PINGS_OUT: u32 = 2;
/// nats-server's `firstClientPingInterval`.
pub const DEFAULT_FIRST_PING_INTERVAL: Duration = Duration::from_secs(2);
/// nats-server's `AUTH_TIMEOUT`.
pub const DEFAULT_AUTH_TIMEOUT: Duration = Duration::from_secs(2);
/// nats-server's `DEFAULT_RTT_MEASUREMENT_INTERVAL`: after this long without
/// an RTT sample, the ping timer sends a PING even on a busy connection.
pub const RTT_MEASUREMENT_INTERVAL: Duration = Duration::from_secs(3600);

/// Client authentication required by the server. Its `Debug` never shows a
/// password or token.
#[derive(Clone, Default, PartialEq, Eq)]
pub enum Auth {
    /// Anyone may connect; `CONNECT` is optional.
    #[default]
    None,
    /// `CONNECT {"auth_token": ...}` must match.
    Token(String),
    /// `CONNECT {"user": ..., "pass": ...}` must match.
    UserPass {
        /// Username.
        user: String,
        /// Password (plain text; bcrypt hashes are not supported).
        pass: String,
    },
    /// nats-server's `authorization { users = [...] }`: `CONNECT {"user",
    /// "pass"}` must match one of them; that user's permissions then apply
    /// to the connection.
    Users(Vec<User>),
}

impl std::fmt::Debug for Auth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Auth::None => f.write_str("None"),
            Auth::Token(_) => f.write_str("Token(<redacted>)"),
            Auth::UserPass { user, .. } => f
                .debug_struct("UserPass")
                .field("user", user)
                .field("pass", &"<redacted>")
                .finish(),
            Auth::Users(users) => f.debug_tuple("Users").field(users).finish(),
        }
    }
}

/// One user of [`Auth::Users`]. Its `Debug` never shows the password.
#[derive(Clone, PartialEq, Eq)]
pub struct User {
    /// Username.
    pub user: String,
    /// Password (plain text).
    pub pass: String,
    /// What the user may do; `None` is everything (nats-server's default).
    pub permissions: Option<Arc<Permissions>>,
}

impl std::fmt::Debug for User {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("User")
            .field("user", &self.user)
            .field("pass", &"<redacted>")
            .field("permissions", &self.permissions)
            .finish()
    }
}

/// nats-server's user permissions: what a connection may publish to and
/// subscribe to. Violations are answered with nats-server's
/// `-ERR 'Permissions Violation for Publish to "SUBJECT"'` /
/// `... for Subscription to "SUBJECT"` and leave the connection open.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Permissions {
    /// Subjects the user may publish to.
    pub publish: SubjectPermission,
    /// Subjects the user may subscribe to.
    pub subscribe: SubjectPermission,
    /// nats-server's `allow_responses`: publishing to the reply subject of
    /// a message this connection received is allowed, `max` times each,
    /// whatever `publish` says (`expires` is not supported: a reply subject
    /// stays usable until used, or until [`MAX_TRACKED_REPLIES`] newer
    /// ones pushed it out).
    pub responses: Option<ResponsePermission>,
}

/// Allow and deny lists of subjects (wildcards allowed). An empty `allow`
/// allows everything; `deny` wins over `allow`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SubjectPermission {
    /// Allowed subjects; empty: all.
    pub allow: Vec<String>,
    /// Denied subjects.
    pub deny: Vec<String>,
}

/// See [`Permissions::responses`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ResponsePermission {
    /// Responses allowed per received request (nats-server's `max`, default 1).
    pub max: u32,
}

impl Default for ResponsePermission {
    fn default() -> Self {
        ResponsePermission { max: 1 }
    }
}

/// Reply subjects remembered per connection for `allow_responses`.
pub const MAX_TRACKED_REPLIES: usize = 10_000;

impl Permissions {
    /// `PUB subject` without the responses allowance: allowed by `allow`
    /// (or `allow` empty) and not denied (nats-server's `pubAllowed`).
    pub fn may_publish(&self, subject: &str) -> bool {
        let p = &self.publish;
        (p.allow.is_empty() || p.allow.iter().any(|f| subject_matches(f, subject)))
            && !p.deny.iter().any(|f| subject_matches(f, subject))
    }

    /// `SUB filter` (nats-server's `canSubscribe` for clients): the filter,
    /// its wildcards taken as tokens, matches an allowed subject and no
    /// denied one. A wildcard subscription that overlaps a denied subject is
    /// allowed; [`Permissions::may_receive`] then filters its messages.
    pub fn may_subscribe(&self, filter: &str) -> bool {
        let s = &self.subscribe;
        (s.allow.is_empty() || s.allow.iter().any(|f| subject_matches(f, filter)))
            && !s.deny.iter().any(|f| subject_matches(f, filter))
    }

    /// Whether a message on `subject` may reach this user's subscriptions
    /// (the subscribe deny list, as nats-server's deny filter does).
    pub fn may_receive(&self, subject: &str) -> bool {
        !self
            .subscribe
            .deny
            .iter()
            .any(|f| subject_matches(f, subject))
    }
}

impl Auth {
    fn required(&self) -> bool {
        !matches!(self, Auth::None)
    }

    /// nats-server's `checkAuthentication` for the simple single-user and
    /// token configurations.
    fn check(&self, c: &ConnectInfo) -> bool {
        match self {
            Auth::None => true,
            Auth::Token(t) => ct_eq(
                t.as_bytes(),
                c.auth_token.as_deref().unwrap_or("").as_bytes(),
            ),
            Auth::UserPass { user, pass } => {
                c.user.as_deref() == Some(user.as_str())
                    && ct_eq(pass.as_bytes(), c.pass.as_deref().unwrap_or("").as_bytes())
            }
            Auth::Users(_) => self.user(c).is_some(),
        }
    }

    /// The [`Auth::Users`] entry a `CONNECT` authenticates as.
    fn user(&self, c: &ConnectInfo) -> Option<&User> {
        let Auth::Users(users) = self else {
            return None;
        };
        let name = c.user.as_deref()?;
        let u = users.iter().find(|u| u.user == name)?;
        ct_eq(
            u.pass.as_bytes(),
            c.pass.as_deref().unwrap_or("").as_bytes(),
        )
        .then_some(u)
    }
}

/// Constant-time comparison (like Go's `subtle.ConstantTimeCompare`, it does
/// not hide the length).
fn ct_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Server-wide settings shared by all sessions.
#[derive(Clone, Debug)]
pub struct ServerConfig {
    /// `server_id` in INFO.
    pub server_id: String,
    /// `server_name` in INFO.
    pub server_name: String,
    /// `version` in INFO (clients parse it as semver; keep it nats-like).
    pub version: String,
    /// `go` in INFO.
    pub go: String,
    /// `host` in INFO.
    pub host: String,
    /// `port` in INFO.
    pub port: u16,
    /// Maximum payload (`PUB` size, `HPUB` total size).
    pub max_payload: usize,
    /// Maximum control line argument length.
    pub max_control_line: usize,
    /// Maximum outbound bytes not yet flushed before slow-consumer close.
    pub max_pending: usize,
    /// Maximum subscriptions per connection, 0 = unlimited.
    pub max_subs: usize,
    /// Interval of the server's keepalive PINGs; zero disables keepalive.
    pub ping_interval: Duration,
    /// Delay of the first PING after accept / CONNECT (capped by
    /// `ping_interval`). nats-server adds up to 20% random jitter; this
    /// crate is deterministic and does not.
    pub first_ping_interval: Duration,
    /// Unanswered PINGs tolerated; one more closes with `Stale Connection`.
    pub max_pings_out: u32,
    /// Authentication.
    pub auth: Auth,
    /// Time allowed for the `CONNECT` when authentication is required.
    pub auth_timeout: Duration,
    /// Message headers supported.
    pub headers: bool,
    /// `jetstream` in INFO.
    pub jetstream: bool,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            server_id: String::new(),
            server_name: String::new(),
            version: "2.10.0".to_string(),
            go: "ployzd".to_string(),
            host: "0.0.0.0".to_string(),
            port: 4222,
            max_payload: DEFAULT_MAX_PAYLOAD,
            max_control_line: DEFAULT_MAX_CONTROL_LINE,
            max_pending: DEFAULT_MAX_PENDING,
            max_subs: 0,
            ping_interval: DEFAULT_PING_INTERVAL,
            first_ping_interval: DEFAULT_FIRST_PING_INTERVAL,
            max_pings_out: DEFAULT_MAX_PINGS_OUT,
            auth: Auth::None,
            auth_timeout: DEFAULT_AUTH_TIMEOUT,
            headers: true,
            jetstream: false,
        }
    }
}

/// Per-connection facts known at accept time.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ConnectionMeta {
    /// `client_id` in INFO (nats-server's `cid`).
    pub client_id: u64,
    /// `client_ip` in INFO.
    pub client_ip: Option<String>,
    /// `tls_required` in INFO: the IO layer upgrades the connection to TLS
    /// right after writing the INFO line (nats-server's TLS handshake).
    pub tls_required: bool,
}

/// Why a session closed (names follow nats-server's `ClosedState`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CloseReason {
    /// Peer closed the socket (reported by the IO layer).
    ClientClosed,
    /// Socket read failed (reported by the IO layer).
    ReadError,
    /// Socket write failed (reported by the IO layer).
    WriteError,
    /// Unknown operation (`-ERR 'Unknown Protocol Operation'`), malformed
    /// arguments, invalid CONNECT/INFO JSON or unsupported `HPUB`.
    ProtocolViolation,
    /// The client sent `-ERR`.
    ParseError,
    /// `-ERR 'Authorization Violation'`.
    AuthenticationViolation,
    /// `-ERR 'Authentication Timeout'`.
    AuthenticationTimeout,
    /// `-ERR 'Maximum Payload Violation'`.
    MaxPayloadExceeded,
    /// `-ERR 'maximum control line exceeded'`.
    MaxControlLineExceeded,
    /// `-ERR 'invalid client protocol'`.
    BadClientProtocolVersion,
    /// `-ERR 'no responders requires headers support'`.
    NoRespondersRequiresHeaders,
    /// `-ERR 'Stale Connection'`.
    StaleConnection,
    /// Pending outbound bytes exceeded `max_pending`; no `-ERR` is sent.
    SlowConsumerPendingBytes,
    /// Closed by the server (e.g. shutdown).
    ServerShutdown,
}

impl CloseReason {
    /// Whether the IO layer should drop pending output instead of flushing
    /// it before closing (nats-server's `skipFlushOnClose`).
    pub fn skip_flush(self) -> bool {
        matches!(
            self,
            CloseReason::ReadError
                | CloseReason::WriteError
                | CloseReason::SlowConsumerPendingBytes
        )
    }
}

/// Something the IO layer or the router must do.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    /// Write these bytes to the socket (consecutive writes are coalesced).
    /// Report completion with [`Session::bytes_flushed`].
    Send(Vec<u8>),
    /// A valid `CONNECT` was accepted; see [`Session::connect_info`].
    Connected,
    /// Add interest: route messages matching `subject` to this session
    /// with [`Session::deliver`] and this `sid`.
    Subscribe {
        /// Subscription id.
        sid: String,
        /// Subject filter (validated).
        subject: String,
        /// Queue group.
        queue: Option<String>,
    },
    /// Remove the interest registered for `sid` (explicit `UNSUB`, or the
    /// auto-unsubscribe limit was reached in [`Session::deliver`]).
    Unsubscribe {
        /// Subscription id.
        sid: String,
    },
    /// `UNSUB <sid> <max>`: the interest stays until `max` messages were
    /// delivered in total; the session then emits [`Action::Unsubscribe`].
    /// Informational (e.g. to propagate to other servers).
    AutoUnsubscribe {
        /// Subscription id.
        sid: String,
        /// Total deliveries after which the subscription ends.
        max: u64,
    },
    /// The client published a message.
    Publish {
        /// Subject as sent (may contain wildcards when not pedantic, like
        /// nats-server; a [`crate::Sublist`] treats them literally).
        subject: String,
        /// Reply subject.
        reply: Option<String>,
        /// Header block for `HPUB`.
        headers: Option<Vec<u8>>,
        /// Payload.
        payload: Vec<u8>,
    },
    /// Close the connection. Flush pending output first unless
    /// [`CloseReason::skip_flush`]. No further action follows. The router
    /// must drop all of this session's subscriptions.
    Close {
        /// Why.
        reason: CloseReason,
    },
}

/// A message handed to [`Session::deliver`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Message<'a> {
    /// Subject it was published to.
    pub subject: &'a str,
    /// Reply subject.
    pub reply: Option<&'a str>,
    /// Header block (`NATS/1.0...`), if any.
    pub headers: Option<&'a [u8]>,
    /// Payload.
    pub payload: &'a [u8],
}

/// Result of [`Session::deliver`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Delivery {
    /// Queued for the client.
    Delivered,
    /// Queued, and it was the last one allowed by `UNSUB <sid> <max>`: the
    /// subscription is gone ([`Action::Unsubscribe`] was emitted).
    DeliveredLast,
    /// Not delivered: the publisher is this connection and it asked for
    /// `echo: false`. (A queue group should try another member.)
    EchoSuppressed,
    /// Not delivered: no such subscription (anymore).
    NoSuchSubscription,
    /// Not delivered: the session is closed (possibly just now, as a slow
    /// consumer).
    Closed,
    /// Not delivered: the user's subscribe permissions deny the subject
    /// (a wildcard subscription overlapping a denied subject).
    Denied,
}

/// Traffic counters.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    /// Messages received from the client.
    pub in_msgs: u64,
    /// Payload bytes (headers included) received.
    pub in_bytes: u64,
    /// Messages delivered to the client.
    pub out_msgs: u64,
    /// Payload bytes (headers included) delivered.
    pub out_bytes: u64,
}

#[derive(Clone, Debug)]
struct SubState {
    subject: String,
    queue: Option<String>,
    max: Option<u64>,
    delivered: u64,
}

/// One client connection; see the [module docs](self).
#[derive(Debug)]
pub struct Session {
    parser: Parser,
    core: Core,
}

#[derive(Debug)]
struct Core {
    config: Arc<ServerConfig>,
    client_id: u64,
    actions: VecDeque<Action>,
    pending: usize,
    closed: Option<CloseReason>,
    connect: Option<ConnectInfo>,
    connect_received: bool,
    verbose: bool,
    pedantic: bool,
    echo: bool,
    headers: bool,
    no_responders: bool,
    subs: BTreeMap<String, SubState>,
    created: Duration,
    /// Last client data (`PUB`/`HPUB`) or `PING`: nats-server's `lastIn`,
    /// which lets the ping timer skip a PING on a busy connection.
    last_in: Option<Duration>,
    pings_out: u32,
    next_ping: Option<Duration>,
    rtt_start: Option<Duration>,
    rtt: Option<Duration>,
    auth_deadline: Option<Duration>,
    stats: Stats,
    /// The authenticated user's permissions; `None`: everything.
    perms: Option<Arc<Permissions>>,
    /// `allow_responses`: reply subjects received, with responses left.
    replies: HashMap<String, u32>,
    /// Their arrival order, to forget the oldest beyond the limit.
    reply_order: VecDeque<String>,
}

const ERR_INVALID_SUBJECT: &str = "Invalid Subject";
const ERR_INVALID_PUBLISH_SUBJECT: &str = "Invalid Publish Subject";
const ERR_MAX_SUBS: &str = "maximum subscriptions exceeded";
const ERR_AUTH_TIMEOUT: &str = "Authentication Timeout";
const ERR_BAD_PROTOCOL: &str = "invalid client protocol";
const ERR_NO_RESPONDERS: &str = "no responders requires headers support";
const ERR_STALE: &str = "Stale Connection";

impl Session {
    /// A new connection accepted at `now`. Queues the `INFO` line and arms
    /// the first-PING and (if authentication is required) auth timers.
    pub fn new(config: Arc<ServerConfig>, meta: ConnectionMeta, now: Duration) -> Self {
        let info = ServerInfo {
            server_id: config.server_id.clone(),
            server_name: config.server_name.clone(),
            version: config.version.clone(),
            proto: 1,
            git_commit: None,
            go: config.go.clone(),
            host: config.host.clone(),
            port: config.port,
            headers: config.headers,
            auth_required: config.auth.required(),
            tls_required: meta.tls_required,
            max_payload: i64::try_from(config.max_payload).unwrap_or(i64::MAX),
            jetstream: config.jetstream,
            client_id: meta.client_id,
            client_ip: meta.client_ip,
            nonce: None,
            cluster: None,
            connect_urls: Vec::new(),
            ldm: false,
        };
        let parser = Parser::new(config.max_control_line, config.max_payload);
        let defaults = ConnectInfo::default();
        let mut core = Core {
            client_id: meta.client_id,
            actions: VecDeque::new(),
            pending: 0,
            closed: None,
            connect: None,
            connect_received: false,
            verbose: defaults.verbose,
            pedantic: defaults.pedantic,
            echo: defaults.echo,
            headers: false,
            no_responders: false,
            subs: BTreeMap::new(),
            created: now,
            last_in: None,
            pings_out: 0,
            next_ping: None,
            rtt_start: None,
            rtt: None,
            auth_deadline: None,
            stats: Stats::default(),
            perms: None,
            replies: HashMap::new(),
            reply_order: VecDeque::new(),
            config,
        };
        let json = info.to_json();
        core.write(|out| crate::parser::ServerOp::Info(&json).encode(out));
        if core.config.auth.required() {
            core.auth_deadline = Some(now.saturating_add(core.config.auth_timeout));
        }
        core.arm_first_ping(now);
        Session { parser, core }
    }

    /// Feeds bytes read from the socket.
    pub fn handle_input(&mut self, data: &[u8], now: Duration) {
        if self.core.closed.is_some() {
            return;
        }
        let mut off = 0;
        while off < data.len() && self.core.closed.is_none() {
            let require_connect = self.core.config.auth.required() && !self.core.connect_received;
            self.parser.set_require_connect(require_connect);
            self.parser.set_headers(self.core.headers);
            let (n, item) = self.parser.next(&data[off..]);
            off += n;
            match item {
                Some(Ok(op)) => self.core.handle_op(op, now),
                Some(Err(e)) => self.core.protocol_error(&e),
                None => break,
            }
        }
    }

    /// The next thing to do, in order.
    pub fn poll_action(&mut self) -> Option<Action> {
        self.core.actions.pop_front()
    }

    /// The IO layer wrote `n` bytes handed out in [`Action::Send`].
    pub fn bytes_flushed(&mut self, n: usize) {
        self.core.pending = self.core.pending.saturating_sub(n);
    }

    /// Outbound bytes queued or handed out but not yet reported flushed.
    pub fn pending_bytes(&self) -> usize {
        self.core.pending
    }

    /// When [`Session::handle_timeout`] should be called next.
    pub fn poll_timeout(&self) -> Option<Duration> {
        if self.core.closed.is_some() {
            return None;
        }
        match (self.core.next_ping, self.core.auth_deadline) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// Processes expired timers: the auth timeout and the keepalive PING /
    /// stale-connection check (nats-server's `processPingTimer`).
    pub fn handle_timeout(&mut self, now: Duration) {
        self.core.handle_timeout(now);
    }

    /// Encodes a `MSG`/`HMSG` for subscription `sid`. `from_self` tells
    /// whether this connection published it (for `echo: false`). Headers are
    /// stripped for a client that did not negotiate them, as nats-server
    /// does. Enforces `UNSUB <sid> <max>`.
    pub fn deliver(&mut self, sid: &str, msg: &Message<'_>, from_self: bool) -> Delivery {
        self.core.deliver(sid, msg, from_self)
    }

    /// Sends the 503 "no responders" status nats-server sends to a
    /// requester (`HMSG <reply> <sid> <hdr> <hdr>` with
    /// `NATS/1.0 503\r\nNats-Subject: <subject>\r\n\r\n`), if this client
    /// asked for `no_responders`. `sid` is the client's subscription
    /// matching `reply`. Returns whether it was queued.
    pub fn deliver_no_responders(&mut self, sid: &str, reply: &str, subject: &str) -> bool {
        let core = &mut self.core;
        if core.closed.is_some() || !core.no_responders {
            return false;
        }
        core.write(|out| {
            let hdr_len = 32 + subject.len();
            out.extend_from_slice(b"HMSG ");
            out.extend_from_slice(reply.as_bytes());
            out.push(b' ');
            out.extend_from_slice(sid.as_bytes());
            out.push(b' ');
            push_usize(out, hdr_len);
            out.push(b' ');
            push_usize(out, hdr_len);
            out.extend_from_slice(b"\r\nNATS/1.0 503\r\nNats-Subject: ");
            out.extend_from_slice(subject.as_bytes());
            out.extend_from_slice(b"\r\n\r\n\r\n");
        })
    }

    /// Closes the session (IO errors, shutdown). Idempotent.
    pub fn close(&mut self, reason: CloseReason) {
        self.core.close(reason);
    }

    /// The user's credentials were withdrawn (removed or changed, as on a
    /// nats-server reload): `-ERR 'Authorization Violation'`, then close.
    pub fn revoke(&mut self) {
        if self.core.closed.is_none() {
            self.core.send_err(crate::ERR_AUTH_VIOLATION);
            self.core.close(CloseReason::AuthenticationViolation);
        }
    }

    /// The user this connection authenticated as (once `CONNECT` was
    /// accepted and the server requires credentials).
    pub fn user(&self) -> Option<&str> {
        if !self.core.config.auth.required() {
            return None;
        }
        self.core.connect.as_ref().and_then(|c| c.user.as_deref())
    }

    /// Whether the session is closed.
    pub fn is_closed(&self) -> bool {
        self.core.closed.is_some()
    }

    /// Why the session closed.
    pub fn close_reason(&self) -> Option<CloseReason> {
        self.core.closed
    }

    /// The accepted `CONNECT`, if any.
    pub fn connect_info(&self) -> Option<&ConnectInfo> {
        self.core.connect.as_ref()
    }

    /// Connection id.
    pub fn client_id(&self) -> u64 {
        self.core.client_id
    }

    /// Whether the client wants its own messages (`echo`, default true).
    pub fn echo(&self) -> bool {
        self.core.echo
    }

    /// Whether headers were negotiated.
    pub fn headers(&self) -> bool {
        self.core.headers
    }

    /// Whether the client asked for 503 no-responders messages.
    pub fn no_responders(&self) -> bool {
        self.core.no_responders
    }

    /// Whether `+OK` follows every operation.
    pub fn verbose(&self) -> bool {
        self.core.verbose
    }

    /// Last measured round-trip time.
    pub fn rtt(&self) -> Option<Duration> {
        self.core.rtt
    }

    /// Unanswered server PINGs.
    pub fn pings_out(&self) -> u32 {
        self.core.pings_out
    }

    /// Traffic counters.
    pub fn stats(&self) -> Stats {
        self.core.stats
    }

    /// Current subscriptions: `(sid, subject, queue)`.
    pub fn subscriptions(&self) -> impl Iterator<Item = (&str, &str, Option<&str>)> + '_ {
        self.core
            .subs
            .iter()
            .map(|(sid, s)| (sid.as_str(), s.subject.as_str(), s.queue.as_deref()))
    }
}

impl Core {
    /// Encodes into the outbound queue, enforcing `max_pending`.
    fn write(&mut self, f: impl FnOnce(&mut Vec<u8>)) -> bool {
        if self.closed.is_some() {
            return false;
        }
        if !matches!(self.actions.back(), Some(Action::Send(_))) {
            self.actions.push_back(Action::Send(Vec::new()));
        }
        let Some(Action::Send(buf)) = self.actions.back_mut() else {
            return false;
        };
        let before = buf.len();
        f(buf);
        let added = buf.len() - before;
        if self.pending.saturating_add(added) > self.config.max_pending {
            buf.truncate(before);
            if buf.is_empty() {
                self.actions.pop_back();
            }
            self.close(CloseReason::SlowConsumerPendingBytes);
            return false;
        }
        self.pending += added;
        true
    }

    fn send_err(&mut self, text: &str) {
        self.write(|out| encode_err(out, text));
    }

    fn send_ok(&mut self) {
        self.write(|out| out.extend_from_slice(b"+OK\r\n"));
    }

    fn close(&mut self, reason: CloseReason) {
        if self.closed.is_some() {
            return;
        }
        self.closed = Some(reason);
        self.next_ping = None;
        self.auth_deadline = None;
        self.actions.push_back(Action::Close { reason });
    }

    fn arm_first_ping(&mut self, now: Duration) {
        let interval = self.config.ping_interval;
        self.next_ping = if interval.is_zero() {
            None
        } else {
            Some(now.saturating_add(self.config.first_ping_interval.min(interval)))
        };
    }

    fn protocol_error(&mut self, e: &ProtoError) {
        if let Some(text) = e.err_text() {
            self.send_err(text);
        }
        let reason = match e {
            ProtoError::MaxControlLine { .. } => CloseReason::MaxControlLineExceeded,
            ProtoError::MaxPayload { .. } => CloseReason::MaxPayloadExceeded,
            ProtoError::AuthViolation => CloseReason::AuthenticationViolation,
            ProtoError::UnknownOp
            | ProtoError::HeadersNotSupported
            | ProtoError::BadArgs { .. } => CloseReason::ProtocolViolation,
        };
        self.close(reason);
    }

    fn handle_op(&mut self, op: ClientOp<'_>, now: Duration) {
        match op {
            ClientOp::Connect(json) => self.on_connect(json, now),
            ClientOp::Pub {
                subject,
                reply,
                payload,
            } => {
                self.last_in = Some(now);
                self.on_pub(subject, reply, None, payload)
            }
            ClientOp::HPub {
                subject,
                reply,
                headers,
                payload,
            } => {
                self.last_in = Some(now);
                self.on_pub(subject, reply, Some(headers), payload)
            }
            ClientOp::Sub {
                subject,
                queue,
                sid,
            } => self.on_sub(subject, queue, sid),
            ClientOp::Unsub { sid, max } => self.on_unsub(sid, max),
            ClientOp::Ping => {
                self.last_in = Some(now);
                self.write(|out| out.extend_from_slice(b"PONG\r\n"));
            }
            ClientOp::Pong => {
                self.pings_out = 0;
                if let Some(start) = self.rtt_start {
                    self.rtt = Some(now.saturating_sub(start).max(Duration::from_nanos(1)));
                }
            }
            ClientOp::Info(json) => {
                // nats-server unmarshals it and ignores it for clients.
                if serde_json::from_slice::<serde_json::Value>(json).is_err() {
                    self.close(CloseReason::ProtocolViolation);
                }
            }
            ClientOp::Ok => {}
            ClientOp::Err(_) => self.close(CloseReason::ParseError),
        }
    }

    fn on_connect(&mut self, json: &[u8], now: Duration) {
        self.auth_deadline = None;
        self.arm_first_ping(now);
        let Ok(ci) = ConnectInfo::from_json(json) else {
            self.close(CloseReason::ProtocolViolation);
            return;
        };
        self.connect_received = true;
        self.echo = ci.echo;
        self.verbose = ci.verbose;
        self.pedantic = ci.pedantic;
        self.headers = self.config.headers && ci.headers;
        self.no_responders = ci.no_responders;
        self.rtt = Some(
            now.saturating_sub(self.created)
                .max(Duration::from_nanos(1)),
        );
        if !self.config.auth.check(&ci) || ci.account.is_some() || ci.new_account {
            self.send_err(crate::ERR_AUTH_VIOLATION);
            self.close(CloseReason::AuthenticationViolation);
            return;
        }
        if !(0..=1).contains(&ci.protocol) {
            self.send_err(ERR_BAD_PROTOCOL);
            self.close(CloseReason::BadClientProtocolVersion);
            return;
        }
        if ci.no_responders && !self.headers {
            self.send_err(ERR_NO_RESPONDERS);
            self.close(CloseReason::NoRespondersRequiresHeaders);
            return;
        }
        self.perms = self
            .config
            .auth
            .user(&ci)
            .and_then(|u| u.permissions.clone());
        let verbose = ci.verbose;
        self.connect = Some(ci);
        if verbose {
            self.send_ok();
        }
        self.actions.push_back(Action::Connected);
    }

    fn on_pub(
        &mut self,
        subject: &[u8],
        reply: Option<&[u8]>,
        headers: Option<&[u8]>,
        payload: &[u8],
    ) {
        self.stats.in_msgs += 1;
        self.stats.in_bytes += (headers.map_or(0, <[u8]>::len) + payload.len()) as u64;
        let subject = std::str::from_utf8(subject).ok();
        let reply = match reply {
            None => Some(None),
            Some(r) => std::str::from_utf8(r).ok().map(Some),
        };
        let (Some(subject), Some(reply)) = (subject, reply) else {
            // Not representable as a subject string: refused (nats-server
            // would route the raw bytes).
            self.send_err(ERR_INVALID_PUBLISH_SUBJECT);
            return;
        };
        if self.pedantic && !is_valid_literal_subject(subject) {
            // Non-fatal, and the message is still processed (nats-server).
            self.send_err(ERR_INVALID_PUBLISH_SUBJECT);
        }
        if !self.may_publish(subject) {
            // Non-fatal: the message is dropped, the connection stays.
            self.send_err(&format!(
                "Permissions Violation for Publish to {}",
                go_quote(subject)
            ));
            return;
        }
        if self.verbose {
            self.send_ok();
        }
        self.actions.push_back(Action::Publish {
            subject: subject.to_string(),
            reply: reply.map(str::to_string),
            headers: headers.map(<[u8]>::to_vec),
            payload: payload.to_vec(),
        });
    }

    fn on_sub(&mut self, subject: &[u8], queue: Option<&[u8]>, sid: &[u8]) {
        if self.config.max_subs > 0 && self.subs.len() >= self.config.max_subs {
            self.send_err(ERR_MAX_SUBS);
            return;
        }
        let subject = std::str::from_utf8(subject).ok();
        let queue = match queue {
            None => Some(None),
            Some(q) => std::str::from_utf8(q).ok().map(Some),
        };
        let sid = std::str::from_utf8(sid).ok();
        let (Some(subject), Some(queue), Some(sid)) = (subject, queue, sid) else {
            self.send_err(ERR_INVALID_SUBJECT);
            return;
        };
        if self.subs.contains_key(sid) {
            // nats-server keeps the existing subscription and says nothing.
            if self.verbose {
                self.send_ok();
            }
            return;
        }
        if !is_valid_filter(subject) {
            self.send_err(ERR_INVALID_SUBJECT);
            return;
        }
        if let Some(p) = &self.perms {
            if !p.may_subscribe(subject) {
                let text = match queue {
                    None => format!(
                        "Permissions Violation for Subscription to {}",
                        go_quote(subject)
                    ),
                    Some(q) => format!(
                        "Permissions Violation for Subscription to {} using queue {}",
                        go_quote(subject),
                        go_quote(q)
                    ),
                };
                self.send_err(&text);
                return;
            }
        }
        self.subs.insert(
            sid.to_string(),
            SubState {
                subject: subject.to_string(),
                queue: queue.map(str::to_string),
                max: None,
                delivered: 0,
            },
        );
        if self.verbose {
            self.send_ok();
        }
        self.actions.push_back(Action::Subscribe {
            sid: sid.to_string(),
            subject: subject.to_string(),
            queue: queue.map(str::to_string),
        });
    }

    fn on_unsub(&mut self, sid: &[u8], max: Option<u64>) {
        if self.verbose {
            self.send_ok();
        }
        let Ok(sid) = std::str::from_utf8(sid) else {
            return;
        };
        let Some(sub) = self.subs.get_mut(sid) else {
            return;
        };
        match max {
            Some(m) if m > 0 && sub.delivered < m => {
                sub.max = Some(m);
                self.actions.push_back(Action::AutoUnsubscribe {
                    sid: sid.to_string(),
                    max: m,
                });
            }
            _ => {
                self.subs.remove(sid);
                self.actions.push_back(Action::Unsubscribe {
                    sid: sid.to_string(),
                });
            }
        }
    }

    fn deliver(&mut self, sid: &str, msg: &Message<'_>, from_self: bool) -> Delivery {
        if self.closed.is_some() {
            return Delivery::Closed;
        }
        if from_self && !self.echo {
            return Delivery::EchoSuppressed;
        }
        if !self.subs.contains_key(sid) {
            return Delivery::NoSuchSubscription;
        }
        if let Some(p) = &self.perms {
            if !p.may_receive(msg.subject) {
                return Delivery::Denied;
            }
            if let (Some(r), Some(allow)) = (msg.reply, p.responses) {
                self.remember_reply(r, allow.max);
            }
        }
        let Some(sub) = self.subs.get_mut(sid) else {
            return Delivery::NoSuchSubscription;
        };
        sub.delivered += 1;
        let last = sub.max.is_some_and(|m| sub.delivered >= m);
        let headers = msg.headers.filter(|h| self.headers && !h.is_empty());
        let written = self.write(|out| {
            let op = match headers {
                Some(h) => crate::parser::ServerOp::HMsg {
                    subject: msg.subject.as_bytes(),
                    sid: sid.as_bytes(),
                    reply: msg.reply.map(str::as_bytes),
                    headers: h,
                    payload: msg.payload,
                },
                None => crate::parser::ServerOp::Msg {
                    subject: msg.subject.as_bytes(),
                    sid: sid.as_bytes(),
                    reply: msg.reply.map(str::as_bytes),
                    payload: msg.payload,
                },
            };
            op.encode(out);
        });
        if !written {
            return Delivery::Closed;
        }
        self.stats.out_msgs += 1;
        self.stats.out_bytes += (headers.map_or(0, <[u8]>::len) + msg.payload.len()) as u64;
        if last {
            self.subs.remove(sid);
            self.actions.push_back(Action::Unsubscribe {
                sid: sid.to_string(),
            });
            Delivery::DeliveredLast
        } else {
            Delivery::Delivered
        }
    }

    /// Publish permission, the responses allowance included (which a
    /// response uses up).
    fn may_publish(&mut self, subject: &str) -> bool {
        let Some(p) = &self.perms else {
            return true;
        };
        if p.may_publish(subject) {
            return true;
        }
        match self.replies.get_mut(subject) {
            Some(left) => {
                *left -= 1;
                if *left == 0 {
                    self.replies.remove(subject);
                }
                true
            }
            None => false,
        }
    }

    fn remember_reply(&mut self, reply: &str, max: u32) {
        if max == 0 || self.replies.contains_key(reply) {
            return;
        }
        self.replies.insert(reply.to_string(), max);
        self.reply_order.push_back(reply.to_string());
        while self.reply_order.len() > MAX_TRACKED_REPLIES {
            if let Some(old) = self.reply_order.pop_front() {
                self.replies.remove(&old);
            }
        }
        // Used replies leave the map at once; drop their order entries
        // when they dominate, so the queue stays bounded by live ones.
        if self.reply_order.len() > 2 * self.replies.len() + 64 {
            let live = &self.replies;
            self.reply_order.retain(|r| live.contains_key(r));
        }
    }

    fn handle_timeout(&mut self, now: Duration) {
        if self.closed.is_some() {
            return;
        }
        if self.auth_deadline.is_some_and(|d| now >= d) {
            self.send_err(ERR_AUTH_TIMEOUT);
            self.close(CloseReason::AuthenticationTimeout);
            return;
        }
        if self.next_ping.is_some_and(|t| now >= t) {
            self.ping_timer(now);
        }
    }

    fn ping_timer(&mut self, now: Duration) {
        let interval = self.config.ping_interval;
        let need_rtt = self.rtt.is_none()
            || self
                .rtt_start
                .is_none_or(|s| now.saturating_sub(s) > RTT_MEASUREMENT_INTERVAL);
        let recent_in = self
            .last_in
            .is_some_and(|t| now.saturating_sub(t) < interval);
        if need_rtt || !recent_in {
            if self.pings_out.saturating_add(1) > self.config.max_pings_out {
                self.send_err(ERR_STALE);
                self.close(CloseReason::StaleConnection);
                return;
            }
            self.pings_out = self.pings_out.saturating_add(1);
            self.rtt_start = Some(now);
            self.write(|out| out.extend_from_slice(b"PING\r\n"));
        }
        if self.closed.is_none() {
            self.next_ping = Some(now.saturating_add(interval));
        }
    }
}

/// Go's `%q` for the subject-like strings in permission errors.
fn go_quote(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if (c as u32) < 0x20 || c as u32 == 0x7f => {
                out.push_str(&format!("\\x{:02x}", c as u32))
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

#[cfg(test)]
mod tests;
