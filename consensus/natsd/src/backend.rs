//! The seam between the JetStream KV facade and the replicated store.
//!
//! [`KvBackend`] is what the server needs from the store. `ployz_consensus::Node` implements it
//! directly (a storage machine); ployzd supplies another implementation on machines that forward
//! to a remote storage machine.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use ployz_consensus::{BucketInfo, Entry, KvEvent, Node, ReadError, Txn, TxnResult, WriteError};
use tokio::sync::broadcast;

/// A store operation failed for a reason other than a KV rule (those are
/// [`TxnResult::Rejected`]). The JetStream facade answers with a 503 JetStream error.
#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    /// The bucket does not exist (reads only).
    #[error("no such bucket: {0}")]
    NoSuchBucket(String),
    /// The store cannot serve the request now (no leader, no quorum, timeout, not
    /// initialized, remote storage machine unreachable...). The text says why.
    #[error("store unavailable: {0}")]
    Unavailable(String),
}

/// The replicated KV store as the JetStream facade uses it. All reads must be linearizable
/// (they follow every write acknowledged before they started), and `write` must return only
/// once the transaction is durable.
pub trait KvBackend: Send + Sync + 'static {
    /// Applies a transaction all-or-nothing.
    fn write(&self, txn: Txn) -> impl Future<Output = Result<TxnResult, BackendError>> + Send;
    /// Latest entry of a key (a tombstone if deleted last); `NoSuchBucket` if no bucket.
    fn get(
        &self,
        bucket: &str,
        key: &str,
    ) -> impl Future<Output = Result<Option<Entry>, BackendError>> + Send;
    /// Stored entries of a key, oldest first.
    fn history(
        &self,
        bucket: &str,
        key: &str,
    ) -> impl Future<Output = Result<Vec<Entry>, BackendError>> + Send;
    /// Latest entry of every key, tombstones included, read atomically.
    fn list_all(
        &self,
        bucket: &str,
    ) -> impl Future<Output = Result<Vec<Entry>, BackendError>> + Send;
    /// Bucket statistics; `None` if it does not exist.
    fn bucket(
        &self,
        bucket: &str,
    ) -> impl Future<Output = Result<Option<BucketInfo>, BackendError>> + Send;
    /// Names of all buckets (may be served from local state).
    fn buckets(&self) -> impl Future<Output = Result<Vec<String>, BackendError>> + Send;
    /// Changes applied from now on, in revision order per bucket.
    fn subscribe(&self) -> broadcast::Receiver<KvEvent>;
}

fn read_err(e: ReadError) -> BackendError {
    match e {
        ReadError::NoSuchBucket { bucket } => BackendError::NoSuchBucket(bucket),
        other => BackendError::Unavailable(other.to_string()),
    }
}

fn write_err(e: WriteError) -> BackendError {
    BackendError::Unavailable(e.to_string())
}

impl KvBackend for Node {
    async fn write(&self, txn: Txn) -> Result<TxnResult, BackendError> {
        Node::write(self, txn).await.map_err(write_err)
    }
    async fn get(&self, bucket: &str, key: &str) -> Result<Option<Entry>, BackendError> {
        Node::get(self, bucket, key).await.map_err(read_err)
    }
    async fn history(&self, bucket: &str, key: &str) -> Result<Vec<Entry>, BackendError> {
        Node::history(self, bucket, key).await.map_err(read_err)
    }
    async fn list_all(&self, bucket: &str) -> Result<Vec<Entry>, BackendError> {
        Node::list_all(self, bucket).await.map_err(read_err)
    }
    async fn bucket(&self, bucket: &str) -> Result<Option<BucketInfo>, BackendError> {
        Node::bucket(self, bucket).await.map_err(read_err)
    }
    async fn buckets(&self) -> Result<Vec<String>, BackendError> {
        self.buckets_local().map_err(read_err)
    }
    fn subscribe(&self) -> broadcast::Receiver<KvEvent> {
        Node::subscribe(self)
    }
}

impl<T: KvBackend> KvBackend for Arc<T> {
    fn write(&self, txn: Txn) -> impl Future<Output = Result<TxnResult, BackendError>> + Send {
        (**self).write(txn)
    }
    fn get(
        &self,
        bucket: &str,
        key: &str,
    ) -> impl Future<Output = Result<Option<Entry>, BackendError>> + Send {
        (**self).get(bucket, key)
    }
    fn history(
        &self,
        bucket: &str,
        key: &str,
    ) -> impl Future<Output = Result<Vec<Entry>, BackendError>> + Send {
        (**self).history(bucket, key)
    }
    fn list_all(
        &self,
        bucket: &str,
    ) -> impl Future<Output = Result<Vec<Entry>, BackendError>> + Send {
        (**self).list_all(bucket)
    }
    fn bucket(
        &self,
        bucket: &str,
    ) -> impl Future<Output = Result<Option<BucketInfo>, BackendError>> + Send {
        (**self).bucket(bucket)
    }
    fn buckets(&self) -> impl Future<Output = Result<Vec<String>, BackendError>> + Send {
        (**self).buckets()
    }
    fn subscribe(&self) -> broadcast::Receiver<KvEvent> {
        (**self).subscribe()
    }
}

type BoxFut<'a, T> = Pin<Box<dyn Future<Output = Result<T, BackendError>> + Send + 'a>>;

/// Object-safe form of [`KvBackend`], so the server is not generic.
pub(crate) trait DynBackend: Send + Sync + 'static {
    fn write(&self, txn: Txn) -> BoxFut<'_, TxnResult>;
    fn get<'a>(&'a self, bucket: &'a str, key: &'a str) -> BoxFut<'a, Option<Entry>>;
    fn history<'a>(&'a self, bucket: &'a str, key: &'a str) -> BoxFut<'a, Vec<Entry>>;
    fn list_all<'a>(&'a self, bucket: &'a str) -> BoxFut<'a, Vec<Entry>>;
    fn bucket<'a>(&'a self, bucket: &'a str) -> BoxFut<'a, Option<BucketInfo>>;
    fn buckets(&self) -> BoxFut<'_, Vec<String>>;
    fn subscribe(&self) -> broadcast::Receiver<KvEvent>;
}

impl<T: KvBackend> DynBackend for T {
    fn write(&self, txn: Txn) -> BoxFut<'_, TxnResult> {
        Box::pin(KvBackend::write(self, txn))
    }
    fn get<'a>(&'a self, bucket: &'a str, key: &'a str) -> BoxFut<'a, Option<Entry>> {
        Box::pin(KvBackend::get(self, bucket, key))
    }
    fn history<'a>(&'a self, bucket: &'a str, key: &'a str) -> BoxFut<'a, Vec<Entry>> {
        Box::pin(KvBackend::history(self, bucket, key))
    }
    fn list_all<'a>(&'a self, bucket: &'a str) -> BoxFut<'a, Vec<Entry>> {
        Box::pin(KvBackend::list_all(self, bucket))
    }
    fn bucket<'a>(&'a self, bucket: &'a str) -> BoxFut<'a, Option<BucketInfo>> {
        Box::pin(KvBackend::bucket(self, bucket))
    }
    fn buckets(&self) -> BoxFut<'_, Vec<String>> {
        Box::pin(KvBackend::buckets(self))
    }
    fn subscribe(&self) -> broadcast::Receiver<KvEvent> {
        KvBackend::subscribe(self)
    }
}
