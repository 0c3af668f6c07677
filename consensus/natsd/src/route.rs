//! Routes: the links of the full mesh between the servers of one cluster.
//!
//! The wire protocol is a simplified form of nats-server's route protocol (single account
//! `$G`, no compression, no pooling):
//!
//! ```text
//! INFO {"server_id":"...","server_name":"...","route":true}   first line, both directions
//! RS+ $G <subject> [<queue> <weight>]                          interest added
//! RS- $G <subject> [<queue>]                                   interest removed
//! RMSG $G <subject> [+ <reply> <queue>... | | <queue>... | <reply>] <size>
//! HMSG $G <subject> [same forms] <header size> <total size>   with headers
//! PING / PONG                                                   keepalive
//! ```
//!
//! A server forwards a message published by one of its clients (or by itself) once to every
//! route with matching interest, naming the queue groups it picked that route to serve; the
//! receiver delivers it to its plain subscribers and to one member of each named group, and
//! **never forwards a route-received message** (full mesh), so nothing is duplicated.

use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ployz_nats_proto::Message;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::{watch, Notify};

use crate::server::{lock, Origin, RouteHandle, Shared};

const MAX_CONTROL_LINE: usize = 64 * 1024;

pub(crate) struct RouteState {
    out: Vec<u8>,
    closing: bool,
    /// Interest the peer announced, mirrored in the router's remote sublist.
    remote_subs: HashSet<(String, Option<String>)>,
}

pub(crate) struct RouteConn {
    id: u64,
    pub(crate) peer: String,
    state: Mutex<RouteState>,
    wake: Notify,
    /// Milliseconds (server clock) of the last byte received.
    last_rx_ms: AtomicU64,
    max_pending: usize,
}

impl RouteConn {
    /// Queues bytes for the peer. A route that cannot keep up is dropped (its dialer redials).
    pub(crate) fn push(&self, bytes: &[u8]) {
        let mut st = lock(&self.state);
        if st.closing {
            return;
        }
        if st.out.len() + bytes.len() > self.max_pending {
            tracing::warn!(peer = %self.peer, "route is not keeping up; dropping it");
            st.closing = true;
            st.out.clear();
        } else {
            st.out.extend_from_slice(bytes);
        }
        drop(st);
        self.wake.notify_one();
    }

    pub(crate) fn close(&self) {
        lock(&self.state).closing = true;
        self.wake.notify_one();
    }

    fn is_closing(&self) -> bool {
        lock(&self.state).closing
    }
}

pub(crate) fn encode_rs(add: bool, subject: &str, queue: Option<&str>) -> Vec<u8> {
    let mut out = Vec::with_capacity(subject.len() + 16);
    out.extend_from_slice(if add { b"RS+ $G " } else { b"RS- $G " });
    out.extend_from_slice(subject.as_bytes());
    if let Some(q) = queue {
        out.push(b' ');
        out.extend_from_slice(q.as_bytes());
        if add {
            out.extend_from_slice(b" 1");
        }
    }
    out.extend_from_slice(b"\r\n");
    out
}

pub(crate) fn encode_rmsg(msg: &Message<'_>, queues: &[String]) -> Vec<u8> {
    let hdr = msg.headers.filter(|h| !h.is_empty());
    let mut out =
        Vec::with_capacity(msg.subject.len() + msg.payload.len() + hdr.map_or(0, <[u8]>::len) + 64);
    out.extend_from_slice(if hdr.is_some() {
        b"HMSG $G "
    } else {
        b"RMSG $G "
    });
    out.extend_from_slice(msg.subject.as_bytes());
    out.push(b' ');
    if !queues.is_empty() {
        match msg.reply {
            Some(r) => {
                out.extend_from_slice(b"+ ");
                out.extend_from_slice(r.as_bytes());
                out.push(b' ');
            }
            None => out.extend_from_slice(b"| "),
        }
        for q in queues {
            out.extend_from_slice(q.as_bytes());
            out.push(b' ');
        }
    } else if let Some(r) = msg.reply {
        out.extend_from_slice(r.as_bytes());
        out.push(b' ');
    }
    match hdr {
        Some(h) => {
            out.extend_from_slice(h.len().to_string().as_bytes());
            out.push(b' ');
            out.extend_from_slice((h.len() + msg.payload.len()).to_string().as_bytes());
        }
        None => out.extend_from_slice(msg.payload.len().to_string().as_bytes()),
    }
    out.extend_from_slice(b"\r\n");
    if let Some(h) = hdr {
        out.extend_from_slice(h);
    }
    out.extend_from_slice(msg.payload);
    out.extend_from_slice(b"\r\n");
    out
}

pub(crate) fn attach<S>(shared: Arc<Shared>, stream: S, peer: String) -> RouteHandle
where
    S: AsyncRead + AsyncWrite + Send + Unpin + 'static,
{
    let id = shared.next_id();
    let conn = Arc::new(RouteConn {
        id,
        peer,
        state: Mutex::new(RouteState {
            out: Vec::new(),
            closing: false,
            remote_subs: HashSet::new(),
        }),
        wake: Notify::new(),
        last_rx_ms: AtomicU64::new(ms(shared.now())),
        max_pending: shared.cfg.max_route_pending,
    });
    let (done_tx, done_rx) = watch::channel(false);
    {
        let mut r = lock(&shared.router);
        let info = serde_json::json!({
            "server_id": shared.server_id,
            "server_name": shared.cfg.server_name,
            "route": true,
        });
        let mut hello = format!("INFO {info}\r\n").into_bytes();
        hello.extend_from_slice(&r.interest_lines());
        conn.push(&hello);
        r.routes.insert(id, conn.clone());
    }
    if shared.is_shutting_down() {
        conn.close();
    }
    tracing::info!(peer = %conn.peer, "route attached");
    tokio::spawn(run_route(shared, conn.clone(), stream, done_tx));
    RouteHandle {
        conn,
        done: done_rx,
    }
}

fn ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

async fn run_route<S>(
    shared: Arc<Shared>,
    conn: Arc<RouteConn>,
    stream: S,
    done: watch::Sender<bool>,
) where
    S: AsyncRead + AsyncWrite + Send + Unpin + 'static,
{
    let (mut rd, mut wr) = tokio::io::split(stream);
    {
        let reader = read_loop(&shared, &conn, &mut rd);
        let writer = write_loop(&shared, &conn, &mut wr);
        tokio::pin!(reader);
        tokio::pin!(writer);
        tokio::select! {
            _ = &mut reader => { conn.close(); }
            _ = &mut writer => {}
        }
    }
    let _ = wr.shutdown().await;
    {
        let mut r = lock(&shared.router);
        r.routes.remove(&conn.id);
        let subs = std::mem::take(&mut lock(&conn.state).remote_subs);
        for (subject, queue) in subs {
            r.remote.remove(&subject, queue.as_deref(), &conn.id);
        }
    }
    tracing::info!(peer = %conn.peer, "route closed");
    done.send_replace(true);
}

async fn write_loop<W: AsyncWrite + Unpin>(shared: &Shared, conn: &RouteConn, wr: &mut W) {
    let interval = shared.cfg.route_ping_interval;
    let mut ping = tokio::time::interval(interval);
    ping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    ping.tick().await;
    loop {
        let (buf, closing) = {
            let mut st = lock(&conn.state);
            (std::mem::take(&mut st.out), st.closing)
        };
        if closing {
            return;
        }
        if !buf.is_empty() {
            // Written piecewise so a route whose peer stopped reading is still closed when it
            // goes stale or overflows `max_route_pending`.
            let mut off = 0;
            while off < buf.len() {
                tokio::select! {
                    r = wr.write(&buf[off..]) => match r {
                        Ok(0) | Err(_) => return,
                        Ok(n) => off += n,
                    },
                    _ = conn.wake.notified() => {
                        if conn.is_closing() {
                            return;
                        }
                    }
                    _ = ping.tick() => {
                        if is_stale(shared, conn, interval) {
                            return;
                        }
                    }
                }
            }
            if wr.flush().await.is_err() {
                return;
            }
            continue;
        }
        tokio::select! {
            _ = conn.wake.notified() => {}
            _ = ping.tick() => {
                if is_stale(shared, conn, interval) {
                    return;
                }
                conn.push(b"PING\r\n");
            }
        }
    }
}

fn is_stale(shared: &Shared, conn: &RouteConn, interval: Duration) -> bool {
    let silent = ms(shared.now()).saturating_sub(conn.last_rx_ms.load(Ordering::Relaxed));
    let stale = silent > ms(interval).saturating_mul(3);
    if stale {
        tracing::warn!(peer = %conn.peer, "route is stale; closing it");
    }
    stale
}

enum Parsed {
    /// Need more input.
    More,
    /// Consumed this many bytes.
    Done(usize),
    /// Protocol error: close the route.
    Fatal(String),
}

async fn read_loop<R: AsyncRead + Unpin>(shared: &Arc<Shared>, conn: &Arc<RouteConn>, rd: &mut R) {
    let mut buf: Vec<u8> = Vec::with_capacity(64 * 1024);
    let mut chunk = vec![0u8; 64 * 1024];
    loop {
        let n = match rd.read(&mut chunk).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        conn.last_rx_ms.store(ms(shared.now()), Ordering::Relaxed);
        buf.extend_from_slice(&chunk[..n]);
        let mut pos = 0;
        loop {
            match parse_one(shared, conn, &buf[pos..]) {
                Parsed::More => break,
                Parsed::Done(k) => pos += k,
                Parsed::Fatal(why) => {
                    tracing::warn!(peer = %conn.peer, %why, "route protocol error; closing it");
                    return;
                }
            }
        }
        buf.drain(..pos);
        if conn.is_closing() {
            return;
        }
    }
}

fn parse_one(shared: &Arc<Shared>, conn: &Arc<RouteConn>, buf: &[u8]) -> Parsed {
    let Some(eol) = buf.windows(2).position(|w| w == b"\r\n") else {
        if buf.len() > MAX_CONTROL_LINE {
            return Parsed::Fatal("control line too long".into());
        }
        return Parsed::More;
    };
    let Ok(line) = std::str::from_utf8(&buf[..eol]) else {
        return Parsed::Fatal("control line is not UTF-8".into());
    };
    let mut toks = line.split_ascii_whitespace();
    let verb = toks.next().unwrap_or("").to_ascii_uppercase();
    let args: Vec<&str> = toks.collect();
    let line_len = eol + 2;
    match verb.as_str() {
        "PING" => {
            conn.push(b"PONG\r\n");
            Parsed::Done(line_len)
        }
        "PONG" | "+OK" | "" => Parsed::Done(line_len),
        "INFO" => {
            let json = line.get(4..).unwrap_or("").trim();
            let v: serde_json::Value = match serde_json::from_str(json) {
                Ok(v) => v,
                Err(e) => return Parsed::Fatal(format!("bad INFO: {e}")),
            };
            if v.get("server_id").and_then(|s| s.as_str()) == Some(shared.server_id.as_str()) {
                return Parsed::Fatal("route to self".into());
            }
            Parsed::Done(line_len)
        }
        "RS+" | "RS-" => {
            let (Some(subject), queue) = (args.get(1), args.get(2)) else {
                return Parsed::Fatal(format!("bad {verb} arguments"));
            };
            let key = (subject.to_string(), queue.map(|q| q.to_string()));
            let mut r = lock(&shared.router);
            let mut st = lock(&conn.state);
            if verb == "RS+" {
                if st.remote_subs.insert(key)
                    && r.remote.insert(subject, queue.copied(), conn.id).is_err()
                {
                    return Parsed::Fatal(format!("bad subject {subject}"));
                }
            } else if st.remote_subs.remove(&key) {
                r.remote.remove(subject, queue.copied(), &conn.id);
            }
            drop(st);
            drop(r);
            if let Some(js) = &shared.js {
                js.interest_changed();
            }
            Parsed::Done(line_len)
        }
        "RMSG" | "HMSG" => {
            let with_hdr = verb == "HMSG";
            let sizes = if with_hdr { 2 } else { 1 };
            if args.len() < 2 + sizes {
                return Parsed::Fatal(format!("bad {verb} arguments"));
            }
            let subject = args[1];
            let nums = &args[args.len() - sizes..];
            let mid = &args[2..args.len() - sizes];
            let (Some(total), hdr) = (
                nums.last().and_then(|s| s.parse::<usize>().ok()),
                if with_hdr {
                    nums[0].parse::<usize>().ok()
                } else {
                    Some(0)
                },
            ) else {
                return Parsed::Fatal(format!("bad {verb} size"));
            };
            let Some(hdr) = hdr.filter(|h| *h <= total) else {
                return Parsed::Fatal(format!("bad {verb} header size"));
            };
            if total > shared.cfg.max_payload.saturating_mul(2) + MAX_CONTROL_LINE {
                return Parsed::Fatal(format!("{verb} too large"));
            }
            let need = line_len + total + 2;
            if buf.len() < need {
                return Parsed::More;
            }
            let body = &buf[line_len..line_len + total];
            let (reply, queues): (Option<&str>, Vec<String>) = match mid {
                [] => (None, Vec::new()),
                ["+", reply, qs @ ..] => (Some(reply), qs.iter().map(|q| q.to_string()).collect()),
                ["|", qs @ ..] => (None, qs.iter().map(|q| q.to_string()).collect()),
                [reply] => (Some(reply), Vec::new()),
                _ => return Parsed::Fatal(format!("bad {verb} arguments")),
            };
            let (headers, payload) = body.split_at(hdr);
            shared.route_message(
                &Message {
                    subject,
                    reply,
                    headers: if with_hdr { Some(headers) } else { None },
                    payload,
                },
                Origin::Route(&queues),
            );
            Parsed::Done(need)
        }
        "-ERR" => Parsed::Fatal(format!("peer sent {line}")),
        _ => Parsed::Fatal(format!("unknown operation {verb}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rmsg_shapes() {
        let m = Message {
            subject: "foo",
            reply: Some("_INBOX.1"),
            headers: None,
            payload: b"hi",
        };
        assert_eq!(encode_rmsg(&m, &[]), b"RMSG $G foo _INBOX.1 2\r\nhi\r\n");
        assert_eq!(
            encode_rmsg(&m, &["q".to_string()]),
            b"RMSG $G foo + _INBOX.1 q 2\r\nhi\r\n"
        );
        let m = Message {
            subject: "foo",
            reply: None,
            headers: Some(b"NATS/1.0\r\n\r\n"),
            payload: b"hi",
        };
        assert_eq!(
            encode_rmsg(&m, &["a".to_string(), "b".to_string()]),
            b"HMSG $G foo | a b 12 14\r\nNATS/1.0\r\n\r\nhi\r\n"
        );
        assert_eq!(encode_rs(true, "a.>", Some("q")), b"RS+ $G a.> q 1\r\n");
        assert_eq!(encode_rs(false, "a.>", None), b"RS- $G a.>\r\n");
    }
}
