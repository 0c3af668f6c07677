//! Every iptables rule ployzd writes, in one place.
//!
//! Each rule carries the comment `ployz:<bridge>` (`-m comment --comment
//! ployz:plz0a650300`), so it can be told apart from everyone else's and
//! found again: [`remove_all`] takes out every one of them when the machine
//! leaves its network. Rules from older ployzd versions have no comment;
//! they are recognised by their exact shape (the bridge or subnet they name),
//! replaced by tagged ones when the network is set up again, and removed
//! with the tagged ones.
//!
//! The decisions are pure: [`converge`] turns an `iptables -S` listing and
//! the rules wanted into the commands to run, tested without a kernel. The
//! shell around it lists a chain, converges, runs the commands. iptables may
//! be missing on a host: then there is no firewall of its making to open,
//! nothing is done, and one log line says so.

use std::fmt;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};

/// Prefix of the comment on every rule ployzd writes.
pub const TAG_PREFIX: &str = "ployz:";

/// The chains ployzd writes to.
const CHAINS: [&str; 3] = ["FORWARD", "DOCKER-USER", "INPUT"];

/// ployzd's own chain guarding the control-plane ports (see [`guard_control`]).
pub const CONTROL_CHAIN: &str = "PLOYZ-CONTROL";
/// The tag of the jump into [`CONTROL_CHAIN`].
const CONTROL_TAG: &str = "ployz:control";

/// The comment on the rules for `bridge`.
pub fn tag(bridge: &str) -> String {
    format!("{TAG_PREFIX}{bridge}")
}

/// One rule as `iptables -S CHAIN` lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Listed {
    /// Its arguments after `-A CHAIN`, unquoted: what `-D CHAIN` takes.
    pub args: Vec<String>,
    /// The same without `-m comment --comment X`.
    pub spec: Vec<String>,
    /// X, when it has a comment.
    pub comment: Option<String>,
}

/// Splits one line of `iptables -S` output into words, honouring the
/// double quotes iptables puts around comments.
fn words(line: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut quoted = false;
    let mut in_word = false;
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        match c {
            '"' => {
                quoted = !quoted;
                in_word = true;
            }
            '\\' if quoted => {
                if let Some(n) = chars.next() {
                    cur.push(n);
                }
            }
            c if c.is_whitespace() && !quoted => {
                if in_word {
                    out.push(std::mem::take(&mut cur));
                    in_word = false;
                }
            }
            c => {
                cur.push(c);
                in_word = true;
            }
        }
    }
    if in_word {
        out.push(cur);
    }
    out
}

/// The rules of `chain` in an `iptables -S` listing.
pub fn parse_listing(chain: &str, listing: &str) -> Vec<Listed> {
    listing
        .lines()
        .filter_map(|line| {
            let w = words(line);
            let (Some("-A"), Some(c)) = (w.first().map(String::as_str), w.get(1)) else {
                return None;
            };
            if c != chain {
                return None;
            }
            let args = w[2..].to_vec();
            let mut spec = Vec::new();
            let mut comment = None;
            let mut i = 0;
            while i < args.len() {
                if args[i] == "-m"
                    && args.get(i + 1).map(String::as_str) == Some("comment")
                    && args.get(i + 2).map(String::as_str) == Some("--comment")
                    && i + 3 < args.len()
                {
                    comment = Some(args[i + 3].clone());
                    i += 4;
                } else {
                    spec.push(args[i].clone());
                    i += 1;
                }
            }
            Some(Listed {
                args,
                spec,
                comment,
            })
        })
        .collect()
}

/// One iptables invocation (without `-w`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Cmd {
    /// At the top of `chain`.
    Insert {
        chain: String,
        spec: Vec<String>,
        tag: String,
    },
    /// At the end of `chain`.
    Append {
        chain: String,
        spec: Vec<String>,
        tag: String,
    },
    /// At 1-based position `pos` of `chain` (before the rule there).
    InsertAt {
        chain: String,
        pos: usize,
        spec: Vec<String>,
        tag: String,
    },
    /// Deletes the rule listed with `args`.
    Delete { chain: String, args: Vec<String> },
}

impl Cmd {
    /// The arguments to iptables. The comment goes right before the target
    /// (`-j`), where `iptables -S` lists it.
    pub fn args(&self) -> Vec<String> {
        let tagged = |flag: &str, chain: &str, spec: &[String], tag: &str| {
            let at = spec.iter().position(|a| a == "-j").unwrap_or(spec.len());
            let mut a = vec![flag.to_string(), chain.to_string()];
            a.extend_from_slice(&spec[..at]);
            a.extend(["-m", "comment", "--comment", tag].map(String::from));
            a.extend_from_slice(&spec[at..]);
            a
        };
        match self {
            Cmd::Insert { chain, spec, tag } => tagged("-I", chain, spec, tag),
            Cmd::Append { chain, spec, tag } => tagged("-A", chain, spec, tag),
            Cmd::InsertAt {
                chain,
                pos,
                spec,
                tag,
            } => {
                let mut a = tagged("-I", chain, spec, tag);
                a.insert(2, pos.to_string());
                a
            }
            Cmd::Delete { chain, args } => {
                let mut a = vec!["-D".to_string(), chain.clone()];
                a.extend_from_slice(args);
                a
            }
        }
    }
}

/// The command line, as a shell would take it.
impl fmt::Display for Cmd {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("iptables")?;
        for a in self.args() {
            if a.is_empty() || a.contains(char::is_whitespace) {
                write!(f, " \"{a}\"")?;
            } else {
                write!(f, " {a}")?;
            }
        }
        Ok(())
    }
}

/// The rules ployzd wants in one chain for one bridge.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Want {
    pub chain: String,
    pub tag: String,
    /// Accept rules: at the top of the chain.
    pub top: Vec<Vec<String>>,
    /// Drop rules: at the end of the chain.
    pub end: Vec<Vec<String>>,
}

/// The commands that make `listed` hold exactly `want`'s rules of its tag:
/// missing rules are added first (so nothing wanted is ever missing in
/// between), then every other rule of ours is deleted: tagged with the tag
/// but not wanted (or a second copy), or untagged and `legacy` (an older
/// ployzd's rule for the same thing). Where the chain has an unconditional
/// `-j RETURN`, the end rules go right before it, and rules of ours after
/// it (never reached) are deleted first.
pub fn converge(listed: &[Listed], want: &Want, legacy: impl Fn(&[String]) -> bool) -> Vec<Cmd> {
    // An unconditional RETURN ends the chain early (dockerd before 28
    // appends one to DOCKER-USER, and again whenever it finds it missing):
    // a rule of ours after it is never reached, and the end rules go
    // right before it.
    let ret = listed
        .iter()
        .position(|r| r.comment.is_none() && r.spec == ["-j", "RETURN"]);
    let mut kept: Vec<&[String]> = Vec::new();
    let mut dead = Vec::new();
    let mut delete = Vec::new();
    for (i, r) in listed.iter().enumerate() {
        let tagged = r.comment.as_deref() == Some(want.tag.as_str());
        let ours = tagged || (r.comment.is_none() && legacy(&r.spec));
        if !ours {
            continue;
        }
        let wanted = want.top.iter().chain(&want.end).any(|w| *w == r.spec);
        let reached = ret.is_none_or(|k| i < k);
        if !reached {
            // Deleted first: `-D` by spec takes the first match, which
            // would be the copy put back before the RETURN.
            dead.push(Cmd::Delete {
                chain: want.chain.clone(),
                args: r.args.clone(),
            });
        } else if tagged && wanted && !kept.contains(&r.spec.as_slice()) {
            kept.push(&r.spec);
        } else {
            delete.push(Cmd::Delete {
                chain: want.chain.clone(),
                args: r.args.clone(),
            });
        }
    }
    let missing = |rules: &[Vec<String>]| -> Vec<Vec<String>> {
        rules
            .iter()
            .filter(|w| !kept.contains(&w.as_slice()))
            .cloned()
            .collect()
    };
    let mut cmds = dead;
    let top = missing(&want.top);
    let inserted = top.len();
    for spec in top {
        cmds.push(Cmd::Insert {
            chain: want.chain.clone(),
            spec,
            tag: want.tag.clone(),
        });
    }
    for spec in missing(&want.end) {
        let (chain, tag) = (want.chain.clone(), want.tag.clone());
        cmds.push(match ret {
            // The RETURN's 1-based position once the top rules are in.
            Some(k) => Cmd::InsertAt {
                chain,
                pos: k + 1 + inserted,
                spec,
                tag,
            },
            None => Cmd::Append { chain, spec, tag },
        });
    }
    cmds.extend(delete);
    cmds
}

/// The commands that delete every rule ployzd wrote in `chain`: tagged
/// ones, and the untagged rules of older versions for host-runtime bridges
/// (recognisable by ployzd's bridge names, `plz` + 8 hex digits).
pub fn remove_all_cmds(chain: &str, listed: &[Listed]) -> Vec<Cmd> {
    listed
        .iter()
        .filter(|r| match &r.comment {
            Some(c) => c.starts_with(TAG_PREFIX),
            None => is_legacy_ployz_bridge_rule(&r.spec),
        })
        .map(|r| Cmd::Delete {
            chain: chain.to_string(),
            args: r.args.clone(),
        })
        .collect()
}

fn s(a: &[&str]) -> Vec<String> {
    a.iter().map(|x| x.to_string()).collect()
}

/// The host runtime's rules for `bridge`: forwarded traffic out of it is
/// accepted, and into it (from `from` only, dropping the rest at the end of
/// the chain, when given). A FORWARD policy of DROP (dockerd sets one)
/// would otherwise drop mesh traffic to workloads.
pub fn bridge_want(bridge: &str, from: Option<&str>) -> Want {
    let mut into = Vec::new();
    if let Some(from) = from {
        into.extend(["-s", from]);
    }
    into.extend(["-o", bridge, "-j", "ACCEPT"]);
    Want {
        chain: "FORWARD".into(),
        tag: tag(bridge),
        top: vec![s(&["-i", bridge, "-j", "ACCEPT"]), s(&into)],
        end: if from.is_some() {
            vec![s(&["-o", bridge, "-j", "DROP"])]
        } else {
            Vec::new()
        },
    }
}

/// Whether `spec` is a rule an older ployzd wrote for the host bridge
/// `bridge` (without a comment).
pub fn is_legacy_bridge_rule(spec: &[String], bridge: &str) -> bool {
    ["-i", "-o"]
        .iter()
        .any(|dir| spec.windows(2).any(|w| w[0] == *dir && w[1] == bridge))
        && matches!(spec.last().map(String::as_str), Some("ACCEPT" | "DROP"))
        && spec.iter().all(|a| {
            matches!(a.as_str(), "-s" | "-i" | "-o" | "-j" | "ACCEPT" | "DROP")
                || a == bridge
                || a.contains('/')
        })
}

/// Whether `spec` is an older ployzd's host bridge rule for any bridge it
/// names (`plz` + 8 hex digits, see ployzd's `bridge_name`).
fn is_legacy_ployz_bridge_rule(spec: &[String]) -> bool {
    spec.windows(2).any(|w| {
        matches!(w[0].as_str(), "-i" | "-o")
            && w[1].len() == 11
            && w[1].starts_with("plz")
            && w[1][3..].bytes().all(|b| b.is_ascii_hexdigit())
            && is_legacy_bridge_rule(spec, &w[1])
    })
}

/// The docker runtime's rules for the network `bridge` with `subnet`, in
/// `chain` (`DOCKER-USER`, or `FORWARD` where dockerd made none): forwarded
/// traffic to the subnet is accepted ahead of dockerd's own rules (from
/// `from` only, dropping the rest, when given).
pub fn subnet_want(chain: &str, bridge: &str, subnet: &str, from: Option<&str>) -> Want {
    let mut accept = Vec::new();
    if let Some(from) = from {
        accept.extend(["-s", from]);
    }
    accept.extend(["-d", subnet, "-j", "ACCEPT"]);
    Want {
        chain: chain.into(),
        tag: tag(bridge),
        top: vec![s(&accept)],
        end: if from.is_some() {
            vec![s(&["-d", subnet, "-j", "DROP"])]
        } else {
            Vec::new()
        },
    }
}

/// Whether `spec` is a rule an older ployzd wrote for the docker network
/// with `subnet` (without a comment).
pub fn is_legacy_subnet_rule(spec: &[String], subnet: &str) -> bool {
    let spec: Vec<&str> = spec.iter().map(String::as_str).collect();
    matches!(
        spec.as_slice(),
        ["-d", d, "-j", "ACCEPT" | "DROP"] | ["-s", _, "-d", d, "-j", "ACCEPT"] if *d == subnet
    )
}

#[derive(Debug, thiserror::Error)]
pub enum FirewallError {
    #[error("could not run `{cmd}`: {source}")]
    Spawn { cmd: String, source: std::io::Error },
    #[error("`{cmd}` failed: {stderr}")]
    Failed { cmd: String, stderr: String },
}

/// What one iptables run said.
#[derive(Debug, Clone)]
pub struct Ran {
    pub ok: bool,
    pub stdout: String,
    pub stderr: String,
}

/// The seam in front of the iptables binary.
pub trait Iptables {
    /// Runs iptables with `args`; `Ok(None)` when it is not installed.
    fn run(&self, args: &[String]) -> std::io::Result<Option<Ran>>;
}

/// The iptables of this host (of the calling thread's network namespace),
/// waiting up to 5 s for the xtables lock.
#[derive(Debug, Default, Clone, Copy)]
pub struct System;

static MISSING_LOGGED: AtomicBool = AtomicBool::new(false);

impl Iptables for System {
    fn run(&self, args: &[String]) -> std::io::Result<Option<Ran>> {
        match Command::new("iptables")
            .args(["-w", "5"])
            .args(args)
            .stdin(Stdio::null())
            .output()
        {
            Ok(out) => Ok(Some(Ran {
                ok: out.status.success(),
                stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
                stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
            })),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                if !MISSING_LOGGED.swap(true, Ordering::Relaxed) {
                    tracing::warn!(
                        "iptables is not installed: no firewall of its making to open, \
                         ployzd writes no rules"
                    );
                }
                Ok(None)
            }
            Err(e) => Err(e),
        }
    }
}

fn spawn_err(args: &[String]) -> impl FnOnce(std::io::Error) -> FirewallError + '_ {
    move |source| FirewallError::Spawn {
        cmd: format!("iptables {}", args.join(" ")),
        source,
    }
}

/// The rules of `chain`; `None` when there is no such chain or no iptables.
fn list(ipt: &dyn Iptables, chain: &str) -> Result<Option<Vec<Listed>>, FirewallError> {
    let args = s(&["-S", chain]);
    match ipt.run(&args).map_err(spawn_err(&args))? {
        Some(r) if r.ok => Ok(Some(parse_listing(chain, &r.stdout))),
        _ => Ok(None),
    }
}

/// Runs `cmds`; a delete that finds nothing (gone meanwhile) is fine.
fn run_all(ipt: &dyn Iptables, cmds: &[Cmd]) -> Result<(), FirewallError> {
    for cmd in cmds {
        let args = cmd.args();
        match ipt.run(&args).map_err(spawn_err(&args))? {
            Some(r) if !r.ok && !matches!(cmd, Cmd::Delete { .. }) => {
                return Err(FirewallError::Failed {
                    cmd: cmd.to_string(),
                    stderr: r.stderr,
                })
            }
            _ => {}
        }
    }
    Ok(())
}

/// Lists `want.chain`, converges it; `Ok(false)` when the chain does not exist.
fn apply_want(
    ipt: &dyn Iptables,
    want: &Want,
    legacy: impl Fn(&[String]) -> bool,
) -> Result<bool, FirewallError> {
    let Some(listed) = list(ipt, &want.chain)? else {
        return Ok(false);
    };
    run_all(ipt, &converge(&listed, want, legacy))?;
    Ok(true)
}

/// Sets up the host runtime's rules for `bridge` ([`bridge_want`]).
pub fn allow_bridge(
    ipt: &dyn Iptables,
    bridge: &str,
    from: Option<&str>,
) -> Result<(), FirewallError> {
    apply_want(ipt, &bridge_want(bridge, from), |r| {
        is_legacy_bridge_rule(r, bridge)
    })
    .map(drop)
}

/// Removes the host runtime's rules for `bridge`, tagged or older.
pub fn remove_bridge(ipt: &dyn Iptables, bridge: &str) -> Result<(), FirewallError> {
    let want = Want {
        top: Vec::new(),
        end: Vec::new(),
        ..bridge_want(bridge, None)
    };
    apply_want(ipt, &want, |r| is_legacy_bridge_rule(r, bridge)).map(drop)
}

/// Sets up the docker runtime's rules for network `bridge` ([`subnet_want`])
/// in `DOCKER-USER`, or in `FORWARD` when dockerd made no `DOCKER-USER`.
pub fn allow_subnet(
    ipt: &dyn Iptables,
    bridge: &str,
    subnet: &str,
    from: Option<&str>,
) -> Result<(), FirewallError> {
    let legacy = |r: &[String]| is_legacy_subnet_rule(r, subnet);
    if apply_want(
        ipt,
        &subnet_want("DOCKER-USER", bridge, subnet, from),
        legacy,
    )? {
        return Ok(());
    }
    apply_want(ipt, &subnet_want("FORWARD", bridge, subnet, from), legacy).map(drop)
}

/// Removes the docker runtime's rules for network `bridge` with `subnet`,
/// tagged or older, from both chains.
pub fn remove_subnet(ipt: &dyn Iptables, bridge: &str, subnet: &str) -> Result<(), FirewallError> {
    for chain in ["DOCKER-USER", "FORWARD"] {
        let want = Want {
            top: Vec::new(),
            end: Vec::new(),
            ..subnet_want(chain, bridge, subnet, None)
        };
        apply_want(ipt, &want, |r| is_legacy_subnet_rule(r, subnet))?;
    }
    Ok(())
}

/// Removes every rule ployzd wrote in this network namespace (see
/// [`remove_all_cmds`]); returns how many. Untagged rules an older docker
/// runtime wrote name only a subnet: [`remove_subnet`] finds those, not this.
pub fn remove_all_with(ipt: &dyn Iptables) -> Result<usize, FirewallError> {
    let mut n = 0;
    for chain in CHAINS {
        let Some(listed) = list(ipt, chain)? else {
            continue;
        };
        let cmds = remove_all_cmds(chain, &listed);
        run_all(ipt, &cmds)?;
        n += cmds.len();
    }
    if let Some(listed) = list(ipt, CONTROL_CHAIN)? {
        n += listed.len();
        for args in [s(&["-F", CONTROL_CHAIN]), s(&["-X", CONTROL_CHAIN])] {
            ipt.run(&args).map_err(spawn_err(&args))?;
        }
    }
    Ok(n)
}

/// The jump from `INPUT` into [`CONTROL_CHAIN`] for TCP to `ports`.
pub fn control_jump(ports: &[u16]) -> Want {
    let ports = ports
        .iter()
        .map(u16::to_string)
        .collect::<Vec<_>>()
        .join(",");
    Want {
        chain: "INPUT".into(),
        tag: CONTROL_TAG.into(),
        top: vec![s(&[
            "-p",
            "tcp",
            "-m",
            "multiport",
            "--dports",
            &ports,
            "-j",
            CONTROL_CHAIN,
        ])],
        end: Vec::new(),
    }
}

/// The rules of [`CONTROL_CHAIN`], in order: the machines' own overlay
/// addresses pass, everything else from the cluster's range (workloads,
/// here or on other machines) is dropped; the rest returns to `INPUT`.
pub fn control_rules(cluster: &str, machines: &[std::net::Ipv4Addr]) -> Vec<Vec<String>> {
    let mut rules: Vec<Vec<String>> = machines
        .iter()
        .map(|ip| s(&["-s", &format!("{ip}/32"), "-j", "RETURN"]))
        .collect();
    rules.push(s(&["-s", cluster, "-j", "DROP"]));
    rules
}

/// Keeps workloads off ployzd's control plane: TCP to `ports` (the peer
/// port, NATS) from the cluster's range `cluster` is dropped unless it comes
/// from one of the `machines`' overlay addresses. The chain is rebuilt only
/// when it differs (flushed, then filled: while it is empty nothing is
/// dropped, so machines never lose each other).
pub fn guard_control_with(
    ipt: &dyn Iptables,
    ports: &[u16],
    cluster: &str,
    machines: &[std::net::Ipv4Addr],
) -> Result<(), FirewallError> {
    let want = control_rules(cluster, machines);
    let listed = match list(ipt, CONTROL_CHAIN)? {
        Some(l) => l,
        None => {
            let args = s(&["-N", CONTROL_CHAIN]);
            match ipt.run(&args).map_err(spawn_err(&args))? {
                // No iptables: nothing to guard with.
                None => return Ok(()),
                Some(r) if !r.ok => {
                    return Err(FirewallError::Failed {
                        cmd: format!("iptables {}", args.join(" ")),
                        stderr: r.stderr,
                    })
                }
                Some(_) => Vec::new(),
            }
        }
    };
    let have: Vec<&Vec<String>> = listed.iter().map(|l| &l.args).collect();
    if have.len() != want.len() || have.iter().zip(&want).any(|(h, w)| *h != w) {
        let mut cmds = vec![s(&["-F", CONTROL_CHAIN])];
        cmds.extend(want.iter().map(|r| {
            let mut a = s(&["-A", CONTROL_CHAIN]);
            a.extend_from_slice(r);
            a
        }));
        for args in cmds {
            match ipt.run(&args).map_err(spawn_err(&args))? {
                Some(r) if !r.ok => {
                    return Err(FirewallError::Failed {
                        cmd: format!("iptables {}", args.join(" ")),
                        stderr: r.stderr,
                    })
                }
                _ => {}
            }
        }
    }
    apply_want(ipt, &control_jump(ports), |_| false).map(drop)
}

/// [`guard_control_with`] on this host's iptables.
pub fn guard_control(
    ports: &[u16],
    cluster: &str,
    machines: &[std::net::Ipv4Addr],
) -> Result<(), FirewallError> {
    crate::host::serialized(|| guard_control_with(&System, ports, cluster, machines))
}

/// [`remove_all_with`] on this host's iptables, for `machine rm`: the
/// machine leaves its network and keeps no rule of ours.
pub fn remove_all() -> Result<usize, FirewallError> {
    let n = crate::host::serialized(|| remove_all_with(&System))?;
    tracing::info!(rules = n, "removed ployzd's firewall rules");
    Ok(n)
}

/// An in-memory iptables (the filter table) for tests: `-S`, `-I`, `-A`,
/// `-D` on chains that exist.
#[derive(Debug, Default)]
pub struct FakeIptables {
    chains: std::sync::Mutex<Vec<(String, Vec<Vec<String>>)>>,
    /// Every command run, as iptables arguments.
    pub log: std::sync::Mutex<Vec<Vec<String>>>,
}

impl FakeIptables {
    /// A table with these (empty) chains.
    pub fn with_chains(names: &[&str]) -> Self {
        FakeIptables {
            chains: std::sync::Mutex::new(
                names.iter().map(|n| (n.to_string(), Vec::new())).collect(),
            ),
            log: Default::default(),
        }
    }

    /// The rules of `chain`, each as its arguments joined by spaces.
    pub fn rules(&self, chain: &str) -> Vec<String> {
        let chains = self.chains.lock().unwrap_or_else(|e| e.into_inner());
        chains
            .iter()
            .find(|(n, _)| n == chain)
            .map(|(_, rules)| rules.iter().map(|r| r.join(" ")).collect())
            .unwrap_or_default()
    }
}

impl Iptables for FakeIptables {
    fn run(&self, args: &[String]) -> std::io::Result<Option<Ran>> {
        self.log
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(args.to_vec());
        let mut chains = self.chains.lock().unwrap_or_else(|e| e.into_inner());
        let ran = |ok: bool, stdout: String| {
            Ok(Some(Ran {
                ok,
                stdout,
                stderr: if ok { String::new() } else { "fake: no".into() },
            }))
        };
        let (Some(op), Some(name)) = (args.first(), args.get(1)) else {
            return ran(false, String::new());
        };
        let exists = chains.iter().any(|(n, _)| n == name);
        match op.as_str() {
            "-N" if !exists => {
                chains.push((name.clone(), Vec::new()));
                return ran(true, String::new());
            }
            "-X" if exists => {
                chains.retain(|(n, _)| n != name);
                return ran(true, String::new());
            }
            _ => {}
        }
        let Some((_, rules)) = chains.iter_mut().find(|(n, _)| n == name) else {
            return ran(false, String::new());
        };
        let rule = args[2..].to_vec();
        match op.as_str() {
            "-S" => {
                let mut out = format!("-P {name} ACCEPT\n");
                for r in rules.iter() {
                    let shown: Vec<String> = r
                        .iter()
                        .enumerate()
                        .map(|(i, a)| {
                            let comment = i > 0 && r[i - 1] == "--comment";
                            if comment {
                                format!("\"{a}\"")
                            } else {
                                a.clone()
                            }
                        })
                        .collect();
                    out += &format!("-A {name} {}\n", shown.join(" "));
                }
                ran(true, out)
            }
            "-I" => {
                match rule.first().and_then(|p| p.parse::<usize>().ok()) {
                    Some(pos) if (1..=rules.len() + 1).contains(&pos) => {
                        rules.insert(pos - 1, rule[1..].to_vec())
                    }
                    Some(_) => return ran(false, String::new()),
                    None => rules.insert(0, rule),
                }
                ran(true, String::new())
            }
            "-A" => {
                rules.push(rule);
                ran(true, String::new())
            }
            "-F" => {
                rules.clear();
                ran(true, String::new())
            }
            "-D" => match rules.iter().position(|r| *r == rule) {
                Some(i) => {
                    rules.remove(i);
                    ran(true, String::new())
                }
                None => ran(false, String::new()),
            },
            _ => ran(false, String::new()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn add(ipt: &FakeIptables, chain: &str, rule: &str) {
        let mut args = s(&["-A", chain]);
        args.extend(rule.split(' ').map(String::from));
        ipt.run(&args).unwrap();
    }

    #[test]
    fn listing_is_split_with_comments_apart() {
        let l = parse_listing(
            "FORWARD",
            "-P FORWARD DROP\n\
             -A FORWARD -s 10.1.0.0/16 -o plzbr0 -m comment --comment \"ployz:plzbr0\" -j ACCEPT\n\
             -A FORWARD -o x -m comment --comment \"a b\" -j DROP\n\
             -A OTHER -j DROP\n",
        );
        assert_eq!(l.len(), 2);
        assert_eq!(
            l[0].spec,
            s(&["-s", "10.1.0.0/16", "-o", "plzbr0", "-j", "ACCEPT"])
        );
        assert_eq!(l[0].comment.as_deref(), Some("ployz:plzbr0"));
        assert_eq!(l[0].args[6], "--comment");
        assert_eq!(l[0].args[7], "ployz:plzbr0");
        assert_eq!(l[1].comment.as_deref(), Some("a b"));
    }

    #[test]
    fn bridge_rules_are_tagged_and_ordered() {
        let ipt = FakeIptables::with_chains(&["FORWARD"]);
        let cmds = converge(&[], &bridge_want("plzbr0", Some("10.101.0.0/16")), |_| {
            false
        });
        let shown: Vec<String> = cmds.iter().map(|c| c.to_string()).collect();
        assert_eq!(
            shown,
            [
                "iptables -I FORWARD -i plzbr0 -m comment --comment ployz:plzbr0 -j ACCEPT",
                "iptables -I FORWARD -s 10.101.0.0/16 -o plzbr0 -m comment --comment ployz:plzbr0 -j ACCEPT",
                "iptables -A FORWARD -o plzbr0 -m comment --comment ployz:plzbr0 -j DROP",
            ]
        );
        // Applied twice: the second run changes nothing.
        allow_bridge(&ipt, "plzbr0", Some("10.101.0.0/16")).unwrap();
        let before = ipt.rules("FORWARD");
        let n = ipt.log.lock().unwrap().len();
        allow_bridge(&ipt, "plzbr0", Some("10.101.0.0/16")).unwrap();
        assert_eq!(ipt.rules("FORWARD"), before);
        assert_eq!(ipt.log.lock().unwrap().len(), n + 1, "only a listing");
    }

    #[test]
    fn older_untagged_rules_are_replaced_and_others_left_alone() {
        let ipt = FakeIptables::with_chains(&["FORWARD"]);
        // What an older ployzd left (no source range then), and a stranger's.
        add(&ipt, "FORWARD", "-o plzbr0 -j ACCEPT");
        add(&ipt, "FORWARD", "-i plzbr0 -j ACCEPT");
        add(
            &ipt,
            "FORWARD",
            "-o plzbr0 -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT",
        );
        add(&ipt, "FORWARD", "-o plzbr01 -j ACCEPT");
        allow_bridge(&ipt, "plzbr0", Some("10.101.0.0/16")).unwrap();
        let rules = ipt.rules("FORWARD");
        assert_eq!(
            rules,
            [
                "-s 10.101.0.0/16 -o plzbr0 -m comment --comment ployz:plzbr0 -j ACCEPT",
                "-i plzbr0 -m comment --comment ployz:plzbr0 -j ACCEPT",
                "-o plzbr0 -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT",
                "-o plzbr01 -j ACCEPT",
                "-o plzbr0 -m comment --comment ployz:plzbr0 -j DROP",
            ]
        );
        // Without a source range again: the range rule and the drop go.
        allow_bridge(&ipt, "plzbr0", None).unwrap();
        assert_eq!(
            ipt.rules("FORWARD"),
            [
                "-o plzbr0 -m comment --comment ployz:plzbr0 -j ACCEPT",
                "-i plzbr0 -m comment --comment ployz:plzbr0 -j ACCEPT",
                "-o plzbr0 -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT",
                "-o plzbr01 -j ACCEPT",
            ]
        );
        remove_bridge(&ipt, "plzbr0").unwrap();
        assert_eq!(
            ipt.rules("FORWARD"),
            [
                "-o plzbr0 -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT",
                "-o plzbr01 -j ACCEPT",
            ]
        );
    }

    #[test]
    fn docker_rules_go_to_docker_user_or_forward() {
        let ipt = FakeIptables::with_chains(&["FORWARD", "DOCKER-USER"]);
        add(&ipt, "DOCKER-USER", "-d 10.101.3.0/24 -j ACCEPT"); // older, wider
        add(&ipt, "DOCKER-USER", "-d 10.9.9.0/24 -j ACCEPT"); // someone else's
        allow_subnet(&ipt, "plz0a650300", "10.101.3.0/24", Some("10.101.0.0/16")).unwrap();
        assert_eq!(
            ipt.rules("DOCKER-USER"),
            [
                "-s 10.101.0.0/16 -d 10.101.3.0/24 -m comment --comment ployz:plz0a650300 -j ACCEPT",
                "-d 10.9.9.0/24 -j ACCEPT",
                "-d 10.101.3.0/24 -m comment --comment ployz:plz0a650300 -j DROP",
            ]
        );
        assert!(ipt.rules("FORWARD").is_empty());
        remove_subnet(&ipt, "plz0a650300", "10.101.3.0/24").unwrap();
        assert_eq!(ipt.rules("DOCKER-USER"), ["-d 10.9.9.0/24 -j ACCEPT"]);

        let no_docker = FakeIptables::with_chains(&["FORWARD"]);
        allow_subnet(&no_docker, "plz0a650300", "10.101.3.0/24", None).unwrap();
        assert_eq!(
            no_docker.rules("FORWARD"),
            ["-d 10.101.3.0/24 -m comment --comment ployz:plz0a650300 -j ACCEPT"]
        );
    }

    /// dockerd 20.10 ends DOCKER-USER with `-j RETURN` (and appends it again
    /// when missing): the drop goes right before it, and one an older ployzd
    /// appended after it (never reached) is moved there.
    #[test]
    fn drops_go_before_dockers_return() {
        let ipt = FakeIptables::with_chains(&["FORWARD", "DOCKER-USER"]);
        add(&ipt, "DOCKER-USER", "-d 10.9.9.0/24 -j ACCEPT");
        add(&ipt, "DOCKER-USER", "-j RETURN");
        allow_subnet(&ipt, "plz0a650300", "10.101.3.0/24", Some("10.101.0.0/16")).unwrap();
        let want = [
            "-s 10.101.0.0/16 -d 10.101.3.0/24 -m comment --comment ployz:plz0a650300 -j ACCEPT",
            "-d 10.9.9.0/24 -j ACCEPT",
            "-d 10.101.3.0/24 -m comment --comment ployz:plz0a650300 -j DROP",
            "-j RETURN",
        ];
        assert_eq!(ipt.rules("DOCKER-USER"), want);
        // Converged: nothing more to do.
        let n = ipt.log.lock().unwrap().len();
        allow_subnet(&ipt, "plz0a650300", "10.101.3.0/24", Some("10.101.0.0/16")).unwrap();
        let log = ipt.log.lock().unwrap();
        assert!(log[n..].iter().all(|a| a[0] == "-S"), "{:?}", &log[n..]);
        drop(log);

        // What this ployzd wrote before: the drop after the RETURN.
        let stranded = FakeIptables::with_chains(&["FORWARD", "DOCKER-USER"]);
        add(
            &stranded,
            "DOCKER-USER",
            "-s 10.101.0.0/16 -d 10.101.3.0/24 -m comment --comment ployz:plz0a650300 -j ACCEPT",
        );
        add(&stranded, "DOCKER-USER", "-d 10.9.9.0/24 -j ACCEPT");
        add(&stranded, "DOCKER-USER", "-j RETURN");
        add(
            &stranded,
            "DOCKER-USER",
            "-d 10.101.3.0/24 -m comment --comment ployz:plz0a650300 -j DROP",
        );
        allow_subnet(
            &stranded,
            "plz0a650300",
            "10.101.3.0/24",
            Some("10.101.0.0/16"),
        )
        .unwrap();
        assert_eq!(stranded.rules("DOCKER-USER"), want);

        // The host runtime's bridge rules in a FORWARD that returns early.
        let fwd = FakeIptables::with_chains(&["FORWARD"]);
        add(&fwd, "FORWARD", "-j RETURN");
        allow_bridge(&fwd, "plzbr0", Some("10.101.0.0/16")).unwrap();
        assert_eq!(
            fwd.rules("FORWARD").last().map(String::as_str),
            Some("-j RETURN")
        );
    }

    #[test]
    fn remove_all_takes_every_rule_of_ours_and_nothing_else() {
        let ipt = FakeIptables::with_chains(&["FORWARD", "DOCKER-USER"]);
        allow_bridge(&ipt, "plz0a650300", Some("10.101.0.0/16")).unwrap();
        allow_subnet(&ipt, "plz0a650400", "10.101.4.0/24", None).unwrap();
        // An older ployzd's untagged bridge rules, and strangers' rules.
        add(&ipt, "FORWARD", "-i plz0a650500 -j ACCEPT");
        add(&ipt, "FORWARD", "-s 10.101.0.0/16 -o plz0a650500 -j ACCEPT");
        add(&ipt, "FORWARD", "-o plz0a650500 -j DROP");
        add(&ipt, "FORWARD", "-i docker0 -j ACCEPT");
        add(&ipt, "FORWARD", "-o plzother -j ACCEPT");
        add(&ipt, "FORWARD", "-o x -m comment --comment mine -j DROP");
        add(&ipt, "DOCKER-USER", "-j RETURN");
        let n = remove_all_with(&ipt).unwrap();
        assert_eq!(n, 3 + 1 + 3);
        assert_eq!(
            ipt.rules("FORWARD"),
            [
                "-i docker0 -j ACCEPT",
                "-o plzother -j ACCEPT",
                "-o x -m comment --comment mine -j DROP",
            ]
        );
        assert_eq!(ipt.rules("DOCKER-USER"), ["-j RETURN"]);
        assert_eq!(remove_all_with(&ipt).unwrap(), 0);
    }

    #[test]
    fn no_iptables_means_nothing_to_do() {
        struct Missing;
        impl Iptables for Missing {
            fn run(&self, _: &[String]) -> std::io::Result<Option<Ran>> {
                Ok(None)
            }
        }
        allow_bridge(&Missing, "plzbr0", Some("10.0.0.0/8")).unwrap();
        allow_subnet(&Missing, "plzbr0", "10.0.0.0/24", None).unwrap();
        remove_bridge(&Missing, "plzbr0").unwrap();
        assert_eq!(remove_all_with(&Missing).unwrap(), 0);
    }

    #[test]
    fn legacy_bridge_rules_are_told_apart() {
        let ours = [
            "-i plzbr0 -j ACCEPT",
            "-o plzbr0 -j ACCEPT",
            "-s 10.101.0.0/16 -o plzbr0 -j ACCEPT",
            "-o plzbr0 -j DROP",
        ];
        let theirs = [
            "-o plzbr0 -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT",
            "-o plzbr01 -j ACCEPT",
            "-i docker0 -o plzbr0 -j DOCKER",
            "-d 10.101.3.0/24 -j ACCEPT",
        ];
        let split = |r: &str| r.split(' ').map(String::from).collect::<Vec<_>>();
        for r in ours {
            assert!(is_legacy_bridge_rule(&split(r), "plzbr0"), "{r}");
        }
        for r in theirs {
            assert!(!is_legacy_bridge_rule(&split(r), "plzbr0"), "{r}");
        }
    }

    #[test]
    fn control_plane_is_guarded_and_rebuilt_only_when_it_changes() {
        let ipt = FakeIptables::with_chains(&["INPUT", "FORWARD"]);
        add(&ipt, "INPUT", "-i lo -j ACCEPT");
        let a: std::net::Ipv4Addr = "10.101.1.1".parse().unwrap();
        let b: std::net::Ipv4Addr = "10.101.2.1".parse().unwrap();
        guard_control_with(&ipt, &[7101, 4222], "10.101.0.0/16", &[a, b]).unwrap();
        assert_eq!(
            ipt.rules(CONTROL_CHAIN),
            [
                "-s 10.101.1.1/32 -j RETURN",
                "-s 10.101.2.1/32 -j RETURN",
                "-s 10.101.0.0/16 -j DROP"
            ]
        );
        assert_eq!(
            ipt.rules("INPUT"),
            [
                "-p tcp -m multiport --dports 7101,4222 -m comment --comment ployz:control -j PLOYZ-CONTROL",
                "-i lo -j ACCEPT"
            ]
        );
        // The same machines again: nothing is run but the listings.
        let before = ipt.log.lock().unwrap().len();
        guard_control_with(&ipt, &[7101, 4222], "10.101.0.0/16", &[a, b]).unwrap();
        let ran: Vec<Vec<String>> = ipt.log.lock().unwrap()[before..].to_vec();
        assert!(ran.iter().all(|a| a[0] == "-S"), "{ran:?}");
        // A machine leaves: its address no longer passes.
        guard_control_with(&ipt, &[7101, 4222], "10.101.0.0/16", &[a]).unwrap();
        assert_eq!(
            ipt.rules(CONTROL_CHAIN),
            ["-s 10.101.1.1/32 -j RETURN", "-s 10.101.0.0/16 -j DROP"]
        );
        // Leaving the network takes the jump and the chain away, nothing else.
        assert_eq!(remove_all_with(&ipt).unwrap(), 3);
        assert_eq!(ipt.rules("INPUT"), ["-i lo -j ACCEPT"]);
        assert!(list(&ipt, CONTROL_CHAIN).unwrap().is_none());
    }
}
