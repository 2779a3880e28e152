//! DPoP proof verification (RFC 9449): a proof JWT signed by the client's own key, bound to
//! one request (`htm`, `htu`), one moment (`iat`), one access token (`ath`) and, through the
//! token's `cnf.jkt`, to the key the token was issued for.
//!
//! Pure: the caller passes `now` and the request; single use of `jti` needs shared state and
//! is the shell's job (`engine`), using the `VerifiedProof::jti` this returns. Parsing reuses
//! the strict JWS parser of `jwt` and the key validation of `jwk`, so a proof is held to the
//! same standard as an access token.

use std::sync::Arc;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::Algorithm;
use serde_json::{Map, Value};

use super::dpop_nonce::{NonceCheck, NonceRules};
use super::jwk;
use super::jwt::{self, JwtError};

/// The proof's `typ` (RFC 9449 4.2).
pub const DPOP_TYP: &str = "dpop+jwt";

/// Longest `jti` accepted; RFC 9449 only asks for enough randomness, 96 bits or more.
const MAX_JTI_BYTES: usize = 256;

/// Asymmetric algorithms a proof may use when an issuer lists none.
pub const DEFAULT_DPOP_ALGORITHMS: &[Algorithm] = &[
    Algorithm::ES256,
    Algorithm::ES384,
    Algorithm::EdDSA,
    Algorithm::RS256,
    Algorithm::PS256,
];

/// Whether an issuer's tokens use DPoP.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DpopMode {
    /// The `DPoP` scheme is refused. A token bound with `cnf.jkt` is still never accepted
    /// as a bearer token.
    #[default]
    Disabled,
    /// Bearer tokens without `cnf.jkt`, or DPoP-bound tokens with a valid proof.
    Optional,
    /// Only DPoP-bound tokens with a valid proof.
    Required,
}

/// What a proof must satisfy. Built by `config` from an issuer entry.
#[derive(Debug, Clone)]
pub struct DpopRules {
    pub mode: DpopMode,
    /// Allowed proof algorithms (asymmetric only).
    pub algorithms: Vec<Algorithm>,
    /// `iat` may be at most this far from `now`, either way; `jti` is remembered for twice it.
    pub window_secs: u64,
    /// Largest proof accepted, before any parsing.
    pub max_proof_bytes: usize,
    /// Server-provided nonces (`dpop_nonce`): when set, a proof must carry a current one.
    pub nonce: Option<Arc<NonceRules>>,
}

/// The request a proof is checked against.
#[derive(Debug, Clone, Copy)]
pub struct ProofRequest<'a> {
    pub method: &'a str,
    /// `http` or `https`, as Envoy reports it.
    pub scheme: &'a str,
    pub host: &'a str,
    /// The raw `:path` (query and fragment are ignored).
    pub path: &'a str,
}

/// A proof that passed every check except single use.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifiedProof {
    pub jti: String,
    pub iat: i64,
    /// RFC 7638 thumbprint of the proof key.
    pub jkt: Arc<str>,
    /// A newer nonce to hand the client (`DPoP-Nonce`), when its own is about to expire.
    pub next_nonce: Option<String>,
}

/// Why a proof was refused. Messages name the problem, never the proof or the token.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DpopError {
    #[error("the DPoP proof is missing")]
    Missing,
    #[error("more than one DPoP proof")]
    Multiple,
    #[error("the DPoP proof is malformed: {0}")]
    Malformed(String),
    #[error("the DPoP proof `typ` must be `dpop+jwt`")]
    WrongTyp,
    #[error("the DPoP proof `alg` is not allowed")]
    AlgNotAllowed,
    #[error("the DPoP proof header `{0}` is not accepted")]
    ForbiddenHeader(&'static str),
    #[error("the DPoP proof has no usable `jwk`: {0}")]
    BadKey(String),
    #[error("the DPoP proof signature is invalid")]
    BadSignature,
    #[error("the DPoP proof claim `{0}` is missing or not a string")]
    MissingClaim(&'static str),
    #[error("the DPoP proof claim `iat` is missing or not a whole number of seconds")]
    BadIat,
    #[error("the DPoP proof `htm` does not match the request method")]
    WrongMethod,
    #[error("the DPoP proof `htu` does not match the request URL")]
    WrongUri,
    #[error("the DPoP proof `iat` is outside the accepted window")]
    Stale,
    #[error("the DPoP proof `ath` does not match the access token")]
    WrongAth,
    #[error("the DPoP proof key is not the key the token is bound to (`cnf.jkt`)")]
    WrongKey,
    #[error("the DPoP proof `jti` was already used")]
    Replayed,
    #[error("the DPoP proof has no `nonce`: use the one in the DPoP-Nonce header")]
    NonceMissing,
    #[error("the DPoP proof `nonce` is not current: use the one in the DPoP-Nonce header")]
    NonceRejected,
}

impl DpopError {
    /// Whether the answer is `use_dpop_nonce` with a fresh nonce (RFC 9449 9), which the
    /// client retries with, rather than `invalid_dpop_proof`.
    pub fn wants_nonce(&self) -> bool {
        matches!(self, DpopError::NonceMissing | DpopError::NonceRejected)
    }
}

impl From<JwtError> for DpopError {
    fn from(e: JwtError) -> Self {
        // The JWT parser's messages say "token"; here the thing parsed is the proof.
        DpopError::Malformed(e.to_string().replacen("token ", "", 1))
    }
}

/// Verifies a proof for `access_token` (bound to `bound_jkt`) on `req` at `now`.
///
/// Order: size and structure, header (typ, alg, key), signature, then claims; claims of an
/// unsigned or wrongly signed proof are never judged.
pub fn verify_proof(
    proof: &str,
    access_token: &str,
    bound_jkt: &str,
    rules: &DpopRules,
    req: &ProofRequest<'_>,
    now: i64,
) -> Result<VerifiedProof, DpopError> {
    let parsed = jwt::parse(proof, rules.max_proof_bytes)?;
    let header = &parsed.header;

    for name in ["crit", "b64", "jku", "x5u"] {
        // Extensions we do not implement would be silently ignored, and a remote key is not
        // the embedded one. `kid` and `x5c` are ignored: only `jwk` is ever used.
        if header.contains_key(name) {
            return Err(DpopError::ForbiddenHeader(static_name(name)));
        }
    }
    match header.get("typ") {
        Some(Value::String(t)) if t.eq_ignore_ascii_case(DPOP_TYP) => {}
        _ => return Err(DpopError::WrongTyp),
    }
    let alg = match header.get("alg") {
        Some(Value::String(a)) => a
            .parse::<Algorithm>()
            .map_err(|_| DpopError::AlgNotAllowed)?,
        _ => return Err(DpopError::AlgNotAllowed),
    };
    // INVARIANT: only asymmetric algorithms, whatever the configuration says; a symmetric
    // "proof" would prove nothing about the client.
    let asymmetric = !matches!(alg, Algorithm::HS256 | Algorithm::HS384 | Algorithm::HS512);
    if !asymmetric || !rules.algorithms.contains(&alg) {
        return Err(DpopError::AlgNotAllowed);
    }
    let jwk = header
        .get("jwk")
        .ok_or_else(|| DpopError::BadKey("`jwk` is missing".to_string()))?;
    let key = jwk::public_key_from_jwk(jwk).map_err(DpopError::BadKey)?;
    if !key.fits(alg) {
        return Err(DpopError::BadKey("the key does not fit `alg`".to_string()));
    }
    if !key.verify(alg, parsed.message.as_bytes(), parsed.signature) {
        return Err(DpopError::BadSignature);
    }

    let claims = &parsed.claims;
    let jti = string_claim(claims, "jti")?;
    if jti.is_empty() || jti.len() > MAX_JTI_BYTES {
        return Err(DpopError::Malformed(format!(
            "`jti` must be 1 to {MAX_JTI_BYTES} bytes"
        )));
    }
    if string_claim(claims, "htm")? != req.method {
        return Err(DpopError::WrongMethod);
    }
    let htu = string_claim(claims, "htu")?;
    let want = request_uri(req).ok_or(DpopError::WrongUri)?;
    if normalize_uri(htu).is_none_or(|got| got != want) {
        return Err(DpopError::WrongUri);
    }
    let iat = match claims.get("iat") {
        Some(Value::Number(n)) => n.as_i64().ok_or(DpopError::BadIat)?,
        _ => return Err(DpopError::BadIat),
    };
    let window = i64::try_from(rules.window_secs).unwrap_or(i64::MAX);
    if iat < now.saturating_sub(window) || iat > now.saturating_add(window) {
        return Err(DpopError::Stale);
    }
    let ath = string_claim(claims, "ath")?;
    if !constant_time_eq(ath.as_bytes(), access_token_hash(access_token).as_bytes()) {
        return Err(DpopError::WrongAth);
    }
    if !constant_time_eq(key.fingerprint.as_bytes(), bound_jkt.as_bytes()) {
        return Err(DpopError::WrongKey);
    }
    // Last: a proof wrong in any other way gets that error, not a nonce to retry with.
    let next_nonce = match &rules.nonce {
        None => None,
        Some(nonces) => match claims.get("nonce") {
            Some(Value::String(n)) => match nonces.check(n, now) {
                NonceCheck::Current => None,
                NonceCheck::Previous => Some(nonces.issue(now)),
                NonceCheck::Rejected => return Err(DpopError::NonceRejected),
            },
            Some(_) => return Err(DpopError::NonceRejected),
            None => return Err(DpopError::NonceMissing),
        },
    };
    Ok(VerifiedProof {
        jti: jti.to_string(),
        iat,
        jkt: key.fingerprint.clone(),
        next_nonce,
    })
}

fn static_name(name: &str) -> &'static str {
    match name {
        "crit" => "crit",
        "b64" => "b64",
        "jku" => "jku",
        _ => "x5u",
    }
}

fn string_claim<'c>(
    claims: &'c Map<String, Value>,
    name: &'static str,
) -> Result<&'c str, DpopError> {
    match claims.get(name) {
        Some(Value::String(s)) => Ok(s),
        _ => Err(DpopError::MissingClaim(name)),
    }
}

/// `ath`: base64url(SHA-256(ASCII access token)) (RFC 9449 4.2).
pub fn access_token_hash(access_token: &str) -> String {
    let digest = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, access_token.as_bytes());
    URL_SAFE_NO_PAD.encode(digest.as_ref())
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// The request's URL as `htu` must name it: scheme, host and path, no query or fragment.
fn request_uri(req: &ProofRequest<'_>) -> Option<String> {
    let path = req.path.split(['?', '#']).next().unwrap_or_default();
    normalize_uri(&format!("{}://{}{}", req.scheme, req.host, path))
}

/// RFC 9449 4.3 with RFC 3986 6.2.2/6.2.3 normalization: lower-case scheme and host, default
/// port removed, empty path as `/`, percent-encodings upper-cased and unreserved ones decoded,
/// dot segments removed, query and fragment dropped. `None` for anything that is not an absolute http(s) URI
/// without user info.
pub fn normalize_uri(uri: &str) -> Option<String> {
    let (scheme, rest) = uri.split_once("://")?;
    let scheme = scheme.to_ascii_lowercase();
    let default_port = match scheme.as_str() {
        "http" => "80",
        "https" => "443",
        _ => return None,
    };
    let rest = rest.split(['?', '#']).next().unwrap_or_default();
    let (authority, path) = match rest.find('/') {
        Some(i) => rest.split_at(i),
        None => (rest, ""),
    };
    if authority.is_empty() || authority.contains('@') {
        return None;
    }
    let (host, port) = if authority.starts_with('[') {
        let end = authority.find(']')?;
        let after = &authority[end + 1..];
        let port = match after {
            "" => None,
            p => Some(p.strip_prefix(':')?),
        };
        (&authority[..=end], port)
    } else {
        match authority.rsplit_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (authority, None),
        }
    };
    if host.is_empty()
        || host
            .bytes()
            .any(|b| b.is_ascii_whitespace() || b.is_ascii_control())
    {
        return None;
    }
    let port = match port {
        Some(p) if p.is_empty() || p == default_port => None,
        Some(p) if p.bytes().all(|b| b.is_ascii_digit()) => Some(p.trim_start_matches('0')),
        Some(_) => return None,
        None => None,
    };
    let mut out = format!("{scheme}://{}", host.to_ascii_lowercase());
    if let Some(p) = port {
        out.push(':');
        out.push_str(if p.is_empty() { "0" } else { p });
    }
    if path.is_empty() {
        out.push('/');
    } else {
        out.push_str(&remove_dot_segments(&normalize_percent(path)?));
    }
    Some(out)
}

/// RFC 3986 5.2.4 on an absolute path (after percent-encoding normalization, so `%2E` is a
/// dot): `.` segments dropped, `..` drops the segment before it, a path ending in either
/// keeps its trailing `/`. A client's proof names the URL it sent (`/a/../b`), while Envoy
/// hands on the path it normalized (`/b`).
fn remove_dot_segments(path: &str) -> String {
    if !path.split('/').any(|s| s == "." || s == "..") {
        return path.to_string();
    }
    let segments: Vec<&str> = path.strip_prefix('/').unwrap_or(path).split('/').collect();
    let mut out: Vec<&str> = Vec::with_capacity(segments.len());
    for (i, segment) in segments.iter().enumerate() {
        let last = i + 1 == segments.len();
        match *segment {
            "." => {}
            ".." => {
                out.pop();
            }
            s => {
                out.push(s);
                continue;
            }
        }
        if last {
            out.push("");
        }
    }
    format!("/{}", out.join("/"))
}

/// Upper-cases percent-encodings and decodes the ones of unreserved characters.
fn normalize_percent(path: &str) -> Option<String> {
    let bytes = path.as_bytes();
    let mut out = String::with_capacity(path.len());
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        if b == b'%' {
            let hex = path.get(i + 1..i + 3)?;
            let v = u8::from_str_radix(hex, 16).ok()?;
            if v.is_ascii_alphanumeric() || matches!(v, b'-' | b'.' | b'_' | b'~') {
                out.push(char::from(v));
            } else {
                out.push('%');
                out.push_str(&hex.to_ascii_uppercase());
            }
            i += 3;
        } else {
            if b.is_ascii_control() || b == b' ' {
                return None;
            }
            out.push(char::from(b));
            i += 1;
        }
    }
    Some(out)
}

#[cfg(test)]
#[path = "dpop_tests.rs"]
mod tests;
