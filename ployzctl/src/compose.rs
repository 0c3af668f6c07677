//! `deploy -f compose.yaml` and `deploy rm -f compose.yaml`: read the file
//! (and `.env`, `env_file`s) here, translate it with `ployz_api::compose`,
//! then send one `deploy service` per service in dependency order.

use crate::{client, exit, output};
use ployz_api::compose::{self, Compose};
use ployz_api::{ApiError, ErrorCode, Request, Response};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

pub struct ComposeOpts {
    pub file: PathBuf,
    pub project: Option<String>,
    pub ignore_unsupported: bool,
    pub wait_secs: u64,
}

fn fail(e: ApiError, json: bool) -> i32 {
    output::print_error(&e, json);
    e.code.exit_code()
}

fn invalid(msg: String) -> ApiError {
    ApiError::new(ErrorCode::InvalidArgument, msg)
}

/// The project name as docker compose derives it: the file's directory
/// name, lowercased, keeping `a-z0-9-` (`_` becomes `-`: ployz names).
fn default_project(dir: &Path) -> String {
    let name = dir
        .file_name()
        .map(|n| n.to_string_lossy().to_lowercase())
        .unwrap_or_default();
    let p: String = name
        .chars()
        .map(|c| if c == '_' { '-' } else { c })
        .filter(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '-')
        .collect();
    let p = p.trim_matches('-').to_string();
    if p.is_empty() {
        "default".into()
    } else {
        p
    }
}

/// Reads and translates the file. `strict_env`: `env_file`s must exist.
fn load(opts: &ComposeOpts, strict_env: bool) -> Result<Compose, ApiError> {
    let text = std::fs::read_to_string(&opts.file)
        .map_err(|e| invalid(format!("cannot read {}: {e}", opts.file.display())))?;
    let file = std::fs::canonicalize(&opts.file).unwrap_or_else(|_| opts.file.clone());
    let dir = file.parent().map(Path::to_path_buf).unwrap_or_default();
    // `.env` next to the file; the process environment wins (as compose).
    let mut dotenv: HashMap<String, String> = HashMap::new();
    if let Ok(t) = std::fs::read_to_string(dir.join(".env")) {
        dotenv.extend(compose::parse_env_file(&t));
    }
    let env = |k: &str| std::env::var(k).ok().or_else(|| dotenv.get(k).cloned());
    let read = |p: &str| {
        if !strict_env {
            return Ok(String::new());
        }
        std::fs::read_to_string(dir.join(p)).map_err(|e| e.to_string())
    };
    let project = opts
        .project
        .clone()
        .unwrap_or_else(|| default_project(&dir));
    let mut c = compose::parse(&text, &project, &env, &read)
        .map_err(|e| invalid(format!("{}: {e}", opts.file.display())))?;
    // Image paths in the file are relative to its directory.
    for d in &mut c.deploys {
        if d.image.starts_with("./") || d.image.starts_with("../") {
            let p = dir.join(&d.image);
            d.image = std::fs::canonicalize(&p).unwrap_or(p).display().to_string();
        }
    }
    Ok(c)
}

pub fn deploy(socket: &Path, opts: &ComposeOpts, json: bool) -> i32 {
    let c = match load(opts, true) {
        Ok(c) => c,
        Err(e) => return fail(e, json),
    };
    if !c.unsupported.is_empty() {
        let list: Vec<String> = c
            .unsupported
            .iter()
            .map(|u| format!("line {}: {}", u.line, u.key))
            .collect();
        if opts.ignore_unsupported {
            for l in &list {
                eprintln!(
                    "warning: {}: unsupported, ignored: {l}",
                    opts.file.display()
                );
            }
        } else {
            return fail(
                invalid(format!(
                    "{} uses keys ployz does not support; nothing was deployed:\n  {}",
                    opts.file.display(),
                    list.join("\n  ")
                ))
                .with_hint("remove them, or deploy anyway with --ignore-unsupported"),
                json,
            );
        }
    }
    for mut d in c.deploys {
        d.wait_secs = Some(opts.wait_secs);
        let name = d.name.clone();
        match client::call(socket, &Request::ServiceDeploy(Box::new(d))) {
            Ok(Ok(resp)) => {
                output::print_response(&resp, json);
                if output::has_failures(&resp) {
                    eprintln!(
                        "error: {name} did not come up; the services after it were not deployed"
                    );
                    return exit::PARTIAL;
                }
            }
            Ok(Err(e)) => {
                eprintln!(
                    "error: deploying {name} failed; the services after it were not deployed"
                );
                return fail(e, json);
            }
            Err(e) => {
                output::print_client_error(&e, json);
                return e.exit_code();
            }
        }
    }
    exit::OK
}

/// `deploy rm`: the file's services (dependents first), or with only
/// `--project` every service recorded in that project.
pub fn rm(socket: &Path, file: Option<&Path>, project: Option<String>, json: bool) -> i32 {
    let names: Vec<String> = match file {
        Some(f) => {
            let opts = ComposeOpts {
                file: f.to_path_buf(),
                project,
                ignore_unsupported: true,
                wait_secs: 0,
            };
            match load(&opts, false) {
                Ok(c) => c.deploys.into_iter().rev().map(|d| d.name).collect(),
                Err(e) => return fail(e, json),
            }
        }
        None => {
            let Some(p) = project else {
                return fail(
                    invalid("deploy rm needs -f FILE or --project NAME".into()),
                    json,
                );
            };
            match client::call(socket, &Request::ServiceList) {
                // Every service recorded in the project.
                Ok(Ok(Response::Services(l))) => l
                    .services
                    .into_iter()
                    .filter(|s| s.project.as_deref() == Some(p.as_str()))
                    .map(|s| s.name)
                    .collect(),
                Ok(Ok(_)) => return exit::INTERNAL,
                Ok(Err(e)) => return fail(e, json),
                Err(e) => {
                    output::print_client_error(&e, json);
                    return e.exit_code();
                }
            }
        }
    };
    let mut code = exit::OK;
    for name in names {
        match client::call(socket, &Request::ServiceRm { name: name.clone() }) {
            Ok(Ok(resp)) => output::print_response(&resp, json),
            // Already gone: nothing to do for this one.
            Ok(Err(e)) if e.code == ErrorCode::NotFound => {}
            Ok(Err(e)) => code = fail(e, json),
            Err(e) => {
                output::print_client_error(&e, json);
                return e.exit_code();
            }
        }
    }
    code
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn project_names_follow_the_directory() {
        assert_eq!(default_project(Path::new("/srv/My_App")), "my-app");
        assert_eq!(default_project(Path::new("/")), "default");
    }
}
