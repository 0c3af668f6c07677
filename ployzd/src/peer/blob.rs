//! The `blob` service: files (image archives, packed volumes) streamed
//! between machines in sealed chunks, checked against the size and sha256
//! announced first.

use super::*;
use ployz_api::ErrorCode;

/// What a `blob` session asks for.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BlobRequest {
    /// An image archive by its sha256 digest.
    Image { digest: String },
    /// A volume, packed as a tar archive.
    Volume { name: String },
    /// The archive of the image pull `id` (a deploy's operation id) running
    /// on the serving machine, sent while it is written. Earlier versions do
    /// not know it and close the session.
    Pulling { id: String },
}

/// The first answer of a `blob` session; `size` bytes follow in frames,
/// then an empty frame.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BlobAnswer {
    Ok {
        size: u64,
        sha256: String,
    },
    Error(ApiError),
    /// The blob (an image archive) is still being written: frames follow as
    /// it grows, then an empty frame, then a last answer: `Ok` with its size
    /// and sha256, or `Error` (the writer failed; nothing of it is to be
    /// kept). `layers`: the image's layers in order (hex digests), for a
    /// receiver that unpacks while it receives.
    Growing {
        #[serde(default)]
        layers: Vec<String>,
    },
}

/// What a `blob` session serves.
#[derive(Debug)]
pub enum Blob {
    /// A whole file.
    File(BlobSource),
    /// An image archive being written by a pull here.
    Growing(tokio::sync::watch::Receiver<ployz_runtime::registry::ArchiveState>),
}

/// A file the handler serves for a `blob` session.
#[derive(Debug)]
pub struct BlobSource {
    pub path: std::path::PathBuf,
    pub size: u64,
    /// `sha256:<hex>`.
    pub sha256: String,
    /// Delete the file once it is sent (a volume packed for this session).
    pub temporary: bool,
}

/// Bytes per frame of a blob stream.
const BLOB_CHUNK: usize = 256 << 10;
/// Frames queued between the network and the file, each way.
const BLOB_QUEUE: usize = 4;
/// Longest wait for the next frame of a blob stream.
const BLOB_IDLE: Duration = Duration::from_secs(30);

/// Why a blob could not be fetched.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    #[error("{addr}: {source}")]
    Io { addr: String, source: io::Error },
    #[error("{addr} refused: {}", .error.message)]
    Refused { addr: String, error: ApiError },
    #[error("{addr} sent {got} bytes with sha256 {actual}, announced {size} bytes with {expected}: the copy is corrupt and was discarded")]
    Corrupt {
        addr: String,
        size: u64,
        got: u64,
        expected: String,
        actual: String,
    },
}

/// Fetch a blob from the machine at `addr` into `dest`, checking its size and
/// sha256 against what the sender announced (and against `want_sha256` when
/// given). `dest` is removed on any failure.
pub async fn fetch_blob(
    addr: &str,
    secret: &ClusterSecret,
    me: &str,
    req: &BlobRequest,
    want_sha256: Option<&str>,
    dest: &std::path::Path,
) -> Result<(u64, String), FetchError> {
    fetch_blob_unpacking(addr, secret, me, req, want_sha256, dest, None)
        .await
        .map(|(size, sha256, _)| (size, sha256))
}

/// [`fetch_blob`]; and when the sender streams an image archive as it is
/// written (`Growing` with its layers) and `unpack` names a directory, the
/// image's root filesystem is built there from the bytes as they arrive
/// ([`ployz_runtime::image::unpack_archive_stream`]). The last value says
/// whether that tree is whole (else the caller drops it).
pub async fn fetch_blob_unpacking(
    addr: &str,
    secret: &ClusterSecret,
    me: &str,
    req: &BlobRequest,
    want_sha256: Option<&str>,
    dest: &std::path::Path,
    unpack: Option<&std::path::Path>,
) -> Result<(u64, String, bool), FetchError> {
    // The unpacker, once started: awaited before returning, whatever happens,
    // so nothing writes into `unpack` after this returns.
    let mut unpacker = None;
    let r = async {
        use sha2::Digest as _;
        let io_err = |source: io::Error| FetchError::Io {
            addr: addr.to_string(),
            source,
        };
        let mut conn = dial(addr, Service::Blob, secret, me)
            .await
            .map_err(io_err)?;
        conn.send(&serde_json::to_vec(req).map_err(|e| io_err(bad(e.to_string())))?)
            .await
            .map_err(io_err)?;
        let first = next_blob_frame(&mut conn).await.map_err(io_err)?;
        let mut unpack_layers = Vec::new();
        let refused = |error| FetchError::Refused {
            addr: addr.to_string(),
            error,
        };
        let wrong = |size, sha256: String| match want_sha256 {
            Some(want) if want != sha256 => Some(FetchError::Corrupt {
                addr: addr.to_string(),
                size,
                got: 0,
                expected: want.to_string(),
                actual: sha256,
            }),
            _ => None,
        };
        // Size and sha256 announced first, or (a growing blob) at the end.
        let announced = match serde_json::from_slice::<BlobAnswer>(&first)
            .map_err(|e| io_err(bad(e.to_string())))?
        {
            BlobAnswer::Ok { size, sha256 } => {
                if let Some(e) = wrong(size, sha256.clone()) {
                    return Err(e);
                }
                Some((size, sha256))
            }
            BlobAnswer::Growing { layers } => {
                unpack_layers = layers;
                None
            }
            BlobAnswer::Error(error) => return Err(refused(error)),
        };
        let limit = announced.as_ref().map_or(u64::MAX, |(size, _)| *size);
        // The unpacker reads what the writer wrote, on its own thread.
        let unpack_tx = match unpack {
            Some(root) if !unpack_layers.is_empty() => {
                let (tx, rx) = std::sync::mpsc::sync_channel::<Vec<u8>>(BLOB_QUEUE);
                let root = root.to_path_buf();
                let layers = std::mem::take(&mut unpack_layers);
                let h = tokio::task::spawn_blocking(move || {
                    ployz_runtime::image::unpack_archive_stream(
                        ChanReader {
                            rx,
                            cur: Vec::new(),
                            pos: 0,
                        },
                        &layers,
                        &root,
                    )
                });
                unpacker = Some(h);
                Some(tx)
            }
            _ => None,
        };
        // Hashing and writing run on a blocking thread, fed through a short
        // queue, while this task receives and decrypts the next frames.
        let file = tokio::fs::File::create(dest)
            .await
            .map_err(io_err)?
            .into_std()
            .await;
        let (tx, mut rx) = tokio::sync::mpsc::channel::<Vec<u8>>(BLOB_QUEUE);
        let writer = tokio::task::spawn_blocking(move || -> io::Result<String> {
            use std::io::Write;
            let mut file = file;
            let mut hasher = sha2::Sha256::new();
            let mut unsynced = 0u64;
            let mut unpack_tx = unpack_tx;
            while let Some(chunk) = rx.blocking_recv() {
                hasher.update(&chunk);
                file.write_all(&chunk)?;
                unsynced += chunk.len() as u64;
                if unsynced >= ployz_runtime::image::WRITEBACK_EVERY {
                    // The sync_all below then finds little left to write.
                    ployz_runtime::image::start_writeback(&file);
                    unsynced = 0;
                }
                if let Some(tx) = &unpack_tx {
                    if tx.send(chunk).is_err() {
                        unpack_tx = None;
                    }
                }
            }
            drop(unpack_tx);
            file.sync_all()?;
            Ok(format!("sha256:{:x}", hasher.finalize()))
        });
        let mut got = 0u64;
        let received = async {
            loop {
                let chunk = next_blob_frame(&mut conn).await?;
                if chunk.is_empty() {
                    break;
                }
                got += chunk.len() as u64;
                if got > limit {
                    break;
                }
                if tx.send(chunk).await.is_err() {
                    // The writer failed: its error says why.
                    break;
                }
            }
            io::Result::Ok(())
        }
        .await;
        drop(tx);
        let written = writer
            .await
            .map_err(|e| io_err(io::Error::other(e.to_string())))?;
        received.map_err(io_err)?;
        let (size, sha256) = match announced {
            Some(a) => a,
            None => match serde_json::from_slice::<BlobAnswer>(
                &next_blob_frame(&mut conn).await.map_err(io_err)?,
            )
            .map_err(|e| io_err(bad(e.to_string())))?
            {
                BlobAnswer::Ok { size, sha256 } => {
                    if let Some(e) = wrong(size, sha256.clone()) {
                        return Err(e);
                    }
                    (size, sha256)
                }
                BlobAnswer::Error(error) => return Err(refused(error)),
                BlobAnswer::Growing { .. } => {
                    return Err(io_err(bad("a growing blob ended without its size")))
                }
            },
        };
        let actual = written.map_err(io_err)?;
        if got != size || actual != sha256 {
            return Err(FetchError::Corrupt {
                addr: addr.to_string(),
                size,
                got,
                expected: sha256,
                actual,
            });
        }
        Ok((size, sha256))
    }
    .await;
    let unpacked = match unpacker {
        Some(h) => h.await.unwrap_or(false),
        None => false,
    };
    let r = r.map(|(size, sha256)| (size, sha256, unpacked));
    if r.is_err() {
        let _ = tokio::fs::remove_file(dest).await;
    }
    r
}

/// The next frame of a blob stream, with an idle deadline.
async fn next_blob_frame(conn: &mut SecureConn) -> io::Result<Vec<u8>> {
    tokio::time::timeout(BLOB_IDLE, conn.recv())
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "the sender stalled"))??
        .ok_or_else(|| io::Error::new(io::ErrorKind::UnexpectedEof, "the sender closed early"))
}

pub(super) async fn serve_blob<H: PeerHandler>(
    mut conn: SecureConn,
    handler: Arc<H>,
) -> io::Result<()> {
    let Some(frame) = conn.recv().await? else {
        return Ok(());
    };
    let req: BlobRequest = serde_json::from_slice(&frame).map_err(|e| bad(e.to_string()))?;
    let src = match handler.blob(req).await {
        Ok(Blob::File(src)) => src,
        Ok(Blob::Growing(rx)) => return serve_growing(conn, rx).await,
        Err(e) => {
            let answer =
                serde_json::to_vec(&BlobAnswer::Error(e)).map_err(|e| bad(e.to_string()))?;
            return conn.send(&answer).await;
        }
    };
    let result = async {
        let file = tokio::fs::File::open(&src.path).await?.into_std().await;
        let answer = BlobAnswer::Ok {
            size: src.size,
            sha256: src.sha256.clone(),
        };
        conn.send(&serde_json::to_vec(&answer).map_err(|e| bad(e.to_string()))?)
            .await?;
        // The file is read ahead on a blocking thread while this task seals
        // and sends what was read.
        let (tx, mut rx) = tokio::sync::mpsc::channel::<io::Result<Vec<u8>>>(BLOB_QUEUE);
        let size = src.size;
        let reader = tokio::task::spawn_blocking(move || {
            use std::io::Read;
            let mut file = file;
            let mut left = size;
            while left > 0 {
                let want = (left as usize).min(BLOB_CHUNK);
                let mut buf = vec![0u8; want];
                let read = file.read_exact(&mut buf).map(|()| buf);
                let failed = read.is_err();
                if tx.blocking_send(read).is_err() || failed {
                    return;
                }
                left -= want as u64;
            }
        });
        let sent = async {
            while let Some(chunk) = rx.recv().await {
                conn.send(&chunk?).await?;
            }
            conn.send(&[]).await
        }
        .await;
        drop(rx);
        let _ = reader.await;
        sent
    }
    .await;
    if src.temporary {
        let _ = tokio::fs::remove_file(&src.path).await;
    }
    result
}

/// Sends a pull's archive while it is written: what is written so far, then
/// more as the pull reports it, then the end (size and digest once the image
/// is stored, or the pull's error).
async fn serve_growing(
    mut conn: SecureConn,
    mut rx: tokio::sync::watch::Receiver<ployz_runtime::registry::ArchiveState>,
) -> io::Result<()> {
    use ployz_runtime::registry::ArchiveState;
    let json = |a: &BlobAnswer| serde_json::to_vec(a).map_err(|e| bad(e.to_string()));
    // The layers are known once the archive is begun.
    let layers = match &*rx
        .wait_for(|s| !matches!(s, ArchiveState::Waiting))
        .await
        .map_err(|_| bad("the pull stopped before it began"))?
    {
        ArchiveState::Writing { layers, .. } | ArchiveState::Done { layers, .. } => layers.to_vec(),
        _ => Vec::new(),
    };
    conn.send(&json(&BlobAnswer::Growing { layers })?).await?;
    let mut sent = 0u64;
    let mut closed = false;
    let end = loop {
        let state = rx.borrow_and_update().clone();
        let (file, upto, end) = match state {
            ArchiveState::Waiting => (None, 0, None),
            ArchiveState::Writing { file, written, .. } => (Some(file), written, None),
            ArchiveState::Done {
                file, size, digest, ..
            } => (
                Some(file),
                size,
                Some(BlobAnswer::Ok {
                    size,
                    sha256: digest,
                }),
            ),
            ArchiveState::Failed(why) => (
                None,
                0,
                Some(BlobAnswer::Error(ApiError::new(
                    ErrorCode::Unavailable,
                    format!("the pull failed: {why}"),
                ))),
            ),
        };
        if let Some(file) = file {
            while sent < upto {
                let want = (upto - sent).min(BLOB_CHUNK as u64) as usize;
                let f = file.clone();
                let at = sent;
                let chunk = tokio::task::spawn_blocking(move || {
                    use std::os::unix::fs::FileExt;
                    let mut buf = vec![0u8; want];
                    f.read_exact_at(&mut buf, at).map(|()| buf)
                })
                .await
                .map_err(|e| io::Error::other(e.to_string()))??;
                conn.send(&chunk).await?;
                sent += want as u64;
            }
        }
        if let Some(end) = end {
            break end;
        }
        if closed {
            break BlobAnswer::Error(ApiError::new(
                ErrorCode::Unavailable,
                "the pull stopped before it finished",
            ));
        }
        // Closed: one more look at the last state it left.
        closed = rx.changed().await.is_err();
    };
    conn.send(&[]).await?;
    conn.send(&json(&end)?).await
}

/// Reads the chunks a channel delivers, in order, until it closes.
struct ChanReader {
    rx: std::sync::mpsc::Receiver<Vec<u8>>,
    cur: Vec<u8>,
    pos: usize,
}

impl io::Read for ChanReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        while self.pos == self.cur.len() {
            match self.rx.recv() {
                Ok(c) => {
                    self.cur = c;
                    self.pos = 0;
                }
                Err(_) => return Ok(0),
            }
        }
        let n = buf.len().min(self.cur.len() - self.pos);
        buf[..n].copy_from_slice(&self.cur[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
}
