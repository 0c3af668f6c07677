//! The local API socket. Only root, or the user ployzd runs as, may connect:
//! the socket is created mode 0600 in a directory we make 0700, and every
//! connection's peer credentials are checked again.

use crate::daemon::Daemon;
use ployz_api::{ApiError, ErrorCode, Reply, Request};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};

/// Longest request line accepted.
pub const MAX_REQUEST_BYTES: usize = 1 << 20;

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("another ployzd is already serving {0}; stop it first (or pass a different --socket)")]
    InUse(PathBuf),
    #[error(
        "{} is {kind}, not a socket: ployzd leaves it alone; move it away or pass a different --socket",
        path.display()
    )]
    NotASocket { path: PathBuf, kind: &'static str },
    #[error("cannot prepare the socket directory {path}: {source}")]
    Dir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot listen on {path}: {source}")]
    Bind {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// Bind the API socket at `path`, replacing a stale socket file left by a
/// crashed daemon but never one that a live daemon still answers on.
pub async fn bind(path: &Path) -> Result<UnixListener, ServeError> {
    if let Some(dir) = path.parent() {
        if !dir.exists() {
            std::fs::create_dir_all(dir).map_err(|source| ServeError::Dir {
                path: dir.into(),
                source,
            })?;
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)).map_err(
                |source| ServeError::Dir {
                    path: dir.into(),
                    source,
                },
            )?;
        }
    }
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        if let Some(kind) = not_a_socket(&meta.file_type()) {
            return Err(ServeError::NotASocket {
                path: path.into(),
                kind,
            });
        }
        if UnixStream::connect(path).await.is_ok() {
            return Err(ServeError::InUse(path.into()));
        }
        let _ = std::fs::remove_file(path);
    }
    // Create the socket with no access for others from the first instant.
    // SAFETY: umask only changes this process's file creation mask.
    let old = unsafe { libc::umask(0o177) };
    let listener = UnixListener::bind(path);
    // SAFETY: as above; restores the previous mask.
    unsafe { libc::umask(old) };
    let listener = listener.map_err(|source| ServeError::Bind {
        path: path.into(),
        source,
    })?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(|source| {
        ServeError::Bind {
            path: path.into(),
            source,
        }
    })?;
    Ok(listener)
}

/// What a file that is not a socket is, for the message (`None`: a socket).
pub fn not_a_socket(t: &std::fs::FileType) -> Option<&'static str> {
    use std::os::unix::fs::FileTypeExt;
    if t.is_socket() {
        None
    } else if t.is_file() {
        Some("a regular file")
    } else if t.is_dir() {
        Some("a directory")
    } else if t.is_symlink() {
        Some("a symbolic link")
    } else {
        Some("a special file")
    }
}

/// Accept connections until `shutdown` fires.
pub async fn serve(
    listener: UnixListener,
    daemon: Arc<Daemon>,
    mut shutdown: tokio::sync::watch::Receiver<bool>,
) {
    // SAFETY: geteuid has no preconditions.
    let me = unsafe { libc::geteuid() };
    loop {
        tokio::select! {
            _ = shutdown.changed() => return,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    let daemon = daemon.clone();
                    tokio::spawn(async move {
                        if let Err(e) = connection(stream, daemon, me).await {
                            tracing::debug!("api connection ended: {e}");
                        }
                    });
                }
                Err(e) => {
                    tracing::warn!("api accept failed: {e}");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                }
            }
        }
    }
}

fn allowed(peer_uid: u32, daemon_uid: u32) -> bool {
    peer_uid == 0 || peer_uid == daemon_uid
}

async fn connection(stream: UnixStream, daemon: Arc<Daemon>, me: u32) -> std::io::Result<()> {
    let uid = stream.peer_cred()?.uid();
    let (rd, mut wr) = stream.into_split();
    if !allowed(uid, me) {
        let reply = Reply::Error(ApiError::new(
            ErrorCode::PermissionDenied,
            format!("uid {uid} may not use this ployzd: only root or the daemon's own user may"),
        ));
        return write_reply(&mut wr, &reply).await;
    }
    let mut rd = BufReader::new(rd);
    let mut line = Vec::new();
    loop {
        line.clear();
        let n = (&mut rd)
            .take(MAX_REQUEST_BYTES as u64 + 1)
            .read_until(b'\n', &mut line)
            .await?;
        if n == 0 {
            return Ok(());
        }
        if line.len() > MAX_REQUEST_BYTES {
            let reply = Reply::Error(ApiError::new(
                ErrorCode::InvalidArgument,
                format!("request longer than {MAX_REQUEST_BYTES} bytes"),
            ));
            return write_reply(&mut wr, &reply).await;
        }
        let reply = match serde_json::from_slice::<Request>(&line) {
            Ok(req) => {
                // Only the request's name: requests carry secrets (invite
                // tokens, registry passwords) that never go to a log.
                if tracing::enabled!(tracing::Level::DEBUG) {
                    tracing::debug!(request = %request_name(&req), "api request");
                }
                // Long requests report progress while they run.
                let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
                let work = daemon.handle_with(req, 0, &tx);
                tokio::pin!(work);
                let reply = loop {
                    tokio::select! {
                        biased;
                        Some(p) = rx.recv() => write_reply(&mut wr, &Reply::Progress(p)).await?,
                        r = &mut work => break Reply::from(r),
                    }
                };
                // Progress sent just before the end still goes out, in order.
                while let Ok(p) = rx.try_recv() {
                    write_reply(&mut wr, &Reply::Progress(p)).await?;
                }
                reply
            }
            Err(e) => Reply::Error(ApiError::new(
                ErrorCode::InvalidArgument,
                format!(
                    "malformed request: {e}; is ployzctl the same version as ployzd ({})?",
                    crate::VERSION
                ),
            )),
        };
        write_reply(&mut wr, &reply).await?;
    }
}

/// The name of a request (`"invite_import"`), without its fields.
fn request_name(req: &Request) -> String {
    match serde_json::to_value(req) {
        Ok(serde_json::Value::String(s)) => s,
        // Requests are tagged by "op".
        Ok(serde_json::Value::Object(m)) => match m.get("op") {
            Some(serde_json::Value::String(op)) => op.clone(),
            _ => String::from("?"),
        },
        _ => String::from("?"),
    }
}

async fn write_reply(
    wr: &mut tokio::net::unix::OwnedWriteHalf,
    reply: &Reply,
) -> std::io::Result<()> {
    let mut bytes = serde_json::to_vec(reply).expect("replies serialise");
    bytes.push(b'\n');
    wr.write_all(&bytes).await?;
    wr.flush().await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_root_or_owner() {
        assert!(allowed(0, 1000));
        assert!(allowed(1000, 1000));
        assert!(!allowed(1001, 1000));
        assert!(allowed(0, 0));
        assert!(!allowed(1000, 0));
    }

    #[test]
    fn logged_request_names_carry_no_fields() {
        let req = Request::InviteImport {
            token: "secret-token-body.sig".into(),
        };
        assert_eq!(request_name(&req), "invite_import");
        assert_eq!(request_name(&Request::MeshStatus), "mesh_status");
    }
}
