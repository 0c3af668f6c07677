//! Records in the replicated store: JSON documents in KV buckets, and store
//! failures turned into API errors that say what to do.

use ployz_api::{ApiError, ErrorCode};
use ployz_consensus::{BucketConfig, Entry, Expect, Op, ReadError, WriteError};
use serde::de::DeserializeOwned;
use serde::Serialize;

/// A decoded record and the revision it was read at (for compare-and-set).
#[derive(Debug, Clone)]
pub struct Versioned<T> {
    pub value: T,
    pub revision: u64,
}

/// Buckets the control plane uses, with how much history each keeps.
pub const BUCKETS: &[(&str, u8)] = &[
    (ployz_api::BUCKET_NETWORK, 5),
    (ployz_api::BUCKET_MACHINES, 5),
    (ployz_api::BUCKET_SUBNETS, 1),
    (ployz_api::BUCKET_INVITES, 1),
    (ployz_api::BUCKET_INSTANCES, 1),
    (ployz_api::BUCKET_SERVICES, 5),
    (ployz_api::BUCKET_OPERATIONS, 1),
    // One revision: a replaced password is not kept in history.
    (ployz_api::BUCKET_REGISTRIES, 1),
    // NATS app users (salts, grants): one revision.
    (ployz_api::BUCKET_NATS_USERS, 1),
    // The NATS CA (cert and key): one revision.
    (ployz_api::BUCKET_PKI, 1),
    // The gateway (issue 14): routes, ACME settings + lease, pending
    // challenges, and certificates with their keys (one revision: a
    // replaced key is not kept; never served over NATS).
    (ployz_api::BUCKET_ROUTES, 5),
    (ployz_api::BUCKET_ACME, 1),
    (ployz_api::BUCKET_ACME_CHALLENGES, 1),
    (ployz_api::BUCKET_CERTIFICATES, 1),
    // Host-port claims, written with the service records (issue 14).
    (ployz_api::ports::BUCKET_PORT_CLAIMS, 1),
];

/// Ops creating one control-plane bucket (idempotent), for writes to a
/// bucket a network founded by an older version may not have yet.
pub fn ensure_bucket(name: &str) -> Vec<Op> {
    create_buckets()
        .into_iter()
        .filter(|op| matches!(op, Op::CreateBucket { bucket, .. } if bucket == name))
        .collect()
}

pub fn create_buckets() -> Vec<Op> {
    BUCKETS
        .iter()
        .map(|(name, history)| Op::CreateBucket {
            bucket: (*name).to_string(),
            config: BucketConfig {
                history: *history,
                ..BucketConfig::default()
            },
        })
        .collect()
}

pub fn put<T: Serialize>(bucket: &str, key: &str, value: &T, expect: Expect) -> Op {
    Op::Put {
        bucket: bucket.to_string(),
        key: key.to_string(),
        value: serde_json::to_vec(value).expect("records serialise"),
        expect,
    }
}

pub fn delete(bucket: &str, key: &str, expect: Expect) -> Op {
    Op::Delete {
        bucket: bucket.to_string(),
        key: key.to_string(),
        expect,
        purge: true,
    }
}

pub fn decode<T: DeserializeOwned>(e: &Entry) -> Result<Versioned<T>, ApiError> {
    serde_json::from_slice(&e.value)
        .map(|value| Versioned {
            value,
            revision: e.revision,
        })
        .map_err(|err| {
            ApiError::new(
                ErrorCode::Internal,
                format!(
                    "record {}/{} at revision {} does not decode: {err}",
                    e.bucket, e.key, e.revision
                ),
            )
        })
}

pub fn unavailable(what: impl std::fmt::Display) -> ApiError {
    ApiError::new(
        ErrorCode::Unavailable,
        format!("the cluster store cannot serve this request: {what}"),
    )
    .with_hint("a majority of the storage machines must be up and reachable; check `ployzctl machine ls` and `ployzctl mesh status` on them")
}

pub fn no_network() -> ApiError {
    ApiError::new(ErrorCode::NoNetwork, "this machine is not part of a network yet")
        .with_hint("create one with `ployzctl mesh init <network>`, or join one with `ployzctl machine invite import --token <token>`")
}

pub(crate) fn map_read(e: ReadError) -> ApiError {
    match e {
        ReadError::NotInitialized => no_network(),
        other => unavailable(other),
    }
}

pub(crate) fn map_write(e: WriteError) -> ApiError {
    match e {
        WriteError::NotInitialized => no_network(),
        WriteError::Fatal(f) => ApiError::new(
            ErrorCode::Internal,
            format!("the store stopped after a fatal error: {f}"),
        )
        .with_hint("see the ployzd log; restart ployzd"),
        other => unavailable(other),
    }
}
