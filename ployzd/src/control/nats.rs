//! The control plane clients see: every ployzd embeds a NATS server
//! (`ployz-natsd`). Its JetStream KV is the replicated store, reached through
//! [`StoreKv`], which forwards like every other store access, so a client
//! of any machine reads and writes the same buckets. Servers of one network
//! are joined by NATS routes carried over the encrypted peer channel; the
//! machine with the smaller id dials.

use crate::peer::{self, KvRead, KvReadResult, SecretSlot, Service};
use crate::store::Store;
use ployz_consensus::{BucketInfo, Entry, KvEvent, Txn, TxnResult};
use ployz_natsd::{BackendError, Credentials, KvBackend, Server, ServerConfig};
use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Mutex, Weak};

pub const DEFAULT_NATS_PORT: u16 = 4222;

/// The store as the NATS server's JetStream sees it.
pub struct StoreKv {
    store: Weak<Store>,
}

fn gone() -> BackendError {
    BackendError::Unavailable("ployzd is shutting down".into())
}

/// Buckets NATS clients never see nor write: registry credentials, NATS
/// users, the gateway's certificates (`ployz_api::HIDDEN_BUCKETS`).
fn hidden(bucket: &str) -> bool {
    ployz_api::HIDDEN_BUCKETS.contains(&bucket)
}

impl StoreKv {
    async fn read(&self, read: KvRead) -> Result<KvReadResult, BackendError> {
        let bucket = match &read {
            KvRead::Get { bucket, .. }
            | KvRead::List { bucket }
            | KvRead::ListAll { bucket }
            | KvRead::History { bucket, .. }
            | KvRead::Bucket { bucket } => Some(bucket.clone()),
            KvRead::Buckets => None,
        };
        if let Some(b) = bucket.filter(|b| hidden(b)) {
            return Err(BackendError::NoSuchBucket(b));
        }
        let d = self.store.upgrade().ok_or_else(gone)?;
        match d.read(read, 0).await {
            Ok(KvReadResult::NoSuchBucket(b)) => Err(BackendError::NoSuchBucket(b)),
            Ok(KvReadResult::Buckets(b)) => Ok(KvReadResult::Buckets(
                b.into_iter().filter(|b| !hidden(b)).collect(),
            )),
            Ok(r) => Ok(r),
            Err(e) => Err(BackendError::Unavailable(e.message)),
        }
    }
}

fn unexpected(r: KvReadResult) -> BackendError {
    BackendError::Unavailable(format!("unexpected read result {r:?}"))
}

impl KvBackend for StoreKv {
    async fn write(&self, txn: Txn) -> Result<TxnResult, BackendError> {
        use ployz_consensus::Op;
        if let Some(b) = txn.ops.iter().find_map(|op| match op {
            Op::CreateBucket { bucket, .. }
            | Op::DeleteBucket { bucket }
            | Op::Put { bucket, .. }
            | Op::Delete { bucket, .. } => hidden(bucket).then(|| bucket.clone()),
        }) {
            return Err(BackendError::NoSuchBucket(b));
        }
        let d = self.store.upgrade().ok_or_else(gone)?;
        d.write_txn(txn, 0)
            .await
            .map_err(|e| BackendError::Unavailable(e.message))
    }

    async fn get(&self, bucket: &str, key: &str) -> Result<Option<Entry>, BackendError> {
        match self
            .read(KvRead::Get {
                bucket: bucket.into(),
                key: key.into(),
            })
            .await?
        {
            KvReadResult::Entry(e) => Ok(e),
            other => Err(unexpected(other)),
        }
    }

    async fn history(&self, bucket: &str, key: &str) -> Result<Vec<Entry>, BackendError> {
        match self
            .read(KvRead::History {
                bucket: bucket.into(),
                key: key.into(),
            })
            .await?
        {
            KvReadResult::Entries(e) => Ok(e),
            other => Err(unexpected(other)),
        }
    }

    async fn list_all(&self, bucket: &str) -> Result<Vec<Entry>, BackendError> {
        match self
            .read(KvRead::ListAll {
                bucket: bucket.into(),
            })
            .await?
        {
            KvReadResult::Entries(e) => Ok(e),
            other => Err(unexpected(other)),
        }
    }

    async fn bucket(&self, bucket: &str) -> Result<Option<BucketInfo>, BackendError> {
        match self
            .read(KvRead::Bucket {
                bucket: bucket.into(),
            })
            .await
        {
            Ok(KvReadResult::Bucket(b)) => Ok(b),
            Err(BackendError::NoSuchBucket(_)) => Ok(None),
            Ok(other) => Err(unexpected(other)),
            Err(e) => Err(e),
        }
    }

    async fn buckets(&self) -> Result<Vec<String>, BackendError> {
        match self.read(KvRead::Buckets).await? {
            KvReadResult::Buckets(b) => Ok(b),
            other => Err(unexpected(other)),
        }
    }

    fn subscribe(&self) -> tokio::sync::broadcast::Receiver<KvEvent> {
        match self.store.upgrade() {
            Some(d) => d.events(),
            // A closed channel: consumers see the end and stop.
            None => tokio::sync::broadcast::channel(1).1,
        }
    }
}

/// The running NATS server of this machine and its routes.
pub struct Nats {
    pub server: Server,
    pub port: u16,
    /// The overlay address (or the underlay without a mesh) it listens on.
    pub advertise: IpAddr,
    /// The network CA's certificate when the extra listeners are TLS.
    pub ca_pem: Option<String>,
    /// Dialing tasks of the routes this machine keeps, by peer machine id.
    routes: Mutex<HashMap<String, tokio::task::JoinHandle<()>>>,
}

impl Nats {
    /// Start the server on loopback, on `advertise` (the overlay address)
    /// and on any `extra` addresses the operator configured — never on
    /// every interface unless told to — with the network's credentials.
    pub async fn start(
        store: Weak<Store>,
        name: String,
        users: Vec<ployz_nats_proto::User>,
        port: u16,
        advertise: IpAddr,
        extra: &[IpAddr],
        tls: Option<(std::sync::Arc<rustls::ServerConfig>, String)>,
    ) -> std::io::Result<Nats> {
        let loopback = tokio::net::TcpListener::bind(("127.0.0.1", port)).await?;
        let port = loopback.local_addr()?.port();
        let cfg = ServerConfig {
            server_name: name,
            host: advertise.to_string(),
            port,
            credentials: Some(Credentials::Users(users)),
            ..ServerConfig::default()
        };
        let server = Server::with_kv(cfg, StoreKv { store });
        let s = server.clone();
        tokio::spawn(async move { s.serve(loopback).await });
        let mut addrs = vec![advertise];
        addrs.extend_from_slice(extra);
        addrs.retain(|a| !a.is_loopback());
        addrs.dedup();
        let acceptor = tls
            .as_ref()
            .map(|(cfg, _)| tokio_rustls::TlsAcceptor::from(cfg.clone()));
        for a in addrs {
            let l = tokio::net::TcpListener::bind(SocketAddr::new(a, port)).await?;
            let s = server.clone();
            // Loopback and the overlay (WireGuard) are private; every other
            // address speaks TLS when the caller gave a certificate.
            match (&acceptor, a == advertise) {
                (Some(acc), false) => {
                    let acc = acc.clone();
                    tokio::spawn(async move { s.serve_tls(l, acc).await });
                }
                _ => {
                    tokio::spawn(async move { s.serve(l).await });
                }
            }
        }
        Ok(Nats {
            server,
            port,
            advertise,
            ca_pem: tls.map(|(_, pem)| pem),
            routes: Mutex::new(HashMap::new()),
        })
    }

    /// Keep a route to each machine in `peers` (id, peer address) whose id
    /// is larger than ours; drop routes to machines no longer listed.
    pub fn sync_routes(&self, me: &str, secret: &SecretSlot, peers: &[(String, String)]) {
        let me = me.to_string();
        let mut routes = self.routes.lock().unwrap_or_else(|e| e.into_inner());
        routes.retain(|id, task| {
            let keep = peers.iter().any(|(p, _)| p == id);
            if !keep {
                task.abort();
            }
            keep
        });
        for (id, addr) in peers {
            if *id <= me || addr.is_empty() || routes.contains_key(id) {
                continue;
            }
            let secret = secret.clone();
            let me = me.clone();
            let addr = addr.clone();
            let task = self.server.maintain_route(id.clone(), move || {
                let secret = secret.get();
                let me = me.clone();
                let addr = addr.clone();
                async move {
                    let secret = secret.ok_or_else(|| {
                        std::io::Error::new(std::io::ErrorKind::NotConnected, "no network")
                    })?;
                    let conn = peer::dial(&addr, Service::Route, &secret, &me).await?;
                    Ok(peer::byte_stream(conn))
                }
            });
            routes.insert(id.clone(), task);
        }
    }

    pub async fn shutdown(&self) {
        for (_, t) in self
            .routes
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .drain()
        {
            t.abort();
        }
        self.server.shutdown().await;
    }
}
