//! Reaching services: published ports (layer 4, every serving machine
//! forwards to healthy instances anywhere in the cluster over the mesh)
//! and the internal DNS resolver workloads use (`SERVICE.internal`).
//!
//! Both answer from one in-memory [`table::Table`] rebuilt from the
//! `machines`, `services` and `instances` buckets on every change to them
//! (a store watch; within about a second) and at least every few seconds.
//! Only running instances that are healthy (or have no check) are in it:
//! health is decided by the instance's machine (`workloads`), never here.
//!
//! - [`table`] (pure): who serves what, backend order (local first).
//! - [`ports`]: the TCP and UDP listeners and their forwarding.
//! - [`dns`]: the resolver on the workload bridge's gateway address,
//!   with a pure answering core.
//!
//! State: the table, the running listeners, the resolver's address, the
//! counters `/metrics` reports.

pub mod dns;
pub mod ports;
pub mod table;

use crate::store::Store;
use ployz_api::*;
use std::collections::HashMap;
use std::net::Ipv4Addr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;
use table::Table;

/// The table is rebuilt at least this often (a missed event, a store that
/// was unreachable).
const REFRESH_EVERY: Duration = Duration::from_secs(5);

/// Counters `/metrics` reports.
#[derive(Default)]
pub struct Stats {
    pub tcp_forwarded: AtomicU64,
    pub tcp_failed: AtomicU64,
    pub udp_flows: AtomicU64,
    pub udp_failed: AtomicU64,
    pub dns: dns::DnsStats,
}

/// Published ports and internal DNS of this machine.
pub struct Ingress {
    me: String,
    store: Arc<Store>,
    table: RwLock<Arc<Table>>,
    /// Listening sockets by what they listen on.
    listeners: Mutex<HashMap<ports::Key, tokio::task::JoinHandle<()>>>,
    /// Keys whose bind failed (logged once until it works).
    failed: Mutex<std::collections::HashSet<ports::Key>>,
    /// Where the resolver should listen: this machine's gateway address.
    dns_addr: Mutex<Option<Ipv4Addr>>,
    /// The host's resolvers as last read, and what they were read from.
    upstreams: Mutex<Option<dns::Upstreams>>,
    turn: AtomicUsize,
    pub stats: Stats,
}

impl Ingress {
    pub fn new(store: Arc<Store>) -> Ingress {
        Ingress {
            me: store.machine_id().to_string(),
            store,
            table: RwLock::default(),
            listeners: Mutex::default(),
            failed: Mutex::default(),
            dns_addr: Mutex::default(),
            upstreams: Mutex::default(),
            turn: AtomicUsize::new(0),
            stats: Stats::default(),
        }
    }

    pub fn table(&self) -> Arc<Table> {
        self.table.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn next_turn(&self) -> usize {
        self.turn.fetch_add(1, Ordering::Relaxed)
    }

    /// Follows the store until `stop`: rebuilds the table, converges the
    /// listeners, runs the resolver.
    pub async fn run(self: Arc<Self>, mut stop: tokio::sync::watch::Receiver<bool>) {
        let changed = Arc::new(tokio::sync::Notify::new());
        let watchers: Vec<_> = [BUCKET_SERVICES, BUCKET_INSTANCES, BUCKET_MACHINES]
            .into_iter()
            .map(|b| tokio::spawn(self.store.clone().watch_bucket(b, changed.clone())))
            .collect();
        let resolver = tokio::spawn(self.clone().serve_dns());
        loop {
            // A refresh waits on the store (up to its timeout, again after each change while
            // the store has no leader, as on a machine just removed): a stop must not wait.
            tokio::select! {
                biased;
                _ = stop.changed() => break,
                _ = self.refresh() => {}
            }
            tokio::select! {
                biased;
                _ = stop.changed() => break,
                _ = changed.notified() => {
                    // Let a burst of changes (a deploy) settle into one pass.
                    tokio::time::sleep(Duration::from_millis(30)).await;
                }
                _ = tokio::time::sleep(REFRESH_EVERY) => {}
            }
        }
        for w in watchers {
            w.abort();
        }
        resolver.abort();
        self.converge(&Table::default());
    }

    async fn refresh(self: &Arc<Self>) {
        if self.store.local().get().is_none() {
            return;
        }
        let read = async {
            let machines = self.store.values::<MachineRecord>(BUCKET_MACHINES).await?;
            let services = self.store.values::<ServiceRecord>(BUCKET_SERVICES).await?;
            let instances = self
                .store
                .values::<InstanceRecord>(BUCKET_INSTANCES)
                .await?;
            Ok::<_, ApiError>((machines, services, instances))
        };
        let (machines, services, instances) =
            match tokio::time::timeout(Duration::from_secs(5), read).await {
                Ok(Ok(r)) => r,
                Ok(Err(e)) => {
                    tracing::debug!("ingress: cannot read the store: {}", e.message);
                    return;
                }
                Err(_) => return,
            };
        let table = Table::build(&self.me, &machines, &services, &instances);
        let gateway = machines
            .iter()
            .find(|m| m.id == self.me)
            .and_then(|m| gateway_of(&m.subnet));
        *self.dns_addr.lock().unwrap_or_else(|e| e.into_inner()) = gateway;
        let table = Arc::new(table);
        *self.table.write().unwrap_or_else(|e| e.into_inner()) = table.clone();
        self.converge(&table);
    }

    /// Where the resolver listens (`None` until the machine has a subnet).
    pub fn dns_address(&self) -> Option<Ipv4Addr> {
        *self.dns_addr.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// The workload bridge's gateway of a machine subnet (`10.101.3.0/24` →
/// `10.101.3.1`), where the resolver listens.
pub fn gateway_of(subnet: &str) -> Option<Ipv4Addr> {
    let (net, _) = subnet.split_once('/')?;
    let net: Ipv4Addr = net.parse().ok()?;
    Some(Ipv4Addr::from(u32::from(net) | 1))
}
