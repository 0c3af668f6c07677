//! The server: client connections, the interest router, routes and shutdown.
//!
//! # Locking
//!
//! One `Mutex<Router>` holds all interest (local subscriptions, remote interest per route) and
//! the connection tables. Each client has its own `Mutex<ClientState>` (its [`Session`] and
//! outbound buffer), each route a `Mutex<RouteState>`. **Lock order: router, then one client or
//! route**, never two clients at once and never the router while holding a client. Messages are
//! delivered under the router lock by calling [`Session::deliver`] on the target session, so
//! queue-group selection, echo suppression and `UNSUB` max are decided synchronously and the
//! outbound buffer of every session stays bounded by `max_pending` (slow consumer).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use ployz_nats_proto::{Action, CloseReason, ConnectionMeta, Delivery, Message, Session, Sublist};
use rand::Rng;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::{watch, Notify};
use tokio::time::Instant;

use crate::backend::{DynBackend, KvBackend};
use crate::config::ServerConfig;
use crate::jetstream::JetStream;
use crate::route::{self, RouteConn};

/// Locks a std mutex, ignoring poisoning (the protected state stays consistent: every critical
/// section is panic-free bookkeeping).
pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// A NATS server: serves clients, joins a cluster through routes, and (with a backend) answers
/// the JetStream KV API. Cheap to clone; all clones are the same server.
#[derive(Clone)]
pub struct Server {
    pub(crate) shared: Arc<Shared>,
}

/// Counters for tests and monitoring.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ServerStats {
    /// Connected clients.
    pub clients: usize,
    /// Attached routes.
    pub routes: usize,
    /// Local subscriptions.
    pub subscriptions: usize,
    /// Interest entries learned from routes.
    pub remote_subscriptions: usize,
    /// Outbound bytes queued for clients and not yet written, summed over clients.
    pub pending_bytes: usize,
    /// Live JetStream consumers.
    pub consumers: usize,
    /// Client traffic since the server started (messages and payload
    /// bytes, headers included), closed connections included.
    pub in_msgs: u64,
    pub in_bytes: u64,
    pub out_msgs: u64,
    pub out_bytes: u64,
    /// Clients closed as slow consumers since the server started.
    pub slow_consumers: u64,
}

/// Where a message comes from.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Origin<'a> {
    /// Published by a local client.
    Client(u64),
    /// Published by the server itself (JetStream replies and deliveries).
    Internal,
    /// Received from a route, with the queue groups the sender picked this server for.
    Route(&'a [String]),
}

pub(crate) type SubKey = (u64, String);

pub(crate) struct Router {
    pub(crate) clients: HashMap<u64, Arc<Client>>,
    subs: Sublist<SubKey>,
    sub_index: HashMap<SubKey, (String, Option<String>)>,
    /// Local interest per (subject, queue): what the routes were told with `RS+`.
    local_interest: BTreeMap<(String, Option<String>), usize>,
    pub(crate) routes: HashMap<u64, Arc<RouteConn>>,
    pub(crate) remote: Sublist<u64>,
    /// Traffic of clients that are gone (the live ones count their own).
    closed_traffic: ployz_nats_proto::Stats,
    /// Clients closed because they did not read fast enough.
    slow_consumers: u64,
}

impl Router {
    fn add_sub(&mut self, cid: u64, sid: &str, subject: &str, queue: Option<&str>) {
        let key = (cid, sid.to_string());
        if self.sub_index.contains_key(&key) {
            return;
        }
        if !matches!(self.subs.insert(subject, queue, key.clone()), Ok(true)) {
            return;
        }
        self.sub_index
            .insert(key, (subject.to_string(), queue.map(str::to_string)));
        let n = self
            .local_interest
            .entry((subject.to_string(), queue.map(str::to_string)))
            .or_insert(0);
        *n += 1;
        if *n == 1 {
            let line = route::encode_rs(true, subject, queue);
            for r in self.routes.values() {
                r.push(&line);
            }
        }
    }

    pub(crate) fn remove_sub(&mut self, cid: u64, sid: &str) {
        let key = (cid, sid.to_string());
        let Some((subject, queue)) = self.sub_index.remove(&key) else {
            return;
        };
        self.subs.remove(&subject, queue.as_deref(), &key);
        let ik = (subject, queue);
        if let Some(n) = self.local_interest.get_mut(&ik) {
            *n -= 1;
            if *n == 0 {
                self.local_interest.remove(&ik);
                let line = route::encode_rs(false, &ik.0, ik.1.as_deref());
                for r in self.routes.values() {
                    r.push(&line);
                }
            }
        }
    }

    fn remove_client(&mut self, cid: u64) {
        let sids: Vec<String> = self
            .sub_index
            .keys()
            .filter(|(c, _)| *c == cid)
            .map(|(_, s)| s.clone())
            .collect();
        for sid in sids {
            self.remove_sub(cid, &sid);
        }
        if let Some(c) = self.clients.remove(&cid) {
            let st = lock(&c.state);
            let t = st.session.stats();
            self.closed_traffic.in_msgs += t.in_msgs;
            self.closed_traffic.in_bytes += t.in_bytes;
            self.closed_traffic.out_msgs += t.out_msgs;
            self.closed_traffic.out_bytes += t.out_bytes;
            if st.session.close_reason() == Some(CloseReason::SlowConsumerPendingBytes) {
                self.slow_consumers += 1;
            }
        }
    }

    /// `RS+` lines for everything this server is interested in (sent to a new route).
    pub(crate) fn interest_lines(&self) -> Vec<u8> {
        let mut out = Vec::new();
        for (subject, queue) in self.local_interest.keys() {
            out.extend_from_slice(&route::encode_rs(true, subject, queue.as_deref()));
        }
        out
    }

    /// Whether a plain subscription (local or announced by a route) names exactly `subject`;
    /// see [`Sublist::has_exact_interest`].
    pub(crate) fn has_exact_interest(&self, subject: &str) -> bool {
        self.subs.has_exact_interest(subject) || self.remote.has_exact_interest(subject)
    }
}

pub(crate) struct Shared {
    pub(crate) cfg: ServerConfig,
    /// The sessions' settings; replaced whole when the users change (a
    /// session keeps the settings it started with; changed users' sessions
    /// are closed).
    proto: Mutex<Arc<ployz_nats_proto::ServerConfig>>,
    pub(crate) server_id: String,
    start: Instant,
    pub(crate) router: Mutex<Router>,
    next_id: AtomicU64,
    shutdown_tx: watch::Sender<bool>,
    shutting_down: AtomicBool,
    pub(crate) js: Option<JetStream>,
    /// Failed client logins: delays per source address, log rate.
    auth_failures: Mutex<crate::auth_failures::AuthFailures>,
}

impl Shared {
    pub(crate) fn now(&self) -> Duration {
        self.start.elapsed()
    }

    pub(crate) fn next_id(&self) -> u64 {
        self.next_id.fetch_add(1, Ordering::Relaxed)
    }

    pub(crate) fn shutdown_rx(&self) -> watch::Receiver<bool> {
        self.shutdown_tx.subscribe()
    }

    pub(crate) fn is_shutting_down(&self) -> bool {
        self.shutting_down.load(Ordering::SeqCst)
    }

    /// Delivers a message to local subscribers and (unless it came from a route) to every route
    /// with matching interest. Returns whether anyone anywhere was interested.
    pub(crate) fn route_message(&self, msg: &Message<'_>, origin: Origin<'_>) -> bool {
        self.route_message_via(msg.subject, msg, origin)
    }

    /// Like [`Shared::route_message`], but matches interest on `via` while the message keeps
    /// its own subject (JetStream push deliveries: routed by the deliver subject, presented
    /// with the stored subject). Routes receive it under `via`.
    pub(crate) fn route_message_via(
        &self,
        via: &str,
        msg: &Message<'_>,
        origin: Origin<'_>,
    ) -> bool {
        let mut r = lock(&self.router);
        let local = r.subs.matches(via);
        let from_route = matches!(origin, Origin::Route(_));
        let remote = if from_route {
            ployz_nats_proto::SublistResult {
                plain: Vec::new(),
                queues: Vec::new(),
            }
        } else {
            r.remote.matches(via)
        };
        let interest = !local.is_empty() || !remote.is_empty();
        let publisher = match origin {
            Origin::Client(c) => Some(c),
            _ => None,
        };
        let mut finished: Vec<SubKey> = Vec::new();
        for (cid, sid) in &local.plain {
            if let Some(c) = r.clients.get(cid) {
                if c.deliver(sid, msg, publisher == Some(*cid)) == Delivery::DeliveredLast {
                    finished.push((*cid, sid.clone()));
                }
            }
        }
        // Queue groups: one member cluster-wide, chosen among local members and routes.
        let mut route_queues: BTreeMap<u64, Vec<String>> = BTreeMap::new();
        let mut remote_q: BTreeMap<String, BTreeSet<u64>> = BTreeMap::new();
        for (q, members) in remote.queues {
            remote_q.entry(q).or_default().extend(members);
        }
        let mut names: BTreeSet<String> = local.queues.iter().map(|(q, _)| q.clone()).collect();
        names.extend(remote_q.keys().cloned());
        if let Origin::Route(allowed) = origin {
            names.retain(|n| allowed.contains(n));
        }
        let mut rng = rand::thread_rng();
        for name in names {
            let mut locals: Vec<&SubKey> = local
                .queues
                .iter()
                .filter(|(q, _)| *q == name)
                .flat_map(|(_, m)| m.iter())
                .collect();
            let routes: Vec<u64> = remote_q
                .get(&name)
                .map(|s| s.iter().copied().collect())
                .unwrap_or_default();
            loop {
                let n = locals.len() + routes.len();
                if n == 0 {
                    break;
                }
                let i = rng.gen_range(0..n);
                if i < locals.len() {
                    let (cid, sid) = locals.swap_remove(i);
                    let Some(c) = r.clients.get(cid) else {
                        continue;
                    };
                    match c.deliver(sid, msg, publisher == Some(*cid)) {
                        Delivery::Delivered => break,
                        Delivery::DeliveredLast => {
                            finished.push((*cid, sid.clone()));
                            break;
                        }
                        _ => continue,
                    }
                } else {
                    route_queues
                        .entry(routes[i - locals.len()])
                        .or_default()
                        .push(name.clone());
                    break;
                }
            }
        }
        if !from_route {
            let mut targets: BTreeSet<u64> = remote.plain.into_iter().collect();
            targets.extend(route_queues.keys().copied());
            let forwarded = Message {
                subject: via,
                ..*msg
            };
            for rid in targets {
                if let Some(route) = r.routes.get(&rid) {
                    let queues = route_queues.get(&rid).map(Vec::as_slice).unwrap_or(&[]);
                    route.push(&route::encode_rmsg(&forwarded, queues));
                }
            }
        }
        for (cid, sid) in finished {
            r.remove_sub(cid, &sid);
        }
        interest
    }

    /// Publishes a message from the server itself.
    pub(crate) fn publish_internal(
        &self,
        subject: &str,
        reply: Option<&str>,
        headers: Option<&[u8]>,
        payload: &[u8],
    ) -> bool {
        self.route_message(
            &Message {
                subject,
                reply,
                headers,
                payload,
            },
            Origin::Internal,
        )
    }

    /// Whether someone subscribed to exactly `subject` (a push consumer's deliver subject):
    /// nats-server activates a push consumer on a literal subscription to its deliver subject,
    /// so a client's `>` or `_INBOX.>` does not start the delivery before the client's own
    /// deliver subscription exists.
    pub(crate) fn has_delivery_interest(&self, subject: &str) -> bool {
        lock(&self.router).has_exact_interest(subject)
    }

    fn js_accepts(&self, subject: &str) -> bool {
        self.js.is_some() && crate::jetstream::is_js_subject(subject)
    }
}

pub(crate) struct ClientState {
    pub(crate) session: Session,
    out: Vec<u8>,
    closing: Option<CloseReason>,
}

impl ClientState {
    /// Moves queued output into the outbound buffer; records a close. Other actions are only
    /// produced by `handle_input` and drained by the reader.
    fn pump(&mut self) {
        while let Some(a) = self.session.poll_action() {
            match a {
                Action::Send(b) => self.push_out(b),
                Action::Close { reason } => self.closing = Some(reason),
                _ => {}
            }
        }
    }

    fn push_out(&mut self, b: Vec<u8>) {
        if self.out.is_empty() {
            self.out = b;
        } else {
            self.out.extend_from_slice(&b);
        }
    }
}

pub(crate) struct Client {
    id: u64,
    /// The client's address, for failed-login delays and logs.
    ip: Option<String>,
    state: Mutex<ClientState>,
    wake: Notify,
}

impl Client {
    fn deliver(&self, sid: &str, msg: &Message<'_>, from_self: bool) -> Delivery {
        let mut st = lock(&self.state);
        let d = st.session.deliver(sid, msg, from_self);
        st.pump();
        drop(st);
        self.wake.notify_one();
        d
    }

    fn close(&self, reason: CloseReason) {
        let mut st = lock(&self.state);
        st.session.close(reason);
        st.pump();
        drop(st);
        self.wake.notify_one();
    }
}

impl Server {
    /// A core NATS server without JetStream.
    pub fn new(config: ServerConfig) -> Self {
        Self::build(config, None)
    }

    /// A server that also answers the JetStream KV API over `backend`.
    pub fn with_kv<B: KvBackend>(config: ServerConfig, backend: B) -> Self {
        Self::build(config, Some(Arc::new(backend)))
    }

    fn build(cfg: ServerConfig, backend: Option<Arc<dyn DynBackend>>) -> Self {
        let server_id = random_id(22);
        let proto = ployz_nats_proto::ServerConfig {
            server_id: server_id.clone(),
            server_name: cfg.server_name.clone(),
            host: cfg.host.clone(),
            port: cfg.port,
            max_payload: cfg.max_payload,
            max_pending: cfg.max_pending,
            ping_interval: cfg.ping_interval,
            first_ping_interval: cfg.first_ping_interval,
            max_pings_out: cfg.max_pings_out,
            auth: cfg
                .credentials
                .as_ref()
                .map(|c| c.to_auth())
                .unwrap_or_default(),
            auth_timeout: cfg.auth_timeout,
            headers: true,
            jetstream: backend.is_some(),
            ..ployz_nats_proto::ServerConfig::default()
        };
        let (shutdown_tx, _) = watch::channel(false);
        let shared = Shared {
            cfg,
            proto: Mutex::new(Arc::new(proto)),
            server_id,
            start: Instant::now(),
            router: Mutex::new(Router {
                clients: HashMap::new(),
                subs: Sublist::new(),
                sub_index: HashMap::new(),
                local_interest: BTreeMap::new(),
                routes: HashMap::new(),
                remote: Sublist::new(),
                closed_traffic: Default::default(),
                slow_consumers: 0,
            }),
            next_id: AtomicU64::new(1),
            shutdown_tx,
            shutting_down: AtomicBool::new(false),
            js: backend.map(JetStream::new),
            auth_failures: Mutex::default(),
        };
        Server {
            shared: Arc::new(shared),
        }
    }

    /// This server's random id (`server_id` in INFO).
    pub fn server_id(&self) -> &str {
        &self.shared.server_id
    }

    /// Accepts clients until [`Server::shutdown`]. Accept errors are logged and retried.
    pub async fn serve(&self, listener: TcpListener) {
        let mut shutdown = self.shared.shutdown_rx();
        loop {
            if *shutdown.borrow() {
                return;
            }
            tokio::select! {
                res = listener.accept() => match res {
                    Ok((stream, peer)) => {
                        let _ = stream.set_nodelay(true);
                        self.serve_connection(stream, Some(peer.ip().to_string()));
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "accepting a NATS client failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                },
                _ = shutdown.changed() => return,
            }
        }
    }

    /// Serves one client connection on its own task.
    pub fn serve_connection<S>(&self, stream: S, client_ip: Option<String>)
    where
        S: AsyncRead + AsyncWrite + Send + Unpin + 'static,
    {
        self.serve_connection_inner(stream, client_ip, None);
    }

    /// Accepts TLS clients until [`Server::shutdown`], nats-server's way:
    /// the INFO line (with `tls_required`) goes out in clear, then the
    /// client must start the TLS handshake; anything else (a plaintext
    /// `CONNECT`) fails the handshake and the connection is dropped.
    pub async fn serve_tls(&self, listener: TcpListener, tls: tokio_rustls::TlsAcceptor) {
        let mut shutdown = self.shared.shutdown_rx();
        loop {
            if *shutdown.borrow() {
                return;
            }
            tokio::select! {
                res = listener.accept() => match res {
                    Ok((stream, peer)) => {
                        let _ = stream.set_nodelay(true);
                        self.serve_connection_inner(stream, Some(peer.ip().to_string()), Some(tls.clone()));
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "accepting a NATS TLS client failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                },
                _ = shutdown.changed() => return,
            }
        }
    }

    /// Replaces the users of a server configured with
    /// [`crate::Credentials::Users`]: new connections authenticate against
    /// `users`; every open connection of a user that is gone, or whose
    /// password or permissions changed, gets `-ERR 'Authorization
    /// Violation'` and is closed (its client reconnects with what it has).
    /// Returns how many connections were closed.
    pub fn set_users(&self, users: Vec<ployz_nats_proto::User>) -> usize {
        use ployz_nats_proto::Auth;
        let old = {
            let mut p = lock(&self.shared.proto);
            let old = match &p.auth {
                Auth::Users(u) => u.clone(),
                _ => Vec::new(),
            };
            let mut next = (**p).clone();
            next.auth = Auth::Users(users.clone());
            *p = Arc::new(next);
            old
        };
        let stale: BTreeSet<String> = old
            .iter()
            .filter(|o| !users.iter().any(|n| n == *o))
            .map(|o| o.user.clone())
            .collect();
        if stale.is_empty() {
            return 0;
        }
        let clients: Vec<Arc<Client>> = lock(&self.shared.router)
            .clients
            .values()
            .cloned()
            .collect();
        let mut closed = 0;
        for c in clients {
            let mut st = lock(&c.state);
            if st.session.user().is_some_and(|u| stale.contains(u)) {
                st.session.revoke();
                st.pump();
                closed += 1;
                drop(st);
                c.wake.notify_one();
            }
        }
        closed
    }

    fn serve_connection_inner<S>(
        &self,
        stream: S,
        client_ip: Option<String>,
        tls: Option<tokio_rustls::TlsAcceptor>,
    ) where
        S: AsyncRead + AsyncWrite + Send + Unpin + 'static,
    {
        if self.shared.is_shutting_down() {
            return;
        }
        let shared = self.shared.clone();
        let id = shared.next_id();
        let session = Session::new(
            lock(&shared.proto).clone(),
            ConnectionMeta {
                client_id: id,
                client_ip: client_ip.clone(),
                tls_required: tls.is_some(),
            },
            shared.now(),
        );
        let client = Arc::new(Client {
            id,
            ip: client_ip,
            state: Mutex::new(ClientState {
                session,
                out: Vec::new(),
                closing: None,
            }),
            wake: Notify::new(),
        });
        {
            let mut st = lock(&client.state);
            st.pump();
        }
        lock(&shared.router).clients.insert(id, client.clone());
        match tls {
            None => {
                tokio::spawn(run_client(shared, client, stream));
            }
            Some(acceptor) => {
                tokio::spawn(async move {
                    match tls_handshake(&client, stream, acceptor).await {
                        Some(tls) => run_client(shared, client, tls).await,
                        None => {
                            lock(&shared.router).remove_client(client.id);
                        }
                    }
                });
            }
        }
    }

    /// Attaches a route to another server of the cluster over an established stream (either
    /// side: the dialer and the acceptor both call this). The route lives until the stream
    /// fails, the peer goes silent, or the server shuts down; it is **not** redialed here: use
    /// [`Server::maintain_route`] on the dialing side, or redial when
    /// [`RouteHandle::closed`] returns. Exactly one route must join each pair of servers
    /// (e.g. the machine with the smaller id dials); a route to this server itself is refused.
    pub fn attach_route<S>(&self, stream: S, peer_name: impl Into<String>) -> RouteHandle
    where
        S: AsyncRead + AsyncWrite + Send + Unpin + 'static,
    {
        route::attach(self.shared.clone(), stream, peer_name.into())
    }

    /// Keeps a route to `peer_name` up: calls `connect` to dial, attaches the stream, and when
    /// the route drops (or dialing fails) dials again with exponential backoff (100 ms up to
    /// 5 s) until [`Server::shutdown`]. The returned task ends at shutdown.
    pub fn maintain_route<F, Fut, S>(
        &self,
        peer_name: impl Into<String>,
        mut connect: F,
    ) -> tokio::task::JoinHandle<()>
    where
        F: FnMut() -> Fut + Send + 'static,
        Fut: Future<Output = std::io::Result<S>> + Send,
        S: AsyncRead + AsyncWrite + Send + Unpin + 'static,
    {
        let server = self.clone();
        let peer: String = peer_name.into();
        tokio::spawn(async move {
            let mut shutdown = server.shared.shutdown_rx();
            let mut backoff = Duration::from_millis(100);
            loop {
                if *shutdown.borrow() {
                    return;
                }
                let dialed = tokio::select! {
                    r = connect() => r,
                    _ = shutdown.changed() => return,
                };
                match dialed {
                    Ok(stream) => {
                        let started = Instant::now();
                        let handle = server.attach_route(stream, peer.clone());
                        handle.closed().await;
                        if started.elapsed() > Duration::from_secs(10) {
                            backoff = Duration::from_millis(100);
                        }
                        tracing::info!(peer = %peer, "route closed; redialing");
                    }
                    Err(e) => {
                        tracing::debug!(peer = %peer, error = %e, "dialing route failed");
                    }
                }
                tokio::select! {
                    _ = tokio::time::sleep(backoff) => {}
                    _ = shutdown.changed() => return,
                }
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
        })
    }

    /// Current counters.
    pub fn stats(&self) -> ServerStats {
        let r = lock(&self.shared.router);
        let mut pending_bytes = 0;
        let mut t = r.closed_traffic;
        let mut slow_consumers = r.slow_consumers;
        for c in r.clients.values() {
            let st = lock(&c.state);
            pending_bytes += st.session.pending_bytes();
            let s = st.session.stats();
            t.in_msgs += s.in_msgs;
            t.in_bytes += s.in_bytes;
            t.out_msgs += s.out_msgs;
            t.out_bytes += s.out_bytes;
            if st.session.close_reason() == Some(CloseReason::SlowConsumerPendingBytes) {
                slow_consumers += 1;
            }
        }
        ServerStats {
            clients: r.clients.len(),
            routes: r.routes.len(),
            subscriptions: r.subs.len(),
            remote_subscriptions: r.remote.len(),
            pending_bytes,
            consumers: self.shared.js.as_ref().map_or(0, |j| j.consumer_count()),
            in_msgs: t.in_msgs,
            in_bytes: t.in_bytes,
            out_msgs: t.out_msgs,
            out_bytes: t.out_bytes,
            slow_consumers,
        }
    }

    /// Stops accepting, closes every client (flushing what is queued for it), every route and
    /// every JetStream consumer, and waits up to 5 s for their tasks to finish.
    pub async fn shutdown(&self) {
        self.shared.shutting_down.store(true, Ordering::SeqCst);
        self.shared.shutdown_tx.send_replace(true);
        let (clients, routes): (Vec<Arc<Client>>, Vec<Arc<RouteConn>>) = {
            let r = lock(&self.shared.router);
            (
                r.clients.values().cloned().collect(),
                r.routes.values().cloned().collect(),
            )
        };
        for c in clients {
            c.close(CloseReason::ServerShutdown);
        }
        for r in routes {
            r.close();
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            let busy = {
                let r = lock(&self.shared.router);
                !r.clients.is_empty() || !r.routes.is_empty()
            } || self
                .shared
                .js
                .as_ref()
                .is_some_and(|j| j.consumer_count() > 0);
            if !busy {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

/// Waits until a route is gone.
pub struct RouteHandle {
    pub(crate) conn: Arc<RouteConn>,
    pub(crate) done: watch::Receiver<bool>,
}

impl RouteHandle {
    /// Resolves when the route has closed and its interest was withdrawn.
    pub async fn closed(mut self) {
        while !*self.done.borrow() {
            if self.done.changed().await.is_err() {
                return;
            }
        }
    }

    /// Closes the route.
    pub fn close(&self) {
        self.conn.close();
    }

    /// The peer's name as given to [`Server::attach_route`].
    pub fn peer_name(&self) -> &str {
        &self.conn.peer
    }
}

pub(crate) fn random_id(len: usize) -> String {
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789";
    let mut rng = rand::thread_rng();
    (0..len)
        .map(|_| ALPHABET[rng.gen_range(0..ALPHABET.len())] as char)
        .collect()
}

/// Writes the INFO line in clear, then runs the server side of the TLS
/// handshake (5 s at most). `None`: the client did not speak TLS.
async fn tls_handshake<S>(
    client: &Arc<Client>,
    mut stream: S,
    acceptor: tokio_rustls::TlsAcceptor,
) -> Option<tokio_rustls::server::TlsStream<S>>
where
    S: AsyncRead + AsyncWrite + Send + Unpin + 'static,
{
    let info = {
        let mut st = lock(&client.state);
        st.pump();
        std::mem::take(&mut st.out)
    };
    let handshake = async {
        stream.write_all(&info).await.ok()?;
        stream.flush().await.ok()?;
        lock(&client.state).session.bytes_flushed(info.len());
        acceptor.accept(stream).await.ok()
    };
    let tls = tokio::time::timeout(Duration::from_secs(5), handshake)
        .await
        .ok()
        .flatten();
    if tls.is_none() {
        tracing::debug!(client = ?client.ip, "NATS client did not complete the TLS handshake; dropped");
        let mut st = lock(&client.state);
        st.session.close(CloseReason::ProtocolViolation);
    }
    tls
}

async fn run_client<S>(shared: Arc<Shared>, client: Arc<Client>, stream: S)
where
    S: AsyncRead + AsyncWrite + Send + Unpin + 'static,
{
    let (mut rd, mut wr) = tokio::io::split(stream);
    {
        let reader = read_loop(&shared, &client, &mut rd);
        let writer = write_loop(&shared, &client, &mut wr);
        tokio::pin!(reader);
        tokio::pin!(writer);
        tokio::select! {
            _ = &mut writer => {}
            _ = &mut reader => { writer.await; }
        }
    }
    let _ = wr.shutdown().await;
    lock(&shared.router).remove_client(client.id);
    if let Some(js) = &shared.js {
        js.client_gone(client.id);
    }
}

async fn read_loop<R: AsyncRead + Unpin>(shared: &Arc<Shared>, client: &Arc<Client>, rd: &mut R) {
    let mut buf = vec![0u8; 32 * 1024];
    loop {
        let n = match rd.read(&mut buf).await {
            Ok(0) => {
                client.close(CloseReason::ClientClosed);
                return;
            }
            Ok(n) => n,
            Err(_) => {
                client.close(CloseReason::ReadError);
                return;
            }
        };
        let actions: Vec<Action> = {
            let mut st = lock(&client.state);
            if st.closing.is_some() {
                return;
            }
            st.session.handle_input(&buf[..n], shared.now());
            std::iter::from_fn(|| st.session.poll_action()).collect()
        };
        if actions.iter().any(|a| {
            matches!(
                a,
                Action::Close {
                    reason: CloseReason::AuthenticationViolation
                }
            )
        }) {
            login_failed(shared, client).await;
        }
        let mut closed = false;
        for a in actions {
            match a {
                Action::Send(b) => {
                    lock(&client.state).push_out(b);
                }
                Action::Subscribe {
                    sid,
                    subject,
                    queue,
                } => {
                    lock(&shared.router).add_sub(client.id, &sid, &subject, queue.as_deref());
                    if let Some(js) = &shared.js {
                        js.interest_changed();
                    }
                }
                Action::Unsubscribe { sid } => {
                    lock(&shared.router).remove_sub(client.id, &sid);
                }
                Action::Publish {
                    subject,
                    reply,
                    headers,
                    payload,
                } => {
                    on_publish(shared, client, subject, reply, headers, payload);
                }
                Action::Close { reason } => {
                    lock(&client.state).closing = Some(reason);
                    closed = true;
                }
                Action::Connected | Action::AutoUnsubscribe { .. } => {}
            }
        }
        client.wake.notify_one();
        if closed {
            return;
        }
    }
}

/// A client's CONNECT failed authentication: log it (rate-limited) and hold
/// its refusal back by its address's delay. Only this connection waits.
async fn login_failed(shared: &Arc<Shared>, client: &Arc<Client>) {
    let addr = client.ip.as_deref().unwrap_or("local");
    let v = lock(&shared.auth_failures).failed(addr, shared.now());
    if let Some(unlogged) = v.log {
        tracing::warn!(
            peer = %addr,
            failures_in_a_row = v.failures,
            not_logged_since_last_line = unlogged,
            delay_ms = v.delay.as_millis() as u64,
            "NATS client failed to authenticate (wrong user or password); refusing it after the delay"
        );
    }
    tokio::time::sleep(v.delay).await;
}

fn on_publish(
    shared: &Arc<Shared>,
    client: &Arc<Client>,
    subject: String,
    reply: Option<String>,
    headers: Option<Vec<u8>>,
    payload: Vec<u8>,
) {
    let msg = Message {
        subject: &subject,
        reply: reply.as_deref(),
        headers: headers.as_deref(),
        payload: &payload,
    };
    let interest = shared.route_message(&msg, Origin::Client(client.id));
    if shared.js_accepts(&subject) {
        if let Some(js) = &shared.js {
            js.submit(
                shared,
                crate::jetstream::InMsg {
                    subject,
                    reply,
                    headers,
                    payload,
                },
            );
        }
        return;
    }
    let Some(reply) = reply else {
        return;
    };
    if interest {
        return;
    }
    let sid = {
        let r = lock(&shared.router);
        let m = r.subs.matches(&reply);
        m.plain
            .into_iter()
            .chain(m.queues.into_iter().flat_map(|(_, v)| v))
            .find(|(c, _)| *c == client.id)
            .map(|(_, s)| s)
    };
    if let Some(sid) = sid {
        let mut st = lock(&client.state);
        st.session.deliver_no_responders(&sid, &reply, &subject);
        st.pump();
    }
}

async fn write_loop<W: AsyncWrite + Unpin>(shared: &Arc<Shared>, client: &Arc<Client>, wr: &mut W) {
    loop {
        let (buf, closing, deadline) = {
            let mut st = lock(&client.state);
            st.pump();
            (
                std::mem::take(&mut st.out),
                st.closing,
                st.session.poll_timeout(),
            )
        };
        if let Some(reason) = closing {
            if reason.skip_flush() {
                return;
            }
        }
        if !buf.is_empty() {
            let mut off = 0;
            while off < buf.len() {
                tokio::select! {
                    r = wr.write(&buf[off..]) => match r {
                        Ok(0) | Err(_) => {
                            client.close(CloseReason::WriteError);
                            return;
                        }
                        Ok(n) => {
                            off += n;
                            lock(&client.state).session.bytes_flushed(n);
                        }
                    },
                    _ = client.wake.notified() => {
                        // Re-check for a slow-consumer close while blocked on the socket. New
                        // output stays in `out` and is taken after this buffer is written.
                        if lock(&client.state).closing.is_some_and(|r| r.skip_flush()) {
                            return;
                        }
                    }
                }
            }
            if wr.flush().await.is_err() {
                client.close(CloseReason::WriteError);
                return;
            }
            continue;
        }
        if closing.is_some() {
            return;
        }
        let sleep_until = deadline.map(|d| shared.start + d);
        tokio::select! {
            _ = client.wake.notified() => {}
            _ = async {
                match sleep_until {
                    Some(t) => tokio::time::sleep_until(t).await,
                    None => std::future::pending().await,
                }
            } => {
                let mut st = lock(&client.state);
                st.session.handle_timeout(shared.now());
                st.pump();
            }
        }
    }
}
