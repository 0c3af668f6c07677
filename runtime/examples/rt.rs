//! Create, start, wait for and delete containers from an OCI bundle with the
//! host runtime. Used by `runtime/bench/create-start-delete.sh`.
//!
//! usage: rt <state-root> <container-id> <bundle-dir>
//!   one container; exits with its exit code (a process per container, like
//!   a runtime CLI).
//! usage: rt serve <state-root> <bundle-dir>
//!   one engine for many containers, like ployzd: reads a container id per
//!   line on stdin and answers `ok <exit code>` or `error <message>` per line
//!   once that container has been created, started, waited for and deleted.
//!
//! With `RT_TIMING` set, prints the milliseconds each phase took to stderr.
//! With `RT_HELPER` set, creates through the single-threaded helper process
//! (the zygote) like ployzd's `HostRuntime` does (this program has one thread
//! and does not need it).

use ployz_runtime::host::HostEngine;
use std::io::{BufRead, Write};
use std::path::Path;
use std::process::ExitCode;
use std::time::Instant;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().collect();
    match args.as_slice() {
        [_, serve, root, bundle] if serve == "serve" => match engine(root) {
            Ok(mut engine) => serve_lines(&mut engine, Path::new(bundle)),
            Err(e) => {
                eprintln!("rt: {e}");
                ExitCode::FAILURE
            }
        },
        [_, root, id, bundle] => {
            match engine(root).and_then(|mut engine| run(&mut engine, id, Path::new(bundle))) {
                Ok(code) => ExitCode::from(code as u8),
                Err(e) => {
                    eprintln!("rt: {e}");
                    ExitCode::FAILURE
                }
            }
        }
        _ => {
            eprintln!("usage: rt <state-root> <container-id> <bundle-dir>\n       rt serve <state-root> <bundle-dir>");
            ExitCode::from(2)
        }
    }
}

fn engine(root: &str) -> Result<HostEngine, ployz_runtime::RuntimeError> {
    let engine = HostEngine::new(root)?;
    Ok(if std::env::var_os("RT_HELPER").is_some() {
        engine.with_create_helper()
    } else {
        engine
    })
}

fn serve_lines(engine: &mut HostEngine, bundle: &Path) -> ExitCode {
    let mut out = std::io::stdout().lock();
    for line in std::io::stdin().lock().lines() {
        let Ok(id) = line else { break };
        let answer = match run(engine, id.trim(), bundle) {
            Ok(code) => format!("ok {code}"),
            Err(e) => format!("error {e}"),
        };
        if writeln!(out, "{answer}")
            .and_then(|()| out.flush())
            .is_err()
        {
            break;
        }
    }
    ExitCode::SUCCESS
}

fn run(
    engine: &mut HostEngine,
    id: &str,
    bundle: &Path,
) -> Result<i64, ployz_runtime::RuntimeError> {
    // Single-threaded program: safe to drive libcontainer directly.
    let mut marks = vec![("begin", Instant::now())];
    engine.create_from_bundle(id, bundle)?;
    marks.push(("create", Instant::now()));
    engine.start(id)?;
    marks.push(("start", Instant::now()));
    let code = engine.wait(id)?.unwrap_or(0);
    marks.push(("wait", Instant::now()));
    engine.delete(id)?;
    marks.push(("delete", Instant::now()));
    if std::env::var_os("RT_TIMING").is_some() {
        let phases: Vec<String> = marks
            .windows(2)
            .map(|w| format!("{} {:.2}", w[1].0, (w[1].1 - w[0].1).as_secs_f64() * 1e3))
            .collect();
        eprintln!("{} ms", phases.join(", "));
    }
    Ok(code)
}
