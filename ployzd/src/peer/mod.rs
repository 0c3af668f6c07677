//! The peer channel: how ployzd instances talk to each other over TCP.
//!
//! Every connection opens with a plaintext [`Hello`] naming a service:
//! * `join` — a machine outside the network presents an invite; the exchange
//!   is sealed to the issuer's WireGuard key (see [`seal`]).
//! * `raft` — Raft RPCs, answered by the consensus crate.
//! * `rpc`  — [`PeerRequest`]s: store forwarding, requests relayed to the
//!   leader, a machine asked to leave.
//!
//! `raft` and `rpc` need the network's cluster key: both sides derive fresh
//! session keys and every frame after the hello is sealed and numbered, so a
//! party without the key can neither read nor inject nor replay traffic.
//! Every service but `join` is also served only to a current member, from
//! where it must be connecting ([`admission`]).

pub mod admission;
mod blob;
pub mod seal;

use blob::serve_blob;
pub use blob::{
    fetch_blob, fetch_blob_unpacking, Blob, BlobAnswer, BlobRequest, BlobSource, FetchError,
};

use ployz_api::invite::{b64url, b64url_decode};
use ployz_api::{ApiError, MachineRecord, NetworkRecord, Reply, Request};
use ployz_consensus::network::{read_frame, write_frame};
use ployz_consensus::{Dialer, Entry, FrameConn, Txn, TxnResult};
use rand::RngCore;
use seal::{JoinClient, JoinServer, Sealer};
use serde::{Deserialize, Serialize};
use std::io;
use std::sync::{Arc, RwLock};
use std::time::Duration;
use tokio::io::{BufReader, BufWriter};
use tokio::net::{TcpListener, TcpStream};

pub const DEFAULT_PEER_PORT: u16 = 7101;
/// Connect and handshake deadline.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// Largest plaintext frame of the `rpc` and `join` services.
const MAX_RPC_FRAME: usize = 16 << 20;

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Service {
    Join,
    Raft,
    Rpc,
    /// A NATS route between the control-plane servers of two machines.
    Route,
    /// A stream of the store's change events, for a machine without a replica.
    Watch,
    /// A file (an image archive, a volume) streamed in sealed chunks.
    Blob,
}

impl Service {
    fn as_str(self) -> &'static str {
        match self {
            Service::Join => "join",
            Service::Raft => "raft",
            Service::Rpc => "rpc",
            Service::Route => "route",
            Service::Watch => "watch",
            Service::Blob => "blob",
        }
    }
}

#[derive(Debug, Serialize, Deserialize)]
struct Hello {
    v: u8,
    service: Service,
    /// Network the caller belongs to (absent for joins).
    #[serde(default)]
    network_id: Option<String>,
    from: String,
    nonce: String,
    /// The session cipher the caller offers besides ChaCha20-Poly1305
    /// (`seal::Cipher`); earlier versions send none and ignore it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    cipher: Option<String>,
}

#[derive(Debug, Serialize, Deserialize)]
struct HelloAck {
    v: u8,
    machine_id: String,
    nonce: String,
    #[serde(default)]
    error: Option<String>,
    /// The offered cipher, when accepted; else ChaCha20-Poly1305.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    cipher: Option<String>,
}

/// The network's shared secret, kept in `cluster.json` (0600).
#[derive(Clone, Serialize, Deserialize)]
pub struct ClusterSecret {
    pub network_id: String,
    /// 32 bytes, base64url.
    pub key: String,
}

impl std::fmt::Debug for ClusterSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClusterSecret")
            .field("network_id", &self.network_id)
            .field("key", &"<redacted>")
            .finish()
    }
}

impl ClusterSecret {
    pub fn generate(network_id: String) -> ClusterSecret {
        let mut k = [0u8; 32];
        rand::rngs::OsRng.fill_bytes(&mut k);
        ClusterSecret {
            network_id,
            key: b64url(&k),
        }
    }

    fn key_bytes(&self) -> io::Result<[u8; 32]> {
        b64url_decode(&self.key)
            .ok()
            .and_then(|v| v.try_into().ok())
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "corrupt cluster key"))
    }
}

/// What this machine knows of its network's secret; empty before it joins.
#[derive(Clone, Default)]
pub struct SecretSlot(Arc<RwLock<Option<ClusterSecret>>>);

impl SecretSlot {
    pub fn get(&self) -> Option<ClusterSecret> {
        self.0.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    pub fn set(&self, s: Option<ClusterSecret>) {
        *self.0.write().unwrap_or_else(|e| e.into_inner()) = s;
    }
}

// ---------------------------------------------------------------------------
// Messages

/// What one machine asks another over the `rpc` service.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PeerRequest {
    Ping,
    /// Apply a transaction (forwarded towards the leader).
    Write {
        txn: Txn,
        hops: u8,
    },
    /// A linearizable read.
    Read {
        read: KvRead,
        hops: u8,
    },
    /// A whole API request, relayed (e.g. to the Raft leader).
    Api {
        request: Request,
        hops: u8,
    },
    /// The network asks this machine to clean up and leave: it starts
    /// (once) and answers with its progress at once.
    Leave {
        by: String,
    },
    /// How far the cleanup asked for by `Leave` got.
    LeaveStatus,
    /// This machine's RTT rows.
    Rtt,
    /// Leader: drop a machine from the voter set if quorum allows.
    RemoveVoter {
        machine: String,
        hops: u8,
    },
    /// Copy volume `name` from machine `from` onto this machine (a migration).
    PullVolume {
        name: String,
        from: String,
    },
    /// How many bytes of volume `name` a `PullVolume` here received so far.
    VolumePullProgress {
        name: String,
    },
    /// Delete this machine's copy of a volume no workload here uses any more.
    DropVolume {
        name: String,
    },
    /// The last `tail` lines of this machine's instance `slot` of `service`.
    Logs {
        service: String,
        slot: u32,
        tail: usize,
    },
    /// Could this machine listen on these host ports for `service`?
    CheckPorts {
        service: String,
        ports: Vec<ployz_api::PublishedPort>,
    },
    /// Machine `from` is pulling an image for a deploy (operation `pull`)
    /// that will likely place an instance here: fetch the archive from it
    /// while it is written (`blob` `Pulling`). Answered at once; the fetch
    /// runs in the background and is kept only if the pull succeeds.
    Prefetch {
        pull: String,
        from: String,
    },
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PeerResponse {
    Pong {
        machine_id: String,
        /// The answering machine's wall clock (ms since the epoch), for
        /// `status`'s clock-skew check.
        #[serde(default)]
        time_ms: Option<u64>,
    },
    Written(TxnResult),
    Read(KvReadResult),
    Api(Reply),
    /// The cleanup before leaving, so far.
    Leaving(LeaveProgress),
    Rtt(Vec<ployz_api::RttRow>),
    /// Whether the machine was a voter (and now is not).
    VoterRemoved(bool),
    VolumePulled {
        bytes: u64,
        sha256: String,
    },
    VolumeDropped {
        dropped: bool,
    },
    /// Bytes received by the pull of a volume (`None`: none is running).
    VolumePullProgress {
        bytes: Option<u64>,
    },
    Logs(String),
    /// Per port asked by `CheckPorts`: `None` free, else who holds it.
    PortOwners(Vec<Option<String>>),
    /// A `Prefetch` was taken (or one for that pull already runs).
    Prefetching,
    Error(ApiError),
}

/// A leaving machine's cleanup: workloads removed of how many, and
/// whether it is done (the machine exits right after).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaveProgress {
    pub removed: usize,
    pub total: usize,
    pub finished: bool,
}

/// Reads a machine without a usable replica forwards to the storage machines.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum KvRead {
    Get {
        bucket: String,
        key: String,
    },
    /// Latest live entry of every key.
    List {
        bucket: String,
    },
    /// Latest entry of every key, tombstones included.
    ListAll {
        bucket: String,
    },
    History {
        bucket: String,
        key: String,
    },
    Bucket {
        bucket: String,
    },
    Buckets,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum KvReadResult {
    Entry(Option<Entry>),
    Entries(Vec<Entry>),
    Bucket(Option<ployz_consensus::BucketInfo>),
    Buckets(Vec<String>),
    NoSuchBucket(String),
}

/// A joiner's description of itself.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct JoinerInfo {
    pub machine_id: String,
    pub hostname: String,
    pub identity_key: String,
    pub wg_public_key: String,
    pub endpoints: Vec<String>,
    pub peer_addr: String,
    pub version: String,
    pub runtime: String,
    pub region: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct JoinRequest {
    pub token: String,
    pub joiner: JoinerInfo,
    /// Ed25519 signature by the joiner's identity key over
    /// `sha256(token) || machine_id` (base64url): proves it holds the key
    /// it enrols with.
    pub proof: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct JoinAccepted {
    pub network: NetworkRecord,
    pub secret: ClusterSecret,
    pub machine: MachineRecord,
    /// Storage machines as `(machine_id, peer_addr)`.
    pub storage_peers: Vec<(String, String)>,
    /// Every machine of the network, the joiner included: its mesh peers.
    pub machines: Vec<MachineRecord>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum JoinResponse {
    Accepted(Box<JoinAccepted>),
    Refused(ApiError),
}

// ---------------------------------------------------------------------------
// Connections

type Stream = BufReader<BufWriter<TcpStream>>;

fn bad(msg: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg.into())
}

async fn recv_json<T: for<'de> Deserialize<'de>>(s: &mut Stream) -> io::Result<T> {
    let frame = read_frame(s)
        .await?
        .ok_or_else(|| io::Error::new(io::ErrorKind::UnexpectedEof, "peer closed"))?;
    if frame.len() > MAX_RPC_FRAME {
        return Err(bad("frame too large"));
    }
    serde_json::from_slice(&frame).map_err(|e| bad(e.to_string()))
}

async fn send_json<T: Serialize>(s: &mut Stream, v: &T) -> io::Result<()> {
    write_frame(s, &serde_json::to_vec(v).map_err(|e| bad(e.to_string()))?).await
}

fn nonce() -> [u8; 32] {
    let mut n = [0u8; 32];
    rand::rngs::OsRng.fill_bytes(&mut n);
    n
}

/// An authenticated, encrypted connection of the `raft` or `rpc` service.
pub struct SecureConn {
    stream: Stream,
    tx: Sealer,
    rx: Sealer,
}

impl FrameConn for SecureConn {
    async fn send(&mut self, frame: &[u8]) -> io::Result<()> {
        let sealed = self.tx.seal(frame).map_err(|e| bad(e.to_string()))?;
        write_frame(&mut self.stream, &sealed).await
    }

    async fn recv(&mut self) -> io::Result<Option<Vec<u8>>> {
        match read_frame(&mut self.stream).await? {
            None => Ok(None),
            Some(f) => self
                .rx
                .open_owned(f)
                .map(Some)
                .map_err(|e| bad(e.to_string())),
        }
    }
}

async fn connect(addr: &str) -> io::Result<Stream> {
    let stream = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(addr))
        .await
        .map_err(|_| {
            io::Error::new(
                io::ErrorKind::TimedOut,
                format!("connecting to {addr} timed out"),
            )
        })??;
    stream.set_nodelay(true)?;
    Ok(BufReader::new(BufWriter::new(stream)))
}

/// Open a `raft` or `rpc` session to `addr`.
pub async fn dial(
    addr: &str,
    service: Service,
    secret: &ClusterSecret,
    me: &str,
) -> io::Result<SecureConn> {
    let key = secret.key_bytes()?;
    let fut = async {
        let mut stream = connect(addr).await?;
        let ours = nonce();
        let offer = seal::Cipher::preferred();
        send_json(
            &mut stream,
            &Hello {
                v: 1,
                service,
                network_id: Some(secret.network_id.clone()),
                from: me.to_string(),
                nonce: b64url(&ours),
                cipher: (offer != seal::Cipher::ChaCha20Poly1305).then(|| offer.name().to_string()),
            },
        )
        .await?;
        let ack: HelloAck = recv_json(&mut stream).await?;
        if let Some(e) = ack.error {
            return Err(io::Error::new(io::ErrorKind::PermissionDenied, e));
        }
        let theirs = b64url_decode(&ack.nonce).map_err(|_| bad("bad nonce"))?;
        let cipher = seal::Cipher::agreed(offer, ack.cipher.as_deref())
            .map_err(|_| bad("the peer answered with a cipher that was not offered"))?;
        let (c2s, s2c) = seal::session_keys_for(&key, &ours, &theirs, service.as_str(), cipher);
        Ok(SecureConn {
            stream,
            tx: Sealer::with(cipher, c2s),
            rx: Sealer::with(cipher, s2c),
        })
    };
    tokio::time::timeout(CONNECT_TIMEOUT, fut)
        .await
        .map_err(|_| {
            io::Error::new(
                io::ErrorKind::TimedOut,
                format!("handshake with {addr} timed out"),
            )
        })?
}

/// Raft's dialer: `raft` sessions under the current cluster secret.
#[derive(Clone)]
pub struct RaftDialer {
    pub secret: SecretSlot,
    pub me: String,
}

impl Dialer for RaftDialer {
    type Conn = SecureConn;

    async fn dial(&self, addr: &str) -> io::Result<SecureConn> {
        let secret = self.secret.get().ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::NotConnected,
                "this machine has no cluster secret yet",
            )
        })?;
        dial(addr, Service::Raft, &secret, &self.me).await
    }
}

/// One `rpc` call: connect, ask, answer, close.
pub async fn call(
    addr: &str,
    secret: &ClusterSecret,
    me: &str,
    req: &PeerRequest,
    timeout: Duration,
) -> io::Result<PeerResponse> {
    let fut = async {
        let mut conn = dial(addr, Service::Rpc, secret, me).await?;
        conn.send(&serde_json::to_vec(req).map_err(|e| bad(e.to_string()))?)
            .await?;
        let frame = conn.recv().await?.ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "peer closed without answering",
            )
        })?;
        serde_json::from_slice(&frame).map_err(|e| bad(e.to_string()))
    };
    within(timeout, fut, || {
        format!(
            "{addr} did not answer in {}",
            ployz_api::time::human(timeout)
        )
    })
    .await
}

/// `fut`, or a `TimedOut` error saying `what` after `timeout`.
async fn within<T>(
    timeout: Duration,
    fut: impl std::future::Future<Output = io::Result<T>>,
    what: impl FnOnce() -> String,
) -> io::Result<T> {
    tokio::time::timeout(timeout, fut)
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, what()))?
}

/// The joiner's side: present `req` to the issuer at `addr`, whose
/// WireGuard key is `issuer_wg`.
pub async fn join(
    addr: &str,
    issuer_wg: [u8; 32],
    me: &str,
    req: &JoinRequest,
    timeout: Duration,
) -> io::Result<JoinResponse> {
    let fut = async {
        let mut stream = connect(addr).await?;
        send_json(
            &mut stream,
            &Hello {
                v: 1,
                service: Service::Join,
                network_id: None,
                from: me.to_string(),
                nonce: String::new(),
                cipher: None,
            },
        )
        .await?;
        let mut client = JoinClient::new(issuer_wg);
        let body = client
            .seal_request(&serde_json::to_vec(req).map_err(|e| bad(e.to_string()))?)
            .map_err(|e| bad(e.to_string()))?;
        let mut frame = client.eph_pub.to_vec();
        frame.extend_from_slice(&body);
        write_frame(&mut stream, &frame).await?;
        let reply = read_frame(&mut stream).await?.ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "issuer closed without answering",
            )
        })?;
        let plain = client.open_response(&reply).map_err(|_| {
            io::Error::new(
                io::ErrorKind::PermissionDenied,
                "the machine at this address could not prove it is the invite's issuer",
            )
        })?;
        serde_json::from_slice(&plain).map_err(|e| bad(e.to_string()))
    };
    within(timeout, fut, || {
        format!(
            "{addr} did not answer the join in {}",
            ployz_api::time::human(timeout)
        )
    })
    .await
}

// ---------------------------------------------------------------------------
// Server

/// What answers incoming peer traffic (the daemon).
pub trait PeerHandler: Send + Sync + 'static {
    fn machine_id(&self) -> &str;
    fn secret(&self) -> Option<ClusterSecret>;
    fn wg_secret(&self) -> &x25519_dalek::StaticSecret;
    /// Whether machine `from`, connecting from `source`, is a current member
    /// that may use the services other than `join` ([`admission::admit`]).
    fn admit(&self, from: &str, source: std::net::IpAddr) -> Result<(), String>;
    fn raft(&self) -> &ployz_consensus::Raft;
    fn join(&self, req: JoinRequest) -> impl std::future::Future<Output = JoinResponse> + Send;
    fn rpc(&self, req: PeerRequest) -> impl std::future::Future<Output = PeerResponse> + Send;
    /// A NATS route from machine `from`, as a byte stream.
    fn route(&self, stream: tokio::io::DuplexStream, from: String);
    /// The local replica's change events (for `watch` sessions).
    fn raft_events(&self) -> tokio::sync::broadcast::Receiver<ployz_consensus::KvEvent>;
    /// The file a `blob` session asks for.
    fn blob(
        &self,
        req: BlobRequest,
    ) -> impl std::future::Future<Output = Result<Blob, ApiError>> + Send;
}

/// Size of the in-memory pipe between a byte-stream user and its sealed frames.
const PIPE_BYTES: usize = 256 * 1024;
/// Largest chunk sealed into one frame.
const CHUNK: usize = 64 * 1024;

/// Carry a byte stream over a sealed connection: what is written to the
/// returned end goes out as sealed frames, and frames that arrive are read
/// from it. The pump ends when either side closes.
pub fn byte_stream(conn: SecureConn) -> tokio::io::DuplexStream {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (ours, theirs) = tokio::io::duplex(PIPE_BYTES);
    let SecureConn { stream, tx, rx } = conn;
    let (rd, wr) = tokio::io::split(stream);
    let (mut pipe_rd, mut pipe_wr) = tokio::io::split(ours);
    let mut up = (wr, tx);
    let mut down = (rd, rx);
    tokio::spawn(async move {
        let outbound = async {
            let mut buf = vec![0u8; CHUNK];
            loop {
                let n = pipe_rd.read(&mut buf).await?;
                if n == 0 {
                    return io::Result::Ok(());
                }
                let sealed = up.1.seal(&buf[..n]).map_err(|e| bad(e.to_string()))?;
                write_frame(&mut up.0, &sealed).await?;
            }
        };
        let inbound = async {
            while let Some(f) = read_frame(&mut down.0).await? {
                let plain = down.1.open_owned(f).map_err(|e| bad(e.to_string()))?;
                pipe_wr.write_all(&plain).await?;
            }
            io::Result::Ok(())
        };
        tokio::select! {
            r = outbound => if let Err(e) = r { tracing::debug!("route pump out: {e}") },
            r = inbound => if let Err(e) = r { tracing::debug!("route pump in: {e}") },
        }
    });
    theirs
}

/// Accept peer connections until `shutdown` fires.
pub async fn serve<H: PeerHandler>(
    listener: TcpListener,
    handler: Arc<H>,
    mut shutdown: tokio::sync::watch::Receiver<bool>,
) {
    let mut conns = tokio::task::JoinSet::new();
    loop {
        tokio::select! {
            _ = shutdown.changed() => return,
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    let handler = handler.clone();
                    conns.spawn(async move {
                        if let Err(e) = serve_conn(stream, peer.ip(), handler).await {
                            tracing::debug!(%peer, "peer connection: {e}");
                        }
                    });
                }
                Err(e) => {
                    tracing::warn!("peer accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            },
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
        }
    }
}

async fn serve_conn<H: PeerHandler>(
    stream: TcpStream,
    source: std::net::IpAddr,
    handler: Arc<H>,
) -> io::Result<()> {
    stream.set_nodelay(true)?;
    let mut stream = BufReader::new(BufWriter::new(stream));
    let hello: Hello = tokio::time::timeout(CONNECT_TIMEOUT, recv_json(&mut stream))
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "no hello"))??;
    if hello.v != 1 {
        return Err(bad(format!("peer protocol version {}", hello.v)));
    }
    if hello.service == Service::Join {
        return serve_join(stream, handler).await;
    }
    let refuse = |why: String| HelloAck {
        v: 1,
        machine_id: handler.machine_id().to_string(),
        nonce: String::new(),
        error: Some(why),
        cipher: None,
    };
    let Some(secret) = handler.secret() else {
        send_json(
            &mut stream,
            &refuse("this machine is not in a network".into()),
        )
        .await?;
        return Ok(());
    };
    if hello.network_id.as_deref() != Some(secret.network_id.as_str()) {
        send_json(
            &mut stream,
            &refuse(format!(
                "this machine belongs to network {}",
                secret.network_id
            )),
        )
        .await?;
        return Ok(());
    }
    // A removed machine keeps the secret: membership decides.
    if let Err(why) = handler.admit(&hello.from, source) {
        admission::note_refusal(source, &hello.from, hello.service.as_str(), &why);
        send_json(
            &mut stream,
            &refuse(format!("not admitted as a member of this network: {why}")),
        )
        .await?;
        return Ok(());
    }
    let ours = nonce();
    let cipher = seal::Cipher::choose(hello.cipher.as_deref(), seal::Cipher::preferred());
    send_json(
        &mut stream,
        &HelloAck {
            v: 1,
            machine_id: handler.machine_id().to_string(),
            nonce: b64url(&ours),
            error: None,
            cipher: (cipher != seal::Cipher::ChaCha20Poly1305).then(|| cipher.name().to_string()),
        },
    )
    .await?;
    let theirs = b64url_decode(&hello.nonce).map_err(|_| bad("bad nonce"))?;
    let (c2s, s2c) = seal::session_keys_for(
        &secret.key_bytes()?,
        &theirs,
        &ours,
        hello.service.as_str(),
        cipher,
    );
    let mut conn = SecureConn {
        stream,
        tx: Sealer::with(cipher, s2c),
        rx: Sealer::with(cipher, c2s),
    };
    match hello.service {
        Service::Raft => ployz_consensus::network::serve_frames(conn, handler.raft()).await,
        Service::Rpc => {
            while let Some(frame) = conn.recv().await? {
                let req: PeerRequest =
                    serde_json::from_slice(&frame).map_err(|e| bad(e.to_string()))?;
                let resp = handler.rpc(req).await;
                conn.send(&serde_json::to_vec(&resp).map_err(|e| bad(e.to_string()))?)
                    .await?;
            }
            Ok(())
        }
        Service::Route => {
            handler.route(byte_stream(conn), hello.from);
            Ok(())
        }
        Service::Watch => {
            let mut events = handler.raft_events();
            loop {
                let ev = match events.recv().await {
                    Ok(ev) => ev,
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {
                        ployz_consensus::KvEvent::Reset
                    }
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => return Ok(()),
                };
                conn.send(&serde_json::to_vec(&ev).map_err(|e| bad(e.to_string()))?)
                    .await?;
            }
        }
        Service::Blob => serve_blob(conn, handler).await,
        Service::Join => unreachable!("handled above"),
    }
}

async fn serve_join<H: PeerHandler>(mut stream: Stream, handler: Arc<H>) -> io::Result<()> {
    let frame = tokio::time::timeout(CONNECT_TIMEOUT, read_frame(&mut stream))
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "no join request"))??
        .ok_or_else(|| io::Error::new(io::ErrorKind::UnexpectedEof, "joiner closed"))?;
    if frame.len() < 32 || frame.len() > MAX_RPC_FRAME {
        return Err(bad("malformed join frame"));
    }
    let eph: [u8; 32] = frame[..32].try_into().expect("32 bytes");
    let mut server = JoinServer::new(handler.wg_secret(), eph);
    // A joiner that sealed to another key gets no answer it could read.
    let plain = server
        .open_request(&frame[32..])
        .map_err(|_| bad("join request not sealed to this machine"))?;
    let resp = match serde_json::from_slice::<JoinRequest>(&plain) {
        Ok(req) => handler.join(req).await,
        Err(e) => JoinResponse::Refused(ApiError::new(
            ployz_api::ErrorCode::InvalidArgument,
            format!("malformed join request: {e}"),
        )),
    };
    let sealed = server
        .seal_response(&serde_json::to_vec(&resp).map_err(|e| bad(e.to_string()))?)
        .map_err(|e| bad(e.to_string()))?;
    write_frame(&mut stream, &sealed).await
}
