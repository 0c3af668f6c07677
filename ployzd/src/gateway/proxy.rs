//! The gateway's servers and forwarding: hyper's automatic HTTP/1.1 +
//! HTTP/2 server on the HTTP port and behind TLS (ALPN `h2`,
//! `http/1.1`, `acme-tls/1`), each request forwarded as HTTP/1.1 to a
//! backend over pooled connections, upgrades (WebSocket) spliced.

use super::{table, Gateway};
use bytes::Bytes;
use http_body_util::{combinators::BoxBody, BodyExt, Full};
use hyper::body::Incoming;
use hyper::client::conn::http1::SendRequest;
use hyper::header::{self, HeaderMap, HeaderName, HeaderValue};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo};
use std::collections::HashMap;
use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

type Body = BoxBody<Bytes, hyper::Error>;

/// How long connecting to a backend may take before the next one is tried.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// Idle connections kept per backend.
const IDLE_PER_BACKEND: usize = 256;
pub(super) const CHALLENGE_PREFIX: &str = "/.well-known/acme-challenge/";

/// Idle HTTP/1.1 connections to backends.
#[derive(Default)]
pub struct Pool {
    idle: Mutex<HashMap<SocketAddr, Vec<SendRequest<Incoming>>>>,
}

impl Pool {
    fn take(&self, addr: SocketAddr) -> Option<SendRequest<Incoming>> {
        let mut idle = self.idle.lock().expect("pool lock");
        let list = idle.get_mut(&addr)?;
        while let Some(s) = list.pop() {
            if s.is_ready() {
                return Some(s);
            }
        }
        None
    }

    fn give_back(self: &Arc<Self>, addr: SocketAddr, mut sender: SendRequest<Incoming>) {
        let pool = self.clone();
        tokio::spawn(async move {
            // Ready once the response body was read to its end; an error
            // means the connection closed.
            if sender.ready().await.is_ok() {
                let mut idle = pool.idle.lock().expect("pool lock");
                let list = idle.entry(addr).or_default();
                if list.len() < IDLE_PER_BACKEND {
                    list.push(sender);
                }
            }
        });
    }
}

fn full(status: StatusCode, content_type: &str, text: String) -> Response<Body> {
    let mut r = Response::new(
        Full::new(Bytes::from(text))
            .map_err(|never: Infallible| match never {})
            .boxed(),
    );
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_str(content_type).expect("content type"),
    );
    r
}

/// The gateway's own error page.
fn page(status: StatusCode, detail: &str) -> Response<Body> {
    let reason = status.canonical_reason().unwrap_or("");
    let esc = detail
        .replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;");
    full(
        status,
        "text/html; charset=utf-8",
        format!(
            "<!doctype html><title>{} {reason}</title><h1>{} {reason}</h1><p>{esc}</p><hr><p>ployz gateway</p>\n",
            status.as_u16(),
            status.as_u16()
        ),
    )
}

const HOP_BY_HOP: [&str; 7] = [
    "keep-alive",
    "proxy-connection",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
];

/// Takes out hop-by-hop headers (those `Connection` names too); keeps
/// `Connection: upgrade` + `Upgrade` when `upgrade`.
fn strip_hop_by_hop(h: &mut HeaderMap, upgrade: bool) {
    let named: Vec<String> = h
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|s| s.trim().to_ascii_lowercase())
        .filter(|s| !s.is_empty() && s != "upgrade")
        .collect();
    for n in named {
        h.remove(n.as_str());
    }
    for n in HOP_BY_HOP {
        h.remove(n);
    }
    h.remove(header::CONNECTION);
    if upgrade {
        h.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    } else {
        h.remove(header::UPGRADE);
    }
}

/// The headers a request carries to an instance: hop-by-hop ones out,
/// `Host` kept (or set from the HTTP/2 authority), `X-Forwarded-For`
/// appended, `X-Forwarded-Proto` and `X-Forwarded-Host` set.
fn prepare_headers(
    h: &mut HeaderMap,
    upgrade: bool,
    peer: IpAddr,
    tls: bool,
    original_host: Option<String>,
) {
    strip_hop_by_hop(h, upgrade);
    if let Some(a) = &original_host {
        if !h.contains_key(header::HOST) {
            if let Ok(v) = HeaderValue::from_str(a) {
                h.insert(header::HOST, v);
            }
        }
    }
    let xff = HeaderName::from_static("x-forwarded-for");
    let chain = match h.get(&xff).and_then(|v| v.to_str().ok()) {
        Some(prev) => format!("{prev}, {peer}"),
        None => peer.to_string(),
    };
    if let Ok(v) = HeaderValue::from_str(&chain) {
        h.insert(xff, v);
    }
    h.insert(
        HeaderName::from_static("x-forwarded-proto"),
        HeaderValue::from_static(if tls { "https" } else { "http" }),
    );
    if let Some(v) = original_host.and_then(|a| HeaderValue::from_str(&a).ok()) {
        h.insert(HeaderName::from_static("x-forwarded-host"), v);
    }
}

fn is_upgrade(req: &Request<Incoming>) -> bool {
    req.version() <= hyper::Version::HTTP_11
        && req.headers().contains_key(header::UPGRADE)
        && req
            .headers()
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .any(|v| {
                v.split(',')
                    .any(|t| t.trim().eq_ignore_ascii_case("upgrade"))
            })
}

/// Why forwarding failed.
enum ForwardError {
    /// No backend accepted a connection.
    Connect(String),
    /// The backend failed after the request was sent.
    Backend(String),
}

impl Gateway {
    pub(super) async fn serve_http(self: Arc<Self>, port: u16) {
        let Some(listener) = bind(port, "HTTP").await else {
            return;
        };
        loop {
            let Ok((stream, peer)) = listener.accept().await else {
                continue;
            };
            let _ = stream.set_nodelay(true);
            let gw = self.clone();
            tokio::spawn(gw.serve_connection(TokioIo::new(stream), peer.ip(), false));
        }
    }

    pub(super) async fn serve_https(self: Arc<Self>, port: u16) {
        let Some(listener) = bind(port, "HTTPS").await else {
            return;
        };
        let acceptor = tokio_rustls::TlsAcceptor::from(self.certs.server_config());
        loop {
            let Ok((stream, peer)) = listener.accept().await else {
                continue;
            };
            let _ = stream.set_nodelay(true);
            let gw = self.clone();
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let tls =
                    match tokio::time::timeout(Duration::from_secs(10), acceptor.accept(stream))
                        .await
                    {
                        Ok(Ok(s)) => s,
                        Ok(Err(e)) => {
                            tracing::debug!(%peer, "gateway TLS handshake: {e}");
                            return;
                        }
                        Err(_) => return,
                    };
                // A TLS-ALPN-01 validation ends with the handshake.
                if tls.get_ref().1.alpn_protocol() == Some(super::tls::ACME_TLS_ALPN) {
                    return;
                }
                gw.serve_connection(TokioIo::new(tls), peer.ip(), true)
                    .await;
            });
        }
    }

    async fn serve_connection<I>(self: Arc<Self>, io: I, peer: IpAddr, tls: bool)
    where
        I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
    {
        let svc = hyper::service::service_fn(move |req| {
            let gw = self.clone();
            async move { Ok::<_, Infallible>(gw.handle(req, peer, tls).await) }
        });
        let builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
        if let Err(e) = builder.serve_connection_with_upgrades(io, svc).await {
            tracing::debug!(%peer, "gateway connection: {e}");
        }
    }

    async fn handle(&self, req: Request<Incoming>, peer: IpAddr, tls: bool) -> Response<Body> {
        let start = Instant::now();
        let resp = self.route(req, peer, tls).await;
        self.metrics
            .observe(resp.status().as_u16(), start.elapsed().as_secs_f64());
        resp
    }

    async fn route(&self, req: Request<Incoming>, peer: IpAddr, tls: bool) -> Response<Body> {
        let host_header = req
            .headers()
            .get(header::HOST)
            .and_then(|h| h.to_str().ok())
            .map(str::to_string);
        let Some(host) = table::request_host(
            host_header.as_deref(),
            req.uri().authority().map(|a| a.as_str()),
        ) else {
            return page(StatusCode::BAD_REQUEST, "the request names no host");
        };
        let path = req.uri().path().to_string();
        if !tls {
            if let Some(token) = path.strip_prefix(CHALLENGE_PREFIX) {
                let answer = self
                    .http_challenges
                    .read()
                    .expect("challenge lock")
                    .get(token)
                    .cloned();
                return match answer {
                    Some(k) => full(StatusCode::OK, "application/octet-stream", k),
                    None => page(StatusCode::NOT_FOUND, "no such ACME challenge"),
                };
            }
        }
        let table = self.table();
        if !tls && self.cfg.https_port != 0 && table.wants_tls(&host) {
            let port = match self.cfg.https_port {
                443 => String::new(),
                p => format!(":{p}"),
            };
            let pq = req.uri().path_and_query().map_or("/", |p| p.as_str());
            let mut r = page(
                StatusCode::PERMANENT_REDIRECT,
                &format!("{host} is served over HTTPS"),
            );
            if let Ok(v) = HeaderValue::from_str(&format!("https://{host}{port}{pq}")) {
                r.headers_mut().insert(header::LOCATION, v);
            }
            return r;
        }
        let Some(route) = table.find(&host, &path) else {
            return page(
                StatusCode::NOT_FOUND,
                &format!("no route for {host}{path} (ployzctl route ls)"),
            );
        };
        // Only error pages name the route: built when one is needed.
        let name = |r: &table::Route| {
            format!(
                "{}{} → service {} port {}",
                r.record.host,
                if r.record.path == "/" {
                    ""
                } else {
                    &r.record.path
                },
                r.record.service,
                r.record.port
            )
        };
        let backends = route.pick();
        if backends.is_empty() {
            return page(
                StatusCode::SERVICE_UNAVAILABLE,
                &format!("route {} has no healthy instance", name(route)),
            );
        }
        match self.forward(req, &backends, peer, tls, host_header).await {
            Ok(r) => r,
            Err(ForwardError::Connect(e)) => page(
                StatusCode::BAD_GATEWAY,
                &format!(
                    "route {}: no instance accepted a connection ({e})",
                    name(route)
                ),
            ),
            Err(ForwardError::Backend(e)) => page(
                StatusCode::BAD_GATEWAY,
                &format!("route {}: the instance failed to answer ({e})", name(route)),
            ),
        }
    }

    async fn forward(
        &self,
        mut req: Request<Incoming>,
        backends: &[SocketAddr],
        peer: IpAddr,
        tls: bool,
        host_header: Option<String>,
    ) -> Result<Response<Body>, ForwardError> {
        let upgrade = is_upgrade(&req);
        let server_upgrade = upgrade.then(|| hyper::upgrade::on(&mut req));
        let authority = req.uri().authority().map(|a| a.to_string());
        let pq = req
            .uri()
            .path_and_query()
            .map_or("/".to_string(), |p| p.to_string());
        *req.uri_mut() = pq
            .parse()
            .map_err(|e| ForwardError::Backend(format!("{e}")))?;
        *req.version_mut() = hyper::Version::HTTP_11;
        prepare_headers(
            req.headers_mut(),
            upgrade,
            peer,
            tls,
            host_header.or(authority),
        );

        let mut last_err = String::new();
        for &addr in backends {
            // A pooled connection first; a request it could not send comes back.
            if !upgrade {
                if let Some(mut sender) = self.pool.take(addr) {
                    match sender.try_send_request(req).await {
                        Ok(resp) => {
                            self.pool.give_back(addr, sender);
                            return Ok(respond(resp));
                        }
                        Err(mut e) => match e.take_message() {
                            Some(r) => req = r,
                            None => return Err(ForwardError::Backend(e.into_error().to_string())),
                        },
                    }
                }
            }
            let stream =
                match tokio::time::timeout(CONNECT_TIMEOUT, tokio::net::TcpStream::connect(addr))
                    .await
                {
                    Ok(Ok(s)) => s,
                    Ok(Err(e)) => {
                        last_err = format!("{addr}: {e}");
                        continue;
                    }
                    Err(_) => {
                        last_err = format!("{addr}: no answer within {CONNECT_TIMEOUT:?}");
                        continue;
                    }
                };
            let _ = stream.set_nodelay(true);
            let (mut sender, conn) =
                match hyper::client::conn::http1::handshake(TokioIo::new(stream)).await {
                    Ok(x) => x,
                    Err(e) => {
                        last_err = format!("{addr}: {e}");
                        continue;
                    }
                };
            tokio::spawn(async move {
                if let Err(e) = conn.with_upgrades().await {
                    tracing::debug!(%addr, "gateway backend connection: {e}");
                }
            });
            let mut resp = sender
                .send_request(req)
                .await
                .map_err(|e| ForwardError::Backend(format!("{addr}: {e}")))?;
            if upgrade && resp.status() == StatusCode::SWITCHING_PROTOCOLS {
                let client_upgrade = hyper::upgrade::on(&mut resp);
                if let Some(server_upgrade) = server_upgrade {
                    tokio::spawn(async move {
                        let (Ok(a), Ok(b)) = (server_upgrade.await, client_upgrade.await) else {
                            return;
                        };
                        let (mut a, mut b) = (TokioIo::new(a), TokioIo::new(b));
                        let _ = tokio::io::copy_bidirectional(&mut a, &mut b).await;
                    });
                }
                let (parts, _) = resp.into_parts();
                return Ok(Response::from_parts(
                    parts,
                    http_body_util::Empty::new()
                        .map_err(|never: Infallible| match never {})
                        .boxed(),
                ));
            }
            if !upgrade {
                self.pool.give_back(addr, sender);
            }
            return Ok(respond(resp));
        }
        Err(ForwardError::Connect(last_err))
    }
}

fn respond(resp: Response<Incoming>) -> Response<Body> {
    let (mut parts, body) = resp.into_parts();
    strip_hop_by_hop(&mut parts.headers, false);
    Response::from_parts(parts, body.boxed())
}

async fn bind(port: u16, what: &str) -> Option<tokio::net::TcpListener> {
    match tokio::net::TcpListener::bind(("0.0.0.0", port)).await {
        Ok(l) => {
            tracing::info!(port, "gateway serving {what}");
            Some(l)
        }
        Err(e) => {
            tracing::warn!(
                port,
                "the gateway cannot serve {what} on port {port}: {e} (pick another with ployzd run --{}-port, 0 turns it off)",
                what.to_ascii_lowercase()
            );
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hop_by_hop_headers_go() {
        let mut h = HeaderMap::new();
        h.insert(
            header::CONNECTION,
            HeaderValue::from_static("keep-alive, x-secret"),
        );
        h.insert("x-secret", HeaderValue::from_static("1"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        h.insert("x-keep", HeaderValue::from_static("1"));
        let mut up = h.clone();
        strip_hop_by_hop(&mut h, false);
        assert!(!h.contains_key("x-secret") && !h.contains_key("keep-alive"));
        assert!(!h.contains_key(header::UPGRADE) && !h.contains_key(header::CONNECTION));
        assert!(h.contains_key("x-keep"));
        strip_hop_by_hop(&mut up, true);
        assert_eq!(up.get(header::CONNECTION).unwrap(), "upgrade");
        assert_eq!(up.get(header::UPGRADE).unwrap(), "websocket");
    }

    #[test]
    fn forwarded_headers() {
        let peer: IpAddr = "192.0.2.7".parse().unwrap();
        let mut h = HeaderMap::new();
        h.insert("x-forwarded-for", HeaderValue::from_static("198.51.100.1"));
        prepare_headers(&mut h, false, peer, true, Some("a.test".into()));
        assert_eq!(h.get("x-forwarded-for").unwrap(), "198.51.100.1, 192.0.2.7");
        assert_eq!(h.get("x-forwarded-proto").unwrap(), "https");
        assert_eq!(h.get("x-forwarded-host").unwrap(), "a.test");
        // HTTP/2 has no Host header: the authority becomes one.
        assert_eq!(h.get(header::HOST).unwrap(), "a.test");
        let mut h = HeaderMap::new();
        h.insert(header::HOST, HeaderValue::from_static("b.test:8080"));
        prepare_headers(&mut h, false, peer, false, Some("b.test:8080".into()));
        assert_eq!(h.get("x-forwarded-for").unwrap(), "192.0.2.7");
        assert_eq!(h.get("x-forwarded-proto").unwrap(), "http");
        assert_eq!(h.get(header::HOST).unwrap(), "b.test:8080");
    }

    #[tokio::test]
    async fn error_pages_name_the_route_escaped() {
        let r = page(
            StatusCode::SERVICE_UNAVAILABLE,
            "route <a> has no healthy instance",
        );
        assert_eq!(r.status(), 503);
        let body = r.into_body().collect().await.unwrap().to_bytes();
        let text = String::from_utf8(body.to_vec()).unwrap();
        assert!(text.contains("503 Service Unavailable"), "{text}");
        assert!(
            text.contains("route &lt;a&gt; has no healthy instance"),
            "{text}"
        );
    }
}
