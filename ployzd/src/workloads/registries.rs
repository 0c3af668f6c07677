//! Registries: `registry add/login/ls/rm` (records in the `registries`
//! bucket, which NATS never serves) and pulls for `deploy`.

use super::pulls::PullSource;
use super::Workloads;
use crate::errors::{internal, invalid, note, note_bytes, ProgressSink};
use crate::store::{self, put};
use ployz_api::*;
use ployz_consensus::Expect;
use ployz_runtime::image::{ImageInfo, ImageStore};
use ployz_runtime::registry::{self, Access, ImageRef, RegistryError};
use std::sync::atomic::Ordering;
use std::time::Duration;

/// Checks `host[:port]` as it appears in image references.
fn check_host(host: &str) -> Result<(), ApiError> {
    let ok = !host.is_empty()
        && host.len() <= 253
        && host
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b':'))
        && host.matches(':').count() <= 1
        && host
            .rsplit_once(':')
            .is_none_or(|(_, p)| p.parse::<u16>().is_ok());
    if ok {
        Ok(())
    } else {
        Err(invalid(format!(
            "`{host}` is not a registry host: use host or host:port (letters, digits, `.`, `-`)"
        )))
    }
}

/// The API error of a failed pull: unknown image and bad digests are the
/// user's to fix (exit 6), refused credentials exit 8, unreachable 7.
pub(super) fn pull_error(e: RegistryError) -> ApiError {
    let code = match &e {
        RegistryError::InvalidReference { .. }
        | RegistryError::NotFound { .. }
        | RegistryError::DigestMismatch { .. } => ErrorCode::InvalidArgument,
        RegistryError::Unauthorized { .. } => ErrorCode::PermissionDenied,
        RegistryError::Unreachable { .. } => ErrorCode::Unavailable,
        RegistryError::Protocol { .. } | RegistryError::Store(_) => ErrorCode::Internal,
    };
    ApiError::new(code, e.to_string())
}

impl Workloads {
    pub(crate) async fn registry_set(
        &self,
        host: &str,
        insecure: bool,
        username: Option<String>,
        password: Option<Secret>,
    ) -> Result<RegistryList, ApiError> {
        let password = password.map(|p| p.0);
        check_host(host)?;
        if username.is_some() != password.is_some() {
            return Err(invalid("give both a username and a password, or neither"));
        }
        let key = RegistryRecord::key(host);
        // `registry add` (no credentials) keeps those a login stored.
        let (username, password) = match (username, password) {
            (None, None) => self
                .store
                .get::<RegistryRecord>(BUCKET_REGISTRIES, &key)
                .await?
                .map_or((None, None), |v| (v.value.username, v.value.password)),
            given => given,
        };
        let rec = RegistryRecord {
            host: host.to_string(),
            insecure,
            username,
            password,
        };
        // Credentials are tried before they are stored: refused ones exit 8
        // and an unreachable registry 7, storing nothing.
        if rec.username.is_some() {
            registry::check_login(host, &access_of(&rec))
                .await
                .map_err(pull_error)?;
        }
        let mut ops = store::records::ensure_bucket(BUCKET_REGISTRIES);
        ops.push(put(BUCKET_REGISTRIES, &key, &rec, Expect::Any));
        self.store
            .txn(ops)
            .await?
            .map_err(|(_, r)| internal(format!("the store rejected the registry record: {r}")))?;
        self.registry_list().await
    }

    pub(crate) async fn registry_list(&self) -> Result<RegistryList, ApiError> {
        let mut registries: Vec<RegistryView> = self
            .store
            .values::<RegistryRecord>(BUCKET_REGISTRIES)
            .await?
            .into_iter()
            .map(|r| RegistryView {
                host: r.host,
                insecure: r.insecure,
                username: r.username,
            })
            .collect();
        registries.sort_by(|a, b| a.host.cmp(&b.host));
        Ok(RegistryList { registries })
    }

    pub(crate) async fn registry_rm(&self, host: &str) -> Result<RegistryList, ApiError> {
        check_host(host)?;
        let key = RegistryRecord::key(host);
        if self
            .store
            .get::<RegistryRecord>(BUCKET_REGISTRIES, &key)
            .await?
            .is_none()
        {
            return Err(ApiError::new(
                ErrorCode::NotFound,
                format!("no registry `{host}`: see ployzctl registry ls"),
            ));
        }
        self.store
            .txn(vec![store::delete(BUCKET_REGISTRIES, &key, Expect::Any)])
            .await?
            .map_err(|(_, r)| internal(format!("the store rejected the removal: {r}")))?;
        self.registry_list().await
    }

    /// How to reach `host`: its record, or HTTPS without credentials.
    async fn access(&self, host: &str) -> Result<Access, ApiError> {
        Ok(self
            .store
            .get::<RegistryRecord>(BUCKET_REGISTRIES, &RegistryRecord::key(host))
            .await?
            .map(|v| access_of(&v.value))
            .unwrap_or_default())
    }

    /// Pulls `reference` into this machine's image store (deploy's image
    /// step): the service record then pins the manifest digest and ships the
    /// archive like any stored image.
    /// `follow`: the deploy's operation id and replicas, to let the
    /// machines it will likely place instances on fetch the archive while
    /// it is written ([`super::prefetch`]).
    pub(super) async fn pull_image(
        &self,
        reference: &str,
        service: &str,
        sink: &ProgressSink,
        follow: Option<(&str, u32)>,
    ) -> Result<ServiceImage, ApiError> {
        let r = ImageRef::parse(reference).map_err(pull_error)?;
        let access = self.access(&r.host).await?;
        note(sink, service, "image", format!("pulling {}", r.canonical()));
        let store = self.image_store()?;
        let started = std::time::Instant::now();
        let progress = registry::PullProgress::default();
        // The host runtime runs the root filesystem: built on the way in.
        let unpack = self.cfg.runtime == ployz_runtime::RuntimeKind::Host;
        let pull = registry::pull(&store, &r, &access, &progress, unpack);
        tokio::pin!(pull);
        // Twice a second, how far the pull got (a bar on a terminal).
        let mut tick = tokio::time::interval(Duration::from_millis(500));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick.tick().await;
        let message = format!("pull {}", r.canonical());
        let pulling = async {
            loop {
                tokio::select! {
                    res = &mut pull => break res,
                    _ = tick.tick() => {
                        let total = progress.total.load(Ordering::Relaxed);
                        if total > 0 {
                            note_bytes(
                                sink,
                                service,
                                "image",
                                &message,
                                progress.done.load(Ordering::Relaxed),
                                Some(total),
                            );
                        }
                    }
                }
            }
        };
        let offer = async {
            if let Some((id, replicas)) = follow {
                self.offer_pull(id, service, replicas, progress.archive.subscribe())
                    .await;
            }
        };
        let (pulled, ()) = tokio::join!(pulling, offer);
        if let Some((id, _)) = follow {
            self.pull_ended(id);
        }
        let pulled = pulled.map_err(|e| {
            self.pulls.failed(PullSource::Registry);
            pull_error(e)
        })?;
        // A last report, whole: a pull quicker than one tick is still shown
        // as a transfer (one line with its size without a terminal).
        let total = progress.total.load(Ordering::Relaxed);
        if total > 0 {
            note_bytes(sink, service, "image", &message, total, Some(total));
        }
        self.pulls.succeeded(
            PullSource::Registry,
            pulled.fetched_bytes,
            started.elapsed(),
        );
        tracing::info!(
            digest = %pulled.info.digest,
            registry = %r.host,
            bytes = pulled.fetched_bytes,
            fetch_ms = pulled.fetch_time.as_millis() as u64,
            store_ms = pulled.store_time.as_millis() as u64,
            unpacked = pulled.unpacked,
            "image pulled from its registry"
        );
        note(
            sink,
            service,
            "image",
            format!(
                "pulled {} ({} bytes from {}), stored {}",
                pulled.pinned.canonical(),
                pulled.fetched_bytes,
                r.host,
                pulled.info.digest
            ),
        );
        let mut image = super::deploy::shipped_image(
            &pulled.pinned.canonical(),
            &pulled.info,
            self.machine_id(),
        );
        image.manifest_digest = Some(pulled.manifest_digest);
        Ok(image)
    }

    /// Pulls a service's pinned registry image on this machine (when no peer
    /// could serve it) and checks that it is the archive `digest`.
    pub(super) async fn pull_pinned(
        &self,
        store: &ImageStore,
        svc: &ServiceRecord,
        digest: &str,
    ) -> Result<ImageInfo, ApiError> {
        let r = ImageRef::parse(&svc.image.reference).map_err(pull_error)?;
        if r.digest.is_none() {
            return Err(internal(format!(
                "`{}` is not pinned to a digest",
                svc.image.reference
            )));
        }
        let access = self.access(&r.host).await?;
        let started = std::time::Instant::now();
        let progress = registry::PullProgress::default();
        let unpack = self.cfg.runtime == ployz_runtime::RuntimeKind::Host;
        let pulled = registry::pull(store, &r, &access, &progress, unpack)
            .await
            .map_err(|e| {
                self.pulls.failed(PullSource::Registry);
                pull_error(e)
            })?;
        if pulled.info.digest != digest {
            self.pulls.failed(PullSource::Registry);
            return Err(pull_error(RegistryError::DigestMismatch {
                host: r.host.clone(),
                what: format!("the image archive of {}", r.canonical()),
                why: format!("packed {}, the service runs {digest}", pulled.info.digest),
            }));
        }
        self.pulls.succeeded(
            PullSource::Registry,
            pulled.fetched_bytes,
            started.elapsed(),
        );
        tracing::info!(
            %digest,
            registry = %r.host,
            bytes = pulled.fetched_bytes,
            "image fetched from its registry (no peer had it)"
        );
        Ok(pulled.info)
    }
}

fn access_of(r: &RegistryRecord) -> Access {
    Access {
        insecure: r.insecure,
        credentials: r.username.clone().zip(r.password.clone()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn registry_hosts() {
        for ok in ["reg.example", "127.0.0.1:5000", "localhost", "a-b.c:443"] {
            assert!(check_host(ok).is_ok(), "{ok}");
        }
        for bad in ["", "h/x", "h:port", "h:1:2", "h:70000", "a b"] {
            assert!(check_host(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn registry_errors_map_to_exit_codes() {
        let nf = RegistryError::NotFound {
            reference: "r".into(),
            host: "h".into(),
            message: "manifest unknown".into(),
        };
        assert_eq!(pull_error(nf).code.exit_code(), 6);
        let un = RegistryError::Unreachable {
            host: "h".into(),
            address: "http://h/v2/".into(),
            why: "refused".into(),
        };
        let e = pull_error(un);
        assert_eq!(e.code.exit_code(), 7);
        assert!(e.message.contains("http://h/v2/"));
    }
}
