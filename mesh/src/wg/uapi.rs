//! The cross-platform WireGuard userspace API (`wg`'s protocol over
//! `/var/run/wireguard/<if>.sock`): `get=1` and `set=1`, `key=value` lines,
//! a blank line ends a request, the answer ends with `errno=N` and a blank
//! line. Pure: parsing and formatting only; the socket lives in `device`.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::time::{SystemTime, UNIX_EPOCH};

use super::allowed::AllowedIp;

/// Where `wg` looks for a userspace device's socket.
pub const SOCKET_DIR: &str = "/var/run/wireguard";

/// A `set=1` request (also what `Mesh::set_peers` builds).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SetRequest {
    pub private_key: Option<[u8; 32]>,
    pub listen_port: Option<u16>,
    pub fwmark: Option<u32>,
    pub replace_peers: bool,
    pub peers: Vec<PeerUpdate>,
}

impl SetRequest {
    pub fn is_empty(&self) -> bool {
        self.private_key.is_none()
            && self.listen_port.is_none()
            && self.fwmark.is_none()
            && !self.replace_peers
            && self.peers.is_empty()
    }
}

/// One `public_key=` section of a set request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerUpdate {
    pub public_key: [u8; 32],
    pub remove: bool,
    pub update_only: bool,
    /// `Some([0; 32])` clears the preshared key, as in `wg`.
    pub preshared_key: Option<[u8; 32]>,
    pub endpoint: Option<SocketAddr>,
    /// `Some(0)` turns keepalive off.
    pub persistent_keepalive: Option<u16>,
    pub replace_allowed_ips: bool,
    pub allowed_ips: Vec<AllowedIp>,
}

impl PeerUpdate {
    pub fn new(public_key: [u8; 32]) -> Self {
        PeerUpdate {
            public_key,
            remove: false,
            update_only: false,
            preshared_key: None,
            endpoint: None,
            persistent_keepalive: None,
            replace_allowed_ips: false,
            allowed_ips: Vec::new(),
        }
    }
}

/// What `get=1` reports.
#[derive(Debug, Clone, PartialEq)]
pub struct DeviceInfo {
    pub private_key: [u8; 32],
    pub listen_port: u16,
    pub fwmark: Option<u32>,
    pub peers: Vec<PeerInfo>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct PeerInfo {
    pub public_key: [u8; 32],
    pub preshared_key: Option<[u8; 32]>,
    pub endpoint: Option<SocketAddr>,
    pub last_handshake: Option<SystemTime>,
    pub rx_bytes: u64,
    pub tx_bytes: u64,
    pub persistent_keepalive: Option<u16>,
    pub allowed_ips: Vec<AllowedIp>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UapiError {
    #[error("malformed line `{0}`: expected key=value")]
    Protocol(String),
    #[error("invalid value for `{key}`: `{value}`")]
    Invalid { key: String, value: String },
    #[error("unknown key `{0}`")]
    UnknownKey(String),
}

impl UapiError {
    /// The errno the protocol answers with.
    pub fn errno(&self) -> i32 {
        match self {
            UapiError::Protocol(_) => libc::EPROTO,
            UapiError::Invalid { .. } | UapiError::UnknownKey(_) => libc::EINVAL,
        }
    }
}

fn invalid(key: &str, value: &str) -> UapiError {
    UapiError::Invalid {
        key: key.to_owned(),
        value: value.to_owned(),
    }
}

fn parse_key(key: &str, value: &str) -> Result<[u8; 32], UapiError> {
    let mut out = [0u8; 32];
    hex::decode_to_slice(value, &mut out).map_err(|_| invalid(key, value))?;
    Ok(out)
}

fn parse_bool(key: &str, value: &str) -> Result<bool, UapiError> {
    match value {
        "true" => Ok(true),
        "false" => Ok(false),
        _ => Err(invalid(key, value)),
    }
}

fn parse_num<T: std::str::FromStr>(key: &str, value: &str) -> Result<T, UapiError> {
    value.parse().map_err(|_| invalid(key, value))
}

/// Parse the body of a `set=1` request (the lines after `set=1`, without
/// the terminating blank line).
pub fn parse_set<'a>(lines: impl IntoIterator<Item = &'a str>) -> Result<SetRequest, UapiError> {
    let mut req = SetRequest::default();
    for line in lines {
        let (key, value) = line
            .split_once('=')
            .ok_or_else(|| UapiError::Protocol(line.to_owned()))?;
        if key == "public_key" {
            req.peers.push(PeerUpdate::new(parse_key(key, value)?));
            continue;
        }
        match req.peers.last_mut() {
            None => match key {
                "private_key" => req.private_key = Some(parse_key(key, value)?),
                "listen_port" => req.listen_port = Some(parse_num(key, value)?),
                "fwmark" => req.fwmark = Some(parse_num(key, value)?),
                "replace_peers" => req.replace_peers = parse_bool(key, value)?,
                _ => return Err(UapiError::UnknownKey(key.to_owned())),
            },
            Some(p) => match key {
                "remove" => p.remove = parse_bool(key, value)?,
                "update_only" => p.update_only = parse_bool(key, value)?,
                "preshared_key" => p.preshared_key = Some(parse_key(key, value)?),
                "endpoint" => p.endpoint = Some(parse_endpoint(key, value)?),
                "persistent_keepalive_interval" => {
                    p.persistent_keepalive = Some(parse_num(key, value)?)
                }
                "replace_allowed_ips" => p.replace_allowed_ips = parse_bool(key, value)?,
                "allowed_ip" => p
                    .allowed_ips
                    .push(value.parse().map_err(|_| invalid(key, value))?),
                "protocol_version" if value == "1" => {}
                "protocol_version" => return Err(invalid(key, value)),
                _ => return Err(UapiError::UnknownKey(key.to_owned())),
            },
        }
    }
    Ok(req)
}

fn parse_endpoint(key: &str, value: &str) -> Result<SocketAddr, UapiError> {
    value.parse().map_err(|_| invalid(key, value))
}

/// Format the answer to `get=1`, including `errno=0` and the blank line.
pub fn format_get(dev: &DeviceInfo) -> String {
    let mut s = String::with_capacity(256 + dev.peers.len() * 256);
    // Writing to a String cannot fail.
    let _ = writeln!(s, "private_key={}", hex::encode(dev.private_key));
    let _ = writeln!(s, "listen_port={}", dev.listen_port);
    if let Some(mark) = dev.fwmark.filter(|m| *m != 0) {
        let _ = writeln!(s, "fwmark={mark}");
    }
    for p in &dev.peers {
        let _ = writeln!(s, "public_key={}", hex::encode(p.public_key));
        if let Some(psk) = p.preshared_key {
            let _ = writeln!(s, "preshared_key={}", hex::encode(psk));
        }
        let _ = writeln!(s, "protocol_version=1");
        if let Some(ep) = p.endpoint {
            let _ = writeln!(s, "endpoint={ep}");
        }
        let since = p
            .last_handshake
            .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
            .unwrap_or_default();
        let _ = writeln!(s, "last_handshake_time_sec={}", since.as_secs());
        let _ = writeln!(s, "last_handshake_time_nsec={}", since.subsec_nanos());
        let _ = writeln!(s, "tx_bytes={}", p.tx_bytes);
        let _ = writeln!(s, "rx_bytes={}", p.rx_bytes);
        let _ = writeln!(
            s,
            "persistent_keepalive_interval={}",
            p.persistent_keepalive.unwrap_or(0)
        );
        for ip in &p.allowed_ips {
            let _ = writeln!(s, "allowed_ip={ip}");
        }
    }
    s.push_str("errno=0\n\n");
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    const K1: &str = "e84b5a6d2717c1003a13b431570353dbaca9146cf150c5f8575680feba52027a";
    const K2: &str = "b85996fecc9c7f1fc6d2572a76eda11d59bcd20be8e543b15ce4bd85a8e75a33";

    #[test]
    fn parses_what_wg_setconf_sends() {
        let body = format!(
            "private_key={K1}\nlisten_port=51820\nreplace_peers=true\n\
             public_key={K2}\nprotocol_version=1\nreplace_allowed_ips=true\n\
             endpoint=10.0.0.2:51820\npersistent_keepalive_interval=25\n\
             allowed_ip=10.101.2.0/24\nallowed_ip=fd00::/64\n\
             public_key={K1}\nremove=true"
        );
        let req = parse_set(body.lines()).unwrap();
        assert_eq!(req.listen_port, Some(51820));
        assert!(req.replace_peers);
        assert_eq!(req.private_key.map(hex::encode).as_deref(), Some(K1));
        assert_eq!(req.peers.len(), 2);
        let p = &req.peers[0];
        assert_eq!(hex::encode(p.public_key), K2);
        assert_eq!(p.endpoint, Some("10.0.0.2:51820".parse().unwrap()));
        assert_eq!(p.persistent_keepalive, Some(25));
        assert!(p.replace_allowed_ips);
        assert_eq!(p.allowed_ips.len(), 2);
        assert!(req.peers[1].remove);
    }

    #[test]
    fn rejects_bad_input_with_errno() {
        let e = parse_set(["listen_port"]).unwrap_err();
        assert_eq!(e.errno(), libc::EPROTO);
        let e = parse_set(["listen_port=99999"]).unwrap_err();
        assert_eq!(e.errno(), libc::EINVAL);
        let e = parse_set(["public_key=zz"]).unwrap_err();
        assert_eq!(e.errno(), libc::EINVAL);
        let e = parse_set(["endpoint=1.2.3.4:5"]).unwrap_err();
        assert!(matches!(e, UapiError::UnknownKey(_)));
        let e = parse_set([format!("public_key={K1}").as_str(), "protocol_version=2"]);
        assert!(e.is_err());
    }

    #[test]
    fn formats_get_with_epoch_handshake() {
        let mut pk = [0u8; 32];
        hex::decode_to_slice(K2, &mut pk).unwrap();
        let dev = DeviceInfo {
            private_key: [7; 32],
            listen_port: 51820,
            fwmark: None,
            peers: vec![PeerInfo {
                public_key: pk,
                preshared_key: None,
                endpoint: Some("[fd00::1]:7".parse().unwrap()),
                last_handshake: Some(UNIX_EPOCH + Duration::new(1_700_000_000, 5)),
                rx_bytes: 10,
                tx_bytes: 20,
                persistent_keepalive: None,
                allowed_ips: vec!["10.101.2.0/24".parse().unwrap()],
            }],
        };
        let out = format_get(&dev);
        assert!(out.starts_with(&format!("private_key={}\n", "07".repeat(32))));
        assert!(out.contains(&format!("public_key={K2}\n")));
        assert!(out.contains("endpoint=[fd00::1]:7\n"));
        assert!(out.contains("last_handshake_time_sec=1700000000\nlast_handshake_time_nsec=5\n"));
        assert!(out.contains("allowed_ip=10.101.2.0/24\n"));
        assert!(out.ends_with("errno=0\n\n"));
    }
}
