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
//! through one.
//!
//! The helper is a zygote: started once (re-executing `/proc/self/exe` with
//! [`HELPER_ENV`] set), it serves every create of the engine that started it.
//! A constructor in this module (`.init_array`, so no `main` has to
//! cooperate, test binaries included) sees the variable before `main` and
//! before any thread exists and never returns: it reads one JSON request per
//! line on stdin and, for each, forks a worker (a fork of a process with one
//! thread is as safe as the original) that creates the container from the
//! bundle ployzd already wrote, answers one JSON line on stdout and exits.
//! A create thus costs a fork, not an exec of the whole binary (~2 ms here).
//!
//! Only create clones: start, kill, state and delete stay in-process. The
//! container's init is the worker's child; when the worker exits the kernel
//! re-parents it to the nearest child subreaper, ployzd (the zygote is not
//! one), which reaps it as before. The zygote exits when its stdin closes
//! (the engine was dropped) and is killed with the thread that started it.

use super::HostEngine;
use crate::RuntimeError;
use serde::{Deserialize, Serialize};
use std::io::{BufRead, BufReader, Write};
use std::os::fd::{AsRawFd, FromRawFd};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};

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

/// The zygote's whole life: a worker per request line on stdin, until EOF.
fn serve() -> i32 {
    // SAFETY: prctl(PR_SET_PDEATHSIG) takes one integer argument and only
    // sets the signal this process gets when the thread that spawned it ends.
    unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0) };
    warm_up();
    let mut requests = BufReader::new(std::io::stdin());
    let mut line = String::new();
    loop {
        line.clear();
        match requests.read_line(&mut line) {
            Ok(0) => return 0,
            Ok(_) => {}
            Err(_) => return 2,
        }
        // The worker answers through a pipe that this process forwards once
        // the worker has exited: by then the container's init (the worker's
        // child) has been re-parented to ployzd, which can reap it.
        let mut fds = [0; 2];
        // SAFETY: pipe2 writes two fds into `fds`, a valid local array.
        if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
            let err = std::io::Error::last_os_error();
            if answer(&Response::Failed(format!(
                "create helper cannot make a pipe: {err}"
            )))
            .is_err()
            {
                return 2;
            }
            continue;
        }
        // SAFETY: both fds were just created by pipe2 and are owned here only.
        let (from_worker, to_zygote) = unsafe {
            (
                std::fs::File::from_raw_fd(fds[0]),
                std::fs::File::from_raw_fd(fds[1]),
            )
        };
        // SAFETY: this process has one thread (we run before main and never
        // start one), so the child gets a consistent copy of everything.
        let response = match unsafe { libc::fork() } {
            -1 => {
                let err = std::io::Error::last_os_error();
                Response::Failed(format!("create helper cannot fork: {err}"))
            }
            0 => {
                drop(from_worker);
                let code = match write_line(to_zygote, &work(&line)) {
                    Ok(()) => 0,
                    Err(_) => 2,
                };
                // SAFETY: as in `constructor`: no hooks, no destructors.
                unsafe { libc::_exit(code) }
            }
            pid => {
                drop(to_zygote);
                let mut status = 0;
                // SAFETY: waitpid writes only to `status`, a valid local.
                while unsafe { libc::waitpid(pid, &mut status, 0) } == -1
                    && std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted
                {
                }
                // Whatever the worker wrote is in the pipe by now; read
                // without blocking: the container's processes may still hold
                // the write end (until their exec) if the worker died early.
                // SAFETY: fcntl on a pipe fd this process owns.
                unsafe { libc::fcntl(from_worker.as_raw_fd(), libc::F_SETFL, libc::O_NONBLOCK) };
                let mut reply = String::new();
                let _ = BufReader::new(from_worker).read_line(&mut reply);
                match serde_json::from_str::<Response>(&reply) {
                    Ok(response) => response,
                    Err(_) => {
                        let how = if libc::WIFSIGNALED(status) {
                            format!("killed by signal {}", libc::WTERMSIG(status))
                        } else {
                            format!("exit status {}", libc::WEXITSTATUS(status))
                        };
                        Response::Failed(format!(
                            "the create worker died without answering ({how})"
                        ))
                    }
                }
            }
        };
        if answer(&response).is_err() {
            return 2;
        }
    }
}

/// Does once, in the zygote, what every create would otherwise do again in
/// its short-lived worker: workers inherit the results.
fn warm_up() {
    // libcontainer's hardened /proc accesses go through pathrs, which mounts a
    // private procfs (fsopen) on first use and caches the handle.
    let _ = pathrs::procfs::ProcfsHandle::new();
}

/// One create, in a worker process.
fn work(line: &str) -> Response {
    match serde_json::from_str::<Request>(line) {
        Err(e) => Response::Failed(format!("bad request from ployzd: {e}")),
        Ok(req) => match HostEngine::new(&req.root)
            .and_then(|mut engine| engine.create_in_process(&req.id, &req.bundle))
        {
            Ok(()) => Response::Created,
            Err(RuntimeError::InvalidId(id)) => Response::InvalidId(id),
            Err(RuntimeError::AlreadyExists(id)) => Response::AlreadyExists(id),
            // ployzd's side says which create failed: only the cause here,
            // or the message would say it twice.
            Err(RuntimeError::Container { source, .. }) => Response::Failed(source.to_string()),
            Err(RuntimeError::Engine { message, .. }) => Response::Failed(message),
            Err(e) => Response::Failed(e.to_string()),
        },
    }
}

/// Writes one response line to ployzd on stdout.
fn answer(response: &Response) -> std::io::Result<()> {
    write_line(std::io::stdout().lock(), response)
}

/// Writes `response` as one JSON line, unbuffered (workers end in `_exit`).
fn write_line(mut out: impl Write, response: &Response) -> std::io::Result<()> {
    let mut line = serde_json::to_string(response).map_err(std::io::Error::other)?;
    line.push('\n');
    out.write_all(line.as_bytes())?;
    out.flush()
}

/// Makes sure the constructor is linked into every program that can create
/// through a helper (an unreferenced object file could be left out).
pub fn ensure_linked() {
    // SAFETY: reads a plain static of ours.
    let _ = unsafe { std::ptr::read_volatile(&raw const CONSTRUCTOR) };
}

/// The engine's end of a running zygote.
pub struct Zygote {
    child: Child,
    requests: Option<ChildStdin>,
    answers: BufReader<ChildStdout>,
}

impl Zygote {
    /// Starts a zygote: an exec of this program that serves creates.
    pub fn spawn() -> std::io::Result<Zygote> {
        ensure_linked();
        let exe = Path::new("/proc/self/exe");
        let mut child = Command::new(exe)
            // What `ps` shows for it.
            .arg0("ployz-create-helper")
            // Never read by the helper: if its constructor were missing, the
            // program's own main would see an unknown option and exit at once
            // instead of running (a daemon, a test suite) as a helper.
            .arg("--ployz-runtime-create-helper")
            .env(HELPER_ENV, "1")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()?;
        let (Some(requests), Some(answers)) = (child.stdin.take(), child.stdout.take()) else {
            let _ = child.kill();
            let _ = child.wait();
            return Err(std::io::Error::other("the create helper has no pipes"));
        };
        Ok(Zygote {
            child,
            requests: Some(requests),
            answers: BufReader::new(answers),
        })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Creates container `id` from `bundle` under `root` in a worker of this
    /// zygote. `Err(None)`: the request never reached the zygote (it had
    /// exited), so nothing was attempted and a fresh zygote may retry it.
    fn create(
        &mut self,
        root: &Path,
        id: &str,
        bundle: &Path,
        timeout: std::time::Duration,
    ) -> Result<Response, Option<String>> {
        let request = Request {
            root: root.to_path_buf(),
            id: id.to_string(),
            bundle: bundle.to_path_buf(),
        };
        let mut line = serde_json::to_string(&request).map_err(|e| Some(e.to_string()))?;
        line.push('\n');
        // One that has exited (killed, say) is replaced before it is asked.
        if !matches!(self.child.try_wait(), Ok(None)) {
            return Err(None);
        }
        let Some(requests) = self.requests.as_mut() else {
            return Err(None);
        };
        if requests.write_all(line.as_bytes()).is_err() {
            return Err(None);
        }
        // Nothing is buffered (one request at a time): wait for the answer
        // to start arriving, within `timeout`.
        let mut ready = libc::pollfd {
            fd: self.answers.get_ref().as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        let ms = i32::try_from(timeout.as_millis()).unwrap_or(i32::MAX);
        // SAFETY: poll on one valid pollfd we own, for at most `ms`.
        if unsafe { libc::poll(&mut ready, 1, ms) } == 0 {
            // Killed here; dropped (and reaped) by the caller.
            let _ = self.child.kill();
            return Err(Some(format!(
                "the create did not finish within {}; its helper was killed",
                ployz_api::time::human(timeout)
            )));
        }
        // One line back, not EOF: the worker's container processes hold
        // copies of the zygote's stdout until the workload starts.
        let mut answer = String::new();
        match self.answers.read_line(&mut answer) {
            Ok(0) => Err(Some("the create helper exited without answering".into())),
            Err(e) => Err(Some(format!("cannot read the create helper's answer: {e}"))),
            Ok(_) => serde_json::from_str::<Response>(&answer)
                .map_err(|e| Some(format!("the create helper answered {answer:?}: {e}"))),
        }
    }
}

impl Drop for Zygote {
    fn drop(&mut self) {
        // EOF on its stdin ends the zygote after any create in flight; one
        // that does not end (a create hung in its worker) is killed.
        drop(self.requests.take());
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(2);
        while matches!(self.child.try_wait(), Ok(None)) {
            if std::time::Instant::now() >= deadline {
                let _ = self.child.kill();
                let _ = self.child.wait();
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
    }
}

/// Creates container `id` from `bundle` under `root` through `zygote`,
/// starting one when there is none or the last one died.
pub fn create(
    zygote: &mut Option<Zygote>,
    root: &Path,
    id: &str,
    bundle: &Path,
    timeout: std::time::Duration,
) -> Result<(), RuntimeError> {
    let fail = |message: String| RuntimeError::Engine {
        op: "create",
        id: id.to_string(),
        message,
    };
    let mut result = Err(None);
    // A second try only when the first request never reached a zygote.
    for _ in 0..2 {
        if zygote.is_none() {
            *zygote = Some(Zygote::spawn().map_err(|e| {
                fail(format!(
                    "cannot start the create helper (/proc/self/exe): {e}"
                ))
            })?);
        }
        if let Some(z) = zygote.as_mut() {
            result = z.create(root, id, bundle, timeout);
        }
        match &result {
            Ok(_) => break,
            // Dead or confused: the next create starts a fresh one.
            Err(lost) => {
                *zygote = None;
                if lost.is_some() {
                    break;
                }
            }
        }
    }
    match result {
        Ok(Response::Created) => Ok(()),
        Ok(Response::InvalidId(id)) => Err(RuntimeError::InvalidId(id)),
        Ok(Response::AlreadyExists(id)) => Err(RuntimeError::AlreadyExists(id)),
        Ok(Response::Failed(message)) => Err(fail(message)),
        Err(message) => {
            Err(fail(message.unwrap_or_else(|| {
                "the create helper is not running".into()
            })))
        }
    }
}
