//! One request/reply over ployzd's Unix socket.

use ployz_api::{ApiError, Reply, Request, Response};
use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Longest a request may take before ployzctl gives up waiting.
/// Longest silence between two lines of a reply (long requests send progress).
const TIMEOUT: Duration = Duration::from_secs(600);

pub fn default_socket() -> PathBuf {
    if std::env::var_os("PLOYZ_SOCKET").is_none() {
        // SAFETY: geteuid has no preconditions.
        let uid = unsafe { libc::geteuid() };
        if uid != 0 {
            let runtime = std::env::var_os("XDG_RUNTIME_DIR")
                .map(PathBuf::from)
                .unwrap_or_else(|| PathBuf::from(format!("/run/user/{uid}")));
            return runtime.join("ployz/ployzd.sock");
        }
    }
    PathBuf::from("/run/ployz/ployzd.sock")
}

#[derive(Debug)]
pub enum ClientError {
    NoDaemon { socket: PathBuf, why: String },
    Denied { socket: PathBuf },
    Protocol(String),
}

impl ClientError {
    pub fn exit_code(&self) -> i32 {
        match self {
            ClientError::NoDaemon { .. } | ClientError::Denied { .. } => crate::exit::NO_DAEMON,
            ClientError::Protocol(_) => crate::exit::INTERNAL,
        }
    }

    pub fn message(&self) -> String {
        match self {
            ClientError::NoDaemon { socket, why } => {
                format!("cannot reach ployzd at {} ({why})", socket.display())
            }
            ClientError::Denied { socket } => {
                format!("permission denied on {}", socket.display())
            }
            ClientError::Protocol(m) => m.clone(),
        }
    }

    pub fn hint(&self) -> Option<String> {
        match self {
            ClientError::NoDaemon { .. } => Some(
                "start it with `sudo ployzd run` (or `systemctl start ployzd`), or point ployzctl at a running one with --socket PATH or PLOYZ_SOCKET".into(),
            ),
            ClientError::Denied { .. } => Some(
                "the socket is for root and ployzd's own user only: run ployzctl with sudo".into(),
            ),
            ClientError::Protocol(_) => Some(
                "check that ployzctl and ployzd are the same version (`--version`)".into(),
            ),
        }
    }
}

/// What a file that is not a socket is, for the message.
fn file_kind(t: &std::fs::FileType) -> &'static str {
    if t.is_file() {
        "it is a regular file"
    } else if t.is_dir() {
        "it is a directory"
    } else {
        "it is a special file"
    }
}

pub fn call(socket: &Path, req: &Request) -> Result<Result<Response, ApiError>, ClientError> {
    let mut stream = UnixStream::connect(socket).map_err(|e| match e.kind() {
        std::io::ErrorKind::PermissionDenied => ClientError::Denied {
            socket: socket.into(),
        },
        std::io::ErrorKind::NotFound => ClientError::NoDaemon {
            socket: socket.into(),
            why: "no such socket".into(),
        },
        std::io::ErrorKind::ConnectionRefused => ClientError::NoDaemon {
            socket: socket.into(),
            why: match std::fs::metadata(socket) {
                Ok(m) if !m.file_type().is_socket() => {
                    format!("{}, not a socket", file_kind(&m.file_type()))
                }
                _ => "nothing is listening; the socket is left over from a stopped daemon".into(),
            },
        },
        _ => ClientError::NoDaemon {
            socket: socket.into(),
            why: e.to_string(),
        },
    })?;
    let _ = stream.set_read_timeout(Some(TIMEOUT));
    let mut line = serde_json::to_vec(req).expect("requests serialise");
    line.push(b'\n');
    stream
        .write_all(&line)
        .map_err(|e| ClientError::Protocol(format!("sending the request failed: {e}")))?;
    let mut rd = BufReader::new(&stream);
    let mut progress = crate::progress::ProgressView::for_stderr();
    let r = read_reply(&mut rd, &mut progress);
    progress.finish();
    r
}

fn read_reply(
    rd: &mut impl BufRead,
    progress: &mut crate::progress::ProgressView,
) -> Result<Result<Response, ApiError>, ClientError> {
    loop {
        let mut reply = String::new();
        rd.read_line(&mut reply)
            .map_err(|e| ClientError::Protocol(format!("reading the reply failed: {e}")))?;
        if reply.is_empty() {
            return Err(ClientError::Protocol(
                "ployzd closed the connection without answering".into(),
            ));
        }
        match serde_json::from_str::<Reply>(&reply) {
            Ok(Reply::Ok(r)) => return Ok(Ok(r)),
            Ok(Reply::Error(e)) => return Ok(Err(e)),
            // Live progress goes to stderr; stdout stays the result.
            Ok(Reply::Progress(p)) => progress.show(&p),
            Err(e) => {
                return Err(ClientError::Protocol(format!(
                    "ployzd's reply does not parse: {e}"
                )))
            }
        }
    }
}
