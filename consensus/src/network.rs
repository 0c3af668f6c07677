//! Raft RPCs over plain TCP.
//!
//! Wire format: every message is one frame, a `u32` big-endian length followed by that many
//! bytes of JSON. A connection carries any number of request/response pairs, strictly in turn:
//! the client writes a [`RaftRequest`], the server answers with the matching [`RaftResponse`].
//! Clients keep a small pool of idle connections per peer and reconnect on failure.
//!
//! Nothing here knows about the overlay: peers are dialled at [`PloyzNode::addr`], so the same
//! code runs over a LAN or a WireGuard mesh. Snapshots use openraft's chunked
//! `install_snapshot` RPC (chunk size `Config::snapshot_max_chunk_size`).

use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::sync::Arc;
use std::sync::Mutex;
use std::time::Duration;

use openraft::error::InstallSnapshotError;
use openraft::error::NetworkError;
use openraft::error::RPCError;
use openraft::error::RaftError;
use openraft::error::RemoteError;
use openraft::error::Timeout;
use openraft::error::Unreachable;
use openraft::network::RPCOption;
use openraft::raft::AppendEntriesRequest;
use openraft::raft::AppendEntriesResponse;
use openraft::raft::InstallSnapshotRequest;
use openraft::raft::InstallSnapshotResponse;
use openraft::raft::VoteRequest;
use openraft::raft::VoteResponse;
use openraft::RPCTypes;
use openraft::RaftNetwork;
use openraft::RaftNetworkFactory;
use serde::Deserialize;
use serde::Serialize;
use tokio::io::AsyncRead;
use tokio::io::AsyncReadExt;
use tokio::io::AsyncWrite;
use tokio::io::AsyncWriteExt;
use tokio::io::BufReader;
use tokio::io::BufWriter;
use tokio::net::TcpListener;
use tokio::net::TcpStream;
use tokio::task::JoinSet;

use crate::NodeId;
use crate::PloyzNode;
use crate::Raft;
use crate::TypeConfig;

/// Largest frame accepted from a peer (a snapshot chunk of 3 MiB is about 12 MiB of JSON).
pub const MAX_FRAME: usize = 64 * 1024 * 1024;

/// Idle connections kept per peer.
const MAX_IDLE_PER_PEER: usize = 4;

/// A Raft RPC request.
#[derive(Debug, Serialize, Deserialize)]
pub enum RaftRequest {
    AppendEntries(AppendEntriesRequest<TypeConfig>),
    Vote(VoteRequest<NodeId>),
    InstallSnapshot(InstallSnapshotRequest<TypeConfig>),
    /// What this binary supports. A binary from before this request existed fails to decode it
    /// and closes the connection: no answer means no optional feature.
    Features,
}

/// Optional log formats a node's binary reads, as it answers [`RaftRequest::Features`].
/// Unknown fields are ignored and missing ones are `false`, so any two versions understand
/// each other's answer.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Features {
    /// Reads group entries ([`crate::Txn::group`]).
    #[serde(default)]
    pub group_commit: bool,
}

impl Features {
    /// What this binary supports.
    pub const CURRENT: Features = Features { group_commit: true };
}

/// The answer to a [`RaftRequest`] of the same variant.
#[derive(Debug, Serialize, Deserialize)]
pub enum RaftResponse {
    AppendEntries(Result<AppendEntriesResponse<NodeId>, RaftError<NodeId>>),
    Vote(Result<VoteResponse<NodeId>, RaftError<NodeId>>),
    InstallSnapshot(
        Result<InstallSnapshotResponse<NodeId>, RaftError<NodeId, InstallSnapshotError>>,
    ),
    Features(Features),
}

/// Writes one frame and flushes.
pub async fn write_frame<W: AsyncWrite + Unpin>(w: &mut W, payload: &[u8]) -> io::Result<()> {
    let len = u32::try_from(payload.len())
        .ok()
        .filter(|l| (*l as usize) <= MAX_FRAME)
        .ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("frame of {} bytes exceeds {MAX_FRAME}", payload.len()),
            )
        })?;
    w.write_all(&len.to_be_bytes()).await?;
    w.write_all(payload).await?;
    w.flush().await
}

/// Reads one frame; `None` when the peer closed the connection cleanly between frames.
pub async fn read_frame<R: AsyncRead + Unpin>(r: &mut R) -> io::Result<Option<Vec<u8>>> {
    let mut len = [0u8; 4];
    match r.read_exact(&mut len).await {
        Ok(_) => {}
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e),
    }
    let len = u32::from_be_bytes(len) as usize;
    if len > MAX_FRAME {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("peer sent a frame of {len} bytes, limit is {MAX_FRAME}"),
        ));
    }
    let mut buf = vec![0u8; len];
    r.read_exact(&mut buf).await?;
    Ok(Some(buf))
}

/// A framed, request/response connection to a peer. The plain TCP one is [`TcpConn`]; the
/// daemon supplies an authenticated, encrypted one.
pub trait FrameConn: Send + 'static {
    /// Send one frame.
    fn send(&mut self, frame: &[u8]) -> impl Future<Output = io::Result<()>> + Send;
    /// Receive one frame; `None` when the peer closed the connection cleanly.
    fn recv(&mut self) -> impl Future<Output = io::Result<Option<Vec<u8>>>> + Send;
}

/// Opens [`FrameConn`]s to a peer address.
pub trait Dialer: Clone + Send + Sync + 'static {
    type Conn: FrameConn;
    fn dial(&self, addr: &str) -> impl Future<Output = io::Result<Self::Conn>> + Send;
}

/// Length-prefixed frames over a plain TCP stream.
pub struct TcpConn(BufReader<BufWriter<TcpStream>>);

impl TcpConn {
    pub fn new(stream: TcpStream) -> io::Result<Self> {
        stream.set_nodelay(true)?;
        Ok(TcpConn(BufReader::new(BufWriter::new(stream))))
    }
}

impl FrameConn for TcpConn {
    async fn send(&mut self, frame: &[u8]) -> io::Result<()> {
        write_frame(&mut self.0, frame).await
    }

    async fn recv(&mut self) -> io::Result<Option<Vec<u8>>> {
        read_frame(&mut self.0).await
    }
}

/// Dials plain TCP (tests, and anything already inside an encrypted network).
#[derive(Clone, Copy, Debug, Default)]
pub struct PlainTcp;

impl Dialer for PlainTcp {
    type Conn = TcpConn;

    async fn dial(&self, addr: &str) -> io::Result<TcpConn> {
        TcpConn::new(TcpStream::connect(addr).await?)
    }
}

type Pool<C> = Arc<Mutex<HashMap<(NodeId, String), Vec<C>>>>;

/// Creates Raft clients for openraft over a [`Dialer`]; clones share the connection pool.
pub struct TcpNetworkFactory<D: Dialer = PlainTcp> {
    self_id: NodeId,
    dialer: D,
    pool: Pool<D::Conn>,
}

// Not derived: that would require the connections to be `Clone`.
impl<D: Dialer> Clone for TcpNetworkFactory<D> {
    fn clone(&self) -> Self {
        Self {
            self_id: self.self_id,
            dialer: self.dialer.clone(),
            pool: self.pool.clone(),
        }
    }
}

impl TcpNetworkFactory<PlainTcp> {
    pub fn new(self_id: NodeId) -> Self {
        Self::with_dialer(self_id, PlainTcp)
    }
}

impl<D: Dialer> TcpNetworkFactory<D> {
    pub fn with_dialer(self_id: NodeId, dialer: D) -> Self {
        Self {
            self_id,
            dialer,
            pool: Arc::default(),
        }
    }
}

impl<D: Dialer> RaftNetworkFactory<TypeConfig> for TcpNetworkFactory<D> {
    type Network = TcpNetwork<D>;

    async fn new_client(&mut self, target: NodeId, node: &PloyzNode) -> TcpNetwork<D> {
        TcpNetwork {
            self_id: self.self_id,
            target,
            node: node.clone(),
            dialer: self.dialer.clone(),
            pool: self.pool.clone(),
        }
    }
}

/// A client for one peer.
pub struct TcpNetwork<D: Dialer = PlainTcp> {
    self_id: NodeId,
    target: NodeId,
    node: PloyzNode,
    dialer: D,
    pool: Pool<D::Conn>,
}

/// Why an RPC got no answer.
#[derive(Debug, thiserror::Error)]
enum CallError {
    #[error("cannot reach raft peer at {addr}: {source}")]
    Unreachable { addr: String, source: io::Error },
    #[error("raft rpc to {addr}: bad message: {source}")]
    Codec {
        addr: String,
        source: serde_json::Error,
    },
    #[error("raft peer at {addr} answered {got} to a {sent} request")]
    Mismatch {
        addr: String,
        sent: RPCTypes,
        got: &'static str,
    },
    #[error("timed out")]
    Timeout,
}

impl<D: Dialer> TcpNetwork<D> {
    fn pool_key(&self) -> (NodeId, String) {
        (self.target, self.node.addr.clone())
    }

    fn take_idle(&self) -> Option<D::Conn> {
        let mut pool = self.pool.lock().unwrap_or_else(|e| e.into_inner());
        pool.get_mut(&self.pool_key()).and_then(Vec::pop)
    }

    fn put_idle(&self, conn: D::Conn) {
        let mut pool = self.pool.lock().unwrap_or_else(|e| e.into_inner());
        let idle = pool.entry(self.pool_key()).or_default();
        if idle.len() < MAX_IDLE_PER_PEER {
            idle.push(conn);
        }
    }

    async fn connect(&self) -> Result<D::Conn, CallError> {
        self.dialer
            .dial(&self.node.addr)
            .await
            .map_err(|source| CallError::Unreachable {
                addr: self.node.addr.clone(),
                source,
            })
    }

    async fn roundtrip(conn: &mut D::Conn, req: &[u8]) -> io::Result<Vec<u8>> {
        conn.send(req).await?;
        conn.recv().await?.ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "peer closed the connection before answering",
            )
        })
    }

    async fn call_inner(&self, req: &[u8]) -> Result<Vec<u8>, CallError> {
        if let Some(mut conn) = self.take_idle() {
            if let Ok(resp) = Self::roundtrip(&mut conn, req).await {
                self.put_idle(conn);
                return Ok(resp);
            }
            // The idle connection went stale (peer restarted, idle timeout): dial afresh.
        }
        let mut conn = self.connect().await?;
        // A fresh connection that fails mid-request is treated as unreachable so openraft
        // backs off instead of retrying in a tight loop against a peer that drops us.
        let resp =
            Self::roundtrip(&mut conn, req)
                .await
                .map_err(|source| CallError::Unreachable {
                    addr: self.node.addr.clone(),
                    source,
                })?;
        self.put_idle(conn);
        Ok(resp)
    }

    async fn call(&self, req: &RaftRequest, ttl: Duration) -> Result<RaftResponse, CallError> {
        let codec = |source| CallError::Codec {
            addr: self.node.addr.clone(),
            source,
        };
        let bytes = serde_json::to_vec(req).map_err(codec)?;
        let resp = tokio::time::timeout(ttl, self.call_inner(&bytes))
            .await
            .map_err(|_| CallError::Timeout)??;
        serde_json::from_slice(&resp).map_err(codec)
    }

    fn rpc_error<E: std::error::Error>(
        &self,
        e: CallError,
        action: RPCTypes,
        ttl: Duration,
    ) -> RPCError<NodeId, PloyzNode, E> {
        tracing::debug!(target = self.target, error = %e, "raft rpc failed");
        match e {
            CallError::Timeout => RPCError::Timeout(Timeout {
                action,
                id: self.self_id,
                target: self.target,
                timeout: ttl,
            }),
            e @ CallError::Unreachable { .. } => RPCError::Unreachable(Unreachable::new(&e)),
            e => RPCError::Network(NetworkError::new(&e)),
        }
    }

    fn remote<E: std::error::Error>(&self, e: E) -> RPCError<NodeId, PloyzNode, E> {
        RPCError::RemoteError(RemoteError::new_with_node(
            self.target,
            self.node.clone(),
            e,
        ))
    }

    fn mismatch(&self, sent: RPCTypes, got: &RaftResponse) -> CallError {
        CallError::Mismatch {
            addr: self.node.addr.clone(),
            sent,
            got: match got {
                RaftResponse::AppendEntries(_) => "AppendEntries",
                RaftResponse::Vote(_) => "Vote",
                RaftResponse::InstallSnapshot(_) => "InstallSnapshot",
                RaftResponse::Features(_) => "Features",
            },
        }
    }
}

/// Asks peers which optional features their binaries support ([`RaftRequest::Features`]).
pub trait FeatureProbe: Send + Sync + 'static {
    /// The peer's answer; `None` when it gave none (unreachable, or a binary from before the
    /// request existed, which closes the connection).
    fn features(
        &self,
        target: NodeId,
        node: &PloyzNode,
        ttl: Duration,
    ) -> impl Future<Output = Option<Features>> + Send;
}

impl<D: Dialer> FeatureProbe for TcpNetworkFactory<D> {
    async fn features(&self, target: NodeId, node: &PloyzNode, ttl: Duration) -> Option<Features> {
        let client = TcpNetwork {
            self_id: self.self_id,
            target,
            node: node.clone(),
            dialer: self.dialer.clone(),
            pool: self.pool.clone(),
        };
        match client.call(&RaftRequest::Features, ttl).await {
            Ok(RaftResponse::Features(f)) => Some(f),
            Ok(_) => None,
            Err(e) => {
                tracing::debug!(target, error = %e, "peer did not say which features it supports");
                None
            }
        }
    }
}

impl<D: Dialer> RaftNetwork<TypeConfig> for TcpNetwork<D> {
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<NodeId>, RPCError<NodeId, PloyzNode, RaftError<NodeId>>> {
        let (action, ttl) = (RPCTypes::AppendEntries, option.hard_ttl());
        match self.call(&RaftRequest::AppendEntries(rpc), ttl).await {
            Ok(RaftResponse::AppendEntries(r)) => r.map_err(|e| self.remote(e)),
            Ok(other) => Err(self.rpc_error(self.mismatch(action, &other), action, ttl)),
            Err(e) => Err(self.rpc_error(e, action, ttl)),
        }
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<
        InstallSnapshotResponse<NodeId>,
        RPCError<NodeId, PloyzNode, RaftError<NodeId, InstallSnapshotError>>,
    > {
        let (action, ttl) = (RPCTypes::InstallSnapshot, option.hard_ttl());
        match self.call(&RaftRequest::InstallSnapshot(rpc), ttl).await {
            Ok(RaftResponse::InstallSnapshot(r)) => r.map_err(|e| self.remote(e)),
            Ok(other) => Err(self.rpc_error(self.mismatch(action, &other), action, ttl)),
            Err(e) => Err(self.rpc_error(e, action, ttl)),
        }
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<NodeId>,
        option: RPCOption,
    ) -> Result<VoteResponse<NodeId>, RPCError<NodeId, PloyzNode, RaftError<NodeId>>> {
        let (action, ttl) = (RPCTypes::Vote, option.hard_ttl());
        match self.call(&RaftRequest::Vote(rpc), ttl).await {
            Ok(RaftResponse::Vote(r)) => r.map_err(|e| self.remote(e)),
            Ok(other) => Err(self.rpc_error(self.mismatch(action, &other), action, ttl)),
            Err(e) => Err(self.rpc_error(e, action, ttl)),
        }
    }
}

/// Answers Raft RPCs arriving on `listener` until the returned future is dropped or aborted
/// (connection tasks are owned by it and stop with it).
pub async fn serve_raft(listener: TcpListener, raft: Raft) {
    let mut conns = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    let raft = raft.clone();
                    conns.spawn(async move {
                        if let Err(e) = serve_conn(stream, raft).await {
                            tracing::debug!(%peer, error = %e, "raft connection closed");
                        }
                    });
                }
                Err(e) => {
                    // E.g. EMFILE: keep serving the open connections, retry shortly.
                    tracing::warn!(error = %e, "accepting raft connection failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            },
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
        }
    }
}

async fn serve_conn(stream: TcpStream, raft: Raft) -> io::Result<()> {
    serve_frames(TcpConn::new(stream)?, &raft).await
}

/// Answer Raft RPCs on an established connection until the peer closes it.
pub async fn serve_frames<C: FrameConn>(mut conn: C, raft: &Raft) -> io::Result<()> {
    while let Some(frame) = conn.recv().await? {
        let req: RaftRequest = serde_json::from_slice(&frame)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
        let resp = handle(raft, req).await;
        let bytes =
            serde_json::to_vec(&resp).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
        conn.send(&bytes).await?;
    }
    Ok(())
}

/// Answer one Raft RPC.
pub async fn handle(raft: &Raft, req: RaftRequest) -> RaftResponse {
    match req {
        RaftRequest::AppendEntries(rpc) => {
            RaftResponse::AppendEntries(raft.append_entries(rpc).await)
        }
        RaftRequest::Vote(rpc) => RaftResponse::Vote(raft.vote(rpc).await),
        RaftRequest::InstallSnapshot(rpc) => {
            RaftResponse::InstallSnapshot(raft.install_snapshot(rpc).await)
        }
        RaftRequest::Features => RaftResponse::Features(Features::CURRENT),
    }
}
