//! The `git` install source: build `ployzd` and `ployzctl` from a git ref on
//! the initiating machine, with cargo, for the target's architecture; the
//! results are uploaded like release binaries.
//!
//! Steps: `git clone URL DIR`, `git -C DIR checkout --detach REF`, then
//! `cargo build --release --locked --target TRIPLE --bin ployzd --bin ployzctl`.
//! TRIPLE is the first of the target's triples whose rust target is
//! installed here (`rustup target add x86_64-unknown-linux-musl` gives static
//! binaries that run on any distribution); a glibc (`-gnu`) build only when
//! the architectures match and the target runs glibc (it must not be older
//! than ours). `cargo_target_dir` keeps builds incremental across runs.

use std::path::{Path, PathBuf};
use std::process::Command;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GitSource {
    pub url: String,
    /// Branch, tag or commit.
    pub reference: String,
    /// Build cache; `None`: a temporary directory per build.
    pub cargo_target_dir: Option<PathBuf>,
}

#[derive(Debug, thiserror::Error)]
pub enum GitBuildError {
    #[error("cannot run `{program}`: {source}; install it on the initiating machine")]
    Spawn {
        program: String,
        source: std::io::Error,
    },
    #[error("`{command}` failed ({status}):\n{output}")]
    Failed {
        command: String,
        status: String,
        output: String,
    },
    #[error("no rust target to build for {wanted} here; run `rustup target add {first}` on the initiating machine")]
    NoRustTarget { wanted: String, first: String },
    #[error("cannot prepare a build directory: {0}")]
    Io(#[from] std::io::Error),
}

/// A built pair of binaries.
#[derive(Debug, Clone)]
pub struct Built {
    pub triple: String,
    pub ployzd: PathBuf,
    pub ployzctl: PathBuf,
    /// Kept alive so the binaries stay on disk.
    _work: Option<std::sync::Arc<tempfile::TempDir>>,
}

/// Pick the triple to build: the first `wanted` one installed here.
pub fn choose_triple(wanted: &[String], installed: &[String], host: &str) -> Option<String> {
    wanted
        .iter()
        .find(|t| *t == host || installed.iter().any(|i| i == *t))
        .cloned()
}

/// The commands a build runs (for documentation and tests).
pub fn build_commands(src: &GitSource, dir: &Path, triple: &str) -> Vec<Vec<String>> {
    let d = dir.display().to_string();
    vec![
        vec![
            "git".into(),
            "clone".into(),
            "--quiet".into(),
            src.url.clone(),
            d.clone(),
        ],
        vec![
            "git".into(),
            "-C".into(),
            d.clone(),
            "checkout".into(),
            "--quiet".into(),
            "--detach".into(),
            src.reference.clone(),
        ],
        vec![
            "cargo".into(),
            "build".into(),
            "--release".into(),
            "--locked".into(),
            "--manifest-path".into(),
            format!("{d}/Cargo.toml"),
            "--target".into(),
            triple.into(),
            "--bin".into(),
            "ployzd".into(),
            "--bin".into(),
            "ployzctl".into(),
        ],
    ]
}

fn run(argv: &[String], target_dir: Option<&Path>) -> Result<String, GitBuildError> {
    let mut c = Command::new(&argv[0]);
    c.args(&argv[1..]);
    if let Some(t) = target_dir {
        c.env("CARGO_TARGET_DIR", t);
    }
    let out = c.output().map_err(|source| GitBuildError::Spawn {
        program: argv[0].clone(),
        source,
    })?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    if !out.status.success() {
        let tail: Vec<&str> = text.lines().rev().take(40).collect();
        return Err(GitBuildError::Failed {
            command: argv.join(" "),
            status: out.status.to_string(),
            output: tail.into_iter().rev().collect::<Vec<_>>().join("\n"),
        });
    }
    Ok(text)
}

/// Clone, check out and build (blocking: call from `spawn_blocking`).
pub fn build(src: &GitSource, wanted_triples: &[String]) -> Result<Built, GitBuildError> {
    let installed: Vec<String> = run(
        &[
            "rustup".into(),
            "target".into(),
            "list".into(),
            "--installed".into(),
        ],
        None,
    )
    .map(|s| s.lines().map(|l| l.trim().to_string()).collect())
    .unwrap_or_default();
    let host = crate::release::host_triple();
    let triple = choose_triple(wanted_triples, &installed, &host).ok_or_else(|| {
        GitBuildError::NoRustTarget {
            wanted: wanted_triples.join(" or "),
            first: wanted_triples.first().cloned().unwrap_or_default(),
        }
    })?;
    let work = std::sync::Arc::new(tempfile::Builder::new().prefix("ployz-git-").tempdir()?);
    let checkout = work.path().join("src");
    let target_dir = src
        .cargo_target_dir
        .clone()
        .unwrap_or_else(|| work.path().join("target"));
    for argv in build_commands(src, &checkout, &triple) {
        run(&argv, Some(&target_dir))?;
    }
    let out = target_dir.join(&triple).join("release");
    Ok(Built {
        ployzd: out.join("ployzd"),
        ployzctl: out.join("ployzctl"),
        triple,
        _work: Some(work),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn triple_choice_prefers_installed_musl() {
        let wanted = vec![
            "x86_64-unknown-linux-musl".to_string(),
            "x86_64-unknown-linux-gnu".to_string(),
        ];
        let host = "x86_64-unknown-linux-gnu";
        assert_eq!(
            choose_triple(&wanted, &["x86_64-unknown-linux-musl".into()], host).as_deref(),
            Some("x86_64-unknown-linux-musl")
        );
        assert_eq!(choose_triple(&wanted, &[], host).as_deref(), Some(host));
        let arm = vec!["aarch64-unknown-linux-musl".to_string()];
        assert_eq!(choose_triple(&arm, &[], host), None);
    }

    #[test]
    fn commands_build_both_binaries_at_the_ref() {
        let src = GitSource {
            url: "https://example.com/ployz.git".into(),
            reference: "v0.4.2".into(),
            cargo_target_dir: None,
        };
        let c = build_commands(&src, Path::new("/w/src"), "x86_64-unknown-linux-musl");
        assert_eq!(c[0][3], "https://example.com/ployz.git");
        assert_eq!(c[1].last().unwrap(), "v0.4.2");
        let cargo = c[2].join(" ");
        assert!(cargo.contains("--target x86_64-unknown-linux-musl --bin ployzd --bin ployzctl"));
        assert!(cargo.contains("--locked"));
    }
}
