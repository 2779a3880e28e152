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

use std::borrow::Cow;

use crate::authz::Headers;

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
    #[prost(string, tag = "4")]
    pub principal: String,
    #[prost(string, tag = "5")]
    pub certificate: String,
}

/// `envoy.config.core.v3.Address`: only the socket address form carries an IP.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Address {
    #[prost(message, optional, tag = "1")]
    pub socket_address: Option<SocketAddress>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct SocketAddress {
    #[prost(string, tag = "2")]
    pub address: String,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct Request {
    #[prost(message, optional, tag = "2")]
    pub http: Option<HttpRequest>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct HttpRequest {
    #[prost(string, tag = "1")]
    pub id: String,
    #[prost(string, tag = "2")]
    pub method: String,
    /// `map<string, string> headers`: on the wire, a repeated key/value message.
    #[prost(message, repeated, tag = "3")]
    pub headers: Vec<MapEntry>,
    #[prost(string, tag = "4")]
    pub path: String,
    #[prost(string, tag = "5")]
    pub host: String,
    #[prost(string, tag = "6")]
    pub scheme: String,
    #[prost(string, tag = "11")]
    pub body: String,
    #[prost(bytes = "vec", tag = "12")]
    pub raw_body: Vec<u8>,
    /// Sent instead of `headers` when the filter sets `encode_raw_headers`.
    #[prost(message, optional, tag = "13")]
    pub header_map: Option<RawHeaderMap>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct MapEntry {
    #[prost(string, tag = "1")]
    pub key: String,
    #[prost(string, tag = "2")]
    pub value: String,
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
    #[prost(string, tag = "1")]
    pub key: String,
    #[prost(string, tag = "2")]
    pub value: String,
    #[prost(bytes = "vec", tag = "3")]
    pub raw_value: Vec<u8>,
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
    pub fn from_http(http: &'a HttpRequest) -> Self {
        let raw = http.header_map.as_ref().map_or(&[][..], |m| &m.headers[..]);
        let mut list = HeaderList {
            entries: Vec::with_capacity(http.headers.len() + raw.len()),
        };
        for h in &http.headers {
            list.add(&h.key, Cow::Borrowed(&h.value));
        }
        for h in raw {
            let value = if h.raw_value.is_empty() {
                Cow::Borrowed(h.value.as_str())
            } else {
                // A value that is not UTF-8 can match nothing a policy names; the
                // replacement characters keep it from matching by accident.
                String::from_utf8_lossy(&h.raw_value)
            };
            list.add(&h.key, value);
        }
        list
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
            Some("192.0.2.7".to_string())
        );
        let http = attrs.request.and_then(|r| r.http).expect("http");
        assert_eq!(
            (http.id.as_str(), http.method.as_str(), http.path.as_str()),
            ("7", "GET", "/orders/1?x=1")
        );
        assert_eq!(
            (http.host.as_str(), http.scheme.as_str()),
            ("api.example.com", "https")
        );
        assert_eq!(http.body, "hello");
        let headers = HeaderList::from_http(&http);
        assert_eq!(headers.len(), 2);
        assert_eq!(
            headers.entry("authorization"),
            Some(("authorization", "Bearer abc"))
        );
        assert_eq!(headers.entry("x-request-id"), Some(("x-request-id", "rid")));
        assert_eq!(headers.entry("host"), None);
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
        let headers = HeaderList::from_http(&http);
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
        let mut headers = HeaderList::from_http(&http);
        headers.set(":x", Some("ours".into()));
        assert_eq!(headers.entry(":x").map(|(_, v)| v), Some("ours"));
        assert_eq!(headers.len(), 1);
        headers.set(":x", None);
        assert!(headers.is_empty());
    }
}
