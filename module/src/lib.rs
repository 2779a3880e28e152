//! Portcullis inside Envoy, as an HTTP dynamic module (README "Inside Envoy";
//! `envoy/envoy-module.yaml` is the shipped wiring).
//!
//! The ext_authz hop costs Envoy ~28 µs of CPU per request (README, "Where the cost is"),
//! more than the decision itself. This module removes it: Envoy loads
//! `libportcullis_envoy_module.so`, whose filter config is the path of a Portcullis config.
//! The module runs that config's whole Portcullis server on a background thread (listeners,
//! admin `/metrics` and `/readyz`, config reload on change (SIGHUP stays Envoy's), key
//! refresh, revocation list, approvals API), and Envoy's worker threads decide each request
//! through the server's own `AuthzService::decide_view` (same engine, token cache, metrics
//! and audit line) from the request-headers hook:
//! - An allow sets the identity headers on the request (and removes the ones it has no value
//!   for), and adds the decision's quota headers (`RateLimit`) to the response.
//! - A deny is Envoy's local reply with Portcullis's status, challenge and JSON body.
//! - A decision that has to wait (an unknown `kid` refetch, Redis for rate limits, approvals
//!   or DPoP replay) holds the request (headers, body and trailers, like ext_authz) and is
//!   resumed on the request's worker thread through Envoy's scheduler when it can go on.
//! - An mTLS client's principal and certificate thumbprint come from Envoy's connection
//!   attributes (first URI SAN, else subject; SHA-256 of the DER), and every URI SAN from
//!   the certificate in `x-forwarded-client-cert` when the listener forwards it, for
//!   principal rules and certificate-bound tokens.
//!
//! The part of Envoy's C ABI it uses is declared by hand (`abi.rs`), as the official SDK is
//! not on crates.io: for Envoy 1.40 (checked) and 1.41 (Envoy keeps a module's ABI for one
//! more minor); the module refuses to load into any other Envoy. There is no body digest for
//! approvals (the shipped ext_authz wiring sends no body either).

mod abi;
mod envoy;
#[cfg(test)]
mod fake_envoy;

use std::borrow::Cow;
use std::ffi::c_void;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, Mutex, Weak};
use std::task::{Context, Poll, Waker};

use portcullis::authz::{Decision, Headers, ReasonCode, RequestView};
use portcullis::engine::Engine;
use portcullis::grpc::wire::TooManyHeaders;
use portcullis::grpc::{AuthzService, DenyAnswer, UpstreamMutation};
use portcullis::identity::peer::PeerCertificate;
use portcullis::server::Server;

use envoy::{Filter, Hook, Scheduler};

/// One running Portcullis (one config file), shared by every filter config in Envoy that
/// names the same file: a listener update makes Envoy build the new filter config before it
/// drops the old one, and both then use the same server instead of fighting over its ports.
pub struct Module {
    service: AuthzService,
    /// The background thread's runtime: entered while a decision is polled on Envoy's
    /// thread, so the timers and sockets it creates have a driver.
    runtime: tokio::runtime::Handle,
    /// Dropped with the last filter config: the server shuts down and its thread ends.
    _stop: tokio::sync::oneshot::Sender<()>,
}

/// The modules running, by config path.
static RUNNING: Mutex<Vec<(PathBuf, Weak<Module>)>> = Mutex::new(Vec::new());

impl Module {
    /// The running Portcullis for the config at `path`, started if there is none.
    pub fn shared(path: &Path) -> Result<Arc<Self>, String> {
        let mut running = RUNNING.lock().unwrap_or_else(|e| e.into_inner());
        running.retain(|(_, module)| module.strong_count() > 0);
        if let Some(module) = running
            .iter()
            .filter(|(p, _)| p == path)
            .find_map(|(_, module)| module.upgrade())
        {
            return Ok(module);
        }
        let module = Arc::new(Self::start(path)?);
        running.push((path.to_path_buf(), Arc::downgrade(&module)));
        Ok(module)
    }

    /// Loads the config at `path` and starts its server (`Server::start_watching`, as
    /// `portcullis serve` does) on a thread of its own. Fails, naming the cause, when the
    /// config does not load, a listener cannot bind, or the revocation list cannot be read.
    fn start(path: &Path) -> Result<Self, String> {
        init_logging();
        let config = portcullis::config::load(path).map_err(|e| e.to_string())?;
        for warning in &config.warnings {
            tracing::warn!(config = %path.display(), "{warning}");
        }
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| format!("runtime: {e}"))?;
        let handle = runtime.handle().clone();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let watched = path.to_path_buf();
        std::thread::Builder::new()
            .name("portcullis".into())
            .spawn(move || {
                runtime.block_on(async move {
                    match Server::start_watching(config, watched.clone()).await {
                        Err(e) => {
                            let _ = ready_tx.send(Err(format!("{}: {e}", watched.display())));
                        }
                        Ok(server) => {
                            let _ = ready_tx.send(Ok(server.authorizer()));
                            // Until the last filter config using it is gone.
                            let _ = stopped.await;
                            server.shutdown().await;
                        }
                    }
                })
            })
            .map_err(|e| format!("server thread: {e}"))?;
        let service = ready_rx
            .recv()
            .map_err(|_| "the server thread stopped before it started".to_string())??;
        Ok(Self {
            service,
            runtime: handle,
            _stop: stop,
        })
    }
}

/// Logs as `portcullis serve` does (JSON on stderr, `RUST_LOG`), unless Envoy's process
/// already has a subscriber.
fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .json()
        .with_writer(std::io::stderr)
        .with_env_filter(filter)
        .try_init();
}

/// What a filter config points to: the running module, or nothing when Envoy only
/// validates its config (the Portcullis config was loaded and checked, nothing started).
type FilterConfig = Option<Arc<Module>>;

/// A decision in progress: it owns a copy of the request, so it can outlive the hook.
type Deciding = Pin<Box<dyn Future<Output = (Decision, Arc<Engine>, RequestCopy)>>>;

/// One request: what `filter_new` answers for it.
struct Stream {
    /// The filter config's module, or null (validation only). It outlives the request:
    /// Envoy destroys a filter config only after every filter made from it.
    module: *const Module,
    waiting: Option<Waiting>,
    /// The allow's quota headers (`RateLimit`), added to the upstream's response.
    response_headers: Vec<(Cow<'static, str>, String)>,
}

/// A decision that could not finish in the headers hook, and the scheduler that resumes it.
struct Waiting {
    decision: Deciding,
    scheduler: Arc<Scheduler>,
    /// Commits `scheduler`; made once, handed to every poll.
    waker: Waker,
}

impl Drop for Waiting {
    fn drop(&mut self) {
        // Before the decision is dropped: nothing may wake a filter that is done waiting.
        self.scheduler.close();
    }
}

/// What a hook's work on its stream comes to: carried out by the hook once it no longer
/// borrows the stream, as a local reply and resuming the request are calls from which Envoy
/// may re-enter the filter (see `envoy::Hook`).
enum Verdict {
    /// Allowed (the identity headers are set): the request goes on to the upstream.
    Allow,
    /// Denied: Envoy's local reply with this answer.
    Deny(DenyAnswer),
    /// Nothing to do now: the decision waits in the stream until the scheduler runs (or, in
    /// the scheduled hook, nothing was waiting).
    Wait,
}

impl Stream {
    /// Decides the request from the headers hook.
    fn on_request_headers(&mut self, filter: &Filter) -> Verdict {
        if self.module.is_null() {
            let decision = Decision::new(ReasonCode::Internal, "Portcullis is not running");
            return Verdict::Deny(DenyAnswer::of(&decision, ""));
        }
        // SAFETY: non-null, and it outlives this request (see `module`).
        let module: &'static Module = unsafe { &*self.module };
        let request = match RequestCopy::of(filter) {
            Ok(request) => request,
            Err(detail) => {
                // Counted, logged and audited like an unreadable CheckRequest.
                let _ = module.service.malformed(&detail);
                let decision = Decision::new(ReasonCode::Internal, detail);
                return Verdict::Deny(DenyAnswer::of(&decision, ""));
            }
        };
        if let Err(too_many) = TooManyHeaders::check(request.spans.len()) {
            // Refused as the other front ends refuse it, before any header is read.
            let request_id = request.value("x-request-id");
            let decision = module.service.too_many_headers(too_many, request_id);
            return Verdict::Deny(DenyAnswer::of(&decision, request_id));
        }
        let service = &module.service;
        let mut decision: Deciding = Box::pin(async move {
            let (decision, engine) = service
                .decide_view(&request.view(), request.value("x-request-id"))
                .await;
            (decision, engine, request)
        });
        let _enter = module.runtime.enter();
        // Almost every decision is ready at once (keys and tokens in memory): no scheduler.
        if let Poll::Ready(outcome) = decision
            .as_mut()
            .poll(&mut Context::from_waker(Waker::noop()))
        {
            return self.apply(filter, outcome);
        }
        // It waits on a key fetch or shared state. Poll once more with a waker that resumes
        // the request on this worker thread (the first poll registered a no-op waker).
        let scheduler = Scheduler::new(filter);
        if !scheduler.is_open() {
            // Without one, the request would hang until Envoy's idle timeout: deny it now.
            let detail = "cannot wait for the decision: Envoy gave no scheduler";
            let _ = module.service.malformed(detail);
            let decision = Decision::new(ReasonCode::Internal, detail);
            return Verdict::Deny(DenyAnswer::of(&decision, ""));
        }
        let waker = Waker::from(scheduler.clone());
        let polled = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            decision.as_mut().poll(&mut Context::from_waker(&waker))
        }));
        // A panic here is the hook's to answer (a deny), but Envoy's scheduler is ours to
        // delete first: nothing else would.
        let polled = polled.unwrap_or_else(|panic| {
            scheduler.close();
            std::panic::resume_unwind(panic)
        });
        match polled {
            Poll::Ready(outcome) => {
                scheduler.close();
                self.apply(filter, outcome)
            }
            Poll::Pending => {
                self.waiting = Some(Waiting {
                    decision,
                    scheduler,
                    waker,
                });
                Verdict::Wait
            }
        }
    }

    /// Envoy's scheduler ran (a waiting decision was woken): poll it again; when it is done,
    /// the verdict that resumes or ends the request.
    fn on_scheduled(&mut self, filter: &Filter) -> Verdict {
        let Some(waiting) = self.waiting.as_mut() else {
            return Verdict::Wait;
        };
        // SAFETY: a waiting stream has a module (see `on_request_headers`).
        let module = unsafe { &*self.module };
        let _enter = module.runtime.enter();
        let Poll::Ready(outcome) = waiting
            .decision
            .as_mut()
            .poll(&mut Context::from_waker(&waiting.waker))
        else {
            return Verdict::Wait;
        };
        self.waiting = None;
        self.apply(filter, outcome)
    }

    /// Carries out a decision's part that never re-enters: an allow sets the identity headers
    /// (`Allow`); a deny, or an allow whose headers Envoy refused, is a `Deny` to answer.
    fn apply(&mut self, filter: &Filter, outcome: (Decision, Arc<Engine>, RequestCopy)) -> Verdict {
        let (decision, engine, request) = outcome;
        if !decision.is_allow() {
            return Verdict::Deny(DenyAnswer::of(&decision, request.value("x-request-id")));
        }
        let UpstreamMutation { set, remove } =
            UpstreamMutation::of(decision.identity.as_deref(), &engine);
        // Every header is tried (a client's copy of one must not survive the failure of
        // another); if Envoy refused any, the upstream must not see the request.
        let mut failed = 0;
        for name in &remove {
            failed += usize::from(!filter.remove_request_header(name));
        }
        for (name, value) in &set {
            failed += usize::from(!filter.set_request_header(name, value));
        }
        if failed > 0 {
            let refused = Decision::new(
                ReasonCode::Internal,
                "Envoy refused to set the identity headers",
            );
            return Verdict::Deny(DenyAnswer::of(&refused, request.value("x-request-id")));
        }
        self.response_headers = decision.response_headers;
        Verdict::Allow
    }

    /// A panic while deciding: nothing left waiting, and the deny to answer.
    fn fail(&mut self) -> DenyAnswer {
        self.waiting = None;
        let decision = Decision::new(ReasonCode::Internal, "internal error while deciding");
        DenyAnswer::of(&decision, "")
    }
}

/// Runs one deciding step on the hook's stream; a panic in it is a deny (nothing left
/// waiting). The stream's borrow ends before the caller answers Envoy.
fn decide_step(
    hook: &mut Hook<Stream>,
    step: impl FnOnce(&mut Stream, &Filter) -> Verdict,
) -> Verdict {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let (filter, stream) = hook.state();
        step(stream, filter)
    }))
    .unwrap_or_else(|_| Verdict::Deny(hook.state().1.fail()))
}

/// Envoy's local reply for a deny: Portcullis's status, headers and JSON body. It consumes
/// the hook: Envoy may end the stream (and destroy it) before it returns.
fn deny(hook: Hook<Stream>, answer: &DenyAnswer) {
    let headers: Vec<(&str, &str)> = answer
        .headers
        .iter()
        .map(|(n, v)| (n.as_ref(), v.as_str()))
        .collect();
    hook.send_response(answer.status, &headers, answer.body.as_bytes());
}

/// The request as the decision core reads it, copied out of Envoy's header map (whose
/// bytes are Envoy's only while a hook runs) into one buffer: lower-case names, a header
/// sent more than once joined with `,` as ext_authz would send it, and the peer's address.
#[derive(Debug)]
struct RequestCopy {
    text: String,
    /// Per header: where its name starts, where its value starts, where it ends, in `text`.
    spans: Vec<(usize, usize, usize)>,
    source_ip: Option<std::net::IpAddr>,
    /// The mTLS client's principal (its first URI SAN, else its subject), as Envoy reports
    /// `source.principal` to ext_authz; empty without a client certificate.
    principal: String,
    /// The client certificate as far as the decision needs it (thumbprint, URI SAN).
    certificate: Option<PeerCertificate>,
    /// Values of repeated headers, joined; boxed so their addresses never move.
    joined: Mutex<Vec<Box<str>>>,
}

impl RequestCopy {
    fn of(filter: &Filter) -> Result<Self, String> {
        let (text, spans) = filter.copy_request_headers()?;
        let mut copy = Self {
            text,
            spans,
            source_ip: filter.source_ip(),
            principal: String::new(),
            certificate: None,
            joined: Mutex::new(Vec::new()),
        };
        (copy.principal, copy.certificate) = peer(filter, || copy.value(FORWARDED_CLIENT_CERT));
        Ok(copy)
    }

    fn pairs(&self) -> impl Iterator<Item = (&str, &str)> {
        self.spans
            .iter()
            .map(|&(start, middle, end)| (&self.text[start..middle], &self.text[middle..end]))
    }

    /// The value of a header or pseudo-header; empty when absent.
    fn value(&self, name: &str) -> &str {
        self.entry(name).map_or("", |(_, v)| v)
    }

    fn view(&self) -> RequestView<'_> {
        RequestView {
            method: self.value(":method"),
            host: self.value(":authority"),
            path: self.value(":path"),
            headers: self,
            source_ip: self.source_ip,
            source_principal: &self.principal,
            scheme: self.value(":scheme"),
            peer_certificate: self.certificate.as_ref(),
        }
    }
}

/// Envoy's header describing the client certificate, set (client copies removed) by a listener
/// with `forward_client_cert_details: SANITIZE_SET`.
const FORWARDED_CLIENT_CERT: &str = "x-forwarded-client-cert";

/// The client certificate of an mTLS connection: the principal and, when Envoy reports its
/// digest, the certificate (for principal rules and certificate-bound tokens). Nothing
/// without TLS.
///
/// Envoy's connection attributes name only the certificate's first URI SAN. When the listener
/// also forwards the certificate itself (`set_current_client_cert_details: {cert: true}`), the
/// `x-forwarded-client-cert` element whose DER hashes to the connection's digest gives every
/// URI SAN, as the service gets from `include_peer_certificate`; a header naming any other
/// certificate is ignored. A digest Envoy reports but we cannot read is treated as no
/// certificate: certificate-bound tokens are then refused (closed), never granted.
fn peer<'a>(
    filter: &Filter,
    forwarded: impl FnOnce() -> &'a str,
) -> (String, Option<PeerCertificate>) {
    let Some(digest) = filter.attribute(abi::ATTRIBUTE_SHA256_PEER_CERTIFICATE_DIGEST) else {
        return (String::new(), None);
    };
    let uri_san = filter.attribute(abi::ATTRIBUTE_URI_SAN_PEER_CERTIFICATE);
    // A principal is a URI SAN, never the subject (nor a DNS SAN): a certificate without
    // one has no principal (see `RequestView::principals`).
    let principal = uri_san.unwrap_or_default().to_string();
    let whole = match PeerCertificate::from_forwarded_client_cert(forwarded(), digest) {
        Ok(whole) => whole,
        Err(error) => {
            tracing::warn!(%error, "x-forwarded-client-cert unusable; using the first URI SAN");
            None
        }
    };
    let certificate = whole.or_else(|| {
        PeerCertificate::from_digest(digest, uri_san.into_iter().map(str::to_string).collect()).ok()
    });
    (principal, certificate)
}

impl Headers for RequestCopy {
    fn entry(&self, name: &str) -> Option<(&str, &str)> {
        let mut found = self.pairs().filter(|(n, _)| *n == name);
        let (key, first) = found.next()?;
        let rest: Vec<&str> = found.map(|(_, v)| v).collect();
        if rest.is_empty() {
            return Some((key, first));
        }
        let joined: Box<str> = std::iter::once(first)
            .chain(rest)
            .collect::<Vec<_>>()
            .join(",")
            .into();
        let mut arena = self.joined.lock().unwrap_or_else(|e| e.into_inner());
        let ptr: *const str = &*joined;
        arena.push(joined);
        // SAFETY: the box is kept in `joined` until `self` is dropped and never moved out or
        // changed, so its contents live as long as `&self`.
        Some((key, unsafe { &*ptr }))
    }
}

// ---- The hooks Envoy calls (abi.rs lists the ABI these follow) ----

/// Called once when Envoy loads the module: the ABI version it was written against, or null
/// (Envoy then refuses to load it) when this Envoy is not one whose ABI `abi.rs` matches.
/// Envoy itself only warns on a mismatched ABI version, and a changed signature would
/// corrupt memory inside the proxy, so the module refuses first.
#[unsafe(no_mangle)]
pub extern "C" fn envoy_dynamic_module_on_program_init() -> *const std::ffi::c_char {
    match check_envoy() {
        Ok(()) => abi::ABI_VERSION.as_ptr(),
        Err(e) => {
            // Not through Envoy's logger: its ABI is the thing in doubt.
            eprintln!("portcullis module: {e}");
            std::ptr::null()
        }
    }
}

/// Envoy minors whose ABI `abi.rs` matches: 1.40, where every declaration was checked, and
/// 1.41, as Envoy keeps a module's ABI for one more minor since 1.38 (envoyproxy/envoy#43219).
const SUPPORTED_ENVOY: [(u32, u32); 2] = [(1, 40), (1, 41)];

/// Asks the running Envoy (`/proc/self/exe --version`, once at load) which version it is.
fn check_envoy() -> Result<(), String> {
    let out = std::process::Command::new("/proc/self/exe")
        .arg("--version")
        .stdin(std::process::Stdio::null())
        .output()
        .map_err(|e| format!("cannot ask this Envoy its version ({e}); refusing to load"))?;
    let text = String::from_utf8_lossy(&out.stdout);
    supported_envoy(&text)
}

/// Whether `envoy --version`'s output names a supported Envoy, and if not, why.
fn supported_envoy(version_output: &str) -> Result<(), String> {
    let supported = SUPPORTED_ENVOY
        .iter()
        .map(|(major, minor)| format!("{major}.{minor}"))
        .collect::<Vec<_>>()
        .join(" and ");
    let version = version_output
        .split_once("version:")
        .and_then(|(_, rest)| rest.split('/').nth(1))
        .map(str::trim)
        .ok_or_else(|| {
            format!(
                "cannot read this Envoy's version from {:?}; it supports Envoy {supported} only",
                version_output.trim()
            )
        })?;
    let mut numbers = version.split('.').map(str::parse::<u32>);
    let (Some(Ok(major)), Some(Ok(minor))) = (numbers.next(), numbers.next()) else {
        return Err(format!(
            "cannot read this Envoy's version {version:?}; it supports Envoy {supported} only"
        ));
    };
    if SUPPORTED_ENVOY.contains(&(major, minor)) {
        Ok(())
    } else {
        Err(format!(
            "this is Envoy {version}, but this module's ABI ({}) is that of Envoy {supported} \
             only: use the Portcullis module built for this Envoy, or the ext_authz service",
            abi::ABI_VERSION.to_string_lossy()
        ))
    }
}

/// The filter config: `config` is the path of a Portcullis YAML config. A config that does
/// not load (or a server that cannot start) makes Envoy refuse its own config (null), never
/// a filter that allows. In `--mode validate` the config is only loaded and checked.
#[unsafe(no_mangle)]
pub extern "C" fn envoy_dynamic_module_on_http_filter_config_new(
    _config_envoy: *mut c_void,
    _name: abi::EnvoyBuffer,
    config: abi::EnvoyBuffer,
) -> *const c_void {
    // SAFETY: Envoy's buffer, valid during this call.
    let bytes = unsafe { config.bytes() };
    let Ok(path) = std::str::from_utf8(bytes).map(str::trim) else {
        envoy::log_error("portcullis module: filter_config must be the path of a config file");
        return std::ptr::null();
    };
    let path = Path::new(path);
    // Errors name the file (a config error names the field too).
    let loaded = std::panic::catch_unwind(|| -> Result<FilterConfig, String> {
        if envoy::is_validation_mode() {
            portcullis::config::load(path).map_err(|e| e.to_string())?;
            Ok(None)
        } else {
            Module::shared(path).map(Some)
        }
    });
    match loaded {
        Ok(Ok(config)) => Box::into_raw(Box::new(config)) as *const c_void,
        Ok(Err(e)) => {
            envoy::log_error(&format!("portcullis module: {e}"));
            std::ptr::null()
        }
        Err(_) => {
            envoy::log_error(&format!(
                "portcullis module: {}: panicked while loading",
                path.display()
            ));
            std::ptr::null()
        }
    }
}

/// # Safety
/// `config` is a pointer `config_new` answered, destroyed once, after every filter made
/// from it (Envoy's contract).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn envoy_dynamic_module_on_http_filter_config_destroy(config: *const c_void) {
    if !config.is_null() {
        // SAFETY: the caller's contract (see above).
        drop(unsafe { Box::from_raw(config as *mut FilterConfig) });
    }
}

/// # Safety
/// `config` is a live pointer `config_new` answered.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn envoy_dynamic_module_on_http_filter_new(
    config: *const c_void,
    _filter_envoy: *mut c_void,
) -> *const c_void {
    // SAFETY: the caller's contract.
    let config = unsafe { &*(config as *const FilterConfig) };
    let stream = Stream {
        module: config.as_ref().map_or(std::ptr::null(), Arc::as_ptr),
        waiting: None,
        response_headers: Vec::new(),
    };
    Box::into_raw(Box::new(stream)) as *const c_void
}

/// # Safety
/// `stream` is what `filter_new` answered, destroyed once (Envoy's contract). Envoy calls
/// this from its event loop or, re-entrantly, from inside a local reply or a resume; the
/// hooks make those two calls only through `Hook`'s methods that consume it, so no borrow of
/// the stream is live here and the hook that made the call never touches the stream again.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn envoy_dynamic_module_on_http_filter_destroy(stream: *const c_void) {
    // SAFETY: the caller's contract.
    let stream = unsafe { Box::from_raw(stream as *mut Stream) };
    if stream.waiting.is_some() && !stream.module.is_null() {
        // SAFETY: the module outlives its filters (see `Stream::module`).
        let _enter = unsafe { &*stream.module }.runtime.enter();
        drop(stream);
    }
}

// The hooks below reach their stream only through `envoy::Hook`: it lends the stream out
// between Envoy's calls that may re-enter the filter, and those calls consume it. So a hook
// decides with its stream borrowed, ends the borrow (a `Verdict`), then answers Envoy, and
// never touches the stream afterwards (a re-entered hook may have destroyed it).

/// Decides the request; fails closed on a panic.
///
/// # Safety
/// `filter_envoy` is the live filter of this request and `stream` what `filter_new`
/// answered for it, not yet destroyed (Envoy's contract; see `Hook::new`).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn envoy_dynamic_module_on_http_filter_request_headers(
    filter_envoy: *mut c_void,
    stream: *const c_void,
    _end_of_stream: bool,
) -> u32 {
    // SAFETY: the caller's contract.
    let mut hook: Hook<Stream> = unsafe { Hook::new(filter_envoy, stream) };
    let verdict = decide_step(&mut hook, Stream::on_request_headers);
    match verdict {
        Verdict::Allow => abi::HEADERS_CONTINUE,
        Verdict::Deny(answer) => {
            deny(hook, &answer);
            abi::HEADERS_STOP_ITERATION
        }
        Verdict::Wait => abi::HEADERS_STOP_ALL_ITERATION_AND_WATERMARK,
    }
}

/// A waiting decision was woken: poll it on this worker thread; when it is done, resume the
/// request or answer the deny; fails closed on a panic.
///
/// # Safety
/// As for `request_headers`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn envoy_dynamic_module_on_http_filter_scheduled(
    filter_envoy: *mut c_void,
    stream: *const c_void,
    _event: u64,
) {
    // SAFETY: the caller's contract.
    let mut hook: Hook<Stream> = unsafe { Hook::new(filter_envoy, stream) };
    let verdict = decide_step(&mut hook, Stream::on_scheduled);
    match verdict {
        Verdict::Allow => hook.continue_decoding(),
        Verdict::Deny(answer) => deny(hook, &answer),
        Verdict::Wait => {}
    }
}

/// While a decision waits, the body stays held (buffered up to the watermark).
///
/// # Safety
/// As for `request_headers`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn envoy_dynamic_module_on_http_filter_request_body(
    filter_envoy: *mut c_void,
    stream: *const c_void,
    _end: bool,
) -> u32 {
    // SAFETY: the caller's contract.
    let mut hook: Hook<Stream> = unsafe { Hook::new(filter_envoy, stream) };
    if hook.state().1.waiting.is_some() {
        abi::BODY_STOP_ITERATION_AND_WATERMARK
    } else {
        abi::BODY_CONTINUE
    }
}

/// While a decision waits, the trailers stay held.
///
/// # Safety
/// As for `request_headers`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn envoy_dynamic_module_on_http_filter_request_trailers(
    filter_envoy: *mut c_void,
    stream: *const c_void,
) -> u32 {
    // SAFETY: the caller's contract.
    let mut hook: Hook<Stream> = unsafe { Hook::new(filter_envoy, stream) };
    if hook.state().1.waiting.is_some() {
        abi::TRAILERS_STOP_ITERATION
    } else {
        abi::TRAILERS_CONTINUE
    }
}

/// Adds the allow's quota headers to the upstream's response.
///
/// # Safety
/// As for `request_headers`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn envoy_dynamic_module_on_http_filter_response_headers(
    filter_envoy: *mut c_void,
    stream: *const c_void,
    _end: bool,
) -> u32 {
    // SAFETY: the caller's contract.
    let mut hook: Hook<Stream> = unsafe { Hook::new(filter_envoy, stream) };
    let (filter, stream) = hook.state();
    for (name, value) in std::mem::take(&mut stream.response_headers) {
        filter.add_response_header(&name, &value);
    }
    abi::HEADERS_CONTINUE
}

// The hooks Envoy requires but this filter has nothing to do in.

#[unsafe(no_mangle)]
pub extern "C" fn envoy_dynamic_module_on_http_filter_response_body(
    _f: *mut c_void,
    _m: *const c_void,
    _end: bool,
) -> u32 {
    abi::BODY_CONTINUE
}

#[unsafe(no_mangle)]
pub extern "C" fn envoy_dynamic_module_on_http_filter_response_trailers(
    _f: *mut c_void,
    _m: *const c_void,
) -> u32 {
    abi::TRAILERS_CONTINUE
}

#[unsafe(no_mangle)]
pub extern "C" fn envoy_dynamic_module_on_http_filter_stream_complete(
    _f: *mut c_void,
    _m: *const c_void,
) {
}

#[unsafe(no_mangle)]
pub extern "C" fn envoy_dynamic_module_on_http_filter_http_callout_done(
    _f: *mut c_void,
    _m: *const c_void,
    _id: u64,
    _result: u32,
    _headers: *mut abi::EnvoyHeader,
    _headers_size: usize,
    _body: *mut abi::EnvoyBuffer,
    _body_size: usize,
) {
}

#[unsafe(no_mangle)]
pub extern "C" fn envoy_dynamic_module_on_http_filter_http_stream_headers(
    _f: *mut c_void,
    _m: *const c_void,
    _stream: u64,
    _headers: *mut abi::EnvoyHeader,
    _headers_size: usize,
    _end: bool,
) {
}

#[unsafe(no_mangle)]
pub extern "C" fn envoy_dynamic_module_on_http_filter_http_stream_data(
    _f: *mut c_void,
    _m: *const c_void,
    _stream: u64,
    _data: *const abi::EnvoyBuffer,
    _count: usize,
    _end: bool,
) {
}

#[unsafe(no_mangle)]
pub extern "C" fn envoy_dynamic_module_on_http_filter_http_stream_trailers(
    _f: *mut c_void,
    _m: *const c_void,
    _stream: u64,
    _trailers: *mut abi::EnvoyHeader,
    _size: usize,
) {
}

#[unsafe(no_mangle)]
pub extern "C" fn envoy_dynamic_module_on_http_filter_http_stream_complete(
    _f: *mut c_void,
    _m: *const c_void,
    _stream: u64,
) {
}

#[unsafe(no_mangle)]
pub extern "C" fn envoy_dynamic_module_on_http_filter_http_stream_reset(
    _f: *mut c_void,
    _m: *const c_void,
    _stream: u64,
    _reason: u32,
) {
}

#[unsafe(no_mangle)]
pub extern "C" fn envoy_dynamic_module_on_http_filter_downstream_above_write_buffer_high_watermark(
    _f: *mut c_void,
    _m: *const c_void,
) {
}

#[unsafe(no_mangle)]
pub extern "C" fn envoy_dynamic_module_on_http_filter_downstream_below_write_buffer_low_watermark(
    _f: *mut c_void,
    _m: *const c_void,
) {
}

#[cfg(test)]
mod tests {
    use super::supported_envoy;

    #[test]
    fn only_the_envoy_minors_whose_abi_is_declared_are_supported() {
        let line =
            |v: &str| format!("\n/usr/bin/envoy  version: 9e55809/{v}/Clean/RELEASE/BoringSSL\n");
        assert_eq!(supported_envoy(&line("1.40.0")), Ok(()));
        assert_eq!(supported_envoy(&line("1.40.3")), Ok(()));
        assert_eq!(supported_envoy(&line("1.41.0-dev")), Ok(()));
        for other in ["1.39.2", "1.42.0", "2.40.0"] {
            let refused = supported_envoy(&line(other)).unwrap_err();
            assert!(refused.contains(other), "{refused}");
            assert!(refused.contains("1.40 and 1.41"), "{refused}");
        }
        for garbage in ["", "envoy", "version: abc", "version: sha/x.y.z/Clean"] {
            let refused = supported_envoy(garbage).unwrap_err();
            assert!(refused.contains("cannot read"), "{refused}");
        }
    }
}
