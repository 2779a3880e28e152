//! Admin HTTP listener: `/healthz` (process alive), `/readyz` (config loaded, every issuer's
//! keys usable, and not shutting down), `/metrics` (Prometheus text). Read-only, except
//! `/revocations` (see `revocations`), which changes the runtime revocation list and nothing
//! else.

pub mod metrics;
pub mod revocations;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::SystemTime;

use arc_swap::ArcSwap;
use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;

use futures_util::Stream;
use hyper_util::rt::TokioTimer;
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpStream;
use tokio::sync::watch;

use crate::engine::Engine;
use crate::listener::{ConnPermit, H1_HEADER_READ_TIMEOUT, Marked, accept_loop};
use metrics::{IssuerLabels, Metrics};

#[derive(Clone)]
pub struct AdminState {
    pub engine: Arc<ArcSwap<Engine>>,
    pub metrics: Arc<Metrics>,
    /// Set when a shutdown has begun: still serving, no longer ready.
    pub leaving: Arc<AtomicBool>,
    /// The address the admin listener is bound to. It never changes after the start, whatever
    /// a reloaded config's `server.admin_listen` says, so it alone tells whether the listener
    /// is on loopback.
    pub bound: std::net::SocketAddr,
}

/// Serves `app` over HTTP/1.1 on each connection `incoming` yields until `stop` turns true,
/// then drains; connections are capped and timed like every listener's (`crate::listener`).
pub async fn serve<S>(incoming: S, app: Router, stop: watch::Receiver<bool>)
where
    S: Stream<Item = std::io::Result<(TcpStream, ConnPermit)>>,
{
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(H1_HEADER_READ_TIMEOUT);
    accept_loop(incoming, stop, "admin", None, |io, first| {
        let service = Marked::new(TowerToHyperService::new(app.clone()), first);
        builder.serve_connection(io, service)
    })
    .await;
}

pub fn router(state: AdminState) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics_text))
        .route(
            "/revocations",
            get(revocations::list)
                .post(revocations::add)
                .delete(revocations::remove),
        )
        .with_state(state)
}

async fn healthz() -> &'static str {
    "ok\n"
}

async fn readyz(State(state): State<AdminState>) -> Response {
    let engine = state.engine.load();
    let issuers: Vec<_> = engine
        .keys
        .status()
        .into_iter()
        .map(|s| {
            serde_json::json!({
                "issuer": &*s.name,
                "usable": s.usable,
                "keys": s.key_count,
                "last_error": s.last_error,
            })
        })
        .collect();
    let leaving = state.leaving.load(Ordering::Relaxed);
    let revocations = engine.runtime_revoked.synced();
    let ready = engine.ready() && !leaving;
    let mut body = serde_json::json!({
        "ready": ready,
        "issuers": issuers,
        "runtime_revocations_loaded": revocations,
        "audit_writing": !engine.audit.refusing(),
    });
    if leaving {
        body["shutting_down"] = true.into();
    }
    let code = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (code, axum::Json(body)).into_response()
}

async fn metrics_text(State(state): State<AdminState>) -> Response {
    let engine = state.engine.load();
    refresh_gauges(&engine, &state.metrics);
    let mut text = String::new();
    match prometheus_client::encoding::text::encode(&mut text, &state.metrics.registry()) {
        Ok(()) => (
            [(
                header::CONTENT_TYPE,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
            )],
            text,
        )
            .into_response(),
        Err(_) => StatusCode::INTERNAL_SERVER_ERROR.into_response(),
    }
}

/// Gauges that are computed at scrape time rather than kept up to date on the hot path.
fn refresh_gauges(engine: &Engine, metrics: &Metrics) {
    engine.sync_cache();
    metrics
        .token_cache_entries
        .set(i64::try_from(engine.cached_tokens()).unwrap_or(i64::MAX));
    metrics
        .token_cache_bytes
        .set(i64::try_from(engine.cached_bytes()).unwrap_or(i64::MAX));
    metrics
        .audit_refusing
        .set(i64::from(engine.audit.refusing()));
    let now = SystemTime::now();
    for s in engine.keys.status() {
        let age = s
            .last_good
            .and_then(|t| now.duration_since(t).ok())
            .map_or(f64::INFINITY, |d| d.as_secs_f64());
        metrics
            .jwks_seconds_since_success
            .get_or_create(&IssuerLabels {
                issuer: s.name.to_string(),
            })
            .set(age);
    }
}
