//! Create, start, wait for and delete one container from an OCI bundle with
//! the host runtime; exits with the container's exit code. Used by
//! `runtime/bench/create-start-delete.sh`.
//!
//! usage: rt <state-root> <container-id> <bundle-dir>
//! With `RT_TIMING` set, prints the milliseconds each phase took to stderr.
//! With `RT_HELPER` set, creates through the single-threaded helper process
//! like ployzd's `HostRuntime` does (this program has one thread and does
//! not need it).

use ployz_runtime::host::HostEngine;
use std::path::Path;
use std::process::ExitCode;
use std::time::Instant;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().collect();
    let [_, root, id, bundle] = args.as_slice() else {
        eprintln!("usage: rt <state-root> <container-id> <bundle-dir>");
        return ExitCode::from(2);
    };
    match run(root, id, Path::new(bundle)) {
        Ok(code) => ExitCode::from(code as u8),
        Err(e) => {
            eprintln!("rt: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run(root: &str, id: &str, bundle: &Path) -> Result<i64, ployz_runtime::RuntimeError> {
    // Single-threaded program: safe to drive libcontainer directly.
    let mut marks = vec![("start", Instant::now())];
    let mut engine = HostEngine::new(root)?;
    if std::env::var_os("RT_HELPER").is_some() {
        engine = engine.with_create_helper();
    }
    marks.push(("new", Instant::now()));
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
