//! A stand-in for Envoy's side of the ABI (`abi.rs`'s callbacks), for tests that drive the
//! hooks the way Envoy does, re-entrantly included: its local reply ends the stream from
//! inside `send_response`, calling the filter's response hook, stream-complete and destroy
//! before it returns (Envoy may do so: the reply ends the stream at once).
//!
//! On stable this checks what the hooks answer and that the stream is destroyed once; under
//! Miri (`cargo +nightly miri test -p portcullis-envoy-module fake_envoy`) it also checks
//! that no borrow of the stream is live while Envoy re-enters or frees it.

use std::cell::{Cell, RefCell};
use std::ffi::c_void;

use crate::abi;

/// A local reply as Envoy received it.
#[derive(Debug)]
pub struct Reply {
    pub status: u32,
    pub headers: Vec<(String, String)>,
    pub body: String,
}

/// One filter on Envoy's side: the `filter_envoy_ptr` the hooks get points to one.
#[derive(Debug)]
pub struct FakeFilter {
    /// The module's stream for this filter; null once destroyed.
    pub stream: Cell<*const c_void>,
    pub replies: RefCell<Vec<Reply>>,
    /// The hooks Envoy called, in order (the request's hooks are the test's to record).
    pub calls: RefCell<Vec<&'static str>>,
}

impl FakeFilter {
    pub fn new() -> Self {
        Self {
            stream: Cell::new(std::ptr::null()),
            replies: RefCell::new(Vec::new()),
            calls: RefCell::new(Vec::new()),
        }
    }

    pub fn as_ptr(&self) -> *mut c_void {
        std::ptr::from_ref(self).cast_mut().cast()
    }

    /// # Safety
    /// `ptr` is what `as_ptr` answered for a `FakeFilter` still alive.
    unsafe fn of<'a>(ptr: *mut c_void) -> &'a Self {
        // SAFETY: the caller's contract; only shared references are made to it.
        unsafe { &*ptr.cast::<Self>() }
    }
}

/// Bytes the module lent Envoy, copied.
///
/// # Safety
/// `ptr` is null or valid for `length` bytes.
unsafe fn text(ptr: *const std::ffi::c_char, length: usize) -> String {
    if ptr.is_null() || length == 0 {
        return String::new();
    }
    // SAFETY: the caller's contract.
    let bytes = unsafe { std::slice::from_raw_parts(ptr.cast::<u8>(), length) };
    String::from_utf8_lossy(bytes).into_owned()
}

/// Envoy's local reply: recorded, then the stream ends as in Envoy, before this returns.
///
/// # Safety
/// As Envoy's: a live filter, `headers_size` headers at `headers`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn envoy_dynamic_module_callback_http_send_response(
    filter: *mut c_void,
    status: u32,
    headers: *mut abi::ModuleHeader,
    headers_size: usize,
    body: abi::ModuleBuffer,
    _details: abi::ModuleBuffer,
) {
    // SAFETY: the caller's contract.
    let envoy = unsafe { FakeFilter::of(filter) };
    let headers = if headers_size == 0 {
        Vec::new()
    } else {
        // SAFETY: the caller's contract.
        unsafe { std::slice::from_raw_parts(headers, headers_size) }
            .iter()
            // SAFETY: the module's buffers, valid during this call.
            .map(|h| unsafe {
                (
                    text(h.key_ptr, h.key_length),
                    text(h.value_ptr, h.value_length),
                )
            })
            .collect()
    };
    envoy.replies.borrow_mut().push(Reply {
        status,
        headers,
        // SAFETY: as above.
        body: unsafe { text(body.ptr, body.length) },
    });
    let stream = envoy.stream.replace(std::ptr::null());
    envoy.calls.borrow_mut().push("send_response");
    // SAFETY: the stream is the one `filter_new` answered for this filter, not destroyed.
    unsafe {
        envoy.calls.borrow_mut().push("response_headers");
        crate::envoy_dynamic_module_on_http_filter_response_headers(filter, stream, true);
        envoy.calls.borrow_mut().push("stream_complete");
        crate::envoy_dynamic_module_on_http_filter_stream_complete(filter, stream);
        envoy.calls.borrow_mut().push("destroy");
        crate::envoy_dynamic_module_on_http_filter_destroy(stream);
    }
}

// The rest of the ABI, which these tests do not expect to be called: recorded, and answered
// as Envoy answers a filter without the thing asked for.

fn unexpected(filter: *mut c_void, name: &'static str) {
    if !filter.is_null() {
        // SAFETY: every filter pointer the tests hand to the hooks is a `FakeFilter`'s.
        unsafe { FakeFilter::of(filter) }
            .calls
            .borrow_mut()
            .push(name);
    }
}

#[unsafe(no_mangle)]
pub extern "C" fn envoy_dynamic_module_callback_log(_level: u32, _message: abi::ModuleBuffer) {}

#[unsafe(no_mangle)]
pub extern "C" fn envoy_dynamic_module_callback_http_get_headers_size(
    filter: *mut c_void,
    _header_type: u32,
) -> usize {
    unexpected(filter, "get_headers_size");
    0
}

#[unsafe(no_mangle)]
pub extern "C" fn envoy_dynamic_module_callback_http_get_headers(
    filter: *mut c_void,
    _header_type: u32,
    _result: *mut abi::EnvoyHeader,
) -> bool {
    unexpected(filter, "get_headers");
    false
}

#[unsafe(no_mangle)]
pub extern "C" fn envoy_dynamic_module_callback_http_set_header(
    filter: *mut c_void,
    _header_type: u32,
    _key: abi::ModuleBuffer,
    _value: abi::ModuleBuffer,
) -> bool {
    unexpected(filter, "set_header");
    false
}

#[unsafe(no_mangle)]
pub extern "C" fn envoy_dynamic_module_callback_http_add_header(
    filter: *mut c_void,
    _header_type: u32,
    _key: abi::ModuleBuffer,
    _value: abi::ModuleBuffer,
) -> bool {
    unexpected(filter, "add_header");
    false
}

#[unsafe(no_mangle)]
pub extern "C" fn envoy_dynamic_module_callback_http_filter_continue_decoding(filter: *mut c_void) {
    unexpected(filter, "continue_decoding");
}

#[unsafe(no_mangle)]
pub extern "C" fn envoy_dynamic_module_callback_http_filter_scheduler_new(
    filter: *mut c_void,
) -> *mut c_void {
    unexpected(filter, "scheduler_new");
    std::ptr::null_mut()
}

#[unsafe(no_mangle)]
pub extern "C" fn envoy_dynamic_module_callback_http_filter_scheduler_commit(
    _scheduler: *mut c_void,
    _event_id: u64,
) {
}

#[unsafe(no_mangle)]
pub extern "C" fn envoy_dynamic_module_callback_http_filter_scheduler_delete(
    _scheduler: *mut c_void,
) {
}

#[unsafe(no_mangle)]
pub extern "C" fn envoy_dynamic_module_callback_is_validation_mode() -> bool {
    true
}

#[unsafe(no_mangle)]
pub extern "C" fn envoy_dynamic_module_callback_http_filter_get_attribute_string(
    filter: *mut c_void,
    _attribute: u32,
    _result: *mut abi::EnvoyBuffer,
) -> bool {
    unexpected(filter, "get_attribute_string");
    false
}

#[cfg(test)]
mod tests {
    use std::ffi::c_void;

    use portcullis::authz::ReasonCode;

    use super::FakeFilter;
    use crate::{FilterConfig, abi};

    /// A filter config of `--mode validate` (no Portcullis running): every request is denied
    /// with a local reply, which here ends and destroys the stream from inside the reply.
    #[test]
    fn a_local_reply_may_destroy_the_stream_before_it_returns() {
        let config: FilterConfig = None;
        let envoy = FakeFilter::new();
        let filter = envoy.as_ptr();
        // SAFETY: a filter config as `config_new` makes them, alive for the whole test.
        let stream = unsafe {
            crate::envoy_dynamic_module_on_http_filter_new(
                std::ptr::from_ref(&config).cast::<c_void>(),
                filter,
            )
        };
        envoy.stream.set(stream);
        // SAFETY: the filter and the stream it was made for; the fake destroys the stream.
        let status = unsafe {
            crate::envoy_dynamic_module_on_http_filter_request_headers(filter, stream, true)
        };
        assert_eq!(status, abi::HEADERS_STOP_ITERATION);
        assert!(
            envoy.stream.get().is_null(),
            "the reply destroyed the stream"
        );
        assert_eq!(
            *envoy.calls.borrow(),
            [
                "send_response",
                "response_headers",
                "stream_complete",
                "destroy"
            ],
        );
        let replies = envoy.replies.borrow();
        let [reply] = replies.as_slice() else {
            panic!("one local reply, not {replies:?}");
        };
        assert_eq!(reply.status, u32::from(ReasonCode::Internal.http_status()));
        assert!(
            reply.body.contains("Portcullis is not running"),
            "{}",
            reply.body
        );
        assert!(
            reply
                .headers
                .contains(&("content-type".into(), "application/json".into())),
            "{:?}",
            reply.headers
        );
    }
}
