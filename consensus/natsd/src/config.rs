//! Server settings.

use std::time::Duration;

use ployz_nats_proto::session::{
    DEFAULT_AUTH_TIMEOUT, DEFAULT_FIRST_PING_INTERVAL, DEFAULT_MAX_PENDING, DEFAULT_MAX_PINGS_OUT,
    DEFAULT_PING_INTERVAL,
};
use ployz_nats_proto::{Auth, User};

/// The single credential clients must present (nats-server's simple `authorization` block).
#[derive(Clone, PartialEq, Eq)]
pub enum Credentials {
    /// `CONNECT {"user": ..., "pass": ...}`.
    UserPassword {
        /// Username.
        user: String,
        /// Password (plain text).
        password: String,
    },
    /// `CONNECT {"auth_token": ...}`.
    Token(String),
    /// nats-server's `authorization { users = [...] }`: each user with its
    /// own permissions; replaced at run time with [`crate::Server::set_users`].
    Users(Vec<User>),
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Credentials::UserPassword { user, .. } => f
                .debug_struct("UserPassword")
                .field("user", user)
                .field("password", &"<redacted>")
                .finish(),
            Credentials::Token(_) => f.write_str("Token(<redacted>)"),
            Credentials::Users(users) => f.debug_tuple("Users").field(users).finish(),
        }
    }
}

impl Credentials {
    pub(crate) fn to_auth(&self) -> Auth {
        match self {
            Credentials::UserPassword { user, password } => Auth::UserPass {
                user: user.clone(),
                pass: password.clone(),
            },
            Credentials::Token(t) => Auth::Token(t.clone()),
            Credentials::Users(users) => Auth::Users(users.clone()),
        }
    }
}

/// Settings of a [`crate::Server`]. `Default` gives nats-server's defaults, no authentication.
#[derive(Clone, Debug)]
pub struct ServerConfig {
    /// `server_name` in INFO and this server's name on routes (e.g. the machine id).
    pub server_name: String,
    /// Host advertised in INFO.
    pub host: String,
    /// Port advertised in INFO.
    pub port: u16,
    /// Required client credential; `None` lets anyone connect.
    pub credentials: Option<Credentials>,
    /// Largest accepted message (payload plus headers).
    pub max_payload: usize,
    /// Unflushed outbound bytes per client before it is cut off as a slow consumer.
    pub max_pending: usize,
    /// Client keepalive PING interval; zero disables it.
    pub ping_interval: Duration,
    /// Delay of the first PING to a client.
    pub first_ping_interval: Duration,
    /// Unanswered PINGs before a client is closed as stale.
    pub max_pings_out: u32,
    /// Time a client has to send CONNECT when credentials are required.
    pub auth_timeout: Duration,
    /// Route keepalive PING interval; a route silent for three intervals is closed.
    pub route_ping_interval: Duration,
    /// Unflushed outbound bytes per route before the route is dropped (and redialed).
    pub max_route_pending: usize,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            server_name: "ployzd".to_string(),
            host: "0.0.0.0".to_string(),
            port: 4222,
            credentials: None,
            max_payload: ployz_nats_proto::parser::DEFAULT_MAX_PAYLOAD,
            max_pending: DEFAULT_MAX_PENDING,
            ping_interval: DEFAULT_PING_INTERVAL,
            first_ping_interval: DEFAULT_FIRST_PING_INTERVAL,
            max_pings_out: DEFAULT_MAX_PINGS_OUT,
            auth_timeout: DEFAULT_AUTH_TIMEOUT,
            route_ping_interval: Duration::from_secs(10),
            max_route_pending: 64 * 1024 * 1024,
        }
    }
}
