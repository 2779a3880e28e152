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

/// The request headers, borrowed from a decoded `HttpRequest`.
///
/// INVARIANT: one entry per name. A name seen more than once (in either encoding, or in
/// both) is one entry with the values joined by `,`, exactly as Envoy's `headers` map joins
/// repeated headers, so a second `authorization` can never hide behind the first.
#[derive(Debug, Default)]
pub struct HeaderList<'a> {
    entries: Vec<(&'a str, Cow<'a, str>)>,
}

impl<'a> HeaderList<'a> {
    /// The headers of a decoded `HttpRequest`, both encodings; a name or (non-raw) value
    /// that is not UTF-8 makes the request unreadable.
    pub fn from_http(http: &'a HttpRequest) -> Result<Self, NotUtf8> {
        let raw = http.header_map.as_ref().map_or(&[][..], |m| &m.headers[..]);
        let mut list = HeaderList {
            entries: Vec::with_capacity(http.headers.len() + raw.len()),
        };
        for h in &http.headers {
            let name = text("attributes.request.http.headers key", &h.key)?;
            let value = text("attributes.request.http.headers value", &h.value)?;
            list.add(name, Cow::Borrowed(value));
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
            list.add(name, value);
        }
        Ok(list)
    }

    /// Adds one header; a name already present gets the value appended after a `,`.
    pub fn add(&mut self, name: &'a str, value: Cow<'a, str>) {
        match self.entries.iter_mut().find(|(n, _)| *n == name) {
            Some((_, existing)) => {
                let joined = existing.to_mut();
                joined.push(',');
                joined.push_str(&value);
            }
            None => self.entries.push((name, value)),
        }
    }

    /// Sets `name` to `value`, replacing any entry of that name (or removes it when `value`
    /// is `None`).
    pub fn set(&mut self, name: &'a str, value: Option<String>) {
        self.entries.retain(|(n, _)| *n != name);
        if let Some(value) = value {
            self.entries.push((name, Cow::Owned(value)));
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
        self.entries
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(n, v)| (*n, v.as_ref()))
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
}
