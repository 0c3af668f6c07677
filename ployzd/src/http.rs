//! The one small HTTP/1.1 server loop behind `/metrics` and the dashboard
//! (hyper): bind, accept, hand each request to a handler. A listener that
//! cannot bind is logged, never fatal: neither may keep a machine from
//! running.

use hyper::body::{Body, Incoming};
use hyper::{Request, Response};
use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;

/// Bind `addr` and serve `handler` until the process ends; `bound` is told
/// the address it listens on. `what` names it in logs.
pub async fn serve<B, F, Fut>(
    addr: SocketAddr,
    what: &'static str,
    bound: impl FnOnce(SocketAddr),
    handler: F,
) where
    B: Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    F: Fn(Request<Incoming>) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Response<B>> + Send + 'static,
{
    let listener = match tokio::net::TcpListener::bind(addr).await {
        Ok(l) => l,
        Err(e) => {
            tracing::warn!(%addr, "cannot serve the {what}: {e}");
            return;
        }
    };
    let local = listener.local_addr().unwrap_or(addr);
    bound(local);
    tracing::info!(addr = %local, "serving the {what}");
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let handler = handler.clone();
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req| {
                let handler = handler.clone();
                async move { Ok::<_, Infallible>(handler(req).await) }
            });
            let io = hyper_util::rt::TokioIo::new(stream);
            if let Err(e) = hyper::server::conn::http1::Builder::new()
                .serve_connection(io, svc)
                .await
            {
                tracing::debug!("{what} connection: {e}");
            }
        });
    }
}
