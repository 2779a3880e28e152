//! Safe wrappers over the callbacks in `abi.rs`, for one request on Envoy's worker thread.

use std::ffi::c_void;
use std::net::{IpAddr, SocketAddr};

use crate::abi;

/// Envoy's side of one HTTP filter (one request). Only used inside a hook Envoy called for
/// this request, on Envoy's worker thread.
#[derive(Debug)]
pub struct Filter(*mut c_void);

impl Filter {
    /// # Safety
    /// `ptr` is the `filter_envoy_ptr` Envoy passed to the running hook.
    pub unsafe fn new(ptr: *mut c_void) -> Self {
        Self(ptr)
    }

    /// Every request header as `(name, value)`, borrowed from Envoy's map: valid while the
    /// hook runs and the map is not changed (the borrow of `self` keeps setters away only by
    /// convention: callers drop the list before changing headers). Names are lower-case.
    /// `Err` names a header that is not UTF-8: the request is then refused, as the gRPC
    /// service refuses such a CheckRequest.
    pub fn request_headers(&self) -> Result<Vec<(&str, &str)>, String> {
        // SAFETY: `self.0` is the live filter of the running hook (see `new`).
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
        raw.iter()
            .map(|h| {
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
                let value = std::str::from_utf8(v)
                    .map_err(|_| format!("request header `{name}` is not UTF-8"))?;
                Ok((name, value))
            })
            .collect()
    }

    /// The downstream peer's address, from Envoy's `source.address` attribute (`ip:port`,
    /// `[v6]:port`), read in place.
    pub fn source_ip(&self) -> Option<IpAddr> {
        let mut out = abi::EnvoyBuffer::NULL;
        // SAFETY: `self.0` is live; `out` is a valid place for the result.
        let found = unsafe {
            abi::envoy_dynamic_module_callback_http_filter_get_attribute_string(
                self.0,
                abi::ATTRIBUTE_SOURCE_ADDRESS,
                &mut out,
            )
        };
        // SAFETY: Envoy's buffer, valid during the hook; parsed before this returns.
        let text = std::str::from_utf8(unsafe { out.bytes() }).ok()?;
        if !found {
            return None;
        }
        text.parse::<SocketAddr>()
            .map(|a| a.ip())
            .or_else(|_| text.parse::<IpAddr>())
            .ok()
    }

    /// Sets a request header, replacing every copy the client sent.
    pub fn set_request_header(&self, name: &str, value: &str) {
        if value.is_empty() {
            return;
        }
        // SAFETY: `self.0` is live; Envoy copies both buffers.
        unsafe {
            abi::envoy_dynamic_module_callback_http_set_header(
                self.0,
                abi::REQUEST_HEADERS,
                abi::ModuleBuffer::of(name.as_bytes()),
                abi::ModuleBuffer::of(value.as_bytes()),
            );
        }
    }

    /// Removes every copy of a request header (an empty value removes, in this ABI).
    pub fn remove_request_header(&self, name: &str) {
        // SAFETY: as above.
        unsafe {
            abi::envoy_dynamic_module_callback_http_set_header(
                self.0,
                abi::REQUEST_HEADERS,
                abi::ModuleBuffer::of(name.as_bytes()),
                abi::ModuleBuffer::of(b""),
            );
        }
    }

    /// Envoy's local reply. The hook must then stop the filter chain.
    pub fn send_response(&self, status: u16, headers: &[(&str, &str)], body: &[u8]) {
        let mut raw: Vec<abi::ModuleHeader> = headers
            .iter()
            .map(|(k, v)| abi::ModuleHeader {
                key_ptr: k.as_ptr().cast(),
                key_length: k.len(),
                value_ptr: v.as_ptr().cast(),
                value_length: v.len(),
            })
            .collect();
        // SAFETY: `self.0` is live; the headers and body outlive the call, Envoy copies them.
        unsafe {
            abi::envoy_dynamic_module_callback_http_send_response(
                self.0,
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
