//! A small client of the Docker Engine API: the dozen endpoints the docker
//! backend uses, over dockerd's unix socket, with the HTTP/1 client of the
//! hyper already in the binary (a generated client of the whole API, with a
//! model type for every object, was 0.2 MB of ployzd and its slowest crate to
//! build: issue 16).
//!
//! Each request opens its own connection (dockerd serves a unix socket; a
//! connect costs microseconds) so that requests never queue behind a long one
//! (a log read, an exec). Bodies and answers are JSON values: the backend
//! reads the few fields it needs. Streams (logs, exec output) arrive in
//! dockerd's multiplexed framing, which [`demux`] strips.

use bytes::Bytes;
use http_body_util::{BodyExt, Full, StreamBody};

use hyper::body::Frame;
use hyper::{Method, Request, StatusCode};
use hyper_util::rt::TokioIo;
use serde_json::Value;
use std::path::PathBuf;
use tokio::net::UnixStream;

/// What a Docker Engine API call can fail with.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// dockerd answered with an error status (its JSON `message`).
    #[error("dockerd answered {status}: {message}")]
    Status { status: u16, message: String },
    /// The socket could not be reached or the exchange broke off.
    #[error("cannot talk to dockerd at {}: {reason}", socket.display())]
    Transport { socket: PathBuf, reason: String },
    /// An answer that is not what the API documents.
    #[error("unexpected answer from dockerd to {what}: {reason}")]
    Answer { what: String, reason: String },
    /// A request that could not be built (a path that is not a valid URI).
    #[error("cannot build a request for {path}: {reason}")]
    Request { path: String, reason: String },
    /// A `DOCKER_HOST` this client cannot use.
    #[error(
        "DOCKER_HOST={0} is not a unix socket (unix:///path): only a local dockerd is supported"
    )]
    Host(String),
}

impl Error {
    /// The HTTP status dockerd answered with, if it answered.
    pub fn status(&self) -> Option<u16> {
        match self {
            Error::Status { status, .. } => Some(*status),
            _ => None,
        }
    }

    /// dockerd's message for an error status.
    pub fn message(&self) -> Option<&str> {
        match self {
            Error::Status { message, .. } => Some(message),
            _ => None,
        }
    }
}

/// A request body: nothing, JSON, or a stream of chunks (an image archive).
pub enum Body {
    Empty,
    Json(Value),
    Stream(tokio::sync::mpsc::Receiver<std::io::Result<Bytes>>),
}

/// The local dockerd.
#[derive(Clone, Debug)]
pub struct Dockerd {
    socket: PathBuf,
}

impl Dockerd {
    /// `DOCKER_HOST` (`unix:///path`) or `/var/run/docker.sock`. Nothing is
    /// connected yet: the first call reports an unreachable daemon.
    pub fn from_env() -> Result<Self, Error> {
        let host = std::env::var("DOCKER_HOST").ok();
        Ok(Dockerd {
            socket: socket_of(host.as_deref())?,
        })
    }

    fn transport(&self, reason: impl std::fmt::Display) -> Error {
        Error::Transport {
            socket: self.socket.clone(),
            reason: reason.to_string(),
        }
    }

    /// Sends one request and returns the whole answer body. An error status
    /// (and 304, "nothing to do") becomes [`Error::Status`] with dockerd's message.
    pub async fn call(&self, method: Method, path: &str, body: Body) -> Result<Bytes, Error> {
        let mut all = Vec::new();
        self.call_stream(method, path, body, |chunk| all.extend_from_slice(chunk))
            .await?;
        Ok(all.into())
    }

    /// [`Dockerd::call`] that hands the answer's chunks to `sink` as they
    /// arrive instead of keeping them (an exec's output can be unbounded).
    pub async fn call_stream(
        &self,
        method: Method,
        path: &str,
        body: Body,
        mut sink: impl FnMut(&[u8]),
    ) -> Result<(), Error> {
        let resp = self.send(method, path, body).await?;
        let status = resp.status();
        let failed = status.is_client_error()
            || status.is_server_error()
            || status == StatusCode::NOT_MODIFIED;
        let mut body = resp.into_body();
        let mut error_body = Vec::new();
        while let Some(frame) = body.frame().await {
            let frame = frame.map_err(|e| self.transport(e))?;
            if let Some(data) = frame.data_ref() {
                if failed {
                    error_body.extend_from_slice(data);
                } else {
                    sink(data);
                }
            }
        }
        if failed {
            return Err(Error::Status {
                status: status.as_u16(),
                message: error_message(&error_body),
            });
        }
        Ok(())
    }

    /// [`Dockerd::call`] for an answer that is a JSON document.
    pub async fn json(&self, method: Method, path: &str, body: Body) -> Result<Value, Error> {
        let bytes = self.call(method, path, body).await?;
        serde_json::from_slice(&bytes).map_err(|e| Error::Answer {
            what: path.to_string(),
            reason: e.to_string(),
        })
    }

    async fn send(
        &self,
        method: Method,
        path: &str,
        body: Body,
    ) -> Result<hyper::Response<hyper::body::Incoming>, Error> {
        let stream = UnixStream::connect(&self.socket)
            .await
            .map_err(|e| self.transport(e))?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| self.transport(e))?;
        // Drives the connection until the answer has been read (or dropped).
        tokio::spawn(async move {
            let _ = conn.await;
        });
        let req = Request::builder()
            .method(method)
            .uri(path)
            .header(hyper::header::HOST, "docker");
        type BoxBody = http_body_util::combinators::BoxBody<Bytes, std::io::Error>;
        let (req, body): (_, BoxBody) = match body {
            Body::Empty => (req, Full::new(Bytes::new()).map_err(|n| match n {}).boxed()),
            Body::Json(v) => (
                req.header(hyper::header::CONTENT_TYPE, "application/json"),
                Full::new(Bytes::from(v.to_string()))
                    .map_err(|n| match n {})
                    .boxed(),
            ),
            Body::Stream(rx) => (
                req.header(hyper::header::CONTENT_TYPE, "application/x-tar"),
                StreamBody::new(ReceiverStream(rx)).boxed(),
            ),
        };
        let req = req.body(body).map_err(|e| Error::Request {
            path: path.to_string(),
            reason: e.to_string(),
        })?;
        sender
            .send_request(req)
            .await
            .map_err(|e| self.transport(e))
    }
}

/// The chunks of a streamed request body.
struct ReceiverStream(tokio::sync::mpsc::Receiver<std::io::Result<Bytes>>);

impl futures_util::Stream for ReceiverStream {
    type Item = std::io::Result<Frame<Bytes>>;

    fn poll_next(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Self::Item>> {
        self.0.poll_recv(cx).map(|c| c.map(|c| c.map(Frame::data)))
    }
}

/// The socket a `DOCKER_HOST` value names.
fn socket_of(docker_host: Option<&str>) -> Result<PathBuf, Error> {
    match docker_host {
        None | Some("") => Ok(PathBuf::from("/var/run/docker.sock")),
        Some(h) => match h.strip_prefix("unix://") {
            Some(path) if path.starts_with('/') => Ok(PathBuf::from(path)),
            _ => Err(Error::Host(h.to_string())),
        },
    }
}

/// dockerd's error answers are `{"message": "..."}`; anything else is shown as is.
fn error_message(body: &[u8]) -> String {
    serde_json::from_slice::<Value>(body)
        .ok()
        .and_then(|v| v.get("message").and_then(Value::as_str).map(str::to_string))
        .unwrap_or_else(|| String::from_utf8_lossy(body).trim().to_string())
}

fn percent_encode(value: &str, keep: &[u8]) -> String {
    let mut out = String::with_capacity(value.len());
    for b in value.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) || keep.contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Percent-encodes a query parameter value.
pub fn query(value: &str) -> String {
    percent_encode(value, b"")
}

/// A name in a path (a container, an image reference such as
/// `ghcr.io/o/app:1@sha256:...`, a network): dockerd's routes take the
/// reference's `/`, `:` and `@` as they are; anything else is encoded.
pub fn segment(name: &str) -> String {
    percent_encode(name, b"/:@")
}

/// The payload of dockerd's multiplexed stream framing (logs and exec output
/// of a container without a TTY): frames of an 8-byte header (stream type
/// 0/1/2, three zero bytes, big-endian length) and their bytes, cut anywhere
/// into chunks. Output that does not start with such a header (a TTY's raw
/// stream) is passed on as is.
#[derive(Default)]
pub struct Demux {
    /// Header bytes of the next frame seen so far.
    header: Vec<u8>,
    /// Payload bytes left in the current frame.
    left: usize,
    /// `Some(false)` once the stream turned out not to be framed.
    framed: Option<bool>,
}

impl Demux {
    /// Feeds one chunk; the payload goes to `out`.
    pub fn push(&mut self, mut chunk: &[u8], out: &mut Vec<u8>) {
        while !chunk.is_empty() {
            if self.framed == Some(false) {
                out.extend_from_slice(chunk);
                return;
            }
            if self.left > 0 {
                let n = self.left.min(chunk.len());
                out.extend_from_slice(&chunk[..n]);
                self.left -= n;
                chunk = &chunk[n..];
                continue;
            }
            let need = 8 - self.header.len();
            let n = need.min(chunk.len());
            self.header.extend_from_slice(&chunk[..n]);
            chunk = &chunk[n..];
            let h = &self.header;
            if self.framed.is_none() && !(h[0] <= 2 && h[1..].iter().take(3).all(|b| *b == 0)) {
                // Not a frame header: raw output from the start.
                self.framed = Some(false);
                out.append(&mut self.header);
                continue;
            }
            if self.header.len() == 8 {
                self.framed = Some(true);
                self.left = u32::from_be_bytes([h[4], h[5], h[6], h[7]]) as usize;
                self.header.clear();
            }
        }
    }

    /// Whatever a short raw stream (under one header's length) left buffered.
    pub fn finish(mut self, out: &mut Vec<u8>) {
        if self.framed.is_none() {
            out.append(&mut self.header);
        }
    }
}

/// [`Demux`] over a whole answer.
pub fn demux(raw: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(raw.len());
    let mut d = Demux::default();
    d.push(raw, &mut out);
    d.finish(&mut out);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_are_stripped_and_raw_output_kept() {
        let mut framed = vec![1, 0, 0, 0, 0, 0, 0, 6];
        framed.extend_from_slice(b"hello\n");
        framed.extend_from_slice(&[2, 0, 0, 0, 0, 0, 0, 4]);
        framed.extend_from_slice(b"err\n");
        assert_eq!(demux(&framed), b"hello\nerr\n");
        assert_eq!(demux(b"plain tty output"), b"plain tty output");
        assert_eq!(demux(b""), b"");
        // A frame cut short keeps what arrived.
        assert_eq!(demux(&[1, 0, 0, 0, 0, 0, 0, 9, b'a', b'b']), b"ab");
        // Chunks cut anywhere, headers included.
        for cut in 1..framed.len() {
            let mut d = Demux::default();
            let mut out = Vec::new();
            for piece in framed.chunks(cut) {
                d.push(piece, &mut out);
            }
            d.finish(&mut out);
            assert_eq!(out, b"hello\nerr\n", "chunks of {cut}");
        }
        let mut d = Demux::default();
        let mut out = Vec::new();
        d.push(b"ok", &mut out);
        d.finish(&mut out);
        assert_eq!(out, b"ok");
    }

    #[test]
    fn error_bodies_and_query_values() {
        assert_eq!(
            error_message(br#"{"message":"No such container: x"}"#),
            "No such container: x"
        );
        assert_eq!(error_message(b"page not found\n"), "page not found");
        assert_eq!(
            query(r#"{"label":["ployz.managed=true"]}"#),
            "%7B%22label%22%3A%5B%22ployz.managed%3Dtrue%22%5D%7D"
        );
        assert_eq!(
            segment("ghcr.io/o/app:1@sha256:ab"),
            "ghcr.io/o/app:1@sha256:ab"
        );
        assert_eq!(segment("a b?c#d"), "a%20b%3Fc%23d");
    }

    #[test]
    fn docker_host_must_be_a_unix_socket() {
        assert_eq!(
            socket_of(None).unwrap(),
            PathBuf::from("/var/run/docker.sock")
        );
        assert_eq!(
            socket_of(Some("")).unwrap(),
            PathBuf::from("/var/run/docker.sock")
        );
        assert_eq!(
            socket_of(Some("unix:///run/d.sock")).unwrap(),
            PathBuf::from("/run/d.sock")
        );
        for bad in [
            "tcp://1.2.3.4:2375",
            "unix://relative.sock",
            "/var/run/docker.sock",
        ] {
            assert!(matches!(socket_of(Some(bad)), Err(Error::Host(_))), "{bad}");
        }
    }
}
