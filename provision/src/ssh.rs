//! The network seam of provisioning: run a command on a target, optionally
//! feeding it bytes on stdin. [`SshSession`] does it over SSH (russh, public
//! key auth, host keys trusted on first use); [`fake::FakeTransport`] records
//! commands and answers from a script, for unit tests of the logic above.

use crate::known_hosts::{self, KnownHosts, KnownHostsError, Verdict};
use russh::keys::{PrivateKeyWithHashAlg, PublicKey};
use russh::{client, ChannelMsg, Disconnect};
use std::fmt;
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// `user@host[:port]` (IPv6 as `user@[::1]:22`). The user defaults to `root`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct SshTarget {
    pub user: String,
    pub host: String,
    pub port: u16,
}

impl fmt::Display for SshTarget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let host = if self.host.contains(':') {
            format!("[{}]", self.host)
        } else {
            self.host.clone()
        };
        if self.port == 22 {
            write!(f, "{}@{host}", self.user)
        } else {
            write!(f, "{}@{host}:{}", self.user, self.port)
        }
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("invalid SSH target `{input}`: {reason}; write it as user@host or user@host:port")]
pub struct BadTarget {
    pub input: String,
    pub reason: &'static str,
}

impl FromStr for SshTarget {
    type Err = BadTarget;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = |reason| BadTarget {
            input: s.to_string(),
            reason,
        };
        let (user, rest) = match s.rsplit_once('@') {
            Some((u, r)) if !u.is_empty() => (u.to_string(), r),
            Some(_) => return Err(bad("the user before `@` is empty")),
            None => ("root".to_string(), s),
        };
        let (host, port) = if let Some(r) = rest.strip_prefix('[') {
            let (h, after) = r.split_once(']').ok_or_else(|| bad("missing `]`"))?;
            match after.strip_prefix(':') {
                Some(p) => (h, Some(p)),
                None if after.is_empty() => (h, None),
                None => return Err(bad("unexpected text after `]`")),
            }
        } else if rest.matches(':').count() > 1 {
            // A bare IPv6 address.
            (rest, None)
        } else {
            match rest.split_once(':') {
                Some((h, p)) => (h, Some(p)),
                None => (rest, None),
            }
        };
        if host.is_empty() {
            return Err(bad("the host is empty"));
        }
        if host.chars().any(|c| c.is_whitespace() || c == '/') {
            return Err(bad("the host contains spaces or `/`"));
        }
        let port = match port {
            Some(p) => p
                .parse::<u16>()
                .ok()
                .filter(|p| *p != 0)
                .ok_or_else(|| bad("the port is not a number from 1 to 65535"))?,
            None => 22,
        };
        Ok(SshTarget {
            user,
            host: host.to_string(),
            port,
        })
    }
}

/// What a remote command did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ExecOutput {
    /// Exit status; 255 when the command died of a signal or the server
    /// sent none.
    pub status: u32,
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
}

impl ExecOutput {
    pub fn ok(stdout: &str) -> ExecOutput {
        ExecOutput {
            status: 0,
            stdout: stdout.as_bytes().to_vec(),
            stderr: Vec::new(),
        }
    }

    pub fn failed(status: u32, stderr: &str) -> ExecOutput {
        ExecOutput {
            status,
            stdout: Vec::new(),
            stderr: stderr.as_bytes().to_vec(),
        }
    }

    pub fn success(&self) -> bool {
        self.status == 0
    }

    pub fn stdout_str(&self) -> String {
        String::from_utf8_lossy(&self.stdout).into_owned()
    }

    pub fn stderr_str(&self) -> String {
        String::from_utf8_lossy(&self.stderr).into_owned()
    }
}

/// Runs commands on one target. Implementations: [`SshSession`],
/// [`fake::FakeTransport`].
pub trait Transport: Send + Sync {
    /// Run `cmd` through the target user's shell, feeding `stdin` (then EOF).
    fn exec_with_input(
        &self,
        cmd: &str,
        stdin: &[u8],
    ) -> impl Future<Output = Result<ExecOutput, SshError>> + Send;

    /// [`Transport::exec_with_input`], calling `sent` with the bytes of
    /// `stdin` sent so far as it goes out (for progress of an upload).
    fn exec_sending(
        &self,
        cmd: &str,
        stdin: &[u8],
        sent: &(dyn Fn(u64) + Send + Sync),
    ) -> impl Future<Output = Result<ExecOutput, SshError>> + Send {
        async move {
            let out = self.exec_with_input(cmd, stdin).await?;
            sent(stdin.len() as u64);
            Ok(out)
        }
    }

    /// Run `cmd` with an empty stdin.
    fn exec(&self, cmd: &str) -> impl Future<Output = Result<ExecOutput, SshError>> + Send {
        self.exec_with_input(cmd, &[])
    }

    /// The address the connection reached (the target's address as the
    /// initiating machine sees it).
    fn remote_ip(&self) -> Option<IpAddr>;
}

/// How to connect.
#[derive(Debug, Clone)]
pub struct SshOptions {
    /// Private key; `None` tries `~/.ssh/id_ed25519` then `~/.ssh/id_rsa`.
    pub identity: Option<PathBuf>,
    /// Our known-hosts file (trust on first use; changed keys refused).
    pub known_hosts: PathBuf,
    /// TCP connect plus SSH handshake and authentication.
    pub connect_timeout: Duration,
}

impl SshOptions {
    pub fn new(known_hosts: impl Into<PathBuf>) -> SshOptions {
        SshOptions {
            identity: None,
            known_hosts: known_hosts.into(),
            connect_timeout: Duration::from_secs(15),
        }
    }
}

/// The identities tried when none is given: `~/.ssh/id_ed25519`, `~/.ssh/id_rsa`.
pub fn default_identities(home: Option<&Path>) -> Vec<PathBuf> {
    match home {
        Some(h) => vec![h.join(".ssh/id_ed25519"), h.join(".ssh/id_rsa")],
        None => Vec::new(),
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SshError {
    #[error("cannot reach {target}: {source}; check the address and port, that sshd runs there and that no firewall drops the connection")]
    Connect {
        target: String,
        source: std::io::Error,
    },
    #[error("{target} did not answer within {} (TCP connect, SSH handshake and login); check the address and that sshd runs there", ployz_api::time::human(*timeout))]
    Timeout { target: String, timeout: Duration },
    #[error(transparent)]
    HostKeyChanged(Box<HostKeyChanged>),
    #[error(transparent)]
    KnownHosts(#[from] KnownHostsError),
    #[error("no SSH identity: none of {tried} exists; pass --identity FILE with a private key authorised on the target")]
    NoIdentity { tried: String },
    #[error("cannot load the SSH private key {path}: {reason}; pass an unencrypted OpenSSH/PEM key with --identity (passphrase-protected keys are not supported)")]
    Identity { path: PathBuf, reason: String },
    #[error("{target} refused the SSH key(s) {keys} for user `{user}`; add the matching public key to ~{user}/.ssh/authorized_keys on the target, or pass --identity FILE")]
    AuthRejected {
        target: String,
        user: String,
        keys: String,
    },
    #[error("SSH session with {target} failed: {reason}; retry, and check the target's sshd logs if it persists")]
    Session { target: String, reason: String },
}

/// A host offered a key other than the one remembered for it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("the host key of {host} has CHANGED: we remembered {remembered}, it now offers {offered}. If the machine was reinstalled, delete line {line} for {host} in {} (or run `ssh-keygen -R '{host}' -f {}`) and retry; otherwise someone may be intercepting the connection", file.display(), file.display())]
pub struct HostKeyChanged {
    /// As written in the known-hosts file (`host` or `[host]:port`).
    pub host: String,
    /// Fingerprint (`SHA256:...`) of the remembered key.
    pub remembered: String,
    /// Fingerprint of the key offered now.
    pub offered: String,
    /// The known-hosts file to edit.
    pub file: PathBuf,
    /// The remembered key's line in it.
    pub line: usize,
}

/// Accepts the server's key per the known-hosts verdict; remembers what it saw.
struct HostKeyGate {
    pattern: String,
    known: KnownHosts,
    seen: Arc<Mutex<Option<(PublicKey, Verdict)>>>,
}

impl client::Handler for HostKeyGate {
    type Error = russh::Error;

    async fn check_server_key(
        &mut self,
        offered: &russh::keys::PublicKeyOrCertificate,
    ) -> Result<bool, Self::Error> {
        let key = offered.public_key();
        let verdict = self.known.check(&self.pattern, &key);
        let accept = !matches!(verdict, Verdict::Changed { .. });
        if let Ok(mut seen) = self.seen.lock() {
            *seen = Some((key, verdict));
        }
        Ok(accept)
    }
}

/// An authenticated SSH connection to one target.
pub struct SshSession {
    handle: client::Handle<HostKeyGate>,
    target: SshTarget,
    peer: SocketAddr,
}

impl SshSession {
    /// Connect, check the host key against `opts.known_hosts` (recording it
    /// on first use, refusing a changed one) and log in with the identity.
    pub async fn connect(target: &SshTarget, opts: &SshOptions) -> Result<SshSession, SshError> {
        let what = target.to_string();
        match tokio::time::timeout(opts.connect_timeout, Self::connect_inner(target, opts)).await {
            Ok(r) => r,
            Err(_) => Err(SshError::Timeout {
                target: what,
                timeout: opts.connect_timeout,
            }),
        }
    }

    async fn connect_inner(target: &SshTarget, opts: &SshOptions) -> Result<SshSession, SshError> {
        let what = target.to_string();
        let identities = match &opts.identity {
            Some(p) => vec![p.clone()],
            None => {
                let home = std::env::var_os("HOME").map(PathBuf::from);
                let candidates = default_identities(home.as_deref());
                let found: Vec<PathBuf> =
                    candidates.iter().filter(|p| p.exists()).cloned().collect();
                if found.is_empty() {
                    return Err(SshError::NoIdentity {
                        tried: join_paths(&candidates),
                    });
                }
                found
            }
        };
        let mut keys = Vec::new();
        for path in &identities {
            let key = russh::keys::load_secret_key(path, None).map_err(|e| SshError::Identity {
                path: path.clone(),
                reason: e.to_string(),
            })?;
            keys.push(Arc::new(key));
        }

        let stream = tokio::net::TcpStream::connect((target.host.as_str(), target.port))
            .await
            .map_err(|source| SshError::Connect {
                target: what.clone(),
                source,
            })?;
        let _ = stream.set_nodelay(true);
        let peer = stream.peer_addr().map_err(|source| SshError::Connect {
            target: what.clone(),
            source,
        })?;

        let pattern = known_hosts::host_pattern(&target.host, target.port);
        let seen = Arc::new(Mutex::new(None));
        let gate = HostKeyGate {
            pattern: pattern.clone(),
            known: KnownHosts::load(&opts.known_hosts)?,
            seen: seen.clone(),
        };
        let config = Arc::new(client::Config {
            inactivity_timeout: None,
            keepalive_interval: Some(Duration::from_secs(15)),
            keepalive_max: 4,
            ..Default::default()
        });
        let session_err = |e: russh::Error| SshError::Session {
            target: what.clone(),
            reason: e.to_string(),
        };
        let mut handle = match client::connect_stream(config, stream, gate).await {
            Ok(h) => h,
            Err(e) => {
                let seen = seen.lock().ok().and_then(|s| s.clone());
                if let Some((key, Verdict::Changed { remembered, line })) = seen {
                    return Err(SshError::HostKeyChanged(Box::new(HostKeyChanged {
                        host: pattern,
                        remembered,
                        offered: known_hosts::fingerprint(&key),
                        file: opts.known_hosts.clone(),
                        line,
                    })));
                }
                return Err(session_err(e));
            }
        };

        let rsa_hash = handle
            .best_supported_rsa_hash()
            .await
            .map_err(session_err)?
            .flatten();
        let mut authenticated = false;
        for key in keys {
            let res = handle
                .authenticate_publickey(
                    target.user.clone(),
                    PrivateKeyWithHashAlg::new(key, rsa_hash),
                )
                .await
                .map_err(session_err)?;
            if res.success() {
                authenticated = true;
                break;
            }
        }
        if !authenticated {
            let _ = handle.disconnect(Disconnect::ByApplication, "", "en").await;
            return Err(SshError::AuthRejected {
                target: what,
                user: target.user.clone(),
                keys: join_paths(&identities),
            });
        }

        // Trust on first use: remember the key once we are in.
        let seen = seen.lock().ok().and_then(|s| s.clone());
        if let Some((key, Verdict::New)) = seen {
            KnownHosts::remember(&opts.known_hosts, &pattern, &key)?;
        }
        Ok(SshSession {
            handle,
            target: target.clone(),
            peer,
        })
    }

    pub fn target(&self) -> &SshTarget {
        &self.target
    }

    /// Say goodbye to the server.
    pub async fn close(self) {
        let _ = self
            .handle
            .disconnect(Disconnect::ByApplication, "", "en")
            .await;
    }
}

fn join_paths(p: &[PathBuf]) -> String {
    p.iter()
        .map(|p| p.display().to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

/// How much of an upload goes out between two progress reports.
const SEND_CHUNK: usize = 256 * 1024;

impl Transport for SshSession {
    async fn exec_with_input(&self, cmd: &str, stdin: &[u8]) -> Result<ExecOutput, SshError> {
        self.exec_sending(cmd, stdin, &|_| {}).await
    }

    async fn exec_sending(
        &self,
        cmd: &str,
        stdin: &[u8],
        sent: &(dyn Fn(u64) + Send + Sync),
    ) -> Result<ExecOutput, SshError> {
        let err = |e: russh::Error| SshError::Session {
            target: self.target.to_string(),
            reason: e.to_string(),
        };
        let mut channel = self.handle.channel_open_session().await.map_err(err)?;
        channel.exec(true, cmd).await.map_err(err)?;
        let mut done = 0;
        for chunk in stdin.chunks(SEND_CHUNK) {
            channel.data(chunk).await.map_err(err)?;
            done += chunk.len() as u64;
            sent(done);
        }
        channel.eof().await.map_err(err)?;
        let mut out = ExecOutput {
            status: 255,
            ..Default::default()
        };
        let mut got_status = false;
        while let Some(msg) = channel.wait().await {
            match msg {
                ChannelMsg::Data { data } => out.stdout.extend_from_slice(&data),
                ChannelMsg::ExtendedData { data, ext: 1 } => out.stderr.extend_from_slice(&data),
                ChannelMsg::ExitStatus { exit_status } => {
                    out.status = exit_status;
                    got_status = true;
                }
                ChannelMsg::ExitSignal {
                    signal_name,
                    error_message,
                    ..
                } => {
                    out.stderr.extend_from_slice(
                        format!("\nkilled by signal {signal_name:?} {error_message}").as_bytes(),
                    );
                }
                ChannelMsg::Failure => {
                    return Err(SshError::Session {
                        target: self.target.to_string(),
                        reason: "the server refused to run the command".into(),
                    })
                }
                _ => {}
            }
        }
        if !got_status && out.stderr.is_empty() {
            out.stderr = b"the server sent no exit status".to_vec();
        }
        Ok(out)
    }

    fn remote_ip(&self) -> Option<IpAddr> {
        Some(self.peer.ip())
    }
}

/// Quote `s` for a POSIX shell (single quotes).
pub fn sh_quote(s: &str) -> String {
    if !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_./:=@%+,".contains(c))
    {
        return s.to_string();
    }
    format!("'{}'", s.replace('\'', "'\\''"))
}

/// A scripted, recording transport for unit tests.
pub mod fake {
    use super::{ExecOutput, SshError, Transport};
    use std::collections::VecDeque;
    use std::net::IpAddr;
    use std::sync::Mutex;

    /// One command the fake ran.
    #[derive(Debug, Clone, PartialEq, Eq)]
    pub struct Recorded {
        pub cmd: String,
        pub stdin: Vec<u8>,
    }

    struct Rule {
        contains: String,
        answers: VecDeque<ExecOutput>,
    }

    /// Answers each command with the first rule whose text it contains (a
    /// rule with several answers gives them in turn, repeating the last);
    /// anything else succeeds with empty output. Records every command.
    #[derive(Default)]
    pub struct FakeTransport {
        rules: Mutex<Vec<Rule>>,
        log: Mutex<Vec<Recorded>>,
        ip: Option<IpAddr>,
    }

    impl FakeTransport {
        pub fn new() -> FakeTransport {
            FakeTransport {
                ip: "192.0.2.10".parse().ok(),
                ..Default::default()
            }
        }

        /// Answer commands containing `contains` with `out`.
        pub fn on(self, contains: &str, out: ExecOutput) -> FakeTransport {
            self.on_seq(contains, vec![out])
        }

        /// Answer commands containing `contains` with `outs` in turn.
        pub fn on_seq(self, contains: &str, outs: Vec<ExecOutput>) -> FakeTransport {
            if let Ok(mut r) = self.rules.lock() {
                r.push(Rule {
                    contains: contains.to_string(),
                    answers: outs.into(),
                });
            }
            self
        }

        /// Every command run so far, in order.
        pub fn commands(&self) -> Vec<String> {
            self.recorded().into_iter().map(|r| r.cmd).collect()
        }

        pub fn recorded(&self) -> Vec<Recorded> {
            self.log.lock().map(|l| l.clone()).unwrap_or_default()
        }
    }

    impl Transport for FakeTransport {
        async fn exec_with_input(&self, cmd: &str, stdin: &[u8]) -> Result<ExecOutput, SshError> {
            if let Ok(mut l) = self.log.lock() {
                l.push(Recorded {
                    cmd: cmd.to_string(),
                    stdin: stdin.to_vec(),
                });
            }
            let mut rules = self.rules.lock().map_err(|_| SshError::Session {
                target: "fake".into(),
                reason: "poisoned".into(),
            })?;
            for r in rules.iter_mut() {
                if cmd.contains(&r.contains) {
                    let out = if r.answers.len() > 1 {
                        r.answers.pop_front()
                    } else {
                        r.answers.front().cloned()
                    };
                    return Ok(out.unwrap_or_default());
                }
            }
            Ok(ExecOutput::default())
        }

        fn remote_ip(&self) -> Option<IpAddr> {
            self.ip
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_parse() {
        let t: SshTarget = "ann@10.0.1.20".parse().unwrap();
        assert_eq!(
            (t.user.as_str(), t.host.as_str(), t.port),
            ("ann", "10.0.1.20", 22)
        );
        let t: SshTarget = "10.0.1.20:2222".parse().unwrap();
        assert_eq!((t.user.as_str(), t.port), ("root", 2222));
        assert_eq!(t.to_string(), "root@10.0.1.20:2222");
        let t: SshTarget = "ann@[fd00::1]:2200".parse().unwrap();
        assert_eq!((t.host.as_str(), t.port), ("fd00::1", 2200));
        assert_eq!(t.to_string(), "ann@[fd00::1]:2200");
        let t: SshTarget = "fd00::1".parse().unwrap();
        assert_eq!((t.host.as_str(), t.port), ("fd00::1", 22));
        assert!("ann@".parse::<SshTarget>().is_err());
        assert!("@h".parse::<SshTarget>().is_err());
        let e = "a@h:99999".parse::<SshTarget>().unwrap_err().to_string();
        assert!(e.contains("port") && e.contains("user@host"), "{e}");
    }

    #[test]
    fn quoting() {
        assert_eq!(sh_quote("/usr/local/bin/ployzd"), "/usr/local/bin/ployzd");
        assert_eq!(sh_quote("a b"), "'a b'");
        assert_eq!(sh_quote("it's"), "'it'\\''s'");
        assert_eq!(sh_quote(""), "''");
    }

    #[tokio::test]
    async fn fake_answers_in_turn_and_records() {
        let f = fake::FakeTransport::new().on_seq(
            "status",
            vec![ExecOutput::failed(3, "no"), ExecOutput::ok("yes")],
        );
        assert_eq!(f.exec("x status").await.unwrap().status, 3);
        assert_eq!(f.exec("x status").await.unwrap().stdout_str(), "yes");
        assert_eq!(f.exec("x status").await.unwrap().stdout_str(), "yes");
        assert_eq!(f.exec_with_input("cat", b"hi").await.unwrap().status, 0);
        assert_eq!(f.recorded()[3].stdin, b"hi");
        assert_eq!(f.commands().len(), 4);
    }
}
