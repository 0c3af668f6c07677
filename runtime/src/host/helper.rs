//! Container creation in a single-threaded helper process.
//!
//! libcontainer creates a container by cloning the calling process and
//! running Rust in the clones until the workload starts; a clone keeps every
//! lock another thread held at that instant, held forever. In ployzd (tokio
//! threads, thread pools coming and going) that hung creates for good: seen
//! in tests on std's env lock (see `exec`), musl's malloc lock and musl's
//! thread-list lock (taken by every thread start and exit; the intermediate
//! process's `exit` needed it through mimalloc's atexit hook). Only a process
//! with one thread is safe, so [`HostRuntime`](super::HostRuntime) creates
//! through one: it re-executes its own binary (`/proc/self/exe`) with
//! [`HELPER_ENV`] set; a constructor in this module (`.init_array`, so no
//! `main` has to cooperate, test binaries included) sees the variable before
//! `main` and before any thread exists, creates the container from the
//! bundle ployzd already wrote, answers one JSON line on stdout and exits.
//!
//! Only create clones: start, kill, state and delete stay in-process. The
//! container's init is the helper's child; when the helper exits the kernel
//! re-parents it to ployzd, a child subreaper, which reaps it as before.

use super::HostEngine;
use crate::RuntimeError;
use serde::{Deserialize, Serialize};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// Set (to "1") in the environment of a helper process.
pub const HELPER_ENV: &str = "PLOYZ_RUNTIME_CREATE_HELPER";

#[derive(Serialize, Deserialize)]
struct Request {
    root: PathBuf,
    id: String,
    bundle: PathBuf,
}

#[derive(Serialize, Deserialize)]
enum Response {
    Created,
    InvalidId(String),
    AlreadyExists(String),
    Failed(String),
}

#[used]
#[link_section = ".init_array"]
static CONSTRUCTOR: extern "C" fn() = constructor;

extern "C" fn constructor() {
    // SAFETY: getenv before main: no other thread exists to modify the environment.
    if unsafe { libc::getenv(c"PLOYZ_RUNTIME_CREATE_HELPER".as_ptr()) }.is_null() {
        return;
    }
    let code = serve();
    // SAFETY: _exit ends the process without running atexit hooks or
    // destructors, which is all we want before main.
    unsafe { libc::_exit(code) }
}

/// The helper's whole life: one request on stdin, one response on stdout.
fn serve() -> i32 {
    let mut line = String::new();
    if BufReader::new(std::io::stdin())
        .read_line(&mut line)
        .is_err()
    {
        return 2;
    }
    let response = match serde_json::from_str::<Request>(&line) {
        Err(e) => Response::Failed(format!("bad request from ployzd: {e}")),
        Ok(req) => match HostEngine::new(&req.root)
            .and_then(|mut engine| engine.create_in_process(&req.id, &req.bundle))
        {
            Ok(()) => Response::Created,
            Err(RuntimeError::InvalidId(id)) => Response::InvalidId(id),
            Err(RuntimeError::AlreadyExists(id)) => Response::AlreadyExists(id),
            Err(e) => Response::Failed(e.to_string()),
        },
    };
    let Ok(mut out) = serde_json::to_string(&response) else {
        return 2;
    };
    out.push('\n');
    match std::io::stdout().write_all(out.as_bytes()) {
        Ok(()) => 0,
        Err(_) => 2,
    }
}

/// Makes sure the constructor is linked into every program that can create
/// through a helper (an unreferenced object file could be left out).
pub fn ensure_linked() {
    // SAFETY: reads a plain static of ours.
    let _ = unsafe { std::ptr::read_volatile(&raw const CONSTRUCTOR) };
}

/// Creates container `id` from `bundle` under `root` in a helper process.
pub fn create(root: &Path, id: &str, bundle: &Path) -> Result<(), RuntimeError> {
    ensure_linked();
    let fail = |message: String| RuntimeError::Engine {
        op: "create",
        id: id.to_string(),
        message,
    };
    let exe = Path::new("/proc/self/exe");
    let mut child = Command::new(exe)
        // Never read by the helper: if its constructor were missing, the
        // program's own main would see an unknown option and exit at once
        // instead of running (a daemon, a test suite) as a helper.
        .arg("--ployz-runtime-create-helper")
        .env(HELPER_ENV, "1")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .map_err(|e| {
            fail(format!(
                "cannot start the create helper ({}): {e}",
                exe.display()
            ))
        })?;
    let request = Request {
        root: root.to_path_buf(),
        id: id.to_string(),
        bundle: bundle.to_path_buf(),
    };
    let mut line = serde_json::to_string(&request).map_err(|e| fail(e.to_string()))?;
    line.push('\n');
    let written = child
        .stdin
        .take()
        .map(|mut stdin| stdin.write_all(line.as_bytes()));
    // One line back, not EOF: the container's processes hold copies of the
    // helper's stdout until the workload starts.
    let mut answer = String::new();
    let read = child
        .stdout
        .take()
        .map(|out| BufReader::new(out).read_line(&mut answer));
    let status = child.wait();
    match serde_json::from_str::<Response>(&answer) {
        Ok(Response::Created) => Ok(()),
        Ok(Response::InvalidId(id)) => Err(RuntimeError::InvalidId(id)),
        Ok(Response::AlreadyExists(id)) => Err(RuntimeError::AlreadyExists(id)),
        Ok(Response::Failed(message)) => Err(fail(message)),
        Err(_) => Err(fail(format!(
            "the create helper gave no answer (write: {written:?}, read: {read:?}, exit: {status:?})"
        ))),
    }
}
