//! The web dashboard (`ployzd run --ui-listen`, default 127.0.0.1:7180):
//! one embedded page, a JSON snapshot, a server-sent-events stream of
//! snapshots that follows store changes, and the drain / activate actions.
//! It is a client of the daemon's own API: every read and action goes
//! through [`Daemon::handle`] with the same rules as `ployzctl`.
//!
//! Access: `ployzctl dashboard` (root, on the socket) gets a one-time
//! login link; opening it trades the token for a session cookie
//! (HttpOnly, SameSite=Strict). Every other request without a live session
//! is refused; actions also need the `X-Ployz-Action` header, which a
//! cross-site form cannot send.

use crate::daemon::Daemon;
use crate::identity::random_hex;
use http_body_util::Full;
use hyper::body::{Body, Bytes, Frame, Incoming};
use hyper::{Method, Request as HttpRequest, Response as HttpResponse, StatusCode};
use ployz_api::*;
use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex, OnceLock};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

const PAGE: &str = include_str!("dashboard.html");
/// A login link works once, within this.
const LOGIN_TTL: Duration = Duration::from_secs(300);
/// A session lasts this long.
const SESSION_TTL: Duration = Duration::from_secs(12 * 3600);
/// The RTT matrix is an RPC to every machine: refreshed at most this often.
const RTT_EVERY: Duration = Duration::from_secs(5);
/// Snapshots are sent at least this often, and at most every `DEBOUNCE`.
const HEARTBEAT: Duration = Duration::from_secs(5);
const DEBOUNCE: Duration = Duration::from_millis(200);
const COOKIE: &str = "ployz_session";

/// Logins and sessions of this machine's dashboard.
#[derive(Default)]
pub struct Dashboard {
    /// The URL it serves on, once it listens.
    url: OnceLock<String>,
    logins: Mutex<HashMap<String, Instant>>,
    sessions: Mutex<HashMap<String, Instant>>,
}

impl Dashboard {
    /// `ployzctl dashboard`: a one-time login link.
    pub(crate) fn login_link(&self) -> Result<DashboardLink, ApiError> {
        let Some(url) = self.url.get() else {
            return Err(ApiError::new(
                ErrorCode::Unavailable,
                "the dashboard is not serving on this machine",
            )
            .with_hint("ployzd serves it unless started with `--ui-listen off`; if its port was taken, the ployzd log says so: pick another with `--ui-listen IP:PORT`"));
        };
        let token = random_hex(32);
        let mut logins = self.logins.lock().unwrap_or_else(|e| e.into_inner());
        logins.retain(|_, at| at.elapsed() < LOGIN_TTL);
        logins.insert(token.clone(), Instant::now());
        Ok(DashboardLink {
            url: format!("{url}/login?token={token}"),
        })
    }

    /// Trade a login token for a session id (once).
    fn redeem(&self, token: &str) -> Option<String> {
        let mut logins = self.logins.lock().unwrap_or_else(|e| e.into_inner());
        let at = logins.remove(token)?;
        if at.elapsed() >= LOGIN_TTL {
            return None;
        }
        let sid = random_hex(32);
        let mut sessions = self.sessions.lock().unwrap_or_else(|e| e.into_inner());
        sessions.retain(|_, at| at.elapsed() < SESSION_TTL);
        sessions.insert(sid.clone(), Instant::now());
        Some(sid)
    }

    fn has_session<B>(&self, req: &HttpRequest<B>) -> bool {
        let Some(sid) = session_cookie(req) else {
            return false;
        };
        self.sessions
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&sid)
            .is_some_and(|at| at.elapsed() < SESSION_TTL)
    }
}

fn session_cookie<B>(req: &HttpRequest<B>) -> Option<String> {
    req.headers()
        .get_all(hyper::header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|kv| kv.trim().split_once('='))
        .find(|(k, _)| *k == COOKIE)
        .map(|(_, v)| v.to_string())
}

/// A response body: a whole buffer, or a stream of server-sent events.
enum UiBody {
    Full(Full<Bytes>),
    Events(tokio::sync::mpsc::Receiver<Bytes>),
}

impl Body for UiBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        match self.get_mut() {
            UiBody::Full(f) => Pin::new(f).poll_frame(cx),
            UiBody::Events(rx) => rx.poll_recv(cx).map(|b| b.map(|b| Ok(Frame::data(b)))),
        }
    }
}

fn text(status: StatusCode, body: impl Into<String>) -> HttpResponse<UiBody> {
    HttpResponse::builder()
        .status(status)
        .header("content-type", "text/plain; charset=utf-8")
        .body(UiBody::Full(Full::new(Bytes::from(body.into()))))
        .expect("static response parts")
}

fn json(value: &impl serde::Serialize) -> HttpResponse<UiBody> {
    HttpResponse::builder()
        .header("content-type", "application/json")
        .header("cache-control", "no-store")
        .body(UiBody::Full(Full::new(Bytes::from(
            serde_json::to_vec(value).unwrap_or_default(),
        ))))
        .expect("static response parts")
}

const NO_SESSION: &str =
    "no dashboard session: run `ployzctl dashboard` on this machine and open the link it prints\n";

/// The last RTT matrix and when it was asked for.
type RttCache = Mutex<(Option<Instant>, Option<Result<RttReport, String>>)>;

/// What the page shows, in one JSON object.
#[derive(serde::Serialize)]
struct Snapshot {
    this_machine: String,
    machines: Result<Vec<MachineView>, String>,
    rtt: Option<RttReport>,
    rtt_error: Option<String>,
    /// Seconds since this machine's last WireGuard handshake with each peer.
    handshake_age: HashMap<String, u64>,
    services: Result<Vec<ServiceView>, String>,
}

impl Daemon {
    async fn snapshot(&self, rtt: &RttCache) -> Snapshot {
        let machines = match self.handle(Request::MachineList).await {
            Ok(Response::Machines(m)) => Ok(m.machines),
            Ok(other) => Err(format!("unexpected answer {other:?}")),
            Err(e) => Err(e.message),
        };
        let services = match self.handle(Request::ServiceList).await {
            Ok(Response::Services(s)) => Ok(s.services),
            Ok(other) => Err(format!("unexpected answer {other:?}")),
            Err(e) => Err(e.message),
        };
        let stale = {
            let r = rtt.lock().unwrap_or_else(|e| e.into_inner());
            r.0.is_none_or(|at| at.elapsed() >= RTT_EVERY)
        };
        if stale {
            let fresh = match self.handle(Request::MachineRtt).await {
                Ok(Response::Rtt(r)) => Ok(r),
                Ok(other) => Err(format!("unexpected answer {other:?}")),
                Err(e) => Err(e.message),
            };
            *rtt.lock().unwrap_or_else(|e| e.into_inner()) = (Some(Instant::now()), Some(fresh));
        }
        let (rtt, rtt_error) = match rtt.lock().unwrap_or_else(|e| e.into_inner()).1.clone() {
            Some(Ok(r)) => (Some(r), None),
            Some(Err(e)) => (None, Some(e)),
            None => (None, None),
        };
        let records: Vec<MachineRecord> = self
            .store
            .local()
            .get()
            .map(|f| f.machines)
            .unwrap_or_default();
        let handshake_age = self
            .overlay
            .links(&records)
            .unwrap_or_default()
            .into_iter()
            .filter_map(|l| Some((l.id, l.handshake_age?.as_secs())))
            .collect();
        Snapshot {
            this_machine: self.machine_id().to_string(),
            machines,
            rtt,
            rtt_error,
            handshake_age,
            services,
        }
    }

    async fn ui(self: Arc<Self>, req: HttpRequest<Incoming>) -> HttpResponse<UiBody> {
        let path = req.uri().path().to_string();
        if req.method() == Method::GET && path == "/login" {
            let token = req
                .uri()
                .query()
                .unwrap_or_default()
                .split('&')
                .find_map(|kv| kv.strip_prefix("token="))
                .unwrap_or_default()
                .to_string();
            return match self.dashboard.redeem(&token) {
                Some(sid) => HttpResponse::builder()
                    .status(StatusCode::SEE_OTHER)
                    .header("location", "/")
                    .header(
                        "set-cookie",
                        format!(
                            "{COOKIE}={sid}; HttpOnly; SameSite=Strict; Path=/; Max-Age={}",
                            SESSION_TTL.as_secs()
                        ),
                    )
                    .body(UiBody::Full(Full::new(Bytes::new())))
                    .expect("static response parts"),
                None => text(
                    StatusCode::FORBIDDEN,
                    "this login link is not valid (each works once, for 5 minutes): run `ployzctl dashboard` for a new one\n",
                ),
            };
        }
        if !self.dashboard.has_session(&req) {
            return text(StatusCode::UNAUTHORIZED, NO_SESSION);
        }
        match (req.method().clone(), path.as_str()) {
            (Method::GET, "/") => HttpResponse::builder()
                .header("content-type", "text/html; charset=utf-8")
                .header("cache-control", "no-store")
                .body(UiBody::Full(Full::new(Bytes::from_static(PAGE.as_bytes()))))
                .expect("static response parts"),
            (Method::GET, "/api/state") => {
                let rtt = Mutex::new((None, None));
                json(&self.snapshot(&rtt).await)
            }
            (Method::GET, "/api/events") => self.events(),
            (Method::POST, p) if p.starts_with("/api/machines/") => self.action(&req, p).await,
            _ => text(StatusCode::NOT_FOUND, "not found\n"),
        }
    }

    /// `POST /api/machines/ID/drain|activate`.
    async fn action(&self, req: &HttpRequest<Incoming>, path: &str) -> HttpResponse<UiBody> {
        if req.headers().get("x-ployz-action").is_none() {
            return text(
                StatusCode::FORBIDDEN,
                "actions need the X-Ployz-Action header (the dashboard page sends it)\n",
            );
        }
        let mut parts = path.trim_start_matches("/api/machines/").split('/');
        let (Some(id), Some(verb), None) = (parts.next(), parts.next(), parts.next()) else {
            return text(StatusCode::NOT_FOUND, "not found\n");
        };
        let action = match verb {
            "drain" => LifecycleAction::Drain,
            "activate" => LifecycleAction::Activate,
            _ => return text(StatusCode::NOT_FOUND, "drain or activate\n"),
        };
        match self
            .handle(Request::Lifecycle {
                machine: id.to_string(),
                action,
                force: false,
            })
            .await
        {
            Ok(resp) => json(&resp),
            Err(e) => {
                let mut r = json(&serde_json::json!({ "error": e }));
                *r.status_mut() = StatusCode::CONFLICT;
                r
            }
        }
    }

    /// `GET /api/events`: a snapshot now, then one after every store change
    /// (debounced) and at least every few seconds, until the page goes.
    fn events(self: Arc<Self>) -> HttpResponse<UiBody> {
        let (tx, rx) = tokio::sync::mpsc::channel::<Bytes>(4);
        let mut changes = self.store.events();
        tokio::spawn(async move {
            let rtt = Mutex::new((None, None));
            loop {
                let snap = self.snapshot(&rtt).await;
                let body = serde_json::to_string(&snap).unwrap_or_default();
                if tx
                    .send(Bytes::from(format!("event: state\ndata: {body}\n\n")))
                    .await
                    .is_err()
                {
                    return;
                }
                tokio::select! {
                    r = changes.recv() => {
                        if matches!(r, Err(tokio::sync::broadcast::error::RecvError::Closed)) {
                            changes = self.store.events();
                        }
                        tokio::time::sleep(DEBOUNCE).await;
                        while changes.try_recv().is_ok() {}
                    }
                    _ = tokio::time::sleep(HEARTBEAT) => {}
                    _ = tx.closed() => return,
                }
            }
        });
        HttpResponse::builder()
            .header("content-type", "text/event-stream")
            .header("cache-control", "no-store")
            .body(UiBody::Events(rx))
            .expect("static response parts")
    }
}

/// Serve the dashboard on `addr` until the process ends.
pub async fn serve(daemon: Arc<Daemon>, addr: SocketAddr) {
    let url = {
        let daemon = daemon.clone();
        move |bound: SocketAddr| {
            let host = if bound.ip().is_unspecified() {
                SocketAddr::new(std::net::Ipv4Addr::LOCALHOST.into(), bound.port())
            } else {
                bound
            };
            let _ = daemon.dashboard.url.set(format!("http://{host}"));
        }
    };
    crate::http::serve(addr, "dashboard", url, move |req| daemon.clone().ui(req)).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_login_link_works_once() {
        let d = Dashboard::default();
        assert!(d.login_link().is_err(), "not serving yet");
        d.url.set("http://127.0.0.1:7180".into()).unwrap();
        let link = d.login_link().unwrap().url;
        let token = link.split("token=").nth(1).unwrap();
        let sid = d.redeem(token).expect("first use");
        assert!(d.redeem(token).is_none(), "second use");
        assert!(d.redeem("nonsense").is_none());
        let req = HttpRequest::builder()
            .header("cookie", format!("a=b; {COOKIE}={sid}"))
            .body(())
            .unwrap();
        assert!(d.has_session(&req));
        let other = HttpRequest::builder()
            .header("cookie", format!("{COOKIE}=forged"))
            .body(())
            .unwrap();
        assert!(!d.has_session(&other));
    }
}
