//! Test harness: real `ployzd` processes driven by the real `ployzctl`.
//!
//! Each [`Machine`] owns a private temp directory (data dir and socket) and
//! its child process; dropping it kills the process and removes the
//! directory, also when a test fails. Binaries are found next to the test
//! executable's target directory (build them first: `cargo build --bins`),
//! or in `$PLOYZ_BIN_DIR`. Namespace hosts come from `ployz-testbed`,
//! re-exported as [`netns`].

pub mod fresh;
pub mod images;
pub mod linearizability;

pub use ployz_testbed as netns;
pub use ployz_testbed::{eventually, eventually_every};

use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// Directory holding the built `ployzd` and `ployzctl`.
pub fn bin_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("PLOYZ_BIN_DIR") {
        return PathBuf::from(d);
    }
    // target/<profile>/deps/<test-exe>
    let exe = std::env::current_exe().expect("current_exe");
    let profile_dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("test executable lives in target/<profile>/deps");
    profile_dir.to_path_buf()
}

pub fn bin(name: &str) -> PathBuf {
    let p = bin_dir().join(name);
    assert!(
        p.exists(),
        "{} not found: build the binaries first (`cargo build --bins`) or set PLOYZ_BIN_DIR",
        p.display()
    );
    p
}

/// A ployzd process with its own data directory and socket.
pub struct Machine {
    dir: tempfile::TempDir,
    child: Option<Child>,
    extra_args: Vec<String>,
    host: Option<netns::Host>,
    env: Vec<(String, String)>,
}

impl Machine {
    /// Start a fresh machine and wait until its socket answers.
    pub fn start() -> Machine {
        Self::start_with(&[])
    }

    /// Like [`Machine::start_with`], with extra environment variables.
    pub fn start_with_env(extra: &[&str], env: &[(&str, &str)]) -> Machine {
        let mut m = Self::build(None, &Self::root_ns_args(extra));
        m.env = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        m.spawn();
        m
    }

    /// A machine in the root namespace: several share the host, so each
    /// takes a free peer port on loopback.
    pub fn start_with(extra: &[&str]) -> Machine {
        Self::launch(None, &Self::root_ns_args(extra))
    }

    /// A machine in the root namespace that advertises `ip` (an address of
    /// this box other hosts reach, e.g. the docker bridge gateway), with
    /// free peer and NATS ports.
    pub fn start_advertising(ip: std::net::IpAddr) -> Machine {
        let ip = ip.to_string();
        Self::launch(
            None,
            &[
                "--peer-port",
                "0",
                "--nats-port",
                "0",
                // On the test box itself: no plz0 in the host's namespace.
                "--no-mesh",
                "--advertise-ip",
                &ip,
                // Several share the box's ports: no gateway.
                "--http-port",
                "0",
                "--https-port",
                "0",
            ],
        )
    }

    fn root_ns_args<'a>(extra: &[&'a str]) -> Vec<&'a str> {
        let mut args = vec![
            "--peer-port",
            "0",
            "--advertise-ip",
            "127.0.0.1",
            "--no-mesh",
            // Several share the box's ports: no gateway (80/443 are the host's).
            "--http-port",
            "0",
            "--https-port",
            "0",
        ];
        args.extend_from_slice(extra);
        args
    }

    /// A machine inside a namespace host (default peer port, its own address).
    pub fn start_in(host: &netns::Host, extra: &[&str]) -> Machine {
        let ip = host.ip.to_string();
        let mut args = vec!["--advertise-ip", ip.as_str()];
        args.extend_from_slice(extra);
        Self::launch(Some(host.clone()), &args)
    }

    /// Like [`Machine::start_in`], with extra environment variables (e.g. a
    /// `PATH` without some tool).
    pub fn start_in_with_env(host: &netns::Host, extra: &[&str], env: &[(&str, &str)]) -> Machine {
        let ip = host.ip.to_string();
        let mut args = vec!["--advertise-ip", ip.as_str()];
        args.extend_from_slice(extra);
        let mut m = Self::build(Some(host.clone()), &args);
        m.set_env(env);
        m.spawn();
        m
    }

    fn launch(host: Option<netns::Host>, extra: &[&str]) -> Machine {
        let mut m = Self::build(host, extra);
        m.spawn();
        m
    }

    fn build(host: Option<netns::Host>, extra: &[&str]) -> Machine {
        let dir = tempfile::Builder::new()
            .prefix("ployz-test-")
            .tempdir()
            .expect("tempdir");
        Machine {
            dir,
            child: None,
            extra_args: extra.iter().map(|s| s.to_string()).collect(),
            host,
            env: Vec::new(),
        }
    }

    /// This machine's id (from `mesh status`).
    pub fn id(&self) -> String {
        self.ctl_json(&["mesh", "status"])["machine_id"]
            .as_str()
            .expect("machine_id")
            .to_string()
    }

    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    pub fn socket(&self) -> PathBuf {
        self.dir.path().join("run/ployzd.sock")
    }

    pub fn log_path(&self) -> PathBuf {
        self.dir.path().join("ployzd.log")
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }

    fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())
            .expect("log file");
        let mut cmd = match &self.host {
            Some(h) => h.daemon_command(bin("ployzd")),
            None => Command::new(bin("ployzd")),
        };
        let child = cmd
            .arg("--data-dir")
            .arg(self.data_dir())
            .arg("--socket")
            .arg(self.socket())
            .arg("run")
            .args(&self.extra_args)
            .env("RUST_LOG", "info")
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log fd"))
            .stderr(log)
            .spawn()
            .expect("spawn ployzd");
        self.child = Some(child);
        self.wait_ready();
    }

    fn wait_ready(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if std::os::unix::net::UnixStream::connect(self.socket()).is_ok() {
                return;
            }
            if self.child.is_none() {
                panic!("not running");
            }
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                panic!("ployzd exited early ({status}); log:\n{}", self.log());
            }
            assert!(
                Instant::now() < deadline,
                "ployzd did not open its socket in 30 s; log:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGKILL the daemon: no shutdown path runs.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM and wait for a clean exit.
    pub fn stop(&mut self) -> std::process::ExitStatus {
        let mut c = self.child.take().expect("running");
        // SAFETY: kill(2) on our own child's pid.
        unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
        c.wait().expect("wait")
    }

    /// Environment for the next [`Machine::restart`] (replacing any set before).
    pub fn set_env(&mut self, env: &[(&str, &str)]) {
        self.env = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
    }

    /// Start the daemon again on the same data directory.
    pub fn restart(&mut self) {
        assert!(self.child.is_none(), "stop or kill the daemon first");
        self.spawn();
    }

    /// Run a command in this machine's network and mount namespaces (e.g.
    /// `wg show plz0`, which reads the private /run/wireguard).
    pub fn exec(&self, program: &str, args: &[&str]) -> Output {
        netns::nsenter(self.pid(), program, args)
    }

    /// Whether the process is still running.
    pub fn is_running(&mut self) -> bool {
        match self.child.as_mut() {
            Some(c) => c.try_wait().ok().flatten().is_none(),
            None => false,
        }
    }

    /// Wait for the process to exit on its own (e.g. after `machine rm`).
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Some(c) = self.child.as_mut() {
                if let Ok(Some(st)) = c.try_wait() {
                    self.child = None;
                    return Some(st);
                }
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        None
    }

    /// Run `ployzctl --socket <ours> ARGS`.
    pub fn ctl(&self, args: &[&str]) -> Output {
        ctl_at(&self.socket(), args)
    }

    /// Run `ployzctl --json ARGS`, assert success and parse stdout.
    /// `ployzctl nats url --json`, once the NATS server is up (15 s at most).
    pub fn nats_info(&self) -> Value {
        eventually(Duration::from_secs(15), || {
            let o = self.ctl(&["--json", "nats", "url"]);
            o.status
                .success()
                .then(|| serde_json::from_slice::<Value>(&o.stdout).expect("JSON"))
        })
        .expect("the NATS server did not come up")
    }

    /// `ployzctl --json nats url --admin`: ployzd's own full-rights user
    /// (the only NATS user that may write the cluster's buckets).
    pub fn nats_admin_info(&self) -> Value {
        eventually(Duration::from_secs(15), || {
            let o = self.ctl(&["--json", "nats", "url", "--admin"]);
            o.status
                .success()
                .then(|| serde_json::from_slice::<Value>(&o.stdout).expect("JSON"))
        })
        .expect("the NATS server did not come up")
    }

    /// `ployzctl --json deploy service ARGS…` that may fail: its exit code
    /// and the JSON it printed (the service, or the error).
    pub fn try_deploy(&self, args: &[&str]) -> (Option<i32>, Value) {
        let mut a = vec!["--json", "deploy", "service"];
        a.extend_from_slice(args);
        let out = self.ctl(&a);
        let v = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
            panic!(
                "ployzctl {a:?} printed no JSON ({e}): {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            )
        });
        (out.status.code(), v)
    }

    /// `ployzctl ARGS…` on this machine's socket, started and left
    /// running (stdout and stderr piped): for commands killed or raced.
    pub fn ctl_spawn(&self, args: &[&str]) -> std::process::Child {
        Command::new(bin("ployzctl"))
            .arg("--socket")
            .arg(self.socket())
            .args(args)
            .env_remove("PLOYZ_SOCKET")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("run ployzctl")
    }

    /// Promote `ids` to a storage set of three (this machine asks); every
    /// target must succeed.
    pub fn promote(&self, ids: &[&str]) -> Value {
        let mut args = vec!["machine", "storage", "promote", "--replicas", "3"];
        args.extend_from_slice(ids);
        let r = self.ctl_json(&args);
        for t in r["results"].as_array().expect("results") {
            assert_eq!(t["ok"], true, "{r}");
        }
        assert_eq!(r["voters"].as_array().expect("voters").len(), 3, "{r}");
        r
    }

    /// `ployzctl --json deploy service ARGS…`, which must succeed.
    pub fn deploy(&self, args: &[&str]) -> Value {
        let mut a = vec!["deploy", "service"];
        a.extend_from_slice(args);
        self.ctl_json(&a)
    }

    pub fn ctl_json(&self, args: &[&str]) -> Value {
        let mut a = vec!["--json"];
        a.extend_from_slice(args);
        let out = self.ctl(&a);
        assert!(
            out.status.success(),
            "ployzctl {args:?} failed ({}):\nstdout: {}\nstderr: {}\nlog:\n{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
            self.log()
        );
        serde_json::from_slice(&out.stdout).expect("ployzctl --json prints JSON")
    }

    /// The `machine ls --json` records.
    pub fn machines(&self) -> Vec<Value> {
        self.ctl_json(&["machine", "ls"])["machines"]
            .as_array()
            .expect("machines array")
            .clone()
    }

    /// The lifecycle of machine `id` in `machine ls`, if it is listed.
    pub fn lifecycle_of(&self, id: &str) -> Option<String> {
        self.machines()
            .iter()
            .find(|m| m["id"] == id)
            .and_then(|m| m["lifecycle"].as_str())
            .map(str::to_string)
    }

    /// A fresh invite token (`machine invite create`).
    pub fn invite(&self) -> String {
        self.ctl_json(&["machine", "invite", "create"])["token"]
            .as_str()
            .expect("token")
            .to_string()
    }
}

impl Machine {
    /// Workloads outlive their daemon (as on a real machine, where a ployzd
    /// restart must not stop services); a test's machines must not, so
    /// dropping a machine kills what its runtime started.
    fn kill_workloads(&self) {
        let state = self.data_dir().join("runtime/state");
        if let Ok(dirs) = std::fs::read_dir(&state) {
            for d in dirs.flatten() {
                let Ok(body) = std::fs::read(d.path().join("state.json")) else {
                    continue;
                };
                let pid = serde_json::from_slice::<Value>(&body)
                    .ok()
                    .and_then(|v| v["pid"].as_i64());
                if let Some(pid) = pid.filter(|p| *p > 1) {
                    // SAFETY: kill(2) with a pid read from our own runtime state.
                    unsafe { libc::kill(pid as i32, libc::SIGKILL) };
                }
            }
        }
        if self
            .extra_args
            .windows(2)
            .any(|w| w == ["--runtime", "docker"])
        {
            let id = std::fs::read(self.data_dir().join("identity.json"))
                .ok()
                .and_then(|b| serde_json::from_slice::<Value>(&b).ok())
                .and_then(|v| v["machine_id"].as_str().map(str::to_string));
            if let Some(id) = id {
                let out = Command::new("docker")
                    .args(["ps", "-aq", "--filter", &format!("name=^plz-{}-", &id[..8])])
                    .output();
                if let Ok(out) = out {
                    for c in String::from_utf8_lossy(&out.stdout).split_whitespace() {
                        let _ = Command::new("docker").args(["rm", "-f", c]).output();
                    }
                }
            }
        }
    }
}

impl Drop for Machine {
    fn drop(&mut self) {
        self.kill9();
        self.kill_workloads();
    }
}

/// A network on every host of `tb`: host 0 founds `network`, the others join
/// with invites it creates and are active. Machine `i` runs on host `i`.
pub fn cluster_on(tb: &netns::Testbed, network: &str) -> Vec<Machine> {
    cluster_on_with_env(tb, network, &[])
}

/// [`cluster_on`], machine `i` started with the environment `env[i]` (none
/// past the end of `env`).
pub fn cluster_on_with_env(
    tb: &netns::Testbed,
    network: &str,
    env: &[&[(&str, &str)]],
) -> Vec<Machine> {
    let env_of = |i: usize| env.get(i).copied().unwrap_or(&[]);
    let founder = Machine::start_in_with_env(&tb.hosts[0], &[], env_of(0));
    founder.ctl_json(&["mesh", "init", network]);
    let mut ms = vec![founder];
    for (i, h) in tb.hosts.iter().enumerate().skip(1) {
        let m = Machine::start_in_with_env(h, &[], env_of(i));
        let token = ms[0].invite();
        let s = m.ctl_json(&["machine", "invite", "import", "--token", &token]);
        assert_eq!(s["machine"]["lifecycle"], "active", "{s}");
        ms.push(m);
    }
    ms
}

pub fn ctl_at(socket: &Path, args: &[&str]) -> Output {
    Command::new(bin("ployzctl"))
        .arg("--socket")
        .arg(socket)
        .args(args)
        .env_remove("PLOYZ_SOCKET")
        .stdin(Stdio::null())
        .output()
        .expect("run ployzctl")
}

pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// A standard NATS client connected to `server` with the credentials
/// `ployzctl nats url --json` printed (`info`).
pub async fn nats_connect(info: &Value, server: &str) -> async_nats::Client {
    nats_options(info)
        .connect(server)
        .await
        .expect("connect with the printed credentials")
}

/// Options for the credentials of a `nats url` / `nats user add` answer
/// (`user`, `password`), trusting `ca_pem` when given: a server that asks
/// for TLS (ployzd's `--nats-listen` addresses) is then verified with it.
pub fn nats_options(info: &Value) -> async_nats::ConnectOptions {
    let o = async_nats::ConnectOptions::with_user_and_password(
        info["user"].as_str().expect("user").into(),
        info["password"].as_str().expect("password").into(),
    );
    match info["ca_pem"].as_str() {
        Some(pem) => o.tls_client_config(tls_trusting(pem)),
        None => o,
    }
}

/// A rustls client configuration whose only root is the CA in `pem`.
pub fn tls_trusting(pem: &str) -> rustls::ClientConfig {
    use base64::Engine as _;
    let body: String = pem
        .lines()
        .filter(|l| !l.starts_with("-----"))
        .map(str::trim)
        .collect();
    let der = base64::engine::general_purpose::STANDARD
        .decode(body)
        .expect("a PEM certificate");
    let mut roots = rustls::RootCertStore::empty();
    roots.add(der.into()).expect("a CA certificate");
    rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("TLS versions")
    .with_root_certificates(roots)
    .with_no_client_auth()
}
