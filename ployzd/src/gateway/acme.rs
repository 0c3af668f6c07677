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
    der_validity(&der).map_err(|e| format!("the CA's certificate: {e}"))
}

/// `notBefore` and `notAfter` of a DER X.509 certificate (RFC 5280 4.1), in
/// unix ms: the only fields read, so a few lines of DER instead of a
/// general X.509 parser in the binary (issue 16). The signature and the
/// rest are rustls's business when the certificate is served.
fn der_validity(der: &[u8]) -> Result<(u64, u64), &'static str> {
    /// One DER TLV: (tag, contents, what follows).
    fn tlv(b: &[u8]) -> Result<(u8, &[u8], &[u8]), &'static str> {
        let (&tag, b) = b.split_first().ok_or("truncated DER")?;
        let (&len0, mut b) = b.split_first().ok_or("truncated DER")?;
        let len = if len0 < 0x80 {
            len0 as usize
        } else {
            let n = (len0 & 0x7f) as usize;
            if n == 0 || n > 4 || b.len() < n {
                return Err("bad DER length");
            }
            let len = b[..n].iter().fold(0usize, |a, &x| (a << 8) | x as usize);
            b = &b[n..];
            len
        };
        if b.len() < len {
            return Err("truncated DER");
        }
        Ok((tag, &b[..len], &b[len..]))
    }
    fn expect(b: &[u8], want: u8) -> Result<(&[u8], &[u8]), &'static str> {
        match tlv(b)? {
            (tag, body, rest) if tag == want => Ok((body, rest)),
            _ => Err("not an X.509 certificate"),
        }
    }
    const SEQ: u8 = 0x30;
    let (cert, _) = expect(der, SEQ)?;
    let (mut tbs, _) = expect(cert, SEQ)?;
    if tbs.first() == Some(&0xa0) {
        tbs = tlv(tbs)?.2; // [0] version
    }
    let (_, tbs) = expect(tbs, 0x02)?; // serialNumber
    let (_, tbs) = expect(tbs, SEQ)?; // signature algorithm
    let (_, tbs) = expect(tbs, SEQ)?; // issuer
    let (validity, _) = expect(tbs, SEQ)?;
    let (t0, b0, rest) = tlv(validity)?;
    let (t1, b1, _) = tlv(rest)?;
    Ok((asn1_time_ms(t0, b0)?, asn1_time_ms(t1, b1)?))
}

/// An X.509 `Time` (UTCTime `YYMMDDHHMMSSZ`, years 1950-2049, or
/// GeneralizedTime `YYYYMMDDHHMMSSZ`, RFC 5280 4.1.2.5) in unix ms, 0 before 1970.
fn asn1_time_ms(tag: u8, s: &[u8]) -> Result<u64, &'static str> {
    const BAD: &str = "bad certificate time";
    let (year, s) = match (tag, s.len()) {
        (0x17, 13) => (0, s),
        (0x18, 15) => (100 * two(&s[..2]).ok_or(BAD)? as i64, &s[2..]),
        _ => return Err(BAD),
    };
    fn two(d: &[u8]) -> Option<u32> {
        match d {
            [a @ b'0'..=b'9', b @ b'0'..=b'9'] => Some(((a - b'0') * 10 + (b - b'0')) as u32),
            _ => None,
        }
    }
    if s[12] != b'Z' {
        return Err(BAD);
    }
    let mut f = [0i64; 6];
    for (i, pair) in s[..12].chunks(2).enumerate() {
        f[i] = two(pair).ok_or(BAD)? as i64;
    }
    let [yy, m, d, hh, mm, ss] = f;
    let year = match tag {
        0x17 if yy < 50 => 2000 + yy,
        0x17 => 1900 + yy,
        _ => year + yy,
    };
    if !(1..=12).contains(&m) || !(1..=31).contains(&d) || hh > 23 || mm > 59 || ss > 60 {
        return Err(BAD);
    }
    // Days from 1970-01-01 to year-m-d (proleptic Gregorian, Howard Hinnant's days_from_civil).
    let y = if m <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * ((m + 9) % 12) + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    let secs = days * 86_400 + hh * 3600 + mm * 60 + ss;
    Ok(secs.max(0) as u64 * 1000)
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
    fn validity_reads_utc_and_generalized_times() {
        // rcgen writes UTCTime up to 2049 and GeneralizedTime from 2050 on.
        for (nb, na) in [
            ((2025, 1, 2), (2025, 4, 2)),
            ((1999, 12, 31), (2049, 12, 31)),
            ((2024, 2, 29), (2051, 6, 1)),
        ] {
            let key = rcgen::KeyPair::generate().unwrap();
            let mut p = rcgen::CertificateParams::new(vec!["v.test".into()]).unwrap();
            p.not_before = rcgen::date_time_ymd(nb.0, nb.1, nb.2);
            p.not_after = rcgen::date_time_ymd(na.0, na.1, na.2);
            let c = p.self_signed(&key).unwrap();
            let (_, x) = x509_parser::parse_x509_certificate(c.der()).unwrap();
            let v = x.validity();
            let want = (
                v.not_before.timestamp() as u64 * 1000,
                v.not_after.timestamp() as u64 * 1000,
            );
            assert_eq!(validity(&c.pem()).unwrap(), want, "{nb:?} {na:?}");
        }
        // 2025-01-02T00:00:00Z, independently of x509-parser.
        assert_eq!(
            asn1_time_ms(0x17, b"250102000000Z").unwrap(),
            1_735_776_000_000
        );
        assert_eq!(
            asn1_time_ms(0x18, b"20250102000000Z").unwrap(),
            1_735_776_000_000
        );
    }

    #[test]
    fn validity_rejects_what_is_not_a_certificate() {
        assert!(validity("hello").is_err());
        assert!(der_validity(&[]).is_err());
        assert!(der_validity(&[0x30, 0x82, 0xff]).is_err());
        assert!(der_validity(&[0x30, 0x03, 0x02, 0x01, 0x00]).is_err());
        assert!(asn1_time_ms(0x17, b"251302000000Z").is_err());
        assert!(asn1_time_ms(0x17, b"2501020000001").is_err());
        assert!(asn1_time_ms(0x18, b"250102000000Z").is_err());
        assert!(asn1_time_ms(0x04, b"250102000000Z").is_err());
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
