//! The workload runtime seam. A machine runs its workloads with one runtime,
//! chosen when ployzd starts: `host` (OCI bundles run in-process through
//! youki's libcontainer) or `docker` (the Docker Engine API).

use serde::{Deserialize, Serialize};
use std::fmt;
use std::str::FromStr;

#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum RuntimeKind {
    #[default]
    Host,
    Docker,
}

impl RuntimeKind {
    pub fn as_str(self) -> &'static str {
        match self {
            RuntimeKind::Host => "host",
            RuntimeKind::Docker => "docker",
        }
    }
}

impl fmt::Display for RuntimeKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("unknown runtime `{0}`: use `host` (OCI bundles, no daemon needed) or `docker`")]
pub struct UnknownRuntime(pub String);

impl FromStr for RuntimeKind {
    type Err = UnknownRuntime;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "host" => Ok(RuntimeKind::Host),
            "docker" => Ok(RuntimeKind::Docker),
            other => Err(UnknownRuntime(other.into())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse() {
        assert_eq!("host".parse::<RuntimeKind>().unwrap(), RuntimeKind::Host);
        assert_eq!(
            "docker".parse::<RuntimeKind>().unwrap(),
            RuntimeKind::Docker
        );
        let e = "podman".parse::<RuntimeKind>().unwrap_err();
        assert!(e.to_string().contains("`podman`"));
    }
}
