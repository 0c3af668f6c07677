//! `ployzctl`: parse arguments, send one request to the local ployzd, print
//! the answer (a table, or JSON with `--json`), exit with a documented code.

mod client;
mod compose;
mod gateway;
mod output;
mod progress;

use clap::{Parser, Subcommand};
use ployz_api::{LifecycleAction, Request};
use std::path::PathBuf;

/// Exit codes (also in the README).
pub mod exit {
    pub const OK: i32 = 0;
    pub const INTERNAL: i32 = 1;
    pub const USAGE: i32 = 2;
    pub const NO_DAEMON: i32 = 3;
    /// A multi-target command where some targets failed.
    pub const PARTIAL: i32 = 9;
    /// `status`: some check is not ok.
    pub const NOT_OK: i32 = 11;
}

#[derive(Parser)]
#[command(name = "ployzctl", version, about = "Drive a Ployz cluster")]
struct Cli {
    /// ployzd's API socket [default: /run/ployz/ployzd.sock as root, else $XDG_RUNTIME_DIR/ployz/ployzd.sock]
    #[arg(long, global = true, env = "PLOYZ_SOCKET")]
    socket: Option<PathBuf>,
    /// Print JSON instead of tables (errors too).
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: Top,
}

#[derive(Subcommand)]
enum Top {
    /// The network this machine belongs to.
    #[command(subcommand)]
    Mesh(MeshCmd),
    /// Machines of the network.
    #[command(subcommand)]
    Machine(MachineCmd),
    /// The NATS control plane.
    #[command(subcommand)]
    Nats(NatsCmd),
    /// Release locations for `--install-source release`.
    #[command(subcommand)]
    Release(ReleaseCmd),
    /// Deploy a workload: `deploy service NAME --image …`, or every service
    /// of a compose file with `deploy -f compose.yaml`.
    Deploy(DeployArgs),
    /// Services running on the cluster.
    #[command(subcommand)]
    Service(ServiceCmd),
    /// Long operations (machine add/update/rm, storage promote, service migrate, deploy) and their outcome.
    #[command(subcommand)]
    Op(OpCmd),
    /// Check this machine: daemon, network, store quorum, mesh peers, NATS,
    /// runtime, clocks, disk; exits 0 only when every check is ok.
    #[command(alias = "doctor")]
    Status,
    /// Print a one-time login link to this machine's web dashboard.
    Dashboard,
    /// Image registries: plain-HTTP hosts and credentials (stored in the cluster, never printed).
    #[command(subcommand)]
    Registry(RegistryCmd),
    /// HTTP(S) gateway routes: hostname (+ path prefix) → a service's port.
    #[command(subcommand)]
    Route(gateway::RouteCmd),
    /// ACME (certificates for `route add --tls acme`): the CA and contact.
    #[command(subcommand)]
    Acme(gateway::AcmeCmd),
    /// Print a shell completion script: `ployzctl completions bash > /etc/bash_completion.d/ployzctl`.
    Completions {
        /// bash, zsh, fish, elvish or powershell.
        shell: clap_complete::Shell,
    },
}

#[derive(Subcommand)]
enum RegistryCmd {
    /// Store credentials for a registry (basic auth or its token flow).
    Login {
        /// host[:port] as in image references.
        host: String,
        #[arg(long)]
        username: String,
        /// Read the password from the first line of stdin (required: never on the command line).
        #[arg(long, required = true)]
        password_stdin: bool,
        /// Talk plain HTTP to this host.
        #[arg(long)]
        insecure: bool,
    },
    /// Name a registry; with --insecure ployz talks plain HTTP to it.
    Add {
        host: String,
        #[arg(long)]
        insecure: bool,
    },
    /// Registries ployz knows (no secrets).
    #[command(alias = "list")]
    Ls,
    /// Forget a registry and its credentials.
    Rm { host: String },
}

#[derive(Subcommand)]
enum OpCmd {
    /// Recent operations, newest first.
    #[command(alias = "list")]
    Ls,
    /// Wait until an operation ends; exits with the code it ended with.
    Wait {
        id: String,
        /// Give up waiting after this long (the operation goes on).
        #[arg(long, default_value_t = 300)]
        timeout_secs: u64,
    },
}

#[derive(clap::Args)]
#[command(args_conflicts_with_subcommands = true)]
struct DeployArgs {
    #[command(subcommand)]
    cmd: Option<DeployCmd>,
    /// A compose file: deploy each of its services, dependencies first.
    #[arg(short = 'f', long = "file")]
    file: Option<PathBuf>,
    /// Project name (prefix of the services and volumes) [default: the file's directory name].
    #[arg(long)]
    project: Option<String>,
    /// Warn about keys ployz does not support instead of refusing the file.
    #[arg(long)]
    ignore_unsupported: bool,
    /// Seconds to wait for each service's instances to run.
    #[arg(long, default_value_t = 120)]
    wait_secs: u64,
}

// Parsed once per run: the size of a variant does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand)]
enum DeployCmd {
    /// Remove the services of a compose file (or of `--project`).
    Rm {
        #[arg(short = 'f', long = "file")]
        file: Option<PathBuf>,
        #[arg(long)]
        project: Option<String>,
    },
    /// Create or update a service and wait until its instances run.
    Service {
        name: String,
        /// Image: a `docker save` tarball or OCI image layout on this machine
        /// (shipped to the machines that run it), a registry reference
        /// (`host[:port]/repo[:tag][@sha256:…]`), or a name: the image stored
        /// under it here, else Docker Hub (`busybox` = docker.io/library/busybox:latest).
        #[arg(long)]
        image: String,
        #[arg(long, default_value_t = 1)]
        replicas: u32,
        /// Environment variable KEY=VALUE (repeatable).
        #[arg(short = 'e', long = "env")]
        env: Vec<String>,
        /// Named volume VOLUME:/PATH (repeatable).
        #[arg(short = 'v', long = "volume")]
        volumes: Vec<String>,
        /// Seconds to wait for the instances to run.
        #[arg(long, default_value_t = 120)]
        wait_secs: u64,
        /// Memory limit per instance, e.g. 64M (K, M, G suffixes).
        #[arg(long)]
        memory: Option<String>,
        /// Relative CPU weight per instance, 2-262144 (default weight 1024).
        #[arg(long)]
        cpu_shares: Option<u64>,
        /// Health check: a shell command run inside each instance (exit 0 passes).
        #[arg(long)]
        health_cmd: Option<String>,
        /// Health check: GET PATH[:PORT] on each instance (2xx/3xx pass; port 80 by default).
        #[arg(long)]
        health_http: Option<String>,
        /// Health check: connect to this TCP port of each instance.
        #[arg(long)]
        health_tcp: Option<String>,
        /// Time between probes, e.g. 10s, 500ms [default: 10s].
        #[arg(long)]
        health_interval: Option<String>,
        /// A probe taking longer fails [default: 5s].
        #[arg(long)]
        health_timeout: Option<String>,
        /// Failed probes in a row that make an instance unhealthy (it is restarted) [default: 3].
        #[arg(long)]
        health_retries: Option<u32>,
        /// Failed probes do not count for this long after a start [default: 0s].
        #[arg(long)]
        health_start_period: Option<String>,
        /// Publish [IP:]HOST_PORT:CONTAINER_PORT[/tcp|/udp] on every serving machine (repeatable).
        #[arg(short = 'p', long = "publish")]
        publish: Vec<String>,
        /// Give the instances `NATS_URL` with this NATS app user's credentials (`nats user add`).
        #[arg(long)]
        nats_user: Option<String>,
        /// Command to run instead of the image's default.
        #[arg(last = true)]
        command: Vec<String>,
    },
}

#[derive(Subcommand)]
enum ServiceCmd {
    /// List services and where their instances run.
    #[command(alias = "list")]
    Ls,
    /// Remove a service: its instances are stopped and deleted everywhere.
    Rm { name: String },
    /// What the service's instances wrote to stdout and stderr.
    Logs {
        name: String,
        /// Only this instance (see `service ls`).
        #[arg(long)]
        slot: Option<u32>,
        /// Last lines per instance.
        #[arg(long, default_value_t = 200)]
        tail: usize,
    },
    /// Move a service's instance, with its volumes, to another machine.
    Migrate {
        name: String,
        /// Machine to move to.
        #[arg(long)]
        to: String,
        /// Machine to move from (when the service runs on several).
        #[arg(long)]
        from: Option<String>,
    },
}

#[derive(Subcommand)]
enum ReleaseCmd {
    /// Lay out a release location (for `--release-url file://DIR` or a web server)
    /// from the ployzd and ployzctl next to this ployzctl.
    Pack {
        #[arg(long)]
        out: PathBuf,
        /// Version name [default: this build's version].
        #[arg(long = "version", id = "release_version")]
        version: Option<String>,
    },
}

/// Install and SSH flags shared by `machine init` and `machine add`.
#[derive(clap::Args)]
struct InstallFlags {
    /// Name of the cluster network to join.
    #[arg(long)]
    network: String,
    /// Container runtime: docker or host.
    #[arg(long)]
    runtime: Option<String>,
    /// How ployzd runs: user or system.
    #[arg(long)]
    service_mode: Option<String>,
    /// Where to pull the binary from: release or git [default: inferred].
    #[arg(long)]
    install_source: Option<String>,
    /// Release version to install [default: latest].
    #[arg(long)]
    install_version: Option<String>,
    /// Git remote URL (with --install-source git).
    #[arg(long)]
    install_git_url: Option<String>,
    /// Git ref to build (with --install-source git).
    #[arg(long)]
    install_git_ref: Option<String>,
    /// Release location: https://… or file:///DIR.
    #[arg(long, env = "PLOYZ_RELEASE_URL")]
    release_url: Option<String>,
    /// SSH private key [default: ~/.ssh/id_ed25519, then ~/.ssh/id_rsa].
    #[arg(long)]
    identity: Option<PathBuf>,
}

#[derive(Subcommand)]
enum NatsCmd {
    /// Print a URL (credentials included) a standard NATS client can connect with:
    /// the operator user, who reads and watches the cluster's buckets but never writes them.
    Url {
        /// ployzd's own full-rights user instead (it can write the cluster's buckets:
        /// for repairs and tooling that knows the records; keep it off apps).
        #[arg(long)]
        admin: bool,
    },
    /// App users: credentials with only the subjects and KV buckets they are granted.
    #[command(subcommand)]
    User(NatsUserCmd),
}

#[derive(Subcommand)]
enum NatsUserCmd {
    /// Create (or replace, with a new password) a user; prints its URL.
    Add {
        name: String,
        /// A subject (wildcards allowed) the user may publish to; repeatable.
        #[arg(long = "allow-pub", value_name = "SUBJ")]
        allow_pub: Vec<String>,
        /// A subject (wildcards allowed) the user may subscribe to; repeatable.
        #[arg(long = "allow-sub", value_name = "SUBJ")]
        allow_sub: Vec<String>,
        /// A JetStream KV bucket the user may get, put and watch (created if missing); repeatable.
        #[arg(long = "kv-bucket", value_name = "B")]
        kv_bucket: Vec<String>,
    },
    /// Users and their grants (no passwords).
    #[command(alias = "list")]
    Ls,
    /// Remove a user: its connections are closed on every machine.
    Rm { name: String },
}

#[derive(Subcommand)]
enum MeshCmd {
    /// Create a network with this machine as its founder.
    Init {
        /// Network name (lowercase letters, digits, '-').
        network: String,
        /// Region of this machine [default: ployzd's --region].
        #[arg(long)]
        region: Option<String>,
        /// Overlay range, cut into one /24 per machine.
        #[arg(long, default_value = ployz_api::DEFAULT_CLUSTER_CIDR)]
        cidr: String,
    },
    /// This machine's network, record and store replica.
    Status,
    /// Leave the network from this machine alone, once the network removed
    /// it (`machine rm --force` while it was unreachable): its workloads and
    /// state are deleted and ployzd stops.
    Leave {
        /// Also when the network's store cannot be asked whether it still
        /// counts this machine.
        #[arg(long)]
        force: bool,
    },
}

#[derive(Subcommand)]
enum MachineCmd {
    /// List the machines of the network.
    #[command(alias = "list")]
    Ls,
    /// Mark a machine ready for new workload placements.
    Activate { machine: String },
    /// Stop new placements on a machine; running workloads stay.
    Drain { machine: String },
    /// Take a machine out of placement without moving its workloads.
    Standby {
        /// Proceed even though workloads still run there.
        #[arg(long)]
        force: bool,
        machine: String,
    },
    /// Single-use join tokens.
    #[command(subcommand)]
    Invite(InviteCmd),
    /// The storage (Raft voter) set.
    #[command(subcommand)]
    Storage(StorageCmd),
    /// Round-trip times between every pair of machines over the mesh.
    Rtt,
    /// Provision a fresh host over SSH and join it.
    Init {
        /// `user@host[:port]`.
        target: String,
        #[command(flatten)]
        install: InstallFlags,
    },
    /// Provision and join several hosts, in sequence.
    Add {
        #[command(flatten)]
        install: InstallFlags,
        #[arg(required = true)]
        targets: Vec<String>,
    },
    /// Upgrade ployzd on machines (all when none is named).
    Update {
        /// Version to install [default: latest].
        #[arg(long = "version", id = "target_version")]
        version: Option<String>,
        #[arg(long, env = "PLOYZ_RELEASE_URL")]
        release_url: Option<String>,
        #[arg(long)]
        identity: Option<PathBuf>,
        machines: Vec<String>,
    },
    /// Remove a machine from the network.
    Rm {
        /// Only delete the membership record; do not ask the machine to clean up.
        #[arg(long)]
        force: bool,
        machine: String,
    },
}

#[derive(Subcommand)]
enum StorageCmd {
    /// Add machines to the storage set so it holds `--replicas` machines.
    Promote {
        /// Size of the storage set after promotion: 3 or 5.
        #[arg(long)]
        replicas: u8,
        #[arg(required = true)]
        machines: Vec<String>,
    },
}

#[derive(Subcommand)]
enum InviteCmd {
    /// Create an invite token.
    Create {
        /// Lifetime of the token in seconds.
        #[arg(long, default_value_t = ployz_api::DEFAULT_INVITE_TTL_SECS)]
        ttl_secs: u64,
    },
    /// List invites and their status.
    #[command(alias = "ls")]
    List,
    /// Revoke an unused invite.
    Revoke { invite_id: String },
    /// Join the network of an invite (run on the joining machine).
    #[command(group = clap::ArgGroup::new("from").required(true))]
    Import {
        /// The token (it shows in `ps` while the join runs: prefer --token-stdin).
        #[arg(long, group = "from")]
        token: Option<String>,
        /// Read the token from the first line of stdin.
        #[arg(long, group = "from")]
        token_stdin: bool,
    },
}

/// The SSH key to send: the flag, or the first default that exists, as an
/// absolute path (the daemon runs elsewhere and as another user).
fn identity(flag: Option<PathBuf>) -> Option<String> {
    let path = flag.or_else(|| {
        let home = std::env::var_os("HOME").map(PathBuf::from);
        ployz_provision::ssh::default_identities(home.as_deref())
            .into_iter()
            .find(|p| p.exists())
    })?;
    let abs = std::fs::canonicalize(&path).unwrap_or(path);
    Some(abs.display().to_string())
}

fn add_request(targets: Vec<String>, f: InstallFlags) -> Request {
    Request::MachineAdd(Box::new(ployz_api::AddRequest {
        targets,
        network: f.network,
        runtime: f.runtime,
        service_mode: f.service_mode,
        install_source: f.install_source,
        install_version: f.install_version,
        install_git_url: f.install_git_url,
        install_git_ref: f.install_git_ref,
        release_url: f.release_url,
        identity: identity(f.identity),
    }))
}

/// An image that names a file or directory here is sent as an absolute
/// path (ployzd imports it); anything else is a name.
fn image_arg(image: &str) -> String {
    let p = std::path::Path::new(image);
    if p.exists() {
        std::fs::canonicalize(p)
            .map(|a| a.display().to_string())
            .unwrap_or_else(|_| image.to_string())
    } else {
        image.to_string()
    }
}

/// Something that looks like a path must exist.
fn check_image_path(image: &str) -> Result<(), String> {
    let looks_like_path = image.starts_with(['.', '/', '~'])
        || [".tar", ".tgz", ".tar.gz"]
            .iter()
            .any(|ext| image.ends_with(ext));
    if !looks_like_path {
        return Ok(());
    }
    // Not followed into: a FIFO or a device would make the daemon's import
    // wait forever or read without end.
    match std::fs::metadata(image) {
        Err(_) => Err(format!("--image {image}: no such file or directory")),
        Ok(m) if m.is_file() || m.is_dir() => Ok(()),
        Ok(_) => Err(format!(
            "--image {image}: not a regular file or a directory (a FIFO, socket or device cannot be imported)"
        )),
    }
}

fn request_of(cmd: Top, json: bool) -> Request {
    match cmd {
        Top::Release(_) | Top::Completions { .. } => unreachable!("handled locally"),
        Top::Machine(MachineCmd::Init { target, install }) => add_request(vec![target], install),
        Top::Machine(MachineCmd::Add { install, targets }) => add_request(targets, install),
        Top::Machine(MachineCmd::Update {
            version,
            release_url,
            identity: id,
            machines,
        }) => Request::MachineUpdate {
            version,
            machines,
            release_url,
            identity: identity(id),
        },
        Top::Mesh(MeshCmd::Init {
            network,
            region,
            cidr,
        }) => Request::MeshInit {
            network,
            region,
            cidr: Some(cidr),
        },
        Top::Mesh(MeshCmd::Status) => Request::MeshStatus,
        Top::Nats(NatsCmd::Url { admin }) => Request::NatsUrl { admin },
        Top::Nats(NatsCmd::User(NatsUserCmd::Add {
            name,
            allow_pub,
            allow_sub,
            kv_bucket,
        })) => Request::NatsUserAdd {
            name,
            allow_pub,
            allow_sub,
            kv_buckets: kv_bucket,
        },
        Top::Nats(NatsCmd::User(NatsUserCmd::Ls)) => Request::NatsUserList,
        Top::Nats(NatsCmd::User(NatsUserCmd::Rm { name })) => Request::NatsUserRm { name },
        Top::Machine(MachineCmd::Ls) => Request::MachineList,
        Top::Machine(MachineCmd::Activate { machine }) => Request::Lifecycle {
            machine,
            action: LifecycleAction::Activate,
            force: false,
        },
        Top::Machine(MachineCmd::Drain { machine }) => Request::Lifecycle {
            machine,
            action: LifecycleAction::Drain,
            force: false,
        },
        Top::Machine(MachineCmd::Standby { force, machine }) => Request::Lifecycle {
            machine,
            action: LifecycleAction::Standby,
            force,
        },
        Top::Machine(MachineCmd::Invite(InviteCmd::Create { ttl_secs })) => {
            Request::InviteCreate { ttl_secs }
        }
        Top::Machine(MachineCmd::Invite(InviteCmd::List)) => Request::InviteList,
        Top::Machine(MachineCmd::Invite(InviteCmd::Revoke { invite_id })) => {
            Request::InviteRevoke { invite_id }
        }
        Top::Machine(MachineCmd::Invite(InviteCmd::Import { token, .. })) => {
            Request::InviteImport {
                token: token.unwrap_or_default(),
            }
        }
        Top::Machine(MachineCmd::Storage(StorageCmd::Promote { replicas, machines })) => {
            Request::StoragePromote { replicas, machines }
        }
        Top::Machine(MachineCmd::Rm { force, machine }) => Request::MachineRm { machine, force },
        Top::Machine(MachineCmd::Rtt) => Request::MachineRtt,
        Top::Deploy(DeployArgs {
            cmd: Some(DeployCmd::Rm { .. }),
            ..
        })
        | Top::Deploy(DeployArgs { cmd: None, .. }) => unreachable!("handled in main"),
        Top::Deploy(DeployArgs {
            cmd:
                Some(DeployCmd::Service {
                    name,
                    image,
                    replicas,
                    env,
                    volumes,
                    wait_secs,
                    memory,
                    cpu_shares,
                    health_cmd,
                    health_http,
                    health_tcp,
                    health_interval,
                    health_timeout,
                    health_retries,
                    health_start_period,
                    publish,
                    nats_user,
                    command,
                }),
            ..
        }) => Request::ServiceDeploy(Box::new(ployz_api::DeployRequest {
            name,
            image: image_arg(&image),
            replicas,
            env,
            volumes,
            command,
            wait_secs: Some(wait_secs),
            memory,
            cpu_shares,
            project: None,
            health_cmd,
            health_http,
            health_tcp,
            health_interval,
            health_timeout,
            health_retries,
            health_start_period,
            publish,
            nats_user,
        })),
        Top::Service(ServiceCmd::Ls) => Request::ServiceList,
        Top::Service(ServiceCmd::Rm { name }) => Request::ServiceRm { name },
        Top::Service(ServiceCmd::Logs { name, slot, tail }) => Request::ServiceLogs {
            name,
            slot,
            tail: Some(tail),
        },
        Top::Service(ServiceCmd::Migrate { name, to, from }) => {
            Request::ServiceMigrate { name, to, from }
        }
        Top::Mesh(MeshCmd::Leave { force }) => Request::MeshLeave { force },
        Top::Op(OpCmd::Ls) => Request::OpList,
        Top::Status => Request::Doctor,
        Top::Dashboard => Request::Dashboard,
        Top::Registry(RegistryCmd::Add { host, insecure }) => Request::RegistrySet {
            host,
            insecure,
            username: None,
            password: None,
        },
        Top::Registry(RegistryCmd::Login { .. }) => unreachable!("needs the password: see main"),
        Top::Registry(RegistryCmd::Ls) => Request::RegistryList,
        Top::Registry(RegistryCmd::Rm { host }) => Request::RegistryRm { host },
        Top::Route(cmd) => gateway::route_request(cmd),
        Top::Acme(cmd) => gateway::acme_request(cmd, json),
        Top::Op(OpCmd::Wait { id, timeout_secs }) => Request::OpWait {
            id,
            timeout_secs: Some(timeout_secs),
        },
    }
}

fn main() {
    // Like every Unix filter: when the reader of our output goes away
    // (`ployzctl … | head`, `| grep -q`), end quietly on SIGPIPE instead of
    // panicking on the failed write (Rust ignores SIGPIPE by default).
    // SAFETY: restoring a signal's default disposition before any thread starts.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            let code = if e.use_stderr() {
                exit::USAGE
            } else {
                exit::OK
            };
            let _ = e.print();
            std::process::exit(code);
        }
    };
    let socket = cli.socket.clone().unwrap_or_else(client::default_socket);
    let json = cli.json;
    if let Top::Completions { shell } = cli.command {
        use clap::CommandFactory;
        clap_complete::generate(
            shell,
            &mut Cli::command(),
            "ployzctl",
            &mut std::io::stdout(),
        );
        std::process::exit(exit::OK);
    }
    if let Top::Release(ReleaseCmd::Pack { out, version }) = cli.command {
        std::process::exit(release_pack(&out, version, json));
    }
    if let Top::Deploy(d) = &cli.command {
        match &d.cmd {
            Some(DeployCmd::Rm { file, project }) => {
                std::process::exit(compose::rm(&socket, file.as_deref(), project.clone(), json))
            }
            None => {
                let Some(file) = d.file.clone() else {
                    output::print_error(
                        &ployz_api::ApiError::new(
                            ployz_api::ErrorCode::InvalidArgument,
                            "deploy needs a compose file (-f FILE) or a subcommand (deploy service …)",
                        ),
                        json,
                    );
                    std::process::exit(exit::USAGE);
                };
                let opts = compose::ComposeOpts {
                    file,
                    project: d.project.clone(),
                    ignore_unsupported: d.ignore_unsupported,
                    wait_secs: d.wait_secs,
                };
                std::process::exit(compose::deploy(&socket, &opts, json));
            }
            Some(DeployCmd::Service { .. }) => {}
        }
    }
    if let Top::Deploy(DeployArgs {
        cmd: Some(DeployCmd::Service { image, .. }),
        ..
    }) = &cli.command
    {
        if let Err(msg) = check_image_path(image) {
            output::print_error(
                &ployz_api::ApiError::new(ployz_api::ErrorCode::InvalidArgument, msg).with_hint(
                    "give a `docker save` tarball, an OCI image layout directory, or an image name",
                ),
                json,
            );
            std::process::exit(ployz_api::ErrorCode::InvalidArgument.exit_code());
        }
    }
    let mut command = cli.command;
    if let Top::Machine(MachineCmd::Invite(InviteCmd::Import {
        token,
        token_stdin: true,
    })) = &mut command
    {
        let mut line = String::new();
        let _ = std::io::stdin().read_line(&mut line);
        if line.trim().is_empty() {
            output::print_error(
                &ployz_api::ApiError::new(
                    ployz_api::ErrorCode::InvalidArgument,
                    "--token-stdin: stdin had no token",
                )
                .with_hint("pipe the token in: `echo \"$TOKEN\" | ployzctl machine invite import --token-stdin`"),
                json,
            );
            std::process::exit(ployz_api::ErrorCode::InvalidArgument.exit_code());
        }
        *token = Some(line.trim().to_string());
    }
    let request = match command {
        Top::Registry(RegistryCmd::Login {
            host,
            username,
            insecure,
            ..
        }) => {
            let mut line = String::new();
            let _ = std::io::stdin().read_line(&mut line);
            let password = line.trim_end_matches(['\r', '\n']).to_string();
            if password.is_empty() {
                output::print_error(
                    &ployz_api::ApiError::new(
                        ployz_api::ErrorCode::InvalidArgument,
                        "--password-stdin: stdin had no password",
                    )
                    .with_hint("pipe it in: `ployzctl registry login HOST --username U --password-stdin < FILE`"),
                    json,
                );
                std::process::exit(ployz_api::ErrorCode::InvalidArgument.exit_code());
            }
            Request::RegistrySet {
                host,
                insecure,
                username: Some(username),
                password: Some(ployz_api::Secret(password)),
            }
        }
        other => request_of(other, json),
    };
    let code = match client::call(&socket, &request) {
        Ok(Ok(resp)) => {
            output::print_response(&resp, json);
            if let ployz_api::Response::Operation(op) = &resp {
                // `op wait` exits as the operation did.
                op.exit_code.unwrap_or(exit::OK)
            } else if let ployz_api::Response::Doctor(r) = &resp {
                if r.all_ok() {
                    exit::OK
                } else {
                    exit::NOT_OK
                }
            } else if output::has_failures(&resp) {
                exit::PARTIAL
            } else {
                exit::OK
            }
        }
        Ok(Err(api)) => {
            output::print_error(&api, json);
            api.code.exit_code()
        }
        Err(e) if matches!(request, Request::Doctor) && !json => {
            // The first check: the daemon itself.
            println!("CHECK   STATUS  DETAIL");
            println!(
                "daemon  fail    cannot reach ployzd at {}",
                socket.display()
            );
            output::print_client_error(&e, json);
            e.exit_code()
        }
        Err(e) => {
            output::print_client_error(&e, json);
            e.exit_code()
        }
    };
    std::process::exit(code);
}

/// `release pack`: a local file operation, no daemon involved.
fn release_pack(out: &std::path::Path, version: Option<String>, json: bool) -> i32 {
    let version = version.unwrap_or_else(|| env!("CARGO_PKG_VERSION").to_string());
    let dir = match std::env::current_exe() {
        Ok(p) => p
            .parent()
            .map(std::path::Path::to_path_buf)
            .unwrap_or_default(),
        Err(e) => {
            eprintln!("error: cannot find this executable: {e}");
            return exit::INTERNAL;
        }
    };
    let ployzd = dir.join("ployzd");
    let ployzctl = dir.join("ployzctl");
    if !ployzd.exists() {
        eprintln!(
            "error: no ployzd next to ployzctl (looked for {})",
            ployzd.display()
        );
        eprintln!("hint: run the ployzctl that sits beside the ployzd you want to publish");
        return 6;
    }
    let triple = ployz_provision::release::host_triple();
    match ployz_provision::release::pack_release(
        out,
        &version,
        &triple,
        &[
            ("ployzd", ployzd.as_path()),
            ("ployzctl", ployzctl.as_path()),
        ],
    ) {
        Ok(p) => {
            if json {
                println!(
                    "{}",
                    serde_json::json!({"url": p.url, "version": p.version, "latest": p.latest,
                        "files": p.files.iter().map(|f| f.display().to_string()).collect::<Vec<_>>()})
                );
            } else {
                println!("packed ployzd {} ({triple}) at {}", p.version, p.url);
                println!("use it with: --release-url {}", p.url);
            }
            exit::OK
        }
        Err(e) => {
            let e = pack_error(&e);
            output::print_error(&e, json);
            e.code.exit_code()
        }
    }
}

/// A failed `release pack` as the error to print: what the caller gave
/// (an output directory it cannot write, a bad version, binaries missing
/// beside ployzctl) is an invalid argument; only the rest is internal.
fn pack_error(e: &ployz_provision::release::ReleaseError) -> ployz_api::ApiError {
    use ployz_api::{ApiError, ErrorCode};
    use ployz_provision::release::ReleaseError as R;
    match e {
        R::Write { .. } => ApiError::new(ErrorCode::InvalidArgument, e.to_string())
            .with_hint("give --out a directory you can write to"),
        R::BadVersion(_) | R::ReadBinary { .. } => {
            ApiError::new(ErrorCode::InvalidArgument, e.to_string())
        }
        _ => ApiError::new(ErrorCode::Internal, e.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_unwritable_release_output_is_the_callers_mistake() {
        let bin = std::env::current_exe().unwrap();
        let e = ployz_provision::release::pack_release(
            std::path::Path::new("/proc/ployz-no-such-dir"),
            "0.1.0",
            "x86_64-unknown-linux-musl",
            &[("ployzd", bin.as_path())],
        )
        .unwrap_err();
        let api = pack_error(&e);
        assert_eq!(api.code.exit_code(), 6, "{}", api.message);
        assert!(
            api.message.contains("/proc/ployz-no-such-dir"),
            "{}",
            api.message
        );
        // The OS's reason, not only "cannot write".
        assert!(api.message.contains("(os error"), "{}", api.message);
    }
}
