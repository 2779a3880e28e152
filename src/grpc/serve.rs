//! The gRPC port's accept loop: HTTP/2 connections served by hyper, each request routed by
//! path. A Check goes straight to the `AuthorizationServer`; anything else (health,
//! approvals, reflection) goes through tonic's `Routes`. Measured in bench/ (issue 4): tonic's
//! server stack in front of every Check (protocol sniffing, router, tower layers) cost about
//! a tenth of a cached decision's CPU.
//!
//! Shutdown is graceful: when `stop` turns true the listener closes, every connection gets
//! a GOAWAY, and `serve` returns once the in-flight requests are answered (the caller bounds
//! the wait with `server.shutdown_grace`). Connection caps and deadlines: `crate::listener`.

use std::convert::Infallible;
use std::io;

use futures_util::Stream;
use hyper::body::Incoming;
use hyper_util::rt::TokioExecutor;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::watch;
use tonic::codegen::{BoxFuture, Service, http};
use tonic::service::Routes;

use super::AuthorizationServer;
use super::service::CHECK_PATH;
use crate::listener::{ConnPermit, Marked, accept_loop};

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
/// drains: Checks with `check` when given, everything else with `routes`. `listener` names
/// it in logs. Connections are capped, timed and drained by `crate::listener::accept_loop`.
pub async fn serve<S, IO>(
    incoming: S,
    check: Option<AuthorizationServer>,
    routes: Routes,
    stop: watch::Receiver<bool>,
    listener: &'static str,
) where
    S: Stream<Item = io::Result<(IO, ConnPermit)>>,
    IO: AsyncRead + AsyncWrite + Send + Unpin + 'static,
{
    let dispatch = Dispatch {
        check,
        routes: routes.prepare(),
    };
    let mut builder = hyper::server::conn::http2::Builder::new(TokioExecutor::new());
    // gRPC answers carry no `Date`: one header less to build here and to decode in Envoy.
    builder.auto_date_header(false);
    // Envoy keeps its connections to the Check listener however idle; the approvals API's
    // own listener serves people and scripts, so an idle connection there is closed.
    let idle = dispatch
        .check
        .is_none()
        .then_some(crate::listener::APPROVALS_IDLE_TIMEOUT);
    accept_loop(incoming, stop, listener, idle, |io, first| {
        builder.serve_connection(io, Marked::new(dispatch.clone(), first))
    })
    .await;
}
