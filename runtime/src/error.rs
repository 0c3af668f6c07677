use std::path::PathBuf;

/// Why a runtime operation failed. Messages say what failed and what to do next.
#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    #[error(
        "workload id `{0}` is invalid: use 1-64 characters of [A-Za-z0-9_.-] starting with a letter or digit"
    )]
    InvalidId(String),

    #[error("workload `{id}` has an invalid spec: {reason}")]
    InvalidSpec { id: String, reason: String },

    #[error("the {runtime} runtime cannot run workload `{id}` from {image}: {hint}")]
    UnsupportedImage {
        runtime: &'static str,
        id: String,
        image: String,
        hint: &'static str,
    },

    /// The workload's program is not in its image (a typo in the command, or
    /// an image without it). `image` is what the caller knows the image by.
    #[error(
        "image {image} has no executable `{executable}` (looked in {searched}): \
         deploy again with a command the image contains"
    )]
    ExecutableNotFound {
        id: String,
        image: String,
        executable: String,
        searched: String,
    },

    #[error("workload `{0}` does not exist on this runtime: create it first (see list())")]
    NotFound(String),

    #[error("workload `{0}` already exists: delete it first or choose another id")]
    AlreadyExists(String),

    #[error("cannot {op} workload `{id}` while it is {state}")]
    InvalidState {
        id: String,
        op: &'static str,
        state: crate::State,
    },

    #[error(
        "host runtime: {op} of workload `{id}` failed: {source} \
         (ployzd must run as root with cgroups mounted; see the state dir for leftovers)"
    )]
    Container {
        op: &'static str,
        id: String,
        #[source]
        source: Box<libcontainer::error::LibcontainerError>,
    },

    #[error(
        "host runtime: {op} of workload `{id}` failed: {message} \
         (ployzd must run as root with cgroups mounted; see the state dir for leftovers)"
    )]
    Engine {
        op: &'static str,
        id: String,
        message: String,
    },

    #[error("host runtime: cannot {what} {}: {source}", path.display())]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    #[error("host runtime: cannot build the OCI spec for workload `{id}`: {reason}")]
    Spec { id: String, reason: String },

    #[error("network `{bridge}` is invalid: {reason}")]
    InvalidNetwork { bridge: String, reason: String },

    #[error("{runtime} runtime: cannot {what}: {reason}")]
    Network {
        runtime: &'static str,
        what: String,
        reason: String,
    },

    #[error("docker runtime: cannot load images from archive {}: {reason}", archive.display())]
    ImageLoad { archive: PathBuf, reason: String },

    #[error("host runtime worker thread has stopped: restart ployzd (earlier errors say why)")]
    WorkerGone,

    #[error(
        "docker runtime: {op} of `{id}` failed: {source} \
         (is dockerd running and /var/run/docker.sock reachable?)"
    )]
    Docker {
        op: &'static str,
        id: String,
        #[source]
        source: Box<crate::dockerd::Error>,
    },
}
