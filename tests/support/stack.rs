//! The pieces of an end-to-end stack: the real `portcullis` binary started on a config file
//! and polled until ready, the shipped Envoy config with its ports rewritten, a recording
//! upstream, HTTP clients, the answer to one request, and polling until something holds.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;

use super::{ChildGuard, free_port, header_values, repo_root, wait_for_status};

/// The header the test upstream puts on every answer, so a test can tell an upstream answer
/// from an Envoy or Portcullis one.
pub const UPSTREAM_MARKER: &str = "x-e2e-upstream";

/// `127.0.0.1:port`.
pub fn loopback(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

/// Starts `portcullis serve --config CONFIG` and waits until its admin `/readyz` on
/// `127.0.0.1:admin` answers 200.
pub fn start_portcullis(name: &str, config: &Path, admin: u16) -> ChildGuard {
    start_portcullis_on(name, config, admin, false)
}

/// As `start_portcullis`; `pinned` runs it under `taskset -c 0` (one CPU).
pub fn start_portcullis_on(name: &str, config: &Path, admin: u16, pinned: bool) -> ChildGuard {
    let mut command = if pinned {
        let mut c = Command::new("taskset");
        c.args(["-c", "0"]).arg(env!("CARGO_BIN_EXE_portcullis"));
        c
    } else {
        Command::new(env!("CARGO_BIN_EXE_portcullis"))
    };
    command.arg("serve").arg("--config").arg(config);
    let mut child = ChildGuard::spawn(name, command);
    wait_for_status(
        &mut child,
        loopback(admin),
        "/readyz",
        200,
        Duration::from_secs(30),
    );
    child
}

/// The real `portcullis` binary on a config of its own (`DIR/NAME.yaml`) with free gRPC and
/// admin ports; it can be stopped and restarted on the same config and ports.
pub struct Portcullis {
    name: String,
    pub config: PathBuf,
    pub grpc: u16,
    pub admin: u16,
    /// Run under `taskset -c 0` (one CPU: the single-threaded scheduler).
    pinned: bool,
    process: Option<ChildGuard>,
}

impl Portcullis {
    /// Writes `config(grpc, admin)` to `dir/NAME.yaml`, starts the binary on it and waits
    /// until it is ready.
    pub fn start(dir: &Path, name: &str, config: impl FnOnce(u16, u16) -> String) -> Portcullis {
        Self::start_on(dir, name, false, config)
    }

    /// As `start`, pinned to one CPU (`taskset -c 0`) when `pinned`.
    pub fn start_on(
        dir: &Path,
        name: &str,
        pinned: bool,
        config: impl FnOnce(u16, u16) -> String,
    ) -> Portcullis {
        let grpc = free_port();
        let admin = free_port();
        let path = dir.join(format!("{name}.yaml"));
        std::fs::write(&path, config(grpc, admin)).unwrap();
        let mut p = Portcullis {
            name: name.to_string(),
            config: path,
            grpc,
            admin,
            pinned,
            process: None,
        };
        p.restart();
        p
    }

    /// Starts the binary on the same config and ports and waits until `/readyz` is 200.
    pub fn restart(&mut self) {
        self.stop();
        self.process = Some(start_portcullis_on(
            &self.name,
            &self.config,
            self.admin,
            self.pinned,
        ));
    }

    /// Kills the process (its ports are free afterwards).
    pub fn stop(&mut self) {
        if let Some(mut p) = self.process.take() {
            p.kill();
        }
    }

    pub fn admin_addr(&self) -> SocketAddr {
        loopback(self.admin)
    }

    /// The process id while it runs (to send it a signal).
    pub fn id(&self) -> Option<u32> {
        self.process.as_ref().and_then(ChildGuard::id)
    }

    /// Waits up to `timeout` for the process to exit by itself (after a signal).
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        self.process.as_mut().and_then(|p| p.wait_exit(timeout))
    }

    /// Both captured streams (empty while stopped).
    pub fn logs(&self) -> String {
        self.process
            .as_ref()
            .map(ChildGuard::logs)
            .unwrap_or_default()
    }

    /// Captured stdout (the audit lines; empty while stopped).
    pub fn stdout(&self) -> String {
        self.process
            .as_ref()
            .map(ChildGuard::stdout)
            .unwrap_or_default()
    }
}

/// Envoy running a shipped config with its admin, listener, authorizer and upstream ports
/// rewritten.
pub struct Envoy {
    /// The listener clients send requests to.
    pub addr: SocketAddr,
    /// Envoy's own admin listener.
    pub admin: SocketAddr,
    pub process: ChildGuard,
}

impl Envoy {
    /// The shipped envoy/envoy.yaml: listener 10000, authorizer `authz_port`, upstream
    /// `upstream_port`.
    pub fn start(dir: &Path, authz_port: u16, upstream_port: u16) -> Envoy {
        Envoy::start_shipped(
            dir,
            "envoy/envoy.yaml",
            10000,
            authz_port,
            upstream_port,
            str::to_string,
        )
    }

    /// The shipped config `file` (relative to the repository root), first passed through
    /// `edit`, with its admin (9901), `listener`, authorizer (9191) and upstream (8080) ports
    /// rewritten to free or given loopback ports (no authorizer port in `envoy/envoy-module.yaml`).
    pub fn start_shipped(
        dir: &Path,
        file: &str,
        listener: u16,
        authz_port: u16,
        upstream_port: u16,
        edit: impl FnOnce(&str) -> String,
    ) -> Envoy {
        Envoy::start_shipped_with(dir, file, listener, authz_port, upstream_port, edit, &[])
    }

    /// [`Envoy::start_shipped`], with more command-line flags for Envoy (`args`).
    pub fn start_shipped_with(
        dir: &Path,
        file: &str,
        listener: u16,
        authz_port: u16,
        upstream_port: u16,
        edit: impl FnOnce(&str) -> String,
        args: &[String],
    ) -> Envoy {
        let listen = free_port();
        let admin = free_port();
        let shipped = edit(&std::fs::read_to_string(repo_root().join(file)).unwrap());
        let mut ports = vec![(9901, admin), (listener, listen), (8080, upstream_port)];
        // The module's wirings have no authorizer cluster: Portcullis runs inside Envoy.
        if !shipped.contains(super::module::FILTER_TYPE) {
            ports.push((9191, authz_port));
        }
        let config = super::rewrite_envoy_config(&shipped, &ports);
        let path = dir.join("envoy.yaml");
        std::fs::write(&path, config).unwrap();
        let process = super::start_envoy_with(&path, loopback(admin), args);
        Envoy {
            addr: loopback(listen),
            admin: loopback(admin),
            process,
        }
    }
}

/// One request as the upstream saw it.
#[derive(Debug, Clone)]
pub struct Seen {
    pub method: String,
    /// Path and query, exactly as received.
    pub path: String,
    /// Lower-case names, in order; duplicates kept.
    pub headers: Vec<(String, String)>,
    /// The request body, whole.
    pub body: Vec<u8>,
}

impl Seen {
    pub fn values(&self, name: &str) -> Vec<&str> {
        header_values(&self.headers, name).collect()
    }
}

/// The upstream: records every request and answers 200 with [`UPSTREAM_MARKER`].
pub struct Upstream {
    pub port: u16,
    pub seen: Arc<Mutex<Vec<Seen>>>,
}

impl Upstream {
    pub async fn start() -> Upstream {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let s = seen.clone();
        let app = axum::Router::new().fallback(move |request: axum::extract::Request| {
            let s = s.clone();
            async move {
                let (parts, body) = request.into_parts();
                let body = axum::body::to_bytes(body, usize::MAX)
                    .await
                    .map(|b| b.to_vec())
                    .unwrap_or_default();
                s.lock().unwrap().push(Seen {
                    method: parts.method.to_string(),
                    path: parts
                        .uri
                        .path_and_query()
                        .map(|p| p.as_str().to_string())
                        .unwrap_or_default(),
                    headers: header_pairs(&parts.headers),
                    body,
                });
                ([(UPSTREAM_MARKER, "1")], "upstream")
            }
        });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        tokio::spawn(async move { axum::serve(listener, app).await });
        Upstream { port, seen }
    }

    /// How many requests reached the upstream.
    pub fn count(&self) -> usize {
        self.seen.lock().unwrap().len()
    }

    /// The requests from the `index`-th on.
    pub fn since(&self, index: usize) -> Vec<Seen> {
        self.seen.lock().unwrap()[index..].to_vec()
    }
}

/// Header names (lower-case) and values, in order, duplicates kept.
pub fn header_pairs(headers: &axum::http::HeaderMap) -> Vec<(String, String)> {
    headers
        .iter()
        .map(|(n, v)| {
            (
                n.as_str().to_string(),
                String::from_utf8_lossy(v.as_bytes()).to_string(),
            )
        })
        .collect()
}

/// `builder` with no proxy and a 10s timeout.
fn client(builder: reqwest::ClientBuilder) -> reqwest::Client {
    builder
        .no_proxy()
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap()
}

/// A plain HTTP client (no proxy, 10s timeout).
pub fn http_client() -> reqwest::Client {
    client(reqwest::Client::builder())
}

/// An HTTP/1.1-only client (no proxy, 10s timeout).
pub fn h1_client() -> reqwest::Client {
    client(reqwest::Client::builder().http1_only())
}

/// An h2c (HTTP/2 with prior knowledge) client (no proxy, 10s timeout).
pub fn h2c_client() -> reqwest::Client {
    client(reqwest::Client::builder().http2_prior_knowledge())
}

/// Sends `method path` with `headers` to `addr` over `client` and reads the answer; with
/// `h2`, checks that it really went over HTTP/2.
pub async fn send_to(
    client: &reqwest::Client,
    addr: SocketAddr,
    h2: bool,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
) -> reqwest::Result<Answer> {
    let mut request = client.request(method.parse().unwrap(), format!("http://{addr}{path}"));
    for (n, v) in headers {
        request = request.header(*n, *v);
    }
    let response = request.send().await?;
    if h2 {
        assert_eq!(response.version(), reqwest::Version::HTTP_2, "h2c expected");
    }
    Ok(Answer::read(response).await)
}

/// The answer to one request through Envoy.
#[derive(Debug)]
pub struct Answer {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl Answer {
    /// Reads the whole response.
    pub async fn read(response: reqwest::Response) -> Answer {
        let status = response.status().as_u16();
        let headers = header_pairs(response.headers());
        let body = response.text().await.unwrap();
        Answer {
            status,
            headers,
            body,
        }
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        header_values(&self.headers, name).next()
    }

    pub fn answered_by_upstream(&self) -> bool {
        self.header(UPSTREAM_MARKER).is_some()
    }

    pub fn json(&self) -> Value {
        serde_json::from_str(&self.body)
            .unwrap_or_else(|e| panic!("body is not JSON ({e}): {:?}", self.body))
    }

    /// The `error` of Portcullis' JSON deny body.
    pub fn error(&self) -> String {
        self.json()["error"]
            .as_str()
            .unwrap_or_default()
            .to_string()
    }
}

/// Polls `check` every 100ms until it returns true, or panics at `timeout` with `what`.
/// Used where the system changes state on its own schedule (key refresh, staleness).
pub async fn eventually<F, Fut>(timeout: Duration, what: &str, mut check: F) -> Duration
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let start = Instant::now();
    loop {
        if check().await {
            return start.elapsed();
        }
        assert!(start.elapsed() < timeout, "{what}: not within {timeout:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
