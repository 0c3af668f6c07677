//! Typed access to the replicated store: JSON records in KV buckets, with
//! store failures turned into API errors that say what to do.

use ployz_api::{ApiError, ErrorCode};
use ployz_consensus::kv::{BucketConfig, Entry, Expect, Op, Rejection, Txn, TxnResult};
use ployz_consensus::{Node, ReadError, WriteError};
use serde::de::DeserializeOwned;
use serde::Serialize;

/// A decoded record and the revision it was read at (for compare-and-set).
#[derive(Debug, Clone)]
pub struct Versioned<T> {
    pub value: T,
    pub revision: u64,
}

pub struct Store {
    node: Node,
}

/// Buckets the control plane uses, with how much history each keeps.
pub const BUCKETS: &[(&str, u8)] = &[
    (ployz_api::BUCKET_NETWORK, 5),
    (ployz_api::BUCKET_MACHINES, 5),
    (ployz_api::BUCKET_SUBNETS, 1),
    (ployz_api::BUCKET_INVITES, 1),
    (ployz_api::BUCKET_INSTANCES, 1),
];

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

fn decode<T: DeserializeOwned>(e: &Entry) -> Result<Versioned<T>, ApiError> {
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
    .with_hint("check `ployzctl mesh status` on the storage machines; a majority of them must be up and reachable")
}

fn map_read(e: ReadError) -> ApiError {
    match e {
        ReadError::NotInitialized => no_network(),
        other => unavailable(other),
    }
}

fn map_write(e: WriteError) -> ApiError {
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

pub fn no_network() -> ApiError {
    ApiError::new(ErrorCode::NoNetwork, "this machine is not part of a network yet")
        .with_hint("create one with `ployzctl mesh init <network>`, or join one with `ployzctl machine invite import --token <token>`")
}

impl Store {
    pub fn new(node: Node) -> Store {
        Store { node }
    }

    pub fn node(&self) -> &Node {
        &self.node
    }

    pub async fn get<T: DeserializeOwned>(
        &self,
        bucket: &str,
        key: &str,
    ) -> Result<Option<Versioned<T>>, ApiError> {
        match self.node.get(bucket, key).await.map_err(map_read)? {
            Some(e) if e.is_live() => decode(&e).map(Some),
            _ => Ok(None),
        }
    }

    pub async fn list<T: DeserializeOwned>(
        &self,
        bucket: &str,
    ) -> Result<Vec<Versioned<T>>, ApiError> {
        self.node
            .list(bucket)
            .await
            .map_err(map_read)?
            .iter()
            .map(decode)
            .collect()
    }

    /// Apply `ops` atomically. `Ok(Err(..))` is a replicated rejection: the
    /// store is fine, a precondition did not hold, nothing changed.
    pub async fn txn(
        &self,
        ops: Vec<Op>,
    ) -> Result<Result<Vec<u64>, (usize, Rejection)>, ApiError> {
        let txn = Txn {
            ops,
            now_ms: ployz_api::time::now_ms(),
        };
        match self.node.write(txn).await.map_err(map_write)? {
            TxnResult::Applied { revisions } => Ok(Ok(revisions)),
            TxnResult::Rejected { op_index, reason } => Ok(Err((op_index, reason))),
        }
    }
}
