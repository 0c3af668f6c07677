//! meshnode: one mesh machine for namespace tests and benchmarks.
//!
//! `meshnode run --key <base64> --address 10.234.1.1 --cluster 10.234.0.0/16
//!   [--peer <pubkey>@<ip:port>/<allowed>[,<allowed>]]... [--peers-file F]
//!   [--probe <id>=<ip:port>]... [--status-file F] [--tcp-echo-port P]`
//! prints `public_key=<base64>`, then runs until SIGTERM/SIGINT. With
//! `--peers-file` the peer list is that file (one spec per line), re-read
//! whenever it changes. `--status-file` is rewritten every 250 ms with
//! `peer` and `rtt` lines.
//!
//! `meshnode tcp-check <ip:port> [--bytes N]` connects, sends a line (or N
//! bytes), expects it back.

use std::fmt::Write as _;
use std::net::{SocketAddr, SocketAddrV4};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use anyhow::{anyhow, bail, Context, Result};
use clap::{Parser, Subcommand};
use ployz_mesh::keys::{decode_private, decode_public, encode_public};
use ployz_mesh::overlay::Ipv4Net;
use ployz_mesh::{Mesh, MeshConfig, PeerConfig, Prober};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::signal::unix::{signal, SignalKind};

#[derive(Parser)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    Run(RunArgs),
    TcpCheck {
        addr: SocketAddr,
        /// Bytes to send and expect back (default: one short line).
        #[arg(long, default_value_t = 0)]
        bytes: usize,
    },
}

#[derive(Parser)]
struct RunArgs {
    #[arg(long, default_value = "plz0")]
    ifname: String,
    /// Private key, standard base64 (as `wg genkey` prints).
    #[arg(long)]
    key: String,
    #[arg(long, default_value_t = 51820)]
    port: u16,
    #[arg(long)]
    address: std::net::Ipv4Addr,
    #[arg(long)]
    cluster: Ipv4Net,
    #[arg(long, default_value_t = 1420)]
    mtu: u16,
    /// `<pubkey>@<ip:port>/<allowed>[,<allowed>]`; endpoint may be empty.
    #[arg(long)]
    peer: Vec<String>,
    #[arg(long)]
    peers_file: Option<PathBuf>,
    #[arg(long)]
    keepalive: Option<u16>,
    /// Start the RTT prober on <address>:<probe-port>.
    #[arg(long)]
    probe_port: Option<u16>,
    /// `<id>=<ip:port>` prober targets.
    #[arg(long)]
    probe: Vec<String>,
    #[arg(long)]
    status_file: Option<PathBuf>,
    /// Echo TCP lines on <address>:<port>.
    #[arg(long)]
    tcp_echo_port: Option<u16>,
}

fn parse_peer(spec: &str, keepalive: Option<u16>) -> Result<PeerConfig> {
    let (key, rest) = spec
        .split_once('@')
        .ok_or_else(|| anyhow!("peer `{spec}`: expected <pubkey>@<endpoint>/<allowed>"))?;
    let public_key = decode_public(key).ok_or_else(|| anyhow!("peer `{spec}`: bad key"))?;
    let (endpoint, allowed) = rest
        .split_once('/')
        .ok_or_else(|| anyhow!("peer `{spec}`: missing /<allowed>"))?;
    let endpoint = if endpoint.is_empty() {
        None
    } else {
        Some(
            endpoint
                .parse()
                .with_context(|| format!("peer `{spec}`: endpoint"))?,
        )
    };
    let allowed_ips = allowed
        .split(',')
        .filter(|s| !s.is_empty())
        .map(|s| {
            s.parse::<Ipv4Net>()
                .map_err(|e| anyhow!("peer `{spec}`: {e}"))
        })
        .collect::<Result<_>>()?;
    Ok(PeerConfig {
        public_key,
        endpoint,
        allowed_ips,
        persistent_keepalive: keepalive,
    })
}

fn read_peers(path: &Path, keepalive: Option<u16>) -> Result<(String, Vec<PeerConfig>)> {
    let text = std::fs::read_to_string(path).with_context(|| format!("{}", path.display()))?;
    let peers = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(|l| parse_peer(l, keepalive))
        .collect::<Result<_>>()?;
    Ok((text, peers))
}

fn status(mesh: &Mesh, prober: Option<&Prober>) -> String {
    let mut s = format!(
        "public_key={}\nlisten_port={}\n",
        encode_public(&mesh.public_key()),
        mesh.listen_port()
    );
    let now = SystemTime::now();
    for p in mesh.peers() {
        let age = p
            .last_handshake
            .and_then(|t| now.duration_since(t).ok())
            .map_or("-".to_owned(), |d| d.as_secs().to_string());
        let ep = p.endpoint.map_or("-".to_owned(), |e| e.to_string());
        let _ = writeln!(
            s,
            "peer {} endpoint={ep} handshake_age_s={age} rx={} tx={}",
            encode_public(&p.public_key),
            p.rx_bytes,
            p.tx_bytes
        );
    }
    for r in prober.map(Prober::snapshot).unwrap_or_default() {
        let f = |x: Option<f64>| x.map_or("-".to_owned(), |v| format!("{v:.3}"));
        let err = r.last_error.as_deref().unwrap_or("-").replace(' ', "_");
        let _ = writeln!(
            s,
            "rtt {} median_ms={} stddev_ms={} samples={} error={err}",
            r.peer,
            f(r.median_ms),
            f(r.stddev_ms),
            r.samples
        );
    }
    s
}

fn write_atomic(path: &Path, text: &str) -> Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text)?;
    std::fs::rename(&tmp, path)?;
    Ok(())
}

async fn tcp_echo(addr: SocketAddr) -> Result<()> {
    let l = tokio::net::TcpListener::bind(addr).await?;
    loop {
        let (mut s, _) = l.accept().await?;
        tokio::spawn(async move {
            let mut buf = [0u8; 4096];
            while let Ok(n) = s.read(&mut buf).await {
                if n == 0 || s.write_all(&buf[..n]).await.is_err() {
                    break;
                }
            }
        });
    }
}

/// Send `bytes` (or one line when 0) and expect them echoed back intact:
/// a bulk check exercises segmentation and coalescing on both ends.
async fn tcp_check(addr: SocketAddr, bytes: usize) -> Result<()> {
    let msg: Vec<u8> = if bytes == 0 {
        b"ployz mesh tcp check\n".to_vec()
    } else {
        (0..bytes).map(|i| (i % 251) as u8).collect()
    };
    let s = tokio::time::timeout(Duration::from_secs(5), tokio::net::TcpStream::connect(addr))
        .await
        .context("connect timed out")??;
    let (mut rd, mut wr) = s.into_split();
    let out = msg.clone();
    let writer = tokio::spawn(async move { wr.write_all(&out).await });
    let mut got = vec![0u8; msg.len()];
    tokio::time::timeout(Duration::from_secs(30), rd.read_exact(&mut got))
        .await
        .context("echo timed out")??;
    writer.await??;
    if got != msg {
        bail!("echo mismatch");
    }
    println!("ok");
    Ok(())
}

async fn run(a: RunArgs) -> Result<()> {
    let private_key = decode_private(&a.key).ok_or_else(|| anyhow!("--key is not a base64 key"))?;
    let mesh = Mesh::start(MeshConfig {
        ifname: a.ifname.clone(),
        private_key,
        listen_port: a.port,
        address: a.address,
        cluster: a.cluster,
        mtu: a.mtu,
    })?;
    println!("public_key={}", encode_public(&mesh.public_key()));

    let mut peers_text = String::new();
    match &a.peers_file {
        Some(f) => {
            let (text, peers) = read_peers(f, a.keepalive)?;
            mesh.set_peers(peers)?;
            peers_text = text;
        }
        None => mesh.set_peers(
            a.peer
                .iter()
                .map(|p| parse_peer(p, a.keepalive))
                .collect::<Result<_>>()?,
        )?,
    }

    let prober = match a.probe_port {
        Some(port) => {
            let p = Prober::start(SocketAddr::V4(SocketAddrV4::new(a.address, port)))?;
            let targets = a
                .probe
                .iter()
                .map(|t| {
                    let (id, addr) = t
                        .split_once('=')
                        .ok_or_else(|| anyhow!("--probe `{t}`: expected <id>=<ip:port>"))?;
                    Ok((id.to_owned(), addr.parse()?))
                })
                .collect::<Result<_>>()?;
            p.set_targets(targets);
            Some(p)
        }
        None => None,
    };
    if let Some(port) = a.tcp_echo_port {
        let addr = SocketAddr::V4(SocketAddrV4::new(a.address, port));
        tokio::spawn(async move {
            if let Err(e) = tcp_echo(addr).await {
                eprintln!("tcp echo on {addr}: {e:#}");
            }
        });
    }

    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let mut tick = tokio::time::interval(Duration::from_millis(250));
    loop {
        tokio::select! {
            _ = term.recv() => break,
            _ = int.recv() => break,
            _ = tick.tick() => {}
        }
        if let Some(f) = &a.peers_file {
            match read_peers(f, a.keepalive) {
                Ok((text, peers)) if text != peers_text => {
                    match mesh.set_peers(peers) {
                        Ok(()) => eprintln!("peers updated from {}", f.display()),
                        Err(e) => eprintln!("peers from {}: {e}", f.display()),
                    }
                    peers_text = text;
                }
                Ok(_) => {}
                Err(e) => eprintln!("{e:#}"),
            }
        }
        if let Some(f) = &a.status_file {
            write_atomic(f, &status(&mesh, prober.as_ref()))?;
        }
    }
    drop(prober);
    mesh.stop();
    Ok(())
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<()> {
    match Cli::parse().cmd {
        Cmd::Run(a) => run(a).await,
        Cmd::TcpCheck { addr, bytes } => tcp_check(addr, bytes).await,
    }
}
