//! Ephemeral push consumers (what async-nats' ordered consumer creates for KV watch, keys and
//! history).
//!
//! A consumer reads a snapshot when it is created (so `num_pending` in the create reply is
//! exact), waits until someone subscribes to exactly its deliver subject (as nats-server: a
//! wildcard subscription such as `>` that merely matches it does not count), delivers the
//! snapshot and then every matching change from the backend's event stream. Gaps are impossible by
//! construction: the event subscription is taken **before** the snapshot is read, the snapshot's
//! list is one atomic read whose highest revision `high` is the bucket sequence at that instant,
//! and live events are delivered only above `high`. If the event stream lags or is reset, the
//! consumer stops; the ordered consumer notices the missing heartbeats and recreates itself
//! from its last stream sequence.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ployz_consensus::{Entry, KvEvent};
use serde_json::{json, Value};
use tokio::sync::{broadcast, Notify};
use tokio::time::Instant;

use super::wire::{self, ApiError};
use crate::backend::{BackendError, DynBackend};
use crate::server::{lock, random_id, Shared};

/// Flow control: ask for a reply after this many messages or bytes.
const FC_MSGS: u64 = 512;
const FC_BYTES: u64 = 1024 * 1024;
/// Longest wait for a flow-control reply before delivering anyway.
const FC_WAIT: Duration = Duration::from_secs(30);
/// A consumer whose deliver subject lost all interest is deleted after this long (or its
/// `inactive_threshold` if shorter).
const NO_INTEREST_GRACE: Duration = Duration::from_secs(5);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Policy {
    All,
    Last,
    New,
    LastPerSubject,
    ByStartSequence(u64),
    ByStartTime(u64),
}

#[derive(Clone, Debug)]
pub(crate) struct Spec {
    pub bucket: String,
    pub name: String,
    pub deliver: String,
    pub filters: Vec<String>,
    pub policy: Policy,
    pub headers_only: bool,
    pub heartbeat: Duration,
    pub flow_control: bool,
    pub inactive: Duration,
}

fn nanos(v: Option<&Value>) -> Duration {
    v.and_then(Value::as_u64)
        .map_or(Duration::ZERO, Duration::from_nanos)
}

impl Spec {
    pub fn parse(bucket: &str, c: &Value, subject_name: Option<String>) -> Result<Spec, ApiError> {
        let deliver = c
            .get("deliver_subject")
            .and_then(Value::as_str)
            .filter(|s| !s.is_empty())
            .ok_or_else(|| {
                ApiError::bad_request(
                    "ployzd supports only push consumers (deliver_subject required)",
                )
            })?
            .to_string();
        if c.get("deliver_group")
            .and_then(Value::as_str)
            .is_some_and(|g| !g.is_empty())
        {
            return Err(ApiError::bad_request("deliver_group is not supported"));
        }
        let name = c
            .get("name")
            .and_then(Value::as_str)
            .or_else(|| c.get("durable_name").and_then(Value::as_str))
            .map(str::to_string)
            .or(subject_name)
            .filter(|n| !n.is_empty())
            .unwrap_or_else(|| random_id(22));
        let mut filters: Vec<String> = Vec::new();
        if let Some(f) = c.get("filter_subject").and_then(Value::as_str) {
            if !f.is_empty() {
                filters.push(f.to_string());
            }
        }
        if let Some(fs) = c.get("filter_subjects").and_then(Value::as_array) {
            filters.extend(fs.iter().filter_map(Value::as_str).map(str::to_string));
        }
        let policy = match c
            .get("deliver_policy")
            .and_then(Value::as_str)
            .unwrap_or("all")
        {
            "all" => Policy::All,
            "last" => Policy::Last,
            "new" => Policy::New,
            "last_per_subject" => Policy::LastPerSubject,
            "by_start_sequence" => {
                Policy::ByStartSequence(c.get("opt_start_seq").and_then(Value::as_u64).unwrap_or(0))
            }
            "by_start_time" => {
                let t = c
                    .get("opt_start_time")
                    .and_then(Value::as_str)
                    .unwrap_or("");
                let t = humantime::parse_rfc3339_weak(t)
                    .map_err(|e| ApiError::bad_request(format!("opt_start_time: {e}")))?;
                let ms = t
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
                    .unwrap_or(0);
                Policy::ByStartTime(ms)
            }
            other => return Err(ApiError::bad_request(format!("deliver_policy {other:?}"))),
        };
        let inactive = nanos(c.get("inactive_threshold"));
        Ok(Spec {
            bucket: bucket.to_string(),
            name,
            deliver,
            filters,
            policy,
            headers_only: c
                .get("headers_only")
                .and_then(Value::as_bool)
                .unwrap_or(false),
            heartbeat: nanos(c.get("idle_heartbeat")),
            flow_control: c
                .get("flow_control")
                .and_then(Value::as_bool)
                .unwrap_or(false),
            inactive: if inactive.is_zero() {
                NO_INTEREST_GRACE
            } else {
                inactive.min(NO_INTEREST_GRACE)
            },
        })
    }
}

/// Whether `subject` passes the filters (none = everything).
pub(crate) fn matches(filters: &[String], subject: &str) -> bool {
    filters.is_empty()
        || filters
            .iter()
            .any(|f| ployz_nats_proto::subject::subject_matches(f, subject))
}

/// Reads what the consumer delivers first, in revision order, and the revision above which
/// live events are new.
pub(crate) async fn snapshot(
    backend: &dyn DynBackend,
    bucket: &str,
    spec: &Spec,
) -> Result<(Vec<Entry>, u64), BackendError> {
    let list = backend.list_all(bucket).await?;
    let high = list.iter().map(|e| e.revision).max().unwrap_or(0);
    let mut matching: Vec<Entry> = list
        .into_iter()
        .filter(|e| matches(&spec.filters, &wire::kv_subject(bucket, &e.key)))
        .collect();
    let mut out = match spec.policy {
        Policy::New => Vec::new(),
        Policy::Last => {
            matching.sort_by_key(|e| e.revision);
            matching.pop().into_iter().collect()
        }
        Policy::LastPerSubject => matching,
        Policy::All | Policy::ByStartSequence(_) | Policy::ByStartTime(_) => {
            let mut all = Vec::new();
            for latest in matching {
                let keep = |e: &Entry| match spec.policy {
                    Policy::ByStartSequence(s) => e.revision >= s,
                    Policy::ByStartTime(t) => e.created_ms >= t,
                    _ => true,
                };
                if latest.revision <= 1 || (!keep(&latest) && spec.policy != Policy::All) {
                    // Only the latest can qualify (or none): skip the history read.
                    if keep(&latest) {
                        all.push(latest);
                    }
                    continue;
                }
                for e in backend.history(bucket, &latest.key).await? {
                    if e.revision <= high && keep(&e) {
                        all.push(e);
                    }
                }
            }
            all
        }
    };
    out.sort_by_key(|e| e.revision);
    Ok((out, high))
}

#[derive(Default)]
struct Progress {
    consumer_seq: u64,
    stream_seq: u64,
    pending: u64,
    push_bound: bool,
}

pub(crate) struct ConsumerCtl {
    pub stream: String,
    pub name: String,
    created: String,
    config: Value,
    progress: Mutex<Progress>,
    stopped: AtomicBool,
    stop: Notify,
}

impl ConsumerCtl {
    pub fn new(stream: &str, spec: &Spec, mut config: Value, pending: u64) -> Self {
        if let Some(obj) = config.as_object_mut() {
            obj.insert("name".into(), Value::String(spec.name.clone()));
        }
        ConsumerCtl {
            stream: stream.to_string(),
            name: spec.name.clone(),
            created: wire::now_rfc3339(),
            config,
            progress: Mutex::new(Progress {
                pending,
                ..Progress::default()
            }),
            stopped: AtomicBool::new(false),
            stop: Notify::new(),
        }
    }

    pub fn stop(&self) {
        self.stopped.store(true, Ordering::SeqCst);
        self.stop.notify_one();
    }

    fn is_stopped(&self) -> bool {
        self.stopped.load(Ordering::SeqCst)
    }

    pub fn info(&self, kind: &str) -> Vec<u8> {
        let p = lock(&self.progress);
        let seqs = json!({"consumer_seq": p.consumer_seq, "stream_seq": p.stream_seq});
        json!({
            "type": format!("io.nats.jetstream.api.v1.{kind}"),
            "stream_name": self.stream,
            "name": self.name,
            "created": self.created,
            "config": self.config,
            "delivered": seqs,
            "ack_floor": seqs,
            "num_ack_pending": 0,
            "num_redelivered": 0,
            "num_waiting": 0,
            "num_pending": p.pending,
            "push_bound": p.push_bound,
            "ts": wire::now_rfc3339(),
        })
        .to_string()
        .into_bytes()
    }
}

struct Runner {
    shared: Arc<Shared>,
    ctl: Arc<ConsumerCtl>,
    spec: Spec,
    since_fc_msgs: u64,
    since_fc_bytes: u64,
    fc_serial: u64,
    last_send: Instant,
}

enum Stop {
    Stopped,
}

impl Runner {
    fn js(&self) -> Option<&super::JetStream> {
        self.shared.js.as_ref()
    }

    fn send(&mut self, e: &Entry, pending: u64) {
        let (cseq, sseq) = {
            let mut p = lock(&self.ctl.progress);
            p.consumer_seq += 1;
            p.stream_seq = e.revision;
            p.pending = pending;
            (p.consumer_seq, p.stream_seq)
        };
        let ack = format!(
            "$JS.ACK.{}.{}.1.{sseq}.{cseq}.{}.{pending}",
            self.ctl.stream,
            self.ctl.name,
            u128::from(e.created_ms) * 1_000_000
        );
        let subject = wire::kv_subject(&e.bucket, &e.key);
        let mut fields = wire::entry_fields(e);
        let size = e.value.len().to_string();
        if self.spec.headers_only {
            fields.push(("Nats-Msg-Size", &size));
        }
        let hdr = (!fields.is_empty()).then(|| wire::header_block(None, &fields));
        let payload: &[u8] = if self.spec.headers_only {
            &[]
        } else {
            &e.value
        };
        // Routed by the deliver subject, presented with the stored subject (as nats-server
        // does; async-nats derives the key from it).
        let msg = ployz_nats_proto::Message {
            subject: &subject,
            reply: Some(&ack),
            headers: hdr.as_deref(),
            payload,
        };
        self.shared
            .route_message_via(&self.spec.deliver, &msg, crate::server::Origin::Internal);
        self.since_fc_msgs += 1;
        self.since_fc_bytes += (payload.len() + hdr.as_ref().map_or(0, Vec::len)) as u64;
        self.last_send = Instant::now();
    }

    fn heartbeat(&mut self) {
        let (cseq, sseq) = {
            let p = lock(&self.ctl.progress);
            (p.consumer_seq.to_string(), p.stream_seq.to_string())
        };
        let h = wire::header_block(
            Some("100 Idle Heartbeat"),
            &[("Nats-Last-Consumer", &cseq), ("Nats-Last-Stream", &sseq)],
        );
        self.shared
            .publish_internal(&self.spec.deliver, None, Some(&h), b"");
        self.last_send = Instant::now();
    }

    /// Sends a flow-control request when due and waits for its reply.
    async fn flow_control(&mut self) -> Result<(), Stop> {
        if !self.spec.flow_control
            || (self.since_fc_msgs < FC_MSGS && self.since_fc_bytes < FC_BYTES)
        {
            return Ok(());
        }
        self.since_fc_msgs = 0;
        self.since_fc_bytes = 0;
        self.fc_serial += 1;
        let subject = format!(
            "$JS.FC.{}.{}.{}",
            self.ctl.stream, self.ctl.name, self.fc_serial
        );
        let Some(js) = self.js() else {
            return Ok(());
        };
        let rx = js.register_flow(subject.clone());
        let h = wire::header_block(Some("100 FlowControl Request"), &[]);
        self.shared
            .publish_internal(&self.spec.deliver, Some(&subject), Some(&h), b"");
        self.last_send = Instant::now();
        let mut shutdown = self.shared.shutdown_rx();
        let res = tokio::select! {
            _ = rx => Ok(()),
            _ = tokio::time::sleep(FC_WAIT) => Ok(()),
            _ = self.ctl.stop.notified() => Err(Stop::Stopped),
            _ = shutdown.changed() => Err(Stop::Stopped),
        };
        if let Some(js) = self.js() {
            js.forget_flow(&subject);
        }
        res
    }

    async fn wait_for_interest(&mut self) -> Result<(), Stop> {
        let deadline = Instant::now() + self.spec.inactive;
        let mut shutdown = self.shared.shutdown_rx();
        loop {
            if self.ctl.is_stopped() || *shutdown.borrow() {
                return Err(Stop::Stopped);
            }
            if self.shared.has_delivery_interest(&self.spec.deliver) {
                lock(&self.ctl.progress).push_bound = true;
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(Stop::Stopped);
            }
            let Some(js) = self.js() else {
                return Err(Stop::Stopped);
            };
            tokio::select! {
                _ = js.interest_notified(Duration::from_millis(50)) => {}
                _ = self.ctl.stop.notified() => return Err(Stop::Stopped),
                _ = shutdown.changed() => {}
            }
        }
    }

    async fn live(&mut self, mut events: broadcast::Receiver<KvEvent>, high: u64) -> Stop {
        let mut shutdown = self.shared.shutdown_rx();
        let mut check = tokio::time::interval(Duration::from_millis(250));
        check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut no_interest_since: Option<Instant> = None;
        loop {
            if self.ctl.is_stopped() || *shutdown.borrow() {
                return Stop::Stopped;
            }
            let hb = self.spec.heartbeat;
            let hb_at = self.last_send + hb;
            tokio::select! {
                ev = events.recv() => match ev {
                    Ok(KvEvent::Entry(e)) => {
                        if e.bucket == self.spec.bucket
                            && e.revision > high
                            && matches(&self.spec.filters, &wire::kv_subject(&e.bucket, &e.key))
                        {
                            self.send(&e, 0);
                            if self.flow_control().await.is_err() {
                                return Stop::Stopped;
                            }
                        }
                    }
                    Ok(KvEvent::BucketDeleted { bucket }) if bucket == self.spec.bucket => {
                        return Stop::Stopped;
                    }
                    Ok(KvEvent::Reset) | Err(broadcast::error::RecvError::Lagged(_)) => {
                        tracing::debug!(consumer = %self.ctl.name, "change stream lagged or reset; stopping consumer");
                        return Stop::Stopped;
                    }
                    Ok(_) => {}
                    Err(broadcast::error::RecvError::Closed) => return Stop::Stopped,
                },
                _ = tokio::time::sleep_until(hb_at), if !hb.is_zero() => self.heartbeat(),
                _ = check.tick() => {
                    if self.shared.has_delivery_interest(&self.spec.deliver) {
                        no_interest_since = None;
                    } else {
                        let since = *no_interest_since.get_or_insert_with(Instant::now);
                        if since.elapsed() >= self.spec.inactive {
                            return Stop::Stopped;
                        }
                    }
                }
                _ = self.ctl.stop.notified() => return Stop::Stopped,
                _ = shutdown.changed() => return Stop::Stopped,
            }
        }
    }
}

pub(crate) async fn run(
    shared: Arc<Shared>,
    ctl: Arc<ConsumerCtl>,
    spec: Spec,
    snapshot: Vec<Entry>,
    events: broadcast::Receiver<KvEvent>,
    high: u64,
) {
    let mut r = Runner {
        shared,
        ctl,
        spec,
        since_fc_msgs: 0,
        since_fc_bytes: 0,
        fc_serial: 0,
        last_send: Instant::now(),
    };
    let outcome = async {
        r.wait_for_interest().await?;
        let total = snapshot.len() as u64;
        for (i, e) in snapshot.iter().enumerate() {
            if r.ctl.is_stopped() {
                return Err(Stop::Stopped);
            }
            r.send(e, total - i as u64 - 1);
            r.flow_control().await?;
        }
        Ok::<(), Stop>(())
    }
    .await;
    if outcome.is_ok() {
        r.live(events, high).await;
    }
    if let Some(js) = r.shared.js.as_ref() {
        js.remove_consumer(&r.ctl);
    }
}
