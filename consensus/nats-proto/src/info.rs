//! The JSON bodies of `INFO` (server to client) and `CONNECT` (client to
//! server), with nats-server's field names and defaults.

use serde::{Deserialize, Serialize};

fn is_false(b: &bool) -> bool {
    !*b
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

/// The `INFO` body. Field order and `omitempty` behaviour follow
/// nats-server's `Info` struct for the fields a client port sends.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct ServerInfo {
    /// Unique server id.
    pub server_id: String,
    /// Server name.
    pub server_name: String,
    /// Server version (clients parse it as semver).
    pub version: String,
    /// Protocol version: 1 on a client port.
    pub proto: i32,
    /// Build commit, omitted when unknown.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub git_commit: Option<String>,
    /// Toolchain version (`go` in nats-server).
    pub go: String,
    /// Listen host.
    pub host: String,
    /// Listen port.
    pub port: u16,
    /// Headers supported.
    pub headers: bool,
    /// Authentication required.
    #[serde(skip_serializing_if = "is_false")]
    pub auth_required: bool,
    /// TLS required.
    #[serde(skip_serializing_if = "is_false")]
    pub tls_required: bool,
    /// Maximum payload accepted.
    pub max_payload: i64,
    /// JetStream available.
    #[serde(skip_serializing_if = "is_false")]
    pub jetstream: bool,
    /// Connection id.
    #[serde(skip_serializing_if = "is_zero")]
    pub client_id: u64,
    /// The client's address as seen by the server.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub client_ip: Option<String>,
    /// Nonce to sign (nkey/JWT auth).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub nonce: Option<String>,
    /// Cluster name.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cluster: Option<String>,
    /// Other URLs a client may connect to.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub connect_urls: Vec<String>,
    /// Lame duck mode.
    #[serde(skip_serializing_if = "is_false")]
    pub ldm: bool,
}

impl ServerInfo {
    /// The JSON text (no `INFO ` prefix).
    pub fn to_json(&self) -> Vec<u8> {
        // Serializing plain strings, numbers and bools cannot fail.
        serde_json::to_vec(self).unwrap_or_else(|_| b"{}".to_vec())
    }

    /// Parses an `INFO` argument (trailing whitespace is fine).
    pub fn from_json(json: &[u8]) -> Result<Self, serde_json::Error> {
        serde_json::from_slice(json)
    }
}

/// The `CONNECT` body as understood by nats-server.
///
/// Every field is optional on the wire; `verbose`, `pedantic` and `echo`
/// default to **true** when omitted or `null` (nats-server unmarshals into
/// `defaultOpts = ClientOpts{Verbose: true, Pedantic: true, Echo: true}`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ConnectInfo {
    /// `+OK` after every operation.
    pub verbose: bool,
    /// Extra checks, e.g. `-ERR 'Invalid Publish Subject'`.
    pub pedantic: bool,
    /// Receive own publishes on own subscriptions.
    pub echo: bool,
    /// Client requires TLS.
    pub tls_required: bool,
    /// Username.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    /// Password.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pass: Option<String>,
    /// Token.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub auth_token: Option<String>,
    /// NKey public key (not supported by this crate's auth).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub nkey: Option<String>,
    /// User JWT (not supported by this crate's auth).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub jwt: Option<String>,
    /// Nonce signature.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sig: Option<String>,
    /// Client name.
    pub name: String,
    /// Client language.
    pub lang: String,
    /// Client library version.
    pub version: String,
    /// Client protocol: 0 or 1.
    pub protocol: i64,
    /// Client supports headers.
    pub headers: bool,
    /// Client wants 503 no-responders status messages.
    pub no_responders: bool,
    /// Deprecated account designation (an authorization violation).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub account: Option<String>,
    /// Deprecated dynamic account creation (an authorization violation).
    #[serde(skip_serializing_if = "is_false")]
    pub new_account: bool,
}

impl Default for ConnectInfo {
    fn default() -> Self {
        ConnectInfo {
            verbose: true,
            pedantic: true,
            echo: true,
            tls_required: false,
            user: None,
            pass: None,
            auth_token: None,
            nkey: None,
            jwt: None,
            sig: None,
            name: String::new(),
            lang: String::new(),
            version: String::new(),
            protocol: 0,
            headers: false,
            no_responders: false,
            account: None,
            new_account: false,
        }
    }
}

/// Wire form: every field optional, `null` means "keep the default" (as Go's
/// `encoding/json` does for a `null` into a non-pointer field).
#[derive(Deserialize)]
struct RawConnect {
    verbose: Option<bool>,
    pedantic: Option<bool>,
    echo: Option<bool>,
    tls_required: Option<bool>,
    user: Option<String>,
    pass: Option<String>,
    auth_token: Option<String>,
    nkey: Option<String>,
    jwt: Option<String>,
    sig: Option<String>,
    name: Option<String>,
    lang: Option<String>,
    version: Option<String>,
    protocol: Option<i64>,
    headers: Option<bool>,
    no_responders: Option<bool>,
    account: Option<String>,
    new_account: Option<bool>,
}

impl ConnectInfo {
    /// Parses a `CONNECT` argument. Unknown fields are ignored; a type
    /// mismatch or malformed JSON is an error (nats-server then closes the
    /// connection without an `-ERR`).
    pub fn from_json(json: &[u8]) -> Result<Self, serde_json::Error> {
        let r: RawConnect = serde_json::from_slice(json)?;
        let d = ConnectInfo::default();
        let nonempty = |s: Option<String>| s.filter(|s| !s.is_empty());
        Ok(ConnectInfo {
            verbose: r.verbose.unwrap_or(d.verbose),
            pedantic: r.pedantic.unwrap_or(d.pedantic),
            echo: r.echo.unwrap_or(d.echo),
            tls_required: r.tls_required.unwrap_or(false),
            user: nonempty(r.user),
            pass: nonempty(r.pass),
            auth_token: nonempty(r.auth_token),
            nkey: nonempty(r.nkey),
            jwt: nonempty(r.jwt),
            sig: nonempty(r.sig),
            name: r.name.unwrap_or_default(),
            lang: r.lang.unwrap_or_default(),
            version: r.version.unwrap_or_default(),
            protocol: r.protocol.unwrap_or(0),
            headers: r.headers.unwrap_or(false),
            no_responders: r.no_responders.unwrap_or(false),
            account: nonempty(r.account),
            new_account: r.new_account.unwrap_or(false),
        })
    }

    /// The JSON text (no `CONNECT ` prefix).
    pub fn to_json(&self) -> Vec<u8> {
        serde_json::to_vec(self).unwrap_or_else(|_| b"{}".to_vec())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connect_defaults_like_nats_server() {
        let c = ConnectInfo::from_json(b"{}").unwrap_or_default();
        assert!(c.verbose && c.pedantic && c.echo);
        assert!(!c.headers && !c.no_responders);
        let c = ConnectInfo::from_json(br#"{"verbose":null,"echo":false,"x":[1]}"#);
        let c = c.unwrap_or_default();
        assert!(c.verbose && !c.echo);
        let c = ConnectInfo::from_json(
            br#"{"verbose":false,"pedantic":false,"tls_required":false,"name":"NATS CLI Version 0.4.0","lang":"go","version":"1.51.0","protocol":1,"echo":true,"headers":true,"no_responders":true,"user":"u","pass":"p"}"#,
        );
        let c = c.unwrap_or_default();
        assert!(!c.verbose && c.headers && c.no_responders && c.protocol == 1);
        assert_eq!(
            (c.user.as_deref(), c.pass.as_deref()),
            (Some("u"), Some("p"))
        );
        assert!(ConnectInfo::from_json(b"").is_err());
        assert!(ConnectInfo::from_json(b"{").is_err());
        assert!(ConnectInfo::from_json(br#"{"verbose":"yes"}"#).is_err());
        let back = ConnectInfo::from_json(&c.to_json()).unwrap_or_default();
        assert_eq!(back, c);
    }

    #[test]
    fn info_roundtrip_and_omitempty() {
        let info = ServerInfo {
            server_id: "ID".into(),
            server_name: "n".into(),
            version: "2.10.0".into(),
            proto: 1,
            go: "rust".into(),
            host: "0.0.0.0".into(),
            port: 4222,
            headers: true,
            max_payload: 1 << 20,
            ..ServerInfo::default()
        };
        let json = String::from_utf8(info.to_json()).unwrap_or_default();
        assert_eq!(
            json,
            r#"{"server_id":"ID","server_name":"n","version":"2.10.0","proto":1,"go":"rust","host":"0.0.0.0","port":4222,"headers":true,"max_payload":1048576}"#
        );
        let mut with_space = json.into_bytes();
        with_space.push(b' ');
        assert_eq!(ServerInfo::from_json(&with_space).ok(), Some(info));
    }
}
