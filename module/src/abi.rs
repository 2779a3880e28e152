//! Envoy 1.40's dynamic-module C ABI, the part this module uses, declared by hand (the
//! official SDK is not on crates.io). x86_64/aarch64 Linux: `size_t` is `usize`, C enums
//! are `u32`, the two-word buffer structs are passed by value where the ABI says so.
//!
//! Checked against the Envoy 1.40.0 binary the benchmark pins (9e558093): every callback is
//! exported by it, `on_program_init` answers the ABI version it logs as matched (`v0.2.0`),
//! and the hooks below are the ones its HTTP filter requires (a missing one makes Envoy refuse
//! the config with `Failed to resolve symbol ...`). Another Envoy needs this checked again.

use std::ffi::{c_char, c_void};

/// The ABI version this module was written against, NUL-terminated.
pub const ABI_VERSION: &std::ffi::CStr = c"v0.2.0";

/// Bytes Envoy owns: valid for the hook that produced them, or until the map changes.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct EnvoyBuffer {
    pub ptr: *const c_char,
    pub length: usize,
}

impl EnvoyBuffer {
    pub const NULL: Self = Self {
        ptr: std::ptr::null(),
        length: 0,
    };

    /// # Safety
    /// `ptr` must be null or valid for `length` bytes during `'a`.
    pub unsafe fn bytes<'a>(self) -> &'a [u8] {
        if self.ptr.is_null() || self.length == 0 {
            &[]
        } else {
            // SAFETY: the caller vouches for the pointer and the lifetime.
            unsafe { std::slice::from_raw_parts(self.ptr.cast::<u8>(), self.length) }
        }
    }
}

/// Bytes the module owns; Envoy copies what it keeps before the callback returns.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct ModuleBuffer {
    pub ptr: *const c_char,
    pub length: usize,
}

impl ModuleBuffer {
    pub fn of(bytes: &[u8]) -> Self {
        Self {
            ptr: bytes.as_ptr().cast(),
            length: bytes.len(),
        }
    }
}

/// A header the module owns (for a local reply).
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct ModuleHeader {
    pub key_ptr: *const c_char,
    pub key_length: usize,
    pub value_ptr: *const c_char,
    pub value_length: usize,
}

/// A header in Envoy's map.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct EnvoyHeader {
    pub key_ptr: *const c_char,
    pub key_length: usize,
    pub value_ptr: *const c_char,
    pub value_length: usize,
}

impl EnvoyHeader {
    pub const NULL: Self = Self {
        key_ptr: std::ptr::null(),
        key_length: 0,
        value_ptr: std::ptr::null(),
        value_length: 0,
    };
}

/// Which header map (`envoy_dynamic_module_type_http_header_type`).
pub const REQUEST_HEADERS: u32 = 0;
pub const RESPONSE_HEADERS: u32 = 2;
/// Headers hook answers (Envoy's `FilterHeadersStatus`).
pub const HEADERS_CONTINUE: u32 = 0;
pub const HEADERS_STOP_ITERATION: u32 = 1;
/// Holds the headers, and the body and trailers behind them (buffered up to the watermark),
/// until `continue_decoding`: what ext_authz answers while its check is in flight.
pub const HEADERS_STOP_ALL_ITERATION_AND_WATERMARK: u32 = 4;
/// Body and trailers hook answers.
pub const BODY_CONTINUE: u32 = 0;
pub const BODY_STOP_ITERATION_AND_WATERMARK: u32 = 2;
pub const TRAILERS_CONTINUE: u32 = 0;
pub const TRAILERS_STOP_ITERATION: u32 = 1;
/// `source.address` (`ip:port`), an `envoy_dynamic_module_type_attribute_id`.
pub const ATTRIBUTE_SOURCE_ADDRESS: u32 = 24;
/// `connection.uri_san_peer_certificate`: its first URI SAN (a SPIFFE ID).
pub const ATTRIBUTE_URI_SAN_PEER_CERTIFICATE: u32 = 37;
/// `connection.sha256_peer_certificate_digest`: hex SHA-256 of its DER.
pub const ATTRIBUTE_SHA256_PEER_CERTIFICATE_DIGEST: u32 = 38;
/// Log levels (Envoy's, `trace` = 0).
pub const LOG_ERROR: u32 = 4;

unsafe extern "C" {
    pub fn envoy_dynamic_module_callback_log(level: u32, message: ModuleBuffer);

    pub fn envoy_dynamic_module_callback_http_get_headers_size(
        filter: *mut c_void,
        header_type: u32,
    ) -> usize;

    /// Fills `result` (room for `get_headers_size` entries) with every header, repeated
    /// names as separate entries.
    pub fn envoy_dynamic_module_callback_http_get_headers(
        filter: *mut c_void,
        header_type: u32,
        result: *mut EnvoyHeader,
    ) -> bool;

    /// Replaces every value of `key`; an empty `value` removes the header.
    pub fn envoy_dynamic_module_callback_http_set_header(
        filter: *mut c_void,
        header_type: u32,
        key: ModuleBuffer,
        value: ModuleBuffer,
    ) -> bool;

    /// A local reply; the request hook then answers `HEADERS_STOP_ITERATION`.
    pub fn envoy_dynamic_module_callback_http_send_response(
        filter: *mut c_void,
        status: u32,
        headers: *mut ModuleHeader,
        headers_size: usize,
        body: ModuleBuffer,
        details: ModuleBuffer,
    );

    /// Adds a value to `key`, keeping the ones already there.
    pub fn envoy_dynamic_module_callback_http_add_header(
        filter: *mut c_void,
        header_type: u32,
        key: ModuleBuffer,
        value: ModuleBuffer,
    ) -> bool;

    /// Resumes a request whose headers hook answered a stop status.
    pub fn envoy_dynamic_module_callback_http_filter_continue_decoding(filter: *mut c_void);

    /// A scheduler for one filter, made on its worker thread: `commit` (any thread) makes
    /// Envoy call `on_http_filter_scheduled` on that worker thread, unless the filter is
    /// gone by then. The module deletes it.
    pub fn envoy_dynamic_module_callback_http_filter_scheduler_new(
        filter: *mut c_void,
    ) -> *mut c_void;

    pub fn envoy_dynamic_module_callback_http_filter_scheduler_commit(
        scheduler: *mut c_void,
        event_id: u64,
    );

    pub fn envoy_dynamic_module_callback_http_filter_scheduler_delete(scheduler: *mut c_void);

    /// True while Envoy only validates its config (`--mode validate`). Main thread only.
    pub fn envoy_dynamic_module_callback_is_validation_mode() -> bool;

    pub fn envoy_dynamic_module_callback_http_filter_get_attribute_string(
        filter: *mut c_void,
        attribute: u32,
        result: *mut EnvoyBuffer,
    ) -> bool;
}
