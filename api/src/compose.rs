//! Compose files as deploy input: a pure translation of a compose file into
//! one [`DeployRequest`] per service, in dependency order. No IO: the caller
//! hands in the file's text, the environment for `${VAR}` interpolation and
//! a reader for `env_file`s.
//!
//! Strict: every key ployz does not support is reported with its line
//! ([`Compose::unsupported`]); the caller refuses the file unless told to
//! ignore them. Supported: `name`, `services`, top-level `volumes`, and per
//! service `image`, `command`, `entrypoint`, `environment` (map or list),
//! `env_file`, `volumes` (named volumes, `name:/path`), `deploy.replicas`,
//! `deploy.resources.limits` (`memory`, `cpus`), `depends_on` (list, or map
//! with `condition: service_started` or `service_healthy`), `healthcheck`
//! (`test`, `interval`, `timeout`, `retries`, `start_period`, `disable`),
//! `ports` (short syntax, or long with `target`, `published`, `protocol`,
//! `host_ip`),
//! `restart` (ployz always restarts).

use crate::wire::DeployRequest;
use std::collections::{BTreeMap, HashMap};
use yaml_rust2::parser::{Event, MarkedEventReceiver, Parser};
use yaml_rust2::scanner::Marker;

/// A YAML node with the line it starts on.
#[derive(Debug, Clone)]
enum Node {
    Scalar(String, usize),
    Seq(Vec<Node>, usize),
    /// Keys in file order, each with its line.
    Map(Vec<(String, usize, Node)>, usize),
}

impl Node {
    fn line(&self) -> usize {
        match self {
            Node::Scalar(_, l) | Node::Seq(_, l) | Node::Map(_, l) => *l,
        }
    }
}

#[derive(Default)]
struct Builder {
    stack: Vec<Node>,
    /// Pending key of each open map (parallel to `stack`).
    keys: Vec<Option<(String, usize)>>,
    done: Option<Node>,
    error: Option<String>,
}

impl Builder {
    fn push_value(&mut self, v: Node) {
        match self.stack.last_mut() {
            None => self.done = Some(v),
            Some(Node::Seq(items, _)) => items.push(v),
            Some(Node::Map(entries, _)) => {
                let slot = self.keys.last_mut().expect("parallel stacks");
                match slot.take() {
                    None => match v {
                        Node::Scalar(k, l) => *slot = Some((k, l)),
                        other => {
                            self.error.get_or_insert(format!(
                                "line {}: a mapping key must be a plain value",
                                other.line()
                            ));
                        }
                    },
                    Some((k, l)) => entries.push((k, l, v)),
                }
            }
            Some(Node::Scalar(..)) => unreachable!("scalars are never open"),
        }
    }
}

impl MarkedEventReceiver for Builder {
    fn on_event(&mut self, ev: Event, mark: Marker) {
        let line = mark.line();
        match ev {
            Event::Scalar(s, ..) => self.push_value(Node::Scalar(s, line)),
            Event::SequenceStart(..) => {
                self.stack.push(Node::Seq(Vec::new(), line));
                self.keys.push(None);
            }
            Event::MappingStart(..) => {
                self.stack.push(Node::Map(Vec::new(), line));
                self.keys.push(None);
            }
            Event::SequenceEnd | Event::MappingEnd => {
                self.keys.pop();
                if let Some(n) = self.stack.pop() {
                    self.push_value(n);
                }
            }
            Event::Alias(_) => {
                self.error
                    .get_or_insert(format!("line {line}: YAML aliases are not supported"));
                self.push_value(Node::Scalar(String::new(), line));
            }
            _ => {}
        }
    }
}

/// Why a compose file cannot be deployed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ComposeError {
    #[error("{0}")]
    Invalid(String),
}

/// A key ployz does not support, with its line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unsupported {
    /// Dotted path, e.g. `services.web.build`.
    pub key: String,
    pub line: usize,
}

/// A parsed compose file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Compose {
    pub project: String,
    /// One deploy per service, dependencies first. Service names are
    /// `<project>-<service>`, volume names `<project>-<volume>`.
    pub deploys: Vec<DeployRequest>,
    pub unsupported: Vec<Unsupported>,
}

fn invalid(msg: impl Into<String>) -> ComposeError {
    ComposeError::Invalid(msg.into())
}

/// `${VAR}`, `${VAR:-default}`, `${VAR-default}`, `$VAR`, `$$`.
pub fn interpolate(
    s: &str,
    env: &dyn Fn(&str) -> Option<String>,
    line: usize,
) -> Result<String, ComposeError> {
    let mut out = String::new();
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        if c != '$' {
            out.push(c);
            continue;
        }
        match chars.peek() {
            Some('$') => {
                chars.next();
                out.push('$');
            }
            Some('{') => {
                chars.next();
                let mut body = String::new();
                let mut closed = false;
                for c in chars.by_ref() {
                    if c == '}' {
                        closed = true;
                        break;
                    }
                    body.push(c);
                }
                if !closed {
                    return Err(invalid(format!("line {line}: `${{` without `}}` in `{s}`")));
                }
                let (name, default, empty_too) = if let Some((n, d)) = body.split_once(":-") {
                    (n, Some(d), true)
                } else if let Some((n, d)) = body.split_once('-') {
                    (n, Some(d), false)
                } else {
                    (body.as_str(), None, false)
                };
                if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
                    return Err(invalid(format!(
                        "line {line}: `${{{body}}}` is not supported interpolation \
                         (use ${{VAR}}, ${{VAR:-default}} or ${{VAR-default}})"
                    )));
                }
                let v = env(name);
                let v = match (v, default) {
                    (Some(v), Some(d)) if v.is_empty() && empty_too => d.to_string(),
                    (Some(v), _) => v,
                    (None, Some(d)) => d.to_string(),
                    (None, None) => String::new(),
                };
                out.push_str(&v);
            }
            Some(c) if c.is_ascii_alphabetic() || *c == '_' => {
                let mut name = String::new();
                while let Some(c) = chars.peek() {
                    if c.is_ascii_alphanumeric() || *c == '_' {
                        name.push(*c);
                        chars.next();
                    } else {
                        break;
                    }
                }
                out.push_str(&env(&name).unwrap_or_default());
            }
            _ => out.push('$'),
        }
    }
    Ok(out)
}

/// Reads a `.env` / `env_file` text: `KEY=VALUE` lines, `#` comments,
/// optional quotes around the value.
pub fn parse_env_file(text: &str) -> Vec<(String, String)> {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(|l| {
            let l = l.strip_prefix("export ").unwrap_or(l);
            let (k, v) = l.split_once('=').unwrap_or((l, ""));
            let v = v.trim();
            let v = v
                .strip_prefix('"')
                .and_then(|v| v.strip_suffix('"'))
                .or_else(|| v.strip_prefix('\'').and_then(|v| v.strip_suffix('\'')))
                .unwrap_or(v);
            (k.trim().to_string(), v.to_string())
        })
        .collect()
}

/// Each service's deploy and its dependencies (with their lines), by name.
type Graph = BTreeMap<String, (DeployRequest, Vec<(String, usize)>)>;

struct Ctx<'a> {
    env: &'a dyn Fn(&str) -> Option<String>,
    unsupported: Vec<Unsupported>,
}

impl Ctx<'_> {
    fn flag(&mut self, key: String, line: usize) {
        self.unsupported.push(Unsupported { key, line });
    }

    fn scalar(&self, n: &Node, what: &str) -> Result<String, ComposeError> {
        match n {
            Node::Scalar(s, l) => interpolate(s, self.env, *l),
            other => Err(invalid(format!(
                "line {}: {what} must be a single value",
                other.line()
            ))),
        }
    }

    /// A string or a list of strings (`command`, `entrypoint`, `env_file`).
    fn words(&self, n: &Node, what: &str) -> Result<Vec<String>, ComposeError> {
        match n {
            Node::Scalar(..) => {
                let s = self.scalar(n, what)?;
                Ok(split_words(&s))
            }
            Node::Seq(items, _) => items.iter().map(|i| self.scalar(i, what)).collect(),
            Node::Map(_, l) => Err(invalid(format!(
                "line {l}: {what} must be a string or a list"
            ))),
        }
    }
}

/// Splits a shell-like command string at whitespace, honouring quotes.
fn split_words(s: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut quote: Option<char> = None;
    let mut any = false;
    for c in s.chars() {
        match (quote, c) {
            (Some(q), c) if c == q => quote = None,
            (Some(_), c) => cur.push(c),
            (None, '"' | '\'') => {
                quote = Some(c);
                any = true;
            }
            (None, c) if c.is_whitespace() => {
                if any || !cur.is_empty() {
                    out.push(std::mem::take(&mut cur));
                    any = false;
                }
            }
            (None, c) => cur.push(c),
        }
    }
    if any || !cur.is_empty() {
        out.push(cur);
    }
    out
}

/// Parses `text` (the compose file) for `project`. `env` answers `${VAR}`;
/// `read_env_file` reads an `env_file` path as written in the file.
pub fn parse(
    text: &str,
    project: &str,
    env: &dyn Fn(&str) -> Option<String>,
    read_env_file: &dyn Fn(&str) -> Result<String, String>,
) -> Result<Compose, ComposeError> {
    let mut b = Builder::default();
    Parser::new_from_str(text)
        .load(&mut b, false)
        .map_err(|e| invalid(format!("not valid YAML: {e}")))?;
    if let Some(e) = b.error {
        return Err(invalid(e));
    }
    let Some(Node::Map(top, _)) = b.done else {
        return Err(invalid(
            "a compose file is a mapping with a `services:` section",
        ));
    };
    let mut cx = Ctx {
        env,
        unsupported: Vec::new(),
    };
    let mut project = project.to_string();
    let mut services = None;
    let mut declared_volumes: Vec<String> = Vec::new();
    for (k, line, v) in &top {
        match k.as_str() {
            "services" => services = Some(v),
            "version" => {}
            "name" => project = cx.scalar(v, "name")?,
            "volumes" => match v {
                Node::Map(vols, _) => {
                    for (name, vline, spec) in vols {
                        declared_volumes.push(name.clone());
                        if let Node::Map(opts, _) = spec {
                            for (ok, ol, _) in opts {
                                cx.flag(format!("volumes.{name}.{ok}"), *ol);
                            }
                        } else if !matches!(spec, Node::Scalar(s, _) if s.is_empty() || s == "~" || s == "null")
                        {
                            cx.flag(format!("volumes.{name}"), *vline);
                        }
                    }
                }
                Node::Scalar(s, _) if s.is_empty() || s == "~" || s == "null" => {}
                other => {
                    return Err(invalid(format!(
                        "line {}: `volumes` must be a mapping",
                        other.line()
                    )))
                }
            },
            k if k.starts_with("x-") => {}
            _ => cx.flag(k.to_string(), *line),
        }
    }
    let Some(Node::Map(services, _)) = services else {
        return Err(invalid("the file has no `services:` mapping"));
    };
    if services.is_empty() {
        return Err(invalid("`services:` is empty"));
    }
    let mut deploys: Graph = BTreeMap::new();
    let mut order: Vec<String> = Vec::new();
    for (name, sline, spec) in services {
        let Node::Map(keys, _) = spec else {
            return Err(invalid(format!(
                "line {sline}: service `{name}` must be a mapping"
            )));
        };
        let mut d = DeployRequest {
            name: format!("{project}-{name}"),
            project: Some(project.to_string()),
            replicas: 1,
            ..Default::default()
        };
        let mut entrypoint: Option<Vec<String>> = None;
        let mut command: Option<Vec<String>> = None;
        let mut env_list: Vec<(String, String)> = Vec::new();
        let mut env_files: Vec<(String, String)> = Vec::new();
        let mut deps = Vec::new();
        let mut has_image = false;
        for (k, line, v) in keys {
            let path = format!("services.{name}.{k}");
            match k.as_str() {
                "image" => {
                    d.image = cx.scalar(v, "image")?;
                    has_image = true;
                }
                "command" => command = Some(cx.words(v, "command")?),
                "entrypoint" => entrypoint = Some(cx.words(v, "entrypoint")?),
                "environment" => match v {
                    Node::Map(kvs, _) => {
                        for (ek, _, ev) in kvs {
                            let val = match ev {
                                Node::Scalar(s, _) if s == "~" || s == "null" => {
                                    (cx.env)(ek).unwrap_or_default()
                                }
                                _ => cx.scalar(ev, "an environment value")?,
                            };
                            env_list.push((ek.clone(), val));
                        }
                    }
                    Node::Seq(items, _) => {
                        for i in items {
                            let s = cx.scalar(i, "an environment entry")?;
                            match s.split_once('=') {
                                Some((ek, ev)) => env_list.push((ek.to_string(), ev.to_string())),
                                None => {
                                    env_list.push((s.clone(), (cx.env)(&s).unwrap_or_default()))
                                }
                            }
                        }
                    }
                    Node::Scalar(_, l) => {
                        return Err(invalid(format!(
                            "line {l}: environment must be a map or a list"
                        )))
                    }
                },
                "env_file" => {
                    for f in cx.words(v, "env_file")? {
                        let text = read_env_file(&f)
                            .map_err(|e| invalid(format!("line {line}: env_file {f}: {e}")))?;
                        env_files.extend(parse_env_file(&text));
                    }
                }
                "volumes" => {
                    let Node::Seq(items, _) = v else {
                        return Err(invalid(format!("line {line}: volumes must be a list")));
                    };
                    for i in items {
                        let Node::Scalar(..) = i else {
                            cx.flag(format!("{path} (long syntax)"), i.line());
                            continue;
                        };
                        let s = cx.scalar(i, "a volume")?;
                        let parts: Vec<&str> = s.split(':').collect();
                        match parts.as_slice() {
                            [src, dst] | [src, dst, "rw"]
                                if !src.starts_with(['/', '.', '~']) && dst.starts_with('/') =>
                            {
                                if !declared_volumes.iter().any(|v| v == src) {
                                    // Checked after the top-level section is read: see below.
                                }
                                d.volumes.push(format!("{project}-{src}:{dst}"));
                            }
                            _ => cx.flag(
                                format!("{path} `{s}` (only named volumes, name:/path)"),
                                i.line(),
                            ),
                        }
                    }
                }
                "deploy" => {
                    let Node::Map(dk, _) = v else {
                        return Err(invalid(format!("line {line}: deploy must be a mapping")));
                    };
                    for (dkey, dline, dv) in dk {
                        match dkey.as_str() {
                            "replicas" => {
                                let s = cx.scalar(dv, "deploy.replicas")?;
                                d.replicas = s.parse().map_err(|_| {
                                    invalid(format!(
                                        "line {dline}: deploy.replicas `{s}` is not a number"
                                    ))
                                })?;
                            }
                            "resources" => {
                                let Node::Map(rk, _) = dv else {
                                    return Err(invalid(format!(
                                        "line {dline}: resources must be a mapping"
                                    )));
                                };
                                for (rkey, rline, rv) in rk {
                                    if rkey != "limits" {
                                        cx.flag(format!("{path}.resources.{rkey}"), *rline);
                                        continue;
                                    }
                                    let Node::Map(lk, _) = rv else {
                                        return Err(invalid(format!(
                                            "line {rline}: limits must be a mapping"
                                        )));
                                    };
                                    for (lkey, lline, lv) in lk {
                                        match lkey.as_str() {
                                            "memory" => {
                                                d.memory =
                                                    Some(memory(&cx.scalar(lv, "memory")?, *lline)?)
                                            }
                                            "cpus" => {
                                                let s = cx.scalar(lv, "cpus")?;
                                                let c: f64 = s.parse().map_err(|_| {
                                                    invalid(format!(
                                                        "line {lline}: cpus `{s}` is not a number"
                                                    ))
                                                })?;
                                                // A relative weight: 1 CPU = 1024 shares.
                                                d.cpu_shares = Some(
                                                    ((c * 1024.0).round() as u64).clamp(2, 262_144),
                                                );
                                            }
                                            _ => cx.flag(
                                                format!("{path}.resources.limits.{lkey}"),
                                                *lline,
                                            ),
                                        }
                                    }
                                }
                            }
                            _ => cx.flag(format!("{path}.{dkey}"), *dline),
                        }
                    }
                }
                "depends_on" => match v {
                    Node::Seq(items, _) => {
                        for i in items {
                            deps.push((cx.scalar(i, "depends_on")?, i.line()));
                        }
                    }
                    Node::Map(m, _) => {
                        for (dep, dl, opts) in m {
                            deps.push((dep.clone(), *dl));
                            if let Node::Map(o, _) = opts {
                                for (ok, ol, ov) in o {
                                    // Deploys wait for their instances to be
                                    // healthy (when there is a check), so
                                    // `service_healthy` is dependency order too.
                                    let fine = ok == "condition"
                                        && matches!(ov, Node::Scalar(s, _)
                                            if s == "service_started" || s == "service_healthy");
                                    if !fine {
                                        cx.flag(format!("{path}.{dep}.{ok}"), *ol);
                                    }
                                }
                            }
                        }
                    }
                    Node::Scalar(_, l) => {
                        return Err(invalid(format!(
                            "line {l}: depends_on must be a list or a map"
                        )))
                    }
                },
                "restart" => {
                    let s = cx.scalar(v, "restart")?;
                    if !matches!(s.as_str(), "always" | "unless-stopped" | "on-failure") {
                        cx.flag(format!("{path} `{s}` (ployz always restarts)"), *line);
                    }
                }
                "healthcheck" => healthcheck(&mut cx, &mut d, v, &path, *line)?,
                "ports" => ports(&mut cx, &mut d, v, &path)?,
                "container_name" | "hostname" => cx.flag(path, *line),
                _ => cx.flag(path, *line),
            }
        }
        if !has_image {
            return Err(invalid(format!(
                "line {sline}: service `{name}` has no `image:` (ployz does not build images)"
            )));
        }
        d.command = match (entrypoint, command) {
            (Some(mut e), Some(c)) => {
                e.extend(c);
                e
            }
            (Some(e), None) => e,
            (None, Some(c)) => c,
            (None, None) => Vec::new(),
        };
        // env_file first, `environment` overrides it (as compose does).
        let mut env: Vec<(String, String)> = Vec::new();
        for (k, v) in env_files.into_iter().chain(env_list) {
            env.retain(|(ek, _)| ek != &k);
            env.push((k, v));
        }
        d.env = env.into_iter().map(|(k, v)| format!("{k}={v}")).collect();
        for v in &d.volumes {
            let src = v
                .strip_prefix(&format!("{project}-"))
                .and_then(|v| v.split(':').next())
                .unwrap_or_default();
            if !declared_volumes.iter().any(|d| d == src) {
                return Err(invalid(format!(
                    "service `{name}` uses volume `{src}`, which the top-level `volumes:` does not declare"
                )));
            }
        }
        order.push(name.clone());
        deploys.insert(name.clone(), (d, deps));
    }
    // Dependencies first; ties keep file order.
    let mut out = Vec::new();
    let mut state: HashMap<String, u8> = HashMap::new(); // 1 visiting, 2 done
    fn visit(
        n: &str,
        deploys: &Graph,
        state: &mut HashMap<String, u8>,
        out: &mut Vec<DeployRequest>,
    ) -> Result<(), ComposeError> {
        match state.get(n) {
            Some(2) => return Ok(()),
            Some(_) => return Err(invalid(format!("depends_on has a cycle through `{n}`"))),
            None => {}
        }
        state.insert(n.to_string(), 1);
        let (d, deps) = &deploys[n];
        for (dep, line) in deps {
            if !deploys.contains_key(dep) {
                return Err(invalid(format!(
                    "line {line}: `{n}` depends on `{dep}`, which is not a service of the file"
                )));
            }
            visit(dep, deploys, state, out)?;
        }
        state.insert(n.to_string(), 2);
        out.push(d.clone());
        Ok(())
    }
    for n in &order {
        visit(n, &deploys, &mut state, &mut out)?;
    }
    let mut unsupported = cx.unsupported;
    unsupported.sort_by_key(|u| u.line);
    Ok(Compose {
        project,
        deploys: out,
        unsupported,
    })
}

/// A compose `ports:` list as `--publish` specs: short syntax
/// (`[IP:]HOST:CONTAINER[/PROTO]`) or long (`target`, `published`,
/// `protocol`, `host_ip`; `mode: ingress` is what ployz does anyway).
fn ports(
    cx: &mut Ctx<'_>,
    d: &mut DeployRequest,
    v: &Node,
    path: &str,
) -> Result<(), ComposeError> {
    let Node::Seq(items, _) = v else {
        return Err(invalid(format!("line {}: ports must be a list", v.line())));
    };
    for item in items {
        let l = item.line();
        let spec = match item {
            Node::Scalar(..) => cx.scalar(item, "ports")?,
            Node::Map(kvs, _) => {
                let (mut target, mut published, mut proto, mut ip) = (None, None, None, None);
                for (k, kl, kv) in kvs {
                    let val = || cx.scalar(kv, &format!("ports.{k}"));
                    match k.as_str() {
                        "target" => target = Some(val()?),
                        "published" => published = Some(val()?),
                        "protocol" => proto = Some(val()?),
                        "host_ip" => ip = Some(val()?),
                        "mode" if val()? == "ingress" => {}
                        _ => cx.flag(format!("{path}.{k}"), *kl),
                    }
                }
                let (Some(t), Some(p)) = (target, published) else {
                    return Err(invalid(format!(
                        "line {l}: a port needs `target:` and `published:` (ployz does not pick host ports)"
                    )));
                };
                let mut s = format!("{p}:{t}");
                if let Some(ip) = ip {
                    s = format!("{ip}:{s}");
                }
                if let Some(proto) = proto {
                    s = format!("{s}/{proto}");
                }
                s
            }
            Node::Seq(..) => {
                return Err(invalid(format!(
                    "line {l}: a port must be `HOST:CONTAINER` or a mapping"
                )))
            }
        };
        crate::ports::parse_publish(&spec).map_err(|e| invalid(format!("line {l}: {e}")))?;
        d.publish.push(spec);
    }
    Ok(())
}

/// A compose `healthcheck:` as the deploy's health fields. `test` is
/// `["CMD", args…]` (run as a shell command with each argument quoted),
/// `["CMD-SHELL", "command"]` or a string (a shell command), or `["NONE"]`
/// (no check, as `disable: true`). Durations are passed on as written
/// (`10s`, `1m30s`); the daemon checks them.
fn healthcheck(
    cx: &mut Ctx,
    d: &mut DeployRequest,
    v: &Node,
    path: &str,
    line: usize,
) -> Result<(), ComposeError> {
    let Node::Map(keys, _) = v else {
        return Err(invalid(format!(
            "line {}: healthcheck must be a mapping",
            v.line()
        )));
    };
    let mut disabled = false;
    let mut test: Option<(String, usize)> = None;
    for (k, kl, kv) in keys {
        match k.as_str() {
            "test" => {
                let cmd = match kv {
                    Node::Scalar(..) => Some(cx.scalar(kv, "healthcheck.test")?),
                    Node::Seq(items, _) => {
                        let words: Vec<String> = items
                            .iter()
                            .map(|i| cx.scalar(i, "healthcheck.test"))
                            .collect::<Result<_, _>>()?;
                        match words.split_first() {
                            Some((kind, rest)) if kind == "NONE" && rest.is_empty() => None,
                            Some((kind, [cmd])) if kind == "CMD-SHELL" => Some(cmd.clone()),
                            Some((kind, rest)) if kind == "CMD" && !rest.is_empty() => Some(
                                rest.iter()
                                    .map(|w| shell_quote(w))
                                    .collect::<Vec<_>>()
                                    .join(" "),
                            ),
                            _ => {
                                return Err(invalid(format!(
                                "line {kl}: healthcheck.test must be [\"CMD\", program, args…], \
                                     [\"CMD-SHELL\", \"command\"], [\"NONE\"] or a command string"
                            )))
                            }
                        }
                    }
                    Node::Map(..) => {
                        return Err(invalid(format!(
                            "line {kl}: healthcheck.test must be a list or a string"
                        )))
                    }
                };
                match cmd {
                    Some(c) => test = Some((c, *kl)),
                    None => disabled = true,
                }
            }
            "disable" => {
                let s = cx.scalar(kv, "healthcheck.disable")?;
                match s.as_str() {
                    "true" => disabled = true,
                    "false" => {}
                    _ => {
                        return Err(invalid(format!(
                            "line {kl}: healthcheck.disable `{s}` must be true or false"
                        )))
                    }
                }
            }
            "interval" => d.health_interval = Some(cx.scalar(kv, "healthcheck.interval")?),
            "timeout" => d.health_timeout = Some(cx.scalar(kv, "healthcheck.timeout")?),
            "start_period" => {
                d.health_start_period = Some(cx.scalar(kv, "healthcheck.start_period")?)
            }
            "retries" => {
                let s = cx.scalar(kv, "healthcheck.retries")?;
                d.health_retries = Some(s.parse().map_err(|_| {
                    invalid(format!(
                        "line {kl}: healthcheck.retries `{s}` is not a number"
                    ))
                })?);
            }
            _ => cx.flag(format!("{path}.{k}"), *kl),
        }
    }
    if disabled {
        d.health_interval = None;
        d.health_timeout = None;
        d.health_start_period = None;
        d.health_retries = None;
        return Ok(());
    }
    match test {
        Some((cmd, _)) => d.health_cmd = Some(cmd),
        None => {
            return Err(invalid(format!(
                "line {line}: healthcheck has no `test:` (ployz has no image health checks to inherit): \
                 add one, or `disable: true`"
            )))
        }
    }
    Ok(())
}

/// `w` as one word for `/bin/sh -c`: as is when it has only safe characters,
/// otherwise single-quoted.
fn shell_quote(w: &str) -> String {
    let safe = !w.is_empty()
        && w.chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_./:=@%+,".contains(c));
    if safe {
        w.to_string()
    } else {
        format!("'{}'", w.replace('\'', "'\\''"))
    }
}

/// Compose memory (`64m`, `1g`, `512mb`, bytes) as ployz's `--memory`.
fn memory(s: &str, line: usize) -> Result<String, ComposeError> {
    let t = s.trim().to_ascii_uppercase();
    let t = t
        .strip_suffix('B')
        .filter(|t| !t.is_empty() && t.ends_with(['K', 'M', 'G']))
        .unwrap_or(&t);
    let (num, unit) = match t.char_indices().last() {
        Some((i, u @ ('K' | 'M' | 'G'))) => (&t[..i], Some(u)),
        _ => (t, None),
    };
    if num.is_empty() || !num.bytes().all(|b| b.is_ascii_digit()) {
        return Err(invalid(format!(
            "line {line}: memory `{s}` is not a size (e.g. 64m, 1g)"
        )));
    }
    Ok(match unit {
        Some(u) => format!("{num}{u}"),
        None => num.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(k: &str) -> Option<String> {
        match k {
            "TAG" => Some("1.2".into()),
            "EMPTY" => Some(String::new()),
            _ => None,
        }
    }

    fn no_files(_: &str) -> Result<String, String> {
        Err("no files in this test".into())
    }

    #[test]
    fn interpolation() {
        let i = |s: &str| interpolate(s, &env, 1).unwrap();
        assert_eq!(i("app:${TAG}"), "app:1.2");
        assert_eq!(i("${NOPE:-d}"), "d");
        assert_eq!(i("${EMPTY:-d}"), "d");
        assert_eq!(i("${EMPTY-d}"), "");
        assert_eq!(i("${NOPE-d}"), "d");
        assert_eq!(i("$TAG/x"), "1.2/x");
        assert_eq!(i("$$HOME"), "$HOME");
        assert!(interpolate("${TAG", &env, 3).is_err());
        assert!(interpolate("${A?err}", &env, 3).is_err());
    }

    const TWO: &str = "\
services:
  web:
    image: reg.example:5000/web:${TAG}
    command: [\"httpd\", \"-f\", \"-p\", \"8080\"]
    environment:
      GREETING: hi
      FROM_ENV: ${NOPE:-fallback}
    volumes:
      - data:/www
    deploy:
      replicas: 2
      resources:
        limits:
          memory: 64m
          cpus: '0.5'
    depends_on:
      - db
    restart: always
  db:
    image: busybox
    entrypoint: sh -c
    command: \"'sleep 1000'\"
    environment:
      - A=1
      - TAG
    env_file: db.env
volumes:
  data: {}
";

    #[test]
    fn two_services_in_dependency_order() {
        let read = |p: &str| {
            assert_eq!(p, "db.env");
            Ok("# comment\nB=2\nA=0\n".to_string())
        };
        let c = parse(TWO, "proj", &env, &read).unwrap();
        assert!(c.unsupported.is_empty(), "{:?}", c.unsupported);
        let names: Vec<&str> = c.deploys.iter().map(|d| d.name.as_str()).collect();
        assert_eq!(names, ["proj-db", "proj-web"]);
        let db = &c.deploys[0];
        assert_eq!(db.command, ["sh", "-c", "sleep 1000"]);
        assert_eq!(db.env, ["B=2", "A=1", "TAG=1.2"]);
        let web = &c.deploys[1];
        assert_eq!(web.image, "reg.example:5000/web:1.2");
        assert_eq!(web.replicas, 2);
        assert_eq!(web.env, ["GREETING=hi", "FROM_ENV=fallback"]);
        assert_eq!(web.volumes, ["proj-data:/www"]);
        assert_eq!(web.memory.as_deref(), Some("64M"));
        assert_eq!(web.cpu_shares, Some(512));
        assert_eq!(web.command, ["httpd", "-f", "-p", "8080"]);
    }

    #[test]
    fn unsupported_keys_with_their_lines() {
        let text = "\
services:
  app:
    build: .
    image: x
    privileged: true
    volumes:
      - /etc:/etc
    deploy:
      placement: {}
networks:
  n: {}
";
        let c = parse(text, "p", &env, &no_files).unwrap();
        let got: Vec<(String, usize)> = c
            .unsupported
            .iter()
            .map(|u| (u.key.clone(), u.line))
            .collect();
        assert_eq!(got[0], ("services.app.build".to_string(), 3));
        assert_eq!(got[1], ("services.app.privileged".to_string(), 5));
        assert_eq!(got[2].1, 7);
        assert!(got[2].0.starts_with("services.app.volumes `/etc:/etc`"));
        assert_eq!(got[3], ("services.app.deploy.placement".to_string(), 9));
        assert_eq!(got[4], ("networks".to_string(), 10));
    }

    #[test]
    fn refuses_what_cannot_be_deployed() {
        let e = |t: &str| parse(t, "p", &env, &no_files).unwrap_err().to_string();
        assert!(e("services:\n  a:\n    build: .\n").contains("no `image:`"));
        assert!(e("services:\n  a:\n    image: x\n    depends_on: [b]\n").contains("`b`"));
        assert!(e("services:\n  a:\n    image: x\n    depends_on: [b]\n  b:\n    image: y\n    depends_on: [a]\n")
            .contains("cycle"));
        assert!(
            e("services:\n  a:\n    image: x\n    volumes: [v:/d]\n").contains("does not declare")
        );
        assert!(e("services: [\n").contains("YAML"));
        assert!(e("x: 1\n").contains("services"));
    }

    #[test]
    fn healthchecks() {
        let hc = |body: &str| {
            let t = format!("services:\n  a:\n    image: x\n    healthcheck:\n{body}");
            parse(&t, "p", &env, &no_files).map(|c| (c.deploys[0].clone(), c.unsupported))
        };
        let (d, u) = hc("      test: [\"CMD\", \"wget\", \"-q\", \"-O-\", \"http://localhost/it's ok\"]\n      interval: 1m30s\n      timeout: 5s\n      retries: 4\n      start_period: 500ms\n").unwrap();
        assert!(u.is_empty(), "{u:?}");
        assert_eq!(
            d.health_cmd.as_deref(),
            Some("wget -q -O- 'http://localhost/it'\\''s ok'")
        );
        assert_eq!(d.health_interval.as_deref(), Some("1m30s"));
        assert_eq!(d.health_timeout.as_deref(), Some("5s"));
        assert_eq!(d.health_retries, Some(4));
        assert_eq!(d.health_start_period.as_deref(), Some("500ms"));
        assert_eq!((d.health_http, d.health_tcp), (None, None));

        let cmd = |body: &str| hc(body).unwrap().0.health_cmd;
        assert_eq!(
            cmd("      test: [\"CMD-SHELL\", \"test -e /tmp/ready || exit 1\"]\n").as_deref(),
            Some("test -e /tmp/ready || exit 1")
        );
        assert_eq!(
            cmd("      test: test -e /tmp/${TAG}\n").as_deref(),
            Some("test -e /tmp/1.2")
        );
        let (d, _) = hc("      test: [\"NONE\"]\n      interval: 3s\n").unwrap();
        assert_eq!((d.health_cmd, d.health_interval), (None, None));
        let (d, _) = hc("      test: [\"CMD\", \"true\"]\n      disable: true\n").unwrap();
        assert_eq!((d.health_cmd, d.health_retries), (None, None));

        let err = |body: &str| hc(body).unwrap_err().to_string();
        assert!(err("      interval: 3s\n").contains("line 4: healthcheck has no `test:`"));
        assert!(err("      test: [\"CMD\"]\n").contains("line 5: healthcheck.test must be"));
        assert!(err("      test: [\"CMD-SHELL\", \"a\", \"b\"]\n").contains("healthcheck.test"));
        assert!(
            err("      test: [\"CMD\", \"true\"]\n      retries: many\n")
                .contains("`many` is not a number")
        );
        let (_, u) = hc("      test: [\"CMD\", \"true\"]\n      start_interval: 1s\n").unwrap();
        assert_eq!(u[0].key, "services.a.healthcheck.start_interval");
        assert_eq!(u[0].line, 6);
    }

    #[test]
    fn depends_on_service_healthy_and_ports() {
        let t = "\
services:
  web:
    image: x
    ports:
      - \"8080:80\"
      - target: 53
        published: 5353
        protocol: udp
        host_ip: 127.0.0.1
    depends_on:
      db:
        condition: service_healthy
  db:
    image: y
    healthcheck:
      test: [\"CMD-SHELL\", \"true\"]
";
        let c = parse(t, "p", &env, &no_files).unwrap();
        let names: Vec<&str> = c.deploys.iter().map(|d| d.name.as_str()).collect();
        assert_eq!(names, ["p-db", "p-web"]);
        let got: Vec<(String, usize)> = c
            .unsupported
            .iter()
            .map(|u| (u.key.clone(), u.line))
            .collect();
        assert!(got.is_empty(), "{got:?}");
        assert_eq!(c.deploys[1].publish, ["8080:80", "127.0.0.1:5353:53/udp"]);
        let t = t.replace("service_healthy", "service_completed_successfully");
        let c = parse(&t, "p", &env, &no_files).unwrap();
        assert_eq!(c.unsupported[0].key, "services.web.depends_on.db.condition");
        let bad = t.replace("\"8080:80\"", "\"80\"");
        assert!(parse(&bad, "p", &env, &no_files)
            .unwrap_err()
            .to_string()
            .contains("line 5: --publish `80`"));
    }

    #[test]
    fn memory_sizes() {
        assert_eq!(memory("64m", 1).unwrap(), "64M");
        assert_eq!(memory("1GB", 1).unwrap(), "1G");
        assert_eq!(memory("1048576", 1).unwrap(), "1048576");
        assert!(memory("lots", 1).is_err());
    }
}
