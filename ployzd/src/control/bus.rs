//! The daemon's own NATS client, connected in-process to its embedded
//! server. Machine-to-machine calls (ping, "clean up and leave") are
//! request/reply over the control plane: each machine answers on
//! `ployz.machine.<id>.rpc`, and routes carry requests to wherever the
//! target runs.

use ployz_nats_proto::{ClientOp, ServerOp, ServerOpParser};
use rand::RngCore;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream, WriteHalf};
use tokio::sync::mpsc;

/// A message delivered to one of our subscriptions.
#[derive(Debug)]
pub struct Msg {
    pub subject: String,
    pub reply: Option<String>,
    /// The status line of the header block, e.g. `503` for no responders.
    pub status: Option<String>,
    pub payload: Vec<u8>,
}

#[derive(Debug, thiserror::Error)]
pub enum BusError {
    #[error("nobody answers on {0} (the machine is down, or its NATS route is not up yet)")]
    NoResponders(String),
    #[error("no answer on {0} within {human}", human = ployz_api::time::human(*.1))]
    Timeout(String, Duration),
    #[error("the control plane connection is closed")]
    Closed,
    #[error("the control plane refused our connection: {0}")]
    Refused(String),
}

type Subs = Arc<Mutex<HashMap<u64, mpsc::Sender<Msg>>>>;

pub struct Bus {
    writer: tokio::sync::Mutex<WriteHalf<DuplexStream>>,
    subs: Subs,
    next_sid: AtomicU64,
    /// Set when the server closed the connection (e.g. its password was
    /// rotated): the owner connects a new one.
    closed: Arc<std::sync::atomic::AtomicBool>,
}

pub fn subject_for(machine_id: &str) -> String {
    format!("ployz.machine.{machine_id}.rpc")
}

impl Bus {
    /// Connect to `server` in-process with the network's credentials.
    pub async fn connect(
        server: &ployz_natsd::Server,
        user: &str,
        password: &str,
    ) -> Result<Arc<Bus>, BusError> {
        let (ours, theirs) = tokio::io::duplex(1 << 20);
        server.serve_connection(theirs, Some("ployzd".into()));
        let (mut rd, mut wr) = tokio::io::split(ours);
        let connect = serde_json::json!({
            "verbose": false, "pedantic": false, "user": user, "pass": password,
            "headers": true, "no_responders": true, "protocol": 1, "echo": true,
            "name": "ployzd", "lang": "rust", "version": crate::VERSION,
        });
        let mut out = Vec::new();
        ClientOp::Connect(connect.to_string().as_bytes()).encode(&mut out);
        ClientOp::Ping.encode(&mut out);
        wr.write_all(&out).await.map_err(|_| BusError::Closed)?;
        // Wait for the PONG (or an -ERR) before handing the bus out.
        let mut parser = ServerOpParser::new(4096, 64 << 20);
        let mut buf = Vec::new();
        let mut chunk = vec![0u8; 16 * 1024];
        'hello: loop {
            let n = tokio::time::timeout(Duration::from_secs(5), rd.read(&mut chunk))
                .await
                .map_err(|_| BusError::Refused("no answer to CONNECT".into()))?
                .map_err(|_| BusError::Closed)?;
            if n == 0 {
                return Err(BusError::Closed);
            }
            buf.extend_from_slice(&chunk[..n]);
            let mut off = 0;
            loop {
                let (used, op) = parser.next(&buf[off..]);
                off += used;
                match op {
                    Some(Ok(ServerOp::Pong)) => {
                        buf.drain(..off);
                        break 'hello;
                    }
                    Some(Ok(ServerOp::Err(text))) => {
                        return Err(BusError::Refused(
                            String::from_utf8_lossy(text).into_owned(),
                        ))
                    }
                    Some(Ok(_)) => continue,
                    Some(Err(e)) => return Err(BusError::Refused(e.to_string())),
                    None => break,
                }
            }
            buf.drain(..off);
        }
        let bus = Arc::new(Bus {
            writer: tokio::sync::Mutex::new(wr),
            subs: Arc::default(),
            next_sid: AtomicU64::new(1),
            closed: Arc::default(),
        });
        let closed = bus.closed.clone();
        let (weak, subs) = (Arc::downgrade(&bus), bus.subs.clone());
        tokio::spawn(async move {
            read_loop(rd, parser, buf, weak, subs).await;
            closed.store(true, Ordering::Relaxed);
        });
        Ok(bus)
    }

    /// Whether the server closed this connection.
    pub fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Relaxed)
    }

    async fn send(&self, op: ClientOp<'_>) -> Result<(), BusError> {
        let mut out = Vec::new();
        op.encode(&mut out);
        self.writer
            .lock()
            .await
            .write_all(&out)
            .await
            .map_err(|_| BusError::Closed)
    }

    /// Subscribe; messages arrive on the returned channel.
    pub async fn subscribe(&self, subject: &str) -> Result<(u64, mpsc::Receiver<Msg>), BusError> {
        let sid = self.next_sid.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = mpsc::channel(256);
        self.subs
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(sid, tx);
        let sid_s = sid.to_string();
        self.send(ClientOp::Sub {
            subject: subject.as_bytes(),
            queue: None,
            sid: sid_s.as_bytes(),
        })
        .await?;
        Ok((sid, rx))
    }

    pub async fn unsubscribe(&self, sid: u64) {
        self.subs
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&sid);
        let sid_s = sid.to_string();
        let _ = self
            .send(ClientOp::Unsub {
                sid: sid_s.as_bytes(),
                max: None,
            })
            .await;
    }

    pub async fn publish(
        &self,
        subject: &str,
        reply: Option<&str>,
        payload: &[u8],
    ) -> Result<(), BusError> {
        self.send(ClientOp::Pub {
            subject: subject.as_bytes(),
            reply: reply.map(str::as_bytes),
            payload,
        })
        .await
    }

    /// Publish a request and wait for the first answer.
    pub async fn request(
        &self,
        subject: &str,
        payload: &[u8],
        timeout: Duration,
    ) -> Result<Vec<u8>, BusError> {
        let mut r = [0u8; 12];
        rand::rngs::OsRng.fill_bytes(&mut r);
        let inbox = format!(
            "{}.{}",
            super::users::INTERNAL_INBOX,
            r.iter().map(|b| format!("{b:02x}")).collect::<String>()
        );
        let (sid, mut rx) = self.subscribe(&inbox).await?;
        let result = async {
            self.publish(subject, Some(&inbox), payload).await?;
            match tokio::time::timeout(timeout, rx.recv()).await {
                Err(_) => Err(BusError::Timeout(subject.into(), timeout)),
                Ok(None) => Err(BusError::Closed),
                Ok(Some(m)) if m.status.as_deref() == Some("503") => {
                    Err(BusError::NoResponders(subject.into()))
                }
                Ok(Some(m)) => Ok(m.payload),
            }
        }
        .await;
        self.unsubscribe(sid).await;
        result
    }
}

fn status_of(headers: &[u8]) -> Option<String> {
    let first = headers.split(|b| *b == b'\n').next()?;
    let line = String::from_utf8_lossy(first);
    let mut parts = line.split_whitespace();
    parts.next()?; // NATS/1.0
    parts.next().map(str::to_string)
}

async fn read_loop(
    mut rd: tokio::io::ReadHalf<DuplexStream>,
    mut parser: ServerOpParser,
    mut buf: Vec<u8>,
    bus: std::sync::Weak<Bus>,
    subs: Subs,
) {
    let mut chunk = vec![0u8; 64 * 1024];
    loop {
        let mut pongs = 0;
        let mut off = 0;
        loop {
            let (used, op) = parser.next(&buf[off..]);
            off += used;
            let (subject, sid, reply, status, payload) = match op {
                Some(Ok(ServerOp::Msg {
                    subject,
                    sid,
                    reply,
                    payload,
                })) => (subject, sid, reply, None, payload),
                Some(Ok(ServerOp::HMsg {
                    subject,
                    sid,
                    reply,
                    headers,
                    payload,
                })) => (subject, sid, reply, status_of(headers), payload),
                Some(Ok(ServerOp::Ping)) => {
                    pongs += 1;
                    continue;
                }
                Some(Ok(_)) => continue,
                Some(Err(e)) => {
                    tracing::warn!("control plane client: {e}");
                    subs.lock().unwrap_or_else(|e| e.into_inner()).clear();
                    return;
                }
                None => break,
            };
            let sid: Option<u64> = std::str::from_utf8(sid).ok().and_then(|s| s.parse().ok());
            let tx = sid.and_then(|sid| {
                subs.lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .get(&sid)
                    .cloned()
            });
            if let Some(tx) = tx {
                let _ = tx.try_send(Msg {
                    subject: String::from_utf8_lossy(subject).into_owned(),
                    reply: reply.map(|r| String::from_utf8_lossy(r).into_owned()),
                    status,
                    payload: payload.to_vec(),
                });
            }
        }
        buf.drain(..off);
        if pongs > 0 {
            let Some(bus) = bus.upgrade() else { return };
            for _ in 0..pongs {
                if bus.send(ClientOp::Pong).await.is_err() {
                    return;
                }
            }
        }
        match rd.read(&mut chunk).await {
            Ok(0) | Err(_) => {
                subs.lock().unwrap_or_else(|e| e.into_inner()).clear();
                return;
            }
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn status_line() {
        assert_eq!(
            super::status_of(b"NATS/1.0 503\r\n\r\n").as_deref(),
            Some("503")
        );
        assert_eq!(super::status_of(b"NATS/1.0\r\nA: b\r\n\r\n"), None);
    }
}
