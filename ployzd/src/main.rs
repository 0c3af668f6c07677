//! `ployzd`: parse flags, start the daemon, serve until SIGTERM/SIGINT.

// As in lib.rs: the server's futures nest the store's deeper than the default limit.
#![recursion_limit = "256"]

use anyhow::{bail, Context as _};
use clap::{Parser, Subcommand};
use ployz_provision::{Env, Layout, ServiceMode};
use ployz_runtime::RuntimeKind;
use ployzd::daemon::{Daemon, DaemonConfig};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

#[derive(Parser)]
#[command(
    name = "ployzd",
    version,
    about = "The Ployz machine daemon",
    args_override_self = true
)]
struct Cli {
    /// State directory (identity, store). Default depends on --service-mode.
    #[arg(long, global = true, env = "PLOYZ_DATA_DIR")]
    data_dir: Option<PathBuf>,
    /// Local API socket. Default depends on --service-mode.
    #[arg(long, global = true, env = "PLOYZ_SOCKET")]
    socket: Option<PathBuf>,
    /// Log lines as text, or as one JSON object per line (for log shippers).
    #[arg(long, global = true, env = "PLOYZ_LOG_FORMAT", default_value = "text")]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| "info,openraft=warn,sled=warn,libcontainer=error".into());
    let fmt = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => fmt.init(),
        LogFormat::Json => fmt
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .init(),
    }
}

#[derive(Subcommand)]
enum Command {
    /// Run the daemon in the foreground.
    Run {
        /// Workload runtime of this machine.
        #[arg(long, default_value = "host")]
        runtime: RuntimeKind,
        /// system (root; /var/lib/ployz, /run/ployz) or user (~/.local/share/ployz, $XDG_RUNTIME_DIR/ployz).
        #[arg(long)]
        service_mode: Option<ServiceMode>,
        /// Region this machine is in (shown in `machine ls`).
        #[arg(long, default_value = "default")]
        region: String,
        /// WireGuard UDP listen port (advertised in endpoints).
        #[arg(long, default_value_t = ployz_api::DEFAULT_WG_PORT)]
        wg_port: u16,
        /// TCP port peers reach this ployzd on (Raft, forwarded requests, joins); 0 picks a free one.
        #[arg(long, default_value_t = ployzd::peer::DEFAULT_PEER_PORT)]
        peer_port: u16,
        /// Address peers should use for this machine [default: its best endpoint candidate].
        #[arg(long)]
        advertise_ip: Option<std::net::IpAddr>,
        /// NATS client port, served on loopback and the advertised address; 0 picks a free one.
        #[arg(long, default_value_t = ployzd::control::nats::DEFAULT_NATS_PORT)]
        nats_port: u16,
        /// Also serve NATS clients on this address (repeatable); by default only
        /// loopback and the overlay address.
        #[arg(long)]
        nats_listen: Vec<std::net::IpAddr>,
        /// Found networks without the WireGuard mesh: peers talk over the advertised
        /// address (only where machines already share a private network, e.g. tests
        /// on one host). Joining machines follow the network's choice.
        #[arg(long)]
        no_mesh: bool,
        /// Name of the WireGuard interface.
        #[arg(long, default_value = "plz0")]
        wg_interface: String,
        /// Serve Prometheus metrics at http://ADDR/metrics (`off`: not at all).
        #[arg(long, default_value = "127.0.0.1:9101", value_parser = parse_listen)]
        metrics_listen: Listen,
        /// Serve the web dashboard on ADDR (`off`: not at all); `ployzctl
        /// dashboard` prints a login link.
        #[arg(long, default_value = "127.0.0.1:7180", value_parser = parse_listen)]
        ui_listen: Listen,
        /// The HTTP gateway's port on every address (0: off).
        #[arg(long, default_value_t = 80)]
        http_port: u16,
        /// The HTTPS gateway's port on every address (0: off).
        #[arg(long, default_value_t = 443)]
        https_port: u16,
        /// Raft log entries between snapshots (log compaction).
        #[arg(long, default_value_t = 5000, hide = true)]
        snapshot_every: u64,
    },
    /// Diagnostic: open a `raft` or `rpc` session to a peer port with the
    /// network secret in this data directory's cluster.json, as machine
    /// `--as`, and say whether it was admitted (an `rpc` session lists the
    /// machine records). Used by the tests of peer-port admission.
    #[command(hide = true)]
    PeerProbe {
        /// The peer port, IP:PORT.
        #[arg(long)]
        addr: String,
        /// `raft` or `rpc`.
        #[arg(long, default_value = "rpc")]
        service: String,
        /// The machine id the hello names.
        #[arg(long = "as")]
        as_id: String,
    },
}

/// A listen address flag that can be turned off.
#[derive(Clone, Copy)]
enum Listen {
    On(std::net::SocketAddr),
    Off,
}

fn parse_listen(s: &str) -> Result<Listen, String> {
    if s == "off" {
        return Ok(Listen::Off);
    }
    s.parse()
        .map(Listen::On)
        .map_err(|_| format!("`{s}` is not IP:PORT (or `off`)"))
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    init_logging(cli.log_format);
    let mut rt = tokio::runtime::Builder::new_multi_thread();
    rt.enable_all();
    // TOKIO_WORKER_THREADS, when set, is tokio's to read; else see `default_workers`.
    if std::env::var_os("TOKIO_WORKER_THREADS").is_none() {
        rt.worker_threads(default_workers());
    }
    let rt = match rt.build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("ployzd: cannot start the async runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let main = async {
        match cli.command {
            Command::PeerProbe { .. } => peer_probe(cli).await,
            Command::Run { .. } => run(cli).await,
        }
    };
    match rt.block_on(main) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("ployzd: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// The async runtime's worker threads: half the CPUs, at least one.
///
/// The daemon's busiest work already has threads of its own (the WireGuard data thread, the
/// Raft log's sync thread, the blocking pool), and a write crosses several tasks. With a worker
/// per CPU, each task woken while another runs wakes an idle worker to steal it: on a 2-CPU
/// machine, one worker instead of two took a put from 36 to 23 context switches and from 780 to
/// 650 µs of CPU across the three storage machines (BENCHMARKS.md, issue 15). Set
/// `TOKIO_WORKER_THREADS` to choose otherwise.
fn default_workers() -> usize {
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    (cpus / 2).max(1)
}

/// Hold an exclusive lock on the data directory for the daemon's lifetime.
fn lock_data_dir(dir: &Path) -> anyhow::Result<std::fs::File> {
    let path = dir.join("ployzd.lock");
    let f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .with_context(|| format!("cannot open {}", path.display()))?;
    // SAFETY: flock on a file descriptor we own.
    if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        bail!(
            "another ployzd is already using the data directory {}; stop it first or pass a different --data-dir",
            dir.display()
        );
    }
    Ok(f)
}

fn prepare_data_dir(dir: &Path) -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::create_dir_all(dir)
        .with_context(|| format!("cannot create the data directory {}", dir.display()))?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
        .with_context(|| format!("cannot restrict the data directory {}", dir.display()))?;
    Ok(())
}

/// `ployzd peer-probe`: exit 0 when admitted, 3 when refused.
async fn peer_probe(cli: Cli) -> anyhow::Result<()> {
    use ployzd::peer::{self, KvRead, PeerRequest, PeerResponse, Service};
    let Command::PeerProbe {
        addr,
        service,
        as_id,
    } = cli.command
    else {
        bail!("not a peer-probe command");
    };
    let data_dir = cli
        .data_dir
        .context("peer-probe needs --data-dir (the directory with cluster.json)")?;
    let path = data_dir.join(ployzd::store::local::CLUSTER_FILE);
    let file: ployzd::store::local::ClusterFile = serde_json::from_slice(
        &std::fs::read(&path).with_context(|| format!("cannot read {}", path.display()))?,
    )
    .with_context(|| format!("{} is not a cluster file", path.display()))?;
    let refused = |e: std::io::Error| -> anyhow::Result<()> {
        if e.kind() == std::io::ErrorKind::PermissionDenied {
            println!("refused: {e}");
            std::process::exit(3);
        }
        bail!("peer-probe to {addr}: {e}")
    };
    match service.as_str() {
        "raft" => match peer::dial(&addr, Service::Raft, &file.secret, &as_id).await {
            Ok(_) => println!("admitted: raft session open"),
            Err(e) => return refused(e),
        },
        "rpc" => {
            let req = PeerRequest::Read {
                read: KvRead::List {
                    bucket: ployz_api::BUCKET_MACHINES.into(),
                },
                hops: 0,
            };
            match peer::call(&addr, &file.secret, &as_id, &req, Duration::from_secs(5)).await {
                Ok(PeerResponse::Read(peer::KvReadResult::Entries(es))) => {
                    println!("admitted: read {} machine records", es.len())
                }
                Ok(other) => println!("admitted: answered {other:?}"),
                Err(e) => return refused(e),
            }
        }
        other => bail!("unknown service `{other}`: use raft or rpc"),
    }
    Ok(())
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let Command::Run {
        runtime,
        service_mode,
        region,
        wg_port,
        peer_port,
        advertise_ip,
        nats_port,
        nats_listen,
        no_mesh,
        wg_interface,
        snapshot_every,
        metrics_listen,
        ui_listen,
        http_port,
        https_port,
    } = cli.command
    else {
        bail!("not a run command");
    };
    let env = Env::current();
    let layout = match service_mode {
        Some(m) => Layout::for_mode(m, &env),
        None => Layout::default_for(&env),
    };
    let data_dir = cli.data_dir.unwrap_or(layout.data_dir);
    let socket = cli.socket.unwrap_or(layout.socket);
    ployzd::errors::validate_region(&region).map_err(|e| anyhow::anyhow!("{e}"))?;

    prepare_data_dir(&data_dir)?;
    let _lock = lock_data_dir(&data_dir)?;
    let listener = ployzd::server::bind(&socket).await?;
    let peer_listener = tokio::net::TcpListener::bind(("0.0.0.0", peer_port))
        .await
        .with_context(|| format!("cannot listen for peers on TCP port {peer_port} (is another ployzd running? pick another with --peer-port)"))?;
    let advertise_ip = advertise_ip.unwrap_or_else(default_advertise_ip);
    let peer_addr =
        std::net::SocketAddr::new(advertise_ip, peer_listener.local_addr()?.port()).to_string();
    let daemon = Arc::new(
        Daemon::open(DaemonConfig {
            data_dir: data_dir.clone(),
            runtime,
            region,
            wg_port,
            peer_addr: peer_addr.clone(),
            snapshot_every,
            nats_port,
            mesh: !no_mesh,
            wg_interface,
            nats_listen,
            gateway: ployzd::gateway::GatewayConfig {
                http_port,
                https_port,
            },
        })
        .await?,
    );
    tracing::info!(
        machine = daemon.machine_id(),
        data_dir = %data_dir.display(),
        socket = %socket.display(),
        version = ployzd::VERSION,
        peer = %peer_addr,
        "ployzd ready"
    );

    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let server = tokio::spawn(ployzd::server::serve(
        listener,
        daemon.clone(),
        stop_rx.clone(),
    ));
    let peers = tokio::spawn(ployzd::peer::serve(
        peer_listener,
        daemon.clone(),
        stop_rx.clone(),
    ));
    let background = tokio::spawn(daemon.clone().run(stop_rx));
    let metrics = match metrics_listen {
        Listen::On(addr) => Some(tokio::spawn(ployzd::metrics::serve(daemon.clone(), addr))),
        Listen::Off => None,
    };
    let ui = match ui_listen {
        Listen::On(addr) => Some(tokio::spawn(ployzd::dashboard::serve(daemon.clone(), addr))),
        Listen::Off => None,
    };

    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let mut leave = daemon.exit_requested();
    let leaving = tokio::select! {
        _ = term.recv() => { tracing::info!("SIGTERM: shutting down"); false }
        _ = tokio::signal::ctrl_c() => { tracing::info!("SIGINT: shutting down"); false }
        _ = leave.changed() => { tracing::warn!("removed from the network: stopping and deleting this machine's state"); true }
    };
    let _ = stop_tx.send(true);
    let stopping = std::time::Instant::now();
    let _ = server.await;
    let _ = peers.await;
    let _ = background.await;
    tracing::info!(elapsed = ?stopping.elapsed(), "servers and background tasks stopped");
    for task in [metrics, ui].into_iter().flatten() {
        task.abort();
    }
    daemon.shutdown().await;
    let _ = std::fs::remove_file(&socket);
    if leaving {
        if let Err(e) = ployz_runtime::firewall::remove_all() {
            tracing::warn!("cannot remove ployzd's firewall rules: {e}");
        }
        wipe_data_dir(&data_dir);
        if let Some(mode) = service_mode {
            uninstall_service(mode, &env);
        }
    }
    Ok(())
}

/// After `machine rm` of a provisioned machine: take out the systemd unit
/// and the binaries `machine init` installed. Only when this process is the
/// installed binary, so a hand-started ployzd never deletes anything else.
/// Exiting 0 afterwards leaves the unit stopped (Restart=on-failure).
fn uninstall_service(mode: ServiceMode, env: &Env) {
    let layout = Layout::for_mode(mode, env);
    let me = std::env::current_exe().ok();
    if me.as_deref() != Some(layout.binary.as_path()) {
        return;
    }
    let user = mode == ServiceMode::User;
    let systemctl = |args: &[&str]| {
        let mut c = std::process::Command::new("systemctl");
        if user {
            c.arg("--user");
        }
        match c.args(args).status() {
            Ok(st) if st.success() => {}
            Ok(st) => tracing::warn!("systemctl {args:?}: {st}"),
            Err(e) => tracing::warn!("systemctl {args:?}: {e}"),
        }
    };
    systemctl(&["disable", "ployzd.service"]);
    for path in [&layout.unit, &layout.binary, &layout.ctl_binary()] {
        match std::fs::remove_file(path) {
            Ok(()) => tracing::info!(path = %path.display(), "removed"),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => tracing::warn!("cannot remove {}: {e}", path.display()),
        }
    }
    systemctl(&["daemon-reload"]);
}

/// After `machine rm`: delete everything this machine held of the network
/// (identity, store, cluster secret). The lock file goes last.
fn wipe_data_dir(dir: &Path) {
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            let p = e.path();
            if p.file_name().is_some_and(|n| n == "ployzd.lock") {
                continue;
            }
            let r = if p.is_dir() {
                std::fs::remove_dir_all(&p)
            } else {
                std::fs::remove_file(&p)
            };
            if let Err(err) = r {
                tracing::warn!("cannot delete {}: {err}", p.display());
            }
        }
    }
    let _ = std::fs::remove_file(dir.join("ployzd.lock"));
    let _ = std::fs::remove_dir(dir);
}

/// The best underlay address of this host, or loopback on a host without one.
fn default_advertise_ip() -> std::net::IpAddr {
    ployz_mesh::endpoints::local_addrs()
        .ok()
        .and_then(|addrs| {
            ployz_mesh::endpoints::candidates(&addrs, 0, |_| false)
                .first()
                .and_then(|s| s.parse::<std::net::SocketAddr>().ok())
                .map(|a| a.ip())
        })
        .unwrap_or(std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST))
}
