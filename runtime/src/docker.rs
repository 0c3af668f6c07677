//! Docker backend: the Docker Engine API ([`crate::dockerd`]). Images must already
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

use crate::dockerd::{self, query, segment, Body, Dockerd};
use crate::firewall;
use crate::host::serialized;
use crate::{
    BridgeNetwork, Image, Runtime, RuntimeError, RuntimeKind, State, WorkloadSpec, WorkloadStatus,
};
use hyper::Method;
use serde_json::{json, Value};
use std::collections::HashSet;
use std::path::Path;
use std::sync::Mutex;
use std::time::Duration;
use tokio::io::AsyncReadExt;

/// Label on every container ployz manages.
pub const MANAGED_LABEL: &str = "ployz.managed";

pub struct DockerRuntime {
    docker: Dockerd,
    /// Containers ended through `stop`, so their non-zero exit reads as stopped.
    stop_requested: Mutex<HashSet<String>>,
}

fn docker_err<'a>(
    op: &'static str,
    id: &'a str,
) -> impl FnOnce(dockerd::Error) -> RuntimeError + 'a {
    move |e| match e.status() {
        Some(404) => RuntimeError::NotFound(id.to_string()),
        Some(409) if op == "create" => RuntimeError::AlreadyExists(id.to_string()),
        _ => RuntimeError::Docker {
            op,
            id: id.to_string(),
            source: Box::new(e),
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
        let docker = Dockerd::from_env().map_err(docker_err("connect", "-"))?;
        Ok(DockerRuntime {
            docker,
            stop_requested: Mutex::new(HashSet::new()),
        })
    }

    /// The underlying client (tests use it to read what dockerd holds).
    pub fn client(&self) -> &Dockerd {
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
        let mut file = tokio::fs::File::open(archive)
            .await
            .map_err(|e| fail(format!("cannot open it: {e}")))?;
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        tokio::spawn(async move {
            loop {
                let mut buf = vec![0u8; 256 << 10];
                let chunk = match file.read(&mut buf).await {
                    Ok(0) => return,
                    Ok(n) => {
                        buf.truncate(n);
                        Ok(buf.into())
                    }
                    // Ends the body: dockerd then reports a truncated archive.
                    Err(e) => Err(e),
                };
                let last = chunk.is_err();
                if tx.send(chunk).await.is_err() || last {
                    return;
                }
            }
        });
        let answer = self
            .docker
            .call(Method::POST, "/images/load?quiet=1", Body::Stream(rx))
            .await
            .map_err(|e| fail(e.to_string()))?;
        // A JSON stream: `{"stream": "Loaded image: ..."}` lines, or an
        // `{"error": ...}` when the archive is refused part-way.
        let mut loaded = Vec::new();
        for item in serde_json::Deserializer::from_slice(&answer).into_iter::<Value>() {
            let item = item.map_err(|e| fail(format!("unreadable answer from dockerd: {e}")))?;
            if let Some(error) = item.get("error").and_then(Value::as_str) {
                return Err(fail(error.to_string()));
            }
            if let Some(line) = item.get("stream").and_then(Value::as_str) {
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
        let path = format!("/images/{}/json", segment(reference));
        match self.docker.call(Method::GET, &path, Body::Empty).await {
            Ok(_) => Ok(true),
            Err(e) if e.status() == Some(404) => Ok(false),
            Err(e) => Err(docker_err("inspect image", reference)(e)),
        }
    }

    /// The body of `POST /containers/create` for `spec`.
    pub fn create_body(spec: &WorkloadSpec) -> Result<Value, RuntimeError> {
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
        let binds: Vec<String> = spec
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
        let env: Vec<String> = spec.env.iter().map(|(k, v)| format!("{k}={v}")).collect();
        let mut host = json!({
            "Binds": binds,
            "NetworkMode": "none",
        });
        if let Some(m) = spec.memory_limit {
            host["Memory"] = json!(m);
        }
        if let Some(c) = spec.cpu_shares {
            host["CpuShares"] = json!(c);
        }
        let mut body = json!({
            "Image": image,
            "Cmd": spec.args,
            "Env": env,
            "Labels": {
                MANAGED_LABEL: "true",
                "ployz.id": spec.id,
            },
        });
        if let Some(h) = &spec.hostname {
            body["Hostname"] = json!(h);
        }
        if let Some(att) = &spec.network {
            host["NetworkMode"] = json!(att.bridge);
            // The machine's resolver answers `SERVICE.internal`.
            if let Some(dns) = att.dns {
                host["Dns"] = json!([dns.to_string()]);
                host["DnsSearch"] = json!([crate::DNS_SEARCH]);
            }
            body["NetworkingConfig"] = json!({
                "EndpointsConfig": {
                    att.bridge.as_str(): {
                        "IPAMConfig": { "IPv4Address": att.address.to_string() },
                    },
                },
            });
        }
        body["HostConfig"] = host;
        Ok(body)
    }

    /// The body of `POST /networks/create` for `net`.
    pub fn network_body(net: &BridgeNetwork) -> Value {
        let mut options = serde_json::Map::new();
        for (k, v) in [
            ("name", net.bridge.as_str()),
            ("enable_ip_masquerade", "false"),
            ("gateway_mode_ipv4", "nat-unprotected"),
        ] {
            options.insert(format!("com.docker.network.bridge.{k}"), json!(v));
        }
        if let Some(mtu) = net.mtu {
            options.insert(
                "com.docker.network.driver.mtu".into(),
                json!(mtu.to_string()),
            );
        }
        json!({
            "Name": net.bridge,
            "Driver": "bridge",
            "IPAM": {
                "Config": [{ "Subnet": net.subnet(), "Gateway": net.gateway.to_string() }],
            },
            "Options": options,
            "Labels": { MANAGED_LABEL: "true" },
        })
    }

    /// The IPv4 subnets of docker network `name`, `None` when it does not exist.
    async fn network_subnets(&self, name: &str) -> Result<Option<Vec<String>>, RuntimeError> {
        let path = format!("/networks/{}", segment(name));
        match self.docker.json(Method::GET, &path, Body::Empty).await {
            Ok(info) => Ok(Some(
                info["IPAM"]["Config"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(|c| c["Subnet"].as_str())
                    .filter(|s| !s.contains(':'))
                    .map(str::to_string)
                    .collect(),
            )),
            Err(e) if e.status() == Some(404) => Ok(None),
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

/// A container's `State.Status` as dockerd reports it.
fn map_state(status: Option<&str>, exit_code: Option<i64>, stopped_by_us: bool) -> State {
    match status {
        Some("running" | "paused" | "restarting" | "stopping") => State::Running,
        Some("exited" | "removing") => State::from_exit(exit_code, stopped_by_us),
        Some("dead") => State::Failed,
        // "created", or nothing said.
        _ => State::Created,
    }
}

impl DockerRuntime {
    /// The container's state and, once it has exited, its exit code.
    async fn inspect_state(&self, id: &str) -> Result<(State, Option<i64>), RuntimeError> {
        crate::validate_id(id)?;
        let info = self
            .docker
            .json(Method::GET, &format!("/containers/{id}/json"), Body::Empty)
            .await
            .map_err(docker_err("inspect", id))?;
        let st = &info["State"];
        let code = st["ExitCode"].as_i64();
        let state = map_state(st["Status"].as_str(), code, self.stopped_by_us(id));
        let exit_code = match state {
            State::Stopped | State::Failed => code,
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
        self.mark_stopped(&spec.id, false);
        let path = format!("/containers/create?name={}", query(&spec.id));
        self.docker
            .call(Method::POST, &path, Body::Json(body))
            .await
            .map_err(docker_err("create", &spec.id))?;
        Ok(())
    }

    async fn start(&self, id: &str) -> Result<(), RuntimeError> {
        crate::validate_id(id)?;
        let path = format!("/containers/{id}/start");
        let e = match self.docker.call(Method::POST, &path, Body::Empty).await {
            Ok(_) => return Ok(()),
            // 304: already running.
            Err(e) if e.status() == Some(304) => return Ok(()),
            Err(e) => e,
        };
        if let Some(message) = e.message() {
            if let Some(executable) = missing_executable(message) {
                let path = format!("/containers/{id}/json");
                let image = match self.docker.json(Method::GET, &path, Body::Empty).await {
                    Ok(c) => c["Config"]["Image"].as_str().map(str::to_string),
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
        let t = timeout.as_secs().min(i32::MAX as u64);
        let path = format!("/containers/{id}/stop?t={t}");
        match self.docker.call(Method::POST, &path, Body::Empty).await {
            // 304: already stopped.
            Err(e) if e.status() == Some(304) => Ok(()),
            r => r.map(drop).map_err(docker_err("stop", id)),
        }
    }

    async fn delete(&self, id: &str) -> Result<(), RuntimeError> {
        crate::validate_id(id)?;
        self.docker
            .call(
                Method::DELETE,
                &format!("/containers/{id}?force=true&v=true"),
                Body::Empty,
            )
            .await
            .map_err(docker_err("delete", id))?;
        self.mark_stopped(id, false);
        Ok(())
    }

    async fn state(&self, id: &str) -> Result<State, RuntimeError> {
        Ok(self.inspect_state(id).await?.0)
    }

    async fn list(&self) -> Result<Vec<WorkloadStatus>, RuntimeError> {
        let filters = json!({ "label": [format!("{MANAGED_LABEL}=true")] }).to_string();
        let path = format!("/containers/json?all=true&filters={}", query(&filters));
        let containers = self
            .docker
            .json(Method::GET, &path, Body::Empty)
            .await
            .map_err(docker_err("list", "*"))?;
        let mut out = Vec::new();
        for c in containers.as_array().into_iter().flatten() {
            let Some(id) = c["Names"].get(0).and_then(Value::as_str) else {
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
        let path = format!("/containers/{id}/logs?stdout=true&stderr=true&follow=false&tail=all");
        let raw = self
            .docker
            .call(Method::GET, &path, Body::Empty)
            .await
            .map_err(docker_err("logs", id))?;
        Ok(String::from_utf8_lossy(&dockerd::demux(&raw)).into_owned())
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
        let body = json!({ "AttachStdout": true, "AttachStderr": true, "Cmd": args });
        let created = self
            .docker
            .json(
                Method::POST,
                &format!("/containers/{id}/exec"),
                Body::Json(body),
            )
            .await
            .map_err(docker_err("exec in", id))?;
        let exec_id = created["Id"].as_str().unwrap_or_default().to_string();
        if exec_id.is_empty() || !exec_id.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(docker_err("exec in", id)(dockerd::Error::Answer {
                what: format!("exec create in {id}"),
                reason: format!("no exec id in {created}"),
            }));
        }
        // dockerd streams the output on the connection and closes it when the
        // command ends; the tail is kept ([`crate::exec_output_tail`]).
        let run = async {
            let path = format!("/exec/{exec_id}/start");
            let start = Body::Json(json!({ "Detach": false, "Tty": false }));
            let (mut demux, mut out) = (dockerd::Demux::default(), Vec::new());
            self.docker
                .call_stream(Method::POST, &path, start, |chunk| {
                    demux.push(chunk, &mut out);
                    if out.len() > 2 * crate::EXEC_OUTPUT_MAX {
                        out.drain(..out.len() - crate::EXEC_OUTPUT_MAX);
                    }
                })
                .await
                .map_err(docker_err("exec in", id))?;
            demux.finish(&mut out);
            Ok::<_, RuntimeError>(out)
        };
        let (out, finished) = match tokio::time::timeout(timeout, run).await {
            Ok(out) => (out?, true),
            Err(_) => (Vec::new(), false),
        };
        let exit_code = if finished {
            self.docker
                .json(Method::GET, &format!("/exec/{exec_id}/json"), Body::Empty)
                .await
                .map_err(docker_err("exec in", id))?["ExitCode"]
                .as_i64()
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
                let body = Body::Json(Self::network_body(net));
                match self
                    .docker
                    .call(Method::POST, "/networks/create", body)
                    .await
                {
                    // Created concurrently: fine, it is checked next time.
                    Err(e) if e.status() == Some(409) => {}
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
        let path = format!("/networks/{}", segment(bridge));
        match self.docker.call(Method::DELETE, &path, Body::Empty).await {
            Err(e) if e.status() == Some(404) => Ok(()),
            r => r.map(drop).map_err(docker_err("remove network", bridge)),
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
        let hc = &b["HostConfig"];
        assert_eq!(hc["Binds"], json!(["/v:/data:rw"]));
        assert_eq!(hc["Memory"], json!(1 << 26));
        assert_eq!(hc["NetworkMode"], "none");
        assert!(hc.get("CpuShares").is_none() && hc.get("Dns").is_none());
        assert!(b.get("NetworkingConfig").is_none());
        assert_eq!(b["Labels"][MANAGED_LABEL], "true");
        assert_eq!(b["Labels"]["ployz.id"], "w");
        assert_eq!(b["Image"], "busybox:t");
        assert_eq!(b["Cmd"], json!(["true"]));
        s.network = Some(crate::NetworkAttachment {
            bridge: "plzbr0".into(),
            address: "10.101.3.9".parse().unwrap(),
            prefix: 24,
            gateway: "10.101.3.1".parse().unwrap(),
            mtu: Some(1420),
            dns: Some("10.101.3.1".parse().unwrap()),
        });
        let b = DockerRuntime::create_body(&s).unwrap();
        let hc = &b["HostConfig"];
        assert_eq!(hc["NetworkMode"], "plzbr0");
        assert_eq!(hc["Dns"], json!(["10.101.3.1"]));
        assert_eq!(hc["DnsSearch"], json!(["internal"]));
        let ep = &b["NetworkingConfig"]["EndpointsConfig"]["plzbr0"];
        assert_eq!(ep["IPAMConfig"]["IPv4Address"], "10.101.3.9");
        let n = DockerRuntime::network_body(&BridgeNetwork {
            bridge: "plzbr0".into(),
            gateway: "10.101.3.1".parse().unwrap(),
            prefix: 24,
            mtu: Some(1420),
            allow_from: Some("10.101.0.0/16".into()),
        });
        let ipam = &n["IPAM"]["Config"][0];
        assert_eq!(ipam["Subnet"], "10.101.3.0/24");
        assert_eq!(ipam["Gateway"], "10.101.3.1");
        assert_eq!(n["Name"], "plzbr0");
        assert_eq!(n["Labels"][MANAGED_LABEL], "true");
        let o = &n["Options"];
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
        assert_eq!(map_state(Some("created"), None, false), State::Created);
        assert_eq!(map_state(None, None, false), State::Created);
        assert_eq!(map_state(Some("running"), None, false), State::Running);
        assert_eq!(map_state(Some("exited"), Some(137), true), State::Stopped);
        assert_eq!(map_state(Some("exited"), Some(2), false), State::Failed);
        assert_eq!(map_state(Some("dead"), None, false), State::Failed);
    }
}
