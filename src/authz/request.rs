//! The request as the decision core sees it: borrowed, already lower-cased header names
//! (Envoy lower-cases them), nothing from the wire types.

use std::collections::HashMap;
use std::hash::BuildHasher;
use std::net::IpAddr;

use crate::identity::peer::PeerCertificate;

/// Request headers, looked up by lower-case name. A header sent more than once is one entry
/// with the values joined by `,`, as Envoy sends them (credential extraction relies on it
/// to refuse a request carrying two credentials).
pub trait Headers: Send + Sync + std::fmt::Debug {
    /// The header's name (as stored) and value.
    fn entry(&self, name: &str) -> Option<(&str, &str)>;
}

impl<S: BuildHasher + Send + Sync> Headers for HashMap<String, String, S> {
    fn entry(&self, name: &str) -> Option<(&str, &str)> {
        self.get_key_value(name)
            .map(|(k, v)| (k.as_str(), v.as_str()))
    }
}

/// A view of one HTTP request. Built by `grpc` from a CheckRequest, or by the CLI's `explain`.
#[derive(Debug, Clone, Copy)]
pub struct RequestView<'a> {
    /// The HTTP method, exactly as sent (case-sensitive).
    pub method: &'a str,
    /// The `:authority` / Host, as sent.
    pub host: &'a str,
    /// The raw `:path`, including any query string and fragment.
    pub path: &'a str,
    /// Request headers with lower-case names. Repeated headers arrive joined with `,`.
    pub headers: &'a dyn Headers,
    /// The peer address Envoy reports (the downstream connection's source).
    pub source_ip: Option<IpAddr>,
    /// The peer principal Envoy reports (e.g. a SPIFFE ID), empty when none.
    pub source_principal: &'a str,
    /// The request's scheme as Envoy reports it (`http`/`https`), for DPoP `htu`; may be empty.
    pub scheme: &'a str,
    /// The downstream client certificate Envoy forwarded (`include_peer_certificate`), parsed.
    pub peer_certificate: Option<&'a PeerCertificate>,
}

impl<'a> RequestView<'a> {
    /// A header value by lower-case name.
    pub fn header(&self, name: &str) -> Option<&'a str> {
        self.headers.entry(name).map(|(_, value)| value)
    }

    /// The peer's principals: Envoy's `source.principal` and the URI SANs of the forwarded
    /// client certificate. Both come from Envoy's connection, never from a request header.
    pub fn principals(&self) -> Vec<&'a str> {
        let mut out: Vec<&'a str> = Vec::new();
        if !self.source_principal.is_empty() {
            out.push(self.source_principal);
        }
        if let Some(cert) = self.peer_certificate {
            for san in &cert.uri_sans {
                if !out.contains(&san.as_str()) {
                    out.push(san);
                }
            }
        }
        out
    }
}
