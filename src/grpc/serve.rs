//! The gRPC port's accept loop: HTTP/2 connections served by hyper, each request routed by
//! path. A Check goes straight to the `AuthorizationServer`; anything else (health,
//! approvals, reflection) goes through tonic's `Routes`. Measured in bench/ (issue 4): tonic's
//! server stack in front of every Check (protocol sniffing, router, tower layers) cost about
//! a tenth of a cached decision's CPU.
//!
//! Shutdown is graceful: when `stop` turns true the listener closes, every connection gets
//! a GOAWAY, and `serve` returns once the in-flight requests are answered (the caller bounds
//! the wait with `server.shutdown_grace`).

use std::convert::Infallible;
use std::io;
use std::time::Duration;

use futures_util::{Stream, StreamExt};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::graceful::{GracefulConnection, GracefulShutdown};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::watch;
use tonic::codegen::{BoxFuture, Service, http};
use tonic::service::Routes;

use super::AuthorizationServer;
use super::service::CHECK_PATH;

type Response = http::Response<tonic::body::Body>;

/// One connection's request router. Without `check` (the approvals listener), a Check is
/// routed to `routes` like any other path, which answers UNIMPLEMENTED.
#[derive(Clone)]
struct Dispatch {
    check: Option<AuthorizationServer>,
    routes: Routes,
}

impl hyper::service::Service<http::Request<Incoming>> for Dispatch {
    type Response = Response;
    type Error = Infallible;
    type Future = BoxFuture<Response, Infallible>;

    fn call(&self, req: http::Request<Incoming>) -> Self::Future {
        if let Some(check) = &self.check
            && req.uri().path() == CHECK_PATH
        {
            check.clone().call(req)
        } else {
            // `Routes` (an axum router) is always ready; no `poll_ready` needed first.
            let mut routes = self.routes.clone();
            Box::pin(async move { routes.call(req).await })
        }
    }
}

/// Serves HTTP/2 (gRPC) on each connection `incoming` yields until `stop` turns true, then
/// drains: Checks with `check` when given, everything else with `routes`. A failed accept
/// is logged and retried after a pause (e.g. out of descriptors).
pub async fn serve<S, IO>(
    incoming: S,
    check: Option<AuthorizationServer>,
    routes: Routes,
    stop: watch::Receiver<bool>,
) where
    S: Stream<Item = io::Result<IO>>,
    IO: AsyncRead + AsyncWrite + Send + Unpin + 'static,
{
    let dispatch = Dispatch {
        check,
        routes: routes.prepare(),
    };
    let mut builder = hyper::server::conn::http2::Builder::new(TokioExecutor::new());
    // gRPC answers carry no `Date`: one header less to build here and to decode in Envoy.
    builder.auto_date_header(false);
    accept_loop(incoming, stop, "gRPC", |io| {
        builder.serve_connection(io, dispatch.clone())
    })
    .await;
}

/// The accept loop shared by the gRPC and HTTP ext_authz listeners: each connection is
/// served by `connect` until `stop` turns true, then every connection is drained
/// gracefully. A failed accept is logged and retried after a pause.
pub(super) async fn accept_loop<S, IO, C>(
    incoming: S,
    mut stop: watch::Receiver<bool>,
    listener: &'static str,
    mut connect: impl FnMut(TokioIo<IO>) -> C,
) where
    S: Stream<Item = io::Result<IO>>,
    IO: AsyncRead + AsyncWrite + Send + Unpin + 'static,
    C: GracefulConnection + Send + 'static,
    C::Error: std::fmt::Display,
{
    let graceful = GracefulShutdown::new();
    let mut incoming = std::pin::pin!(incoming);
    loop {
        let next = tokio::select! {
            next = incoming.next() => next,
            // A dropped sender also means stop.
            _ = stop.wait_for(|s| *s) => None,
        };
        match next {
            Some(Ok(io)) => {
                let conn = graceful.watch(connect(TokioIo::new(io)));
                tokio::spawn(async move {
                    if let Err(e) = conn.await {
                        tracing::debug!(error = %e, listener, "connection ended with an error");
                    }
                });
            }
            Some(Err(e)) => {
                tracing::warn!(error = %e, listener, "accept failed; retrying");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            None => break,
        }
    }
    graceful.shutdown().await;
}

/// The plain-TCP connection stream of a listener, with `TCP_NODELAY` (a Check answer must
/// not wait for Nagle).
pub fn tcp_incoming(
    listener: tokio::net::TcpListener,
) -> impl Stream<Item = io::Result<tokio::net::TcpStream>> {
    futures_util::stream::unfold(listener, |listener| async move {
        let next = listener.accept().await.and_then(|(stream, _)| {
            stream.set_nodelay(true)?;
            Ok(stream)
        });
        Some((next, listener))
    })
}
