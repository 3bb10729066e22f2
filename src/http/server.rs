//! The web port's accept loop: hyper under axum's router, behind TLS when
//! the port has it, with every connection bounded so that clients that
//! connect and say nothing cannot use up the master.
//!
//! - At most [`MAX_CONNECTIONS`] connections are open at once; one more is
//!   closed at once.
//! - A connection that has not yet sent its first request's headers holds
//!   one of [`HANDSHAKES_PER_ADDRESS`] places of its address (and
//!   [`HANDSHAKES`] in all), as on the worker port; without a place it is
//!   closed at once. Behind a proxy every client shares its address, so
//!   the places are many and held only briefly.
//! - TLS handshakes end within [`crate::net::TLS_HANDSHAKE_TIMEOUT`], and a
//!   request's headers must arrive within [`HEADER_TIMEOUT`] of the
//!   connection being ready for it (which also closes idle keep-alive
//!   connections).
//! - When the server stops, each connection ends after its request in
//!   flight (event streams end at once); the server waits for them for
//!   at most [`DRAIN`].

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::ConnectInfo;
use axum::Router;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use crate::net::{Bound, Stream, Tls};
use crate::throttle::{Admitted, Handshakes, Refusals};

/// Open connections at most.
pub const MAX_CONNECTIONS: usize = 4096;
/// Connections still before their first request, per address and in all.
pub const HANDSHAKES_PER_ADDRESS: usize = 256;
pub const HANDSHAKES: usize = 1024;
/// Time to send a request's headers.
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a stopping server waits for its connections.
pub const DRAIN: Duration = Duration::from_secs(10);

/// Serves `app` on `bound` until `stop` fires.
pub async fn serve(bound: Bound, app: Router, stop: CancellationToken) {
    let open = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let places = Arc::new(Handshakes::new(HANDSHAKES_PER_ADDRESS, HANDSHAKES));
    let mut refusals = Refusals::default();
    loop {
        let (tcp, peer) = tokio::select! {
            r = bound.tcp.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    // Out of file descriptors, most likely: let some close.
                    tracing::warn!("accepting an HTTP connection failed: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            _ = stop.cancelled() => break,
        };
        let admitted = match (open.clone().try_acquire_owned(), places.admit(peer.ip())) {
            (Ok(permit), Some(place)) => (permit, place),
            _ => {
                drop(tcp);
                if let Some(n) = refusals.note() {
                    tracing::warn!(peer = %peer, "too many HTTP connections are open, or still before their first request (from this address or in all): closed {n} connection(s)");
                }
                continue;
            }
        };
        let (app, tls, stop) = (app.clone(), bound.tls.clone(), stop.clone());
        tokio::spawn(async move {
            let (_permit, place) = admitted;
            if let Err(e) = connection(tcp, peer, tls.as_deref(), place, app, stop).await {
                tracing::debug!(peer = %peer, "HTTP connection: {e:#}");
            }
        });
    }
    // Every connection gives its permit back when it ends.
    let all = u32::try_from(MAX_CONNECTIONS).unwrap_or(u32::MAX);
    if tokio::time::timeout(DRAIN, open.acquire_many(all))
        .await
        .is_err()
    {
        tracing::warn!(
            "HTTP connections still open {} s after the server stopped: left to close",
            DRAIN.as_secs()
        );
    }
}

async fn connection(
    tcp: tokio::net::TcpStream,
    peer: SocketAddr,
    tls: Option<&Tls>,
    place: Admitted,
    app: Router,
    stop: CancellationToken,
) -> anyhow::Result<()> {
    let stream = tokio::select! {
        s = Stream::accept(tcp, tls) => s?,
        _ = stop.cancelled() => return Ok(()),
    };
    // The place is given back with the first request's headers.
    let place = Arc::new(Mutex::new(Some(place)));
    let service =
        hyper::service::service_fn(move |mut req: hyper::Request<hyper::body::Incoming>| {
            crate::sync::lock(&place).take();
            req.extensions_mut().insert(ConnectInfo(peer));
            let mut app = app.clone();
            async move { tower_service::Service::call(&mut app, req).await }
        });
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_TIMEOUT);
    let conn = builder.serve_connection(TokioIo::new(stream), service);
    tokio::pin!(conn);
    tokio::select! {
        r = conn.as_mut() => return Ok(r?),
        _ = stop.cancelled() => {}
    }
    conn.as_mut().graceful_shutdown();
    Ok(conn.await?)
}
