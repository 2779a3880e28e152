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

    /// The peer's principals, from Envoy's connection, never from a request header: the URI
    /// SANs of the forwarded client certificate, every one of them. Without a forwarded
    /// certificate, Envoy's `source.principal`. Not both: Envoy derives `source.principal`
    /// from the same certificate, from its first URI SAN but, when it has none, from a DNS
    /// SAN or the subject, so a certificate with `DNS:spiffe://...` (which any CA signing
    /// requested DNS names may issue) would pass for that SPIFFE ID.
    pub fn principals(&self) -> Vec<&'a str> {
        match self.peer_certificate {
            Some(cert) => {
                let mut out: Vec<&'a str> = Vec::with_capacity(cert.uri_sans.len());
                for san in &cert.uri_sans {
                    if !out.contains(&san.as_str()) {
                        out.push(san);
                    }
                }
                out
            }
            None if self.source_principal.is_empty() => Vec::new(),
            None => vec![self.source_principal],
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn view<'a>(principal: &'a str, cert: Option<&'a PeerCertificate>) -> RequestView<'a> {
        static NO_HEADERS: std::sync::LazyLock<HashMap<String, String>> =
            std::sync::LazyLock::new(HashMap::new);
        RequestView {
            method: "GET",
            host: "api.example.com",
            path: "/",
            headers: &*NO_HEADERS,
            source_ip: None,
            source_principal: principal,
            scheme: "https",
            peer_certificate: cert,
        }
    }

    const CHECKOUT: &str = "spiffe://example.org/ns/shop/sa/checkout";
    const DIGEST: &str = "4ab1b9a3a8a9c0c3d1e2f30415263748596a7b8c9dae0f112233445566778899";

    #[test]
    fn with_a_certificate_only_its_uri_sans_are_principals() {
        // Envoy names a DNS SAN as the principal of a certificate without URI SAN.
        let none = PeerCertificate::from_digest(DIGEST, Vec::new()).unwrap();
        assert!(view(CHECKOUT, Some(&none)).principals().is_empty());
        let two = PeerCertificate::from_digest(
            DIGEST,
            vec![
                "spiffe://example.org/ns/legacy/sa/batch".into(),
                CHECKOUT.into(),
            ],
        )
        .unwrap();
        assert_eq!(
            view("spiffe://example.org/ns/legacy/sa/batch", Some(&two)).principals(),
            ["spiffe://example.org/ns/legacy/sa/batch", CHECKOUT]
        );
    }

    #[test]
    fn without_a_certificate_envoys_principal_stands() {
        assert_eq!(view(CHECKOUT, None).principals(), [CHECKOUT]);
        assert!(view("", None).principals().is_empty());
    }
}
