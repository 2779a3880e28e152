//! Starting and stopping the service: binds the gRPC, admin and (optional) HTTP ext_authz
//! listeners, starts the key store, serves ext_authz (both APIs) + gRPC health + admin, and
//! shuts down gracefully.
//! Used by `main` and, in-process on `127.0.0.1:0`, by the integration tests.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use arc_swap::ArcSwap;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tonic::service::Routes;
use tonic_health::ServingStatus;

use crate::admin::{self, AdminState, metrics::Metrics};
use crate::audit::AuditSink;
use crate::config::Config;
use crate::engine::Engine;
use crate::grpc::http::{self, HttpAuthorizer};
use crate::grpc::serve::serve;
use crate::grpc::{AuthorizationServer, AuthzService};
use crate::keys::{IssuerKeySource, KeyStore};
use crate::listener::{ConnLimit, SMALL_LISTENER_MAX_CONNECTIONS, tcp_incoming};
use crate::state::StateStore;

/// The gRPC service name Envoy calls, reported by the health service.
pub const AUTHZ_SERVICE: &str = "envoy.service.auth.v3.Authorization";

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error(
        "{config}: {field}: cannot listen on `{addr}`: {cause} (hint: {})",
        bind_hint(cause)
    )]
    Bind {
        config: String,
        field: &'static str,
        addr: String,
        cause: std::io::Error,
    },
    #[error("cannot start the audit log writer: {0}")]
    Audit(std::io::Error),
    /// A file the config names does not load (revocation list, TLS material): names the
    /// config file and field.
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    /// No `#[source]`: the message already holds it (`{e:#}` would print it twice).
    #[error("gRPC listener TLS: {0}")]
    Tls(crate::tls::TlsError),
    #[error("cannot set up shared state: {0}")]
    State(crate::state::StateError),
    #[error("cannot set up gRPC reflection: {0}")]
    Reflection(String),
}

impl From<crate::tls::TlsError> for ServeError {
    fn from(e: crate::tls::TlsError) -> Self {
        ServeError::Tls(e)
    }
}

/// A running Portcullis.
pub struct Server {
    pub grpc_addr: SocketAddr,
    pub admin_addr: SocketAddr,
    /// The HTTP ext_authz listener's address, when `server.http_listen` is set.
    pub http_addr: Option<SocketAddr>,
    /// The approvals API's own listener, when `server.approvals_listen` is set.
    pub approvals_addr: Option<SocketAddr>,
    pub engine: Arc<ArcSwap<Engine>>,
    pub metrics: Arc<Metrics>,
    shutdown: watch::Sender<bool>,
    grpc_task: JoinHandle<()>,
    http_task: Option<JoinHandle<()>>,
    approvals_task: Option<JoinHandle<()>>,
    admin_task: JoinHandle<()>,
    /// Set by `leave_rotation`: `/readyz` and gRPC health report not ready.
    leaving: Arc<AtomicBool>,
}

/// Builds the key store for a config's issuers (not started).
pub fn key_store(config: &Config, metrics: Arc<Metrics>) -> KeyStore {
    let sources = config
        .issuers
        .iter()
        .map(|i| IssuerKeySource {
            name: i.name.clone(),
            issuer: i.rules.issuer.clone(),
            source: i.keys.clone(),
        })
        .collect();
    KeyStore::new(sources, metrics)
}

impl Server {
    /// Binds both listeners, loads keys (first attempt), and starts serving.
    pub async fn start(config: Config) -> Result<Server, ServeError> {
        Self::start_inner(config, None).await
    }

    /// Like `start`, and reloads the config (and its key files) from `path` on change and
    /// on SIGHUP until shutdown. The SIGHUP handler is in place before anything is served.
    pub async fn start_watching(
        config: Config,
        path: std::path::PathBuf,
    ) -> Result<Server, ServeError> {
        Self::start_inner(config, Some(path)).await
    }

    async fn start_inner(
        config: Config,
        watch: Option<std::path::PathBuf>,
    ) -> Result<Server, ServeError> {
        let audit = if config.file.audit.enabled {
            AuditSink::stdout().map_err(ServeError::Audit)?
        } else {
            AuditSink::disabled()
        };
        let mut metrics = Metrics::new();
        if let Some(lost) = audit.lost_events() {
            metrics.audit_events_lost = lost;
        }
        let metrics = Arc::new(metrics);
        let grpc_listener = bind(&config, "server.listen", &config.file.server.listen).await?;
        let admin_listener = bind(
            &config,
            "server.admin_listen",
            &config.file.server.admin_listen,
        )
        .await?;
        let grpc_addr = local_addr(
            &config,
            "server.listen",
            &grpc_listener,
            &config.file.server.listen,
        )?;
        let admin_addr = local_addr(
            &config,
            "server.admin_listen",
            &admin_listener,
            &config.file.server.admin_listen,
        )?;
        let http_listener = bind_optional(
            &config,
            "server.http_listen",
            config.file.server.http_listen.as_deref(),
        )
        .await?;
        let http_addr = http_listener.as_ref().map(|(_, a)| *a);
        let approvals_listener = bind_optional(
            &config,
            "server.approvals_listen",
            config.file.server.approvals_listen.as_deref(),
        )
        .await?;
        let approvals_addr = approvals_listener.as_ref().map(|(_, a)| *a);

        let base = config.source.parent().unwrap_or(std::path::Path::new(""));
        let tls_files = match &config.file.server.tls {
            Some(tls) => Some(crate::tls::TlsFiles::from_config("server.tls", tls, base)?),
            None => None,
        };
        let approvals_tls_files = match &config.file.server.approvals_tls {
            Some(tls) => Some(crate::tls::TlsFiles::from_config(
                "server.approvals_tls",
                tls,
                base,
            )?),
            None => None,
        };

        // The TLS files load now, or the start fails naming the field (as `check` does).
        for files in tls_files.iter().chain(&approvals_tls_files) {
            crate::tls::server_config(files).map_err(|e| files.config_error(&config.source, &e))?;
        }

        // Started below, once the admin listener serves: the first load may wait on slow
        // identity providers for up to `fetch_timeout`.
        let keys = Arc::new(key_store(&config, metrics.clone()));
        // `state.tls`'s files load now, or the start fails naming the field (as `check` does).
        let redis_tls = crate::state::redis::load_tls(&config.source, &config.file.state)?;
        let state: Arc<dyn StateStore> =
            crate::state::from_config(&config.file.state, redis_tls.as_ref())
                .map_err(ServeError::State)?;
        // Other replicas may share Redis: a list found new there waits for their write-back.
        let mirror = match config.file.state.backend {
            crate::config::schema::StateBackend::Redis => {
                crate::revocation::RuntimeRevocations::unsynced_shared(
                    config.file.revocation.reload.get(),
                )
            }
            crate::config::schema::StateBackend::Memory => {
                crate::revocation::RuntimeRevocations::unsynced()
            }
        };
        let first = Engine::new(Arc::new(config), keys, state, metrics.clone())
            .with_audit(audit.clone())
            .with_runtime_revocations(Arc::new(mirror));
        // Read the runtime revocations before serving: until they are, every credential is
        // refused (503), and the watcher keeps trying (a store down at start is not fatal).
        if let Err(e) = first
            .runtime_revoked
            .sync(&*first.state, crate::engine::unix_now())
            .await
        {
            tracing::warn!(error = %e, "runtime revocations not read from shared state at startup; requests with a credential are refused until they are");
        }
        // A configured revocation list that cannot be read must stop the start: serving
        // without it would allow revoked tokens (and serving with it would deny everyone).
        if let Some(e) = first.revocations.startup_error() {
            return Err(ServeError::Config(crate::config::revocation_error(
                &first.config,
                e,
            )));
        }
        if first.revocations.path().is_some() {
            crate::revocation::report(
                &crate::revocation::ReloadOutcome::Reloaded(first.revocations.current().len()),
                &metrics,
                "startup",
            );
        }
        let engine = Arc::new(ArcSwap::from_pointee(first));

        let (shutdown, shutdown_rx) = watch::channel(false);
        // Registers the SIGHUP handler before anything is served.
        let reloader =
            watch.map(|path| crate::reload::Reloader::new(path, engine.clone(), metrics.clone()));

        // The admin listener serves from now on: `/healthz` answers while the first key
        // load runs (a slow identity provider held every listener, liveness probes
        // included, for up to `fetch_timeout`), and `/readyz` says 503 until keys are in.
        let leaving = Arc::new(AtomicBool::new(false));
        let (health, health_service) = tonic_health::server::health_reporter();
        spawn_health_updater(engine.clone(), leaving.clone(), health, shutdown_rx.clone());
        let app = admin::router(AdminState {
            engine: engine.clone(),
            metrics: metrics.clone(),
            leaving: leaving.clone(),
            bound: admin_addr,
        });
        let admin_limit = ConnLimit::new("admin", SMALL_LISTENER_MAX_CONNECTIONS, &metrics);
        let admin_task = tokio::spawn(admin::serve(
            tcp_incoming(admin_listener, admin_limit),
            app,
            shutdown_rx.clone(),
        ));
        // The decision listeners wait for the first load (bounded by `fetch_timeout`), so
        // the first Checks find the keys.
        engine.load().keys.start().await;

        crate::revocation::spawn_watcher(engine.clone(), metrics.clone(), shutdown_rx.clone());
        if let Some(reloader) = reloader {
            tokio::spawn(reloader.run(crate::reload::POLL_INTERVAL, shutdown_rx.clone()));
        }

        let authz = AuthzService::new(engine.clone(), metrics.clone(), audit);
        let approvals = crate::approvals::api::ApprovalsApi::new(engine.clone()).into_server();
        // Reflection lists the approvals API and gRPC health, in both versions of the
        // protocol (grpcurl and older tools still ask `v1alpha`).
        let reflection = || {
            tonic_reflection::server::Builder::configure()
                .register_encoded_file_descriptor_set(crate::approvals::api::DESCRIPTOR_SET)
                .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        };
        let reflection_v1alpha = reflection()
            .build_v1alpha()
            .map_err(|e| ServeError::Reflection(e.to_string()))?;
        let reflection = reflection()
            .build_v1()
            .map_err(|e| ServeError::Reflection(e.to_string()))?;
        spawn_approval_sweeper(engine.clone(), shutdown_rx.clone());
        let authz = Arc::new(authz);
        let check = AuthorizationServer::new(authz.clone());
        let max_connections = engine.load().config.file.server.max_connections;
        let http_task = http_listener.map(|(listener, _)| {
            let authorizer = HttpAuthorizer::new(authz);
            let stop = shutdown_rx.clone();
            let limit = ConnLimit::new("http", max_connections, &metrics);
            match &tls_files {
                Some(files) => crate::tls::incoming(listener, files.clone(), limit, stop.clone())
                    .map(|incoming| tokio::spawn(http::serve(incoming, authorizer, stop))),
                None => Ok(tokio::spawn(http::serve(
                    tcp_incoming(listener, limit),
                    authorizer,
                    stop,
                ))),
            }
        });
        let http_task = http_task.transpose()?;
        // The approvals API (and reflection, which lists it) is on `approvals_listen` when
        // that is set, else beside ext_authz; gRPC health is on both.
        let approvals_routes = Routes::new(health_service.clone())
            .add_service(approvals)
            .add_service(reflection)
            .add_service(reflection_v1alpha);
        let (routes, approvals_task) = match approvals_listener {
            Some((listener, _)) => {
                let task = spawn_grpc(
                    listener,
                    approvals_tls_files,
                    None,
                    approvals_routes,
                    ConnLimit::new("approvals", SMALL_LISTENER_MAX_CONNECTIONS, &metrics),
                    shutdown_rx.clone(),
                )?;
                (Routes::new(health_service), Some(task))
            }
            None => (approvals_routes, None),
        };
        // mTLS: only clients with a certificate from `client_ca` (Envoy) get decisions.
        let grpc_task = spawn_grpc(
            grpc_listener,
            tls_files,
            Some(check),
            routes,
            ConnLimit::new("grpc", max_connections, &metrics),
            shutdown_rx.clone(),
        )?;

        tracing::info!(
            grpc.addr = %grpc_addr,
            admin.addr = %admin_addr,
            http.addr = http_addr.map(|a| a.to_string()),
            approvals.addr = approvals_addr.map(|a| a.to_string()),
            "portcullis listening"
        );
        Ok(Server {
            grpc_addr,
            admin_addr,
            http_addr,
            approvals_addr,
            engine,
            metrics,
            shutdown,
            grpc_task,
            http_task,
            approvals_task,
            admin_task,
            leaving,
        })
    }

    /// The decision service this server answers Checks with (same engine, reloads, metrics
    /// and audit log), for a front end running in the same process: the Envoy dynamic
    /// module in `bench/module` decides through it on Envoy's own threads.
    /// The audit sink travels with the engine (a reload keeps it), as `shutdown` reads it.
    pub fn authorizer(&self) -> AuthzService {
        let audit = self.engine.load().audit.clone();
        AuthzService::new(self.engine.clone(), self.metrics.clone(), audit)
    }

    /// The first step of a shutdown with `server.shutdown_delay`: from now on `/readyz`
    /// answers 503 and gRPC health NOT_SERVING, while every listener still accepts and
    /// answers as before, so load balancers take this instance out before it stops.
    pub fn leave_rotation(&self) {
        self.leaving.store(true, Ordering::Relaxed);
    }

    /// How long to keep serving out of rotation before `shutdown` (the loaded config's
    /// `server.shutdown_delay`).
    pub fn shutdown_delay(&self) -> Duration {
        self.engine.load().config.file.server.shutdown_delay.get()
    }

    /// Stops accepting, lets in-flight checks finish (up to the loaded config's
    /// `shutdown_grace`, read now so that a reload changes it), then returns.
    pub async fn shutdown(self) {
        let grace = self.engine.load().config.file.server.shutdown_grace.get();
        let _ = self.shutdown.send(true);
        let drain = async {
            let _ = self.grpc_task.await;
            for task in [self.http_task, self.approvals_task].into_iter().flatten() {
                let _ = task.await;
            }
            let _ = self.admin_task.await;
        };
        if tokio::time::timeout(grace, drain).await.is_err() {
            tracing::warn!(
                grace = %humantime::format_duration(grace),
                "shutdown grace period over; dropping remaining connections"
            );
        }
        // Every decision made is in the audit log before the process exits.
        let audit = self.engine.load().audit.clone();
        let flushing = audit.clone();
        let flushed =
            tokio::task::spawn_blocking(move || flushing.flush(Duration::from_secs(2))).await;
        if !matches!(flushed, Ok(true)) {
            // The output took no write for 2 s (a stuck or closed stdout): say what is lost.
            tracing::error!(
                lost = audit.unwritten(),
                "audit log not fully flushed at shutdown: its output took no writes for 2s, \
                 and this many decision records (allowed requests among them) were never \
                 written"
            );
        }
    }
}

/// What to do about a listener that cannot bind.
fn bind_hint(cause: &std::io::Error) -> &'static str {
    match cause.kind() {
        std::io::ErrorKind::AddrInUse => {
            "another process holds the port (a Portcullis still running?): stop it or pick another port"
        }
        std::io::ErrorKind::AddrNotAvailable => {
            "the address is not one of this machine's: use one it has, `127.0.0.1` or `0.0.0.0`"
        }
        std::io::ErrorKind::PermissionDenied => {
            "ports below 1024 need privileges: use a higher port"
        }
        _ => "check the address and port",
    }
}

async fn bind(config: &Config, field: &'static str, addr: &str) -> Result<TcpListener, ServeError> {
    TcpListener::bind(addr)
        .await
        .map_err(|cause| ServeError::Bind {
            config: config.source.display().to_string(),
            field,
            addr: addr.to_string(),
            cause,
        })
}

/// Binds `addr` when it is set; the listener and its local address.
async fn bind_optional(
    config: &Config,
    field: &'static str,
    addr: Option<&str>,
) -> Result<Option<(TcpListener, SocketAddr)>, ServeError> {
    let Some(addr) = addr else {
        return Ok(None);
    };
    let listener = bind(config, field, addr).await?;
    let local = local_addr(config, field, &listener, addr)?;
    Ok(Some((listener, local)))
}

/// Serves gRPC on `listener` (over TLS with `tls`) until `stop`, at most `limit`'s
/// connections at once: Checks with `check` when given, everything else with `routes`.
fn spawn_grpc(
    listener: TcpListener,
    tls: Option<crate::tls::TlsFiles>,
    check: Option<AuthorizationServer>,
    routes: Routes,
    limit: Arc<ConnLimit>,
    stop: watch::Receiver<bool>,
) -> Result<JoinHandle<()>, ServeError> {
    let name = limit.listener();
    Ok(match tls {
        Some(files) => {
            let incoming = crate::tls::incoming(listener, files, limit, stop.clone())?;
            tokio::spawn(serve(incoming, check, routes, stop, name))
        }
        None => tokio::spawn(serve(
            tcp_incoming(listener, limit),
            check,
            routes,
            stop,
            name,
        )),
    })
}

fn local_addr(
    config: &Config,
    field: &'static str,
    listener: &TcpListener,
    addr: &str,
) -> Result<SocketAddr, ServeError> {
    listener.local_addr().map_err(|cause| ServeError::Bind {
        config: config.source.display().to_string(),
        field,
        addr: addr.to_string(),
        cause,
    })
}

/// Keeps the gRPC health status in step with readiness: SERVING only while the config is
/// loaded, every issuer's keys are usable and no shutdown has begun (`leaving`).
fn spawn_health_updater(
    engine: Arc<ArcSwap<Engine>>,
    leaving: Arc<AtomicBool>,
    health: tonic_health::server::HealthReporter,
    mut stop: watch::Receiver<bool>,
) {
    tokio::spawn(async move {
        let mut last: Option<bool> = None;
        loop {
            let current = engine.load();
            let ready = current.ready() && !leaving.load(Ordering::Relaxed);
            if last != Some(ready) {
                let status = if ready {
                    ServingStatus::Serving
                } else {
                    ServingStatus::NotServing
                };
                health.set_service_status("", status).await;
                health.set_service_status(AUTHZ_SERVICE, status).await;
                last = Some(ready);
            }
            let stopping = tokio::select! {
                _ = tokio::time::sleep(Duration::from_millis(250)) => false,
                // A dropped sender also means stop: never spin on a closed channel.
                _ = stop.wait_for(|s| *s) => true,
            };
            if stopping {
                health
                    .set_service_status("", ServingStatus::NotServing)
                    .await;
                health
                    .set_service_status(AUTHZ_SERVICE, ServingStatus::NotServing)
                    .await;
                return;
            }
        }
    });
}

/// Every 2 seconds, writes an `expired` audit event for approval requests and approvals
/// whose time is up (once across replicas). Only when some rule requires approval.
fn spawn_approval_sweeper(engine: Arc<ArcSwap<Engine>>, mut stop: watch::Receiver<bool>) {
    tokio::spawn(async move {
        loop {
            let current = engine.load_full();
            if current.approvals.any()
                && let Err(e) = current.approvals.sweep(crate::engine::unix_now()).await
            {
                tracing::debug!(error = %e, "approval expiry sweep skipped");
            }
            drop(current);
            let stopping = tokio::select! {
                _ = tokio::time::sleep(Duration::from_secs(2)) => false,
                _ = stop.wait_for(|s| *s) => true,
            };
            if stopping {
                return;
            }
        }
    });
}
