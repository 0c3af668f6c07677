//! Docker backend: the Docker Engine API through bollard. Images must already
//! be in dockerd's local store (no pulls): [`DockerRuntime::load_image`] puts
//! them there from an archive. Every container ployz creates is labelled
//! `ployz.managed=true`; `list` only sees those.
//!
//! Networks: a workload bridge is a docker bridge network of the same name
//! with a fixed subnet and gateway, no masquerading, and gateway mode
//! `nat-unprotected` (docker ≥ 28 otherwise drops routed traffic to
//! containers arriving on other interfaces, such as the mesh). An iptables
//! rule (written by [`crate::firewall`], like every rule of ployzd's) in
//! `DOCKER-USER` accepts forwarded traffic to the subnet, which
//! dockerd's FORWARD rules would drop; with [`BridgeNetwork::allow_from`],
//! only from that range, and a rule at the end of `DOCKER-USER` drops the
//! rest (unprotected gateway mode would let anyone who routes to the subnet
//! in). The network's MTU is [`BridgeNetwork::mtu`].

use crate::firewall;
use crate::host::serialized;
use crate::{
    BridgeNetwork, Image, Runtime, RuntimeError, RuntimeKind, State, WorkloadSpec, WorkloadStatus,
};
use bollard::models::{
    ContainerCreateBody, ContainerStateStatusEnum, EndpointIpamConfig, EndpointSettings,
    HostConfig, Ipam, IpamConfig, NetworkCreateRequest, NetworkingConfig,
};
use bollard::query_parameters::{
    CreateContainerOptions, ImportImageOptions, InspectContainerOptions, ListContainersOptions,
    LogsOptions, RemoveContainerOptions, StopContainerOptions,
};
use bollard::Docker;
use futures_util::StreamExt;
use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::sync::Mutex;
use std::time::Duration;
use tokio::io::AsyncReadExt;

/// Label on every container ployz manages.
pub const MANAGED_LABEL: &str = "ployz.managed";

pub struct DockerRuntime {
    docker: Docker,
    /// Containers ended through `stop`, so their non-zero exit reads as stopped.
    stop_requested: Mutex<HashSet<String>>,
}

fn docker_err<'a>(
    op: &'static str,
    id: &'a str,
) -> impl FnOnce(bollard::errors::Error) -> RuntimeError + 'a {
    move |e| match e {
        bollard::errors::Error::DockerResponseServerError {
            status_code: 404, ..
        } => RuntimeError::NotFound(id.to_string()),
        bollard::errors::Error::DockerResponseServerError {
            status_code: 409, ..
        } if op == "create" => RuntimeError::AlreadyExists(id.to_string()),
        source => RuntimeError::Docker {
            op,
            id: id.to_string(),
            source: Box::new(source),
        },
    }
}

/// The program runc could not find, from dockerd's start error
/// (`… exec: "nope": executable file not found in $PATH: unknown`, or
/// `… exec: "/x": stat /x: no such file or directory: unknown`).
fn missing_executable(message: &str) -> Option<String> {
    let (_, rest) = message.split_once("exec: \"")?;
    let (name, why) = rest.split_once('"')?;
    (why.contains("executable file not found") || why.contains("no such file or directory"))
        .then(|| name.to_string())
}

impl DockerRuntime {
    /// Connects to the local dockerd (`DOCKER_HOST` or `/var/run/docker.sock`).
    /// Connecting is lazy: the first call reports an unreachable daemon.
    pub fn connect() -> Result<Self, RuntimeError> {
        let docker = Docker::connect_with_local_defaults().map_err(docker_err("connect", "-"))?;
        Ok(DockerRuntime {
            docker,
            stop_requested: Mutex::new(HashSet::new()),
        })
    }

    /// The underlying client (tests use it to import and remove images).
    pub fn client(&self) -> &Docker {
        &self.docker
    }

    fn stopped_by_us(&self, id: &str) -> bool {
        self.stop_requested
            .lock()
            .map(|s| s.contains(id))
            .unwrap_or(false)
    }

    fn mark_stopped(&self, id: &str, on: bool) {
        if let Ok(mut s) = self.stop_requested.lock() {
            if on {
                s.insert(id.to_string());
            } else {
                s.remove(id);
            }
        }
    }

    /// Loads the images of a `docker save` (or OCI layout) tar archive into
    /// dockerd, streaming the file to `POST /images/load`.
    pub async fn load_image(&self, archive: &Path) -> Result<(), RuntimeError> {
        let fail = |reason: String| RuntimeError::ImageLoad {
            archive: archive.to_path_buf(),
            reason,
        };
        let file = tokio::fs::File::open(archive)
            .await
            .map_err(|e| fail(format!("cannot open it: {e}")))?;
        let chunks = futures_util::stream::unfold(Some(file), |file| async move {
            let mut file = file?;
            let mut buf = vec![0u8; 256 << 10];
            match file.read(&mut buf).await {
                Ok(0) => None,
                Ok(n) => {
                    buf.truncate(n);
                    Some((Ok(buf.into()), Some(file)))
                }
                // Ends the body: dockerd then reports a truncated archive.
                Err(e) => Some((Err::<_, std::io::Error>(e), None)),
            }
        });
        let opts = ImportImageOptions {
            quiet: true,
            ..Default::default()
        };
        let mut progress = self.docker.import_image_stream(opts, chunks, None);
        let mut loaded = Vec::new();
        while let Some(item) = progress.next().await {
            let info = item.map_err(|e| fail(e.to_string()))?;
            if let Some(line) = info.stream {
                loaded.push(line.trim().to_string());
            }
        }
        if loaded.iter().any(|l| l.starts_with("Loaded image")) || loaded.is_empty() {
            Ok(())
        } else {
            Err(fail(format!(
                "dockerd loaded nothing from it: {}",
                loaded.join("; ")
            )))
        }
    }

    /// Whether dockerd has the image `reference` (a `name[:tag]` or an id
    /// `sha256:...`) in its local store.
    pub async fn has_image(&self, reference: &str) -> Result<bool, RuntimeError> {
        match self.docker.inspect_image(reference).await {
            Ok(_) => Ok(true),
            Err(bollard::errors::Error::DockerResponseServerError {
                status_code: 404, ..
            }) => Ok(false),
            Err(e) => Err(docker_err("inspect image", reference)(e)),
        }
    }

    /// The body of `POST /containers/create` for `spec`.
    pub fn create_body(spec: &WorkloadSpec) -> Result<ContainerCreateBody, RuntimeError> {
        spec.validate()?;
        let image = match &spec.image {
            Image::Reference(r) => r.clone(),
            Image::Rootfs(p) => {
                return Err(RuntimeError::UnsupportedImage {
                    runtime: "docker",
                    id: spec.id.clone(),
                    image: format!("rootfs directory {}", p.display()),
                    hint: "`docker import` the directory as a tarball and give Image::Reference, or use the host runtime",
                })
            }
        };
        let binds = spec
            .mounts
            .iter()
            .map(|m| {
                format!(
                    "{}:{}:{}",
                    m.source.display(),
                    m.target.display(),
                    if m.read_only { "ro" } else { "rw" }
                )
            })
            .collect();
        let (network_mode, networking_config) = match &spec.network {
            None => ("none".to_string(), None),
            Some(att) => (
                att.bridge.clone(),
                Some(NetworkingConfig {
                    endpoints_config: Some(HashMap::from([(
                        att.bridge.clone(),
                        EndpointSettings {
                            ipam_config: Some(EndpointIpamConfig {
                                ipv4_address: Some(att.address.to_string()),
                                ..Default::default()
                            }),
                            ..Default::default()
                        },
                    )])),
                }),
            ),
        };
        Ok(ContainerCreateBody {
            image: Some(image),
            cmd: Some(spec.args.clone()),
            env: Some(spec.env.iter().map(|(k, v)| format!("{k}={v}")).collect()),
            hostname: spec.hostname.clone(),
            labels: Some(HashMap::from([
                (MANAGED_LABEL.to_string(), "true".to_string()),
                ("ployz.id".to_string(), spec.id.clone()),
            ])),
            host_config: Some(HostConfig {
                binds: Some(binds),
                memory: spec.memory_limit.map(|m| m as i64),
                cpu_shares: spec.cpu_shares.map(|c| c as i64),
                network_mode: Some(network_mode),
                // The machine's resolver answers `SERVICE.internal`.
                dns: spec
                    .network
                    .as_ref()
                    .and_then(|a| a.dns)
                    .map(|d| vec![d.to_string()]),
                dns_search: spec
                    .network
                    .as_ref()
                    .and_then(|a| a.dns)
                    .map(|_| vec![crate::DNS_SEARCH.to_string()]),
                ..Default::default()
            }),
            networking_config,
            ..Default::default()
        })
    }

    /// The body of `POST /networks/create` for `net`.
    pub fn network_body(net: &BridgeNetwork) -> NetworkCreateRequest {
        let opt = |k: &str, v: &str| (format!("com.docker.network.bridge.{k}"), v.to_string());
        NetworkCreateRequest {
            name: net.bridge.clone(),
            driver: Some("bridge".into()),
            ipam: Some(Ipam {
                config: Some(vec![IpamConfig {
                    subnet: Some(net.subnet()),
                    gateway: Some(net.gateway.to_string()),
                    ..Default::default()
                }]),
                ..Default::default()
            }),
            options: Some(
                [
                    opt("name", &net.bridge),
                    opt("enable_ip_masquerade", "false"),
                    opt("gateway_mode_ipv4", "nat-unprotected"),
                ]
                .into_iter()
                .chain(
                    net.mtu
                        .map(|mtu| ("com.docker.network.driver.mtu".to_string(), mtu.to_string())),
                )
                .collect(),
            ),
            labels: Some(HashMap::from([(
                MANAGED_LABEL.to_string(),
                "true".to_string(),
            )])),
            ..Default::default()
        }
    }

    /// The IPv4 subnets of docker network `name`, `None` when it does not exist.
    async fn network_subnets(&self, name: &str) -> Result<Option<Vec<String>>, RuntimeError> {
        match self.docker.inspect_network(name, None).await {
            Ok(info) => Ok(Some(
                info.ipam
                    .and_then(|i| i.config)
                    .unwrap_or_default()
                    .into_iter()
                    .filter_map(|c| c.subnet)
                    .filter(|s| !s.contains(':'))
                    .collect(),
            )),
            Err(bollard::errors::Error::DockerResponseServerError {
                status_code: 404, ..
            }) => Ok(None),
            Err(e) => Err(docker_err("inspect network", name)(e)),
        }
    }
}

/// Accepts forwarded traffic to `subnet` (from `from` only, dropping the
/// rest, when there is one) ahead of dockerd's own rules (`DOCKER-USER`;
/// plain `FORWARD` when dockerd made no such chain).
async fn allow_subnet(
    bridge: &str,
    subnet: String,
    from: Option<String>,
) -> Result<(), RuntimeError> {
    let b = bridge.to_string();
    let res = tokio::task::spawn_blocking(move || {
        serialized(|| firewall::allow_subnet(&firewall::System, &b, &subnet, from.as_deref()))
    })
    .await;
    let reason = match res {
        Ok(Ok(())) => return Ok(()),
        Ok(Err(e)) => e.to_string(),
        Err(e) => e.to_string(),
    };
    Err(RuntimeError::Network {
        runtime: "docker",
        what: format!("accept forwarded traffic to network {bridge}"),
        reason,
    })
}

async fn disallow_subnet(bridge: String, subnet: String) {
    let _ = tokio::task::spawn_blocking(move || {
        serialized(|| firewall::remove_subnet(&firewall::System, &bridge, &subnet))
    })
    .await;
}

fn map_state(
    status: Option<ContainerStateStatusEnum>,
    exit_code: Option<i64>,
    stopped_by_us: bool,
) -> State {
    use ContainerStateStatusEnum as S;
    match status {
        Some(S::CREATED) | None | Some(S::EMPTY) => State::Created,
        Some(S::RUNNING) | Some(S::PAUSED) | Some(S::RESTARTING) | Some(S::STOPPING) => {
            State::Running
        }
        Some(S::EXITED) | Some(S::REMOVING) => State::from_exit(exit_code, stopped_by_us),
        Some(S::DEAD) => State::Failed,
    }
}

impl DockerRuntime {
    /// The container's state and, once it has exited, its exit code.
    async fn inspect_state(&self, id: &str) -> Result<(State, Option<i64>), RuntimeError> {
        crate::validate_id(id)?;
        let info = self
            .docker
            .inspect_container(id, None::<InspectContainerOptions>)
            .await
            .map_err(docker_err("inspect", id))?;
        let st = info.state.unwrap_or_default();
        let state = map_state(st.status, st.exit_code, self.stopped_by_us(id));
        let exit_code = match state {
            State::Stopped | State::Failed => st.exit_code,
            State::Created | State::Running => None,
        };
        Ok((state, exit_code))
    }
}

impl Runtime for DockerRuntime {
    fn kind(&self) -> RuntimeKind {
        RuntimeKind::Docker
    }

    async fn create(&self, spec: &WorkloadSpec) -> Result<(), RuntimeError> {
        let body = Self::create_body(spec)?;
        let opts = CreateContainerOptions {
            name: Some(spec.id.clone()),
            ..Default::default()
        };
        self.mark_stopped(&spec.id, false);
        self.docker
            .create_container(Some(opts), body)
            .await
            .map_err(docker_err("create", &spec.id))?;
        Ok(())
    }

    async fn start(&self, id: &str) -> Result<(), RuntimeError> {
        crate::validate_id(id)?;
        let e = match self.docker.start_container(id, None).await {
            Ok(()) => return Ok(()),
            Err(e) => e,
        };
        if let bollard::errors::Error::DockerResponseServerError { message, .. } = &e {
            if let Some(executable) = missing_executable(message) {
                let image = match self.docker.inspect_container(id, None).await {
                    Ok(c) => c.config.and_then(|c| c.image),
                    Err(_) => None,
                };
                return Err(RuntimeError::ExecutableNotFound {
                    id: id.to_string(),
                    image: image.unwrap_or_else(|| format!("of workload `{id}`")),
                    searched: if executable.contains('/') {
                        executable.clone()
                    } else {
                        "the image's PATH".into()
                    },
                    executable,
                });
            }
        }
        Err(docker_err("start", id)(e))
    }

    async fn stop(&self, id: &str, timeout: Duration) -> Result<(), RuntimeError> {
        crate::validate_id(id)?;
        self.mark_stopped(id, true);
        let opts = StopContainerOptions {
            t: Some(timeout.as_secs().min(i32::MAX as u64) as i32),
            signal: None,
        };
        match self.docker.stop_container(id, Some(opts)).await {
            // 304: already stopped.
            Err(bollard::errors::Error::DockerResponseServerError {
                status_code: 304, ..
            }) => Ok(()),
            r => r.map_err(docker_err("stop", id)),
        }
    }

    async fn delete(&self, id: &str) -> Result<(), RuntimeError> {
        crate::validate_id(id)?;
        let opts = RemoveContainerOptions {
            force: true,
            v: true,
            ..Default::default()
        };
        self.docker
            .remove_container(id, Some(opts))
            .await
            .map_err(docker_err("delete", id))?;
        self.mark_stopped(id, false);
        Ok(())
    }

    async fn state(&self, id: &str) -> Result<State, RuntimeError> {
        Ok(self.inspect_state(id).await?.0)
    }

    async fn list(&self) -> Result<Vec<WorkloadStatus>, RuntimeError> {
        let opts = ListContainersOptions {
            all: true,
            filters: Some(HashMap::from([(
                "label".to_string(),
                vec![format!("{MANAGED_LABEL}=true")],
            )])),
            ..Default::default()
        };
        let containers = self
            .docker
            .list_containers(Some(opts))
            .await
            .map_err(docker_err("list", "*"))?;
        let mut out = Vec::new();
        for c in containers {
            let Some(id) = c.names.unwrap_or_default().into_iter().next() else {
                continue;
            };
            let id = id.trim_start_matches('/').to_string();
            // The summary has no exit code: ask for the details.
            match self.inspect_state(&id).await {
                Ok((state, exit_code)) => out.push(WorkloadStatus {
                    id,
                    state,
                    exit_code,
                }),
                Err(RuntimeError::NotFound(_)) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(out)
    }

    async fn logs(&self, id: &str) -> Result<String, RuntimeError> {
        crate::validate_id(id)?;
        let opts = LogsOptions {
            stdout: true,
            stderr: true,
            follow: false,
            tail: "all".to_string(),
            ..Default::default()
        };
        let mut stream = self.docker.logs(id, Some(opts));
        let mut out = Vec::new();
        while let Some(chunk) = stream.next().await {
            out.extend_from_slice(&chunk.map_err(docker_err("logs", id))?.into_bytes());
        }
        Ok(String::from_utf8_lossy(&out).into_owned())
    }

    /// `docker exec`: the output is collected until the command ends or
    /// `timeout` passes (dockerd has no exec kill: a command that outlives
    /// the timeout is left to end on its own).
    async fn exec(
        &self,
        id: &str,
        args: &[String],
        timeout: Duration,
    ) -> Result<crate::ExecOutput, RuntimeError> {
        crate::validate_exec(id, args)?;
        let created = self
            .docker
            .create_exec(
                id,
                bollard::exec::CreateExecOptions {
                    attach_stdout: Some(true),
                    attach_stderr: Some(true),
                    cmd: Some(args.to_vec()),
                    ..Default::default()
                },
            )
            .await
            .map_err(docker_err("exec in", id))?;
        let run = async {
            let mut out = Vec::new();
            if let bollard::exec::StartExecResults::Attached { mut output, .. } = self
                .docker
                .start_exec(&created.id, None)
                .await
                .map_err(docker_err("exec in", id))?
            {
                while let Some(chunk) = output.next().await {
                    out.extend_from_slice(&chunk.map_err(docker_err("exec in", id))?.into_bytes());
                    if out.len() > 2 * crate::EXEC_OUTPUT_MAX {
                        out.drain(..out.len() - crate::EXEC_OUTPUT_MAX);
                    }
                }
            }
            Ok::<_, RuntimeError>(out)
        };
        let (out, finished) = match tokio::time::timeout(timeout, run).await {
            Ok(out) => (out?, true),
            Err(_) => (Vec::new(), false),
        };
        let exit_code = if finished {
            self.docker
                .inspect_exec(&created.id)
                .await
                .map_err(docker_err("exec in", id))?
                .exit_code
        } else {
            None
        };
        Ok(crate::ExecOutput {
            exit_code,
            output: crate::exec_output_tail(&out),
        })
    }

    async fn ensure_network(&self, net: &BridgeNetwork) -> Result<(), RuntimeError> {
        net.validate()?;
        let subnet = net.subnet();
        match self.network_subnets(&net.bridge).await? {
            Some(subnets) if subnets.contains(&subnet) => {}
            Some(subnets) => {
                return Err(RuntimeError::Network {
                    runtime: "docker",
                    what: format!("use docker network {} for {subnet}", net.bridge),
                    reason: format!(
                        "it exists with subnets {subnets:?}: remove it (docker network rm {}) \
                         or choose another bridge name",
                        net.bridge
                    ),
                })
            }
            None => {
                match self.docker.create_network(Self::network_body(net)).await {
                    // Created concurrently: fine, it is checked next time.
                    Err(bollard::errors::Error::DockerResponseServerError {
                        status_code: 409,
                        ..
                    }) => {}
                    r => {
                        r.map_err(docker_err("create network", &net.bridge))?;
                    }
                }
            }
        }
        allow_subnet(&net.bridge, subnet, net.allow_from.clone()).await
    }

    async fn remove_network(&self, bridge: &str) -> Result<(), RuntimeError> {
        let Some(subnets) = self.network_subnets(bridge).await? else {
            return Ok(());
        };
        for subnet in subnets {
            disallow_subnet(bridge.to_string(), subnet).await;
        }
        match self.docker.remove_network(bridge).await {
            Err(bollard::errors::Error::DockerResponseServerError {
                status_code: 404, ..
            }) => Ok(()),
            r => r.map_err(docker_err("remove network", bridge)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_executables_are_recognised_in_dockerd_errors() {
        let path = "failed to create task for container: failed to create shim task: OCI runtime create failed: runc create failed: unable to start container process: exec: \"httpdd\": executable file not found in $PATH: unknown";
        assert_eq!(missing_executable(path).as_deref(), Some("httpdd"));
        let abs = "OCI runtime create failed: runc create failed: unable to start container process: exec: \"/bin/nope\": stat /bin/nope: no such file or directory: unknown";
        assert_eq!(missing_executable(abs).as_deref(), Some("/bin/nope"));
        assert_eq!(
            missing_executable("exec: \"sh\": permission denied: unknown"),
            None
        );
        assert_eq!(
            missing_executable("cannot start: port is already allocated"),
            None
        );
    }
    use crate::VolumeMount;

    #[test]
    fn body_and_states() {
        let mut s = WorkloadSpec::new(
            "w",
            Image::Reference("busybox:t".into()),
            vec!["true".into()],
        );
        s.memory_limit = Some(1 << 26);
        s.mounts.push(VolumeMount {
            source: "/v".into(),
            target: "/data".into(),
            read_only: false,
        });
        let b = DockerRuntime::create_body(&s).unwrap();
        let hc = b.host_config.unwrap();
        assert_eq!(hc.binds.unwrap(), vec!["/v:/data:rw"]);
        assert_eq!(hc.memory, Some(1 << 26));
        assert_eq!(hc.network_mode.as_deref(), Some("none"));
        assert!(b.networking_config.is_none());
        assert_eq!(b.labels.unwrap()[MANAGED_LABEL], "true");
        s.network = Some(crate::NetworkAttachment {
            bridge: "plzbr0".into(),
            address: "10.101.3.9".parse().unwrap(),
            prefix: 24,
            gateway: "10.101.3.1".parse().unwrap(),
            mtu: Some(1420),
            dns: Some("10.101.3.1".parse().unwrap()),
        });
        let b = DockerRuntime::create_body(&s).unwrap();
        let hc = b.host_config.unwrap();
        assert_eq!(hc.network_mode.as_deref(), Some("plzbr0"));
        assert_eq!(hc.dns, Some(vec!["10.101.3.1".to_string()]));
        assert_eq!(hc.dns_search, Some(vec!["internal".to_string()]));
        let ep = &b.networking_config.unwrap().endpoints_config.unwrap()["plzbr0"];
        assert_eq!(
            ep.ipam_config.as_ref().unwrap().ipv4_address.as_deref(),
            Some("10.101.3.9")
        );
        let n = DockerRuntime::network_body(&BridgeNetwork {
            bridge: "plzbr0".into(),
            gateway: "10.101.3.1".parse().unwrap(),
            prefix: 24,
            mtu: Some(1420),
            allow_from: Some("10.101.0.0/16".into()),
        });
        let ipam = &n.ipam.unwrap().config.unwrap()[0];
        assert_eq!(ipam.subnet.as_deref(), Some("10.101.3.0/24"));
        assert_eq!(ipam.gateway.as_deref(), Some("10.101.3.1"));
        let o = n.options.unwrap();
        assert_eq!(o["com.docker.network.bridge.name"], "plzbr0");
        assert_eq!(o["com.docker.network.bridge.enable_ip_masquerade"], "false");
        assert_eq!(o["com.docker.network.driver.mtu"], "1420");
        let rule = |r: &str| r.split(' ').map(String::from).collect::<Vec<_>>();
        for (r, ours) in [
            ("-d 10.101.3.0/24 -j ACCEPT", true),
            ("-s 10.101.0.0/16 -d 10.101.3.0/24 -j ACCEPT", true),
            ("-d 10.101.3.0/24 -j DROP", true),
            ("-d 10.101.4.0/24 -j ACCEPT", false),
            ("-d 10.101.3.0/24 -p tcp -j ACCEPT", false),
            ("-j RETURN", false),
        ] {
            assert_eq!(
                firewall::is_legacy_subnet_rule(&rule(r), "10.101.3.0/24"),
                ours,
                "{r}"
            );
        }
        s.image = Image::Rootfs("/r".into());
        assert!(matches!(
            DockerRuntime::create_body(&s),
            Err(RuntimeError::UnsupportedImage { .. })
        ));
        use ContainerStateStatusEnum as S;
        assert_eq!(map_state(Some(S::CREATED), None, false), State::Created);
        assert_eq!(map_state(Some(S::EXITED), Some(137), true), State::Stopped);
        assert_eq!(map_state(Some(S::EXITED), Some(2), false), State::Failed);
    }
}
