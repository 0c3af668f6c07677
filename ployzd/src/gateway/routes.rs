//! `route add/ls/rm` and `acme set/show`: the only writers of the `routes`
//! bucket and of the ACME settings. Every check runs before the one write,
//! so a refused request changes nothing.

use super::{table, Gateway};
use crate::errors::{internal, invalid, refused};
use crate::store::{self, put};
use ployz_api::time::{now_ms, rfc3339};
use ployz_api::*;
use ployz_consensus::{Expect, Rejection};

fn host_arg(host: &str) -> Result<String, ApiError> {
    table::normalize_host(host).map_err(|m| {
        invalid(m).with_hint("give a DNS name like app.example.com (no scheme, port or path)")
    })
}

fn path_arg(path: Option<&str>) -> Result<String, ApiError> {
    table::normalize_path(path).map_err(|m| invalid(m).with_hint("give a prefix like /api"))
}

impl Gateway {
    pub(crate) async fn route_add(
        &self,
        host: &str,
        path: Option<&str>,
        service: &str,
        port: u16,
        tls: RouteTls,
    ) -> Result<RouteList, ApiError> {
        let host = host_arg(host)?;
        let path = path_arg(path)?;
        if port == 0 {
            return Err(invalid(
                "--port 0 is not a port: give the port the service listens on",
            ));
        }
        self.store.require_network().await?;
        if self
            .store
            .get::<ServiceRecord>(BUCKET_SERVICES, service)
            .await?
            .is_none()
        {
            return Err(ApiError::new(
                ErrorCode::NotFound,
                format!("no service `{service}` to route {host}{path} to"),
            )
            .with_hint("deploy it first, or see ployzctl service ls"));
        }
        let rec = RouteRecord {
            host: host.clone(),
            path: path.clone(),
            service: service.to_string(),
            port,
            tls,
            updated_at_ms: now_ms(),
        };
        let key = RouteRecord::key(&host, &path);
        for _ in 0..store::CAS_RETRIES {
            let existing = self.store.list::<RouteRecord>(BUCKET_ROUTES).await?;
            let values: Vec<RouteRecord> = existing.iter().map(|v| v.value.clone()).collect();
            table::check_add(&values, &rec).map_err(|m| {
                refused(m)
                    .with_hint("remove that route first (ployzctl route rm), or pick another path")
            })?;
            let expect = existing
                .iter()
                .find(|v| v.value.host == host && v.value.path == path)
                .map_or(Expect::Absent, |v| Expect::Revision(v.revision));
            let mut ops = store::records::ensure_bucket(BUCKET_ROUTES);
            ops.push(put(BUCKET_ROUTES, &key, &rec, expect));
            match self.store.txn(ops).await? {
                Ok(_) => {
                    if tls == RouteTls::Acme {
                        self.acme_kick.notify_one();
                    }
                    return self.route_list().await;
                }
                Err((_, Rejection::WrongLastRevision { .. })) => continue,
                Err((_, r)) => return Err(internal(format!("the store rejected the route: {r}"))),
            }
        }
        Err(internal(
            "the route changed too often while adding it: try again",
        ))
    }

    pub(crate) async fn route_list(&self) -> Result<RouteList, ApiError> {
        self.store.require_network().await?;
        let mut routes = self.store.values::<RouteRecord>(BUCKET_ROUTES).await?;
        routes.sort_by(|a, b| (&a.host, &a.path).cmp(&(&b.host, &b.path)));
        let instances = self
            .store
            .values::<InstanceRecord>(BUCKET_INSTANCES)
            .await?;
        let certs = self.store.values::<CertRecord>(BUCKET_CERTIFICATES).await?;
        Ok(RouteList {
            routes: routes
                .into_iter()
                .map(|r| RouteView {
                    backends: instances
                        .iter()
                        .filter(|i| i.service == r.service && table::serves(i))
                        .count() as u32,
                    certificate_expires: match r.tls {
                        RouteTls::Off => None,
                        RouteTls::Acme => certs
                            .iter()
                            .find(|c| c.host == r.host)
                            .map(|c| rfc3339(c.not_after_ms)),
                    },
                    host: r.host,
                    path: r.path,
                    service: r.service,
                    port: r.port,
                    tls: r.tls,
                })
                .collect(),
        })
    }

    pub(crate) async fn route_rm(
        &self,
        host: &str,
        path: Option<&str>,
    ) -> Result<RouteList, ApiError> {
        let host = host_arg(host)?;
        let path = path.map(|p| path_arg(Some(p))).transpose()?;
        self.store.require_network().await?;
        let gone: Vec<_> = self
            .store
            .list::<RouteRecord>(BUCKET_ROUTES)
            .await?
            .into_iter()
            .filter(|v| v.value.host == host && path.as_ref().is_none_or(|p| *p == v.value.path))
            .collect();
        if gone.is_empty() {
            return Err(ApiError::new(
                ErrorCode::NotFound,
                format!(
                    "no route for {host}{}",
                    path.as_deref()
                        .map(|p| format!(" path {p}"))
                        .unwrap_or_default()
                ),
            )
            .with_hint("see ployzctl route ls"));
        }
        let ops = gone
            .iter()
            .map(|v| {
                store::delete(
                    BUCKET_ROUTES,
                    &RouteRecord::key(&v.value.host, &v.value.path),
                    Expect::Revision(v.revision),
                )
            })
            .collect();
        self.store.txn(ops).await?.map_err(|(_, r)| {
            refused(format!(
                "the routes of {host} changed meanwhile ({r}): try again"
            ))
        })?;
        self.route_list().await
    }

    pub(crate) async fn acme_set(
        &self,
        directory: Option<String>,
        email: &str,
        ca_pem: Option<String>,
        challenge: AcmeChallenge,
    ) -> Result<AcmeView, ApiError> {
        let directory = directory.unwrap_or_else(|| DEFAULT_ACME_DIRECTORY.to_string());
        if !directory.starts_with("https://") {
            return Err(
                invalid(format!("--directory `{directory}` is not an https:// URL"))
                    .with_hint("ACME directories are served over HTTPS"),
            );
        }
        let e = email.trim();
        if e.len() < 3 || !e.contains('@') || e.contains(char::is_whitespace) || e.contains(',') {
            return Err(invalid(format!(
                "--email `{email}` is not an email address"
            )));
        }
        if let Some(pem) = &ca_pem {
            super::acme::parse_roots(pem).map_err(|m| {
                invalid(format!("--ca-file: {m}"))
                    .with_hint("give the CA's root certificate(s) in PEM")
            })?;
        }
        self.store.require_network().await?;
        let rec = AcmeRecord {
            directory,
            email: e.to_string(),
            ca_pem,
            challenge,
            updated_at_ms: now_ms(),
        };
        let mut ops = store::records::ensure_bucket(BUCKET_ACME);
        ops.push(put(BUCKET_ACME, ACME_CONFIG_KEY, &rec, Expect::Any));
        self.store
            .txn(ops)
            .await?
            .map_err(|(_, r)| internal(format!("the store rejected the ACME settings: {r}")))?;
        self.acme_kick.notify_one();
        self.acme_show().await
    }

    pub(crate) async fn acme_show(&self) -> Result<AcmeView, ApiError> {
        self.store.require_network().await?;
        let cfg = self
            .store
            .get::<AcmeRecord>(BUCKET_ACME, ACME_CONFIG_KEY)
            .await?
            .map(|v| v.value);
        let mut certificates: Vec<CertView> = self
            .store
            .values::<CertRecord>(BUCKET_CERTIFICATES)
            .await?
            .into_iter()
            .filter(|c| c.host != ACME_ACCOUNT_KEY)
            .map(|c| CertView {
                not_after: rfc3339(c.not_after_ms),
                host: c.host,
            })
            .collect();
        certificates.sort_by(|a, b| a.host.cmp(&b.host));
        Ok(AcmeView {
            directory: cfg.as_ref().map(|c| c.directory.clone()),
            email: cfg.as_ref().map(|c| c.email.clone()),
            custom_ca: cfg.as_ref().is_some_and(|c| c.ca_pem.is_some()),
            challenge: cfg.as_ref().map(|c| c.challenge).unwrap_or_default(),
            certificates,
        })
    }
}
