//! A recording in-memory [`Runtime`] for unit tests of callers' pure logic
//! (never a substitute for the real backends in this crate's tests).

use crate::{
    BridgeNetwork, Runtime, RuntimeError, RuntimeKind, State, WorkloadSpec, WorkloadStatus,
};
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Mutex;
use std::time::Duration;

/// One call the fake received, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FakeCall {
    Create(String),
    Start(String),
    Stop(String, Duration),
    Delete(String),
    EnsureNetwork(BridgeNetwork),
    RemoveNetwork(String),
}

#[derive(Default)]
pub struct FakeRuntime {
    inner: Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    calls: Vec<FakeCall>,
    workloads: BTreeMap<String, State>,
    bridges: BTreeSet<String>,
}

impl FakeRuntime {
    pub fn new() -> Self {
        Self::default()
    }

    /// The mutating calls received so far.
    pub fn calls(&self) -> Vec<FakeCall> {
        self.lock().calls.clone()
    }

    /// Forces a workload's state (e.g. to simulate a crash: `State::Failed`).
    pub fn set_state(&self, id: &str, state: State) {
        self.lock().workloads.insert(id.to_string(), state);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn with<T>(
        &self,
        id: &str,
        f: impl FnOnce(&mut State) -> Result<T, RuntimeError>,
    ) -> Result<T, RuntimeError> {
        match self.lock().workloads.get_mut(id) {
            Some(s) => f(s),
            None => Err(RuntimeError::NotFound(id.to_string())),
        }
    }
}

impl Runtime for FakeRuntime {
    fn kind(&self) -> RuntimeKind {
        RuntimeKind::Host
    }

    async fn create(&self, spec: &WorkloadSpec) -> Result<(), RuntimeError> {
        spec.validate()?;
        let mut g = self.lock();
        g.calls.push(FakeCall::Create(spec.id.clone()));
        if g.workloads.contains_key(&spec.id) {
            return Err(RuntimeError::AlreadyExists(spec.id.clone()));
        }
        if let Some(att) = &spec.network {
            if !g.bridges.contains(&att.bridge) {
                return Err(RuntimeError::InvalidSpec {
                    id: spec.id.clone(),
                    reason: format!(
                        "bridge {} does not exist: call ensure_network for it first",
                        att.bridge
                    ),
                });
            }
        }
        g.workloads.insert(spec.id.clone(), State::Created);
        Ok(())
    }

    async fn start(&self, id: &str) -> Result<(), RuntimeError> {
        self.lock().calls.push(FakeCall::Start(id.to_string()));
        self.with(id, |s| match *s {
            State::Created => {
                *s = State::Running;
                Ok(())
            }
            state => Err(RuntimeError::InvalidState {
                id: id.to_string(),
                op: "start",
                state,
            }),
        })
    }

    async fn stop(&self, id: &str, timeout: Duration) -> Result<(), RuntimeError> {
        self.lock()
            .calls
            .push(FakeCall::Stop(id.to_string(), timeout));
        self.with(id, |s| {
            if matches!(*s, State::Running | State::Created) {
                *s = State::Stopped;
            }
            Ok(())
        })
    }

    async fn delete(&self, id: &str) -> Result<(), RuntimeError> {
        let mut g = self.lock();
        g.calls.push(FakeCall::Delete(id.to_string()));
        g.workloads
            .remove(id)
            .map(|_| ())
            .ok_or_else(|| RuntimeError::NotFound(id.to_string()))
    }

    async fn state(&self, id: &str) -> Result<State, RuntimeError> {
        self.with(id, |s| Ok(*s))
    }

    async fn list(&self) -> Result<Vec<WorkloadStatus>, RuntimeError> {
        Ok(self
            .lock()
            .workloads
            .iter()
            .map(|(id, state)| WorkloadStatus {
                id: id.clone(),
                state: *state,
                exit_code: match state {
                    State::Failed => Some(1),
                    State::Stopped => Some(0),
                    State::Created | State::Running => None,
                },
            })
            .collect())
    }

    async fn logs(&self, id: &str) -> Result<String, RuntimeError> {
        self.with(id, |_| Ok(String::new()))
    }

    /// Succeeds with no output on a running workload.
    async fn exec(
        &self,
        id: &str,
        _args: &[String],
        _timeout: Duration,
    ) -> Result<crate::ExecOutput, RuntimeError> {
        let state = self.with(id, |s| Ok(*s))?;
        if state != State::Running {
            return Err(RuntimeError::InvalidState {
                id: id.to_string(),
                op: "exec in",
                state,
            });
        }
        Ok(crate::ExecOutput {
            exit_code: Some(0),
            output: String::new(),
        })
    }

    async fn ensure_network(&self, net: &BridgeNetwork) -> Result<(), RuntimeError> {
        net.validate()?;
        let mut g = self.lock();
        g.calls.push(FakeCall::EnsureNetwork(net.clone()));
        g.bridges.insert(net.bridge.clone());
        Ok(())
    }

    async fn remove_network(&self, bridge: &str) -> Result<(), RuntimeError> {
        let mut g = self.lock();
        g.calls.push(FakeCall::RemoveNetwork(bridge.to_string()));
        g.bridges.remove(bridge);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Image;

    #[tokio::test]
    async fn networks_must_exist_before_attaching() {
        let rt = FakeRuntime::new();
        let net = BridgeNetwork {
            bridge: "plzbr0".into(),
            gateway: "10.101.3.1".parse().unwrap(),
            prefix: 24,
            mtu: None,
            allow_from: None,
        };
        let mut spec = WorkloadSpec::new("w", Image::Rootfs("/r".into()), vec!["true".into()]);
        spec.network = Some(crate::NetworkAttachment {
            bridge: "plzbr0".into(),
            address: "10.101.3.2".parse().unwrap(),
            prefix: 24,
            gateway: net.gateway,
            mtu: None,
            dns: None,
        });
        let e = rt.create(&spec).await.unwrap_err();
        assert!(e.to_string().contains("ensure_network"), "{e}");
        rt.ensure_network(&net).await.unwrap();
        rt.create(&spec).await.unwrap();
        rt.remove_network("plzbr0").await.unwrap();
        assert_eq!(rt.calls()[1], FakeCall::EnsureNetwork(net));
        assert_eq!(rt.calls()[3], FakeCall::RemoveNetwork("plzbr0".into()));
    }

    #[tokio::test]
    async fn records_calls_and_tracks_state() {
        let rt = FakeRuntime::new();
        let spec = WorkloadSpec::new("w", Image::Rootfs("/r".into()), vec!["true".into()]);
        rt.create(&spec).await.unwrap();
        rt.start("w").await.unwrap();
        assert_eq!(rt.state("w").await.unwrap(), State::Running);
        rt.set_state("w", State::Failed);
        assert_eq!(rt.list().await.unwrap()[0].state, State::Failed);
        rt.stop("w", Duration::from_secs(1)).await.unwrap();
        rt.delete("w").await.unwrap();
        assert!(matches!(
            rt.state("w").await,
            Err(RuntimeError::NotFound(_))
        ));
        assert_eq!(
            rt.calls(),
            vec![
                FakeCall::Create("w".into()),
                FakeCall::Start("w".into()),
                FakeCall::Stop("w".into(), Duration::from_secs(1)),
                FakeCall::Delete("w".into()),
            ]
        );
    }
}
