//! Test targets: our server (in-process, over a real single-node Raft store) and a real
//! `nats-server` process, both on loopback ports chosen by the OS, both cleaned up on drop.

#![allow(dead_code)]

use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use ployz_consensus::{Node, NodeConfig, PloyzNode};
use ployz_natsd::{Credentials, Server, ServerConfig};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};

pub const USER: &str = "ployz";
pub const PASS: &str = "s3cret";
pub const WAIT: Duration = Duration::from_secs(10);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Ployzd,
    NatsServer,
}

#[derive(Clone, Debug, Default)]
pub struct Opts {
    pub max_pending: Option<usize>,
    pub kv: bool,
    /// Two users: [`USER`] with every right, [`LIMITED`] with [`limited`]'s permissions.
    pub perms: bool,
    /// TLS with a certificate for 127.0.0.1 signed by a fresh CA ([`Target::ca_pem`]).
    pub tls: bool,
}

/// A CA and a server certificate for 127.0.0.1: (CA PEM, server cert PEM, server key PEM).
pub fn test_pki() -> (String, String, String) {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair, SanType};
    let ca_key = KeyPair::generate().expect("CA key");
    let mut ca = CertificateParams::default();
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca_cert = ca.self_signed(&ca_key).expect("CA cert");
    let issuer = Issuer::new(ca, ca_key);
    let key = KeyPair::generate().expect("server key");
    let mut leaf = CertificateParams::default();
    leaf.subject_alt_names = vec![SanType::IpAddress([127, 0, 0, 1].into())];
    let cert = leaf.signed_by(&key, &issuer).expect("server cert");
    (ca_cert.pem(), cert.pem(), key.serialize_pem())
}

/// A rustls client configuration trusting only `ca_pem`.
pub fn client_tls(ca_pem: &str) -> rustls::ClientConfig {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(pem_der(ca_pem).into()).expect("CA");
    rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("versions")
    .with_root_certificates(roots)
    .with_no_client_auth()
}

fn pem_der(pem: &str) -> Vec<u8> {
    use base64::Engine as _;
    let body: String = pem.lines().filter(|l| !l.starts_with("-----")).collect();
    base64::engine::general_purpose::STANDARD
        .decode(body)
        .expect("PEM")
}

fn server_tls(cert_pem: &str, key_pem: &str) -> tokio_rustls::TlsAcceptor {
    let key = rustls::pki_types::PrivateKeyDer::Pkcs8(pem_der(key_pem).into());
    let cfg = rustls::ServerConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("versions")
    .with_no_client_auth()
    .with_single_cert(vec![pem_der(cert_pem).into()], key)
    .expect("server cert");
    tokio_rustls::TlsAcceptor::from(std::sync::Arc::new(cfg))
}

/// The user with permissions of [`Opts::perms`].
pub const LIMITED: &str = "limited";
pub const LIMITED_PASS: &str = "l1m1ted";

/// [`LIMITED`]'s permissions: publish `app.>` but not `app.secret`, subscribe `app.>` (not
/// `app.private.>`) and `_INBOX.>`, one response per request received.
pub fn limited() -> ployz_nats_proto::Permissions {
    use ployz_nats_proto::{Permissions, ResponsePermission, SubjectPermission};
    Permissions {
        publish: SubjectPermission {
            allow: vec!["app.>".into()],
            deny: vec!["app.secret".into()],
        },
        subscribe: SubjectPermission {
            allow: vec!["app.>".into(), "_INBOX.>".into()],
            deny: vec!["app.private.>".into()],
        },
        responses: Some(ResponsePermission::default()),
    }
}

/// The same users as a nats-server `authorization` block.
const LIMITED_CONF: &str = r#"authorization {
  users = [
    {user: "ployz", password: "s3cret"}
    {user: "limited", password: "l1m1ted", permissions: {
      publish: {allow: ["app.>"], deny: ["app.secret"]}
      subscribe: {allow: ["app.>", "_INBOX.>"], deny: ["app.private.>"]}
      allow_responses: true
    }}
  ]
}
"#;

/// Our users for [`Opts::perms`].
pub fn users() -> Vec<ployz_nats_proto::User> {
    vec![
        ployz_nats_proto::User {
            user: USER.into(),
            pass: PASS.into(),
            permissions: None,
        },
        ployz_nats_proto::User {
            user: LIMITED.into(),
            pass: LIMITED_PASS.into(),
            permissions: Some(std::sync::Arc::new(limited())),
        },
    ]
}

/// A `nats-server` child process, killed on drop.
pub struct NatsProcess {
    child: Child,
}

impl Drop for NatsProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub struct Target {
    pub kind: Kind,
    pub addr: SocketAddr,
    pub server: Option<Server>,
    node: Option<std::sync::Arc<Node>>,
    process: Option<NatsProcess>,
    /// The CA of a TLS target.
    pub ca_pem: Option<String>,
    _dir: tempfile::TempDir,
}

pub fn node_me() -> PloyzNode {
    PloyzNode {
        machine_id: "m1".into(),
        addr: "127.0.0.1:1".into(),
    }
}

pub async fn open_node(dir: &std::path::Path) -> Node {
    let node = Node::open(NodeConfig::new(1, node_me(), dir.join("raft")))
        .await
        .expect("open raft node");
    node.initialize_single(node_me())
        .await
        .expect("initialize raft node");
    node
}

pub fn our_config(name: &str, max_pending: Option<usize>) -> ServerConfig {
    let mut cfg = ServerConfig {
        server_name: name.to_string(),
        credentials: Some(Credentials::UserPassword {
            user: USER.into(),
            password: PASS.into(),
        }),
        route_ping_interval: Duration::from_secs(1),
        ..ServerConfig::default()
    };
    if let Some(m) = max_pending {
        cfg.max_pending = m;
    }
    cfg
}

/// Starts one of our servers serving on a fresh loopback port.
pub async fn start_ours(
    name: &str,
    cfg: ServerConfig,
    node: Option<std::sync::Arc<Node>>,
) -> (Server, SocketAddr) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let server = match node {
        Some(n) => Server::with_kv(cfg, n),
        None => Server::new(cfg),
    };
    let s = server.clone();
    tokio::spawn(async move { s.serve(listener).await });
    let _ = name;
    (server, addr)
}

fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    l.local_addr().expect("addr").port()
}

impl Target {
    pub async fn start(kind: Kind, opts: Opts) -> Target {
        let dir = tempfile::tempdir().expect("tempdir");
        let pki = opts.tls.then(test_pki);
        match kind {
            Kind::Ployzd if pki.is_some() => {
                let (ca, cert, key) = pki.expect("pki");
                let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
                let addr = listener.local_addr().expect("addr");
                let server = Server::new(our_config("ployzd-test", opts.max_pending));
                let s = server.clone();
                let acceptor = server_tls(&cert, &key);
                tokio::spawn(async move { s.serve_tls(listener, acceptor).await });
                Target {
                    kind,
                    addr,
                    server: Some(server),
                    node: None,
                    process: None,
                    ca_pem: Some(ca),
                    _dir: dir,
                }
            }
            Kind::Ployzd => {
                let node = if opts.kv {
                    Some(std::sync::Arc::new(open_node(dir.path()).await))
                } else {
                    None
                };
                let mut cfg = our_config("ployzd-test", opts.max_pending);
                if opts.perms {
                    cfg.credentials = Some(Credentials::Users(users()));
                }
                let (server, addr) = start_ours("ployzd-test", cfg, node.clone()).await;
                Target {
                    kind,
                    addr,
                    server: Some(server),
                    node,
                    process: None,
                    ca_pem: None,
                    _dir: dir,
                }
            }
            Kind::NatsServer => {
                let port = free_port();
                let store = dir.path().join("js");
                let mut cmd = Command::new("nats-server");
                cmd.args(["-a", "127.0.0.1", "-p", &port.to_string()]);
                if opts.perms {
                    let conf = dir.path().join("users.conf");
                    std::fs::write(&conf, LIMITED_CONF).expect("write conf");
                    cmd.arg("-c").arg(&conf);
                } else {
                    cmd.args(["--user", USER, "--pass", PASS]);
                }
                cmd.args(["-js", "-sd"])
                    .arg(&store)
                    .stdout(Stdio::null())
                    .stderr(Stdio::null());
                if let Some((_, cert, key)) = &pki {
                    let (c, k) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
                    std::fs::write(&c, cert).expect("write cert");
                    std::fs::write(&k, key).expect("write key");
                    let conf = dir.path().join("tls.conf");
                    std::fs::write(
                        &conf,
                        format!(
                            "tls {{\n  cert_file: \"{}\"\n  key_file: \"{}\"\n}}\n",
                            c.display(),
                            k.display()
                        ),
                    )
                    .expect("write conf");
                    cmd.arg("-c").arg(&conf);
                }
                if let Some(m) = opts.max_pending {
                    let conf = dir.path().join("nats.conf");
                    // nats-server refuses max_payload > max_pending.
                    let payload = m.min(1024 * 1024) / 2;
                    std::fs::write(&conf, format!("max_pending: {m}\nmax_payload: {payload}\n"))
                        .expect("write conf");
                    cmd.arg("-c").arg(&conf);
                }
                let child = cmd
                    .spawn()
                    .expect("nats-server must be installed (scripts/setup installs it)");
                let process = NatsProcess { child };
                let addr: SocketAddr = format!("127.0.0.1:{port}").parse().expect("addr");
                let deadline = tokio::time::Instant::now() + WAIT;
                while TcpStream::connect(addr).await.is_err() {
                    assert!(
                        tokio::time::Instant::now() < deadline,
                        "nats-server did not start"
                    );
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                Target {
                    kind,
                    addr,
                    server: None,
                    node: None,
                    process: Some(process),
                    ca_pem: pki.map(|(ca, _, _)| ca),
                    _dir: dir,
                }
            }
        }
    }

    pub fn url(&self) -> String {
        format!("nats://{}", self.addr)
    }

    pub async fn connect(&self) -> async_nats::Client {
        connect_to(self.addr).await
    }

    pub fn is_ours(&self) -> bool {
        self.kind == Kind::Ployzd
    }

    pub async fn stop(mut self) {
        if let Some(s) = self.server.take() {
            s.shutdown().await;
        }
        if let Some(n) = self.node.take() {
            let _ = n.shutdown().await;
        }
    }
}

pub fn opts() -> async_nats::ConnectOptions {
    async_nats::ConnectOptions::with_user_and_password(USER.into(), PASS.into())
        .request_timeout(Some(Duration::from_secs(5)))
}

pub async fn connect_to(addr: SocketAddr) -> async_nats::Client {
    opts()
        .connect(format!("nats://{addr}"))
        .await
        .expect("connect")
}

/// A raw protocol client for what async-nats cannot express.
pub struct Raw {
    rd: BufReader<tokio::net::tcp::OwnedReadHalf>,
    wr: tokio::net::tcp::OwnedWriteHalf,
}

impl Raw {
    pub async fn connect(addr: SocketAddr) -> (Raw, String) {
        let s = TcpStream::connect(addr).await.expect("connect");
        Self::from_stream(s).await
    }

    pub async fn from_stream(s: TcpStream) -> (Raw, String) {
        let (rd, wr) = s.into_split();
        let mut raw = Raw {
            rd: BufReader::new(rd),
            wr,
        };
        let info = raw.line().await;
        assert!(info.starts_with("INFO "), "{info}");
        (raw, info)
    }

    pub async fn send(&mut self, s: &str) {
        self.wr.write_all(s.as_bytes()).await.expect("write");
    }

    pub async fn send_bytes(&mut self, b: &[u8]) {
        self.wr.write_all(b).await.expect("write");
    }

    /// Next line without CRLF; panics after a timeout.
    pub async fn line(&mut self) -> String {
        let mut l = String::new();
        let n = tokio::time::timeout(WAIT, self.rd.read_line(&mut l))
            .await
            .expect("line timeout")
            .expect("read");
        assert!(n > 0, "connection closed while waiting for a line");
        l.trim_end_matches("\r\n").to_string()
    }

    /// The next `n` bytes and the CRLF after them (a message payload); panics after a timeout.
    pub async fn payload(&mut self, n: usize) -> Vec<u8> {
        let mut b = vec![0u8; n + 2];
        tokio::time::timeout(WAIT, self.rd.read_exact(&mut b))
            .await
            .expect("payload timeout")
            .expect("read payload");
        assert_eq!(&b[n..], b"\r\n", "payload not followed by CRLF");
        b.truncate(n);
        b
    }

    /// Next line, skipping server PINGs (answered).
    pub async fn line_skip_ping(&mut self) -> String {
        loop {
            let l = self.line().await;
            if l == "PING" {
                self.send("PONG\r\n").await;
                continue;
            }
            return l;
        }
    }

    /// Reads until EOF (true) or the timeout (false).
    pub async fn closed_within(&mut self, t: Duration) -> bool {
        let mut buf = vec![0u8; 64 * 1024];
        let deadline = tokio::time::Instant::now() + t;
        loop {
            match tokio::time::timeout_at(deadline, self.rd.read(&mut buf)).await {
                Err(_) => return false,
                Ok(Ok(0)) | Ok(Err(_)) => return true,
                Ok(Ok(_)) => {}
            }
        }
    }

    /// Everything the server sends within `t`, and whether it closed the connection by then
    /// (reading stops at the close).
    pub async fn read_for(&mut self, t: Duration) -> (String, bool) {
        let mut all = Vec::new();
        let mut buf = vec![0u8; 64 * 1024];
        let deadline = tokio::time::Instant::now() + t;
        let closed = loop {
            match tokio::time::timeout_at(deadline, self.rd.read(&mut buf)).await {
                Err(_) => break false,
                Ok(Ok(0)) | Ok(Err(_)) => break true,
                Ok(Ok(n)) => all.extend_from_slice(&buf[..n]),
            }
        };
        (String::from_utf8_lossy(&all).into_owned(), closed)
    }

    pub fn connect_line(extra: &str) -> String {
        format!(
            "CONNECT {{\"verbose\":false,\"pedantic\":false,\"user\":\"{USER}\",\"pass\":\"{PASS}\",\"protocol\":1,\"headers\":true{extra}}}\r\n"
        )
    }
}

/// Polls `f` until it returns true.
pub async fn eventually(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + WAIT;
    while !f() {
        assert!(tokio::time::Instant::now() < deadline, "timed out: {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}
