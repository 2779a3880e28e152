//! Safe wrappers over the callbacks in `abi.rs`, for one request on Envoy's worker thread.

use std::ffi::c_void;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};

use crate::abi;

/// Request headers copied out of Envoy: the text, and per header where its name starts,
/// where its value starts and where it ends in that text.
pub type CopiedHeaders = (String, Vec<(usize, usize, usize)>);

/// Envoy's side of one HTTP filter (one request): the calls that never call back into the
/// module (the ones that may are [`Hook`]'s). Only reached through the [`Hook`] Envoy called
/// for this request, on Envoy's worker thread.
#[derive(Debug)]
pub struct Filter(*mut c_void);

impl Filter {
    /// Every request header, in Envoy's order (repeated names as separate entries), copied
    /// out of Envoy's map into one buffer: `text` holds each name followed by its value, and
    /// each entry of the list says where a name starts, where its value starts and where it
    /// ends. Names are lower-case. A value that is not UTF-8 is copied with replacement
    /// characters; `Err` when a name is not UTF-8 (Envoy's codecs allow none) or Envoy
    /// hands over no headers: the request is then refused.
    pub fn copy_request_headers(&self) -> Result<CopiedHeaders, String> {
        // SAFETY: `self.0` is the live filter of the running hook (see `Hook::new`).
        let size = unsafe {
            abi::envoy_dynamic_module_callback_http_get_headers_size(self.0, abi::REQUEST_HEADERS)
        };
        let mut raw = vec![abi::EnvoyHeader::NULL; size];
        // SAFETY: `raw` has room for `size` entries, as the callback requires.
        let ok = unsafe {
            abi::envoy_dynamic_module_callback_http_get_headers(
                self.0,
                abi::REQUEST_HEADERS,
                raw.as_mut_ptr(),
            )
        };
        if !ok {
            return Err("Envoy did not hand over the request headers".into());
        }
        let mut text =
            String::with_capacity(raw.iter().map(|h| h.key_length + h.value_length).sum());
        let mut spans = Vec::with_capacity(raw.len());
        for h in &raw {
            // SAFETY: Envoy's buffers, valid while the hook runs and the map is unchanged.
            let (k, v) = unsafe {
                (
                    abi::EnvoyBuffer {
                        ptr: h.key_ptr,
                        length: h.key_length,
                    }
                    .bytes(),
                    abi::EnvoyBuffer {
                        ptr: h.value_ptr,
                        length: h.value_length,
                    }
                    .bytes(),
                )
            };
            let name = std::str::from_utf8(k)
                .map_err(|_| "a request header name is not UTF-8".to_string())?;
            // A value that is not UTF-8 (Envoy passes obs-text through) is read with
            // replacement characters, as the HTTP API and Envoy's raw ext_authz headers are:
            // it can match nothing a policy names, and the request is decided like on those
            // wirings (a `user-agent` with a Latin-1 byte does not deny a public route).
            let value = String::from_utf8_lossy(v);
            let start = text.len();
            text.push_str(name);
            let middle = text.len();
            text.push_str(&value);
            spans.push((start, middle, text.len()));
        }
        Ok((text, spans))
    }

    /// One of Envoy's string attributes for this request, borrowed for the hook; `None` when
    /// Envoy has none (no TLS, for the certificate ones) or it is not UTF-8.
    pub fn attribute(&self, id: u32) -> Option<&str> {
        let mut out = abi::EnvoyBuffer::NULL;
        // SAFETY: `self.0` is live; `out` is a valid place for the result.
        let found = unsafe {
            abi::envoy_dynamic_module_callback_http_filter_get_attribute_string(
                self.0, id, &mut out,
            )
        };
        // SAFETY: Envoy's buffer, valid during the hook (the borrow of `self`).
        found
            .then(|| std::str::from_utf8(unsafe { out.bytes() }).ok())
            .flatten()
    }

    /// The downstream peer's address, from Envoy's `source.address` attribute (`ip:port`,
    /// `[v6]:port`), read in place.
    pub fn source_ip(&self) -> Option<IpAddr> {
        let text = self.attribute(abi::ATTRIBUTE_SOURCE_ADDRESS)?;
        text.parse::<SocketAddr>()
            .map(|a| a.ip())
            .or_else(|_| text.parse::<IpAddr>())
            .ok()
    }

    /// Sets a request header, replacing every copy the client sent.
    /// `false` when Envoy has no request header map to change (then nothing was set).
    #[must_use]
    pub fn set_request_header(&self, name: &str, value: &str) -> bool {
        if value.is_empty() {
            return self.remove_request_header(name);
        }
        // SAFETY: `self.0` is live; Envoy copies both buffers.
        unsafe {
            abi::envoy_dynamic_module_callback_http_set_header(
                self.0,
                abi::REQUEST_HEADERS,
                abi::ModuleBuffer::of(name.as_bytes()),
                abi::ModuleBuffer::of(value.as_bytes()),
            )
        }
    }

    /// Removes every copy of a request header (an empty value removes, in this ABI).
    /// `false` when Envoy has no request header map to change.
    #[must_use]
    pub fn remove_request_header(&self, name: &str) -> bool {
        // SAFETY: as above.
        unsafe {
            abi::envoy_dynamic_module_callback_http_set_header(
                self.0,
                abi::REQUEST_HEADERS,
                abi::ModuleBuffer::of(name.as_bytes()),
                abi::ModuleBuffer::of(b""),
            )
        }
    }

    /// Adds a header to the response (after any the upstream sent under that name).
    pub fn add_response_header(&self, name: &str, value: &str) {
        // SAFETY: `self.0` is live; Envoy copies both buffers.
        unsafe {
            abi::envoy_dynamic_module_callback_http_add_header(
                self.0,
                abi::RESPONSE_HEADERS,
                abi::ModuleBuffer::of(name.as_bytes()),
                abi::ModuleBuffer::of(value.as_bytes()),
            );
        }
    }
}

/// One hook Envoy called for a request: Envoy's filter, and the module's state for that
/// request (`S`, the pointer `on_http_filter_new` answered, a `Box<S>` until Envoy's
/// `on_http_filter_destroy`).
///
/// Two of Envoy's calls may call back into the module before they return: the local reply
/// and resuming the request run the rest of the filter chain at once, which can call this
/// request's other hooks (its body and trailers hooks, its response hooks, the end of the
/// stream) and even destroy its state. So the state is borrowed only through `&mut self`
/// ([`Hook::state`]), and those two calls take `self`: the borrow checker refuses a call that
/// may re-enter while a borrow of the state is live, and any use of the state (or the filter)
/// after one, when it may be gone. Every other call on [`Filter`] never calls back.
#[derive(Debug)]
pub struct Hook<S> {
    filter: Filter,
    state: *mut S,
}

impl<S> Hook<S> {
    /// # Safety
    /// `filter` is the `filter_envoy_ptr` Envoy passed to the running hook and `state` the
    /// module's pointer it passed with it: a `Box<S>` that `on_http_filter_new` answered for
    /// this filter and Envoy has not destroyed. Envoy calls a filter's hooks on its worker
    /// thread, one at a time except when it re-enters from one of the calls that consume a
    /// `Hook`, so no other `Hook` of this request is borrowing the state.
    pub unsafe fn new(filter: *mut c_void, state: *const c_void) -> Self {
        Self {
            filter: Filter(filter),
            state: state.cast::<S>().cast_mut(),
        }
    }

    /// The calls on Envoy's filter that never re-enter, and the request's state. Both borrow
    /// `self`, so they end before any call that consumes it.
    pub fn state(&mut self) -> (&Filter, &mut S) {
        // SAFETY: `state` is live (`new`'s contract) and this is the only borrow of it: it
        // borrows `self` mutably, the only `Hook` of this request on the stack that is not
        // inside a call consuming it (see `new`), and Envoy cannot destroy the state while
        // it is live, as only the calls consuming `self` can re-enter.
        (&self.filter, unsafe { &mut *self.state })
    }

    /// Resumes the request after the headers hook stopped it. Envoy may run the rest of the
    /// request through this filter's hooks, and destroy the state, before it returns.
    pub fn continue_decoding(self) {
        // SAFETY: the filter is live, on its worker thread; no borrow of the state is live
        // (this consumed the `Hook`), so re-entered hooks may borrow or destroy it.
        unsafe { abi::envoy_dynamic_module_callback_http_filter_continue_decoding(self.filter.0) }
    }

    /// Envoy's local reply; the hook then stops the filter chain (if it is the headers hook).
    /// Envoy may end the stream, calling this filter's other hooks and destroying the state,
    /// before it returns.
    pub fn send_response(self, status: u16, headers: &[(&str, &str)], body: &[u8]) {
        let mut raw: Vec<abi::ModuleHeader> = headers
            .iter()
            .map(|(k, v)| abi::ModuleHeader {
                key_ptr: k.as_ptr().cast(),
                key_length: k.len(),
                value_ptr: v.as_ptr().cast(),
                value_length: v.len(),
            })
            .collect();
        // SAFETY: the filter is live; the headers and body outlive the call, Envoy copies
        // them; no borrow of the state is live (as for `continue_decoding`).
        unsafe {
            abi::envoy_dynamic_module_callback_http_send_response(
                self.filter.0,
                u32::from(status),
                raw.as_mut_ptr(),
                raw.len(),
                abi::ModuleBuffer::of(body),
                abi::ModuleBuffer::of(b"portcullis_denied"),
            );
        }
    }
}

/// Logs an error through Envoy's `dynamic_modules` logger.
pub fn log_error(message: &str) {
    // SAFETY: Envoy copies the message.
    unsafe {
        abi::envoy_dynamic_module_callback_log(
            abi::LOG_ERROR,
            abi::ModuleBuffer::of(message.as_bytes()),
        );
    }
}

/// Envoy's scheduler for one filter, as a waker: waking it (from any thread) makes Envoy
/// call `on_http_filter_scheduled` for that filter on its worker thread, or nothing once the
/// filter is gone. `close` (on the worker thread, when the filter no longer waits) deletes
/// it; a wake after that does nothing, so no thread ever commits to a deleted scheduler.
/// None of its calls re-enters the module: a commit only posts to the worker's event loop
/// (even one made on the worker thread, by a decision woken while a hook polls it), and the
/// scheduled hook runs from there later.
#[derive(Debug)]
pub struct Scheduler(Mutex<Option<Raw>>);

#[derive(Debug)]
struct Raw(*mut c_void);

// SAFETY: Envoy's scheduler may be committed from any thread (its documented purpose); the
// mutex keeps `commit` and `delete` apart.
unsafe impl Send for Raw {}

impl Scheduler {
    /// Made on the worker thread, inside a hook Envoy called for `filter`.
    pub fn new(filter: &Filter) -> Arc<Self> {
        // SAFETY: `filter.0` is the live filter of the running hook.
        let raw = unsafe { abi::envoy_dynamic_module_callback_http_filter_scheduler_new(filter.0) };
        Arc::new(Self(Mutex::new((!raw.is_null()).then_some(Raw(raw)))))
    }

    /// False when Envoy gave no scheduler: nothing could ever resume a waiting request.
    pub fn is_open(&self) -> bool {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).is_some()
    }

    /// Deletes Envoy's scheduler; later wakes do nothing.
    pub fn close(&self) {
        let raw = self.0.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(Raw(raw)) = raw {
            // SAFETY: made by `scheduler_new`, deleted once (taken out of the option).
            unsafe { abi::envoy_dynamic_module_callback_http_filter_scheduler_delete(raw) }
        }
    }
}

impl std::task::Wake for Scheduler {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        let raw = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(Raw(raw)) = raw.as_ref() {
            // SAFETY: not deleted while we hold the lock (`close` takes it).
            unsafe { abi::envoy_dynamic_module_callback_http_filter_scheduler_commit(*raw, 0) }
        }
    }
}

/// True while Envoy only validates its config. Main thread only (filter config hooks).
pub fn is_validation_mode() -> bool {
    // SAFETY: no arguments; called from `on_http_filter_config_new`, on the main thread.
    unsafe { abi::envoy_dynamic_module_callback_is_validation_mode() }
}
