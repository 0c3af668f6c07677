//! RTT prober: a QUIC endpoint on the overlay address that answers echo
//! requests, and one task per target that sends one each second and keeps
//! the round-trip times in a sliding [`RttWindow`].
//!
//! Security: the QUIC client accepts any server certificate. The packets
//! travel inside WireGuard, which already authenticated the peer by its
//! static key; TLS here only exists because QUIC requires it. Signatures are
//! still checked (the handshake proves possession of the presented key).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, PrivatePkcs8KeyDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::rtt::RttWindow;

/// Default UDP port of the prober on the overlay address.
pub const DEFAULT_PORT: u16 = 7102;
const ALPN: &[u8] = b"ployz-rtt/1";
const SERVER_NAME: &str = "ployz-rtt";
const INTERVAL: Duration = Duration::from_secs(1);
const PROBE_TIMEOUT: Duration = Duration::from_secs(1);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
const IDLE_TIMEOUT: Duration = Duration::from_secs(5);
const WINDOW: Duration = Duration::from_secs(60);
const WINDOW_CAPACITY: usize = 120;
const NOT_YET: &str = "not reached yet";

/// One target's statistics. `last_error` is set while the latest probe
/// failed (or none has succeeded yet); the samples still in the window
/// are kept meanwhile.
#[derive(Debug, Clone, PartialEq)]
pub struct RttRow {
    pub peer: String,
    pub median_ms: Option<f64>,
    pub stddev_ms: Option<f64>,
    pub samples: usize,
    pub last_error: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum ProberError {
    #[error("generating the prober's self-signed certificate: {0}")]
    Cert(#[from] rcgen::Error),
    #[error("building the prober's TLS config: {0}")]
    Tls(#[from] rustls::Error),
    #[error("QUIC crypto config: {0}")]
    Quic(String),
    #[error("binding the prober on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("Prober::start must run inside a tokio runtime")]
    NoRuntime,
}

struct Target {
    addr: SocketAddr,
    window: RttWindow,
    last_error: Option<String>,
}

type Targets = Arc<Mutex<Vec<(String, Target)>>>;

pub struct Prober {
    endpoint: quinn::Endpoint,
    targets: Targets,
    tasks: Mutex<HashMap<String, (SocketAddr, JoinHandle<()>)>>,
    server: JoinHandle<()>,
}

impl Prober {
    /// Bind the QUIC endpoint on `bind` and answer probes. Must be called
    /// from within a tokio runtime.
    pub fn start(bind: SocketAddr) -> Result<Prober, ProberError> {
        tokio::runtime::Handle::try_current().map_err(|_| ProberError::NoRuntime)?;
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let cert = rcgen::generate_simple_self_signed(vec![SERVER_NAME.to_owned()])?;
        let key = PrivatePkcs8KeyDer::from(cert.signing_key.serialize_der());
        let mut server_tls = rustls::ServerConfig::builder_with_provider(Arc::clone(&provider))
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .with_no_client_auth()
            .with_single_cert(vec![cert.cert.der().clone()], key.into())?;
        server_tls.alpn_protocols = vec![ALPN.to_vec()];
        let mut client_tls = rustls::ClientConfig::builder_with_provider(Arc::clone(&provider))
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(AcceptAnyCert(provider)))
            .with_no_client_auth();
        client_tls.alpn_protocols = vec![ALPN.to_vec()];

        let mut transport = quinn::TransportConfig::default();
        transport.max_idle_timeout(Some(
            IDLE_TIMEOUT
                .try_into()
                .map_err(|_| ProberError::Quic("idle timeout out of range".into()))?,
        ));
        let transport = Arc::new(transport);
        let mut server = quinn::ServerConfig::with_crypto(Arc::new(
            QuicServerConfig::try_from(server_tls).map_err(|e| ProberError::Quic(e.to_string()))?,
        ));
        server.transport_config(Arc::clone(&transport));
        let mut client = quinn::ClientConfig::new(Arc::new(
            QuicClientConfig::try_from(client_tls).map_err(|e| ProberError::Quic(e.to_string()))?,
        ));
        client.transport_config(transport);

        let mut endpoint = quinn::Endpoint::server(server, bind)
            .map_err(|source| ProberError::Bind { addr: bind, source })?;
        endpoint.set_default_client_config(client);
        let server = tokio::spawn(serve(endpoint.clone()));
        Ok(Prober {
            endpoint,
            targets: Arc::default(),
            tasks: Mutex::default(),
            server,
        })
    }

    pub fn local_addr(&self) -> Option<SocketAddr> {
        self.endpoint.local_addr().ok()
    }

    /// Probe exactly these `(peer id, address)` pairs from now on. Targets
    /// that stay with the same address keep their samples.
    pub fn set_targets(&self, targets: Vec<(String, SocketAddr)>) {
        let mut tasks = self.tasks.lock().unwrap_or_else(|e| e.into_inner());
        let mut state = self.targets.lock().unwrap_or_else(|e| e.into_inner());
        let mut next_state = Vec::with_capacity(targets.len());
        let mut next_tasks = HashMap::with_capacity(targets.len());
        for (peer, addr) in targets {
            if next_tasks.contains_key(&peer) {
                continue;
            }
            let kept = state
                .iter()
                .position(|(p, t)| *p == peer && t.addr == addr)
                .map(|i| state.swap_remove(i).1);
            let target = kept.unwrap_or_else(|| Target {
                addr,
                window: RttWindow::new(WINDOW, WINDOW_CAPACITY),
                last_error: Some(NOT_YET.into()),
            });
            next_state.push((peer.clone(), target));
            let task = match tasks.remove(&peer) {
                Some((a, h)) if a == addr => h,
                other => {
                    if let Some((_, h)) = other {
                        h.abort();
                    }
                    tokio::spawn(probe_loop(
                        self.endpoint.clone(),
                        Arc::clone(&self.targets),
                        peer.clone(),
                        addr,
                    ))
                }
            };
            next_tasks.insert(peer, (addr, task));
        }
        for (_, (_, h)) in tasks.drain() {
            h.abort();
        }
        *tasks = next_tasks;
        *state = next_state;
    }

    /// One row per target, in the order given to `set_targets`.
    pub fn snapshot(&self) -> Vec<RttRow> {
        let now = Instant::now();
        let mut state = self.targets.lock().unwrap_or_else(|e| e.into_inner());
        state
            .iter_mut()
            .map(|(peer, t)| {
                t.window.evict(now);
                let stats = t.window.stats();
                RttRow {
                    peer: peer.clone(),
                    median_ms: stats.map(|s| s.median_ms),
                    stddev_ms: stats.map(|s| s.stddev_ms),
                    samples: stats.map_or(0, |s| s.samples),
                    last_error: t.last_error.clone(),
                }
            })
            .collect()
    }

    pub fn stop(self) {}
}

impl Drop for Prober {
    fn drop(&mut self) {
        for (_, (_, h)) in self
            .tasks
            .get_mut()
            .unwrap_or_else(|e| e.into_inner())
            .drain()
        {
            h.abort();
        }
        self.server.abort();
        self.endpoint.close(0u32.into(), b"prober stopped");
    }
}

async fn serve(endpoint: quinn::Endpoint) {
    while let Some(incoming) = endpoint.accept().await {
        tokio::spawn(async move {
            let Ok(conn) = incoming.await else {
                return;
            };
            while let Ok((mut send, mut recv)) = conn.accept_bi().await {
                tokio::spawn(async move {
                    if let Ok(data) = recv.read_to_end(64).await {
                        let _ = send.write_all(&data).await;
                        let _ = send.finish();
                    }
                });
            }
        });
    }
}

async fn probe_loop(endpoint: quinn::Endpoint, targets: Targets, peer: String, addr: SocketAddr) {
    let mut conn: Option<quinn::Connection> = None;
    let mut tick = tokio::time::interval(INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut seq: u64 = 0;
    loop {
        tick.tick().await;
        seq += 1;
        let result = probe_once(&endpoint, &mut conn, addr, seq).await;
        let now = Instant::now();
        let mut state = targets.lock().unwrap_or_else(|e| e.into_inner());
        let Some((_, t)) = state.iter_mut().find(|(p, _)| *p == peer) else {
            return;
        };
        match result {
            Ok(rtt) => {
                t.window.push(now, rtt);
                t.last_error = None;
            }
            Err(e) => {
                t.window.evict(now);
                t.last_error = Some(e);
            }
        }
    }
}

/// One echo round trip; reconnects when the connection is gone.
async fn probe_once(
    endpoint: &quinn::Endpoint,
    conn: &mut Option<quinn::Connection>,
    addr: SocketAddr,
    seq: u64,
) -> Result<Duration, String> {
    if let Some(reason) = conn.as_ref().and_then(|c| c.close_reason()) {
        tracing::debug!(%addr, %reason, "probe connection closed; reconnecting");
        *conn = None;
    }
    let c = match conn {
        Some(c) => c.clone(),
        None => {
            let connecting = endpoint
                .connect(addr, SERVER_NAME)
                .map_err(|e| format!("connect: {e}"))?;
            let c = tokio::time::timeout(CONNECT_TIMEOUT, connecting)
                .await
                .map_err(|_| format!("connect: no answer within {CONNECT_TIMEOUT:?}"))?
                .map_err(|e| format!("connect: {e}"))?;
            *conn = Some(c.clone());
            c
        }
    };
    let payload = seq.to_be_bytes();
    let started = Instant::now();
    let exchange = async {
        let (mut send, mut recv) = c.open_bi().await.map_err(|e| e.to_string())?;
        send.write_all(&payload).await.map_err(|e| e.to_string())?;
        send.finish().map_err(|e| e.to_string())?;
        recv.read_to_end(64).await.map_err(|e| e.to_string())
    };
    let reply = tokio::time::timeout(PROBE_TIMEOUT, exchange)
        .await
        .map_err(|_| format!("probe: no answer within {PROBE_TIMEOUT:?}"))?
        .map_err(|e| format!("probe: {e}"))?;
    let rtt = started.elapsed();
    if reply != payload {
        return Err("probe: echo did not match".into());
    }
    Ok(rtt)
}

/// Accepts any certificate; see the module docs for why that is sound here.
#[derive(Debug)]
struct AcceptAnyCert(Arc<CryptoProvider>);

impl ServerCertVerifier for AcceptAnyCert {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn loopback_rows_and_error_row_for_unreachable() {
        let a = Prober::start("127.0.0.1:0".parse().unwrap()).unwrap();
        let b = Prober::start("127.0.0.1:0".parse().unwrap()).unwrap();
        // Nothing listens there: an error row, never silence.
        let dead: SocketAddr = {
            let s = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
            s.local_addr().unwrap()
        };
        a.set_targets(vec![
            ("b".into(), b.local_addr().unwrap()),
            ("dead".into(), dead),
        ]);
        let rows = a.snapshot();
        assert_eq!(rows.len(), 2);
        assert!(rows
            .iter()
            .all(|r| r.last_error.is_some() && r.samples == 0));
        tokio::time::sleep(Duration::from_millis(3500)).await;
        let rows = a.snapshot();
        let rb = rows.iter().find(|r| r.peer == "b").unwrap();
        assert!(rb.samples >= 2, "{rb:?}");
        assert!(rb.last_error.is_none(), "{rb:?}");
        assert!(rb.median_ms.unwrap() < 100.0, "{rb:?}");
        let rd = rows.iter().find(|r| r.peer == "dead").unwrap();
        assert_eq!(rd.samples, 0);
        assert!(rd.last_error.is_some(), "{rd:?}");
        // Dropping a target drops its row.
        a.set_targets(vec![("b".into(), b.local_addr().unwrap())]);
        assert_eq!(a.snapshot().len(), 1);
        assert_eq!(a.snapshot()[0].samples, rb.samples);
    }
}
