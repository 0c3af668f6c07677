//! JetStream KV facade over a [`crate::KvBackend`].
//!
//! Each bucket `b` is presented as stream `KV_b` with subjects `$KV.b.>`; its revisions are the
//! stream sequence. Supported API (what async-nats' `jetstream::kv` uses):
//!
//! * `$JS.API.INFO`, `STREAM.CREATE|INFO|DELETE.KV_<b>`, `STREAM.NAMES`, `STREAM.LIST`;
//! * publishes to `$KV.<b>.<key>` (put; `KV-Operation: DEL|PURGE`; CAS with
//!   `Nats-Expected-Last-Subject-Sequence`), acknowledged with a PubAck when a reply is set;
//! * `DIRECT.GET.KV_<b>[.<subject>]` and `STREAM.MSG.GET.KV_<b>`;
//! * `CONSUMER.CREATE|INFO|DELETE`: ephemeral push consumers (ordered consumers) with idle
//!   heartbeats and flow control, fed from the backend's change stream.
//!
//! Handling is local to the server the client is connected to (never forwarded over routes).
//! Writes (`$KV.*`, stream create/delete) are executed one at a time in arrival order, each
//! acknowledged only after [`crate::KvBackend::write`] returned (durable, linearizable).

mod consumer;
pub(crate) mod wire;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::Duration;

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use ployz_consensus::{BucketConfig, Entry, Expect, Op, Rejection, Txn, TxnResult};
use serde_json::{json, Value};
use tokio::sync::{mpsc, oneshot, Notify};

use crate::backend::{BackendError, DynBackend};
use crate::server::{lock, Shared};
use consumer::ConsumerCtl;
use wire::{ApiError, Headers};

/// A message published by a local client to a JetStream subject.
pub(crate) struct InMsg {
    pub subject: String,
    pub reply: Option<String>,
    pub headers: Option<Vec<u8>>,
    pub payload: Vec<u8>,
}

pub(crate) fn is_js_subject(subject: &str) -> bool {
    subject.starts_with("$JS.API.")
        || subject.starts_with("$KV.")
        || subject.starts_with("$JS.FC.")
        || subject.starts_with("$JS.ACK.")
}

fn is_write(subject: &str) -> bool {
    subject.starts_with("$KV.")
        || subject.starts_with("$JS.API.STREAM.CREATE.")
        || subject.starts_with("$JS.API.STREAM.DELETE.")
}

/// Pending writes per lane before a publisher is told to back off.
const WRITE_QUEUE: usize = 1024;
/// Write lanes: writes to one subject (one key) stay in order on one lane; lanes run
/// concurrently, so the store can commit many clients' writes in one group.
const WRITE_LANES: usize = 256;

pub(crate) struct JetStream {
    backend: Arc<dyn DynBackend>,
    writers: OnceLock<Vec<mpsc::Sender<InMsg>>>,
    consumers: Mutex<HashMap<(String, String), Arc<ConsumerCtl>>>,
    flow: Mutex<HashMap<String, oneshot::Sender<()>>>,
    interest: Notify,
    api_total: AtomicU64,
    api_errors: AtomicU64,
}

impl JetStream {
    pub(crate) fn new(backend: Arc<dyn DynBackend>) -> Self {
        JetStream {
            backend,
            writers: OnceLock::new(),
            consumers: Mutex::new(HashMap::new()),
            flow: Mutex::new(HashMap::new()),
            interest: Notify::new(),
            api_total: AtomicU64::new(0),
            api_errors: AtomicU64::new(0),
        }
    }

    pub(crate) fn consumer_count(&self) -> usize {
        lock(&self.consumers).len()
    }

    pub(crate) fn interest_changed(&self) {
        self.interest.notify_waiters();
    }

    pub(crate) fn client_gone(&self, _cid: u64) {
        // Consumers follow interest in their deliver subject, which the router just dropped.
        self.interest_changed();
    }

    /// Takes a message a local client published to a JetStream subject.
    pub(crate) fn submit(&self, shared: &Arc<Shared>, msg: InMsg) {
        if msg.subject.starts_with("$JS.FC.") {
            if let Some(tx) = lock(&self.flow).remove(&msg.subject) {
                let _ = tx.send(());
            }
            return;
        }
        if msg.subject.starts_with("$JS.ACK.") {
            // Ordered consumers use AckPolicy::None; acks are ignored.
            return;
        }
        if is_write(&msg.subject) {
            let lanes = self.writers.get_or_init(|| {
                (0..WRITE_LANES)
                    .map(|_| {
                        let (tx, rx) = mpsc::channel(WRITE_QUEUE);
                        tokio::spawn(write_worker(Arc::downgrade(shared), rx));
                        tx
                    })
                    .collect()
            });
            let tx = &lanes[lane_of(&msg.subject)];
            if let Err(mpsc::error::TrySendError::Full(m) | mpsc::error::TrySendError::Closed(m)) =
                tx.try_send(msg)
            {
                let err = ApiError::unavailable("too many pending writes");
                reply(shared, m.reply.as_deref(), &err.to_json("pub_ack_response"));
            }
            return;
        }
        let shared = shared.clone();
        tokio::spawn(async move {
            if let Some(js) = &shared.js {
                js.handle_api(&shared, msg).await;
            }
        });
    }

    async fn handle_write(&self, shared: &Arc<Shared>, m: InMsg) {
        let (kind, res) = if let Some(rest) = m.subject.strip_prefix("$KV.") {
            ("pub_ack_response", self.kv_publish(rest, &m).await)
        } else if let Some(name) = m.subject.strip_prefix("$JS.API.STREAM.CREATE.") {
            self.count_api();
            (
                "stream_create_response",
                self.stream_create(shared, name, &m.payload).await,
            )
        } else if let Some(name) = m.subject.strip_prefix("$JS.API.STREAM.DELETE.") {
            self.count_api();
            ("stream_delete_response", self.stream_delete(name).await)
        } else {
            return;
        };
        self.finish(shared, m.reply.as_deref(), kind, res);
    }

    fn count_api(&self) {
        self.api_total.fetch_add(1, Ordering::Relaxed);
    }

    fn finish(
        &self,
        shared: &Shared,
        reply_to: Option<&str>,
        kind: &str,
        res: Result<Reply, ApiError>,
    ) {
        let Some(to) = reply_to else {
            return;
        };
        match res {
            Ok(Reply::Json(body)) => {
                reply(shared, Some(to), &body);
            }
            Ok(Reply::Status(status)) => {
                let h = wire::header_block(Some(status), &[]);
                shared.publish_internal(to, None, Some(&h), b"");
            }
            Ok(Reply::Msg { headers, payload }) => {
                shared.publish_internal(to, None, Some(&headers), &payload);
            }
            Err(e) => {
                self.api_errors.fetch_add(1, Ordering::Relaxed);
                reply(shared, Some(to), &e.to_json(kind));
            }
        }
    }

    async fn kv_publish(&self, rest: &str, m: &InMsg) -> Result<Reply, ApiError> {
        let Some((bucket, key)) = rest.split_once('.') else {
            return Ok(Reply::Status("503"));
        };
        let h = Headers::parse(m.headers.as_deref());
        let expect = match h.get("Nats-Expected-Last-Subject-Sequence") {
            Some(v) => Expect::Revision(
                v.parse()
                    .map_err(|_| ApiError::bad_request(format!("bad expected sequence {v:?}")))?,
            ),
            None => Expect::Any,
        };
        if h.get("Nats-Expected-Last-Sequence").is_some()
            || h.get("Nats-Expected-Last-Msg-Id").is_some()
            || h.get("Nats-TTL").is_some()
        {
            return Err(ApiError::bad_request(
                "ployzd KV supports only the Nats-Expected-Last-Subject-Sequence precondition and no per-message TTL",
            ));
        }
        let op = match h.get("KV-Operation") {
            None | Some("PUT") => Op::put_expect(bucket, key, m.payload.clone(), expect),
            Some(o @ ("DEL" | "PURGE")) => Op::Delete {
                bucket: bucket.to_string(),
                key: key.to_string(),
                expect,
                purge: o == "PURGE",
            },
            Some(other) => {
                return Err(ApiError::bad_request(format!(
                    "unknown KV-Operation {other:?}"
                )))
            }
        };
        match self.backend.write(Txn::now(vec![op])).await {
            Ok(TxnResult::Applied { revisions }) => {
                let seq = revisions.first().copied().unwrap_or(0);
                Ok(Reply::Json(
                    json!({"stream": wire::stream_name(bucket), "seq": seq})
                        .to_string()
                        .into_bytes(),
                ))
            }
            Ok(TxnResult::Rejected { reason, .. }) => match reason {
                // No stream listens on this subject: like nats-server, no responders.
                Rejection::NoSuchBucket => Ok(Reply::Status("503")),
                Rejection::WrongLastRevision { current, .. } => Err(ApiError::new(
                    400,
                    10071,
                    format!("wrong last sequence: {current}"),
                )),
                Rejection::KeyExists { revision } => Err(ApiError::new(
                    400,
                    10071,
                    format!("wrong last sequence: {revision}"),
                )),
                Rejection::ValueTooLarge { .. } => Err(ApiError::new(
                    400,
                    10054,
                    "message size exceeds maximum allowed",
                )),
                other => Err(ApiError::bad_request(other)),
            },
            Err(e) => Err(ApiError::unavailable(e)),
        }
    }

    async fn stream_create(
        &self,
        shared: &Shared,
        name: &str,
        body: &[u8],
    ) -> Result<Reply, ApiError> {
        let cfg: Value = serde_json::from_slice(body).map_err(ApiError::bad_request)?;
        let bucket = bucket_of(name).ok_or_else(|| {
            ApiError::invalid_config("ployzd serves only KV streams (named KV_<bucket>)")
        })?;
        if cfg.get("name").and_then(Value::as_str) != Some(name) {
            return Err(ApiError::new(
                400,
                10056,
                "stream name in subject does not match request",
            ));
        }
        let want_subjects = json!([format!("$KV.{bucket}.>")]);
        if cfg.get("subjects") != Some(&want_subjects) {
            return Err(ApiError::invalid_config(format!(
                "subjects must be [\"$KV.{bucket}.>\"]"
            )));
        }
        for field in ["mirror", "sources"] {
            if cfg.get(field).is_some_and(|v| !v.is_null()) {
                return Err(ApiError::invalid_config(format!(
                    "{field} is not supported"
                )));
            }
        }
        for field in ["max_age", "max_bytes", "max_msgs"] {
            if cfg
                .get(field)
                .and_then(Value::as_i64)
                .is_some_and(|v| v > 0)
            {
                return Err(ApiError::invalid_config(format!(
                    "{field} limits are not supported by ployzd KV"
                )));
            }
        }
        let history = cfg
            .get("max_msgs_per_subject")
            .and_then(Value::as_i64)
            .unwrap_or(1)
            .max(1);
        let history = u8::try_from(history)
            .map_err(|_| ApiError::invalid_config(format!("history {history} is too large")))?;
        let max_value_size = cfg
            .get("max_msg_size")
            .and_then(Value::as_i64)
            .filter(|v| *v > 0)
            .map(|v| u32::try_from(v).unwrap_or(u32::MAX));
        let config = BucketConfig {
            history,
            max_value_size,
        };
        match self
            .backend
            .write(Txn::now(vec![Op::create_bucket(bucket, config)]))
            .await
        {
            Ok(TxnResult::Applied { .. }) => {}
            Ok(TxnResult::Rejected { reason, .. }) => {
                return Err(match reason {
                    Rejection::BucketConfigMismatch { .. } => ApiError::new(
                        400,
                        10058,
                        "stream name already in use with a different configuration",
                    ),
                    other => ApiError::invalid_config(other),
                })
            }
            Err(e) => return Err(ApiError::unavailable(e)),
        }
        self.stream_info(shared, name, "stream_create_response")
            .await
    }

    async fn stream_info(
        &self,
        shared: &Shared,
        name: &str,
        kind: &str,
    ) -> Result<Reply, ApiError> {
        let bucket = bucket_of(name).ok_or_else(ApiError::stream_not_found)?;
        let info = self
            .backend
            .bucket(bucket)
            .await
            .map_err(backend_err)?
            .ok_or_else(ApiError::stream_not_found)?;
        let consumers = self.consumers_of(name);
        Ok(Reply::Json(wire::stream_info(
            kind,
            &info,
            consumers,
            &shared.cfg.server_name,
        )))
    }

    fn consumers_of(&self, stream: &str) -> usize {
        lock(&self.consumers)
            .keys()
            .filter(|(s, _)| s == stream)
            .count()
    }

    async fn stream_delete(&self, name: &str) -> Result<Reply, ApiError> {
        let bucket = bucket_of(name).ok_or_else(ApiError::stream_not_found)?;
        if self
            .backend
            .bucket(bucket)
            .await
            .map_err(backend_err)?
            .is_none()
        {
            return Err(ApiError::stream_not_found());
        }
        match self
            .backend
            .write(Txn::now(vec![Op::delete_bucket(bucket)]))
            .await
        {
            Ok(TxnResult::Applied { .. }) => {}
            Ok(TxnResult::Rejected {
                reason: Rejection::NoSuchBucket,
                ..
            }) => return Err(ApiError::stream_not_found()),
            Ok(TxnResult::Rejected { reason, .. }) => return Err(ApiError::bad_request(reason)),
            Err(e) => return Err(ApiError::unavailable(e)),
        }
        let gone: Vec<Arc<ConsumerCtl>> = lock(&self.consumers)
            .iter()
            .filter(|((s, _), _)| s == name)
            .map(|(_, c)| c.clone())
            .collect();
        for c in gone {
            c.stop();
        }
        Ok(Reply::Json(
            json!({"type": "io.nats.jetstream.api.v1.stream_delete_response", "success": true})
                .to_string()
                .into_bytes(),
        ))
    }

    async fn handle_api(&self, shared: &Arc<Shared>, m: InMsg) {
        let Some(api) = m.subject.strip_prefix("$JS.API.") else {
            return;
        };
        self.count_api();
        let (kind, res): (&str, Result<Reply, ApiError>) = if api == "INFO" {
            ("account_info_response", self.account_info().await)
        } else if let Some(name) = api.strip_prefix("STREAM.INFO.") {
            (
                "stream_info_response",
                self.stream_info(shared, name, "stream_info_response").await,
            )
        } else if api == "STREAM.NAMES" {
            (
                "stream_names_response",
                self.stream_names(false, shared).await,
            )
        } else if api == "STREAM.LIST" {
            (
                "stream_list_response",
                self.stream_names(true, shared).await,
            )
        } else if let Some(rest) = api.strip_prefix("DIRECT.GET.") {
            ("direct_get", self.direct_get(rest, &m.payload).await)
        } else if let Some(name) = api.strip_prefix("STREAM.MSG.GET.") {
            (
                "stream_msg_get_response",
                self.msg_get(name, &m.payload).await,
            )
        } else if let Some(rest) = api
            .strip_prefix("CONSUMER.CREATE.")
            .or_else(|| api.strip_prefix("CONSUMER.DURABLE.CREATE."))
        {
            (
                "consumer_create_response",
                self.consumer_create(shared, rest, &m.payload).await,
            )
        } else if let Some(rest) = api.strip_prefix("CONSUMER.INFO.") {
            ("consumer_info_response", self.consumer_info(rest))
        } else if let Some(rest) = api.strip_prefix("CONSUMER.DELETE.") {
            ("consumer_delete_response", self.consumer_delete(rest))
        } else {
            (
                "error_response",
                Err(ApiError::bad_request(format!(
                    "ployzd does not implement JetStream API {api}"
                ))),
            )
        };
        self.finish(shared, m.reply.as_deref(), kind, res);
    }

    async fn account_info(&self) -> Result<Reply, ApiError> {
        let streams = self.backend.buckets().await.map_err(backend_err)?.len();
        let body = json!({
            "type": "io.nats.jetstream.api.v1.account_info_response",
            "memory": 0,
            "storage": 0,
            "reserved_memory": 0,
            "reserved_storage": 0,
            "streams": streams,
            "consumers": self.consumer_count(),
            "limits": {
                "max_memory": -1,
                "max_storage": -1,
                "max_streams": -1,
                "max_consumers": -1,
                "max_ack_pending": -1,
                "memory_max_stream_bytes": -1,
                "storage_max_stream_bytes": -1,
                "max_bytes_required": false,
            },
            "api": {
                "level": 0,
                "total": self.api_total.load(Ordering::Relaxed),
                "errors": self.api_errors.load(Ordering::Relaxed),
            },
        });
        Ok(Reply::Json(body.to_string().into_bytes()))
    }

    async fn stream_names(&self, full: bool, shared: &Shared) -> Result<Reply, ApiError> {
        let buckets = self.backend.buckets().await.map_err(backend_err)?;
        let total = buckets.len();
        let body = if full {
            let mut infos = Vec::new();
            for b in &buckets {
                if let Some(info) = self.backend.bucket(b).await.map_err(backend_err)? {
                    let one = wire::stream_info(
                        "stream_info_response",
                        &info,
                        self.consumers_of(&wire::stream_name(b)),
                        &shared.cfg.server_name,
                    );
                    infos.push(serde_json::from_slice::<Value>(&one).unwrap_or(Value::Null));
                }
            }
            json!({"type": "io.nats.jetstream.api.v1.stream_list_response",
                   "total": total, "offset": 0, "limit": total.max(1), "streams": infos})
        } else {
            let names: Vec<String> = buckets.iter().map(|b| wire::stream_name(b)).collect();
            json!({"type": "io.nats.jetstream.api.v1.stream_names_response",
                   "total": total, "offset": 0, "limit": total.max(1), "streams": names})
        };
        Ok(Reply::Json(body.to_string().into_bytes()))
    }

    /// Finds the stored entry for a request (`seq`, `last_by_subj`, `next_by_subj`).
    async fn lookup(&self, bucket: &str, req: &MsgRequest) -> Result<Option<Entry>, BackendError> {
        let prefix = format!("$KV.{bucket}.");
        if let Some(subj) = &req.last_by_subj {
            let Some(key) = subj.strip_prefix(&prefix) else {
                return Ok(None);
            };
            if ployz_consensus::kv::validate_key(key).is_err() {
                return Ok(None);
            }
            return self.backend.get(bucket, key).await;
        }
        let seq = req.seq.unwrap_or(0);
        let filter = req.next_by_subj.as_deref().unwrap_or(">");
        let filters = [filter.to_string()];
        let list = self.backend.list_all(bucket).await?;
        let mut best: Option<Entry> = None;
        for latest in list {
            if !consumer::matches(&filters, &wire::kv_subject(bucket, &latest.key)) {
                continue;
            }
            if latest.revision < seq {
                continue;
            }
            let history = if latest.revision == seq {
                vec![latest]
            } else {
                self.backend.history(bucket, &latest.key).await?
            };
            for e in history {
                let hit = if req.next_by_subj.is_some() {
                    e.revision >= seq
                } else {
                    e.revision == seq
                };
                if hit && best.as_ref().is_none_or(|b| e.revision < b.revision) {
                    best = Some(e);
                }
            }
        }
        Ok(best)
    }

    async fn direct_get(&self, rest: &str, body: &[u8]) -> Result<Reply, ApiError> {
        let (stream, subject) = match rest.split_once('.') {
            Some((s, subj)) => (s, Some(subj)),
            None => (rest, None),
        };
        let Some(bucket) = bucket_of(stream) else {
            return Ok(Reply::Status("503"));
        };
        let req = match subject {
            Some(s) => MsgRequest {
                last_by_subj: Some(s.to_string()),
                ..MsgRequest::default()
            },
            None => match serde_json::from_slice::<MsgRequest>(body) {
                Ok(r) if r.seq.is_some() || r.last_by_subj.is_some() => r,
                _ => return Ok(Reply::Status("408 Bad Request")),
            },
        };
        match self.lookup(bucket, &req).await {
            Ok(Some(e)) => Ok(Reply::Msg {
                headers: wire::direct_get_headers(&e),
                payload: e.value,
            }),
            Ok(None) => Ok(Reply::Status("404 Message Not Found")),
            Err(BackendError::NoSuchBucket(_)) => Ok(Reply::Status("503")),
            Err(e) => Err(ApiError::unavailable(e)),
        }
    }

    async fn msg_get(&self, name: &str, body: &[u8]) -> Result<Reply, ApiError> {
        let bucket = bucket_of(name).ok_or_else(ApiError::stream_not_found)?;
        let req: MsgRequest = serde_json::from_slice(body).map_err(ApiError::bad_request)?;
        if req.seq.is_none() && req.last_by_subj.is_none() {
            return Err(ApiError::bad_request("seq or last_by_subj required"));
        }
        let e = self
            .lookup(bucket, &req)
            .await
            .map_err(backend_err)?
            .ok_or_else(ApiError::no_message)?;
        let fields = wire::entry_fields(&e);
        let mut message = json!({
            "subject": wire::kv_subject(&e.bucket, &e.key),
            "seq": e.revision,
            "data": B64.encode(&e.value),
            "time": wire::rfc3339_ms(e.created_ms),
        });
        if !fields.is_empty() {
            message["hdrs"] = Value::String(B64.encode(wire::header_block(None, &fields)));
        }
        Ok(Reply::Json(
            json!({"type": "io.nats.jetstream.api.v1.stream_msg_get_response", "message": message})
                .to_string()
                .into_bytes(),
        ))
    }

    async fn consumer_create(
        &self,
        shared: &Arc<Shared>,
        rest: &str,
        body: &[u8],
    ) -> Result<Reply, ApiError> {
        let mut parts = rest.splitn(3, '.');
        let stream = parts.next().unwrap_or("");
        let subject_name = parts.next().map(str::to_string);
        let bucket = bucket_of(stream).ok_or_else(ApiError::stream_not_found)?;
        let req: Value = serde_json::from_slice(body).map_err(ApiError::bad_request)?;
        let config = req.get("config").cloned().unwrap_or(Value::Null);
        let spec = consumer::Spec::parse(bucket, &config, subject_name)?;
        let events = self.backend.subscribe();
        let (snapshot, high) = consumer::snapshot(&*self.backend, bucket, &spec)
            .await
            .map_err(backend_err)?;
        let ctl = Arc::new(ConsumerCtl::new(
            stream,
            &spec,
            config,
            snapshot.len() as u64,
        ));
        let old =
            lock(&self.consumers).insert((stream.to_string(), spec.name.clone()), ctl.clone());
        if let Some(old) = old {
            old.stop();
        }
        let info = ctl.info("consumer_create_response");
        tokio::spawn(consumer::run(
            shared.clone(),
            ctl,
            spec,
            snapshot,
            events,
            high,
        ));
        Ok(Reply::Json(info))
    }

    fn find_consumer(&self, rest: &str) -> Result<Arc<ConsumerCtl>, ApiError> {
        let (stream, name) = rest
            .split_once('.')
            .ok_or_else(ApiError::consumer_not_found)?;
        lock(&self.consumers)
            .get(&(stream.to_string(), name.to_string()))
            .cloned()
            .ok_or_else(ApiError::consumer_not_found)
    }

    fn consumer_info(&self, rest: &str) -> Result<Reply, ApiError> {
        let c = self.find_consumer(rest)?;
        Ok(Reply::Json(c.info("consumer_info_response")))
    }

    fn consumer_delete(&self, rest: &str) -> Result<Reply, ApiError> {
        let c = self.find_consumer(rest)?;
        c.stop();
        self.remove_consumer(&c);
        Ok(Reply::Json(
            json!({"type": "io.nats.jetstream.api.v1.consumer_delete_response", "success": true})
                .to_string()
                .into_bytes(),
        ))
    }

    pub(crate) fn remove_consumer(&self, c: &Arc<ConsumerCtl>) {
        let mut map = lock(&self.consumers);
        let key = (c.stream.clone(), c.name.clone());
        if map.get(&key).is_some_and(|cur| Arc::ptr_eq(cur, c)) {
            map.remove(&key);
        }
    }

    pub(crate) fn register_flow(&self, subject: String) -> oneshot::Receiver<()> {
        let (tx, rx) = oneshot::channel();
        lock(&self.flow).insert(subject, tx);
        rx
    }

    pub(crate) fn forget_flow(&self, subject: &str) {
        lock(&self.flow).remove(subject);
    }

    pub(crate) async fn interest_notified(&self, max: Duration) {
        let _ = tokio::time::timeout(max, self.interest.notified()).await;
    }
}

#[derive(Debug, Default, serde::Deserialize)]
struct MsgRequest {
    seq: Option<u64>,
    last_by_subj: Option<String>,
    next_by_subj: Option<String>,
}

enum Reply {
    Json(Vec<u8>),
    /// A status-only message (`503`, `404 Message Not Found`).
    Status(&'static str),
    Msg {
        headers: Vec<u8>,
        payload: Vec<u8>,
    },
}

fn reply(shared: &Shared, to: Option<&str>, body: &[u8]) {
    if let Some(to) = to {
        shared.publish_internal(to, None, None, body);
    }
}

fn bucket_of(stream: &str) -> Option<&str> {
    stream
        .strip_prefix("KV_")
        .filter(|b| ployz_consensus::kv::validate_bucket_name(b).is_ok())
}

fn backend_err(e: BackendError) -> ApiError {
    match e {
        BackendError::NoSuchBucket(_) => ApiError::stream_not_found(),
        other => ApiError::unavailable(other),
    }
}

/// The lane of a write subject: the same subject always maps to the same lane.
fn lane_of(subject: &str) -> usize {
    use std::hash::BuildHasher;
    let h = std::hash::BuildHasherDefault::<std::collections::hash_map::DefaultHasher>::default()
        .hash_one(subject);
    (h % WRITE_LANES as u64) as usize
}

/// Handles one lane's writes in arrival order (one connection's writes to one key keep their
/// order, like a NATS stream's).
async fn write_worker(shared: Weak<Shared>, mut rx: mpsc::Receiver<InMsg>) {
    while let Some(m) = rx.recv().await {
        let Some(shared) = shared.upgrade() else {
            return;
        };
        if let Some(js) = &shared.js {
            js.handle_write(&shared, m).await;
        }
    }
}
