//! The control plane of this machine: the embedded NATS server ([`nats`])
//! that clients and the other machines' servers connect to, and the
//! daemon's own client of it ([`bus`]), over which machines ask each other
//! things (`ployz.machine.<id>.rpc`).
//!
//! State: the server and the client, each started once the machine is in a
//! network (and, on a mesh network, once the overlay is up).

mod app_users;
pub mod bus;
mod credentials;
pub mod nats;
pub mod tls;
pub mod users;

use app_users::sync_users;

use crate::errors::invalid;
use crate::peer::{PeerHandler, PeerRequest, PeerResponse};
use crate::store::{self, Store};
use bus::{Bus, BusError};
use nats::Nats;
use ployz_api::{ApiError, ErrorCode, NatsInfo};
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;
use users::{Keys, ADMIN_USER, OPERATOR_USER};

/// How long one upkeep pass waits for the NATS credential key.
const KEY_LOAD_TIMEOUT: Duration = Duration::from_secs(2);

/// What answers machine requests that arrive over the control plane.
type Answer =
    Arc<dyn Fn(PeerRequest) -> Pin<Box<dyn Future<Output = PeerResponse> + Send>> + Send + Sync>;

pub struct ControlPlane {
    store: Arc<Store>,
    /// NATS client port (0: any free one).
    port: u16,
    /// Addresses the NATS server listens on besides loopback and the overlay.
    listen: Vec<IpAddr>,
    nats: OnceLock<Nats>,
    /// ployzd's own client, and the credential generation it logged in
    /// with (a rotation closes it; a new one replaces it).
    bus: Mutex<Option<(u64, Arc<Bus>)>>,
    /// Held while a client is connected, so that one replaces a stale one.
    connecting: tokio::sync::Mutex<()>,
    answer: OnceLock<Answer>,
    /// The keys this machine's NATS server applies (`None` before it
    /// started).
    keys: Mutex<Option<Keys>>,
}

impl ControlPlane {
    pub fn new(store: Arc<Store>, port: u16, listen: Vec<IpAddr>) -> ControlPlane {
        ControlPlane {
            store,
            port,
            listen,
            nats: OnceLock::new(),
            bus: Mutex::new(None),
            connecting: tokio::sync::Mutex::new(()),
            answer: OnceLock::new(),
            keys: Mutex::new(None),
        }
    }

    /// The keys the NATS passwords derive from, as applied here.
    fn keys(&self) -> Option<Keys> {
        self.keys.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn set_keys(&self, keys: Keys) {
        *self.keys.lock().unwrap_or_else(|e| e.into_inner()) = Some(keys);
    }

    /// The NATS credential generation this machine applies.
    pub fn credentials_generation(&self) -> Option<u64> {
        self.keys().map(|k| k.generation)
    }

    /// A NATS password for `purpose`, of the current credential key.
    fn password_for(&self, purpose: &str) -> Option<String> {
        users::derive_password(&self.keys()?, purpose)
    }

    /// ployzd's own client, while it is connected.
    fn bus(&self) -> Option<Arc<Bus>> {
        self.bus
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
            .filter(|(_, b)| !b.is_closed())
            .map(|(_, b)| b.clone())
    }

    /// (Re)connect ployzd's own client when it is missing, closed, or
    /// logged in with a superseded credential generation, and answer
    /// machine requests on it.
    async fn ensure_bus(&self) {
        let (Some(n), Some(answer), Some(keys)) = (self.nats.get(), self.answer.get(), self.keys())
        else {
            return;
        };
        let _one = self.connecting.lock().await;
        let current = self
            .bus
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
            .is_some_and(|(g, b)| *g == keys.generation && !b.is_closed());
        if current {
            return;
        }
        let Some(password) = users::derive_password(&keys, &users::purpose_admin()) else {
            return;
        };
        match Bus::connect(&n.server, ADMIN_USER, &password).await {
            Ok(bus) => match serve_machine_rpc(self.store.machine_id(), answer.clone(), &bus).await
            {
                Ok(()) => {
                    let old = self
                        .bus
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .replace((keys.generation, bus));
                    if old.is_some() {
                        tracing::info!(
                            generation = keys.generation,
                            "control plane client reconnected with the current NATS credentials"
                        );
                    }
                }
                Err(e) => tracing::warn!("cannot subscribe to machine requests: {e}"),
            },
            Err(e) => tracing::warn!("cannot connect to the control plane: {e}"),
        }
    }

    /// Start the server (advertised on `advertise`) and then this daemon's
    /// client, which answers machine requests with `handler`; each at most
    /// once (the client again after a credential rotation), retried by the
    /// caller's next tick on failure.
    pub async fn ensure_started<H: PeerHandler>(
        self: &Arc<Self>,
        advertise: IpAddr,
        handler: &Arc<H>,
    ) {
        let Some(secret) = self.store.local().secret().get() else {
            return;
        };
        if self.answer.get().is_none() {
            // Weak: the daemon owns this control plane.
            let h = Arc::downgrade(handler);
            let answer: Answer = Arc::new(move |req| {
                let h = h.upgrade();
                Box::pin(async move {
                    match h {
                        Some(h) => h.rpc(req).await,
                        None => PeerResponse::Error(ApiError::new(
                            ErrorCode::Unavailable,
                            "ployzd is shutting down",
                        )),
                    }
                })
            });
            let _ = self.answer.set(answer);
        }
        if self.keys().is_none() {
            // Bounded: the rest of the upkeep pass (the mesh) must not wait
            // for a store that has no leader yet; the next tick retries.
            let loaded =
                tokio::time::timeout(KEY_LOAD_TIMEOUT, credentials::load_or_create(&self.store))
                    .await
                    .unwrap_or_else(|_| Err("the store did not answer in time".into()));
            match loaded {
                Ok(rec) => self.set_keys(credentials::keys_of(&secret, &rec)),
                Err(e) => {
                    tracing::debug!("NATS waits for the credential key: {e}");
                    return;
                }
            }
        }
        if self.nats.get().is_none() {
            let Some(keys) = self.keys() else { return };
            // The network CA exists from the founder's first start on (right
            // after `mesh init`); listeners other than loopback and the
            // overlay need it for their certificate.
            let needs_tls = self
                .listen
                .iter()
                .any(|a| !a.is_loopback() && *a != advertise);
            let tls = match self.tls_config(&secret.network_id, advertise).await {
                Ok(t) => Some(t),
                Err(e) if needs_tls => {
                    tracing::warn!("NATS TLS listeners wait for the network CA: {e}");
                    return;
                }
                Err(e) => {
                    tracing::debug!("network CA not ready yet: {e}");
                    None
                }
            };
            let tls = tls.filter(|_| needs_tls);
            let all = users::all_users(&keys, &[]);
            match Nats::start(
                Arc::downgrade(&self.store),
                self.store.machine_id().to_string(),
                all,
                self.port,
                advertise,
                &self.listen,
                tls,
            )
            .await
            {
                Ok(n) => {
                    tracing::info!(port = n.port, "NATS control plane listening");
                    let server = n.server.clone();
                    let _ = self.nats.set(n);
                    tokio::spawn(sync_users(Arc::downgrade(self), server));
                }
                Err(e) => tracing::warn!("cannot start the NATS server: {e}"),
            }
        }
        self.ensure_bus().await;
    }

    /// The network CA (made and stored once, create-if-absent) and this
    /// machine's server certificate for every address it listens on.
    async fn tls_config(
        &self,
        network_id: &str,
        advertise: IpAddr,
    ) -> Result<(Arc<rustls::ServerConfig>, String), String> {
        use ployz_api::{NatsCaRecord, BUCKET_PKI, NATS_CA_KEY};
        let read = |s: &Arc<Store>| {
            let s = s.clone();
            async move {
                s.get::<NatsCaRecord>(BUCKET_PKI, NATS_CA_KEY)
                    .await
                    .map_err(|e| e.message)
            }
        };
        let ca = match read(&self.store).await? {
            Some(v) => v.value,
            None => {
                let fresh = tls::new_ca(network_id)?;
                let mut ops = store::records::ensure_bucket(BUCKET_PKI);
                ops.push(store::put(
                    BUCKET_PKI,
                    NATS_CA_KEY,
                    &fresh,
                    ployz_consensus::Expect::Absent,
                ));
                match self.store.txn(ops).await.map_err(|e| e.message)? {
                    Ok(_) => {
                        tracing::info!("created the network's NATS CA");
                        fresh
                    }
                    // Another machine made it first: use theirs.
                    Err(_) => {
                        read(&self.store)
                            .await?
                            .ok_or("the network CA vanished")?
                            .value
                    }
                }
            }
        };
        let mut ips = vec![advertise, IpAddr::from([127, 0, 0, 1])];
        ips.extend(self.listen.iter().copied());
        ips.sort();
        ips.dedup();
        let cfg = tls::server_config(&ca, network_id, self.store.machine_id(), &ips)?;
        Ok((cfg, ca.cert_pem))
    }

    /// Wait (up to `timeout`) until the NATS server listens and this
    /// daemon's own client answers machine requests through it.
    pub async fn wait_serving(&self, timeout: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if self.nats.get().is_some() && self.bus().is_some() {
                return true;
            }
            if tokio::time::Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The NATS server's counters, once it runs.
    pub fn stats(&self) -> Option<ployz_natsd::ServerStats> {
        self.nats.get().map(|n| n.server.stats())
    }

    /// The NATS client port, once the server listens.
    pub fn port(&self) -> Option<u16> {
        self.nats.get().map(|n| n.port)
    }

    /// Keep NATS routes to the other machines `(id, peer_addr)`.
    pub fn sync_routes(&self, peers: &[(String, String)]) {
        if let Some(n) = self.nats.get() {
            n.sync_routes(self.store.machine_id(), self.store.local().secret(), peers);
        }
    }

    /// Accept a NATS route that arrived over the peer channel.
    pub fn accept_route(&self, stream: tokio::io::DuplexStream, from: String) {
        match self.nats.get() {
            Some(n) => {
                n.server.attach_route(stream, from);
            }
            None => tracing::debug!(%from, "route refused: NATS not started yet"),
        }
    }

    /// Ask machine `id` something over the control plane (request/reply).
    pub async fn call_machine(
        &self,
        id: &str,
        req: &PeerRequest,
        timeout: Duration,
    ) -> Result<PeerResponse, String> {
        let deadline = tokio::time::Instant::now() + timeout;
        let body = serde_json::to_vec(req).expect("requests serialise");
        let subject = bus::subject_for(id);
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            // Right after start or join the client and the routes take a
            // moment; "nobody answers" is only final at the deadline.
            let not_yet = match self.bus() {
                None => "this machine's control plane is still starting".to_string(),
                Some(bus) => match bus.request(&subject, &body, left).await {
                    Ok(answer) => {
                        return serde_json::from_slice(&answer)
                            .map_err(|e| format!("malformed answer: {e}"))
                    }
                    // Closed: a credential rotation replaces the client.
                    Err(e @ (BusError::NoResponders(_) | BusError::Closed)) => e.to_string(),
                    Err(e) => return Err(e.to_string()),
                },
            };
            if tokio::time::Instant::now() + Duration::from_millis(200) >= deadline {
                return Err(not_yet);
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// `ployzctl nats url`: how clients on and off this machine connect;
    /// `advertise` is the overlay address (or the underlay without a mesh).
    pub fn url(&self, advertise: IpAddr, admin: bool) -> Result<NatsInfo, ApiError> {
        let n = self.nats.get().ok_or_else(|| {
            if self.store.local().get().is_none() {
                store::no_network()
            } else {
                ApiError::new(
                    ErrorCode::Unavailable,
                    "the NATS server on this machine is still starting",
                )
                .with_hint("retry in a moment; `ployzctl status` shows what this machine waits for")
            }
        })?;
        let (user, purpose) = if admin {
            (ADMIN_USER, users::purpose_admin())
        } else {
            (OPERATOR_USER, users::purpose_operator())
        };
        let password = self.password_for(&purpose).ok_or_else(store::no_network)?;
        let mut servers = vec![format!("127.0.0.1:{}", n.port)];
        let mut ips = vec![advertise];
        ips.extend_from_slice(&self.listen);
        for ip in ips {
            let s = SocketAddr::new(ip, n.port).to_string();
            if !ip.is_loopback() && !servers.contains(&s) {
                servers.push(s);
            }
        }
        // With TLS listeners, the URL names the first of them.
        let tls_at = self
            .listen
            .iter()
            .find(|a| !a.is_loopback() && **a != advertise)
            .filter(|_| n.ca_pem.is_some());
        let url = match tls_at {
            Some(ip) => format!("tls://{user}:{password}@{}", SocketAddr::new(*ip, n.port)),
            None => format!("nats://{user}:{password}@127.0.0.1:{}", n.port),
        };
        Ok(NatsInfo {
            url,
            ca_pem: n.ca_pem.clone(),
            user: user.into(),
            password,
            servers,
        })
    }

    pub async fn shutdown(&self) {
        if let Some(n) = self.nats.get() {
            n.shutdown().await;
        }
    }
}

/// Answer requests addressed to this machine over the control plane.
async fn serve_machine_rpc(me: &str, answer: Answer, bus: &Arc<Bus>) -> Result<(), BusError> {
    let (_, mut rx) = bus.subscribe(&bus::subject_for(me)).await?;
    let bus = bus.clone();
    tokio::spawn(async move {
        while let Some(msg) = rx.recv().await {
            let Some(reply) = msg.reply else { continue };
            let answer = answer.clone();
            let bus = bus.clone();
            tokio::spawn(async move {
                let resp = match serde_json::from_slice::<PeerRequest>(&msg.payload) {
                    Ok(req) => answer(req).await,
                    Err(e) => {
                        PeerResponse::Error(invalid(format!("malformed machine request: {e}")))
                    }
                };
                let body = serde_json::to_vec(&resp).expect("responses serialise");
                if let Err(e) = bus.publish(&reply, None, &body).await {
                    tracing::debug!("answering a machine request: {e}");
                }
            });
        }
    });
    Ok(())
}
