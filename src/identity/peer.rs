//! Peer (client) certificates and service principals: the certificate Envoy forwards for an
//! mTLS downstream (`attributes.source.certificate`, URL-encoded PEM, present with
//! `include_peer_certificate`), its URI SANs (SPIFFE IDs) and its RFC 8705 thumbprint, and
//! the principal patterns rules match them with.
//!
//! Pure: parses bytes it is handed, never verifies a chain (Envoy's listener did that when it
//! accepted the connection), never does I/O. Nothing here trusts a request header: the
//! certificate and principal come from Envoy's own connection attributes.

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;

/// The largest forwarded certificate we parse (a leaf certificate is a few KiB at most).
const MAX_CERT_BYTES: usize = 64 * 1024;

/// The longest principal we match; longer ones are ignored (never matched).
const MAX_PRINCIPAL_BYTES: usize = 2048;

/// Why a forwarded certificate could not be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PeerError {
    #[error("the peer certificate is larger than {MAX_CERT_BYTES} bytes")]
    TooLarge,
    #[error("the peer certificate is not URL-encoded UTF-8")]
    BadEncoding,
    #[error("the peer certificate is not a PEM `CERTIFICATE` block")]
    NotPem,
    #[error("the peer certificate is not a valid X.509 certificate")]
    NotX509,
    #[error("the peer certificate digest is not 64 hex digits")]
    BadDigest,
}

/// What the decision needs from a verified peer certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerCertificate {
    /// URI subject alternative names (e.g. `spiffe://example.org/ns/shop/sa/checkout`).
    pub uri_sans: Vec<String>,
    /// RFC 8705 `x5t#S256`: base64url(SHA-256(certificate DER)).
    pub thumbprint_s256: String,
}

impl PeerCertificate {
    /// Parses Envoy's `source.certificate`: URL-encoded PEM of the leaf certificate.
    pub fn from_envoy(url_encoded_pem: &str) -> Result<Self, PeerError> {
        if url_encoded_pem.len() > MAX_CERT_BYTES * 2 {
            return Err(PeerError::TooLarge);
        }
        let pem = percent_encoding::percent_decode_str(url_encoded_pem)
            .decode_utf8()
            .map_err(|_| PeerError::BadEncoding)?;
        Self::from_pem(pem.as_bytes())
    }

    /// Parses the first PEM `CERTIFICATE` block.
    pub fn from_pem(pem: &[u8]) -> Result<Self, PeerError> {
        if pem.len() > MAX_CERT_BYTES * 2 {
            return Err(PeerError::TooLarge);
        }
        let (_, block) = x509_parser::pem::parse_x509_pem(pem).map_err(|_| PeerError::NotPem)?;
        if block.label != "CERTIFICATE" {
            return Err(PeerError::NotPem);
        }
        Self::from_der(&block.contents)
    }

    /// Parses a DER certificate.
    pub fn from_der(der: &[u8]) -> Result<Self, PeerError> {
        if der.len() > MAX_CERT_BYTES {
            return Err(PeerError::TooLarge);
        }
        let (rest, cert) =
            x509_parser::parse_x509_certificate(der).map_err(|_| PeerError::NotX509)?;
        if !rest.is_empty() {
            return Err(PeerError::NotX509);
        }
        // A certificate with two SAN extensions is malformed (RFC 5280 4.2); refuse it rather
        // than pick one.
        let san = cert
            .subject_alternative_name()
            .map_err(|_| PeerError::NotX509)?;
        let uri_sans = san
            .map(|ext| {
                ext.value
                    .general_names
                    .iter()
                    .filter_map(|n| match n {
                        x509_parser::extensions::GeneralName::URI(uri) => Some(uri.to_string()),
                        _ => None,
                    })
                    .collect()
            })
            .unwrap_or_default();
        Ok(PeerCertificate {
            uri_sans,
            thumbprint_s256: thumbprint_s256(der),
        })
    }

    /// From what Envoy says of the certificate instead of the certificate itself (the Envoy
    /// dynamic module reads connection attributes, not PEM): the hex SHA-256 of its DER
    /// (`connection.sha256_peer_certificate_digest`) and the URI SANs known.
    pub fn from_digest(sha256_hex: &str, uri_sans: Vec<String>) -> Result<Self, PeerError> {
        let hex = sha256_hex.as_bytes();
        if hex.len() != 64 {
            return Err(PeerError::BadDigest);
        }
        let digit = |c: u8| (c as char).to_digit(16).ok_or(PeerError::BadDigest);
        let digest = hex
            .chunks(2)
            .map(|pair| Ok((digit(pair[0])? << 4 | digit(pair[1])?) as u8))
            .collect::<Result<Vec<u8>, PeerError>>()?;
        Ok(PeerCertificate {
            uri_sans,
            thumbprint_s256: URL_SAFE_NO_PAD.encode(digest),
        })
    }

    /// The whole certificate of the connection whose hex SHA-256 is `sha256_hex`, from Envoy's
    /// `x-forwarded-client-cert` header (`set_current_client_cert_details: {cert: true}`): the
    /// element whose `Hash` is that digest, its `Cert` parsed, and kept only if its DER really
    /// hashes to the digest. So a header a client wrote itself (a listener that forwards
    /// instead of sanitizing) can name nothing but the certificate the client presented.
    /// `Ok(None)` when no element describes that certificate with its PEM.
    pub fn from_forwarded_client_cert(
        xfcc: &str,
        sha256_hex: &str,
    ) -> Result<Option<Self>, PeerError> {
        let connection = Self::from_digest(sha256_hex, Vec::new())?;
        for element in split_unquoted(xfcc, b',') {
            let mut hash = None;
            let mut cert = None;
            for pair in split_unquoted(element, b';') {
                let Some((key, value)) = pair.split_once('=') else {
                    continue;
                };
                let value = value.trim();
                let value = value
                    .strip_prefix('"')
                    .and_then(|v| v.strip_suffix('"'))
                    .unwrap_or(value);
                match key.trim() {
                    k if k.eq_ignore_ascii_case("hash") => hash = Some(value),
                    k if k.eq_ignore_ascii_case("cert") => cert = Some(value),
                    _ => {}
                }
            }
            let (Some(hash), Some(cert)) = (hash, cert) else {
                continue;
            };
            if !hash.eq_ignore_ascii_case(sha256_hex) {
                continue;
            }
            let parsed = Self::from_envoy(cert)?;
            if parsed.thumbprint_s256 == connection.thumbprint_s256 {
                return Ok(Some(parsed));
            }
        }
        Ok(None)
    }
}

/// `text` split at `separator` where it is not inside double quotes (`\"` inside quotes is an
/// escaped quote), as `x-forwarded-client-cert` quotes values that may hold `,` and `;`.
fn split_unquoted(text: &str, separator: u8) -> impl Iterator<Item = &str> {
    let bytes = text.as_bytes();
    let mut start = 0;
    let mut quoted = false;
    let mut escaped = false;
    let mut cuts = Vec::new();
    for (i, &b) in bytes.iter().enumerate() {
        match b {
            _ if escaped => escaped = false,
            b'\\' if quoted => escaped = true,
            b'"' => quoted = !quoted,
            _ if b == separator && !quoted => {
                cuts.push(&text[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    cuts.push(&text[start..]);
    cuts.into_iter()
}

/// RFC 8705 section 3.1: base64url(SHA-256(DER)) without padding.
pub fn thumbprint_s256(der: &[u8]) -> String {
    let digest = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, der);
    URL_SAFE_NO_PAD.encode(digest.as_ref())
}

/// A configured principal pattern.
///
/// - `spiffe://example.org/ns/shop/sa/checkout`: exactly this principal.
/// - `spiffe://example.org/ns/shop/*`: the prefix plus exactly one more non-empty segment.
/// - `spiffe://example.org/ns/shop/**`: the prefix plus one or more non-empty segments.
///
/// Wildcards never match a segment that is `.` or `..`, nor a principal with `%`, `?`, `#`,
/// whitespace or control characters, so an oddly written SAN cannot climb out of the prefix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PrincipalPattern {
    Exact(String),
    /// Prefix ending in `/`; one segment follows.
    OneSegment(String),
    /// Prefix ending in `/`; one or more segments follow.
    AnyDepth(String),
}

/// Why a configured principal pattern is invalid.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PrincipalPatternError {
    #[error("the principal is empty")]
    Empty,
    #[error("the principal contains whitespace or control characters")]
    BadCharacter,
    #[error("`*` is only allowed as a whole last segment (`.../*` or `.../**`)")]
    MisplacedWildcard,
    #[error("a wildcard needs a prefix ending in `/`, e.g. `spiffe://example.org/ns/shop/*`")]
    BarePrefix,
    #[error(
        "a principal is a URI SAN (`scheme://authority/...`, e.g. a SPIFFE ID): a DNS name or a \
         certificate subject never is one"
    )]
    NotAUri,
}

impl PrincipalPattern {
    pub fn parse(text: &str) -> Result<Self, PrincipalPatternError> {
        if text.is_empty() {
            return Err(PrincipalPatternError::Empty);
        }
        if text.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err(PrincipalPatternError::BadCharacter);
        }
        let (prefix, make): (&str, fn(String) -> Self) = if let Some(p) = text.strip_suffix("/**") {
            (p, PrincipalPattern::AnyDepth)
        } else if let Some(p) = text.strip_suffix("/*") {
            (p, PrincipalPattern::OneSegment)
        } else {
            if text.contains('*') {
                return Err(PrincipalPatternError::MisplacedWildcard);
            }
            // Only URI SANs are principals (`RequestView::principals`): a pattern for a DNS
            // name or a subject could match nothing, or, where Envoy forwards no
            // certificate, its `source.principal` fallback.
            if text
                .split_once("://")
                .is_none_or(|(scheme, rest)| scheme.is_empty() || rest.is_empty())
            {
                return Err(PrincipalPatternError::NotAUri);
            }
            return Ok(PrincipalPattern::Exact(text.to_string()));
        };
        if prefix.contains('*') {
            return Err(PrincipalPatternError::MisplacedWildcard);
        }
        // `spiffe://*` would match every workload of every trust domain: require at least a
        // scheme and an authority before the wildcard.
        let authority = prefix.split_once("://").map(|(_, rest)| rest);
        if authority.is_none_or(|a| a.is_empty()) {
            return Err(PrincipalPatternError::BarePrefix);
        }
        Ok(make(format!("{prefix}/")))
    }

    /// True when `principal` matches.
    pub fn matches(&self, principal: &str) -> bool {
        if principal.is_empty() || principal.len() > MAX_PRINCIPAL_BYTES {
            return false;
        }
        match self {
            PrincipalPattern::Exact(p) => p == principal,
            PrincipalPattern::OneSegment(prefix) => principal
                .strip_prefix(prefix.as_str())
                .is_some_and(|rest| !rest.contains('/') && clean_segment(rest)),
            PrincipalPattern::AnyDepth(prefix) => principal
                .strip_prefix(prefix.as_str())
                .is_some_and(|rest| rest.split('/').all(clean_segment)),
        }
    }
}

impl std::fmt::Display for PrincipalPattern {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PrincipalPattern::Exact(p) => f.write_str(p),
            PrincipalPattern::OneSegment(p) => write!(f, "{p}*"),
            PrincipalPattern::AnyDepth(p) => write!(f, "{p}**"),
        }
    }
}

fn clean_segment(s: &str) -> bool {
    !s.is_empty()
        && s != "."
        && s != ".."
        && !s
            .chars()
            .any(|c| matches!(c, '%' | '?' | '#' | '\\') || c.is_whitespace() || c.is_control())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;

    fn fixture(name: &str) -> Vec<u8> {
        let path = format!("{}/tests/fixtures/mtls/{name}", env!("CARGO_MANIFEST_DIR"));
        std::fs::read(path).unwrap()
    }

    #[test]
    fn a_digest_from_envoy_gives_the_certificate_s_thumbprint() {
        let parsed = PeerCertificate::from_pem(&fixture("checkout.crt")).unwrap();
        let digest = URL_SAFE_NO_PAD.decode(&parsed.thumbprint_s256).unwrap();
        let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
        let from_envoy = PeerCertificate::from_digest(&hex, parsed.uri_sans.clone()).unwrap();
        assert_eq!(from_envoy, parsed);
        let upper = PeerCertificate::from_digest(&hex.to_uppercase(), vec![]).unwrap();
        assert_eq!(upper.thumbprint_s256, parsed.thumbprint_s256);
        for bad in ["", "ab", &hex[1..], &format!("{}zz", &hex[2..])] {
            assert_eq!(
                PeerCertificate::from_digest(bad, vec![]),
                Err(PeerError::BadDigest),
                "{bad:?}"
            );
        }
    }

    fn hex_digest(cert: &PeerCertificate) -> String {
        let digest = URL_SAFE_NO_PAD.decode(&cert.thumbprint_s256).unwrap();
        digest.iter().map(|b| format!("{b:02x}")).collect()
    }

    #[test]
    fn the_forwarded_client_cert_gives_every_uri_san_of_the_connection_s_certificate() {
        let pem = fixture("migrating.crt");
        let cert = PeerCertificate::from_pem(&pem).unwrap();
        assert_eq!(
            cert.uri_sans,
            [
                "spiffe://example.org/ns/legacy/sa/batch",
                "spiffe://example.org/ns/shop/sa/checkout"
            ]
        );
        let hash = hex_digest(&cert);
        let encoded = envoy_encode(&pem);
        // As Envoy writes it: quoted values may hold `,` and `;`, and an earlier hop's
        // element comes first.
        let xfcc = format!(
            "By=spiffe://up;Hash=00;Subject=\"CN=a,O=b;c\",By=spiffe://edge;Hash={hash};\
             Cert=\"{encoded}\";Subject=\"O=Portcullis test,CN=migrating\";\
             URI=spiffe://example.org/ns/legacy/sa/batch"
        );
        assert_eq!(
            PeerCertificate::from_forwarded_client_cert(&xfcc, &hash),
            Ok(Some(cert.clone()))
        );
        assert_eq!(
            PeerCertificate::from_forwarded_client_cert(&xfcc, &hash.to_uppercase()),
            Ok(Some(cert))
        );
    }

    #[test]
    fn a_forwarded_client_cert_that_is_not_the_connection_s_is_ignored() {
        let theirs = fixture("checkout.crt");
        let own = PeerCertificate::from_pem(&fixture("intruder.crt")).unwrap();
        let own_hash = hex_digest(&own);
        // A client that claims someone else's certificate under its own digest.
        let forged = format!("Hash={own_hash};Cert=\"{}\"", envoy_encode(&theirs));
        assert_eq!(
            PeerCertificate::from_forwarded_client_cert(&forged, &own_hash),
            Ok(None)
        );
        // No element for this connection, or one without its PEM.
        let other = format!("Hash=ab;Cert=\"{}\"", envoy_encode(&theirs));
        assert_eq!(
            PeerCertificate::from_forwarded_client_cert(&other, &own_hash),
            Ok(None)
        );
        let no_cert = format!("Hash={own_hash};URI=spiffe://example.org/ns/other/sa/intruder");
        assert_eq!(
            PeerCertificate::from_forwarded_client_cert(&no_cert, &own_hash),
            Ok(None)
        );
        assert_eq!(
            PeerCertificate::from_forwarded_client_cert("", &own_hash),
            Ok(None)
        );
        // A broken PEM under the connection's digest is an error, never a certificate.
        assert_eq!(
            PeerCertificate::from_forwarded_client_cert(
                &format!("Hash={own_hash};Cert=\"%2D%2D\""),
                &own_hash
            ),
            Err(PeerError::NotPem)
        );
        assert_eq!(
            PeerCertificate::from_forwarded_client_cert("Hash=x", "x"),
            Err(PeerError::BadDigest)
        );
    }

    /// Envoy's encoding: the PEM, URL-encoded.
    fn envoy_encode(pem: &[u8]) -> String {
        percent_encoding::utf8_percent_encode(
            std::str::from_utf8(pem).unwrap(),
            percent_encoding::NON_ALPHANUMERIC,
        )
        .to_string()
    }

    #[test]
    fn envoy_certificate_yields_spiffe_san_and_der_thumbprint() {
        let pem = fixture("checkout.crt");
        let peer = PeerCertificate::from_envoy(&envoy_encode(&pem)).unwrap();
        assert_eq!(
            peer.uri_sans,
            vec!["spiffe://example.org/ns/shop/sa/checkout".to_string()]
        );
        let (_, block) = x509_parser::pem::parse_x509_pem(&pem).unwrap();
        let digest = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, &block.contents);
        assert_eq!(
            peer.thumbprint_s256,
            URL_SAFE_NO_PAD.encode(digest.as_ref())
        );
        assert_eq!(peer.thumbprint_s256.len(), 43);
        // Plain (not URL-encoded) PEM decodes the same.
        assert_eq!(PeerCertificate::from_pem(&pem).unwrap(), peer);
    }

    #[test]
    fn thumbprints_differ_between_certificates() {
        let a = PeerCertificate::from_pem(&fixture("checkout.crt")).unwrap();
        let b = PeerCertificate::from_pem(&fixture("intruder.crt")).unwrap();
        assert_ne!(a.thumbprint_s256, b.thumbprint_s256);
    }

    #[test]
    fn certificate_without_uri_san_has_none() {
        let peer = PeerCertificate::from_pem(&fixture("server.crt")).unwrap();
        assert!(peer.uri_sans.is_empty());
    }

    #[test]
    fn garbage_is_refused() {
        assert_eq!(PeerCertificate::from_envoy("hello"), Err(PeerError::NotPem));
        assert_eq!(
            PeerCertificate::from_envoy("%FF%FE"),
            Err(PeerError::BadEncoding)
        );
        let key = fixture("checkout.key");
        assert_eq!(PeerCertificate::from_pem(&key), Err(PeerError::NotPem));
        let bogus = b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n";
        assert_eq!(PeerCertificate::from_pem(bogus), Err(PeerError::NotX509));
        let huge = "A".repeat(MAX_CERT_BYTES * 2 + 1);
        assert_eq!(PeerCertificate::from_envoy(&huge), Err(PeerError::TooLarge));
    }

    #[test]
    fn exact_patterns_match_only_themselves() {
        let p = PrincipalPattern::parse("spiffe://example.org/ns/shop/sa/checkout").unwrap();
        assert!(p.matches("spiffe://example.org/ns/shop/sa/checkout"));
        for other in [
            "spiffe://example.org/ns/shop/sa/checkout/x",
            "spiffe://example.org/ns/shop/sa/checkou",
            "SPIFFE://example.org/ns/shop/sa/checkout",
            "",
        ] {
            assert!(!p.matches(other), "{other}");
        }
    }

    #[test]
    fn one_segment_wildcard() {
        let p = PrincipalPattern::parse("spiffe://example.org/ns/shop/sa/*").unwrap();
        assert!(p.matches("spiffe://example.org/ns/shop/sa/checkout"));
        for other in [
            "spiffe://example.org/ns/shop/sa/",
            "spiffe://example.org/ns/shop/sa/a/b",
            "spiffe://example.org/ns/shop/sa/..",
            "spiffe://example.org/ns/shop/sa/%2e%2e",
            "spiffe://example.org/ns/shop/sax",
            "spiffe://example.org/ns/shop/sa",
        ] {
            assert!(!p.matches(other), "{other}");
        }
    }

    #[test]
    fn any_depth_wildcard() {
        let p = PrincipalPattern::parse("spiffe://example.org/ns/shop/**").unwrap();
        assert!(p.matches("spiffe://example.org/ns/shop/sa/checkout"));
        assert!(p.matches("spiffe://example.org/ns/shop/x"));
        for other in [
            "spiffe://example.org/ns/shop/",
            "spiffe://example.org/ns/shop/sa/../../other/sa/x",
            "spiffe://example.org/ns/shop//x",
            "spiffe://example.org/ns/shop/sa/x?y",
            "spiffe://example.org/ns/shopping/sa/x",
            "spiffe://example.org/ns/other/sa/x",
        ] {
            assert!(!p.matches(other), "{other}");
        }
    }

    #[test]
    fn invalid_patterns_are_refused() {
        use PrincipalPatternError as E;
        assert_eq!(PrincipalPattern::parse(""), Err(E::Empty));
        assert_eq!(
            PrincipalPattern::parse("spiffe://a/ b"),
            Err(E::BadCharacter)
        );
        assert_eq!(
            PrincipalPattern::parse("spiffe://a/*/b"),
            Err(E::MisplacedWildcard)
        );
        assert_eq!(
            PrincipalPattern::parse("spiffe://a/b*"),
            Err(E::MisplacedWildcard)
        );
        assert_eq!(PrincipalPattern::parse("spiffe://*"), Err(E::BarePrefix));
        assert_eq!(PrincipalPattern::parse("/**"), Err(E::BarePrefix));
        assert_eq!(PrincipalPattern::parse("*"), Err(E::MisplacedWildcard));
        for not_a_uri in [
            "checkout.shop.example.org",
            "CN=checkout,O=shop",
            "://x",
            "spiffe://",
        ] {
            assert_eq!(
                PrincipalPattern::parse(not_a_uri),
                Err(E::NotAUri),
                "{not_a_uri}"
            );
        }
        assert_eq!(
            PrincipalPattern::parse("spiffe://a/**")
                .unwrap()
                .to_string(),
            "spiffe://a/**"
        );
    }
}
