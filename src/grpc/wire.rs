//! The CheckRequest as Portcullis decodes it: only the fields the decision reads.
//!
//! Wire-compatible with `envoy.service.auth.v3.CheckRequest` (same field numbers and types);
//! every other field (destination, context extensions, metadata, request time...) is
//! skipped by the decoder instead of being built and dropped. The request headers are kept
//! as a list borrowed from the decoded message, not a hashed map: a CheckRequest carries a
//! dozen headers and the decision looks up three or four of them.
//!
//! Both of Envoy's header encodings are read: the `headers` map and, with the ext_authz
//! filter's `encode_raw_headers: true`, `header_map` (raw byte values).
//!
//! Decoding copies nothing: every text field (a protobuf `string`, the same wire type as
//! `bytes`) is kept as a `Bytes` slice of the received message, and is checked to be UTF-8
//! when it is read (`text`), once, where the request's parts are taken out. A text field that
//! is not UTF-8 makes the whole request unreadable (an explicit deny), as a `String` field's
//! decoding would: read leniently, a path or header could match a policy name it does not
//! hold. Copying each of a Check's ~20 strings (the ~1 KiB token among them) into its own
//! allocation was a tenth of the service's instructions per Check (`bench/run.sh
//! instructions`).

use std::borrow::Cow;

use bytes::Bytes;

use crate::authz::Headers;

/// A text field that is not UTF-8: the request cannot be read. Names the field.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NotUtf8(pub &'static str);

impl std::fmt::Display for NotUtf8 {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "`{}` is not UTF-8", self.0)
    }
}

impl std::error::Error for NotUtf8 {}

/// A text field's value, checked to be UTF-8; `field` names it in the error.
pub fn text<'a>(field: &'static str, value: &'a Bytes) -> Result<&'a str, NotUtf8> {
    std::str::from_utf8(value).map_err(|_| NotUtf8(field))
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct CheckRequest {
    #[prost(message, optional, tag = "1")]
    pub attributes: Option<AttributeContext>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct AttributeContext {
    #[prost(message, optional, tag = "1")]
    pub source: Option<Peer>,
    #[prost(message, optional, tag = "4")]
    pub request: Option<Request>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct Peer {
    #[prost(message, optional, tag = "1")]
    pub address: Option<Address>,
    #[prost(bytes = "bytes", tag = "4")]
    pub principal: Bytes,
    #[prost(bytes = "bytes", tag = "5")]
    pub certificate: Bytes,
}

/// `envoy.config.core.v3.Address`: only the socket address form carries an IP.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Address {
    #[prost(message, optional, tag = "1")]
    pub socket_address: Option<SocketAddress>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct SocketAddress {
    #[prost(bytes = "bytes", tag = "2")]
    pub address: Bytes,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct Request {
    #[prost(message, optional, tag = "2")]
    pub http: Option<HttpRequest>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct HttpRequest {
    #[prost(bytes = "bytes", tag = "1")]
    pub id: Bytes,
    #[prost(bytes = "bytes", tag = "2")]
    pub method: Bytes,
    /// `map<string, string> headers`: on the wire, a repeated key/value message.
    #[prost(message, repeated, tag = "3")]
    pub headers: Vec<MapEntry>,
    #[prost(bytes = "bytes", tag = "4")]
    pub path: Bytes,
    #[prost(bytes = "bytes", tag = "5")]
    pub host: Bytes,
    #[prost(bytes = "bytes", tag = "6")]
    pub scheme: Bytes,
    #[prost(bytes = "bytes", tag = "11")]
    pub body: Bytes,
    #[prost(bytes = "bytes", tag = "12")]
    pub raw_body: Bytes,
    /// Sent instead of `headers` when the filter sets `encode_raw_headers`.
    #[prost(message, optional, tag = "13")]
    pub header_map: Option<RawHeaderMap>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct MapEntry {
    #[prost(bytes = "bytes", tag = "1")]
    pub key: Bytes,
    #[prost(bytes = "bytes", tag = "2")]
    pub value: Bytes,
}

/// `envoy.config.core.v3.HeaderMap`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct RawHeaderMap {
    #[prost(message, repeated, tag = "1")]
    pub headers: Vec<RawHeader>,
}

/// `envoy.config.core.v3.HeaderValue`: `raw_value` when raw-encoded, else `value`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct RawHeader {
    #[prost(bytes = "bytes", tag = "1")]
    pub key: Bytes,
    #[prost(bytes = "bytes", tag = "2")]
    pub value: Bytes,
    #[prost(bytes = "bytes", tag = "3")]
    pub raw_value: Bytes,
}

/// The most header entries one request may carry (both encodings together, a repeated name
/// once per copy sent): ten times Envoy's own default (`max_request_headers_count`, 100). A
/// request with more is refused (`request_header_fields_too_large`, 431) before its headers
/// are read, so no request can make the decision's work grow past what this many allow.
pub const MAX_REQUEST_HEADERS: usize = 1000;

/// A request with more than [`MAX_REQUEST_HEADERS`] header entries: how many it carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TooManyHeaders(pub usize);

impl std::fmt::Display for TooManyHeaders {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "the request carries {} headers, more than the {MAX_REQUEST_HEADERS} Portcullis reads",
            self.0
        )
    }
}

impl std::error::Error for TooManyHeaders {}

impl TooManyHeaders {
    /// `Err` when `count` header entries are more than a request may carry.
    pub fn check(count: usize) -> Result<(), TooManyHeaders> {
        if count > MAX_REQUEST_HEADERS {
            Err(TooManyHeaders(count))
        } else {
            Ok(())
        }
    }
}

/// Why a request's headers could not be read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unreadable {
    /// A text field is not UTF-8: the request is malformed.
    NotUtf8(NotUtf8),
    /// More headers than a request may carry.
    TooManyHeaders(TooManyHeaders),
}

impl std::fmt::Display for Unreadable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Unreadable::NotUtf8(e) => e.fmt(f),
            Unreadable::TooManyHeaders(e) => e.fmt(f),
        }
    }
}

impl From<NotUtf8> for Unreadable {
    fn from(e: NotUtf8) -> Self {
        Unreadable::NotUtf8(e)
    }
}

impl From<TooManyHeaders> for Unreadable {
    fn from(e: TooManyHeaders) -> Self {
        Unreadable::TooManyHeaders(e)
    }
}

/// The request id of a CheckRequest whose headers are not read as a whole (too many): the
/// first `x-request-id` that is UTF-8 (either encoding), else Envoy's stream id, else empty.
/// One pass over the headers.
pub fn request_id_of(req: &CheckRequest) -> &str {
    let Some(http) = req
        .attributes
        .as_ref()
        .and_then(|a| a.request.as_ref())
        .and_then(|r| r.http.as_ref())
    else {
        return "";
    };
    const NAME: &[u8] = b"x-request-id";
    let raw = http.header_map.as_ref().map_or(&[][..], |m| &m.headers[..]);
    http.headers
        .iter()
        .filter(|h| h.key == NAME)
        .map(|h| &h.value)
        .chain(raw.iter().filter(|h| h.key == NAME).map(|h| {
            if h.raw_value.is_empty() {
                &h.value
            } else {
                &h.raw_value
            }
        }))
        .chain(std::iter::once(&http.id))
        .find_map(|v| std::str::from_utf8(v).ok())
        .unwrap_or_default()
}

/// The request headers, borrowed from a decoded `HttpRequest`.
///
/// INVARIANT: one entry per name, sorted by name when `sorted`. A name seen more than once
/// (in either encoding, or in both) is one entry with the values joined by `,` in the order
/// they were sent, exactly as Envoy's `headers` map joins repeated headers, so a second
/// `authorization` can never hide behind the first.
#[derive(Debug, Default)]
pub struct HeaderList<'a> {
    entries: Vec<(&'a str, Cow<'a, str>)>,
    /// Sorted by name (lookups by binary search); a short list is kept in the order sent
    /// (lookups by a linear scan, cheaper for the handful of headers Envoy sends).
    sorted: bool,
}

/// Up to this many headers a list is built and searched linearly: for a few headers that
/// costs less than sorting and binary search (about 800 instructions less per Check under
/// callgrind, `bench/run.sh instructions`); past it, sorting keeps the cost O(n log n).
const LINEAR_HEADERS: usize = 32;

impl<'a> HeaderList<'a> {
    /// The headers of a decoded `HttpRequest`, both encodings; more than
    /// [`MAX_REQUEST_HEADERS`], or a name or (non-raw) value that is not UTF-8, makes the
    /// request unreadable.
    pub fn from_http(http: &'a HttpRequest) -> Result<Self, Unreadable> {
        let raw = http.header_map.as_ref().map_or(&[][..], |m| &m.headers[..]);
        TooManyHeaders::check(http.headers.len() + raw.len())?;
        let mut pairs = Vec::with_capacity(http.headers.len() + raw.len());
        for h in &http.headers {
            let name = text("attributes.request.http.headers key", &h.key)?;
            let value = text("attributes.request.http.headers value", &h.value)?;
            pairs.push((name, Cow::Borrowed(value)));
        }
        for h in raw {
            let name = text("attributes.request.http.header_map key", &h.key)?;
            let value = if h.raw_value.is_empty() {
                Cow::Borrowed(text("attributes.request.http.header_map value", &h.value)?)
            } else {
                // A value that is not UTF-8 can match nothing a policy names; the
                // replacement characters keep it from matching by accident.
                String::from_utf8_lossy(&h.raw_value)
            };
            pairs.push((name, value));
        }
        Ok(Self::from_pairs(pairs))
    }

    /// The list of `pairs` (in the order sent): a name given more than once is one entry
    /// with its values joined by `,` in that order. A stable sort by name, then one pass
    /// merging neighbours: O(n log n) however many names differ. (Adding the headers one at
    /// a time to a list searched linearly was quadratic: one Check with 60 000 distinct
    /// names held a worker for 27 s.)
    pub fn from_pairs(mut pairs: Vec<(&'a str, Cow<'a, str>)>) -> Self {
        if pairs.len() <= LINEAR_HEADERS {
            let mut entries: Vec<(&'a str, Cow<'a, str>)> = Vec::with_capacity(pairs.len());
            for (name, value) in pairs {
                match entries.iter_mut().find(|(n, _)| *n == name) {
                    Some((_, existing)) => {
                        let joined = existing.to_mut();
                        joined.push(',');
                        joined.push_str(&value);
                    }
                    None => entries.push((name, value)),
                }
            }
            return Self {
                entries,
                sorted: false,
            };
        }
        // Stable: the values of one name keep the order they were sent in.
        pairs.sort_by(|a, b| a.0.cmp(b.0));
        let mut entries: Vec<(&'a str, Cow<'a, str>)> = Vec::with_capacity(pairs.len());
        for (name, value) in pairs {
            match entries.last_mut() {
                Some((last, existing)) if *last == name => {
                    let joined = existing.to_mut();
                    joined.push(',');
                    joined.push_str(&value);
                }
                _ => entries.push((name, value)),
            }
        }
        Self {
            entries,
            sorted: true,
        }
    }

    /// Where `name` is (`Ok`), or where it would go (`Err`).
    fn position(&self, name: &str) -> Result<usize, usize> {
        if self.sorted {
            self.entries.binary_search_by(|(n, _)| (*n).cmp(name))
        } else {
            self.entries
                .iter()
                .position(|(n, _)| *n == name)
                .ok_or(self.entries.len())
        }
    }

    /// Sets `name` to `value`, replacing any entry of that name (or removes it when `value`
    /// is `None`).
    pub fn set(&mut self, name: &'a str, value: Option<String>) {
        match (self.position(name), value) {
            (Ok(at), Some(value)) => self.entries[at].1 = Cow::Owned(value),
            (Ok(at), None) => {
                self.entries.remove(at);
            }
            (Err(at), Some(value)) => self.entries.insert(at, (name, Cow::Owned(value))),
            (Err(_), None) => {}
        }
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

impl Headers for HeaderList<'_> {
    fn entry(&self, name: &str) -> Option<(&str, &str)> {
        let at = self.position(name).ok()?;
        let (n, v) = &self.entries[at];
        Some((*n, v.as_ref()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use envoy_types::pb::envoy::config::core::v3 as core;
    use envoy_types::pb::envoy::service::auth::v3 as envoy;
    use envoy_types::pb::envoy::service::auth::v3::attribute_context;
    use prost::Message;

    fn t(b: &Bytes) -> &str {
        std::str::from_utf8(b).unwrap()
    }

    fn encoded(http: attribute_context::HttpRequest) -> Vec<u8> {
        let req = envoy::CheckRequest {
            attributes: Some(envoy::AttributeContext {
                source: Some(attribute_context::Peer {
                    address: Some(core::Address {
                        address: Some(core::address::Address::SocketAddress(core::SocketAddress {
                            address: "192.0.2.7".into(),
                            port_specifier: Some(core::socket_address::PortSpecifier::PortValue(
                                4242,
                            )),
                            ..Default::default()
                        })),
                    }),
                    service: "ignored".into(),
                    principal: "spiffe://example.org/ns/a/sa/b".into(),
                    certificate: "-----BEGIN CERTIFICATE-----".into(),
                    ..Default::default()
                }),
                destination: Some(attribute_context::Peer {
                    principal: "spiffe://example.org/dest".into(),
                    ..Default::default()
                }),
                request: Some(attribute_context::Request {
                    time: Some(Default::default()),
                    http: Some(http),
                }),
                context_extensions: [("k".to_string(), "v".to_string())].into(),
                ..Default::default()
            }),
        };
        req.encode_to_vec()
    }

    #[test]
    fn decodes_what_the_decision_reads_from_envoys_message() {
        let bytes = encoded(attribute_context::HttpRequest {
            id: "7".into(),
            method: "GET".into(),
            headers: [
                ("authorization".to_string(), "Bearer abc".to_string()),
                ("x-request-id".to_string(), "rid".to_string()),
            ]
            .into(),
            path: "/orders/1?x=1".into(),
            host: "api.example.com".into(),
            scheme: "https".into(),
            body: "hello".into(),
            protocol: "HTTP/1.1".into(),
            ..Default::default()
        });
        let req = CheckRequest::decode(&bytes[..]).expect("decodes");
        let attrs = req.attributes.expect("attributes");
        let source = attrs.source.expect("source");
        assert_eq!(source.principal, "spiffe://example.org/ns/a/sa/b");
        assert_eq!(source.certificate, "-----BEGIN CERTIFICATE-----");
        assert_eq!(
            source
                .address
                .and_then(|a| a.socket_address)
                .map(|s| s.address),
            Some(Bytes::from_static(b"192.0.2.7"))
        );
        let http = attrs.request.and_then(|r| r.http).expect("http");
        assert_eq!(
            (t(&http.id), t(&http.method), t(&http.path)),
            ("7", "GET", "/orders/1?x=1")
        );
        assert_eq!(
            (t(&http.host), t(&http.scheme)),
            ("api.example.com", "https")
        );
        assert_eq!(http.body, "hello");
        let headers = HeaderList::from_http(&http).unwrap();
        assert_eq!(headers.len(), 2);
        assert_eq!(
            headers.entry("authorization"),
            Some(("authorization", "Bearer abc"))
        );
        assert_eq!(headers.entry("x-request-id"), Some(("x-request-id", "rid")));
        assert_eq!(headers.entry("host"), None);
    }

    #[test]
    fn decoding_a_received_message_copies_none_of_its_text() {
        let token = format!("Bearer {}", "t".repeat(1000));
        let message = Bytes::from(encoded(attribute_context::HttpRequest {
            path: "/orders/1".into(),
            headers: [("authorization".to_string(), token.clone())].into(),
            ..Default::default()
        }));
        let req = CheckRequest::decode(message.clone()).expect("decodes");
        let http = req
            .attributes
            .and_then(|a| a.request)
            .and_then(|r| r.http)
            .expect("http");
        let headers = HeaderList::from_http(&http).unwrap();
        let (_, value) = headers.entry("authorization").expect("authorization");
        assert_eq!(value, token);
        // The value read is the received message's own bytes, not a copy of them.
        let inside = |s: &str| message.as_ptr_range().contains(&s.as_ptr());
        assert!(inside(value), "the token was copied out of the message");
        assert!(
            inside(t(&http.path)),
            "the path was copied out of the message"
        );
    }

    #[test]
    fn a_text_field_that_is_not_utf8_makes_the_headers_unreadable() {
        // A header name with a 0xff byte: a protobuf `string` that is not UTF-8.
        let http = HttpRequest {
            headers: vec![MapEntry {
                key: Bytes::from_static(b"x-\xff"),
                value: Bytes::from_static(b"v"),
            }],
            ..Default::default()
        };
        let err = HeaderList::from_http(&http).unwrap_err();
        assert_eq!(
            err.to_string(),
            "`attributes.request.http.headers key` is not UTF-8"
        );
        let http = HttpRequest {
            header_map: Some(RawHeaderMap {
                headers: vec![RawHeader {
                    key: Bytes::from_static(b"x-ok"),
                    value: Bytes::from_static(b"\xfe"),
                    raw_value: Bytes::new(),
                }],
            }),
            ..Default::default()
        };
        assert!(HeaderList::from_http(&http).is_err());
    }

    #[test]
    fn raw_headers_are_read_and_repeated_names_joined() {
        let raw = |k: &str, v: &[u8]| core::HeaderValue {
            key: k.into(),
            raw_value: v.to_vec(),
            ..Default::default()
        };
        let bytes = encoded(attribute_context::HttpRequest {
            method: "POST".into(),
            header_map: Some(core::HeaderMap {
                headers: vec![
                    raw("authorization", b"Bearer one"),
                    raw("x-api-key", b"k"),
                    raw("authorization", b"Bearer two"),
                    raw("x-odd", b"\xff\xfe"),
                    core::HeaderValue {
                        key: "x-plain".into(),
                        value: "v".into(),
                        ..Default::default()
                    },
                ],
            }),
            ..Default::default()
        });
        let req = CheckRequest::decode(&bytes[..]).expect("decodes");
        let http = req
            .attributes
            .and_then(|a| a.request)
            .and_then(|r| r.http)
            .expect("http");
        let headers = HeaderList::from_http(&http).unwrap();
        assert_eq!(headers.len(), 4);
        // Two credentials stay visible as two, so the decision refuses the request.
        assert_eq!(
            headers.entry("authorization").map(|(_, v)| v),
            Some("Bearer one,Bearer two")
        );
        assert_eq!(headers.entry("x-api-key").map(|(_, v)| v), Some("k"));
        assert_eq!(headers.entry("x-plain").map(|(_, v)| v), Some("v"));
        assert_eq!(
            headers.entry("x-odd").map(|(_, v)| v),
            Some("\u{fffd}\u{fffd}")
        );
    }

    #[test]
    fn set_replaces_or_removes_an_entry() {
        let http = HttpRequest {
            headers: vec![MapEntry {
                key: ":x".into(),
                value: "client".into(),
            }],
            ..Default::default()
        };
        let mut headers = HeaderList::from_http(&http).unwrap();
        headers.set(":x", Some("ours".into()));
        assert_eq!(headers.entry(":x").map(|(_, v)| v), Some("ours"));
        assert_eq!(headers.len(), 1);
        headers.set(":x", None);
        assert!(headers.is_empty());
    }

    /// `n` distinct headers `h0000`.., each with value `v`.
    fn distinct(n: usize) -> Vec<MapEntry> {
        (0..n)
            .map(|i| MapEntry {
                key: Bytes::from(format!("h{i:04}")),
                value: Bytes::from_static(b"v"),
            })
            .collect()
    }

    #[test]
    fn as_many_distinct_headers_as_a_request_may_carry_are_all_read() {
        let mut headers = distinct(MAX_REQUEST_HEADERS - 3);
        // Repeats in both encodings, out of order, and a name after every other: each name
        // is one entry, its values joined in the order sent (`headers` first).
        headers.push(MapEntry {
            key: "authorization".into(),
            value: "Bearer one".into(),
        });
        headers.push(MapEntry {
            key: "h0007".into(),
            value: "w".into(),
        });
        let http = HttpRequest {
            headers,
            header_map: Some(RawHeaderMap {
                headers: vec![RawHeader {
                    key: "authorization".into(),
                    raw_value: "Bearer two".into(),
                    ..Default::default()
                }],
            }),
            ..Default::default()
        };
        let mut list = HeaderList::from_http(&http).unwrap();
        assert_eq!(list.len(), MAX_REQUEST_HEADERS - 2);
        assert_eq!(
            list.entry("authorization").map(|(_, v)| v),
            Some("Bearer one,Bearer two")
        );
        assert_eq!(list.entry("h0007").map(|(_, v)| v), Some("v,w"));
        for i in [0, 1, 500, MAX_REQUEST_HEADERS - 4] {
            let name = format!("h{i:04}");
            assert_eq!(list.entry(&name), Some((name.as_str(), "v")), "{name}");
        }
        assert_eq!(list.entry("h9999"), None);
        assert_eq!(list.entry("a"), None);
        // A name set later (the body digest's pseudo-header) is found like any other.
        list.set(":digest", Some("d".into()));
        list.set("zz", Some("z".into()));
        assert_eq!(list.entry(":digest").map(|(_, v)| v), Some("d"));
        assert_eq!(list.entry("zz").map(|(_, v)| v), Some("z"));
        assert_eq!(list.entry("h0500").map(|(_, v)| v), Some("v"));
        list.set(":digest", None);
        assert_eq!(list.entry(":digest"), None);
        assert_eq!(list.len(), MAX_REQUEST_HEADERS - 1);
    }

    #[test]
    fn more_headers_than_a_request_may_carry_make_it_unreadable() {
        // One over the cap, across both encodings.
        let http = HttpRequest {
            headers: distinct(MAX_REQUEST_HEADERS),
            header_map: Some(RawHeaderMap {
                headers: vec![RawHeader {
                    key: "x-one-more".into(),
                    value: "v".into(),
                    ..Default::default()
                }],
            }),
            ..Default::default()
        };
        let err = HeaderList::from_http(&http).unwrap_err();
        assert_eq!(
            err,
            Unreadable::TooManyHeaders(TooManyHeaders(MAX_REQUEST_HEADERS + 1))
        );
        assert_eq!(
            err.to_string(),
            format!(
                "the request carries {} headers, more than the {MAX_REQUEST_HEADERS} Portcullis reads",
                MAX_REQUEST_HEADERS + 1
            )
        );
    }

    #[test]
    fn the_request_id_of_a_request_not_read_is_its_x_request_id_else_the_stream_id() {
        let check = |http: HttpRequest| CheckRequest {
            attributes: Some(AttributeContext {
                request: Some(Request { http: Some(http) }),
                ..Default::default()
            }),
        };
        let mut headers = distinct(3);
        headers.push(MapEntry {
            key: "x-request-id".into(),
            value: "rid".into(),
        });
        let req = check(HttpRequest {
            id: "7".into(),
            headers,
            ..Default::default()
        });
        assert_eq!(request_id_of(&req), "rid");
        let req = check(HttpRequest {
            id: "7".into(),
            header_map: Some(RawHeaderMap {
                headers: vec![RawHeader {
                    key: "x-request-id".into(),
                    raw_value: "raw-rid".into(),
                    ..Default::default()
                }],
            }),
            ..Default::default()
        });
        assert_eq!(request_id_of(&req), "raw-rid");
        let req = check(HttpRequest {
            id: "7".into(),
            headers: distinct(3),
            ..Default::default()
        });
        assert_eq!(request_id_of(&req), "7");
        assert_eq!(request_id_of(&CheckRequest::default()), "");
    }
}
