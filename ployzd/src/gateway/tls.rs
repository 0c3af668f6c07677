//! The certificates every gateway serves, chosen by SNI (rustls
//! `ResolvesServerCert`): those in the `certificates` bucket, and while a
//! TLS-ALPN-01 validation is pending, its `acme-tls/1` certificate for
//! clients that offer only that protocol.

use ployz_api::*;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use std::collections::HashMap;
use std::sync::{Arc, RwLock};

pub const ACME_TLS_ALPN: &[u8] = b"acme-tls/1";

#[derive(Debug, Default)]
pub struct Certs {
    by_host: RwLock<HashMap<String, Arc<CertifiedKey>>>,
    alpn: RwLock<HashMap<String, Arc<CertifiedKey>>>,
    /// The PEM each loaded key came from (not parsed again).
    loaded: RwLock<HashMap<String, (String, u64)>>,
}

/// A chain and key in PEM as rustls serves them.
pub fn certified_key(chain_pem: &str, key_pem: &str) -> Result<CertifiedKey, String> {
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(chain_pem.as_bytes())
        .collect::<Result<_, _>>()
        .map_err(|e| format!("bad certificate PEM: {e}"))?;
    if chain.is_empty() {
        return Err("no certificate in the PEM".into());
    }
    let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes())
        .map_err(|e| format!("bad private key PEM: {e}"))?;
    let key = rustls::crypto::ring::sign::any_supported_type(&key)
        .map_err(|e| format!("unsupported private key: {e}"))?;
    Ok(CertifiedKey::new(chain, key))
}

impl Certs {
    /// The TLS server settings of every gateway listener.
    pub fn server_config(self: &Arc<Self>) -> Arc<rustls::ServerConfig> {
        let mut cfg = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .expect("ring supports the default TLS versions")
        .with_no_client_auth()
        .with_cert_resolver(self.clone());
        cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec(), ACME_TLS_ALPN.to_vec()];
        // Resumption: stateless tickets (TLS 1.2 and 1.3; the key rotates
        // every 6 hours, per process), and a larger session cache than the
        // default 256 for clients that resume by session ID.
        match rustls::crypto::ring::Ticketer::new() {
            Ok(t) => cfg.ticketer = t,
            Err(e) => tracing::warn!("gateway TLS: no session tickets: {e}"),
        }
        cfg.session_storage = rustls::server::ServerSessionMemoryCache::new(4096);
        Arc::new(cfg)
    }

    pub fn set_certificates(&self, certs: impl Iterator<Item = CertRecord>) {
        let mut by_host = HashMap::new();
        let mut loaded = self.loaded.write().expect("certs lock");
        let old = self.by_host.read().expect("certs lock").clone();
        let mut seen = HashMap::new();
        for c in certs.filter(|c| c.host != ACME_ACCOUNT_KEY) {
            let same = loaded
                .get(&c.host)
                .is_some_and(|(pem, _)| *pem == c.chain_pem);
            let key = match (same, old.get(&c.host)) {
                (true, Some(k)) => k.clone(),
                _ => match certified_key(&c.chain_pem, &c.key_pem) {
                    Ok(k) => Arc::new(k),
                    Err(e) => {
                        tracing::warn!(host = %c.host, "stored certificate unusable: {e}");
                        continue;
                    }
                },
            };
            seen.insert(c.host.clone(), (c.chain_pem, c.not_after_ms / 1000));
            by_host.insert(c.host, key);
        }
        *loaded = seen;
        *self.by_host.write().expect("certs lock") = by_host;
    }

    pub fn set_alpn_challenges(&self, list: Vec<(String, String, String)>) {
        let mut alpn = HashMap::new();
        for (host, cert, key) in list {
            match certified_key(&cert, &key) {
                Ok(k) => {
                    alpn.insert(host, Arc::new(k));
                }
                Err(e) => tracing::warn!(%host, "TLS-ALPN-01 certificate unusable: {e}"),
            }
        }
        *self.alpn.write().expect("certs lock") = alpn;
    }

    /// Hostnames served and their certificates' expiry (unix seconds).
    pub fn expiry(&self) -> Vec<(String, u64)> {
        let mut v: Vec<(String, u64)> = self
            .loaded
            .read()
            .expect("certs lock")
            .iter()
            .map(|(h, (_, t))| (h.clone(), *t))
            .collect();
        v.sort();
        v
    }
}

impl ResolvesServerCert for Certs {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let sni = hello.server_name()?.to_ascii_lowercase();
        let acme = hello
            .alpn()
            .is_some_and(|mut protos| protos.any(|p| p == ACME_TLS_ALPN));
        if acme {
            return self.alpn.read().expect("certs lock").get(&sni).cloned();
        }
        self.by_host.read().expect("certs lock").get(&sni).cloned()
    }
}
