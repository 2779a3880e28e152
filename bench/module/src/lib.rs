//! Portcullis's decision inside Envoy, as an HTTP dynamic module: a **benchmark prototype**
//! for issue 4 (scenario `M` of `bench/harness.py`), not a supported way to run Portcullis.
//!
//! The ext_authz hop costs Envoy ~28 µs of CPU per request (README, "Where the cost is"),
//! more than the decision itself. This module measures what is left without the hop: Envoy
//! loads `libportcullis_envoy_module.so` and calls the same `AuthzService::decide_view` the
//! gRPC and HTTP front ends call (same engine, token cache, metrics and audit line), on its
//! worker thread, from the request-headers hook. An allow sets the identity headers on the
//! request (and removes the ones it has no value for); a deny is Envoy's local reply with
//! Portcullis's status, challenge and JSON body.
//!
//! What the prototype leaves out, and why it is not shippable as it is:
//! - A decision that would have to wait (an unknown `kid` refetch, a Redis round trip, an
//!   approval) is denied with `internal_error`: the decision is polled once on Envoy's
//!   thread, and resuming it later (Envoy's scheduler callback) is not written.
//! - No config reload, no admin listener, no `/metrics` endpoint (the counters are kept but
//!   not served), no peer certificate or principal, no body digest for approvals, no
//!   `RateLimit` headers on allowed responses.
//! - It talks to Envoy through hand-written declarations of Envoy 1.40's C ABI
//!   (`abi.rs`): the official SDK is not on crates.io. A different Envoy needs them checked.

mod abi;
mod envoy;

use std::ffi::c_void;
use std::path::Path;
use std::pin::pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};

use arc_swap::ArcSwap;
use portcullis::admin::metrics::Metrics;
use portcullis::audit::AuditSink;
use portcullis::authz::{Decision, Headers, ReasonCode, RequestView};
use portcullis::engine::Engine;
use portcullis::grpc::{AuthzService, DenyAnswer, UpstreamMutation};

use envoy::Filter;

/// One loaded Portcullis config: what a filter config in Envoy's listener points to.
pub struct Module {
    service: AuthzService,
    /// The runtime of the background thread that loads and refreshes keys; entered while a
    /// decision is polled, so tokio timers inside it have a driver.
    runtime: tokio::runtime::Handle,
}

impl Module {
    /// Loads the Portcullis config at `path`, its keys (first attempt) and its state store.
    pub fn load(path: &Path) -> Result<Self, String> {
        let config = portcullis::config::load(path).map_err(|e| e.to_string())?;
        let metrics = Arc::new(Metrics::new());
        let audit = if config.file.audit.enabled {
            AuditSink::stdout().map_err(|e| format!("audit: {e}"))?
        } else {
            AuditSink::disabled()
        };
        let keys = Arc::new(portcullis::server::key_store(&config, metrics.clone()));
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| format!("runtime: {e}"))?;
        let handle = runtime.handle().clone();
        let state = {
            let _enter = handle.enter();
            portcullis::state::from_config(&config.file.state).map_err(|e| e.to_string())?
        };
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let started = keys.clone();
        std::thread::Builder::new()
            .name("portcullis-keys".into())
            .spawn(move || {
                runtime.block_on(async move {
                    started.start().await;
                    let _ = ready_tx.send(());
                    // Keeps the runtime (key refresh tasks) alive for the life of Envoy.
                    std::future::pending::<()>().await
                })
            })
            .map_err(|e| format!("key thread: {e}"))?;
        ready_rx
            .recv()
            .map_err(|_| "the key thread stopped before keys were loaded".to_string())?;
        let engine =
            Engine::new(Arc::new(config), keys, state, metrics.clone()).with_audit(audit.clone());
        if let Some(e) = engine.revocations.startup_error() {
            return Err(e.to_string());
        }
        let service = AuthzService::new(Arc::new(ArcSwap::from_pointee(engine)), metrics, audit);
        Ok(Self {
            service,
            runtime: handle,
        })
    }

    /// Decides one request from its headers. `true`: allowed, continue to the upstream
    /// with the identity headers set; `false`: answered with a local deny.
    fn on_request_headers(&self, filter: &Filter) -> bool {
        let headers = match RequestHeaders::of(filter) {
            Ok(headers) => headers,
            Err(detail) => {
                // Counted, logged and audited like an unreadable CheckRequest.
                let _ = self.service.malformed(&detail);
                deny(filter, &Decision::new(ReasonCode::Internal, detail), "");
                return false;
            }
        };
        let value = |name: &str| headers.entry(name).map_or("", |(_, v)| v);
        let source_ip = filter.source_ip();
        let request_id = value("x-request-id");
        let view = RequestView {
            method: value(":method"),
            host: value(":authority"),
            path: value(":path"),
            headers: &headers,
            source_ip,
            source_principal: "",
            scheme: value(":scheme"),
            peer_certificate: None,
        };
        let outcome = {
            let _enter = self.runtime.enter();
            let mut decide = pin!(self.service.decide_view(&view, request_id));
            match decide
                .as_mut()
                .poll(&mut Context::from_waker(Waker::noop()))
            {
                Poll::Ready(outcome) => Some(outcome),
                Poll::Pending => None,
            }
        };
        match outcome {
            Some((decision, engine)) if decision.is_allow() => {
                let UpstreamMutation { set, remove } =
                    UpstreamMutation::of(decision.identity.as_deref(), &engine);
                drop(headers);
                for name in &remove {
                    filter.remove_request_header(name);
                }
                for (name, value) in &set {
                    filter.set_request_header(name, value);
                }
                true
            }
            Some((decision, _)) => {
                deny(filter, &decision, request_id);
                false
            }
            None => {
                let decision = Decision::new(
                    ReasonCode::Internal,
                    "the decision would have to wait (key fetch or shared state), which this \
                     prototype does not do inside Envoy",
                );
                deny(filter, &decision, request_id);
                false
            }
        }
    }
}

/// Envoy's local reply for a deny: Portcullis's status, headers and JSON body.
fn deny(filter: &Filter, decision: &Decision, request_id: &str) {
    let answer = DenyAnswer::of(decision, request_id);
    let headers: Vec<(&str, &str)> = answer
        .headers
        .iter()
        .map(|(n, v)| (n.as_ref(), v.as_str()))
        .collect();
    filter.send_response(answer.status, &headers, answer.body.as_bytes());
}

/// The request headers as the decision core reads them: borrowed from Envoy's header map
/// (valid while the request-headers hook runs and nothing modifies the map), lower-case
/// names, a header sent more than once joined with `,` as ext_authz would send it.
#[derive(Debug)]
struct RequestHeaders<'f> {
    all: Vec<(&'f str, &'f str)>,
    /// Values of repeated headers, joined; boxed so their addresses never move.
    joined: Mutex<Vec<Box<str>>>,
}

impl<'f> RequestHeaders<'f> {
    fn of(filter: &'f Filter) -> Result<Self, String> {
        Ok(Self {
            all: filter.request_headers()?,
            joined: Mutex::new(Vec::new()),
        })
    }
}

impl Headers for RequestHeaders<'_> {
    fn entry(&self, name: &str) -> Option<(&str, &str)> {
        let mut found = self.all.iter().filter(|(n, _)| *n == name);
        let (key, first) = *found.next()?;
        let rest: Vec<&str> = found.map(|(_, v)| *v).collect();
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
//
// `filter_new` answers the config's own pointer: a request needs no state of its own, so
// no allocation per request; `filter_destroy` has nothing to free.

/// Called once when Envoy loads the module: the ABI version it was written against.
#[unsafe(no_mangle)]
pub extern "C" fn envoy_dynamic_module_on_program_init() -> *const std::ffi::c_char {
    abi::ABI_VERSION.as_ptr()
}

/// The filter config: `config` is the path of a Portcullis YAML config. A config that does
/// not load makes Envoy refuse its own config (null), never a filter that allows.
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
    match std::panic::catch_unwind(|| Module::load(Path::new(path))) {
        Ok(Ok(module)) => Box::into_raw(Box::new(module)) as *const c_void,
        Ok(Err(e)) => {
            envoy::log_error(&format!("portcullis module: {path}: {e}"));
            std::ptr::null()
        }
        Err(_) => {
            envoy::log_error(&format!(
                "portcullis module: {path}: panicked while loading"
            ));
            std::ptr::null()
        }
    }
}

/// # Safety
/// `module` is a pointer `config_new` answered, destroyed once (Envoy's contract).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn envoy_dynamic_module_on_http_filter_config_destroy(module: *const c_void) {
    if !module.is_null() {
        // SAFETY: the caller's contract (see above).
        drop(unsafe { Box::from_raw(module as *mut Module) });
    }
}

#[unsafe(no_mangle)]
pub extern "C" fn envoy_dynamic_module_on_http_filter_new(
    module: *const c_void,
    _filter_envoy: *mut c_void,
) -> *const c_void {
    module
}

#[unsafe(no_mangle)]
pub extern "C" fn envoy_dynamic_module_on_http_filter_destroy(_filter: *const c_void) {}

/// Decides the request; fails closed on a panic.
///
/// # Safety
/// `filter_envoy` is the live filter of this request and `module` what `filter_new`
/// answered for it (Envoy's contract).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn envoy_dynamic_module_on_http_filter_request_headers(
    filter_envoy: *mut c_void,
    module: *const c_void,
    _end_of_stream: bool,
) -> u32 {
    // SAFETY: the caller's contract; `filter_new` answers the config's `Module`, which
    // outlives the filters using it.
    let (filter, module) = unsafe { (Filter::new(filter_envoy), &*(module as *const Module)) };
    let allowed = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        module.on_request_headers(&filter)
    }))
    .unwrap_or_else(|_| {
        let decision = Decision::new(ReasonCode::Internal, "internal error while deciding");
        deny(&filter, &decision, "");
        false
    });
    if allowed {
        abi::HEADERS_CONTINUE
    } else {
        abi::HEADERS_STOP_ITERATION
    }
}

// The hooks Envoy requires but this filter has nothing to do in.

#[unsafe(no_mangle)]
pub extern "C" fn envoy_dynamic_module_on_http_filter_request_body(
    _f: *mut c_void,
    _m: *const c_void,
    _end: bool,
) -> u32 {
    abi::BODY_CONTINUE
}

#[unsafe(no_mangle)]
pub extern "C" fn envoy_dynamic_module_on_http_filter_request_trailers(
    _f: *mut c_void,
    _m: *const c_void,
) -> u32 {
    abi::TRAILERS_CONTINUE
}

#[unsafe(no_mangle)]
pub extern "C" fn envoy_dynamic_module_on_http_filter_response_headers(
    _f: *mut c_void,
    _m: *const c_void,
    _end: bool,
) -> u32 {
    abi::HEADERS_CONTINUE
}

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
pub extern "C" fn envoy_dynamic_module_on_http_filter_scheduled(
    _f: *mut c_void,
    _m: *const c_void,
    _event: u64,
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
