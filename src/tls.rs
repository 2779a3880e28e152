//! TLS for the gRPC listener: a stream of TLS connections for `grpc::serve`, client
//! certificates verified against `server.tls.client_ca` (so only your Envoy can ask for
//! decisions), and hot reload of the certificate, key and CA files.
//!
//! Owns the listener's TLS state only; never looks at requests or decisions. Reload: the
//! files are read every second (and on SIGHUP); when their contents change a new rustls
//! `ServerConfig` is built and swapped in for new connections. A file that does not load
//! keeps the previous configuration and logs an error, so a half-written certificate never
//! takes the listener down or opens it.

use std::io;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use arc_swap::ArcSwap;
use futures_util::Stream;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::{RootCertStore, ServerConfig};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};
use tokio_rustls::server::TlsStream;

use crate::config::ConfigError;
use crate::config::schema::TlsConfig;
use crate::identity::peer::{PeerCertificate, PrincipalPattern};
use crate::listener::{ConnLimit, ConnPermit};

/// How long a client may take to complete the handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// How often the files are checked for changes.
const RELOAD_INTERVAL: Duration = Duration::from_secs(1);
/// Handshaken connections waiting for the gRPC server to pick them up.
const BACKLOG: usize = 128;

/// Why the TLS configuration could not be built. Names the file, never key material.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read `{file}`: {source}")]
    Read { file: PathBuf, source: io::Error },
    #[error("`{file}` holds no PEM certificate")]
    NoCertificate { file: PathBuf },
    #[error("`{file}` holds no PEM private key")]
    NoKey { file: PathBuf },
    #[error("client CA `{file}`: {reason}")]
    BadCa { file: PathBuf, reason: String },
    #[error("invalid client principal `{0}`")]
    BadPrincipal(String),
    #[error("the private key `{key}` is not the key of the certificate `{cert}`")]
    KeyMismatch { cert: PathBuf, key: PathBuf },
    #[error("the certificate and key do not make a TLS configuration: {0}")]
    Rustls(String),
}

impl TlsFiles {
    /// The config field an error about these files concerns: the file's own field
    /// (`server.tls.cert`, `.key`, `.client_ca`), else the section.
    pub fn field_of(&self, e: &TlsError) -> String {
        // By what went wrong, not by which file: one PEM file may be named by several fields
        // (a bundle holding the certificate and its key), and a key missing from it is the
        // `key` field's fault, not the `cert` field's.
        let name = match e {
            TlsError::NoCertificate { .. } => "cert",
            TlsError::NoKey { .. } | TlsError::KeyMismatch { .. } => "key",
            TlsError::BadCa { .. } => "client_ca",
            TlsError::BadPrincipal(_) => "allowed_client_principals",
            // A file that cannot be read is the first field naming it, in the order read.
            TlsError::Read { file, .. } if *file == self.cert => "cert",
            TlsError::Read { file, .. } if *file == self.key => "key",
            TlsError::Read { file, .. } if self.client_ca.as_ref() == Some(file) => "client_ca",
            TlsError::Read { .. } | TlsError::Rustls(_) => return self.section.to_string(),
        };
        format!("{}.{name}", self.section)
    }

    /// `e` as a config error of `config_file`, naming the field.
    pub fn config_error(&self, config_file: &Path, e: &TlsError) -> ConfigError {
        ConfigError {
            file: config_file.to_path_buf(),
            field: self.field_of(e),
            message: e.to_string(),
            hint: None,
        }
    }
}

/// Loads a config section's TLS files the way its listener does at start (`portcullis
/// check`): unreadable files, a file that is not PEM, a key that is not the certificate's or
/// an unusable client CA is an error naming the config file and the field.
pub fn check_section(
    config_file: &Path,
    section: &'static str,
    tls: &TlsConfig,
) -> Result<(), ConfigError> {
    let base = config_file.parent().unwrap_or(Path::new(""));
    let files = TlsFiles::from_config(section, tls, base).map_err(|e| ConfigError {
        file: config_file.to_path_buf(),
        field: format!("{section}.allowed_client_principals"),
        message: e.to_string(),
        hint: None,
    })?;
    server_config(&files)
        .map(|_| ())
        .map_err(|e| files.config_error(config_file, &e))
}

/// The listener's TLS settings with paths resolved.
#[derive(Debug, Clone)]
pub struct TlsFiles {
    /// The config section these come from (`server.tls`, `server.approvals_tls`), for logs.
    pub section: &'static str,
    pub cert: PathBuf,
    pub key: PathBuf,
    pub client_ca: Option<PathBuf>,
    pub require_client_cert: bool,
    pub allowed_client_principals: Vec<PrincipalPattern>,
}

impl TlsFiles {
    /// From the config section named `section`; relative paths are resolved against `base`
    /// (the config file's folder).
    pub fn from_config(
        section: &'static str,
        tls: &TlsConfig,
        base: &Path,
    ) -> Result<Self, TlsError> {
        let resolve = |p: &Path| crate::keys::resolve_path(base, p);
        let allowed = tls
            .allowed_client_principals
            .iter()
            .map(|p| PrincipalPattern::parse(p).map_err(|_| TlsError::BadPrincipal(p.clone())))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(TlsFiles {
            section,
            cert: resolve(&tls.cert),
            key: resolve(&tls.key),
            client_ca: tls.client_ca.as_deref().map(resolve),
            require_client_cert: tls.require_client_cert,
            allowed_client_principals: allowed,
        })
    }

    fn read_all(&self) -> Result<Vec<Vec<u8>>, TlsError> {
        let mut out = vec![read(&self.cert)?, read(&self.key)?];
        if let Some(ca) = &self.client_ca {
            out.push(read(ca)?);
        }
        Ok(out)
    }
}

fn read(file: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(file).map_err(|source| TlsError::Read {
        file: file.to_path_buf(),
        source,
    })
}

/// Builds a rustls server configuration (aws-lc-rs, TLS 1.2 and 1.3, ALPN `h2`) from the
/// files' current contents.
pub fn server_config(files: &TlsFiles) -> Result<Arc<ServerConfig>, TlsError> {
    let contents = files.read_all()?;
    build(files, &contents)
}

/// The certificates of a PEM file, in order; `None` when it holds none or is not PEM. The
/// server's `cert` and the approvals CLI's `--ca-cert` and `--cert` are read by it.
pub fn pem_certificates(pem: &[u8]) -> Option<Vec<CertificateDer<'static>>> {
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<_, _>>()
        .ok()?;
    (!certs.is_empty()).then_some(certs)
}

fn build(files: &TlsFiles, contents: &[Vec<u8>]) -> Result<Arc<ServerConfig>, TlsError> {
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let certs = pem_certificates(&contents[0]).ok_or_else(|| TlsError::NoCertificate {
        file: files.cert.clone(),
    })?;
    let key = PrivateKeyDer::from_pem_slice(&contents[1]).map_err(|_| TlsError::NoKey {
        file: files.key.clone(),
    })?;
    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Rustls(e.to_string()))?;
    let builder = match (&files.client_ca, contents.get(2)) {
        (Some(ca_file), Some(ca_pem)) => {
            let bad = |reason: String| TlsError::BadCa {
                file: ca_file.clone(),
                reason,
            };
            let mut roots = RootCertStore::empty();
            let mut any = false;
            for cert in CertificateDer::pem_slice_iter(ca_pem) {
                let cert = cert.map_err(|_| bad("not a PEM certificate list".to_string()))?;
                roots
                    .add(cert)
                    .map_err(|e| bad(format!("unusable CA certificate: {e}")))?;
                any = true;
            }
            if !any {
                return Err(bad("holds no PEM certificate".to_string()));
            }
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider);
            let verifier = if files.require_client_cert {
                verifier
            } else {
                verifier.allow_unauthenticated()
            };
            let verifier = verifier.build().map_err(|e| bad(e.to_string()))?;
            builder.with_client_cert_verifier(verifier)
        }
        _ => builder.with_no_client_auth(),
    };
    let mut config = builder.with_single_cert(certs, key).map_err(|e| match e {
        rustls::Error::InconsistentKeys(rustls::InconsistentKeys::KeyMismatch) => {
            TlsError::KeyMismatch {
                cert: files.cert.clone(),
                key: files.key.clone(),
            }
        }
        e => TlsError::Rustls(e.to_string()),
    })?;
    // gRPC is HTTP/2 only.
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Arc::new(config))
}

/// One accepted TLS connection, as the gRPC server serves it.
pub struct TlsConn(TlsStream<TcpStream>);

impl TlsConn {
    /// The client's certificate chain, leaf first (empty without client authentication).
    pub fn peer_certificates(&self) -> &[CertificateDer<'static>] {
        self.0.get_ref().1.peer_certificates().unwrap_or_default()
    }
}

impl AsyncRead for TlsConn {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl AsyncWrite for TlsConn {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.0).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.0).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.0.is_write_vectored()
    }
}

/// The stream of handshaken connections handed to the gRPC server, each with its place
/// under the listener's connection cap.
pub struct Incoming(mpsc::Receiver<io::Result<(TlsConn, ConnPermit)>>);

impl Stream for Incoming {
    type Item = io::Result<(TlsConn, ConnPermit)>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.0.poll_recv(cx)
    }
}

/// Serves TLS on `listener`: handshakes run concurrently (a slow client never blocks the
/// others), refused handshakes are logged at debug level and dropped, and the files are
/// watched for changes until `stop` turns true. A connection takes its place under `limit`
/// before its handshake (past the cap it is closed at once). Fails when the initial files
/// do not load.
pub fn incoming(
    listener: TcpListener,
    files: TlsFiles,
    limit: Arc<ConnLimit>,
    stop: watch::Receiver<bool>,
) -> Result<Incoming, TlsError> {
    let contents = files.read_all()?;
    let current = Arc::new(ArcSwap::new(build(&files, &contents)?));
    let files = Arc::new(files);
    spawn_reloader(files.clone(), contents, current.clone(), stop.clone());
    let (tx, rx) = mpsc::channel(BACKLOG);
    tokio::spawn(accept_loop(listener, files, current, limit, tx, stop));
    Ok(Incoming(rx))
}

async fn accept_loop(
    listener: TcpListener,
    files: Arc<TlsFiles>,
    current: Arc<ArcSwap<ServerConfig>>,
    limit: Arc<ConnLimit>,
    tx: mpsc::Sender<io::Result<(TlsConn, ConnPermit)>>,
    mut stop: watch::Receiver<bool>,
) {
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            _ = stop.wait_for(|s| *s) => return,
        };
        let (tcp, peer) = match accepted {
            Ok(a) => a,
            Err(e) => {
                // Out of file descriptors and similar: back off briefly instead of spinning.
                tracing::warn!(error = %e, "accepting a gRPC connection failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let Some(permit) = limit.admit() else {
            continue;
        };
        let _ = crate::listener::tune_accepted(&tcp);
        let acceptor = tokio_rustls::TlsAcceptor::from(current.load_full());
        let (tx, files) = (tx.clone(), files.clone());
        tokio::spawn(async move {
            let stream = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                Ok(Ok(s)) => TlsConn(s),
                Ok(Err(e)) => {
                    tracing::debug!(client.addr = %peer, error = %e, "TLS handshake refused");
                    return;
                }
                Err(_) => {
                    tracing::debug!(client.addr = %peer, "TLS handshake timed out");
                    return;
                }
            };
            if !client_allowed(&files, &stream) {
                tracing::warn!(
                    client.addr = %peer,
                    "gRPC client certificate carries none of `{}.allowed_client_principals`; connection closed",
                    files.section
                );
                return;
            }
            let _ = tx.send(Ok((stream, permit))).await;
        });
    }
}

/// With `allowed_client_principals`, the client's leaf certificate must carry one of them.
fn client_allowed(files: &TlsFiles, conn: &TlsConn) -> bool {
    if files.allowed_client_principals.is_empty() {
        return true;
    }
    let Some(leaf) = conn.peer_certificates().first() else {
        return false;
    };
    let Ok(cert) = PeerCertificate::from_der(leaf) else {
        return false;
    };
    cert.uri_sans.iter().any(|san| {
        files
            .allowed_client_principals
            .iter()
            .any(|p| p.matches(san))
    })
}

/// Re-reads the files every second and on SIGHUP; swaps in a new configuration when their
/// contents changed and load.
fn spawn_reloader(
    files: Arc<TlsFiles>,
    mut last: Vec<Vec<u8>>,
    current: Arc<ArcSwap<ServerConfig>>,
    mut stop: watch::Receiver<bool>,
) {
    tokio::spawn(async move {
        let mut hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).ok();
        // Unreadable files are reported once per distinct error, not every second.
        let mut last_error = String::new();
        let mut tick = tokio::time::interval(RELOAD_INTERVAL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let hup_signal = async {
                match hup.as_mut() {
                    Some(h) => {
                        h.recv().await;
                    }
                    None => std::future::pending::<()>().await,
                }
            };
            let forced = tokio::select! {
                _ = tick.tick() => false,
                _ = hup_signal => true,
                _ = stop.wait_for(|s| *s) => return,
            };
            let contents = match files.read_all() {
                Ok(c) => c,
                Err(e) => {
                    // Mid-rotation (a file briefly missing) or a real mistake: keep serving.
                    let text = e.to_string();
                    if forced || text != last_error {
                        tracing::error!(error = %text, "TLS files unreadable; keeping the current certificate");
                        last_error = text;
                    }
                    continue;
                }
            };
            last_error.clear();
            if contents == last && !forced {
                continue;
            }
            match build(&files, &contents) {
                Ok(config) => {
                    current.store(config);
                    tracing::info!(cert = %files.cert.display(), "TLS certificate reloaded");
                }
                Err(e) => {
                    tracing::error!(error = %e, "new TLS files do not load; keeping the current certificate");
                }
            }
            // Remember what was tried, so a bad file is reported once, not every second.
            last = contents;
        }
    });
}
