//! Docker backend: the Docker Engine API through bollard. Images must already
//! be in dockerd's local store (no pulls). Every container ployz creates is
//! labelled `ployz.managed=true`; `list` only sees those.

use crate::{Image, Runtime, RuntimeError, RuntimeKind, State, WorkloadSpec, WorkloadStatus};
use bollard::models::{ContainerCreateBody, ContainerStateStatusEnum, HostConfig};
use bollard::query_parameters::{
    CreateContainerOptions, InspectContainerOptions, ListContainersOptions, LogsOptions,
    RemoveContainerOptions, StopContainerOptions,
};
use bollard::Docker;
use futures_util::StreamExt;
use std::collections::{HashMap, HashSet};
use std::sync::Mutex;
use std::time::Duration;

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
                ..Default::default()
            }),
            ..Default::default()
        })
    }
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
        self.docker
            .start_container(id, None)
            .await
            .map_err(docker_err("start", id))
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
        crate::validate_id(id)?;
        let info = self
            .docker
            .inspect_container(id, None::<InspectContainerOptions>)
            .await
            .map_err(docker_err("inspect", id))?;
        let st = info.state.unwrap_or_default();
        Ok(map_state(st.status, st.exit_code, self.stopped_by_us(id)))
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
            match self.state(&id).await {
                Ok(state) => out.push(WorkloadStatus { id, state }),
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
}

#[cfg(test)]
mod tests {
    use super::*;
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
        assert_eq!(b.labels.unwrap()[MANAGED_LABEL], "true");
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
