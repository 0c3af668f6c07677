//! `ployzctl`: parse arguments, send one request to the local ployzd, print
//! the answer (a table, or JSON with `--json`), exit with a documented code.

mod client;
mod output;

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
}

#[derive(Parser)]
#[command(
    name = "ployzctl",
    version,
    about = "Drive a Ployz cluster",
    propagate_version = true
)]
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
}

#[derive(Subcommand)]
enum NatsCmd {
    /// Print a URL (credentials included) a standard NATS client can connect with.
    Url,
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
    Import {
        #[arg(long)]
        token: String,
    },
}

fn request_of(cmd: Top) -> Request {
    match cmd {
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
        Top::Nats(NatsCmd::Url) => Request::NatsUrl,
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
        Top::Machine(MachineCmd::Invite(InviteCmd::Import { token })) => {
            Request::InviteImport { token }
        }
        Top::Machine(MachineCmd::Storage(StorageCmd::Promote { replicas, machines })) => {
            Request::StoragePromote { replicas, machines }
        }
        Top::Machine(MachineCmd::Rm { force, machine }) => Request::MachineRm { machine, force },
        Top::Machine(MachineCmd::Rtt) => Request::MachineRtt,
    }
}

fn main() {
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
    let request = request_of(cli.command);
    let code = match client::call(&socket, &request) {
        Ok(Ok(resp)) => {
            output::print_response(&resp, json);
            if output::has_failures(&resp) {
                exit::PARTIAL
            } else {
                exit::OK
            }
        }
        Ok(Err(api)) => {
            output::print_error(&api, json);
            api.code.exit_code()
        }
        Err(e) => {
            output::print_client_error(&e, json);
            e.exit_code()
        }
    };
    std::process::exit(code);
}
