//! The HTTP(S) gateway (layer 7): every machine serves HTTP on
//! `--http-port` and HTTPS on `--https-port`, routing by Host and longest
//! path prefix to the healthy instances of a service over the mesh.
//!
//! - `table` — the decisions, pure: hostnames, path prefixes, the route
//!   of a request, backend order (round robin, one retry).
//! - `routes` — `route add/ls/rm` over the `routes` bucket.
//! - `proxy` — the hyper servers (HTTP/1.1 and HTTP/2, TLS with ALPN) and
//!   the forwarding (pooled HTTP/1.1 to backends, upgrades).
//! - `tls` — the certificates every gateway serves by SNI, from the
//!   `certificates` bucket, and pending TLS-ALPN-01 challenges.
//! - `acme` — ordering and renewing certificates (one machine at a time).
//!
//! State: the route table and certificates, rebuilt from store watches;
//! the backend connection pool; request metrics.

mod acme;
mod metrics;
mod proxy;
mod routes;
pub mod table;
mod tls;

use crate::store::Store;
use ployz_api::*;
use std::sync::{Arc, RwLock};
use std::time::Duration;

pub use metrics::GatewayMetrics;

/// Where the gateway listens (0: not at all).
#[derive(Debug, Clone, Copy)]
pub struct GatewayConfig {
    pub http_port: u16,
    pub https_port: u16,
}

pub struct Gateway {
    cfg: GatewayConfig,
    store: Arc<Store>,
    table: RwLock<Arc<table::Table>>,
    /// HTTP-01 key authorizations by token.
    http_challenges: RwLock<Arc<std::collections::HashMap<String, String>>>,
    certs: Arc<tls::Certs>,
    pool: Arc<proxy::Pool>,
    metrics: GatewayMetrics,
    /// Wakes the ACME loop (`acme set`, a new TLS route).
    acme_kick: tokio::sync::Notify,
}

impl Gateway {
    pub fn new(cfg: GatewayConfig, store: Arc<Store>) -> Gateway {
        Gateway {
            cfg,
            store,
            table: RwLock::new(Arc::new(table::Table::default())),
            http_challenges: Default::default(),
            certs: Arc::new(tls::Certs::default()),
            pool: Arc::default(),
            metrics: GatewayMetrics::new(),
            acme_kick: tokio::sync::Notify::new(),
        }
    }

    pub fn metrics(&self) -> &GatewayMetrics {
        &self.metrics
    }

    /// Expiry (unix seconds) of every certificate this gateway serves.
    pub fn certificate_expiry(&self) -> Vec<(String, u64)> {
        self.certs.expiry()
    }

    fn table(&self) -> Arc<table::Table> {
        self.table.read().expect("table lock").clone()
    }

    /// Serve until `stop`: the listeners, the table following the store,
    /// and the ACME loop.
    pub async fn run(self: Arc<Self>, mut stop: tokio::sync::watch::Receiver<bool>) {
        let changed = Arc::new(tokio::sync::Notify::new());
        let mut tasks = Vec::new();
        for bucket in [
            BUCKET_ROUTES,
            BUCKET_INSTANCES,
            BUCKET_CERTIFICATES,
            BUCKET_ACME_CHALLENGES,
        ] {
            tasks.push(tokio::spawn(
                self.store.clone().watch_bucket(bucket, changed.clone()),
            ));
        }
        if self.cfg.http_port != 0 {
            tasks.push(tokio::spawn(self.clone().serve_http(self.cfg.http_port)));
        }
        if self.cfg.https_port != 0 {
            tasks.push(tokio::spawn(self.clone().serve_https(self.cfg.https_port)));
        }
        tasks.push(tokio::spawn(self.clone().acme_loop()));
        // A missed event (or a store that was not reachable yet) is caught
        // up within a few seconds anyway.
        let mut tick = tokio::time::interval(Duration::from_secs(5));
        loop {
            tokio::select! {
                _ = stop.changed() => break,
                _ = tick.tick() => {}
                _ = changed.notified() => {}
            }
            tokio::select! {
                _ = stop.changed() => break,
                _ = self.refresh() => {}
            }
        }
        for t in tasks {
            t.abort();
        }
    }

    /// Rebuild the table, certificates and challenges from the store.
    async fn refresh(&self) {
        if !self.store.in_network().await {
            return;
        }
        match self.read_table().await {
            Ok(t) => *self.table.write().expect("table lock") = Arc::new(t),
            Err(e) => tracing::debug!("gateway: cannot read routes: {}", e.message),
        }
        match self.store.list::<CertRecord>(BUCKET_CERTIFICATES).await {
            Ok(cs) => self.certs.set_certificates(cs.into_iter().map(|c| c.value)),
            Err(e) => tracing::debug!("gateway: cannot read certificates: {}", e.message),
        }
        match self
            .store
            .list_entries(BUCKET_ACME_CHALLENGES)
            .await
            .and_then(|es| {
                es.iter()
                    .filter(|e| e.is_live())
                    .map(|e| {
                        crate::store::decode::<ChallengeRecord>(e).map(|v| (e.key.clone(), v.value))
                    })
                    .collect::<Result<Vec<_>, _>>()
            }) {
            Ok(cs) => {
                let mut http = std::collections::HashMap::new();
                let mut alpn = Vec::new();
                for (key, c) in cs {
                    match c {
                        ChallengeRecord::Http { key_authorization } => {
                            http.insert(key, key_authorization);
                        }
                        ChallengeRecord::TlsAlpn { cert_pem, key_pem } => {
                            if let Some(host) = key.strip_prefix("alpn.") {
                                alpn.push((host.to_string(), cert_pem, key_pem));
                            }
                        }
                    }
                }
                *self.http_challenges.write().expect("challenge lock") = Arc::new(http);
                self.certs.set_alpn_challenges(alpn);
            }
            Err(e) => tracing::debug!("gateway: cannot read challenges: {}", e.message),
        }
    }

    async fn read_table(&self) -> Result<table::Table, ApiError> {
        let routes = self.store.values::<RouteRecord>(BUCKET_ROUTES).await?;
        let instances = self
            .store
            .values::<InstanceRecord>(BUCKET_INSTANCES)
            .await?;
        Ok(table::Table::build(routes, &instances))
    }
}
