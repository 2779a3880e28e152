//! `KeyStore` against real loopback HTTP servers: loading from each source, background refresh,
//! unknown-`kid` refetch without fetch storms, every failure class, stale-while-failing and fail
//! closed, and stopping the background tasks.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Body;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::Response;
use axum::routing::get;
use portcullis::admin::metrics::{IssuerResultLabels, Metrics};
use portcullis::config::schema::KeySourceConfig;
use portcullis::identity::{JwtError, KeySet};
use portcullis::keys::{IssuerKeySource, KeyError, KeyStore};
use tokio::task::JoinHandle;

const SET_A: &str = include_str!("fixtures/keys/rsa2048.jwks.json");
const SET_B: &str = include_str!("fixtures/keys/ec-p256.jwks.json");
/// Only a 1024-bit RSA key, which the parser drops: valid JSON, no usable keys.
const WEAK_ONLY: &str = include_str!("fixtures/keys/rsa1024.jwks.json");

/// A well-formed key set listing no key.
const EMPTY: &str = r#"{"keys":[]}"#;

/// Set A's key marked for encryption (`use: enc`): well-formed, nothing to verify with.
fn enc_only() -> String {
    let mut doc: serde_json::Value = serde_json::from_str(SET_A).unwrap();
    doc["keys"][0]["use"] = "enc".into();
    doc.to_string()
}

/// A P-521 key, a curve Portcullis does not support: well-formed, nothing usable.
const P521_ONLY: &str = r#"{"keys":[{"kty":"EC","crv":"P-521","kid":"p521","x":"AQ","y":"Ag"}]}"#;

/// What the test server answers on `/jwks`; switchable while the store runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    SetA,
    SetB,
    Status500,
    /// Waits two seconds, then serves set B.
    SlowThenB,
    Garbage,
    WeakOnly,
    /// `{"keys":[]}`.
    Empty,
    /// Set A's key with `use: enc`.
    EncOnly,
    /// One key on an unsupported curve.
    P521Only,
    /// An endless chunked body without Content-Length.
    Endless,
    /// A 302 to `/jwks-final` on the same origin (which serves set A).
    RedirectSameOrigin,
    /// A 302 to the same server under another host name (`localhost` instead of `127.0.0.1`).
    RedirectOtherHost,
}

struct ServerState {
    mode: Mutex<Mode>,
    cache_control: Mutex<Option<String>>,
    /// The `issuer` the discovery document claims.
    discovery_issuer: Mutex<String>,
    /// The `jwks_uri` the discovery document points to.
    discovery_jwks_uri: Mutex<String>,
    jwks_hits: AtomicUsize,
    discovery_hits: AtomicUsize,
    addr: SocketAddr,
}

struct TestServer {
    state: Arc<ServerState>,
    task: JoinHandle<()>,
}

impl TestServer {
    async fn start(mode: Mode) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let state = Arc::new(ServerState {
            mode: Mutex::new(mode),
            cache_control: Mutex::new(None),
            discovery_issuer: Mutex::new(format!("http://{addr}")),
            discovery_jwks_uri: Mutex::new(format!("http://{addr}/jwks")),
            jwks_hits: AtomicUsize::new(0),
            discovery_hits: AtomicUsize::new(0),
            addr,
        });
        let app = Router::new()
            .route("/jwks", get(jwks))
            .route("/jwks-final", get(jwks_final))
            .route("/.well-known/openid-configuration", get(discovery))
            .with_state(state.clone());
        let task = tokio::spawn(async move {
            axum::serve(listener, app).await.unwrap();
        });
        Self { state, task }
    }

    fn base(&self) -> String {
        format!("http://{}", self.state.addr)
    }

    fn url(&self) -> String {
        format!("{}/jwks", self.base())
    }

    fn set_mode(&self, mode: Mode) {
        *self.state.mode.lock().unwrap() = mode;
    }

    fn hits(&self) -> usize {
        self.state.jwks_hits.load(Ordering::SeqCst)
    }

    /// Stops accepting connections: later fetches see "connection refused".
    async fn stop(self) {
        self.task.abort();
        let _ = self.task.await;
    }
}

fn json_response(body: impl Into<Body>, cache_control: Option<String>) -> Response {
    let mut b = Response::builder()
        .status(StatusCode::OK)
        .header(header::CONTENT_TYPE, "application/json");
    if let Some(cc) = cache_control {
        b = b.header(header::CACHE_CONTROL, cc);
    }
    b.body(body.into()).unwrap()
}

async fn jwks(State(s): State<Arc<ServerState>>) -> Response {
    s.jwks_hits.fetch_add(1, Ordering::SeqCst);
    let mode = *s.mode.lock().unwrap();
    let cc = s.cache_control.lock().unwrap().clone();
    match mode {
        Mode::SetA => json_response(SET_A, cc),
        Mode::SetB => json_response(SET_B, cc),
        Mode::WeakOnly => json_response(WEAK_ONLY, cc),
        Mode::Empty => json_response(EMPTY, cc),
        Mode::EncOnly => json_response(enc_only(), cc),
        Mode::P521Only => json_response(P521_ONLY, cc),
        Mode::Status500 => Response::builder()
            .status(StatusCode::INTERNAL_SERVER_ERROR)
            .body(Body::from("oops"))
            .unwrap(),
        Mode::SlowThenB => {
            tokio::time::sleep(Duration::from_secs(2)).await;
            json_response(SET_B, cc)
        }
        Mode::Garbage => json_response("<html>not a key set</html>", cc),
        Mode::Endless => {
            let chunks = std::iter::once(b"{\"keys\":[".to_vec())
                .chain(std::iter::repeat_with(|| vec![b' '; 64 * 1024]))
                .map(Ok::<_, std::io::Error>);
            Response::builder()
                .status(StatusCode::OK)
                .body(Body::from_stream(tokio_stream::iter(chunks)))
                .unwrap()
        }
        Mode::RedirectSameOrigin => redirect(format!("http://{}/jwks-final", s.addr)),
        Mode::RedirectOtherHost => {
            redirect(format!("http://localhost:{}/jwks-final", s.addr.port()))
        }
    }
}

fn redirect(to: String) -> Response {
    Response::builder()
        .status(StatusCode::FOUND)
        .header(header::LOCATION, to)
        .body(Body::empty())
        .unwrap()
}

async fn jwks_final() -> Response {
    json_response(SET_A, None)
}

async fn discovery(State(s): State<Arc<ServerState>>) -> Response {
    s.discovery_hits.fetch_add(1, Ordering::SeqCst);
    let doc = serde_json::json!({
        "issuer": *s.discovery_issuer.lock().unwrap(),
        "jwks_uri": *s.discovery_jwks_uri.lock().unwrap(),
    });
    Response::builder()
        .status(StatusCode::OK)
        .header(header::CONTENT_TYPE, "application/json")
        .body(Body::from(doc.to_string()))
        .unwrap()
}

/// A key source from YAML, with short test intervals unless `extra` overrides them.
fn source(first_line: &str, extra: &str) -> KeySourceConfig {
    let mut yaml = format!("{first_line}\n{extra}\n");
    for (key, default) in [
        ("min_refresh", "200ms"),
        ("max_refresh", "200ms"),
        ("max_stale", "1h"),
        ("unknown_kid_interval", "30s"),
        ("fetch_timeout", "300ms"),
        ("max_bytes", "65536"),
    ] {
        if !extra.contains(key) {
            yaml.push_str(&format!("{key}: {default}\n"));
        }
    }
    serde_yaml::from_str(&yaml).unwrap()
}

fn store_for(issuer: &str, cfg: KeySourceConfig) -> (Arc<KeyStore>, Arc<Metrics>) {
    let metrics = Arc::new(Metrics::new());
    let store = Arc::new(KeyStore::new(
        vec![IssuerKeySource {
            name: "dev".into(),
            issuer: issuer.to_string(),
            source: cfg,
        }],
        metrics.clone(),
    ));
    (store, metrics)
}

/// A store for the issuer `https://idp.test` whose keys come from `server`'s `/jwks`, with
/// the short test intervals of `source` unless `extra` overrides them.
fn url_store(server: &TestServer, extra: &str) -> (Arc<KeyStore>, Arc<Metrics>) {
    store_for(
        "https://idp.test",
        source(&format!("url: {}", server.url()), extra),
    )
}

fn fetches(metrics: &Metrics, result: &'static str) -> u64 {
    metrics
        .jwks_fetches
        .get_or_create(&IssuerResultLabels {
            issuer: "dev".to_string(),
            result,
        })
        .get()
}

fn kids(set: &KeySet) -> Vec<String> {
    set.keys.iter().filter_map(|k| k.kid.clone()).collect()
}

/// Polls `cond` every 10 ms until it holds, failing the test after `limit`.
async fn eventually(what: &str, limit: Duration, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn url_source_loads_at_start_and_reports_status() {
    let server = TestServer::start(Mode::SetA).await;
    let (store, metrics) = url_store(&server, "");
    assert!(!store.ready(), "nothing is loaded before start");
    assert!(matches!(store.get("dev"), Err(KeyError::NotLoaded { .. })));

    store.start().await;
    assert!(store.ready());
    assert_eq!(kids(&store.get("dev").unwrap()), vec!["rsa2048"]);
    let status = store.status();
    assert_eq!(status.len(), 1);
    assert_eq!(&*status[0].name, "dev");
    assert!(status[0].usable);
    assert_eq!(status[0].key_count, 1);
    assert!(status[0].last_good.is_some());
    assert_eq!(status[0].last_error, None);
    assert_eq!(fetches(&metrics, "ok"), 1);
    assert_eq!(
        store.get("other").unwrap_err(),
        KeyError::UnknownIssuer("other".into())
    );
}

#[tokio::test]
async fn file_source_loads_at_start_and_is_reread() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("keys.json");
    std::fs::write(&path, SET_A).unwrap();
    let (store, metrics) = store_for(
        "https://idp.test",
        source(&format!("file: {}", path.display()), ""),
    );
    store.start().await;
    assert!(store.ready());
    assert_eq!(kids(&store.get("dev").unwrap()), vec!["rsa2048"]);
    assert!(fetches(&metrics, "ok") >= 1);

    // Replace the file atomically; the next re-read (every min_refresh) publishes it.
    let tmp = dir.path().join("keys.json.new");
    std::fs::write(&tmp, SET_B).unwrap();
    std::fs::rename(&tmp, &path).unwrap();
    eventually("file re-read with set B", Duration::from_secs(5), || {
        store.get("dev").is_ok_and(|s| kids(&s) == ["ec-p256"])
    })
    .await;
}

/// An enormous refresh interval (the config refuses one past 24h; `KeyStore` takes any)
/// used to overflow `Instant + delay`: every load panicked after publishing, the next one
/// was due at once, and the refresh loop spun at thousands of loads a second.
#[tokio::test]
async fn an_enormous_refresh_interval_neither_panics_nor_spins() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("keys.json");
    std::fs::write(&path, SET_A).unwrap();
    let (store, metrics) = store_for(
        "https://idp.test",
        source(
            &format!("file: {}", path.display()),
            "min_refresh: 300000000000y\nmax_refresh: 300000000000y",
        ),
    );
    store.start().await;
    assert!(store.ready());
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(fetches(&metrics, "ok"), 1);
}

#[tokio::test]
async fn missing_file_is_not_loaded_with_reason() {
    let (store, metrics) = store_for(
        "https://idp.test",
        source("file: /nonexistent/portcullis/keys.json", ""),
    );
    store.start().await;
    assert!(!store.ready());
    match store.get("dev") {
        Err(KeyError::NotLoaded { issuer, reason }) => {
            assert_eq!(issuer, "dev");
            assert!(reason.contains("cannot read key file"), "{reason}");
        }
        other => panic!("expected NotLoaded, got {other:?}"),
    }
    assert_eq!(fetches(&metrics, "io"), 1);
}

#[tokio::test]
async fn discovery_follows_jwks_uri() {
    let server = TestServer::start(Mode::SetA).await;
    let (store, metrics) = store_for(&server.base(), source("discovery: true", ""));
    store.start().await;
    assert!(store.ready(), "{:?}", store.status());
    assert_eq!(kids(&store.get("dev").unwrap()), vec!["rsa2048"]);
    assert_eq!(server.state.discovery_hits.load(Ordering::SeqCst), 1);
    assert_eq!(server.hits(), 1);
    assert_eq!(fetches(&metrics, "ok"), 1);
}

#[tokio::test]
async fn discovery_with_another_issuer_is_refused() {
    let server = TestServer::start(Mode::SetA).await;
    *server.state.discovery_issuer.lock().unwrap() = "https://evil.example".into();
    let (store, metrics) = store_for(&server.base(), source("discovery: true", ""));
    store.start().await;
    assert!(!store.ready());
    let err = store.get("dev").unwrap_err().to_string();
    assert!(
        err.contains("evil.example") && err.contains("expected"),
        "{err}"
    );
    assert_eq!(fetches(&metrics, "discovery"), 1);
    assert_eq!(
        server.hits(),
        0,
        "the JWKS of a mismatched issuer is never fetched"
    );
}

#[tokio::test]
async fn discovery_pointing_to_plain_http_elsewhere_is_refused() {
    let server = TestServer::start(Mode::SetA).await;
    *server.state.discovery_jwks_uri.lock().unwrap() = "http://keys.example.com/jwks".into();
    let (store, metrics) = store_for(&server.base(), source("discovery: true", ""));
    store.start().await;
    assert!(!store.ready());
    assert_eq!(fetches(&metrics, "insecure"), 1);
}

#[tokio::test]
async fn plain_http_url_to_non_loopback_host_is_refused() {
    let (store, metrics) = store_for(
        "https://idp.test",
        source("url: http://keys.example.com/jwks", ""),
    );
    store.start().await;
    assert!(!store.ready());
    let err = store.get("dev").unwrap_err().to_string();
    assert!(err.contains("must use https"), "{err}");
    assert_eq!(fetches(&metrics, "insecure"), 1);
}

#[tokio::test]
async fn two_sources_for_one_issuer_are_refused() {
    let (store, metrics) = store_for(
        "https://idp.test",
        source("url: https://idp.test/jwks", "discovery: true"),
    );
    store.start().await;
    assert!(!store.ready());
    assert_eq!(fetches(&metrics, "config"), 1);
}

/// Every failure class on a never-loaded issuer: not ready, `NotLoaded` (`NoUsableKeys` for a
/// set with no usable key) naming the error, and the result code counted.
#[tokio::test]
async fn each_failure_class_fails_closed_with_its_code() {
    let cases = [
        (Mode::Status500, "http_status", "500"),
        (Mode::Garbage, "not_json", "not valid JSON"),
        (Mode::WeakOnly, "no_keys", "no usable key"),
        (Mode::Empty, "no_keys", "no usable key"),
        (Mode::Endless, "too_large", "byte limit"),
        (Mode::RedirectOtherHost, "redirect", "redirect"),
        (Mode::SlowThenB, "timeout", "timed out"),
    ];
    for (mode, code, text) in cases {
        let server = TestServer::start(mode).await;
        let (store, metrics) = url_store(&server, "fetch_timeout: 1s");
        let started = Instant::now();
        store.start().await;
        assert!(
            started.elapsed() < Duration::from_secs(3),
            "{mode:?}: the first attempt must be bounded by fetch_timeout"
        );
        assert!(!store.ready(), "{mode:?}");
        // A well-formed set with no usable key is the issuer's answer: "publishes no usable
        // key", even on the first load; every other failure leaves it not loaded.
        let reason = match (store.get("dev"), code) {
            (Err(KeyError::NoUsableKeys { reason, .. }), "no_keys") => reason,
            (Err(KeyError::NotLoaded { reason, .. }), c) if c != "no_keys" => reason,
            (other, _) => panic!("{mode:?}: got {other:?}"),
        };
        assert!(reason.contains(text), "{mode:?}: {reason}");
        assert_eq!(fetches(&metrics, code), 1, "{mode:?}");
        assert_eq!(fetches(&metrics, "ok"), 0, "{mode:?}");
        let status = &store.status()[0];
        assert!(!status.usable && status.key_count == 0 && status.last_good.is_none());
        assert!(
            status
                .last_error
                .as_deref()
                .is_some_and(|e| e.contains(text))
        );
        store.shutdown();
    }
}

#[tokio::test]
async fn connection_refused_is_classified() {
    let server = TestServer::start(Mode::SetA).await;
    let url = server.url();
    server.stop().await;
    let (store, metrics) = store_for("https://idp.test", source(&format!("url: {url}"), ""));
    store.start().await;
    assert!(!store.ready());
    let err = store.get("dev").unwrap_err().to_string();
    assert!(err.contains("connection refused"), "{err}");
    assert_eq!(fetches(&metrics, "refused"), 1);
}

#[tokio::test]
async fn https_to_a_plain_http_server_is_a_tls_failure() {
    // An https URL pointing at a plain-HTTP server: the TLS handshake fails.
    let server = TestServer::start(Mode::SetA).await;
    let url = format!("https://{}/jwks", server.state.addr);
    let (store, metrics) = store_for("https://idp.test", source(&format!("url: {url}"), ""));
    store.start().await;
    assert!(!store.ready());
    assert_eq!(fetches(&metrics, "tls"), 1, "{:?}", store.status());
    let err = store.get("dev").unwrap_err().to_string();
    assert!(err.contains("tls failure"), "{err}");
}

/// A TLS server presenting a self-signed certificate: the handshake succeeds on the server's
/// side only up to the client's certificate check, which must reject it.
async fn untrusted_tls_server() -> SocketAddr {
    use tokio_rustls::rustls;
    use tokio_rustls::rustls::pki_types::pem::PemObject;
    use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};

    let certs = vec![
        CertificateDer::from_pem_slice(include_bytes!("fixtures/tls/self-signed.crt")).unwrap(),
    ];
    let key =
        PrivateKeyDer::from_pem_slice(include_bytes!("fixtures/tls/self-signed.key")).unwrap();
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                // The client aborts the handshake; nothing to serve.
                let _ = acceptor.accept(tcp).await;
            });
        }
    });
    addr
}

#[tokio::test]
async fn untrusted_certificate_is_a_tls_failure() {
    let addr = untrusted_tls_server().await;
    let (store, metrics) = store_for(
        "https://idp.test",
        source(&format!("url: https://{addr}/jwks"), ""),
    );
    store.start().await;
    assert!(!store.ready());
    let err = store.get("dev").unwrap_err().to_string();
    assert!(
        err.contains("tls failure") && err.contains("certificate"),
        "{err}"
    );
    assert_eq!(fetches(&metrics, "tls"), 1);
}

#[tokio::test]
async fn too_large_with_content_length_is_refused() {
    let server = TestServer::start(Mode::SetA).await;
    let (store, metrics) = url_store(&server, "max_bytes: 100");
    store.start().await;
    assert!(!store.ready());
    assert_eq!(fetches(&metrics, "too_large"), 1);
}

#[tokio::test]
async fn same_origin_redirect_is_followed() {
    let server = TestServer::start(Mode::RedirectSameOrigin).await;
    let (store, metrics) = url_store(&server, "");
    store.start().await;
    assert!(store.ready(), "{:?}", store.status());
    assert_eq!(kids(&store.get("dev").unwrap()), vec!["rsa2048"]);
    assert_eq!(fetches(&metrics, "ok"), 1);
}

#[tokio::test]
async fn background_refresh_picks_up_rotation() {
    let server = TestServer::start(Mode::SetA).await;
    let (store, _metrics) = url_store(&server, "");
    store.start().await;
    assert_eq!(kids(&store.get("dev").unwrap()), vec!["rsa2048"]);
    server.set_mode(Mode::SetB);
    eventually("refresh to set B", Duration::from_secs(5), || {
        store.get("dev").is_ok_and(|s| kids(&s) == ["ec-p256"])
    })
    .await;
}

#[tokio::test]
async fn cache_control_max_age_is_clamped_into_bounds() {
    // max-age=3600 clamped to max_refresh 60s: no refetch within the next second.
    let server = TestServer::start(Mode::SetA).await;
    *server.state.cache_control.lock().unwrap() = Some("public, max-age=3600".into());
    let (store, _m) = url_store(&server, "max_refresh: 60s");
    store.start().await;
    assert_eq!(server.hits(), 1);
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(server.hits(), 1, "max-age must defer the next refresh");

    // no-cache (max-age 0) is raised to min_refresh: refreshes keep coming, but not in a loop.
    let server2 = TestServer::start(Mode::SetA).await;
    *server2.state.cache_control.lock().unwrap() = Some("no-cache".into());
    let (store2, _m2) = url_store(&server2, "max_refresh: 60s");
    let started = Instant::now();
    store2.start().await;
    eventually("three refreshes", Duration::from_secs(5), || {
        server2.hits() >= 4
    })
    .await;
    // Three intervals of at least min_refresh (200ms) each.
    assert!(started.elapsed() >= Duration::from_millis(600));
}

#[tokio::test]
async fn unknown_kid_flood_is_a_single_fetch() {
    let server = TestServer::start(Mode::SetA).await;
    let (store, metrics) = url_store(&server, "min_refresh: 60s\nmax_refresh: 60s");
    store.start().await;
    assert_eq!(server.hits(), 1);
    server.set_mode(Mode::SetB);

    let mut calls = tokio::task::JoinSet::new();
    for _ in 0..1000 {
        let store = store.clone();
        calls.spawn(async move {
            store
                .refresh_for_unknown_kid("dev", Duration::from_secs(3))
                .await
        });
    }
    let mut got_new = 0;
    while let Some(r) = calls.join_next().await {
        if let Some(set) = r.unwrap() {
            assert_eq!(kids(&set), vec!["ec-p256"]);
            got_new += 1;
        }
    }
    assert_eq!(
        server.hits(),
        2,
        "1000 unknown kids must cause exactly one fetch"
    );
    assert!(
        got_new >= 1,
        "the caller that triggered the fetch gets the new set"
    );
    assert_eq!(kids(&store.get("dev").unwrap()), vec!["ec-p256"]);

    // Within unknown_kid_interval another unknown kid neither fetches nor waits.
    let t = Instant::now();
    assert!(
        store
            .refresh_for_unknown_kid("dev", Duration::from_secs(3))
            .await
            .is_none()
    );
    assert!(t.elapsed() < Duration::from_secs(1));
    assert_eq!(server.hits(), 2);
    assert_eq!(fetches(&metrics, "ok"), 2);
}

#[tokio::test]
async fn unknown_kid_refetch_of_an_unchanged_set_returns_none() {
    let server = TestServer::start(Mode::SetA).await;
    let (store, _m) = url_store(&server, "min_refresh: 60s\nmax_refresh: 60s");
    store.start().await;
    let before = store.get("dev").unwrap();
    assert!(
        store
            .refresh_for_unknown_kid("dev", Duration::from_secs(3))
            .await
            .is_none()
    );
    assert_eq!(server.hits(), 2, "the refetch happened");
    assert!(Arc::ptr_eq(&before, &store.get("dev").unwrap()));
}

#[tokio::test]
async fn unknown_kid_interval_allows_a_later_refetch() {
    let server = TestServer::start(Mode::SetA).await;
    let (store, _m) = url_store(
        &server,
        "min_refresh: 60s\nmax_refresh: 60s\nunknown_kid_interval: 300ms",
    );
    store.start().await;
    assert!(
        store
            .refresh_for_unknown_kid("dev", Duration::from_secs(3))
            .await
            .is_none()
    );
    assert!(
        store
            .refresh_for_unknown_kid("dev", Duration::from_secs(3))
            .await
            .is_none()
    );
    assert_eq!(server.hits(), 2);
    server.set_mode(Mode::SetB);
    let deadline = Instant::now() + Duration::from_secs(5);
    let new = loop {
        if let Some(set) = store
            .refresh_for_unknown_kid("dev", Duration::from_secs(3))
            .await
        {
            break set;
        }
        assert!(Instant::now() < deadline, "no refetch after the interval");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(kids(&new), vec!["ec-p256"]);
    assert_eq!(server.hits(), 3);
}

#[tokio::test]
async fn unknown_kid_caller_waits_at_most_wait() {
    let server = TestServer::start(Mode::SetA).await;
    let (store, _m) = url_store(
        &server,
        "min_refresh: 60s\nmax_refresh: 60s\nfetch_timeout: 5s",
    );
    store.start().await;
    server.set_mode(Mode::SlowThenB);
    let t = Instant::now();
    let got = store
        .refresh_for_unknown_kid("dev", Duration::from_millis(100))
        .await;
    assert!(got.is_none());
    assert!(t.elapsed() < Duration::from_secs(1), "{:?}", t.elapsed());
    // The old set stays in use meanwhile, and the fetch completes on its own.
    assert_eq!(kids(&store.get("dev").unwrap()), vec!["rsa2048"]);
    eventually("slow fetch lands", Duration::from_secs(6), || {
        store.get("dev").is_ok_and(|s| kids(&s) == ["ec-p256"])
    })
    .await;
}

#[tokio::test]
async fn failures_keep_last_good_set_until_max_stale_then_fail_closed() {
    let server = TestServer::start(Mode::SetA).await;
    let (store, metrics) = url_store(&server, "max_stale: 1500ms");
    store.start().await;
    assert!(store.ready());
    server.set_mode(Mode::Status500);

    eventually("a failed refresh", Duration::from_secs(5), || {
        fetches(&metrics, "http_status") >= 1
    })
    .await;
    // Failing, but within max_stale: still usable, the error is reported.
    assert_eq!(kids(&store.get("dev").unwrap()), vec!["rsa2048"]);
    let status = &store.status()[0];
    assert!(status.usable);
    assert!(
        status
            .last_error
            .as_deref()
            .is_some_and(|e| e.contains("500"))
    );

    eventually("keys go stale", Duration::from_secs(5), || !store.ready()).await;
    match store.get("dev") {
        Err(KeyError::Stale {
            issuer,
            age_secs,
            reason,
        }) => {
            assert_eq!(issuer, "dev");
            assert!(age_secs >= 1);
            assert!(reason.contains("500"), "{reason}");
        }
        other => panic!("expected Stale, got {other:?}"),
    }
    assert!(!store.status()[0].usable);

    // Retries continue with backoff; once the issuer recovers, so does the store.
    server.set_mode(Mode::SetB);
    eventually("recovery", Duration::from_secs(5), || store.ready()).await;
    assert_eq!(kids(&store.get("dev").unwrap()), vec!["ec-p256"]);
    assert_eq!(store.status()[0].last_error, None);
}

/// Withdrawing every published key (or publishing only keys Portcullis cannot use) is how an
/// issuer withdraws a compromised key. Such an answer used to count as a failed fetch, and the
/// withdrawn key stayed trusted until `max_stale` (a day by default): now it replaces the set
/// at the next load, and a usable set published again is picked up as fast.
#[tokio::test]
async fn a_key_set_without_usable_keys_withdraws_the_keys_in_force() {
    for mode in [Mode::Empty, Mode::EncOnly, Mode::P521Only, Mode::WeakOnly] {
        let server = TestServer::start(Mode::SetA).await;
        let (store, metrics) = url_store(&server, "max_stale: 1h");
        store.start().await;
        assert_eq!(kids(&store.get("dev").unwrap()), vec!["rsa2048"]);

        server.set_mode(mode);
        eventually("the keys are withdrawn", Duration::from_secs(5), || {
            store.get("dev").is_err()
        })
        .await;
        match store.get("dev") {
            Err(KeyError::NoUsableKeys { issuer, reason }) => {
                assert_eq!(issuer, "dev");
                assert!(reason.contains("no usable key"), "{mode:?}: {reason}");
            }
            other => panic!("{mode:?}: expected NoUsableKeys, got {other:?}"),
        }
        assert!(!store.ready(), "{mode:?}");
        let status = &store.status()[0];
        assert!(
            !status.usable && status.key_count == 0,
            "{mode:?}: {status:?}"
        );
        assert!(
            status
                .last_error
                .as_deref()
                .is_some_and(|e| e.contains("no usable key")),
            "{mode:?}: {status:?}"
        );
        assert!(fetches(&metrics, "no_keys") >= 1, "{mode:?}");

        // Once the issuer publishes a usable key again, it is in force within min_refresh.
        server.set_mode(Mode::SetB);
        eventually("the new key is loaded", Duration::from_secs(5), || {
            store.get("dev").is_ok_and(|s| kids(&s) == ["ec-p256"])
        })
        .await;
        assert!(store.ready());
        assert_eq!(store.status()[0].last_error, None);
        store.shutdown();
    }
}

/// A genuine failure (not JSON) after the withdrawal keeps the issuer without keys: the
/// withdrawn set does not come back, nor does a failure turn into "stale" before `max_stale`.
#[tokio::test]
async fn a_failure_after_a_withdrawal_keeps_the_issuer_without_keys() {
    let server = TestServer::start(Mode::SetA).await;
    let (store, metrics) = url_store(&server, "");
    store.start().await;
    server.set_mode(Mode::Empty);
    eventually("the keys are withdrawn", Duration::from_secs(5), || {
        matches!(store.get("dev"), Err(KeyError::NoUsableKeys { .. }))
    })
    .await;
    server.set_mode(Mode::Garbage);
    eventually("a failed load", Duration::from_secs(5), || {
        fetches(&metrics, "not_json") >= 1
    })
    .await;
    assert!(matches!(
        store.get("dev"),
        Err(KeyError::NoUsableKeys { .. })
    ));
    assert_eq!(store.status()[0].key_count, 0);
}

/// Genuine failures of every class keep the last good set (until `max_stale`): only a
/// well-formed answer withdraws keys.
#[tokio::test]
async fn genuine_failures_keep_the_last_good_set() {
    for (mode, code) in [
        (Mode::Garbage, "not_json"),
        (Mode::Status500, "http_status"),
        (Mode::Endless, "too_large"),
    ] {
        let server = TestServer::start(Mode::SetA).await;
        let (store, metrics) = url_store(&server, "");
        store.start().await;
        server.set_mode(mode);
        eventually("a failed load", Duration::from_secs(5), || {
            fetches(&metrics, code) >= 1
        })
        .await;
        assert_eq!(
            kids(&store.get("dev").unwrap()),
            vec!["rsa2048"],
            "{mode:?}"
        );
        assert!(store.ready(), "{mode:?}");
        store.shutdown();
    }
}

/// A local key file emptied to `{"keys":[]}` withdraws its keys at the next re-read (every
/// `min_refresh`); it used to keep them until `max_stale`.
#[tokio::test]
async fn an_emptied_key_file_withdraws_its_keys() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("keys.json");
    std::fs::write(&path, SET_A).unwrap();
    let (store, metrics) = store_for(
        "https://idp.test",
        source(&format!("file: {}", path.display()), "max_stale: 1h"),
    );
    store.start().await;
    assert!(store.ready());

    let tmp = dir.path().join("keys.json.new");
    std::fs::write(&tmp, EMPTY).unwrap();
    std::fs::rename(&tmp, &path).unwrap();
    eventually(
        "the file's keys are withdrawn",
        Duration::from_secs(5),
        || matches!(store.get("dev"), Err(KeyError::NoUsableKeys { .. })),
    )
    .await;
    assert!(!store.ready());
    assert!(fetches(&metrics, "no_keys") >= 1);

    // A file that cannot be read is a failure, not an answer: the (empty) set stays.
    std::fs::remove_file(&path).unwrap();
    eventually("a failed re-read", Duration::from_secs(5), || {
        fetches(&metrics, "io") >= 1
    })
    .await;
    assert!(matches!(
        store.get("dev"),
        Err(KeyError::NoUsableKeys { .. })
    ));
}

#[tokio::test]
async fn server_going_down_keeps_last_good_set() {
    let server = TestServer::start(Mode::SetA).await;
    let (store, metrics) = url_store(&server, "");
    store.start().await;
    server.stop().await;
    eventually("a refused refresh", Duration::from_secs(5), || {
        fetches(&metrics, "refused") >= 1
    })
    .await;
    assert_eq!(kids(&store.get("dev").unwrap()), vec!["rsa2048"]);
    assert!(store.ready());
}

#[tokio::test]
async fn failed_fetches_are_retried_with_backoff() {
    let server = TestServer::start(Mode::Status500).await;
    let (store, metrics) = url_store(&server, "");
    store.start().await;
    assert!(!store.ready());
    eventually("a retry", Duration::from_secs(5), || server.hits() >= 2).await;
    // Retries are spaced: min_refresh is 200ms here, so one second holds at most ~6 attempts.
    let before = server.hits();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let during = server.hits() - before;
    assert!((1..=7).contains(&during), "{during} retries in one second");
    server.set_mode(Mode::SetA);
    eventually("load after retries", Duration::from_secs(5), || {
        store.ready()
    })
    .await;
    assert!(fetches(&metrics, "http_status") >= 2);
}

#[tokio::test]
async fn dropping_the_store_stops_background_refresh() {
    let server = TestServer::start(Mode::SetA).await;
    let (store, _m) = url_store(&server, "");
    store.start().await;
    eventually("background refreshes", Duration::from_secs(5), || {
        server.hits() >= 3
    })
    .await;
    drop(store);
    // A fetch in progress at the drop may still land.
    let at_drop = server.hits();
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert!(
        server.hits() <= at_drop + 1,
        "refreshes continued after drop"
    );
}

#[tokio::test]
async fn shutdown_stops_background_refresh_but_keeps_answering() {
    let server = TestServer::start(Mode::SetA).await;
    let (store, _m) = url_store(&server, "");
    store.start().await;
    eventually("background refreshes", Duration::from_secs(5), || {
        server.hits() >= 2
    })
    .await;
    store.shutdown();
    let at_stop = server.hits();
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert!(
        server.hits() <= at_stop + 1,
        "refreshes continued after shutdown"
    );
    assert!(store.get("dev").is_ok());
}

#[tokio::test]
async fn several_issuers_are_independent() {
    let good = TestServer::start(Mode::SetA).await;
    let bad = TestServer::start(Mode::Status500).await;
    let metrics = Arc::new(Metrics::new());
    let store = Arc::new(KeyStore::new(
        vec![
            IssuerKeySource {
                name: "good".into(),
                issuer: "https://good.test".into(),
                source: source(&format!("url: {}", good.url()), ""),
            },
            IssuerKeySource {
                name: "bad".into(),
                issuer: "https://bad.test".into(),
                source: source(&format!("url: {}", bad.url()), ""),
            },
        ],
        metrics,
    ));
    store.start().await;
    assert!(store.get("good").is_ok());
    assert!(matches!(store.get("bad"), Err(KeyError::NotLoaded { .. })));
    assert!(!store.ready(), "ready needs every issuer");
    let names: Vec<_> = store.status().iter().map(|s| s.name.to_string()).collect();
    assert_eq!(names, vec!["good", "bad"]);
    assert!(
        store
            .refresh_for_unknown_kid("nope", Duration::from_millis(10))
            .await
            .is_none()
    );
}

#[tokio::test]
async fn an_empty_store_is_ready() {
    let store = Arc::new(KeyStore::new(vec![], Arc::new(Metrics::new())));
    store.start().await;
    assert!(store.ready());
    assert!(store.status().is_empty());
}

/// A fake HTTP proxy on loopback answering every request (a CONNECT too) with set B, as an
/// attacker's proxy would serve its own keys. Returns its address and the request lines seen.
fn fake_proxy() -> (SocketAddr, Arc<Mutex<Vec<String>>>) {
    use std::io::{BufRead, BufReader, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let log = seen.clone();
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { continue };
            let log = log.clone();
            std::thread::spawn(move || {
                let mut reader = BufReader::new(conn.try_clone().unwrap());
                let mut first = String::new();
                if reader.read_line(&mut first).is_err() {
                    return;
                }
                log.lock().unwrap().push(first.trim_end().to_string());
                let mut line = String::new();
                while reader.read_line(&mut line).is_ok_and(|n| n > 2) {
                    line.clear();
                }
                let answer = format!(
                    "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n\
                     content-length: {}\r\nconnection: close\r\n\r\n{SET_B}",
                    SET_B.len()
                );
                let _ = conn.write_all(answer.as_bytes());
            });
        }
    });
    (addr, seen)
}

/// Loopback key URLs may be plain HTTP; they used to go through the environment's
/// `HTTP_PROXY`/`ALL_PROXY` like any other, in cleartext, and a proxy serving its own keys had
/// its tokens accepted. They now never use a proxy; remote URLs still do, and through it an
/// HTTPS URL is a tunnel whose certificate is checked, so the proxy cannot answer for it.
///
/// The proxy settings are read from the environment when the store's clients are built, and
/// the environment is shared by every test of this process, so the checks run in a child
/// process (this test binary, running only this test) given the proxy variables; the proxy
/// runs here and tells which requests reached it.
#[test]
fn loopback_key_urls_never_go_through_a_proxy() {
    const CHILD: &str = "PORTCULLIS_TEST_PROXY_CHILD";
    if std::env::var_os(CHILD).is_some() {
        return proxy_child();
    }
    let (proxy, seen) = fake_proxy();
    let proxy = format!("http://{proxy}");
    let mut child = std::process::Command::new(std::env::current_exe().unwrap());
    child
        .args([
            "--exact",
            "loopback_key_urls_never_go_through_a_proxy",
            "--test-threads=1",
            "--nocapture",
        ])
        .env(CHILD, "1")
        .env_remove("NO_PROXY")
        .env_remove("no_proxy")
        .env_remove("HTTPS_PROXY")
        .env_remove("https_proxy")
        .env_remove("REQUEST_METHOD");
    for var in ["HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy"] {
        child.env(var, &proxy);
    }
    let out = child.output().unwrap();
    let output = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "child failed:\n{output}");
    assert!(
        output.contains("1 passed"),
        "the child ran no test:\n{output}"
    );
    let seen = seen.lock().unwrap().clone();
    assert!(
        !seen
            .iter()
            .any(|l| l.contains("127.0.0.1") || l.contains("localhost")),
        "a loopback fetch went through the proxy: {seen:?}"
    );
    assert!(
        seen.iter()
            .any(|l| l.starts_with("GET http://keys.example.test/jwks")),
        "the remote plain-HTTP fetch did not use the proxy: {seen:?}"
    );
    assert!(
        seen.iter()
            .any(|l| l.starts_with("CONNECT keys.example.test:443")),
        "the remote HTTPS fetch did not tunnel through the proxy: {seen:?}"
    );
}

/// The child's half: the same server answers by address and by `localhost`.
fn proxy_child() {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let server = TestServer::start(Mode::SetA).await;
        let port = server.state.addr.port();
        for url in [server.url(), format!("http://localhost:{port}/jwks")] {
            let (store, _m) = store_for("https://idp.test", source(&format!("url: {url}"), ""));
            store.start().await;
            assert_eq!(
                kids(&store.get("dev").unwrap()),
                vec!["rsa2048"],
                "{url}: keys from the proxy, not the issuer"
            );
            store.shutdown();
        }

        // A remote plain-HTTP URL (allowed by `allow_http`) still goes through the proxy.
        let (store, _m) = store_for(
            "https://idp.test",
            source("url: http://keys.example.test/jwks", "allow_http: true"),
        );
        store.start().await;
        assert_eq!(kids(&store.get("dev").unwrap()), vec!["ec-p256"]);
        store.shutdown();

        // A remote HTTPS URL tunnels through it; the proxy's own answer is no TLS server.
        let (store, metrics) = store_for(
            "https://idp.test",
            source("url: https://keys.example.test/jwks", ""),
        );
        store.start().await;
        assert!(store.get("dev").is_err());
        assert_eq!(fetches(&metrics, "ok"), 0);
        store.shutdown();
    });
}

/// Too many keys could have signed a token: the issuer's key set lists more than
/// `MAX_CANDIDATE_KEYS` under the token's `kid`, or the token has none. The message used to
/// say the token "needs a `kid` naming one" even when it named one; it now fits both, and
/// repeats nothing from the token.
#[test]
fn too_many_candidate_keys_is_explained_with_or_without_a_kid() {
    let e = JwtError::TooManyCandidateKeys(9).to_string();
    assert!(e.contains("a token without a `kid` needs a `kid`"), "{e}");
    assert!(e.contains("a `kid` the issuer gives to more keys"), "{e}");
}
