//! Request routing: every request a machine answers, from the socket
//! ([`Daemon::handle_with`]) or from a peer ([`Daemon::peer_rpc`] and the
//! [`PeerHandler`] services), is handed to the subsystem that owns it.
//! Nothing here decides anything.

use crate::daemon::Daemon;
use crate::errors::ProgressSink;
use crate::peer::{self, PeerHandler, PeerRequest, PeerResponse};
use ployz_api::*;

impl Daemon {
    pub async fn handle(&self, req: Request) -> Result<Response, ApiError> {
        let (sink, _) = tokio::sync::mpsc::unbounded_channel();
        self.handle_with(req, 0, &sink).await
    }

    /// Handle a request, sending live progress of long ones to `sink`.
    /// `hops` counts how often it was already forwarded between machines.
    pub async fn handle_with(
        &self,
        req: Request,
        hops: u8,
        sink: &ProgressSink,
    ) -> Result<Response, ApiError> {
        let cluster = &self.cluster;
        let workloads = &self.workloads;
        match req {
            Request::MachineAdd(add) => self
                .provisioning
                .machine_add(*add, sink)
                .await
                .map(Response::Targets),
            Request::MachineUpdate {
                version,
                machines,
                release_url,
                identity,
            } => self
                .provisioning
                .machine_update(version, machines, release_url, identity, sink)
                .await
                .map(Response::Targets),
            Request::MeshInit {
                network,
                region,
                cidr,
            } => cluster
                .mesh_init(network, region, cidr)
                .await
                .map(|s| Response::Status(Box::new(s))),
            Request::MeshStatus => cluster
                .mesh_status()
                .await
                .map(|s| Response::Status(Box::new(s))),
            Request::MachineList => cluster.machine_list().await.map(Response::Machines),
            Request::Lifecycle {
                machine,
                action,
                force,
            } => cluster
                .lifecycle(&machine, action, force)
                .await
                .map(|r| Response::Machine(Box::new(r))),
            Request::InviteCreate { ttl_secs } => cluster
                .invite_create(ttl_secs)
                .await
                .map(Response::InviteCreated),
            Request::InviteList => cluster.invite_list().await.map(Response::Invites),
            Request::InviteRevoke { invite_id } => cluster
                .invite_revoke(&invite_id)
                .await
                .map(Response::Invite),
            Request::InviteImport { token } => cluster
                .invite_import(&token)
                .await
                .map(|s| Response::Status(Box::new(s))),
            Request::StoragePromote { replicas, machines } => cluster
                .storage_promote(replicas, machines, hops)
                .await
                .map(Response::Promoted),
            Request::NatsUrl { admin } => self
                .control
                .url(self.nats_address(), admin)
                .map(Response::Nats),
            // --- NATS app users (issue 17) ---
            Request::NatsUserAdd {
                name,
                allow_pub,
                allow_sub,
                kv_buckets,
            } => self
                .control
                .user_add(self.nats_address(), name, allow_pub, allow_sub, kv_buckets)
                .await
                .map(Response::NatsUser),
            Request::NatsUserList => self.control.user_list().await.map(Response::NatsUsers),
            Request::NatsUserRm { name } => {
                self.control.user_rm(&name).await.map(Response::NatsUsers)
            }
            // --- end NATS app users ---
            Request::MachineRtt => self.overlay.machine_rtt().await.map(Response::Rtt),
            Request::MachineRm { machine, force } => cluster
                .machine_rm(&machine, force, hops)
                .await
                .map(Response::Removed),
            Request::ServiceDeploy(req) => workloads
                .service_deploy(*req, sink)
                .await
                .map(|v| Response::Service(Box::new(v))),
            Request::ServiceList => workloads.service_list().await.map(Response::Services),
            Request::RegistrySet {
                host,
                insecure,
                username,
                password,
            } => workloads
                .registry_set(&host, insecure, username, password)
                .await
                .map(Response::Registries),
            Request::RegistryList => workloads.registry_list().await.map(Response::Registries),
            Request::RegistryRm { host } => {
                workloads.registry_rm(&host).await.map(Response::Registries)
            }
            // --- gateway (issue 14) ---
            Request::RouteAdd {
                host,
                path,
                service,
                port,
                tls,
            } => self
                .gateway
                .route_add(&host, path.as_deref(), &service, port, tls)
                .await
                .map(Response::Routes),
            Request::RouteList => self.gateway.route_list().await.map(Response::Routes),
            Request::RouteRm { host, path } => self
                .gateway
                .route_rm(&host, path.as_deref())
                .await
                .map(Response::Routes),
            Request::AcmeSet {
                directory,
                email,
                ca_pem,
                challenge,
            } => self
                .gateway
                .acme_set(directory, &email, ca_pem, challenge)
                .await
                .map(Response::Acme),
            Request::AcmeShow => self.gateway.acme_show().await.map(Response::Acme),
            Request::ServiceLogs { name, slot, tail } => workloads
                .service_logs(&name, slot, tail)
                .await
                .map(Response::Logs),
            Request::ServiceRm { name } => workloads
                .service_rm(&name, sink)
                .await
                .map(Response::ServiceRemoved),
            Request::ServiceMigrate { name, to, from } => workloads
                .service_migrate(&name, &to, from.as_deref(), sink)
                .await
                .map(|v| Response::Service(Box::new(v))),
            Request::MeshLeave { force } => cluster.mesh_leave(force).await.map(Response::Left),
            Request::OpList => self.ops.list().await.map(Response::Operations),
            Request::OpWait { id, timeout_secs } => self
                .ops
                .wait(
                    &id,
                    std::time::Duration::from_secs(timeout_secs.unwrap_or(300).min(3600)),
                )
                .await
                .map(|v| Response::Operation(Box::new(v))),
            Request::Doctor => Ok(Response::Doctor(self.doctor().await)),
            Request::Dashboard => self.dashboard.login_link().map(Response::Dashboard),
        }
    }

    /// Answer a peer's `rpc` request.
    pub async fn peer_rpc(&self, req: PeerRequest) -> PeerResponse {
        let answer = |r: Result<PeerResponse, ApiError>| r.unwrap_or_else(PeerResponse::Error);
        match req {
            PeerRequest::Ping => PeerResponse::Pong {
                machine_id: self.machine_id().to_string(),
                time_ms: Some(ployz_api::time::now_ms()),
            },
            PeerRequest::Write { txn, hops } => answer(
                self.store
                    .write_txn(txn, hops)
                    .await
                    .map(PeerResponse::Written),
            ),
            PeerRequest::Read { read, hops } => {
                answer(self.store.read(read, hops).await.map(PeerResponse::Read))
            }
            PeerRequest::Api { request, hops } => {
                let (sink, _) = tokio::sync::mpsc::unbounded_channel();
                PeerResponse::Api(Reply::from(
                    Box::pin(self.handle_with(request, hops, &sink)).await,
                ))
            }
            PeerRequest::Leave { by } => self.cluster.leave(&by),
            PeerRequest::LeaveStatus => self.cluster.leave_status(),
            PeerRequest::Rtt => PeerResponse::Rtt(self.overlay.rtt_rows()),
            PeerRequest::RemoveVoter { machine, hops } => answer(
                Box::pin(self.cluster.remove_voter(&machine, hops))
                    .await
                    .map(PeerResponse::VoterRemoved),
            ),
            PeerRequest::PullVolume { name, from } => answer(
                Box::pin(self.workloads.pull_volume(&name, &from))
                    .await
                    .map(|(bytes, sha256)| PeerResponse::VolumePulled { bytes, sha256 }),
            ),
            PeerRequest::VolumePullProgress { name } => PeerResponse::VolumePullProgress {
                bytes: self.workloads.volume_pull_progress(&name).await,
            },
            PeerRequest::Logs {
                service,
                slot,
                tail,
            } => answer(
                self.workloads
                    .local_logs(&service, slot, tail)
                    .await
                    .map(PeerResponse::Logs),
            ),
            PeerRequest::CheckPorts { service, ports } => {
                PeerResponse::PortOwners(self.ingress.check_ports(&service, &ports))
            }
            PeerRequest::Prefetch { pull, from } => self.workloads.prefetch(pull, from),
            PeerRequest::DropVolume { name } => answer(
                self.workloads
                    .drop_volume(&name)
                    .await
                    .map(|dropped| PeerResponse::VolumeDropped { dropped }),
            ),
        }
    }
}

impl PeerHandler for Daemon {
    fn machine_id(&self) -> &str {
        &self.identity.machine_id
    }

    fn secret(&self) -> Option<peer::ClusterSecret> {
        self.store.local().secret().get()
    }

    fn wg_secret(&self) -> &x25519_dalek::StaticSecret {
        self.identity.wg.static_secret()
    }

    fn admit(&self, from: &str, source: std::net::IpAddr) -> Result<(), String> {
        let file = self
            .store
            .local()
            .get()
            .ok_or("this machine is not in a network")?;
        let mesh = file.network.as_ref().is_none_or(|n| n.mesh);
        // This replica's records once it has caught up far enough to know
        // this machine; before (a machine that just joined), the records the
        // join or the last upkeep pass handed over.
        let machines = self
            .store
            .local_machines()
            .filter(|ms| ms.iter().any(|m| m.id == self.identity.machine_id))
            .unwrap_or(file.machines);
        peer::admission::admit(mesh, &machines, from, source)
    }

    fn raft(&self) -> &ployz_consensus::Raft {
        self.store.node().raft()
    }

    async fn join(&self, req: peer::JoinRequest) -> peer::JoinResponse {
        match self.cluster.accept_join(req).await {
            Ok(a) => peer::JoinResponse::Accepted(Box::new(a)),
            Err(e) => peer::JoinResponse::Refused(e),
        }
    }

    async fn rpc(&self, req: PeerRequest) -> PeerResponse {
        self.peer_rpc(req).await
    }

    fn route(&self, stream: tokio::io::DuplexStream, from: String) {
        self.control.accept_route(stream, from);
    }

    fn raft_events(&self) -> tokio::sync::broadcast::Receiver<ployz_consensus::KvEvent> {
        self.store.replica_events()
    }

    async fn blob(&self, req: peer::BlobRequest) -> Result<peer::Blob, ApiError> {
        self.workloads.serve_blob(req).await
    }
}
