//! Create, start, wait for and delete one container from an OCI bundle with
//! the host runtime; exits with the container's exit code. Used by
//! `runtime/bench/create-start-delete.sh`.
//!
//! usage: rt <state-root> <container-id> <bundle-dir>

use ployz_runtime::host::HostEngine;
use std::path::Path;
use std::process::ExitCode;

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
    let mut engine = HostEngine::new(root)?;
    engine.create_from_bundle(id, bundle)?;
    engine.start(id)?;
    let code = engine.wait(id)?.unwrap_or(0);
    engine.delete(id)?;
    Ok(code)
}
