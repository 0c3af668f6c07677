//! Records and wire types of the HTTP(S) gateway: routes (`route add/ls/rm`)
//! and ACME settings (`acme set/show`), and the certificates the gateway
//! serves.
//!
//! | bucket             | key                    | value               |
//! |--------------------|------------------------|---------------------|
//! | `routes`           | [`RouteRecord::key`]   | [`RouteRecord`]     |
//! | `acme`             | `config`               | [`AcmeRecord`]      |
//! | `acme`             | `lease`                | [`AcmeLease`]       |
//! | `acme_challenges`  | token / `alpn.<host>`  | [`ChallengeRecord`] |
//! | `certificates`     | hostname               | [`CertRecord`]      |
//!
//! [`BUCKET_CERTIFICATES`] holds private keys: NATS never serves it.

use serde::{Deserialize, Serialize};

/// Routes of the gateway (hostname + path prefix → service port).
pub const BUCKET_ROUTES: &str = "routes";
/// ACME settings of the network and the lease of the machine ordering.
pub const BUCKET_ACME: &str = "acme";
/// Pending ACME challenges (HTTP-01 key authorizations, TLS-ALPN-01 certificates).
pub const BUCKET_ACME_CHALLENGES: &str = "acme_challenges";
/// Certificates and their private keys (and the ACME account key, under
/// [`ACME_ACCOUNT_KEY`]); never readable through NATS.
pub const BUCKET_CERTIFICATES: &str = "certificates";
pub const ACME_CONFIG_KEY: &str = "config";
pub const ACME_LEASE_KEY: &str = "lease";
/// Key of the ACME account credentials in [`BUCKET_CERTIFICATES`].
pub const ACME_ACCOUNT_KEY: &str = "_account";
/// Let's Encrypt's production directory, the default of `acme set`.
pub const DEFAULT_ACME_DIRECTORY: &str = "https://acme-v02.api.letsencrypt.org/directory";

/// How a route is served over TLS.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq, Hash)]
#[serde(rename_all = "snake_case")]
pub enum RouteTls {
    /// Plain HTTP only.
    #[default]
    Off,
    /// HTTPS with a certificate from the network's ACME CA; port 80 redirects.
    Acme,
}

impl RouteTls {
    pub fn as_str(self) -> &'static str {
        match self {
            RouteTls::Off => "off",
            RouteTls::Acme => "acme",
        }
    }
}

/// One route: requests for `host` whose path starts with `path` go to the
/// healthy instances of `service` on `port`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct RouteRecord {
    /// Lower-case hostname.
    pub host: String,
    /// Path prefix, `/` or `/a/b` (no trailing slash).
    pub path: String,
    pub service: String,
    pub port: u16,
    #[serde(default)]
    pub tls: RouteTls,
    #[serde(default)]
    pub updated_at_ms: u64,
}

impl RouteRecord {
    /// The store key of `host` + `path`: a valid JetStream KV key (the path
    /// hex-encoded, as it may hold any URL character).
    pub fn key(host: &str, path: &str) -> String {
        let hex: String = path.bytes().map(|b| format!("{b:02x}")).collect();
        format!("{host}={hex}")
    }
}

/// `route ls --json`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, Default)]
pub struct RouteList {
    pub routes: Vec<RouteView>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct RouteView {
    pub host: String,
    pub path: String,
    pub service: String,
    pub port: u16,
    pub tls: RouteTls,
    /// Healthy instances the route has now.
    pub backends: u32,
    /// `null` unless `tls` is `acme`: when the stored certificate expires
    /// (RFC 3339), `null` while none is stored yet.
    #[serde(default)]
    pub certificate_expires: Option<String>,
}

/// The network's ACME settings.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct AcmeRecord {
    pub directory: String,
    pub email: String,
    /// PEM roots to trust for the directory (a private CA), else the
    /// system's web PKI roots.
    #[serde(default)]
    pub ca_pem: Option<String>,
    /// Which challenge the ordering machine answers.
    #[serde(default)]
    pub challenge: AcmeChallenge,
    #[serde(default)]
    pub updated_at_ms: u64,
}

/// The ACME challenge type certificates are validated with.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
pub enum AcmeChallenge {
    /// The CA fetches `http://HOST/.well-known/acme-challenge/TOKEN` (port 80).
    #[default]
    #[serde(rename = "http-01")]
    Http01,
    /// The CA connects to HOST:443 offering ALPN `acme-tls/1`.
    #[serde(rename = "tls-alpn-01")]
    TlsAlpn01,
}

impl AcmeChallenge {
    pub fn as_str(self) -> &'static str {
        match self {
            AcmeChallenge::Http01 => "http-01",
            AcmeChallenge::TlsAlpn01 => "tls-alpn-01",
        }
    }
}

/// Who orders certificates now: one machine at a time.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct AcmeLease {
    pub machine: String,
    pub expires_at_ms: u64,
}

/// A pending challenge, answered by every gateway.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum ChallengeRecord {
    /// HTTP-01: the body of `/.well-known/acme-challenge/<token>`.
    Http { key_authorization: String },
    /// TLS-ALPN-01: the `acme-tls/1` certificate for a hostname (no secret:
    /// a throwaway key).
    TlsAlpn { cert_pem: String, key_pem: String },
}

impl ChallengeRecord {
    /// Key of a TLS-ALPN-01 challenge for `host`.
    pub fn alpn_key(host: &str) -> String {
        format!("alpn.{host}")
    }
}

/// A certificate the gateway serves for `host` (or the ACME account, under
/// [`ACME_ACCOUNT_KEY`], with the account credentials as `key_pem`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct CertRecord {
    pub host: String,
    /// Leaf first, then intermediates.
    pub chain_pem: String,
    pub key_pem: String,
    pub not_before_ms: u64,
    pub not_after_ms: u64,
    /// The directory it came from (a changed `acme set` renews).
    #[serde(default)]
    pub directory: String,
}

/// `acme show --json`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct AcmeView {
    /// `null` until `acme set`.
    pub directory: Option<String>,
    pub email: Option<String>,
    pub custom_ca: bool,
    pub challenge: AcmeChallenge,
    pub certificates: Vec<CertView>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct CertView {
    pub host: String,
    pub not_after: String,
}
