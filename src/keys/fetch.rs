//! One attempt to load an issuer's key set: read a file, or GET a JWKS URL (directly or after
//! OIDC discovery), with the transport rules that keep a fetch from being turned against us:
//! HTTPS unless loopback or `allow_http`, a hard byte cap read as a stream, a timeout on the
//! whole exchange, redirects only within the same origin, and never a proxy for a loopback
//! host.
//!
//! Knows nothing about caching or scheduling (that is `keys::store`); never logs key material.

use std::io::ErrorKind;
use std::net::IpAddr;
use std::path::PathBuf;
use std::time::Duration;

use reqwest::header::{ACCEPT, CACHE_CONTROL, HeaderMap};
use reqwest::{StatusCode, Url};
use serde::Deserialize;
use tokio::io::AsyncReadExt;

use crate::config::schema::KeySourceConfig;
use crate::identity::jwk::JwkError;
use crate::identity::{KeyOrigin, KeySet, LoadedKeys};

/// Redirects followed per GET, each to the same scheme, host and port as the original URL.
/// A redirect elsewhere would let whoever controls the JWKS path move trust to another host.
pub(crate) const MAX_REDIRECTS: usize = 3;

/// Where one issuer's keys come from, checked once when the store is built.
#[derive(Debug, Clone)]
pub(crate) enum SourceKind {
    File(PathBuf),
    Url(String),
    Discovery,
    /// Not exactly one of `file`, `url`, `discovery`: every attempt fails with this reason.
    Invalid(&'static str),
}

impl SourceKind {
    pub(crate) fn of(source: &KeySourceConfig) -> Self {
        match (&source.file, &source.url, source.discovery) {
            (Some(file), None, false) => Self::File(file.clone()),
            (None, Some(url), false) => Self::Url(url.clone()),
            (None, None, true) => Self::Discovery,
            (None, None, false) => {
                Self::Invalid("no key source: set one of `file`, `url`, `discovery`")
            }
            _ => {
                Self::Invalid("several key sources: set exactly one of `file`, `url`, `discovery`")
            }
        }
    }
}

/// Why one load attempt failed. Messages never contain URLs (they can end up in a deny reason
/// sent to a client) nor key material; the URL is logged separately by the caller.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FetchError {
    #[error("invalid key source: {0}")]
    Config(&'static str),
    #[error("the key URL is not a valid absolute URL")]
    BadUrl,
    #[error(
        "the key URL must use https (http is allowed only for loopback hosts or with `allow_http`)"
    )]
    Insecure,
    #[error("connection refused")]
    Refused,
    #[error("connection failed: {0}")]
    Connect(String),
    #[error("timed out after {0:?}")]
    Timeout(Duration),
    #[error("unexpected HTTP status {0}")]
    HttpStatus(u16),
    #[error("{0}")]
    NotJson(String),
    /// A well-formed key set in which every key was dropped (the count), or none was listed.
    /// Not a failed fetch: the issuer's answer, which withdraws every key it published before.
    #[error("the issuer publishes no usable key ({})", no_key_detail(*.0))]
    NoKeys(usize),
    #[error("the key set is larger than the {0} byte limit (`keys.max_bytes`)")]
    TooLarge(usize),
    #[error("redirect refused (only up to 3 redirects to the same origin are followed)")]
    Redirect,
    #[error("tls failure: {0}")]
    Tls(String),
    #[error("discovery failed: {0}")]
    Discovery(String),
    #[error("cannot read key file: {0}")]
    Io(String),
    #[error("fetch failed: {0}")]
    Other(String),
}

impl FetchError {
    /// The short result code for `Metrics::record_jwks_fetch` and the `error.class` log field.
    pub fn code(&self) -> &'static str {
        match self {
            Self::Config(_) => "config",
            Self::BadUrl => "bad_url",
            Self::Insecure => "insecure",
            Self::Refused => "refused",
            Self::Connect(_) => "connect",
            Self::Timeout(_) => "timeout",
            Self::HttpStatus(_) => "http_status",
            Self::NotJson(_) => "not_json",
            Self::NoKeys(_) => "no_keys",
            Self::TooLarge(_) => "too_large",
            Self::Redirect => "redirect",
            Self::Tls(_) => "tls",
            Self::Discovery(_) => "discovery",
            Self::Io(_) => "io",
            Self::Other(_) => "error",
        }
    }
}

fn no_key_detail(dropped: usize) -> String {
    match dropped {
        0 => "its key set lists no key".to_string(),
        1 => "the one key in its key set cannot be used; the log says why".to_string(),
        n => format!("none of the {n} keys in its key set can be used; the log says why"),
    }
}

/// A failed attempt and where it was going (redacted URL or file path), for the log line.
#[derive(Debug)]
pub(crate) struct Failure {
    pub error: FetchError,
    pub target: String,
}

/// A successful attempt: a well-formed key set, read or fetched. `keys.set` may be empty
/// (every key dropped, or none listed); the store decides what that means.
pub(crate) struct Loaded {
    pub keys: LoadedKeys,
    /// The JWKS response's Cache-Control lifetime (`max-age`; 0 for `no-cache`/`no-store`).
    pub max_age: Option<Duration>,
    /// Where the keys came from (redacted URL or file path), for the log line.
    pub target: String,
}

/// The shared HTTP clients, one per kind of host. `remote` honours the environment's proxy
/// settings (`HTTPS_PROXY`, `HTTP_PROXY`, `ALL_PROXY`, `NO_PROXY`), which an HTTPS URL crosses
/// in a tunnel, the certificate still checked end to end. `loopback` never uses a proxy: a
/// loopback URL may be plain HTTP (see `check_url`), and through a proxy the request and the
/// keys that come back would travel in cleartext to whatever host the environment names, which
/// could answer with keys of its own. Redirects stay within one origin, so a fetch never moves
/// from one kind of host to the other.
pub(crate) struct Clients {
    remote: reqwest::Client,
    loopback: reqwest::Client,
}

impl Clients {
    fn for_url(&self, url: &Url) -> &reqwest::Client {
        if is_loopback(url) {
            &self.loopback
        } else {
            &self.remote
        }
    }
}

pub(crate) fn build_clients() -> Result<Clients, String> {
    Ok(Clients {
        remote: client_builder().build().map_err(|e| innermost(&e))?,
        loopback: client_builder()
            .no_proxy()
            .build()
            .map_err(|e| innermost(&e))?,
    })
}

/// An HTTP client's settings: no idle connection pool (fetches are minutes apart, and a fresh
/// connection each time means a moved or dead server is noticed at once), same-origin redirects
/// only, no automatic decompression (so `max_bytes` bounds what the issuer can make us hold).
fn client_builder() -> reqwest::ClientBuilder {
    let policy = reqwest::redirect::Policy::custom(|attempt| {
        let previous = attempt.previous();
        let same_origin = previous
            .first()
            .is_some_and(|first| same_origin(first, attempt.url()));
        if previous.len() > MAX_REDIRECTS || !same_origin {
            attempt.error("redirect refused")
        } else {
            attempt.follow()
        }
    });
    reqwest::Client::builder()
        .redirect(policy)
        .pool_max_idle_per_host(0)
        .user_agent(concat!("portcullis/", env!("CARGO_PKG_VERSION")))
}

fn same_origin(a: &Url, b: &Url) -> bool {
    a.scheme() == b.scheme()
        && a.host_str() == b.host_str()
        && a.port_or_known_default() == b.port_or_known_default()
}

/// Loads an issuer's key set once from its source.
pub(crate) async fn load(
    kind: &SourceKind,
    issuer: &str,
    cfg: &KeySourceConfig,
    client: &Result<Clients, String>,
) -> Result<Loaded, Failure> {
    match kind {
        SourceKind::Invalid(why) => Err(Failure {
            error: FetchError::Config(why),
            target: String::new(),
        }),
        SourceKind::File(path) => {
            let target = path.display().to_string();
            let body = read_file(path, cfg).await.map_err(|error| Failure {
                error,
                target: target.clone(),
            })?;
            let keys = parse(&body, KeyOrigin::LocalFile).map_err(|error| Failure {
                error,
                target: target.clone(),
            })?;
            Ok(Loaded {
                keys,
                max_age: None,
                target,
            })
        }
        SourceKind::Url(url) => {
            let client = client_or_fail(client, url)?;
            fetch_jwks(client, url, cfg).await
        }
        SourceKind::Discovery => {
            let client = client_or_fail(client, issuer)?;
            let jwks_uri = discover(client, issuer, cfg).await?;
            fetch_jwks(client, &jwks_uri, cfg).await
        }
    }
}

fn client_or_fail<'c>(
    client: &'c Result<Clients, String>,
    target: &str,
) -> Result<&'c Clients, Failure> {
    client.as_ref().map_err(|e| Failure {
        error: FetchError::Other(format!("http client unavailable: {e}")),
        target: redact_str(target),
    })
}

async fn read_file(path: &PathBuf, cfg: &KeySourceConfig) -> Result<Vec<u8>, FetchError> {
    let max = usize::try_from(cfg.max_bytes.get()).unwrap_or(usize::MAX);
    let read = async {
        let file = tokio::fs::File::open(path)
            .await
            .map_err(|e| FetchError::Io(e.kind().to_string()))?;
        let mut body = Vec::new();
        // Read one byte past the cap so "exactly at the cap" and "over it" are told apart.
        file.take(max as u64 + 1)
            .read_to_end(&mut body)
            .await
            .map_err(|e| FetchError::Io(e.kind().to_string()))?;
        if body.len() > max {
            return Err(FetchError::TooLarge(max));
        }
        Ok(body)
    };
    let timeout = cfg.fetch_timeout.get();
    tokio::time::timeout(timeout, read)
        .await
        .map_err(|_| FetchError::Timeout(timeout))?
}

async fn fetch_jwks(client: &Clients, url: &str, cfg: &KeySourceConfig) -> Result<Loaded, Failure> {
    let target = redact_str(url);
    let fail = |error| Failure {
        error,
        target: target.clone(),
    };
    let url = check_url(url, cfg.allow_http).map_err(fail)?;
    let (body, headers) = get_capped(client, &url, cfg).await.map_err(fail)?;
    let keys = parse(&body, KeyOrigin::Fetched).map_err(fail)?;
    Ok(Loaded {
        keys,
        max_age: cache_max_age(&headers),
        target,
    })
}

#[derive(Deserialize)]
struct DiscoveryDocument {
    issuer: Option<String>,
    jwks_uri: Option<String>,
}

/// Fetches `<issuer>/.well-known/openid-configuration` and returns its `jwks_uri`, after
/// checking that the document speaks for the configured issuer (OpenID Connect Discovery 1.0
/// section 4.3: the `issuer` value must be identical).
async fn discover(
    client: &Clients,
    issuer: &str,
    cfg: &KeySourceConfig,
) -> Result<String, Failure> {
    let url = format!(
        "{}/.well-known/openid-configuration",
        issuer.trim_end_matches('/')
    );
    let target = redact_str(&url);
    let fail = |error| Failure {
        error,
        target: target.clone(),
    };
    let parsed = check_url(&url, cfg.allow_http).map_err(fail)?;
    let (body, _) = get_capped(client, &parsed, cfg).await.map_err(fail)?;
    let doc: DiscoveryDocument = serde_json::from_slice(&body).map_err(|_| {
        fail(FetchError::Discovery(
            "the discovery document is not a valid JSON object".into(),
        ))
    })?;
    match doc.issuer.as_deref() {
        Some(found) if found == issuer => {}
        Some(found) => {
            return Err(fail(FetchError::Discovery(format!(
                "the discovery document names issuer `{}`, expected `{issuer}`",
                truncate(found, 200)
            ))));
        }
        None => {
            return Err(fail(FetchError::Discovery(
                "the discovery document has no `issuer`".into(),
            )));
        }
    }
    let jwks_uri = doc.jwks_uri.ok_or_else(|| {
        fail(FetchError::Discovery(
            "the discovery document has no `jwks_uri`".into(),
        ))
    })?;
    discovered_jwks_url(&parsed, &jwks_uri, cfg.allow_http).map_err(fail)?;
    Ok(jwks_uri)
}

/// The transport rule for a `jwks_uri` a discovery document names. The loopback-HTTP
/// exemption of `check_url` is for URLs the operator wrote: a document fetched from a
/// non-loopback issuer cannot point Portcullis at a plain-HTTP loopback port (its own admin
/// listener, say). A loopback issuer (development) keeps it; `allow_http` allows any.
pub(crate) fn discovered_jwks_url(
    discovery: &Url,
    jwks_uri: &str,
    allow_http: bool,
) -> Result<Url, FetchError> {
    let url = check_url(jwks_uri, allow_http)?;
    if url.scheme() == "http" && !allow_http && !is_loopback(discovery) {
        return Err(FetchError::Insecure);
    }
    Ok(url)
}

/// GETs a URL and returns the body of a 200 response, read as a stream and abandoned as soon as
/// it passes `max_bytes` (Content-Length is only used to fail early, never trusted to bound the
/// read). The timeout covers connect, headers and body.
async fn get_capped(
    clients: &Clients,
    url: &Url,
    cfg: &KeySourceConfig,
) -> Result<(Vec<u8>, HeaderMap), FetchError> {
    let max = usize::try_from(cfg.max_bytes.get()).unwrap_or(usize::MAX);
    let timeout = cfg.fetch_timeout.get();
    let exchange = async {
        let mut resp = clients
            .for_url(url)
            .get(url.clone())
            .header(ACCEPT, "application/jwk-set+json, application/json")
            .send()
            .await
            .map_err(|e| classify(&e, timeout))?;
        if resp.status() != StatusCode::OK {
            return Err(FetchError::HttpStatus(resp.status().as_u16()));
        }
        if resp.content_length().is_some_and(|n| n > max as u64) {
            return Err(FetchError::TooLarge(max));
        }
        let headers = resp.headers().clone();
        let mut body = Vec::new();
        while let Some(chunk) = resp.chunk().await.map_err(|e| classify(&e, timeout))? {
            if body.len() + chunk.len() > max {
                return Err(FetchError::TooLarge(max));
            }
            body.extend_from_slice(&chunk);
        }
        Ok((body, headers))
    };
    tokio::time::timeout(timeout, exchange)
        .await
        .map_err(|_| FetchError::Timeout(timeout))?
}

/// A well-formed key set, possibly with no usable key (an answer, not a failure: see
/// `FetchError::NoKeys`); an error only when the document itself is not a key set.
fn parse(body: &[u8], origin: KeyOrigin) -> Result<LoadedKeys, FetchError> {
    KeySet::parse_jwks(body, origin).map_err(|e| match e {
        // The parser's JSON message may quote document bytes; keep only the class.
        JwkError::NotJson(_) => FetchError::NotJson("key set is not valid JSON".into()),
        JwkError::NotAKeySet(why) => {
            FetchError::NotJson(format!("key set is not a JWKS document: {why}"))
        }
        // `parse_jwks` reports an empty set as a set; kept for the exhaustive match.
        JwkError::NoUsableKeys => FetchError::NoKeys(0),
    })
}

/// Parses a key URL and applies the transport rule: HTTPS, or HTTP to a loopback host, or HTTP
/// anywhere when the operator opted in with `allow_http`.
pub(crate) fn check_url(url: &str, allow_http: bool) -> Result<Url, FetchError> {
    let parsed = Url::parse(url).map_err(|_| FetchError::BadUrl)?;
    if parsed.host_str().is_none_or(str::is_empty) {
        return Err(FetchError::BadUrl);
    }
    match parsed.scheme() {
        "https" => Ok(parsed),
        "http" if allow_http || is_loopback(&parsed) => Ok(parsed),
        _ => Err(FetchError::Insecure),
    }
}

/// 127.0.0.0/8, ::1 and `localhost`.
pub(crate) fn is_loopback(url: &Url) -> bool {
    let Some(host) = url.host_str() else {
        return false;
    };
    if host.eq_ignore_ascii_case("localhost") {
        return true;
    }
    let bare = host.trim_start_matches('[').trim_end_matches(']');
    bare.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

/// The Cache-Control lifetime of a response: `max-age=N`, or zero when the response must not
/// be reused (`no-cache`, `no-store`). `None` without a usable directive.
pub(crate) fn cache_max_age(headers: &HeaderMap) -> Option<Duration> {
    let mut found = None;
    for value in headers.get_all(CACHE_CONTROL) {
        let Ok(value) = value.to_str() else { continue };
        for directive in value.split(',') {
            let directive = directive.trim();
            let (name, arg) = match directive.split_once('=') {
                Some((n, a)) => (n.trim(), Some(a.trim().trim_matches('"'))),
                None => (directive, None),
            };
            if name.eq_ignore_ascii_case("no-store") || name.eq_ignore_ascii_case("no-cache") {
                return Some(Duration::ZERO);
            }
            if name.eq_ignore_ascii_case("max-age")
                && found.is_none()
                && let Some(secs) = arg.and_then(|a| a.parse::<u64>().ok())
            {
                found = Some(Duration::from_secs(secs));
            }
        }
    }
    found
}

/// Maps a transport error to a result code. reqwest does not expose TLS or refusal as kinds,
/// so the cause chain is inspected: an `io::Error` of kind `ConnectionRefused`, or a rustls
/// error (whose messages name certificates, handshakes or TLS messages).
fn classify(e: &reqwest::Error, timeout: Duration) -> FetchError {
    if e.is_timeout() {
        return FetchError::Timeout(timeout);
    }
    if e.is_redirect() {
        return FetchError::Redirect;
    }
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(e);
    let mut tls = false;
    while let Some(err) = source {
        if let Some(io) = err.downcast_ref::<std::io::Error>()
            && io.kind() == ErrorKind::ConnectionRefused
        {
            return FetchError::Refused;
        }
        let text = err.to_string().to_ascii_lowercase();
        if [
            "certificate",
            "handshake",
            "tls",
            "corrupt message",
            "invalidcontenttype",
        ]
        .iter()
        .any(|m| text.contains(m))
        {
            tls = true;
        }
        source = err.source();
    }
    if tls {
        FetchError::Tls(innermost(e))
    } else if e.is_connect() {
        FetchError::Connect(innermost(e))
    } else {
        FetchError::Other(innermost(e))
    }
}

/// The deepest cause's message: it names the problem without the URL reqwest adds on top.
fn innermost(e: &(dyn std::error::Error + 'static)) -> String {
    let mut last = e;
    while let Some(next) = last.source() {
        last = next;
    }
    truncate(&last.to_string(), 200).to_string()
}

fn truncate(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// A URL for logs: scheme, host, port and path; no credentials, query or fragment.
pub(crate) fn redact_str(url: &str) -> String {
    match Url::parse(url) {
        Ok(mut u) => {
            let _ = u.set_username("");
            let _ = u.set_password(None);
            u.set_query(None);
            u.set_fragment(None);
            u.to_string()
        }
        Err(_) => "<invalid url>".to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use reqwest::header::HeaderValue;

    fn cc(values: &[&str]) -> Option<Duration> {
        let mut h = HeaderMap::new();
        for v in values {
            h.append(CACHE_CONTROL, HeaderValue::from_str(v).unwrap());
        }
        cache_max_age(&h)
    }

    #[test]
    fn cache_control_max_age() {
        assert_eq!(cc(&[]), None);
        assert_eq!(cc(&["public, max-age=600"]), Some(Duration::from_secs(600)));
        assert_eq!(cc(&["Max-Age=\"30\""]), Some(Duration::from_secs(30)));
        assert_eq!(cc(&["public", "max-age=5"]), Some(Duration::from_secs(5)));
        assert_eq!(cc(&["max-age=600, no-cache"]), Some(Duration::ZERO));
        assert_eq!(cc(&["no-store"]), Some(Duration::ZERO));
        assert_eq!(cc(&["max-age=abc"]), None);
        assert_eq!(cc(&["max-age=-5"]), None);
    }

    #[test]
    fn a_discovered_jwks_uri_gets_the_loopback_exemption_only_from_a_loopback_issuer() {
        let remote =
            Url::parse("https://idp.example.com/.well-known/openid-configuration").unwrap();
        let local = Url::parse("http://127.0.0.1:9000/.well-known/openid-configuration").unwrap();
        let admin = "http://127.0.0.1:9192/revocations";
        assert_eq!(
            discovered_jwks_url(&remote, admin, false).unwrap_err(),
            FetchError::Insecure
        );
        assert!(discovered_jwks_url(&remote, "https://idp.example.com/jwks", false).is_ok());
        assert!(discovered_jwks_url(&local, "http://127.0.0.1:9000/jwks", false).is_ok());
        assert!(discovered_jwks_url(&remote, admin, true).is_ok());
        assert_eq!(
            discovered_jwks_url(&remote, "http://idp.example.com/jwks", false).unwrap_err(),
            FetchError::Insecure
        );
    }

    #[test]
    fn url_rules() {
        assert!(check_url("https://idp.example.com/jwks", false).is_ok());
        assert!(check_url("http://127.0.0.1:8080/jwks", false).is_ok());
        assert!(check_url("http://127.9.9.9/jwks", false).is_ok());
        assert!(check_url("http://[::1]:80/jwks", false).is_ok());
        assert!(check_url("http://LOCALHOST/jwks", false).is_ok());
        assert_eq!(
            check_url("http://idp.example.com/jwks", false).unwrap_err(),
            FetchError::Insecure
        );
        assert!(check_url("http://idp.example.com/jwks", true).is_ok());
        // A loopback-looking name that is not loopback must not pass.
        assert_eq!(
            check_url("http://127.0.0.1.evil.example/jwks", false).unwrap_err(),
            FetchError::Insecure
        );
        assert_eq!(
            check_url("http://localhost.evil.example/", false).unwrap_err(),
            FetchError::Insecure
        );
        assert_eq!(
            check_url("ftp://idp.example.com/jwks", true).unwrap_err(),
            FetchError::Insecure
        );
        assert_eq!(
            check_url("file:///etc/passwd", true).unwrap_err(),
            FetchError::BadUrl
        );
        assert_eq!(check_url("/jwks", false).unwrap_err(), FetchError::BadUrl);
    }

    #[test]
    fn redaction_drops_credentials_and_query() {
        assert_eq!(
            redact_str("https://user:pw@idp.example.com:8443/jwks?key=secret#x"),
            "https://idp.example.com:8443/jwks"
        );
    }

    #[test]
    fn source_kind_requires_exactly_one() {
        let mut cfg: KeySourceConfig = serde_yaml::from_str("url: https://x/jwks").unwrap();
        assert!(matches!(SourceKind::of(&cfg), SourceKind::Url(_)));
        cfg.discovery = true;
        assert!(matches!(SourceKind::of(&cfg), SourceKind::Invalid(_)));
        cfg.url = None;
        assert!(matches!(SourceKind::of(&cfg), SourceKind::Discovery));
        cfg.discovery = false;
        assert!(matches!(SourceKind::of(&cfg), SourceKind::Invalid(_)));
    }
}
