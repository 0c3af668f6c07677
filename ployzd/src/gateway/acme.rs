//! ACME: certificates for `--tls acme` routes, ordered by one machine at a
//! time (a lease in the `acme` bucket), validated by HTTP-01 (the key
//! authorization in the `acme_challenges` bucket, answered by whichever
//! gateway the CA reaches) or TLS-ALPN-01 (the `acme-tls/1` certificate
//! there, served by every gateway's SNI resolver), and stored once in the
//! `certificates` bucket, which every gateway serves and NATS never shows.
//! When to renew is a pure decision ([`needs_renewal`]).

use super::Gateway;
use crate::store::{self, put};
use instant_acme::{
    Account, AccountCredentials, AuthorizationStatus, ChallengeType, Identifier, NewAccount,
    NewOrder, OrderStatus, RetryPolicy,
};
use ployz_api::time::now_ms;
use ployz_api::*;
use ployz_consensus::Expect;
use std::time::Duration;

const DAY_MS: u64 = 24 * 3600 * 1000;
/// How long the ordering machine holds the lease (renewed per hostname).
const LEASE_MS: u64 = 120_000;
/// How often every machine looks for certificates to order.
const CHECK_EVERY: Duration = Duration::from_secs(10);
/// After a failed order, the hostname waits this long.
const BACKOFF: Duration = Duration::from_secs(30);

/// Whether a certificate valid from `not_before` to `not_after` (ms) is due
/// for renewal at `now`: 30 days before it expires, or for a certificate
/// living less than 90 days, once two thirds of its lifetime have passed.
pub fn needs_renewal(not_before: u64, not_after: u64, now: u64) -> bool {
    let life = not_after.saturating_sub(not_before);
    let renew_at = if life >= 90 * DAY_MS {
        not_after - 30 * DAY_MS
    } else {
        not_before + life / 3 * 2
    };
    now >= renew_at
}

/// Which of `hosts` need a certificate: none stored, one from another
/// directory, or one due for renewal.
pub fn due(hosts: &[String], certs: &[CertRecord], directory: &str, now: u64) -> Vec<String> {
    hosts
        .iter()
        .filter(|h| {
            certs.iter().find(|c| &c.host == *h).is_none_or(|c| {
                c.directory != directory || needs_renewal(c.not_before_ms, c.not_after_ms, now)
            })
        })
        .cloned()
        .collect()
}

/// Checks PEM roots given with `acme set --ca-file`; how many there are.
pub fn parse_roots(pem: &str) -> Result<usize, String> {
    use rustls::pki_types::pem::PemObject;
    let certs: Vec<_> = rustls::pki_types::CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<_, _>>()
        .map_err(|e| format!("not PEM certificates: {e}"))?;
    if certs.is_empty() {
        return Err("no certificate in the file".into());
    }
    Ok(certs.len())
}

/// Validity of the first certificate of a PEM chain, in unix ms.
fn validity(chain_pem: &str) -> Result<(u64, u64), String> {
    use rustls::pki_types::pem::PemObject;
    let der = rustls::pki_types::CertificateDer::pem_slice_iter(chain_pem.as_bytes())
        .next()
        .ok_or("the CA sent no certificate")?
        .map_err(|e| format!("the CA's certificate PEM: {e}"))?;
    let (_, cert) = x509_parser::parse_x509_certificate(&der)
        .map_err(|e| format!("the CA's certificate: {e}"))?;
    let v = cert.validity();
    let ms = |t: &x509_parser::time::ASN1Time| (t.timestamp().max(0) as u64) * 1000;
    Ok((ms(&v.not_before), ms(&v.not_after)))
}

#[derive(Debug, thiserror::Error)]
enum AcmeError {
    #[error("ACME: {0}")]
    Acme(#[from] instant_acme::Error),
    #[error("store: {}", .0.message)]
    Store(ApiError),
    #[error("{0}")]
    Other(String),
}

impl From<ApiError> for AcmeError {
    fn from(e: ApiError) -> Self {
        AcmeError::Store(e)
    }
}

impl Gateway {
    /// Every machine: now and then, and when kicked, order what is due
    /// while holding the lease.
    pub(super) async fn acme_loop(self: std::sync::Arc<Self>) {
        let mut failed: std::collections::HashMap<String, tokio::time::Instant> =
            Default::default();
        loop {
            tokio::select! {
                _ = tokio::time::sleep(CHECK_EVERY) => {}
                _ = self.acme_kick.notified() => {}
            }
            if !self.store.in_network().await {
                continue;
            }
            if let Err(e) = self.acme_pass(&mut failed).await {
                tracing::warn!("certificates: {e}");
            }
        }
    }

    async fn acme_pass(
        &self,
        failed: &mut std::collections::HashMap<String, tokio::time::Instant>,
    ) -> Result<(), AcmeError> {
        let Some(cfg) = self
            .store
            .get::<AcmeRecord>(BUCKET_ACME, ACME_CONFIG_KEY)
            .await?
            .map(|v| v.value)
        else {
            return Ok(());
        };
        let mut hosts: Vec<String> = self
            .store
            .values::<RouteRecord>(BUCKET_ROUTES)
            .await?
            .into_iter()
            .filter(|r| r.tls == RouteTls::Acme)
            .map(|r| r.host)
            .collect();
        hosts.sort();
        hosts.dedup();
        let certs = self.store.values::<CertRecord>(BUCKET_CERTIFICATES).await?;
        let now = tokio::time::Instant::now();
        failed.retain(|_, t| now.duration_since(*t) < BACKOFF);
        let todo: Vec<String> = due(&hosts, &certs, &cfg.directory, now_ms())
            .into_iter()
            .filter(|h| !failed.contains_key(h))
            .collect();
        if todo.is_empty() {
            return Ok(());
        }
        let Some(mut lease_rev) = self.take_lease(None).await? else {
            return Ok(());
        };
        let account = match self.account(&cfg).await {
            Ok(a) => a,
            Err(e) => {
                self.drop_lease(lease_rev).await;
                return Err(e);
            }
        };
        for host in todo {
            match self.take_lease(Some(lease_rev)).await {
                Ok(Some(r)) => lease_rev = r,
                _ => return Ok(()),
            }
            tracing::info!(%host, directory = %cfg.directory, "ordering a certificate");
            match self.order(&account, &cfg, &host).await {
                Ok(not_after) => {
                    tracing::info!(%host, expires = %ployz_api::time::rfc3339(not_after), "certificate stored")
                }
                Err(e) => {
                    tracing::warn!(%host, "cannot obtain a certificate: {e}");
                    failed.insert(host.clone(), tokio::time::Instant::now());
                }
            }
            self.clear_challenges(&host).await;
        }
        self.drop_lease(lease_rev).await;
        Ok(())
    }

    /// Takes (or with `held`, renews) the ordering lease; `None` when
    /// another machine holds it.
    async fn take_lease(&self, held: Option<u64>) -> Result<Option<u64>, AcmeError> {
        let me = self.store.machine_id().to_string();
        let cur = self
            .store
            .get::<AcmeLease>(BUCKET_ACME, ACME_LEASE_KEY)
            .await?;
        let expect = match (&cur, held) {
            (Some(c), Some(rev)) if c.revision == rev && c.value.machine == me => {
                Expect::Revision(rev)
            }
            (Some(_), Some(_)) => return Ok(None),
            (Some(c), None) if c.value.machine != me && c.value.expires_at_ms > now_ms() => {
                return Ok(None)
            }
            (Some(c), None) => Expect::Revision(c.revision),
            (None, _) => Expect::Absent,
        };
        let lease = AcmeLease {
            machine: me,
            expires_at_ms: now_ms() + LEASE_MS,
        };
        let mut ops = store::records::ensure_bucket(BUCKET_ACME);
        ops.push(put(BUCKET_ACME, ACME_LEASE_KEY, &lease, expect));
        Ok(self
            .store
            .txn(ops)
            .await?
            .ok()
            .and_then(|revs| revs.last().copied()))
    }

    async fn drop_lease(&self, rev: u64) {
        let _ = self
            .store
            .txn(vec![store::delete(
                BUCKET_ACME,
                ACME_LEASE_KEY,
                Expect::Revision(rev),
            )])
            .await;
    }

    /// The network's ACME account: stored credentials for this directory,
    /// or a new account (stored at once).
    async fn account(&self, cfg: &AcmeRecord) -> Result<Account, AcmeError> {
        let builder = || -> Result<instant_acme::AccountBuilder, AcmeError> {
            match &cfg.ca_pem {
                None => Ok(Account::builder()?),
                Some(pem) => {
                    // instant-acme reads custom roots from a file.
                    let path = std::env::temp_dir().join(format!(
                        "ployz-acme-roots-{}-{}.pem",
                        std::process::id(),
                        now_ms()
                    ));
                    std::fs::write(&path, pem).map_err(|e| {
                        AcmeError::Other(format!("writing {}: {e}", path.display()))
                    })?;
                    let b = Account::builder_with_root(&path);
                    let _ = std::fs::remove_file(&path);
                    Ok(b?)
                }
            }
        };
        if let Some(stored) = self
            .store
            .get::<CertRecord>(BUCKET_CERTIFICATES, ACME_ACCOUNT_KEY)
            .await?
            .map(|v| v.value)
            .filter(|a| a.directory == cfg.directory && a.chain_pem == cfg.email)
        {
            if let Ok(creds) = serde_json::from_str::<AccountCredentials>(&stored.key_pem) {
                return Ok(builder()?.from_credentials(creds).await?);
            }
        }
        let contact = format!("mailto:{}", cfg.email);
        let (account, creds) = builder()?
            .create(
                &NewAccount {
                    contact: &[&contact],
                    terms_of_service_agreed: true,
                    only_return_existing: false,
                },
                cfg.directory.clone(),
                None,
            )
            .await?;
        let rec = CertRecord {
            host: ACME_ACCOUNT_KEY.into(),
            chain_pem: cfg.email.clone(),
            key_pem: serde_json::to_string(&creds)
                .map_err(|e| AcmeError::Other(format!("account credentials: {e}")))?,
            not_before_ms: 0,
            not_after_ms: 0,
            directory: cfg.directory.clone(),
        };
        let mut ops = store::records::ensure_bucket(BUCKET_CERTIFICATES);
        ops.push(put(
            BUCKET_CERTIFICATES,
            ACME_ACCOUNT_KEY,
            &rec,
            Expect::Any,
        ));
        self.store
            .txn(ops)
            .await?
            .map_err(|(_, r)| AcmeError::Other(format!("storing the account: {r}")))?;
        Ok(account)
    }

    /// Orders, validates, finalizes and stores one hostname's certificate;
    /// its expiry.
    async fn order(
        &self,
        account: &Account,
        cfg: &AcmeRecord,
        host: &str,
    ) -> Result<u64, AcmeError> {
        let ids = [Identifier::Dns(host.to_string())];
        let mut order = account.new_order(&NewOrder::new(&ids)).await?;
        let prefer_http = cfg.challenge == AcmeChallenge::Http01;
        let mut authorizations = order.authorizations();
        while let Some(authz) = authorizations.next().await {
            let mut authz = authz?;
            match authz.status {
                AuthorizationStatus::Pending => {}
                AuthorizationStatus::Valid => continue,
                other => {
                    return Err(AcmeError::Other(format!(
                        "authorization for {host} is {other:?}"
                    )))
                }
            }
            let has_http = authz
                .challenges
                .iter()
                .any(|c| c.r#type == ChallengeType::Http01);
            let kind = if prefer_http || !has_http {
                if has_http {
                    ChallengeType::Http01
                } else {
                    ChallengeType::TlsAlpn01
                }
            } else {
                ChallengeType::TlsAlpn01
            };
            let mut challenge = authz.challenge(kind.clone()).ok_or_else(|| {
                AcmeError::Other(format!("the CA offers no {kind:?} challenge for {host}"))
            })?;
            let key_auth = challenge.key_authorization();
            let (key, rec) = match kind {
                ChallengeType::Http01 => (
                    challenge.token.clone(),
                    ChallengeRecord::Http {
                        key_authorization: key_auth.as_str().to_string(),
                    },
                ),
                _ => {
                    let (cert_pem, key_pem) = alpn_certificate(host, key_auth.digest().as_ref())?;
                    (
                        ChallengeRecord::alpn_key(host),
                        ChallengeRecord::TlsAlpn { cert_pem, key_pem },
                    )
                }
            };
            let mut ops = store::records::ensure_bucket(BUCKET_ACME_CHALLENGES);
            ops.push(put(BUCKET_ACME_CHALLENGES, &key, &rec, Expect::Any));
            self.store
                .txn(ops)
                .await?
                .map_err(|(_, r)| AcmeError::Other(format!("storing the challenge: {r}")))?;
            // Every gateway follows the store within about a second.
            tokio::time::sleep(Duration::from_millis(1500)).await;
            challenge.set_ready().await?;
        }
        let retry = RetryPolicy::new().timeout(Duration::from_secs(90));
        let status = order.poll_ready(&retry).await?;
        if status != OrderStatus::Ready {
            return Err(AcmeError::Other(format!(
                "the order for {host} is {status:?}"
            )));
        }
        let key = rcgen::KeyPair::generate().map_err(|e| AcmeError::Other(e.to_string()))?;
        let mut params = rcgen::CertificateParams::new(vec![host.to_string()])
            .map_err(|e| AcmeError::Other(e.to_string()))?;
        params.distinguished_name = rcgen::DistinguishedName::new();
        let csr = params
            .serialize_request(&key)
            .map_err(|e| AcmeError::Other(e.to_string()))?;
        order.finalize_csr(csr.der()).await?;
        let chain_pem = order.poll_certificate(&retry).await?;
        let (not_before_ms, not_after_ms) = validity(&chain_pem).map_err(AcmeError::Other)?;
        super::tls::certified_key(&chain_pem, &key.serialize_pem()).map_err(AcmeError::Other)?;
        let rec = CertRecord {
            host: host.to_string(),
            chain_pem,
            key_pem: key.serialize_pem(),
            not_before_ms,
            not_after_ms,
            directory: cfg.directory.clone(),
        };
        let mut ops = store::records::ensure_bucket(BUCKET_CERTIFICATES);
        ops.push(put(BUCKET_CERTIFICATES, host, &rec, Expect::Any));
        self.store
            .txn(ops)
            .await?
            .map_err(|(_, r)| AcmeError::Other(format!("storing the certificate: {r}")))?;
        Ok(not_after_ms)
    }

    /// Removes `host`'s pending challenges (HTTP tokens are single-use anyway).
    async fn clear_challenges(&self, host: &str) {
        let Ok(entries) = self.store.list_entries(BUCKET_ACME_CHALLENGES).await else {
            return;
        };
        let ops: Vec<_> = entries
            .iter()
            .filter(|e| e.is_live())
            .filter(|e| {
                e.key == ChallengeRecord::alpn_key(host)
                    || matches!(
                        crate::store::decode::<ChallengeRecord>(e).map(|v| v.value),
                        Ok(ChallengeRecord::Http { .. })
                    )
            })
            .map(|e| store::delete(BUCKET_ACME_CHALLENGES, &e.key, Expect::Any))
            .collect();
        if !ops.is_empty() {
            let _ = self.store.txn(ops).await;
        }
    }
}

/// The TLS-ALPN-01 certificate for `host` (RFC 8737): self-signed, the
/// `acmeIdentifier` extension carrying the key authorization's digest.
fn alpn_certificate(host: &str, digest: &[u8]) -> Result<(String, String), AcmeError> {
    let key = rcgen::KeyPair::generate().map_err(|e| AcmeError::Other(e.to_string()))?;
    let mut params = rcgen::CertificateParams::new(vec![host.to_string()])
        .map_err(|e| AcmeError::Other(e.to_string()))?;
    params
        .custom_extensions
        .push(rcgen::CustomExtension::new_acme_identifier(digest));
    let cert = params
        .self_signed(&key)
        .map_err(|e| AcmeError::Other(e.to_string()))?;
    Ok((cert.pem(), key.serialize_pem()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cert(host: &str, nb: u64, na: u64, dir: &str) -> CertRecord {
        CertRecord {
            host: host.into(),
            chain_pem: String::new(),
            key_pem: String::new(),
            not_before_ms: nb,
            not_after_ms: na,
            directory: dir.into(),
        }
    }

    #[test]
    fn long_certificates_renew_30_days_before_expiry() {
        let nb = 1_000 * DAY_MS;
        let na = nb + 90 * DAY_MS;
        assert!(!needs_renewal(nb, na, na - 31 * DAY_MS));
        assert!(needs_renewal(nb, na, na - 30 * DAY_MS));
        let na = nb + 365 * DAY_MS;
        assert!(!needs_renewal(nb, na, nb + 300 * DAY_MS));
        assert!(needs_renewal(nb, na, na - 29 * DAY_MS));
    }

    #[test]
    fn short_certificates_renew_at_two_thirds() {
        let nb = 1_000_000;
        let na = nb + 90_000; // 90 s
        assert!(!needs_renewal(nb, na, nb + 59_000));
        assert!(needs_renewal(nb, na, nb + 60_000));
        let na = nb + 6 * DAY_MS;
        assert!(!needs_renewal(nb, na, nb + 3 * DAY_MS));
        assert!(needs_renewal(nb, na, nb + 4 * DAY_MS));
    }

    #[test]
    fn due_hosts() {
        let now = 200 * DAY_MS;
        let certs = vec![
            cert("fresh.com", now - DAY_MS, now + 80 * DAY_MS, "d"),
            cert("old.com", now - 80 * DAY_MS, now + 10 * DAY_MS, "d"),
            cert("moved.com", now - DAY_MS, now + 80 * DAY_MS, "other"),
        ];
        let hosts: Vec<String> = ["fresh.com", "old.com", "moved.com", "new.com"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        assert_eq!(
            due(&hosts, &certs, "d", now),
            vec!["old.com", "moved.com", "new.com"]
        );
    }

    #[test]
    fn roots_must_be_pem_certificates() {
        assert!(parse_roots("hello").is_err());
        let key = rcgen::KeyPair::generate().unwrap();
        let c = rcgen::CertificateParams::new(vec!["ca.test".into()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        assert_eq!(parse_roots(&c.pem()).unwrap(), 1);
    }

    #[test]
    fn alpn_certificates_carry_the_acme_extension() {
        let (cert, key) = alpn_certificate("a.test", &[7u8; 32]).unwrap();
        let ck = crate::gateway::tls::certified_key(&cert, &key).unwrap();
        let (_, x) = x509_parser::parse_x509_certificate(&ck.cert[0]).unwrap();
        let oid = x509_parser::oid_registry::Oid::from(&[1, 3, 6, 1, 5, 5, 7, 1, 31]).unwrap();
        let ext = x.get_extension_unique(&oid).unwrap().unwrap();
        assert!(ext.critical);
    }
}
