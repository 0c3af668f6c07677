//! JetStream wire shapes: JSON documents, error codes, headers and timestamps.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use ployz_consensus::{BucketConfig, BucketInfo, Entry, EntryOp};
use serde_json::{json, Value};

/// A JetStream API error (`{"error":{"code","err_code","description"}}`), codes as
/// nats-server's `server/errors.json`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct ApiError {
    pub code: u16,
    pub err_code: u32,
    pub description: String,
}

impl ApiError {
    pub fn new(code: u16, err_code: u32, description: impl Into<String>) -> Self {
        ApiError {
            code,
            err_code,
            description: description.into(),
        }
    }
    pub fn stream_not_found() -> Self {
        Self::new(404, 10059, "stream not found")
    }
    pub fn consumer_not_found() -> Self {
        Self::new(404, 10014, "consumer not found")
    }
    pub fn no_message() -> Self {
        Self::new(404, 10037, "no message found")
    }
    pub fn bad_request(why: impl std::fmt::Display) -> Self {
        Self::new(400, 10003, format!("bad request: {why}"))
    }
    pub fn invalid_config(why: impl std::fmt::Display) -> Self {
        Self::new(400, 10052, format!("stream configuration invalid: {why}"))
    }
    pub fn unavailable(why: impl std::fmt::Display) -> Self {
        Self::new(
            503,
            10008,
            format!("JetStream system temporarily unavailable: {why}"),
        )
    }
    pub fn to_json(&self, kind: &str) -> Vec<u8> {
        let v = json!({
            "type": format!("io.nats.jetstream.api.v1.{kind}"),
            "error": {
                "code": self.code,
                "err_code": self.err_code,
                "description": self.description,
            }
        });
        v.to_string().into_bytes()
    }
}

/// RFC 3339 with nanoseconds, UTC (`2024-05-01T10:00:00.123000000Z`).
pub(crate) fn rfc3339_ms(ms: u64) -> String {
    humantime::format_rfc3339_nanos(UNIX_EPOCH + Duration::from_millis(ms)).to_string()
}

pub(crate) fn now_rfc3339() -> String {
    humantime::format_rfc3339_nanos(SystemTime::now()).to_string()
}

/// Go's zero time, what nats-server reports for timestamps it does not have.
pub(crate) const ZERO_TIME: &str = "0001-01-01T00:00:00Z";

pub(crate) fn stream_name(bucket: &str) -> String {
    format!("KV_{bucket}")
}

pub(crate) fn kv_subject(bucket: &str, key: &str) -> String {
    format!("$KV.{bucket}.{key}")
}

/// The stream configuration a KV bucket is presented as (what async-nats' `create_key_value`
/// asks for, with nats-server's defaults filled in).
pub(crate) fn stream_config(bucket: &str, config: &BucketConfig) -> Value {
    json!({
        "name": stream_name(bucket),
        "subjects": [format!("$KV.{bucket}.>")],
        "retention": "limits",
        "max_consumers": -1,
        "max_msgs": -1,
        "max_bytes": -1,
        "max_age": 0,
        "max_msgs_per_subject": config.history,
        "max_msg_size": config.max_value_size.map_or(-1, i64::from),
        "discard": "new",
        "storage": "file",
        "num_replicas": 1,
        "duplicate_window": 120_000_000_000u64,
        "allow_rollup_hdrs": true,
        "deny_delete": true,
        "deny_purge": false,
        "allow_direct": true,
        "mirror_direct": false,
        "sealed": false,
    })
}

pub(crate) fn stream_info(
    kind: &str,
    info: &BucketInfo,
    consumers: usize,
    server: &str,
) -> Vec<u8> {
    json!({
        "type": format!("io.nats.jetstream.api.v1.{kind}"),
        "config": stream_config(&info.bucket, &info.config),
        "created": rfc3339_ms(info.created_ms),
        "state": {
            "messages": info.entries,
            "bytes": info.bytes,
            "first_seq": info.first_seq,
            "first_ts": ZERO_TIME,
            "last_seq": info.last_seq,
            "last_ts": ZERO_TIME,
            "num_subjects": info.live_keys,
            "consumer_count": consumers,
        },
        "cluster": { "leader": server },
        "ts": now_rfc3339(),
    })
    .to_string()
    .into_bytes()
}

/// Parsed header block.
#[derive(Debug, Default)]
pub(crate) struct Headers {
    pub fields: Vec<(String, String)>,
}

impl Headers {
    pub fn parse(block: Option<&[u8]>) -> Headers {
        let mut fields = Vec::new();
        if let Some(block) = block {
            let text = String::from_utf8_lossy(block);
            for line in text.split("\r\n").skip(1) {
                if let Some((k, v)) = line.split_once(':') {
                    fields.push((k.trim().to_string(), v.trim().to_string()));
                }
            }
        }
        Headers { fields }
    }

    pub fn get(&self, name: &str) -> Option<&str> {
        self.fields
            .iter()
            .rev()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// Builds a header block with an optional status line suffix (`"404 Message Not Found"`).
pub(crate) fn header_block(status: Option<&str>, fields: &[(&str, &str)]) -> Vec<u8> {
    let mut out = b"NATS/1.0".to_vec();
    if let Some(s) = status {
        out.push(b' ');
        out.extend_from_slice(s.as_bytes());
    }
    out.extend_from_slice(b"\r\n");
    for (k, v) in fields {
        out.extend_from_slice(k.as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(v.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"\r\n");
    out
}

/// Headers a stored KV entry carries (nats-server stores the publisher's `KV-Operation` and
/// `Nats-Rollup`).
pub(crate) fn entry_fields(e: &Entry) -> Vec<(&'static str, &'static str)> {
    match e.op {
        EntryOp::Put => Vec::new(),
        EntryOp::Delete => vec![("KV-Operation", "DEL")],
        EntryOp::Purge => vec![("KV-Operation", "PURGE"), ("Nats-Rollup", "sub")],
    }
}

/// Direct-get reply headers for an entry.
pub(crate) fn direct_get_headers(e: &Entry) -> Vec<u8> {
    let stream = stream_name(&e.bucket);
    let subject = kv_subject(&e.bucket, &e.key);
    let seq = e.revision.to_string();
    let ts = rfc3339_ms(e.created_ms);
    let mut fields: Vec<(&str, &str)> = vec![
        ("Nats-Stream", &stream),
        ("Nats-Subject", &subject),
        ("Nats-Sequence", &seq),
        ("Nats-Time-Stamp", &ts),
    ];
    fields.extend(entry_fields(e));
    header_block(None, &fields)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headers_roundtrip() {
        let b = header_block(Some("404 Message Not Found"), &[]);
        assert_eq!(b, b"NATS/1.0 404 Message Not Found\r\n\r\n");
        let h = Headers::parse(Some(
            b"NATS/1.0\r\nKV-Operation: PURGE\r\nnats-expected-last-subject-sequence: 7\r\n\r\n",
        ));
        assert_eq!(h.get("kv-operation"), Some("PURGE"));
        assert_eq!(h.get("Nats-Expected-Last-Subject-Sequence"), Some("7"));
        assert_eq!(rfc3339_ms(1_500), "1970-01-01T00:00:01.500000000Z");
    }
}
